// Normalization kernels, storage T = float or bf16, every statistic and accumulator in f32.
// CPU twins: group_norm_cpu / group_norm_backward_cpu / layer_norm_cpu / layer_norm_backward_cpu in
// src/ops/norm.rs.
//
// GroupNorm, 32 groups, NHWC: x [n, hw, c], group g holds channels [g·cpg, (g+1)·cpg), cpg = c/32.
//   mean, var over (hw × cpg) values of (sample, group); rstd = 1/√(var + eps); x̂ = (x − mean)·rstd
//   h = γ_ch·x̂ + β_ch;  y = h, or silu(h) = h·σ(h) when `silu` != 0.
//   Saved for the backward: stats [n, 32, 2] = (mean, rstd) in f32.
//   Backward (input grad only, γ β frozen): dh = dy (or dy·σ(h)(1 + h(1 − σ(h))) with SiLU),
//   d = dh·γ;  dx = rstd·(d − mean_g(d) − x̂·mean_g(d·x̂)).
//   σ(h) = 1/(1 + e^−h) with the fast __expf and a rounded reciprocal (≈ 1e-6 relative).
//
//   One kernel per direction, launched cooperatively (all CTAs co-resident, see src/ops/norm.rs):
//   grid (chunks, n); CTA (chunk, b) owns the rows [chunk·rpc, (chunk+1)·rpc) of sample b.
//     1. It copies the first `held` rows of its chunk (a contiguous range of x, and of dy backward)
//        into shared memory with cp.async, all in flight at once (rows past `held`, when the chunk
//        does not fit, are read from global memory now and again in step 3), and reduces them to
//        one partial per group: forward (mean, M2) of the chunk (sums shifted by the group's first
//        value in the chunk: no cancellation), backward (Σd, Σd·x̂); per-thread lo/hi sums meet in
//        shared memory and are added per group in a fixed order.
//     2. It publishes the partial and arrives at sample b's counter; the CTA that arrives last
//        combines the sample's partials in a fixed order (forward: the exact two-pass combination
//        of the chunks' (n, mean, M2); backward: sums), so the result does not depend on which CTA
//        is last, writes (mean, rstd) to `stats` (forward) or (mean d, mean d·x̂) to gn_means
//        (backward) and bumps sample b's generation; the others wait for that bump.
//     3. Every CTA normalizes its rows from shared memory and writes y or dx: x (and dy) are read
//        from global memory once.
//   The counters live in this module's globals (zero when the module loads) and are left at zero
//   by every launch, so launches and CUDA-graph replays need no reset. The partials live there too:
//   launches of this module must not overlap, which holds on the one stream of a `Gpu`.
//
//   Thread layout for the math: thread t = (tx, ty), tx = t mod TX, owns the P·E contiguous
//   channels [tx·P·E, (tx+1)·P·E) of rows ty, ty + TY, ... of the chunk (TX = c/(P·E), TY =
//   ⌊256/TX⌋), read as P vectors of E elements. The launcher picks E, P so that a thread's channels
//   touch at most two groups, g0 and g0 + 1 ("lo" and "hi"), with a per-vector split point.
//
// LayerNorm over rows: x [rows, c], one warp per row holding up to LN_HELD vectors of E elements per
//   lane in registers (c ≤ 32·LN_HELD·E, i.e. c ≤ 1280 in bf16; wider rows read the rest again),
//   exact two-pass statistics (mean, then Σ(x − mean)² from registers); y = x̂·γ + β;
//   stats [rows, 2] = (mean, rstd). Backward: d = dy·γ; dx = rstd·(d − mean(d) − x̂·mean(d·x̂)).
//   d = dy·γ is rounded once (__fmul_rn) so that the two passes see the same d: with zero variance
//   (rstd = 1/√eps) a contracted fma would otherwise leave rstd·(rounding error) instead of 0.
#include "pack.cuh"

#define GROUPS 32
#define WARPS 8
#define THREADS 256
#define GN_MAX_CTAS 2048  // the launcher keeps n·chunks (and so n) at or below this
#define LN_HELD 5

__device__ unsigned int gn_arrived[GN_MAX_CTAS];          // CTAs of sample b that have published
__device__ unsigned int gn_generation[GN_MAX_CTAS];       // bumped when sample b's statistics are ready
__device__ float2 gn_partials[GN_MAX_CTAS * GROUPS];      // [b, chunk, group] of the running launch
__device__ float2 gn_means[GN_MAX_CTAS * GROUPS];         // backward: (mean d, mean d·x̂) per [b, group]

__device__ __forceinline__ float sigmoidf(float h) { return __frcp_rn(1.0f + __expf(-h)); }

// Rows [r0, r1) of chunk `chunk`.
__device__ __forceinline__ void chunk_rows(int chunk, int rpc, int hw, int& r0, int& r1) {
  r0 = chunk * rpc;
  r1 = min(r0 + rpc, hw);
}

// A thread's place in the (tx, ty) layout and its channels.
struct GnThread {
  int tx, ty, TX, TY, c0, g0, cpg, span;  // span = P·E channels from c0; g0 = group of c0
  bool active;
  __device__ GnThread(int c, int P, int E) {
    cpg = c / GROUPS;
    span = P * E;
    TX = c / span;
    TY = THREADS / TX;
    tx = threadIdx.x % TX;
    ty = threadIdx.x / TX;
    active = ty < TY;
    c0 = tx * span;
    g0 = c0 / cpg;
  }
  // Elements of the vector starting at channel ch that belong to g0 (the rest belong to g0 + 1).
  __device__ __forceinline__ int n_lo(int ch, int E) const { return max(0, min(E, (g0 + 1) * cpg - ch)); }
  __device__ __forceinline__ int g_hi() const { return min(g0 + 1, GROUPS - 1); }
};

// Asynchronous 16-byte global → shared copies (sm_80 cp.async): `bytes` (a multiple of 16) from
// `src` to `dst`, every copy in flight at once; cp_async_wait_all then waits for this thread's.
__device__ __forceinline__ void stage_async(void* dst, const void* src, int bytes) {
  const unsigned base = (unsigned)__cvta_generic_to_shared(dst);
  const char* g = static_cast<const char*>(src);
  for (int i = threadIdx.x * 16; i < bytes; i += THREADS * 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(base + i), "l"(g + i));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T, int E>
__device__ __forceinline__ Pack<T, E> load_raw(const T* p) { return *reinterpret_cast<const Pack<T, E>*>(p); }

template <typename T, int E>
__device__ __forceinline__ void unpack(const Pack<T, E>& pk, float (&out)[E]) {
#pragma unroll
  for (int i = 0; i < E; ++i) out[i] = to_f32(pk.v[i]);
}

// Hides a register-held vector's value from the compiler, so that it keeps the packed registers
// between passes and converts them again, instead of keeping every converted f32 value alive (2×
// the registers). Used by LayerNorm.
template <typename T, int E>
__device__ __forceinline__ void opaque(Pack<T, E>& pk) {
  if constexpr (sizeof(pk) % 4 == 0) {
    uint32_t* u = reinterpret_cast<uint32_t*>(&pk);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(pk) / 4); ++i) asm volatile("" : "+r"(u[i]));
  } else {
    asm volatile("" : "+h"(*reinterpret_cast<unsigned short*>(&pk)));
  }
}

// Adds the per-thread (lo, hi) pairs of every thread into one pair per group, in a fixed order.
// Every thread calls it; returns group `threadIdx.x`'s sums in threads 0..31.
__device__ float2 gn_block_reduce(const GnThread& th, float2 lo, float2 hi) {
  __shared__ float2 sh[THREADS][2];
  sh[threadIdx.x][0] = th.active ? lo : make_float2(0.f, 0.f);
  sh[threadIdx.x][1] = th.active ? hi : make_float2(0.f, 0.f);
  __syncthreads();
  float2 acc = make_float2(0.f, 0.f);
  if (threadIdx.x < GROUPS) {
    const int g = threadIdx.x;
    const int tx_first = (g * th.cpg) / th.span, tx_last = ((g + 1) * th.cpg - 1) / th.span;
    for (int ty = 0; ty < th.TY; ++ty)
      for (int tx = tx_first; tx <= tx_last; ++tx) {
        const int side = (tx * th.span) / th.cpg == g ? 0 : 1;
        const float2 v = sh[ty * th.TX + tx][side];
        acc.x += v.x, acc.y += v.y;
      }
  }
  return acc;
}

// GPU-scope acquire/release primitives for the per-sample counters (the pattern of CUTLASS's
// barrier: __syncthreads, then one thread's release RMW; one thread's acquire load, then __syncthreads).
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned atom_add_acq_rel(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Sample b's generation as this launch starts (read by thread 0 before it arrives: it cannot change
// until every CTA of the sample, this one included, has arrived).
__device__ __forceinline__ unsigned gn_generation_now(int b) {
  return threadIdx.x == 0 ? *(volatile unsigned*)&gn_generation[b] : 0u;
}

// Step 2. Threads 0..31 have written this CTA's partial (group = thread) to gn_partials. Returns
// true in every thread of the CTA that arrived last at sample b's counter; that CTA must then write
// the sample's statistics and call gn_release. Every other CTA returns once they are released.
__device__ bool gn_arrive(int b, int chunks, unsigned gen0) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atom_add_acq_rel(&gn_arrived[b], 1u) == (unsigned)chunks - 1;
    if (last) atomicExch(&gn_arrived[b], 0u);  // ready for the next launch
    else
      while (ld_acquire(&gn_generation[b]) == gen0) __nanosleep(20);
  }
  __syncthreads();
  return last;
}

// Threads 0..31 have written sample b's statistics: publish them to the waiting CTAs.
__device__ void gn_release(int b) {
  __syncthreads();
  if (threadIdx.x == 0) red_release(&gn_generation[b], 1u);
}

// Partials a warp loads at once when merging: one round for up to GN_BATCH·WARPS chunks.
#define GN_BATCH 17

// ---------------------------------------------------------------------------------------------
// GroupNorm forward
// ---------------------------------------------------------------------------------------------
// Forward partial sums of one vector: shifted Σ and Σ² into lo / hi.
template <int E>
__device__ __forceinline__ void gn_fwd_accumulate(const float (&v)[E], int nlo, float shift_lo, float shift_hi, float2& lo,
                                                  float2& hi) {
#pragma unroll
  for (int i = 0; i < E; ++i) {
    if (i < nlo) {
      const float d = v[i] - shift_lo;
      lo.x += d, lo.y = fmaf(d, d, lo.y);
    } else {
      const float d = v[i] - shift_hi;
      hi.x += d, hi.y = fmaf(d, d, hi.y);
    }
  }
}

template <typename T, int E>
__device__ __forceinline__ void gn_fwd_write(T* y, const float (&g)[E], const float (&be)[E], float (&v)[E], int nlo, float2 st_lo,
                                             float2 st_hi, int silu) {
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float2 st = i < nlo ? st_lo : st_hi;
    const float h = fmaf((v[i] - st.x) * st.y, g[i], be[i]);
    v[i] = silu ? h * sigmoidf(h) : h;
  }
  store_pack<T, E>(y, v);
}

// Sample b's (mean, rstd) per group from its chunks' (mean, M2) partials, into out[0..32), by the
// exact two-pass combination mean = Σ n_k·mean_k / N, M2 = Σ M2_k + n_k·(mean_k − mean)² (no
// sequential merge: every partial is loaded at once; fixed order).
__device__ void gn_finish_fwd(const float2* part, int hw, int cpg, int rpc, int chunks, float eps, float2* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float sh[WARPS][GROUPS];
  __shared__ float sh_mean[GROUPS];
  const bool one_round = chunks <= GN_BATCH * WARPS;
  const float total = (float)(hw * cpg);
  auto count = [&](int k) { return (float)(min(rpc, hw - k * rpc) * cpg); };
  float2 p[GN_BATCH];
  float s = 0.f;
  for (int k0 = warp; k0 < chunks; k0 += GN_BATCH * WARPS) {
#pragma unroll
    for (int j = 0; j < GN_BATCH; ++j) {
      const int k = k0 + j * WARPS;
      p[j] = k < chunks ? __ldcg(part + k * GROUPS + lane) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < GN_BATCH; ++j)
      if (k0 + j * WARPS < chunks) s = fmaf(count(k0 + j * WARPS), p[j].x, s);
  }
  sh[warp][lane] = s;
  __syncthreads();
  if (warp == 0) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) t += sh[w][lane];
    sh_mean[lane] = t / total;
  }
  __syncthreads();
  const float mean = sh_mean[lane];
  float m2 = 0.f;
  for (int k0 = warp; k0 < chunks; k0 += GN_BATCH * WARPS) {
    if (!one_round) {
#pragma unroll
      for (int j = 0; j < GN_BATCH; ++j) {
        const int k = k0 + j * WARPS;
        p[j] = k < chunks ? __ldcg(part + k * GROUPS + lane) : make_float2(0.f, 0.f);
      }
    }
#pragma unroll
    for (int j = 0; j < GN_BATCH; ++j)
      if (k0 + j * WARPS < chunks) {
        const float d = p[j].x - mean;
        m2 += fmaf(count(k0 + j * WARPS) * d, d, p[j].y);
      }
  }
  sh[warp][lane] = m2;
  __syncthreads();
  if (warp == 0) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) t += sh[w][lane];
    out[lane] = make_float2(mean, rsqrtf(t / total + eps));
  }
}

// Row r of the chunk: shared memory for r < held, global memory (x + (r0 + r)·c) past it.
template <typename T>
__device__ __forceinline__ const T* chunk_row(const T* staged, const T* xs, int r, int held, int r0, int c) {
  return r < held ? staged + r * c : xs + (int64_t)(r0 + r) * c;
}

template <typename T, int E>
__device__ void gn_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                       float2* __restrict__ stats, int hw, int c, int rpc, int chunks, int P, int held_rows, float eps, int silu) {
  extern __shared__ __align__(16) unsigned char gn_smem[];
  const GnThread th(c, P, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int rows = r1 - r0, held = min(held_rows, rows);
  const T* xs = x + (int64_t)b * hw * c;
  T* sx = reinterpret_cast<T*>(gn_smem);
  const unsigned gen0 = gn_generation_now(b);
  // 1. Stage the chunk; meanwhile fetch the shifts and γ, β of the thread's first vector.
  stage_async(sx, xs + (int64_t)r0 * c, held * c * (int)sizeof(T));
  const float shift_lo = to_f32(xs[(int64_t)r0 * c + th.g0 * th.cpg]), shift_hi = to_f32(xs[(int64_t)r0 * c + th.g_hi() * th.cpg]);
  float g0[E], be0[E];
  load_pack<T, E>(gamma + th.c0, g0);
  load_pack<T, E>(beta + th.c0, be0);
  cp_async_wait_all();
  __syncthreads();
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
  if (th.active) {
#pragma unroll 2
    for (int r = th.ty; r < rows; r += th.TY) {
      const T* row = chunk_row(sx, xs, r, held, r0, c);
      for (int p = 0; p < P; ++p) {
        const int ch = th.c0 + p * E;
        float v[E];
        load_pack<T, E>(row + ch, v);
        gn_fwd_accumulate<E>(v, th.n_lo(ch, E), shift_lo, shift_hi, lo, hi);
      }
    }
  }
  const float2 s = gn_block_reduce(th, lo, hi);
  float2* part = gn_partials + (int64_t)b * chunks * GROUPS;
  if (threadIdx.x < GROUPS) {
    const int g = threadIdx.x;
    const float count = (float)(rows * th.cpg), m = s.x / count;
    const float shift = to_f32(xs[(int64_t)r0 * c + g * th.cpg]);
    part[chunk * GROUPS + g] = make_float2(shift + m, fmaxf(s.y - s.x * m, 0.f));
  }
  // 2. The sample's statistics.
  float2* st = stats + b * GROUPS;
  if (gn_arrive(b, chunks, gen0)) {
    gn_finish_fwd(part, hw, th.cpg, rpc, chunks, eps, st);
    gn_release(b);
  }
  // 3. Normalize.
  if (!th.active) return;
  const float2 st_lo = __ldcg(st + th.g0), st_hi = __ldcg(st + th.g_hi());
  T* ys = y + (int64_t)b * hw * c;
#pragma unroll 2
  for (int r = th.ty; r < rows; r += th.TY) {
    const T* row = chunk_row(sx, xs, r, held, r0, c);
    T* yrow = ys + (int64_t)(r0 + r) * c;
    for (int p = 0; p < P; ++p) {
      const int ch = th.c0 + p * E;
      float v[E], g[E], be[E];
      load_pack<T, E>(row + ch, v);
      if (p == 0) {
#pragma unroll
        for (int i = 0; i < E; ++i) g[i] = g0[i], be[i] = be0[i];
      } else {
        load_pack<T, E>(gamma + ch, g);
        load_pack<T, E>(beta + ch, be);
      }
      gn_fwd_write<T, E>(yrow + ch, g, be, v, th.n_lo(ch, E), st_lo, st_hi, silu);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm backward (input gradient)
// ---------------------------------------------------------------------------------------------
// d = dh·γ for one element (rounded once, see the LayerNorm note), and x̂.
__device__ __forceinline__ float gn_grad_in(float xv, float dyv, float g, float be, float2 st, int silu, float& xhat) {
  xhat = (xv - st.x) * st.y;
  float dh = dyv;
  if (silu) {
    const float h = fmaf(xhat, g, be), s = sigmoidf(h);
    dh = dyv * s * (1.f + h * (1.f - s));
  }
  return __fmul_rn(dh, g);
}

// Backward partial sums (Σd, Σd·x̂) of one vector pair into lo / hi.
template <int E>
__device__ __forceinline__ void gn_bwd_accumulate(const float (&v)[E], const float (&d)[E], const float (&g)[E], const float (&be)[E],
                                                  int nlo, float2 st_lo, float2 st_hi, int silu, float2& lo, float2& hi) {
#pragma unroll
  for (int i = 0; i < E; ++i) {
    float xhat;
    if (i < nlo) {
      const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st_lo, silu, xhat);
      lo.x += dd, lo.y = fmaf(dd, xhat, lo.y);
    } else {
      const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st_hi, silu, xhat);
      hi.x += dd, hi.y = fmaf(dd, xhat, hi.y);
    }
  }
}

template <typename T, int E>
__device__ __forceinline__ void gn_bwd_write(T* dx, float (&v)[E], const float (&d)[E], const float (&g)[E], const float (&be)[E],
                                             int nlo, float2 st_lo, float2 st_hi, float2 m_lo, float2 m_hi, int silu) {
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const bool is_lo = i < nlo;
    const float2 st = is_lo ? st_lo : st_hi, mdd = is_lo ? m_lo : m_hi;
    float xhat;
    const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st, silu, xhat);
    v[i] = st.y * (dd - mdd.x - xhat * mdd.y);
  }
  store_pack<T, E>(dx, v);
}

// Sample b's (mean d, mean d·x̂) per group from its chunks' sums, into out[0..32) (fixed order).
__device__ void gn_finish_bwd(const float2* part, int count, int chunks, float2* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float2 sh[WARPS][GROUPS];
  float2 a = make_float2(0.f, 0.f);
  for (int k0 = warp; k0 < chunks; k0 += GN_BATCH * WARPS) {
    float2 p[GN_BATCH];
#pragma unroll
    for (int j = 0; j < GN_BATCH; ++j) {
      const int k = k0 + j * WARPS;
      p[j] = k < chunks ? __ldcg(part + k * GROUPS + lane) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < GN_BATCH; ++j) a.x += p[j].x, a.y += p[j].y;
  }
  sh[warp][lane] = a;
  __syncthreads();
  if (warp == 0) {
    a = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a.x += sh[w][lane].x, a.y += sh[w][lane].y;
    const float inv_n = 1.f / (float)count;
    out[lane] = make_float2(a.x * inv_n, a.y * inv_n);
  }
}

template <typename T, int E>
__device__ void gn_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                       const float2* __restrict__ stats, const T* __restrict__ dy, T* __restrict__ dx, int hw, int c, int rpc,
                       int chunks, int P, int held_rows, int silu) {
  extern __shared__ __align__(16) unsigned char gn_smem[];
  const GnThread th(c, P, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int rows = r1 - r0, held = min(held_rows, rows);
  const int64_t base = (int64_t)b * hw * c;
  const T* xs = x + base;
  const T* dys = dy + base;
  T* sx = reinterpret_cast<T*>(gn_smem);
  T* sd = sx + held * c;
  const unsigned gen0 = gn_generation_now(b);
  stage_async(sx, xs + (int64_t)r0 * c, held * c * (int)sizeof(T));
  stage_async(sd, dys + (int64_t)r0 * c, held * c * (int)sizeof(T));
  const float2 st_lo = stats[b * GROUPS + th.g0], st_hi = stats[b * GROUPS + th.g_hi()];
  float g0[E], be0[E];
  load_pack<T, E>(gamma + th.c0, g0);
  load_pack<T, E>(beta + th.c0, be0);
  cp_async_wait_all();
  __syncthreads();
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
  if (th.active) {
#pragma unroll 2
    for (int r = th.ty; r < rows; r += th.TY) {
      const T* xrow = chunk_row(sx, xs, r, held, r0, c);
      const T* drow = chunk_row(sd, dys, r, held, r0, c);
      for (int p = 0; p < P; ++p) {
        const int ch = th.c0 + p * E;
        float v[E], d[E], g[E], be[E];
        load_pack<T, E>(xrow + ch, v);
        load_pack<T, E>(drow + ch, d);
        if (p == 0) {
#pragma unroll
          for (int i = 0; i < E; ++i) g[i] = g0[i], be[i] = be0[i];
        } else {
          load_pack<T, E>(gamma + ch, g);
          load_pack<T, E>(beta + ch, be);
        }
        gn_bwd_accumulate<E>(v, d, g, be, th.n_lo(ch, E), st_lo, st_hi, silu, lo, hi);
      }
    }
  }
  const float2 s = gn_block_reduce(th, lo, hi);
  float2* part = gn_partials + (int64_t)b * chunks * GROUPS;
  if (threadIdx.x < GROUPS) part[chunk * GROUPS + threadIdx.x] = s;
  float2* means = gn_means + b * GROUPS;
  if (gn_arrive(b, chunks, gen0)) {
    gn_finish_bwd(part, hw * th.cpg, chunks, means);
    gn_release(b);
  }
  if (!th.active) return;
  const float2 m_lo = __ldcg(means + th.g0), m_hi = __ldcg(means + th.g_hi());
  T* dxs = dx + base;
#pragma unroll 2
  for (int r = th.ty; r < rows; r += th.TY) {
    const T* xrow = chunk_row(sx, xs, r, held, r0, c);
    const T* drow = chunk_row(sd, dys, r, held, r0, c);
    T* dxrow = dxs + (int64_t)(r0 + r) * c;
    for (int p = 0; p < P; ++p) {
      const int ch = th.c0 + p * E;
      float v[E], d[E], g[E], be[E];
      load_pack<T, E>(xrow + ch, v);
      load_pack<T, E>(drow + ch, d);
      if (p == 0) {
#pragma unroll
        for (int i = 0; i < E; ++i) g[i] = g0[i], be[i] = be0[i];
      } else {
        load_pack<T, E>(gamma + ch, g);
        load_pack<T, E>(beta + ch, be);
      }
      gn_bwd_write<T, E>(dxrow + ch, v, d, g, be, th.n_lo(ch, E), st_lo, st_hi, m_lo, m_hi, silu);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm: lane `lane` of a row's warp owns vectors j·32 + lane (j = 0, 1, ...) of the row;
// the first LN_HELD stay in registers, later ones (rows wider than 32·LN_HELD·E) are read again.
// ---------------------------------------------------------------------------------------------
template <typename T, int E>
__device__ __forceinline__ void ln_fwd_write(T* yr, const Pack<T, E>& gp, const Pack<T, E>& bp, float (&u)[E], int k, float mean,
                                             float rstd) {
  float g[E], be[E];
  unpack<T, E>(gp, g);
  unpack<T, E>(bp, be);
#pragma unroll
  for (int i = 0; i < E; ++i) u[i] = fmaf((u[i] - mean) * rstd, g[i], be[i]);
  store_pack<T, E>(yr + k * E, u);
}

template <typename T, int E>
__device__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                       float2* __restrict__ stats, int rows, int c, float eps) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * c;
  const int nv = c / E;
  // x, γ, β of the held vectors, fetched together: no memory round trip after the statistics.
  Pack<T, E> v[LN_HELD], g[LN_HELD], be[LN_HELD];
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      v[j] = load_raw<T, E>(xr + (j * 32 + lane) * E);
      g[j] = load_raw<T, E>(gamma + (j * 32 + lane) * E);
      be[j] = load_raw<T, E>(beta + (j * 32 + lane) * E);
    }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      float u[E];
      unpack<T, E>(v[j], u);
#pragma unroll
      for (int i = 0; i < E; ++i) s += u[i];
    }
  for (int k = LN_HELD * 32 + lane; k < nv; k += 32) {
    float u[E];
    load_pack<T, E>(xr + k * E, u);
#pragma unroll
    for (int i = 0; i < E; ++i) s += u[i];
  }
  const float mean = warp_sum(s) / (float)c;
  s = 0.f;
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      float u[E];
      opaque<T, E>(v[j]);
      unpack<T, E>(v[j], u);
#pragma unroll
      for (int i = 0; i < E; ++i) s = fmaf(u[i] - mean, u[i] - mean, s);
    }
  for (int k = LN_HELD * 32 + lane; k < nv; k += 32) {
    float u[E];
    load_pack<T, E>(xr + k * E, u);
#pragma unroll
    for (int i = 0; i < E; ++i) s = fmaf(u[i] - mean, u[i] - mean, s);
  }
  const float rstd = rsqrtf(warp_sum(s) / (float)c + eps);
  if (lane == 0) stats[row] = make_float2(mean, rstd);
  T* yr = y + (int64_t)row * c;
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      float u[E];
      opaque<T, E>(v[j]);
      unpack<T, E>(v[j], u);
      ln_fwd_write<T, E>(yr, g[j], be[j], u, j * 32 + lane, mean, rstd);
    }
  for (int k = LN_HELD * 32 + lane; k < nv; k += 32) {
    float u[E];
    load_pack<T, E>(xr + k * E, u);
    ln_fwd_write<T, E>(yr, load_raw<T, E>(gamma + k * E), load_raw<T, E>(beta + k * E), u, k, mean, rstd);
  }
}

// (Σd, Σd·x̂) of one vector pair, d = dy·γ rounded once.
template <typename T, int E>
__device__ __forceinline__ void ln_bwd_sums(const float (&u)[E], const float (&e)[E], const Pack<T, E>& gp, float2 st, float& a1,
                                            float& a2) {
  float g[E];
  unpack<T, E>(gp, g);
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float dd = __fmul_rn(e[i], g[i]);
    a1 += dd;
    a2 = fmaf(dd, (u[i] - st.x) * st.y, a2);
  }
}

template <typename T, int E>
__device__ __forceinline__ void ln_bwd_write(T* dxr, float (&u)[E], const float (&e)[E], const Pack<T, E>& gp, int k, float2 st,
                                             float m1, float m2) {
  float g[E];
  unpack<T, E>(gp, g);
#pragma unroll
  for (int i = 0; i < E; ++i) u[i] = st.y * (__fmul_rn(e[i], g[i]) - m1 - (u[i] - st.x) * st.y * m2);
  store_pack<T, E>(dxr + k * E, u);
}

template <typename T, int E>
__device__ void ln_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const float2* __restrict__ stats,
                       const T* __restrict__ dy, T* __restrict__ dx, int rows, int c) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t off = (int64_t)row * c;
  const T* xr = x + off;
  const T* dyr = dy + off;
  const int nv = c / E;
  const float2 st = stats[row];
  Pack<T, E> hx[LN_HELD], hd[LN_HELD], g[LN_HELD];
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      hx[j] = load_raw<T, E>(xr + (j * 32 + lane) * E);
      hd[j] = load_raw<T, E>(dyr + (j * 32 + lane) * E);
      g[j] = load_raw<T, E>(gamma + (j * 32 + lane) * E);
    }
  float a1 = 0.f, a2 = 0.f;
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      float u[E], e[E];
      unpack<T, E>(hx[j], u);
      unpack<T, E>(hd[j], e);
      ln_bwd_sums<T, E>(u, e, g[j], st, a1, a2);
    }
  for (int k = LN_HELD * 32 + lane; k < nv; k += 32) {
    float u[E], e[E];
    load_pack<T, E>(xr + k * E, u);
    load_pack<T, E>(dyr + k * E, e);
    ln_bwd_sums<T, E>(u, e, load_raw<T, E>(gamma + k * E), st, a1, a2);
  }
  const float m1 = warp_sum(a1) / (float)c, m2 = warp_sum(a2) / (float)c;
  T* dxr = dx + off;
#pragma unroll
  for (int j = 0; j < LN_HELD; ++j)
    if (j * 32 + lane < nv) {
      float u[E], e[E];
      opaque<T, E>(hx[j]), opaque<T, E>(hd[j]);
      unpack<T, E>(hx[j], u);
      unpack<T, E>(hd[j], e);
      ln_bwd_write<T, E>(dxr, u, e, g[j], j * 32 + lane, st, m1, m2);
    }
  for (int k = LN_HELD * 32 + lane; k < nv; k += 32) {
    float u[E], e[E];
    load_pack<T, E>(xr + k * E, u);
    load_pack<T, E>(dyr + k * E, e);
    ln_bwd_write<T, E>(dxr, u, e, load_raw<T, E>(gamma + k * E), k, st, m1, m2);
  }
}

// Entry points: <op>_<type>_v<E>, E = elements per vector load (the launcher picks the widest that
// divides the channels a lane reads: cpg for GroupNorm, c for LayerNorm). The GroupNorm kernels must
// be launched cooperatively with at most GN_MAX_CTAS CTAs and held_rows·c·sizeof(T) bytes of
// dynamic shared memory (twice that backward); see the header.
#define NORM_KERNELS(TN, T, E)                                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) group_norm_fwd_##TN##_v##E(                                \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int hw, int c, int rpc, int chunks, int P,        \
      int held_rows, float eps, int silu) {                                                                            \
    gn_fwd<T, E>(x, gamma, beta, y, stats, hw, c, rpc, chunks, P, held_rows, eps, silu);                                \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) group_norm_bwd_##TN##_v##E(                                \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, T* dx, int hw, int c, int rpc,      \
      int chunks, int P, int held_rows, int silu) {                                                                    \
    gn_bwd<T, E>(x, gamma, beta, stats, dy, dx, hw, c, rpc, chunks, P, held_rows, silu);                                \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) layer_norm_fwd_##TN##_v##E(                                   \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int rows, int c, float eps) {                    \
    ln_fwd<T, E>(x, gamma, beta, y, stats, rows, c, eps);                                                              \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) layer_norm_bwd_##TN##_v##E(                                   \
      const T* x, const T* gamma, const float2* stats, const T* dy, T* dx, int rows, int c) {                          \
    ln_bwd<T, E>(x, gamma, stats, dy, dx, rows, c);                                                                    \
  }

NORM_KERNELS(f32, float, 1)
NORM_KERNELS(f32, float, 2)
NORM_KERNELS(f32, float, 4)
NORM_KERNELS(bf16, bf16, 1)
NORM_KERNELS(bf16, bf16, 2)
NORM_KERNELS(bf16, bf16, 4)
NORM_KERNELS(bf16, bf16, 8)
