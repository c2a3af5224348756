//! Convolutions at the SD1.5 UNet's shapes (512 px, batch 1; bf16 NHWC): forward (with bias) and
//! input gradient, in TFLOP/s. Each timing covers `INNER` back-to-back launches between two CUDA
//! events, so host launch cost overlaps GPU work (benches/torch_conv.py times cuDNN the same shapes
//! inside a CUDA graph). Shape names: `b{batch}_{h}x{w}_{cin}->{cout}_k{k}s{stride}` with `+up`
//! for the fused nearest-2× upsample (h, w are then the conv's input size after upsampling) and
//! `cin=a+b` for the fused concat of the up blocks. On a Hopper GPU the plain rows run the wgmma
//! kernels (src/ops/conv_sm90.rs) where they take the shape, and `conv_*_sm80` rows time the sm_80
//! kernels at those shapes too.

use super::{time_gpu, BenchRow, Timing};
use crate::cuda::{ArenaKind::Persistent, Gpu};
use crate::ops::conv::{conv2d, conv2d_backward_input, Conv2dShape, ConvSource};
use crate::ops::conv_sm90;
use crate::tensor::{DType, Tensor};
use anyhow::Result;

const INNER: usize = 20;

/// (batch, conv input size, c1, c2 (skip), cout, kernel, stride, upsample)
pub const SHAPES: &[(usize, usize, usize, usize, usize, usize, usize, bool)] = &[
    (1, 64, 4, 0, 320, 3, 1, false),
    (1, 64, 320, 0, 320, 3, 1, false),
    (2, 64, 320, 0, 320, 3, 1, false),
    (1, 64, 320, 0, 320, 3, 2, false),
    (1, 32, 320, 0, 640, 3, 1, false),
    (1, 32, 640, 0, 640, 3, 1, false),
    (1, 32, 640, 0, 640, 3, 2, false),
    (1, 16, 640, 0, 1280, 3, 1, false),
    (1, 16, 1280, 0, 1280, 3, 1, false),
    (1, 16, 1280, 0, 1280, 3, 2, false),
    (1, 8, 1280, 0, 1280, 3, 1, false),
    (1, 8, 1280, 1280, 1280, 3, 1, false),
    (1, 16, 1280, 1280, 1280, 3, 1, false),
    (1, 16, 1280, 640, 1280, 3, 1, false),
    (1, 32, 1280, 640, 640, 3, 1, false),
    (1, 32, 640, 640, 640, 3, 1, false),
    (1, 32, 640, 320, 640, 3, 1, false),
    (1, 64, 640, 320, 320, 3, 1, false),
    (1, 64, 320, 320, 320, 3, 1, false),
    (1, 16, 1280, 0, 1280, 3, 1, true),
    (1, 32, 1280, 0, 1280, 3, 1, true),
    (1, 64, 640, 0, 640, 3, 1, true),
    (1, 32, 320, 0, 640, 1, 1, false),
    (1, 16, 640, 0, 1280, 1, 1, false),
    (1, 8, 1280, 1280, 1280, 1, 1, false),
    (1, 32, 1280, 640, 640, 1, 1, false),
    (1, 64, 640, 320, 320, 1, 1, false),
    (1, 64, 320, 0, 4, 3, 1, false),
];

pub fn shape_name(b: usize, hw: usize, c1: usize, c2: usize, cout: usize, k: usize, st: usize, up: bool) -> String {
    let cin = if c2 > 0 { format!("{c1}+{c2}") } else { c1.to_string() };
    format!("b{b}_{hw}x{hw}_{cin}->{cout}_k{k}s{st}{}", if up { "+up" } else { "" })
}

pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &(b, hw, c1, c2, cout, k, st, up) in SHAPES {
        let s = Conv2dShape { batch: b, height: hw, width: hw, in_ch: c1 + c2, out_ch: cout, kernel: k, stride: st, pad: k / 2 };
        let (ho, wo) = s.out_hw();
        let xhw = if up { hw / 2 } else { hw };
        let t = |shape: &[usize]| Tensor::empty_gpu(gpu, Persistent, shape, DType::BF16);
        let (mut x, mut skip) = (t(&[b, xhw, xhw, c1])?, t(&[b, xhw, xhw, c2.max(1)])?);
        let (w, bias, mut y) = (t(&[cout, k, k, c1 + c2])?, t(&[cout])?, t(&[b, ho, wo, cout])?);
        // Zeros: timing does not depend on values, and NaN-free inputs keep the tensor cores honest.
        for z in [&x, &skip, &w, &bias, &y] {
            unsafe { cudarc::driver::result::memset_d8_async(z.ptr()?, 0, z.numel() * 2, gpu.stream().cu_stream())? };
        }
        let name = shape_name(b, hw, c1, c2, cout, k, st, up);
        let per_call = |t: Timing| Timing { median_ms: t.median_ms / INNER as f64, min_ms: t.min_ms / INNER as f64, max_ms: t.max_ms / INNER as f64, reps: t.reps };
        // On a Hopper GPU the dispatched rows run the wgmma kernels where they take the shape; the
        // `_sm80` rows time the sm_80 kernels there too, with the sm90 path switched off.
        let sm90 = conv_sm90::choose(gpu, &s, c1, c2, up, false)?.is_some() || conv_sm90::choose(gpu, &s, c1, c2, up, true)?.is_some();
        for (suffix, on) in [("", true), ("_sm80", false)] {
            if !on && !sm90 {
                continue;
            }
            conv_sm90::set_enabled(on);
            let fwd = time_gpu(gpu, 2, 15, || {
                let src = ConvSource { x: &x, skip: (c2 > 0).then_some(&skip), upsample2x: up };
                (0..INNER).try_for_each(|_| conv2d(gpu, src, &s, &w, Some(&bias), None, &mut y))
            });
            let bwd = time_gpu(gpu, 2, 15, || (0..INNER).try_for_each(|_| conv2d_backward_input(gpu, &y, &s, &w, up, &mut x, (c2 > 0).then_some(&mut skip))));
            conv_sm90::set_enabled(true);
            for (kernel, t) in [("conv_fwd", fwd?), ("conv_bwd_input", bwd?)] {
                let t = per_call(t);
                rows.push(BenchRow { kernel: format!("{kernel}{suffix}"), shape: name.clone(), rate: s.flops() / t.median_ms / 1e9, unit: "TFLOP/s", timing: t });
            }
        }
    }
    Ok(rows)
}
