"""Plan decisions for fused MoE expert tensors: the 3-D parameters ([experts, out, in]) that
transformers keeps instead of one nn.Linear per expert (Mixtral's and Qwen3-MoE's
`mlp.experts.gate_up_proj` / `down_proj`, Jamba's, ...). One decision per tensor, made before
any weight changes, with the method and the reason, overridable with --keep like a Linear's."""

from __future__ import annotations

from torch import nn

from anyquant.config import MethodConfig
from anyquant.methods import handler_for
from anyquant.model.modelmap import ModelMap
from anyquant.model.tree import fused_expert_tensors
from anyquant.numerics.probe import ProbeFacts
from anyquant.planning.plan import FUSED_EXPERTS, KEEP, QUANTIZE, Decision, Plan
from anyquant.runtime.experts import (
    checkpoint_layout,
    checkpoint_name_patterns,
    stored_transposed,
)

# keeping an experts layout the quantized experts cannot serve protects correctness: an
# override may not force it (planning.SAFETY_CODES)
EXPERTS_LAYOUT = "experts_layout"


def expert_decisions(model: nn.Module, model_map: ModelMap, config: MethodConfig, compute_dtype: str,
                     facts: ProbeFacts | None = None) -> list[Decision]:
    """One decision per fused expert tensor of `model` (model.tree.fused_expert_tensors).
    `facts`: the probe forward's, which say how experts classes that do not declare their
    layout multiply their tensors (`expert_layouts`)."""
    handler = handler_for(config.method)
    out: list[Decision] = []
    observed = facts.expert_layouts if facts is not None else {}
    for name in fused_expert_tensors(model):
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name)
        p = model.get_parameter(name)
        shape = list(p.shape)
        info = model_map.modules.get(owner_name)
        component = info.component if info is not None else "language_model"
        if p.dim() != 3:
            out.append(Decision(name, FUSED_EXPERTS, component, KEEP, None, compute_dtype, EXPERTS_LAYOUT,
                                f"fused experts kept in float: {name} has {p.dim()} dimensions; quantized experts "
                                "are [experts, out, in]", {}, shape))
            continue
        # which dimension is the input one (the int4 groups run along it): the class says so, or
        # the probe saw how its forward multiplies the tensor; unseen, [experts, out, in] (the
        # quantized experts reproduce the tensor in its own layout either way, so this choice
        # changes which weights share a scale, never what the forward computes)
        transposed = stored_transposed(owner)
        if transposed is None:
            transposed = observed.get(name) == "in_out"
        logical = [shape[0], shape[2], shape[1]] if transposed else shape  # [experts, out, in]
        ok, options, code, reason = handler.fit_experts(logical, config)
        if ok and transposed:
            # stored [experts, in, out] (`x @ W[e]`): quantized per expert as its [out, in] transpose,
            # kept in anyquant's fused layout (no per-expert checkpoint layout is written for it)
            options = {**options, "transposed": True}
        if ok and stored_transposed(owner) is None:
            # not a transformers experts class: its own forward uses the tensor, whole or by expert
            options = {**options, "owner_forward": True}
        if ok and handler.format == "compressed-tensors" and not transposed:
            # int4 family: written one Linear per expert, as transformers' own checkpoints and
            # llm-compressor's are, where transformers splits this tensor in its checkpoints
            layout = checkpoint_layout(model, name, shape)
            options = {**options, "layout": "per_expert" if layout else "fused"}
            if layout:
                options["checkpoint_names"] = checkpoint_name_patterns(layout)
        out.append(Decision(name, FUSED_EXPERTS, component, QUANTIZE if ok else KEEP,
                            config.method if ok else None, compute_dtype, code, reason,
                            options if ok else {}, shape))
    return out


def experts_note(plan: Plan, calibrated: bool) -> str | None:
    """The plan note on fused experts: how many are quantized and how, how many stay in float,
    and where the output loads (before anything is quantized)."""
    fused = [d for d in plan.decisions if d.kind == FUSED_EXPERTS]
    if not fused:
        return None
    todo = [d for d in fused if d.action == QUANTIZE]
    n_all = sum(_numel(d) for d in fused)
    n_q = sum(_numel(d) for d in todo)
    parts = [f"{len(todo)} of {len(fused)} fused MoE expert tensor(s) quantized ({n_q:,} of {n_all:,} expert "
             f"parameters, {n_q / max(1, n_all):.0%})"]
    if len(todo) < len(fused):
        kept = next(d for d in fused if d.action == KEEP)
        parts.append(f"kept in float: {kept.name}: {kept.reason}")
    if todo:
        if calibrated:
            parts.append(f"{plan.method} calibrates Linear layers; the experts are rounded to nearest on the same "
                         "int4 grid (per expert, not calibrated on the tokens routed to them)")
        own = [d for d in todo if d.options.get("owner_forward")]
        parts.append("each expert is dequantized when the router picks it, in the eager experts loop"
                     + (f"; {len(own)} tensor(s) of experts classes with their own forward (first: {own[0].name}) "
                        "are dequantized whole where that forward uses the whole tensor" if own else ""))
        why = stock_experts_refusal(plan)
        parts.append(why if why else "stock transformers' from_pretrained loads them too (the per-expert "
                     "compressed-tensors layout, dequantized to float at load)")
    return "; ".join(parts)


def _numel(d: Decision) -> int:
    n = 1
    for s in d.shape or [0]:
        n *= int(s)
    return n


def stock_experts_refusal(plan: Plan) -> str | None:
    """Why stock transformers cannot load the quantized experts of `plan`'s output, or None."""
    todo = [d for d in plan.decisions if d.kind == FUSED_EXPERTS and d.action == QUANTIZE]
    if not todo:
        return None
    head = (f"the output loads with anyquant.load only ({len(todo)} quantized fused expert tensor(s), first: "
            f"{todo[0].name}): ")
    if plan.method in ("nf4", "fp4", "int8"):
        return head + "transformers' bitsandbytes loader has no quantized form for fused experts"
    if not plan.config.get("symmetric", False):
        return head + ("transformers' compressed-tensors loader dequantizes experts without their zero points "
                       "(asymmetric int4 fails there); a symmetric scheme (--symmetric, W4A16) loads in both")
    fused = [d for d in todo if d.options.get("layout") != "per_expert"]
    if fused:
        return head + (f"{fused[0].name} is saved in anyquant's fused layout ("
                       + ("stored transposed, [experts, in, out]" if fused[0].options.get("transposed") else
                          "transformers keeps it fused in its checkpoints")
                       + "), which its compressed-tensors loader does not read")
    return None
