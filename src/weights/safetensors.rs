//! A safetensors file read tensor by tensor: each tensor's buffer is the mapped file itself when its
//! dtype is the stored one (weights/mapped.rs), else a positioned read into a fresh buffer.
//!
//! Why not candle's loader: it maps the file and copies every tensor out of the mapping, so while a
//! model loads its weights sit in memory twice (8.1 GB peak RSS for a 5.2 GB model), and it rejects a
//! header as a whole when one tensor has a dtype it cannot hold. Real files carry such tensors:
//! transformers 4.25 saved CLIP's int64 `position_ids` buffer beside the float weights. Here the header
//! is only indexed; a tensor is read (and its dtype checked) when the network asks for it by name, so
//! tensors nobody uses are never read, whatever their dtype.

use super::mapped::MappedFile;
use crate::text::printable_error;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A header longer than this is not a model's (SD 2.1's largest is ~100 KB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Every dtype the safetensors format defines, with its element size in bytes: knowing the size lets
/// a header's offsets be checked even for tensors that will never be read.
fn element_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// One tensor's place in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The dtype as the header spells it ("F32", "I64", …).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range of the data in the file.
    start: u64,
    end: u64,
}

/// An indexed safetensors file: names → entries; data read on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    /// The whole file mapped, unless `SDSCALE_MAP_WEIGHTS=0` or it cannot be.
    mapping: Option<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("reading weights {} (truncated or not a safetensors file?)", path.display());
        let file = std::fs::File::open(path).with_context(|| format!("opening weights {}", path.display()))?;
        let tensors = read_header(&file).with_context(what)?;
        let mapping = crate::backend::switch_or_default(|s| s.map_weights).then(|| MappedFile::map(&file)).flatten();
        Ok(Self { path: path.to_path_buf(), file, mapping, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Reads one tensor onto the CPU in its stored float dtype (F64 becomes F32). A tensor in any other
    /// dtype is refused here, when it is needed, naming the tensor and the file.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry =
            self.tensors.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let shape = entry.shape.as_slice();
        let tensor = match entry.dtype.as_str() {
            "F32" => Tensor::from_vec(self.read_values::<f32>(entry)?, shape, &Device::Cpu)?,
            "F16" => Tensor::from_vec(self.read_values::<half::f16>(entry)?, shape, &Device::Cpu)?,
            "BF16" => Tensor::from_vec(self.read_values::<half::bf16>(entry)?, shape, &Device::Cpu)?,
            "F64" => Tensor::from_vec(self.read_values::<f64>(entry)?, shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor {name:?} is stored as {other:?}, but the model needs it as floats (F32, F16, BF16 or F64); \
                     re-save the file with float weights",
                    self.path.display()
                )))
            }
        };
        Ok(tensor)
    }

    fn read_values<T: candle_core::WithDType + Default>(&self, entry: &TensorEntry) -> std::io::Result<Vec<T>> {
        let len = entry.shape.iter().product::<usize>();
        // The header's ranges never overlap (checked on open), as `take` requires.
        if let Some(values) = self.mapping.as_ref().and_then(|mapping| mapping.take::<T>(entry.start, len)) {
            return Ok(values);
        }
        // A zeroed allocation this large comes straight from fresh pages: no extra pass.
        let mut values = vec![T::default(); len];
        // SAFETY: `values` is initialised, and T is a plain number type with no invalid bit patterns.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&values[..]))
        };
        debug_assert_eq!(bytes.len() as u64, entry.end - entry.start);
        // Large tensors: ask for transparent huge pages before the first touch, 512× fewer page faults.
        if bytes.len() >= 4 << 20 {
            // SAFETY: advice on memory this Vec owns; failure is harmless.
            unsafe { libc::madvise(bytes.as_mut_ptr().cast(), bytes.len(), libc::MADV_HUGEPAGE) };
        }
        self.file.read_exact_at(bytes, entry.start)?;
        Ok(values)
    }
}

/// Parses and checks the header: its length, every entry's shape against its byte range, every range
/// inside the file and overlapping no other, every name once. Unknown dtypes are kept (their size cannot
/// be checked; reading one fails). Everything is decided from the header before anything is allocated
/// for the data: a header cannot announce more than the file holds.
fn read_header(file: &std::fs::File) -> Result<HashMap<String, TensorEntry>> {
    #[derive(serde::Deserialize)]
    struct RawEntry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let file_len = file.metadata()?.len();
    let mut size = [0u8; 8];
    file.read_exact_at(&mut size, 0).context("shorter than a safetensors header")?;
    let header_len = u64::from_le_bytes(size);
    if header_len > MAX_HEADER_BYTES {
        bail!(
            "its header announces {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit of a safetensors header"
        );
    }
    if 8 + header_len > file_len {
        bail!("its header announces {header_len} bytes, but the file has only {file_len}");
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)?;
    let HeaderEntries(raw) = serde_json::from_slice(&header).map_err(printable_error)?;
    let data_start = 8 + header_len;
    let mut tensors = HashMap::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let RawEntry { dtype, shape, data_offsets: (start, end) } = serde_json::from_value(value)
            .map_err(printable_error)
            .with_context(|| format!("tensor {name:?}: malformed header entry"))?;
        if end < start || data_start.checked_add(end).is_none_or(|e| e > file_len) {
            bail!(
                "tensor {name:?}: its data ({start}..{end}) does not fit the {} data bytes of the file (truncated?)",
                file_len - data_start
            );
        }
        // A zero dimension makes any shape hold no bytes; the others must still multiply without
        // overflow, or candle's strides for the tensor overflow (found by tests/fuzz.rs).
        if shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1) as u64)).is_none() {
            bail!("tensor {name:?}: shape {shape:?} has more elements than any file can hold");
        }
        if let Some(size) = element_size(&dtype) {
            let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            if elements.and_then(|n| n.checked_mul(size)) != Some(end - start) {
                bail!("tensor {name:?}: shape {shape:?} of {dtype:?} does not match its {} data bytes", end - start);
            }
        }
        let entry = TensorEntry { dtype, shape, start: data_start + start, end: data_start + end };
        if tensors.contains_key(&name) {
            bail!("tensor {name:?} is listed twice in the header");
        }
        tensors.insert(name, entry);
    }
    // The format gives every byte of data to one tensor; overlapping ranges mean a corrupt or crafted file.
    let mut ranges: Vec<(u64, u64, &str)> =
        tensors.iter().filter(|(_, e)| e.end > e.start).map(|(n, e)| (e.start, e.end, n.as_str())).collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            bail!("tensors {first:?} and {second:?} claim overlapping data");
        }
    }
    Ok(tensors)
}

/// The header's top-level entries in file order, duplicates kept (a map would silently keep the last).
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A candle `VarBuilder` backend over a safetensors file, optionally seeing it through a name map
/// (single-file checkpoints: diffusers name → the name in the file, plus how to cut the tensor).
pub struct Backend {
    file: std::sync::Arc<SafetensorsFile>,
    map: Option<HashMap<String, Source>>,
}

/// Where a tensor the network asks for lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    /// `Some((i, n))`: the i-th of n equal slices along dim 0 (OpenCLIP's fused q/k/v `in_proj`).
    pub chunk: Option<(usize, usize)>,
    /// Stored as the transpose of what the network wants (OpenCLIP's bare `text_projection` matrix
    /// against transformers' Linear weight); only for 2-D tensors.
    pub transpose: bool,
}

/// Where a tensor is stored: its stored name, its chunk of a fused tensor, whether it is transposed.
type Resolved<'a> = (&'a str, Option<(usize, usize)>, bool);

impl Backend {
    pub fn new(file: std::sync::Arc<SafetensorsFile>, map: Option<HashMap<String, Source>>) -> Self {
        Self { file, map }
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Option<Resolved<'a>> {
        match &self.map {
            None => self.file.entry(name).map(|_| (name, None, false)),
            Some(map) => map.get(name).map(|source| (source.name.as_str(), source.chunk, source.transpose)),
        }
    }

    /// The shape `name` will have, from the header alone (None when it cannot be known).
    fn header_shape(&self, name: &str) -> Option<Vec<usize>> {
        let (stored, chunk, transpose) = self.resolve(name)?;
        let mut dims = self.file.entry(stored)?.shape.clone();
        if transpose {
            dims.reverse();
        }
        if let Some((_, count)) = chunk {
            let rows = dims.first_mut()?;
            if count == 0 || !rows.is_multiple_of(count) {
                return None;
            }
            *rows /= count;
        }
        Some(dims)
    }
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // Checked against the header first, so a mis-shaped tensor is refused without reading it.
        if let Some(dims) = self.header_shape(name).filter(|dims| dims.as_slice() != shape.dims()) {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: dims.into(),
            });
        }
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (stored, chunk, transpose) =
            self.resolve(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let mut tensor = self.file.read(stored)?;
        if transpose {
            tensor = tensor.t()?.contiguous()?;
        }
        if let Some((index, count)) = chunk {
            let rows = tensor.dim(0)?;
            if rows % count != 0 {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor {stored} has {rows} rows, not divisible into {count} parts",
                    self.file.path().display()
                )));
            }
            tensor = tensor.narrow(0, index * rows / count, rows / count)?.contiguous()?;
        }
        tensor.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a safetensors file from (name, dtype, shape, bytes) by hand, so any dtype can appear.
    fn write(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut file = std::fs::File::create(path).unwrap();
        file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        file.write_all(&header).unwrap();
        file.write_all(&data).unwrap();
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn any_dtype_is_indexed_and_only_needed_floats_are_read() {
        let dir = std::env::temp_dir().join(format!("sdscale-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mixed.safetensors");
        let ids: Vec<u8> = (0..77i64).flat_map(|v| v.to_le_bytes()).collect();
        write(
            &path,
            &[
                ("weight", "F32", vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                ("position_ids", "I64", vec![1, 77], ids),
                ("mask", "BOOL", vec![3], vec![1, 0, 1]),
                ("double", "F64", vec![2], [0.5f64, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect()),
                ("exotic", "F4", vec![2], vec![0]),
            ],
        );
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read("weight").unwrap().to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        assert_eq!(file.read("double").unwrap().to_vec1::<f32>().unwrap(), [0.5, -2.0]);
        let err = file.read("position_ids").unwrap_err().to_string();
        assert!(err.contains("\"position_ids\" is stored as \"I64\""), "{err}");
        assert_eq!(file.entry("exotic").unwrap().dtype, "F4");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shape_that_does_not_match_its_bytes_is_refused() {
        let dir = std::env::temp_dir().join(format!("sdscale-st-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.safetensors");
        write(&path, &[("ids", "I64", vec![1, 77], vec![0; 76 * 8])]);
        let err = format!("{:#}", SafetensorsFile::open(&path).err().unwrap());
        assert!(err.contains("does not match its 608 data bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunked_sources_cut_fused_rows() {
        let dir = std::env::temp_dir().join(format!("sdscale-st-chunk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fused.safetensors");
        write(&path, &[("in_proj", "F32", vec![6], f32_bytes(&[0., 1., 2., 3., 4., 5.]))]);
        let file = std::sync::Arc::new(SafetensorsFile::open(&path).unwrap());
        let map = HashMap::from([(
            "v".to_string(),
            Source { name: "in_proj".into(), chunk: Some((2, 3)), transpose: false },
        )]);
        let backend = Backend::new(file, Some(map));
        use candle_nn::var_builder::SimpleBackend;
        let v = backend.get_unchecked("v", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), [4., 5.]);
        assert!(!backend.contains_tensor("in_proj"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes `header` (raw JSON) and `data` as a safetensors file; `header_len` overrides its length.
    fn write_raw(path: &Path, header: &str, header_len: Option<u64>, data: &[u8]) {
        let mut bytes = header_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    fn open_error(header: &str, header_len: Option<u64>, data: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        write_raw(&path, header, header_len, data);
        format!("{:#}", SafetensorsFile::open(&path).err().expect("refused"))
    }

    /// A header that announces a 100 GB tensor in a small file is refused from the header alone.
    #[test]
    fn a_100_gb_tensor_is_refused_before_allocating() {
        let header = r#"{"w":{"dtype":"F32","shape":[25000000000],"data_offsets":[0,100000000000]}}"#;
        let err = open_error(header, None, &[0; 16]);
        assert!(err.contains("tensor \"w\": its data (0..100000000000) does not fit the 16 data bytes"), "{err}");
    }

    #[test]
    fn absurd_header_lengths_are_refused_naming_the_limit() {
        let err = open_error("{}", Some(u64::MAX), &[]);
        assert!(err.contains("announces 18446744073709551615 bytes, over the 104857600-byte limit"), "{err}");
        let err = open_error("{}", Some(1 << 20), &[]);
        assert!(err.contains("announces 1048576 bytes, but the file has only 10"), "{err}");
    }

    /// A map would keep the second entry silently; which tensor the file meant is unknowable.
    #[test]
    fn duplicate_tensor_names_are_refused() {
        let entry = r#"{"dtype":"U8","shape":[2],"data_offsets":[0,2]}"#;
        let err = open_error(&format!(r#"{{"w":{entry},"w":{entry}}}"#), None, &[1, 2]);
        assert!(err.contains("tensor \"w\" is listed twice"), "{err}");
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let header = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#;
        let err = open_error(header, None, &[0; 4]);
        assert!(err.contains("tensors \"a\" and \"b\" claim overlapping data"), "{err}");
    }

    /// Names and dtypes from the file are quoted: a newline in a name cannot split the message.
    #[test]
    fn names_from_the_file_stay_on_one_line() {
        let err = open_error(r#"{"a\nb":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, None, &[0; 4]);
        assert!(err.contains(r#"tensor "a\nb": shape [2] of "F32" does not match its 4 data bytes"#), "{err}");
        let err = open_error("{\"\u{1b}\": 1, \"\u{1b}\": 1}", None, &[]);
        assert!(!err.chars().any(char::is_control), "{err}");
    }

    /// Asked for another shape, a tensor is refused from its header entry, before its data is read.
    #[test]
    fn a_wrong_shape_is_refused_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        write(&path, &[("w", "F32", vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
        let backend = Backend::new(std::sync::Arc::new(SafetensorsFile::open(&path).unwrap()), None);
        // Truncate the data away: a read would now fail, so only the header can refuse the shape.
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 16).unwrap();
        use candle_nn::var_builder::SimpleBackend;
        let err = backend.get((4, 1).into(), "w", candle_nn::Init::Const(0.), DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("shape mismatch for w"), "{err}");
    }

    /// Found by `fuzz_safetensors_header`: `[0, 2, 2^63]` holds no bytes, so it passed the byte check,
    /// and candle's stride computation then overflowed reading it.
    #[test]
    fn a_zero_dimension_does_not_hide_an_overflowing_shape() {
        let header = r#"{"w":{"dtype":"F32","shape":[0,2,9223372036854775808],"data_offsets":[0,0]}}"#;
        let err = open_error(header, None, &[]);
        assert!(err.contains("has more elements than any file can hold"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.safetensors");
        write_raw(&path, r#"{"w":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}"#, None, &[]);
        assert_eq!(SafetensorsFile::open(&path).unwrap().read("w").unwrap().dims(), [0, 3]);
    }
}
