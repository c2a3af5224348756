//! The `sdlora` command line: train a LoRA, sample images with it, benchmark the engine.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use sdlora::cuda::{ptx, Gpu};
use sdlora::sample::SampleArgs;
use sdlora::train::config::{SnrGamma, TrainConfig};
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
    /// Print finished training runs side by side (steps, lr, γ, final/mean loss, time, peak VRAM).
    Compare {
        /// Output folders of `sdlora train` (e.g. models/lora_*).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Show how this binary was built (embedded kernels, nvcc, PTX target) and which GPU it sees.
    Info,
}

#[derive(Args)]
struct TrainArgs {
    /// Settings file (TOML, e.g. experiments/baseline.toml); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base model: a diffusers folder, a Hugging Face cache id (org/name), or a single-file .safetensors.
    #[arg(long)]
    model: Option<String>,
    /// Images with same-name .txt captions, or a captions file (.toml/.json: image = caption).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder: step_N/ checkpoints, logs/ (TensorBoard), summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps [default: 1000].
    #[arg(long)]
    steps: Option<usize>,
    /// AdamW learning rate [default: 2e-5].
    #[arg(long)]
    lr: Option<f64>,
    /// Min-SNR γ, or "none" for plain MSE [default: 5].
    #[arg(long)]
    snr_gamma: Option<String>,
    /// Images per step [default: 1].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed into one step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Square training resolution in pixels (resize + center crop) [default: 512].
    #[arg(long)]
    resolution: Option<u32>,
    /// LoRA rank [default: 128].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha; scale = alpha / rank [default: 128].
    #[arg(long)]
    alpha: Option<f32>,
    /// Random seed (LoRA init, data order, noise, timesteps) [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Learning-rate schedule [default: constant].
    #[arg(long, value_enum)]
    lr_schedule: Option<sdlora::train::config::LrSchedule>,
    /// Warm-up steps of the learning-rate schedule [default: 0].
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// AdamW decoupled weight decay [default: 1e-2].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value before each step [default: off].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Apply AdamW to each LoRA adapter inside the backward, as soon as its gradients exist: less
    /// memory (the gradients of all adapters never exist at once); needs --grad-accum 1 and no
    /// --max-grad-norm.
    #[arg(long)]
    adamw_per_layer: bool,
    /// Keep AdamW's moments in 8 bits (blockwise log-scale codes): 2 bytes per LoRA value instead
    /// of 8 (0.14 GiB less at rank 128); close to, but not bit-compatible with, torch's AdamW.
    #[arg(long)]
    adamw_8bit: bool,
    /// Write a checkpoint every N steps [default: 250].
    #[arg(long)]
    save_every: Option<usize>,
    /// Print and flush the logs every N steps [default: 10].
    #[arg(long)]
    log_every: Option<usize>,
    /// Checkpoint format [default: diffusers].
    #[arg(long, value_enum)]
    save_format: Option<sdlora::train::config::SaveFormat>,
    /// Device memory budget, e.g. 8G or 4G: before the first step the memory plan chooses what each
    /// transformer keeps for the backward (everything, all but its feed-forward hidden states, or
    /// only its input, the rest recomputed) so the step fits at the least recompute; allocations
    /// beyond it stop the run with the numbers [default: the GPU's free memory, for the plan].
    #[arg(long)]
    vram_limit: Option<String>,
    /// Validation prompt (repeatable): sampled with the current LoRA into step_N/validation.png at
    /// checkpoints that are multiples of --validation-every.
    #[arg(long = "validation-prompt")]
    validation_prompts: Vec<String>,
    /// Make validation images every N steps (at checkpoints) [default: 250].
    #[arg(long)]
    validation_every: Option<usize>,
    /// Denoising steps of the validation images [default: 30].
    #[arg(long)]
    validation_steps: Option<usize>,
    /// Continue from a checkpoint folder (OUT/step_N): LoRA, optimizer state and step.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run on the CPU (f32 twins: slow; for tiny models and tests).
    #[arg(long)]
    cpu: bool,
    /// Also write the initial LoRA as step_0/ and every step's inputs (x_t, noise, timesteps, caption
    /// states) to this safetensors file, for the PyTorch parity trainer (benches/train_reference.py).
    #[arg(long)]
    dump_draws: Option<PathBuf>,
}

impl TrainArgs {
    /// The config file (or the defaults) with every given flag applied.
    fn config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::from_file(path)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { c.$field = v.clone(); } )* };
        }
        set!(model, data, out, steps, lr, batch_size, grad_accum, resolution, rank, alpha, seed, lr_schedule, warmup_steps, weight_decay, save_every, save_format, log_every);
        if !self.validation_prompts.is_empty() {
            c.validation_prompts = self.validation_prompts.clone();
        }
        set!(validation_every, validation_steps);
        if let Some(g) = &self.snr_gamma {
            c.snr_gamma = SnrGamma::parse(g)?;
        }
        if self.max_grad_norm.is_some() {
            c.max_grad_norm = self.max_grad_norm;
        }
        if self.vram_limit.is_some() {
            c.vram_limit = self.vram_limit.clone();
        }
        c.adamw_per_layer |= self.adamw_per_layer;
        c.adamw_8bit |= self.adamw_8bit;
        Ok(c)
    }
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
        /// Only the kernel families whose name contains this text (elementwise, conv, attention, norm, norm_dram, gemm, gemm_split).
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Time full LoRA training steps (forward, loss, backward, AdamW) with random SD1.5-size weights.
    Train {
        /// Image size in pixels (latents are 1/8 of it).
        #[arg(long, default_value_t = 512)]
        resolution: u32,
        /// Timed steps after 3 warm-up steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Apply AdamW per layer inside the backward (as `train --adamw-per-layer`).
        #[arg(long)]
        adamw_per_layer: bool,
        /// 8-bit AdamW moments (as `train --adamw-8bit`).
        #[arg(long)]
        adamw_8bit: bool,
        /// Fit the step into this much device memory (e.g. 2G, 4G) by recomputing transformer
        /// activations in the backward, planned as `train --vram-limit` does.
        #[arg(long, value_name = "SIZE")]
        vram_limit: Option<String>,
    },
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
        Command::Train(args) => {
            let cfg = args.config()?;
            let gpu = if args.cpu { None } else { Some(Gpu::new(0)?) };
            let summary = sdlora::train::run(&cfg, gpu.as_ref(), args.resume.as_deref(), args.dump_draws.as_deref())?;
            println!(
                "done: {} steps, final loss {:.5}, mean loss {:.5}, {:.1} s{}",
                summary.steps,
                summary.final_loss,
                summary.mean_loss,
                summary.seconds,
                if summary.interrupted { " (interrupted)" } else { "" }
            );
            Ok(())
        }
        Command::Sample(args) => sdlora::sample::run(&args),
        Command::Bench(BenchArgs { what: BenchWhat::Kernels { filter } }) => {
            let gpu = Gpu::new(0)?;
            sdlora::bench::run_kernel_benches(&gpu, &filter)
        }
        Command::Bench(BenchArgs { what: BenchWhat::Train { resolution, steps, adamw_per_layer, adamw_8bit, vram_limit } }) => {
            let opts = sdlora::train::BenchOptions { resolution, warmup: 3, steps, adamw_per_layer, adamw_8bit, vram_limit };
            sdlora::train::benchmark(&Gpu::new(0)?, &opts)
        }
        Command::Bench(BenchArgs { what: BenchWhat::Unet { reference, iters, checkpoint } }) => {
            sdlora::bench::unet::run(&Gpu::new(0)?, &reference, iters, checkpoint)
        }
        Command::Compare { runs } => {
            print!("{}", sdlora::train::compare::compare(&runs)?);
            Ok(())
        }
        Command::Info => info(),
    }
}

fn info() -> Result<()> {
    println!("sdlora {}", env!("CARGO_PKG_VERSION"));
    match ptx::NVCC {
        Some(nvcc) => println!(
            "kernels: {} modules compiled to {} PTX by {nvcc} ({} again to compute_90 for Hopper)",
            ptx::MODULES.len(),
            ptx::ARCH,
            ptx::HOPPER_MODULES.len()
        ),
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
