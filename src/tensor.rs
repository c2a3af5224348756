//! `Tensor` = shape + dtype + storage, on the CPU (always f32) or on the GPU (f32 or bf16).
//!
//! **Layout convention.** Row-major, last dimension fastest. Image-like activations are **NHWC**
//! (`[batch, height, width, channels]`: channels last), so a 1x1 convolution is a GEMM over
//! `[batch·height·width, channels]` and a Transformer2D needs no transpose; token activations are
//! `[batch, tokens, features]`; linear weights keep PyTorch's `[out, in]`; conv weights are reordered
//! at load from PyTorch's OIHW to `[out, kh, kw, in]`.
//!
//! Tensors do not own a stream or run kernels: ops in `crate::ops` take a [`Gpu`] and tensors.
//! A GPU tensor's memory comes from one of the [`Gpu`]'s arenas.

use crate::cuda::{ArenaKind, DeviceBuffer, Gpu};
use anyhow::{bail, ensure, Context, Result};
use half::bf16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
    /// Suffix of kernel names specialized for this type ("f32", "bf16").
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
    Cuda(DeviceBuffer),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    /// A CPU tensor holding `data` (row-major).
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, "shape {shape:?} holds {n} values, got {}", data.len());
        Ok(Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Cpu(data) })
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Cpu(vec![0.0; n]) }
    }

    /// Uninitialized GPU tensor from `arena`.
    pub fn empty_gpu(gpu: &Gpu, arena: ArenaKind, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let buf = gpu.alloc(arena, n * dtype.size())?;
        Ok(Tensor { shape: shape.to_vec(), dtype, storage: Storage::Cuda(buf) })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_gpu(&self) -> bool {
        matches!(self.storage, Storage::Cuda(_))
    }

    /// The same storage seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(n == self.numel(), "cannot reshape {:?} to {shape:?}", self.shape);
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: self.storage.clone() })
    }

    /// `shape`-many values starting `offset` values into a GPU tensor, sharing its memory.
    pub fn gpu_view(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let Storage::Cuda(buf) = &self.storage else { bail!("gpu_view of a CPU tensor") };
        let n: usize = shape.iter().product();
        let size = self.dtype.size();
        let view = buf.slice(offset * size, n * size).with_context(|| format!("view of {n} values at {offset} outside {:?}", self.shape))?;
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: Storage::Cuda(view) })
    }

    /// The values of a CPU tensor.
    pub fn data(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => bail!("tensor {:?} is on the GPU; call to_cpu first", self.shape),
        }
    }

    pub fn data_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => bail!("tensor {:?} is on the GPU; call to_cpu first", self.shape),
        }
    }

    pub fn into_vec(self) -> Result<Vec<f32>> {
        match self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => bail!("tensor {:?} is on the GPU; call to_cpu first", self.shape),
        }
    }

    /// The values on the host, wherever the tensor is (downloads a GPU tensor as f32).
    pub fn into_host(self, gpu: Option<&Gpu>) -> Result<Vec<f32>> {
        match (&self.storage, gpu) {
            (Storage::Cpu(_), _) => self.into_vec(),
            (Storage::Cuda(_), Some(g)) => self.to_cpu(g)?.into_vec(),
            (Storage::Cuda(_), None) => bail!("tensor {:?} is on the GPU and no GPU was given", self.shape),
        }
    }

    /// Device address of a GPU tensor, for kernel arguments.
    pub fn ptr(&self) -> Result<u64> {
        match &self.storage {
            Storage::Cuda(b) => Ok(b.ptr()),
            Storage::Cpu(_) => bail!("tensor {:?} is on the CPU; upload it with to_gpu first", self.shape),
        }
    }

    /// Copies a CPU tensor to the GPU as `dtype` (bf16 rounds to nearest even).
    pub fn to_gpu(&self, gpu: &Gpu, arena: ArenaKind, dtype: DType) -> Result<Tensor> {
        let mut out = Tensor::empty_gpu(gpu, arena, &self.shape, dtype)?;
        out.upload(gpu, self.data()?)?;
        Ok(out)
    }

    /// Overwrites a GPU tensor in place with host values (converted to its dtype); returns when
    /// the copy is done. In place matters for CUDA graphs, which keep their buffers' addresses.
    pub fn upload(&mut self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        ensure!(data.len() == self.numel(), "upload of {} values into a tensor of shape {:?}", data.len(), self.shape);
        let Storage::Cuda(buf) = &self.storage else { bail!("upload into a CPU tensor {:?}", self.shape) };
        match self.dtype {
            DType::F32 => gpu.upload(buf, data),
            DType::BF16 => gpu.upload(buf, &data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>()),
        }
    }

    /// Copies a GPU tensor back to the CPU as f32 (waits for queued work).
    pub fn to_cpu(&self, gpu: &Gpu) -> Result<Tensor> {
        let src = self.ptr()?;
        let n = self.numel();
        let stream = gpu.stream().cu_stream();
        let data = match self.dtype {
            DType::F32 => {
                let mut host = vec![0f32; n];
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, src, stream) }.context("download failed")?;
                gpu.synchronize()?;
                host
            }
            DType::BF16 => {
                let mut host = vec![bf16::ZERO; n];
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, src, stream) }.context("download failed")?;
                gpu.synchronize()?;
                host.iter().map(|x| x.to_f32()).collect()
            }
        };
        Tensor::from_vec(&self.shape, data)
    }

    /// Sets every value to zero (on either device).
    pub fn zero(&mut self, gpu: Option<&Gpu>) -> Result<()> {
        match (&mut self.storage, gpu) {
            (Storage::Cpu(v), _) => v.iter_mut().for_each(|x| *x = 0.0),
            (Storage::Cuda(b), Some(g)) => unsafe { cudarc::driver::result::memset_d8_async(b.ptr(), 0, b.bytes(), g.stream().cu_stream()) }.context("zeroing memset failed")?,
            (Storage::Cuda(_), None) => bail!("zeroing a GPU tensor needs the GPU"),
        }
        Ok(())
    }

    /// Fills a GPU tensor with NaN (all bits set: NaN in f32 and in bf16), so a kernel that fails
    /// to write part of its output is caught by [`compare`].
    pub fn poison(&self, gpu: &Gpu) -> Result<()> {
        let ptr = self.ptr()?;
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, self.numel() * self.dtype.size(), gpu.stream().cu_stream()) }
            .context("poison memset failed")?;
        Ok(())
    }
}

/// How far `out` is from `reference`.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    /// ‖out − ref‖₂ / ‖ref‖₂ (‖out − ref‖₂ when ref is all zeros).
    pub rel_l2: f64,
    pub max_abs: f64,
    /// NaN or ±inf values in `out`.
    pub non_finite: usize,
}

impl Comparison {
    /// True when `out` is finite everywhere and within `tol` relative L2 error.
    pub fn within(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_l2 <= tol
    }
}

pub fn compare(out: &[f32], reference: &[f32]) -> Comparison {
    assert_eq!(out.len(), reference.len(), "compare: lengths differ");
    let (mut diff2, mut ref2, mut max_abs, mut non_finite) = (0f64, 0f64, 0f64, 0usize);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = (o as f64) - (r as f64);
        diff2 += d * d;
        ref2 += (r as f64) * (r as f64);
        max_abs = max_abs.max(d.abs());
    }
    let rel_l2 = if ref2 > 0.0 { (diff2 / ref2).sqrt() } else { diff2.sqrt() };
    Comparison { rel_l2, max_abs, non_finite }
}

/// Panics with the numbers when `out` is not within `tol` of `reference` (for tests).
pub fn assert_close(what: &str, out: &[f32], reference: &[f32], tol: f64) {
    let c = compare(out, reference);
    assert!(
        c.within(tol),
        "{what}: rel L2 error {:.3e} (tolerance {tol:.1e}), max abs {:.3e}, {} non-finite of {}",
        c.rel_l2,
        c.max_abs,
        c.non_finite,
        out.len()
    );
}

/// Rounds every value to the nearest bf16 (what an upload as bf16 does), for CPU references.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// PyTorch's NCHW layout → our NHWC, for values read from diffusers.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// Our NHWC → PyTorch's NCHW.
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(b * c + ch) * h * w + p] = x[(b * h * w + p) * c + ch];
            }
        }
    }
    out
}
