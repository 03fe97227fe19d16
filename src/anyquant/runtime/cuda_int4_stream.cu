// ============================================================================================
// cuda_stream: batch-1 int4 GEMV that streams its weights as one contiguous array with the Hopper
// bulk-copy engine, and starts streaming before the kernel ahead of it in the stream has
// finished (built with cuda_int4_gemv.cu, whose mma, x staging and grid-dependency helpers it
// uses; groups a multiple of 128; sm_90).
//
// Why: at batch 1 the Linear layers of a Llama-3-8B layer read 2 to 31 MB each. A kernel that
// waits for the one before it to end before it reads a byte leaves DRAM idle for its launch,
// its first loads' latency and the one before's tail: 2 to 5 us each, against 1 to 11 us of
// transfer at the bandwidth floor. A GEMV's weights do not depend on the kernel before, so here
// one thread per CTA fills a ring of S stages with cp.async.bulk (one instruction per stage of
// W units, completion counted in bytes on an mbarrier) before the CTA waits for the kernel ahead
// (griddepcontrol.wait, needed only to read x), and lets the next kernel launch
// (griddepcontrol.launch_dependents) at once.
//
// Layout (cuda_int4.repack_units, built once at load): a "unit" is one 16-row tile T and one
// 128-column block b, 1088 contiguous bytes: 32 x 16 bytes of rows 16T + g (vector 4g + t is
// 16-byte chunk 4b + t of row g, exactly what mma lane 4g + t multiplies), 32 x 16 bytes of rows
// 16T + 8 + g in the same order, then the 16 rows' metadata (scale | zu) of block b's group.
// Units are stored tile-major (rows padded to a multiple of 16 with zero scales). Same 4.25 bits
// per weight as the saved format at group 128.
//
// Work split: CTA c owns the whole tiles [c T / G, (c + 1) T / G) (one contiguous byte range; G
// CTAs, at most one tile apart, so about 97% balanced on every Llama shape at one CTA per
// multiprocessor) and needs no global reduction, atomics or fences. Stage s of a CTA holds its
// units s W .. s W + W - 1 and warp w computes unit s W + w, adding each tile's rows over its
// units; at a tile change it writes its 16 partial sums to its own shared slot (tile, w); after
// the last stage the CTA adds the slots in warp order (deterministic) and writes bf16 rows.
// Warp W is the producer: its lane 0 refills a stage once all W consumer warps have released it.
// ============================================================================================

namespace anyquant_int4_stream {

using namespace anyquant_int4_mma;

constexpr int UNIT_VEC = 68;     // uint4 per unit: 64 of weights, 4 of metadata
constexpr int UNIT_BYTES = 1088;

struct SArgs {
  const __nv_bfloat16* x;
  const uint4* units;
  __nv_bfloat16* y;
  int N, K, NB, tiles, tiles_per_cta_max;
#ifdef ANYQUANT_STREAM_TRACE
  int trace_slot;
#endif
};

// Diagnostics only (benchmarks/stream_trace.py builds with ANYQUANT_STREAM_TRACE): thread 0 of
// each CTA records the global timer at its phases, per launch slot, to see where a sequence of
// GEMVs loses time at kernel boundaries.
#ifdef ANYQUANT_STREAM_TRACE
constexpr int TRACE_SLOTS = 256, TRACE_CTAS = 512, TRACE_FIELDS = 8;
__device__ unsigned long long trace_buf[TRACE_SLOTS * TRACE_CTAS * TRACE_FIELDS];
__device__ __forceinline__ void trace_mark(const SArgs& a, int field) {
  if (threadIdx.x == 0 && blockIdx.x < TRACE_CTAS) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    trace_buf[((size_t)a.trace_slot * TRACE_CTAS + blockIdx.x) * TRACE_FIELDS + field] = t;
    if (field == 0) {
      unsigned int sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      trace_buf[((size_t)a.trace_slot * TRACE_CTAS + blockIdx.x) * TRACE_FIELDS + 7] = sm;
    }
  }
}
#define ANYQUANT_TRACE(field) trace_mark(a, field)
#else
#define ANYQUANT_TRACE(field)
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int phase) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// S stages of W units; W consumer warps and one producer warp per CTA. 56 registers (no spills
// at S <= 8): two CTAs of W <= 16 then fit on one multiprocessor (2 x 17 warps x 32 x 56 of its
// 65,536), so either two of one launch run there, or one of this launch and one of the next,
// which starts its copies before this one ends. At the 64 that ptxas otherwise picks for some S
// only one fits, and which configurations streamed across kernels changed with S.
template <int S>
__global__ void __maxnreg__(56) gemv_stream_kernel(const SArgs a) {
  extern __shared__ uint4 smem[];
  const int NB = a.NB;
  const int W = (blockDim.x >> 5) - 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  uint4* xs = smem;
  float2* xab = reinterpret_cast<float2*>(smem + NB * 16);
  char* base = reinterpret_cast<char*>(smem);
  int off = (NB * 256 + NB * 8 + 15) & ~15;
  float* red = reinterpret_cast<float*>(base + off);  // [tiles_per_cta_max, W, 16]
  off += a.tiles_per_cta_max * W * 64;
  uint4* ring = reinterpret_cast<uint4*>(base + off);  // [S, W units]
  off += S * W * UNIT_BYTES;
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + ((off + 7) & ~7));  // full[S], empty[S]
  const uint32_t full0 = smem_addr(bars), empty0 = smem_addr(bars + S);

  ANYQUANT_TRACE(0);  // entry
  const int t0 = (int)((long long)blockIdx.x * a.tiles / gridDim.x);
  const int t1 = (int)((long long)(blockIdx.x + 1) * a.tiles / gridDim.x);
  const long long u0 = (long long)t0 * NB, u1 = (long long)t1 * NB;
  const int nst = (int)((u1 - u0 + W - 1) / W);
  const bool producer = warp == W && lane == 0;

  if (threadIdx.x == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(full0 + 8 * i, 1);
      mbar_init(empty0 + 8 * i, W);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  auto issue = [&](int s) {
    const int slot = s % S;
    const long long u = u0 + (long long)s * W;
    const int count = (int)min((long long)W, u1 - u);
    mbar_expect_tx(full0 + 8 * slot, count * UNIT_BYTES);
    bulk_copy(smem_addr(ring + (size_t)slot * W * UNIT_VEC), a.units + u * UNIT_VEC, count * UNIT_BYTES,
              full0 + 8 * slot);
  };
  if (producer)
    for (int s = 0; s < S && s < nst; ++s) issue(s);
  for (int i = threadIdx.x; i < a.tiles_per_cta_max * W * 16; i += blockDim.x) red[i] = 0.0f;

  grid_launch_dependents();  // the next kernel may start its own copies now
  grid_dependency_wait();    // x is written by the kernel before
  ANYQUANT_TRACE(1);         // released by the kernel before
  stage_x(a.x, a.K, xs, xab);
  __syncthreads();
  ANYQUANT_TRACE(2);  // x staged

  if (warp == W) {
    if (producer) {
      for (int s = S; s < nst; ++s) {
        mbar_wait(empty0 + 8 * (s % S), ((s / S) - 1) & 1);
        issue(s);
      }
    }
    __syncwarp();  // the producer warp reconverges before the CTA barrier
  } else {
    float acc0 = 0.0f, acc1 = 0.0f;
    int cur = -1;  // the tile (local index) being accumulated
    for (int s = 0; s < nst; ++s) {
      const int slot = s % S;
      const long long u = u0 + (long long)s * W + warp;
      mbar_wait(full0 + 8 * slot, (s / S) & 1);
      if (u < u1) {
        const uint4* unit = ring + ((size_t)slot * W + warp) * UNIT_VEC;
        const uint4 wv0 = unit[lane], wv1 = unit[32 + lane];
        const uint32_t* m = reinterpret_cast<const uint32_t*>(unit + 64);
        const uint32_t m0 = m[g], m1 = m[g + 8];
        const int T = (int)(u / NB) - t0, b = (int)(u % NB);
        if (T != cur) {
          if (cur >= 0 && t == 0) {
            red[(cur * W + warp) * 16 + g] = acc0;
            red[(cur * W + warp) * 16 + g + 8] = acc1;
          }
          acc0 = 0.0f;
          acc1 = 0.0f;
          cur = T;
        }
        compute_one<2>(wv0, wv1, m0, m1, xs, xab, acc0, acc1, b, t);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // this warp is done with the stage
    }
    if (cur >= 0 && t == 0) {
      red[(cur * W + warp) * 16 + g] = acc0;
      red[(cur * W + warp) * 16 + g + 8] = acc1;
    }
  }
  __syncthreads();
  ANYQUANT_TRACE(3);  // every stage consumed
  for (int i = threadIdx.x; i < (t1 - t0) * 16; i += blockDim.x) {
    const int tl = i >> 4, r = i & 15;
    float v = 0.0f;
    for (int w = 0; w < W; ++w) v += red[(tl * W + w) * 16 + r];
    const int row = (t0 + tl) * 16 + r;
    if (row < a.N) a.y[row] = __float2bfloat16_rn(v);
  }
  ANYQUANT_TRACE(4);  // rows written
}

typedef void (*StreamFn)(const SArgs);

#define ANYQUANT_STREAM_STAGES(X) X(2) X(3) X(4) X(5) X(6) X(8)

static StreamFn pick(int S) {
#define ANYQUANT_PICK_STREAM(p) \
  if (S == p) return gemv_stream_kernel<p>;
  ANYQUANT_STREAM_STAGES(ANYQUANT_PICK_STREAM)
#undef ANYQUANT_PICK_STREAM
  return nullptr;
}

}  // namespace anyquant_int4_stream

#ifdef ANYQUANT_STREAM_TRACE
static int trace_next_slot = 0;  // launch slots are assigned on the host (so a captured graph keeps them)
void anyquant_stream_trace_reset() { trace_next_slot = 0; }
void anyquant_stream_trace_read(void* host, size_t bytes) {
  cudaDeviceSynchronize();
  cudaMemcpyFromSymbol(host, anyquant_int4_stream::trace_buf, bytes);
}
#endif

// Returns nullptr on success, else an error message. units: the repacked weights
// (ceil(N / 16) * K / 128 units of 1088 bytes, 16-byte aligned); S stages of W units (W consumer
// warps and one producer warp per CTA); a grid of up to ctas_per_sm CTAs per multiprocessor,
// never more CTAs than 16-row tiles; carveout: the L1 / shared-memory split asked for (percent of
// the most shared memory; -1: the driver's choice per launch; the first value a variant is
// launched with stays).
const char* anyquant_int4_stream_launch(const void* x, const void* units, void* y, int N, int K, int S, int W,
                                        int ctas_per_sm, int pdl, int carveout, void* stream) {
  using namespace anyquant_int4_stream;
  StreamFn fn = pick(S);
  if (!fn) return "anyquant cuda_stream: no compiled variant for this number of stages S";
  if (K % 128 || K < 128) return "anyquant cuda_stream: K must be a multiple of 128";
  if (W < 1 || W > 31) return "anyquant cuda_stream: 1 to 31 consumer warps per CTA (1024 threads with the producer)";
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 16) return "anyquant cuda_stream: device index >= 16";
  static int sms[16];
  if (!sms[dev]) {
    cudaError_t e = cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  const int NB = K / 128, tiles = (N + 15) / 16;
  long long grid = (long long)sms[dev] * (ctas_per_sm < 1 ? 1 : ctas_per_sm);
  if (grid > tiles) grid = tiles;
  const int tpc = (int)((tiles + grid - 1) / grid);
  // cuda_int4.stream_smem_bytes repeats this formula so that kernels.supports can decline first
  const int smem = (((NB * 256 + NB * 8 + 15) & ~15) + tpc * W * 64 + S * W * UNIT_BYTES + 7) / 8 * 8 + 2 * S * 8;
  if (smem > 227 * 1024) return "anyquant cuda_stream: shared memory over 227 KiB (fewer warps or stages)";
  // carveout >= 0: every variant asks for the same L1 / shared-memory split (percent of the most
  // shared memory), set once per variant and device. A multiprocessor runs CTAs of one split at a
  // time and drains before it switches, so two GEMVs whose launches made the driver pick
  // different splits (it picks from each launch's shared memory) do not overlap across their
  // boundary: the streaming is lost.
  static int smem_set[16][9];
  static bool carveout_set[16][9];
  if (carveout >= 0 && !carveout_set[dev][S]) {
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024);
    if (e == cudaSuccess) e = cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout, carveout);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    smem_set[dev][S] = 227 * 1024;
    carveout_set[dev][S] = true;
  }
  if (smem > 48 * 1024 && smem > smem_set[dev][S]) {
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    smem_set[dev][S] = smem;
  }
  SArgs args;
  args.x = (const __nv_bfloat16*)x;
  args.units = (const uint4*)units;
  args.y = (__nv_bfloat16*)y;
  args.N = N;
  args.K = K;
  args.NB = NB;
  args.tiles = tiles;
  args.tiles_per_cta_max = tpc;
#ifdef ANYQUANT_STREAM_TRACE
  args.trace_slot = trace_next_slot++ % TRACE_SLOTS;
#endif

  return anyquant_launch(fn, (unsigned)grid, 32 * (W + 1), smem, stream, pdl, args);
}
