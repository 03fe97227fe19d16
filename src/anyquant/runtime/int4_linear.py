"""Inference module for anyquant's int4 group-wise weights (compressed-tensors pack-quantized).

The buffers mirror what is saved, so a state dict round-trips without conversion:
  weight_packed      int32 [out, in / 8]     codes + 8, eight nibbles per word, low bits first
  weight_scale       float16 (bfloat16 for a bfloat16 model) [out, in / g]
  weight_zero_point  int32 [ceil(out / 8), in / g]  zero points packed along dim 0 (asymmetric only)
  weight_shape       int64 [2]
Kernel choice happens in `forward`: on CPU (and wherever no faster kernel applies) the weight
is dequantized and multiplied in the activation dtype; the dequantized weight is not cached,
so memory stays at 4 bits per weight.
"""

from __future__ import annotations

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.runtime import kernels, ops


class Int4Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        symmetric: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"Int4Linear: in_features={in_features} not divisible by group_size={group_size}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.int32, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=P.scale_storage_dtype(dtype),
                                                        device=device))
        if not symmetric:
            self.register_buffer(
                "weight_zero_point",
                torch.zeros((out_features + 7) // 8, groups, dtype=torch.int32, device=device),
            )
        else:
            self.weight_zero_point = None
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # Repacked layouts for GPU kernels, built once on first use per device (kernels.layout).
        self.kernel_cache: dict = {}
        # Names this module to torch.ops.anyquant.int4_linear (the forward under torch.compile).
        self._op_handle = ops.register(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        # a copy (copy.deepcopy, pickle) is a different module: its own handle, its own caches
        self.kernel_cache = {}
        self._op_handle = ops.register(self)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        group_size: int,
        symmetric: bool = False,
        qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Int4Linear":
        """Quantize `linear` with round-to-nearest, or onto a given (scale, zero_point) grid
        chosen by a calibrated method."""
        w = linear.weight.detach()
        dtype = dtype or w.dtype
        scale, zero = qparams if qparams is not None else P.compute_qparams(w, 4, group_size, symmetric)
        scale = P.round_scale(scale, dtype)
        codes = P.quantize(w, scale, zero, 4, group_size)
        return cls.from_codes(codes, scale, zero, group_size, linear.bias, symmetric, dtype)

    @classmethod
    def from_codes(cls, codes, scale, zero, group_size, bias, symmetric, dtype) -> "Int4Linear":
        out_features, in_features = codes.shape
        m = cls(in_features, out_features, group_size, bias is not None, symmetric, dtype, codes.device)
        m.weight_packed.copy_(P.pack_int4(codes, dim=1))
        m.weight_scale.copy_(scale)
        if not symmetric:
            m.weight_zero_point.copy_(P.pack_int4(zero.to(torch.int8), dim=0))
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes, under the name peft looks up to place a LoRA adapter on this
        module's device (formats/lora.py); not a state-dict entry."""
        return self.weight_packed

    def clear_kernel_cache(self) -> None:
        """Drop the GPU kernels' repacked layouts (rebuilt at the next forward that needs one)."""
        self.kernel_cache.clear()

    def codes(self) -> torch.Tensor:
        return P.unpack_int4(self.weight_packed, self.in_features, dim=1)

    def zero_points(self) -> torch.Tensor:
        if self.symmetric:
            return torch.zeros_like(self.weight_scale, dtype=torch.int8)
        return P.unpack_int4(self.weight_zero_point, self.out_features, dim=0)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return P.dequantize(self.codes(), self.weight_scale, self.zero_points(), self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.anyquant.int4_linear(x, self._op_handle, self.out_features)
        return kernels.int4_linear_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )
