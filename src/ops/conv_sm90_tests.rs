//! Tests of src/ops/conv_sm90.rs: the sampled twins against ops::conv's CPU twins, the shape
//! rules, and (GPU) every tile of the wgmma kernels at every SD1.5 3×3 stride-1 shape they take and
//! at odd sizes, plus the dispatch from `ops::conv` on a Hopper GPU.

use super::*;
use crate::ops::conv::{conv2d_backward_input_cpu, conv2d_cpu};
use crate::rng::Rng;
use crate::tensor::{assert_close, round_bf16, DType};
use crate::testing::{poisoned, upload};

fn shape3(batch: usize, h: usize, w: usize, cin: usize, cout: usize) -> Conv2dShape {
    Conv2dShape { batch, height: h, width: w, in_ch: cin, out_ch: cout, kernel: 3, stride: 1, pad: 1 }
}

/// Pixel p's taps: (tap index r·3 + c, neighbour pixel index) for the 3×3 pad-1 window in the
/// image, the neighbour at (h + r − 1, w + c − 1) (`sign` = 1) or (h + 1 − r, w + 1 − c) (−1).
fn taps(s: &Conv2dShape, p: usize, sign: isize) -> Vec<(usize, usize)> {
    let (hw, w) = (s.height * s.width, s.width);
    let (n, h, x) = (p / hw, (p % hw / w) as isize, (p % w) as isize);
    let mut out = Vec::new();
    for t in 0..9 {
        let (hh, xx) = (h + sign * (t as isize / 3 - 1), x + sign * (t as isize % 3 - 1));
        if hh >= 0 && xx >= 0 && hh < s.height as isize && xx < s.width as isize {
            out.push((t, n * hw + hh as usize * w + xx as usize));
        }
    }
    out
}

/// Forward twin at output pixel p (all out channels), input [x1 | x2] read from the two tensors.
fn fwd_pixel(x1: &[f32], x2: &[f32], c1: usize, s: &Conv2dShape, w: &[f32], b: &[f32], p: usize) -> Vec<f32> {
    let c2 = s.in_ch - c1;
    (0..s.out_ch)
        .map(|co| {
            let mut acc = b[co] as f64;
            for (t, q) in taps(s, p, 1) {
                let wr = &w[(co * 9 + t) * s.in_ch..][..s.in_ch];
                let xs = x1[q * c1..][..c1].iter().chain(&x2[q * c2..][..c2]);
                acc += xs.zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            }
            acc as f32
        })
        .collect()
}

/// Input-gradient twin at input pixel p (all in channels).
fn bwd_pixel(dy: &[f32], s: &Conv2dShape, w: &[f32], p: usize) -> Vec<f32> {
    let mut acc = vec![0f64; s.in_ch];
    for (t, q) in taps(s, p, -1) {
        for (co, &g) in dy[q * s.out_ch..][..s.out_ch].iter().enumerate() {
            let wr = &w[(co * 9 + t) * s.in_ch..][..s.in_ch];
            acc.iter_mut().zip(wr).for_each(|(a, &v)| *a += g as f64 * v as f64);
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

#[test]
fn sampled_twins_match_the_conv_twins() {
    let mut rng = Rng::new(5);
    let (c1, c2) = (3, 2);
    let s = shape3(2, 5, 4, c1 + c2, 4);
    let pixels = s.batch * s.height * s.width;
    let (x1, x2) = (rng.normal_vec(pixels * c1, 1.0), rng.normal_vec(pixels * c2, 1.0));
    let x: Vec<f32> = (0..pixels).flat_map(|p| x1[p * c1..][..c1].iter().chain(&x2[p * c2..][..c2]).copied().collect::<Vec<_>>()).collect();
    let w = rng.normal_vec(s.out_ch * 9 * s.in_ch, 1.0);
    let b = rng.normal_vec(s.out_ch, 1.0);
    let fwd: Vec<f32> = (0..pixels).flat_map(|p| fwd_pixel(&x1, &x2, c1, &s, &w, &b, p)).collect();
    assert_close("fwd_pixel vs conv2d_cpu", &fwd, &conv2d_cpu(&x, &s, &w, Some(&b)), 1e-5);
    let dy = rng.normal_vec(pixels * s.out_ch, 1.0);
    let bwd: Vec<f32> = (0..pixels).flat_map(|p| bwd_pixel(&dy, &s, &w, p)).collect();
    assert_close("bwd_pixel vs conv2d_backward_input_cpu", &bwd, &conv2d_backward_input_cpu(&dy, &s, &w), 1e-5);
}

#[test]
fn shape_rules_and_tile_choice() {
    let s = shape3(1, 64, 64, 960, 320);
    assert!(supports(&s, 640, 320, false, false) && supports(&s, 640, 320, false, true));
    assert!(!supports(&s, 640, 320, true, false), "fused upsample with a skip concat");
    assert!(supports(&shape3(1, 64, 64, 640, 640), 640, 0, true, false) && supports(&shape3(1, 64, 64, 640, 640), 640, 0, true, true), "fused upsample");
    assert!(!supports(&shape3(1, 63, 64, 640, 640), 640, 0, true, true), "upsampled size odd");
    assert!(!supports(&Conv2dShape { stride: 2, ..s }, 640, 320, false, false), "stride 2");
    assert!(!supports(&Conv2dShape { kernel: 1, pad: 0, ..s }, 640, 320, false, false), "1×1");
    assert!(!supports(&shape3(1, 64, 64, 4, 320), 4, 0, false, false), "conv_in");
    assert!(!supports(&shape3(1, 64, 64, 320, 4), 320, 0, false, false), "conv_out");
    assert!(!supports(&shape3(1, 8, 8, 160, 128), 96, 64, false, false), "forward needs c1 % 64");
    assert!(supports(&shape3(1, 8, 8, 160, 128), 96, 64, false, true), "the input gradient does not");
    // The plans the sweeps found best or within a few % of it (benches/RESULTS.md): (tile rows,
    // stages, splits).
    let plan = |s: Conv2dShape, bwd: bool| {
        let p = plan_for(&s, bwd, false);
        (p.tile.bm, p.tile.stages, p.splits)
    };
    assert_eq!(plan(shape3(1, 64, 64, 320, 320), false), (64, 6, 1), "64 × 2 CTAs, one wave");
    assert_eq!(plan(shape3(1, 64, 64, 320, 320), true), (64, 6, 1));
    assert_eq!(plan(shape3(2, 64, 64, 320, 320), false).0, 128, "batch 2: 128 CTAs of 128 rows");
    assert_eq!(plan(shape3(1, 64, 64, 640, 320), true), (128, 5, 1), "N = 640: 128 CTAs of 128 rows");
    assert_eq!(plan(shape3(1, 64, 64, 960, 320), true), (192, 5, 1), "N = 960: 132 CTAs of 192 rows, one wave");
    assert_eq!(plan(shape3(1, 16, 16, 1920, 1280), true), (128, 5, 5), "M = 256: 24 CTAs split in 5");
    assert_eq!(plan(shape3(1, 8, 8, 1280, 1280), false), (64, 6, 15), "M = 64: 8 CTAs split in 15 (180 k-tiles, 12 each)");
    assert_eq!(gemm_dims(&shape3(2, 64, 64, 640, 320), true, true), (2 * 32 * 32, 640, 4 * 9 * 320 / 64), "upsample input gradient: x's pixels, 36 taps");
    assert_eq!(plan(shape3(1, 32, 32, 640, 640), true), (128, 5, 4), "M = 1024: 32 CTAs split in 4");
    assert_eq!(plan(shape3(1, 64, 64, 640, 320), false), (192, 5, 3), "K = 5760: 44 CTAs split in 3");
}

// ---------------------------------------------------------------- GPU tests

/// x [batch, h, w, c1] (+ skip [.., c2]) → [batch, h, w, cout]; `res`: with a residual; `up`: x is
/// [batch, h/2, w/2, c1], read through the fused nearest-2× upsample.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    h: usize,
    w: usize,
    c1: usize,
    c2: usize,
    cout: usize,
    res: bool,
    up: bool,
}
const fn sq(batch: usize, hw: usize, c1: usize, c2: usize, cout: usize, res: bool) -> Case {
    Case { batch, h: hw, w: hw, c1, c2, cout, res, up: false }
}
const fn sq_up(batch: usize, hw: usize, c: usize, res: bool) -> Case {
    Case { batch, h: hw, w: hw, c1: c, c2: 0, cout: c, res, up: true }
}

/// Every 3×3 stride-1 conv of the SD1.5 UNet the kernels take (512 px, batch 1 and 2).
const SD15: &[Case] = &[
    sq(1, 64, 320, 0, 320, true),
    sq(2, 64, 320, 0, 320, false),
    sq(1, 64, 640, 320, 320, false),
    sq(2, 64, 320, 320, 320, true),
    sq(1, 32, 320, 0, 640, false),
    sq(2, 32, 640, 0, 640, true),
    sq(1, 32, 1280, 640, 640, false),
    sq(2, 32, 640, 640, 640, false),
    sq(1, 32, 640, 320, 640, true),
    sq(1, 16, 640, 0, 1280, false),
    sq(2, 16, 1280, 0, 1280, true),
    sq(1, 16, 1280, 1280, 1280, false),
    sq(2, 16, 1280, 640, 1280, false),
    sq(2, 8, 1280, 0, 1280, true),
    sq(1, 8, 1280, 1280, 1280, false),
    sq_up(1, 64, 640, false),
    sq_up(2, 32, 1280, true),
    sq_up(2, 16, 1280, false),
];
/// The 4096-token upsampler conv (every tile runs it).
const UP64: usize = 15;
/// Pixel counts that are not multiples of the tile (105, 1517, 198; upsampled 2·5·7 → 2·10·14), a
/// skip split at 96.
const ODD: &[Case] = &[
    Case { batch: 3, h: 7, w: 5, c1: 64, c2: 256, cout: 320, res: true, up: false },
    Case { batch: 1, h: 37, w: 41, c1: 192, c2: 128, cout: 320, res: false, up: false },
    Case { batch: 2, h: 9, w: 11, c1: 96, c2: 64, cout: 128, res: false, up: false }, // input gradient only
    Case { batch: 2, h: 10, w: 14, c1: 320, c2: 0, cout: 320, res: true, up: true },
];

impl Case {
    fn conv(&self) -> Conv2dShape {
        shape3(self.batch, self.h, self.w, self.c1 + self.c2, self.cout)
    }
    /// x's image size: [batch, h, w] or, through the upsample, [batch, h/2, w/2].
    fn x_img(&self) -> [usize; 3] {
        let d = if self.up { 2 } else { 1 };
        [self.batch, self.h / d, self.w / d]
    }
}

/// The nearest-2× upsample of x [batch, h, w, c] (CPU).
fn upsample(x: &[f32], [b, h, w]: [usize; 3], c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() * 4);
    for n in 0..b {
        for i in 0..2 * h {
            for j in 0..2 * w {
                out.extend_from_slice(&x[((n * h + i / 2) * w + j / 2) * c..][..c]);
            }
        }
    }
    out
}

/// Corners, edges and random pixels (every pixel when the twin is cheap).
fn sample_pixels(rng: &mut Rng, s: &Conv2dShape) -> Vec<usize> {
    let (total, w) = (s.batch * s.height * s.width, s.width);
    if total * s.in_ch * s.out_ch * 9 <= 20_000_000 {
        return (0..total).collect();
    }
    let mut px = vec![0, w - 1, total - w, total - 1, total / 2 + w / 2];
    px.extend((0..11).map(|_| (rng.next_u64() % total as u64) as usize));
    px
}

fn rows(v: &[f32], pixels: &[usize], c: usize) -> Vec<f32> {
    pixels.iter().flat_map(|&p| v[p * c..][..c].iter().copied()).collect()
}

fn all_finite(what: &str, v: &[f32]) {
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    assert!(bad == 0, "{what}: {bad} of {} outputs not finite (unwritten or NaN)", v.len());
}

/// Forward of `c` with tile `t` (None: through ops::conv's dispatch) against the twin.
fn check_forward(gpu: &Gpu, c: &Case, t: Option<&Plan>) {
    let s = c.conv();
    if t.is_some() && !supports(&s, c.c1, c.c2, c.up, false) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let px = s.batch * s.height * s.width;
    let xi = c.x_img();
    let x1_small = round_bf16(&rng.normal_vec(xi.iter().product::<usize>() * c.c1, 1.0));
    let x1 = if c.up { upsample(&x1_small, xi, c.c1) } else { x1_small.clone() };
    let x2 = round_bf16(&rng.normal_vec(px * c.c2, 1.0));
    let w = round_bf16(&rng.normal_vec(s.out_ch * 9 * s.in_ch, 1.0 / (9.0 * s.in_ch as f32).sqrt()));
    let b = round_bf16(&rng.normal_vec(s.out_ch, 1.0));
    let r = round_bf16(&rng.normal_vec(px * s.out_ch, 1.0));
    let img = [c.batch, c.h, c.w];
    let x1g = upload(gpu, &[xi[0], xi[1], xi[2], c.c1], &x1_small, DType::BF16);
    let x2g = (c.c2 > 0).then(|| upload(gpu, &[img[0], img[1], img[2], c.c2], &x2, DType::BF16));
    let wg = upload(gpu, &[s.out_ch, 3, 3, s.in_ch], &w, DType::BF16);
    let (bg, rg) = (upload(gpu, &[s.out_ch], &b, DType::BF16), upload(gpu, &[img[0], img[1], img[2], s.out_ch], &r, DType::BF16));
    let mut y = poisoned(gpu, &[img[0], img[1], img[2], s.out_ch], DType::BF16);
    let src = ConvSource { x: &x1g, skip: x2g.as_ref(), upsample2x: c.up };
    let res = c.res.then_some(&rg);
    match t {
        Some(t) => conv2d(gpu, t, src, &s, &wg, Some(&bg), res, &mut y).unwrap(),
        None => crate::ops::conv::conv2d(gpu, src, &s, &wg, Some(&bg), res, &mut y).unwrap(),
    }
    let got = y.to_cpu(gpu).unwrap().into_vec().unwrap();
    let what = format!("sm90 conv2d {c:?} tile {t:?} seed={seed}");
    all_finite(&what, &got);
    let pixels = sample_pixels(&mut rng, &s);
    let want: Vec<f32> = pixels
        .iter()
        .flat_map(|&p| {
            let mut v = fwd_pixel(&x1, &x2, c.c1, &s, &w, &b, p);
            if c.res {
                v.iter_mut().zip(&r[p * s.out_ch..]).for_each(|(a, b)| *a += b);
            }
            v
        })
        .collect();
    assert_close(&format!("{what} ({} pixels)", pixels.len()), &rows(&got, &pixels, s.out_ch), &want, 1e-2);
}

/// Input gradient of `c` with tile `t` (None: through ops::conv's dispatch) against the twin.
fn check_backward(gpu: &Gpu, c: &Case, t: Option<&Plan>) {
    let s = c.conv();
    if t.is_some() && !supports(&s, c.c1, c.c2, c.up, true) {
        return;
    }
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let px = s.batch * s.height * s.width;
    let dy = round_bf16(&rng.normal_vec(px * s.out_ch, 1.0));
    let w = round_bf16(&rng.normal_vec(s.out_ch * 9 * s.in_ch, 1.0 / (9.0 * s.in_ch as f32).sqrt()));
    let img = [c.batch, c.h, c.w];
    let (dyg, wg) = (upload(gpu, &[img[0], img[1], img[2], s.out_ch], &dy, DType::BF16), upload(gpu, &[s.out_ch, 3, 3, s.in_ch], &w, DType::BF16));
    let xi = c.x_img();
    let mut dx1 = poisoned(gpu, &[xi[0], xi[1], xi[2], c.c1], DType::BF16);
    let mut dx2 = poisoned(gpu, &[img[0], img[1], img[2], c.c2.max(1)], DType::BF16);
    let dskip = (c.c2 > 0).then_some(&mut dx2);
    match t {
        Some(t) => conv2d_backward_input(gpu, t, &dyg, &s, &wg, c.up, &mut dx1, dskip).unwrap(),
        None => crate::ops::conv::conv2d_backward_input(gpu, &dyg, &s, &wg, c.up, &mut dx1, dskip).unwrap(),
    }
    let got1 = dx1.to_cpu(gpu).unwrap().into_vec().unwrap();
    let got2 = dx2.to_cpu(gpu).unwrap().into_vec().unwrap();
    let what = format!("sm90 conv2d_backward_input {c:?} tile {t:?} seed={seed}");
    all_finite(&format!("{what} dx"), &got1);
    // Sampled pixels of x; through the upsample, x's gradient at (n, i, j) sums dX's 2×2 sub-pixels.
    let pixels = sample_pixels(&mut rng, &Conv2dShape { batch: xi[0], height: xi[1], width: xi[2], ..s });
    let want: Vec<Vec<f32>> = pixels
        .iter()
        .map(|&p| {
            if !c.up {
                return bwd_pixel(&dy, &s, &w, p);
            }
            let (n, i, j) = (p / (xi[1] * xi[2]), p / xi[2] % xi[1], p % xi[2]);
            let mut v = vec![0f32; s.in_ch];
            for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let q = (n * s.height + 2 * i + a) * s.width + 2 * j + b;
                v.iter_mut().zip(bwd_pixel(&dy, &s, &w, q)).for_each(|(x, g)| *x += g);
            }
            v
        })
        .collect();
    let want1: Vec<f32> = want.iter().flat_map(|v| v[..c.c1].iter().copied()).collect();
    assert_close(&format!("{what} dx ({} pixels)", pixels.len()), &rows(&got1, &pixels, c.c1), &want1, 1e-2);
    if c.c2 > 0 {
        all_finite(&format!("{what} dskip"), &got2);
        let want2: Vec<f32> = want.iter().flat_map(|v| v[c.c1..].iter().copied()).collect();
        assert_close(&format!("{what} dskip"), &rows(&got2, &pixels, c.c2), &want2, 1e-2);
    }
}

fn hopper() -> Option<Gpu> {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    if gpu.is_hopper().unwrap() {
        Some(gpu)
    } else {
        eprintln!("not a Hopper GPU (or SDLORA_SM90=0): the sm_90a kernels cannot run here");
        None
    }
}

/// Every tile, unsplit and split in 3, at the 4096-token shapes and the odd sizes, both directions.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_sm90_every_tile() {
    let Some(gpu) = hopper() else { return };
    for (_, t, _, _) in &TILES {
        for c in SD15[..4].iter().chain([&SD15[UP64]]).chain(ODD) {
            for splits in [1, 3] {
                check_forward(&gpu, c, Some(&Plan { tile: *t, splits }));
                check_backward(&gpu, c, Some(&Plan { tile: *t, splits }));
            }
        }
    }
}

/// Every SD1.5 shape with the plan (tile, split-K) the launcher picks for its size.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_sm90_sd15_shapes() {
    let Some(gpu) = hopper() else { return };
    for c in SD15 {
        let s = c.conv();
        check_forward(&gpu, c, Some(&plan_for(&s, false, c.up)));
        check_backward(&gpu, c, Some(&plan_for(&s, true, c.up)));
    }
}

/// On a Hopper GPU `ops::conv` hands the 4096-token convs to the sm90 kernels (and gets them
/// right through that path); elsewhere it never does.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_sm90_dispatch() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    let on = gpu.is_hopper().unwrap() && std::env::var("SDLORA_CONV_SM90_TILE").map_or(true, |v| v != "off");
    for c in SD15[..4].iter().chain([&SD15[UP64]]) {
        let s = c.conv();
        for bwd in [false, true] {
            let chosen = choose(&gpu, &s, c.c1, c.c2, c.up, bwd).unwrap();
            assert_eq!(chosen.is_some(), on, "{c:?} backward={bwd}: sm90 chosen {chosen:?} on a GPU with is_hopper={on}");
        }
        check_forward(&gpu, c, None);
        check_backward(&gpu, c, None);
    }
}
