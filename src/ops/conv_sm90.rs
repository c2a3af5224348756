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
use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
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

/// How a conv runs on the sm90 kernels: the tile and the number of K slices (split-K: f32 partial
/// sums in a scratch workspace, added up by kernels/conv.cu's conv2d_splitk_reduce_bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub tile: Tile,
    pub splits: usize,
}

/// At most this many K slices, each at least this many 64-deep k-tiles.
const MAX_SPLITS: usize = 16;
const MIN_KTILES_PER_SPLIT: usize = 6;

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

/// Tile `t` for an M × N GEMM over `ktiles` k-tiles, split along K up to about one wave of CTAs
/// when it has fewer than three quarters of one.
pub fn plan_with(t: Tile, m: usize, n: usize, ktiles: usize) -> Plan {
    let ctas = m.div_ceil(t.bm) * n.div_ceil(BN);
    let splits = if 4 * ctas >= 3 * SMS { 1 } else { (SMS / ctas).min(MAX_SPLITS).min(ktiles / MIN_KTILES_PER_SPLIT).max(1) };
    Plan { tile: t, splits }
}

/// The plan for a conv of `s` (backward: its input gradient) with [`tile_for`]'s tile.
pub fn plan_for(s: &Conv2dShape, backward: bool) -> Plan {
    let (m, n, red) = if backward { (s.batch * s.height * s.width, s.in_ch, s.out_ch) } else { (s.batch * s.height * s.width, s.out_ch, s.in_ch) };
    plan_with(tile_for(m, n), m, n, 9 * red / 64)
}

/// The plan the conv launchers use on this GPU, or None for the sm_80 kernels: Hopper and a
/// [`supports`]ed shape.
pub fn choose(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> Result<Option<Plan>> {
    pick(gpu, s, c1, c2, upsample2x, backward, false)
}

/// The plan the sm90 kernels would use for this conv at any size (benchmarks): Hopper and a
/// [`supports`]ed shape.
pub fn candidate(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> Result<Option<Plan>> {
    pick(gpu, s, c1, c2, upsample2x, backward, true)
}

/// Where the sm90 plan measured faster than the sm_80 kernels (benches/RESULTS.md).
fn sm90_wins(_p: &Plan) -> bool {
    true
}

fn pick(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool, any_size: bool) -> Result<Option<Plan>> {
    static FORCED: std::sync::OnceLock<Option<Option<Tile>>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        let v = std::env::var("SDLORA_CONV_SM90_TILE").ok()?;
        Some(TILES.iter().find(|(n, _)| v == *n).map(|t| t.1))
    });
    if forced == Some(None) || !supports(s, c1, c2, upsample2x, backward) || !gpu.is_hopper()? {
        return Ok(None);
    }
    let p = plan_for(s, backward);
    if let Some(Some(t)) = forced {
        let (m, n, red) = if backward { (s.batch * s.height * s.width, s.in_ch, s.out_ch) } else { (s.batch * s.height * s.width, s.out_ch, s.in_ch) };
        return Ok(Some(plan_with(t, m, n, 9 * red / 64)));
    }
    Ok((any_size || sm90_wins(&p)).then_some(p))
}

/// Launches `kernel` (`head`: its arguments before the workspace) for an M × N GEMM with plan
/// `p`; when split, then the reduction of kernels/conv.cu: out = Σ partials + bias + residual,
/// columns < c1 to `y1`, the rest to `y2`.
#[allow(clippy::too_many_arguments)]
fn launch(gpu: &Gpu, p: &Plan, kernel: &'static str, m: usize, n: usize, head: &[KernelArg], geom: [KernelArg; 6], c1: usize, finish: [u64; 4]) -> Result<()> {
    ensure!(gpu.is_hopper()?, "{kernel}: sm_90a kernels need a Hopper GPU");
    ensure!(p.splits >= 1 && p.splits <= 9 * 2560 / 64, "{kernel}: bad split count {}", p.splits);
    let t = &p.tile;
    let smem = t.smem() as u32;
    gpu.function(MODULE, kernel)?.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    let cfg = LaunchConfig { grid_dim: ((n / BN) as u32, m.div_ceil(t.bm) as u32, p.splits as u32), block_dim: (t.threads(), 1, 1), shared_mem_bytes: smem };
    let ws = if p.splits > 1 { Some(gpu.alloc(ArenaKind::Scratch, p.splits * m * n * 4)?) } else { None };
    let mut args = head.to_vec();
    args.extend([KernelArg::Ptr(ws.as_ref().map_or(0, |b| b.ptr())), KernelArg::I32(p.splits as i32)]);
    args.extend(geom);
    gpu.launch(MODULE, kernel, cfg, &args)?;
    if let Some(ws) = ws {
        let pairs = m * n / 2;
        let cfg = LaunchConfig { grid_dim: (pairs.div_ceil(256).min(65_536) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let [bias, res, y1, y2] = finish.map(KernelArg::Ptr);
        let args = [KernelArg::Ptr(ws.ptr()), KernelArg::I32(p.splits as i32), KernelArg::I64(m as i64), KernelArg::I32(n as i32), KernelArg::I32(c1 as i32), bias, res, y1, y2];
        gpu.launch("conv", "conv2d_splitk_reduce_bf16", cfg, &args)?;
    }
    Ok(())
}

fn geometry_args(s: &Conv2dShape, c1: usize, c2: usize) -> [KernelArg; 6] {
    [s.batch, s.height, s.width, c1, c2, s.out_ch].map(|v| KernelArg::I32(v as i32))
}

/// y = conv3×3(src) + bias (+ residual) with plan `p`. Operands as in `ops::conv::conv2d`, which
/// checks their shapes and dtypes before calling this (tests call it directly to cover every tile).
pub fn conv2d(gpu: &Gpu, p: &Plan, src: ConvSource, s: &Conv2dShape, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let (c1, c2) = (src.x.shape()[3], src.skip.map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, src.upsample2x, false), "conv2d sm90: unsupported {s:?} (c1 {c1}, c2 {c2}, upsample {})", src.upsample2x);
    ensure!(y.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d sm90: output {:?} does not match {s:?}", y.shape());
    let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| t.ptr());
    let (bias, res, yp) = (opt(bias)?, opt(residual)?, y.ptr()?);
    let head = [KernelArg::Ptr(src.x.ptr()?), KernelArg::Ptr(opt(src.skip)?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(bias), KernelArg::Ptr(res), KernelArg::Ptr(yp)];
    let m = s.batch * s.height * s.width;
    launch(gpu, p, p.tile.fwd, m, s.out_ch, &head, geometry_args(s, c1, c2), s.out_ch, [bias, res, yp, 0])
}

/// dx (and dskip) of [`conv2d`] from dy with plan `p`. Operands as in
/// `ops::conv::conv2d_backward_input`, which checks them before calling this.
pub fn conv2d_backward_input(gpu: &Gpu, p: &Plan, dy: &Tensor, s: &Conv2dShape, w: &Tensor, dx: &mut Tensor, dskip: Option<&mut Tensor>) -> Result<()> {
    let (c1, c2) = (dx.shape()[3], dskip.as_ref().map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, false, true), "conv2d_backward_input sm90: unsupported {s:?} (c1 {c1}, c2 {c2})");
    ensure!(dy.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d_backward_input sm90: dy {:?} does not match {s:?}", dy.shape());
    let (dxp, dsp) = (dx.ptr()?, dskip.map_or(Ok(0), |t| t.ptr())?);
    let head = [KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(dxp), KernelArg::Ptr(dsp)];
    let m = s.batch * s.height * s.width;
    launch(gpu, p, p.tile.bwd, m, s.in_ch, &head, geometry_args(s, c1, c2), c1, [0, 0, dxp, dsp])
}

#[cfg(test)]
#[path = "conv_sm90_tests.rs"]
mod tests;
