//! 2-D convolutions (kernels/conv.cu): implicit-GEMM forward with fused bias and residual, the
//! input gradient (weights are frozen: no weight gradient), nearest-2× upsample fused into the
//! conv's input read, and the up blocks' channel concatenation read from two tensors.
//!
//! Layouts: activations NHWC, weights `[out, kh, kw, in]` (reordered from PyTorch's OIHW at load
//! with [`conv_weight_oihw_to_ohwi`]), bias `[out]`; on the GPU everything is bf16 (f32 accumulate).
//! CPU twins: [`conv2d_cpu`], [`conv2d_backward_input_cpu`], [`upsample2x_nearest_cpu`],
//! [`upsample2x_nearest_backward_cpu`], [`concat_channels_cpu`].
//!
//! Channel counts: the tensor-core vector kernels need the input channels of each source (and, for
//! the input gradient, the output channels) to be multiples of 8; anything else (conv_in's 4 input
//! channels, conv_out's 4 output channels) runs the same tensor-core kernel with an element-wise
//! gather ("scalar" kernels) — a simple fallback, slower but only used at K = 36.

use super::check_gpu;
use crate::cuda::{Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;

const MODULE: &str = "conv";
/// Must match kernels/conv.cu.
const BK: usize = 32;
const STAGES: usize = 4;
/// Below this many 128×128 tiles the 64×64 kernel fills the GPU better.
const BIG_TILE_MIN_CTAS: usize = 120;

/// A square 2-D convolution over an NHWC input of `batch × height × width × in_ch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dShape {
    /// Output (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        ((self.height + 2 * self.pad - self.kernel) / self.stride + 1, (self.width + 2 * self.pad - self.kernel) / self.stride + 1)
    }
    /// Multiply-adds ×2 of the forward (the input gradient costs the same).
    pub fn flops(&self) -> f64 {
        let (ho, wo) = self.out_hw();
        2.0 * (self.batch * ho * wo * self.out_ch * self.kernel * self.kernel * self.in_ch) as f64
    }
}

/// PyTorch's OIHW conv weight to `[out, kh, kw, in]`.
pub fn conv_weight_oihw_to_ohwi(w: &[f32], o: usize, i: usize, kh: usize, kw: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i * kh * kw, "conv weight size");
    let mut out = vec![0.0; w.len()];
    for oc in 0..o {
        for ic in 0..i {
            for r in 0..kh {
                for c in 0..kw {
                    out[((oc * kh + r) * kw + c) * i + ic] = w[((oc * i + ic) * kh + r) * kw + c];
                }
            }
        }
    }
    out
}

/// Output pixel `pixel` (index into batch·Ho·Wo) of the convolution, all out channels.
fn conv2d_pixel(x: &[f32], s: &Conv2dShape, w: &[f32], bias: Option<&[f32]>, pixel: usize) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (n, oh, ow) = (pixel / (ho * wo), pixel / wo % ho, pixel % wo);
    let k = s.kernel;
    (0..s.out_ch)
        .map(|co| {
            let mut acc = bias.map_or(0.0, |b| b[co] as f64);
            for r in 0..k {
                for c in 0..k {
                    let (ih, iw) = ((oh * s.stride + r) as isize - s.pad as isize, (ow * s.stride + c) as isize - s.pad as isize);
                    if ih < 0 || iw < 0 || ih >= s.height as isize || iw >= s.width as isize {
                        continue;
                    }
                    let xp = &x[((n * s.height + ih as usize) * s.width + iw as usize) * s.in_ch..][..s.in_ch];
                    let wp = &w[((co * k + r) * k + c) * s.in_ch..][..s.in_ch];
                    acc += xp.iter().zip(wp).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>();
                }
            }
            acc as f32
        })
        .collect()
}

/// y = conv(x, w) + bias: x NHWC `[batch, height, width, in_ch]`, w `[out, k, k, in]`, y NHWC.
pub fn conv2d_cpu(x: &[f32], s: &Conv2dShape, w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    (0..s.batch * ho * wo).flat_map(|p| conv2d_pixel(x, s, w, bias, p)).collect()
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
            if nh < 0 || nw < 0 || nh as usize % s.stride != 0 || nw as usize % s.stride != 0 {
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

/// Nearest-neighbour 2× upsample of NHWC `[batch, h, w, c]` to `[batch, 2h, 2w, c]`.
pub fn upsample2x_nearest_cpu(x: &[f32], batch: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() * 4);
    for n in 0..batch {
        for i in 0..2 * h {
            for j in 0..2 * w {
                out.extend_from_slice(&x[((n * h + i / 2) * w + j / 2) * c..][..c]);
            }
        }
    }
    out
}

/// Backward of [`upsample2x_nearest_cpu`]: each low-resolution pixel sums its 2×2 block of `dy`.
pub fn upsample2x_nearest_backward_cpu(dy: &[f32], batch: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut dx = vec![0f32; batch * h * w * c];
    for n in 0..batch {
        for i in 0..2 * h {
            for j in 0..2 * w {
                let src = &dy[((n * 2 * h + i) * 2 * w + j) * c..][..c];
                for (d, s) in dx[((n * h + i / 2) * w + j / 2) * c..][..c].iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
    }
    dx
}

/// Channel concatenation of two NHWC tensors with the same pixels: `[.., ca] | [.., cb]`.
pub fn concat_channels_cpu(a: &[f32], ca: usize, b: &[f32], cb: usize) -> Vec<f32> {
    a.chunks(ca).zip(b.chunks(cb)).flat_map(|(p, q)| p.iter().chain(q).copied()).collect()
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
    ensure!(!up || (s.stride == 1 && s.height % 2 == 0 && s.width % 2 == 0), "{what}: the fused upsample needs stride 1 and an even size, got {s:?}");
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

/// Picks the tile (128×128 when it makes enough CTAs, else 64×64) and the launch configuration.
fn tile_config(gpu: &Gpu, kernel: &'static str, m: usize, n: usize, classes: usize) -> Result<LaunchConfig> {
    let big = kernel.ends_with("128x128");
    let (bm, bn, threads) = if big { (128, 128, 256) } else { (64, 64, 128) };
    let smem = (STAGES * (bm + bn) * BK * 2) as u32;
    gpu.function(MODULE, kernel)?.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(bn) as u32, m.div_ceil(bm).max(1) as u32, classes as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    })
}

/// `SDLORA_CONV_TILE=64|128` forces a tile size (for benchmarking the choice).
fn pick(vec: bool, m: usize, n: usize, classes: usize, names: [&'static str; 3]) -> &'static str {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| std::env::var("SDLORA_CONV_TILE").ok().and_then(|v| v.parse().ok()));
    if !vec {
        names[2]
    } else if forced.map_or(m.div_ceil(128) * n.div_ceil(128) * classes >= BIG_TILE_MIN_CTAS, |t| t == 128) {
        names[0]
    } else {
        names[1]
    }
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
    ensure!(s.out_ch % 2 == 0, "{what}: out_ch {} must be even", s.out_ch);
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
    let vec = g.c1 % 8 == 0 && g.c2 % 8 == 0;
    let m = s.batch * ho * wo;
    let kernel = pick(vec, m, s.out_ch, 1, ["conv2d_fwd_bf16_vec_128x128", "conv2d_fwd_bf16_vec_64x64", "conv2d_fwd_bf16_scalar_64x64"]);
    let cfg = tile_config(gpu, kernel, m, s.out_ch, 1)?;
    let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| t.ptr());
    let mut args = vec![
        KernelArg::Ptr(src.x.ptr()?),
        KernelArg::Ptr(opt(src.skip)?),
        KernelArg::Ptr(w.ptr()?),
        KernelArg::Ptr(opt(bias)?),
        KernelArg::Ptr(opt(residual)?),
        KernelArg::Ptr(y.ptr()?),
    ];
    args.extend(g.ints.iter().map(|&v| KernelArg::I32(v)));
    gpu.launch(MODULE, kernel, cfg, &args)
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
    let dskip_ptr = match dskip {
        Some(t) => {
            check_gpu(what, &[t], DType::BF16, t.numel())?;
            t.ptr()?
        }
        None => 0,
    };
    let vec = g.c1 % 8 == 0 && g.c2 % 8 == 0 && s.out_ch % 8 == 0;
    // One GEMM per stride parity class (h mod s, w mod s); class (0, 0) has the most pixels.
    let st = if upsample2x { 1 } else { s.stride };
    let (h, w_) = (g.ints[1] as usize, g.ints[2] as usize);
    let m = s.batch * h.div_ceil(st) * w_.div_ceil(st);
    let kernel = pick(vec, m, s.in_ch, st * st, [
        "conv2d_bwd_input_bf16_vec_128x128",
        "conv2d_bwd_input_bf16_vec_64x64",
        "conv2d_bwd_input_bf16_scalar_64x64",
    ]);
    let cfg = tile_config(gpu, kernel, m, s.in_ch, st * st)?;
    let mut args = vec![KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(dx.ptr()?), KernelArg::Ptr(dskip_ptr)];
    args.extend(g.ints.iter().map(|&v| KernelArg::I32(v)));
    gpu.launch(MODULE, kernel, cfg, &args)
}

#[cfg(test)]
#[path = "conv_tests.rs"]
mod tests;
