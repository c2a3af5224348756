//! CLIPTextModel (the ViT-L/14 text tower SD1.5 conditions on), structured and named as transformers
//! defines it: `text_model.embeddings.{token,position}_embedding`, `text_model.encoder.layers.N`
//! (pre-LN: layer_norm1 → causal self_attn (q/k/v/out_proj, with bias) → +; layer_norm2 → mlp fc1 →
//! quick_gelu → fc2 → +), `text_model.final_layer_norm`. The UNet gets `last_hidden_state`, the output
//! of the final LayerNorm: `[batch, 77, hidden]`.
//!
//! Runs on either device of `model::layers::Dev`: the f32 CPU twins, or the GPU kernels in bf16 (checked
//! against transformers at full size in `model::sd15_tests`).

use super::functional::add;
use super::layers::{Dev, LayerNorm, Linear};
use super::weights::{ModelSource, Weights};
use super::cfg_usize;
use crate::cuda::ArenaKind;
use crate::ops::activation;
use crate::ops::attention::{self as attn, AttnShape};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, ensure, Result};

/// The fields of transformers' CLIPTextConfig that the forward uses.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
}

impl ClipTextConfig {
    /// SD1.5's text encoder (openai/clip-vit-large-patch14's text tower).
    pub fn sd15() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
        }
    }

    /// From a text_encoder/config.json.
    pub fn from_json(cfg: &serde_json::Value) -> Result<ClipTextConfig> {
        let act = cfg.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            bail!("text encoder hidden_act {act:?} is not supported (SD1.5's CLIP uses quick_gelu)");
        }
        let c = ClipTextConfig {
            vocab_size: cfg_usize(cfg, "vocab_size")?,
            hidden_size: cfg_usize(cfg, "hidden_size")?,
            intermediate_size: cfg_usize(cfg, "intermediate_size")?,
            num_hidden_layers: cfg_usize(cfg, "num_hidden_layers")?,
            num_attention_heads: cfg_usize(cfg, "num_attention_heads")?,
            max_position_embeddings: cfg_usize(cfg, "max_position_embeddings")?,
            layer_norm_eps: cfg.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5) as f32,
        };
        ensure!(c.hidden_size.is_multiple_of(c.num_attention_heads), "hidden_size {} is not a multiple of {} heads", c.hidden_size, c.num_attention_heads);
        Ok(c)
    }
}

/// quick_gelu(x) = x·σ(1.702·x), CLIP's activation.
fn quick_gelu(dev: Dev, x: &Tensor) -> Result<Tensor> {
    match dev {
        Dev::Cpu => Tensor::from_vec(x.shape(), activation::quick_gelu_cpu(x.data()?)),
        Dev::Gpu(g) => {
            let mut y = Tensor::empty_gpu(g, ArenaKind::Scratch, x.shape(), DType::BF16)?;
            activation::quick_gelu(g, x, &mut y)?;
            Ok(y)
        }
    }
}

/// Causal self-attention over q, k, v `[batch, seq, heads·head_dim]`, scale 1/√head_dim.
fn causal_attention(dev: Dev, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let qs = q.shape();
    let s = AttnShape { batch: qs[0], q_len: qs[1], kv_len: qs[1], heads, head_dim: qs[2] / heads, causal: true };
    let scale = (s.head_dim as f32).powf(-0.5);
    match dev {
        Dev::Cpu => Tensor::from_vec(qs, attn::attention_cpu(q.data()?, k.data()?, v.data()?, &s, scale)),
        Dev::Gpu(g) => {
            let o = Tensor::empty_gpu(g, ArenaKind::Scratch, qs, DType::BF16)?;
            let d = attn::Strided::dense;
            attn::attention_forward(g, d(q), d(k), d(v), d(&o), None, &s, scale)?;
            Ok(o)
        }
    }
}

/// One pre-LN transformer layer of the text encoder.
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    heads: usize,
}

impl ClipEncoderLayer {
    fn load(dev: Dev, w: &Weights, prefix: &str, c: &ClipTextConfig) -> Result<ClipEncoderLayer> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let lin = |name: &str, fan_in, fan_out| Linear::load(dev, w, &format!("{prefix}.{name}"), fan_in, fan_out, true, false);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(dev, w, &format!("{prefix}.layer_norm1"), d, c.layer_norm_eps)?,
            q_proj: lin("self_attn.q_proj", d, d)?,
            k_proj: lin("self_attn.k_proj", d, d)?,
            v_proj: lin("self_attn.v_proj", d, d)?,
            out_proj: lin("self_attn.out_proj", d, d)?,
            layer_norm2: LayerNorm::load(dev, w, &format!("{prefix}.layer_norm2"), d, c.layer_norm_eps)?,
            fc1: lin("mlp.fc1", d, i)?,
            fc2: lin("mlp.fc2", i, d)?,
            heads: c.num_attention_heads,
        })
    }

    /// x: `[batch, seq, d]`.
    fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(dev, x)?.0;
        let (q, k, v) = (self.q_proj.forward(dev, &h)?, self.k_proj.forward(dev, &h)?, self.v_proj.forward(dev, &h)?);
        let x = add(dev, x, &self.out_proj.forward(dev, &causal_attention(dev, &q, &k, &v, self.heads)?)?)?;
        let h = self.layer_norm2.forward(dev, &x)?.0;
        let m = self.fc2.forward(dev, &quick_gelu(dev, &self.fc1.forward(dev, &h)?)?)?;
        add(dev, &x, &m)
    }
}

/// CLIPTextModel. The embedding tables stay in f32 on the CPU (the lookup is a gather); the layers
/// live on the model's device (bf16 on the GPU).
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub token_embedding: Vec<f32>,
    pub position_embedding: Vec<f32>,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads `text_model.*` from `w` (names as in transformers' CLIPTextModel).
    pub fn load(dev: Dev, w: &Weights, config: ClipTextConfig) -> Result<ClipTextModel> {
        let c = &config;
        let d = c.hidden_size;
        let layers = (0..c.num_hidden_layers)
            .map(|l| ClipEncoderLayer::load(dev, w, &format!("text_model.encoder.layers.{l}"), c))
            .collect::<Result<_>>()?;
        Ok(ClipTextModel {
            token_embedding: w.vec("text_model.embeddings.token_embedding.weight", &[c.vocab_size, d])?,
            position_embedding: w.vec("text_model.embeddings.position_embedding.weight", &[c.max_position_embeddings, d])?,
            layers,
            final_layer_norm: LayerNorm::load(dev, w, "text_model.final_layer_norm", d, c.layer_norm_eps)?,
            config,
        })
    }

    /// The text encoder of a model source (config.json when there is one, else SD1.5's).
    pub fn from_source(dev: Dev, src: &ModelSource) -> Result<ClipTextModel> {
        use super::weights::Component::TextEncoder;
        let config = match src.config(TextEncoder)? {
            Some(cfg) => ClipTextConfig::from_json(&cfg)?,
            None => ClipTextConfig::sd15(),
        };
        ClipTextModel::load(dev, &src.weights(TextEncoder)?, config)
    }

    /// last_hidden_state `[batch, seq, hidden]` for token ids `[batch, seq]` (row-major, seq ≤ 77),
    /// on `dev` (f32 on the CPU, bf16 in the GPU's scratch arena, ready for the UNet's cross attention).
    pub fn forward(&self, dev: Dev, ids: &[u32], batch: usize) -> Result<Tensor> {
        let c = &self.config;
        let d = c.hidden_size;
        ensure!(batch > 0 && ids.len().is_multiple_of(batch), "{} token ids do not split into {batch} prompts", ids.len());
        let seq = ids.len() / batch;
        ensure!(seq <= c.max_position_embeddings, "{seq} tokens per prompt, the model has {} positions", c.max_position_embeddings);
        let mut x = vec![0f32; batch * seq * d];
        for (row, (&id, out)) in ids.iter().zip(x.chunks_exact_mut(d)).enumerate() {
            ensure!((id as usize) < c.vocab_size, "token id {id} is outside the vocabulary ({})", c.vocab_size);
            let tok = &self.token_embedding[id as usize * d..][..d];
            let pos = &self.position_embedding[(row % seq) * d..][..d];
            out.iter_mut().zip(tok.iter().zip(pos)).for_each(|(o, (t, p))| *o = t + p);
        }
        let x = Tensor::from_vec(&[batch, seq, d], x)?;
        let mut x = match dev {
            Dev::Cpu => x,
            Dev::Gpu(g) => x.to_gpu(g, ArenaKind::Scratch, DType::BF16)?,
        };
        for layer in &self.layers {
            x = layer.forward(dev, &x)?;
        }
        Ok(self.final_layer_norm.forward(dev, &x)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::SafetensorsFile;
    use crate::tensor::{assert_close, compare};
    use crate::testing::fixtures_dir;
    use crate::tokenizer::ClipTokenizer;

    /// The tiny fixture CLIPTextModel (2 layers, d 32, 4 heads), fed the ids its own tokenizer gives
    /// two prompts, matches transformers' last_hidden_state.
    #[test]
    fn tiny_clip_matches_transformers() {
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let model = ClipTextModel::from_source(Dev::Cpu, &src).unwrap();
        let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
        let want_ids: Vec<u32> = io.raw("clip.input_ids").unwrap().bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let tok = ClipTokenizer::from_dir(&src.tokenizer_dir().unwrap()).unwrap();
        let ids = tok.encode_batch(&[SEED0, "A photo of a cat, café!"]).unwrap();
        assert_eq!(ids, want_ids);
        let out = model.forward(Dev::Cpu, &ids, 2).unwrap();
        assert_eq!(out.shape(), &[2, 77, 32]);
        let want = io.raw("clip.last_hidden_state").unwrap().to_f32().unwrap();
        let c = compare(out.data().unwrap(), &want);
        eprintln!("CLIP last_hidden_state: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
        assert_close("CLIP last_hidden_state", out.data().unwrap(), &want, 1e-4);
    }

    /// The same weights through the single-file LDM checkpoint (f16 storage) give nearly the same output.
    #[test]
    fn tiny_clip_from_ldm_checkpoint() {
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd-ldm.safetensors").to_str().unwrap()).unwrap();
        let folder = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let cfg = ClipTextConfig::from_json(&folder.config(crate::model::weights::Component::TextEncoder).unwrap().unwrap()).unwrap();
        let model = ClipTextModel::load(Dev::Cpu, &src.weights(crate::model::weights::Component::TextEncoder).unwrap(), cfg).unwrap();
        let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
        let ids: Vec<u32> = io.raw("clip.input_ids").unwrap().bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let out = model.forward(Dev::Cpu, &ids, 2).unwrap();
        assert_close("CLIP from f16 LDM weights", out.data().unwrap(), &io.raw("clip.last_hidden_state").unwrap().to_f32().unwrap(), 1e-2);
    }

    #[test]
    fn sd15_config_and_bad_ids() {
        let folder = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let model = ClipTextModel::from_source(Dev::Cpu, &folder).unwrap();
        let err = format!("{:#}", model.forward(Dev::Cpu, &[5000; 77], 1).unwrap_err());
        assert!(err.contains("5000"), "{err}");
        assert_eq!(ClipTextConfig::sd15().hidden_size / ClipTextConfig::sd15().num_attention_heads, 64);
    }

    const SEED0: &str = "<cheburashka>, close-up portrait, huge round furry ears, soft brown and beige fur, standing in a cozy kids playroom, blue walls with glowing stars, colorful space-themed drawings on the easel and walls";
}
