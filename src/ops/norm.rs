//! Normalization (kernels/norm.cu): GroupNorm (32 groups) on NHWC activations with an optional fused
//! SiLU, and LayerNorm over rows; forward and input-gradient backward (γ, β are frozen). Statistics
//! in f32 on the GPU; the forward saves (mean, rstd) per (sample, group) or per row for the backward.
//! CPU twins: `group_norm_cpu`, `group_norm_backward_cpu`, `layer_norm_cpu`, `layer_norm_backward_cpu`.

use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

const MODULE: &str = "norm";
/// GroupNorm group count: every GroupNorm in SD1.5 (UNet, VAE) uses 32.
pub const GROUPS: usize = 32;
const WARPS: usize = 8;

/// CPU twin: GroupNorm over x [n, hw, c] with `groups` groups of c/groups channels; per-channel
/// affine γ, β. Statistics in f64.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_cpu(x: &[f32], n: usize, hw: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), n * hw * c, "group_norm_cpu: x is not {n}×{hw}×{c}");
    assert!(c.is_multiple_of(groups), "group_norm_cpu: {c} channels do not split into {groups} groups");
    let cg = c / groups;
    let mut y = vec![0f32; x.len()];
    for b in 0..n {
        let xs = &x[b * hw * c..][..hw * c];
        for g in 0..groups {
            let vals = || (0..hw).flat_map(move |p| (0..cg).map(move |j| xs[p * c + g * cg + j] as f64));
            let count = (hw * cg) as f64;
            let mean = vals().sum::<f64>() / count;
            let var = vals().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for p in 0..hw {
                for j in 0..cg {
                    let ch = g * cg + j;
                    let i = b * hw * c + p * c + ch;
                    y[i] = ((x[i] as f64 - mean) * rstd) as f32 * gamma[ch] + beta[ch];
                }
            }
        }
    }
    y
}

/// CPU twin: LayerNorm over the last dimension of x [rows, c]. Statistics in f64.
pub fn layer_norm_cpu(x: &[f32], rows: usize, c: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), rows * c, "layer_norm_cpu: x is not {rows}×{c}");
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
            *o = ((v as f64 - mean) * rstd) as f32 * gamma[j] + beta[j];
        }
    }
    y
}


/// CPU twin of the GroupNorm input gradient (γ, β frozen): `silu` says whether the forward applied
/// SiLU after the affine. Statistics and the reductions in f64.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward_cpu(
    x: &[f32], n: usize, hw: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], eps: f32, silu: bool, dy: &[f32],
) -> Vec<f32> {
    assert_eq!(x.len(), n * hw * c, "group_norm_backward_cpu: x is not {n}×{hw}×{c}");
    assert_eq!(dy.len(), x.len(), "group_norm_backward_cpu: dy is not {n}×{hw}×{c}");
    let cg = c / groups;
    let mut dx = vec![0f32; x.len()];
    for b in 0..n {
        for g in 0..groups {
            let idx = |p: usize, j: usize| b * hw * c + p * c + g * cg + j;
            let count = (hw * cg) as f64;
            let all = || (0..hw).flat_map(move |p| (0..cg).map(move |j| (p, j)));
            let mean = all().map(|(p, j)| x[idx(p, j)] as f64).sum::<f64>() / count;
            let var = all().map(|(p, j)| (x[idx(p, j)] as f64 - mean).powi(2)).sum::<f64>() / count;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            // d = dL/dx̂ and x̂ for every element of the group.
            let grad = |p: usize, j: usize| {
                let (i, ch) = (idx(p, j), g * cg + j);
                let xhat = (x[i] as f64 - mean) * rstd;
                let mut dh = dy[i] as f64;
                if silu {
                    let h = xhat * gamma[ch] as f64 + beta[ch] as f64;
                    let s = 1.0 / (1.0 + (-h).exp());
                    dh *= s * (1.0 + h * (1.0 - s));
                }
                (dh * gamma[ch] as f64, xhat)
            };
            let m1 = all().map(|(p, j)| grad(p, j).0).sum::<f64>() / count;
            let m2 = all().map(|(p, j)| { let (d, xh) = grad(p, j); d * xh }).sum::<f64>() / count;
            for (p, j) in all() {
                let (d, xh) = grad(p, j);
                dx[idx(p, j)] = (rstd * (d - m1 - xh * m2)) as f32;
            }
        }
    }
    dx
}

/// CPU twin of the LayerNorm input gradient (γ frozen). Statistics and reductions in f64.
pub fn layer_norm_backward_cpu(x: &[f32], rows: usize, c: usize, gamma: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), rows * c, "layer_norm_backward_cpu: x is not {rows}×{c}");
    assert_eq!(dy.len(), x.len(), "layer_norm_backward_cpu: dy is not {rows}×{c}");
    let mut dx = vec![0f32; x.len()];
    for ((xr, dyr), dxr) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let d: Vec<f64> = dyr.iter().zip(gamma).map(|(&a, &g)| a as f64 * g as f64).collect();
        let xhat: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let m1 = d.iter().sum::<f64>() / c as f64;
        let m2 = d.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for ((o, dd), xh) in dxr.iter_mut().zip(&d).zip(&xhat) {
            *o = (rstd * (dd - m1 - xh * m2)) as f32;
        }
    }
    dx
}

/// Interned kernel name `<op>_<dtype>_v<e>` (kernel names are `&'static str` for the profiler).
pub(crate) fn kernel_name(op: &str, dtype: DType, e: usize) -> &'static str {
    interned(format!("{op}_{}_v{e}", dtype.suffix()))
}

/// A kernel name built at run time, as the `&'static str` launches take (each distinct name leaked once).
fn interned(name: String) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap();
    names.entry(name.clone()).or_insert_with(|| Box::leak(name.into_boxed_str()))
}

/// Widest vector (elements) that divides `len` and fits in 16 bytes.
pub(crate) fn vector_width(len: usize, dtype: DType) -> usize {
    let max = 16 / dtype.size();
    [8, 4, 2, 1].into_iter().find(|&e| e <= max && len.is_multiple_of(e)).unwrap()
}

/// `x` seen as [n, hw, c]: n = first dimension, c = last, hw = the rest.
fn nhwc_dims(x: &Tensor) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    ensure!(s.len() >= 2, "group norm: x has shape {s:?}, expected [n, ..., c]");
    Ok((s[0], s[1..s.len() - 1].iter().product(), s[s.len() - 1]))
}

/// Rows per chunk and chunk count for `hw` rows per sample, with `ty` thread rows per block: about
/// 128 blocks of up to 512 threads in all (one wave on a 132-SM H100; measured against 256 blocks,
/// which is slower for 2 samples and no faster for one), more where a thread would read over 8 rows;
/// at most 128 chunks per sample (every apply block reads all its sample's chunk partials).
fn gn_tiling(n: usize, hw: usize, ty: usize) -> (usize, usize) {
    let want = hw.div_ceil(8 * ty).max(128usize.div_ceil(n)).clamp(1, 128);
    let rpc = hw.div_ceil(want.min(hw.div_ceil(ty)));
    (rpc, hw.div_ceil(rpc))
}

/// The GroupNorm launch shape for c channels: E (elements per vector: the widest 16-byte vector with
/// E ≤ c/32, so that a vector touches at most two groups; 8 f32 where a row would otherwise need more
/// than 512 vectors), TX = c/E threads per row and TY thread rows per block (at most 512 threads).
fn gn_layout(c: usize, dtype: DType) -> Result<(usize, usize, usize)> {
    let cpg = c / GROUPS;
    let fits = |e: usize| e <= cpg && c.is_multiple_of(e);
    let mut e = [8, 4, 2, 1].into_iter().find(|&e| e * dtype.size() <= 16 && fits(e)).unwrap_or(1);
    if c / e > 512 && fits(8) {
        e = 8;
    }
    let tx = c / e;
    ensure!(tx <= 512, "group norm: {c} channels of {dtype:?} need {tx} vectors per row (at most 512 supported)");
    Ok((e, tx, (512 / tx).max(1)))
}

fn gn_config(n: usize, chunks: usize, threads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (chunks as u32, n as u32, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

fn check_norm_operands(what: &str, x: &Tensor, c: usize, per_channel: &[&Tensor], others: &[&Tensor]) -> Result<()> {
    ensure!(x.is_gpu(), "{what}: x is on the CPU");
    super::check_gpu(what, per_channel, x.dtype(), c)?;
    super::check_gpu(what, others, x.dtype(), x.numel())?;
    for t in others {
        ensure!(t.shape() == x.shape(), "{what}: operand shape {:?} differs from x {:?}", t.shape(), x.shape());
    }
    Ok(())
}

/// GroupNorm(32) forward on NHWC `x` [n, ..., c] (f32 or bf16): y = γ·x̂ + β, then SiLU when `silu`.
/// Writes `stats` [n, 32, 2] f32 = (mean, rstd) for [`group_norm_backward`]. Uses a small scratch
/// buffer for per-chunk partial statistics.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool, y: &mut Tensor, stats: &mut Tensor) -> Result<()> {
    let (n, hw, c) = nhwc_dims(x)?;
    ensure!(c % GROUPS == 0 && hw > 0 && n > 0, "group_norm: shape {:?} (c must be a multiple of {GROUPS})", x.shape());
    check_norm_operands("group_norm", x, c, &[gamma, beta], &[y])?;
    super::check_gpu("group_norm stats", &[stats], DType::F32, n * GROUPS * 2)?;
    let (e, tx, ty) = gn_layout(c, x.dtype())?;
    let (rpc, chunks) = gn_tiling(n, hw, ty);
    let part = gpu.alloc(ArenaKind::Scratch, n * chunks * GROUPS * 8)?;
    let dims = [KernelArg::I32(hw as i32), KernelArg::I32(c as i32), KernelArg::I32(rpc as i32), KernelArg::I32(chunks as i32)];
    let cfg = gn_config(n, chunks, tx * ty);
    let mut args = vec![KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(part.ptr())];
    args.extend(dims);
    gpu.launch(MODULE, kernel_name("group_norm_fwd_stats", x.dtype(), e), cfg, &args)?;
    let mut args = vec![KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(beta.ptr()?), KernelArg::Ptr(y.ptr()?)];
    args.extend([KernelArg::Ptr(part.ptr()), KernelArg::Ptr(stats.ptr()?)]);
    args.extend(dims);
    args.extend([KernelArg::F32(eps), KernelArg::I32(silu as i32)]);
    gpu.launch(MODULE, kernel_name("group_norm_fwd_apply", x.dtype(), e), cfg, &args)
}

/// GroupNorm(32) input gradient: dx from x, the forward's `stats`, frozen γ, β and dy (same `silu`
/// as the forward; with SiLU the pre-activation is recomputed from x and the stats), plus
/// `residual` (same shape as x) when given: a residual branch's gradient, added in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, stats: &Tensor, silu: bool, dy: &Tensor, residual: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    let (n, hw, c) = nhwc_dims(x)?;
    ensure!(c % GROUPS == 0 && hw > 0 && n > 0, "group_norm_backward: shape {:?} (c must be a multiple of {GROUPS})", x.shape());
    check_norm_operands("group_norm_backward", x, c, &[gamma, beta], &[dy, dx])?;
    check_norm_operands("group_norm_backward residual", x, c, &[], residual.as_slice())?;
    super::check_gpu("group_norm_backward stats", &[stats], DType::F32, n * GROUPS * 2)?;
    let (e, tx, ty) = gn_layout(c, x.dtype())?;
    let (rpc, chunks) = gn_tiling(n, hw, ty);
    let part = gpu.alloc(ArenaKind::Scratch, n * chunks * GROUPS * 8)?;
    let cfg = gn_config(n, chunks, tx * ty);
    let front = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(beta.ptr()?), KernelArg::Ptr(stats.ptr()?), KernelArg::Ptr(dy.ptr()?)];
    let tail = [KernelArg::I32(hw as i32), KernelArg::I32(c as i32), KernelArg::I32(rpc as i32), KernelArg::I32(chunks as i32), KernelArg::I32(silu as i32)];
    let mut args = front.to_vec();
    args.push(KernelArg::Ptr(part.ptr()));
    args.extend(tail);
    gpu.launch(MODULE, kernel_name("group_norm_bwd_stats", x.dtype(), e), cfg, &args)?;
    let mut args = front.to_vec();
    args.extend([KernelArg::Ptr(part.ptr()), KernelArg::Ptr(residual.map_or(Ok(0), Tensor::ptr)?), KernelArg::Ptr(dx.ptr()?)]);
    args.extend(tail);
    gpu.launch(MODULE, kernel_name("group_norm_bwd_apply", x.dtype(), e), cfg, &args)
}

fn ln_dims(x: &Tensor) -> Result<(usize, usize)> {
    let s = x.shape();
    ensure!(!s.is_empty() && x.numel() > 0, "layer_norm: x has shape {s:?}");
    let c = s[s.len() - 1];
    Ok((x.numel() / c, c))
}

/// The LayerNorm kernel for `op` ("layer_norm_fwd"/"_bwd"): widest vector that divides c, and the
/// fewest register-held vectors per lane (1, 2, 3 or 5) that cover the row (wider rows read the
/// rest from memory again).
fn ln_kernel(op: &str, c: usize, dtype: DType) -> &'static str {
    let e = vector_width(c, dtype);
    let per_lane = c.div_ceil(e * 32);
    let held = [1, 2, 3, 5].into_iter().find(|&h| h >= per_lane).unwrap_or(5);
    interned(format!("{op}_{}_v{e}_h{held}", dtype.suffix()))
}

fn ln_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1), block_dim: ((WARPS * 32) as u32, 1, 1), shared_mem_bytes: 0 }
}

/// LayerNorm over the last dimension of `x` [..., c]: y = x̂·γ + β; writes `stats` [rows, 2] f32 =
/// (mean, rstd) for [`layer_norm_backward`].
pub fn layer_norm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, y: &mut Tensor, stats: &mut Tensor) -> Result<()> {
    let (rows, c) = ln_dims(x)?;
    check_norm_operands("layer_norm", x, c, &[gamma, beta], &[y])?;
    super::check_gpu("layer_norm stats", &[stats], DType::F32, rows * 2)?;
    let args = [
        KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(beta.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::Ptr(stats.ptr()?),
        KernelArg::I32(rows as i32), KernelArg::I32(c as i32), KernelArg::F32(eps),
    ];
    gpu.launch(MODULE, ln_kernel("layer_norm_fwd", c, x.dtype()), ln_config(rows), &args)
}

/// LayerNorm input gradient from x, the forward's `stats`, frozen γ and dy, plus `residual` (same
/// shape as x) when given: the residual branch's gradient, added in the same pass.
pub fn layer_norm_backward(gpu: &Gpu, x: &Tensor, gamma: &Tensor, stats: &Tensor, dy: &Tensor, residual: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    let (rows, c) = ln_dims(x)?;
    check_norm_operands("layer_norm_backward", x, c, &[gamma], &[dy, dx])?;
    check_norm_operands("layer_norm_backward residual", x, c, &[], residual.as_slice())?;
    super::check_gpu("layer_norm_backward stats", &[stats], DType::F32, rows * 2)?;
    let args = [
        KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(stats.ptr()?), KernelArg::Ptr(dy.ptr()?),
        KernelArg::Ptr(residual.map_or(Ok(0), Tensor::ptr)?),
        KernelArg::Ptr(dx.ptr()?),
        KernelArg::I32(rows as i32), KernelArg::I32(c as i32),
    ];
    gpu.launch(MODULE, ln_kernel("layer_norm_bwd", c, x.dtype()), ln_config(rows), &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalizes_rows() {
        let y = layer_norm_cpu(&[1.0, 2.0, 3.0, 4.0, -1.0, 1.0], 3, 2, &[1.0, 1.0], &[0.0, 0.5], 0.0);
        for (got, want) in y.iter().zip([-1.0, 1.5, -1.0, 1.5, -1.0, 1.5]) {
            assert!((got - want).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn group_norm_with_one_channel_per_group_is_instance_norm() {
        // n=1, hw=2, c=2, 2 groups: channel 0 = [1, 3], channel 1 = [5, 5] (zero variance).
        let y = group_norm_cpu(&[1.0, 5.0, 3.0, 5.0], 1, 2, 2, 2, &[2.0, 1.0], &[0.0, 7.0], 1e-5);
        assert!((y[0] + 2.0).abs() < 1e-4 && (y[2] - 2.0).abs() < 1e-4 && y[1] == 7.0 && y[3] == 7.0, "{y:?}");
    }

    use crate::ops::elementwise::silu_cpu;
    use crate::ops::finite_difference;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, compare, round_bf16};

    #[allow(clippy::too_many_arguments)]
    fn gn_forward(x: &[f32], n: usize, hw: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], silu: bool) -> Vec<f32> {
        let y = group_norm_cpu(x, n, hw, c, groups, gamma, beta, 1e-5);
        if silu { silu_cpu(&y) } else { y }
    }

    #[test]
    fn group_norm_backward_matches_finite_differences() {
        let (n, hw, c, groups) = (2, 3, 8, 4);
        let mut rng = Rng::new(11);
        let x = rng.normal_vec(n * hw * c, 1.5);
        let (gamma, beta) = (rng.normal_vec(c, 1.0), rng.normal_vec(c, 1.0));
        let w = rng.normal_vec(x.len(), 1.0);
        for silu in [false, true] {
            let analytic = group_norm_backward_cpu(&x, n, hw, c, groups, &gamma, &beta, 1e-5, silu, &w);
            let numeric = finite_difference(&x, 1e-2, |xs| {
                gn_forward(xs, n, hw, c, groups, &gamma, &beta, silu).iter().zip(&w).map(|(y, w)| *y as f64 * *w as f64).sum()
            });
            let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
            assert_close(&format!("group norm backward (silu {silu}) vs finite differences"), &analytic, &numeric, 1e-3);
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let (rows, c) = (3, 16);
        let mut rng = Rng::new(12);
        let x = rng.normal_vec(rows * c, 2.0);
        let (gamma, beta) = (rng.normal_vec(c, 1.0), rng.normal_vec(c, 1.0));
        let w = rng.normal_vec(x.len(), 1.0);
        let analytic = layer_norm_backward_cpu(&x, rows, c, &gamma, 1e-6, &w);
        let numeric = finite_difference(&x, 1e-2, |xs| {
            layer_norm_cpu(xs, rows, c, &gamma, &beta, 1e-6).iter().zip(&w).map(|(y, w)| *y as f64 * *w as f64).sum()
        });
        let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
        assert_close("layer norm backward vs finite differences", &analytic, &numeric, 1e-3);
    }

    #[test]
    fn tiling_covers_rows_with_bounded_chunks() {
        for n in [1, 2, 3] {
            for ty in [1, 2, 6, 8] {
                for hw in [1, 7, 64, 256, 1024, 4096, 9216] {
                    let (rpc, chunks) = gn_tiling(n, hw, ty);
                    assert!(chunks <= 128 && rpc * chunks >= hw && rpc * (chunks - 1) < hw, "n={n} ty={ty} hw={hw}: {rpc}×{chunks}");
                }
            }
        }
        // One 4096-row sample with 12 thread rows: 128 chunks, at most 3 rows per thread; two samples: 64 each.
        assert_eq!(gn_tiling(1, 4096, 12), (32, 128));
        assert_eq!(gn_tiling(2, 4096, 12), (64, 64));
        assert_eq!((vector_width(10, DType::BF16), vector_width(40, DType::BF16), vector_width(40, DType::F32), vector_width(3, DType::F32)), (2, 8, 4, 1));
        for (c, dtype, want) in [(320, DType::BF16, (8, 40, 12)), (1280, DType::BF16, (8, 160, 3)), (2560, DType::BF16, (8, 320, 1)), (2560, DType::F32, (8, 320, 1)), (1024, DType::F32, (4, 256, 2)), (32, DType::BF16, (1, 32, 16)), (96, DType::F32, (2, 48, 10)), (128, DType::BF16, (4, 32, 16))] {
            assert_eq!(gn_layout(c, dtype).unwrap(), want, "c={c} {dtype:?}");
        }
        // Every vector spans at most two groups and a block holds at most 512 threads, for every width
        // the kernels accept; wider rows are refused with an error.
        for cpg in 1..=100 {
            for dtype in [DType::BF16, DType::F32] {
                let (e, tx, ty) = gn_layout(32 * cpg, dtype).unwrap();
                assert!(e <= cpg && tx * e == 32 * cpg && tx * ty <= 512 && tx * ty >= 32, "cpg={cpg}: ({e}, {tx}, {ty})");
            }
        }
        assert!(gn_layout(32 * 1024, DType::BF16).is_err());
    }

    /// Per-(sample, group) (mean, rstd) in f64, to check the saved statistics.
    fn gn_stats_cpu(x: &[f32], n: usize, hw: usize, c: usize, eps: f32) -> Vec<f32> {
        let cg = c / GROUPS;
        let mut out = Vec::new();
        for b in 0..n {
            for g in 0..GROUPS {
                let vals: Vec<f64> = (0..hw).flat_map(|p| (0..cg).map(move |j| (p, j))).map(|(p, j)| x[b * hw * c + p * c + g * cg + j] as f64).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                out.extend([mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32]);
            }
        }
        out
    }

    use crate::testing::{download, poisoned, upload};

    /// Checks `got` against `want` within `tol`, printing the error (run with --nocapture to see it).
    fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
        let c = compare(got, want);
        println!("{what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
        assert_close(what, got, want, tol);
    }

    /// f32 storage: 1e-5 forward, 1e-4 for the input gradient (its (d − mean(d) − x̂·mean(d·x̂))
    /// cancels in f32); bf16 storage: 1e-2 against the twin on the bf16-rounded inputs.
    fn tolerances(dtype: DType) -> (f64, f64) {
        if dtype == DType::F32 { (1e-5, 1e-4) } else { (1e-2, 1e-2) }
    }

    /// Random activations with a per-channel offset, so the statistics are not centered at zero.
    fn activations(rng: &mut Rng, rows: usize, c: usize) -> Vec<f32> {
        let offset = rng.normal_vec(c, 2.0);
        (0..rows * c).map(|i| offset[i % c] + 1.5 * rng.normal()).collect()
    }

    fn gpu_group_norm_case(gpu: &Gpu, n: usize, hw: usize, c: usize, silu: bool, eps: f32, dtype: DType) {
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let mut x = activations(&mut rng, n * hw, c);
        let (mut gamma, mut beta, mut dy) = (rng.uniform_vec(c, 0.5, 1.5), rng.normal_vec(c, 0.5), rng.normal_vec(n * hw * c, 1.0));
        if dtype == DType::BF16 {
            (x, gamma, beta, dy) = (round_bf16(&x), round_bf16(&gamma), round_bf16(&beta), round_bf16(&dy));
        }
        let shape = [n, hw, c];
        let (xd, gd, bd, dyd) = (upload(gpu, &shape, &x, dtype), upload(gpu, &[c], &gamma, dtype), upload(gpu, &[c], &beta, dtype), upload(gpu, &shape, &dy, dtype));
        let (mut y, mut stats, mut dx) = (poisoned(gpu, &shape, dtype), poisoned(gpu, &[n, GROUPS, 2], DType::F32), poisoned(gpu, &shape, dtype));
        group_norm(gpu, &xd, &gd, &bd, eps, silu, &mut y, &mut stats).unwrap();
        group_norm_backward(gpu, &xd, &gd, &bd, &stats, silu, &dyd, None, &mut dx).unwrap();
        // The same gradient with a residual branch's gradient added in the kernel.
        let res = if dtype == DType::BF16 { round_bf16(&rng.normal_vec(n * hw * c, 1.0)) } else { rng.normal_vec(n * hw * c, 1.0) };
        let mut dx_res = poisoned(gpu, &shape, dtype);
        group_norm_backward(gpu, &xd, &gd, &bd, &stats, silu, &dyd, Some(&upload(gpu, &shape, &res, dtype)), &mut dx_res).unwrap();
        let what = |s: &str| format!("group norm {s} {dtype:?} n={n} hw={hw} c={c} silu={silu} eps={eps:e} seed={seed}");
        let (tol_fwd, tol_bwd) = tolerances(dtype);
        let want = group_norm_cpu(&x, n, hw, c, GROUPS, &gamma, &beta, eps);
        let want = if silu { silu_cpu(&want) } else { want };
        check(&what("forward"), &download(gpu, &y), &want, tol_fwd);
        check(&what("stats"), &download(gpu, &stats), &gn_stats_cpu(&x, n, hw, c, eps), 1e-5);
        let want = group_norm_backward_cpu(&x, n, hw, c, GROUPS, &gamma, &beta, eps, silu, &dy);
        check(&what("backward"), &download(gpu, &dx), &want, tol_bwd);
        let want_res: Vec<f32> = want.iter().zip(&res).map(|(a, b)| a + b).collect();
        check(&what("backward + residual"), &download(gpu, &dx_res), &want_res, tol_bwd);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_group_norm_matches_twin_at_sd15_shapes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // (hw, c): resnet/transformer widths and the up-path skip concatenations at their resolutions.
        let shapes = [(4096, 320), (1024, 640), (256, 1280), (64, 1280), (64, 2560), (256, 2560), (256, 1920), (1024, 1920), (1024, 960), (4096, 960), (4096, 640)];
        for (i, &(hw, c)) in shapes.iter().enumerate() {
            let n = 1 + i % 2;
            for dtype in [DType::BF16, DType::F32] {
                gpu_group_norm_case(&gpu, n, hw, c, i % 3 != 2, if i % 3 == 2 { 1e-6 } else { 1e-5 }, dtype);
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_group_norm_matches_twin_at_odd_shapes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // Also: many samples, one long sample, and the widest batch-2 concatenation at 64×64.
        for (n, hw, c) in [(1, 1, 32), (3, 7, 96), (2, 9, 224), (1, 1000, 64), (2, 33, 512), (1, 4099, 128), (300, 3, 64), (1, 150_001, 32), (2, 4096, 960)] {
            for silu in [false, true] {
                for dtype in [DType::BF16, DType::F32] {
                    gpu_group_norm_case(&gpu, n, hw, c, silu, 1e-6, dtype);
                }
            }
        }
    }

    fn gpu_layer_norm_case(gpu: &Gpu, rows: usize, c: usize, dtype: DType) {
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let mut x = activations(&mut rng, rows, c);
        let (mut gamma, mut beta, mut dy) = (rng.uniform_vec(c, 0.5, 1.5), rng.normal_vec(c, 0.5), rng.normal_vec(rows * c, 1.0));
        if dtype == DType::BF16 {
            (x, gamma, beta, dy) = (round_bf16(&x), round_bf16(&gamma), round_bf16(&beta), round_bf16(&dy));
        }
        let eps = 1e-5;
        let shape = [rows, c];
        let (xd, gd, bd, dyd) = (upload(gpu, &shape, &x, dtype), upload(gpu, &[c], &gamma, dtype), upload(gpu, &[c], &beta, dtype), upload(gpu, &shape, &dy, dtype));
        let (mut y, mut stats, mut dx) = (poisoned(gpu, &shape, dtype), poisoned(gpu, &[rows, 2], DType::F32), poisoned(gpu, &shape, dtype));
        layer_norm(gpu, &xd, &gd, &bd, eps, &mut y, &mut stats).unwrap();
        layer_norm_backward(gpu, &xd, &gd, &stats, &dyd, None, &mut dx).unwrap();
        // The same gradient with a residual branch's gradient added in the kernel.
        let res = if dtype == DType::BF16 { round_bf16(&rng.normal_vec(rows * c, 1.0)) } else { rng.normal_vec(rows * c, 1.0) };
        let mut dx_res = poisoned(gpu, &shape, dtype);
        layer_norm_backward(gpu, &xd, &gd, &stats, &dyd, Some(&upload(gpu, &shape, &res, dtype)), &mut dx_res).unwrap();
        let what = |s: &str| format!("layer norm {s} {dtype:?} rows={rows} c={c} seed={seed}");
        let (tol_fwd, tol_bwd) = tolerances(dtype);
        check(&what("forward"), &download(gpu, &y), &layer_norm_cpu(&x, rows, c, &gamma, &beta, eps), tol_fwd);
        let want = layer_norm_backward_cpu(&x, rows, c, &gamma, eps, &dy);
        check(&what("backward"), &download(gpu, &dx), &want, tol_bwd);
        let want_res: Vec<f32> = want.iter().zip(&res).map(|(a, b)| a + b).collect();
        check(&what("backward + residual"), &download(gpu, &dx_res), &want_res, tol_bwd);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_layer_norm_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // SD1.5 transformer tokens (batch 2), CLIP's 77×768, and odd widths (scalar loads).
        for (rows, c) in [(8192, 320), (2048, 640), (512, 1280), (128, 1280), (77, 768), (1, 1), (5, 33), (300, 100), (9, 2050)] {
            for dtype in [DType::BF16, DType::F32] {
                gpu_layer_norm_case(&gpu, rows, c, dtype);
            }
        }
    }
}
