//! The layers the models are built from (diffusers' nn.Linear / LoRA-wrapped Linear, nn.Conv2d,
//! nn.GroupNorm, nn.LayerNorm) and the parameter-free functions between them, each with its
//! forward and its input-gradient backward. Frozen weights get no gradients; only LoRA factors do.
//!
//! Every function takes a [`Dev`]: on `Dev::Cpu` it runs the f32 CPU twins from `crate::ops`,
//! which is how the models are checked against diffusers in CI.

use crate::checkpoint::LoraLayer;
use crate::model::weights::Weights;
use crate::ops::{activation, attention as attn, conv, elementwise as ew, gemm, layout, lora, norm};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// Where a model runs.
#[derive(Clone, Copy)]
pub enum Dev {
    Cpu,
}

fn cpu(t: &Tensor) -> Result<&[f32]> {
    t.data()
}

/// Rows of a token or pixel tensor: every dimension but the last.
fn rows(t: &Tensor) -> usize {
    t.numel() / t.shape().last().copied().unwrap_or(1)
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    *s.last_mut().unwrap() = last;
    s
}

/// Trainable low-rank adapter of one Linear: Δy = scale·(x·Aᵀ)·Bᵀ, PEFT's `lora_A`/`lora_B`.
pub struct LoraAdapter {
    pub layer: LoraLayer,
    pub grad_a: Vec<f32>,
    pub grad_b: Vec<f32>,
}

/// nn.Linear with weight [out, in] (or a 1×1 conv seen as one), optionally LoRA-wrapped.
pub struct Linear {
    pub in_f: usize,
    pub out_f: usize,
    w: Tensor,
    b: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`); `as_conv1x1` for 1×1 conv weights.
    pub fn load(w: &Weights, prefix: &str, in_f: usize, out_f: usize, bias: bool, as_conv1x1: bool) -> Result<Linear> {
        let shape: Vec<usize> = if as_conv1x1 { vec![out_f, in_f, 1, 1] } else { vec![out_f, in_f] };
        let weight = Tensor::from_vec(&[out_f, in_f], w.vec(&format!("{prefix}.weight"), &shape)?)?;
        let b = if bias { Some(w.tensor(&format!("{prefix}.bias"), &[out_f])?) } else { None };
        Ok(Linear { in_f, out_f, w: weight, b, lora: None })
    }

    /// y = x·Wᵀ + b (+ LoRA) over the rows of x [.., in].
    pub fn forward(&self, _dev: Dev, x: &Tensor) -> Result<Tensor> {
        ensure!(x.shape().last() == Some(&self.in_f), "linear: input {:?} does not end in {}", x.shape(), self.in_f);
        let m = rows(x);
        let bias = self.b.as_ref().map(|b| b.data()).transpose()?;
        let y = match &self.lora {
            None => gemm::linear_cpu(cpu(x)?, m, self.in_f, cpu(&self.w)?, self.out_f, bias),
            Some(l) => {
                let s = lora::LoraShape { m, in_f: self.in_f, out_f: self.out_f, rank: l.layer.rank };
                lora::lora_forward_cpu(cpu(x)?, cpu(&self.w)?, bias, &l.layer.a, &l.layer.b, l.layer.scale(), &s)
            }
        };
        Tensor::from_vec(&with_last(x.shape(), self.out_f), y)
    }

    /// dx of a layer without LoRA (frozen: no gradient but the input's).
    pub fn backward_input(&self, _dev: Dev, dy: &Tensor) -> Result<Tensor> {
        ensure!(self.lora.is_none(), "backward_input on a LoRA-adapted linear: use backward");
        let dx = gemm::linear_input_grad_cpu(cpu(dy)?, rows(dy), self.out_f, cpu(&self.w)?, self.in_f);
        Tensor::from_vec(&with_last(dy.shape(), self.in_f), dx)
    }

    /// Accumulates LoRA gradients (when adapted; `x` is the forward's input) and returns dx when `want_dx`.
    pub fn backward(&mut self, _dev: Dev, x: &Tensor, dy: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let m = rows(dy);
        let dx = match &mut self.lora {
            None if want_dx => Some(gemm::linear_input_grad_cpu(cpu(dy)?, m, self.out_f, cpu(&self.w)?, self.in_f)),
            None => None,
            Some(l) => {
                let s = lora::LoraShape { m, in_f: self.in_f, out_f: self.out_f, rank: l.layer.rank };
                let g = lora::lora_backward_cpu(cpu(x)?, cpu(&self.w)?, &l.layer.a, &l.layer.b, l.layer.scale(), cpu(dy)?, &s);
                l.grad_a.iter_mut().zip(&g.da).for_each(|(acc, v)| *acc += v);
                l.grad_b.iter_mut().zip(&g.db).for_each(|(acc, v)| *acc += v);
                want_dx.then_some(g.dx)
            }
        };
        dx.map(|v| Tensor::from_vec(&with_last(dy.shape(), self.in_f), v)).transpose()
    }
}

/// nn.Conv2d on NHWC activations, weights reordered to [out, k, k, in] at load.
pub struct Conv2d {
    pub in_ch: usize,
    pub out_ch: usize,
    kernel: usize,
    stride: usize,
    w: Tensor,
    b: Tensor,
}

impl Conv2d {
    pub fn load(w: &Weights, prefix: &str, in_ch: usize, out_ch: usize, kernel: usize, stride: usize) -> Result<Conv2d> {
        let weight = Tensor::from_vec(&[out_ch, kernel, kernel, in_ch], w.conv_ohwi(&format!("{prefix}.weight"), out_ch, in_ch, kernel)?)?;
        Ok(Conv2d { in_ch, out_ch, kernel, stride, w: weight, b: w.tensor(&format!("{prefix}.bias"), &[out_ch])? })
    }

    fn geometry(&self, x_shape: &[usize]) -> Result<conv::Conv2dShape> {
        ensure!(x_shape.len() == 4 && x_shape[3] == self.in_ch, "conv2d: input {x_shape:?} is not NHWC with {} channels", self.in_ch);
        Ok(conv::Conv2dShape {
            batch: x_shape[0],
            height: x_shape[1],
            width: x_shape[2],
            in_ch: self.in_ch,
            out_ch: self.out_ch,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.kernel / 2,
        })
    }

    pub fn forward(&self, _dev: Dev, x: &Tensor) -> Result<Tensor> {
        let s = self.geometry(x.shape())?;
        let (oh, ow) = s.out_hw();
        Tensor::from_vec(&[s.batch, oh, ow, s.out_ch], conv::conv2d_cpu(cpu(x)?, &s, cpu(&self.w)?, Some(cpu(&self.b)?)))
    }

    /// dx for an input of shape `x_shape`.
    pub fn backward(&self, _dev: Dev, x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
        let s = self.geometry(x_shape)?;
        Tensor::from_vec(x_shape, conv::conv2d_backward_input_cpu(cpu(dy)?, &s, cpu(&self.w)?))
    }
}

/// nn.GroupNorm over NHWC [n, h, w, c] (or tokens [n, l, c]), optionally followed by SiLU.
pub struct GroupNorm {
    groups: usize,
    eps: f32,
    gamma: Tensor,
    beta: Tensor,
}

impl GroupNorm {
    pub fn load(w: &Weights, prefix: &str, channels: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        ensure!(channels % groups == 0, "{prefix}: {channels} channels do not split into {groups} groups");
        Ok(GroupNorm {
            groups,
            eps,
            gamma: w.tensor(&format!("{prefix}.weight"), &[channels])?,
            beta: w.tensor(&format!("{prefix}.bias"), &[channels])?,
        })
    }

    fn dims(x: &Tensor) -> (usize, usize, usize) {
        let s = x.shape();
        (s[0], x.numel() / s[0] / s[s.len() - 1], s[s.len() - 1])
    }

    pub fn forward(&self, dev: Dev, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (n, hw, c) = Self::dims(x);
        let y = norm::group_norm_cpu(cpu(x)?, n, hw, c, self.groups, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps);
        let y = Tensor::from_vec(x.shape(), y)?;
        if silu {
            self::silu(dev, &y)
        } else {
            Ok(y)
        }
    }

    pub fn backward(&self, _dev: Dev, x: &Tensor, dy: &Tensor, silu: bool) -> Result<Tensor> {
        let (n, hw, c) = Self::dims(x);
        let dx = norm::group_norm_backward_cpu(cpu(x)?, n, hw, c, self.groups, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps, silu, cpu(dy)?);
        Tensor::from_vec(x.shape(), dx)
    }
}

/// nn.LayerNorm over the last dimension.
pub struct LayerNorm {
    eps: f32,
    gamma: Tensor,
    beta: Tensor,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, channels: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { eps, gamma: w.tensor(&format!("{prefix}.weight"), &[channels])?, beta: w.tensor(&format!("{prefix}.bias"), &[channels])? })
    }

    pub fn forward(&self, _dev: Dev, x: &Tensor) -> Result<Tensor> {
        let c = *x.shape().last().unwrap();
        Tensor::from_vec(x.shape(), norm::layer_norm_cpu(cpu(x)?, rows(x), c, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps))
    }

    pub fn backward(&self, _dev: Dev, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let c = *x.shape().last().unwrap();
        Tensor::from_vec(x.shape(), norm::layer_norm_backward_cpu(cpu(x)?, rows(x), c, cpu(&self.gamma)?, self.eps, cpu(dy)?))
    }
}

pub fn silu(_dev: Dev, x: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(x.shape(), ew::silu_cpu(cpu(x)?))
}

pub fn add(_dev: Dev, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    Tensor::from_vec(a.shape(), ew::add_cpu(cpu(a)?, cpu(b)?))
}

/// y[n, .., c] = x[n, .., c] + e[n, c]: a per-sample channel bias (the resnets' time embedding).
pub fn add_channel_bias(_dev: Dev, x: &Tensor, e: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.shape()[0], *x.shape().last().unwrap());
    ensure!(e.shape() == [n, c], "add_channel_bias: bias {:?} is not [{n}, {c}]", e.shape());
    let per_sample = x.numel() / n;
    let (xs, es) = (cpu(x)?, cpu(e)?);
    let y = xs.iter().enumerate().map(|(i, v)| v + es[(i / per_sample) * c + i % c]).collect();
    Tensor::from_vec(x.shape(), y)
}

/// Self or cross attention over [n, l, heads·d] projections; (q_len, kv_len) from q and k.
pub fn attention(_dev: Dev, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (s, scale) = attn_shape(q, k, heads)?;
    Tensor::from_vec(q.shape(), attn::attention_cpu(cpu(q)?, cpu(k)?, cpu(v)?, &s, scale))
}

/// (dq, dk, dv) of [`attention`].
pub fn attention_backward(_dev: Dev, q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (s, scale) = attn_shape(q, k, heads)?;
    let (dq, dk, dv) = attn::attention_backward_cpu(cpu(q)?, cpu(k)?, cpu(v)?, cpu(dout)?, &s, scale);
    Ok((Tensor::from_vec(q.shape(), dq)?, Tensor::from_vec(k.shape(), dk)?, Tensor::from_vec(v.shape(), dv)?))
}

fn attn_shape(q: &Tensor, k: &Tensor, heads: usize) -> Result<(attn::AttnShape, f32)> {
    let (qs, ks) = (q.shape(), k.shape());
    ensure!(qs.len() == 3 && ks.len() == 3 && qs[0] == ks[0] && qs[2] == ks[2], "attention: q {qs:?} and k {ks:?} do not match");
    ensure!(qs[2] % heads == 0, "attention: width {} is not a multiple of {heads} heads", qs[2]);
    let head_dim = qs[2] / heads;
    let s = attn::AttnShape { batch: qs[0], q_len: qs[1], kv_len: ks[1], heads, head_dim, causal: false };
    Ok((s, 1.0 / (head_dim as f32).sqrt()))
}

/// diffusers' GEGLU: h [.., 2d] = hidden | gate → hidden · gelu(gate) [.., d].
pub fn geglu(_dev: Dev, h: &Tensor) -> Result<Tensor> {
    let d = h.shape().last().unwrap() / 2;
    Tensor::from_vec(&with_last(h.shape(), d), activation::geglu_cpu(cpu(h)?, rows(h), d))
}

pub fn geglu_backward(_dev: Dev, h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let d = h.shape().last().unwrap() / 2;
    Tensor::from_vec(h.shape(), activation::geglu_backward_cpu(cpu(h)?, rows(h), d, cpu(dy)?))
}

pub fn upsample2x(_dev: Dev, x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    Tensor::from_vec(&[s[0], 2 * s[1], 2 * s[2], s[3]], layout::upsample_nearest2x_cpu(cpu(x)?, s[0], s[1], s[2], s[3]))
}

pub fn upsample2x_backward(_dev: Dev, dy: &Tensor) -> Result<Tensor> {
    let s = dy.shape();
    let (h, w) = (s[1] / 2, s[2] / 2);
    Tensor::from_vec(&[s[0], h, w, s[3]], layout::upsample_nearest2x_backward_cpu(cpu(dy)?, s[0], h, w, s[3]))
}

/// [.., ca] | [.., cb] along channels (diffusers' torch.cat([h, skip], dim=1)).
pub fn concat_channels(_dev: Dev, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ca, cb) = (*a.shape().last().unwrap(), *b.shape().last().unwrap());
    ensure!(rows(a) == rows(b), "concat: {:?} and {:?} have different pixels", a.shape(), b.shape());
    Tensor::from_vec(&with_last(a.shape(), ca + cb), layout::concat_channels_cpu(cpu(a)?, cpu(b)?, ca, cb))
}

/// Inverse of [`concat_channels`]: the first `ca` channels and the rest.
pub fn split_channels(_dev: Dev, x: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
    let c = *x.shape().last().unwrap();
    ensure!(ca < c, "split: {ca} channels of {c}");
    let (a, b) = layout::split_channels_cpu(cpu(x)?, ca, c - ca);
    Ok((Tensor::from_vec(&with_last(x.shape(), ca), a)?, Tensor::from_vec(&with_last(x.shape(), c - ca), b)?))
}

/// diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0):
/// [cos(t·f_i) | sin(t·f_i)] with f_i = exp(−ln(10000)·i/half).
pub fn timestep_embedding(_dev: Dev, timesteps: &[f32], dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let freqs = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp() * t);
        let args: Vec<f32> = freqs.collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(&[timesteps.len(), dim], out)
}
