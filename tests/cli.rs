//! The command line as a user meets it: help texts, and one clear line when there is no GPU.

use std::process::Command;

/// The binary under test: `$SDLORA_BIN` (set by scripts/gpu-test.sh on a machine without cargo),
/// else the one cargo built.
fn sdlora(args: &[&str]) -> (bool, String, String) {
    let bin = std::env::var("SDLORA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sdlora").into());
    let out = Command::new(&bin).args(args).output().unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn every_subcommand_has_help() {
    for (args, expect) in [
        (vec!["--help"], "train"),
        (vec!["train", "--help"], "Min-SNR"),
        (vec!["sample", "--help"], "guidance"),
        (vec!["bench", "--help"], "kernels"),
        (vec!["info", "--help"], "embedded kernels"),
    ] {
        let (ok, stdout, _) = sdlora(&args);
        assert!(ok, "sdlora {args:?} failed");
        assert!(stdout.contains(expect), "sdlora {args:?} help lacks {expect:?}:\n{stdout}");
    }
}

#[test]
fn info_lists_the_embedded_kernels() {
    let (ok, stdout, _) = sdlora(&["info"]);
    assert!(ok);
    assert!(stdout.contains("kernels/elementwise.cu") || stdout.contains("built without nvcc"), "{stdout}");
}

#[test]
fn gpu_command_without_gpu_prints_one_clear_line() {
    let (_, info, _) = sdlora(&["info"]);
    if !info.contains("gpu: none usable") {
        return; // a GPU is present: the no-GPU path cannot be exercised here
    }
    let (ok, stdout, stderr) = sdlora(&["bench", "kernels"]);
    assert!(!ok, "bench without a GPU must fail");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "expected one line, got:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}
