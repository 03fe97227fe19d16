"""bitsandbytes outputs: stock transformers + bitsandbytes load them with `from_pretrained(DIR)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.experts import install_expert_shells, load_expert_tensors
from anyquant.formats.hf import classes_for_config
from anyquant.formats.registry import Format, register_format
from anyquant.methods.bnb import pin_bnb_modules
from anyquant.model.modelmap import LINEAR, quantized_linear_types
from anyquant.numerics.dtype import DTYPES
from anyquant.planning.plan import Plan


def _kept_linears(plan: Plan) -> list[str]:
    return [d.name for d in plan.kept() if d.kind == LINEAR]


def bnb_quantization_config(plan: Plan, compute_dtype: torch.dtype) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    cfg = plan.config
    # transformers skips a module when a skip entry equals its full name or its last name
    # component, or the name ends with "." + entry; full names are therefore exact.
    skip = _kept_linears(plan)
    if plan.method == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg["threshold"],
                                 llm_int8_skip_modules=skip)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=plan.method,
            bnb_4bit_use_double_quant=cfg["double_quant"], bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip,
        )
    d = bnb.to_dict()
    return d


def float_linear_names(model: nn.Module, skip: list[str]) -> list[str]:
    """`skip` plus every module left in float that transformers' bitsandbytes loader could
    still turn into a quantized one, whatever the plan's kind for it: an nn.Linear subclass kept
    because its forward is not a plain linear map (Llama 4's router), and fused expert weights
    (a 3-D parameter: transformers may unfuse them into Linear layers to quantize). Unlisted,
    transformers builds quantized modules there and finds no quantized weights for them."""

    qtypes = quantized_linear_types()
    out = list(skip)
    for name, mod in model.named_modules():
        if not name or name in out or isinstance(mod, qtypes):
            continue
        # (a skip entry covers the whole subtree: never one holding Linear layers to load quantized)
        fused = not isinstance(mod, (nn.modules.conv._ConvNd, nn.Embedding)) and any(
            p.dim() >= 3 and p.is_floating_point() for p in mod.parameters(recurse=False)) and not any(
            isinstance(c, nn.Linear) for c in mod.modules())
        if isinstance(mod, nn.Linear) or fused:
            out.append(name)
    return out


class BitsAndBytesFormat(Format):
    name = "bitsandbytes"

    def quantization_config(self, model: nn.Module, plan: Plan, compute_dtype: torch.dtype) -> dict[str, Any]:
        qc = bnb_quantization_config(plan, compute_dtype)
        qc["llm_int8_skip_modules"] = float_linear_names(model, qc.get("llm_int8_skip_modules") or [])
        return qc

    def load(self, directory: Path, manifest: dict[str, Any], trust_remote_code: bool, *,
             device=None, device_map=None, fuse: bool = False) -> nn.Module:
        """transformers + bitsandbytes load it, with `device_map` (or {"": device}) passed on:
        the quantized weights go to their device as they are read. `fuse` changes nothing here
        (bitsandbytes' modules are not fused)."""
        from transformers import AutoConfig

        kwargs: dict[str, Any] = {}
        if device_map is not None:
            kwargs["device_map"] = device_map
        elif device is not None:
            kwargs["device_map"] = {"": torch.device(device)}
        for auto in classes_for_config(AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)):
            try:
                model = auto.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs).eval()
            except ValueError:
                continue
            # quantized fused MoE experts: transformers has no loader for them (it left the float
            # experts uninitialised); anyquant rebuilds them from the plan and the checkpoint
            plan = Plan.from_dict(manifest["plan"])
            todo = install_expert_shells(model, plan, DTYPES[plan.compute_dtype], directory)
            load_expert_tensors(model, directory, todo)
            return pin_bnb_modules(model)
        raise AnyquantError(f"{directory}: transformers could not load this bitsandbytes checkpoint")


register_format(BitsAndBytesFormat())
