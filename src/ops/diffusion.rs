//! The diffusion training step around the UNet (kernels/diffusion.cu): sinusoidal timestep
//! embedding, drawing the step's noise and timesteps on the device (Philox, keyed by a device step
//! counter) with the noisy input x_t, the step's clean latents drawn from cached VAE posteriors and
//! its caption states, and the MSE loss with Min-SNR weights, forward and backward.
//! CPU twins: `timestep_embedding_cpu`, `draw_step_noise_cpu`, `add_noise_cpu`, `draw_latent_cpu`,
//! `mse_min_snr_cpu`, `mse_min_snr_backward_cpu`.
//!
//! Timesteps live in f32 tensors holding integers (exact below 2²⁴); `alphas_cumprod` is the
//! schedule's ᾱ [num_timesteps] in f32 on the device.

use super::check_gpu;
use super::philox::{below, blocks_of_four, normal_pair_from_bits, philox_block, philox_normal_cpu, StepCounter, STREAM_NOISE, STREAM_TIMESTEPS};
use crate::cuda::{grid_1d, ArenaKind, DeviceBuffer, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Context, Result};

const MODULE: &str = "diffusion";

/// CPU twin of diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift =
/// `shift`, scale 1, max_period), in the same f32 steps: [b] → [b, dim].
pub fn timestep_embedding_cpu(t: &[f32], dim: usize, max_period: f32, shift: f32, flip: bool) -> Vec<f32> {
    let half = dim / 2;
    let nlog = -(max_period as f64).ln() as f32;
    let freq: Vec<f32> = (0..half).map(|j| (((j as f32 * nlog) / (half as f32 - shift)) as f64).exp() as f32).collect();
    let mut out = vec![0f32; t.len() * dim];
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for (j, &f) in freq.iter().enumerate() {
            let a = tv * f;
            let (s, c) = (a.sin(), a.cos());
            (row[j], row[half + j]) = if flip { (c, s) } else { (s, c) };
        }
    }
    out
}

/// Sinusoidal timestep embedding: `t` [b] (f32) → `emb` [b, dim] (f32 or bf16).
pub fn timestep_embedding(gpu: &Gpu, t: &Tensor, max_period: f32, shift: f32, flip: bool, emb: &mut Tensor) -> Result<()> {
    let b = t.numel();
    check_gpu("timestep_embedding t", &[t], DType::F32, b)?;
    ensure!(emb.is_gpu() && emb.shape().len() == 2 && emb.shape()[0] == b, "timestep_embedding: emb {:?} for {b} timesteps", emb.shape());
    let dim = emb.shape()[1];
    let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (((dim / 2).div_ceil(32).clamp(1, 8) * 32) as u32, 1, 1), shared_mem_bytes: 0 };
    let nlog = -(max_period as f64).ln() as f32;
    let args = [KernelArg::Ptr(t.ptr()?), KernelArg::Ptr(emb.ptr()?), KernelArg::I32(dim as i32), KernelArg::F32(nlog), KernelArg::F32(shift), KernelArg::I32(flip as i32)];
    gpu.launch(MODULE, if emb.dtype() == DType::F32 { "timestep_embedding_f32" } else { "timestep_embedding_bf16" }, cfg, &args)
}

/// CPU twin of the step's draws: (eps [batch·n] ~ N(0, 1) from stream 0, t [batch] uniform on
/// {0..num_timesteps−1} from stream 1), keyed by (seed, step).
pub fn draw_step_noise_cpu(seed: u64, step: u32, batch: usize, n: usize, num_timesteps: u32) -> (Vec<f32>, Vec<f32>) {
    let total = batch * n;
    let mut eps = Vec::with_capacity(total + 3);
    for j in 0..total.div_ceil(4) {
        let w = philox_block(j as u64, STREAM_NOISE, step, seed);
        let (a, b) = (normal_pair_from_bits(w[0], w[1]), normal_pair_from_bits(w[2], w[3]));
        eps.extend([a.0, a.1, b.0, b.1]);
    }
    eps.truncate(total);
    let t = (0..batch).map(|s| below(philox_block(s as u64, STREAM_TIMESTEPS, step, seed)[0], num_timesteps) as f32).collect();
    (eps, t)
}

/// CPU twin: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·eps per sample (n values each).
pub fn add_noise_cpu(x0: &[f32], eps: &[f32], t: &[f32], alphas_cumprod: &[f32], n: usize) -> Vec<f32> {
    x0.iter()
        .zip(eps)
        .enumerate()
        .map(|(i, (&x, &e))| {
            let ab = alphas_cumprod[t[i / n] as usize];
            ab.sqrt() * x + (1.0 - ab).sqrt() * e
        })
        .collect()
}

/// Draws the step's noise `eps` [batch, ...] and timesteps `t` [batch] on the device from (seed,
/// *counter); with `noisy = Some((x0, xt))` also writes xt = √ᾱ_t·x0 + √(1 − ᾱ_t)·eps.
pub fn draw_step_noise(
    gpu: &Gpu, seed: u64, counter: &StepCounter, alphas_cumprod: &Tensor, eps: &mut Tensor, t: &mut Tensor, noisy: Option<(&Tensor, &mut Tensor)>,
) -> Result<()> {
    let batch = t.numel();
    ensure!(batch > 0 && eps.shape().first() == Some(&batch), "draw_step_noise: eps {:?} for {batch} timesteps", eps.shape());
    let n = eps.numel() / batch;
    check_gpu("draw_step_noise t", &[t], DType::F32, batch)?;
    check_gpu("draw_step_noise alphas_cumprod", &[alphas_cumprod], DType::F32, alphas_cumprod.numel())?;
    check_gpu("draw_step_noise eps", &[eps], eps.dtype(), batch * n)?;
    let (x0, xt) = match noisy {
        Some((x0, xt)) => {
            check_gpu("draw_step_noise x0/xt", &[x0, xt], eps.dtype(), batch * n)?;
            (x0.ptr()?, xt.ptr()?)
        }
        None => (0, 0),
    };
    let args = [
        KernelArg::Ptr(eps.ptr()?), KernelArg::Ptr(t.ptr()?), KernelArg::Ptr(x0), KernelArg::Ptr(xt), KernelArg::Ptr(alphas_cumprod.ptr()?),
        KernelArg::I32(batch as i32), KernelArg::I64(n as i64), KernelArg::U32(seed as u32), KernelArg::U32((seed >> 32) as u32),
        KernelArg::Ptr(counter.ptr()), KernelArg::U32(alphas_cumprod.numel() as u32),
    ];
    let kernel = if eps.dtype() == DType::F32 { "draw_step_noise_f32" } else { "draw_step_noise_bf16" };
    gpu.launch(MODULE, kernel, blocks_of_four((batch * n).max(4 * batch)), &args)
}

/// CPU twin of `draw_latents_f32` for one sample: (mean + std·z)·scale, z ~ N(0, 1) from Philox
/// (seed, stream, slot) — slot = step·batch + j for sample j of a step.
pub fn draw_latent_cpu(mean: &[f32], std: &[f32], seed: u64, stream: u32, slot: u32, scale: f32) -> Vec<f32> {
    let z = philox_normal_cpu(mean.len(), seed, stream, slot, 0.0, 1.0);
    mean.iter().zip(std).zip(&z).map(|((m, s), z)| (m + s * z) * scale).collect()
}

/// A table of example indices on the device, `picks[step·batch + j]` = the example of sample j of
/// micro-step `step`, with every example's posterior (mean, std: f32 [examples, n]) and caption
/// states (bf16 [examples, 77, d]): what the step reads to draw its latents without the host.
pub struct ExampleTable {
    pub picks: DeviceBuffer,
    pub slots: usize,
    pub means: Tensor,
    pub stds: Tensor,
    pub contexts: Tensor,
}

impl ExampleTable {
    /// Uploads `picks`, the posteriors (`means`, `stds`: f32 [examples, n]) and the caption states
    /// (`contexts`: [examples, 77, d], stored bf16) into the persistent arena.
    pub fn new(gpu: &Gpu, picks: &[u32], means: &Tensor, stds: &Tensor, contexts: &Tensor) -> Result<ExampleTable> {
        let examples = means.shape()[0];
        ensure!(picks.iter().all(|&p| (p as usize) < examples), "draw_latents: a pick is not one of the {examples} examples");
        let buf = gpu.alloc(ArenaKind::Persistent, picks.len().max(1) * 4)?;
        gpu.upload(&buf, picks).context("example table upload failed")?;
        Ok(ExampleTable {
            picks: buf,
            slots: picks.len(),
            means: means.to_gpu(gpu, ArenaKind::Persistent, DType::F32)?,
            stds: stds.to_gpu(gpu, ArenaKind::Persistent, DType::F32)?,
            contexts: contexts.to_gpu(gpu, ArenaKind::Persistent, DType::BF16)?,
        })
    }
}

/// x0 [batch, n] (f32) ← the latents of *counter's samples ([`draw_latent_cpu`] for each), and
/// ctx [batch, ...] (bf16) ← their caption states.
#[allow(clippy::too_many_arguments)]
pub fn draw_latents(gpu: &Gpu, table: &ExampleTable, seed: u64, stream: u32, counter: &StepCounter, scale: f32, x0: &mut Tensor, ctx: &mut Tensor) -> Result<()> {
    let batch = x0.shape()[0];
    let (examples, n) = (table.means.shape()[0], table.means.numel() / table.means.shape()[0].max(1));
    ensure!(batch > 0 && x0.numel() == batch * n, "draw_latents: x0 {:?} for latents of {n} values", x0.shape());
    check_gpu("draw_latents x0/means/stds", &[x0], DType::F32, batch * n)?;
    check_gpu("draw_latents means/stds", &[&table.means, &table.stds], DType::F32, examples * n)?;
    let row = table.contexts.numel() / examples.max(1);
    check_gpu("draw_latents contexts", &[&table.contexts], DType::BF16, examples * row)?;
    check_gpu("draw_latents ctx", &[ctx], DType::BF16, batch * row)?;
    let args = [
        KernelArg::Ptr(x0.ptr()?), KernelArg::Ptr(table.means.ptr()?), KernelArg::Ptr(table.stds.ptr()?), KernelArg::Ptr(table.picks.ptr()),
        KernelArg::I32(batch as i32), KernelArg::I64(n as i64), KernelArg::U32(seed as u32), KernelArg::U32((seed >> 32) as u32),
        KernelArg::U32(stream), KernelArg::Ptr(counter.ptr()), KernelArg::F32(scale),
    ];
    gpu.launch(MODULE, "draw_latents_f32", blocks_of_four(batch * n), &args)?;
    let args = [KernelArg::Ptr(ctx.ptr()?), KernelArg::Ptr(table.contexts.ptr()?), KernelArg::Ptr(table.picks.ptr()), KernelArg::I32(batch as i32), KernelArg::I64(row as i64), KernelArg::Ptr(counter.ptr())];
    let mut cfg = grid_1d(batch * row, 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_536);
    gpu.launch(MODULE, "gather_rows_bf16", cfg, &args)
}

/// Min-SNR weight of one sample: min(snr, γ)/snr with snr = ᾱ/(1 − ᾱ); 1 without γ.
pub fn min_snr_weight(alpha_bar: f32, gamma: Option<f32>) -> f32 {
    match gamma {
        None => 1.0,
        Some(g) => {
            let snr = alpha_bar / (1.0 - alpha_bar);
            snr.min(g) / snr
        }
    }
}

/// CPU twin: loss = mean_s( w_s · mean_i (pred − target)² ), f64 sums.
pub fn mse_min_snr_cpu(pred: &[f32], target: &[f32], t: &[f32], alphas_cumprod: &[f32], gamma: Option<f32>) -> f32 {
    let n = pred.len() / t.len();
    let per_sample = pred.chunks_exact(n).zip(target.chunks_exact(n)).zip(t).map(|((p, q), &ts)| {
        let mse = p.iter().zip(q).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>() / n as f64;
        min_snr_weight(alphas_cumprod[ts as usize], gamma) as f64 * mse
    });
    (per_sample.sum::<f64>() / t.len() as f64) as f32
}

/// CPU twin of the backward: dpred = scale · w_s · 2(pred − target)/(batch·n).
pub fn mse_min_snr_backward_cpu(pred: &[f32], target: &[f32], t: &[f32], alphas_cumprod: &[f32], gamma: Option<f32>, scale: f32) -> Vec<f32> {
    let n = pred.len() / t.len();
    let c = 2.0 * scale as f64 / pred.len() as f64;
    pred.iter()
        .zip(target)
        .enumerate()
        .map(|(i, (p, q))| (c * min_snr_weight(alphas_cumprod[t[i / n] as usize], gamma) as f64 * (*p as f64 - *q as f64)) as f32)
        .collect()
}

fn loss_operands(pred: &Tensor, target: &Tensor, t: &Tensor, alphas_cumprod: &Tensor) -> Result<(usize, usize)> {
    let batch = t.numel();
    ensure!(batch > 0 && pred.numel().is_multiple_of(batch), "mse_min_snr: pred {:?} for {batch} timesteps", pred.shape());
    check_gpu("mse_min_snr", &[pred, target], pred.dtype(), pred.numel())?;
    check_gpu("mse_min_snr t", &[t], DType::F32, batch)?;
    check_gpu("mse_min_snr alphas_cumprod", &[alphas_cumprod], DType::F32, alphas_cumprod.numel())?;
    Ok((batch, pred.numel() / batch))
}

/// Min-SNR weighted MSE: writes the scalar loss to `loss` (f32, one value). `gamma` None: plain MSE.
pub fn mse_min_snr(gpu: &Gpu, pred: &Tensor, target: &Tensor, t: &Tensor, alphas_cumprod: &Tensor, gamma: Option<f32>, loss: &mut Tensor) -> Result<()> {
    let (batch, n) = loss_operands(pred, target, t, alphas_cumprod)?;
    check_gpu("mse_min_snr loss", &[loss], DType::F32, 1)?;
    let args = [
        KernelArg::Ptr(pred.ptr()?), KernelArg::Ptr(target.ptr()?), KernelArg::Ptr(t.ptr()?), KernelArg::Ptr(alphas_cumprod.ptr()?), KernelArg::Ptr(loss.ptr()?),
        KernelArg::I32(batch as i32), KernelArg::I64(n as i64), KernelArg::F32(gamma.unwrap_or(0.0)),
    ];
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    gpu.launch(MODULE, if pred.dtype() == DType::F32 { "mse_min_snr_fwd_f32" } else { "mse_min_snr_fwd_bf16" }, cfg, &args)
}

/// Gradient of [`mse_min_snr`] times `scale` (1 for the plain loss) into `dpred` (pred's dtype).
#[allow(clippy::too_many_arguments)]
pub fn mse_min_snr_backward(gpu: &Gpu, pred: &Tensor, target: &Tensor, t: &Tensor, alphas_cumprod: &Tensor, gamma: Option<f32>, scale: f32, dpred: &mut Tensor) -> Result<()> {
    let (batch, n) = loss_operands(pred, target, t, alphas_cumprod)?;
    check_gpu("mse_min_snr_backward dpred", &[dpred], pred.dtype(), batch * n)?;
    let args = [
        KernelArg::Ptr(pred.ptr()?), KernelArg::Ptr(target.ptr()?), KernelArg::Ptr(t.ptr()?), KernelArg::Ptr(alphas_cumprod.ptr()?), KernelArg::Ptr(dpred.ptr()?),
        KernelArg::I32(batch as i32), KernelArg::I64(n as i64), KernelArg::F32(gamma.unwrap_or(0.0)), KernelArg::F32(scale),
    ];
    let mut cfg = grid_1d(batch * n, 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_536);
    gpu.launch(MODULE, if pred.dtype() == DType::F32 { "mse_min_snr_bwd_f32" } else { "mse_min_snr_bwd_bf16" }, cfg, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference;
    use crate::ops::philox::tests::assert_same_bits;
    use crate::ops::twin_check::tolerance;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, compare, round_bf16};

    /// ᾱ of SD1.5's "scaled_linear" schedule (β from 0.00085 to 0.012 in √ space, 1000 steps).
    fn sd15_alphas_cumprod() -> Vec<f32> {
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut prod = 1.0;
        (0..1000).map(|i| {
            let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
            prod *= 1.0 - beta;
            prod as f32
        }).collect()
    }

    #[test]
    fn timestep_embedding_closed_forms() {
        let e = timestep_embedding_cpu(&[0.0, 3.0], 8, 10000.0, 0.0, true);
        assert_eq!(&e[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], "t = 0: cos part 1, sin part 0");
        assert!((e[8] - 3f32.cos()).abs() < 1e-7 && (e[12] - 3f32.sin()).abs() < 1e-7, "frequency 0 is 1");
        // Frequency j = 10000^(−j/half): the last one of dim 8 is 10000^(−3/4) = 1e-3.
        let f3 = timestep_embedding_cpu(&[1000.0], 8, 10000.0, 0.0, false)[3].asin();
        assert!((f3 - 1.0).abs() < 1e-4, "{f3}");
        assert_eq!(timestep_embedding_cpu(&[5.0], 7, 10000.0, 0.0, true)[6], 0.0, "odd dim pads a zero");
    }

    #[test]
    fn mse_min_snr_backward_matches_finite_differences() {
        let ac = sd15_alphas_cumprod();
        let mut rng = Rng::new(41);
        let (pred, target) = (rng.normal_vec(12, 1.0), rng.normal_vec(12, 1.0));
        let t = [10.0, 500.0, 990.0];
        for gamma in [None, Some(5.0)] {
            let analytic = mse_min_snr_backward_cpu(&pred, &target, &t, &ac, gamma, 1.0);
            let numeric = finite_difference(&pred, 1e-2, |p| mse_min_snr_cpu(p, &target, &t, &ac, gamma) as f64);
            let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
            assert_close(&format!("mse min-snr backward (gamma {gamma:?})"), &analytic, &numeric, 1e-3);
        }
        // Low t has a large SNR, clipped to γ: weight γ/snr < 1; high t keeps weight 1.
        assert!(min_snr_weight(ac[10], Some(5.0)) < 0.1 && min_snr_weight(ac[990], Some(5.0)) == 1.0);
    }

    #[test]
    fn step_draws_cover_the_timesteps() {
        let mut seen = [false; 10];
        for step in 0..200 {
            let (eps, t) = draw_step_noise_cpu(9, step, 2, 3, 10);
            assert_eq!(eps.len(), 6);
            t.iter().for_each(|&v| seen[v as usize] = true);
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
    }

    use crate::testing::{download, poisoned, upload};
    fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
        let c = compare(got, want);
        println!("{what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
        assert_close(what, got, want, tol);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_timestep_embedding_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let t: Vec<f32> = [0.0, 999.0].into_iter().chain((0..6).map(|_| (rng.uniform() * 1000.0).floor())).collect();
        let td = upload(&gpu, &[t.len()], &t, DType::F32);
        for (dim, flip) in [(320, true), (320, false), (7, true), (1280, true)] {
            for dtype in [DType::F32, DType::BF16] {
                let mut emb = poisoned(&gpu, &[t.len(), dim], dtype);
                timestep_embedding(&gpu, &td, 10000.0, 0.0, flip, &mut emb).unwrap();
                let want = timestep_embedding_cpu(&t, dim, 10000.0, 0.0, flip);
                check(&format!("timestep_embedding {dtype:?} dim={dim} flip={flip} seed={seed}"), &download(&gpu, &emb), &want, tolerance(dtype));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_step_noise_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let ac = sd15_alphas_cumprod();
        let acd = upload(&gpu, &[1000], &ac, DType::F32);
        let seed = Rng::fresh_seed();
        let counter = StepCounter::new(&gpu, 3).unwrap();
        for (batch, n) in [(2, 4 * 64 * 64), (1, 4 * 96 * 96), (3, 3)] {
            for dtype in [DType::BF16, DType::F32] {
                let x0 = Rng::new(seed ^ 1).normal_vec(batch * n, 1.0);
                let x0 = if dtype == DType::BF16 { round_bf16(&x0) } else { x0 };
                let x0d = upload(&gpu, &[batch, n], &x0, dtype);
                let (mut eps, mut t, mut xt) = (poisoned(&gpu, &[batch, n], dtype), poisoned(&gpu, &[batch], DType::F32), poisoned(&gpu, &[batch, n], dtype));
                draw_step_noise(&gpu, seed, &counter, &acd, &mut eps, &mut t, Some((&x0d, &mut xt))).unwrap();
                let (want_eps, want_t) = draw_step_noise_cpu(seed, 3, batch, n, 1000);
                let want_eps = if dtype == DType::BF16 { round_bf16(&want_eps) } else { want_eps };
                let what = format!("step noise {dtype:?} batch={batch} n={n} seed={seed}");
                assert_eq!(download(&gpu, &t), want_t, "{what}: timesteps");
                assert_same_bits(&format!("{what}: eps"), &download(&gpu, &eps), &want_eps, 2);
                check(&format!("{what}: x_t"), &download(&gpu, &xt), &add_noise_cpu(&x0, &want_eps, &want_t, &ac, n), tolerance(dtype));
            }
        }
        counter.increment(&gpu).unwrap();
        let (mut eps, mut t) = (poisoned(&gpu, &[2, 16], DType::F32), poisoned(&gpu, &[2], DType::F32));
        draw_step_noise(&gpu, seed, &counter, &acd, &mut eps, &mut t, None).unwrap();
        let (want_eps, want_t) = draw_step_noise_cpu(seed, 4, 2, 16, 1000);
        assert_eq!((download(&gpu, &eps), download(&gpu, &t)), (want_eps, want_t), "the next step's draws (seed {seed})");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_latent_draws_and_caption_gather_match_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        for (examples, batch, n, row) in [(3, 1, 4 * 64 * 64, 77 * 768), (5, 2, 4 * 40 * 24, 77 * 768), (2, 3, 7, 5)] {
            let steps = 4;
            let picks: Vec<u32> = (0..steps * batch).map(|_| (rng.next_u64() % examples as u64) as u32).collect();
            let means = Tensor::from_vec(&[examples, n], rng.normal_vec(examples * n, 1.0)).unwrap();
            let stds = Tensor::from_vec(&[examples, n], rng.uniform_vec(examples * n, 0.01, 0.5)).unwrap();
            let contexts = Tensor::from_vec(&[examples, row], round_bf16(&rng.normal_vec(examples * row, 1.0))).unwrap();
            let table = ExampleTable::new(&gpu, &picks, &means, &stds, &contexts).unwrap();
            let counter = StepCounter::new(&gpu, 2).unwrap();
            let (mut x0, mut ctx) = (poisoned(&gpu, &[batch, n], DType::F32), poisoned(&gpu, &[batch, row], DType::BF16));
            draw_latents(&gpu, &table, seed, 2, &counter, 0.18215, &mut x0, &mut ctx).unwrap();
            let (mut want_x0, mut want_ctx) = (Vec::new(), Vec::new());
            for j in 0..batch {
                let e = picks[2 * batch + j] as usize;
                let (m, s) = (&means.data().unwrap()[e * n..(e + 1) * n], &stds.data().unwrap()[e * n..(e + 1) * n]);
                want_x0.extend(draw_latent_cpu(m, s, seed, 2, (2 * batch + j) as u32, 0.18215));
                want_ctx.extend_from_slice(&contexts.data().unwrap()[e * row..(e + 1) * row]);
            }
            let what = format!("latent draws examples={examples} batch={batch} n={n} seed={seed}");
            assert_same_bits(&what, &download(&gpu, &x0), &want_x0, 0);
            assert_eq!(download(&gpu, &ctx), want_ctx, "{what}: caption states");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_mse_min_snr_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let ac = sd15_alphas_cumprod();
        let acd = upload(&gpu, &[1000], &ac, DType::F32);
        for (batch, n) in [(2, 4 * 64 * 64), (1, 4 * 64 * 64), (4, 4 * 96 * 96), (3, 5)] {
            for dtype in [DType::BF16, DType::F32] {
                for gamma in [Some(5.0), None] {
                    let seed = Rng::fresh_seed();
                    let mut rng = Rng::new(seed);
                    let (mut pred, mut target) = (rng.normal_vec(batch * n, 1.0), rng.normal_vec(batch * n, 1.0));
                    if dtype == DType::BF16 {
                        (pred, target) = (round_bf16(&pred), round_bf16(&target));
                    }
                    let t: Vec<f32> = (0..batch).map(|_| (rng.uniform() * 1000.0).floor()).collect();
                    let (pd, qd, td) = (upload(&gpu, &[batch, n], &pred, dtype), upload(&gpu, &[batch, n], &target, dtype), upload(&gpu, &[batch], &t, DType::F32));
                    let (mut loss, mut dpred) = (poisoned(&gpu, &[1], DType::F32), poisoned(&gpu, &[batch, n], dtype));
                    mse_min_snr(&gpu, &pd, &qd, &td, &acd, gamma, &mut loss).unwrap();
                    mse_min_snr_backward(&gpu, &pd, &qd, &td, &acd, gamma, 0.5, &mut dpred).unwrap();
                    let what = format!("mse min-snr {dtype:?} batch={batch} n={n} gamma={gamma:?} t={t:?} seed={seed}");
                    // The loss is an f32 reduction of f32 values in both storage types: 1e-5.
                    check(&format!("{what}: loss"), &download(&gpu, &loss), &[mse_min_snr_cpu(&pred, &target, &t, &ac, gamma)], 1e-5);
                    check(&format!("{what}: dpred"), &download(&gpu, &dpred), &mse_min_snr_backward_cpu(&pred, &target, &t, &ac, gamma, 0.5), tolerance(dtype));
                }
            }
        }
    }
}
