//! Heun's method as diffusers' `HeunDiscreteScheduler` (0.42.1): every step but the last takes an
//! Euler step, calls the UNet again at the arrival sigma and averages the two slopes. diffusers lays this
//! out as 2N−1 UNet calls over the repeated timesteps [t₀, t₁, t₁, t₂, t₂, …], alternating a first-order
//! and a correcting call; the state between the two is the slope, dt and the starting sample.

use super::euler::{predicted_original, sigma_schedule, SigmaSchedule};
use super::{div_scalar, mul_scalar, NoiseSource, NoiseTable, Prediction, Sampler, SamplerSpec, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Heun {
    /// Per UNet call: [t₀, t₁, t₁, …] (2N−1) and [σ₀, σ₁, σ₁, …, σ_{N−1}, σ_{N−1}, 0] (2N).
    schedule: SigmaSchedule,
    prediction: Prediction,
    clip_sample: Option<f32>,
    /// Between the two calls of a step: (first slope, dt, starting sample).
    first_order: Option<(Tensor, f32, Tensor)>,
}

impl Heun {
    pub fn new(config: &SchedulerConfig, table: NoiseTable, spec: &SamplerSpec, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = sigma_schedule(config, &table, spec, steps, (None, None));
        // sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]; timesteps[:1], timesteps[1:] twice.
        let mut call_sigmas = vec![sigmas[0]];
        for &sigma in &sigmas[1..sigmas.len() - 1] {
            call_sigmas.extend([sigma, sigma]);
        }
        call_sigmas.push(sigmas[sigmas.len() - 1]);
        let mut call_timesteps = vec![timesteps[0]];
        for &t in &timesteps[1..] {
            call_timesteps.extend([t, t]);
        }
        // HeunDiscreteScheduler's clip_sample defaults to false.
        let clip_sample = config.clip_sample.unwrap_or(false).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Heun {
            // The start noise from the N sigmas (the repeats do not change their maximum).
            schedule: SigmaSchedule::new(call_timesteps, call_sigmas, spec),
            prediction: config.prediction(),
            clip_sample,
            first_order: None,
        })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        // Heun does not upcast: the sample stays in the model's dtype, as diffusers.
        let (sigma, sigma_next) = match self.first_order {
            None => (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]),
            Some(_) => (self.schedule.sigmas[index - 1], self.schedule.sigmas[index]),
        };
        let sigma_input = if self.first_order.is_none() { sigma } else { sigma_next };
        let mut pred_original_sample = predicted_original(self.prediction, model_output, sample, sigma_input)?;
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        let (derivative, dt, start) = match self.first_order.take() {
            None => {
                let derivative = div_scalar(&(sample - pred_original_sample)?, sigma)?;
                let dt = sigma_next - sigma;
                self.first_order = Some((derivative.clone(), dt, sample.clone()));
                (derivative, dt, sample.clone())
            }
            Some((first, dt, start)) => {
                let second = div_scalar(&(sample - pred_original_sample)?, sigma_next)?;
                (div_scalar(&(first + second)?, 2.0)?, dt, start)
            }
        };
        Ok((start + mul_scalar(&derivative, dt)?)?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}
