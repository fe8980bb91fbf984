//! The error kinds a caller branches on. The bottom floor: every module may use it, it uses none.

/// A mistake in what the user asked for (flags, prompt files, model files, output paths): exit code
/// 2, as clap's own usage errors. Anything that fails once generation has started exits with 1.
#[derive(Debug)]
pub struct BadInput(pub anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

/// `err` marked as the user's mistake (exit code 2).
pub fn bad_input(err: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(BadInput(err))
}
