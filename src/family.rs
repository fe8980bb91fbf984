//! Model families: which tokenizer, text encoder and latent decoder surround the UNet, in which
//! folders they live, and how the family's pipeline differs from Stable Diffusion's. The family comes
//! from `model_index.json`'s `_class_name`; everything else about a model (CLIP's activation, the
//! UNet's projections and head counts, the scheduler's prediction type, the training size) comes from
//! its own configs. This file and kind.rs are the one place to add a family: a variant, its folders and
//! rules (kind.rs), and its [`TextEncoder`] / [`LatentDecoder`] implementations; the pipeline only sees
//! those.
//!
//! | family (`_class_name`)     | text encoder (folder)          | tokenizer   | decoder  |
//! |----------------------------|--------------------------------|-------------|----------|
//! | `StableDiffusionPipeline`  | CLIP (`text_encoder/`)         | CLIP BPE    | `vae/`   |
//! | `LDMTextToImagePipeline`   | LDMBert (`bert/`)              | WordPiece   | `vqvae/` |
//! | `StableDiffusionXLPipeline`| CLIP-L + OpenCLIP bigG (`text_encoder/`, `text_encoder_2/`) | CLIP BPE ×2 | `vae/` |

pub mod kind;

use crate::backend::Backends;
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::ldm_bert::{LdmBertConfig, LdmBertModel};
use crate::models::unet::{PerBlock, UNetConfig, UNetConfigFile};
use crate::models::vae::{Tiling, VaeConfig, VaeDecoder};
use crate::sampler::SchedulerConfig;
use crate::tokenizer::{ClipTokenizer, Tokens, WordPieceTokenizer};
use crate::weights::{read_json, ModelFiles, SecondTextEncoder, Weights};
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use image::RgbImage;
pub use kind::{Family, Folders, Rules};
use std::path::Path;

impl Family {
    /// What metadata and `info` call the model: the family, told apart further by its configs (SD 1.x's
    /// OpenAI CLIP uses quick_gelu, SD 2.x's OpenCLIP exact gelu; v-prediction marks SD 2.x at 768).
    pub fn describe(self, files: &ModelFiles) -> Result<String> {
        match self {
            Family::StableDiffusion => {
                let text: ClipTextConfig = read_json(&files.text_encoder_config)?;
                let scheduler = SchedulerConfig::load(&files.scheduler_config)?;
                let version = if text.hidden_act == "quick_gelu" { "SD 1.x" } else { "SD 2.x" };
                Ok(match scheduler.prediction_type.as_deref().unwrap_or("epsilon") {
                    "v_prediction" => format!("{version} v-prediction"),
                    _ => version.to_string(),
                })
            }
            Family::LatentDiffusion => Ok("LDM text2im".to_string()),
            Family::StableDiffusionXl => Ok("SDXL".to_string()),
        }
    }

    /// The UNet config as this family's pipeline reads it.
    pub fn unet_config(self, path: &Path) -> Result<UNetConfig> {
        let mut file: UNetConfigFile = read_json(path)?;
        if self == Family::StableDiffusion && written_before_0_9(file.diffusers_version.as_deref()) {
            // diffusers 0.42.1 pipeline_stable_diffusion.py L257-284 (StableDiffusionPipeline.__init__):
            // an int sample_size below 64 in a UNet config older than diffusers 0.9 is taken for 64,
            // the fix for early SD 1.x configs that said 32.
            if matches!(file.sample_size, PerBlock::One(size) if size < 64) {
                file.sample_size = PerBlock::One(64);
            }
        }
        UNetConfig::from_file(file).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// The text encoder with its tokenizer.
    pub fn load_text_encoder(
        self,
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        backends: &Backends,
    ) -> Result<Box<dyn TextEncoder>> {
        match self {
            Family::StableDiffusion => Ok(Box::new(ClipTextEncoder::load(
                &files.tokenizer_dir,
                &files.text_encoder_config,
                &files.text_encoder_weights,
                device,
                dtype,
                backends,
            )?)),
            Family::StableDiffusionXl => {
                let second = files.text_encoder_2.as_ref().context("SDXL needs text_encoder_2/")?;
                Ok(Box::new(SdxlTextEncoder::load(files, second, device, dtype, backends)?))
            }
            Family::LatentDiffusion => Ok(Box::new(LdmBertTextEncoder::load(
                &files.tokenizer_dir,
                &files.text_encoder_config,
                &files.text_encoder_weights,
                device,
                dtype,
                backends,
            )?)),
        }
    }

    /// The decoder from latents to pixels.
    pub fn load_decoder(
        self,
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        backends: &Backends,
    ) -> Result<Box<dyn LatentDecoder>> {
        match self {
            // diffusers: latents / scaling_factor, a true division.
            Family::StableDiffusion | Family::StableDiffusionXl => Ok(Box::new(SdVae::load(
                &files.vae_config,
                &files.vae_weights,
                device,
                dtype,
                backends,
                LatentScaling::Divide,
            )?)),
            // pipeline_latent_diffusion.py: vqvae.decode(1 / scaling_factor * latents).
            Family::LatentDiffusion => Ok(Box::new(SdVae::load(
                &files.vae_config,
                &files.vae_weights,
                device,
                dtype,
                backends,
                LatentScaling::MultiplyByReciprocal,
            )?)),
        }
    }
}

/// Whether a config's `_diffusers_version` is older than 0.9 (unknown versions are taken for new).
fn written_before_0_9(version: Option<&str>) -> bool {
    let Some(version) = version else { return false };
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    matches!((parts.next().flatten(), parts.next().flatten()), (Some(0), Some(minor)) if minor < 9)
}

/// Prompts → the embeddings the UNet's cross-attention reads.
pub trait TextEncoder: Send + Sync {
    /// Embeddings (texts, tokens, hidden) in the compute dtype; `on_warning` hears about truncation.
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor>;
    /// Width of each embedding: the UNet's `cross_attention_dim` must match it.
    fn hidden_size(&self) -> usize;
    /// The embeddings and, for SDXL, the pooled embeddings (texts, pooled width) its UNet's added
    /// embedding reads.
    fn encode_pooled(
        &self,
        texts: &[(&str, &str)],
        on_warning: &mut dyn FnMut(String),
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.encode(texts, on_warning)?, None))
    }
    /// Width of the pooled embeddings, for encoders that make them (SDXL).
    fn pooled_size(&self) -> Option<usize> {
        None
    }
}

/// Latents → pixels.
pub trait LatentDecoder: Send + Sync {
    /// Pixels per latent pixel (8 for SD's VAE).
    fn scale_factor(&self) -> usize;
    fn latent_channels(&self) -> usize;
    /// One image's final latents (1, c, h, w) → 8-bit RGB; `tiled`: in overlapping tiles (diffusers'
    /// `enable_tiling()`), for images whose whole decode would not fit in memory.
    fn decode(&self, latents: &Tensor, tiled: bool, on_warning: &mut dyn FnMut(String)) -> Result<RgbImage>;
    /// What the untiled decode of a (latent_height × latent_width) latent needs at its peak, in bytes;
    /// `None` where tiling would not split it (one tile holds it all).
    fn untiled_peak_bytes(&self, latent_height: usize, latent_width: usize) -> Option<u64>;
}

/// Reads the decoder's config alone (no weights), for the training size before anything loads.
pub fn decoder_scale_factor(vae_config: &Path) -> Result<usize> {
    let config: VaeConfig = read_json(vae_config)?;
    config.validate().map_err(|e| anyhow!("{}: {e}", vae_config.display()))?;
    Ok(1 << (config.block_out_channels.len() - 1))
}

// ---- Stable Diffusion: CLIP + AutoencoderKL --------------------------------------------------------

/// The CLIP tokenizer and text encoder, as `StableDiffusionPipeline.encode_prompt` uses them.
pub struct ClipTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    hidden_size: usize,
    device: Device,
    dtype: DType,
}

impl ClipTextEncoder {
    pub fn load(
        tokenizer_dir: &Path,
        config: &Path,
        weights: &Weights,
        device: &Device,
        dtype: DType,
        backends: &Backends,
    ) -> Result<Self> {
        let text_config: ClipTextConfig = read_json(config)?;
        text_config.validate().map_err(|e| anyhow!("{}: {e}", config.display()))?;
        let tokenizer = ClipTokenizer::load(tokenizer_dir)?
            .with_max_length(text_config.max_position_embeddings)
            .with_context(|| format!("{}: max_position_embeddings", config.display()))?;
        let model = ClipTextTransformer::new(weights.var_builder(dtype, device)?, &text_config, backends)
            .with_context(|| format!("loading the text encoder from {}", weights.path().display()))?;
        Ok(Self { tokenizer, model, hidden_size: text_config.hidden_size, device: device.clone(), dtype })
    }
}

/// Token ids (texts, max_length) for a batch of texts, warning about each truncated one.
pub(crate) fn token_ids(
    texts: &[(&str, &str)],
    encoder: &str,
    max_length: usize,
    tokenize: impl Fn(&str) -> Result<Tokens>,
    on_warning: &mut dyn FnMut(String),
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(texts.len() * max_length);
    for (what, text) in texts {
        let tokens = tokenize(text)?;
        if !tokens.truncated_text.is_empty() {
            on_warning(format!(
                "the {what} is longer than {encoder}'s {max_length} tokens; dropped: \"{}\"",
                tokens.truncated_text
            ));
        }
        ids.extend(tokens.ids);
    }
    Ok(Tensor::from_vec(ids, (texts.len(), max_length), device)?)
}

impl TextEncoder for ClipTextEncoder {
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor> {
        let max_length = self.tokenizer.max_length();
        let tokenize = |text: &str| self.tokenizer.encode(text);
        let input_ids = token_ids(texts, "CLIP", max_length, tokenize, on_warning, &self.device)?;
        Ok(self.model.forward(&input_ids)?.to_dtype(self.dtype)?)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

// ---- LDM-256: LDMBert ----------------------------------------------------------------------------

/// The WordPiece tokenizer and LDMBert, as `LDMTextToImagePipeline.__call__` uses them (no mask).
pub struct LdmBertTextEncoder {
    pub tokenizer: WordPieceTokenizer,
    pub model: LdmBertModel,
    hidden_size: usize,
    device: Device,
    dtype: DType,
}

impl LdmBertTextEncoder {
    pub fn load(
        tokenizer_dir: &Path,
        config: &Path,
        weights: &Weights,
        device: &Device,
        dtype: DType,
        backends: &Backends,
    ) -> Result<Self> {
        let bert_config: LdmBertConfig = read_json(config)?;
        bert_config.validate().map_err(|e| anyhow!("{}: {e}", config.display()))?;
        // The pipeline pads and truncates to 77; the positions say how many the model has.
        let tokenizer = WordPieceTokenizer::load(tokenizer_dir)?
            .with_max_length(bert_config.max_position_embeddings)
            .with_context(|| format!("{}: max_position_embeddings", config.display()))?;
        let model = LdmBertModel::new(weights.var_builder(dtype, device)?, &bert_config, backends)
            .with_context(|| format!("loading the text encoder from {}", weights.path().display()))?;
        Ok(Self { tokenizer, model, hidden_size: bert_config.d_model, device: device.clone(), dtype })
    }
}

impl TextEncoder for LdmBertTextEncoder {
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor> {
        let max_length = self.tokenizer.max_length();
        let tokenize = |text: &str| self.tokenizer.encode(text);
        let input_ids = token_ids(texts, "LDMBert", max_length, tokenize, on_warning, &self.device)?;
        Ok(self.model.forward(&input_ids)?.to_dtype(self.dtype)?)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

// ---- SDXL: two CLIP text encoders ----------------------------------------------------------------

/// `StableDiffusionXLPipeline.encode_prompt`: each text through both tokenizers and encoders (CLIP-L,
/// its tokenizer padding with <|endoftext|>; OpenCLIP bigG with projection, its tokenizer padding with
/// "!"), each encoder's `hidden_states[-2]` (the penultimate layer, no final norm) concatenated on the
/// feature axis; the pooled embedding is the second encoder's `text_embeds`: the final-norm output at
/// the first end-of-text token (transformers' argmax of the ids: the eos id is the vocabulary's
/// largest), projected by `text_projection` (no bias).
pub struct SdxlTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    pub tokenizer_2: ClipTokenizer,
    pub model_2: ClipTextTransformer,
    text_projection: candle_nn::Linear,
    hidden_size: usize,
    projection_dim: usize,
    device: Device,
    dtype: DType,
}

impl SdxlTextEncoder {
    pub fn load(
        files: &ModelFiles,
        second: &SecondTextEncoder,
        device: &Device,
        dtype: DType,
        backends: &Backends,
    ) -> Result<Self> {
        let first = ClipTextEncoder::load(
            &files.tokenizer_dir,
            &files.text_encoder_config,
            &files.text_encoder_weights,
            device,
            dtype,
            backends,
        )?;
        let config: ClipTextConfig = read_json(&second.config)?;
        config.validate().map_err(|e| anyhow!("{}: {e}", second.config.display()))?;
        let projection_dim = config
            .projection_dim
            .with_context(|| format!("{}: no projection_dim (CLIPTextModelWithProjection)", second.config.display()))?;
        let tokenizer_2 = ClipTokenizer::load(&second.tokenizer_dir)?
            .with_max_length(config.max_position_embeddings)
            .with_context(|| format!("{}: max_position_embeddings", second.config.display()))?;
        let vb = second.weights.var_builder(dtype, device)?;
        let load = || -> Result<_> {
            let model_2 = ClipTextTransformer::new(vb.clone(), &config, backends)?;
            let text_projection =
                candle_nn::linear_no_bias(config.hidden_size, projection_dim, vb.pp("text_projection"))?;
            Ok((model_2, text_projection))
        };
        let (model_2, text_projection) = load()
            .with_context(|| format!("loading the second text encoder from {}", second.weights.path().display()))?;
        Ok(Self {
            tokenizer: first.tokenizer,
            model: first.model,
            tokenizer_2,
            model_2,
            text_projection,
            hidden_size: first.hidden_size + config.hidden_size,
            projection_dim,
            device: device.clone(),
            dtype,
        })
    }
}

impl TextEncoder for SdxlTextEncoder {
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor> {
        Ok(self.encode_pooled(texts, on_warning)?.0)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn pooled_size(&self) -> Option<usize> {
        Some(self.projection_dim)
    }

    fn encode_pooled(
        &self,
        texts: &[(&str, &str)],
        on_warning: &mut dyn FnMut(String),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ids = token_ids(
            texts,
            "CLIP",
            self.tokenizer.max_length(),
            |t| self.tokenizer.encode(t),
            on_warning,
            &self.device,
        )?;
        // The same BPE truncates at the same place: one warning is enough.
        let ids_2 = token_ids(
            texts,
            "CLIP",
            self.tokenizer_2.max_length(),
            |t| self.tokenizer_2.encode(t),
            &mut |_| {},
            &self.device,
        )?;
        let (hidden, _) = self.model.forward_penultimate(&ids)?;
        let (hidden_2, last_2) = self.model_2.forward_penultimate(&ids_2)?;
        let eos = self.tokenizer_2.eos_id();
        let rows = ids_2
            .to_vec2::<u32>()?
            .iter()
            .enumerate()
            .map(|(row, ids)| {
                let position = ids.iter().position(|&id| id == eos).unwrap_or(ids.len() - 1);
                Ok(last_2.get(row)?.get(position)?.unsqueeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = self.text_projection.forward(&Tensor::cat(&rows, 0)?)?;
        let embeds = Tensor::cat(&[hidden.to_dtype(self.dtype)?, hidden_2.to_dtype(self.dtype)?], 2)?;
        Ok((embeds, Some(pooled.to_dtype(self.dtype)?)))
    }
}

// ---- the decoder ---------------------------------------------------------------------------------

/// The AutoencoderKL decoder (SD's `vae/`, LDM's `vqvae/`), with an f32 copy built on first need: half-precision VAEs can overflow
/// to inf/NaN (black images), and then the decode is redone in f32.
pub struct SdVae {
    pub vae: VaeDecoder,
    scaling: LatentScaling,
    vae_f32: std::sync::OnceLock<VaeDecoder>,
    weights: Weights,
    device: Device,
    dtype: DType,
}

/// How a pipeline undoes the latents' scaling before decoding: the two round differently in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentScaling {
    /// `latents / scaling_factor` (StableDiffusionPipeline).
    Divide,
    /// `1 / scaling_factor * latents` (LDMTextToImagePipeline).
    MultiplyByReciprocal,
}

impl SdVae {
    pub fn load(
        config: &Path,
        weights: &Weights,
        device: &Device,
        dtype: DType,
        backends: &Backends,
        scaling: LatentScaling,
    ) -> Result<Self> {
        let vae_config: VaeConfig = read_json(config)?;
        vae_config.validate().map_err(|e| anyhow!("{}: {e}", config.display()))?;
        let vae = VaeDecoder::new(weights.var_builder(dtype, device)?, vae_config, backends)
            .with_context(|| format!("loading the VAE from {}", weights.path().display()))?;
        let vae_f32 = std::sync::OnceLock::new();
        Ok(Self { vae, scaling, vae_f32, weights: weights.clone(), device: device.clone(), dtype })
    }

    /// The f32 copy of the decoder, built on first need.
    fn vae_f32(&self) -> Result<&VaeDecoder> {
        if let Some(vae) = self.vae_f32.get() {
            return Ok(vae);
        }
        let vb = self.weights.var_builder(DType::F32, &self.device)?;
        // Its own backends: the f32 ones of this device.
        let backends = Backends::choose(&self.device, DType::F32).map_err(|e| anyhow!(e))?;
        let vae = VaeDecoder::new(vb, self.vae.config.clone(), &backends)?;
        Ok(self.vae_f32.get_or_init(|| vae))
    }

    fn decode_with(&self, vae: &VaeDecoder, latents: &Tensor, tiled: bool) -> Result<Tensor> {
        let latents = match self.scaling {
            LatentScaling::Divide => {
                let factor = Tensor::new(vae.config.scaling_factor as f32, &self.device)?.to_dtype(latents.dtype())?;
                latents.broadcast_div(&factor)?
            }
            // torch: the Python float 1 / scaling_factor (a double) times the tensor, in its dtype.
            LatentScaling::MultiplyByReciprocal => (latents * (1.0 / vae.config.scaling_factor))?,
        };
        if tiled {
            let tiling = Tiling::of(&vae.config).map_err(|e| anyhow!("--vae-tiling: {e}"))?;
            return Ok(vae.decode_tiled(&latents, &tiling)?);
        }
        Ok(vae.decode(&latents)?)
    }
}

impl LatentDecoder for SdVae {
    fn scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    fn latent_channels(&self) -> usize {
        self.vae.config.latent_channels
    }

    /// As diffusers: decode(latents / scaling_factor), (x/2 + 0.5).clamp(0, 1), ×255 and round half to
    /// even (numpy's round), not truncate.
    fn untiled_peak_bytes(&self, latent_height: usize, latent_width: usize) -> Option<u64> {
        let tiling = Tiling::of(&self.vae.config).ok()?;
        tiling
            .applies(latent_height, latent_width)
            .then(|| self.vae.untiled_peak_bytes(latent_height, latent_width, self.dtype))
    }

    fn decode(&self, latents: &Tensor, tiled: bool, on_warning: &mut dyn FnMut(String)) -> Result<RgbImage> {
        let mut image = if self.dtype != DType::F32 && self.vae.config.force_upcast {
            // `force_upcast` (SDXL's VAE overflows in f16): diffusers decodes in f32, the weights (of the
            // same file) cast up and the latents too, before the division by scaling_factor.
            self.decode_with(self.vae_f32()?, &latents.to_dtype(DType::F32)?, tiled)?
        } else {
            self.decode_with(&self.vae, latents, tiled)?
        };
        if self.dtype != DType::F32 && image.dtype() != DType::F32 && !all_finite(&image)? {
            on_warning(format!("the VAE overflowed in {:?} (non-finite pixels); decoding again in f32", self.dtype));
            image = self.decode_with(self.vae_f32()?, &latents.to_dtype(DType::F32)?, tiled)?;
        }
        let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.to_dtype(DType::F32)?.squeeze(0)?;
        let (_, height, width) = image.dims3()?;
        let pixels: Vec<u8> = image
            .permute((1, 2, 0))? // (h, w, 3)
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect();
        RgbImage::from_raw(width as u32, height as u32, pixels).context("decoded image has an unexpected size")
    }
}

/// Whether every value is finite: the sum of squares is, exactly when no value is inf or NaN (or so
/// large that squaring overflows, which is just as broken for an image).
fn all_finite(xs: &Tensor) -> Result<bool> {
    Ok(xs.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?.is_finite())
}
