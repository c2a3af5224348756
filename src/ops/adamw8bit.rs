//! AdamW with 8-bit moments (kernels/adamw.cu `adamw_step_8bit`): the step of [`super::adamw`]
//! with m and v kept as one byte each instead of two f32 — 2 bytes per trainable value instead of 8
//! (0.05 GiB instead of 0.19 GiB for SD1.5's rank-128 LoRA). The parameters stay f32.
//!
//! Values go in blocks of [`QBLOCK`], each with two f32 scales (its max |m| and max v). A value
//! relative to its scale, x ∈ [0, 1], is stored as a level on a log scale with 8 levels per octave
//! (nearest in log space: ≤ 4.4 % relative error): m as sign + 7-bit level (16 octaves below the
//! block's max), v as an 8-bit level (32 octaves, so √v keeps 16). Unlike linear 8-bit codes, small
//! moments keep their relative precision, which is what m/√v needs. The encoding uses only exact
//! operations, so the GPU and the CPU twin [`adamw_step_8bit_cpu`] produce the same levels from the
//! same values.

use super::adamw::{AdamWConfig, AdamWSchedule, LrTable};
use super::philox::StepCounter;
use crate::cuda::{ArenaKind, DeviceBuffer, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// Values per quantization block (one GPU warp each).
pub const QBLOCK: usize = 256;
const M_LMAX: i32 = 127;
const V_LMAX: i32 = 255;
/// 2^((k + 0.5)/8): the level boundaries within an octave (same f32 constants as the kernel).
const THRESHOLDS: [f32; 8] = [1.0442737, 1.1387886, 1.2418578, 1.3542556, 1.4768262, 1.6104903, 1.7562522, 1.9152066];
/// 2^(k/8): the levels within an octave.
const LEVELS: [f32; 8] = [1.0, 1.0905077, 1.1892071, 1.2968396, std::f32::consts::SQRT_2, 1.5422108, 1.6817929, 1.8340081];

/// The level of x ∈ [0, 1] on the scale whose top level `lmax` is 1 (0: below the lowest level).
pub fn encode_level(x: f32, lmax: i32) -> i32 {
    let bits = x.to_bits();
    let e = (bits >> 23) as i32 - 127; // x = f·2^e, f ∈ [1, 2)
    if x <= 0.0 || e < -64 {
        return 0;
    }
    let f = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let j = THRESHOLDS.iter().filter(|&&t| f >= t).count() as i32;
    let level = lmax + 8 * e + j;
    if level < 1 {
        0
    } else {
        level.min(lmax)
    }
}

/// The value of `level` times `scale`.
pub fn decode_level(level: i32, lmax: i32, scale: f32) -> f32 {
    if level == 0 {
        return 0.0;
    }
    let l = level - lmax;
    let e = l.div_euclid(8);
    LEVELS[(l - 8 * e) as usize] * 2f32.powi(e) * scale
}

/// 8-bit moments on the host: codes per value, (max |m|, max v) per block.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Moments8 {
    pub m: Vec<u8>,
    pub v: Vec<u8>,
    pub scales: Vec<[f32; 2]>,
}

impl Moments8 {
    /// Encodes f32 moments block by block (a checkpoint's moments, or a CPU step's result).
    pub fn encode(m: &[f32], v: &[f32]) -> Moments8 {
        assert_eq!(m.len(), v.len(), "Moments8::encode: m and v differ in length");
        let mut out = Moments8 { m: vec![0; m.len()], v: vec![0; m.len()], scales: Vec::with_capacity(m.len().div_ceil(QBLOCK)) };
        for (b, (mb, vb)) in m.chunks(QBLOCK).zip(v.chunks(QBLOCK)).enumerate() {
            let sm = mb.iter().fold(0f32, |a, x| a.max(x.abs()));
            let sv = vb.iter().fold(0f32, |a, &x| a.max(x));
            for (i, (&mi, &vi)) in mb.iter().zip(vb).enumerate() {
                let lm = if sm > 0.0 { encode_level(mi.abs() / sm, M_LMAX) } else { 0 };
                out.m[b * QBLOCK + i] = (if mi < 0.0 && lm > 0 { 128 } else { 0 } | lm) as u8;
                out.v[b * QBLOCK + i] = if sv > 0.0 { encode_level(vi / sv, V_LMAX) as u8 } else { 0 };
            }
            out.scales.push([sm, sv]);
        }
        out
    }

    /// The f32 moments the codes stand for.
    pub fn decode(&self) -> (Vec<f32>, Vec<f32>) {
        let scale = |i: usize| self.scales[i / QBLOCK];
        let m = self.m.iter().enumerate().map(|(i, &c)| {
            let mag = decode_level((c & 127) as i32, M_LMAX, scale(i)[0]);
            if c & 128 != 0 { -mag } else { mag }
        });
        let v = self.v.iter().enumerate().map(|(i, &c)| decode_level(c as i32, V_LMAX, scale(i)[1]));
        (m.collect(), v.collect())
    }
}

/// CPU twin of `adamw_step_8bit`: decode, the f32 AdamW step of [`super::adamw::adamw_step_cpu`]
/// (same operation order), encode.
pub fn adamw_step_8bit_cpu(p: &mut [f32], g: &[f32], moments: &mut Moments8, t: u32, cfg: &AdamWConfig) {
    let (mut m, mut v) = moments.decode();
    super::adamw::adamw_step_cpu(p, g, &mut m, &mut v, t, cfg);
    *moments = Moments8::encode(&m, &v);
}

/// 8-bit moments on the device: codes of m and v (u8 each) and the blocks' (max |m|, max v) as f32 pairs.
pub struct DeviceMoments8 {
    n: usize,
    m: DeviceBuffer,
    v: DeviceBuffer,
    scales: DeviceBuffer,
}

impl DeviceMoments8 {
    /// Moments for `n` values, uploaded from host codes.
    pub fn upload(gpu: &Gpu, host: &Moments8) -> Result<DeviceMoments8> {
        let n = host.m.len();
        ensure!(n > 0 && host.v.len() == n && host.scales.len() == n.div_ceil(QBLOCK), "8-bit moments: {} m codes, {} v codes, {} scale pairs", n, host.v.len(), host.scales.len());
        let alloc = |bytes| gpu.alloc(ArenaKind::Persistent, bytes);
        let dev = DeviceMoments8 { n, m: alloc(n)?, v: alloc(n)?, scales: alloc(host.scales.len() * 8)? };
        gpu.upload(&dev.m, &host.m)?;
        gpu.upload(&dev.v, &host.v)?;
        gpu.upload(&dev.scales, &host.scales)?;
        Ok(dev)
    }

    /// Zero moments for `n` values (a fresh optimizer).
    pub fn zeros(gpu: &Gpu, n: usize) -> Result<DeviceMoments8> {
        DeviceMoments8::upload(gpu, &Moments8::encode(&vec![0.0; n], &vec![0.0; n]))
    }

    pub fn download(&self, gpu: &Gpu) -> Result<Moments8> {
        let mut host = Moments8 { m: vec![0; self.n], v: vec![0; self.n], scales: vec![[0.0; 2]; self.n.div_ceil(QBLOCK)] };
        gpu.download(&self.m, &mut host.m)?;
        gpu.download(&self.v, &mut host.v)?;
        gpu.download(&self.scales, &mut host.scales)?;
        Ok(host)
    }

    /// Values covered.
    pub fn values(&self) -> usize {
        self.n
    }

    /// The moments of values [offset, offset + n): a view sharing these buffers. `offset` must start
    /// a block, and the view must end at a block boundary or at the end.
    pub fn view(&self, offset: usize, n: usize) -> Result<DeviceMoments8> {
        ensure!(offset.is_multiple_of(QBLOCK) && (n.is_multiple_of(QBLOCK) || offset + n == self.n) && offset + n <= self.n,
            "8-bit moments: values {offset}..{} do not fall on {QBLOCK}-value blocks (of {})", offset + n, self.n);
        let slice = |b: &DeviceBuffer, at: usize, len: usize| b.slice(at, len).ok_or_else(|| anyhow::anyhow!("8-bit moments: view out of range"));
        Ok(DeviceMoments8 { n, m: slice(&self.m, offset, n)?, v: slice(&self.v, offset, n)?, scales: slice(&self.scales, offset / QBLOCK * 8, n.div_ceil(QBLOCK) * 8)? })
    }
}

impl AdamWSchedule {
    /// [`adamw_step_8bit`] at the schedule's current step.
    pub fn step_8bit(&self, gpu: &Gpu, params: &mut Tensor, copy: Option<&mut Tensor>, grads: &Tensor, moments: &mut DeviceMoments8) -> Result<()> {
        adamw_step_8bit(gpu, params, copy, grads, moments, &self.counter, &self.rates, &self.cfg)
    }
}

/// One AdamW step with 8-bit moments on the device: as [`super::adamw::adamw_step`] (t from the
/// counter, the rate from the table, optional gradient-norm clipping, optional bf16 `copy` of the
/// updated parameters) with `moments` for m and v.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_8bit(gpu: &Gpu, params: &mut Tensor, copy: Option<&mut Tensor>, grads: &Tensor, moments: &mut DeviceMoments8, counter: &StepCounter, lr: &LrTable, cfg: &AdamWConfig) -> Result<()> {
    let n = params.numel();
    ensure!(n == moments.n, "adamw_step_8bit: {n} parameters but moments for {}", moments.n);
    super::check_gpu("adamw_step_8bit", &[params, grads], DType::F32, n)?;
    // One warp per block of values, 8 warps per thread block.
    let groups = n.div_ceil(QBLOCK);
    let launch = LaunchConfig { grid_dim: (groups.div_ceil(8).min(super::adamw::MAX_BLOCKS) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let part = super::adamw::grad_norm_partials(gpu, grads, cfg)?;
    let mut args = vec![
        KernelArg::Ptr(params.ptr()?), super::adamw::copy_arg("adamw_step_8bit copy", copy, n)?, KernelArg::Ptr(grads.ptr()?), KernelArg::Ptr(moments.m.ptr()), KernelArg::Ptr(moments.v.ptr()), KernelArg::Ptr(moments.scales.ptr()), KernelArg::I64(n as i64),
    ];
    args.extend(super::adamw::step_args(counter, lr, cfg, part.as_ref()));
    gpu.launch("adamw", "adamw_step_8bit", launch, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn levels_round_trip_within_the_log_step() {
        for k in 0..8 {
            assert_eq!(THRESHOLDS[k], 2f64.powf((k as f64 + 0.5) / 8.0) as f32, "threshold {k}");
            assert_eq!(LEVELS[k], 2f64.powf(k as f64 / 8.0) as f32, "level {k}");
        }
        assert_eq!(encode_level(0.0, 127), 0);
        assert_eq!(encode_level(1.0, 127), 127);
        assert_eq!(decode_level(127, 127, 3.0), 3.0);
        assert_eq!(encode_level(2f32.powi(-17), 127), 0, "below 16 octaves: zero");
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            // Log-uniform over the 16 (m) and 32 (v) octaves the codes cover.
            for (lmax, octaves) in [(M_LMAX, 15.5), (V_LMAX, 31.5)] {
                let x = 2f32.powf(-octaves * rng.uniform());
                let back = decode_level(encode_level(x, lmax), lmax, 1.0);
                assert!((back / x - 1.0).abs() <= 0.0443, "{x} -> {back}");
            }
        }
        // Each level decodes to itself.
        for level in 1..=V_LMAX {
            assert_eq!(encode_level(decode_level(level, V_LMAX, 1.0), V_LMAX), level);
        }
    }

    #[test]
    fn encode_keeps_the_block_maxima_and_signs() {
        let mut rng = Rng::new(11);
        let m: Vec<f32> = rng.normal_vec(700, 1e-3);
        let v: Vec<f32> = m.iter().map(|x| x * x * 3.0 + 1e-12).collect();
        let q = Moments8::encode(&m, &v);
        assert_eq!(q.scales.len(), 3);
        let (m2, v2) = q.decode();
        for (a, b) in m.iter().zip(&m2).chain(v.iter().zip(&v2)) {
            assert!(*b == 0.0 || (b / a - 1.0).abs() <= 0.0443, "{a} -> {b}");
            assert!(b.signum() == a.signum() || *b == 0.0);
        }
        let block_max = m[..256].iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(m2[..256].iter().any(|x| x.abs() == block_max), "the block's largest |m| is exact");
    }

    #[test]
    fn eight_bit_adamw_follows_the_f32_trajectory() {
        // Least squares over a random overdetermined linear model, 300 steps: 8-bit moments vs f32
        // moments reach the same loss along nearly the same path.
        let (n, rows) = (384, 768);
        let mut rng = Rng::new(3);
        let a = rng.normal_vec(rows * n, 1.0);
        let target = rng.normal_vec(rows, 1.0);
        let grad = |p: &[f32]| -> Vec<f32> {
            let r: Vec<f32> = (0..rows).map(|i| a[i * n..(i + 1) * n].iter().zip(p).map(|(x, y)| x * y).sum::<f32>() - target[i]).collect();
            (0..n).map(|j| (0..rows).map(|i| r[i] * a[i * n + j]).sum::<f32>() / rows as f32).collect()
        };
        let cfg = AdamWConfig { lr: 1e-3, ..AdamWConfig::default() };
        let start = rng.normal_vec(n, 0.1);
        let (mut p32, mut p8) = (start.clone(), start.clone());
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut q = Moments8::encode(&m, &v);
        for t in 1..=300 {
            let g = grad(&p32);
            super::super::adamw::adamw_step_cpu(&mut p32, &g, &mut m, &mut v, t, &cfg);
            let g = grad(&p8);
            adamw_step_8bit_cpu(&mut p8, &g, &mut q, t, &cfg);
        }
        let loss = |p: &[f32]| -> f32 { (0..rows).map(|i| (a[i * n..(i + 1) * n].iter().zip(p).map(|(x, y)| x * y).sum::<f32>() - target[i]).powi(2)).sum::<f32>() / rows as f32 };
        let moved: f32 = p32.iter().zip(&start).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let apart: f32 = p32.iter().zip(&p8).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let (l0, l32, l8) = (loss(&start), loss(&p32), loss(&p8));
        assert!(moved > 0.1 && l32 < 0.5 * l0, "the problem must move the parameters ({moved}) and lower the loss ({l0} -> {l32})");
        assert!((l8 - l32).abs() < 0.02 * (l0 - l32), "8-bit loss {l8} vs f32 {l32} (start {l0})");
        assert!(apart < 0.05 * moved, "8-bit moments drift: {apart} apart after moving {moved}");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_adamw_8bit_matches_twin() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        for (n, clip) in [(25_509_888 / 16 + 77, None), (1000, Some(0.5f32)), (256, None)] {
            let seed = Rng::fresh_seed();
            let mut rng = Rng::new(seed);
            let cfg = AdamWConfig { lr: 1e-3, max_grad_norm: clip, ..AdamWConfig::default() };
            let mut p = rng.normal_vec(n, 0.1);
            let mut host = Moments8::encode(&vec![0.0; n], &vec![0.0; n]);
            let mut pd = crate::testing::upload(&gpu, &[n], &p, DType::F32);
            let mut dev = DeviceMoments8::upload(&gpu, &host).unwrap();
            let mut copy = crate::testing::poisoned(&gpu, &[n], DType::BF16);
            let counter = StepCounter::new(&gpu, 0).unwrap();
            let lr = LrTable::constant(&gpu, cfg.lr).unwrap();
            for t in 1..=3 {
                let g = rng.normal_vec(n, 1e-2);
                let gd = crate::testing::upload(&gpu, &[n], &g, DType::F32);
                counter.increment(&gpu).unwrap();
                adamw_step_8bit(&gpu, &mut pd, Some(&mut copy), &gd, &mut dev, &counter, &lr, &cfg).unwrap();
                adamw_step_8bit_cpu(&mut p, &g, &mut host, t, &cfg);
            }
            let got = dev.download(&gpu).unwrap();
            let p_gpu = crate::testing::download(&gpu, &pd);
            crate::tensor::assert_close(&format!("p n={n} seed={seed}"), &p_gpu, &p, 1e-6);
            assert_eq!(crate::testing::download(&gpu, &copy), crate::tensor::round_bf16(&p_gpu), "bf16 copy n={n} (seed {seed})");
            let (gm, gv) = got.decode();
            let (hm, hv) = host.decode();
            crate::tensor::assert_close(&format!("m n={n} seed={seed}"), &gm, &hm, 1e-3);
            crate::tensor::assert_close(&format!("v n={n} seed={seed}"), &gv, &hv, 1e-3);
            // f32 rounding differences (fused multiply-adds) may move a value across a level boundary.
            let differ = got.m.iter().zip(&host.m).chain(got.v.iter().zip(&host.v)).filter(|(a, b)| a != b).count();
            assert!(differ <= 2 * n / 1000 + 2, "{differ} of {} codes differ (seed {seed})", 2 * n);
        }
    }
}
