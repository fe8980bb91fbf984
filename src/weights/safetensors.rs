//! A safetensors file read tensor by tensor with positioned reads.
//!
//! Why not candle's loader: it maps the file and copies every tensor out of the mapping, so while a
//! model loads its weights sit in memory twice (8.1 GB peak RSS for a 5.2 GB model), and it rejects a
//! header as a whole when one tensor has a dtype it cannot hold. Real files carry such tensors:
//! transformers 4.25 saved CLIP's int64 `position_ids` buffer beside the float weights. Here the header
//! is only indexed; a tensor is read (and its dtype checked) when the network asks for it by name, so
//! tensors nobody uses are never read, whatever their dtype.

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
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("reading weights {} (truncated or not a safetensors file?)", path.display());
        let file = std::fs::File::open(path).with_context(|| format!("opening weights {}", path.display()))?;
        let tensors = read_header(&file).with_context(what)?;
        Ok(Self { path: path.to_path_buf(), file, tensors })
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
                    "{}: tensor {name} is stored as {other}, but the model needs it as floats (F32, F16, BF16 or F64); \
                     re-save the file with float weights",
                    self.path.display()
                )))
            }
        };
        Ok(tensor)
    }

    fn read_values<T: candle_core::WithDType + Default>(&self, entry: &TensorEntry) -> std::io::Result<Vec<T>> {
        let len = entry.shape.iter().product::<usize>();
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
/// inside the file. Unknown dtypes are kept (their size cannot be checked; reading one fails).
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
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        bail!("bad safetensors header length {header_len} for a {file_len}-byte file");
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)?;
    let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    raw.remove("__metadata__");
    let data_start = 8 + header_len;
    let mut tensors = HashMap::with_capacity(raw.len());
    for (name, value) in raw {
        let RawEntry { dtype, shape, data_offsets: (start, end) } =
            serde_json::from_value(value).with_context(|| format!("tensor {name}: malformed header entry"))?;
        if end < start || data_start.checked_add(end).is_none_or(|e| e > file_len) {
            bail!("tensor {name}: its data ({start}..{end}) does not fit the file (truncated?)");
        }
        if let Some(size) = element_size(&dtype) {
            let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            if elements.and_then(|n| n.checked_mul(size)) != Some(end - start) {
                bail!("tensor {name}: shape {shape:?} of {dtype} does not match its {} data bytes", end - start);
            }
        }
        tensors.insert(name, TensorEntry { dtype, shape, start: data_start + start, end: data_start + end });
    }
    Ok(tensors)
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
}

impl Backend {
    pub fn new(file: std::sync::Arc<SafetensorsFile>, map: Option<HashMap<String, Source>>) -> Self {
        Self { file, map }
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Option<(&'a str, Option<(usize, usize)>)> {
        match &self.map {
            None => self.file.entry(name).map(|_| (name, None)),
            Some(map) => map.get(name).map(|source| (source.name.as_str(), source.chunk)),
        }
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
        let (stored, chunk) =
            self.resolve(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let mut tensor = self.file.read(stored)?;
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
        assert!(err.contains("position_ids is stored as I64"), "{err}");
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
        let map = HashMap::from([("v".to_string(), Source { name: "in_proj".into(), chunk: Some((2, 3)) })]);
        let backend = Backend::new(file, Some(map));
        use candle_nn::var_builder::SimpleBackend;
        let v = backend.get_unchecked("v", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), [4., 5.]);
        assert!(!backend.contains_tensor("in_proj"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
