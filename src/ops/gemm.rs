//! Linear layers (kernels/gemm.cu): Y[M×N] = X[M×K]·W[N×K]ᵀ + b, W as PyTorch stores it.

/// CPU twin: y[m×n] = x[m×k]·w[n×k]ᵀ + bias.
pub fn linear_cpu(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear_cpu: x is not {m}×{k}");
    assert_eq!(w.len(), n * k, "linear_cpu: w is not {n}×{k}");
    let mut y = vec![0f32; m * n];
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        for (j, (wr, out)) in w.chunks_exact(k).zip(yr.iter_mut()).enumerate() {
            let dot: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            *out = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_cpu_small_example() {
        // x = [[1, 2]], w = [[3, 4], [5, 6], [7, 8]], b = [1, 0, -1]
        let y = linear_cpu(&[1.0, 2.0], 1, 2, &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 3, Some(&[1.0, 0.0, -1.0]));
        assert_eq!(y, vec![12.0, 17.0, 22.0]);
    }
}
