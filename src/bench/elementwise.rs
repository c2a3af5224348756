//! Elementwise kernels at SD1.5 activation sizes (bf16): memory-bound, reported in GB/s.

use super::{time_gpu, BenchRow};
use crate::cuda::{ArenaKind::Scratch, Gpu};
use crate::ops::elementwise as ew;
use crate::tensor::{DType, Tensor};
use anyhow::Result;

pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    // Largest UNet activations at 512 px, batch 2: 64x64x320 and the GEGLU hidden 4096x2560.
    for shape in [[2usize, 64, 64, 320], [2, 4096, 2560, 1]] {
        let n: usize = shape.iter().product();
        let a = Tensor::empty_gpu(gpu, Scratch, &shape, DType::BF16)?;
        let b = Tensor::empty_gpu(gpu, Scratch, &shape, DType::BF16)?;
        let mut y = Tensor::empty_gpu(gpu, Scratch, &shape, DType::BF16)?;
        let mut y32 = Tensor::empty_gpu(gpu, Scratch, &shape, DType::F32)?;
        let bytes2 = (2 * n * 2) as f64; // one bf16 read + one write
        let bytes3 = (3 * n * 2) as f64;
        let desc = format!("{shape:?}");
        let mut push = |kernel: &str, bytes: f64, t: super::Timing| {
            rows.push(BenchRow { kernel: kernel.into(), shape: desc.clone(), rate: bytes / t.median_ms / 1e6, unit: "GB/s", timing: t });
        };
        push("add_bf16", bytes3, time_gpu(gpu, 5, 50, || ew::add(gpu, &a, &b, &mut y))?);
        push("silu_fwd_bf16", bytes2, time_gpu(gpu, 5, 50, || ew::silu(gpu, &a, &mut y))?);
        push("silu_bwd_bf16", bytes3, time_gpu(gpu, 5, 50, || ew::silu_backward(gpu, &a, &b, &mut y))?);
        push("gelu_fwd_bf16", bytes2, time_gpu(gpu, 5, 50, || ew::gelu(gpu, &a, &mut y))?);
        push("cast_bf16_to_f32", (6 * n) as f64, time_gpu(gpu, 5, 50, || ew::cast(gpu, &a, &mut y32))?);
    }
    Ok(rows)
}
