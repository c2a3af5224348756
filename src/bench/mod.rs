//! Benchmark timing: CUDA events around repeated launches after warm-up; medians and spread.

use crate::cuda::Gpu;
use anyhow::Result;
use cudarc::driver::sys::CUevent_flags;

/// Milliseconds per call over the timed repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub reps: usize,
}

/// Times `f` (which enqueues GPU work) `reps` times after `warmup` calls; each repetition is
/// bracketed by its own pair of CUDA events.
pub fn time_gpu(gpu: &Gpu, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    gpu.synchronize()?;
    let stream = gpu.stream();
    let mut events = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        events.push((start, end));
    }
    gpu.synchronize()?;
    let mut ms: Vec<f64> = events.iter().map(|(s, e)| s.elapsed_ms(e).map(|v| v as f64)).collect::<Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(Timing { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], reps })
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.4} ms (min {:.4}, max {:.4}, n={})", self.median_ms, self.min_ms, self.max_ms, self.reps)
    }
}

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod unet;

/// One benchmark result row: a kernel at a shape, with its achieved throughput.
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    pub timing: Timing,
    /// Achieved rate in the row's unit (GB/s for memory-bound kernels, TFLOP/s for compute-bound).
    pub rate: f64,
    pub unit: &'static str,
}

impl BenchRow {
    pub fn print_header() {
        println!("{:<28} {:<28} {:>10} {:>10} {:>10} {:>10}", "kernel", "shape", "median ms", "min ms", "max ms", "rate");
    }
    pub fn print(&self) {
        let t = &self.timing;
        println!(
            "{:<28} {:<28} {:>10.4} {:>10.4} {:>10.4} {:>8.1} {}",
            self.kernel, self.shape, t.median_ms, t.min_ms, t.max_ms, self.rate, self.unit
        );
    }
}

type BenchFn = fn(&Gpu) -> Result<Vec<BenchRow>>;

/// The kernel families `sdlora bench kernels` knows, by name.
const FAMILIES: &[(&str, BenchFn)] = &[("elementwise", elementwise::bench), ("conv", conv::bench), ("attention", attention::bench), ("norm", norm::bench), ("norm_dram", norm::bench_dram), ("gemm", gemm::bench), ("gemm_split", gemm::bench_split)];

/// Runs the benchmark of every kernel family whose name contains `filter` and prints a table.
pub fn run_kernel_benches(gpu: &Gpu, filter: &str) -> Result<()> {
    println!("device: {}", gpu.name()?);
    BenchRow::print_header();
    for (family, bench) in FAMILIES {
        if family.contains(filter) {
            bench(gpu)?.iter().for_each(BenchRow::print);
        }
    }
    Ok(())
}
