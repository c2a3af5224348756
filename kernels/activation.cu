// Gated and CLIP activations, storage T = float or bf16, math in f32. CPU twins: geglu_cpu,
// geglu_backward_cpu, quick_gelu_cpu in src/ops/activation.rs.
//
//   geglu_fwd   x [m, 2d] = [hidden | gate] (diffusers' GEGLU: proj(x).chunk(2, dim=-1)), y [m, d]:
//               y = hidden · gelu(gate),  gelu(g) = g·Φ(g), Φ(g) = ½(1 + erf(g/√2)) (exact, erf-based)
//   geglu_bwd   dx [m, 2d]:  d hidden = dy · gelu(gate);  d gate = dy · hidden · (Φ(gate) + gate·φ(gate)),
//               φ(g) = e^(−g²/2)/√(2π)
//   quick_gelu_fwd  y = x · σ(1.702·x)  (CLIP's activation; forward only: the text encoder is frozen
//               and run once before training)
//
// GEGLU: one block per row, threads step over the d columns E at a time (E divides d).
#include "pack.cuh"

__device__ __forceinline__ float phi_cdf(float g) { return 0.5f * (1.0f + erff(g * 0.70710678118654752f)); }
__device__ __forceinline__ float phi_pdf(float g) { return 0.39894228040143268f * expf(-0.5f * g * g); }

template <typename T, int E>
__device__ void geglu_fwd(const T* __restrict__ x, T* __restrict__ y, int d) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * 2 * d;
  T* yr = y + row * d;
  for (int k = threadIdx.x * E; k < d; k += blockDim.x * E) {
    float h[E], g[E];
    load_pack<T, E>(xr + k, h);
    load_pack<T, E>(xr + d + k, g);
#pragma unroll
    for (int i = 0; i < E; ++i) h[i] *= g[i] * phi_cdf(g[i]);
    store_pack<T, E>(yr + k, h);
  }
}

template <typename T, int E>
__device__ void geglu_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int d) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * 2 * d;
  const T* dyr = dy + row * d;
  T* dxr = dx + row * 2 * d;
  for (int k = threadIdx.x * E; k < d; k += blockDim.x * E) {
    float h[E], g[E], dd[E], dh[E];
    load_pack<T, E>(xr + k, h);
    load_pack<T, E>(xr + d + k, g);
    load_pack<T, E>(dyr + k, dd);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float cdf = phi_cdf(g[i]);
      dh[i] = dd[i] * g[i] * cdf;
      g[i] = dd[i] * h[i] * (cdf + g[i] * phi_pdf(g[i]));
    }
    store_pack<T, E>(dxr + k, dh);
    store_pack<T, E>(dxr + d + k, g);
  }
}

#define GEGLU_KERNELS(TN, T, E)                                                                                    \
  extern "C" __global__ void geglu_fwd_##TN##_v##E(const T* x, T* y, int d) { await_previous_kernel(); geglu_fwd<T, E>(x, y, d); } \
  extern "C" __global__ void geglu_bwd_##TN##_v##E(const T* x, const T* dy, T* dx, int d) { await_previous_kernel(); \
    geglu_bwd<T, E>(x, dy, dx, d);                                                                              \
  }

GEGLU_KERNELS(f32, float, 1)
GEGLU_KERNELS(f32, float, 2)
GEGLU_KERNELS(f32, float, 4)
GEGLU_KERNELS(bf16, bf16, 1)
GEGLU_KERNELS(bf16, bf16, 2)
GEGLU_KERNELS(bf16, bf16, 4)
GEGLU_KERNELS(bf16, bf16, 8)

template <typename T>
__device__ void quick_gelu(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  FOR_EACH_INDEX(i, n) {
    const float v = to_f32(x[i]);
    y[i] = from_f32<T>(v / (1.0f + expf(-1.702f * v)));
  }
}
extern "C" __global__ void quick_gelu_fwd_f32(const float* x, float* y, int64_t n) { await_previous_kernel(); quick_gelu(x, y, n); }
extern "C" __global__ void quick_gelu_fwd_bf16(const bf16* x, bf16* y, int64_t n) { await_previous_kernel(); quick_gelu(x, y, n); }
