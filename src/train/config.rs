//! A training run's settings: read from a TOML file (`--config`, e.g. experiments/baseline.toml),
//! overridden by command-line flags, and written next to every checkpoint as `config.toml`.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Min-SNR γ: a number, or `"none"` for plain MSE.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SnrGamma {
    Gamma(f64),
    #[serde(with = "none_string")]
    None,
}

impl SnrGamma {
    pub fn parse(s: &str) -> Result<SnrGamma> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(SnrGamma::None);
        }
        let g: f64 = s.parse().with_context(|| format!("--snr-gamma {s:?}: expected a positive number or \"none\""))?;
        ensure!(g > 0.0, "--snr-gamma {g}: must be positive (or \"none\")");
        Ok(SnrGamma::Gamma(g))
    }
    pub fn value(self) -> Option<f64> {
        match self {
            SnrGamma::Gamma(g) => Some(g),
            SnrGamma::None => None,
        }
    }
}

mod none_string {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("none")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let s = String::deserialize(d)?;
        if s.eq_ignore_ascii_case("none") {
            Ok(())
        } else {
            Err(D::Error::custom(format!("snr_gamma {s:?}: expected a number or \"none\"")))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SaveFormat {
    /// pytorch_lora_weights.safetensors with diffusers/PEFT keys (diffusers' load_lora_weights).
    Diffusers,
    /// lora_unet_* keys with .alpha (ComfyUI, A1111).
    Kohya,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// PEFT's default: A ~ kaiming-uniform(a=√5).
    Kaiming,
    /// A ~ N(0, 1/r), as diffusers' training scripts use.
    Gaussian,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: String,
    pub data: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub lr: f64,
    pub snr_gamma: SnrGamma,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub resolution: u32,
    pub rank: usize,
    pub alpha: f32,
    pub init: InitKind,
    pub targets: Vec<String>,
    pub seed: u64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: usize,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    /// Apply AdamW to each adapter inside the backward, as soon as its gradients exist, so the
    /// gradients of all adapters never exist at once (needs grad_accum = 1 and no max_grad_norm).
    pub adamw_per_layer: bool,
    /// Keep AdamW's moments in 8 bits (blockwise log-scale codes, ops::adamw8bit): 2 bytes per LoRA
    /// value instead of 8; not bit-compatible with torch's AdamW.
    pub adamw_8bit: bool,
    pub save_every: usize,
    pub save_format: SaveFormat,
    pub log_every: usize,
    pub vram_limit: Option<String>,
    /// Prompts sampled with the current LoRA into step_N/validation.png at every checkpoint that is a
    /// multiple of `validation_every` (none: no validation images).
    pub validation_prompts: Vec<String>,
    pub validation_every: usize,
    pub validation_seed: u64,
    pub validation_steps: usize,
    pub validation_guidance: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            steps: 1000,
            lr: 2e-5,
            snr_gamma: SnrGamma::Gamma(5.0),
            batch_size: 1,
            grad_accum: 1,
            resolution: 512,
            rank: 128,
            alpha: 128.0,
            init: InitKind::Kaiming,
            targets: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
            seed: 42,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
            adamw_per_layer: false,
            adamw_8bit: false,
            save_every: 250,
            save_format: SaveFormat::Diffusers,
            log_every: 10,
            vram_limit: None,
            validation_prompts: Vec::new(),
            validation_every: 250,
            validation_seed: 42,
            validation_steps: 30,
            validation_guidance: 5.0,
        }
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Checks every setting; errors name the setting and what was expected.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.model.is_empty(), "no base model: give --model (a diffusers folder, a Hugging Face cache id or a .safetensors file)");
        ensure!(!self.data.as_os_str().is_empty(), "no data set: give --data (a folder of images with .txt captions)");
        ensure!(!self.out.as_os_str().is_empty(), "no output folder: give --out");
        ensure!(self.steps > 0, "steps must be at least 1");
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "lr {}: must be positive", self.lr);
        ensure!(self.batch_size > 0 && self.grad_accum > 0, "batch_size and grad_accum must be at least 1");
        ensure!(self.save_every > 0 && self.log_every > 0 && self.validation_every > 0, "save_every, log_every and validation_every must be at least 1");
        ensure!((0.0..1.0).contains(&self.adam_beta1) && (0.0..1.0).contains(&self.adam_beta2), "Adam betas must be in [0, 1)");
        if self.adamw_per_layer {
            ensure!(self.grad_accum == 1, "adamw_per_layer updates each adapter in its backward: it needs grad_accum = 1 (got {})", self.grad_accum);
            ensure!(self.max_grad_norm.is_none(), "adamw_per_layer cannot clip the global gradient norm (max_grad_norm): the gradients never exist at once");
        }
        if self.lr_schedule == LrSchedule::Cosine && self.warmup_steps >= self.steps {
            bail!("warmup_steps {} leaves no steps for the cosine decay of {} steps", self.warmup_steps, self.steps);
        }
        Ok(())
    }

    /// Learning rate for optimizer step `step` (0-based), as diffusers' get_scheduler computes it.
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = |s: usize| if self.warmup_steps > 0 && s < self.warmup_steps { s as f64 / self.warmup_steps as f64 } else { 1.0 };
        let factor = match self.lr_schedule {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup => warm(step),
            LrSchedule::Cosine if step < self.warmup_steps => warm(step),
            LrSchedule::Cosine => {
                let progress = (step - self.warmup_steps) as f64 / (self.steps - self.warmup_steps).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        self.lr * factor
    }
}

/// "8G", "6144M", "4GiB", "512MB" → bytes.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('G') => (&t[..t.len() - 1], 1usize << 30),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('K') => (&t[..t.len() - 1], 1 << 10),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().with_context(|| format!("--vram-limit {s:?}: expected a size such as 8G or 6144M"))?;
    ensure!(v > 0.0, "--vram-limit {s:?}: must be positive");
    Ok((v * mult as f64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiments_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let c = TrainConfig::from_file(&path).unwrap();
            TrainConfig { model: "any".into(), ..c.clone() }.validate().unwrap();
            names.push((path.file_stem().unwrap().to_string_lossy().to_string(), c));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let get = |n: &str| &names.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!((get("baseline").steps, get("baseline").lr, get("baseline").snr_gamma), (1000, 2e-5, SnrGamma::Gamma(5.0)));
        assert_eq!(get("steps2000").steps, 2000);
        assert_eq!(get("lr1e5").lr, 1e-5);
        assert_eq!(get("snr2").snr_gamma, SnrGamma::Gamma(2.0));
        assert_eq!(get("snrNone").snr_gamma, SnrGamma::None);
        let outs: std::collections::HashSet<_> = names.iter().map(|(_, c)| c.out.clone()).collect();
        assert_eq!(outs.len(), names.len(), "every experiment writes to its own folder");
    }

    #[test]
    fn config_round_trips_through_toml_and_rejects_typos() {
        let c = TrainConfig { model: "m".into(), snr_gamma: SnrGamma::None, max_grad_norm: Some(1.0), ..Default::default() };
        assert_eq!(toml::from_str::<TrainConfig>(&c.to_toml().unwrap()).unwrap(), c);
        let err = format!("{:#}", toml::from_str::<TrainConfig>("stepz = 3").unwrap_err());
        assert!(err.contains("stepz"), "{err}");
    }

    #[test]
    fn per_layer_adamw_needs_one_micro_step_and_no_clipping() {
        let base = TrainConfig { model: "m".into(), data: "d".into(), out: "o".into(), adamw_per_layer: true, ..Default::default() };
        base.validate().unwrap();
        let err = TrainConfig { grad_accum: 2, ..base.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("grad_accum = 1"), "{err}");
        let err = TrainConfig { max_grad_norm: Some(1.0), ..base }.validate().unwrap_err().to_string();
        assert!(err.contains("max_grad_norm"), "{err}");
    }

    #[test]
    fn lr_schedules_follow_diffusers() {
        let c = TrainConfig { lr: 1.0, steps: 110, warmup_steps: 10, lr_schedule: LrSchedule::Cosine, ..Default::default() };
        assert_eq!(c.lr_at(0), 0.0);
        assert_eq!(c.lr_at(5), 0.5);
        assert_eq!(c.lr_at(10), 1.0);
        assert!((c.lr_at(60) - 0.5).abs() < 1e-12);
        let w = TrainConfig { lr_schedule: LrSchedule::ConstantWithWarmup, ..c.clone() };
        assert_eq!((w.lr_at(5), w.lr_at(100)), (0.5, 1.0));
        assert_eq!(TrainConfig { lr: 3.0, ..Default::default() }.lr_at(999), 3.0);
    }

    #[test]
    fn sizes_and_gamma_parse() {
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("6144MiB").unwrap(), 6144 << 20);
        assert!(parse_bytes("lots").is_err());
        assert_eq!(SnrGamma::parse("none").unwrap(), SnrGamma::None);
        assert_eq!(SnrGamma::parse("5").unwrap(), SnrGamma::Gamma(5.0));
        assert!(SnrGamma::parse("-1").is_err());
    }
}
