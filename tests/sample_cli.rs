//! `sdlora sample` end to end on the CPU with the tiny fixture model: final latents against diffusers'
//! StableDiffusionPipeline (tests/fixtures/make_sample_fixtures.py), PNG output with its parameters
//! chunk, the labelled grid, and clear errors.

use safetensors::SafeTensors;
use sdlora::sample::png;
use std::path::{Path, PathBuf};
use std::process::Command;

/// tests/fixtures ($SDLORA_FIXTURES, else from the working directory, else from the source tree).
fn fixtures() -> PathBuf {
    sdlora::testing::fixtures_dir()
}

fn sample(args: &[String]) -> Result<String, String> {
    sample_on(true, args)
}

fn sample_on(cpu: bool, args: &[String]) -> Result<String, String> {
    let bin = std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into());
    let mut all = vec!["sample".to_string(), "--model".into(), fixtures().join("tiny-sd").display().to_string()];
    if cpu {
        all.push("--cpu".into());
    }
    all.extend_from_slice(args);
    let o = Command::new(bin).args(&all).output().expect("run sdlora sample");
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    if o.status.success() {
        Ok(stderr)
    } else {
        Err(stderr)
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdlora-sample-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn s(v: &str) -> String {
    v.to_string()
}

/// Every case of the fixture (PNDM, Euler and DPM++ 2M Karras; no LoRA, one LoRA with a negative
/// prompt and two images, two LoRAs with scales; guidance 5 and 7.5): the same initial latents give
/// diffusers' final latents.
#[test]
fn final_latents_match_diffusers() {
    check_fixture_cases(true, 2e-2);
}

fn check_fixture_cases(cpu: bool, tol: f64) {
    let dir = temp(if cpu { "parity" } else { "parity-gpu" });
    let sample_dir = fixtures().join("sample");
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(sample_dir.join("cases.json")).unwrap()).unwrap();
    let reference = sample_dir.join("reference.safetensors");
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = dir.join(format!("{name}.png"));
        let latents = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            s("--prompt"), s(case["prompt"].as_str().unwrap()),
            s("--negative-prompt"), s(case["negative"].as_str().unwrap()),
            s("--scheduler"), s(case["scheduler"].as_str().unwrap()),
            s("--steps"), case["steps"].to_string(),
            s("--guidance"), case["guidance"].to_string(),
            s("--width"), case["width"].to_string(),
            s("--height"), case["height"].to_string(),
            s("--num-images"), case["images"].to_string(),
            s("--batch-size"), s("2"),
            s("--init-latents"), sample_dir.join(format!("{name}.init.safetensors")).display().to_string(),
            s("--save-latents"), latents.display().to_string(),
            s("--out"), out.display().to_string(),
        ];
        for lora in case["loras"].as_array().unwrap() {
            args.extend([s("--lora"), format!("{}:{}", fixtures().join(lora[0].as_str().unwrap()).display(), lora[1])]);
        }
        sample_on(cpu, &args).unwrap_or_else(|e| panic!("{name}: sdlora sample failed:\n{e}"));
        let (shape, ours) = tensor(&latents, "latents");
        let (ref_shape, want) = tensor(&reference, &format!("{name}.final"));
        assert_eq!(shape, ref_shape, "{name}");
        let err = rel_l2(&ours, &want);
        eprintln!("{name} ({}): final latents rel L2 {err:.3e} vs diffusers", if cpu { "CPU" } else { "GPU" });
        assert!(err < tol && ours.iter().all(|v| v.is_finite()), "{name}: rel L2 {err:.3e}");
        if !case["loras"].as_array().unwrap().is_empty() {
            // The LoRAs merged into the weights (the default) and applied on the fly give one image.
            let fly = dir.join(format!("{name}.on-the-fly.safetensors"));
            let mut fly_args = args.clone();
            let at = fly_args.iter().position(|a| a == "--save-latents").unwrap();
            fly_args[at + 1] = fly.display().to_string();
            fly_args.push(s("--lora-on-the-fly"));
            sample_on(cpu, &fly_args).unwrap_or_else(|e| panic!("{name}: sdlora sample --lora-on-the-fly failed:\n{e}"));
            let gap = rel_l2(&ours, &tensor(&fly, "latents").1);
            eprintln!("{name}: merged vs on-the-fly LoRA, final latents rel L2 {gap:.3e}");
            assert!(gap < if cpu { 1e-4 } else { 1e-2 }, "{name}: merged and on-the-fly LoRA differ by {gap:.3e}");
        }
        if cpu && case["decode"].as_bool().unwrap() {
            // Pixels: diffusers' output_type="np" image, rounded as its numpy_to_pil does.
            let (_, image) = tensor(&reference, &format!("{name}.image"));
            let (png, text) = png::read(&out).unwrap();
            let worst = png.data.iter().zip(&image).map(|(&p, &r)| (p as f32 - (r * 255.0).round()).abs()).fold(0f32, f32::max);
            eprintln!("{name}: decoded image max |Δ| = {worst} / 255");
            assert!(worst <= 2.0, "{name}: decoded image differs by {worst} levels");
            assert!(text.unwrap().contains("Sampler: pndm"));
        }
    }
}

#[test]
fn writes_pngs_with_parameters_and_a_labelled_grid() {
    let dir = temp("png");
    let out = dir.join("cat.png");
    let lora = format!("{}:0.8", fixtures().join("tiny-sd-lora").display());
    let base = [s("--width"), s("32"), s("--height"), s("32"), s("--steps"), s("3"), s("--lora"), lora];
    let mut args = base.to_vec();
    args.extend([s("--prompt"), s("a photo of a cat"), s("--negative-prompt"), s("blurry"), s("--seed"), s("7"), s("--num-images"), s("2"), s("--scheduler"), s("euler_a")]);
    args.extend([s("--out"), out.display().to_string()]);
    sample(&args).unwrap();
    let (img0, text0) = png::read(&dir.join("cat_0.png")).unwrap();
    let (img1, text1) = png::read(&dir.join("cat_1.png")).unwrap();
    assert_eq!((img0.width, img0.height), (32, 32));
    assert_ne!(img0.data, img1.data, "seeds 7 and 8 must differ");
    let text0 = text0.unwrap();
    assert!(text0.starts_with("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: euler_a, CFG scale: 5, Seed: 7, Size: 32x32"), "{text0}");
    assert!(text0.contains("Lora: tiny-sd-lora:0.8"), "{text0}");
    assert!(text1.unwrap().contains("Seed: 8"));
    // Image 1 alone, from its own seed, is the same picture (per-image seeds, also for euler_a's noise).
    let mut again = base.to_vec();
    again.extend([s("--prompt"), s("a photo of a cat"), s("--negative-prompt"), s("blurry"), s("--seed"), s("8"), s("--scheduler"), s("euler_a")]);
    again.extend([s("--out"), dir.join("alone.png").display().to_string()]);
    sample(&again).unwrap();
    assert_eq!(png::read(&dir.join("alone.png")).unwrap().0, img1);

    // The grid: 2 prompts × 2 seeds rows, guidance 5.0 and 7.5 columns.
    let grid = dir.join("grid.png");
    let mut args = base.to_vec();
    args.extend(["--grid", "--prompt", "a cat", "--prompt", "a dog", "--seed", "1", "--seed", "2", "--guidance", "5.0", "--guidance", "7.5"].map(s));
    args.extend([s("--batch-size"), s("4"), s("--out"), grid.display().to_string()]);
    sample(&args).unwrap();
    let (g, text) = png::read(&grid).unwrap();
    let (gap, band) = (2, 11);
    assert_eq!((g.width, g.height), (2 * (32 + gap) + gap, band + 4 * (band + 32) + gap));
    let text = text.unwrap();
    assert_eq!(text.matches("Steps: 3").count(), 8, "{text}");
    assert!(text.contains("CFG scale: 7.5") && text.contains("a dog"));
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = temp("bad");
    let out = dir.join("x.png").display().to_string();
    let cases: [(Vec<String>, &str); 4] = [
        (["--prompt", "x", "--scheduler", "heun"].map(s).to_vec(), "unknown scheduler"),
        (["--prompt", "x", "--width", "30"].map(s).to_vec(), "multiples of 8"),
        (["--prompt", "x", "--width", "40", "--height", "32"].map(s).to_vec(), "multiples of 32 px"),
        (["--prompt", "x", "--lora", "/nonexistent/lora:0.5"].map(s).to_vec(), "/nonexistent/lora"),
    ];
    for (mut args, want) in cases {
        args.extend([s("--out"), out.clone()]);
        let err = sample(&args).expect_err(want);
        assert!(err.starts_with("error: ") && err.contains(want), "{want}: {err}");
    }
}

/// diffusers module path → the kohya key stem an LDM-based tool writes for it (SD1.5 numbering).
fn ldm_kohya_stem(module: &str) -> String {
    let parts: Vec<&str> = module.splitn(5, '.').collect();
    let ldm = match parts[0] {
        "down_blocks" => {
            let (b, j): (usize, usize) = (parts[1].parse().unwrap(), parts[3].parse().unwrap());
            format!("input_blocks.{}.1.{}", 3 * b + j + 1, parts[4])
        }
        "up_blocks" => {
            let (b, j): (usize, usize) = (parts[1].parse().unwrap(), parts[3].parse().unwrap());
            format!("output_blocks.{}.1.{}", 3 * b + j, parts[4])
        }
        _ => format!("middle_block.1.{}", module.splitn(4, '.').nth(3).unwrap()),
    };
    format!("lora_unet_{}", ldm.replace('.', "_"))
}

/// The fixture LoRA rewritten as another tool's kohya file (LDM names, alpha tensors, text-encoder
/// keys) gives the same latents as the original, and the skipped keys are reported once.
#[test]
fn kohya_files_with_ldm_names_give_the_same_image() {
    use safetensors::{tensor::TensorView, Dtype};
    let dir = temp("kohya");
    let original = sdlora::checkpoint::load_lora(&fixtures().join("tiny-sd-lora/pytorch_lora_weights.safetensors")).unwrap().weights;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (module, l) in &original.layers {
        let stem = ldm_kohya_stem(module);
        tensors.push((format!("{stem}.lora_down.weight"), vec![l.rank, l.in_features], l.a.clone()));
        tensors.push((format!("{stem}.lora_up.weight"), vec![l.out_features, l.rank], l.b.clone()));
        tensors.push((format!("{stem}.alpha"), vec![], vec![l.alpha]));
    }
    let te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    tensors.push((format!("{te}.lora_down.weight"), vec![1, 32], vec![0.1; 32]));
    tensors.push((format!("{te}.lora_up.weight"), vec![32, 1], vec![0.1; 32]));
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| bytemuck::cast_slice(v).to_vec()).collect();
    let views: Vec<(String, TensorView)> = tensors.iter().zip(&bytes).map(|((k, s, _), b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    let kohya = dir.join("other_tool.safetensors");
    std::fs::write(&kohya, safetensors::serialize(views, &None).unwrap()).unwrap();

    let run = |lora: &Path, name: &str| {
        let latents = dir.join(format!("{name}.safetensors"));
        let args = ["--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "2", "--lora"].map(s).into_iter()
            .chain([format!("{}:0.6", lora.display()), s("--save-latents"), latents.display().to_string(), s("--out"), dir.join(format!("{name}.png")).display().to_string()])
            .collect::<Vec<_>>();
        let log = sample(&args).unwrap();
        (log, tensor(&latents, "latents").1)
    };
    let (log, from_kohya) = run(&kohya, "kohya");
    let (_, from_diffusers) = run(&fixtures().join("tiny-sd-lora"), "diffusers");
    assert_eq!(from_kohya, from_diffusers);
    assert_eq!(log.matches("warning:").count(), 1, "{log}");
    assert!(log.contains("skipped 2 text-encoder key(s)"), "{log}");
}
