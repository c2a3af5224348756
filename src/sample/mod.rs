//! `sdlora sample`: text-to-image with SD1.x and any number of LoRAs, as diffusers'
//! StableDiffusionPipeline computes it.
//!
//! For each image: CLIP encodes the prompt and the negative prompt (77 tokens each, last_hidden_state);
//! the initial latents are N(0,1) [4, H/f, W/f] (f the VAE factor) from Philox keyed by the image's
//! seed (image k of `--num-images` uses seed + k), or read from `--init-latents`; the scheduler's
//! loop ([`crate::schedule::denoise`]) runs the UNet on both classifier-free-guidance branches in one
//! batch, [uncond; cond] as diffusers orders them, and combines ε = ε_u + g·(ε_c − ε_u) (no uncond
//! branch when every g ≤ 1, as diffusers); the final latents are divided by the VAE's scaling factor
//! (0.18215), decoded, and mapped to pixels by clamp((x + 1)/2, 0, 1).
//!
//! LoRAs are combined into one adapter per projection ([`lora_merge`]) and merged into the UNet's
//! weights (or, with `--lora-on-the-fly`, applied as adapters). The UNet runs in inference mode:
//! each layer's activations are freed as soon as the next layer has read them.
//! CLIP, the UNet and the VAE all run on the chosen device; between models (and between denoising
//! steps) values pass through the host as f32.

pub mod grid;
pub mod lora_merge;
pub mod png;

use crate::cuda::{ArenaKind, Gpu, Graph};
use crate::io::write_atomic;
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::layers::Dev;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKl, VaeConfig};
use crate::model::weights::{Component, ModelSource, Weights};
use crate::ops::philox::philox_normal_cpu;
use crate::schedule::{denoise, scheduler_by_name};
use crate::tensor::{nchw_to_nhwc, nhwc_to_nchw, DType, Tensor};
use crate::tokenizer::{ClipTokenizer, MAX_LEN};
use anyhow::{ensure, Context, Result};
use lora_merge::{LoraSpec, SampleLora};
use png::Rgb8;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Philox streams of the initial latents and of Euler ancestral's per-step noise.
const STREAM_INIT: u32 = 0;
const STREAM_ANCESTRAL: u32 = 1;
/// The most LoRA rank (summed over all `--lora`s) the GPU LoRA kernels take.
const GPU_MAX_RANK: usize = 256;

#[derive(clap::Args, Clone, Debug)]
pub struct SampleArgs {
    /// Base model: a diffusers folder, a Hugging Face cache id, or a single-file .safetensors.
    #[arg(long, required_unless_present = "random_weights")]
    pub model: Option<String>,
    /// Use seeded random stand-in weights of SD1.5's size instead of --model (and the shipped CLIP
    /// vocabulary): times and memory of a real run with nothing to download; the images are noise.
    #[arg(long, value_name = "SEED", conflicts_with = "model")]
    pub random_weights: Option<u64>,
    /// Text prompt (repeatable: each prompt is generated; with --grid, one row per prompt and seed).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Negative prompt (the unconditional branch of guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// LoRA to apply, as PATH or PATH:SCALE; PATH is a .safetensors file or a step_N folder (repeatable).
    /// The LoRAs are merged into the UNet's weights once (the fastest way to sample).
    #[arg(long)]
    pub lora: Vec<String>,
    /// Apply the LoRAs on the fly (extra low-rank GEMMs in every projection) instead of merging
    /// them into the weights: the same images, slower; for checking the merge.
    #[arg(long)]
    pub lora_on_the_fly: bool,
    /// Classifier-free guidance scale (repeatable: with --grid, one column per value).
    #[arg(long, default_values_t = [5.0])]
    pub guidance: Vec<f32>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Random seed of the initial latents (repeatable; image k of --num-images uses seed + k).
    #[arg(long, default_values_t = [42])]
    pub seed: Vec<u64>,
    /// Images per prompt, seed and guidance value.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Image width in pixels (a multiple of 8; of 64 for SD1.5's UNet).
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Sampler: pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras.
    #[arg(long, default_value = "pndm")]
    pub scheduler: String,
    /// Images denoised together in one UNet batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Output PNG; with several images FILE_0.png, FILE_1.png, ...; with --grid the grid image.
    #[arg(long, default_value = "output.png")]
    pub out: PathBuf,
    /// Put every prompt × seed × guidance image into one labelled grid image.
    #[arg(long)]
    pub grid: bool,
    /// Initial latents from a safetensors file (tensor "latents", [images, 4, H/f, W/f], NCHW f32)
    /// instead of seeded noise: for comparisons with other implementations.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Also write the final latents (before the VAE) to this safetensors file ("latents", NCHW f32).
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Run on the CPU (f32; slow: for tiny models and tests).
    #[arg(long)]
    pub cpu: bool,
}

/// One image to make.
#[derive(Clone, Debug)]
struct Job {
    prompt: String,
    seed: u64,
    guidance: f32,
}

/// A batch's text conditioning: CLIP states of the negative and positive prompts ([n, 77, d] each)
/// and each image's guidance scale.
struct Conditioning {
    uncond: Vec<f32>,
    cond: Vec<f32>,
    guidance: Vec<f32>,
}

/// Where the weights come from.
pub enum Base {
    Source(ModelSource),
    /// [`Weights::random`] stand-ins with SD1.5's configuration.
    Random(u64),
}

impl Base {
    fn weights(&self, component: Component) -> Result<Weights> {
        match self {
            Base::Source(s) => s.weights(component),
            Base::Random(seed) => Ok(Weights::random(*seed)),
        }
    }

    fn config(&self, component: Component) -> Result<Option<serde_json::Value>> {
        match self {
            Base::Source(s) => s.config(component),
            Base::Random(_) => Ok(None),
        }
    }
}

/// The loaded models.
pub struct Pipeline<'g> {
    dev: Dev<'g>,
    vae: AutoencoderKl,
    unet: UNet2DConditionModel,
    /// 2^(UNet resolution levels − 1): latent sides must be multiples of it.
    unet_levels: usize,
    /// Prompt → CLIP last_hidden_state [77, d] of every prompt of the run, encoded at load.
    text_cache: HashMap<String, Vec<f32>>,
    /// The UNet evaluation captured as a CUDA graph for the current batch shape (GPU).
    unet_graph: Option<UNetGraph>,
}

/// A captured UNet forward: its input buffers (refilled in place each step), its output, the graph.
struct UNetGraph {
    shape: [usize; 4],
    x: Tensor,
    t: Tensor,
    ctx: Tensor,
    /// What `ctx` holds (uploaded again only when the conditioning changes).
    ctx_host: Vec<f32>,
    out: Tensor,
    graph: Graph,
}

impl<'g> Pipeline<'g> {
    /// Encodes `prompts` with the text encoder and frees it, then loads the UNet (in inference
    /// mode) and the VAE, and merges the combined LoRA (if any) into the UNet's weights, or with
    /// `on_the_fly` attaches it as adapters. The text encoder never shares the device with the UNet.
    pub fn load(dev: Dev<'g>, source: &Base, loras: &[SampleLora], on_the_fly: bool, prompts: &[&str]) -> Result<Pipeline<'g>> {
        let text_cache = encode_prompts(dev, source, prompts)?;
        let unet_cfg = match source.config(Component::Unet)? {
            Some(v) => UNetConfig::from_json(&v)?,
            None => UNetConfig::sd15(),
        };
        let unet_levels = 1 << (unet_cfg.block_out_channels.len() - 1);
        let mut unet = UNet2DConditionModel::load(dev, &source.weights(Component::Unet)?, unet_cfg).context("loading the UNet")?;
        unet.keep_activations = false;
        if !loras.is_empty() {
            let combined = lora_merge::combine(loras)?;
            let max_rank = combined.layers.values().map(|l| l.rank).max().unwrap_or(0);
            ensure!(
                matches!(dev, Dev::Cpu) || max_rank <= GPU_MAX_RANK,
                "the LoRAs add up to rank {max_rank} on one projection; the GPU LoRA kernels take at most {GPU_MAX_RANK}"
            );
            let names: Vec<String> = loras.iter().map(|l| l.spec.path.display().to_string()).collect();
            let applied = match on_the_fly {
                true => crate::model::lora::load(dev, &mut unet, &combined).map(drop),
                false => crate::model::lora::merge(dev, &mut unet, &combined),
            };
            applied.with_context(|| format!("applying LoRA {}", names.join(", ")))?;
        }
        let vae_cfg = match source.config(Component::Vae)? {
            Some(v) => VaeConfig::from_json(&v)?,
            None => VaeConfig::sd15(),
        };
        Ok(Pipeline {
            dev,
            vae: AutoencoderKl::load(dev, &source.weights(Component::Vae)?, vae_cfg).context("loading the VAE")?,
            unet,
            unet_levels,
            text_cache,
            unet_graph: None,
        })
    }

    /// The VAE's downsampling factor (8 for SD1.5).
    pub fn vae_factor(&self) -> usize {
        self.vae.factor()
    }

    /// CLIP last_hidden_state of each prompt (encoded at load), concatenated: [prompts.len(), 77, d].
    fn encode_text(&self, prompts: &[&str]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in prompts {
            out.extend_from_slice(self.text_cache.get(*p).with_context(|| format!("the prompt {p:?} was not encoded at load"))?);
        }
        Ok(out)
    }

    /// Latents NHWC [n, h, w, 4] (already divided by the scaling factor) → pixels NHWC in about [-1, 1], on the host.
    pub fn decode(&self, latents: Tensor) -> Result<Tensor> {
        self.vae.decode(self.dev, &latents)
    }

    /// ε for the latents `x` (NHWC, one image per guidance value) at timestep `t`, guided per image.
    fn guided_eps(&mut self, x: &[f32], hw: (usize, usize), t: f32, c: &Conditioning, eps: &mut [f32]) -> Result<()> {
        let (uncond, cond, guidance) = (&c.uncond[..], &c.cond[..], &c.guidance[..]);
        let n = guidance.len();
        let cfg = guidance.iter().any(|&g| g > 1.0);
        let (x_in, ctx) = if cfg { ([x, x].concat(), [uncond, cond].concat()) } else { (x.to_vec(), cond.to_vec()) };
        let rows = if cfg { 2 * n } else { n };
        let d = ctx.len() / (rows * 77);
        let out = self.unet_forward(x_in, rows, hw, t, ctx, d)?;
        let per = x.len() / n;
        for (i, &g) in guidance.iter().enumerate() {
            let e = &mut eps[i * per..(i + 1) * per];
            if !cfg {
                e.copy_from_slice(&out[i * per..(i + 1) * per]);
            } else if g > 1.0 {
                let (u, c) = (&out[i * per..(i + 1) * per], &out[(n + i) * per..(n + i + 1) * per]);
                e.iter_mut().zip(u.iter().zip(c)).for_each(|(e, (&u, &c))| *e = u + g * (c - u));
            } else {
                e.copy_from_slice(&out[(n + i) * per..(n + i + 1) * per]);
            }
        }
        Ok(())
    }

    /// One UNet evaluation of `rows` latents at timestep `t`, returned on the host as f32.
    fn unet_forward(&mut self, x: Vec<f32>, rows: usize, (h, w): (usize, usize), t: f32, ctx: Vec<f32>, d: usize) -> Result<Vec<f32>> {
        let x = Tensor::from_vec(&[rows, h, w, 4], x)?;
        let ctx = Tensor::from_vec(&[rows, 77, d], ctx)?;
        let timesteps = Tensor::from_vec(&[rows], vec![t; rows])?;
        let g = match self.dev {
            Dev::Cpu => return self.unet.forward(self.dev, &x, &timesteps, &ctx)?.into_vec(),
            Dev::Gpu(g) => g,
        };
        let shape = [rows, h, w, d];
        if let Some(c) = self.unet_graph.as_mut().filter(|c| c.shape == shape) {
            c.x.upload(g, x.data()?)?;
            c.t.upload(g, timesteps.data()?)?;
            if c.ctx_host != ctx.data()? {
                c.ctx.upload(g, ctx.data()?)?;
                c.ctx_host = ctx.data()?.to_vec();
            }
            g.replay(&c.graph)?;
            return c.out.to_cpu(g)?.into_vec();
        }
        // A new shape: evaluate eagerly (this loads the kernels and sizes the scratch blocks),
        // then capture the same evaluation for the following steps.
        self.unet_graph = None;
        let x = x.to_gpu(g, ArenaKind::Scratch, DType::BF16)?;
        let t = timesteps.to_gpu(g, ArenaKind::Scratch, DType::F32)?;
        let (ctx_host, ctx) = (ctx.data()?.to_vec(), ctx.to_gpu(g, ArenaKind::Scratch, DType::BF16)?);
        let out = self.unet.forward(self.dev, &x, &t, &ctx)?.to_cpu(g)?.into_vec();
        if g.graphs_enabled() {
            let unet = &mut self.unet;
            let (y, graph) = g.capture(|| unet.forward(Dev::Gpu(g), &x, &t, &ctx))?;
            self.unet_graph = Some(UNetGraph { shape, x, t, ctx, ctx_host, out: y, graph });
        }
        out
    }

    /// Denoises a batch of images from their initial latents (NHWC, N(0,1)); returns the final latents.
    fn denoise_batch(&mut self, jobs: &[Job], negative: &str, mut latents: Vec<f32>, hw: (usize, usize), scheduler: &str, steps: usize) -> Result<Vec<f32>> {
        let prompts: Vec<&str> = jobs.iter().map(|j| j.prompt.as_str()).collect();
        let c = Conditioning {
            cond: self.encode_text(&prompts)?,
            uncond: self.encode_text(&vec![negative; jobs.len()])?,
            guidance: jobs.iter().map(|j| j.guidance).collect(),
        };
        let mut sched = scheduler_by_name(scheduler, steps)?;
        let per = latents.len() / jobs.len();
        let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
        let mut draws = 0u32;
        let mut noise = |buf: &mut [f32]| {
            for (chunk, &seed) in buf.chunks_mut(per).zip(&seeds) {
                chunk.copy_from_slice(&philox_normal_cpu(per, seed, STREAM_ANCESTRAL, draws, 0.0, 1.0));
            }
            draws += 1;
        };
        denoise(&mut *sched, &mut latents, |x, t, eps| self.guided_eps(x, hw, t, &c, eps), &mut noise)?;
        Ok(latents)
    }
}

/// CLIP last_hidden_state [77, d] of each distinct prompt, on the host; the text encoder is freed on return.
fn encode_prompts(dev: Dev, source: &Base, prompts: &[&str]) -> Result<HashMap<String, Vec<f32>>> {
    let tokenizer = match source {
        Base::Source(s) => ClipTokenizer::for_source(s)?,
        Base::Random(_) => ClipTokenizer::shipped()?,
    };
    let clip_cfg = match source.config(Component::TextEncoder)? {
        Some(v) => ClipTextConfig::from_json(&v)?,
        None => ClipTextConfig::sd15(),
    };
    let clip = ClipTextModel::load(dev, &source.weights(Component::TextEncoder)?, clip_cfg).context("loading the text encoder")?;
    let mut cache = HashMap::new();
    for p in prompts {
        if cache.contains_key(*p) {
            continue;
        }
        let tokens = tokenizer.encode_raw(p)?.len();
        if tokens > MAX_LEN - 2 {
            eprintln!("warning: the prompt {p:?} has {tokens} tokens; CLIP reads the first {} (the rest is cut, as in diffusers)", MAX_LEN - 2);
        }
        let states = clip.forward(dev, &tokenizer.encode(p)?, 1)?.into_host(dev.gpu())?;
        cache.insert(p.to_string(), states);
    }
    Ok(cache)
}

/// The images `args` asks for, in output order: prompt, then seed, then guidance, then image index.
fn jobs(args: &SampleArgs) -> Vec<Job> {
    let mut out = Vec::new();
    for prompt in &args.prompt {
        for &seed in &args.seed {
            for &guidance in &args.guidance {
                for k in 0..args.num_images {
                    out.push(Job { prompt: prompt.clone(), seed: seed.wrapping_add(k as u64), guidance });
                }
            }
        }
    }
    out
}

/// A1111's "parameters" text: prompt, negative prompt, then the settings on one line.
fn parameters(args: &SampleArgs, job: &Job, loras: &[LoraSpec]) -> String {
    let model = match (&args.model, args.random_weights) {
        (Some(m), _) => Path::new(m).file_name().map_or_else(|| m.clone(), |s| s.to_string_lossy().to_string()),
        (None, seed) => format!("random-{}", seed.unwrap_or(0)),
    };
    let mut line = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        job.prompt, args.negative_prompt, args.steps, args.scheduler, job.guidance, job.seed, args.width, args.height
    );
    if !loras.is_empty() {
        line += &format!(", Lora: {}", loras.iter().map(LoraSpec::label).collect::<Vec<_>>().join(" "));
    }
    line + ", Generator: sdlora"
}

/// `--out` for image `i` of `n`: FILE.png alone, else FILE_i.png.
fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
    let ext = out.extension().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}_{i}.{ext}"))
}

/// Reads `--init-latents`: "latents" [n, c, h, w] f32 → NHWC.
fn read_latents(path: &Path, n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let t = st.tensor("latents").with_context(|| format!("{}: no tensor \"latents\"", path.display()))?;
    ensure!(t.dtype() == Dtype::F32, "{}: latents are {:?}, expected F32", path.display(), t.dtype());
    ensure!(t.shape() == [n, 4, h, w], "{}: latents are {:?}, this run needs [{n}, 4, {h}, {w}] (images, channels, height/f, width/f)", path.display(), t.shape());
    let nchw: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(nchw_to_nhwc(&nchw, n, 4, h, w))
}

fn write_latents(path: &Path, nhwc: &[f32], n: usize, h: usize, w: usize) -> Result<()> {
    let nchw = nhwc_to_nchw(nhwc, n, 4, h, w);
    let view = TensorView::new(Dtype::F32, vec![n, 4, h, w], bytemuck::cast_slice(&nchw))?;
    write_atomic(path, &safetensors::serialize([("latents".to_string(), view)], &None)?)
}

/// Runs `sdlora sample`.
pub fn run(args: &SampleArgs) -> Result<()> {
    ensure!(args.steps >= 1, "--steps must be at least 1");
    ensure!(args.num_images >= 1 && args.batch_size >= 1, "--num-images and --batch-size must be at least 1");
    ensure!(args.width.is_multiple_of(8) && args.height.is_multiple_of(8) && args.width > 0 && args.height > 0, "--width {} and --height {} must be positive multiples of 8", args.width, args.height);
    ensure!(!args.grid || args.num_images == 1, "--grid takes one image per prompt, seed and guidance: use several --seed values instead of --num-images");
    for g in &args.guidance {
        ensure!(g.is_finite(), "--guidance {g} is not a finite number");
    }
    scheduler_by_name(&args.scheduler, args.steps)?;
    let specs: Vec<LoraSpec> = args.lora.iter().map(|s| LoraSpec::parse(s)).collect::<Result<_>>()?;
    let loras: Vec<SampleLora> = specs.iter().map(lora_merge::read).collect::<Result<_>>()?;
    for l in &loras {
        if l.skipped_text_encoder > 0 {
            eprintln!(
                "warning: LoRA {}: skipped {} text-encoder key(s) (text-encoder LoRA is not supported yet; its UNet part is applied)",
                l.spec.path.display(),
                l.skipped_text_encoder
            );
        }
    }
    let gpu = if args.cpu { None } else { Some(Gpu::new(0)?) };
    let dev = gpu.as_ref().map_or(Dev::Cpu, Dev::Gpu);
    let base = match (&args.model, args.random_weights) {
        (Some(m), _) => Base::Source(ModelSource::resolve(m).with_context(|| format!("--model {m}"))?),
        (None, seed) => Base::Random(seed.unwrap_or(0)),
    };
    let load_start = Instant::now();
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).chain([args.negative_prompt.as_str()]).collect();
    let mut pipe = Pipeline::load(dev, &base, &loras, args.lora_on_the_fly, &prompts)?;
    let load_s = load_start.elapsed().as_secs_f64();

    let f = pipe.vae_factor();
    ensure!(args.width.is_multiple_of(f) && args.height.is_multiple_of(f), "--width/--height must be multiples of the VAE factor {f}");
    let (h, w) = (args.height / f, args.width / f);
    let levels = pipe.unet_levels;
    ensure!(h.is_multiple_of(levels) && w.is_multiple_of(levels), "--width {} x --height {}: this UNet needs multiples of {} px", args.width, args.height, f * levels);
    let jobs = jobs(args);
    let per = 4 * h * w;
    let mut init = match &args.init_latents {
        Some(p) => read_latents(p, jobs.len(), h, w)?,
        None => jobs.iter().flat_map(|j| nchw_to_nhwc(&philox_normal_cpu(per, j.seed, STREAM_INIT, 0, 0.0, 1.0), 1, 4, h, w)).collect(),
    };
    let started = Instant::now();
    let mut denoise_s = 0.0;
    let mut finals = Vec::with_capacity(init.len());
    for (b, chunk) in jobs.chunks(args.batch_size).enumerate() {
        let t0 = Instant::now();
        let x: Vec<f32> = init.drain(..chunk.len() * per).collect();
        finals.extend(pipe.denoise_batch(chunk, &args.negative_prompt, x, (h, w), &args.scheduler, args.steps)?);
        let done = (b * args.batch_size + chunk.len()).min(jobs.len());
        let seconds = t0.elapsed().as_secs_f64();
        denoise_s += seconds;
        eprintln!("{done}/{} images denoised ({} steps, {}, {seconds:.2} s)", jobs.len(), args.steps, args.scheduler);
    }
    let decode_start = Instant::now();
    if let Some(p) = &args.save_latents {
        write_latents(p, &finals, jobs.len(), h, w)?;
    }
    let scale = pipe.vae.config.scaling_factor;
    let mut images = Vec::with_capacity(jobs.len());
    for z in finals.chunks(per) {
        let pixels = pipe.decode(Tensor::from_vec(&[1, h, w, 4], z.iter().map(|v| v / scale).collect())?)?;
        images.push(Rgb8::from_unit_range(args.width, args.height, pixels.data()?));
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    if args.grid {
        let columns: Vec<String> = args.guidance.iter().map(|g| format!("CFG {g}")).collect();
        let rows: Vec<String> = args.prompt.iter().flat_map(|p| args.seed.iter().map(move |s| format!("seed {s}: {p}"))).collect();
        let text = jobs.iter().map(|j| parameters(args, j, &specs)).collect::<Vec<_>>().join("\n\n");
        png::write(&args.out, &grid::compose(&images, &columns, &rows), &text)?;
        eprintln!("wrote {} ({} rows x {} columns)", args.out.display(), rows.len(), columns.len());
    } else {
        for (i, (img, job)) in images.iter().zip(&jobs).enumerate() {
            let path = numbered(&args.out, i, jobs.len());
            png::write(&path, img, &parameters(args, job, &specs))?;
            eprintln!("wrote {} (seed {}, guidance {})", path.display(), job.seed, job.guidance);
        }
    }
    let batches = jobs.len().div_ceil(args.batch_size);
    eprintln!(
        "done: {} image(s) in {:.2} s (loading and text encoding {load_s:.2} s; denoising {denoise_s:.2} s = {:.1} ms per step and batch; VAE decode {decode_s:.2} s){}",
        jobs.len(),
        started.elapsed().as_secs_f64(),
        1e3 * denoise_s / (args.steps * batches) as f64,
        memory_text(gpu.as_ref())
    );
    Ok(())
}

/// ", peak device memory …" on the GPU (weights and LoRA, plus the largest per-step scratch).
fn memory_text(gpu: Option<&Gpu>) -> String {
    let Some(g) = gpu else { return String::new() };
    let (p, s) = (g.arena_stats(ArenaKind::Persistent).high_water, g.arena_stats(ArenaKind::Scratch).high_water);
    format!("; peak device memory {:.2} GiB (weights {:.2} GiB + scratch {:.2} GiB)", (p + s) as f64 / (1u64 << 30) as f64, p as f64 / (1u64 << 30) as f64, s as f64 / (1u64 << 30) as f64)
}
