//! The parameter-free functions between layers (torch.nn.functional's role in diffusers), each
//! with its backward where training needs one, on the CPU twins or the GPU kernels.

use super::layers::{cpu, rows, with_last, Dev};
use crate::cuda::ArenaKind;
use crate::ops::{activation, attention as attn, diffusion, elementwise as ew, layout};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

pub fn silu(dev: Dev, x: &Tensor) -> Result<Tensor> {
    match dev {
        Dev::Cpu => Tensor::from_vec(x.shape(), ew::silu_cpu(cpu(x)?)),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, x.shape())?;
            ew::silu(g, x, &mut y)?;
            Ok(y)
        }
    }
}

pub fn add(dev: Dev, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    match dev {
        Dev::Cpu => Tensor::from_vec(a.shape(), ew::add_cpu(cpu(a)?, cpu(b)?)),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, a.shape())?;
            ew::add(g, a, b, &mut y)?;
            Ok(y)
        }
    }
}

/// y[n, .., c] = x[n, .., c] + e[n, c]: a per-sample channel bias (the resnets' time embedding).
pub fn add_channel_bias(dev: Dev, x: &Tensor, e: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.shape()[0], *x.shape().last().unwrap());
    ensure!(e.shape() == [n, c], "add_channel_bias: bias {:?} is not [{n}, {c}]", e.shape());
    match dev {
        Dev::Cpu => Tensor::from_vec(x.shape(), ew::add_channel_bias_cpu(cpu(x)?, cpu(e)?, n, c)),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, x.shape())?;
            ew::add_channel_bias(g, x, e, &mut y)?;
            Ok(y)
        }
    }
}

/// Self or cross attention over [n, l, heads·d] projections. Returns the output and, on the GPU,
/// the per-row logsumexp the backward needs.
pub fn attention(dev: Dev, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<(Tensor, Option<Tensor>)> {
    let (s, scale) = attn_shape(q, k, heads)?;
    match dev {
        Dev::Cpu => Ok((Tensor::from_vec(q.shape(), attn::attention_cpu(cpu(q)?, cpu(k)?, cpu(v)?, &s, scale))?, None)),
        Dev::Gpu(g) => {
            let mut o = Dev::scratch(g, q.shape())?;
            let lse = Tensor::empty_gpu(g, ArenaKind::Scratch, &[s.batch, s.heads, s.q_len], DType::F32)?;
            let d = attn::Strided::dense;
            attn::attention_forward(g, d(q), d(k), d(v), d(&o), Some(&lse), &s, scale)?;
            o = o.reshape(q.shape())?;
            Ok((o, Some(lse)))
        }
    }
}

/// (dq, dk, dv) of [`attention`], given its output `o` and logsumexp.
pub fn attention_backward(dev: Dev, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: Option<&Tensor>, dout: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (s, scale) = attn_shape(q, k, heads)?;
    match (dev, lse) {
        (Dev::Cpu, _) => {
            let (dq, dk, dv) = attn::attention_backward_cpu(cpu(q)?, cpu(k)?, cpu(v)?, cpu(dout)?, &s, scale);
            Ok((Tensor::from_vec(q.shape(), dq)?, Tensor::from_vec(k.shape(), dk)?, Tensor::from_vec(v.shape(), dv)?))
        }
        (Dev::Gpu(g), Some(lse)) => {
            let (dq, dk, dv) = (Dev::scratch(g, q.shape())?, Dev::scratch(g, k.shape())?, Dev::scratch(g, v.shape())?);
            let ws = attn::AttnWorkspace::new(g, ArenaKind::Scratch, &s)?;
            let d = attn::Strided::dense;
            attn::attention_backward(g, d(q), d(k), d(v), d(o), d(dout), lse, d(&dq), d(&dk), d(&dv), &ws, &s, scale)?;
            Ok((dq, dk, dv))
        }
        (Dev::Gpu(_), None) => anyhow::bail!("attention backward: no logsumexp from a GPU forward"),
    }
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
pub fn geglu(dev: Dev, h: &Tensor) -> Result<Tensor> {
    let d = h.shape().last().unwrap() / 2;
    let shape = with_last(h.shape(), d);
    match dev {
        Dev::Cpu => Tensor::from_vec(&shape, activation::geglu_cpu(cpu(h)?, rows(h), d)),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, &shape)?;
            activation::geglu(g, h, &mut y)?;
            Ok(y)
        }
    }
}

pub fn geglu_backward(dev: Dev, h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let d = h.shape().last().unwrap() / 2;
    match dev {
        Dev::Cpu => Tensor::from_vec(h.shape(), activation::geglu_backward_cpu(cpu(h)?, rows(h), d, cpu(dy)?)),
        Dev::Gpu(g) => {
            let mut dh = Dev::scratch(g, h.shape())?;
            activation::geglu_backward(g, h, dy, &mut dh)?;
            Ok(dh)
        }
    }
}

pub fn upsample2x(dev: Dev, x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let shape = [s[0], 2 * s[1], 2 * s[2], s[3]];
    match dev {
        Dev::Cpu => Tensor::from_vec(&shape, layout::upsample_nearest2x_cpu(cpu(x)?, s[0], s[1], s[2], s[3])),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, &shape)?;
            layout::upsample_nearest2x(g, x, &mut y)?;
            Ok(y)
        }
    }
}

pub fn upsample2x_backward(dev: Dev, dy: &Tensor) -> Result<Tensor> {
    let s = dy.shape();
    let shape = [s[0], s[1] / 2, s[2] / 2, s[3]];
    match dev {
        Dev::Cpu => Tensor::from_vec(&shape, layout::upsample_nearest2x_backward_cpu(cpu(dy)?, s[0], shape[1], shape[2], s[3])),
        Dev::Gpu(g) => {
            let mut dx = Dev::scratch(g, &shape)?;
            layout::upsample_nearest2x_backward(g, dy, &mut dx)?;
            Ok(dx)
        }
    }
}

/// [.., ca] | [.., cb] along channels (diffusers' torch.cat([h, skip], dim=1)).
pub fn concat_channels(dev: Dev, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ca, cb) = (*a.shape().last().unwrap(), *b.shape().last().unwrap());
    ensure!(rows(a) == rows(b), "concat: {:?} and {:?} have different pixels", a.shape(), b.shape());
    let shape = with_last(a.shape(), ca + cb);
    match dev {
        Dev::Cpu => Tensor::from_vec(&shape, layout::concat_channels_cpu(cpu(a)?, cpu(b)?, ca, cb)),
        Dev::Gpu(g) => {
            let mut y = Dev::scratch(g, &shape)?;
            layout::concat_channels(g, a, b, &mut y)?;
            Ok(y)
        }
    }
}

/// Inverse of [`concat_channels`]: the first `ca` channels and the rest.
pub fn split_channels(dev: Dev, x: &Tensor, ca: usize) -> Result<(Tensor, Tensor)> {
    let c = *x.shape().last().unwrap();
    ensure!(ca < c, "split: {ca} channels of {c}");
    let (sa, sb) = (with_last(x.shape(), ca), with_last(x.shape(), c - ca));
    match dev {
        Dev::Cpu => {
            let (a, b) = layout::split_channels_cpu(cpu(x)?, ca, c - ca);
            Ok((Tensor::from_vec(&sa, a)?, Tensor::from_vec(&sb, b)?))
        }
        Dev::Gpu(g) => {
            let (mut a, mut b) = (Dev::scratch(g, &sa)?, Dev::scratch(g, &sb)?);
            layout::split_channels(g, x, &mut a, &mut b)?;
            Ok((a, b))
        }
    }
}

/// diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0):
/// [cos(t·f_i) | sin(t·f_i)], f_i = 10000^(−i/half). Timesteps may be fractional (Euler samplers).
/// `timesteps` is f32 [n] on the model's device (read on the GPU: no host round trip, so a step
/// can be captured in a CUDA graph).
pub fn timestep_embedding(dev: Dev, timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let n = timesteps.numel();
    match dev {
        Dev::Cpu => Tensor::from_vec(&[n, dim], diffusion::timestep_embedding_cpu(timesteps.data()?, dim, 10000.0, 0.0, true)),
        Dev::Gpu(g) => {
            let mut emb = Dev::scratch(g, &[n, dim])?;
            diffusion::timestep_embedding(g, timesteps, 10000.0, 0.0, true, &mut emb)?;
            Ok(emb)
        }
    }
}
