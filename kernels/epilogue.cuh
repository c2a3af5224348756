// The GEMM epilogues' vector store (kernels/gemm.cu, kernels/gemm_sm90.cu): eight accumulators of
// one output row, plus the bias and the residual, written with 16-byte accesses.
#pragma once
#include "common.cuh"

// Adds 8 bf16 values (one 16-byte load) to v.
__device__ __forceinline__ void add_bf16x8(float (&v)[8], const bf16* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = __bfloat1622float2(h[q]);
    v[2 * q] += f.x;
    v[2 * q + 1] += f.y;
  }
}

// C[n..n+8) of one row = v (+ bias) (+ R) with 16-byte loads and stores (rows, bias and R 16-byte
// aligned; OutT bf16 or f32).
template <typename OutT>
__device__ __forceinline__ void store8_values(OutT* crow, const OutT* rrow, const bf16* bias, int n, float (&v)[8]) {
  if (bias) add_bf16x8(v, bias + n);
  if constexpr (sizeof(OutT) == 4) {
    if (rrow) {
      const float4 r0 = *reinterpret_cast<const float4*>(rrow + n), r1 = *reinterpret_cast<const float4*>(rrow + n + 4);
      v[0] += r0.x, v[1] += r0.y, v[2] += r0.z, v[3] += r0.w, v[4] += r1.x, v[5] += r1.y, v[6] += r1.z, v[7] += r1.w;
    }
    *reinterpret_cast<float4*>(crow + n) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(crow + n + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    if (rrow) add_bf16x8(v, reinterpret_cast<const bf16*>(rrow) + n);
    uint4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
    *reinterpret_cast<uint4*>(crow + n) = out;
  }
}
