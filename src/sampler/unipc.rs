//! UniPC as diffusers' `UniPCMultistepScheduler` (0.42.1) with its defaults: `solver_order` 2,
//! `solver_type` bh2, `predict_x0` true, `lower_order_final` true, no disabled corrector.
//!
//! Each step first corrects the previous prediction with the new model output (UniC), then predicts the
//! next sample (UniP); both work on predicted x₀. Sigmas and timesteps are DPM-Solver's.

use super::dpmpp::{alpha_sigma, lambda, multistep_sigmas, predicted_x0};
use super::{
    div_scalar, f32_of, mul_scalar, NoiseSource, NoiseTable, Prediction, Sampler, SamplerSpec, SchedulerConfig,
};
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    disable_corrector: Vec<usize>,
    /// The last two predicted x₀ (`model_outputs`), oldest first.
    model_outputs: [Option<Tensor>; 2],
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

impl UniPc {
    pub fn new(config: &SchedulerConfig, table: NoiseTable, spec: &SamplerSpec, steps: usize) -> Result<Self> {
        if config.solver_order.is_some_and(|order| order != 2) {
            bail!(
                "scheduler config solver_order {} is not supported for UniPC (sdscale runs order 2)",
                config.solver_order.unwrap()
            );
        }
        config.refuse_unless("solver_type", config.solver_type.as_deref(), &["bh2"])?;
        config.refuse_unless("final_sigmas_type", config.final_sigmas_type.as_deref(), &["zero"])?;
        if config.predict_x0 == Some(false) || config.lower_order_final == Some(false) {
            bail!("scheduler config predict_x0 / lower_order_final false is not supported for UniPC");
        }
        if config.use_beta_sigmas == Some(true) || config.use_flow_sigmas == Some(true) {
            bail!("scheduler config use_beta_sigmas / use_flow_sigmas are not supported");
        }
        let (timesteps, sigmas) = multistep_sigmas(config, &table, spec, steps, (config.sigma_min, config.sigma_max));
        Ok(UniPc {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: [None, None],
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// The bh2 coefficients shared by predictor and corrector: (h_phi_1, B_h, b) for `order`, float32.
    fn coefficients(h: f32, order: usize) -> (f32, f32, Vec<f32>) {
        let hh = -h; // predict_x0
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1(); // bh2
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i = 1.0f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial_i / b_h);
            factorial_i *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
        }
        (h_phi_1, b_h, b)
    }

    /// UniP: the next sample from x (the corrected current one), order 1 or 2.
    fn predictor(&self, index: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = self.model_outputs[1].as_ref().expect("set before predicting");
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let (h_phi_1, b_h, _) = Self::coefficients(h, order);
        let x_t_ = (mul_scalar(x, sigma_t / sigma_s0)? - mul_scalar(m0, alpha_t * h_phi_1)?)?;
        if order == 1 {
            return Ok(x_t_);
        }
        let m1 = self.model_outputs[0].as_ref().expect("order 2 has two outputs");
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
        let rk = (lambda(alpha_s1, sigma_s1) - lambda_s0) / h;
        let d1 = div_scalar(&(m1 - m0)?, rk)?;
        // rhos_p = [0.5] for order 2.
        let pred_res = mul_scalar(&d1, 0.5)?;
        Ok((x_t_ - mul_scalar(&pred_res, alpha_t * b_h)?)?)
    }

    /// UniC: the current sample, recomputed from the previous one (`last_sample`) with the new model
    /// output `model_t` (predicted x₀) as the corrector's extra node.
    fn corrector(&self, index: usize, model_t: &Tensor, last_sample: &Tensor) -> Result<Tensor> {
        let order = self.this_order;
        let m0 = self.model_outputs[1].as_ref().expect("a previous output");
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index - 1]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let (h_phi_1, b_h, b) = Self::coefficients(h, order);
        let x_t_ = (mul_scalar(last_sample, sigma_t / sigma_s0)? - mul_scalar(m0, alpha_t * h_phi_1)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order == 1 {
            mul_scalar(&d1_t, 0.5)?
        } else {
            let m1 = self.model_outputs[0].as_ref().expect("order 2 has two outputs");
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 2]);
            let rk = (lambda(alpha_s1, sigma_s1) - lambda_s0) / h;
            let d1 = div_scalar(&(m1 - m0)?, rk)?;
            // torch.linalg.solve([[1, 1], [rk, 1]], b)
            let (rk, b1, b2) = (rk as f64, b[0] as f64, b[1] as f64);
            let rho_0 = (b1 - b2) / (1.0 - rk);
            let rho_1 = b1 - rho_0;
            (mul_scalar(&d1, rho_0 as f32)? + mul_scalar(&d1_t, rho_1 as f32)?)?
        };
        Ok((x_t_ - mul_scalar(&correction, alpha_t * b_h)?)?)
    }
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        let use_corrector = index > 0 && !self.disable_corrector.contains(&(index - 1)) && self.last_sample.is_some();
        let model_output_convert = predicted_x0(self.prediction, &model_output, &sample, self.sigmas[index])?;
        if use_corrector {
            let last_sample = self.last_sample.clone().expect("checked");
            sample = self.corrector(index, &model_output_convert, &last_sample)?;
        }
        self.model_outputs = [self.model_outputs[1].take(), Some(model_output_convert)];
        // lower_order_final: the order never exceeds the steps left.
        let this_order = 2.min(self.timesteps.len() - index);
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev_sample = self.predictor(index, &sample, self.this_order)?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev_sample.to_dtype(dtype)?)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}
