//! LoRA adapters on the UNet's attention projections, as PEFT's `LoraConfig(r, lora_alpha,
//! target_modules=["to_q", "to_k", "to_v", "to_out.0"])` adds them to attn1 and attn2 of every
//! BasicTransformerBlock: A [r, in] ~ kaiming-uniform(a=√5) (bound 1/√in, PEFT's default) or
//! N(0, (1/r)²) ("gaussian"), B [out, r] = 0, scale = alpha / r.

use super::layers::{LoraAdapter, Linear};
use super::unet::UNet2DConditionModel;
use crate::checkpoint::{LoraLayer, LoraWeights};
use crate::rng::Rng;
use anyhow::{bail, ensure, Result};

pub const DEFAULT_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    KaimingUniform,
    Gaussian,
}

/// Every attention projection of the UNet with its diffusers module path, in a fixed order.
pub fn projections(unet: &mut UNet2DConditionModel) -> Vec<(String, &mut Linear)> {
    let mut out = Vec::new();
    for (prefix, layer) in unet.layers_mut() {
        if let Some(t) = &mut layer.attention {
            let block = &mut t.block;
            for (attn_name, attn) in [("attn1", &mut block.attn1), ("attn2", &mut block.attn2)] {
                for (proj, linear) in attn.projections_mut() {
                    out.push((format!("{prefix}.transformer_blocks.0.{attn_name}.{proj}"), linear));
                }
            }
        }
    }
    out
}

/// Adds fresh adapters to the projections named in `targets`; returns the number of trained values.
pub fn attach(unet: &mut UNet2DConditionModel, targets: &[&str], rank: usize, alpha: f32, init: LoraInit, seed: u64) -> Result<usize> {
    ensure!((1..=1024).contains(&rank), "LoRA rank {rank} is out of range (1..=1024)");
    for t in targets {
        ensure!(DEFAULT_TARGETS.contains(t), "unknown LoRA target {t:?} (expected some of {DEFAULT_TARGETS:?})");
    }
    let mut rng = Rng::new(seed);
    let mut params = 0;
    for (module, linear) in projections(unet) {
        if !targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
            continue;
        }
        let (i, o) = (linear.in_f, linear.out_f);
        let a = match init {
            LoraInit::KaimingUniform => rng.uniform_vec(rank * i, -1.0 / (i as f32).sqrt(), 1.0 / (i as f32).sqrt()),
            LoraInit::Gaussian => rng.normal_vec(rank * i, 1.0 / rank as f32),
        };
        let layer = LoraLayer { rank, in_features: i, out_features: o, alpha, a, b: vec![0.0; o * rank] };
        params += rank * (i + o);
        linear.lora = Some(adapter(layer));
    }
    Ok(params)
}

fn adapter(layer: LoraLayer) -> LoraAdapter {
    LoraAdapter { grad_a: vec![0.0; layer.a.len()], grad_b: vec![0.0; layer.b.len()], layer }
}

/// Puts the layers of `weights` (read from a file) onto the matching projections; every layer
/// must find its projection with matching sizes.
pub fn load(unet: &mut UNet2DConditionModel, weights: &LoraWeights) -> Result<()> {
    let mut projections = projections(unet);
    for (module, layer) in &weights.layers {
        let Some((_, linear)) = projections.iter_mut().find(|(m, _)| m == module) else {
            bail!("LoRA layer {module} has no matching attention projection in this UNet");
        };
        ensure!(
            (layer.in_features, layer.out_features) == (linear.in_f, linear.out_f),
            "LoRA layer {module} is {}→{}, the projection is {}→{}",
            layer.in_features,
            layer.out_features,
            linear.in_f,
            linear.out_f
        );
        linear.lora = Some(adapter(layer.clone()));
    }
    Ok(())
}

/// The adapters' current values, for saving.
pub fn export(unet: &mut UNet2DConditionModel) -> LoraWeights {
    let mut w = LoraWeights::default();
    for (module, linear) in projections(unet) {
        if let Some(l) = &linear.lora {
            w.layers.insert(module, l.layer.clone());
        }
    }
    w
}

/// (module, grad A, grad B) of every adapter.
pub fn gradients(unet: &mut UNet2DConditionModel) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    projections(unet).into_iter().filter_map(|(m, l)| l.lora.as_ref().map(|a| (m, a.grad_a.clone(), a.grad_b.clone()))).collect()
}

pub fn zero_gradients(unet: &mut UNet2DConditionModel) {
    for (_, linear) in projections(unet) {
        if let Some(l) = &mut linear.lora {
            l.grad_a.iter_mut().for_each(|g| *g = 0.0);
            l.grad_b.iter_mut().for_each(|g| *g = 0.0);
        }
    }
}
