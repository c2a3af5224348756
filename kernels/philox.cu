// Device random numbers from Philox4x32-10 (philox.cuh: keying and conversions). CPU twins:
// philox_uniform_cpu / philox_normal_cpu in src/ops/philox.rs.
//
//   philox_uniform_f32   out[i] = uniform(word i)                      i < n
//   philox_normal_{f32,bf16}  out[i] = mean + std · normal(word pair)  i < n
//     word i is output i % 4 of philox(counter = (i / 4, stream, *step), key = seed); normals take
//     words (0, 1) → outputs 0, 1 and words (2, 3) → outputs 2, 3 of each block.
//   counter_increment_u32   *c += 1 (one thread): advances the step counter inside a captured graph.
//
// One thread per block of 4 outputs.
#include "common.cuh"
#include "philox.cuh"

extern "C" __global__ void philox_uniform_f32(float* __restrict__ out, int64_t n, uint32_t seed_lo, uint32_t seed_hi,
                                              uint32_t stream, const uint32_t* __restrict__ step) {
  await_previous_kernel();
  const uint32_t s = *step;
  FOR_EACH_INDEX(j, (n + 3) / 4) {
    const uint4 w = philox_block(j, stream, s, seed_lo, seed_hi);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * j + k < n) out[4 * j + k] = philox_uniform(words[k]);
  }
}

template <typename T>
__device__ void philox_normal(T* __restrict__ out, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                              const uint32_t* __restrict__ step, float mean, float std) {
  const uint32_t s = *step;
  FOR_EACH_INDEX(j, (n + 3) / 4) {
    const uint4 w = philox_block(j, stream, s, seed_lo, seed_hi);
    const float2 a = philox_normal_pair(w.x, w.y), b = philox_normal_pair(w.z, w.w);
    const float z[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * j + k < n) out[4 * j + k] = from_f32<T>(fmaf(std, z[k], mean));
  }
}

extern "C" __global__ void philox_normal_f32(float* out, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                             const uint32_t* step, float mean, float std) {
  await_previous_kernel();
  philox_normal(out, n, seed_lo, seed_hi, stream, step, mean, std);
}
extern "C" __global__ void philox_normal_bf16(bf16* out, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                              const uint32_t* step, float mean, float std) {
  await_previous_kernel();
  philox_normal(out, n, seed_lo, seed_hi, stream, step, mean, std);
}

extern "C" __global__ void counter_increment_u32(uint32_t* c) {
  await_previous_kernel();
  if (blockIdx.x == 0 && threadIdx.x == 0) *c += 1;
}
