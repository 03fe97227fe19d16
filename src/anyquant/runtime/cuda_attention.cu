// Batch-1 decode attention (one query token) over a static KV cache, with grouped-query heads
// (built by runtime/cuda_int4.py together with cuda_int4_gemv.cu; no torch headers here).
//
// Inputs
//   q     bf16 [Hkv * G, 128]                 the query of the new token (after rotary)
//   k, v  bf16 [Hkv, L, 128] with strides      the whole cache (head stride, position stride in
//                                              elements; the last dimension contiguous)
//   mask  uint8 [L]                            nonzero where a position takes part
//   out   bf16 [Hkv * G, 128]
// Math, fp32 throughout (q and k products exact in fp32): s_j = scale * q . k_j (masked: -inf),
// p_j = exp(s_j - max s) / sum, out = sum_j p_j v_j, rounded to bf16 once at the end.
//
// Split over the cache (flash-decoding): CTA (h, c) takes key head h and positions
// [32 c, 32 c + 32); its 4 warps take 8 positions each, lane l dimensions 4 l .. 4 l + 3 (the
// warp reads 256 contiguous bytes per position), and every load of k and v is issued at the
// start. Each warp's dot products are summed by warp shuffles, softmaxed over its 8 positions
// (max m, sum l) and multiplied into v; the 4 warps are merged through shared memory, and the CTA
// writes (m, l, o[128]) per query head to a scratch buffer. The last CTA of a head to finish
// (an atomic ticket; it resets the counter for the next launch) merges the splits and writes
// the output. One launch, no second kernel.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace anyquant_attn {

constexpr int D = 128;
constexpr int THREADS = 128;   // 4 warps
constexpr int KPW = 8;         // positions per warp
constexpr int KC = 32;         // positions per CTA
constexpr int MAX_SPLITS = 256;  // CTAs per key head: caches of up to 8192 positions

__device__ __forceinline__ void bf16x4(const uint2 r, float (&f)[4]) {
  f[0] = __uint_as_float(r.x << 16);
  f[1] = __uint_as_float(r.x & 0xFFFF0000u);
  f[2] = __uint_as_float(r.y << 16);
  f[3] = __uint_as_float(r.y & 0xFFFF0000u);
}

// exp2(m - M), 0 where m is -inf (an empty or fully masked part)
__device__ __forceinline__ float rescale(float m, float M) { return m == -INFINITY ? 0.0f : exp2f(m - M); }

template <int G>
__global__ void __launch_bounds__(THREADS) decode_attention_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const uint8_t* __restrict__ mask, __nv_bfloat16* __restrict__ out, float* __restrict__ part,
    unsigned int* __restrict__ counters, int L, long long k_sh, long long k_sl, long long v_sh, long long v_sl,
    float scale_log2e) {
  __shared__ float4 wo[4][G][D / 4];   // per warp: o (unnormalised) per query head
  __shared__ float wm[4][G], wl[4][G];
  __shared__ unsigned int ticket;
  __shared__ float sm_m[MAX_SPLITS * G], sm_l[MAX_SPLITS * G];
  const int h = blockIdx.x, c = blockIdx.y, NS = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int j0 = c * KC + warp * KPW;
  const __nv_bfloat16* kh = k + (long long)h * k_sh + 4 * lane;
  const __nv_bfloat16* vh = v + (long long)h * v_sh + 4 * lane;

  // every load first: q (G x 8 bytes), k and v (8 positions x 8 bytes each)
  uint2 qr[G], kr[KPW], vr[KPW];
  uint8_t mk[KPW];
#pragma unroll
  for (int g = 0; g < G; ++g) qr[g] = __ldg(reinterpret_cast<const uint2*>(q + ((long long)h * G + g) * D + 4 * lane));
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    const int j = min(j0 + i, L - 1);
    kr[i] = __ldg(reinterpret_cast<const uint2*>(kh + (long long)j * k_sl));
    vr[i] = __ldg(reinterpret_cast<const uint2*>(vh + (long long)j * v_sl));
    mk[i] = j0 + i < L ? __ldg(mask + j) : 0;
  }
  float qf[G][4];
#pragma unroll
  for (int g = 0; g < G; ++g) bf16x4(qr[g], qf[g]);

  // scores of the warp's 8 positions for the G heads, summed over the lanes (all lanes get them)
  float s[KPW][G];
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    float kf[4];
    bf16x4(kr[i], kf);
#pragma unroll
    for (int g = 0; g < G; ++g)
      s[i][g] = fmaf(qf[g][0], kf[0], fmaf(qf[g][1], kf[1], fmaf(qf[g][2], kf[2], qf[g][3] * kf[3])));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int i = 0; i < KPW; ++i)
#pragma unroll
      for (int g = 0; g < G; ++g) s[i][g] += __shfl_xor_sync(0xFFFFFFFFu, s[i][g], off);

  // the warp's softmax part and its p-weighted sum of v
  float m[G], l[G], acc[G][4];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[g][e] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    const bool keep = mk[i] != 0;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s[i][g] = keep ? s[i][g] * scale_log2e : -INFINITY;
      m[g] = fmaxf(m[g], s[i][g]);
    }
  }
#pragma unroll
  for (int i = 0; i < KPW; ++i) {
    float vf[4];
    bf16x4(vr[i], vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = rescale(s[i][g], m[g]);
      l[g] += p;
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) wo[warp][g][lane] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      wm[warp][g] = m[g];
      wl[warp][g] = l[g];
    }
  }
  __syncthreads();

  // merge the 4 warps: thread t holds dimension t of every head; write this split's part
  // part layout per (h, c): G x [m, l] then G x 128 o
  float* pp = part + ((long long)h * NS + c) * (G * (D + 2));
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float M = fmaxf(fmaxf(wm[0][g], wm[1][g]), fmaxf(wm[2][g], wm[3][g]));
    float o = 0.0f, ls = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float f = rescale(wm[w][g], M);
      o = fmaf(f, reinterpret_cast<const float*>(&wo[w][g][0])[tid], o);
      ls = fmaf(f, wl[w][g], ls);
    }
    pp[2 * G + g * D + tid] = o;
    if (tid == 0) {
      pp[2 * g] = M;
      pp[2 * g + 1] = ls;
    }
  }

  // the last CTA of head h merges the NS parts
  __threadfence();
  __syncthreads();
  if (tid == 0) ticket = atomicAdd(counters + h, 1u);
  __syncthreads();
  if (ticket != (unsigned int)(NS - 1)) return;
  __threadfence();
  // (m, l) of every part to shared memory at once, then the o loads 8 parts at a time
  const float* ph = part + (long long)h * NS * (G * (D + 2));
  for (int i = tid; i < NS * G; i += THREADS) {
    const float2 ml = __ldcg(reinterpret_cast<const float2*>(ph + (long long)(i / G) * (G * (D + 2))) + (i % G));
    sm_m[i] = ml.x;
    sm_l[i] = ml.y;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float M = -INFINITY;
    for (int cc = 0; cc < NS; ++cc) M = fmaxf(M, sm_m[cc * G + g]);
    float o = 0.0f, ls = 0.0f;
    for (int c0 = 0; c0 < NS; c0 += 8) {
      float ov[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        ov[u] = c0 + u < NS ? __ldcg(ph + (long long)(c0 + u) * (G * (D + 2)) + 2 * G + g * D + tid) : 0.0f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (c0 + u < NS) {
          const float f = rescale(sm_m[(c0 + u) * G + g], M);
          ls = fmaf(f, sm_l[(c0 + u) * G + g], ls);
          o = fmaf(f, ov[u], o);
        }
      }
    }
    out[((long long)h * G + g) * D + tid] = __float2bfloat16_rn(o / ls);
  }
  if (tid == 0) counters[h] = 0u;  // ready for the next launch (launches on one stream run in order)
}

typedef void (*AttnFn)(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const uint8_t*,
                       __nv_bfloat16*, float*, unsigned int*, int, long long, long long, long long, long long, float);

static AttnFn pick(int G) {
  switch (G) {
    case 1: return decode_attention_kernel<1>;
    case 2: return decode_attention_kernel<2>;
    case 4: return decode_attention_kernel<4>;
    case 8: return decode_attention_kernel<8>;
  }
  return nullptr;
}

}  // namespace anyquant_attn

// Returns nullptr on success, else an error message. part: float scratch of
// anyquant_decode_attention_part_floats(Hkv, G, L) floats; counters: Hkv unsigned ints, zero
// before the first launch (each launch leaves them zero).
int anyquant_decode_attention_part_floats(int Hkv, int G, int L) {
  using namespace anyquant_attn;
  return Hkv * ((L + KC - 1) / KC) * G * (D + 2);
}

const char* anyquant_decode_attention_launch(const void* q, const void* k, const void* v, const void* mask, void* out,
                                             void* part, void* counters, int Hkv, int G, int L, long long k_sh,
                                             long long k_sl, long long v_sh, long long v_sl, float scale,
                                             void* stream) {
  using namespace anyquant_attn;
  AttnFn fn = pick(G);
  if (!fn) return "anyquant decode_attention: query heads per key head must be 1, 2, 4 or 8";
  if (L < 1 || Hkv < 1) return "anyquant decode_attention: empty cache";
  const int NS = (L + KC - 1) / KC;
  if (NS > MAX_SPLITS) return "anyquant decode_attention: cache longer than 8192 positions";
  const float scale_log2e = scale * 1.4426950408889634f;
  fn<<<dim3(Hkv, NS), THREADS, 0, (cudaStream_t)stream>>>(
      (const __nv_bfloat16*)q, (const __nv_bfloat16*)k, (const __nv_bfloat16*)v, (const uint8_t*)mask,
      (__nv_bfloat16*)out, (float*)part, (unsigned int*)counters, L, k_sh, k_sl, v_sh, v_sl, scale_log2e);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
