//! Gated and CLIP activations (kernels/activation.cu): GEGLU forward and backward (the UNet's
//! feed-forward), quick_gelu forward (CLIP). CPU twins: `geglu_cpu`, `geglu_backward_cpu`,
//! `quick_gelu_cpu`.

use super::check_gpu;
use super::elementwise::{gelu_backward_cpu, gelu_cpu};
use super::norm::{kernel_name, vector_width};
use crate::cuda::{grid_1d, Gpu, KernelArg, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const MODULE: &str = "activation";

/// CPU twin: x [m, 2d] = [hidden | gate] → y [m, d] = hidden · gelu(gate) (exact GELU).
pub fn geglu_cpu(x: &[f32], m: usize, d: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * 2 * d, "geglu_cpu: x is not {m}×{}", 2 * d);
    x.chunks_exact(2 * d)
        .flat_map(|r| {
            let (h, g) = r.split_at(d);
            h.iter().zip(gelu_cpu(g)).map(|(a, b)| a * b).collect::<Vec<_>>()
        })
        .collect()
}

/// CPU twin of the GEGLU backward: dx [m, 2d] = [dy·gelu(gate) | dy·hidden·gelu'(gate)].
pub fn geglu_backward_cpu(x: &[f32], m: usize, d: usize, dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), m * 2 * d, "geglu_backward_cpu: x is not {m}×{}", 2 * d);
    assert_eq!(dy.len(), m * d, "geglu_backward_cpu: dy is not {m}×{d}");
    let mut dx = Vec::with_capacity(x.len());
    for (r, dyr) in x.chunks_exact(2 * d).zip(dy.chunks_exact(d)) {
        let (h, g) = r.split_at(d);
        dx.extend(gelu_cpu(g).iter().zip(dyr).map(|(a, b)| a * b));
        let dyh: Vec<f32> = dyr.iter().zip(h).map(|(a, b)| a * b).collect();
        dx.extend(gelu_backward_cpu(g, &dyh));
    }
    dx
}

/// CPU twin: y = x · σ(1.702·x).
pub fn quick_gelu_cpu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v / (1.0 + (-1.702 * v).exp())).collect()
}

fn geglu_dims(x: &Tensor) -> Result<(usize, usize)> {
    let s = x.shape();
    ensure!(!s.is_empty() && s[s.len() - 1].is_multiple_of(2) && x.numel() > 0, "geglu: x has shape {s:?}, expected [..., 2d]");
    let d = s[s.len() - 1] / 2;
    Ok((x.numel() / (2 * d), d))
}

/// One block per row, enough threads for one vector each (whole warps, at most 256).
pub(crate) fn row_config(rows: usize, vectors: usize) -> LaunchConfig {
    let threads = vectors.div_ceil(32).clamp(1, 8) * 32;
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// GEGLU forward: `x` [..., 2d] → `y` [..., d] = hidden · gelu(gate).
pub fn geglu(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let (m, d) = geglu_dims(x)?;
    check_gpu("geglu", &[x], x.dtype(), m * 2 * d)?;
    check_gpu("geglu output", &[y], x.dtype(), m * d)?;
    let args = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I32(d as i32)];
    let e = vector_width(d, x.dtype());
    gpu.launch(MODULE, kernel_name("geglu_fwd", x.dtype(), e), row_config(m, d / e), &args)
}

/// GEGLU backward: `dx` [..., 2d] from the forward's input `x` and `dy` [..., d].
pub fn geglu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    let (m, d) = geglu_dims(x)?;
    check_gpu("geglu_backward", &[x, dx], x.dtype(), m * 2 * d)?;
    check_gpu("geglu_backward dy", &[dy], x.dtype(), m * d)?;
    let args = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(dx.ptr()?), KernelArg::I32(d as i32)];
    let e = vector_width(d, x.dtype());
    gpu.launch(MODULE, kernel_name("geglu_bwd", x.dtype(), e), row_config(m, d / e), &args)
}

/// quick_gelu forward: y = x · σ(1.702·x).
pub fn quick_gelu(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let n = x.numel();
    check_gpu("quick_gelu", &[x, y], x.dtype(), n)?;
    let mut cfg = grid_1d(n, 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_536);
    let kernel = match x.dtype() {
        crate::tensor::DType::F32 => "quick_gelu_fwd_f32",
        crate::tensor::DType::BF16 => "quick_gelu_fwd_bf16",
    };
    gpu.launch(MODULE, kernel, cfg, &[KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I64(n as i64)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference;
    use crate::ops::twin_check::{gpu_case, GpuCase};
    use crate::rng::Rng;
    use crate::tensor::{assert_close, DType};

    #[test]
    fn geglu_backward_matches_finite_differences() {
        let (m, d) = (3, 5);
        let mut rng = Rng::new(21);
        let x = rng.normal_vec(m * 2 * d, 1.5);
        let w = rng.normal_vec(m * d, 1.0);
        let analytic = geglu_backward_cpu(&x, m, d, &w);
        let numeric = finite_difference(&x, 1e-2, |xs| geglu_cpu(xs, m, d).iter().zip(&w).map(|(y, w)| *y as f64 * *w as f64).sum());
        let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
        assert_close("geglu backward vs finite differences", &analytic, &numeric, 1e-3);
    }

    #[test]
    fn geglu_splits_hidden_then_gate_and_quick_gelu_closed_form() {
        // hidden = [2], gate = [1]: 2 · gelu(1) = 2 · 0.8413447
        assert!((geglu_cpu(&[2.0, 1.0], 1, 1)[0] - 1.682_689_4).abs() < 1e-6);
        assert!((quick_gelu_cpu(&[1.0])[0] - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-7);
        assert_eq!(quick_gelu_cpu(&[0.0])[0], 0.0);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_geglu_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // SD1.5 feed-forwards (tokens × 4·dim, batch 2) and odd widths.
        for (m, d) in [(8192, 1280), (2048, 2560), (128, 5120), (7, 3), (33, 1001), (1, 8)] {
            for dtype in [DType::BF16, DType::F32] {
                gpu_case(&gpu, &GpuCase { name: "geglu", dtype, inputs: &[(&[m, 2 * d], 2.0)], out: &[m, d] },
                    &|h| geglu_cpu(&h[0], m, d), &|g, t, o| geglu(g, &t[0], o));
                gpu_case(&gpu, &GpuCase { name: "geglu_backward", dtype, inputs: &[(&[m, 2 * d], 2.0), (&[m, d], 1.0)], out: &[m, 2 * d] },
                    &|h| geglu_backward_cpu(&h[0], m, d, &h[1]), &|g, t, o| geglu_backward(g, &t[0], &t[1], o));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_quick_gelu_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for n in [1, 77 * 3072, 1_000_003] {
            for dtype in [DType::BF16, DType::F32] {
                gpu_case(&gpu, &GpuCase { name: "quick_gelu", dtype, inputs: &[(&[n], 3.0)], out: &[n] },
                    &|h| quick_gelu_cpu(&h[0]), &|g, t, o| quick_gelu(g, &t[0], o));
            }
        }
    }
}
