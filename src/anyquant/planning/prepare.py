"""The one path from a loaded model to a Plan: probe inputs -> dtype policy -> probe forward
(weights read outside forward) -> rules and overrides. `anyquant plan`, the Python API's
`plan()`, `quantize()` and `doctor` all go through `prepare`, so what `plan` shows (dtype,
decisions) is what `quantize` does on the same device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.config import MethodConfig
from anyquant.model.modelmap import ModelMap, build_model_map
from anyquant.model.tree import device_of, fused_expert_tensors
from anyquant.numerics.capabilities import DeviceCapabilities, detect_capabilities
from anyquant.numerics.dtype import dtype_name
from anyquant.numerics.inputs import probe_inputs
from anyquant.numerics.policy import DtypePolicy, choose_policy
from anyquant.numerics.probe import ProbeFacts, run_probe
from anyquant.planning import build_plan
from anyquant.planning.plan import Plan, load_overrides


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
) -> Prepared:
    """Decide everything before any weight changes. `plan` is a Plan to follow as it is, or an
    overrides file; `overrides` come after the file's (later wins).

    The float16 probe casts the model to float32; `keep_dtypes=True` restores every parameter's
    dtype afterwards (planning an in-memory model must not change it)."""
    mmap = model_map or build_model_map(model)
    caps = capabilities or detect_capabilities(device_of(model))
    saved = {n: p.dtype for n, p in model.named_parameters()} if keep_dtypes else None
    inputs = probe_inputs(model)
    policy = choose_policy(model, dtype, caps, inputs)
    facts, inputs, notes = run_probe(model, inputs)
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
                              float32_regions=list(policy.fp32_modules))
    the_plan.notes = notes + the_plan.notes
    fused = fused_expert_tensors(model)
    if fused:
        n = sum(fused.values())
        total = sum(p.numel() for p in model.parameters()) or 1
        the_plan.notes.append(
            f"{len(fused)} fused MoE expert tensor(s) ({n:,} parameters, {n / total:.0%} of the model; first: "
            f"{next(iter(fused))}) stay in float ({dtype_name(policy.compute_dtype)}): transformers keeps these "
            "experts as 3-D parameters, not nn.Linear layers, and anyquant's methods quantize Linear layers only "
            "(fused-expert quantization is not implemented yet); the report counts them as float")
    if policy.fp32_modules and policy.compute_dtype != torch.float32:
        the_plan.notes.append(
            f"float32 regions ({', '.join(policy.fp32_modules)}) inside a {dtype_name(policy.compute_dtype)} model: "
            "anyquant.load restores them exactly; stock transformers' from_pretrained cannot (its "
            "_keep_in_fp32_modules is a class attribute, not a config field, and adds no casts at the region's "
            "boundary), so it would compute them in the 16-bit dtype: load the output with anyquant.load")
    return Prepared(mmap, policy, facts, inputs, the_plan, list(notes))
