//! Data movement on the UNet's up path (kernels/layout.cu), NHWC: nearest 2× upsampling and its
//! backward (2×2 sums), channel concatenation of skip connections and its backward (a split).
//! CPU twins: `upsample_nearest2x_cpu`, `upsample_nearest2x_backward_cpu`, `concat_channels_cpu`,
//! `split_channels_cpu`.

use super::activation::row_config;
use super::check_gpu;
use super::norm::{kernel_name, vector_width};
use crate::cuda::{Gpu, KernelArg};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const MODULE: &str = "layout";

/// CPU twin: x [n, h, w, c] → y [n, 2h, 2w, c], y[b, i, j] = x[b, i/2, j/2].
pub fn upsample_nearest2x_cpu(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * h * w * c, "upsample_nearest2x_cpu: x is not {n}×{h}×{w}×{c}");
    let mut y = Vec::with_capacity(4 * x.len());
    for b in 0..n {
        for i in 0..2 * h {
            for j in 0..2 * w {
                let p = (b * h + i / 2) * w + j / 2;
                y.extend_from_slice(&x[p * c..][..c]);
            }
        }
    }
    y
}

/// CPU twin of the backward: dy [n, 2h, 2w, c] → dx [n, h, w, c], each input pixel the sum of its
/// 2×2 output pixels.
pub fn upsample_nearest2x_backward_cpu(dy: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    assert_eq!(dy.len(), n * 4 * h * w * c, "upsample_nearest2x_backward_cpu: dy is not {n}×{}×{}×{c}", 2 * h, 2 * w);
    let mut dx = vec![0f32; n * h * w * c];
    for b in 0..n {
        for i in 0..2 * h {
            for j in 0..2 * w {
                let src = &dy[((b * 2 * h + i) * 2 * w + j) * c..][..c];
                let dst = &mut dx[((b * h + i / 2) * w + j / 2) * c..][..c];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
    }
    dx
}

/// CPU twin: a [p, c1] | b [p, c2] → [p, c1 + c2].
pub fn concat_channels_cpu(a: &[f32], b: &[f32], c1: usize, c2: usize) -> Vec<f32> {
    assert_eq!(a.len() / c1, b.len() / c2, "concat_channels_cpu: pixel counts differ");
    a.chunks_exact(c1).zip(b.chunks_exact(c2)).flat_map(|(x, y)| x.iter().chain(y).copied()).collect()
}

/// CPU twin: y [p, c1 + c2] → (y[:, :c1], y[:, c1:]).
pub fn split_channels_cpu(y: &[f32], c1: usize, c2: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = y.chunks_exact(c1 + c2);
    (rows.clone().flat_map(|r| r[..c1].to_vec()).collect(), rows.flat_map(|r| r[c1..].to_vec()).collect())
}

fn nhwc(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    let s = x.shape();
    ensure!(s.len() == 4 && x.numel() > 0, "{what}: shape {s:?}, expected non-empty [n, h, w, c]");
    Ok((s[0], s[1], s[2], s[3]))
}

/// Nearest 2× upsampling: `x` [n, h, w, c] → `y` [n, 2h, 2w, c].
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let (n, h, w, c) = nhwc(x, "upsample_nearest2x")?;
    ensure!(y.shape() == [n, 2 * h, 2 * w, c], "upsample_nearest2x: y {:?} for x {:?}", y.shape(), x.shape());
    check_gpu("upsample_nearest2x", &[x], x.dtype(), n * h * w * c)?;
    check_gpu("upsample_nearest2x output", &[y], x.dtype(), 4 * n * h * w * c)?;
    let e = vector_width(c, x.dtype());
    let args = [KernelArg::Ptr(x.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I32(h as i32), KernelArg::I32(w as i32), KernelArg::I32(c as i32)];
    gpu.launch(MODULE, kernel_name("upsample2x_fwd", x.dtype(), e), row_config(4 * n * h * w, c / e), &args)
}

/// Backward of [`upsample_nearest2x`]: `dy` [n, 2h, 2w, c] → `dx` [n, h, w, c] (2×2 sums).
pub fn upsample_nearest2x_backward(gpu: &Gpu, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    let (n, h, w, c) = nhwc(dx, "upsample_nearest2x_backward")?;
    ensure!(dy.shape() == [n, 2 * h, 2 * w, c], "upsample_nearest2x_backward: dy {:?} for dx {:?}", dy.shape(), dx.shape());
    check_gpu("upsample_nearest2x_backward", &[dx], dy.dtype(), n * h * w * c)?;
    check_gpu("upsample_nearest2x_backward dy", &[dy], dy.dtype(), 4 * n * h * w * c)?;
    let e = vector_width(c, dy.dtype());
    let args = [KernelArg::Ptr(dy.ptr()?), KernelArg::Ptr(dx.ptr()?), KernelArg::I32(h as i32), KernelArg::I32(w as i32), KernelArg::I32(c as i32)];
    gpu.launch(MODULE, kernel_name("upsample2x_bwd", dy.dtype(), e), row_config(n * h * w, c / e), &args)
}

/// (pixels, c1, c2) for y = [a | b] along the last dimension, all leading dimensions equal.
fn concat_dims(a: &Tensor, b: &Tensor, y: &Tensor, what: &str) -> Result<(usize, usize, usize)> {
    let (sa, sb, sy) = (a.shape(), b.shape(), y.shape());
    ensure!(!sa.is_empty() && sa.len() == sb.len() && sa.len() == sy.len(), "{what}: shapes {sa:?} {sb:?} {sy:?}");
    let k = sa.len() - 1;
    ensure!(sa[..k] == sb[..k] && sa[..k] == sy[..k] && sy[k] == sa[k] + sb[k], "{what}: shapes {sa:?} | {sb:?} do not make {sy:?}");
    let (c1, c2) = (sa[k], sb[k]);
    ensure!(c1 > 0 && c2 > 0, "{what}: empty channel part");
    let p = a.numel() / c1;
    check_gpu(what, &[a], y.dtype(), p * c1)?;
    check_gpu(what, &[b], y.dtype(), p * c2)?;
    check_gpu(what, &[y], y.dtype(), p * (c1 + c2))?;
    Ok((p, c1, c2))
}

/// Channel concatenation: `y` [..., c1 + c2] = `a` [..., c1] | `b` [..., c2].
pub fn concat_channels(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
    let (p, c1, c2) = concat_dims(a, b, y, "concat_channels")?;
    let e = vector_width(gcd(c1, c2), y.dtype());
    let args = [KernelArg::Ptr(a.ptr()?), KernelArg::Ptr(b.ptr()?), KernelArg::Ptr(y.ptr()?), KernelArg::I32(c1 as i32), KernelArg::I32(c2 as i32)];
    gpu.launch(MODULE, kernel_name("concat_channels", y.dtype(), e), row_config(p, (c1 + c2) / e), &args)
}

/// Channel split (the concat's backward): `a` = `y`[..., :c1], `b` = `y`[..., c1:].
pub fn split_channels(gpu: &Gpu, y: &Tensor, a: &mut Tensor, b: &mut Tensor) -> Result<()> {
    let (p, c1, c2) = concat_dims(a, b, y, "split_channels")?;
    let e = vector_width(gcd(c1, c2), y.dtype());
    let args = [KernelArg::Ptr(y.ptr()?), KernelArg::Ptr(a.ptr()?), KernelArg::Ptr(b.ptr()?), KernelArg::I32(c1 as i32), KernelArg::I32(c2 as i32)];
    gpu.launch(MODULE, kernel_name("split_channels", y.dtype(), e), row_config(p, (c1 + c2) / e), &args)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ArenaKind::Persistent;
    use crate::ops::twin_check::{gpu_case, GpuCase};
    use crate::rng::Rng;
    use crate::tensor::{assert_close, DType};

    #[test]
    fn upsample_backward_is_the_adjoint_of_upsample() {
        // ⟨up(x), y⟩ = ⟨x, up_backward(y)⟩ for every x, y: the backward is exactly the transpose.
        let (n, h, w, c) = (2, 3, 2, 5);
        let mut rng = Rng::new(31);
        let x = rng.normal_vec(n * h * w * c, 1.0);
        let y = rng.normal_vec(4 * x.len(), 1.0);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
        let lhs = dot(&upsample_nearest2x_cpu(&x, n, h, w, c), &y);
        let rhs = dot(&x, &upsample_nearest2x_backward_cpu(&y, n, h, w, c));
        assert!((lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        assert_eq!(upsample_nearest2x_cpu(&[1.0, 2.0], 1, 1, 1, 2), vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn split_inverts_concat() {
        let (a, b) = (vec![1.0, 2.0, 3.0, 4.0], vec![5.0, 6.0]);
        let y = concat_channels_cpu(&a, &b, 2, 1);
        assert_eq!(y, vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
        assert_eq!(split_channels_cpu(&y, 2, 1), (a, b));
        assert_eq!(gcd(1280, 640), 640);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_upsample_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // SD1.5 upsamplers (8→16 at 1280, 16→32 at 1280, 32→64 at 640), batch 2, and odd shapes.
        for (n, h, w, c) in [(2, 8, 8, 1280), (2, 16, 16, 1280), (2, 32, 32, 640), (1, 3, 5, 7), (3, 1, 1, 4)] {
            for dtype in [DType::BF16, DType::F32] {
                let (small, big) = ([n, h, w, c], [n, 2 * h, 2 * w, c]);
                gpu_case(&gpu, &GpuCase { name: "upsample_nearest2x", dtype, inputs: &[(&small, 1.0)], out: &big },
                    &|v| upsample_nearest2x_cpu(&v[0], n, h, w, c), &|g, t, o| upsample_nearest2x(g, &t[0], o));
                gpu_case(&gpu, &GpuCase { name: "upsample_nearest2x_backward", dtype, inputs: &[(&big, 1.0)], out: &small },
                    &|v| upsample_nearest2x_backward_cpu(&v[0], n, h, w, c), &|g, t, o| upsample_nearest2x_backward(g, &t[0], o));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_concat_split_match_twins() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // Up-path skip concatenations (h | skip) at their resolutions, batch 2, and odd widths.
        for (p, c1, c2) in [(128, 1280, 1280), (512, 1280, 640), (2048, 640, 320), (8192, 320, 320), (7, 3, 5), (1, 1, 2)] {
            for dtype in [DType::BF16, DType::F32] {
                gpu_case(&gpu, &GpuCase { name: "concat_channels", dtype, inputs: &[(&[p, c1], 1.0), (&[p, c2], 1.0)], out: &[p, c1 + c2] },
                    &|v| concat_channels_cpu(&v[0], &v[1], c1, c2), &|g, t, o| concat_channels(g, &t[0], &t[1], o));
                // The split writes two tensors: compare a here (through gpu_case) and b inside the op closure.
                let split_b = |g: &Gpu, t: &[Tensor], a: &mut Tensor| -> Result<()> {
                    let mut b = Tensor::empty_gpu(g, Persistent, &[p, c2], dtype)?;
                    b.poison(g)?;
                    split_channels(g, &t[0], a, &mut b)?;
                    let want = split_channels_cpu(&t[0].to_cpu(g)?.into_vec()?, c1, c2).1;
                    assert_close(&format!("split_channels b {dtype:?} p={p} c1={c1} c2={c2}"), &b.to_cpu(g)?.into_vec()?, &want, 0.0);
                    Ok(())
                };
                gpu_case(&gpu, &GpuCase { name: "split_channels a", dtype, inputs: &[(&[p, c1 + c2], 1.0)], out: &[p, c1] },
                    &|v| split_channels_cpu(&v[0], c1, c2).0, &split_b);
            }
        }
    }
}
