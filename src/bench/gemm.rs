//! GEMM and fused LoRA benchmarks at SD1.5 shapes (bf16, 512 px): TFLOP/s.
//!
//! Rows: `linear` (x·Wᵀ, the launcher's tile choice) and `linear_tile<BM>x<BN>` (each tile forced,
//! for tuning the choice), `linear_input_grad` (dy·W) and `linear_input_grad_tile<BM>x<BN>`, and the fused LoRA linear at r = 128:
//! `lora_fwd`, `lora_bwd` (u saved), `lora_fwd_bwd` (both, u saved) and `lora_fwd_bwd_recompute`
//! (u dropped after the forward and recomputed in the backward: one more x·Aᵀ GEMM, M·r·2 bytes
//! less to keep), and the weight gradients dA, dB alone with split-K through f32 atomics
//! (`lora_grads_atomic`) or a workspace and one reduction (`lora_grads_workspace`, the one used).
//! On a Hopper GPU, `linear_sm90_*` / `linear_input_grad_sm90_*` force each wgmma kernel and tile,
//! and `lora_grads_sm90` is the weight gradients on the wgmma kernels with in-kernel split-K
//! (`at_b_many_sm90`, forced: the step's default keeps `lora_grads_workspace`).
//! Family `gemm_split` ([`bench_split`]): the weight gradients and the small-M deep-K GEMMs of the
//! training step, old path vs the sm90 split kernels (launcher's choice and each tile × slices).
//! benches/torch_gemm.py times the same shapes with cuBLAS through PyTorch.

use super::{BenchRow, Timing};
use crate::cuda::{ArenaKind::Persistent, Gpu, KernelArg, LaunchConfig};
use crate::ops::gemm_sm90_split::GroupGemm;
use crate::ops::{gemm_sm90, gemm_sm90_split};
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
    let (mut us, vs) = (buf(gpu, &[m, r], DType::BF16)?, buf(gpu, &[m, r], DType::BF16)?);
    let mut y = buf(gpu, &[m, out_f], DType::BF16)?;
    let mut dx = buf(gpu, &[m, in_f], DType::BF16)?;
    let (da, db) = (buf(gpu, &[r, in_f], DType::F32)?, buf(gpu, &[out_f, r], DType::F32)?);
    let (mf, i, o, rf) = (m as f64, in_f as f64, out_f as f64, r as f64);
    let down = 2.0 * mf * i * rf;
    let fwd = down + 2.0 * mf * (i + rf) * o;
    let bwd = 2.0 * mf * (o * rf + (o + rf) * i + o * rf + rf * i);
    let shape = format!("{m}x{in_f}->{out_f} r{r}");

    let mut backward = |us: &Tensor| -> Result<()> {
        let out = LoraBackwardOut { dx: &mut dx, da: &da, db: &db, vs: &vs, vs_ready: false };
        let mut grads = lora::WeightGradBatch::default();
        lora::lora_backward(gpu, &l, &x, us, &dy, out, false, true, &mut grads)?;
        grads.finish(gpu)
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
    let t_grads_sm90 = time_queued(gpu, REPS, || gemm::at_b_many_sm90(gpu, &grads, true).map(|_| ()))?;
    // An attention block's four layers (eight products, own outputs) in one grouped launch, and
    // the same eight as four pairs on the sm_80 kernels (the path without the grouped kernel).
    let outputs: Vec<(Tensor, Tensor)> = (0..4).map(|_| Ok((buf(gpu, &[r, in_f], DType::F32)?, buf(gpu, &[out_f, r], DType::F32)?))).collect::<Result<_>>()?;
    let mut eight = Vec::new();
    for (da4, db4) in &outputs {
        eight.push(AtB { c: db4.ptr()?, ..grads[0] });
        eight.push(AtB { c: da4.ptr()?, ..grads[1] });
    }
    let queued: Vec<GroupGemm> = eight.iter().map(|p| GroupGemm::at_b(p, true)).collect();
    let t_group = if gemm_sm90_split::supports_group(gpu, Layouts::Mn, DType::F32, &queued)? {
        Some(time_queued(gpu, REPS, || gemm_sm90_split::gemm_group(gpu, Layouts::Mn, DType::F32, &queued))?)
    } else {
        None
    };
    let t_pairs = time_queued(gpu, REPS, || eight.chunks(2).try_for_each(|pair| gemm::at_b_many(gpu, pair, true, WeightGradSplit::Workspace)))?;
    let grad_flop = 2.0 * mf * (o * rf + rf * i);
    let row = |kernel: &str, flop: f64, t: Timing| BenchRow { kernel: kernel.into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t };
    Ok(vec![
        row("lora_fwd", fwd, t_fwd),
        row("lora_bwd", bwd, t_bwd),
        row("lora_fwd_bwd", fwd + bwd, t_both),
        row("lora_fwd_bwd_recompute", fwd + bwd + down, t_recompute),
        row("lora_grads_atomic", grad_flop, t_grads_atomic),
        row("lora_grads_workspace", grad_flop, t_grads_ws),
        row("lora_grads_sm90", grad_flop, t_grads_sm90),
        row("lora_grads_x4_pairs", 4.0 * grad_flop, t_pairs),
    ]
    .into_iter()
    .chain(t_group.map(|t| row("lora_grads_x4_group", 4.0 * grad_flop, t)))
    .collect())
}

/// (tokens, p, q) of the LoRA weight gradients of one 512 px step (r = 128, batch 1): dB [d, r] and
/// dA [r, d] at each level, and the cross-attention to_k/to_v's dA [r, 768] on the 77 context tokens.
const WGRAD_SHAPES: [(usize, usize, usize); 14] = [
    (4096, 320, 128),
    (4096, 128, 320),
    (1024, 640, 128),
    (1024, 128, 640),
    (256, 1280, 128),
    (256, 128, 1280),
    (64, 1280, 128),
    (64, 128, 1280),
    (77, 320, 128),
    (77, 640, 128),
    (77, 1280, 128),
    (77, 128, 768),
    (8192, 320, 128),
    (8192, 128, 320),
];

/// (layouts, m, k, n) of the small-M deep-K GEMMs the step splits (time embedding, 8×8 and 16×16
/// levels, the 77-token context, u = x·Aᵀ and v = dy·B at r = 128), and four larger outputs that
/// decide where splitting stops paying.
const SPLIT_SHAPES: [(Layouts, usize, usize, usize); 17] = [
    (Layouts::Kk, 1, 1280, 1280),
    (Layouts::Kk, 1, 1280, 320),
    (Layouts::Kk, 64, 1280, 1280),
    (Layouts::Kk, 64, 5120, 1280),
    (Layouts::Kk, 77, 768, 320),
    (Layouts::Kk, 77, 768, 1280),
    (Layouts::Kk, 1024, 640, 128),
    (Layouts::Kk, 256, 1280, 128),
    (Layouts::Kn, 64, 1280, 1280),
    (Layouts::Kn, 64, 10240, 1280),
    (Layouts::Kn, 1024, 640, 128),
    (Layouts::Kn, 256, 1280, 128),
    (Layouts::Kn, 64, 1280, 128),
    (Layouts::Kk, 256, 1280, 1280),
    (Layouts::Kk, 256, 5120, 1280),
    (Layouts::Kn, 256, 10240, 1280),
    (Layouts::Kk, 512, 5120, 1280),
];

/// Slice counts of the sweep rows.
const SWEEP_SLICES: [usize; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64];

/// Family `gemm_split`: rows `wgrad_old` (sm_80 kernels, workspace + reduction), `wgrad_sm90`
/// (`at_b_many_sm90`: the launcher's tile and slices) and `wgrad_<tile>_s<S>` per weight-gradient shape; `split_old`
/// (`gemm_before_split_kernels`: sm_80 split + finish, or the plain sm90 kernels), `split_sm90_plain` (the unsplit sm90
/// kernels), `split_sm90` (the launcher: `gemm`) and `split_<tile>_s<S>` per split shape.
pub fn bench_split(gpu: &Gpu) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    if !gpu.is_hopper()? {
        return Ok(rows);
    }
    let sweep = |rows: &mut Vec<BenchRow>, what: &str, shape: &str, flop: f64, call: &GemmCall| -> Result<()> {
        let kt = gemm_sm90_split::k_tiles(call);
        for tile in gemm_sm90_split::SPLIT_TILES {
            let mut counts: Vec<usize> = SWEEP_SLICES.iter().map(|&s| gemm_sm90_split::even_slices(kt, s)).collect();
            counts.dedup();
            for s in counts {
                let t = time_queued(gpu, REPS, || gemm_sm90_split::launch(gpu, call, tile, s))?;
                rows.push(BenchRow { kernel: format!("{what}_{}_s{s}", tile.label()), shape: shape.into(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
            }
        }
        Ok(())
    };
    for (m, p, q) in WGRAD_SHAPES {
        let (a, b, c) = (buf(gpu, &[m, p], DType::BF16)?, buf(gpu, &[m, q], DType::BF16)?, buf(gpu, &[p, q], DType::F32)?);
        let pr = AtB { a: (a.ptr()?, p), b: (b.ptr()?, q), m, p, q, alpha: 1.0, c: c.ptr()? };
        let (shape, flop) = (format!("{m}: {p}x{q}"), 2.0 * (m * p * q) as f64);
        let paths: [(&str, &dyn Fn() -> Result<()>); 2] = [
            ("wgrad_old", &|| gemm::at_b_many(gpu, &[pr], true, WeightGradSplit::Workspace)),
            ("wgrad_sm90", &|| gemm::at_b_many_sm90(gpu, &[pr], true).map(|_| ())),
        ];
        for (what, f) in paths {
            let t = time_queued(gpu, REPS, f)?;
            rows.push(BenchRow { kernel: what.into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        }
        let call = GemmCall { layouts: Layouts::Mn, m: p, n: q, seg1: Segment { a: pr.a.0, lda: p, b: pr.b.0, ldb: q, k: m }, seg2: Segment::default(), c: pr.c, ldc: q, out: DType::F32, bias: None, residual: Some((pr.c, q)), alpha: 1.0, split: SplitK::None };
        sweep(&mut rows, "wgrad", &shape, flop, &call)?;
    }
    for (layouts, m, k, n) in SPLIT_SHAPES {
        let x = buf(gpu, &[m, k], DType::BF16)?;
        let w = buf(gpu, &[n, k], DType::BF16)?;
        let y = buf(gpu, &[m, n], DType::BF16)?;
        let ldb = if layouts == Layouts::Kk { k } else { n };
        let call = GemmCall { layouts, m, n, seg1: Segment { a: x.ptr()?, lda: k, b: w.ptr()?, ldb, k }, seg2: Segment::default(), c: y.ptr()?, ldc: n, out: DType::BF16, bias: None, residual: None, alpha: 1.0, split: SplitK::None };
        let (shape, flop) = (format!("{}{m}x{k}->{n}", if layouts == Layouts::Kk { "kk " } else { "kn " }), 2.0 * (m * k * n) as f64);
        let paths: [(&str, &dyn Fn() -> Result<()>); 3] = [
            ("split_old", &|| gemm::gemm_before_split_kernels(gpu, &call)),
            ("split_sm90_plain", &|| gemm_sm90::gemm_sm90(gpu, &call, None)),
            ("split_sm90", &|| gemm::gemm(gpu, &call)),
        ];
        for (what, f) in paths {
            let t = time_queued(gpu, REPS, f)?;
            rows.push(BenchRow { kernel: what.into(), shape: shape.clone(), rate: tflops(flop, &t), unit: "TFLOP/s", timing: t });
        }
        sweep(&mut rows, "split", &shape, flop, &call)?;
    }
    Ok(rows)
}
