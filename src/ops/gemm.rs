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
    let sms = gpu.sm_count()?;
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

/// Launches one GEMM with the launcher's tile choice. On a Hopper, calls whose operands allow it run
/// on the wgmma kernels (`ops::gemm_sm90_split::gemm`: small outputs with a deep K split along K
/// inside one launch, else `ops::gemm_sm90`); everything else takes [`gemm_before_split_kernels`].
pub(crate) fn gemm(gpu: &Gpu, call: &GemmCall) -> Result<()> {
    if super::gemm_sm90_split::enabled_for(call.layouts) && super::gemm_sm90_split::supports(gpu, call)? {
        return super::gemm_sm90_split::gemm(gpu, call);
    }
    gemm_before_split_kernels(gpu, call)
}

/// The dispatch without the sm90 split kernels (all GPUs before them; on a Hopper with
/// `SDLORA_SM90_SPLIT=0`). A GEMM whose output tiles fill at most half of the SMs and whose K is
/// deep (≥ 16 K tiles) is split along K on the sm_80 kernels: the slices' f32 partial sums go to a
/// workspace from the **scratch arena**, and `gemm_splitk_finish_*` adds them up with the bias and
/// the residual (two launches instead of one K loop of 16+ tiles per block). Other calls run on the
/// wgmma kernels of `ops::gemm_sm90` where the GPU is a Hopper and the operands allow it.
pub(crate) fn gemm_before_split_kernels(gpu: &Gpu, call: &GemmCall) -> Result<()> {
    let tile = pick_tile(gpu, call.m, call.n)?;
    let blocks = call.m.div_ceil(tile.0) * call.n.div_ceil(tile.1);
    if call.split == SplitK::None && blocks > 0 && 2 * blocks <= gpu.sm_count()? && k_tiles(call, tile) >= 16 {
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
    let cfg = LaunchConfig { grid_dim: ((m * n).div_ceil(threads).min(8 * gpu.sm_count()?) as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
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
    let sms = gpu.sm_count()?;
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
    at_b_many(gpu, &[AtB { a, b, m, p, q, alpha, c: c.ptr()? }], accumulate, WeightGradSplit::InKernel)
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
    /// sm_80 kernels, f32 atomics into C.
    Atomic,
    /// sm_80 kernels, partial sums in a scratch workspace, then one reduction launch for every
    /// split product.
    Workspace,
    /// On a Hopper with `SDLORA_SM90_SPLIT=all` or `=wgrad`, [`at_b_many_sm90`]; otherwise (the
    /// default: the step measured faster so), elsewhere or for operands those kernels cannot load,
    /// `Workspace`.
    InKernel,
}

/// The weight-gradient product `pr` as a layout-Mn GEMM call (C = alpha·aᵀ·b, + C when `accumulate`).
fn at_b_call(pr: &AtB, accumulate: bool) -> GemmCall {
    super::gemm_sm90_split::GroupGemm::at_b(pr, accumulate).call(Layouts::Mn, DType::F32)
}

/// [`at_b_many`] on the Hopper wgmma split kernels (`ops::gemm_sm90_split`, one launch per product,
/// the launcher's slice count, in-kernel reduction). Launches nothing and answers false when the
/// GPU or an operand does not allow it.
pub(crate) fn at_b_many_sm90(gpu: &Gpu, problems: &[AtB], accumulate: bool) -> Result<bool> {
    let calls: Vec<GemmCall> = problems.iter().map(|pr| at_b_call(pr, accumulate)).collect();
    for call in &calls {
        if !super::gemm_sm90_split::supports(gpu, call)? {
            return Ok(false);
        }
    }
    for call in &calls {
        let (tile, slices) = super::gemm_sm90_split::plan(gpu, call)?;
        super::gemm_sm90_split::launch(gpu, call, tile, slices)?;
    }
    Ok(true)
}

/// Several weight-gradient products (added to c when `accumulate`): each split along its token
/// axis when its output alone cannot fill the GPU. With `WeightGradSplit::Workspace`, one
/// reduction launch finishes them all (the LoRA backward's dA and dB: three launches in all); with
/// `InKernel` where enabled, one launch per product and no reduction launch.
pub(crate) fn at_b_many(gpu: &Gpu, problems: &[AtB], accumulate: bool, how: WeightGradSplit) -> Result<()> {
    if how == WeightGradSplit::InKernel && super::gemm_sm90_split::enabled_for(Layouts::Mn) && at_b_many_sm90(gpu, problems, accumulate)? {
        return Ok(());
    }
    // (workspace, slices, p·q, c); the workspace handles live until the reductions are queued.
    let mut pending: Vec<(u64, usize, usize, u64)> = Vec::new();
    let mut workspaces = Vec::new();
    for pr in problems {
        let mut call = at_b_call(pr, false);
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
        let cfg = LaunchConfig { grid_dim: ((n1 + n2).div_ceil(threads).min(4 * gpu.sm_count()?) as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
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
#[path = "gemm_tests.rs"]
pub(crate) mod tests;
