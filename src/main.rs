//! The `sdlora` command line: train a LoRA, sample images with it, benchmark the engine.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use sdlora::cuda::{ptx, Gpu};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sdlora", version, about = "Fine-tune Stable Diffusion 1.5 with LoRA and generate images with it, on hand-written CUDA kernels.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA on the UNet's attention projections from a folder of captioned images.
    ///
    /// Learns a rank-128 LoRA (to_q, to_k, to_v, to_out.0 of every attention) with Min-SNR-weighted
    /// loss and AdamW; writes checkpoints every --save-every steps in diffusers/PEFT format
    /// (optionally kohya format for ComfyUI/A1111), TensorBoard logs, and shows progress.
    Train(TrainArgs),
    /// Generate images from prompts with a base model and optional LoRAs.
    ///
    /// Classifier-free guidance (5.0 by default), fixed seeds, PNG output with the settings
    /// written into the file's text chunk.
    Sample(SampleArgs),
    /// Benchmark kernels or a whole training step on the GPU (random weights, no download needed).
    Bench(BenchArgs),
    /// Show how this binary was built (embedded kernels, nvcc, PTX target) and which GPU it sees.
    Info,
}

#[derive(Args)]
struct TrainArgs {
    /// Base model: a diffusers folder, a Hugging Face cache id, or a single-file .safetensors.
    #[arg(long)]
    model: String,
    /// Folder of images with same-name .txt captions.
    #[arg(long)]
    data: PathBuf,
    /// Output folder for checkpoints (step_N/), logs and the config used.
    #[arg(long)]
    out: PathBuf,
    /// Number of optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// Min-SNR γ, or "none" for plain MSE.
    #[arg(long, default_value = "5")]
    snr_gamma: String,
    /// Device memory budget, e.g. 8G; the run refuses to start if its plan does not fit.
    #[arg(long)]
    vram_limit: Option<String>,
}

#[derive(Args)]
struct SampleArgs {
    /// Base model: a diffusers folder, a Hugging Face cache id, or a single-file .safetensors.
    #[arg(long)]
    model: String,
    /// Text prompt.
    #[arg(long)]
    prompt: String,
    /// LoRA to apply, as PATH or PATH:SCALE (repeatable).
    #[arg(long)]
    lora: Vec<String>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Random seed of the initial latents.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output PNG file.
    #[arg(long, default_value = "output.png")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Time every kernel at the SD1.5 shapes (CUDA events after warm-up: median, min, max, rate).
    Kernels {
        /// Only the kernel families whose name contains this text (elementwise, gemm, lora, conv, attention, norm).
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Time one full LoRA training step at 512 px with random SD1.5-size weights.
    Train,
    /// Check one UNet LoRA forward + backward at full SD1.5 size against PyTorch and time it.
    ///
    /// DIR comes from `python3 benches/unet_reference.py DIR` (random weights, a PEFT LoRA, PyTorch's
    /// f32 and bf16-autocast outputs and gradients). Fails unless every tensor is within bounds.
    Unet {
        /// Folder written by benches/unet_reference.py.
        #[arg(long)]
        reference: PathBuf,
        /// Timed repetitions after two warm-up steps.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Recompute each transformer's activations in the backward instead of keeping them.
        #[arg(long)]
        checkpoint: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(_) => bail!("`sdlora train` is not implemented yet"),
        Command::Sample(_) => bail!("`sdlora sample` is not implemented yet"),
        Command::Bench(BenchArgs { what: BenchWhat::Kernels { filter } }) => {
            let gpu = Gpu::new(0)?;
            sdlora::bench::run_kernel_benches(&gpu, &filter)
        }
        Command::Bench(BenchArgs { what: BenchWhat::Train }) => bail!("`sdlora bench train` is not implemented yet"),
        Command::Bench(BenchArgs { what: BenchWhat::Unet { reference, iters, checkpoint } }) => {
            sdlora::bench::unet::run(&Gpu::new(0)?, &reference, iters, checkpoint)
        }
        Command::Info => info(),
    }
}

fn info() -> Result<()> {
    println!("sdlora {}", env!("CARGO_PKG_VERSION"));
    match ptx::NVCC {
        Some(nvcc) => println!("kernels: {} modules compiled to {} PTX by {nvcc}", ptx::MODULES.len(), ptx::ARCH),
        None => println!("kernels: none (built without nvcc; run scripts/setup.sh and rebuild)"),
    }
    for (name, src) in ptx::MODULES {
        println!("  kernels/{name}.cu: {} entry points, {} bytes of PTX", src.matches(".entry").count(), src.len());
    }
    match Gpu::new(0) {
        Ok(gpu) => {
            let (free, total) = gpu.mem_info()?;
            println!("gpu: {} ({} MiB free of {} MiB)", gpu.name()?, free >> 20, total >> 20);
        }
        Err(e) => println!("gpu: none usable: {e:#}"),
    }
    Ok(())
}
