"""The public API: inspect, plan, quantize, save, load, evaluate, export, doctor.

The command line is a thin layer over these functions; `anyquant/__init__.py` re-exports them.
No submodule of the package carries one of these names, so `anyquant.evaluate` stays the
function however many submodules have been imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.config import MethodConfig, make_config
from anyquant.config import known_methods as _known_methods
from anyquant.diagnosis import diagnose
from anyquant.errors import AnyquantError
from anyquant.eval.metrics import DEFAULT_MAX_TOKENS
from anyquant.eval.metrics import evaluate as _evaluate
from anyquant.formats.gguf import GGUFExport, export_gguf
from anyquant.formats.io import load_quantized, load_source
from anyquant.formats.io import save as _save
from anyquant.inspection import inspect_source
from anyquant.methods import handler_for
from anyquant.model.modelmap import ModelMap, build_model_map
from anyquant.pipeline import QuantizeResult
from anyquant.pipeline import quantize as _quantize
from anyquant.planning.plan import Plan
from anyquant.planning.prepare import prepare
from anyquant.runtime.experts import unfuse_for_loader
from anyquant.stream import quantize_to_disk as _quantize_to_disk

__all__ = ["inspect", "plan", "quantize", "quantize_to_disk", "save", "load", "evaluate", "export", "doctor",
           "known_methods"]


def _as_model(model: nn.Module | str | Path, trust_remote_code: bool) -> nn.Module:
    if isinstance(model, (str, Path)):
        m, _, _ = load_source(model, trust_remote_code=trust_remote_code, requantize=True)
        return m
    return model


def inspect(model: nn.Module | str | Path, *, trust_remote_code: bool = False) -> ModelMap | dict[str, Any]:
    """A model directory: the summary `anyquant inspect --json` prints (components, kinds,
    params, dtypes, tied and quantized tensors, size per method). An nn.Module: its ModelMap."""
    if isinstance(model, (str, Path)):
        return inspect_source(str(model), trust_remote_code)
    return build_model_map(model)


def plan(model: nn.Module | str | Path, method: str | MethodConfig = "nf4", *, dtype: str = "auto",
         plan_file: str | Path | None = None, overrides: list[tuple[str, str]] | None = None,
         trust_remote_code: bool = False, include_vision: bool = False, only: list[str] | None = None,
         target: str = "auto", **options: Any) -> Plan:
    """The Plan `quantize` would follow on this device: one decision per module with its
    reason, and the compute dtype of the same dtype policy. Runs the same probes as quantize;
    an in-memory model's weights and dtypes are left as they were, except that fused experts
    the method's format stores one MLP per expert (Llama 4's) are split so, as quantize splits
    them first: the same weights and the same outputs, so the plan names the modules quantize
    will quantize."""
    m = _as_model(model, trust_remote_code)
    cfg = method if isinstance(method, MethodConfig) else make_config(method, **options)
    unfuse_for_loader(m, handler_for(cfg.method).format)  # as quantize does (pipeline.py)
    return prepare(m, cfg, dtype=dtype, plan=plan_file, overrides=overrides, include_vision=include_vision,
                   only=only, keep_dtypes=True, target=target).plan


def quantize(model: nn.Module | str | Path, method: str | MethodConfig = "nf4", **options: Any) -> QuantizeResult:
    """Quantize a model (an nn.Module, quantized in place, or a model directory / "default").
    Returns a QuantizeResult (.model, .plan, .report); see anyquant.pipeline.quantize for the
    options (dtype, plan, overrides, calib, method config fields such as group_size)."""
    return _quantize(model, method, **options)


def quantize_to_disk(source: str | Path, method: str | MethodConfig = "nf4", out: str | Path | None = None, *,
                     force: bool = False, max_shard_size: int | str = "5GB", max_memory: int | str | None = None,
                     verify: bool = True, command: str | None = None, **options: Any) -> QuantizeResult:
    """Quantize the model directory `source` into `out` with one block in memory at a time: each
    block read from the safetensors files when its turn comes, quantized, written to the output's
    shards (at most `max_shard_size` each, with model.safetensors.index.json) and freed; the
    output appears atomically when complete and equals what quantize() + save() write. For models
    larger than memory (docs/streaming.md). Returns the QuantizeResult (`.output`: the directory;
    `.model`: the skeleton on the meta device). Options as quantize(); `max_memory` and `verify`:
    see anyquant.stream.quantize_to_disk."""
    extra: dict[str, Any] = {}
    if command is not None:
        extra["command"] = command
    result = _quantize_to_disk(source, method, out, force=force, max_shard_size=max_shard_size,
                               max_memory=max_memory, verify=verify, extra_metrics=extra or None, **options)
    return result


def save(result: QuantizeResult, out_dir: str | Path, *, force: bool = False, verify: bool = True,
         command: str | None = None) -> Path:
    """Write a quantized model directory atomically (all files, or nothing). `verify` (default):
    the output is reloaded (anyquant.load, and transformers for the stock formats) and must give
    the in-memory model's probe logits before it is put in place; a mismatch raises
    AnyquantError and nothing is left behind. Its anyquant.json also keeps the per-layer weight
    errors and `command` (how it was made), for `anyquant report`."""
    extra: dict[str, Any] = {"per_layer_weight_error": result.report.get("per_layer_weight_error") or {}}
    if command is not None:
        extra["command"] = command
    return _save(result, out_dir, force=force, verify=verify, extra_metrics=extra)


def load(directory: str | Path, *, device: str | None = None, device_map: str | dict | None = None,
         fuse: bool = True, trust_remote_code: bool = False, verify: bool = True) -> nn.Module:
    """A saved anyquant output as a model callable like the source model, ready for inference.

    device: where the model goes (default: the first GPU where there is one, else the CPU);
    device_map: "auto" (transformers' sense: the GPUs present, then the CPU) or
    {module prefix: device}, instead of `device`. int4 outputs are built on the meta device and
    read straight to their devices (the float weights never exist); bitsandbytes outputs go
    through transformers with the same device_map. fuse: q/k/v and gate/up as one matrix each
    where the architecture allows (int4; the inference layout, docs/runtime.md); fuse=False
    keeps the saved module layout (e.g. to inspect or re-save the model). Every file is first
    checked against the sha256 its anyquant.json recorded (verify=False skips that)."""
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_quantized(directory, trust_remote_code=trust_remote_code, verify=verify, device=device,
                          device_map=device_map, fuse=fuse)


def evaluate(model: nn.Module, baseline: nn.Module | None = None, text: str | None = None, *, tokenizer=None,
             max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Perplexity, KL divergence and top-1 agreement against `baseline` on held-out text."""
    return _evaluate(model, baseline, text, tokenizer=tokenizer, max_tokens=max_tokens, progress=progress)


def doctor(source: str | Path, bnb_config: dict[str, Any] | None = None, *,
           trust_remote_code: bool = False) -> dict[str, Any]:
    """Which failure class a transformers + bitsandbytes config hits on this device, and a fixed config."""
    return diagnose(source, bnb_config, trust_remote_code=trust_remote_code)


def export(directory: str | Path, *, to: str = "gguf", out: str | Path | None = None, gguf_type: str | None = None,
           force: bool = False, verify: bool = True, progress: bool = True) -> GGUFExport:
    """A saved anyquant output in another runtime's format: `to="gguf"`, one file for llama.cpp
    (default DIR.gguf beside DIR; llama architecture). Quantized Linears keep their codes where the
    GGUF type holds them (int4-family: Q4_1, or Q4_0 symmetric; int8: Q8_0); nf4 / fp4 are
    re-quantized to Q5_1; `gguf_type` asks for another type. Returns what was written, each
    tensor's type and each quantized weight's difference from anyquant's (docs/formats.md#gguf)."""
    if to != "gguf":
        raise AnyquantError(f"export: to={to!r}: expected 'gguf'")
    return export_gguf(directory, lambda d: load_quantized(d, verify=verify, device="cpu", fuse=False), out,
                       qtype=gguf_type, force=force, progress=progress)


def known_methods() -> list[str]:
    """Every method name `quantize` accepts."""
    return _known_methods()
