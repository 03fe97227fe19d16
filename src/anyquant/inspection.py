"""What a model directory holds and what each method would make of it (`anyquant inspect`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from anyquant.config import known_methods, make_config
from anyquant.formats.hf import meta_skeleton
from anyquant.formats.io import load_source
from anyquant.methods import handler_for
from anyquant.model.load import checkpoint_float_dtype, inspect_files, resolve_source
from anyquant.model.modelmap import build_model_map
from anyquant.numerics.dtype import DTYPES
from anyquant.planning import build_plan
from anyquant.planning.experts import expert_decisions

log = logging.getLogger(__name__)


def size_estimates(model, mmap) -> dict[str, dict[str, Any]]:

    float_bytes = sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )
    out: dict[str, dict[str, Any]] = {"float (as loaded)": {"bytes": float_bytes}}
    for method in known_methods():
        cfg = make_config(method)
        plan = build_plan(mmap, cfg, "float32", experts=expert_decisions(model, mmap, cfg, "float32"))
        h = handler_for(method)
        saved = 0.0
        quantized = 0
        for d in plan.to_quantize():
            info = mmap.modules[d.name]
            n = (info.in_features or 0) * (info.out_features or 0)
            elem = float_bytes / max(1, mmap.total_params)
            saved += n * elem - n * h.bits_per_weight(info, d.options, cfg) / 8
            quantized += n
        for d in plan.experts_to_quantize():  # fused MoE experts
            n = d.shape[0] * d.shape[1] * d.shape[2]
            elem = float_bytes / max(1, mmap.total_params)
            saved += n * elem - n * h.experts_bits_per_weight(d.shape, d.options, cfg) / 8
            quantized += n
        out[method] = {"bytes": int(float_bytes - saved), "quantized_params": quantized}
    return out


def inspect_source(source: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The summary of a model directory. A float source is read from config.json and the
    safetensors headers only, on a meta-device skeleton (no weight is read); an already
    quantized one is loaded, since its quantized modules are what there is to show."""
    path = resolve_source(source)
    info = inspect_files(path)
    model = None
    if not info.quantized_tensors and not info.quantization_config:
        model = _meta_model(path, info, trust_remote_code)
    if model is None:
        model, _, info = load_source(source, trust_remote_code=trust_remote_code, refuse_quantized=False)
    mmap = build_model_map(model)
    data = mmap.summary()
    data["source"] = str(info.path)
    data["fingerprint"] = info.fingerprint
    data["quantized_tensors"] = sorted(set(data["quantized_tensors"]) | set(info.quantized_tensors))
    data["quantization_config"] = info.quantization_config
    dtypes: dict[str, int] = {}
    for p in {id(p): p for p in model.parameters()}.values():
        k = str(p.dtype).replace("torch.", "")
        dtypes[k] = dtypes.get(k, 0) + p.numel()
    data["param_dtypes"] = dtypes
    data["estimated_size"] = size_estimates(model, mmap) if not data["quantized_tensors"] else {}
    return data


def _meta_model(path: Path, info, trust_remote_code: bool):
    """The model as transformers would load it with dtype="auto" (the config's dtype, else the
    checkpoint's), parameters on the meta device; None where no class builds it that way."""
    from transformers import AutoConfig

    if info.config.get("auto_map") and not trust_remote_code:
        return None  # load_source says why, with the fix
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    if not isinstance(dtype, torch.dtype):
        dtype = checkpoint_float_dtype(path)
    try:
        return meta_skeleton(config, dtype, trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the full load then says what is wrong, in its own words
        log.debug("meta skeleton of %s failed (%s); loading the model instead", path, e)
        return None
