//! `sdlora compare RUN...`: training runs side by side, from each output folder's summary.json
//! and the config.toml of its last checkpoint.

use super::config::TrainConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

struct Run {
    name: String,
    summary: serde_json::Value,
    config: Option<TrainConfig>,
}

fn read_run(dir: &Path) -> Result<Run> {
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: no summary.json (has this run finished?)", dir.display()))?;
    let summary = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let last_checkpoint: Option<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step_") && !n.ends_with(".partial")))
        .max_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n[5..].parse::<usize>().ok()).unwrap_or(0));
    let config = last_checkpoint.and_then(|c| TrainConfig::from_file(&c.join("config.toml")).ok());
    Ok(Run { name: dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()), summary, config })
}

/// The comparison table as text.
pub fn compare(dirs: &[PathBuf]) -> Result<String> {
    let runs: Vec<Run> = dirs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let mut out = format!(
        "{:<22} {:>6} {:>9} {:>7} {:>11} {:>11} {:>9} {:>10}\n",
        "run", "steps", "lr", "γ", "final loss", "mean loss", "time s", "peak VRAM"
    );
    for r in &runs {
        let f = |k: &str| r.summary.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let (lr, gamma) = match &r.config {
            Some(c) => (format!("{:.0e}", c.lr), c.snr_gamma.value().map_or("none".into(), |g| format!("{g}"))),
            None => ("?".into(), "?".into()),
        };
        out += &format!(
            "{:<22} {:>6} {:>9} {:>7} {:>11.5} {:>11.5} {:>9.1} {:>7.2} GiB\n",
            r.name,
            f("steps"),
            lr,
            gamma,
            f("final_loss"),
            f("mean_loss"),
            f("seconds"),
            f("peak_vram_bytes") / (1u64 << 30) as f64
        );
    }
    Ok(out)
}
