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
//! reordered to `[out, k, k, in]` at load. Runs on either device of `model::layers::Dev` (f32 CPU twins,
//! or the GPU kernels in bf16; the GPU path has been built but not yet checked on a GPU, see
//! `model::sd15_tests::full_size_vae_gpu_matches_diffusers`).

use super::functional::{add, attention, upsample2x};
use super::layers::{Dev, GroupNorm, Linear};
use super::weights::{Component, ModelSource, Weights};
use super::{cfg_usize, cfg_usize_list};
use crate::cuda::{ArenaKind, Gpu};
use crate::ops::conv::{self, Conv2dShape};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Context, Result};

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
    /// Image size the model was trained at; sets the tile size of [`AutoencoderKl::default_tiling`].
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

/// nn.Conv2d with any padding (the VAE's Downsample2D needs none after its own asymmetric pad).
/// On the GPU an odd out_ch (conv_out's 3) is stored with one zero output channel more, as the
/// conv kernel needs an even count: its output then has that extra channel.
pub struct Conv {
    w: Tensor,
    b: Tensor,
    in_ch: usize,
    stored_out: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn load(dev: Dev, w: &Weights, prefix: &str, channels: (usize, usize), kernel: usize, stride: usize, pad: usize) -> Result<Conv> {
        Conv::load_even(dev, w, prefix, channels, (kernel, stride, pad), matches!(dev, Dev::Gpu(_)))
    }

    /// `even_out`: store an odd out_ch with one zero channel more (what the GPU needs).
    fn load_even(dev: Dev, w: &Weights, prefix: &str, (in_ch, out_ch): (usize, usize), (kernel, stride, pad): (usize, usize, usize), even_out: bool) -> Result<Conv> {
        let mut wv = w.conv_ohwi(&format!("{prefix}.weight"), out_ch, in_ch, kernel).with_context(|| format!("loading {prefix}"))?;
        let mut bv = w.vec(&format!("{prefix}.bias"), &[out_ch])?;
        let stored_out = if even_out && out_ch % 2 == 1 { out_ch + 1 } else { out_ch };
        wv.resize(stored_out * kernel * kernel * in_ch, 0.0);
        bv.resize(stored_out, 0.0);
        let w = dev.weight(Tensor::from_vec(&[stored_out, kernel, kernel, in_ch], wv)?)?;
        Ok(Conv { w, b: dev.weight(Tensor::from_vec(&[stored_out], bv)?)?, in_ch, stored_out, kernel, stride, pad })
    }

    fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let xs = x.shape();
        ensure!(xs.len() == 4 && xs[3] == self.in_ch, "conv: input {xs:?} is not NHWC with {} channels", self.in_ch);
        let s = Conv2dShape {
            batch: xs[0],
            height: xs[1],
            width: xs[2],
            in_ch: self.in_ch,
            out_ch: self.stored_out,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        };
        let (oh, ow) = s.out_hw();
        let shape = [s.batch, oh, ow, s.out_ch];
        match dev {
            Dev::Cpu => Tensor::from_vec(&shape, conv::conv2d_cpu(x.data()?, &s, self.w.data()?, Some(self.b.data()?))),
            Dev::Gpu(g) => {
                let mut y = Tensor::empty_gpu(g, ArenaKind::Scratch, &shape, DType::BF16)?;
                conv::conv2d(g, conv::ConvSource::plain(x), &s, &self.w, Some(&self.b), None, &mut y)?;
                Ok(y)
            }
        }
    }
}

/// diffusers' ResnetBlock2D as the VAE uses it (no time embedding): GN → SiLU → conv1 → GN → SiLU
/// → conv2, + (1x1 conv_shortcut of) the input.
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv,
    pub norm2: GroupNorm,
    pub conv2: Conv,
    pub conv_shortcut: Option<Conv>,
}

impl ResnetBlock2D {
    fn load(dev: Dev, w: &Weights, p: &str, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(dev, w, &format!("{p}.norm1"), cin, groups, EPS)?,
            conv1: Conv::load(dev, w, &format!("{p}.conv1"), (cin, cout), 3, 1, 1)?,
            norm2: GroupNorm::load(dev, w, &format!("{p}.norm2"), cout, groups, EPS)?,
            conv2: Conv::load(dev, w, &format!("{p}.conv2"), (cout, cout), 3, 1, 1)?,
            conv_shortcut: if cin != cout { Some(Conv::load(dev, w, &format!("{p}.conv_shortcut"), (cin, cout), 1, 1, 0)?) } else { None },
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(dev, &self.norm1.forward(dev, x, true)?.0)?;
        let h = self.conv2.forward(dev, &self.norm2.forward(dev, &h, true)?.0)?;
        match &self.conv_shortcut {
            Some(c) => add(dev, &c.forward(dev, x)?, &h),
            None => add(dev, x, &h),
        }
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
    fn load(dev: Dev, w: &Weights, p: &str, ch: usize, groups: usize) -> Result<Attention> {
        let lin = |n: &str| Linear::load(dev, w, &format!("{p}.{n}"), ch, ch, true, false);
        Ok(Attention {
            group_norm: GroupNorm::load(dev, w, &format!("{p}.group_norm"), ch, groups, EPS)?,
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: lin("to_out.0")?,
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let tokens = [s[0], s[1] * s[2], s[3]];
        let h = self.group_norm.forward(dev, x, false)?.0.reshape(&tokens)?;
        let (q, k, v) = (self.to_q.forward(dev, &h)?, self.to_k.forward(dev, &h)?, self.to_v.forward(dev, &h)?);
        let o = self.to_out.forward(dev, &attention(dev, &q, &k, &v, 1)?.0)?;
        add(dev, &o.reshape(&s)?, x)
    }
}

/// UNetMidBlock2D: resnet, attention (unless disabled), resnet.
pub struct UNetMidBlock2D {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Option<Attention>,
}

impl UNetMidBlock2D {
    fn load(dev: Dev, w: &Weights, p: &str, ch: usize, c: &VaeConfig) -> Result<UNetMidBlock2D> {
        let g = c.norm_num_groups;
        let resnet = |i: usize| ResnetBlock2D::load(dev, w, &format!("{p}.resnets.{i}"), ch, ch, g);
        Ok(UNetMidBlock2D {
            resnets: [resnet(0)?, resnet(1)?],
            attention: if c.mid_block_add_attention { Some(Attention::load(dev, w, &format!("{p}.attentions.0"), ch, g)?) } else { None },
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(dev, x)?;
        if let Some(a) = &self.attention {
            h = a.forward(dev, &h)?;
        }
        self.resnets[1].forward(dev, &h)
    }
}

/// The VAE's Downsample2D: zero-pad right and bottom by one, then a 3x3 stride-2 conv, no padding.
pub struct Downsample2D {
    pub conv: Conv,
}

impl Downsample2D {
    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(dev, &pad_right_bottom(dev, x)?)
    }
}

/// NHWC x → [n, h+1, w+1, c] with a zero last row and column.
fn pad_right_bottom(dev: Dev, x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let (n, h, w, c) = (s[0], s[1], s[2], s[3]);
    let shape = [n, h + 1, w + 1, c];
    match dev {
        Dev::Cpu => {
            let src = x.data()?;
            let mut out = vec![0f32; n * (h + 1) * (w + 1) * c];
            for (row, chunk) in src.chunks_exact(w * c).enumerate() {
                let (b, y) = (row / h, row % h);
                out[(b * (h + 1) + y) * (w + 1) * c..][..w * c].copy_from_slice(chunk);
            }
            Tensor::from_vec(&shape, out)
        }
        Dev::Gpu(g) => pad_right_bottom_gpu(g, x, &shape),
    }
}

/// Zero-filled output, then one device-to-device copy per image row (no kernel needed; the encoder
/// runs once per image, three times).
fn pad_right_bottom_gpu(g: &Gpu, x: &Tensor, shape: &[usize; 4]) -> Result<Tensor> {
    let [n, hp, wp, c] = *shape;
    let (h, w, es) = (hp - 1, wp - 1, x.dtype().size());
    let y = Tensor::empty_gpu(g, ArenaKind::Scratch, shape, x.dtype())?;
    let (src, dst, stream) = (x.ptr()?, y.ptr()?, g.stream().cu_stream());
    // SAFETY: y holds n·(h+1)·(w+1)·c elements and x n·h·w·c; every copy stays inside both; all
    // work is ordered on the one stream.
    unsafe {
        cudarc::driver::result::memset_d8_async(dst, 0, y.numel() * es, stream).context("pad: memset failed")?;
        for row in 0..n * h {
            let (b, r) = (row / h, row % h);
            let to = dst + (((b * hp + r) * wp * c) * es) as u64;
            cudarc::driver::result::memcpy_dtod_async(to, src + (row * w * c * es) as u64, w * c * es, stream).context("pad: copy failed")?;
        }
    }
    Ok(y)
}

/// A DownEncoderBlock2D or UpDecoderBlock2D: resnets, then an optional resampler.
pub struct ResnetStack {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
    pub upsampler: Option<Conv>,
}

impl ResnetStack {
    fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(dev, x)?;
        for r in &self.resnets[1..] {
            h = r.forward(dev, &h)?;
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(dev, &h)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(dev, &upsample2x(dev, &h)?)?; // Upsample2D: nearest 2x, then its conv
        }
        Ok(h)
    }
}

/// Encoder (or Decoder): conv_in → blocks / mid_block in their order → GN, SiLU, conv_out.
pub struct Coder {
    pub conv_in: Conv,
    pub blocks: Vec<ResnetStack>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv,
    /// The decoder runs the mid block before its up blocks, the encoder after its down blocks.
    mid_first: bool,
}

impl Coder {
    fn load_encoder(dev: Dev, w: &Weights, c: &VaeConfig) -> Result<Coder> {
        let (boc, g) = (&c.block_out_channels, c.norm_num_groups);
        let mut blocks = Vec::new();
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::load(dev, w, &format!("{p}.resnets.{j}"), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < boc.len() {
                Some(Downsample2D { conv: Conv::load(dev, w, &format!("{p}.downsamplers.0.conv"), (cout, cout), 3, 2, 0)? })
            } else {
                None
            };
            blocks.push(ResnetStack { resnets, downsampler, upsampler: None });
            cin = cout;
        }
        let top = *boc.last().unwrap();
        Ok(Coder {
            conv_in: Conv::load(dev, w, "encoder.conv_in", (c.in_channels, boc[0]), 3, 1, 1)?,
            blocks,
            mid_block: UNetMidBlock2D::load(dev, w, "encoder.mid_block", top, c)?,
            conv_norm_out: GroupNorm::load(dev, w, "encoder.conv_norm_out", top, g, EPS)?,
            conv_out: Conv::load(dev, w, "encoder.conv_out", (top, 2 * c.latent_channels), 3, 1, 1)?,
            mid_first: false,
        })
    }

    fn load_decoder(dev: Dev, w: &Weights, c: &VaeConfig) -> Result<Coder> {
        let g = c.norm_num_groups;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock2D::load(dev, w, &format!("{p}.resnets.{j}"), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < rev.len() { Some(Conv::load(dev, w, &format!("{p}.upsamplers.0.conv"), (cout, cout), 3, 1, 1)?) } else { None };
            blocks.push(ResnetStack { resnets, downsampler: None, upsampler });
            cin = cout;
        }
        let bottom = c.block_out_channels[0];
        Ok(Coder {
            conv_in: Conv::load(dev, w, "decoder.conv_in", (c.latent_channels, rev[0]), 3, 1, 1)?,
            blocks,
            mid_block: UNetMidBlock2D::load(dev, w, "decoder.mid_block", rev[0], c)?,
            conv_norm_out: GroupNorm::load(dev, w, "decoder.conv_norm_out", bottom, g, EPS)?,
            conv_out: Conv::load(dev, w, "decoder.conv_out", (bottom, c.out_channels), 3, 1, 1)?,
            mid_first: true,
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(dev, x)?;
        if self.mid_first {
            h = self.mid_block.forward(dev, &h)?;
        }
        for b in &self.blocks {
            h = b.forward(dev, &h)?;
        }
        if !self.mid_first {
            h = self.mid_block.forward(dev, &h)?;
        }
        self.conv_out.forward(dev, &self.conv_norm_out.forward(dev, &h, true)?.0)
    }
}

/// The VAE posterior N(mean, exp(logvar)) per latent element, NHWC `[n, h/f, w/f, latent_channels]`, f32 on the CPU.
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

/// AutoencoderKL. Its inputs and outputs are f32 CPU tensors (NHWC) on either device; on the GPU
/// the weights and activations are bf16 and the activations come from the scratch arena, which the
/// caller resets (it is not reset here, except between the tiles of a tiled decode).
pub struct AutoencoderKl {
    pub config: VaeConfig,
    pub encoder: Coder,
    pub decoder: Coder,
    pub quant_conv: Option<Conv>,
    pub post_quant_conv: Option<Conv>,
}

/// Uploads a CPU input for `dev` (bf16 scratch on the GPU).
fn to_dev(dev: Dev, x: &Tensor) -> Result<Tensor> {
    match dev {
        Dev::Cpu => Ok(x.clone()),
        Dev::Gpu(g) => x.to_gpu(g, ArenaKind::Scratch, DType::BF16),
    }
}

/// Downloads an output of `dev` as f32 on the CPU, keeping the first `c` channels.
fn to_host(dev: Dev, y: Tensor, c: usize) -> Result<Tensor> {
    let y = match dev {
        Dev::Cpu => y,
        Dev::Gpu(g) => y.to_cpu(g)?,
    };
    let s = y.shape().to_vec();
    let stored = s[3];
    if stored == c {
        return Ok(y);
    }
    let data: Vec<f32> = y.data()?.chunks_exact(stored).flat_map(|px| px[..c].iter().copied()).collect();
    Tensor::from_vec(&[s[0], s[1], s[2], c], data)
}

impl AutoencoderKl {
    pub fn load(dev: Dev, w: &Weights, config: VaeConfig) -> Result<AutoencoderKl> {
        let l = config.latent_channels;
        Ok(AutoencoderKl {
            encoder: Coder::load_encoder(dev, w, &config)?,
            decoder: Coder::load_decoder(dev, w, &config)?,
            quant_conv: if config.use_quant_conv { Some(Conv::load(dev, w, "quant_conv", (2 * l, 2 * l), 1, 1, 0)?) } else { None },
            post_quant_conv: if config.use_post_quant_conv { Some(Conv::load(dev, w, "post_quant_conv", (l, l), 1, 1, 0)?) } else { None },
            config,
        })
    }

    /// The VAE of a model source (config.json when there is one, else SD1.5's).
    pub fn from_source(dev: Dev, src: &ModelSource) -> Result<AutoencoderKl> {
        let config = match src.config(Component::Vae)? {
            Some(cfg) => VaeConfig::from_json(&cfg)?,
            None => VaeConfig::sd15(),
        };
        AutoencoderKl::load(dev, &src.weights(Component::Vae)?, config)
    }

    /// Spatial downsampling factor (8 for SD1.5).
    pub fn factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// image NHWC `[n, h, w, in_channels]` in [-1, 1] (h and w multiples of [`factor`](Self::factor)) → posterior.
    pub fn encode(&self, dev: Dev, image: &Tensor) -> Result<Posterior> {
        let (f, s) = (self.factor(), image.shape());
        ensure!(s.len() == 4 && s[3] == self.config.in_channels, "VAE encode: image {s:?} is not NHWC with {} channels", self.config.in_channels);
        ensure!(s[1].is_multiple_of(f) && s[2].is_multiple_of(f), "VAE encode: {}x{} image is not a multiple of {f}", s[1], s[2]);
        let mut m = self.encoder.forward(dev, &to_dev(dev, image)?)?;
        if let Some(q) = &self.quant_conv {
            m = q.forward(dev, &m)?;
        }
        let l = self.config.latent_channels;
        let m = to_host(dev, m, 2 * l)?;
        let (mut mean, mut logvar) = (Vec::with_capacity(m.numel() / 2), Vec::with_capacity(m.numel() / 2));
        for px in m.data()?.chunks_exact(2 * l) {
            mean.extend_from_slice(&px[..l]);
            logvar.extend(px[l..].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        let shape = [m.shape()[0], m.shape()[1], m.shape()[2], l];
        Ok(Posterior { mean: Tensor::from_vec(&shape, mean)?, logvar: Tensor::from_vec(&shape, logvar)? })
    }

    /// latents NHWC `[n, h, w, latent_channels]` (already divided by the scaling factor) → image.
    pub fn decode(&self, dev: Dev, latents: &Tensor) -> Result<Tensor> {
        let s = latents.shape();
        ensure!(s.len() == 4 && s[3] == self.config.latent_channels, "VAE decode: latents {s:?} are not NHWC with {} channels", self.config.latent_channels);
        let mut z = to_dev(dev, latents)?;
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(dev, &z)?;
        }
        to_host(dev, self.decoder.forward(dev, &z)?, self.config.out_channels)
    }

    /// The tiling diffusers' `enable_tiling()` uses: latent tiles of sample_size / factor (64 for
    /// SD1.5: 512 px) at a stride of 3/4 tile, blended over 1/4 tile.
    pub fn default_tiling(&self) -> Tiling {
        Tiling { tile_latent: self.config.sample_size / self.factor(), overlap_factor: 0.25 }
    }

    /// [`decode`](Self::decode) tile by tile, as diffusers' `AutoencoderKL.tiled_decode`: the
    /// activation memory is one tile's whatever the image size.
    pub fn decode_tiled(&self, dev: Dev, latents: &Tensor, tiling: Tiling) -> Result<Tensor> {
        decode_tiled(latents, tiling, self.factor(), |tile| self.decode(dev, tile))
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

/// diffusers' tiled decode around any tile decoder (CPU NHWC tensors in and out): latent tiles of
/// `tile_latent` at stride `tile_latent·(1 − overlap)`, each decoded alone; every decoded tile is
/// blended linearly into the (already blended) tile above and to its left over `tile·factor·overlap`
/// image rows / columns, then cropped to `tile·factor·(1 − overlap)` and the crops concatenated.
/// Falls back to one plain decode when the latents fit in a tile.
pub fn decode_tiled(z: &Tensor, t: Tiling, factor: usize, mut decode: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let s = z.shape();
    let (zn, zh, zw, zc) = (s[0], s[1], s[2], s[3]);
    if zh <= t.tile_latent && zw <= t.tile_latent {
        return decode(z);
    }
    let stride = (t.tile_latent as f32 * (1.0 - t.overlap_factor)) as usize;
    let tile_sample = t.tile_latent * factor;
    let blend = (tile_sample as f32 * t.overlap_factor) as usize;
    let keep = tile_sample - blend;
    ensure!(stride > 0 && keep > 0, "VAE tiling {t:?}: tiles too small");
    let zd = z.data()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..zh).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        for j in (0..zw).step_by(stride) {
            let (th, tw) = (t.tile_latent.min(zh - i), t.tile_latent.min(zw - j));
            let mut tile = Vec::with_capacity(zn * th * tw * zc);
            for b in 0..zn {
                for y in i..i + th {
                    tile.extend_from_slice(&zd[((b * zh + y) * zw + j) * zc..][..tw * zc]);
                }
            }
            let mut d = decode(&Tensor::from_vec(&[zn, th, tw, zc], tile)?)?;
            if let Some(above) = rows.last() {
                blend_edge(&above[row.len()], &mut d, blend, true)?;
            }
            if let Some(left) = row.last() {
                blend_edge(left, &mut d, blend, false)?;
            }
            row.push(d);
        }
        rows.push(row);
    }
    let c = rows[0][0].shape()[3];
    let out_h: usize = rows.iter().map(|r| r[0].shape()[1].min(keep)).sum();
    let out_w: usize = rows[0].iter().map(|t| t.shape()[2].min(keep)).sum();
    let mut out = vec![0f32; zn * out_h * out_w * c];
    let mut y0 = 0;
    for row in &rows {
        let mut x0 = 0;
        for tile in row {
            let (th, tw) = (tile.shape()[1], tile.shape()[2]);
            let (kh, kw) = (th.min(keep), tw.min(keep));
            let td = tile.data()?;
            for b in 0..zn {
                for y in 0..kh {
                    out[((b * out_h + y0 + y) * out_w + x0) * c..][..kw * c].copy_from_slice(&td[((b * th + y) * tw) * c..][..kw * c]);
                }
            }
            x0 += kw;
        }
        y0 += row[0].shape()[1].min(keep);
    }
    Tensor::from_vec(&[zn, out_h, out_w, c], out)
}

/// diffusers' blend_v (`rows`) / blend_h: line i < e of `b` (counted from its top / left edge)
/// becomes a's line (last e + i)·(1 − i/e) + b's line i·(i/e).
fn blend_edge(a: &Tensor, b: &mut Tensor, extent: usize, rows: bool) -> Result<()> {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let axis = if rows { 1 } else { 2 };
    let e = extent.min(sa[axis]).min(sb[axis]);
    let (ad, bd, c) = (a.data()?, b.data_mut()?, sb[3]);
    for n in 0..sb[0] {
        for y in 0..sb[1] {
            for x in 0..sb[2] {
                let i = if rows { y } else { x };
                if i >= e {
                    continue;
                }
                let (ay, ax) = if rows { (sa[1] - e + y, x) } else { (y, sa[2] - e + x) };
                let f = i as f32 / e as f32;
                let ap = &ad[((n * sa[1] + ay) * sa[2] + ax) * c..][..c];
                let bp = &mut bd[((n * sb[1] + y) * sb[2] + x) * c..][..c];
                bp.iter_mut().zip(ap).for_each(|(bv, av)| *bv = av * (1.0 - f) + *bv * f);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "vae_tests.rs"]
mod tests;
