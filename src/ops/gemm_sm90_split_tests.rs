//! GPU tests of src/ops/gemm_sm90_split.rs against the CPU twins (`at_b_cpu`, `linear_cpu`,
//! `linear_input_grad_cpu`): every SD1.5 LoRA weight-gradient shape and the split-K shapes of
//! `gemm()`, each tile and several slice counts (one, the launcher's, one K tile per slice, a short
//! last slice), accumulate on/off into poisoned C, odd sizes, determinism, and the dispatch.

use super::*;
use crate::ops::gemm::tests::{download, poisoned, rand_bf16, upload};
use crate::ops::gemm::{at_b_cpu, at_b_many, at_b_many_sm90, linear, linear_cpu, AtB, WeightGradSplit};
use crate::ops::gemm_sm90::tests::{call_of, check_c, hopper, problem, Problem};
use crate::rng::Rng;
use crate::tensor::assert_close;

/// Runs `p` on `tile` with `slices` K slices into a fresh C of type `out` (poisoned, or holding
/// the prior C when `accumulate`: R = C), compares the sampled rows with the twin and returns all of C.
#[allow(clippy::too_many_arguments)]
fn check(gpu: &Gpu, p: &Problem, tile: SplitTile, slices: usize, out: DType, with_bias: bool, accumulate: bool, what: &str) -> Vec<f32> {
    let (call, _bias, c) = call_of(gpu, p, out, with_bias, accumulate);
    launch(gpu, &call, tile, slices).unwrap();
    let tol = if out == DType::F32 { 1e-3 } else { 1e-2 };
    check_c(gpu, p, &call, &c, tol, &format!("{what} tile {} slices {slices}", tile.label()))
}

/// Slice counts tried: one, the launcher's, one K tile per slice (at most 64 slices), and three.
fn slice_counts(gpu: &Gpu, p: &Problem, out: DType) -> Vec<usize> {
    let call = GemmCall { layouts: p.layouts, m: p.m, n: p.n, seg1: p.seg1, seg2: p.seg2, c: 0, ldc: p.n, out, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
    let kt = k_tiles(&call);
    let mut v = vec![1, plan(gpu, &call).unwrap().1, even_slices(kt, 64), even_slices(kt, 3)];
    v.sort();
    v.dedup();
    v
}

/// (tokens, p, q) of every LoRA weight gradient of SD1.5 at 512 px, r = 128, batch 1 and 2: dB
/// [out, r] and dA [r, in] of the self-attention projections (in = out = the level's width) and
/// of the cross-attention to_k/to_v (77 context tokens, in = 768).
fn wgrad_shapes() -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for batch in [1, 2] {
        for (tokens, d) in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)] {
            v.extend([(tokens * batch, d, 128), (tokens * batch, 128, d)]);
        }
        for d in [320, 640, 1280] {
            v.extend([(77 * batch, d, 128), (77 * batch, 128, 768)]);
        }
    }
    v
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sm90_split_weight_gradients_match_twin_at_sd15_shapes() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    for (tokens, p, q) in wgrad_shapes() {
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let pr = problem(&gpu, &mut rng, Layouts::Mn, p, tokens, q, 0);
        for tile in SPLIT_TILES {
            for (i, slices) in slice_counts(&gpu, &pr, DType::F32).into_iter().enumerate() {
                let what = format!("mn {tokens}: {p}x{q} seed={seed}");
                check(&gpu, &pr, tile, slices, DType::F32, false, i % 2 == 0, &what);
                check(&gpu, &pr, tile, slices, DType::F32, true, i % 2 == 1, &what);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sm90_split_k_matches_twins_at_gemm_split_shapes() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    // (layouts, m, k1, n, k2): the small-M deep-K calls of the training step (time embedding, the
    // 8×8 and 16×16 levels, the 77-token context, u = x·Aᵀ and v = dy·B at r = 128, the fused LoRA
    // forward [x | u]·[W | B]ᵀ and input gradient [dy | v]·[W ; A]).
    let shapes = [
        (Layouts::Kk, 1, 1280, 1280, 0),
        (Layouts::Kk, 2, 1280, 320, 0),
        (Layouts::Kk, 64, 1280, 1280, 128),
        (Layouts::Kk, 64, 5120, 1280, 0),
        (Layouts::Kk, 77, 768, 320, 128),
        (Layouts::Kk, 154, 768, 1280, 0),
        (Layouts::Kk, 1024, 640, 128, 0),
        (Layouts::Kk, 256, 1280, 128, 0),
        (Layouts::Kk, 128, 1280, 1280, 128),
        (Layouts::Kn, 64, 1280, 1280, 128),
        (Layouts::Kn, 64, 10240, 1280, 0),
        (Layouts::Kn, 1024, 640, 128, 0),
        (Layouts::Kn, 256, 1280, 128, 0),
        (Layouts::Kn, 128, 5120, 1280, 0),
        (Layouts::Kn, 512, 1280, 1280, 128),
    ];
    for (layouts, m, k1, n, k2) in shapes {
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let pr = problem(&gpu, &mut rng, layouts, m, k1, n, k2);
        let what = format!("{layouts:?} {m}x{k1}(+{k2})->{n} seed={seed}");
        for tile in SPLIT_TILES {
            for slices in slice_counts(&gpu, &pr, DType::BF16) {
                check(&gpu, &pr, tile, slices, DType::BF16, true, true, &what);
                check(&gpu, &pr, tile, slices, DType::F32, false, false, &what);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sm90_split_handles_odd_sizes() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // M, N not multiples of the tile, K not of 64 (a partial last K tile), slice counts that leave
    // a short last slice (7 K tiles in 2 or 3 slices), a segment boundary inside a slice.
    for (layouts, m, k1, n, k2) in [(Layouts::Mn, 200, 400, 136, 0), (Layouts::Mn, 8, 1, 8, 0), (Layouts::Kk, 7, 1000, 19, 24), (Layouts::Kn, 5, 2056, 136, 8)] {
        let pr = problem(&gpu, &mut rng, layouts, m, k1, n, k2);
        let kt = k1.div_ceil(BK) + k2.div_ceil(BK);
        let outs: &[DType] = if layouts == Layouts::Mn { &[DType::F32] } else { &[DType::BF16, DType::F32] };
        let mut counts = vec![1, even_slices(kt, 2), even_slices(kt, 3), even_slices(kt, kt)];
        counts.dedup();
        for tile in SPLIT_TILES {
            for &slices in &counts {
                for &out in outs {
                    for accumulate in [false, true] {
                        check(&gpu, &pr, tile, slices, out, true, accumulate, &format!("{layouts:?} {m}x{k1}(+{k2})->{n} seed={seed}"));
                    }
                }
            }
        }
    }
    // Rows along m or n not 16-byte loadable: the split kernels decline (the sm_80 path keeps it).
    let pr = problem(&gpu, &mut rng, Layouts::Mn, 13, 64, 320, 0);
    let call = GemmCall { layouts: Layouts::Mn, m: 13, n: 320, seg1: pr.seg1, seg2: pr.seg2, c: 0, ldc: 320, out: DType::F32, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
    assert!(!supports(&gpu, &call).unwrap(), "p = 13 must not take the sm90 path");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sm90_split_is_deterministic_and_resets_its_counters() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let wgrad = problem(&gpu, &mut rng, Layouts::Mn, 128, 8192, 320, 0);
    let linear_p = problem(&gpu, &mut rng, Layouts::Kk, 64, 5120, 1280, 0);
    for tile in SPLIT_TILES {
        let what = format!("determinism seed={seed}");
        let first = check(&gpu, &wgrad, tile, 32, DType::F32, false, false, &what);
        let first_kk = check(&gpu, &linear_p, tile, 20, DType::BF16, true, false, &what);
        // Same calls again (the counters were reset by the last slices) after other split calls.
        let again_kk = check(&gpu, &linear_p, tile, 20, DType::BF16, true, false, &what);
        let again = check(&gpu, &wgrad, tile, 32, DType::F32, false, false, &what);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert!(bits(&first) == bits(&again), "{what}: mn tile {} not bit-identical across runs", tile.label());
        assert!(bits(&first_kk) == bits(&again_kk), "{what}: kk tile {} not bit-identical across runs", tile.label());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_dispatch_takes_sm90_split_where_enabled_on_hopper() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // A small-M deep-K linear: one split launch, no finish kernel (the sm_80 split + finish when
    // SDLORA_SM90_SPLIT turns the split kernels off for it).
    let (m, k, n) = (64, 5120, 1280);
    let x = rand_bf16(&mut rng, m * k, 1.0);
    let w = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
    let (xd, wd) = (upload(&gpu, &[m, k], &x, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16));
    let mut y = poisoned(&gpu, &[m, n], DType::BF16);
    gpu.start_profiling();
    linear(&gpu, &xd, &wd, None, None, &mut y).unwrap();
    // (The profiler adds up the launches of each kernel.)
    let kernels: Vec<(&str, usize)> = gpu.stop_profiling().unwrap().iter().map(|t| (t.name, t.calls)).collect();
    let split = kernels.len() == 1 && kernels[0].1 == 1 && kernels[0].0.starts_with("gemm_sm90_") && kernels[0].0.ends_with("_kk_bf16_split");
    assert_eq!(split, enabled_for(Layouts::Kk), "linear {m}x{k}->{n}: ran {kernels:?}");
    let want = linear_cpu(&x, m, k, &w, n, None);
    assert_close(&format!("linear {m}x{k}->{n} seed={seed}"), &download(&gpu, &y), &want, 1e-2);
    // A LoRA backward's dA and dB: on the split kernels two mn launches and no reduction kernel;
    // through at_b_many, the split kernels where SDLORA_SM90_SPLIT enables them (by default),
    // else the sm_80 workspace path.
    let (tokens, d, r) = (4096, 320, 128);
    let (dy, us) = (rand_bf16(&mut rng, tokens * d, 1.0), rand_bf16(&mut rng, tokens * r, 1.0));
    let (dyd, usd) = (upload(&gpu, &[tokens, d], &dy, DType::BF16), upload(&gpu, &[tokens, r], &us, DType::BF16));
    let want_db = at_b_cpu(&dy, tokens, d, &us, r);
    let want_da: Vec<f32> = at_b_cpu(&us, tokens, r, &dy, d).iter().map(|v| 0.5 * v).collect();
    for forced in [true, false] {
        let db = poisoned(&gpu, &[d, r], DType::F32);
        let da = poisoned(&gpu, &[r, d], DType::F32);
        let problems = [
            AtB { a: (dyd.ptr().unwrap(), d), b: (usd.ptr().unwrap(), r), m: tokens, p: d, q: r, alpha: 1.0, c: db.ptr().unwrap() },
            AtB { a: (usd.ptr().unwrap(), r), b: (dyd.ptr().unwrap(), d), m: tokens, p: r, q: d, alpha: 0.5, c: da.ptr().unwrap() },
        ];
        gpu.start_profiling();
        if forced {
            assert!(at_b_many_sm90(&gpu, &problems, false).unwrap(), "at_b_many_sm90 declined the LoRA shapes");
        } else {
            at_b_many(&gpu, &problems, false, WeightGradSplit::InKernel).unwrap();
        }
        let kernels: Vec<(&str, usize)> = gpu.stop_profiling().unwrap().iter().map(|t| (t.name, t.calls)).collect();
        let on_sm90 = kernels.iter().map(|k| k.1).sum::<usize>() == 2 && kernels.iter().all(|k| k.0.starts_with("gemm_sm90_") && k.0.ends_with("_mn_f32_split"));
        let no_sm90 = kernels.iter().all(|k| !k.0.contains("sm90"));
        assert!(if forced || enabled_for(Layouts::Mn) { on_sm90 } else { no_sm90 }, "at_b_many (forced sm90: {forced}): ran {kernels:?}");
        assert_close(&format!("dB forced={forced} seed={seed}"), &download(&gpu, &db), &want_db, 1e-3);
        assert_close(&format!("dA forced={forced} seed={seed}"), &download(&gpu, &da), &want_da, 1e-3);
    }
}

/// One product of a grouped launch: the call, its C on the GPU, its operands and the twin's C.
struct GroupedProduct {
    problem: AtB,
    accumulate: bool,
    want: Vec<f32>,
    c: crate::tensor::Tensor,
    _operands: [crate::tensor::Tensor; 2],
}

/// Random operands for `c[p×q] = alpha·aᵀ·b` over `tokens` (+ c when `accumulate`; else C poisoned).
fn grouped_product(gpu: &Gpu, rng: &mut Rng, (tokens, p, q, alpha, accumulate): (usize, usize, usize, f32, bool)) -> GroupedProduct {
    let (a, b) = (rand_bf16(rng, tokens * p, 1.0), rand_bf16(rng, tokens * q, 1.0));
    let old = rng.normal_vec(p * q, 1.0);
    let c = if accumulate { upload(gpu, &[p, q], &old, DType::F32) } else { poisoned(gpu, &[p, q], DType::F32) };
    let want = at_b_cpu(&a, tokens, p, &b, q).iter().zip(&old).map(|(v, o)| alpha * v + if accumulate { *o } else { 0.0 }).collect();
    let operands = [upload(gpu, &[tokens, p], &a, DType::BF16), upload(gpu, &[tokens, q], &b, DType::BF16)];
    let problem = AtB { a: (operands[0].ptr().unwrap(), p), b: (operands[1].ptr().unwrap(), q), m: tokens, p, q, alpha, c: c.ptr().unwrap() };
    GroupedProduct { problem, accumulate, want, c, _operands: operands }
}

/// Runs `products` as one grouped launch, checks every C against its twin and returns them all.
fn check_group(gpu: &Gpu, products: &[GroupedProduct], what: &str) -> Vec<Vec<f32>> {
    let queued: Vec<GroupGemm> = products.iter().map(|p| GroupGemm::at_b(&p.problem, p.accumulate)).collect();
    assert!(supports_group(gpu, Layouts::Mn, DType::F32, &queued).unwrap(), "{what}: grouped launch declined");
    gpu.start_profiling();
    gemm_group(gpu, Layouts::Mn, DType::F32, &queued).unwrap();
    let kernels: Vec<(&str, usize)> = gpu.stop_profiling().unwrap().iter().map(|t| (t.name, t.calls)).collect();
    assert_eq!(kernels, [("gemm_sm90_64x64_mn_f32_group", 1)], "{what}: one grouped launch");
    products
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let got = download(gpu, &p.c);
            let pr = &p.problem;
            assert_close(&format!("{what} product {i}: {}x{} over {} tokens, accumulate {}", pr.p, pr.q, pr.m, p.accumulate), &got, &p.want, 1e-3);
            got
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_wgrad_group_matches_twin_at_sd15_attention_blocks() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // Each attention of SD1.5 at 512 px, r = 128, batch 1 and 2: self-attention (four d→d layers:
    // dB [d, r] and dA [r, d] over the tokens) and cross-attention (q and out over the tokens, k
    // and v over the 77 context tokens with in = 768); accumulate and alpha alternate.
    for batch in [1, 2] {
        for (tokens, d) in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)] {
            let (t, c) = (tokens * batch, 77 * batch);
            let self_attn: Vec<(usize, usize, usize)> = (0..4).flat_map(|_| [(t, d, 128), (t, 128, d)]).collect();
            let cross: Vec<(usize, usize, usize)> = vec![(t, d, 128), (t, 128, d), (c, d, 128), (c, 128, 768), (c, d, 128), (c, 128, 768), (t, d, 128), (t, 128, d)];
            for (name, shapes) in [("self", self_attn), ("cross", cross)] {
                let products: Vec<GroupedProduct> = shapes.iter().enumerate().map(|(i, &(m, p, q))| grouped_product(&gpu, &mut rng, (m, p, q, if i % 3 == 0 { 0.5 } else { 1.0 }, i % 2 == 1))).collect();
                check_group(&gpu, &products, &format!("{name}-attention {t} tokens x {d} seed={seed}"));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_wgrad_group_handles_odd_sizes_and_is_deterministic() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // p, q not multiples of 64; K of one token, of a partial K tile, of many slices; a group of one.
    let odd = [(200, 136, 200, 1.0, false), (1, 8, 8, 2.0, true), (400, 8, 64, 1.0, true), (3000, 72, 136, 0.25, false), (77, 128, 768, 1.0, false)];
    let products: Vec<GroupedProduct> = odd.iter().map(|&s| grouped_product(&gpu, &mut rng, s)).collect();
    check_group(&gpu, &products, &format!("odd sizes seed={seed}"));
    check_group(&gpu, &products[3..4], &format!("a group of one seed={seed}"));
    // A deep group twice, another split group between (its counters must be back at zero): the
    // same bits, whichever slice finished each tile.
    let deep: Vec<GroupedProduct> = (0..8).map(|i| grouped_product(&gpu, &mut rng, (8192, if i % 2 == 0 { 320 } else { 128 }, if i % 2 == 0 { 128 } else { 320 }, 1.0, false))).collect();
    let first = check_group(&gpu, &deep, &format!("deep group seed={seed}"));
    let between: Vec<GroupedProduct> = odd.iter().map(|&s| grouped_product(&gpu, &mut rng, s)).collect();
    check_group(&gpu, &between, &format!("odd sizes again seed={seed}"));
    let again = check_group(&gpu, &deep, &format!("deep group again seed={seed}"));
    let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert!(bits(&first) == bits(&again), "deep group seed={seed}: not bit-identical across runs");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_gemm_group_kk_kn_match_twins() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // (m, k, n, bias, accumulate): an attention's LoRA down-projections u = s·x·Aᵀ (kk) and
    // v = s·dy·B (kn) at each level, r = 128 (q over the tokens, k and v over 77 context tokens
    // with in = 768), the time embedding's projections (one row, bias), odd sizes.
    let groups: Vec<Vec<(usize, usize, usize, bool, bool)>> = vec![
        vec![(4096, 320, 128, false, false), (4096, 320, 128, false, false), (4096, 320, 128, false, false)],
        vec![(1024, 640, 128, false, false), (77, 768, 128, false, false), (77, 768, 128, false, false)],
        vec![(256, 1280, 128, false, false), (512, 1280, 128, false, false), (154, 768, 128, false, false), (64, 1280, 128, false, false)],
        vec![(1, 1280, 320, true, false), (1, 1280, 640, true, false), (1, 1280, 1280, true, false), (2, 1280, 1280, true, true)],
        vec![(7, 1000, 24, true, true), (130, 72, 200, false, true), (3, 8, 8, true, false)],
    ];
    for layouts in [Layouts::Kk, Layouts::Kn] {
        for shapes in &groups {
            let what = format!("{layouts:?} group {shapes:?} seed={seed}");
            let mut wants = Vec::new();
            let mut keep = Vec::new();
            let mut gemms = Vec::new();
            for (i, &(m, k, n, with_bias, accumulate)) in shapes.iter().enumerate() {
                let alpha = if i % 2 == 0 { 1.0 } else { 0.5 };
                let a = rand_bf16(&mut rng, m * k, 1.0);
                let b = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
                let bias = rand_bf16(&mut rng, n, 1.0);
                let old = rand_bf16(&mut rng, m * n, 1.0);
                let prod = match layouts {
                    Layouts::Kk => linear_cpu(&a, m, k, &b, n, None),
                    _ => crate::ops::gemm::linear_input_grad_cpu(&a, m, k, &b, n),
                };
                let want: Vec<f32> = prod.iter().enumerate().map(|(j, v)| alpha * v + if with_bias { bias[j % n] } else { 0.0 } + if accumulate { old[j] } else { 0.0 }).collect();
                let (ad, bd) = (upload(&gpu, &[m, k], &a, DType::BF16), upload(&gpu, &[n, k], &b, DType::BF16));
                let biasd = upload(&gpu, &[n], &bias, DType::BF16);
                let c = if accumulate { upload(&gpu, &[m, n], &old, DType::BF16) } else { poisoned(&gpu, &[m, n], DType::BF16) };
                // kk: B(n, k) = B[n·k + k]; kn: B(n, k) = B[k·n + n] (b read as [k, n]).
                let ldb = if layouts == Layouts::Kk { k } else { n };
                let seg1 = crate::ops::gemm::Segment { a: ad.ptr().unwrap(), lda: k, b: bd.ptr().unwrap(), ldb, k };
                gemms.push(GroupGemm { m, n, seg1, seg2: Default::default(), alpha, bias: with_bias.then(|| biasd.ptr().unwrap()), c: c.ptr().unwrap(), residual: accumulate.then(|| (c.ptr().unwrap(), n)) });
                wants.push(want);
                keep.push((ad, bd, biasd, c));
            }
            assert!(supports_group(&gpu, layouts, DType::BF16, &gemms).unwrap(), "{what}: declined");
            gpu.start_profiling();
            gemm_group(&gpu, layouts, DType::BF16, &gemms).unwrap();
            let kernels: Vec<(&str, usize)> = gpu.stop_profiling().unwrap().iter().map(|t| (t.name, t.calls)).collect();
            assert_eq!(kernels.len(), 1, "{what}: one grouped launch, ran {kernels:?}");
            for (i, ((_, _, _, c), want)) in keep.iter().zip(&wants).enumerate() {
                assert_close(&format!("{what} gemm {i}"), &download(&gpu, c), want, 1e-2);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_gemm_group_two_segments_match_twins() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // (m, k1, k2, n): the fused LoRA forwards [x | u]·[W | B]ᵀ (kk) and input gradients
    // [dy | v]·[W ; A] (kn) of an attention's q, k, v at the 16×16 level and of its 77-token
    // context k and v, r = 128; then odd sizes (a short segment, rows not of the tile).
    let shapes = [(256, 1280, 128, 1280), (77, 768, 128, 320), (77, 768, 128, 320), (5, 72, 8, 24), (130, 64, 13 * 8, 200)];
    for layouts in [Layouts::Kk, Layouts::Kn] {
        let what = format!("{layouts:?} two segments seed={seed}");
        let mut keep = Vec::new();
        let mut gemms = Vec::new();
        for (i, &(m, k1, k2, n)) in shapes.iter().enumerate() {
            let (a1, a2) = (rand_bf16(&mut rng, m * k1, 1.0), rand_bf16(&mut rng, m * k2, 1.0));
            let (b1, b2) = (rand_bf16(&mut rng, n * k1, 0.05), rand_bf16(&mut rng, n * k2, 0.1));
            let bias = rand_bf16(&mut rng, n, 1.0);
            let with_bias = i % 2 == 0;
            let prod = |a: &[f32], k: usize, b: &[f32]| match layouts {
                Layouts::Kk => linear_cpu(a, m, k, b, n, None),
                _ => crate::ops::gemm::linear_input_grad_cpu(a, m, k, b, n),
            };
            let want: Vec<f32> = prod(&a1, k1, &b1).iter().zip(prod(&a2, k2, &b2)).enumerate().map(|(j, (x, y))| x + y + if with_bias { bias[j % n] } else { 0.0 }).collect();
            let ldb = |k: usize| if layouts == Layouts::Kk { k } else { n };
            let t = [upload(&gpu, &[m, k1], &a1, DType::BF16), upload(&gpu, &[n, k1], &b1, DType::BF16), upload(&gpu, &[m, k2], &a2, DType::BF16), upload(&gpu, &[n, k2], &b2, DType::BF16), upload(&gpu, &[n], &bias, DType::BF16)];
            let c = poisoned(&gpu, &[m, n], DType::BF16);
            let seg = |a: &crate::tensor::Tensor, b: &crate::tensor::Tensor, k: usize| crate::ops::gemm::Segment { a: a.ptr().unwrap(), lda: k, b: b.ptr().unwrap(), ldb: ldb(k), k };
            gemms.push(GroupGemm { m, n, seg1: seg(&t[0], &t[1], k1), seg2: seg(&t[2], &t[3], k2), alpha: 1.0, bias: with_bias.then(|| t[4].ptr().unwrap()), c: c.ptr().unwrap(), residual: None });
            keep.push((t, c, want));
        }
        assert!(supports_group(&gpu, layouts, DType::BF16, &gemms).unwrap(), "{what}: declined");
        gemm_group(&gpu, layouts, DType::BF16, &gemms).unwrap();
        for (i, (_, c, want)) in keep.iter().enumerate() {
            assert_close(&format!("{what} gemm {i} {:?}", shapes[i]), &download(&gpu, c), want, 1e-2);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_gemm_group_adds_a_row_residual_to_every_row() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if !hopper(&gpu) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    // The time embedding's projections with conv1's bias folded in: C = x·Wᵀ + bias + row (ldr 0),
    // one sample (as the UNet runs it) and three (every row gets the same row).
    for (m, k, n) in [(1, 1280, 320), (3, 1280, 640), (3, 64, 24)] {
        let (x, w) = (rand_bf16(&mut rng, m * k, 1.0), rand_bf16(&mut rng, n * k, 0.05));
        let (bias, row) = (rand_bf16(&mut rng, n, 1.0), rand_bf16(&mut rng, n, 1.0));
        let want: Vec<f32> = linear_cpu(&x, m, k, &w, n, Some(&bias)).iter().enumerate().map(|(j, v)| v + row[j % n]).collect();
        let (xd, wd) = (upload(&gpu, &[m, k], &x, DType::BF16), upload(&gpu, &[n, k], &w, DType::BF16));
        let (biasd, rowd) = (upload(&gpu, &[n], &bias, DType::BF16), upload(&gpu, &[n], &row, DType::BF16));
        let c = poisoned(&gpu, &[m, n], DType::BF16);
        let seg1 = crate::ops::gemm::Segment { a: xd.ptr().unwrap(), lda: k, b: wd.ptr().unwrap(), ldb: k, k };
        let g = GroupGemm { m, n, seg1, seg2: Default::default(), alpha: 1.0, bias: Some(biasd.ptr().unwrap()), c: c.ptr().unwrap(), residual: Some((rowd.ptr().unwrap(), 0)) };
        gemm_group(&gpu, Layouts::Kk, DType::BF16, &[g]).unwrap();
        assert_close(&format!("row residual {m}x{k}->{n} seed={seed}"), &download(&gpu, &c), &want, 1e-2);
    }
}
