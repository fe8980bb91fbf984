//! Euler and Euler ancestral, as diffusers' `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler` (0.42.1): the sigma-space ODE step x + (x − x₀)/σ · (σ_next − σ),
//! the ancestral one stepping to σ_down and adding σ_up·z.
//!
//! Their sigmas are shared with Heun and LMS ([`sigma_schedule`]): the training σ table interpolated at
//! the (fractional) timesteps, optionally re-spaced (Karras, exponential) and mapped back to fractional
//! timesteps with `_sigma_to_t`; the UNet is fed those fractional timesteps.

use super::{
    div_scalar, exponential_sigmas, f32_of, karras_sigmas, mul_scalar, sigma_family_timesteps, NoiseSource, NoiseTable,
    Prediction, Sampler, SamplerSpec, Schedule, SchedulerConfig,
};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Timesteps (as the UNet is fed them, float32) and sigmas (float32, a final 0 appended) of the
/// Euler/Heun/LMS family. `sigma_bounds` are the config's `sigma_min`/`sigma_max` where the class reads
/// them (Euler), else the ends of the interpolated sigmas.
pub(super) fn sigma_schedule(
    config: &SchedulerConfig,
    table: &NoiseTable,
    spec: &SamplerSpec,
    steps: usize,
    sigma_bounds: (Option<f64>, Option<f64>),
) -> (Vec<f64>, Vec<f32>) {
    let offset = config.steps_offset.unwrap_or(0);
    let timesteps = sigma_family_timesteps(config.num_train_timesteps(), steps, spec.spacing, offset);
    let sigmas: Vec<f64> = timesteps.iter().map(|&t| table.sigma_at(t)).collect();
    let respaced = |sigmas: &[f64], kind: Schedule| {
        let sigma_min = sigma_bounds.0.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = sigma_bounds.1.unwrap_or(sigmas[0]);
        match kind {
            Schedule::Karras => karras_sigmas(sigma_min, sigma_max, steps),
            Schedule::Exponential => exponential_sigmas(sigma_min, sigma_max, steps),
        }
    };
    let (timesteps, sigmas) = match spec.schedule {
        None => (timesteps, sigmas),
        Some(kind) => {
            let sigmas = respaced(&sigmas, kind);
            (sigmas.iter().map(|&s| table.sigma_to_t(s)).collect(), sigmas)
        }
    };
    // Fed to the UNet as float32; sigmas concatenated with 0 and cast to float32.
    let timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    (timesteps, sigmas)
}

/// What the family's samplers share: per UNet call the timestep fed to the UNet and its σ (a final 0
/// after the last), and the start noise.
#[derive(Debug, Clone)]
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    /// `init_noise_sigma`: σ_max for linspace/trailing, √(σ_max²+1) for leading (f32).
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    pub fn new(timesteps: Vec<f64>, sigmas: Vec<f32>, spec: &SamplerSpec) -> Self {
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = match spec.spacing {
            super::Spacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        };
        SigmaSchedule { timesteps, sigmas, init_noise_sigma }
    }

    /// x / √(σ²+1), the family's `scale_model_input` (σ² + 1 and its root in float32, a true division).
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        Ok(div_scalar(sample, (sigma * sigma + 1.0).sqrt())?)
    }
}

/// x₀ from the model output at σ (the family's `pred_original_sample`), float32.
pub(super) fn predicted_original(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - mul_scalar(model_output, sigma)?)?,
        // model_output·(−σ/√(σ²+1)) + x/(σ²+1)
        Prediction::V => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul_scalar(model_output, c_out)? + div_scalar(sample, sigma * sigma + 1.0)?)?
        }
    })
}

#[derive(Debug, Clone)]
pub struct Euler {
    schedule: SigmaSchedule,
    prediction: Prediction,
    ancestral: bool,
}

impl Euler {
    pub fn new(
        config: &SchedulerConfig,
        table: NoiseTable,
        spec: &SamplerSpec,
        steps: usize,
        ancestral: bool,
    ) -> Result<Self> {
        config.refuse_unless("interpolation_type", config.interpolation_type.as_deref(), &["linear"])?;
        config.refuse_unless("timestep_type", config.timestep_type.as_deref(), &["discrete"])?;
        if !ancestral {
            config.refuse_unless("final_sigmas_type", config.final_sigmas_type.as_deref(), &["zero"])?;
        }
        if config.use_beta_sigmas == Some(true) {
            bail!("scheduler config use_beta_sigmas is not supported");
        }
        // Euler reads sigma_min/sigma_max from its config; Euler ancestral has neither.
        let bounds = if ancestral { (None, None) } else { (config.sigma_min, config.sigma_max) };
        let (timesteps, sigmas) = sigma_schedule(config, &table, spec, steps, bounds);
        let schedule = SigmaSchedule::new(timesteps, sigmas, spec);
        Ok(Euler { schedule, prediction: config.prediction(), ancestral })
    }
}

impl Sampler for Euler {
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
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let (sample, model_output) = (f32_of(sample)?, f32_of(model_output)?);
        // s_churn = 0: γ = 0, σ̂ = σ.
        let (sigma, sigma_next) = (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]);
        let pred_original_sample = predicted_original(self.prediction, &model_output, &sample, sigma)?;
        let derivative = div_scalar(&(&sample - pred_original_sample)?, sigma)?;
        let prev_sample = if self.ancestral {
            let sigma_up =
                (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)).sqrt();
            let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
            let moved = (&sample + mul_scalar(&derivative, sigma_down - sigma)?)?;
            // Drawn every step, the last included (where σ_up = 0), as diffusers does.
            let z = f32_of(&noise(sample.dims())?)?;
            (moved + mul_scalar(&z, sigma_up)?)?
        } else {
            (&sample + mul_scalar(&derivative, sigma_next - sigma)?)?
        };
        Ok(prev_sample.to_dtype(dtype)?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}
