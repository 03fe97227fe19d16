"""Kernel choice for Int4Linear, per device and batch size.

On CPU the reference path runs: dequantize to the activation dtype, then one matmul.
On a CUDA device (compute capability 8.0 or newer) one of these runs:

  cuda_stream  cuda_mma's math over a tile-contiguous copy of the weights (sm_90): one CTA per
               multiprocessor owns whole 16-row tiles and one thread streams them with bulk
               copies, the first ones issued before waiting for the kernel ahead (programmatic
               dependent launch), so consecutive GEMVs keep DRAM busy across their boundaries
               (runtime/cuda_int4_stream.cu)
  cuda_mma     our CUDA C++ tensor-core GEMV (same file and build as cuda_gemv), batch 1, bf16,
               groups that are multiples of 128: LOP3 nibble -> bf16x2, mma.sync m16n8k16 with fp32
               accumulation, exact integer zero points (folded into per-block sums of x)
  cuda_gemv    our CUDA C++ GEMV (runtime/cuda_int4.py, cuda_int4_gemv.cu), batch 1, bf16: built
               with load_inline at first use where nvcc is present; reads the saved packed
               weights as they are, fp32 accumulation, exact integer zero points
  triton_gemv  our Triton GEMV (runtime/triton_int4.py), batch 1: reads the saved packed
               weights as they are, fp32 accumulation, exact integer zero points
  triton_gemv2 the same GEMV with fewer instructions per weight (interleaved layout only)
  triton_gemm  our Triton tensor-core kernel for batch > 1 (per-group fp32 accumulation)
  torch_int4   torch's built-in tinygemm kernel (torch.ops.aten._weight_int4pack_mm)
  gemlite      gemlite's A16W4 Triton kernels (PyPI `gemlite`), where it is installed

Which one runs is decided per batch size from the order in `_PREFERENCE`, which comes from
measurement on an H100 (benchmarks/speed_gpu.py, benchmarks/results/speed_gpu.json); the first
kernel that is available and supports the input wins. Each kernel's layout is built from the
module's saved buffers once per (kernel, device, dtype) and kept in `module._kernel_cache`,
so memory stays at about 4 bits per weight plus that one copy. GPU-only imports (triton,
gemlite) and the CUDA build happen inside functions, never when this module is imported.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

KERNELS = ("reference", "cuda_stream", "cuda_mma", "cuda_gemv", "triton_gemv", "triton_gemv2", "triton_gemm", "torch_int4", "gemlite")

# Measured order of preference on sm_90 (H100), per batch-size bucket; see the module doc.
# Batch 1: cuda_stream first on sm_90 (2026-11-24, H100: fused Linears about 1.53 ms vs 2.09 for
# cuda_mma; end to end, fused + whole step compiled, see docs/runtime.md),
# then cuda_mma (317.4 tok/s with it vs 304.6 with torch_int4 first in the same process).
# Buckets: 1, 2..16, 17+. Every GPU kernel also needs compute capability >= 8.0.
# H100, 2026-11-24, us per matmul (32 layers' matrices of one shape in one CUDA graph):
#   batch 1   (N, K) =        (1024, 4096) (4096, 4096) (6144, 4096) (14336, 4096) (28672, 4096) (4096, 14336)
#             torch_int4          5.3          7.1          9.8          17.8          32.8          18.2
#             triton_gemv         5.0          9.3         12.6          25.1          46.2          26.5
#             triton_gemv2        6.6         10.3         14.1          28.1          52.0          30.9
#             gemlite             5.3          9.2         11.6          22.1          40.6          22.1
#             (gemlite's batch-1 path also has 1e-2 to 4e-2 relative error). (6144, 4096) and
#             (28672, 4096) are the fused q/k/v and gate/up of anyquant.runtime.fuse.
#   batch 16  triton_gemm         9.2         13.8         16.4          30.8          53.3          33.1
#             gemlite             6.2         13.7         16.6          37.9          65.9          37.6
#             torch_int4          7.9         21.3         34.8          66.6         129.9          67.9
#             bf16 (cuBLAS)       8.3         16.5         21.3          42.5          83.0          45.2
_PREFERENCE = {
    1: ("cuda_stream", "cuda_mma", "torch_int4", "cuda_gemv", "triton_gemv", "triton_gemv2", "triton_gemm", "gemlite"),
    16: ("triton_gemm", "gemlite", "torch_int4"),
    None: ("triton_gemm", "gemlite", "torch_int4"),
}
# Where gemlite measured faster at batch 2..16: small out_features (k_proj / v_proj).
_SMALL_N_PREFERENCE_16 = ("gemlite", "triton_gemm", "torch_int4")
_SMALL_N = 2048

# Triton launch configurations per (N, K), measured on an H100 (benchmarks/speed_gpu.py --tune).
# gemv: (BLOCK_N, BLOCK_K, num_warps, num_stages); gemm: (BLOCK_M, BLOCK_N, SPLIT_K, warps, stages).
# "il" is the interleaved layout (in_features a multiple of 8 * group_size: every Llama shape);
# the plain kernels read the saved layout directly and serve the other shapes.
# gemv_il: (BLOCK_N, num_warps, PREFETCH); gemv: (BLOCK_N, BLOCK_K, num_warps, num_stages);
# gemm / gemm_il: (BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages).
_GEMV_IL_CFG: dict[tuple[int, int], tuple[int, int, int]] = {
    (1024, 4096): (1, 1, 1), (4096, 4096): (2, 1, 1), (4096, 14336): (2, 1, 1), (14336, 4096): (2, 1, 1),
}
_GEMV_IL_DEFAULT = (2, 1, 1)
# gemv_il2: (BLOCK_N, num_warps, R words per thread and group). Best of the --tune sweep on an
# H100 (2026-11-24), us per matmul: (4096, 4096) 9.57, (6144, 4096) 13.41, (4096, 14336) 29.30,
# (28672, 4096) 51.10 -- still slower than triton_gemv and torch_int4 (the table above was
# measured with the default (2, 1, 4)).
_GEMV_IL2_CFG: dict[tuple[int, int], tuple[int, int, int]] = {
    (4096, 4096): (1, 1, 4), (6144, 4096): (1, 1, 4), (4096, 14336): (1, 1, 4), (28672, 4096): (8, 2, 8),
}
_GEMV_IL2_DEFAULT = (2, 1, 4)
# cuda_gemv: (rows per warp R, chunks per step U, warps per block, CTAs per multiprocessor,
# programmatic dependent launch); the (R, U) pairs compiled are cuda_int4.VARIANTS.
# Best of `speed_gpu.py --tune cuda` on an H100 (2026-11-24), us per matmul (32 or 64 matrices of
# the shape in one CUDA graph), cuda_gemv vs torch_int4 timed the same way:
#   (1024, 4096) 2.76 vs 5.23; (4096, 4096) 6.20 vs 6.90; (6144, 4096) 8.86 vs 9.88;
#   (14336, 4096) 18.00 vs 18.08; (28672, 4096) 32.26 vs 32.79; (4096, 14336) 19.77 vs 18.50.
_CUDA_GEMV_CFG: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (1024, 4096): (1, 4, 8, 4, 1), (4096, 4096): (2, 4, 8, 2, 1), (4096, 14336): (1, 2, 8, 0, 1),
    (6144, 4096): (2, 4, 8, 0, 1), (14336, 4096): (2, 4, 4, 0, 1), (28672, 4096): (2, 4, 4, 0, 1),
}
_CUDA_GEMV_DEFAULT = (1, 4, 8, 2, 1)
# Shapes (out_features, in_features) where cuda_gemv is tried before torch_int4 at batch 1.
# Empty: at kernel level cuda_gemv was faster on every shape but down_proj (the graph of the
# Linears alone: fused 2.111 ms with it on those shapes vs 2.182 torch_int4), yet end to end the
# fused compiled int4 decode ran 288.9 tok/s with it against 303.1 with torch_int4 alone (H100,
# 2026-11-24), so dispatch keeps torch_int4 first. The measured set was
#   {(1024, 4096), (4096, 4096), (6144, 4096), (14336, 4096), (28672, 4096)}.
_CUDA_GEMV_PREFERRED: set[tuple[int, int]] = set()
# cuda_mma: (pipe, depth, RT row tiles of 16 rows per CTA, S warps along K per CTA, CTAs per
# multiprocessor (0: one CTA per tile), programmatic dependent launch); pipe 0 holds the next
# depth (U) blocks' loads in registers, pipe 1 copies depth (P) steps ahead with cp.async.
# Tuned on an H100 (2026-11-24, `speed_gpu.py --tune mma --tune-objective after_elementwise`): the
# best of the 12 fastest back-to-back configurations re-timed with each matmul after an
# elementwise kernel that rewrites x (as in the model, where programmatic dependent launch cannot
# overlap a GEMV with the kernel before it). us per matmul, after elementwise / back to back:
#   (1024, 4096) 4.20 / 2.83; (4096, 4096) 7.32 / 5.72; (6144, 4096) 8.53 / 8.6;
#   (14336, 4096) 17.07 / 15.3; (28672, 4096) 29.58 / 27.80; (4096, 14336) 16.64 / 15.53.
# (The best back to back: 2.81, 5.69, 8.07, 15.20, 27.59, 15.47.) The cp.async pipeline (pipe 1)
# won only on down_proj; on gate_up it was 8% slower than the register pipeline (29.97 vs 27.59).
_CUDA_MMA_CFG: dict[tuple[int, int], tuple[int, int, int, int, int, int]] = {
    (1024, 4096): (0, 4, 1, 16, 2, 1), (4096, 4096): (0, 1, 1, 16, 2, 1), (6144, 4096): (0, 1, 1, 8, 0, 1),
    (14336, 4096): (0, 1, 2, 4, 0, 1), (28672, 4096): (0, 4, 1, 8, 0, 1), (4096, 14336): (1, 3, 1, 16, 2, 1),
}
_CUDA_MMA_DEFAULT = (0, 1, 1, 16, 2, 1)
# cuda_stream: (S stages, W consumer warps per CTA = units per stage, CTAs per multiprocessor,
# programmatic dependent launch).
_CUDA_STREAM_CFG: dict[tuple[int, int], tuple[int, int, int, int]] = {}
# Measured on an H100 (2026-11-24, `speed_gpu.py --stream-sequence`, each layout's whole sequence in
# one graph): one configuration for every shape, since consecutive GEMVs overlap only where their
# CTAs fit on a multiprocessor together and the per-shape bests (each shape back to back) lose in
# the mixed sequence. The kernel is held to 56 registers, so two CTAs of W = 16 fit on one
# multiprocessor: at 2 CTAs per multiprocessor one launch is one wave and a CTA of the next GEMV
# starts streaming as soon as one of this GEMV's leaves. (3, 16, 2) measured fused 1.528 / 1.542 ms
# and separate 1.793 / 1.809 ms in two processes; (5, 16, 1) was as fast fused (1.526 / 1.529) but
# 2.14 separate (benchmarks/results/speed_gpu.json "stream_sequence").
_CUDA_STREAM_DEFAULT = (3, 16, 2, 1)
_GEMV_CFG: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (1024, 4096): (2, 1024, 4, 3), (4096, 4096): (8, 1024, 4, 3),
    (4096, 14336): (8, 1024, 4, 3), (14336, 4096): (16, 1024, 4, 1),
}
_GEMV_DEFAULT = (8, 1024, 4, 3)
_GEMM_IL_CFG: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (1024, 4096): (16, 32, 4, 4, 2), (4096, 4096): (16, 32, 2, 4, 2),
    (4096, 14336): (16, 32, 2, 4, 2), (14336, 4096): (16, 64, 1, 4, 2),
}
_GEMM_IL_DEFAULT = (16, 32, 2, 4, 2)
_GEMM_CFG: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (1024, 4096): (16, 32, 8, 4, 3), (4096, 4096): (16, 64, 4, 4, 4),
    (4096, 14336): (16, 64, 4, 4, 4), (14336, 4096): (16, 64, 4, 4, 4),
}
_GEMM_DEFAULT = (16, 64, 4, 4, 4)


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    w = module.dequantized_weight(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)


@functools.lru_cache(maxsize=None)
def gemlite_installed() -> bool:
    return importlib.util.find_spec("gemlite") is not None


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _stream_cfg(n: int, k: int) -> tuple[int, int, int, int]:
    return _CUDA_STREAM_CFG.get((n, k), _CUDA_STREAM_DEFAULT)


def _bucket(batch: int):
    return 1 if batch == 1 else (16 if batch <= 16 else None)


def supports(name: str, module, x: torch.Tensor) -> bool:
    """Whether kernel `name` can run this module on this input (device, dtype, shapes)."""
    if name == "reference":
        return True
    if x.device.type != "cuda" or _capability(x.device.index or 0) < (8, 0):
        return False
    k, n, g = module.in_features, module.out_features, module.group_size
    batch = x.numel() // x.shape[-1]
    if name == "cuda_stream":
        from anyquant.runtime import cuda_int4

        return (batch == 1 and x.dtype == torch.bfloat16 and _capability(x.device.index or 0) >= (9, 0)
                and cuda_int4.stream_shape_ok(n, k, g, _stream_cfg(n, k), _sm_count(x.device.index or 0))
                and cuda_int4.available(x.device))
    if name == "cuda_mma":
        from anyquant.runtime import cuda_int4

        return (batch == 1 and x.dtype == torch.bfloat16 and cuda_int4.mma_shape_ok(k, g)
                and _capability(x.device.index or 0) >= (8, 0) and cuda_int4.available(x.device))
    if name == "cuda_gemv":
        from anyquant.runtime import cuda_int4

        return (batch == 1 and x.dtype == torch.bfloat16 and cuda_int4.shape_ok(k, g)
                and cuda_int4.available(x.device))
    if name == "triton_gemv":
        return triton_installed() and batch == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and g % 8 == 0
    if name == "triton_gemv2":
        return triton_installed() and batch == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and _interleaved(module)
    if name == "triton_gemm":
        return triton_installed() and x.dtype in (torch.bfloat16, torch.float16) and g >= 16 and g & (g - 1) == 0
    if name == "torch_int4":
        return x.dtype == torch.bfloat16 and g in (32, 64, 128, 256) and k % 128 == 0 and n % 8 == 0
    if name == "gemlite":
        return gemlite_installed() and x.dtype in (torch.bfloat16, torch.float16) and k % 32 == 0 and g >= 16
    raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")


def choose_kernel(module, x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "reference"
    batch = x.numel() // x.shape[-1]
    order = _PREFERENCE[_bucket(batch)]
    if batch == 1 and (module.out_features, module.in_features) in _CUDA_GEMV_PREFERRED:
        order = ("cuda_gemv",) + tuple(k for k in order if k != "cuda_gemv")
    if _bucket(batch) == 16 and module.out_features <= _SMALL_N:
        order = _SMALL_N_PREFERENCE_16
    for name in order:
        if supports(name, module, x):
            return name
    return "reference"


# ---- repacking (once per module, kernel, device and dtype) ----------------------------------

def _cached(module, key, build):
    cache = module._kernel_cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _pack_triton(module, device):
    from anyquant.runtime import triton_int4

    if triton_int4.interleave_ok(module.in_features, module.group_size):
        return triton_int4.repack_interleaved(module, device)
    return triton_int4.repack_meta(module, device)


def _interleaved(module) -> bool:
    k, g = module.in_features, module.group_size
    return k % (8 * g) == 0 and g & (g - 1) == 0


def _pack_torch_int4(module, device, dtype):
    """tinygemm layout: w = (u - 8) * scale + zero, u in [0, 15], zero in the float domain.

    Ours is w = (q - zp) * scale with q = u - 8, so zero = -zp * scale. That product is exact
    in float32 (an 8-bit-mantissa scale times a 4-bit integer); tinygemm takes scales and
    zeros in the activation dtype, so the zero is rounded once to bf16 there (<= 2^-9 relative).
    """
    codes = module.codes().to(device).to(torch.int32) + 8            # [N, K], 0..15
    w_uint8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    k = module.in_features
    inner_k_tiles = 8 if k % 1024 == 0 else (4 if k % 512 == 0 else 2)
    w_packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8.contiguous(), inner_k_tiles)
    scale = module.weight_scale.to(device).float()
    zero = -module.zero_points().to(device).float() * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/g, N, 2]
    return w_packed, sz


def _pack_gemlite(module, device, dtype):
    from gemlite import DType, GemLiteLinearTriton

    dt = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}[dtype]
    layer = GemLiteLinearTriton(
        W_nbits=4, group_size=module.group_size, in_features=module.in_features,
        out_features=module.out_features, input_dtype=dt, output_dtype=dt,
    )
    u = (module.codes().to(device).to(torch.int16) + 8).to(torch.uint8)
    zu = (module.zero_points().to(device).to(torch.float32) + 8).to(dtype)  # integers: exact
    # fma_mode=False keeps w = (u - zu) * scale exactly as saved (fma mode would fold -zu*scale
    # into one rounded number).
    layer.pack(u, module.weight_scale.to(device).to(dtype), zu, bias=None, fma_mode=False)
    return layer


# ---- forward per kernel ----------------------------------------------------------------------

def _run_cuda_gemv(module, x2):
    from anyquant.runtime import cuda_int4

    packed = _cached(module, ("cuda_gemv", str(x2.device)), lambda: cuda_int4.repack(module, x2.device))
    cfg = _CUDA_GEMV_CFG.get((module.out_features, module.in_features), _CUDA_GEMV_DEFAULT)
    return cuda_int4.gemv(x2, packed, module.group_size, cfg)


def _run_cuda_mma(module, x2):
    from anyquant.runtime import cuda_int4

    packed = _cached(module, ("cuda_gemv", str(x2.device)), lambda: cuda_int4.repack(module, x2.device))
    cfg = _CUDA_MMA_CFG.get((module.out_features, module.in_features), _CUDA_MMA_DEFAULT)
    return cuda_int4.gemv_mma(x2, packed, module.group_size, cfg)


def _run_cuda_stream(module, x2):
    from anyquant.runtime import cuda_int4

    units = _cached(module, ("cuda_stream", str(x2.device)), lambda: cuda_int4.repack_units(module, x2.device))
    return cuda_int4.gemv_stream(x2, units, module.out_features, _stream_cfg(module.out_features, module.in_features))


def _run_triton_gemv(module, x2):
    from anyquant.runtime import triton_int4

    packed = _cached(module, ("triton", str(x2.device)), lambda: _pack_triton(module, x2.device))
    shape = (module.out_features, module.in_features)
    if _interleaved(module):
        return triton_int4.gemv_il(x2, packed, module.group_size, _GEMV_IL_CFG.get(shape, _GEMV_IL_DEFAULT))
    return triton_int4.gemv(x2, packed, module.group_size, _GEMV_CFG.get(shape, _GEMV_DEFAULT))


def _run_triton_gemv2(module, x2):
    from anyquant.runtime import triton_int4

    packed = _cached(module, ("triton", str(x2.device)), lambda: _pack_triton(module, x2.device))
    shape = (module.out_features, module.in_features)
    return triton_int4.gemv_il2(x2, packed, module.group_size, _GEMV_IL2_CFG.get(shape, _GEMV_IL2_DEFAULT))


def _run_triton_gemm(module, x2):
    from anyquant.runtime import triton_int4

    packed = _cached(module, ("triton", str(x2.device)), lambda: _pack_triton(module, x2.device))
    shape = (module.out_features, module.in_features)
    if _interleaved(module):
        return triton_int4.gemm_il(x2, packed, module.group_size, _GEMM_IL_CFG.get(shape, _GEMM_IL_DEFAULT))
    return triton_int4.gemm(x2, packed, module.group_size, _GEMM_CFG.get(shape, _GEMM_DEFAULT))


def _run_torch_int4(module, x2):
    w_packed, sz = _cached(
        module, ("torch_int4", str(x2.device), x2.dtype),
        lambda: _pack_torch_int4(module, x2.device, x2.dtype),
    )
    return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), w_packed, module.group_size, sz)


def _run_gemlite(module, x2):
    layer = _cached(
        module, ("gemlite", str(x2.device), x2.dtype),
        lambda: _pack_gemlite(module, x2.device, x2.dtype),
    )
    return layer(x2)


_RUN = {
    "cuda_stream": _run_cuda_stream,
    "cuda_mma": _run_cuda_mma,
    "cuda_gemv": _run_cuda_gemv,
    "triton_gemv": _run_triton_gemv,
    "triton_gemv2": _run_triton_gemv2,
    "triton_gemm": _run_triton_gemm,
    "torch_int4": _run_torch_int4,
    "gemlite": _run_gemlite,
}


def prepare(module, x: torch.Tensor, kernel: str | None = None) -> str:
    """Build (and cache) the layout the chosen kernel needs, ahead of graph capture."""
    name = kernel or choose_kernel(module, x)
    int4_linear_forward(module, x, kernel=name)
    return name


def int4_linear_forward(module, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """y = x W^T + b for an Int4Linear; `kernel` forces one of KERNELS (tests, benchmarks)."""
    name = kernel or choose_kernel(module, x)
    if name == "reference":
        return reference_forward(module, x)
    if not supports(name, module, x):
        raise ValueError(
            f"kernel {name!r} cannot run Int4Linear(in={module.in_features}, out={module.out_features}, "
            f"group_size={module.group_size}) on a {x.dtype} input of shape {tuple(x.shape)} on {x.device}; "
            f"use kernel=None to let anyquant choose"
        )
    x2 = x.reshape(-1, x.shape[-1])
    y = _RUN[name](module, x2)
    if module.bias is not None:
        y = y + module.bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*x.shape[:-1], module.out_features)
