// Shared pieces of the Hopper (sm_90a) GEMM kernels kernels/gemm_sm90.cu (cp.async family, split-K)
// and kernels/gemm_tma_sm90.cu (TMA family): shared-memory layouts and wgmma descriptors, the wgmma
// instructions, the cp.async tile loads and the f32-staged epilogue. The layouts are described in
// kernels/gemm_sm90.cu's header.
#pragma once
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

}  // namespace
