//! Render modes: how an image is made at a size other than the one the model was trained at.
//!
//! A mode is a pipeline concept. It decides three things, all in [`Mode::plan`]: the size the UNet
//! renders at, the attention scale, and how the latents are denoised; plus a resize afterwards. A new
//! mode is one variant and one arm of that match (MultiDiffusion is `Denoiser::Views`).

use crate::attention::AttentionScale;
use crate::hires::{DeepShrink, HiDiffusion, Structure};
use crate::size::{LatentSize, PixelSize, TrainingSize};
use serde::{Deserialize, Serialize};

/// The same words name the mode everywhere: `--mode`, `--modes`, file names, metadata, JSON.
///
/// A mode is a structure (how the UNet is run: as trained, HiDiffusion, Deep Shrink) times an
/// attention scale (1/√d or the entropy scale). The structural modes come in both scales, and the
/// entropy one is named `STRUCTURE+entropy`: one word per combination, so every place that takes a
/// mode takes it unchanged. `--entropy-scale` turns a structural `--mode` into its `+entropy` word.
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
    /// The paper's other baseline (Bar-Tal et al. 2023), as diffusers' panorama pipeline: denoise
    /// windows of the training size (64×64 latents for SD's 512²) with stride 8 and average them every
    /// step.
    Multidiffusion,
    /// HiDiffusion (RAU-Net + MSW-MSA), as the PyPI `hidiffusion` package applies it: SD 1.5 / 2.1-base
    /// and SDXL, each with the package's rules for it.
    Hidiffusion,
    /// Kohya's Deep Shrink, as diffusers' community `kohya_hires_fix` pipeline (`--deepshrink` entries).
    Deepshrink,
    /// HiDiffusion with the entropy scale (each self-attention call's own key count N).
    #[value(name = "hidiffusion+entropy")]
    #[serde(rename = "hidiffusion+entropy")]
    HidiffusionEntropy,
    /// Deep Shrink with the entropy scale.
    #[value(name = "deepshrink+entropy")]
    #[serde(rename = "deepshrink+entropy")]
    DeepshrinkEntropy,
}

/// Which windows MultiDiffusion denoises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewRule {
    /// diffusers' `get_views`: a side of at most a window's side is one window (so at the training size
    /// and below MultiDiffusion is the plain pipeline).
    #[default]
    Diffusers,
    /// The original MultiDiffusion code's `get_views` (omerbt/MultiDiffusion), which has no such guard:
    /// below a window's side it makes windows with negative offsets, sliced as Python slices them. This is
    /// the setting behind the paper's MD row at 224²; for reproducing it, not a recommendation.
    Original,
}

/// Options of the modes that have any, set once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeOptions {
    pub views: ViewRule,
    /// MultiDiffusion panoramas that wrap around horizontally (one row of windows, as diffusers).
    pub circular: bool,
    pub hidiffusion: HiDiffusion,
    pub deepshrink: DeepShrink,
}

/// MultiDiffusion's windows, in latent pixels, as diffusers' panorama pipeline lays them out.
///
/// A window is one training-size image: the UNet only ever sees the size it was trained at, which is
/// MultiDiffusion's whole idea. diffusers' `StableDiffusionPanoramaPipeline` hard-codes `window_size=64`,
/// SD's 512² (`sample_size` 64); here it is the model's training latent size (`sample_size`, or
/// `--train-size`): the same 64 for SD 1.5 and 2.1-base, 96 for SD 2.1 at 768², 32 for LDM-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Views {
    pub window: LatentSize,
    pub stride: usize,
    pub rule: ViewRule,
    pub circular: bool,
}

/// Python's `a // b` (floor division, also for a negative divisor, which the original rule has).
fn floor_div(a: i64, b: i64) -> i64 {
    let quotient = a / b;
    if a % b != 0 && ((a < 0) != (b < 0)) {
        quotient - 1
    } else {
        quotient
    }
}

/// One window: rows and columns of the latents (columns may run past the right edge when circular:
/// they wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub rows: (usize, usize),
    pub cols: (usize, usize),
}

impl Views {
    /// The windows over (height, width) latents, in diffusers' (row-major) order.
    pub fn windows(&self, height: usize, width: usize) -> Vec<Window> {
        let (window_height, window_width, stride) =
            (self.window.height as i64, self.window.width as i64, self.stride as i64);
        let (h, w) = (height as i64, width as i64);
        let blocks = |side: i64, window: i64, circular: bool| -> i64 {
            match self.rule {
                ViewRule::Diffusers if side <= window => 1,
                ViewRule::Diffusers if circular => side / stride,
                // Python's // floors: below the window this goes negative in the original code.
                _ => (side - window).div_euclid(stride) + 1,
            }
        };
        let (rows, cols) = (blocks(h, window_height, false), blocks(w, window_width, self.circular));
        let total = rows * cols;
        // Python's slice bounds: a negative index counts from the end, then both clamp to the side.
        let clamp = |i: i64, side: i64| if i < 0 { (i + side).max(0) } else { i.min(side) } as usize;
        (0..total.max(0))
            .map(|i| {
                let (row_start, col_start) = (floor_div(i, cols) * stride, (i - cols * floor_div(i, cols)) * stride);
                let (row_end, col_end) = (row_start + window_height, col_start + window_width);
                let rows = (clamp(row_start, h), clamp(row_end, h));
                let cols = if self.circular {
                    (col_start as usize, col_end as usize)
                } else {
                    (clamp(col_start, w), clamp(col_end, w))
                };
                Window { rows, cols }
            })
            .filter(|window| window.rows.1 > window.rows.0 && window.cols.1 > window.cols.0)
            .collect()
    }
}

/// How the denoising loop turns latents into the next latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denoiser {
    /// One guided UNet call on the whole latent image per step, as `StableDiffusionPipeline`.
    Whole,
    /// MultiDiffusion: the guided UNet and the scheduler step on each window, averaged.
    Views(Views),
}

/// Everything a mode decides for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderPlan {
    /// The size the UNet runs at.
    pub render: PixelSize,
    pub attention: AttentionScale,
    /// How the UNet runs at each step (hires/).
    pub structure: Structure,
    pub denoiser: Denoiser,
    /// Resize the decoded image to this size (Lanczos3), when it differs from `render`.
    pub resize_to: Option<PixelSize>,
}

impl RenderPlan {
    /// What a mode cannot do at a size, refused before any work.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Denoiser::Views(views) = self.denoiser {
            // diffusers' circular value extraction indexes each window with its own row offsets,
            // which is only right for one row of windows; so is ours, by the same rule.
            let latent_rows = self.render.height.div_ceil(8);
            if views.circular && latent_rows > views.window.height {
                anyhow::bail!(
                    "--circular wraps one row of MultiDiffusion windows: the height ({} px) must be at most {} px \
                     (the model's training height)",
                    self.render.height,
                    views.window.height * 8
                );
            }
        }
        Ok(())
    }
}

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::Default,
        Mode::Entropy,
        Mode::Resize,
        Mode::Multidiffusion,
        Mode::Hidiffusion,
        Mode::Deepshrink,
        Mode::HidiffusionEntropy,
        Mode::DeepshrinkEntropy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Entropy => "entropy",
            Mode::Resize => "resize",
            Mode::Multidiffusion => "multidiffusion",
            Mode::Hidiffusion => "hidiffusion",
            Mode::Deepshrink => "deepshrink",
            Mode::HidiffusionEntropy => "hidiffusion+entropy",
            Mode::DeepshrinkEntropy => "deepshrink+entropy",
        }
    }

    /// The mode `--entropy-scale` makes of this one: `default` → `entropy`, a structural mode → its
    /// `+entropy` word; None where the entropy scale does not compose (resize, MultiDiffusion).
    pub fn with_entropy_scale(self) -> Option<Mode> {
        match self {
            Mode::Default | Mode::Entropy => Some(Mode::Entropy),
            Mode::Hidiffusion | Mode::HidiffusionEntropy => Some(Mode::HidiffusionEntropy),
            Mode::Deepshrink | Mode::DeepshrinkEntropy => Some(Mode::DeepshrinkEntropy),
            Mode::Resize | Mode::Multidiffusion => None,
        }
    }

    /// Whether the mode runs HiDiffusion (with either scale).
    pub fn is_hidiffusion(self) -> bool {
        matches!(self, Mode::Hidiffusion | Mode::HidiffusionEntropy)
    }

    /// Whether the mode runs Deep Shrink (with either scale).
    pub fn is_deepshrink(self) -> bool {
        matches!(self, Mode::Deepshrink | Mode::DeepshrinkEntropy)
    }

    pub fn parse(word: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == word)
    }

    /// The one place a mode becomes a way of rendering `target` with a model trained at `training`.
    pub fn plan(self, target: PixelSize, training: TrainingSize, options: ModeOptions) -> RenderPlan {
        let entropy = AttentionScale::Entropy { train_latent: training.latent() };
        let structured = |structure, attention| RenderPlan {
            render: target,
            attention,
            structure,
            denoiser: Denoiser::Whole,
            resize_to: None,
        };
        let as_is = |attention| structured(Structure::Plain, attention);
        match self {
            Mode::Default => as_is(AttentionScale::Default),
            Mode::Entropy => as_is(entropy),
            Mode::Hidiffusion => structured(Structure::HiDiffusion(options.hidiffusion), AttentionScale::Default),
            Mode::HidiffusionEntropy => structured(Structure::HiDiffusion(options.hidiffusion), entropy),
            Mode::Deepshrink => structured(Structure::DeepShrink(options.deepshrink), AttentionScale::Default),
            Mode::DeepshrinkEntropy => structured(Structure::DeepShrink(options.deepshrink), entropy),
            Mode::Resize => {
                let render = resize_render_size(target, training.pixels);
                RenderPlan {
                    render,
                    attention: AttentionScale::Default,
                    structure: Structure::Plain,
                    denoiser: Denoiser::Whole,
                    resize_to: (render != target).then_some(target),
                }
            }
            Mode::Multidiffusion => RenderPlan {
                render: target,
                attention: AttentionScale::Default,
                structure: Structure::Plain,
                denoiser: Denoiser::Views(Views {
                    window: training.latent(),
                    stride: 8,
                    rule: options.views,
                    circular: options.circular,
                }),
                resize_to: None,
            },
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

/// A comma-separated `--modes`-style list (`default,entropy`), in the order given; unknown words and a
/// mode listed twice are refused.
pub fn parse_modes(flag: &str, text: &str) -> anyhow::Result<Vec<Mode>> {
    let mut modes = Vec::new();
    for word in text.split(',').map(str::trim) {
        let Some(mode) = Mode::parse(word) else {
            let known: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
            anyhow::bail!("{flag}: {word:?} is not a mode; use {}", known.join(", "));
        };
        if modes.contains(&mode) {
            anyhow::bail!("{flag}: {} is listed twice", mode.as_str());
        }
        modes.push(mode);
    }
    Ok(modes)
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
        let default = Mode::Default.plan(target, training, ModeOptions::default());
        assert_eq!((default.render, default.attention, default.resize_to), (target, AttentionScale::Default, None));
        let entropy = Mode::Entropy.plan(target, training, ModeOptions::default());
        let train_latent = LatentSize { height: 64, width: 64 };
        assert_eq!((entropy.render, entropy.attention), (target, AttentionScale::Entropy { train_latent }));
        let resize = Mode::Resize.plan(target, training, ModeOptions::default());
        assert_eq!((resize.render, resize.resize_to), (px(624, 416), Some(target)));
        // At its own render size, resize has nothing to resize.
        assert_eq!(Mode::Resize.plan(px(512, 512), training, ModeOptions::default()).resize_to, None);
    }

    fn windows(rule: ViewRule, circular: bool, height: usize, width: usize) -> Vec<((usize, usize), (usize, usize))> {
        let views = Views { window: LatentSize { height: 64, width: 64 }, stride: 8, rule, circular };
        views.windows(height, width).into_iter().map(|w| (w.rows, w.cols)).collect()
    }

    #[test]
    fn diffusers_views_tile_row_major_and_leave_a_ragged_edge_uncovered() {
        assert_eq!(windows(ViewRule::Diffusers, false, 28, 28), [((0, 28), (0, 28))]);
        let grid = windows(ViewRule::Diffusers, false, 88, 80);
        assert_eq!(grid.len(), 4 * 3);
        assert_eq!((grid[0], grid[1], grid[3]), (((0, 64), (0, 64)), ((0, 64), (8, 72)), ((8, 72), (0, 64))));
        // 68 rows: (68 − 64) // 8 + 1 = 1 row of windows, rows 64..67 never covered.
        assert!(windows(ViewRule::Diffusers, false, 68, 80).iter().all(|&(rows, _)| rows == (0, 64)));
        // Circular: width // 8 windows, the last ones wrapping past the edge.
        let ring = windows(ViewRule::Diffusers, true, 64, 128);
        assert_eq!((ring.len(), ring[15]), (16, ((0, 64), (120, 184))));
    }

    #[test]
    fn the_original_rule_reproduces_the_papers_224_setting() {
        // omerbt/MultiDiffusion at 28×28 latents: (28 − 64) // 8 + 1 = −4 blocks a side, 16 windows
        // whose negative offsets Python's slicing wraps (e.g. rows 20..28 × cols 4..28).
        let views = windows(ViewRule::Original, false, 28, 28);
        assert_eq!(views.len(), 16);
        assert_eq!(views[0], ((0, 28), (0, 28)));
        assert_eq!(views[1], ((20, 28), (4, 28)));
        assert_eq!(views[5], ((12, 28), (4, 28)));
        // Above 64 latents both rules agree.
        assert_eq!(windows(ViewRule::Original, false, 88, 80), windows(ViewRule::Diffusers, false, 88, 80));
    }

    #[test]
    fn mode_lists_name_unknown_and_repeated_words() {
        assert_eq!(parse_modes("--modes", "default, entropy").unwrap(), [Mode::Default, Mode::Entropy]);
        let err = parse_modes("--modes", "default,fast").unwrap_err().to_string();
        assert!(
            err.contains("\"fast\" is not a mode; use default, entropy, resize, multidiffusion, hidiffusion"),
            "{err}"
        );
        assert!(parse_modes("--modes", "resize,resize").unwrap_err().to_string().contains("resize is listed twice"));
        assert!(parse_modes("--modes", "").is_err());
    }

    /// The window is the training latent size: SD's 512² gives diffusers' 64, 768² gives 96, LDM's 256²
    /// gives 32; a non-square `--train-size` gives a non-square window. Windows per side: 1 up to the
    /// window, else (side − window) // 8 + 1.
    #[test]
    fn the_window_is_one_training_size_image() {
        let window_of = |training: PixelSize| {
            let training = TrainingSize { pixels: training, vae_scale_factor: 8 };
            match Mode::Multidiffusion.plan(px(1024, 768), training, ModeOptions::default()).denoiser {
                Denoiser::Views(views) => views,
                Denoiser::Whole => panic!("MultiDiffusion denoises windows"),
            }
        };
        for (side, window) in [(512, 64), (768, 96), (256, 32)] {
            assert_eq!(window_of(px(side, side)).window, LatentSize { height: window, width: window });
        }
        // 768² at 256² training: 96 latents a side, (96 − 32) // 8 + 1 = 9 windows a side.
        let ldm = window_of(px(256, 256));
        assert_eq!(ldm.windows(96, 96).len(), 9 * 9);
        assert!(ldm.windows(96, 96).iter().all(|w| w.rows.1 - w.rows.0 == 32 && w.cols.1 - w.cols.0 == 32));
        // Non-square: 64 rows × 80 columns of window over 96×128 latents: 5 × 7.
        let wide = window_of(px(640, 512));
        assert_eq!((wide.window.height, wide.window.width), (64, 80));
        assert_eq!(wide.windows(96, 128).len(), 5 * 7);
        // Circular panoramas are one row of windows: at most the training height.
        let plan = Mode::Multidiffusion.plan(
            px(1024, 320),
            TrainingSize { pixels: px(256, 256), vae_scale_factor: 8 },
            ModeOptions { circular: true, ..ModeOptions::default() },
        );
        assert!(plan.check().unwrap_err().to_string().contains("at most 256 px"));
    }
}
