//! Split-K and the weight-gradient layout on the Hopper wgmma kernels (kernels/gemm_sm90.cu,
//! `gemm_sm90_<BM>x<BN>_<layouts>_<out>_split`): `C = α·Σ_k A(m,k)·B(n,k) + bias + R` for the layouts
//! `Kk` (y = x·Wᵀ), `Kn` (dx = dy·W) and `Mn` (c = α·aᵀ·b, the LoRA weight gradients: both operands
//! with the token axis as rows, read MN-major by wgmma), with the K loop split over `S` blocks
//! per output tile and **no reduction launch**: each slice stores its f32 partial tile to a
//! scratch workspace and counts itself in on a per-output-tile counter; the last slice to arrive
//! sums the S partials in slice order (deterministic: the same bits whichever slice is last), runs
//! the ordinary epilogue (alpha, bias, residual, bf16/f32 C) and puts the counter back to 0.
//!
//! The counters are the GPU's (`Gpu::split_k_counters`), zeroed once (outside any CUDA-graph
//! capture) and zero again after every launch, so captured graphs replay without a memset.
//! [`crate::ops::gemm::gemm`] sends Hopper calls here ([`gemm`]: small outputs with a deep K on the
//! split kernels, else the plain sm90 kernels); [`crate::ops::gemm::at_b_many_sm90`] the weight
//! gradients ([`launch`]); and [`gemm_group`] runs several small GEMMs of one layout in one
//! launch (the LoRA weight gradients of an attention block, its LoRA down-projections, …).
//! CPU twins: `linear_cpu`, `linear_input_grad_cpu`, `at_b_cpu` in `ops::gemm`.

use super::gemm::{AtB, GemmCall, Layouts, Segment, SplitK};
use super::gemm_sm90::kernel_for;
use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig, SPLIT_K_COUNTERS};
use crate::tensor::DType;
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;

const MODULE: &str = "gemm_sm90";
const BK: usize = 64;

/// A block tile of the split kernels (kernels/gemm_sm90.cu GEMM_SM90_SPLIT_TILES: threads, stages,
/// blocks per SM must agree).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SplitTile {
    pub bm: usize,
    pub bn: usize,
    threads: u32,
    stages: usize,
    per_sm: usize,
    /// Time model (µs): `waves · (k_tiles_per_slice · a + b) + (S > 1: c + d·S)`, a wave being one
    /// block on each of `per_sm` blocks of every SM; a, b from the unsplit rows of the first sweep
    /// of benches/RESULTS.md "Weight gradients and split-K on wgmma" (H100), c, d the reduction's
    /// cost; checked against the second sweep (its picks are within 0.3 µs of the best forced slice
    /// count at every Kk/Kn split shape of the step).
    cost: (f64, f64, f64, f64),
    /// Kernel names for kk bf16/f32, kn bf16/f32, mn f32.
    names: [&'static str; 5],
}

macro_rules! split_names {
    ($p:literal) => {
        [concat!($p, "_kk_bf16_split"), concat!($p, "_kk_f32_split"), concat!($p, "_kn_bf16_split"), concat!($p, "_kn_f32_split"), concat!($p, "_mn_f32_split")]
    };
}

/// The split kernels' tiles (64×64 only: 128×128 lost at every shape of the first sweep).
pub(crate) const SPLIT_TILES: [SplitTile; 1] = [SplitTile { bm: 64, bn: 64, threads: 128, stages: 6, per_sm: 2, cost: (0.2, 4.4, 2.0, 0.2), names: split_names!("gemm_sm90_64x64") }];

/// Whether calls of `layouts` take the split kernels: every layout by default — the weight
/// gradients (`Mn`) as [`gemm_group`]'s grouped launches (benches/RESULTS.md "Session 6"); one
/// launch per product lost to the sm_80 kernels ("Weight gradients and split-K on wgmma").
/// `SDLORA_SM90_SPLIT` overrides: `0` none (the sm_80 split-K and weight-gradient paths, as before
/// these kernels), `gemm` Kk/Kn only (session 5's default), `wgrad` Mn only (read once per process).
pub(crate) fn enabled_for(layouts: Layouts) -> bool {
    static SETTING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match SETTING.get_or_init(|| std::env::var("SDLORA_SM90_SPLIT").ok()).as_deref() {
        Some("0") => false,
        Some("wgrad") => layouts == Layouts::Mn,
        Some("gemm") => layouts != Layouts::Mn,
        _ => true,
    }
}

impl SplitTile {
    /// Dynamic shared memory: the stages or the f32 C tile that reuses them, plus 1 KiB to align
    /// the stages to the 1024-byte swizzle atom.
    fn smem(&self) -> usize {
        (self.stages * (self.bm + self.bn) * BK * 2).max(self.bm * self.bn * 4) + 1024
    }

    fn kernel_name(&self, layouts: Layouts, out: DType) -> Result<&'static str> {
        kernel_for(&self.names, layouts, out).with_context(|| format!("gemm_sm90_split: no kernel for layouts {layouts:?} with {out:?} output"))
    }

    fn tiles(&self, m: usize, n: usize) -> usize {
        m.div_ceil(self.bm) * n.div_ceil(self.bn)
    }

    pub(crate) fn label(&self) -> String {
        format!("{}x{}", self.bm, self.bn)
    }

    /// Modelled µs of an m × n GEMM of `k_tiles` K tiles in `slices` slices.
    fn time(&self, sms: usize, m: usize, n: usize, k_tiles: usize, slices: usize) -> f64 {
        let (a, b, c, d) = self.cost;
        let per_slice = k_tiles.div_ceil(slices);
        let waves = (self.tiles(m, n) * slices).div_ceil(sms * self.per_sm);
        waves as f64 * (per_slice as f64 * a + b) + if slices > 1 { c + d * slices as f64 } else { 0.0 }
    }
}

/// K tiles (64 deep) of a call over both segments.
pub(crate) fn k_tiles(call: &GemmCall) -> usize {
    call.seg1.k.div_ceil(BK) + call.seg2.k.div_ceil(BK)
}

/// Slices that leave none empty: `want` rounded so that every slice gets ⌈k_tiles / want⌉ tiles.
pub(crate) fn even_slices(k_tiles: usize, want: usize) -> usize {
    let per = k_tiles.div_ceil(want.clamp(1, k_tiles.max(1))).max(1);
    k_tiles.div_ceil(per).max(1)
}

/// Whether the split kernels can run `call` here: a Hopper (`SDLORA_SM90` not 0), no split of the
/// caller's own, layouts `Kk`/`Kn` as the plain sm90 kernels take them, or `Mn` with an f32 C and
/// both operands' rows (along m and n) 16-byte loadable: pointers 16-byte aligned, leading
/// dimensions, M and N multiples of 8 (K, the token count, is free).
pub(crate) fn supports(gpu: &Gpu, call: &GemmCall) -> Result<bool> {
    if call.split != SplitK::None || !gpu.is_hopper()? {
        return Ok(false);
    }
    match call.layouts {
        Layouts::Kk | Layouts::Kn => super::gemm_sm90::supports(gpu, call),
        Layouts::Mn => {
            let vec = |p: u64, ld: usize| p.is_multiple_of(16) && ld.is_multiple_of(8);
            let segs_ok = [call.seg1, call.seg2].iter().all(|s| s.k == 0 || (vec(s.a, s.lda) && vec(s.b, s.ldb)));
            Ok(segs_ok && call.out == DType::F32 && call.m.is_multiple_of(8) && call.n.is_multiple_of(8))
        }
    }
}

/// The launcher's (tile, slices) for `call`: the least modelled time over the tiles and every
/// slice count up to one K tile per slice (at most 64; `SplitTile::cost`).
pub(crate) fn plan(gpu: &Gpu, call: &GemmCall) -> Result<(SplitTile, usize)> {
    let (sms, kt) = (gpu.sm_count()?, k_tiles(call));
    let mut best = (SPLIT_TILES[0], 1, f64::INFINITY);
    for tile in SPLIT_TILES {
        let max = if tile.tiles(call.m, call.n) > SPLIT_K_COUNTERS { 1 } else { kt.clamp(1, 64) };
        for want in 1..=max {
            let s = even_slices(kt, want);
            let t = tile.time(sms, call.m, call.n, kt, s);
            if t < best.2 {
                best = (tile, s, t);
            }
        }
    }
    Ok((best.0, best.1))
}

/// Split candidates among the Kk/Kn calls: at most this many 64×64 output tiles per SM …
const SPLIT_TILES_PER_SM: f64 = 1.0;
/// … and at least this many K tiles (larger outputs or shallower K run unsplit).
const SPLIT_MIN_K_TILES: usize = 8;

/// A call on the Hopper path: `Mn` always on the split kernels (the launcher's slices, maybe one);
/// `Kk`/`Kn` on the split kernels (with the time model's slice count, maybe one) when the output
/// is small and K deep (see SPLIT_TILES_PER_SM), else on the plain sm90 kernels
/// (`gemm_sm90::gemm_sm90`, its own tile choice). The caller has checked [`supports`].
pub(crate) fn gemm(gpu: &Gpu, call: &GemmCall) -> Result<()> {
    let small = SPLIT_TILES[0].tiles(call.m, call.n) as f64 <= SPLIT_TILES_PER_SM * gpu.sm_count()? as f64 && k_tiles(call) >= SPLIT_MIN_K_TILES;
    if call.layouts == Layouts::Mn || small {
        let (tile, slices) = plan(gpu, call)?;
        return launch(gpu, call, tile, slices);
    }
    super::gemm_sm90::gemm_sm90(gpu, call, None)
}

/// Launches `call` on the split kernel of `tile` with `slices` K slices (1: no workspace, the
/// plain epilogue; the slice count must come from [`even_slices`]). The caller has checked
/// [`supports`].
pub(crate) fn launch(gpu: &Gpu, call: &GemmCall, tile: SplitTile, slices: usize) -> Result<()> {
    ensure!(supports(gpu, call)?, "gemm_sm90_split: call not supported here (needs a Hopper GPU and 16-byte operands): {call:?}");
    if call.m == 0 || call.n == 0 {
        return Ok(());
    }
    let kt = k_tiles(call);
    let per_slice = kt.div_ceil(slices.max(1)).max(1);
    ensure!(slices >= 1 && kt.max(1).div_ceil(per_slice) == slices, "gemm_sm90_split: {slices} slices of {kt} K tiles leave some empty: use even_slices");
    let tiles = tile.tiles(call.m, call.n);
    ensure!(slices == 1 || tiles <= SPLIT_K_COUNTERS, "gemm_sm90_split: {tiles} output tiles, more than the {SPLIT_K_COUNTERS} counters");
    let name = tile.kernel_name(call.layouts, call.out)?;
    let smem = tile.smem() as u32;
    gpu.function(MODULE, name)?
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .context("gemm_sm90_split: cannot raise the dynamic shared memory limit")?;
    // The workspace handle lives until the launch is queued (stream order keeps it safe after).
    let ws = if slices > 1 { Some(gpu.alloc(ArenaKind::Scratch, tiles * slices * tile.bm * tile.bn * 4)?) } else { None };
    let counters = if slices > 1 { gpu.split_k_counters()? } else { 0 };
    let mut args = call.kernel_args(call.c)?;
    args.extend([KernelArg::I32(i32::try_from(per_slice)?), KernelArg::Ptr(ws.as_ref().map_or(0, |b| b.ptr())), KernelArg::Ptr(counters)]);
    let grid_dim = (call.n.div_ceil(tile.bn) as u32, call.m.div_ceil(tile.bm) as u32, slices as u32);
    gpu.launch(MODULE, name, LaunchConfig { grid_dim, block_dim: (tile.threads, 1, 1), shared_mem_bytes: smem }, &args)?;
    drop(ws);
    Ok(())
}

/// Most GEMMs per grouped launch (kernels/gemm_sm90.cu `GROUP_MAX`).
pub(crate) const GROUP_MAX: usize = 8;

/// One GEMM that may run in a grouped launch (or alone, as [`GroupGemm::call`]): `C[m×n] = alpha·Σ_k A(m,k)·B(n,k) (+ bias[n]) (+ R[m·ldr + n])`
/// over one or two K segments (`seg2.k = 0`: one) in the group's layouts, C dense (ldc = n);
/// the residual R (pointer, ldr) of C's type may be C itself (accumulate) or one row (ldr = 0).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupGemm {
    pub m: usize,
    pub n: usize,
    pub seg1: Segment,
    pub seg2: Segment,
    pub alpha: f32,
    pub bias: Option<u64>,
    pub c: u64,
    pub residual: Option<(u64, usize)>,
}

impl GroupGemm {
    /// The weight-gradient product `pr` (c[p×q] = alpha·aᵀ·b over pr.m tokens, layout Mn).
    pub(crate) fn at_b(pr: &AtB, accumulate: bool) -> GroupGemm {
        let seg1 = Segment { a: pr.a.0, lda: pr.a.1, b: pr.b.0, ldb: pr.b.1, k: pr.m };
        GroupGemm { m: pr.p, n: pr.q, seg1, seg2: Segment::default(), alpha: pr.alpha, bias: None, c: pr.c, residual: accumulate.then_some((pr.c, pr.q)) }
    }

    pub(crate) fn call(&self, layouts: Layouts, out: DType) -> GemmCall {
        GemmCall {
            layouts,
            m: self.m,
            n: self.n,
            seg1: self.seg1,
            seg2: self.seg2,
            c: self.c,
            ldc: self.n,
            out,
            bias: self.bias,
            residual: self.residual,
            alpha: self.alpha,
            split: SplitK::None,
        }
    }

    fn k(&self) -> usize {
        self.seg1.k + self.seg2.k
    }

    /// K tiles over both segments (each segment starts a tile).
    fn k_tiles(&self) -> usize {
        self.seg1.k.div_ceil(BK) + self.seg2.k.div_ceil(BK)
    }
}

/// The grouped kernel for `layouts` and `out` (kernels/gemm_sm90.cu GEMM_SM90_GROUP_KERNEL).
fn group_kernel(layouts: Layouts, out: DType) -> Option<&'static str> {
    match (layouts, out) {
        (Layouts::Mn, DType::F32) => Some("gemm_sm90_64x64_mn_f32_group"),
        (Layouts::Kk, DType::BF16) => Some("gemm_sm90_64x64_kk_bf16_group"),
        (Layouts::Kn, DType::BF16) => Some("gemm_sm90_64x64_kn_bf16_group"),
        _ => None,
    }
}

/// Whether [`gemm_group`] can run every one of `gemms` here: a grouped kernel for (`layouts`,
/// `out`), the split kernels enabled for `layouts` and each GEMM as [`supports`] takes it.
pub(crate) fn supports_group(gpu: &Gpu, layouts: Layouts, out: DType, gemms: &[GroupGemm]) -> Result<bool> {
    if group_kernel(layouts, out).is_none() || !enabled_for(layouts) {
        return Ok(false);
    }
    for g in gemms {
        if !supports(gpu, &g.call(layouts, out))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// K tiles per slice for a group: the power of two (1..=64) with the least modelled time — the
/// waves of all the group's blocks, each `per` K tiles long, plus one reduction of the most slices
/// (the `SplitTile::cost` model).
fn group_slice_tiles(sms: usize, gemms: &[GroupGemm]) -> usize {
    let tile = SPLIT_TILES[0];
    let (a, b, c, d) = tile.cost;
    let time = |per: usize| {
        let (mut blocks, mut most) = (0, 1);
        for g in gemms {
            let kt = g.k_tiles();
            let slices = even_slices(kt, kt.div_ceil(per));
            blocks += tile.tiles(g.m, g.n) * slices;
            most = most.max(slices);
        }
        let waves = blocks.div_ceil(sms * tile.per_sm) as f64;
        waves * (per as f64 * a + b) + if most > 1 { c + d * most as f64 } else { 0.0 }
    };
    (0..7).map(|e| 1 << e).min_by(|&x, &y| time(x).total_cmp(&time(y))).unwrap_or(64)
}

/// Up to [`GROUP_MAX`] GEMMs of one layout and output type in ONE launch of the grouped kernel:
/// each GEMM's 64×64 output tiles times its K slices (see [`group_slice_tiles`]), deepest first,
/// the split ones finished in kernel. The caller has checked [`supports_group`].
pub(crate) fn gemm_group(gpu: &Gpu, layouts: Layouts, out: DType, gemms: &[GroupGemm]) -> Result<()> {
    let name = group_kernel(layouts, out).with_context(|| format!("gemm_group: no grouped kernel for {layouts:?} with {out:?} output"))?;
    ensure!(gemms.len() <= GROUP_MAX, "gemm_group: {} GEMMs, at most {GROUP_MAX} per launch", gemms.len());
    let mut order: Vec<GroupGemm> = gemms.iter().filter(|g| g.m > 0 && g.n > 0).copied().collect();
    if order.is_empty() {
        return Ok(());
    }
    order.sort_by_key(|g| std::cmp::Reverse(g.k()));
    let per = group_slice_tiles(gpu.sm_count()?, &order);
    let tile = SPLIT_TILES[0];
    // The kernel's GemmGroup, as little-endian bytes: 136 per GEMM, then ws, counters, count.
    let mut bytes = Vec::with_capacity(GROUP_MAX * 136 + 24);
    let (mut first_block, mut ws_tiles, mut counters_used) = (0usize, 0usize, 0usize);
    for g in &order {
        let kt = g.k_tiles();
        let slices = even_slices(kt, kt.div_ceil(per));
        let tiles = tile.tiles(g.m, g.n);
        let (s1, s2) = (g.seg1, g.seg2);
        let (r, ldr) = g.residual.unwrap_or((0, 0));
        for v in [s1.a, s1.b, s2.a, s2.b, g.c, g.bias.unwrap_or(0), r, s1.lda as u64, s1.ldb as u64, s2.lda as u64, s2.ldb as u64, ldr as u64] {
            bytes.extend(v.to_le_bytes());
        }
        let fields = [s1.k, s2.k, g.m, g.n, slices, kt.div_ceil(slices).max(1), first_block, ws_tiles, counters_used];
        for v in fields {
            bytes.extend(i32::try_from(v).context("gemm_group: size past i32")?.to_le_bytes());
        }
        bytes.extend(g.alpha.to_le_bytes());
        first_block += tiles * slices;
        if slices > 1 {
            ws_tiles += tiles * slices;
            counters_used += tiles;
        }
    }
    ensure!(counters_used <= SPLIT_K_COUNTERS, "gemm_group: {counters_used} split output tiles, more than the {SPLIT_K_COUNTERS} counters");
    // The workspace handle lives until the launch is queued (stream order keeps it safe after).
    let ws = if ws_tiles > 0 { Some(gpu.alloc(ArenaKind::Scratch, ws_tiles * tile.bm * tile.bn * 4)?) } else { None };
    let counters = if counters_used > 0 { gpu.split_k_counters()? } else { 0 };
    bytes.resize(GROUP_MAX * 136, 0);
    bytes.extend(ws.as_ref().map_or(0, |b| b.ptr()).to_le_bytes());
    bytes.extend(counters.to_le_bytes());
    bytes.extend((order.len() as i32).to_le_bytes());
    let mut words = [0u64; 160];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    let smem = tile.smem() as u32;
    gpu.function(MODULE, name)?
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .context("gemm_group: cannot raise the dynamic shared memory limit")?;
    let cfg = LaunchConfig { grid_dim: (u32::try_from(first_block)?, 1, 1), block_dim: (tile.threads, 1, 1), shared_mem_bytes: smem };
    gpu.launch(MODULE, name, cfg, &[KernelArg::Struct(words)])?;
    drop(ws);
    Ok(())
}

/// Runs `gemms` (any number): those whose output alone fits in two 64×64 tiles per SM in grouped
/// launches of up to [`GROUP_MAX`] where [`supports_group`] allows; the larger ones (which fill
/// the GPU by themselves and run faster on the big-tile kernels), or all where grouping is not
/// supported, one [`crate::ops::gemm::gemm`] call each. (Two tiles per SM rather than one also
/// groups the 1024-token q/k/v forwards: step 14.70 / 14.78 vs 14.79 / 14.95 ms, benches/RESULTS.md.)
pub(crate) fn gemm_many(gpu: &Gpu, layouts: Layouts, out: DType, gemms: &[GroupGemm]) -> Result<()> {
    let sms = if gpu.is_hopper()? { gpu.sm_count()? } else { 0 };
    let (small, large): (Vec<GroupGemm>, Vec<GroupGemm>) = gemms.iter().partition(|g| SPLIT_TILES[0].tiles(g.m, g.n) <= 2 * sms);
    let grouped = supports_group(gpu, layouts, out, &small)?;
    if grouped {
        for chunk in small.chunks(GROUP_MAX) {
            gemm_group(gpu, layouts, out, chunk)?;
        }
    }
    for g in large.iter().chain(if grouped { &[][..] } else { &small[..] }) {
        super::gemm::gemm(gpu, &g.call(layouts, out))?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "gemm_sm90_split_tests.rs"]
mod tests;
