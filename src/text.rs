//! Text from strangers' files, made safe for a one-line message, and reading a JSON file with the
//! path in its errors. The bottom floor: every module may use it, it uses none.

use anyhow::{Context, Result};
use std::path::Path;

/// Text that came from a file, made one printable line for a message: control characters (newlines,
/// terminal escape sequences) are written as escapes (`\n`, `\u{1b}`), everything else as it is.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A parser's error about a stranger's file, as one printable line.
pub fn printable_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(printable(&err.to_string()))
}

/// Reads and parses one JSON config file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
