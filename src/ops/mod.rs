//! Ops: one module per kernel family. Each module holds, for every op, the CPU twin (f32, naive,
//! obviously right), the GPU launcher (shape and dtype checks, then one kernel launch), and the
//! backward where training needs it. Outputs are passed in (`&mut Tensor`), already allocated.

pub mod attention;
pub mod conv;
pub mod conv_sm90;
pub mod elementwise;
pub mod gemm;
pub mod gemm_sm90;
pub mod gemm_sm90_split;
pub mod norm;
pub mod activation;
pub mod layout;
pub mod philox;
pub mod diffusion;
pub mod adamw;
pub mod adamw8bit;
#[cfg(test)]
pub(crate) mod twin_check;
pub mod lora;

use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// Checks that every tensor is on the GPU with `dtype` and holds `numel` elements.
pub(crate) fn check_gpu(what: &str, tensors: &[&Tensor], dtype: DType, numel: usize) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        ensure!(t.is_gpu(), "{what}: operand {i} is on the CPU");
        ensure!(t.dtype() == dtype, "{what}: operand {i} is {:?}, expected {dtype:?}", t.dtype());
        ensure!(t.numel() == numel, "{what}: operand {i} has shape {:?} ({} values), expected {numel} values", t.shape(), t.numel());
    }
    Ok(())
}

/// Central finite-difference gradient of the scalar `loss(x)` at `x`, computed in f64 around the
/// f32 function (step `h`). Used by every backward's test.
#[cfg(test)]
pub(crate) fn finite_difference(x: &[f32], h: f64, loss: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = (orig as f64 + h) as f32;
            let up = loss(&xp);
            xp[i] = (orig as f64 - h) as f32;
            let down = loss(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}
