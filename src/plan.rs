//! The plan: a resolved request turned into the ordered list of images a run makes — index, prompt,
//! seed, target size, how the mode renders it, and the output path — computed once, from the model's
//! configs, before anything slow happens. Sharding and evaluation slice and reuse this list.

use crate::family::Rules;
use crate::mode::{Denoiser, Mode, ModeOptions, RenderPlan};
use crate::output;
use crate::pipeline::{BatchKey, GenerateRequest};
use crate::sampler::{SamplerSpec, SchedulerConfig};
use crate::size::{PixelSize, TrainingSize};
use anyhow::Result;
use std::path::PathBuf;

/// One planned image. `None` sizes mean the model's training size, known once its config is read.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub prompt: String,
    /// `None`: not given (SDXL then uses zero unconditional embeddings).
    pub negative_prompt: Option<String>,
    pub seed: u32,
    /// The image's identity in the run's grid: its prompt (line of the prompt file, from 0) and its
    /// number among that prompt's `--num-images` (from 0; the seed is the base seed plus this).
    pub prompt_index: usize,
    pub image_index: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    /// `None`: the family's default, known once the model's files are found.
    pub guidance: Option<f64>,
    pub mode: Mode,
    /// As chosen; resolved against the model's scheduler config when planned.
    pub sampler: crate::sampler::SamplerChoice,
    /// Decode in tiles: `--vae-tiling` (or `--from` an image made so), or the run found that the
    /// whole decode would not fit in memory.
    pub vae_tiling: bool,
}

/// One image of a run, fully resolved: what to render, at what size, where to write it.
#[derive(Debug, Clone)]
pub struct PlannedImage {
    /// Position in the run (`{index}` in output names), from 0.
    pub index: usize,
    pub spec: ImageSpec,
    /// The guidance scale: the spec's, else the family's default. Batching, cost and metadata use this.
    pub guidance: f64,
    /// Whether `guidance` runs two UNet branches, by the family's rule.
    pub guided: bool,
    /// The spec's sampler, resolved against the model's scheduler config.
    pub sampler: SamplerSpec,
    /// The size of the image written.
    pub size: PixelSize,
    /// How the spec's mode renders it.
    pub render: RenderPlan,
    pub path: PathBuf,
}

impl PlannedImage {
    /// What the pipeline needs to make this image.
    pub fn generate_request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.spec.prompt.clone(),
            negative_prompt: self.spec.negative_prompt.clone(),
            plan: self.render,
            steps: self.spec.steps,
            sampler: self.sampler,
            guidance_scale: self.guidance,
            seed: self.spec.seed,
            vae_tiling: self.spec.vae_tiling,
        }
    }

    /// Relative work, for dealing images to shards: UNet calls × their tokens, attention's part
    /// growing with the square of the tokens (equal to the rest at 64×64 latents, about as measured).
    pub fn cost(&self) -> f64 {
        let tokens = |pixels: usize| (pixels / 64) as f64;
        let call = |t: f64| t + t * t / 4096.0;
        let per_step = match self.render.denoiser {
            Denoiser::Whole => call(tokens(self.render.render.pixels())),
            Denoiser::Views(views) => {
                let latent = self.render.render.latent(8);
                let windows = views.windows(latent.height, latent.width);
                windows.iter().map(|w| call(((w.rows.1 - w.rows.0) * (w.cols.1 - w.cols.0)) as f64)).sum()
            }
        };
        let guided = if self.guided { 2.0 } else { 1.0 };
        self.sampler.kind.unet_calls(self.spec.steps) as f64 * guided * per_step
    }
}

/// (path, upper bound on its bytes) of one planned image, for [`output::check_disk_space`].
pub fn planned_png(planned: &PlannedImage) -> (PathBuf, u64) {
    let text = output::text_bytes_bound(&planned.spec.prompt, planned.spec.negative_prompt.as_deref().unwrap_or(""));
    (planned.path.clone(), output::png_size_bound(planned.size.width, planned.size.height, text))
}

/// Cuts a plan into batches of at most `batch_size` images that can share UNet calls (the same
/// [`BatchKey`]): grouped in order of first appearance, each group in plan order.
pub fn batches(plan: &[PlannedImage], batch_size: usize) -> Vec<Vec<&PlannedImage>> {
    let mut groups: Vec<(BatchKey, Vec<&PlannedImage>)> = Vec::new();
    for planned in plan {
        let key = BatchKey::new(&planned.render, planned.spec.steps, planned.sampler, planned.guidance);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(planned),
            None => groups.push((key, vec![planned])),
        }
    }
    groups.iter().flat_map(|(_, members)| members.chunks(batch_size.max(1)).map(<[_]>::to_vec)).collect()
}

/// What an image takes from the model where its spec leaves a setting unset.
#[derive(Debug, Clone)]
pub struct ModelDefaults {
    /// The model's own training size, for a spec without a size.
    pub size: PixelSize,
    /// The family's guidance rules: its default scale, and which scales run two branches.
    pub rules: Rules,
    /// The model's scheduler config: `--sampler model` and every sampler's settings come from it.
    pub scheduler: SchedulerConfig,
}

/// Plans `specs` in order. A spec without a size or guidance takes the model's (`defaults`); each
/// mode plans against `training` (which `--train-size` may override); `path` names each image.
pub fn plan(
    specs: impl IntoIterator<Item = ImageSpec>,
    defaults: &ModelDefaults,
    training: TrainingSize,
    options: ModeOptions,
    mut path: impl FnMut(usize, &ImageSpec, PixelSize) -> PathBuf,
) -> Result<Vec<PlannedImage>> {
    specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| {
            let size =
                PixelSize::new(spec.width.unwrap_or(defaults.size.width), spec.height.unwrap_or(defaults.size.height));
            let guidance = spec.guidance.unwrap_or(defaults.rules.default_guidance);
            let guided = defaults.rules.guided(guidance);
            let render = spec.mode.plan(size, training, options);
            let sampler = defaults.scheduler.resolve(&spec.sampler)?;
            // The spec now names what runs (`--sampler model` made concrete), as names and records show it.
            let mut spec = spec;
            spec.sampler = crate::sampler::SamplerChoice {
                kind: Some(sampler.kind),
                schedule: sampler.schedule,
                spacing: Some(sampler.spacing),
            };
            let path = path(index, &spec, size);
            Ok(PlannedImage { index, spec, guidance, guided, sampler, size, render, path })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::Family;

    fn defaults(training: TrainingSize) -> ModelDefaults {
        ModelDefaults {
            size: training.pixels,
            rules: Family::StableDiffusion.rules(),
            scheduler: serde_json::from_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap(),
        }
    }

    fn spec(mode: Mode, width: Option<usize>) -> ImageSpec {
        ImageSpec {
            prompt: "p".into(),
            negative_prompt: None,
            seed: 7,
            prompt_index: 0,
            image_index: 0,
            width,
            height: width,
            steps: 4,
            guidance: Some(7.5),
            mode,
            sampler: Default::default(),
            vae_tiling: false,
        }
    }

    #[test]
    fn images_are_planned_in_order_with_sizes_from_the_model_and_modes() {
        let training = TrainingSize { pixels: PixelSize::new(128, 128), vae_scale_factor: 8 };
        let specs = [spec(Mode::Default, None), spec(Mode::Resize, Some(192)), spec(Mode::Entropy, Some(64))];
        let planned = plan(specs, &defaults(training), training, ModeOptions::default(), |index, spec, size| {
            PathBuf::from(format!("{index}-{}-{size}.png", spec.mode.as_str()))
        })
        .unwrap();
        let summary: Vec<_> = planned.iter().map(|p| (p.index, p.size, p.render.render, p.path.clone())).collect();
        assert_eq!(
            summary,
            [
                (0, PixelSize::new(128, 128), PixelSize::new(128, 128), PathBuf::from("0-default-128x128.png")),
                (1, PixelSize::new(192, 192), PixelSize::new(128, 128), PathBuf::from("1-resize-192x192.png")),
                (2, PixelSize::new(64, 64), PixelSize::new(64, 64), PathBuf::from("2-entropy-64x64.png")),
            ]
        );
        assert_eq!(planned[1].generate_request().plan.resize_to, Some(PixelSize::new(192, 192)));
    }

    #[test]
    fn batches_group_what_can_share_unet_calls_in_plan_order() {
        let training = TrainingSize { pixels: PixelSize::new(128, 128), vae_scale_factor: 8 };
        let specs = [
            spec(Mode::Default, Some(64)),
            spec(Mode::Entropy, Some(64)),
            spec(Mode::Default, Some(64)),
            spec(Mode::Default, Some(64)),
            spec(Mode::Entropy, Some(64)),
        ];
        let planned =
            plan(specs, &defaults(training), training, ModeOptions::default(), |i, _, _| PathBuf::from(i.to_string()))
                .unwrap();
        let indices: Vec<Vec<usize>> =
            batches(&planned, 2).iter().map(|batch| batch.iter().map(|p| p.index).collect()).collect();
        assert_eq!(indices, [vec![0, 2], vec![3], vec![1, 4]]);
    }

    /// An unset guidance takes the family's default (SD 7.5, LDM-256 1), and batching and cost follow
    /// the resolved value by the family's rule: LDM guides at 0.5 (two branches), SD does not.
    #[test]
    fn unset_guidance_takes_the_familys_default_and_rule() {
        let training = TrainingSize { pixels: PixelSize::new(64, 64), vae_scale_factor: 8 };
        let plan_for = |family: Family, guidance: Option<f64>| {
            let spec = ImageSpec { guidance, ..spec(Mode::Default, None) };
            let defaults = ModelDefaults { rules: family.rules(), ..defaults(training) };
            plan([spec], &defaults, training, ModeOptions::default(), |_, _, _| PathBuf::new()).unwrap().remove(0)
        };
        let sd = plan_for(Family::StableDiffusion, None);
        let ldm = plan_for(Family::LatentDiffusion, None);
        assert_eq!((sd.guidance, sd.guided, ldm.guidance, ldm.guided), (7.5, true, 1.0, false));
        assert_eq!(ldm.generate_request().guidance_scale, 1.0);
        assert_eq!(sd.cost(), 2.0 * ldm.cost(), "one UNet branch instead of two");
        let (sd_half, ldm_half) =
            (plan_for(Family::StableDiffusion, Some(0.5)), plan_for(Family::LatentDiffusion, Some(0.5)));
        assert_eq!((sd_half.guided, ldm_half.guided), (false, true));
        assert_eq!(ldm_half.cost(), sd.cost());

        // An explicit 1 and the LDM default batch together; 7.5 does not.
        let specs = [None, Some(1.0), Some(7.5)].map(|guidance| ImageSpec { guidance, ..spec(Mode::Default, None) });
        let defaults = ModelDefaults { rules: Family::LatentDiffusion.rules(), ..defaults(training) };
        let planned =
            plan(specs, &defaults, training, ModeOptions::default(), |i, _, _| PathBuf::from(i.to_string())).unwrap();
        let indices: Vec<Vec<usize>> =
            batches(&planned, 4).iter().map(|batch| batch.iter().map(|p| p.index).collect()).collect();
        assert_eq!(indices, [vec![0, 1], vec![2]]);
    }
}
