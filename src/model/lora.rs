//! LoRA adapters on the UNet's attention projections, as PEFT's `LoraConfig(r, lora_alpha,
//! target_modules=["to_q", "to_k", "to_v", "to_out.0"])` adds them to attn1 and attn2 of every
//! BasicTransformerBlock: A [r, in] ~ kaiming-uniform(a=√5) (bound 1/√in, PEFT's default) or
//! N(0, (1/r)²) ("gaussian"), B [out, r] = 0, scale = alpha / r.

use super::layers::{Dev, LoraAdapter, Linear};
use super::unet::UNet2DConditionModel;
use crate::checkpoint::{LoraLayer, LoraWeights};
use crate::rng::Rng;
use crate::tensor::Tensor;
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
pub fn attach(dev: Dev, unet: &mut UNet2DConditionModel, targets: &[&str], rank: usize, alpha: f32, init: LoraInit, seed: u64) -> Result<usize> {
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
        linear.lora = Some(LoraAdapter::new(dev, &layer)?);
    }
    Ok(params)
}

/// Puts the layers of `weights` (read from a file) onto the matching projections; every layer
/// must find its projection with matching sizes.
pub fn load(dev: Dev, unet: &mut UNet2DConditionModel, weights: &LoraWeights) -> Result<()> {
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
        linear.lora = Some(LoraAdapter::new(dev, layer)?);
    }
    Ok(())
}

/// The adapters' current values, for saving.
pub fn export(dev: Dev, unet: &mut UNet2DConditionModel) -> Result<LoraWeights> {
    let mut w = LoraWeights::default();
    for (module, linear) in projections(unet) {
        if let Some(l) = &linear.lora {
            w.layers.insert(module, l.to_layer(dev)?);
        }
    }
    Ok(w)
}

/// (module, grad A, grad B) of every adapter, on the host.
pub fn gradients(dev: Dev, unet: &mut UNet2DConditionModel) -> Result<Vec<(String, Vec<f32>, Vec<f32>)>> {
    let host = |t: &Tensor| match dev {
        Dev::Cpu => t.data().map(<[f32]>::to_vec),
        Dev::Gpu(g) => t.to_cpu(g)?.into_vec(),
    };
    projections(unet)
        .into_iter()
        .filter_map(|(m, l)| l.lora.as_ref().map(|a| Ok((m, host(&a.grad_a)?, host(&a.grad_b)?))))
        .collect()
}

pub fn zero_gradients(dev: Dev, unet: &mut UNet2DConditionModel) -> Result<()> {
    let gpu = match dev {
        Dev::Cpu => None,
        Dev::Gpu(g) => Some(g),
    };
    for (_, linear) in projections(unet) {
        if let Some(l) = &mut linear.lora {
            l.grad_a.zero(gpu)?;
            l.grad_b.zero(gpu)?;
        }
    }
    Ok(())
}
