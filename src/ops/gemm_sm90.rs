//! The Hopper GEMM path (kernels/gemm_sm90.cu: wgmma from 128-byte-swizzled shared memory, cp.async
//! pipeline): the same `C = α·Σ_k A(m,k)·B(n,k) + bias + R` contract as kernels/gemm.cu for the
//! layouts `Kk` (y = x·Wᵀ) and `Kn` (dx = dy·W), both K segments, bf16 or f32 C.
//!
//! [`crate::ops::gemm::gemm`] sends a call here when [`supports`] says yes (a compute capability 9.0
//! GPU, `SDLORA_SM90` not 0, no split-K, 16-byte-loadable operands) and the call is not one it splits
//! along K (small M); every other GPU keeps the sm_80 kernels. CPU twins: `linear_cpu` and
//! `linear_input_grad_cpu` in `ops::gemm`.

use super::gemm::{GemmCall, Layouts, SplitK};
use crate::cuda::{Gpu, LaunchConfig};
use crate::tensor::DType;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};

const MODULE: &str = "gemm_sm90";
const BK: usize = 64;

/// Block tiles (BM, BN) of the sm90 kernels.
pub(crate) const SM90_TILES: [(usize, usize); 5] = [(256, 128), (128, 256), (128, 128), (128, 64), (64, 64)];

/// (threads, pipeline stages, blocks per SM) of a tile: must match GEMM_SM90_TILES in
/// kernels/gemm_sm90.cu.
fn tile_config(tile: (usize, usize)) -> (u32, usize, usize) {
    match tile {
        (256, 128) | (128, 256) => (512, 4, 1),
        (128, 128) => (256, 3, 2),
        (128, 64) => (256, 3, 3),
        _ => (128, 4, 3),
    }
}

/// Dynamic shared memory of a tile: its stages (or the f32 C tile of the epilogue, which reuses
/// them), plus 1 KiB to align the stages to the 1024-byte swizzle atom.
fn tile_smem(tile: (usize, usize)) -> usize {
    let (_, stages, _) = tile_config(tile);
    (stages * (tile.0 + tile.1) * BK * 2).max(tile.0 * tile.1 * 4) + 1024
}

fn kernel_name(tile: (usize, usize), layouts: Layouts, out: DType) -> Result<&'static str> {
    Ok(match (tile, layouts, out) {
        ((256, 128), Layouts::Kk, DType::BF16) => "gemm_sm90_256x128_kk_bf16",
        ((256, 128), Layouts::Kk, DType::F32) => "gemm_sm90_256x128_kk_f32",
        ((256, 128), Layouts::Kn, DType::BF16) => "gemm_sm90_256x128_kn_bf16",
        ((256, 128), Layouts::Kn, DType::F32) => "gemm_sm90_256x128_kn_f32",
        ((128, 256), Layouts::Kk, DType::BF16) => "gemm_sm90_128x256_kk_bf16",
        ((128, 256), Layouts::Kk, DType::F32) => "gemm_sm90_128x256_kk_f32",
        ((128, 256), Layouts::Kn, DType::BF16) => "gemm_sm90_128x256_kn_bf16",
        ((128, 256), Layouts::Kn, DType::F32) => "gemm_sm90_128x256_kn_f32",
        ((128, 128), Layouts::Kk, DType::BF16) => "gemm_sm90_128x128_kk_bf16",
        ((128, 128), Layouts::Kk, DType::F32) => "gemm_sm90_128x128_kk_f32",
        ((128, 128), Layouts::Kn, DType::BF16) => "gemm_sm90_128x128_kn_bf16",
        ((128, 128), Layouts::Kn, DType::F32) => "gemm_sm90_128x128_kn_f32",
        ((128, 64), Layouts::Kk, DType::BF16) => "gemm_sm90_128x64_kk_bf16",
        ((128, 64), Layouts::Kk, DType::F32) => "gemm_sm90_128x64_kk_f32",
        ((128, 64), Layouts::Kn, DType::BF16) => "gemm_sm90_128x64_kn_bf16",
        ((128, 64), Layouts::Kn, DType::F32) => "gemm_sm90_128x64_kn_f32",
        ((64, 64), Layouts::Kk, DType::BF16) => "gemm_sm90_64x64_kk_bf16",
        ((64, 64), Layouts::Kk, DType::F32) => "gemm_sm90_64x64_kk_f32",
        ((64, 64), Layouts::Kn, DType::BF16) => "gemm_sm90_64x64_kn_bf16",
        ((64, 64), Layouts::Kn, DType::F32) => "gemm_sm90_64x64_kn_f32",
        _ => bail!("gemm_sm90: no kernel for tile {tile:?}, layouts {layouts:?}, output {out:?}"),
    })
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

/// A tile's relative throughput per SM when the GPU is full (fitted to the forced-tile rows
/// `linear_sm90_tile*` of benches/RESULTS.md, H100).
fn tile_rate(tile: (usize, usize)) -> f64 {
    match tile {
        (128, 128) => 1.0,
        (128, 64) => 0.7,
        (64, 64) => 0.8,
        _ => 0.9,
    }
}

/// The tile the launcher picks: least estimated time = output tiles per SM (rounded up: the
/// busiest SM sets the time) × tile area / rate. Co-resident blocks share an SM's throughput, so
/// blocks per SM only enter through the rate.
pub(crate) fn pick_tile(gpu: &Gpu, m: usize, n: usize) -> Result<(usize, usize)> {
    let sms = gpu.stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let cost = |tile: (usize, usize)| {
        let per_sm = (m.div_ceil(tile.0) * n.div_ceil(tile.1)).div_ceil(sms);
        (per_sm * tile.0 * tile.1) as f64 / tile_rate(tile)
    };
    Ok(SM90_TILES.into_iter().min_by(|a, b| cost(*a).total_cmp(&cost(*b))).unwrap_or(SM90_TILES[2]))
}

/// Launches `call` on the sm90 kernel of `tile` (the launcher's choice when `None`). The caller has
/// checked [`supports`].
pub(crate) fn gemm_sm90(gpu: &Gpu, call: &GemmCall, tile: Option<(usize, usize)>) -> Result<()> {
    ensure!(supports(gpu, call)?, "gemm_sm90: call not supported here (needs a Hopper GPU, layout Kk/Kn, no split, 16-byte operands): {call:?}");
    if call.m == 0 || call.n == 0 {
        return Ok(());
    }
    let tile = match tile {
        Some(t) => t,
        None => pick_tile(gpu, call.m, call.n)?,
    };
    let name = kernel_name(tile, call.layouts, call.out)?;
    let smem = tile_smem(tile) as u32;
    gpu.function(MODULE, name)?
        .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .context("gemm_sm90: cannot raise the dynamic shared memory limit")?;
    let cfg = LaunchConfig { grid_dim: (call.n.div_ceil(tile.1) as u32, call.m.div_ceil(tile.0) as u32, 1), block_dim: (tile_config(tile).0, 1, 1), shared_mem_bytes: smem };
    let args = call.kernel_args(call.c)?;
    gpu.launch(MODULE, name, cfg, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::tests::{download, gather_rows, poisoned, rand_bf16, sample_rows, sd15_linear_shapes, upload};
    use crate::ops::gemm::{linear, linear_cpu, linear_input_grad, linear_input_grad_cpu, Segment};
    use crate::rng::Rng;
    use crate::tensor::{assert_close, Tensor};

    /// One two-segment problem on the GPU with its f32 twin (sampled rows of Σ over both segments,
    /// before alpha and the epilogue): layout Kk computes x·Wᵀ + u·Bᵀ, layout Kn dy·W + v·A.
    struct Problem {
        layouts: Layouts,
        m: usize,
        n: usize,
        seg1: Segment,
        seg2: Segment,
        rows: Vec<usize>,
        want: Vec<f32>,
        /// Epilogue operands: bias [n] and the prior C (the residual R = C) [m, n].
        bias: Vec<f32>,
        old: Vec<f32>,
        _bufs: Vec<Tensor>,
    }

    /// (m, k1, n) with a second segment of depth k2 (k2 = 0: none).
    fn problem(gpu: &Gpu, rng: &mut Rng, layouts: Layouts, m: usize, k1: usize, n: usize, k2: usize) -> Problem {
        let (a1, b1) = (rand_bf16(rng, m * k1, 1.0), rand_bf16(rng, n * k1, 1.0 / (k1 as f32).sqrt()));
        let (a2, b2) = (rand_bf16(rng, m * k2, 1.0), rand_bf16(rng, n * k2, 1.0 / (k2.max(1) as f32).sqrt()));
        let rows = sample_rows(rng, m);
        let mut want = vec![0f32; rows.len() * n];
        for (a, b, k) in [(&a1, &b1, k1), (&a2, &b2, k2)] {
            if k == 0 {
                continue;
            }
            let part = match layouts {
                Layouts::Kk => linear_cpu(&gather_rows(a, k, &rows), rows.len(), k, b, n, None),
                _ => linear_input_grad_cpu(&gather_rows(a, k, &rows), rows.len(), k, b, n),
            };
            want.iter_mut().zip(part).for_each(|(w, p)| *w += p);
        }
        // Kk: B is [n, k] (k contiguous); Kn: B is [k, n] (n contiguous).
        let b_shape = |k: usize| if layouts == Layouts::Kk { [n, k] } else { [k, n] };
        let bufs = vec![
            upload(gpu, &[m, k1], &a1, DType::BF16),
            upload(gpu, &b_shape(k1), &b1, DType::BF16),
            upload(gpu, &[m, k2.max(1)], &if k2 == 0 { vec![0.0; m] } else { a2 }, DType::BF16),
            upload(gpu, &b_shape(k2.max(1)), &if k2 == 0 { vec![0.0; n] } else { b2 }, DType::BF16),
        ];
        let ld_b = |k: usize| if layouts == Layouts::Kk { k } else { n };
        let seg = |a: &Tensor, b: &Tensor, k: usize| Segment { a: a.ptr().unwrap(), lda: k.max(1), b: b.ptr().unwrap(), ldb: ld_b(k.max(1)), k };
        let (seg1, seg2) = (seg(&bufs[0], &bufs[1], k1), seg(&bufs[2], &bufs[3], k2));
        let (bias, old) = (rand_bf16(rng, n, 0.5), rand_bf16(rng, m * n, 1.0));
        Problem { layouts, m, n, seg1, seg2, rows, want, bias, old, _bufs: bufs }
    }

    /// Runs `p` on `tile` into a fresh C of type `out`: C = alpha·Σ + bias (when `with_bias`) + R
    /// (when `with_residual`: R is C itself, pre-filled), and compares the sampled rows to the twin.
    fn check(gpu: &Gpu, p: &Problem, tile: (usize, usize), out: DType, with_bias: bool, with_residual: bool, what: &str) {
        let (m, n) = (p.m, p.n);
        let (alpha, bias, old) = (0.75, &p.bias, &p.old);
        let bias_d = upload(gpu, &[n], bias, DType::BF16);
        let c = if with_residual { upload(gpu, &[m, n], old, out) } else { poisoned(gpu, &[m, n], out) };
        let cp = c.ptr().unwrap();
        let call = GemmCall {
            layouts: p.layouts,
            m,
            n,
            seg1: p.seg1,
            seg2: p.seg2,
            c: cp,
            ldc: n,
            out,
            bias: with_bias.then(|| bias_d.ptr().unwrap()),
            residual: with_residual.then_some((cp, n)),
            alpha,
            split: SplitK::None,
        };
        gemm_sm90(gpu, &call, Some(tile)).unwrap();
        let got = download(gpu, &c);
        let mut want: Vec<f32> = p.want.iter().map(|v| alpha * v).collect();
        for (i, &row) in p.rows.iter().enumerate() {
            for j in 0..n {
                want[i * n + j] += if with_bias { bias[j] } else { 0.0 } + if with_residual { old[row * n + j] } else { 0.0 };
            }
        }
        let what = format!("{what} tile {tile:?} {out:?} bias={with_bias} residual=C:{with_residual}");
        assert_close(&what, &gather_rows(&got, n, &p.rows), &want, 1e-2);
        assert_eq!(got.iter().filter(|v| !v.is_finite()).count(), 0, "{what}: unwritten outputs");
    }

    fn hopper(gpu: &Gpu) -> bool {
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
        for (m, k, n) in [(4096, 320, 2560), (8192, 1280, 320), (4096, 320, 320)] {
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
            let sm90 = kernels.iter().filter(|k| k.starts_with("gemm_sm90_")).count();
            assert_eq!(sm90, 2, "{m}x{k}->{n}: expected the forward and dx on sm90 kernels, ran {kernels:?}");
            let rows = sample_rows(&mut rng, m);
            let want = linear_cpu(&gather_rows(&x, k, &rows), rows.len(), k, &w, n, None);
            assert_close(&format!("linear {m}x{k}->{n} seed={seed}"), &gather_rows(&download(&gpu, &y), n, &rows), &want, 1e-2);
            let dy = download(&gpu, &y);
            let want = linear_input_grad_cpu(&gather_rows(&dy, n, &rows), rows.len(), n, &w, k);
            assert_close(&format!("dx {m}x{n}->{k} seed={seed}"), &gather_rows(&download(&gpu, &dx), k, &rows), &want, 1e-2);
        }
    }
}
