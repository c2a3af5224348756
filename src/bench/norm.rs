//! Norms and the small training-step kernels at SD1.5 shapes (bf16 activations): memory-bound,
//! reported in GB/s of bytes read + written once (the bandwidth floor's numerator), next to a
//! device-to-device copy measured in the same run. benches/torch_norm.py times PyTorch on the same
//! shapes.
//!
//! Each op's GPU time is measured inside a CUDA graph (see `time`), next to a device copy of the same
//! byte count timed the same way (`copy[same bytes]`, the fair floor for L2-resident sizes); norms
//! also eagerly (`[eager]`: median of CUDA events around each single call, launch latency included).

use super::{time_gpu, BenchRow, Timing};
use crate::cuda::{ArenaKind::Scratch, Gpu, KernelArg};
use crate::ops::adamw::{adamw_step, AdamWConfig, LrTable};
use crate::ops::philox::{philox_normal, StepCounter};
use crate::ops::{activation, diffusion, layout, norm};
use crate::tensor::{DType, Tensor};
use anyhow::{Context, Result};

const BF16: DType = DType::BF16;

fn randn(gpu: &Gpu, shape: &[usize], dtype: DType, counter: &StepCounter) -> Result<Tensor> {
    let mut t = Tensor::empty_gpu(gpu, Scratch, shape, dtype)?;
    philox_normal(gpu, &mut t, 1234, 9, counter, 0.0, 1.0)?;
    Ok(t)
}

fn row(kernel: &str, shape: String, bytes: f64, timing: Timing) -> BenchRow {
    BenchRow { kernel: kernel.into(), shape, rate: bytes / timing.median_ms / 1e6, unit: "GB/s", timing }
}

fn eager(gpu: &Gpu, f: impl FnMut() -> Result<()>) -> Result<Timing> {
    time_gpu(gpu, 10, 100, f)
}

/// GPU time per call of `f`: 20 calls captured in a CUDA graph, the graph replayed 30 times with
/// events around each replay (median, min, max per call), as benches/torch_norm.py times PyTorch.
/// If the capture fails, says so and times batches queued behind a spin kernel instead.
fn time(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    match time_graph(gpu, &mut f) {
        Ok(t) => Ok(t),
        Err(e) => {
            println!("(graph timing failed: {e:#}; timing back-to-back calls behind a spin kernel)");
            time_batched(gpu, f)
        }
    }
}

/// 5 batches of 50 calls; before each batch a spin kernel holds the GPU for 2 ms while the host
/// queues the batch, so the batch runs back to back and the events measure GPU time.
fn time_batched(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    const CALLS: usize = 50;
    let spin = crate::cuda::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    let mut ms = Vec::new();
    for _ in 0..5 {
        gpu.synchronize()?;
        gpu.launch("bench", "bench_spin", spin, &[KernelArg::I64(2_000_000)])?;
        let start = gpu.stream().record_event(Some(CU_EVENT_DEFAULT))?;
        for _ in 0..CALLS {
            f()?;
        }
        let end = gpu.stream().record_event(Some(CU_EVENT_DEFAULT))?;
        gpu.synchronize()?;
        ms.push(start.elapsed_ms(&end)? as f64 / CALLS as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], reps: ms.len() })
}

fn time_graph(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    const CALLS: usize = 20;
    for _ in 0..10 {
        f()?;
    }
    gpu.synchronize()?;
    let ((), graph) = gpu.capture(|| (0..CALLS).try_for_each(|_| f()))?;
    gpu.replay(&graph)?;
    let mut events = Vec::new();
    for _ in 0..30 {
        let start = gpu.stream().record_event(Some(CU_EVENT_DEFAULT))?;
        gpu.replay(&graph)?;
        events.push((start, gpu.stream().record_event(Some(CU_EVENT_DEFAULT))?));
    }
    gpu.synchronize()?;
    let mut ms: Vec<f64> = events.iter().map(|(s, e)| s.elapsed_ms(e).map(|v| v as f64 / CALLS as f64)).collect::<Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(Timing { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], reps: ms.len() })
}

/// A device-to-device copy of `mib` MiB timed per call (`eager`): the copy bandwidth at that size.
fn memcpy_row(gpu: &Gpu, mib: usize) -> Result<BenchRow> {
    let bytes = mib << 20;
    let (a, b) = (gpu.alloc(Scratch, bytes)?, gpu.alloc(Scratch, bytes)?);
    let t = eager(gpu, || unsafe { cudarc::driver::result::memcpy_dtod_async(b.ptr(), a.ptr(), bytes, gpu.stream().cu_stream()) }.context("copy"))?;
    Ok(row("memcpy_dtod[eager]", format!("{mib} MiB"), 2.0 * bytes as f64, t))
}

/// Device-to-device copies of `bytes / 2` bytes (so `bytes` are read + written), timed like `time`:
/// the bandwidth floor at the op's own byte count (L2-resident when the op is). Two rows: the
/// driver's memcpy, and `bench_copy` (16-byte words), launched as our kernels are (on Hopper as
/// programmatic dependent launches, which hide part of the gap between consecutive calls).
fn copy_rows(gpu: &Gpu, bytes: usize, shape: String) -> Result<Vec<BenchRow>> {
    let half = bytes / 2;
    let (a, b) = (gpu.alloc(Scratch, half)?, gpu.alloc(Scratch, half)?);
    let t = time(gpu, || unsafe { cudarc::driver::result::memcpy_dtod_async(b.ptr(), a.ptr(), half, gpu.stream().cu_stream()) }.context("copy"))?;
    let words = half / 16;
    let cfg = crate::cuda::grid_1d(words, 256);
    let args = [KernelArg::Ptr(a.ptr()), KernelArg::Ptr(b.ptr()), KernelArg::I64(words as i64)];
    let k = time(gpu, || gpu.launch("bench", "bench_copy", cfg, &args))?;
    Ok(vec![row("copy[same bytes]", shape.clone(), bytes as f64, t), row("copy_kernel[same bytes]", shape, (words * 32) as f64, k)])
}

pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let counter = StepCounter::new(gpu, 1)?;

    // Copy bandwidth: the floor's denominator.
    for mib in [5, 256] {
        rows.push(memcpy_row(gpu, mib)?);
    }

    // GroupNorm(32): resnet/transformer inputs and up-path concatenations at their resolutions.
    for (n, hw, c) in [(1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280), (1, 4096, 960), (1, 1024, 1920), (1, 256, 2560), (2, 4096, 320), (2, 4096, 640)] {
        let shape = [n, hw, c];
        let x = randn(gpu, &shape, BF16, &counter)?;
        let dy = randn(gpu, &shape, BF16, &counter)?;
        let (gamma, beta) = (randn(gpu, &[c], BF16, &counter)?, randn(gpu, &[c], BF16, &counter)?);
        let mut y = Tensor::empty_gpu(gpu, Scratch, &shape, BF16)?;
        let mut dx = Tensor::empty_gpu(gpu, Scratch, &shape, BF16)?;
        let mut stats = Tensor::empty_gpu(gpu, Scratch, &[n, norm::GROUPS, 2], DType::F32)?;
        let bytes = (n * hw * c * 2) as f64;
        let desc = format!("{n}x{hw}x{c}");
        rows.extend(copy_rows(gpu, 2 * n * hw * c * 2, format!("{desc} fwd"))?);
        rows.extend(copy_rows(gpu, 3 * n * hw * c * 2, format!("{desc} bwd"))?);
        if norm::group_norm_cluster_floor(gpu, &x, &mut y)? {
            rows.push(row("gn_cluster_floor[no math]", desc.clone(), 2.0 * bytes, time(gpu, || norm::group_norm_cluster_floor(gpu, &x, &mut y).map(drop))?));
        }
        rows.push(row("group_norm_fwd", desc.clone(), 2.0 * bytes, time(gpu, || norm::group_norm(gpu, &x, &gamma, &beta, 1e-5, false, &mut y, &mut stats))?));
        rows.push(row("group_norm_fwd[eager]", desc.clone(), 2.0 * bytes, eager(gpu, || norm::group_norm(gpu, &x, &gamma, &beta, 1e-5, false, &mut y, &mut stats))?));
        rows.push(row("group_norm_silu_fwd", desc.clone(), 2.0 * bytes, time(gpu, || norm::group_norm(gpu, &x, &gamma, &beta, 1e-5, true, &mut y, &mut stats))?));
        rows.push(row("group_norm_bwd", desc.clone(), 3.0 * bytes, time(gpu, || norm::group_norm_backward(gpu, &x, &gamma, &beta, &stats, false, &dy, None, &mut dx))?));
        rows.push(row("group_norm_bwd[eager]", desc.clone(), 3.0 * bytes, eager(gpu, || norm::group_norm_backward(gpu, &x, &gamma, &beta, &stats, false, &dy, None, &mut dx))?));
        rows.push(row("group_norm_silu_bwd", desc, 3.0 * bytes, time(gpu, || norm::group_norm_backward(gpu, &x, &gamma, &beta, &stats, true, &dy, None, &mut dx))?));
    }

    // LayerNorm: transformer tokens at each level (batch 1 and 2) and CLIP.
    for (r, c) in [(4096, 320), (1024, 640), (256, 1280), (64, 1280), (77, 768), (8192, 320)] {
        rows.extend(layer_norm_rows(gpu, &counter, r, c, true)?);
    }

    // GEGLU at the largest feed-forward (4096 tokens, d = 1280; x is 4096 × 2560).
    {
        let (m, d) = (4096, 1280);
        let x = randn(gpu, &[m, 2 * d], BF16, &counter)?;
        let dy = randn(gpu, &[m, d], BF16, &counter)?;
        let mut y = Tensor::empty_gpu(gpu, Scratch, &[m, d], BF16)?;
        let mut dx = Tensor::empty_gpu(gpu, Scratch, &[m, 2 * d], BF16)?;
        let unit = (m * d * 2) as f64;
        rows.push(row("geglu_fwd", format!("{m}x{}", 2 * d), 3.0 * unit, time(gpu, || activation::geglu(gpu, &x, &mut y))?));
        rows.push(row("geglu_bwd", format!("{m}x{}", 2 * d), 5.0 * unit, time(gpu, || activation::geglu_backward(gpu, &x, &dy, &mut dx))?));
    }

    // Up path: nearest 2x (32² → 64² at 640 channels) and the widest skip concatenation at 64².
    {
        let x = randn(gpu, &[1, 32, 32, 640], BF16, &counter)?;
        let mut y = Tensor::empty_gpu(gpu, Scratch, &[1, 64, 64, 640], BF16)?;
        let mut dx = Tensor::empty_gpu(gpu, Scratch, &[1, 32, 32, 640], BF16)?;
        let small = (32 * 32 * 640 * 2) as f64;
        rows.push(row("upsample2x_fwd", "1x32x32x640".into(), 5.0 * small, time(gpu, || layout::upsample_nearest2x(gpu, &x, &mut y))?));
        rows.push(row("upsample2x_bwd", "1x32x32x640".into(), 5.0 * small, time(gpu, || layout::upsample_nearest2x_backward(gpu, &y, &mut dx))?));
        let (a, b) = (randn(gpu, &[4096, 640], BF16, &counter)?, randn(gpu, &[4096, 320], BF16, &counter)?);
        let mut cat = Tensor::empty_gpu(gpu, Scratch, &[4096, 960], BF16)?;
        let (mut a2, mut b2) = (Tensor::empty_gpu(gpu, Scratch, &[4096, 640], BF16)?, Tensor::empty_gpu(gpu, Scratch, &[4096, 320], BF16)?);
        let bytes = (2 * 4096 * 960 * 2) as f64;
        rows.push(row("concat_channels", "4096x(640|320)".into(), bytes, time(gpu, || layout::concat_channels(gpu, &a, &b, &mut cat))?));
        rows.push(row("split_channels", "4096x(640|320)".into(), bytes, time(gpu, || layout::split_channels(gpu, &cat, &mut a2, &mut b2))?));
    }

    // The step's ends: noise + timesteps + x_t, the loss and its gradient (batch 1, 4×64×64 latents).
    {
        let n = 4 * 64 * 64;
        let ac = Tensor::from_vec(&[1000], (0..1000).map(|i| 1.0 - i as f32 / 1000.0).collect())?.to_gpu(gpu, Scratch, DType::F32)?;
        let x0 = randn(gpu, &[1, n], BF16, &counter)?;
        let (mut eps, mut xt) = (Tensor::empty_gpu(gpu, Scratch, &[1, n], BF16)?, Tensor::empty_gpu(gpu, Scratch, &[1, n], BF16)?);
        let mut t = Tensor::empty_gpu(gpu, Scratch, &[1], DType::F32)?;
        rows.push(row("draw_step_noise", format!("1x{n}"), (3 * n * 2) as f64, time(gpu, || diffusion::draw_step_noise(gpu, 7, &counter, &ac, &mut eps, &mut t, Some((&x0, &mut xt))))?));
        let mut loss = Tensor::empty_gpu(gpu, Scratch, &[1], DType::F32)?;
        let mut dpred = Tensor::empty_gpu(gpu, Scratch, &[1, n], BF16)?;
        rows.push(row("mse_min_snr_fwd", format!("1x{n}"), (2 * n * 2) as f64, time(gpu, || diffusion::mse_min_snr(gpu, &xt, &eps, &t, &ac, Some(5.0), &mut loss))?));
        rows.push(row("mse_min_snr_bwd", format!("1x{n}"), (3 * n * 2) as f64, time(gpu, || diffusion::mse_min_snr_backward(gpu, &xt, &eps, &t, &ac, Some(5.0), 1.0, &mut dpred))?));
    }

    // AdamW over the SD1.5 LoRA (25,509,888 f32 parameters): reads p, g, m, v, writes p, m, v.
    {
        let n = 25_509_888;
        let mut p = randn(gpu, &[n], DType::F32, &counter)?;
        let g = randn(gpu, &[n], DType::F32, &counter)?;
        let (mut m, mut v) = (randn(gpu, &[n], DType::F32, &counter)?, randn(gpu, &[n], DType::F32, &counter)?);
        let bytes = (7 * n * 4) as f64;
        let cfg = AdamWConfig::default();
        let lr = LrTable::constant(gpu, cfg.lr)?;
        rows.push(row("adamw_step", format!("{n}"), bytes, time(gpu, || adamw_step(gpu, &mut p, None, &g, &mut m, &mut v, &counter, &lr, &cfg))?));
        let clip = AdamWConfig { max_grad_norm: Some(1.0), ..cfg };
        rows.push(row("adamw_step_clip", format!("{n}"), bytes + (n * 4) as f64, time(gpu, || adamw_step(gpu, &mut p, None, &g, &mut m, &mut v, &counter, &lr, &clip))?));
    }
    Ok(rows)
}

/// Norms at sizes whose input and output do not fit in the 50 MB L2 together, where the op is
/// bound by DRAM bandwidth and the floor is (bytes read + written once) / the DRAM copy rate of the
/// same run (`memcpy_dtod[eager] 256 MiB`, and a copy of the same bytes): the VAE's GroupNorms at
/// 512 px (decoder up blocks; the encoder's are the same shapes), GroupNorm forward and backward on
/// a 4-image batch of 1024 px latents (128² tokens), and LayerNorm over 1024 px transformer tokens
/// (2 and 4 images).
pub fn bench_dram(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let counter = StepCounter::new(gpu, 1)?;
    rows.push(memcpy_row(gpu, 256)?);

    for (n, hw, c, backward) in [(1, 16384, 512, false), (1, 65536, 256, false), (1, 65536, 512, false), (1, 262144, 128, false), (1, 262144, 256, false), (4, 16384, 320, true)] {
        let shape = [n, hw, c];
        let x = randn(gpu, &shape, BF16, &counter)?;
        let (gamma, beta) = (randn(gpu, &[c], BF16, &counter)?, randn(gpu, &[c], BF16, &counter)?);
        let mut y = Tensor::empty_gpu(gpu, Scratch, &shape, BF16)?;
        let mut stats = Tensor::empty_gpu(gpu, Scratch, &[n, norm::GROUPS, 2], DType::F32)?;
        let bytes = (n * hw * c * 2) as f64;
        let desc = format!("{n}x{hw}x{c}");
        rows.extend(copy_rows(gpu, 2 * n * hw * c * 2, format!("{desc} fwd"))?);
        rows.push(row("group_norm_fwd", desc.clone(), 2.0 * bytes, time(gpu, || norm::group_norm(gpu, &x, &gamma, &beta, 1e-6, false, &mut y, &mut stats))?));
        rows.push(row("group_norm_silu_fwd", desc.clone(), 2.0 * bytes, time(gpu, || norm::group_norm(gpu, &x, &gamma, &beta, 1e-6, true, &mut y, &mut stats))?));
        if backward {
            let dy = randn(gpu, &shape, BF16, &counter)?;
            let mut dx = Tensor::empty_gpu(gpu, Scratch, &shape, BF16)?;
            rows.extend(copy_rows(gpu, 3 * n * hw * c * 2, format!("{desc} bwd"))?);
            rows.push(row("group_norm_bwd", desc.clone(), 3.0 * bytes, time(gpu, || norm::group_norm_backward(gpu, &x, &gamma, &beta, &stats, false, &dy, None, &mut dx))?));
            rows.push(row("group_norm_silu_bwd", desc, 3.0 * bytes, time(gpu, || norm::group_norm_backward(gpu, &x, &gamma, &beta, &stats, true, &dy, None, &mut dx))?));
        }
    }

    for (r, c) in [(32768, 320), (65536, 320)] {
        rows.extend(layer_norm_rows(gpu, &counter, r, c, false)?);
    }
    Ok(rows)
}

/// LayerNorm over r × c bf16 rows, forward and backward, next to same-byte copies; `eager_too`: also
/// timed per single call.
fn layer_norm_rows(gpu: &Gpu, counter: &StepCounter, r: usize, c: usize, eager_too: bool) -> Result<Vec<BenchRow>> {
    let x = randn(gpu, &[r, c], BF16, counter)?;
    let dy = randn(gpu, &[r, c], BF16, counter)?;
    let (gamma, beta) = (randn(gpu, &[c], BF16, counter)?, randn(gpu, &[c], BF16, counter)?);
    let mut y = Tensor::empty_gpu(gpu, Scratch, &[r, c], BF16)?;
    let mut dx = Tensor::empty_gpu(gpu, Scratch, &[r, c], BF16)?;
    let mut stats = Tensor::empty_gpu(gpu, Scratch, &[r, 2], DType::F32)?;
    let (bytes, shape) = ((r * c * 2) as f64, format!("{r}x{c}"));
    let mut rows = copy_rows(gpu, 2 * r * c * 2, format!("{shape} fwd"))?;
    rows.extend(copy_rows(gpu, 3 * r * c * 2, format!("{shape} bwd"))?);
    let mut fwd = || norm::layer_norm(gpu, &x, &gamma, &beta, 1e-5, &mut y, &mut stats);
    rows.push(row("layer_norm_fwd", shape.clone(), 2.0 * bytes, time(gpu, &mut fwd)?));
    if eager_too {
        rows.push(row("layer_norm_fwd[eager]", shape.clone(), 2.0 * bytes, eager(gpu, &mut fwd)?));
    }
    let mut bwd = || norm::layer_norm_backward(gpu, &x, &gamma, &stats, &dy, None, &mut dx);
    rows.push(row("layer_norm_bwd", shape.clone(), 3.0 * bytes, time(gpu, &mut bwd)?));
    if eager_too {
        rows.push(row("layer_norm_bwd[eager]", shape, 3.0 * bytes, eager(gpu, &mut bwd)?));
    }
    Ok(rows)
}
