//! What a model is, from `model_index.json`: its family, the folders of its parts, its guidance rules.
//! Below the weights (which find a family's files) and the loaders in family.rs (which build its
//! networks from them).

use crate::text::read_json;
use anyhow::{bail, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline` (SD 1.x, 2.x): CLIP BPE tokenizer, CLIP text encoder, AutoencoderKL in `vae/`.
    StableDiffusion,
    /// `LDMTextToImagePipeline` (CompVis/ldm-text2im-large-256, the paper's second model): BERT
    /// WordPiece tokenizer, LDMBert in `bert/`, an AutoencoderKL in `vqvae/`.
    LatentDiffusion,
    /// `StableDiffusionXLPipeline` (SDXL base 1.0, SDXL-Turbo): two CLIP text encoders (penultimate
    /// hidden states side by side, the second's projected pooled output for the UNet's added
    /// embedding), AutoencoderKL in `vae/`.
    StableDiffusionXl,
}

/// Where a family keeps its parts, relative to the model folder.
#[derive(Debug, Clone, Copy)]
pub struct Folders {
    pub text_encoder: &'static str,
    pub tokenizer: &'static str,
    pub decoder: &'static str,
}

/// How a family's pipeline uses guidance and the unconditional text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// Whether `--negative-prompt` is the unconditional text (SD), or that text is always "" (LDM).
    pub negative_prompt: bool,
    /// The pipeline's default guidance scale.
    pub default_guidance: f64,
    /// Guidance runs (two UNet branches) for scales above 1 (SD) or for every scale but 1 (LDM).
    pub guide_below_one: bool,
}

impl Rules {
    /// Whether `guidance_scale` runs classifier-free guidance (else the conditional branch alone).
    pub fn guided(&self, guidance_scale: f64) -> bool {
        if self.guide_below_one {
            guidance_scale != 1.0
        } else {
            guidance_scale > 1.0
        }
    }
}

impl Family {
    /// From `model_index.json`; a folder without one (or a single file) is taken for Stable Diffusion.
    pub fn from_model_index(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Family::StableDiffusion) };
        let index: serde_json::Value = read_json(path)?;
        match index.get("_class_name").and_then(|v| v.as_str()) {
            None | Some("StableDiffusionPipeline") => Ok(Family::StableDiffusion),
            Some("LDMTextToImagePipeline") => Ok(Family::LatentDiffusion),
            Some("StableDiffusionXLPipeline") => Ok(Family::StableDiffusionXl),
            Some(other) => bail!(
                "{}: {other} models are not supported (sdscale runs StableDiffusionPipeline, \
                 StableDiffusionXLPipeline and LDMTextToImagePipeline models)",
                path.display()
            ),
        }
    }

    /// The diffusers pipeline class (`model_index.json`'s `_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Family::StableDiffusion => "StableDiffusionPipeline",
            Family::LatentDiffusion => "LDMTextToImagePipeline",
            Family::StableDiffusionXl => "StableDiffusionXLPipeline",
        }
    }

    /// `model_index.json`'s `force_zeros_for_empty_prompt`: SDXL's pipeline (default true) makes the
    /// unconditional embeddings zeros when no negative prompt is given; no other family has it.
    pub fn force_zeros_for_empty_prompt(model_index: Option<&Path>) -> Result<bool> {
        let Some(path) = model_index else { return Ok(false) };
        let index: serde_json::Value = read_json(path)?;
        if Self::from_model_index(Some(path))? != Family::StableDiffusionXl {
            return Ok(false);
        }
        Ok(index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true))
    }

    /// SDXL's second text encoder and tokenizer folders.
    pub fn second_text_encoder(self) -> Option<(&'static str, &'static str)> {
        match self {
            Family::StableDiffusionXl => Some(("text_encoder_2", "tokenizer_2")),
            _ => None,
        }
    }

    pub fn folders(self) -> Folders {
        match self {
            Family::StableDiffusion | Family::StableDiffusionXl => {
                Folders { text_encoder: "text_encoder", tokenizer: "tokenizer", decoder: "vae" }
            }
            Family::LatentDiffusion => Folders { text_encoder: "bert", tokenizer: "tokenizer", decoder: "vqvae" },
        }
    }

    /// The tokenizer's files, relative to its folder: (required, optional). A `tokenizer.json`, where a
    /// model has one, replaces them all.
    pub fn tokenizer_files(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            // The optional two decide the special tokens (SD 2.x pads with "!", SD 1.x with <|endoftext|>).
            Family::StableDiffusion | Family::StableDiffusionXl => {
                (&["vocab.json", "merges.txt"], &["special_tokens_map.json", "tokenizer_config.json"])
            }
            // bert-base-uncased's vocabulary; the configs say lower-case and name the special tokens.
            Family::LatentDiffusion => (&["vocab.txt"], &["tokenizer_config.json", "special_tokens_map.json"]),
        }
    }

    pub fn rules(self) -> Rules {
        match self {
            // diffusers pipeline_stable_diffusion.py: do_classifier_free_guidance = guidance_scale > 1.
            Family::StableDiffusion => Rules { negative_prompt: true, default_guidance: 7.5, guide_below_one: false },
            // pipeline_latent_diffusion.py: the unconditional text is "" and guidance runs when
            // guidance_scale != 1.0 (its default).
            Family::LatentDiffusion => Rules { negative_prompt: false, default_guidance: 1.0, guide_below_one: true },
            // pipeline_stable_diffusion_xl.py: guidance_scale 5.0, guided when > 1.
            Family::StableDiffusionXl => Rules { negative_prompt: true, default_guidance: 5.0, guide_below_one: false },
        }
    }
}
