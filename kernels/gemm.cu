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
//
// Machinery (sm_80 PTX, runs on Ampere/Ada/Hopper/Blackwell): BMxBNx32 block tiles, 4 warps (2x2),
// 4-stage cp.async.cg pipeline into XOR-swizzled shared memory (conflict-free ldmatrix), ldmatrix
// (.trans for the "m"/"n" layouts) feeding mma.sync.m16n8k16 bf16 -> f32. A segment whose pointer,
// leading dimension or contiguous extent is not a multiple of 8 elements (16 bytes) is loaded with
// bounds-checked scalar loads instead of cp.async (slower, same result): any M, N, K work.
#include "common.cuh"

namespace {

constexpr int BK = 32;
constexpr int STAGES = 4;
constexpr int THREADS = 128;

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Element offset of 16-byte chunk `chunk` of row `row` in a tile whose rows hold ROW_CHUNKS chunks.
// The XOR makes the 8 rows read by one ldmatrix phase land in 8 different bank groups.
template <int ROW_CHUNKS>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  static_assert(ROW_CHUNKS == 4 || ROW_CHUNKS % 8 == 0, "tile rows must be 64 B or a multiple of 128 B");
  if constexpr (ROW_CHUNKS == 4) return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
  else return row * (ROW_CHUNKS * 8) + ((chunk ^ (row & 7)) << 3);
}

// One operand's tile for one K step. K_MAJOR: the tile is [ROWS][BK] (k contiguous, layouts A "k" /
// B "k"); otherwise [BK][ROWS] (m or n contiguous, layouts A "m" / B "n"). `rows0` is the first m
// (or n) of the block, `extent` is M (or N), `k0` the first k inside the segment of length `klen`.
template <bool K_MAJOR, int ROWS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* __restrict__ g, int64_t ld, int rows0, int extent, int k0,
                                          int klen, bool vec) {
  constexpr int ROW_CHUNKS = K_MAJOR ? BK / 8 : ROWS / 8;
  constexpr int CHUNKS = ROWS * BK / 8;
  static_assert(CHUNKS % THREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int it = 0; it < CHUNKS / THREADS; ++it) {
    int c = it * THREADS + threadIdx.x;
    int row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS;
    // (mn, k) of the chunk's first element; the chunk runs along k (K_MAJOR) or along mn.
    int mn = K_MAJOR ? rows0 + row : rows0 + chunk * 8;
    int k = K_MAJOR ? k0 + chunk * 8 : k0 + row;
    const bf16* src = K_MAJOR ? g + (int64_t)mn * ld + k : g + (int64_t)k * ld + mn;
    bf16* dst = tile + swizzle<ROW_CHUNKS>(row, chunk);
    if (vec) {
      bool valid = mn < extent && k < klen;  // whole chunk in or out: extents are multiples of 8 here
      cp_async16(smem_addr(dst), valid ? src : g, valid);
    } else {
      alignas(16) bf16 v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        bool valid = K_MAJOR ? (mn < extent && k + e < klen) : (mn + e < extent && k < klen);
        v[e] = valid ? src[e] : __float2bfloat16_rn(0.0f);
      }
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* c, int64_t ldc, const OutT* r, int64_t ldr, const bf16* bias, int m, int n,
                                           int M, int N, float v0, float v1, bool atomic) {
  if (m >= M) return;
  float v[2] = {v0, v1};
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    int col = n + e;
    if (col >= N) continue;
    int64_t idx = (int64_t)m * ldc + col;
    if constexpr (sizeof(OutT) == 4) {
      if (atomic) {
        atomicAdd(reinterpret_cast<float*>(c) + idx, v[e]);
        continue;
      }
    }
    float out = v[e];
    if (bias) out += __bfloat162float(bias[col]);
    if (r) out += to_f32(r[(int64_t)m * ldr + col]);
    c[idx] = from_f32<OutT>(out);
  }
}

// The kernel body. A_KMAJOR: A layout "k" (else "m"); B_KMAJOR: B layout "k" (else "n").
template <int BM, int BN, bool A_KMAJOR, bool B_KMAJOR, typename OutT>
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
  const int tiles1 = (k1 + BK - 1) / BK, tiles2 = (k2 + BK - 1) / BK;
  const int t_begin = blockIdx.z * tiles_per_split;
  const int t_end = min(tiles1 + tiles2, t_begin + tiles_per_split);
  const int ntiles = max(0, t_end - t_begin);

  auto load_stage = [&](int stage, int t) {
    bool first = t < tiles1;  // which K segment the tile belongs to
    int k0 = (first ? t : t - tiles1) * BK, klen = first ? k1 : k2;
    load_tile<A_KMAJOR, BM>(sa + stage * A_TILE, first ? a1 : a2, first ? lda1 : lda2, m0, M, k0, klen, first ? vec_a1 : vec_a2);
    load_tile<B_KMAJOR, BN>(sb + stage * B_TILE, first ? b1 : b2, first ? ldb1 : ldb2, n0, N, k0, klen, first ? vec_b1 : vec_b2);
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
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

  const bool atomic = gridDim.z > 1;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      int m = m0 + wm0 + i * 16 + g, n = n0 + wn0 + j * 8 + 2 * t;
      store_pair(c, ldc, r, ldr, bias, m, n, M, N, alpha * acc[i][j][0], alpha * acc[i][j][1], atomic);
      store_pair(c, ldc, r, ldr, bias, m + 8, n, M, N, alpha * acc[i][j][2], alpha * acc[i][j][3], atomic);
    }
}

}  // namespace

#define GEMM_KERNEL(BM, BN, LA, LB, AK, BKM, OUT, OUTT)                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS) gemm_##BM##x##BN##_##LA##LB##_##OUT(                              \
      const bf16* a1, int64_t lda1, const bf16* b1, int64_t ldb1, int k1, const bf16* a2, int64_t lda2, const bf16* b2,   \
      int64_t ldb2, int k2, OUTT* c, int64_t ldc, const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha, \
      int tiles_per_split) {                                                                                               \
    gemm_body<BM, BN, AK, BKM, OUTT>(a1, lda1, b1, ldb1, k1, a2, lda2, b2, ldb2, k2, c, ldc, bias, r, ldr, M, N, alpha,   \
                                     tiles_per_split);                                                                     \
  }

#define GEMM_TILES(LA, LB, AK, BKM, OUT, OUTT)     \
  GEMM_KERNEL(128, 128, LA, LB, AK, BKM, OUT, OUTT) \
  GEMM_KERNEL(128, 64, LA, LB, AK, BKM, OUT, OUTT)  \
  GEMM_KERNEL(64, 64, LA, LB, AK, BKM, OUT, OUTT)

GEMM_TILES(k, k, true, true, bf16, bf16)
GEMM_TILES(k, k, true, true, f32, float)
GEMM_TILES(k, n, true, false, bf16, bf16)
GEMM_TILES(k, n, true, false, f32, float)
GEMM_TILES(m, n, false, false, f32, float)
