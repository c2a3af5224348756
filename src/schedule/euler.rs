//! Euler and Euler ancestral in σ-space (diffusers' EulerDiscreteScheduler with s_churn = 0, and
//! EulerAncestralDiscreteScheduler). One UNet evaluation per step.
//!
//! σ(t) = √((1−ᾱ_t)/ᾱ_t), linearly interpolated at fractional t; timesteps descending (default
//! "linspace": tᵢ = linspace(0, T−1, N) reversed, fractional, e.g. 999, 964.55, …; "leading":
//! (N−1−i)·⌊T/N⌋ + 1); σ_N = 0. Latents start at N(0,1)·σ_max (linspace, trailing) or
//! N(0,1)·√(σ_max²+1) (leading); the UNet sees x/√(σᵢ²+1).
//! - Euler: x̂₀ = x − σᵢ·ε;  x ← x + (σ_{i+1} − σᵢ)·(x − x̂₀)/σᵢ.
//! - Euler ancestral: σ_up = √(σ_{i+1}²(σᵢ² − σ_{i+1}²)/σᵢ²), σ_down = √(σ_{i+1}² − σ_up²);
//!   x ← x + (σ_down − σᵢ)·(x − x̂₀)/σᵢ + σ_up·z, z ~ N(0,1) drawn at every step (the last one
//!   too, where σ_up = 0, as diffusers draws it).

use super::{np_arange_desc, np_interp, np_linspace, NoiseSchedule, Scheduler, SchedulerConfig, Spacing};
use anyhow::Result;

pub struct Euler {
    ancestral: bool,
    timesteps: Vec<f32>,
    /// σᵢ for each step, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    z: Vec<f32>,
    next_step: usize,
}

/// EulerDiscreteScheduler.set_timesteps (the same in the ancestral one), descending, as f32.
fn spaced(n_train: usize, steps: usize, spacing: Spacing, offset: i64) -> Vec<f32> {
    match spacing {
        Spacing::Leading => {
            let ratio = n_train / steps;
            (0..steps).rev().map(|i| (i * ratio) as f32 + offset as f32).collect()
        }
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect(),
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange_desc(n_train as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as f32 - 1.0).collect()
        }
    }
}

impl Euler {
    pub fn new(
        schedule: &NoiseSchedule,
        steps: usize,
        spacing: Spacing,
        config: &SchedulerConfig,
        ancestral: bool,
    ) -> Result<Euler> {
        let n_train = schedule.num_train_timesteps();
        let timesteps = spaced(n_train, steps, spacing, config.steps_offset);
        anyhow::ensure!(
            timesteps.iter().all(|&t| t >= 0.0 && t <= (n_train - 1) as f32),
            "euler: {steps} steps with {spacing:?} spacing give timesteps outside 0..{n_train}"
        );
        let table = schedule.sigmas();
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| np_interp(t as f64, &table) as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0f32, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Euler { ancestral, timesteps, sigmas, init_noise_sigma, z: Vec::new(), next_step: 0 })
    }
}

impl Scheduler for Euler {
    fn name(&self) -> &'static str {
        if self.ancestral {
            "euler_a"
        } else {
            "euler"
        }
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }
    fn model_input_scale(&self, step: usize) -> f32 {
        let s = self.sigmas[step];
        1.0 / (s * s + 1.0).sqrt()
    }

    fn step(&mut self, step: usize, model_output: &[f32], sample: &mut [f32], noise: &mut dyn FnMut(&mut [f32])) {
        assert_eq!(step, self.next_step, "{}: steps must be taken in order", self.name());
        assert_eq!(model_output.len(), sample.len(), "{}: model output and sample lengths differ", self.name());
        self.next_step += 1;
        let (sigma, sigma_next) = (self.sigmas[step] as f64, self.sigmas[step + 1] as f64);
        if !self.ancestral {
            let dt = sigma_next - sigma;
            for (x, &e) in sample.iter_mut().zip(model_output) {
                let x64 = *x as f64;
                let x0 = x64 - sigma * e as f64;
                *x = (x64 + (x64 - x0) / sigma * dt) as f32;
            }
            return;
        }
        let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)).sqrt();
        let down = (sigma_next * sigma_next - up * up).sqrt();
        let dt = down - sigma;
        self.z.resize(sample.len(), 0.0);
        noise(&mut self.z);
        for ((x, &e), &z) in sample.iter_mut().zip(model_output).zip(&self.z) {
            let x64 = *x as f64;
            let x0 = x64 - sigma * e as f64;
            *x = (x64 + (x64 - x0) / sigma * dt + up * z as f64) as f32;
        }
    }
}
