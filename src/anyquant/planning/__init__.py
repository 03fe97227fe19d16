"""Planning: decide for every module whether and how to quantize it, with a reason."""

from __future__ import annotations

from anyquant.config import MethodConfig, resolve_method
from anyquant.errors import AnyquantError
from anyquant.methods import handler_for
from anyquant.model.modelmap import LINEAR, ModelMap
from anyquant.patterns import matches
from anyquant.planning.plan import (
    FUSED_EXPERTS,
    KEEP,
    QUANTIZE,
    Decision,
    Plan,
    check_patterns,
)
from anyquant.planning.rules import RULES, PlanContext

__all__ = ["build_plan", "Plan", "Decision", "QUANTIZE", "KEEP", "PlanContext"]

# Rules whose "keep" protects correctness: an override may not force these modules to quantize.
SAFETY_CODES = {"already_quantized", "not_linear", "weight_read_outside_forward", "keep_in_fp32_modules",
                "not_probed", "experts_layout", "not_reloadable"}


def build_plan(
    model_map: ModelMap,
    config: MethodConfig,
    compute_dtype: str,
    overrides: list[tuple[str, str]] | None = None,
    facts=None,
    *,
    include_vision: bool = False,
    only: list[str] | None = None,
    float32_regions: list[str] | None = None,
    experts: list[Decision] | None = None,
    not_reloadable: dict[str, str] | None = None,
) -> Plan:
    """Rules (first that decides wins) -> --only -> overrides (plan file, then --keep; later
    wins). Safety rules (SAFETY_CODES) are never overridden towards quantizing.

    `facts` is the probe's ProbeFacts (anyquant.numerics.probe); without it, weights read
    outside their module's forward cannot be detected and the plan says so in its notes.
    `experts`: the decisions for fused MoE expert tensors (planning/experts.py), which --only
    and the overrides then treat like the Linear layers'."""
    ctx = PlanContext(facts=facts, include_vision=include_vision, only=list(only or []),
                      float32_regions=list(float32_regions or []),
                      not_reloadable=dict(not_reloadable or {}))
    absmax = getattr(facts, "input_absmax", None) or {}
    lin = sorted(absmax[n] for n, m in model_map.modules.items() if m.kind == LINEAR and n in absmax)
    if lin:
        mid = len(lin) // 2
        ctx.linear_input_median = lin[mid] if len(lin) % 2 else (lin[mid - 1] + lin[mid]) / 2
    decisions: list[Decision] = []
    for m in model_map.modules.values():
        for rule in RULES:
            d = rule(m, model_map, config, compute_dtype, ctx)
            if d is not None:
                if m.in_features is not None and m.out_features is not None:
                    d.shape = [m.out_features, m.in_features]
                decisions.append(d)
                break
    plan = Plan(config.method, config.to_dict(), compute_dtype, decisions + list(experts or []))
    if facts is None:
        plan.notes.append("no probe forward ran: weights read outside their module's forward were not checked")
    if ctx.only:
        apply_only(plan, ctx.only)
    if overrides:
        apply_overrides(plan, model_map, config, overrides)

    finalize = getattr(handler_for(config.method), "finalize", None)
    if finalize is not None:
        finalize(plan, model_map, config)
    return plan


def apply_only(plan: Plan, patterns: list[str]) -> None:
    """--only: quantize only Linear layers matching a pattern; keep the others. Restricts what
    the rules chose; never forces a module the rules kept (use a plan file for that)."""
    check_patterns([(p, "only") for p in patterns], [d.name for d in plan.decisions])
    for d in plan.to_quantize() + plan.experts_to_quantize():
        if not any(matches(p, d.name) for p in patterns):
            d.action, d.method, d.options = KEEP, None, {}
            d.reason_code, d.reason = "not_selected", "not selected by --only"


def apply_overrides(plan: Plan, model_map: ModelMap, config: MethodConfig, overrides) -> None:

    names = [d.name for d in plan.decisions]
    check_patterns(overrides, names)
    by_name = {d.name: d for d in plan.decisions}
    for pattern, given in overrides:
        action, group_size = override_action(pattern, given, config)
        for name in names:
            if not matches(pattern, name):
                continue
            d = by_name[name]
            if action == KEEP:
                d.action, d.method, d.options = KEEP, None, {}
                d.reason_code, d.reason = "user_keep", f"kept by override {pattern!r}"
                continue
            if d.kind == FUSED_EXPERTS:
                if d.reason_code in SAFETY_CODES:
                    if not pattern.startswith("re:"):
                        raise AnyquantError(f"plan override {pattern!r} asks to quantize {name}, which must stay "
                                            f"in float: {d.reason}")
                    continue
                ok, options, code, reason = handler_for(config.method).fit_experts(d.shape, config)
                if not ok:
                    raise AnyquantError(f"plan override {pattern!r} asks to quantize {name}, but {reason}")
                d.action, d.method, d.options = QUANTIZE, config.method, options
                d.reason_code, d.reason = "user_quantize", f"quantized by override {pattern!r}"
                if group_size is not None:
                    raise AnyquantError(f"plan override {pattern!r}: per-tensor group sizes are not available for "
                                        f"fused experts ({name}); they take the checkpoint's group size")
                continue
            if d.reason_code in SAFETY_CODES or d.kind != LINEAR:
                if not pattern.startswith("re:") and d.kind == LINEAR:
                    raise AnyquantError(f"plan override {pattern!r} asks to quantize {name}, which must stay "
                                        f"in float: {d.reason}")
                if not pattern.startswith("re:"):  # an exact name: the user meant this module
                    raise AnyquantError(
                        f"plan override {pattern!r} asks to quantize {name}, a {d.kind} module: anyquant quantizes "
                        "Linear layers only (embeddings and norms stay in float); remove the override or set it "
                        "to 'keep'")
                # Quantize-overrides are broad patterns; skipping norms/embeddings they match is expected.
                continue
            ok, options, code, reason = handler_for(config.method).fit(model_map.modules[name], config)
            if not ok:
                raise AnyquantError(f"plan override {pattern!r} asks to quantize {name}, but {reason}")
            d.action, d.method, d.options = QUANTIZE, config.method, options
            d.reason_code, d.reason = "user_quantize", f"quantized by override {pattern!r}"
            if group_size is not None:
                in_f = model_map.modules[name].in_features or 0
                if in_f % group_size:
                    raise AnyquantError(f"plan override {pattern!r}: group_size {group_size} does not divide "
                                        f"{name}'s in_features={in_f}; use a divisor of {in_f} (e.g. 32 or 64)")
                d.options = {**options, "group_size": group_size}
                d.reason_code = "user_group_size"
                d.reason = f"{config.method}, group size {group_size} by override {pattern!r}"


def override_action(pattern: str, given, config: MethodConfig) -> tuple[str, int | None]:
    """(KEEP or QUANTIZE, a group size or None) for one override: "keep", "quantize", the run's
    method (or a scheme alias of it), or {"method": ..., "group_size": ...}. One output holds one
    format and one method: another method is refused, saying which format each writes."""
    if isinstance(given, dict):
        method, group_size = given.get("method", config.method), given.get("group_size")
    elif given in (KEEP, QUANTIZE):
        return given, None
    else:
        method, group_size = given, None
    resolved, _ = resolve_method(method)
    if resolved != config.method:
        try:
            other = handler_for(resolved)
        except AnyquantError:
            raise AnyquantError(f"plan override {pattern!r} -> {method!r}: not a method; expected 'keep', "
                                f"'quantize', {config.method!r} or {{\"method\": {config.method!r}, "
                                "\"group_size\": <int>}") from None
        mine = handler_for(config.method).format
        if other.format != mine:
            raise AnyquantError(
                f"plan override {pattern!r} -> {method!r}: {resolved} writes {other.format}, this run's method "
                f"{config.method} writes {mine}; one output holds one format (stock loaders read one "
                f"quantization_config): drop the override, or quantize with {resolved} in a separate run")
        raise AnyquantError(
            f"plan override {pattern!r} -> {method!r}: {resolved} and this run's {config.method} both write "
            f"{mine}, but one run quantizes with one method; per-module overrides may set the group size "
            f"({{\"method\": {config.method!r}, \"group_size\": 64}}) or keep a module; run {resolved} separately")
    if group_size is not None and not hasattr(config, "group_size"):
        raise AnyquantError(f"plan override {pattern!r}: group_size applies to int4-family methods "
                            f"(int4, hqq, awq, gptq), not {config.method}")
    return QUANTIZE, group_size
