// Single-pass GroupNorm on Hopper (sm_90a): thread-block clusters, the tile held in registers.
// Same math, layout and saved statistics as the two-kernel path in kernels/norm.cu (see its
// header); CPU twins: group_norm_cpu / group_norm_backward_cpu in src/ops/norm.rs.
//
// GroupNorm, 32 groups, NHWC: x [n, hw, c], cpg = c/32 channels per group.
//   Forward: mean, var over the hw·cpg values of (sample, group), rstd = 1/√(var + eps),
//   y = γ·(x − mean)·rstd + β, then SiLU when `silu`; stats [n, 32, 2] = (mean, rstd) in f32.
//   Backward: d = dh·γ (dh = dy, or through SiLU), x̂ = (x − mean)·rstd,
//   dx = rstd·(d − mean_g(d) − x̂·mean_g(d·x̂)) (+ res, optional).
//
// Work split: a cluster of K CTAs (K ≤ 16, cluster dims (K, 1, 1)) owns `gpc` whole groups
// (cw = gpc·cpg channels from slice·cw) of one sample (blockIdx.y); CTA `rank` of the cluster owns
// rows [rank·rpc, min((rank + 1)·rpc, hw)) of them (possibly none). Grid: (32/gpc · K, n).
// Thread t holds the 16-byte vector (E = 16/sizeof(T) channels) at column t % VPR (VPR = cw/E) of
// rows t / VPR + j·TY, j < R (TY = ⌈rpc/R⌉; threads past VPR·TY only pad the block to whole warps):
// a fixed column per thread, spanning at most two groups (E ≤ cpg), `lo` and lo + 1. Each CTA:
//   1. loads its R vectors of x (and dy) straight into registers, all in flight at once: the only
//      global read (the backward's residual gradient is loaded during step 3);
//   2. sums per vector slot — forward d = x − shift_g, Σd and Σd², where shift_g = x[sample, row 0,
//      first channel of g] is the same value in every CTA, so the partial sums simply add up and the
//      variance does not cancel; backward Σd and Σd·x̂ — folds the slots into its two groups, and one
//      warp per group adds the threads' sums in a fixed order into the CTA's partial;
//   3. barrier.cluster (arrive.release / wait.acquire), then thread g < gpc reads group g's partial
//      from every CTA of the cluster over DSMEM and adds them in rank order (every CTA gets the same
//      bits): forward mean = shift + Σd/N, var = Σd²/N − (Σd/N)²; backward mean(d), mean(d·x̂);
//   4. writes y (or dx) from its registers (the only global write), then waits on a second cluster
//      barrier (a relaxed arrival right after its DSMEM reads: it need not wait for the statistics'
//      global store) so that no CTA exits while another may still read its partials.
// Everything the steps after the exchange read from global memory (the forward's shift for its
// statistics, the backward's residual gradient) is loaded before it, off the critical chain.
// One read, one write, one launch, a fixed order of additions. The launcher (src/ops/norm.rs,
// gn_cluster_plan) picks gpc, K, rpc, the threads and R, and takes the two-kernel path where
// cpg < E, a pointer is not 16-byte aligned, or no plan runs in one wave.
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
// An arrival that orders nothing: "my DSMEM reads are done" (their values were already used), without
// waiting for this thread's global stores to become visible as a release arrival would.
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
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


// The CTA's place and this thread's vector: cluster slice, rank and rows; the vector's column,
// first row, the group `lo` of its first element and how many of its elements are in `lo` (`split`;
// the rest are in lo + 1).
template <int E>
struct GnSlot {
  int K, rank, slice, b, cpg, cw, VPR, TY, col, ty, rows, lo, split;
  int64_t at;      // element offset of x[b, rank·rpc + ty, slice·cw + col·E]
  int64_t group0;  // element offset of x[b, 0, slice·cw]
  __device__ GnSlot(int hw, int c, int gpc, int rpc, int R) {
    K = (int)cluster_size();
    rank = (int)cluster_rank();
    slice = blockIdx.x / K;
    b = blockIdx.y;
    cpg = c / GROUPS;
    cw = gpc * cpg;
    VPR = cw / E;
    TY = (rpc + R - 1) / R;
    col = threadIdx.x % VPR;
    ty = threadIdx.x / VPR;  // ≥ TY: a thread padding the block to whole warps, holding nothing
    const int r0 = rank * rpc;
    rows = ty < TY ? max(min(r0 + rpc, hw) - r0, 0) : 0;
    lo = col * E / cpg;
    split = min(E, (lo + 1) * cpg - col * E);
    group0 = (int64_t)b * hw * c + slice * cw;
    at = group0 + (int64_t)(r0 + ty) * c + col * E;
  }
  __device__ __forceinline__ bool has(int j) const { return ty + j * TY < rows; }
};

// Folds per-slot sums (s, q) into the thread's two groups, adds every thread's sums per group in a
// fixed order (warp w takes groups w, w + W, ...: the threads whose column touches the group) and
// leaves them in part[g]. Every thread calls it; ends with a block barrier.
template <int E>
__device__ __forceinline__ void gn_cta_sums(const GnSlot<E>& t, const float (&s)[E], const float (&q)[E], int gpc, float2* part) {
  __shared__ float2 red[MAX_THREADS][2];
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < E; ++i) {
    if (i < t.split) lo.x += s[i], lo.y += q[i];
    else hi.x += s[i], hi.y += q[i];
  }
  red[threadIdx.x][0] = lo;
  red[threadIdx.x][1] = hi;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  for (int g = warp; g < gpc; g += W) {
    const int c0 = g * t.cpg / E, nc = ((g + 1) * t.cpg - 1) / E - c0 + 1;
    float2 acc = make_float2(0.f, 0.f);
    for (int j = lane; j < nc * t.TY; j += 32) {
      const int row = j / nc, col = c0 + j - row * nc;
      const float2 v = red[row * t.VPR + col][col * E / t.cpg == g ? 0 : 1];
      acc.x += v.x, acc.y += v.y;
    }
    acc.x = warp_sum(acc.x), acc.y = warp_sum(acc.y);
    if (lane == 0) part[g] = acc;
  }
  __syncthreads();
}

// Group g's sums over the cluster: every CTA's part[g] over DSMEM, added in rank order.
__device__ __forceinline__ float2 gn_cluster_sums(const float2* part, int K) {
  float2 p[MAX_CLUSTER];
  load_partials(part, K, p);
  float2 acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int q = 0; q < MAX_CLUSTER; ++q)
    if (q < K) acc.x += p[q].x, acc.y += p[q].y;
  return acc;
}

// Per-slot sums over the thread's vectors: for each held row j and element i, (a, b) = term(j, i),
// s[i] += a, q[i] += a·b (forward: d and d, backward: d and x̂).
template <int E, int R, typename Term>
__device__ __forceinline__ void gn_slot_sums(const GnSlot<E>& t, float (&s)[E], float (&q)[E], Term term) {
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if (!t.has(j)) continue;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float2 ab = term(j, i);
      s[i] += ab.x;
      q[i] = fmaf(ab.x, ab.y, q[i]);
    }
  }
}

// Loads the thread's held rows of `p` (16-byte vectors) into v.
template <typename T, int E, int R>
__device__ __forceinline__ void gn_slot_loads(const GnSlot<E>& t, const T* __restrict__ p, int c, Pack<T, E> (&v)[R]) {
#pragma unroll
  for (int j = 0; j < R; ++j)
    if (t.has(j)) v[j] = *reinterpret_cast<const Pack<T, E>*>(p + t.at + (int64_t)j * t.TY * c);
}

// Writes out[row j of the thread's vectors][i] = value(j, i) for each held row j.
template <typename T, int E, int R, typename Value>
__device__ __forceinline__ void gn_slot_writes(const GnSlot<E>& t, T* __restrict__ out, int c, Value value) {
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if (!t.has(j)) continue;
    float o[E];
#pragma unroll
    for (int i = 0; i < E; ++i) o[i] = value(j, i);
    store_pack<T, E>(out + t.at + (int64_t)j * t.TY * c, o);
  }
}

template <typename T, int R>
__device__ void gn_cluster_fwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,
                               float2* __restrict__ stats, int hw, int c, int gpc, int rpc, float eps, int silu) {
  constexpr int E = 16 / sizeof(T);
  __shared__ float2 part[GROUPS], merged[GROUPS];
  const GnSlot<E> t(hw, c, gpc, rpc, R);
  Pack<T, E> v[R];
  gn_slot_loads<T, E, R>(t, x, c, v);
  const float shift_lo = to_f32(x[t.group0 + t.lo * t.cpg]);
  const float shift_hi = t.split < E ? to_f32(x[t.group0 + (t.lo + 1) * t.cpg]) : shift_lo;
  // Thread g < gpc turns group g's sums into statistics after the exchange: its shift, loaded now.
  const float shift_g = (int)threadIdx.x < gpc ? to_f32(x[t.group0 + threadIdx.x * t.cpg]) : 0.f;
  const int ch = t.slice * t.cw + t.col * E;
  float g[E], be[E];
  load_pack<T, E>(gamma + ch, g);
  load_pack<T, E>(beta + ch, be);

  // 2. Shifted sums per slot, then the CTA's per group.
  float s[E] = {}, q[E] = {};
  gn_slot_sums<E, R>(t, s, q, [&](int j, int i) {
    const float d = to_f32(v[j].v[i]) - (i < t.split ? shift_lo : shift_hi);
    return make_float2(d, d);
  });
  gn_cta_sums(t, s, q, gpc, part);
#pragma unroll
  for (int j = 0; j < R; ++j) opaque(v[j]);

  // 3. The group's statistics from the cluster's sums.
  cluster_arrive();
  cluster_wait();
  if ((int)threadIdx.x < gpc) {
    const float2 sum = gn_cluster_sums(&part[threadIdx.x], t.K);
    const float inv_n = 1.f / ((float)hw * (float)t.cpg), md = sum.x * inv_n;
    const float var = fmaxf(fmaf(sum.y, inv_n, -md * md), 0.f);
    const float2 st = make_float2(shift_g + md, rsqrtf(var + eps));
    merged[threadIdx.x] = st;
    if (t.rank == 0) stats[t.b * GROUPS + t.slice * gpc + threadIdx.x] = st;
  }
  cluster_arrive_relaxed();  // this CTA's DSMEM reads are done
  __syncthreads();

  // 4. y from the registers.
  const float2 st_lo = merged[t.lo], st_hi = merged[min(t.lo + 1, gpc - 1)];
  float a[E], m[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float2 st = i < t.split ? st_lo : st_hi;
    a[i] = st.y * g[i];
    m[i] = st.x;
  }
  gn_slot_writes<T, E, R>(t, y, c, [&](int j, int i) {
    const float h = fmaf(to_f32(v[j].v[i]) - m[i], a[i], be[i]);
    return silu ? h * sigmoidf(h) : h;
  });
  cluster_wait();  // no CTA leaves while another may still read its partials
}

template <typename T, int R>
__device__ void gn_cluster_bwd(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                               const float2* __restrict__ stats, const T* __restrict__ dy, const T* __restrict__ res, T* __restrict__ dx,
                               int hw, int c, int gpc, int rpc, int silu) {
  constexpr int E = 16 / sizeof(T);
  __shared__ float2 part[GROUPS], merged[GROUPS];
  const GnSlot<E> t(hw, c, gpc, rpc, R);
  Pack<T, E> v[R], e[R], r[R];
  gn_slot_loads<T, E, R>(t, x, c, v);
  gn_slot_loads<T, E, R>(t, dy, c, e);
  const int ch = t.slice * t.cw + t.col * E, sg = t.b * GROUPS + t.slice * gpc;
  // γ, β stay packed, converted where used (with every value converted up front R = 4 spills).
  const Pack<T, E> gp = *reinterpret_cast<const Pack<T, E>*>(gamma + ch), bp = *reinterpret_cast<const Pack<T, E>*>(beta + ch);
  const float2 st_lo = stats[sg + t.lo], st_hi = stats[sg + min(t.lo + 1, gpc - 1)];

  // 2. (Σd, Σd·x̂) per slot, then the CTA's per group.
  float s[E] = {}, q[E] = {};
  gn_slot_sums<E, R>(t, s, q, [&](int j, int i) {
    float xhat;
    const float d = gn_grad_in(to_f32(v[j].v[i]), to_f32(e[j].v[i]), to_f32(gp.v[i]), to_f32(bp.v[i]), i < t.split ? st_lo : st_hi, silu, xhat);
    return make_float2(d, xhat);
  });
  gn_cta_sums(t, s, q, gpc, part);
#pragma unroll
  for (int j = 0; j < R; ++j) opaque(v[j]), opaque(e[j]);
  // The residual gradient's loads fly during the cluster exchange (held from the start, the three
  // tensors would not fit in the registers).
  if (res) gn_slot_loads<T, E, R>(t, res, c, r);

  // 3. (mean(d), mean(d·x̂)) from the cluster's sums.
  cluster_arrive();
  cluster_wait();
  if ((int)threadIdx.x < gpc) {
    const float2 sum = gn_cluster_sums(&part[threadIdx.x], t.K);
    const float inv_n = 1.f / ((float)hw * (float)t.cpg);
    merged[threadIdx.x] = make_float2(sum.x * inv_n, sum.y * inv_n);
  }
  cluster_arrive_relaxed();  // this CTA's DSMEM reads are done
  __syncthreads();

  // 4. dx from the registers (+ the residual gradient).
  const float2 m_lo = merged[t.lo], m_hi = merged[min(t.lo + 1, gpc - 1)];
  gn_slot_writes<T, E, R>(t, dx, c, [&](int j, int i) {
    const bool in_lo = i < t.split;
    const float2 st = in_lo ? st_lo : st_hi, m = in_lo ? m_lo : m_hi;
    float xhat;
    const float d = gn_grad_in(to_f32(v[j].v[i]), to_f32(e[j].v[i]), to_f32(gp.v[i]), to_f32(bp.v[i]), st, silu, xhat);
    const float g = st.y * (d - m.x - xhat * m.y);
    return res ? g + to_f32(r[j].v[i]) : g;
  });
  cluster_wait();  // no CTA leaves while another may still read its partials
}

// The benchmark floor of the forward (src/bench/norm.rs, not used in training): y = x through the
// forward's plan, grid and registers — its loads, one cluster barrier once they have landed, its
// stores — with no arithmetic and no DSMEM exchange. What a one-pass cluster GroupNorm costs
// before any of its math.
template <typename T, int R>
__device__ void gn_cluster_floor(const T* __restrict__ x, T* __restrict__ y, int hw, int c, int gpc, int rpc) {
  constexpr int E = 16 / sizeof(T);
  const GnSlot<E> t(hw, c, gpc, rpc, R);
  Pack<T, E> v[R];
  gn_slot_loads<T, E, R>(t, x, c, v);
#pragma unroll
  for (int j = 0; j < R; ++j) opaque(v[j]);
  cluster_arrive();
  cluster_wait();
#pragma unroll
  for (int j = 0; j < R; ++j)
    if (t.has(j)) *reinterpret_cast<Pack<T, E>*>(y + t.at + (int64_t)j * t.TY * c) = v[j];
}

// Entry points: group_norm_cluster_{fwd,bwd}_<type>_r<R> (R vectors per thread; the backward holds
// three tensors, so up to 4).
#define GN_CLUSTER_FWD(TN, T, R)                                                                                         \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS, 1) group_norm_cluster_fwd_##TN##_r##R(                          \
      const T* x, const T* gamma, const T* beta, T* y, float2* stats, int hw, int c, int gpc, int rpc, float eps, int silu) { \
    await_previous_kernel();                                                                                             \
    gn_cluster_fwd<T, R>(x, gamma, beta, y, stats, hw, c, gpc, rpc, eps, silu);                                          \
  }
#define GN_CLUSTER_BWD(TN, T, R)                                                                                         \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS, 1) group_norm_cluster_bwd_##TN##_r##R(                          \
      const T* x, const T* gamma, const T* beta, const float2* stats, const T* dy, const T* res, T* dx, int hw, int c,   \
      int gpc, int rpc, int silu) {                                                                                      \
    await_previous_kernel();                                                                                             \
    gn_cluster_bwd<T, R>(x, gamma, beta, stats, dy, res, dx, hw, c, gpc, rpc, silu);                                     \
  }
#define GN_CLUSTER_FLOOR(R)                                                                                               \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS, 1) group_norm_cluster_floor_bf16_r##R(const bf16* x, bf16* y, int hw, \
                                                                                             int c, int gpc, int rpc) {     \
    await_previous_kernel();                                                                                             \
    gn_cluster_floor<bf16, R>(x, y, hw, c, gpc, rpc);                                                                     \
  }
#define GN_CLUSTER_KERNELS(TN, T) \
  GN_CLUSTER_FWD(TN, T, 1)        \
  GN_CLUSTER_FWD(TN, T, 2)        \
  GN_CLUSTER_FWD(TN, T, 4)        \
  GN_CLUSTER_FWD(TN, T, 8)        \
  GN_CLUSTER_BWD(TN, T, 1)        \
  GN_CLUSTER_BWD(TN, T, 2)        \
  GN_CLUSTER_BWD(TN, T, 4)

GN_CLUSTER_KERNELS(f32, float)
GN_CLUSTER_KERNELS(bf16, bf16)
GN_CLUSTER_FLOOR(1)
GN_CLUSTER_FLOOR(2)
GN_CLUSTER_FLOOR(4)
GN_CLUSTER_FLOOR(8)
