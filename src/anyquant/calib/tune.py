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

Zero points stay the method's (they are stored as 4-bit integers). Scales are rounded to their
storage dtype and codes re-clamped, so what is saved is exactly what was scored.

Two choices decide whether tuning helps or hurts a real model:

- The loss weighs every token alike (`loss="token"`): each token's squared error over its
  target's squared norm. Residual streams are far from uniform: on SmolLM2-135M the BOS position
  holds about 95% of a middle block's output sum of squares, on Gemma-3-270M a few tokens carry
  norms 10x the median. A plain mean square error then tunes those few positions, while the next
  block reads every position through a norm that divides by its own size.
- Acceptance is judged on held-out sequences (`holdout`, a share of the calibration sequences
  never used for a step): judged on the sequences it trained on, a block that only fit those
  would be kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.calib.blocks import block_outputs, hidden_of, relative_error, run_block, slice_batch
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


def token_error(targets: list[torch.Tensor], outputs: list[torch.Tensor],
                rows: list[torch.Tensor] | None = None) -> float:
    """sqrt(mean over tokens of ||out - target||^2 / ||target||^2): every token weighs alike,
    whatever its norm; positions not finite in both are left out. `rows`: per batch, the
    sequences to count (all when None)."""
    num = 0.0
    count = 0
    for k, (t, o) in enumerate(zip(targets, outputs)):
        if rows is not None:
            if rows[k].numel() == 0:
                continue
            t, o = t[rows[k].to(t.device)], o[rows[k].to(o.device)]
        t, o = t.double(), o.double()
        per = (o - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)
        ok = torch.isfinite(per)
        num += float(per[ok].sum())
        count += int(ok.sum())
    return (num / count) ** 0.5 if count else float("nan")


def _loss(out: torch.Tensor, target: torch.Tensor, kind: str, norm: float) -> torch.Tensor:
    out, target = out.float(), target.float()
    if kind == "token":
        return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).mean()
    # "global": the batch's mean square error over the target's mean square
    return (out - target).pow(2).mean() / max(norm, 1e-30)


def split_rows(batches: list, holdout: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(training rows, held-out rows) per batch: every round(1/holdout)-th calibration sequence
    is held out, counted across batches, where at least 2 sequences stay for training and 1 is
    held out; otherwise nothing is held out (the acceptance check then uses all sequences)."""
    sizes = [hidden_of(b).shape[0] for b in batches]
    total = sum(sizes)
    every = round(1 / holdout) if holdout > 0 else 0
    held_n = total // every if every else 0
    train, held = [], []
    use = every > 0 and held_n >= 1 and total - held_n >= 2
    start = 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        mask = (idx % every == every - 1) if use else torch.zeros(n, dtype=torch.bool)
        train.append(torch.nonzero(~mask).flatten())
        held.append(torch.nonzero(mask).flatten())
        start += n
    return train, held


def select_for_tuning(error: float, earlier: list[float], share: float) -> bool:
    """Whether a block whose own per-token error after its method (against the float block on
    the same inputs) is `error` is tuned, given the
    errors of the blocks before it: it is when no more than share x (blocks so far) of them,
    itself included, have a larger error, i.e. it is among the largest `share` seen so far. The
    choice is made as blocks come (the runner holds one block at a time), so the share tuned is
    `share` where errors do not trend with depth, more where they grow, fewer where they shrink.
    share=1: every block."""
    if share >= 1:
        return True
    larger = sum(1 for e in earlier if e > error)
    return larger < max(1, math.ceil(share * (len(earlier) + 1)))


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
    loss: str = "token",
    holdout: float = 0.25,
    seed: int = 0,
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Tune the Int4Linear modules `linears` (names relative to `block`) in place; returns the
    block's output error before and after (relative, over all sequences; and per token, on the
    held-out ones, which decides), whether the tuned weights were kept, and the kept block's
    outputs on `batches` (the runner's next inputs; None when not kept)."""

    originals = {n: block.get_submodule(n) for n in linears}
    if not originals or steps <= 0:
        return {"kept": False, "steps": 0}, None
    train_rows, held_rows = split_rows(batches, holdout)
    judged = held_rows if any(r.numel() for r in held_rows) else None
    with torch.no_grad():
        outs0 = block_outputs(block, batches)
        before = relative_error(targets, outs0)
        judged_before = token_error(targets, outs0, judged)
        del outs0
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
    # For the "global" loss: normalised by the target's mean square, so one learning rate fits
    # every block (the residual stream's norm grows with depth); "token" is scale-free already.
    norms = [float(t.float().pow(2).mean()) for t in targets]
    trainable = [k for k, r in enumerate(train_rows) if r.numel() > 0]
    try:
        with torch.enable_grad():
            for step in range(steps):
                k = trainable[int(torch.randint(len(trainable), (1,), generator=gen))]
                b, target, mine = batches[k], targets[k], train_rows[k]
                rows = mine[torch.randperm(mine.numel(), generator=gen)[:sequences_per_step]].to(target.device)
                out = run_block(block, slice_batch(b, rows))
                value = _loss(out, target[rows], loss, norms[k])
                if not torch.isfinite(value):
                    break
                opt.zero_grad(set_to_none=True)
                value.backward()
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
        outputs = block_outputs(block, batches)
        after = relative_error(targets, outputs)
        judged_after = token_error(targets, outputs, judged)
    kept = judged_after < judged_before
    if not kept:
        for n, q in originals.items():
            set_submodule(block, n, q)
    info = {"kept": kept, "steps": steps, "output_error_before": before, "output_error_after": after,
            "token_error_before": judged_before, "token_error_after": judged_after,
            "judged_on": "held-out sequences" if judged is not None else "all sequences"}
    return info, (outputs if kept else None)
