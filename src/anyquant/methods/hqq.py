"""hqq: half-quadratic optimisation of each group's zero point and scale; calibration-free.

HQQ (Badri & Shaji, 2023) fits the quantization grid to the weights by minimising an lp-norm
(p < 1) of the weight error, split half-quadratically: alternate a generalised shrinkage of the
error W - dequant(Q) (outliers stop pulling the grid) with a closed-form update of the zero point.
compressed-tensors stores an *integer* zero point, so the float optimum is rounded to the grid
and the scale is then refitted with the zero held fixed (same splitting, closed form). Each
group finally keeps whichever of {HQQ, min-max RTN} has the smaller squared weight error, so a
layer is never worse than int4 RTN in that measure.
"""

from __future__ import annotations

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.calib.guard import guarded
from anyquant.config import HQQConfig
from anyquant.methods.registry import register
from anyquant.methods.rtn import Int4RTN
from anyquant.runtime.int4_linear import Int4Linear


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the lp-norm (p < 1): generalised soft thresholding."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - (1.0 / beta) * a.clamp_min(1e-12).pow(p - 1))


@torch.no_grad()
def hqq_grid(
    w: torch.Tensor,
    group_size: int,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8, scale float32, zero int8) for `w` [out, in] on the asymmetric int4 grid."""
    qmin, qmax = P.qrange(4)
    G = P._grouped(w.float(), group_size)  # [out, groups, g]
    s0, z0 = P.compute_qparams(w, 4, group_size, False)
    s0 = P.round_scale(s0, scale_dtype)
    s = s0.unsqueeze(-1).clone()
    zf = z0.float().unsqueeze(-1)
    # 1. zero point, float, scale fixed (HQQ's proximal iteration).
    b = beta
    for _ in range(iters):
        wq = torch.clamp(torch.round(G / s + zf), qmin, qmax)
        we = _shrink_lp(G - (wq - zf) * s, b, p)
        zf = (wq - (G - we) / s).mean(dim=-1, keepdim=True)
        b *= kappa
    # 2. integer zero point; scale refitted with the zero held (closed form on the shrunk target).
    z = torch.clamp(torch.round(zf), qmin, qmax)
    for _ in range(max(3, iters // 4)):
        a = torch.clamp(torch.round(G / s) + z, qmin, qmax) - z
        we = _shrink_lp(G - a * s, b, p)
        num = (a * (G - we)).sum(-1, keepdim=True)
        den = (a * a).sum(-1, keepdim=True)
        s_new = num / den.clamp_min(1e-12)
        s = torch.where((den > 0) & (s_new > 0) & torch.isfinite(s_new), s_new, s)
        b *= kappa
    s = P.round_scale(s.squeeze(-1), scale_dtype)
    z = z.squeeze(-1).to(torch.int8)
    # 3. per group, the better of HQQ and RTN in squared error.
    def err(scale, zero):
        q = P.quantize(w, scale, zero, 4, group_size)
        d = P.dequantize(q, scale, zero, group_size)
        return (P._grouped(d - w.float(), group_size) ** 2).sum(-1)

    take = err(s, z) < err(s0, z0)
    scale = torch.where(take, s, s0)
    zero = torch.where(take, z, z0)
    return P.quantize(w, scale, zero, 4, group_size), scale, zero


class HQQ(Int4RTN):
    name = "hqq"

    def quantize_linear(self, linear: nn.Linear, options, config: HQQConfig, compute_dtype) -> nn.Module:
        g = options.get("group_size", config.group_size)
        w = linear.weight.detach()
        (codes, scale, zero), fb = guarded(
            "linear", w, g, False, compute_dtype,
            lambda: hqq_grid(w, g, config.iters, config.lp_norm, scale_dtype=compute_dtype),
        )
        return Int4Linear.from_codes(codes, scale, zero, g, linear.bias, False, compute_dtype)

    def fit_experts(self, shape, config: HQQConfig):
        ok, options, code, reason = super().fit_experts(shape, config)
        if ok:
            reason = f"hqq per expert, group size {options['group_size']}"
        return ok, options, code, reason

    def experts_grid(self, w2d, group_size, config: HQQConfig, compute_dtype):
        grid, _ = guarded("experts", w2d, group_size, False, compute_dtype,
                          lambda: hqq_grid(w2d, group_size, config.iters, config.lp_norm, scale_dtype=compute_dtype))
        return grid


register(HQQ())
