// GroupNorm pieces shared by kernels/norm.cu (two-kernel path, any GPU) and kernels/norm_sm90.cu
// (single-pass cluster path, Hopper), so that both compute every element the same way.
#pragma once
#include "pack.cuh"

#define GROUPS 32

// σ(h) = 1/(1 + e^−h) with the fast __expf and a rounded reciprocal (≈ 1e-6 relative).
__device__ __forceinline__ float sigmoidf(float h) { return __frcp_rn(1.0f + __expf(-h)); }

// Chan et al.: merge (n_b, mean_b, M2_b) into (n, mean, M2).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  if (nb == 0.f) return;
  const float tot = n + nb, delta = meanb - mean, f = __fdividef(nb, tot);  // 2 ulp: no IEEE division chain
  mean = fmaf(delta, f, mean);
  m2 = m2 + m2b + delta * delta * n * f;
  n = tot;
}

// Backward, one element: x̂ = (x − mean)·rstd and d = dh·γ (dh = dy, or dy·σ(h)(1 + h(1 − σ(h)))
// with SiLU, h = γ·x̂ + β), d rounded once (__fmul_rn) so that the sums and the write see the same d:
// with zero variance (rstd = 1/√eps) a contracted fma would otherwise leave rstd·(rounding error).
__device__ __forceinline__ float gn_grad_in(float xv, float dyv, float g, float be, float2 st, int silu, float& xhat) {
  xhat = (xv - st.x) * st.y;
  float dh = dyv;
  if (silu) {
    const float h = fmaf(xhat, g, be), s = sigmoidf(h);
    dh = dyv * s * (1.f + h * (1.f - s));
  }
  return __fmul_rn(dh, g);
}
