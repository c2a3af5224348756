// Normalization kernels, storage T = float or bf16, every statistic and accumulator in f32.
// CPU twins: group_norm_cpu / group_norm_backward_cpu / layer_norm_cpu / layer_norm_backward_cpu in
// src/ops/norm.rs.
//
// GroupNorm, 32 groups, NHWC: x [n, hw, c], group g holds channels [g·cpg, (g+1)·cpg), cpg = c/32.
//   mean, var over (hw × cpg) values of (sample, group); rstd = 1/√(var + eps); x̂ = (x − mean)·rstd
//   h = γ_ch·x̂ + β_ch;  y = h, or silu(h) = h·σ(h) when `silu` != 0.
//   Saved for the backward: stats [n, 32, 2] = (mean, rstd) in f32.
//   Backward (input grad only, γ β frozen): dh = dy (or dy·σ(h)(1 + h(1 − σ(h))) with SiLU),
//   d = dh·γ;  dx = rstd·(d − mean_g(d) − x̂·mean_g(d·x̂)) (+ res, optional: a residual branch's gradient).
//   σ(h) = 1/(1 + e^−h) with the fast __expf and the approximate division (≈ 1e-6 relative).
//
//   Tiling: the hw rows of a sample are cut into `chunks` chunks of `rpc` rows; a block of TX·TY
//   threads handles one (chunk, sample). Thread (tx, ty) owns the E channels [tx·E, (tx+1)·E) of
//   every row it visits (rows ty, ty + TY, ...; TX = c/E, TY = ⌊512/TX⌋, at least 1), so consecutive
//   threads read consecutive 16-byte pieces of a row; E ≤ c/32 or E = 2·c/32 (the launcher's widest),
//   so a vector touches at most two groups, g0 and g0 + 1 ("lo" and "hi"), split at `nlo`. Each thread loads R
//   rows before it uses any (R·16 bytes in flight per thread: the kernels are latency chains at
//   these L2-resident sizes). Two kernels per direction:
//     *_stats: per (sample, chunk, group) partials to `part` [n, chunks, 32, 2]: forward (mean, M2)
//              of the chunk (sums shifted by the group's first value in the chunk: no cancellation),
//              backward (Σd, Σd·x̂); threads' lo/hi sums meet in shared memory and are added per group
//              in a fixed order (deterministic);
//     *_apply: load their first rows, then combine the partials of their sample (every warp loads a
//              batch of chunks' partials at once, Chan's formula forward, sums backward, then warp 0
//              merges the warps' results), so both loads are in flight together; then write y (and
//              stats) or dx for the chunk. The forward's `_t1024` variant (inputs larger than L2)
//              walks each thread's rows backwards, last batch first: the rows the stats pass read
//              last are the ones still in L2 (where x fits in L2, the forward walk is 2–4 % faster).
//
// LayerNorm over rows: x [rows, c], one warp per row holding H vectors of E elements per lane in
//   registers (H = 1, 2, 3 or 5, the launcher's smallest with 32·H·E ≥ c: c = 320 bf16 holds 2,
//   768/640 hold 3, 1280 holds 5; wider rows read the rest again). Fewer held vectors, fewer
//   registers, more resident warps: the kernel is a latency chain, occupancy is its speed.
//   with γ and β fetched together with x; one-pass shifted statistics (Σd, Σd² of d = x − x[row, 0],
//   both warp sums in one shuffle chain; the shift keeps mean(d²) − mean(d)² from cancelling);
//   y = x̂·γ + β; stats [rows, 2] = (mean, rstd).
//   Backward: d = dy·γ; dx = rstd·(d − mean(d) − x̂·mean(d·x̂)) (+ res, optional: the gradient
//   of the residual branch around the norm, added here instead of by a separate add).
//   d = dy·γ is rounded once (__fmul_rn) so that the two passes see the same d: with zero variance
//   (rstd = 1/√eps) a contracted fma would otherwise leave rstd·(rounding error) instead of 0.
#include "norm.cuh"

#define MAX_WARPS 32

// ---------------------------------------------------------------------------------------------
// Vector helpers
// ---------------------------------------------------------------------------------------------
template <typename T, int E>
__device__ __forceinline__ Pack<T, E> load_raw(const T* p) { return *reinterpret_cast<const Pack<T, E>*>(p); }

template <typename T, int E>
__device__ __forceinline__ void unpack(const Pack<T, E>& pk, float (&out)[E]) {
#pragma unroll
  for (int i = 0; i < E; ++i) out[i] = to_f32(pk.v[i]);
}

// ---------------------------------------------------------------------------------------------
// GroupNorm: the thread layout, row batches, the block reduction and the partials' combination
// ---------------------------------------------------------------------------------------------
// Rows [r0, r1) of chunk `chunk`.
__device__ __forceinline__ void chunk_rows(int chunk, int rpc, int hw, int& r0, int& r1) {
  r0 = chunk * rpc;
  r1 = min(r0 + rpc, hw);
}

// A thread's place: TX = c/E threads cover a row, one vector of E channels each; the block's
// TY = blockDim.x / TX thread rows step through the chunk's rows.
struct GnThread {
  int tx, ty, TX, TY, c0, g0, cpg, nlo;  // nlo = elements of the vector in group g0 (the rest: g0 + 1)
  __device__ GnThread(int c, int E) {
    cpg = c / GROUPS;
    TX = c / E;
    TY = blockDim.x / TX;
    tx = threadIdx.x % TX;
    ty = threadIdx.x / TX;
    c0 = tx * E;
    g0 = c0 / cpg;
    nlo = min(E, (g0 + 1) * cpg - c0);
  }
  __device__ __forceinline__ int g_hi() const { return min(g0 + 1, GROUPS - 1); }
};

// Issues the loads of rows r, r + TY, ..., r + (R − 1)·TY (those below r1) of this thread's vector:
// all R are in flight before any is used.
template <typename T, int E, int R>
__device__ __forceinline__ void load_rows(const T* __restrict__ p, int c, int r, int TY, int r1, Pack<T, E> (&v)[R]) {
#pragma unroll
  for (int j = 0; j < R; ++j)
    if (r + j * TY < r1) v[j] = load_raw<T, E>(p + (int64_t)(r + j * TY) * c);
}

// Apply's walk over this thread's rows r0 + ty + m·TY (m = 0, 1, ...) in batches of R, backwards: the
// first row of the last batch (r0 + ty when the thread has no rows: every load then skips them).
template <int R>
__device__ __forceinline__ int last_batch_row(const GnThread& th, int r0, int r1) {
  const int rows = max(0, (r1 - r0 - th.ty + th.TY - 1) / th.TY);
  return r0 + th.ty + max(0, rows - 1) / R * R * th.TY;
}

// Adds the per-thread (lo, hi) pairs of every thread into one pair per group, in a fixed order.
// Every thread calls it; returns group `threadIdx.x`'s sums in threads 0..31.
template <int E>
__device__ float2 gn_block_reduce(const GnThread& th, float2 lo, float2 hi) {
  __shared__ float2 sh[MAX_WARPS * 32][2];
  sh[threadIdx.x][0] = lo;
  sh[threadIdx.x][1] = hi;
  __syncthreads();
  float2 acc = make_float2(0.f, 0.f);
  if (threadIdx.x < GROUPS) {
    const int g = threadIdx.x, tx_first = (g * th.cpg) / E, tx_last = ((g + 1) * th.cpg - 1) / E;
    for (int ty = 0; ty < th.TY; ++ty)
      for (int tx = tx_first; tx <= tx_last; ++tx) {
        const float2 v = sh[ty * th.TX + tx][(tx * E) / th.cpg == g ? 0 : 1];
        acc.x += v.x, acc.y += v.y;
      }
  }
  return acc;
}

// Combines the chunk partials of sample b into sh_out[g] for every group g; block-wide, ends synced.
// Warp w's lane g takes chunks w, w + W, ... (W = full warps of the block), loading PART_BATCH of
// them before merging any; warp 0 then merges the W results. Fixed order: deterministic.
// Forward (FWD): partials are (mean, M2) of the chunk, merged by Chan's formula; out = (mean, rstd).
// Backward: partials are (Σd, Σd·x̂), summed; out = (mean(d), mean(d·x̂)).
#define PART_BATCH 8
template <bool FWD>
__device__ void gn_combine(const float2* __restrict__ part, int b, int hw, int cpg, int rpc, int chunks, float eps, float2* sh_out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  __shared__ float sh[MAX_WARPS][GROUPS][3];
  if (warp < W) {
    float n = 0.f, a1 = 0.f, a2 = 0.f;  // forward: count, mean, M2; backward: -, Σd, Σd·x̂
    for (int k0 = warp; k0 < chunks; k0 += PART_BATCH * W) {
      float2 p[PART_BATCH];
#pragma unroll
      for (int i = 0; i < PART_BATCH; ++i)
        if (k0 + i * W < chunks) p[i] = part[((int64_t)b * chunks + k0 + i * W) * GROUPS + lane];
#pragma unroll
      for (int i = 0; i < PART_BATCH; ++i) {
        const int k = k0 + i * W;
        if (k >= chunks) break;
        if (FWD) {
          int r0, r1;
          chunk_rows(k, rpc, hw, r0, r1);
          chan_merge(n, a1, a2, (float)((r1 - r0) * cpg), p[i].x, p[i].y);
        } else {
          a1 += p[i].x, a2 += p[i].y;
        }
      }
    }
    sh[warp][lane][0] = n, sh[warp][lane][1] = a1, sh[warp][lane][2] = a2;
  }
  __syncthreads();
  if (warp == 0) {
    float n = 0.f, a1 = 0.f, a2 = 0.f;
    for (int w = 0; w < W; ++w) {
      if (FWD) {
        chan_merge(n, a1, a2, sh[w][lane][0], sh[w][lane][1], sh[w][lane][2]);
      } else {
        a1 += sh[w][lane][1], a2 += sh[w][lane][2];
      }
    }
    const float inv_n = 1.f / (float)(hw * cpg);
    sh_out[lane] = FWD ? make_float2(a1, rsqrtf(a2 / n + eps)) : make_float2(a1 * inv_n, a2 * inv_n);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// GroupNorm forward
// ---------------------------------------------------------------------------------------------
template <typename T, int E, int R>
__device__ void gn_fwd_stats(const T* __restrict__ x, float2* __restrict__ part, int hw, int c, int rpc, int chunks) {
  const GnThread th(c, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const T* xs = x + (int64_t)b * hw * c;
  // Shift of group g: its first value in the chunk (the same for every thread of the block).
  const float shift_lo = to_f32(xs[(int64_t)r0 * c + th.g0 * th.cpg]), shift_hi = to_f32(xs[(int64_t)r0 * c + th.g_hi() * th.cpg]);
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
  for (int r = r0 + th.ty; r < r1; r += R * th.TY) {
    Pack<T, E> pk[R];
    load_rows<T, E, R>(xs + th.c0, c, r, th.TY, r1, pk);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (r + j * th.TY >= r1) break;
      float v[E];
      unpack<T, E>(pk[j], v);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (i < th.nlo) {
          const float d = v[i] - shift_lo;
          lo.x += d, lo.y = fmaf(d, d, lo.y);
        } else {
          const float d = v[i] - shift_hi;
          hi.x += d, hi.y = fmaf(d, d, hi.y);
        }
      }
    }
  }
  const float2 s = gn_block_reduce<E>(th, lo, hi);
  if (threadIdx.x < GROUPS) {
    const int g = threadIdx.x;
    const float count = (float)((r1 - r0) * th.cpg), m = s.x / count;
    const float shift = to_f32(xs[(int64_t)r0 * c + g * th.cpg]);
    part[((int64_t)b * chunks + chunk) * GROUPS + g] = make_float2(shift + m, fmaxf(s.y - s.x * m, 0.f));
  }
}

template <typename T, int E, int R, bool BACKWARDS>
__device__ void gn_fwd_apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             T* __restrict__ y, const float2* __restrict__ part, float2* __restrict__ stats, int hw, int c,
                             int rpc, int chunks, float eps, int silu) {
  const GnThread th(c, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + th.c0;
  float g[E], be[E];
  load_pack<T, E>(gamma + th.c0, g);
  load_pack<T, E>(beta + th.c0, be);
  // The first rows are loaded before the statistics are combined: both latencies overlap.
  Pack<T, E> pk[R];
  int r = BACKWARDS ? last_batch_row<R>(th, r0, r1) : r0 + th.ty;
  load_rows<T, E, R>(x + base, c, r, th.TY, r1, pk);
  __shared__ float2 sh_stats[GROUPS];
  gn_combine<true>(part, b, hw, th.cpg, rpc, chunks, eps, sh_stats);
  if (chunk == 0 && threadIdx.x < GROUPS) stats[b * GROUPS + threadIdx.x] = sh_stats[threadIdx.x];
  const float2 st_lo = sh_stats[th.g0], st_hi = sh_stats[th.g_hi()];
  for (;;) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int rj = r + j * th.TY;
      if (rj >= r1) break;
      float v[E];
      unpack<T, E>(pk[j], v);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float2 st = i < th.nlo ? st_lo : st_hi;
        const float h = fmaf((v[i] - st.x) * st.y, g[i], be[i]);
        v[i] = silu ? h * sigmoidf(h) : h;
      }
      store_pack<T, E>(y + base + (int64_t)rj * c, v);
    }
    r += BACKWARDS ? -R * th.TY : R * th.TY;
    if (BACKWARDS ? r < r0 : r >= r1) break;
    load_rows<T, E, R>(x + base, c, r, th.TY, r1, pk);
  }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm backward (input gradient)
// ---------------------------------------------------------------------------------------------
template <typename T, int E, int R>
__device__ void gn_bwd_stats(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             const float2* __restrict__ stats, const T* __restrict__ dy, float2* __restrict__ part, int hw,
                             int c, int rpc, int chunks, int silu) {
  const GnThread th(c, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + th.c0;
  const float2 st_lo = stats[b * GROUPS + th.g0], st_hi = stats[b * GROUPS + th.g_hi()];
  float g[E], be[E];
  load_pack<T, E>(gamma + th.c0, g);
  load_pack<T, E>(beta + th.c0, be);
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
  for (int r = r0 + th.ty; r < r1; r += R * th.TY) {
    Pack<T, E> px[R], pd[R];
    load_rows<T, E, R>(x + base, c, r, th.TY, r1, px);
    load_rows<T, E, R>(dy + base, c, r, th.TY, r1, pd);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (r + j * th.TY >= r1) break;
      float v[E], d[E];
      unpack<T, E>(px[j], v);
      unpack<T, E>(pd[j], d);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float xhat;
        if (i < th.nlo) {
          const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st_lo, silu, xhat);
          lo.x += dd, lo.y = fmaf(dd, xhat, lo.y);
        } else {
          const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st_hi, silu, xhat);
          hi.x += dd, hi.y = fmaf(dd, xhat, hi.y);
        }
      }
    }
  }
  const float2 s = gn_block_reduce<E>(th, lo, hi);
  if (threadIdx.x < GROUPS) part[((int64_t)b * chunks + chunk) * GROUPS + threadIdx.x] = s;
}

template <typename T, int E, int R>
__device__ void gn_bwd_apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             const float2* __restrict__ stats, const T* __restrict__ dy, const float2* __restrict__ part,
                             const T* __restrict__ res, T* __restrict__ dx, int hw, int c, int rpc, int chunks, int silu) {
  const GnThread th(c, E);
  const int chunk = blockIdx.x, b = blockIdx.y;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + th.c0;
  const float2 st_lo = stats[b * GROUPS + th.g0], st_hi = stats[b * GROUPS + th.g_hi()];
  float g[E], be[E];
  load_pack<T, E>(gamma + th.c0, g);
  load_pack<T, E>(beta + th.c0, be);
  // The first rows are loaded before the sums are combined: both latencies overlap.
  Pack<T, E> px[R], pd[R], pr[R];
  int r = r0 + th.ty;
  load_rows<T, E, R>(x + base, c, r, th.TY, r1, px);
  load_rows<T, E, R>(dy + base, c, r, th.TY, r1, pd);
  if (res) load_rows<T, E, R>(res + base, c, r, th.TY, r1, pr);
  __shared__ float2 sums[GROUPS];
  gn_combine<false>(part, b, hw, th.cpg, rpc, chunks, 0.f, sums);
  const float2 m_lo = sums[th.g0], m_hi = sums[th.g_hi()];
  while (r < r1) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int rj = r + j * th.TY;
      if (rj >= r1) break;
      float v[E], d[E];
      unpack<T, E>(px[j], v);
      unpack<T, E>(pd[j], d);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const bool is_lo = i < th.nlo;
        const float2 st = is_lo ? st_lo : st_hi, mdd = is_lo ? m_lo : m_hi;
        float xhat;
        const float dd = gn_grad_in(v[i], d[i], g[i], be[i], st, silu, xhat);
        v[i] = st.y * (dd - mdd.x - xhat * mdd.y);
      }
      if (res) {
        unpack<T, E>(pr[j], d);
#pragma unroll
        for (int i = 0; i < E; ++i) v[i] += d[i];
      }
      store_pack<T, E>(dx + base + (int64_t)rj * c, v);
    }
    r += R * th.TY;
    load_rows<T, E, R>(x + base, c, r, th.TY, r1, px);
    load_rows<T, E, R>(dy + base, c, r, th.TY, r1, pd);
    if (res) load_rows<T, E, R>(res + base, c, r, th.TY, r1, pr);
  }
}
// ---------------------------------------------------------------------------------------------
// LayerNorm: lane `lane` of a row's warp owns vectors j·32 + lane (j = 0, 1, ...) of the row;
// the first H stay in registers, later ones (rows wider than 32·H·E) are read again.
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

// s += Σ(u − shift), q += Σ(u − shift)² over one vector.
template <int E>
__device__ __forceinline__ void ln_add_shifted(const float (&u)[E], float shift, float& s, float& q) {
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float d = u[i] - shift;
    s += d;
    q = fmaf(d, d, q);
  }
}

template <typename T, int E, int H>
__device__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                       float2* __restrict__ stats, int rows, int c, float eps) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * c;
  const int nv = c / E;
  // x, γ, β of the held vectors, fetched together: no memory round trip after the statistics.
  Pack<T, E> v[H], g[H], be[H];
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      v[j] = load_raw<T, E>(xr + (j * 32 + lane) * E);
      g[j] = load_raw<T, E>(gamma + (j * 32 + lane) * E);
      be[j] = load_raw<T, E>(beta + (j * 32 + lane) * E);
    }
  // One pass over the row: Σd and Σd² of d = x − shift, shift = x[row, 0] (lane 0's first value),
  // so that var = mean(d²) − mean(d)² does not cancel; the two warp sums share one shuffle chain.
  float first = 0.f;
  if (lane == 0) {
    float u[E];
    unpack<T, E>(v[0], u);
    first = u[0];
  }
  const float shift = __shfl_sync(0xffffffff, first, 0);
  float s = 0.f, q = 0.f;
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      float u[E];
      unpack<T, E>(v[j], u);
      ln_add_shifted<E>(u, shift, s, q);
    }
  for (int k = H * 32 + lane; k < nv; k += 32) {
    float u[E];
    load_pack<T, E>(xr + k * E, u);
    ln_add_shifted<E>(u, shift, s, q);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffff, s, o);
    q += __shfl_xor_sync(0xffffffff, q, o);
  }
  const float md = s / (float)c, mean = shift + md;
  const float rstd = rsqrtf(fmaxf(q / (float)c - md * md, 0.f) + eps);
  if (lane == 0) stats[row] = make_float2(mean, rstd);
  T* yr = y + (int64_t)row * c;
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      float u[E];
      opaque<T, E>(v[j]);
      unpack<T, E>(v[j], u);
      ln_fwd_write<T, E>(yr, g[j], be[j], u, j * 32 + lane, mean, rstd);
    }
  for (int k = H * 32 + lane; k < nv; k += 32) {
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
__device__ __forceinline__ void ln_bwd_write(T* dxr, const T* resr, float (&u)[E], const float (&e)[E], const Pack<T, E>& gp, int k,
                                             float2 st, float m1, float m2) {
  float g[E];
  unpack<T, E>(gp, g);
#pragma unroll
  for (int i = 0; i < E; ++i) u[i] = st.y * (__fmul_rn(e[i], g[i]) - m1 - (u[i] - st.x) * st.y * m2);
  if (resr) {
    float r[E];
    load_pack<T, E>(resr + k * E, r);
#pragma unroll
    for (int i = 0; i < E; ++i) u[i] += r[i];
  }
  store_pack<T, E>(dxr + k * E, u);
}

template <typename T, int E, int H>
__device__ void ln_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const float2* __restrict__ stats,
                       const T* __restrict__ dy, const T* __restrict__ res, T* __restrict__ dx, int rows, int c) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t off = (int64_t)row * c;
  const T* xr = x + off;
  const T* dyr = dy + off;
  const int nv = c / E;
  const float2 st = stats[row];
  Pack<T, E> hx[H], hd[H], g[H];
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      hx[j] = load_raw<T, E>(xr + (j * 32 + lane) * E);
      hd[j] = load_raw<T, E>(dyr + (j * 32 + lane) * E);
      g[j] = load_raw<T, E>(gamma + (j * 32 + lane) * E);
    }
  float a1 = 0.f, a2 = 0.f;
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      float u[E], e[E];
      unpack<T, E>(hx[j], u);
      unpack<T, E>(hd[j], e);
      ln_bwd_sums<T, E>(u, e, g[j], st, a1, a2);
    }
  for (int k = H * 32 + lane; k < nv; k += 32) {
    float u[E], e[E];
    load_pack<T, E>(xr + k * E, u);
    load_pack<T, E>(dyr + k * E, e);
    ln_bwd_sums<T, E>(u, e, load_raw<T, E>(gamma + k * E), st, a1, a2);
  }
  const float m1 = warp_sum(a1) / (float)c, m2 = warp_sum(a2) / (float)c;
  T* dxr = dx + off;
  const T* resr = res ? res + off : nullptr;
#pragma unroll
  for (int j = 0; j < H; ++j)
    if (j * 32 + lane < nv) {
      float u[E], e[E];
      opaque<T, E>(hx[j]), opaque<T, E>(hd[j]);
      unpack<T, E>(hx[j], u);
      unpack<T, E>(hd[j], e);
      ln_bwd_write<T, E>(dxr, resr, u, e, g[j], j * 32 + lane, st, m1, m2);
    }
  for (int k = H * 32 + lane; k < nv; k += 32) {
    float u[E], e[E];
    load_pack<T, E>(xr + k * E, u);
    load_pack<T, E>(dyr + k * E, e);
    ln_bwd_write<T, E>(dxr, resr, u, e, load_raw<T, E>(gamma + k * E), k, st, m1, m2);
  }
}

// Entry points: <op>_<type>_v<E>, E = elements per vector load. GroupNorm: the launcher picks the
// widest 16-byte vector with E ≤ c/32 or E = 2·c/32, or 8 f32 (two 16-byte loads) where c/E would
// exceed 512; blocks of up to 512 threads, R = 2 rows loaded at a time (more would spill at 128 registers);
// suffix _t256r4: blocks of up to 256 threads loading R = 4 rows at a time, for samples of many
// rows per thread; _t1024 (forward only): statistics in blocks of up to 1024 threads and apply in
// blocks of up to 512 walking rows backwards, R = 4, one wave, for inputs larger than L2 (the
// launcher's rule, src/ops/norm.rs gn_variant). The apply kernels ask for one block per SM at least
// (__launch_bounds__(threads, 1)): without it ptxas aims at two 512-thread blocks per SM on
// sm_80/86/89 (64 registers) and spills.
// LayerNorm's carry _h<H>, the vectors per lane held in registers (blocks of 256 per SM: 4 for
// H ≤ 2, 3 for H = 3, 2 for 5).
#define LN_KERNELS(TN, T, E, H)                                                                                         \
  extern "C" __global__ void __launch_bounds__(256, (H) <= 2 ? 4 : (H) == 3 ? 3 : 2) layer_norm_fwd_##TN##_v##E##_h##H(                \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int rows, int c, float eps) { await_previous_kernel(); \
    ln_fwd<T, E, H>(x, gamma, beta, y, stats, rows, c, eps);                                                           \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256, (H) <= 2 ? 4 : (H) == 3 ? 3 : 2) layer_norm_bwd_##TN##_v##E##_h##H(                \
      const T* x, const T* gamma, const float2* stats, const T* dy, const T* res, T* dx, int rows, int c) { await_previous_kernel(); \
    ln_bwd<T, E, H>(x, gamma, stats, dy, res, dx, rows, c);                                                            \
  }
#define GN_FWD_KERNELS(TN, T, E, SUFFIX, STATS_THREADS, APPLY_THREADS, R, BACKWARDS)                                    \
  extern "C" __global__ void __launch_bounds__(STATS_THREADS) group_norm_fwd_stats_##TN##_v##E##SUFFIX(                 \
      const T* x, float2* part, int hw, int c, int rpc, int chunks) { await_previous_kernel();                         \
    gn_fwd_stats<T, E, R>(x, part, hw, c, rpc, chunks);                                                                \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(APPLY_THREADS, 1) group_norm_fwd_apply_##TN##_v##E##SUFFIX(              \
      const T* x, const T* gamma, const T* beta, T* y, const float2* part, float2* stats, int hw, int c, int rpc,     \
      int chunks, float eps, int silu) { await_previous_kernel();                                                      \
    gn_fwd_apply<T, E, R, BACKWARDS>(x, gamma, beta, y, part, stats, hw, c, rpc, chunks, eps, silu);                    \
  }
#define GN_BWD_KERNELS(TN, T, E, SUFFIX, THREADS, R)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS) group_norm_bwd_stats_##TN##_v##E##SUFFIX(                      \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, float2* part, int hw, int c,       \
      int rpc, int chunks, int silu) { await_previous_kernel();                                                        \
    gn_bwd_stats<T, E, R>(x, gamma, beta, stats, dy, part, hw, c, rpc, chunks, silu);                                  \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) group_norm_bwd_apply_##TN##_v##E##SUFFIX(                    \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, const float2* part, const T* res,    \
      T* dx, int hw, int c, int rpc, int chunks, int silu) { await_previous_kernel();                                  \
    gn_bwd_apply<T, E, R>(x, gamma, beta, stats, dy, part, res, dx, hw, c, rpc, chunks, silu);                         \
  }
#define GN_VARIANTS(TN, T, E)                                                                                           \
  GN_FWD_KERNELS(TN, T, E, , 512, 512, 2, false) GN_BWD_KERNELS(TN, T, E, , 512, 2)                                     \
  GN_FWD_KERNELS(TN, T, E, _t256r4, 256, 256, 4, false) GN_BWD_KERNELS(TN, T, E, _t256r4, 256, 4)                       \
  GN_FWD_KERNELS(TN, T, E, _t1024, 1024, 512, 4, true)
#define NORM_KERNELS(TN, T, E)                                                                                          \
  GN_VARIANTS(TN, T, E)                                                                                                \
  LN_KERNELS(TN, T, E, 1)                                                                                              \
  LN_KERNELS(TN, T, E, 2)                                                                                              \
  LN_KERNELS(TN, T, E, 3)                                                                                              \
  LN_KERNELS(TN, T, E, 5)

NORM_KERNELS(f32, float, 1)
NORM_KERNELS(f32, float, 2)
NORM_KERNELS(f32, float, 4)
GN_VARIANTS(f32, float, 8)
NORM_KERNELS(bf16, bf16, 1)
NORM_KERNELS(bf16, bf16, 2)
NORM_KERNELS(bf16, bf16, 4)
NORM_KERNELS(bf16, bf16, 8)
