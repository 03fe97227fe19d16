"""gptq: second-order error compensation (Frantar et al., 2022) on the int4 grid of Int4Config.

Per layer: H = 2 X^T X / n from the layer's calibration inputs, dampened by damp * mean(diag H);
columns are quantized one by one and the error is spread over the not-yet-quantized columns
through the upper Cholesky factor of H^-1, with lazy batch updates. Each group's scale and
zero point come from the *current* (already updated) weights when quantization reaches the
group's first column, on exactly the primitives' grid, so the saved codes are the ones used.
With act_order, columns go in order of decreasing diag(H); the group grids are then fixed
up front from the original weights ("static groups"), which keeps groups contiguous and
therefore storable in the plain compressed-tensors group format (no g_idx).

Within a block the linears are done in call order, group by group (linears reading the same
input together), each group's Hessians measured with the earlier groups already quantized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from anyquant.methods import primitives as P
from anyquant.methods.registry import register
from anyquant.methods.rtn import CalibratedInt4


@torch.no_grad()
def gptq_grid(
    w: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    block: int = 128,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, in/g], zero int8 [out, in/g]) for weight `w`, Hessian `H`."""
    qmin, qmax = P.qrange(4)
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    ngroups = cols // group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.empty(rows, ngroups, device=W.device)
    zero = torch.empty(rows, ngroups, device=W.device, dtype=torch.int8)

    hdiag = torch.diag(H).clone()

    def set_group(gi: int, cols_w: torch.Tensor) -> None:
        if clip_search:  # each column's error weighted by how much the output depends on it
            cw = hdiag[gi * group_size:(gi + 1) * group_size]
            s, z = P.search_qparams(cols_w, 4, cols_w.shape[1], symmetric, cw, scale_dtype=scale_dtype)
        else:
            s, z = P.compute_qparams(cols_w, 4, cols_w.shape[1], symmetric)
        scale[:, gi] = P.round_scale(s[:, 0], scale_dtype)
        zero[:, gi] = z[:, 0]

    perm = None
    if act_order:
        for gi in range(ngroups):  # static groups from the original weights
            set_group(gi, W[:, gi * group_size:(gi + 1) * group_size])
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        col_group = perm // group_size
    else:
        col_group = torch.arange(cols, device=W.device) // group_size
        # lazy-update blocks hold whole groups, so a group's grid sees all earlier updates
        block = max(group_size, (block // group_size) * group_size)

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    cg = col_group.tolist()

    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            gi = cg[c]
            if perm is None and c % group_size == 0:
                set_group(gi, W1[:, i:i + group_size])
            s, z = scale[:, gi], zero[:, gi].float()
            x = W1[:, i]
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            Q[:, c] = q.to(torch.int8)
            err = (x - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if not torch.isfinite(W1).all():
            raise FloatingPointError(f"gptq: non-finite weights after columns {i1}..{i2}")
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero


class _Hessian:
    def __init__(self, n: int, device) -> None:
        self.H = torch.zeros(n, n, device=device, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.count / (self.count + m)
        self.count += m
        x = math.sqrt(2 / self.count) * x
        self.H += x.t() @ x


class _Done(Exception):
    pass


@torch.no_grad()
def gptq_block(ctx) -> None:
    """Linears that read the same input share one Hessian, so they are quantized as one stacked
    matrix (rows are independent given H): one column sweep per group instead of per layer."""
    from anyquant.calib.guard import nonfinite
    from anyquant.calib.runner import probe_block, run_block

    cfg = ctx.config
    if cfg.awq_scales:
        from anyquant.config import AWQConfig
        from anyquant.methods.awq import awq_scale_block

        awq_scale_block(ctx, AWQConfig.grid)  # awq's own default grid over alpha
    probe = probe_block(ctx.block, ctx.batches[0], list(ctx.linears))
    for group in probe.groups:
        first = ctx.block.get_submodule(group[0])
        hess = _Hessian(first.in_features, first.weight.device)

        def pre(m, args):
            hess.add(args[0])
            raise _Done

        h = first.register_forward_pre_hook(pre)
        try:
            for b in ctx.batches:
                try:
                    run_block(ctx.block, b)
                except _Done:
                    pass
        finally:
            h.remove()
        H = hess.H
        del hess
        weights = [ctx.block.get_submodule(n).weight.detach() for n in group]
        gsizes = {ctx.group_size(n) for n in group}
        result: object
        bad = nonfinite(hessian=H)
        if bad:
            result = FloatingPointError(bad)
        elif len(gsizes) != 1:  # cannot happen with a model-wide group size; be exact anyway
            result = None
        else:
            try:
                result = gptq_grid(torch.cat(weights), H, gsizes.pop(), cfg.symmetric, cfg.damp, cfg.act_order,
                                   ctx.compute_dtype, clip_search=cfg.clip_search)
            except (torch.linalg.LinAlgError, FloatingPointError, RuntimeError) as e:
                result = e
        row = 0
        for n, w in zip(group, weights):
            r0, r1 = row, row + w.shape[0]
            row = r1

            def algorithm(n=n, w=w, r0=r0, r1=r1):
                if isinstance(result, Exception):
                    raise result
                if result is None:
                    return gptq_grid(w, H, ctx.group_size(n), cfg.symmetric, cfg.damp, cfg.act_order,
                                     ctx.compute_dtype, clip_search=cfg.clip_search)
                codes, scale, zero = result
                return codes[r0:r1], scale[r0:r1], zero[r0:r1]

            ctx.install(n, algorithm, inputs={"hessian": H})
        del H, result


class GPTQ(CalibratedInt4):
    name = "gptq"
    block_algorithm = staticmethod(gptq_block)


register(GPTQ())
