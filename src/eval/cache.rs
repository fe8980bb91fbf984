//! The feature cache: an append-only file of (key, f32 vector) records per model, so a grown folder
//! only computes its new images and an interrupted run resumes where it stopped.
//!
//! Each record is appended with one write and is self-checking (lengths plus a 64-bit FNV-1a of its
//! bytes). A record cut short by a kill, or damaged, ends the readable part: it and anything after it
//! are dropped (the file is truncated there) and recomputed. Image keys are the file's absolute path,
//! length and modification time, so a rewritten image is computed again; text keys are the prompt.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"sdscale-features";

pub struct FeatureCache {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Vec<f32>>,
    /// Records this run added.
    pub added: usize,
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

impl FeatureCache {
    /// Opens (or creates) `path`, reading every whole record and dropping a torn tail.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening feature cache {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let (entries, good_len) =
            if bytes.starts_with(MAGIC) { parse(&bytes[MAGIC.len()..]) } else { (HashMap::new(), 0) };
        if good_len == 0 {
            // New, or not a cache we can read: start over.
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(MAGIC)?;
        } else if MAGIC.len() + good_len < bytes.len() {
            file.set_len((MAGIC.len() + good_len) as u64)?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Self { path: path.to_path_buf(), file, entries, added: 0 })
    }

    pub fn get(&self, key: &str) -> Option<&[f32]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Stores `values` under `key`, on disk before this returns (one write; flushed).
    pub fn insert(&mut self, key: String, values: Vec<f32>) -> Result<()> {
        let record = encode(&key, &values);
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing feature cache {}", self.path.display()))?;
        self.entries.insert(key, values);
        self.added += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// key length u32 | key | value count u32 | values f32 | fnv1a64 of all the preceding, little-endian.
fn encode(key: &str, values: &[f32]) -> Vec<u8> {
    let mut record = Vec::with_capacity(16 + key.len() + 4 * values.len());
    record.extend_from_slice(&(key.len() as u32).to_le_bytes());
    record.extend_from_slice(key.as_bytes());
    record.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        record.extend_from_slice(&v.to_le_bytes());
    }
    let check = fnv1a64(&record);
    record.extend_from_slice(&check.to_le_bytes());
    record
}

/// The records of `bytes` up to the first incomplete or damaged one, and how many bytes they span.
fn parse(bytes: &[u8]) -> (HashMap<String, Vec<f32>>, usize) {
    let mut entries = HashMap::new();
    let mut at = 0;
    let read_u32 = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    while let Some(key_len) = read_u32(at) {
        let Some(count) = read_u32(at + 4 + key_len) else { break };
        let end = at + 8 + key_len + 4 * count;
        let Some(check) = bytes.get(end..end + 8) else { break };
        if fnv1a64(&bytes[at..end]) != u64::from_le_bytes(check.try_into().unwrap()) {
            break;
        }
        let Ok(key) = std::str::from_utf8(&bytes[at + 4..at + 4 + key_len]) else { break };
        let values =
            bytes[at + 8 + key_len..end].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        entries.insert(key.to_string(), values);
        at = end + 8;
    }
    (entries, at)
}

/// The cache key of an image file: absolute path, length and modification time.
pub fn image_key(path: &Path) -> Result<String> {
    let absolute = std::fs::canonicalize(path).with_context(|| format!("image {} is missing", path.display()))?;
    let meta = std::fs::metadata(&absolute).with_context(|| format!("reading {}", absolute.display()))?;
    let modified =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("image\0{}\0{}\0{modified}", absolute.display(), meta.len()))
}

pub fn text_key(prompt: &str) -> String {
    format!("text\0{prompt}")
}

/// A short fingerprint of a weights file's contents (length, the start, middle and end), naming its
/// cache file: other weights never read this model's features.
pub fn fingerprint(path: &Path) -> Result<String> {
    const SAMPLE: u64 = 1 << 16;
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut sampled = len.to_le_bytes().to_vec();
    for start in [0, len / 2, len.saturating_sub(SAMPLE)] {
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = Vec::new();
        (&mut file).take(SAMPLE).read_to_end(&mut chunk)?;
        sampled.extend(chunk);
    }
    Ok(format!("{:016x}", fnv1a64(&sampled)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache/features.bin");
        let mut cache = FeatureCache::open(&path).unwrap();
        cache.insert("a".into(), vec![1.0, 2.5]).unwrap();
        cache.insert("b".into(), vec![-3.0]).unwrap();
        drop(cache);
        let whole = std::fs::metadata(&path).unwrap().len();

        // A kill in the middle of the next append leaves part of a record.
        let partial = encode("c", &[7.0, 8.0, 9.0]);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&partial[..partial.len() - 5]).unwrap();
        drop(file);

        let mut cache = FeatureCache::open(&path).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("a"), Some(&[1.0, 2.5][..]));
        assert_eq!(cache.get("c"), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "torn tail truncated");
        cache.insert("c".into(), vec![7.0]).unwrap();
        drop(cache);
        assert_eq!(FeatureCache::open(&path).unwrap().get("c"), Some(&[7.0][..]));
    }

    #[test]
    fn a_damaged_record_ends_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("features.bin");
        let mut cache = FeatureCache::open(&path).unwrap();
        cache.insert("a".into(), vec![1.0]).unwrap();
        cache.insert("b".into(), vec![2.0]).unwrap();
        drop(cache);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 0xff; // a flipped bit inside "b"'s value
        std::fs::write(&path, &bytes).unwrap();
        let cache = FeatureCache::open(&path).unwrap();
        assert_eq!((cache.get("a").is_some(), cache.get("b").is_some()), (true, false));
    }
}
