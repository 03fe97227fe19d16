"""The one path from a loaded model to a Plan: probe inputs -> dtype policy -> probe forward
(weights read outside forward) -> rules and overrides. `anyquant plan`, the Python API's
`plan()`, `quantize()` and `doctor` all go through `prepare`, so what `plan` shows (dtype,
decisions) is what `quantize` does on the same device."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.config import MethodConfig
from anyquant.errors import AnyquantError
from anyquant.methods import handler_for
from anyquant.model.modelmap import LINEAR, ModelMap, build_model_map
from anyquant.model.tree import device_of, not_reloadable, probe_logits
from anyquant.numerics.capabilities import DeviceCapabilities, detect_capabilities
from anyquant.numerics.casts import recording_dtype_mismatches, unique_mismatches
from anyquant.numerics.declared import declared_dtype
from anyquant.numerics.dtype import dtype_name
from anyquant.numerics.inputs import probe_inputs_and_notes
from anyquant.numerics.policy import DtypePolicy, buffers_keeping_dtype, choose_policy
from anyquant.numerics.probe import ProbeFacts, probe_weight_reads, run_probe
from anyquant.planning import build_plan
from anyquant.planning.experts import expert_decisions, experts_note
from anyquant.planning.plan import Plan, load_overrides

log = logging.getLogger(__name__)

TARGETS = ("auto", "cpu", "cuda")


def target_capabilities(target: str, model: nn.Module, here: DeviceCapabilities
                        ) -> tuple[DeviceCapabilities, str | None]:
    """The device the output will run on, for the dtype policy: the compute dtype recorded in
    the output (and everything kept in float) is for that device, not for the machine that
    quantized. `cpu`: float32 (a CPU computes 16-bit floats without native speed). `cuda`: the
    GPU quantizing, or, on a CPU, a bfloat16-capable GPU (Ampere or newer). `auto`: the device
    quantizing; on a CPU, a source that declares bfloat16 or float16 keeps its dtype (it is
    served on a GPU), a float32 source stays float32. Returns (capabilities, why; None when
    nothing changed)."""
    if target not in TARGETS:
        raise AnyquantError(f"--target {target}: expected one of {', '.join(TARGETS)} (the device the output will "
                            "run on: its compute dtype and the dtype of everything not quantized follow it)")
    if here.simulated or target == "cpu" and here.device_type == "cpu":
        return here, None
    if target == "cpu":
        caps = DeviceCapabilities("cpu", "cpu (target)", bf16=True, fp16=True, bnb=here.bnb, prefer_float32=True,
                                  simulated=True)
        return caps, "--target cpu: computing in float32 (a CPU has no native 16-bit speed)"
    if here.device_type == "cuda":
        return here, None
    gpu = dataclasses.replace(here, device_type="cuda", name="a bfloat16-capable GPU (target)", bf16=True,
                              fp16=True, prefer_float32=False, simulated=True)
    decl = declared_dtype(model)
    if target == "cuda":
        return gpu, ("--target cuda: the compute dtype is chosen for a bfloat16-capable GPU, not for this CPU "
                     "(--target cpu: float32)")
    if decl in (torch.bfloat16, torch.float16):
        name = dtype_name(decl)
        return gpu, (f"quantizing on a CPU: the source's {name} is kept (compute dtype and everything not "
                     f"quantized) for the GPU it will run on; --target cpu computes in float32 instead")
    return here, None


@functools.lru_cache(maxsize=None)
def saved_state_keys(config: MethodConfig) -> tuple[str, ...]:
    """The state-dict keys (relative to the module) of one Linear quantized by `config`'s method
    when its format is loaded by transformers' bitsandbytes loader; () for anyquant's int4
    format, whose loader maps names itself. Read from a quantized 64 x 64 Linear, not listed."""
    handler = handler_for(config.method)
    if handler.format != "bitsandbytes":
        return ()
    with torch.no_grad():
        q = handler.quantize_linear(nn.Linear(64, 64, bias=True), {}, config, torch.float32)
    return tuple(sorted(q.state_dict().keys()))


def _not_reloadable(model: nn.Module, mmap: ModelMap, config: MethodConfig) -> dict[str, str]:
    """The Linear layers whose quantized tensors in the method's saved format transformers would
    not load back into them (model/tree.py not_reloadable). Only the bitsandbytes format is
    loaded by transformers' own loader; anyquant's int4 loader maps names itself."""
    suffixes = saved_state_keys(config)
    if not suffixes:
        return {}
    return not_reloadable(model, [n for n, m in mmap.modules.items() if m.kind == LINEAR], list(suffixes))


def _probe_and_dtype_check(model: nn.Module, inputs: dict[str, Any]) -> ProbeFacts | None:
    """The weight-read probe and the dtype policy's boundary check in one forward: its facts when
    the forward ran and no module saw mixed dtypes, else None (the policy then checks and fixes
    its boundaries and the probe runs after it, each with its own forward and its own errors).
    A streamed model reads its whole checkpoint once per forward."""
    try:
        with recording_dtype_mismatches(model) as (mismatches, _):
            facts = probe_weight_reads(model, inputs)
    except Exception as e:  # noqa: BLE001 — user/remote code: the separate forwards report it
        log.debug("probe and dtype check in one forward failed (%s: %s); separate forwards follow",
                  type(e).__name__, str(e)[:200])
        return None
    return None if unique_mismatches(mismatches, warn=False) else facts   # the policy's check warns


@dataclass
class Prepared:
    model_map: ModelMap
    policy: DtypePolicy
    facts: ProbeFacts
    inputs: dict[str, Any]  # the probe inputs that ran (text-only where the image forward failed)
    plan: Plan
    notes: list[str] = field(default_factory=list)


def prepare(
    model: nn.Module,
    config: MethodConfig,
    *,
    dtype: str = "auto",
    plan: str | Path | Plan | None = None,
    overrides: list[tuple[str, str]] | None = None,
    include_vision: bool = False,
    only: list[str] | None = None,
    capabilities: DeviceCapabilities | None = None,
    model_map: ModelMap | None = None,
    keep_dtypes: bool = False,
    target: str = "auto",
) -> Prepared:
    """Decide everything before any weight changes. `plan` is a Plan to follow as it is, or an
    overrides file; `overrides` come after the file's (later wins).

    The float16 probe casts the model to float32; `keep_dtypes=True` restores every parameter's
    dtype afterwards (planning an in-memory model must not change it)."""
    mmap = model_map or build_model_map(model)
    target_note = None
    if capabilities is None:
        capabilities, target_note = target_capabilities(target, model, detect_capabilities(device_of(model)))
    caps = capabilities
    saved = {n: p.dtype for n, p in model.named_parameters()} if keep_dtypes else None
    inputs, input_notes = probe_inputs_and_notes(model)
    early = _probe_and_dtype_check(model, inputs)
    dtypes_before = [p.dtype for p in model.parameters()]
    policy = choose_policy(model, dtype, caps, inputs, boundaries_checked=early is not None)
    # the early forward's facts hold where the policy's own probes left the model as it was
    # (a float16 range probe casts it to float32 first, and the weight-read probe runs after it)
    same = early is not None and [p.dtype for p in model.parameters()] == dtypes_before
    facts, inputs, notes = run_probe(model, inputs, "; ".join(input_notes), facts=early if same else None)
    if saved is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dtype != saved[n]:
                    p.data = p.data.to(saved[n])
    if isinstance(plan, Plan):
        the_plan = plan
    else:
        ov = (load_overrides(plan) if plan is not None else []) + list(overrides or [])
        the_plan = build_plan(mmap, config, dtype_name(policy.compute_dtype), ov, facts,
                              include_vision=include_vision, only=only,
                              float32_regions=list(policy.fp32_modules),
                              experts=expert_decisions(model, mmap, config, dtype_name(policy.compute_dtype),
                                                       facts),
                              not_reloadable=_not_reloadable(model, mmap, config))
    if target_note is not None:
        notes = [f"{target_note}: compute dtype {dtype_name(policy.compute_dtype)} ({policy.reason})"] + notes
    the_plan.notes = notes + the_plan.notes
    note = experts_note(the_plan, handler_for(config.method).calibrated)
    if note and note not in the_plan.notes:
        the_plan.notes.append(note)
    if policy.fp32_modules and policy.compute_dtype != torch.float32:
        the_plan.notes.append(
            f"float32 regions ({', '.join(policy.fp32_modules)}) inside a {dtype_name(policy.compute_dtype)} model: "
            "anyquant.load restores them exactly; stock transformers' from_pretrained cannot (its "
            "_keep_in_fp32_modules is a class attribute, not a config field, and adds no casts at the region's "
            "boundary), so it would compute them in the 16-bit dtype: load the output with anyquant.load")
    return Prepared(mmap, policy, facts, inputs, the_plan, list(notes))


def _policy_changes_nothing(policy: DtypePolicy, model: nn.Module) -> bool:
    """Whether `policy.apply` would leave `model` as it is: every floating parameter and buffer
    already in the compute dtype, no float32 region to wrap, no stored float32 value to restore."""
    if policy.precise_params or (policy.fp32_modules and policy.compute_dtype != torch.float32):
        return False
    kept = {id(b) for _, _, b in buffers_keeping_dtype(model)}
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None and id(b) not in kept]
    return all(t.dtype == policy.compute_dtype for t in tensors if t.is_floating_point())


def apply_policy(prep: Prepared, model: nn.Module, inputs: dict[str, Any], reuse_probe: bool = True
                 ) -> torch.Tensor:
    """`prep.policy.apply(model, inputs)`, then the float model's probe logits.

    Where the policy changes nothing (the source is already in the compute dtype) and `inputs`
    are the probe's, `model` is the model on which the policy's boundary check and the probe's
    forward already ran: the check is not repeated and the probe's logits are returned. A
    streamed model reads its whole checkpoint once per forward, so these two forwards cost two
    full reads. Otherwise the policy casts, checks its boundaries and one forward gives the
    logits. `reuse_probe=False`: the caller changed the model since the probe."""
    policy = prep.policy
    same_inputs = inputs.keys() == prep.inputs.keys() and all(inputs[k] is prep.inputs[k] for k in inputs)
    if (reuse_probe and prep.facts.logits is not None and same_inputs and not model.training
            and _policy_changes_nothing(policy, model)):
        policy.apply(model)   # the boundary check ran on this model in choose_policy (prep.policy.boundary_casts)
        return prep.facts.logits
    policy.apply(model, inputs)
    return probe_logits(model, inputs)
