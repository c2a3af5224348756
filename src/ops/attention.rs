//! Multi-head attention (kernels/attention.cu) on token-major activations [batch, tokens, heads·head_dim].

/// Geometry of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query i sees keys 0..=i only (CLIP's text encoder).
    pub causal: bool,
}

/// CPU twin: per batch and head, out = softmax(q·kᵀ·scale (+ causal mask))·v.
/// q and out are [batch, q_len, heads·head_dim]; k and v are [batch, kv_len, heads·head_dim].
pub fn attention_cpu(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32) -> Vec<f32> {
    let width = s.heads * s.head_dim;
    assert_eq!(q.len(), s.batch * s.q_len * width, "attention_cpu: q does not match {s:?}");
    assert_eq!(k.len(), s.batch * s.kv_len * width, "attention_cpu: k does not match {s:?}");
    assert_eq!(v.len(), k.len(), "attention_cpu: v does not match k");
    let d = s.head_dim;
    let mut out = vec![0f32; q.len()];
    let mut p = vec![0f64; s.kv_len];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qi = &q[(b * s.q_len + i) * width + h * d..][..d];
                let visible = if s.causal { (i + 1).min(s.kv_len) } else { s.kv_len };
                let mut max = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let kj = &k[(b * s.kv_len + j) * width + h * d..][..d];
                    *pj = qi.iter().zip(kj).map(|(a, c)| (*a as f64) * (*c as f64)).sum::<f64>() * scale as f64;
                    max = max.max(*pj);
                }
                let mut sum = 0.0;
                for pj in p.iter_mut().take(visible) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[(b * s.q_len + i) * width + h * d..][..d];
                for (j, pj) in p.iter().enumerate().take(visible) {
                    let vj = &v[(b * s.kv_len + j) * width + h * d..][..d];
                    for (oe, ve) in o.iter_mut().zip(vj) {
                        *oe += (pj / sum * *ve as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_cpu_small_examples() {
        let s = AttnShape { batch: 1, q_len: 1, kv_len: 2, heads: 1, head_dim: 1, causal: false };
        // Equal scores: the mean of v.
        assert_eq!(attention_cpu(&[0.0], &[1.0, 2.0], &[10.0, 20.0], &s, 1.0), vec![15.0]);
        // Scores 0 and ln 3: weights 1/4, 3/4.
        let y = attention_cpu(&[1.0], &[0.0, 3f32.ln()], &[10.0, 20.0], &s, 1.0);
        assert!((y[0] - 17.5).abs() < 1e-5, "{y:?}");
        // Causal: the first query sees only the first key.
        let c = AttnShape { q_len: 2, causal: true, ..s };
        assert_eq!(attention_cpu(&[5.0, 5.0], &[1.0, 2.0], &[10.0, 20.0], &c, 1.0)[0], 10.0);
    }
}
