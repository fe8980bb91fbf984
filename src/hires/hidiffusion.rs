//! HiDiffusion (Zhang et al. 2023): RAU-Net and MSW-MSA, as PyPI `hidiffusion` 0.1.10's
//! `apply_hidiffusion(pipe)` does it to a diffusers SD 1.5 / 2.1-base or SDXL pipeline
//! (hidiffusion/hidiffusion.py; the reference, read, not copied). Step indices count UNet calls
//! (the reference's per-module counters, which wrap at the pipeline's `_num_timesteps`); every
//! threshold is Python's int() of a float product.
//!
//! SD 1.5 / 2.1-base (its `sd15_hidiffusion_key`, `model == 'sd15'`):
//! - RAU-Net: while the step index < int(steps·T1_ratio), `down_blocks.0.downsamplers.0.conv` runs with
//!   stride 4, padding 2, dilation 2 (level 1 at a quarter of the latent side instead of half); the up
//!   path then upsamples (nearest) to the skip sizes as always. While the step index < int(steps·T2_ratio),
//!   `down_blocks.1` average-pools (2×2, ceil) after its first resnet + attention and `up_blocks.2`
//!   resizes back (bicubic) after its second. The ratios are 0.4 / 0.0 when the latent is under 256 on a
//!   side, else 0.7 / 0.3 (`switching_threshold_ratio_dict`, 'sd15_1024' / 'sd15_2048').
//! - MSW-MSA: `transformer_blocks.0` of `down_blocks.0.attentions.0/1` and `up_blocks.3.attentions.0/1/2`.
//!
//! SDXL (its `sdxl_hidiffusion_key`, `model == 'sdxl'`): the roles swap — T1 drives the pool, T2 the
//! downsampler.
//! - RAU-Net: `down_blocks.1` pools after its first resnet + attention and `up_blocks.1` resizes back
//!   after its second (T1); `down_blocks.1.downsamplers.0.conv` runs with stride 4, padding 2,
//!   dilation 2 (T2). `up_blocks.0.upsamplers.0.conv` is patched too but only counts calls: the
//!   upsampling follows the skip sizes, as every up block here does (the reference's
//!   `num_upsamplers += 12` makes diffusers always pass `upsample_size`).
//! - Latents under 512 on a side ('sdxl_2048', T1 0.4 / T2 0.0) run the "aggressive" RAU-Net
//!   (`is_aggressive_raunet = True`, `aggressive_step = 8`): the downsampler while the step index <
//!   int(8/50·steps) (T2 is not read), the pool while int(8/50·steps) ≤ index < int(steps·0.4).
//!   Otherwise ('sdxl_4096', 0.7 / 0.3): the pool while index < int(steps·0.7), the downsampler
//!   while index < int(steps·0.3). The reference turns the aggressive rule off when the model's
//!   name_or_path contains 'inpainting' or 'playground' (a text-to-image pipeline on a local folder
//!   with such a name); sdscale keys no rule on the model's path and always follows the name-free rule.
//!   `--hidiffusion-ratios T1:T2` means the non-aggressive rule with those ratios. (The reference keeps
//!   `aggressive_raunet` on its patched instances once set, so a pipeline that first rendered under
//!   4096 px stays aggressive for later, larger calls; sdscale decides per call from the latent size.)
//! - MSW-MSA: `transformer_blocks.0` and `.1` of `down_blocks.1.attentions.0/1` and
//!   `up_blocks.1.attentions.0/1/2` (ten windowed blocks per UNet call).
//! - The reference recognises a local SDXL folder by module names (its sdxl_module_key.txt) and uses
//!   these rules; its 'sdxl_turbo' rules apply only when name_or_path is exactly
//!   'stabilityai/sdxl-turbo' (a Hub id, never a local folder), so sdscale follows the SDXL rules for
//!   every SDXL-layout UNet, SDXL-Turbo's included.
//!
//! Both: each windowed transformer block's self-attention runs in 2×2 windows of ceil(H/2)×ceil(W/2)
//! (odd sides resized bicubically to even and back), the input rolled by (window_h//4·k,
//! window_w//4·k) (only when the row shift is > 0, as the reference tests it) and rolled back after.
//! k comes from one `torch.rand(1)` per windowed block call, in call order: ≤ 0.25 → 0, ≤ 0.5 → 1,
//! ≤ 0.75 → 2, else 3. The reference draws from torch's global generator after
//! `torch.manual_seed(seed)`; sdscale draws from a generator seeded with the image's seed, per image,
//! so an image does not depend on its batch.
//!
//! The reference recognises SD 1.5 / 2.1-base and SDXL by module names (sd15/sdxl_module_key.txt);
//! [`check_unet`] asks the same of the structure, and [`Rules::of`] tells the two apart by block count.

use super::{ConvGeometry, Part, Pool, StepContext, UNetPlan, WindowedAttention};
use crate::models::unet::UNetConfig;
use crate::rng::TorchGenerator;
use candle_core::{Result, Tensor};

/// HiDiffusion's settings. The defaults are the reference's.
#[derive(Debug, Clone, Copy, Default)]
pub struct HiDiffusion {
    /// (T1_ratio, T2_ratio) instead of the reference's size rule (for experiments and the T2 fixture).
    pub ratios: Option<(f64, f64)>,
    /// `apply_window_attn=False`: RAU-Net only.
    pub no_window: bool,
}

impl PartialEq for HiDiffusion {
    fn eq(&self, other: &Self) -> bool {
        let bits = |r: Option<(f64, f64)>| r.map(|(a, b)| (a.to_bits(), b.to_bits()));
        bits(self.ratios) == bits(other.ratios) && self.no_window == other.no_window
    }
}

impl Eq for HiDiffusion {}

impl std::hash::Hash for HiDiffusion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ratios.map(|(a, b)| (a.to_bits(), b.to_bits())).hash(state);
        self.no_window.hash(state);
    }
}

/// The RAU-Net downsampler: stride 4, padding 2, dilation 2 (a 3×3 kernel covering 5×5).
const RAU_DOWNSAMPLER: ConvGeometry = ConvGeometry { stride: 4, padding: 2, dilation: 2 };

/// The windowed transformer blocks (part, block, attention, transformer block), in the order the
/// forward calls them (the order of the shift draws). SD: down_blocks.0.attentions.0/1,
/// up_blocks.3.attentions.0/1/2, each its transformer_blocks.0.
const SD_WINDOWED: [(Part, usize, usize, usize); 5] =
    [(Part::Down, 0, 0, 0), (Part::Down, 0, 1, 0), (Part::Up, 3, 0, 0), (Part::Up, 3, 1, 0), (Part::Up, 3, 2, 0)];

/// SDXL: transformer_blocks.0/1 of down_blocks.1.attentions.0/1 and up_blocks.1.attentions.0/1/2.
const SDXL_WINDOWED: [(Part, usize, usize, usize); 10] = [
    (Part::Down, 1, 0, 0),
    (Part::Down, 1, 0, 1),
    (Part::Down, 1, 1, 0),
    (Part::Down, 1, 1, 1),
    (Part::Up, 1, 0, 0),
    (Part::Up, 1, 0, 1),
    (Part::Up, 1, 1, 0),
    (Part::Up, 1, 1, 1),
    (Part::Up, 1, 2, 0),
    (Part::Up, 1, 2, 1),
];

/// The reference's `aggressive_step`: the aggressive SDXL rule's boundary, int(8/50·steps).
const AGGRESSIVE_STEP: f64 = 8.0;

/// Which of the reference's rule sets a UNet gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// `model == 'sd15'`: SD 1.5 / 2.1-base (four blocks).
    Sd,
    /// `model == 'sdxl'`: SDXL (three blocks).
    Sdxl,
}

impl Rules {
    /// The rules of a UNet with `blocks` down blocks that [`check_unet`] accepted.
    pub fn of(blocks: usize) -> Self {
        if blocks == 3 {
            Rules::Sdxl
        } else {
            Rules::Sd
        }
    }
}

/// The reference's (T1_ratio, T2_ratio) for SD 1.5 / 2.1-base: 'sd15_1024' when the latent is under 256
/// on a side, else 'sd15_2048'.
pub fn default_ratios(latent: (usize, usize)) -> (f64, f64) {
    if latent.0 < 256 || latent.1 < 256 {
        (0.4, 0.0)
    } else {
        (0.7, 0.3)
    }
}

/// Whether the reference runs SDXL's aggressive RAU-Net at this latent size ('sdxl_2048': under 512
/// on a side).
pub fn sdxl_aggressive(latent: (usize, usize)) -> bool {
    latent.0 < 512 || latent.1 < 512
}

/// torch.rand(1)'s value → the shift step k.
pub fn shift_step(rand: f32) -> u8 {
    match rand {
        r if r <= 0.25 => 0,
        r if r <= 0.5 => 1,
        r if r <= 0.75 => 2,
        _ => 3,
    }
}

/// Refuses a UNet the reference would not recognise as SD 1.5 / 2.1-base or SDXL (by its module names:
/// a superset of sd15_module_key.txt or sdxl_module_key.txt).
/// - SD: four blocks of two resnets, attention in the first three down and last three up blocks, and
///   the `conv_shortcut`s of down_blocks.1/2.resnets.0, which exist when the channels change there.
/// - SDXL: three blocks of two resnets, attention in the last two down and first two up blocks, at
///   least 2 and 10 transformer blocks at levels 1 and 2, the same two `conv_shortcut`s, and the
///   added "text_time" embedding (`add_embedding`, `add_time_proj`).
pub fn check_unet(cfg: &UNetConfig) -> std::result::Result<(), String> {
    let c = &cfg.block_out_channels;
    let widths_change = |n: usize| c.len() == n && c[0] != c[1] && c[1] != c[2];
    let sd_layout = widths_change(4)
        && cfg.layers_per_block == 2
        && cfg.down_block_has_attention == [true, true, true, false]
        && cfg.up_block_has_attention == [false, true, true, true];
    let sdxl_layout = widths_change(3)
        && cfg.layers_per_block == 2
        && cfg.down_block_has_attention == [false, true, true]
        && cfg.up_block_has_attention == [true, true, false]
        && cfg.transformer_layers_per_block[1] >= 2
        && cfg.transformer_layers_per_block[2] >= 10
        && cfg.text_time.is_some();
    if sd_layout || sdxl_layout {
        Ok(())
    } else {
        Err("--mode hidiffusion supports the SD 1.5 / 2.1-base and SDXL UNet layouts (as the hidiffusion \
             package recognises them); this model's UNet differs: use --mode deepshrink"
            .into())
    }
}

impl HiDiffusion {
    pub fn plan(&self, step: StepContext, shift_generators: &mut [TorchGenerator]) -> UNetPlan {
        let mut plan = UNetPlan::default();
        let (index, steps) = (step.index, step.steps as f64);
        // Python's int(steps * ratio): truncation of the f64 product.
        let below = |ratio: f64| index < (steps * ratio) as usize;
        let windowed: &[(Part, usize, usize, usize)] = match Rules::of(step.blocks) {
            Rules::Sd => {
                let (t1_ratio, t2_ratio) = self.ratios.unwrap_or_else(|| default_ratios(step.latent));
                if below(t1_ratio) {
                    plan.downsamplers.push((0, RAU_DOWNSAMPLER));
                }
                if below(t2_ratio) {
                    plan.pool = Some(Pool { down_block: 1, up_block: 2 });
                }
                &SD_WINDOWED
            }
            Rules::Sdxl => {
                let (downsample, pool) = match self.ratios {
                    None if sdxl_aggressive(step.latent) => {
                        // aggressive_step/50 * _num_timesteps, in that order.
                        let start = (AGGRESSIVE_STEP / 50.0 * steps) as usize;
                        (index < start, start <= index && below(0.4))
                    }
                    ratios => {
                        let (t1_ratio, t2_ratio) = ratios.unwrap_or((0.7, 0.3));
                        (below(t2_ratio), below(t1_ratio))
                    }
                };
                if downsample {
                    plan.downsamplers.push((1, RAU_DOWNSAMPLER));
                }
                if pool {
                    plan.pool = Some(Pool { down_block: 1, up_block: 1 });
                }
                &SDXL_WINDOWED
            }
        };
        if !self.no_window {
            // Draws in call order, so the k of call j of every image is its generator's j-th draw.
            let draws: Vec<Vec<u8>> = shift_generators
                .iter_mut()
                .map(|generator| windowed.iter().map(|_| shift_step(generator.rand_f32())).collect())
                .collect();
            plan.windows = windowed
                .iter()
                .enumerate()
                .map(|(j, &(part, block, attention, transformer_block))| WindowedAttention {
                    part,
                    block,
                    attention,
                    transformer_block,
                    shifts: draws.iter().map(|image| image[j]).collect(),
                })
                .collect();
        }
        plan
    }
}

/// The window side and the shift of step k for an h×w map.
fn window_and_shift(h: usize, w: usize, k: u8) -> ((usize, usize), (usize, usize)) {
    let window = (h.div_ceil(2), w.div_ceil(2));
    let k = k as usize;
    (window, (window.0 / 4 * k, window.1 / 4 * k))
}

/// Keys per window of an h×w map: what a windowed self-attention attends over.
pub fn window_keys(h: usize, w: usize) -> usize {
    h.div_ceil(2) * w.div_ceil(2)
}

/// (b, h·w, c) tokens → (4b, window_h·window_w, c): each batch entry's 2×2 windows (row-major), after
/// the odd-side resize and the roll by −shift. Entry e uses image (e mod images)'s k.
pub fn partition(xs: &Tensor, h: usize, w: usize, shifts: &[u8]) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    let (wh, ww) = (h.div_ceil(2), w.div_ceil(2));
    let mut x = xs.reshape((b, h, w, c))?;
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        let image = x.permute((0, 3, 1, 2))?;
        x = super::resample::bicubic(&image, 2 * wh, 2 * ww, None)?.permute((0, 2, 3, 1))?;
    }
    let entries = (0..b)
        .map(|e| {
            let (_, (sh, sw)) = window_and_shift(h, w, shifts[e % shifts.len()]);
            let mut entry = x.narrow(0, e, 1)?;
            if sh > 0 {
                entry = entry.roll(-(sh as i32), 1)?.roll(-(sw as i32), 2)?;
            }
            // (1, 2, wh, 2, ww, c) → (1, 2, 2, wh, ww, c) → (4, wh·ww, c)
            entry.reshape((1, 2, wh, 2, ww, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((4, wh * ww, c))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&entries, 0)
}

/// The inverse of [`partition`]: (4b, window_h·window_w, c) → (b, h·w, c).
pub fn reverse(windows: &Tensor, h: usize, w: usize, shifts: &[u8]) -> Result<Tensor> {
    let (n, _, c) = windows.dims3()?;
    let b = n / 4;
    let (wh, ww) = (h.div_ceil(2), w.div_ceil(2));
    let entries = (0..b)
        .map(|e| {
            let (_, (sh, sw)) = window_and_shift(h, w, shifts[e % shifts.len()]);
            // (4, wh·ww, c) → (1, 2, 2, wh, ww, c) → (1, 2, wh, 2, ww, c) → (1, 2wh, 2ww, c)
            let entry = windows.narrow(0, 4 * e, 4)?.reshape((1, 2, 2, wh, ww, c))?;
            let entry = entry.permute((0, 1, 3, 2, 4, 5))?.reshape((1, 2 * wh, 2 * ww, c))?;
            if sh > 0 {
                entry.roll(sh as i32, 1)?.roll(sw as i32, 2)
            } else {
                Ok(entry)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut x = Tensor::cat(&entries, 0)?; // (b, 2wh, 2ww, c)
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        let image = x.permute((0, 3, 1, 2))?;
        x = super::resample::bicubic(&image, h, w, None)?.permute((0, 2, 3, 1))?;
    }
    x.contiguous()?.reshape((b, h * w, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn windows_round_trip_for_every_shift_and_even_sides() -> Result<()> {
        let xs = Tensor::arange(0f32, (2 * 8 * 12 * 3) as f32, &Device::Cpu)?.reshape((2, 8 * 12, 3))?;
        for shifts in [[0u8, 0], [1, 3], [2, 2]] {
            let windows = partition(&xs, 8, 12, &shifts)?;
            assert_eq!(windows.dims(), [8, 4 * 6, 3]);
            let back = reverse(&windows, 8, 12, &shifts)?;
            let diff = (back - &xs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        // Window 0 of entry 0 without a shift is the top-left 4×6 block.
        let windows = partition(&xs, 8, 12, &[0])?;
        let first: Vec<f32> = windows.narrow(0, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(&first[..3], &[0., 1., 2.]);
        assert_eq!(first[6 * 3], (12 * 3) as f32); // second row of the window starts a map row below
        Ok(())
    }

    #[test]
    fn the_plan_follows_the_reference_thresholds() {
        let step = |index| StepContext { index, steps: 5, timestep: 0.0, latent: (32, 32), blocks: 4 };
        let mut generators = vec![TorchGenerator::new(11)];
        let method = HiDiffusion::default();
        // 5 steps at 0.4 → T1 = 2, T2 = 0.
        assert_eq!(method.plan(step(1), &mut generators).downsamplers, [(0, RAU_DOWNSAMPLER)]);
        assert!(method.plan(step(2), &mut generators).downsamplers.is_empty());
        assert!(method.plan(step(0), &mut generators).pool.is_none());
        let t2 = HiDiffusion { ratios: Some((0.6, 0.4)), no_window: false };
        assert!(t2.plan(step(1), &mut generators).pool.is_some());
        assert!(t2.plan(step(2), &mut generators).pool.is_none());
        assert_eq!(default_ratios((255, 300)), (0.4, 0.0));
        assert_eq!(default_ratios((256, 300)), (0.7, 0.3));
        let plain = HiDiffusion { ratios: Some((0.0, 0.0)), no_window: true };
        assert!(plain.plan(step(0), &mut generators).is_plain());
    }

    #[test]
    fn the_sdxl_plan_follows_the_reference_thresholds() {
        let step = |index, steps, latent| StepContext { index, steps, timestep: 0.0, latent, blocks: 3 };
        let mut generators = vec![TorchGenerator::new(11)];
        let method = HiDiffusion::default();
        let pool = Some(Pool { down_block: 1, up_block: 1 });
        // Aggressive (latent under 512), 7 steps: the downsampler while index < int(0.16·7) = 1, the
        // pool while 1 ≤ index < int(7·0.4) = 2.
        let plan = method.plan(step(0, 7, (32, 48)), &mut generators);
        assert_eq!((plan.downsamplers.as_slice(), plan.pool), ([(1, RAU_DOWNSAMPLER)].as_slice(), None));
        assert_eq!(plan.windows.len(), 10);
        assert_eq!(plan.window(Part::Up, 1, 2, 1).map(<[u8]>::len), Some(1));
        assert!(plan.window(Part::Down, 0, 0, 0).is_none() && plan.window(Part::Down, 2, 0, 0).is_none());
        let plan = method.plan(step(1, 7, (32, 48)), &mut generators);
        assert_eq!((plan.downsamplers.len(), plan.pool), (0, pool));
        assert_eq!(method.plan(step(2, 7, (32, 48)), &mut generators).pool, None);
        // 5 steps: int(0.8) = 0, so no downsampler; the pool at 0 and 1.
        let plan = method.plan(step(0, 5, (511, 600)), &mut generators);
        assert_eq!((plan.downsamplers.len(), plan.pool), (0, pool));
        // 'sdxl_4096' (512 and more): pool while index < int(0.7·10) = 7, downsampler while < 3.
        let plan = method.plan(step(2, 10, (512, 512)), &mut generators);
        assert_eq!((plan.downsamplers.as_slice(), plan.pool), ([(1, RAU_DOWNSAMPLER)].as_slice(), pool));
        let plan = method.plan(step(6, 10, (512, 512)), &mut generators);
        assert_eq!((plan.downsamplers.len(), plan.pool), (0, pool));
        // Overridden ratios: the plain rule at any size (T1 the pool, T2 the downsampler).
        let t1t2 = HiDiffusion { ratios: Some((0.6, 0.4)), no_window: true };
        let plan = t1t2.plan(step(2, 5, (32, 32)), &mut generators);
        assert_eq!((plan.downsamplers.len(), plan.pool), (0, pool));
        let plan = t1t2.plan(step(1, 5, (32, 32)), &mut generators);
        assert_eq!((plan.downsamplers.len(), plan.pool, plan.windows.len()), (1, pool, 0));
    }
}
