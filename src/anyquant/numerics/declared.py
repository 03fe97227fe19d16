"""What the model itself declares about dtypes: `config.dtype`, and parameters it keeps in float32.

transformers casts every tensor to the load dtype, so float32 parameters of a 16-bit checkpoint
(evo-1's filter `poles` / `residues`) are found here from the safetensors headers and restored
after the policy casts. `_keep_in_fp32_modules(_strict)` declarations are read by
model/modelmap.py (`declared_fp32_modules`), the one parser of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from anyquant.numerics.dtype import DTYPES, dtype_name

log = logging.getLogger(__name__)


def declared_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model's config declares (`config.dtype`, older `torch_dtype`; a VLM's
    text/LLM sub-config when the top level has none). transformers rewrites `config.dtype` to the
    dtype a model was loaded with, so for an in-memory model this is that dtype."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "llm_config", None)):
        if c is None:
            continue
        if isinstance(c, dict):
            v = c.get("dtype") or c.get("torch_dtype")
        else:
            v = c.__dict__.get("dtype") or c.__dict__.get("torch_dtype")
        if v is None:
            continue
        name = v if isinstance(v, str) else dtype_name(v) if isinstance(v, torch.dtype) else None
        name = (name or "").replace("torch.", "")
        if name in DTYPES:
            return DTYPES[name]
    return None


_PRECISE = {"F32": torch.float32, "F64": torch.float64}
_LOW = {"BF16", "F16"}


def precise_params(model: nn.Module) -> dict[str, dict[str, str]]:
    """Parameters kept in float32 while most of the model's weights are 16-bit: in the model as
    handed over (mixed dtypes in memory), or in its safetensors checkpoint (transformers casts
    every tensor to `dtype` on load, rounding them; evo-1 keeps its filters' `poles` / `residues`
    in float32 this way). {param name: {"module", "file", "key"}}; file/key set when the
    float32 values can be restored from the checkpoint."""
    params = dict(model.named_parameters())
    found: dict[str, dict[str, str]] = {}
    # in memory
    numel: dict[torch.dtype, int] = {}
    for p in params.values():
        if p.is_floating_point():
            numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    low = numel.get(torch.bfloat16, 0) + numel.get(torch.float16, 0)
    if low > sum(n for d, n in numel.items() if d in (torch.float32, torch.float64)):
        for n, p in params.items():
            if p.dtype in (torch.float32, torch.float64):
                found[n] = {"module": n.rpartition(".")[0], "file": "", "key": ""}
    # in the checkpoint
    src = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    files = sorted(Path(src).glob("*.safetensors")) if src and Path(str(src)).is_dir() else []
    if not files:
        return found
    from safetensors import safe_open

    stored: dict[str, tuple[str, str]] = {}  # key -> (dtype, file)
    sizes = {"low": 0, "precise": 0}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    dt = sl.get_dtype()
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    if dt in _LOW:
                        sizes["low"] += n
                    elif dt in _PRECISE:
                        sizes["precise"] += n
                        stored[k] = (dt, str(f))
    except (OSError, ValueError) as e:  # not a readable safetensors file: nothing to restore
        log.info("dtype policy: checkpoint dtypes not read (%s)", e)
        return found
    if sizes["low"] <= sizes["precise"]:
        return found
    for k, (dt, f) in stored.items():
        if k in params and params[k].is_floating_point():
            found[k] = {"module": k.rpartition(".")[0], "file": f, "key": k}
    return found


def restore_precise_params(model: nn.Module, precise: dict[str, dict[str, str]]) -> None:
    """float32 values of parameters the checkpoint stores in float32 (the load rounded them to
    the model's 16-bit dtype); only parameters that are float32 now (inside a float32 region, or
    float32 compute) are restored."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for n, info in precise.items():
        if info.get("file"):
            by_file.setdefault(info["file"], []).append((n, info["key"]))
    params = dict(model.named_parameters())
    for f, items in by_file.items():
        with safe_open(f, framework="pt") as fh:
            for n, key in items:
                p = params.get(n)
                if p is not None and p.dtype == torch.float32:
                    t = fh.get_tensor(key)
                    if tuple(t.shape) == tuple(p.shape):
                        p.data.copy_(t.to(dtype=torch.float32))
