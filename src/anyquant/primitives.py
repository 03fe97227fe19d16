"""Pure tensor functions for integer group-wise quantization.

No modules, no globals: every function takes tensors and returns tensors, so each can be
tested against an independent float64 reference.

Conventions follow compressed-tensors' "pack-quantized" format, which vLLM and transformers
read: for b bits the integer grid is signed, q in [-2^(b-1), 2^(b-1)-1]; an asymmetric group
has an integer zero point zp on that grid; q = clamp(round(w / scale) + zp); w ≈ (q - zp) * scale.
Packing stores q + 2^(b-1) as unsigned nibbles, eight per int32, lowest bits first.
"""

from __future__ import annotations

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(
            f"in_features={in_features} is not divisible by group_size={group_size}; "
            "pick a group size that divides it, or keep this layer in float"
        )
    return w.reshape(out_features, in_features // group_size, group_size)


def compute_qparams(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero point per group of `group_size` input columns.

    Returns (scale [out, in/g] in float32, zero_point [out, in/g] int8). The range always
    includes 0 so that a zero weight is exactly representable (padding, pruned weights).
    """
    qmin, qmax = qrange(bits)
    g = _grouped(w.float(), group_size)
    wmin = g.amin(dim=-1).clamp(max=0)
    wmax = g.amax(dim=-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(wmin.abs(), wmax) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (wmax - wmin) / (qmax - qmin)
    # An all-zero group would give scale 0 and a division by zero; any positive scale is exact there.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(torch.round(qmin - wmin / scale), qmin, qmax)
    return scale, zero.to(torch.int8)


def search_qparams(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    column_weight: torch.Tensor | None = None,
    shrinks: tuple[float, ...] = tuple(1 - 0.025 * i for i in range(13)),
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the min-max range shrunk by the factor (of `shrinks`) whose grid gives the least
    squared error, each column's error weighted by `column_weight` [in] (e.g. the diagonal of a
    layer's input Hessian: how much the output depends on that column). Scales are rounded to
    their storage dtype before the error is measured. 1.0 is always tried first, so the result
    is never worse than compute_qparams' min-max grid under that weighted error."""
    qmin, qmax = qrange(bits)
    g = _grouped(w.float(), group_size)
    cw = torch.ones(w.shape[1], device=w.device) if column_weight is None else column_weight.float()
    cw = _grouped(cw.unsqueeze(0), group_size)  # [1, groups, g]
    lo0 = g.amin(dim=-1).clamp(max=0)
    hi0 = g.amax(dim=-1).clamp(min=0)
    best_err = best_scale = best_zero = None
    for f in shrinks:
        lo, hi = lo0 * f, hi0 * f
        if symmetric:
            scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        else:
            scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = round_scale(scale, scale_dtype)
        zero = torch.zeros_like(scale) if symmetric else torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
        err = (((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - g) ** 2 * cw).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero.to(torch.int8)


def scale_storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Group scales are stored in 16 bits: bfloat16 for a bfloat16 model, float16 otherwise
    (11 significant bits; a float32 scale would cost 16 more bits per group, 0.17 bits per
    weight at group size 96, for a rounding far below the int4 step)."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def round_scale(scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored, back in float32: codes must be computed against it.
    Clamped into the storage type's normal range first, so no scale rounds to 0 or inf."""
    dt = scale_storage_dtype(compute_dtype)
    info = torch.finfo(dt)
    return scale.float().clamp(info.tiny, info.max).to(dt).float()


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes (int8 holding b-bit values) for `w` on the grid given by scale / zero point."""
    qmin, qmax = qrange(bits)
    g = _grouped(w.float(), group_size)
    q = torch.round(g / scale.float().unsqueeze(-1)) + zero_point.float().unsqueeze(-1)
    return q.clamp(qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    g = _grouped(q.to(torch.float32), group_size)
    w = (g - zero_point.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
) -> torch.Tensor:
    """Round-trip through the integer grid: what the quantized layer will compute with."""
    scale, zero = compute_qparams(w, bits, group_size, symmetric)
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size, w.dtype)


def pack_int4(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack int4 codes (int8 tensor, values in [-8, 7]) into int32 along `dim`, 8 per word."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q + 8).to(torch.uint8)
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    pad = (-cols) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    # code i of a word sits at bits 4i: in little-endian bytes (every platform torch runs on), byte
    # i // 2, low nibble for even i
    u = u.reshape(rows, -1, 2)
    # (through a flat view: a dtype view needs a unit stride in the last dimension, which a
    # tensor with a size-1 dimension may lack while counting as contiguous)
    packed = (u[..., 0] | (u[..., 1] << 4)).reshape(-1).view(torch.int32).view(rows, -1)
    return packed.t().contiguous() if dim == 0 else packed.contiguous()


def unpack_int4(packed: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int4: int8 codes in [-8, 7], `length` entries along `dim`."""
    p = packed.t() if dim == 0 else packed
    # little-endian bytes: codes 2j (low nibble), 2j + 1 (high); through a flat view, as in pack_int4
    b = p.reshape(-1).view(torch.uint8).view(p.shape[0], -1)
    u = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(p.shape[0], -1)[:, :length]
    q = u.to(torch.int8) - 8
    return q.t().contiguous() if dim == 0 else q.contiguous()


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx|| / ||ref|| in float64."""
    r = reference.double()
    denom = r.norm().item()
    return (r - approx.double()).norm().item() / (denom if denom > 0 else 1.0)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    r = reference.double()
    noise = (r - approx.double()).norm()
    return float(20 * torch.log10(r.norm() / noise.clamp_min(1e-30)))
