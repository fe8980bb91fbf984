//! Model families: which tokenizer, text encoder and latent decoder surround the UNet, and in which
//! folders they live. The family comes from `model_index.json`'s `_class_name`; the pipeline only sees
//! the [`TextEncoder`] and [`LatentDecoder`] interfaces, so another family (LDM-256's BERT and
//! `vqvae/`, say) is one more variant here and two more implementations, nothing else.

use crate::backend::Backends;
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{read_json, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline`: CLIP BPE tokenizer, CLIP text encoder, AutoencoderKL in `vae/`.
    StableDiffusion,
}

/// Where a family keeps its parts, relative to the model folder.
#[derive(Debug, Clone, Copy)]
pub struct Folders {
    pub text_encoder: &'static str,
    pub tokenizer: &'static str,
    pub decoder: &'static str,
}

impl Family {
    /// From `model_index.json`; a folder without one (or a single file) is taken for Stable Diffusion.
    pub fn from_model_index(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Family::StableDiffusion) };
        let index: serde_json::Value = read_json(path)?;
        match index.get("_class_name").and_then(|v| v.as_str()) {
            None | Some("StableDiffusionPipeline") => Ok(Family::StableDiffusion),
            Some(other) => bail!(
                "{}: {other} models are not supported (sdscale runs StableDiffusionPipeline models)",
                path.display()
            ),
        }
    }

    pub fn folders(self) -> Folders {
        match self {
            Family::StableDiffusion => Folders { text_encoder: "text_encoder", tokenizer: "tokenizer", decoder: "vae" },
        }
    }
}

/// Prompts → the embeddings the UNet's cross-attention reads.
pub trait TextEncoder: Send + Sync {
    /// Embeddings (texts, tokens, hidden) in the compute dtype; `on_warning` hears about truncation.
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor>;
    /// Width of each embedding: the UNet's `cross_attention_dim` must match it.
    fn hidden_size(&self) -> usize;
}

/// Latents → pixels.
pub trait LatentDecoder: Send + Sync {
    /// Pixels per latent pixel (8 for SD's VAE).
    fn scale_factor(&self) -> usize;
    fn latent_channels(&self) -> usize;
    /// One image's final latents (1, c, h, w) → 8-bit RGB.
    fn decode(&self, latents: &Tensor, on_warning: &mut dyn FnMut(String)) -> Result<RgbImage>;
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

impl TextEncoder for ClipTextEncoder {
    fn encode(&self, texts: &[(&str, &str)], on_warning: &mut dyn FnMut(String)) -> Result<Tensor> {
        let mut ids = Vec::new();
        for (what, text) in texts {
            let tokens = self.tokenizer.encode(text)?;
            if !tokens.truncated_text.is_empty() {
                on_warning(format!(
                    "the {what} is longer than CLIP's {} tokens; dropped: \"{}\"",
                    self.tokenizer.max_length(),
                    tokens.truncated_text
                ));
            }
            ids.extend(tokens.ids);
        }
        let input_ids = Tensor::from_vec(ids, (texts.len(), self.tokenizer.max_length()), &self.device)?;
        Ok(self.model.forward(&input_ids)?.to_dtype(self.dtype)?)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

/// The AutoencoderKL decoder, with an f32 copy built on first need: half-precision VAEs can overflow
/// to inf/NaN (black images), and then the decode is redone in f32.
pub struct SdVae {
    pub vae: VaeDecoder,
    vae_f32: std::sync::OnceLock<VaeDecoder>,
    weights: Weights,
    device: Device,
    dtype: DType,
}

impl SdVae {
    pub fn load(config: &Path, weights: &Weights, device: &Device, dtype: DType, backends: &Backends) -> Result<Self> {
        let vae_config: VaeConfig = read_json(config)?;
        vae_config.validate().map_err(|e| anyhow!("{}: {e}", config.display()))?;
        let vae = VaeDecoder::new(weights.var_builder(dtype, device)?, vae_config, backends)
            .with_context(|| format!("loading the VAE from {}", weights.path().display()))?;
        Ok(Self { vae, vae_f32: std::sync::OnceLock::new(), weights: weights.clone(), device: device.clone(), dtype })
    }

    fn decode_with(&self, vae: &VaeDecoder, latents: &Tensor) -> Result<Tensor> {
        // A true division, as diffusers divides (not a multiplication by the reciprocal).
        let scaling = Tensor::new(vae.config.scaling_factor as f32, &self.device)?.to_dtype(latents.dtype())?;
        Ok(vae.decode(&latents.broadcast_div(&scaling)?)?)
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
    fn decode(&self, latents: &Tensor, on_warning: &mut dyn FnMut(String)) -> Result<RgbImage> {
        let mut image = self.decode_with(&self.vae, latents)?;
        if self.dtype != DType::F32 && !all_finite(&image)? {
            on_warning(format!("the VAE overflowed in {:?} (non-finite pixels); decoding again in f32", self.dtype));
            let vae_f32 = match self.vae_f32.get() {
                Some(vae) => vae,
                None => {
                    let vb = self.weights.var_builder(DType::F32, &self.device)?;
                    // Its own backends: the f32 ones of this device.
                    let backends = Backends::choose(&self.device, DType::F32).map_err(|e| anyhow!(e))?;
                    let vae = VaeDecoder::new(vb, self.vae.config.clone(), &backends)?;
                    self.vae_f32.get_or_init(|| vae)
                }
            };
            image = self.decode_with(vae_f32, &latents.to_dtype(DType::F32)?)?;
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
