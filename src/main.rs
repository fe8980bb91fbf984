use clap::Parser;
use sdscale::{app, cli::Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    // Errors are one line for users: stop candle from capturing a backtrace into every error message
    // (set RUST_LIB_BACKTRACE=1 to get them back when debugging).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    sdscale::tune_allocator();
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
