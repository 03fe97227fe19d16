"""Quantized fused MoE experts in a saved output: empty QuantizedExperts rebuilt from the plan
and filled from the checkpoint, for every format (anyquant.load only: stock transformers has
no loader for them, and the plan and the model card say so)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.hf import checkpoint_key_renamer
from anyquant.planning.plan import Decision, Plan
from anyquant.runtime.experts import (
    Bnb4Experts,
    Int4Experts,
    Int8Experts,
    QuantizedExperts,
    install_experts,
)

STOCK_REFUSAL = ("loads with anyquant.load only: stock transformers' from_pretrained has no loader for quantized "
                 "fused MoE experts ({n} tensor(s), first: {first})")


def expert_shell(d: Decision, plan: Plan, dtype: torch.dtype, device=None) -> QuantizedExperts:
    """The empty QuantizedExperts that `plan`'s method saved for decision `d`."""
    n, out_f, in_f = d.shape
    if plan.method in ("nf4", "fp4"):
        return Bnb4Experts(n, out_f, in_f, plan.method, int(plan.config["block_size"]), dtype, device)
    if plan.method == "int8":
        return Int8Experts(n, out_f, in_f, dtype, device)
    g = int(d.options.get("group_size", plan.config.get("group_size", 0)))
    return Int4Experts(n, out_f, in_f, g, bool(plan.config.get("symmetric", False)), dtype, device)


def install_expert_shells(model: nn.Module, plan: Plan, dtype: torch.dtype, directory: Path,
                          device=None) -> list[Decision]:
    """Every planned fused expert tensor of `model` replaced by an empty QuantizedExperts;
    returns those decisions."""
    todo = plan.experts_to_quantize()
    for d in todo:
        try:
            p = model.get_parameter(d.name)
        except AttributeError as e:
            raise AnyquantError(f"{directory}: the plan quantizes the fused experts {d.name}, which the rebuilt "
                                "model lacks") from e
        if list(p.shape) != list(d.shape):
            raise AnyquantError(f"{directory}: {d.name} is {list(p.shape)} in the rebuilt model, {d.shape} in the plan")
        install_experts(model, d.name, expert_shell(d, plan, dtype, device if device is not None else
                                                    (None if p.is_meta else p.device)))
    return todo


def load_expert_tensors(model: nn.Module, directory: Path, todo: list[Decision]) -> None:
    """Fill the shells of `todo` from the checkpoint's tensors (keys through transformers' renamings)."""
    from safetensors import safe_open

    if not todo:
        return
    wanted = {f"{d.name}.{k}": t for d in todo for k, t in model.get_submodule(d.name).state_dict().items()}
    rename = checkpoint_key_renamer(model)
    found: set[str] = set()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key if key in wanted else rename(key)
                if name in wanted:
                    t = sf.get_tensor(key)
                    if tuple(t.shape) != tuple(wanted[name].shape):
                        raise AnyquantError(f"{directory}: {key} has shape {tuple(t.shape)} in the checkpoint, "
                                            f"{tuple(wanted[name].shape)} in the model")
                    wanted[name].copy_(t.to(wanted[name].dtype))
                    found.add(name)
    lacking = sorted(set(wanted) - found)
    if lacking:
        raise AnyquantError(f"{directory}: checkpoint lacks the quantized experts' tensors {lacking[:5]}")


def stock_refusal(plan: Plan) -> str | None:
    """Why stock transformers cannot load this plan's output, or None."""
    todo = plan.experts_to_quantize()
    if not todo:
        return None
    return STOCK_REFUSAL.format(n=len(todo), first=todo[0].name)
