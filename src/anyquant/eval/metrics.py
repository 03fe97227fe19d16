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

from anyquant.errors import AnyquantError

# Rows of the [positions, vocab] logit matrix upcast to float32 at a time. With vocab 49152,
# 1024 rows are 200 MB per float32 copy; a few copies live at once (model, baseline, softmax).
_ROWS_PER_CHUNK = 1024


def _encode(tokenizer: Any, text: str) -> list[int]:
    # encode() is the one API both HF slow and fast tokenizers share with the same result type
    # (a flat list of ids); __call__ returns a BatchEncoding whose shape depends on input type.
    try:
        # verbose=False silences HF's "sequence longer than model max length" warning: we cut
        # the ids into windows ourselves.
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids)


def token_windows(
    tokenizer: Any,
    text: str,
    max_tokens: int = 16384,
    window: int = 512,
    bos: bool = True,
) -> torch.LongTensor:
    """Cut the first ``max_tokens`` tokens of ``text`` into non-overlapping rows of ``window``.

    With ``bos`` and a tokenizer that has a BOS token, each row is ``[bos] + window - 1`` text
    tokens, so row length is always ``window`` (the model's context budget). Models like
    Gemma score far worse without BOS, and every window then starts the way training did.
    A trailing partial window is dropped so all windows weigh the same, unless the text is
    too short for even one full window, in which case the single short row is kept.
    Returns a LongTensor ``[n_windows, window]``. Deterministic.
    """
    if window < 2:
        raise AnyquantError(f"token_windows: window={window} must be >= 2 (one context token and one target)")
    if max_tokens < 1:
        raise AnyquantError(f"token_windows: max_tokens={max_tokens} must be >= 1")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    per_row = window - 1 if bos_id is not None else window

    ids = _encode_prefix(tokenizer, text, max_tokens)
    if not ids:
        raise AnyquantError("token_windows: the text produced no tokens; pass non-empty evaluation text")
    ids = ids[:max_tokens]
    n_rows = len(ids) // per_row
    if n_rows == 0:
        rows = [ids]
    else:
        rows = [ids[i * per_row : (i + 1) * per_row] for i in range(n_rows)]
    if bos_id is not None:
        rows = [[int(bos_id)] + row for row in rows]
    return torch.tensor(rows, dtype=torch.long)


def _encode_prefix(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """Tokens of a prefix of ``text`` long enough to yield ``max_tokens`` tokens.

    Tokenizing all 3M characters of the evaluation text takes seconds we do not need. A prefix
    cut at whitespace tokenizes identically to the full text up to the cut (BPE pre-tokenizers
    split on whitespace), and we keep a margin so the cut never reaches the tokens we use.
    """
    margin = 64
    n_chars = max(4096, (max_tokens + margin) * 8)
    while True:
        if n_chars >= len(text):
            return _encode(tokenizer, text)
        cut = text.rfind(" ", 0, n_chars)
        prefix = text[: cut if cut > 0 else n_chars]
        ids = _encode(tokenizer, prefix)
        if len(ids) >= max_tokens + margin:
            return ids
        n_chars *= 2


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
        with _progress_bar(progress, windows.shape[0]) as advance:
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


class _progress_bar:
    """Yields an ``advance(n)`` callable; a rich bar when enabled, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("evaluating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("windows"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task("evaluating", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``windows`` (see :func:`compare`)."""
    return compare(model, None, windows, batch_size=batch_size, progress=progress)["perplexity"]
