//! The Hopper GEMM path (kernels/gemm_sm90.cu and gemm_tma_sm90.cu: wgmma from 128-byte-swizzled shared memory fed by a
//! cp.async pipeline or by TMA with a producer warp and mbarriers): the same `C = α·Σ_k A(m,k)·B(n,k) + bias + R` contract as kernels/gemm.cu for the
//! layouts `Kk` (y = x·Wᵀ) and `Kn` (dx = dy·W), both K segments, bf16 or f32 C.
//!
//! [`crate::ops::gemm::gemm`] sends a call here when [`supports`] says yes (a compute capability 9.0
//! GPU, `SDLORA_SM90` not 0, no split-K, 16-byte-loadable operands) and the call is not one it splits
//! along K (small M); every other GPU keeps the sm_80 kernels. CPU twins: `linear_cpu` and
//! `linear_input_grad_cpu` in `ops::gemm`.

use super::gemm::{GemmCall, Layouts, Segment, SplitK};
use crate::cuda::{Gpu, KernelArg, LaunchConfig};
use crate::tensor::DType;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;

/// The cp.async kernels (kernels/gemm_sm90.cu) and the TMA kernels (kernels/gemm_tma_sm90.cu).
const MODULE: &str = "gemm_sm90";
const TMA_MODULE: &str = "gemm_tma_sm90";
const BK: usize = 64;

/// One kernel family of the sm90 path with its block tile (kernels/gemm_sm90.cu; the threads and
/// stages must match its GEMM_SM90_TILES / GEMM_SM90_TMA_TILES).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sm90Tile {
    pub bm: usize,
    pub bn: usize,
    /// The TMA kernels (a producer warp, mbarrier stages), else the cp.async ones (every thread
    /// loads, one barrier per K tile).
    tma: bool,
    /// TMA kernels only: at most one CTA per SM, looping over the output tiles (the C tile has its
    /// own shared memory, so the next tile's loads overlap the epilogue).
    persistent: bool,
    threads: u32,
    stages: usize,
    /// Output tiles an SM runs at once as the time model counts them: 2 for the cp.async 128×128
    /// kernel (its blocks per SM), 1 for the others (the co-resident blocks of the 64×64 and
    /// `tma128x128_s3` kernels fit the measurements better counted that way).
    per_sm: usize,
    /// The launcher's time model (µs, fitted to the forced-kernel rows `linear*_sm90_*` of
    /// benches/RESULTS.md "Hopper GEMM round 3", H100): `rounds · (k_tiles · a + b) + c`, a round
    /// being one output tile on each of `per_sm` blocks of every SM.
    cost: (f64, f64, f64),
    /// Kernel names for layouts kk/kn × C bf16/f32.
    names: [&'static str; 4],
}

macro_rules! names {
    ($p:literal) => {
        [concat!($p, "_kk_bf16"), concat!($p, "_kk_f32"), concat!($p, "_kn_bf16"), concat!($p, "_kn_f32")]
    };
}

/// Every sm90 kernel family.
pub(crate) const SM90_TILES: [Sm90Tile; 5] = [
    Sm90Tile { bm: 128, bn: 128, tma: false, persistent: false, threads: 256, stages: 3, per_sm: 2, cost: (0.681, 7.677, -0.427), names: names!("gemm_sm90_128x128") },
    Sm90Tile { bm: 64, bn: 64, tma: false, persistent: false, threads: 128, stages: 4, per_sm: 1, cost: (0.235, 0.372, 5.520), names: names!("gemm_sm90_64x64") },
    Sm90Tile { bm: 128, bn: 128, tma: true, persistent: false, threads: 288, stages: 3, per_sm: 1, cost: (0.381, 2.093, 4.276), names: names!("gemm_sm90_tma_128x128_s3") },
    Sm90Tile { bm: 128, bn: 128, tma: true, persistent: true, threads: 288, stages: 4, per_sm: 1, cost: (0.338, 2.353, 4.908), names: names!("gemm_sm90_tma_128x128_s4_p") },
    Sm90Tile { bm: 128, bn: 160, tma: true, persistent: true, threads: 288, stages: 4, per_sm: 1, cost: (0.375, 3.621, 5.001), names: names!("gemm_sm90_tma_128x160_s4_p") },
];

/// The kernel for `layouts` and C type `out` among `names`, listed as kk bf16, kk f32, kn bf16,
/// kn f32 and, where a family has it, mn f32.
pub(crate) fn kernel_for(names: &[&'static str], layouts: Layouts, out: DType) -> Option<&'static str> {
    let i = match (layouts, out) {
        (Layouts::Kk, DType::BF16) => 0,
        (Layouts::Kk, DType::F32) => 1,
        (Layouts::Kn, DType::BF16) => 2,
        (Layouts::Kn, DType::F32) => 3,
        (Layouts::Mn, DType::F32) => 4,
        (Layouts::Mn, DType::BF16) => return None,
    };
    names.get(i).copied()
}

impl Sm90Tile {
    /// Dynamic shared memory: the stages and the f32 C tile of the epilogue (which reuses the
    /// stages unless persistent), plus 1 KiB to align the stages to the 1024-byte swizzle atom.
    fn smem(&self) -> usize {
        let (stages, c_tile) = (self.stages * (self.bm + self.bn) * BK * 2, self.bm * self.bn * 4);
        if self.persistent { stages + c_tile + 1024 } else { stages.max(c_tile) + 1024 }
    }

    fn kernel_name(&self, layouts: Layouts, out: DType) -> Result<&'static str> {
        kernel_for(&self.names, layouts, out).with_context(|| format!("gemm_sm90: no kernel for layouts {layouts:?} with {out:?} output"))
    }

    /// Output tiles of an m × n GEMM.
    fn tiles(&self, m: usize, n: usize) -> usize {
        m.div_ceil(self.bm) * n.div_ceil(self.bn)
    }

    /// A name for benchmark rows and messages: `tile128x128` (cp.async), `tma128x128_s3`,
    /// `tma128x160_s4_p` (persistent).
    pub(crate) fn label(&self) -> String {
        match (self.tma, self.persistent) {
            (false, _) => format!("tile{}x{}", self.bm, self.bn),
            (true, p) => format!("tma{}x{}_s{}{}", self.bm, self.bn, self.stages, if p { "_p" } else { "" }),
        }
    }
}

/// Whether the sm90 kernels can run `call` on this GPU: Hopper (and `SDLORA_SM90` not 0), layout
/// `Kk` or `Kn`, no split-K, and every K segment's A and B 16-byte aligned with leading dimensions
/// and depth multiples of 8 elements (N too for `Kn`, whose B rows run along n).
pub(crate) fn supports(gpu: &Gpu, call: &GemmCall) -> Result<bool> {
    if call.split != SplitK::None || !matches!(call.layouts, Layouts::Kk | Layouts::Kn) || !gpu.is_hopper()? {
        return Ok(false);
    }
    let vec = |p: u64, ld: usize| p.is_multiple_of(16) && ld.is_multiple_of(8);
    let segs_ok = [call.seg1, call.seg2].iter().all(|s| s.k == 0 || (vec(s.a, s.lda) && vec(s.b, s.ldb) && s.k.is_multiple_of(8)));
    Ok(segs_ok && (call.layouts == Layouts::Kk || call.n.is_multiple_of(8)))
}

/// The tile the launcher picks for an m × n GEMM of `k_tiles` 64-deep K tiles: the least modelled
/// time (see `Sm90Tile::cost`), counting whole rounds (the busiest SM sets the time).
pub(crate) fn pick_tile(gpu: &Gpu, m: usize, n: usize, k_tiles: usize) -> Result<Sm90Tile> {
    let sms = gpu.sm_count()?;
    let time = |t: &Sm90Tile| {
        let (a, b, c) = t.cost;
        t.tiles(m, n).div_ceil(sms * t.per_sm) as f64 * (k_tiles as f64 * a + b) + c
    };
    Ok(SM90_TILES.into_iter().min_by(|x, y| time(x).total_cmp(&time(y))).unwrap_or(SM90_TILES[0]))
}

/// A 2-D tensor map for the TMA kernels: `outer` rows of `inner` elements of `dtype`, `ld` elements
/// apart, moved in boxes of `box_outer` × `box_inner` with the 128-byte swizzle when a box row is
/// 128 bytes, the 64-byte swizzle when it is 64; loads past `inner` or `outer` fill zeros, stores
/// there write nothing.
fn tensor_map(ptr: u64, dtype: DType, inner: usize, outer: usize, ld: usize, box_inner: u32, box_outer: u32) -> Result<[u64; 16]> {
    use cudarc::driver::sys::{self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle};
    let (data_type, size) = match dtype {
        DType::BF16 => (CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2),
        DType::F32 => (CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4),
    };
    let dims = [inner as u64, outer as u64];
    let strides = [(ld * size) as u64];
    let (boxes, steps) = ([box_inner, box_outer], [1u32, 1]);
    let swizzle = match box_inner as usize * size {
        128 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        64 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        b => bail!("gemm_sm90: no swizzle for a {b}-byte TMA box row"),
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds `rank` (strides: rank − 1) entries; the map is written in place.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .with_context(|| format!("gemm_sm90: cuTensorMapEncodeTiled refused {outer}x{inner} (ld {ld}) at {ptr:#x}, box {box_outer}x{box_inner}"))?;
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { map.assume_init() }.opaque)
}

/// The tensor map of C for the TMA store epilogue (kernels/gemm_tma_sm90.cu `TmaCTile`): boxes of
/// 128-byte rows, or 64-byte rows when the tile's row is not a multiple of 128 bytes, the block
/// tile's rows tall. None when C cannot be a TMA target (not 16-byte aligned, or rows not a multiple
/// of 16 bytes apart): the kernel then stores through its shared-memory f32 tile with ordinary
/// stores.
fn c_map(call: &GemmCall, tile: &Sm90Tile) -> Result<Option<[u64; 16]>> {
    let size = call.out.size();
    if !call.c.is_multiple_of(16) || !(call.ldc * size).is_multiple_of(16) {
        return Ok(None);
    }
    let row_bytes = if (tile.bn * size).is_multiple_of(128) { 128 } else { 64 };
    Ok(Some(tensor_map(call.c, call.out, call.n, call.m, call.ldc, (row_bytes / size) as u32, tile.bm as u32)?))
}

/// The arguments of a TMA kernel: tensor maps of A1, B1, A2, B2 (segment 1's again when segment 2
/// is empty) and C (`c_map`; A1's when there is none), K1, K2, whether to store C by TMA, then C,
/// ldc, bias, R, ldr, M, N, alpha. Layout kn reads B in [64 k][64 n] boxes, or [64 k][32 n] (64-byte
/// swizzle) when the tile width is not a multiple of 64.
fn tma_args(call: &GemmCall, tile: &Sm90Tile) -> Result<Vec<KernelArg>> {
    let maps = |s: &Segment| -> Result<[KernelArg; 2]> {
        let a = tensor_map(s.a, DType::BF16, s.k, call.m, s.lda, BK as u32, tile.bm as u32)?;
        let b = match call.layouts {
            Layouts::Kk => tensor_map(s.b, DType::BF16, s.k, call.n, s.ldb, BK as u32, tile.bn as u32)?,
            _ => tensor_map(s.b, DType::BF16, call.n, s.k, s.ldb, if tile.bn.is_multiple_of(64) { 64 } else { 32 }, BK as u32)?,
        };
        Ok([KernelArg::TensorMap(a), KernelArg::TensorMap(b)])
    };
    let first = maps(&call.seg1)?;
    let second = if call.seg2.k == 0 { first } else { maps(&call.seg2)? };
    let c = c_map(call, tile)?;
    let (r, ldr) = call.residual.unwrap_or((0, 0));
    let mut args = Vec::with_capacity(17);
    args.extend(first);
    args.extend(second);
    args.push(c.map_or(first[0], KernelArg::TensorMap));
    args.extend([
        KernelArg::I32(i32::try_from(call.seg1.k)?),
        KernelArg::I32(i32::try_from(call.seg2.k)?),
        KernelArg::I32(c.is_some() as i32),
        KernelArg::Ptr(call.c),
        KernelArg::I64(call.ldc as i64),
        KernelArg::Ptr(call.bias.unwrap_or(0)),
        KernelArg::Ptr(r),
        KernelArg::I64(ldr as i64),
        KernelArg::I32(i32::try_from(call.m)?),
        KernelArg::I32(i32::try_from(call.n)?),
        KernelArg::F32(call.alpha),
    ]);
    Ok(args)
}

/// Launches `call` on the sm90 kernel of `tile` (the launcher's choice when `None`). The caller has
/// checked [`supports`].
pub(crate) fn gemm_sm90(gpu: &Gpu, call: &GemmCall, tile: Option<Sm90Tile>) -> Result<()> {
    ensure!(supports(gpu, call)?, "gemm_sm90: call not supported here (needs a Hopper GPU, layout Kk/Kn, no split, 16-byte operands): {call:?}");
    if call.m == 0 || call.n == 0 {
        return Ok(());
    }
    let tile = match tile {
        Some(t) => t,
        None => pick_tile(gpu, call.m, call.n, call.seg1.k.div_ceil(BK) + call.seg2.k.div_ceil(BK))?,
    };
    let name = tile.kernel_name(call.layouts, call.out)?;
    let smem = tile.smem() as u32;
    let module = if tile.tma { TMA_MODULE } else { MODULE };
    gpu.function(module, name)?
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .context("gemm_sm90: cannot raise the dynamic shared memory limit")?;
    let block_dim = (tile.threads, 1, 1);
    if tile.tma {
        // A 1-D grid: one CTA per output tile, or for the persistent kernel at most one per SM.
        let ctas = if tile.persistent { tile.tiles(call.m, call.n).min(gpu.sm_count()?) } else { tile.tiles(call.m, call.n) };
        let cfg = LaunchConfig { grid_dim: (ctas as u32, 1, 1), block_dim, shared_mem_bytes: smem };
        gpu.launch(TMA_MODULE, name, cfg, &tma_args(call, &tile)?)
    } else {
        let grid_dim = (call.n.div_ceil(tile.bn) as u32, call.m.div_ceil(tile.bm) as u32, 1);
        gpu.launch(MODULE, name, LaunchConfig { grid_dim, block_dim, shared_mem_bytes: smem }, &call.kernel_args(call.c)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::gemm::tests::{download, gather_rows, poisoned, rand_bf16, sample_rows, sd15_linear_shapes, upload};
    use crate::ops::gemm::{at_b_cpu, linear, linear_cpu, linear_input_grad, linear_input_grad_cpu};
    use crate::rng::Rng;
    use crate::tensor::{assert_close, Tensor};

    /// The alpha every checked call applies.
    const ALPHA: f32 = 0.75;

    /// One two-segment problem on the GPU with the twin of its sampled C rows (Σ over both
    /// segments, before alpha and the epilogue). Storage: Kk A [m, k], B [n, k] (x·Wᵀ + u·Bᵀ);
    /// Kn A [m, k], B [k, n] (dy·W + v·A); Mn A [k, m], B [k, n] (aᵀ·b, k = tokens).
    pub(crate) struct Problem {
        pub(crate) layouts: Layouts,
        pub(crate) m: usize,
        pub(crate) n: usize,
        pub(crate) seg1: Segment,
        pub(crate) seg2: Segment,
        rows: Vec<usize>,
        want: Vec<f32>,
        /// Epilogue operands: bias [n] and the prior C (the residual R = C) [m, n].
        bias: Vec<f32>,
        old: Vec<f32>,
        _bufs: Vec<Tensor>,
    }

    /// (m, k1, n) with a second segment of depth k2 (k2 = 0: none).
    pub(crate) fn problem(gpu: &Gpu, rng: &mut Rng, layouts: Layouts, m: usize, k1: usize, n: usize, k2: usize) -> Problem {
        let rows = sample_rows(rng, m);
        let mut want = vec![0f32; rows.len() * n];
        let mut bufs = Vec::new();
        let mut segs = Vec::new();
        for k in [k1, k2] {
            let kb = k.max(1);
            let (a, b) = (rand_bf16(rng, m * kb, 1.0), rand_bf16(rng, n * kb, 1.0 / (kb as f32).sqrt()));
            if k > 0 {
                let part = match layouts {
                    Layouts::Kk => linear_cpu(&gather_rows(&a, k, &rows), rows.len(), k, &b, n, None),
                    Layouts::Kn => linear_input_grad_cpu(&gather_rows(&a, k, &rows), rows.len(), k, &b, n),
                    Layouts::Mn => {
                        let cols: Vec<f32> = (0..k).flat_map(|t| rows.iter().map(move |&i| (t, i))).map(|(t, i)| a[t * m + i]).collect();
                        at_b_cpu(&cols, k, rows.len(), &b, n)
                    }
                };
                want.iter_mut().zip(part).for_each(|(w, p)| *w += p);
            }
            let (a_shape, lda) = if layouts == Layouts::Mn { ([kb, m], m) } else { ([m, kb], kb) };
            let (b_shape, ldb) = if layouts == Layouts::Kk { ([n, kb], kb) } else { ([kb, n], n) };
            let (ad, bd) = (upload(gpu, &a_shape, &a, DType::BF16), upload(gpu, &b_shape, &b, DType::BF16));
            segs.push(Segment { a: ad.ptr().unwrap(), lda, b: bd.ptr().unwrap(), ldb, k });
            bufs.extend([ad, bd]);
        }
        let (bias, old) = (rand_bf16(rng, n, 0.5), rand_bf16(rng, m * n, 1.0));
        Problem { layouts, m, n, seg1: segs[0], seg2: segs[1], rows, want, bias, old, _bufs: bufs }
    }

    /// The call of `p` into a fresh C of type `out` (poisoned, or holding the prior C when
    /// `with_residual`: R = C itself) with alpha = ALPHA and the bias when `with_bias`; returns the
    /// call and the buffers it points to (bias, C).
    pub(crate) fn call_of(gpu: &Gpu, p: &Problem, out: DType, with_bias: bool, with_residual: bool) -> (GemmCall, Tensor, Tensor) {
        let bias = upload(gpu, &[p.n], &p.bias, DType::BF16);
        let c = if with_residual { upload(gpu, &[p.m, p.n], &p.old, out) } else { poisoned(gpu, &[p.m, p.n], out) };
        let cp = c.ptr().unwrap();
        let call = GemmCall {
            layouts: p.layouts,
            m: p.m,
            n: p.n,
            seg1: p.seg1,
            seg2: p.seg2,
            c: cp,
            ldc: p.n,
            out,
            bias: with_bias.then(|| bias.ptr().unwrap()),
            residual: with_residual.then_some((cp, p.n)),
            alpha: ALPHA,
            split: SplitK::None,
        };
        (call, bias, c)
    }

    /// After `call` ran: C's sampled rows against alpha·Σ + bias + R (relative tolerance `tol`), and
    /// every element written (no poison left). Returns all of C.
    pub(crate) fn check_c(gpu: &Gpu, p: &Problem, call: &GemmCall, c: &Tensor, tol: f64, what: &str) -> Vec<f32> {
        let got = download(gpu, c);
        let mut want: Vec<f32> = p.want.iter().map(|v| ALPHA * v).collect();
        for (i, &row) in p.rows.iter().enumerate() {
            for j in 0..p.n {
                want[i * p.n + j] += if call.bias.is_some() { p.bias[j] } else { 0.0 } + if call.residual.is_some() { p.old[row * p.n + j] } else { 0.0 };
            }
        }
        let what = format!("{what} {:?} bias={} residual=C:{}", call.out, call.bias.is_some(), call.residual.is_some());
        assert_close(&what, &gather_rows(&got, p.n, &p.rows), &want, tol);
        assert_eq!(got.iter().filter(|v| !v.is_finite()).count(), 0, "{what}: unwritten outputs");
        got
    }

    /// Runs `p` on `tile` (see [`call_of`]) and checks C.
    fn check(gpu: &Gpu, p: &Problem, tile: Sm90Tile, out: DType, with_bias: bool, with_residual: bool, what: &str) {
        let (call, _bias, c) = call_of(gpu, p, out, with_bias, with_residual);
        gemm_sm90(gpu, &call, Some(tile)).unwrap();
        check_c(gpu, p, &call, &c, 1e-2, &format!("{what} {}", tile.label()));
    }

    pub(crate) fn hopper(gpu: &Gpu) -> bool {
        let yes = gpu.is_hopper().unwrap();
        if !yes {
            eprintln!("skipped: not a Hopper GPU (or SDLORA_SM90=0)");
        }
        yes
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_sm90_matches_twins_at_sd15_shapes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        if !hopper(&gpu) {
            return;
        }
        for (i, (m, k, n)) in sd15_linear_shapes().into_iter().enumerate() {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            // Second segment: a LoRA rank (a partial 64-deep tile unless a multiple of 64), or none.
            let r = [128, 24, 0, 8][i % 4];
            let fwd = problem(&gpu, &mut rng, Layouts::Kk, m, k, n, r);
            let bwd = problem(&gpu, &mut rng, Layouts::Kn, m, n, k, r);
            for tile in SM90_TILES {
                let what = format!("kk {m}x{k}(+{r})->{n} seed={seed}");
                check(&gpu, &fwd, tile, DType::BF16, true, true, &what);
                check(&gpu, &fwd, tile, DType::F32, true, false, &what);
                let what = format!("kn {m}x{n}(+{r})->{k} seed={seed}");
                check(&gpu, &bwd, tile, DType::F32, false, true, &what);
                check(&gpu, &bwd, tile, DType::BF16, false, false, &what);
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_sm90_handles_odd_sizes_and_unaligned_outputs() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        if !hopper(&gpu) {
            return;
        }
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        // Kk: any N (rows of B past N read as zeros); Kn needs N % 8 == 0. K not a multiple of 64.
        for (layouts, m, k, n, r) in [(Layouts::Kk, 129, 40, 19, 8), (Layouts::Kk, 1, 8, 300, 0), (Layouts::Kn, 333, 72, 136, 16), (Layouts::Kn, 7, 520, 264, 0)] {
            let p = problem(&gpu, &mut rng, layouts, m, k, n, r);
            for tile in SM90_TILES {
                for out in [DType::BF16, DType::F32] {
                    check(&gpu, &p, tile, out, true, true, &format!("{layouts:?} {m}x{k}(+{r})->{n} seed={seed}"));
                }
            }
        }
        // Not 16-byte loadable: the sm_80 kernels keep it.
        let p = problem(&gpu, &mut rng, Layouts::Kk, 64, 12, 64, 0);
        let call = GemmCall { layouts: Layouts::Kk, m: 64, n: 64, seg1: p.seg1, seg2: p.seg2, c: 0, ldc: 64, out: DType::F32, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
        assert!(!supports(&gpu, &call).unwrap(), "K = 12 must not take the sm90 path");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_gemm_dispatch_picks_sm90_on_hopper() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        if !hopper(&gpu) {
            return;
        }
        // The time model's picks at these shapes include every TMA kernel and the 64×64 one.
        let mut picked = Vec::new();
        for (m, k, n) in [(4096, 320, 2560), (8192, 1280, 320), (154, 320, 320)] {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let x = rand_bf16(&mut rng, m * k, 1.0);
            let w = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
            let (xd, wd) = (upload(&gpu, &[m, k], &x, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16));
            let mut y = poisoned(&gpu, &[m, n], DType::BF16);
            let mut dx = poisoned(&gpu, &[m, k], DType::F32);
            gpu.start_profiling();
            linear(&gpu, &xd, &wd, None, None, &mut y).unwrap();
            let dyd = upload(&gpu, &[m, n], &download(&gpu, &y), DType::BF16);
            linear_input_grad(&gpu, &dyd, &wd, false, &mut dx).unwrap();
            let kernels: Vec<&str> = gpu.stop_profiling().unwrap().iter().map(|t| t.name).collect();
            let (fwd, bwd) = (pick_tile(&gpu, m, n, k.div_ceil(BK)).unwrap(), pick_tile(&gpu, m, k, n.div_ceil(BK)).unwrap());
            let mut want = vec![fwd.kernel_name(Layouts::Kk, DType::BF16).unwrap(), bwd.kernel_name(Layouts::Kn, DType::F32).unwrap()];
            let mut ran = kernels.clone();
            want.sort();
            ran.sort();
            assert_eq!(ran, want, "{m}x{k}->{n}: expected the forward and dx on the launcher's sm90 kernels");
            picked.extend([fwd.label(), bwd.label()]);
            let rows = sample_rows(&mut rng, m);
            let want = linear_cpu(&gather_rows(&x, k, &rows), rows.len(), k, &w, n, None);
            assert_close(&format!("linear {m}x{k}->{n} seed={seed}"), &gather_rows(&download(&gpu, &y), n, &rows), &want, 1e-2);
            let dy = download(&gpu, &y);
            let want = linear_input_grad_cpu(&gather_rows(&dy, n, &rows), rows.len(), n, &w, k);
            assert_close(&format!("dx {m}x{n}->{k} seed={seed}"), &gather_rows(&download(&gpu, &dx), k, &rows), &want, 1e-2);
        }
        for tile in SM90_TILES.iter().filter(|t| t.tma || t.bm == 64) {
            assert!(picked.contains(&tile.label()), "{} never dispatched; picked {picked:?}", tile.label());
        }
    }
}
