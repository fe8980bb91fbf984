//! Prompt files (`gen --prompts FILE|-`): one prompt per line, or JSON Lines whose objects set the
//! prompt and may override other settings for that line.
//!
//! Reading is bounded before anything is allocated for the text ([`MAX_FILE_BYTES`]) and parsing is
//! a pure function over the text ([`parse`]), so both can be tried against hostile input (tests/fuzz.rs).
//! The values a line sets are checked by `cli.rs`, with the same rules as the flags.

use crate::text::printable_error;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::io::Read;

/// The largest prompt file read: some 100,000 long prompts. More is a mistake (the wrong file), and
/// is refused before it is read rather than filling memory.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Prompts in one file: every prompt makes at least one image, and a run makes at most this many.
pub const MAX_PROMPTS: usize = 100_000;
/// The longest prompt or negative prompt, from any source. CLIP reads only 77 tokens (a few hundred
/// bytes); the cap keeps a run of 100,000 images from holding a huge prompt 100,000 times.
pub const MAX_PROMPT_BYTES: usize = 8 << 10;

/// Settings that several sources can give (a prompt-file line, flags, `--from`); `cli.rs` merges and
/// checks them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub mode: Option<String>,
    /// The sampler's name (or "model"), `--schedule` and `--timestep-spacing` for this line.
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    pub timestep_spacing: Option<String>,
    // `gen --json` output keys, accepted and ignored so its output can be fed back as input. Never used:
    // a line cannot choose where its image is written.
    #[serde(default, rename = "path")]
    pub(crate) _path: Option<serde_json::Value>,
    #[serde(default, rename = "model")]
    pub(crate) _model: Option<serde_json::Value>,
    #[serde(default, rename = "seconds")]
    pub(crate) _seconds: Option<serde_json::Value>,
    #[serde(default, rename = "peak_device_mib")]
    pub(crate) _peak_device_mib: Option<serde_json::Value>,
    #[serde(default, rename = "prompt_index")]
    pub(crate) _prompt_index: Option<serde_json::Value>,
    #[serde(default, rename = "image_index")]
    pub(crate) _image_index: Option<serde_json::Value>,
}

/// Reads a prompt file (or stdin for `-`) whole, refusing one larger than [`MAX_FILE_BYTES`] before
/// reading it: (name for messages, text).
pub fn read(spec: &str) -> Result<(String, String)> {
    if spec == "-" {
        let text = read_bounded(std::io::stdin().lock(), "--prompts -").context("--prompts -: reading stdin")?;
        return Ok(("stdin".to_string(), text));
    }
    let file = std::fs::File::open(spec).with_context(|| format!("--prompts {spec}: cannot open it"))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_FILE_BYTES {
        bail!("--prompts {spec}: {len} bytes is more than the {MAX_FILE_BYTES}-byte limit of a prompt file; split it");
    }
    // Bounded again while reading: a pipe or a growing file has no size up front.
    let text = read_bounded(file, &format!("--prompts {spec}"))?;
    Ok((spec.to_string(), text))
}

fn read_bounded(source: impl Read, what: &str) -> Result<String> {
    let mut bytes = Vec::new();
    source.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("{what}: cannot read it"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("{what}: more than the {MAX_FILE_BYTES}-byte limit of a prompt file; split it");
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{what}: not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to())
    })
}

/// Parses a prompt file's text: (location, settings) per prompt, in order, where location
/// ("prompts.txt line 3") names the line in any later message about it. Blank lines and `#`
/// comments are skipped; a line starting with `{` is a JSON object that must set `prompt`.
pub fn parse(name: &str, text: &str) -> Result<Vec<(String, Settings)>> {
    let mut lines = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let location = format!("{name} line {}", number + 1);
        if lines.len() == MAX_PROMPTS {
            bail!("{location}: more than {MAX_PROMPTS} prompts, the most one run makes images for; split the file");
        }
        let settings = if trimmed.starts_with('{') {
            let settings: Settings =
                serde_json::from_str(trimmed).map_err(printable_error).with_context(|| location.clone())?;
            if settings.prompt.is_none() {
                bail!("{location}: the JSON object has no \"prompt\"");
            }
            settings
        } else {
            Settings { prompt: Some(trimmed.to_string()), ..Settings::default() }
        };
        lines.push((location, settings));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_lines_with_comments_skipped() {
        let text = "# c\n\n  plain  \n{\"prompt\": \"j\", \"seed\": 3, \"path\": \"../x.png\"}\n";
        let lines = parse("p.txt", text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].0, "p.txt line 3");
        assert_eq!(lines[0].1.prompt.as_deref(), Some("plain"));
        assert_eq!((lines[1].1.prompt.as_deref(), lines[1].1.seed), (Some("j"), Some(3)));
        assert!(format!("{:#}", parse("p", "{\"seed\": 1}").unwrap_err()).contains("line 1: the JSON object"));
        assert!(format!("{:#}", parse("p", "a\n{\"prompt\": 1}").unwrap_err()).starts_with("p line 2"));
    }

    #[test]
    fn too_many_prompts_are_refused_naming_the_limit() {
        let text = "a\n".repeat(MAX_PROMPTS + 1);
        let err = format!("{:#}", parse("p", &text).unwrap_err());
        assert!(err.contains("more than 100000 prompts"), "{err}");
        assert_eq!(parse("p", &"a\n".repeat(MAX_PROMPTS)).unwrap().len(), MAX_PROMPTS);
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.txt");
        // Sparse: a 1 GB "prompt line" that costs no disk.
        std::fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
        let err = format!("{:#}", read(path.to_str().unwrap()).unwrap_err());
        assert!(err.contains("1073741824 bytes is more than the 16777216-byte limit"), "{err}");
        let err = format!("{:#}", read_bounded(std::io::repeat(b'a'), "--prompts -").unwrap_err());
        assert!(err.contains("more than the 16777216-byte limit"), "{err}");
    }
}
