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

import copy

import torch

from anyquant import primitives as P
from anyquant.calib.blocks import probe_block, run_block
from anyquant.calib.guard import nonfinite
from anyquant.config import AWQConfig
from anyquant.methods.awq import awq_scale_block
from anyquant.methods.registry import register
from anyquant.methods.rtn import CalibratedInt4


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, a new tensor: GPTQ's dampening, one definition for the sweep,
    the scale refit and the float-target weight."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return Hd


class Owned:
    """A Hessian handed over to gptq_grid, which may overwrite it and drops the last reference to
    it once factored: the caller keeps none (a tensor passed as an argument stays referenced by
    the caller's frame until the call returns, so the hand-over goes through this box)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor: torch.Tensor | None = tensor

    def take(self) -> torch.Tensor:
        t, self._tensor = self._tensor, None
        if t is None:
            raise RuntimeError("gptq: a handed-over Hessian was taken twice")
        return t


def permute_square_(A: torch.Tensor, perm: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """A[perm][:, perm], computed in A itself with temporaries of `chunk` rows: columns permuted
    one row chunk at a time, then a blockwise transpose, twice (values only move: exact)."""
    n = A.shape[0]

    def columns_() -> None:
        for r in range(0, n, chunk):
            A[r:r + chunk] = A[r:r + chunk][:, perm]

    def transpose_() -> None:
        for i in range(0, n, chunk):
            i2 = min(i + chunk, n)
            A[i:i2, i:i2] = A[i:i2, i:i2].t().clone()
            for j in range(i2, n, chunk):
                j2 = min(j + chunk, n)
                upper = A[i:i2, j:j2].clone()
                A[i:i2, j:j2] = A[j:j2, i:i2].t()
                A[j:j2, i:i2] = upper.t()

    columns_()     # A P^T
    transpose_()   # P A^T
    columns_()     # P A^T P^T
    transpose_()   # P A P^T: row i is A's row perm[i], column j its column perm[j]
    return A


@torch.no_grad()
def gptq_grid(
    w: torch.Tensor,
    H: torch.Tensor | Owned,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    block: int = 128,
    clip_search: bool = False,
    grids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, in/g], zero int8 [out, in/g]) for weight `w`, Hessian `H`
    (left as it is, unless handed over as Owned(H): then factored in place, or freed once permuted).
    `grids`: (scale, zero) to use as they are instead of choosing each group's grid."""
    qmin, qmax = P.qrange(4)
    W = w.detach().to(torch.float32, copy=True)
    owned = isinstance(H, Owned)
    H = H.take().float() if owned else H.detach().float()
    rows, cols = W.shape
    ngroups = cols // group_size
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    scale = torch.empty(rows, ngroups, device=W.device)
    zero = torch.empty(rows, ngroups, device=W.device, dtype=torch.int8)

    hdiag = torch.diag(H).clone()
    hdiag[dead] = 1

    def set_group(gi: int, cols_w: torch.Tensor) -> None:
        if clip_search:  # each column's error weighted by how much the output depends on it
            cw = hdiag[gi * group_size:(gi + 1) * group_size]
            s, z = P.search_qparams(cols_w, 4, cols_w.shape[1], symmetric, cw, scale_dtype=scale_dtype)
        else:
            s, z = P.compute_qparams(cols_w, 4, cols_w.shape[1], symmetric)
        scale[:, gi] = P.round_scale(s[:, 0], scale_dtype)
        zero[:, gi] = z[:, 0]

    perm = None
    if grids is not None:
        scale.copy_(grids[0])
        zero.copy_(grids[1])
    if act_order:
        for gi in range(ngroups if grids is None else 0):  # static groups from the original weights
            set_group(gi, W[:, gi * group_size:(gi + 1) * group_size])
        perm = torch.argsort(hdiag, descending=True)
        W = W[:, perm]
        Hd = permute_square_(H, perm) if owned else H[perm[:, None], perm]
        dead = dead[perm]
        col_group = perm // group_size
    else:
        Hd = H if owned else H.clone()
        col_group = torch.arange(cols, device=W.device) // group_size
        # lazy-update blocks hold whole groups, so a group's grid sees all earlier updates
        block = max(group_size, (block // group_size) * group_size)

    del H   # a handed-over Hessian is gone now (or is Hd itself)
    # One [cols, cols] matrix of ours (0.8 GB for a 14336-wide down_proj; beside the caller's H
    # unless handed over): the dampened Hessian becomes its Cholesky factor, then H^-1, then
    # H^-1's upper factor, each in place (the same calls and values as out of place; LAPACK and
    # cuSOLVER may still work on copies of their own)
    Hd[dead, dead] = 1
    Hd.diagonal().add_(damp * torch.mean(torch.diag(Hd)))
    Hinv = torch.linalg.cholesky(Hd, out=Hd)
    torch.cholesky_inverse(Hinv, out=Hinv)
    torch.linalg.cholesky(Hinv, upper=True, out=Hinv)
    Q = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    cg = col_group.tolist()
    fixed = perm is not None or grids is not None  # every grid is known before the sweep

    # The column loop is launch-bound on a GPU (one small kernel per operation and column), so
    # it reads each grid once per lazy block or group rather than per column, and writes
    # codes once per block.
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if fixed:
            idx = col_group[i1:i2].to(W.device)
            S1, Z1 = scale[:, idx], zero[:, idx].float()
        current = -1
        for i in range(i2 - i1):
            if fixed:
                s, z = S1[:, i], Z1[:, i]
            elif cg[i1 + i] != current:  # groups are contiguous here and start inside this block
                current = cg[i1 + i]
                set_group(current, W1[:, i:i + group_size])
                s, z = scale[:, current], zero[:, current].float()
            x = W1[:, i]
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            Q1[:, i] = q
            err = (x - (q - z) * s) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(torch.int8)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)   # in place: no [rows, cols] product
        if not torch.isfinite(W1).all():
            raise FloatingPointError(f"gptq: non-finite weights after columns {i1}..{i2}")
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero


@torch.no_grad()
def refit_scales(w: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The group scales that minimise the layer's output error tr((W - Ŵ) H (W - Ŵ)^T) for fixed
    codes and zero points: Ŵ is linear in the scales, so each row's scales solve one small
    least-squares system (ngroups x ngroups, cross-group terms of H included). GPTQ picks codes
    against scales fixed before it sees the error it will spread; this closes that gap.
    Per row, the refit (rounded to its storage dtype) is kept only where it lowers the error."""
    W = w.detach().float()
    H = H.detach().float()
    rows, cols = W.shape
    ng = cols // group_size
    D = (codes.float() - zero.float().repeat_interleave(group_size, dim=1)).view(rows, ng, group_size)
    Hg = H.view(ng, group_size, ng, group_size)
    HD = torch.einsum("aibj,rbj->raib", Hg, D)  # H times each group's code column block
    M = torch.einsum("rai,raib->rab", D, HD)
    b = (D * (W @ H).view(rows, ng, group_size)).sum(-1)
    ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    M = M + ridge[:, None, None] * torch.eye(ng, device=W.device)
    new = torch.linalg.solve(M, b.unsqueeze(-1)).squeeze(-1)
    ok = torch.isfinite(new) & (new > 0)
    new = P.round_scale(torch.where(ok, new, scale), scale_dtype)  # as stored; never 0 or inf

    def err(s):
        E = W - (D * s.unsqueeze(-1)).reshape(rows, cols)
        return ((E @ H) * E).sum(1)

    better = err(new) < err(scale)
    return torch.where(better.unsqueeze(1), new, scale)


def gptq_refined(w, H, group_size, symmetric, damp, act_order, scale_dtype, clip_search, refits: int):
    """gptq_grid, then `refits` rounds of: refit the scales to the codes, re-run GPTQ on them."""
    codes, scale, zero = gptq_grid(w, H, group_size, symmetric, damp, act_order, scale_dtype, clip_search=clip_search)
    Hd = damped(H.float(), damp) if refits else None
    for _ in range(refits):
        scale = refit_scales(w, Hd, codes, scale, zero, group_size, scale_dtype)
        codes, scale, zero = gptq_grid(w, H, group_size, symmetric, damp, act_order, scale_dtype,
                                       grids=(scale, zero))
    if refits:
        scale = refit_scales(w, Hd, codes, scale, zero, group_size, scale_dtype)
    return codes, scale, zero


class _Hessian:
    """Running 2 X^T X / n of a layer's inputs X; with `x_float`, also the cross term
    2 (X_float - X)^T X / n against the float model's own inputs to that layer."""

    def __init__(self, n: int, device, cross: bool = False) -> None:
        self.H = torch.zeros(n, n, device=device, dtype=torch.float32)
        self.C = torch.zeros(n, n, device=device, dtype=torch.float32) if cross else None
        self.count = 0

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        keep = self.count / (self.count + m)
        self.count += m
        k = 2 / self.count
        # in place: no [n, n] product beside H (0.8 GB for a 14336-wide input)
        self.H.addmm_(x.t(), x, beta=keep, alpha=k)
        if self.C is not None:
            self.C.addmm_((x_float.reshape(-1, x.shape[-1]).float() - x).t(), x, beta=keep, alpha=k)


def float_target_weight(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W C H^-1 (GPTAQ's asymmetric calibration, Li et al., 2025): the weight whose
    output on the quantized model's inputs X best matches W's on the float model's X_float.
    ||W X_float - Q X||^2 = ||W* X - Q X||^2 + a term free of Q, so GPTQ on W* with the same H
    minimises the error against the float model's activations, not the float layer's output on
    inputs that earlier quantized layers already moved."""
    dt = torch.promote_types(w.dtype, torch.float32)
    W, H, C = w.to(dt), H.to(dt), C.to(dt)
    # H symmetric positive definite once dampened: (W C) H^-1 = (H^-1 (W C)^T)^T through its
    # Cholesky factor, formed in place (a general solve would copy the [cols, cols] matrix again)
    L = damped(H, damp)
    torch.linalg.cholesky(L, out=L)
    return W + torch.cholesky_solve((W @ C).t(), L).t()


class _Done(Exception):
    pass


@torch.no_grad()
def gptq_block(ctx) -> None:
    """Linears that read the same input share one Hessian, so they are quantized as one stacked
    matrix (rows are independent given H): one column sweep per group instead of per layer."""

    cfg = ctx.config
    if cfg.awq_scales:

        awq_scale_block(ctx, AWQConfig.grid)  # awq's own default grid over alpha
    probe = probe_block(ctx.block, ctx.batches[0], list(ctx.linears))
    cross = cfg.float_targets and ctx.float_batches is not None
    # The float block as it is now (after any AWQ folding, so its layers see the same inputs'
    # scaling), run on the float model's inputs for the cross term.
    float_block = copy.deepcopy(ctx.block) if cross else None
    for group in probe.groups:
        first = ctx.block.get_submodule(group[0])
        hess = _Hessian(first.in_features, first.weight.device, cross=cross)
        seen: list[torch.Tensor] = []

        def pre(m, args, hess=hess):
            if cross:
                hess.add(args[0], seen.pop())
            else:
                hess.add(args[0])
            raise _Done

        def pre_float(m, args):
            seen.append(args[0])
            raise _Done

        h = first.register_forward_pre_hook(pre)
        hf = float_block.get_submodule(group[0]).register_forward_pre_hook(pre_float) if cross else None
        try:
            for k, b in enumerate(ctx.batches):
                for blk, batch in ([(float_block, ctx.float_batches[k])] if cross else []) + [(ctx.block, b)]:
                    try:
                        run_block(blk, batch)
                    except _Done:
                        pass
        finally:
            h.remove()
            if hf is not None:
                hf.remove()
        H, C = hess.H, hess.C
        del hess
        weights = [ctx.block.get_submodule(n).weight.detach() for n in group]
        # the group as one matrix (rows are independent given H and C): one float-target solve
        # and one sweep for all of it
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
        if C is not None and nonfinite(hessian=H, cross=C) is None:
            try:
                stacked = float_target_weight(stacked, H, C, cfg.damp)
                weights = list(stacked.split([w.shape[0] for w in weights]))
            except torch.linalg.LinAlgError as e:  # plain GPTQ for this group, said in the report
                ctx.notes.append(f"{group}: float targets skipped ({e})")
        C = None  # the cross term is spent: not held through the sweep (0.8 GB at width 14336)
        gsizes = {ctx.group_size(n) for n in group}
        result: object
        bad = nonfinite(hessian=H)
        if bad:
            result = FloatingPointError(bad)
        elif len(gsizes) != 1:  # cannot happen with a model-wide group size; be exact anyway
            result = None
        else:
            try:
                if cfg.refits == 0:
                    # nothing needs H after this sweep (its finiteness is checked above): handed
                    # over, so the sweep works in it instead of beside a copy of it
                    hand, H = Owned(H), None
                    result = gptq_grid(stacked, hand, gsizes.pop(), cfg.symmetric, cfg.damp,
                                       cfg.act_order, ctx.compute_dtype, clip_search=cfg.clip_search)
                    del hand
                else:
                    result = gptq_refined(stacked, H, gsizes.pop(), cfg.symmetric, cfg.damp,
                                          cfg.act_order, ctx.compute_dtype, cfg.clip_search, cfg.refits)
            except (torch.linalg.LinAlgError, FloatingPointError, RuntimeError) as e:
                result = e
        row = 0
        for n, w in zip(group, weights):
            r0, r1 = row, row + w.shape[0]
            row = r1

            def algorithm(n=n, w=w, r0=r0, r1=r1, result=result, H=H):   # called at once by install
                if isinstance(result, Exception):
                    raise result
                if result is None:
                    return gptq_refined(w, H, ctx.group_size(n), cfg.symmetric, cfg.damp, cfg.act_order,
                                        ctx.compute_dtype, cfg.clip_search, cfg.refits)
                codes, scale, zero = result
                return codes[r0:r1], scale[r0:r1], zero[r0:r1]

            ctx.install(n, algorithm, inputs={"hessian": H})
        del H, result, stacked
    del float_block


class GPTQ(CalibratedInt4):
    name = "gptq"
    block_algorithm = staticmethod(gptq_block)


register(GPTQ())
