//! `sdscale eval`: the paper's table from the images `gen` wrote. Reads the manifests, groups the
//! images by (size, mode), and computes per row
//!
//! - FID against a folder of reference images, exactly as pytorch-fid 0.3.0 (its Inception-v3 in
//!   models/inception.rs, the Fréchet distance in fid.rs);
//! - CLIP score of each image against its prompt, as torchmetrics' `CLIPScore` (clip_score.rs);
//! - GPU memory (largest `peak_device_mib`) and mean seconds per image from the manifests.
//!
//! Features are cached per image file (cache.rs), so a grown folder computes only its new images and
//! an interrupted run resumes. docs/eval.md says what each number matches and how to get the weights.

pub mod cache;
pub mod clip_score;
pub mod fid;
pub mod manifest;
pub mod resample;
pub mod table;

use crate::backend::Backends;
use crate::cli::EvalArgs;
use crate::error::bad_input;
use crate::models::inception::{FidInceptionV3, FEATURES};
use crate::output;
use anyhow::{bail, ensure, Context, Result};
use cache::FeatureCache;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clip_score::ClipScorer;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use manifest::Record;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use table::{Format, Row, Table};

/// What FID compares against, checked before any work.
struct FidInputs {
    inception: PathBuf,
    reference_images: Vec<PathBuf>,
}

/// Validated flags: everything a user can get wrong is refused here, before any model loads.
struct EvalRequest {
    records: Vec<Record>,
    fid: Option<FidInputs>,
    clip: Option<PathBuf>,
    cache_dir: PathBuf,
    device: Device,
    batch_size: usize,
    format: Format,
    output: Option<PathBuf>,
    overwrite: bool,
}

impl EvalRequest {
    fn try_from(args: EvalArgs) -> Result<Self> {
        ensure!(
            (1..=1024).contains(&args.batch_size),
            "--batch-size {} is out of range; use 1 to 1024",
            args.batch_size
        );
        let fid = match (args.inception, args.reference) {
            (Some(inception), Some(reference)) => {
                ensure!(
                    inception.is_file(),
                    "--inception {}: no such file (convert pytorch-fid's .pth with scripts/convert_inception.py)",
                    inception.display()
                );
                ensure!(reference.is_dir(), "--reference {}: not a folder", reference.display());
                let reference_images = list_images(&reference)?;
                ensure!(
                    reference_images.len() >= 2,
                    "--reference {}: FID needs at least 2 PNG images, found {}",
                    reference.display(),
                    reference_images.len()
                );
                Some(FidInputs { inception, reference_images })
            }
            (Some(_), None) => bail!("--inception needs --reference DIR, the images FID compares against"),
            (None, Some(_)) => {
                bail!("--reference needs --inception FILE.safetensors, the network FID is measured with")
            }
            (None, None) => None,
        };
        if let Some(clip) = &args.clip {
            ensure!(
                clip.join("config.json").is_file(),
                "--clip {}: no config.json there (pass the CLIP folder in Hugging Face layout)",
                clip.display()
            );
        }
        if let Some(output) = &args.output {
            output::check_output(output, args.overwrite)?;
        }
        let records = manifest::read_all(&args.manifest)?;
        if let Some(missing) = records.iter().find(|r| !r.path.is_file()) {
            bail!(
                "image {} listed in the manifests does not exist (unfinished shard? rerun it with --skip-existing)",
                missing.path.display()
            );
        }
        let cache_dir = match args.cache {
            Some(dir) => dir,
            None => args.manifest[0].parent().unwrap_or(Path::new("")).join(".sdscale-eval-cache"),
        };
        Ok(Self {
            records,
            fid,
            clip: args.clip,
            cache_dir,
            device: crate::cli::parse_device(&args.device)?,
            batch_size: args.batch_size,
            format: args.format,
            output: args.output,
            overwrite: args.overwrite,
        })
    }
}

/// Every PNG under `dir`, sorted; other image files are refused rather than silently left out.
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).with_context(|| format!("reading {}", folder.display()))? {
            let path = entry?.path();
            let extension = path.extension().map(|e| e.to_string_lossy().to_lowercase());
            match extension.as_deref() {
                _ if path.is_dir() => folders.push(path),
                Some("png") => found.push(path),
                Some("jpg" | "jpeg" | "webp" | "bmp" | "tif" | "tiff" | "ppm" | "pgm") => bail!(
                    "{}: sdscale eval reads PNG only; convert the reference images with PIL first (PIL decodes \
                     as pytorch-fid does), see docs/eval.md",
                    path.display()
                ),
                _ => {}
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn run(args: EvalArgs) -> Result<()> {
    let request = EvalRequest::try_from(args).map_err(bad_input)?;
    let mut notes = Vec::new();

    // Rows: (size, mode) → the indices of its records; when the run mixes samplers, each sampler is a
    // row of its own, named after the mode ("entropy · dpmpp_2m karras").
    let mixed_samplers = request.records.iter().any(|r| r.sampler != request.records[0].sampler);
    let mut groups: BTreeMap<(usize, usize, String), Vec<usize>> = BTreeMap::new();
    for (i, record) in request.records.iter().enumerate() {
        let row = match mixed_samplers {
            true => format!("{} · {}", record.mode, record.sampler),
            false => record.mode.clone(),
        };
        groups.entry((record.width, record.height, row)).or_default().push(i);
    }
    let mut rows: Vec<Row> = groups
        .iter()
        .map(|((width, height, mode), members)| {
            let records: Vec<&Record> = members.iter().map(|&i| &request.records[i]).collect();
            let seconds: Vec<f64> = records.iter().filter_map(|r| r.seconds).collect();
            Row {
                width: *width,
                height: *height,
                mode: mode.clone(),
                images: records.len(),
                fid: None,
                clip_score: None,
                gpu_mib: records.iter().filter_map(|r| r.peak_device_mib).reduce(f64::max),
                seconds_per_image: (!seconds.is_empty()).then(|| seconds.iter().sum::<f64>() / seconds.len() as f64),
            }
        })
        .collect();

    match &request.fid {
        Some(inputs) => {
            let fids = fid_per_row(&request, inputs, &groups)?;
            for (row, fid) in rows.iter_mut().zip(fids) {
                row.fid = fid;
            }
            notes.push(format!(
                "FID: pytorch-fid's Inception-v3 pool3 features, against {} reference images.",
                inputs.reference_images.len()
            ));
            if rows.iter().any(|r| r.images < 2) {
                notes.push("FID needs at least 2 images in a row: – where a row has 1.".into());
            }
        }
        None => notes.push("FID: skipped (pass --inception and --reference).".into()),
    }
    match &request.clip {
        Some(dir) => {
            let scores = clip_per_row(&request, dir, &groups)?;
            for (row, score) in rows.iter_mut().zip(scores) {
                row.clip_score = score;
            }
            notes.push(format!("CLIP score: torchmetrics' CLIPScore with {}.", dir.display()));
        }
        None => notes.push("CLIP score: skipped (pass --clip).".into()),
    }
    if rows.iter().all(|r| r.gpu_mib.is_none()) {
        notes.push("GPU MiB: – where the images were made on the CPU.".into());
    }

    table::sort(&mut rows);
    let text = Table { rows, notes }.render(request.format);
    match &request.output {
        Some(path) => {
            output::write_text(path, &text, request.overwrite)?;
            output::print_path(path)
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

// ---- features ----------------------------------------------------------------------------------

fn progress(total: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images, {elapsed} elapsed, ETA {eta}")
            .expect("a valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

fn read_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path).with_context(|| format!("reading image {}", path.display()))?.to_rgb8())
}

/// Features of `paths` from `cache`, computing the missing ones `batch_size` at a time (images of one
/// size per call) and storing each as soon as it exists.
fn cached_features(
    paths: &[PathBuf],
    cache: &mut FeatureCache,
    batch_size: usize,
    what: &str,
    mut compute: impl FnMut(&[RgbImage]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let keys = paths.iter().map(|p| cache::image_key(p)).collect::<Result<Vec<_>>>()?;
    let mut pending: Vec<usize> = (0..paths.len()).filter(|&i| cache.get(&keys[i]).is_none()).collect();
    pending.dedup_by_key(|&mut i| keys[i].clone());
    let bar = progress(pending.len(), what);
    let mut at = 0;
    while at < pending.len() {
        let first = read_rgb(&paths[pending[at]])?;
        let mut batch = vec![(pending[at], first)];
        while batch.len() < batch_size && at + batch.len() < pending.len() {
            let index = pending[at + batch.len()];
            let image = read_rgb(&paths[index])?;
            if image.dimensions() != batch[0].1.dimensions() {
                break;
            }
            batch.push((index, image));
        }
        let images: Vec<RgbImage> = batch.iter().map(|(_, image)| image.clone()).collect();
        let features = compute(&images).with_context(|| format!("{what} of {}", paths[batch[0].0].display()))?;
        for ((index, _), values) in batch.iter().zip(features) {
            if cache.get(&keys[*index]).is_none() {
                cache.insert(keys[*index].clone(), values)?;
            }
        }
        at += batch.len();
        bar.set_position(at as u64);
    }
    bar.finish_and_clear();
    eprintln!("sdscale: {what}: {} computed, {} from the cache", pending.len(), paths.len() - pending.len());
    Ok(keys.iter().map(|k| cache.get(k).expect("every key computed").to_vec()).collect())
}

fn open_cache(request: &EvalRequest, model: &str, weights: &Path) -> Result<FeatureCache> {
    let name = format!("{model}-{}.features", cache::fingerprint(weights)?);
    FeatureCache::open(&request.cache_dir.join(name))
}

/// Loads pytorch-fid's Inception-v3 from a safetensors file in convert_inception.py's layout.
pub fn load_inception(path: &Path, device: &Device) -> Result<FidInceptionV3> {
    let backends = Backends::choose(device, DType::F32).map_err(anyhow::Error::msg)?;
    // SAFETY: the file is memory-mapped read-only; sdscale does not modify it while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
        .with_context(|| format!("loading {}", path.display()))?;
    FidInceptionV3::new(vb, backends.conv).with_context(|| {
        format!("{}: not pytorch-fid's Inception-v3 (make it with scripts/convert_inception.py)", path.display())
    })
}

/// pool3 features of a batch of same-size images: pixels / 255 as torchvision's ToTensor.
pub fn inception_features(model: &FidInceptionV3, images: &[RgbImage], device: &Device) -> Result<Vec<Vec<f32>>> {
    let (w, h) = images[0].dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut values = Vec::with_capacity(images.len() * 3 * h * w);
    for image in images {
        for c in 0..3 {
            values.extend(image.pixels().map(|p| p[c] as f32 / 255.0));
        }
    }
    let xs = Tensor::from_vec(values, (images.len(), 3, h, w), device)?;
    let features: Vec<Vec<f32>> = model.forward(&xs)?.to_vec2()?;
    ensure!(features.iter().all(|f| f.len() == FEATURES), "Inception gave features of the wrong length");
    Ok(features)
}

fn fid_per_row(
    request: &EvalRequest,
    inputs: &FidInputs,
    groups: &BTreeMap<(usize, usize, String), Vec<usize>>,
) -> Result<Vec<Option<f64>>> {
    let model = load_inception(&inputs.inception, &request.device).map_err(bad_input)?;
    let mut cache = open_cache(request, "inception", &inputs.inception)?;
    let compute = |images: &[RgbImage]| inception_features(&model, images, &request.device);
    let reference =
        cached_features(&inputs.reference_images, &mut cache, request.batch_size, "FID features (reference)", compute)?;
    let generated_paths: Vec<PathBuf> = request.records.iter().map(|r| r.path.clone()).collect();
    let compute = |images: &[RgbImage]| inception_features(&model, images, &request.device);
    let generated =
        cached_features(&generated_paths, &mut cache, request.batch_size, "FID features (generated)", compute)?;

    let reference_stats = fid::Statistics::of(&reference.iter().map(Vec::as_slice).collect::<Vec<_>>(), FEATURES)?;
    groups
        .values()
        .map(|members| {
            if members.len() < 2 {
                return Ok(None);
            }
            let features: Vec<&[f32]> = members.iter().map(|&i| generated[i].as_slice()).collect();
            let stats = fid::Statistics::of(&features, FEATURES)?;
            fid::frechet_distance(&stats, &reference_stats).map(Some)
        })
        .collect()
}

fn clip_per_row(
    request: &EvalRequest,
    dir: &Path,
    groups: &BTreeMap<(usize, usize, String), Vec<usize>>,
) -> Result<Vec<Option<f64>>> {
    let scorer = ClipScorer::load(dir, &request.device).map_err(bad_input)?;
    let mut cache = open_cache(request, "clip", &dir.join("model.safetensors"))?;
    let paths: Vec<PathBuf> = request.records.iter().map(|r| r.path.clone()).collect();
    let image_features = cached_features(&paths, &mut cache, request.batch_size, "CLIP image features", |images| {
        scorer.image_features(images)
    })?;
    let mut per_image = Vec::with_capacity(paths.len());
    for (record, image) in request.records.iter().zip(&image_features) {
        let key = cache::text_key(&record.prompt);
        let text = match cache.get(&key) {
            Some(text) => text.to_vec(),
            None => {
                let text = scorer.text_features(&record.prompt)?;
                cache.insert(key, text.clone())?;
                text
            }
        };
        per_image.push(clip_score::scaled_cosine(image, &text));
    }
    Ok(groups
        .values()
        .map(|members| clip_score::clip_score(&members.iter().map(|&i| per_image[i]).collect::<Vec<_>>()))
        .collect())
}
