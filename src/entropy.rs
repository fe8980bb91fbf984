//! The attention-entropy probe, and the `sdscale entropy` report built from it.
//!
//! The paper's argument (Jin et al., NeurIPS 2023, supplementary Eq. 1–5) is about one number per
//! attention row: Ent(A_i) = −Σ_j A_ij log A_ij, which grows like log N − σ_i²/2 with the key count N,
//! σ_i² being the variance over keys of the scaled logits λ·q_i·k_j (Eq. 5). The probe measures both on a
//! real run: for every UNet self-attention layer, at chosen denoising steps, on the text-conditioned
//! branch of classifier-free guidance.
//!
//! It is off unless a caller hands one to [`crate::pipeline::Pipeline::denoise`]; then each self-attention
//! call computes in f32 and only adds reductions over the logits and probabilities its query chunks
//! already hold ([`crate::attention::scaled_dot_product_attention_measured`]), so nothing larger than a
//! chunk is materialised and, in f32 on the CPU, the images do not change at all (elsewhere by rounding).

mod plot;

pub use plot::plot;

use crate::attention::AttentionObserver;
pub use crate::attention::RowStats;
use crate::mode::Mode;
use serde::Serialize;
use std::cell::RefCell;
use std::io::{self, Write};

// ---------------------------------------------------------------------------------------------
// The probe

/// One self-attention layer at one denoising step.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSample {
    pub step: usize,
    /// The diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1`.
    pub layer: String,
    /// UNet level (0 = full latent resolution).
    pub level: usize,
    /// Keys attended over: the layer's h·w tokens.
    pub n_keys: usize,
    pub stats: RowStats,
}

/// Records self-attention statistics at chosen denoising steps. It rides along a `&self` forward pass,
/// hence the interior mutability; passing `None` instead of a probe means no probe and no extra work.
#[derive(Debug, Default)]
pub struct EntropyProbe {
    steps: Vec<usize>,
    state: RefCell<ProbeState>,
}

#[derive(Debug, Default)]
struct ProbeState {
    step: usize,
    batch_entry: usize,
    samples: Vec<LayerSample>,
}

impl EntropyProbe {
    /// A probe recording at these denoising step indices (0-based).
    pub fn new(steps: impl IntoIterator<Item = usize>) -> Self {
        let mut steps: Vec<usize> = steps.into_iter().collect();
        steps.sort_unstable();
        steps.dedup();
        Self { steps, state: RefCell::default() }
    }

    /// The probe, armed for denoising step `step`, if it records that step. `batch_entry` is the index
    /// of the first text-conditioned latents in the UNet's batch: B (the batch size) under guidance,
    /// whose batch is [negatives…, prompts…], 0 without.
    pub fn at_step(&self, step: usize, batch_entry: usize) -> Option<&Self> {
        self.steps.binary_search(&step).ok()?;
        let mut state = self.state.borrow_mut();
        state.step = step;
        state.batch_entry = batch_entry;
        Some(self)
    }

    /// Everything recorded, in forward order within each step.
    pub fn into_samples(self) -> Vec<LayerSample> {
        self.state.into_inner().samples
    }
}

/// The probe is one observer of the UNet's self-attention: it keeps what each layer reports.
impl AttentionObserver for EntropyProbe {
    fn batch_entry(&self) -> usize {
        self.state.borrow().batch_entry
    }

    fn record(&self, layer: &str, level: usize, n_keys: usize, stats: RowStats) {
        let mut state = self.state.borrow_mut();
        let step = state.step;
        state.samples.push(LayerSample { step, layer: layer.to_string(), level, n_keys, stats });
    }
}

/// The denoising step a fraction of the schedule lands on: round(at·(steps − 1)), so 0 is the first
/// step and 1 the last.
pub fn step_index(at: f64, steps: usize) -> usize {
    (at * steps.saturating_sub(1) as f64).round() as usize
}

// ---------------------------------------------------------------------------------------------
// The report

/// One run of the denoising loop at a size and mode, with what its probe recorded.
#[derive(Debug, Clone)]
pub struct Run {
    pub width: usize,
    pub height: usize,
    pub mode: Mode,
    pub samples: Vec<LayerSample>,
}

/// One line of the report: a layer at a size, mode and denoising point.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub width: usize,
    pub height: usize,
    pub mode: Mode,
    pub layer: String,
    pub level: usize,
    /// Keys attended over.
    pub n: usize,
    /// The layer's token count at the training size.
    pub t: usize,
    pub at: f64,
    pub step: usize,
    /// The UNet's timestep there (fractional for the Euler family).
    pub timestep: f64,
    /// Mean and standard deviation of Ent(A_i) over heads and query rows.
    pub entropy: f64,
    pub std: f64,
    /// Mean over rows of σ_i² = Var_j(λ·q_i·k_j).
    pub sigma2: f64,
    /// Ent / log N of the same layer, mode and denoising point at the training size.
    pub train_normalized: Option<f64>,
}

impl Measurement {
    pub fn log_n(&self) -> f64 {
        (self.n as f64).ln()
    }

    /// Ent / log N: 1 is uniform attention, 0 attention to one key. Undefined for a single key.
    pub fn normalized(&self) -> Option<f64> {
        (self.n > 1).then(|| self.entropy / self.log_n())
    }

    /// Eq. 5's prediction: log N − σ²/2.
    pub fn eq5(&self) -> f64 {
        self.log_n() - self.sigma2 / 2.0
    }

    /// The JSON Lines object, keys in a fixed order.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            width: usize,
            height: usize,
            mode: &'a str,
            layer: &'a str,
            level: usize,
            n: usize,
            t: usize,
            at: f64,
            step: usize,
            timestep: f64,
            entropy: f64,
            std: f64,
            log_n: f64,
            normalized: Option<f64>,
            train_normalized: Option<f64>,
            sigma2: f64,
            eq5: f64,
        }
        let line = Line {
            width: self.width,
            height: self.height,
            mode: self.mode.as_str(),
            layer: &self.layer,
            level: self.level,
            n: self.n,
            t: self.t,
            at: self.at,
            step: self.step,
            timestep: self.timestep,
            entropy: self.entropy,
            std: self.std,
            log_n: self.log_n(),
            normalized: self.normalized(),
            train_normalized: self.train_normalized,
            sigma2: self.sigma2,
            eq5: self.eq5(),
        };
        serde_json::to_string(&line).expect("plain numbers and strings serialise")
    }
}

/// Turns runs into report lines, ordered by denoising point, then layer (forward order), then run.
/// `at` holds the requested fractions, `timesteps` the schedule, `train_tokens(level)` each level's
/// token count T at the training size, and `train_size` (width, height) names the run that gives the
/// reference values.
pub fn measurements(
    runs: &[Run],
    at: &[f64],
    timesteps: &[f64],
    train_tokens: impl Fn(usize) -> usize,
    train_size: (usize, usize),
) -> Vec<Measurement> {
    let mut lines = Vec::new();
    for &at in at {
        let step = step_index(at, timesteps.len());
        let layers = runs.first().map(|run| layer_order(&run.samples)).unwrap_or_default();
        for layer in &layers {
            for run in runs {
                let Some(sample) = run.samples.iter().find(|s| s.step == step && &s.layer == layer) else {
                    continue;
                };
                lines.push(Measurement {
                    width: run.width,
                    height: run.height,
                    mode: run.mode,
                    layer: layer.clone(),
                    level: sample.level,
                    n: sample.n_keys,
                    t: train_tokens(sample.level),
                    at,
                    step,
                    timestep: timesteps[step],
                    entropy: sample.stats.entropy(),
                    std: sample.stats.std(),
                    sigma2: sample.stats.sigma2(),
                    train_normalized: None,
                });
            }
        }
    }
    let reference: Vec<Option<f64>> = lines
        .iter()
        .map(|line| {
            lines
                .iter()
                .find(|r| {
                    (r.width, r.height) == train_size && r.mode == line.mode && r.layer == line.layer && r.at == line.at
                })
                .and_then(Measurement::normalized)
        })
        .collect();
    for (line, reference) in lines.iter_mut().zip(reference) {
        line.train_normalized = reference;
    }
    lines
}

/// Layer paths in the order the UNet ran them (first step seen).
fn layer_order(samples: &[LayerSample]) -> Vec<String> {
    let mut layers: Vec<String> = Vec::new();
    for sample in samples {
        if !layers.contains(&sample.layer) {
            layers.push(sample.layer.clone());
        }
    }
    layers
}

/// The human-readable report: per denoising point, one small table per layer with a row per size and
/// the two modes side by side.
pub fn write_table(out: &mut dyn Write, lines: &[Measurement], steps: usize) -> io::Result<()> {
    writeln!(out, "Ent: mean over heads and query rows of -Σ_j A_ij log A_ij (text-conditioned branch).")?;
    writeln!(out, "Ent/log N: 1 = uniform attention; train = its value at the training size.")?;
    writeln!(out, "Eq.5: the paper's prediction log N - σ²/2, σ² = variance of the scaled logits over keys.")?;
    let mut ats: Vec<(f64, usize, f64)> = Vec::new();
    for line in lines {
        if !ats.iter().any(|&(at, _, _)| at == line.at) {
            ats.push((line.at, line.step, line.timestep));
        }
    }
    let fmt = |value: Option<f64>, decimals: usize| match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".into(),
    };
    for (at, step, timestep) in ats {
        writeln!(out, "\n== at {at}: step {} of {steps}, timestep {timestep} ==", step + 1)?;
        let at_lines: Vec<&Measurement> = lines.iter().filter(|l| l.at == at).collect();
        let layers = {
            let mut layers: Vec<(&str, usize, usize)> = Vec::new();
            for line in &at_lines {
                if !layers.iter().any(|(layer, _, _)| *layer == line.layer) {
                    layers.push((&line.layer, line.level, line.t));
                }
            }
            layers
        };
        for (layer, level, t) in layers {
            writeln!(out, "\n{layer}  (level {level}, T = {t})")?;
            writeln!(
                out,
                "{:>11} {:>7} {:>7} | {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8}",
                "size", "N", "log N", "Ent def", "Ent ent", "norm def", "norm ent", "train", "Eq.5 def", "Eq.5 ent"
            )?;
            let mut sizes: Vec<(usize, usize)> = Vec::new();
            for line in at_lines.iter().filter(|l| l.layer == layer) {
                if !sizes.contains(&(line.width, line.height)) {
                    sizes.push((line.width, line.height));
                }
            }
            for (width, height) in sizes {
                let find = |mode| {
                    at_lines
                        .iter()
                        .find(|l| l.layer == layer && (l.width, l.height) == (width, height) && l.mode == mode)
                };
                let (default, entropy) = (find(Mode::Default), find(Mode::Entropy));
                let any = default.or(entropy).expect("a size is listed only when one of its modes is");
                writeln!(
                    out,
                    "{:>11} {:>7} {:>7.3} | {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8}",
                    format!("{width}x{height}"),
                    any.n,
                    any.log_n(),
                    fmt(default.map(|l| l.entropy), 4),
                    fmt(entropy.map(|l| l.entropy), 4),
                    fmt(default.and_then(|l| l.normalized()), 4),
                    fmt(entropy.and_then(|l| l.normalized()), 4),
                    fmt(any.train_normalized, 4),
                    fmt(default.map(|l| l.eq5()), 4),
                    fmt(entropy.map(|l| l.eq5()), 4),
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Result, Tensor};

    fn stats_of(scores: &Tensor) -> Result<RowStats> {
        let mut stats = RowStats::default();
        stats.accumulate(scores, &candle_nn::ops::softmax_last_dim(scores)?)?;
        Ok(stats)
    }

    #[test]
    fn uniform_rows_have_entropy_log_n_and_no_spread() -> Result<()> {
        let scores = Tensor::full(0.7f32, (2, 3, 50), &Device::Cpu)?;
        let stats = stats_of(&scores)?;
        assert_eq!(stats.rows, 6);
        assert!((stats.entropy() - 50f64.ln()).abs() < 1e-5, "{}", stats.entropy());
        assert!(stats.std() < 1e-3 && stats.sigma2() < 1e-12);
        Ok(())
    }

    #[test]
    fn one_hot_rows_have_zero_entropy_not_nan() -> Result<()> {
        // exp(−200) underflows to 0 in f32: those probabilities must count as 0·log 0 = 0.
        let scores = Tensor::new(&[[[0f32, -200., -200., -200.]]], &Device::Cpu)?;
        let stats = stats_of(&scores)?;
        assert!(stats.entropy().abs() < 1e-6, "{}", stats.entropy());
        // σ² of (0, −200, −200, −200): mean −150, variance 3·50²/4 + 150²/4 = 7500.
        assert!((stats.sigma2() - 7500.0).abs() < 1e-2, "{}", stats.sigma2());
        Ok(())
    }

    /// Eq. 5 is exact to second order for small logits: Ent = log N − σ²/2 + O(σ³).
    #[test]
    fn small_gaussian_logits_follow_eq5() -> Result<()> {
        let scores = Tensor::randn(0f32, 0.1, (4, 16, 4096), &Device::Cpu)?;
        let stats = stats_of(&scores)?;
        let eq5 = 4096f64.ln() - stats.sigma2() / 2.0;
        assert!((stats.entropy() - eq5).abs() < 1e-3, "Ent {} vs Eq.5 {eq5}", stats.entropy());
        assert!((stats.sigma2() - 0.01).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn entropy_matches_the_definition() -> Result<()> {
        let scores = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 1.]]], &Device::Cpu)?;
        let stats = stats_of(&scores)?;
        let ent = |row: [f64; 3]| {
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            -row.iter().map(|x| x.exp() / z).map(|p| p * p.ln()).sum::<f64>()
        };
        let (a, b) = (ent([1., 2., 3.]), ent([0., 0., 1.]));
        assert!((stats.entropy() - (a + b) / 2.0).abs() < 1e-6);
        assert!((stats.std() - (a - b).abs() / 2.0).abs() < 1e-5);
        assert!((stats.sigma2() - (2.0 / 3.0 + 2.0 / 9.0) / 2.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn probe_records_only_its_steps() {
        let probe = EntropyProbe::new([3, 0, 3]);
        assert!(probe.at_step(1, 1).is_none());
        let armed = probe.at_step(3, 1).unwrap();
        assert_eq!(armed.batch_entry(), 1);
        armed.record("mid_block.attentions.0.transformer_blocks.0.attn1", 3, 4, RowStats::default());
        let samples = probe.into_samples();
        assert_eq!(samples.len(), 1);
        assert_eq!((samples[0].step, samples[0].level, samples[0].n_keys), (3, 3, 4));
    }

    #[test]
    fn fractions_map_to_steps_like_the_issue_says() {
        assert_eq!([0.0, 0.1, 0.5, 0.9, 1.0].map(|at| step_index(at, 50)), [0, 5, 25, 44, 49]);
        assert_eq!(step_index(0.5, 2), 1);
        assert_eq!(step_index(0.7, 1), 0);
    }

    #[test]
    fn report_lines_carry_the_training_size_reference() {
        let sample = |step, n_keys, entropy: f64| LayerSample {
            step,
            layer: "down_blocks.0.attentions.0.transformer_blocks.0.attn1".into(),
            level: 0,
            n_keys,
            stats: RowStats { rows: 1, entropy_sum: entropy, entropy_sq_sum: entropy * entropy, sigma2_sum: 0.5 },
        };
        let run = |width, mode, n, entropy| Run {
            width,
            height: width,
            mode,
            samples: vec![sample(0, n, entropy - 1.0), sample(1, n, entropy)],
        };
        let runs = [run(128, Mode::Default, 256, 5.0), run(256, Mode::Default, 1024, 6.0)];
        let lines = measurements(&runs, &[1.0], &[981.0, 1.0], |_| 256, (128, 128));
        assert_eq!(lines.len(), 2);
        let big = &lines[1];
        assert_eq!((big.width, big.n, big.t, big.step, big.timestep), (256, 1024, 256, 1, 1.0));
        assert!((big.normalized().unwrap() - 6.0 / 1024f64.ln()).abs() < 1e-12);
        assert!((big.train_normalized.unwrap() - 5.0 / 256f64.ln()).abs() < 1e-12);
        assert!((big.eq5() - (1024f64.ln() - 0.25)).abs() < 1e-12);
        let json: serde_json::Value = serde_json::from_str(&big.to_json()).unwrap();
        for key in ["width", "height", "mode", "layer", "level", "n", "t", "at", "entropy", "log_n", "normalized"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["mode"], "default");

        let mut table = Vec::new();
        write_table(&mut table, &lines, 2).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1  (level 0, T = 256)"), "{table}");
        assert!(table.contains("256x256"), "{table}");
    }
}
