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
}
