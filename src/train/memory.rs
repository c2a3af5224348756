//! Memory planning: what each Transformer2DModel keeps for the backward ([`Keep`]: everything, all
//! but the feed-forward hidden states, or only its input), chosen before training so the step fits
//! the device-memory budget (`--vram-limit`, else what the GPU has free) at the least recompute.
//!
//! One rehearsal micro-step with every transformer recomputing measures the floor (weights,
//! LoRA and optimizer state, the resnets' activations, the transient peak) and what each
//! transformer's activations take. Each transformer then offers two upgrades: keep all but the
//! feed-forward hidden states (saves rerunning its forward, less the feed-forward GEMM), then keep
//! those too (saves that GEMM). Upgrades are taken greedily in order of recompute FLOPs saved per
//! byte, the second only after the first, until the budget is used. The rehearsal leaves no trace
//! (gradients zeroed, draws rewound).

use super::config::TrainConfig;
use super::step::Stepper;
use crate::cuda::{ArenaKind, Gpu};
use crate::model::lora::LoraParams;
use crate::model::transformer::Keep;
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;

/// Held bytes are rounded up to scratch blocks and fragment a little: plan within this share.
const PLANNING_MARGIN: f64 = 0.92;

/// The plan's figures, for the log.
pub struct MemoryPlan {
    pub budget: usize,
    pub floor: usize,
    /// Transformers keeping every activation.
    pub kept: usize,
    /// Transformers keeping all but the feed-forward hidden states.
    pub kept_but_ff: usize,
    /// Transformers keeping only their input.
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
            "memory plan: budget {:.2} GiB; {:.2} GiB with every transformer recomputed; keeping {} transformers' activations, {} all but the feed-forward hidden states, recomputing {} ({:.0} % of the transformers' forward FLOPs run twice); planned peak {:.2} GiB",
            gib(self.budget),
            gib(self.floor),
            self.kept,
            self.kept_but_ff,
            self.recomputed,
            100.0 * self.recompute_share,
            gib(self.planned_peak)
        )
    }
}

/// Sets every transformer's [`Keep`] for a step that fits `budget` bytes.
pub fn plan(g: &Gpu, cfg: &TrainConfig, unet: &mut UNet2DConditionModel, stepper: &mut Stepper, params: &mut LoraParams, budget: usize) -> Result<MemoryPlan> {
    for (_, layer) in unet.layers_mut() {
        if let Some(t) = &mut layer.attention {
            t.keep = Keep::Input;
        }
    }
    stepper.rehearse(g, cfg, unet, params)?;
    let held = |k| g.arena_stats(k).reserved;
    let floor = held(ArenaKind::Persistent) + held(ArenaKind::Scratch);
    let mut transformers: Vec<_> = unet.layers_mut().filter_map(|(_, l)| l.attention.as_mut()).collect();
    // Upgrades 2i (keep all but the feed-forward) and 2i + 1 (keep that too, after 2i).
    let mut upgrades = Vec::new();
    for (i, t) in transformers.iter().enumerate() {
        upgrades.push(Upgrade { bytes: t.activation_bytes - t.ff_hidden_bytes, flops: t.forward_flops - t.ff_flops, after: None });
        upgrades.push(Upgrade { bytes: t.ff_hidden_bytes, flops: t.ff_flops, after: Some(2 * i) });
    }
    let taken = choose_upgrades(floor, (budget as f64 * PLANNING_MARGIN) as usize, &upgrades);
    let (mut peak, mut recomputed_flops) = (floor, 0.0);
    for (i, t) in transformers.iter_mut().enumerate() {
        t.keep = match (taken[2 * i], taken[2 * i + 1]) {
            (true, true) => Keep::All,
            (true, false) => Keep::AllButFeedForward,
            _ => Keep::Input,
        };
        for u in [2 * i, 2 * i + 1] {
            if taken[u] {
                peak += upgrades[u].bytes;
            } else {
                recomputed_flops += upgrades[u].flops;
            }
        }
    }
    let count = |k: Keep| transformers.iter().filter(|t| t.keep == k).count();
    let total_flops: f64 = upgrades.iter().map(|u| u.flops).sum();
    Ok(MemoryPlan {
        budget,
        floor,
        kept: count(Keep::All),
        kept_but_ff: count(Keep::AllButFeedForward),
        recomputed: count(Keep::Input),
        planned_peak: peak,
        recompute_share: recomputed_flops / total_flops.max(1.0),
    })
}

/// Keeping more activations: `bytes` more held, `flops` fewer recomputed; only once upgrade `after`
/// is taken.
struct Upgrade {
    bytes: usize,
    flops: f64,
    after: Option<usize>,
}

/// Which upgrades to take: repeatedly the one saving the most FLOPs per byte among those whose
/// prerequisite is taken and that fit, while `floor` plus the taken bytes stays within `room`.
fn choose_upgrades(floor: usize, room: usize, upgrades: &[Upgrade]) -> Vec<bool> {
    let (mut taken, mut used) = (vec![false; upgrades.len()], floor);
    loop {
        let value = |u: &Upgrade| u.flops / u.bytes.max(1) as f64;
        let open = |i: usize| !taken[i] && upgrades[i].after.is_none_or(|a| taken[a]) && used + upgrades[i].bytes <= room;
        let Some(best) = (0..upgrades.len()).filter(|&i| open(i)).max_by(|&a, &b| value(&upgrades[a]).total_cmp(&value(&upgrades[b]))) else {
            return taken;
        };
        taken[best] = true;
        used += upgrades[best].bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_keeps_the_most_flops_per_byte_within_the_room() {
        let up = |bytes, flops, after| Upgrade { bytes, flops, after };
        // FLOPs per byte: item 3 saves the most but is large, then 1, 2, 0.
        let items = [up(100, 100.0, None), up(100, 1000.0, None), up(50, 200.0, None), up(500, 1e6, None)];
        assert_eq!(choose_upgrades(0, 10_000, &items), [true; 4], "everything fits");
        assert_eq!(choose_upgrades(1000, 1160, &items), [false, true, true, false]);
        assert_eq!(choose_upgrades(1000, 1100, &items), [false, true, false, false]);
        assert_eq!(choose_upgrades(1000, 999, &items), [false; 4], "the floor alone is over the room");
        // Item 1 is worth more per byte but needs item 0 first; item 2 competes with both.
        let chain = [up(100, 100.0, None), up(10, 1000.0, Some(0)), up(100, 150.0, None)];
        assert_eq!(choose_upgrades(0, 110, &chain), [false, false, true], "item 1 alone would not be allowed");
        assert_eq!(choose_upgrades(0, 210, &chain), [true, true, true]);
        assert_eq!(choose_upgrades(0, 200, &chain), [true, false, true], "after 2 then 0, item 1 no longer fits");
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
        assert_eq!((everything.kept, everything.kept_but_ff, everything.recomputed), (16, 0, 0), "{everything}");
        let all_kept = everything.planned_peak;
        let budget = everything.floor + (all_kept - everything.floor) / 2;
        let half = plan(&gpu, &cfg, &mut unet, &mut stepper, &mut params, budget).unwrap();
        println!("{everything}\n{half}");
        assert!(half.kept + half.kept_but_ff > 0 && half.recomputed + half.kept_but_ff > 0 && half.planned_peak <= budget, "{half}");
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
