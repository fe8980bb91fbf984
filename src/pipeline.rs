//! Text → image, as diffusers' `StableDiffusionPipeline.__call__` does it: encode the prompt, draw the
//! initial latents, denoise with classifier-free guidance and DDIM, decode with the VAE.
//!
//! Reference: diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py`. The models
//! are loaded once; `generate` can then run any number of images, sizes and attention modes.

use crate::attention::AttentionScale;
use crate::backend::Backends;
use crate::entropy::EntropyProbe;
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::unet::{UNet2DConditionModel, UNetConfig, UNetConfigFile};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::rng::{randn, TorchGenerator};
use crate::scheduler::{DdimConfig, DdimScheduler};
use crate::tokenizer::ClipTokenizer;
use crate::unet_step::{graphs_enabled, UNetStepper};
use crate::weights::{read_json, ModelFiles, Weights};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether every value is finite: the sum of squares is, exactly when no value is inf or NaN (or so
/// large that squaring overflows, which is just as broken for an image).
fn all_finite(xs: &Tensor) -> Result<bool> {
    Ok(xs.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// Everything one image depends on.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// Pixels; multiples of the VAE's scale factor (8).
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u32,
    pub attention: AttentionScale,
}

impl GenerateRequest {
    /// What images must share to run through the UNet together.
    pub fn batch_key(&self) -> (usize, usize, usize, AttentionScale, u64) {
        (self.width, self.height, self.steps, self.attention, self.guidance_scale.to_bits())
    }
}

/// `generate_batch` stopped because it was asked to (Ctrl-C); no image of the batch was finished.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// The size `resize` renders at before resizing to `width` × `height`: about the training pixel count
/// P with the target's aspect, each side 8·round(√(P·W/H)/8) (Jin et al. 2023's baseline), kept
/// within 64 … 4096.
pub fn resize_render_size(
    (width, height): (usize, usize),
    (train_width, train_height): (usize, usize),
) -> (usize, usize) {
    let pixels = (train_width * train_height) as f64;
    let side = |a: usize, b: usize| {
        let exact = (pixels * a as f64 / b as f64).sqrt();
        ((exact / 8.0).round() as usize * 8).clamp(64, 4096)
    };
    (side(width, height), side(height, width))
}

/// Resizes a rendered image to the requested size with Lanczos3 (`resize` mode's last step).
pub fn lanczos3(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    image::imageops::resize(image, width as u32, height as u32, image::imageops::FilterType::Lanczos3)
}

/// The training size (width, height) in pixels from the configs alone, without loading weights, so
/// output names that use `{width}` can be checked before any work.
pub fn training_size_of(files: &ModelFiles) -> Result<(usize, usize)> {
    let unet_file: UNetConfigFile = read_json(&files.unet_config)?;
    let unet_config = UNetConfig::from_file(unet_file).map_err(|e| anyhow!("{}: {e}", files.unet_config.display()))?;
    let vae_config: VaeConfig = read_json(&files.vae_config)?;
    vae_config.validate().map_err(|e| anyhow!("{}: {e}", files.vae_config.display()))?;
    let factor = 1 << (vae_config.block_out_channels.len() - 1);
    let (h, w) = unet_config.sample_size;
    Ok((w * factor, h * factor))
}

/// What `generate` reports while it runs; the caller decides how (or whether) to show it.
pub enum Event<'a> {
    Warning(String),
    Step { index: usize, total: usize, timestep: usize },
    Stage(&'a str, std::time::Duration),
}

pub struct Pipeline {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextTransformer,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    /// An f32 copy of the VAE decoder, built on first need: half-precision VAEs can overflow to
    /// inf/NaN (black images), and then the decode is redone in f32.
    vae_f32: std::sync::OnceLock<VaeDecoder>,
    vae_weights: Weights,
    scheduler_config: DdimConfig,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        // What computes each op kind, chosen once for every network of the model.
        let backends = Backends::choose(device, dtype).map_err(|e| anyhow!(e))?;
        if crate::profile::enabled() {
            eprintln!("sdscale: profile backends {backends}");
        }
        let tokenizer = ClipTokenizer::load(&files.tokenizer_dir)?;
        let scheduler_config = DdimConfig::load(&files.scheduler_config)?;

        let text_config: ClipTextConfig = read_json(&files.text_encoder_config)?;
        text_config.validate().map_err(|e| anyhow!("{}: {e}", files.text_encoder_config.display()))?;
        let text_encoder =
            ClipTextTransformer::new(files.text_encoder_weights.var_builder(dtype, device)?, &text_config, &backends)
                .with_context(|| {
                format!("loading the text encoder from {}", files.text_encoder_weights.path().display())
            })?;

        let unet_file: UNetConfigFile = read_json(&files.unet_config)?;
        let unet_config =
            UNetConfig::from_file(unet_file).map_err(|e| anyhow!("{}: {e}", files.unet_config.display()))?;
        ensure!(
            unet_config.cross_attention_dim == text_config.hidden_size,
            "{}: the UNet wants {}-wide text embeddings but the text encoder makes {}",
            files.unet_config.display(),
            unet_config.cross_attention_dim,
            text_config.hidden_size
        );
        let unet =
            UNet2DConditionModel::with_backends(files.unet_weights.var_builder(dtype, device)?, unet_config, &backends)
                .with_context(|| format!("loading the UNet from {}", files.unet_weights.path().display()))?;

        let vae_config: VaeConfig = read_json(&files.vae_config)?;
        vae_config.validate().map_err(|e| anyhow!("{}: {e}", files.vae_config.display()))?;
        ensure!(
            vae_config.latent_channels == unet.config.in_channels,
            "{}: the VAE has {} latent channels but the UNet takes {}",
            files.vae_config.display(),
            vae_config.latent_channels,
            unet.config.in_channels
        );
        let vae = VaeDecoder::new(files.vae_weights.var_builder(dtype, device)?, vae_config, &backends)
            .with_context(|| format!("loading the VAE from {}", files.vae_weights.path().display()))?;

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_f32: std::sync::OnceLock::new(),
            vae_weights: files.vae_weights.clone(),
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent pixel: 2^(VAE blocks − 1) = 8 for SD.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    /// The size the UNet was trained at, in pixels (width, height): 512×512 for SD 2.1-base.
    pub fn training_size(&self) -> (usize, usize) {
        let (h, w) = self.unet.config.sample_size;
        (w * self.vae_scale_factor(), h * self.vae_scale_factor())
    }

    /// The attention policy for a mode, with T derived from `train_size` (pixels, width × height).
    pub fn entropy_scale(&self, train_size: (usize, usize)) -> AttentionScale {
        AttentionScale::Entropy { train_latent: self.train_latent(train_size) }
    }

    /// A training size in pixels (width, height) as latent pixels (height, width), the policy's units.
    pub fn train_latent(&self, (width, height): (usize, usize)) -> (usize, usize) {
        let factor = self.vae_scale_factor();
        (height.div_ceil(factor), width.div_ceil(factor))
    }

    pub fn generate(&self, request: &GenerateRequest, on_event: &mut dyn FnMut(Event)) -> Result<RgbImage> {
        let never = AtomicBool::new(false);
        Ok(self.generate_batch(std::slice::from_ref(request), on_event, &never)?.remove(0))
    }

    /// Several images through the UNet together: a batch of B runs as one (2B, …) UNet call per step,
    /// laid out [negatives…, prompts…] as diffusers batches `num_images_per_prompt`. Every row is
    /// computed independently (GroupNorm and attention never mix rows), so each image equals the one
    /// `generate` makes alone, within float rounding. The requests must share size, steps, attention
    /// and guidance (`batch_key`). `cancel` is checked between steps: once set, the batch stops with
    /// [`Interrupted`] and nothing half-made is returned.
    pub fn generate_batch(
        &self,
        requests: &[GenerateRequest],
        on_event: &mut dyn FnMut(Event),
        cancel: &AtomicBool,
    ) -> Result<Vec<RgbImage>> {
        let latents = self.denoise_batch(requests, on_event, cancel, None)?;

        // 4. decode one image at a time: the VAE's memory grows fast with pixels, and it is cheap
        // next to the denoising loop.
        let started = std::time::Instant::now();
        let mut images = Vec::with_capacity(requests.len());
        for i in 0..requests.len() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            images.push(self.decode_latents(&latents.narrow(0, i, 1)?, on_event)?);
        }
        on_event(Event::Stage("VAE decode", started.elapsed()));
        Ok(images)
    }

    /// Steps 1–3 of [`Self::generate`] for one image: the final latents, not yet decoded. With a probe,
    /// every UNet self-attention layer reports the text-conditioned branch's attention statistics at the
    /// probe's steps (`sdscale entropy`); the latents are the same either way in f32 on the CPU (within
    /// rounding elsewhere: see [`crate::attention::scaled_dot_product_attention_measured`]).
    pub fn denoise(
        &self,
        request: &GenerateRequest,
        on_event: &mut dyn FnMut(Event),
        probe: Option<&EntropyProbe>,
    ) -> Result<Tensor> {
        let never = AtomicBool::new(false);
        self.denoise_batch(std::slice::from_ref(request), on_event, &never, probe)
    }

    /// Steps 1–3 for a batch: text embeddings, seeded noise, the guided DDIM loop.
    fn denoise_batch(
        &self,
        requests: &[GenerateRequest],
        on_event: &mut dyn FnMut(Event),
        cancel: &AtomicBool,
        probe: Option<&EntropyProbe>,
    ) -> Result<Tensor> {
        let first = requests.first().context("an empty batch")?;
        ensure!(
            requests.iter().all(|r| r.batch_key() == first.batch_key()),
            "a batch must share size, steps, attention and guidance"
        );
        let factor = self.vae_scale_factor();
        ensure!(
            first.width.is_multiple_of(factor) && first.height.is_multiple_of(factor),
            "width and height must be multiples of {factor}, got {}x{}",
            first.width,
            first.height
        );
        let batch = requests.len();
        // diffusers: guidance only when guidance_scale > 1; otherwise the conditional branch alone.
        let do_classifier_free_guidance = first.guidance_scale > 1.0;

        // 1. encode the prompts: [negatives…, positives…] when guiding, as diffusers concatenates them.
        let started = std::time::Instant::now();
        let mut negative_embeds = Vec::with_capacity(batch);
        let mut positive_embeds = Vec::with_capacity(batch);
        for request in requests {
            let embeds = self.encode_prompt(request, do_classifier_free_guidance, on_event)?; // (1 or 2, 77, hidden)
            if do_classifier_free_guidance {
                negative_embeds.push(embeds.narrow(0, 0, 1)?);
                positive_embeds.push(embeds.narrow(0, 1, 1)?);
            } else {
                positive_embeds.push(embeds);
            }
        }
        negative_embeds.extend(positive_embeds);
        let prompt_embeds = Tensor::cat(&negative_embeds, 0)?; // (2B or B, 77, hidden)
        self.device.synchronize()?;
        on_event(Event::Stage("text encoder", started.elapsed()));

        // 2. the initial noise, each image from its own seed (so it does not depend on its batch).
        let latents = requests
            .iter()
            .map(|r| self.prepare_latents(r.seed, r.width / factor, r.height / factor))
            .collect::<Result<Vec<_>>>()?;
        let mut latents = Tensor::cat(&latents, 0)?; // (B, 4, h, w)

        // 3. denoise
        let started = std::time::Instant::now();
        let scheduler = DdimScheduler::new(&self.scheduler_config, first.steps)?;
        let total = scheduler.timesteps.len();
        let mut unet = UNetStepper::new(&self.unet, &self.device, probe.is_none() && graphs_enabled(&self.device));
        for (index, &timestep) in scheduler.timesteps.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            let latent_model_input =
                if do_classifier_free_guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            // The probe measures the first text-conditioned entry: [negatives…, prompts…] under guidance.
            let probe =
                probe.and_then(|probe| probe.at_step(index, if do_classifier_free_guidance { batch } else { 0 }));
            let noise_pred = unet.step(
                &latent_model_input,
                timestep as f64,
                &prompt_embeds,
                first.attention,
                probe,
                &mut |warning| on_event(Event::Warning(warning)),
            )?;
            let noise_pred = if do_classifier_free_guidance {
                let noise_pred_uncond = noise_pred.narrow(0, 0, batch)?;
                let noise_pred_text = noise_pred.narrow(0, batch, batch)?;
                (&noise_pred_uncond + ((noise_pred_text - &noise_pred_uncond)? * first.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, timestep, &latents)?;
            on_event(Event::Step { index, total, timestep });
        }
        self.device.synchronize()?;
        on_event(Event::Stage("denoising", started.elapsed()));
        Ok(latents)
    }

    /// Text embeddings (b, 77, hidden) in the compute dtype; b = 2 (negative, positive) when guiding.
    pub fn encode_prompt(
        &self,
        request: &GenerateRequest,
        guide: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let mut texts = vec![("prompt", request.prompt.as_str())];
        if guide {
            texts.insert(0, ("negative prompt", request.negative_prompt.as_str()));
        }
        let mut ids = Vec::new();
        for (what, text) in &texts {
            let tokens = self.tokenizer.encode(text)?;
            if !tokens.truncated_text.is_empty() {
                on_event(Event::Warning(format!(
                    "the {what} is longer than CLIP's 77 tokens; dropped: \"{}\"",
                    tokens.truncated_text
                )));
            }
            ids.extend(tokens.ids);
        }
        let input_ids = Tensor::from_vec(ids, (texts.len(), crate::tokenizer::MAX_LENGTH), &self.device)?;
        Ok(self.text_encoder.forward(&input_ids)?.to_dtype(self.dtype)?)
    }

    /// `torch.randn((1, 4, h, w), generator=torch.Generator("cpu").manual_seed(seed))`, then moved to the
    /// compute device and dtype (DDIM's init_noise_sigma is 1).
    pub fn prepare_latents(&self, seed: u32, latent_width: usize, latent_height: usize) -> Result<Tensor> {
        let channels = self.unet.config.in_channels;
        let shape = (1, channels, latent_height, latent_width);
        let noise = randn(&mut TorchGenerator::new(seed), channels * latent_height * latent_width);
        Ok(Tensor::from_vec(noise, shape, &Device::Cpu)?.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Latents → 8-bit RGB, as diffusers: decode(latents / scaling_factor), (x/2 + 0.5).clamp(0, 1),
    /// ×255 and round half to even (numpy's round), not truncate.
    pub fn decode_latents(&self, latents: &Tensor, on_event: &mut dyn FnMut(Event)) -> Result<RgbImage> {
        let mut image = self.vae_decode(&self.vae, latents)?;
        if self.dtype != DType::F32 && !all_finite(&image)? {
            on_event(Event::Warning(format!(
                "the VAE overflowed in {:?} (non-finite pixels); decoding again in f32",
                self.dtype
            )));
            let vae_f32 = match self.vae_f32.get() {
                Some(vae) => vae,
                None => {
                    let vb = self.vae_weights.var_builder(DType::F32, &self.device)?;
                    // Its own backends: the f32 ones of this device.
                    let backends = Backends::choose(&self.device, DType::F32).map_err(|e| anyhow!(e))?;
                    let vae = VaeDecoder::new(vb, self.vae.config.clone(), &backends)?;
                    self.vae_f32.get_or_init(|| vae)
                }
            };
            image = self.vae_decode(vae_f32, &latents.to_dtype(DType::F32)?)?;
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

    fn vae_decode(&self, vae: &VaeDecoder, latents: &Tensor) -> Result<Tensor> {
        // A true division, as diffusers divides (not a multiplication by the reciprocal).
        let scaling = Tensor::new(vae.config.scaling_factor as f32, &self.device)?.to_dtype(latents.dtype())?;
        Ok(vae.decode(&latents.broadcast_div(&scaling)?)?)
    }

    /// Direct access for tests and benchmarks that check one network against its reference.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }
    pub fn text_encoder(&self) -> &ClipTextTransformer {
        &self.text_encoder
    }
    pub fn vae(&self) -> &VaeDecoder {
        &self.vae
    }
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }
    pub fn scheduler(&self, steps: usize) -> Result<DdimScheduler> {
        DdimScheduler::new(&self.scheduler_config, steps)
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_renders_near_the_training_pixel_count() {
        // 224² at 512² training: the training size itself.
        assert_eq!(resize_render_size((224, 224), (512, 512)), (512, 512));
        // 1024×512 (2:1): √(512²·2) = 724.1 → 728, √(512²/2) = 362.0 → 360.
        assert_eq!(resize_render_size((1024, 512), (512, 512)), (728, 360));
        assert_eq!(resize_render_size((192, 192), (128, 128)), (128, 128));
        // Extreme aspect ratios stay within the accepted sides.
        assert_eq!(resize_render_size((64, 4096), (128, 128)), (64, 1024));
    }
}
