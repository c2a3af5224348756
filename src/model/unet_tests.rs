//! The UNet against diffusers + PEFT on the tiny fixture (tests/fixtures/make_fixtures.py):
//! output without and with a LoRA, the Min-SNR loss, every LoRA gradient, and a finite-difference
//! check of LoRA parameters through the whole network.

use super::layers::Dev;
use super::lora;
use super::transformer::Keep;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::weights::{Component, ModelSource, SafetensorsFile};
use crate::checkpoint::load_lora;
use crate::ops::diffusion::{mse_min_snr_backward_cpu, mse_min_snr_cpu};
use crate::schedule::NoiseSchedule;
use crate::tensor::{assert_close, nchw_to_nhwc, Tensor};
use crate::testing::fixtures_dir;

struct Fixture {
    io: SafetensorsFile,
}

impl Fixture {
    fn open() -> Fixture {
        Fixture { io: SafetensorsFile::open(&fixtures_dir().join("tiny-sd-io.safetensors")).unwrap() }
    }
    fn get(&self, key: &str) -> Vec<f32> {
        self.io.raw(key).unwrap().to_f32().unwrap()
    }
    fn shape(&self, key: &str) -> Vec<usize> {
        self.io.raw(key).unwrap().shape
    }
    /// An NCHW latent from the fixture as an NHWC tensor.
    fn latent(&self, key: &str) -> Tensor {
        let s = self.shape(key);
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        Tensor::from_vec(&[n, h, w, c], nchw_to_nhwc(&self.get(key), n, c, h, w)).unwrap()
    }
    fn timesteps(&self) -> Vec<f32> {
        let raw = self.io.raw("unet.timesteps").unwrap();
        raw.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
    }
    fn timestep_tensor(&self) -> Tensor {
        let t = self.timesteps();
        Tensor::from_vec(&[t.len()], t).unwrap()
    }
    fn context(&self) -> Tensor {
        Tensor::from_vec(&self.shape("unet.encoder_hidden_states"), self.get("unet.encoder_hidden_states")).unwrap()
    }
}

fn tiny_unet() -> UNet2DConditionModel {
    let source = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
    let config = UNetConfig::from_json(&source.config(Component::Unet).unwrap().unwrap()).unwrap();
    UNet2DConditionModel::load(Dev::Cpu, &source.weights(Component::Unet).unwrap(), config).unwrap()
}

/// The fixture's LoRA (r = 4). diffusers saved it without adapter metadata, so the file implies
/// alpha = r; the fixture's outputs were made in memory with PEFT's lora_alpha = 8.
fn with_fixture_lora(unet: &mut UNet2DConditionModel) {
    let mut loaded = load_lora(&fixtures_dir().join("tiny-sd-lora/pytorch_lora_weights.safetensors")).unwrap();
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    loaded.weights.layers.values_mut().for_each(|l| l.alpha = 8.0);
    lora::load(Dev::Cpu, unet, &loaded.weights).unwrap();
}

/// Loss of the fixture batch: Min-SNR(γ = 5) MSE of the prediction against the noise.
fn loss_and_grad(unet: &mut UNet2DConditionModel, f: &Fixture) -> (f32, Tensor) {
    let t = f.timesteps();
    let pred = unet.forward(Dev::Cpu, &f.latent("unet.noisy_latents"), &f.timestep_tensor(), &f.context()).unwrap();
    let abar = NoiseSchedule::sd15().alphas_cumprod;
    let (p, noise) = (pred.data().unwrap(), f.latent("unet.noise"));
    let loss = mse_min_snr_cpu(p, noise.data().unwrap(), &t, &abar, Some(5.0));
    let d_pred = mse_min_snr_backward_cpu(p, noise.data().unwrap(), &t, &abar, Some(5.0), 1.0);
    (loss, Tensor::from_vec(pred.shape(), d_pred).unwrap())
}

#[test]
fn unet_forward_matches_diffusers() {
    let f = Fixture::open();
    let mut unet = tiny_unet();
    let x = f.latent("unet.noisy_latents");
    let out = unet.forward(Dev::Cpu, &x, &f.timestep_tensor(), &f.context()).unwrap();
    let want = f.latent("unet.out_base");
    assert_close("UNet output (no LoRA)", out.data().unwrap(), want.data().unwrap(), 1e-4);

    with_fixture_lora(&mut unet);
    let out = unet.forward(Dev::Cpu, &x, &f.timestep_tensor(), &f.context()).unwrap();
    let want = f.latent("unet.out_lora");
    assert_close("UNet output (with LoRA)", out.data().unwrap(), want.data().unwrap(), 1e-4);
}

#[test]
fn unet_lora_gradients_match_peft() {
    let f = Fixture::open();
    let mut unet = tiny_unet();
    with_fixture_lora(&mut unet);
    let (loss, d_pred) = loss_and_grad(&mut unet, &f);
    assert_close("Min-SNR loss", &[loss], &f.get("unet.loss_snr5"), 1e-5);
    unet.backward(Dev::Cpu, &d_pred).unwrap();
    let grads = lora::gradients(Dev::Cpu, &mut unet).unwrap();
    assert_eq!(grads.len(), 128, "16 transformers × (attn1, attn2) × (to_q, to_k, to_v, to_out.0)");
    for (module, ga, gb) in grads {
        for (which, got) in [("lora_A", ga), ("lora_B", gb)] {
            let want = f.get(&format!("unet.grad.{module}.{which}.weight"));
            // The mid block's self-attention sees one token: its to_q/to_k gradients are exactly 0,
            // which both sides only approximate (|g| ~ 1e-14); compare those absolutely.
            if want.iter().all(|v| v.abs() < 1e-10) {
                assert!(got.iter().all(|v| v.abs() < 1e-9), "{module} {which}: expected zero gradient");
                continue;
            }
            assert_close(&format!("{module} {which} grad"), &got, &want, 1e-4);
        }
    }
}

#[test]
fn unet_lora_gradients_match_finite_differences() {
    let f = Fixture::open();
    let mut unet = tiny_unet();
    with_fixture_lora(&mut unet);
    let (_, d_pred) = loss_and_grad(&mut unet, &f);
    unet.backward(Dev::Cpu, &d_pred).unwrap();
    let grads = lora::gradients(Dev::Cpu, &mut unet).unwrap();
    // Projections in the down, mid and up paths, self- and cross-attention, A and B; in each, the
    // parameter with the largest gradient (small ones drown in the f32 forward's rounding).
    let argmax = |g: &[f32]| (0..g.len()).max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs())).unwrap();
    let picks = [(0usize, true), (5, false), (40, true), (64, false), (100, true), (127, false)];
    let h = 1e-2f64;
    for (proj, is_a) in picks {
        let g = if is_a { &grads[proj].1 } else { &grads[proj].2 };
        let idx = argmax(g);
        let analytic = g[idx];
        let mut eval = |delta: f64| {
            let mut p = lora::projections(&mut unet);
            let adapter = p[proj].1.lora.as_mut().unwrap();
            let v = if is_a { &mut adapter.a.data_mut().unwrap()[idx] } else { &mut adapter.b.data_mut().unwrap()[idx] };
            let orig = *v;
            *v = (orig as f64 + delta) as f32;
            drop(p);
            let (loss, _) = loss_and_grad(&mut unet, &f);
            let mut p = lora::projections(&mut unet);
            let adapter = p[proj].1.lora.as_mut().unwrap();
            *(if is_a { &mut adapter.a.data_mut().unwrap()[idx] } else { &mut adapter.b.data_mut().unwrap()[idx] }) = orig;
            loss as f64
        };
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        let err = (analytic as f64 - numeric).abs() / numeric.abs().max(1e-4);
        assert!(err < 2e-2, "projection {proj} {} [{idx}]: analytic {analytic:e}, numeric {numeric:e}", if is_a { "A" } else { "B" });
    }
}


/// Keeping fewer activations (the feed-forward hidden states recomputed, or the whole transformer
/// rerun in the backward) holds fewer bytes between forward and backward and gives bit-identical
/// LoRA gradients.
#[test]
fn recomputing_transformer_activations_changes_no_gradient() {
    let f = Fixture::open();
    let mut unet = tiny_unet();
    with_fixture_lora(&mut unet);
    let mut run = |keep: Keep| {
        unet.layers_mut().filter_map(|(_, l)| l.attention.as_mut()).for_each(|t| t.keep = keep);
        let (_, d_pred) = loss_and_grad(&mut unet, &f);
        let held: usize = unet.layers_mut().filter_map(|(_, l)| l.attention.as_ref()).map(|t| t.saved_bytes()).sum();
        unet.backward(Dev::Cpu, &d_pred).unwrap();
        let grads: Vec<f32> = lora::gradients(Dev::Cpu, &mut unet).unwrap().into_iter().flat_map(|(_, a, b)| a.into_iter().chain(b)).collect();
        lora::zero_gradients(Dev::Cpu, &mut unet).unwrap();
        (held, grads)
    };
    let (all, grads_all) = run(Keep::All);
    let (but_ff, grads_but_ff) = run(Keep::AllButFeedForward);
    let (input, grads_input) = run(Keep::Input);
    assert!(all > but_ff && but_ff > input, "held bytes: all {all}, all but the feed-forward {but_ff}, input {input}");
    assert!(grads_all.iter().any(|&g| g != 0.0));
    assert!(grads_all == grads_but_ff, "recomputing the feed-forward hidden states changed the gradients");
    assert!(grads_all == grads_input, "rerunning the transformers changed the gradients");
}
