//! CLIP score as torchmetrics' `CLIPScore` computes it (torchmetrics 1.9.0,
//! functional/multimodal/clip_score.py and multimodal/clip_score.py):
//!
//! ```text
//! score = max(mean over images of 100 · cos(E_image, E_text), 0)
//! ```
//!
//! with E the projected embeddings of a Hugging Face `CLIPModel` (default openai/clip-vit-large-patch14).
//! Note where the clamp sits: on the mean (`compute`), not on each image, so one negative cosine pulls
//! the mean down.
//!
//! - Images: `CLIPImageProcessor` with PIL (transformers 4's processor; transformers 5's
//!   `CLIPImageProcessorPil`): shortest side to `size` with Pillow's bicubic (resample.rs), centre crop
//!   `crop_size`, × rescale_factor, (x − mean) / std, all from preprocessor_config.json.
//! - Text: `CLIPProcessor(text=…, padding=True)` without truncation, then the ids cut at
//!   `max_position_embeddings` (77): a long prompt loses its end token, as in torchmetrics.
//! - The networks are candle-transformers' CLIP text and vision transformers (quick_gelu, LayerNorm
//!   ε 1e-5, both checked against config.json) plus the two projections. The text embedding is pooled
//!   as transformers' `CLIPTextTransformer` does: at the first `eos_token_id`, or — for configs with the
//!   legacy `eos_token_id: 2`, which openai's have — at the largest id.

use super::resample::resize_bicubic;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use image::RgbImage;
use serde::Deserialize;
use std::path::Path;

// ---- config.json ---------------------------------------------------------------------------------

/// transformers' `CLIPConfig`, the keys sdscale reads (defaults as transformers').
#[derive(Debug, Deserialize)]
struct ClipConfigFile {
    text_config: TextConfigFile,
    vision_config: VisionConfigFile,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
}

#[derive(Debug, Deserialize)]
struct TextConfigFile {
    #[serde(default = "text_defaults::vocab_size")]
    vocab_size: usize,
    #[serde(default = "text_defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "text_defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "default_layers")]
    num_hidden_layers: usize,
    #[serde(default = "text_defaults::heads")]
    num_attention_heads: usize,
    #[serde(default = "text_defaults::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "text_defaults::eos_token_id")]
    eos_token_id: u32,
}

#[derive(Debug, Deserialize)]
struct VisionConfigFile {
    #[serde(default = "vision_defaults::hidden_size")]
    hidden_size: usize,
    #[serde(default = "vision_defaults::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "default_layers")]
    num_hidden_layers: usize,
    #[serde(default = "vision_defaults::heads")]
    num_attention_heads: usize,
    #[serde(default = "vision_defaults::num_channels")]
    num_channels: usize,
    #[serde(default = "vision_defaults::image_size")]
    image_size: usize,
    #[serde(default = "vision_defaults::patch_size")]
    patch_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn default_projection_dim() -> usize {
    512
}
fn default_layers() -> usize {
    12
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

mod text_defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn eos_token_id() -> u32 {
        49407
    }
}

mod vision_defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
}

// ---- preprocessor_config.json --------------------------------------------------------------------

/// `size` / `crop_size` as old (an int) and new (a dict) configs write them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Side(u32),
    Dict { shortest_edge: Option<u32>, height: Option<u32>, width: Option<u32> },
}

#[derive(Debug, Deserialize)]
struct PreprocessorFile {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeSpec>,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "openai_mean")]
    image_mean: [f64; 3],
    #[serde(default = "openai_std")]
    image_std: [f64; 3],
}

fn yes() -> bool {
    true
}
/// PIL.Image.BICUBIC
fn bicubic() -> u32 {
    3
}
fn rescale() -> f64 {
    1.0 / 255.0
}
fn openai_mean() -> [f64; 3] {
    [0.48145466, 0.4578275, 0.40821073]
}
fn openai_std() -> [f64; 3] {
    [0.26862954, 0.26130258, 0.27577711]
}

/// CLIPImageProcessor's steps, resolved.
#[derive(Debug, Clone)]
pub struct Preprocess {
    /// Resize so the shortest side is this (None: no resize).
    shortest_edge: Option<u32>,
    /// Centre crop to (height, width) (None: no crop).
    crop: Option<(u32, u32)>,
    rescale_factor: f64,
    normalize: Option<([f64; 3], [f64; 3])>,
}

impl Preprocess {
    fn from_file(file: PreprocessorFile, path: &Path) -> Result<Self> {
        let shortest_edge = match (file.do_resize, file.size) {
            (false, _) => None,
            (true, Some(SizeSpec::Side(side))) => Some(side),
            (true, Some(SizeSpec::Dict { shortest_edge: Some(side), .. })) => Some(side),
            (true, None) => Some(224),
            (true, Some(other)) => {
                bail!("{}: size {other:?} is not supported (sdscale resizes by shortest_edge)", path.display())
            }
        };
        if shortest_edge.is_some() && file.resample != bicubic() {
            bail!(
                "{}: resample {} is not supported (sdscale implements PIL bicubic, 3)",
                path.display(),
                file.resample
            );
        }
        let crop = match (file.do_center_crop, file.crop_size) {
            (false, _) => None,
            (true, Some(SizeSpec::Side(side))) => Some((side, side)),
            (true, Some(SizeSpec::Dict { height: Some(h), width: Some(w), .. })) => Some((h, w)),
            (true, None) => Some((224, 224)),
            (true, Some(other)) => bail!("{}: crop_size {other:?} is not supported", path.display()),
        };
        Ok(Self {
            shortest_edge,
            crop,
            rescale_factor: if file.do_rescale { file.rescale_factor } else { 1.0 },
            normalize: file.do_normalize.then_some((file.image_mean, file.image_std)),
        })
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
    /// `side`, the long one `int(side * long / short)`.
    fn resized_dimensions(width: u32, height: u32, side: u32) -> (u32, u32) {
        let (short, long) = if width <= height { (width, height) } else { (height, width) };
        let new_long = (side as f64 * long as f64 / short as f64) as u32;
        if width <= height {
            (side, new_long)
        } else {
            (new_long, side)
        }
    }

    /// `pixel_values` (3, h, w) of one image, f32.
    pub fn pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        let mut image = image.clone();
        if let Some(side) = self.shortest_edge {
            let (width, height) = Self::resized_dimensions(image.width(), image.height(), side);
            image = resize_bicubic(&image, width, height);
        }
        if let Some((crop_h, crop_w)) = self.crop {
            image = center_crop(&image, crop_h, crop_w);
        }
        let (w, h) = image.dimensions();
        let mut values = vec![0f32; 3 * (w * h) as usize];
        for (x, y, pixel) in image.enumerate_pixels() {
            for c in 0..3 {
                let mut v = pixel[c] as f64 * self.rescale_factor;
                if let Some((mean, std)) = self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                values[(c * (h as usize) + y as usize) * w as usize + x as usize] = v as f32;
            }
        }
        values
    }
}

/// transformers' `center_crop`: top = (h − crop_h) // 2, left likewise; zero padding where the image is
/// smaller than the crop.
fn center_crop(image: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let top = (h as i64 - crop_h as i64).div_euclid(2);
    let left = (w as i64 - crop_w as i64).div_euclid(2);
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && (sx as u32) < w && (sy as u32) < h {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

// ---- the model -----------------------------------------------------------------------------------

/// A Hugging Face CLIP checkpoint folder, loaded for scoring.
pub struct ClipScorer {
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    text_projection: candle_nn::Linear,
    visual_projection: candle_nn::Linear,
    tokenizer: ClipTokenizer,
    preprocess: Preprocess,
    /// Text context length: ids past it are cut off.
    max_position_embeddings: usize,
    eos_token_id: u32,
    image_size: usize,
    device: Device,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl ClipScorer {
    /// Loads `dir`: config.json, model.safetensors, preprocessor_config.json and the tokenizer files
    /// (tokenizer.json, or vocab.json + merges.txt).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: ClipConfigFile = read_json(&config_path)?;
        let (text, vision) = (&config.text_config, &config.vision_config);
        for (what, act, eps) in
            [("text", &text.hidden_act, text.layer_norm_eps), ("vision", &vision.hidden_act, vision.layer_norm_eps)]
        {
            // candle-transformers' CLIP implements these two only.
            ensure!(
                act == "quick_gelu",
                "{}: {what} hidden_act {act:?} is not supported (quick_gelu only)",
                config_path.display()
            );
            ensure!(eps == 1e-5, "{}: {what} layer_norm_eps {eps} is not supported (1e-5 only)", config_path.display());
        }
        let text_config = ClipTextConfig {
            vocab_size: text.vocab_size,
            embed_dim: text.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: text.intermediate_size,
            max_position_embeddings: text.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: text.num_hidden_layers,
            num_attention_heads: text.num_attention_heads,
            projection_dim: config.projection_dim,
        };
        let vision_config = ClipVisionConfig {
            embed_dim: vision.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: vision.intermediate_size,
            num_hidden_layers: vision.num_hidden_layers,
            num_attention_heads: vision.num_attention_heads,
            projection_dim: config.projection_dim,
            num_channels: vision.num_channels,
            image_size: vision.image_size,
            patch_size: vision.patch_size,
        };

        let weights = dir.join("model.safetensors");
        ensure!(weights.is_file(), "{} is missing (the CLIP folder needs model.safetensors)", weights.display());
        // SAFETY: the file is memory-mapped read-only; sdscale does not modify it while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("loading {}", weights.display()))?;
        // candle draws a random class embedding when the tensor is missing: refuse instead.
        let class_embedding = "vision_model.embeddings.class_embedding";
        ensure!(vb.contains_tensor(class_embedding), "{}: no tensor {class_embedding}", weights.display());
        let build = || -> candle_core::Result<_> {
            Ok((
                ClipTextTransformer::new(vb.pp("text_model"), &text_config)?,
                ClipVisionTransformer::new(vb.pp("vision_model"), &vision_config)?,
                candle_nn::linear_no_bias(text.hidden_size, config.projection_dim, vb.pp("text_projection"))?,
                candle_nn::linear_no_bias(vision.hidden_size, config.projection_dim, vb.pp("visual_projection"))?,
            ))
        };
        let (text_model, vision_model, text_projection, visual_projection) =
            build().with_context(|| format!("loading CLIP from {}", weights.display()))?;

        let preprocessor_path = dir.join("preprocessor_config.json");
        let preprocess = Preprocess::from_file(read_json(&preprocessor_path)?, &preprocessor_path)?;
        // One id more than the context, so a prompt that fills it keeps its body and loses the end
        // token, as cutting transformers' unpadded ids does.
        let tokenizer = ClipTokenizer::load(dir)?.with_max_length(text.max_position_embeddings + 1)?;
        Ok(Self {
            text_model,
            vision_model,
            text_projection,
            visual_projection,
            tokenizer,
            preprocess,
            max_position_embeddings: text.max_position_embeddings,
            eos_token_id: text.eos_token_id,
            image_size: vision.image_size,
            device: device.clone(),
        })
    }

    /// The ids the text model sees: transformers' tokenization, cut at the context length, and up to
    /// the first end token (later positions are padding, which the causal mask keeps from it).
    pub fn input_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(prompt)?.ids;
        ids.truncate(self.max_position_embeddings);
        let eos = self.tokenizer.eos_id();
        if let Some(end) = ids.iter().position(|&id| id == eos) {
            ids.truncate(end + 1);
        }
        Ok(ids)
    }

    /// Where transformers' `CLIPTextTransformer` pools (modeling_clip.py, "eos_token_id == 2" branch):
    /// the first largest id for legacy configs, else the first `eos_token_id` (position 0 if none).
    fn pooled_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            ids.iter().position(|&id| id == self.eos_token_id).unwrap_or(0)
        }
    }

    /// `get_text_features`: the projected text embedding, f32.
    pub fn text_features(&self, prompt: &str) -> Result<Vec<f32>> {
        let ids = self.input_ids(prompt)?;
        let position = self.pooled_position(&ids);
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?; // (1, n)
        let hidden = self.text_model.forward_with_mask(&input, usize::MAX)?; // (1, n, hidden)
        let pooled = hidden.narrow(1, position, 1)?.squeeze(1)?; // (1, hidden)
        Ok(self.text_projection.forward(&pooled)?.squeeze(0)?.to_vec1()?)
    }

    /// `pixel_values` of one image, (3, h, w) row-major.
    pub fn pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        self.preprocess.pixel_values(image)
    }

    /// `get_image_features` of a batch: one projected embedding per image.
    pub fn image_features(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let size = self.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * size * size);
        for image in images {
            let values = self.pixel_values(image);
            ensure!(
                values.len() == 3 * size * size,
                "preprocessing gives {} values per image where the vision model wants 3×{size}×{size}",
                values.len()
            );
            pixels.extend(values);
        }
        let pixels = Tensor::from_vec(pixels, (images.len(), 3, size, size), &self.device)?;
        let pooled = self.vision_model.forward(&pixels)?; // (b, hidden)
        Ok(self.visual_projection.forward(&pooled)?.to_vec2()?)
    }
}

/// 100 · cos(a, b), in f64.
pub fn scaled_cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    100.0 * dot / (norm(a) * norm(b))
}

/// `CLIPScore.compute()`: the mean of the per-image scores, clamped at 0 (None for no images).
pub fn clip_score(per_image: &[f64]) -> Option<f64> {
    (!per_image.is_empty()).then(|| (per_image.iter().sum::<f64>() / per_image.len() as f64).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_the_aspect_and_truncates_as_python_int() {
        assert_eq!(Preprocess::resized_dimensions(512, 512, 224), (224, 224));
        assert_eq!(Preprocess::resized_dimensions(300, 200, 224), (336, 224));
        // 224 * 80 / 48 = 373.33 → 373
        assert_eq!(Preprocess::resized_dimensions(48, 80, 224), (224, 373));
    }

    #[test]
    fn the_clamp_applies_to_the_mean_not_to_each_image() {
        assert_eq!(clip_score(&[30.0, -10.0]), Some(10.0));
        assert_eq!(clip_score(&[-30.0, 10.0]), Some(0.0));
        assert_eq!(clip_score(&[]), None);
    }

    #[test]
    fn old_and_new_preprocessor_configs_read_alike() {
        let old: PreprocessorFile = serde_json::from_str(r#"{"size": 224, "crop_size": 224, "resample": 3}"#).unwrap();
        let new: PreprocessorFile =
            serde_json::from_str(r#"{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}"#)
                .unwrap();
        let (old, new) =
            (Preprocess::from_file(old, Path::new("a")).unwrap(), Preprocess::from_file(new, Path::new("b")).unwrap());
        assert_eq!((old.shortest_edge, old.crop), (Some(224), Some((224, 224))));
        assert_eq!((new.shortest_edge, new.crop), (Some(224), Some((224, 224))));
        let bilinear: PreprocessorFile = serde_json::from_str(r#"{"resample": 2}"#).unwrap();
        let err = Preprocess::from_file(bilinear, Path::new("c")).unwrap_err().to_string();
        assert!(err.contains("resample 2"), "{err}");
    }
}
