// Flash attention (FlashAttention-2 style), bf16 in/out, f32 accumulation, tensor cores
// (mma.sync.m16n8k16 bf16, ldmatrix, cp.async: sm_80 PTX). CPU twins: attention_cpu and
// attention_backward_cpu in src/ops/attention.rs.
//
// Layout: Q [batch, q_len, ·], K/V [batch, kv_len, ·], O like Q, exactly as the linear layers
// produce them: head h of token i is the HD values at (b·len + i)·row_stride + h·HD. Separate q, k, v
// pointers with their own row strides, so a fused qkv buffer works unchanged. No transposes.
//
// Forward, per (batch b, head h), with scale s (1/sqrt(HD) by default):
//   S = s · Q Kᵀ (+ causal mask: key j > query i is −inf),   P = softmax_rows(S),   O = P V
//   lse_i = log Σ_j exp(S_ij)           saved as f32 [batch, heads, q_len] for the backward.
// Online softmax over key tiles of BN: running max m and sum l per row, O rescaled by exp(m_old−m_new),
// computed in the log2 domain (exp2 with s·log2 e folded in).
//
// Backward (no causal), with dO given:
//   D_i = Σ_d dO_id · O_id                      (attn_bwd_prep_*, also zeroes the f32 dQ accumulator)
//   P = exp(S − lse) recomputed,  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),
//   dQ = s · dS K (f32 atomics into dq_acc, then attn_bwd_cvt_*),  dK = s · dSᵀ Q.
// attn_bwd_dkdv_* runs one block per key tile (times a split of the query tiles when there are few key
// tiles); each warp owns 16 key rows and keeps their dK, dV in registers while it walks over the query
// tiles (computing Sᵀ = K Qᵀ, so no transpose is needed); dSᵀ goes through shared memory for dQ.
//
// Head dims: HD is a multiple of 8; the Q·Kᵀ contraction runs over DK = HD rounded up to 16 with
// zero-filled columns (head dim 40 is computed as 48), P·V only over the HD real columns.
// Kernels (HD = 40, 80, 160 UNet; 64 CLIP, forward only; 512 VAE, forward only):
//   attn_fwd_hd{40,64,80,160}_bf16, attn_fwd_hd512_bf16 (splits the output columns over blocks),
//   attn_bwd_prep_hd{40,80,160}_bf16, attn_bwd_dkdv_hd{40,80,160}_bf16, attn_bwd_cvt_hd{40,80,160}_bf16.
// Requirements (checked by the launcher): pointers 16-byte aligned, row strides multiples of 8, q_len
// and kv_len ≥ 1, causal only with q_len == kv_len.
#include "common.cuh"
#include "mma.cuh"

namespace {

constexpr float LOG2E = 1.4426950408889634f;

// Shared-memory row pitch (elements) for rows `w` wide: an odd number of 16-byte chunks, so the eight
// rows one ldmatrix reads fall in distinct bank groups.
__host__ __device__ constexpr int pitch_for(int w) { return (w / 8) % 2 ? w : w + 8; }

// 16-byte asynchronous copy global -> shared; `valid == false` writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4(r, smem_addr(p)); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldmatrix_x4_trans(r, smem_addr(p)); }
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x on the SFU (flushes denormals; 2^−inf = 0): one instruction instead of exp2f's range fix-ups.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// dst[0..1] += (a, b) with f32 atomics: one 8-byte vector reduction on sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Adds an m16n8 f32 accumulator tile with atomics into dst (row pitch `pitch`), skipping rows ≥ rows.
// mma layout: lane (g, t) holds columns 2t, 2t + 1 of its rows row0 (the tile's first row + g) and
// row0 + 8 in c[0..1] and c[2..3]. On sm_90 lanes t and t ^ 1 swap halves first, so that an even t
// holds row0's columns 2t..2t + 3 and an odd t row0 + 8's columns 2t − 2..2t + 1: one 16-byte
// vector reduction per lane instead of four scalar ones (dst must be 16-byte aligned, the pitch a
// multiple of 4). Every lane of the warp calls it (the swap is a shuffle).
__device__ __forceinline__ void add_mma_tile_f32(float* dst, int64_t pitch, int row0, int rows, int t, const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool odd = t & 1;
  const float r0 = __shfl_xor_sync(0xffffffff, odd ? c[0] : c[2], 1), r1 = __shfl_xor_sync(0xffffffff, odd ? c[1] : c[3], 1);
  const int row = odd ? row0 + 8 : row0;
  const float4 v = odd ? make_float4(r0, r1, c[2], c[3]) : make_float4(c[0], c[1], r0, r1);
  if (row < rows)
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst + (int64_t)row * pitch + 2 * (t & ~1)), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
#else
  if (row0 < rows) atomic_add2(dst + (int64_t)row0 * pitch + 2 * t, c[0], c[1]);
  if (row0 + 8 < rows) atomic_add2(dst + (int64_t)(row0 + 8) * pitch + 2 * t, c[2], c[3]);
#endif
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Loads `rows` rows of `chunks` 16-byte chunks (8 bf16 each) into shared memory with row pitch
// `pitch` elements. Chunk c of row r is real data when r < valid_rows and c < real_chunks, else zero.
template <int THREADS>
__device__ __forceinline__ void load_tile(bf16* dst, int pitch, const bf16* src, int64_t row_stride, int rows, int chunks,
                                          int valid_rows, int real_chunks) {
  for (int i = threadIdx.x; i < rows * chunks; i += THREADS) {
    int r = i / chunks, c = i % chunks;
    bool ok = r < valid_rows && c < real_chunks;
    const bf16* s = ok ? src + (int64_t)r * row_stride + c * 8 : src;
    cp_async16(dst + r * pitch + c * 8, s, ok);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Forward. A block holds BM = 16·MT·NW query rows (warp w: MT row tiles of 16 from 16·MT·w, so each
// K/V fragment loaded from shared memory feeds MT mma's) and walks over key tiles of BN rows,
// STAGES-deep cp.async pipeline. Output columns [chunk·DVC, (chunk+1)·DVC) per block (DVC = HD except
// for the 512-wide VAE head, which is split over 4 blocks).
// ------------------------------------------------------------------------------------------------
template <int HD, int DVC, int NW, int MT, int BN, int STAGES>
__device__ __forceinline__ void attn_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         bf16* __restrict__ o, float* __restrict__ lse, int64_t q_stride, int64_t k_stride,
                                         int64_t v_stride, int64_t o_stride, int q_len, int kv_len, int heads, float scale,
                                         int causal) {
  constexpr int DK = (HD + 15) / 16 * 16;  // contraction width of Q·Kᵀ
  constexpr int WM = 16 * MT;               // query rows per warp
  constexpr int BM = WM * NW;
  constexpr int PQ = pitch_for(DK);   // smem pitch (elements) of Q and K rows
  constexpr int PV = pitch_for(DVC);  // smem pitch of V rows
  constexpr int NTS = BN / 8;  // n-tiles of S per row tile
  constexpr int NTO = DVC / 8; // n-tiles of O per row tile
  static_assert(HD % 8 == 0 && DVC % 8 == 0 && BN % 16 == 0 && HD % DVC == 0, "tile shape");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * PQ;
  bf16* sV = sK + STAGES * BN * PQ;

  const int chunks = HD / DVC;
  const int head = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int b = blockIdx.z;
  const int q0 = blockIdx.x * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4, mat = lane / 8;

  const bf16* qb = q + ((int64_t)b * q_len + q0) * q_stride + head * HD;
  const bf16* kb = k + (int64_t)b * kv_len * k_stride + head * HD;
  const bf16* vb = v + (int64_t)b * kv_len * v_stride + head * HD + chunk * DVC;

  load_tile<32 * NW>(sQ, PQ, qb, q_stride, BM, DK / 8, q_len - q0, HD / 8);
  int n_tiles = (kv_len + BN - 1) / BN;
  if (causal) n_tiles = min(n_tiles, (q0 + BM - 1) / BN + 1);
  auto load_kv = [&](int j, int stage) {
    int valid = kv_len - j * BN;
    load_tile<32 * NW>(sK + stage * BN * PQ, PQ, kb + (int64_t)j * BN * k_stride, k_stride, BN, DK / 8, valid, HD / 8);
    load_tile<32 * NW>(sV + stage * BN * PV, PV, vb + (int64_t)j * BN * v_stride, v_stride, BN, DVC / 8, valid, DVC / 8);
  };
  load_kv(0, 0);
  cp_async_commit();

  const float sl2 = scale * LOG2E;  // scores are kept raw; exp2(s·sl2 − max·sl2) is one FFMA + EX2
  float acc[MT][NTO][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int i = 0; i < NTO; i++) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  const int wrow0 = q0 + warp * WM;  // first query row of this warp
  const bf16* sQw = sQ + warp * WM * PQ;

  for (int j = 0; j < n_tiles; j++) {
    if (STAGES == 2) {
      if (j + 1 < n_tiles) load_kv(j + 1, (j + 1) % 2);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* sKs = sK + (j % STAGES) * BN * PQ;
    const bf16* sVs = sV + (j % STAGES) * BN * PV;

    // S = Q Kᵀ for this warp's WM rows × BN keys
    float s[MT][NTS][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int i = 0; i < NTS; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) ldsm_x4(a[mt], sQw + (mt * 16 + lane % 16) * PQ + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < NTS; n += 2) {
        uint32_t bq[4];
        ldsm_x4(bq, sKs + (n * 8 + lane % 8 + (mat / 2) * 8) * PQ + kk * 16 + (mat % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_bf16(s[mt][n], a[mt], bq[0], bq[1]);
          mma_bf16(s[mt][n + 1], a[mt], bq[2], bq[3]);
        }
      }
    }

    // mask keys past kv_len (and, causal, keys after the query) on the tiles that need it
    const int key0 = j * BN;
    if (key0 + BN > kv_len || (causal && key0 + BN - 1 > wrow0)) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < NTS; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            int key = key0 + n * 8 + 2 * t + (e & 1);
            int row = wrow0 + mt * 16 + g + (e >> 1) * 8;
            if (key >= kv_len || (causal && key > row)) s[mt][n][e] = -INFINITY;
          }
    }
    // online softmax: new running max, rescale O and l, P = exp2(s·sl2 − max·sl2)
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int n = 0; n < NTS; n++) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][n][0], s[mt][n][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][n][2], s[mt][n][3]));
      }
      float corr[2], base[2];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        mx[r] = quad_max(mx[r]);
        base[r] = mx[r] == -INFINITY ? 0.f : mx[r] * sl2;
        corr[r] = fast_exp2(m[mt][r] * sl2 - base[r]);  // m = −inf before the first key: corr = 0
        m[mt][r] = mx[r];
      }
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < NTS; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float p = fast_exp2(fmaf(s[mt][n][e], sl2, -base[e >> 1]));
          s[mt][n][e] = p;
          rs[e >> 1] += p;
        }
      }
      // l keeps this thread's partial row sums (its columns); the quad is summed at the end
      l[mt][0] = l[mt][0] * corr[0] + rs[0];
      l[mt][1] = l[mt][1] * corr[1] + rs[1];
#pragma unroll
      for (int i = 0; i < NTO; i++) {
        acc[mt][i][0] *= corr[0];
        acc[mt][i][1] *= corr[0];
        acc[mt][i][2] *= corr[1];
        acc[mt][i][3] *= corr[1];
      }
    }

    // O += P V (P straight from the S accumulators: the C layout of two n-tiles is the A layout)
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      const bf16* vrow = sVs + (kk * 16 + lane % 8 + (mat % 2) * 8) * PV;
#pragma unroll
      for (int n = 0; n + 1 < NTO; n += 2) {
        uint32_t bv[4];
        ldsm_x4_t(bv, vrow + n * 8 + (mat / 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_bf16(acc[mt][n], a[mt], bv[0], bv[1]);
          mma_bf16(acc[mt][n + 1], a[mt], bv[2], bv[3]);
        }
      }
      if (NTO % 2) {
        uint32_t bv[2];
        ldsm_x2_t(bv, vrow + (NTO - 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) mma_bf16(acc[mt][NTO - 1], a[mt], bv[0], bv[1]);
      }
    }
    __syncthreads();  // the stage read here is refilled next iteration
    if (STAGES == 1 && j + 1 < n_tiles) {
      load_kv(j + 1, 0);
      cp_async_commit();
    }
  }

  // epilogue: O /= l, staged through this warp's rows of sQ for 16-byte stores; lse
  bf16* stage = sQ + warp * WM * PQ;  // only this warp read these rows; the loop ended with a barrier
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      l[mt][r] = quad_sum(l[mt][r]);
      inv[r] = l[mt][r] > 0.f ? 1.f / l[mt][r] : 0.f;
    }
#pragma unroll
    for (int n = 0; n < NTO; n++) {
      *reinterpret_cast<uint32_t*>(stage + (mt * 16 + g) * PQ + n * 8 + 2 * t) = pack_bf16(acc[mt][n][0] * inv[0], acc[mt][n][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(stage + (mt * 16 + g + 8) * PQ + n * 8 + 2 * t) = pack_bf16(acc[mt][n][2] * inv[1], acc[mt][n][3] * inv[1]);
    }
    if (lse != nullptr && chunk == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; r++) {
        int row = wrow0 + mt * 16 + g + r * 8;
        if (row < q_len) lse[((int64_t)b * heads + head) * q_len + row] = m[mt][r] == -INFINITY ? -INFINITY : m[mt][r] * scale + logf(l[mt][r]);
      }
    }
  }
  __syncwarp();
  bf16* ob = o + (int64_t)b * q_len * o_stride + head * HD + chunk * DVC;
  for (int i = lane; i < WM * NTO; i += 32) {
    int r = i / NTO, c = i % NTO;
    int row = wrow0 + r;
    if (row < q_len) *reinterpret_cast<uint4*>(ob + (int64_t)row * o_stride + c * 8) = *reinterpret_cast<const uint4*>(stage + r * PQ + c * 8);
  }
}

#define ATTN_FWD(NAME, HD, DVC, NW, MT, BN, STAGES)                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * NW) NAME(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, \
                                                             int64_t q_stride, int64_t k_stride, int64_t v_stride,          \
                                                             int64_t o_stride, int q_len, int kv_len, int heads, float scale, \
                                                             int causal) { await_previous_kernel();                           \
    attn_fwd<HD, DVC, NW, MT, BN, STAGES>(q, k, v, o, lse, q_stride, k_stride, v_stride, o_stride, q_len, kv_len, heads, scale,  \
                                      causal);                                                                                \
  }
// Launch configurations (must match fwd_cfg in src/ops/attention.rs): NW warps of MT row tiles, BN keys
// per tile, STAGES-deep K/V pipeline.
ATTN_FWD(attn_fwd_hd40_bf16, 40, 40, 4, 2, 64, 2)
ATTN_FWD(attn_fwd_hd64_bf16, 64, 64, 4, 1, 64, 2)
ATTN_FWD(attn_fwd_hd80_bf16, 80, 80, 4, 1, 64, 2)
ATTN_FWD(attn_fwd_hd160_bf16, 160, 160, 4, 1, 32, 2)
ATTN_FWD(attn_fwd_hd512_bf16, 512, 128, 2, 1, 32, 1)

// ------------------------------------------------------------------------------------------------
// Backward, step 1: D[b, h, i] = Σ_d dO·O (f32), and dq_acc (f32 [batch, q_len, heads·HD]) zeroed.
// One thread per 8-value chunk of a (b, i, h) row: blocks of ⌊256 / (HD/8)⌋ rows × HD/8 threads (at
// most 256; src/ops/attention.rs); each thread zeroes its chunk of dq_acc and leaves its partial sum
// in shared memory, and the row's first thread adds the HD/8 partials in chunk order.
// ------------------------------------------------------------------------------------------------
template <int HD>
__device__ __forceinline__ void attn_bwd_prep(const bf16* __restrict__ o, const bf16* __restrict__ dout, float* __restrict__ dvec,
                                              float* __restrict__ dq_acc, int64_t o_stride, int64_t do_stride, int batch,
                                              int q_len, int heads) {
  constexpr int C = HD / 8;
  __shared__ float part[256];
  const int r = threadIdx.x / C, c = threadIdx.x % C;
  const int64_t idx = (int64_t)blockIdx.x * (blockDim.x / C) + r;  // (b·q_len + i)·heads + h
  const bool live = idx < (int64_t)batch * q_len * heads;
  if (live) {
    const int h = idx % heads;
    const int64_t bi = idx / heads;  // b·q_len + i
    const uint4 ov = *reinterpret_cast<const uint4*>(o + bi * o_stride + h * HD + c * 8);
    const uint4 dv = *reinterpret_cast<const uint4*>(dout + bi * do_stride + h * HD + c * 8);
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
    const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float2 a = __bfloat1622float2(o2[e]), bb = __bfloat1622float2(d2[e]);
      sum += a.x * bb.x + a.y * bb.y;
    }
    part[threadIdx.x] = sum;
    float* qa = dq_acc + bi * heads * HD + h * HD + c * 8;
    *reinterpret_cast<float4*>(qa) = make_float4(0.f, 0.f, 0.f, 0.f);
    *reinterpret_cast<float4*>(qa + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
  if (live && c == 0) {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < C; j++) sum += part[threadIdx.x + j];
    const int h = idx % heads;
    const int64_t bi = idx / heads, b = bi / q_len, i = bi % q_len;
    dvec[(b * heads + h) * q_len + i] = sum;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, step 3: out (bf16, row stride out_stride) = scale · acc (f32 [batch, len, heads·HD]):
// dQ from dq_acc, and dK, dV from dk_acc, dv_acc when the query tiles were split — one launch,
// job blockIdx.y of the `count` given.
struct CvtJob {
  const float* acc;
  bf16* out;
  int64_t out_stride;
  int len;
  float scale;
};
struct CvtJobs {
  CvtJob job[3];
};
static_assert(sizeof(CvtJobs) == 96, "the layout src/ops/attention.rs writes");

template <int HD>
__device__ __forceinline__ void attn_bwd_cvt(const CvtJob& j, int batch, int heads) {
  int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // one thread per 8 values
  constexpr int C = HD / 8;
  if (idx >= (int64_t)batch * j.len * heads * C) return;
  int64_t bi = idx / (heads * C);
  int col = (idx % (heads * C)) * 8;
  const float* src = j.acc + bi * heads * HD + col;
  const float scale = j.scale;
  float4 x = *reinterpret_cast<const float4*>(src), y = *reinterpret_cast<const float4*>(src + 4);
  uint4 out = make_uint4(pack_bf16(x.x * scale, x.y * scale), pack_bf16(x.z * scale, x.w * scale), pack_bf16(y.x * scale, y.y * scale),
                         pack_bf16(y.z * scale, y.w * scale));
  *reinterpret_cast<uint4*>(j.out + bi * j.out_stride + col) = out;
}

// ------------------------------------------------------------------------------------------------
// Backward, step 2: one block per (key tile of BN = 16·NW rows, split, head, batch). Warp w owns key
// rows 16w..16w+15. The query tiles are split over `splits` blocks when there are few key tiles
// (cross-attention: 77 keys); then dK, dV are summed with f32 atomics into dk_acc, dv_acc and converted
// by attn_bwd_cvt_*. For each query tile of BM rows (double-buffered Q, dO, lse, D):
//   Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·s·log2e − lse·log2e), dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D),
//   dK += dSᵀ Q, dSᵀ → smem (bf16), dQ_tile += dS K (warps split the query rows) → atomics.
// ------------------------------------------------------------------------------------------------
template <int HD, int NW, int BM>
__device__ __forceinline__ void attn_bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                              const bf16* __restrict__ dout, const float* __restrict__ lse,
                                              const float* __restrict__ dvec, float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                              bf16* __restrict__ dv, float* __restrict__ dk_acc, float* __restrict__ dv_acc,
                                              int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t do_stride,
                                              int64_t dk_stride, int64_t dv_stride, int q_len, int kv_len, int heads, float scale,
                                              int splits) {
  constexpr int DK = (HD + 15) / 16 * 16;
  constexpr int BN = 16 * NW;
  constexpr int P = pitch_for(DK);   // pitch of K, V, Q, dO rows in smem
  constexpr int PS = pitch_for(BM);  // pitch of dSᵀ rows
  constexpr int NTQ = BM / 8;  // n-tiles of Sᵀ (query columns)
  constexpr int NTD = HD / 8;  // n-tiles of dK / dV / dQ (real head columns)
  constexpr int THREADS = 32 * NW;
  constexpr int CG = NW * 16 > BM ? NW * 16 / BM : 1;  // column groups of the dQ product
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);
  bf16* sV = sK + BN * P;
  bf16* sQ = sV + BN * P;           // [2][BM][P]
  bf16* sdO = sQ + 2 * BM * P;      // [2][BM][P]
  bf16* sdS = sdO + 2 * BM * P;     // [BN][PS]
  float* sL = reinterpret_cast<float*>(sdS + BN * PS);  // [2][BM] lse
  float* sD = sL + 2 * BM;          // [2][BM]

  const int head = blockIdx.y, b = blockIdx.z;
  const int k0 = (blockIdx.x / splits) * BN, split = blockIdx.x % splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4, mat = lane / 8;

  const bf16* qb = q + (int64_t)b * q_len * q_stride + head * HD;
  const bf16* dob = dout + (int64_t)b * q_len * do_stride + head * HD;
  const float* lb = lse + ((int64_t)b * heads + head) * q_len;
  const float* db = dvec + ((int64_t)b * heads + head) * q_len;
  float* dqb = dq_acc + (int64_t)b * q_len * heads * HD + head * HD;

  load_tile<THREADS>(sK, P, k + ((int64_t)b * kv_len + k0) * k_stride + head * HD, k_stride, BN, DK / 8, kv_len - k0, HD / 8);
  load_tile<THREADS>(sV, P, v + ((int64_t)b * kv_len + k0) * v_stride + head * HD, v_stride, BN, DK / 8, kv_len - k0, HD / 8);
  auto load_q = [&](int i, int stage) {
    int i0 = i * BM, valid = q_len - i0;
    load_tile<THREADS>(sQ + stage * BM * P, P, qb + (int64_t)i0 * q_stride, q_stride, BM, DK / 8, valid, HD / 8);
    load_tile<THREADS>(sdO + stage * BM * P, P, dob + (int64_t)i0 * do_stride, do_stride, BM, DK / 8, valid, HD / 8);
    for (int r = threadIdx.x; r < BM; r += THREADS) {
      bool ok = r < valid;
      cp_async4(sL + stage * BM + r, ok ? lb + i0 + r : lb, ok);
      cp_async4(sD + stage * BM + r, ok ? db + i0 + r : db, ok);
    }
  };
  const int n_q = (q_len + BM - 1) / BM, per = (n_q + splits - 1) / splits;
  const int i_begin = split * per, i_end = min(n_q, i_begin + per);
  load_q(i_begin, 0);
  cp_async_commit();

  const float sl2 = scale * LOG2E;
  float dk_r[NTD][4], dv_r[NTD][4];
#pragma unroll
  for (int i = 0; i < NTD; i++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk_r[i][e] = dv_r[i][e] = 0.f;
  const bf16* sKw = sK + warp * 16 * P;
  const bf16* sVw = sV + warp * 16 * P;
  const int key_row0 = k0 + warp * 16 + g;  // this thread's key rows: key_row0, key_row0 + 8

  for (int i = i_begin; i < i_end; i++) {
    const int st = (i - i_begin) % 2;
    if (i + 1 < i_end) load_q(i + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* sQs = sQ + st * BM * P;
    const bf16* sdOs = sdO + st * BM * P;
    const float* sLs = sL + st * BM;
    const float* sDs = sD + st * BM;
    const int i0 = i * BM;

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (16 key rows × BM query columns per warp)
    float s[NTQ][4], dp[NTQ][4];
#pragma unroll
    for (int n = 0; n < NTQ; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sKw + (lane % 16) * P + kk * 16 + (lane / 16) * 8);
      ldsm_x4(av, sVw + (lane % 16) * P + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < NTQ; n += 2) {
        uint32_t bq[4], bo[4];
        int off = (n * 8 + lane % 8 + (mat / 2) * 8) * P + kk * 16 + (mat % 2) * 8;
        ldsm_x4(bq, sQs + off);
        ldsm_x4(bo, sdOs + off);
        mma_bf16(s[n], ak, bq[0], bq[1]);
        mma_bf16(s[n + 1], ak, bq[2], bq[3]);
        mma_bf16(dp[n], av, bo[0], bo[1]);
        mma_bf16(dp[n + 1], av, bo[2], bo[3]);
      }
    }
    // Pᵀ = exp2(Sᵀ·s·log2e − lse·log2e) and dSᵀ = Pᵀ∘(dPᵀ − D); lse and D of columns 2t, 2t+1 as pairs
#pragma unroll
    for (int n = 0; n < NTQ; n++) {
      float2 lc = *reinterpret_cast<const float2*>(sLs + n * 8 + 2 * t);
      float2 dc = *reinterpret_cast<const float2*>(sDs + n * 8 + 2 * t);
      s[n][0] = fast_exp2(fmaf(s[n][0], sl2, -lc.x * LOG2E));
      s[n][1] = fast_exp2(fmaf(s[n][1], sl2, -lc.y * LOG2E));
      s[n][2] = fast_exp2(fmaf(s[n][2], sl2, -lc.x * LOG2E));
      s[n][3] = fast_exp2(fmaf(s[n][3], sl2, -lc.y * LOG2E));
      if (i0 + BM > q_len || k0 + BN > kv_len) {  // query columns past q_len, key rows past kv_len: P = 0
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (i0 + n * 8 + 2 * t + (e & 1) >= q_len || key_row0 + (e >> 1) * 8 >= kv_len) s[n][e] = 0.f;
      }
      dp[n][0] = s[n][0] * (dp[n][0] - dc.x);
      dp[n][1] = s[n][1] * (dp[n][1] - dc.y);
      dp[n][2] = s[n][2] * (dp[n][2] - dc.x);
      dp[n][3] = s[n][3] * (dp[n][3] - dc.y);
    }
    // dV += Pᵀ dO and dK += dSᵀ Q (B operands: dO and Q rows, transposed by ldmatrix)
#pragma unroll
    for (int kk = 0; kk < BM / 16; kk++) {
      uint32_t ap[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      uint32_t as[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                        pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
      const int rowoff = (kk * 16 + lane % 8 + (mat % 2) * 8) * P;
#pragma unroll
      for (int n = 0; n + 1 < NTD; n += 2) {
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, sdOs + rowoff + n * 8 + (mat / 2) * 8);
        ldsm_x4_t(bq, sQs + rowoff + n * 8 + (mat / 2) * 8);
        mma_bf16(dv_r[n], ap, bo[0], bo[1]);
        mma_bf16(dv_r[n + 1], ap, bo[2], bo[3]);
        mma_bf16(dk_r[n], as, bq[0], bq[1]);
        mma_bf16(dk_r[n + 1], as, bq[2], bq[3]);
      }
      if (NTD % 2) {
        uint32_t bo[2], bq[2];
        ldsm_x2_t(bo, sdOs + rowoff + (NTD - 1) * 8);
        ldsm_x2_t(bq, sQs + rowoff + (NTD - 1) * 8);
        mma_bf16(dv_r[NTD - 1], ap, bo[0], bo[1]);
        mma_bf16(dk_r[NTD - 1], as, bq[0], bq[1]);
      }
      // dSᵀ rows of this warp into smem for the dQ product
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * PS + kk * 16 + 2 * t) = as[0];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * PS + kk * 16 + 2 * t) = as[1];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * PS + kk * 16 + 8 + 2 * t) = as[2];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * PS + kk * 16 + 8 + 2 * t) = as[3];
    }
    __syncthreads();
    // dQ tile (BM × HD) += dS K. Work items: (16-row block rb, column group cg); with more warps than
    // row blocks (NW = 8, BM = 64) the n-tile pairs of a row block are dealt over CG = NW·16/BM groups.
    // A = dS from dSᵀ via ldmatrix.trans; B = K rows, transposed.
    for (int item = warp; item < (BM / 16) * CG; item += NW) {
      const int rb = item % (BM / 16), cg = item / (BM / 16);
      float dq[NTD][4];
#pragma unroll
      for (int n = 0; n < NTD; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; kk++) {
        uint32_t a[4];
        // matrices: (q 0-7, key 0-7), (q 8-15, key 0-7), (q 0-7, key 8-15), (q 8-15, key 8-15)
        ldsm_x4_t(a, sdS + (kk * 16 + lane % 8 + (mat / 2) * 8) * PS + rb * 16 + (mat % 2) * 8);
        const int rowoff = (kk * 16 + lane % 8 + (mat % 2) * 8) * P;
#pragma unroll
        for (int n = 0; n + 1 < NTD; n += 2) {
          if ((n / 2) % CG != cg) continue;
          uint32_t bk[4];
          ldsm_x4_t(bk, sK + rowoff + n * 8 + (mat / 2) * 8);
          mma_bf16(dq[n], a, bk[0], bk[1]);
          mma_bf16(dq[n + 1], a, bk[2], bk[3]);
        }
        if (NTD % 2 && (NTD / 2) % CG == cg) {
          uint32_t bk[2];
          ldsm_x2_t(bk, sK + rowoff + (NTD - 1) * 8);
          mma_bf16(dq[NTD - 1], a, bk[0], bk[1]);
        }
      }
      const int qr = i0 + rb * 16 + g;
#pragma unroll
      for (int n = 0; n < NTD; n++) {
        if ((n / 2) % CG != cg) continue;
        add_mma_tile_f32(dqb + n * 8, (int64_t)heads * HD, qr, q_len, t, dq[n]);
      }
    }
    __syncthreads();  // sdS and this stage are overwritten next iteration
  }

  // dK = s·Σ dSᵀQ, dV = Σ PᵀdO: bf16x2 stores straight from the registers, or f32 atomics when split
  const int64_t kvrow = (int64_t)b * kv_len;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int row = key_row0 + r * 8;
    if (row >= kv_len) continue;
#pragma unroll
    for (int n = 0; n < NTD; n++) {
      int col = head * HD + n * 8 + 2 * t;
      if (splits == 1) {
        *reinterpret_cast<uint32_t*>(dk + (kvrow + row) * dk_stride + col) = pack_bf16(dk_r[n][2 * r] * scale, dk_r[n][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv + (kvrow + row) * dv_stride + col) = pack_bf16(dv_r[n][2 * r], dv_r[n][2 * r + 1]);
      } else {
        atomic_add2(dk_acc + (kvrow + row) * heads * HD + col, dk_r[n][2 * r], dk_r[n][2 * r + 1]);
        atomic_add2(dv_acc + (kvrow + row) * heads * HD + col, dv_r[n][2 * r], dv_r[n][2 * r + 1]);
      }
    }
  }
}

#define ATTN_BWD_SMALL(HD)                                                                                                      \
  extern "C" __global__ void attn_bwd_prep_hd##HD##_bf16(const bf16* o, const bf16* dout, float* dvec, float* dq_acc,           \
                                                         int64_t o_stride, int64_t do_stride, int batch, int q_len, int heads) { await_previous_kernel(); \
    attn_bwd_prep<HD>(o, dout, dvec, dq_acc, o_stride, do_stride, batch, q_len, heads);                                         \
  }                                                                                                                             \
  extern "C" __global__ void attn_bwd_cvt_hd##HD##_bf16(const __grid_constant__ CvtJobs jobs, int batch, int heads) { await_previous_kernel(); \
    attn_bwd_cvt<HD>(jobs.job[blockIdx.y], batch, heads);                                                                       \
  }
#define ATTN_BWD_DKDV(NAME, HD, NW, BM, MINB)                                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB) NAME(                                                             \
      const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dvec, float* dq_acc,         \
      bf16* dk, bf16* dv, float* dk_acc, float* dv_acc, int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t do_stride, \
      int64_t dk_stride, int64_t dv_stride, int q_len, int kv_len, int heads, float scale, int splits) { await_previous_kernel(); \
    attn_bwd_dkdv<HD, NW, BM>(q, k, v, dout, lse, dvec, dq_acc, dk, dv, dk_acc, dv_acc, q_stride, k_stride, v_stride, do_stride, \
                              dk_stride, dv_stride, q_len, kv_len, heads, scale, splits);                                       \
  }
ATTN_BWD_SMALL(40)
ATTN_BWD_SMALL(80)
ATTN_BWD_SMALL(160)
// Launch configurations (must match bwd_cfg in src/ops/attention.rs): NW warps (BN = 16·NW keys), BM
// queries per tile, MINB blocks per SM asked of the register allocator.
// Head dim 40: 8 warps (128 keys per block halves the dQ atomics) held to 128 registers, 2 blocks/SM.
ATTN_BWD_DKDV(attn_bwd_dkdv_hd40_bf16, 40, 8, 64, 2)
ATTN_BWD_DKDV(attn_bwd_dkdv_hd80_bf16, 80, 4, 64, 1)
ATTN_BWD_DKDV(attn_bwd_dkdv_hd160_bf16, 160, 2, 32, 1)
