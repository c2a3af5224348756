// Hopper (sm_90a) implicit-GEMM 3×3 convolutions, stride 1, pad 1, on NHWC bf16 activations:
// forward with bias + residual (optionally reading the up blocks' concat [x1 | x2] from two
// tensors, or x through a fused nearest-2× upsample) and the input gradient, with wgmma.mma_async
// (m64n160k16, bf16 → f32) on operands in shared memory. Compiled for compute_90a only (build.rs: kernels/*_sm90.cu); launched by
// src/ops/conv_sm90.rs when Gpu::is_hopper(). The sm_80 kernels (kernels/conv.cu) stay for
// every other GPU and every other shape. CPU twins: src/ops/conv.rs conv2d_cpu,
// conv2d_backward_input_cpu (the GPU tests compare against their per-pixel forms).
//
// Layouts: x1 [batch, H, W, C1], x2 [batch, H, W, C2] (C2 = 0: no concat), Cin = C1 + C2,
// w [Cout, 3, 3, Cin], bias [Cout], residual and y [batch, H, W, Cout] (same size: stride 1 pad 1).
//
// Forward  y[p, co] = bias[co] + res[p, co] + Σ_{r,c,ci} X[n, h+r−1, w+c−1, ci] · w[co, r, c, ci]
//   GEMM: M = batch·H·W pixels, N = Cout, K = 9·Cin ordered (tap, ci);
//   A[m, k] = X at pixel m shifted by the tap (zero outside the image), X = [x1 | x2];
//   B[n, k] = w viewed as [Cout, 9·Cin] (K contiguous: "K-major", like A).
// Input gradient  dx[p, ci] = Σ_{r,c,co} dy[n, h+1−r, w+1−c, co] · w[co, r, c, ci]
//   GEMM: M = pixels, N = Cin, K = 9·Cout ordered (tap, co); A gathered from dy the same way
//   (opposite shift); B[k = (tap, co), n = ci] = w[co, tap, ci]: N contiguous ("MN-major"),
//   which wgmma reads transposed (imm-trans-b = 1). Columns ci < C1 go to dx1, the rest to dx2.
// Fused upsample (the UNet's upsamplers; no concat): the conv reads X[n, i, j] = x[n, i/2, j/2]
// (H × W: the conv's size, x is H/2 × W/2); its input gradient sums the 2×2 sub-pixels, as one
// GEMM over M = x's pixels and K = (sub-pixel, tap, co), 36·Cout: A[(n, h, w), (a·2 + b, tap, co)]
// = dy[n, 2h + a + 1 − r, 2w + b + 1 − c, co], B = w as above (the same rows for each sub-pixel).
//
// Requirements (checked by the launcher): Cin and C1 multiples of 64 (forward: a 64-deep k-tile
// lies in one tap and one tensor), Cout a multiple of 64 (input gradient), N (Cout forward, Cin
// input gradient) a multiple of BN = 160 — every SD1.5 3×3 stride-1 conv but conv_in / conv_out
// (320, 640, 960, 1280, 1920, 2560 all are). M is arbitrary (rows past M load zeros, store nothing).
//
// Design: a CTA computes a BM × 160 tile of the output, BM = 64·WGS with WGS warpgroups (1, 2 or 3),
// each warpgroup one m64n160 accumulator (80 f32 registers per thread). K advances in 64-deep
// k-tiles (one tap × 64 channels; channel blocks outer, the 9 taps inner) through a STAGES-deep
// ring of shared-memory stages; split-K over blockIdx.z for small GEMMs (f32 partial sums, then
// kernels/conv.cu's conv2d_splitk_reduce_bf16). Every thread gathers with cp.async (16-byte
// chunks, zero-fill outside the image; activations through L1, weights L2 only) into the layouts
// wgmma reads directly:
//  * A (BM rows × 64 k) and forward B (160 rows × 64 k): K-major, 128-byte rows, 128-byte
//    swizzle (16-byte chunk c of row r at chunk c ^ (r mod 8)); descriptor SBO = 1024 B (8 rows),
//    LBO unused; the k16 steps advance the start address by 32 B.
//  * input-gradient B (64 k-rows × 160 n): MN-major, 64-byte swizzle: five 32-wide n-blocks of
//    64 k-rows × 64 B (4096 B apart: LBO), 16-byte chunk c of k-row r at c ^ ((r / 2) mod 4),
//    8-row groups 512 B apart (SBO); a k16 step advances the start address by 1024 B.
//  Stages are 1024-byte aligned (swizzle atoms start on their boundary: base offset 0).
// Pipeline per k-tile kt: wait for its cp.async group; fence.proxy.async (the generic-proxy
// writes become visible to wgmma's async proxy); __syncthreads; issue 4 wgmmas (k16 steps) and
// commit; wgmma.wait_group 1 (k-tile kt−1 finished in this warpgroup); then refill the stage of
// k-tile kt−2 with k-tile kt+STAGES−2 — every warpgroup finished kt−2 before the barrier above,
// so the refill never races a running wgmma (one barrier per k-tile, STAGES−2 tiles in flight).
// Epilogue straight from the accumulators: bf16x2 stores (+ bias + residual forward).
#include "common.cuh"
#include "mma.cuh"

namespace {

constexpr int BK = 64;   // k per stage: one 128-byte swizzled row of bf16
constexpr int BN = 160;  // output columns per CTA (the wgmma N)

struct Geom {
  int batch, H, W, C1, C2, Cin, Cout;
};

// src-size 0: the 16 bytes are zero-filled. CA: cached in L1 too (the activations, re-read by the
// next taps), else L2 only (the weights).
template <bool CA> __device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  if (CA) asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
  else asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// Matrix descriptors (PTX ISA "Matrix Descriptor Format"): start address, LBO and SBO in 16-byte
// units (bits 0–13, 16–29, 32–45), swizzle mode in bits 62–63 (1: 128 B, 2: 64 B).
__device__ __forceinline__ uint64_t desc_field(uint32_t bytes) { return (uint64_t)((bytes & 0x3FFFF) >> 4); }
__device__ __forceinline__ uint64_t desc_kmajor_sw128(uint32_t saddr) {
  return desc_field(saddr) | (1ull << 16) | (desc_field(1024) << 32) | (1ull << 62);
}
__device__ __forceinline__ uint64_t desc_mnmajor_sw64(uint32_t saddr) {
  return desc_field(saddr) | (desc_field(4096) << 16) | (desc_field(512) << 32) | (2ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmmas.
__device__ __forceinline__ void fence_acc(float (&d)[80]) {
#pragma unroll
  for (int i = 0; i < 80; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// d[64×160] += A[64×16] · B[16×160] (B K-major when TRANS_B = 0, N-major when 1).
template <int TRANS_B> __device__ __forceinline__ void wgmma_m64n160k16(float (&d)[80], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %82, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n160k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "
      "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79}, "
      "%80, %81, p, 1, 1, 0, %83;\n}\n"
      : ACC8(0), ACC8(8), ACC8(16), ACC8(24), ACC8(32), ACC8(40), ACC8(48), ACC8(56), ACC8(64), ACC8(72)
      : "l"(da), "l"(db), "r"(1), "n"(TRANS_B));
}
#undef ACC8

template <int WGS, bool BWD, bool UP, int STAGES>
__device__ __forceinline__ void conv3x3_wgmma(const Geom g, const bf16* __restrict__ x1, const bf16* __restrict__ x2,
                                              const bf16* __restrict__ w, const bf16* __restrict__ bias,
                                              const bf16* __restrict__ res, bf16* __restrict__ y1, bf16* __restrict__ y2,
                                              float* __restrict__ ws, int splits) {
  static_assert(STAGES >= 3, "one stage computing, one draining, at least one loading");
  constexpr int BM = 64 * WGS, THREADS = 128 * WGS;
  // The B tile (1280 chunks of 16 B) is loaded by the first B_THREADS threads: all of them for 1 or
  // 2 warpgroups, the first two of 3 (1280 chunks do not split evenly over 384 threads).
  constexpr int B_THREADS = WGS == 3 ? 256 : THREADS;
  constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = A_BYTES + BN * BK * 2;
  constexpr int ROWS_PER_PASS = THREADS / 8;        // 8 chunks of 16 B per 128-byte row
  constexpr int A_PER = BM / ROWS_PER_PASS;         // A chunks per thread per stage (4)
  // Taps per channel block: 9, or 36 for the input gradient through the upsample (2×2 sub-pixels).
  constexpr int TAPS = UP && BWD ? 36 : 9;
  constexpr int B_ROWS_PER_PASS = B_THREADS / 8;
  constexpr int B_PER = BN / B_ROWS_PER_PASS;       // forward B chunks per loading thread (10 or 5)
  static_assert(BN % B_ROWS_PER_PASS == 0 && BK % (B_THREADS / 4) == 0 && STAGE_BYTES % 1024 == 0, "tile shape");

  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem0 = (smem_addr(smem_raw) + 1023) & ~1023u;  // launcher adds 1 KiB of slack
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  // GEMM rows: pixels of the conv's output, or of x for the input gradient through the upsample.
  const int RW = UP && BWD ? g.W / 2 : g.W, RHW = (UP && BWD ? g.H / 2 : g.H) * RW, M = g.batch * RHW;
  const int red = BWD ? g.Cout : g.Cin;  // channels reduced per tap
  const int N = BWD ? g.Cin : g.Cout;
  const int64_t K = 9 * (int64_t)red;
  // Split-K: blockIdx.z sums k-tiles [kt0, kt1) of the TAPS·red / 64.
  const int KT_all = TAPS * red / BK, split = blockIdx.z;
  const int kt0 = KT_all * split / splits, KT = KT_all * (split + 1) / splits - kt0;

  // This thread's A rows (pixels) and chunk: rows tid/8 + j·ROWS_PER_PASS, chunk tid % 8, all
  // with the same swizzle key (ROWS_PER_PASS is a multiple of 8): one destination offset. Per row:
  // the first pixel of its image in the gathered tensor (x at H/2 × W/2 for the upsampled forward,
  // else H × W) and its coordinates in the row grid.
  const int chunk = tid & 7, row0 = tid >> 3;
  const uint32_t row_dst = row0 * 128 + ((chunk ^ (row0 & 7)) << 4);
  const int src_hw = UP && !BWD ? g.H * g.W / 4 : g.H * g.W;
  int a_img[A_PER], a_hw[A_PER];  // image's first source pixel; (h << 16) | w
#pragma unroll
  for (int j = 0; j < A_PER; ++j) {
    const int m = m0 + row0 + j * ROWS_PER_PASS, hw = m % RHW;
    a_img[j] = m / RHW * src_hw;
    a_hw[j] = ((m < M ? hw / RW : -(1 << 14)) << 16) | (hw % RW);  // past M: never inside the image
  }

  // Forward B: rows row0 + j·B_ROWS_PER_PASS, chunk `chunk` (destination row_dst + j·B_ROWS_PER_PASS·128).
  // Input-gradient B: n-block jb (32 columns) of k-rows b_kr + p·KR_PASS, chunk b_cc: one
  // destination offset per thread (the swizzle key (kr / 2) mod 4 does not change with p).
  const bool b_loader = B_THREADS == THREADS || tid < B_THREADS;
  constexpr int KR_PASS = B_THREADS / 4;
  const int b_kr = tid >> 2, b_cc = tid & 3;
  const uint32_t b_dst = b_kr * 64 + ((b_cc ^ ((b_kr >> 1) & 3)) << 4);

  // K-tile i of this CTA's slice: tap (r·3 + c) (and sub-pixel) and first reduced channel. k-tiles
  // run 64-channel block by block with the taps inner (block i / TAPS, tap i mod 9, sub-pixel
  // i mod TAPS / 9), so consecutive k-tiles gather the same channels one pixel over (L1 hits).
  auto load_tile = [&](int i) {
    const int t = (kt0 + i) % TAPS, l_tap = t % 9, l_ch0 = (kt0 + i) / TAPS * BK;
    const uint32_t sA = smem0 + (i % STAGES) * STAGE_BYTES, sB = sA + A_BYTES;
    const int r = l_tap / 3, c = l_tap % 3;
    const int dh = BWD ? 1 - r : r - 1, dw = BWD ? 1 - c : c - 1;
    const int sub_h = t / 18, sub_w = t / 9 % 2;  // input gradient through the upsample: row (2h + sub_h, 2w + sub_w)
    const bf16* base = x1;
    int cstride = BWD ? g.Cout : g.C1, coff = l_ch0;
    if (!BWD && l_ch0 >= g.C1) { base = x2; cstride = g.C2; coff = l_ch0 - g.C1; }
#pragma unroll
    for (int j = 0; j < A_PER; ++j) {
      const int y = a_hw[j] >> 16, x = a_hw[j] & 0xFFFF;
      const int hh = UP && BWD ? 2 * y + sub_h + dh : y + dh, ww = UP && BWD ? 2 * x + sub_w + dw : x + dw;
      const bool ok = (unsigned)hh < (unsigned)g.H && (unsigned)ww < (unsigned)g.W;
      const int pix = a_img[j] + (UP && !BWD ? (hh >> 1) * (g.W >> 1) + (ww >> 1) : hh * g.W + ww);
      const bf16* src = ok ? base + (int64_t)pix * cstride + coff + chunk * 8 : x1;
      cp_async16<true>(sA + row_dst + j * ROWS_PER_PASS * 128, src, ok);
    }
    if (b_loader && !BWD) {  // rows n0 + row of w viewed as [Cout][K], k from l_tap·Cin + l_ch0
      const bf16* src = w + (int64_t)(n0 + row0) * K + l_tap * g.Cin + l_ch0 + chunk * 8;
#pragma unroll
      for (int j = 0; j < B_PER; ++j) cp_async16<false>(sB + row_dst + j * B_ROWS_PER_PASS * 128, src + j * B_ROWS_PER_PASS * K, true);
    } else if (b_loader) {  // k-row kr = co − l_ch0 of tap l_tap: w[co, tap, n0 + 32·jb + 8·b_cc ..]
      const bf16* src = w + ((int64_t)(l_ch0 + b_kr) * 9 + l_tap) * g.Cin + n0 + b_cc * 8;
      const int64_t pass = (int64_t)KR_PASS * 9 * g.Cin;
#pragma unroll
      for (int jb = 0; jb < BN / 32; ++jb)
#pragma unroll
        for (int p = 0; p < BK / KR_PASS; ++p) cp_async16<false>(sB + b_dst + jb * 4096 + p * KR_PASS * 64, src + p * pass + jb * 32, true);
    }
  };

  float acc[80];
#pragma unroll
  for (int i = 0; i < 80; ++i) acc[i] = 0.f;
  fence_acc(acc);

  const int wg = tid / 128;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < KT) load_tile(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 3>();  // this thread's chunks of k-tile kt landed
    fence_proxy_async();
    __syncthreads();              // everyone's landed; every warpgroup is done with k-tile kt − 2
    const uint32_t sA = smem0 + (kt % STAGES) * STAGE_BYTES, sB = sA + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int k16 = 0; k16 < BK / 16; ++k16) {
      const uint64_t da = desc_kmajor_sw128(sA + wg * 64 * 128 + k16 * 32);
      const uint64_t db = BWD ? desc_mnmajor_sw64(sB + k16 * 1024) : desc_kmajor_sw128(sB + k16 * 32);
      wgmma_m64n160k16<BWD ? 1 : 0>(acc, da, db);
    }
    wgmma_commit();
    wgmma_wait<1>();
    const int next = kt + STAGES - 2;
    if (next < KT) load_tile(next);
    cp_async_commit();
  }
  wgmma_wait<0>();
  fence_acc(acc);
  cp_async_wait<0>();

  // Accumulator layout (m64nN, f32): thread t of the warpgroup holds rows 16·(t/32) + (t%32)/4
  // (+8 for the odd pair) and columns 8·j + 2·(t%4) + {0, 1} in acc[4j + 2·half + {0, 1}].
  const int t = tid % 128, lane = t % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int m = m0 + wg * 64 + (t / 32) * 16 + lane / 4 + half * 8;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + j * 8 + (lane % 4) * 2;
      float v0 = acc[4 * j + 2 * half], v1 = acc[4 * j + 2 * half + 1];
      if (splits > 1) {  // f32 partial sums; conv2d_splitk_reduce_bf16 (kernels/conv.cu) finishes
        *reinterpret_cast<float2*>(ws + ((int64_t)split * M + m) * N + col) = make_float2(v0, v1);
        continue;
      }
      bf16* dst;
      if (!BWD) {
        if (bias) { v0 += to_f32(bias[col]); v1 += to_f32(bias[col + 1]); }
        if (res) {
          const __nv_bfloat162 r2 = *reinterpret_cast<const __nv_bfloat162*>(res + (int64_t)m * g.Cout + col);
          v0 += __low2float(r2); v1 += __high2float(r2);
        }
        dst = y1 + (int64_t)m * g.Cout + col;
      } else {
        dst = col < g.C1 ? y1 + (int64_t)m * g.C1 + col : y2 + (int64_t)m * g.C2 + (col - g.C1);
      }
      *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
    }
  }
}

}  // namespace

// Entry points: grid (N / 160, ⌈M / BM⌉, splits), 128·WGS threads, dynamic shared memory
// STAGES·(BM + 160)·128 + 1024 bytes. Names: conv3x3_{fwd,bwd_input}[_up]_sm90_{BM}x160_s{STAGES};
// `_up`: x is read through the nearest-2× upsample (H, W: the conv's size, x is H/2 × W/2; no skip
// concat), forward y[p] at H × W; input gradient dx[n, h, w] = Σ_{a,b ∈ {0,1}} dX[n, 2h + a, 2w + b]
// as one GEMM over K = 4 · 9 · Cout (M = x's pixels). splits > 1: each CTA writes the f32 partial
// sums of its K slice to ws [splits, M, N] (no bias, residual), and conv2d_splitk_reduce_bf16
// (kernels/conv.cu) adds them up and finishes.
#define CONV_SM90_DIR(WGS, STAGES, BM_, UP, SUF)                                                                     \
  extern "C" __global__ void __launch_bounds__(128 * WGS, 1)                                                         \
      conv3x3_fwd##SUF##_sm90_##BM_##x160_s##STAGES(const bf16* x1, const bf16* x2, const bf16* w, const bf16* bias, \
                                                    const bf16* res, bf16* y, float* ws, int splits, int batch, int H, int W, int C1, int C2, int Cout) { await_previous_kernel(); \
    conv3x3_wgmma<WGS, false, UP, STAGES>(Geom{batch, H, W, C1, C2, C1 + C2, Cout}, x1, x2, w, bias, res, y, nullptr, ws, splits); \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(128 * WGS, 1)                                                         \
      conv3x3_bwd_input##SUF##_sm90_##BM_##x160_s##STAGES(const bf16* dy, const bf16* w, bf16* dx1, bf16* dx2, float* ws, \
                                                          int splits, int batch, int H, int W, int C1, int C2, int Cout) { await_previous_kernel(); \
    conv3x3_wgmma<WGS, true, UP, STAGES>(Geom{batch, H, W, C1, C2, C1 + C2, Cout}, dy, nullptr, w, nullptr, nullptr, dx1, dx2, ws, splits); \
  }
#define CONV_SM90(WGS, STAGES, BM_) CONV_SM90_DIR(WGS, STAGES, BM_, false, ) CONV_SM90_DIR(WGS, STAGES, BM_, true, _up)

CONV_SM90(1, 4, 64)   // two CTAs per SM (113 KiB each)
CONV_SM90(1, 6, 64)   // one CTA per SM, deeper prefetch
CONV_SM90(2, 5, 128)  // two warpgroups share the B tile (181 KiB)
CONV_SM90(3, 5, 192)  // three share it (221 KiB): N = 960 at 4096 pixels is 22 × 6 = 132 CTAs, one wave
