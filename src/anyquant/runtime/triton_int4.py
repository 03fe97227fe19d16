"""Triton kernels for anyquant's int4 group-wise format (imported only on a CUDA device).

Both kernels read `Int4Linear.weight_packed` as it is saved (int32 [N, K/8], eight unsigned
nibbles u = q + 8 per word, low bits first), so the weights need no repacking; only the
per-group metadata is re-laid out once, to [K/g, N] so that a program's loads are contiguous:
  scale_t  [K/g, N]  the module's scale dtype (bf16 / fp16 / fp32)
  zero_t   [K/g, N]  uint8, the unsigned zero point zu = zp + 8

The math is exact up to float32 accumulation: for each group g,
  y[n] += s[n,g] * (sum_k u[n,k] x[k] - zu[n,g] * sum_k x[k])      (gemv, batch 1)
  Y[:,n] += s[n,g] * (X[:, g] @ (u[:, g] - zu[n,g]))              (gemm, tensor cores)
where u - zu is an integer in [-15, 15], exact in bf16/fp16, and each group's dot product is
accumulated in float32 before its scale is applied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    N, K: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_N output rows, the whole of K, BLOCK_K input columns per step.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    KW: tl.constexpr = BLOCK_K // 8
    GP: tl.constexpr = BLOCK_K // GROUP
    KWT = K // 8
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * KWT
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_rows + (k0 // 8 + tl.arange(0, KW))[None, :], mask=mask_n[:, None], other=0)
        x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        offs_g = k0 // GROUP + tl.arange(0, GP)
        s = tl.load(s_ptr + offs_g[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_g[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0).to(tl.float32)
        u = (w[:, :, None] >> shifts[None, None, :]) & 0xF          # [BN, KW, 8]
        u = tl.reshape(u, [BLOCK_N, GP, GROUP]).to(tl.float32)
        xg = tl.reshape(x, [1, GP, GROUP])
        dot = tl.sum(u * xg, axis=2)                                  # [BN, GP]
        xsum = tl.sum(xg, axis=2)                                     # [1, GP]
        acc += tl.sum(s * (dot - z * xsum), axis=1)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, stride_xm, stride_ym, K: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # One program: a BLOCK_M x BLOCK_N output tile, one group (GROUP input columns) per step;
    # with SPLIT_K > 1 the groups are shared among SPLIT_K programs that add into fp32 output.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    GW: tl.constexpr = GROUP // 8
    KWT = K // 8
    N_ITER: tl.constexpr = K // GROUP // SPLIT_K
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * KWT
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for gi in range(0, N_ITER):
        g = gi * SPLIT_K + pid_k
        w = tl.load(w_cols + (g * GW + tl.arange(0, GW))[:, None], mask=mask_n[None, :], other=0)  # [GW, BN]
        u = (w[:, None, :] >> shifts[None, :, None]) & 0xF                                       # [GW, 8, BN]
        u = tl.reshape(u, [GROUP, BLOCK_N])
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        xb = tl.load(x_rows + g * GROUP + tl.arange(0, GROUP)[None, :], mask=mask_m[:, None], other=0.0)
        wq = (u - z[None, :]).to(tl.float32).to(xb.dtype)  # integer in [-15, 15], exact
        acc += tl.dot(xb, wq, out_dtype=tl.float32) * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


# ---- v2: interleaved layout, no int->float conversions ------------------------------------
# Weights are re-laid out once so that, inside each block of 8 groups (8 * GROUP input columns),
# word kw of a row holds nibble j = column j * GROUP + kw: the 8 nibbles of a word belong to 8
# different groups and every nibble position j reads a contiguous slice of x. A nibble becomes a
# float with one shift and one and/or (it is placed in mantissa bits 16..19 of 1.0, giving
# f = 1 + u / 128 exactly), and one FMA turns it into s * (u - zu) exactly:
#     s * (u - zu) = f * (128 s) - (128 + zu) s
# so each weight costs 2 integer and 2 float instructions (int->float conversion runs at a
# quarter of the integer rate on Hopper and was the bottleneck of the kernels above).

@triton.jit
def _nibble_as_float(w, J: tl.constexpr):
    if J < 4:
        v = (w << (16 - 4 * J)) & 0xF0000
    elif J == 4:
        v = w & 0xF0000
    else:
        v = (w >> (4 * J - 16)) & 0xF0000
    return (v | 0x3F800000).to(tl.float32, bitcast=True)   # 1 + u / 128


@triton.jit
def _int4_gemv_il_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    N, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, GROUP)
    NB: tl.constexpr = K // (8 * GROUP)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * (K // 8) + offs_w[None, :]
    acc = tl.zeros([BLOCK_N, GROUP], dtype=tl.float32)
    w_next = tl.load(w_rows, mask=mask_n[:, None], other=0, eviction_policy="evict_first")
    for b in range(NB):
        w = w_next
        if PREFETCH:
            w_next = tl.load(w_rows + (b + 1) * GROUP, mask=mask_n[:, None] & (b + 1 < NB), other=0,
                             eviction_policy="evict_first")
        else:
            if b + 1 < NB:
                w_next = tl.load(w_rows + (b + 1) * GROUP, mask=mask_n[:, None], other=0,
                                 eviction_policy="evict_first")
        for j in tl.static_range(8):
            g = b * 8 + j
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            xj = tl.load(x_ptr + g * GROUP + offs_w).to(tl.float32)
            f = _nibble_as_float(w, j)
            wv = f * (s * 128.0)[:, None] - ((z + 128.0) * s)[:, None]     # s * (u - zu)
            acc += wv * xj[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_gemm_il_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, stride_xm, stride_ym, K: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_w = tl.arange(0, GROUP)
    N_ITER: tl.constexpr = K // (8 * GROUP) // SPLIT_K
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * (K // 8) + offs_w[None, :]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_w[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for bi in range(N_ITER):
        b = bi * SPLIT_K + pid_k
        w = tl.load(w_rows + b * GROUP, mask=mask_n[:, None], other=0, eviction_policy="evict_first")
        for j in tl.static_range(8):
            g = b * 8 + j
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            xj = tl.load(x_rows + g * GROUP, mask=mask_m[:, None], other=0.0)
            f = _nibble_as_float(w, j)
            wq = (f * 128.0 - (z + 128.0)[:, None]).to(xj.dtype)          # u - zu, exact
            acc += tl.dot(xj, tl.trans(wq), out_dtype=tl.float32) * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


# ---- v3 (gemv_il2): the same interleaved layout, fewer instructions per weight --------------
# (1) One shift serves two nibbles: a float32 1.0 with a nibble OR-ed into mantissa bits
#     P..P+3 is f = 1 + u * 2^(P-23) exactly for P in 15..19, and w << 15, w << 7, w >> 1,
#     w >> 9 put nibble pairs (0,1), (2,3), (4,5), (6,7) at bits (15, 19): 4 shifts and 8
#     and-or (LOP3) per word, 1.5 integer instructions per weight instead of 1.9.
# (2) The scale leaves the inner loop: each thread sums f * x over its R consecutive words of
#     a group (one FMA per weight), then adds A * p - B * xs once per R weights, where
#     A = s * 2^(23-P), B = (zu + 2^(23-P)) * s and xs = sum of the same R inputs:
#     A p - B xs = s (sum u x - zu xs) exactly in real arithmetic. In float32 the two terms are
#     up to 2^8 larger than their difference, which costs up to 8 of float32's 24 bits: still
#     far below the bf16 rounding of the output (tests/test_runtime_gpu.py measures it).

@triton.jit
def _nibble_pair_float(w, J: tl.constexpr):
    if J < 2:
        v = w << 15
    elif J < 4:
        v = w << 7
    elif J < 6:
        v = w >> 1
    else:
        v = w >> 9
    if J % 2 == 0:
        v = (v & 0x78000) | 0x3F800000          # bits 15..18: f = 1 + u / 256
    else:
        v = (v & 0x780000) | 0x3F800000         # bits 19..22: f = 1 + u / 16
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_il2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    N, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    C: tl.constexpr = GROUP // R
    offs_w = tl.arange(0, C)[:, None] * R + tl.arange(0, R)[None, :]                 # [C, R]
    NB: tl.constexpr = K // (8 * GROUP)
    w_rows = w_ptr + offs_n[:, None, None].to(tl.int64) * (K // 8) + offs_w[None, :, :]  # [BN, C, R]
    acc = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    w_next = tl.load(w_rows, mask=mask_n[:, None, None], other=0, eviction_policy="evict_first")
    for b in range(NB):
        w = w_next
        w_next = tl.load(w_rows + (b + 1) * GROUP, mask=mask_n[:, None, None] & (b + 1 < NB), other=0,
                         eviction_policy="evict_first")
        for j in tl.static_range(8):
            g = b * 8 + j
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            xj = tl.load(x_ptr + g * GROUP + offs_w).to(tl.float32)                    # [C, R]
            f = _nibble_pair_float(w, j)                                               # [BN, C, R]
            p = tl.sum(f * xj[None, :, :], axis=2)                                     # [BN, C]
            xs = tl.sum(xj, axis=1)                                                    # [C]
            if j % 2 == 0:
                a = s * 256.0
                bb = (z + 256.0) * s
            else:
                a = s * 16.0
                bb = (z + 16.0) * s
            acc += a[:, None] * p - bb[:, None] * xs[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv_il2(x2: torch.Tensor, packed: dict, group_size: int, cfg: tuple[int, int, int]) -> torch.Tensor:
    """x2: [1, K] -> [1, N] on the interleaved layout. cfg = (BLOCK_N, num_warps, R)."""
    w, s, z = packed["w"], packed["scale_t"], packed["zero_t"]
    n, k = w.shape[0], x2.shape[1]
    block_n, warps, r = cfg
    x2 = x2.contiguous()
    y = torch.empty(1, n, device=x2.device, dtype=x2.dtype)
    _int4_gemv_il2_kernel[(triton.cdiv(n, block_n),)](
        x2, w, s, z, y, n, k, GROUP=group_size, BLOCK_N=block_n, R=r, num_warps=warps, num_stages=1,
    )
    return y


def interleave_ok(in_features: int, group_size: int) -> bool:
    return in_features % (8 * group_size) == 0 and group_size & (group_size - 1) == 0


def repack_interleaved(module, device: torch.device) -> dict:
    """Weights in the v2 layout plus the [K/g, N] metadata (see above)."""
    n, k, g = module.out_features, module.in_features, module.group_size
    u = module.codes().to(device).to(torch.int64) + 8                        # [N, K], 0..15
    u = u.reshape(n, k // (8 * g), 8, g).permute(0, 1, 3, 2)                 # [N, B, kw, j]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=device)
    w = (u << shifts).sum(dim=-1)                                            # [N, B, kw]
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(n, k // 8).contiguous()
    del u
    meta = repack_meta(module, device)
    meta["w"] = w
    return meta


def gemv_il(x2: torch.Tensor, packed: dict, group_size: int, cfg: tuple[int, int, int]) -> torch.Tensor:
    """x2: [1, K] -> [1, N]. cfg = (BLOCK_N, num_warps, PREFETCH)."""
    w, s, z = packed["w"], packed["scale_t"], packed["zero_t"]
    n, k = w.shape[0], x2.shape[1]
    block_n, warps, prefetch = cfg
    x2 = x2.contiguous()
    y = torch.empty(1, n, device=x2.device, dtype=x2.dtype)
    _int4_gemv_il_kernel[(triton.cdiv(n, block_n),)](
        x2, w, s, z, y, n, k, GROUP=group_size, BLOCK_N=block_n, PREFETCH=bool(prefetch),
        num_warps=warps, num_stages=1,
    )
    return y


def gemm_il(x2: torch.Tensor, packed: dict, group_size: int, cfg: tuple[int, int, int, int, int]) -> torch.Tensor:
    """x2: [M, K] -> [M, N]. cfg = (BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages)."""
    w, s, z = packed["w"], packed["scale_t"], packed["zero_t"]
    n, k = w.shape[0], x2.shape[1]
    m = x2.shape[0]
    block_m, block_n, split_k, warps, stages = cfg
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    while (k // (8 * group_size)) % split_k:
        split_k -= 1
    x2 = x2.contiguous()
    if split_k == 1:
        y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    else:
        y = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _int4_gemm_il_kernel[grid](
        x2, w, s, z, y, m, n, x2.stride(0), y.stride(0), k,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages,
    )
    return y if split_k == 1 else y.to(x2.dtype)


def repack_meta(module, device: torch.device) -> dict:
    """Scale and unsigned zero point laid out [K/g, N] for the kernels above."""
    scale = module.weight_scale.to(device)
    zu = (module.zero_points().to(device).to(torch.int16) + 8).to(torch.uint8)
    return {
        "w": module.weight_packed.to(device).contiguous(),
        "scale_t": scale.t().contiguous(),
        "zero_t": zu.t().contiguous(),
    }


def gemv(x2: torch.Tensor, packed: dict, group_size: int, cfg: tuple[int, int, int, int]) -> torch.Tensor:
    """x2: [1, K] -> [1, N]. cfg = (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    w, s, z = packed["w"], packed["scale_t"], packed["zero_t"]
    n, k = w.shape[0], x2.shape[1]
    block_n, block_k, warps, stages = cfg
    block_k = min(block_k, triton.next_power_of_2(k))
    while k % block_k or block_k < group_size:
        block_k //= 2
        if block_k < group_size:
            raise ValueError(f"K={k} not divisible into blocks of whole groups of {group_size}")
    x2 = x2.contiguous()
    y = torch.empty(1, n, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, block_n),)
    _int4_gemv_kernel[grid](
        x2, w, s, z, y, n, k,
        GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return y


def gemm(x2: torch.Tensor, packed: dict, group_size: int, cfg: tuple[int, int, int, int, int]) -> torch.Tensor:
    """x2: [M, K] -> [M, N]. cfg = (BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages)."""
    w, s, z = packed["w"], packed["scale_t"], packed["zero_t"]
    n, k = w.shape[0], x2.shape[1]
    m = x2.shape[0]
    block_m, block_n, split_k, warps, stages = cfg
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    while (k // group_size) % split_k:
        split_k //= 2
    x2 = x2.contiguous()
    if split_k == 1:
        y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    else:
        y = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _int4_gemm_kernel[grid](
        x2, w, s, z, y, m, n, x2.stride(0), y.stride(0), k,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages,
    )
    return y if split_k == 1 else y.to(x2.dtype)
