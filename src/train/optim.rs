//! AdamW over every LoRA value (torch.optim.AdamW's formula, optional global-norm clipping), with
//! f32 moments. On the GPU one fused launch updates the flat parameter buffer, with the step count
//! and the learning rate read on the device (so the update can be a replayed CUDA graph); on the
//! CPU the twin runs over the adapters' values gathered in the same order.

use crate::model::layers::Dev;
use crate::model::lora::{projections, LoraParams};
use crate::model::unet::UNet2DConditionModel;
use crate::model::layers::LayerUpdate;
use crate::ops::adamw::{adamw_step_cpu, AdamWConfig, AdamWSchedule, LrTable};
use crate::ops::philox::StepCounter;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::sync::Arc;

pub struct Optimizer {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u32,
    m: Tensor,
    v: Tensor,
    /// GPU: the step count (kept equal to `step`; `step + 1` with per-layer updates, which run
    /// inside the backward) and the rate of every step.
    device: Option<Arc<AdamWSchedule>>,
    per_layer: bool,
}

impl Optimizer {
    /// `rates[t − 1]` is the learning rate of update t (on the GPU; the CPU takes it per update).
    pub fn new(dev: Dev, params: &LoraParams, cfg: AdamWConfig, rates: &[f64]) -> Result<Optimizer> {
        let zeros = || dev.master(Tensor::zeros(&[params.count]));
        let device = match dev {
            Dev::Cpu => None,
            Dev::Gpu(g) => Some(Arc::new(AdamWSchedule { counter: StepCounter::new(g, 0)?, rates: LrTable::new(g, rates)?, cfg })),
        };
        Ok(Optimizer { cfg, step: 0, m: zeros()?, v: zeros()?, device, per_layer: false })
    }

    /// Switches to AdamW per layer (GPU): every adapter gets its slices of the parameters, their
    /// bf16 copy and the moments, and updates itself in its backward from gradients that live only
    /// there; the flat gradient buffer is freed. Call after [`Optimizer::restore`].
    pub fn update_in_backward(&mut self, dev: Dev, unet: &mut UNet2DConditionModel, params: &mut LoraParams) -> Result<()> {
        let (Dev::Gpu(g), Some(schedule)) = (dev, &self.device) else { bail!("per-layer AdamW runs on the GPU") };
        let (p, p16) = (params.params.as_ref().context("no LoRA parameters")?, params.params16.as_ref().context("no LoRA copies")?);
        let mut offset = 0;
        for (_, linear) in projections(unet) {
            if let Some(a) = &mut linear.lora {
                let n = a.a.numel() + a.b.numel();
                let view = |t: &Tensor| t.gpu_view(offset, &[n]);
                a.update = Some(LayerUpdate { params: view(p)?, params16: view(p16)?, m: view(&self.m)?, v: view(&self.v)?, schedule: schedule.clone() });
                (a.grad_a, a.grad_b) = (Tensor::zeros(&[0]), Tensor::zeros(&[0]));
                offset += n;
            }
        }
        ensure!(offset == params.count, "per-layer AdamW: the adapters hold {offset} values, the flat buffer {}", params.count);
        params.grads = None;
        self.per_layer = true;
        schedule.counter.set(g, self.step + 1)
    }

    /// One update from the accumulated gradients, which are then zeroed; `lr` is this update's
    /// rate (the CPU reads it; the GPU reads the same value from its table).
    pub fn update(&mut self, dev: Dev, unet: &mut UNet2DConditionModel, params: &mut LoraParams, lr: f64) -> Result<()> {
        self.step += 1;
        let cfg = AdamWConfig { lr, ..self.cfg };
        match dev {
            Dev::Cpu => {
                let mut adapters: Vec<_> = projections(unet).into_iter().filter_map(|(_, l)| l.lora.as_mut()).collect();
                let gather = |f: &dyn Fn(&crate::model::layers::LoraAdapter) -> [&Tensor; 2]| -> Result<Vec<f32>> {
                    let mut out = Vec::with_capacity(params.count);
                    for a in &adapters {
                        for t in f(a) {
                            out.extend_from_slice(t.data()?);
                        }
                    }
                    Ok(out)
                };
                let mut p = gather(&|a| [&a.a, &a.b])?;
                let g = gather(&|a| [&a.grad_a, &a.grad_b])?;
                adamw_step_cpu(&mut p, &g, self.m.data_mut()?, self.v.data_mut()?, self.step, &cfg);
                let mut at = 0;
                for a in adapters.iter_mut() {
                    for t in [&mut a.a, &mut a.b] {
                        let n = t.numel();
                        t.data_mut()?.copy_from_slice(&p[at..at + n]);
                        at += n;
                    }
                    a.grad_a.zero(None)?;
                    a.grad_b.zero(None)?;
                }
            }
            Dev::Gpu(g) => {
                let schedule = self.device.as_ref().context("GPU optimizer without a step counter")?;
                if self.per_layer {
                    // The adapters updated themselves in the backward; ready the count for the next step.
                    return schedule.counter.increment(g);
                }
                let (p, grads) = (params.params.as_mut().context("GPU LoRA without a flat buffer")?, params.grads.as_mut().context("GPU LoRA without gradients")?);
                schedule.counter.increment(g)?;
                schedule.step(g, p, grads, &mut self.m, &mut self.v)?;
                grads.zero(Some(g))?;
                params.refresh_copies(dev)?;
            }
        }
        Ok(())
    }

    /// (m, v) on the host, for a checkpoint.
    pub fn moments(&self, dev: Dev) -> Result<(Vec<f32>, Vec<f32>)> {
        let host = |t: &Tensor| match dev {
            Dev::Cpu => t.data().map(<[f32]>::to_vec),
            Dev::Gpu(g) => t.to_cpu(g)?.into_vec(),
        };
        Ok((host(&self.m)?, host(&self.v)?))
    }

    /// Restores the moments and step count saved by a checkpoint.
    pub fn restore(&mut self, dev: Dev, step: u32, m: Vec<f32>, v: Vec<f32>) -> Result<()> {
        ensure!(m.len() == self.m.numel() && v.len() == self.v.numel(), "optimizer state holds {} values, the LoRA {}", m.len(), self.m.numel());
        let n = m.len();
        self.m = dev.master(Tensor::from_vec(&[n], m)?)?;
        self.v = dev.master(Tensor::from_vec(&[n], v)?)?;
        self.step = step;
        ensure!(!self.per_layer, "restore the optimizer state before switching to per-layer updates");
        if let (Dev::Gpu(g), Some(schedule)) = (dev, &self.device) {
            schedule.counter.set(g, step)?;
        }
        Ok(())
    }
}
