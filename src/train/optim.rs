//! AdamW over every LoRA value (torch.optim.AdamW's formula, optional global-norm clipping), with
//! f32 moments or, on the GPU, 8-bit ones (`--adamw-8bit`, ops::adamw8bit). On the GPU one fused
//! launch updates the flat parameter buffer, with the step count and the learning rate read on the
//! device (so the update can be a replayed CUDA graph); on the CPU the twin runs over the
//! adapters' values gathered in the same order.

use crate::model::layers::Dev;
use crate::model::lora::{projections, LoraParams};
use crate::model::unet::UNet2DConditionModel;
use crate::model::layers::{LayerMoments, LayerUpdate};
use crate::ops::adamw::{adamw_step_cpu, AdamWConfig, AdamWSchedule, LrTable};
use crate::ops::adamw8bit::{DeviceMoments8, Moments8};
use crate::ops::philox::StepCounter;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::sync::Arc;

pub struct Optimizer {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u32,
    moments: Moments,
    /// GPU: the step count (kept equal to `step`; `step + 1` with per-layer updates, which run
    /// inside the backward) and the rate of every step.
    device: Option<Arc<AdamWSchedule>>,
    per_layer: bool,
}

/// The first and second moments of every LoRA value.
enum Moments {
    F32 { m: Tensor, v: Tensor },
    /// GPU only: one byte each, in blocks with f32 scales.
    EightBit(DeviceMoments8),
}

impl Optimizer {
    /// `rates[t − 1]` is the learning rate of update t (on the GPU; the CPU takes it per update).
    /// `eight_bit`: 8-bit moments (GPU only).
    pub fn new(dev: Dev, params: &LoraParams, cfg: AdamWConfig, rates: &[f64], eight_bit: bool) -> Result<Optimizer> {
        let (device, moments) = match dev {
            Dev::Cpu => {
                ensure!(!eight_bit, "8-bit AdamW moments (--adamw-8bit) run on the GPU");
                (None, Moments::F32 { m: Tensor::zeros(&[params.count]), v: Tensor::zeros(&[params.count]) })
            }
            Dev::Gpu(g) => {
                let schedule = Arc::new(AdamWSchedule { counter: StepCounter::new(g, 0)?, rates: LrTable::new(g, rates)?, cfg });
                let moments = if eight_bit {
                    Moments::EightBit(DeviceMoments8::zeros(g, params.count)?)
                } else {
                    Moments::F32 { m: dev.master(Tensor::zeros(&[params.count]))?, v: dev.master(Tensor::zeros(&[params.count]))? }
                };
                (Some(schedule), moments)
            }
        };
        Ok(Optimizer { cfg, step: 0, moments, device, per_layer: false })
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
                let moments = match &self.moments {
                    Moments::F32 { m, v } => LayerMoments::F32 { m: view(m)?, v: view(v)? },
                    Moments::EightBit(q) => LayerMoments::EightBit(q.view(offset, n).context("per-layer AdamW with 8-bit moments needs every adapter's size to be a multiple of 256 values")?),
                };
                a.update = Some(LayerUpdate { params: view(p)?, params16: view(p16)?, moments, schedule: schedule.clone() });
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
                let Moments::F32 { m, v } = &mut self.moments else { bail!("8-bit AdamW moments run on the GPU") };
                adamw_step_cpu(&mut p, &g, m.data_mut()?, v.data_mut()?, self.step, &cfg);
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
                // The update also writes the bf16 copy the GEMMs read.
                let copy = Some(params.params16.as_mut().context("GPU LoRA without its bf16 copy")?);
                schedule.counter.increment(g)?;
                match &mut self.moments {
                    Moments::F32 { m, v } => schedule.step(g, p, copy, grads, m, v)?,
                    Moments::EightBit(q) => schedule.step_8bit(g, p, copy, grads, q)?,
                }
                grads.zero(Some(g))?;
            }
        }
        Ok(())
    }

    /// (m, v) on the host as f32, for a checkpoint (8-bit moments decoded).
    pub fn moments(&self, dev: Dev) -> Result<(Vec<f32>, Vec<f32>)> {
        let host = |t: &Tensor| match dev {
            Dev::Cpu => t.data().map(<[f32]>::to_vec),
            Dev::Gpu(g) => t.to_cpu(g)?.into_vec(),
        };
        match (&self.moments, dev) {
            (Moments::F32 { m, v }, _) => Ok((host(m)?, host(v)?)),
            (Moments::EightBit(q), Dev::Gpu(g)) => Ok(q.download(g)?.decode()),
            (Moments::EightBit(_), Dev::Cpu) => bail!("8-bit AdamW moments live on the GPU"),
        }
    }

    /// Restores the moments and step count saved by a checkpoint (re-encoded with 8-bit moments).
    pub fn restore(&mut self, dev: Dev, step: u32, m: Vec<f32>, v: Vec<f32>) -> Result<()> {
        let n = match &self.moments {
            Moments::F32 { m, .. } => m.numel(),
            Moments::EightBit(q) => q.values(),
        };
        ensure!(m.len() == n && v.len() == n, "optimizer state holds {} values, the LoRA {n}", m.len());
        ensure!(!self.per_layer, "restore the optimizer state before switching to per-layer updates");
        self.moments = match (&self.moments, dev) {
            (Moments::EightBit(_), Dev::Gpu(g)) => Moments::EightBit(DeviceMoments8::upload(g, &Moments8::encode(&m, &v))?),
            _ => Moments::F32 { m: dev.master(Tensor::from_vec(&[n], m)?)?, v: dev.master(Tensor::from_vec(&[n], v)?)? },
        };
        self.step = step;
        if let (Dev::Gpu(g), Some(schedule)) = (dev, &self.device) {
            schedule.counter.set(g, step)?;
        }
        Ok(())
    }
}
