//! DPM-Solver++ 2M and 2M SDE as diffusers' `DPMSolverMultistepScheduler` (0.42.1) with its defaults:
//! `solver_order` 2, `solver_type` midpoint, `lower_order_final` true, `final_sigmas_type` zero, and
//! `algorithm_type` dpmsolver++ (2M) or sde-dpmsolver++ (2M SDE).
//!
//! Each step converts the UNet output to a predicted x₀, keeps the last two, and takes a first-order
//! step at the start and at the last step (σ = 0 there), a second-order one in between. The sigmas
//! ([`multistep_sigmas`], shared with UniPC) come from the integer timesteps, or, for Karras and
//! exponential, from the full training table re-spaced, mapped back to timesteps that are rounded
//! (Karras) or truncated (exponential) for the UNet.

use super::{
    div_scalar, exponential_sigmas, f32_of, karras_sigmas, mul_scalar, multistep_timesteps, round_half_even,
    NoiseSource, NoiseTable, Prediction, Sampler, SamplerSpec, Schedule, SchedulerConfig,
};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Integer UNet timesteps and float32 sigmas (a final 0 appended) of DPM-Solver and UniPC.
pub(super) fn multistep_sigmas(
    config: &SchedulerConfig,
    table: &NoiseTable,
    spec: &SamplerSpec,
    steps: usize,
    sigma_bounds: (Option<f64>, Option<f64>),
) -> (Vec<f64>, Vec<f32>) {
    let offset = config.steps_offset.unwrap_or(0);
    let timesteps = multistep_timesteps(config.num_train_timesteps(), steps, spec.spacing, offset);
    let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = match spec.schedule {
        None => {
            let sigmas = timesteps.iter().map(|&t| table.sigma_at(t)).collect();
            (timesteps, sigmas)
        }
        Some(kind) => {
            // The full training table, flipped: σ_min and σ_max are its ends.
            let sigma_min = sigma_bounds.0.unwrap_or(table.sigmas[0] as f64);
            let sigma_max = sigma_bounds.1.unwrap_or(table.sigmas[table.sigmas.len() - 1] as f64);
            let sigmas = match kind {
                Schedule::Karras => karras_sigmas(sigma_min, sigma_max, steps),
                Schedule::Exponential => exponential_sigmas(sigma_min, sigma_max, steps),
            };
            let timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = table.sigma_to_t(s);
                    // Karras rounds (numpy, half to even); exponential's astype(int64) truncates.
                    match kind {
                        Schedule::Karras => round_half_even(t),
                        Schedule::Exponential => t.trunc(),
                    }
                })
                .collect();
            (timesteps, sigmas)
        }
    };
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    (timesteps, sigmas)
}

/// (α_t, σ_t) of a sigma, diffusers' `_sigma_to_alpha_sigma_t`, float32.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// λ = ln α − ln σ (float32; +∞ at σ = 0, which the formulas below handle as diffusers' do).
pub(super) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// The model output as a predicted x₀ (`convert_model_output` of the ++ / predict-x₀ variants).
pub(super) fn predicted_x0(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match prediction {
        Prediction::Epsilon => div_scalar(&(sample - mul_scalar(model_output, sigma_t)?)?, alpha_t)?,
        Prediction::V => (mul_scalar(sample, alpha_t)? - mul_scalar(model_output, sigma_t)?)?,
    })
}

#[derive(Debug, Clone)]
pub struct DpmSolverPP {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    sde: bool,
    /// The previous step's predicted x₀ (`model_outputs[-2]` at the next step).
    previous_x0: Option<Tensor>,
    /// Steps taken so far, up to the solver order (`lower_order_nums`).
    lower_order_nums: usize,
}

impl DpmSolverPP {
    pub fn new(
        config: &SchedulerConfig,
        table: NoiseTable,
        spec: &SamplerSpec,
        steps: usize,
        sde: bool,
    ) -> Result<Self> {
        if config.solver_order.is_some_and(|order| order != 2) {
            bail!(
                "scheduler config solver_order {} is not supported (DPM++ 2M is second order)",
                config.solver_order.unwrap()
            );
        }
        config.refuse_unless("solver_type", config.solver_type.as_deref(), &["midpoint"])?;
        config.refuse_unless("final_sigmas_type", config.final_sigmas_type.as_deref(), &["zero"])?;
        config.refuse_unless("variance_type", config.variance_type.as_deref(), &[])?;
        if config.use_lu_lambdas == Some(true)
            || config.use_beta_sigmas == Some(true)
            || config.use_flow_sigmas == Some(true)
        {
            bail!("scheduler config use_lu_lambdas / use_beta_sigmas / use_flow_sigmas are not supported");
        }
        // With final_sigmas_type zero the last step is first order whatever euler_at_final and
        // lower_order_final say; lower_order_final only matters for third order, which is refused.
        if config.lambda_min_clipped.is_some_and(|l| l.is_finite()) {
            bail!("scheduler config lambda_min_clipped is not supported");
        }
        let (timesteps, sigmas) = multistep_sigmas(config, &table, spec, steps, (None, None));
        Ok(DpmSolverPP {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            sde,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }
}

impl Sampler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let (model_output, sample) = (f32_of(model_output)?, f32_of(sample)?);
        // The last step is first order (final sigma 0), as are the ones before two outputs exist.
        let last = index == self.timesteps.len() - 1;
        let x0 = predicted_x0(self.prediction, &model_output, &sample, self.sigmas[index])?;
        let z = if self.sde { Some(f32_of(&noise(sample.dims())?)?) } else { None };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let first_order = self.lower_order_nums < 1 || last;
        let prev_sample = if !self.sde {
            // x_t = σ_t/σ_s·x − α_t(e^{−h} − 1)·D0 [− ½·α_t(e^{−h} − 1)·D1]
            let mut x_t = (mul_scalar(&sample, sigma_t / sigma_s0)? - mul_scalar(&x0, alpha_t * ((-h).exp() - 1.0))?)?;
            if !first_order {
                let d1 = self.second_difference(&x0, index, h)?;
                x_t = (x_t - mul_scalar(&d1, 0.5 * (alpha_t * ((-h).exp() - 1.0)))?)?;
            }
            x_t
        } else {
            // x_t = σ_t/σ_s·e^{−h}·x + α_t(1 − e^{−2h})·D0 [+ ½·α_t(1 − e^{−2h})·D1] + σ_t√(1 − e^{−2h})·z
            let decay = 1.0 - (-2.0 * h).exp();
            let mut x_t = (mul_scalar(&sample, sigma_t / sigma_s0 * (-h).exp())? + mul_scalar(&x0, alpha_t * decay)?)?;
            if !first_order {
                let d1 = self.second_difference(&x0, index, h)?;
                x_t = (x_t + mul_scalar(&d1, 0.5 * (alpha_t * decay))?)?;
            }
            let z = z.expect("drawn above for the SDE");
            (x_t + mul_scalar(&z, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?)?
        };
        self.previous_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev_sample.to_dtype(dtype)?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}

impl DpmSolverPP {
    /// D1 = (1/r0)·(m0 − m1), r0 = h_0/h with h_0 = λ_s0 − λ_s1.
    fn second_difference(&self, x0: &Tensor, index: usize, h: f32) -> Result<Tensor> {
        let previous = self.previous_x0.as_ref().expect("second order needs a previous output");
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
        let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
        let r0 = h_0 / h;
        Ok(mul_scalar(&(x0 - previous)?, 1.0 / r0)?)
    }
}
