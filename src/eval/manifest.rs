//! Reading the manifests `gen --manifest FILE` appends: JSON Lines, one object per written image, one
//! file per shard. sdscale eval needs `path`, `prompt`, `width`, `height` and `mode`; `seconds` and
//! `peak_device_mib` feed the table when present; every other field is ignored, so newer writers stay
//! readable. A relative `path` is relative to the manifest's own folder.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One generated image, as its manifest line describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Resolved against the manifest's folder.
    pub path: PathBuf,
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub mode: String,
    /// The sampler as a label ("ddim", "dpmpp_2m karras"); records from before samplers are DDIM's.
    pub sampler: String,
    pub seconds: Option<f64>,
    /// None on the CPU.
    pub peak_device_mib: Option<f64>,
}

#[derive(Deserialize)]
struct Line {
    path: PathBuf,
    prompt: String,
    width: usize,
    height: usize,
    mode: String,
    #[serde(default)]
    sampler: Option<String>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    seconds: Option<f64>,
    #[serde(default)]
    peak_device_mib: Option<f64>,
}

/// Every record of every manifest, in order. An image listed twice (a resumed shard, a manifest
/// given twice) counts once: its last record wins.
pub fn read_all(manifests: &[PathBuf]) -> Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    let mut index_of: HashMap<PathBuf, usize> = HashMap::new();
    for manifest in manifests {
        for record in read(manifest)? {
            match index_of.get(&record.path) {
                Some(&i) => records[i] = record,
                None => {
                    index_of.insert(record.path.clone(), records.len());
                    records.push(record);
                }
            }
        }
    }
    Ok(records)
}

/// The records of one manifest; a malformed line is refused naming its line number.
pub fn read(manifest: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(manifest).with_context(|| format!("reading manifest {}", manifest.display()))?;
    let folder = manifest.parent().unwrap_or(Path::new(""));
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let place = || format!("{} line {}", manifest.display(), number + 1);
        let line: Line = match serde_json::from_str(line) {
            Ok(line) => line,
            // A record cut short by a killed `gen` (which starts its next record on a new line).
            Err(err) if err.is_eof() => {
                eprintln!("sdscale: {}: skipping a record cut short (its image is remade on resume)", place());
                continue;
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("{}: not a manifest record (path, prompt, width, height, mode)", place()))
            }
        };
        if line.width == 0 || line.height == 0 {
            bail!("{}: size {}x{} is empty", place(), line.width, line.height);
        }
        records.push(Record {
            path: if line.path.is_absolute() { line.path } else { folder.join(line.path) },
            prompt: line.prompt,
            width: line.width,
            height: line.height,
            mode: line.mode,
            sampler: match (line.sampler, line.schedule) {
                (Some(sampler), Some(schedule)) => format!("{sampler} {schedule}"),
                (Some(sampler), None) => sampler,
                (None, _) => "ddim".into(),
            },
            seconds: line.seconds,
            peak_device_mib: line.peak_device_mib,
        });
    }
    if records.is_empty() {
        bail!("manifest {} lists no images", manifest.display());
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_contract_tolerates_extra_fields_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("shard-0.jsonl");
        std::fs::write(
            &manifest,
            concat!(
                r#"{"path": "out/x.png", "prompt": "a", "negative_prompt": "", "seed": 7, "width": 224, "height": 224, "#,
                r#""steps": 50, "guidance": 7.5, "mode": "entropy", "model": "m", "seconds": 3.21, "#,
                r#""peak_device_mib": null, "prompt_index": 0, "image_index": 0, "future_field": [1, 2]}"#,
                "\n\n",
                r#"{"path": "/abs/y.png", "prompt": "b", "width": 512, "height": 256, "mode": "default", "peak_device_mib": 4312.5}"#,
                "\n"
            ),
        )
        .unwrap();
        let records = read(&manifest).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].path, dir.path().join("out/x.png"));
        assert_eq!((records[0].seconds, records[0].peak_device_mib), (Some(3.21), None));
        assert_eq!(records[1].path, PathBuf::from("/abs/y.png"));
        assert_eq!((records[1].width, records[1].height, records[1].peak_device_mib), (512, 256, Some(4312.5)));
    }

    #[test]
    fn a_bad_line_is_refused_by_number_and_duplicates_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"path\": \"a.png\", \"prompt\": \"p\", \"width\": 8, \"height\": 8, \"mode\": \"default\"}\n{\"path\": 3}\n")
            .unwrap();
        let err = format!("{:#}", read(&bad).unwrap_err());
        assert!(err.contains("bad.jsonl line 2"), "{err}");

        let one = dir.path().join("one.jsonl");
        std::fs::write(&one, "{\"path\": \"a.png\", \"prompt\": \"p\", \"width\": 8, \"height\": 8, \"mode\": \"default\", \"seconds\": 1}\n")
            .unwrap();
        let two = dir.path().join("two.jsonl");
        std::fs::write(&two, "{\"path\": \"a.png\", \"prompt\": \"p\", \"width\": 8, \"height\": 8, \"mode\": \"default\", \"seconds\": 2}\n")
            .unwrap();
        // A line cut short by a kill is skipped.
        let mut text = std::fs::read_to_string(&two).unwrap();
        text.push_str("{\"path\": \"b.png\", \"prom\n");
        std::fs::write(&two, text).unwrap();
        let records = read_all(&[one, two]).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].seconds, Some(2.0));
    }
}
