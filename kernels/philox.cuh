// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the generator
// of Random123 and cuRAND): a counter-based generator, 4 × u32 out per (counter, key), no state.
// CPU twin: philox4x32_10 in src/ops/philox.rs (checked against Random123's known-answer vectors).
//
// How sdlora keys it: key = (seed lo, seed hi); counter = (block lo, block hi, stream, step) where
// `block` indexes groups of 4 outputs, `stream` separates uses (0 training noise, 1 timesteps,
// 2+ free) and `step` comes from a device-side u32 counter, so a replayed CUDA graph draws new numbers.
//
// Conversions (bit-identical on the CPU twin):
//   uniform(x) = ((x >> 9) + 0.5) · 2⁻²³ ∈ (0, 1), exact in f32
//   normal pair (x0, x1): u1 = (x0 + 0.5)·2⁻³², u2 = x1·2⁻³², r = √(−2 ln u1),
//                         (r·cos 2πu2, r·sin 2πu2) computed in f64, then rounded to f32
//   index below k: (x · k) >> 32
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
    const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

__device__ __forceinline__ uint4 philox_block(uint64_t block, uint32_t stream, uint32_t step, uint32_t seed_lo, uint32_t seed_hi) {
  return philox4x32_10(make_uint4((uint32_t)block, (uint32_t)(block >> 32), stream, step), make_uint2(seed_lo, seed_hi));
}

__device__ __forceinline__ float philox_uniform(uint32_t x) { return ((float)(x >> 9) + 0.5f) * 1.1920928955078125e-7f; }

__device__ __forceinline__ float2 philox_normal_pair(uint32_t x0, uint32_t x1) {
  const double u1 = ((double)x0 + 0.5) * 2.3283064365386963e-10, u2 = (double)x1 * 2.3283064365386963e-10;
  const double r = sqrt(-2.0 * log(u1)), a = 6.283185307179586 * u2;
  return make_float2((float)(r * cos(a)), (float)(r * sin(a)));
}

__device__ __forceinline__ uint32_t philox_below(uint32_t x, uint32_t k) { return (uint32_t)(((uint64_t)x * k) >> 32); }
