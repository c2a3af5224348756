//! diffusers' UNet2DConditionModel for the SD1.x family (models/unets/unet_2d_condition.py and
//! unet_2d_blocks.py: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
//! CrossAttnUpBlock2D), built from its config.json; forward and hand-written backward.
//!
//! Activations are NHWC. The backward computes input gradients through every frozen layer and
//! accumulates gradients only into the LoRA adapters; it stops before conv_in (nothing to learn there).

use super::functional::{add, concat_channels, silu, split_channels, timestep_embedding};
use super::layers::{Conv2d, Dev, GroupNorm, Linear, NormStats};
use super::resnet::{Downsample2D, ResnetBlock2D, Time, Upsample2D};
use super::transformer::Transformer2DModel;
use super::weights::Weights;
use crate::cuda::nvtx_range;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// The parts of config.json this UNet uses.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Per down block: does it have cross-attention transformers?
    pub down_cross_attn: Vec<bool>,
    /// Per up block (in execution order).
    pub up_cross_attn: Vec<bool>,
    pub cross_attention_dim: usize,
    /// Heads per down block (diffusers reads `num_attention_heads`, else `attention_head_dim`).
    pub heads: Vec<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
}

impl UNetConfig {
    /// Stable Diffusion 1.x (what a single-file checkpoint without a config holds).
    pub fn sd15() -> UNetConfig {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_cross_attn: vec![true, true, true, false],
            up_cross_attn: vec![false, true, true, true],
            cross_attention_dim: 768,
            heads: vec![8; 4],
            norm_num_groups: 32,
            norm_eps: 1e-5,
        }
    }

    pub fn from_json(v: &Value) -> Result<UNetConfig> {
        let usize_of = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize).with_context(|| format!("unet config: missing integer {k:?}"));
        let list = |k: &str| -> Result<Vec<Value>> { v.get(k).and_then(Value::as_array).cloned().with_context(|| format!("unet config: missing list {k:?}")) };
        let block_out_channels: Vec<usize> = list("block_out_channels")?.iter().filter_map(Value::as_u64).map(|x| x as usize).collect();
        let n = block_out_channels.len();
        let kinds = |k: &str, cross: &str, plain: &str| -> Result<Vec<bool>> {
            list(k)?
                .iter()
                .map(|t| match t.as_str() {
                    Some(s) if s == cross => Ok(true),
                    Some(s) if s == plain => Ok(false),
                    other => bail!("unet config: {k} entry {other:?} is not supported (expected {cross} or {plain})"),
                })
                .collect()
        };
        let down_cross_attn = kinds("down_block_types", "CrossAttnDownBlock2D", "DownBlock2D")?;
        let up_cross_attn = kinds("up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
        ensure!(down_cross_attn.len() == n && up_cross_attn.len() == n, "unet config: block type lists do not match block_out_channels");
        if v.get("use_linear_projection").and_then(Value::as_bool) == Some(true) {
            bail!("unet config: use_linear_projection = true (SD2.x) is not supported; SD1.x uses 1x1 conv projections");
        }
        let heads_value = v.get("num_attention_heads").filter(|h| !h.is_null()).or_else(|| v.get("attention_head_dim")).context("unet config: no attention heads")?;
        let heads = match heads_value {
            Value::Number(h) => vec![h.as_u64().unwrap_or(8) as usize; n],
            Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect(),
            other => bail!("unet config: attention heads {other} not understood"),
        };
        ensure!(heads.len() == n, "unet config: {} head counts for {n} blocks", heads.len());
        Ok(UNetConfig {
            in_channels: usize_of("in_channels")?,
            out_channels: usize_of("out_channels")?,
            block_out_channels,
            layers_per_block: usize_of("layers_per_block")?,
            down_cross_attn,
            up_cross_attn,
            cross_attention_dim: usize_of("cross_attention_dim")?,
            heads,
            norm_num_groups: usize_of("norm_num_groups")?,
            norm_eps: v.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32,
        })
    }
}

/// One resnet with its optional transformer, as the down/mid/up blocks pair them.
pub struct Layer {
    pub resnet: ResnetBlock2D,
    pub attention: Option<Transformer2DModel>,
}

impl Layer {
    /// `time`: this layer's resnet's projection of the time embedding.
    fn forward(&mut self, dev: Dev, x: &Tensor, time: Time, context: &Tensor) -> Result<Tensor> {
        let h = self.resnet.forward(dev, x, time)?;
        match &mut self.attention {
            Some(a) => a.forward(dev, &h, context),
            None => Ok(h),
        }
    }

    fn forget(&mut self) {
        self.resnet.forget();
        if let Some(a) = &mut self.attention {
            a.forget();
        }
    }

    fn backward(&mut self, dev: Dev, dy: &Tensor) -> Result<Tensor> {
        let dh = match &mut self.attention {
            Some(a) => a.backward(dev, dy)?,
            None => dy.clone(),
        };
        self.resnet.backward(dev, &dh)
    }
}

pub struct DownBlock {
    pub layers: Vec<Layer>,
    pub downsampler: Option<Downsample2D>,
}

pub struct UpBlock {
    pub layers: Vec<Layer>,
    pub upsampler: Option<Upsample2D>,
    /// Channels of the skip each layer concatenates (known after a forward).
    skip_channels: Vec<usize>,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Vec<Layer>,
    pub up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Input of conv_norm_out and its statistics, kept for the backward.
    saved_out: Option<(Tensor, NormStats)>,
    /// Keep activations for a backward (training); off for inference, where each layer's are
    /// dropped as soon as it finishes, so activation memory is a few layers' worth.
    pub keep_activations: bool,
}

impl UNet2DConditionModel {
    pub fn load(dev: Dev, w: &Weights, config: UNetConfig) -> Result<Self> {
        let c = &config;
        let boc = &c.block_out_channels;
        let temb_ch = boc[0] * 4;
        let (groups, eps, ctx) = (c.norm_num_groups, c.norm_eps, c.cross_attention_dim);
        let layer = |prefix: &str, j: usize, in_ch: usize, out_ch: usize, cross: bool, heads: usize| -> Result<Layer> {
            Ok(Layer {
                resnet: ResnetBlock2D::load(dev, w, &format!("{prefix}.resnets.{j}"), in_ch, out_ch, temb_ch, groups, eps)?,
                attention: if cross { Some(Transformer2DModel::load(dev, w, &format!("{prefix}.attentions.{j}"), out_ch, ctx, heads, groups)?) } else { None },
            })
        };
        let mut down_blocks = Vec::new();
        let mut in_ch = boc[0];
        for (i, &out_ch) in boc.iter().enumerate() {
            let prefix = format!("down_blocks.{i}");
            let layers = (0..c.layers_per_block)
                .map(|j| layer(&prefix, j, if j == 0 { in_ch } else { out_ch }, out_ch, c.down_cross_attn[i], c.heads[i]))
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < boc.len() { Some(Downsample2D::load(dev, w, &format!("{prefix}.downsamplers.0"), out_ch)?) } else { None };
            down_blocks.push(DownBlock { layers, downsampler });
            in_ch = out_ch;
        }
        let top = *boc.last().unwrap();
        let top_heads = *c.heads.last().unwrap();
        let mid_block = vec![
            layer("mid_block", 0, top, top, true, top_heads)?,
            Layer { resnet: ResnetBlock2D::load(dev, w, "mid_block.resnets.1", top, top, temb_ch, groups, eps)?, attention: None },
        ];
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let reversed_heads: Vec<usize> = c.heads.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut prev_out = reversed[0];
        for i in 0..reversed.len() {
            let out_ch = reversed[i];
            let block_in = reversed[(i + 1).min(reversed.len() - 1)];
            let prefix = format!("up_blocks.{i}");
            let n_layers = c.layers_per_block + 1;
            let layers = (0..n_layers)
                .map(|j| {
                    let skip = if j + 1 == n_layers { block_in } else { out_ch };
                    let res_in = if j == 0 { prev_out } else { out_ch };
                    layer(&prefix, j, res_in + skip, out_ch, c.up_cross_attn[i], reversed_heads[i])
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < reversed.len() { Some(Upsample2D::load(dev, w, &format!("{prefix}.upsamplers.0"), out_ch)?) } else { None };
            up_blocks.push(UpBlock { layers, upsampler, skip_channels: vec![] });
            prev_out = out_ch;
        }
        Ok(UNet2DConditionModel {
            conv_in: Conv2d::load(dev, w, "conv_in", c.in_channels, boc[0], 3, 1)?,
            time_linear_1: Linear::load(dev, w, "time_embedding.linear_1", boc[0], temb_ch, true, false)?,
            time_linear_2: Linear::load(dev, w, "time_embedding.linear_2", temb_ch, temb_ch, true, false)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(dev, w, "conv_norm_out", boc[0], groups, eps)?,
            conv_out: Conv2d::load(dev, w, "conv_out", boc[0], c.out_channels, 3, 1)?,
            saved_out: None,
            keep_activations: true,
            config,
        })
    }

    /// Every layer with its transformer (if any), in execution order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = (String, &mut Layer)> {
        let down = self.down_blocks.iter_mut().enumerate().flat_map(|(i, b)| b.layers.iter_mut().enumerate().map(move |(j, l)| (format!("down_blocks.{i}.attentions.{j}"), l)));
        let mid = self.mid_block.iter_mut().take(1).map(|l| ("mid_block.attentions.0".to_string(), l));
        let up = self.up_blocks.iter_mut().enumerate().flat_map(|(i, b)| b.layers.iter_mut().enumerate().map(move |(j, l)| (format!("up_blocks.{i}.attentions.{j}"), l)));
        down.chain(mid).chain(up)
    }

    /// Predicts the noise: x NHWC [n, h, w, in_channels], timesteps f32 [n] (one per sample, on
    /// the model's device), context [n, 77, d].
    pub fn forward(&mut self, dev: Dev, x: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        ensure!(timesteps.numel() == x.shape()[0], "{} timesteps for a batch of {}", timesteps.numel(), x.shape()[0]);
        let keep = self.keep_activations;
        let t_emb = timestep_embedding(dev, timesteps, self.config.block_out_channels[0])?;
        let temb = self.time_linear_2.forward(dev, &silu(dev, &self.time_linear_1.forward(dev, &t_emb)?)?)?;
        let temb = silu(dev, &temb)?;
        // Every resnet's time_emb_proj at once (grouped launches on a Hopper), in forward order;
        // for one sample on the GPU with conv1's bias added, so that conv1 adds it as its bias.
        let fold = x.shape()[0] == 1 && dev.gpu().is_some();
        let time_projs = {
            let layers = self.down_blocks.iter().flat_map(|b| &b.layers).chain(&self.mid_block).chain(self.up_blocks.iter().flat_map(|b| &b.layers));
            let projections: Vec<(&Linear, &Tensor, Option<&Tensor>)> = layers
                .map(|l| {
                    let (proj, conv1_bias) = l.resnet.time_emb_proj();
                    (proj, &temb, fold.then_some(conv1_bias))
                })
                .collect();
            Linear::forward_many(dev, &projections)?
        };
        let mut time_projs = time_projs.iter();
        let mut next_time_proj = || -> Result<Time> {
            let t = time_projs.next().context("UNet: ran out of time projections")?;
            Ok(if fold { Time::WithConvBias(t) } else { Time::Projected(t) })
        };

        let mut h = self.conv_in.forward(dev, x)?;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            let _range = nvtx_range(&format!("forward down_blocks.{i}"));
            for layer in &mut block.layers {
                h = layer.forward(dev, &h, next_time_proj()?, context)?;
                if !keep {
                    layer.forget();
                }
                skips.push(h.clone());
            }
            if let Some(d) = &mut block.downsampler {
                h = d.forward(dev, &h)?;
                skips.push(h.clone());
            }
        }
        let mid_range = nvtx_range("forward mid_block");
        for layer in &mut self.mid_block {
            h = layer.forward(dev, &h, next_time_proj()?, context)?;
            if !keep {
                layer.forget();
            }
        }
        drop(mid_range);
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            let _range = nvtx_range(&format!("forward up_blocks.{i}"));
            block.skip_channels.clear();
            for layer in &mut block.layers {
                let skip = skips.pop().context("UNet: ran out of skip connections")?;
                block.skip_channels.push(*skip.shape().last().unwrap());
                h = layer.forward(dev, &concat_channels(dev, &h, &skip)?, next_time_proj()?, context)?;
                if !keep {
                    layer.forget();
                }
            }
            if let Some(u) = &mut block.upsampler {
                h = u.forward(dev, &h)?;
            }
        }
        let (g, stats) = self.conv_norm_out.forward(dev, &h, true)?;
        let out = self.conv_out.forward(dev, &g)?;
        self.saved_out = keep.then_some((h, stats));
        Ok(out)
    }

    /// Backward of the last forward for d(output); accumulates the LoRA gradients.
    pub fn backward(&mut self, dev: Dev, d_out: &Tensor) -> Result<()> {
        let (h, stats) = self.saved_out.take().context("UNet backward without a forward")?;
        let dg = self.conv_out.backward(dev, h.shape(), d_out)?;
        let mut dh = self.conv_norm_out.backward(dev, &h, &stats, &dg, true, None)?;

        // Up path: each layer's input gradient splits into the running one and its skip's.
        let mut d_skips: Vec<Tensor> = Vec::new();
        for (i, block) in self.up_blocks.iter_mut().enumerate().rev() {
            let _range = nvtx_range(&format!("backward up_blocks.{i}"));
            if let Some(u) = &mut block.upsampler {
                dh = u.backward(dev, &dh)?;
            }
            for (layer, &skip_ch) in block.layers.iter_mut().zip(&block.skip_channels).rev() {
                let d_cat = layer.backward(dev, &dh)?;
                let h_ch = d_cat.shape().last().unwrap() - skip_ch;
                let (d_h, d_skip) = split_channels(dev, &d_cat, h_ch)?;
                dh = d_h;
                d_skips.push(d_skip);
            }
        }
        let mid_range = nvtx_range("backward mid_block");
        for layer in self.mid_block.iter_mut().rev() {
            dh = layer.backward(dev, &dh)?;
        }
        drop(mid_range);
        // Down path, in reverse: d_skips holds the skips' gradients in the order they were pushed.
        let mut take_skip = |dh: &Tensor| -> Result<Tensor> { add(dev, dh, &d_skips.pop().context("UNet: skip gradients out of step")?) };
        for (i, block) in self.down_blocks.iter_mut().enumerate().rev() {
            let _range = nvtx_range(&format!("backward down_blocks.{i}"));
            if let Some(d) = &mut block.downsampler {
                dh = d.backward(dev, &take_skip(&dh)?)?;
            }
            for layer in block.layers.iter_mut().rev() {
                dh = layer.backward(dev, &take_skip(&dh)?)?;
            }
        }
        ensure!(d_skips.len() == 1, "UNet: {} skip gradients left over (expected conv_in's)", d_skips.len());
        Ok(())
    }
}
