//! What each subcommand does, between the parsed command line and the pipeline: resolve the request,
//! load the model once, generate, write, report.

use crate::cli::{Cli, Command, GenArgs, GenRequest, Mode};
use crate::output;
use crate::pipeline::{Event, GenerateRequest, Pipeline};
use crate::weights::ModelFiles;
use anyhow::Result;
use std::io::IsTerminal;
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
    // One machine-readable timing line: scripts/gpu/check.sh and the benchmarks read it.
    eprintln!(
        "sdscale: {width}x{height}, {} steps, mode {}: generate_seconds={:.3}",
        request.steps,
        request.mode.as_str(),
        started.elapsed().as_secs_f64()
    );

    let parameters = a1111_parameters(&request, width, height);
    output::write_png(&output, &image, &[("parameters", parameters)], request.overwrite)?;
    output::print_path(&output)
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
