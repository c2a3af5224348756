//! AutoencoderKL (SD1.5's VAE), structured and named as diffusers defines it:
//! - `encoder`: conv_in → down_blocks (DownEncoderBlock2D: `layers_per_block` ResnetBlock2D, then a
//!   Downsample2D except on the last level) → mid_block (UNetMidBlock2D: resnet, single-head
//!   Attention, resnet) → conv_norm_out, SiLU, conv_out (2·latent channels); then `quant_conv` 1x1.
//!   The posterior is mean = first `latent_channels` channels, logvar = the rest clamped to [-30, 20].
//! - `decoder` (after `post_quant_conv` 1x1): conv_in → mid_block → up_blocks (UpDecoderBlock2D:
//!   `layers_per_block + 1` resnets, then an Upsample2D except on the last level) → conv_norm_out,
//!   SiLU, conv_out.
//!
//! Every GroupNorm here has eps 1e-6. Downsample2D pads right and bottom by one, then a 3x3 stride-2
//! conv without padding; Upsample2D is nearest 2x then a 3x3 conv. Activations NHWC, conv weights
//! reordered to `[out, k, k, in]` at load. CPU forward (f32) here; the GPU path will run the same layers.

use super::weights::{Component, ModelSource, Weights};
use super::{cfg_usize, cfg_usize_list, Conv2d, GroupNorm, Linear, Nhwc};
use crate::ops::attention::{attention_cpu, AttnShape};
use crate::ops::elementwise::silu_cpu;
use anyhow::{ensure, Result};

const EPS: f32 = 1e-6;

/// The fields of diffusers' AutoencoderKL config that the forward uses.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f32,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// Image size the model was trained at; sets the tile size of [`AutoencoderKl::decode_tiled_cpu`].
    pub sample_size: usize,
}

impl VaeConfig {
    pub fn sd15() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            sample_size: 512,
        }
    }

    /// From a vae/config.json.
    pub fn from_json(cfg: &serde_json::Value) -> Result<VaeConfig> {
        let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(true);
        let c = VaeConfig {
            in_channels: cfg_usize(cfg, "in_channels")?,
            out_channels: cfg_usize(cfg, "out_channels")?,
            block_out_channels: cfg_usize_list(cfg, "block_out_channels")?,
            layers_per_block: cfg_usize(cfg, "layers_per_block")?,
            latent_channels: cfg_usize(cfg, "latent_channels")?,
            norm_num_groups: cfg_usize(cfg, "norm_num_groups")?,
            scaling_factor: cfg.get("scaling_factor").and_then(|v| v.as_f64()).unwrap_or(0.18215) as f32,
            use_quant_conv: flag("use_quant_conv"),
            use_post_quant_conv: flag("use_post_quant_conv"),
            mid_block_add_attention: flag("mid_block_add_attention"),
            sample_size: match cfg.get("sample_size") {
                Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).unwrap_or(512) as usize,
                Some(v) => v.as_u64().unwrap_or(512) as usize,
                None => 512,
            },
        };
        ensure!(!c.block_out_channels.is_empty(), "vae config: empty block_out_channels");
        for ch in &c.block_out_channels {
            ensure!(ch.is_multiple_of(c.norm_num_groups), "vae config: {ch} channels do not split into {} groups", c.norm_num_groups);
        }
        Ok(c)
    }
}

fn silu(x: &Nhwc) -> Nhwc {
    x.with_data(silu_cpu(&x.data))
}

/// ResnetBlock2D without a time embedding: GN → SiLU → conv1 → GN → SiLU → conv2, + (1x1
/// conv_shortcut of) the input.
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn load(w: &Weights, p: &str, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), cin, groups, EPS)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), cout, groups, EPS)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout { Some(Conv2d::load(w, &format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
        })
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let h = self.conv1.forward_cpu(&silu(&self.norm1.forward_cpu(x)));
        let mut h = self.conv2.forward_cpu(&silu(&self.norm2.forward_cpu(&h)));
        let skip = self.conv_shortcut.as_ref().map(|c| c.forward_cpu(x));
        let skip = skip.as_ref().unwrap_or(x);
        h.data.iter_mut().zip(&skip.data).for_each(|(a, b)| *a += b);
        h
    }
}

/// diffusers' Attention as the VAE mid block uses it: GroupNorm, one head over all channels
/// (to_q/to_k/to_v/to_out.0 with bias, scale 1/√C), + residual.
pub struct Attention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl Attention {
    fn load(w: &Weights, p: &str, ch: usize, groups: usize) -> Result<Attention> {
        let lin = |n: &str| Linear::load(w, &format!("{p}.{n}"), ch, ch, true);
        Ok(Attention {
            group_norm: GroupNorm::load(w, &format!("{p}.group_norm"), ch, groups, EPS)?,
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: lin("to_out.0")?,
        })
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let h = self.group_norm.forward_cpu(x).data;
        let (q, k, v) = (self.to_q.forward_cpu(&h), self.to_k.forward_cpu(&h), self.to_v.forward_cpu(&h));
        let s = AttnShape { batch: x.n, q_len: x.h * x.w, kv_len: x.h * x.w, heads: 1, head_dim: x.c, causal: false };
        let mut out = self.to_out.forward_cpu(&attention_cpu(&q, &k, &v, &s, (x.c as f32).powf(-0.5)));
        out.iter_mut().zip(&x.data).for_each(|(o, r)| *o += r);
        x.with_data(out)
    }
}

/// UNetMidBlock2D: resnet, attention (unless disabled), resnet.
pub struct UNetMidBlock2D {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Option<Attention>,
}

impl UNetMidBlock2D {
    fn load(w: &Weights, p: &str, ch: usize, c: &VaeConfig) -> Result<UNetMidBlock2D> {
        let g = c.norm_num_groups;
        Ok(UNetMidBlock2D {
            resnets: [ResnetBlock2D::load(w, &format!("{p}.resnets.0"), ch, ch, g)?, ResnetBlock2D::load(w, &format!("{p}.resnets.1"), ch, ch, g)?],
            attention: if c.mid_block_add_attention { Some(Attention::load(w, &format!("{p}.attentions.0"), ch, g)?) } else { None },
        })
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let mut h = self.resnets[0].forward_cpu(x);
        if let Some(a) = &self.attention {
            h = a.forward_cpu(&h);
        }
        self.resnets[1].forward_cpu(&h)
    }
}

/// Downsample2D of the VAE: zero-pad right and bottom by 1, then 3x3 stride-2 conv, no padding.
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let (h, w, c) = (x.h + 1, x.w + 1, x.c);
        let mut padded = vec![0f32; x.n * h * w * c];
        for b in 0..x.n {
            for y in 0..x.h {
                let src = &x.data[((b * x.h + y) * x.w) * c..][..x.w * c];
                padded[((b * h + y) * w) * c..][..x.w * c].copy_from_slice(src);
            }
        }
        self.conv.forward_cpu(&Nhwc::new(padded, x.n, h, w, c))
    }
}

/// Upsample2D: nearest-neighbour 2x, then a 3x3 conv.
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let (h, w, c) = (2 * x.h, 2 * x.w, x.c);
        let mut up = vec![0f32; x.n * h * w * c];
        for b in 0..x.n {
            for y in 0..h {
                for xx in 0..w {
                    let src = &x.data[((b * x.h + y / 2) * x.w + xx / 2) * c..][..c];
                    up[((b * h + y) * w + xx) * c..][..c].copy_from_slice(src);
                }
            }
        }
        self.conv.forward_cpu(&Nhwc::new(up, x.n, h, w, c))
    }
}

/// A DownEncoderBlock2D or UpDecoderBlock2D: resnets, then an optional resampler.
pub struct ResnetStack {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
    pub upsampler: Option<Upsample2D>,
}

impl ResnetStack {
    fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward_cpu(&h);
        }
        if let Some(d) = &self.downsampler {
            h = d.forward_cpu(&h);
        }
        if let Some(u) = &self.upsampler {
            h = u.forward_cpu(&h);
        }
        h
    }
}

/// Encoder (or Decoder): conv_in → blocks / mid_block in their order → GN, SiLU, conv_out.
pub struct Coder {
    pub conv_in: Conv2d,
    pub blocks: Vec<ResnetStack>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// The decoder runs the mid block before its up blocks, the encoder after its down blocks.
    mid_first: bool,
}

impl Coder {
    fn load_encoder(w: &Weights, c: &VaeConfig) -> Result<Coder> {
        let (boc, g) = (&c.block_out_channels, c.norm_num_groups);
        let mut blocks = Vec::new();
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::load(w, &format!("{p}.resnets.{j}"), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < boc.len() {
                Some(Downsample2D { conv: Conv2d::load(w, &format!("{p}.downsamplers.0.conv"), cout, cout, 3, 2, 0)? })
            } else {
                None
            };
            blocks.push(ResnetStack { resnets, downsampler, upsampler: None });
            cin = cout;
        }
        let top = *boc.last().unwrap();
        Ok(Coder {
            conv_in: Conv2d::load(w, "encoder.conv_in", c.in_channels, boc[0], 3, 1, 1)?,
            blocks,
            mid_block: UNetMidBlock2D::load(w, "encoder.mid_block", top, c)?,
            conv_norm_out: GroupNorm::load(w, "encoder.conv_norm_out", top, g, EPS)?,
            conv_out: Conv2d::load(w, "encoder.conv_out", top, 2 * c.latent_channels, 3, 1, 1)?,
            mid_first: false,
        })
    }

    fn load_decoder(w: &Weights, c: &VaeConfig) -> Result<Coder> {
        let g = c.norm_num_groups;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock2D::load(w, &format!("{p}.resnets.{j}"), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < rev.len() {
                Some(Upsample2D { conv: Conv2d::load(w, &format!("{p}.upsamplers.0.conv"), cout, cout, 3, 1, 1)? })
            } else {
                None
            };
            blocks.push(ResnetStack { resnets, downsampler: None, upsampler });
            cin = cout;
        }
        let bottom = c.block_out_channels[0];
        Ok(Coder {
            conv_in: Conv2d::load(w, "decoder.conv_in", c.latent_channels, rev[0], 3, 1, 1)?,
            blocks,
            mid_block: UNetMidBlock2D::load(w, "decoder.mid_block", rev[0], c)?,
            conv_norm_out: GroupNorm::load(w, "decoder.conv_norm_out", bottom, g, EPS)?,
            conv_out: Conv2d::load(w, "decoder.conv_out", bottom, c.out_channels, 3, 1, 1)?,
            mid_first: true,
        })
    }

    pub fn forward_cpu(&self, x: &Nhwc) -> Nhwc {
        let mut h = self.conv_in.forward_cpu(x);
        if self.mid_first {
            h = self.mid_block.forward_cpu(&h);
        }
        for b in &self.blocks {
            h = b.forward_cpu(&h);
        }
        if !self.mid_first {
            h = self.mid_block.forward_cpu(&h);
        }
        self.conv_out.forward_cpu(&silu(&self.conv_norm_out.forward_cpu(&h)))
    }
}

/// The VAE posterior N(mean, exp(logvar)) per latent element, NHWC `[n, h/f, w/f, latent_channels]`.
pub struct Posterior {
    pub mean: Nhwc,
    pub logvar: Nhwc,
}

/// AutoencoderKL with its weights in f32 on the CPU.
pub struct AutoencoderKl {
    pub config: VaeConfig,
    pub encoder: Coder,
    pub decoder: Coder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKl {
    pub fn load(w: &Weights, config: VaeConfig) -> Result<AutoencoderKl> {
        let l = config.latent_channels;
        Ok(AutoencoderKl {
            encoder: Coder::load_encoder(w, &config)?,
            decoder: Coder::load_decoder(w, &config)?,
            quant_conv: if config.use_quant_conv { Some(Conv2d::load(w, "quant_conv", 2 * l, 2 * l, 1, 1, 0)?) } else { None },
            post_quant_conv: if config.use_post_quant_conv { Some(Conv2d::load(w, "post_quant_conv", l, l, 1, 1, 0)?) } else { None },
            config,
        })
    }

    /// The VAE of a model source (config.json when there is one, else SD1.5's).
    pub fn from_source(src: &ModelSource) -> Result<AutoencoderKl> {
        let config = match src.config(Component::Vae)? {
            Some(cfg) => VaeConfig::from_json(&cfg)?,
            None => VaeConfig::sd15(),
        };
        AutoencoderKl::load(&src.weights(Component::Vae)?, config)
    }

    /// Spatial downsampling factor (8 for SD1.5).
    pub fn factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// image NHWC `[n, h, w, in_channels]` in [-1, 1] → posterior (h and w multiples of [`factor`](Self::factor)).
    pub fn encode_cpu(&self, image: &Nhwc) -> Result<Posterior> {
        let f = self.factor();
        ensure!(image.c == self.config.in_channels, "VAE encode: image has {} channels, expected {}", image.c, self.config.in_channels);
        ensure!(image.h.is_multiple_of(f) && image.w.is_multiple_of(f), "VAE encode: {}x{} image is not a multiple of {f}", image.h, image.w);
        let mut m = self.encoder.forward_cpu(image);
        if let Some(q) = &self.quant_conv {
            m = q.forward_cpu(&m);
        }
        let l = self.config.latent_channels;
        let (mut mean, mut logvar) = (Vec::with_capacity(m.data.len() / 2), Vec::with_capacity(m.data.len() / 2));
        for px in m.data.chunks_exact(2 * l) {
            mean.extend_from_slice(&px[..l]);
            logvar.extend(px[l..].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        Ok(Posterior { mean: Nhwc::new(mean, m.n, m.h, m.w, l), logvar: Nhwc::new(logvar, m.n, m.h, m.w, l) })
    }

    /// latents NHWC `[n, h, w, latent_channels]` (already divided by the scaling factor) → image.
    pub fn decode_cpu(&self, latents: &Nhwc) -> Result<Nhwc> {
        ensure!(latents.c == self.config.latent_channels, "VAE decode: latents have {} channels, expected {}", latents.c, self.config.latent_channels);
        let z = match &self.post_quant_conv {
            Some(p) => p.forward_cpu(latents),
            None => latents.clone(),
        };
        Ok(self.decoder.forward_cpu(&z))
    }

    /// The tiling diffusers' `enable_tiling()` uses: latent tiles of sample_size / factor (64 for
    /// SD1.5: 512 px) at a stride of 3/4 tile, blended over 1/4 tile.
    pub fn default_tiling(&self) -> Tiling {
        Tiling { tile_latent: self.config.sample_size / self.factor(), overlap_factor: 0.25 }
    }

    /// [`decode_cpu`](Self::decode_cpu) tile by tile, as diffusers' `AutoencoderKL.tiled_decode`:
    /// bounds the activation memory by one tile's whatever the image size.
    pub fn decode_tiled_cpu(&self, latents: &Nhwc, tiling: Tiling) -> Result<Nhwc> {
        decode_tiled(latents, tiling, self.factor(), |tile| self.decode_cpu(tile))
    }
}

/// Tile geometry for a tiled VAE decode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiling {
    /// Tile edge in latent pixels.
    pub tile_latent: usize,
    /// Fraction of a tile shared with its neighbour.
    pub overlap_factor: f32,
}

/// diffusers' tiled decode around any tile decoder (CPU here, the GPU path later): latent tiles of
/// `tile_latent` at stride `tile_latent·(1 − overlap)`, each decoded alone; every decoded tile is
/// blended linearly into the (already blended) tile above and to its left over `tile·factor·overlap`
/// image rows / columns, then cropped to `tile·factor·(1 − overlap)` and the crops concatenated.
/// Falls back to one plain decode when the latents fit in a tile.
pub fn decode_tiled(z: &Nhwc, t: Tiling, factor: usize, mut decode: impl FnMut(&Nhwc) -> Result<Nhwc>) -> Result<Nhwc> {
    if z.h <= t.tile_latent && z.w <= t.tile_latent {
        return decode(z);
    }
    let stride = (t.tile_latent as f32 * (1.0 - t.overlap_factor)) as usize;
    let tile_sample = t.tile_latent * factor;
    let blend = (tile_sample as f32 * t.overlap_factor) as usize;
    let keep = tile_sample - blend;
    ensure!(stride > 0 && keep > 0, "VAE tiling {t:?}: tiles too small");
    let mut rows: Vec<Vec<Nhwc>> = Vec::new();
    for i in (0..z.h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..z.w).step_by(stride) {
            let (th, tw) = (t.tile_latent.min(z.h - i), t.tile_latent.min(z.w - j));
            let mut tile = Vec::with_capacity(z.n * th * tw * z.c);
            for b in 0..z.n {
                for y in i..i + th {
                    tile.extend_from_slice(&z.data[((b * z.h + y) * z.w + j) * z.c..][..tw * z.c]);
                }
            }
            let mut d = decode(&Nhwc::new(tile, z.n, th, tw, z.c))?;
            if let Some(above) = rows.last().map(|r: &Vec<Nhwc>| &r[row.len()]) {
                blend_rows(above, &mut d, blend);
            }
            if let Some(left) = row.last() {
                blend_cols(left, &mut d, blend);
            }
            row.push(d);
        }
        rows.push(row);
    }
    let (n, c) = (z.n, rows[0][0].c);
    let out_h: usize = rows.iter().map(|r| r[0].h.min(keep)).sum();
    let out_w: usize = rows[0].iter().map(|t| t.w.min(keep)).sum();
    let mut out = vec![0f32; n * out_h * out_w * c];
    let mut y0 = 0;
    for row in &rows {
        let mut x0 = 0;
        for tile in row {
            let (kh, kw) = (tile.h.min(keep), tile.w.min(keep));
            for b in 0..n {
                for y in 0..kh {
                    let src = &tile.data[((b * tile.h + y) * tile.w) * c..][..kw * c];
                    out[((b * out_h + y0 + y) * out_w + x0) * c..][..kw * c].copy_from_slice(src);
                }
            }
            x0 += kw;
        }
        y0 += row[0].h.min(keep);
    }
    Ok(Nhwc::new(out, n, out_h, out_w, c))
}

/// Row y < e of `b` becomes a[h − e + y]·(1 − y/e) + b[y]·(y/e) (diffusers' blend_v).
fn blend_rows(a: &Nhwc, b: &mut Nhwc, extent: usize) {
    let e = extent.min(a.h).min(b.h);
    let (wc, c) = (b.w * b.c, b.c);
    for n in 0..b.n {
        for y in 0..e {
            let f = y as f32 / e as f32;
            let ar = &a.data[((n * a.h + a.h - e + y) * a.w) * c..][..wc];
            let br = &mut b.data[((n * b.h + y) * b.w) * c..][..wc];
            br.iter_mut().zip(ar).for_each(|(bv, av)| *bv = av * (1.0 - f) + *bv * f);
        }
    }
}

/// Column x < e of `b` becomes a[w − e + x]·(1 − x/e) + b[x]·(x/e) (diffusers' blend_h).
fn blend_cols(a: &Nhwc, b: &mut Nhwc, extent: usize) {
    let e = extent.min(a.w).min(b.w);
    let c = b.c;
    for n in 0..b.n {
        for y in 0..b.h {
            for x in 0..e {
                let f = x as f32 / e as f32;
                let ap = &a.data[((n * a.h + y) * a.w + a.w - e + x) * c..][..c];
                let bp = &mut b.data[((n * b.h + y) * b.w + x) * c..][..c];
                bp.iter_mut().zip(ap).for_each(|(bv, av)| *bv = av * (1.0 - f) + *bv * f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::SafetensorsFile;
    use crate::tensor::compare;
    use crate::testing::fixtures_dir;

    fn fixture(io: &SafetensorsFile, key: &str) -> (Vec<f32>, Vec<usize>) {
        let r = io.raw(key).unwrap();
        (r.to_f32().unwrap(), r.shape.clone())
    }

    fn check(what: &str, out: &Nhwc, io: &SafetensorsFile, key: &str, tol: f64) {
        let (want, shape) = fixture(io, key);
        assert_eq!(shape, [out.n, out.c, out.h, out.w], "{what}: shape");
        let c = compare(&out.to_nchw(), &want);
        eprintln!("{what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
        assert!(c.within(tol), "{what}: rel L2 {:.3e} > {tol:.0e} ({} non-finite)", c.rel_l2, c.non_finite);
    }

    /// The tiny fixture AutoencoderKL (3 levels 16/32/32, 2 resnets per level, 8 groups) matches
    /// diffusers: posterior mean and logvar of a 16x24 image pair, and the decode of 4x6 latents.
    #[test]
    fn tiny_vae_matches_diffusers() {
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let vae = AutoencoderKl::from_source(&src).unwrap();
        let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
        let (img, s) = fixture(&io, "vae.image");
        let post = vae.encode_cpu(&Nhwc::from_nchw(&img, s[0], s[1], s[2], s[3])).unwrap();
        check("posterior mean", &post.mean, &io, "vae.posterior_mean", 1e-4);
        check("posterior logvar", &post.logvar, &io, "vae.posterior_logvar", 1e-4);
        let (z, s) = fixture(&io, "vae.latents");
        let out = vae.decode_cpu(&Nhwc::from_nchw(&z, s[0], s[1], s[2], s[3])).unwrap();
        check("decoded", &out, &io, "vae.decoded", 1e-4);
    }

    /// The same VAE from the single-file LDM checkpoint (f16 storage; mid attention stored as 1x1 convs).
    #[test]
    fn tiny_vae_from_ldm_checkpoint() {
        let folder = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let ldm = ModelSource::resolve(fixtures_dir().join("tiny-sd-ldm.safetensors").to_str().unwrap()).unwrap();
        let cfg = VaeConfig::from_json(&folder.config(Component::Vae).unwrap().unwrap()).unwrap();
        let vae = AutoencoderKl::load(&ldm.weights(Component::Vae).unwrap(), cfg).unwrap();
        let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
        let (z, s) = fixture(&io, "vae.latents");
        let out = vae.decode_cpu(&Nhwc::from_nchw(&z, s[0], s[1], s[2], s[3])).unwrap();
        check("decoded from f16 LDM weights", &out, &io, "vae.decoded", 2e-2);
    }

    /// Full SD1.5 size (128/256/512/512, 32 groups) with random weights on the CPU: the posterior of a
    /// 64x48 image and the decode of 8x6 latents match diffusers.
    #[test]
    #[ignore = "needs SDLORA_SD15_REFERENCE=DIR from `make_fixtures.py --full-size DIR` (~800 MB)"]
    fn full_size_vae_matches_diffusers() {
        let dir = std::env::var("SDLORA_SD15_REFERENCE").expect("set SDLORA_SD15_REFERENCE (see make_fixtures.py --full-size)");
        let src = ModelSource::resolve(&dir).unwrap();
        let t0 = std::time::Instant::now();
        let vae = AutoencoderKl::from_source(&src).unwrap();
        eprintln!("full-size VAE: load {:.2} s", t0.elapsed().as_secs_f64());
        assert_eq!(vae.config, VaeConfig::sd15());
        let io = SafetensorsFile::open(&std::path::Path::new(&dir).join("io.safetensors")).unwrap();
        let (img, s) = fixture(&io, "vae.image");
        let t0 = std::time::Instant::now();
        let post = vae.encode_cpu(&Nhwc::from_nchw(&img, s[0], s[1], s[2], s[3])).unwrap();
        eprintln!("full-size VAE: encode 64x48 {:.2} s", t0.elapsed().as_secs_f64());
        check("full-size posterior mean", &post.mean, &io, "vae.posterior_mean", 1e-4);
        check("full-size posterior logvar", &post.logvar, &io, "vae.posterior_logvar", 1e-4);
        let (z, s) = fixture(&io, "vae.latents");
        let t0 = std::time::Instant::now();
        let out = vae.decode_cpu(&Nhwc::from_nchw(&z, s[0], s[1], s[2], s[3])).unwrap();
        eprintln!("full-size VAE: decode 8x6 latents {:.2} s", t0.elapsed().as_secs_f64());
        check("full-size decoded", &out, &io, "vae.decoded", 1e-4);
    }

    /// Tiled decode of 12x14 latents in 8x8 tiles at stride 6 (2x3 tiles, ragged right and bottom ones) matches
    /// diffusers' `enable_tiling()` decode.
    #[test]
    fn tiny_vae_tiled_decode_matches_diffusers() {
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let vae = AutoencoderKl::from_source(&src).unwrap();
        assert_eq!(vae.default_tiling(), Tiling { tile_latent: 8, overlap_factor: 0.25 });
        let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
        let (z, s) = fixture(&io, "vae.tiled_latents");
        let z = Nhwc::from_nchw(&z, s[0], s[1], s[2], s[3]);
        let mut tiles = 0;
        let out = decode_tiled(&z, vae.default_tiling(), vae.factor(), |t| {
            tiles += 1;
            vae.decode_cpu(t)
        })
        .unwrap();
        assert_eq!(tiles, 6);
        check("tiled decode", &out, &io, "vae.tiled_decoded", 1e-4);
    }

    #[test]
    fn sd15_config_and_input_checks() {
        assert_eq!(VaeConfig::sd15().block_out_channels.len(), 4);
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let vae = AutoencoderKl::from_source(&src).unwrap();
        assert_eq!(vae.factor(), 4);
        let err = format!("{:#}", vae.encode_cpu(&Nhwc::new(vec![0.0; 3 * 6 * 8], 1, 6, 8, 3)).err().unwrap());
        assert!(err.contains("multiple of 4"), "{err}");
        let err = format!("{:#}", vae.decode_cpu(&Nhwc::new(vec![0.0; 3 * 4], 1, 2, 2, 3)).err().unwrap());
        assert!(err.contains("3 channels"), "{err}");
    }
}
