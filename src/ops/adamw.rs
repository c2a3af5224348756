//! Fused AdamW step (kernels/adamw.cu) over one flat f32 buffer of trainable parameters with f32
//! moments: torch.optim.AdamW's formula (bias correction, decoupled weight decay), optionally after
//! clip_grad_norm_ with the norm reduced on the device. The step number t comes from a device
//! [`StepCounter`] so the step can be captured in a CUDA graph. CPU twin: `adamw_step_cpu`.

use super::check_gpu;
use super::philox::StepCounter;
use crate::cuda::{ArenaKind, DeviceBuffer, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Context, Result};

const MODULE: &str = "adamw";
const BLOCK: u32 = 256;
/// Grid-stride blocks, and the number of partial norms the step kernel re-reduces.
pub(crate) const MAX_BLOCKS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
/// Hyperparameters in f64, as torch holds them (Python floats): 0.999 and 0.999f32 differ by 1e-8,
/// which moves 1 − β2 by 1e-5 relative.
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// clip_grad_norm_(max_norm) before the step; None: no clipping.
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// The training defaults of DESIGN.md §5 (no clipping).
    fn default() -> Self {
        AdamWConfig { lr: 2e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, max_grad_norm: None }
    }
}

/// CPU twin: one AdamW step `t` (≥ 1) in place, in torch's order of f32 operations (the scalars
/// bias corrections, step size and decay factor computed in f64 then rounded, as Python does).
pub fn adamw_step_cpu(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], t: u32, cfg: &AdamWConfig) {
    assert!(t >= 1, "adamw_step_cpu: steps count from 1");
    let clip = match cfg.max_grad_norm {
        Some(max) => {
            let norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
            (max / (norm + 1e-6)).min(1.0)
        }
        None => 1.0,
    };
    let bc1 = 1.0 - cfg.beta1.powf(t as f64);
    let bc2 = 1.0 - cfg.beta2.powf(t as f64);
    let step_size = (cfg.lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
    let (w1, w2, b2, eps) = ((1.0 - cfg.beta1) as f32, (1.0 - cfg.beta2) as f32, cfg.beta2 as f32, cfg.eps as f32);
    for i in 0..p.len() {
        let gi = g[i] * clip;
        m[i] += w1 * (gi - m[i]);
        v[i] = v[i] * b2 + w2 * gi * gi;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] = p[i] * decay - step_size * (m[i] / denom);
    }
}

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The learning rate of every optimizer step on the device (f64): step t reads entry t − 1 (the
/// last entry beyond the end), so a captured step follows the schedule without host writes.
pub struct LrTable {
    buf: DeviceBuffer,
    len: usize,
}

impl LrTable {
    pub fn new(gpu: &Gpu, rates: &[f64]) -> Result<LrTable> {
        ensure!(!rates.is_empty() && rates.len() < i32::MAX as usize, "learning-rate table of {} entries", rates.len());
        let buf = gpu.alloc(ArenaKind::Persistent, rates.len() * 8)?;
        gpu.upload(&buf, rates).context("learning-rate table upload failed")?;
        Ok(LrTable { buf, len: rates.len() })
    }

    /// One rate for every step.
    pub fn constant(gpu: &Gpu, lr: f64) -> Result<LrTable> {
        LrTable::new(gpu, &[lr])
    }
}

/// What every AdamW step of a run shares on the device: the step counter, the rates, the betas.
pub struct AdamWSchedule {
    pub counter: StepCounter,
    pub rates: LrTable,
    pub cfg: AdamWConfig,
}

impl AdamWSchedule {
    /// [`adamw_step`] at the schedule's current step.
    pub fn step(&self, gpu: &Gpu, params: &mut Tensor, copy: Option<&mut Tensor>, grads: &Tensor, m: &mut Tensor, v: &mut Tensor) -> Result<()> {
        adamw_step(gpu, params, copy, grads, m, v, &self.counter, &self.rates, &self.cfg)
    }
}

/// With `max_grad_norm` set: Σ g² in per-block partials (scratch) for the step kernel to reduce.
pub(crate) fn grad_norm_partials(gpu: &Gpu, grads: &Tensor, cfg: &AdamWConfig) -> Result<Option<(DeviceBuffer, usize)>> {
    if cfg.max_grad_norm.is_none() {
        return Ok(None);
    }
    let n = grads.numel();
    let launch = grid(n);
    let nparts = launch.grid_dim.0 as usize;
    let part = gpu.alloc(ArenaKind::Scratch, nparts * 4)?;
    let args = [KernelArg::Ptr(grads.ptr()?), KernelArg::Ptr(part.ptr()), KernelArg::I64(n as i64)];
    gpu.launch(MODULE, "adamw_grad_sq_partial", launch, &args)?;
    Ok(Some((part, nparts)))
}

/// The step kernels' trailing arguments: step counter, rate table, hyperparameters, norm partials.
pub(crate) fn step_args(counter: &StepCounter, lr: &LrTable, cfg: &AdamWConfig, part: Option<&(DeviceBuffer, usize)>) -> Vec<KernelArg> {
    vec![
        // f64 kernel parameters travel as their 8 bytes (KernelArg has no F64).
        KernelArg::Ptr(counter.ptr()), KernelArg::Ptr(lr.buf.ptr()), KernelArg::I32(lr.len as i32), KernelArg::I64(cfg.beta1.to_bits() as i64),
        KernelArg::I64(cfg.beta2.to_bits() as i64), KernelArg::F32(cfg.eps as f32), KernelArg::I64(cfg.weight_decay.to_bits() as i64),
        KernelArg::Ptr(part.map_or(0, |(b, _)| b.ptr())), KernelArg::I32(part.map_or(0, |(_, k)| *k as i32)), KernelArg::F32(cfg.max_grad_norm.unwrap_or(0.0)),
    ]
}

/// The bf16 copy argument of the step kernels (0: none), checked against the parameters.
pub(crate) fn copy_arg(what: &str, copy: Option<&mut Tensor>, n: usize) -> Result<KernelArg> {
    Ok(KernelArg::Ptr(match copy {
        Some(c) => {
            check_gpu(what, &[c], DType::BF16, n)?;
            c.ptr()?
        }
        None => 0,
    }))
}

/// One AdamW step on the device: `params`, `grads`, `m`, `v` are f32 of one size; t = *counter
/// (advance it before the step); the rate comes from `lr` (`cfg.lr` is not read). With `max_grad_norm` set, first reduces ‖g‖² into per-block
/// partials (scratch) and scales g by min(1, max_norm/(‖g‖ + 1e-6)) inside the step (g unchanged).
/// `copy` (bf16, same size): also receives the updated parameters, rounded.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(gpu: &Gpu, params: &mut Tensor, copy: Option<&mut Tensor>, grads: &Tensor, m: &mut Tensor, v: &mut Tensor, counter: &StepCounter, lr: &LrTable, cfg: &AdamWConfig) -> Result<()> {
    let n = params.numel();
    ensure!(n > 0, "adamw_step: no parameters");
    check_gpu("adamw_step", &[params, grads, m, v], DType::F32, n)?;
    let part = grad_norm_partials(gpu, grads, cfg)?;
    let mut args = vec![KernelArg::Ptr(params.ptr()?), copy_arg("adamw_step copy", copy, n)?, KernelArg::Ptr(grads.ptr()?), KernelArg::Ptr(m.ptr()?), KernelArg::Ptr(v.ptr()?), KernelArg::I64(n as i64)];
    args.extend(step_args(counter, lr, cfg, part.as_ref()));
    gpu.launch(MODULE, "adamw_step", grid(n), &args)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ArenaKind::Persistent;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, compare};
    use crate::testing::fixtures_dir;

    /// A fixture line `name v v v ...` with values as f32 bit patterns in hex.
    fn fixture_values(text: &str, name: &str) -> Vec<f32> {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("fixture has no {name}"));
        line.split_whitespace().skip(1).map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap())).collect()
    }

    /// tests/fixtures/adamw_torch.txt, made by benches/torch_adamw.py with torch.optim.AdamW
    /// (+ clip_grad_norm_): 3 steps from zero moments for each config; our twin must match ≤ 1e-6.
    #[test]
    fn twin_matches_torch_adamw() {
        let text = std::fs::read_to_string(fixtures_dir().join("adamw_torch.txt")).expect("tests/fixtures/adamw_torch.txt");
        let configs = [
            ("plain", AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() }),
            ("sd", AdamWConfig::default()),
            ("clip", AdamWConfig { lr: 1e-3, max_grad_norm: Some(0.05), ..Default::default() }),
        ];
        for (name, cfg) in configs {
            let p0 = fixture_values(&text, "p0");
            let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; p0.len()], vec![0f32; p0.len()]);
            for t in 1..=3u32 {
                adamw_step_cpu(&mut p, &fixture_values(&text, &format!("g{t}")), &mut m, &mut v, t, &cfg);
                for (what, ours) in [("p", &p), ("m", &m), ("v", &v)] {
                    let torch = fixture_values(&text, &format!("{name}_{what}{t}"));
                    let c = compare(ours, &torch);
                    println!("{name} step {t} {what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
                    assert_close(&format!("{name} step {t} {what} vs torch"), ours, &torch, 1e-6);
                }
                let dp: Vec<f32> = p.iter().zip(&p0).map(|(a, b)| a - b).collect();
                let dt: Vec<f32> = fixture_values(&text, &format!("{name}_p{t}")).iter().zip(&p0).map(|(a, b)| a - b).collect();
                println!("{name} step {t} p − p0: rel L2 {:.2e}", compare(&dp, &dt).rel_l2);
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_adamw_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        // The SD1.5 LoRA (r = 128 on attention q/k/v/out) has 25,509,888 parameters; also odd sizes,
        // and views one value into their buffers (not 16-byte aligned: the kernel's one-value path).
        for (n, clip, offset) in [(25_509_888, None, 0), (25_509_888, Some(1.0), 0), (1, Some(0.5), 0), (1000, None, 1), (300_001, Some(1e-3), 0), (4099, None, 1)] {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let cfg = AdamWConfig { lr: 1e-3, max_grad_norm: clip, ..Default::default() };
            let (mut p, mut m, mut v) = (rng.normal_vec(n, 0.02), vec![0f32; n], vec![0f32; n]);
            let up = |x: &[f32]| {
                let padded: Vec<f32> = std::iter::repeat_n(0.0, offset).chain(x.iter().copied()).collect();
                let t = Tensor::from_vec(&[n + offset], padded).unwrap().to_gpu(&gpu, Persistent, DType::F32).unwrap();
                t.gpu_view(offset, &[n]).unwrap()
            };
            let (mut pd, mut md, mut vd) = (up(&p), up(&m), up(&v));
            let copy_buf = crate::testing::poisoned(&gpu, &[n + offset], DType::BF16);
            let mut copy = copy_buf.gpu_view(offset, &[n]).unwrap();
            let counter = StepCounter::new(&gpu, 0).unwrap();
            // A schedule: step 1 at cfg.lr, steps 2 and 3 (past the table's end) at its last rate.
            let rates = [cfg.lr, 0.37 * cfg.lr];
            let lr = LrTable::new(&gpu, &rates).unwrap();
            for t in 1..=3u32 {
                let g = rng.normal_vec(n, 1e-3);
                let gd = up(&g);
                counter.increment(&gpu).unwrap();
                adamw_step(&gpu, &mut pd, Some(&mut copy), &gd, &mut md, &mut vd, &counter, &lr, &cfg).unwrap();
                adamw_step_cpu(&mut p, &g, &mut m, &mut v, t, &AdamWConfig { lr: rates[(t as usize).min(2) - 1], ..cfg });
            }
            for (what, dev, host) in [("p", &pd, &p), ("m", &md, &m), ("v", &vd, &v)] {
                let got = dev.to_cpu(&gpu).unwrap().into_vec().unwrap();
                let c = compare(&got, host);
                println!("adamw n={n} clip={clip:?} offset={offset} {what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
                assert_close(&format!("adamw n={n} clip={clip:?} offset={offset} {what} seed={seed}"), &got, host, 1e-6);
            }
            // The bf16 copy is the updated parameters rounded (the same rounding as a cast).
            let p_gpu = pd.to_cpu(&gpu).unwrap().into_vec().unwrap();
            assert_eq!(crate::testing::download(&gpu, &copy), crate::tensor::round_bf16(&p_gpu), "adamw n={n}: bf16 copy (seed {seed})");
        }
    }
}
