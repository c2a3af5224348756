//! Multi-head attention (kernels/attention.cu) on token-major activations [batch, tokens, heads·head_dim].
//!
//! GPU: flash attention forward (bf16, saves the logsumexp) and backward (UNet head dims), reading and
//! writing the operands in place through [`Strided`] views (so q, k, v can be columns of one fused
//! qkv buffer). CPU twins: [`attention_cpu`] (forward) and [`attention_backward_cpu`].

use crate::cuda::{ArenaKind, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, ensure, Context, Result};

/// Geometry of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query i sees keys 0..=i only (CLIP's text encoder).
    pub causal: bool,
}

/// CPU twin: per batch and head, out = softmax(q·kᵀ·scale (+ causal mask))·v.
/// q and out are [batch, q_len, heads·head_dim]; k and v are [batch, kv_len, heads·head_dim].
pub fn attention_cpu(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32) -> Vec<f32> {
    let width = s.heads * s.head_dim;
    assert_eq!(q.len(), s.batch * s.q_len * width, "attention_cpu: q does not match {s:?}");
    assert_eq!(k.len(), s.batch * s.kv_len * width, "attention_cpu: k does not match {s:?}");
    assert_eq!(v.len(), k.len(), "attention_cpu: v does not match k");
    let d = s.head_dim;
    let mut out = vec![0f32; q.len()];
    let mut p = vec![0f64; s.kv_len];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qi = &q[(b * s.q_len + i) * width + h * d..][..d];
                let visible = if s.causal { (i + 1).min(s.kv_len) } else { s.kv_len };
                let mut max = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let kj = &k[(b * s.kv_len + j) * width + h * d..][..d];
                    *pj = qi.iter().zip(kj).map(|(a, c)| (*a as f64) * (*c as f64)).sum::<f64>() * scale as f64;
                    max = max.max(*pj);
                }
                let mut sum = 0.0;
                for pj in p.iter_mut().take(visible) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[(b * s.q_len + i) * width + h * d..][..d];
                for (j, pj) in p.iter().enumerate().take(visible) {
                    let vj = &v[(b * s.kv_len + j) * width + h * d..][..d];
                    for (oe, ve) in o.iter_mut().zip(vj) {
                        *oe += (pj / sum * *ve as f64) as f32;
                    }
                }
            }
        }
    }
    out
}


/// CPU twin of the backward: given dout = ∂L/∂out, returns (dq, dk, dv) in the layouts of q, k, v.
/// Per batch and head: P = softmax(S), S = q·kᵀ·scale (+ causal mask); dV = Pᵀ·dO; dP = dO·Vᵀ;
/// D_i = Σ_j P_ij dP_ij (= dO_i·O_i); dS = P∘(dP − D); dQ = scale·dS·K; dK = scale·dSᵀ·Q.
pub fn attention_backward_cpu(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], s: &AttnShape, scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = s.heads * s.head_dim;
    assert_eq!(q.len(), s.batch * s.q_len * width, "attention_backward_cpu: q does not match {s:?}");
    assert_eq!(k.len(), s.batch * s.kv_len * width, "attention_backward_cpu: k does not match {s:?}");
    assert_eq!(v.len(), k.len(), "attention_backward_cpu: v does not match k");
    assert_eq!(dout.len(), q.len(), "attention_backward_cpu: dout does not match q");
    let d = s.head_dim;
    let (mut dq, mut dk, mut dv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
    let (mut p, mut dp) = (vec![0f64; s.kv_len], vec![0f64; s.kv_len]);
    let row = |b: usize, len: usize, i: usize, h: usize| (b * len + i) * width + h * d..(b * len + i) * width + (h + 1) * d;
    let dot = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(x, y)| (*x as f64) * (*y as f64)).sum::<f64>();
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let (qi, doi) = (&q[row(b, s.q_len, i, h)], &dout[row(b, s.q_len, i, h)]);
                let visible = if s.causal { (i + 1).min(s.kv_len) } else { s.kv_len };
                let mut max = f64::NEG_INFINITY;
                for j in 0..visible {
                    p[j] = dot(qi, &k[row(b, s.kv_len, j, h)]) * scale as f64;
                    max = max.max(p[j]);
                }
                let mut sum = 0.0;
                for pj in p.iter_mut().take(visible) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let mut dsum = 0.0;
                for j in 0..visible {
                    p[j] /= sum;
                    dp[j] = dot(doi, &v[row(b, s.kv_len, j, h)]);
                    dsum += p[j] * dp[j];
                }
                let dqi = row(b, s.q_len, i, h);
                for j in 0..visible {
                    let ds = p[j] * (dp[j] - dsum) * scale as f64;
                    let kr = row(b, s.kv_len, j, h);
                    for e in 0..d {
                        dq[dqi.start + e] += ds * k[kr.start + e] as f64;
                        dk[kr.start + e] += ds * qi[e] as f64;
                        dv[kr.start + e] += p[j] * doi[e] as f64;
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    (f(dq), f(dk), f(dv))
}

/// A token-major attention operand on the GPU: bf16 `tensor`, whose token t (of `batch·len`) has its
/// `heads·head_dim` values at element `offset + t·row_stride`. [`Strided::dense`] is the plain
/// [batch, len, heads·head_dim] case; for a fused qkv buffer [batch, len, 3·width] use
/// `Strided::columns(&qkv, 0, 3·width)`, `(&qkv, width, 3·width)`, `(&qkv, 2·width, 3·width)`.
/// Outputs are views too (written through the device pointer), so dq, dk, dv can fill a fused buffer.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub row_stride: usize,
}

impl<'a> Strided<'a> {
    pub fn dense(tensor: &'a Tensor) -> Strided<'a> {
        let row_stride = tensor.shape().last().copied().unwrap_or(1);
        Strided { tensor, offset: 0, row_stride }
    }
    pub fn columns(tensor: &'a Tensor, offset: usize, row_stride: usize) -> Strided<'a> {
        Strided { tensor, offset, row_stride }
    }

    /// Device pointer of the first value, after checking that `rows` rows of `width` values fit and
    /// that every row starts 16-byte aligned (the kernels use 16-byte copies).
    fn ptr(&self, what: &str, rows: usize, width: usize) -> Result<u64> {
        let t = self.tensor;
        ensure!(t.is_gpu() && t.dtype() == DType::BF16, "attention: {what} must be a bf16 GPU tensor (got {:?}, gpu {})", t.dtype(), t.is_gpu());
        ensure!(self.offset.is_multiple_of(8) && self.row_stride.is_multiple_of(8), "attention: {what} offset {} and row stride {} must be multiples of 8", self.offset, self.row_stride);
        ensure!(self.row_stride >= width, "attention: {what} row stride {} is narrower than heads·head_dim = {width}", self.row_stride);
        let end = self.offset + (rows - 1) * self.row_stride + width;
        ensure!(end <= t.numel(), "attention: {what} {:?} holds {} values; {rows} rows of {width} at stride {} from {} need {end}", t.shape(), t.numel(), self.row_stride, self.offset);
        let ptr = t.ptr()? + (self.offset * 2) as u64;
        ensure!(ptr.is_multiple_of(16), "attention: {what} is not 16-byte aligned");
        Ok(ptr)
    }
}

/// Forward launch configuration of a head dim (mirrors the ATTN_FWD lines of kernels/attention.cu).
struct FwdCfg {
    kernel: &'static str,
    warps: usize,
    /// 16-row tiles per warp (query rows per block = 16·row_tiles·warps).
    row_tiles: usize,
    block_n: usize,
    stages: usize,
    /// Output columns per block (the 512-wide VAE head is split over blocks).
    out_cols: usize,
}

fn fwd_cfg(head_dim: usize) -> Result<FwdCfg> {
    let c = |kernel, warps, row_tiles, block_n, stages, out_cols| FwdCfg { kernel, warps, row_tiles, block_n, stages, out_cols };
    Ok(match head_dim {
        40 => c("attn_fwd_hd40_bf16", 4, 2, 64, 2, 40),
        64 => c("attn_fwd_hd64_bf16", 4, 1, 64, 2, 64),
        80 => c("attn_fwd_hd80_bf16", 4, 1, 64, 2, 80),
        160 => c("attn_fwd_hd160_bf16", 4, 1, 32, 2, 160),
        512 => c("attn_fwd_hd512_bf16", 2, 1, 32, 1, 128),
        d => bail!("attention forward: no kernel for head dim {d} (have 40, 64, 80, 160, 512)"),
    })
}

/// Backward launch configuration (mirrors the ATTN_BWD_DKDV lines of kernels/attention.cu).
struct BwdCfg {
    /// Warps per block; key rows per block = 16·warps.
    warps: usize,
    /// Query rows per tile.
    block_m: usize,
    prep: &'static str,
    dkdv: &'static str,
    cvt: &'static str,
}

fn bwd_cfg(head_dim: usize) -> Result<BwdCfg> {
    let c = |warps, block_m, prep, dkdv, cvt| BwdCfg { warps, block_m, prep, dkdv, cvt };
    Ok(match head_dim {
        40 => c(8, 64, "attn_bwd_prep_hd40_bf16", "attn_bwd_dkdv_hd40_bf16", "attn_bwd_cvt_hd40_bf16"),
        80 => c(4, 64, "attn_bwd_prep_hd80_bf16", "attn_bwd_dkdv_hd80_bf16", "attn_bwd_cvt_hd80_bf16"),
        160 => c(2, 32, "attn_bwd_prep_hd160_bf16", "attn_bwd_dkdv_hd160_bf16", "attn_bwd_cvt_hd160_bf16"),
        d => bail!("attention backward: no kernel for head dim {d} (have 40, 80, 160)"),
    })
}

/// Blocks the query tiles are split over per key tile: 1 when there are enough key tiles to fill the
/// GPU, more for cross-attention (77 keys = 2 tiles) and short sequences; never an empty split.
fn bwd_splits(c: &BwdCfg, s: &AttnShape) -> usize {
    let base = s.kv_len.div_ceil(16 * c.warps) * s.heads * s.batch;
    let n_q = s.q_len.div_ceil(c.block_m);
    let want = if base >= 256 { 1 } else { 256usize.div_ceil(base) };
    let splits = want.min((n_q / 2).max(1));
    n_q.div_ceil(n_q.div_ceil(splits))
}

/// Shared-memory row pitch of `w`-wide bf16 rows (an odd number of 16-byte chunks; kernels' pitch_for).
fn pitch(w: usize) -> usize {
    if (w / 8) % 2 == 1 { w } else { w + 8 }
}

const MODULE: &str = "attention";

/// Launches with `smem` bytes of dynamic shared memory, opting in above the 48 KiB default.
fn launch(gpu: &Gpu, kernel: &'static str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
    if cfg.shared_mem_bytes > 48 * 1024 {
        use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
        gpu.function(MODULE, kernel)?
            .set_attribute(MAX_SMEM, cfg.shared_mem_bytes as i32)
            .with_context(|| format!("{kernel} needs {} B of shared memory per block", cfg.shared_mem_bytes))?;
    }
    gpu.launch(MODULE, kernel, cfg, args)
}

fn check_shape(s: &AttnShape) -> Result<()> {
    ensure!(s.batch >= 1 && s.q_len >= 1 && s.kv_len >= 1 && s.heads >= 1, "attention: empty shape {s:?}");
    ensure!(!s.causal || s.q_len == s.kv_len, "attention: causal masking needs q_len == kv_len ({s:?})");
    ensure!(s.batch <= 65_535 && s.heads * 4 <= 65_535, "attention: grid too large for {s:?}");
    Ok(())
}

/// Flash-attention forward: out = softmax(q·kᵀ·scale (+ causal mask))·v per batch and head, bf16.
/// `lse` (f32 [batch, heads, q_len], optional) receives each row's logsumexp for [`attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(gpu: &Gpu, q: Strided, k: Strided, v: Strided, out: Strided, lse: Option<&Tensor>, s: &AttnShape, scale: f32) -> Result<()> {
    check_shape(s)?;
    let c = fwd_cfg(s.head_dim)?;
    let width = s.heads * s.head_dim;
    let (qp, kp, vp, op) = (
        q.ptr("q", s.batch * s.q_len, width)?,
        k.ptr("k", s.batch * s.kv_len, width)?,
        v.ptr("v", s.batch * s.kv_len, width)?,
        out.ptr("out", s.batch * s.q_len, width)?,
    );
    let lse_ptr = match lse {
        Some(t) => {
            ensure!(t.is_gpu() && t.dtype() == DType::F32 && t.numel() == s.batch * s.heads * s.q_len, "attention: lse must be an f32 GPU tensor of batch·heads·q_len values, got {:?}", t.shape());
            t.ptr()?
        }
        None => 0,
    };
    ensure!(scale > 0.0 && scale.is_finite(), "attention: scale must be positive, got {scale}");
    let dk = s.head_dim.div_ceil(16) * 16;
    let block_m = 16 * c.row_tiles * c.warps;
    let smem = 2 * (block_m * pitch(dk) + c.stages * c.block_n * (pitch(dk) + pitch(c.out_cols)));
    let chunks = s.head_dim / c.out_cols;
    let cfg = LaunchConfig {
        grid_dim: (s.q_len.div_ceil(block_m) as u32, (s.heads * chunks) as u32, s.batch as u32),
        block_dim: (32 * c.warps as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let args = [
        KernelArg::Ptr(qp), KernelArg::Ptr(kp), KernelArg::Ptr(vp), KernelArg::Ptr(op), KernelArg::Ptr(lse_ptr),
        KernelArg::I64(q.row_stride as i64), KernelArg::I64(k.row_stride as i64), KernelArg::I64(v.row_stride as i64), KernelArg::I64(out.row_stride as i64),
        KernelArg::I32(s.q_len as i32), KernelArg::I32(s.kv_len as i32), KernelArg::I32(s.heads as i32), KernelArg::F32(scale), KernelArg::I32(s.causal as i32),
    ];
    launch(gpu, c.kernel, cfg, &args)
}

/// f32 scratch of the backward: D = rowsum(dO∘O) [batch, heads, q_len], the dQ accumulator
/// [batch, q_len, heads·head_dim], and dK, dV accumulators [batch, kv_len, heads·head_dim] when the
/// shape splits its query tiles over blocks. Allocate once per shape (e.g. from the step's scratch arena).
pub struct AttnWorkspace {
    shape: AttnShape,
    dvec: Tensor,
    dq_acc: Tensor,
    dkv_acc: Option<(Tensor, Tensor)>,
}

impl AttnWorkspace {
    pub fn new(gpu: &Gpu, arena: ArenaKind, s: &AttnShape) -> Result<AttnWorkspace> {
        let w = s.heads * s.head_dim;
        let split = bwd_splits(&bwd_cfg(s.head_dim)?, s) > 1;
        let acc = || Tensor::empty_gpu(gpu, arena, &[s.batch, s.kv_len, w], DType::F32);
        Ok(AttnWorkspace {
            shape: *s,
            dvec: Tensor::empty_gpu(gpu, arena, &[s.batch, s.heads, s.q_len], DType::F32)?,
            dq_acc: Tensor::empty_gpu(gpu, arena, &[s.batch, s.q_len, w], DType::F32)?,
            dkv_acc: if split { Some((acc()?, acc()?)) } else { None },
        })
    }
}

/// Flash-attention backward (no causal mask): from q, k, v, the forward's out and lse, and dout,
/// writes dq, dk, dv (bf16, each through its view). Launches: D and dQ-accumulator zeroing, the
/// dK/dV kernel (P recomputed from lse; dQ by f32 atomics), conversions of the f32 accumulators.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu, q: Strided, k: Strided, v: Strided, out: Strided, dout: Strided, lse: &Tensor,
    dq: Strided, dk: Strided, dv: Strided, ws: &AttnWorkspace, s: &AttnShape, scale: f32,
) -> Result<()> {
    check_shape(s)?;
    ensure!(!s.causal, "attention backward: causal masking is forward-only (CLIP)");
    ensure!(scale > 0.0 && scale.is_finite(), "attention backward: scale must be positive, got {scale}");
    ensure!(ws.shape == *s, "attention backward: workspace made for {:?}, called with {s:?}", ws.shape);
    let c = bwd_cfg(s.head_dim)?;
    let splits = bwd_splits(&c, s);
    let width = s.heads * s.head_dim;
    let (nq, nk) = (s.batch * s.q_len, s.batch * s.kv_len);
    let (qp, kp, vp, op, dop) = (q.ptr("q", nq, width)?, k.ptr("k", nk, width)?, v.ptr("v", nk, width)?, out.ptr("out", nq, width)?, dout.ptr("dout", nq, width)?);
    let (dqp, dkp, dvp) = (dq.ptr("dq", nq, width)?, dk.ptr("dk", nk, width)?, dv.ptr("dv", nk, width)?);
    ensure!(lse.is_gpu() && lse.dtype() == DType::F32 && lse.numel() == s.batch * s.heads * s.q_len, "attention backward: lse must be f32 [batch, heads, q_len]");
    let (dvec, acc) = (ws.dvec.ptr()?, ws.dq_acc.ptr()?);
    let (dk_acc, dv_acc) = match (&ws.dkv_acc, splits > 1) {
        (Some((a, b)), true) => {
            for t in [a, b] {
                // SAFETY: t is a live f32 GPU tensor of exactly numel·4 bytes, zeroed on the one stream.
                unsafe { cudarc::driver::result::memset_d8_async(t.ptr()?, 0, t.numel() * 4, gpu.stream().cu_stream()) }.context("zeroing dK/dV accumulators")?;
            }
            (a.ptr()?, b.ptr()?)
        }
        (_, false) => (0, 0),
        (None, true) => bail!("attention backward: workspace lacks the dK/dV accumulators for {s:?}"),
    };

    // attn_bwd_prep: HD/8 threads per (token, head) row, as many rows as fit in 256 threads.
    let (chunks, rows_per_block) = (s.head_dim / 8, 256 / (s.head_dim / 8));
    let prep_cfg = LaunchConfig { grid_dim: ((nq * s.heads).div_ceil(rows_per_block).max(1) as u32, 1, 1), block_dim: ((rows_per_block * chunks) as u32, 1, 1), shared_mem_bytes: 0 };
    launch(gpu, c.prep, prep_cfg, &[KernelArg::Ptr(op), KernelArg::Ptr(dop), KernelArg::Ptr(dvec), KernelArg::Ptr(acc),
        KernelArg::I64(out.row_stride as i64), KernelArg::I64(dout.row_stride as i64),
        KernelArg::I32(s.batch as i32), KernelArg::I32(s.q_len as i32), KernelArg::I32(s.heads as i32)])?;

    let block_n = 16 * c.warps;
    let p = pitch(s.head_dim.div_ceil(16) * 16);
    let smem = 2 * (2 * block_n * p + 4 * c.block_m * p + block_n * pitch(c.block_m)) + 4 * 4 * c.block_m;
    let cfg = LaunchConfig {
        grid_dim: ((s.kv_len.div_ceil(block_n) * splits) as u32, s.heads as u32, s.batch as u32),
        block_dim: (32 * c.warps as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    launch(gpu, c.dkdv, cfg, &[
        KernelArg::Ptr(qp), KernelArg::Ptr(kp), KernelArg::Ptr(vp), KernelArg::Ptr(dop), KernelArg::Ptr(lse.ptr()?), KernelArg::Ptr(dvec), KernelArg::Ptr(acc),
        KernelArg::Ptr(dkp), KernelArg::Ptr(dvp), KernelArg::Ptr(dk_acc), KernelArg::Ptr(dv_acc),
        KernelArg::I64(q.row_stride as i64), KernelArg::I64(k.row_stride as i64), KernelArg::I64(v.row_stride as i64), KernelArg::I64(dout.row_stride as i64),
        KernelArg::I64(dk.row_stride as i64), KernelArg::I64(dv.row_stride as i64),
        KernelArg::I32(s.q_len as i32), KernelArg::I32(s.kv_len as i32), KernelArg::I32(s.heads as i32), KernelArg::F32(scale), KernelArg::I32(splits as i32),
    ])?;

    // One launch converts dQ (and dK, dV when split): the kernel's CvtJobs, 32 bytes per job.
    let mut jobs = vec![(acc, dqp, dq.row_stride, s.q_len, scale)];
    if splits > 1 {
        jobs.extend([(dk_acc, dkp, dk.row_stride, s.kv_len, scale), (dv_acc, dvp, dv.row_stride, s.kv_len, 1.0)]);
    }
    let mut words = [0u64; 160];
    for (w, &(acc, dst, stride, len, scale)) in words.chunks_mut(4).zip(&jobs) {
        w.copy_from_slice(&[acc, dst, stride as u64, u64::from(i32::try_from(len)? as u32) | u64::from(scale.to_bits()) << 32]);
    }
    let longest = jobs.iter().map(|j| j.3).max().unwrap_or(0);
    let mut cfg = crate::cuda::grid_1d(s.batch * longest * width / 8, 256);
    cfg.grid_dim.1 = jobs.len() as u32;
    launch(gpu, c.cvt, cfg, &[KernelArg::Struct(words), KernelArg::I32(s.batch as i32), KernelArg::I32(s.heads as i32)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_cpu_small_examples() {
        let s = AttnShape { batch: 1, q_len: 1, kv_len: 2, heads: 1, head_dim: 1, causal: false };
        // Equal scores: the mean of v.
        assert_eq!(attention_cpu(&[0.0], &[1.0, 2.0], &[10.0, 20.0], &s, 1.0), vec![15.0]);
        // Scores 0 and ln 3: weights 1/4, 3/4.
        let y = attention_cpu(&[1.0], &[0.0, 3f32.ln()], &[10.0, 20.0], &s, 1.0);
        assert!((y[0] - 17.5).abs() < 1e-5, "{y:?}");
        // Causal: the first query sees only the first key.
        let c = AttnShape { q_len: 2, causal: true, ..s };
        assert_eq!(attention_cpu(&[5.0, 5.0], &[1.0, 2.0], &[10.0, 20.0], &c, 1.0)[0], 10.0);
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::cuda::ArenaKind::Persistent;
    use crate::ops::finite_difference;
    use crate::rng::Rng;
    use crate::tensor::{assert_close, compare, round_bf16};

    /// loss = Σ w·attention(q, k, v): checks the twin's dq, dk, dv against central differences.
    fn check_backward_twin(s: AttnShape) {
        let mut rng = Rng::new(11);
        let w = s.heads * s.head_dim;
        let (q, k, v) = (rng.normal_vec(s.batch * s.q_len * w, 0.5), rng.normal_vec(s.batch * s.kv_len * w, 0.5), rng.normal_vec(s.batch * s.kv_len * w, 0.5));
        let dout = rng.normal_vec(q.len(), 1.0);
        let scale = 0.7;
        let loss = |q: &[f32], k: &[f32], v: &[f32]| attention_cpu(q, k, v, &s, scale).iter().zip(&dout).map(|(y, g)| (*y as f64) * (*g as f64)).sum::<f64>();
        let (dq, dk, dv) = attention_backward_cpu(&q, &k, &v, &dout, &s, scale);
        let to32 = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        assert_close("dq vs finite differences", &dq, &to32(finite_difference(&q, 1e-2, |x| loss(x, &k, &v))), 1e-3);
        assert_close("dk vs finite differences", &dk, &to32(finite_difference(&k, 1e-2, |x| loss(&q, x, &v))), 1e-3);
        assert_close("dv vs finite differences", &dv, &to32(finite_difference(&v, 1e-2, |x| loss(&q, &k, x))), 1e-3);
    }

    #[test]
    fn backward_twin_matches_finite_differences() {
        check_backward_twin(AttnShape { batch: 2, q_len: 3, kv_len: 5, heads: 2, head_dim: 3, causal: false });
        check_backward_twin(AttnShape { batch: 1, q_len: 4, kv_len: 4, heads: 2, head_dim: 2, causal: true });
    }

    // ---- GPU tests -------------------------------------------------------------------------

    fn shape(batch: usize, q_len: usize, kv_len: usize, heads: usize, head_dim: usize, causal: bool) -> AttnShape {
        AttnShape { batch, q_len, kv_len, heads, head_dim, causal }
    }

    /// Head `h`, rows [r0, r1) of every batch of a [batch, len, heads·d] array, as [batch, r1 − r0, d].
    fn extract(x: &[f32], s: &AttnShape, len: usize, h: usize, r0: usize, r1: usize) -> Vec<f32> {
        let (w, d) = (s.heads * s.head_dim, s.head_dim);
        (0..s.batch).flat_map(|b| (r0..r1).flat_map(move |i| x[(b * len + i) * w + h * d..][..d].iter().copied())).collect()
    }
    fn insert(dst: &mut [f32], src: &[f32], s: &AttnShape, len: usize, h: usize, r0: usize, r1: usize) {
        let (w, d) = (s.heads * s.head_dim, s.head_dim);
        let mut it = src.chunks(d);
        for b in 0..s.batch {
            for i in r0..r1 {
                dst[(b * len + i) * w + h * d..][..d].copy_from_slice(it.next().unwrap());
            }
        }
    }

    /// The twins, run in parallel threads over heads (and query-row chunks for the forward), so the
    /// 4096-token shapes are compared in full.
    fn forward_twin(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32) -> Vec<f32> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
        let chunks = if s.causal { 1 } else { threads.div_ceil(s.heads).min(s.q_len) };
        let mut out = vec![0f32; q.len()];
        let results: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..s.heads)
                .flat_map(|h| (0..chunks).map(move |c| (h, c)))
                .map(|(h, c)| {
                    let (r0, r1) = (c * s.q_len / chunks, (c + 1) * s.q_len / chunks);
                    sc.spawn(move || {
                        let sub = AttnShape { heads: 1, q_len: r1 - r0, ..*s };
                        let full = AttnShape { q_len: r1 - r0, ..*s };
                        let y = attention_cpu(&extract(q, &full, s.q_len, h, r0, r1), &extract(k, s, s.kv_len, h, 0, s.kv_len), &extract(v, s, s.kv_len, h, 0, s.kv_len), &sub, scale);
                        (h, r0, r1, y)
                    })
                })
                .collect();
            handles.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (h, r0, r1, y) in results {
            insert(&mut out, &y, s, s.q_len, h, r0, r1);
        }
        out
    }

    fn backward_twin(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], s: &AttnShape, scale: f32) -> [Vec<f32>; 3] {
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        let results: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..s.heads)
                .map(|h| {
                    sc.spawn(move || {
                        let sub = AttnShape { heads: 1, ..*s };
                        let (qh, doh) = (extract(q, s, s.q_len, h, 0, s.q_len), extract(dout, s, s.q_len, h, 0, s.q_len));
                        let (kh, vh) = (extract(k, s, s.kv_len, h, 0, s.kv_len), extract(v, s, s.kv_len, h, 0, s.kv_len));
                        (h, attention_backward_cpu(&qh, &kh, &vh, &doh, &sub, scale))
                    })
                })
                .collect();
            handles.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (h, (a, b, c)) in results {
            insert(&mut dq, &a, s, s.q_len, h, 0, s.q_len);
            insert(&mut dk, &b, s, s.kv_len, h, 0, s.kv_len);
            insert(&mut dv, &c, s, s.kv_len, h, 0, s.kv_len);
        }
        [dq, dk, dv]
    }

    /// logsumexp of query row i of head h (f64), for the lse check.
    fn lse_row(q: &[f32], k: &[f32], s: &AttnShape, scale: f32, b: usize, h: usize, i: usize) -> f32 {
        let (w, d) = (s.heads * s.head_dim, s.head_dim);
        let qi = &q[(b * s.q_len + i) * w + h * d..][..d];
        let visible = if s.causal { i + 1 } else { s.kv_len };
        let scores: Vec<f64> = (0..visible)
            .map(|j| qi.iter().zip(&k[(b * s.kv_len + j) * w + h * d..][..d]).map(|(a, c)| (*a as f64) * (*c as f64)).sum::<f64>() * scale as f64)
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32
    }

    use crate::testing::poisoned;
    fn upload(gpu: &Gpu, shape: &[usize], v: &[f32]) -> Tensor {
        crate::testing::upload(gpu, shape, v, DType::BF16)
    }

    struct Inputs {
        seed: u64,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
    }
    fn inputs(s: &AttnShape) -> Inputs {
        let seed = Rng::fresh_seed();
        let mut rng = Rng::new(seed);
        let w = s.heads * s.head_dim;
        let mut r = |n| round_bf16(&rng.normal_vec(n, 1.0));
        Inputs { seed, q: r(s.batch * s.q_len * w), k: r(s.batch * s.kv_len * w), v: r(s.batch * s.kv_len * w), dout: r(s.batch * s.q_len * w) }
    }

    /// Runs the forward on dense operands; returns (out, lse) on the GPU.
    fn gpu_forward(gpu: &Gpu, s: &AttnShape, x: &Inputs, scale: f32) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let w = s.heads * s.head_dim;
        let (q, k, v) = (upload(gpu, &[s.batch, s.q_len, w], &x.q), upload(gpu, &[s.batch, s.kv_len, w], &x.k), upload(gpu, &[s.batch, s.kv_len, w], &x.v));
        let out = poisoned(gpu, &[s.batch, s.q_len, w], DType::BF16);
        let lse = poisoned(gpu, &[s.batch, s.heads, s.q_len], DType::F32);
        attention_forward(gpu, Strided::dense(&q), Strided::dense(&k), Strided::dense(&v), Strided::dense(&out), Some(&lse), s, scale).unwrap();
        (q, k, v, out, lse)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_attention_forward_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let cases = [
            // UNet self and cross attention at SD1.5 shapes
            shape(1, 4096, 4096, 8, 40, false), shape(2, 4096, 77, 8, 40, false),
            shape(2, 1024, 1024, 8, 80, false), shape(1, 1024, 77, 8, 80, false),
            shape(2, 256, 256, 8, 160, false), shape(1, 64, 64, 8, 160, false), shape(1, 256, 77, 8, 160, false), shape(2, 64, 77, 8, 160, false),
            // CLIP (causal) and the VAE mid-block head
            shape(2, 77, 77, 12, 64, true), shape(1, 4096, 4096, 1, 512, false),
            // odd lengths: L = 1, 3, 77, 100, Lk not a multiple of the tile
            shape(1, 1, 1, 8, 40, false), shape(2, 3, 3, 8, 40, false), shape(1, 77, 77, 8, 40, false), shape(2, 100, 77, 8, 40, false),
            shape(1, 3, 100, 8, 40, false), shape(2, 100, 100, 8, 80, false), shape(1, 3, 77, 8, 160, false), shape(1, 100, 100, 8, 160, false),
            shape(1, 1, 1, 12, 64, true), shape(1, 100, 100, 2, 64, true), shape(2, 100, 3, 1, 512, false),
        ];
        for s in cases {
            let x = inputs(&s);
            let scale = 1.0 / (s.head_dim as f32).sqrt();
            let (_q, _k, _v, out, lse) = gpu_forward(&gpu, &s, &x, scale);
            let got = out.to_cpu(&gpu).unwrap().into_vec().unwrap();
            assert_close(&format!("attention forward {s:?} seed={}", x.seed), &got, &forward_twin(&x.q, &x.k, &x.v, &s, scale), 1e-2);
            // logsumexp of a sample of rows (all rows when small)
            let lse = lse.to_cpu(&gpu).unwrap().into_vec().unwrap();
            let step = (s.q_len / 64).max(1);
            let (mut got_l, mut want_l) = (vec![], vec![]);
            for b in 0..s.batch {
                for h in 0..s.heads {
                    for i in (0..s.q_len).step_by(step) {
                        got_l.push(lse[(b * s.heads + h) * s.q_len + i]);
                        want_l.push(lse_row(&x.q, &x.k, &s, scale, b, h, i));
                    }
                }
            }
            assert_close(&format!("attention lse {s:?} seed={}", x.seed), &got_l, &want_l, 1e-3);
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_attention_backward_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let cases = [
            shape(1, 4096, 4096, 8, 40, false), shape(1, 4096, 77, 8, 40, false),
            shape(1, 1024, 1024, 8, 80, false), shape(2, 1024, 77, 8, 80, false),
            shape(2, 256, 256, 8, 160, false), shape(1, 64, 64, 8, 160, false), shape(1, 256, 77, 8, 160, false),
            shape(1, 1, 1, 8, 40, false), shape(2, 3, 3, 8, 40, false), shape(1, 77, 77, 8, 40, false), shape(2, 100, 77, 8, 40, false),
            shape(1, 3, 100, 8, 40, false), shape(2, 100, 100, 8, 80, false), shape(1, 3, 77, 8, 160, false), shape(2, 100, 100, 8, 160, false),
        ];
        for s in cases {
            let x = inputs(&s);
            let scale = 1.0 / (s.head_dim as f32).sqrt();
            let (q, k, v, out, lse) = gpu_forward(&gpu, &s, &x, scale);
            let w = s.heads * s.head_dim;
            let dout = upload(&gpu, &[s.batch, s.q_len, w], &x.dout);
            let (dq, dk, dv) = (poisoned(&gpu, q.shape(), DType::BF16), poisoned(&gpu, k.shape(), DType::BF16), poisoned(&gpu, v.shape(), DType::BF16));
            let ws = AttnWorkspace::new(&gpu, Persistent, &s).unwrap();
            ws.dq_acc.poison(&gpu).unwrap();
            let d = Strided::dense;
            attention_backward(&gpu, d(&q), d(&k), d(&v), d(&out), d(&dout), &lse, d(&dq), d(&dk), d(&dv), &ws, &s, scale).unwrap();
            let want = backward_twin(&x.q, &x.k, &x.v, &x.dout, &s, scale);
            for (name, t, r) in [("dq", &dq, &want[0]), ("dk", &dk, &want[1]), ("dv", &dv, &want[2])] {
                let got = t.to_cpu(&gpu).unwrap().into_vec().unwrap();
                let c = compare(&got, r);
                println!("{name} {s:?}: rel L2 {:.2e}", c.rel_l2);
                assert_close(&format!("attention backward {name} {s:?} seed={}", x.seed), &got, r, 1e-2);
            }
        }
    }

    /// q, k, v as column blocks of one fused [batch, L, 3·width] buffer, and dq, dk, dv written into
    /// one fused gradient buffer: the strided views read and write in place.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_attention_reads_and_writes_fused_qkv() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let s = shape(2, 100, 100, 8, 40, false);
        let w = s.heads * s.head_dim;
        let x = inputs(&s);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let mut fused = vec![0f32; s.batch * s.q_len * 3 * w];
        for (r, row) in fused.chunks_mut(3 * w).enumerate() {
            row[..w].copy_from_slice(&x.q[r * w..][..w]);
            row[w..2 * w].copy_from_slice(&x.k[r * w..][..w]);
            row[2 * w..].copy_from_slice(&x.v[r * w..][..w]);
        }
        let qkv = upload(&gpu, &[s.batch, s.q_len, 3 * w], &fused);
        let col = |t, i: usize| Strided::columns(t, i * w, 3 * w);
        let out = poisoned(&gpu, &[s.batch, s.q_len, w], DType::BF16);
        let lse = poisoned(&gpu, &[s.batch, s.heads, s.q_len], DType::F32);
        attention_forward(&gpu, col(&qkv, 0), col(&qkv, 1), col(&qkv, 2), Strided::dense(&out), Some(&lse), &s, scale).unwrap();
        let got = out.to_cpu(&gpu).unwrap().into_vec().unwrap();
        assert_close(&format!("fused forward seed={}", x.seed), &got, &attention_cpu(&x.q, &x.k, &x.v, &s, scale), 1e-2);

        let dout = upload(&gpu, &[s.batch, s.q_len, w], &x.dout);
        let dqkv = poisoned(&gpu, &[s.batch, s.q_len, 3 * w], DType::BF16);
        let ws = AttnWorkspace::new(&gpu, Persistent, &s).unwrap();
        attention_backward(&gpu, col(&qkv, 0), col(&qkv, 1), col(&qkv, 2), Strided::dense(&out), Strided::dense(&dout), &lse,
            col(&dqkv, 0), col(&dqkv, 1), col(&dqkv, 2), &ws, &s, scale).unwrap();
        let got = dqkv.to_cpu(&gpu).unwrap().into_vec().unwrap();
        let (dq, dk, dv) = attention_backward_cpu(&x.q, &x.k, &x.v, &x.dout, &s, scale);
        for (i, (name, r)) in [("dq", dq), ("dk", dk), ("dv", dv)].into_iter().enumerate() {
            let part: Vec<f32> = got.chunks(3 * w).flat_map(|row| row[i * w..][..w].iter().copied()).collect();
            assert_close(&format!("fused {name} seed={}", x.seed), &part, &r, 1e-2);
        }
    }
}
