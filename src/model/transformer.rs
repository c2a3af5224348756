//! diffusers' Transformer2DModel (use_linear_projection = False), BasicTransformerBlock, Attention
//! and FeedForward(GEGLU) (models/transformers/transformer_2d.py, models/attention.py), on token-major
//! activations [n, h·w, c] that share their memory layout with NHWC [n, h, w, c].
//!
//! What a Transformer2DModel keeps from its forward for its backward is its [`Keep`] setting: every
//! activation (the default), all but the feed-forward's hidden states (recomputed in the backward
//! by one LayerNorm and one GEMM), or only its input (the backward reruns the forward: activation
//! checkpointing). The memory plan (train::memory) chooses per transformer.

use super::functional::{attention, attention_backward, geglu, geglu_backward};
use super::layers::{finish_weight_grads, prepare_lora_backwards, Dev, GroupNorm, LayerNorm, Linear, NormStats};
use super::resnet::bytes;
use super::weights::Weights;
use crate::ops::lora::WeightGradBatch;
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// Multi-head attention: to_q / to_k / to_v (no bias) and to_out.0 (bias), any of them LoRA-adapted.
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    heads: usize,
}

/// What an Attention's backward needs: its inputs, q/k/v and the pre-projection output.
struct AttentionSaved {
    x: Tensor,
    context: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// Per-row logsumexp of the softmax (GPU forward only).
    lse: Option<Tensor>,
}

impl Attention {
    fn load(dev: Dev, w: &Weights, prefix: &str, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(Attention {
            to_q: Linear::load(dev, w, &p("to_q"), dim, dim, false, false)?,
            to_k: Linear::load(dev, w, &p("to_k"), context_dim, dim, false, false)?,
            to_v: Linear::load(dev, w, &p("to_v"), context_dim, dim, false, false)?,
            to_out: Linear::load(dev, w, &p("to_out.0"), dim, dim, true, false)?,
            heads,
        })
    }

    /// residual + attention(x, context) (the residual added in to_out's epilogue).
    fn forward(&self, dev: Dev, x: &Tensor, context: &Tensor, residual: &Tensor) -> Result<(Tensor, AttentionSaved)> {
        let [q, k, v]: [Tensor; 3] = Linear::forward_lora_group(dev, &[(&self.to_q, x), (&self.to_k, context), (&self.to_v, context)])?
            .try_into()
            .map_err(|_| anyhow::anyhow!("attention: expected q, k and v"))?;
        let (o, lse) = attention(dev, &q, &k, &v, self.heads)?;
        let y = self.to_out.forward_add(dev, &o, Some(residual))?;
        Ok((y, AttentionSaved { x: x.clone(), context: context.clone(), q, k, v, o, lse }))
    }

    /// dx; `self_attention` says whether k and v came from x (else from the frozen caption states,
    /// which need no gradient). The four projections' LoRA weight gradients are computed together
    /// at the end (one grouped launch on a Hopper).
    fn backward(&mut self, dev: Dev, s: &AttentionSaved, dy: &Tensor, self_attention: bool) -> Result<Tensor> {
        let mut grads = WeightGradBatch::default();
        let d_o = self.to_out.backward_queued(dev, &s.o, dy, true, None, &mut grads)?.context("to_out: no input gradient")?;
        let (dq, dk, dv) = attention_backward(dev, &s.q, &s.k, &s.v, &s.o, s.lse.as_ref(), &d_o, self.heads)?;
        prepare_lora_backwards(dev, &[(&self.to_q, &dq), (&self.to_k, &dk), (&self.to_v, &dv)])?;
        let dx_q = self.to_q.backward_queued(dev, &s.x, &dq, true, None, &mut grads)?.context("to_q: no input gradient")?;
        // When k and v came from x too, their input gradients are added to dx (on the GPU in the
        // GEMM epilogues); else they need none.
        let (want, into) = if self_attention { (true, Some(dx_q.clone())) } else { (false, None) };
        let into = self.to_k.backward_queued(dev, &s.context, &dk, want, into, &mut grads)?;
        let dx_kv = self.to_v.backward_queued(dev, &s.context, &dv, want, into, &mut grads)?;
        finish_weight_grads(dev, grads, &mut [&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out])?;
        Ok(match dx_kv {
            Some(dx) => dx,
            None => dx_q,
        })
    }

    /// The four projections with their diffusers names.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [("to_q", &mut self.to_q), ("to_k", &mut self.to_k), ("to_v", &mut self.to_v), ("to_out.0", &mut self.to_out)]
    }
}

/// LN → self-attention → +; LN → cross-attention → +; LN → GEGLU feed-forward → +.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    pub attn1: Attention,
    norm2: LayerNorm,
    pub attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

struct BlockSaved {
    t0: Tensor,
    t1: Tensor,
    t2: Tensor,
    /// Statistics of norm1, norm2, norm3.
    stats: [NormStats; 3],
    attn1: AttentionSaved,
    attn2: AttentionSaved,
    /// The feed-forward's hidden states (GEGLU input, tokens × 8c), unless the backward recomputes them.
    ff_hidden: Option<Tensor>,
    /// Their size, kept or not.
    ff_hidden_bytes: usize,
}

impl BasicTransformerBlock {
    fn load(dev: Dev, w: &Weights, prefix: &str, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(dev, w, &p("norm1"), dim, 1e-5)?,
            attn1: Attention::load(dev, w, &p("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::load(dev, w, &p("norm2"), dim, 1e-5)?,
            attn2: Attention::load(dev, w, &p("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::load(dev, w, &p("norm3"), dim, 1e-5)?,
            ff_proj: Linear::load(dev, w, &p("ff.net.0.proj"), dim, 8 * dim, true, false)?,
            ff_out: Linear::load(dev, w, &p("ff.net.2"), 4 * dim, dim, true, false)?,
        })
    }

    /// `keep_ff`: keep the feed-forward's hidden states for the backward (else it recomputes them).
    fn forward(&self, dev: Dev, t0: &Tensor, context: &Tensor, keep_ff: bool) -> Result<(Tensor, BlockSaved)> {
        let (n1, s1) = self.norm1.forward(dev, t0)?;
        let (t1, attn1) = self.attn1.forward(dev, &n1, &n1, t0)?;
        let (n2, s2) = self.norm2.forward(dev, &t1)?;
        let (t2, attn2) = self.attn2.forward(dev, &n2, context, &t1)?;
        let (n3, s3) = self.norm3.forward(dev, &t2)?;
        let ff_hidden = self.ff_proj.forward(dev, &n3)?;
        let t3 = self.ff_out.forward_add(dev, &geglu(dev, &ff_hidden)?, Some(&t2))?;
        let ff_hidden_bytes = bytes(&ff_hidden);
        let ff_hidden = keep_ff.then_some(ff_hidden);
        Ok((t3, BlockSaved { t0: t0.clone(), t1, t2, stats: [s1, s2, s3], attn1, attn2, ff_hidden, ff_hidden_bytes }))
    }

    fn backward(&mut self, dev: Dev, s: &BlockSaved, dt3: &Tensor) -> Result<Tensor> {
        let ff_hidden = match &s.ff_hidden {
            Some(h) => h.clone(),
            None => self.ff_proj.forward(dev, &self.norm3.forward(dev, &s.t2)?.0)?,
        };
        let d_act = self.ff_out.backward_input(dev, dt3)?;
        let d_hidden = geglu_backward(dev, &ff_hidden, &d_act)?;
        let dn3 = self.ff_proj.backward_input(dev, &d_hidden)?;
        // Each residual branch's gradient is added inside the LayerNorm backward.
        let dt2 = self.norm3.backward(dev, &s.t2, &s.stats[2], &dn3, Some(dt3))?;
        let dn2 = self.attn2.backward(dev, &s.attn2, &dt2, false)?;
        let dt1 = self.norm2.backward(dev, &s.t1, &s.stats[1], &dn2, Some(&dt2))?;
        let dn1 = self.attn1.backward(dev, &s.attn1, &dt1, true)?;
        self.norm1.backward(dev, &s.t0, &s.stats[0], &dn1, Some(&dt1))
    }
}

/// What a [`Transformer2DModel`] keeps from its forward for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every activation the backward needs.
    All,
    /// All but the feed-forward's hidden states (tokens × 8c bf16, the largest single activation),
    /// which the backward recomputes from the saved input of norm3: one LayerNorm and one GEMM.
    AllButFeedForward,
    /// Only the input: the backward reruns the whole forward (activation checkpointing).
    Input,
}

/// GN → proj_in (1×1) → BasicTransformerBlock → proj_out (1×1) → + input.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    pub block: BasicTransformerBlock,
    proj_out: Linear,
    pub keep: Keep,
    /// Bytes of the activations a backward needs beyond the input, feed-forward hidden states
    /// included (measured at the last forward or recompute): what `Keep::Input` saves.
    pub activation_bytes: usize,
    /// Of those, the feed-forward hidden states: what `Keep::AllButFeedForward` saves.
    pub ff_hidden_bytes: usize,
    /// Forward FLOPs of the last input: what `Keep::Input` costs (run again in the backward).
    pub forward_flops: f64,
    /// FLOPs of the feed-forward's first GEMM: what `Keep::AllButFeedForward` costs.
    pub ff_flops: f64,
    input: Option<(Tensor, Tensor)>,
    saved: Option<(NormStats, BlockSaved)>,
}

impl Transformer2DModel {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, ch: usize, context_dim: usize, heads: usize, groups: usize) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        (|| -> Result<Self> {
            Ok(Transformer2DModel {
                norm: GroupNorm::load(dev, w, &p("norm"), ch, groups, 1e-6)?,
                proj_in: Linear::load(dev, w, &p("proj_in"), ch, ch, true, true)?,
                block: BasicTransformerBlock::load(dev, w, &p("transformer_blocks.0"), ch, context_dim, heads)?,
                proj_out: Linear::load(dev, w, &p("proj_out"), ch, ch, true, true)?,
                keep: Keep::All,
                activation_bytes: 0,
                ff_hidden_bytes: 0,
                forward_flops: 0.0,
                ff_flops: 0.0,
                input: None,
                saved: None,
            })
        })()
        .with_context(|| format!("loading {prefix}"))
    }

    /// x NHWC [n, h, w, c]; context [n, 77, context_dim].
    pub fn forward(&mut self, dev: Dev, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (out, saved) = self.run(dev, x, context, self.keep == Keep::All)?;
        self.note_sizes(&saved.1);
        // Linears 20·c² per token (proj_in/out 2, attn1 4, attn2 q/o 2, GEGLU 8 + 4), self-attention 4·L·c.
        let (tokens, c) = ((x.numel() / x.shape()[3]) as f64, x.shape()[3] as f64);
        self.forward_flops = 2.0 * tokens * 20.0 * c * c + 4.0 * tokens * (x.shape()[1] * x.shape()[2]) as f64 * c;
        self.ff_flops = 2.0 * tokens * 8.0 * c * c;
        self.input = Some((x.clone(), context.clone()));
        self.saved = if self.keep == Keep::Input { None } else { Some(saved) };
        Ok(out)
    }

    fn note_sizes(&mut self, saved: &BlockSaved) {
        self.ff_hidden_bytes = saved.ff_hidden_bytes;
        self.activation_bytes = block_saved_bytes(saved) + if saved.ff_hidden.is_some() { 0 } else { saved.ff_hidden_bytes };
    }

    fn run(&self, dev: Dev, x: &Tensor, context: &Tensor, keep_ff: bool) -> Result<(Tensor, (NormStats, BlockSaved))> {
        let s = x.shape();
        let (g, stats) = self.norm.forward(dev, x, false)?;
        let tokens = self.proj_in.forward(dev, &g)?.reshape(&[s[0], s[1] * s[2], s[3]])?;
        let (t, saved) = self.block.forward(dev, &tokens, context, keep_ff)?;
        let out = self.proj_out.forward_add(dev, &t, Some(&x.reshape(t.shape())?))?.reshape(s)?;
        Ok((out, (stats, saved)))
    }

    pub fn backward(&mut self, dev: Dev, dy: &Tensor) -> Result<Tensor> {
        let (x, context) = self.input.take().context("Transformer2DModel backward without a forward")?;
        let (stats, saved) = match self.saved.take() {
            Some(s) => s,
            None => {
                let recomputed = self.run(dev, &x, &context, true)?.1;
                self.note_sizes(&recomputed.1);
                recomputed
            }
        };
        let s = x.shape();
        let dt = self.proj_out.backward_input(dev, &dy.reshape(&[s[0], s[1] * s[2], s[3]])?)?;
        let dt0 = self.block.backward(dev, &saved, &dt)?;
        let dg = self.proj_in.backward_input(dev, &dt0)?.reshape(s)?;
        self.norm.backward(dev, &x, &stats, &dg, false, Some(dy))
    }

    /// Drops what the forward kept for the backward (inference).
    pub fn forget(&mut self) {
        self.input = None;
        self.saved = None;
        for attn in [&mut self.block.attn1, &mut self.block.attn2] {
            attn.projections_mut().iter().for_each(|(_, linear)| linear.forget());
        }
    }

    /// Bytes kept between forward and backward (the input alone with `Keep::Input`).
    pub fn saved_bytes(&self) -> usize {
        let input = self.input.as_ref().map_or(0, |(x, _)| bytes(x));
        input + self.saved.as_ref().map_or(0, |(_, s)| block_saved_bytes(s))
    }
}

fn block_saved_bytes(s: &BlockSaved) -> usize {
    let a = |a: &AttentionSaved| bytes(&a.x) + bytes(&a.q) + bytes(&a.k) + bytes(&a.v) + bytes(&a.o);
    bytes(&s.t0) + bytes(&s.t1) + bytes(&s.t2) + a(&s.attn1) + a(&s.attn2) + s.ff_hidden.as_ref().map_or(0, bytes)
}
