// Fused AdamW step over one flat f32 buffer of trainable parameters (the LoRA weights), with f32
// master weights and moments, torch.optim.AdamW's formula (foreach implementation, amsgrad off).
// CPU twin: adamw_step_cpu in src/ops/adamw.rs.
//
//   t = *step (device u32, ≥ 1: the caller advances it with counter_increment_u32 before the step)
//   lr = lr_table[min(t, lr_len) − 1] (f64: the schedule's rate per step, so a replayed graph follows it)
//   bc1 = 1 − β1^t, bc2 = 1 − β2^t (f64), step_size = lr/bc1, bc2_sqrt = √bc2 (f64, then f32)
//   g ← g · clip  (clip = min(1, max_norm/(‖g‖₂ + 1e-6)) when part != null, as clip_grad_norm_)
//   p ← p · (1 − lr·wd)
//   m ← m + (1 − β1)·(g − m)                 (torch's lerp for weights < 0.5)
//   v ← v·β2 + (1 − β2)·g·g
//   p ← p − step_size · m / (√v / bc2_sqrt + eps)
//   p16 ← bf16(p), round to nearest even (when p16 != null: the copy the GEMMs read, written here
//   instead of by a separate cast launch)
//
// adamw_grad_sq_partial: block b writes part[b] = Σ g² over its grid-stride share (f32, block tree).
// adamw_step: every block re-reduces part[0..nparts) in the same fixed order (so all blocks get the
// same ‖g‖ bit for bit), then updates its grid-stride share of the parameters.
//
// adamw_step_8bit: the same step with 8-bit moments (CPU twin: adamw_step_8bit_cpu). Values go in
// blocks of 256 (QBLOCK), each with scales (sm, sv) = the block's max |m| and max v after the
// step. A value x in [0, 1] relative to its scale is stored as a level on a log scale, 8 levels per
// octave: level L ≥ 1 means x = 2^((L − LMAX)/8), level 0 means 0 (x below 2^(−LMAX/8)); rounding
// picks the nearest level in log space (≤ 4.4 % relative error). m: sign bit + 7-bit level
// (LMAX 127: 16 octaves), v: 8-bit level (LMAX 255: 32 octaves, so that √v keeps 16). Encoding and
// decoding use only exact operations (exponent bits, comparisons against f32 constants, scaling by
// powers of two), so the GPU and the twin agree on every level they are given the same value for.
#include "common.cuh"

__device__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += sh[w];
  __syncthreads();
  return s;
}

extern "C" __global__ void adamw_grad_sq_partial(const float* __restrict__ g, float* __restrict__ part, int64_t n) {
  await_previous_kernel();
  __shared__ float sh[32];
  float acc = 0.f;
  FOR_EACH_INDEX(i, n) acc = fmaf(g[i], g[i], acc);
  const float s = block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// The scalars of the step *step, shared by both step kernels: the clip factor (every block
// re-reduces part[0..nparts) in the same order), the rate from the table, the decay, the bias
// corrections and the lerp weights (f64, rounded once).
struct StepScalars {
  float clip, decay, step_size, bc2_sqrt, w1, w2, b2, eps;
};

__device__ __forceinline__ StepScalars step_scalars(const uint32_t* step, const double* lr_table, int lr_len, double beta1,
                                                    double beta2, float eps, double weight_decay, const float* part,
                                                    int nparts, float max_norm, float* sh) {
  StepScalars k;
  k.clip = 1.f;
  if (part != nullptr) {
    float acc = 0.f;
    for (int j = threadIdx.x; j < nparts; j += blockDim.x) acc += part[j];
    const float norm = sqrtf(block_sum(acc, sh));
    k.clip = fminf(1.f, max_norm / (norm + 1e-6f));
  }
  const uint32_t ti = *step;
  const double lr = lr_table[(ti < (uint32_t)lr_len ? ti : (uint32_t)lr_len) - 1];
  k.decay = (float)(1.0 - lr * weight_decay);
  const double t = (double)ti;
  const double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
  k.step_size = (float)(lr / bc1), k.bc2_sqrt = (float)sqrt(bc2);
  k.w1 = (float)(1.0 - beta1), k.w2 = (float)(1.0 - beta2), k.b2 = (float)beta2, k.eps = eps;
  return k;
}

// One value's AdamW update in torch's order of f32 operations: m, v and p updated in place.
__device__ __forceinline__ void adamw_value(float& p, float& m, float& v, float g, const StepScalars& k) {
  const float gi = g * k.clip;
  m = m + k.w1 * (gi - m);
  v = v * k.b2 + k.w2 * gi * gi;
  const float denom = sqrtf(v) / k.bc2_sqrt + k.eps;
  p = p * k.decay - k.step_size * (m / denom);
}

// lr, beta1, beta2, wd are f64 (Python floats in torch): the bias corrections, step size, the
// (1 − β) lerp weights and decay = 1 − lr·wd are formed in f64 and rounded once.
extern "C" __global__ void adamw_step(float* __restrict__ p, bf16* __restrict__ p16, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, int64_t n, const uint32_t* __restrict__ step,
                                      const double* __restrict__ lr_table, int lr_len, double beta1, double beta2,
                                      float eps, double weight_decay, const float* __restrict__ part, int nparts,
                                      float max_norm) {
  await_previous_kernel();
  __shared__ float sh[32];
  const StepScalars k = step_scalars(step, lr_table, lr_len, beta1, beta2, eps, weight_decay, part, nparts, max_norm, sh);
  // Four values per thread and iteration (16-byte loads and stores) where every buffer allows,
  // then the rest one by one: the same operations per value either way.
  const uintptr_t f32_addrs = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(m) |
                              reinterpret_cast<uintptr_t>(v);
  const bool vec = (f32_addrs & 15) == 0 && (reinterpret_cast<uintptr_t>(p16) & 7) == 0;
  const int64_t head = vec ? n / 4 * 4 : 0;
  FOR_EACH_INDEX(j, head / 4) {
    float4 pj = reinterpret_cast<float4*>(p)[j], mj = reinterpret_cast<float4*>(m)[j], vj = reinterpret_cast<float4*>(v)[j];
    const float4 gj = reinterpret_cast<const float4*>(g)[j];
    adamw_value(pj.x, mj.x, vj.x, gj.x, k);
    adamw_value(pj.y, mj.y, vj.y, gj.y, k);
    adamw_value(pj.z, mj.z, vj.z, gj.z, k);
    adamw_value(pj.w, mj.w, vj.w, gj.w, k);
    reinterpret_cast<float4*>(p)[j] = pj;
    reinterpret_cast<float4*>(m)[j] = mj;
    reinterpret_cast<float4*>(v)[j] = vj;
    if (p16) {
      __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(p16) + 2 * j;
      out[0] = __floats2bfloat162_rn(pj.x, pj.y);
      out[1] = __floats2bfloat162_rn(pj.z, pj.w);
    }
  }
  FOR_EACH_INDEX(t, n - head) {
    const int64_t i = head + t;
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_value(pi, mi, vi, g[i], k);
    p[i] = pi;
    if (p16) p16[i] = __float2bfloat16_rn(pi);
    m[i] = mi;
    v[i] = vi;
  }
}

#define QBLOCK 256

// 2^((k + 0.5)/8) and 2^(k/8), k = 0..7, as f32 (the twin holds the same constants).
__device__ __forceinline__ float level_threshold(int k) {
  const float t[8] = {1.0442737f, 1.1387886f, 1.2418578f, 1.3542556f,
                      1.4768262f, 1.6104903f,  1.7562522f, 1.9152066f};
  return t[k];
}
__device__ __forceinline__ float level_value(int k) {
  const float v[8] = {1.0f, 1.0905077f, 1.1892071f, 1.2968396f,
                      1.4142135f, 1.5422108f, 1.6817929f, 1.8340081f};
  return v[k];
}

// Level of x in [0, 1] (0: below the lowest level).
__device__ __forceinline__ int encode_level(float x, int lmax) {
  const uint32_t bits = __float_as_uint(x);
  const int e = (int)(bits >> 23) - 127;                       // x = f·2^e, f in [1, 2)
  if (x <= 0.0f || e < -64) return 0;
  const float f = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
  int j = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) j += f >= level_threshold(k);
  const int level = lmax + 8 * e + j;
  return level < 1 ? 0 : min(level, lmax);
}

__device__ __forceinline__ float decode_level(int level, int lmax, float scale) {
  if (level == 0) return 0.0f;
  const int l = level - lmax;                                  // ≤ 0
  const int e = l >= 0 ? l / 8 : -((-l + 7) / 8);              // floor(l / 8)
  return __fmul_rn(ldexpf(level_value(l - 8 * e), e), scale);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per group of QBLOCK values (8 per lane, vector loads), grid-stride over groups; the
// groups' maxima are warp reductions (no block barrier in the loop).
extern "C" __global__ void __launch_bounds__(256) adamw_step_8bit(
    float* __restrict__ p, bf16* __restrict__ p16, const float* __restrict__ g, uint8_t* __restrict__ qm, uint8_t* __restrict__ qv,
    float2* __restrict__ scales, int64_t n, const uint32_t* __restrict__ step, const double* __restrict__ lr_table,
    int lr_len, double beta1, double beta2, float eps, double weight_decay, const float* __restrict__ part, int nparts,
    float max_norm) {
  await_previous_kernel();
  __shared__ float sh[32];
  const StepScalars k = step_scalars(step, lr_table, lr_len, beta1, beta2, eps, weight_decay, part, nparts, max_norm, sh);
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const bool aligned = ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(p16)) & 15) == 0 &&
                       ((reinterpret_cast<uintptr_t>(qm) | reinterpret_cast<uintptr_t>(qv)) & 7) == 0;
  const int64_t groups = (n + QBLOCK - 1) / QBLOCK;
  for (int64_t grp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); grp < groups; grp += (int64_t)gridDim.x * warps) {
    const int64_t i0 = grp * QBLOCK + lane * 8;
    // Vector accesses for whole, aligned 8-value runs (all but possibly the last group's tail).
    const bool vec = i0 + 8 <= n && aligned;
    const float2 sc = scales[grp];
    float mi[8], vi[8], pi[8], gi[8];
    uint8_t cm[8], cv[8];
    if (vec) {
      *reinterpret_cast<uint2*>(cm) = *reinterpret_cast<const uint2*>(qm + i0);
      *reinterpret_cast<uint2*>(cv) = *reinterpret_cast<const uint2*>(qv + i0);
      *reinterpret_cast<float4*>(pi) = *reinterpret_cast<const float4*>(p + i0);
      *reinterpret_cast<float4*>(pi + 4) = *reinterpret_cast<const float4*>(p + i0 + 4);
      *reinterpret_cast<float4*>(gi) = *reinterpret_cast<const float4*>(g + i0);
      *reinterpret_cast<float4*>(gi + 4) = *reinterpret_cast<const float4*>(g + i0 + 4);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool ok = i0 + e < n;
        cm[e] = ok ? qm[i0 + e] : 0, cv[e] = ok ? qv[i0 + e] : 0;
        pi[e] = ok ? p[i0 + e] : 0.f, gi[e] = ok ? g[i0 + e] : 0.f;
      }
    }
    float am = 0.f, av = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float mag = decode_level(cm[e] & 127, 127, sc.x);
      float m = (cm[e] & 128) ? -mag : mag;
      float v = decode_level(cv[e], 255, sc.y);
      adamw_value(pi[e], m, v, gi[e], k);
      if (i0 + e >= n) m = v = 0.f;  // past the end: no effect on the maxima
      mi[e] = m, vi[e] = v;
      am = fmaxf(am, fabsf(m)), av = fmaxf(av, v);
    }
    const float sm = warp_max(am), sv = warp_max(av);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int lm = sm > 0.f ? encode_level(__fdiv_rn(fabsf(mi[e]), sm), 127) : 0;
      cm[e] = (uint8_t)((mi[e] < 0.f && lm > 0 ? 128 : 0) | lm);
      cv[e] = (uint8_t)(sv > 0.f ? encode_level(__fdiv_rn(vi[e], sv), 255) : 0);
    }
    if (vec) {
      *reinterpret_cast<uint2*>(qm + i0) = *reinterpret_cast<const uint2*>(cm);
      *reinterpret_cast<uint2*>(qv + i0) = *reinterpret_cast<const uint2*>(cv);
      *reinterpret_cast<float4*>(p + i0) = *reinterpret_cast<const float4*>(pi);
      *reinterpret_cast<float4*>(p + i0 + 4) = *reinterpret_cast<const float4*>(pi + 4);
      if (p16) {
        uint4 packed;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
        for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(pi[2 * q], pi[2 * q + 1]);
        *reinterpret_cast<uint4*>(p16 + i0) = packed;
      }
    } else {
      for (int e = 0; e < 8 && i0 + e < n; ++e) {
        qm[i0 + e] = cm[e], qv[i0 + e] = cv[e], p[i0 + e] = pi[e];
        if (p16) p16[i0 + e] = __float2bfloat16_rn(pi[e]);
      }
    }
    if (lane == 0) scales[grp] = make_float2(sm, sv);
  }
}
