//! SD1.5's models, named and structured as diffusers defines them (DESIGN.md §4): weight loading
//! from every supported source ([`weights`]), the CLIP text encoder ([`clip`]) and the VAE ([`vae`]).
//!
//! This file holds the frozen layers those models share, with their f32 CPU forward built on the CPU
//! twins in `crate::ops` (the GPU path will run the same layers on the kernels). Image-like
//! activations are NHWC, token activations `[rows, features]`.

pub mod clip;
pub mod vae;
pub mod weights;
pub mod functional;
pub mod layers;
pub mod lora;
pub mod resnet;
pub mod transformer;
pub mod unet;
#[cfg(test)]
mod unet_tests;

use crate::ops::conv::{conv2d_cpu, Conv2dShape};
use crate::ops::gemm::linear_cpu;
use crate::ops::norm::{group_norm_cpu, layer_norm_cpu};
use anyhow::{Context, Result};
use weights::Weights;

/// `nn.Linear`: weight `[out, in]` as PyTorch stores it, optional bias.
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: w.vec(&format!("{prefix}.weight"), &[out_features, in_features])?,
            bias: if bias { Some(w.vec(&format!("{prefix}.bias"), &[out_features])?) } else { None },
            in_features,
            out_features,
        })
    }

    /// y[rows × out] = x[rows × in]·Wᵀ + b.
    pub fn forward_cpu(&self, x: &[f32]) -> Vec<f32> {
        linear_cpu(x, x.len() / self.in_features, self.in_features, &self.weight, self.out_features, self.bias.as_deref())
    }
}

/// `nn.LayerNorm` over the last dimension.
pub struct LayerNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { gamma: w.vec(&format!("{prefix}.weight"), &[dim])?, beta: w.vec(&format!("{prefix}.bias"), &[dim])?, eps })
    }

    pub fn forward_cpu(&self, x: &[f32]) -> Vec<f32> {
        let c = self.gamma.len();
        layer_norm_cpu(x, x.len() / c, c, &self.gamma, &self.beta, self.eps)
    }
}

/// An NHWC activation on the CPU: `data` is `[n, h, w, c]`.
#[derive(Clone, Debug)]
pub struct Nhwc {
    pub data: Vec<f32>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn new(data: Vec<f32>, n: usize, h: usize, w: usize, c: usize) -> Nhwc {
        assert_eq!(data.len(), n * h * w * c, "Nhwc: {} values for {n}×{h}×{w}×{c}", data.len());
        Nhwc { data, n, h, w, c }
    }

    /// Same geometry, other values (e.g. after an elementwise op).
    pub fn with_data(&self, data: Vec<f32>) -> Nhwc {
        Nhwc::new(data, self.n, self.h, self.w, self.c)
    }

    /// From PyTorch's NCHW layout.
    pub fn from_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Nhwc {
        assert_eq!(x.len(), n * c * h * w);
        let mut out = vec![0f32; x.len()];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    out[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
                }
            }
        }
        Nhwc::new(out, n, h, w, c)
    }

    /// To PyTorch's NCHW layout.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (hw, c) = (self.h * self.w, self.c);
        let mut out = vec![0f32; self.data.len()];
        for b in 0..self.n {
            for p in 0..hw {
                for ch in 0..c {
                    out[(b * c + ch) * hw + p] = self.data[(b * hw + p) * c + ch];
                }
            }
        }
        out
    }
}

/// `nn.GroupNorm` on NHWC activations.
pub struct GroupNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(w: &Weights, prefix: &str, channels: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        Ok(GroupNorm {
            gamma: w.vec(&format!("{prefix}.weight"), &[channels])?,
            beta: w.vec(&format!("{prefix}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        x.with_data(group_norm_cpu(&x.data, x.n, x.h * x.w, x.c, self.groups, &self.gamma, &self.beta, self.eps))
    }
}

/// `nn.Conv2d` (square kernel, with bias), weight reordered at load to `[out, k, k, in]`.
pub struct Conv2d {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn load(w: &Weights, prefix: &str, in_ch: usize, out_ch: usize, kernel: usize, stride: usize, pad: usize) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: w.conv_ohwi(&format!("{prefix}.weight"), out_ch, in_ch, kernel).with_context(|| format!("loading {prefix}"))?,
            bias: w.vec(&format!("{prefix}.bias"), &[out_ch])?,
            in_ch,
            out_ch,
            kernel,
            stride,
            pad,
        })
    }

    pub fn shape(&self, x: &Nhwc) -> Conv2dShape {
        Conv2dShape {
            batch: x.n,
            height: x.h,
            width: x.w,
            in_ch: self.in_ch,
            out_ch: self.out_ch,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        }
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        assert_eq!(x.c, self.in_ch, "conv: input has {} channels, expected {}", x.c, self.in_ch);
        let s = self.shape(x);
        let (oh, ow) = s.out_hw();
        Nhwc::new(conv2d_cpu(&x.data, &s, &self.weight, Some(&self.bias)), x.n, oh, ow, self.out_ch)
    }
}

/// Reads an integer field of a model config.
pub(crate) fn cfg_usize(cfg: &serde_json::Value, key: &str) -> Result<usize> {
    cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as usize).with_context(|| format!("config has no integer {key:?}"))
}

/// Reads a list-of-integers field of a model config.
pub(crate) fn cfg_usize_list(cfg: &serde_json::Value, key: &str) -> Result<Vec<usize>> {
    let list = cfg.get(key).and_then(|v| v.as_array()).with_context(|| format!("config has no list {key:?}"))?;
    list.iter().map(|v| v.as_u64().map(|x| x as usize).with_context(|| format!("config {key:?}: not an integer list"))).collect()
}
