// Elementwise kernels: every one reads and writes n values of type T (float or bf16) and computes
// in f32. Each has an `_f32` and a `_bf16` entry point. CPU twins: src/ops/elementwise.rs.
//
//   add        y = a + b
//   scale      y = alpha · x
//   silu_fwd   y = x · σ(x)                        σ(x) = 1 / (1 + e^-x)
//   silu_bwd   dx = dy · σ(x) · (1 + x · (1 − σ(x)))
//   gelu_fwd   y = x · Φ(x)                        Φ(x) = ½ erfc(−x / √2)   (exact GELU, torch's default)
//   gelu_bwd   dx = dy · (Φ(x) + x · φ(x))         φ(x) = e^(−x²/2) / √(2π)
//   cast_f32_to_bf16 / cast_bf16_to_f32   round-to-nearest-even / exact widening
//   add_channel_bias   y[b, p, c] = x[b, p, c] + e[b, c]   (x: batch × per_sample values, c channels last;
//                      the resnets' time-embedding add)
#include "common.cuh"

struct Silu {
  __device__ float operator()(float x) const { return x / (1.0f + expf(-x)); }
};
struct Gelu {
  // Φ(x) as ½·erfc(−x/√2): no cancellation in the negative tail, where 1 + erf(x/√2) loses digits.
  __device__ float operator()(float x) const { return 0.5f * x * erfcf(-x * 0.70710678118654752f); }
};
struct SiluGrad {  // (x, dy) -> dx
  __device__ float operator()(float x, float dy) const {
    float s = 1.0f / (1.0f + expf(-x));
    return dy * s * (1.0f + x * (1.0f - s));
  }
};
struct GeluGrad {
  __device__ float operator()(float x, float dy) const {
    float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
    float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return dy * (cdf + x * pdf);
  }
};
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ void unary(const T* __restrict__ x, T* __restrict__ y, int64_t n, Op op) {
  FOR_EACH_INDEX(i, n) y[i] = from_f32<T>(op(to_f32(x[i])));
}

template <typename T, typename Op>
__device__ __forceinline__ void binary(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t n, Op op) {
  FOR_EACH_INDEX(i, n) y[i] = from_f32<T>(op(to_f32(a[i]), to_f32(b[i])));
}

#define UNARY(NAME, OP)                                                                                   \
  extern "C" __global__ void NAME##_f32(const float* x, float* y, int64_t n) { await_previous_kernel(); unary(x, y, n, OP()); } \
  extern "C" __global__ void NAME##_bf16(const bf16* x, bf16* y, int64_t n) { await_previous_kernel(); unary(x, y, n, OP()); }

#define BINARY(NAME, OP)                                                                  \
  extern "C" __global__ void NAME##_f32(const float* a, const float* b, float* y, int64_t n) { await_previous_kernel(); \
    binary(a, b, y, n, OP());                                                             \
  }                                                                                       \
  extern "C" __global__ void NAME##_bf16(const bf16* a, const bf16* b, bf16* y, int64_t n) { await_previous_kernel(); \
    binary(a, b, y, n, OP());                                                             \
  }

UNARY(silu_fwd, Silu)
UNARY(gelu_fwd, Gelu)
BINARY(add, Add)
BINARY(silu_bwd, SiluGrad)
BINARY(gelu_bwd, GeluGrad)

template <typename T>
__device__ __forceinline__ void scale(const T* __restrict__ x, T* __restrict__ y, float alpha, int64_t n) {
  FOR_EACH_INDEX(i, n) y[i] = from_f32<T>(alpha * to_f32(x[i]));
}
extern "C" __global__ void scale_f32(const float* x, float* y, float alpha, int64_t n) { await_previous_kernel(); scale(x, y, alpha, n); }
extern "C" __global__ void scale_bf16(const bf16* x, bf16* y, float alpha, int64_t n) { await_previous_kernel(); scale(x, y, alpha, n); }

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, int64_t n) {
  await_previous_kernel();
  FOR_EACH_INDEX(i, n) y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void cast_bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, int64_t n) {
  await_previous_kernel();
  FOR_EACH_INDEX(i, n) y[i] = __bfloat162float(x[i]);
}

template <typename T>
__device__ __forceinline__ void add_channel_bias(const T* __restrict__ x, const T* __restrict__ e, T* __restrict__ y,
                                                 int64_t n, int64_t per_sample, int channels) {
  FOR_EACH_INDEX(i, n) y[i] = from_f32<T>(to_f32(x[i]) + to_f32(e[(i / per_sample) * channels + i % channels]));
}
extern "C" __global__ void add_channel_bias_f32(const float* x, const float* e, float* y, int64_t n, int64_t per_sample, int c) {
  await_previous_kernel();
  add_channel_bias(x, e, y, n, per_sample, c);
}
extern "C" __global__ void add_channel_bias_bf16(const bf16* x, const bf16* e, bf16* y, int64_t n, int64_t per_sample, int c) {
  await_previous_kernel();
  add_channel_bias(x, e, y, n, per_sample, c);
}
