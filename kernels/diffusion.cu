// Kernels of the diffusion training step around the UNet. CPU twins in src/ops/diffusion.rs:
// timestep_embedding_cpu, draw_step_noise_cpu, mse_min_snr_cpu, mse_min_snr_backward_cpu.
//
// timestep_embedding_{f32,bf16}  t [b] (f32 holding integers) → emb [b, dim], diffusers'
//   get_timestep_embedding in f32: half = ⌊dim/2⌋, e_j = (j · nlog) / (half − shift), nlog = −ln(max_period)
//   as f32, f_j = exp(e_j) (rounded from f64), a_j = t·f_j;  emb = [sin a | cos a], or [cos a | sin a]
//   when flip != 0 (SD1.5: flip_sin_to_cos = True, shift 0, dim 320, max_period 10000); odd dim: last = 0.
//   One block per sample.
//
// draw_step_noise_{f32,bf16}  the step's randomness (philox.cuh, key = seed, step = *step):
//   eps [b, n] ~ N(0, 1) from stream 0 (block j of 4 values = counter j, as philox_normal_*);
//   t [b] = below(word 0 of philox(counter = (b, stream 1, step)), num_timesteps), as f32;
//   when x0 != null also the noisy input x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·eps (ᾱ = alphas_cumprod [T], f32).
//
// mse_min_snr_fwd_{f32,bf16}  loss = (1/b) Σ_s w_s · (1/n) Σ_i (pred − target)²,  one block of 1024,
//   fixed reduction order (deterministic); w_s = min(snr, γ)/snr with snr = ᾱ_t/(1 − ᾱ_t), or 1 when γ ≤ 0.
// mse_min_snr_bwd_{f32,bf16}  dpred = scale · w_s · 2(pred − target)/(b·n).
#include "common.cuh"
#include "philox.cuh"

template <typename T>
__device__ void timestep_embedding(const float* __restrict__ t, T* __restrict__ emb, int dim, float nlog, float shift, int flip) {
  const int b = blockIdx.x, half = dim / 2;
  const float tv = t[b];
  T* row = emb + (int64_t)b * dim;
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const float e = ((float)j * nlog) / ((float)half - shift);
    const float a = tv * (float)exp((double)e);
    const float s = sinf(a), c = cosf(a);
    row[j] = from_f32<T>(flip ? c : s);
    row[half + j] = from_f32<T>(flip ? s : c);
  }
  if (dim % 2 == 1 && threadIdx.x == 0) row[dim - 1] = from_f32<T>(0.f);
}

extern "C" __global__ void timestep_embedding_f32(const float* t, float* emb, int dim, float nlog, float shift, int flip) {
  await_previous_kernel();
  timestep_embedding(t, emb, dim, nlog, shift, flip);
}
extern "C" __global__ void timestep_embedding_bf16(const float* t, bf16* emb, int dim, float nlog, float shift, int flip) {
  await_previous_kernel();
  timestep_embedding(t, emb, dim, nlog, shift, flip);
}

__device__ __forceinline__ uint32_t step_timestep(int b, uint32_t step, uint32_t seed_lo, uint32_t seed_hi, uint32_t num_timesteps) {
  return philox_below(philox_block((uint64_t)b, 1u, step, seed_lo, seed_hi).x, num_timesteps);
}

template <typename T>
__device__ void draw_step_noise(T* __restrict__ eps, float* __restrict__ t, const T* __restrict__ x0, T* __restrict__ xt,
                                const float* __restrict__ alphas_cumprod, int batch, int64_t n, uint32_t seed_lo,
                                uint32_t seed_hi, const uint32_t* __restrict__ step, uint32_t num_timesteps) {
  const uint32_t s = *step;
  const int64_t total = (int64_t)batch * n;
  FOR_EACH_INDEX(j, max((total + 3) / 4, (int64_t)batch)) {
    if (j < batch) t[j] = (float)step_timestep((int)j, s, seed_lo, seed_hi, num_timesteps);
    if (4 * j >= total) continue;
    const uint4 w = philox_block(j, 0u, s, seed_lo, seed_hi);
    const float2 a = philox_normal_pair(w.x, w.y), c = philox_normal_pair(w.z, w.w);
    const float z[4] = {a.x, a.y, c.x, c.y};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * j + k;
      if (i >= total) break;
      const T e = from_f32<T>(z[k]);
      eps[i] = e;
      if (x0 != nullptr) {
        const float ab = alphas_cumprod[step_timestep((int)(i / n), s, seed_lo, seed_hi, num_timesteps)];
        xt[i] = from_f32<T>(sqrtf(ab) * to_f32(x0[i]) + sqrtf(1.f - ab) * to_f32(e));
      }
    }
  }
}

extern "C" __global__ void draw_step_noise_f32(float* eps, float* t, const float* x0, float* xt, const float* alphas_cumprod,
                                               int batch, int64_t n, uint32_t seed_lo, uint32_t seed_hi, const uint32_t* step,
                                               uint32_t num_timesteps) {
  await_previous_kernel();
  draw_step_noise(eps, t, x0, xt, alphas_cumprod, batch, n, seed_lo, seed_hi, step, num_timesteps);
}
extern "C" __global__ void draw_step_noise_bf16(bf16* eps, float* t, const bf16* x0, bf16* xt, const float* alphas_cumprod,
                                                int batch, int64_t n, uint32_t seed_lo, uint32_t seed_hi, const uint32_t* step,
                                                uint32_t num_timesteps) {
  await_previous_kernel();
  draw_step_noise(eps, t, x0, xt, alphas_cumprod, batch, n, seed_lo, seed_hi, step, num_timesteps);
}

__device__ __forceinline__ float min_snr_weight(const float* t, const float* alphas_cumprod, int s, float gamma) {
  if (gamma <= 0.f) return 1.f;
  const float ab = alphas_cumprod[(int)t[s]];
  const float snr = ab / (1.f - ab);
  return fminf(snr, gamma) / snr;
}

template <typename T>
__device__ void mse_min_snr_fwd(const T* __restrict__ pred, const T* __restrict__ target, const float* __restrict__ t,
                                const float* __restrict__ alphas_cumprod, float* __restrict__ loss, int batch, int64_t n,
                                float gamma) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float total = 0.f;  // meaningful in thread 0
  for (int s = 0; s < batch; ++s) {
    const T* p = pred + (int64_t)s * n;
    const T* q = target + (int64_t)s * n;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float d = to_f32(p[i]) - to_f32(q[i]);
      acc = fmaf(d, d, acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.f;
      for (int w = 0; w < warps; ++w) sum += warp_sums[w];
      total += min_snr_weight(t, alphas_cumprod, s, gamma) * (sum / (float)n);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = total / (float)batch;
}

template <typename T>
__device__ void mse_min_snr_bwd(const T* __restrict__ pred, const T* __restrict__ target, const float* __restrict__ t,
                                const float* __restrict__ alphas_cumprod, T* __restrict__ dpred, int batch, int64_t n,
                                float gamma, float scale) {
  const float c = 2.f * scale / ((float)batch * (float)n);
  FOR_EACH_INDEX(i, (int64_t)batch * n) {
    const float w = min_snr_weight(t, alphas_cumprod, (int)(i / n), gamma);
    dpred[i] = from_f32<T>(c * w * (to_f32(pred[i]) - to_f32(target[i])));
  }
}

#define LOSS_KERNELS(TN, T)                                                                                         \
  extern "C" __global__ void mse_min_snr_fwd_##TN(const T* pred, const T* target, const float* t, const float* ac,   \
                                                  float* loss, int batch, int64_t n, float gamma) { await_previous_kernel(); \
    mse_min_snr_fwd(pred, target, t, ac, loss, batch, n, gamma);                                                    \
  }                                                                                                                 \
  extern "C" __global__ void mse_min_snr_bwd_##TN(const T* pred, const T* target, const float* t, const float* ac,   \
                                                  T* dpred, int batch, int64_t n, float gamma, float scale) { await_previous_kernel(); \
    mse_min_snr_bwd(pred, target, t, ac, dpred, batch, n, gamma, scale);                                            \
  }
LOSS_KERNELS(f32, float)
LOSS_KERNELS(bf16, bf16)

// draw_latents_f32  the step's clean latents from the cached VAE posteriors (CPU twin: draw_latents_cpu):
//   for sample j < batch: slot = *step · batch + j, e = picks[slot] (which example),
//   z ~ N(0, 1) from philox(counter = (block, stream, slot), key = seed) as philox_normal_*,
//   x0[j, i] = (mean[e, i] + std[e, i] · z_i) · scale, with separately rounded f32 operations (as the twin).
extern "C" __global__ void draw_latents_f32(float* __restrict__ x0, const float* __restrict__ means,
                                            const float* __restrict__ stds, const uint32_t* __restrict__ picks, int batch,
                                            int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                            const uint32_t* __restrict__ step, float scale) {
  await_previous_kernel();
  const uint32_t s = *step;
  const int64_t blocks = (n + 3) / 4;
  FOR_EACH_INDEX(k, (int64_t)batch * blocks) {
    const int64_t j = k / blocks, b = k % blocks;
    const uint32_t slot = s * (uint32_t)batch + (uint32_t)j;
    const int64_t e = picks[slot];
    const uint4 w = philox_block((uint64_t)b, stream, slot, seed_lo, seed_hi);
    const float2 p = philox_normal_pair(w.x, w.y), q = philox_normal_pair(w.z, w.w);
    const float z[4] = {p.x, p.y, q.x, q.y};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = 4 * b + c;
      if (i < n) x0[j * n + i] = __fmul_rn(__fadd_rn(means[e * n + i], __fmul_rn(stds[e * n + i], z[c])), scale);
    }
  }
}

// gather_rows_bf16  out[j, :] = table[picks[*step · batch + j], :] (row_len values): the step's caption states.
extern "C" __global__ void gather_rows_bf16(bf16* __restrict__ out, const bf16* __restrict__ table,
                                            const uint32_t* __restrict__ picks, int batch, int64_t row_len,
                                            const uint32_t* __restrict__ step) {
  await_previous_kernel();
  const uint32_t s = *step;
  FOR_EACH_INDEX(i, (int64_t)batch * row_len) {
    const int64_t j = i / row_len;
    out[i] = table[(int64_t)picks[s * (uint32_t)batch + (uint32_t)j] * row_len + i % row_len];
  }
}
