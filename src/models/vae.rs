//! The decoder half of SD's `AutoencoderKL`: latents → RGB in [-1, 1].
//!
//! Reference: diffusers 0.42.1 `models/autoencoders/vae.py` (`Decoder`), `unets/unet_2d_blocks.py`
//! (`UNetMidBlock2D`, `UpDecoderBlock2D`), `resnet.py` and `attention_processor.py`. Only the decoder is
//! built: generation never encodes, so the encoder's weights are never read.
//!
//! We own these blocks (rather than reuse candle-transformers', which match numerically) for memory:
//! at 1024² the decoder's last convolutions would need multi-GB im2col buffers on backends that
//! materialise them, and its mid-block attention a 16384² score matrix. Here convolutions on large
//! inputs run in bands of rows, and the attention is the same query-chunked one the UNet uses.
//! Both are exact: every output pixel is computed from the same inputs with the same weights.
//!
//! [`VaeDecoder::decode_tiled`] is diffusers' tiled decode (`AutoencoderKL.enable_tiling()`), for images
//! whose untiled decode would not fit in memory: overlapping tiles decoded alone and blended. It is
//! not exact (each tile's mid-block attention sees only its tile), and matches diffusers' tiled image.

use super::layers::{Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::attention::{default_scale, scaled_dot_product_attention, AttentionBackend};
use crate::backend::Backends;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

/// `vae/config.json`, the fields the decoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (0.18215 for SD 2.1).
    #[serde(default = "scaling_factor")]
    pub scaling_factor: f64,
    /// SDXL: the VAE overflows in f16, so a half-precision run decodes in f32 (diffusers' `force_upcast`).
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// The image size the VAE was trained at; diffusers' tiled decode takes it as the tile size.
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
}

/// `sample_size`: one side, or [height, width] (of which diffusers' tiling reads the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    One(usize),
    Two([usize; 2]),
}

impl VaeConfig {
    /// diffusers' `tile_sample_min_size` (AutoencoderKL's default `sample_size` is 32).
    pub fn tile_sample_size(&self) -> usize {
        match self.sample_size {
            None => 32,
            Some(SampleSize::One(size)) => size,
            Some(SampleSize::Two([height, _])) => height,
        }
    }
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn scaling_factor() -> f64 {
    0.18215
}

/// The most decoder blocks accepted: each but the last doubles the image size (SD has 4, an 8× factor).
const MAX_BLOCKS: usize = 6;

impl VaeConfig {
    /// Refuses, with one line naming the key, what the decoder does not implement or cannot compute.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(format!("vae config: up block type {t:?} is not supported (UpDecoderBlock2D only)"));
        }
        if !self.mid_block_add_attention {
            return Err("vae config: mid_block_add_attention = false is not supported".into());
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err("vae config: shift_factor is not supported (SD 2.1 has none)".into());
        }
        if self.block_out_channels.is_empty() {
            return Err("vae config: block_out_channels is empty".into());
        }
        // Every value the decoder divides by, indexes with or sizes a layer from: one line naming the key.
        if self.block_out_channels.len() > MAX_BLOCKS {
            return Err(format!(
                "vae config: block_out_channels has {} blocks; at most {MAX_BLOCKS} are supported (SD has 4)",
                self.block_out_channels.len()
            ));
        }
        for (key, value) in [
            ("norm_num_groups", self.norm_num_groups),
            ("latent_channels", self.latent_channels),
            ("out_channels", self.out_channels),
        ] {
            if value == 0 {
                return Err(format!("vae config: {key} is 0; it must be at least 1"));
            }
        }
        for (i, &channels) in self.block_out_channels.iter().enumerate() {
            if channels == 0 || !channels.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "vae config: block_out_channels[{i}] = {channels} is not a positive multiple of norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!(
                "vae config: scaling_factor = {} must be a positive number (SD 2.1: 0.18215)",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}

// ---- tiled decode --------------------------------------------------------------------------------

/// The tiles of diffusers' `AutoencoderKL.enable_tiling()`, from the VAE's config.
// diffusers 0.42.1 autoencoder_kl.py L133-140 (tile sizes, overlap 0.25) and L378-380 (tiled_decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// `tile_latent_min_size`: latents per tile side, int(sample_size / 2^(blocks − 1)).
    pub latent_tile: usize,
    /// Latents from one tile's start to the next: int(latent_tile · (1 − 0.25)).
    pub stride: usize,
    /// Pixels over which a tile fades in from its neighbour: int(sample_size · 0.25).
    pub blend: usize,
    /// Pixels kept of each tile's side: sample_size − blend.
    pub row_limit: usize,
}

/// diffusers' `tile_overlap_factor`.
const TILE_OVERLAP: f64 = 0.25;

impl Tiling {
    /// The tiling of a VAE with this config; an error when its `sample_size` is too small to tile.
    pub fn of(cfg: &VaeConfig) -> std::result::Result<Self, String> {
        let sample = cfg.tile_sample_size();
        // Python's int() of float divisions, as diffusers computes them.
        let latent_tile = (sample as f64 / (1usize << (cfg.block_out_channels.len() - 1)) as f64) as usize;
        let stride = (latent_tile as f64 * (1.0 - TILE_OVERLAP)) as usize;
        let blend = (sample as f64 * TILE_OVERLAP) as usize;
        if stride == 0 || blend >= sample {
            return Err(format!("vae config: sample_size {sample} is too small to decode in tiles"));
        }
        Ok(Self { latent_tile, stride, blend, row_limit: sample - blend })
    }

    /// Whether a latent of this size is decoded in tiles: diffusers tiles only when a side exceeds one
    /// tile (`_decode`), else decodes it whole.
    pub fn applies(&self, latent_height: usize, latent_width: usize) -> bool {
        latent_height > self.latent_tile || latent_width > self.latent_tile
    }

    /// (rows, columns) of tiles for a latent of this size.
    pub fn grid(&self, latent_height: usize, latent_width: usize) -> (usize, usize) {
        (latent_height.div_ceil(self.stride), latent_width.div_ceil(self.stride))
    }
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first e rows (columns) of `b` fade in
/// from the last e of `a`, b[y] = a[y − e]·(1 − y/e) + b[y]·(y/e), with e = min(a's, b's, `extent`).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(a_len).min(b_len);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = [1usize; 4];
    shape[dim] = e;
    // The weights as torch gets them: Python floats (f64) rounded to the tensor's dtype.
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..e).map(|y| f(y as f64 / e as f64) as f32).collect();
        Tensor::from_vec(values, shape.as_slice(), b.device())?.to_dtype(b.dtype())
    };
    let faded = (a.narrow(dim, a_len - e, e)?.broadcast_mul(&weights(&|r| 1.0 - r)?)?
        + b.narrow(dim, 0, e)?.broadcast_mul(&weights(&|r| r)?)?)?;
    match b_len - e {
        0 => Ok(faded),
        rest => Tensor::cat(&[&faded, &b.narrow(dim, e, rest)?], dim),
    }
}

/// A VAE convolution: 3×3 with padding 1 or 1×1, computed in bands of rows where it would need a large
/// im2col buffer (models/layers.rs).
fn conv(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize, backends: &Backends) -> Result<Conv2d> {
    let config = Conv2dConfig { padding: kernel / 2, ..Default::default() };
    Ok(Conv2d::new(c_in, c_out, kernel, config, vb, backends)?.banded())
}

/// `ResnetBlock2D` without a time embedding (the VAE's); diffusers' VAE blocks use eps = 1e-6 throughout.
fn resnet(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize, backends: &Backends) -> Result<ResnetBlock2D> {
    let config = ResnetConfig { groups, eps: 1e-6, temb_channels: None, output_scale_factor: None, banded: true };
    ResnetBlock2D::new(vb, c_in, c_out, &config, backends)
}

/// The mid block's single-head self-attention over all pixels, with a residual.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// Always computed in f32 (see forward): the backend for f32 on this device.
    attention: AttentionBackend,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, backends: &Backends) -> Result<Self> {
        // SD 2.1's files use the pre-0.14 names; diffusers ≥ 0.14 writes to_q/to_k/to_v/to_out.0.
        let names = match vb.contains_tensor("to_q.weight") {
            true => ["to_q", "to_k", "to_v", "to_out.0"],
            false => ["query", "key", "value", "proj_attn"],
        };
        let linear = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            // Some old checkpoints store these as 1×1 conv kernels (c, c, 1, 1).
            let weight = match vb.get((channels, channels), "weight") {
                Ok(weight) => weight,
                Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
            };
            Ok(Linear::from_weights(weight, Some(vb.get(channels, "bias")?), backends))
        };
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, 1e-6, vb.pp("group_norm"), backends)?,
            to_q: linear(names[0])?,
            to_k: linear(names[1])?,
            to_v: linear(names[2])?,
            to_out: linear(names[3])?,
            attention: backends.attention_f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?; // (b, h·w, c)
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        // One head of width c: the VAE's scale is 1/√c and never changes with the image size. Always in
        // f32: a 512-wide head's logits are large, and f16 scores would round them coarsely.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (q32, k32, v32) = (f32(&q)?, f32(&k)?, f32(&v)?);
        let out =
            scaled_dot_product_attention(self.attention, &q32, &k32, &v32, default_scale(c))?.to_dtype(q.dtype())?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UpDecoderBlock2D`: resnets, then (except for the last block) 2× nearest upsampling and a conv.
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsampler {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(xs),
        }
    }
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_0: ResnetBlock2D,
    mid_attention: AttentionBlock,
    mid_resnet_1: ResnetBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: VaeConfig,
}

impl VaeDecoder {
    /// `vb` points at the VAE root (its keys start with `decoder.` and `post_quant_conv.`).
    /// `backends` are the model's, chosen once (crate::backend).
    pub fn new(vb: VarBuilder, cfg: VaeConfig, backends: &Backends) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let blocks = channels.len();
        let groups = cfg.norm_num_groups;
        let post_quant_conv = match cfg.use_post_quant_conv {
            true => Some(conv(vb.pp("post_quant_conv"), cfg.latent_channels, cfg.latent_channels, 1, backends)?),
            false => None,
        };
        let vb = vb.pp("decoder");
        let top = channels[blocks - 1];
        let mid = vb.pp("mid_block");
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let up_blocks = (0..blocks)
            .map(|i| {
                let vb = vb.pp("up_blocks").pp(i);
                let in_channels = if i == 0 { reversed[0] } else { reversed[i - 1] };
                let resnets = (0..cfg.layers_per_block + 1)
                    .map(|j| {
                        let c_in = if j == 0 { in_channels } else { reversed[i] };
                        resnet(vb.pp("resnets").pp(j), c_in, reversed[i], groups, backends)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let upsampler = match i + 1 < blocks {
                    true => Some(conv(vb.pp("upsamplers.0.conv"), reversed[i], reversed[i], 3, backends)?),
                    false => None,
                };
                Ok(UpDecoderBlock2D { resnets, upsampler })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            post_quant_conv,
            conv_in: conv(vb.pp("conv_in"), cfg.latent_channels, top, 3, backends)?,
            mid_resnet_0: resnet(mid.pp("resnets.0"), top, top, groups, backends)?,
            mid_attention: AttentionBlock::new(mid.pp("attentions.0"), top, groups, backends)?,
            mid_resnet_1: resnet(mid.pp("resnets.1"), top, top, groups, backends)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, channels[0], 1e-6, vb.pp("conv_norm_out"), backends)?,
            conv_out: conv(vb.pp("conv_out"), channels[0], cfg.out_channels, 3, backends)?,
            config: cfg,
        })
    }

    /// Decodes *unscaled* latents (b, 4, h, w), i.e. already divided by `scaling_factor`, to images
    /// (b, 3, 8h, 8w) in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid_resnet_0.forward(&xs, None)?;
        xs = self.mid_attention.forward(&xs)?;
        xs = self.mid_resnet_1.forward(&xs, None)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// [`Self::decode`] in overlapping tiles, as diffusers' `tiled_decode` (autoencoder_kl.py L364-408):
    /// tiles of `tiling.latent_tile` latents every `tiling.stride`, each decoded alone (smaller at the
    /// far edges); each then blended with the tile above and the one to its left — those already
    /// blended themselves, as diffusers' in-place blends leave them — cropped to `row_limit` pixels and
    /// put side by side. A latent that fits one tile is decoded whole, as diffusers does.
    pub fn decode_tiled(&self, latents: &Tensor, tiling: &Tiling) -> Result<Tensor> {
        let (_, _, height, width) = latents.dims4()?;
        if !tiling.applies(height, width) {
            return self.decode(latents);
        }
        // 1. every tile on its own: (b, 3, ≤ sample, ≤ sample)
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..height).step_by(tiling.stride) {
            let tile_rows = latents.narrow(2, i, tiling.latent_tile.min(height - i))?;
            let row = (0..width)
                .step_by(tiling.stride)
                .map(|j| self.decode(&tile_rows.narrow(3, j, tiling.latent_tile.min(width - j))?))
                .collect::<Result<Vec<_>>>()?;
            rows.push(row);
        }
        // 2. blend with the tile above, then the one to the left; crop; concatenate.
        let mut result_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].clone();
                if i > 0 {
                    tile = blend(&rows[i - 1][j], &tile, tiling.blend, 2)?;
                }
                if j > 0 {
                    tile = blend(&rows[i][j - 1], &tile, tiling.blend, 3)?;
                }
                rows[i][j] = tile;
            }
            let cropped = rows[i]
                .iter()
                .map(|tile| {
                    let (_, _, h, w) = tile.dims4()?;
                    tile.narrow(2, 0, tiling.row_limit.min(h))?.narrow(3, 0, tiling.row_limit.min(w))
                })
                .collect::<Result<Vec<_>>>()?;
            result_rows.push(Tensor::cat(&cropped, 3)?);
        }
        Tensor::cat(&result_rows, 2)
    }

    /// An estimate, on the high side, of the memory the untiled decode of a (latent_height ×
    /// latent_width) latent takes at its peak beyond the weights, in bytes of `dtype`: the decoder's
    /// largest stage (input and output of an up block's resnets at its resolution) times how many such
    /// pairs are alive at once. SD 2.1's VAE at 512² measured 2.1 (peak RSS 1040 MiB, weights and
    /// runtime ≈ 230 MiB, the stage 384 MiB; BENCHMARKS.md); 2.5 leaves a margin.
    pub fn untiled_peak_bytes(&self, latent_height: usize, latent_width: usize, dtype: DType) -> u64 {
        let channels: Vec<usize> = self.config.block_out_channels.iter().rev().copied().collect();
        let latent_pixels = (latent_height * latent_width) as u64;
        let stage = (0..channels.len())
            .map(|i| {
                // up block i runs at 2^i × the latent size; its input has the previous block's channels
                let pixels = latent_pixels << (2 * i);
                let c_in = channels[i.saturating_sub(1)];
                (c_in + channels[i]) as u64 * pixels
            })
            .max()
            .unwrap_or(0);
        stage * dtype.size_in_bytes() as u64 * 5 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(blocks: usize, sample_size: Option<usize>) -> VaeConfig {
        let mut json = serde_json::json!({ "block_out_channels": vec![128; blocks] });
        if let Some(size) = sample_size {
            json["sample_size"] = size.into();
        }
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn tiles_follow_diffusers_from_the_config() {
        // SD 2.1's VAE (sample_size 768): 96-latent tiles every 72, blended over 192 px, 576 kept.
        let sd21 = Tiling::of(&config(4, Some(768))).unwrap();
        assert_eq!(sd21, Tiling { latent_tile: 96, stride: 72, blend: 192, row_limit: 576 });
        assert!(!sd21.applies(96, 96) && sd21.applies(97, 8));
        assert_eq!(sd21.grid(128, 128), (2, 2)); // 1024²
        assert_eq!(sd21.grid(256, 256), (4, 4)); // 2048²
                                                 // The fixture's (128) and AutoencoderKL's default (32).
        assert_eq!(
            Tiling::of(&config(4, Some(128))).unwrap(),
            Tiling { latent_tile: 16, stride: 12, blend: 32, row_limit: 96 }
        );
        assert_eq!(
            Tiling::of(&config(4, None)).unwrap(),
            Tiling { latent_tile: 4, stride: 3, blend: 8, row_limit: 24 }
        );
        // [height, width]: diffusers reads the first.
        let two: VaeConfig =
            serde_json::from_value(serde_json::json!({ "block_out_channels": [128, 128], "sample_size": [64, 32] }))
                .unwrap();
        assert_eq!(Tiling::of(&two).unwrap().latent_tile, 32);
        // Too small to tile (diffusers' range() would get a step of 0): refused, not looped forever.
        assert!(Tiling::of(&config(4, Some(8))).unwrap_err().contains("sample_size 8"));
    }

    #[test]
    fn blend_fades_in_from_the_neighbour() {
        let device = Device::Cpu;
        let a = Tensor::ones((1, 1, 6, 2), DType::F32, &device).unwrap();
        let b = Tensor::zeros((1, 1, 3, 2), DType::F32, &device).unwrap();
        // e = min(6, 3, 4) = 3: b[y] = a[y − 3]·(1 − y/3) + b[y]·(y/3)
        let rows = blend(&a, &b, 4, 2).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let want = [1.0, 2.0 / 3.0, 1.0 / 3.0];
        for (row, want) in rows.iter().zip(want) {
            assert!(row.iter().all(|&v| (v - want).abs() < 1e-6), "{rows:?}");
        }
        // Across columns, with b longer than the extent: the rest of b is kept.
        let b = Tensor::full(2f32, (1, 1, 1, 5), &device).unwrap();
        let a = Tensor::zeros((1, 1, 1, 5), DType::F32, &device).unwrap();
        let cols = blend(&a, &b, 2, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(cols, [0.0, 1.0, 2.0, 2.0, 2.0]);
    }
}
