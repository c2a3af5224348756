use super::*;
use crate::model::weights::SafetensorsFile;
use crate::tensor::compare;
use crate::testing::fixtures_dir;

/// A fixture tensor stored NCHW, as an NHWC CPU tensor.
pub(crate) fn nhwc(io: &SafetensorsFile, key: &str) -> Tensor {
    let r = io.raw(key).unwrap();
    let (x, s) = (r.to_f32().unwrap(), r.shape.clone());
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    Tensor::from_vec(&[n, h, w, c], crate::tensor::nchw_to_nhwc(&x, n, c, h, w)).unwrap()
}

/// Compares an NHWC output with a fixture tensor stored NCHW.
pub(crate) fn check(what: &str, out: &Tensor, io: &SafetensorsFile, key: &str, tol: f64) -> f64 {
    let want = nhwc(io, key);
    assert_eq!(out.shape(), want.shape(), "{what}: shape");
    let c = compare(out.data().unwrap(), want.data().unwrap());
    eprintln!("{what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
    assert!(c.within(tol), "{what}: rel L2 {:.3e} > {tol:.0e} ({} non-finite)", c.rel_l2, c.non_finite);
    c.rel_l2
}

fn tiny() -> (AutoencoderKl, SafetensorsFile) {
    let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
    let vae = AutoencoderKl::from_source(Dev::Cpu, &src).unwrap();
    (vae, SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap())
}

/// The tiny fixture AutoencoderKL (3 levels 16/32/32, 2 resnets per level, 8 groups) matches
/// diffusers: posterior mean and logvar of a 16x24 image pair, and the decode of 4x6 latents.
#[test]
fn tiny_vae_matches_diffusers() {
    let (vae, io) = tiny();
    let post = vae.encode(Dev::Cpu, &nhwc(&io, "vae.image")).unwrap();
    check("posterior mean", &post.mean, &io, "vae.posterior_mean", 1e-4);
    check("posterior logvar", &post.logvar, &io, "vae.posterior_logvar", 1e-4);
    let out = vae.decode(Dev::Cpu, &nhwc(&io, "vae.latents")).unwrap();
    check("decoded", &out, &io, "vae.decoded", 1e-4);
}

/// Tiled decode of 12x14 latents in 8x8 tiles at stride 6 (2x3 tiles, ragged right and bottom ones)
/// matches diffusers' `enable_tiling()` decode.
#[test]
fn tiny_vae_tiled_decode_matches_diffusers() {
    let (vae, io) = tiny();
    assert_eq!(vae.default_tiling(), Tiling { tile_latent: 8, overlap_factor: 0.25 });
    let z = nhwc(&io, "vae.tiled_latents");
    let mut tiles = 0;
    let out = decode_tiled(&z, vae.default_tiling(), vae.factor(), |t| {
        tiles += 1;
        vae.decode(Dev::Cpu, t)
    })
    .unwrap();
    assert_eq!(tiles, 6);
    check("tiled decode", &out, &io, "vae.tiled_decoded", 1e-4);
    check("tiled decode (method)", &vae.decode_tiled(Dev::Cpu, &z, vae.default_tiling()).unwrap(), &io, "vae.tiled_decoded", 1e-4);
}

/// The same VAE from the single-file LDM checkpoint (f16 storage; mid attention stored as 1x1 convs).
#[test]
fn tiny_vae_from_ldm_checkpoint() {
    let folder = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
    let ldm = ModelSource::resolve(fixtures_dir().join("tiny-sd-ldm.safetensors").to_str().unwrap()).unwrap();
    let cfg = VaeConfig::from_json(&folder.config(Component::Vae).unwrap().unwrap()).unwrap();
    let vae = AutoencoderKl::load(Dev::Cpu, &ldm.weights(Component::Vae).unwrap(), cfg).unwrap();
    let io = SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap();
    let out = vae.decode(Dev::Cpu, &nhwc(&io, "vae.latents")).unwrap();
    check("decoded from f16 LDM weights", &out, &io, "vae.decoded", 2e-2);
}

/// The GPU's storage of an odd out_ch (one zero channel more, dropped on download), run on the CPU.
#[test]
fn odd_output_channels_padded_then_dropped() {
    let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
    let w = src.weights(Component::Vae).unwrap();
    let x = Tensor::from_vec(&[1, 3, 5, 16], crate::rng::Rng::new(3).normal_vec(3 * 5 * 16, 1.0)).unwrap();
    let plain = Conv::load_even(Dev::Cpu, &w, "decoder.conv_out", (16, 3), (3, 1, 1), false).unwrap().forward(Dev::Cpu, &x).unwrap();
    let even = Conv::load_even(Dev::Cpu, &w, "decoder.conv_out", (16, 3), (3, 1, 1), true).unwrap().forward(Dev::Cpu, &x).unwrap();
    assert_eq!((plain.shape(), even.shape()), (&[1, 3, 5, 3][..], &[1, 3, 5, 4][..]));
    assert!(even.data().unwrap().chunks_exact(4).all(|px| px[3] == 0.0));
    assert_eq!(to_host(Dev::Cpu, even, 3).unwrap().data().unwrap(), plain.data().unwrap());
}

#[test]
fn sd15_config_and_input_checks() {
    assert_eq!(VaeConfig::sd15().block_out_channels.len(), 4);
    let (vae, _) = tiny();
    assert_eq!(vae.factor(), 4);
    let err = format!("{:#}", vae.encode(Dev::Cpu, &Tensor::zeros(&[1, 6, 8, 3])).err().unwrap());
    assert!(err.contains("multiple of 4"), "{err}");
    let err = format!("{:#}", vae.decode(Dev::Cpu, &Tensor::zeros(&[1, 2, 2, 3])).err().unwrap());
    assert!(err.contains("4 channels"), "{err}");
    let padded = pad_right_bottom(Dev::Cpu, &Tensor::from_vec(&[1, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap()).unwrap();
    assert_eq!(padded.shape(), &[1, 3, 2, 2]);
    assert_eq!(padded.data().unwrap(), &[1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}
