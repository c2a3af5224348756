//! Flash attention (kernels/attention.cu) at the SD1.5 shapes, bf16: forward, and forward + backward
//! where training needs it. Rates count the matmul FLOPs only: forward 4·b·h·Lq·Lk·d (half of it
//! when causal), forward + backward 3.5× that. benches/torch_attention.py times PyTorch's SDPA
//! (flash backend) at the same shapes.

use super::{time_gpu, BenchRow};
use crate::cuda::{ArenaKind::Scratch, Gpu};
use crate::ops::attention::{attention_backward, attention_forward, AttnShape, AttnWorkspace, Strided};
use crate::tensor::{DType, Tensor};
use anyhow::Result;

/// (shape, with backward) — the same list as benches/torch_attention.py.
pub fn shapes() -> Vec<(AttnShape, bool)> {
    let s = |batch, q_len, kv_len, heads, head_dim, causal| AttnShape { batch, q_len, kv_len, heads, head_dim, causal };
    vec![
        (s(1, 4096, 4096, 8, 40, false), true),
        (s(2, 4096, 4096, 8, 40, false), true),
        (s(1, 4096, 77, 8, 40, false), true),
        (s(1, 1024, 1024, 8, 80, false), true),
        (s(1, 1024, 77, 8, 80, false), true),
        (s(1, 256, 256, 8, 160, false), true),
        (s(1, 64, 64, 8, 160, false), true),
        (s(1, 256, 77, 8, 160, false), true),
        (s(1, 77, 77, 12, 64, true), false),
        (s(1, 4096, 4096, 1, 512, false), false),
    ]
}

pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (s, with_backward) in shapes() {
        let w = s.heads * s.head_dim;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let tq = |len: usize| -> Result<Tensor> {
            let t = Tensor::from_vec(&[s.batch, len, w], crate::rng::Rng::new(len as u64).normal_vec(s.batch * len * w, 1.0))?;
            t.to_gpu(gpu, Scratch, DType::BF16)
        };
        let (q, k, v, dout) = (tq(s.q_len)?, tq(s.kv_len)?, tq(s.kv_len)?, tq(s.q_len)?);
        let out = Tensor::empty_gpu(gpu, Scratch, &[s.batch, s.q_len, w], DType::BF16)?;
        let (dq, dk, dv) = (Tensor::empty_gpu(gpu, Scratch, q.shape(), DType::BF16)?, Tensor::empty_gpu(gpu, Scratch, k.shape(), DType::BF16)?, Tensor::empty_gpu(gpu, Scratch, v.shape(), DType::BF16)?);
        let lse = Tensor::empty_gpu(gpu, Scratch, &[s.batch, s.heads, s.q_len], DType::F32)?;
        let d = Strided::dense;
        let fwd = || attention_forward(gpu, d(&q), d(&k), d(&v), d(&out), Some(&lse), &s, scale);
        let flops = 4.0 * (s.batch * s.heads * s.q_len * s.kv_len * s.head_dim) as f64 * if s.causal { 0.5 } else { 1.0 };
        let desc = format!("b{} {}x{} h{} d{}{}", s.batch, s.q_len, s.kv_len, s.heads, s.head_dim, if s.causal { " causal" } else { "" });
        let t = time_gpu(gpu, 10, 100, fwd)?;
        rows.push(BenchRow { kernel: "attn_fwd".into(), shape: desc.clone(), rate: flops / t.median_ms / 1e9, unit: "TFLOP/s", timing: t });
        if with_backward {
            let ws = AttnWorkspace::new(gpu, Scratch, &s)?;
            let t = time_gpu(gpu, 10, 100, || {
                fwd()?;
                attention_backward(gpu, d(&q), d(&k), d(&v), d(&out), d(&dout), &lse, d(&dq), d(&dk), d(&dv), &ws, &s, scale)
            })?;
            rows.push(BenchRow { kernel: "attn_fwd_bwd".into(), shape: desc, rate: 3.5 * flops / t.median_ms / 1e9, unit: "TFLOP/s", timing: t });
        }
    }
    Ok(rows)
}
