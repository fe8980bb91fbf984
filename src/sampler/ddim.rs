//! DDIM (Song et al. 2020) exactly as diffusers' `DDIMScheduler` computes it: epsilon or v
//! prediction, any eta in [0, 1].
//!
//! Reference: diffusers 0.42.1 `schedulers/scheduling_ddim.py`. SD 1.5 and 2.1-base ship a *PNDM*
//! scheduler config; diffusers' `DDIMScheduler.from_config` reads the shared fields and ignores
//! `_class_name`, so we do the same: read the fields, fill DDIM's defaults for the missing ones (SD
//! 1.5's file predates `prediction_type`: epsilon), refuse what we do not implement.
//!
//! With eta > 0 each step adds σ_t·z. diffusers draws z with `randn_tensor(generator=…)`: the
//! StableDiffusionPipeline hands the step its own seeded generator, so z continues that generator's
//! stream right after the initial latents; the caller passes z in (see `Pipeline::denoise_batch`).

use super::{
    div_scalar, f32_of, linspace_f64, round_half_even, NoiseSource, NoiseTable, Prediction, Sampler, SchedulerConfig,
    Spacing,
};
use anyhow::Result;
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    /// ᾱ_t for every training timestep, float32 as in diffusers.
    pub alphas_cumprod: Vec<f32>,
    /// The inference timesteps, from noisiest to cleanest (e.g. 981, 961, …, 1 for 50 leading steps).
    pub timesteps: Vec<usize>,
    /// The same, as the UNet is fed them.
    model_timesteps: Vec<f64>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    prediction: Prediction,
    clip_sample: Option<f32>,
    eta: f64,
}

impl DdimScheduler {
    /// DDIMScheduler.from_config(config) for `steps` steps, eta 0 (the tests' and benchmarks' door).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let spacing = config.timestep_spacing.as_deref().and_then(Spacing::parse).unwrap_or(Spacing::Leading);
        Self::from_table(config, NoiseTable::new(config)?, spacing, steps, 0.0)
    }

    pub(crate) fn from_table(
        config: &SchedulerConfig,
        table: NoiseTable,
        spacing: Spacing,
        steps: usize,
        eta: f64,
    ) -> Result<Self> {
        let n_train = config.num_train_timesteps();
        // DDIMScheduler.__init__ defaults: set_alpha_to_one True, clip_sample True (range 1).
        let alphas_cumprod = table.alphas_cumprod;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_sample = config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        let step_ratio = n_train / steps;
        let offset = config.steps_offset.unwrap_or(0);
        // diffusers DDIMScheduler.set_timesteps
        let timesteps: Vec<usize> = match spacing {
            Spacing::Linspace => linspace_f64(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| round_half_even(t) as usize)
                .collect(),
            Spacing::Trailing => super::sigma_family_timesteps(n_train, steps, Spacing::Trailing, 0)
                .into_iter()
                .map(|t| t as usize)
                .collect(),
            Spacing::Leading => (0..steps).rev().map(|i| i * step_ratio + offset).collect(),
        };
        let model_timesteps = timesteps.iter().map(|&t| t as f64).collect();
        Ok(Self {
            alphas_cumprod,
            timesteps,
            model_timesteps,
            final_alpha_cumprod,
            step_ratio,
            prediction: config.prediction(),
            clip_sample,
            eta,
        })
    }

    /// (ᾱ_t, ᾱ_prev) for a step from `timestep`, in f32 as diffusers keeps them.
    fn alphas(&self, timestep: usize) -> (f32, f32) {
        let alpha_prod_t = self.alphas_cumprod[timestep];
        // diffusers: prev_timestep = timestep - num_train_timesteps // num_inference_steps, whatever
        // the spacing (so with trailing it is not the next entry of the list).
        let alpha_prod_t_prev = match timestep.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        (alpha_prod_t, alpha_prod_t_prev)
    }

    /// One DDIM step with eta = 0 (no noise added): `prev_sample` from `sample` and the model output.
    pub fn step(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        self.step_with_noise(model_output, timestep, sample, 0.0, None)
    }

    /// σ_t / eta for a step from `timestep`: σ_t = eta·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)), diffusers'
    /// `_get_variance`, in f32.
    fn variance(&self, timestep: usize) -> f32 {
        let (alpha_prod_t, alpha_prod_t_prev) = self.alphas(timestep);
        let (beta_prod_t, beta_prod_t_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_t_prev);
        (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev)
    }

    /// One DDIM step: `prev_sample` from `sample` and the model output, computed in f32 with the same
    /// operations, in the same order, as diffusers' `step`:
    ///   epsilon: x₀ = (x − √(1−ᾱ_t)·out) / √ᾱ_t,   ε = out
    ///   v:       x₀ = √ᾱ_t·x − √(1−ᾱ_t)·out,       ε = √ᾱ_t·out + √(1−ᾱ_t)·x
    ///   prev_sample = √ᾱ_prev·x₀ + √(1 − ᾱ_prev − σ_t²)·ε (+ σ_t·z when eta > 0)
    /// `variance_noise` is z (the shape of `sample`), required when eta > 0.
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (alpha_prod_t, alpha_prod_t_prev) = self.alphas(timestep);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let dtype = sample.dtype();
        let sample = f32_of(sample)?;
        let model_output = f32_of(model_output)?;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);
        let (mut pred_original_sample, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = div_scalar(&(&sample - (&model_output * sqrt_beta)?)?, alpha_prod_t.sqrt())?;
                (x0, model_output)
            }
            Prediction::V => {
                let x0 = ((&sample * sqrt_alpha)? - (&model_output * sqrt_beta)?)?;
                let epsilon = ((&model_output * sqrt_alpha)? + (&sample * sqrt_beta)?)?;
                (x0, epsilon)
            }
        };
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        // std_dev_t = eta·√variance in f32 (0 for eta = 0, leaving the direction √(1 − ᾱ_prev)·ε).
        let std_dev_t = eta as f32 * self.variance(timestep).sqrt();
        let pred_sample_direction = (pred_epsilon * (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt() as f64)?;
        let mut prev_sample = ((pred_original_sample * alpha_prod_t_prev.sqrt() as f64)? + pred_sample_direction)?;
        if eta > 0.0 {
            let noise = variance_noise
                .ok_or_else(|| candle_core::Error::Msg("a DDIM step with eta > 0 needs its noise".into()))?;
            prev_sample = (prev_sample + (noise.to_dtype(DType::F32)? * std_dev_t as f64)?)?;
        }
        prev_sample.to_dtype(dtype)
    }
}

impl Sampler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.model_timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let timestep = self.timesteps[index];
        // diffusers draws the variance noise only when eta > 0.
        let variance_noise = if self.eta > 0.0 { Some(noise(sample.dims())?) } else { None };
        Ok(self.step_with_noise(model_output, timestep, sample, self.eta, variance_noise.as_ref())?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd21_config() -> SchedulerConfig {
        SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            set_alpha_to_one: Some(false),
            steps_offset: Some(1),
            clip_sample: Some(false),
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn fifty_leading_steps_with_offset() {
        let scheduler = DdimScheduler::new(&sd21_config(), 50).unwrap();
        assert_eq!(scheduler.timesteps.len(), 50);
        assert_eq!(scheduler.timesteps[0], 981);
        assert_eq!(scheduler.timesteps[1], 961);
        assert_eq!(*scheduler.timesteps.last().unwrap(), 1);
    }

    #[test]
    fn zero_and_too_many_steps_are_refused() {
        let spec = super::super::SamplerSpec {
            kind: super::super::SamplerKind::Ddim,
            schedule: None,
            spacing: Spacing::Leading,
        };
        assert!(sd21_config().build(&spec, 0, 0.0).is_err());
        assert!(sd21_config().build(&spec, 1001, 0.0).is_err());
    }

    /// A v-prediction step undoes the forward process exactly when the model predicts the true v:
    /// x_t = √ᾱ·x₀ + √(1−ᾱ)·ε and v = √ᾱ·ε − √(1−ᾱ)·x₀ give back x₀ and ε, so the step lands on
    /// √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε.
    #[test]
    fn v_prediction_recovers_the_clean_sample() -> candle_core::Result<()> {
        let config = SchedulerConfig { prediction_type: Some("v_prediction".into()), ..sd21_config() };
        let scheduler = DdimScheduler::new(&config, 10).unwrap();
        let device = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 0.25, 2.0], &device)?;
        let epsilon = Tensor::new(&[1.0f32, 0.3, -0.7, 0.1], &device)?;
        let t = scheduler.timesteps[3];
        let (a, a_prev) = scheduler.alphas(t);
        let (a, a_prev) = (a as f64, a_prev as f64);
        let x_t = ((&x0 * a.sqrt())? + (&epsilon * (1.0 - a).sqrt())?)?;
        let v = ((&epsilon * a.sqrt())? - (&x0 * (1.0 - a).sqrt())?)?;
        let expected = ((&x0 * a_prev.sqrt())? + (&epsilon * (1.0 - a_prev).sqrt())?)?;
        let got = scheduler.step(&v, t, &x_t)?;
        let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// eta > 0 adds σ_t·z and shrinks the direction term to √(1 − ᾱ_prev − σ_t²); eta = 1 at the last
    /// step (ᾱ_prev = ᾱ₀) is still finite; the noise is required.
    #[test]
    fn eta_adds_scaled_noise() -> candle_core::Result<()> {
        let scheduler = DdimScheduler::new(&sd21_config(), 10).unwrap();
        let device = candle_core::Device::Cpu;
        let sample = Tensor::new(&[0.5f32, -1.0, 0.25, 2.0], &device)?;
        let output = Tensor::new(&[1.0f32, 0.3, -0.7, 0.1], &device)?;
        let zeros = sample.zeros_like()?;
        let t = scheduler.timesteps[2];
        let plain = scheduler.step(&output, t, &sample)?;
        let with_zero_noise = scheduler.step_with_noise(&output, t, &sample, 0.5, Some(&zeros))?;
        let with_noise = scheduler.step_with_noise(&output, t, &sample, 0.5, Some(&zeros.ones_like()?))?;
        let sigma = 0.5 * (scheduler.variance(t) as f64).sqrt();
        let shift = (&with_noise - &with_zero_noise)?.to_vec1::<f32>()?;
        assert!(shift.iter().all(|s| (*s as f64 - sigma).abs() < 1e-6), "{shift:?} vs σ {sigma}");
        assert!((plain - with_zero_noise)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        assert!(scheduler.step_with_noise(&output, t, &sample, 0.5, None).is_err());
        let last = *scheduler.timesteps.last().unwrap();
        let end = scheduler.step_with_noise(&output, last, &sample, 1.0, Some(&zeros))?;
        assert!(end.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
        Ok(())
    }
}
