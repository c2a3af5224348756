//! diffusers' ResnetBlock2D, Downsample2D and Upsample2D (models/resnet.py, models/downsampling.py,
//! models/upsampling.py) on NHWC activations, forward and input-gradient backward.

use super::functional::{add_channel_bias, upsample2x, upsample2x_backward};
use super::layers::{Conv2d, Dev, GroupNorm, Linear, NormStats};
use super::weights::Weights;
use crate::tensor::Tensor;
use anyhow::{Context, Result};

struct ResnetSaved {
    x: Tensor,
    h1: Tensor,
    stats1: NormStats,
    stats2: NormStats,
}

/// A resnet's time input (see [`ResnetBlock2D::forward`]).
#[derive(Clone, Copy)]
pub enum Time<'a> {
    /// time_emb_proj(SiLU(temb)) [n, out_ch].
    Projected(&'a Tensor),
    /// time_emb_proj(SiLU(temb)) + conv1's bias, one sample: [1, out_ch].
    WithConvBias(&'a Tensor),
}

/// GN → SiLU → conv1 → + time_emb_proj(SiLU(temb)) → GN → SiLU → conv2, plus the (1×1-conv) shortcut.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    /// What the backward needs: the input, conv1's output + time embedding, and both norms' statistics.
    saved: Option<ResnetSaved>,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(dev: Dev, w: &Weights, prefix: &str, in_ch: usize, out_ch: usize, temb_ch: usize, groups: usize, eps: f32) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        (|| -> Result<Self> {
            Ok(ResnetBlock2D {
                norm1: GroupNorm::load(dev, w, &p("norm1"), in_ch, groups, eps)?,
                conv1: Conv2d::load(dev, w, &p("conv1"), in_ch, out_ch, 3, 1)?,
                time_emb_proj: Linear::load(dev, w, &p("time_emb_proj"), temb_ch, out_ch, true, false)?,
                norm2: GroupNorm::load(dev, w, &p("norm2"), out_ch, groups, eps)?,
                conv2: Conv2d::load(dev, w, &p("conv2"), out_ch, out_ch, 3, 1)?,
                conv_shortcut: if in_ch != out_ch { Some(Conv2d::load(dev, w, &p("conv_shortcut"), in_ch, out_ch, 1, 1)?) } else { None },
                saved: None,
            })
        })()
        .with_context(|| format!("loading {prefix}"))
    }

    /// The projection of SiLU(time embedding) [n, temb_ch] (shared by every resnet) to this
    /// block's channels, and conv1's bias: the caller runs all the resnets' projections together
    /// (`Linear::forward_many`), for one sample with conv1's bias added in.
    pub fn time_emb_proj(&self) -> (&Linear, &Tensor) {
        (&self.time_emb_proj, self.conv1.bias())
    }

    /// `time` = time_emb_proj(SiLU(time embedding)) [n, out_ch], or (`Time::WithConvBias`, one
    /// sample) that plus conv1's bias, which conv1 then takes as its bias: no separate add.
    pub fn forward(&mut self, dev: Dev<'_>, x: &Tensor, time: Time) -> Result<Tensor> {
        let (g1, stats1) = self.norm1.forward(dev, x, true)?;
        let h1 = match time {
            Time::Projected(t) => add_channel_bias(dev, &self.conv1.forward(dev, &g1)?, t)?,
            Time::WithConvBias(t) => self.conv1.forward_biased(dev, &g1, t, None)?,
        };
        let (g2, stats2) = self.norm2.forward(dev, &h1, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(dev, x)?,
            None => x.clone(),
        };
        let out = self.conv2.forward_add(dev, &g2, Some(&shortcut))?;
        self.saved = Some(ResnetSaved { x: x.clone(), h1, stats1, stats2 });
        Ok(out)
    }

    pub fn backward(&mut self, dev: Dev<'_>, dy: &Tensor) -> Result<Tensor> {
        let ResnetSaved { x, h1, stats1, stats2 } = self.saved.take().context("ResnetBlock2D backward without a forward")?;
        let dg2 = self.conv2.backward(dev, h1.shape(), dy)?;
        let dh1 = self.norm2.backward(dev, &h1, &stats2, &dg2, true, None)?;
        let dg1 = self.conv1.backward(dev, x.shape(), &dh1)?;
        let d_short = match &self.conv_shortcut {
            Some(c) => c.backward(dev, x.shape(), dy)?,
            None => dy.clone(),
        };
        // The shortcut's gradient is added inside the GroupNorm backward.
        self.norm1.backward(dev, &x, &stats1, &dg1, true, Some(&d_short))
    }

    pub fn saved_bytes(&self) -> usize {
        self.saved.as_ref().map_or(0, |s| bytes(&s.x) + bytes(&s.h1))
    }

    /// Drops what the forward kept for the backward (inference).
    pub fn forget(&mut self) {
        self.saved = None;
    }
}

/// 3×3 stride-2 conv (padding 1).
pub struct Downsample2D {
    conv: Conv2d,
    input_shape: Vec<usize>,
}

impl Downsample2D {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, ch: usize) -> Result<Self> {
        Ok(Downsample2D { conv: Conv2d::load(dev, w, &format!("{prefix}.conv"), ch, ch, 3, 2)?, input_shape: vec![] })
    }
    pub fn forward(&mut self, dev: Dev<'_>, x: &Tensor) -> Result<Tensor> {
        self.input_shape = x.shape().to_vec();
        self.conv.forward(dev, x)
    }
    pub fn backward(&mut self, dev: Dev<'_>, dy: &Tensor) -> Result<Tensor> {
        self.conv.backward(dev, &self.input_shape, dy)
    }
}

/// Nearest 2× upsample, then a 3×3 conv.
pub struct Upsample2D {
    conv: Conv2d,
    upsampled_shape: Vec<usize>,
}

impl Upsample2D {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, ch: usize) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::load(dev, w, &format!("{prefix}.conv"), ch, ch, 3, 1)?, upsampled_shape: vec![] })
    }
    pub fn forward(&mut self, dev: Dev<'_>, x: &Tensor) -> Result<Tensor> {
        let up = upsample2x(dev, x)?;
        self.upsampled_shape = up.shape().to_vec();
        self.conv.forward(dev, &up)
    }
    pub fn backward(&mut self, dev: Dev<'_>, dy: &Tensor) -> Result<Tensor> {
        upsample2x_backward(dev, &self.conv.backward(dev, &self.upsampled_shape, dy)?)
    }
}

pub(crate) fn bytes(t: &Tensor) -> usize {
    t.numel() * t.dtype().size()
}
