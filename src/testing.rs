//! Helpers shared by tests: where the fixtures are.

use std::path::PathBuf;

/// `tests/fixtures`: from `$SDLORA_FIXTURES`, else relative to the working directory (test binaries
/// carried to a GPU machine run from the repository root), else the crate's source folder.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SDLORA_FIXTURES") {
        return dir.into();
    }
    let local = PathBuf::from("tests/fixtures");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// GPU-test helpers: `data` as a `dtype` tensor of `shape` in the persistent arena.
pub fn upload(gpu: &crate::cuda::Gpu, shape: &[usize], data: &[f32], dtype: crate::tensor::DType) -> crate::tensor::Tensor {
    crate::tensor::Tensor::from_vec(shape, data.to_vec()).unwrap().to_gpu(gpu, crate::cuda::ArenaKind::Persistent, dtype).unwrap()
}

/// An output tensor filled with NaN, so unwritten values cannot pass a comparison.
pub fn poisoned(gpu: &crate::cuda::Gpu, shape: &[usize], dtype: crate::tensor::DType) -> crate::tensor::Tensor {
    let t = crate::tensor::Tensor::empty_gpu(gpu, crate::cuda::ArenaKind::Persistent, shape, dtype).unwrap();
    t.poison(gpu).unwrap();
    t
}

/// A GPU tensor's values as f32 on the host.
pub fn download(gpu: &crate::cuda::Gpu, t: &crate::tensor::Tensor) -> Vec<f32> {
    t.to_cpu(gpu).unwrap().into_vec().unwrap()
}
