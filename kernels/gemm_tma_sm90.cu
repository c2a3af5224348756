// Hopper (sm_90a) bf16 GEMM, TMA-fed and warp-specialized: the gemm_sm90_tma_* kernels. Same contract,
// operand layouts and CPU twins as kernels/gemm_sm90.cu (see its header); shared pieces in
// kernels/gemm_sm90.cuh. Launcher: src/ops/gemm_sm90.rs (module gemm_tma_sm90).
#include "gemm_sm90.cuh"

namespace {

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

// gemm_sm90_tma_128x<BN>_s<STAGES>[_p]_k<B>_<out>: the TMA kernels (1-D grid, 288 threads; _p:
// persistent). src/ops/gemm_sm90.rs `SM90_TILES` must agree on the tile, stages, schedule and
// threads.
#define GEMM_SM90_TMA_KERNEL(BN, ST, SCHED, SUFFIX, MINB, LB, BKM, OUT, OUTT)                                                \
  extern "C" __global__ void __launch_bounds__(288, MINB) gemm_sm90_tma_128x##BN##_s##ST##SUFFIX##_k##LB##_##OUT(             \
      const __grid_constant__ TmaDesc ta1, const __grid_constant__ TmaDesc tb1, const __grid_constant__ TmaDesc ta2,            \
      const __grid_constant__ TmaDesc tb2, const __grid_constant__ TmaDesc tc, int k1, int k2, int c_tma, OUTT* c, int64_t ldc,  \
      const bf16* bias, const OUTT* r, int64_t ldr, int M, int N, float alpha) { await_previous_kernel();                       \
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
