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

// Launches a kernel with programmatic dependent launch when pdl is set (every launcher here does
// the same): nullptr on success, else the CUDA error string.
template <typename... Params, typename... Args>
static const char* anyquant_launch(void (*fn)(Params...), unsigned grid, unsigned threads, int smem, void* stream,
                                   int pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = (cudaStream_t)stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, fn, args...);
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
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

  return anyquant_launch(fn, (unsigned)grid, 32 * warps, smem, stream, pdl, (const __nv_bfloat16*)x, (const uint4*)w,
                         (const uint32_t*)meta, (__nv_bfloat16*)y, N, K, G, cpg_mul);
}

// ============================================================================================
// cuda_mma: batch-1 int4 GEMV on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 out), for
// groups that are a multiple of 128 and K % 128 == 0. Same inputs as gemv_kernel (the saved
// packed weights as they are, the scale|zu metadata).
//
// Dequantization: two nibbles (columns c and c + 4 of a word) become one bf16x2 register with one
// LOP3: (w' & mask) | 0x43004300 = (128 + u * 2^p, ...) where w' = w >> {0, 1, 8, 9} puts nibble
// j at bit p = 0 (j even) or 3 (j odd) of each 16-bit half: 128 + u or 128 + 8u, exact in bf16.
// So a weight costs 7/16 integer instructions (3 shifts + 4 LOP3 per word of one row) and 1/8 of
// an mma per lane, against 3 in gemv_kernel. The offset and the 8 are folded into x instead:
// x for odd nibbles is stored divided by 8 (exact), so the mma sums u * x + o * x over the 16
// columns of a k-step with o = 128 (even) or 16 (odd); per 128-column block b the x-only terms
// A_b = 128 * sum of the stored x' and B_b = sum of x are computed once per CTA, and
//   sum_k (u_k - zu) x_k = C - A_b - zu * B_b          (fp32; C = the mma's sum over the block)
//   y[n] += s[n, group(b)] * (C - A_b - zu * B_b)
// The cancellation of A_b costs about 5 of fp32's 24 bits (A_b is about 30 times the result),
// far under the output's bf16 rounding.
//
// Work split: a warp owns a 16-row tile (mma rows: lane l = 4g + t holds rows g and g + 8) and
// a range of 128-column blocks; lane t of each row group reads 16-byte chunk 4b + t of its two
// rows (so the 4 lanes of a row read 64 contiguous bytes per block and the block's 128 columns
// are one group). The B operand (x) is the same for all 8 mma columns: every output column
// holds the same sum, and lanes t = 0 keep columns 0. A CTA has RT x S warps: RT row tiles,
// each split over S warps along K (split-K inside the CTA, partial sums added through shared
// memory, no atomics); CTAs loop over CTA tiles (a one-wave grid when ctas_per_sm > 0).
// x is staged per CTA in shared memory in the order the lanes read it (one 16-byte load per
// lane, word and k-step: (x0, x4), (x1/8, x5/8), (x2, x6), (x3/8, x7/8)).
// ============================================================================================

namespace anyquant_int4_mma {

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// (a & 0x000F000F) | 0x43004300
__device__ __forceinline__ uint32_t lo_nib(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(r) : "r"(a));
  return r;
}
// (a & 0x00780078) | 0x43004300
__device__ __forceinline__ uint32_t hi_nib(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, 0x00780078, 0x43004300, 0xEA;" : "=r"(r) : "r"(a));
  return r;
}

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
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

struct Args {
  const __nv_bfloat16* x;
  const uint4* w;
  const uint32_t* meta;
  __nv_bfloat16* y;
  int N, K, G, bshift, RT, S;  // bshift: log2 of 128-column blocks per group
};

// Loads of block k (steps k*U .. k*U+U-1 of this warp's block range) of CTA tile T.
template <int U>
__device__ __forceinline__ void load_steps(uint4 (&wv)[U][2], uint32_t (&mv)[U][2], const Args& a, int T, int k,
                                           int rt, int g, int t, int b_begin, int nsteps, int C) {
  const int r0 = min((T * a.RT + rt) * 16 + g, a.N - 1);
  const int r1 = min((T * a.RT + rt) * 16 + g + 8, a.N - 1);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = k * U + u;
    if (i < nsteps) {
      const int b = b_begin + i;
      wv[u][0] = ld_stream(a.w + (size_t)r0 * C + 4 * b + t);
      wv[u][1] = ld_stream(a.w + (size_t)r1 * C + 4 * b + t);
      const int grp = b >> a.bshift;
      mv[u][0] = __ldg(a.meta + (size_t)r0 * a.G + grp);
      mv[u][1] = __ldg(a.meta + (size_t)r1 * a.G + grp);
    }
  }
}

// One 128-column block b of the lane's two rows: 8 mma k-steps, then the block's scale and zero point.
// NACC = 2 splits the 8 dependent mmas over two accumulators (cuda_stream, whose warps each run a
// long sequence of blocks and are bound by that chain); NACC = 1 is cuda_mma's single chain.
template <int NACC = 1>
__device__ __forceinline__ void compute_one(const uint4 wv0, const uint4 wv1, const uint32_t m0, const uint32_t m1,
                                            const uint4* __restrict__ xs, const float2* __restrict__ xab,
                                            float& acc0, float& acc1, int b, int t) {
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const uint32_t w0[4] = {wv0.x, wv0.y, wv0.z, wv0.w};
  const uint32_t w1[4] = {wv1.x, wv1.y, wv1.z, wv1.w};
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    const uint4 xb = xs[(b * 4 + wi) * 4 + t];
    const uint32_t p = w0[wi], q = w1[wi];
    const uint32_t p1 = p >> 1, q1 = q >> 1, p8 = p >> 8, q8 = q >> 8, p9 = p >> 9, q9 = q >> 9;
    mma16816(d, lo_nib(p), lo_nib(q), hi_nib(p1), hi_nib(q1), xb.x, xb.y);
    mma16816(NACC == 2 ? e : d, lo_nib(p8), lo_nib(q8), hi_nib(p9), hi_nib(q9), xb.z, xb.w);
  }
  float c0 = d[0], c2 = d[2];
  if constexpr (NACC == 2) {
    c0 += e[0];
    c2 += e[2];
  }
  const float2 ab = xab[b];
  const float s0 = __uint_as_float(m0 & 0xFFFFFFF0u), s1 = __uint_as_float(m1 & 0xFFFFFFF0u);
  const float z0 = __uint_as_float((m0 & 0xFu) | 0x4B000000u) - 8388608.0f;
  const float z1 = __uint_as_float((m1 & 0xFu) | 0x4B000000u) - 8388608.0f;
  acc0 = fmaf(s0, fmaf(-z0, ab.y, c0 - ab.x), acc0);
  acc1 = fmaf(s1, fmaf(-z1, ab.y, c2 - ab.x), acc1);
}

template <int U>
__device__ __forceinline__ void compute_steps(const uint4 (&wv)[U][2], const uint32_t (&mv)[U][2],
                                              const uint4* __restrict__ xs, const float2* __restrict__ xab,
                                              float& acc0, float& acc1, int k, int t, int b_begin, int nsteps) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = k * U + u;
    if (i < nsteps) compute_one(wv[u][0], wv[u][1], mv[u][0], mv[u][1], xs, xab, acc0, acc1, b_begin + i, t);
  }
}

__device__ __forceinline__ void cta_barrier() { asm volatile("bar.sync 1, %0;" ::"r"(blockDim.x) : "memory"); }

// End of a CTA tile for this warp: write its rows (S == 1) or its partial sums, then (S > 1)
// one barrier and the partial sums added by the first 16 * RT threads.
__device__ __forceinline__ void finish_tile(const Args& a, float* red, int& parity, float& acc0, float& acc1, int T,
                                            int rt, int s, int g, int t) {
  if (a.S == 1) {
    if (t == 0) {
      const int r0 = (T * a.RT + rt) * 16 + g;
      if (r0 < a.N) a.y[r0] = __float2bfloat16_rn(acc0);
      if (r0 + 8 < a.N) a.y[r0 + 8] = __float2bfloat16_rn(acc1);
    }
  } else {
    float* rb = red + parity * (a.RT * a.S * 16);
    if (t == 0) {
      rb[(rt * a.S + s) * 16 + g] = acc0;
      rb[(rt * a.S + s) * 16 + g + 8] = acc1;
    }
    cta_barrier();
    for (int i = threadIdx.x; i < a.RT * 16; i += blockDim.x) {
      const int rr = i >> 4, r = i & 15;
      float v = 0.0f;
      for (int ss = 0; ss < a.S; ++ss) v += rb[(rr * a.S + ss) * 16 + r];
      const int row = (T * a.RT + rr) * 16 + r;
      if (row < a.N) a.y[row] = __float2bfloat16_rn(v);
    }
    parity ^= 1;
  }
  acc0 = 0.0f;
  acc1 = 0.0f;
}

// x staged in shared memory in the order the lanes read it, and the per-block sums A_b, B_b.
// Each thread issues the loads of up to 4 items before it converts any: x is read after the
// grid-dependency wait, so this is on every GEMV's critical path, and a loop that waits for one
// L2 round trip per item costs K / 4096 round trips at 512 threads (about 2 us at K = 14336).
__device__ __forceinline__ void stage_x(const __nv_bfloat16* x, int K, uint4* __restrict__ xs,
                                        float2* __restrict__ xab) {
  constexpr int BATCH = 4;
  const int NB = K >> 7;
  // item i = (b, wi, t) = 16 b + 4 wi + t covers columns 128 b + 32 t + 8 wi .. + 7
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  const int items = NB * 16;
  for (int i0 = 0; i0 < items; i0 += BATCH * blockDim.x) {
    uint4 raws[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int i = i0 + j * blockDim.x + threadIdx.x;
      if (i < items) raws[j] = __ldg(x4 + (i >> 4) * 16 + (i & 3) * 4 + ((i >> 2) & 3));
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      if (i0 + j * blockDim.x >= items) break;  // uniform across the CTA
      const int i = i0 + j * blockDim.x + threadIdx.x;
      float pa = 0.0f, pb = 0.0f;
      if (i < items) {
        const uint4 raw = raws[j];
        float f[8];
        f[0] = __uint_as_float(raw.x << 16);
        f[1] = __uint_as_float(raw.x & 0xFFFF0000u);
        f[2] = __uint_as_float(raw.y << 16);
        f[3] = __uint_as_float(raw.y & 0xFFFF0000u);
        f[4] = __uint_as_float(raw.z << 16);
        f[5] = __uint_as_float(raw.z & 0xFFFF0000u);
        f[6] = __uint_as_float(raw.w << 16);
        f[7] = __uint_as_float(raw.w & 0xFFFF0000u);
        // odd columns divided by 8: exact (a power of two), and bf16 keeps the exponent range
        const float o1 = f[1] * 0.125f, o5 = f[5] * 0.125f, o3 = f[3] * 0.125f, o7 = f[7] * 0.125f;
        uint4 out;
        out.x = __byte_perm(raw.x, raw.z, 0x5410);
        out.y = (__float_as_uint(o1) >> 16) | (__float_as_uint(o5) & 0xFFFF0000u);
        out.z = __byte_perm(raw.y, raw.w, 0x5410);
        out.w = (__float_as_uint(o3) >> 16) | (__float_as_uint(o7) & 0xFFFF0000u);
        xs[i] = out;
        pa = 128.0f * (((f[0] + f[4]) + (f[2] + f[6])) + ((o1 + o5) + (o3 + o7)));
        pb = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        pa += __shfl_xor_sync(0xFFFFFFFFu, pa, off);
        pb += __shfl_xor_sync(0xFFFFFFFFu, pb, off);
      }
      if (i < items && (i & 15) == 0) xab[i >> 4] = make_float2(pa, pb);
    }
  }
}

template <int U>
__global__ void __launch_bounds__(U >= 8 ? 256 : 512) gemv_mma_kernel(const Args a) {
  extern __shared__ uint4 smem[];
  const int NB = a.K >> 7;  // 128-column blocks
  uint4* xs = smem;                                          // NB * 16 x 16 bytes
  float2* xab = reinterpret_cast<float2*>(smem + NB * 16);  // NB x (A_b, B_b)
  float* red = reinterpret_cast<float*>(xab + NB);          // 2 x RT x S x 16 (S > 1)
  const int C = a.K >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rt = warp / a.S, s = warp - rt * a.S;
  const int b_begin = s * NB / a.S, nsteps = (s + 1) * NB / a.S - b_begin;
  const int nblk = (nsteps + U - 1) / U;
  const int ntiles = (a.N + 16 * a.RT - 1) / (16 * a.RT);

  uint4 wa[U][2], wb[U][2];
  uint32_t ma[U][2], mb[U][2];
  int T0 = blockIdx.x, k0 = 0;
  if (T0 < ntiles) load_steps<U>(wa, ma, a, T0, 0, rt, g, t, b_begin, nsteps, C);

  grid_dependency_wait();
  stage_x(a.x, a.K, xs, xab);
  __syncthreads();
  grid_launch_dependents();
  if (T0 >= ntiles) return;  // the whole CTA

  float acc0 = 0.0f, acc1 = 0.0f;
  int parity = 0;
  while (true) {
    int T1 = T0, k1 = k0 + 1;
    if (k1 == nblk) { k1 = 0; T1 += gridDim.x; }
    if (T1 < ntiles) load_steps<U>(wb, mb, a, T1, k1, rt, g, t, b_begin, nsteps, C);
    compute_steps<U>(wa, ma, xs, xab, acc0, acc1, k0, t, b_begin, nsteps);
    if (k0 == nblk - 1) finish_tile(a, red, parity, acc0, acc1, T0, rt, s, g, t);
    if (T1 >= ntiles) break;
    int T2 = T1, k2 = k1 + 1;
    if (k2 == nblk) { k2 = 0; T2 += gridDim.x; }
    if (T2 < ntiles) load_steps<U>(wa, ma, a, T2, k2, rt, g, t, b_begin, nsteps, C);
    compute_steps<U>(wb, mb, xs, xab, acc0, acc1, k1, t, b_begin, nsteps);
    if (k1 == nblk - 1) finish_tile(a, red, parity, acc0, acc1, T1, rt, s, g, t);
    if (T2 >= ntiles) break;
    T0 = T2;
    k0 = k2;
  }
}


// The same computation with the weights and metadata brought into shared memory by cp.async
// (LDGSTS), P steps deep per warp: bytes in flight cost shared memory instead of registers, so
// a multiprocessor can keep far more of them in flight than the register version (which was
// measured latency-bound: 43% of its stalls waited on global loads at 50% occupancy). Each lane
// reads back only what it copied itself, so cp.async.wait_group alone orders it (no barrier).
// A warp's steps run over its CTA's tiles (t0, t0 + grid, ...) and its blocks of each tile.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

struct Cursor {  // a warp's position in its step sequence, with its rows' pointers
  int T, i;
  const uint4* w0;
  const uint4* w1;
  const uint32_t* m0;
  const uint32_t* m1;
};

__device__ __forceinline__ void cursor_rows(Cursor& c, const Args& a, int rt, int g, int t, int b_begin, int C) {
  const int r0 = min((c.T * a.RT + rt) * 16 + g, a.N - 1);
  const int r1 = min((c.T * a.RT + rt) * 16 + g + 8, a.N - 1);
  c.w0 = a.w + (size_t)r0 * C + 4 * b_begin + t;
  c.w1 = a.w + (size_t)r1 * C + 4 * b_begin + t;
  c.m0 = a.meta + (size_t)r0 * a.G;
  c.m1 = a.meta + (size_t)r1 * a.G;
}

__device__ __forceinline__ void cursor_next(Cursor& c, const Args& a, int rt, int g, int t, int b_begin, int nsteps,
                                            int C) {
  if (++c.i == nsteps) {
    c.i = 0;
    c.T += gridDim.x;
    cursor_rows(c, a, rt, g, t, b_begin, C);
  }
}

template <int P>
__global__ void __launch_bounds__(512) gemv_mma_async_kernel(const Args a) {
  extern __shared__ uint4 smem[];
  const int NB = a.K >> 7;
  uint4* xs = smem;
  float2* xab = reinterpret_cast<float2*>(smem + NB * 16);
  float* red = reinterpret_cast<float*>(xab + NB);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  // ring: per warp P slots of 64 uint4 (rows g, g + 8 of every lane) + 64 uint32 (their metadata),
  // 16-byte aligned (xab holds NB float2: 8 bytes short of alignment when NB is odd)
  const int ring_off = (NB * 256 + NB * 8 + (a.S > 1 ? 2 * a.RT * a.S * 16 * 4 : 0) + 15) & ~15;
  uint4* ring = reinterpret_cast<uint4*>(reinterpret_cast<char*>(smem) + ring_off);
  uint4* wring = ring + (size_t)warp * P * 64;
  uint32_t* mring = reinterpret_cast<uint32_t*>(ring + (size_t)nwarps * P * 64) + (size_t)warp * P * 64;
  const uint32_t wring_s = (uint32_t)__cvta_generic_to_shared(wring) + lane * 16;
  const uint32_t mring_s = (uint32_t)__cvta_generic_to_shared(mring) + lane * 4;
  const int C = a.K >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rt = warp / a.S, s = warp - rt * a.S;
  const int b_begin = s * NB / a.S, nsteps = (s + 1) * NB / a.S - b_begin;
  const int ntiles = (a.N + 16 * a.RT - 1) / (16 * a.RT);
  const int my_tiles = blockIdx.x < ntiles ? (ntiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int total = my_tiles * nsteps;

  Cursor pc;  // producer
  pc.T = blockIdx.x;
  pc.i = 0;
  cursor_rows(pc, a, rt, g, t, b_begin, C);
  int issued = 0;
  auto issue = [&](int slot) {
    const int b = b_begin + pc.i;
    cp_async16(wring_s + slot * 1024, pc.w0 + 4 * pc.i);
    cp_async16(wring_s + slot * 1024 + 512, pc.w1 + 4 * pc.i);
    cp_async4(mring_s + slot * 256, pc.m0 + (b >> a.bshift));
    cp_async4(mring_s + slot * 256 + 128, pc.m1 + (b >> a.bshift));
  };
#pragma unroll
  for (int p = 0; p < P - 1; ++p) {
    if (issued < total) {
      issue(p);
      ++issued;
      cursor_next(pc, a, rt, g, t, b_begin, nsteps, C);
    }
    cp_async_commit();
  }

  grid_dependency_wait();
  stage_x(a.x, a.K, xs, xab);
  __syncthreads();
  grid_launch_dependents();
  if (my_tiles == 0) return;  // the whole CTA

  float acc0 = 0.0f, acc1 = 0.0f;
  int parity = 0, ci = 0, cT = blockIdx.x, slot = 0;
  for (int c = 0; c < total; ++c) {
    cp_async_wait<P - 2>();  // step c has landed (this lane's copies)
    const uint4 wv0 = wring[slot * 64 + lane], wv1 = wring[slot * 64 + 32 + lane];
    const uint32_t m0 = mring[slot * 64 + lane], m1 = mring[slot * 64 + 32 + lane];
    // refill the slot read in the previous step (its values were consumed by then)
    if (issued < total) {
      issue(slot == 0 ? P - 1 : slot - 1);
      ++issued;
      cursor_next(pc, a, rt, g, t, b_begin, nsteps, C);
    }
    cp_async_commit();
    compute_one(wv0, wv1, m0, m1, xs, xab, acc0, acc1, b_begin + ci, t);
    if (++ci == nsteps) {
      finish_tile(a, red, parity, acc0, acc1, cT, rt, s, g, t);
      ci = 0;
      cT += gridDim.x;
    }
    slot = slot == P - 1 ? 0 : slot + 1;
  }
}

typedef void (*MmaKernelFn)(const Args);

#define ANYQUANT_MMA_VARIANTS(X) X(1) X(2) X(4) X(8)

#define ANYQUANT_MMA_ASYNC_VARIANTS(X) X(3) X(4) X(6) X(8)

// pipe 0: register double buffer, depth = U; pipe 1: cp.async ring, depth = P
static MmaKernelFn pick(int pipe, int depth) {
#define ANYQUANT_PICK(u) \
  if (pipe == 0 && depth == u) return gemv_mma_kernel<u>;
  ANYQUANT_MMA_VARIANTS(ANYQUANT_PICK)
#undef ANYQUANT_PICK
#define ANYQUANT_PICK_ASYNC(p) \
  if (pipe == 1 && depth == p) return gemv_mma_async_kernel<p>;
  ANYQUANT_MMA_ASYNC_VARIANTS(ANYQUANT_PICK_ASYNC)
#undef ANYQUANT_PICK_ASYNC
  return nullptr;
}

}  // namespace anyquant_int4_mma

// Returns nullptr on success, else an error message. pipe 0: the register version, depth = U
// 128-column blocks per warp step (the next U in flight); pipe 1: the cp.async version, depth = P
// steps in flight per warp. RT row tiles of 16 rows and S warps along K per CTA (RT * S <= 16
// warps, 8 for U = 8); ctas_per_sm > 0: a grid of at most that many CTAs per multiprocessor
// (capped by occupancy) looping over CTA tiles; 0: one CTA per tile.
const char* anyquant_int4_mma_launch(const void* x, const void* w, const void* meta, void* y, int N, int K, int G,
                                     int blocks_per_group, int pipe, int depth, int RT, int S, int ctas_per_sm,
                                     int pdl, void* stream) {
  using namespace anyquant_int4_mma;
  MmaKernelFn fn = pick(pipe, depth);
  if (!fn) return "anyquant cuda_mma: no compiled variant for this (pipe, depth)";
  const int NB = K / 128;
  if (K % 128 || NB < 1) return "anyquant cuda_mma: K must be a multiple of 128";
  if (blocks_per_group < 1 || (blocks_per_group & (blocks_per_group - 1)))
    return "anyquant cuda_mma: group / 128 must be a power of two";
  const int max_warps = (pipe == 0 && depth >= 8) ? 8 : 16;
  if (S < 1 || RT < 1 || RT * S > max_warps) return "anyquant cuda_mma: need 1 <= RT * S <= 16 warps (8 for U = 8)";
  if (S > NB) S = NB;
  const int warps = RT * S;
  int smem = NB * 256 + NB * 8 + (S > 1 ? 2 * RT * S * 16 * 4 : 0);
  if (pipe == 1) smem = ((smem + 15) & ~15) + warps * depth * (1024 + 256);  // the ring, 16-byte aligned
  if (smem > 227 * 1024) return "anyquant cuda_mma: shared memory over 227 KiB (fewer warps or stages)";
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 16) return "anyquant cuda_mma: device index >= 16";
  const int vid = pipe * 9 + depth;  // < 18
  static int smem_set[16][18];
  static int sms[16];
  static int occ[16][18][17];
  static int occ_smem[16][18][17];
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
    if (nb < 1) return "anyquant cuda_mma: no block fits on a multiprocessor";
    occ[dev][vid][warps] = nb;
    occ_smem[dev][vid][warps] = smem;
  }
  const long ntiles = (N + 16L * RT - 1) / (16L * RT);
  long grid = ntiles;
  if (ctas_per_sm > 0) {
    const int per_sm = ctas_per_sm < occ[dev][vid][warps] ? ctas_per_sm : occ[dev][vid][warps];
    const long maxg = (long)sms[dev] * per_sm;
    const long per_cta = (ntiles + maxg - 1) / maxg;  // tiles per CTA, then as few CTAs as that needs
    grid = (ntiles + per_cta - 1) / per_cta;
  }
  int bshift = 0;
  while ((1 << bshift) < blocks_per_group) ++bshift;
  Args args;
  args.x = (const __nv_bfloat16*)x;
  args.w = (const uint4*)w;
  args.meta = (const uint32_t*)meta;
  args.y = (__nv_bfloat16*)y;
  args.N = N;
  args.K = K;
  args.G = G;
  args.bshift = bshift;
  args.RT = RT;
  args.S = S;

  return anyquant_launch(fn, (unsigned)grid, 32 * warps, smem, stream, pdl, args);
}
