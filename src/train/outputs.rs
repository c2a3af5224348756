//! What a training run writes under `--out`: `step_N/` checkpoints (LoRA weights in the chosen
//! formats, the config used, the optimizer state for `--resume`), TensorBoard logs in `logs/`, and
//! `summary.json` at the end. Every file goes to a temporary name first; a checkpoint folder is
//! assembled as `step_N.partial` and renamed when complete.

use super::config::{SaveFormat, TrainConfig};
use super::optim::Optimizer;
use super::Summary;
use crate::checkpoint::{load_lora, save_lora, LoraFormat, DIFFUSERS_FILE, KOHYA_FILE};
use crate::cuda::{ArenaKind, Gpu};
use crate::io::write_atomic;
use crate::log::EventWriter;
use crate::model::layers::Dev;
use crate::model::lora::{self, LoraParams};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "optimizer.safetensors";

pub struct Outputs {
    dir: PathBuf,
}

impl Outputs {
    pub fn create(cfg: &TrainConfig) -> Result<Outputs> {
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("--out {}: cannot create the folder", cfg.out.display()))?;
        Ok(Outputs { dir: cfg.out.clone() })
    }

    pub fn event_writer(&self) -> Result<EventWriter> {
        EventWriter::create(&self.dir.join("logs"))
    }

    /// Writes `step_{step}/` with the LoRA, config.toml and the optimizer state.
    pub fn save_checkpoint(&self, dev: Dev, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, optimizer: &Optimizer, step: usize) -> Result<()> {
        let done = self.dir.join(format!("step_{step}"));
        let partial = self.dir.join(format!("step_{step}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        let weights = lora::export(dev, unet)?;
        if matches!(cfg.save_format, SaveFormat::Diffusers | SaveFormat::Both) {
            save_lora(&weights, &partial.join(DIFFUSERS_FILE), LoraFormat::Diffusers)?;
        }
        if matches!(cfg.save_format, SaveFormat::Kohya | SaveFormat::Both) {
            save_lora(&weights, &partial.join(KOHYA_FILE), LoraFormat::Kohya)?;
        }
        write_atomic(&partial.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let (m, v) = optimizer.moments(dev)?;
        let views = vec![
            ("exp_avg".to_string(), TensorView::new(Dtype::F32, vec![m.len()], bytemuck::cast_slice(&m))?),
            ("exp_avg_sq".to_string(), TensorView::new(Dtype::F32, vec![v.len()], bytemuck::cast_slice(&v))?),
        ];
        let meta = HashMap::from([("step".to_string(), optimizer.step.to_string())]);
        write_atomic(&partial.join(STATE_FILE), &safetensors::serialize(views, &Some(meta))?)?;
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&partial, &done).with_context(|| format!("cannot move the checkpoint into {}", done.display()))
    }

    pub fn write_summary(&self, s: &Summary) -> Result<()> {
        write_atomic(&self.dir.join("summary.json"), serde_json::to_string_pretty(s)?.as_bytes())
    }
}

/// Samples the validation prompts with checkpoint `step` into `step_N/validation.png` (one row per
/// prompt), by running `sdlora sample` on it — a separate process, so sampling's memory is returned
/// before training goes on.
pub fn validation_images(cfg: &TrainConfig, step: usize, cpu: bool) -> Result<PathBuf> {
    let dir = cfg.out.join(format!("step_{step}"));
    let out = dir.join("validation.png");
    let exe = std::env::current_exe().context("cannot find the sdlora executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("sample").arg("--model").arg(&cfg.model).arg("--lora").arg(&dir).arg("--grid").arg("--out").arg(&out);
    for p in &cfg.validation_prompts {
        cmd.arg("--prompt").arg(p);
    }
    let size = cfg.resolution.to_string();
    cmd.args(["--seed", &cfg.validation_seed.to_string(), "--steps", &cfg.validation_steps.to_string()]);
    cmd.args(["--guidance", &cfg.validation_guidance.to_string(), "--width", &size, "--height", &size]);
    if cpu {
        cmd.arg("--cpu");
    }
    let o = cmd.output().context("cannot run sdlora sample")?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr).trim());
    Ok(out)
}

/// The LoRA of checkpoint `dir` (`.../step_N`) put onto `unet`, and N.
pub fn load_lora_for_resume(dev: Dev, unet: &mut UNet2DConditionModel, dir: &Path) -> Result<(LoraParams, usize)> {
    let file = [DIFFUSERS_FILE, KOHYA_FILE].iter().map(|f| dir.join(f)).find(|p| p.is_file());
    let file = file.with_context(|| format!("--resume {}: no {DIFFUSERS_FILE} or {KOHYA_FILE} in it", dir.display()))?;
    let params = lora::load(dev, unet, &load_lora(&file)?.weights)?;
    Ok((params, load_optimizer_state(dir)?.0 as usize))
}

/// (step, exp_avg, exp_avg_sq) saved in checkpoint `dir`.
pub fn load_optimizer_state(dir: &Path) -> Result<(u32, Vec<f32>, Vec<f32>)> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("--resume {}: cannot read {STATE_FILE}", dir.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let step = meta.metadata().as_ref().and_then(|m| m.get("step")).and_then(|s| s.parse().ok());
    let step = step.with_context(|| format!("{}: no step in its metadata", path.display()))?;
    let get = |k: &str| -> Result<Vec<f32>> {
        let t = st.tensor(k).with_context(|| format!("{}: no tensor {k}", path.display()))?;
        Ok(bytemuck::pod_collect_to_vec(t.data()))
    };
    Ok((step, get("exp_avg")?, get("exp_avg_sq")?))
}

/// Every micro-step's inputs and loss as one safetensors file, NCHW like PyTorch: `x_t` and `eps`
/// [steps·batch, 4, h, w], `t` [steps·batch], `context` [steps·batch, 77, d], `loss` [steps].
pub fn write_draws(path: &Path, steps: &[(super::Batch, f32)]) -> Result<()> {
    let batches: Vec<&super::Batch> = steps.iter().map(|(b, _)| b).collect();
    let losses: Vec<f32> = steps.iter().map(|(_, l)| *l).collect();
    let [b, h, w, c] = batches.first().context("no steps to dump")?.shape;
    let n = batches.len() * b;
    let nchw = |f: fn(&super::Batch) -> &Vec<f32>| -> Vec<f32> { batches.iter().flat_map(|x| crate::tensor::nhwc_to_nchw(f(x), b, c, h, w)).collect() };
    let (x_t, eps) = (nchw(|x| &x.x_t), nchw(|x| &x.eps));
    let t: Vec<f32> = batches.iter().flat_map(|x| x.t.clone()).collect();
    let context: Vec<f32> = batches.iter().flat_map(|x| x.context.clone()).collect();
    let views = vec![
        ("x_t".to_string(), TensorView::new(Dtype::F32, vec![n, c, h, w], bytemuck::cast_slice(&x_t))?),
        ("eps".to_string(), TensorView::new(Dtype::F32, vec![n, c, h, w], bytemuck::cast_slice(&eps))?),
        ("t".to_string(), TensorView::new(Dtype::F32, vec![n], bytemuck::cast_slice(&t))?),
        ("context".to_string(), TensorView::new(Dtype::F32, vec![n, 77, context.len() / n / 77], bytemuck::cast_slice(&context))?),
        ("loss".to_string(), TensorView::new(Dtype::F32, vec![losses.len()], bytemuck::cast_slice(&losses))?),
    ];
    write_atomic(path, &safetensors::serialize(views, &None)?)
}

/// A progress bar with step, loss, it/s, ETA and (GPU) memory; hidden when stderr is no terminal.
pub fn progress_bar(start: usize, steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64).with_position(start as u64);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// A log line above the progress bar, or on stderr when the bar is hidden (no terminal).
pub fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// ", VRAM 1.23 GiB" from the arenas' current holdings.
pub fn vram_text(gpu: Option<&Gpu>) -> String {
    gpu.map_or(String::new(), |g| {
        let held = g.arena_stats(ArenaKind::Persistent).reserved + g.arena_stats(ArenaKind::Scratch).reserved;
        format!(", VRAM {:.2} GiB", held as f64 / (1u64 << 30) as f64)
    })
}
