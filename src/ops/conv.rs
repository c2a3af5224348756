//! 2-D convolutions (kernels/conv.cu): implicit-GEMM forward with fused bias and residual, the
//! input gradient (weights are frozen: no weight gradient), nearest-2× upsample fused into the
//! conv's input read, and the up blocks' channel concatenation read from two tensors.
//!
//! Layouts: activations NHWC, weights `[out, kh, kw, in]` (reordered from PyTorch's OIHW at load
//! with [`conv_weight_oihw_to_ohwi`]), bias `[out]`; on the GPU everything is bf16 (f32 accumulate).
//! CPU twins: [`conv2d_cpu`], [`conv2d_backward_input_cpu`]; the fused upsample and skip concat
//! are checked against `ops::layout`'s twins.
//!
//! Channel counts: the tensor-core vector kernels need each source's channels to be a multiple of
//! 8, the reduced channel count (in_ch forward, out_ch for the input gradient) a multiple of 64,
//! and, for a forward with a skip, x's channels a multiple of 64 too (every SD1.5 conv but
//! conv_in's input and conv_out's output); anything else runs the same
//! tensor-core kernel with an element-wise gather ("scalar" kernels): a simple fallback, slower,
//! used at SD1.5 only where K = 36.
//!
//! Small GEMMs (8×8 and 16×16 latents, stride 2) are split along K so the GPU fills up: f32
//! partial sums go to a workspace taken from the **scratch arena** (reset it per step), and a
//! reduction kernel adds them up with the bias and residual.

use super::check_gpu;
use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;

const MODULE: &str = "conv";
/// Must match kernels/conv.cu.
const BK: usize = 64;
const STAGES: usize = 3;
/// Streaming multiprocessors to fill (an H100 has 132; the plan only needs the order of magnitude).
const SMS: usize = 132;
/// Split-K: at most this many slices, each at least this many k-tiles.
const MAX_SPLITS: usize = 16;
const MIN_KTILES_PER_SPLIT: usize = 4;

/// Geometry of one convolution: input [batch, height, width, in_ch] → output [batch, oh, ow, out_ch].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub in_ch: usize,
    pub out_ch: usize,
    /// Square kernel size (1 or 3 in SD1.5).
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dShape {
    /// (output height, output width).
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |d: usize| (d + 2 * self.pad - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }
}

/// Reorders PyTorch's OIHW conv weight to our [out, kh, kw, in].
pub fn conv_weight_oihw_to_ohwi(w: &[f32], o: usize, i: usize, kh: usize, kw: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i * kh * kw, "conv weight is not {o}×{i}×{kh}×{kw}");
    let mut out = vec![0f32; w.len()];
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out[((oc * kh + y) * kw + x) * i + ic] = w[((oc * i + ic) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// CPU twin: cross-correlation with zero padding, NHWC in and out, w [out, k, k, in], optional bias.
pub fn conv2d_cpu(x: &[f32], s: &Conv2dShape, w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (oh, ow) = s.out_hw();
    let k = s.kernel;
    assert_eq!(x.len(), s.batch * s.height * s.width * s.in_ch, "conv2d_cpu: input does not match {s:?}");
    assert_eq!(w.len(), s.out_ch * k * k * s.in_ch, "conv2d_cpu: weight does not match {s:?}");
    let mut y = vec![0f32; s.batch * oh * ow * s.out_ch];
    for b in 0..s.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let out = &mut y[((b * oh + oy) * ow + ox) * s.out_ch..][..s.out_ch];
                for (oc, o) in out.iter_mut().enumerate() {
                    let mut acc = bias.map_or(0.0, |bb| bb[oc]);
                    for ky in 0..k {
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        if iy < 0 || iy >= s.height as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                            if ix < 0 || ix >= s.width as isize {
                                continue;
                            }
                            let xin = &x[((b * s.height + iy as usize) * s.width + ix as usize) * s.in_ch..][..s.in_ch];
                            let wk = &w[((oc * k + ky) * k + kx) * s.in_ch..][..s.in_ch];
                            acc += xin.iter().zip(wk).map(|(a, c)| a * c).sum::<f32>();
                        }
                    }
                    *o = acc;
                }
            }
        }
    }
    y
}

impl Conv2dShape {
    /// Multiply-adds ×2 of the forward (the input gradient costs the same).
    pub fn flops(&self) -> f64 {
        let (ho, wo) = self.out_hw();
        2.0 * (self.batch * ho * wo * self.out_ch * self.kernel * self.kernel * self.in_ch) as f64
    }
}

/// dx at input pixel `pixel` (index into batch·height·width), all in channels:
/// dx[n,h,w,ci] = Σ_{r,c,co : (h+pad−r)/stride, (w+pad−c)/stride exact and in range} dy[n,oh,ow,co]·w[co,r,c,ci].
fn conv2d_backward_input_pixel(dy: &[f32], s: &Conv2dShape, w: &[f32], pixel: usize) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (n, h, wi) = (pixel / (s.height * s.width), pixel / s.width % s.height, pixel % s.width);
    let k = s.kernel;
    let mut acc = vec![0f64; s.in_ch];
    for r in 0..k {
        for c in 0..k {
            let (nh, nw) = ((h + s.pad) as isize - r as isize, (wi + s.pad) as isize - c as isize);
            if nh < 0 || nw < 0 || !(nh as usize).is_multiple_of(s.stride) || !(nw as usize).is_multiple_of(s.stride) {
                continue;
            }
            let (oh, ow) = (nh as usize / s.stride, nw as usize / s.stride);
            if oh >= ho || ow >= wo {
                continue;
            }
            let g = &dy[((n * ho + oh) * wo + ow) * s.out_ch..][..s.out_ch];
            for (co, &gv) in g.iter().enumerate() {
                let wp = &w[((co * k + r) * k + c) * s.in_ch..][..s.in_ch];
                for (a, &wv) in acc.iter_mut().zip(wp) {
                    *a += gv as f64 * wv as f64;
                }
            }
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// dx = ∂(Σ dy·conv(x, w))/∂x, NHWC like x (the transposed convolution of dy with w).
pub fn conv2d_backward_input_cpu(dy: &[f32], s: &Conv2dShape, w: &[f32]) -> Vec<f32> {
    (0..s.batch * s.height * s.width).flat_map(|p| conv2d_backward_input_pixel(dy, s, w, p)).collect()
}

/// Where a convolution reads its input: `x`, optionally followed by `skip` along channels
/// (`[x | skip]`, the up blocks' concatenation), optionally nearest-2× upsampled.
#[derive(Clone, Copy)]
pub struct ConvSource<'a> {
    pub x: &'a Tensor,
    pub skip: Option<&'a Tensor>,
    pub upsample2x: bool,
}

impl<'a> ConvSource<'a> {
    pub fn plain(x: &'a Tensor) -> Self {
        ConvSource { x, skip: None, upsample2x: false }
    }
    pub fn concat(x: &'a Tensor, skip: &'a Tensor) -> Self {
        ConvSource { x, skip: Some(skip), upsample2x: false }
    }
    pub fn upsample2x(x: &'a Tensor) -> Self {
        ConvSource { x, skip: None, upsample2x: true }
    }
}

/// Kernel geometry shared by forward and input gradient: (batch, H, W, C1, C2, Ho, Wo, Cout, k, stride, pad, up)
/// with H, W the stored (pre-upsample) input size.
struct Geometry {
    ints: [i32; 12],
    c1: usize,
    c2: usize,
}

/// Checks `s` against the source tensors' shapes (`x`: [batch, h, w, c1], skip: [batch, h, w, c2];
/// h, w are s.height/2, s.width/2 when upsampled) and returns the kernel geometry.
fn geometry(what: &str, s: &Conv2dShape, x_shape: &[usize], skip_shape: Option<&[usize]>, up: bool) -> Result<Geometry> {
    ensure!(s.kernel >= 1 && s.stride >= 1 && s.pad < s.kernel, "{what}: unsupported kernel {} stride {} pad {}", s.kernel, s.stride, s.pad);
    ensure!(s.height + 2 * s.pad >= s.kernel && s.width + 2 * s.pad >= s.kernel, "{what}: image {}x{} smaller than the kernel", s.height, s.width);
    ensure!(!up || (s.stride == 1 && s.height.is_multiple_of(2) && s.width.is_multiple_of(2)), "{what}: the fused upsample needs stride 1 and an even size, got {s:?}");
    let (h, w) = if up { (s.height / 2, s.width / 2) } else { (s.height, s.width) };
    ensure!(x_shape.len() == 4 && x_shape[..3] == [s.batch, h, w], "{what}: input shape {x_shape:?} does not match {s:?} (upsample {up})");
    let c1 = x_shape[3];
    let c2 = match skip_shape {
        Some(sk) => {
            ensure!(sk.len() == 4 && sk[..3] == [s.batch, h, w], "{what}: skip shape {sk:?} does not match the input {x_shape:?}");
            sk[3]
        }
        None => 0,
    };
    ensure!(c1 + c2 == s.in_ch, "{what}: input channels {c1} + {c2} != in_ch {}", s.in_ch);
    let (ho, wo) = s.out_hw();
    let elems = s.batch * s.height.max(ho) * s.width.max(wo) * s.in_ch.max(s.out_ch);
    ensure!(elems < i32::MAX as usize && s.out_ch * s.kernel * s.kernel * s.in_ch < i32::MAX as usize, "{what}: too large for 32-bit indexing");
    let ints = [s.batch, h, w, c1, c2, ho, wo, s.out_ch, s.kernel, s.stride, s.pad, up as usize].map(|v| v as i32);
    Ok(Geometry { ints, c1, c2 })
}

/// How a convolution GEMM is launched: which kernel (tile `bm × bn`), and into how many K slices
/// it is split.
struct Plan {
    kernel: &'static str,
    bm: usize,
    bn: usize,
    splits: usize,
}

/// The vector kernels, in the order of `plan`'s kernel names: (name suffix, bm, bn). `128x64db`
/// is the 128×64 tile with double-buffered mma fragments (two blocks per SM instead of three).
const TILES: [(&str, usize, usize); 4] = [("128x128", 128, 128), ("128x64", 128, 64), ("128x64db", 128, 64), ("64x64", 64, 64)];

/// Picks the kernel and the split-K factor for a GEMM of `m` rows (per class), `n` columns,
/// `classes` parity classes and at most `ktiles` k-tiles, then splits along K until there are
/// about two CTAs per SM. Tiles, from all of them measured at every SD1.5 shape on the H100
/// (benches/RESULTS.md): 128×64 for big GEMMs (m ≥ 256 and m·n·k ≥ 3.5e9; its fragment
/// double-buffered variant from m·n·k ≥ 1e10 without the fused upsample: the big concat convs,
/// where it measured 5–15 % faster, while it lost at the upsamplers), 128×128 for the
/// widest 3×3 input gradients (n ≥ 1920, m ≥ 1024, ≥ 40 k-tiles), 64×64 otherwise. `names`: the
/// vector kernels in the order of [`TILES`] and the scalar (64×64) one.
/// `SDLORA_CONV_TILE=128x128|128x64|128x64db|64x64` forces the vector tile (for benchmarking the choice).
#[allow(clippy::too_many_arguments)]
fn plan(vec: bool, m: usize, n: usize, classes: usize, ktiles: usize, wide_n_prefers_square: bool, upsampled: bool, names: [&'static str; 5]) -> Plan {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        let v = std::env::var("SDLORA_CONV_TILE").ok()?;
        TILES.iter().position(|(name, _, _)| v == *name)
    });
    let make = |i: usize, kernel: &'static str| {
        let (_, bm, bn) = TILES[i.min(TILES.len() - 1)];
        let ctas = m.div_ceil(bm) * n.div_ceil(bn) * classes;
        let max_splits = MAX_SPLITS.min(ktiles / MIN_KTILES_PER_SPLIT).max(1);
        let splits = if ctas >= 2 * SMS { 1 } else { (2 * SMS).div_ceil(ctas).clamp(1, max_splits) };
        Plan { kernel, bm, bn, splits }
    };
    if !vec {
        return make(3, names[4]);
    }
    let mnk = (m * n * ktiles * BK) as f64;
    let tile = if wide_n_prefers_square && n >= 1920 && m >= 1024 && ktiles >= 40 {
        0
    } else if m >= 256 && mnk >= 1e10 && !upsampled {
        2
    } else if m >= 256 && mnk >= 3.5e9 {
        1
    } else {
        3
    };
    let i = forced.unwrap_or(tile);
    make(i, names[i])
}

/// Launches the conv kernel `p` (`head` = its pointer arguments before the workspace) and, when
/// split, the reduction: f32 partial sums over `pixels × n` in a scratch workspace, then
/// out = Σ + bias + residual, columns < c1 to `y1`, the rest to `y2`.
#[allow(clippy::too_many_arguments)]
fn launch(
    gpu: &Gpu,
    p: &Plan,
    grid_mn: (usize, usize),
    classes: usize,
    head: &[KernelArg],
    ints: &[i32; 12],
    pixels: usize,
    c1: usize,
    finish: [u64; 4], // bias, residual, y1, y2
) -> Result<()> {
    let (m, n) = grid_mn;
    let (bm, bn) = (p.bm, p.bn);
    let threads = if bm * bn == 128 * 128 { 256 } else { 128 };
    let smem = (STAGES * (bm + bn) * BK * 2) as u32;
    gpu.function(MODULE, p.kernel)?.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(bn) as u32, m.div_ceil(bm).max(1) as u32, (classes * p.splits) as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    let ws = if p.splits > 1 { Some(gpu.alloc(ArenaKind::Scratch, p.splits * pixels * n * 4)?) } else { None };
    let mut args = head.to_vec();
    args.extend([KernelArg::Ptr(ws.as_ref().map_or(0, |b| b.ptr())), KernelArg::I32(p.splits as i32)]);
    args.extend(ints.iter().map(|&v| KernelArg::I32(v)));
    gpu.launch(MODULE, p.kernel, cfg, &args)?;
    if let Some(ws) = ws {
        let pairs = pixels * n / 2;
        let cfg = LaunchConfig { grid_dim: (pairs.div_ceil(256).min(65_536) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let [bias, res, y1, y2] = finish;
        let args = [
            KernelArg::Ptr(ws.ptr()),
            KernelArg::I32(p.splits as i32),
            KernelArg::I64(pixels as i64),
            KernelArg::I32(n as i32),
            KernelArg::I32(c1 as i32),
            KernelArg::Ptr(bias),
            KernelArg::Ptr(res),
            KernelArg::Ptr(y1),
            KernelArg::Ptr(y2),
        ];
        gpu.launch(MODULE, "conv2d_splitk_reduce_bf16", cfg, &args)?;
    }
    Ok(())
}

/// y = conv(src, w) + bias (+ residual): `s` describes the convolution as applied (its height and
/// width are the upsampled ones when `src.upsample2x`; in_ch counts x's and skip's channels).
/// w `[out, k, k, in]`, bias `[out]`, residual and y `[batch, Ho, Wo, out]`, all bf16 on the GPU.
pub fn conv2d(
    gpu: &Gpu,
    src: ConvSource,
    s: &Conv2dShape,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    y: &mut Tensor,
) -> Result<()> {
    let what = "conv2d";
    let g = geometry(what, s, src.x.shape(), src.skip.map(|t| t.shape()), src.upsample2x)?;
    let (ho, wo) = s.out_hw();
    ensure!(s.out_ch.is_multiple_of(2), "{what}: out_ch {} must be even", s.out_ch);
    check_gpu(what, &[src.x], DType::BF16, src.x.numel())?;
    if let Some(sk) = src.skip {
        check_gpu(what, &[sk], DType::BF16, sk.numel())?;
    }
    check_gpu(what, &[w], DType::BF16, s.out_ch * s.kernel * s.kernel * s.in_ch)?;
    check_gpu(what, &[y], DType::BF16, s.batch * ho * wo * s.out_ch)?;
    ensure!(y.shape() == [s.batch, ho, wo, s.out_ch], "{what}: output shape {:?} != [{}, {ho}, {wo}, {}]", y.shape(), s.batch, s.out_ch);
    if let Some(b) = bias {
        check_gpu(what, &[b], DType::BF16, s.out_ch)?;
    }
    if let Some(r) = residual {
        check_gpu(what, &[r], DType::BF16, y.numel())?;
    }
    if let Some(t) = super::conv_sm90::choose(gpu, s, g.c1, g.c2, src.upsample2x, false)? {
        return super::conv_sm90::conv2d(gpu, &t, src, s, w, bias, residual, y);
    }
    let vec = g.c1 % 8 == 0 && g.c2 % 8 == 0 && s.in_ch.is_multiple_of(BK) && (g.c2 == 0 || g.c1 % BK == 0);
    let m = s.batch * ho * wo;
    let ktiles = (s.kernel * s.kernel * s.in_ch).div_ceil(BK);
    let p = plan(vec, m, s.out_ch, 1, ktiles, false, src.upsample2x, [
        "conv2d_fwd_bf16_vec_128x128",
        "conv2d_fwd_bf16_vec_128x64",
        "conv2d_fwd_bf16_vec_128x64_db",
        "conv2d_fwd_bf16_vec_64x64",
        "conv2d_fwd_bf16_scalar_64x64",
    ]);
    let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| t.ptr());
    let (bias, res, yp) = (opt(bias)?, opt(residual)?, y.ptr()?);
    let head = [KernelArg::Ptr(src.x.ptr()?), KernelArg::Ptr(opt(src.skip)?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(bias), KernelArg::Ptr(res), KernelArg::Ptr(yp)];
    launch(gpu, &p, (m, s.out_ch), 1, &head, &g.ints, m, s.out_ch, [bias, res, yp, 0])
}

/// Input gradient of [`conv2d`] with the same `s` and upsample flag: dx (and dskip, the gradient of
/// the skip half of a concatenated input) from dy `[batch, Ho, Wo, out]`. Both outputs are
/// overwritten (not accumulated); dx has x's (pre-upsample) shape.
pub fn conv2d_backward_input(
    gpu: &Gpu,
    dy: &Tensor,
    s: &Conv2dShape,
    w: &Tensor,
    upsample2x: bool,
    dx: &mut Tensor,
    dskip: Option<&mut Tensor>,
) -> Result<()> {
    let what = "conv2d_backward_input";
    let g = geometry(what, s, dx.shape(), dskip.as_ref().map(|t| t.shape()), upsample2x)?;
    let (ho, wo) = s.out_hw();
    ensure!(g.c1 % 2 == 0 && g.c2 % 2 == 0, "{what}: input channel counts {} and {} must be even", g.c1, g.c2);
    check_gpu(what, &[dy], DType::BF16, s.batch * ho * wo * s.out_ch)?;
    check_gpu(what, &[w], DType::BF16, s.out_ch * s.kernel * s.kernel * s.in_ch)?;
    check_gpu(what, &[dx], DType::BF16, dx.numel())?;
    if let Some(t) = super::conv_sm90::choose(gpu, s, g.c1, g.c2, upsample2x, true)? {
        if let Some(sk) = dskip.as_deref() {
            check_gpu(what, &[sk], DType::BF16, sk.numel())?;
        }
        return super::conv_sm90::conv2d_backward_input(gpu, &t, dy, s, w, upsample2x, dx, dskip);
    }
    let dskip_ptr = match dskip {
        Some(t) => {
            check_gpu(what, &[t], DType::BF16, t.numel())?;
            t.ptr()?
        }
        None => 0,
    };
    let vec = g.c1 % 8 == 0 && g.c2 % 8 == 0 && s.out_ch.is_multiple_of(BK);
    // One GEMM per stride parity class (h mod s, w mod s); class (0, 0) has the most pixels, and
    // a class has at most ⌈k/s⌉² taps (4k² with the fused upsample: 2×2 sub-pixels × k² taps).
    let st = if upsample2x { 1 } else { s.stride };
    let (h, w_) = (g.ints[1] as usize, g.ints[2] as usize);
    let m = s.batch * h.div_ceil(st) * w_.div_ceil(st);
    let taps = if upsample2x { 4 * s.kernel * s.kernel } else { s.kernel.div_ceil(st).pow(2) };
    let p = plan(vec, m, s.in_ch, st * st, (taps * s.out_ch).div_ceil(BK), true, upsample2x, [
        "conv2d_bwd_input_bf16_vec_128x128",
        "conv2d_bwd_input_bf16_vec_128x64",
        "conv2d_bwd_input_bf16_vec_128x64_db",
        "conv2d_bwd_input_bf16_vec_64x64",
        "conv2d_bwd_input_bf16_scalar_64x64",
    ]);
    let dxp = dx.ptr()?;
    let head = [KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(dxp), KernelArg::Ptr(dskip_ptr)];
    launch(gpu, &p, (m, s.in_ch), st * st, &head, &g.ints, s.batch * h * w_, g.c1, [0, 0, dxp, dskip_ptr])
}

#[cfg(test)]
#[path = "conv_tests.rs"]
mod tests;
