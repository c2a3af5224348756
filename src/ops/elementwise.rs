//! Elementwise ops (kernels/elementwise.cu): add, scale, SiLU and GELU forward/backward, and casts
//! between f32 and bf16. CPU twins are the `*_cpu` functions.

use super::check_gpu;
use crate::cuda::{grid_1d, Gpu, KernelArg};
use crate::tensor::{DType, Tensor};
use anyhow::Result;

const MODULE: &str = "elementwise";
const BLOCK: u32 = 256;
/// Grid-stride kernels: enough blocks to fill any current GPU, no more.
const MAX_BLOCKS: usize = 65_536;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn normal_cdf(x: f32) -> f32 {
    (0.5 * erfc(-(x as f64) / std::f64::consts::SQRT_2)) as f32
}

/// erfc in f64 to ~1e-15 relative: the Maclaurin series of erf for |z| < 3, Lentz's continued
/// fraction for the tail (where 1 − erf would lose every digit of a tiny GELU).
fn erfc(z: f64) -> f64 {
    if z < 0.0 {
        return 2.0 - erfc(-z);
    }
    if z < 3.0 {
        // erf z = 2/√π Σ (−1)^n z^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, mut n) = (z, z, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -z * z / n;
            sum += term / (2.0 * n + 1.0);
        }
        return 1.0 - sum * std::f64::consts::FRAC_2_SQRT_PI;
    }
    // erfc z = e^(−z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + …)))))
    let (tiny, mut f) = (1e-300, z);
    let (mut c, mut d) = (z, 0.0);
    for k in 1..200 {
        let a = k as f64 / 2.0;
        d = z + a * d;
        d = if d == 0.0 { tiny } else { 1.0 / d };
        c = z + a / c;
        if c == 0.0 {
            c = tiny;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-z * z).exp() / (f * std::f64::consts::PI.sqrt())
}

/// y[b, p, c] = x[b, p, c] + e[b, c] for x of `batch` samples with `channels` channels last.
pub fn add_channel_bias_cpu(x: &[f32], e: &[f32], batch: usize, channels: usize) -> Vec<f32> {
    let per_sample = x.len() / batch;
    x.iter().enumerate().map(|(i, v)| v + e[(i / per_sample) * channels + i % channels]).collect()
}

pub fn add_cpu(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}
pub fn scale_cpu(x: &[f32], alpha: f32) -> Vec<f32> {
    x.iter().map(|v| alpha * v).collect()
}
pub fn silu_cpu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v * sigmoid(v)).collect()
}
pub fn silu_backward_cpu(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter().zip(dy).map(|(&v, &g)| {
        let s = sigmoid(v);
        g * s * (1.0 + v * (1.0 - s))
    }).collect()
}
pub fn gelu_cpu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v * normal_cdf(v)).collect()
}
pub fn gelu_backward_cpu(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter().zip(dy).map(|(&v, &g)| {
        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f32::consts::PI).sqrt();
        g * (normal_cdf(v) + v * pdf)
    }).collect()
}

fn cfg(n: usize) -> crate::cuda::LaunchConfig {
    let mut c = grid_1d(n, BLOCK);
    c.grid_dim.0 = c.grid_dim.0.min(MAX_BLOCKS as u32);
    c
}

fn kernel_name(op: &str, dtype: DType) -> &'static str {
    // Kernel names are static strings for the profiler; the set is small and fixed.
    match (op, dtype) {
        ("add", DType::F32) => "add_f32",
        ("add", DType::BF16) => "add_bf16",
        ("scale", DType::F32) => "scale_f32",
        ("scale", DType::BF16) => "scale_bf16",
        ("silu_fwd", DType::F32) => "silu_fwd_f32",
        ("silu_fwd", DType::BF16) => "silu_fwd_bf16",
        ("silu_bwd", DType::F32) => "silu_bwd_f32",
        ("silu_bwd", DType::BF16) => "silu_bwd_bf16",
        ("gelu_fwd", DType::F32) => "gelu_fwd_f32",
        ("gelu_fwd", DType::BF16) => "gelu_fwd_bf16",
        ("gelu_bwd", DType::F32) => "gelu_bwd_f32",
        ("gelu_bwd", DType::BF16) => "gelu_bwd_bf16",
        _ => unreachable!("unknown elementwise op {op}"),
    }
}

fn launch_unary(gpu: &Gpu, op: &str, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let n = x.numel();
    check_gpu(op, &[x, y], x.dtype(), n)?;
    gpu.launch(MODULE, kernel_name(op, x.dtype()), cfg(n), &[KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I64(n as i64)])
}

fn launch_binary(gpu: &Gpu, op: &str, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    let n = a.numel();
    check_gpu(op, &[a, b, y], a.dtype(), n)?;
    let args = [KernelArg::Ptr(a.ptr()?), KernelArg::Ptr(b.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I64(n as i64)];
    gpu.launch(MODULE, kernel_name(op, a.dtype()), cfg(n), &args)
}

/// y = a + b
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    launch_binary(gpu, "add", a, b, y)
}
/// y = alpha · x
pub fn scale(gpu: &Gpu, x: &Tensor, alpha: f32, y: &mut Tensor) -> Result<()> {
    let n = x.numel();
    check_gpu("scale", &[x, y], x.dtype(), n)?;
    let args = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::F32(alpha), KernelArg::I64(n as i64)];
    gpu.launch(MODULE, kernel_name("scale", x.dtype()), cfg(n), &args)
}
/// y = silu(x)
pub fn silu(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    launch_unary(gpu, "silu_fwd", x, y)
}
/// dx = dy · silu'(x)
pub fn silu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    launch_binary(gpu, "silu_bwd", x, dy, dx)
}
/// y = gelu(x) (exact, erf-based)
pub fn gelu(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    launch_unary(gpu, "gelu_fwd", x, y)
}
/// dx = dy · gelu'(x)
pub fn gelu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    launch_binary(gpu, "gelu_bwd", x, dy, dx)
}

/// y[b, .., c] = x[b, .., c] + e[b, c] (e is [batch, channels], same dtype as x).
pub fn add_channel_bias(gpu: &Gpu, x: &Tensor, e: &Tensor, y: &mut Tensor) -> Result<()> {
    let (n, batch, c) = (x.numel(), x.shape()[0], *x.shape().last().unwrap_or(&1));
    check_gpu("add_channel_bias", &[x, y], x.dtype(), n)?;
    check_gpu("add_channel_bias bias", &[e], x.dtype(), batch * c)?;
    let kernel = if x.dtype() == DType::F32 { "add_channel_bias_f32" } else { "add_channel_bias_bf16" };
    let args = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(e.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I64(n as i64), KernelArg::I64((n / batch) as i64), KernelArg::I32(c as i32)];
    gpu.launch(MODULE, kernel, cfg(n), &args)
}

/// Converts between f32 and bf16 on the GPU (`x` and `y` of different dtypes, same shape).
pub fn cast(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let n = x.numel();
    check_gpu("cast", &[x], x.dtype(), n)?;
    check_gpu("cast", &[y], y.dtype(), n)?;
    let kernel = match (x.dtype(), y.dtype()) {
        (DType::F32, DType::BF16) => "cast_f32_to_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_to_f32",
        (a, b) => anyhow::bail!("cast: {a:?} to {b:?} is not a conversion"),
    };
    gpu.launch(MODULE, kernel, cfg(n), &[KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I64(n as i64)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ArenaKind::Persistent;
    use crate::ops::finite_difference;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, round_bf16};

    #[test]
    fn erfc_matches_known_values() {
        // erfc(z) from tables (Abramowitz & Stegun / mpmath), including the far tail.
        for (z, want) in [(0.0, 1.0), (0.5, 0.4795001221869535), (1.0, 0.15729920705028513), (-2.0, 1.9953222650189528), (3.0, 2.209049699858544e-5), (5.0, 1.5374597944280349e-12)] {
            let got = erfc(z);
            assert!((got - want).abs() <= 1e-13 * want.abs().max(1e-300) + 1e-300, "erfc({z}) = {got:e}, want {want:e}");
        }
    }

    fn check_backward(forward: fn(&[f32]) -> Vec<f32>, backward: fn(&[f32], &[f32]) -> Vec<f32>) {
        let mut rng = Rng::new(7);
        let x = rng.normal_vec(64, 2.0);
        let w = rng.normal_vec(64, 1.0); // loss = Σ w·f(x), so dL/dy = w
        let analytic = backward(&x, &w);
        let numeric = finite_difference(&x, 1e-2, |xs| forward(xs).iter().zip(&w).map(|(y, w)| (*y as f64) * (*w as f64)).sum());
        let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
        assert_close("backward vs finite differences", &analytic, &numeric, 1e-3);
    }

    #[test]
    fn silu_backward_matches_finite_differences() {
        check_backward(silu_cpu, silu_backward_cpu);
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        check_backward(gelu_cpu, gelu_backward_cpu);
    }

    #[test]
    fn twins_match_closed_forms() {
        assert_eq!(silu_cpu(&[0.0])[0], 0.0);
        assert!((gelu_cpu(&[1.0])[0] - 0.841_344_7).abs() < 1e-6);
        assert_eq!(add_cpu(&[1.0, 2.0], &[3.0, 4.0]), vec![4.0, 6.0]);
        assert_eq!(scale_cpu(&[1.0, -2.0], 0.5), vec![0.5, -1.0]);
        // two samples of two pixels × two channels
        assert_eq!(add_channel_bias_cpu(&[0.0; 8], &[1.0, 2.0, 3.0, 4.0], 2, 2), vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
    }

    /// Runs `gpu_op` on fresh random inputs in `dtype` with a poisoned output, compares with `cpu_op`.
    fn gpu_vs_twin(
        name: &str,
        n: usize,
        inputs: usize,
        cpu_op: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
        gpu_op: &dyn Fn(&Gpu, &[Tensor], &mut Tensor) -> Result<()>,
    ) {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for dtype in [DType::F32, DType::BF16] {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let host: Vec<Vec<f32>> = (0..inputs).map(|_| rng.normal_vec(n, 3.0)).collect();
            let host = if dtype == DType::BF16 { host.iter().map(|v| round_bf16(v)).collect() } else { host };
            let dev: Vec<Tensor> = host.iter().map(|v| Tensor::from_vec(&[n], v.clone()).unwrap().to_gpu(&gpu, Persistent, dtype).unwrap()).collect();
            let mut out = Tensor::empty_gpu(&gpu, Persistent, &[n], dtype).unwrap();
            out.poison(&gpu).unwrap();
            gpu_op(&gpu, &dev, &mut out).unwrap();
            let got = out.to_cpu(&gpu).unwrap().into_vec().unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert_close(&format!("{name} {dtype:?} n={n} seed={seed}"), &got, &cpu_op(&host), tol);
        }
    }

    const SIZES: [usize; 3] = [1, 1000, 3 * 64 * 64 * 320 + 7];

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_add_scale_match_twins() {
        for n in SIZES {
            gpu_vs_twin("add", n, 2, &|h| add_cpu(&h[0], &h[1]), &|g, d, o| add(g, &d[0], &d[1], o));
            gpu_vs_twin("scale", n, 1, &|h| scale_cpu(&h[0], -0.37), &|g, d, o| scale(g, &d[0], -0.37, o));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_silu_gelu_match_twins() {
        for n in SIZES {
            gpu_vs_twin("silu", n, 1, &|h| silu_cpu(&h[0]), &|g, d, o| silu(g, &d[0], o));
            gpu_vs_twin("silu_backward", n, 2, &|h| silu_backward_cpu(&h[0], &h[1]), &|g, d, o| silu_backward(g, &d[0], &d[1], o));
            gpu_vs_twin("gelu", n, 1, &|h| gelu_cpu(&h[0]), &|g, d, o| gelu(g, &d[0], o));
            gpu_vs_twin("gelu_backward", n, 2, &|h| gelu_backward_cpu(&h[0], &h[1]), &|g, d, o| gelu_backward(g, &d[0], &d[1], o));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_add_channel_bias_matches_twin() {
        // [2, 64, 64, 320] plus a [2, 320] bias, and an odd [3, 5, 7, 8] case.
        for (batch, pixels, c) in [(2usize, 4096usize, 320usize), (3, 35, 8)] {
            let n = batch * pixels * c;
            let bias_twin = |h: &[Vec<f32>]| add_channel_bias_cpu(&h[0], &h[1][..batch * c], batch, c);
            gpu_vs_twin("add_channel_bias", n, 2, &bias_twin, &|g, d, o| {
                let e = d[1].reshape(&[n])?;
                // The bias is the first batch·c values of the second input.
                let e = Tensor::from_vec(&[batch * c], e.to_cpu(g)?.into_vec()?[..batch * c].to_vec())?.to_gpu(g, Persistent, d[1].dtype())?;
                add_channel_bias(g, &d[0].reshape(&[batch, pixels, c])?, &e, o)
            });
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_cast_round_trips() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let seed = Rng::fresh_seed();
        let host = Rng::new(seed).normal_vec(100_003, 10.0);
        let x = Tensor::from_vec(&[host.len()], host.clone()).unwrap().to_gpu(&gpu, Persistent, DType::F32).unwrap();
        let mut b = Tensor::empty_gpu(&gpu, Persistent, x.shape(), DType::BF16).unwrap();
        let mut back = Tensor::empty_gpu(&gpu, Persistent, x.shape(), DType::F32).unwrap();
        b.poison(&gpu).unwrap();
        back.poison(&gpu).unwrap();
        cast(&gpu, &x, &mut b).unwrap();
        cast(&gpu, &b, &mut back).unwrap();
        let got = back.to_cpu(&gpu).unwrap().into_vec().unwrap();
        // Round to nearest even on the device must equal half's rounding on the host, bit for bit.
        assert_eq!(got, round_bf16(&host), "seed {seed}");
    }
}
