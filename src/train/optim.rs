//! AdamW over every LoRA value (torch.optim.AdamW's formula, optional global-norm clipping), with
//! f32 moments. On the GPU one fused launch updates the flat parameter buffer, with the step count
//! and the learning rate read on the device (so the update can be a replayed CUDA graph); on the
//! CPU the twin runs over the adapters' values gathered in the same order.

use crate::model::layers::Dev;
use crate::model::lora::{projections, LoraParams};
use crate::model::unet::UNet2DConditionModel;
use crate::ops::adamw::{adamw_step, adamw_step_cpu, AdamWConfig, LrTable};
use crate::ops::philox::StepCounter;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};

pub struct Optimizer {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u32,
    m: Tensor,
    v: Tensor,
    /// GPU: the step count (kept equal to `step`) and the rate of every step.
    device: Option<(StepCounter, LrTable)>,
}

impl Optimizer {
    /// `rates[t − 1]` is the learning rate of update t (on the GPU; the CPU takes it per update).
    pub fn new(dev: Dev, params: &LoraParams, cfg: AdamWConfig, rates: &[f64]) -> Result<Optimizer> {
        let zeros = || dev.master(Tensor::zeros(&[params.count]));
        let device = match dev {
            Dev::Cpu => None,
            Dev::Gpu(g) => Some((StepCounter::new(g, 0)?, LrTable::new(g, rates)?)),
        };
        Ok(Optimizer { cfg, step: 0, m: zeros()?, v: zeros()?, device })
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
                let (p, grads) = (params.params.as_mut().context("GPU LoRA without a flat buffer")?, params.grads.as_mut().context("GPU LoRA without gradients")?);
                let (counter, rates) = self.device.as_ref().context("GPU optimizer without a step counter")?;
                counter.increment(g)?;
                adamw_step(g, p, grads, &mut self.m, &mut self.v, counter, rates, &cfg)?;
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
        if let (Dev::Gpu(g), Some((counter, _))) = (dev, &self.device) {
            counter.set(g, step)?;
        }
        Ok(())
    }
}
