//! Full SD1.5-size checks of the CLIP text encoder and the VAE against diffusers / transformers, on
//! the stand-in weights `Weights::random` makes (tests/fixtures/make_fixtures.py --full-size DIR wrote
//! the same weights for PyTorch, and DIR/io.safetensors with the inputs, f32 reference outputs and
//! PyTorch bf16's own error). All ignored: they need DIR in SDLORA_SD15_REFERENCE (only
//! io.safetensors is read, except by the generator check), and the GPU ones a CUDA GPU.
//! GPU bound (the issue's): rel L2 ≤ 2e-2 and ≤ 1.5× PyTorch bf16's error against f32.

use super::clip::{ClipTextConfig, ClipTextModel};
use super::layers::Dev;
use super::vae::{AutoencoderKl, Tiling, VaeConfig};
use super::weights::{ModelSource, SafetensorsFile, Weights};
use crate::cuda::{ArenaKind, Gpu};
use crate::tensor::{compare, Tensor};
use std::path::PathBuf;
use std::time::Instant;

fn reference_dir() -> PathBuf {
    std::env::var("SDLORA_SD15_REFERENCE").expect("set SDLORA_SD15_REFERENCE=DIR (make_fixtures.py --full-size DIR)").into()
}

struct Reference {
    io: SafetensorsFile,
    seed: u64,
}

impl Reference {
    fn open() -> Reference {
        let io = SafetensorsFile::open(&reference_dir().join("io.safetensors")).unwrap();
        let seed = io.metadata("seed").expect("io.safetensors has no seed").parse().unwrap();
        Reference { io, seed }
    }

    fn f32(&self, key: &str) -> Vec<f32> {
        self.io.raw(key).unwrap().to_f32().unwrap()
    }

    /// An NCHW reference tensor as NHWC.
    fn nhwc(&self, key: &str) -> Tensor {
        let s = self.io.raw(key).unwrap().shape;
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        let x = self.f32(key);
        Tensor::from_vec(&[n, h, w, c], crate::tensor::nchw_to_nhwc(&x, n, c, h, w)).unwrap()
    }

    fn ids(&self) -> Vec<u32> {
        self.io.raw("clip.input_ids").unwrap().bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    }

    /// Checks `got` against the f32 reference `key`: within `tol`, and (`gpu`) within 2e-2 and 1.5×
    /// PyTorch bf16's error.
    fn check(&self, what: &str, got: &[f32], key: &str, gpu: bool) {
        let want = if self.io.raw(key).unwrap().shape.len() == 4 { self.nhwc(key).into_vec().unwrap() } else { self.f32(key) };
        let c = compare(got, &want);
        let torch: f64 = self.io.metadata(&format!("torch_bf16_rel_l2.{key}")).unwrap().parse().unwrap();
        eprintln!("{what}: rel L2 {:.3e} (PyTorch bf16 {torch:.3e}, ratio {:.2}), max abs {:.2e}", c.rel_l2, c.rel_l2 / torch, c.max_abs);
        let tol = if gpu { 2e-2f64.min(1.5 * torch) } else { 1e-4 };
        assert!(c.within(tol), "{what}: rel L2 {:.3e} > {tol:.3e} ({} non-finite)", c.rel_l2, c.non_finite);
    }
}

/// The generator agrees with make_fixtures.py's numpy copy: every weight file value is reproduced.
#[test]
#[ignore = "needs SDLORA_SD15_REFERENCE=DIR with its weight files (make_fixtures.py --full-size DIR)"]
fn full_size_stand_in_weights_match_the_reference_files() {
    let (r, src) = (Reference::open(), ModelSource::resolve(reference_dir().to_str().unwrap()).unwrap());
    let random = Weights::random(r.seed);
    let (mut values, mut differ) = (0usize, 0usize);
    for c in [super::weights::Component::TextEncoder, super::weights::Component::Vae] {
        let w = src.weights(c).unwrap();
        for name in w.names().filter(|n| !n.ends_with("position_ids")) {
            let shape = w.shape(name).unwrap().to_vec();
            let (file, ours) = (w.vec(name, &shape).unwrap(), random.vec(name, &shape).unwrap());
            let cmp = compare(&ours, &file);
            assert!(cmp.within(1e-6), "{name}: rel L2 {:.2e}", cmp.rel_l2);
            values += file.len();
            differ += file.iter().zip(&ours).filter(|(a, b)| a != b).count();
        }
    }
    eprintln!("stand-in weights: {values} values, {differ} not bit-identical");
}

#[test]
#[ignore = "needs SDLORA_SD15_REFERENCE=DIR (make_fixtures.py --full-size DIR)"]
fn full_size_clip_cpu_matches_transformers() {
    let r = Reference::open();
    let model = ClipTextModel::load(Dev::Cpu, &Weights::random(r.seed), ClipTextConfig::sd15()).unwrap();
    let t0 = Instant::now();
    let out = model.forward(Dev::Cpu, &r.ids(), 3).unwrap();
    eprintln!("CPU CLIP, 3 prompts: {:.2} s", t0.elapsed().as_secs_f64());
    r.check("CPU f32 CLIP last_hidden_state", out.data().unwrap(), "clip.last_hidden_state", false);
}

/// Median wall time of `f` in ms over `reps` runs (after one warm-up), the GPU synchronized each time.
fn median_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            gpu.synchronize().unwrap();
            let t0 = Instant::now();
            f();
            gpu.synchronize().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[test]
#[ignore = "needs a CUDA GPU and SDLORA_SD15_REFERENCE=DIR (make_fixtures.py --full-size DIR)"]
fn full_size_clip_gpu_matches_transformers() {
    let r = Reference::open();
    let gpu = Gpu::for_tests().unwrap();
    let model = ClipTextModel::load(Dev::Gpu(&gpu), &Weights::random(r.seed), ClipTextConfig::sd15()).unwrap();
    let out = model.forward(Dev::Gpu(&gpu), &r.ids(), 3).unwrap().to_cpu(&gpu).unwrap();
    r.check("GPU bf16 CLIP last_hidden_state", out.data().unwrap(), "clip.last_hidden_state", true);
    gpu.set_check_launches(false);
    let ids = r.ids();
    let ms = median_ms(&gpu, 10, || {
        model.forward(Dev::Gpu(&gpu), &ids, 3).unwrap();
    });
    eprintln!("GPU CLIP forward, 3 prompts: {ms:.2} ms (wall, synchronized), scratch high-water {:.1} MiB", mib(gpu.arena_stats(ArenaKind::Scratch).high_water));
}

#[test]
#[ignore = "needs a CUDA GPU and SDLORA_SD15_REFERENCE=DIR (make_fixtures.py --full-size DIR)"]
fn full_size_vae_gpu_matches_diffusers() {
    let r = Reference::open();
    let gpu = Gpu::for_tests().unwrap();
    let dev = Dev::Gpu(&gpu);
    let vae = AutoencoderKl::load(dev, &Weights::random(r.seed), VaeConfig::sd15()).unwrap();
    let post = vae.encode(dev, &r.nhwc("vae.image")).unwrap();
    r.check("GPU bf16 VAE posterior mean (256x256)", post.mean.data().unwrap(), "vae.posterior_mean", true);
    r.check("GPU bf16 VAE posterior logvar", post.logvar.data().unwrap(), "vae.posterior_logvar", true);
    let out = vae.decode(dev, &r.nhwc("vae.latents")).unwrap();
    r.check("GPU bf16 VAE decode (32x32 latents)", out.data().unwrap(), "vae.decoded", true);

    gpu.set_check_launches(false);
    let dev = Dev::Gpu(&gpu);
    let mut rng = crate::rng::Rng::new(7);
    let image = Tensor::from_vec(&[1, 512, 512, 3], rng.uniform_vec(512 * 512 * 3, -1.0, 1.0)).unwrap();
    let z = Tensor::from_vec(&[1, 64, 64, 4], rng.normal_vec(64 * 64 * 4, 1.0)).unwrap();
    let stats = |g: &Gpu| mib(g.arena_stats(ArenaKind::Scratch).high_water);
    gpu.reset_high_water();
    let enc = median_ms(&gpu, 5, || {
        vae.encode(dev, &image).unwrap();
    });
    let enc_mem = stats(&gpu);
    gpu.reset_high_water();
    let dec = median_ms(&gpu, 5, || {
        vae.decode(dev, &z).unwrap();
    });
    let dec_mem = stats(&gpu);
    eprintln!("GPU VAE 512x512 (wall, synchronized, incl. upload/download): encode {enc:.1} ms, decode {dec:.1} ms; scratch high-water after encode {enc_mem:.0} MiB, after decode {dec_mem:.0} MiB");
    let z2 = Tensor::from_vec(&[1, 128, 128, 4], rng.normal_vec(128 * 128 * 4, 1.0)).unwrap();
    let tiling = Tiling { tile_latent: 64, overlap_factor: 0.25 };
    let t0 = Instant::now();
    let img = vae.decode_tiled(dev, &z2, tiling).unwrap();
    eprintln!(
        "GPU VAE tiled decode 1024x1024 ({:?}): {:.0} ms, output {:?}, scratch high-water {:.0} MiB",
        tiling,
        t0.elapsed().as_secs_f64() * 1e3,
        img.shape(),
        stats(&gpu)
    );
    assert!(img.data().unwrap().iter().all(|v| v.is_finite()));
}
