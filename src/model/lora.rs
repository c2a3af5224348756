//! LoRA adapters on the UNet's attention projections, as PEFT's `LoraConfig(r, lora_alpha,
//! target_modules=["to_q", "to_k", "to_v", "to_out.0"])` adds them to attn1 and attn2 of every
//! BasicTransformerBlock: A [r, in] ~ kaiming-uniform(a=√5) (bound 1/√in, PEFT's default) or
//! N(0, (1/r)²) ("gaussian"), B [out, r] = 0, scale = alpha / r.
//!
//! On the GPU every adapter's A and B live in one flat f32 buffer and their gradients in another
//! ([`LoraParams`]), so one fused AdamW launch updates them all and gradient clipping sees the
//! global norm.

use super::layers::{Dev, Linear, LoraAdapter};
use super::unet::UNet2DConditionModel;
use crate::checkpoint::{LoraLayer, LoraWeights};
use crate::cuda::ArenaKind;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;

pub const DEFAULT_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    KaimingUniform,
    Gaussian,
}

/// The flat parameter and gradient buffers behind the adapters (GPU), and the trained value count.
pub struct LoraParams {
    pub count: usize,
    /// f32 [count]: every adapter's A then B, in [`projections`] order (GPU only).
    pub params: Option<Tensor>,
    /// f32 [count], laid out like `params` (GPU only).
    pub grads: Option<Tensor>,
    /// bf16 [count]: the copy of `params` the GEMMs read, rewritten by each AdamW update (GPU only).
    pub params16: Option<Tensor>,
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

/// Adds fresh adapters to the projections named in `targets`.
pub fn attach(dev: Dev, unet: &mut UNet2DConditionModel, targets: &[String], rank: usize, alpha: f32, init: LoraInit, seed: u64) -> Result<LoraParams> {
    ensure!((1..=1024).contains(&rank), "LoRA rank {rank} is out of range (1..=1024)");
    for t in targets {
        ensure!(DEFAULT_TARGETS.contains(&t.as_str()), "unknown LoRA target {t:?} (expected some of {DEFAULT_TARGETS:?})");
    }
    let mut rng = Rng::new(seed);
    let mut layers = Vec::new();
    for (module, linear) in projections(unet) {
        if !targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
            continue;
        }
        let (i, o) = (linear.in_f, linear.out_f);
        let a = match init {
            LoraInit::KaimingUniform => rng.uniform_vec(rank * i, -1.0 / (i as f32).sqrt(), 1.0 / (i as f32).sqrt()),
            LoraInit::Gaussian => rng.normal_vec(rank * i, 1.0 / rank as f32),
        };
        layers.push((module, LoraLayer { rank, in_features: i, out_features: o, alpha, a, b: vec![0.0; o * rank] }));
    }
    install(dev, unet, layers)
}

/// Puts the layers of `weights` (read from a file) onto the matching projections; every layer
/// must find its projection with matching sizes.
pub fn load(dev: Dev, unet: &mut UNet2DConditionModel, weights: &LoraWeights) -> Result<LoraParams> {
    let layers = weights.layers.iter().map(|(m, l)| (m.clone(), l.clone())).collect();
    install(dev, unet, layers)
}

/// Folds the layers of `weights` into the matching projections' frozen weights (sampling: no
/// adapters remain, so the UNet runs at the base model's cost); sizes are checked as in [`load`].
pub fn merge(dev: Dev, unet: &mut UNet2DConditionModel, weights: &LoraWeights) -> Result<()> {
    let mut projections = projections(unet);
    let index: HashMap<String, usize> = projections.iter().enumerate().map(|(i, (m, _))| (m.clone(), i)).collect();
    for (module, layer) in &weights.layers {
        let Some(&i) = index.get(module) else {
            bail!("LoRA layer {module} has no matching attention projection in this UNet");
        };
        projections[i].1.merge_lora(dev, layer).with_context(|| format!("merging LoRA layer {module}"))?;
    }
    Ok(())
}

/// Puts `layers` onto their projections, in [`projections`] order (so the flat buffers, and the
/// optimizer state saved from them, have one layout whatever the source).
fn install(dev: Dev, unet: &mut UNet2DConditionModel, mut layers: Vec<(String, LoraLayer)>) -> Result<LoraParams> {
    let mut projections = projections(unet);
    let index: HashMap<String, usize> = projections.iter().enumerate().map(|(i, (m, _))| (m.clone(), i)).collect();
    for (module, layer) in &layers {
        let Some(&i) = index.get(module) else {
            bail!("LoRA layer {module} has no matching attention projection in this UNet");
        };
        let linear = &projections[i].1;
        ensure!(
            (layer.in_features, layer.out_features) == (linear.in_f, linear.out_f),
            "LoRA layer {module} is {}→{}, the projection is {}→{}",
            layer.in_features,
            layer.out_features,
            linear.in_f,
            linear.out_f
        );
    }
    layers.sort_by_key(|(m, _)| index[m]);
    let count = layers.iter().map(|(_, l)| l.a.len() + l.b.len()).sum();
    let mut flat = match dev {
        Dev::Cpu => None,
        Dev::Gpu(g) => {
            let host: Vec<f32> = layers.iter().flat_map(|(_, l)| l.a.iter().chain(&l.b).copied()).collect();
            let params = Tensor::from_vec(&[count], host)?.to_gpu(g, ArenaKind::Persistent, DType::F32)?;
            let mut grads = Tensor::empty_gpu(g, ArenaKind::Persistent, &[count], DType::F32)?;
            grads.zero(Some(g))?;
            let mut params16 = Tensor::empty_gpu(g, ArenaKind::Persistent, &[count], DType::BF16)?;
            crate::ops::elementwise::cast(g, &params, &mut params16)?;
            Some((params, grads, params16))
        }
    };
    let mut offset = 0;
    for (module, l) in layers {
        let (sa, sb) = ([l.rank, l.in_features], [l.out_features, l.rank]);
        let adapter = match &mut flat {
            None => LoraAdapter::new(l.alpha, Tensor::from_vec(&sa, l.a)?, Tensor::from_vec(&sb, l.b)?, Tensor::zeros(&sa), Tensor::zeros(&sb), None),
            Some((p, g, p16)) => {
                let (na, nb) = (l.a.len(), l.b.len());
                let copies = (p16.gpu_view(offset, &sa)?, p16.gpu_view(offset + na, &sb)?);
                let views = (p.gpu_view(offset, &sa)?, p.gpu_view(offset + na, &sb)?, g.gpu_view(offset, &sa)?, g.gpu_view(offset + na, &sb)?);
                offset += na + nb;
                LoraAdapter::new(l.alpha, views.0, views.1, views.2, views.3, Some(copies))
            }
        };
        projections[index[&module]].1.lora = Some(adapter);
    }
    let (params, grads, params16) = match flat {
        Some((p, g, p16)) => (Some(p), Some(g), Some(p16)),
        None => (None, None, None),
    };
    Ok(LoraParams { count, params, grads, params16 })
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
    let gpu = dev.gpu();
    for (_, linear) in projections(unet) {
        if let Some(l) = &mut linear.lora {
            l.grad_a.zero(gpu)?;
            l.grad_b.zero(gpu)?;
        }
    }
    Ok(())
}
