//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; nothing otherwise.
//!
//! The PTX lands in `$OUT_DIR/<stem>.ptx` and `src/cuda/` embeds it with `include_str!`; the
//! driver JIT-compiles it for the GPU it finds at run time, so no GPU is needed here.
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH. The virtual
//! architecture is `sm_$CUDA_COMPUTE_CAP` (as for candle's own kernels), else what
//! `nvidia-smi` reports, else sm_80 (the oldest GPU with native bf16; PTX for it runs on
//! every newer one, the H100 included).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let kernels_dir = manifest_dir.join("../../kernels");
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let nvcc = nvcc_path();
    let arch = format!("sm_{}", compute_cap());

    let mut entries: Vec<PathBuf> = std::fs::read_dir(&kernels_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for cu in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
    {
        compile_ptx(&nvcc, &arch, cu, &out_dir);
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set"))
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}

fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        let cap = cap.trim().replace('.', "");
        if !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) {
            return cap;
        }
        panic!("CUDA_COMPUTE_CAP={cap:?}: expected digits such as 90");
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(out) = smi {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(first) = text.lines().next() {
                let cap = first.trim().replace('.', "");
                if !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()) {
                    return cap;
                }
            }
        }
    }
    "80".to_string()
}

fn compile_ptx(nvcc: &Path, arch: &str, cu: &Path, out_dir: &Path) {
    let stem = cu
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_else(|| panic!("bad kernel file name {}", cu.display()));
    let ptx = out_dir.join(format!("{stem}.ptx"));
    let status = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("-arch={arch}"))
        .args(["-O3", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg("-o")
        .arg(&ptx)
        .arg(cu)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed on {} ({status})", cu.display());
    }
}
