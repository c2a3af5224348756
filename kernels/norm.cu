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
//
//   Tiling: the hw rows of a sample are cut into `chunks` chunks of `rpc` rows; a block of 8 warps
//   handles one (chunk, sample). Inside a warp, lane g owns group g: it reads its cpg contiguous
//   channels of a row with E-wide vector loads, so a warp reads whole rows and never needs a
//   cross-lane reduction. Two kernels per direction:
//     *_stats: per (sample, chunk, group) partials to `part` [n, chunks, 32, 2]:
//              forward (mean, M2) of the chunk (sums shifted by one sample value, so no cancellation),
//              backward (Σd, Σd·x̂);
//     *_apply: combines the partials of its sample (Chan's formula forward, sums backward; the 8
//              warps split the chunks, then warp 0 merges), then writes y (and stats) or dx for its
//              chunk. The chunk's rows are still in L2 from the stats pass.
//
// LayerNorm over rows: x [rows, c], one warp per row, E-wide vector loads, exact two-pass statistics
//   (mean, then Σ(x − mean)²); y = x̂·γ + β; stats [rows, 2] = (mean, rstd).
//   Backward: d = dy·γ; dx = rstd·(d − mean(d) − x̂·mean(d·x̂)).
#include "pack.cuh"

#define GROUPS 32
#define WARPS 8

__device__ __forceinline__ float sigmoidf(float h) { return 1.0f / (1.0f + expf(-h)); }

// Rows [r0, r1) of chunk `chunk`.
__device__ __forceinline__ void chunk_rows(int chunk, int rpc, int hw, int& r0, int& r1) {
  r0 = chunk * rpc;
  r1 = min(r0 + rpc, hw);
}

// ---------------------------------------------------------------------------------------------
// GroupNorm forward
// ---------------------------------------------------------------------------------------------
template <typename T, int E>
__device__ void gn_fwd_stats(const T* __restrict__ x, float2* __restrict__ part, int hw, int c, int rpc, int chunks) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x, b = blockIdx.y, cpg = c / GROUPS;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const T* xs = x + (int64_t)b * hw * c + lane * cpg;
  const float shift = to_f32(xs[(int64_t)r0 * c]);  // same shift for every warp of the block
  float s1 = 0.f, s2 = 0.f;
  for (int r = r0 + warp; r < r1; r += WARPS) {
    const T* row = xs + (int64_t)r * c;
    for (int j = 0; j < cpg; j += E) {
      float v[E];
      load_pack<T, E>(row + j, v);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float d = v[i] - shift;
        s1 += d;
        s2 = fmaf(d, d, s2);
      }
    }
  }
  __shared__ float sh[WARPS][GROUPS][2];
  sh[warp][lane][0] = s1;
  sh[warp][lane][1] = s2;
  __syncthreads();
  if (warp == 0) {
    s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s1 += sh[w][lane][0], s2 += sh[w][lane][1];
    const float count = (float)((r1 - r0) * cpg);
    const float m = s1 / count;
    part[((int64_t)b * chunks + chunk) * GROUPS + lane] = make_float2(shift + m, fmaxf(s2 - s1 * m, 0.f));
  }
}

// Chan et al.: merge (n_b, mean_b, M2_b) into (n, mean, M2).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  if (nb == 0.f) return;
  const float tot = n + nb, delta = meanb - mean, f = nb / tot;
  mean = fmaf(delta, f, mean);
  m2 = m2 + m2b + delta * delta * n * f;
  n = tot;
}

// Fills sh_stats[g] = (mean, rstd) of sample b from the stats partials; block-wide, ends synced.
__device__ void gn_combine_fwd(const float2* __restrict__ part, int b, int hw, int cpg, int rpc, int chunks, float eps,
                               float2* sh_stats) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float sh[WARPS][GROUPS][3];
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int k = warp; k < chunks; k += WARPS) {
    int r0, r1;
    chunk_rows(k, rpc, hw, r0, r1);
    const float2 p = part[((int64_t)b * chunks + k) * GROUPS + lane];
    chan_merge(n, mean, m2, (float)((r1 - r0) * cpg), p.x, p.y);
  }
  sh[warp][lane][0] = n, sh[warp][lane][1] = mean, sh[warp][lane][2] = m2;
  __syncthreads();
  if (warp == 0) {
    n = 0.f, mean = 0.f, m2 = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) chan_merge(n, mean, m2, sh[w][lane][0], sh[w][lane][1], sh[w][lane][2]);
    sh_stats[lane] = make_float2(mean, rsqrtf(m2 / n + eps));
  }
  __syncthreads();
}

template <typename T, int E>
__device__ void gn_fwd_apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             T* __restrict__ y, const float2* __restrict__ part, float2* __restrict__ stats, int hw, int c,
                             int rpc, int chunks, float eps, int silu) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x, b = blockIdx.y, cpg = c / GROUPS;
  __shared__ float2 sh_stats[GROUPS];
  gn_combine_fwd(part, b, hw, cpg, rpc, chunks, eps, sh_stats);
  const float2 st = sh_stats[lane];
  if (chunk == 0 && warp == 0) stats[b * GROUPS + lane] = st;
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + lane * cpg;
  for (int r = r0 + warp; r < r1; r += WARPS) {
    const int64_t off = base + (int64_t)r * c;
    for (int j = 0; j < cpg; j += E) {
      float v[E], g[E], be[E];
      load_pack<T, E>(x + off + j, v);
      load_pack<T, E>(gamma + lane * cpg + j, g);
      load_pack<T, E>(beta + lane * cpg + j, be);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float h = fmaf((v[i] - st.x) * st.y, g[i], be[i]);
        v[i] = silu ? h * sigmoidf(h) : h;
      }
      store_pack<T, E>(y + off + j, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm backward (input gradient)
// ---------------------------------------------------------------------------------------------
// d = dh·γ for one element, and x̂.
__device__ __forceinline__ float gn_grad_in(float xv, float dyv, float g, float be, float2 st, int silu, float& xhat) {
  xhat = (xv - st.x) * st.y;
  float dh = dyv;
  if (silu) {
    const float h = fmaf(xhat, g, be), s = sigmoidf(h);
    dh = dyv * s * (1.f + h * (1.f - s));
  }
  return dh * g;
}

template <typename T, int E>
__device__ void gn_bwd_stats(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             const float2* __restrict__ stats, const T* __restrict__ dy, float2* __restrict__ part, int hw,
                             int c, int rpc, int chunks, int silu) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x, b = blockIdx.y, cpg = c / GROUPS;
  const float2 st = stats[b * GROUPS + lane];
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + lane * cpg;
  float a1 = 0.f, a2 = 0.f;
  for (int r = r0 + warp; r < r1; r += WARPS) {
    const int64_t off = base + (int64_t)r * c;
    for (int j = 0; j < cpg; j += E) {
      float v[E], d[E], g[E], be[E];
      load_pack<T, E>(x + off + j, v);
      load_pack<T, E>(dy + off + j, d);
      load_pack<T, E>(gamma + lane * cpg + j, g);
      load_pack<T, E>(beta + lane * cpg + j, be);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float xhat, dd = gn_grad_in(v[i], d[i], g[i], be[i], st, silu, xhat);
        a1 += dd;
        a2 = fmaf(dd, xhat, a2);
      }
    }
  }
  __shared__ float sh[WARPS][GROUPS][2];
  sh[warp][lane][0] = a1, sh[warp][lane][1] = a2;
  __syncthreads();
  if (warp == 0) {
    a1 = 0.f, a2 = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a1 += sh[w][lane][0], a2 += sh[w][lane][1];
    part[((int64_t)b * chunks + chunk) * GROUPS + lane] = make_float2(a1, a2);
  }
}

template <typename T, int E>
__device__ void gn_bwd_apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                             const float2* __restrict__ stats, const T* __restrict__ dy, const float2* __restrict__ part,
                             T* __restrict__ dx, int hw, int c, int rpc, int chunks, int silu) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x, b = blockIdx.y, cpg = c / GROUPS;
  __shared__ float sh[WARPS][GROUPS][2];
  __shared__ float2 sums[GROUPS];
  float a1 = 0.f, a2 = 0.f;
  for (int k = warp; k < chunks; k += WARPS) {
    const float2 p = part[((int64_t)b * chunks + k) * GROUPS + lane];
    a1 += p.x, a2 += p.y;
  }
  sh[warp][lane][0] = a1, sh[warp][lane][1] = a2;
  __syncthreads();
  if (warp == 0) {
    a1 = 0.f, a2 = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a1 += sh[w][lane][0], a2 += sh[w][lane][1];
    const float inv_n = 1.f / (float)(hw * cpg);
    sums[lane] = make_float2(a1 * inv_n, a2 * inv_n);
  }
  __syncthreads();
  const float2 mdd = sums[lane];  // (mean(d), mean(d·x̂)) of this lane's group
  const float2 st = stats[b * GROUPS + lane];
  int r0, r1;
  chunk_rows(chunk, rpc, hw, r0, r1);
  const int64_t base = (int64_t)b * hw * c + lane * cpg;
  for (int r = r0 + warp; r < r1; r += WARPS) {
    const int64_t off = base + (int64_t)r * c;
    for (int j = 0; j < cpg; j += E) {
      float v[E], d[E], g[E], be[E];
      load_pack<T, E>(x + off + j, v);
      load_pack<T, E>(dy + off + j, d);
      load_pack<T, E>(gamma + lane * cpg + j, g);
      load_pack<T, E>(beta + lane * cpg + j, be);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float xhat, dd = gn_grad_in(v[i], d[i], g[i], be[i], st, silu, xhat);
        v[i] = st.y * (dd - mdd.x - xhat * mdd.y);
      }
      store_pack<T, E>(dx + off + j, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------
template <typename T, int E>
__device__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                       float2* __restrict__ stats, int rows, int c, float eps) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + (int64_t)row * c;
  const int nv = c / E;
  float s = 0.f;
  for (int k = lane; k < nv; k += 32) {
    float v[E];
    load_pack<T, E>(xr + k * E, v);
#pragma unroll
    for (int i = 0; i < E; ++i) s += v[i];
  }
  const float mean = warp_sum(s) / (float)c;
  s = 0.f;
  for (int k = lane; k < nv; k += 32) {
    float v[E];
    load_pack<T, E>(xr + k * E, v);
#pragma unroll
    for (int i = 0; i < E; ++i) s = fmaf(v[i] - mean, v[i] - mean, s);
  }
  const float rstd = rsqrtf(warp_sum(s) / (float)c + eps);
  if (lane == 0) stats[row] = make_float2(mean, rstd);
  T* yr = y + (int64_t)row * c;
  for (int k = lane; k < nv; k += 32) {
    float v[E], g[E], be[E];
    load_pack<T, E>(xr + k * E, v);
    load_pack<T, E>(gamma + k * E, g);
    load_pack<T, E>(beta + k * E, be);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = fmaf((v[i] - mean) * rstd, g[i], be[i]);
    store_pack<T, E>(yr + k * E, v);
  }
}

template <typename T, int E>
__device__ void ln_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const float2* __restrict__ stats,
                       const T* __restrict__ dy, T* __restrict__ dx, int rows, int c) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t off = (int64_t)row * c;
  const int nv = c / E;
  const float2 st = stats[row];
  float a1 = 0.f, a2 = 0.f;
  for (int k = lane; k < nv; k += 32) {
    float v[E], d[E], g[E];
    load_pack<T, E>(x + off + k * E, v);
    load_pack<T, E>(dy + off + k * E, d);
    load_pack<T, E>(gamma + k * E, g);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float dd = d[i] * g[i];
      a1 += dd;
      a2 = fmaf(dd, (v[i] - st.x) * st.y, a2);
    }
  }
  const float m1 = warp_sum(a1) / (float)c, m2 = warp_sum(a2) / (float)c;
  for (int k = lane; k < nv; k += 32) {
    float v[E], d[E], g[E];
    load_pack<T, E>(x + off + k * E, v);
    load_pack<T, E>(dy + off + k * E, d);
    load_pack<T, E>(gamma + k * E, g);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = st.y * (d[i] * g[i] - m1 - (v[i] - st.x) * st.y * m2);
    store_pack<T, E>(dx + off + k * E, v);
  }
}

// Entry points: <op>_<type>_v<E>, E = elements per vector load (the launcher picks the widest that
// divides the channels a lane reads: cpg for GroupNorm, c for LayerNorm).
#define NORM_KERNELS(TN, T, E)                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) group_norm_fwd_stats_##TN##_v##E(                                 \
      const T* x, float2* part, int hw, int c, int rpc, int chunks) {                                                  \
    gn_fwd_stats<T, E>(x, part, hw, c, rpc, chunks);                                                                   \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) group_norm_fwd_apply_##TN##_v##E(                                 \
      const T* x, const T* gamma, const T* beta, T* y, const float2* part, float2* stats, int hw, int c, int rpc,     \
      int chunks, float eps, int silu) {                                                                               \
    gn_fwd_apply<T, E>(x, gamma, beta, y, part, stats, hw, c, rpc, chunks, eps, silu);                                 \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) group_norm_bwd_stats_##TN##_v##E(                                 \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, float2* part, int hw, int c,       \
      int rpc, int chunks, int silu) {                                                                                 \
    gn_bwd_stats<T, E>(x, gamma, beta, stats, dy, part, hw, c, rpc, chunks, silu);                                     \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) group_norm_bwd_apply_##TN##_v##E(                                 \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, const float2* part, T* dx, int hw,  \
      int c, int rpc, int chunks, int silu) {                                                                          \
    gn_bwd_apply<T, E>(x, gamma, beta, stats, dy, part, dx, hw, c, rpc, chunks, silu);                                 \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) layer_norm_fwd_##TN##_v##E(                                       \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int rows, int c, float eps) {                    \
    ln_fwd<T, E>(x, gamma, beta, y, stats, rows, c, eps);                                                              \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) layer_norm_bwd_##TN##_v##E(                                       \
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
