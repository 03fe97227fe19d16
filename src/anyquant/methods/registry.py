"""The method contract and its registry: one handler per config type.

A method is a subclass of `Method`. The planner asks it `fit` for each Linear and lets it
`finalize` the whole plan (one group size per checkpoint, say); a calibration-free method then
turns each planned Linear into a quantized module with `quantize_linear`; a calibrated one
(`calibrated = True`) gets the whole model and the calibration batches in `quantize_model`
and works block by block. `format` names the output format its modules are saved in
(a name registered in anyquant.formats: formats.registry.Format writes its quantization config and loads it). Handlers register by config type; an unknown method's error lists the known ones."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from anyquant.config import MethodConfig, config_class
from anyquant.model.modelmap import ModuleInfo

# (ok, per-module options, reason code, one sentence for the plan)
Fit = tuple[bool, dict[str, Any], str, str]


class Method:
    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]]
    format: ClassVar[str]  # a registered formats.registry.Format name: "bitsandbytes" or "compressed-tensors"
    calibrated: ClassVar[bool] = False

    def fit(self, info: ModuleInfo, config: MethodConfig) -> Fit:
        """Can this method take the module? Default: yes, with the config's options."""
        return True, {}, "quantize", self.name

    def finalize(self, plan, model_map, config: MethodConfig) -> None:
        """Adjust the whole plan once every module is decided (default: nothing)."""

    def quantize_linear(self, linear: nn.Linear, options: dict[str, Any], config: MethodConfig,
                        compute_dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError(f"{self.name}: quantize_linear is not implemented")

    def quantize_model(self, model: nn.Module, plan, config: MethodConfig, compute_dtype: torch.dtype, calib,
                       progress: bool = True, **kw: Any) -> dict[str, Any]:
        """Calibrated methods: quantize every planned Linear of `model` in place; returns the
        calibration report (per_layer_weight_error, notes, fallbacks, ...)."""
        raise NotImplementedError(f"{self.name} is not a calibrated method")

    def bits_per_weight(self, info: ModuleInfo, options: dict[str, Any], config: MethodConfig) -> float:
        raise NotImplementedError(f"{self.name}: bits_per_weight is not implemented")

    # Fused MoE experts (a 3-D parameter [experts, out, in], runtime/experts.py)
    def fit_experts(self, shape: list[int], config: MethodConfig) -> Fit:
        """Can this method take a fused expert tensor of `shape`? Default: no."""
        return False, {}, "method_unsupported", f"{self.name} does not quantize fused MoE experts"

    def quantize_experts(self, weight: torch.Tensor, options: dict[str, Any], config: MethodConfig,
                         compute_dtype: torch.dtype) -> nn.Module:
        """The QuantizedExperts (runtime/experts.py) replacing the 3-D parameter `weight`."""
        raise NotImplementedError(f"{self.name}: quantize_experts is not implemented")

    def experts_bits_per_weight(self, shape: list[int], options: dict[str, Any], config: MethodConfig) -> float:
        raise NotImplementedError(f"{self.name}: experts_bits_per_weight is not implemented")


_HANDLERS: dict[type[MethodConfig], Method] = {}


def register(handler: Method) -> Method:
    """Register `handler` for its config type (the method name's config class by default)."""
    if not isinstance(handler, Method):
        raise TypeError(f"{type(handler).__name__} must subclass anyquant.methods.registry.Method")
    key = getattr(type(handler), "config_type", None) or config_class(handler.name)
    _HANDLERS[key] = handler
    return handler


def registered_handler(config_type: type[MethodConfig]) -> Method:
    """The handler registered for a config type (anyquant.methods.handler_for loads every built-in first)."""
    return _HANDLERS[config_type]
