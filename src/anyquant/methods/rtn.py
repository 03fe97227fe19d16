"""int4: round-to-nearest, group-wise, asymmetric; the primitives do the math."""

from __future__ import annotations

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.calib.runner import quantize_model_blockwise
from anyquant.config import Int4Config
from anyquant.errors import AnyquantError
from anyquant.methods.registry import Method, register
from anyquant.model.modelmap import ModuleInfo
from anyquant.runtime.experts import Int4Experts
from anyquant.runtime.int4_linear import Int4Linear

MIN_GROUP = 32


# The group sizes vLLM's 4-bit weight-only kernels (Marlin, Machete, exllama) accept for a
# compressed-tensors W4A16 checkpoint; -1 is one group per row (channel-wise).
VLLM_GROUP_SIZES = (-1, 32, 64, 128)


def fit_group_size(in_features: int | list[int], requested: int) -> int | None:
    """The requested group size if it divides in_features (every one of them, for a list);
    else the largest of vLLM's group sizes (128, 64, 32) below it that does; else the largest
    multiple of 32 below it that does; None when not even 32 does.

    Smaller groups cost bits (16-bit scale + 4-bit zero per group) but keep the layer 4-bit.
    SmolLM2's 576- and 1536-wide layers get 64 (4.31 bits per weight), which vLLM serves,
    rather than 96 (4.21 bits), which it refuses; 64 also measured better (perplexity 30.55
    against 33.73, docs/methods.md). A requested size vLLM does not take (e.g. 96) is honoured
    where it divides, and the plan says vLLM cannot serve it."""
    widths = [in_features] if isinstance(in_features, int) else list(in_features)
    if all(k % requested == 0 for k in widths):
        return requested
    candidates = [g for g in VLLM_GROUP_SIZES if 0 < g < requested]
    candidates += list(range(requested - requested % MIN_GROUP, MIN_GROUP - 1, -MIN_GROUP))
    for g in sorted(set(candidates), key=lambda g: (g not in VLLM_GROUP_SIZES, -g)):
        if g < requested and all(k % g == 0 for k in widths):
            return g
    return None


def vllm_group_note(method: str, sizes: list[int]) -> str | None:
    """The plan note when a group size is not one vLLM serves, or None."""
    bad = sorted({g for g in sizes if g not in VLLM_GROUP_SIZES})
    if not bad:
        return None
    return (f"{method}: group size {', '.join(map(str, bad))} is not one vLLM's 4-bit kernels accept "
            f"({', '.join(map(str, VLLM_GROUP_SIZES))}): anyquant and transformers load this output, vLLM refuses "
            "it; pass --group-size 32, 64 or 128 (one that divides every quantized layer's in_features)")


USER_GROUP_SIZE = "user_group_size"  # a plan override set this module's group size


def check_user_group_sizes(plan, config: Int4Config) -> None:
    """Group sizes set per module by plan overrides: mixed sizes are several compressed-tensors
    config groups, which vLLM and anyquant load; stock transformers loads them only for a
    symmetric scheme (an asymmetric checkpoint is dequantized at load with one group's scheme
    for every layer), so an asymmetric output with mixed sizes is refused."""
    sizes = sorted({int(d.options.get("group_size", config.group_size)) for d in plan.to_quantize()})
    if len(sizes) > 1 and not config.symmetric:
        raise AnyquantError(
            f"{config.method}: the plan overrides set group sizes {sizes}: mixed group sizes need a symmetric "
            "scheme (--symmetric, or --method W4A16), because stock transformers dequantizes an asymmetric "
            "compressed-tensors checkpoint with one group size for every layer; pass --symmetric or set one "
            "group size for all layers (--group-size)")
    if len(sizes) > 1:
        plan.notes.append(f"{config.method}: group sizes {sizes} set per module by plan overrides "
                          "(one compressed-tensors config group each)")
    note = vllm_group_note(config.method, sizes)
    if note is not None and note not in plan.notes:
        plan.notes.append(note)


class Int4RTN(Method):
    name = "int4"
    format = "compressed-tensors"

    def fit(self, info: ModuleInfo, config: Int4Config):
        g = fit_group_size(info.in_features or 0, config.group_size)
        if g is None:
            return (False, {}, "shape_unsupported",
                    f"in_features={info.in_features} is not divisible by group size {config.group_size} "
                    f"or any multiple of {MIN_GROUP} below it")
        if g != config.group_size:
            return (True, {"group_size": g}, "group_size_fallback",
                    f"in_features={info.in_features} not divisible by {config.group_size}; group size {g}")
        return True, {"group_size": g}, "quantize", f"int4 round-to-nearest, group size {g}"

    def finalize(self, plan, model_map, config: Int4Config) -> None:
        """One group size for the whole model: transformers (5.23) dequantizes every layer of an
        asymmetric compressed-tensors checkpoint with one config group's scheme (its
        CompressedTensorsDequantize takes the dense scheme, not the layer's), so mixed sizes
        fail to load there (symmetric checkpoints, loaded compressed, do load per group); the
        largest group size (see fit_group_size) that divides every quantized layer is used,
        and the plan says so."""
        todo = [d for d in plan.to_quantize() if d.reason_code != USER_GROUP_SIZE]
        experts = plan.experts_to_quantize()  # fused MoE experts share the checkpoint's group size
        if not todo and not experts:
            check_user_group_sizes(plan, config)
            return
        widths = [model_map.modules[d.name].in_features or 0 for d in todo] + [
            d.shape[1] if d.options.get("transposed") else d.shape[2] for d in experts]  # experts' in_features
        g = fit_group_size(widths, config.group_size)
        if g is None:  # cannot happen: fit() only admits layers that 32 divides
            raise AssertionError("no common group size")
        if g != config.group_size:
            odd = sum(1 for w in widths if w % config.group_size)
            plan.notes.append(
                f"int4: group size {g} instead of {config.group_size}: {odd} of {len(widths)} layers have "
                f"in_features not divisible by {config.group_size}; one group size per checkpoint "
                "keeps it loadable by transformers and vLLM"
            )
        for d in todo:
            d.options = {"group_size": g}
            if g != config.group_size:
                d.reason_code = "group_size_fallback"
                d.reason = f"int4 round-to-nearest, group size {g} (model-wide: see plan notes)"
        for d in experts:
            d.options = {**d.options, "group_size": g}
            if g != config.group_size:
                d.reason = f"{self.name}: int4 round-to-nearest per expert, group size {g} (model-wide: see plan notes)"
        check_user_group_sizes(plan, config)

    def quantize_linear(self, linear: nn.Linear, options, config: Int4Config, compute_dtype) -> nn.Module:
        g = options.get("group_size", config.group_size)
        return Int4Linear.from_float(linear, g, config.symmetric, dtype=compute_dtype)

    def bits_per_weight(self, info: ModuleInfo, options, config: Int4Config, scale_bits: int = 16) -> float:
        g = options.get("group_size", config.group_size)
        return 4 + scale_bits / g + (0 if config.symmetric else 4 / g)

    # Fused MoE experts: each expert's [out, in] matrix on the same int4 grid as a Linear (groups
    # of the plan's group size along in_features); calibrated methods round experts to nearest
    # (their calibration runs on Linear layers; planning/experts.py says so in the plan).
    def fit_experts(self, shape, config: Int4Config):
        in_f = shape[-1]
        g = fit_group_size(in_f, config.group_size)
        if g is None:
            return (False, {}, "shape_unsupported",
                    f"in_features={in_f} is not divisible by group size {config.group_size} "
                    f"or any multiple of {MIN_GROUP} below it")
        return True, {"group_size": g}, "quantize", f"{self.name}: int4 round-to-nearest per expert, group size {g}"

    def experts_grid(self, w2d: torch.Tensor, group_size: int, config: Int4Config, compute_dtype):
        """(codes, scale, zero) of the experts' rows stacked as one [experts * out, in] matrix
        (every group lies within one row, so this is each expert quantized on its own)."""
        scale, zero = P.compute_qparams(w2d, 4, group_size, config.symmetric)
        scale = P.round_scale(scale, compute_dtype)
        return P.quantize(w2d, scale, zero, 4, group_size), scale, zero

    def quantize_experts(self, weight: torch.Tensor, options, config: Int4Config, compute_dtype) -> nn.Module:
        g = options.get("group_size", config.group_size)
        n, out_f, in_f = weight.shape
        codes, scale, zero = self.experts_grid(weight.detach().reshape(n * out_f, in_f), g, config, compute_dtype)
        return Int4Experts.from_codes(codes.reshape(n, out_f, in_f), scale.reshape(n, out_f, -1),
                                      zero.reshape(n, out_f, -1), g, config.symmetric, compute_dtype)

    def experts_bits_per_weight(self, shape, options, config: Int4Config) -> float:
        return self.bits_per_weight(None, options, config)


class CalibratedInt4(Int4RTN):
    """A calibrated method: the block-by-block runner calls `block_algorithm(ctx)` per block."""

    calibrated = True

    @staticmethod
    def block_algorithm(ctx) -> None:
        raise NotImplementedError

    def quantize_model(self, model, plan, config, compute_dtype, calib_ids, progress=True, **kw):
        return quantize_model_blockwise(model, plan, config, compute_dtype, calib_ids, self.block_algorithm,
                                        progress, **kw)


register(Int4RTN())
