"""quantize(): load → inspect → plan → quantize module by module → verify.

No weight changes until the plan is complete and validated (patterns, shapes, F5).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.answers import cache_dir
from anyquant.calib.data import calibration_data
from anyquant.config import MethodConfig, make_config
from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.formats.io import load_source
from anyquant.methods import handler_for
from anyquant.methods.experts import quantize_planned_experts
from anyquant.model.dequant import dequantize_modules, dequantized_weight
from anyquant.model.load import SourceInfo, check_finite, load_tokenizer
from anyquant.model.modelmap import (
    VISION,
    ModelMap,
    as_linear,
    build_model_map,
    quantized_linear_types,
)
from anyquant.model.tree import fused_expert_tensors, probe_logits, set_submodule
from anyquant.numerics.casts import check_consistency
from anyquant.numerics.dtype import dtype_name
from anyquant.planning import Plan
from anyquant.planning.prepare import apply_policy, prepare
from anyquant.progress import progress_bar
from anyquant.runtime.experts import unfuse_for_loader

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
    # what save() verifies a reloaded output against: the probe inputs and the in-memory
    # model's float32 logits on them (formats/verify.py)
    probe_inputs: dict[str, Any] | None = None
    probe_logits: torch.Tensor | None = None
    trust_remote_code: bool = False
    # the output directory, where the quantization wrote it itself (stream.quantize_to_disk)
    output: Path | None = None


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
    tokenizer: Any = None,
    target: str = "auto",
    **options: Any,
) -> QuantizeResult:
    """Quantize a model (an nn.Module, quantized in place, or a model directory / "default").

    options are the method's config fields (group_size=64, double_quant=False, ...). `target`
    (auto | cpu | cuda): the device the output will run on, for its compute dtype
    (planning.prepare.target_capabilities)."""
    t0 = time.perf_counter()
    config = method if isinstance(method, MethodConfig) else make_config(method, **options)
    handler = handler_for(config.method)
    given_tokenizer = tokenizer  # a tokenizer, or the directory of one (--tokenizer DIR): used over the source's
    if isinstance(given_tokenizer, (str, Path)):
        given_tokenizer = load_tokenizer(Path(given_tokenizer), trust_remote_code, required=True)
    tokenizer = None
    if isinstance(model, (str, Path)):
        model, tokenizer, info = load_source(model, trust_remote_code=trust_remote_code, requantize=requantize)
    else:
        info = SourceInfo(path=None, fingerprint=f"in-memory:{type(model).__name__}")
    notes: list[str] = []
    if given_tokenizer is not None:
        tokenizer = given_tokenizer

    unfused = unfuse_for_loader(model, handler.format)
    if unfused:
        notes.append(f"{len(unfused)} experts module(s) (first: {unfused[0]}) replaced by one module per expert with "
                     f"the same weights, as transformers' {handler.format} loader builds them: their experts are "
                     "Linear layers, quantized and saved as such")
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
                   only=only, model_map=mmap, target=target)
    policy, the_plan, inputs = prep.policy, prep.plan, prep.inputs
    compute_dtype = policy.compute_dtype
    notes += prep.notes
    if not the_plan.to_quantize() and not the_plan.experts_to_quantize():
        raise AnyquantError(
            f"{config.method}: the plan quantizes no module (all {len(the_plan.decisions)} kept); "
            "see `anyquant plan` for the reasons"
        )

    # transformers' Conv1D (GPT-2 family) is quantized as the nn.Linear it equals (weight
    # transposed): the layout bitsandbytes / transformers expect for a pre-quantized Conv1D.
    replaced = False
    for d in the_plan.to_quantize():
        mod = model.get_submodule(d.name)
        if not isinstance(mod, nn.Linear):
            set_submodule(model, d.name, as_linear(mod))
            replaced = True
    inputs = {k: v.to(compute_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    # compute dtype; float32 regions and disagreeing modules get casts at their boundaries
    # (a model whose Conv1D became Linear is not the probed model: its logits are computed again)
    float_logits = apply_policy(prep, model, inputs, reuse_probe=not replaced)

    per_layer: dict[str, float] = {}
    bits = 0.0
    qparams = 0
    todo = the_plan.to_quantize()
    calibration = None
    todo_loop = todo
    if handler.calibrated:  # block by block over the whole model
        data, data_notes = calibration_data(model, config, calib, compute_dtype, tokenizer=tokenizer,
                                            model_dir=info.path, vlm=is_vlm(mmap, the_plan),
                                            trust_remote_code=trust_remote_code)
        notes += data_notes
        calibration = quantize_calibrated(handler, model, the_plan, config, compute_dtype, data, info,
                                           checkpoint_dir, progress, notes)
        per_layer = calibration.pop("per_layer_weight_error")
        for d in todo:
            n = model.get_submodule(d.name).out_features * model.get_submodule(d.name).in_features
            bits += handler.bits_per_weight(mmap.modules[d.name], d.options, config) * n
            qparams += n
        todo_loop = []
    with progress_bar(f"quantizing ({config.method})", total=len(todo_loop), enabled=progress) as advance:
        for d in todo_loop:
            b, n = quantize_linear_at(model, d, handler, config, policy, mmap, per_layer)
            bits += b
            qparams += n
            advance()

    # fused MoE experts (3-D tensors, planning/experts.py): after the Linear layers, every method
    experts = quantize_planned_experts(model, the_plan, handler, config, compute_dtype, progress)
    bits += experts["bits"]
    qparams += experts["params"]
    per_layer.update(experts["per_layer_weight_error"])

    q_logits = probe_logits(model, inputs)
    refuse_non_finite(config.method, q_logits)
    policy.consistency = check_consistency(model, inputs)  # every boundary agrees, or names the module
    report = quantized_report(model, config, the_plan, mmap, prep, per_layer, bits, qparams, float_logits, q_logits,
                              notes, time.perf_counter() - t0, calibration, experts)
    model.eval()
    # the logits save() verifies against: the model as it now stands, in eval mode (bitsandbytes'
    # LLM.int8 layers compute their first call differently, before their int8 state is set up)
    final_logits = probe_logits(model, inputs).detach().cpu()
    return QuantizeResult(model, the_plan, config, report, info, tokenizer, mmap, notes,
                          probe_inputs=inputs, probe_logits=final_logits,
                          trust_remote_code=trust_remote_code)


def quantize_linear_at(model: nn.Module, d, handler, config: MethodConfig, policy, mmap: ModelMap,
                       per_layer: dict[str, float]) -> tuple[float, int]:
    """Planned decision `d`'s Linear replaced by the handler's quantized module; its weight error
    into `per_layer`. Returns (bits it stores, weights it had)."""
    linear = model.get_submodule(d.name)
    if not isinstance(linear, nn.Linear):
        raise AnyquantError(f"plan says quantize {d.name}, but it is a {type(linear).__name__}, not nn.Linear")
    q = handler.quantize_linear(linear, d.options, config, policy.dtype_for(d.name))
    deq, _ = dequantized_weight(q)
    per_layer[d.name] = P.relative_error(linear.weight.detach(), deq.to(linear.weight.device))
    n = linear.weight.numel()
    set_submodule(model, d.name, q)
    return handler.bits_per_weight(mmap.modules[d.name], d.options, config) * n, n


def refuse_non_finite(method: str, q_logits: torch.Tensor) -> None:
    if not torch.isfinite(q_logits).all():
        raise AnyquantError(
            f"{method}: the quantized model's outputs on probe inputs are not finite; "
            "nothing was saved (try --dtype float32 or keep the offending modules)"
        )


def quantized_report(model: nn.Module, config: MethodConfig, the_plan: Plan, mmap: ModelMap, prep, per_layer,
                     bits: float, qparams: int, float_logits: torch.Tensor, q_logits: torch.Tensor | None,
                     notes: list[str], seconds: float, calibration: dict[str, Any] | None,
                     experts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of a quantized model (in memory, or the streamed skeleton: only shapes and
    dtypes are read): totals, probe logits error, per-layer error, the dtype policy;
    appends error_warning's warning to `notes`. `experts`: what quantize_planned_experts did."""
    policy = prep.policy
    todo = the_plan.to_quantize()
    fused = fused_expert_tensors(model)  # what is still float
    quantized_types = quantized_linear_types()
    float_params = 0
    float_bits = 0.0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, quantized_types):
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            float_params += p.numel()
            float_bits += p.numel() * p.element_size() * 8
    report = {
        "method": config.method,
        "config": config.to_dict(),
        "compute_dtype": dtype_name(policy.compute_dtype),
        "dtype_policy": policy.to_dict(),
        "modules_quantized": len(todo),
        "modules_kept": len(the_plan.kept()),
        "params_quantized": qparams,
        "params_total": mmap.total_params,
        "bits_per_quantized_weight_estimate": bits / max(1, qparams),
        # honest totals: every parameter not quantized counts at its own dtype's width, fused MoE
        # experts left in float included and listed
        "params_quantized_share": qparams / max(1, mmap.total_params),
        "bits_per_weight_overall": (bits + float_bits) / max(1, qparams + float_params),
        "fused_experts_float": {"tensors": len(fused), "params": sum(fused.values())},
        "fused_experts_quantized": {"tensors": (experts or {}).get("tensors", 0), "params": (experts or {}).get("params", 0)},
        "probe_logits_relative_error": None if q_logits is None else P.relative_error(float_logits, q_logits),
        "per_layer_weight_error": per_layer,
        "quantize_seconds": seconds,
        "notes": notes,
        "probe": prep.facts.to_dict(),
    }
    if calibration is not None:
        report["calibration"] = calibration
    error = report["probe_logits_relative_error"]
    warning = None if error is None else error_warning(config.method, error, per_layer, prep.facts.input_absmax)
    if warning:
        log.warning("%s", warning)
        notes.append(warning)
    return report


# The probe logits error a method usually reaches (the bounds tests/test_pipeline.py holds tiny
# random models to; real models measure lower); a result this many times above is "far above".
USUAL_PROBE_ERROR = {"int8": 0.03, "nf4": 0.25, "fp4": 0.40}
USUAL_PROBE_ERROR_INT4 = 0.30
FAR_ABOVE = 3.0


def error_warning(method: str, error: float, per_layer: dict[str, float], input_absmax: dict[str, float]) -> str | None:
    """A warning naming the modules most likely responsible when the probe logits error is far
    above the method's usual level: ranked by weight error times the input magnitude the probe
    saw (an outlier input multiplies a layer's weight error into the output)."""
    usual = USUAL_PROBE_ERROR.get(method, USUAL_PROBE_ERROR_INT4)
    if not error > FAR_ABOVE * usual:
        return None
    score = {n: e * input_absmax.get(n, 1.0) for n, e in per_layer.items()}
    worst = sorted(score, key=score.get, reverse=True)[:3]
    names = ", ".join(f"{n} (weight error {per_layer[n]:.3g}, input absmax {input_absmax.get(n, float('nan')):.3g})"
                      for n in worst)
    return (f"{method}: probe logits error {error:.3g} is over {FAR_ABOVE:g}x this method's usual {usual:g}; "
            f"most likely from {names or 'no recorded module'}: keep them in float (--keep NAME) or use a "
            "higher-precision method")


def is_vlm(model_map: ModelMap | None, plan: Plan) -> bool:
    """A vision tower found by inspect (ModelMap.component_roots), or planned modules in one."""

    if model_map is not None and model_map.component_roots.get(VISION) is not None:
        return True
    return any(d.component == VISION for d in plan.decisions)


def quantize_calibrated(handler, model, plan, config, compute_dtype, data, info, checkpoint_dir, progress,
                        notes, **kw: Any) -> dict[str, Any]:
    """The handler's block-by-block `quantize_model` on calibration `data`. Checkpoints ("auto")
    live under the cache, keyed by source fingerprint + config + plan + calibration data, and
    are removed once the run completes; an in-memory model has no stable identity to resume
    against, so it gets none. `kw` goes to the handler (stream.py's block_scope)."""
    auto = checkpoint_dir == "auto"
    if auto:
        checkpoint_dir = None if info.path is None else cache_dir() / "calib-checkpoints"
    creport = handler.quantize_model(model, plan, config, compute_dtype, data, progress=progress,
                                     checkpoint_dir=checkpoint_dir,
                                     fingerprint=info.fingerprint if info.path is not None else None, **kw)
    if creport.get("resumed_blocks"):
        notes.append(f"{config.method}: resumed {creport['resumed_blocks']} finished block(s) from "
                     f"{creport['checkpoint_dir']}")
    for fb in creport.get("fallbacks", []):
        notes.append(f"{fb['layer']}: fell back to round-to-nearest: {fb['reason']}")
    notes.extend(creport.get("notes", []))
    if auto and creport.get("checkpoint_dir"):
        shutil.rmtree(creport["checkpoint_dir"], ignore_errors=True)
    return creport
