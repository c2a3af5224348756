//! The training step — draws, UNet forward, Min-SNR loss, backward, AdamW — on either device.
//!
//! Every draw depends only on (seed, micro-step k): the examples of k from a seeded shuffle, each
//! latent from its example's cached VAE posterior (Philox stream 2, counter k·batch + j), noise ε
//! and timesteps from Philox streams 0 and 1 keyed by k.
//!
//! On the GPU all of that happens on the device: the example picks of the whole run are uploaded
//! once, a device counter holds k, and the loss goes into a device ring read back every few steps.
//! Nothing in a step needs the host, so after one eager step (which loads the kernels and sizes
//! the scratch blocks) a micro-step and an optimizer update are captured as two CUDA graphs and
//! replayed: one launch each. The CPU path computes the same draws with the twins (the same
//! latents, noise and timesteps bit for bit).

use super::optim::Optimizer;
use super::config::TrainConfig;
use crate::cuda::{ArenaKind, Gpu, Graph};
use crate::model::layers::Dev;
use crate::model::lora::LoraParams;
use crate::model::unet::UNet2DConditionModel;
use crate::ops::diffusion::{self, add_noise_cpu, draw_latent_cpu, draw_step_noise_cpu, mse_min_snr_backward_cpu, mse_min_snr_cpu, ExampleTable};
use crate::ops::elementwise::cast;
use crate::ops::philox::StepCounter;
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Context, Result};

/// SD1.5's latent scale (vae.config.scaling_factor).
const LATENT_SCALE: f32 = 0.18215;
/// Philox stream of the per-step posterior samples (noise and timesteps use 0 and 1).
const STREAM_LATENT: u32 = 2;

/// One image's cached VAE posterior and its caption's CLIP states.
pub struct Example {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub latent_hw: (usize, usize),
    pub context: Vec<f32>,
}

impl Example {
    /// A stand-in with a random posterior (std 0.1) of an `hw`×`hw` latent and random SD1.5-sized
    /// caption states: for benchmarks and GPU tests, which need no data set.
    pub fn random(rng: &mut Rng, hw: usize) -> Example {
        Example { mean: rng.normal_vec(hw * hw * 4, 1.0), std: vec![0.1; hw * hw * 4], latent_hw: (hw, hw), context: rng.normal_vec(77 * 768, 1.0) }
    }
}

/// The inputs of one micro-step, host-side and NHWC: what `--dump-draws` records.
pub struct Batch {
    pub shape: [usize; 4],
    pub x_t: Vec<f32>,
    pub eps: Vec<f32>,
    pub t: Vec<f32>,
    pub context: Vec<f32>,
}

/// Runs training steps on one device and hands back their micro-steps' losses.
pub enum Stepper {
    Cpu { schedule: NoiseSchedule, losses: Vec<f32> },
    Gpu(Box<DeviceStep>),
}

/// The GPU step's device-resident state: the example table, the step counter, the buffers a
/// micro-step reads and writes (persistent: graphs keep their addresses), the loss ring, and the
/// captured graphs once there are.
pub struct DeviceStep {
    table: ExampleTable,
    abar: Tensor,
    counter: StepCounter,
    x0: Tensor,
    ctx: Tensor,
    eps: Tensor,
    t: Tensor,
    x_t: Tensor,
    loss: Tensor,
    ring: Tensor,
    ring_used: usize,
    use_graphs: bool,
    eager_steps_done: usize,
    graphs: Option<(Graph, Graph)>,
}

impl Stepper {
    /// A stepper for a run of `cfg.steps` steps over `examples` that starts after step `start`.
    /// `readback` is the most steps between two [`Stepper::take_losses`] (the ring's size).
    pub fn new(dev: Dev, cfg: &TrainConfig, examples: &[Example], start: usize, readback: usize) -> Result<Stepper> {
        let schedule = NoiseSchedule::sd15();
        let g = match dev {
            Dev::Cpu => return Ok(Stepper::Cpu { schedule, losses: Vec::new() }),
            Dev::Gpu(g) => g,
        };
        let (h, w) = examples[0].latent_hw;
        ensure!(examples.iter().all(|e| e.latent_hw == (h, w)), "every image must give the same latent size");
        let (b, n, row) = (cfg.batch_size, h * w * 4, examples[0].context.len());
        let micro_steps = cfg.steps * cfg.grad_accum;
        let picks: Vec<u32> = (0..micro_steps).flat_map(|k| batch_indices(examples.len(), b, k, cfg.seed)).map(|i| i as u32).collect();
        let flat = |f: &dyn Fn(&Example) -> &Vec<f32>, width| Tensor::from_vec(&[examples.len(), width], examples.iter().flat_map(|e| f(e).iter().copied()).collect());
        let table = ExampleTable::new(g, &picks, &flat(&|e| &e.mean, n)?, &flat(&|e| &e.std, n)?, &flat(&|e| &e.context, row)?)?;
        let abar = Tensor::from_vec(&[schedule.alphas_cumprod.len()], schedule.alphas_cumprod.clone())?.to_gpu(g, ArenaKind::Persistent, DType::F32)?;
        let buf = |shape: &[usize], dtype| Tensor::empty_gpu(g, ArenaKind::Persistent, shape, dtype);
        let shape = [b, h, w, 4];
        Ok(Stepper::Gpu(Box::new(DeviceStep {
            table,
            abar,
            // The first micro-step increments it to start·grad_accum.
            counter: StepCounter::new(g, ((start * cfg.grad_accum) as u32).wrapping_sub(1))?,
            x0: buf(&shape, DType::F32)?,
            ctx: buf(&[b, 77, row / 77], DType::BF16)?,
            eps: buf(&shape, DType::F32)?,
            t: buf(&[b], DType::F32)?,
            x_t: buf(&shape, DType::F32)?,
            loss: buf(&[1], DType::F32)?,
            ring: buf(&[readback.max(1) * cfg.grad_accum], DType::F32)?,
            ring_used: 0,
            use_graphs: g.graphs_enabled(),
            eager_steps_done: 0,
            graphs: None,
        })))
    }

    /// Runs (CPU) or enqueues (GPU) optimizer step `step` (0-based): its micro-steps, then the
    /// update. With `record`, returns each micro-step's inputs (GPU: waits for them).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self, dev: Dev, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, optimizer: &mut Optimizer, params: &mut LoraParams, examples: &[Example], step: usize,
        record: bool,
    ) -> Result<Vec<Batch>> {
        let lr = cfg.lr_at(step);
        let mut batches = Vec::new();
        match (self, dev) {
            (Stepper::Cpu { schedule, losses }, Dev::Cpu) => {
                for micro in 0..cfg.grad_accum {
                    let k = step * cfg.grad_accum + micro;
                    let (loss, batch) = cpu_micro_step(cfg, unet, examples, &schedule.alphas_cumprod, k as u32)?;
                    losses.push(loss);
                    batches.extend(record.then_some(batch));
                }
                optimizer.update(dev, unet, params, lr)?;
            }
            (Stepper::Gpu(s), Dev::Gpu(g)) => {
                s.prepare_graphs(g, cfg, unet, optimizer, params, lr)?;
                for micro in 0..cfg.grad_accum {
                    match &s.graphs {
                        Some((micro_graph, _)) => g.replay(micro_graph)?,
                        None => s.launch_micro_step(g, cfg, unet)?,
                    }
                    s.keep_loss(g)?;
                    if record {
                        let k = step * cfg.grad_accum + micro;
                        let picks = batch_indices(examples.len(), cfg.batch_size, k, cfg.seed);
                        let context = picks.iter().flat_map(|&i| examples[i].context.iter().copied()).collect();
                        let host = |t: &Tensor| t.to_cpu(g)?.into_vec();
                        batches.push(Batch { shape: s.x0.shape().try_into()?, x_t: host(&s.x_t)?, eps: host(&s.eps)?, t: host(&s.t)?, context });
                    }
                }
                match &s.graphs {
                    Some((_, update_graph)) => {
                        g.replay(update_graph)?;
                        optimizer.step += 1;
                    }
                    None => optimizer.update(dev, unet, params, lr)?,
                }
                s.eager_steps_done += 1;
            }
            _ => unreachable!("a stepper runs on the device it was made for"),
        }
        Ok(batches)
    }

    /// Launch every kernel of every step from the host instead of replaying graphs (comparisons).
    pub fn disable_graphs(&mut self) {
        if let Stepper::Gpu(s) = self {
            s.use_graphs = false;
        }
    }

    /// Runs one micro-step eagerly for the memory planner and undoes it: the gradients are zeroed
    /// and the draw counter rewound, so training starts as if it had not run (GPU only).
    pub fn rehearse(&mut self, g: &Gpu, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, params: &mut LoraParams) -> Result<()> {
        let Stepper::Gpu(s) = self else { return Ok(()) };
        let before = s.counter.get(g)?;
        s.launch_micro_step(g, cfg, unet)?;
        s.counter.set(g, before)?;
        params.grads.as_mut().context("GPU LoRA without gradients")?.zero(Some(g))?;
        g.synchronize()
    }

    /// The loss of every micro-step run since the last call (GPU: waits for them).
    pub fn take_losses(&mut self, dev: Dev) -> Result<Vec<f32>> {
        match (self, dev) {
            (Stepper::Cpu { losses, .. }, _) => Ok(std::mem::take(losses)),
            (Stepper::Gpu(s), Dev::Gpu(g)) => {
                let mut ring = s.ring.to_cpu(g)?.into_vec()?;
                ring.truncate(std::mem::take(&mut s.ring_used));
                Ok(ring)
            }
            _ => unreachable!("a stepper runs on the device it was made for"),
        }
    }
}

impl DeviceStep {
    /// Every launch of one micro-step: advance the counter, draw the latents, caption states,
    /// noise and timesteps, forward, loss, backward (gradients accumulate, scaled by 1/grad_accum).
    fn launch_micro_step(&mut self, g: &Gpu, cfg: &TrainConfig, unet: &mut UNet2DConditionModel) -> Result<()> {
        let (gamma, scale) = (cfg.snr_gamma.value().map(|v| v as f32), 1.0 / cfg.grad_accum as f32);
        let scratch = |t: &Tensor, dtype| Tensor::empty_gpu(g, ArenaKind::Scratch, t.shape(), dtype);
        self.counter.increment(g)?;
        diffusion::draw_latents(g, &self.table, cfg.seed, STREAM_LATENT, &self.counter, LATENT_SCALE, &mut self.x0, &mut self.ctx)?;
        diffusion::draw_step_noise(g, cfg.seed, &self.counter, &self.abar, &mut self.eps, &mut self.t, Some((&self.x0, &mut self.x_t)))?;
        let mut x_t = scratch(&self.x_t, DType::BF16)?;
        cast(g, &self.x_t, &mut x_t)?;
        let pred = unet.forward(Dev::Gpu(g), &x_t, &self.t, &self.ctx)?;
        let mut p = scratch(&pred, DType::F32)?;
        cast(g, &pred, &mut p)?;
        diffusion::mse_min_snr(g, &p, &self.eps, &self.t, &self.abar, gamma, &mut self.loss)?;
        let mut d = scratch(&p, DType::F32)?;
        diffusion::mse_min_snr_backward(g, &p, &self.eps, &self.t, &self.abar, gamma, scale, &mut d)?;
        let mut d16 = scratch(&d, DType::BF16)?;
        cast(g, &d, &mut d16)?;
        unet.backward(Dev::Gpu(g), &d16)
    }

    /// Copies the micro-step's loss into the ring (on the stream: no wait).
    fn keep_loss(&mut self, g: &Gpu) -> Result<()> {
        let slot = self.ring.gpu_view(self.ring_used, &[1]).context("loss ring full: read the losses back more often")?;
        // SAFETY: both are 4-byte device buffers; the copy is ordered on the one stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(slot.ptr()?, self.loss.ptr()?, 4, g.stream().cu_stream()) }.context("loss copy failed")?;
        self.ring_used += 1;
        Ok(())
    }

    /// After the first (eager) step, captures a micro-step and an update as graphs.
    fn prepare_graphs(&mut self, g: &Gpu, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, optimizer: &mut Optimizer, params: &mut LoraParams, lr: f64) -> Result<()> {
        if !self.use_graphs || self.graphs.is_some() || self.eager_steps_done == 0 {
            return Ok(());
        }
        let ((), micro) = g.capture(|| self.launch_micro_step(g, cfg, unet)).context("capturing the training micro-step")?;
        let step_before = optimizer.step;
        let ((), update) = g.capture(|| optimizer.update(Dev::Gpu(g), unet, params, lr)).context("capturing the optimizer update")?;
        // The capture ran nothing: the host's step count follows the replays.
        optimizer.step = step_before;
        self.graphs = Some((micro, update));
        Ok(())
    }
}

/// One forward + backward on the CPU for micro-step `k`: (loss, its inputs).
fn cpu_micro_step(cfg: &TrainConfig, unet: &mut UNet2DConditionModel, examples: &[Example], abar: &[f32], k: u32) -> Result<(f32, Batch)> {
    let b = cfg.batch_size;
    let picks = batch_indices(examples.len(), b, k as usize, cfg.seed);
    let (h, w) = examples[picks[0]].latent_hw;
    let mut x0 = Vec::with_capacity(b * h * w * 4);
    let mut context = Vec::new();
    for (j, &i) in picks.iter().enumerate() {
        let ex = &examples[i];
        x0.extend(draw_latent_cpu(&ex.mean, &ex.std, cfg.seed, STREAM_LATENT, k.wrapping_mul(b as u32).wrapping_add(j as u32), LATENT_SCALE));
        context.extend_from_slice(&ex.context);
    }
    let shape = [b, h, w, 4];
    let (gamma, scale) = (cfg.snr_gamma.value().map(|v| v as f32), 1.0 / cfg.grad_accum as f32);
    let (eps, t) = draw_step_noise_cpu(cfg.seed, k, b, h * w * 4, abar.len() as u32);
    let x_t = add_noise_cpu(&x0, &eps, &t, abar, h * w * 4);
    let ctx = Tensor::from_vec(&[b, 77, context.len() / b / 77], context.clone())?;
    let pred = unet.forward(Dev::Cpu, &Tensor::from_vec(&shape, x_t.clone())?, &Tensor::from_vec(&[b], t.clone())?, &ctx)?.into_vec()?;
    let loss = mse_min_snr_cpu(&pred, &eps, &t, abar, gamma);
    unet.backward(Dev::Cpu, &Tensor::from_vec(&shape, mse_min_snr_backward_cpu(&pred, &eps, &t, abar, gamma, scale))?)?;
    Ok((loss, Batch { shape, x_t, eps, t, context }))
}

/// The examples of micro-step `k`: consecutive slots of a sequence of seeded shuffles of the data
/// set (a new permutation per epoch), so the order depends only on (seed, k).
pub fn batch_indices(len: usize, batch: usize, k: usize, seed: u64) -> Vec<usize> {
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

    /// `cfg.steps` steps of the full-size UNet with random weights (seed `seed`) at cfg's resolution
    /// on three random examples, with r = 8: (losses, initial LoRA values, final LoRA values).
    fn gpu_run(gpu: &Gpu, cfg: &TrainConfig, graphs: bool, per_layer: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        use crate::model::lora::{self, LoraInit};
        use crate::model::unet::UNetConfig;
        use crate::ops::adamw::AdamWConfig;
        let dev = Dev::Gpu(gpu);
        let mut rng = Rng::new(cfg.seed);
        let hw = cfg.resolution as usize / 8;
        let examples: Vec<Example> = (0..3).map(|_| Example::random(&mut rng, hw)).collect();
        let mut unet = UNet2DConditionModel::load(dev, &crate::model::weights::Weights::random(cfg.seed), UNetConfig::sd15()).unwrap();
        let mut params = lora::attach(dev, &mut unet, &cfg.targets, 8, 8.0, LoraInit::KaimingUniform, cfg.seed).unwrap();
        let init = params.params.as_ref().unwrap().to_cpu(gpu).unwrap().into_vec().unwrap();
        let rates: Vec<f64> = (0..cfg.steps).map(|s| cfg.lr_at(s)).collect();
        let mut optimizer = Optimizer::new(dev, &params, AdamWConfig { lr: cfg.lr, ..Default::default() }, &rates, cfg.adamw_8bit).unwrap();
        if per_layer {
            optimizer.update_in_backward(dev, &mut unet, &mut params).unwrap();
            assert!(params.grads.is_none(), "per-layer updates free the flat gradients");
        }
        let mut stepper = Stepper::new(dev, cfg, &examples, 0, cfg.steps).unwrap();
        if !graphs {
            stepper.disable_graphs();
        }
        for step in 0..cfg.steps {
            stepper.step(dev, cfg, &mut unet, &mut optimizer, &mut params, &examples, step, false).unwrap();
        }
        let Stepper::Gpu(s) = &stepper else { unreachable!() };
        assert_eq!(s.graphs.is_some(), graphs, "graphs captured only when enabled");
        assert_eq!(optimizer.step, cfg.steps as u32);
        (stepper.take_losses(dev).unwrap(), init, params.params.as_ref().unwrap().to_cpu(gpu).unwrap().into_vec().unwrap())
    }

    /// Same losses (to 1e-3) and the same LoRA change (to 0.1 relative): split-K LoRA gradients add
    /// with f32 atomics in any order, and AdamW normalizes every gradient, so a tiny one's rounding
    /// can flip its update's sign (the PyTorch parity compares the change the same way).
    fn assert_same_training(what: &str, a: &(Vec<f32>, Vec<f32>, Vec<f32>), b: &(Vec<f32>, Vec<f32>, Vec<f32>)) {
        println!("{what}: losses {:?} vs {:?}", a.0, b.0);
        crate::tensor::assert_close(&format!("{what}: losses"), &a.0, &b.0, 1e-3);
        let change = |p: &[f32]| p.iter().zip(&a.1).map(|(x, y)| x - y).collect::<Vec<f32>>();
        crate::tensor::assert_close(&format!("{what}: LoRA change"), &change(&a.2), &change(&b.2), 0.1);
    }

    /// Steps replayed from CUDA graphs train as steps launched eagerly (full-size UNet with random
    /// weights at 128 px, batch 2, two micro-steps per update).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_graph_replayed_steps_match_eager_steps() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        gpu.set_check_launches(false);
        let seed = Rng::fresh_seed();
        let cfg = TrainConfig { resolution: 128, batch_size: 2, grad_accum: 2, steps: 5, lr: 1e-3, seed, ..TrainConfig::default() };
        let (eager, graph) = (gpu_run(&gpu, &cfg, false, false), gpu_run(&gpu, &cfg, true, false));
        assert_eq!(eager.0.len(), cfg.steps * cfg.grad_accum);
        assert_same_training(&format!("graph vs eager, seed={seed}"), &graph, &eager);
    }

    /// AdamW applied per layer inside the backward trains as the one fused update after it.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_per_layer_adamw_matches_the_flat_update() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        gpu.set_check_launches(false);
        let seed = Rng::fresh_seed();
        let cfg = TrainConfig { resolution: 128, steps: 5, lr: 1e-3, seed, ..TrainConfig::default() };
        let (flat, per_layer) = (gpu_run(&gpu, &cfg, true, false), gpu_run(&gpu, &cfg, true, true));
        assert_same_training(&format!("per-layer vs flat AdamW, seed={seed}"), &per_layer, &flat);
    }

    /// 8-bit moments: per-layer updates match the flat 8-bit update, and 8-bit training stays close
    /// to f32 training over the first steps.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_8bit_adamw_trains_like_f32_flat_and_per_layer() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        gpu.set_check_launches(false);
        let seed = Rng::fresh_seed();
        let cfg = TrainConfig { resolution: 128, steps: 5, lr: 1e-3, seed, ..TrainConfig::default() };
        let f32_flat = gpu_run(&gpu, &cfg, true, false);
        let cfg8 = TrainConfig { adamw_8bit: true, ..cfg };
        let (flat, per_layer) = (gpu_run(&gpu, &cfg8, true, false), gpu_run(&gpu, &cfg8, true, true));
        assert_same_training(&format!("8-bit per-layer vs flat AdamW, seed={seed}"), &per_layer, &flat);
        assert_same_training(&format!("8-bit vs f32 AdamW, seed={seed}"), &flat, &f32_flat);
    }
}
