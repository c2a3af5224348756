// bf16 tensor-core GEMM with f32 accumulation, for every linear layer, its input gradient, the fused
// LoRA linear (forward and backward) and the LoRA weight gradients. CPU twins: src/ops/gemm.rs
// (`linear_cpu`, `linear_input_grad_cpu`, `at_b_cpu`) and src/ops/lora.rs.
//
//   C[m, n] = alpha · Σ_k A(m, k) · B(n, k)  (+ bias[n])  (+ R[m, n])          0 ≤ m < M, 0 ≤ n < N
//
// The K sum runs over two segments read from two pointer pairs, so a GEMM over a concatenated K
// needs no copy: K = K1 + K2, segment s reads (A_s, B_s) with its own leading dimensions. The fused
// LoRA forward is [x | s·u]·[W | B]ᵀ and its input gradient is [dy | s·v]·[W ; A] this way. K2 = 0
// turns the second segment off.
//
// Operand layouts (row-major storage; `ld` = elements between consecutive rows), chosen per kernel:
//   A "k" : A(m, k) = A[m·lda + k]   (activations x [M, K])
//   A "m" : A(m, k) = A[k·lda + m]   (Aᵀ of an activation: the token axis is the reduction, as in dyᵀ·u)
//   B "k" : B(n, k) = B[n·ldb + k]   (a PyTorch linear weight [out, in]: y = x·Wᵀ)
//   B "n" : B(n, k) = B[k·ldb + n]   (W itself: dx = dy·W; or an activation [tokens, n])
// Kernels are named gemm_<tile>_<A><B>_<out>: gemm_128x128_kk_bf16 is the forward linear,
// gemm_*_kn_* the input gradient, gemm_*_mn_f32 the weight-gradient products Aᵀ·B.
//
// Epilogue: C = alpha·acc + bias[n] (bf16, optional) + R[m·ldr + n] (type of C, optional; R may be C
// itself, which accumulates). With gridDim.z > 1 (split-K, f32 output only, no bias, no R) each
// z-slice sums its share of the K tiles and either adds it with atomicAdd into C (split_stride = 0;
// the caller zeroes C or accumulates into it) or stores it to C + z·split_stride (a workspace that
// gemm_splitk_reduce_f32 then adds up).
// The accumulators are staged through shared memory so C, R and bias move as 16-byte row segments.
//
// Machinery (sm_80 PTX, runs on Ampere/Ada/Hopper/Blackwell): BMxBNxBK block tiles of 4 or 8 warps
// (each warp owns a WMxWN sub-tile: 64x64, 64x32 or 32x32), a 3- to 8-stage cp.async.cg pipeline
// into XOR-swizzled shared memory (conflict-free ldmatrix), ldmatrix (.trans for the "m"/"n"
// layouts) feeding mma.sync.m16n8k16 bf16 -> f32. The ldmatrix fragments are double-buffered: the
// fragments of k-step s+1 (of the next k-tile at the end of a tile) are loaded while the mmas of
// step s issue, and the next tile's global->shared copies are issued at the first k-step of a tile.
// A segment whose pointer, leading dimension or contiguous extent is not a multiple of 8 elements
// (16 bytes) is loaded with bounds-checked scalar loads instead of cp.async (slower, same result):
// any M, N, K work.
#include "common.cuh"
#include "mma.cuh"
#include "epilogue.cuh"

namespace {


__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// Element offset of 16-byte chunk `chunk` of row `row` in a tile whose rows hold ROW_CHUNKS chunks.
// The XOR makes the 8 rows read by one ldmatrix phase land in 8 different bank groups.
template <int ROW_CHUNKS>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  static_assert(ROW_CHUNKS == 4 || ROW_CHUNKS % 8 == 0, "tile rows must be 64 B or a multiple of 128 B");
  if constexpr (ROW_CHUNKS == 4) return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
  else return row * (ROW_CHUNKS * 8) + ((chunk ^ (row & 7)) << 3);
}

// The slow path of a tile load: one 16-byte chunk element by element, with bounds checks (operands
// whose rows are not 16-byte aligned). Out of line: it must not bloat the kernels' hot code.
__device__ __noinline__ void load_chunk_checked(bf16* dst, const bf16* src, bool k_major, int r, int extent, int k, int kl) {
  alignas(16) bf16 val[8];
  for (int e = 0; e < 8; ++e) {
    const bool valid = k_major ? (r < extent && k + e < kl) : (r + e < extent && k < kl);
    val[e] = valid ? src[e] : __float2bfloat16_rn(0.0f);
  }
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(val);
}

// One K segment of an operand: pointer, leading dimension, depth, and whether it takes cp.async.
struct Operand {
  const bf16* p;
  int64_t ld;
  int k;
  bool vec;
};

// Copies one operand's tile for one K step into shared memory. K_MAJOR: the tile is [ROWS][BK]
// (k contiguous: layouts A "k", B "k"); otherwise [BK][ROWS] (m or n contiguous: A "m", B "n").
// Only this thread's chunk coordinates are kept in registers; the segment's pointer and leading
// dimension are read (kernel parameters) per K step, which keeps the register count of the 8-warp
// tiles low enough for two blocks per SM.
template <bool K_MAJOR, int ROWS, int BK, int THREADS>
struct TileLoader {
  static constexpr int ROW_CHUNKS = K_MAJOR ? BK / 8 : ROWS / 8;  // 16-byte chunks per tile row
  static constexpr int ITERS = ROWS * BK / 8 / THREADS;           // chunks per thread
  static constexpr int ROW_STEP = THREADS / ROW_CHUNKS;          // tile rows between them
  static_assert((ROWS * BK / 8) % THREADS == 0 && ROW_STEP % 8 == 0, "tile chunks must divide among the threads");
  int smem_off;  // element offset of the first chunk in a tile
  int row0;      // tile row of the first chunk
  int mn;        // K_MAJOR: m (or n) of the first chunk's row; else m (or n) of every chunk's first element
  int kc;        // K_MAJOR: k of the chunk's first element within the tile
  int extent;    // M (or N)

  __device__ __forceinline__ TileLoader(int rows0, int extent_) {
    const int chunk = threadIdx.x % ROW_CHUNKS;
    row0 = threadIdx.x / ROW_CHUNKS;
    smem_off = swizzle<ROW_CHUNKS>(row0, chunk);
    extent = extent_;
    mn = K_MAJOR ? rows0 + row0 : rows0 + chunk * 8;
    kc = K_MAJOR ? chunk * 8 : 0;
  }

  // Tile of segment `op` starting at k0 (inside the segment) into `tile`.
  __device__ __forceinline__ void load(bf16* tile, const Operand& op, int k0) const {
    // This thread's first chunk at k = k0.
    const bf16* b = K_MAJOR ? op.p + (int64_t)mn * op.ld + kc + k0 : op.p + (int64_t)(row0 + k0) * op.ld + mn;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      bf16* dst = tile + smem_off + it * ROW_STEP * ROW_CHUNKS * 8;
      // (m or n, k) of the chunk's first element; the chunk runs along k (K_MAJOR) or along m/n.
      const int r = K_MAJOR ? mn + it * ROW_STEP : mn;
      const int k = K_MAJOR ? k0 + kc : k0 + row0 + it * ROW_STEP;
      const bf16* src = b + it * ROW_STEP * op.ld;
      if (op.vec) {
        const bool valid = r < extent && k < op.k;  // whole chunk in or out: extents are multiples of 8 here
        cp_async16(smem_addr(dst), valid ? src : op.p, valid);
      } else {
        load_chunk_checked(dst, src, K_MAJOR, r, extent, k, op.k);
      }
    }
  }
};

// Epilogue, slow path (out of line): 8 columns n.. of one row, element by element with bounds —
// split-K atomics (f32 C), the partial group at the right edge, or rows that are not 16-byte
// aligned. `v` points at the 8 accumulators in shared memory.
template <typename OutT>
__device__ __noinline__ void store8_checked(OutT* crow, const OutT* rrow, const bf16* bias, int n, int N, const float* v,
                                            float alpha, bool atomic) {
  for (int e = 0; e < 8 && n + e < N; ++e) {
    const int col = n + e;
    float out = alpha * v[e];
    if constexpr (sizeof(OutT) == 4) {
      if (atomic) {
        atomicAdd(reinterpret_cast<float*>(crow) + col, out);
        continue;
      }
    }
    if (bias) out += __bfloat162float(bias[col]);
    if (rrow) out += to_f32(rrow[col]);
    crow[col] = from_f32<OutT>(out);
  }
}

// Epilogue, fast path: 8 columns n.. of one row from the staged accumulators, with 16-byte loads
// and stores (kernels/epilogue.cuh).
template <typename OutT>
__device__ __forceinline__ void store8(OutT* crow, const OutT* rrow, const bf16* bias, int n, const float* src, float alpha) {
  const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
  float v[8] = {alpha * lo.x, alpha * lo.y, alpha * lo.z, alpha * lo.w, alpha * hi.x, alpha * hi.y, alpha * hi.z, alpha * hi.w};
  store8_values(crow, rrow, bias, n, v);
}

// Epilogue of one tile: C = alpha·acc (+ bias) (+ R), or the split-K partial sums. The fragments
// go through shared memory `cs` (free now: an f32 [BM][BN] tile whose 8-column groups are
// XOR-swizzled by row: conflict-free fragment writes), then every thread writes whole 8-column
// groups of C with 16-byte accesses, coalesced, in a compact loop.
template <int BM, int BN, int WM, int WN, int THREADS, typename OutT, int MI, int NI>
__device__ __forceinline__ void epilogue(const float (&acc)[MI][NI][4], float* cs, int m0, int n0, int wm0, int wn0, OutT* c,
                                         int64_t ldc, const bf16* bias, const OutT* r, int64_t ldr, int M, int N, float alpha,
                                         int64_t split_stride) {
  static_assert(BN >= 64, "the C tile swizzle needs 8 column groups per row");
  const int lane = threadIdx.x % 32;
  auto c_at = [](int row, int col) { return row * BN + (col ^ ((row & 7) << 3)); };
  {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int row = wm0 + i * 16 + g, col = wn0 + j * 8 + 2 * t;
        *reinterpret_cast<float2*>(cs + c_at(row, col)) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(cs + c_at(row + 8, col)) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }
  __syncthreads();
  const bool atomic = gridDim.z > 1 && split_stride == 0;
  c += blockIdx.z * split_stride;  // split-K into a workspace: this slice's partial sums
  auto aligned16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool fast = !atomic && aligned16(c) && ldc % 8 == 0 && (!r || (aligned16(r) && ldr % 8 == 0)) && (!bias || aligned16(bias));
  constexpr int GROUPS = BN / 8;
  for (int idx = threadIdx.x; idx < BM * GROUPS; idx += THREADS) {
    const int row = idx / GROUPS, col = (idx % GROUPS) * 8;
    const int m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    OutT* crow = c + (int64_t)m * ldc;
    const OutT* rrow = r ? r + (int64_t)m * ldr : nullptr;
    if constexpr (sizeof(OutT) == 4) {
      if (atomic && n + 8 <= N) {  // split-K partial sums: 8 fire-and-forget f32 reductions (red.global.add)
        const float* v = cs + c_at(row, col);
#pragma unroll
        for (int e = 0; e < 8; ++e) atomicAdd(reinterpret_cast<float*>(crow) + n + e, alpha * v[e]);
        continue;
      }
    }
    if (fast && n + 8 <= N) store8(crow, rrow, bias, n, cs + c_at(row, col), alpha);
    else store8_checked(crow, rrow, bias, n, N, cs + c_at(row, col), alpha, atomic);
  }
}

// The kernel body. A_KMAJOR: A layout "k" (else "m"); B_KMAJOR: B layout "k" (else "n").
// WARPS_M x WARPS_N warps, one BM x BN output tile per block (blockIdx.x: N tiles, blockIdx.y: M
// tiles, blockIdx.z: K slices); the C tile of the epilogue reuses the pipeline's shared memory
// (the launcher's dynamic shared memory is the larger of the two).
template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool FRAG_DB, bool A_KMAJOR, bool B_KMAJOR, typename OutT>
__device__ __forceinline__ void gemm_body(const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1,
                                          const bf16* a2, int64_t lda2, const bf16* b2, int64_t ldb2, int k2,
                                          OutT* c, int64_t ldc, const bf16* bias, const OutT* r, int64_t ldr, int M, int N,
                                          float alpha, int tiles_per_split, int64_t split_stride) {
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  constexpr int MI = WM / 16, NI = WN / 8;
  constexpr int KSTEPS = BK / 16;
  static_assert(NI % 2 == 0 && KSTEPS % 2 == 0, "B fragments go two n8 tiles at a time; fragment buffers alternate by k-step");
  constexpr int A_TILE = BM * BK, B_TILE = BN * BK;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  bf16* sa = smem;                    // STAGES A tiles
  bf16* sb = smem + STAGES * A_TILE;  // STAGES B tiles

  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;

  // Alignment of each operand decides between cp.async and scalar loads (uniform per block).
  auto aligned = [](const bf16* p, int64_t ld, int contiguous_extent) {
    return ((reinterpret_cast<uintptr_t>(p) & 15) == 0) && (ld % 8 == 0) && (contiguous_extent % 8 == 0);
  };
  const bool vec_a1 = aligned(a1, lda1, A_KMAJOR ? k1 : M), vec_b1 = aligned(b1, ldb1, B_KMAJOR ? k1 : N);
  const bool vec_a2 = aligned(a2, lda2, A_KMAJOR ? k2 : M), vec_b2 = aligned(b2, ldb2, B_KMAJOR ? k2 : N);
  const int tiles1 = (k1 + BK - 1) / BK, tiles2 = (k2 + BK - 1) / BK;
  const int t_begin = blockIdx.z * tiles_per_split;
  const int t_end = min(tiles1 + tiles2, t_begin + tiles_per_split);
  const int ntiles = max(0, t_end - t_begin);

  const TileLoader<A_KMAJOR, BM, BK, THREADS> load_a(m0, M);
  const TileLoader<B_KMAJOR, BN, BK, THREADS> load_b(n0, N);
  auto load_stage = [&](int stage, int t) {
    const int seg = t < tiles1 ? 0 : 1;  // which K segment the tile belongs to
    const int k0 = (t - seg * tiles1) * BK;
    load_a.load(sa + stage * A_TILE, seg ? Operand{a2, lda2, k2, vec_a2} : Operand{a1, lda1, k1, vec_a1}, k0);
    load_b.load(sb + stage * B_TILE, seg ? Operand{b2, ldb2, k2, vec_b2} : Operand{b1, ldb1, k1, vec_b1}, k0);
  };

  // Fragments of one k-step (16 deep) of the warp tile, two buffers (k-steps alternate).
  // ldmatrix addresses: in a k-major tile the swizzle key of a lane's row does not depend on the
  // fragment index i (rows 16 apart), so the offset of k-step ks is precomputed per lane and the
  // fragments of a step lie at fixed distances from it; in an m/n-major tile the k row's key is
  // the lane's, so the offset of fragment i is precomputed and the k-steps lie at fixed distances.
  // A fragment load is then one add (plus an immediate) instead of a chain of index arithmetic.
  uint32_t af[FRAG_DB ? 2 : 1][MI][4], bfr[FRAG_DB ? 2 : 1][NI / 2][4];
  uint32_t a_off[A_KMAJOR ? KSTEPS : MI], b_off[B_KMAJOR ? KSTEPS : NI / 2];  // byte offsets in a stage
#pragma unroll
  for (int q = 0; q < (A_KMAJOR ? KSTEPS : MI); ++q) {
    if constexpr (A_KMAJOR) a_off[q] = 2 * swizzle<BK / 8>(wm0 + (lane % 16), 2 * q + lane / 16);
    else a_off[q] = 2 * swizzle<BM / 8>((lane % 8) + (lane / 16) * 8, (wm0 + q * 16) / 8 + (lane / 8) % 2);
  }
#pragma unroll
  for (int q = 0; q < (B_KMAJOR ? KSTEPS : NI / 2); ++q) {
    if constexpr (B_KMAJOR) b_off[q] = 2 * swizzle<BK / 8>(wn0 + (lane % 8) + (lane / 16) * 8, 2 * q + (lane / 8) % 2);
    else b_off[q] = 2 * swizzle<BN / 8>((lane % 8) + ((lane / 8) % 2) * 8, (wn0 + q * 16) / 8 + lane / 16);
  }
  // ta, tb: shared-window addresses of the stage's A and B tiles; ks: the k-step.
  auto load_frags = [&](int buf, uint32_t ta, uint32_t tb, int ks) {
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      if constexpr (A_KMAJOR) ldmatrix_x4(af[buf][i], ta + a_off[ks] + i * 16 * BK * 2);
      else ldmatrix_x4_trans(af[buf][i], ta + a_off[i] + ks * 16 * BM * 2);
    }
#pragma unroll
    for (int j = 0; j < NI / 2; ++j) {
      if constexpr (B_KMAJOR) ldmatrix_x4(bfr[buf][j], tb + b_off[ks] + j * 16 * BK * 2);
      else ldmatrix_x4_trans(bfr[buf][j], tb + b_off[j] + ks * 16 * BN * 2);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll 1
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_stage(s, t_begin + s);
    cp_async_commit();
  }
  cp_async_wait<STAGES - 2>();
  __syncthreads();  // K tile 0 landed for every thread
  int read_stage = 0, write_stage = STAGES - 1;
  const uint32_t sa_addr = smem_addr(sa), sb_addr = smem_addr(sb);
  uint32_t ta = sa_addr, tb = sb_addr;
  if constexpr (FRAG_DB) load_frags(0, ta, tb, 0);

  // Pipeline invariant: at the top of iteration kt, K tile kt sits in stage read_stage (with
  // FRAG_DB, its first k-step's fragments are in buffer 0), K tiles kt+1 .. kt+STAGES-2 are in
  // flight.
#pragma unroll 1
  for (int kt = 0; kt < ntiles; ++kt) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      // K tile kt+1 must have landed (for every thread) before its fragments are read; the
      // barrier also ends every warp's reads of tile kt, whose stage iteration kt+1 refills.
      auto next_tile = [&]() {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
        ta = sa_addr + read_stage * A_TILE * 2;
        tb = sb_addr + read_stage * B_TILE * 2;
      };
      if constexpr (FRAG_DB) {
        if (ks == KSTEPS - 1) next_tile();
        load_frags((ks + 1) % 2, ta, tb, (ks + 1) % KSTEPS);
      } else {
        load_frags(0, ta, tb, ks);
      }
      if (ks == 0) {
        const int next = kt + STAGES - 1;
        if (next < ntiles) load_stage(write_stage, t_begin + next);
        cp_async_commit();
        write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
      }
      const int buf = FRAG_DB ? ks % 2 : 0;  // compile-time after unrolling
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
          mma_bf16(acc[i][j], af[buf][i], bfr[buf][j / 2][(j % 2) * 2], bfr[buf][j / 2][(j % 2) * 2 + 1]);
      if constexpr (!FRAG_DB) {
        if (ks == KSTEPS - 1) next_tile();
      }
    }
  }
  // Every copy has landed (the last waits covered them) and, after this barrier, every warp is
  // done reading the pipeline's shared memory, which the epilogue reuses.
  cp_async_wait<0>();
  __syncthreads();
  epilogue<BM, BN, WM, WN, THREADS>(acc, reinterpret_cast<float*>(smem_raw), m0, n0, wm0, wn0, c, ldc, bias, r, ldr, M, N, alpha,
                                    split_stride);
}

}  // namespace

#define GEMM_KERNEL(BM, BN, BK, WM_, WN_, ST, DB, MINB, LA, LB, AK, BKM, OUT, OUTT)                        \
  extern "C" __global__ void __launch_bounds__(32 * WM_ * WN_, MINB) gemm_##BM##x##BN##_##LA##LB##_##OUT(                \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,   \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha, \
      int tiles_per_split, int64_t split_stride) { await_previous_kernel();                                                \
    gemm_body<BM, BN, BK, WM_, WN_, ST, DB, AK, BKM, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r, ldr, \
                                                    M, N, alpha, tiles_per_split, split_stride);                           \
  }

// The tiles: BM x BN x BK, warps (M x N), pipeline stages, fragment double-buffering, min. blocks
// per SM. src/ops/gemm.rs `tile_shape` must agree. 256x128 / 128x256: 8 warps of 64x64, one block
// per SM (147 KiB of shared memory: H100-class GPUs only); 128x128: 8 warps of 64x32 (two blocks
// per SM: 128 registers); 128x64 and 64x64: 4 warps, deeper pipelines for where few blocks share
// an SM.
#define GEMM_TILES(LA, LB, AK, BKM, OUT, OUTT)                              \
  GEMM_KERNEL(256, 128, 64, 4, 2, 3, true, 1, LA, LB, AK, BKM, OUT, OUTT)   \
  GEMM_KERNEL(128, 256, 64, 2, 4, 3, true, 1, LA, LB, AK, BKM, OUT, OUTT)   \
  GEMM_KERNEL(128, 128, 32, 2, 4, 4, false, 2, LA, LB, AK, BKM, OUT, OUTT)  \
  GEMM_KERNEL(128, 64, 32, 2, 2, 6, true, 1, LA, LB, AK, BKM, OUT, OUTT)    \
  GEMM_KERNEL(64, 64, 32, 2, 2, 8, true, 1, LA, LB, AK, BKM, OUT, OUTT)

GEMM_TILES(k, k, true, true, bf16, bf16)
GEMM_TILES(k, k, true, true, f32, float)
GEMM_TILES(k, n, true, false, bf16, bf16)
GEMM_TILES(k, n, true, false, f32, float)
GEMM_TILES(m, n, false, false, f32, float)

// Split-K reduction for up to two GEMMs at once (the LoRA dA and dB): for p in {1, 2}, i < count_p:
//   c_p[i] = (accumulate ? c_p[i] : 0) + Σ_{s < slices_p} ws_p[s·count_p + i]
// CPU twin: at_b_cpu (tested through at_b and the LoRA backward).
extern "C" __global__ void gemm_splitk_reduce_f32(const float* __restrict__ ws1, int slices1, int64_t count1, float* __restrict__ c1,
                                                  const float* __restrict__ ws2, int slices2, int64_t count2, float* __restrict__ c2,
                                                  int accumulate) {
  await_previous_kernel();
  FOR_EACH_INDEX(i, count1 + count2) {
    const bool second = i >= count1;
    const float* ws = second ? ws2 : ws1;
    const int64_t j = second ? i - count1 : i, count = second ? count2 : count1;
    const int slices = second ? slices2 : slices1;
    float* c = second ? c2 : c1;
    float sum = accumulate ? c[j] : 0.0f;
    for (int s = 0; s < slices; ++s) sum += ws[s * count + j];
    c[j] = sum;
  }
}

// Split-K finish of a forward GEMM (src/ops/gemm.rs `gemm`): for m < M, n < N
//   C[m·ldc + n] = Σ_{s < slices} ws[(s·M + m)·N + n] + bias[n] + R[m·ldr + n]
// (the slices' partial sums already carry alpha; bias, R optional; R may be C). CPU twins: linear_cpu,
// linear_input_grad_cpu (tested through linear, linear_input_grad and the LoRA GEMMs).
template <typename OutT>
__device__ __forceinline__ void splitk_finish(const float* __restrict__ ws, int slices, int M, int N, OutT* c, int64_t ldc,
                                              const bf16* bias, const OutT* r, int64_t ldr) {
  const int64_t count = (int64_t)M * N;
  FOR_EACH_INDEX(i, count) {
    const int m = (int)(i / N), n = (int)(i % N);
    float sum = 0.0f;
    for (int s = 0; s < slices; ++s) sum += ws[s * count + i];
    if (bias) sum += __bfloat162float(bias[n]);
    if (r) sum += to_f32(r[m * ldr + n]);
    c[m * ldc + n] = from_f32<OutT>(sum);
  }
}
extern "C" __global__ void gemm_splitk_finish_bf16(const float* ws, int slices, int M, int N, bf16* c, int64_t ldc, const bf16* bias,
                                                   const bf16* r, int64_t ldr) {
  await_previous_kernel();
  splitk_finish(ws, slices, M, N, c, ldc, bias, r, ldr);
}
extern "C" __global__ void gemm_splitk_finish_f32(const float* ws, int slices, int M, int N, float* c, int64_t ldc, const bf16* bias,
                                                  const float* r, int64_t ldr) {
  await_previous_kernel();
  splitk_finish(ws, slices, M, N, c, ldc, bias, r, ldr);
}

// Benchmark helper (src/bench/gemm.rs): keeps the GPU busy for `cycles` clock cycles so that the
// launches queued behind it are timed back to back, without the host's launch latency in between.
extern "C" __global__ void gemm_bench_spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
