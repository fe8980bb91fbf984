//! Samplers: how the denoising loop turns each UNet output into the next latents.
//!
//! One seam for all of them, [`Sampler`]: the loop asks it for the timesteps to feed the UNet, the
//! UNet's input at each of them ([`Sampler::scale_model_input`]) and the next latents
//! ([`Sampler::step`]). Each implementation keeps its own state (DPM++'s previous outputs, Heun's
//! half step, PNDM's history), so the loop has no sampler-specific branch.
//!
//! The numbers are diffusers 0.42.1's `schedulers/scheduling_*.py`, built as diffusers'
//! `Class.from_config(model's scheduler_config, **overrides)`: the model's file gives the betas,
//! spacing, offset and prediction type; each class's constructor defaults give the rest. The shared
//! pieces (the training noise table, sigma schedules, `_sigma_to_t`) are written once here, in the
//! float widths numpy and torch use, above one small file per sampler (k-diffusion's shape).

mod ddim;
mod dpmpp;
mod euler;
mod heun;
mod lms;
mod pndm;
mod unipc;

pub use ddim::DdimScheduler;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The samplers, in ComfyUI's spellings (`pndm` as diffusers names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM (Song et al. 2020): the paper's sampler.
    Ddim,
    /// PNDM's pseudo linear multistep (PLMS), as SD's own scheduler config names it.
    Pndm,
    /// Euler (Karras et al. 2022's Algorithm 2 without churn).
    Euler,
    /// Euler ancestral: Euler plus fresh noise every step.
    #[value(name = "euler_ancestral")]
    #[serde(rename = "euler_ancestral")]
    EulerAncestral,
    /// Heun's second-order method: two UNet calls per step but the last.
    Heun,
    /// Linear multistep (order 4), coefficients integrated numerically.
    Lms,
    /// DPM-Solver++ 2M (multistep, second order).
    #[value(name = "dpmpp_2m")]
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
    /// DPM-Solver++ 2M SDE: DPM++ 2M with noise every step.
    #[value(name = "dpmpp_2m_sde")]
    #[serde(rename = "dpmpp_2m_sde")]
    Dpmpp2mSde,
    /// UniPC (bh2, predictor-corrector, second order).
    #[value(name = "uni_pc")]
    #[serde(rename = "uni_pc")]
    UniPc,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 9] = [
        SamplerKind::Ddim,
        SamplerKind::Pndm,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Heun,
        SamplerKind::Lms,
        SamplerKind::Dpmpp2m,
        SamplerKind::Dpmpp2mSde,
        SamplerKind::UniPc,
    ];

    /// The word in flags, file names, templates and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Pndm => "pndm",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_ancestral",
            SamplerKind::Heun => "heun",
            SamplerKind::Lms => "lms",
            SamplerKind::Dpmpp2m => "dpmpp_2m",
            SamplerKind::Dpmpp2mSde => "dpmpp_2m_sde",
            SamplerKind::UniPc => "uni_pc",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// AUTOMATIC1111's name (its `Sampler:` field, v1.9+ form, schedule apart).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Pndm => "PLMS",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::Lms => "LMS",
            SamplerKind::Dpmpp2m => "DPM++ 2M",
            SamplerKind::Dpmpp2mSde => "DPM++ 2M SDE",
            SamplerKind::UniPc => "UniPC",
        }
    }

    /// Whether the sampler has sigmas, and so takes `--schedule` (diffusers has no Karras option for
    /// DDIM, PNDM and Euler ancestral).
    pub fn takes_schedule(self) -> bool {
        !matches!(self, SamplerKind::Ddim | SamplerKind::Pndm | SamplerKind::EulerAncestral)
    }

    /// UNet calls for `steps` steps: Heun makes 2N−1, PNDM (PLMS, prk skipped) N+1, the rest N.
    pub fn unet_calls(self, steps: usize) -> usize {
        match self {
            SamplerKind::Heun => 2 * steps - 1,
            SamplerKind::Pndm if steps > 1 => steps + 1,
            _ => steps,
        }
    }
}

/// `--schedule`: how the sigmas are spaced (diffusers' `use_karras_sigmas` / `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Karras et al. 2022's ρ = 7 spacing.
    Karras,
    /// Log-linear between the largest and smallest sigma.
    Exponential,
}

impl Schedule {
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
        }
    }
    pub fn parse(text: &str) -> Option<Self> {
        [Schedule::Karras, Schedule::Exponential].into_iter().find(|s| s.as_str() == text)
    }
    /// AUTOMATIC1111's `Schedule type:` value.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Schedule::Karras => "Karras",
            Schedule::Exponential => "Exponential",
        }
    }
}

/// `--timestep-spacing` (diffusers' `timestep_spacing`; Table 2 of Lin et al. 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

impl Spacing {
    pub fn as_str(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Linspace => "linspace",
            Spacing::Trailing => "trailing",
        }
    }
    pub fn parse(text: &str) -> Option<Self> {
        [Spacing::Leading, Spacing::Linspace, Spacing::Trailing].into_iter().find(|s| s.as_str() == text)
    }
}

/// What the user asked for: a sampler (or the model's own), optionally a schedule and a spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SamplerChoice {
    /// `None`: `--sampler model`, the class the model's scheduler_config.json names.
    pub kind: Option<SamplerKind>,
    pub schedule: Option<Schedule>,
    pub spacing: Option<Spacing>,
}

impl Default for SamplerChoice {
    /// DDIM, the paper's sampler, with the model's spacing.
    fn default() -> Self {
        SamplerChoice { kind: Some(SamplerKind::Ddim), schedule: None, spacing: None }
    }
}

/// A sampler resolved against a model's scheduler config: what runs and what metadata records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SamplerSpec {
    pub kind: SamplerKind,
    pub schedule: Option<Schedule>,
    /// The spacing in effect (the override, else the model config's, else the class default).
    pub spacing: Spacing,
}

impl SamplerSpec {
    /// DDIM with leading spacing: what every image was made with before samplers (SD's configs).
    pub fn ddim() -> Self {
        SamplerSpec { kind: SamplerKind::Ddim, schedule: None, spacing: Spacing::Leading }
    }

    /// "DPM++ 2M Karras"-style label for grids and pages.
    pub fn label(&self) -> String {
        match self.schedule {
            Some(schedule) => format!("{} {}", self.kind.a1111_name(), schedule.a1111_name()),
            None => self.kind.a1111_name().to_string(),
        }
    }
}

/// Checks a choice on its own (before any model is known): a schedule only for samplers with sigmas.
pub fn check_choice(choice: &SamplerChoice, flag: &str) -> Result<()> {
    if let (Some(kind), Some(schedule)) = (choice.kind, choice.schedule) {
        if !kind.takes_schedule() {
            let takers: Vec<&str> =
                SamplerKind::ALL.into_iter().filter(|k| k.takes_schedule()).map(SamplerKind::as_str).collect();
            bail!(
                "{flag} {} does not apply to --sampler {} (it has no sigmas); the samplers that take it: {}",
                schedule.as_str(),
                kind.as_str(),
                takers.join(", ")
            );
        }
    }
    Ok(())
}

/// A sampler name as the user typed it: one of [`SamplerKind`]'s or `model`.
pub fn parse_sampler_name(text: &str, flag: &str) -> Result<Option<SamplerKind>> {
    if text == "model" {
        return Ok(None);
    }
    SamplerKind::parse(text).map(Some).with_context(|| {
        let names: Vec<&str> = SamplerKind::ALL.into_iter().map(SamplerKind::as_str).collect();
        format!("{flag} {text:?} is not a sampler; use one of {}, or model (the model's own)", names.join(", "))
    })
}

/// The model's `scheduler/scheduler_config.json`, every field optional: a field the file lacks takes
/// the chosen class's own default, as `from_config` does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub set_alpha_to_one: Option<bool>,
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub timestep_spacing: Option<String>,
    pub prediction_type: Option<String>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub predict_x0: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub disable_corrector: Option<Vec<usize>>,
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading scheduler config {}", path.display()))?;
        let config: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing scheduler config {}", path.display()))?;
        config.validate().with_context(|| format!("scheduler config {}", path.display()))?;
        Ok(config)
    }

    /// What every sampler reads the same way; sampler-specific fields are checked when one is built.
    fn validate(&self) -> Result<()> {
        if let Some(prediction) = &self.prediction_type {
            if Prediction::from_config(prediction).is_none() {
                bail!("prediction_type {prediction:?} is not supported (use \"epsilon\" or \"v_prediction\")");
            }
        }
        if self.thresholding == Some(true) {
            bail!("thresholding: true is not supported");
        }
        if self.rescale_betas_zero_snr == Some(true) {
            bail!("rescale_betas_zero_snr: true is not supported");
        }
        let schedule = self.beta_schedule.as_deref().unwrap_or("linear");
        if !["linear", "scaled_linear"].contains(&schedule) && self.trained_betas.is_none() {
            bail!("beta_schedule {schedule:?} is not supported (use linear or scaled_linear)");
        }
        if let Some(spacing) = &self.timestep_spacing {
            if Spacing::parse(spacing).is_none() {
                bail!("timestep_spacing {spacing:?} is not supported (leading, linspace or trailing)");
            }
        }
        if self.num_train_timesteps.is_some_and(|n| n < 2) {
            bail!("num_train_timesteps must be at least 2");
        }
        Ok(())
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction_type.as_deref().and_then(Prediction::from_config).unwrap_or(Prediction::Epsilon)
    }

    /// `--sampler model`: the sampler (and schedule) the config's class and settings name.
    pub fn model_sampler(&self) -> Result<(SamplerKind, Option<Schedule>)> {
        let class = self.class_name.as_deref().unwrap_or("(none)");
        let schedule = if self.use_karras_sigmas == Some(true) {
            Some(Schedule::Karras)
        } else if self.use_exponential_sigmas == Some(true) {
            Some(Schedule::Exponential)
        } else {
            None
        };
        let kind = match class {
            "DDIMScheduler" => SamplerKind::Ddim,
            "PNDMScheduler" => SamplerKind::Pndm,
            "EulerDiscreteScheduler" => SamplerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SamplerKind::EulerAncestral,
            "HeunDiscreteScheduler" => SamplerKind::Heun,
            "LMSDiscreteScheduler" => SamplerKind::Lms,
            "UniPCMultistepScheduler" => SamplerKind::UniPc,
            "DPMSolverMultistepScheduler" => match self.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
                "dpmsolver++" => SamplerKind::Dpmpp2m,
                "sde-dpmsolver++" => SamplerKind::Dpmpp2mSde,
                other => bail!(
                    "the model's scheduler is DPMSolverMultistepScheduler with algorithm_type {other:?}, which \
                     sdscale does not implement; pick one with --sampler (e.g. dpmpp_2m)"
                ),
            },
            other => {
                let names: Vec<&str> = SamplerKind::ALL.into_iter().map(SamplerKind::as_str).collect();
                bail!(
                    "the model's scheduler {other} is not one sdscale implements; pick one with --sampler ({})",
                    names.join(", ")
                )
            }
        };
        Ok((kind, schedule))
    }

    /// The choice made concrete for this model: `model` resolved, the spacing in effect found, and the
    /// combination checked (one line naming the fix when refused).
    pub fn resolve(&self, choice: &SamplerChoice) -> Result<SamplerSpec> {
        let (kind, model_schedule) = match choice.kind {
            Some(kind) => (kind, None),
            None => self.model_sampler()?,
        };
        // Explicit --schedule wins; for --sampler model the config's own flags say it. For an explicit
        // sampler, from_config still passes the config's use_karras_sigmas, as diffusers would.
        let schedule = choice.schedule.or(model_schedule).or_else(|| {
            if !kind.takes_schedule() {
                return None;
            }
            if self.use_karras_sigmas == Some(true) {
                Some(Schedule::Karras)
            } else if self.use_exponential_sigmas == Some(true) {
                Some(Schedule::Exponential)
            } else {
                None
            }
        });
        let spec = SamplerSpec { kind, schedule, spacing: choice.spacing.unwrap_or_else(|| self.spacing_for(kind)) };
        check_choice(&SamplerChoice { kind: Some(kind), schedule: spec.schedule, spacing: None }, "--schedule")?;
        Ok(spec)
    }

    /// The config's spacing, else the class's default: leading for DDIM and PNDM, linspace for the rest.
    fn spacing_for(&self, kind: SamplerKind) -> Spacing {
        self.timestep_spacing.as_deref().and_then(Spacing::parse).unwrap_or(match kind {
            SamplerKind::Ddim | SamplerKind::Pndm => Spacing::Leading,
            _ => Spacing::Linspace,
        })
    }

    /// Builds the sampler for `steps` steps.
    pub fn build(&self, spec: &SamplerSpec, steps: usize, eta: f64) -> Result<Box<dyn Sampler>> {
        let n_train = self.num_train_timesteps();
        if steps == 0 || steps > n_train {
            bail!("steps must be between 1 and {n_train}, got {steps}");
        }
        let table = NoiseTable::new(self)?;
        Ok(match spec.kind {
            SamplerKind::Ddim => Box::new(DdimScheduler::from_table(self, table, spec.spacing, steps, eta)?),
            SamplerKind::Pndm => Box::new(pndm::Pndm::new(self, table, spec.spacing, steps)?),
            SamplerKind::Euler => Box::new(euler::Euler::new(self, table, spec, steps, false)?),
            SamplerKind::EulerAncestral => Box::new(euler::Euler::new(self, table, spec, steps, true)?),
            SamplerKind::Heun => Box::new(heun::Heun::new(self, table, spec, steps)?),
            SamplerKind::Lms => Box::new(lms::Lms::new(self, table, spec, steps)?),
            SamplerKind::Dpmpp2m => Box::new(dpmpp::DpmSolverPP::new(self, table, spec, steps, false)?),
            SamplerKind::Dpmpp2mSde => Box::new(dpmpp::DpmSolverPP::new(self, table, spec, steps, true)?),
            SamplerKind::UniPc => Box::new(unipc::UniPc::new(self, table, spec, steps)?),
        })
    }

    /// Refuses a config field value the chosen class would read but sdscale does not implement.
    fn refuse_unless(&self, field: &str, value: Option<&str>, supported: &[&str]) -> Result<()> {
        if let Some(value) = value {
            if !supported.contains(&value) {
                bail!("scheduler config {field} {value:?} is not supported (sdscale implements {supported:?})");
            }
        }
        Ok(())
    }
}

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

/// Where a stochastic step's fresh noise comes from: standard normals of the given (B, c, h, w) shape
/// (the step's sample's), each image's from its own seeded generator, continuing after its initial
/// latents, as diffusers' `randn_tensor(model_output.shape, generator=…)`.
pub type NoiseSource<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// The seam between the denoising loop and a sampler (diffusers' `set_timesteps` → per step
/// `scale_model_input`, UNet, `step`).
pub trait Sampler: Send {
    /// The timestep fed to the UNet at each call, in order (Heun repeats its inner ones: 2N−1 calls;
    /// PNDM's PLMS repeats one: N+1). Fractional for the Euler family, as diffusers feeds them.
    fn timesteps(&self) -> &[f64];

    /// The initial noise's standard deviation (`init_noise_sigma`): 1 for DDIM-like samplers, about
    /// σ_max for the Euler family (√(σ_max²+1) with leading spacing).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The UNet's input at call `index` (the Euler family divides by √(σ²+1)).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// The next latents after call `index`, from the (guided) UNet output. Called once per entry of
    /// [`Sampler::timesteps`], in order.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, noise: &mut NoiseSource)
        -> Result<Tensor>;

    /// A copy with the same state: MultiDiffusion keeps one per window group, as diffusers' panorama
    /// pipeline saves and restores the scheduler's `__dict__` around each view batch.
    fn box_clone(&self) -> Box<dyn Sampler>;
}

// ---------------------------------------------------------------------------------------------------
// Shared pieces, in the float widths diffusers computes them in.

/// The training noise schedule: ᾱ_t (float32, as torch keeps it) and σ_t = √((1−ᾱ)/ᾱ).
#[derive(Debug, Clone)]
pub struct NoiseTable {
    pub alphas_cumprod: Vec<f32>,
    /// σ for every training timestep, float32 (torch computes them on the f32 ᾱ).
    pub sigmas: Vec<f32>,
    /// ln σ, float32 (`np.log` of the float32 array).
    pub log_sigmas: Vec<f32>,
}

impl NoiseTable {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let n_train = config.num_train_timesteps();
        let beta_start = config.beta_start.unwrap_or(0.0001);
        let beta_end = config.beta_end.unwrap_or(0.02);
        let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule.as_deref().unwrap_or("linear")) {
            (Some(betas), _) => {
                if betas.len() != n_train {
                    bail!("trained_betas has {} values for {n_train} timesteps", betas.len());
                }
                betas.iter().map(|&b| b as f32).collect()
            }
            (None, "linear") => linspace_f32(beta_start as f32, beta_end as f32, n_train),
            // diffusers: torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float32) ** 2
            (None, "scaled_linear") => linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n_train)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            (None, other) => bail!("beta_schedule {other:?} is not supported (use linear or scaled_linear)"),
        };
        // torch.cumprod of the f32 alphas accumulates in double and rounds each value to f32.
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .scan(1f64, |product, beta| {
                *product *= (1.0 - beta) as f64;
                Some(*product as f32)
            })
            .collect();
        let sigmas: Vec<f32> = alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Ok(NoiseTable { alphas_cumprod, sigmas, log_sigmas })
    }

    /// `np.interp(t, arange(len), sigmas)` in float64.
    pub fn sigma_at(&self, t: f64) -> f64 {
        let last = self.sigmas.len() - 1;
        if t <= 0.0 {
            return self.sigmas[0] as f64;
        }
        if t >= last as f64 {
            return self.sigmas[last] as f64;
        }
        let j = t.floor() as usize;
        let (y0, y1) = (self.sigmas[j] as f64, self.sigmas[j + 1] as f64);
        let slope = (y1 - y0) / 1.0;
        slope * (t - j as f64) + y0
    }

    /// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to σ,
    /// with numpy's promotions (the table is float32, σ float64).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigma = sigma.max(1e-10).ln();
        let n = self.log_sigmas.len();
        // cumsum(dists >= 0).argmax(): the last index whose log-sigma is ≤ log σ (0 if none).
        let mut low = 0;
        for (i, &ls) in self.log_sigmas.iter().enumerate() {
            if log_sigma - ls as f64 >= 0.0 {
                low = i;
            }
        }
        let low = low.min(n - 2);
        let high = low + 1;
        let (lo, hi) = (self.log_sigmas[low], self.log_sigmas[high]);
        let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * high as f64
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)`: ATen fills the first half forward from `start`
/// and the second half backward from `end`, with fused multiply-adds in float32
/// (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp).
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// `np.linspace(start, stop, n)` in float64: start + i·step, the last value exactly `stop`.
pub(crate) fn linspace_f64(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    values[n - 1] = stop;
    values
}

/// numpy's `round` (half to even), which diffusers' timestep spacings use.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let rounded = x.round();
    if (x - x.trunc()).abs() == 0.5 && rounded % 2.0 != 0.0 {
        rounded - x.signum()
    } else {
        rounded
    }
}

/// `np.arange(start, 0, -step)` for a positive float step, as numpy computes its values
/// (start + i·(−step), length ⌈start/step⌉).
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil() as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// The N inference timesteps of the Euler/Heun/LMS family (float, noisiest first), diffusers'
/// `set_timesteps` spacing rules: linspace `np.linspace(0, T−1, N, dtype=float32)[::-1]`, leading
/// `arange(N)·(T//N) + offset`, trailing `round(arange(T, 0, −T/N)) − 1`.
pub(crate) fn sigma_family_timesteps(n_train: usize, steps: usize, spacing: Spacing, offset: usize) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            // np.linspace with dtype float32 computes in float64 and casts.
            linspace_f64(0.0, (n_train - 1) as f64, steps).into_iter().rev().map(|t| t as f32 as f64).collect()
        }
        Spacing::Leading => {
            let ratio = n_train / steps;
            (0..steps).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        Spacing::Trailing => arange_down(n_train as f64, n_train as f64 / steps as f64)
            .into_iter()
            .map(|t| round_half_even(t) - 1.0)
            .collect(),
    }
}

/// DPM-Solver and UniPC's N integer timesteps: linspace `round(linspace(0, T−1, N+1))[::-1][:-1]`,
/// leading `arange(N+1)·(T//(N+1))[::-1][:-1] + offset`, trailing as the Euler family.
pub(crate) fn multistep_timesteps(n_train: usize, steps: usize, spacing: Spacing, offset: usize) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => linspace_f64(0.0, (n_train - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(round_half_even)
            .collect(),
        Spacing::Leading => {
            let ratio = n_train / (steps + 1);
            (1..=steps).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        Spacing::Trailing => arange_down(n_train as f64, n_train as f64 / steps as f64)
            .into_iter()
            .map(|t| round_half_even(t) - 1.0)
            .collect(),
    }
}

/// Karras et al.'s ρ = 7 sigmas from σ_max down to σ_min (float64, k-diffusion's formula).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Log-linear sigmas from σ_max down to σ_min (float64).
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    linspace_f64(sigma_max.ln(), sigma_min.ln(), steps).into_iter().map(f64::exp).collect()
}

// Tensor helpers: torch's scalar-tensor arithmetic is float32; a division is a true division.

/// `tensor / scalar` as torch divides (not a multiplication by the reciprocal).
pub(crate) fn div_scalar(tensor: &Tensor, scalar: f32) -> candle_core::Result<Tensor> {
    let divisor = Tensor::new(scalar, tensor.device())?.to_dtype(tensor.dtype())?;
    tensor.broadcast_div(&divisor)
}

/// `tensor * scalar` in the tensor's dtype.
pub(crate) fn mul_scalar(tensor: &Tensor, scalar: f32) -> candle_core::Result<Tensor> {
    tensor.affine(scalar as f64, 0.0)
}

/// The f32 working copy of a sample, as diffusers upcasts in `step`.
pub(crate) fn f32_of(tensor: &Tensor) -> candle_core::Result<Tensor> {
    tensor.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd21() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "set_alpha_to_one": false, "skip_prk_steps": true,
                "steps_offset": 1, "trained_betas": null}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_model_sampler_of_sd21_is_pndm_with_leading_spacing_and_others_take_linspace() {
        let config = sd21();
        let model = config.resolve(&SamplerChoice { kind: None, schedule: None, spacing: None }).unwrap();
        assert_eq!((model.kind, model.spacing), (SamplerKind::Pndm, Spacing::Leading));
        let euler = config.resolve(&SamplerChoice { kind: Some(SamplerKind::Euler), ..Default::default() }).unwrap();
        assert_eq!(euler.spacing, Spacing::Linspace);
        let euler = config.build(&euler, 50, 0.0).unwrap();
        assert_eq!(euler.timesteps()[0], 999.0);
    }

    #[test]
    fn a_schedule_is_refused_for_samplers_without_sigmas() {
        for kind in [SamplerKind::Ddim, SamplerKind::Pndm, SamplerKind::EulerAncestral] {
            let choice = SamplerChoice { kind: Some(kind), schedule: Some(Schedule::Karras), spacing: None };
            let error = check_choice(&choice, "--schedule").unwrap_err().to_string();
            assert!(error.contains("dpmpp_2m") && error.contains(kind.as_str()), "{error}");
        }
    }

    #[test]
    fn unknown_classes_are_refused_under_model() {
        let config = SchedulerConfig { class_name: Some("LCMScheduler".into()), ..sd21() };
        let error = config.resolve(&SamplerChoice { kind: None, schedule: None, spacing: None }).unwrap_err();
        assert!(error.to_string().contains("LCMScheduler"), "{error}");
    }

    #[test]
    fn spacings_match_diffusers_rules() {
        assert_eq!(sigma_family_timesteps(1000, 4, Spacing::Leading, 1), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(sigma_family_timesteps(1000, 4, Spacing::Trailing, 1), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(sigma_family_timesteps(1000, 4, Spacing::Linspace, 1), vec![999.0, 666.0, 333.0, 0.0]);
        assert_eq!(multistep_timesteps(1000, 4, Spacing::Linspace, 1), vec![999.0, 749.0, 500.0, 250.0]);
        assert_eq!(multistep_timesteps(1000, 4, Spacing::Leading, 1), vec![801.0, 601.0, 401.0, 201.0]);
    }

    #[test]
    fn round_half_even_matches_numpy() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
