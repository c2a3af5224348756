//! sdlora: fine-tune Stable Diffusion 1.5 with LoRA and sample from it, on hand-written CUDA kernels.
//!
//! Map of the crate (see DESIGN.md in the project's shared folder for the full picture):
//! - [`cuda`]: device, stream, embedded PTX, arenas, profiler, NVTX.
//! - [`tensor`]: shape + dtype + CPU/GPU storage; NHWC convention; comparison helpers.
//! - [`ops`]: one module per kernel family, each with its CPU twin and backward.
//! - [`bench`]: CUDA-event timing and the benchmarks behind `sdlora bench`.
//! - [`data`]: the captioned-image training set.
//! - [`checkpoint`]: LoRA weights in the diffusers/PEFT and kohya formats.
//! - [`io`]: atomic file writes.
//! - [`log`]: TensorBoard event files.
//! - [`schedule`]: the DDPM training noise schedule and the samplers (PNDM, DDIM, Euler, DPM++).
//! - [`model`]: the SD1.5 models (UNet with LoRA, CLIP, VAE) and weight loading.
//! - [`tokenizer`]: the CLIP BPE tokenizer.
//! - [`train`]: the training job.
//! - [`sample`]: image generation with LoRAs (`sdlora sample`).
//! - [`testing`]: fixture paths for tests.

pub mod bench;
pub mod cuda;
pub mod ops;
pub mod rng;
pub mod schedule;
pub mod tensor;
pub mod testing;
pub mod data;
pub mod checkpoint;
pub mod io;
pub mod log;
pub mod model;
pub mod tokenizer;
pub mod train;
pub mod sample;
