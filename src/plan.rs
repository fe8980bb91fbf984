//! The plan: a resolved request turned into the ordered list of images a run makes — index, prompt,
//! seed, target size, how the mode renders it, and the output path — computed once, from the model's
//! configs, before anything slow happens. Sharding and evaluation slice and reuse this list.

use crate::cli::ImageSpec;
use crate::mode::{Denoiser, ModeOptions, RenderPlan};
use crate::pipeline::{BatchKey, GenerateRequest};
use crate::size::{PixelSize, TrainingSize};
use std::path::PathBuf;

/// One image of a run, fully resolved: what to render, at what size, where to write it.
#[derive(Debug, Clone)]
pub struct PlannedImage {
    /// Position in the run (`{index}` in output names), from 0.
    pub index: usize,
    pub spec: ImageSpec,
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
            guidance_scale: self.spec.guidance,
            seed: self.spec.seed,
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
        let guided = if self.spec.guidance > 1.0 { 2.0 } else { 1.0 };
        self.spec.steps as f64 * guided * per_step
    }
}

/// Cuts a plan into batches of at most `batch_size` images that can share UNet calls (the same
/// [`BatchKey`]): grouped in order of first appearance, each group in plan order.
pub fn batches(plan: &[PlannedImage], batch_size: usize) -> Vec<Vec<&PlannedImage>> {
    let mut groups: Vec<(BatchKey, Vec<&PlannedImage>)> = Vec::new();
    for planned in plan {
        let key = BatchKey::new(&planned.render, planned.spec.steps, planned.spec.guidance);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(planned),
            None => groups.push((key, vec![planned])),
        }
    }
    groups.iter().flat_map(|(_, members)| members.chunks(batch_size.max(1)).map(<[_]>::to_vec)).collect()
}

/// Plans `specs` in order. A spec without a size gets `default_size` (the model's own training size);
/// each mode plans against `training` (which `--train-size` may override); `path` names each image.
pub fn plan(
    specs: impl IntoIterator<Item = ImageSpec>,
    default_size: PixelSize,
    training: TrainingSize,
    options: ModeOptions,
    mut path: impl FnMut(usize, &ImageSpec, PixelSize) -> PathBuf,
) -> Vec<PlannedImage> {
    specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| {
            let size =
                PixelSize::new(spec.width.unwrap_or(default_size.width), spec.height.unwrap_or(default_size.height));
            let render = spec.mode.plan(size, training, options);
            let path = path(index, &spec, size);
            PlannedImage { index, spec, size, render, path }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::Mode;

    fn spec(mode: Mode, width: Option<usize>) -> ImageSpec {
        ImageSpec {
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 7,
            prompt_index: 0,
            image_index: 0,
            width,
            height: width,
            steps: 4,
            guidance: 7.5,
            mode,
        }
    }

    #[test]
    fn images_are_planned_in_order_with_sizes_from_the_model_and_modes() {
        let training = TrainingSize { pixels: PixelSize::new(128, 128), vae_scale_factor: 8 };
        let specs = [spec(Mode::Default, None), spec(Mode::Resize, Some(192)), spec(Mode::Entropy, Some(64))];
        let planned = plan(specs, training.pixels, training, ModeOptions::default(), |index, spec, size| {
            PathBuf::from(format!("{index}-{}-{size}.png", spec.mode.as_str()))
        });
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
            plan(specs, training.pixels, training, ModeOptions::default(), |i, _, _| PathBuf::from(i.to_string()));
        let indices: Vec<Vec<usize>> =
            batches(&planned, 2).iter().map(|batch| batch.iter().map(|p| p.index).collect()).collect();
        assert_eq!(indices, [vec![0, 2], vec![3], vec![1, 4]]);
    }
}
