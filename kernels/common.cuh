// Shared helpers for every kernels/*.cu: bf16 <-> f32 loads and stores, so each kernel is
// written once as a template over its storage type T (float or __nv_bfloat16) and computes in f32.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Grid-stride loop over n elements (n may exceed the grid).
#define FOR_EACH_INDEX(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); i += (int64_t)gridDim.x * blockDim.x)

// Programmatic dependent launch (Hopper). On sm_90 the launcher (src/cuda/mod.rs) starts a kernel
// whose PTX contains griddepcontrol.wait with the programmatic-stream-serialization attribute: it is
// launched as soon as every CTA of the previous kernel in the stream has exited, before that kernel's
// completion is signalled, which hides part of the gap between consecutive kernels. Every kernel
// therefore calls this first, before touching global memory: `griddepcontrol.wait` returns once the
// previous kernel has completed and its writes are visible (so nothing is read early, and nothing
// the previous kernel still reads is overwritten). Kernels do not trigger the next one earlier
// (griddepcontrol.launch_dependents at their start): measured, the next kernel's CTAs then sit on
// the SMs waiting and the graph-replayed training step was 0.5 ms slower (benches/RESULTS.md).
// Below sm_90 (and when the kernel was launched normally) it costs nothing.
__device__ __forceinline__ void await_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
