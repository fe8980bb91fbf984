//! The decoder half of SD's `AutoencoderKL`: latents → RGB in [-1, 1].
//!
//! Reference: diffusers 0.42.1 `models/autoencoders/vae.py` (`Decoder`) and `autoencoder_kl.py`. The
//! blocks are candle-transformers' (`UNetMidBlock2D`, `UpDecoderBlock2D`), which match diffusers and
//! accept both spellings of the attention weights (SD 2.1's files say `query`/`key`/`value`/`proj_attn`,
//! diffusers 0.42 writes `to_q`/`to_k`/`to_v`/`to_out.0`). Only the decoder is built: generation never
//! encodes, so the encoder's weights are never read.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};
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

impl VaeConfig {
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
        Ok(())
    }
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: VaeConfig,
}

impl VaeDecoder {
    /// `vb` points at the VAE root (its keys start with `decoder.` and `post_quant_conv.`).
    pub fn new(vb: VarBuilder, cfg: VaeConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let blocks = channels.len();
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let post_quant_conv = match cfg.use_post_quant_conv {
            true => {
                Some(conv2d(cfg.latent_channels, cfg.latent_channels, 1, Default::default(), vb.pp("post_quant_conv"))?)
            }
            false => None,
        };
        let vb = vb.pp("decoder");
        let top = channels[blocks - 1];
        let conv_in = conv2d(cfg.latent_channels, top, 3, pad1, vb.pp("conv_in"))?;
        let mid_config = UNetMidBlock2DConfig {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: Some(cfg.norm_num_groups),
            // One head over all channels, as diffusers' VAE (attention_head_dim = channels).
            attn_num_head_channels: None,
            output_scale_factor: 1.0,
        };
        let mid_block = UNetMidBlock2D::new(vb.pp("mid_block"), top, None, mid_config)?;
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let up_blocks = (0..blocks)
            .map(|i| {
                let in_channels = if i == 0 { reversed[0] } else { reversed[i - 1] };
                let config = UpDecoderBlock2DConfig {
                    num_layers: cfg.layers_per_block + 1,
                    resnet_eps: 1e-6,
                    resnet_groups: cfg.norm_num_groups,
                    output_scale_factor: 1.0,
                    add_upsample: i + 1 < blocks,
                };
                UpDecoderBlock2D::new(vb.pp("up_blocks").pp(i), in_channels, reversed[i], config)
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = group_norm(cfg.norm_num_groups, channels[0], 1e-6, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(channels[0], cfg.out_channels, 3, pad1, vb.pp("conv_out"))?;
        Ok(Self { post_quant_conv, conv_in, mid_block, up_blocks, conv_norm_out, conv_out, config: cfg })
    }

    /// Decodes *unscaled* latents (b, 4, h, w), i.e. already divided by `scaling_factor`, to images
    /// (b, 3, 8h, 8w) in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.mid_block.forward(&self.conv_in.forward(&xs)?, None)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = candle_nn::ops::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
