// Benchmark helpers (src/bench/norm.rs). No CPU twins: they compute nothing.
//
//   bench_spin  one thread waits until `ns` nanoseconds of %globaltimer have passed. Enqueued before a
//               batch of timed launches, it holds the GPU while the host queues the whole batch, so
//               the batch then runs back to back and its events measure GPU time, not launch latency.
//   bench_copy  dst[i] = src[i] over n 16-byte words: the same-byte copy floor of the memory-bound
//               rows as one of our kernels, launched like them (a programmatic dependent launch on
//               Hopper), next to the driver's memcpy.
#include "common.cuh"

extern "C" __global__ void bench_spin(int64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while ((int64_t)(now - start) < ns);
}

extern "C" __global__ void bench_copy(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n) {
  await_previous_kernel();
  FOR_EACH_INDEX(i, n) dst[i] = src[i];
}
