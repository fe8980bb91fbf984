//! What each subcommand does, between the parsed command line and the pipeline: resolve the request,
//! load the model once, generate, write, report.

use crate::attention::{train_tokens, AttentionScale};
use crate::cli::{Cli, Command, EntropyArgs, EntropyRequest, GenArgs, GenRequest, Mode};
use crate::entropy::{self, EntropyProbe, Run};
use crate::output;
use crate::pipeline::{Event, GenerateRequest, Pipeline};
use crate::weights::ModelFiles;
use anyhow::Result;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// A mistake in what the user asked for (flags, model files, output path): exit code 2, as clap's own
/// usage errors. Anything that fails once generation has started exits with 1.
#[derive(Debug)]
pub struct BadInput(pub anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad_input(err: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(BadInput(err))
}

pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<BadInput>()) {
        2
    } else {
        1
    }
}

pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Gen(args) => gen(args),
        Command::Entropy(args) => entropy(args),
    }
}

fn gen(args: GenArgs) -> Result<()> {
    let request = GenRequest::try_from(args).map_err(bad_input)?;
    if request.seed_is_random {
        eprintln!("sdscale: seed {} (pass --seed {} to reproduce this image)", request.seed, request.seed);
    }
    // Refuse an existing or unwritable output before minutes of work, when its name is known already.
    if let Some(output) = &request.output {
        output::check_output(output, request.overwrite).map_err(bad_input)?;
    }

    let started = Instant::now();
    let files = ModelFiles::resolve(&request.model, request.dtype).map_err(bad_input)?;
    let pipeline = Pipeline::load(&files, &request.device, request.dtype).map_err(bad_input)?;
    eprintln!("sdscale: loaded {} in {:.2?}", request.model.display_name(), started.elapsed());

    let (train_width, train_height) = pipeline.training_size();
    let width = request.width.unwrap_or(train_width);
    let height = request.height.unwrap_or(train_height);
    let attention = match request.mode {
        Mode::Default => crate::attention::AttentionScale::Default,
        Mode::Entropy => pipeline.entropy_scale(request.train_size.unwrap_or((train_width, train_height))),
    };
    let output = match &request.output {
        Some(path) => path.clone(),
        None => {
            let path = output::default_output_name(&request.prompt, request.seed, request.mode.as_str());
            output::check_output(&path, request.overwrite).map_err(bad_input)?;
            path
        }
    };

    let generate = GenerateRequest {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        width,
        height,
        steps: request.steps,
        guidance_scale: request.guidance,
        seed: request.seed,
        attention,
    };
    let started = Instant::now();
    let image = pipeline.generate(&generate, &mut stderr_progress())?;
    eprintln!(
        "sdscale: {width}x{height}, {} steps, mode {} in {:.2?}",
        request.steps,
        request.mode.as_str(),
        started.elapsed()
    );

    let parameters = a1111_parameters(&request, width, height);
    output::write_png(&output, &image, &[("parameters", parameters)], request.overwrite)?;
    output::print_path(&output)
}

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

    let started = Instant::now();
    let files = ModelFiles::resolve(&request.model, request.dtype).map_err(bad_input)?;
    let pipeline = Pipeline::load(&files, &request.device, request.dtype).map_err(bad_input)?;
    eprintln!("sdscale: loaded {} in {:.2?}", request.model.display_name(), started.elapsed());

    let train_size = request.train_size.unwrap_or(pipeline.training_size());
    let mut sizes = request.sizes.clone();
    if !sizes.contains(&train_size) {
        sizes.push(train_size);
    }
    sizes.sort_by_key(|&(width, height)| (width * height, width));
    let steps: Vec<usize> = request.at.iter().map(|&at| entropy::step_index(at, request.steps)).collect();

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
            let attention = match mode {
                Mode::Default => AttentionScale::Default,
                Mode::Entropy => pipeline.entropy_scale(train_size),
            };
            let generate = GenerateRequest {
                prompt: request.prompt.clone(),
                negative_prompt: request.negative_prompt.clone(),
                width,
                height,
                steps: request.steps,
                guidance_scale: request.guidance,
                seed: request.seed,
                attention,
            };
            eprintln!("sdscale: measuring {width}x{height}, mode {}", mode.as_str());
            let started = Instant::now();
            let probe = EntropyProbe::new(steps.iter().copied());
            pipeline.denoise(&generate, &mut stderr_progress(), Some(&probe))?;
            eprintln!("sdscale: {width}x{height}, mode {} in {:.2?}", mode.as_str(), started.elapsed());
            runs.push(Run { width, height, mode, samples: probe.into_samples() });
        }
    }

    let timesteps = pipeline.scheduler(request.steps)?.timesteps;
    let train_latent = pipeline.train_latent(train_size);
    let lines =
        entropy::measurements(&runs, &request.at, &timesteps, |level| train_tokens(train_latent, level), train_size);

    // The plot first: a reader closing stdout early (`| head`) should not cost the picture.
    if let Some(path) = &request.plot {
        let title = format!(
            "{} \"{}\", seed {}, {} steps, guidance {}, training size {}x{}",
            request.model.display_name(),
            request.prompt,
            request.seed,
            request.steps,
            request.guidance,
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
fn stderr_progress() -> impl FnMut(Event) {
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

/// The AUTOMATIC1111 `parameters` text, which common image browsers display.
fn a1111_parameters(request: &GenRequest, width: usize, height: usize) -> String {
    let mut text = request.prompt.clone();
    if !request.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", request.negative_prompt));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {width}x{height}, Model: {}, Mode: {}",
        request.steps,
        request.guidance,
        request.seed,
        request.model.display_name(),
        request.mode.as_str()
    ));
    text
}
