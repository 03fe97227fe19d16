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
    block_k = min(block_k, k)
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
