"""Quantized Linears (anyquant int4, bitsandbytes 4-bit and LLM.int8) back to float nn.Linear:
for re-quantizing an already-quantized source and for measuring a quantized layer's error."""

from __future__ import annotations

import torch
from torch import nn

from anyquant.model.tree import set_submodule
from anyquant.runtime.experts import QuantizedExperts
from anyquant.runtime.int4_linear import Int4Linear


def dequantized_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(float32 weight [out, in], bias) equal to what a quantized module computes, or None if
    not quantized."""
    if isinstance(module, Int4Linear):
        return module.dequantized_weight(torch.float32), module.bias
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float(), module.bias
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb = module.weight.data, module.weight.SCB
        if cb.dtype != torch.int8:
            return None
        return cb.float() * scb.float().unsqueeze(1) / 127.0, module.bias
    return None


def dequantize_linear(module: nn.Module) -> nn.Linear | None:
    """A float nn.Linear equal to what a quantized module computes, or None if not quantized."""
    got = dequantized_weight(module)
    if got is None:
        return None
    w, bias = got
    # built on the meta device and given the tensors: no random initialisation to overwrite
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=torch.float32)
    out.weight = nn.Parameter(w)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().float().clone())
    return out


def dequantize_modules(model: nn.Module) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedExperts):  # back to the fused 3-D parameter it replaced
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            del owner._modules[attr]
            owner.register_parameter(attr, nn.Parameter(mod.dequantized(mod.dtype), requires_grad=False))
            continue
        lin = dequantize_linear(mod)
        if lin is not None:
            set_submodule(model, name, lin)
    if hasattr(model, "config") and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers marks a model it loaded quantized and then refuses dtype casts on it; the
    # modules are float now, so the marks are wrong.
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            setattr(model, attr, None if attr in ("hf_quantizer", "quantization_method") else False)
    return model
