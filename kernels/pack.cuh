// Vector loads and stores for kernels that read E consecutive elements of T (float or bf16) at a
// time (E·sizeof(T) ≤ 16 bytes, the address a multiple of that), converting to and from f32; and a
// warp-wide f32 sum. Used by norm.cu, activation.cu and layout.cu.
#pragma once
#include "common.cuh"

template <typename T, int E>
struct alignas(sizeof(T) * E) Pack {
  T v[E];
};

template <typename T, int E>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[E]) {
  Pack<T, E> pk = *reinterpret_cast<const Pack<T, E>*>(p);
#pragma unroll
  for (int i = 0; i < E; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int E>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[E]) {
  Pack<T, E> pk;
#pragma unroll
  for (int i = 0; i < E; ++i) pk.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Pack<T, E>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
