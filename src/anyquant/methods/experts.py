"""Fused MoE experts through a method: every planned 3-D expert tensor of a model replaced by
the method's QuantizedExperts (runtime/experts.py), with its storage cost and weight error."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.config import MethodConfig
from anyquant.methods.registry import Method
from anyquant.progress import progress_bar
from anyquant.runtime.experts import install_experts


@torch.no_grad()
def quantize_planned_experts(model: nn.Module, plan, handler: Method, config: MethodConfig,
                             compute_dtype: torch.dtype, progress: bool = True) -> dict[str, Any]:
    """Quantize `plan.experts_to_quantize()` in place. Returns {"tensors", "params", "bits"
    (storage bits, scales included), "per_layer_weight_error" {name: relative error}}."""
    todo = plan.experts_to_quantize()
    out: dict[str, Any] = {"tensors": 0, "params": 0, "bits": 0.0, "per_layer_weight_error": {}}
    with progress_bar(f"quantizing experts ({config.method})", total=len(todo), enabled=progress) as advance:
        for d in todo:
            w = model.get_parameter(d.name).detach()
            transposed = bool(d.options.get("transposed"))  # [experts, in, out]: quantized as [out, in]
            wq = w.transpose(1, 2) if transposed else w
            q = handler.quantize_experts(wq, d.options, config, compute_dtype)
            q.transposed = transposed
            out["per_layer_weight_error"][d.name] = P.relative_error(w.float(), q.dequantized(torch.float32))
            n = w.numel()
            out["bits"] += handler.experts_bits_per_weight(list(wq.shape), d.options, config) * n
            out["params"] += n
            out["tensors"] += 1
            install_experts(model, d.name, q)
            advance()
    return out
