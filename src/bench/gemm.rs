//! GEMM and fused LoRA benchmarks at SD1.5 shapes (bf16, 512 px): TFLOP/s.
//!
//! Rows: `linear` (x·Wᵀ, the launcher's tile choice) and `linear_tile<BM>x<BN>` (each tile forced,
//! for tuning the choice), `linear_input_grad` (dy·W) and `linear_input_grad_tile<BM>x<BN>`, and the fused LoRA linear at r = 128:
//! `lora_fwd`, `lora_bwd` (u saved), `lora_fwd_bwd` (both, u saved) and `lora_fwd_bwd_recompute`
//! (u dropped after the forward and recomputed in the backward: one more x·Aᵀ GEMM, M·r·2 bytes
//! less to keep), and the weight gradients dA, dB alone with split-K through f32 atomics
//! (`lora_grads_atomic`) or a workspace and one reduction (`lora_grads_workspace`, the one used).
//! On a Hopper GPU, `linear_sm90_*` / `linear_input_grad_sm90_*` force each wgmma kernel and tile.
//! benches/torch_gemm.py times the same shapes with cuBLAS through PyTorch.

use super::{BenchRow, Timing};
use crate::cuda::{ArenaKind::Persistent, Gpu, KernelArg, LaunchConfig};
use crate::ops::gemm_sm90;
use crate::ops::gemm::{self, AtB, GemmCall, Layouts, Segment, SplitK, WeightGradSplit, TILES};
use crate::ops::lora::{self, LoraBackwardOut, LoraLinear};
use crate::tensor::{DType, Tensor};
use anyhow::Result;

/// (M, in, out) of the linears timed: batch 2 (and the reference's batch-1 shapes) at every level.
pub const LINEAR_SHAPES: [(usize, usize, usize); 17] = [
    (8192, 320, 2560),
    (4096, 320, 320),
    (4096, 320, 2560),
    (8192, 320, 320),
    (8192, 1280, 320),
    (1024, 640, 5120),
    (2048, 640, 640),
    (2048, 640, 5120),
    (2048, 2560, 640),
    (512, 1280, 1280),
    (512, 1280, 10240),
    (512, 5120, 1280),
    (128, 1280, 1280),
    (64, 1280, 1280),
    (154, 768, 320),
    (154, 768, 1280),
    (2, 1280, 1280),
];

/// (M, in, out) of the LoRA'd attention projections (r = 128): self-attention d→d, cross to_k/to_v.
pub const LORA_SHAPES: [(usize, usize, usize); 9] = [
    (4096, 320, 320),
    (8192, 320, 320),
    (1024, 640, 640),
    (2048, 640, 640),
    (512, 1280, 1280),
    (128, 1280, 1280),
    (154, 768, 320),
    (154, 768, 640),
    (154, 768, 1280),
];
pub const LORA_RANK: usize = 128;

const WARMUP: usize = 10;
const REPS: usize = 50;
/// Clock cycles the spin kernel holds the GPU (~20 ms): longer than the host needs to queue REPS reps.
const SPIN_CYCLES: i64 = 40_000_000;

/// Like `bench::time_gpu` (an event pair around each repetition, median), but the repetitions are
/// queued behind a spin kernel, so each pair measures GPU time only: the host's launch latency
/// (~15-20 µs per launch on the benchmark machine, longer than many of these kernels) is hidden,
/// as it is when the training step runs as a CUDA graph.
fn time_queued(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    for _ in 0..WARMUP {
        f()?;
    }
    gpu.synchronize()?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    gpu.launch("gemm", "gemm_bench_spin", one, &[KernelArg::I64(SPIN_CYCLES)])?;
    let stream = gpu.stream();
    let mut events = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = stream.record_event(Some(CU_EVENT_DEFAULT))?;
        f()?;
        events.push((start, stream.record_event(Some(CU_EVENT_DEFAULT))?));
    }
    gpu.synchronize()?;
    let mut ms: Vec<f64> = events.iter().map(|(s, e)| s.elapsed_ms(e).map(|v| v as f64)).collect::<Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(Timing { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], reps })
}

fn tflops(flop: f64, t: &Timing) -> f64 {
    flop / t.median_ms / 1e9
}

fn buf(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let t = Tensor::empty_gpu(gpu, Persistent, shape, dtype)?;
    // Deterministic small values: bf16 0x3C00 pairs ≈ 0.0078 — no NaN/inf slowing anything down.
    unsafe { cudarc::driver::result::memset_d8_async(t.ptr()?, 0x3C, t.numel() * dtype.size(), gpu.stream().cu_stream()) }?;
    Ok(t)
}

pub fn bench(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (m, k, n) in LINEAR_SHAPES {
        let x = buf(gpu, &[m, k], DType::BF16)?;
        let w = buf(gpu, &[n, k], DType::BF16)?;
        let mut y = buf(gpu, &[m, n], DType::BF16)?;
        let flop = 2.0 * (m * k * n) as f64;
        let shape = format!("{m}x{k}->{n}");
        let t = time_queued(gpu, REPS, || gemm::linear(gpu, &x, &w, None, None, &mut y))?;
        rows.push(BenchRow { kernel: "linear".into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        let call = GemmCall { layouts: Layouts::Kk, m, n, seg1: Segment { a: x.ptr()?, lda: k, b: w.ptr()?, ldb: k, k }, seg2: Segment::default(), c: y.ptr()?, ldc: n, out: DType::BF16, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
        for tile in TILES {
            let t = time_queued(gpu, REPS, || gemm::gemm_with_tile(gpu, &call, tile))?;
            let kernel = format!("linear_tile{}x{}", tile.0, tile.1);
            rows.push(BenchRow { kernel, shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        }
        rows.extend(bench_sm90(gpu, "linear", &shape, flop, &call)?);
        let dy = buf(gpu, &[m, n], DType::BF16)?;
        let mut dx = buf(gpu, &[m, k], DType::BF16)?;
        let t = time_queued(gpu, REPS, || gemm::linear_input_grad(gpu, &dy, &w, false, &mut dx))?;
        rows.push(BenchRow { kernel: "linear_input_grad".into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        let call = GemmCall { layouts: Layouts::Kn, m, n: k, seg1: Segment { a: dy.ptr()?, lda: n, b: w.ptr()?, ldb: k, k: n }, seg2: Segment::default(), c: dx.ptr()?, ldc: k, out: DType::BF16, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
        for tile in TILES {
            let t = time_queued(gpu, REPS, || gemm::gemm_with_tile(gpu, &call, tile))?;
            let kernel = format!("linear_input_grad_tile{}x{}", tile.0, tile.1);
            rows.push(BenchRow { kernel, shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        }
        rows.extend(bench_sm90(gpu, "linear_input_grad", &shape, flop, &call)?);
    }
    for (m, k, n) in LORA_SHAPES {
        rows.extend(bench_lora(gpu, m, k, n, LORA_RANK)?);
    }
    Ok(rows)
}

/// Rows `<what>_sm90_tile<BM>x<BN>` (cp.async kernels) and `<what>_sm90_tma<BM>x<BN>_s<stages>[_p]`
/// (TMA kernels): the Hopper wgmma kernels (ops::gemm_sm90), each forced
/// (none on other GPUs; the row `<what>` is the launcher's choice, which takes them on a Hopper).
fn bench_sm90(gpu: &Gpu, what: &str, shape: &str, flop: f64, call: &GemmCall) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    if !gemm_sm90::supports(gpu, call)? {
        return Ok(rows);
    }
    for tile in gemm_sm90::SM90_TILES {
        let t = time_queued(gpu, REPS, || gemm_sm90::gemm_sm90(gpu, call, Some(tile)))?;
        let kernel = format!("{what}_sm90_{}", tile.label());
        rows.push(BenchRow { kernel, shape: shape.into(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
    }
    Ok(rows)
}

fn bench_lora(gpu: &Gpu, m: usize, in_f: usize, out_f: usize, r: usize) -> Result<Vec<BenchRow>> {
    let (w, bias) = (buf(gpu, &[out_f, in_f], DType::BF16)?, buf(gpu, &[out_f], DType::BF16)?);
    let (a, b) = (buf(gpu, &[r, in_f], DType::BF16)?, buf(gpu, &[out_f, r], DType::BF16)?);
    let l = LoraLinear { w: &w, bias: Some(&bias), a: &a, b: &b, scale: 1.0 };
    let x = buf(gpu, &[m, in_f], DType::BF16)?;
    let dy = buf(gpu, &[m, out_f], DType::BF16)?;
    let (mut us, mut vs) = (buf(gpu, &[m, r], DType::BF16)?, buf(gpu, &[m, r], DType::BF16)?);
    let mut y = buf(gpu, &[m, out_f], DType::BF16)?;
    let mut dx = buf(gpu, &[m, in_f], DType::BF16)?;
    let (mut da, mut db) = (buf(gpu, &[r, in_f], DType::F32)?, buf(gpu, &[out_f, r], DType::F32)?);
    let (mf, i, o, rf) = (m as f64, in_f as f64, out_f as f64, r as f64);
    let down = 2.0 * mf * i * rf;
    let fwd = down + 2.0 * mf * (i + rf) * o;
    let bwd = 2.0 * mf * (o * rf + (o + rf) * i + o * rf + rf * i);
    let shape = format!("{m}x{in_f}->{out_f} r{r}");

    let mut backward = |us: &Tensor| -> Result<()> {
        let out = LoraBackwardOut { dx: &mut dx, da: &mut da, db: &mut db, vs: &mut vs };
        lora::lora_backward(gpu, &l, &x, us, &dy, out, false, true)
    };
    let t_fwd = time_queued(gpu, REPS, || lora::lora_forward(gpu, &l, &x, &mut us, None, &mut y))?;
    let t_bwd = time_queued(gpu, REPS, || backward(&us))?;
    let t_both = time_queued(gpu, REPS, || {
        lora::lora_forward(gpu, &l, &x, &mut us, None, &mut y)?;
        backward(&us)
    })?;
    // Recompute policy: the forward's u goes to a temporary (here the same buffer, rewritten), and
    // the backward first runs x·Aᵀ again.
    let t_recompute = time_queued(gpu, REPS, || {
        lora::lora_forward(gpu, &l, &x, &mut us, None, &mut y)?;
        lora::lora_down(gpu, &l, &x, &mut us)?;
        backward(&us)
    })?;
    if [(4096, 320, 320), (154, 768, 1280)].contains(&(m, in_f, out_f)) {
        // Where the time of one forward + backward goes, kernel by kernel (queued, GPU time).
        gpu.synchronize()?;
        gpu.start_profiling();
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        gpu.launch("gemm", "gemm_bench_spin", one, &[KernelArg::I64(SPIN_CYCLES)])?;
        for _ in 0..REPS {
            lora::lora_forward(gpu, &l, &x, &mut us, None, &mut y)?;
            backward(&us)?;
        }
        println!("lora fwd+bwd {shape}, {REPS} reps, per kernel:\n{}", crate::cuda::TimingTable(&gpu.stop_profiling()?));
    }
    // The weight gradients alone (dB = dyᵀ·u_s, dA = v_sᵀ·x), split-K with atomics vs workspace.
    let grads = [
        AtB { a: (dy.ptr()?, out_f), b: (us.ptr()?, r), m, p: out_f, q: r, alpha: 1.0, c: db.ptr()? },
        AtB { a: (vs.ptr()?, r), b: (x.ptr()?, in_f), m, p: r, q: in_f, alpha: 1.0, c: da.ptr()? },
    ];
    let grads_with = |how| gemm::at_b_many(gpu, &grads, true, how);
    let t_grads_atomic = time_queued(gpu, REPS, || grads_with(WeightGradSplit::Atomic))?;
    let t_grads_ws = time_queued(gpu, REPS, || grads_with(WeightGradSplit::Workspace))?;
    let grad_flop = 2.0 * mf * (o * rf + rf * i);
    let row = |kernel: &str, flop: f64, t: Timing| BenchRow { kernel: kernel.into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t };
    Ok(vec![
        row("lora_fwd", fwd, t_fwd),
        row("lora_bwd", bwd, t_bwd),
        row("lora_fwd_bwd", fwd + bwd, t_both),
        row("lora_fwd_bwd_recompute", fwd + bwd + down, t_recompute),
        row("lora_grads_atomic", grad_flop, t_grads_atomic),
        row("lora_grads_workspace", grad_flop, t_grads_ws),
    ])
}
