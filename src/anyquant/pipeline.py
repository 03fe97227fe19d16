"""quantize(): load → inspect → plan → quantize module by module → verify.

No weight changes until the plan is complete and validated (patterns, shapes, F5).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.config import MethodConfig, make_config
from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.formats.io import load_source
from anyquant.methods.registry import handler_for
from anyquant.model.dequant import dequantize_linear, dequantize_modules
from anyquant.model.load import SourceInfo, check_finite
from anyquant.model.modelmap import ModelMap, as_linear, build_model_map
from anyquant.model.tree import probe_logits, set_submodule
from anyquant.numerics.dtype import dtype_name
from anyquant.numerics.casts import check_consistency
from anyquant.planning import Plan
from anyquant.planning.prepare import prepare
from anyquant.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    model: nn.Module
    plan: Plan
    config: MethodConfig
    report: dict[str, Any]
    source: SourceInfo
    tokenizer: Any = None
    model_map: ModelMap | None = None
    notes: list[str] = field(default_factory=list)


def quantize(
    model: nn.Module | str | Path,
    method: str | MethodConfig = "nf4",
    *,
    dtype: str = "auto",
    plan: str | Path | Plan | None = None,
    overrides: list[tuple[str, str]] | None = None,
    trust_remote_code: bool = False,
    requantize: bool = False,
    progress: bool = True,
    calib: str | Path | torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = "auto",
    include_vision: bool = False,
    only: list[str] | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize a model (an nn.Module, quantized in place, or a model directory / "default").

    options are the method's config fields (group_size=64, double_quant=False, ...)."""
    t0 = time.perf_counter()
    config = method if isinstance(method, MethodConfig) else make_config(method, **options)
    handler = handler_for(config.method)
    tokenizer = None
    if isinstance(model, (str, Path)):
        model, tokenizer, info = load_source(model, trust_remote_code=trust_remote_code, requantize=requantize)
    else:
        info = SourceInfo(path=None, fingerprint=f"in-memory:{type(model).__name__}")
    notes: list[str] = []

    mmap = build_model_map(model)
    if mmap.quantized_tensors:
        if not requantize:
            raise AlreadyQuantizedError(
                f"model already holds quantized tensors (first: {mmap.quantized_tensors[0]}); "
                "pass requantize=True / --requantize to dequantize first"
            )
        dequantize_modules(model)
        notes.append(f"source was already quantized ({len(mmap.quantized_tensors)} tensors); dequantized first")
        mmap = build_model_map(model)
    elif info.quantization_config and requantize:
        notes.append(f"source was already quantized ({info.quantization_config.get('quant_method')}); dequantized first")
    check_finite(model)

    # dtype policy (device capabilities + float32 probe of activation ranges), probe forward,
    # plan: all before any weight changes, by the same function `anyquant plan` uses
    prep = prepare(model, config, dtype=dtype, plan=plan, overrides=overrides, include_vision=include_vision,
                   only=only, model_map=mmap)
    policy, the_plan, inputs = prep.policy, prep.plan, prep.inputs
    compute_dtype = policy.compute_dtype
    notes += prep.notes
    if not the_plan.to_quantize():
        raise AnyquantError(
            f"{config.method}: the plan quantizes no module (all {len(the_plan.decisions)} kept); "
            "see `anyquant plan` for the reasons"
        )

    # transformers' Conv1D (GPT-2 family) is quantized as the nn.Linear it equals (weight
    # transposed): the layout bitsandbytes / transformers expect for a pre-quantized Conv1D.
    for d in the_plan.to_quantize():
        mod = model.get_submodule(d.name)
        if not isinstance(mod, nn.Linear):
            set_submodule(model, d.name, as_linear(mod))
    inputs = {k: v.to(compute_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    policy.apply(model, inputs)  # compute dtype; float32 regions and disagreeing modules get casts at their boundaries
    float_logits = probe_logits(model, inputs)

    per_layer: dict[str, float] = {}
    bits = 0.0
    qparams = 0
    todo = the_plan.to_quantize()
    calibration = None
    todo_loop = todo
    if handler.calibrated:  # block by block over the whole model
        calibration = _quantize_calibrated(handler, model, the_plan, config, compute_dtype, calib, tokenizer,
                                           info, checkpoint_dir, progress, notes, model_map=mmap,
                                           trust_remote_code=trust_remote_code)
        per_layer = calibration.pop("per_layer_weight_error")
        for d in todo:
            n = model.get_submodule(d.name).out_features * model.get_submodule(d.name).in_features
            bits += handler.bits_per_weight(mmap.modules[d.name], d.options, config) * n
            qparams += n
        todo_loop = []
    with progress_bar(f"quantizing ({config.method})", total=len(todo_loop), enabled=progress) as advance:
        for d in todo_loop:
            linear = model.get_submodule(d.name)
            if not isinstance(linear, nn.Linear):
                raise AnyquantError(f"plan says quantize {d.name}, but it is a {type(linear).__name__}, not nn.Linear")
            q = handler.quantize_linear(linear, d.options, config, policy.dtype_for(d.name))
            deq = dequantize_linear(q)
            per_layer[d.name] = P.relative_error(linear.weight.detach(), deq.weight.to(linear.weight.device))
            n = linear.weight.numel()
            bits += handler.bits_per_weight(mmap.modules[d.name], d.options, config) * n
            qparams += n
            set_submodule(model, d.name, q)
            advance()

    q_logits = probe_logits(model, inputs)
    if not torch.isfinite(q_logits).all():
        raise AnyquantError(
            f"{config.method}: the quantized model's outputs on probe inputs are not finite; "
            "nothing was saved (try --dtype float32 or keep the offending modules)"
        )
    policy.consistency = check_consistency(model, inputs)  # every boundary agrees, or names the module
    report = {
        "method": config.method,
        "config": config.to_dict(),
        "compute_dtype": dtype_name(compute_dtype),
        "dtype_policy": policy.to_dict(),
        "modules_quantized": len(todo),
        "modules_kept": len(the_plan.kept()),
        "params_quantized": qparams,
        "params_total": mmap.total_params,
        "bits_per_quantized_weight_estimate": bits / max(1, qparams),
        "probe_logits_relative_error": P.relative_error(float_logits, q_logits),
        "per_layer_weight_error": per_layer,
        "quantize_seconds": time.perf_counter() - t0,
        "notes": notes,
        "probe": prep.facts.to_dict(),
    }
    if calibration is not None:
        report["calibration"] = calibration
    model.eval()
    return QuantizeResult(model, the_plan, config, report, info, tokenizer, mmap, notes)


def _is_vlm(model_map: ModelMap | None, plan: Plan) -> bool:
    """A vision tower found by inspect (ModelMap.component_roots), or planned modules in one."""
    from anyquant.model.modelmap import VISION

    if model_map is not None and model_map.component_roots.get(VISION) is not None:
        return True
    return any(d.component == VISION for d in plan.decisions)


def _quantize_calibrated(handler, model, plan, config, compute_dtype, calib, tokenizer, info, checkpoint_dir,
                         progress, notes, *, model_map: ModelMap | None = None,
                         trust_remote_code: bool = False) -> dict[str, Any]:
    """Calibration batches, then the handler's block-by-block `quantize_model`.

    Text models: token ids from --calib text (default the news corpus). Vision-language models
    (a vision tower in the ModelMap) without --calib: image+text samples (calib.images:
    scikit-image photos + news text, through the directory's processor or built from the
    config), so the language model's blocks calibrate on image-token positions too; with
    --calib FILE (or a token tensor) a VLM calibrates text-only, noted. A list of forward-input
    dicts passed as `calib` is used as it is. Checkpoints ("auto") live under the cache, keyed
    by source fingerprint + config + plan + calibration data, and are removed once the run
    completes."""
    import shutil

    from anyquant.calib.runner import calibration_ids

    vlm = _is_vlm(model_map, plan)
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if vlm:
            notes.append(f"{config.method}: vision-language model calibrated text-only on the {ids.shape[0]} "
                         "token sequences given (the language model saw no image tokens)")
    elif isinstance(calib, (list, tuple)):
        ids = [_cast_floats(dict(b), compute_dtype) for b in calib]
        n_img = sum(1 for b in ids if "pixel_values" in b)
        if n_img:
            notes.append(f"{config.method}: calibrated on {len(ids)} given input batches ({n_img} with images)")
    elif vlm and calib is None:
        from anyquant.calib.images import vlm_calibration

        vc = vlm_calibration(model, model_dir=info.path, tokenizer=tokenizer, n_samples=config.n_samples,
                             seq_len=config.seq_len, trust_remote_code=trust_remote_code)
        ids = [_cast_floats(b, compute_dtype) for b in vc.batches]
        notes.append(f"{config.method}: {vc.describe()}")
        notes.extend(f"{config.method}: {n}" for n in vc.notes)
    else:
        if tokenizer is None:
            raise AnyquantError(
                f"{config.method} needs calibration tokens: pass calib=<LongTensor [n, seq]> for an in-memory "
                "model, or quantize a model directory (its tokenizer is used)"
            )
        if calib is None:
            from anyquant.calib.text import calibration_text

            text = calibration_text()
        else:
            p = Path(calib).expanduser()
            if not p.is_file():
                raise AnyquantError(f"--calib {calib}: no such file (a UTF-8 text file is expected)")
            text = p.read_text(encoding="utf-8", errors="replace")
        ids = calibration_ids(tokenizer, text, config.n_samples, config.seq_len)
        if vlm:
            notes.append(f"{config.method}: vision-language model calibrated text-only on --calib {calib} "
                         f"({ids.shape[0]} sequences; the language model saw no image tokens)")
    auto = checkpoint_dir == "auto"
    if auto:
        if info.path is None:
            checkpoint_dir = None  # in-memory model: no stable identity to resume against
        else:
            from anyquant.model.default import cache_dir

            checkpoint_dir = cache_dir() / "calib-checkpoints"
    creport = handler.quantize_model(model, plan, config, compute_dtype, ids, progress=progress,
                                     checkpoint_dir=checkpoint_dir,
                                     fingerprint=info.fingerprint if info.path is not None else None)
    if creport.get("resumed_blocks"):
        notes.append(f"{config.method}: resumed {creport['resumed_blocks']} finished block(s) from "
                     f"{creport['checkpoint_dir']}")
    for fb in creport.get("fallbacks", []):
        notes.append(f"{fb['layer']}: fell back to round-to-nearest: {fb['reason']}")
    notes.extend(creport.get("notes", []))
    if auto and creport.get("checkpoint_dir"):
        shutil.rmtree(creport["checkpoint_dir"], ignore_errors=True)
    return creport


def _cast_floats(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating inputs (pixel_values) in the compute dtype, as the probe inputs are."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
