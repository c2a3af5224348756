//! Fused LoRA linear (DESIGN.md §5) on the GEMMs of kernels/gemm.cu.
//!
//! Forward, W [out×in] frozen, A [r×in], B [out×r] trained, scale s (alpha / r):
//!   y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ
//! computed as u_s = s·x·Aᵀ (M×r, bf16, saved for the backward) then ONE GEMM over the concatenated
//! K = in + r: y = [x | u_s]·[W | B]ᵀ + b (the kernel reads the two K segments from two pointers).
//! Backward, with v_s = s·dy·B (M×r):
//!   dx = [dy | v_s]·[W ; A]      (one GEMM over K = out + r)
//!   dB = dyᵀ·u_s = s·dyᵀ·(x·Aᵀ)   dA = v_sᵀ·x = s·(dy·B)ᵀ·x      (f32, added to the existing grads)
//! Two launches per forward, two per backward plus the weight gradients, which the backward queues
//! on a [`WeightGradBatch`]: its `finish` computes every queued dA and dB together — on a Hopper
//! in one grouped launch (an attention block's four layers: eight products, one launch), elsewhere
//! split along the tokens into a scratch workspace with one reduction launch. Any rank 1..=256
//! (ranks that are not multiples of 8 take the kernel's scalar load path), any scale. in and out
//! must be multiples of 8.
//!
//! CPU twins: [`lora_forward_cpu`], [`lora_backward_cpu`] (f32, naive, unfused).

use super::gemm::{at_b_many, check_on_gpu, gemm, AtB, GemmCall, Layouts, Segment, SplitK, WeightGradSplit};
use super::gemm_sm90_split::{gemm_group, gemm_many, supports_group, GroupGemm, GROUP_MAX};
use crate::cuda::Gpu;
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// Sizes of one LoRA linear applied to `m` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub m: usize,
    pub in_f: usize,
    pub out_f: usize,
    pub rank: usize,
}

fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    super::gemm::linear_cpu(x, m, k, w, n, None)
}

/// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ. x [m×in], w [out×in], a [r×in], b [out×r].
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_cpu(x: &[f32], w: &[f32], bias: Option<&[f32]>, a: &[f32], b: &[f32], scale: f32, s: &LoraShape) -> Vec<f32> {
    let u = matmul_t(x, s.m, s.in_f, a, s.rank);
    let lora = matmul_t(&u, s.m, s.rank, b, s.out_f);
    let base = super::gemm::linear_cpu(x, s.m, s.in_f, w, s.out_f, bias);
    base.iter().zip(&lora).map(|(y, l)| y + scale * l).collect()
}

/// Gradients of Σ dy·y for [`lora_forward_cpu`]: dx [m×in], da [r×in], db [out×r].
pub struct LoraGrads {
    pub dx: Vec<f32>,
    pub da: Vec<f32>,
    pub db: Vec<f32>,
}

/// The backward of [`lora_forward_cpu`] (W and the bias are frozen: no gradient for them).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_cpu(x: &[f32], w: &[f32], a: &[f32], b: &[f32], scale: f32, dy: &[f32], s: &LoraShape) -> LoraGrads {
    use super::gemm::{at_b_cpu, linear_input_grad_cpu};
    let u = matmul_t(x, s.m, s.in_f, a, s.rank);
    let v = linear_input_grad_cpu(dy, s.m, s.out_f, b, s.rank); // dy·B
    let dx_base = linear_input_grad_cpu(dy, s.m, s.out_f, w, s.in_f);
    let dx_lora = linear_input_grad_cpu(&v, s.m, s.rank, a, s.in_f); // v·A
    LoraGrads {
        dx: dx_base.iter().zip(&dx_lora).map(|(d, l)| d + scale * l).collect(),
        da: at_b_cpu(&v, s.m, s.rank, x, s.in_f).iter().map(|g| scale * g).collect(),
        db: at_b_cpu(dy, s.m, s.out_f, &u, s.rank).iter().map(|g| scale * g).collect(),
    }
}

/// The weights of one LoRA linear on the GPU, all bf16: w [out, in] and bias [out] frozen,
/// a [r, in] and b [out, r] the bf16 copies of the trained factors; scale = alpha / r.
pub struct LoraLinear<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
}

impl LoraLinear<'_> {
    /// (in, out, rank), after checking every weight's device, type and shape.
    fn dims(&self, what: &str) -> Result<(usize, usize, usize)> {
        for (name, t) in [("w", self.w), ("a", self.a), ("b", self.b)] {
            check_on_gpu(what, name, t, Some(DType::BF16))?;
            ensure!(t.shape().len() == 2, "{what}: {name} must be 2-D, got {:?}", t.shape());
        }
        let (out_f, in_f) = (self.w.shape()[0], self.w.shape()[1]);
        let r = self.a.shape()[0];
        ensure!(in_f % 8 == 0 && out_f % 8 == 0, "{what}: in ({in_f}) and out ({out_f}) features must be multiples of 8 (16-byte rows for cp.async)");
        ensure!((1..=256).contains(&r), "{what}: rank {r} outside 1..=256");
        ensure!(self.a.shape() == [r, in_f], "{what}: a {:?} must be [rank, in] = [{r}, {in_f}]", self.a.shape());
        ensure!(self.b.shape() == [out_f, r], "{what}: b {:?} must be [out, rank] = [{out_f}, {r}]", self.b.shape());
        if let Some(b) = self.bias {
            check_on_gpu(what, "bias", b, Some(DType::BF16))?;
            ensure!(b.numel() == out_f, "{what}: bias {:?} must hold {out_f} values", b.shape());
        }
        Ok((in_f, out_f, r))
    }
}

/// Rows of `t` seen as [rows, cols], checked to be a bf16 GPU tensor.
fn rows_of(what: &str, name: &str, t: &Tensor, cols: usize, dtype: Option<DType>) -> Result<usize> {
    check_on_gpu(what, name, t, dtype)?;
    let (rows, c) = super::gemm::as_matrix(t);
    ensure!(c == cols, "{what}: {name} {:?} must have {cols} columns", t.shape());
    Ok(rows)
}

/// u_s = s·x·Aᵀ [M, r] bf16 as a GEMM of layout Kk (bf16 out), after checking the operands.
fn down_gemm(l: &LoraLinear, x: &Tensor, us: &Tensor) -> Result<GroupGemm> {
    const WHAT: &str = "lora_down";
    let (in_f, _, r) = l.dims(WHAT)?;
    let m = rows_of(WHAT, "x", x, in_f, Some(DType::BF16))?;
    ensure!(rows_of(WHAT, "u", us, r, Some(DType::BF16))? == m, "{WHAT}: u {:?} must be [{m}, {r}]", us.shape());
    let seg1 = Segment { a: x.ptr()?, lda: in_f, b: l.a.ptr()?, ldb: in_f, k: in_f };
    Ok(GroupGemm { m, n: r, seg1, seg2: Segment::default(), alpha: l.scale, bias: None, c: us.ptr()?, residual: None })
}

/// y = [x | u_s]·[W | B]ᵀ + b (+ residual) as a GEMM of layout Kk (y's type out), after checking
/// the operands.
fn up_gemm(l: &LoraLinear, x: &Tensor, us: &Tensor, residual: Option<&Tensor>, y: &Tensor) -> Result<GroupGemm> {
    const WHAT: &str = "lora_forward";
    let (in_f, out_f, r) = l.dims(WHAT)?;
    let m = rows_of(WHAT, "x", x, in_f, Some(DType::BF16))?;
    ensure!(rows_of(WHAT, "u", us, r, Some(DType::BF16))? == m, "{WHAT}: u {:?} must be [{m}, {r}]", us.shape());
    ensure!(rows_of(WHAT, "y", y, out_f, None)? == m, "{WHAT}: y {:?} must be [{m}, {out_f}]", y.shape());
    if let Some(res) = residual {
        ensure!(rows_of(WHAT, "residual", res, out_f, Some(y.dtype()))? == m, "{WHAT}: residual {:?} must be shaped like y", res.shape());
    }
    let seg1 = Segment { a: x.ptr()?, lda: in_f, b: l.w.ptr()?, ldb: in_f, k: in_f };
    let seg2 = Segment { a: us.ptr()?, lda: r, b: l.b.ptr()?, ldb: r, k: r };
    let bias = l.bias.map(|b| b.ptr()).transpose()?;
    let residual = residual.map(|t| t.ptr().map(|p| (p, out_f))).transpose()?;
    Ok(GroupGemm { m, n: out_f, seg1, seg2, alpha: 1.0, bias, c: y.ptr()?, residual })
}

/// v_s = s·dy·B [M, r] bf16 as a GEMM of layout Kn (B [out, r] read as B(n = j, k = o) = B[o·r + j]),
/// after checking the operands.
fn v_gemm(l: &LoraLinear, dy: &Tensor, vs: &Tensor) -> Result<GroupGemm> {
    const WHAT: &str = "lora_backward";
    let (_, out_f, r) = l.dims(WHAT)?;
    let m = rows_of(WHAT, "dy", dy, out_f, Some(DType::BF16))?;
    ensure!(rows_of(WHAT, "v", vs, r, Some(DType::BF16))? == m, "{WHAT}: v {:?} must be [{m}, {r}]", vs.shape());
    let seg1 = Segment { a: dy.ptr()?, lda: out_f, b: l.b.ptr()?, ldb: r, k: out_f };
    Ok(GroupGemm { m, n: r, seg1, seg2: Segment::default(), alpha: l.scale, bias: None, c: vs.ptr()?, residual: None })
}

/// u_s = s·x·Aᵀ [M, r] bf16: the forward's first step, what the backward needs saved (or recomputed).
pub fn lora_down(gpu: &Gpu, l: &LoraLinear, x: &Tensor, us: &mut Tensor) -> Result<()> {
    gemm(gpu, &down_gemm(l, x, us)?.call(Layouts::Kk, DType::BF16))
}

/// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (+ residual), writing the saved u_s = s·x·Aᵀ into `us` [M, r].
/// x bf16 [.., in]; y bf16 or f32 [.., out]; residual like y.
pub fn lora_forward(gpu: &Gpu, l: &LoraLinear, x: &Tensor, us: &mut Tensor, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    lora_down(gpu, l, x, us)?;
    lora_up(gpu, l, x, us, residual, y)
}

/// The forward's fused GEMM, given u_s: y = [x | u_s]·[W | B]ᵀ + b (+ residual).
pub fn lora_up(gpu: &Gpu, l: &LoraLinear, x: &Tensor, us: &Tensor, residual: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    gemm(gpu, &up_gemm(l, x, us, residual, y)?.call(Layouts::Kk, y.dtype()))
}

/// Outputs of [`lora_backward`]: dx bf16 or f32 [M, in]; da f32 [r, in]; db f32 [out, r];
/// vs: bf16 [M, r] scratch that receives v_s = s·dy·B, or holds it already when `vs_ready`
/// ([`lora_v_many`]).
pub struct LoraBackwardOut<'a> {
    pub dx: &'a mut Tensor,
    pub da: &'a Tensor,
    pub db: &'a Tensor,
    pub vs: &'a Tensor,
    pub vs_ready: bool,
}

/// LoRA weight gradients queued by [`lora_backward`], computed by [`WeightGradBatch::finish`].
/// Holds the operands (and the gradient buffers) so that none is freed, and its memory reused,
/// before the products are queued on the stream.
#[derive(Default)]
pub struct WeightGradBatch {
    /// Each product and whether it adds to its C.
    problems: Vec<(AtB, bool)>,
    operands: Vec<Tensor>,
}

impl WeightGradBatch {
    /// Queues `c = aᵀ·b` products (added to c when `accumulate`), keeping `operands` alive.
    fn push(&mut self, problems: [AtB; 2], accumulate: bool, operands: [&Tensor; 6]) {
        self.problems.extend(problems.map(|p| (p, accumulate)));
        self.operands.extend(operands.into_iter().cloned());
    }

    /// Computes every queued product: on a Hopper in grouped launches of up to eight products
    /// (`SDLORA_SM90_SPLIT=0` or `gemm` turns them off), elsewhere on the sm_80 kernels, split along
    /// the tokens with one reduction launch per pair.
    pub fn finish(self, gpu: &Gpu) -> Result<()> {
        let gemms: Vec<GroupGemm> = self.problems.iter().map(|(p, accumulate)| GroupGemm::at_b(p, *accumulate)).collect();
        if supports_group(gpu, Layouts::Mn, DType::F32, &gemms)? {
            for chunk in gemms.chunks(GROUP_MAX) {
                gemm_group(gpu, Layouts::Mn, DType::F32, chunk)?;
            }
        } else {
            for accumulate in [false, true] {
                let same: Vec<AtB> = self.problems.iter().filter(|(_, a)| *a == accumulate).map(|(p, _)| *p).collect();
                if !same.is_empty() {
                    at_b_many(gpu, &same, accumulate, WeightGradSplit::Workspace)?;
                }
            }
        }
        drop(self.operands);
        Ok(())
    }
}

/// [`lora_down`] for several LoRA linears at once (an attention's q, k and v): `(layer, x, u_s)`
/// each; on a Hopper in one grouped launch, else one GEMM each.
pub fn lora_down_many(gpu: &Gpu, downs: &[(&LoraLinear, &Tensor, &Tensor)]) -> Result<()> {
    let gemms: Vec<GroupGemm> = downs.iter().map(|(l, x, us)| down_gemm(l, x, us)).collect::<Result<_>>()?;
    gemm_many(gpu, Layouts::Kk, DType::BF16, &gemms)
}

/// [`lora_up`] for several LoRA linears at once (an attention's q, k and v), no residual:
/// `(layer, x, u_s, y)` each, y bf16; on a Hopper in one grouped launch when every output is
/// small (see `gemm_many`), else one GEMM each.
pub fn lora_up_many(gpu: &Gpu, ups: &[(&LoraLinear, &Tensor, &Tensor, &Tensor)]) -> Result<()> {
    for (_, _, _, y) in ups {
        ensure!(y.dtype() == DType::BF16, "lora_forward: grouped outputs must be bf16, y is {:?}", y.dtype());
    }
    let gemms: Vec<GroupGemm> = ups.iter().map(|(l, x, us, y)| up_gemm(l, x, us, None, y)).collect::<Result<_>>()?;
    gemm_many(gpu, Layouts::Kk, DType::BF16, &gemms)
}

/// The first step of [`lora_backward`] for several LoRA linears at once (an attention's q, k and
/// v): v_s = s·dy·B into `vs`, `(layer, dy, v_s)` each; on a Hopper in one grouped launch, else
/// one GEMM each. Their backwards then take `vs_ready`.
pub fn lora_v_many(gpu: &Gpu, items: &[(&LoraLinear, &Tensor, &Tensor)]) -> Result<()> {
    let gemms: Vec<GroupGemm> = items.iter().map(|(l, dy, vs)| v_gemm(l, dy, vs)).collect::<Result<_>>()?;
    gemm_many(gpu, Layouts::Kn, DType::BF16, &gemms)
}

/// The backward of [`lora_forward`] given the saved (or recomputed) u_s: dx (added to dx's
/// contents when `dx_accumulate`) now; dA, dB (added to da/db when `grad_accumulate`) queued on
/// `grads`, computed when it finishes.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(gpu: &Gpu, l: &LoraLinear, x: &Tensor, us: &Tensor, dy: &Tensor, out: LoraBackwardOut, dx_accumulate: bool, grad_accumulate: bool, grads: &mut WeightGradBatch) -> Result<()> {
    const WHAT: &str = "lora_backward";
    let (in_f, out_f, r) = l.dims(WHAT)?;
    let m = rows_of(WHAT, "x", x, in_f, Some(DType::BF16))?;
    let LoraBackwardOut { dx, da, db, vs, vs_ready } = out;
    for (name, t, cols, dtype) in [("u", us, r, Some(DType::BF16)), ("dy", dy, out_f, Some(DType::BF16))] {
        ensure!(rows_of(WHAT, name, t, cols, dtype)? == m, "{WHAT}: {name} {:?} must be [{m}, {cols}]", t.shape());
    }
    ensure!(rows_of(WHAT, "v", vs, r, Some(DType::BF16))? == m, "{WHAT}: v {:?} must be [{m}, {r}]", vs.shape());
    ensure!(rows_of(WHAT, "dx", dx, in_f, None)? == m, "{WHAT}: dx {:?} must be [{m}, {in_f}]", dx.shape());
    ensure!(da.shape() == [r, in_f] && da.dtype() == DType::F32, "{WHAT}: da {:?} {:?} must be f32 [{r}, {in_f}]", da.shape(), da.dtype());
    ensure!(db.shape() == [out_f, r] && db.dtype() == DType::F32, "{WHAT}: db {:?} {:?} must be f32 [{out_f}, {r}]", db.shape(), db.dtype());
    check_on_gpu(WHAT, "da", da, Some(DType::F32))?;
    check_on_gpu(WHAT, "db", db, Some(DType::F32))?;
    let (x_p, us_p, dy_p, vs_p) = (x.ptr()?, us.ptr()?, dy.ptr()?, vs.ptr()?);

    if !vs_ready {
        gemm(gpu, &v_gemm(l, dy, vs)?.call(Layouts::Kn, DType::BF16))?;
    }
    // dx = [dy | v_s]·[W ; A]
    let dx_p = dx.ptr()?;
    let dx_call = GemmCall {
        layouts: Layouts::Kn,
        m,
        n: in_f,
        seg1: Segment { a: dy_p, lda: out_f, b: l.w.ptr()?, ldb: in_f, k: out_f },
        seg2: Segment { a: vs_p, lda: r, b: l.a.ptr()?, ldb: in_f, k: r },
        c: dx_p,
        ldc: in_f,
        out: dx.dtype(),
        bias: None,
        residual: dx_accumulate.then_some((dx_p, in_f)),
        alpha: 1.0,
        split: SplitK::None,
    };
    gemm(gpu, &dx_call)?;
    // dB = dyᵀ·u_s, dA = v_sᵀ·x: queued.
    let db_p = AtB { a: (dy_p, out_f), b: (us_p, r), m, p: out_f, q: r, alpha: 1.0, c: db.ptr()? };
    let da_p = AtB { a: (vs_p, r), b: (x_p, in_f), m, p: r, q: in_f, alpha: 1.0, c: da.ptr()? };
    grads.push([db_p, da_p], grad_accumulate, [x, us, dy, vs, da, db]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference;
    use crate::ops::gemm::tests::{download, gather_rows, poisoned, rand_bf16, sample_rows, upload};
    use crate::ops::gemm::{at_b_cpu, linear_cpu, linear_input_grad_cpu};
    use crate::rng::Rng;
    use crate::tensor::assert_close;

    #[test]
    fn lora_forward_is_one_gemm_over_the_concatenated_k() {
        let mut rng = Rng::new(5);
        let s = LoraShape { m: 4, in_f: 6, out_f: 3, rank: 2 };
        let (x, w, bias) = (rng.normal_vec(24, 1.0), rng.normal_vec(18, 1.0), rng.normal_vec(3, 1.0));
        let (a, b, scale) = (rng.normal_vec(12, 1.0), rng.normal_vec(6, 1.0), 0.7);
        // [x | s·u]·[W | B]ᵀ + b, built explicitly.
        let u = linear_cpu(&x, s.m, s.in_f, &a, s.rank, None);
        let k = s.in_f + s.rank;
        let xcat: Vec<f32> = (0..s.m).flat_map(|i| x[i * 6..(i + 1) * 6].iter().copied().chain(u[i * 2..(i + 1) * 2].iter().map(|v| scale * v))).collect();
        let wcat: Vec<f32> = (0..s.out_f).flat_map(|o| w[o * 6..(o + 1) * 6].iter().chain(&b[o * 2..(o + 1) * 2]).copied()).collect();
        let fused = linear_cpu(&xcat, s.m, k, &wcat, s.out_f, Some(&bias));
        assert_close("concatenated GEMM", &fused, &lora_forward_cpu(&x, &w, Some(&bias), &a, &b, scale, &s), 1e-6);
    }

    #[test]
    fn lora_backward_matches_finite_differences() {
        let mut rng = Rng::new(9);
        let s = LoraShape { m: 3, in_f: 4, out_f: 5, rank: 2 };
        let (x, w, bias) = (rng.normal_vec(12, 1.0), rng.normal_vec(20, 1.0), rng.normal_vec(5, 1.0));
        let (a, b, dy, scale) = (rng.normal_vec(8, 1.0), rng.normal_vec(10, 1.0), rng.normal_vec(15, 1.0), 1.7);
        let g = lora_backward_cpu(&x, &w, &a, &b, scale, &dy, &s);
        let loss = |y: Vec<f32>| y.iter().zip(&dy).map(|(y, g)| (*y as f64) * (*g as f64)).sum::<f64>();
        let fd = |v: Vec<f64>| v.iter().map(|&d| d as f32).collect::<Vec<f32>>();
        let dx = fd(finite_difference(&x, 1e-2, |xs| loss(lora_forward_cpu(xs, &w, Some(&bias), &a, &b, scale, &s))));
        let da = fd(finite_difference(&a, 1e-2, |as_| loss(lora_forward_cpu(&x, &w, Some(&bias), as_, &b, scale, &s))));
        let db = fd(finite_difference(&b, 1e-2, |bs| loss(lora_forward_cpu(&x, &w, Some(&bias), &a, bs, scale, &s))));
        assert_close("dx vs finite differences", &g.dx, &dx, 1e-3);
        assert_close("dA vs finite differences", &g.da, &da, 1e-3);
        assert_close("dB vs finite differences", &g.db, &db, 1e-3);
    }

    /// (M, in, out, rank, scale): every LoRA'd attention projection of SD1.5 at 512 px (self-attention
    /// d→d at 4096/1024/256/64 tokens, batch 1 and 2; cross-attention to_k/to_v 768→d on 77 tokens),
    /// then odd ranks, odd M and odd scales.
    fn lora_shapes() -> Vec<(usize, usize, usize, usize, f32)> {
        let mut v = Vec::new();
        for (tokens, d) in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)] {
            v.extend([(tokens, d, d, 128, 1.0), (2 * tokens, d, d, 128, 1.0)]);
        }
        for d in [320, 640, 1280] {
            v.push((154, 768, d, 128, 1.0));
        }
        v.extend([(77, 768, 320, 128, 1.0), (1, 320, 320, 1, 3.0), (77, 64, 40, 5, 0.37), (333, 320, 640, 13, 2.0), (333, 640, 320, 256, 0.5), (64, 1280, 1280, 100, 1.28)]);
        v
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_lora_forward_backward_match_twins() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for (i, (m, in_f, out_f, r, scale)) in lora_shapes().into_iter().enumerate() {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let s = LoraShape { m, in_f, out_f, rank: r };
            let what = format!("lora {m}x{in_f}->{out_f} r={r} s={scale} seed={seed}");
            let x = rand_bf16(&mut rng, m * in_f, 1.0);
            let w = rand_bf16(&mut rng, out_f * in_f, 1.0 / (in_f as f32).sqrt());
            let bias = rand_bf16(&mut rng, out_f, 0.5);
            let a = rand_bf16(&mut rng, r * in_f, 1.0 / (in_f as f32).sqrt());
            let b = rand_bf16(&mut rng, out_f * r, 1.0 / (r as f32).sqrt());
            let dy = rand_bf16(&mut rng, m * out_f, 1.0);
            let (old_da, old_db) = (rng.normal_vec(r * in_f, 1.0), rng.normal_vec(out_f * r, 1.0));
            let (wd, bd, ad, bbd) = (upload(&gpu, &[out_f, in_f], &w, DType::BF16), upload(&gpu, &[out_f], &bias, DType::BF16), upload(&gpu, &[r, in_f], &a, DType::BF16), upload(&gpu, &[out_f, r], &b, DType::BF16));
            let l = LoraLinear { w: &wd, bias: Some(&bd), a: &ad, b: &bbd, scale };
            let (xd, dyd) = (upload(&gpu, &[m, in_f], &x, DType::BF16), upload(&gpu, &[m, out_f], &dy, DType::BF16));

            // Alternate output types and accumulation so every variant runs.
            let (y_type, accumulate) = if i % 2 == 0 { (DType::BF16, true) } else { (DType::F32, false) };
            let mut us = poisoned(&gpu, &[m, r], DType::BF16);
            let mut y = poisoned(&gpu, &[m, out_f], y_type);
            lora_forward(&gpu, &l, &xd, &mut us, None, &mut y).unwrap();
            let vs = poisoned(&gpu, &[m, r], DType::BF16);
            // Accumulating runs add dx to earlier contents too (Linear::backward_adding).
            let old_dx = rand_bf16(&mut rng, m * in_f, 1.0);
            let mut dx = if accumulate { upload(&gpu, &[m, in_f], &old_dx, y_type) } else { poisoned(&gpu, &[m, in_f], y_type) };
            let (da, db) = if accumulate {
                (upload(&gpu, &[r, in_f], &old_da, DType::F32), upload(&gpu, &[out_f, r], &old_db, DType::F32))
            } else {
                (poisoned(&gpu, &[r, in_f], DType::F32), poisoned(&gpu, &[out_f, r], DType::F32))
            };
            let out = LoraBackwardOut { dx: &mut dx, da: &da, db: &db, vs: &vs, vs_ready: false };
            let mut grads = WeightGradBatch::default();
            lora_backward(&gpu, &l, &xd, &us, &dyd, out, accumulate, accumulate, &mut grads).unwrap();
            grads.finish(&gpu).unwrap();

            let rows = sample_rows(&mut rng, m);
            let sub = LoraShape { m: rows.len(), ..s };
            let (xs, dys) = (gather_rows(&x, in_f, &rows), gather_rows(&dy, out_f, &rows));
            let y_ref = lora_forward_cpu(&xs, &w, Some(&bias), &a, &b, scale, &sub);
            assert_close(&format!("y {what}"), &gather_rows(&download(&gpu, &y), out_f, &rows), &y_ref, 1e-2);
            let mut dx_ref = lora_backward_cpu(&xs, &w, &a, &b, scale, &dys, &sub).dx;
            if accumulate {
                dx_ref.iter_mut().zip(gather_rows(&old_dx, in_f, &rows)).for_each(|(d, o)| *d += o);
            }
            assert_close(&format!("dx {what}"), &gather_rows(&download(&gpu, &dx), in_f, &rows), &dx_ref, 1e-2);
            // The factor gradients reduce over all M rows: full twins.
            let u = linear_cpu(&x, m, in_f, &a, r, None);
            let v = linear_input_grad_cpu(&dy, m, out_f, &b, r);
            let add_old = |g: Vec<f32>, old: &[f32]| -> Vec<f32> { g.iter().zip(old).map(|(g, o)| scale * g + if accumulate { *o } else { 0.0 }).collect() };
            assert_close(&format!("dA {what} accumulate={accumulate}"), &download(&gpu, &da), &add_old(at_b_cpu(&v, m, r, &x, in_f), &old_da), 1e-2);
            assert_close(&format!("dB {what} accumulate={accumulate}"), &download(&gpu, &db), &add_old(at_b_cpu(&dy, m, out_f, &u, r), &old_db), 1e-2);
            for (name, t) in [("y", &y), ("dx", &dx)] {
                assert_eq!(download(&gpu, t).iter().filter(|v| !v.is_finite()).count(), 0, "{name} {what}: unwritten outputs");
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_lora_checks_shapes() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let w = upload(&gpu, &[16, 8], &[0.0; 128], DType::BF16);
        let a = upload(&gpu, &[4, 8], &[0.0; 32], DType::BF16);
        let b = upload(&gpu, &[16, 3], &[0.0; 48], DType::BF16);
        let l = LoraLinear { w: &w, bias: None, a: &a, b: &b, scale: 1.0 };
        let x = upload(&gpu, &[2, 8], &[0.0; 16], DType::BF16);
        let mut us = poisoned(&gpu, &[2, 4], DType::BF16);
        let err = lora_down(&gpu, &l, &x, &mut us).unwrap_err().to_string();
        assert!(err.contains("b [16, 3] must be [out, rank] = [16, 4]"), "{err}");
    }
}
