//! Tensor-core GEMMs (kernels/gemm.cu): the linear layer `y = x·Wᵀ + b (+ r)`, its input gradient
//! `dx = dy·W` (weights frozen: no weight gradient), and the weight-gradient product `c = α·aᵀ·b`
//! used for the LoRA factors. bf16 operands, f32 accumulation, bf16 or f32 outputs.
//!
//! CPU twins (f32, naive): [`linear_cpu`], [`linear_input_grad_cpu`], [`at_b_cpu`].
//!
//! All three are one kernel family, `C = α·Σ_k A(m,k)·B(n,k) + bias + R`, whose operands are read in
//! the layout they are stored in (no transposes in memory) and whose K sum can run over two segments
//! from two pointer pairs (the fused LoRA linear in `ops::lora` uses that for its concatenated K).

use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};

const MODULE: &str = "gemm";
/// The shape of a block tile (must match GEMM_TILES in kernels/gemm.cu): K depth of one pipeline
/// stage, threads per block, pipeline stages, blocks per SM.
#[derive(Clone, Copy, Debug)]
struct TileShape {
    bk: usize,
    threads: u32,
    stages: usize,
    per_sm: usize,
}

fn tile_shape((bm, bn): (usize, usize)) -> TileShape {
    match (bm, bn) {
        (256, 128) | (128, 256) => TileShape { bk: 64, threads: 256, stages: 3, per_sm: 1 },
        (128, 128) => TileShape { bk: 32, threads: 256, stages: 4, per_sm: 2 },
        (128, 64) => TileShape { bk: 32, threads: 128, stages: 6, per_sm: 2 },
        _ => TileShape { bk: 32, threads: 128, stages: 8, per_sm: 3 },
    }
}

/// Dynamic shared memory of a tile: the pipeline's stages, or the f32 C tile of the epilogue that
/// reuses them.
fn tile_smem(tile: (usize, usize)) -> usize {
    let t = tile_shape(tile);
    (t.stages * (tile.0 + tile.1) * t.bk * 2).max(tile.0 * tile.1 * 4)
}

/// y[m×n] = x[m×k]·W[n×k]ᵀ + b — PyTorch's `F.linear`.
pub fn linear_cpu(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear_cpu: x is not m×k");
    assert_eq!(w.len(), n * k, "linear_cpu: w is not n×k");
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let dot: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            y[i * n + j] = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// dx[m×k] = dy[m×n]·W[n×k] — the input gradient of [`linear_cpu`].
pub fn linear_input_grad_cpu(dy: &[f32], m: usize, n: usize, w: &[f32], k: usize) -> Vec<f32> {
    assert_eq!(dy.len(), m * n);
    assert_eq!(w.len(), n * k);
    let mut dx = vec![0f32; m * k];
    for i in 0..m {
        for j in 0..n {
            let g = dy[i * n + j];
            for (d, &wv) in dx[i * k..(i + 1) * k].iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *d += g * wv;
            }
        }
    }
    dx
}

/// c[p×q] = aᵀ·b for a [m×p], b [m×q] — a weight gradient (reduction over the m tokens).
pub fn at_b_cpu(a: &[f32], m: usize, p: usize, b: &[f32], q: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * p);
    assert_eq!(b.len(), m * q);
    let mut c = vec![0f32; p * q];
    for t in 0..m {
        for i in 0..p {
            let av = a[t * p + i];
            for (cv, &bv) in c[i * q..(i + 1) * q].iter_mut().zip(&b[t * q..(t + 1) * q]) {
                *cv += av * bv;
            }
        }
    }
    c
}

/// Operand layouts of a GEMM (see kernels/gemm.cu): `Kk` reads A(m,k) = A[m·lda+k] and
/// B(n,k) = B[n·ldb+k] (x·Wᵀ); `Kn` reads B(n,k) = B[k·ldb+n] (dy·W); `Mn` also reads
/// A(m,k) = A[k·lda+m] (aᵀ·b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layouts {
    Kk,
    Kn,
    Mn,
}

/// One K segment: device pointers and leading dimensions (in elements) of A and B, and its depth.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Segment {
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub k: usize,
}

/// A GEMM launch: C[m×n] (leading dimension `ldc`, type `out`) = alpha·Σ over both segments
/// + bias[n] (bf16) + R (type `out`, leading dimension given; may be C itself).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmCall {
    pub layouts: Layouts,
    pub m: usize,
    pub n: usize,
    pub seg1: Segment,
    pub seg2: Segment,
    pub c: u64,
    pub ldc: usize,
    pub out: DType,
    pub bias: Option<u64>,
    pub residual: Option<(u64, usize)>,
    pub alpha: f32,
    /// Whether the K loop is split over several blocks per output tile.
    pub split: SplitK,
}

impl GemmCall {
    /// The arguments every GEMM kernel starts with (both segments, C at `c`, bias, R, M, N, alpha).
    pub(crate) fn kernel_args(&self, c: u64) -> Result<Vec<KernelArg>> {
        let (s1, s2) = (self.seg1, self.seg2);
        let (r, ldr) = self.residual.unwrap_or((0, 0));
        Ok(vec![
            KernelArg::Ptr(s1.a),
            KernelArg::I64(s1.lda as i64),
            KernelArg::Ptr(s1.b),
            KernelArg::I64(s1.ldb as i64),
            KernelArg::I32(i32_of(s1.k)?),
            KernelArg::Ptr(s2.a),
            KernelArg::I64(s2.lda as i64),
            KernelArg::Ptr(s2.b),
            KernelArg::I64(s2.ldb as i64),
            KernelArg::I32(i32_of(s2.k)?),
            KernelArg::Ptr(c),
            KernelArg::I64(self.ldc as i64),
            KernelArg::Ptr(self.bias.unwrap_or(0)),
            KernelArg::Ptr(r),
            KernelArg::I64(ldr as i64),
            KernelArg::I32(i32_of(self.m)?),
            KernelArg::I32(i32_of(self.n)?),
            KernelArg::F32(self.alpha),
        ])
    }
}

/// How the K loop of a GEMM is split over blocks (f32 C without bias or residual only). The slice
/// count must come from [`k_slices`] (every slice gets at least one K tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitK {
    /// One block per output tile.
    None,
    /// That many slices, each adding its partial sum into C with f32 atomics (C holds zeros or the
    /// sum to accumulate into).
    Atomic(usize),
    /// That many slices, slice s storing its partial sum to workspace + s·m·ldc (f32; C itself is
    /// not written): `gemm_splitk_reduce_f32` adds them up.
    Workspace(u64, usize),
}

/// Block tile (BM, BN) choices, largest first.
pub(crate) const TILES: [(usize, usize); 5] = [(128, 256), (256, 128), (128, 128), (128, 64), (64, 64)];

/// The kernel of a tile, operand layouts and output type: gemm_<BM>x<BN>_<layouts>_<out>.
fn kernel_name(tile: (usize, usize), layouts: Layouts, out: DType) -> Result<&'static str> {
    Ok(match (tile, layouts, out) {
        ((256, 128), Layouts::Kk, DType::BF16) => "gemm_256x128_kk_bf16",
        ((128, 256), Layouts::Kk, DType::BF16) => "gemm_128x256_kk_bf16",
        ((128, 128), Layouts::Kk, DType::BF16) => "gemm_128x128_kk_bf16",
        ((128, 64), Layouts::Kk, DType::BF16) => "gemm_128x64_kk_bf16",
        ((64, 64), Layouts::Kk, DType::BF16) => "gemm_64x64_kk_bf16",
        ((256, 128), Layouts::Kk, DType::F32) => "gemm_256x128_kk_f32",
        ((128, 256), Layouts::Kk, DType::F32) => "gemm_128x256_kk_f32",
        ((128, 128), Layouts::Kk, DType::F32) => "gemm_128x128_kk_f32",
        ((128, 64), Layouts::Kk, DType::F32) => "gemm_128x64_kk_f32",
        ((64, 64), Layouts::Kk, DType::F32) => "gemm_64x64_kk_f32",
        ((256, 128), Layouts::Kn, DType::BF16) => "gemm_256x128_kn_bf16",
        ((128, 256), Layouts::Kn, DType::BF16) => "gemm_128x256_kn_bf16",
        ((128, 128), Layouts::Kn, DType::BF16) => "gemm_128x128_kn_bf16",
        ((128, 64), Layouts::Kn, DType::BF16) => "gemm_128x64_kn_bf16",
        ((64, 64), Layouts::Kn, DType::BF16) => "gemm_64x64_kn_bf16",
        ((256, 128), Layouts::Kn, DType::F32) => "gemm_256x128_kn_f32",
        ((128, 256), Layouts::Kn, DType::F32) => "gemm_128x256_kn_f32",
        ((128, 128), Layouts::Kn, DType::F32) => "gemm_128x128_kn_f32",
        ((128, 64), Layouts::Kn, DType::F32) => "gemm_128x64_kn_f32",
        ((64, 64), Layouts::Kn, DType::F32) => "gemm_64x64_kn_f32",
        ((256, 128), Layouts::Mn, DType::F32) => "gemm_256x128_mn_f32",
        ((128, 256), Layouts::Mn, DType::F32) => "gemm_128x256_mn_f32",
        ((128, 128), Layouts::Mn, DType::F32) => "gemm_128x128_mn_f32",
        ((128, 64), Layouts::Mn, DType::F32) => "gemm_128x64_mn_f32",
        ((64, 64), Layouts::Mn, DType::F32) => "gemm_64x64_mn_f32",
        _ => bail!("gemm: no kernel for tile {tile:?}, layouts {layouts:?}, output {out:?}"),
    })
}

fn sm_count(gpu: &Gpu) -> Result<usize> {
    Ok(gpu.stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize)
}

/// A tile's relative throughput per SM when every SM is busy (measured on an H100 at the SD1.5
/// shapes: benches/RESULTS.md, rows `linear_tile*`).
fn tile_rate(tile: (usize, usize)) -> f64 {
    match tile {
        (256, 128) | (128, 256) => 1.0,
        (128, 128) => 0.85,
        (128, 64) => 0.8,
        _ => 0.7,
    }
}

/// Whether a tile's shared memory fits in one block on this GPU (the big tiles need an H100-class
/// 227 KiB; consumer cards give 99 KiB and take the smaller tiles).
fn tile_fits(gpu: &Gpu, tile: (usize, usize)) -> Result<bool> {
    let optin = gpu.stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    Ok(tile_smem(tile) <= optin as usize)
}

/// The tile the launcher picks: the least estimated time, counting whole waves (a partly filled
/// last wave costs as much as a full one) over the SMs at each tile's occupancy.
pub(crate) fn pick_tile(gpu: &Gpu, m: usize, n: usize) -> Result<(usize, usize)> {
    let sms = sm_count(gpu)?;
    let cost = |tile: (usize, usize)| {
        let occ = tile_shape(tile).per_sm;
        let blocks = m.div_ceil(tile.0) * n.div_ceil(tile.1);
        let waves = blocks.div_ceil(sms * occ);
        (waves * occ * tile.0 * tile.1) as f64 / tile_rate(tile)
    };
    let mut best = TILES[TILES.len() - 1];
    for tile in TILES {
        if tile_fits(gpu, tile)? && cost(tile) < cost(best) {
            best = tile;
        }
    }
    Ok(best)
}

/// Launches one GEMM with the launcher's tile choice. A GEMM whose output tiles fill at most half
/// of the SMs and whose K is deep (≥ 16 K tiles) is split along K: the slices' f32 partial sums go to a
/// workspace from the **scratch arena**, and `gemm_splitk_finish_*` adds them up with the bias
/// and the residual (two launches instead of one K loop of 16+ tiles per block). Other calls run on
/// the wgmma kernels of `ops::gemm_sm90` where the GPU is a Hopper and the operands allow it.
pub(crate) fn gemm(gpu: &Gpu, call: &GemmCall) -> Result<()> {
    let tile = pick_tile(gpu, call.m, call.n)?;
    let blocks = call.m.div_ceil(tile.0) * call.n.div_ceil(tile.1);
    if call.split == SplitK::None && blocks > 0 && 2 * blocks <= sm_count(gpu)? && k_tiles(call, tile) >= 16 {
        let slices = k_slices(gpu, call, tile)?;
        if slices > 1 {
            return gemm_split_finish(gpu, call, tile, slices);
        }
    }
    if super::gemm_sm90::supports(gpu, call)? {
        return super::gemm_sm90::gemm_sm90(gpu, call, None);
    }
    gemm_with_tile(gpu, call, tile)
}

/// [`gemm`] split into `slices` K slices: partial sums (alpha applied) into a scratch workspace
/// [slices, m, n] f32, then C = Σ + bias + R.
fn gemm_split_finish(gpu: &Gpu, call: &GemmCall, tile: (usize, usize), slices: usize) -> Result<()> {
    let (m, n) = (call.m, call.n);
    // The workspace handle lives until both launches are queued (stream order keeps it safe after).
    let ws_buf = gpu.alloc(ArenaKind::Scratch, slices * m * n * 4)?;
    let ws = ws_buf.ptr();
    let part = GemmCall { ldc: n, out: DType::F32, bias: None, residual: None, split: SplitK::Workspace(ws, slices), ..*call };
    gemm_with_tile(gpu, &part, tile)?;
    let name = match call.out {
        DType::BF16 => "gemm_splitk_finish_bf16",
        DType::F32 => "gemm_splitk_finish_f32",
    };
    let (r, ldr) = call.residual.unwrap_or((0, 0));
    let threads = 256;
    let cfg = LaunchConfig { grid_dim: ((m * n).div_ceil(threads).min(8 * sm_count(gpu)?) as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
    let args = [
        KernelArg::Ptr(ws),
        KernelArg::I32(i32_of(slices)?),
        KernelArg::I32(i32_of(m)?),
        KernelArg::I32(i32_of(n)?),
        KernelArg::Ptr(call.c),
        KernelArg::I64(call.ldc as i64),
        KernelArg::Ptr(call.bias.unwrap_or(0)),
        KernelArg::Ptr(r),
        KernelArg::I64(ldr as i64),
    ];
    gpu.launch(MODULE, name, cfg, &args)?;
    drop(ws_buf);
    Ok(())
}

/// K tiles of `call` with block tile `tile`.
fn k_tiles(call: &GemmCall, tile: (usize, usize)) -> usize {
    let bk = tile_shape(tile).bk;
    call.seg1.k.div_ceil(bk) + call.seg2.k.div_ceil(bk)
}

/// How many K slices a split-K GEMM gets with block tile `tile`: enough for about two blocks per
/// SM when the output tiles alone do not fill the GPU, each slice at least 256 deep in K.
pub(crate) fn k_slices(gpu: &Gpu, call: &GemmCall, tile: (usize, usize)) -> Result<usize> {
    let ktiles = k_tiles(call, tile);
    let blocks = call.m.div_ceil(tile.0) * call.n.div_ceil(tile.1);
    let sms = sm_count(gpu)?;
    if blocks >= sms {
        return Ok(1);
    }
    let split = (2 * sms).div_ceil(blocks).min(ktiles / (256 / tile_shape(tile).bk)).max(1);
    let per_slice = ktiles.div_ceil(split).max(1);
    Ok(ktiles.div_ceil(per_slice).max(1))
}

/// Launches one GEMM with block tile `tile` (one of [`TILES`]).
pub(crate) fn gemm_with_tile(gpu: &Gpu, call: &GemmCall, tile: (usize, usize)) -> Result<()> {
    let name = kernel_name(tile, call.layouts, call.out)?;
    let (bm, bn) = tile;
    let shape = tile_shape(tile);
    if call.m == 0 || call.n == 0 {
        return Ok(());
    }
    let ktiles = k_tiles(call, tile);
    let (split, c, split_stride) = match call.split {
        SplitK::None => (1, call.c, 0),
        SplitK::Atomic(s) => (s, call.c, 0),
        SplitK::Workspace(ws, s) => (s, ws, call.m * call.ldc),
    };
    let tiles_per_split = ktiles.div_ceil(split).max(1);
    if split > 1 {
        ensure!(call.out == DType::F32 && call.bias.is_none() && call.residual.is_none(), "gemm: split-K needs an f32 output without epilogue");
        ensure!(ktiles.div_ceil(tiles_per_split) == split, "gemm: {split} K slices leave some empty ({ktiles} K tiles): use k_slices");
    }
    let smem = tile_smem(tile) as u32;
    if smem > 48 * 1024 {
        gpu.function(MODULE, name)?
            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .context("gemm: cannot raise the dynamic shared memory limit")?;
    }
    ensure!(tile_fits(gpu, tile)?, "gemm: tile {tile:?} needs {smem} bytes of shared memory, more than this GPU gives a block");
    let cfg = LaunchConfig {
        grid_dim: (call.n.div_ceil(bn) as u32, call.m.div_ceil(bm) as u32, split as u32),
        block_dim: (shape.threads, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut args = call.kernel_args(c)?;
    args.extend([KernelArg::I32(i32_of(tiles_per_split)?), KernelArg::I64(split_stride as i64)]);
    gpu.launch(MODULE, name, cfg, &args)
}

fn i32_of(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("gemm: dimension {v} does not fit in i32"))
}

/// (rows, last dim) of a tensor seen as a matrix.
pub(crate) fn as_matrix(t: &Tensor) -> (usize, usize) {
    let cols = *t.shape().last().unwrap_or(&1);
    (t.numel().checked_div(cols).unwrap_or(0), cols)
}

pub(crate) fn check_on_gpu(what: &str, name: &str, t: &Tensor, dtype: Option<DType>) -> Result<()> {
    ensure!(t.is_gpu(), "{what}: {name} is on the CPU");
    if let Some(d) = dtype {
        ensure!(t.dtype() == d, "{what}: {name} is {:?}, expected {d:?}", t.dtype());
    }
    Ok(())
}

/// y[M×N] = x[M×K]·W[N×K]ᵀ (+ bias[N]) (+ residual[M×N]) — a linear layer, fused epilogue.
///
/// x: bf16 `[.., K]`; w: bf16 `[N, K]` (PyTorch's layout); bias: bf16 `[N]`; y and residual: bf16 or
/// f32 `[.., N]` of the same type. Any M; K and N must be multiples of 8 (16-byte rows).
pub fn linear(gpu: &Gpu, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    const WHAT: &str = "linear";
    check_on_gpu(WHAT, "x", x, Some(DType::BF16))?;
    check_on_gpu(WHAT, "w", w, Some(DType::BF16))?;
    check_on_gpu(WHAT, "y", y, None)?;
    ensure!(w.shape().len() == 2, "{WHAT}: w must be [out, in], got {:?}", w.shape());
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let (m, xk) = as_matrix(x);
    ensure!(xk == k, "{WHAT}: x {:?} has {xk} features but w {:?} takes {k}", x.shape(), w.shape());
    ensure!(k % 8 == 0 && n % 8 == 0, "{WHAT}: in ({k}) and out ({n}) features must be multiples of 8 (16-byte rows for cp.async)");
    ensure!(as_matrix(y) == (m, n), "{WHAT}: y {:?} must be [.., {n}] with {m} rows (x is {:?})", y.shape(), x.shape());
    if let Some(b) = bias {
        check_on_gpu(WHAT, "bias", b, Some(DType::BF16))?;
        ensure!(b.numel() == n, "{WHAT}: bias {:?} must hold {n} values", b.shape());
    }
    if let Some(r) = residual {
        check_on_gpu(WHAT, "residual", r, Some(y.dtype()))?;
        ensure!(as_matrix(r) == (m, n), "{WHAT}: residual {:?} must be shaped like y {:?}", r.shape(), y.shape());
    }
    let call = GemmCall {
        layouts: Layouts::Kk,
        m,
        n,
        seg1: Segment { a: x.ptr()?, lda: k, b: w.ptr()?, ldb: k, k },
        seg2: Segment::default(),
        c: y.ptr()?,
        ldc: n,
        out: y.dtype(),
        bias: bias.map(|b| b.ptr()).transpose()?,
        residual: residual.map(|r| r.ptr().map(|p| (p, n))).transpose()?,
        alpha: 1.0,
        split: SplitK::None,
    };
    gemm(gpu, &call)
}

/// dx[M×K] = dy[M×N]·W[N×K] (+ dx when `accumulate`) — the input gradient of a frozen linear.
///
/// dy: bf16 `[.., N]`; w: bf16 `[N, K]`; dx: bf16 or f32 `[.., K]`. K and N multiples of 8.
pub fn linear_input_grad(gpu: &Gpu, dy: &Tensor, w: &Tensor, accumulate: bool, dx: &mut Tensor) -> Result<()> {
    const WHAT: &str = "linear_input_grad";
    check_on_gpu(WHAT, "dy", dy, Some(DType::BF16))?;
    check_on_gpu(WHAT, "w", w, Some(DType::BF16))?;
    check_on_gpu(WHAT, "dx", dx, None)?;
    ensure!(w.shape().len() == 2, "{WHAT}: w must be [out, in], got {:?}", w.shape());
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let (m, dn) = as_matrix(dy);
    ensure!(dn == n, "{WHAT}: dy {:?} has {dn} features but w {:?} has {n} outputs", dy.shape(), w.shape());
    ensure!(k % 8 == 0 && n % 8 == 0, "{WHAT}: in ({k}) and out ({n}) features must be multiples of 8 (16-byte rows for cp.async)");
    ensure!(as_matrix(dx) == (m, k), "{WHAT}: dx {:?} must be [.., {k}] with {m} rows", dx.shape());
    let c = dx.ptr()?;
    let call = GemmCall {
        layouts: Layouts::Kn,
        m,
        n: k,
        seg1: Segment { a: dy.ptr()?, lda: n, b: w.ptr()?, ldb: k, k: n },
        seg2: Segment::default(),
        c,
        ldc: k,
        out: dx.dtype(),
        bias: None,
        residual: accumulate.then_some((c, k)),
        alpha: 1.0,
        split: SplitK::None,
    };
    gemm(gpu, &call)
}

/// c[P×Q] = alpha·a[M×P]ᵀ·b[M×Q] (+ c when `accumulate`) — a weight gradient, reduced over the M
/// tokens (split over several blocks when P·Q alone cannot fill the GPU). a, b: bf16; c: f32.
/// Any sizes (rows whose length is not a multiple of 8 take a slower load path).
pub fn at_b(gpu: &Gpu, a: &Tensor, b: &Tensor, alpha: f32, accumulate: bool, c: &mut Tensor) -> Result<()> {
    const WHAT: &str = "at_b";
    check_on_gpu(WHAT, "a", a, Some(DType::BF16))?;
    check_on_gpu(WHAT, "b", b, Some(DType::BF16))?;
    check_on_gpu(WHAT, "c", c, Some(DType::F32))?;
    let ((m, p), (mb, q)) = (as_matrix(a), as_matrix(b));
    ensure!(m == mb, "{WHAT}: a {:?} and b {:?} must have the same number of rows", a.shape(), b.shape());
    ensure!(as_matrix(c) == (p, q), "{WHAT}: c {:?} must be [{p}, {q}]", c.shape());
    at_b_raw(gpu, (a.ptr()?, p), (b.ptr()?, q), m, p, q, alpha, accumulate, c)
}

/// [`at_b`] on raw operands (pointer, leading dimension), for callers holding scratch buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn at_b_raw(gpu: &Gpu, a: (u64, usize), b: (u64, usize), m: usize, p: usize, q: usize, alpha: f32, accumulate: bool, c: &Tensor) -> Result<()> {
    at_b_many(gpu, &[AtB { a, b, m, p, q, alpha, c: c.ptr()? }], accumulate, WeightGradSplit::Workspace)
}

/// One weight-gradient product c[p×q] (f32) = alpha·a[m×p]ᵀ·b[m×q] on raw operands (pointer,
/// leading dimension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AtB {
    pub a: (u64, usize),
    pub b: (u64, usize),
    pub m: usize,
    pub p: usize,
    pub q: usize,
    pub alpha: f32,
    pub c: u64,
}

/// How [`at_b_many`] adds up the K slices of a split product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightGradSplit {
    /// f32 atomics into C.
    Atomic,
    /// Partial sums in a scratch workspace, then one reduction launch for every split product.
    Workspace,
}

/// Several weight-gradient products (added to c when `accumulate`): each split along its token
/// axis when its output alone cannot fill the GPU; with `WeightGradSplit::Workspace`, one
/// reduction launch finishes them all (the LoRA backward's dA and dB: three launches in all).
pub(crate) fn at_b_many(gpu: &Gpu, problems: &[AtB], accumulate: bool, how: WeightGradSplit) -> Result<()> {
    // (workspace, slices, p·q, c); the workspace handles live until the reductions are queued.
    let mut pending: Vec<(u64, usize, usize, u64)> = Vec::new();
    let mut workspaces = Vec::new();
    for pr in problems {
        let mut call = GemmCall {
            layouts: Layouts::Mn,
            m: pr.p,
            n: pr.q,
            seg1: Segment { a: pr.a.0, lda: pr.a.1, b: pr.b.0, ldb: pr.b.1, k: pr.m },
            seg2: Segment::default(),
            c: pr.c,
            ldc: pr.q,
            out: DType::F32,
            bias: None,
            residual: None,
            alpha: pr.alpha,
            split: SplitK::None,
        };
        let tile = pick_tile(gpu, pr.p, pr.q)?;
        let slices = k_slices(gpu, &call, tile)?;
        if slices == 1 {
            // One slice: accumulate through the epilogue's residual read.
            call.residual = accumulate.then_some((pr.c, pr.q));
        } else if how == WeightGradSplit::Atomic {
            if !accumulate {
                let bytes = pr.p * pr.q * 4;
                unsafe { cudarc::driver::result::memset_d8_async(pr.c, 0, bytes, gpu.stream().cu_stream()) }.context("gemm: memset failed")?;
            }
            call.split = SplitK::Atomic(slices);
        } else {
            let buf = gpu.alloc(ArenaKind::Scratch, slices * pr.p * pr.q * 4)?;
            let ws = buf.ptr();
            workspaces.push(buf);
            call.split = SplitK::Workspace(ws, slices);
            pending.push((ws, slices, pr.p * pr.q, pr.c));
        }
        gemm_with_tile(gpu, &call, tile)?;
    }
    for pair in pending.chunks(2) {
        let (ws1, s1, n1, c1) = pair[0];
        let (ws2, s2, n2, c2) = pair.get(1).copied().unwrap_or((0, 0, 0, 0));
        let threads = 256;
        let cfg = LaunchConfig { grid_dim: ((n1 + n2).div_ceil(threads).min(4 * sm_count(gpu)?) as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
        let args = [
            KernelArg::Ptr(ws1),
            KernelArg::I32(i32_of(s1)?),
            KernelArg::I64(n1 as i64),
            KernelArg::Ptr(c1),
            KernelArg::Ptr(ws2),
            KernelArg::I32(i32_of(s2)?),
            KernelArg::I64(n2 as i64),
            KernelArg::Ptr(c2),
            KernelArg::I32(accumulate as i32),
        ];
        gpu.launch(MODULE, "gemm_splitk_reduce_f32", cfg, &args)?;
    }
    drop(workspaces);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::finite_difference;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, round_bf16};

    /// Random bf16-representable values (so the f32 twin sees exactly what the GPU sees).
    pub(crate) fn rand_bf16(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
        round_bf16(&rng.normal_vec(n, std))
    }

    pub(crate) use crate::testing::{download, poisoned, upload};

    /// Rows checked against the twin: all of them for small m, else the first, the last and 46 random.
    pub(crate) fn sample_rows(rng: &mut Rng, m: usize) -> Vec<usize> {
        if m <= 512 {
            return (0..m).collect();
        }
        let mut rows: Vec<usize> = (0..46).map(|_| (rng.next_u64() % m as u64) as usize).collect();
        rows.extend([0, m - 1]);
        rows
    }

    pub(crate) fn gather_rows(v: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied()).collect()
    }

    #[test]
    fn twins_agree_with_each_other_and_small_cases() {
        // [[1,2],[3,4]]·[[1,0],[1,1]]ᵀ + [10, 20] = [[11, 23], [13, 27]]
        assert_eq!(linear_cpu(&[1., 2., 3., 4.], 2, 2, &[1., 0., 1., 1.], 2, Some(&[10., 20.])), vec![11., 23., 13., 27.]);
        let mut rng = Rng::new(3);
        let (m, k, n) = (5, 7, 3);
        let (a, b) = (rng.normal_vec(m * k, 1.0), rng.normal_vec(m * n, 1.0));
        // aᵀ·b computed as linear over transposed copies.
        let t = |v: &[f32], r: usize, c: usize| (0..c * r).map(|i| v[(i % r) * c + i / r]).collect::<Vec<f32>>();
        assert_close("at_b vs linear", &at_b_cpu(&a, m, k, &b, n), &linear_cpu(&t(&a, m, k), k, m, &t(&b, m, n), n, None), 1e-6);
    }

    #[test]
    fn linear_input_grad_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let (m, k, n) = (3, 5, 4);
        let (x, w, g) = (rng.normal_vec(m * k, 1.0), rng.normal_vec(n * k, 1.0), rng.normal_vec(m * n, 1.0));
        let loss = |xs: &[f32]| linear_cpu(xs, m, k, &w, n, None).iter().zip(&g).map(|(y, g)| (*y as f64) * (*g as f64)).sum();
        let numeric: Vec<f32> = finite_difference(&x, 1e-2, loss).iter().map(|&v| v as f32).collect();
        assert_close("dx vs finite differences", &linear_input_grad_cpu(&g, m, n, &w, k), &numeric, 1e-3);
        // The weight gradient of the same loss is gᵀ·x (what at_b computes for LoRA factors).
        let loss_w = |ws: &[f32]| linear_cpu(&x, m, k, ws, n, None).iter().zip(&g).map(|(y, g)| (*y as f64) * (*g as f64)).sum();
        let numeric: Vec<f32> = finite_difference(&w, 1e-2, loss_w).iter().map(|&v| v as f32).collect();
        assert_close("dW vs finite differences", &at_b_cpu(&g, m, n, &x, k), &numeric, 1e-3);
    }

    /// (M, K, N) of every linear in SD1.5's UNet at 512 px, batch 1 and 2, plus odd token counts.
    pub(crate) fn sd15_linear_shapes() -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for (tokens, d) in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)] {
            for batch in [1, 2] {
                let m = tokens * batch;
                v.extend([(m, d, d), (m, d, 8 * d), (m, 4 * d, d)]);
            }
        }
        for d in [320, 640, 1280] {
            v.extend([(77, 768, d), (154, 768, d)]);
        }
        v.extend([(1, 320, 1280), (1, 1280, 1280), (333, 640, 320), (77, 320, 2560)]);
        v
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_linear_matches_twin_at_sd15_shapes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for (m, k, n) in sd15_linear_shapes() {
            for out in [DType::BF16, DType::F32] {
                let seed = Rng::fresh_seed();
                let mut rng = Rng::new(seed);
                let x = rand_bf16(&mut rng, m * k, 1.0);
                let w = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
                let b = rand_bf16(&mut rng, n, 0.5);
                let r = rand_bf16(&mut rng, m * n, 1.0);
                let (xd, wd, bd) = (upload(&gpu, &[m, k], &x, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16), upload(&gpu, &[n], &b, DType::BF16));
                // bf16 output: bias + residual epilogue; f32 output: bias only.
                let rd = (out == DType::BF16).then(|| upload(&gpu, &[m, n], &r, out));
                let mut y = poisoned(&gpu, &[m, n], out);
                linear(&gpu, &xd, &wd, Some(&bd), rd.as_ref(), &mut y).unwrap();
                let got = download(&gpu, &y);
                let rows = sample_rows(&mut rng, m);
                let mut want = linear_cpu(&gather_rows(&x, k, &rows), rows.len(), k, &w, n, Some(&b));
                if rd.is_some() {
                    want.iter_mut().zip(gather_rows(&r, n, &rows)).for_each(|(y, r)| *y += r);
                }
                assert_close(&format!("linear {m}x{k}->{n} {out:?} seed={seed}"), &gather_rows(&got, n, &rows), &want, 1e-2);
                assert_eq!(got.iter().filter(|v| !v.is_finite()).count(), 0, "linear {m}x{k}->{n}: unwritten outputs (seed {seed})");
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_linear_input_grad_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for (i, (m, k, n)) in sd15_linear_shapes().into_iter().enumerate() {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let dy = rand_bf16(&mut rng, m * n, 1.0);
            let w = rand_bf16(&mut rng, n * k, 1.0 / (n as f32).sqrt());
            let old = rand_bf16(&mut rng, m * k, 1.0);
            let (dyd, wd) = (upload(&gpu, &[m, n], &dy, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16));
            // Alternate: bf16 dx written fresh, f32 dx accumulated onto existing values.
            let accumulate = i % 2 == 1;
            let mut dx = if accumulate { upload(&gpu, &[m, k], &old, DType::F32) } else { poisoned(&gpu, &[m, k], DType::BF16) };
            linear_input_grad(&gpu, &dyd, &wd, accumulate, &mut dx).unwrap();
            let got = download(&gpu, &dx);
            let rows = sample_rows(&mut rng, m);
            let mut want = linear_input_grad_cpu(&gather_rows(&dy, n, &rows), rows.len(), n, &w, k);
            if accumulate {
                want.iter_mut().zip(gather_rows(&old, k, &rows)).for_each(|(a, o)| *a += o);
            }
            assert_close(&format!("dx {m}x{n}->{k} accumulate={accumulate} seed={seed}"), &gather_rows(&got, k, &rows), &want, 1e-2);
            assert_eq!(got.iter().filter(|v| !v.is_finite()).count(), 0, "dx {m}x{n}->{k}: unwritten outputs (seed {seed})");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_at_b_matches_twin_with_split_k_and_odd_sizes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // (M tokens, P, Q): LoRA factor gradients (split-K), a square one (no split), odd sizes.
        let shapes = [(8192, 320, 128), (8192, 128, 320), (2048, 640, 128), (154, 1280, 128), (128, 128, 1280), (1024, 1280, 1280), (333, 13, 320), (77, 5, 7), (1000, 320, 1)];
        for (m, p, q) in shapes {
            for accumulate in [false, true] {
                let seed = Rng::fresh_seed();
                let mut rng = Rng::new(seed);
                let (a, b) = (rand_bf16(&mut rng, m * p, 1.0), rand_bf16(&mut rng, m * q, 1.0));
                let old = rng.normal_vec(p * q, 10.0);
                let (ad, bd) = (upload(&gpu, &[m, p], &a, DType::BF16), upload(&gpu, &[m, q], &b, DType::BF16));
                let mut c = if accumulate { upload(&gpu, &[p, q], &old, DType::F32) } else { poisoned(&gpu, &[p, q], DType::F32) };
                at_b(&gpu, &ad, &bd, 0.75, accumulate, &mut c).unwrap();
                let mut want: Vec<f32> = at_b_cpu(&a, m, p, &b, q).iter().map(|v| 0.75 * v).collect();
                if accumulate {
                    want.iter_mut().zip(&old).for_each(|(w, o)| *w += o);
                }
                assert_close(&format!("at_b {m}: {p}x{q} accumulate={accumulate} seed={seed}"), &download(&gpu, &c), &want, 1e-2);
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_every_tile_and_layout_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        // Odd M, N and K (not multiples of 8: the scalar load path) and aligned ones (cp.async path).
        for (m, k, n) in [(333, 200, 136), (129, 37, 19), (300, 96, 72)] {
            let x = rand_bf16(&mut rng, m * k, 1.0);
            let w = rand_bf16(&mut rng, n * k, 0.1);
            let dy = rand_bf16(&mut rng, m * n, 1.0);
            let (xd, wd, dyd) = (upload(&gpu, &[m, k], &x, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16), upload(&gpu, &[m, n], &dy, DType::BF16));
            for tile in TILES {
                for out in [DType::BF16, DType::F32] {
                    let y = poisoned(&gpu, &[m, n], out);
                    let seg = Segment { a: xd.ptr().unwrap(), lda: k, b: wd.ptr().unwrap(), ldb: k, k };
                    let call = GemmCall { layouts: Layouts::Kk, m, n, seg1: seg, seg2: Segment::default(), c: y.ptr().unwrap(), ldc: n, out, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
                    gemm_with_tile(&gpu, &call, tile).unwrap();
                    let what = format!("kk {m}x{k}->{n} tile {tile:?} {out:?} seed={seed}");
                    assert_close(&what, &download(&gpu, &y), &linear_cpu(&x, m, k, &w, n, None), 1e-2);

                    let dx = poisoned(&gpu, &[m, k], out);
                    let seg = Segment { a: dyd.ptr().unwrap(), lda: n, b: wd.ptr().unwrap(), ldb: k, k: n };
                    let call = GemmCall { layouts: Layouts::Kn, m, n: k, seg1: seg, seg2: Segment::default(), c: dx.ptr().unwrap(), ldc: k, out, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
                    gemm_with_tile(&gpu, &call, tile).unwrap();
                    assert_close(&format!("kn {what}"), &download(&gpu, &dx), &linear_input_grad_cpu(&dy, m, n, &w, k), 1e-2);
                }
                let dw = poisoned(&gpu, &[n, k], DType::F32);
                let seg = Segment { a: dyd.ptr().unwrap(), lda: n, b: xd.ptr().unwrap(), ldb: k, k: m };
                let call = GemmCall { layouts: Layouts::Mn, m: n, n: k, seg1: seg, seg2: Segment::default(), c: dw.ptr().unwrap(), ldc: k, out: DType::F32, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
                gemm_with_tile(&gpu, &call, tile).unwrap();
                assert_close(&format!("mn {m}: {n}x{k} tile {tile:?} seed={seed}"), &download(&gpu, &dw), &at_b_cpu(&dy, m, n, &x, k), 1e-2);
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_linear_rejects_bad_shapes_with_clear_errors() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let x = upload(&gpu, &[4, 12], &[0.0; 48], DType::BF16);
        let w = upload(&gpu, &[16, 12], &[0.0; 192], DType::BF16);
        let mut y = poisoned(&gpu, &[4, 16], DType::BF16);
        let err = linear(&gpu, &x, &w, None, None, &mut y).unwrap_err().to_string();
        assert!(err.contains("multiples of 8"), "{err}");
        let w = upload(&gpu, &[16, 16], &[0.0; 256], DType::BF16);
        let err = linear(&gpu, &x, &w, None, None, &mut y).unwrap_err().to_string();
        assert!(err.contains("has 12 features but w [16, 16] takes 16"), "{err}");
    }
}
