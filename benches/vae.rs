//! The VAE decode of one random latent, whole or in tiles (diffusers' `enable_tiling()`): seconds, the
//! process's peak RSS, and the decoder's own estimate of the whole decode's peak (which decides when
//! `gen` tiles on its own).
//!
//!     SDSCALE_BENCH_MODEL=~/.cache/sdscale/sd21-random SDSCALE_BENCH_SIZE=1024 SDSCALE_BENCH_TILED=1 \
//!         cargo bench --bench vae
//!
//! Peak RSS belongs to the process, so each run measures one decode: `scripts/bench_vae.sh` runs the
//! grid (sizes × whole/tiled). Prints one tab-separated line:
//! `vae_decode  size  whole|tiled  seconds  peak_rss_mib  rss_before_mib  estimate_mib`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sdscale::backend::Backends;
use sdscale::family::{LatentDecoder, LatentScaling, SdVae};
use sdscale::weights::{ModelFiles, ModelSource};
use std::path::PathBuf;
use std::time::Instant;

/// VmHWM (peak resident set) or VmRSS of this process, in MiB.
fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() -> Result<()> {
    sdscale::tune_allocator();
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let model = std::env::var("SDSCALE_BENCH_MODEL").map(PathBuf::from).unwrap_or(fixture);
    let size: usize = env("SDSCALE_BENCH_SIZE", "512").parse()?;
    let tiled = env("SDSCALE_BENCH_TILED", "0") == "1";
    let (device, dtype) = (Device::Cpu, DType::F32);

    let files = ModelFiles::resolve(&ModelSource::Dir(model), dtype)?;
    let backends = Backends::choose(&device, dtype).map_err(anyhow::Error::msg)?;
    let vae = SdVae::load(&files.vae_config, &files.vae_weights, &device, dtype, &backends, LatentScaling::Divide)?;
    let latent = size / vae.scale_factor();
    let latents = Tensor::randn(0f32, 1f32, (1, vae.latent_channels(), latent, latent), &device)?;
    let estimate = vae.untiled_peak_bytes(latent, latent).map_or(0.0, |bytes| bytes as f64 / (1 << 20) as f64);
    let before = status_mib("VmRSS:");
    let started = Instant::now();
    let image = vae.decode(&(latents * 0.18215)?, tiled, &mut |warning| eprintln!("warning: {warning}"))?;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(image.dimensions(), (size as u32, size as u32));
    let mode = if tiled { "tiled" } else { "whole" };
    let peak = status_mib("VmHWM:");
    println!("vae_decode\t{size}\t{mode}\t{seconds:.1}\t{peak:.0}\t{before:.0}\t{estimate:.0}");
    Ok(())
}
