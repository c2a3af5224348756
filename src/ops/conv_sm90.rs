//! Hopper path of the 3×3 stride-1 convolutions (kernels/conv_sm90.cu: wgmma implicit GEMM,
//! forward with bias + residual and the skip concat, and the input gradient). `ops::conv`'s
//! launchers call [`choose`] after their own shape checks and hand the conv over when it returns a
//! tile: on a Hopper GPU (`Gpu::is_hopper`), for shapes the kernel takes ([`supports`]) and where it
//! measured faster than the sm_80 kernels (benches/RESULTS.md, "Hopper wgmma convolutions").
//! Everything else (other GPUs, 1×1, stride 2, the fused upsample, conv_in / conv_out) stays on
//! kernels/conv.cu. CPU twins: `conv2d_cpu`, `conv2d_backward_input_cpu` (ops::conv).
//!
//! `SDLORA_CONV_SM90_TILE=off|64x160_s4|64x160_s6|128x160_s4|128x160_s5` turns the path off or
//! forces one tile wherever the shape is supported (for benchmarking the choice).

use super::conv::{Conv2dShape, ConvSource};
use crate::cuda::{Gpu, KernelArg, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;

const MODULE: &str = "conv_sm90";
/// Output columns per CTA (the wgmma N); must match kernels/conv_sm90.cu.
const BN: usize = 160;
/// Streaming multiprocessors of an H100 SXM.
const SMS: usize = 132;

/// A CTA tile of the sm90 kernels: `bm` × 160 outputs, `stages` pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub stages: usize,
    fwd: &'static str,
    bwd: &'static str,
}

/// Every compiled tile, by name suffix.
pub const TILES: [(&str, Tile); 4] = [
    ("64x160_s4", Tile { bm: 64, stages: 4, fwd: "conv3x3_fwd_sm90_64x160_s4", bwd: "conv3x3_bwd_input_sm90_64x160_s4" }),
    ("64x160_s6", Tile { bm: 64, stages: 6, fwd: "conv3x3_fwd_sm90_64x160_s6", bwd: "conv3x3_bwd_input_sm90_64x160_s6" }),
    ("128x160_s4", Tile { bm: 128, stages: 4, fwd: "conv3x3_fwd_sm90_128x160_s4", bwd: "conv3x3_bwd_input_sm90_128x160_s4" }),
    ("128x160_s5", Tile { bm: 128, stages: 5, fwd: "conv3x3_fwd_sm90_128x160_s5", bwd: "conv3x3_bwd_input_sm90_128x160_s5" }),
];

impl Tile {
    fn smem(&self) -> usize {
        self.stages * (self.bm + BN) * 128 + 1024
    }
    fn threads(&self) -> u32 {
        2 * self.bm as u32
    }
}

/// Whether the sm90 kernels compute this conv: 3×3, stride 1, pad 1, no fused upsample; input
/// channels `c1 + c2` with c1 and the total multiples of 64 (forward) or c1, c2 even (input
/// gradient); the reduced channel count (in forward, out for the gradient) a multiple of 64 and
/// the GEMM's N (out forward, in for the gradient) a multiple of 160.
pub fn supports(s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> bool {
    let conv = s.kernel == 3 && s.stride == 1 && s.pad == 1 && !upsample2x && c1 + c2 == s.in_ch;
    let small = s.batch * s.height * s.width * s.in_ch.max(s.out_ch) < i32::MAX as usize;
    let channels = if backward {
        s.out_ch.is_multiple_of(64) && s.in_ch.is_multiple_of(BN) && c1.is_multiple_of(2) && c2.is_multiple_of(2)
    } else {
        s.in_ch.is_multiple_of(64) && c1.is_multiple_of(64) && s.out_ch.is_multiple_of(BN)
    };
    conv && small && channels
}

/// The tile for an M × N GEMM (M = output pixels): 64-row tiles while they make at most one wave
/// of CTAs, else 128-row tiles while those do, else 64-row tiles two per SM.
pub fn tile_for(m: usize, n: usize) -> Tile {
    let ctas = |bm: usize| m.div_ceil(bm) * n.div_ceil(BN);
    let name = if ctas(64) <= SMS {
        "64x160_s6"
    } else if ctas(128) <= SMS {
        "128x160_s5"
    } else {
        "64x160_s4"
    };
    TILES.iter().find(|(n, _)| *n == name).unwrap().1
}

/// The tile the conv launchers use on this GPU, or None for the sm_80 kernels: Hopper, a
/// [`supports`]ed shape, and enough CTAs (at least half a wave of 64-row tiles) that the
/// unsplit wgmma kernel beats the sm_80 one with its split-K.
pub fn choose(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> Result<Option<Tile>> {
    pick(gpu, s, c1, c2, upsample2x, backward, false)
}

/// The tile the sm90 kernels would use for this conv at any size (benchmarks): Hopper and a
/// [`supports`]ed shape.
pub fn candidate(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> Result<Option<Tile>> {
    pick(gpu, s, c1, c2, upsample2x, backward, true)
}

fn pick(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool, any_size: bool) -> Result<Option<Tile>> {
    static FORCED: std::sync::OnceLock<Option<Option<Tile>>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        let v = std::env::var("SDLORA_CONV_SM90_TILE").ok()?;
        Some(TILES.iter().find(|(n, _)| v == *n).map(|t| t.1))
    });
    if forced == Some(None) || !supports(s, c1, c2, upsample2x, backward) || !gpu.is_hopper()? {
        return Ok(None);
    }
    let (m, n) = (s.batch * s.height * s.width, if backward { s.in_ch } else { s.out_ch });
    if let Some(Some(t)) = forced {
        return Ok(Some(t));
    }
    Ok((any_size || m.div_ceil(64) * n / BN >= SMS / 2).then(|| tile_for(m, n)))
}

fn launch(gpu: &Gpu, t: &Tile, kernel: &'static str, m: usize, n: usize, args: &[KernelArg]) -> Result<()> {
    ensure!(gpu.is_hopper()?, "{kernel}: sm_90a kernels need a Hopper GPU");
    let smem = t.smem() as u32;
    gpu.function(MODULE, kernel)?.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    let cfg = LaunchConfig { grid_dim: ((n / BN) as u32, m.div_ceil(t.bm) as u32, 1), block_dim: (t.threads(), 1, 1), shared_mem_bytes: smem };
    gpu.launch(MODULE, kernel, cfg, args)
}

fn geometry_args(s: &Conv2dShape, c1: usize, c2: usize) -> [KernelArg; 6] {
    [s.batch, s.height, s.width, c1, c2, s.out_ch].map(|v| KernelArg::I32(v as i32))
}

/// y = conv3×3(src) + bias (+ residual) with tile `t`. Operands as in `ops::conv::conv2d`, which
/// checks their shapes and dtypes before calling this (tests call it directly to cover every tile).
pub fn conv2d(gpu: &Gpu, t: &Tile, src: ConvSource, s: &Conv2dShape, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let (c1, c2) = (src.x.shape()[3], src.skip.map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, src.upsample2x, false), "conv2d sm90: unsupported {s:?} (c1 {c1}, c2 {c2}, upsample {})", src.upsample2x);
    ensure!(y.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d sm90: output {:?} does not match {s:?}", y.shape());
    let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| t.ptr());
    let mut args = vec![
        KernelArg::Ptr(src.x.ptr()?),
        KernelArg::Ptr(opt(src.skip)?),
        KernelArg::Ptr(w.ptr()?),
        KernelArg::Ptr(opt(bias)?),
        KernelArg::Ptr(opt(residual)?),
        KernelArg::Ptr(y.ptr()?),
    ];
    args.extend(geometry_args(s, c1, c2));
    launch(gpu, t, t.fwd, s.batch * s.height * s.width, s.out_ch, &args)
}

/// dx (and dskip) of [`conv2d`] from dy with tile `t`. Operands as in
/// `ops::conv::conv2d_backward_input`, which checks them before calling this.
pub fn conv2d_backward_input(gpu: &Gpu, t: &Tile, dy: &Tensor, s: &Conv2dShape, w: &Tensor, dx: &mut Tensor, dskip: Option<&mut Tensor>) -> Result<()> {
    let (c1, c2) = (dx.shape()[3], dskip.as_ref().map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, false, true), "conv2d_backward_input sm90: unsupported {s:?} (c1 {c1}, c2 {c2})");
    ensure!(dy.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d_backward_input sm90: dy {:?} does not match {s:?}", dy.shape());
    let mut args = vec![KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(dx.ptr()?), KernelArg::Ptr(dskip.map_or(Ok(0), |t| t.ptr())?)];
    args.extend(geometry_args(s, c1, c2));
    launch(gpu, t, t.bwd, s.batch * s.height * s.width, s.in_ch, &args)
}

#[cfg(test)]
#[path = "conv_sm90_tests.rs"]
mod tests;
