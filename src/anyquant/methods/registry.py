"""One verb, a registry: method name -> handler. Unknown methods list the known ones."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from anyquant.config import MethodConfig, config_class
from anyquant.model.modelmap import ModuleInfo


class MethodHandler(Protocol):
    name: str
    format: str  # "bitsandbytes" | "compressed-tensors"

    def fit(self, info: ModuleInfo, config: MethodConfig) -> tuple[bool, dict[str, Any], str, str]:
        """Can this method take the module? (ok, per-module options, reason code, sentence)."""

    def quantize_linear(
        self, linear: nn.Linear, options: dict[str, Any], config: MethodConfig, compute_dtype: torch.dtype
    ) -> nn.Module: ...

    def bits_per_weight(self, info: ModuleInfo, options: dict[str, Any], config: MethodConfig) -> float: ...


_HANDLERS: dict[str, MethodHandler] = {}


def register(handler: MethodHandler) -> MethodHandler:
    _HANDLERS[handler.name] = handler
    return handler


def handler_for(method: str) -> MethodHandler:
    config_class(method)  # raises with the list of known methods
    _load_builtin()
    return _HANDLERS[method]


def _load_builtin() -> None:
    # Always import all of them: importing one method module directly (e.g. rtn) registers
    # that handler alone, so "the registry is not empty" does not mean "all are loaded".
    from anyquant.methods import awq, bnb, gptq, hqq, rtn  # noqa: F401  (registration side effect)


def dequantize_linear(module: nn.Module) -> nn.Linear | None:
    """A float nn.Linear equal to what a quantized module computes, or None if not quantized."""
    from anyquant.runtime.int4_linear import Int4Linear

    if isinstance(module, Int4Linear):
        w = module.dequantized_weight(torch.float32)
        bias = module.bias
    else:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
        except ImportError:
            return None
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            bias = module.bias
        elif isinstance(module, bnb.nn.Linear8bitLt):
            cb, scb = module.weight.data, module.weight.SCB
            if cb.dtype != torch.int8:
                return None
            w = cb.float() * scb.float().unsqueeze(1) / 127.0
            bias = module.bias
        else:
            return None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=torch.float32)
    out.weight.data.copy_(w)
    if bias is not None:
        out.bias.data.copy_(bias.detach().float())
    return out


def dequantize_modules(model: nn.Module) -> nn.Module:
    for name, mod in list(model.named_modules()):
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


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
