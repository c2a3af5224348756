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
