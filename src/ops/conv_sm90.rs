//! Hopper path of the 3×3 stride-1 convolutions (kernels/conv_sm90.cu: wgmma implicit GEMM,
//! forward with bias + residual, the skip concat or the fused nearest-2× upsample, and the input
//! gradient). `ops::conv`'s
//! launchers call [`choose`] after their own shape checks and hand the conv over when it returns a
//! plan (tile and split-K, [`plan_for`]): on a Hopper GPU (`Gpu::is_hopper`), for every shape the
//! kernels take ([`supports`]): at each SD1.5 one the wgmma kernels measured faster than the
//! sm_80 ones (benches/RESULTS.md, "Hopper wgmma convolutions").
//! Everything else (other GPUs, 1×1, stride 2, conv_in / conv_out) stays on
//! kernels/conv.cu. CPU twins: `conv2d_cpu`, `conv2d_backward_input_cpu` (ops::conv).
//!
//! `SDLORA_CONV_SM90_TILE=off|64x160_s6|128x160_s5|64x160_s4|192x160_s5[:splits]` turns the path off or
//! forces one tile (and split-K factor) wherever the shape is supported (benchmarking the choice).

use super::conv::{Conv2dShape, ConvSource};
use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

const MODULE: &str = "conv_sm90";
/// Output columns per CTA (the wgmma N); must match kernels/conv_sm90.cu.
const BN: usize = 160;
/// Streaming multiprocessors of an H100 SXM.
const SMS: usize = 132;

/// A CTA tile of the sm90 kernels: `bm` × 160 outputs, `stages` pipeline stages; its kernels
/// (forward, input gradient, and both through the fused upsample).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub stages: usize,
    fwd: &'static str,
    bwd: &'static str,
    fwd_up: &'static str,
    bwd_up: &'static str,
}

macro_rules! tile {
    ($bm:literal, $stages:literal) => {
        Tile {
            bm: $bm,
            stages: $stages,
            fwd: concat!("conv3x3_fwd_sm90_", $bm, "x160_s", $stages),
            bwd: concat!("conv3x3_bwd_input_sm90_", $bm, "x160_s", $stages),
            fwd_up: concat!("conv3x3_fwd_up_sm90_", $bm, "x160_s", $stages),
            bwd_up: concat!("conv3x3_bwd_input_up_sm90_", $bm, "x160_s", $stages),
        }
    };
}

/// Every compiled tile, by name suffix, with its cost model for [`plan_for`]: the time of one
/// 64-deep k-tile of one CTA in units of a 64-row CTA's alone on its SM (about 0.6 µs), and CTAs
/// per SM. Fitted to the H100 sweeps (benches/RESULTS.md, "Hopper wgmma convolutions" and "Hopper
/// conv round 2"): 128-row tiles do twice the work per k-tile in 1.45× the time (two warpgroups
/// share the B tile); two 64-row CTAs sharing an SM (4 stages) take 1.65× as long each; 192-row
/// tiles (three warpgroups) 1.9×.
pub const TILES: [(&str, Tile, f64, usize); 4] = [
    ("64x160_s6", tile!(64, 6), 1.0, 1),
    ("128x160_s5", tile!(128, 5), 1.45, 1),
    ("64x160_s4", tile!(64, 4), 1.65, 2),
    ("192x160_s5", tile!(192, 5), 1.9, 1),
];

impl Tile {
    fn smem(&self) -> usize {
        self.stages * (self.bm + BN) * 128 + 1024
    }
    fn threads(&self) -> u32 {
        2 * self.bm as u32
    }
}

/// Whether the sm90 kernels compute this conv: 3×3, stride 1, pad 1; the fused upsample only
/// without a skip concat (and an even conv size); input channels `c1 + c2` with c1 and the total
/// multiples of 64 (forward) or c1, c2 even (input gradient); the reduced channel count (in
/// forward, out for the gradient) a multiple of 64 and the GEMM's N (out forward, in for the
/// gradient) a multiple of 160.
pub fn supports(s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> bool {
    let up_ok = !upsample2x || (c2 == 0 && s.height.is_multiple_of(2) && s.width.is_multiple_of(2));
    let conv = s.kernel == 3 && s.stride == 1 && s.pad == 1 && up_ok && c1 + c2 == s.in_ch;
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
/// Split-K's extra cost in the units of [`TILES`]: a fixed part (the reduction launch and its
/// tail) and one per MB of partial sums written and read back.
const SPLIT_FIXED: f64 = 4.0;
const SPLIT_PER_MB: f64 = 0.6;

/// (M, N, k-tiles) of the GEMM of `s` (backward: of its input gradient; `up`: through the fused
/// upsample, whose input gradient has x's pixels as rows and 4 sub-pixels × 9 taps).
fn gemm_dims(s: &Conv2dShape, backward: bool, up: bool) -> (usize, usize, usize) {
    let pixels = s.batch * s.height * s.width;
    if backward {
        let sub = if up { 4 } else { 1 };
        (pixels / sub, s.in_ch, sub * 9 * s.out_ch / 64)
    } else {
        (pixels, s.out_ch, 9 * s.in_ch / 64)
    }
}

/// The cheapest (tile, split) for an M × N GEMM over `ktiles` k-tiles among `tiles` (entries of
/// [`TILES`]), by the model: waves of CTAs × k-tiles per CTA × the tile's unit cost, plus the
/// split's reduction.
fn cheapest(m: usize, n: usize, ktiles: usize, tiles: &[(&str, Tile, f64, usize)]) -> Plan {
    let mut best: Option<(f64, Plan)> = None;
    for &(_, tile, unit, per_sm) in tiles {
        let ctas = m.div_ceil(tile.bm) * n.div_ceil(BN);
        for splits in (1..=MAX_SPLITS).take_while(|&k| k == 1 || ktiles / k >= MIN_KTILES_PER_SPLIT) {
            let waves = (ctas * splits).div_ceil(per_sm * SMS);
            let mut cost = (waves * ktiles.div_ceil(splits)) as f64 * unit;
            if splits > 1 {
                cost += SPLIT_FIXED + SPLIT_PER_MB * ((splits * 8 + 2) * m * n) as f64 / 1e6;
            }
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, Plan { tile, splits }));
            }
        }
    }
    best.expect("at least one tile").1
}

/// The plan for the conv `s` (backward: its input gradient; `up`: through the fused upsample) the
/// launchers use.
pub fn plan_for(s: &Conv2dShape, backward: bool, up: bool) -> Plan {
    let (m, n, ktiles) = gemm_dims(s, backward, up);
    cheapest(m, n, ktiles, &TILES)
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the sm90 path on or off for this process (the benchmark times the sm_80 kernels at the
/// same shapes).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// The plan the conv launchers use on this GPU, or None for the sm_80 kernels: Hopper and a
/// [`supports`]ed shape (where the sm90 kernels measured faster at every SD1.5 shape).
/// `SDLORA_CONV_SM90_TILE=<tile>[:<splits>]` forces a tile (and split), `off` the sm_80 kernels.
pub fn choose(gpu: &Gpu, s: &Conv2dShape, c1: usize, c2: usize, upsample2x: bool, backward: bool) -> Result<Option<Plan>> {
    type Forced = Option<Option<(usize, Option<usize>)>>; // None: not set; Some(None): off
    static FORCED: std::sync::OnceLock<Forced> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        let v = std::env::var("SDLORA_CONV_SM90_TILE").ok()?;
        let (name, splits) = v.split_once(':').map_or((v.as_str(), None), |(a, b)| (a, b.parse().ok()));
        Some(TILES.iter().position(|t| t.0 == name).map(|i| (i, splits)))
    });
    if forced == Some(None) || !ENABLED.load(Relaxed) || !supports(s, c1, c2, upsample2x, backward) || !gpu.is_hopper()? {
        return Ok(None);
    }
    let (m, n, ktiles) = gemm_dims(s, backward, upsample2x);
    Ok(Some(match forced {
        Some(Some((i, Some(splits)))) => Plan { tile: TILES[i].1, splits },
        Some(Some((i, None))) => cheapest(m, n, ktiles, &TILES[i..=i]),
        _ => cheapest(m, n, ktiles, &TILES),
    }))
}

/// Launches `kernel` (`head`: its arguments before the workspace) for an M × N GEMM with plan
/// `p`; when split, then the reduction of kernels/conv.cu: out = Σ partials + bias + residual,
/// columns < c1 to `y1`, the rest to `y2`.
#[allow(clippy::too_many_arguments)]
fn launch(gpu: &Gpu, p: &Plan, kernel: &'static str, m: usize, n: usize, head: &[KernelArg], geom: [KernelArg; 6], c1: usize, finish: [u64; 4]) -> Result<()> {
    ensure!(gpu.is_hopper()?, "{kernel}: sm_90a kernels need a Hopper GPU");
    ensure!((1..=MAX_SPLITS).contains(&p.splits), "{kernel}: split count {} not in 1..={MAX_SPLITS}", p.splits);
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
#[allow(clippy::too_many_arguments)]
pub fn conv2d(gpu: &Gpu, p: &Plan, src: ConvSource, s: &Conv2dShape, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    let (c1, c2) = (src.x.shape()[3], src.skip.map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, src.upsample2x, false), "conv2d sm90: unsupported {s:?} (c1 {c1}, c2 {c2}, upsample {})", src.upsample2x);
    ensure!(y.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d sm90: output {:?} does not match {s:?}", y.shape());
    let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| t.ptr());
    let (bias, res, yp) = (opt(bias)?, opt(residual)?, y.ptr()?);
    let head = [KernelArg::Ptr(src.x.ptr()?), KernelArg::Ptr(opt(src.skip)?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(bias), KernelArg::Ptr(res), KernelArg::Ptr(yp)];
    let (m, _, _) = gemm_dims(s, false, src.upsample2x);
    let kernel = if src.upsample2x { p.tile.fwd_up } else { p.tile.fwd };
    launch(gpu, p, kernel, m, s.out_ch, &head, geometry_args(s, c1, c2), s.out_ch, [bias, res, yp, 0])
}

/// dx (and dskip) of [`conv2d`] from dy with plan `p` (`upsample2x`: of the conv through the fused
/// upsample; dx has x's size). Operands as in `ops::conv::conv2d_backward_input`, which checks them
/// before calling this.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_input(gpu: &Gpu, p: &Plan, dy: &Tensor, s: &Conv2dShape, w: &Tensor, upsample2x: bool, dx: &mut Tensor, dskip: Option<&mut Tensor>) -> Result<()> {
    let (c1, c2) = (dx.shape()[3], dskip.as_ref().map_or(0, |k| k.shape()[3]));
    ensure!(supports(s, c1, c2, upsample2x, true), "conv2d_backward_input sm90: unsupported {s:?} (c1 {c1}, c2 {c2}, upsample {upsample2x})");
    ensure!(dy.numel() == s.batch * s.height * s.width * s.out_ch, "conv2d_backward_input sm90: dy {:?} does not match {s:?}", dy.shape());
    let (m, _, _) = gemm_dims(s, true, upsample2x);
    ensure!(dx.numel() == m * c1, "conv2d_backward_input sm90: dx {:?} does not match {s:?} (upsample {upsample2x})", dx.shape());
    let (dxp, dsp) = (dx.ptr()?, dskip.map_or(Ok(0), |t| t.ptr())?);
    let head = [KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(w.ptr()?), KernelArg::Ptr(dxp), KernelArg::Ptr(dsp)];
    let kernel = if upsample2x { p.tile.bwd_up } else { p.tile.bwd };
    launch(gpu, p, kernel, m, s.in_ch, &head, geometry_args(s, c1, c2), c1, [0, 0, dxp, dsp])
}

#[cfg(test)]
#[path = "conv_sm90_tests.rs"]
mod tests;
