// Batch-1 int4 GEMV for anyquant's group-wise format (CUDA C++, built by runtime/cuda_int4.py
// with torch.utils.cpp_extension.load_inline at first use; no torch headers here).
//
// Inputs
//   x     bf16 [K]                        the activation row (16-byte aligned)
//   w     uint4 [N, K/32]                 Int4Linear.weight_packed as saved (int32 [N, K/8]:
//                                         eight nibbles u = q + 8 per word, column 8*word + j in
//                                         bits 4j..4j+3), read as 16-byte vectors: one vector is
//                                         32 consecutive columns of one row ("a chunk")
//   meta  uint32 [N, K/g]                 per (row, group): the float32 bits of the scale (a
//                                         bf16 / fp16 number, so its low 13 mantissa bits are 0)
//                                         with the low 4 bits replaced by zu = zp + 8
//   y     bf16 [N]
// Math (exact integer zero points, fp32 accumulation):
//   y[n] = sum over chunks c of  s[n, g(c)] * sum_{k in c} (u[n,k] - zu[n,g(c)]) * x[k]
// Each nibble becomes a float with one LOP3: (w & (0xF << 4p)) | 0x4B000000 = 2^23 + u * 2^(4p)
// (exact for p <= 4), and one FFMA turns that into the exact integer u - zu:
//   (2^23 + u 2^(4p)) * 2^(-4p) - (2^(23-4p) + zu) = u - zu.
// Nibbles 5..7 of a word are read at p = 2..4 of (w >> 12). So a weight costs 1 integer and
// 2 fp32 instructions (the second the FFMA into the chunk's fp32 sum); x is staged once per
// CTA in shared memory as fp32 (swizzled per 16 bytes, so that the 32 lanes reading 32
// different chunks hit distinct banks), and read once per chunk for R rows.
//
// Work split: a warp owns tiles of R consecutive rows and the whole of K; lane l reads chunks
// l, l + 32, l + 64, ... (each load instruction of the warp reads 512 contiguous bytes of a
// row), U chunks per row per step, the next step's loads in flight while a step is computed.
// The lanes' partial sums are added with warp shuffles; no split-K, no atomics.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace anyquant_int4 {

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ float nib(uint32_t src, int p) {
  return __uint_as_float((src & (0xFu << (4 * p))) | 0x4B000000u);
}

// sum_j (u_j - zu) * xv[j] for the 8 nibbles of one word, added to acc
__device__ __forceinline__ float dot8(uint32_t w, const float (&cz)[5], const float* xv, float acc) {
  const uint32_t wh = w >> 12;
  float d0 = fmaf(nib(w, 0), 1.0f, cz[0]);
  float d1 = fmaf(nib(w, 1), 0.0625f, cz[1]);
  float d2 = fmaf(nib(w, 2), 0.00390625f, cz[2]);
  float d3 = fmaf(nib(w, 3), 0.000244140625f, cz[3]);
  float d4 = fmaf(nib(w, 4), 0.0000152587890625f, cz[4]);
  float d5 = fmaf(nib(wh, 2), 0.00390625f, cz[2]);
  float d6 = fmaf(nib(wh, 3), 0.000244140625f, cz[3]);
  float d7 = fmaf(nib(wh, 4), 0.0000152587890625f, cz[4]);
  acc = fmaf(d0, xv[0], acc);
  acc = fmaf(d1, xv[1], acc);
  acc = fmaf(d2, xv[2], acc);
  acc = fmaf(d3, xv[3], acc);
  acc = fmaf(d4, xv[4], acc);
  acc = fmaf(d5, xv[5], acc);
  acc = fmaf(d6, xv[6], acc);
  acc = fmaf(d7, xv[7], acc);
  return acc;
}

template <int R, int U>
__device__ __forceinline__ void load_block(uint4 (&wa)[U][R], uint32_t (&ma)[U][R], const uint4* __restrict__ w,
                                           const uint32_t* __restrict__ meta, int tile, int blk, int lane, int N,
                                           int C, int G, uint32_t cpg_mul) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = lane + 32 * (blk * U + u);
    if (c < C) {
      const int g = (int)(((uint32_t)c * cpg_mul) >> 20);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = min(tile * R + r, N - 1);
        wa[u][r] = ld_stream(w + (size_t)row * C + c);
        ma[u][r] = __ldg(meta + (size_t)row * G + g);
      }
    }
  }
}

template <int R, int U>
__device__ __forceinline__ void compute_block(const uint4 (&wa)[U][R], const uint32_t (&ma)[U][R],
                                              const float4* __restrict__ xs, float (&acc)[R], int blk, int lane,
                                              int C) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = lane + 32 * (blk * U + u);
    if (c < C) {
      float xv[32];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float4 v = xs[c * 8 + (q ^ (c & 7))];
        xv[4 * q + 0] = v.x;
        xv[4 * q + 1] = v.y;
        xv[4 * q + 2] = v.z;
        xv[4 * q + 3] = v.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t m = ma[u][r];
        const float s = __uint_as_float(m & 0xFFFFFFF0u);
        const float zf = __uint_as_float((m & 0xFu) | 0x4B000000u) - 8388608.0f;  // zu, exact
        const float cz[5] = {-8388608.0f - zf, -524288.0f - zf, -32768.0f - zf, -2048.0f - zf, -128.0f - zf};
        float part = 0.0f;
        part = dot8(wa[u][r].x, cz, xv + 0, part);
        part = dot8(wa[u][r].y, cz, xv + 8, part);
        part = dot8(wa[u][r].z, cz, xv + 16, part);
        part = dot8(wa[u][r].w, cz, xv + 24, part);
        acc[r] = fmaf(s, part, acc[r]);
      }
    }
  }
}

template <int R>
__device__ __forceinline__ void finish_tile(float (&acc)[R], __nv_bfloat16* __restrict__ y, int tile, int lane, int N) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if (lane == r && tile * R + r < N) y[tile * R + r] = __float2bfloat16_rn(v);
    acc[r] = 0.0f;
  }
}

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A warp's work is a sequence of steps (tile, block of U chunks): tiles warp, warp + T, ...
// (T = warps in the grid), each tile of R rows split into ceil(ceil(C / 32) / U) blocks. The
// loads of step s + 1 are issued before step s is computed (two register buffers), also
// across tiles, so a warp always has one block of loads in flight. The launcher sizes the grid
// to one wave (x staged once per CTA) or to one tile per warp. With programmatic dependent launch
// the first loads (weights only, which no earlier kernel writes) go out before
// griddepcontrol.wait; x is read and y written only after it.
template <int R, int U>
__global__ void __launch_bounds__(256) gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ w,
                                                   const uint32_t* __restrict__ meta, __nv_bfloat16* __restrict__ y,
                                                   int N, int K, int G, uint32_t cpg_mul) {
  extern __shared__ float4 xs[];
  const int C = K >> 5;  // 16-byte chunks per row
  const int lane = threadIdx.x & 31;
  const int nwarps = blockDim.x >> 5;
  const int T = gridDim.x * nwarps;
  const int tiles = (N + R - 1) / R;
  const int nblk = (((C + 31) >> 5) + U - 1) / U;
  int t0 = blockIdx.x * nwarps + (threadIdx.x >> 5), b0 = 0;
  uint4 wa[U][R], wb[U][R];
  uint32_t ma[U][R], mb[U][R];
  if (t0 < tiles) load_block<R, U>(wa, ma, w, meta, t0, 0, lane, N, C, G, cpg_mul);

  grid_dependency_wait();
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  for (int v = threadIdx.x; v < (K >> 3); v += blockDim.x) {
    const uint4 raw = __ldg(x4 + v);  // x[8v .. 8v+7]
    const int c = v >> 2, q0 = (v & 3) * 2;
    float4 a, b;
    a.x = __uint_as_float(raw.x << 16);
    a.y = __uint_as_float(raw.x & 0xFFFF0000u);
    a.z = __uint_as_float(raw.y << 16);
    a.w = __uint_as_float(raw.y & 0xFFFF0000u);
    b.x = __uint_as_float(raw.z << 16);
    b.y = __uint_as_float(raw.z & 0xFFFF0000u);
    b.z = __uint_as_float(raw.w << 16);
    b.w = __uint_as_float(raw.w & 0xFFFF0000u);
    xs[c * 8 + (q0 ^ (c & 7))] = a;
    xs[c * 8 + ((q0 + 1) ^ (c & 7))] = b;
  }
  __syncthreads();
  grid_launch_dependents();
  if (t0 >= tiles) return;

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  while (true) {
    int t1 = t0, b1 = b0 + 1;
    if (b1 == nblk) { b1 = 0; t1 += T; }
    if (t1 < tiles) load_block<R, U>(wb, mb, w, meta, t1, b1, lane, N, C, G, cpg_mul);
    compute_block<R, U>(wa, ma, xs, acc, b0, lane, C);
    if (b0 == nblk - 1) finish_tile<R>(acc, y, t0, lane, N);
    if (t1 >= tiles) break;
    int t2 = t1, b2 = b1 + 1;
    if (b2 == nblk) { b2 = 0; t2 += T; }
    if (t2 < tiles) load_block<R, U>(wa, ma, w, meta, t2, b2, lane, N, C, G, cpg_mul);
    compute_block<R, U>(wb, mb, xs, acc, b1, lane, C);
    if (b1 == nblk - 1) finish_tile<R>(acc, y, t1, lane, N);
    if (t2 >= tiles) break;
    t0 = t2;
    b0 = b2;
  }
}

typedef void (*KernelFn)(const __nv_bfloat16*, const uint4*, const uint32_t*, __nv_bfloat16*, int, int, int, uint32_t);

// (R, U) variants compiled; the launcher picks one per call (runtime/cuda_int4.py's table)
#define ANYQUANT_INT4_VARIANTS(X) X(1, 2) X(1, 4) X(1, 8) X(2, 2) X(2, 4) X(4, 2)

static KernelFn pick(int R, int U) {
#define ANYQUANT_PICK(r, u) \
  if (R == r && U == u) return gemv_kernel<r, u>;
  ANYQUANT_INT4_VARIANTS(ANYQUANT_PICK)
#undef ANYQUANT_PICK
  return nullptr;
}

}  // namespace anyquant_int4

// Returns nullptr on success, else an error message. ctas_per_sm: the grid is at most
// ctas_per_sm (capped by occupancy) CTAs per multiprocessor, sized so that every warp gets the
// same number of tiles (0: one tile per warp, however many waves); pdl: launch with programmatic stream serialization (sm_90).
const char* anyquant_int4_gemv_launch(const void* x, const void* w, const void* meta, void* y, int N, int K, int G,
                                      int chunks_per_group, int R, int U, int warps, int ctas_per_sm, int pdl,
                                      void* stream) {
  using namespace anyquant_int4;
  KernelFn fn = pick(R, U);
  if (!fn) return "anyquant cuda_gemv: no compiled variant for this (rows, unroll)";
  if (warps < 1 || warps > 8) return "anyquant cuda_gemv: warps per block must be 1..8";
  const int smem = K * 4;
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 16) return "anyquant cuda_gemv: device index >= 16";
  static int smem_set[16][64];
  static int sms[16];
  static int occ[16][64][9];
  static int occ_smem[16][64][9];
  const int vid = R * 16 + U;
  if (smem > 48 * 1024 && smem > smem_set[dev][vid]) {
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    smem_set[dev][vid] = smem;
  }
  if (!sms[dev]) {
    cudaError_t e = cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  if (occ_smem[dev][vid][warps] != smem) {
    int nb = 0;
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fn, 32 * warps, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    if (nb < 1) return "anyquant cuda_gemv: no block fits on a multiprocessor";
    occ[dev][vid][warps] = nb;
    occ_smem[dev][vid][warps] = smem;
  }
  const int per_sm = ctas_per_sm < occ[dev][vid][warps] ? ctas_per_sm : occ[dev][vid][warps];
  const long tiles = (N + R - 1) / R;
  long warps_needed = tiles;  // ctas_per_sm == 0: one tile per warp, as many waves as that takes
  if (ctas_per_sm > 0) {
    const long max_warps = (long)sms[dev] * per_sm * warps;
    const long tiles_per_warp = (tiles + max_warps - 1) / max_warps;
    warps_needed = (tiles + tiles_per_warp - 1) / tiles_per_warp;
  }
  const int grid = (int)((warps_needed + warps - 1) / warps);
  const uint32_t cpg_mul = (uint32_t)(((1u << 20) + chunks_per_group - 1) / chunks_per_group);

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(32 * warps);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = (cudaStream_t)stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, fn, (const __nv_bfloat16*)x, (const uint4*)w, (const uint32_t*)meta,
                                     (__nv_bfloat16*)y, N, K, G, cpg_mul);
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
