// Hopper (sm_90a) bf16 GEMM on wgmma: the same contract as kernels/gemm.cu's gemm_*_kk_* / gemm_*_kn_*
// kernels, for the H100. CPU twins: src/ops/gemm.rs `linear_cpu` (layout kk) and
// `linear_input_grad_cpu` (layout kn), and src/ops/lora.rs for the two-segment (LoRA concat-K) form.
// Launcher and dispatch: src/ops/gemm_sm90.rs (called from `gemm` in src/ops/gemm.rs on Hopper only).
//
//   C[m, n] = alpha · Σ_k A(m, k) · B(n, k)  (+ bias[n])  (+ R[m, n])          0 ≤ m < M, 0 ≤ n < N
//
// K runs over two segments read from two pointer pairs (K = K1 + K2; K2 = 0 turns the second off):
// the fused LoRA forward [x | s·u]·[W | B]ᵀ and its input gradient [dy | s·v]·[W ; A] need no copy.
// Layouts (row-major storage, `ld` = elements between rows):
//   A "k": A(m, k) = A[m·lda + k]                     (activations [M, K])
//   B "k": B(n, k) = B[n·ldb + k]  (layout kk)        (a PyTorch weight [out, in]: y = x·Wᵀ)
//   B "n": B(n, k) = B[k·ldb + n]  (layout kn)        (W itself: dx = dy·W)
// Epilogue: C = alpha·acc + bias[n] (bf16, optional) + R[m·ldr + n] (type of C, optional; R may be C
// itself: each element is read and then written by the same thread). C is bf16 or f32.
// Requirements (checked by the launcher, which otherwise keeps the sm_80 kernels): A and B 16-byte
// aligned with leading dimensions and K1, K2 multiples of 8 elements (and N a multiple of 8 for
// layout kn). Any M and N otherwise; C, R and bias of any alignment (unaligned ones take a scalar
// epilogue).
//
// Design. Two kernel families (src/ops/gemm_sm90.rs picks one per call with a fitted time model):
//  * gemm_sm90_<BM>x<BN>_*: cp.async pipeline, every thread loads (below). One block computes a
//    BM × BN tile of C with WG_M × WG_N warpgroups (128 threads each); each warpgroup owns a 64 × WN
//    sub-tile and issues wgmma.mma_async.m64nWNk16 (bf16 in, f32 accumulators in registers: WN/2
//    per thread). Tiles (GEMM_SM90_TILES): 128×128 (2 warpgroups, 2 blocks per SM), 64×64 (1
//    warpgroup, 3 per SM).
//  * gemm_sm90_tma_128x<128|160>_* (kernels/gemm_tma_sm90.cu): TMA loads, a producer warp and two
//    consumer warpgroups synchronized by mbarriers (see gemm_sm90_tma_body); 2 blocks per SM, or
//    persistent (one per SM); C stored by TMA from a shared-memory tile.
// The cp.async body also runs split along K (…_split: the last slice sums the slices in kernel)
// and grouped (…_group: up to eight small GEMMs of one layout per launch, from a problem table;
// at the end of this file).
// Shared pieces (layouts, wgmma, tile loads, the staged epilogue): kernels/gemm_sm90.cuh.
// Both operands are read by wgmma straight from shared memory through matrix descriptors, in the
// 128-byte swizzle (the TMA kernels' n-major B tiles 160 wide: the 64-byte swizzle, see TmaBTile):
//   A tile [BM][64] and (kk) B tile [BN][64]: K-major, one 128-byte row per m (n), 16-byte chunk c
//     of row r stored at chunk c ^ (r mod 8); 8-row groups 1024 B apart (descriptor SBO = 1024; LBO
//     unused); the four k16 steps of a 64-deep stage start 32 bytes apart.
//   (kn) B tile: MN-major, BN/64 column blocks of [64 k][64 n] (8 KiB each), 128 bytes of n per k
//     row, chunk c of row k at c ^ (k mod 8); descriptor LBO = 8192 (next 64 n), SBO = 1024 (next 8
//     k); the k16 steps start 2048 bytes apart; the instruction's transpose-B flag set.
// Every tile base is 1024-byte aligned (the swizzle is a function of the address bits 4-9).
// Pipeline (cp.async kernels): STAGES stages of (A, B) tiles filled by cp.async.cg (16 B, zero-fill past M, N, K), all
// threads loading; cp.async groups and one __syncthreads per K tile order the stages. Per K
// tile kt: wait for tile kt's copies; barrier; issue the copies of tile kt + AHEAD into the stage
// freed by tile kt − 1 − INFLIGHT; fence.proxy.async (the cp.async writes are generic-proxy writes,
// wgmma reads through the async proxy); wgmma.fence; four wgmmas; commit; wgmma.wait_group INFLIGHT
// (INFLIGHT = 1: tile kt's wgmmas run on while the next barrier and copies issue). AHEAD = STAGES −
// 1 − INFLIGHT tiles are in flight. No warp specialization, no mbarriers: with two or three blocks
// per SM (128×128: 3 stages, 96 KiB) one block's epilogue overlaps another's main loop, which is
// what the short K loops of SD1.5 (K = 320: five 64-deep tiles) need most.
// Epilogue: the accumulators go through shared memory (an f32 [BM][BN] tile, 8-column groups XOR-
// swizzled by row, conflict-free) so that C, R and bias move as coalesced 16-byte row segments.
#include "gemm_sm90.cuh"

namespace {

// Split-K (gridDim.z = S slices of the K tiles, blockIdx.z = this block's): the workspace holds
// one f32 [BM][BN] partial tile per (output tile, slice), at ws + ((tile·S + slice)·BM·BN), and
// `counters` one arrival count per output tile (zero between launches).
struct SplitArgs {
  int tiles_per_slice;  // K tiles per slice (the last slice may get fewer, never none)
  float* ws;
  unsigned* counters;
};

// Which output tile and K slice a block computes: from the grid for one GEMM per launch
// (grid_coords), from the problem table for a group of weight gradients (gemm_sm90_64x64_mn_f32_group).
struct BlockCoords {
  int m0, n0;         // the tile's first row and column of C
  unsigned tile;      // its index among the GEMM's output tiles (workspace and counter slot)
  int slice, slices;  // this block's K slice, of `slices`
};

template <int BM, int BN>
__device__ __forceinline__ BlockCoords grid_coords() {
  return BlockCoords{(int)blockIdx.y * BM, (int)blockIdx.x * BN, blockIdx.y * gridDim.x + blockIdx.x, (int)blockIdx.z, (int)gridDim.z};
}

// The split-K epilogue, deterministic and without a second launch: every slice stores its partial
// tile (no alpha) to the workspace and, after a block barrier, thread 0 counts the block in with
// atom.acq_rel.gpu (release: the block's stores, ordered before it by the barrier, are visible to
// whoever acquires the count; acquire: the last slice sees every other slice's stores). The last
// slice to arrive resets the counter, sums the S partials in slice order 0, 1, …, S−1 (the same
// float operations whichever slice is last) and runs the ordinary epilogue on the sum. Its loads
// are batched (PER float4 per thread, four slices at a time) so that the sum costs about S/4 L2
// round trips.
template <int BM, int BN, int WN, int THREADS, typename OutT>
__device__ __forceinline__ void store_tile_split(float* cs, const float (&acc)[WN / 2], int wm, int wn, const SplitArgs& split, OutT* c,
                                                 int64_t ldc, const bf16* bias, const OutT* r, int64_t ldr, int m0, int n0, int M, int N,
                                                 float alpha, const BlockCoords& at) {
  __shared__ unsigned is_last;
  constexpr int V = BM * BN / 4, PER = V / THREADS, GROUP = 4;  // float4s of a tile, per thread, slices per batch
  static_assert(V % THREADS == 0, "whole float4s per thread");
  const int tid = threadIdx.x, slices = at.slices;
  const unsigned tile = at.tile;
  auto cs_at = [&](int j) {  // the float4 j of this thread in the staged tile
    const int i = tid + j * THREADS, row = i / (BN / 4), col = (i % (BN / 4)) * 4;
    return reinterpret_cast<float4*>(cs + c_at<BN>(row, col));
  };
  stage_acc<BN, WN>(cs, acc, wm, wn, tid);
  __syncthreads();
  float4* parts = reinterpret_cast<float4*>(split.ws) + (int64_t)tile * slices * V;
#pragma unroll
  for (int j = 0; j < PER; ++j) __stcg(parts + (int64_t)at.slice * V + tid + j * THREADS, *cs_at(j));
  __syncthreads();
  if (tid == 0) {
    unsigned before;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(before) : "l"(split.counters + tile) : "memory");
    is_last = before == (unsigned)slices - 1;
    if (is_last) split.counters[tile] = 0;  // every slice has arrived: ready for the next launch
  }
  __syncthreads();
  if (!is_last) return;
  float4 sum[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) sum[j] = __ldcg(parts + tid + j * THREADS);
  for (int z0 = 1; z0 < slices; z0 += GROUP) {
    float4 v[GROUP][PER];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int j = 0; j < PER; ++j) v[g][j] = z0 + g < slices ? __ldcg(parts + (int64_t)(z0 + g) * V + tid + j * THREADS) : make_float4(0, 0, 0, 0);
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int j = 0; j < PER; ++j)
        if (z0 + g < slices) sum[j].x += v[g][j].x, sum[j].y += v[g][j].y, sum[j].z += v[g][j].z, sum[j].w += v[g][j].w;
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) *cs_at(j) = sum[j];
  __syncthreads();
  store_staged<BM, BN, THREADS>(cs, tid, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
}

// The kernel body (see the header): WG_M × WG_N warpgroups, each computing 64 × WN of the
// (64·WG_M) × (WN·WG_N) block tile. A_K_MAJOR: A(m, k) = A[m·lda + k], else (layout mn)
// A[k·lda + m]; B_K_MAJOR: layout kk, else B(n, k) = B[k·ldb + n]. SPLIT: the block runs K tiles
// [z·tiles_per_slice, (z+1)·tiles_per_slice) of its slice z (`at`) and, when there are several,
// ends with store_tile_split.
template <int WG_M, int WG_N, int WN, int STAGES, int INFLIGHT, bool A_K_MAJOR, bool B_K_MAJOR, bool SPLIT, typename OutT>
__device__ __forceinline__ void gemm_sm90_body(const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2,
                                               int64_t lda2, const bf16* b2, int64_t ldb2, int k2, OutT* c, int64_t ldc,
                                               const bf16* bias, const OutT* r, int64_t ldr, int M, int N, float alpha, SplitArgs split,
                                               const BlockCoords& at) {
  constexpr int BM = 64 * WG_M, BN = WN * WG_N, THREADS = 128 * WG_M * WG_N;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int AHEAD = STAGES - 1 - INFLIGHT;
  static_assert(AHEAD >= 1 && (INFLIGHT == 0 || INFLIGHT == 1), "pipeline depth");
  static_assert(B_K_MAJOR || WN % 64 == 0, "an n-major B tile is made of 64-wide column blocks");
  extern __shared__ uint8_t smem_raw[];
  // The launcher adds 1 KiB so the stages can start at a 1024-byte boundary (the swizzle atom).
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  float* cs = reinterpret_cast<float*>(smem_raw + (base - raw));

  const int m0 = at.m0, n0 = at.n0;
  const int wg = threadIdx.x / 128, wm = wg % WG_M, wn = wg / WG_M;
  const int tiles1 = (k1 + BK - 1) / BK, ntiles = tiles1 + (k2 + BK - 1) / BK;
  // This block's K tiles [t0, t0 + count).
  const int t0 = SPLIT ? at.slice * split.tiles_per_slice : 0;
  const int count = SPLIT ? min(ntiles - t0, split.tiles_per_slice) : ntiles;
  auto load_stage = [&](int stage, int t) {
    const bool second = t >= tiles1;
    const int k0 = (second ? t - tiles1 : t) * BK, kseg = second ? k2 : k1;
    const uint32_t sa = base + stage * STAGE_BYTES;
    if constexpr (A_K_MAJOR) load_k_major<BM, THREADS>(sa, second ? a2 : a1, second ? lda2 : lda1, m0, M, k0, kseg);
    else load_n_major<BM, THREADS>(sa, second ? a2 : a1, second ? lda2 : lda1, m0, M, k0, kseg);
    if constexpr (B_K_MAJOR) load_k_major<BN, THREADS>(sa + A_BYTES, second ? b2 : b1, second ? ldb2 : ldb1, n0, N, k0, kseg);
    else load_n_major<BN, THREADS>(sa + A_BYTES, second ? b2 : b1, second ? ldb2 : ldb1, n0, N, k0, kseg);
  };
  // This warpgroup's A rows and B columns within a stage: K-major tiles hold one 128-byte row per
  // m (n); the MN-major tiles hold 8 KiB per 64 rows (columns).
  const uint32_t a_off = A_K_MAJOR ? wm * 64 * 128 : wm * BK * 128, b_off = B_K_MAJOR ? wn * WN * 128 : wn * (WN / 64) * BK * 128;

  float acc[WN / 2];
#pragma unroll
  for (int i = 0; i < WN / 2; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < AHEAD; ++s) {
    if (s < count) load_stage(s, t0 + s);
    cp_async_commit();
  }
#pragma unroll 1
  for (int kt = 0; kt < count; ++kt) {
    // Tile kt has landed for every thread; every warpgroup is past the wait that retired the
    // wgmmas of tile kt - 1 - INFLIGHT, whose stage the copies below refill.
    cp_async_wait<AHEAD - 1>();
    __syncthreads();
    const int next = kt + AHEAD;
    if (next < count) load_stage(next % STAGES, t0 + next);
    cp_async_commit();
    fence_proxy_async();
    const uint32_t sa = base + (kt % STAGES) * STAGE_BYTES + a_off, sb = base + (kt % STAGES) * STAGE_BYTES + A_BYTES + b_off;
    wgmma_k_tile<WN, B_K_MAJOR, A_K_MAJOR>(acc, sa, sb);
    wgmma_wait<INFLIGHT>();
    fence_acc(acc);
  }
  wgmma_wait<0>();
  fence_acc(acc);
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the stages: the C tile reuses them

  if constexpr (SPLIT) {
    if (at.slices > 1) {
      store_tile_split<BM, BN, WN, THREADS>(cs, acc, wm, wn, split, c, ldc, bias, r, ldr, m0, n0, M, N, alpha, at);
      return;
    }
  }
  store_tile<BM, BN, WN, THREADS>(cs, acc, wm, wn, threadIdx.x, [] { __syncthreads(); }, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
}

}  // namespace


// gemm_sm90_<BM>x<BN>_<A><B>_<out>: tile, layouts (kk: y = x·Wᵀ; kn: dx = dy·W), output type.
// src/ops/gemm_sm90.rs `tile_config` must agree on threads, stages and blocks per SM.
#define GEMM_SM90_KERNEL(BM, BN, WGM, WGN, WN, ST, INF, MINB, LB, BKM, OUT, OUTT)                                          \
  extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) gemm_sm90_##BM##x##BN##_k##LB##_##OUT(              \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,     \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha) { await_previous_kernel(); \
    gemm_sm90_body<WGM, WGN, WN, ST, INF, true, BKM, false, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r, \
                                                                  ldr, M, N, alpha, SplitArgs{}, grid_coords<BM, BN>()); \
  }

// gemm_sm90_<BM>x<BN>_<A><B>_<out>_split: the same with split-K (grid z = slices; see
// store_tile_split) and layout mn (A(m, k) = A[k·lda + m]: the weight gradients aᵀ·b). Three more
// arguments: K tiles per slice, the f32 workspace, the per-output-tile counters.
// src/ops/gemm_sm90_split.rs `SPLIT_TILES` must agree on threads, stages and blocks per SM.
#define GEMM_SM90_SPLIT_KERNEL(BM, BN, WGM, WGN, WN, ST, INF, MINB, LA, AKM, LB, BKM, OUT, OUTT)                              \
  extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) gemm_sm90_##BM##x##BN##_##LA##LB##_##OUT##_split(      \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,       \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha,    \
      int tiles_per_slice, float* ws, unsigned* counters) { await_previous_kernel();                                         \
    gemm_sm90_body<WGM, WGN, WN, ST, INF, AKM, BKM, true, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r,  \
                                                                ldr, M, N, alpha, SplitArgs{tiles_per_slice, ws, counters},  \
                                                                grid_coords<BM, BN>());                                      \
  }

// (BM × BN: warpgroups M × N of 64 × WN, stages, wgmma groups in flight, blocks per SM)
// 128×128: 2 warpgroups of 64×128, 3 stages of 32 KiB (two blocks per SM: one's epilogue overlaps
// the other's main loop); 64×64: 1 warpgroup, 4 stages of 16 KiB (three per SM, for GEMMs with few
// output tiles). (256×128, 128×256 and 128×64 were dropped in round 2: never the fastest.)
#define GEMM_SM90_TILES(LB, BKM, OUT, OUTT)                                \
  GEMM_SM90_KERNEL(128, 128, 2, 1, 128, 3, 0, 2, LB, BKM, OUT, OUTT)     \
  GEMM_SM90_KERNEL(64, 64, 1, 1, 64, 4, 1, 3, LB, BKM, OUT, OUTT)
// Split kernels: 64×64 only (the 128×128 tile lost at every split shape, benches/RESULTS.md "Weight
// gradients and split-K on wgmma"), 6 stages of 16 KiB (four K tiles in flight: the short K loops
// of a slice are latency-bound), two blocks per SM.
#define GEMM_SM90_SPLIT_TILES(LA, AKM, LB, BKM, OUT, OUTT) GEMM_SM90_SPLIT_KERNEL(64, 64, 1, 1, 64, 6, 1, 2, LA, AKM, LB, BKM, OUT, OUTT)

GEMM_SM90_TILES(k, true, bf16, bf16)
GEMM_SM90_TILES(k, true, f32, float)
GEMM_SM90_TILES(n, false, bf16, bf16)
GEMM_SM90_TILES(n, false, f32, float)
GEMM_SM90_SPLIT_TILES(k, true, k, true, bf16, bf16)
GEMM_SM90_SPLIT_TILES(k, true, k, true, f32, float)
GEMM_SM90_SPLIT_TILES(k, true, n, false, bf16, bf16)
GEMM_SM90_SPLIT_TILES(k, true, n, false, f32, float)
GEMM_SM90_SPLIT_TILES(m, false, n, false, f32, float)

// gemm_sm90_64x64_<layouts>_<out>_group: up to GROUP_MAX independent GEMMs of the split kernels'
// contract in one launch (src/ops/gemm_sm90_split.rs `gemm_group`). Problem i:
//   C_i[M_i × N_i] = alpha_i · Σ_k A_i(m, k)·B_i(n, k) (+ bias_i[n]) (+ R_i[m·ldr_i + n]: R = C to
//   accumulate, or ldr = 0 to add one row to every row)
// over one or two K segments as the other kernels (k2 = 0: one), in one layout for all (mn: the
// LoRA weight gradients aᵀ·b over the tokens, K = tokens; kk: the LoRA down-projections
// u = s·x·Aᵀ, the fused LoRA forwards [x | u]·[W | B]ᵀ, the time embedding's projections; kn:
// v = s·dy·B), each
// split into slices_i K slices whose partials the last slice sums as store_tile_split does
// (workspace at ws_tile_i tiles into `ws`, counters from counter_i). Blocks [first_block_i,
// first_block_{i+1}) are problem i's, slice-major: the blocks of one K range run together and
// share its rows in L2. One launch for the small GEMMs of several layers fills the GPU that each
// one's few output tiles leave mostly idle, and pays one launch's latency instead of several.
struct GroupProblem {
  const bf16* a;
  const bf16* b;
  const bf16* a2;
  const bf16* b2;
  void* c;  // OutT
  const bf16* bias;
  const void* r;  // OutT, optional
  int64_t lda, ldb, lda2, ldb2, ldr;
  int k, k2, m, n, slices, tiles_per_slice, first_block, ws_tile, counter;
  float alpha;
};
constexpr int GROUP_MAX = 8;  // src/ops/gemm_sm90_split.rs GROUP_MAX
struct GemmGroup {
  GroupProblem problem[GROUP_MAX];
  float* ws;
  unsigned* counters;
  int count;
};
static_assert(sizeof(GroupProblem) == 136 && sizeof(GemmGroup) == 8 * 136 + 24, "the layout src/ops/gemm_sm90_split.rs writes");

template <bool A_K_MAJOR, bool B_K_MAJOR, typename OutT>
__device__ __forceinline__ void gemm_group_body(const GemmGroup& g) {
  int i = 0;
  while (i + 1 < g.count && (int)blockIdx.x >= g.problem[i + 1].first_block) ++i;
  const GroupProblem& pr = g.problem[i];
  const int local = blockIdx.x - pr.first_block, tiles_n = (pr.n + 63) / 64, tiles = (pr.m + 63) / 64 * tiles_n;
  const int tile = local % tiles;
  const BlockCoords at{tile / tiles_n * 64, tile % tiles_n * 64, (unsigned)tile, local / tiles, pr.slices};
  const SplitArgs split{pr.tiles_per_slice, g.ws + (int64_t)pr.ws_tile * 64 * 64, g.counters + pr.counter};
  OutT* c = static_cast<OutT*>(pr.c);
  gemm_sm90_body<1, 1, 64, 6, 1, A_K_MAJOR, B_K_MAJOR, true, OutT>(pr.a, pr.lda, pr.b, pr.ldb, pr.k, pr.a2, pr.lda2, pr.b2, pr.ldb2, pr.k2, c, pr.n, pr.bias,
                                                                   static_cast<const OutT*>(pr.r), pr.ldr, pr.m, pr.n, pr.alpha, split, at);
}

#define GEMM_SM90_GROUP_KERNEL(LA, AKM, LB, BKM, OUT, OUTT)                                                                       \
  extern "C" __global__ void __launch_bounds__(128, 2) gemm_sm90_64x64_##LA##LB##_##OUT##_group(const __grid_constant__ GemmGroup g) { await_previous_kernel(); \
    gemm_group_body<AKM, BKM, OUTT>(g);                                                                                           \
  }
GEMM_SM90_GROUP_KERNEL(m, false, n, false, f32, float)
GEMM_SM90_GROUP_KERNEL(k, true, k, true, bf16, bf16)
GEMM_SM90_GROUP_KERNEL(k, true, n, false, bf16, bf16)
