// Single-pass GroupNorm on Hopper (sm_90a): thread-block clusters with distributed shared memory.
// Same math, layout, saved statistics and results as the two-kernel path in kernels/norm.cu (see
// its header); CPU twins: group_norm_cpu / group_norm_backward_cpu in src/ops/norm.rs.
//
// GroupNorm, 32 groups, NHWC: x [n, hw, c], cpg = c/32 channels per group (even here).
//   Forward: mean, var over the hw·cpg values of (sample, group), rstd = 1/√(var + eps),
//   y = γ·(x − mean)·rstd + β, then SiLU when `silu`; stats [n, 32, 2] = (mean, rstd) in f32.
//   Backward: d = dh·γ (dh = dy, or through SiLU), x̂ = (x − mean)·rstd,
//   dx = rstd·(d − mean_g(d) − x̂·mean_g(d·x̂)) (+ res, optional).
//
// Work split: a cluster of K CTAs (K ≤ 16, cluster dims (K, 1, 1)) owns `gpc` whole groups
// (cw = gpc·cpg channels starting at slice·cw) of one sample (blockIdx.y); CTA `rank` of the cluster
// owns rows [rank·rpc, min((rank + 1)·rpc, hw)) of those channels (possibly none). Grid:
// (32/gpc · K, n). Each CTA:
//   1. copies its tile [rows, cw] (x, and dy for the backward) into dynamic shared memory with
//      cp.async, every copy in flight at once, in two groups (first and second half of the rows:
//      step 2 starts on the first while the second lands): the only global read of x / dy;
//   2. thread t owns the channel pair 2·(t % P), P = cw/2 (blockDim = P·⌊T/P⌋, so the pair is fixed
//      per thread and in one group), and visits the tile's pairs t, t + blockDim, ...: it sums
//      forward the values shifted by the group's first value in the tile (Σd, Σd², no cancellation),
//      backward (Σd, Σd·x̂); one warp per group adds the threads' sums in a fixed order and
//      publishes the CTA's partial in shared memory: forward (mean, M2) of the tile, backward sums;
//   3. barrier.cluster (arrive.release / wait.acquire), then threads g < gpc read the K partials of
//      group g from every CTA of the cluster through DSMEM (mapa + ld.shared::cluster, all K loads
//      in flight at once) and merge them in rank order (Chan's formula forward, sums backward): every CTA gets the same bits;
//   4. writes y (or dx) from the tile it still holds (the only global write), then waits on a
//      second cluster barrier (arrived at right after its DSMEM reads) so that no CTA exits while
//      another may still read its partials.
// One read, one write, one launch. The launcher (src/ops/norm.rs, gn_cluster_plan) picks gpc, K,
// rpc and the copy width VB (16, 8 or 4 bytes, dividing cw·sizeof(T)), and falls back to the
// two-kernel path where cpg is odd or the tile does not fit in shared memory.
#include "norm.cuh"

#define MAX_THREADS 512
#define MAX_CLUSTER 16

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_size() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// `p` (this CTA's shared memory) as the same variable in CTA `rank` of the cluster, read there.
__device__ __forceinline__ float2 ld_cluster(const float2* p, uint32_t rank) {
  const uint32_t local = (uint32_t)__cvta_generic_to_shared(p);
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(remote) : "memory");
  return v;
}

// `part` of CTAs 0..K−1 of the cluster, all K loads issued before any is used.
__device__ __forceinline__ void load_partials(const float2* part, int K, float2 (&p)[MAX_CLUSTER]) {
#pragma unroll
  for (int q = 0; q < MAX_CLUSTER; ++q)
    if (q < K) p[q] = ld_cluster(part, q);
}

// Issues cp.async copies of rows [r0, r1) of a [rows, cw] tile from global (row stride c elements)
// into dense shared memory, VB bytes per copy (VB divides cw·sizeof(T); both sides VB-aligned).
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int r0, int r1, int cw, int c, int vb) {
  const int row_bytes = cw * (int)sizeof(T), per_row = row_bytes / vb, total = (r1 - r0) * per_row;
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(dst) + r0 * row_bytes;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int r = i / per_row, k = i - r * per_row;
    const uint32_t s = base + r * row_bytes + k * vb;
    const char* g = reinterpret_cast<const char*>(src + (int64_t)(r0 + r) * c) + k * vb;
    if (vb == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
    } else if (vb == 8) {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(s), "l"(g) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(g) : "memory");
    }
  }
}

__device__ __forceinline__ void commit_rows() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until all but the last N committed groups of this thread's copies have landed, then for
// the whole block (so every thread sees every thread's copies).
template <int N>
__device__ __forceinline__ void wait_rows() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
  __syncthreads();
}

// add(j) for this thread's words j of the tile: those of the first `split_words` (the first half of
// the rows, already waited for) while the second half is still arriving, then, after waiting, the rest.
template <typename Add>
__device__ __forceinline__ void for_each_word(int split_words, int words, Add add) {
  int j = threadIdx.x;
#pragma unroll 4
  for (; j < split_words; j += blockDim.x) add(j);
  wait_rows<0>();
#pragma unroll 4
  for (; j < words; j += blockDim.x) add(j);
}

// The CTA's place: cluster slice, rank, its rows, its channels and this thread's channel pair.
struct GnTile {
  int K, rank, slice, b, cpg, cw, c0, r0, rows, P, pair, gl;  // gl: the thread's group within the slice
  __device__ GnTile(int hw, int c, int gpc, int rpc) {
    K = (int)cluster_size();
    rank = (int)cluster_rank();
    slice = blockIdx.x / K;
    b = blockIdx.y;
    cpg = c / GROUPS;
    cw = gpc * cpg;
    c0 = slice * cw;
    r0 = rank * rpc;
    rows = max(min(r0 + rpc, hw) - r0, 0);
    P = cw / 2;
    pair = threadIdx.x % P;
    gl = 2 * pair / cpg;
  }
  // Rows of CTA q of the cluster.
  __device__ __forceinline__ int rows_of(int q, int hw, int rpc) const { return max(min((q + 1) * rpc, hw) - q * rpc, 0); }
};

// Adds the threads' (s1, s2) per group in a fixed order: warp w takes groups w, w + W, ...; the
// threads of group g are those whose pair lies in [g·cpg/2, (g + 1)·cpg/2). Calls `publish(g, sums)`
// in lane 0. Every thread calls it; starts and ends with a block barrier.
template <typename F>
__device__ __forceinline__ void gn_tile_reduce(const GnTile& t, float2 s, int gpc, F publish) {
  __shared__ float2 red[MAX_THREADS];
  red[threadIdx.x] = s;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5, h = t.cpg / 2;
  const int per_group = (blockDim.x / t.P) * h;
  for (int g = warp; g < gpc; g += W) {
    float2 acc = make_float2(0.f, 0.f);
    for (int j = lane; j < per_group; j += 32) {
      const float2 v = red[(j / h) * t.P + g * h + j % h];
      acc.x += v.x, acc.y += v.y;
    }
    acc.x = warp_sum(acc.x), acc.y = warp_sum(acc.y);
    if (lane == 0) publish(g, acc);
  }
  __syncthreads();
}

template <typename T>
__device__ void gn_cluster_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                               float2* __restrict__ stats, int hw, int c, int gpc, int rpc, int vb, float eps, int silu) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* tile = reinterpret_cast<T*>(smem);
  __shared__ float2 part[GROUPS], merged[GROUPS];
  const GnTile t(hw, c, gpc, rpc);
  const int64_t row0 = (int64_t)t.b * hw + t.r0;
  // Two halves in flight; the sums of the first start while the second lands.
  const T* src = x + row0 * c + t.c0;
  const int split = (t.rows + 1) / 2;
  load_rows<T>(tile, src, 0, split, t.cw, c, vb);
  commit_rows();
  load_rows<T>(tile, src, split, t.rows, t.cw, c, vb);
  commit_rows();
  const int ch = t.c0 + 2 * t.pair;
  float g[2], be[2];
  load_pack<T, 2>(gamma + ch, g);
  load_pack<T, 2>(beta + ch, be);
  wait_rows<1>();

  // 2. Shifted sums of the thread's pairs, then the tile's (mean, M2) per group.
  const int words = t.rows * t.P;
  const float shift = t.rows ? to_f32(tile[t.gl * t.cpg]) : 0.f;
  float2 s = make_float2(0.f, 0.f);
  auto add = [&](int j) {
    float v[2];
    load_pack<T, 2>(tile + 2 * j, v);
    const float d0 = v[0] - shift, d1 = v[1] - shift;
    s.x += d0 + d1;
    s.y = fmaf(d0, d0, fmaf(d1, d1, s.y));
  };
  for_each_word(split * t.P, words, add);
  gn_tile_reduce(t, s, gpc, [&](int gr, float2 sum) {
    const float count = (float)(t.rows * t.cpg);
    if (count == 0.f) {
      part[gr] = make_float2(0.f, 0.f);
      return;
    }
    const float m = sum.x / count;
    part[gr] = make_float2(to_f32(tile[gr * t.cpg]) + m, fmaxf(sum.y - sum.x * m, 0.f));
  });

  // 3. Merge the cluster's partials of each group, in rank order.
  cluster_arrive();
  cluster_wait();
  if ((int)threadIdx.x < gpc) {
    float2 p[MAX_CLUSTER];
    load_partials(&part[threadIdx.x], t.K, p);
    float n = 0.f, mean = 0.f, m2 = 0.f;
#pragma unroll
    for (int q = 0; q < MAX_CLUSTER; ++q)
      if (q < t.K) chan_merge(n, mean, m2, (float)(t.rows_of(q, hw, rpc) * t.cpg), p[q].x, p[q].y);
    const float2 st = make_float2(mean, rsqrtf(m2 / n + eps));
    merged[threadIdx.x] = st;
    if (t.rank == 0) stats[t.b * GROUPS + t.slice * gpc + threadIdx.x] = st;
  }
  cluster_arrive();  // this CTA's DSMEM reads are done
  __syncthreads();

  // 4. y from the held tile.
  const float2 st = merged[t.gl];
  const float a0 = st.y * g[0], a1 = st.y * g[1];
  T* ys = y + row0 * c + t.c0 + 2 * t.pair;
  const int TY = blockDim.x / t.P;
#pragma unroll 4
  for (int w = threadIdx.x, r = threadIdx.x / t.P; w < words; w += blockDim.x, r += TY) {
    float v[2];
    load_pack<T, 2>(tile + 2 * w, v);
    v[0] = fmaf(v[0] - st.x, a0, be[0]);
    v[1] = fmaf(v[1] - st.x, a1, be[1]);
    if (silu) v[0] *= sigmoidf(v[0]), v[1] *= sigmoidf(v[1]);
    store_pack<T, 2>(ys + (int64_t)r * c, v);
  }
  cluster_wait();  // no CTA leaves while another may still read its partials
}

template <typename T>
__device__ void gn_cluster_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                               const float2* __restrict__ stats, const T* __restrict__ dy, const T* __restrict__ res, T* __restrict__ dx,
                               int hw, int c, int gpc, int rpc, int vb, int silu) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float2 part[GROUPS], merged[GROUPS];
  const GnTile t(hw, c, gpc, rpc);
  T* xt = reinterpret_cast<T*>(smem);
  T* dyt = xt + t.rows * t.cw;  // VB-aligned: rows·cw·sizeof(T) is a multiple of VB
  const int64_t off = ((int64_t)t.b * hw + t.r0) * c + t.c0;
  // Two halves in flight; the sums of the first start while the second lands.
  const int split = (t.rows + 1) / 2;
  load_rows<T>(xt, x + off, 0, split, t.cw, c, vb);
  load_rows<T>(dyt, dy + off, 0, split, t.cw, c, vb);
  commit_rows();
  load_rows<T>(xt, x + off, split, t.rows, t.cw, c, vb);
  load_rows<T>(dyt, dy + off, split, t.rows, t.cw, c, vb);
  commit_rows();
  const int ch = t.c0 + 2 * t.pair;
  float g[2], be[2];
  load_pack<T, 2>(gamma + ch, g);
  load_pack<T, 2>(beta + ch, be);
  const float2 st = stats[t.b * GROUPS + t.slice * gpc + t.gl];
  wait_rows<1>();

  // 2. (Σd, Σd·x̂) of the thread's pairs, then of the tile per group.
  const int words = t.rows * t.P;
  float2 s = make_float2(0.f, 0.f);
  auto add = [&](int j) {
    float v[2], e[2];
    load_pack<T, 2>(xt + 2 * j, v);
    load_pack<T, 2>(dyt + 2 * j, e);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float xhat;
      const float dd = gn_grad_in(v[i], e[i], g[i], be[i], st, silu, xhat);
      s.x += dd;
      s.y = fmaf(dd, xhat, s.y);
    }
  };
  for_each_word(split * t.P, words, add);
  gn_tile_reduce(t, s, gpc, [&](int gr, float2 sum) { part[gr] = sum; });

  // 3. Sum the cluster's partials of each group, in rank order: (mean(d), mean(d·x̂)).
  cluster_arrive();
  cluster_wait();
  if ((int)threadIdx.x < gpc) {
    float2 p[MAX_CLUSTER];
    load_partials(&part[threadIdx.x], t.K, p);
    float2 acc = make_float2(0.f, 0.f);
#pragma unroll
    for (int q = 0; q < MAX_CLUSTER; ++q)
      if (q < t.K) acc.x += p[q].x, acc.y += p[q].y;
    const float inv_n = 1.f / (float)(hw * t.cpg);
    merged[threadIdx.x] = make_float2(acc.x * inv_n, acc.y * inv_n);
  }
  cluster_arrive();  // this CTA's DSMEM reads are done
  __syncthreads();

  // 4. dx from the held tiles (+ the residual gradient, read here).
  const float2 m = merged[t.gl];
  const int TY = blockDim.x / t.P;
#pragma unroll 4
  for (int w = threadIdx.x, r = threadIdx.x / t.P; w < words; w += blockDim.x, r += TY) {
    float v[2], e[2];
    load_pack<T, 2>(xt + 2 * w, v);
    load_pack<T, 2>(dyt + 2 * w, e);
    const int64_t at = (int64_t)r * c + 2 * t.pair;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float xhat;
      const float dd = gn_grad_in(v[i], e[i], g[i], be[i], st, silu, xhat);
      v[i] = st.y * (dd - m.x - xhat * m.y);
    }
    if (res) {
      load_pack<T, 2>(res + off + at, e);
      v[0] += e[0], v[1] += e[1];
    }
    store_pack<T, 2>(dx + off + at, v);
  }
  cluster_wait();  // no CTA leaves while another may still read its partials
}

// Entry points: group_norm_cluster_{fwd,bwd}_<type>; dynamic shared memory = the tile(s).
#define GN_CLUSTER_KERNELS(TN, T)                                                                                      \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS) group_norm_cluster_fwd_##TN(                               \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int hw, int c, int gpc, int rpc, int vb, float eps, \
      int silu) { await_previous_kernel();                                                                             \
    gn_cluster_fwd<T>(x, gamma, beta, y, stats, hw, c, gpc, rpc, vb, eps, silu);                                       \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS) group_norm_cluster_bwd_##TN(                               \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, const T* res, T* dx, int hw, int c, \
      int gpc, int rpc, int vb, int silu) { await_previous_kernel();                                                   \
    gn_cluster_bwd<T>(x, gamma, beta, stats, dy, res, dx, hw, c, gpc, rpc, vb, silu);                                  \
  }

GN_CLUSTER_KERNELS(f32, float)
GN_CLUSTER_KERNELS(bf16, bf16)
