//! Memory planning: which Transformer2DModels keep their activations for the backward and which
//! recompute them there (activation checkpointing), chosen before training so the step fits the
//! device-memory budget (`--vram-limit`, else what the GPU has free) at the least recompute.
//!
//! One rehearsal micro-step with every transformer recomputing measures the floor (weights,
//! LoRA and optimizer state, the resnets' activations, the transient peak) and what each
//! transformer's activations take; transformers are then kept in order of recompute FLOPs saved
//! per byte until the budget is used. The rehearsal leaves no trace (gradients zeroed, draws rewound).

use super::config::TrainConfig;
use super::step::Stepper;
use crate::cuda::{ArenaKind, Gpu};
use crate::model::lora::LoraParams;
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;

/// Held bytes are rounded up to scratch blocks and fragment a little: plan within this share.
const PLANNING_MARGIN: f64 = 0.92;

/// The plan's figures, for the log.
pub struct MemoryPlan {
    pub budget: usize,
    pub floor: usize,
    pub kept: usize,
    pub recomputed: usize,
    pub planned_peak: usize,
    /// Share of the transformers' forward FLOPs that the backward runs again.
    pub recompute_share: f64,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "memory plan: budget {:.2} GiB; {:.2} GiB with every transformer recomputed; keeping {} transformers' activations, recomputing {} ({:.0} % of the transformers' forward FLOPs run twice); planned peak {:.2} GiB",
            gib(self.budget),
            gib(self.floor),
            self.kept,
            self.recomputed,
            100.0 * self.recompute_share,
            gib(self.planned_peak)
        )
    }
}

/// Sets every transformer's `checkpoint` switch for a step that fits `budget` bytes.
pub fn plan(g: &Gpu, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, stepper: &mut Stepper, params: &mut LoraParams, budget: usize) -> Result<MemoryPlan> {
    for (_, layer) in unet.layers_mut() {
        if let Some(t) = &mut layer.attention {
            t.checkpoint = true;
        }
    }
    stepper.rehearse(g, cfg, unet, params)?;
    let held = |k| g.arena_stats(k).reserved;
    let floor = held(ArenaKind::Persistent) + held(ArenaKind::Scratch);
    let mut transformers: Vec<_> = unet.layers_mut().filter_map(|(_, l)| l.attention.as_mut()).collect();
    let costs: Vec<(usize, f64)> = transformers.iter().map(|t| (t.activation_bytes, t.forward_flops)).collect();
    let keep = choose_kept(floor, (budget as f64 * PLANNING_MARGIN) as usize, &costs);
    let (mut peak, mut recomputed_flops) = (floor, 0.0);
    for ((t, &k), &(bytes, flops)) in transformers.iter_mut().zip(&keep).zip(&costs) {
        t.checkpoint = !k;
        if k {
            peak += bytes;
        } else {
            recomputed_flops += flops;
        }
    }
    let kept = keep.iter().filter(|&&k| k).count();
    let total_flops: f64 = costs.iter().map(|c| c.1).sum();
    Ok(MemoryPlan { budget, floor, kept, recomputed: keep.len() - kept, planned_peak: peak, recompute_share: recomputed_flops / total_flops.max(1.0) })
}

/// Which of the (activation bytes, recompute FLOPs) items keep their activations: greedily by
/// FLOPs saved per byte, while `floor` plus the kept bytes stays within `room`.
fn choose_kept(floor: usize, room: usize, items: &[(usize, f64)]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    let value = |i: usize| items[i].1 / items[i].0.max(1) as f64;
    order.sort_by(|&a, &b| value(b).total_cmp(&value(a)));
    let (mut keep, mut used) = (vec![false; items.len()], floor);
    for i in order {
        if used + items[i].0 <= room {
            used += items[i].0;
            keep[i] = true;
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_keeps_the_most_flops_per_byte_within_the_room() {
        // (bytes, FLOPs) per byte: item 3 saves the most but is large, then 1, 2, 0.
        let items = [(100, 100.0), (100, 1000.0), (50, 200.0), (500, 1e6)];
        assert_eq!(choose_kept(0, 10_000, &items), [true; 4], "everything fits");
        assert_eq!(choose_kept(1000, 1160, &items), [false, true, true, false]);
        assert_eq!(choose_kept(1000, 1100, &items), [false, true, false, false]);
        assert_eq!(choose_kept(1000, 999, &items), [false; 4], "the floor alone is over the room");
    }
    use crate::model::layers::Dev;
    use crate::model::lora::{self, LoraInit};
    use crate::model::unet::UNetConfig;
    use crate::ops::adamw::AdamWConfig;
    use crate::rng::Rng;
    use crate::train::optim::Optimizer;
    use crate::train::step::Example;

    /// With a budget between "everything recomputed" and "everything kept", the plan recomputes
    /// some transformers, and the steps then run inside the budget (the arena refuses to exceed it).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_plan_fits_the_step_into_the_budget() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        gpu.set_check_launches(false);
        let dev = Dev::Gpu(&gpu);
        let cfg = TrainConfig { steps: 3, ..TrainConfig::default() };
        let mut rng = Rng::new(5);
        let examples = vec![Example::random(&mut rng, 64)];
        let mut unet = UNet2DConditionModel::load(dev, &crate::model::weights::Weights::random(3), UNetConfig::sd15()).unwrap();
        let mut params = lora::attach(dev, &mut unet, &cfg.targets, cfg.rank, cfg.alpha, LoraInit::KaimingUniform, 3).unwrap();
        let mut optimizer = Optimizer::new(dev, &params, AdamWConfig::default(), &[cfg.lr], false).unwrap();
        let mut stepper = Stepper::new(dev, &cfg, &examples, 0, cfg.steps).unwrap();
        let everything = plan(&gpu, &cfg, &mut unet, &mut stepper, &mut params, 64 << 30).unwrap();
        assert_eq!((everything.kept, everything.recomputed), (16, 0), "{everything}");
        let all_kept = everything.planned_peak;
        let budget = everything.floor + (all_kept - everything.floor) / 2;
        let half = plan(&gpu, &cfg, &mut unet, &mut stepper, &mut params, budget).unwrap();
        println!("{everything}\n{half}");
        assert!(half.kept > 0 && half.recomputed > 0 && half.planned_peak <= budget, "{half}");
        gpu.set_vram_limit(Some(budget));
        for step in 0..cfg.steps {
            stepper.step(dev, &cfg, &mut unet, &mut optimizer, &mut params, &examples, step, false).unwrap();
        }
        let losses = stepper.take_losses(dev).unwrap();
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        let held = gpu.arena_stats(ArenaKind::Persistent).reserved + gpu.arena_stats(ArenaKind::Scratch).reserved;
        println!("held {held} of budget {budget} after {} steps", cfg.steps);
    }
}
