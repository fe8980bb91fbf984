//! What each subcommand does, between the parsed command line and the pipeline: resolve the request,
//! plan every output before any work, load the model once, generate (in batches), write, report.

use crate::cli::ModelRequest;
use crate::cli::{
    Cli, Command, CompareArgs, CompareRequest, EntropyArgs, EntropyRequest, GenArgs, GenRequest, InfoArgs, Shell,
};
use crate::device_memory::DeviceMemoryMeter;
use crate::entropy::{self, EntropyProbe, Run};
use crate::error::{bad_input, BadInput};
use crate::grid::{self, Layout};
use crate::hires::Structure;
use crate::manifest::{ImageRecord, Manifest};
use crate::metadata::{self, GridCell, GridMetadata, ImageMetadata, TOOL, VERSION};
use crate::mode::{Denoiser, Mode};
use crate::output::{self, Fields};
use crate::pipeline::{self, Event, GenerateRequest, Interrupted, Pipeline};
use crate::plan::{self, ImageSpec, ModelDefaults, PlannedImage};
use crate::sampler::{SamplerSpec, SchedulerConfig};
use crate::size::{PixelSize, TrainingSize};
use crate::weights::{ModelFiles, ModelSource};
use anyhow::{anyhow, Context, Result};
use candle_core::DeviceLocation;
use image::RgbImage;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// 2 for bad input, 1 for everything else (see `cli::EXIT_CODES`).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<BadInput>()) {
        2
    } else {
        1
    }
}

/// Why a model did not load: its files (configs, missing or mis-shaped tensors, truncated data) are
/// bad input, exit 2; the machine failing — reading a file, allocating device memory — is not, exit 1.
fn load_failure(err: anyhow::Error) -> anyhow::Error {
    if is_machine_failure(&err) {
        err
    } else {
        bad_input(err)
    }
}

/// An I/O error other than data that is too short or malformed, or a device (CUDA, Metal) error such
/// as running out of GPU memory, anywhere in the chain (candle wraps its own errors several deep).
fn is_machine_failure(err: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    let io_failure = |e: &std::io::Error| !matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData);
    fn candle_failure(e: &candle_core::Error, io_failure: &dyn Fn(&std::io::Error) -> bool) -> bool {
        use candle_core::Error;
        match e {
            Error::Io(io) => io_failure(io),
            Error::Cuda(_) | Error::Metal(_) => true,
            Error::Context { inner, .. } | Error::WithPath { inner, .. } | Error::WithBacktrace { inner, .. } => {
                candle_failure(inner, io_failure)
            }
            _ => false,
        }
    }
    err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(io_failure)
            || cause.downcast_ref::<candle_core::Error>().is_some_and(|e| candle_failure(e, &io_failure))
    })
}

pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Gen(args) => gen(args),
        Command::Compare(args) => compare(args),
        Command::Entropy(args) => entropy(args),
        Command::Info(args) => info(args),
        Command::Eval(args) => crate::eval::run(args),
        Command::Completions { shell } => completions(shell),
    }
}

// ---- Ctrl-C -------------------------------------------------------------------------------------

/// Set by the first SIGINT/SIGTERM: the run stops at the next step boundary, writes nothing
/// half-made, and exits 1 with a summary.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_stop_handler() {
    let result = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            // A second signal: quit now, but still leave no temporary file behind.
            output::remove_current_temp();
            std::process::exit(130);
        }
        eprintln!("\nsdscale: stopping after the current step (press Ctrl-C again to quit at once)");
    });
    if let Err(err) = result {
        eprintln!("sdscale: warning: cannot handle Ctrl-C ({err}); an interrupted run may leave a temporary file");
    }
}

// ---- the model ----------------------------------------------------------------------------------

/// A loaded model plus what its metadata needs.
struct Model {
    pipeline: Pipeline,
    /// The size the entropy scale's T and resize's pixel count come from (`--train-size` or the configs).
    training: TrainingSize,
    name: String,
    revision: Option<String>,
    dtype: String,
    device: String,
    /// `--vae` as given.
    vae: Option<String>,
}

/// Finds the model's files and reads its training size: cheap, so outputs can be checked before the
/// (slow) load.
fn resolve_model(model: &ModelRequest) -> Result<(ModelFiles, TrainingSize)> {
    let mut files = ModelFiles::resolve(&model.source, model.dtype).map_err(bad_input)?;
    if let Some(vae) = &model.vae {
        files = files.with_vae(vae, model.dtype).map_err(bad_input)?;
    }
    for note in &files.notes {
        eprintln!("sdscale: {note}");
    }
    let training = pipeline::training_size_of(&files).map_err(bad_input)?;
    Ok((files, training))
}

/// What an image takes from the model when its settings leave it open: its training size and its
/// family's guidance (7.5 for Stable Diffusion, 1 for LDM-256).
fn model_defaults(files: &ModelFiles, training: TrainingSize) -> Result<ModelDefaults> {
    let scheduler = SchedulerConfig::load(&files.scheduler_config).map_err(bad_input)?;
    Ok(ModelDefaults { size: training.pixels, rules: files.family.rules(), scheduler })
}

/// A negative prompt for a family without one (LDM's unconditional text is always "") is refused
/// before any work.
fn check_negative_prompts<'a>(files: &ModelFiles, mut negatives: impl Iterator<Item = Option<&'a str>>) -> Result<()> {
    if !files.family.rules().negative_prompt && negatives.any(|negative| negative.is_some_and(|n| !n.is_empty())) {
        return Err(bad_input(anyhow!(
            "--negative-prompt: {} models have no negative prompt (the unconditional text is always empty); \
             drop it",
            files.family.class_name()
        )));
    }
    Ok(())
}

fn load_model(request: &ModelRequest, files: &ModelFiles, training: TrainingSize) -> Result<Model> {
    let started = Instant::now();
    let pipeline = Pipeline::load(files, &request.device, request.dtype)
        .map_err(|err| match &files.config_hint {
            // Built-in configs that do not fit the file: say which flag picks the right ones.
            Some(hint) if !is_machine_failure(&err) => err.context(hint.clone()),
            _ => err,
        })
        .map_err(load_failure)?;
    eprintln!("sdscale: loaded {} in {:.2?}", request.source.display_name(), started.elapsed());
    let revision = match &request.source {
        ModelSource::Dir(_) | ModelSource::File { .. } => None,
        // The hub cache keeps files under snapshots/<commit>/: the exact revision that was used.
        ModelSource::Hub { revision, .. } => snapshot_commit(&files.unet_config).or_else(|| revision.clone()),
    };
    let device = match request.device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    Ok(Model {
        pipeline,
        training: scale_training(request, training),
        name: request.name.clone(),
        revision,
        dtype: request.dtype.as_str().to_string(),
        device,
        vae: request.vae.as_ref().map(|vae| vae.display().to_string()),
    })
}

/// The training size the modes plan against: `--train-size` (fine-tunes) over the model's own.
fn scale_training(request: &ModelRequest, model: TrainingSize) -> TrainingSize {
    match request.train_size {
        Some((width, height)) => model.with_pixels(PixelSize::new(width, height)),
        None => model,
    }
}

fn snapshot_commit(path: &Path) -> Option<String> {
    let parts: Vec<_> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let at = parts.iter().position(|p| p == "snapshots")?;
    parts.get(at + 1).cloned()
}

// ---- planning -----------------------------------------------------------------------------------

/// The metadata written into an image's PNG.
fn image_metadata(planned: &PlannedImage, model: &Model, eta: f64) -> ImageMetadata {
    ImageMetadata {
        tool: TOOL.into(),
        version: VERSION.into(),
        prompt: planned.spec.prompt.clone(),
        negative_prompt: planned.spec.negative_prompt.clone().unwrap_or_default(),
        no_negative_prompt: planned.spec.negative_prompt.is_none() && model.pipeline.force_zeros_for_empty_prompt(),
        seed: planned.spec.seed,
        width: planned.size.width,
        height: planned.size.height,
        steps: planned.spec.steps,
        guidance: planned.guidance,
        mode: planned.spec.mode,
        sampler: planned.sampler.kind.a1111_name().into(),
        sampler_settings: Some(planned.sampler),
        model: model.name.clone(),
        revision: model.revision.clone(),
        dtype: model.dtype.clone(),
        device: model.device.clone(),
        train_size: (model.training.pixels.width, model.training.pixels.height),
        render_size: planned.render.resize_to.map(|_| (planned.render.render.width, planned.render.render.height)),
        md_views: match planned.render.denoiser {
            Denoiser::Views(views) => Some(views.rule),
            Denoiser::Whole => None,
        },
        circular: matches!(planned.render.denoiser, Denoiser::Views(views) if views.circular),
        deepshrink: match planned.render.structure {
            Structure::DeepShrink(method) => Some(method.describe()),
            _ => None,
        },
        hidiffusion_ratios: match planned.render.structure {
            Structure::HiDiffusion(method) => method.ratios.map(|(t1, t2)| format!("{t1}:{t2}")),
            _ => None,
        },
        hidiffusion_no_window: matches!(planned.render.structure, Structure::HiDiffusion(method) if method.no_window),
        seconds: None,
        peak_device_mib: None,
        family: Some(model.pipeline.family_name().to_string()),
        eta,
        vae: model.vae.clone(),
        vae_tiling: planned.spec.vae_tiling,
    }
}

/// Once the model is loaded: the images to decode in tiles although `--vae-tiling` did not ask, those
/// whose whole decode would need more memory than the device has free now (said once, on stderr).
fn tile_where_needed(model: &Model, device: &candle_core::Device, plan: &mut [PlannedImage]) {
    let Some(available) = crate::device_memory::available_bytes(device) else { return };
    let mut said = false;
    for planned in plan.iter_mut().filter(|planned| !planned.spec.vae_tiling) {
        let size = planned.render.render;
        let Some(needed) = model.pipeline.untiled_decode_bytes(size) else { continue };
        if needed > available {
            planned.spec.vae_tiling = true;
            if !said {
                eprintln!(
                    "sdscale: decoding {size} in tiles, as diffusers' vae.enable_tiling(): \
                     the whole decode would need about {}, {} is available (--vae-tiling tiles every image)",
                    human_bytes(needed),
                    human_bytes(available)
                );
                said = true;
            }
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

/// Refuses, before any work, what no image of the plan can be: a size its mode cannot render, two
/// images with one name.
fn check_plan(plan: &[PlannedImage], files: &ModelFiles) -> Result<()> {
    for planned in plan {
        planned.render.check().map_err(bad_input)?;
    }
    if plan.iter().any(|p| matches!(p.render.structure, Structure::HiDiffusion(_))) {
        let unet = files.family.unet_config(&files.unet_config).map_err(bad_input)?;
        crate::hires::hidiffusion::check_unet(&unet).map_err(|e| bad_input(anyhow!(e)))?;
    }
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    for planned in plan {
        if let Some(other) = seen.insert(output::same_file_key(&planned.path), planned.index) {
            return Err(bad_input(anyhow!(
                "images {other} and {} would both be written to {}; put {{index}} or {{seed}} in -o",
                planned.index,
                planned.path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses files that exist (unless `overwrite`; with `skip_existing` they are dropped from the
/// plan).
fn keep_writable(plan: Vec<PlannedImage>, overwrite: bool, skip_existing: bool) -> Result<Vec<PlannedImage>> {
    let mut kept = Vec::with_capacity(plan.len());
    let mut skipped = 0;
    for planned in plan {
        if skip_existing && planned.path.is_file() {
            skipped += 1;
            continue;
        }
        output::check_output(&planned.path, overwrite).map_err(bad_input)?;
        kept.push(planned);
    }
    if skipped > 0 {
        eprintln!("sdscale: skipping {skipped} image(s) whose file exists (--skip-existing)");
    }
    Ok(kept)
}

// ---- rendering ----------------------------------------------------------------------------------

/// What happened to a run's images.
#[derive(Default)]
struct Outcome {
    written: usize,
    failed: Vec<(PathBuf, anyhow::Error)>,
    interrupted: bool,
}

impl Outcome {
    /// Ok when every image was written; otherwise the summary that exits with 1.
    fn into_result(self, planned: usize) -> Result<()> {
        for (path, err) in &self.failed {
            eprintln!("sdscale: failed: {}: {err:#}", path.display());
        }
        if self.interrupted {
            return Err(anyhow!(
                "interrupted: wrote {} of {planned} images; no partial file was left (rerun with --skip-existing to resume)",
                self.written
            ));
        }
        if !self.failed.is_empty() {
            return Err(anyhow!("{} of {planned} images failed (listed above)", self.failed.len()));
        }
        Ok(())
    }
}

/// What one image cost to make.
#[derive(Debug, Clone, Copy)]
struct ImageCost {
    /// Its batch's wall-clock seconds (text encoding to decoded pixels) over the batch's images.
    seconds: f64,
    /// Peak device memory while its batch ran (CUDA only).
    peak_device_mib: Option<f64>,
}

/// Renders the plan in batches of images that can share UNet calls, handing each finished image
/// (at its final size) to `finish` with what it cost. Stops between steps on Ctrl-C.
fn render(
    model: &Model,
    plan: &[PlannedImage],
    batch_size: usize,
    view_batch: usize,
    eta: f64,
    meter: &DeviceMemoryMeter,
    mut finish: impl FnMut(&PlannedImage, RgbImage, ImageCost) -> Result<()>,
) -> Outcome {
    let batches = plan::batches(plan, batch_size);
    let progress = Progress::new(plan.len());
    // One session for the whole run: on CUDA its captured UNet graph serves every same-shaped batch.
    let mut session = model.pipeline.session().with_view_batch(view_batch).with_eta(eta);
    let mut outcome = Outcome::default();
    for batch in &batches {
        if STOP.load(Ordering::SeqCst) {
            outcome.interrupted = true;
            break;
        }
        let requests: Vec<GenerateRequest> = batch.iter().map(|p| p.generate_request()).collect();
        progress.start_batch(batch, requests[0].steps);
        meter.reset();
        let started = Instant::now();
        let result = session.generate_batch(&requests, &mut |event| progress.event(event), &STOP);
        let images = match result {
            Ok(images) => images,
            Err(err) if err.is::<Interrupted>() => {
                outcome.interrupted = true;
                break;
            }
            Err(err) => {
                let message = format!("{err:#}");
                outcome.failed.extend(batch.iter().map(|p| (p.path.clone(), anyhow!("{message}"))));
                continue;
            }
        };
        let seconds = started.elapsed().as_secs_f64() / batch.len() as f64;
        let cost = ImageCost { seconds: (seconds * 1000.0).round() / 1000.0, peak_device_mib: meter.peak_mib() };
        for (planned, image) in batch.iter().zip(images) {
            // Suspending the bars keeps stdout's lines whole when both streams share a terminal.
            match progress.suspend(|| finish(planned, image, cost)) {
                Ok(()) => outcome.written += 1,
                Err(err) if is_broken_pipe(&err) => {
                    // Whoever read stdout is gone: stop quietly, everything written so far is whole.
                    outcome.interrupted = true;
                    progress.finish();
                    return outcome;
                }
                Err(err) => outcome.failed.push((planned.path.clone(), err)),
            }
            progress.image_done();
        }
    }
    progress.finish();
    outcome
}

/// Progress on stderr: indicatif bars (the run's images, the current batch's steps) on a terminal,
/// plain lines otherwise so logs stay readable.
struct Progress {
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    total: usize,
    label: std::cell::RefCell<String>,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let images = multi.add(ProgressBar::new(total as u64));
            images.set_style(
                ProgressStyle::with_template("images {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
            );
            let steps = multi.add(ProgressBar::new(1));
            steps.set_style(ProgressStyle::with_template("{msg} {bar:30} step {pos}/{len}").expect("valid template"));
            (multi, images, steps)
        });
        Progress { bars, total, label: std::cell::RefCell::new(String::new()) }
    }

    fn start_batch(&self, batch: &[&PlannedImage], steps: usize) {
        let first = batch[0];
        // Numbered from 1 as people count; a batch's images need not be neighbours in the plan.
        let numbers: Vec<String> = batch.iter().map(|p| (p.index + 1).to_string()).collect();
        let label = match numbers.len() {
            1 => format!("image {} of {}", numbers[0], self.total),
            n if n <= 6 => format!("images {} of {}", numbers.join(", "), self.total),
            n => format!("images {}, …, {} of {} ({n} at once)", numbers[0], numbers[n - 1], self.total),
        };
        let detail = format!("{label}: {}, {steps} steps, {}", first.render.render, first.spec.mode.as_str());
        match &self.bars {
            Some((_, _, bar)) => {
                bar.reset();
                bar.set_length(steps as u64);
                bar.set_message(detail);
            }
            None => eprintln!("sdscale: {detail}"),
        }
        *self.label.borrow_mut() = label;
    }

    fn event(&self, event: Event) {
        match (&self.bars, event) {
            (Some((multi, _, _)), Event::Warning(message)) => {
                let _ = multi.println(format!("sdscale: warning: {message}"));
            }
            (None, Event::Warning(message)) => eprintln!("sdscale: warning: {message}"),
            (Some((_, _, bar)), Event::Step { index, .. }) => bar.set_position(index as u64 + 1),
            (None, Event::Step { index, total, timestep }) => {
                eprintln!("sdscale: {}: step {}/{total} (t={timestep})", self.label.borrow(), index + 1)
            }
            (Some(_), Event::Stage(..)) => {}
            (None, Event::Stage(name, elapsed)) => eprintln!("sdscale: {name}: {elapsed:.2?}"),
        }
    }

    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bars {
            Some((multi, _, _)) => multi.suspend(f),
            None => f(),
        }
    }

    fn image_done(&self) {
        if let Some((_, images, _)) = &self.bars {
            images.inc(1);
        }
    }

    fn finish(&self) {
        if let Some((_, images, steps)) = &self.bars {
            steps.finish_and_clear();
            images.finish();
        }
    }
}

// ---- gen ----------------------------------------------------------------------------------------

fn gen(args: GenArgs) -> Result<()> {
    let request = GenRequest::try_from(args).map_err(bad_input)?;
    if let Some(seed) = request.random_seed {
        eprintln!("sdscale: seed {seed} (pass --seed {seed} to reproduce)");
    }
    let (files, training) = resolve_model(&request.model)?;
    check_negative_prompts(&files, request.images.iter().map(|spec| spec.negative_prompt.as_deref()))?;
    let plan = plan::plan(
        request.images.iter().cloned(),
        &model_defaults(&files, training)?,
        scale_training(&request.model, training),
        request.mode_options,
        |index, spec, size| {
            request.output.render(&Fields {
                index,
                seed: spec.seed,
                mode: spec.mode.as_str(),
                width: size.width,
                height: size.height,
                prompt: &spec.prompt,
                prompt_index: spec.prompt_index,
                image: spec.image_index,
                sampler: spec.sampler.kind.map_or("model", |kind| kind.as_str()),
            })
        },
    )
    .map_err(bad_input)?;
    // The whole run is checked in every shard, so all shards refuse the same mistakes.
    check_plan(&plan, &files)?;
    let plan = match &request.shard {
        None => plan,
        Some((shard, how)) => {
            let costs: Vec<f64> = plan.iter().map(PlannedImage::cost).collect();
            let total = plan.len();
            let mine: Vec<PlannedImage> =
                plan.into_iter().zip(shard.select(&costs)).filter(|(_, mine)| *mine).map(|(p, _)| p).collect();
            eprintln!(
                "sdscale: shard {} of {} ({how}): {} of the run's {total} images",
                shard.index,
                shard.count,
                mine.len()
            );
            mine
        }
    };
    let total = plan.len();
    output::check_disk_space(
        plan.iter().filter(|p| !request.skip_existing || !p.path.is_file()).map(plan::planned_png),
    )
    .map_err(bad_input)?;
    let plan = keep_writable(plan, request.overwrite, request.skip_existing)?;
    if plan.is_empty() {
        eprintln!("sdscale: nothing to do: all {total} images exist");
        return Ok(());
    }
    let mut manifest = request.manifest.as_deref().map(Manifest::open).transpose().map_err(bad_input)?;

    let meter = DeviceMemoryMeter::start(&request.model.device);
    let model = load_model(&request.model, &files, training)?;
    let mut plan = plan;
    tile_where_needed(&model, &request.model.device, &mut plan);
    install_stop_handler();
    let outcome = render(
        &model,
        &plan,
        request.model.batch_size,
        request.view_batch,
        request.eta,
        &meter,
        |planned, image, cost| {
            let record = ImageRecord {
                path: planned.path.clone(),
                prompt: planned.spec.prompt.clone(),
                negative_prompt: planned.spec.negative_prompt.clone().unwrap_or_default(),
                seed: planned.spec.seed,
                width: planned.size.width,
                height: planned.size.height,
                steps: planned.spec.steps,
                guidance: planned.guidance,
                mode: planned.spec.mode,
                sampler: planned.sampler.kind,
                schedule: planned.sampler.schedule,
                timestep_spacing: planned.sampler.spacing,
                model: model.name.clone(),
                seconds: cost.seconds,
                peak_device_mib: cost.peak_device_mib,
                prompt_index: planned.spec.prompt_index,
                image_index: planned.spec.image_index,
            };
            let mut metadata = image_metadata(planned, &model, request.eta);
            match &mut manifest {
                // Recorded first: a kill before the PNG is published leaves a record without a file,
                // which readers skip and --skip-existing remakes, never a file without a record.
                Some(manifest) => manifest.append(&record)?,
                None => {
                    metadata.seconds = Some(cost.seconds);
                    metadata.peak_device_mib = cost.peak_device_mib;
                }
            }
            output::write_png(&planned.path, &image, &metadata.text_chunks(), request.overwrite)?;
            if request.json {
                print_line(&serde_json::to_string(&record).expect("plain data"))
            } else {
                output::print_path(&planned.path)
            }
        },
    );
    outcome.into_result(plan.len())
}

fn print_line(line: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

// ---- compare ------------------------------------------------------------------------------------

fn compare(args: CompareArgs) -> Result<()> {
    let multidiffusion = args.multidiffusion.clone();
    let hires = args.hires.clone();
    let sampler = args.sampler.clone();
    let request = CompareRequest::try_from(args).map_err(bad_input)?;
    let options = multidiffusion.options(&request.modes).map_err(bad_input)?;
    let options = hires.options(&request.modes, options).map_err(bad_input)?;
    let sampler_choice = sampler.choice.choice().map_err(bad_input)?;
    let eta = sampler.eta(&request.modes, &[sampler_choice], None).map_err(bad_input)?;
    let view_batch = multidiffusion.view_batch;
    if let Some(seed) = request.random_seed {
        eprintln!("sdscale: seeds {seed}, {}, {} (pass --seeds to choose)", seed + 1, seed + 2);
    }
    let (files, training) = resolve_model(&request.model)?;
    check_negative_prompts(&files, std::iter::once(request.negative_prompt.as_deref()))?;
    let width = request.width.unwrap_or(training.pixels.width);
    let height = request.height.unwrap_or(training.pixels.height);
    let guidance = request.guidance.unwrap_or(files.family.rules().default_guidance);

    let grid_path = request.output.clone().unwrap_or_else(|| {
        PathBuf::from(format!("{}-{width}x{height}-compare.png", output::slug(&request.prompt, output::SLUG_LEN)))
    });
    let stem = grid_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let folder = grid_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let html_path = folder.join(format!("{stem}.html"));

    // Row by row (seed), column by column (mode): {index} order is the grid's reading order.
    let (prompt, negative_prompt) = (&request.prompt, &request.negative_prompt);
    let specs = request.seeds.iter().enumerate().flat_map(|(row, &seed)| {
        request.modes.iter().map(move |&mode| ImageSpec {
            prompt: prompt.clone(),
            negative_prompt: negative_prompt.clone(),
            seed,
            prompt_index: 0,
            image_index: row,
            width: Some(width),
            height: Some(height),
            steps: request.steps,
            guidance: Some(guidance),
            mode,
            sampler: sampler_choice,
            vae_tiling: request.vae_tiling,
        })
    });
    let defaults = model_defaults(&files, training)?;
    let plan = plan::plan(specs, &defaults, scale_training(&request.model, training), options, |_, spec, _| {
        folder.join(format!("{stem}.{}.seed{}.png", spec.mode.as_str(), spec.seed))
    })
    .map_err(bad_input)?;
    let sampler_spec: Option<SamplerSpec> = plan.first().map(|planned| planned.sampler);
    check_plan(&plan, &files)?;
    let grid_bytes = output::grid_png_bound(request.modes.len(), request.seeds.len(), width, height, &request.prompt);
    output::check_disk_space(plan.iter().map(plan::planned_png).chain([(grid_path.clone(), grid_bytes)]))
        .map_err(bad_input)?;
    let plan = keep_writable(plan, request.overwrite, false)?;
    output::check_output(&grid_path, request.overwrite).map_err(bad_input)?;
    if request.html {
        output::check_output(&html_path, request.overwrite).map_err(bad_input)?;
    }

    let meter = DeviceMemoryMeter::start(&request.model.device);
    let model = load_model(&request.model, &files, training)?;
    let mut plan = plan;
    tile_where_needed(&model, &request.model.device, &mut plan);
    install_stop_handler();
    let mut images: HashMap<usize, RgbImage> = HashMap::new();
    let outcome = render(&model, &plan, request.model.batch_size, view_batch, eta, &meter, |planned, image, _| {
        output::write_png(
            &planned.path,
            &image,
            &image_metadata(planned, &model, eta).text_chunks(),
            request.overwrite,
        )?;
        output::print_path(&planned.path)?;
        images.insert(planned.index, image);
        Ok(())
    });
    outcome.into_result(plan.len())?;

    let column_labels: Vec<String> = request.modes.iter().map(|m| m.as_str().to_string()).collect();
    let row_labels: Vec<String> = request.seeds.iter().map(|s| format!("seed {s}")).collect();
    let layout = Layout::new(width as u32, height as u32, &column_labels, &row_labels);
    let mut cells = Vec::new();
    let mut grid_cells = Vec::new();
    for (row, &seed) in request.seeds.iter().enumerate() {
        let mut row_images = Vec::new();
        for (column, &mode) in request.modes.iter().enumerate() {
            let planned = &plan[row * request.modes.len() + column];
            row_images.push(images.remove(&planned.index).context("an image is missing from the grid")?);
            let (x, y) = layout.cell(row, column);
            let file = planned.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            grid_cells.push(GridCell { mode, seed, x, y, file });
        }
        cells.push(row_images);
    }
    let grid_image = grid::draw(&layout, &column_labels, &row_labels, &cells);
    let metadata = GridMetadata {
        tool: TOOL.into(),
        version: VERSION.into(),
        kind: "compare".into(),
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone().unwrap_or_default(),
        width,
        height,
        steps: request.steps,
        guidance,
        model: model.name.clone(),
        revision: model.revision.clone(),
        dtype: model.dtype.clone(),
        device: model.device.clone(),
        seeds: request.seeds.clone(),
        modes: request.modes.clone(),
        cells: grid_cells,
        sampler: sampler_spec.map_or("DDIM".into(), |spec| spec.kind.a1111_name().to_string()),
        sampler_settings: sampler_spec,
    };
    output::write_png(&grid_path, &grid_image, &metadata.text_chunks(), request.overwrite)?;
    output::print_path(&grid_path)?;
    if request.html {
        let render_sizes: Vec<(String, (usize, usize))> = plan
            .iter()
            .filter(|p| p.render.resize_to.is_some())
            .map(|p| (p.spec.mode.as_str().to_string(), (p.render.render.width, p.render.render.height)))
            .take(1)
            .collect();
        let grid_name = grid_path.file_name().unwrap_or_default().to_string_lossy();
        let page = crate::html::compare_page(&metadata, &grid_name, &render_sizes);
        output::write_text(&html_path, &page, request.overwrite)?;
        output::print_path(&html_path)?;
    }
    Ok(())
}

// ---- entropy -----------------------------------------------------------------------------------

/// `sdscale entropy`: every size (plus the training size, the reference) in both modes, the probe
/// recording at the requested points; then the table or JSON Lines on stdout, and the plot.
fn entropy(args: EntropyArgs) -> Result<()> {
    let request = EntropyRequest::try_from(args).map_err(bad_input)?;
    if request.seed_is_random {
        eprintln!("sdscale: seed {} (pass --seed {} to reproduce these numbers)", request.seed, request.seed);
    }
    if let Some(plot) = &request.plot {
        output::check_output(plot, request.overwrite).map_err(bad_input)?;
    }

    let (files, training) = resolve_model(&request.model)?;
    check_negative_prompts(&files, std::iter::once(request.negative_prompt.as_deref()))?;
    let guidance = request.guidance.unwrap_or(files.family.rules().default_guidance);
    let model = load_model(&request.model, &files, training)?;
    let (pipeline, training) = (&model.pipeline, model.training);
    let train_size = (training.pixels.width, training.pixels.height);
    let mut sizes = request.sizes.clone();
    if !sizes.contains(&train_size) {
        sizes.push(train_size);
    }
    sizes.sort_by_key(|&(width, height)| (width * height, width));
    // The probe counts UNet calls (Heun makes 2N−1, PNDM N+1): fractions fall on the sampler's calls.
    let sampler = pipeline.scheduler_config().resolve(&request.sampler).map_err(bad_input)?;
    let timesteps = pipeline.scheduler_config().build(&sampler, request.steps, 0.0)?.timesteps().to_vec();
    let steps: Vec<usize> = request.at.iter().map(|&at| entropy::step_index(at, timesteps.len())).collect();

    let mut runs: Vec<Run> = Vec::new();
    for &(width, height) in &sizes {
        for mode in [Mode::Default, Mode::Entropy] {
            // At the training size N = T in every layer, so the entropy scale is 1/√d bit for bit
            // (attention.rs): the two modes are one computation there, run once.
            if mode == Mode::Entropy && (width, height) == train_size {
                let default = runs.last().expect("the default run comes first").clone();
                runs.push(Run { mode, ..default });
                continue;
            }
            let generate = GenerateRequest {
                prompt: request.prompt.clone(),
                negative_prompt: request.negative_prompt.clone(),
                plan: mode.plan(PixelSize::new(width, height), training, Default::default()),
                steps: request.steps,
                sampler,
                guidance_scale: guidance,
                seed: request.seed,
                vae_tiling: false,
            };
            eprintln!("sdscale: measuring {width}x{height}, mode {}", mode.as_str());
            let started = Instant::now();
            let probe = EntropyProbe::new(steps.iter().copied());
            pipeline.denoise(&generate, &mut plain_progress(), Some(&probe))?;
            eprintln!("sdscale: {width}x{height}, mode {} in {:.2?}", mode.as_str(), started.elapsed());
            runs.push(Run { width, height, mode, samples: probe.into_samples() });
        }
    }

    let train_latent = training.latent();
    let lines =
        entropy::measurements(&runs, &request.at, &timesteps, |level| train_latent.tokens_at_level(level), train_size);

    // The plot first: a reader closing stdout early (`| head`) should not cost the picture.
    if let Some(path) = &request.plot {
        let title = format!(
            "{} \"{}\", seed {}, {} steps, guidance {}, training size {}x{}",
            request.model.source.display_name(),
            request.prompt,
            request.seed,
            request.steps,
            guidance,
            train_size.0,
            train_size.1
        );
        let image = entropy::plot(&lines, &title)?;
        output::write_png(path, &image, &[("Title", title)], request.overwrite)?;
        eprintln!("sdscale: wrote {}", path.display());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if request.json {
        for line in &lines {
            writeln!(out, "{}", line.to_json())?;
        }
    } else {
        entropy::write_table(&mut out, &lines, request.steps)?;
    }
    out.flush()?;
    Ok(())
}

/// Progress on stderr: one rewritten line on a terminal, plain lines otherwise (logs stay readable).
fn plain_progress() -> impl FnMut(Event) {
    let terminal = std::io::stderr().is_terminal();
    move |event| match event {
        Event::Warning(message) => eprintln!("sdscale: warning: {message}"),
        Event::Step { index, total, timestep } if terminal => {
            eprint!("\rsdscale: step {}/{total} (t={timestep})", index + 1);
            if index + 1 == total {
                eprintln!();
            }
        }
        Event::Step { index, total, timestep } => eprintln!("sdscale: step {}/{total} (t={timestep})", index + 1),
        Event::Stage(name, elapsed) => eprintln!("sdscale: {name}: {elapsed:.2?}"),
    }
}

// ---- info, completions --------------------------------------------------------------------------

fn info(args: InfoArgs) -> Result<()> {
    let chunks = metadata::read_text_chunks(&args.image).map_err(bad_input)?;
    let find = |key: &str| chunks.iter().find(|(k, _)| k == key).map(|(_, text)| text.clone());
    let text = match (args.json, find(TOOL), find("parameters")) {
        (true, Some(json), _) | (false, Some(json), None) => {
            let value: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("{}: unreadable sdscale chunk", args.image.display()))?;
            serde_json::to_string_pretty(&value)?
        }
        (false, _, Some(parameters)) => parameters,
        (true, None, _) => {
            return Err(bad_input(anyhow!("{} has no sdscale metadata chunk", args.image.display())));
        }
        (false, None, None) => {
            return Err(bad_input(anyhow!(
                "{} has no generation metadata (neither an sdscale nor a parameters chunk)",
                args.image.display()
            )));
        }
    };
    print_line(&text)
}

fn completions(shell: Shell) -> Result<()> {
    use clap::CommandFactory;
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut command = Cli::command();
    let mut stdout = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "sdscale", &mut stdout);
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_failures_of_the_machine_exit_1_and_bad_files_exit_2() {
        let io = |kind| std::io::Error::new(kind, "x");
        let machine = [
            anyhow::Error::new(io(std::io::ErrorKind::Other)).context("reading unet/config.json"),
            anyhow::Error::new(candle_core::Error::Io(io(std::io::ErrorKind::PermissionDenied)))
                .context("loading the UNet"),
            anyhow::Error::new(candle_core::Error::Cuda("CUDA_ERROR_OUT_OF_MEMORY".into()).context("alloc"))
                .context("loading the UNet"),
        ];
        for err in machine {
            assert_eq!(exit_code(&load_failure(err)), 1);
        }
        let bad = [
            anyhow!("unet/config.json: unet config: norm_num_groups is 0"),
            anyhow::Error::new(candle_core::Error::CannotFindTensor { path: "conv_in.weight".into() })
                .context("loading the UNet"),
            anyhow::Error::new(io(std::io::ErrorKind::UnexpectedEof)).context("shorter than a safetensors header"),
        ];
        for err in bad {
            assert_eq!(exit_code(&load_failure(err)), 2);
        }
    }
}
