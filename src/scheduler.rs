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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use std::path::Path;

/// The fields of `scheduler/scheduler_config.json` that DDIM reads; defaults are DDIMScheduler's.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// "linear" or "scaled_linear" (SD) ; "squaredcos_cap_v2" is refused.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    /// Whether the step past t = 0 uses ᾱ = 1 (true) or ᾱ₀ (false, as SD 2.1 says).
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    /// "leading" (SD 2.1), "trailing" or "linspace".
    pub timestep_spacing: String,
    /// "epsilon" (the model predicts the noise: SD 1.x, 2.1-base, LDM) or "v_prediction" (it predicts
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀: SD 2.x at 768).
    pub prediction_type: String,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        // DDIMScheduler.__init__ defaults.
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            set_alpha_to_one: true,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            timestep_spacing: "leading".into(),
            prediction_type: "epsilon".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading scheduler config {}", path.display()))?;
        let config: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing scheduler config {}", path.display()))?;
        config.validate().with_context(|| format!("scheduler config {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if Prediction::from_config(&self.prediction_type).is_none() {
            bail!("prediction_type {:?} is not supported (use \"epsilon\" or \"v_prediction\")", self.prediction_type);
        }
        if self.thresholding {
            bail!("thresholding: true is not supported");
        }
        if self.rescale_betas_zero_snr {
            bail!("rescale_betas_zero_snr: true is not supported");
        }
        if !["linear", "scaled_linear"].contains(&self.beta_schedule.as_str()) && self.trained_betas.is_none() {
            bail!("beta_schedule {:?} is not supported (use linear or scaled_linear)", self.beta_schedule);
        }
        if !["leading", "trailing", "linspace"].contains(&self.timestep_spacing.as_str()) {
            bail!("timestep_spacing {:?} is not supported", self.timestep_spacing);
        }
        if self.num_train_timesteps < 2 {
            bail!("num_train_timesteps must be at least 2");
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)`: ATen fills the first half forward from `start`
/// and the second half backward from `end`, with fused multiply-adds in float32
/// (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// The sampler's name as metadata and A1111's `parameters` text give it.
pub const SAMPLER: &str = "DDIM";

/// What the UNet's output means (the scheduler config's `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

impl Prediction {
    fn from_config(name: &str) -> Option<Self> {
        match name {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::V),
            _ => None,
        }
    }
}

pub struct DdimScheduler {
    /// ᾱ_t for every training timestep, float32 as in diffusers.
    pub alphas_cumprod: Vec<f32>,
    /// The inference timesteps, from noisiest to cleanest (e.g. 981, 961, …, 1 for 50 leading steps).
    pub timesteps: Vec<usize>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    prediction: Prediction,
    config: DdimConfig,
}

impl DdimScheduler {
    pub fn new(config: &DdimConfig, num_inference_steps: usize) -> Result<Self> {
        let n_train = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            bail!("steps must be between 1 and {n_train}, got {num_inference_steps}");
        }
        let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule.as_str()) {
            (Some(betas), _) => betas.iter().map(|&b| b as f32).collect(),
            (None, "linear") => linspace_f32(config.beta_start as f32, config.beta_end as f32, n_train),
            // diffusers: torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float32) ** 2
            (None, _) => linspace_f32((config.beta_start).sqrt() as f32, (config.beta_end).sqrt() as f32, n_train)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        };
        // torch.cumprod of the f32 alphas accumulates in double and rounds each value to f32.
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .scan(1f64, |product, beta| {
                *product *= (1.0 - beta) as f64;
                Some(*product as f32)
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };

        let step_ratio = n_train / num_inference_steps;
        // diffusers DDIMScheduler.set_timesteps
        let timesteps: Vec<usize> = match config.timestep_spacing.as_str() {
            "linspace" => (0..num_inference_steps)
                .rev()
                .map(|i| {
                    let t = if num_inference_steps == 1 {
                        0.0
                    } else {
                        i as f64 * (n_train - 1) as f64 / (num_inference_steps - 1) as f64
                    };
                    round_half_even(t) as usize
                })
                .collect(),
            "trailing" => {
                let ratio = n_train as f64 / num_inference_steps as f64;
                (0..num_inference_steps)
                    .map(|i| round_half_even(n_train as f64 - i as f64 * ratio) as usize - 1)
                    .collect()
            }
            _ => (0..num_inference_steps).rev().map(|i| i * step_ratio + config.steps_offset).collect(),
        };
        let prediction = Prediction::from_config(&config.prediction_type)
            .with_context(|| format!("prediction_type {:?} is not supported", config.prediction_type))?;
        Ok(Self { alphas_cumprod, timesteps, final_alpha_cumprod, step_ratio, prediction, config: config.clone() })
    }

    /// (ᾱ_t, ᾱ_prev) for a step from `timestep`, in f32 as diffusers keeps them.
    fn alphas(&self, timestep: usize) -> (f32, f32) {
        let alpha_prod_t = self.alphas_cumprod[timestep];
        // diffusers: prev_timestep = timestep - num_train_timesteps // num_inference_steps
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
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);
        let (mut pred_original_sample, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => {
                // A true division (not a multiplication by the reciprocal), as torch divides.
                let sqrt_alpha_prod_t = Tensor::new(alpha_prod_t.sqrt(), sample.device())?;
                let x0 = (&sample - (&model_output * sqrt_beta)?)?.broadcast_div(&sqrt_alpha_prod_t)?;
                (x0, model_output)
            }
            Prediction::V => {
                let x0 = ((&sample * sqrt_alpha)? - (&model_output * sqrt_beta)?)?;
                let epsilon = ((&model_output * sqrt_alpha)? + (&sample * sqrt_beta)?)?;
                (x0, epsilon)
            }
        };
        if self.config.clip_sample {
            let range = self.config.clip_sample_range as f32;
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

/// numpy's `round` (half to even), which diffusers' timestep spacings use.
fn round_half_even(x: f64) -> f64 {
    let rounded = x.round();
    if (x - x.trunc()).abs() == 0.5 && rounded % 2.0 != 0.0 {
        rounded - x.signum()
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd21_config() -> DdimConfig {
        DdimConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            set_alpha_to_one: false,
            steps_offset: 1,
            clip_sample: false,
            ..DdimConfig::default()
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
        assert!(DdimScheduler::new(&sd21_config(), 0).is_err());
        assert!(DdimScheduler::new(&sd21_config(), 1001).is_err());
    }

    #[test]
    fn unknown_prediction_types_are_refused() {
        let config = DdimConfig { prediction_type: "sample".into(), ..sd21_config() };
        assert!(config.validate().unwrap_err().to_string().contains("\"sample\""));
        let config = DdimConfig { prediction_type: "v_prediction".into(), ..sd21_config() };
        assert!(config.validate().is_ok());
    }

    /// A v-prediction step undoes the forward process exactly when the model predicts the true v:
    /// x_t = √ᾱ·x₀ + √(1−ᾱ)·ε and v = √ᾱ·ε − √(1−ᾱ)·x₀ give back x₀ and ε, so the step lands on
    /// √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε.
    #[test]
    fn v_prediction_recovers_the_clean_sample() -> candle_core::Result<()> {
        let config = DdimConfig { prediction_type: "v_prediction".into(), ..sd21_config() };
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

    #[test]
    fn round_half_even_matches_numpy() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
