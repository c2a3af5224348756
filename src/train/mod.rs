//! `sdlora train`: the whole LoRA training job (DESIGN.md §5).
//!
//! Frozen parts run once: captions are tokenized and encoded by CLIP, images encoded by the VAE
//! into posterior moments, then both models are dropped. Each step draws, from a counter-based
//! Philox stream keyed by (seed, micro-step), a latent from every image's posterior (host), noise ε
//! and a timestep (on the GPU when training there); the UNet predicts ε from x_t; the Min-SNR-weighted MSE is backpropagated into the
//! LoRA factors; AdamW updates them. Because every draw depends only on (seed, step), a resumed run
//! continues the same loss curve.

pub mod compare;
pub mod config;
mod optim;
mod outputs;

use crate::cuda::{ArenaKind, Gpu};
use crate::data::load_dataset;
use crate::model::clip::ClipTextModel;
use crate::model::layers::Dev;
use crate::model::lora::{self, LoraInit};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::AutoencoderKl;
use crate::model::weights::{Component, ModelSource};
use crate::ops::adamw::AdamWConfig;
use crate::ops::diffusion::{add_noise_cpu, draw_step_noise_cpu, mse_min_snr_backward_cpu, mse_min_snr_cpu};
use crate::ops::diffusion;
use crate::ops::philox::{philox_normal_cpu, StepCounter};
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use crate::tensor::{DType, Tensor};
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, ensure, Context, Result};
use config::{InitKind, TrainConfig};
use optim::Optimizer;
use outputs::Outputs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// SD1.5's latent scale (vae.config.scaling_factor).
pub const LATENT_SCALE: f32 = 0.18215;
/// Philox stream of the per-step posterior samples (noise and timesteps use 0 and 1).
const STREAM_LATENT: u32 = 2;

/// One image's cached VAE posterior and its caption's CLIP states.
struct Example {
    mean: Vec<f32>,
    std: Vec<f32>,
    latent_hw: (usize, usize),
    context: Vec<f32>,
}

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
    let mut optimizer = Optimizer::new(dev, &params, adam)?;
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
    let diffusion = Diffusion::new(dev)?;
    let mut log = outputs.event_writer()?;
    let progress = outputs::progress_bar(start_step, cfg.steps);
    let started = Instant::now();
    let (mut losses, mut interrupted) = (Vec::new(), false);
    for step in start_step..cfg.steps {
        let t0 = Instant::now();
        let mut loss = 0.0;
        for micro in 0..cfg.grad_accum {
            let micro_step = (step * cfg.grad_accum + micro) as u32;
            let (micro_loss, batch) = forward_backward(dev, cfg, &mut unet, &examples, &diffusion, micro_step, draws.is_some())?;
            loss += micro_loss / cfg.grad_accum as f32;
            if let (Some(d), Some(b)) = (&mut draws, batch) {
                d.push((b, micro_loss));
            }
        }
        if !loss.is_finite() {
            progress.abandon();
            bail!("loss became {loss} at step {}: stopping; the last good checkpoint is kept in {}", step + 1, cfg.out.display());
        }
        let lr = cfg.lr_at(step);
        optimizer.update(dev, &mut unet, &mut params, lr)?;
        let done = step + 1;
        losses.push(loss);
        let seconds = t0.elapsed().as_secs_f64();
        log.scalar("loss", done as u64, loss)?;
        log.scalar("lr", done as u64, lr as f32)?;
        log.scalar("step_time_s", done as u64, seconds as f32)?;
        progress.set_position(done as u64);
        progress.set_message(format!("loss {loss:.4}{}", outputs::vram_text(gpu)));
        if done % cfg.log_every == 0 || done == cfg.steps {
            log.flush()?;
            outputs::say(&progress, format!("step {done}/{}: loss {loss:.5}, lr {lr:.2e}, {seconds:.2} s/step", cfg.steps));
        }
        interrupted = stop.load(Ordering::SeqCst);
        if done % cfg.save_every == 0 || done == cfg.steps || interrupted {
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
/// (no download), random posteriors and caption states, timed after `warmup` steps; prints median
/// ms/step, achieved TFLOP/s (1.88 TFLOP per 512 px step), peak device memory and a per-kernel table.
pub fn benchmark(gpu: &Gpu, resolution: u32, warmup: usize, steps: usize) -> Result<()> {
    let dev = Dev::Gpu(gpu);
    let cfg = TrainConfig { resolution, ..TrainConfig::default() };
    let mut unet = UNet2DConditionModel::load(dev, &crate::model::weights::Weights::random(0), UNetConfig::sd15())?;
    let mut params = lora::attach(dev, &mut unet, &cfg.targets, cfg.rank, cfg.alpha, LoraInit::KaimingUniform, cfg.seed)?;
    let mut optimizer = Optimizer::new(dev, &params, AdamWConfig::default())?;
    let hw = resolution as usize / 8;
    let mut rng = Rng::new(1);
    let examples = vec![Example { mean: rng.normal_vec(hw * hw * 4, 1.0), std: vec![0.1; hw * hw * 4], latent_hw: (hw, hw), context: rng.normal_vec(77 * 768, 1.0) }];
    let diffusion = Diffusion::new(dev)?;
    let mut step = |k: usize| -> Result<f32> {
        let (loss, _) = forward_backward(dev, &cfg, &mut unet, &examples, &diffusion, k as u32, false)?;
        optimizer.update(dev, &mut unet, &mut params, cfg.lr)?;
        Ok(loss)
    };
    for k in 0..warmup {
        step(k)?;
    }
    let mut ms = Vec::new();
    for k in warmup..warmup + steps {
        gpu.synchronize()?;
        let t0 = Instant::now();
        step(k)?;
        gpu.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    gpu.start_profiling();
    step(warmup + steps)?;
    let table = gpu.stop_profiling()?;
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let flop = 1.88e12 * (resolution as f64 / 512.0).powi(2);
    let peak = gpu.arena_stats(ArenaKind::Persistent).high_water + gpu.arena_stats(ArenaKind::Scratch).high_water;
    println!(
        "train step at {resolution} px, batch 1, r = 128 (forward, Min-SNR loss, backward, AdamW): median {median:.2} ms (min {:.2}, max {:.2}, n={steps}); {:.1} TFLOP/s; peak device memory {:.2} GiB",
        ms[0],
        ms[ms.len() - 1],
        flop / median / 1e9,
        peak as f64 / (1u64 << 30) as f64
    );
    println!("kernel time of one step (CUDA events per launch):\n{}", crate::cuda::TimingTable(&table));
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

/// The inputs of one micro-step, host-side and NHWC: what `--dump-draws` records.
pub struct Batch {
    pub shape: [usize; 4],
    pub x_t: Vec<f32>,
    pub eps: Vec<f32>,
    pub t: Vec<f32>,
    pub context: Vec<f32>,
}

/// The noise schedule and, on the GPU, its ᾱ table and the step counter the draw kernels read.
struct Diffusion {
    schedule: NoiseSchedule,
    device: Option<(Tensor, StepCounter)>,
}

impl Diffusion {
    fn new(dev: Dev) -> Result<Diffusion> {
        let schedule = NoiseSchedule::sd15();
        let device = match dev {
            Dev::Cpu => None,
            Dev::Gpu(g) => {
                let abar = Tensor::from_vec(&[schedule.alphas_cumprod.len()], schedule.alphas_cumprod.clone())?;
                Some((abar.to_gpu(g, ArenaKind::Persistent, DType::F32)?, StepCounter::new(g, 0)?))
            }
        };
        Ok(Diffusion { schedule, device })
    }
}

/// Micro-step `micro_step`'s examples in seeded order: a latent drawn from each posterior (host,
/// Philox keyed by (seed, micro_step)) and the caption states; ([b, h, w, 4], x0, context).
fn sample_latents(cfg: &TrainConfig, examples: &[Example], micro_step: u32) -> ([usize; 4], Vec<f32>, Vec<f32>) {
    let batch = cfg.batch_size;
    let picks = batch_indices(examples.len(), batch, micro_step as usize, cfg.seed);
    let (h, w) = examples[picks[0]].latent_hw;
    let n = h * w * 4;
    let mut x0 = Vec::with_capacity(batch * n);
    let mut context = Vec::new();
    for (j, &i) in picks.iter().enumerate() {
        let ex = &examples[i];
        let z = philox_normal_cpu(n, cfg.seed, STREAM_LATENT, micro_step * batch as u32 + j as u32, 0.0, 1.0);
        x0.extend(ex.mean.iter().zip(&ex.std).zip(&z).map(|((m, s), z)| (m + s * z) * LATENT_SCALE));
        context.extend_from_slice(&ex.context);
    }
    ([batch, h, w, 4], x0, context)
}

/// One forward + backward on micro-step `micro_step`'s batch; returns its loss and, when `record`,
/// its inputs. Noise ε and timesteps come from Philox keyed by (seed, micro_step) — on the GPU
/// from the draw kernel, which also forms x_t and whose bits equal the CPU twin's — and the loss
/// and its gradient from the Min-SNR kernels. Gradients accumulate, scaled by 1/grad_accum.
fn forward_backward(
    dev: Dev, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, examples: &[Example], diffusion: &Diffusion, micro_step: u32, record: bool,
) -> Result<(f32, Option<Batch>)> {
    let (shape, x0, context) = sample_latents(cfg, examples, micro_step);
    let ctx_shape = [shape[0], 77, context.len() / shape[0] / 77];
    let (gamma, scale) = (cfg.snr_gamma.value().map(|g| g as f32), 1.0 / cfg.grad_accum as f32);
    let n = x0.len() / shape[0];
    match dev {
        Dev::Cpu => {
            let abar = &diffusion.schedule.alphas_cumprod;
            let (eps, t) = draw_step_noise_cpu(cfg.seed, micro_step, shape[0], n, abar.len() as u32);
            let x_t = add_noise_cpu(&x0, &eps, &t, abar, n);
            let pred = unet.forward(dev, &Tensor::from_vec(&shape, x_t.clone())?, &Tensor::from_vec(&[t.len()], t.clone())?, &Tensor::from_vec(&ctx_shape, context.clone())?)?;
            let p = pred.into_vec()?;
            let loss = mse_min_snr_cpu(&p, &eps, &t, abar, gamma);
            unet.backward(dev, &Tensor::from_vec(&shape, mse_min_snr_backward_cpu(&p, &eps, &t, abar, gamma, scale))?)?;
            Ok((loss, record.then_some(Batch { shape, x_t, eps, t, context })))
        }
        Dev::Gpu(g) => {
            let (abar, counter) = diffusion.device.as_ref().context("GPU training without device tables")?;
            let f32_scratch = |s: &[usize]| Tensor::empty_gpu(g, ArenaKind::Scratch, s, DType::F32);
            let bf16 = |t: &Tensor| -> Result<Tensor> {
                let mut out = Tensor::empty_gpu(g, ArenaKind::Scratch, t.shape(), DType::BF16)?;
                crate::ops::elementwise::cast(g, t, &mut out)?;
                Ok(out)
            };
            counter.set(g, micro_step)?;
            let x0 = Tensor::from_vec(&shape, x0)?.to_gpu(g, ArenaKind::Scratch, DType::F32)?;
            let (mut eps, mut t, mut x_t) = (f32_scratch(&shape)?, f32_scratch(&[shape[0]])?, f32_scratch(&shape)?);
            diffusion::draw_step_noise(g, cfg.seed, counter, abar, &mut eps, &mut t, Some((&x0, &mut x_t)))?;
            let ctx = Tensor::from_vec(&ctx_shape, context.clone())?.to_gpu(g, ArenaKind::Scratch, DType::BF16)?;
            let pred = unet.forward(dev, &bf16(&x_t)?, &t, &ctx)?;
            let mut p = f32_scratch(&shape)?;
            crate::ops::elementwise::cast(g, &pred, &mut p)?;
            let (mut loss, mut d) = (f32_scratch(&[1])?, f32_scratch(&shape)?);
            diffusion::mse_min_snr(g, &p, &eps, &t, abar, gamma, &mut loss)?;
            diffusion::mse_min_snr_backward(g, &p, &eps, &t, abar, gamma, scale, &mut d)?;
            unet.backward(dev, &bf16(&d)?)?;
            let loss = loss.to_cpu(g)?.into_vec()?[0];
            let batch = match record {
                true => Some(Batch { shape, x_t: x_t.to_cpu(g)?.into_vec()?, eps: eps.to_cpu(g)?.into_vec()?, t: t.to_cpu(g)?.into_vec()?, context }),
                false => None,
            };
            Ok((loss, batch))
        }
    }
}

/// The examples of micro-step `k`: consecutive slots of a sequence of seeded shuffles of the data
/// set (a new permutation per epoch), so the order depends only on (seed, k).
fn batch_indices(len: usize, batch: usize, k: usize, seed: u64) -> Vec<usize> {
    (k * batch..(k + 1) * batch)
        .map(|slot| {
            let (epoch, pos) = (slot / len, slot % len);
            let mut order: Vec<usize> = (0..len).collect();
            let mut rng = Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..len).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            order[pos]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_every_example_once() {
        let seen: Vec<usize> = (0..5).flat_map(|k| batch_indices(5, 1, k, 7)).collect();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        let next: Vec<usize> = (5..10).flat_map(|k| batch_indices(5, 1, k, 7)).collect();
        assert_ne!(seen, next, "each epoch is shuffled anew");
        assert_eq!(batch_indices(5, 2, 3, 7), [6, 7].map(|s| batch_indices(5, 1, s, 7)[0]).to_vec());
    }
}
