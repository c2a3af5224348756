// Implicit-GEMM 2-D convolutions on NHWC bf16 activations, forward and input gradient, with
// tensor cores (mma.sync.m16n8k16 bf16 -> f32, ldmatrix, 3-stage cp.async pipeline with 64-wide
// k-tiles; sm_80 PTX). Tiles 128×128 (8 warps), 128×64 and 64×64 (4 warps); split-K over
// blockIdx.z with an f32 workspace and conv2d_splitk_reduce_bf16 for small GEMMs.
// CPU twins: src/ops/conv.rs (conv2d_cpu, conv2d_backward_input_cpu, upsample2x_nearest_cpu, ...).
//
// Layouts: x [batch, H, W, Cin] (NHWC), weights w [Cout, ks, ks, Cin] (OIHW reordered to OHWI at
// load), y [batch, Ho, Wo, Cout], Ho = (Hin + 2·pad − ks)/stride + 1. Square kernels (ks = 1 or 3).
//
// Forward  y[n,oh,ow,co] = bias[co] + res[n,oh,ow,co]
//                          + Σ_{r,c,ci} X[n, oh·s − pad + r, ow·s − pad + c, ci] · w[co,r,c,ci]
//   as a GEMM: M = batch·Ho·Wo output pixels, N = Cout, K = ks·ks·Cin, A[m,k] gathered from x
//   (zero outside the image), B[n,k] = w viewed as [Cout, K] (K contiguous).
//   X is x, or (up = 1) the nearest-2× upsample of x: X[n,i,j,:] = x[n,i/2,j/2,:] (Hin = 2H),
//   and the input channels may come from two tensors: ci < C1 from x1 [.., C1], else x2 [.., C2]
//   (the up blocks' concat(h, skip), never materialized).
//
// Input gradient (weights frozen: no weight gradient)
//   dX[n,h,w,ci] = Σ_{r,c,co : oh = (h + pad − r)/s, ow = (w + pad − c)/s exact and in range}
//                  dy[n,oh,ow,co] · w[co,r,c,ci]
//   as a GEMM: N = Cin, B[n=ci, k=(tap,co)] = w[co,tap,ci] (read transposed with ldmatrix.trans),
//   A[m,k] gathered from dy. Stride s > 1 is split into s² parity classes (blockIdx.z = (h mod s,
//   w mod s)): each class only visits its own taps (stride 2, 3×3: 1, 2, 2 and 4 taps), no zeros.
//   up = 1 (upsample fused into the forward): dx[n,h,w] = Σ_{a,b∈{0,1}} dX[n,2h+a,2w+b], done as
//   one GEMM over K = 4·ks·ks·Cout with A[m,(a,b,r,c,co)] = dy[n, 2h+a+pad−r, 2w+b+pad−c, co].
//   Channel split: columns ci < C1 go to dx1 [.., C1], the rest to dx2 [.., C2].
//
// Vector paths ("_vec") need the reduced channel count (Cin forward, Cout backward) and, forward
// with two sources, C1 multiples of BK = 64 (a k-tile lies in one tap and one tensor); the
// "_scalar" kernels gather element by element for any channel count (conv_in's 4 input
// channels, conv_out's 4 output channels, odd test sizes). Cout (forward) and C1, C2 must be even
// (bf16x2 stores). f32 accumulation, bf16 output.
#include "common.cuh"
#include "mma.cuh"

namespace {

constexpr int BK = 64;      // K per pipeline stage (four mma k-steps)
constexpr int CPR = BK / 8; // 16-byte chunks per [rows][BK] tile row
constexpr int STAGES = 3;

struct Geom {
  int batch, H, W, C1, C2, Cin, Ho, Wo, Cout, ks, stride, pad, up;
};

// src-size 0: the 16 bytes are zero-filled. CA caches in L1 (the activations, re-read by
// neighbouring taps), otherwise L2 only (the weights).
template <bool CA> __device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  if (CA) asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
  else asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// Shared-memory tiles, XOR-swizzled so ldmatrix reads are bank-conflict free.
// [rows][BK] (A, and B of the forward): 128-byte rows of eight 16-byte chunks.
__device__ __forceinline__ int off_rowk(int row, int chunk) { return row * BK + ((chunk ^ (row & 7)) << 3); }
// [BK][BN] (B of the input gradient, n contiguous).
template <int BN> __device__ __forceinline__ int off_kn(int krow, int nchunk) { return krow * BN + ((nchunk ^ (krow & 7)) << 3); }

// One tap of the input gradient: dy row/col = (per-pixel base) + (dh, dw); weight tap index.
struct Tap { int dh, dw, wtap; };
__device__ __forceinline__ Tap bwd_tap(const Geom& g, int t, int r0, int c0, int nc) {
  if (g.up) {  // t = ((a·2 + b)·ks + r)·ks + c
    int c = t % g.ks, r = (t / g.ks) % g.ks, ab = t / (g.ks * g.ks);
    return {(ab >> 1) - r, (ab & 1) - c, r * g.ks + c};
  }
  int ri = t / nc, cj = t % nc;
  return {-ri, -cj, (r0 + g.stride * ri) * g.ks + c0 + g.stride * cj};
}

// The parity class of blockIdx.z for the input gradient: pixels h = py + s·h', w = px + s·w'.
struct Klass {
  int py, px, Hc, Wc, M, r0, c0, nc, T;
};
__device__ __forceinline__ Klass make_class(const Geom& g, int z) {
  Klass k;
  int s = g.up ? 1 : g.stride;
  k.py = z / s; k.px = z % s;
  k.Hc = (g.H - k.py + s - 1) / s; k.Wc = (g.W - k.px + s - 1) / s;
  k.M = k.Hc > 0 && k.Wc > 0 ? g.batch * k.Hc * k.Wc : 0;
  k.r0 = (k.py + g.pad) % s; k.c0 = (k.px + g.pad) % s;
  int nr = (g.ks - k.r0 + s - 1) / s;
  k.nc = (g.ks - k.c0 + s - 1) / s;
  k.T = g.up ? 4 * g.ks * g.ks : nr * k.nc;
  return k;
}

// Element gathers for the scalar kernels (any channel count). Zero outside the image / matrix.
__device__ __forceinline__ bf16 fwd_a_elem(const Geom& g, const bf16* x1, const bf16* x2, int img, int ih0, int iw0, int k, int K) {
  if (img < 0 || k >= K) return __float2bfloat16_rn(0.f);
  int tap = k / g.Cin, ci = k % g.Cin;
  int ih = ih0 + tap / g.ks, iw = iw0 + tap % g.ks;
  int hl = g.up ? 2 * g.H : g.H, wl = g.up ? 2 * g.W : g.W;
  if (ih < 0 || ih >= hl || iw < 0 || iw >= wl) return __float2bfloat16_rn(0.f);
  if (g.up) { ih >>= 1; iw >>= 1; }
  int64_t pix = (int64_t)img + (int64_t)ih * g.W + iw;
  return ci < g.C1 ? x1[pix * g.C1 + ci] : x2[pix * g.C2 + ci - g.C1];
}
__device__ __forceinline__ bf16 bwd_a_elem(const Geom& g, const Klass& kl, const bf16* dy, int img, int ohb, int owb, int k, int K) {
  if (img < 0 || k >= K) return __float2bfloat16_rn(0.f);
  Tap tp = bwd_tap(g, k / g.Cout, kl.r0, kl.c0, kl.nc);
  int oh = ohb + tp.dh, ow = owb + tp.dw;
  if (oh < 0 || oh >= g.Ho || ow < 0 || ow >= g.Wo) return __float2bfloat16_rn(0.f);
  return dy[((int64_t)img + (int64_t)oh * g.Wo + ow) * g.Cout + k % g.Cout];
}
__device__ __forceinline__ bf16 bwd_b_elem(const Geom& g, const Klass& kl, const bf16* w, int k, int K, int ci) {
  if (k >= K || ci >= g.Cin) return __float2bfloat16_rn(0.f);
  Tap tp = bwd_tap(g, k / g.Cout, kl.r0, kl.c0, kl.nc);
  return w[((int64_t)(k % g.Cout) * g.ks * g.ks + tp.wtap) * g.Cin + ci];
}

__device__ __forceinline__ void st_shared_8(bf16* dst, const bf16 (&v)[8]) { *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v); }

// The conv kernel. BWD = false: forward (B is [N][K], K contiguous); BWD = true: input gradient
// (B read from w as [K][N], N contiguous, with ldmatrix.trans).
template <int BM, int BN, int WARPS_M, int WARPS_N, bool BWD, bool VEC, bool FRAG_DB>
__device__ __forceinline__ void conv_implicit_gemm(const Geom g, const bf16* __restrict__ x1, const bf16* __restrict__ x2,
                                                   const bf16* __restrict__ w, const bf16* __restrict__ bias,
                                                   const bf16* __restrict__ res, bf16* __restrict__ y1, bf16* __restrict__ y2,
                                                   float* __restrict__ ws, int splits) {
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
  constexpr int A_PER = BM * CPR / THREADS;             // 16-byte A chunks per thread per stage
  constexpr int B_PER = BN * CPR / THREADS;             // same for B (both layouts)
  constexpr int NCH = BN / 8;                           // n-chunks per k-row of a [BK][BN] tile
  static_assert(A_PER >= 1 && B_PER >= 1 && NT % 2 == 0 && THREADS % NCH == 0 && THREADS % CPR == 0, "tile shape");
  constexpr int ROWS_PER_PASS = THREADS / CPR;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sA = reinterpret_cast<bf16*>(smem_raw);
  bf16* sB = sA + STAGES * BM * BK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int split = blockIdx.z % splits;
  const Klass kl = BWD ? make_class(g, blockIdx.z / splits) : Klass{};
  const int M = BWD ? kl.M : g.batch * g.Ho * g.Wo;
  const int N = BWD ? g.Cin : g.Cout;
  const int64_t ws_pixels = BWD ? (int64_t)g.batch * g.H * g.W : (int64_t)g.batch * g.Ho * g.Wo;
  const int K = BWD ? kl.T * g.Cout : g.ks * g.ks * g.Cin;
  if (m0 >= M) return;
  // Split-K: this CTA covers k-tiles [kt0, kt1) and, when split, writes f32 partial sums.
  const int KT_all = (K + BK - 1) / BK;
  const int kt0 = (int)((int64_t)KT_all * split / splits), kt1 = (int)((int64_t)KT_all * (split + 1) / splits);
  const int KT = kt1 - kt0;

  // Per-thread A rows: image base (pixels, -1 when m >= M) and the row/col base of its gather
  // (forward: ih = hb + r; input gradient: oh = hb + dh of the tap).
  const int a_col = tid % CPR;
  auto row_geom = [&](int j, int& img, int& hb, int& wb) {
    int m = m0 + tid / CPR + j * ROWS_PER_PASS;
    if (!BWD) {
      int ow = m % g.Wo, t = m / g.Wo, oh = t % g.Ho, n = t / g.Ho;
      img = m < M ? n * g.H * g.W : -1;
      hb = oh * g.stride - g.pad;
      wb = ow * g.stride - g.pad;
    } else {
      int s = g.up ? 1 : g.stride;
      int wq = m % kl.Wc, t = m / kl.Wc, hq = t % kl.Hc, n = t / kl.Hc;
      int h = kl.py + s * hq, wc = kl.px + s * wq;
      img = m < M ? n * g.Ho * g.Wo : -1;
      hb = g.up ? 2 * h + g.pad : (h + g.pad - kl.r0) / s;
      wb = g.up ? 2 * wc + g.pad : (wc + g.pad - kl.c0) / s;
    }
  };
  int a_img[VEC ? 1 : A_PER], a_hb[VEC ? 1 : A_PER], a_wb[VEC ? 1 : A_PER];  // scalar path only
  if constexpr (!VEC) {
#pragma unroll
    for (int j = 0; j < A_PER; ++j) row_geom(j, a_img[j], a_hb[j], a_wb[j]);
  }

  // Vector path: the reduced channel count (Cin forward, Cout backward) is a multiple of BK and
  // (forward) C1 too, so each k-tile lies in one tap and one source tensor. Within such a
  // segment every gather address just advances by BK channels per k-tile: the pointers are set up
  // once per segment (setup_segment) and bumped per tile.
  const int div = BWD ? g.Cout : g.Cin;
  int v_tap = kt0 * BK / div, v_ch0 = kt0 * BK % div;
  const bf16* a_ptr[A_PER];
  uint32_t a_ok = 0;
  const bf16* b_ptr = w;     // B chunk of this thread's first row (j = 0) in the current k-tile
  int64_t b_jstride = 0;     // element distance between its rows j and j + 1
  uint32_t b_ok = 0;
  auto setup_segment = [&]() {
    Tap tp = BWD ? bwd_tap(g, v_tap, kl.r0, kl.c0, kl.nc) : Tap{v_tap / g.ks, v_tap % g.ks, 0};
    const int ch = v_ch0 + a_col * 8;
    a_ok = 0;
#pragma unroll
    for (int j = 0; j < A_PER; ++j) {
      int img, hb, wb;
      row_geom(j, img, hb, wb);
      bool ok = img >= 0;
      a_ptr[j] = x1;
      if (!BWD) {
        int ih = hb + tp.dh, iw = wb + tp.dw;  // dh, dw = r, c
        int hl = g.up ? 2 * g.H : g.H, wl = g.up ? 2 * g.W : g.W;
        ok = ok && ih >= 0 && ih < hl && iw >= 0 && iw < wl;
        if (g.up) { ih >>= 1; iw >>= 1; }
        int64_t pix = (int64_t)img + (int64_t)ih * g.W + iw;
        if (ok) a_ptr[j] = ch < g.C1 ? x1 + pix * g.C1 + ch : x2 + pix * g.C2 + (ch - g.C1);
      } else {
        int oh = hb + tp.dh, ow = wb + tp.dw;
        ok = ok && oh >= 0 && oh < g.Ho && ow >= 0 && ow < g.Wo;
        if (ok) a_ptr[j] = x1 + ((int64_t)img + (int64_t)oh * g.Wo + ow) * g.Cout + ch;
      }
      a_ok |= (uint32_t)ok << j;
    }
    if (BWD) {  // rows (tap, co = v_ch0 + krow), 8 consecutive ci
      int krow = tid / NCH, ci = n0 + (tid % NCH) * 8;
      b_ok = ci < N ? ~0u : 0u;
      b_ptr = w + ((int64_t)(v_ch0 + krow) * g.ks * g.ks + tp.wtap) * g.Cin + ci;
      b_jstride = (int64_t)(THREADS / NCH) * g.ks * g.ks * g.Cin;
    }
  };
  if constexpr (VEC) {
    setup_segment();
    if (!BWD) {  // w viewed as [Cout][K]: rows n, k advancing by BK per tile, whatever the segment
      int row = tid / CPR, n = n0 + row;
      b_ptr = w + (int64_t)n * K + (int64_t)kt0 * BK + (tid % CPR) * 8;
      b_jstride = (int64_t)ROWS_PER_PASS * K;
#pragma unroll
      for (int j = 0; j < B_PER; ++j) b_ok |= (uint32_t)(n + j * ROWS_PER_PASS < N) << j;
    }
  }

  auto load_stage = [&](int stage, int k0) {
    bf16* a_s = sA + stage * BM * BK;
    bf16* b_s = sB + stage * BN * BK;
    // ---- A ----
#pragma unroll
    for (int j = 0; j < A_PER; ++j) {
      int row = tid / CPR + j * ROWS_PER_PASS;
      bf16* dst = a_s + off_rowk(row, a_col);
      if constexpr (VEC) {
        bool ok = (a_ok >> j) & 1;
        cp_async16<true>(smem_addr(dst), ok ? a_ptr[j] : x1, ok);
      } else {
        bf16 v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] = BWD ? bwd_a_elem(g, kl, x1, a_img[j], a_hb[j], a_wb[j], k0 + a_col * 8 + e, K)
                     : fwd_a_elem(g, x1, x2, a_img[j], a_hb[j], a_wb[j], k0 + a_col * 8 + e, K);
        st_shared_8(dst, v);
      }
    }
    // ---- B ----
#pragma unroll
    for (int j = 0; j < B_PER; ++j) {
      bf16* dst = BWD ? b_s + off_kn<BN>(tid / NCH + j * (THREADS / NCH), tid % NCH)
                      : b_s + off_rowk(tid / CPR + j * ROWS_PER_PASS, tid % CPR);
      if constexpr (VEC) {
        bool ok = (b_ok >> j) & 1;
        cp_async16<false>(smem_addr(dst), ok ? b_ptr + j * b_jstride : w, ok);
      } else if (!BWD) {  // [BN][BK] tile of w viewed as [Cout][K]
        int n = n0 + tid / CPR + j * ROWS_PER_PASS, k = k0 + (tid % CPR) * 8;
        bf16 v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (n < N && k + e < K) ? w[(int64_t)n * K + k + e] : __float2bfloat16_rn(0.f);
        st_shared_8(dst, v);
      } else {  // [BK][BN] tile: k-row (tap, co), 8 consecutive ci
        int krow = tid / NCH + j * (THREADS / NCH), ci = n0 + (tid % NCH) * 8;
        bf16 v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = bwd_b_elem(g, kl, w, k0 + krow, K, ci + e);
        st_shared_8(dst, v);
      }
    }
    // Advance to the next k-tile (vector path; the scalar path decodes each k).
    if constexpr (VEC) {
      v_ch0 += BK;
#pragma unroll
      for (int j = 0; j < A_PER; ++j) a_ptr[j] += BK;
      b_ptr += BWD ? (int64_t)BK * g.ks * g.ks * g.Cin : BK;
      bool new_segment = v_ch0 == div || (!BWD && v_ch0 == g.C1);
      if (v_ch0 == div) { v_ch0 = 0; ++v_tap; }
      if (new_segment) setup_segment();
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, (kt0 + s) * BK);
    cp_async_commit();
  }

  // Fragments of one k-step (16 deep) of the warp tile; with FRAG_DB two buffers: the next
  // k-step's fragments (the next k-tile's first, at the end of a tile) are loaded while this
  // k-step's mmas issue. ldmatrix addresses: a lane's swizzle key does not change with the
  // fragment index in the [rows][BK] tiles (rows 16 apart) nor with the k-step in the [BK][BN]
  // tile, so per-lane byte offsets are precomputed (per k-step, resp. per fragment pair) and each
  // fragment lies at a fixed distance from one of them.
  uint32_t af[FRAG_DB ? 2 : 1][MT][4], bfr[FRAG_DB ? 2 : 1][NT][2];
  constexpr int KSTEPS = BK / 16;
  uint32_t a_off[KSTEPS], b_off[BWD ? NT / 2 : KSTEPS];
#pragma unroll
  for (int q = 0; q < KSTEPS; ++q) a_off[q] = 2 * off_rowk(wm0 + (lane & 15), q * 2 + (lane >> 4));
#pragma unroll
  for (int q = 0; q < (BWD ? NT / 2 : KSTEPS); ++q) {
    if (!BWD) b_off[q] = 2 * off_rowk(wn0 + (lane & 7) + ((lane >> 4) << 3), q * 2 + ((lane >> 3) & 1));
    else b_off[q] = 2 * off_kn<BN>((lane & 7) + (((lane >> 3) & 1) << 3), (wn0 + q * 16) / 8 + (lane >> 4));
  }
  // a_s, b_s: shared-window addresses of the stage's tiles.
  auto load_frags = [&](int buf, uint32_t a_s, uint32_t b_s, int ks) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[buf][mt], a_s + a_off[ks] + mt * 16 * BK * 2);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      if (!BWD) ldmatrix_x4(r, b_s + b_off[ks] + np * 16 * BK * 2);
      else ldmatrix_x4_trans(r, b_s + b_off[np] + ks * 16 * BN * 2);
      bfr[buf][2 * np][0] = r[0]; bfr[buf][2 * np][1] = r[1];
      bfr[buf][2 * np + 1][0] = r[2]; bfr[buf][2 * np + 1][1] = r[3];
    }
  };

  cp_async_wait<STAGES - 2>();
  __syncthreads();  // k-tile 0 landed for everyone
  int read_stage = 0;
  const uint32_t sA_addr = smem_addr(sA), sB_addr = smem_addr(sB);
  uint32_t a_s = sA_addr, b_s = sB_addr;
  if constexpr (FRAG_DB) load_frags(0, a_s, b_s, 0);
  for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      // k-tile kt+1 must have landed for everyone before its fragments are read; the barrier also
      // ends every warp's reads of k-tile kt, whose stage iteration kt+1 refills.
      auto next_tile = [&]() {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
        a_s = sA_addr + read_stage * BM * BK * 2;
        b_s = sB_addr + read_stage * BN * BK * 2;
      };
      if constexpr (FRAG_DB) {
        if (ks == KSTEPS - 1) next_tile();
        load_frags((ks + 1) % 2, a_s, b_s, (ks + 1) % KSTEPS);
      } else {
        load_frags(0, a_s, b_s, ks);
      }
      if (ks == 0) {
        int next = kt + STAGES - 1;
        if (next < KT) load_stage(next % STAGES, (kt0 + next) * BK);
        cp_async_commit();
      }
      const int buf = FRAG_DB ? ks % 2 : 0;  // compile-time after unrolling
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[mt][nt], af[buf][mt], bfr[buf][nt][0], bfr[buf][nt][1]);
      if constexpr (!FRAG_DB) {
        if (ks == KSTEPS - 1) next_tile();
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: + bias + residual (forward), bf16x2 stores; the input gradient scatters its class's
  // rows back to pixels and splits columns between dx1 and dx2.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int m = m0 + wm0 + mt * 16 + (lane >> 2) + half * 8;
      if (m >= M) continue;
      int64_t pix = m;
      if (BWD) {
        int s = g.up ? 1 : g.stride;
        int wq = m % kl.Wc, t = m / kl.Wc, hq = t % kl.Hc, n = t / kl.Hc;
        pix = ((int64_t)n * g.H + kl.py + s * hq) * g.W + kl.px + s * wq;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        int col = n0 + wn0 + nt * 8 + (lane & 3) * 2;
        if (col >= N) continue;
        float v0 = acc[mt][nt][half * 2], v1 = acc[mt][nt][half * 2 + 1];
        if (splits > 1) {  // partial sums; conv2d_splitk_reduce_bf16 adds them up and finishes
          *reinterpret_cast<float2*>(ws + ((int64_t)split * ws_pixels + pix) * N + col) = make_float2(v0, v1);
        } else if (!BWD) {
          if (bias) { v0 += to_f32(bias[col]); v1 += to_f32(bias[col + 1]); }
          if (res) {
            __nv_bfloat162 r2 = *reinterpret_cast<const __nv_bfloat162*>(res + pix * N + col);
            v0 += __low2float(r2); v1 += __high2float(r2);
          }
          *reinterpret_cast<__nv_bfloat162*>(y1 + pix * N + col) = __floats2bfloat162_rn(v0, v1);
        } else {
          bf16* dst = col < g.C1 ? y1 + pix * g.C1 + col : y2 + pix * g.C2 + (col - g.C1);
          *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
        }
      }
    }
  }
}

}  // namespace

// Entry points. Geometry: the forward input x1 [batch, H, W, C1] (+ x2 [batch, H, W, C2]), before
// the optional upsample; output Ho × Wo. Dynamic shared memory: STAGES·(BM + BN)·BK·2 bytes.
// grid.z = classes × splits; with splits > 1 each CTA sums a slice of K into ws [splits, pixels, N]
// (f32) and conv2d_splitk_reduce_bf16 finishes.
#define CONV_GEOM_PARAMS int batch, int H, int W, int C1, int C2, int Ho, int Wo, int Cout, int ks, int stride, int pad, int up
#define CONV_GEOM Geom{batch, H, W, C1, C2, C1 + C2, Ho, Wo, Cout, ks, stride, pad, up}

#define CONV_FWD(NAME, BM, BN, WM_, WN_, VEC, DB, MINB)                                                                      \
  extern "C" __global__ void __launch_bounds__(32 * WM_ * WN_, MINB)                                                    \
      NAME(const bf16* x1, const bf16* x2, const bf16* w, const bf16* bias, const bf16* res, bf16* y, float* ws,   \
           int splits, CONV_GEOM_PARAMS) { await_previous_kernel();                                                 \
    conv_implicit_gemm<BM, BN, WM_, WN_, false, VEC, DB>(CONV_GEOM, x1, x2, w, bias, res, y, nullptr, ws, splits);    \
  }
#define CONV_BWD(NAME, BM, BN, WM_, WN_, VEC, DB, MINB)                                                                      \
  extern "C" __global__ void __launch_bounds__(32 * WM_ * WN_, MINB)                                                    \
      NAME(const bf16* dy, const bf16* w, bf16* dx1, bf16* dx2, float* ws, int splits, CONV_GEOM_PARAMS) { await_previous_kernel(); \
    conv_implicit_gemm<BM, BN, WM_, WN_, true, VEC, DB>(CONV_GEOM, dy, nullptr, w, nullptr, nullptr, dx1, dx2, ws, splits); \
  }

CONV_FWD(conv2d_fwd_bf16_vec_128x128, 128, 128, 2, 4, true, false, 2)
CONV_FWD(conv2d_fwd_bf16_vec_128x64, 128, 64, 2, 2, true, false, 3)
CONV_FWD(conv2d_fwd_bf16_vec_128x64_db, 128, 64, 2, 2, true, true, 2)
CONV_FWD(conv2d_fwd_bf16_vec_64x64, 64, 64, 2, 2, true, true, 4)
CONV_FWD(conv2d_fwd_bf16_scalar_64x64, 64, 64, 2, 2, false, false, 4)
CONV_BWD(conv2d_bwd_input_bf16_vec_128x128, 128, 128, 2, 4, true, false, 2)
CONV_BWD(conv2d_bwd_input_bf16_vec_128x64, 128, 64, 2, 2, true, false, 3)
CONV_BWD(conv2d_bwd_input_bf16_vec_128x64_db, 128, 64, 2, 2, true, true, 2)
CONV_BWD(conv2d_bwd_input_bf16_vec_64x64, 64, 64, 2, 2, true, true, 4)
CONV_BWD(conv2d_bwd_input_bf16_scalar_64x64, 64, 64, 2, 2, false, false, 4)

// Split-K epilogue: out[p, c] = Σ_s ws[s, p, c] (+ bias[c]) (+ res[p, c]) for p < pixels, c < N
// (N even), stored bf16: columns c < C1 to y1 [pixels, C1], the rest to y2 [pixels, N − C1].
// CPU twin: the same sums as conv2d_cpu / conv2d_backward_input_cpu (tested through them).
extern "C" __global__ void conv2d_splitk_reduce_bf16(const float* __restrict__ ws, int splits, int64_t pixels, int N, int C1,
                                                     const bf16* __restrict__ bias, const bf16* __restrict__ res,
                                                     bf16* __restrict__ y1, bf16* __restrict__ y2) {
  await_previous_kernel();
  int64_t pairs = pixels * N / 2;
  FOR_EACH_INDEX(i, pairs) {
    int64_t e = 2 * i, p = e / N;
    int c = (int)(e % N);
    float2 acc = make_float2(0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      float2 v = *reinterpret_cast<const float2*>(ws + s * pixels * N + e);
      acc.x += v.x; acc.y += v.y;
    }
    if (bias) { acc.x += to_f32(bias[c]); acc.y += to_f32(bias[c + 1]); }
    if (res) {
      __nv_bfloat162 r2 = *reinterpret_cast<const __nv_bfloat162*>(res + e);
      acc.x += __low2float(r2); acc.y += __high2float(r2);
    }
    bf16* dst = c < C1 ? y1 + p * C1 + c : y2 + p * (N - C1) + (c - C1);
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(acc.x, acc.y);
  }
}
