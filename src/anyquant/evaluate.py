"""evaluate(): quality against the float model, plus what a saved output actually stores."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from anyquant.errors import AnyquantError

DEFAULT_MAX_TOKENS = 16384


def evaluate(model, baseline=None, text: str | None = None, *, tokenizer=None,
             max_tokens: int = DEFAULT_MAX_TOKENS, windows: torch.Tensor | None = None,
             progress: bool = True) -> dict[str, Any]:
    from anyquant.eval.metrics import compare, token_windows

    if windows is None:
        if tokenizer is None:
            raise AnyquantError("evaluate: a tokenizer is needed to turn text into tokens (pass tokenizer=...)")
        if text is None:
            from anyquant.calib.text import evaluation_text

            text = evaluation_text()
        windows = token_windows(tokenizer, text, max_tokens=max_tokens)
    return compare(model, baseline, windows, progress=progress)


def _module_of(tensor_name: str, module_names: set[str]) -> str | None:
    parts = tensor_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in module_names:
            return prefix
    return None


def stored_sizes(directory: str | Path, plan_dict: dict[str, Any]) -> dict[str, Any]:
    """Bytes per component and bits per quantized weight, read from the saved safetensors headers.

    Counts every byte a quantized layer stores (codes, scales, zero points, quantization state),
    divided by the number of weights it replaces: the honest bits-per-weight."""
    from safetensors import safe_open

    directory = Path(directory)
    decisions = {d["name"]: d for d in plan_dict["decisions"]}
    names = set(decisions)
    by_component: dict[str, int] = defaultdict(int)
    q_bytes = 0
    q_weights = 0
    shapes_seen: set[str] = set()
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                shape = sl.get_shape()
                numel = 1
                for s in shape:
                    numel *= s
                nbytes = numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                mod = _module_of(key, names)
                d = decisions.get(mod) if mod else None
                if d is None:
                    comp = "other"
                elif d["action"] == "quantize":
                    comp = f"{d['component']} (quantized)"
                    q_bytes += nbytes
                    if mod not in shapes_seen:
                        shapes_seen.add(mod)
                else:
                    comp = "embeddings" if d["kind"] == "embedding" else f"{d['component']} (float)"
                by_component[comp] += nbytes
    for mod in shapes_seen:
        q_weights += _weight_count(decisions[mod])
    return {
        "bytes_by_component": dict(by_component),
        "total_bytes": sum(by_component.values()),
        "bits_per_weight": (8 * q_bytes / q_weights) if q_weights else None,
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
    }


def _weight_count(decision: dict[str, Any]) -> int:
    shape = decision.get("shape")
    if shape:
        return int(shape[0]) * int(shape[1])
    raise AnyquantError(f"plan entry {decision['name']} lacks its shape; re-save with this anyquant version")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
