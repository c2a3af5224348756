//! DDIM with η = 0 (diffusers' DDIMScheduler as SD1.5 configures it: `clip_sample` false,
//! `set_alpha_to_one` false). Deterministic; one UNet evaluation per step.
//!
//! Timesteps, descending (leading: tᵢ = (N−1−i)·⌊T/N⌋ + 1). Step at t with s = t − ⌊T/N⌋, a = ᾱ_t,
//! b = ᾱ_s (ᾱ₀ when s < 0):  x̂₀ = (x − √(1−a)·ε)/√a;  x_s = √b·x̂₀ + √(1−b)·ε.

use super::{alpha_bar_or_final, np_arange_desc, np_linspace, NoiseSchedule, Scheduler, SchedulerConfig, Spacing};
use anyhow::Result;

pub struct Ddim {
    schedule: NoiseSchedule,
    set_alpha_to_one: bool,
    step_ratio: i64,
    timesteps: Vec<f32>,
    next_step: usize,
}

/// DDIMScheduler.set_timesteps, descending.
fn spaced(n_train: usize, steps: usize, spacing: Spacing, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Leading => {
            let ratio = (n_train / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + offset).collect()
        }
        Spacing::Linspace => {
            np_linspace(0.0, (n_train - 1) as f64, steps).iter().rev().map(|t| t.round_ties_even() as i64).collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange_desc(n_train as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as i64 - 1).collect()
        }
    }
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, steps: usize, spacing: Spacing, config: &SchedulerConfig) -> Result<Ddim> {
        let n_train = schedule.num_train_timesteps();
        let ts = spaced(n_train, steps, spacing, config.steps_offset);
        anyhow::ensure!(
            ts.iter().all(|&t| (0..n_train as i64).contains(&t)),
            "ddim: {steps} steps with {spacing:?} spacing give timesteps outside 0..{n_train}"
        );
        Ok(Ddim {
            schedule: schedule.clone(),
            set_alpha_to_one: config.set_alpha_to_one,
            step_ratio: (n_train / steps) as i64,
            timesteps: ts.iter().map(|&t| t as f32).collect(),
            next_step: 0,
        })
    }
}

impl Scheduler for Ddim {
    fn name(&self) -> &'static str {
        "ddim"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn step(&mut self, step: usize, model_output: &[f32], sample: &mut [f32], _noise: &mut dyn FnMut(&mut [f32])) {
        assert_eq!(step, self.next_step, "ddim: steps must be taken in order");
        assert_eq!(model_output.len(), sample.len(), "ddim: model output and sample lengths differ");
        self.next_step += 1;
        let t = self.timesteps[step] as i64;
        let a = alpha_bar_or_final(&self.schedule, t, false);
        let b = alpha_bar_or_final(&self.schedule, t - self.step_ratio, self.set_alpha_to_one);
        let (sa, sna, sb, snb) = (a.sqrt(), (1.0 - a).sqrt(), b.sqrt(), (1.0 - b).sqrt());
        for (x, &e) in sample.iter_mut().zip(model_output) {
            let (x64, e64) = (*x as f64, e as f64);
            let x0 = (x64 - sna * e64) / sa;
            *x = (sb * x0 + snb * e64) as f32;
        }
    }
}
