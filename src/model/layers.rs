//! The layers the models are built from — diffusers' nn.Linear (optionally LoRA-wrapped, as PEFT
//! wraps it), nn.Conv2d, nn.GroupNorm and nn.LayerNorm — each with its forward and its
//! input-gradient backward. Frozen weights get no gradients; only LoRA factors do.
//!
//! Every call takes a [`Dev`]. On `Dev::Cpu` the f32 CPU twins from `crate::ops` run (this is how
//! the models are checked against diffusers in CI); on `Dev::Gpu` the kernels run on bf16
//! activations allocated from the scratch arena, with frozen weights in bf16 and LoRA factors in
//! f32 (master copy and gradients) plus a bf16 copy for the GEMMs.

use crate::checkpoint::LoraLayer;
use crate::cuda::{ArenaKind, Gpu};
use crate::model::weights::Weights;
use crate::ops::{conv, gemm, lora, norm};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// Where a model runs.
#[derive(Clone, Copy)]
pub enum Dev<'g> {
    Cpu,
    Gpu(&'g Gpu),
}

impl<'g> Dev<'g> {
    /// The GPU, if this is one.
    pub fn gpu(&self) -> Option<&'g Gpu> {
        match self {
            Dev::Cpu => None,
            Dev::Gpu(g) => Some(g),
        }
    }

    /// A frozen weight on this device (bf16 on the GPU).
    pub fn weight(&self, t: Tensor) -> Result<Tensor> {
        match self {
            Dev::Cpu => Ok(t),
            Dev::Gpu(g) => t.to_gpu(g, ArenaKind::Persistent, DType::BF16),
        }
    }

    /// A trained value or gradient on this device (f32 everywhere).
    pub fn master(&self, t: Tensor) -> Result<Tensor> {
        match self {
            Dev::Cpu => Ok(t),
            Dev::Gpu(g) => t.to_gpu(g, ArenaKind::Persistent, DType::F32),
        }
    }

    /// An activation-sized output of `shape` on the GPU (scratch arena, bf16).
    pub(crate) fn scratch(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
        Tensor::empty_gpu(gpu, ArenaKind::Scratch, shape, DType::BF16)
    }
}

pub(crate) fn cpu(t: &Tensor) -> Result<&[f32]> {
    t.data()
}

fn add_residual_cpu(mut y: Vec<f32>, residual: Option<&Tensor>) -> Result<Vec<f32>> {
    if let Some(r) = residual {
        ensure!(r.numel() == y.len(), "residual {:?} does not match the output's {} values", r.shape(), y.len());
        y.iter_mut().zip(r.data()?).for_each(|(y, r)| *y += r);
    }
    Ok(y)
}

/// Rows of a token or pixel tensor: every dimension but the last.
pub(crate) fn rows(t: &Tensor) -> usize {
    t.numel() / t.shape().last().copied().unwrap_or(1)
}

pub(crate) fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    *s.last_mut().unwrap() = last;
    s
}

/// Trainable low-rank adapter of one Linear: Δy = scale·(x·Aᵀ)·Bᵀ, PEFT's `lora_A`/`lora_B`.
/// `a`, `b` and the gradients are f32 on the model's device; on the GPU `a16`/`b16` are the bf16
/// copies the GEMMs read: views into one flat buffer that the AdamW update rewrites.
pub struct LoraAdapter {
    pub rank: usize,
    pub alpha: f32,
    pub a: Tensor,
    pub b: Tensor,
    pub grad_a: Tensor,
    pub grad_b: Tensor,
    a16: Option<Tensor>,
    b16: Option<Tensor>,
    /// Per-layer AdamW (GPU): when set, the backward writes this adapter's gradients to a scratch
    /// buffer and updates A and B from it at once, instead of accumulating into `grad_a`/`grad_b`.
    pub update: Option<LayerUpdate>,
    /// GPU: the last forward's u_s = s·x·Aᵀ (scratch) and the input it came from (pointer, shape),
    /// kept for the backward, which recomputes u only when given another input (saving u is the
    /// faster choice: benches/RESULTS.md).
    saved_u: std::cell::RefCell<Option<(Tensor, u64, Vec<usize>)>>,
    /// Per-layer AdamW: the gradients a backward queued (scratch), to apply once computed.
    queued_grads: Option<Tensor>,
    /// GPU: v_s computed ahead for the next backward (keyed by dy's pointer) by
    /// [`prepare_lora_backwards`].
    prepared_v: std::cell::RefCell<Option<(Tensor, u64)>>,
}

/// One adapter's share of the optimizer, for AdamW applied inside the backward: f32 views of its
/// A-then-B values in the optimizer's flat buffer, the bf16 copy, its moments, the shared schedule.
pub struct LayerUpdate {
    pub params: Tensor,
    pub params16: Tensor,
    pub moments: LayerMoments,
    pub schedule: std::sync::Arc<crate::ops::adamw::AdamWSchedule>,
}

/// An adapter's view of the optimizer's moments: f32 m and v, or 8-bit codes (`--adamw-8bit`).
pub enum LayerMoments {
    F32 { m: Tensor, v: Tensor },
    EightBit(crate::ops::adamw8bit::DeviceMoments8),
}

impl LayerUpdate {
    fn apply(&mut self, gpu: &Gpu, grads: &Tensor) -> Result<()> {
        let copy = Some(&mut self.params16);
        match &mut self.moments {
            LayerMoments::F32 { m, v } => self.schedule.step(gpu, &mut self.params, copy, grads, m, v),
            LayerMoments::EightBit(q) => self.schedule.step_8bit(gpu, &mut self.params, copy, grads, q),
        }
    }
}

impl LoraAdapter {
    /// An adapter over given f32 tensors on the model's device: A [r, in], B [out, r] and their
    /// gradients (zero). On the GPU these are views into the flat buffers the optimizer updates,
    /// and `copies` the bf16 views (A, B) the GEMMs read.
    pub fn new(alpha: f32, a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor, copies: Option<(Tensor, Tensor)>) -> LoraAdapter {
        let (a16, b16) = copies.unzip();
        LoraAdapter { rank: a.shape()[0], alpha, a, b, grad_a, grad_b, a16, b16, update: None, saved_u: Default::default(), queued_grads: None, prepared_v: Default::default() }
    }

    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The adapter's values as a checkpoint layer (downloaded from the GPU if needed).
    pub fn to_layer(&self, dev: Dev) -> Result<LoraLayer> {
        let host = |t: &Tensor| match dev {
            Dev::Cpu => t.data().map(<[f32]>::to_vec),
            Dev::Gpu(g) => t.to_cpu(g)?.into_vec(),
        };
        let (a, b) = (host(&self.a)?, host(&self.b)?);
        Ok(LoraLayer { rank: self.rank, in_features: self.a.shape()[1], out_features: self.b.shape()[0], alpha: self.alpha, a, b })
    }

    fn on_gpu<'a>(&'a self, w: &'a Tensor, bias: Option<&'a Tensor>) -> lora::LoraLinear<'a> {
        lora::LoraLinear { w, bias, a: self.a16.as_ref().unwrap(), b: self.b16.as_ref().unwrap(), scale: self.scale() }
    }
}

/// nn.Linear with weight [out, in] (or a 1×1 conv seen as one), optionally LoRA-wrapped.
pub struct Linear {
    pub in_f: usize,
    pub out_f: usize,
    w: Tensor,
    b: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`); `as_conv1x1` for 1×1 conv weights.
    pub fn load(dev: Dev, w: &Weights, prefix: &str, in_f: usize, out_f: usize, bias: bool, as_conv1x1: bool) -> Result<Linear> {
        let shape: Vec<usize> = if as_conv1x1 { vec![out_f, in_f, 1, 1] } else { vec![out_f, in_f] };
        let weight = dev.weight(Tensor::from_vec(&[out_f, in_f], w.vec(&format!("{prefix}.weight"), &shape)?)?)?;
        let b = if bias { Some(dev.weight(w.tensor(&format!("{prefix}.bias"), &[out_f])?)?) } else { None };
        Ok(Linear { in_f, out_f, w: weight, b, lora: None })
    }

    /// y = x·Wᵀ + b (+ LoRA) over the rows of x [.., in].
    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        self.forward_add(dev, x, None)
    }

    /// y = x·Wᵀ + b (+ LoRA) (+ residual, shaped like y), the add fused into the GEMM's epilogue.
    pub fn forward_add(&self, dev: Dev, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        ensure!(x.shape().last() == Some(&self.in_f), "linear: input {:?} does not end in {}", x.shape(), self.in_f);
        let (m, out_shape) = (rows(x), with_last(x.shape(), self.out_f));
        match dev {
            Dev::Cpu => {
                let bias = self.b.as_ref().map(|b| b.data()).transpose()?;
                let y = match &self.lora {
                    None => gemm::linear_cpu(cpu(x)?, m, self.in_f, cpu(&self.w)?, self.out_f, bias),
                    Some(l) => {
                        let s = lora::LoraShape { m, in_f: self.in_f, out_f: self.out_f, rank: l.rank };
                        lora::lora_forward_cpu(cpu(x)?, cpu(&self.w)?, bias, cpu(&l.a)?, cpu(&l.b)?, l.scale(), &s)
                    }
                };
                Tensor::from_vec(&out_shape, add_residual_cpu(y, residual)?)
            }
            Dev::Gpu(g) => {
                let mut y = Dev::scratch(g, &out_shape)?;
                match &self.lora {
                    None => gemm::linear(g, x, &self.w, self.b.as_ref(), residual, &mut y)?,
                    Some(l) => {
                        let mut us = Dev::scratch(g, &[m, l.rank])?;
                        lora::lora_forward(g, &l.on_gpu(&self.w, self.b.as_ref()), x, &mut us, residual, &mut y)?;
                        *l.saved_u.borrow_mut() = Some((us, x.ptr()?, x.shape().to_vec()));
                    }
                }
                Ok(y)
            }
        }
    }

    /// The forwards of several linears without LoRA, `(linear, x, row)` each (every resnet's
    /// time_emb_proj of the one time embedding), plus `row` [out] added to every output row when
    /// given: on a Hopper in grouped launches of up to eight (the row added in the epilogue), else
    /// one by one.
    pub fn forward_many(dev: Dev, items: &[(&Linear, &Tensor, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
        let gpu = match dev {
            Dev::Gpu(g) if items.iter().all(|(l, _, _)| l.lora.is_none()) => g,
            _ => return items.iter().map(|(l, x, row)| l.forward(dev, x).and_then(|y| add_row(dev, y, *row))).collect(),
        };
        let mut outputs = Vec::with_capacity(items.len());
        let mut gemms = Vec::with_capacity(items.len());
        for (l, x, row) in items {
            if let Some(r) = row {
                ensure!(r.numel() == l.out_f && r.dtype() == DType::BF16, "linear: row {:?} must be bf16 [{}]", r.shape(), l.out_f);
            }
            ensure!(x.shape().last() == Some(&l.in_f), "linear: input {:?} does not end in {}", x.shape(), l.in_f);
            let y = Dev::scratch(gpu, &with_last(x.shape(), l.out_f))?;
            gemms.push(crate::ops::gemm_sm90_split::GroupGemm {
                m: rows(x),
                n: l.out_f,
                seg1: gemm::Segment { a: x.ptr()?, lda: l.in_f, b: l.w.ptr()?, ldb: l.in_f, k: l.in_f },
                seg2: Default::default(),
                alpha: 1.0,
                bias: l.b.as_ref().map(|b| b.ptr()).transpose()?,
                c: y.ptr()?,
                residual: row.map(|r| r.ptr().map(|p| (p, 0))).transpose()?,
            });
            outputs.push(y);
        }
        crate::ops::gemm_sm90_split::gemm_many(gpu, gemm::Layouts::Kk, DType::BF16, &gemms)?;
        Ok(outputs)
    }

    /// The forwards of several LoRA linears, `(linear, x)` each (an attention's q, k and v): on the
    /// GPU their down-projections u = s·x·Aᵀ in one grouped launch, then their fused GEMMs in
    /// another where the outputs are small (see `ops::gemm_sm90_split::gemm_many`), else one by
    /// one as [`Linear::forward`].
    pub fn forward_lora_group(dev: Dev, items: &[(&Linear, &Tensor)]) -> Result<Vec<Tensor>> {
        let gpu = match dev {
            Dev::Gpu(g) if items.iter().all(|(l, _)| l.lora.is_some()) => g,
            _ => return items.iter().map(|(l, x)| l.forward(dev, x)).collect(),
        };
        let mut layers = Vec::with_capacity(items.len());
        let (mut us, mut ys) = (Vec::with_capacity(items.len()), Vec::with_capacity(items.len()));
        for (linear, x) in items {
            ensure!(x.shape().last() == Some(&linear.in_f), "linear: input {:?} does not end in {}", x.shape(), linear.in_f);
            let l = linear.lora.as_ref().expect("checked above");
            layers.push(l.on_gpu(&linear.w, linear.b.as_ref()));
            us.push(Dev::scratch(gpu, &[rows(x), l.rank])?);
            ys.push(Dev::scratch(gpu, &with_last(x.shape(), linear.out_f))?);
        }
        let downs: Vec<_> = layers.iter().zip(items).zip(&us).map(|((ll, (_, x)), u)| (ll, *x, u)).collect();
        lora::lora_down_many(gpu, &downs)?;
        let ups: Vec<_> = layers.iter().zip(items).zip(us.iter().zip(&ys)).map(|((ll, (_, x)), (u, y))| (ll, *x, u, y)).collect();
        lora::lora_up_many(gpu, &ups)?;
        for ((linear, x), u) in items.iter().zip(us) {
            *linear.lora.as_ref().expect("checked above").saved_u.borrow_mut() = Some((u, x.ptr()?, x.shape().to_vec()));
        }
        Ok(ys)
    }

    /// Drops the LoRA down-projection u kept from the forward for the backward (inference).
    pub fn forget(&self) {
        if let Some(l) = &self.lora {
            l.saved_u.take();
            l.prepared_v.take();
        }
    }

    /// dx of a layer without LoRA (frozen: no gradient but the input's).
    pub fn backward_input(&self, dev: Dev, dy: &Tensor) -> Result<Tensor> {
        ensure!(self.lora.is_none(), "backward_input on a LoRA-adapted linear: use backward");
        let shape = with_last(dy.shape(), self.in_f);
        match dev {
            Dev::Cpu => Tensor::from_vec(&shape, gemm::linear_input_grad_cpu(cpu(dy)?, rows(dy), self.out_f, cpu(&self.w)?, self.in_f)),
            Dev::Gpu(g) => {
                let mut dx = Dev::scratch(g, &shape)?;
                gemm::linear_input_grad(g, dy, &self.w, false, &mut dx)?;
                Ok(dx)
            }
        }
    }

    /// Accumulates the LoRA gradients (when adapted; `x` is the forward's input) and returns dx
    /// when `want_dx`. The LoRA down-projection u = s·x·Aᵀ is the one the last forward saved when
    /// that forward read this same `x`, else it is recomputed.
    pub fn backward(&mut self, dev: Dev, x: &Tensor, dy: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let mut grads = lora::WeightGradBatch::default();
        let dx = self.backward_queued(dev, x, dy, want_dx, None, &mut grads)?;
        finish_weight_grads(dev, grads, &mut [self])?;
        Ok(dx)
    }

    /// [`Linear::backward`] that queues the LoRA weight gradients on `grads` (GPU; computed now on
    /// the CPU) and returns `into` + dx when given `into` (on the GPU the GEMM's epilogue adds dx
    /// to it in place). Finish with [`finish_weight_grads`], which also runs a per-layer AdamW.
    pub fn backward_queued(&mut self, dev: Dev, x: &Tensor, dy: &Tensor, want_dx: bool, into: Option<Tensor>, grads: &mut lora::WeightGradBatch) -> Result<Option<Tensor>> {
        if let (Dev::Cpu, Some(acc)) = (dev, &into) {
            let dx = self.backward_queued(dev, x, dy, true, None, grads)?.ok_or_else(|| anyhow::anyhow!("no input gradient"))?;
            let shape = dx.shape().to_vec();
            return Tensor::from_vec(&shape, add_residual_cpu(dx.into_vec()?, Some(acc))?).map(Some);
        }
        let Some(l) = &mut self.lora else {
            return match (want_dx, into, dev) {
                (false, _, _) => Ok(None),
                (true, Some(mut acc), Dev::Gpu(g)) => {
                    gemm::linear_input_grad(g, dy, &self.w, true, &mut acc)?;
                    Ok(Some(acc))
                }
                (true, _, _) => self.backward_input(dev, dy).map(Some),
            };
        };
        let (m, shape) = (rows(dy), with_last(dy.shape(), self.in_f));
        match dev {
            Dev::Cpu => {
                let s = lora::LoraShape { m, in_f: self.in_f, out_f: self.out_f, rank: l.rank };
                let g = lora::lora_backward_cpu(cpu(x)?, cpu(&self.w)?, cpu(&l.a)?, cpu(&l.b)?, l.scale(), cpu(dy)?, &s);
                l.grad_a.data_mut()?.iter_mut().zip(&g.da).for_each(|(acc, v)| *acc += v);
                l.grad_b.data_mut()?.iter_mut().zip(&g.db).for_each(|(acc, v)| *acc += v);
                want_dx.then(|| Tensor::from_vec(&shape, g.dx)).transpose()
            }
            Dev::Gpu(gpu) => {
                let saved = l.saved_u.take().filter(|(_, ptr, shape)| x.ptr().ok() == Some(*ptr) && x.shape() == shape.as_slice());
                let dx_accumulate = into.is_some();
                let (vs, vs_ready) = match l.prepared_v.take().filter(|(v, ptr)| *ptr == dy.ptr().unwrap_or(0) && rows(v) == m) {
                    Some((vs, _)) => (vs, true),
                    None => (Dev::scratch(gpu, &[m, l.rank])?, false),
                };
                let mut dx = match into {
                    Some(acc) => {
                        ensure!(acc.shape() == shape.as_slice(), "linear backward: {:?} cannot take a gradient of shape {shape:?}", acc.shape());
                        acc
                    }
                    None => Dev::scratch(gpu, &shape)?,
                };
                // With per-layer AdamW this adapter's gradients live only until its update.
                ensure!(l.queued_grads.is_none(), "linear backward: the last backward's per-layer gradients were never applied");
                let layer_grads = match &l.update {
                    Some(_) => Some(Tensor::empty_gpu(gpu, ArenaKind::Scratch, &[l.a.numel() + l.b.numel()], DType::F32)?),
                    None => None,
                };
                let (grad_a, grad_b) = match &layer_grads {
                    Some(g) => (g.gpu_view(0, l.a.shape())?, g.gpu_view(l.a.numel(), l.b.shape())?),
                    None => (l.grad_a.clone(), l.grad_b.clone()),
                };
                let ll = l.on_gpu(&self.w, self.b.as_ref());
                let us = match saved {
                    Some((us, _, _)) => us,
                    None => {
                        let mut us = Dev::scratch(gpu, &[m, l.rank])?;
                        lora::lora_down(gpu, &ll, x, &mut us)?;
                        us
                    }
                };
                let out = lora::LoraBackwardOut { dx: &mut dx, da: &grad_a, db: &grad_b, vs: &vs, vs_ready };
                lora::lora_backward(gpu, &ll, x, &us, dy, out, dx_accumulate, layer_grads.is_none(), grads)?;
                l.queued_grads = layer_grads;
                Ok(want_dx.then_some(dx))
            }
        }
    }

    /// With per-layer AdamW (GPU), the update from the gradients the last backward queued, once
    /// they are computed.
    fn apply_queued_update(&mut self, gpu: &Gpu) -> Result<()> {
        if let Some(l) = &mut self.lora {
            if let (Some(update), Some(grads)) = (&mut l.update, l.queued_grads.take()) {
                update.apply(gpu, &grads)?;
            }
        }
        Ok(())
    }
}

/// Computes ahead, together (one grouped launch on a Hopper), the first step of the LoRA backward
/// of several linears, v_s = s·dy·B, `(linear, dy)` each (an attention's q, k and v); each
/// backward with that same dy then starts from its own.
pub fn prepare_lora_backwards(dev: Dev, grads: &[(&Linear, &Tensor)]) -> Result<()> {
    let Dev::Gpu(gpu) = dev else { return Ok(()) };
    let adapted: Vec<(&Linear, &LoraAdapter, &Tensor)> = grads.iter().filter_map(|(linear, dy)| linear.lora.as_ref().map(|l| (*linear, l, *dy))).collect();
    let vs: Vec<Tensor> = adapted.iter().map(|(_, l, dy)| Dev::scratch(gpu, &[rows(dy), l.rank])).collect::<Result<_>>()?;
    let layers: Vec<lora::LoraLinear> = adapted.iter().map(|(linear, l, _)| l.on_gpu(&linear.w, linear.b.as_ref())).collect();
    let items: Vec<(&lora::LoraLinear, &Tensor, &Tensor)> = layers.iter().zip(&adapted).zip(&vs).map(|((ll, (_, _, dy)), v)| (ll, *dy, v)).collect();
    lora::lora_v_many(gpu, &items)?;
    for ((_, l, dy), v) in adapted.iter().zip(vs) {
        *l.prepared_v.borrow_mut() = Some((v, dy.ptr()?));
    }
    Ok(())
}

/// Computes the LoRA weight gradients queued by [`Linear::backward_queued`] (GPU; nothing to do on
/// the CPU), then the per-layer AdamW updates of `linears` (those that queued them).
pub fn finish_weight_grads(dev: Dev, grads: lora::WeightGradBatch, linears: &mut [&mut Linear]) -> Result<()> {
    if let Dev::Gpu(gpu) = dev {
        grads.finish(gpu)?;
        for linear in linears {
            linear.apply_queued_update(gpu)?;
        }
    }
    Ok(())
}

/// y + `row` broadcast over y's rows (a row of y's width), or y itself without one.
fn add_row(dev: Dev, y: Tensor, row: Option<&Tensor>) -> Result<Tensor> {
    let Some(row) = row else { return Ok(y) };
    let n = *y.shape().last().unwrap_or(&1);
    ensure!(row.numel() == n, "row {:?} does not match the width {n}", row.shape());
    let shape = y.shape().to_vec();
    super::functional::add_channel_bias(dev, &y.reshape(&[1, y.numel() / n, n])?, &row.reshape(&[1, n])?)?.reshape(&shape)
}

impl Linear {
    /// Folds a LoRA layer into the frozen weight, W ← W + scale·B·A (diffusers' `fuse_lora`): the
    /// same function afterwards at the cost of the plain linear. On the GPU the product runs in
    /// the GEMM (bf16 factors, f32 accumulation, W added in the epilogue, one rounding to bf16).
    pub fn merge_lora(&mut self, dev: Dev, l: &LoraLayer) -> Result<()> {
        let (o, i, r) = (self.out_f, self.in_f, l.rank);
        ensure!((l.in_features, l.out_features) == (i, o), "LoRA {}→{} merged into a {i}→{o} linear", l.in_features, l.out_features);
        let s = l.scale();
        match dev {
            Dev::Cpu => {
                let w = self.w.data_mut()?;
                for (row, b_row) in w.chunks_exact_mut(i).zip(l.b.chunks_exact(r)) {
                    for (a_row, &b) in l.a.chunks_exact(i).zip(b_row) {
                        row.iter_mut().zip(a_row).for_each(|(w, &a)| *w += s * b * a);
                    }
                }
            }
            Dev::Gpu(g) => {
                // ΔW = (s·B)[o, r]·(Aᵀ)[i, r]ᵀ with r padded by zeros to the GEMM's multiple of 8.
                let rp = r.next_multiple_of(8);
                let mut bs = vec![0.0; o * rp];
                let mut at = vec![0.0; i * rp];
                for (k, b) in l.b.iter().enumerate() {
                    bs[(k / r) * rp + k % r] = s * b;
                }
                for (k, a) in l.a.iter().enumerate() {
                    at[(k % i) * rp + k / i] = *a;
                }
                let bs = Tensor::from_vec(&[o, rp], bs)?.to_gpu(g, ArenaKind::Scratch, DType::BF16)?;
                let at = Tensor::from_vec(&[i, rp], at)?.to_gpu(g, ArenaKind::Scratch, DType::BF16)?;
                let mut merged = Tensor::empty_gpu(g, ArenaKind::Persistent, &[o, i], DType::BF16)?;
                gemm::linear(g, &bs, &at, None, Some(&self.w), &mut merged)?;
                self.w = merged;
            }
        }
        Ok(())
    }
}

/// nn.Conv2d on NHWC activations, weights reordered to [out, k, k, in] at load.
pub struct Conv2d {
    pub in_ch: usize,
    pub out_ch: usize,
    kernel: usize,
    stride: usize,
    w: Tensor,
    b: Tensor,
}

impl Conv2d {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, in_ch: usize, out_ch: usize, kernel: usize, stride: usize) -> Result<Conv2d> {
        let weight = Tensor::from_vec(&[out_ch, kernel, kernel, in_ch], w.conv_ohwi(&format!("{prefix}.weight"), out_ch, in_ch, kernel)?)?;
        Ok(Conv2d { in_ch, out_ch, kernel, stride, w: dev.weight(weight)?, b: dev.weight(w.tensor(&format!("{prefix}.bias"), &[out_ch])?)? })
    }

    fn geometry(&self, x_shape: &[usize]) -> Result<conv::Conv2dShape> {
        ensure!(x_shape.len() == 4 && x_shape[3] == self.in_ch, "conv2d: input {x_shape:?} is not NHWC with {} channels", self.in_ch);
        Ok(conv::Conv2dShape {
            batch: x_shape[0],
            height: x_shape[1],
            width: x_shape[2],
            in_ch: self.in_ch,
            out_ch: self.out_ch,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.kernel / 2,
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<Tensor> {
        self.forward_add(dev, x, None)
    }

    /// The bias b [out_ch].
    pub fn bias(&self) -> &Tensor {
        &self.b
    }

    /// conv(x) + b (+ residual, shaped like the output), the add fused into the conv's epilogue.
    pub fn forward_add(&self, dev: Dev, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.forward_biased(dev, x, &self.b, residual)
    }

    /// conv(x) + `bias` [out_ch] in place of b (+ residual): a per-channel term folded into b.
    pub fn forward_biased(&self, dev: Dev, x: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        ensure!(bias.numel() == self.out_ch, "conv: bias {:?} must hold {} values", bias.shape(), self.out_ch);
        let s = self.geometry(x.shape())?;
        let (oh, ow) = s.out_hw();
        let shape = [s.batch, oh, ow, s.out_ch];
        match dev {
            Dev::Cpu => Tensor::from_vec(&shape, add_residual_cpu(conv::conv2d_cpu(cpu(x)?, &s, cpu(&self.w)?, Some(cpu(bias)?)), residual)?),
            Dev::Gpu(g) => {
                let mut y = Dev::scratch(g, &shape)?;
                conv::conv2d(g, conv::ConvSource { x, skip: None, upsample2x: false }, &s, &self.w, Some(bias), residual, &mut y)?;
                Ok(y)
            }
        }
    }

    /// dx for an input of shape `x_shape`.
    pub fn backward(&self, dev: Dev, x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
        let s = self.geometry(x_shape)?;
        match dev {
            Dev::Cpu => Tensor::from_vec(x_shape, conv::conv2d_backward_input_cpu(cpu(dy)?, &s, cpu(&self.w)?)),
            Dev::Gpu(g) => {
                let mut dx = Dev::scratch(g, x_shape)?;
                conv::conv2d_backward_input(g, dy, &s, &self.w, false, &mut dx, None)?;
                Ok(dx)
            }
        }
    }
}

/// Per-row or per-group mean and 1/std saved by a norm's forward for its backward (GPU only; the
/// CPU twins recompute them).
pub struct NormStats(Option<Tensor>);

/// nn.GroupNorm over NHWC [n, h, w, c] (or tokens [n, l, c]), optionally followed by SiLU.
pub struct GroupNorm {
    groups: usize,
    eps: f32,
    gamma: Tensor,
    beta: Tensor,
}

impl GroupNorm {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, channels: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        ensure!(channels.is_multiple_of(groups), "{prefix}: {channels} channels do not split into {groups} groups");
        if let Dev::Gpu(_) = dev {
            ensure!(groups == norm::GROUPS, "{prefix}: the GPU GroupNorm has {} groups, the model {groups}", norm::GROUPS);
        }
        Ok(GroupNorm {
            groups,
            eps,
            gamma: dev.weight(w.tensor(&format!("{prefix}.weight"), &[channels])?)?,
            beta: dev.weight(w.tensor(&format!("{prefix}.bias"), &[channels])?)?,
        })
    }

    fn dims(x: &Tensor) -> (usize, usize, usize) {
        let s = x.shape();
        (s[0], x.numel() / s[0] / s[s.len() - 1], s[s.len() - 1])
    }

    pub fn forward(&self, dev: Dev, x: &Tensor, silu: bool) -> Result<(Tensor, NormStats)> {
        let (n, hw, c) = Self::dims(x);
        match dev {
            Dev::Cpu => {
                let y = norm::group_norm_cpu(cpu(x)?, n, hw, c, self.groups, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps);
                let y = if silu { crate::ops::elementwise::silu_cpu(&y) } else { y };
                Ok((Tensor::from_vec(x.shape(), y)?, NormStats(None)))
            }
            Dev::Gpu(g) => {
                let (mut y, mut stats) = (Dev::scratch(g, &[n, hw, c])?, Tensor::empty_gpu(g, ArenaKind::Scratch, &[n, self.groups, 2], DType::F32)?);
                norm::group_norm(g, &x.reshape(&[n, hw, c])?, &self.gamma, &self.beta, self.eps, silu, &mut y, &mut stats)?;
                Ok((y.reshape(x.shape())?, NormStats(Some(stats))))
            }
        }
    }

    /// dx, plus `residual` (the gradient of a residual branch around the norm) when given.
    pub fn backward(&self, dev: Dev, x: &Tensor, stats: &NormStats, dy: &Tensor, silu: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let (n, hw, c) = Self::dims(x);
        match (dev, &stats.0) {
            (Dev::Cpu, _) => {
                let dx = norm::group_norm_backward_cpu(cpu(x)?, n, hw, c, self.groups, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps, silu, cpu(dy)?);
                Tensor::from_vec(x.shape(), add_residual_cpu(dx, residual)?)
            }
            (Dev::Gpu(g), Some(stats)) => {
                let mut dx = Dev::scratch(g, &[n, hw, c])?;
                let residual = residual.map(|r| r.reshape(&[n, hw, c])).transpose()?;
                norm::group_norm_backward(g, &x.reshape(&[n, hw, c])?, &self.gamma, &self.beta, stats, silu, &dy.reshape(&[n, hw, c])?, residual.as_ref(), &mut dx)?;
                dx.reshape(x.shape())
            }
            (Dev::Gpu(_), None) => anyhow::bail!("group_norm backward: no statistics from a GPU forward"),
        }
    }
}

/// nn.LayerNorm over the last dimension.
pub struct LayerNorm {
    eps: f32,
    gamma: Tensor,
    beta: Tensor,
}

impl LayerNorm {
    pub fn load(dev: Dev, w: &Weights, prefix: &str, channels: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            eps,
            gamma: dev.weight(w.tensor(&format!("{prefix}.weight"), &[channels])?)?,
            beta: dev.weight(w.tensor(&format!("{prefix}.bias"), &[channels])?)?,
        })
    }

    pub fn forward(&self, dev: Dev, x: &Tensor) -> Result<(Tensor, NormStats)> {
        let (r, c) = (rows(x), *x.shape().last().unwrap());
        match dev {
            Dev::Cpu => Ok((Tensor::from_vec(x.shape(), norm::layer_norm_cpu(cpu(x)?, r, c, cpu(&self.gamma)?, cpu(&self.beta)?, self.eps))?, NormStats(None))),
            Dev::Gpu(g) => {
                let (mut y, mut stats) = (Dev::scratch(g, x.shape())?, Tensor::empty_gpu(g, ArenaKind::Scratch, &[r, 2], DType::F32)?);
                norm::layer_norm(g, x, &self.gamma, &self.beta, self.eps, &mut y, &mut stats)?;
                Ok((y, NormStats(Some(stats))))
            }
        }
    }

    /// dx, plus `residual` (the gradient of the residual branch around the norm) when given.
    pub fn backward(&self, dev: Dev, x: &Tensor, stats: &NormStats, dy: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (r, c) = (rows(x), *x.shape().last().unwrap());
        match (dev, &stats.0) {
            (Dev::Cpu, _) => {
                let dx = norm::layer_norm_backward_cpu(cpu(x)?, r, c, cpu(&self.gamma)?, self.eps, cpu(dy)?);
                Tensor::from_vec(x.shape(), add_residual_cpu(dx, residual)?)
            }
            (Dev::Gpu(g), Some(stats)) => {
                let mut dx = Dev::scratch(g, x.shape())?;
                norm::layer_norm_backward(g, x, &self.gamma, stats, dy, residual, &mut dx)?;
                Ok(dx)
            }
            (Dev::Gpu(_), None) => anyhow::bail!("layer_norm backward: no statistics from a GPU forward"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_many_adds_the_row_to_every_output_row() {
        let w = Tensor::from_vec(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let linear = Linear { in_f: 2, out_f: 3, w, b: Some(Tensor::from_vec(&[3], vec![0.5, 0.0, -0.5]).unwrap()), lora: None };
        let x = Tensor::from_vec(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
        let row = Tensor::from_vec(&[3], vec![10.0, 20.0, 30.0]).unwrap();
        let ys = Linear::forward_many(Dev::Cpu, &[(&linear, &x, Some(&row)), (&linear, &x, None)]).unwrap();
        assert_eq!(ys[0].data().unwrap(), [11.5, 23.0, 34.5, 12.5, 24.0, 35.5]);
        assert_eq!(ys[1].data().unwrap(), [1.5, 3.0, 4.5, 2.5, 4.0, 5.5]);
    }
}
