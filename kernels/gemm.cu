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
// itself, which accumulates). With gridDim.z > 1 (split-K, f32 output only) each z-slice adds its
// partial sum with atomicAdd into C (the caller zeroes C or accumulates into it; no bias, no R).
// The accumulators are staged through shared memory so C, R and bias move as 16-byte row segments.
//
// Machinery (sm_80 PTX, runs on Ampere/Ada/Hopper/Blackwell): BMxBNx32 block tiles, 4 warps (2x2),
// a 4- to 8-stage cp.async.cg pipeline into XOR-swizzled shared memory (conflict-free ldmatrix), ldmatrix
// (.trans for the "m"/"n" layouts) feeding mma.sync.m16n8k16 bf16 -> f32. A segment whose pointer,
// leading dimension or contiguous extent is not a multiple of 8 elements (16 bytes) is loaded with
// bounds-checked scalar loads instead of cp.async (slower, same result): any M, N, K work.
#include "common.cuh"
#include "mma.cuh"

namespace {

constexpr int BK = 32;
constexpr int THREADS = 128;

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

// Copies one operand's tile for one K step into shared memory. K_MAJOR: the tile is [ROWS][BK]
// (k contiguous: layouts A "k", B "k"); otherwise [BK][ROWS] (m or n contiguous: A "m", B "n").
// Whatever does not change along K (this thread's chunks, their shared-memory offsets, the base
// pointer of each segment) is computed once, so a K step costs a few adds per 16-byte copy.
template <bool K_MAJOR, int ROWS>
struct TileLoader {
  static constexpr int ROW_CHUNKS = K_MAJOR ? BK / 8 : ROWS / 8;  // 16-byte chunks per tile row
  static constexpr int ITERS = ROWS * BK / 8 / THREADS;           // chunks per thread
  static constexpr int ROW_STEP = THREADS / ROW_CHUNKS;          // tile rows between them
  static_assert((ROWS * BK / 8) % THREADS == 0 && ROW_STEP % 8 == 0, "tile chunks must divide among the threads");
  const bf16* base[2];  // per K segment: this thread's first chunk at k = 0
  int64_t ld[2];
  int klen[2];
  bool vec[2];
  int smem_off;  // element offset of the first chunk in a tile
  int row0;      // tile row of the first chunk
  int mn;        // K_MAJOR: m (or n) of the first chunk's row; else m (or n) of every chunk's first element
  int kc;        // K_MAJOR: k of the chunk's first element within the tile
  int extent;    // M (or N)

  __device__ __forceinline__ TileLoader(const bf16* g1, int64_t ld1, int k1, bool vec1, const bf16* g2, int64_t ld2, int k2,
                                        bool vec2, int rows0, int extent_) {
    const int chunk = threadIdx.x % ROW_CHUNKS;
    row0 = threadIdx.x / ROW_CHUNKS;
    smem_off = swizzle<ROW_CHUNKS>(row0, chunk);
    extent = extent_;
    ld[0] = ld1, ld[1] = ld2, klen[0] = k1, klen[1] = k2, vec[0] = vec1, vec[1] = vec2;
    if constexpr (K_MAJOR) {
      mn = rows0 + row0, kc = chunk * 8;
      base[0] = g1 + (int64_t)mn * ld1 + kc;
      base[1] = g2 + (int64_t)mn * ld2 + kc;
    } else {
      mn = rows0 + chunk * 8, kc = 0;
      base[0] = g1 + (int64_t)row0 * ld1 + mn;
      base[1] = g2 + (int64_t)row0 * ld2 + mn;
    }
  }

  // Tile of segment `seg` starting at k0 (inside the segment) into `tile`.
  __device__ __forceinline__ void load(bf16* tile, int seg, int k0) const {
    const bf16* b = seg ? base[1] : base[0];
    const int64_t l = seg ? ld[1] : ld[0];
    const int kl = seg ? klen[1] : klen[0];
    const bool v = seg ? vec[1] : vec[0];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      bf16* dst = tile + smem_off + it * ROW_STEP * ROW_CHUNKS * 8;
      // (m or n, k) of the chunk's first element; the chunk runs along k (K_MAJOR) or along m/n.
      const int r = K_MAJOR ? mn + it * ROW_STEP : mn;
      const int k = K_MAJOR ? k0 + kc : k0 + row0 + it * ROW_STEP;
      const bf16* src = K_MAJOR ? b + it * ROW_STEP * l + k0 : b + (k0 + it * ROW_STEP) * l;
      if (v) {
        const bool valid = r < extent && k < kl;  // whole chunk in or out: extents are multiples of 8 here
        cp_async16(smem_addr(dst), valid ? src : base[0], valid);
      } else {
        load_chunk_checked(dst, src, K_MAJOR, r, extent, k, kl);
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

// Adds 8 bf16 values (one 16-byte load) to v.
__device__ __forceinline__ void add_bf16x8(float (&v)[8], const bf16* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = __bfloat1622float2(h[q]);
    v[2 * q] += f.x;
    v[2 * q + 1] += f.y;
  }
}

// Epilogue, fast path: 8 columns n.. of one row with 16-byte loads and stores.
template <typename OutT>
__device__ __forceinline__ void store8(OutT* crow, const OutT* rrow, const bf16* bias, int n, const float* src, float alpha) {
  const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
  float v[8] = {alpha * lo.x, alpha * lo.y, alpha * lo.z, alpha * lo.w, alpha * hi.x, alpha * hi.y, alpha * hi.z, alpha * hi.w};
  if (bias) add_bf16x8(v, bias + n);
  if constexpr (sizeof(OutT) == 4) {
    if (rrow) {
      const float4 r0 = *reinterpret_cast<const float4*>(rrow + n), r1 = *reinterpret_cast<const float4*>(rrow + n + 4);
      v[0] += r0.x, v[1] += r0.y, v[2] += r0.z, v[3] += r0.w, v[4] += r1.x, v[5] += r1.y, v[6] += r1.z, v[7] += r1.w;
    }
    *reinterpret_cast<float4*>(crow + n) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(crow + n + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    if (rrow) add_bf16x8(v, reinterpret_cast<const bf16*>(rrow) + n);
    uint4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
    *reinterpret_cast<uint4*>(crow + n) = out;
  }
}

// The kernel body. A_KMAJOR: A layout "k" (else "m"); B_KMAJOR: B layout "k" (else "n").
template <int BM, int BN, int STAGES, bool A_KMAJOR, bool B_KMAJOR, typename OutT>
__device__ __forceinline__ void gemm_body(const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1,
                                          const bf16* a2, int64_t lda2, const bf16* b2, int64_t ldb2, int k2,
                                          OutT* c, int64_t ldc, const bf16* bias, const OutT* r, int64_t ldr, int M, int N,
                                          float alpha, int tiles_per_split) {
  constexpr int WM = BM / 2, WN = BN / 2;  // warp tile (2x2 warps)
  constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(NI % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  constexpr int A_TILE = BM * BK, B_TILE = BN * BK;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  bf16* sa = smem;                    // STAGES A tiles
  bf16* sb = smem + STAGES * A_TILE;  // STAGES B tiles

  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / 2) * WM, wn0 = (warp % 2) * WN;

  // Alignment of each operand decides between cp.async and scalar loads (uniform per block).
  auto aligned = [](const bf16* p, int64_t ld, int contiguous_extent) {
    return ((reinterpret_cast<uintptr_t>(p) & 15) == 0) && (ld % 8 == 0) && (contiguous_extent % 8 == 0);
  };
  const bool vec_a1 = aligned(a1, lda1, A_KMAJOR ? k1 : M), vec_b1 = aligned(b1, ldb1, B_KMAJOR ? k1 : N);
  const bool vec_a2 = aligned(a2, lda2, A_KMAJOR ? k2 : M), vec_b2 = aligned(b2, ldb2, B_KMAJOR ? k2 : N);
  const TileLoader<A_KMAJOR, BM> load_a(a1, lda1, k1, vec_a1, a2, lda2, k2, vec_a2, m0, M);
  const TileLoader<B_KMAJOR, BN> load_b(b1, ldb1, k1, vec_b1, b2, ldb2, k2, vec_b2, n0, N);
  const int tiles1 = (k1 + BK - 1) / BK, tiles2 = (k2 + BK - 1) / BK;
  const int t_begin = blockIdx.z * tiles_per_split;
  const int t_end = min(tiles1 + tiles2, t_begin + tiles_per_split);
  const int ntiles = max(0, t_end - t_begin);

  auto load_stage = [&](int stage, int t) {
    const int seg = t < tiles1 ? 0 : 1;  // which K segment the tile belongs to
    const int k0 = (t - seg * tiles1) * BK;
    load_a.load(sa + stage * A_TILE, seg, k0);
    load_b.load(sb + stage * B_TILE, seg, k0);
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

  for (int kt = 0; kt < ntiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt landed for every thread; every warp is done with tile kt-1
    {
      int next = kt + STAGES - 1;
      if (next < ntiles) load_stage(next % STAGES, t_begin + next);
      cp_async_commit();
    }
    const bf16* ta = sa + (kt % STAGES) * A_TILE;
    const bf16* tb = sb + (kt % STAGES) * B_TILE;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4], bfr[NI / 2][4];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        if constexpr (A_KMAJOR) {
          int row = wm0 + i * 16 + (lane % 16), chunk = (kk >> 3) + lane / 16;
          ldmatrix_x4(af[i], smem_addr(ta + swizzle<BK / 8>(row, chunk)));
        } else {
          int k = kk + (lane % 8) + (lane / 16) * 8, m = wm0 + i * 16 + ((lane / 8) % 2) * 8;
          ldmatrix_x4_trans(af[i], smem_addr(ta + swizzle<BM / 8>(k, m >> 3)));
        }
      }
#pragma unroll
      for (int j = 0; j < NI / 2; ++j) {
        if constexpr (B_KMAJOR) {
          int n = wn0 + j * 16 + (lane % 8) + (lane / 16) * 8, chunk = (kk >> 3) + (lane / 8) % 2;
          ldmatrix_x4(bfr[j], smem_addr(tb + swizzle<BK / 8>(n, chunk)));
        } else {
          int k = kk + (lane % 8) + ((lane / 8) % 2) * 8, n = wn0 + j * 16 + (lane / 16) * 8;
          ldmatrix_x4_trans(bfr[j], smem_addr(tb + swizzle<BN / 8>(k, n >> 3)));
        }
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_bf16(acc[i][j], af[i], bfr[j / 2][(j % 2) * 2], bfr[j / 2][(j % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue through shared memory (free now): the fragments go to an f32 [BM][BN] tile whose
  // 8-column groups are XOR-swizzled by row (conflict-free fragment writes), then every thread
  // writes whole 8-column groups of C with 16-byte accesses, coalesced, in a compact loop.
  static_assert(BM * BN * 4 <= STAGES * (A_TILE + B_TILE) * 2, "the C tile must fit in the pipeline's shared memory");
  static_assert(BN >= 64, "the C tile swizzle needs 8 column groups per row");
  __syncthreads();  // every warp is done reading the last A/B tiles
  float* cs = reinterpret_cast<float*>(smem_raw);
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
  const bool atomic = gridDim.z > 1;
  auto aligned16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool fast = !atomic && aligned16(c) && ldc % 8 == 0 && (!r || (aligned16(r) && ldr % 8 == 0)) && (!bias || aligned16(bias));
  constexpr int GROUPS = BN / 8;
  for (int idx = threadIdx.x; idx < BM * GROUPS; idx += THREADS) {
    const int row = idx / GROUPS, col = (idx % GROUPS) * 8;
    const int m = m0 + row, n = n0 + col;
    if (m >= M || n >= N) continue;
    OutT* crow = c + (int64_t)m * ldc;
    const OutT* rrow = r ? r + (int64_t)m * ldr : nullptr;
    if (fast && n + 8 <= N) store8(crow, rrow, bias, n, cs + c_at(row, col), alpha);
    else store8_checked(crow, rrow, bias, n, N, cs + c_at(row, col), alpha, atomic);
  }
}

}  // namespace

#define GEMM_KERNEL(BM, BN, ST, LA, LB, AK, BKM, OUT, OUTT)                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS) gemm_##BM##x##BN##_##LA##LB##_##OUT(                              \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,   \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha, \
      int tiles_per_split) {                                                                                               \
    gemm_body<BM, BN, ST, AK, BKM, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r, ldr, M, N, alpha,   \
                                     tiles_per_split);                                                                     \
  }

// Pipeline depth per tile (src/ops/gemm.rs `stages` must agree): deeper for the small tiles, which
// run where few blocks share an SM and the loads' latency is what limits them.
#define GEMM_TILES(LA, LB, AK, BKM, OUT, OUTT)        \
  GEMM_KERNEL(128, 128, 4, LA, LB, AK, BKM, OUT, OUTT) \
  GEMM_KERNEL(128, 64, 6, LA, LB, AK, BKM, OUT, OUTT)  \
  GEMM_KERNEL(64, 64, 8, LA, LB, AK, BKM, OUT, OUTT)

GEMM_TILES(k, k, true, true, bf16, bf16)
GEMM_TILES(k, k, true, true, f32, float)
GEMM_TILES(k, n, true, false, bf16, bf16)
GEMM_TILES(k, n, true, false, f32, float)
GEMM_TILES(m, n, false, false, f32, float)

// Benchmark helper (src/bench/gemm.rs): keeps the GPU busy for `cycles` clock cycles so that the
// launches queued behind it are timed back to back, without the host's launch latency in between.
extern "C" __global__ void gemm_bench_spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
