//! What the entropy probe (issue 5) costs a whole generation: `gen`'s path (denoise with no probe, then
//! decode) against the same request with the probe recording every step, interleaved, after a warm-up,
//! on the full-size SD 2.1-base architecture with random weights (`scripts/make_fixtures.py --full`).
//!
//!     cargo bench --bench entropy_probe
//!
//! Environment: SDSCALE_BENCH_MODEL (default ~/.cache/sdscale/sd21-random), SDSCALE_BENCH_SIZE (512),
//! SDSCALE_BENCH_STEPS (2), SDSCALE_BENCH_REPEATS (3). Skips, saying so, when the model is absent.

use anyhow::Result;
use candle_core::{DType, Device};
use sdscale::entropy::EntropyProbe;
use sdscale::mode::Mode;
use sdscale::pipeline::{GenerateRequest, Pipeline};
use sdscale::size::PixelSize;
use sdscale::weights::{ModelFiles, ModelSource};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    let model = std::env::var_os("SDSCALE_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sdscale/sd21-random")
    });
    if !model.join("unet").is_dir() {
        eprintln!("entropy_probe: no model at {} (set SDSCALE_BENCH_MODEL); skipped", model.display());
        return Ok(());
    }
    let size: usize = env_or("SDSCALE_BENCH_SIZE", 512);
    let steps: usize = env_or("SDSCALE_BENCH_STEPS", 2);
    let repeats: usize = env_or("SDSCALE_BENCH_REPEATS", 3);

    let device = Device::Cpu;
    let files = ModelFiles::resolve(&ModelSource::Dir(model.clone()), DType::F32)?;
    let pipeline = Pipeline::load(&files, &device, DType::F32)?;
    let request = GenerateRequest {
        prompt: "a corgi on a beach".into(),
        negative_prompt: None,
        plan: Mode::Default.plan(PixelSize::new(size, size), pipeline.training(), Default::default()),
        steps,
        sampler: sdscale::sampler::SamplerSpec::ddim(),
        guidance_scale: 7.5,
        seed: 1,
        vae_tiling: false,
    };
    let quiet = &mut |_: sdscale::pipeline::Event| {};
    let mut run = |probe: Option<&EntropyProbe>| -> Result<Duration> {
        let started = Instant::now();
        let latents = pipeline.denoise(&request, quiet, probe)?;
        pipeline.decode_latents(&latents, &mut |_| {})?; // back on the host: the clock reads finished work
        Ok(started.elapsed())
    };

    eprintln!("entropy_probe: {} at {size}x{size}, {steps} steps, CFG 7.5, f32 CPU", model.display());
    run(None)?; // warm-up: page in the weights, size the allocator
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for repeat in 0..repeats {
        off.push(run(None)?);
        let probe = EntropyProbe::new(0..steps);
        on.push(run(Some(&probe))?);
        eprintln!("  repeat {}: off {:.2?}, on {:.2?}", repeat + 1, off[repeat], on[repeat]);
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (off, on) = (median(&mut off), median(&mut on));
    println!(
        "probe off {off:.2?}, probe on at every step {on:.2?} (medians of {repeats}): {:+.1}%",
        (on.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0
    );
    Ok(())
}
