"""Block-output tuning: after a block's algorithm chose its int4 codes, fit what is left free to
the block's float output.

GPTQ and AWQ each minimise a per-layer proxy (a layer's output error on its own inputs, or a
scale search over one group of layers); neither sees how the errors of q/k/v, o, gate/up and
down combine through attention, the activation and the residual. This step takes the block as
it will run — every planned Linear already int4 — and lowers the block's output error against
the float block on the same (already quantized) inputs by gradient descent on:

- each group's scale, as a multiplier exp(t) (t starts at 0: the method's own scale);
- optionally each weight's rounding, as an offset v in [-1, 1] added to its code before
  rounding with a straight-through gradient (AutoRound's signed-gradient idea, Cheng et al.,
  2023), so a code can move one step where the block's output says it should.

Zero points stay the method's (they are stored as 4-bit integers). The tuned block is kept only
if its output error over every calibration batch is lower than before; scales are rounded to
their storage dtype and codes re-clamped, so what is saved is exactly what was scored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.calib.blocks import hidden_of, relative_error, run_block, slice_batch
from anyquant.model.tree import set_submodule
from anyquant.runtime.int4_linear import Int4Linear


class _TunableInt4(nn.Module):
    """An Int4Linear's weight as a differentiable function of scale multipliers and rounding
    offsets; the codes, zero points and bias are the module's, unchanged."""

    def __init__(self, q: Int4Linear, rounding: bool) -> None:
        super().__init__()
        self.source = q
        g = q.group_size
        self.group_size = g
        codes = q.codes().float()
        self.register_buffer("codes", codes)
        self.register_buffer("zero", q.zero_points().float())
        self.register_buffer("scale", q.weight_scale.float())
        self.log_mult = nn.Parameter(torch.zeros_like(self.scale))
        self.offset = nn.Parameter(torch.zeros_like(codes)) if rounding else None
        self.bias = q.bias

    def tuned_codes(self) -> torch.Tensor:
        qmin, qmax = P.qrange(4)
        if self.offset is None:
            return self.codes
        moved = self.codes + self.offset
        # straight-through rounding: forward sees integers, backward the identity
        return (moved + (torch.round(moved) - moved).detach()).clamp(qmin, qmax)

    def tuned_scale(self) -> torch.Tensor:
        return self.scale * torch.exp(self.log_mult)

    def weight(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        grouped = self.tuned_codes().view(rows, cols // self.group_size, self.group_size)
        return ((grouped - self.zero.unsqueeze(-1)) * self.tuned_scale().unsqueeze(-1)).view(rows, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def frozen(self, compute_dtype: torch.dtype) -> Int4Linear:
        """The tuned layer as stored: scales in their storage dtype, integer codes."""
        q = self.source
        scale = P.round_scale(self.tuned_scale(), compute_dtype)
        codes = torch.round(self.tuned_codes()).to(torch.int8)
        return Int4Linear.from_codes(codes, scale, q.zero_points(), q.group_size, q.bias, q.symmetric, compute_dtype)


def tune_block(
    block: nn.Module,
    linears: list[str],
    batches: list,
    targets: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    rounding: bool,
    sequences_per_step: int,
    compute_dtype: torch.dtype,
    seed: int = 0,
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Tune the Int4Linear modules `linears` (names relative to `block`) in place; returns the
    block's relative output error before and after and whether the tuned weights were kept, and
    the kept block's outputs on `batches` (the runner's next inputs; None when not kept)."""

    originals = {n: block.get_submodule(n) for n in linears}
    if not originals or steps <= 0:
        return {"kept": False, "steps": 0}, None
    with torch.no_grad():
        before = relative_error(targets, [run_block(block, b) for b in batches])
    tunables = {n: _TunableInt4(q, rounding) for n, q in originals.items()}
    frozen_flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for n, t in tunables.items():
        set_submodule(block, n, t)
    params = [t.log_mult for t in tunables.values()]
    offsets = [t.offset for t in tunables.values() if t.offset is not None]
    opt = torch.optim.Adam([{"params": params, "lr": lr}] + ([{"params": offsets, "lr": lr * 5}] if offsets else []))
    gen = torch.Generator().manual_seed(seed)
    # The loss is normalised by the target's mean square, so one learning rate fits every block
    # (the residual stream's norm grows with depth).
    norms = [float(t.float().pow(2).mean()) for t in targets]
    try:
        with torch.enable_grad():
            for step in range(steps):
                k = int(torch.randint(len(batches), (1,), generator=gen))
                b, target = batches[k], targets[k]
                bs = hidden_of(b).shape[0]
                rows = torch.randperm(bs, generator=gen)[:sequences_per_step].to(target.device)
                out = run_block(block, slice_batch(b, rows))
                loss = (out.float() - target[rows].float()).pow(2).mean() / max(norms[k], 1e-30)
                if not torch.isfinite(loss):
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for o in offsets:
                        o.clamp_(-1.0, 1.0)
                    # cosine decay: late steps refine instead of oscillating
                    for gidx, grp in enumerate(opt.param_groups):
                        base = lr * (5 if gidx else 1)
                        grp["lr"] = base * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        tuned = {n: t.frozen(compute_dtype) for n, t in tunables.items()}
    finally:
        for p, flag in frozen_flags.items():
            p.requires_grad_(flag)
    for n, q in tuned.items():
        set_submodule(block, n, q)
    with torch.no_grad():
        outputs = [run_block(block, b) for b in batches]
        after = relative_error(targets, outputs)
    kept = after < before
    if not kept:
        for n, q in originals.items():
            set_submodule(block, n, q)
    info = {"kept": kept, "steps": steps, "output_error_before": before, "output_error_after": after}
    return info, (outputs if kept else None)
