//! `sdlora train` end to end on the CPU with the tiny fixture model: checkpoints, resume, reload.

use sdlora::checkpoint::{load_lora, DIFFUSERS_FILE, KOHYA_FILE};
use std::path::{Path, PathBuf};
use std::process::Command;

fn train(out: &Path, extra: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/tiny-sd");
    let data = root.join("data/cheburashka");
    let mut args = vec!["train", "--cpu", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--resolution", "32", "--rank", "4", "--alpha", "4", "--lr", "1e-3", "--save-every", "2", "--log-every", "1", "--save-format", "both"]);
    args.extend(extra);
    let bin = std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into());
    let o = Command::new(bin).args(&args).output().expect("run sdlora train");
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "sdlora train {args:?} failed:\n{stderr}");
    stderr
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdlora-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The per-step losses printed by a run ("step N/M: loss L, ...").
fn losses(log: &str) -> Vec<(usize, String)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| {
            let (step, rest) = l.split_once('/')?;
            Some((step.parse().ok()?, rest.split("loss ").nth(1)?.split(',').next()?.to_string()))
        })
        .collect()
}

#[test]
fn trains_saves_resumes_and_reloads() {
    let straight = temp("straight");
    let log = train(&straight, &["--steps", "4", "--validation-prompt", "<cheburashka> waving", "--validation-every", "2", "--validation-steps", "2"]);
    let full = losses(&log);
    assert_eq!(full.len(), 4, "{log}");
    for step in [2, 4] {
        let dir = straight.join(format!("step_{step}"));
        for f in [DIFFUSERS_FILE, KOHYA_FILE, "config.toml", "optimizer.safetensors", "validation.png"] {
            assert!(dir.join(f).is_file(), "{} missing", dir.join(f).display());
        }
    }
    assert!(std::fs::read_dir(straight.join("logs")).unwrap().count() == 1, "one TensorBoard event file");
    assert!(straight.join("summary.json").is_file());

    // Stop at 2, resume to 4: the same losses and bit-identical final weights.
    let split = temp("split");
    train(&split, &["--steps", "2"]);
    let resumed = train(&split, &["--steps", "4", "--resume", split.join("step_2").to_str().unwrap()]);
    assert_eq!(losses(&resumed), full[2..].to_vec(), "resumed run diverged:\n{resumed}");
    let a = load_lora(&straight.join("step_4").join(DIFFUSERS_FILE)).unwrap().weights;
    let b = load_lora(&split.join("step_4").join(DIFFUSERS_FILE)).unwrap().weights;
    assert_eq!(a, b, "resume must continue the same run");
    // Both formats hold the same trained values, and training moved them.
    let kohya = load_lora(&straight.join("step_4").join(KOHYA_FILE)).unwrap().weights;
    assert_eq!(a, kohya);
    assert!(a.layers.values().any(|l| l.b.iter().any(|v| *v != 0.0)), "B starts at zero and must have been trained");

    // The two runs side by side.
    let bin = std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into());
    let o = Command::new(bin).args(["compare", straight.to_str().unwrap(), split.to_str().unwrap()]).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && table.lines().count() == 3, "{table}");
    assert!(table.contains(&full[3].1[..6]), "final loss of the run in the table:\n{table}");
}

#[test]
fn bad_input_is_one_clear_error() {
    let out = temp("bad");
    let bin = std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into());
    let o = Command::new(bin).args(["train", "--cpu", "--model", "/nonexistent/model", "--data", "data/cheburashka", "--out", out.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("/nonexistent/model") && err.starts_with("error: "), "{err}");
    // GPU-only options on the CPU: one line naming the flag, before any output is written.
    for flag in ["--adamw-8bit", "--adamw-per-layer"] {
        let out = temp(flag.trim_start_matches('-'));
        let o = Command::new(std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into()))
            .args(["train", "--cpu", "--model", "tests/fixtures/tiny-sd", "--data", "data/cheburashka", "--out", out.to_str().unwrap(), flag])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.starts_with("error: ") && err.contains(flag), "{flag}: {err}");
        assert!(!out.exists(), "{flag}: the failed run left {}", out.display());
    }
}
