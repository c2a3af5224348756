//! The diffusion noise schedule of SD1.5 (training) and the samplers that walk it back (inference).
//!
//! Pure CPU math on `f32` slices, independent of tensors and the GPU: a latent is a flat slice in any
//! layout (every scheduler here is elementwise), and the UNet is whatever closure the caller passes
//! to [`denoise`].
//!
//! **Training schedule** ([`NoiseSchedule`], DESIGN.md §5): β "scaled_linear" from 0.00085 to 0.012
//! over 1000 steps, β_t = linspace(√β₀, √β₁, 1000)_t², ᾱ_t = Π_{s≤t}(1 − β_s); x_t = √ᾱ_t·x₀ +
//! √(1−ᾱ_t)·ε; SNR(t) = ᾱ_t/(1−ᾱ_t); Min-SNR weight w = min(SNR, γ)/SNR (γ = None → 1). β and ᾱ
//! are reproduced bit for bit as diffusers computes them (f32 linspace with one rounding per value,
//! cumulative product accumulated in f64 and rounded to f32, as torch does on the CPU).
//!
//! **Samplers** ([`Scheduler`]), selectable by name ([`SCHEDULER_NAMES`]), each matching the diffusers
//! class configured by SD1.5's `scheduler/scheduler_config.json` (scaled_linear 0.00085..0.012, 1000
//! train steps, `set_alpha_to_one` false, `steps_offset` 1, `skip_prk_steps` true, `clip_sample`
//! false, epsilon prediction):
//! - `pndm`: PNDMScheduler (PLMS with `skip_prk_steps`, SD1.5's default) — [`pndm`];
//! - `ddim`: DDIMScheduler, η = 0 — [`ddim`];
//! - `euler`, `euler_a`: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler — [`euler`];
//! - `dpmpp_2m`, `dpmpp_2m_karras`: DPMSolverMultistepScheduler (DPM-Solver++, order 2, midpoint,
//!   `lower_order_final`, final σ = 0), optionally with Karras σs — [`dpm`].
//!
//! Timestep spacing follows diffusers exactly. SD1.5's config file does not name
//! `timestep_spacing`, so each class uses its own default — also when a pipeline switches
//! schedulers with `Cls.from_config(pipe.scheduler.config)`, because diffusers marks the value as an
//! unset default (`_use_default_values`) and does not carry it over: PNDM and DDIM space "leading"
//! (t = i·⌊1000/N⌋ + 1), Euler, Euler ancestral and DPM++ space "linspace" (Euler's timesteps are then
//! fractional, e.g. 964.55, and reach the UNet as such). [`SchedulerConfig::spacing`] overrides it.

pub mod ddim;
pub mod dpm;
pub mod euler;
pub mod pndm;
#[cfg(test)]
mod tests;

use anyhow::{bail, ensure, Result};

/// The DDPM noise schedule: β_t and ᾱ_t for t = 0..num_train_timesteps, as f32 exactly as diffusers.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// β_t = linspace(√β₀, √β₁, n)_t² ("scaled_linear"). torch's f32 linspace computes
    /// start + step·i (first half) and end − step·(n−1−i) (second half) with one rounding (an FMA),
    /// step = (end − start)/(n − 1) in f32; its CPU cumprod accumulates in f64.
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> NoiseSchedule {
        assert!(n >= 2, "a noise schedule needs at least 2 timesteps");
        let (start, end) = (beta_start.sqrt() as f32, beta_end.sqrt() as f32);
        let step = (end - start) / (n - 1) as f32;
        let betas: Vec<f32> = (0..n)
            .map(|i| {
                let root = if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) };
                root * root
            })
            .collect();
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        NoiseSchedule { betas, alphas_cumprod }
    }

    /// SD1.5's schedule: scaled_linear, β from 0.00085 to 0.012, 1000 training timesteps.
    pub fn sd15() -> NoiseSchedule {
        NoiseSchedule::scaled_linear(0.00085, 0.012, 1000)
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] as f64
    }

    /// SNR(t) = ᾱ_t / (1 − ᾱ_t).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alpha_bar(t);
        a / (1.0 - a)
    }

    /// Min-SNR loss weight for ε-prediction: min(SNR(t), γ) / SNR(t); γ = None gives 1.
    pub fn min_snr_weight(&self, t: usize, gamma: Option<f64>) -> f64 {
        match gamma {
            None => 1.0,
            Some(g) => {
                let snr = self.snr(t);
                snr.min(g) / snr
            }
        }
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) in f32 (correctly rounded; torch's `** 0.5` is sometimes 1 ulp away).
    pub fn add_noise_coeffs(&self, t: usize) -> (f32, f32) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε for one sample at timestep t, in f32 as diffusers' `add_noise`.
    pub fn add_noise(&self, x0: &[f32], eps: &[f32], t: usize, out: &mut [f32]) {
        assert!(x0.len() == eps.len() && x0.len() == out.len(), "add_noise: lengths differ");
        let (ca, cn) = self.add_noise_coeffs(t);
        for ((o, &x), &e) in out.iter_mut().zip(x0).zip(eps) {
            *o = ca * x + cn * e;
        }
    }

    /// σ_t = √((1−ᾱ_t)/ᾱ_t) in f32 for every t: the Karras-style σ table of Euler and DPM-Solver.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }
}

/// How the inference timesteps are spread over the training timesteps (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// t = i·⌊T/N⌋ + steps_offset.
    Leading,
    /// t = round(linspace(0, T−1, N)) (rounding and count vary by scheduler, as in diffusers).
    Linspace,
    /// t = round(arange(T, 0, −T/N)) − 1.
    Trailing,
}

impl Spacing {
    pub fn from_name(name: &str) -> Result<Spacing> {
        Ok(match name {
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            "trailing" => Spacing::Trailing,
            _ => bail!("unknown timestep spacing '{name}': valid names are leading, linspace, trailing"),
        })
    }
}

/// Settings shared by the schedulers (SD1.5's scheduler_config.json by default).
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    pub steps_offset: i64,
    /// PNDM/DDIM: ᾱ "before" t = 0 is 1 (true) or ᾱ₀ (false, SD1.5).
    pub set_alpha_to_one: bool,
    /// None: the class's own default, as diffusers resolves it for SD1.5 (see the module docs).
    pub spacing: Option<Spacing>,
}

impl SchedulerConfig {
    pub const SD15: SchedulerConfig = SchedulerConfig { steps_offset: 1, set_alpha_to_one: false, spacing: None };
}

/// A sampler: the sequence of UNet evaluations and the update after each.
///
/// Use: x = initial N(0,1) latents × `init_noise_sigma()`; for each `i` in `0..timesteps().len()`:
/// ε = UNet(x × `model_input_scale(i)`, `timesteps()[i]`); `step(i, ε, x, noise)`. Steps must be taken in
/// order, once each, on a fresh scheduler per image batch (the multistep ones keep history). [`denoise`]
/// runs exactly this loop.
pub trait Scheduler: Send {
    fn name(&self) -> &'static str;
    /// The timestep given to the UNet at each model evaluation, in order (one entry per evaluation:
    /// PNDM evaluates N + 1 times for N steps).
    fn timesteps(&self) -> &[f32];
    /// What the initial N(0,1) latents are multiplied by.
    fn init_noise_sigma(&self) -> f32;
    /// The UNet's input is the current sample times this (1/√(σ²+1) for Euler, else 1).
    fn model_input_scale(&self, _step: usize) -> f32 {
        1.0
    }
    /// Advance `sample` in place given the UNet's ε prediction at evaluation `step`. `noise` fills a
    /// slice with N(0,1) values; only stochastic samplers (Euler ancestral) call it, once per step.
    fn step(&mut self, step: usize, model_output: &[f32], sample: &mut [f32], noise: &mut dyn FnMut(&mut [f32]));
}

/// The scheduler names accepted by [`scheduler_by_name`] and [`SchedulerKind::from_name`].
pub const SCHEDULER_NAMES: [&str; 6] = ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2M,
    DpmPp2MKarras,
}

impl SchedulerKind {
    pub fn from_name(name: &str) -> Result<SchedulerKind> {
        Ok(match name {
            "pndm" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler_a" => SchedulerKind::EulerAncestral,
            "dpmpp_2m" => SchedulerKind::DpmPp2M,
            "dpmpp_2m_karras" => SchedulerKind::DpmPp2MKarras,
            _ => bail!("unknown scheduler '{name}': valid names are {}", SCHEDULER_NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2M => "dpmpp_2m",
            SchedulerKind::DpmPp2MKarras => "dpmpp_2m_karras",
        }
    }

    /// The diffusers class's default `timestep_spacing` (what SD1.5's config resolves to).
    pub fn default_spacing(self) -> Spacing {
        match self {
            SchedulerKind::Pndm | SchedulerKind::Ddim => Spacing::Leading,
            _ => Spacing::Linspace,
        }
    }
}

/// A scheduler for `steps` inference steps on `schedule` with `config`.
pub fn build_scheduler(
    kind: SchedulerKind,
    steps: usize,
    schedule: &NoiseSchedule,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>> {
    let n = schedule.num_train_timesteps();
    ensure!(steps >= 1 && steps <= n, "{}: steps must be in 1..={n}, got {steps}", kind.name());
    let spacing = config.spacing.unwrap_or(kind.default_spacing());
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(schedule, steps, spacing, config)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(schedule, steps, spacing, config)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(schedule, steps, spacing, config, false)?),
        SchedulerKind::EulerAncestral => Box::new(euler::Euler::new(schedule, steps, spacing, config, true)?),
        SchedulerKind::DpmPp2M => Box::new(dpm::DpmPp2M::new(schedule, steps, spacing, config, false)?),
        SchedulerKind::DpmPp2MKarras => Box::new(dpm::DpmPp2M::new(schedule, steps, spacing, config, true)?),
    })
}

/// The named scheduler for SD1.5 (its noise schedule and scheduler config, diffusers' spacing).
pub fn scheduler_by_name(name: &str, steps: usize) -> Result<Box<dyn Scheduler>> {
    build_scheduler(SchedulerKind::from_name(name)?, steps, &NoiseSchedule::sd15(), &SchedulerConfig::SD15)
}

/// StableDiffusionPipeline's denoising loop. `latents` holds the initial N(0,1) noise on entry and the
/// final latents on return. `model(x_in, t, eps)` writes the (guided) ε prediction for input `x_in`
/// at timestep `t` into `eps`; `noise` supplies N(0,1) values to stochastic schedulers.
pub fn denoise(
    scheduler: &mut dyn Scheduler,
    latents: &mut [f32],
    mut model: impl FnMut(&[f32], f32, &mut [f32]) -> Result<()>,
    noise: &mut dyn FnMut(&mut [f32]),
) -> Result<()> {
    let sigma = scheduler.init_noise_sigma();
    latents.iter_mut().for_each(|x| *x *= sigma);
    let timesteps = scheduler.timesteps().to_vec();
    let mut x_in = vec![0f32; latents.len()];
    let mut eps = vec![0f32; latents.len()];
    for (i, &t) in timesteps.iter().enumerate() {
        let scale = scheduler.model_input_scale(i);
        x_in.iter_mut().zip(latents.iter()).for_each(|(d, &x)| *d = x * scale);
        model(&x_in, t, &mut eps)?;
        scheduler.step(i, &eps, latents, noise);
    }
    Ok(())
}

// ---- numpy's arithmetic, reproduced so that timesteps match diffusers exactly ----

/// numpy.linspace(start, stop, num) in f64 (endpoint included, last value exactly `stop`).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// numpy.arange(start, stop, step) in f64 for a negative step: length ⌈(stop − start)/step⌉, values
/// start + i·δ with δ = (start + step) − start.
fn np_arange_desc(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// numpy.interp(x, 0..table.len(), table) for x inside the table.
fn np_interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (table[j] as f64, table[j + 1] as f64);
    let slope = hi - lo; // the x step is 1
    slope * (x - j as f64) + lo
}

/// ᾱ "at" a possibly negative timestep: ᾱ_t, or the final value (1 or ᾱ₀) before t = 0.
fn alpha_bar_or_final(schedule: &NoiseSchedule, t: i64, set_alpha_to_one: bool) -> f64 {
    if t >= 0 {
        schedule.alpha_bar(t as usize)
    } else if set_alpha_to_one {
        1.0
    } else {
        schedule.alpha_bar(0)
    }
}
