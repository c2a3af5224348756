//! Tests of src/ops/norm.rs: CPU twins against finite differences, the launch plans, and the GPU
//! kernels against the twins (ignored without a GPU).

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
fn gn_forward(x: &[f32], n: usize, hw: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], silu: bool, eps: f32) -> Vec<f32> {
    let y = group_norm_cpu(x, n, hw, c, groups, gamma, beta, eps);
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
            gn_forward(xs, n, hw, c, groups, &gamma, &beta, silu, 1e-5).iter().zip(&w).map(|(y, w)| *y as f64 * *w as f64).sum()
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
                for one_wave in [false, true] {
                    let (rpc, chunks) = gn_tiling(n, hw, ty, one_wave);
                    assert!(chunks <= 128 && rpc * chunks >= hw && rpc * (chunks - 1) < hw, "n={n} ty={ty} hw={hw}: {rpc}×{chunks}");
                    assert!(!one_wave || n * chunks <= 128.max(n), "n={n} ty={ty} hw={hw}: {n}×{chunks} blocks of 1024 threads");
                }
            }
        }
    }
    // One 4096-row sample with 12 thread rows: 128 chunks, at most 3 rows per thread; two samples: 64 each.
    assert_eq!(gn_tiling(1, 4096, 12, false), (32, 128));
    assert_eq!(gn_tiling(2, 4096, 12, false), (64, 64));
    assert_eq!(gn_tiling(4, 16384, 25, true), (512, 32));
    assert_eq!((vector_width(10, DType::BF16), vector_width(40, DType::BF16), vector_width(40, DType::F32), vector_width(3, DType::F32)), (2, 8, 4, 1));
    for (c, dtype, want) in [(320, DType::BF16, (8, 40, 12)), (1280, DType::BF16, (8, 160, 3)), (2560, DType::BF16, (8, 320, 1)), (2560, DType::F32, (8, 320, 1)), (1024, DType::F32, (4, 256, 2)), (96, DType::F32, (2, 48, 10)), (128, DType::BF16, (8, 16, 32)), (32, DType::BF16, (2, 16, 32))] {
        assert_eq!(gn_layout(c, dtype, 512).unwrap(), want, "c={c} {dtype:?}");
    }
    // Every vector spans at most two groups and a block holds at most 512 threads, for every width
    // the kernels accept; wider rows are refused with an error.
    for cpg in 1..=100 {
        for dtype in [DType::BF16, DType::F32] {
            let (e, tx, ty) = gn_layout(32 * cpg, dtype, 512).unwrap();
            assert!((e <= cpg || e == 2 * cpg) && tx * e == 32 * cpg && tx * ty <= 512 && tx * ty >= 32, "cpg={cpg}: ({e}, {tx}, {ty})");
        }
    }
    assert!(gn_layout(32 * 1024, DType::BF16, 512).is_err());
    assert_eq!(gn_layout(640, DType::BF16, 256).unwrap(), (8, 80, 3));
}

/// The SD1.5 GroupNorm widths (UNet resnets and transformers, the up path's skip concatenations)
/// and resolutions (64², 32², 16², 8² latents).
const SD15_CHANNELS: [usize; 6] = [320, 640, 960, 1280, 1920, 2560];
const SD15_HW: [usize; 4] = [4096, 1024, 256, 64];

/// The SD1.5 UNet's GroupNorm inputs (resnets, transformers, the up path's concatenations) as
/// (hw, c) at batch 1.
const SD15_SHAPES: [(usize, usize); 11] = [(4096, 320), (4096, 640), (4096, 960), (1024, 640), (1024, 960), (1024, 1280), (1024, 1920), (256, 1280), (256, 1920), (256, 2560), (64, 1280)];

#[test]
fn cluster_plans_cover_sd15_shapes_and_fit() {
    let unlimited = |_: &ClusterPlan| Ok(usize::MAX);
    for dtype in [DType::BF16, DType::F32] {
        let e = 16 / dtype.size();
        for n in [1, 2] {
            for &hw in &SD15_HW {
                for &c in &SD15_CHANNELS {
                    for backward in [false, true] {
                        let plans = gn_cluster_plans(n, hw, c, dtype, backward, 16, 512);
                        for p in &plans {
                            let vectors = p.gpc * c / GROUPS / e;
                            assert!(GROUPS.is_multiple_of(p.gpc) && p.k <= 16 && p.k * p.rpc >= hw && (p.k - 1) * p.rpc < hw, "{p:?}");
                            assert!(p.threads.is_multiple_of(32) && p.threads <= 512 && p.threads >= vectors * p.rpc.div_ceil(p.r), "{p:?}");
                            assert!(p.r <= if backward { 4 } else { 8 } && (p.gpc * c / GROUPS).is_multiple_of(e), "{p:?}");
                        }
                        if let Some(p) = gn_pick_plan(n, &plans, 128, unlimited).unwrap() {
                            assert!(n * GROUPS / p.gpc * p.k >= 128, "{n}×{hw}×{c}: {p:?} leaves SMs idle");
                        }
                        // Every SD1.5 shape in bf16 has a plan, but the backward at 4096×960 (its
                        // 120-channel pieces need 8 vectors per thread).
                        if dtype == DType::BF16 && SD15_SHAPES.contains(&(hw, c)) && !(backward && (hw, c) == (4096, 960)) {
                            assert!(!plans.is_empty(), "no plan for {n}×{hw}×{c} backward={backward}");
                        }
                    }
                }
            }
        }
    }
    // 1×4096×320: 8 clusters of 16 CTAs, 4 groups (40 channels, 80 bytes a row) of 256 rows each,
    // 320 threads holding 4 vectors.
    let plans = gn_cluster_plans(1, 4096, 320, DType::BF16, false, 16, 512);
    let want = ClusterPlan { gpc: 4, k: 16, rpc: 256, threads: 320, r: 4 };
    assert_eq!(gn_pick_plan(1, &plans, 128, unlimited).unwrap(), Some(want));
    // Where only 7 clusters of 16 fit at once, clusters of 8 (4 groups: 64 CTAs; 2 groups would read
    // 40-byte rows); where no plan fits in one wave, none (the two-kernel path runs).
    let seven_of_16 = |p: &ClusterPlan| Ok(if p.k == 16 { 7 } else { 16 });
    assert_eq!(gn_pick_plan(1, &plans, 128, seven_of_16).unwrap(), Some(ClusterPlan { gpc: 4, k: 8, rpc: 512, threads: 320, r: 8 }));
    assert_eq!(gn_pick_plan(1, &plans, 128, |_| Ok(0)).unwrap(), None);
    // Odd channels per group, vectors over three groups (4 bf16 channels per group), the VAE's 512²
    // images (too many rows per CTA): no plan; 4 f32 channels per group on one row: plans.
    assert!(gn_cluster_plans(1, 64, 96, DType::BF16, false, 16, 512).is_empty());
    assert!(gn_cluster_plans(1, 64, 128, DType::BF16, false, 16, 512).is_empty());
    assert!(gn_cluster_plans(1, 512 * 512, 256, DType::BF16, true, 16, 512).is_empty());
    assert!(!gn_cluster_plans(1, 1, 128, DType::F32, true, 16, 512).is_empty());
}

/// The twins' results restricted to some rows: (mean, rstd) per (sample, group) [n, 32, 2], and y
/// (after SiLU when `silu`) and dx at rows `rows` of every sample [n, rows.len(), c]. Statistics and
/// the backward's group means over all rows, in f64. Checked against the full twins below; used at
/// full SD1.5 shapes, where the twins over every row would dominate the test's time.
#[allow(clippy::too_many_arguments)]
fn gn_reference(x: &[f32], dy: &[f32], n: usize, hw: usize, c: usize, gamma: &[f32], beta: &[f32], eps: f32, silu: bool, rows: &[usize]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let cg = c / GROUPS;
    let count = (hw * cg) as f64;
    let (mut stats, mut y, mut dx) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..n {
        let (xs, dys) = (&x[b * hw * c..][..hw * c], &dy[b * hw * c..][..hw * c]);
        let (mut mean, mut var) = ([0f64; GROUPS], [0f64; GROUPS]);
        for (i, &v) in xs.iter().enumerate() {
            mean[i % c / cg] += v as f64;
        }
        mean.iter_mut().for_each(|m| *m /= count);
        for (i, &v) in xs.iter().enumerate() {
            var[i % c / cg] += (v as f64 - mean[i % c / cg]).powi(2);
        }
        let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v / count + eps as f64).sqrt()).collect();
        // d = dh·γ and x̂ of element i, and y (after SiLU when `silu`).
        let grad = |i: usize| {
            let (ch, g) = (i % c, i % c / cg);
            let xhat = (xs[i] as f64 - mean[g]) * rstd[g];
            let h = xhat * gamma[ch] as f64 + beta[ch] as f64;
            let s = 1.0 / (1.0 + (-h).exp());
            let dh = if silu { dys[i] as f64 * s * (1.0 + h * (1.0 - s)) } else { dys[i] as f64 };
            (dh * gamma[ch] as f64, xhat, if silu { h * s } else { h })
        };
        let (mut m1, mut m2) = ([0f64; GROUPS], [0f64; GROUPS]);
        for i in 0..hw * c {
            let (d, xhat, _) = grad(i);
            m1[i % c / cg] += d;
            m2[i % c / cg] += d * xhat;
        }
        for g in 0..GROUPS {
            stats.extend([mean[g] as f32, rstd[g] as f32]);
        }
        for &p in rows {
            for i in p * c..(p + 1) * c {
                let (d, xhat, yv) = grad(i);
                let g = i % c / cg;
                y.push(yv as f32);
                dx.push((rstd[g] * (d - m1[g] / count - xhat * m2[g] / count)) as f32);
            }
        }
    }
    (stats, y, dx)
}

#[test]
fn sampled_reference_matches_the_twins() {
    let (n, hw, c) = (2, 37, 64);
    let mut rng = Rng::new(5);
    let (x, dy) = (activations(&mut rng, n * hw, c), rng.normal_vec(n * hw * c, 1.0));
    let (gamma, beta) = (rng.uniform_vec(c, 0.5, 1.5), rng.normal_vec(c, 0.5));
    let all: Vec<usize> = (0..hw).collect();
    for silu in [false, true] {
        let (_, y, dx) = gn_reference(&x, &dy, n, hw, c, &gamma, &beta, 1e-6, silu, &all);
        assert_close("sampled reference y", &y, &gn_forward(&x, n, hw, c, GROUPS, &gamma, &beta, silu, 1e-6), 1e-6);
        assert_close("sampled reference dx", &dx, &group_norm_backward_cpu(&x, n, hw, c, GROUPS, &gamma, &beta, 1e-6, silu, &dy), 1e-6);
    }
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

/// The rows of every sample that a case compares: all for up to 1024 rows, else every 7th, the
/// first and the last (every CTA's rows are among them).
fn sampled_rows(hw: usize) -> Vec<usize> {
    if hw <= 1024 { (0..hw).collect() } else { (0..hw).filter(|p| p % 7 == 0 || *p == hw - 1).collect() }
}

/// Values at `rows` of every sample of a [n, hw, c] tensor.
fn take_rows(v: &[f32], n: usize, hw: usize, c: usize, rows: &[usize]) -> Vec<f32> {
    (0..n).flat_map(|b| rows.iter().flat_map(move |&p| &v[(b * hw + p) * c..][..c])).copied().collect()
}

/// One GroupNorm case on the GPU: forward (with the saved statistics), backward, and backward with a
/// residual gradient, NaN-poisoned outputs, fresh inputs, against the twins' values (`gn_reference`).
/// `mode`: the paths allowed; under `Cluster` the cluster kernels must run wherever the shape has a
/// plan (`gn_cluster_plans`), under `TwoKernel` the two kernels; under `Auto` either.
#[allow(clippy::too_many_arguments)]
fn gpu_group_norm_case(gpu: &Gpu, n: usize, hw: usize, c: usize, silu: bool, eps: f32, dtype: DType, mode: GnMode) {
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let mut x = activations(&mut rng, n * hw, c);
    let (mut gamma, mut beta, mut dy, mut res) = (rng.uniform_vec(c, 0.5, 1.5), rng.normal_vec(c, 0.5), rng.normal_vec(n * hw * c, 1.0), rng.normal_vec(n * hw * c, 1.0));
    if dtype == DType::BF16 {
        (x, gamma, beta, dy, res) = (round_bf16(&x), round_bf16(&gamma), round_bf16(&beta), round_bf16(&dy), round_bf16(&res));
    }
    let shape = [n, hw, c];
    let (xd, gd, bd, dyd) = (upload(gpu, &shape, &x, dtype), upload(gpu, &[c], &gamma, dtype), upload(gpu, &[c], &beta, dtype), upload(gpu, &shape, &dy, dtype));
    let (mut y, mut stats, mut dx) = (poisoned(gpu, &shape, dtype), poisoned(gpu, &[n, GROUPS, 2], DType::F32), poisoned(gpu, &shape, dtype));
    let what = |s: &str| format!("group norm {s} {dtype:?} n={n} hw={hw} c={c} silu={silu} eps={eps:e} mode={mode:?} seed={seed}");
    let (kmax, tmax, _) = cluster_tuning();
    let want = |backward| match mode {
        GnMode::Cluster if gn_cluster_plans(n, hw, c, dtype, backward, kmax, tmax).is_empty() => Some(GnPath::TwoKernel),
        GnMode::Cluster => Some(GnPath::Cluster),
        GnMode::TwoKernel => Some(GnPath::TwoKernel),
        GnMode::Auto => None,
    };
    let path = group_norm_on(gpu, mode, &xd, &gd, &bd, eps, silu, &mut y, &mut stats).unwrap();
    assert!(want(false).is_none_or(|w| w == path), "{}: {path:?}", what("forward path"));
    let path = group_norm_backward_on(gpu, mode, &xd, &gd, &bd, &stats, silu, &dyd, None, &mut dx).unwrap();
    assert!(want(true).is_none_or(|w| w == path), "{}: {path:?}", what("backward path"));
    // The same gradient with a residual branch's gradient added in the kernel.
    let mut dx_res = poisoned(gpu, &shape, dtype);
    group_norm_backward_on(gpu, mode, &xd, &gd, &bd, &stats, silu, &dyd, Some(&upload(gpu, &shape, &res, dtype)), &mut dx_res).unwrap();
    let rows = sampled_rows(hw);
    let (want_stats, want_y, want_dx) = gn_reference(&x, &dy, n, hw, c, &gamma, &beta, eps, silu, &rows);
    let (tol_fwd, tol_bwd) = tolerances(dtype);
    let pick = |t: &Tensor| take_rows(&download(gpu, t), n, hw, c, &rows);
    check(&what("forward"), &pick(&y), &want_y, tol_fwd);
    check(&what("stats"), &download(gpu, &stats), &want_stats, 1e-5);
    check(&what("backward"), &pick(&dx), &want_dx, tol_bwd);
    let want_res: Vec<f32> = want_dx.iter().zip(take_rows(&res, n, hw, c, &rows)).map(|(a, b)| a + b).collect();
    check(&what("backward + residual"), &pick(&dx_res), &want_res, tol_bwd);
}

/// Every SD1.5 resolution at width `c`, on the single-pass cluster path (on Hopper; two kernels
/// elsewhere): bf16 at batch 1 and 2, f32 at batch 1 or 2; SiLU, eps 1e-5 / 1e-6 alternating (every
/// case checks the backward with and without the residual); then the path `group_norm` picks
/// (clusters in one wave, or two kernels) at batch 1 in bf16.
fn gpu_sd15_width(c: usize) {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    let mode = if gpu.is_hopper().unwrap() { GnMode::Cluster } else { GnMode::TwoKernel };
    for (i, &hw) in SD15_HW.iter().enumerate() {
        let (silu, eps) = (i % 2 == 0, if i % 3 == 1 { 1e-6 } else { 1e-5 });
        for n in [1, 2] {
            gpu_group_norm_case(&gpu, n, hw, c, silu ^ (n == 2), eps, DType::BF16, mode);
        }
        gpu_group_norm_case(&gpu, 1 + i % 2, hw, c, !silu, eps, DType::F32, mode);
        let auto = if mode == GnMode::Cluster { GnMode::Auto } else { GnMode::TwoKernel };
        gpu_group_norm_case(&gpu, 1, hw, c, silu, eps, DType::BF16, auto);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c320() {
    gpu_sd15_width(320);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c640() {
    gpu_sd15_width(640);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c960() {
    gpu_sd15_width(960);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c1280() {
    gpu_sd15_width(1280);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c1920() {
    gpu_sd15_width(1920);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_sd15_c2560() {
    gpu_sd15_width(2560);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_two_kernel_path_matches_twin() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    // The path every non-Hopper GPU runs (512-thread kernels, and the 256-thread ones from 4 Mi
    // elements: 2×4096×640, 2×4096×960, 1×4096×1280).
    let shapes = [(1, 4096, 320), (2, 1024, 640), (1, 256, 1280), (2, 64, 2560), (1, 1024, 1920), (2, 4096, 640), (2, 4096, 960), (1, 4096, 1280)];
    for (i, &(n, hw, c)) in shapes.iter().enumerate() {
        for dtype in [DType::BF16, DType::F32] {
            gpu_group_norm_case(&gpu, n, hw, c, i % 2 == 0, if i % 3 == 2 { 1e-6 } else { 1e-5 }, dtype, GnMode::TwoKernel);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_twin_at_odd_shapes() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    let hopper = gpu.is_hopper().unwrap();
    let mode = if hopper { GnMode::Cluster } else { GnMode::TwoKernel };
    // Odd channels per group and vectors over three groups (two kernels everywhere); then the
    // cluster path where a plan exists: one row, fewer rows than CTAs (empty CTAs), rows not a
    // multiple of 16, many samples, f32 with 4 channels per group (bf16: one vector over two
    // groups), the 4096×960 backward and a long sample (two kernels; `_t1024` forward from 24 MiB); each
    // also as `group_norm` picks.
    for (n, hw, c) in [(3, 7, 96), (2, 9, 224), (1, 150_001, 32), (2, 9, 64)] {
        for dtype in [DType::BF16, DType::F32] {
            gpu_group_norm_case(&gpu, n, hw, c, n != 2, 1e-6, dtype, mode);
        }
    }
    for (n, hw, c) in [(1, 1, 512), (2, 9, 256), (1, 1000, 128), (2, 33, 512), (1, 4099, 256), (300, 3, 256), (2, 4096, 960), (1, 65_536, 256)] {
        for silu in [false, true] {
            for dtype in [DType::BF16, DType::F32] {
                gpu_group_norm_case(&gpu, n, hw, c, silu, 1e-6, dtype, mode);
            }
        }
        let auto = if hopper { GnMode::Auto } else { GnMode::TwoKernel };
        gpu_group_norm_case(&gpu, n, hw, c, true, 1e-5, DType::BF16, auto);
    }
    // The VAE's 512² × 128 input, larger than L2 (the `_t1024` forward), 8-element vectors over
    // two 4-channel groups.
    for silu in [false, true] {
        gpu_group_norm_case(&gpu, 1, 262_144, 128, silu, 1e-6, DType::BF16, mode);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_runs_the_cluster_kernels_on_hopper() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    let shape = [1, 1024, 640];
    let x = upload(&gpu, &shape, &vec![0.5; 1024 * 640], DType::BF16);
    let gb = upload(&gpu, &[640], &[1.0; 640], DType::BF16);
    let (mut y, mut stats, mut dx) = (poisoned(&gpu, &shape, DType::BF16), poisoned(&gpu, &[1, GROUPS, 2], DType::F32), poisoned(&gpu, &shape, DType::BF16));
    gpu.start_profiling();
    group_norm(&gpu, &x, &gb, &gb, 1e-5, true, &mut y, &mut stats).unwrap();
    group_norm_backward(&gpu, &x, &gb, &gb, &stats, true, &x, None, &mut dx).unwrap();
    let mut names: Vec<&str> = gpu.stop_profiling().unwrap().iter().map(|t| t.name).collect();
    names.sort();
    if gpu.is_hopper().unwrap() {
        // One launch each; the vectors per thread (`_r<R>`) follow the plan that runs in one wave.
        assert!(names.len() == 2 && names[0].starts_with("group_norm_cluster_bwd_bf16_r") && names[1].starts_with("group_norm_cluster_fwd_bf16_r"), "{names:?}");
    } else {
        assert_eq!(names, ["group_norm_bwd_apply_bf16_v8", "group_norm_bwd_stats_bf16_v8", "group_norm_fwd_apply_bf16_v8", "group_norm_fwd_stats_bf16_v8"]);
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

/// The benchmark floor kernel does the forward's whole traffic: y = x bit for bit at every SD1.5
/// shape it runs (so its time is a floor of the same work, not of part of it).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_cluster_floor_copies_every_value() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !gpu.is_hopper().unwrap() {
        return;
    }
    let mut rng = Rng::new(Rng::fresh_seed());
    let mut ran = 0;
    for (n, hw, c) in [(1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280), (2, 4096, 640), (1, 1024, 1920)] {
        let x = round_bf16(&rng.normal_vec(n * hw * c, 1.0));
        let xd = upload(&gpu, &[n, hw, c], &x, DType::BF16);
        let mut y = poisoned(&gpu, &[n, hw, c], DType::BF16);
        if group_norm_cluster_floor(&gpu, &xd, &mut y).unwrap() {
            assert_eq!(download(&gpu, &y), x, "floor kernel n={n} hw={hw} c={c}");
            ran += 1;
        }
    }
    assert!(ran >= 4, "the cluster path ran at only {ran} shapes");
}
