//! SD1.5's models, named and structured as diffusers defines them (DESIGN.md §4): weight loading
//! from every supported source ([`weights`]), the CLIP text encoder ([`clip`]) and the VAE ([`vae`]).

pub mod clip;
pub mod functional;
pub mod layers;
pub mod lora;
pub mod resnet;
pub mod transformer;
pub mod unet;
#[cfg(test)]
mod sd15_tests;
#[cfg(test)]
mod unet_tests;
pub mod vae;
pub mod weights;

use anyhow::{Context, Result};

/// Reads an integer field of a model config.
pub(crate) fn cfg_usize(cfg: &serde_json::Value, key: &str) -> Result<usize> {
    cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as usize).with_context(|| format!("config has no integer {key:?}"))
}

/// Reads a list-of-integers field of a model config.
pub(crate) fn cfg_usize_list(cfg: &serde_json::Value, key: &str) -> Result<Vec<usize>> {
    let list = cfg.get(key).and_then(|v| v.as_array()).with_context(|| format!("config has no list {key:?}"))?;
    list.iter().map(|v| v.as_u64().map(|x| x as usize).with_context(|| format!("config {key:?}: not an integer list"))).collect()
}
