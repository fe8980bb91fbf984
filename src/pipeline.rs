//! Text → image, as diffusers' `StableDiffusionPipeline.__call__` does it, in four stages that read top
//! to bottom in [`Pipeline::denoise_batch`] and [`Pipeline::generate_batch`]: encode the prompts,
//! prepare the seeded latents, the denoising loop (each step asks the plan's [`Denoiser`] for the next
//! latents), decode.
//!
//! Reference: diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py`. The models
//! are loaded once; any number of images, sizes and modes can then be rendered.

use crate::attention::{AttentionObserver, AttentionScale};
use crate::backend::Backends;
use crate::entropy::EntropyProbe;
use crate::family::{self, LatentDecoder, Rules, TextEncoder};
use crate::hires::{StepContext, Structure, StructureState, UNetPlan};
use crate::mode::{Denoiser, RenderPlan, Views, Window};
use crate::models::unet::UNet2DConditionModel;
use crate::rng::{randn, TorchGenerator};
use crate::sampler::{DdimScheduler, Sampler, SamplerSpec, SchedulerConfig};
use crate::size::{PixelSize, TrainingSize};
use crate::unet_step::UNetStepper;
use crate::weights::ModelFiles;
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use std::sync::atomic::{AtomicBool, Ordering};

/// Everything one image depends on.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None`: not given. The same as "" except for SDXL (`force_zeros_for_empty_prompt`), whose
    /// unconditional embeddings are then zeros instead of the encoded "".
    pub negative_prompt: Option<String>,
    /// What the mode decided: render size, attention scale, denoiser, resize.
    pub plan: RenderPlan,
    pub steps: usize,
    /// The sampler, resolved against the model's scheduler config.
    pub sampler: SamplerSpec,
    pub guidance_scale: f64,
    pub seed: u32,
    /// Decode in tiles (diffusers' `vae.enable_tiling()`): `--vae-tiling`, or the whole decode would
    /// not fit in memory.
    pub vae_tiling: bool,
}

/// What images must share to run through the UNet together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchKey {
    render: PixelSize,
    attention: AttentionScale,
    structure: Structure,
    denoiser: Denoiser,
    steps: usize,
    sampler: SamplerSpec,
    guidance_bits: u64,
}

impl BatchKey {
    pub fn new(plan: &RenderPlan, steps: usize, sampler: SamplerSpec, guidance_scale: f64) -> Self {
        BatchKey {
            render: plan.render,
            attention: plan.attention,
            structure: plan.structure,
            denoiser: plan.denoiser,
            steps,
            sampler,
            guidance_bits: guidance_scale.to_bits(),
        }
    }
}

impl GenerateRequest {
    pub fn batch_key(&self) -> BatchKey {
        BatchKey::new(&self.plan, self.steps, self.sampler, self.guidance_scale)
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

/// Resizes a rendered image to the requested size with Lanczos3 (`resize` mode's last step).
pub fn lanczos3(image: &RgbImage, size: PixelSize) -> RgbImage {
    image::imageops::resize(image, size.width as u32, size.height as u32, image::imageops::FilterType::Lanczos3)
}

/// The training size from the configs alone, without loading weights, so outputs can be planned and
/// checked before any slow work. The one place it is computed: the UNet's `sample_size` (latents) times
/// the decoder's scale factor.
pub fn training_size_of(files: &ModelFiles) -> Result<TrainingSize> {
    let unet_config = files.family.unet_config(&files.unet_config)?;
    let factor = family::decoder_scale_factor(&files.vae_config)?;
    let (h, w) = unet_config.sample_size;
    Ok(TrainingSize { pixels: PixelSize::new(w * factor, h * factor), vae_scale_factor: factor })
}

/// What `generate` reports while it runs; the caller decides how (or whether) to show it.
pub enum Event<'a> {
    Warning(String),
    Step { index: usize, total: usize, timestep: f64 },
    Stage(&'a str, std::time::Duration),
}

pub struct Pipeline {
    text_encoder: Box<dyn TextEncoder>,
    unet: UNet2DConditionModel,
    decoder: Box<dyn LatentDecoder>,
    scheduler_config: SchedulerConfig,
    /// The family's guidance and unconditional-text rules.
    rules: Rules,
    /// SDXL: no negative prompt given means zero unconditional embeddings (model_index.json).
    force_zeros_for_empty_prompt: bool,
    /// What metadata calls the model ("SD 1.x", "SD 2.x v-prediction", …).
    family_name: String,
    training: TrainingSize,
    /// The kernels chosen at load; the session reads whether to capture CUDA graphs from it.
    backends: Backends,
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
        let scheduler_config = SchedulerConfig::load(&files.scheduler_config)?;
        let training = training_size_of(files)?;
        let family = files.family;
        let text_encoder = family.load_text_encoder(files, device, dtype, &backends)?;
        let decoder = family.load_decoder(files, device, dtype, &backends)?;
        let unet_config = family.unet_config(&files.unet_config)?;
        ensure!(
            unet_config.cross_attention_dim == text_encoder.hidden_size(),
            "{}: the UNet wants {}-wide text embeddings but the text encoder makes {}",
            files.unet_config.display(),
            unet_config.cross_attention_dim,
            text_encoder.hidden_size()
        );
        ensure!(
            decoder.latent_channels() == unet_config.in_channels,
            "{}: the VAE has {} latent channels but the UNet takes {}",
            files.vae_config.display(),
            decoder.latent_channels(),
            unet_config.in_channels
        );
        // SDXL: the added embedding reads the pooled text and 6 time ids; nothing else may feed it.
        let pooled_width = unet_config.text_time.map(|(time_dim, input_dim)| input_dim - 6 * time_dim);
        ensure!(
            pooled_width == text_encoder.pooled_size(),
            "{}: the UNet's added embedding wants {} pooled text embeddings but the text encoders make {}",
            files.unet_config.display(),
            pooled_width.map_or("no".to_string(), |w| format!("{w}-wide")),
            text_encoder.pooled_size().map_or("none".to_string(), |w| format!("{w}-wide ones")),
        );
        let unet =
            UNet2DConditionModel::with_backends(files.unet_weights.var_builder(dtype, device)?, unet_config, &backends)
                .with_context(|| format!("loading the UNet from {}", files.unet_weights.path().display()))?;

        Ok(Self {
            text_encoder,
            unet,
            decoder,
            scheduler_config,
            rules: family.rules(),
            force_zeros_for_empty_prompt: files.force_zeros_for_empty_prompt,
            family_name: family.describe(files)?,
            training,
            backends,
            device: device.clone(),
            dtype,
        })
    }

    /// What metadata calls the model: its family, told apart by its configs ("SD 1.x", "SD 2.x
    /// v-prediction", "LDM text2im").
    pub fn family_name(&self) -> &str {
        &self.family_name
    }

    /// SDXL's `force_zeros_for_empty_prompt`: whether "no negative prompt" differs from "".
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// Whether a request runs classifier-free guidance, by the family's rule.
    fn guided(&self, request: &GenerateRequest) -> bool {
        self.rules.guided(request.guidance_scale)
    }

    /// The size the model was trained at (from its configs).
    pub fn training(&self) -> TrainingSize {
        self.training
    }

    /// A rendering session: per-run state (on CUDA, the captured graph of the UNet step) lives as long
    /// as the session, so every batch of a run reuses it.
    pub fn session(&self) -> Session<'_> {
        Session {
            pipeline: self,
            stepper: UNetStepper::new(&self.device, self.backends.cuda_graph),
            view_batch: 1,
            eta: 0.0,
        }
    }

    /// Stages 1–3 for one image, in a session of its own: the final latents, not yet decoded. With a
    /// probe, every UNet self-attention layer reports the text-conditioned branch's attention statistics
    /// at the probe's steps (`sdscale entropy`); the latents are the same either way in f32 on the CPU
    /// (within rounding elsewhere: see [`crate::attention::scaled_dot_product_attention_measured`]).
    pub fn denoise(
        &self,
        request: &GenerateRequest,
        on_event: &mut dyn FnMut(Event),
        probe: Option<&EntropyProbe>,
    ) -> Result<Tensor> {
        let never = AtomicBool::new(false);
        // Measured runs read values back to the host every layer: always eager.
        let mut stepper = UNetStepper::new(&self.device, probe.is_none() && self.backends.cuda_graph);
        self.denoise_batch(&mut stepper, 1, 0.0, std::slice::from_ref(request), on_event, &never, probe)
    }

    /// Stages 1–3 for a batch: text embeddings, seeded noise, the denoising loop.
    #[allow(clippy::too_many_arguments)]
    fn denoise_batch(
        &self,
        stepper: &mut UNetStepper,
        view_batch: usize,
        eta: f64,
        requests: &[GenerateRequest],
        on_event: &mut dyn FnMut(Event),
        cancel: &AtomicBool,
        probe: Option<&EntropyProbe>,
    ) -> Result<Tensor> {
        let first = requests.first().context("an empty batch")?;
        ensure!(
            requests.iter().all(|r| r.batch_key() == first.batch_key()),
            "a batch must share size, steps, sampler, attention and guidance"
        );
        let factor = self.decoder.scale_factor();
        let size = first.plan.render;
        ensure!(
            size.width.is_multiple_of(factor) && size.height.is_multiple_of(factor),
            "width and height must be multiples of {factor}, got {size}"
        );

        let guided = self.guided(first);
        ensure!(
            eta == 0.0 || first.plan.denoiser == Denoiser::Whole,
            "--eta applies to the default, entropy and resize modes; MultiDiffusion runs with eta 0"
        );

        // 1. encode the prompts
        let started = std::time::Instant::now();
        let prompt_embeds = self.encode_prompts(requests, guided, on_event)?;
        let prompt_embeds = self.conditioning(prompt_embeds, size)?;
        self.device.synchronize()?;
        on_event(Event::Stage("text encoder", started.elapsed()));

        // 2. the initial noise, each image from its own seed (so it does not depend on its batch), times
        // the sampler's init_noise_sigma. Each image keeps its generator: stochastic samplers (DDIM with
        // eta > 0, Euler a, DPM++ 2M SDE) continue its stream every step, as diffusers' pipeline hands
        // its generator to `scheduler.step`.
        let mut sampler = self.scheduler_config.build(&first.sampler, first.steps, eta)?;
        let (latent_width, latent_height) = (size.width / factor, size.height / factor);
        let mut generators: Vec<TorchGenerator> = requests.iter().map(|r| TorchGenerator::new(r.seed)).collect();
        let latents = generators
            .iter_mut()
            .map(|generator| self.draw_noise(generator, latent_width, latent_height))
            .collect::<Result<Vec<_>>>()?;
        let mut latents = Tensor::cat(&latents, 0)?; // (B, 4, h, w)
        let init_noise_sigma = sampler.init_noise_sigma();
        if init_noise_sigma != 1.0 {
            latents = (latents * init_noise_sigma as f64)?;
        }
        // One (1, c, h, w) draw per image, in batch order, of the size the step asks for (a
        // MultiDiffusion window's, or the whole latents').
        let mut draw_step_noise = |shape: &[usize]| -> Result<Tensor> {
            let (height, width) = (shape[2], shape[3]);
            let noise = generators
                .iter_mut()
                .map(|generator| self.draw_noise(generator, width, height))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&noise, 0)?)
        };

        // 3. the denoising loop: the sampler says which timesteps, what the UNet sees, and what comes next.
        let started = std::time::Instant::now();
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        let mut view_layout: Option<ViewLayout> = None;
        // A structural mode's per-image state (HiDiffusion's shift generators, seeded like the noise).
        let seeds: Vec<u32> = requests.iter().map(|r| r.seed).collect();
        let mut structure_state = StructureState::new(&seeds);
        let blocks = self.unet.config.block_out_channels.len();
        for (index, &timestep) in timesteps.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            // The probe measures the first text-conditioned entry of the UNet's batch, which is
            // [negatives…, prompts…] under guidance: entry B, the first prompt.
            let batch_entry = if guided { requests.len() } else { 0 };
            let probe = probe.and_then(|probe| probe.at_step(index, batch_entry)).map(|p| p as &dyn AttentionObserver);
            latents = match first.plan.denoiser {
                Denoiser::Whole => {
                    let step =
                        StepContext { index, steps: total, timestep, latent: (latent_height, latent_width), blocks };
                    let unet_plan = first.plan.structure.plan(step, &mut structure_state);
                    let latent_model_input = sampler.scale_model_input(&latents, index)?;
                    let noise_pred = self.guided_noise(
                        stepper,
                        &latent_model_input,
                        timestep,
                        &prompt_embeds,
                        first,
                        (probe, &unet_plan),
                        on_event,
                    )?;
                    sampler.step(&noise_pred, index, &latents, &mut draw_step_noise)?
                }
                Denoiser::Views(views) => {
                    // The windows, their coverage, the repeated embeddings and one sampler state per
                    // window group are made once.
                    if view_layout.is_none() {
                        view_layout = Some(ViewLayout::new(
                            views,
                            &latents,
                            &prompt_embeds,
                            guided,
                            view_batch,
                            sampler.as_ref(),
                        )?);
                    }
                    let layout = view_layout.as_mut().expect("set just above");
                    self.multidiffusion_step(
                        stepper,
                        &latents,
                        layout,
                        index,
                        timestep,
                        first,
                        &mut draw_step_noise,
                        on_event,
                    )?
                }
            };
            on_event(Event::Step { index, total, timestep });
        }
        self.device.synchronize()?;
        on_event(Event::Stage("denoising", started.elapsed()));
        Ok(latents)
    }

    /// Text embeddings for a batch: (2B, tokens, hidden) laid out [negatives…, prompts…] when guiding,
    /// as diffusers concatenates them; (B, tokens, hidden) otherwise. SDXL's pooled embeddings come
    /// along in the same layout.
    fn encode_prompts(
        &self,
        requests: &[GenerateRequest],
        guide: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut negative_embeds = Vec::with_capacity(requests.len());
        let mut positive_embeds = Vec::with_capacity(requests.len());
        let mut negative_pooled = Vec::with_capacity(requests.len());
        let mut positive_pooled = Vec::with_capacity(requests.len());
        for request in requests {
            let (embeds, pooled) = self.encode_prompt_pooled(request, guide, on_event)?; // (1 or 2, tokens, hidden)
            if guide {
                negative_embeds.push(embeds.narrow(0, 0, 1)?);
                positive_embeds.push(embeds.narrow(0, 1, 1)?);
            } else {
                positive_embeds.push(embeds);
            }
            if let Some(pooled) = pooled {
                if guide {
                    negative_pooled.push(pooled.narrow(0, 0, 1)?);
                    positive_pooled.push(pooled.narrow(0, 1, 1)?);
                } else {
                    positive_pooled.push(pooled);
                }
            }
        }
        negative_embeds.extend(positive_embeds);
        negative_pooled.extend(positive_pooled);
        let pooled = if negative_pooled.is_empty() { None } else { Some(Tensor::cat(&negative_pooled, 0)?) };
        Ok((Tensor::cat(&negative_embeds, 0)?, pooled))
    }

    /// One request's embeddings in the compute dtype: (negative, positive) when guiding, else (positive).
    pub fn encode_prompt(
        &self,
        request: &GenerateRequest,
        guide: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        Ok(self.encode_prompt_pooled(request, guide, on_event)?.0)
    }

    /// [`Self::encode_prompt`] with SDXL's pooled embeddings, in the same layout. SDXL with
    /// `force_zeros_for_empty_prompt` and no negative prompt given: the unconditional embeddings and
    /// pooled embeddings are zeros (`StableDiffusionXLPipeline.encode_prompt`); a given "" is encoded.
    pub fn encode_prompt_pooled(
        &self,
        request: &GenerateRequest,
        guide: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let on_warning = &mut |warning| on_event(Event::Warning(warning));
        let zeros = guide && self.force_zeros_for_empty_prompt && request.negative_prompt.is_none();
        let mut texts = vec![("prompt", request.prompt.as_str())];
        if guide && !zeros {
            // LDM's unconditional text is always "" (it has no negative prompt).
            let negative = request.negative_prompt.as_deref().unwrap_or("");
            let unconditional = if self.rules.negative_prompt { negative } else { "" };
            texts.insert(0, ("negative prompt", unconditional));
        }
        let (embeds, pooled) = self.text_encoder.encode_pooled(&texts, on_warning)?;
        if !zeros {
            return Ok((embeds, pooled));
        }
        let with_zeros = |t: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, &t], 0)?) };
        Ok((with_zeros(embeds)?, pooled.map(with_zeros).transpose()?))
    }

    /// The UNet's conditioning for a batch rendered at `size`: the text embeddings and, for SDXL, the
    /// added features: pooled embeddings and `add_time_ids` = (height, width) original size, (0, 0)
    /// crop, (height, width) target size, as `StableDiffusionXLPipeline._get_add_time_ids` makes them
    /// by default (the same for the negative rows).
    fn conditioning(&self, (text, pooled): (Tensor, Option<Tensor>), size: PixelSize) -> Result<Conditioning> {
        let added = pooled.map(|pooled| self.added_features(&pooled, size)).transpose()?;
        Ok(Conditioning { text, added })
    }

    /// SDXL's added features for pooled embeddings (one row each) rendered at `size`, to append to the
    /// UNet's time features (see [`UNet2DConditionModel::added_features`]).
    pub fn added_features(&self, pooled: &Tensor, size: PixelSize) -> Result<Tensor> {
        let rows = pooled.dim(0)?;
        let (h, w) = (size.height as f32, size.width as f32);
        let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
        // diffusers builds them in the embeddings' dtype (exact in f16 up to 2048).
        let time_ids = Tensor::from_vec(ids, (rows, 6), &self.device)?.to_dtype(self.dtype)?;
        let added = self.unet.added_features(pooled, &time_ids, self.dtype)?;
        added.ok_or_else(|| anyhow!("the text encoders make pooled embeddings but the UNet has no added embedding"))
    }

    /// The guided noise prediction for `latents` (B, c, h, w): the UNet on [latents, latents] with the
    /// [negatives…, prompts…] embeddings, then uncond + guidance·(text − uncond), as diffusers.
    #[allow(clippy::too_many_arguments)]
    fn guided_noise(
        &self,
        stepper: &mut UNetStepper,
        latents: &Tensor,
        timestep: f64,
        prompt_embeds: &Conditioning,
        request: &GenerateRequest,
        (probe, unet_plan): (Option<&dyn AttentionObserver>, &UNetPlan),
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        let guide = self.guided(request);
        let latent_model_input = if guide { Tensor::cat(&[latents, latents], 0)? } else { latents.clone() };
        let noise_pred = stepper.step(
            &self.unet,
            &latent_model_input,
            timestep,
            &prompt_embeds.text,
            prompt_embeds.added.as_ref(),
            request.plan.attention,
            probe,
            unet_plan,
            &mut |warning| on_event(Event::Warning(warning)),
        )?;
        if !guide {
            return Ok(noise_pred);
        }
        let noise_pred_uncond = noise_pred.narrow(0, 0, batch)?;
        let noise_pred_text = noise_pred.narrow(0, batch, batch)?;
        Ok((&noise_pred_uncond + ((noise_pred_text - &noise_pred_uncond)? * request.guidance_scale)?)?)
    }

    /// One MultiDiffusion step, as diffusers' `StableDiffusionPanoramaPipeline`: for each window (in
    /// its order, `view_batch` windows per UNet call) crop the latents, run the guided UNet and the
    /// sampler step on the crop with that window group's own sampler state (diffusers saves and
    /// restores the scheduler's `__dict__` per view batch), add the result into a running sum and a
    /// count; then latents = sum / count, in f32. Latents no window covers (a ragged edge) stay 0, as
    /// in diffusers.
    ///
    /// diffusers' saved states start as one shared dict, so at the first step the multistep samplers'
    /// history lists are shared between windows; with second-order solvers each window's first output is
    /// shifted out before a second-order step reads it, so independent states give the same numbers.
    #[allow(clippy::too_many_arguments)]
    fn multidiffusion_step(
        &self,
        stepper: &mut UNetStepper,
        latents: &Tensor,
        layout: &mut ViewLayout,
        index: usize,
        timestep: f64,
        request: &GenerateRequest,
        draw_step_noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        let mut value = latents.zeros_like()?.to_dtype(DType::F32)?;
        for ((group, embeds), sampler) in layout.groups.iter().zip(&layout.embeds).zip(layout.samplers.iter_mut()) {
            let crops = group.iter().map(|w| crop(latents, w)).collect::<Result<Vec<_>>>()?;
            let crops = Tensor::cat(&crops, 0)?; // (views·B, c, window, window), view-major
            let latent_model_input = sampler.scale_model_input(&crops, index)?;
            let plain = UNetPlan::default();
            let noise =
                self.guided_noise(stepper, &latent_model_input, timestep, embeds, request, (None, &plain), on_event)?;
            // A stochastic sampler draws each window's noise from the images' generators, in window order.
            let views = group.len();
            let mut draw = |shape: &[usize]| -> Result<Tensor> {
                let per_view = [shape[0] / views, shape[1], shape[2], shape[3]];
                let parts = (0..views).map(|_| draw_step_noise(&per_view)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            };
            let denoised = sampler.step(&noise, index, &crops, &mut draw)?.to_dtype(DType::F32)?;
            for (k, window) in group.iter().enumerate() {
                let view = denoised.narrow(0, k * batch, batch)?;
                add_window(&mut value, window, &view)?;
            }
        }
        let averaged = (&value / &layout.count_at_least_one)?;
        Ok(layout.covered.where_cond(&averaged, &value)?.to_dtype(latents.dtype())?)
    }

    /// `torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(seed))`, then moved to the
    /// compute device and dtype (before the sampler's init_noise_sigma).
    pub fn prepare_latents(&self, seed: u32, latent_width: usize, latent_height: usize) -> Result<Tensor> {
        self.draw_noise(&mut TorchGenerator::new(seed), latent_width, latent_height)
    }

    /// The next (1, c, h, w) standard normals of `generator`, on the compute device and dtype.
    fn draw_noise(&self, generator: &mut TorchGenerator, latent_width: usize, latent_height: usize) -> Result<Tensor> {
        let channels = self.unet.config.in_channels;
        let shape = (1, channels, latent_height, latent_width);
        let noise = randn(generator, channels * latent_height * latent_width);
        Ok(Tensor::from_vec(noise, shape, &Device::Cpu)?.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// One image's final latents → 8-bit RGB, through the family's decoder.
    pub fn decode_latents(&self, latents: &Tensor, on_event: &mut dyn FnMut(Event)) -> Result<RgbImage> {
        self.decode(latents, false, on_event)
    }

    /// [`Self::decode_latents`], in tiles when `tiled` (diffusers' `vae.enable_tiling()`).
    pub fn decode(&self, latents: &Tensor, tiled: bool, on_event: &mut dyn FnMut(Event)) -> Result<RgbImage> {
        self.decoder.decode(latents, tiled, &mut |warning| on_event(Event::Warning(warning)))
    }

    /// What decoding an image of `size` pixels whole would need at its peak, in bytes; `None` where
    /// tiling would not split it.
    pub fn untiled_decode_bytes(&self, size: PixelSize) -> Option<u64> {
        let factor = self.decoder.scale_factor();
        self.decoder.untiled_peak_bytes(size.height / factor, size.width / factor)
    }

    /// A horizontally wrapping panorama's decode, as diffusers' `decode_latents_with_padding`: 8 latent
    /// columns from the other side on each edge, decoded, and their pixels cut off again, so the
    /// seam has no border artifacts.
    fn decode_wrapped(&self, latents: &Tensor, tiled: bool, on_event: &mut dyn FnMut(Event)) -> Result<RgbImage> {
        const PADDING: usize = 8;
        let width = latents.dim(3)?;
        let padding = PADDING.min(width);
        let padded = Tensor::cat(
            &[latents.narrow(3, width - padding, padding)?, latents.clone(), latents.narrow(3, 0, padding)?],
            3,
        )?;
        let image = self.decode(&padded, tiled, on_event)?;
        let cut = (padding * self.decoder.scale_factor()) as u32;
        let kept = image.width() - 2 * cut;
        Ok(image::imageops::crop_imm(&image, cut, 0, kept, image.height()).to_image())
    }

    /// Pixels per latent pixel: 8 for SD.
    pub fn vae_scale_factor(&self) -> usize {
        self.decoder.scale_factor()
    }

    /// Direct access for tests and benchmarks that check the UNet against its reference.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }
    pub fn scheduler(&self, steps: usize) -> Result<DdimScheduler> {
        DdimScheduler::new(&self.scheduler_config, steps)
    }
    /// The model's scheduler config, which resolves `--sampler model` and every sampler's settings.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// What the UNet is conditioned on, rows laid out as the latents it goes with: the text embeddings
/// and, for SDXL, the added features (pooled text embeddings and add_time_ids' sinusoids, see
/// [`UNet2DConditionModel::added_features`]).
struct Conditioning {
    text: Tensor,
    added: Option<Tensor>,
}

/// What every MultiDiffusion step of a batch shares, built once: the windows in diffusers' order, cut
/// into groups that go through the UNet together (same shape, at most `view_batch`), the prompt
/// embeddings repeated for each group, and how many windows cover each latent.
struct ViewLayout {
    groups: Vec<Vec<Window>>,
    embeds: Vec<Conditioning>,
    /// Each group's sampler state.
    samplers: Vec<Box<dyn Sampler>>,
    /// Latents some window covers; the rest stay at their running sum, 0, as in diffusers.
    covered: Tensor,
    /// The coverage count, with 1 where nothing covers (those entries are not used).
    count_at_least_one: Tensor,
}

impl ViewLayout {
    fn new(
        views: Views,
        latents: &Tensor,
        prompt_embeds: &Conditioning,
        guided: bool,
        view_batch: usize,
        sampler: &dyn Sampler,
    ) -> Result<Self> {
        let (batch, _, height, width) = latents.dims4()?;
        let shape = |w: &Window| (w.rows.1 - w.rows.0, window_columns(w, width).iter().map(|c| c.len()).sum::<usize>());
        let mut groups: Vec<Vec<Window>> = Vec::new();
        for window in views.windows(height, width) {
            match groups.last_mut() {
                // The original rule's ragged windows differ in shape, so they go alone.
                Some(group) if group.len() < view_batch && shape(&group[0]) == shape(&window) => group.push(window),
                _ => groups.push(vec![window]),
            }
        }
        let embeds = groups
            .iter()
            .map(|group| {
                let repeat = |t: &Tensor| repeat_embeddings(t, batch, group.len(), guided);
                Ok(Conditioning {
                    text: repeat(&prompt_embeds.text)?,
                    added: prompt_embeds.added.as_ref().map(repeat).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        let mut count = latents.zeros_like()?.to_dtype(DType::F32)?;
        for window in groups.iter().flatten() {
            let ones = crop(&count, window)?.ones_like()?;
            add_window(&mut count, window, &ones)?;
        }
        let samplers = groups.iter().map(|_| sampler.box_clone()).collect();
        Ok(Self { groups, embeds, samplers, covered: count.gt(0f64)?, count_at_least_one: count.maximum(1f64)? })
    }
}

/// Columns a window covers as Python slices them: a circular window that runs past the right edge
/// continues from the left one, and that second slice stops at the edge too (so a window wider than
/// twice the panorama is cut there, as in diffusers).
fn window_columns(window: &Window, width: usize) -> [std::ops::Range<usize>; 2] {
    let (col0, col1) = window.cols;
    if col1 <= width {
        [col0..col1, 0..0]
    } else {
        [col0..width, 0..(col1 - width).min(width)]
    }
}

/// The latents under a window: (B, c, rows, cols).
fn crop(latents: &Tensor, window: &Window) -> Result<Tensor> {
    let (row0, row1) = window.rows;
    let rows = latents.narrow(2, row0, row1 - row0)?;
    let parts = window_columns(window, latents.dim(3)?)
        .into_iter()
        .filter(|cols| !cols.is_empty())
        .map(|cols| rows.narrow(3, cols.start, cols.len()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 3)?)
}

/// Adds `addend` (shaped as the window's crop) into `sum` under the window, wrapping as [`crop`] cuts:
/// the denoised window into the running sum, or ones into the coverage count.
fn add_window(sum: &mut Tensor, window: &Window, addend: &Tensor) -> Result<()> {
    let (row0, row1) = window.rows;
    let mut from = 0;
    for cols in window_columns(window, sum.dim(3)?) {
        if cols.is_empty() {
            continue;
        }
        let part = addend.narrow(3, from, cols.len())?;
        from += cols.len();
        let ranges = [0..sum.dim(0)?, 0..sum.dim(1)?, row0..row1, cols.clone()];
        let added = (sum.i((.., .., row0..row1, cols))? + &part)?;
        *sum = sum.slice_assign(&ranges, &added)?;
    }
    Ok(())
}

/// Prompt embeddings for `views` windows of a batch of B images, in the layout `guided_noise` reads
/// for crops stacked view-major: [negatives of every window…, prompts of every window…] when guided.
fn repeat_embeddings(embeds: &Tensor, batch: usize, views: usize, guided: bool) -> Result<Tensor> {
    if views == 1 {
        return Ok(embeds.clone());
    }
    let halves: Vec<Tensor> =
        if guided { vec![embeds.narrow(0, 0, batch)?, embeds.narrow(0, batch, batch)?] } else { vec![embeds.clone()] };
    let mut parts = Vec::with_capacity(halves.len() * views);
    for half in &halves {
        parts.extend(std::iter::repeat_n(half.clone(), views));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A run of batches on one loaded pipeline; see [`Pipeline::session`].
pub struct Session<'a> {
    pipeline: &'a Pipeline,
    stepper: UNetStepper,
    view_batch: usize,
    eta: f64,
}

impl Session<'_> {
    /// MultiDiffusion windows per UNet call (times the batch's images), like diffusers'
    /// `view_batch_size`; 1 by default.
    pub fn with_view_batch(mut self, view_batch: usize) -> Self {
        self.view_batch = view_batch.max(1);
        self
    }

    /// DDIM's eta (0 by default: deterministic). With eta > 0 every step adds noise drawn from each
    /// image's seeded generator, continuing after its initial latents (see `denoise_batch`). Other
    /// samplers ignore it.
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// Several images through the UNet together: a batch of B runs as one (2B, …) UNet call per step,
    /// laid out [negatives…, prompts…] as diffusers batches `num_images_per_prompt`. Every row is
    /// computed independently (GroupNorm and attention never mix rows), so each image equals the one
    /// made alone, within float rounding. The requests must share a [`BatchKey`]. `cancel` is checked
    /// between steps: once set, the batch stops with [`Interrupted`] and nothing half-made is returned.
    /// Images come back at their final size (resized where the plan says so).
    pub fn generate_batch(
        &mut self,
        requests: &[GenerateRequest],
        on_event: &mut dyn FnMut(Event),
        cancel: &AtomicBool,
    ) -> Result<Vec<RgbImage>> {
        let latents = self.pipeline.denoise_batch(
            &mut self.stepper,
            self.view_batch,
            self.eta,
            requests,
            on_event,
            cancel,
            None,
        )?;

        // 4. decode one image at a time: the VAE's memory grows fast with pixels, and it is cheap
        // next to the denoising loop.
        let started = std::time::Instant::now();
        let mut images = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            let latents = latents.narrow(0, i, 1)?;
            let image = match request.plan.denoiser {
                Denoiser::Views(views) if views.circular => {
                    self.pipeline.decode_wrapped(&latents, request.vae_tiling, on_event)?
                }
                _ => self.pipeline.decode(&latents, request.vae_tiling, on_event)?,
            };
            images.push(match request.plan.resize_to {
                Some(size) => lanczos3(&image, size),
                None => image,
            });
        }
        on_event(Event::Stage("VAE decode", started.elapsed()));
        Ok(images)
    }
}
