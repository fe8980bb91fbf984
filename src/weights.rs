//! Where a model's files come from: a local folder in diffusers layout, or a Hugging Face Hub repo
//! fetched through hf-hub's normal cache (`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`).
//!
//! Only `.safetensors` weights are ever loaded, never pickles. In f16/bf16 the `.fp16.safetensors`
//! variant is preferred (half the bytes to read) with the full file as a fallback.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The model the user asked for, before any file is read.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { repo: String, revision: Option<String> },
}

impl ModelSource {
    /// `--model`: an existing folder wins; otherwise `owner/name` is a Hub repo id.
    pub fn parse(spec: &str, revision: Option<String>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        let looks_like_repo = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && spec
                .split('/')
                .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
        if looks_like_repo && !path.exists() {
            return Ok(ModelSource::Hub { repo: spec.to_string(), revision });
        }
        if path.exists() {
            bail!("--model {spec}: not a folder (pass a diffusers-layout model folder or a Hub repo id owner/name)");
        }
        bail!("--model {spec}: no such folder, and not a Hub repo id (owner/name)")
    }

    /// A short name for logs and metadata.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Dir(dir) => dir.display().to_string(),
            ModelSource::Hub { repo, revision: Some(rev) } => format!("{repo}@{rev}"),
            ModelSource::Hub { repo, revision: None } => repo.clone(),
        }
    }
}

/// Every file a pipeline needs, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub scheduler_config: PathBuf,
    /// The folder holding vocab.json + merges.txt (+ special_tokens_map.json), or tokenizer.json.
    pub tokenizer_dir: PathBuf,
}

const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json"];

impl ModelFiles {
    pub fn resolve(source: &ModelSource, dtype: DType) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => Self::from_dir(dir, dtype),
            ModelSource::Hub { repo, revision } => Self::from_hub(repo, revision.as_deref(), dtype),
        }
    }

    fn from_dir(dir: &Path, dtype: DType) -> Result<Self> {
        let file = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!("model folder {} has no {name} (expected the diffusers layout: unet/, text_encoder/, vae/, scheduler/, tokenizer/)", dir.display())
            }
        };
        let weights = |component: &str, stem: &str| -> Result<PathBuf> {
            let candidates = weight_candidates(component, stem, dtype);
            candidates.iter().map(|name| dir.join(name)).find(|p| p.is_file()).with_context(|| {
                let pickle = dir.join(component).join(format!("{stem}.bin"));
                let hint = if pickle.is_file() {
                    " (only a pickle .bin is there; sdscale never loads pickles: convert it to safetensors)"
                } else {
                    ""
                };
                format!("model folder {} has no {}{hint}", dir.display(), candidates.last().unwrap())
            })
        };
        let tokenizer_dir = dir.join("tokenizer");
        if !tokenizer_dir.join("tokenizer.json").is_file() {
            file("tokenizer/vocab.json")?;
            file("tokenizer/merges.txt")?;
        }
        Ok(Self {
            unet_config: file("unet/config.json")?,
            unet_weights: weights("unet", "diffusion_pytorch_model")?,
            text_encoder_config: file("text_encoder/config.json")?,
            text_encoder_weights: weights("text_encoder", "model")?,
            vae_config: file("vae/config.json")?,
            vae_weights: weights("vae", "diffusion_pytorch_model")?,
            scheduler_config: file("scheduler/scheduler_config.json")?,
            tokenizer_dir,
        })
    }

    fn from_hub(repo_id: &str, revision: Option<&str>, dtype: DType) -> Result<Self> {
        let repo = match revision {
            Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
            None => Repo::new(repo_id.to_string(), RepoType::Model),
        };
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
        let cache = Cache::from_env().repo(repo.clone());
        let api = if offline {
            None
        } else {
            let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| Cache::from_env().token());
            Some(ApiBuilder::from_env().with_token(token).with_progress(true).build()?.repo(repo))
        };
        let how_to_fix = format!(
            "download it where there is network (e.g. `hf download {repo_id}`) and pass the folder with --model DIR, or set HF_HOME to a cache that holds it"
        );
        // One file: the cache first when offline, the Hub (which also fills the cache) otherwise.
        let fetch = |name: &str| -> Result<PathBuf, String> {
            if let Some(path) = cache.get(name) {
                if offline {
                    return Ok(path);
                }
            }
            match &api {
                None => Err(format!("{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")),
                Some(api) => api.get(name).or_else(|err| cache.get(name).ok_or(err.to_string())),
            }
        };
        let required = |name: &str| -> Result<PathBuf> {
            fetch(name).map_err(|err| anyhow::anyhow!("cannot get {name} of Hub model {repo_id}: {err}; {how_to_fix}"))
        };
        let weights = |component: &str, stem: &str| -> Result<PathBuf> {
            let candidates = weight_candidates(component, stem, dtype);
            let mut last_err = String::new();
            for name in &candidates {
                match fetch(name) {
                    Ok(path) => return Ok(path),
                    Err(err) => last_err = err,
                }
            }
            bail!("cannot get {} of Hub model {repo_id}: {last_err}; {how_to_fix}", candidates.last().unwrap())
        };
        let unet_config = required("unet/config.json")?;
        let tokenizer_json = fetch("tokenizer/tokenizer.json").ok();
        let tokenizer_dir = match tokenizer_json {
            Some(path) => path.parent().unwrap().to_path_buf(),
            None => {
                let vocab = required(TOKENIZER_FILES[0])?;
                required(TOKENIZER_FILES[1])?;
                let _ = fetch(TOKENIZER_FILES[2]);
                vocab.parent().unwrap().to_path_buf()
            }
        };
        Ok(Self {
            unet_config,
            unet_weights: weights("unet", "diffusion_pytorch_model")?,
            text_encoder_config: required("text_encoder/config.json")?,
            text_encoder_weights: weights("text_encoder", "model")?,
            vae_config: required("vae/config.json")?,
            vae_weights: weights("vae", "diffusion_pytorch_model")?,
            scheduler_config: required("scheduler/scheduler_config.json")?,
            tokenizer_dir,
        })
    }
}

/// Weight file names to try, best first: the fp16 variant only helps when computing in half precision.
fn weight_candidates(component: &str, stem: &str, dtype: DType) -> Vec<String> {
    let full = format!("{component}/{stem}.safetensors");
    match dtype {
        DType::F16 | DType::BF16 => vec![format!("{component}/{stem}.fp16.safetensors"), full],
        _ => vec![full],
    }
}

/// Memory-maps a safetensors file; each tensor is then copied (and converted to `dtype`) once, when the
/// network asks for it by name. A truncated or corrupt file fails here, naming the file.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    if device.is_cpu() {
        let file = SafetensorsFile::open(path)
            .with_context(|| format!("reading weights {} (truncated or not a safetensors file?)", path.display()))?;
        return Ok(VarBuilder::from_backend(Box::new(file), dtype, device.clone()));
    }
    // On a GPU each tensor is uploaded straight from the mapped file.
    // SAFETY: the file is mapped read-only; like every mmap user we assume nobody truncates it meanwhile.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .with_context(|| format!("reading weights {} (truncated or not a safetensors file?)", path.display()))
}

/// A safetensors file read tensor by tensor with positioned reads, for the CPU: candle's loader maps the
/// file and copies every tensor out of the mapping, so while a model loads its weights sit in memory
/// twice (the mapped file pages and the copies; 8.1 GB peak RSS for a 5.2 GB model). Here each tensor is
/// read straight into its own buffer and nothing else stays resident.
struct SafetensorsFile {
    file: std::fs::File,
    tensors: std::collections::HashMap<String, TensorEntry>,
}

struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    offset: u64,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        #[derive(serde::Deserialize)]
        struct Header {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let file = std::fs::File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut size = [0u8; 8];
        file.read_exact_at(&mut size, 0).context("shorter than a safetensors header")?;
        let header_len = u64::from_le_bytes(size);
        if header_len > 100 << 20 || 8 + header_len > file_len {
            bail!("bad safetensors header length {header_len} for a {file_len}-byte file");
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)?;
        let mut entries: std::collections::HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
        entries.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut tensors = std::collections::HashMap::with_capacity(entries.len());
        for (name, entry) in entries {
            let Header { dtype, shape, data_offsets: (start, end) } = serde_json::from_value(entry)?;
            let (dtype, size) = match dtype.as_str() {
                "F32" => (DType::F32, 4),
                "F16" => (DType::F16, 2),
                "BF16" => (DType::BF16, 2),
                other => bail!("tensor {name}: dtype {other} is not supported (F32, F16, BF16)"),
            };
            let bytes = shape.iter().product::<usize>() as u64 * size;
            if end < start || end - start != bytes || data_start + end > file_len {
                bail!("tensor {name}: its data ({start}..{end}) does not fit the file (truncated?)");
            }
            tensors.insert(name, TensorEntry { dtype, shape, offset: data_start + start });
        }
        Ok(Self { file, tensors })
    }

    fn read<T: candle_core::WithDType + Default>(&self, entry: &TensorEntry) -> std::io::Result<Vec<T>> {
        use std::os::unix::fs::FileExt;
        let len = entry.shape.iter().product::<usize>();
        // A zeroed allocation this large comes straight from fresh pages: no extra pass.
        let mut values = vec![T::default(); len];
        // SAFETY: `values` is initialised, and T is a plain number type with no invalid bit patterns.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&values[..]))
        };
        // Large tensors: ask for transparent huge pages before the first touch, 512× fewer page faults.
        if bytes.len() >= 4 << 20 {
            // SAFETY: advice on memory this Vec owns; failure is harmless.
            unsafe { libc::madvise(bytes.as_mut_ptr().cast(), bytes.len(), libc::MADV_HUGEPAGE) };
        }
        self.file.read_exact_at(bytes, entry.offset)?;
        Ok(values)
    }
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
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

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::Tensor;
        let entry =
            self.tensors.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let shape = entry.shape.as_slice();
        let tensor = match entry.dtype {
            DType::F32 => Tensor::from_vec(self.read::<f32>(entry)?, shape, &Device::Cpu)?,
            DType::F16 => Tensor::from_vec(self.read::<half::f16>(entry)?, shape, &Device::Cpu)?,
            _ => Tensor::from_vec(self.read::<half::bf16>(entry)?, shape, &Device::Cpu)?,
        };
        tensor.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Reads and parses one JSON config file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
