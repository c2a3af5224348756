//! The `--lora PATH[:SCALE]` files of `sdlora sample`, combined into one adapter per projection.
//!
//! Several LoRAs on one projection add up: Δy = Σ_k s_k·(α_k/r_k)·(x·A_kᵀ)·B_kᵀ. That sum is one LoRA
//! of rank R = Σ r_k with A = [A_1; A_2; …] (rows stacked, [R, in]) and B = [c_1·B_1 | c_2·B_2 | …]
//! (columns side by side, [out, R]), c_k = s_k·α_k/r_k, and alpha = R (scale 1): the UNet then runs
//! one LoRA GEMM pair per projection whatever the number of files.
//!
//! Files: ours and diffusers/PEFT files (`unet.<module>.lora_A/B.weight`), and kohya files
//! (`lora_unet_<name>.lora_down/lora_up.weight`, `.alpha`) whose `<name>` is either the diffusers
//! module path with `_` for `.` or, from tools that follow the original LDM code, an LDM UNet path
//! (`input_blocks_{i}_1_…`, `middle_block_1_…`, `output_blocks_{i}_1_…`), mapped here to diffusers
//! paths for SD1.5's layout (two layers per block). Text-encoder keys (`lora_te_*`, `text_encoder.*`)
//! are skipped with one warning; any other key is an error.

use crate::checkpoint::{load_lora, LoraLayer, LoraWeights, DIFFUSERS_FILE, KOHYA_FILE};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Layers per down block in SD1.5's UNet (an up block has one more): fixes the LDM block numbering.
const LDM_LAYERS_PER_BLOCK: usize = 2;

/// One `--lora` argument: a file (or a checkpoint folder holding one) and its strength.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    /// `PATH` or `PATH:SCALE` (a trailing `:number` is the scale; other colons belong to the path).
    pub fn parse(arg: &str) -> Result<LoraSpec> {
        if let Some((path, scale)) = arg.rsplit_once(':') {
            if let Ok(s) = scale.parse::<f32>() {
                ensure!(s.is_finite(), "--lora {arg}: the scale must be a finite number");
                ensure!(!path.is_empty(), "--lora {arg}: no path before the scale");
                return Ok(LoraSpec { path: path.into(), scale: s });
            }
        }
        Ok(LoraSpec { path: arg.into(), scale: 1.0 })
    }

    /// The safetensors file: the path itself, or in a folder (a `step_N` checkpoint) its diffusers
    /// file, else its kohya file, else its only `.safetensors` file.
    pub fn file(&self) -> Result<PathBuf> {
        let p = &self.path;
        if p.is_file() {
            return Ok(p.clone());
        }
        ensure!(p.is_dir(), "LoRA {}: no such file or folder", p.display());
        for name in [DIFFUSERS_FILE, KOHYA_FILE] {
            if p.join(name).is_file() {
                return Ok(p.join(name));
            }
        }
        let found: Vec<PathBuf> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "safetensors") && !f.file_name().is_some_and(|n| n == "optimizer.safetensors"))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!("LoRA folder {} holds no {DIFFUSERS_FILE}, {KOHYA_FILE} or other .safetensors file", p.display()),
            _ => bail!("LoRA folder {} holds {} .safetensors files: name the one to use", p.display(), found.len()),
        }
    }

    /// `name:scale` for the PNG's parameters line.
    pub fn label(&self) -> String {
        let name = self.path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let name = if name == "pytorch_lora_weights" || name == "lora_kohya" {
            self.path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().to_string()).unwrap_or(name)
        } else {
            name
        };
        format!("{name}:{}", self.scale)
    }
}

/// A LoRA file read for sampling: its UNet layers under diffusers module paths.
pub struct SampleLora {
    pub spec: LoraSpec,
    pub weights: LoraWeights,
    /// How many text-encoder keys were skipped.
    pub skipped_text_encoder: usize,
}

/// Reads one `--lora`: maps LDM-style kohya names, skips text-encoder keys, rejects anything else.
pub fn read(spec: &LoraSpec) -> Result<SampleLora> {
    let file = spec.file()?;
    let loaded = load_lora(&file)?;
    let (te, unknown): (Vec<String>, Vec<String>) = loaded.skipped.into_iter().partition(|k| is_text_encoder_key(k));
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
        bail!("LoRA {}: {} key(s) are neither UNet nor text-encoder LoRA weights, e.g. {shown:?}", file.display(), unknown.len());
    }
    let mut weights = LoraWeights::default();
    for (module, layer) in loaded.weights.layers {
        let mapped = diffusers_module(&module).with_context(|| format!("LoRA {}", file.display()))?;
        ensure!(!weights.layers.contains_key(&mapped), "LoRA {}: two entries for {mapped}", file.display());
        weights.layers.insert(mapped, layer);
    }
    Ok(SampleLora { spec: spec.clone(), weights, skipped_text_encoder: te.len() })
}

fn is_text_encoder_key(key: &str) -> bool {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    k.starts_with("lora_te") || k.starts_with("text_encoder") || k.starts_with("te_")
}

/// A module path as the checkpoint reader produced it → the diffusers path. Paths in LDM numbering
/// (what the kohya reader makes of `lora_unet_input_blocks_…`) are renumbered; others pass through.
pub fn diffusers_module(module: &str) -> Result<String> {
    let ldm = |prefixes: [&str; 2]| prefixes.iter().find_map(|p| module.strip_prefix(p));
    let lpb = LDM_LAYERS_PER_BLOCK;
    let index_then = |rest: &str| -> Result<(usize, String)> {
        let (i, tail) = rest.split_once('.').with_context(|| format!("LDM-style LoRA module {module:?} is cut short"))?;
        let i: usize = i.parse().with_context(|| format!("LDM-style LoRA module {module:?}: block index {i:?}"))?;
        let tail = tail.strip_prefix("1.").with_context(|| format!("LDM-style LoRA module {module:?} is not in a transformer (…_{i}_1_…)"))?;
        Ok((i, tail.to_string()))
    };
    if let Some(rest) = ldm(["input.blocks.", "input_blocks."]) {
        let (i, tail) = index_then(rest)?;
        let (block, j) = ((i.max(1) - 1) / (lpb + 1), (i.max(1) - 1) % (lpb + 1));
        ensure!(i >= 1 && j < lpb && block < 3, "LDM-style LoRA module {module:?}: input block {i} has no attention in SD1.5");
        return Ok(format!("down_blocks.{block}.attentions.{j}.{tail}"));
    }
    if let Some(rest) = ldm(["middle.block.", "middle_block."]) {
        let tail = rest.strip_prefix("1.").with_context(|| format!("LDM-style LoRA module {module:?}: only middle_block_1 has attention"))?;
        return Ok(format!("mid_block.attentions.0.{tail}"));
    }
    if let Some(rest) = ldm(["output.blocks.", "output_blocks."]) {
        let (i, tail) = index_then(rest)?;
        let (block, j) = (i / (lpb + 1), i % (lpb + 1));
        ensure!((1..4).contains(&block), "LDM-style LoRA module {module:?}: output block {i} has no attention in SD1.5");
        return Ok(format!("up_blocks.{block}.attentions.{j}.{tail}"));
    }
    Ok(module.to_string())
}

/// All LoRAs as one adapter per projection (see the module docs): alpha = total rank, so scale 1.
pub fn combine(loras: &[SampleLora]) -> Result<LoraWeights> {
    let mut parts: BTreeMap<&str, Vec<(&LoraLayer, f32)>> = BTreeMap::new();
    for l in loras {
        for (module, layer) in &l.weights.layers {
            parts.entry(module).or_default().push((layer, l.spec.scale * layer.scale()));
        }
    }
    let mut out = LoraWeights::default();
    for (module, layers) in parts {
        let (in_f, out_f) = (layers[0].0.in_features, layers[0].0.out_features);
        for (l, _) in &layers {
            ensure!((l.in_features, l.out_features) == (in_f, out_f), "LoRAs disagree on the shape of {module}: {}→{} and {in_f}→{out_f}", l.in_features, l.out_features);
        }
        let rank: usize = layers.iter().map(|(l, _)| l.rank).sum();
        let a: Vec<f32> = layers.iter().flat_map(|(l, _)| l.a.iter().copied()).collect();
        let mut b = Vec::with_capacity(out_f * rank);
        for o in 0..out_f {
            for (l, c) in &layers {
                b.extend(l.b[o * l.rank..(o + 1) * l.rank].iter().map(|v| c * v));
            }
        }
        out.layers.insert(module.to_string(), LoraLayer { rank, in_features: in_f, out_features: out_f, alpha: rank as f32, a, b });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::lora::{lora_forward_cpu, LoraShape};
    use crate::rng::Rng;

    fn layer(rng: &mut Rng, rank: usize, alpha: f32) -> LoraLayer {
        let (i, o) = (6, 5);
        LoraLayer { rank, in_features: i, out_features: o, alpha, a: rng.normal_vec(rank * i, 1.0), b: rng.normal_vec(o * rank, 1.0) }
    }

    fn lora(module: &str, l: LoraLayer, scale: f32) -> SampleLora {
        let mut weights = LoraWeights::default();
        weights.layers.insert(module.into(), l);
        SampleLora { spec: LoraSpec { path: "x".into(), scale }, weights, skipped_text_encoder: 0 }
    }

    /// The combined adapter's output is the sum of each LoRA's own contribution (and the base).
    #[test]
    fn combined_adapter_is_the_sum_of_the_loras() {
        let mut rng = Rng::new(11);
        let (l1, l2) = (layer(&mut rng, 3, 8.0), layer(&mut rng, 2, 1.0));
        let (s1, s2) = (0.7, -1.3);
        let m = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
        let combined = combine(&[lora(m, l1.clone(), s1), lora(m, l2.clone(), s2)]).unwrap();
        let c = &combined.layers[m];
        assert_eq!((c.rank, c.alpha), (5, 5.0));
        let (rows, i, o) = (4, 6, 5);
        let x = rng.normal_vec(rows * i, 1.0);
        let w = rng.normal_vec(o * i, 1.0);
        let zero = vec![0.0; o * i];
        let run = |l: &LoraLayer, w: &[f32], s: f32| lora_forward_cpu(&x, w, None, &l.a, &l.b, s * l.scale(), &LoraShape { m: rows, in_f: i, out_f: o, rank: l.rank });
        let got = run(c, &w, 1.0);
        let (base, d1, d2) = (run(&l1, &w, 0.0), run(&l1, &zero, s1), run(&l2, &zero, s2));
        let want: Vec<f32> = (0..got.len()).map(|k| base[k] + d1[k] + d2[k]).collect();
        crate::tensor::assert_close("combined LoRA", &got, &want, 1e-6);
        // A module only one LoRA adapts keeps that LoRA's (scaled) contribution alone.
        let other = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v";
        let only = combine(&[lora(m, l1.clone(), s1), lora(other, l2.clone(), s2)]).unwrap();
        assert_eq!(only.layers.len(), 2);
        let got = run(&only.layers[other], &zero, 1.0);
        crate::tensor::assert_close("single LoRA", &got, &d2, 1e-6);
    }

    #[test]
    fn ldm_names_map_to_diffusers_modules() {
        let cases = [
            ("input.blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            ("input.blocks.2.1.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"),
            ("input.blocks.4.1.transformer_blocks.0.attn1.to_v", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"),
            ("input.blocks.8.1.transformer_blocks.0.attn1.to_out.0", "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0"),
            ("middle.block.1.transformer_blocks.0.attn2.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"),
            ("output.blocks.3.1.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            ("output.blocks.5.1.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"),
            ("output.blocks.7.1.transformer_blocks.0.attn2.to_v", "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v"),
            ("output.blocks.11.1.transformer_blocks.0.attn1.to_k", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_k"),
            ("output_blocks.9.1.proj_in", "up_blocks.3.attentions.0.proj_in"),
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(diffusers_module(ldm).unwrap(), diffusers, "{ldm}");
        }
        for bad in ["input.blocks.3.0.op", "input.blocks.10.1.transformer_blocks.0.attn1.to_q", "output.blocks.1.1.x", "middle.block.0.in_layers_2", "input.blocks.0.1.x"] {
            assert!(diffusers_module(bad).is_err(), "{bad} must not map");
        }
    }

    /// A kohya file in LDM naming with text-encoder keys: mapped, counted; a stray key is an error.
    #[test]
    fn kohya_ldm_files_load_and_stray_keys_fail() {
        use safetensors::{tensor::TensorView, Dtype};
        let dir = std::env::temp_dir().join(format!("sdlora-sample-kohya-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("other_tool.safetensors");
        let values = bytemuck::cast_slice::<f32, u8>(&[0.5; 12]).to_vec();
        let write = |keys: &[(String, Vec<usize>)]| {
            let views: Vec<(String, TensorView)> =
                keys.iter().map(|(k, s)| (k.to_string(), TensorView::new(Dtype::F32, s.clone(), &values[..s.iter().product::<usize>() * 4]).unwrap())).collect();
            crate::io::write_atomic(&file, &safetensors::serialize(views, &None).unwrap()).unwrap();
        };
        let stem = "lora_unet_output_blocks_4_1_transformer_blocks_0_attn2_to_out_0";
        let mut keys = vec![
            (format!("{stem}.lora_down.weight"), vec![2, 6]),
            (format!("{stem}.lora_up.weight"), vec![3, 2]),
            (format!("{stem}.alpha"), vec![]),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".to_string(), vec![2, 6]),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".to_string(), vec![3, 2]),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha".to_string(), vec![]),
        ];
        write(&keys);
        let spec = LoraSpec { path: file.clone(), scale: 1.0 };
        let l = read(&spec).unwrap();
        assert_eq!(l.skipped_text_encoder, 3);
        let layer = &l.weights.layers["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0"];
        assert_eq!((layer.rank, layer.in_features, layer.out_features, layer.alpha), (2, 6, 3, 0.5));
        keys.push(("lora_unet_something.dora_scale".to_string(), vec![3]));
        write(&keys);
        let err = format!("{:#}", read(&spec).err().unwrap());
        assert!(err.contains("dora_scale") && err.contains("1 key"), "{err}");
    }

    #[test]
    fn lora_args_parse() {
        assert_eq!(LoraSpec::parse("a/b").unwrap(), LoraSpec { path: "a/b".into(), scale: 1.0 });
        assert_eq!(LoraSpec::parse("a/step_20:0.5").unwrap(), LoraSpec { path: "a/step_20".into(), scale: 0.5 });
        assert_eq!(LoraSpec::parse("C:/x.safetensors").unwrap().path, PathBuf::from("C:/x.safetensors"));
        assert_eq!(LoraSpec::parse("a:-1").unwrap().scale, -1.0);
        assert!(LoraSpec::parse(":2").is_err());
        assert_eq!(LoraSpec { path: "m/step_20/pytorch_lora_weights.safetensors".into(), scale: 0.5 }.label(), "step_20:0.5");
    }
}
