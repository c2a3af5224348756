//! Event profiler: a pair of CUDA events around every launch while profiling is on, summed per
//! kernel name after a synchronize. Adds two event records per launch; off by default.

use anyhow::Result;
use cudarc::driver::CudaEvent;
use std::collections::HashMap;
use std::fmt;

#[derive(Default)]
pub(super) struct Profiler {
    launches: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

/// Time spent in one kernel across the profiled launches.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub name: &'static str,
    pub calls: usize,
    pub total_ms: f64,
}

impl KernelTiming {
    pub fn mean_ms(&self) -> f64 {
        self.total_ms / self.calls as f64
    }
}

impl Profiler {
    pub fn push(&mut self, name: &'static str, (start, end): (CudaEvent, CudaEvent)) {
        self.launches.push((name, start, end));
    }

    /// Per-kernel totals, slowest first. The stream must have been synchronized.
    pub fn summarize(self) -> Result<Vec<KernelTiming>> {
        let mut by_name: HashMap<&'static str, KernelTiming> = HashMap::new();
        for (name, start, end) in &self.launches {
            let ms = start.elapsed_ms(end)? as f64;
            let t = by_name.entry(name).or_insert(KernelTiming { name, calls: 0, total_ms: 0.0 });
            t.calls += 1;
            t.total_ms += ms;
        }
        let mut rows: Vec<KernelTiming> = by_name.into_values().collect();
        rows.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        Ok(rows)
    }
}

/// A printable table of kernel timings.
pub struct TimingTable<'a>(pub &'a [KernelTiming]);

impl fmt::Display for TimingTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: f64 = self.0.iter().map(|t| t.total_ms).sum();
        writeln!(f, "{:<40} {:>7} {:>11} {:>10} {:>6}", "kernel", "calls", "total ms", "mean ms", "%")?;
        for t in self.0 {
            let pct = if total > 0.0 { 100.0 * t.total_ms / total } else { 0.0 };
            writeln!(f, "{:<40} {:>7} {:>11.3} {:>10.4} {:>6.1}", t.name, t.calls, t.total_ms, t.mean_ms(), pct)?;
        }
        write!(f, "{:<40} {:>7} {:>11.3}", "total", self.0.iter().map(|t| t.calls).sum::<usize>(), total)
    }
}
