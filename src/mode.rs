//! Render modes: how an image is made at a size other than the one the model was trained at.
//!
//! A mode is a pipeline concept. It decides three things, all in [`Mode::plan`]: the size the UNet
//! renders at, the attention scale, and how the latents are denoised; plus a resize afterwards. A new
//! mode is one variant and one arm of that match (MultiDiffusion, say, is `Denoiser::Views`).

use crate::attention::AttentionScale;
use crate::size::{PixelSize, TrainingSize};
use serde::{Deserialize, Serialize};

/// The same words name the mode everywhere: `--mode`, `--modes`, file names, metadata, JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// 1/√d, as the model was trained.
    Default,
    /// √(log_T N / d): keeps attention entropy at its training value at any size (Jin et al. 2023).
    Entropy,
    /// The paper's baseline: render with 1/√d at about the training pixel count with the target's
    /// aspect, then resize to the target size with Lanczos3.
    Resize,
}

/// How the denoising loop turns latents into the next latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denoiser {
    /// One guided UNet call on the whole latent image per step, as `StableDiffusionPipeline`.
    Whole,
}

/// Everything a mode decides for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderPlan {
    /// The size the UNet runs at.
    pub render: PixelSize,
    pub attention: AttentionScale,
    pub denoiser: Denoiser,
    /// Resize the decoded image to this size (Lanczos3), when it differs from `render`.
    pub resize_to: Option<PixelSize>,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Default, Mode::Entropy, Mode::Resize];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Entropy => "entropy",
            Mode::Resize => "resize",
        }
    }

    pub fn parse(word: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == word)
    }

    /// The one place a mode becomes a way of rendering `target` with a model trained at `training`.
    pub fn plan(self, target: PixelSize, training: TrainingSize) -> RenderPlan {
        let as_is = |attention| RenderPlan { render: target, attention, denoiser: Denoiser::Whole, resize_to: None };
        match self {
            Mode::Default => as_is(AttentionScale::Default),
            Mode::Entropy => as_is(AttentionScale::Entropy { train_latent: training.latent() }),
            Mode::Resize => {
                let render = resize_render_size(target, training.pixels);
                RenderPlan {
                    render,
                    attention: AttentionScale::Default,
                    denoiser: Denoiser::Whole,
                    resize_to: (render != target).then_some(target),
                }
            }
        }
    }
}

/// The size `resize` renders at: about the training pixel count P with the target's aspect, each side
/// 8·round(√(P·W/H)/8) (Jin et al. 2023's baseline), kept within 64 … 4096.
pub fn resize_render_size(target: PixelSize, training: PixelSize) -> PixelSize {
    let pixels = (training.width * training.height) as f64;
    let side = |a: usize, b: usize| {
        let exact = (pixels * a as f64 / b as f64).sqrt();
        ((exact / 8.0).round() as usize * 8).clamp(64, 4096)
    };
    PixelSize { width: side(target.width, target.height), height: side(target.height, target.width) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::LatentSize;

    fn px(width: usize, height: usize) -> PixelSize {
        PixelSize { width, height }
    }

    #[test]
    fn resize_renders_near_the_training_pixel_count() {
        // 224² at 512² training: the training size itself.
        assert_eq!(resize_render_size(px(224, 224), px(512, 512)), px(512, 512));
        // 1024×512 (2:1): √(512²·2) = 724.1 → 728, √(512²/2) = 362.0 → 360.
        assert_eq!(resize_render_size(px(1024, 512), px(512, 512)), px(728, 360));
        assert_eq!(resize_render_size(px(192, 192), px(128, 128)), px(128, 128));
        // Extreme aspect ratios stay within the accepted sides.
        assert_eq!(resize_render_size(px(64, 4096), px(128, 128)), px(64, 1024));
    }

    #[test]
    fn each_mode_plans_its_render() {
        let training = TrainingSize { pixels: px(512, 512), vae_scale_factor: 8 };
        let target = px(768, 512);
        let default = Mode::Default.plan(target, training);
        assert_eq!((default.render, default.attention, default.resize_to), (target, AttentionScale::Default, None));
        let entropy = Mode::Entropy.plan(target, training);
        let train_latent = LatentSize { height: 64, width: 64 };
        assert_eq!((entropy.render, entropy.attention), (target, AttentionScale::Entropy { train_latent }));
        let resize = Mode::Resize.plan(target, training);
        assert_eq!((resize.render, resize.resize_to), (px(624, 416), Some(target)));
        // At its own render size, resize has nothing to resize.
        assert_eq!(Mode::Resize.plan(px(512, 512), training).resize_to, None);
    }
}
