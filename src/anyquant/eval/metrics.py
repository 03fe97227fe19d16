"""Quality of a (quantized) causal LM against its float baseline on held-out text.

Perplexity alone hides damage that cancels out on average; KL divergence from the baseline
and top-1 agreement measure how far the quantized model's *distribution* moved, token by
token, which is what users notice when the model starts saying different things.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from anyquant.calib.text import evaluation_text, token_windows
from anyquant.errors import AnyquantError
from anyquant.progress import progress_bar

# Rows of the [positions, vocab] logit matrix upcast to float32 at a time. With vocab 49152,
# 1024 rows are 200 MB per float32 copy; a few copies live at once (model, baseline, softmax).
_ROWS_PER_CHUNK = 1024


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids.to(_model_device(model)))
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise AnyquantError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for input "
            f"{tuple(input_ids.shape)}; expected [batch, seq, vocab]. Pass a causal LM "
            "(e.g. AutoModelForCausalLM), not a base model without its head"
        )
    return logits


class _Accumulator:
    """Sums in float64: 16k tokens of float32 NLL summed naively lose ~4 digits."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.baseline_nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0


@torch.no_grad()
def compare(
    model: torch.nn.Module,
    baseline: Optional[torch.nn.Module],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``windows``, and how far it moved from ``baseline``.

    Returns ``{"perplexity", "baseline_perplexity", "kl_divergence", "top1_agreement",
    "tokens"}``; the baseline entries are None when ``baseline`` is None.

    * perplexity: exp(mean next-token NLL) over every position but each row's first.
    * kl_divergence: mean over predicted positions of KL(baseline || model), in nats — the
      extra surprise the quantized model adds where the float model is confident.
    * top1_agreement: fraction of positions where both models' argmax tokens agree.

    Logits are upcast to float32 chunk by chunk, whatever the model's dtype, so fp16/bf16/int
    models are scored with the same arithmetic and memory stays bounded.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise AnyquantError(
            f"compare: windows must be a [n_windows, length>=2] LongTensor, got shape {tuple(windows.shape)}; "
            "build it with anyquant.eval.metrics.token_windows"
        )
    if batch_size < 1:
        raise AnyquantError(f"compare: batch_size={batch_size} must be >= 1")
    windows = windows.long()
    same_model = baseline is model

    # Dropout in train mode would make two passes of the same model disagree; restore after.
    modes = [(m, m.training) for m in (model, baseline) if m is not None]
    for m, _ in modes:
        m.eval()
    acc = _Accumulator()
    try:
        with progress_bar("evaluating", windows.shape[0], progress, unit="windows", remaining=True) as advance:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]
                logits = _logits(model, batch)
                base_logits = None
                if baseline is not None:
                    base_logits = logits if same_model else _logits(baseline, batch)
                _accumulate(acc, logits, base_logits, batch)
                del logits, base_logits
                advance(batch.shape[0])
    finally:
        for m, training in modes:
            m.train(training)

    if acc.tokens == 0:
        raise AnyquantError("compare: no predicted tokens")
    has_base = baseline is not None
    return {
        "perplexity": math.exp(acc.nll / acc.tokens),
        "baseline_perplexity": math.exp(acc.baseline_nll / acc.tokens) if has_base else None,
        "kl_divergence": acc.kl / acc.tokens if has_base else None,
        "top1_agreement": acc.agree / acc.tokens if has_base else None,
        "tokens": acc.tokens,
    }


def _accumulate(
    acc: _Accumulator,
    logits: torch.Tensor,
    base_logits: Optional[torch.Tensor],
    batch: torch.Tensor,
) -> None:
    vocab = logits.shape[-1]
    # Position t predicts token t+1; the last position has no target.
    pred = logits[:, :-1].reshape(-1, vocab)
    targets = batch[:, 1:].reshape(-1).to(pred.device)
    base = base_logits[:, :-1].reshape(-1, vocab) if base_logits is not None else None
    for lo in range(0, pred.shape[0], _ROWS_PER_CHUNK):
        hi = lo + _ROWS_PER_CHUNK
        logp = F.log_softmax(pred[lo:hi].float(), dim=-1)
        tgt = targets[lo:hi]
        acc.nll -= logp.gather(1, tgt[:, None]).double().sum().item()
        if base is not None:
            logq = F.log_softmax(base[lo:hi].to(logp.device).float(), dim=-1)
            acc.baseline_nll -= logq.gather(1, tgt[:, None]).double().sum().item()
            # KL(q||p) = sum q (log q - log p). Tokens the baseline masks to -inf logits would
            # give 0 * (-inf - -inf) = NaN; they carry no baseline mass, so they contribute 0.
            q = logq.exp()
            terms = torch.where(q > 0, q * (logq - logp), torch.zeros((), device=q.device))
            acc.kl += terms.sum(dim=-1).double().sum().item()
            acc.agree += int((logq.argmax(dim=-1) == logp.argmax(dim=-1)).sum().item())
        acc.tokens += int(tgt.numel())


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``windows`` (see :func:`compare`)."""
    return compare(model, None, windows, batch_size=batch_size, progress=progress)["perplexity"]


DEFAULT_MAX_TOKENS = 16384


def evaluate(model, baseline=None, text: str | None = None, *, tokenizer=None,
             max_tokens: int = DEFAULT_MAX_TOKENS, windows: torch.Tensor | None = None,
             progress: bool = True) -> dict[str, Any]:
    if windows is None:
        if tokenizer is None:
            raise AnyquantError("evaluate: a tokenizer is needed to turn text into tokens (pass tokenizer=...)")
        if text is None:
            text = evaluation_text()
        windows = token_windows(tokenizer, text, max_tokens=max_tokens)
    return compare(model, baseline, windows, progress=progress)


class CachedLogits(torch.nn.Module):
    """A baseline that runs once: its logits are kept per input, so comparing several
    quantized models with the same float model costs one float pass, not one per method."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._cache: dict[bytes, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, **kwargs):
        key = input_ids.detach().cpu().numpy().tobytes() + str(tuple(input_ids.shape)).encode()
        if key not in self._cache:
            out = self.model(input_ids=input_ids, **kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            self._cache[key] = logits.detach().float()
        return _Output(self._cache[key])


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
