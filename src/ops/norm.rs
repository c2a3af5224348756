//! Normalization (kernels/norm.cu): GroupNorm on NHWC activations and LayerNorm over rows.

/// CPU twin: GroupNorm over x [n, hw, c] with `groups` groups of c/groups channels; per-channel
/// affine γ, β. Statistics in f64.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_cpu(x: &[f32], n: usize, hw: usize, c: usize, groups: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), n * hw * c, "group_norm_cpu: x is not {n}×{hw}×{c}");
    assert!(c % groups == 0, "group_norm_cpu: {c} channels do not split into {groups} groups");
    let cg = c / groups;
    let mut y = vec![0f32; x.len()];
    for b in 0..n {
        let xs = &x[b * hw * c..][..hw * c];
        for g in 0..groups {
            let vals = || (0..hw).flat_map(move |p| (0..cg).map(move |j| xs[p * c + g * cg + j] as f64));
            let count = (hw * cg) as f64;
            let mean = vals().sum::<f64>() / count;
            let var = vals().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for p in 0..hw {
                for j in 0..cg {
                    let ch = g * cg + j;
                    let i = b * hw * c + p * c + ch;
                    y[i] = ((x[i] as f64 - mean) * rstd) as f32 * gamma[ch] + beta[ch];
                }
            }
        }
    }
    y
}

/// CPU twin: LayerNorm over the last dimension of x [rows, c]. Statistics in f64.
pub fn layer_norm_cpu(x: &[f32], rows: usize, c: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), rows * c, "layer_norm_cpu: x is not {rows}×{c}");
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
            *o = ((v as f64 - mean) * rstd) as f32 * gamma[j] + beta[j];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalizes_rows() {
        let y = layer_norm_cpu(&[1.0, 2.0, 3.0, 4.0, -1.0, 1.0], 3, 2, &[1.0, 1.0], &[0.0, 0.5], 0.0);
        for (got, want) in y.iter().zip([-1.0, 1.5, -1.0, 1.5, -1.0, 1.5]) {
            assert!((got - want).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn group_norm_with_one_channel_per_group_is_instance_norm() {
        // n=1, hw=2, c=2, 2 groups: channel 0 = [1, 3], channel 1 = [5, 5] (zero variance).
        let y = group_norm_cpu(&[1.0, 5.0, 3.0, 5.0], 1, 2, 2, 2, &[2.0, 1.0], &[0.0, 7.0], 1e-5);
        assert!((y[0] + 2.0).abs() < 1e-4 && (y[2] - 2.0).abs() < 1e-4 && y[1] == 7.0 && y[3] == 7.0, "{y:?}");
    }
}
