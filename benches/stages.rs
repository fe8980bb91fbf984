//! Per-stage timings: tokenizer, text encoder, one guided UNet step per size and mode, VAE decode.
//!
//!     cargo bench --bench stages                                   # the fixture model, on the CPU
//!     SDSCALE_BENCH_MODEL=~/.cache/sdscale/sd21-random SDSCALE_BENCH_SIZES=224,512 cargo bench --bench stages
//!     SDSCALE_BENCH_DEVICE=cuda cargo bench --features cuda --bench stages   # on the GPU, in f16
//!
//! SDSCALE_BENCH_MODES picks the UNet step's attention modes (default: `default,entropy`).
//! SDSCALE_BENCH_DEVICE is cpu (the default), cuda or cuda:N; SDSCALE_BENCH_DTYPE f32, f16 or bf16
//! (default f32 on the CPU, f16 on CUDA, as `sdscale gen`).
//!
//! Prints one tab-separated line per measurement (`stage  size  mode  median_ms  runs`), the format
//! `scripts/bench_cpu.sh` joins with diffusers' numbers from `scripts/bench_diffusers.py`.
//! Each measurement is warmed up once, then the median of SDSCALE_BENCH_RUNS (default 3) runs.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sdscale::attention::AttentionScale;
use sdscale::hires::UNetPlan;
use sdscale::mode::{Denoiser, RenderPlan};
use sdscale::pipeline::{GenerateRequest, Pipeline};
use sdscale::size::PixelSize;
use sdscale::weights::{ModelFiles, ModelSource};
use std::path::PathBuf;
use std::time::Instant;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Median wall time in ms of `runs` calls after one warm-up; the device is synchronised before the clock
/// is read, since GPU work is asynchronous.
fn time_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(samples[samples.len() / 2])
}

fn report(stage: &str, size: &str, mode: &str, ms: f64, runs: usize) {
    println!("{stage}\t{size}\t{mode}\t{ms:.2}\t{runs}");
}

fn main() -> Result<()> {
    sdscale::tune_allocator();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let model = std::env::var("SDSCALE_BENCH_MODEL").map(PathBuf::from).unwrap_or(fixture);
    let sizes: Vec<usize> =
        env_or("SDSCALE_BENCH_SIZES", "192").split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let runs: usize = env_or("SDSCALE_BENCH_RUNS", "3").parse()?;
    let stages = env_or("SDSCALE_BENCH_STAGES", "load,tokenizer,text,unet,vae");
    let modes = env_or("SDSCALE_BENCH_MODES", "default,entropy");
    let device = match env_or("SDSCALE_BENCH_DEVICE", "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Device::new_cuda(ordinal)?,
            _ => anyhow::bail!("SDSCALE_BENCH_DEVICE={other}: use cpu, cuda or cuda:N"),
        },
    };
    let dtype = match std::env::var("SDSCALE_BENCH_DTYPE").ok().as_deref() {
        None if device.is_cuda() => DType::F16,
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => anyhow::bail!("SDSCALE_BENCH_DTYPE={other}: use f32, f16 or bf16"),
    };
    eprintln!("stages: {device:?}, {dtype:?}");

    let start = Instant::now();
    let files = ModelFiles::resolve(&ModelSource::Dir(model.clone()), dtype)?;
    let pipeline = Pipeline::load(&files, &device, dtype)?;
    if stages.contains("load") {
        report("load", "-", "-", start.elapsed().as_secs_f64() * 1e3, 1);
    }

    let prompt = "a corgi on a beach, golden hour, highly detailed photograph";
    if stages.contains("tokenizer") {
        let tokenizer = sdscale::tokenizer::ClipTokenizer::load(&files.tokenizer_dir)?;
        let ms = time_ms(&device, runs, || {
            for _ in 0..100 {
                tokenizer.encode(prompt)?;
            }
            Ok(())
        })?;
        report("tokenizer_x100", "-", "-", ms, runs);
    }

    let request = |size: usize, attention| GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        plan: RenderPlan {
            render: PixelSize::new(size, size),
            attention,
            structure: Default::default(),
            denoiser: Denoiser::Whole,
            resize_to: None,
        },
        steps: 50,
        sampler: sdscale::sampler::SamplerSpec::ddim(),
        guidance_scale: 7.5,
        seed: 1,
        vae_tiling: false,
    };
    // SDXL also has pooled embeddings, which feed the added conditioning below.
    let (embeddings, pooled) =
        pipeline.encode_prompt_pooled(&request(512, AttentionScale::Default), true, &mut |_| {})?;
    if stages.contains("text") {
        let ms = time_ms(&device, runs, || {
            pipeline.encode_prompt(&request(512, AttentionScale::Default), true, &mut |_| {})?;
            Ok(())
        })?;
        report("text_encoder_b2", "-", "-", ms, runs);
    }

    let factor = pipeline.vae_scale_factor();
    let entropy = AttentionScale::Entropy { train_latent: pipeline.training().latent() };
    for &size in &sizes {
        let latent = size / factor;
        let label = format!("{size}x{size}");
        if stages.contains("unet") {
            let sample = pipeline.prepare_latents(1, latent, latent)?;
            let batch = Tensor::cat(&[&sample, &sample], 0)?;
            let unet = pipeline.unet();
            let mut time = unet.time_features(981.0, 2, dtype, &device)?;
            if let Some(pooled) = &pooled {
                time = Tensor::cat(&[&time, &pipeline.added_features(pooled, PixelSize::new(size, size))?], 1)?;
            }
            for (mode, scale) in [("default", AttentionScale::Default), ("entropy", entropy)] {
                if !modes.split(',').any(|m| m == mode) {
                    continue;
                }
                let ms = time_ms(&device, runs, || {
                    unet.forward_with_time(&batch, &time, &embeddings, scale, None, &UNetPlan::default())?;
                    Ok(())
                })?;
                report("unet_step_cfg", &label, mode, ms, runs);
            }
        }
        if stages.contains("vae") {
            let latents = pipeline.prepare_latents(2, latent, latent)?;
            let ms = time_ms(&device, runs, || {
                pipeline.decode_latents(&latents, &mut |_| {})?;
                Ok(())
            })?;
            report("vae_decode", &label, "-", ms, runs);
        }
    }
    Ok(())
}
