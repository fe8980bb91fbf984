use clap::Parser;
use sdscale::{app, cli::Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    match app::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // `sdscale … | head` closing the pipe early is not an error.
        Err(err) if app::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sdscale: error: {err:#}");
            ExitCode::from(app::exit_code(&err))
        }
    }
}
