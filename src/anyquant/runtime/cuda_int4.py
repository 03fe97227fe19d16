"""`cuda_gemv` and `cuda_mma`: anyquant's batch-1 int4 GEMVs in CUDA C++ (runtime/cuda_int4_gemv.cu).

`cuda_gemv` dequantizes with fp32 FMAs (any group that is a multiple of 32); `cuda_mma` turns two
nibbles into a bf16x2 register with one LOP3 and multiplies on the tensor cores (mma.sync
m16n8k16, fp32 accumulation; groups that are multiples of 128). Both read the same buffers.

The same extension also holds runtime.attention's decode-attention kernel (cuda_attention.cu).

Built with `torch.utils.cpp_extension.load_inline` the first time it is needed on a CUDA
device where nvcc is present (never at import); torch caches the build under its extensions
directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), keyed by a hash of the
sources and the target architecture, so later processes load the cached library. If nvcc or
CUDA is missing, or the build fails, `available()` is False (the failure is warned once) and
kernel dispatch skips `cuda_gemv`.

Layout (built once per module and device, `repack`): the weights are read as they are saved
(`weight_packed`, int32 [N, K/8], 16-byte aligned rows when K % 32 == 0: no copy); the group
metadata becomes one uint32 per (row, group): the float32 bits of the 16-bit scale (whose low
13 bits are 0) with the low 4 bits replaced by the unsigned zero point zu = zp + 8 -- 0.25 bits
per weight at group 128, the same as the saved scale and zero point.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cuda_int4_gemv.cu")
_SRC_ATTN = Path(__file__).with_name("cuda_attention.cu")   # runtime/attention.py's decode kernel
_SRC_STREAM = Path(__file__).with_name("cuda_int4_stream.cu")  # cuda_stream (uses the mma helpers)

_CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

const char* anyquant_int4_gemv_launch(const void* x, const void* w, const void* meta, void* y, int N, int K, int G,
                                      int chunks_per_group, int R, int U, int warps, int ctas_per_sm, int pdl,
                                      void* stream);
const char* anyquant_int4_mma_launch(const void* x, const void* w, const void* meta, void* y, int N, int K, int G,
                                     int blocks_per_group, int pipe, int depth, int RT, int S, int ctas_per_sm,
                                     int pdl, void* stream);

const char* anyquant_int4_stream_launch(const void* x, const void* units, void* y, int N, int K, int S, int W,
                                        int ctas_per_sm, int pdl, int carveout, void* stream);

const char* anyquant_decode_attention_launch(const void* q, const void* k, const void* v, const void* mask, void* out,
                                             void* part, void* counters, int Hkv, int G, int L, long long k_sh,
                                             long long k_sl, long long v_sh, long long v_sl, float scale,
                                             void* stream);
int anyquant_decode_attention_part_floats(int Hkv, int G, int L);

// q [Hq, 128], k / v [Hkv, L, 128] (any head and position strides, last dimension contiguous),
// mask uint8 [L], counters int32 [>= Hkv] (zero; left zero) -> out [Hq, 128]
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask,
                               torch::Tensor counters, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && mask.is_cuda() && counters.is_cuda(),
              "decode_attention: CUDA tensors expected");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16 && mask.scalar_type() == torch::kUInt8 &&
              counters.scalar_type() == torch::kInt32, "decode_attention: dtypes");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && v.dim() == 3 && mask.dim() == 1, "decode_attention: ranks");
  TORCH_CHECK(q.is_contiguous() && mask.is_contiguous() && q.size(1) == 128 && k.size(2) == 128 && v.size(2) == 128,
              "decode_attention: head_dim 128, contiguous q and mask");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) % 4 == 0 && v.stride(1) % 4 == 0 &&
              k.stride(0) % 4 == 0 && v.stride(0) % 4 == 0, "decode_attention: 8-byte aligned k / v rows");
  const int64_t Hkv = k.size(0), L = k.size(1), Hq = q.size(0);
  TORCH_CHECK(v.size(0) == Hkv && v.size(1) == L && mask.size(0) == L && Hq % Hkv == 0 && counters.numel() >= Hkv,
              "decode_attention: shapes");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 8 == 0 && reinterpret_cast<uintptr_t>(k.data_ptr()) % 8 == 0 &&
              reinterpret_cast<uintptr_t>(v.data_ptr()) % 8 == 0, "decode_attention: 8-byte aligned tensors");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({Hq, 128}, q.options());
  auto part = torch::empty({anyquant_decode_attention_part_floats((int)Hkv, (int)(Hq / Hkv), (int)L)},
                           q.options().dtype(torch::kFloat32));
  const char* err = anyquant_decode_attention_launch(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(),
                                                     out.data_ptr(), part.data_ptr(), counters.data_ptr(), (int)Hkv,
                                                     (int)(Hq / Hkv), (int)L, k.stride(0), k.stride(1), v.stride(0),
                                                     v.stride(1), (float)scale,
                                                     (void*)c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "decode_attention launch failed: ", err ? err : "");
  return out;
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor meta, int64_t group, int64_t R, int64_t U,
                   int64_t warps, int64_t ctas_per_sm, int64_t pdl) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && meta.is_cuda(), "cuda_gemv: CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "cuda_gemv: bfloat16 activations expected");
  TORCH_CHECK(w.scalar_type() == torch::kInt32 && meta.scalar_type() == torch::kInt32, "cuda_gemv: int32 buffers");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && meta.is_contiguous(), "cuda_gemv: contiguous tensors");
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(x.numel() == K, "cuda_gemv: batch 1 only");
  TORCH_CHECK(K % 32 == 0 && w.size(1) * 8 == K && group % 32 == 0 && K % group == 0, "cuda_gemv: shape");
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == K / group, "cuda_gemv: metadata shape");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "cuda_gemv: 16-byte aligned x and weights expected");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({1, N}, x.options());
  const char* err = anyquant_int4_gemv_launch(x.data_ptr(), w.data_ptr(), meta.data_ptr(), y.data_ptr(), (int)N, (int)K,
                                              (int)(K / group), (int)(group / 32), (int)R, (int)U, (int)warps, (int)ctas_per_sm, (int)pdl,
                                              (void*)c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "cuda_gemv launch failed: ", err ? err : "");
  return y;
}

// units: int32, ceil(N / 16) * K / 128 units of 272 words (cuda_int4.repack_units)
torch::Tensor gemv_stream(torch::Tensor x, torch::Tensor units, int64_t N, int64_t S, int64_t W, int64_t ctas_per_sm,
                          int64_t pdl, int64_t carveout) {
  TORCH_CHECK(x.is_cuda() && units.is_cuda(), "cuda_stream: CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "cuda_stream: bfloat16 activations expected");
  TORCH_CHECK(units.scalar_type() == torch::kInt32, "cuda_stream: int32 units");
  TORCH_CHECK(x.is_contiguous() && units.is_contiguous(), "cuda_stream: contiguous tensors");
  const int64_t K = x.size(-1), tiles = (N + 15) / 16;
  TORCH_CHECK(x.numel() == K, "cuda_stream: batch 1 only");
  TORCH_CHECK(K % 128 == 0 && units.numel() == tiles * (K / 128) * 272,
              "cuda_stream: shape (units must come from cuda_int4.repack_units for this N and K)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(units.data_ptr()) % 16 == 0,
              "cuda_stream: 16-byte aligned x and units expected");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({1, N}, x.options());
  const char* err = anyquant_int4_stream_launch(x.data_ptr(), units.data_ptr(), y.data_ptr(), (int)N, (int)K, (int)S,
                                                (int)W, (int)ctas_per_sm, (int)pdl, (int)carveout,
                                                (void*)c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "cuda_stream launch failed: ", err ? err : "");
  return y;
}

torch::Tensor gemv_mma(torch::Tensor x, torch::Tensor w, torch::Tensor meta, int64_t group, int64_t pipe,
                       int64_t depth, int64_t RT, int64_t S, int64_t ctas_per_sm, int64_t pdl) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && meta.is_cuda(), "cuda_mma: CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "cuda_mma: bfloat16 activations expected");
  TORCH_CHECK(w.scalar_type() == torch::kInt32 && meta.scalar_type() == torch::kInt32, "cuda_mma: int32 buffers");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && meta.is_contiguous(), "cuda_mma: contiguous tensors");
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(x.numel() == K, "cuda_mma: batch 1 only");
  TORCH_CHECK(K % 128 == 0 && w.size(1) * 8 == K && group % 128 == 0 && K % group == 0, "cuda_mma: shape");
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == K / group, "cuda_mma: metadata shape");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "cuda_mma: 16-byte aligned x and weights expected");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({1, N}, x.options());
  const char* err = anyquant_int4_mma_launch(x.data_ptr(), w.data_ptr(), meta.data_ptr(), y.data_ptr(), (int)N, (int)K,
                                             (int)(K / group), (int)(group / 128), (int)pipe, (int)depth, (int)RT, (int)S,
                                             (int)ctas_per_sm, (int)pdl, (void*)c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "cuda_mma launch failed: ", err ? err : "");
  return y;
}
"""

# Compiled (rows per warp R, chunks per step U) variants; see the .cu file. A launch
# configuration is (R, U, warps per block, CTAs per multiprocessor, programmatic dependent launch).
VARIANTS = ((1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2))
MAX_K = 48 * 1024  # x is staged as fp32 in shared memory: 4 K bytes per CTA (<= 192 KiB)
SUPPORTED_GROUPS = (32, 64, 96, 128, 160, 192, 224, 256)

_failed: str | None = None


# cuda_mma (the tensor-core GEMV in the same .cu file): a launch configuration is (pipe, depth,
# RT row tiles of 16 rows per CTA, S warps along K per CTA, CTAs per multiprocessor (0: one CTA
# per CTA tile), programmatic dependent launch); pipe 0 keeps the next `depth` (= U) steps' loads
# in registers, pipe 1 copies `depth` (= P) steps ahead into shared memory with cp.async.
MMA_UNROLLS = (1, 2, 4, 8)      # pipe 0 depths compiled
MMA_STAGES = (3, 4, 6, 8)       # pipe 1 depths compiled
MMA_MAX_K = 64 * 1024  # x staged as bf16: 2 K bytes + K / 16 per CTA


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME as home

    cand = os.path.join(home, "bin", "nvcc") if home else None
    if cand and os.path.exists(cand):
        return cand
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def build_extension(arch: str, extra_cpp: str = "", extra_functions: tuple[str, ...] = (),
                    defines: tuple[str, ...] = ()):
    """The extension for one architecture ("90" for sm_90), built once per process. extra_cpp /
    extra_functions / defines build a variant under its own name (runtime.stream_trace: the
    kernels with timestamps); launch through a variant with KernelSettings.cuda_extension."""
    from torch.utils.cpp_extension import load_inline

    cu = _SRC.read_text() + "\n" + _SRC_STREAM.read_text() + "\n" + _SRC_ATTN.read_text()
    flags = [f"-D{d}" for d in defines]
    digest = hashlib.sha1((cu + _CPP + extra_cpp + " ".join(flags)).encode()).hexdigest()[:12]
    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
    return load_inline(
        name=f"anyquant_cuda_int4_{digest}_sm{arch}",
        cpp_sources=[_CPP + extra_cpp],
        cuda_sources=[cu],
        functions=["gemv", "gemv_mma", "gemv_stream", "decode_attention", *extra_functions],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", gencode, "-std=c++17", *flags],
        verbose=os.environ.get("ANYQUANT_VERBOSE_BUILD") == "1",
    )


def module_for(device: torch.device):
    """The built extension for this device's architecture (builds it on first call)."""
    major, minor = torch.cuda.get_device_capability(device)
    return build_extension(f"{major}{minor}")


def available(device: torch.device) -> bool:
    """nvcc present, a CUDA device of compute capability >= 8.0, and the extension builds."""
    global _failed
    if _failed is not None:
        return False
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if nvcc_path() is None:
        _failed = "nvcc not found"
        return False
    try:
        module_for(device)
    except Exception as exc:  # a failed build disables the kernel, once, loudly
        _failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"anyquant cuda_gemv disabled: building the CUDA extension failed: {_failed[:2000]}")
        return False
    return True


def shape_ok(in_features: int, group_size: int) -> bool:
    return in_features % 32 == 0 and group_size in SUPPORTED_GROUPS and in_features <= MAX_K


def mma_shape_ok(in_features: int, group_size: int) -> bool:
    per = group_size // 128
    return (in_features % 128 == 0 and group_size % 128 == 0 and per & (per - 1) == 0
            and in_features <= MMA_MAX_K)


def repack(module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, metadata) for the kernel: the saved packed weights (no copy when already on
    the device and contiguous) and uint32 [N, K/g] = float32 bits of the scale | zu."""
    w = module.weight_packed.to(device)
    if not w.is_contiguous() or w.data_ptr() % 16:
        w = w.contiguous().clone()
    scale = module.weight_scale.to(device).float()
    bits = scale.view(torch.int32)
    if (bits & 0x1FFF).any():
        raise ValueError("cuda_gemv: scales must be 16-bit numbers (bf16 / fp16)")
    zu = (module.zero_points().to(device).to(torch.int32) + 8)
    meta = ((bits & ~0xF) | zu).contiguous()
    return w, meta


def gemv(x2: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], group_size: int,
         cfg: tuple[int, int, int, int, int], extension=None) -> torch.Tensor:
    """y [1, N] = x2 [1, K] @ W^T; cfg = (R, U, warps per block, CTAs per SM, pdl). extension:
    the build to launch from (default: `module_for` the input's device)."""
    w, meta = packed
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous().clone()
    r, u, warps, cps, pdl = cfg
    if pdl and torch.cuda.get_device_capability(x2.device) < (9, 0):
        pdl = 0
    return (extension or module_for(x2.device)).gemv(x2, w, meta, group_size, r, u, warps, cps, pdl)


def gemv_mma(x2: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], group_size: int,
             cfg: tuple[int, int, int, int, int, int], extension=None) -> torch.Tensor:
    """y [1, N] = x2 [1, K] @ W^T on the tensor cores; cfg = (pipe, depth, RT, S, CTAs per SM,
    pdl). Same packed buffers as `gemv` (`repack`); extension as for `gemv`."""
    w, meta = packed
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous().clone()
    pipe, depth, rt, s, cps, pdl = cfg
    if pdl and torch.cuda.get_device_capability(x2.device) < (9, 0):
        pdl = 0
    return (extension or module_for(x2.device)).gemv_mma(x2, w, meta, group_size, pipe, depth, rt, s, cps, pdl)


# cuda_stream (cuda_int4_stream.cu): the same math as cuda_mma over a tile-contiguous copy of the
# weights, streamed by the bulk-copy engine across kernel boundaries (sm_90). A launch
# configuration is (S stages, W consumer warps per CTA = units per stage, CTAs per
# multiprocessor, programmatic dependent launch).
STREAM_STAGES = (2, 3, 4, 5, 6, 8)  # compiled S
# The L1 / shared-memory split every cuda_stream launch asks for, in percent of the most shared
# memory (-1: the driver picks per launch from its shared memory; see the launcher for why one
# split for all). The launcher sets the attribute once per compiled variant and device and keeps
# it, so another split (kernels.use_kernels(stream_carveout=...)) takes effect only before the
# first launch.
STREAM_CARVEOUT = 100
UNIT_WORDS = 272  # int32 per unit: 16 rows x 128 columns of nibbles (256) + 16 metadata words


def stream_smem_bytes(n: int, k: int, cfg: tuple[int, int, int, int], sms: int) -> int:
    """Shared memory of one cuda_stream CTA (as the launcher computes it): x staged (264 bytes
    per 128 columns), the partial-sum slots (tiles per CTA x W x 64 bytes), the ring (S x W
    units) and 2 S mbarriers."""
    stages, warps, cps, _ = cfg
    nb, tiles = k // 128, (n + 15) // 16
    grid = min(sms * max(cps, 1), tiles)
    tpc = -(-tiles // grid)
    return (((nb * 264 + 15) & ~15) + tpc * warps * 64 + stages * warps * 1088 + 7) // 8 * 8 + 16 * stages


def stream_shape_ok(n: int, k: int, group_size: int, cfg: tuple[int, int, int, int], sms: int) -> bool:
    return (k % 128 == 0 and group_size % 128 == 0 and cfg[0] in STREAM_STAGES and 1 <= cfg[1] <= 31
            and stream_smem_bytes(n, k, cfg, sms) <= 227 * 1024)


def units_from_packed(w: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """The cuda_stream layout from the cuda_mma buffers (`repack`): int32 [tiles * NB * 272].

    Unit (T, b), tiles-major: word 4 * (32 h + 4 g + t) + i is word 4 (4 b + t) + i of row
    16 T + 8 h + g (h = 0, 1; so mma lane 4g + t finds its 16-byte chunks of rows g and g + 8 at
    vectors l and 32 + l), then meta[16 T + r, group(b)] for r = 0..15. Rows past N are zero
    (zero scale: they add nothing and are never written)."""
    n, kw = w.shape
    k = kw * 8
    nb = k // 128
    tiles = (n + 15) // 16
    pad = tiles * 16 - n
    if pad:
        w = torch.cat([w, w.new_zeros(pad, kw)])
        meta = torch.cat([meta, meta.new_zeros(pad, meta.shape[1])])
    # [tiles, h, g, NB, t, 4] -> [tiles, NB, h, g, t, 4]
    wu = w.view(tiles, 2, 8, nb, 4, 4).permute(0, 3, 1, 2, 4, 5).reshape(tiles, nb, 256)
    blocks_per_group = group_size // 128
    grp = torch.arange(nb, device=w.device) // blocks_per_group
    mu = meta.view(tiles, 16, -1)[:, :, grp].permute(0, 2, 1)  # [tiles, NB, 16]
    return torch.cat([wu, mu], dim=2).contiguous().view(-1)


def dense_from_units(units: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [n, k] weights a units array holds (tests: the layout against the module's own
    dequantization): w = scale * (u - zu) per nibble."""
    nb = k // 128
    tiles = (n + 15) // 16
    u = units.view(tiles, nb, UNIT_WORDS)
    words = u[:, :, :256].reshape(tiles, nb, 2, 8, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(tiles * 16, k // 8)
    shifts = torch.arange(0, 32, 4, device=units.device, dtype=torch.int32)
    nib = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(tiles * 16, k).float()
    m = u[:, :, 256:].permute(0, 2, 1).reshape(tiles * 16, nb)  # per 128-column block
    scale = (m & ~0xF).view(torch.float32)
    zu = (m & 0xF).float()
    w = (nib.view(tiles * 16, nb, 128) - zu.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(tiles * 16, k)[:n]


def repack_units(module, device: torch.device) -> torch.Tensor:
    """cuda_stream's tile-contiguous weights: about 4.25 bits per weight at group 128, a copy
    kept next to the saved buffers (built once per module and device)."""
    w, meta = repack(module, device)
    return units_from_packed(w, meta, module.group_size)


def stream_supported(device: torch.device) -> bool:
    """cp.async.bulk and mbarrier transaction counts need sm_90 (Hopper) or newer."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def gemv_stream(x2: torch.Tensor, units: torch.Tensor, n: int, cfg: tuple[int, int, int, int],
                carveout: int | None = None, extension=None) -> torch.Tensor:
    """y [1, n] = x2 [1, K] @ W^T from `repack_units`; cfg = (S stages, W warps, CTAs per SM, pdl).
    carveout: the L1 / shared-memory split (default STREAM_CARVEOUT; applied at a variant's first
    launch on a device, then kept); extension as for `gemv`."""
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous().clone()
    stages, warps, cps, pdl = cfg
    carveout = STREAM_CARVEOUT if carveout is None else carveout
    return (extension or module_for(x2.device)).gemv_stream(x2, units, n, stages, warps, cps, pdl, carveout)
