"""The calibration guard: a non-finite loss, scale or weight never reaches the model.

Every calibrated method computes a layer's int4 grid (codes, scale, zero point) through
`guarded()`. If the algorithm raises a numerical error or returns anything non-finite (or
codes off the grid), the layer falls back to round-to-nearest on its original weight; the
reason is logged and returned, so the report can say which layer and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from anyquant import primitives as P

log = logging.getLogger(__name__)

Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes int8, scale float, zero int8


@dataclass
class Fallback:
    layer: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"layer": self.layer, "fallback": "rtn", "reason": self.reason}


def nonfinite(**tensors: torch.Tensor | None) -> str | None:
    """A sentence naming the first non-finite tensor, or None when all are finite."""
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            return f"{name} has {int(bad.sum())} non-finite value(s) of {t.numel()}"
    return None


def rtn_grid(weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> Grid:
    scale, zero = P.compute_qparams(weight, 4, group_size, symmetric)
    scale = P.round_scale(scale, scale_dtype)  # codes are computed against the scale as stored
    return P.quantize(weight, scale, zero, 4, group_size), scale, zero


def check_grid(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> str | None:
    bad = nonfinite(scale=scale)
    if bad:
        return bad
    if bool((scale <= 0).any()):
        return f"scale has {int((scale <= 0).sum())} non-positive value(s)"
    qmin, qmax = P.qrange(4)
    for name, t in (("codes", codes), ("zero point", zero)):
        if int(t.min()) < qmin or int(t.max()) > qmax:
            return f"{name} off the int4 grid [{int(t.min())}, {int(t.max())}]"
    return None


def guarded(
    layer: str,
    weight: torch.Tensor,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    algorithm: Callable[[], Grid],
    inputs: dict[str, torch.Tensor | None] | None = None,
) -> tuple[Grid, Fallback | None]:
    """Run `algorithm` for `layer`; fall back to RTN of `weight` when its inputs (statistics such
    as a Hessian) or its result are not finite, or it raises a numerical error."""
    reason = nonfinite(weight=weight)
    if reason:
        # RTN of a non-finite weight is non-finite too: that is a model problem, not ours to hide.
        raise FloatingPointError(f"{layer}: {reason}; the source weights are broken")
    reason = nonfinite(**(inputs or {}))
    grid = None
    if reason is None:
        try:
            grid = algorithm()
        except (torch.linalg.LinAlgError, FloatingPointError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _numerical(e):
                raise
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = check_grid(*grid)
    if reason is None:
        return grid, None
    log.warning("%s: calibrated quantization failed (%s); falling back to round-to-nearest", layer, reason)
    return rtn_grid(weight, group_size, symmetric, scale_dtype), Fallback(layer, reason)


def _numerical(e: RuntimeError) -> bool:
    msg = str(e).lower()
    return any(k in msg for k in ("cholesky", "singular", "positive-definite", "not positive", "nan", "inf"))
