//! Tests of src/ops/gemm.rs: the twins against small closed forms and finite differences (CPU),
//! the GPU kernels against the twins at every SD1.5 linear shape, every tile and odd sizes.

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
