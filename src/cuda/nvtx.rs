//! NVTX ranges (push/pop) around named regions — a UNet block, a step — so that nsys and ncu
//! (`--nvtx --nvtx-include "backward up_blocks.1/"`) can attribute kernels to them.
//!
//! The NVTX entry points are looked up once in whichever NVTX library the process can load:
//! `libnvToolsExt.so.1` (CUDA ≤ 12 toolkits) or `libnvtx3interop.so.1` (CUDA 12.8+ and the
//! `nvidia-nvtx` Python wheels that PyTorch installs). Both forward to the profiler the tool injects
//! through `NVTX_INJECTION64_PATH`. `SDLORA_NVTX_LIB` names another file to try first. Without any
//! of them a range costs nothing and records nothing.

use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

/// Library names tried in order (after `SDLORA_NVTX_LIB`).
const LIBRARIES: [&str; 4] = ["libnvToolsExt.so.1", "libnvToolsExt.so", "libnvtx3interop.so.1", "libnvtx3interop.so"];

struct Nvtx {
    push: unsafe extern "C" fn(*const c_char) -> c_int,
    pop: unsafe extern "C" fn() -> c_int,
    /// Keeps the library mapped for the process's lifetime.
    _library: libloading::Library,
}

fn load(path: &str) -> Option<Nvtx> {
    // SAFETY: loading an NVTX library runs no initializers with preconditions; the two symbols
    // have the C signatures of nvToolsExt.h (`int nvtxRangePushA(const char*)`, `int nvtxRangePop(void)`).
    unsafe {
        let library = libloading::Library::new(path).ok()?;
        let push = *library.get::<unsafe extern "C" fn(*const c_char) -> c_int>(b"nvtxRangePushA\0").ok()?;
        let pop = *library.get::<unsafe extern "C" fn() -> c_int>(b"nvtxRangePop\0").ok()?;
        Some(Nvtx { push, pop, _library: library })
    }
}

fn nvtx() -> Option<&'static Nvtx> {
    static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();
    NVTX.get_or_init(|| {
        let first = std::env::var("SDLORA_NVTX_LIB").ok();
        let found = first.iter().map(String::as_str).chain(LIBRARIES).find_map(load);
        found
    })
    .as_ref()
}

/// An NVTX push/pop range; pops when dropped. Ranges nest (they are per host thread).
pub struct NvtxRange(Option<&'static Nvtx>);

/// Opens a range named `name` (a name with an interior NUL is cut there).
pub fn nvtx_range(name: &str) -> NvtxRange {
    let Some(lib) = nvtx() else { return NvtxRange(None) };
    let bytes = name.as_bytes();
    let name = CString::new(&bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]).unwrap_or_default();
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    unsafe { (lib.push)(name.as_ptr()) };
    NvtxRange(Some(lib))
}

impl Drop for NvtxRange {
    fn drop(&mut self) {
        if let Some(lib) = self.0 {
            // SAFETY: pops the range this value pushed.
            unsafe { (lib.pop)() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_nest_and_tolerate_odd_names_with_or_without_a_library() {
        let outer = nvtx_range("forward down_blocks.0");
        {
            let _inner = nvtx_range("a\0name with a NUL");
        }
        drop(outer);
        assert!(load("/nonexistent/libnvToolsExt.so.1").is_none());
    }
}
