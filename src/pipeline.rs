//! Text → image, as diffusers' `StableDiffusionPipeline.__call__` does it: encode the prompt, draw the
//! initial latents, denoise with classifier-free guidance and DDIM, decode with the VAE.
//!
//! Reference: diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py`. The models
//! are loaded once; `generate` can then run any number of images, sizes and attention modes.

use crate::attention::AttentionScale;
use crate::entropy::EntropyProbe;
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::unet::{UNet2DConditionModel, UNetConfig, UNetConfigFile};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::rng::{randn, TorchGenerator};
use crate::scheduler::{DdimConfig, DdimScheduler};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{read_json, var_builder, ModelFiles};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

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
    scheduler_config: DdimConfig,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let tokenizer = ClipTokenizer::load(&files.tokenizer_dir)?;
        let scheduler_config = DdimConfig::load(&files.scheduler_config)?;

        let text_config: ClipTextConfig = read_json(&files.text_encoder_config)?;
        let text_encoder =
            ClipTextTransformer::new(var_builder(&files.text_encoder_weights, dtype, device)?, &text_config)
                .with_context(|| format!("loading the text encoder from {}", files.text_encoder_weights.display()))?;

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
        let unet = UNet2DConditionModel::new(var_builder(&files.unet_weights, dtype, device)?, unet_config)
            .with_context(|| format!("loading the UNet from {}", files.unet_weights.display()))?;

        let vae_config: VaeConfig = read_json(&files.vae_config)?;
        vae_config.validate().map_err(|e| anyhow!("{}: {e}", files.vae_config.display()))?;
        ensure!(
            vae_config.latent_channels == unet.config.in_channels,
            "{}: the VAE has {} latent channels but the UNet takes {}",
            files.vae_config.display(),
            vae_config.latent_channels,
            unet.config.in_channels
        );
        let vae = VaeDecoder::new(var_builder(&files.vae_weights, dtype, device)?, vae_config)
            .with_context(|| format!("loading the VAE from {}", files.vae_weights.display()))?;

        Ok(Self { tokenizer, text_encoder, unet, vae, scheduler_config, device: device.clone(), dtype })
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
        let latents = self.denoise(request, on_event, None)?;

        // 4. decode
        let started = std::time::Instant::now();
        let image = self.decode_latents(&latents)?;
        on_event(Event::Stage("VAE decode", started.elapsed()));
        Ok(image)
    }

    /// Steps 1–3 of [`Self::generate`]: the final latents, not yet decoded. With a probe, every UNet
    /// self-attention layer reports the text-conditioned branch's attention statistics at the probe's
    /// steps (`sdscale entropy`); the latents are the same either way.
    pub fn denoise(
        &self,
        request: &GenerateRequest,
        on_event: &mut dyn FnMut(Event),
        probe: Option<&EntropyProbe>,
    ) -> Result<Tensor> {
        let factor = self.vae_scale_factor();
        ensure!(
            request.width.is_multiple_of(factor) && request.height.is_multiple_of(factor),
            "width and height must be multiples of {factor}, got {}x{}",
            request.width,
            request.height
        );
        // diffusers: guidance only when guidance_scale > 1; otherwise the conditional branch alone.
        let do_classifier_free_guidance = request.guidance_scale > 1.0;

        // 1. encode the prompt: [negative, positive] when guiding, as diffusers concatenates them.
        let started = std::time::Instant::now();
        let prompt_embeds = self.encode_prompt(request, do_classifier_free_guidance, on_event)?;
        on_event(Event::Stage("text encoder", started.elapsed()));

        // 2. the initial noise, always drawn on the CPU in f32 so a seed means the same on every device.
        let latents = self.prepare_latents(request.seed, request.width / factor, request.height / factor)?;

        // 3. denoise
        let started = std::time::Instant::now();
        let scheduler = DdimScheduler::new(&self.scheduler_config, request.steps)?;
        let mut latents = latents;
        let total = scheduler.timesteps.len();
        for (index, &timestep) in scheduler.timesteps.iter().enumerate() {
            let latent_model_input =
                if do_classifier_free_guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            // The text-conditioned latents are the batch's second half under guidance, the whole batch without.
            let probe = probe.and_then(|probe| probe.at_step(index, usize::from(do_classifier_free_guidance)));
            let noise_pred = self.unet.forward_probed(
                &latent_model_input,
                timestep as f64,
                &prompt_embeds,
                request.attention,
                probe,
            )?;
            let noise_pred = if do_classifier_free_guidance {
                let noise_pred_uncond = noise_pred.narrow(0, 0, 1)?;
                let noise_pred_text = noise_pred.narrow(0, 1, 1)?;
                (&noise_pred_uncond + ((noise_pred_text - &noise_pred_uncond)? * request.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, timestep, &latents)?;
            on_event(Event::Step { index, total, timestep });
        }
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
    pub fn decode_latents(&self, latents: &Tensor) -> Result<RgbImage> {
        let scaling = Tensor::new(self.vae.config.scaling_factor as f32, &self.device)?.to_dtype(self.dtype)?;
        let image = self.vae.decode(&latents.broadcast_div(&scaling)?)?;
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
