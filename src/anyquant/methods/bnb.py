"""nf4 / fp4 / int8 through bitsandbytes: its numerics and kernels, our planning and checks."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from anyquant.config import BnB4bitConfig, Int8Config
from anyquant.methods.registry import Method, register
from anyquant.model.modelmap import ModuleInfo
from anyquant.runtime.experts import Bnb4Experts, Int8Experts

# transformers' bitsandbytes loader converts exactly these module types when it reads a saved
# checkpoint; a quantized subclass (FalconLinear, ...) could be saved but never loaded again.
_LOADER_TYPES = ("Linear", "Conv1D")


def _loader_cannot_convert(info: ModuleInfo):
    if info.type in _LOADER_TYPES:
        return None
    return (False, {}, "format_unsupported",
            f"{info.type} is a subclass of nn.Linear: transformers' bitsandbytes loader only converts "
            f"{' and '.join(_LOADER_TYPES)} modules, so a quantized {info.type} could not be loaded again "
            "(int4, hqq, awq and gptq take it)")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # a dependency, but say what to do if an environment lacks it
        raise ImportError("bitsandbytes is required for nf4/fp4/int8: pip install bitsandbytes") from e
    return bnb


def keep_compute_dtype(module: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' AVX512-BF16 CPU path in every Linear4bit under `module`.

    On CPUs with AVX512-BF16, Linear4bit repacks its weight at the first eval-mode, no-grad
    forward and from then on computes in bfloat16, whatever compute dtype was chosen: the same
    model then gives different logits before and after that first call (and the repacking
    asserts out_features % 32 == 0 and in_features % block size == 0, so narrower layers
    crash). anyquant's dtype policy chose the compute dtype; it holds for every call."""
    bnb = _bnb()
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return module


@functools.lru_cache(maxsize=None)  # one class, made once bitsandbytes is imported
def _flattening_int8_class():
    """Linear8bitLt whose forward folds every leading dimension into one: bitsandbytes 0.50's
    LLM.int8 CPU path gives the wrong output shape (batch 1) or raises (batch > 1) for inputs
    of more than 3 dimensions (MLA and 4-D attention projections: deepseek_v3, minicpm3, ...).
    Same weights, same state dict: only the call changes."""
    bnb = _bnb()

    class FlatLinear8bitLt(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() <= 3:
                return super().forward(x)
            y = super().forward(x.reshape(-1, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])

    return FlatLinear8bitLt


def pin_bnb_modules(module: nn.Module) -> nn.Module:
    """What anyquant does to every bitsandbytes module it makes or loads: keep the compute
    dtype (keep_compute_dtype) and take inputs of any rank in LLM.int8 layers."""
    keep_compute_dtype(module)
    bnb = _bnb()
    flat = _flattening_int8_class()
    for m in module.modules():
        if type(m) is bnb.nn.Linear8bitLt:
            m.__class__ = flat
    return module


class BnB4bit(Method):
    format = "bitsandbytes"

    def __init__(self, name: str) -> None:
        self.name = name

    def fit(self, info: ModuleInfo, config: BnB4bitConfig):
        kept = _loader_cannot_convert(info)
        if kept:
            return kept
        return True, {}, "quantize", f"{self.name}, block size {config.block_size}" + (
            ", double quantization" if config.double_quant else "")

    def quantize_linear(self, linear: nn.Linear, options: dict[str, Any], config: BnB4bitConfig,
                        compute_dtype: torch.dtype) -> nn.Module:
        bnb = _bnb()
        device = linear.weight.device
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=config.double_quant,
            quant_type=config.quant_type, quant_storage=torch.uint8, device="meta",
        )
        # bitsandbytes quantizes a Params4bit when it is moved to a real device.
        q.weight = bnb.nn.Params4bit(
            linear.weight.detach().to(compute_dtype if compute_dtype != torch.float32 else torch.float32),
            requires_grad=False, quant_type=config.quant_type, blocksize=config.block_size,
            compress_statistics=config.double_quant, quant_storage=torch.uint8,
        ).to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return pin_bnb_modules(q)

    def bits_per_weight(self, info: ModuleInfo, options, config: BnB4bitConfig) -> float:
        if config.double_quant:
            # 8-bit absmax per block, plus one fp32 scale per 256 blocks
            return 4 + 8 / config.block_size + 32 / (config.block_size * 256)
        return 4 + 32 / config.block_size

    # Fused MoE experts: bitsandbytes' blockwise 4-bit codes of each expert, dequantized per expert
    # in forward (runtime/experts.py Bnb4Experts; absmax in float32, not double-quantized).
    def fit_experts(self, shape, config: BnB4bitConfig):
        if (shape[-2] * shape[-1]) % config.block_size:
            return (False, {}, "shape_unsupported", f"{shape[-2]} x {shape[-1]} weights per expert is not a whole "
                    f"number of {config.block_size}-weight blocks")
        return True, {}, "quantize", f"{self.name} per expert, block size {config.block_size}"

    def quantize_experts(self, weight, options, config: BnB4bitConfig, compute_dtype) -> nn.Module:
        return Bnb4Experts.quantize(weight, config.quant_type, config.block_size, compute_dtype)

    def experts_bits_per_weight(self, shape, options, config: BnB4bitConfig) -> float:
        return 4 + 32 / config.block_size


class BnBInt8(Method):
    name = "int8"
    format = "bitsandbytes"

    def fit(self, info: ModuleInfo, config: Int8Config):
        kept = _loader_cannot_convert(info)
        if kept:
            return kept
        return True, {}, "quantize", f"LLM.int8, outlier threshold {config.threshold}"

    def quantize_linear(self, linear: nn.Linear, options, config: Int8Config, compute_dtype) -> nn.Module:
        bnb = _bnb()
        device = linear.weight.device
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=config.threshold, device="meta",
        )
        q.weight = bnb.nn.Int8Params(
            linear.weight.detach().to(torch.float16), requires_grad=False, has_fp16_weights=False
        ).to(device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return pin_bnb_modules(q)

    def bits_per_weight(self, info: ModuleInfo, options, config) -> float:
        return 8 + 32 / max(1, info.in_features or 1)

    # Fused MoE experts: LLM.int8's row-wise int8 weights per expert, dequantized per expert in
    # forward (runtime/experts.py Int8Experts): weight-only, without the outlier decomposition.
    def fit_experts(self, shape, config: Int8Config):
        return True, {}, "quantize", "int8 row-wise per expert (weight-only: no outlier decomposition)"

    def quantize_experts(self, weight, options, config: Int8Config, compute_dtype) -> nn.Module:
        return Int8Experts.quantize(weight, compute_dtype)

    def experts_bits_per_weight(self, shape, options, config) -> float:
        return 8 + 32 / max(1, shape[-1])


register(BnB4bit("nf4"))
register(BnB4bit("fp4"))
register(BnBInt8())
