//! Counter-based random numbers on the device (kernels/philox.cu, kernels/philox.cuh): Philox4x32-10
//! keyed by (seed, stream, step, block), with the step read from a device [`StepCounter`] so a
//! replayed CUDA graph draws new numbers each step. CPU twins (`philox4x32_10`, `philox_uniform_cpu`,
//! `philox_normal_cpu`) give the same bits: uniforms exactly, normals by computing Box–Muller in f64
//! on both sides before rounding to f32.

use crate::cuda::{grid_1d, ArenaKind, DeviceBuffer, Gpu, KernelArg, LaunchConfig};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Context, Result};

const MODULE: &str = "philox";
/// Streams the training step uses (philox.cuh): its noise and its timesteps.
pub const STREAM_NOISE: u32 = 0;
pub const STREAM_TIMESTEPS: u32 = 1;

/// Philox4x32-10 of Random123: 10 rounds on a 128-bit counter with a 64-bit key.
pub fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c[0] as u64;
        let p1 = 0xCD9E_8D57u64 * c[2] as u64;
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(0x9E37_79B9), k[1].wrapping_add(0xBB67_AE85)];
    }
    c
}

/// The 4 words of output block `block` of (seed, stream, step).
pub fn philox_block(block: u64, stream: u32, step: u32, seed: u64) -> [u32; 4] {
    philox4x32_10([block as u32, (block >> 32) as u32, stream, step], [seed as u32, (seed >> 32) as u32])
}

/// ((x >> 9) + 0.5)·2⁻²³: uniform in (0, 1), exact in f32.
pub fn uniform_from_bits(x: u32) -> f32 {
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// Box–Muller in f64 on two words, rounded to f32 (as the device does).
pub fn normal_pair_from_bits(x0: u32, x1: u32) -> (f32, f32) {
    let u1 = (x0 as f64 + 0.5) * 2.328_306_436_538_696_3e-10;
    let u2 = x1 as f64 * 2.328_306_436_538_696_3e-10;
    let r = (-2.0 * u1.ln()).sqrt();
    let a = std::f64::consts::TAU * u2;
    ((r * a.cos()) as f32, (r * a.sin()) as f32)
}

/// ⌊x·k / 2³²⌋: an index below k.
pub fn below(x: u32, k: u32) -> u32 {
    ((x as u64 * k as u64) >> 32) as u32
}

/// CPU twin of `philox_uniform_f32`.
pub fn philox_uniform_cpu(n: usize, seed: u64, stream: u32, step: u32) -> Vec<f32> {
    (0..n).map(|i| uniform_from_bits(philox_block((i / 4) as u64, stream, step, seed)[i % 4])).collect()
}

/// CPU twin of `philox_normal_*`: mean + std·z, z from word pairs (0, 1) and (2, 3) of each block.
pub fn philox_normal_cpu(n: usize, seed: u64, stream: u32, step: u32, mean: f32, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 3);
    for j in 0..n.div_ceil(4) {
        let w = philox_block(j as u64, stream, step, seed);
        let (a, b) = (normal_pair_from_bits(w[0], w[1]), normal_pair_from_bits(w[2], w[3]));
        out.extend([a.0, a.1, b.0, b.1].map(|z| std.mul_add(z, mean)));
    }
    out.truncate(n);
    out
}

/// A u32 counter in device memory: the training step number that keys the step's random numbers
/// and AdamW's bias correction. Advanced on the device, so it works inside a captured graph.
pub struct StepCounter {
    buf: DeviceBuffer,
}

impl StepCounter {
    pub fn new(gpu: &Gpu, value: u32) -> Result<StepCounter> {
        let c = StepCounter { buf: gpu.alloc(ArenaKind::Persistent, 4)? };
        c.set(gpu, value)?;
        Ok(c)
    }
    /// Device address of the u32, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
    pub fn set(&self, gpu: &Gpu, value: u32) -> Result<()> {
        gpu.upload(&self.buf, &[value]).context("counter upload failed")
    }
    pub fn get(&self, gpu: &Gpu) -> Result<u32> {
        let mut host = [0u32];
        gpu.download(&self.buf, &mut host).context("counter download failed")?;
        Ok(host[0])
    }
    /// Enqueues `counter += 1` on the device.
    pub fn increment(&self, gpu: &Gpu) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        gpu.launch(MODULE, "counter_increment_u32", cfg, &[KernelArg::Ptr(self.ptr())])
    }
}

/// One thread per block of 4 outputs, grid-stride beyond 65 536 blocks of 256.
pub(crate) fn blocks_of_four(n: usize) -> LaunchConfig {
    let mut cfg = grid_1d(n.div_ceil(4), 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_536);
    cfg
}

fn seed_args(seed: u64) -> [KernelArg; 2] {
    [KernelArg::U32(seed as u32), KernelArg::U32((seed >> 32) as u32)]
}

/// Fills f32 `out` with uniforms in (0, 1) from (seed, stream, *counter).
pub fn philox_uniform(gpu: &Gpu, out: &mut Tensor, seed: u64, stream: u32, counter: &StepCounter) -> Result<()> {
    ensure!(out.is_gpu() && out.dtype() == DType::F32, "philox_uniform: out must be an f32 GPU tensor");
    let n = out.numel();
    let [s0, s1] = seed_args(seed);
    let args = [KernelArg::Ptr(out.ptr()?), KernelArg::I64(n as i64), s0, s1, KernelArg::U32(stream), KernelArg::Ptr(counter.ptr())];
    gpu.launch(MODULE, "philox_uniform_f32", blocks_of_four(n), &args)
}

/// Fills `out` (f32 or bf16) with mean + std·N(0, 1) from (seed, stream, *counter).
pub fn philox_normal(gpu: &Gpu, out: &mut Tensor, seed: u64, stream: u32, counter: &StepCounter, mean: f32, std: f32) -> Result<()> {
    ensure!(out.is_gpu(), "philox_normal: out is on the CPU");
    let n = out.numel();
    let [s0, s1] = seed_args(seed);
    let args = [
        KernelArg::Ptr(out.ptr()?), KernelArg::I64(n as i64), s0, s1, KernelArg::U32(stream), KernelArg::Ptr(counter.ptr()),
        KernelArg::F32(mean), KernelArg::F32(std),
    ];
    let kernel = match out.dtype() {
        DType::F32 => "philox_normal_f32",
        DType::BF16 => "philox_normal_bf16",
    };
    gpu.launch(MODULE, kernel, blocks_of_four(n), &args)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cuda::ArenaKind::Persistent;
    use crate::rng::Rng;
    use crate::tensor::round_bf16;

    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn draws_have_the_right_moments_and_range() {
        let u = philox_uniform_cpu(100_000, 42, 5, 1);
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / u.len() as f64;
        assert!((mean - 0.5).abs() < 0.005, "uniform mean {mean}");
        let z = philox_normal_cpu(100_001, 42, 5, 1, 0.0, 1.0);
        let m = z.iter().map(|&x| x as f64).sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(m.abs() < 0.01 && (var - 1.0).abs() < 0.02, "normal mean {m} var {var}");
        assert_ne!(philox_normal_cpu(8, 42, 5, 2, 0.0, 1.0), philox_normal_cpu(8, 42, 5, 1, 0.0, 1.0), "a new step draws new numbers");
        assert_eq!(below(u32::MAX, 1000), 999);
        assert_eq!(below(0, 1000), 0);
    }

    /// Equal bits, except for at most `slack` values one f32 ulp apart (Box–Muller's f64 libm calls
    /// can round differently on the device in ~1 of 10⁸ values).
    pub(crate) fn assert_same_bits(what: &str, got: &[f32], want: &[f32], slack: usize) {
        assert_eq!(got.len(), want.len());
        let off: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        let far = off.iter().filter(|&&i| (got[i].to_bits() as i64 - want[i].to_bits() as i64).abs() > 1).count();
        println!("{what}: {} of {} values differ in bits ({} by more than 1 ulp)", off.len(), got.len(), far);
        assert!(far == 0 && off.len() <= slack, "{what}: {} values differ, {far} by more than one ulp (first at {:?})", off.len(), off.first());
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_philox_gives_the_twins_bits_and_advances_with_the_counter() {
        let gpu = Gpu::for_tests().expect("GPU test needs a CUDA device");
        let seed = Rng::fresh_seed();
        let counter = StepCounter::new(&gpu, 7).unwrap();
        for n in [1, 5, 1_000_003] {
            let mut u = Tensor::empty_gpu(&gpu, Persistent, &[n], DType::F32).unwrap();
            u.poison(&gpu).unwrap();
            philox_uniform(&gpu, &mut u, seed, 3, &counter).unwrap();
            let got = u.to_cpu(&gpu).unwrap().into_vec().unwrap();
            assert_same_bits(&format!("uniform n={n} seed={seed}"), &got, &philox_uniform_cpu(n, seed, 3, 7), 0);
            for dtype in [DType::F32, DType::BF16] {
                let mut z = Tensor::empty_gpu(&gpu, Persistent, &[n], dtype).unwrap();
                z.poison(&gpu).unwrap();
                philox_normal(&gpu, &mut z, seed, 4, &counter, 0.5, 2.0).unwrap();
                let got = z.to_cpu(&gpu).unwrap().into_vec().unwrap();
                let want = philox_normal_cpu(n, seed, 4, 7, 0.5, 2.0);
                let want = if dtype == DType::BF16 { round_bf16(&want) } else { want };
                assert_same_bits(&format!("normal {dtype:?} n={n} seed={seed}"), &got, &want, 2);
            }
        }
        counter.increment(&gpu).unwrap();
        counter.increment(&gpu).unwrap();
        assert_eq!(counter.get(&gpu).unwrap(), 9);
        let mut u = Tensor::empty_gpu(&gpu, Persistent, &[64], DType::F32).unwrap();
        philox_uniform(&gpu, &mut u, seed, 3, &counter).unwrap();
        assert_same_bits("uniform after two increments", &u.to_cpu(&gpu).unwrap().into_vec().unwrap(), &philox_uniform_cpu(64, seed, 3, 9), 0);
    }
}
