// ============================================================================================
// cuda_stream: batch-1 int4 GEMV that streams its weights as one contiguous array and starts
// streaming before the kernel ahead of it in the stream has finished (built with
// cuda_int4_gemv.cu, whose mma, x staging and cp.async helpers it uses; groups a multiple of 128).
//
// Why: at batch 1 the Linear layers of a Llama-3-8B layer read 2 to 31 MB each. Every kernel
// that waits for the one before it to end before it reads a byte leaves DRAM idle for its
// launch, its first loads' latency and the one before's tail: about 2 to 5 us, against 1 to 11
// us of transfer at the bandwidth floor. Here a kernel's weights do not depend on the kernel
// before, so each CTA copies its first P - 1 units into shared memory, allows the next kernel to
// launch (griddepcontrol.launch_dependents) and only then waits for the one before
// (griddepcontrol.wait) to read x. The grid is one small CTA per multiprocessor, so the CTAs of
// two or three consecutive GEMVs fit on a multiprocessor at once and DRAM keeps streaming
// across kernel boundaries.
//
// Layout (cuda_int4.repack_units, built once at load): a "unit" is one 16-row tile T and one
// 128-column block b, 1088 contiguous bytes: 32 x 16 bytes of rows 16T + g (lane 4g + t holds
// 16-byte chunk 4b + t of row g, exactly what mma lane 4g + t multiplies), 32 x 16 bytes of rows
// 16T + 8 + g in the same order, then the 16 rows' metadata (scale | zu) of block b's group.
// Units are stored tile-major: tile 0's blocks 0..NB-1, then tile 1's, ... (rows padded to a
// multiple of 16 with zero scales). Same 4.25 bits per weight as the saved format at group 128.
//
// Work split (stream-K): the grid's warps, numbered j = CTA * W + warp, take equal contiguous
// ranges [j U / GW, (j + 1) U / GW) of the U = tiles x NB units (GW <= U: no warp is idle),
// so every shape balances over every multiprocessor. A warp accumulates a tile's rows over the
// units it owns; a tile wholly inside one warp's range is written by that warp; otherwise each
// of its c warps writes 16 fp32 partial sums to its slot (warp index - the tile's first warp),
// and the last to arrive (an atomic ticket per tile, left at zero for the next launch, so it
// works inside CUDA graphs; one counter buffer per module, so one stream at a time) adds the
// slots in slot order (deterministic) and writes the bf16 rows.
// ============================================================================================

namespace anyquant_int4_stream {

using namespace anyquant_int4_mma;

constexpr int UNIT_VEC = 68;  // uint4 per unit: 64 of weights, 4 of metadata

struct SArgs {
  const __nv_bfloat16* x;
  const uint4* units;
  __nv_bfloat16* y;
  float* part;         // [tiles, maxc, 16]
  unsigned int* counters;  // [tiles]
  long long units_total;
  int N, K, NB, maxc, gw;
};

// The warp whose range holds unit u: the largest j with floor(j U / GW) <= u.
__device__ __forceinline__ int warp_of_unit(long long u, long long U, int gw) {
  return (int)(((u + 1) * gw + U - 1) / U - 1);
}

__device__ __forceinline__ void flush_tile(const SArgs& a, int T, int j, float acc0, float acc1, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int jf = warp_of_unit((long long)T * a.NB, a.units_total, a.gw);
  const int jl = warp_of_unit((long long)(T + 1) * a.NB - 1, a.units_total, a.gw);
  const int c = jl - jf + 1;
  if (c == 1) {
    if (t == 0) {
      const int r0 = T * 16 + g;
      if (r0 < a.N) a.y[r0] = __float2bfloat16_rn(acc0);
      if (r0 + 8 < a.N) a.y[r0 + 8] = __float2bfloat16_rn(acc1);
    }
    return;
  }
  float* slot = a.part + ((long long)T * a.maxc + (j - jf)) * 16;
  if (t == 0) {
    slot[g] = acc0;
    slot[g + 8] = acc1;
  }
  __threadfence();
  __syncwarp();
  unsigned int ticket = 0;
  if (lane == 0) ticket = atomicAdd(a.counters + T, 1u);
  ticket = __shfl_sync(0xFFFFFFFFu, ticket, 0);
  if (ticket != (unsigned int)(c - 1)) return;
  __threadfence();
  if (lane < 16) {
    const float* base = a.part + (long long)T * a.maxc * 16 + lane;
    float v = 0.0f;
    for (int i = 0; i < c; ++i) v += __ldcg(base + i * 16);
    const int row = T * 16 + lane;
    if (row < a.N) a.y[row] = __float2bfloat16_rn(v);
  }
  if (lane == 0) a.counters[T] = 0u;  // ready for the next launch (launches on one stream run in order)
}

template <int P>
__global__ void __launch_bounds__(512) gemv_stream_kernel(const SArgs a) {
  extern __shared__ uint4 smem[];
  const int NB = a.NB;
  uint4* xs = smem;
  float2* xab = reinterpret_cast<float2*>(smem + NB * 16);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ring_off = (NB * 256 + NB * 8 + 15) & ~15;
  uint4* ring = reinterpret_cast<uint4*>(reinterpret_cast<char*>(smem) + ring_off);
  uint4* wring = ring + (size_t)warp * P * 64;
  uint32_t* mring = reinterpret_cast<uint32_t*>(ring + (size_t)nwarps * P * 64) + (size_t)warp * P * 64;
  const uint32_t wring_s = (uint32_t)__cvta_generic_to_shared(wring) + lane * 16;
  const uint32_t mring_s = (uint32_t)__cvta_generic_to_shared(mring) + lane * 4;
  const int g = lane >> 2, t = lane & 3;
  const int j = blockIdx.x * nwarps + warp;
  const long long U = a.units_total;
  const long long u0 = (long long)j * U / a.gw;
  const int len = (int)((long long)(j + 1) * U / a.gw - u0);

  // each lane copies exactly the bytes it reads back, so cp.async.wait_group alone orders it
  auto issue = [&](int slot, long long u) {
    const uint4* src = a.units + u * UNIT_VEC;
    cp_async16(wring_s + slot * 1024, src + lane);
    cp_async16(wring_s + slot * 1024 + 512, src + 32 + lane);
    const uint32_t* m = reinterpret_cast<const uint32_t*>(src + 64);
    cp_async4(mring_s + slot * 256, m + g);
    cp_async4(mring_s + slot * 256 + 128, m + g + 8);
  };
#pragma unroll
  for (int p = 0; p < P - 1; ++p) {
    if (p < len) issue(p, u0 + p);
    cp_async_commit();
  }

  grid_launch_dependents();  // the next kernel may start its own copies now
  grid_dependency_wait();    // x is written by the kernel before
  stage_x(a.x, a.K, xs, xab);
  __syncthreads();

  float acc0 = 0.0f, acc1 = 0.0f;
  int T = (int)(u0 / NB), b = (int)(u0 - (long long)T * NB), slot = 0;
  for (int c = 0; c < len; ++c) {
    cp_async_wait<P - 2>();  // unit c has landed (this lane's copies)
    const uint4 wv0 = wring[slot * 64 + lane], wv1 = wring[slot * 64 + 32 + lane];
    const uint32_t m0 = mring[slot * 64 + lane], m1 = mring[slot * 64 + 32 + lane];
    // refill the slot read in the previous step (its values are in registers by now)
    if (c + P - 1 < len) issue(slot == 0 ? P - 1 : slot - 1, u0 + c + P - 1);
    cp_async_commit();
    compute_one(wv0, wv1, m0, m1, xs, xab, acc0, acc1, b, t);
    if (++b == NB || c == len - 1) {
      flush_tile(a, T, j, acc0, acc1, lane);
      acc0 = 0.0f;
      acc1 = 0.0f;
      b = 0;
      ++T;
    }
    slot = slot == P - 1 ? 0 : slot + 1;
  }
}

typedef void (*StreamFn)(const SArgs);

#define ANYQUANT_STREAM_STAGES(X) X(2) X(4) X(6) X(8) X(12) X(16)

static StreamFn pick(int P) {
#define ANYQUANT_PICK_STREAM(p) \
  if (P == p) return gemv_stream_kernel<p>;
  ANYQUANT_STREAM_STAGES(ANYQUANT_PICK_STREAM)
#undef ANYQUANT_PICK_STREAM
  return nullptr;
}

}  // namespace anyquant_int4_stream

// Partial-sum slots per tile for a grid of gw warps over `units` units (NB per tile): a warp's
// range is at least floor(units / gw) units long, so a tile meets at most ceil(NB / that) + 1.
int anyquant_int4_stream_maxc(long long units, int NB, int gw) {
  const long long lmin = units / gw;
  return (int)((NB + lmin - 1) / lmin) + 1;
}

// Grid size for (N, K, W warps, ctas_per_sm): one wave of at most ctas_per_sm CTAs per
// multiprocessor, and no more warps than units. Returns 0 where no CTA fits.
const char* anyquant_int4_stream_grid(int N, int K, int P, int W, int ctas_per_sm, int* grid_out, int* smem_out) {
  using namespace anyquant_int4_stream;
  StreamFn fn = pick(P);
  if (!fn) return "anyquant cuda_stream: no compiled variant for this depth P";
  if (K % 128 || K < 128) return "anyquant cuda_stream: K must be a multiple of 128";
  if (W < 1 || W > 16) return "anyquant cuda_stream: 1 to 16 warps per CTA";
  const int NB = K / 128;
  const int smem = ((NB * 256 + NB * 8 + 15) & ~15) + W * P * (1024 + 256);
  if (smem > 227 * 1024) return "anyquant cuda_stream: shared memory over 227 KiB (fewer warps or stages)";
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 16) return "anyquant cuda_stream: device index >= 16";
  static int smem_set[16][17];
  static int sms[16];
  if (smem > 48 * 1024 && smem > smem_set[dev][P]) {
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    smem_set[dev][P] = smem;
  }
  if (!sms[dev]) {
    cudaError_t e = cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  int nb = 0;
  cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fn, 32 * W, smem);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (nb < 1) return "anyquant cuda_stream: no block fits on a multiprocessor";
  const int per_sm = ctas_per_sm < 1 ? 1 : (ctas_per_sm < nb ? ctas_per_sm : nb);
  const long long units = (long long)((N + 15) / 16) * NB;
  long long grid = (long long)sms[dev] * per_sm;
  if (grid * W > units) grid = units / W;
  if (grid < 1) grid = 1;
  *grid_out = (int)grid;
  *smem_out = smem;
  return nullptr;
}

// Returns nullptr on success, else an error message. units: the repacked weights
// (ceil(N / 16) * K / 128 units of 1088 bytes); part: >= tiles * maxc * 16 floats;
// counters: tiles uint32, zero (left zero). grid / smem from anyquant_int4_stream_grid.
const char* anyquant_int4_stream_launch(const void* x, const void* units, void* y, void* part, void* counters, int N,
                                        int K, int P, int W, int grid, int smem, int maxc, int pdl, void* stream) {
  using namespace anyquant_int4_stream;
  StreamFn fn = pick(P);
  if (!fn) return "anyquant cuda_stream: no compiled variant for this depth P";
  SArgs args;
  args.x = (const __nv_bfloat16*)x;
  args.units = (const uint4*)units;
  args.y = (__nv_bfloat16*)y;
  args.part = (float*)part;
  args.counters = (unsigned int*)counters;
  args.NB = K / 128;
  args.units_total = (long long)((N + 15) / 16) * args.NB;
  args.N = N;
  args.K = K;
  args.maxc = maxc;
  args.gw = grid * W;

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)grid);
  cfg.blockDim = dim3(32 * W);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = (cudaStream_t)stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, fn, args);
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
