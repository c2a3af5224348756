//! DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler: `algorithm_type` "dpmsolver++",
//! `solver_order` 2, `solver_type` "midpoint", `lower_order_final`, `final_sigmas_type` "zero"),
//! optionally on Karras σs. One UNet evaluation per step.
//!
//! Timesteps (integers, descending): default "linspace": round(linspace(0, T−1, N+1)) reversed without
//! its last entry (0); "leading": i·⌊T/(N+1)⌋ + 1 for i = N..1. σᵢ = σ(tᵢ), σ_N = 0. Karras:
//! σᵢ = (σ_max^{1/7} + i/(N−1)·(σ_min^{1/7} − σ_max^{1/7}))⁷ over the whole table's range, tᵢ = the
//! (rounded) fractional timestep whose log σ interpolates log σᵢ.
//!
//! With αᵢ = 1/√(σᵢ²+1), sᵢ = σᵢ·αᵢ, λᵢ = ln αᵢ − ln sᵢ: x̂₀ = (x − sᵢ·ε)/αᵢ (the "data prediction"),
//! h = λ_{i+1} − λᵢ, φ = α_{i+1}·(e^{−h} − 1);
//! - first order (first step, and the last step — it lands on σ = 0, i.e. x ← x̂₀):
//!   x ← (s_{i+1}/sᵢ)·x − φ·x̂₀;
//! - second order (midpoint) otherwise, with the previous x̂₀′, r = (λᵢ − λ_{i−1})/h:
//!   D₁ = (x̂₀ − x̂₀′)/r;  x ← (s_{i+1}/sᵢ)·x − φ·x̂₀ − ½·φ·D₁.

use super::{np_arange_desc, np_interp, np_linspace, NoiseSchedule, Scheduler, SchedulerConfig, Spacing};
use anyhow::Result;

pub struct DpmPp2M {
    karras: bool,
    timesteps: Vec<f32>,
    /// σᵢ for each step, then 0.
    sigmas: Vec<f32>,
    /// x̂₀ of the previous step (empty before the first).
    prev_x0: Vec<f32>,
    x0: Vec<f32>,
    next_step: usize,
}

/// DPMSolverMultistepScheduler.set_timesteps without Karras σs, descending.
fn spaced(n_train: usize, steps: usize, spacing: Spacing, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps + 1)
            .iter()
            .rev()
            .take(steps)
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (n_train / (steps + 1)) as i64;
            (1..=steps as i64).rev().map(|i| i * ratio + offset).collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange_desc(n_train as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log σ (piecewise linear in t) is ln σ.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last = log_sigmas.len() - 2;
    // The last index with log_sigmas[k] ≤ log σ (0 when none), clipped to len − 2.
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(last);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// (α, s, λ) for a σ: α = 1/√(σ²+1), s = σα, λ = ln α − ln s.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl DpmPp2M {
    pub fn new(
        schedule: &NoiseSchedule,
        steps: usize,
        spacing: Spacing,
        config: &SchedulerConfig,
        karras: bool,
    ) -> Result<DpmPp2M> {
        let n_train = schedule.num_train_timesteps();
        let table = schedule.sigmas();
        let (timesteps, mut sigmas): (Vec<f32>, Vec<f32>) = if karras {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let (min_inv, max_inv) = ((table[0] as f64).powf(1.0 / 7.0), (table[n_train - 1] as f64).powf(1.0 / 7.0));
            let karras: Vec<f64> =
                np_linspace(0.0, 1.0, steps).iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(7.0)).collect();
            let ts = karras.iter().map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as f32).collect();
            (ts, karras.iter().map(|&s| s as f32).collect())
        } else {
            let ts = spaced(n_train, steps, spacing, config.steps_offset);
            anyhow::ensure!(
                ts.iter().all(|&t| (0..n_train as i64).contains(&t)),
                "dpmpp_2m: {steps} steps with {spacing:?} spacing give timesteps outside 0..{n_train}"
            );
            let sigmas = ts.iter().map(|&t| np_interp(t as f64, &table) as f32).collect();
            (ts.iter().map(|&t| t as f32).collect(), sigmas)
        };
        sigmas.push(0.0);
        Ok(DpmPp2M { karras, timesteps, sigmas, prev_x0: Vec::new(), x0: Vec::new(), next_step: 0 })
    }
}

impl Scheduler for DpmPp2M {
    fn name(&self) -> &'static str {
        if self.karras {
            "dpmpp_2m_karras"
        } else {
            "dpmpp_2m"
        }
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn step(&mut self, step: usize, model_output: &[f32], sample: &mut [f32], _noise: &mut dyn FnMut(&mut [f32])) {
        assert_eq!(step, self.next_step, "{}: steps must be taken in order", self.name());
        assert_eq!(model_output.len(), sample.len(), "{}: model output and sample lengths differ", self.name());
        self.next_step += 1;
        let (alpha_s, s_s, lambda_s) = alpha_sigma_lambda(self.sigmas[step] as f64);
        std::mem::swap(&mut self.prev_x0, &mut self.x0);
        self.x0.clear();
        self.x0.extend(sample.iter().zip(model_output).map(|(&x, &e)| ((x as f64 - s_s * e as f64) / alpha_s) as f32));
        let sigma_next = self.sigmas[step + 1] as f64;
        if sigma_next == 0.0 {
            // σ = 0 ends at the data prediction (the first-order update's limit).
            sample.copy_from_slice(&self.x0);
            return;
        }
        let (alpha_t, s_t, lambda_t) = alpha_sigma_lambda(sigma_next);
        let h = lambda_t - lambda_s;
        let ratio = s_t / s_s;
        let phi = alpha_t * ((-h).exp() - 1.0);
        if step == 0 {
            for (x, &x0) in sample.iter_mut().zip(&self.x0) {
                *x = (ratio * *x as f64 - phi * x0 as f64) as f32;
            }
            return;
        }
        let (_, _, lambda_prev) = alpha_sigma_lambda(self.sigmas[step - 1] as f64);
        let r = (lambda_s - lambda_prev) / h;
        for ((x, &m0), &m1) in sample.iter_mut().zip(&self.x0).zip(&self.prev_x0) {
            let (m0, m1) = (m0 as f64, m1 as f64);
            let d1 = (m0 - m1) / r;
            *x = (ratio * *x as f64 - phi * m0 - 0.5 * phi * d1) as f32;
        }
    }
}
