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
//
// adamw_grad_sq_partial: block b writes part[b] = Σ g² over its grid-stride share (f32, block tree).
// adamw_step: every block re-reduces part[0..nparts) in the same fixed order (so all blocks get the
// same ‖g‖ bit for bit), then updates its grid-stride share of the parameters.
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
  __shared__ float sh[32];
  float acc = 0.f;
  FOR_EACH_INDEX(i, n) acc = fmaf(g[i], g[i], acc);
  const float s = block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// lr, beta1, beta2, wd are f64 (Python floats in torch): the bias corrections, step size, the
// (1 − β) lerp weights and decay = 1 − lr·wd are formed in f64 and rounded once.
extern "C" __global__ void adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, int64_t n, const uint32_t* __restrict__ step,
                                      const double* __restrict__ lr_table, int lr_len, double beta1, double beta2,
                                      float eps, double weight_decay, const float* __restrict__ part, int nparts,
                                      float max_norm) {
  __shared__ float sh[32];
  float clip = 1.f;
  if (part != nullptr) {
    float acc = 0.f;
    for (int k = threadIdx.x; k < nparts; k += blockDim.x) acc += part[k];
    const float norm = sqrtf(block_sum(acc, sh));
    clip = fminf(1.f, max_norm / (norm + 1e-6f));
  }
  const uint32_t ti = *step;
  const double lr = lr_table[(ti < (uint32_t)lr_len ? ti : (uint32_t)lr_len) - 1];
  const float decay = (float)(1.0 - lr * weight_decay);
  const double t = (double)ti;
  const double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
  const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
  const float w1 = (float)(1.0 - beta1), w2 = (float)(1.0 - beta2), b2 = (float)beta2;
  FOR_EACH_INDEX(i, n) {
    const float gi = g[i] * clip;
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * b2 + w2 * gi * gi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}
