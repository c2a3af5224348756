//! Normalization (kernels/norm.cu; on Hopper GroupNorm in one pass, kernels/norm_sm90.cu): GroupNorm (32 groups) on NHWC activations with an optional fused
//! SiLU, and LayerNorm over rows; forward and input-gradient backward (γ, β are frozen). Statistics
//! in f32 on the GPU; the forward saves (mean, rstd) per (sample, group) or per row for the backward.
//! CPU twins: `group_norm_cpu`, `group_norm_backward_cpu`, `layer_norm_cpu`, `layer_norm_backward_cpu`.

use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

const MODULE: &str = "norm";
/// The single-pass GroupNorm for Hopper (thread-block clusters), launched only when `Gpu::is_hopper`.
const MODULE_SM90: &str = "norm_sm90";
/// GroupNorm group count: every GroupNorm in SD1.5 (UNet, VAE) uses 32.
pub const GROUPS: usize = 32;

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
/// which is slower for 2 samples and no faster for one), more where a thread would read over 8 rows
/// (not for `one_wave`: blocks of 1024 threads, one per SM); at most 128 chunks per sample (every
/// apply block reads all its sample's chunk partials).
fn gn_tiling(n: usize, hw: usize, ty: usize, one_wave: bool) -> (usize, usize) {
    let per_sample = (128 / n).max(1);
    let want = if one_wave { per_sample } else { hw.div_ceil(8 * ty).max(per_sample) }.clamp(1, 128);
    let rpc = hw.div_ceil(want.min(hw.div_ceil(ty)));
    (rpc, hw.div_ceil(rpc))
}

/// The two-kernel GroupNorm launch shape for c channels: E (elements per vector: the widest 16-byte
/// vector that touches at most two groups — E ≤ c/32, or E = 2·c/32, two whole groups; 8 f32 where a
/// row would otherwise need more than 512 vectors), TX = c/E threads per row and TY thread rows per
/// block (at most `threads` threads: 512, 256 for `_t256r4`, 1024 for `_t1024`'s statistics).
fn gn_layout(c: usize, dtype: DType, threads: usize) -> Result<(usize, usize, usize)> {
    let cpg = c / GROUPS;
    let fits = |e: usize| (e <= cpg || e == 2 * cpg) && c.is_multiple_of(e);
    let mut e = [8, 4, 2, 1].into_iter().find(|&e| e * dtype.size() <= 16 && fits(e)).unwrap_or(1);
    if c / e > threads && fits(8) {
        e = 8;
    }
    let tx = c / e;
    ensure!(tx <= threads, "group norm: {c} channels of {dtype:?} need {tx} vectors per row (at most {threads} supported)");
    Ok((e, tx, (threads / tx).max(1)))
}

/// The two-kernel variant for x [n, hw, c]: blocks of 512 threads loading 2 rows at a time; for
/// large inputs (≥ 4 Mi elements, e.g. 2×4096×640, where 512-thread blocks leave long chains of
/// two-row batches), blocks of 256 loading 4 (`_t256r4`); forward, for inputs larger than L2
/// (≥ 24 MiB, the VAE's at 512 px), statistics in one wave of 1024-thread blocks loading 4 rows and
/// apply in 512-thread blocks (`_t1024`; the backward there is faster as `_t256r4`).
/// Returns (stats threads, apply threads, kernel suffix).
fn gn_variant(n: usize, hw: usize, c: usize, dtype: DType, backward: bool) -> (usize, usize, &'static str) {
    let elements = n * hw * c;
    if gn_layout(c, dtype, 256).is_err() || elements < 4 << 20 {
        (512, 512, "")
    } else if !backward && elements * dtype.size() >= 24 << 20 {
        (1024, 512, "_t1024")
    } else {
        (256, 256, "_t256r4")
    }
}

/// A two-kernel launch: the kernels' suffix and vector width, rows per chunk and chunks per sample,
/// and the launch shapes of the statistics and apply kernels (the same chunks, each its own block
/// size).
struct GnTwoKernel {
    suffix: &'static str,
    e: usize,
    rpc: usize,
    chunks: usize,
    stats: LaunchConfig,
    apply: LaunchConfig,
}

fn gn_two_kernel(n: usize, hw: usize, c: usize, dtype: DType, backward: bool) -> Result<GnTwoKernel> {
    let (stats_threads, apply_threads, suffix) = gn_variant(n, hw, c, dtype, backward);
    let (e, tx, ty) = gn_layout(c, dtype, apply_threads)?;
    let stats_ty = (stats_threads / tx).max(1);
    let (rpc, chunks) = gn_tiling(n, hw, stats_ty, stats_threads == 1024);
    let config = |ty: usize| LaunchConfig { grid_dim: (chunks as u32, n as u32, 1), block_dim: ((tx * ty) as u32, 1, 1), shared_mem_bytes: 0 };
    Ok(GnTwoKernel { suffix, e, rpc, chunks, stats: config(stats_ty), apply: config(ty) })
}

/// Which GroupNorm path may run: `Auto` = the cluster kernels where a plan runs in one wave on a
/// Hopper GPU, else two kernels; `Cluster` = the cluster kernels wherever a plan exists, even in
/// several waves (tests: every such shape on the single-pass path); `TwoKernel` = never clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GnMode {
    Auto,
    #[cfg(test)]
    Cluster,
    TwoKernel,
}

/// Which GroupNorm kernels ran: the single-pass cluster kernel (kernels/norm_sm90.cu) or the
/// two-kernel path (kernels/norm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GnPath {
    Cluster,
    TwoKernel,
}

/// A launch of the cluster kernels (kernels/norm_sm90.cu's header): clusters of `k` CTAs over rows,
/// each cluster `gpc` whole groups of one sample, `rpc` rows per CTA, `r` 16-byte vectors per thread
/// in registers, `threads` per CTA (the row pieces' vectors times ⌈rpc/r⌉, padded to whole warps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClusterPlan {
    gpc: usize,
    k: usize,
    rpc: usize,
    threads: usize,
    r: usize,
}

/// The narrowest row piece a CTA reads: below this the 32-byte sectors are mostly wasted.
const CLUSTER_MIN_ROW_BYTES: usize = 64;
/// Threads per CTA at most (kernels/norm_sm90.cu's MAX_THREADS).
const CLUSTER_MAX_THREADS: usize = 512;

/// Tuning of the cluster plan: (CTAs per cluster at most, threads per CTA at most, CTAs wanted).
/// Defaults (8, 512, 64): on the H100 clusters of 8 CTAs over 64+ CTAs beat clusters of 16 over 128
/// at most SD1.5 shapes (benches/RESULTS.md, session 7); `SDLORA_GN_CLUSTER=k,threads,ctas`
/// overrides them (for sweeps).
fn cluster_tuning() -> (usize, usize, usize) {
    use std::sync::OnceLock;
    static TUNING: OnceLock<(usize, usize, usize)> = OnceLock::new();
    *TUNING.get_or_init(|| {
        let var = std::env::var("SDLORA_GN_CLUSTER").unwrap_or_default();
        match var.split(',').map(|v| v.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>().as_deref() {
            Ok([k @ 1..=16, t @ 32..=CLUSTER_MAX_THREADS, ctas]) => (*k, *t, *ctas),
            _ => (8, CLUSTER_MAX_THREADS, 64),
        }
    })
}

/// The candidate cluster launches for x [n, hw, c] (`backward`: the kernel holding x and dy, up to
/// 4 vectors per thread; the forward up to 8), in order of preference: clusters of k = min(kmax, hw)
/// CTAs, then of min(8, hw); for each, the most groups per cluster (longest row pieces) first, with
/// the fewest vectors per thread that fit in `tmax` threads. None where a 16-byte vector could span
/// three groups (cpg < its elements) or a row piece is not whole vectors.
fn gn_cluster_plans(n: usize, hw: usize, c: usize, dtype: DType, backward: bool, kmax: usize, tmax: usize) -> Vec<ClusterPlan> {
    let (cpg, e) = (c / GROUPS, 16 / dtype.size());
    if cpg < e || hw == 0 || n == 0 {
        return Vec::new();
    }
    let mut ks = vec![hw.min(kmax)];
    if hw.min(8) < ks[0] {
        ks.push(hw.min(8));
    }
    let rmax = if backward { 4 } else { 8 };
    let mut plans = Vec::new();
    for k in ks {
        let rpc = hw.div_ceil(k);
        for gpc in [32, 16, 8, 4, 2, 1] {
            let cw = gpc * cpg;
            if !cw.is_multiple_of(e) || cw * dtype.size() < CLUSTER_MIN_ROW_BYTES.min(c * dtype.size()) {
                continue;
            }
            let threads = |r: usize| (cw / e * rpc.div_ceil(r)).next_multiple_of(32);
            if let Some(r) = [1, 2, 4, 8].into_iter().find(|&r| r <= rmax && threads(r) <= tmax) {
                plans.push(ClusterPlan { gpc, k, rpc, threads: threads(r), r });
            }
        }
    }
    plans
}

/// The plan to launch for n samples: the first of `plans` that gives at least `ctas` CTAs in all and
/// runs in one wave (`active(plan)`: clusters that fit on the GPU at once); else the one-wave plan
/// with the most CTAs; None when no plan runs in one wave (then the two-kernel path is faster).
fn gn_pick_plan(n: usize, plans: &[ClusterPlan], ctas: usize, mut active: impl FnMut(&ClusterPlan) -> Result<usize>) -> Result<Option<ClusterPlan>> {
    let mut one_wave = Vec::new();
    for p in plans {
        if n * (GROUPS / p.gpc) <= active(p)? {
            if n * (GROUPS / p.gpc) * p.k >= ctas {
                return Ok(Some(*p));
            }
            one_wave.push(*p);
        }
    }
    Ok(one_wave.into_iter().max_by_key(|p| (n * GROUPS / p.gpc * p.k, std::cmp::Reverse(p.k))))
}

/// The cluster kernel `group_norm_cluster_<op>_<dtype>_r<r>` of `plan`.
fn gn_cluster_kernel(op: &str, dtype: DType, plan: &ClusterPlan) -> &'static str {
    interned(format!("group_norm_cluster_{op}_{}_r{}", dtype.suffix(), plan.r))
}

/// The cluster launch for x [n, hw, c] on this GPU under `mode` (`backward` as for
/// [`gn_cluster_plans`]); None: the two-kernel path, also where an operand is not 16-byte aligned.
#[allow(clippy::too_many_arguments)]
fn gn_cluster_plan(gpu: &Gpu, mode: GnMode, op: &str, n: usize, hw: usize, c: usize, dtype: DType, operands: &[u64]) -> Result<Option<ClusterPlan>> {
    let (kmax, tmax, ctas) = cluster_tuning();
    if operands.iter().any(|p| !p.is_multiple_of(16)) {
        return Ok(None);
    }
    let plans = gn_cluster_plans(n, hw, c, dtype, op == "bwd", kmax, tmax);
    match mode {
        GnMode::TwoKernel => Ok(None),
        #[cfg(test)]
        GnMode::Cluster => gn_pick_plan(n, &plans, ctas, |_| Ok(usize::MAX)),
        GnMode::Auto => gn_pick_plan(n, &plans, ctas, |p| gpu.max_active_clusters(MODULE_SM90, gn_cluster_kernel(op, dtype, p), cluster_config(n, p), (p.k as u32, 1, 1))),
    }
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
/// Writes `stats` [n, 32, 2] f32 = (mean, rstd) for [`group_norm_backward`]. On Hopper one
/// single-pass cluster kernel where the shape allows, else two kernels and a small scratch buffer of
/// per-chunk partial statistics.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool, y: &mut Tensor, stats: &mut Tensor) -> Result<()> {
    group_norm_on(gpu, if gpu.is_hopper()? { GnMode::Auto } else { GnMode::TwoKernel }, x, gamma, beta, eps, silu, y, stats).map(drop)
}

/// [`group_norm`] under `mode` (anything but `TwoKernel` needs a Hopper GPU); says which path ran.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_on(gpu: &Gpu, mode: GnMode, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool, y: &mut Tensor, stats: &mut Tensor) -> Result<GnPath> {
    let (n, hw, c) = nhwc_dims(x)?;
    ensure!(c % GROUPS == 0 && hw > 0 && n > 0, "group_norm: shape {:?} (c must be a multiple of {GROUPS})", x.shape());
    check_norm_operands("group_norm", x, c, &[gamma, beta], &[y])?;
    super::check_gpu("group_norm stats", &[stats], DType::F32, n * GROUPS * 2)?;
    let front = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(beta.ptr()?), KernelArg::Ptr(y.ptr()?)];
    if let Some(plan) = gn_cluster_plan(gpu, mode, "fwd", n, hw, c, x.dtype(), &[x.ptr()?, gamma.ptr()?, beta.ptr()?, y.ptr()?])? {
        let mut args = front.to_vec();
        args.extend([KernelArg::Ptr(stats.ptr()?), KernelArg::I32(hw as i32), KernelArg::I32(c as i32)]);
        args.extend(plan_args(&plan));
        args.extend([KernelArg::F32(eps), KernelArg::I32(silu as i32)]);
        gpu.launch_cluster(MODULE_SM90, gn_cluster_kernel("fwd", x.dtype(), &plan), cluster_config(n, &plan), (plan.k as u32, 1, 1), &args)?;
        return Ok(GnPath::Cluster);
    }
    let plan = gn_two_kernel(n, hw, c, x.dtype(), false)?;
    let part = gpu.alloc(ArenaKind::Scratch, n * plan.chunks * GROUPS * 8)?;
    let dims = [KernelArg::I32(hw as i32), KernelArg::I32(c as i32), KernelArg::I32(plan.rpc as i32), KernelArg::I32(plan.chunks as i32)];
    let mut args = vec![KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(part.ptr())];
    args.extend(dims);
    gpu.launch(MODULE, gn_kernel("group_norm_fwd_stats", x.dtype(), &plan), plan.stats, &args)?;
    let mut args = front.to_vec();
    args.extend([KernelArg::Ptr(part.ptr()), KernelArg::Ptr(stats.ptr()?)]);
    args.extend(dims);
    args.extend([KernelArg::F32(eps), KernelArg::I32(silu as i32)]);
    gpu.launch(MODULE, gn_kernel("group_norm_fwd_apply", x.dtype(), &plan), plan.apply, &args)?;
    Ok(GnPath::TwoKernel)
}

/// GroupNorm(32) input gradient: dx from x, the forward's `stats`, frozen γ, β and dy (same `silu`
/// as the forward; with SiLU the pre-activation is recomputed from x and the stats), plus
/// `residual` (same shape as x) when given: a residual branch's gradient, added in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, stats: &Tensor, silu: bool, dy: &Tensor, residual: Option<&Tensor>, dx: &mut Tensor) -> Result<()> {
    group_norm_backward_on(gpu, if gpu.is_hopper()? { GnMode::Auto } else { GnMode::TwoKernel }, x, gamma, beta, stats, silu, dy, residual, dx).map(drop)
}

/// [`group_norm_backward`] under `mode`; says which path ran.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_backward_on(
    gpu: &Gpu, mode: GnMode, x: &Tensor, gamma: &Tensor, beta: &Tensor, stats: &Tensor, silu: bool, dy: &Tensor, residual: Option<&Tensor>, dx: &mut Tensor,
) -> Result<GnPath> {
    let (n, hw, c) = nhwc_dims(x)?;
    ensure!(c % GROUPS == 0 && hw > 0 && n > 0, "group_norm_backward: shape {:?} (c must be a multiple of {GROUPS})", x.shape());
    check_norm_operands("group_norm_backward", x, c, &[gamma, beta], &[dy, dx])?;
    check_norm_operands("group_norm_backward residual", x, c, &[], residual.as_slice())?;
    super::check_gpu("group_norm_backward stats", &[stats], DType::F32, n * GROUPS * 2)?;
    let front = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(gamma.ptr()?), KernelArg::Ptr(beta.ptr()?), KernelArg::Ptr(stats.ptr()?), KernelArg::Ptr(dy.ptr()?)];
    let res_ptr = residual.map_or(Ok(0), Tensor::ptr)?;
    let res = KernelArg::Ptr(res_ptr);
    let operands = [x.ptr()?, gamma.ptr()?, beta.ptr()?, dy.ptr()?, dx.ptr()?, res_ptr];
    if let Some(plan) = gn_cluster_plan(gpu, mode, "bwd", n, hw, c, x.dtype(), &operands)? {
        let mut args = front.to_vec();
        args.extend([res, KernelArg::Ptr(dx.ptr()?), KernelArg::I32(hw as i32), KernelArg::I32(c as i32)]);
        args.extend(plan_args(&plan));
        args.push(KernelArg::I32(silu as i32));
        gpu.launch_cluster(MODULE_SM90, gn_cluster_kernel("bwd", x.dtype(), &plan), cluster_config(n, &plan), (plan.k as u32, 1, 1), &args)?;
        return Ok(GnPath::Cluster);
    }
    let plan = gn_two_kernel(n, hw, c, x.dtype(), true)?;
    let part = gpu.alloc(ArenaKind::Scratch, n * plan.chunks * GROUPS * 8)?;
    let tail = [KernelArg::I32(hw as i32), KernelArg::I32(c as i32), KernelArg::I32(plan.rpc as i32), KernelArg::I32(plan.chunks as i32), KernelArg::I32(silu as i32)];
    let mut args = front.to_vec();
    args.push(KernelArg::Ptr(part.ptr()));
    args.extend(tail);
    gpu.launch(MODULE, gn_kernel("group_norm_bwd_stats", x.dtype(), &plan), plan.stats, &args)?;
    let mut args = front.to_vec();
    args.extend([KernelArg::Ptr(part.ptr()), res, KernelArg::Ptr(dx.ptr()?)]);
    args.extend(tail);
    gpu.launch(MODULE, gn_kernel("group_norm_bwd_apply", x.dtype(), &plan), plan.apply, &args)?;
    Ok(GnPath::TwoKernel)
}

/// The benchmark floor of [`group_norm`]'s cluster path (src/bench/norm.rs): y = x (bf16) through
/// the plan the forward would launch, by `group_norm_cluster_floor_bf16_r<R>` (the forward's loads,
/// one cluster barrier, its stores; no arithmetic). False where the forward takes the two-kernel path.
pub(crate) fn group_norm_cluster_floor(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<bool> {
    let (n, hw, c) = nhwc_dims(x)?;
    ensure!(x.dtype() == DType::BF16 && c % GROUPS == 0, "group_norm_cluster_floor: bf16 x with a multiple of {GROUPS} channels");
    check_norm_operands("group_norm_cluster_floor", x, c, &[], &[y])?;
    let mode = if gpu.is_hopper()? { GnMode::Auto } else { GnMode::TwoKernel };
    let Some(plan) = gn_cluster_plan(gpu, mode, "fwd", n, hw, c, x.dtype(), &[x.ptr()?, y.ptr()?])? else {
        return Ok(false);
    };
    let mut args = vec![KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I32(hw as i32), KernelArg::I32(c as i32)];
    args.extend(plan_args(&plan));
    gpu.launch_cluster(MODULE_SM90, gn_cluster_kernel("floor", x.dtype(), &plan), cluster_config(n, &plan), (plan.k as u32, 1, 1), &args)?;
    Ok(true)
}

/// The two-kernel path's kernel `<op>_<dtype>_v<e><suffix>`.
fn gn_kernel(op: &str, dtype: DType, plan: &GnTwoKernel) -> &'static str {
    interned(format!("{op}_{}_v{}{}", dtype.suffix(), plan.e, plan.suffix))
}

/// The cluster kernels' (gpc, rpc) arguments.
fn plan_args(plan: &ClusterPlan) -> [KernelArg; 2] {
    [KernelArg::I32(plan.gpc as i32), KernelArg::I32(plan.rpc as i32)]
}

/// Grid (32/gpc clusters of k CTAs, n samples) and the plan's threads.
fn cluster_config(n: usize, plan: &ClusterPlan) -> LaunchConfig {
    LaunchConfig { grid_dim: ((GROUPS / plan.gpc * plan.k) as u32, n as u32, 1), block_dim: (plan.threads as u32, 1, 1), shared_mem_bytes: 0 }
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

/// LayerNorm launches: one warp per row, up to 8 rows per block, fewer where that spreads a small
/// tensor over more SMs (64 rows on an H100: 64 one-warp blocks instead of 8 blocks of 8).
fn ln_config(rows: usize, sms: usize) -> LaunchConfig {
    let warps = rows.div_ceil(sms.max(1)).next_power_of_two().min(8);
    LaunchConfig { grid_dim: (rows.div_ceil(warps) as u32, 1, 1), block_dim: ((warps * 32) as u32, 1, 1), shared_mem_bytes: 0 }
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
    gpu.launch(MODULE, ln_kernel("layer_norm_fwd", c, x.dtype()), ln_config(rows, gpu.sm_count()?), &args)
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
    gpu.launch(MODULE, ln_kernel("layer_norm_bwd", c, x.dtype()), ln_config(rows, gpu.sm_count()?), &args)
}

#[cfg(test)]
#[path = "norm_tests.rs"]
mod tests;
