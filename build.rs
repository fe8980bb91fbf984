//! With the `cuda` feature, compiles sdscale's own CUDA kernels (the fused attention and the conv's
//! im2col) to PTX with nvcc, as candle-kernels does for candle's: the same toolkit, the same
//! `CUDA_COMPUTE_CAP`. The default build needs no CUDA and runs nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for kernel in KERNELS {
        println!("cargo::rerun-if-changed={kernel}");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
            .find(|path| path.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    // Tensor-core wmma needs sm_70 or newer; PTX for an older target is JIT-compiled on newer GPUs.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for kernel in KERNELS {
        let ptx = out_dir.join(PathBuf::from(kernel).with_extension("ptx").file_name().unwrap());
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("--gpu-architecture=compute_{cap}")])
            .arg(kernel)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} (set NVCC or CUDA_HOME): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {kernel}");
    }
}

/// Each becomes $OUT_DIR/<name>.ptx, which the Rust side include_str!s.
const KERNELS: [&str; 2] = ["src/kernels/cuda/flash_attention.cu", "src/kernels/cuda/im2col.cu"];
