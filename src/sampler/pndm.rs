//! PNDM's pseudo linear multistep (PLMS) as diffusers' `PNDMScheduler` with `skip_prk_steps` (0.42.1),
//! the scheduler SD 1.5 and 2.1-base ship with. N steps take N+1 UNet calls: the second call repeats
//! the first step's timestep to average two slopes (a Heun-like start), after which each step
//! extrapolates from up to four previous outputs with the Adams–Bashforth weights.

use super::{div_scalar, f32_of, mul_scalar, NoiseSource, NoiseTable, Prediction, Sampler, SchedulerConfig, Spacing};
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `plms_timesteps`: [t₀, t₁, t₁, t₂, …, t_{N−1}] (N+1 entries).
    timesteps: Vec<usize>,
    model_timesteps: Vec<f64>,
    /// num_train_timesteps // num_inference_steps.
    step_ratio: usize,
    prediction: Prediction,
    /// Previous model outputs (`ets`), oldest first.
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(config: &SchedulerConfig, table: NoiseTable, spacing: Spacing, steps: usize) -> Result<Self> {
        if config.skip_prk_steps != Some(true) {
            // PNDMScheduler's default is false: diffusers then runs Runge–Kutta warm-up steps, which SD's
            // configs switch off (skip_prk_steps: true) and sdscale does not implement.
            bail!(
                "--sampler pndm needs skip_prk_steps: true in the model's scheduler config (PNDM's Runge-Kutta \
                 warm-up is not implemented); pick another --sampler"
            );
        }
        let n_train = config.num_train_timesteps();
        let offset = config.steps_offset.unwrap_or(0);
        // PNDMScheduler.set_timesteps: ascending `_timesteps`.
        let ascending: Vec<usize> = match spacing {
            Spacing::Linspace => super::linspace_f64(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .map(|t| super::round_half_even(t) as usize)
                .collect(),
            Spacing::Leading => (0..steps).map(|i| i * (n_train / steps) + offset).collect(),
            Spacing::Trailing => super::sigma_family_timesteps(n_train, steps, Spacing::Trailing, 0)
                .into_iter()
                .rev()
                .map(|t| t as usize)
                .collect(),
        };
        // plms_timesteps = concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]
        let n = ascending.len();
        let mut plms: Vec<usize> = ascending[..n - 1].to_vec();
        if n >= 2 {
            plms.push(ascending[n - 2]);
        }
        plms.push(ascending[n - 1]);
        plms.reverse();
        let alphas_cumprod = table.alphas_cumprod;
        // PNDMScheduler's set_alpha_to_one defaults to false.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        Ok(Pndm {
            alphas_cumprod,
            final_alpha_cumprod,
            model_timesteps: plms.iter().map(|&t| t as f64).collect(),
            timesteps: plms,
            step_ratio: n_train / steps,
            prediction: config.prediction(),
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper), scalars in float32.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: usize,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev =
            if prev_timestep >= 0 { self.alphas_cumprod[prev_timestep as usize] } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.prediction {
            Prediction::Epsilon => model_output.clone(),
            Prediction::V => {
                (mul_scalar(model_output, alpha_prod_t.sqrt())? + mul_scalar(sample, beta_prod_t.sqrt())?)?
            }
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        // sample_coeff·x − (ᾱ_prev − ᾱ_t)·out / denom, left to right as Python evaluates it.
        let update = div_scalar(&mul_scalar(&model_output, alpha_prod_t_prev - alpha_prod_t)?, denom)?;
        Ok((mul_scalar(sample, sample_coeff)? - update)?)
    }
}

impl Sampler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.model_timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let (model_output, mut sample) = (f32_of(model_output)?, f32_of(sample)?);
        let mut timestep = self.timesteps[index];
        let mut prev_timestep = timestep as i64 - self.step_ratio as i64;
        if self.counter != 1 {
            // ets = ets[-3:] + [model_output]
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep as i64;
            timestep += self.step_ratio;
        }
        let ets = &self.ets;
        let len = ets.len();
        let model_output = if len == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if len == 1 && self.counter == 1 {
            sample = self.cur_sample.take().expect("set by the first call");
            div_scalar(&(model_output + &ets[0])?, 2.0)?
        } else if len == 2 {
            div_scalar(&(mul_scalar(&ets[1], 3.0)? - &ets[0])?, 2.0)?
        } else if len == 3 {
            let sum = ((mul_scalar(&ets[2], 23.0)? - mul_scalar(&ets[1], 16.0)?)? + mul_scalar(&ets[0], 5.0)?)?;
            div_scalar(&sum, 12.0)?
        } else {
            let sum = (((mul_scalar(&ets[3], 55.0)? - mul_scalar(&ets[2], 59.0)?)? + mul_scalar(&ets[1], 37.0)?)?
                - mul_scalar(&ets[0], 9.0)?)?;
            // 1/24 · (…): a multiplication by the float 1/24, as Python writes it.
            mul_scalar(&sum, (1.0f64 / 24.0) as f32)?
        };
        let prev_sample = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev_sample.to_dtype(dtype)?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}
