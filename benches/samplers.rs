//! Each sampler's own cost per UNet call: `scale_model_input` + `step` over a whole schedule, with the
//! UNet replaced by a fixed tensor, on one image's latents (what a sampler adds to a denoising step).
//!
//!     cargo bench --bench samplers                                  # the fixture model's scheduler config
//!     SDSCALE_BENCH_MODEL=~/.cache/sdscale/sd21-random SDSCALE_BENCH_SIZES=256 cargo bench --bench samplers
//!
//! Prints `sampler_call  size  sampler  median_ms  runs`, the format of `scripts/bench_diffusers.py
//! --sampler-steps`, per UNet call (the schedule's time over its calls). SDSCALE_BENCH_STEPS (default 20).

use anyhow::Result;
use candle_core::{Device, Tensor};
use sdscale::sampler::{SamplerChoice, SamplerKind, Schedule, SchedulerConfig};
use std::path::PathBuf;
use std::time::Instant;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    let model = PathBuf::from(env_or("SDSCALE_BENCH_MODEL", "tests/fixtures/tiny-sd"));
    let config = SchedulerConfig::load(&model.join("scheduler/scheduler_config.json"))?;
    let runs: usize = env_or("SDSCALE_BENCH_RUNS", "5").parse()?;
    let steps: usize = env_or("SDSCALE_BENCH_STEPS", "20").parse()?;
    let sizes: Vec<usize> =
        env_or("SDSCALE_BENCH_SIZES", "256").split(',').map(str::parse).collect::<Result<_, _>>()?;
    for size in sizes {
        let latent = size / 8;
        let sample = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &Device::Cpu)?;
        let output = (Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &Device::Cpu)? * 0.1)?;
        for kind in SamplerKind::ALL {
            let schedules: &[Option<Schedule>] = match kind {
                SamplerKind::Dpmpp2m | SamplerKind::Euler => &[None, Some(Schedule::Karras)],
                _ => &[None],
            };
            for &schedule in schedules {
                let spec = config.resolve(&SamplerChoice { kind: Some(kind), schedule, spacing: None })?;
                let run = || -> Result<usize> {
                    let mut sampler = config.build(&spec, steps, 0.0)?;
                    let mut x = (&sample * sampler.init_noise_sigma() as f64)?;
                    let calls = sampler.timesteps().len();
                    let mut noise =
                        |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?) };
                    for index in 0..calls {
                        let x_in = sampler.scale_model_input(&x, index)?;
                        let model_output = (&output + (x_in * 0.0)?)?;
                        x = sampler.step(&model_output, index, &x, &mut noise)?;
                    }
                    Ok(calls)
                };
                let calls = run()?;
                let mut samples = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let start = Instant::now();
                    run()?;
                    samples.push(start.elapsed().as_secs_f64() * 1e3 / calls as f64);
                }
                samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let label = match schedule {
                    Some(schedule) => format!("{}_{}", kind.as_str(), schedule.as_str()),
                    None => kind.as_str().to_string(),
                };
                println!("sampler_call\t{size}x{size}\t{label}\t{:.3}\t{runs}", samples[runs / 2]);
            }
        }
    }
    Ok(())
}
