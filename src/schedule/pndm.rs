//! PNDM with `skip_prk_steps` (diffusers' PNDMScheduler as SD1.5 configures it): pseudo linear
//! multistep (PLMS) on ε, N + 1 UNet evaluations for N steps.
//!
//! Timesteps: the spaced list t₀ < … < t_{N−1} (leading: tᵢ = i·⌊T/N⌋ + 1), evaluated in the order
//! t_{N−1}, t_{N−2}, t_{N−2}, t_{N−3}, …, t₀ — the second-highest timestep twice. With δ = ⌊T/N⌋
//! (also for the other spacings, as diffusers does):
//! - evaluation 0 (at t): ε₀; x ← prev(x, t, t−δ, ε₀), and the old x is kept;
//! - evaluation 1 (at t−δ): x ← prev(x_kept, t, t−δ, (ε₁ + ε₀)/2) — a Heun-style correction of
//!   evaluation 0 from the same starting point; ε₁ is not kept in the history;
//! - later evaluations use the Adams–Bashforth combination of the kept ε's (newest first e₁, e₂, …):
//!   (3e₁ − e₂)/2, (23e₁ − 16e₂ + 5e₃)/12, (55e₁ − 59e₂ + 37e₃ − 9e₄)/24; x ← prev(x, t, t−δ, ε').
//!
//! prev(x, t, s, ε) (PNDM paper, eq. 9), with a = ᾱ_t, b = ᾱ_s (ᾱ₀ when s < 0, `set_alpha_to_one` false):
//! x_s = √(b/a)·x − (b − a)·ε / (a·√(1−b) + √(a(1−a)b)).

use super::{alpha_bar_or_final, np_arange_desc, np_linspace, NoiseSchedule, Scheduler, SchedulerConfig, Spacing};
use anyhow::Result;

pub struct Pndm {
    schedule: NoiseSchedule,
    set_alpha_to_one: bool,
    step_ratio: i64,
    timesteps: Vec<f32>,
    /// The kept ε's, oldest first (at most 4).
    ets: Vec<Vec<f32>>,
    /// The sample before evaluation 0, for the correction at evaluation 1.
    first_sample: Vec<f32>,
    next_step: usize,
}

/// The spaced timesteps, ascending, as PNDMScheduler.set_timesteps computes `_timesteps`.
fn spaced(n_train: usize, steps: usize, spacing: Spacing, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Leading => {
            let ratio = (n_train / steps) as i64;
            (0..steps as i64).map(|i| i * ratio + offset).collect()
        }
        Spacing::Linspace => {
            np_linspace(0.0, (n_train - 1) as f64, steps).iter().map(|t| t.round_ties_even() as i64).collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            let mut v: Vec<i64> =
                np_arange_desc(n_train as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as i64 - 1).collect();
            v.reverse();
            v
        }
    }
}

impl Pndm {
    pub fn new(schedule: &NoiseSchedule, steps: usize, spacing: Spacing, config: &SchedulerConfig) -> Result<Pndm> {
        let n_train = schedule.num_train_timesteps();
        let ts = spaced(n_train, steps, spacing, config.steps_offset);
        anyhow::ensure!(
            ts.iter().all(|&t| (0..n_train as i64).contains(&t)),
            "pndm: {steps} steps with {spacing:?} spacing give timesteps outside 0..{n_train}"
        );
        // plms = concat(ts[:-1], ts[-2:-1], ts[-1:]) reversed.
        let k = ts.len();
        let mut plms: Vec<i64> = ts[..k - 1].to_vec();
        if k >= 2 {
            plms.push(ts[k - 2]);
        }
        plms.push(ts[k - 1]);
        plms.reverse();
        Ok(Pndm {
            schedule: schedule.clone(),
            set_alpha_to_one: config.set_alpha_to_one,
            step_ratio: (n_train / steps) as i64,
            timesteps: plms.iter().map(|&t| t as f32).collect(),
            ets: Vec::with_capacity(4),
            first_sample: Vec::new(),
            next_step: 0,
        })
    }

    /// x_s from x_t and ε (see the module docs), in place.
    fn prev_sample(&self, x: &mut [f32], from: &[f32], t: i64, s: i64, eps: impl Fn(usize) -> f64) {
        let a = alpha_bar_or_final(&self.schedule, t, false);
        let b = alpha_bar_or_final(&self.schedule, s, self.set_alpha_to_one);
        let sample_coeff = (b / a).sqrt();
        let eps_coeff = (b - a) / (a * (1.0 - b).sqrt() + (a * (1.0 - a) * b).sqrt());
        for (i, o) in x.iter_mut().enumerate() {
            *o = (sample_coeff * from[i] as f64 - eps_coeff * eps(i)) as f32;
        }
    }
}

impl Scheduler for Pndm {
    fn name(&self) -> &'static str {
        "pndm"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn step(&mut self, step: usize, model_output: &[f32], sample: &mut [f32], _noise: &mut dyn FnMut(&mut [f32])) {
        assert_eq!(step, self.next_step, "pndm: steps must be taken in order");
        assert_eq!(model_output.len(), sample.len(), "pndm: model output and sample lengths differ");
        self.next_step += 1;
        let t = self.timesteps[step] as i64;
        if step == 1 {
            // The correction of evaluation 0: same interval, from the kept starting sample.
            let e0 = &self.ets[0];
            let from = std::mem::take(&mut self.first_sample);
            self.prev_sample(sample, &from, t + self.step_ratio, t, |i| (model_output[i] as f64 + e0[i] as f64) / 2.0);
            return;
        }
        if self.ets.len() == 4 {
            self.ets.remove(0);
        }
        self.ets.push(model_output.to_vec());
        if step == 0 {
            self.first_sample = sample.to_vec();
        }
        let e = &self.ets;
        let k = e.len();
        let from = sample.to_vec();
        let prev_t = t - self.step_ratio;
        match k {
            1 => self.prev_sample(sample, &from, t, prev_t, |i| e[0][i] as f64),
            2 => self.prev_sample(sample, &from, t, prev_t, |i| (3.0 * e[1][i] as f64 - e[0][i] as f64) / 2.0),
            3 => self.prev_sample(sample, &from, t, prev_t, |i| {
                (23.0 * e[2][i] as f64 - 16.0 * e[1][i] as f64 + 5.0 * e[0][i] as f64) / 12.0
            }),
            _ => self.prev_sample(sample, &from, t, prev_t, |i| {
                (55.0 * e[3][i] as f64 - 59.0 * e[2][i] as f64 + 37.0 * e[1][i] as f64 - 9.0 * e[0][i] as f64) / 24.0
            }),
        }
    }
}
