//! LoRA weights on disk, in the two formats other tools load.
//!
//! - **diffusers / PEFT** (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(dir)`
//!   reads): `unet.<module>.lora_A.weight` [r, in] and `unet.<module>.lora_B.weight` [out, r], with
//!   `<module>` the diffusers path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
//!   Rank and alpha go in the safetensors metadata under `lora_adapter_metadata`, as diffusers
//!   writes them; without it, alpha = rank.
//! - **kohya** (ComfyUI, A1111): `lora_unet_<module with _ for .>.lora_down.weight` [r, in],
//!   `.lora_up.weight` [out, r] and `.alpha` (a scalar).
//!
//! Reading accepts both, plus PEFT's `base_model.model.` prefix; text-encoder LoRA keys are
//! skipped and reported (only UNet LoRAs are supported).

use crate::io::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
const METADATA_KEY: &str = "lora_adapter_metadata";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Diffusers,
    Kohya,
}

/// One adapted linear layer: y += (alpha / rank) · (x·Aᵀ)·Bᵀ.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub alpha: f32,
    /// [rank, in_features], row-major.
    pub a: Vec<f32>,
    /// [out_features, rank], row-major.
    pub b: Vec<f32>,
}

impl LoraLayer {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// The LoRA layers of a model, keyed by diffusers module path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraWeights {
    pub layers: BTreeMap<String, LoraLayer>,
}

/// What [`load_lora`] read: the UNet layers and the keys it skipped (e.g. text-encoder LoRA).
pub struct LoadedLora {
    pub weights: LoraWeights,
    pub skipped: Vec<String>,
}

/// Writes `weights` as `file` in `format` (f32 tensors; temp file + rename).
pub fn save_lora(weights: &LoraWeights, file: &Path, format: LoraFormat) -> Result<()> {
    ensure!(!weights.layers.is_empty(), "no LoRA layers to save");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (module, l) in &weights.layers {
        let (a_key, b_key) = match format {
            LoraFormat::Diffusers => (format!("unet.{module}.lora_A.weight"), format!("unet.{module}.lora_B.weight")),
            LoraFormat::Kohya => {
                let base = kohya_name(module);
                tensors.push((format!("{base}.alpha"), vec![], bytemuck::cast_slice(&[l.alpha]).to_vec()));
                (format!("{base}.lora_down.weight"), format!("{base}.lora_up.weight"))
            }
        };
        tensors.push((a_key, vec![l.rank, l.in_features], bytemuck::cast_slice(&l.a).to_vec()));
        tensors.push((b_key, vec![l.out_features, l.rank], bytemuck::cast_slice(&l.b).to_vec()));
    }
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    if format == LoraFormat::Diffusers {
        let first = weights.layers.values().next().unwrap();
        let uniform = weights.layers.values().all(|l| l.rank == first.rank && l.alpha == first.alpha);
        ensure!(uniform, "the diffusers format stores one rank and alpha; these layers differ (save as kohya instead)");
        let mut modules: Vec<String> = weights.layers.keys().filter_map(|m| projection_name(m)).collect();
        modules.sort();
        modules.dedup();
        let config = serde_json::json!({ "unet.r": first.rank, "unet.lora_alpha": first.alpha, "unet.target_modules": modules });
        metadata.insert(METADATA_KEY.to_string(), config.to_string());
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, shape, bytes)| Ok((k.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &Some(metadata))?;
    write_atomic(file, &bytes)
}

/// The projection a module path ends in (`to_q`, `to_k`, `to_v`, `to_out.0`), for PEFT's target_modules.
fn projection_name(module: &str) -> Option<String> {
    module.find(".to_").map(|i| module[i + 1..].to_string())
}

/// Diffusers module path → kohya key stem: `lora_unet_` + path with `.` replaced by `_`.
pub fn kohya_name(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// Kohya key stem → diffusers module path. Underscores inside diffusers identifiers are kept.
fn module_from_kohya(stem: &str) -> Option<String> {
    const COMPOUNDS: [&str; 13] = [
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "proj_out", "ff_net", "conv_shortcut", "time_emb_proj",
    ];
    let rest = stem.strip_prefix("lora_unet_")?;
    let tokens: Vec<&str> = rest.split('_').collect();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let joined = tokens.get(i + 1).map(|next| format!("{}_{next}", tokens[i]));
        match joined {
            Some(j) if COMPOUNDS.contains(&j.as_str()) => {
                parts.push(j);
                i += 2;
            }
            _ => {
                parts.push(tokens[i].to_string());
                i += 1;
            }
        }
    }
    // diffusers' feed-forward is `ff.net.N`: undo the compound used only to keep it together.
    Some(parts.join(".").replace("ff_net", "ff.net"))
}

/// Reads a LoRA file in either format (f32, f16 or bf16 tensors).
pub fn load_lora(file: &Path) -> Result<LoadedLora> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read LoRA file {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let peft_alpha: Option<f32> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| v.get("unet.lora_alpha").or_else(|| v.get("lora_alpha")).and_then(|a| a.as_f64()))
        .map(|a| a as f32);

    let mut a_mats: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut b_mats: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut alphas: HashMap<String, f32> = HashMap::new();
    let mut skipped = Vec::new();
    for (key, view) in st.tensors() {
        let values = || to_f32(&view).with_context(|| format!("{}: tensor {key}", file.display()));
        if let Some(stem) = key.strip_suffix(".alpha") {
            if let Some(module) = module_from_kohya(stem) {
                alphas.insert(module, *values()?.first().context("empty alpha")?);
                continue;
            }
        }
        let parsed = parse_key(&key);
        match parsed {
            Some((module, true)) => a_mats.insert(module, (view.shape().to_vec(), values()?)),
            Some((module, false)) => b_mats.insert(module, (view.shape().to_vec(), values()?)),
            None => {
                skipped.push(key);
                continue;
            }
        };
    }
    let mut weights = LoraWeights::default();
    for (module, (a_shape, a)) in a_mats {
        let (b_shape, b) = b_mats.remove(&module).with_context(|| format!("{}: {module} has a down (A) matrix but no up (B)", file.display()))?;
        ensure!(
            a_shape.len() == 2 && b_shape.len() == 2 && a_shape[0] == b_shape[1],
            "{}: {module}: A is {a_shape:?} and B is {b_shape:?}; expected [r, in] and [out, r]",
            file.display()
        );
        let rank = a_shape[0];
        let alpha = alphas.get(&module).copied().or(peft_alpha).unwrap_or(rank as f32);
        weights.layers.insert(module, LoraLayer { rank, in_features: a_shape[1], out_features: b_shape[0], alpha, a, b });
    }
    if let Some(module) = b_mats.keys().next() {
        bail!("{}: {module} has an up (B) matrix but no down (A)", file.display());
    }
    ensure!(!weights.layers.is_empty(), "{} holds no UNet LoRA layers (keys skipped: {})", file.display(), skipped.len());
    Ok(LoadedLora { weights, skipped })
}

/// (module, is_down) for a UNet LoRA key in either format; None for anything else.
fn parse_key(key: &str) -> Option<(String, bool)> {
    for (suffix, down) in [(".lora_A.weight", true), (".lora_B.weight", false)] {
        if let Some(stem) = key.strip_suffix(suffix) {
            let module = stem.strip_prefix("unet.").or_else(|| stem.strip_prefix("base_model.model.")).unwrap_or(stem);
            if module.starts_with("text_encoder") {
                return None;
            }
            return Some((module.to_string(), down));
        }
    }
    for (suffix, down) in [(".lora_down.weight", true), (".lora_up.weight", false)] {
        if let Some(stem) = key.strip_suffix(suffix) {
            return module_from_kohya(stem).map(|m| (m, down));
        }
    }
    None
}

fn to_f32(view: &TensorView) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample_weights() -> LoraWeights {
        let mut rng = Rng::new(3);
        let mut w = LoraWeights::default();
        for module in [
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
        ] {
            let (r, i, o) = (4, 6, 5);
            w.layers.insert(
                module.into(),
                LoraLayer { rank: r, in_features: i, out_features: o, alpha: 8.0, a: rng.normal_vec(r * i, 1.0), b: rng.normal_vec(o * r, 1.0) },
            );
        }
        w
    }

    #[test]
    fn both_formats_round_trip() {
        let dir = std::env::temp_dir().join(format!("sdlora-ckpt-{}", std::process::id()));
        let w = sample_weights();
        for (format, name) in [(LoraFormat::Diffusers, DIFFUSERS_FILE), (LoraFormat::Kohya, KOHYA_FILE)] {
            save_lora(&w, &dir.join(name), format).unwrap();
            let back = load_lora(&dir.join(name)).unwrap();
            assert!(back.skipped.is_empty(), "{:?}", back.skipped);
            assert_eq!(back.weights, w, "{format:?}");
        }
    }

    #[test]
    fn kohya_names_map_back_to_module_paths() {
        let m = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0";
        assert_eq!(kohya_name(m), "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0");
        assert_eq!(module_from_kohya(&kohya_name(m)).unwrap(), m);
        assert_eq!(module_from_kohya("lora_unet_mid_block_attentions_0_proj_in").unwrap(), "mid_block.attentions.0.proj_in");
        assert_eq!(
            module_from_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2").unwrap(),
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
        );
    }

    #[test]
    fn text_encoder_keys_are_skipped_and_mismatches_are_errors() {
        let dir = std::env::temp_dir().join(format!("sdlora-ckpt-te-{}", std::process::id()));
        let one = bytemuck::cast_slice::<f32, u8>(&[1.0; 6]).to_vec();
        let file = dir.join("mixed.safetensors");
        let write = |entries: Vec<(&str, Vec<usize>)>| {
            let views: Vec<(String, TensorView)> =
                entries.into_iter().map(|(k, s)| (k.to_string(), TensorView::new(Dtype::F32, s.clone(), &one[..s.iter().product::<usize>() * 4]).unwrap())).collect();
            write_atomic(&file, &safetensors::serialize(views, &None).unwrap()).unwrap();
        };
        write(vec![
            ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", vec![1, 6]),
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", vec![1, 6]),
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", vec![3, 1]),
        ]);
        let loaded = load_lora(&file).unwrap();
        assert_eq!(loaded.skipped.len(), 1);
        let layer = &loaded.weights.layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"];
        assert_eq!((layer.rank, layer.in_features, layer.out_features, layer.alpha), (1, 6, 3, 1.0));

        write(vec![("unet.x.to_q.lora_A.weight", vec![2, 3]), ("unet.x.to_q.lora_B.weight", vec![3, 1])]);
        let err = format!("{:#}", load_lora(&file).err().unwrap());
        assert!(err.contains("x.to_q") && err.contains("[2, 3]"), "{err}");
        std::fs::write(&file, b"garbage").unwrap();
        assert!(format!("{:#}", load_lora(&file).err().unwrap()).contains("not a valid safetensors"));
    }
}
