//! Weights: safetensors files read through a memory map (nothing is copied into RAM until a tensor
//! is asked for), their f32/f16/bf16 values converted to f32 CPU tensors (or handed out raw for a GPU
//! upload), under diffusers' key names whatever the source:
//!
//! - a **diffusers folder** (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, …): in each
//!   component folder the `*.safetensors` files without a variant are used (all shards), else the
//!   `*.fp16.safetensors` variant;
//! - a **Hugging Face cache id** (`org/name`, optionally `org/name@rev`), resolved offline to
//!   `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`, then
//!   `models--org--name/snapshots/<rev>/` with `<rev>` read from `refs/main`;
//! - a **single-file LDM checkpoint** (`model.diffusion_model.*`, `first_stage_model.*`,
//!   `cond_stage_model.transformer.*`), whose keys are mapped to diffusers' names (see [`ldm_key`]).
//!
//! Every error names the file, the key, and the expected and found shapes; a truncated or corrupt
//! file is an error when it is opened, never a panic.

use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One safetensors file, memory-mapped, with its validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath while mapped is outside our contract
        // (the same assumption every safetensors reader makes).
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow!("{}: not a valid safetensors file ({e:?}): truncated or corrupt? ({} bytes)", path.display(), mmap.len())
        })?;
        let tensors = metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        let metadata = metadata.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + header_len, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// A string of the header's `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(|s| s.as_str())
    }

    /// The stored tensor `key`, as raw little-endian bytes straight from the map.
    pub fn raw(&self, key: &str) -> Result<RawTensor<'_>> {
        let (stored_key, info) =
            self.tensors.get_key_value(key).ok_or_else(|| anyhow!("{}: no tensor {key:?}", self.path.display()))?;
        let (s, e) = info.data_offsets;
        Ok(RawTensor {
            file: &self.path,
            key: stored_key,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &self.mmap[self.data_start + s..self.data_start + e],
        })
    }
}

/// A stored tensor seen in place: its bytes in the file's memory map (little-endian, row-major).
pub struct RawTensor<'a> {
    pub file: &'a Path,
    pub key: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    /// The values as f32 (from f32, f16 or bf16 storage).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            other => bail!("{}: tensor {:?} is {other:?}, expected a float type (f32, f16, bf16)", self.file.display(), self.key),
        })
    }

    /// The values as bf16 bits for a GPU upload (bf16 storage is passed through unchanged; f32 and
    /// f16 round to nearest even).
    pub fn to_bf16_bits(&self) -> Result<Vec<u16>> {
        if self.dtype == Dtype::BF16 {
            return Ok(self.bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect());
        }
        Ok(self.to_f32()?.into_iter().map(|x| bf16::from_f32(x).to_bits()).collect())
    }
}

/// The parts of an SD1.5 model whose weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    /// The component's folder in a diffusers layout.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        }
    }
}

struct Entry {
    file: usize,
    key: String,
    /// The shape diffusers gives this weight (differs from the stored one only for LDM's 1x1-conv
    /// VAE attention projections, which hold the same bytes).
    shape: Vec<usize>,
}

/// The weights of one component under diffusers' names, over one or more memory-mapped files (or,
/// for full-size tests and benchmarks, [`Weights::random`]).
pub struct Weights {
    files: Vec<Arc<SafetensorsFile>>,
    entries: BTreeMap<String, Entry>,
    random_seed: Option<u64>,
}

impl Weights {
    /// All tensors of `files`, under their stored names (diffusers' own files). The old diffusers
    /// names of the VAE's mid-block attention (query/key/value/proj_attn) are given their current ones.
    pub fn from_files(files: Vec<Arc<SafetensorsFile>>) -> Result<Weights> {
        let mut entries = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for key in f.keys() {
                let name = legacy_vae_attention_name(key).unwrap_or_else(|| key.to_string());
                let shape = f.tensors[key].shape.clone();
                if let Some(prev) = entries.insert(name.clone(), Entry { file: i, key: key.to_string(), shape }) {
                    bail!("{name:?} is stored twice: in {} and {}", files[prev.file].path.display(), f.path.display());
                }
            }
        }
        Ok(Weights { files, entries, random_seed: None })
    }

    /// The tensors of `component` in a single-file LDM checkpoint, renamed to diffusers' names.
    pub fn from_ldm(file: Arc<SafetensorsFile>, component: Component) -> Result<Weights> {
        let vae_up_levels = file
            .keys()
            .filter_map(|k| k.strip_prefix("first_stage_model.decoder.up.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        let mut entries = BTreeMap::new();
        for key in file.keys() {
            let Some(name) = ldm_key(key, component, vae_up_levels)
                .with_context(|| format!("{}: cannot map LDM key {key:?}", file.path.display()))?
            else {
                continue;
            };
            let info = &file.tensors[key];
            let mut shape = info.shape.clone();
            let squeeze = component == Component::Vae && name.contains("mid_block.attentions.0.to_") && name.ends_with(".weight");
            if squeeze && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
                shape.truncate(2);
            }
            entries.insert(name, Entry { file: 0, key: key.to_string(), shape });
        }
        ensure!(!entries.is_empty(), "{}: holds no {:?} weights (no key with its LDM prefix)", file.path.display(), component);
        Ok(Weights { files: vec![file], entries, random_seed: None })
    }

    /// The component's weights in a diffusers component folder (`unet/`, `vae/`, `text_encoder/`):
    /// the `*.safetensors` files without a variant (every shard), else those of `variant` (`"fp16"`).
    pub fn from_component_dir(dir: &Path, variant: &str) -> Result<Weights> {
        let mut plain = Vec::new();
        let mut variants = Vec::new();
        let mut pickles = false;
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot read component folder {}", dir.display()))? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if let Some(stem) = name.strip_suffix(".safetensors") {
                // `name.safetensors`, `name-00001-of-00002.safetensors`; variants `name.fp16[-0000N-of-…]`.
                match stem.rsplit_once('.') {
                    None => plain.push(path),
                    Some((_, v)) if v == variant || v.starts_with(&format!("{variant}-")) => variants.push(path),
                    Some(_) => {}
                }
            } else if name.ends_with(".bin") || name.ends_with(".ckpt") {
                pickles = true;
            }
        }
        let mut chosen = if plain.is_empty() { variants } else { plain };
        if chosen.is_empty() {
            bail!(
                "{}: no *.safetensors weights (nor *.{variant}.safetensors){}",
                dir.display(),
                if pickles { "; only PyTorch pickle files, which sdlora does not read: convert them to safetensors" } else { "" }
            );
        }
        chosen.sort();
        Weights::from_files(chosen.iter().map(|p| SafetensorsFile::open(p).map(Arc::new)).collect::<Result<_>>()?)
    }

    /// Puts `prefix` before every name that lacks it (transformers ≥ 5 saves CLIPTextModel without
    /// its `text_model.` prefix; older files and LDM checkpoints have it).
    pub fn with_prefix(self, prefix: &str) -> Weights {
        let entries = self
            .entries
            .into_iter()
            .map(|(name, e)| (if name.starts_with(prefix) { name } else { format!("{prefix}{name}") }, e))
            .collect();
        Weights { files: self.files, entries, random_seed: self.random_seed }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|k| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape diffusers gives `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        ensure!(self.random_seed.is_none(), "random stand-in weights have no stored tensor {name:?}");
        self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
            anyhow!("weight {name:?} is missing from {}", files.join(", "))
        })
    }

    /// `name` in place, checked to have `shape` (diffusers' shape); for GPU uploads.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<RawTensor<'_>> {
        let e = self.entry(name)?;
        let file = &self.files[e.file];
        ensure!(
            e.shape == shape,
            "{}: weight {name:?} (stored as {:?}) has shape {:?}, expected {shape:?}",
            file.path.display(),
            e.key,
            e.shape
        );
        let mut raw = file.raw(&e.key)?;
        raw.shape = e.shape.clone();
        Ok(raw)
    }

    /// Stand-in weights with no file: every name asked for gets [`random_weight`]`(seed, name, shape)`,
    /// so a full-size model can be built anywhere (GPU machines included) with the same values the
    /// reference script (tests/fixtures/make_fixtures.py --full-size) gave diffusers.
    pub fn random(seed: u64) -> Weights {
        Weights { files: vec![], entries: BTreeMap::new(), random_seed: Some(seed) }
    }

    /// `name` as f32 values, checked to have `shape`.
    pub fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(seed) = self.random_seed {
            return Ok(random_weight(seed, name, shape));
        }
        self.raw(name, shape)?.to_f32()
    }

    /// `name` as an f32 CPU tensor, checked to have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(shape, self.vec(name, shape)?)
    }

    /// A conv weight stored OIHW `[out, in, k, k]`, reordered to OHWI `[out, k, k, in]` (our layout).
    pub fn conv_ohwi(&self, name: &str, out_ch: usize, in_ch: usize, k: usize) -> Result<Vec<f32>> {
        let w = self.vec(name, &[out_ch, in_ch, k, k])?;
        Ok(crate::ops::conv::conv_weight_oihw_to_ohwi(&w, out_ch, in_ch, k, k))
    }
}

/// A deterministic stand-in for weight `name`: N(mean, std²) from [`Rng`](crate::rng::Rng) seeded
/// with `seed ^ fnv1a64(name)`, mean 1 and std 0.1 for 1-D `*.weight` (norm scales), std 0.05 for
/// other 1-D tensors (biases), 0.02 for `*embedding*`, 1/√fan_in otherwise. make_fixtures.py
/// (`random_weight`) computes the same values with numpy.
pub fn random_weight(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    let mut rng = crate::rng::Rng::new(seed ^ hash);
    let (mean, std) = if shape.len() == 1 {
        if name.ends_with(".weight") {
            (1.0f32, 0.1f32)
        } else {
            (0.0, 0.05)
        }
    } else if name.contains("embedding") {
        (0.0, 0.02)
    } else {
        (0.0, 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt())
    };
    (0..shape.iter().product::<usize>()).map(|_| mean + std * rng.normal()).collect()
}

/// diffusers' current name for an old-style VAE attention key (`…attentions.0.query.weight` →
/// `…attentions.0.to_q.weight`), or None.
fn legacy_vae_attention_name(key: &str) -> Option<String> {
    let (head, tail) = key.split_once("mid_block.attentions.0.")?;
    let (leaf, rest) = tail.split_once('.')?;
    let new = match leaf {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return None,
    };
    Some(format!("{head}mid_block.attentions.0.{new}.{rest}"))
}

/// The diffusers name of LDM checkpoint key `key` for `component`: `Ok(None)` when the key belongs to
/// another component (or is not a weight: `position_ids`, `betas`, EMA copies, …), an error when it has
/// the component's prefix but no known place. `vae_up_levels` is the number of `decoder.up.*` levels
/// (LDM numbers them from the lowest resolution up; diffusers the other way).
pub fn ldm_key(key: &str, component: Component, vae_up_levels: usize) -> Result<Option<String>> {
    match component {
        Component::TextEncoder => Ok(key
            .strip_prefix("cond_stage_model.transformer.")
            .filter(|k| !k.ends_with("position_ids"))
            .map(|k| if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") })),
        Component::Unet => key.strip_prefix("model.diffusion_model.").map(ldm_unet_key).transpose(),
        Component::Vae => key.strip_prefix("first_stage_model.").map(|k| ldm_vae_key(k, vae_up_levels)).transpose(),
    }
}

/// Parses `"<n>.<rest>"`.
fn index_and_rest(s: &str) -> Result<(usize, &str)> {
    let (n, rest) = s.split_once('.').ok_or_else(|| anyhow!("expected <index>.<name> in {s:?}"))?;
    Ok((n.parse().with_context(|| format!("bad index {n:?}"))?, rest))
}

/// LDM ResBlock leaf names → ResnetBlock2D's.
fn ldm_resnet(rest: &str) -> Result<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|r| format!("{new}{r}")))
        .ok_or_else(|| anyhow!("unknown resnet weight {rest:?}"))
}

/// SD1.x UNet (layers_per_block 2): LDM `input_blocks` / `middle_block` / `output_blocks` → diffusers.
fn ldm_unet_key(k: &str) -> Result<String> {
    let simple = [
        ("input_blocks.0.0.", "conv_in."),
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(name) = simple.iter().find_map(|(old, new)| k.strip_prefix(old).map(|r| format!("{new}{r}"))) {
        return Ok(name);
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (i, r) = index_and_rest(r)?;
        ensure!(i > 0, "unknown UNet weight {k:?}");
        let (b, l) = ((i - 1) / 3, (i - 1) % 3);
        let (sub, leaf) = index_and_rest(r)?;
        return match (l, sub) {
            (2, 0) => Ok(format!("down_blocks.{b}.downsamplers.0.conv.{}", leaf.strip_prefix("op.").ok_or_else(|| anyhow!("expected op.* in {k:?}"))?)),
            (_, 0) => Ok(format!("down_blocks.{b}.resnets.{l}.{}", ldm_resnet(leaf)?)),
            (_, 1) => Ok(format!("down_blocks.{b}.attentions.{l}.{leaf}")),
            _ => bail!("unknown input block part {k:?}"),
        };
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (i, leaf) = index_and_rest(r)?;
        return match i {
            0 | 2 => Ok(format!("mid_block.resnets.{}.{}", i / 2, ldm_resnet(leaf)?)),
            1 => Ok(format!("mid_block.attentions.0.{leaf}")),
            _ => bail!("unknown middle block part {k:?}"),
        };
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (i, r) = index_and_rest(r)?;
        let (b, l) = (i / 3, i % 3);
        let (sub, leaf) = index_and_rest(r)?;
        return match (sub, leaf.strip_prefix("conv.")) {
            (0, _) => Ok(format!("up_blocks.{b}.resnets.{l}.{}", ldm_resnet(leaf)?)),
            (1 | 2, Some(conv)) => Ok(format!("up_blocks.{b}.upsamplers.0.conv.{conv}")),
            (1, None) => Ok(format!("up_blocks.{b}.attentions.{l}.{leaf}")),
            _ => bail!("unknown output block part {k:?}"),
        };
    }
    bail!("unknown UNet weight {k:?}")
}

/// AutoencoderKL: LDM `encoder.down.*` / `decoder.up.*` / `mid.*` → diffusers.
fn ldm_vae_key(k: &str, up_levels: usize) -> Result<String> {
    if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
        return Ok(k.to_string());
    }
    let (part, r) = k.split_once('.').ok_or_else(|| anyhow!("unknown VAE weight {k:?}"))?;
    ensure!(part == "encoder" || part == "decoder", "unknown VAE weight {k:?}");
    let resnet = |leaf: &str| leaf.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let inner = if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
        r.to_string()
    } else if let Some(leaf) = r.strip_prefix("norm_out.") {
        format!("conv_norm_out.{leaf}")
    } else if let Some(rr) = r.strip_prefix("down.").or_else(|| r.strip_prefix("up.")) {
        let (i, rest) = index_and_rest(rr)?;
        let (kind, level) = if r.starts_with("down.") {
            ("down", i)
        } else {
            ensure!(i < up_levels, "decoder level {i} out of {up_levels} in {k:?}");
            ("up", up_levels - 1 - i)
        };
        if let Some(rest) = rest.strip_prefix("block.") {
            let (j, leaf) = index_and_rest(rest)?;
            format!("{kind}_blocks.{level}.resnets.{j}.{}", resnet(leaf))
        } else if let Some(leaf) = rest.strip_prefix(&format!("{kind}sample.conv.")) {
            format!("{kind}_blocks.{level}.{kind}samplers.0.conv.{leaf}")
        } else {
            bail!("unknown VAE weight {k:?}")
        }
    } else if let Some(leaf) = r.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", resnet(leaf))
    } else if let Some(leaf) = r.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", resnet(leaf))
    } else if let Some(rest) = r.strip_prefix("mid.attn_1.") {
        let (leaf, p) = rest.split_once('.').ok_or_else(|| anyhow!("unknown VAE weight {k:?}"))?;
        let new = match leaf {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => bail!("unknown VAE attention weight {k:?}"),
        };
        format!("mid_block.attentions.0.{new}.{p}")
    } else {
        bail!("unknown VAE weight {k:?}")
    };
    Ok(format!("{part}.{inner}"))
}

/// Where an SD1.5 model's files are.
pub enum ModelSource {
    /// A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    Diffusers(PathBuf),
    /// A single-file LDM checkpoint (v1-5-pruned-emaonly.safetensors and the like).
    SingleFile(Arc<SafetensorsFile>),
}

impl ModelSource {
    /// A path to a diffusers folder or to a `.safetensors` checkpoint, else a Hugging Face repo id
    /// (`org/name` or `org/name@rev`) looked up offline in the local cache.
    pub fn resolve(spec: &str) -> Result<ModelSource> {
        let path = Path::new(spec);
        if path.is_file() {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            ensure!(
                !matches!(ext, "ckpt" | "pt" | "pth" | "bin"),
                "{}: a PyTorch pickle checkpoint, which sdlora does not read; convert it to .safetensors",
                path.display()
            );
            return Ok(ModelSource::SingleFile(Arc::new(SafetensorsFile::open(path)?)));
        }
        if path.is_dir() {
            ensure!(path.join("model_index.json").is_file(), "{}: not a diffusers folder (no model_index.json)", path.display());
            return Ok(ModelSource::Diffusers(path.to_path_buf()));
        }
        let looks_like_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".safetensors");
        ensure!(looks_like_id, "model {spec:?}: no such file or folder, and not a Hugging Face id (org/name)");
        Ok(ModelSource::Diffusers(resolve_hf_cache(spec, &hf_hub_cache()?)?))
    }

    /// The weights of `component` (fp32 files preferred, else the fp16 variant).
    pub fn weights(&self, component: Component) -> Result<Weights> {
        let w = match self {
            ModelSource::Diffusers(dir) => Weights::from_component_dir(&dir.join(component.folder()), "fp16")?,
            ModelSource::SingleFile(f) => Weights::from_ldm(f.clone(), component)?,
        };
        Ok(if component == Component::TextEncoder { w.with_prefix("text_model.") } else { w })
    }

    /// The component's `config.json`, parsed; None for a single-file checkpoint (the caller uses
    /// SD1.5's configuration).
    pub fn config(&self, component: Component) -> Result<Option<serde_json::Value>> {
        match self {
            ModelSource::Diffusers(dir) => read_json(&dir.join(component.folder()).join("config.json")).map(Some),
            ModelSource::SingleFile(_) => Ok(None),
        }
    }

    /// The tokenizer folder (vocab.json + merges.txt); None for a single-file checkpoint (the caller
    /// uses the CLIP vocabulary shipped in data/clip).
    pub fn tokenizer_dir(&self) -> Option<PathBuf> {
        match self {
            ModelSource::Diffusers(dir) => Some(dir.join("tokenizer")),
            ModelSource::SingleFile(_) => None,
        }
    }
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Ok(p.into());
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Ok(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set: cannot find the Hugging Face cache"))?;
    Ok(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// `org/name[@rev]` → `<cache>/models--org--name/snapshots/<commit>/`, where `<commit>` is read from
/// `refs/<rev>` (`refs/main` by default) or is `rev` itself. Offline: nothing is downloaded.
pub fn resolve_hf_cache(id: &str, cache: &Path) -> Result<PathBuf> {
    let (repo, rev) = id.split_once('@').unwrap_or((id, "main"));
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    ensure!(
        repo_dir.is_dir(),
        "{id}: not in the Hugging Face cache ({} does not exist); download it first, e.g. with huggingface-cli download {repo}",
        repo_dir.display()
    );
    let refs = repo_dir.join("refs").join(rev);
    let commit = if refs.is_file() { std::fs::read_to_string(&refs)?.trim().to_string() } else { rev.to_string() };
    let snap = repo_dir.join("snapshots").join(&commit);
    ensure!(snap.join("model_index.json").is_file(), "{id}: snapshot {} has no model_index.json", snap.display());
    Ok(snap)
}

#[cfg(test)]
#[path = "weights_tests.rs"]
mod tests;
