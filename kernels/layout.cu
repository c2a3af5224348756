// Data movement for the UNet's up path, NHWC, storage T = float or bf16 (values copied or summed in
// f32). CPU twins in src/ops/layout.rs: upsample_nearest2x_cpu, upsample_nearest2x_backward_cpu,
// concat_channels_cpu, split_channels_cpu.
//
//   upsample2x_fwd  x [n, h, w, c] -> y [n, 2h, 2w, c]:  y[b, i, j, :] = x[b, ⌊i/2⌋, ⌊j/2⌋, :]
//   upsample2x_bwd  dy [n, 2h, 2w, c] -> dx [n, h, w, c]: dx[b, i, j, :] = Σ_{a,e∈{0,1}} dy[b, 2i+a, 2j+e, :]
//   concat_channels a [p, c1], b [p, c2] -> y [p, c1 + c2]: y[q] = a[q] | b[q]   (skip connections)
//   split_channels  y [p, c1 + c2] -> a [p, c1], b [p, c2] (the concat's backward)
//
// One block per pixel (grid.x = pixels of the tensor the block writes); threads step over channels E
// at a time (E divides every channel count involved).
#include "pack.cuh"

template <typename T, int E>
__device__ void upsample2x_fwd(const T* __restrict__ x, T* __restrict__ y, int h, int w, int c) {
  const int64_t p = blockIdx.x;  // output pixel (b, i, j) of [n, 2h, 2w]
  const int j = (int)(p % (2 * w)), i = (int)((p / (2 * w)) % (2 * h));
  const int64_t b = p / (4 * (int64_t)h * w);
  const T* src = x + ((b * h + i / 2) * w + j / 2) * c;
  T* dst = y + p * c;
  for (int k = threadIdx.x * E; k < c; k += blockDim.x * E) {
    float v[E];
    load_pack<T, E>(src + k, v);
    store_pack<T, E>(dst + k, v);
  }
}

template <typename T, int E>
__device__ void upsample2x_bwd(const T* __restrict__ dy, T* __restrict__ dx, int h, int w, int c) {
  const int64_t p = blockIdx.x;  // input pixel (b, i, j) of [n, h, w]
  const int j = (int)(p % w), i = (int)((p / w) % h);
  const int64_t b = p / ((int64_t)h * w);
  const int64_t row = 2 * (int64_t)w * c;  // one output row of dy
  const T* src = dy + ((b * 2 * h + 2 * i) * 2 * w + 2 * j) * c;
  for (int k = threadIdx.x * E; k < c; k += blockDim.x * E) {
    float s[E], v[E];
    load_pack<T, E>(src + k, s);
    load_pack<T, E>(src + c + k, v);
#pragma unroll
    for (int e = 0; e < E; ++e) s[e] += v[e];
    load_pack<T, E>(src + row + k, v);
#pragma unroll
    for (int e = 0; e < E; ++e) s[e] += v[e];
    load_pack<T, E>(src + row + c + k, v);
#pragma unroll
    for (int e = 0; e < E; ++e) s[e] += v[e];
    store_pack<T, E>(dx + p * c + k, s);
  }
}

template <typename T, int E>
__device__ void concat_channels(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int c1, int c2) {
  const int64_t p = blockIdx.x, c = c1 + c2;
  for (int k = threadIdx.x * E; k < c; k += blockDim.x * E) {
    float v[E];
    if (k < c1) load_pack<T, E>(a + p * c1 + k, v);
    else load_pack<T, E>(b + p * c2 + (k - c1), v);
    store_pack<T, E>(y + p * c + k, v);
  }
}

template <typename T, int E>
__device__ void split_channels(const T* __restrict__ y, T* __restrict__ a, T* __restrict__ b, int c1, int c2) {
  const int64_t p = blockIdx.x, c = c1 + c2;
  for (int k = threadIdx.x * E; k < c; k += blockDim.x * E) {
    float v[E];
    load_pack<T, E>(y + p * c + k, v);
    if (k < c1) store_pack<T, E>(a + p * c1 + k, v);
    else store_pack<T, E>(b + p * c2 + (k - c1), v);
  }
}

#define LAYOUT_KERNELS(TN, T, E)                                                                                   \
  extern "C" __global__ void upsample2x_fwd_##TN##_v##E(const T* x, T* y, int h, int w, int c) { await_previous_kernel(); \
    upsample2x_fwd<T, E>(x, y, h, w, c);                                                                        \
  }                                                                                                             \
  extern "C" __global__ void upsample2x_bwd_##TN##_v##E(const T* dy, T* dx, int h, int w, int c) { await_previous_kernel(); \
    upsample2x_bwd<T, E>(dy, dx, h, w, c);                                                                      \
  }                                                                                                             \
  extern "C" __global__ void concat_channels_##TN##_v##E(const T* a, const T* b, T* y, int c1, int c2) { await_previous_kernel(); \
    concat_channels<T, E>(a, b, y, c1, c2);                                                                     \
  }                                                                                                             \
  extern "C" __global__ void split_channels_##TN##_v##E(const T* y, T* a, T* b, int c1, int c2) { await_previous_kernel(); \
    split_channels<T, E>(y, a, b, c1, c2);                                                                      \
  }

LAYOUT_KERNELS(f32, float, 1)
LAYOUT_KERNELS(f32, float, 2)
LAYOUT_KERNELS(f32, float, 4)
LAYOUT_KERNELS(bf16, bf16, 1)
LAYOUT_KERNELS(bf16, bf16, 2)
LAYOUT_KERNELS(bf16, bf16, 4)
LAYOUT_KERNELS(bf16, bf16, 8)
