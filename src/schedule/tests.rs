//! Parity with diffusers: tests/fixtures/schedulers/schedulers.safetensors, written by
//! tests/fixtures/make_scheduler_fixtures.py from diffusers' own scheduler classes.

use super::*;
use crate::tensor::compare;
use safetensors::SafeTensors;

/// f32 sampler math against diffusers' f32 torch math: relative L2 of the final latents.
const TOL: f64 = 1e-5;

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Fixture {
        let path = crate::testing::fixtures_dir().join("schedulers/schedulers.safetensors");
        Fixture(std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
    }

    fn get(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).expect("parsing the scheduler fixture");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name} is not f32");
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// The fixture script's fake UNet: εᵢ = 0.1·xᵢ + f32(0.05·sin(t/100 + 0.1·i)).
fn fake_model(x: &[f32], t: f32, eps: &mut [f32]) -> Result<()> {
    for (i, (e, &v)) in eps.iter_mut().zip(x).enumerate() {
        *e = 0.1 * v + (0.05 * (t as f64 / 100.0 + 0.1 * i as f64).sin()) as f32;
    }
    Ok(())
}

/// Checks one fixture case (`run` = name or name@spacing): timesteps exactly, init σ, the latents
/// after the first step and after the whole loop, and how often noise was drawn.
fn check_run(fx: &Fixture, run: &str, steps: usize) {
    let (name, spacing) = match run.split_once('@') {
        Some((n, s)) => (n, Some(Spacing::from_name(s).unwrap())),
        None => (run, None),
    };
    let config = SchedulerConfig { spacing, ..SchedulerConfig::SD15 };
    let kind = SchedulerKind::from_name(name).unwrap();
    let mut sched = build_scheduler(kind, steps, &NoiseSchedule::sd15(), &config).unwrap();
    let key = format!("{run}_{steps}");
    assert_eq!(sched.timesteps(), &fx.get(&format!("{key}.timesteps"))[..], "{key}: timesteps");
    let init_sigma = fx.get(&format!("{key}.init_sigma"))[0];
    assert!(
        (sched.init_noise_sigma() - init_sigma).abs() <= 1e-6 * init_sigma,
        "{key}: init_noise_sigma {} vs diffusers {init_sigma}",
        sched.init_noise_sigma()
    );
    let noise = fx.get("noise");
    let mut latents = fx.get("init_latents");
    let n = latents.len();
    let mut drawn = 0;
    let mut noise_fn = |z: &mut [f32]| {
        z.copy_from_slice(&noise[drawn * n..(drawn + 1) * n]);
        drawn += 1;
    };
    // The first step on its own (catches first-step special cases), then the whole loop.
    let mut first = latents.clone();
    {
        let mut one = build_scheduler(kind, steps, &NoiseSchedule::sd15(), &config).unwrap();
        first.iter_mut().for_each(|x| *x *= one.init_noise_sigma());
        let scale = one.model_input_scale(0);
        let x_in: Vec<f32> = first.iter().map(|x| x * scale).collect();
        let mut eps = vec![0f32; n];
        fake_model(&x_in, one.timesteps()[0], &mut eps).unwrap();
        let z = noise[..n].to_vec();
        one.step(0, &eps, &mut first, &mut |buf: &mut [f32]| buf.copy_from_slice(&z));
    }
    let c_first = compare(&first, &fx.get(&format!("{key}.first")));
    denoise(sched.as_mut(), &mut latents, fake_model, &mut noise_fn).unwrap();
    let c_final = compare(&latents, &fx.get(&format!("{key}.final")));
    eprintln!("{key:24} first step rel L2 {:.2e}, final rel L2 {:.2e} (max abs {:.2e})", c_first.rel_l2, c_final.rel_l2, c_final.max_abs);
    assert!(c_first.within(TOL), "{key}: first step rel L2 {:.3e}", c_first.rel_l2);
    assert!(c_final.within(TOL), "{key}: final latents rel L2 {:.3e}, max abs {:.3e}", c_final.rel_l2, c_final.max_abs);
    let expected_draws = if kind == SchedulerKind::EulerAncestral { sched.timesteps().len() } else { 0 };
    assert_eq!(drawn, expected_draws, "{key}: noise draws");
}

fn check_scheduler(runs: &[&str]) {
    let fx = Fixture::load();
    for run in runs {
        for steps in fx.get("steps") {
            check_run(&fx, run, steps as usize);
        }
    }
}

#[test]
fn pndm_matches_diffusers() {
    check_scheduler(&["pndm", "pndm@linspace", "pndm@trailing"]);
}

#[test]
fn ddim_matches_diffusers() {
    check_scheduler(&["ddim", "ddim@linspace", "ddim@trailing"]);
}

#[test]
fn euler_matches_diffusers() {
    check_scheduler(&["euler", "euler@leading", "euler@trailing"]);
}

#[test]
fn euler_ancestral_matches_diffusers_with_injected_noise() {
    check_scheduler(&["euler_a", "euler_a@leading"]);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    check_scheduler(&["dpmpp_2m", "dpmpp_2m@leading", "dpmpp_2m@trailing"]);
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    check_scheduler(&["dpmpp_2m_karras"]);
}

#[test]
fn training_schedule_matches_diffusers_ddpm() {
    let fx = Fixture::load();
    let s = NoiseSchedule::sd15();
    // β and ᾱ bit for bit.
    assert_eq!(s.betas, fx.get("ddpm.betas"), "betas");
    assert_eq!(s.alphas_cumprod, fx.get("ddpm.alphas_cumprod"), "alphas_cumprod");
    let ts: Vec<usize> = fx.get("ddpm.t").iter().map(|&t| t as usize).collect();
    let (snr_ref, w5, w2) = (fx.get("ddpm.snr"), fx.get("ddpm.w_gamma5"), fx.get("ddpm.w_gamma2"));
    for (k, &t) in ts.iter().enumerate() {
        let rel = |a: f64, b: f32| (a - b as f64).abs() / (b as f64).abs();
        assert!(rel(s.snr(t), snr_ref[k]) < 1e-6, "snr({t}) {} vs {}", s.snr(t), snr_ref[k]);
        assert!(rel(s.min_snr_weight(t, Some(5.0)), w5[k]) < 1e-6, "w_γ5({t}) {} vs {}", s.min_snr_weight(t, Some(5.0)), w5[k]);
        assert!(rel(s.min_snr_weight(t, Some(2.0)), w2[k]) < 1e-6, "w_γ2({t}) {} vs {}", s.min_snr_weight(t, Some(2.0)), w2[k]);
        assert_eq!(s.min_snr_weight(t, None), 1.0);
    }
    // A few values to read: ᾱ at both ends, and where Min-SNR(γ=5) starts to weigh down.
    assert!((s.alpha_bar(0) - 0.99915).abs() < 1e-7 && (s.alpha_bar(999) - 0.0046).abs() < 1e-4);
    let x0 = fx.get("ddpm.add_noise.x0");
    let eps = fx.get("ddpm.add_noise.eps");
    let expected = fx.get("ddpm.add_noise.out");
    let per = x0.len() / 3;
    let mut out = vec![0f32; x0.len()];
    for (b, &t) in fx.get("ddpm.add_noise.t").iter().enumerate() {
        let r = b * per..(b + 1) * per;
        s.add_noise(&x0[r.clone()], &eps[r.clone()], t as usize, &mut out[r]);
    }
    // torch's f32 `** 0.5` is not always the correctly rounded √ (1 ulp off at t = 500, 998).
    let c = compare(&out, &expected);
    assert!(c.within(1e-6), "add_noise: rel L2 {:.3e}", c.rel_l2);
}

#[test]
fn unknown_names_list_the_valid_ones() {
    let err = scheduler_by_name("k_lms", 30).err().expect("k_lms is not supported").to_string();
    assert!(err.contains("k_lms") && SCHEDULER_NAMES.iter().all(|n| err.contains(n)), "{err}");
    for name in SCHEDULER_NAMES {
        let s = scheduler_by_name(name, 30).unwrap();
        assert_eq!(s.name(), name);
    }
    assert!(Spacing::from_name("uniform").unwrap_err().to_string().contains("leading, linspace, trailing"));
    assert!(scheduler_by_name("ddim", 0).is_err() && scheduler_by_name("ddim", 1001).is_err());
}

#[test]
fn evaluation_counts_and_sd15_defaults() {
    // PNDM evaluates the UNet N+1 times (its second-highest timestep twice); the others N times.
    let pndm = scheduler_by_name("pndm", 30).unwrap();
    assert_eq!(pndm.timesteps().len(), 31);
    assert_eq!(&pndm.timesteps()[..4], &[958.0, 925.0, 925.0, 892.0]);
    assert_eq!(*pndm.timesteps().last().unwrap(), 1.0);
    for name in ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] {
        assert_eq!(scheduler_by_name(name, 30).unwrap().timesteps().len(), 30, "{name}");
    }
    // Euler's default (linspace) timesteps are fractional and reach the UNet as such.
    let euler = scheduler_by_name("euler", 30).unwrap();
    assert!(euler.timesteps()[1].fract() != 0.0, "{:?}", &euler.timesteps()[..3]);
}
