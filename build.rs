//! Compiles every `kernels/*.cu` to PTX with nvcc and embeds the text in the binary.
//!
//! nvcc is looked for in: `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, and where
//! `scripts/setup.sh` installs it (`$SDLORA_TOOLS_DIR`, default `~/.cache/sdlora/cuda-13.0`).
//! Target: `compute_$SDLORA_CUDA_ARCH` (default 80: Ampere and newer; the driver JIT-compiles the
//! PTX for the actual card). Files named `*_sm90.cu` use Hopper-only instructions (wgmma, TMA) and
//! are compiled for `compute_90a` instead; they are loaded only on compute capability 9.0 devices
//! (`Gpu::is_hopper`), everything else has an sm_80 path. The other files are compiled a second time
//! for `compute_90`, the build Hopper loads: there their kernels start with `griddepcontrol.wait`
//! and are launched as programmatic dependent launches (kernels/common.cuh). nvcc runs on every core.
//! Flags: `-O3 -lineinfo` so ncu/nsys map
//! time to source lines.
//!
//! No nvcc: the build succeeds with a warning and the binary reports, on first GPU use, how to get
//! one. `SDLORA_REQUIRE_NVCC=1` makes a missing nvcc a build error (CI sets it).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "SDLORA_TOOLS_DIR", "SDLORA_CUDA_ARCH", "SDLORA_REQUIRE_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={}", kernel_dir.display());

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.sort();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let cu_files: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();

    let arch = env::var("SDLORA_CUDA_ARCH").unwrap_or_else(|_| "80".into());
    let require = env::var("SDLORA_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut generated = String::new();
    match find_nvcc() {
        Some(nvcc) => {
            writeln!(generated, "/// nvcc that compiled the kernels.\npub const NVCC: Option<&str> = Some({:?});", nvcc.display().to_string()).unwrap();
            writeln!(generated, "/// PTX target the kernels were compiled for.\npub const ARCH: &str = \"compute_{arch}\";").unwrap();
            // Every file for its target, and the sm_80 files once more for compute_90: on Hopper those
            // builds are loaded instead, so that their kernels can await the previous kernel with
            // griddepcontrol (programmatic dependent launch, kernels/common.cuh).
            let mut jobs = Vec::new();
            for cu in &cu_files {
                let stem = cu.file_stem().unwrap().to_str().unwrap().to_string();
                let job = |ptx: String, arch: &str, hopper_build| Job { cu: cu.to_path_buf(), ptx: out_dir.join(ptx), arch: arch.into(), module: stem.clone(), hopper_build };
                if stem.ends_with("_sm90") {
                    jobs.push(job(format!("{stem}.ptx"), "90a", false));
                } else {
                    jobs.push(job(format!("{stem}.ptx"), &arch, false));
                    jobs.push(job(format!("{stem}.compute_90.ptx"), "90", true));
                }
            }
            compile_all(&nvcc, &jobs, &kernel_dir);
            for hopper_build in [false, true] {
                if hopper_build {
                    writeln!(generated, "/// compute_90 builds of the sm_80 modules, loaded on Hopper instead.\npub static HOPPER_MODULES: &[(&str, &str)] = &[").unwrap();
                } else {
                    writeln!(generated, "/// (module name, PTX text) for every kernels/*.cu.\npub static MODULES: &[(&str, &str)] = &[").unwrap();
                }
                for j in jobs.iter().filter(|j| j.hopper_build == hopper_build) {
                    writeln!(generated, "    ({:?}, include_str!({:?})),", j.module, j.ptx.display().to_string()).unwrap();
                }
                writeln!(generated, "];").unwrap();
            }
            let hopper = cu_files.iter().filter(|p| p.file_stem().is_some_and(|s| s.to_string_lossy().ends_with("_sm90"))).count();
            println!("cargo:warning=compiled {0} kernel file(s) to compute_{arch} PTX (and again to compute_90) and {hopper} to compute_90a with {1}", cu_files.len() - hopper, nvcc.display());
        }
        None => {
            let msg = "nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, ~/.cache/sdlora/cuda-13.0); \
                       GPU kernels are not embedded. Run scripts/setup.sh or install the CUDA toolkit, then rebuild.";
            if require {
                panic!("SDLORA_REQUIRE_NVCC=1 but {msg}");
            }
            // Build again once scripts/setup.sh has installed nvcc.
            if let Some(tools) = tools_dir() {
                println!("cargo:rerun-if-changed={}", tools.join("nvidia/cu13/bin/nvcc").display());
            }
            println!("cargo:warning={msg}");
            writeln!(generated, "pub const NVCC: Option<&str> = None;\npub const ARCH: &str = \"compute_{arch}\";\npub static MODULES: &[(&str, &str)] = &[];\npub static HOPPER_MODULES: &[(&str, &str)] = &[];").unwrap();
        }
    }
    fs::write(out_dir.join("kernels.rs"), generated).unwrap();
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            candidates.push(Path::new(&p).join("bin").join("nvcc"));
        }
    }
    if let Ok(path) = env::var("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    if let Some(t) = tools_dir() {
        candidates.push(t.join("nvidia/cu13/bin/nvcc"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Where scripts/setup.sh installs nvcc.
fn tools_dir() -> Option<PathBuf> {
    env::var("SDLORA_TOOLS_DIR")
        .map(PathBuf::from)
        .ok()
        .or_else(|| env::var("HOME").ok().map(|h| Path::new(&h).join(".cache/sdlora/cuda-13.0")))
}

/// One nvcc run: `cu` to `ptx` for `compute_<arch>`, embedded as module `module` (in the table of
/// Hopper builds when `hopper_build`).
struct Job {
    cu: PathBuf,
    ptx: PathBuf,
    arch: String,
    module: String,
    hopper_build: bool,
}

/// Runs every job, as many at once as there are cores.
fn compile_all(nvcc: &Path, jobs: &[Job], include: &Path) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(j) = jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    compile(nvcc, &j.cu, &j.ptx, include, &j.arch);
                }
            });
        }
    });
}

fn compile(nvcc: &Path, cu: &Path, ptx: &Path, include: &Path, arch: &str) {
    let output = Command::new(nvcc)
        .args(["-ptx", "-O3", "-lineinfo", "-std=c++17"])
        .arg(format!("-arch=compute_{arch}"))
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(ptx)
        .arg(cu)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            cu.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
