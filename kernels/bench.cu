// Benchmark helper (src/bench/norm.rs). No CPU twin: it computes nothing.
//
//   bench_spin  one thread waits until `ns` nanoseconds of %globaltimer have passed. Enqueued before a
//               batch of timed launches, it holds the GPU while the host queues the whole batch, so
//               the batch then runs back to back and its events measure GPU time, not launch latency.
#include <stdint.h>

extern "C" __global__ void bench_spin(int64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while ((int64_t)(now - start) < ns);
}
