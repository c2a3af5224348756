//! `sdlora bench unet --reference DIR`: one LoRA training forward + backward of the full-size UNet
//! on the GPU, checked against PyTorch (benches/unet_reference.py wrote DIR: random SD1.5-size
//! weights, a PEFT LoRA, inputs, and f32 / bf16-autocast outputs and gradients), then timed.

use super::{time_gpu, Timing};
use crate::cuda::{ArenaKind, Gpu};
use crate::model::layers::Dev;
use crate::model::lora;
use crate::model::transformer::Keep;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::weights::{Component, ModelSource, SafetensorsFile};
use crate::ops::diffusion::{mse_min_snr_backward_cpu, mse_min_snr_cpu};
use crate::schedule::NoiseSchedule;
use crate::tensor::{compare, nchw_to_nhwc, nhwc_to_nchw, DType, Tensor};
use anyhow::{ensure, Context, Result};
use std::path::Path;

/// How far one tensor of ours is from PyTorch's f32 truth, next to PyTorch bf16-autocast's distance.
struct Distance {
    name: String,
    ours: f64,
    torch_bf16: f64,
    cosine: f64,
}

impl Distance {
    fn ratio(&self) -> f64 {
        self.ours / self.torch_bf16.max(1e-12)
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

pub fn run(gpu: &Gpu, reference: &Path, iters: usize, checkpoint: bool) -> Result<()> {
    let dev = Dev::Gpu(gpu);
    let source = ModelSource::resolve(reference.to_str().context("reference path is not UTF-8")?)?;
    let config = UNetConfig::from_json(&source.config(Component::Unet)?.context("reference has no unet/config.json")?)?;
    let mut unet = UNet2DConditionModel::load(dev, &source.weights(Component::Unet)?, config)?;
    let lora_file = reference.join("lora/pytorch_lora_weights.safetensors");
    lora::load(dev, &mut unet, &crate::checkpoint::load_lora(&lora_file)?.weights)?;
    for (_, l) in unet.layers_mut() {
        if let Some(t) = &mut l.attention {
            t.keep = if checkpoint { Keep::Input } else { Keep::All };
        }
    }
    let weights_bytes = gpu.arena_stats(ArenaKind::Persistent).in_use;

    let refs = SafetensorsFile::open(&reference.join("reference.safetensors"))?;
    let get = |k: &str| refs.raw(k).and_then(|r| r.to_f32()).with_context(|| format!("reference tensor {k}"));
    let to_nhwc = |v: Vec<f32>| nchw_to_nhwc(&v, 1, 4, 64, 64);
    let x = Tensor::from_vec(&[1, 64, 64, 4], to_nhwc(get("noisy")?))?.to_gpu(gpu, ArenaKind::Persistent, DType::BF16)?;
    let ctx = Tensor::from_vec(&[1, 77, 768], get("context")?)?.to_gpu(gpu, ArenaKind::Persistent, DType::BF16)?;
    let noise = to_nhwc(get("noise")?);
    let t = get("timesteps")?;
    let t_dev = Tensor::from_vec(&[t.len()], t.clone())?.to_gpu(gpu, ArenaKind::Persistent, DType::F32)?;
    let abar = NoiseSchedule::sd15().alphas_cumprod;

    // Forward, then the loss and its gradient (on the host: 16 K values).
    let forward = |unet: &mut UNet2DConditionModel| -> Result<(f32, Vec<f32>, Tensor)> {
        let pred = unet.forward(dev, &x, &t_dev, &ctx)?;
        let p = pred.to_cpu(gpu)?.into_vec()?;
        let loss = mse_min_snr_cpu(&p, &noise, &t, &abar, Some(5.0));
        let d = Tensor::from_vec(pred.shape(), mse_min_snr_backward_cpu(&p, &noise, &t, &abar, Some(5.0), 1.0))?;
        Ok((loss, p, d.to_gpu(gpu, ArenaKind::Scratch, DType::BF16)?))
    };
    lora::zero_gradients(dev, &mut unet)?;
    let (loss, pred, d_pred) = forward(&mut unet)?;
    print_saved(&mut unet);
    unet.backward(dev, &d_pred)?;
    gpu.synchronize()?;

    let mut rows = vec![distance("output", &nhwc_to_nchw(&pred, 1, 4, 64, 64), &get("out.f32")?, &get("out.bf16")?)];
    rows.push(distance("loss", &[loss], &get("loss.f32")?, &get("loss.bf16")?));
    for (module, ga, gb) in lora::gradients(dev, &mut unet)? {
        for (which, g) in [("lora_A", ga), ("lora_B", gb)] {
            let key = format!("{module}.{which}.weight");
            rows.push(distance(&key, &g, &get(&format!("grad.f32.{key}"))?, &get(&format!("grad.bf16.{key}"))?));
        }
    }
    report(&rows)?;

    let timing = time_gpu(gpu, 2, iters, || {
        let (_, _, d) = forward(&mut unet)?;
        unet.backward(dev, &d)
    })?;
    print_timing(gpu, timing, weights_bytes, checkpoint);
    Ok(())
}

/// Bytes each block keeps from its forward for its backward (the memory report).
fn print_saved(unet: &mut UNet2DConditionModel) {
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut total = 0;
    println!("activations kept for the backward, per block:");
    for (name, layer) in unet.layers_mut() {
        let (r, a) = (layer.resnet.saved_bytes(), layer.attention.as_ref().map_or(0, |t| t.saved_bytes()));
        total += r + a;
        println!("  {name:<32} resnet {:>8.1} MiB  transformer {:>8.1} MiB", mib(r), mib(a));
    }
    println!("  total {:.1} MiB", mib(total));
}

fn distance(name: &str, ours: &[f32], truth: &[f32], torch_bf16: &[f32]) -> Distance {
    Distance { name: name.into(), ours: compare(ours, truth).rel_l2, torch_bf16: compare(torch_bf16, truth).rel_l2, cosine: cosine(ours, truth) }
}

/// Prints the worst tensors and fails unless every one meets the bounds: no further from
/// f32 than 1.5× PyTorch bf16 autocast (or within 2e-2 output / 5e-2 gradients), cosine ≥ 0.995.
fn report(rows: &[Distance]) -> Result<()> {
    let mut sorted: Vec<&Distance> = rows.iter().collect();
    sorted.sort_by(|a, b| b.ratio().total_cmp(&a.ratio()));
    println!("{:<80} {:>10} {:>10} {:>7} {:>9}", "tensor (vs PyTorch f32)", "ours", "torch bf16", "ratio", "cosine");
    for d in sorted.iter().take(8) {
        println!("{:<80} {:>10.3e} {:>10.3e} {:>7.2} {:>9.6}", d.name, d.ours, d.torch_bf16, d.ratio(), d.cosine);
    }
    let output = &rows[0];
    let grads = &rows[2..];
    let worst_grad = grads.iter().map(|d| d.ours).fold(0.0, f64::max);
    let min_cos = grads.iter().map(|d| d.cosine).fold(1.0, f64::min);
    println!(
        "output rel err {:.3e} (torch bf16 {:.3e}); {} gradient tensors: worst rel err {worst_grad:.3e}, min cosine {min_cos:.6}",
        output.ours,
        output.torch_bf16,
        grads.len()
    );
    let within = |d: &Distance, cap: f64| d.ours <= cap || d.ratio() <= 1.5;
    ensure!(output.ours <= 2e-2 && within(output, 2e-2), "output error {:.3e} is out of bounds", output.ours);
    for d in grads {
        ensure!(d.ours <= 5e-2 && d.cosine >= 0.995, "{}: rel err {:.3e}, cosine {:.6} out of bounds", d.name, d.ours, d.cosine);
        ensure!(within(d, 0.0), "{}: rel err {:.3e} is {:.2}× PyTorch bf16's {:.3e} (> 1.5×)", d.name, d.ours, d.ratio(), d.torch_bf16);
    }
    println!("parity: PASS");
    Ok(())
}

fn print_timing(gpu: &Gpu, t: Timing, weights_bytes: usize, checkpoint: bool) {
    let scratch = gpu.arena_stats(ArenaKind::Scratch).high_water;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "forward+backward, 512 px, batch 1, r = 128, transformer checkpointing {}: {t}; peak device memory {:.2} GiB (weights + LoRA {:.2} GiB, step scratch {:.2} GiB)",
        if checkpoint { "on" } else { "off" },
        gib(weights_bytes + scratch),
        gib(weights_bytes),
        gib(scratch)
    );
}
