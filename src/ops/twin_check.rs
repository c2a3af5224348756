//! Test helper for the GPU tests of the small kernels (activation, layout, diffusion): fresh random
//! inputs, a poisoned output, and a comparison with the CPU twin.

use crate::cuda::{ArenaKind::Persistent, Gpu};
use crate::rng::Rng;
use crate::tensor::{assert_close, compare, round_bf16, DType, Tensor};
use anyhow::Result;

/// One GPU-vs-twin case: input shapes with the standard deviation of their normal values.
pub struct GpuCase<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub inputs: &'a [(&'a [usize], f32)],
    pub out: &'a [usize],
}

/// f32 ≤ 1e-5, bf16 ≤ 1e-2 relative L2 (DESIGN.md §6).
pub fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 { 1e-5 } else { 1e-2 }
}

/// A GPU op under test: (device, inputs, output).
pub type GpuOp<'a> = dyn Fn(&Gpu, &[Tensor], &mut Tensor) -> Result<()> + 'a;

/// Draws the inputs (rounded to bf16 for bf16 cases, so the twin sees what the GPU sees), runs
/// `gpu_op` into a NaN-poisoned output and compares it with `cpu_op`; prints the error.
pub fn gpu_case(
    gpu: &Gpu,
    case: &GpuCase,
    cpu_op: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
    gpu_op: &GpuOp,
) {
    let seed = Rng::fresh_seed();
    let mut rng = Rng::new(seed);
    let host: Vec<Vec<f32>> = case
        .inputs
        .iter()
        .map(|(shape, std)| {
            let v = rng.normal_vec(shape.iter().product(), *std);
            if case.dtype == DType::BF16 { round_bf16(&v) } else { v }
        })
        .collect();
    let dev: Vec<Tensor> = case
        .inputs
        .iter()
        .zip(&host)
        .map(|((shape, _), v)| Tensor::from_vec(shape, v.clone()).unwrap().to_gpu(gpu, Persistent, case.dtype).unwrap())
        .collect();
    let mut out = Tensor::empty_gpu(gpu, Persistent, case.out, case.dtype).unwrap();
    out.poison(gpu).unwrap();
    gpu_op(gpu, &dev, &mut out).unwrap();
    let got = out.to_cpu(gpu).unwrap().into_vec().unwrap();
    let want = cpu_op(&host);
    let what = format!("{} {:?} out {:?} seed={seed}", case.name, case.dtype, case.out);
    let c = compare(&got, &want);
    println!("{what}: rel L2 {:.2e}, max abs {:.2e}", c.rel_l2, c.max_abs);
    assert_close(&what, &got, &want, tolerance(case.dtype));
}
