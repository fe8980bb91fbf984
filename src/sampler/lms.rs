//! Linear multistep (order 4) as diffusers' `LMSDiscreteScheduler` (0.42.1): the next sample is the
//! current one plus Σ cᵢ·dᵢ over the last derivatives, with cᵢ the integral over [σ_t, σ_{t+1}] of the
//! Lagrange basis polynomial through the previous sigmas.
//!
//! diffusers integrates with scipy's `quad` (epsrel 1e-4). The integrand is a polynomial of degree at
//! most 3, so Gauss–Legendre with 4 nodes integrates it exactly; `quad`'s 21-point Gauss–Kronrod rule is
//! exact for it too, so the two agree to rounding.

use super::euler::{predicted_original, sigma_schedule, SigmaSchedule};
use super::{div_scalar, mul_scalar, NoiseSource, NoiseTable, Prediction, Sampler, SamplerSpec, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

const ORDER: usize = 4;

#[derive(Debug, Clone)]
pub struct Lms {
    schedule: SigmaSchedule,
    prediction: Prediction,
    /// The last (at most 4) derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(config: &SchedulerConfig, table: NoiseTable, spec: &SamplerSpec, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = sigma_schedule(config, &table, spec, steps, (None, None));
        let schedule = SigmaSchedule::new(timesteps, sigmas, spec);
        Ok(Lms { schedule, prediction: config.prediction(), derivatives: Vec::new() })
    }

    /// diffusers' `get_lms_coefficient(order, t, current_order)`: ∫_{σ_t}^{σ_{t+1}} Π_{k≠cur} (τ − σ_{t−k}) /
    /// (σ_{t−cur} − σ_{t−k}) dτ.
    pub fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sigma = |i: usize| self.schedule.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - sigma(t - k)) / (sigma(t - current) - sigma(t - k)))
                .product::<f64>()
        };
        gauss_legendre_4(basis, sigma(t), sigma(t + 1))
    }
}

/// ∫_a^b f with 4-point Gauss–Legendre: exact for polynomials up to degree 7.
fn gauss_legendre_4(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const NODES: [(f64, f64); 4] = [
        (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        (-0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
        (0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
        (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
    ];
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    half * NODES.iter().map(|&(x, w)| w * f(mid + half * x)).sum::<f64>()
}

impl Sampler for Lms {
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
        let sigma = self.schedule.sigmas[index];
        let pred_original_sample = predicted_original(self.prediction, model_output, sample, sigma)?;
        let derivative = div_scalar(&(sample - pred_original_sample)?, sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        // prev = sample + Σ coeff·derivative, newest derivative first (Python's sum starts from 0).
        let mut prev_sample = sample.clone();
        let mut total: Option<Tensor> = None;
        for (current, derivative) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = mul_scalar(derivative, self.coefficient(order, index, current) as f32)?;
            total = Some(match total {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        if let Some(total) = total {
            prev_sample = (prev_sample + total)?;
        }
        Ok(prev_sample)
    }

    fn box_clone(&self) -> Box<dyn Sampler> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_integrates_cubics_exactly() {
        let cubic = |x: f64| 2.0 * x * x * x - x + 0.5;
        let exact = |x: f64| 0.5 * x.powi(4) - 0.5 * x * x + 0.5 * x;
        let (a, b) = (14.6, 3.2);
        assert!((gauss_legendre_4(cubic, a, b) - (exact(b) - exact(a))).abs() < 1e-9);
    }
}
