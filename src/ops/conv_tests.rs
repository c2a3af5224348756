//! Tests of src/ops/conv.rs: the twins against closed forms and finite differences (CPU), the GPU
//! kernels against the twins at every SD1.5 conv shape and at odd sizes.

use super::*;
use crate::cuda::ArenaKind::Persistent;
use crate::ops::finite_difference;
use crate::ops::layout::{concat_channels_cpu, upsample_nearest2x_backward_cpu, upsample_nearest2x_cpu};
use crate::rng::Rng;
use crate::tensor::{assert_close, round_bf16};

/// Output pixel `pixel` (index into batch·Ho·Wo) of the convolution, all out channels: the
/// sampled form of conv2d_cpu for big shapes (checked equal to it below).
fn conv2d_pixel(x: &[f32], s: &Conv2dShape, w: &[f32], bias: Option<&[f32]>, pixel: usize) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (n, oh, ow) = (pixel / (ho * wo), pixel / wo % ho, pixel % wo);
    let k = s.kernel;
    (0..s.out_ch)
        .map(|co| {
            let mut acc = bias.map_or(0.0, |b| b[co] as f64);
            for r in 0..k {
                for c in 0..k {
                    let (ih, iw) = ((oh * s.stride + r) as isize - s.pad as isize, (ow * s.stride + c) as isize - s.pad as isize);
                    if ih < 0 || iw < 0 || ih >= s.height as isize || iw >= s.width as isize {
                        continue;
                    }
                    let xp = &x[((n * s.height + ih as usize) * s.width + iw as usize) * s.in_ch..][..s.in_ch];
                    let wp = &w[((co * k + r) * k + c) * s.in_ch..][..s.in_ch];
                    acc += xp.iter().zip(wp).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>();
                }
            }
            acc as f32
        })
        .collect()
}

#[test]
fn conv2d_cpu_matches_hand_computed_example() {
    // 1×3×3×1 input 1..9, one 3×3 filter of ones, pad 1: each output is the sum of its neighbourhood.
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let s = Conv2dShape { batch: 1, height: 3, width: 3, in_ch: 1, out_ch: 1, kernel: 3, stride: 1, pad: 1 };
    let y = conv2d_cpu(&x, &s, &[1.0; 9], Some(&[0.5]));
    assert_eq!(y, vec![12.5, 21.5, 16.5, 27.5, 45.5, 33.5, 24.5, 39.5, 28.5]);
    let s2 = Conv2dShape { stride: 2, ..s };
    assert_eq!(s2.out_hw(), (2, 2));
    assert_eq!(conv2d_cpu(&x, &s2, &[1.0; 9], None), vec![12.0, 16.0, 24.0, 28.0]);
}

#[test]
fn weight_reorder_moves_input_channel_last() {
    // o=1, i=2, 1×2 kernel: OIHW [[[[a, b]], [[c, d]]]] -> OHWI [a, c, b, d]
    assert_eq!(conv_weight_oihw_to_ohwi(&[1.0, 2.0, 3.0, 4.0], 1, 2, 1, 2), vec![1.0, 3.0, 2.0, 4.0]);
}

fn shape(batch: usize, h: usize, w: usize, cin: usize, cout: usize, k: usize, stride: usize) -> Conv2dShape {
    Conv2dShape { batch, height: h, width: w, in_ch: cin, out_ch: cout, kernel: k, stride, pad: k / 2 }
}

#[test]
fn twin_closed_forms() {
    // 1x1 conv = per-pixel matmul; a 3x3 kernel with only its centre tap = the same.
    let mut rng = Rng::new(1);
    let s1 = shape(2, 3, 4, 5, 6, 1, 1);
    let x = rng.normal_vec(2 * 3 * 4 * 5, 1.0);
    let w1 = rng.normal_vec(6 * 5, 1.0);
    let b = rng.normal_vec(6, 1.0);
    let y1 = conv2d_cpu(&x, &s1, &w1, Some(&b));
    let mm: Vec<f32> = x.chunks(5).flat_map(|p| (0..6).map(|o| b[o] + (0..5).map(|i| p[i] * w1[o * 5 + i]).sum::<f32>()).collect::<Vec<_>>()).collect();
    assert_close("1x1 conv vs matmul", &y1, &mm, 1e-6);
    let mut w3 = vec![0.0; 6 * 9 * 5];
    for o in 0..6 {
        w3[(o * 9 + 4) * 5..][..5].copy_from_slice(&w1[o * 5..][..5]);
    }
    let s3 = shape(2, 3, 4, 5, 6, 3, 1);
    assert_close("centre-tap 3x3 vs 1x1", &conv2d_cpu(&x, &s3, &w3, Some(&b)), &y1, 1e-6);
    // The sampled twin used by the GPU tests is conv2d_cpu pixel by pixel (3x3 stride 2 included).
    let w3 = rng.normal_vec(6 * 9 * 5, 1.0);
    for s in [s3, Conv2dShape { stride: 2, ..s3 }] {
        let (ho, wo) = s.out_hw();
        let by_pixel: Vec<f32> = (0..2 * ho * wo).flat_map(|p| conv2d_pixel(&x, &s, &w3, Some(&b), p)).collect();
        assert_close("conv2d_pixel vs conv2d_cpu", &by_pixel, &conv2d_cpu(&x, &s, &w3, Some(&b)), 1e-5);
    }
    // OIHW -> OHWI moves element (o, i, r, c) to (o, r, c, i).
    let oihw: Vec<f32> = (0..2 * 3 * 9).map(|v| v as f32).collect();
    let ohwi = conv_weight_oihw_to_ohwi(&oihw, 2, 3, 3, 3);
    assert_eq!(ohwi[((1 * 3 + 2) * 3 + 0) * 3 + 1], oihw[((1 * 3 + 1) * 3 + 2) * 3 + 0]);
    // Upsample then its backward sums 4 copies.
    let u = upsample_nearest2x_cpu(&x, 2, 3, 4, 5);
    assert_eq!(u[((1 * 6 + 5) * 8 + 7) * 5 + 2], x[((1 * 3 + 2) * 4 + 3) * 5 + 2]);
    assert_close("upsample backward", &upsample_nearest2x_backward_cpu(&u, 2, 3, 4, 5), &x.iter().map(|v| 4.0 * v).collect::<Vec<_>>(), 1e-6);
}

/// ∂(Σ g·conv(x))/∂x by the twin vs central finite differences, at tiny shapes of every case.
#[test]
fn backward_input_matches_finite_differences() {
    for (s, up) in [
        (shape(2, 5, 4, 3, 4, 3, 1), false),
        (shape(2, 5, 4, 3, 4, 3, 2), false),
        (shape(1, 6, 7, 2, 3, 3, 2), false),
        (shape(2, 3, 5, 4, 3, 1, 1), false),
        (shape(1, 6, 4, 3, 2, 3, 1), true),
    ] {
        let mut rng = Rng::new(11);
        let (h, w) = if up { (s.height / 2, s.width / 2) } else { (s.height, s.width) };
        let x = rng.normal_vec(s.batch * h * w * s.in_ch, 1.0);
        let wt = rng.normal_vec(s.out_ch * s.kernel * s.kernel * s.in_ch, 1.0);
        let (ho, wo) = s.out_hw();
        let g = rng.normal_vec(s.batch * ho * wo * s.out_ch, 1.0);
        let fwd = |xs: &[f32]| {
            let xin = if up { upsample_nearest2x_cpu(xs, s.batch, h, w, s.in_ch) } else { xs.to_vec() };
            conv2d_cpu(&xin, &s, &wt, None).iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        };
        let numeric: Vec<f32> = finite_difference(&x, 1e-2, fwd).iter().map(|&v| v as f32).collect();
        let mut analytic = conv2d_backward_input_cpu(&g, &s, &wt);
        if up {
            analytic = upsample_nearest2x_backward_cpu(&analytic, s.batch, h, w, s.in_ch);
        }
        assert_close(&format!("conv backward {s:?} up={up}"), &analytic, &numeric, 1e-3);
    }
}

// ---------------------------------------------------------------- GPU tests

/// One GPU case: input x [batch, h, w, c1] (+ skip [.., c2]), optionally upsampled, conv k×k.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    h: usize,
    w: usize,
    c1: usize,
    c2: usize,
    cout: usize,
    k: usize,
    stride: usize,
    up: bool,
    residual: bool,
}

const fn case(batch: usize, hw: usize, c1: usize, c2: usize, cout: usize, k: usize, stride: usize) -> Case {
    Case { batch, h: hw, w: hw, c1, c2, cout, k, stride, up: false, residual: false }
}
const fn up(batch: usize, hw: usize, c: usize) -> Case {
    Case { batch, h: hw, w: hw, c1: c, c2: 0, cout: c, k: 3, stride: 1, up: true, residual: false }
}
const fn res(c: Case) -> Case {
    Case { residual: true, ..c }
}

impl Case {
    fn conv(&self) -> Conv2dShape {
        let f = if self.up { 2 } else { 1 };
        shape(self.batch, self.h * f, self.w * f, self.c1 + self.c2, self.cout, self.k, self.stride)
    }
}

/// The SD1.5 UNet's convolutions at 512 px (latents 64×64), batch 1 and 2.
const SD15_DOWN_MID: &[Case] = &[
    case(2, 64, 4, 0, 320, 3, 1),       // conv_in
    res(case(1, 64, 320, 0, 320, 3, 1)), // down 0 resnets (+ residual)
    case(2, 64, 320, 0, 320, 3, 2),     // downsampler 0
    case(1, 32, 320, 0, 640, 3, 1),
    case(1, 32, 320, 0, 640, 1, 1),     // conv_shortcut
    res(case(2, 32, 640, 0, 640, 3, 1)),
    case(1, 32, 640, 0, 640, 3, 2),     // downsampler 1
    case(2, 16, 640, 0, 1280, 3, 1),
    case(1, 16, 640, 0, 1280, 1, 1),
    case(1, 16, 1280, 0, 1280, 3, 1),
    case(2, 16, 1280, 0, 1280, 3, 2),   // downsampler 2
    res(case(2, 8, 1280, 0, 1280, 3, 1)), // down 3, mid
];
const SD15_UP: &[Case] = &[
    case(2, 8, 1280, 1280, 1280, 3, 1), // up 0 resnets: concat(h, skip)
    case(1, 8, 1280, 1280, 1280, 1, 1),
    up(2, 8, 1280),                     // up 0 upsampler 8² -> 16²
    case(1, 16, 1280, 1280, 1280, 3, 1),
    res(case(2, 16, 1280, 640, 1280, 3, 1)),
    case(1, 16, 1280, 640, 1280, 1, 1),
    up(1, 16, 1280),                    // 16² -> 32²
    case(2, 32, 1280, 640, 640, 3, 1),
    case(1, 32, 640, 640, 640, 3, 1),
    case(1, 32, 640, 320, 640, 3, 1),
    case(2, 32, 1280, 640, 640, 1, 1),
    case(1, 32, 640, 640, 640, 1, 1),
    case(1, 32, 640, 320, 640, 1, 1),
    up(1, 32, 640),                     // 32² -> 64²
    case(1, 64, 640, 320, 320, 3, 1),
    res(case(2, 64, 320, 320, 320, 3, 1)),
    case(1, 64, 640, 320, 320, 1, 1),
    case(2, 64, 320, 320, 320, 1, 1),
    case(2, 64, 320, 0, 4, 3, 1),       // conv_out
];
/// Odd sizes: 7×5 images, batch 3, partial tiles, split-K on tiny images, channel counts that take
/// the scalar path (not a multiple of 64 where K is reduced).
const fn odd(batch: usize, h: usize, w: usize, c1: usize, c2: usize, cout: usize, k: usize, stride: usize, up: bool, residual: bool) -> Case {
    Case { batch, h, w, c1, c2, cout, k, stride, up, residual }
}
const ODD: &[Case] = &[
    odd(3, 7, 5, 64, 0, 40, 3, 1, false, true),     // vec forward, scalar input gradient
    odd(3, 7, 5, 64, 0, 128, 3, 2, false, false),   // vec both ways, stride 2
    odd(3, 7, 5, 40, 24, 64, 1, 1, false, false),   // concat 40 + 24, 1×1
    odd(3, 7, 5, 48, 16, 64, 3, 1, false, true),    // concat 48 + 16, 3×3 (scalar forward)
    odd(3, 7, 5, 64, 64, 64, 3, 1, false, true),    // concat 64 + 64, 3×3 (vector forward)
    odd(3, 7, 5, 64, 0, 64, 3, 1, true, false),     // fused upsample
    odd(1, 3, 5, 256, 0, 128, 3, 1, false, false),  // 15 pixels: deep split-K
    odd(1, 3, 5, 128, 0, 256, 3, 2, false, false),  // stride 2 on 3×5 (a parity class of 1 row)
    odd(3, 7, 5, 6, 4, 10, 3, 1, false, false),     // scalar
    odd(3, 7, 5, 24, 0, 6, 3, 2, false, false),     // scalar, stride 2
    odd(3, 7, 5, 12, 0, 4, 3, 1, true, false),      // scalar, upsample
    odd(3, 37, 41, 64, 0, 576, 3, 1, false, true),  // 128×128 tiles, partial in M and N
    odd(3, 37, 41, 32, 32, 192, 3, 2, false, false),
];

/// Pixels to check: every one when the twin is cheap, else corners, edges and random ones.
fn sample_pixels(rng: &mut Rng, batch: usize, h: usize, w: usize, cost_per_pixel: usize) -> Vec<usize> {
    let total = batch * h * w;
    if total * cost_per_pixel <= 30_000_000 {
        return (0..total).collect();
    }
    let mut px = vec![0, w - 1, (h - 1) * w, total - 1, total - w, (batch - 1) * h * w + w / 2];
    px.extend((0..18).map(|_| (rng.next_u64() % total as u64) as usize));
    px
}

fn upload(gpu: &Gpu, shape: &[usize], v: &[f32]) -> Tensor {
    crate::testing::upload(gpu, shape, v, DType::BF16)
}

fn gather(v: &[f32], pixels: &[usize], c: usize) -> Vec<f32> {
    pixels.iter().flat_map(|&p| v[p * c..][..c].iter().copied()).collect()
}

fn run_forward(gpu: &Gpu, c: &Case) {
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let s = c.conv();
    let (ho, wo) = s.out_hw();
    let kk = s.kernel * s.kernel * s.in_ch;
    let x1 = round_bf16(&rng.normal_vec(c.batch * c.h * c.w * c.c1, 1.0));
    let x2 = round_bf16(&rng.normal_vec(c.batch * c.h * c.w * c.c2, 1.0));
    let w = round_bf16(&rng.normal_vec(s.out_ch * kk, 1.0 / (kk as f32).sqrt()));
    let b = round_bf16(&rng.normal_vec(s.out_ch, 1.0));
    let r = round_bf16(&rng.normal_vec(c.batch * ho * wo * s.out_ch, 1.0));

    let x1g = upload(gpu, &[c.batch, c.h, c.w, c.c1], &x1);
    let x2g = (c.c2 > 0).then(|| upload(gpu, &[c.batch, c.h, c.w, c.c2], &x2));
    let (wg, bg, rg) = (upload(gpu, &[s.out_ch, s.kernel, s.kernel, s.in_ch], &w), upload(gpu, &[s.out_ch], &b), upload(gpu, &[c.batch, ho, wo, s.out_ch], &r));
    let mut y = Tensor::empty_gpu(gpu, Persistent, &[c.batch, ho, wo, s.out_ch], DType::BF16).unwrap();
    y.poison(gpu).unwrap();
    let src = ConvSource { x: &x1g, skip: x2g.as_ref(), upsample2x: c.up };
    conv2d(gpu, src, &s, &wg, Some(&bg), c.residual.then_some(&rg), &mut y).unwrap();
    let got = y.to_cpu(gpu).unwrap().into_vec().unwrap();

    let xin = if c.c2 > 0 { concat_channels_cpu(&x1, &x2, c.c1, c.c2) } else { x1 };
    let xin = if c.up { upsample_nearest2x_cpu(&xin, c.batch, c.h, c.w, s.in_ch) } else { xin };
    let pixels = sample_pixels(&mut rng, c.batch, ho, wo, s.out_ch * kk);
    let want: Vec<f32> = pixels
        .iter()
        .flat_map(|&p| {
            let mut v = conv2d_pixel(&xin, &s, &w, Some(&b), p);
            if c.residual {
                v.iter_mut().zip(&r[p * s.out_ch..]).for_each(|(a, b)| *a += b);
            }
            v
        })
        .collect();
    let got = gather(&got, &pixels, s.out_ch);
    assert_close(&format!("conv2d {c:?} seed={seed} ({} pixels)", pixels.len()), &got, &want, 1e-2);
}

fn run_backward(gpu: &Gpu, c: &Case) {
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let s = c.conv();
    let (ho, wo) = s.out_hw();
    let kk = s.kernel * s.kernel * s.in_ch;
    let dy = round_bf16(&rng.normal_vec(c.batch * ho * wo * s.out_ch, 1.0));
    let w = round_bf16(&rng.normal_vec(s.out_ch * kk, 1.0 / (kk as f32).sqrt()));
    let (dyg, wg) = (upload(gpu, &[c.batch, ho, wo, s.out_ch], &dy), upload(gpu, &[s.out_ch, s.kernel, s.kernel, s.in_ch], &w));
    let mut dx1 = Tensor::empty_gpu(gpu, Persistent, &[c.batch, c.h, c.w, c.c1], DType::BF16).unwrap();
    let mut dx2 = Tensor::empty_gpu(gpu, Persistent, &[c.batch, c.h, c.w, c.c2.max(1)], DType::BF16).unwrap();
    dx1.poison(gpu).unwrap();
    dx2.poison(gpu).unwrap();
    conv2d_backward_input(gpu, &dyg, &s, &wg, c.up, &mut dx1, (c.c2 > 0).then_some(&mut dx2)).unwrap();
    let got1 = dx1.to_cpu(gpu).unwrap().into_vec().unwrap();
    let got2 = dx2.to_cpu(gpu).unwrap().into_vec().unwrap();

    let f = if c.up { 4 } else { 1 };
    let pixels = sample_pixels(&mut rng, c.batch, c.h, c.w, f * s.out_ch * kk);
    let mut want1 = Vec::new();
    let mut want2 = Vec::new();
    for &p in &pixels {
        let v = if c.up {
            // low-res pixel (n, i, j) gathers the 2×2 block of the upsampled input's gradient
            let (n, i, j) = (p / (c.h * c.w), p / c.w % c.h, p % c.w);
            let mut acc = vec![0f32; s.in_ch];
            for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let hp = (n * s.height + 2 * i + a) * s.width + 2 * j + b;
                acc.iter_mut().zip(conv2d_backward_input_pixel(&dy, &s, &w, hp)).for_each(|(x, y)| *x += y);
            }
            acc
        } else {
            conv2d_backward_input_pixel(&dy, &s, &w, p)
        };
        want1.extend_from_slice(&v[..c.c1]);
        want2.extend_from_slice(&v[c.c1..]);
    }
    let what = format!("conv2d_backward_input {c:?} seed={seed} ({} pixels)", pixels.len());
    assert_close(&format!("{what} dx"), &gather(&got1, &pixels, c.c1), &want1, 1e-2);
    if c.c2 > 0 {
        assert_close(&format!("{what} dskip"), &gather(&got2, &pixels, c.c2), &want2, 1e-2);
    }
}

fn run_cases(cases: &[Case], forward: bool) {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    for c in cases {
        if forward {
            run_forward(&gpu, c);
        } else {
            run_backward(&gpu, c);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_forward_sd15_down_mid() {
    run_cases(SD15_DOWN_MID, true);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_forward_sd15_up() {
    run_cases(SD15_UP, true);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_backward_input_sd15_down_mid() {
    run_cases(SD15_DOWN_MID, false);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_backward_input_sd15_up() {
    run_cases(SD15_UP, false);
}
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_odd_sizes() {
    run_cases(ODD, true);
    run_cases(ODD, false);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv_rejects_bad_shapes() {
    let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
    let t = |shape: &[usize]| Tensor::empty_gpu(&gpu, Persistent, shape, DType::BF16).unwrap();
    let (x, w) = (t(&[1, 8, 8, 16]), t(&[8, 3, 3, 16]));
    let s = shape(1, 8, 8, 16, 8, 3, 1);
    let mut y_bad = t(&[1, 8, 8, 9]);
    assert!(conv2d(&gpu, ConvSource::plain(&x), &s, &w, None, None, &mut y_bad).is_err(), "wrong output shape accepted");
    let mut y = t(&[1, 8, 8, 8]);
    assert!(conv2d(&gpu, ConvSource::plain(&x), &shape(1, 8, 8, 24, 8, 3, 1), &w, None, None, &mut y).is_err(), "in_ch mismatch accepted");
    assert!(conv2d(&gpu, ConvSource::upsample2x(&x), &s, &w, None, None, &mut y).is_err(), "upsample with wrong size accepted");
    let x32 = Tensor::from_vec(&[1, 8, 8, 16], vec![0.0; 1024]).unwrap().to_gpu(&gpu, Persistent, DType::F32).unwrap();
    assert!(conv2d(&gpu, ConvSource::plain(&x32), &s, &w, None, None, &mut y).is_err(), "f32 input accepted");
    conv2d(&gpu, ConvSource::plain(&x), &s, &w, None, None, &mut y).unwrap();
}
