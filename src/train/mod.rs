//! `sdlora train`: the whole LoRA training job (DESIGN.md §5).
//!
//! Frozen parts run once: captions are tokenized and encoded by CLIP, images encoded by the VAE
//! into posterior moments, then both models are dropped. Each step ([`step`]) draws, from a
//! counter-based Philox stream keyed by (seed, micro-step), a latent from every image's posterior,
//! noise ε and a timestep; the UNet predicts ε from x_t; the Min-SNR-weighted MSE is
//! backpropagated into the LoRA factors; AdamW updates them. On the GPU a step is two replayed
//! CUDA graphs and the losses are read back every few steps. Because every draw depends only on
//! (seed, step), a resumed run continues the same loss curve.

pub mod compare;
pub mod config;
mod memory;
mod optim;
mod outputs;
mod step;

use crate::cuda::{ArenaKind, Gpu};
use crate::data::load_dataset;
use crate::model::clip::ClipTextModel;
use crate::model::layers::Dev;
use crate::model::lora::{self, LoraInit};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::AutoencoderKl;
use crate::model::weights::{Component, ModelSource};
use crate::ops::adamw::AdamWConfig;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, ensure, Context, Result};
use config::{InitKind, TrainConfig};
use optim::Optimizer;
use outputs::Outputs;
pub use step::Batch;
use step::{Example, Stepper};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a finished run reports (also written as summary.json in the output folder).
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub mean_loss: f32,
    pub seconds: f64,
    pub peak_vram_bytes: usize,
    pub interrupted: bool,
}

/// Runs the job described by `cfg` on the GPU (or the CPU), optionally resuming from a `step_N`
/// checkpoint; with `dump`, also writes `step_0/` and every step's inputs (for benches/train_reference.py).
pub fn run(cfg: &TrainConfig, gpu: Option<&Gpu>, resume: Option<&Path>, dump: Option<&Path>) -> Result<Summary> {
    cfg.validate()?;
    if gpu.is_none() {
        ensure!(!cfg.adamw_per_layer, "--adamw-per-layer runs on the GPU (this run is on the CPU)");
        ensure!(!cfg.adamw_8bit, "--adamw-8bit runs on the GPU (this run is on the CPU)");
    }
    let dev = gpu.map_or(Dev::Cpu, Dev::Gpu);
    if let (Some(g), Some(limit)) = (gpu, &cfg.vram_limit) {
        g.set_vram_limit(Some(config::parse_bytes(limit)?));
    }
    let outputs = Outputs::create(cfg)?;
    let source = ModelSource::resolve(&cfg.model).with_context(|| format!("--model {}", cfg.model))?;
    let examples = encode_dataset(dev, cfg, &source)?;
    if let Some(g) = gpu {
        g.release_free_scratch(); // the VAE's activations were larger than the UNet's will be
    }

    let unet_cfg = match source.config(Component::Unet)? {
        Some(v) => UNetConfig::from_json(&v)?,
        None => UNetConfig::sd15(),
    };
    let mut unet = UNet2DConditionModel::load(dev, &source.weights(Component::Unet)?, unet_cfg).context("loading the UNet")?;
    let init = match cfg.init {
        InitKind::Kaiming => LoraInit::KaimingUniform,
        InitKind::Gaussian => LoraInit::Gaussian,
    };
    let (mut params, start_step) = match resume {
        None => (lora::attach(dev, &mut unet, &cfg.targets, cfg.rank, cfg.alpha, init, cfg.seed)?, 0),
        Some(dir) => outputs::load_lora_for_resume(dev, &mut unet, dir)?,
    };
    let adam = AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
        max_grad_norm: cfg.max_grad_norm.map(|v| v as f32),
    };
    let rates: Vec<f64> = (0..cfg.steps).map(|s| cfg.lr_at(s)).collect();
    let mut optimizer = Optimizer::new(dev, &params, adam, &rates, cfg.adamw_8bit)?;
    if let Some(dir) = resume {
        let (step, m, v) = outputs::load_optimizer_state(dir)?;
        ensure!(step as usize == start_step, "{}: optimizer state is at step {step}, the LoRA at {start_step}", dir.display());
        optimizer.restore(dev, step, m, v)?;
    }
    ensure!(start_step < cfg.steps, "the checkpoint is at step {start_step}; --steps {} leaves nothing to do", cfg.steps);
    eprintln!("training {} LoRA values ({} adapters, rank {}) on {} images for steps {}..={}", params.count, cfg.targets.len(), cfg.rank, examples.len(), start_step + 1, cfg.steps);

    let mut draws = dump.map(|_| Vec::new());
    if dump.is_some() {
        outputs.save_checkpoint(dev, cfg, &mut unet, &optimizer, start_step)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be set in one process (tests run several jobs): that is fine.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let readback = cfg.log_every.min(cfg.save_every).min(100);
    let mut stepper = Stepper::new(dev, cfg, &examples, start_step, readback)?;
    if let Some(g) = gpu {
        // The budget: --vram-limit, else what the device has free now (less a margin for others).
        let budget = match &cfg.vram_limit {
            Some(limit) => config::parse_bytes(limit)?,
            None => {
                let (free, _) = g.mem_info()?;
                let held = g.arena_stats(ArenaKind::Persistent).reserved + g.arena_stats(ArenaKind::Scratch).reserved;
                (held + free).saturating_sub(512 << 20)
            }
        };
        eprintln!("{}", memory::plan(g, cfg, &mut unet, &mut stepper, &mut params, budget)?);
        if cfg.adamw_per_layer {
            optimizer.update_in_backward(dev, &mut unet, &mut params)?;
        }
    }
    let mut log = outputs.event_writer()?;
    let progress = outputs::progress_bar(start_step, cfg.steps);
    let started = Instant::now();
    let (mut losses, mut interrupted) = (Vec::new(), false);
    let (mut pending, mut since) = (Vec::new(), Instant::now());
    for step in start_step..cfg.steps {
        let batches = stepper.step(dev, cfg, &mut unet, &mut optimizer, &mut params, &examples, step, draws.is_some())?;
        let done = step + 1;
        pending.push(done);
        interrupted = stop.load(Ordering::SeqCst);
        let save = done % cfg.save_every == 0 || done == cfg.steps || interrupted;
        if let Some(d) = &mut draws {
            d.extend(batches.into_iter().map(|b| (b, f32::NAN))); // losses filled in below
        }
        // The losses come back (and the GPU is waited for) every few steps, before any checkpoint.
        if done % readback == 0 || save {
            let micro_losses = stepper.take_losses(dev)?; // waits for the steps
            let seconds = since.elapsed().as_secs_f64() / pending.len() as f64;
            since = Instant::now();
            if let Some(d) = &mut draws {
                let first = d.len() - micro_losses.len();
                d[first..].iter_mut().zip(&micro_losses).for_each(|(entry, &l)| entry.1 = l);
            }
            let step_losses = micro_losses.chunks(cfg.grad_accum).map(|c| c.iter().map(|l| l / cfg.grad_accum as f32).sum::<f32>());
            for (&d, loss) in pending.iter().zip(step_losses) {
                if !loss.is_finite() {
                    progress.abandon();
                    bail!("loss became {loss} at step {d}: stopping; the last good checkpoint is kept in {}", cfg.out.display());
                }
                log.scalar("loss", d as u64, loss)?;
                log.scalar("lr", d as u64, cfg.lr_at(d - 1) as f32)?;
                log.scalar("step_time_s", d as u64, seconds as f32)?;
                losses.push(loss);
            }
            pending.clear();
            let loss = *losses.last().unwrap_or(&f32::NAN);
            progress.set_position(done as u64);
            progress.set_message(format!("loss {loss:.4}{}", outputs::vram_text(gpu)));
            if done % cfg.log_every == 0 || done == cfg.steps {
                log.flush()?;
                outputs::say(&progress, format!("step {done}/{}: loss {loss:.5}, lr {:.2e}, {seconds:.3} s/step", cfg.steps, cfg.lr_at(step)));
            }
        }
        if save {
            outputs.save_checkpoint(dev, cfg, &mut unet, &optimizer, done)?;
            if done % cfg.validation_every == 0 && !cfg.validation_prompts.is_empty() {
                let line = match outputs::validation_images(cfg, done, gpu.is_none()) {
                    Ok(path) => format!("validation images: {}", path.display()),
                    Err(e) => format!("warning: validation images at step {done} failed: {e:#}"),
                };
                outputs::say(&progress, line);
            }
        }
        if interrupted {
            outputs::say(&progress, format!("interrupted: checkpoint step_{done} written"));
            break;
        }
    }
    progress.finish();
    log.flush()?;
    let tail = &losses[losses.len().saturating_sub(100)..];
    let summary = Summary {
        steps: start_step + losses.len(),
        final_loss: *losses.last().unwrap_or(&f32::NAN),
        mean_loss: tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        seconds: started.elapsed().as_secs_f64(),
        peak_vram_bytes: gpu.map_or(0, |g| g.arena_stats(ArenaKind::Persistent).high_water + g.arena_stats(ArenaKind::Scratch).high_water),
        interrupted,
    };
    outputs.write_summary(&summary)?;
    if let (Some(path), Some(batches)) = (dump, draws) {
        outputs::write_draws(path, &batches)?;
    }
    Ok(summary)
}

/// `sdlora bench train`: `steps` training steps of the full-size UNet with random stand-in weights
/// (no download), random posteriors and caption states, timed after `warmup` steps, replayed as
/// CUDA graphs as `sdlora train` runs them and, for comparison, eagerly (one launch per kernel);
/// prints median ms/step, achieved TFLOP/s (1.88 TFLOP per 512 px step), peak device memory and a
/// per-kernel table of one eager step.
/// What `sdlora bench train` measures: image size, steps, and the memory options of `sdlora train`.
pub struct BenchOptions {
    pub resolution: u32,
    pub warmup: usize,
    pub steps: usize,
    pub adamw_per_layer: bool,
    pub adamw_8bit: bool,
    /// `--vram-limit`: plan recomputation to fit (as `sdlora train` does) before timing.
    pub vram_limit: Option<String>,
}

pub fn benchmark(gpu: &Gpu, opts: &BenchOptions) -> Result<()> {
    let &BenchOptions { resolution, warmup, steps, adamw_per_layer, adamw_8bit, .. } = opts;
    let dev = Dev::Gpu(gpu);
    let cfg = TrainConfig { resolution, steps: 2 * (warmup + steps) + 2, ..TrainConfig::default() };
    let budget = opts.vram_limit.as_deref().map(config::parse_bytes).transpose()?;
    let mut unet = UNet2DConditionModel::load(dev, &crate::model::weights::Weights::random(0), UNetConfig::sd15())?;
    let mut params = lora::attach(dev, &mut unet, &cfg.targets, cfg.rank, cfg.alpha, LoraInit::KaimingUniform, cfg.seed)?;
    let mut optimizer = Optimizer::new(dev, &params, AdamWConfig::default(), &[cfg.lr], adamw_8bit)?;
    let hw = resolution as usize / 8;
    let mut rng = Rng::new(1);
    let examples = vec![Example::random(&mut rng, hw)];
    if let Some(budget) = budget {
        gpu.set_vram_limit(Some(budget));
        let mut stepper = Stepper::new(dev, &cfg, &examples, 0, 1)?;
        println!("{}", memory::plan(gpu, &cfg, &mut unet, &mut stepper, &mut params, budget)?);
    }
    if adamw_per_layer {
        optimizer.update_in_backward(dev, &mut unet, &mut params)?;
    }
    gpu.reset_high_water();
    let mut time_steps = |stepper: &mut Stepper, first: usize| -> Result<Vec<f64>> {
        let mut ms = Vec::new();
        for k in first..first + warmup + steps {
            gpu.synchronize()?;
            let t0 = Instant::now();
            stepper.step(dev, &cfg, &mut unet, &mut optimizer, &mut params, &examples, k, false)?;
            gpu.synchronize()?;
            if k >= first + warmup {
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            stepper.take_losses(dev)?;
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    };
    let graphed = time_steps(&mut Stepper::new(dev, &cfg, &examples, 0, 1)?, 0)?;
    let peak = gpu.arena_stats(ArenaKind::Persistent).high_water + gpu.arena_stats(ArenaKind::Scratch).high_water;
    let reserved = gpu.arena_stats(ArenaKind::Persistent).reserved + gpu.arena_stats(ArenaKind::Scratch).reserved;
    let mut eager_stepper = Stepper::new(dev, &cfg, &examples, warmup + steps, 1)?;
    eager_stepper.disable_graphs();
    let eager = time_steps(&mut eager_stepper, warmup + steps)?;
    gpu.start_profiling();
    eager_stepper.step(dev, &cfg, &mut unet, &mut optimizer, &mut params, &examples, 2 * (warmup + steps), false)?;
    let table = gpu.stop_profiling()?;
    let flop = 1.88e12 * (resolution as f64 / 512.0).powi(2);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let line = |what: &str, ms: &[f64]| {
        let median = ms[ms.len() / 2];
        format!("{what}: median {median:.2} ms (min {:.2}, max {:.2}, n={steps}), {:.1} TFLOP/s", ms[0], ms[ms.len() - 1], flop / median / 1e9)
    };
    let adamw = format!("AdamW{}{}", if adamw_per_layer { " per layer" } else { "" }, if adamw_8bit { ", 8-bit moments" } else { "" });
    let adamw = match &opts.vram_limit {
        Some(limit) => format!("{adamw}; --vram-limit {limit}"),
        None => adamw,
    };
    println!("train step at {resolution} px, batch 1, r = 128 (draws, forward, Min-SNR loss, backward, {adamw}):");
    println!("  {}", line("CUDA graph replay (as sdlora train runs)", &graphed));
    println!("  {}", line("eager launches, for comparison", &eager));
    println!("  peak device memory {:.2} GiB in use ({:.2} GiB held from the driver)", gib(peak), gib(reserved));
    let (launches, kernel_ms) = table.iter().fold((0, 0.0), |(n, ms), k| (n + k.calls, ms + k.total_ms));
    println!("one eager step: {launches} kernel launches, {kernel_ms:.2} ms of kernel time (CUDA events per launch); replayed, a step is one graph launch per micro-step plus one for the update");
    println!("{}", crate::cuda::TimingTable(&table));
    Ok(())
}

/// Tokenizes and encodes every caption with CLIP and every image with the VAE encoder, once; both
/// models are dropped on return.
fn encode_dataset(dev: Dev, cfg: &TrainConfig, source: &ModelSource) -> Result<Vec<Example>> {
    let data = load_dataset(&cfg.data, cfg.resolution)?;
    let tokenizer = ClipTokenizer::for_source(source)?;
    let clip = ClipTextModel::from_source(dev, source).context("loading the text encoder")?;
    let vae = AutoencoderKl::from_source(dev, source).context("loading the VAE")?;
    let host = |t: Tensor| t.into_host(dev.gpu());
    let r = cfg.resolution as usize;
    ensure!(r.is_multiple_of(vae.factor()), "--resolution {r} is not a multiple of the VAE's factor {}", vae.factor());
    eprintln!("encoding {} captions and images (once)", data.len());
    data.iter()
        .map(|ex| {
            let ids = tokenizer.encode(&ex.caption)?;
            let context = host(clip.forward(dev, &ids, 1)?)?;
            let posterior = vae.encode(dev, &Tensor::from_vec(&[1, r, r, 3], ex.pixels.clone())?)?;
            let latent_hw = (posterior.mean.shape()[1], posterior.mean.shape()[2]);
            let std = host(posterior.logvar)?.iter().map(|lv| (0.5 * lv).exp()).collect();
            Ok(Example { mean: host(posterior.mean)?, std, latent_hw, context })
        })
        .collect::<Result<_>>()
        .context("encoding the data set")
}
