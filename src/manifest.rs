//! The record of each generated image — what `gen --json` prints and `gen --manifest` appends, one
//! JSON object per line — and the append-only manifest file that `sdscale eval` reads.
//!
//! A record is appended before its PNG is published. A process killed between the two leaves a
//! record whose file is missing; `--skip-existing` then makes the image again and appends a second
//! record for the same path. `sdscale eval` keeps the last record per path and refuses a record
//! whose image is missing (an unfinished shard).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

/// One image: its settings, where it is, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// On stdout as written; in a manifest relative to the manifest's folder when inside it.
    pub path: PathBuf,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u32,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub mode: crate::mode::Mode,
    /// The sampler, its schedule and spacing (records from before samplers: DDIM, leading).
    #[serde(default = "ddim")]
    pub sampler: crate::sampler::SamplerKind,
    #[serde(default)]
    pub schedule: Option<crate::sampler::Schedule>,
    #[serde(default = "leading")]
    pub timestep_spacing: crate::sampler::Spacing,
    pub model: String,
    /// Its batch's seconds over the batch's images.
    pub seconds: f64,
    /// Peak device memory while it was made, MiB above what was in use before loading; null off CUDA.
    pub peak_device_mib: Option<f64>,
    /// Its place in the run's grid: the prompt (from 0) and the image among that prompt's.
    pub prompt_index: usize,
    pub image_index: usize,
}

fn ddim() -> crate::sampler::SamplerKind {
    crate::sampler::SamplerKind::Ddim
}

fn leading() -> crate::sampler::Spacing {
    crate::sampler::Spacing::Leading
}

/// An append-only JSON Lines file, safe to reopen after a crash.
pub struct Manifest {
    path: PathBuf,
    file: File,
    /// The manifest's folder, absolute: record paths are made relative to it.
    folder: PathBuf,
}

impl Manifest {
    /// Opens (creating it and its folder if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let folder = absolute(path.parent().unwrap_or(Path::new("")))?;
        std::fs::create_dir_all(&folder).with_context(|| format!("--manifest: cannot create {}", folder.display()))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("--manifest: cannot open {} for appending", path.display()))?;
        // A line cut short by a kill stays a line of its own: the next record starts on a new one.
        let length = file.metadata()?.len();
        if length > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(length - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Self { path: path.to_path_buf(), file, folder })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record in a single write, flushed to disk before the image is published.
    pub fn append(&mut self, record: &ImageRecord) -> Result<()> {
        let mut record = record.clone();
        let image = absolute(&record.path)?;
        if let Ok(relative) = image.strip_prefix(&self.folder) {
            record.path = relative.to_path_buf();
        } else {
            record.path = image;
        }
        let mut line = serde_json::to_string(&record).expect("plain data");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("--manifest: cannot append to {}", self.path.display()))
    }
}

/// `path` made absolute against the working directory, `.` and `..` resolved by name (the file
/// may not exist yet, so it cannot be canonicalised).
fn absolute(path: &Path) -> Result<PathBuf> {
    let joined = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut clean = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> ImageRecord {
        ImageRecord {
            path: path.into(),
            prompt: "a corgi".into(),
            negative_prompt: String::new(),
            seed: 7,
            width: 224,
            height: 224,
            steps: 50,
            guidance: 7.5,
            mode: crate::mode::Mode::Entropy,
            sampler: crate::sampler::SamplerKind::Ddim,
            schedule: None,
            timestep_spacing: crate::sampler::Spacing::Leading,
            model: "m".into(),
            seconds: 1.5,
            peak_device_mib: None,
            prompt_index: 0,
            image_index: 0,
        }
    }

    #[test]
    fn records_are_whole_lines_with_paths_relative_to_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = dir.path().join("runs/manifest-0.jsonl");
        let mut manifest = Manifest::open(&manifest_path).unwrap();
        manifest.append(&record(dir.path().join("runs/224/a.png").to_str().unwrap())).unwrap();
        manifest.append(&record(dir.path().join("elsewhere/b.png").to_str().unwrap())).unwrap();
        drop(manifest);
        // A kill in the middle of a line: the next record still starts a line of its own.
        let mut file = OpenOptions::new().append(true).open(&manifest_path).unwrap();
        file.write_all(b"{\"path\": \"cut").unwrap();
        drop(file);
        Manifest::open(&manifest_path)
            .unwrap()
            .append(&record(dir.path().join("runs/c.png").to_str().unwrap()))
            .unwrap();

        let text = std::fs::read_to_string(&manifest_path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let parsed = |line: &str| serde_json::from_str::<ImageRecord>(line).unwrap();
        assert_eq!(parsed(lines[0]).path, Path::new("224/a.png"));
        assert_eq!(parsed(lines[1]).path, absolute(&dir.path().join("elsewhere/b.png")).unwrap());
        assert!(serde_json::from_str::<ImageRecord>(lines[2]).is_err());
        assert_eq!(parsed(lines[3]).path, Path::new("c.png"));
        assert_eq!(parsed(lines[3]), ImageRecord { path: "c.png".into(), ..record("") });
    }
}
