"""awq: activation-aware per-input-channel scaling (Lin et al., 2023) before int4 RTN.

For each set of linears that read the same input tensor (found by probing the block with
hooks, not from a per-architecture table), s = mean|x|^alpha per input channel, alpha on a grid
in [0, 1); the objective is the summed output error of those linears on the calibration
activations, sum ||X W^T - (X / s) Q(W s)^T||^2. 1/s is folded into the module that produced X
(found by probing too: the module whose output tensor *is* X) when it is a Linear or has a
per-channel weight (a norm), and the fold is then checked numerically: the float block must
give the same outputs. When an operation between modules made X (Llama's down_proj reads
act(gate) * up; o_proj reads the attention output), each Linear of the block with as many
outputs is tried under the same check: up_proj passes, gate_proj does not (the activation is
not linear), v_proj does where it has one head per query head (without grouped-query
attention). When nothing passes, the group is not scaled (plain RTN) and the report says so. alpha = 0 is on the grid, so on the calibration data the
objective is never worse than RTN.
"""

from __future__ import annotations

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.calib.blocks import first_sample, hidden_of, probe_block, run_block
from anyquant.calib.guard import nonfinite, rtn_grid
from anyquant.methods.registry import register
from anyquant.methods.rtn import CalibratedInt4

MAX_ROWS = 4096  # calibration tokens used in the grid-search objective (all tokens feed mean|x|)



@torch.no_grad()
def search_scale(X: torch.Tensor, weights: list[torch.Tensor], xmean: torch.Tensor, group_size: int,
                 symmetric: bool, grid: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, float, list[float]]:
    """(best s, best alpha, objective per alpha)."""
    X = X.float()
    refs = [X @ w.float().t() for w in weights]
    best, best_s, best_a, losses = None, None, 0.0, []
    for k in range(grid):
        alpha = k / grid
        s = xmean.clamp_min(1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, y in zip(weights, refs):
            ws = w.float() * s
            codes, sc, z = rtn_grid(ws, group_size, symmetric, scale_dtype)
            wq = P.dequantize(codes, sc, z, group_size) / s
            loss += float(((X @ wq.t() - y) ** 2).sum())
        losses.append(loss)
        if loss == loss and (best is None or loss < best):
            best, best_s, best_a = loss, s, alpha
    if best_s is None:
        raise FloatingPointError("awq: every alpha gave a non-finite loss")
    return best_s, best_a, losses


def _fold_target(block: nn.Module, producer: str | None, channels: int):
    if producer is None:
        return None, "its input is made by an operation outside any module (nothing to fold 1/s into)"
    mod = block.get_submodule(producer)
    if isinstance(mod, nn.Linear):
        if mod.out_features == channels:
            return mod, None
        return None, f"producer {producer} has {mod.out_features} outputs, not {channels}"
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == channels:
        return mod, None
    return None, f"producer {producer} ({type(mod).__name__}) has no per-channel weight"


def _scale_params(mod: nn.Module, s: torch.Tensor, inverse: bool, offset: bool = False) -> None:
    """Scale a consumer's input columns by s, or a producer's outputs by 1/s (inverse). With
    `offset` the producer is a norm computing x * (1 + weight) (Gemma's): its weight becomes
    (1 + weight) / s - 1."""
    f = (1 / s) if inverse else s
    w = mod.weight.data
    if offset:
        w.copy_((w.float() + 1).mul_(f.to(w.device)).sub_(1).to(w.dtype))
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            b.data.mul_(f.to(b.dtype))
        return
    if w.dim() == 2 and isinstance(mod, nn.Linear):
        if mod.out_features == s.shape[0] and inverse:  # producer: scale its output rows
            w.mul_(f.to(w.dtype).unsqueeze(1))
            if mod.bias is not None:
                mod.bias.data.mul_(f.to(mod.bias.dtype))
        else:  # consumer: scale its input columns
            w.mul_(f.to(w.dtype).unsqueeze(0))
    else:
        w.mul_(f.to(w.dtype))
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            b.data.mul_(f.to(b.dtype))


@torch.no_grad()
def awq_block(ctx) -> None:
    """Search and fold the scales, then round each (scaled) linear to nearest through the guard."""
    probe, rows, scaled = awq_scale_block(ctx, ctx.config.grid)
    for n in ctx.linears:
        lin = ctx.block.get_submodule(n)
        grp = next(g for g in probe.groups if n in g)
        X = torch.cat(rows[grp[0]]) if rows.get(grp[0]) else None
        ctx.install(n, lambda lin=lin, n=n: rtn_grid(lin.weight.detach(), ctx.group_size(n), ctx.config.symmetric,
                                                     ctx.compute_dtype),
                    inputs={"activations": X, "scale": scaled.get(n)})


@torch.no_grad()
def awq_scale_block(ctx, grid: int):
    """AWQ's scale search and fold for one block, leaving its Linears in float (scaled): the
    block computes the same function, with weights easier to round. Returns (the block's
    LinearProbe, calibration rows per input group, scale per scaled Linear). gptq uses this
    too (GPTQConfig.awq_scales): scales first, then second-order rounding."""

    block, cfg = ctx.block, ctx.config
    names = list(ctx.linears)
    probe = probe_block(block, ctx.batches[0], names)
    firsts = [g[0] for g in probe.groups]
    total_tokens = sum(hidden_of(b).shape[0] * hidden_of(b).shape[1] for b in ctx.batches)
    step = max(1, total_tokens // MAX_ROWS)
    sums = {n: None for n in firsts}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in firsts}
    counts = {n: 0 for n in firsts}
    hooks = []
    for n in firsts:
        def pre(m, args, _n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            a = x.abs().sum(0)
            sums[_n] = a if sums[_n] is None else sums[_n] + a
            counts[_n] += x.shape[0]
            rows[_n].append(x[::step].clone())
        hooks.append(block.get_submodule(n).register_forward_pre_hook(pre))
    try:
        for b in ctx.batches:
            run_block(block, b)
    finally:
        for h in hooks:
            h.remove()
    probe_batch = first_sample(ctx.batches[0])
    y0 = run_block(block, probe_batch).float()
    tol = 1e-3 if ctx.compute_dtype == torch.float32 else 3e-2
    scaled: dict[str, torch.Tensor] = {}
    for group, producer in zip(probe.groups, probe.producers):
        X = torch.cat(rows[group[0]])
        xmean = sums[group[0]] / max(1, counts[group[0]])
        if nonfinite(activations=X, mean_abs=xmean):
            continue  # the guard in ctx.install reports it per layer and falls back to RTN
        if producer is not None:
            target, why = _fold_target(block, producer, X.shape[1])
            # A norm's weight may multiply directly or as (1 + weight): both are tried.
            candidates = ([(producer, target, False)] + ([(producer, target, True)] if not isinstance(target, nn.Linear)
                                                        else [])) if target is not None else []
        else:
            # An operation between modules made X (Llama's act(gate) * up, or attention): a Linear
            # whose output rows X is linear in can take 1/s (up_proj, and v_proj where every head
            # has its own). Which one is found by trying, with the same numerical check.
            candidates = [(n, m, False) for n, m in block.named_modules()
                          if isinstance(m, nn.Linear) and m.out_features == X.shape[1] and n not in group]
            why = f"its input is made by an operation outside any module, and no Linear of {X.shape[1]} outputs " \
                  "can take 1/s (tried: " + (", ".join(n for n, _, _ in candidates) or "none") + ")"
        if not candidates:
            ctx.notes.append(f"{'/'.join(group)}: not scaled: {why}")
            continue
        weights = [block.get_submodule(n).weight for n in group]
        try:
            s, alpha, _ = search_scale(X, weights, xmean, ctx.group_size(group[0]), cfg.symmetric, grid,
                                       ctx.compute_dtype)
        except FloatingPointError as e:
            ctx.notes.append(f"{'/'.join(group)}: not scaled: {e}")
            continue
        if alpha == 0.0:
            continue
        s = s.to(weights[0].device)

        def fold(target, s, offset):
            for n in group:
                _scale_params(block.get_submodule(n), s, inverse=False)
            _scale_params(target, s, inverse=True, offset=offset)

        errors = []  # each candidate tried and undone; the one that changes the block least is kept
        for cand_name, target, offset in candidates:
            fold(target, s, offset)
            errors.append((P.relative_error(y0, run_block(block, probe_batch).float()), cand_name, target, offset))
            fold(target, 1 / s, offset)
        err, folded, target, offset = min(errors, key=lambda e: e[0])
        if not err < tol:
            if producer is not None:
                why = (f"folding 1/s into {producer} changed the float block output by {err:.2g} (its output "
                       "is used elsewhere, or it is not a plain scale)")
            ctx.notes.append(f"{'/'.join(group)}: not scaled: {why}")
            continue
        fold(target, s, offset)
        for n in group:
            scaled[n] = s
    return probe, rows, scaled


class AWQ(CalibratedInt4):
    name = "awq"
    block_algorithm = staticmethod(awq_block)


register(AWQ())
