//! HiDiffusion (Zhang et al. 2023): RAU-Net and MSW-MSA, as PyPI `hidiffusion` 0.1.10's
//! `apply_hidiffusion(pipe)` does it to a diffusers SD 1.5 / 2.1-base pipeline (hidiffusion/hidiffusion.py;
//! the reference, read, not copied).
//!
//! - RAU-Net: while the step index < int(steps·T1_ratio), `down_blocks.0.downsamplers.0.conv` runs with
//!   stride 4, padding 2, dilation 2 (level 1 at a quarter of the latent side instead of half); the up
//!   path then upsamples (nearest) to the skip sizes as always. While the step index < int(steps·T2_ratio),
//!   `down_blocks.1` average-pools (2×2, ceil) after its first resnet + attention and `up_blocks.2`
//!   resizes back (bicubic) after its second. The ratios are 0.4 / 0.0 when the latent is under 256 on a
//!   side, else 0.7 / 0.3 (`switching_threshold_ratio_dict`, 'sd15_1024' / 'sd15_2048').
//! - MSW-MSA: the self-attention of `transformer_blocks.0` in `down_blocks.0` and `up_blocks.3` runs in
//!   2×2 windows of ceil(H/2)×ceil(W/2) (odd sides resized bicubically to even and back), the input
//!   rolled by (window_h//4·k, window_w//4·k) (only when the row shift is > 0, as the reference tests it)
//!   and rolled back after. k comes from one `torch.rand(1)` per windowed block call: ≤ 0.25 → 0,
//!   ≤ 0.5 → 1, ≤ 0.75 → 2, else 3. The reference draws from torch's global generator after
//!   `torch.manual_seed(seed)`; sdscale draws from a generator seeded with the image's seed, per image,
//!   so an image does not depend on its batch.
//!
//! The reference recognises SD 1.5 / 2.1-base by module names (its sd15_module_key.txt); [`check_unet`]
//! asks the same of the structure. SDXL's rules come with SDXL.

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

/// The windowed attentions, in the order the forward calls them (the order of the shift draws):
/// down_blocks.0.attentions.0/1, up_blocks.3.attentions.0/1/2.
const WINDOWED: [(Part, usize, usize); 5] =
    [(Part::Down, 0, 0), (Part::Down, 0, 1), (Part::Up, 3, 0), (Part::Up, 3, 1), (Part::Up, 3, 2)];

/// The reference's (T1_ratio, T2_ratio) for SD 1.5 / 2.1-base: 'sd15_1024' when the latent is under 256
/// on a side, else 'sd15_2048'.
pub fn default_ratios(latent: (usize, usize)) -> (f64, f64) {
    if latent.0 < 256 || latent.1 < 256 {
        (0.4, 0.0)
    } else {
        (0.7, 0.3)
    }
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

/// Refuses a UNet the reference would not recognise as SD 1.5 / 2.1-base (by its module names: four
/// blocks of two resnets, attention in the first three down and last three up blocks, and the
/// `conv_shortcut`s of down_blocks.1/2.resnets.0, which exist when the channels change there).
pub fn check_unet(cfg: &UNetConfig) -> std::result::Result<(), String> {
    let c = &cfg.block_out_channels;
    let sd_layout = c.len() == 4
        && cfg.layers_per_block == 2
        && cfg.down_block_has_attention == [true, true, true, false]
        && cfg.up_block_has_attention == [false, true, true, true]
        && c[0] != c[1]
        && c[1] != c[2];
    if sd_layout {
        Ok(())
    } else {
        Err("--mode hidiffusion supports the SD 1.5 / 2.1-base UNet layout (as the hidiffusion package \
             recognises it); this model's UNet differs: use --mode deepshrink"
            .into())
    }
}

impl HiDiffusion {
    pub fn plan(&self, step: StepContext, shift_generators: &mut [TorchGenerator]) -> UNetPlan {
        let (t1_ratio, t2_ratio) = self.ratios.unwrap_or_else(|| default_ratios(step.latent));
        // Python's int(steps * ratio): truncation of the f64 product.
        let t1 = (step.steps as f64 * t1_ratio) as usize;
        let t2 = (step.steps as f64 * t2_ratio) as usize;
        let mut plan = UNetPlan::default();
        if step.index < t1 {
            plan.downsamplers.push((0, RAU_DOWNSAMPLER));
        }
        if step.index < t2 {
            plan.pool = Some(Pool { down_block: 1, up_block: 2 });
        }
        if !self.no_window {
            // Draws in call order, so the k of call j of every image is its generator's j-th draw.
            let draws: Vec<Vec<u8>> = shift_generators
                .iter_mut()
                .map(|generator| WINDOWED.iter().map(|_| shift_step(generator.rand_f32())).collect())
                .collect();
            plan.windows = WINDOWED
                .iter()
                .enumerate()
                .map(|(j, &(part, block, attention))| WindowedAttention {
                    part,
                    block,
                    attention,
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
}
