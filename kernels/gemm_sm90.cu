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
//  * gemm_sm90_tma_128x<128|160>_*: TMA loads, a producer warp and two consumer warpgroups
//    synchronized by mbarriers (see gemm_sm90_tma_body; it also takes four warpgroups for 256 ×
//    128); 2 blocks per SM, or persistent (one per SM); C stored by TMA from a shared-memory tile.
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
#include "common.cuh"
#include "mma.cuh"
#include "epilogue.cuh"

namespace {

constexpr int BK = 64;  // K depth of a stage: one 128-byte swizzled row

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// A wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride
// byte offsets (all in 16-byte units), swizzle mode 1 in bits 62-63.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of the accumulators across a wgmma wait.
template <int R>
__device__ __forceinline__ void fence_acc(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64×128] += A[64×16]·B[16×128] (one warpgroup; 64 accumulators per thread). TRANS_A / TRANS_B:
// the operand's shared tile is MN-major (else K-major).
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, %64, %65, 1, 1, 1, %66, %67;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B));
}

// D[64×64] += A[64×16]·B[16×64] (one warpgroup; 32 accumulators per thread).
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
      "}, %32, %33, 1, 1, 1, %34, %35;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B));
}

template <int WN, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_tile(float (&d)[WN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(WN == 128 || WN == 64, "warpgroup tile width");
  if constexpr (WN == 128) wgmma_m64n128<TRANS_A, TRANS_B>(d, desc_a, desc_b);
  else wgmma_m64n64<TRANS_A, TRANS_B>(d, desc_a, desc_b);
}

// One 64-deep k tile of a warpgroup's 64 × WN accumulators: the four k16 wgmmas on the A tile at
// shared address sa (K-major, or for layout mn MN-major: one [64 k][64 m] column block) and the B
// tile at sb (K-major for kk, MN-major for kn and mn), fenced and committed as one group.
template <int WN, bool B_K_MAJOR, bool A_K_MAJOR = true>
__device__ __forceinline__ void wgmma_k_tile(float (&acc)[WN / 2], uint32_t sa, uint32_t sb) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    const uint64_t da = A_K_MAJOR ? smem_desc(sa + ks * 32, 16, 1024) : smem_desc(sa + ks * 16 * 128, BK * 128, 1024);
    const uint64_t db = B_K_MAJOR ? smem_desc(sb + ks * 32, 16, 1024) : smem_desc(sb + ks * 16 * 128, BK * 128, 1024);
    wgmma_tile<WN, A_K_MAJOR ? 0 : 1, B_K_MAJOR ? 0 : 1>(acc, da, db);
  }
  wgmma_commit();
}

// One K-major tile [ROWS][64] (rows rows0.., k = k0..k0+63 of a segment of depth kseg) into the
// swizzled tile at shared address `tile`. Rows ≥ extent and k ≥ kseg are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_k_major(uint32_t tile, const bf16* p, int64_t ld, int rows0, int extent, int k0, int kseg) {
  constexpr int ROW_STEP = THREADS / 8, ITERS = ROWS / ROW_STEP;  // 8 chunks of 16 B per row
  static_assert(ROWS % ROW_STEP == 0 && ROW_STEP % 8 == 0, "a thread's rows must share their swizzle");
  const int chunk = threadIdx.x % 8, row = threadIdx.x / 8;
  const int k = k0 + chunk * 8;
  const bool k_ok = k < kseg;
  const uint32_t dst = tile + row * 128 + ((chunk ^ (row & 7)) << 4);
  const bf16* src = p + (int64_t)(rows0 + row) * ld + k;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const bool valid = k_ok && rows0 + row + i * ROW_STEP < extent;
    cp_async16(dst + i * ROW_STEP * 128, valid ? src + i * ROW_STEP * ld : p, valid);
  }
}

// One N-major B tile (B(n, k) = B[k·ld + n], n = n0..n0+COLS-1, k = k0..k0+63) into COLS/64 column
// blocks of [64 k][64 n], swizzled. n ≥ extent and k ≥ kseg are zero-filled.
template <int COLS, int THREADS>
__device__ __forceinline__ void load_n_major(uint32_t tile, const bf16* p, int64_t ld, int n0, int extent, int k0, int kseg) {
  constexpr int ROW_CHUNKS = COLS / 8, K_STEP = THREADS / ROW_CHUNKS, ITERS = BK / K_STEP;
  static_assert(THREADS % ROW_CHUNKS == 0 && K_STEP % 8 == 0 && BK % K_STEP == 0, "a thread's k rows must share their swizzle");
  const int c = threadIdx.x % ROW_CHUNKS, kr = threadIdx.x / ROW_CHUNKS;
  const int n = n0 + c * 8;
  const bool n_ok = n < extent;
  const uint32_t dst = tile + (c / 8) * (BK * 128) + kr * 128 + (((c % 8) ^ (kr & 7)) << 4);
  const bf16* src = p + (int64_t)(k0 + kr) * ld + n;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const bool valid = n_ok && k0 + kr + i * K_STEP < kseg;
    cp_async16(dst + i * K_STEP * 128, valid ? src + i * K_STEP * ld : p, valid);
  }
}

// The epilogue's slow path (out of line): element by element up to N (right edge, unaligned rows).
template <typename OutT>
__device__ __noinline__ void store8_checked(OutT* crow, const OutT* rrow, const bf16* bias, int n, int N, const float* v) {
  for (int e = 0; e < 8 && n + e < N; ++e) {
    float out = v[e];
    if (bias) out += __bfloat162float(bias[n + e]);
    if (rrow) out += to_f32(rrow[n + e]);
    crow[n + e] = from_f32<OutT>(out);
  }
}

// The f32 C tile of the epilogue: [BM][BN], 8-column groups XOR-swizzled by row (conflict-free).
// (A tile 32 columns past a multiple of 64, e.g. BN = 160, swizzles its last 32 by row mod 4.)
template <int BN>
__device__ __forceinline__ int c_at(int row, int col) {
  static_assert(BN % 64 == 0 || BN % 64 == 32, "the C tile's swizzle works on 64- or 32-column blocks");
  const int mask = (BN % 64 == 0 || col < BN / 64 * 64) ? 7 : 3;
  return row * BN + (col ^ ((row & mask) << 3));
}

// Each warpgroup (wm, wn) puts its 64 × WN accumulators into the f32 tile `cs`.
template <int BN, int WN>
__device__ __forceinline__ void stage_acc(float* cs, const float (&acc)[WN / 2], int wm, int wn, int tid) {
  // Accumulator (row, col) of thread t of the warpgroup, register 4j + 2h + e (tile coordinates):
  // row = 64·wm + 16·(t/32) + (t%32)/4 + 8h, col = WN·wn + 8j + 2·(t%4) + e.
  const int t = tid % 128;
  const int row = wm * 64 + (t / 32) * 16 + (t % 32) / 4, col = wn * WN + 2 * (t % 4);
#pragma unroll
  for (int j = 0; j < WN / 8; ++j) {
    *reinterpret_cast<float2*>(cs + c_at<BN>(row, col + 8 * j)) = make_float2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<float2*>(cs + c_at<BN>(row + 8, col + 8 * j)) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// C = alpha·cs + bias + R for the BM × BN tile at (m0, n0), read from the staged f32 tile `cs`, in
// coalesced 16-byte row pieces (scalar stores at the right edge and for unaligned C, R or bias).
template <int BM, int BN, int THREADS, typename OutT>
__device__ __forceinline__ void store_staged(const float* cs, int tid, OutT* c, int64_t ldc, const bf16* bias, const OutT* r, int64_t ldr, int m0,
                                             int n0, int M, int N, float alpha) {
  auto aligned16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool fast = aligned16(c) && ldc % 8 == 0 && (!r || (aligned16(r) && ldr % 8 == 0)) && (!bias || aligned16(bias));
  constexpr int GROUPS = BN / 8;
  for (int idx = tid; idx < BM * GROUPS; idx += THREADS) {
    const int row = idx / GROUPS, col = (idx % GROUPS) * 8;
    const int m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    const float4 lo = *reinterpret_cast<const float4*>(cs + c_at<BN>(row, col));
    const float4 hi = *reinterpret_cast<const float4*>(cs + c_at<BN>(row, col) + 4);
    float v[8] = {alpha * lo.x, alpha * lo.y, alpha * lo.z, alpha * lo.w, alpha * hi.x, alpha * hi.y, alpha * hi.z, alpha * hi.w};
    OutT* crow = c + (int64_t)m * ldc;
    const OutT* rrow = r ? r + (int64_t)m * ldr : nullptr;
    if (fast && n + 8 <= N) store8_values(crow, rrow, bias, n, v);
    else store8_checked(crow, rrow, bias, n, N, v);
  }
}

// The epilogue of a BM × BN block tile: the accumulators into `cs`, `sync()` (a barrier over the
// THREADS storing threads, tid = 0..THREADS-1), then C = alpha·acc + bias + R (store_staged).
// The caller has made sure nobody reads `cs`'s memory any more (it reuses the pipeline stages).
template <int BM, int BN, int WN, int THREADS, typename OutT, typename Sync>
__device__ __forceinline__ void store_tile(float* cs, const float (&acc)[WN / 2], int wm, int wn, int tid, Sync sync, OutT* c, int64_t ldc,
                                           const bf16* bias, const OutT* r, int64_t ldr, int m0, int n0, int M, int N, float alpha) {
  stage_acc<BN, WN>(cs, acc, wm, wn, tid);
  sync();
  store_staged<BM, BN, THREADS>(cs, tid, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
}

// Split-K (gridDim.z = S slices of the K tiles, blockIdx.z = this block's): the workspace holds
// one f32 [BM][BN] partial tile per (output tile, slice), at ws + ((tile·S + slice)·BM·BN), and
// `counters` one arrival count per output tile (zero between launches).
struct SplitArgs {
  int tiles_per_slice;  // K tiles per slice (the last slice may get fewer, never none)
  float* ws;
  unsigned* counters;
};

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
                                                 float alpha) {
  __shared__ unsigned is_last;
  constexpr int V = BM * BN / 4, PER = V / THREADS, GROUP = 4;  // float4s of a tile, per thread, slices per batch
  static_assert(V % THREADS == 0, "whole float4s per thread");
  const int tid = threadIdx.x, slices = gridDim.z;
  const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
  auto cs_at = [&](int j) {  // the float4 j of this thread in the staged tile
    const int i = tid + j * THREADS, row = i / (BN / 4), col = (i % (BN / 4)) * 4;
    return reinterpret_cast<float4*>(cs + c_at<BN>(row, col));
  };
  stage_acc<BN, WN>(cs, acc, wm, wn, tid);
  __syncthreads();
  float4* parts = reinterpret_cast<float4*>(split.ws) + (int64_t)tile * slices * V;
#pragma unroll
  for (int j = 0; j < PER; ++j) __stcg(parts + (int64_t)blockIdx.z * V + tid + j * THREADS, *cs_at(j));
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
// [z·tiles_per_slice, (z+1)·tiles_per_slice) of slice z = blockIdx.z and, when gridDim.z > 1, ends
// with store_tile_split.
template <int WG_M, int WG_N, int WN, int STAGES, int INFLIGHT, bool A_K_MAJOR, bool B_K_MAJOR, bool SPLIT, typename OutT>
__device__ __forceinline__ void gemm_sm90_body(const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2,
                                               int64_t lda2, const bf16* b2, int64_t ldb2, int k2, OutT* c, int64_t ldc,
                                               const bf16* bias, const OutT* r, int64_t ldr, int M, int N, float alpha, SplitArgs split) {
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

  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int wg = threadIdx.x / 128, wm = wg % WG_M, wn = wg / WG_M;
  const int tiles1 = (k1 + BK - 1) / BK, ntiles = tiles1 + (k2 + BK - 1) / BK;
  // This block's K tiles [t0, t0 + count).
  const int t0 = SPLIT ? blockIdx.z * split.tiles_per_slice : 0;
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
    if (gridDim.z > 1) {
      store_tile_split<BM, BN, WN, THREADS>(cs, acc, wm, wn, split, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
      return;
    }
  }
  store_tile<BM, BN, WN, THREADS>(cs, acc, wm, wn, threadIdx.x, [] { __syncthreads(); }, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
}

// ---- TMA-fed, warp-specialized kernels (gemm_sm90_tma_*) -------------------------------------
// A 128-byte CUtensorMap made on the host by cuTensorMapEncodeTiled (src/ops/gemm_sm90.rs
// `tensor_map`), passed by value as a __grid_constant__ kernel parameter.
struct alignas(64) TmaDesc {
  uint64_t opaque[16];
};

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// The producer's arrival on a full barrier, announcing the bytes the stage's copies will deliver.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  }
}
// Arrives on the barrier at shared address `bar`.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Named barrier `id` over THREADS threads (0 is __syncthreads, which the producer warp would have
// to join).
template <int THREADS>
__device__ __forceinline__ void named_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}

// One 2-D box of a tensor map at coordinates (c0 innermost, c1) into shared memory at `dst`; its
// bytes complete the transaction count of barrier `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const TmaDesc* map, int c0, int c1, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
               : "memory");
}

// D[64×160] += A[64×16]·B[16×160] (one warpgroup; 80 accumulators per thread).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n160(float (&d)[80], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n160k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,"
      "%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,"
      "%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,"
      "%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79"
      "}, %80, %81, 1, 1, 1, 0, %82;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79])
      : "l"(desc_a), "l"(desc_b), "n"(TRANS_B));
}

// A wgmma descriptor in the 64-byte swizzle (mode 2): the n-major B tiles of width 160, made of
// [64 k][32 n] boxes (64-byte rows, 16-byte chunk c of row k at c ^ ((k / 2) mod 4)).
__device__ __forceinline__ uint64_t smem_desc_sw64(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) | (2ull << 62);
}

// The B tile of a TMA stage, BN n × 64 k. Layout kk: K-major [BN][64], one box, 128-byte swizzle.
// Layout kn: BN / NBOX n-major boxes [64 k][NBOX n] side by side: NBOX = 64 in the 128-byte swizzle
// (BN a multiple of 64), else 32 in the 64-byte swizzle (the tensor map says which).
template <int BN>
struct TmaBTile {
  static_assert(BN == 128 || BN == 160, "TMA tile widths");
  static constexpr int NBOX = BN % 64 == 0 ? 64 : 32, BOXES = BN / NBOX, BOX_BYTES = BK * NBOX * 2;
};

// One 64-deep k tile for a warpgroup's MB row blocks of 64 × BN (A rows 64·mb.., 8 KiB apart in
// the stage): four k16 steps of MB wgmmas m64nBNk16 on the A tile at sa and the B tile at sb,
// fenced and committed as one group.
template <int MB, int BN, bool B_K_MAJOR>
__device__ __forceinline__ void tma_k_tile(float (&acc)[MB][BN / 2], uint32_t sa, uint32_t sb) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    uint64_t db;
    if constexpr (B_K_MAJOR) db = smem_desc(sb + ks * 32, 16, 1024);
    else if constexpr (TmaBTile<BN>::NBOX == 64) db = smem_desc(sb + ks * 16 * 128, TmaBTile<BN>::BOX_BYTES, 1024);
    else db = smem_desc_sw64(sb + ks * 16 * 64, TmaBTile<BN>::BOX_BYTES, 512);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const uint64_t da = smem_desc(sa + mb * 64 * 128 + ks * 32, 16, 1024);
      if constexpr (BN == 160) wgmma_m64n160<B_K_MAJOR ? 0 : 1>(acc[mb], da, db);
      else wgmma_m64n128<0, B_K_MAJOR ? 0 : 1>(acc[mb], da, db);
    }
  }
  wgmma_commit();
}

// The C tile's TMA store (the default epilogue of the TMA kernels): each consumer thread writes
// alpha·acc + bias + R for its accumulator fragment (C's type) into a shared-memory tile laid out as
// the store's boxes, and one thread copies the tile to C with cp.async.bulk.tensor (rows and columns
// past M, N are not written). Boxes of CB columns × ROWS rows side by side: 128-byte rows in the
// 128-byte swizzle, or, when BN·sizeof(OutT) is not a multiple of 128 (bf16, BN = 160), 64-byte rows
// in the 64-byte swizzle (which also spreads the fragment's 4-byte stores over all banks).
template <int BN, typename OutT>
struct TmaCTile {
  static constexpr int ES = sizeof(OutT);
  static constexpr bool SW128 = (BN * ES) % 128 == 0;
  static constexpr int ROW_BYTES = SW128 ? 128 : 64, CB = ROW_BYTES / ES, BOXES = BN / CB;
  static_assert(BN % CB == 0, "whole boxes");
  // Shared address of element (row, col) in a buffer of ROWS rows at `buf` (1024-byte aligned).
  template <int ROWS>
  static __device__ __forceinline__ uint32_t at(uint32_t buf, int row, int col) {
    const int byte = (col % CB) * ES, swz = SW128 ? (row & 7) : ((row >> 1) & 3);
    return buf + (col / CB) * (ROWS * ROW_BYTES) + row * ROW_BYTES + ((((byte >> 4) ^ swz)) << 4) + (byte & 15);
  }
};

__device__ __forceinline__ void tma_store(const TmaDesc* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(reinterpret_cast<uint64_t>(map)), "r"(c0),
               "r"(c1), "r"(src)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk stores have read their shared memory (READ) or completed.
template <bool READ>
__device__ __forceinline__ void bulk_wait() {
  if constexpr (READ) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  else asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// One warpgroup's 64 × BN accumulators (thread t = 0..127 of it) into rows row0..row0+63 of the C
// staging buffer `buf` (ROWS rows, TmaCTile layout) as C = alpha·acc + bias[n] + R[m, n]; buffer row 0
// is C row m0, column 0 is C column n0. Bias and R are read per fragment pair (vector loads when
// their pairs are aligned), nothing past M or N.
template <int BN, int ROWS, typename OutT>
__device__ __forceinline__ void put_fragment(uint32_t buf, const float (&acc)[BN / 2], int row0, int t, const bf16* bias, const OutT* r,
                                             int64_t ldr, int m0, int n0, int M, int N, float alpha) {
  using CT = TmaCTile<BN, OutT>;
  const bool bvec = (reinterpret_cast<uintptr_t>(bias) & 3) == 0;
  const bool rvec = (reinterpret_cast<uintptr_t>(r) & (2 * sizeof(OutT) - 1)) == 0 && ldr % 2 == 0;
  const int rbase = row0 + (t / 32) * 16 + (t % 32) / 4;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int col = 8 * j + 2 * (t % 4), n = n0 + col;
    float b0 = 0.0f, b1 = 0.0f;
    if (bias) {
      if (bvec && n + 1 < N) {
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + n));
        b0 = b.x, b1 = b.y;
      } else {
        if (n < N) b0 = __bfloat162float(bias[n]);
        if (n + 1 < N) b1 = __bfloat162float(bias[n + 1]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = rbase + 8 * h, m = m0 + row;
      float v0 = alpha * acc[4 * j + 2 * h] + b0, v1 = alpha * acc[4 * j + 2 * h + 1] + b1;
      if (r && m < M) {
        const OutT* rr = r + (int64_t)m * ldr + n;
        if (rvec && n + 1 < N) {
          if constexpr (sizeof(OutT) == 4) {
            const float2 x = *reinterpret_cast<const float2*>(rr);
            v0 += x.x, v1 += x.y;
          } else {
            const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rr));
            v0 += x.x, v1 += x.y;
          }
        } else {
          if (n < N) v0 += to_f32(rr[0]);
          if (n + 1 < N) v1 += to_f32(rr[1]);
        }
      }
      const uint32_t dst = CT::template at<ROWS>(buf, row, col);
      if constexpr (sizeof(OutT) == 4) {
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(dst), "f"(v0), "f"(v1) : "memory");
      } else {
        const __nv_bfloat162 p = __floats2bfloat162_rn(v0, v1);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(*reinterpret_cast<const uint32_t*>(&p)) : "memory");
      }
    }
  }
}

// After every thread's put_fragment into `buf` (ROWS rows at C row m0): make the writes visible to
// the async proxy, `sync` the writers, and thread `issuer` copies the boxes out.
template <int BN, int ROWS, typename OutT, typename Sync>
__device__ __forceinline__ void store_c_tma(const TmaDesc* tc, uint32_t buf, bool issuer, Sync sync, int m0, int n0) {
  using CT = TmaCTile<BN, OutT>;
  fence_proxy_async();
  sync();
  if (issuer) {
#pragma unroll
    for (int b = 0; b < CT::BOXES; ++b) tma_store(tc, buf + b * ROWS * CT::ROW_BYTES, n0 + b * CT::CB, m0);
    bulk_commit();
  }
}

// Schedules of the TMA kernel body.
enum TmaSched {
  kOneTile = 0,  // one output tile per CTA; the C tile reuses the stages
  kPersist = 1,  // persistent: both consumer warpgroups on each tile (64 rows each); C tile of its own
};

// The TMA kernel body: (64·WGS) × BN output tiles, 128·WGS + 32 threads: warps 0..4·WGS-1 are WGS
// consumer warpgroups, the last warp is the producer (one lane issues every TMA copy). Stage s has
// a full barrier (1 producer arrival + the stage's bytes) and an empty barrier (one arrival per
// warp of the stage's consumers). Producer, k tile i (counted over all of the CTA's output tiles):
// wait empty[s] (parity of the previous round), expect the stage's bytes on full[s], copy A [BM
// m][64 k] and B (TmaBTile). Consumers: wait full[s], wgmmas, keep one wgmma group in flight,
// release the stage of the k tile before; after a tile's last k tile, wait for all wgmmas, release,
// run the epilogue: C by TMA store from a shared tile (TmaCTile) when the launcher made C's tensor
// map (c_tma), else store_tile (an f32 shared tile, ordinary 16-byte stores).
// Output tiles in M-first order; CTA b takes tiles b, b + G, … (G CTAs in the grid).
//  * kOneTile: one tile per CTA (G = tiles), the C tile in the stages' memory.
//  * kPersist: G ≤ the SM count; each warpgroup computes 64 × BN of every tile; the C tile has
//    its own shared memory, so the producer loads the next tile's stages during the epilogue.
// (Tried, round 3: a ping-pong schedule — the two consumer warpgroups on alternate tiles of 128 ×
// 128 or 128 × 160, one's epilogue under the other's wgmmas, a producer warpgroup handing registers
// to them by setmaxnreg — slower at 23 of 24 SD1.5 GEMMs once C is stored by TMA; see
// benches/RESULTS.md "Hopper GEMM round 3".)
// (Tried: clusters of two CTAs along M with B multicast to both — half the L2 reads of B — were
// slower at every SD1.5 shape; see benches/RESULTS.md "Hopper GEMM round 2".)
template <int WGS, int BN, int STAGES, int SCHED, bool B_K_MAJOR, typename OutT>
__device__ __forceinline__ void gemm_sm90_tma_body(const TmaDesc& ta1, const TmaDesc& tb1, const TmaDesc& ta2, const TmaDesc& tb2, const TmaDesc& tc,
                                                   int k1, int k2, int c_tma, OutT* c, int64_t ldc, const bf16* bias, const OutT* r,
                                                   int64_t ldr, int M, int N, float alpha) {
  constexpr int BM = 64 * WGS, CONSUMERS = 128 * WGS, A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  using BT = TmaBTile<BN>;
  __shared__ alignas(8) uint64_t full_bar[STAGES], empty_bar[STAGES];
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;  // the launcher adds 1 KiB
  float* cs = reinterpret_cast<float*>(smem_raw + (base - raw) + (SCHED == kOneTile ? 0 : STAGES * STAGE_BYTES));
  const uint32_t full0 = smem_addr(full_bar), empty0 = smem_addr(empty_bar);

  const int mtiles = (M + BM - 1) / BM, tiles = mtiles * ((N + BN - 1) / BN);
  const int tiles1 = (k1 + BK - 1) / BK, ntiles = tiles1 + (k2 + BK - 1) / BK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, CONSUMERS / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the async proxy
  }
  __syncthreads();

  if (warp == CONSUMERS / 32) {
    if (lane == 0) {
      int i = 0;
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        const int m0 = (t % mtiles) * BM, n0 = (t / mtiles) * BN;
        for (int kt = 0; kt < ntiles; ++kt, ++i) {
          const int s = i % STAGES;
          mbar_wait(empty0 + 8 * s, ((i / STAGES) & 1) ^ 1);
          const bool second = kt >= tiles1;
          const int k0 = (second ? kt - tiles1 : kt) * BK;
          const TmaDesc* ta = second ? &ta2 : &ta1;
          const TmaDesc* tb = second ? &tb2 : &tb1;
          const uint32_t full = full0 + 8 * s, sa = base + s * STAGE_BYTES, sb = sa + A_BYTES;
          mbar_arrive_expect_tx(full, STAGE_BYTES);
          tma_load(sa, ta, k0, m0, full);
          if constexpr (B_K_MAJOR) {
            tma_load(sb, tb, k0, n0, full);
          } else {
#pragma unroll
            for (int j = 0; j < BT::BOXES; ++j) tma_load(sb + j * BT::BOX_BYTES, tb, n0 + j * BT::NBOX, k0, full);
          }
        }
      }
    }
  } else {
    const int wg = warp / 4;
    auto release = [&](int s) {  // this warp is done with stage s
      if (lane == 0) mbar_arrive(empty0 + 8 * s);
    };
    // MB row blocks of 64 × BN per warpgroup, from A rows a_row0.. of each stage; k tiles first..
    // first + ntiles − 1 (global count). Returns with every wgmma done and every stage released.
    auto main_loop = [&](auto& acc, int a_row0, int first) {
      constexpr int MB = sizeof(acc) / sizeof(acc[0]);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) acc[mb][j] = 0.0f;
#pragma unroll 1
      for (int i = first; i < first + ntiles; ++i) {
        const int s = i % STAGES;
        mbar_wait(full0 + 8 * s, (i / STAGES) & 1);
        const uint32_t sa = base + s * STAGE_BYTES + a_row0 * 128, sb = base + s * STAGE_BYTES + A_BYTES;
        tma_k_tile<MB, BN, B_K_MAJOR>(acc, sa, sb);
        wgmma_wait<1>();
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) fence_acc(acc[mb]);
        if (i > first) release((i - 1) % STAGES);  // k tile i − 1's wgmmas are done
      }
      wgmma_wait<0>();
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) fence_acc(acc[mb]);
      release((first + ntiles - 1) % STAGES);
    };
    int i = 0;
    auto tile = [&](int t) {
      float acc[1][BN / 2];
      main_loop(acc, wg * 64, i);
      i += ntiles;
      // Both warpgroups are done with the previous C tile (kPersist; the TMA store of it has
      // read it) or with the stages, whose copies have all landed (each full barrier was waited
      // on): the C tile may be written.
      if (threadIdx.x == 0) bulk_wait<true>();
      named_sync<CONSUMERS>(1);
      const int m0 = (t % mtiles) * BM, n0 = (t / mtiles) * BN;
      auto sync = [] { named_sync<CONSUMERS>(1); };
      if (c_tma) {
        const uint32_t buf = smem_addr(cs);
        put_fragment<BN, BM, OutT>(buf, acc[0], wg * 64, threadIdx.x % 128, bias, r, ldr, m0, n0, M, N, alpha);
        store_c_tma<BN, BM, OutT>(&tc, buf, threadIdx.x == 0, sync, m0, n0);
      } else {
        store_tile<BM, BN, BN, CONSUMERS>(cs, acc[0], wg, 0, threadIdx.x, sync, c, ldc, bias, r, ldr, m0, n0, M, N, alpha);
      }
    };
    // (Not one loop for both: loop-invariant epilogue values hoisted out of it cost registers.)
    if constexpr (SCHED == kPersist)
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) tile(t);
    else if (blockIdx.x < tiles)
      tile(blockIdx.x);
    if (threadIdx.x == 0) bulk_wait<false>();  // the shared memory stays until the store is done
  }
}

}  // namespace

// gemm_sm90_<BM>x<BN>_<A><B>_<out>: tile, layouts (kk: y = x·Wᵀ; kn: dx = dy·W), output type.
// src/ops/gemm_sm90.rs `tile_config` must agree on threads, stages and blocks per SM.
#define GEMM_SM90_KERNEL(BM, BN, WGM, WGN, WN, ST, INF, MINB, LB, BKM, OUT, OUTT)                                          \
  extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) gemm_sm90_##BM##x##BN##_k##LB##_##OUT(              \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,     \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha) { \
    gemm_sm90_body<WGM, WGN, WN, ST, INF, true, BKM, false, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r, \
                                                                  ldr, M, N, alpha, SplitArgs{});                          \
  }

// gemm_sm90_<BM>x<BN>_<A><B>_<out>_split: the same with split-K (grid z = slices; see
// store_tile_split) and layout mn (A(m, k) = A[k·lda + m]: the weight gradients aᵀ·b). Three more
// arguments: K tiles per slice, the f32 workspace, the per-output-tile counters.
// src/ops/gemm_sm90_split.rs `SPLIT_TILES` must agree on threads, stages and blocks per SM.
#define GEMM_SM90_SPLIT_KERNEL(BM, BN, WGM, WGN, WN, ST, INF, MINB, LA, AKM, LB, BKM, OUT, OUTT)                              \
  extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) gemm_sm90_##BM##x##BN##_##LA##LB##_##OUT##_split(      \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,       \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha,    \
      int tiles_per_slice, float* ws, unsigned* counters) {                                                                  \
    gemm_sm90_body<WGM, WGN, WN, ST, INF, AKM, BKM, true, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r,  \
                                                                ldr, M, N, alpha, SplitArgs{tiles_per_slice, ws, counters});  \
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

// gemm_sm90_tma_128x<BN>_s<STAGES>[_p]_k<B>_<out>: the TMA kernels (1-D grid, 288 threads; _p:
// persistent). src/ops/gemm_sm90.rs `SM90_TILES` must agree on the tile, stages, schedule and
// threads.
#define GEMM_SM90_TMA_KERNEL(BN, ST, SCHED, SUFFIX, MINB, LB, BKM, OUT, OUTT)                                                \
  extern "C" __global__ void __launch_bounds__(288, MINB) gemm_sm90_tma_128x##BN##_s##ST##SUFFIX##_k##LB##_##OUT(             \
      const __grid_constant__ TmaDesc ta1, const __grid_constant__ TmaDesc tb1, const __grid_constant__ TmaDesc ta2,            \
      const __grid_constant__ TmaDesc tb2, const __grid_constant__ TmaDesc tc, int k1, int k2, int c_tma, OUTT* c, int64_t ldc,  \
      const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha) {                                                \
    gemm_sm90_tma_body<2, BN, ST, SCHED, BKM, OUTT>(ta1, tb1, ta2, tb2, tc, k1, k2, c_tma, c, ldc, bias, r, ldr, M, N, alpha); \
  }

// (BN, stages, schedule, blocks per SM), all 128 rows × BN with two consumer warpgroups:
// 128×128, 3 stages (96 KiB), two CTAs per SM, one tile each; 128×128 persistent, 4 stages (128 KiB)
// + the 64 KiB C tile; 128×160 persistent, 4 stages (144 KiB) + 80 KiB. (256×128 with four consumer
// warpgroups, one tile per CTA, was measured in round 2: fastest only at two shapes, by 2-4 %.)
#define GEMM_SM90_TMA_TILES(LB, BKM, OUT, OUTT)                       \
  GEMM_SM90_TMA_KERNEL(128, 3, kOneTile, , 2, LB, BKM, OUT, OUTT)    \
  GEMM_SM90_TMA_KERNEL(128, 4, kPersist, _p, 1, LB, BKM, OUT, OUTT)  \
  GEMM_SM90_TMA_KERNEL(160, 4, kPersist, _p, 1, LB, BKM, OUT, OUTT)

GEMM_SM90_TMA_TILES(k, true, bf16, bf16)
GEMM_SM90_TMA_TILES(k, true, f32, float)
GEMM_SM90_TMA_TILES(n, false, bf16, bf16)
GEMM_SM90_TMA_TILES(n, false, f32, float)
