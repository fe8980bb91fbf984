//! diffusers' `ResnetBlock2D` (`models/resnet.py`, default time-embedding norm), shared by the UNet (with
//! a time embedding) and the VAE decoder (without), with diffusers' parameter names so weights map 1:1.

use super::layers::{silu, Conv2d, GroupNorm, Linear};
use crate::backend::Backends;
use crate::profile::{op, OpKind};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// How a network builds its ResNet blocks.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    /// The width of the time embedding projected into every block (the UNet's); None without one (VAE).
    pub temb_channels: Option<usize>,
    /// diffusers divides each block's output by this (the UNet's); None: no division (the VAE's, whose
    /// factor is 1).
    pub output_scale_factor: Option<f64>,
    /// Whether the convolutions are [`Conv2d::banded`] (the VAE's run at the full image size).
    pub banded: bool,
}

/// GroupNorm, SiLU, 3×3 conv, plus the projected time embedding (when there is one), GroupNorm, SiLU,
/// 3×3 conv, plus a (1×1 conv) shortcut, divided by the output scale factor (when there is one).
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: Option<f64>,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, c_in: usize, c_out: usize, cfg: &ResnetConfig, backends: &Backends) -> Result<Self> {
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let conv = |c_in, c_out, kernel, config, name: &str| {
            Conv2d::new(c_in, c_out, kernel, config, vb.pp(name), backends).map(|conv| match cfg.banded {
                true => conv.banded(),
                false => conv,
            })
        };
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups, c_in, cfg.eps, vb.pp("norm1"), backends)?,
            conv1: conv(c_in, c_out, 3, pad1, "conv1")?,
            time_emb_proj: match cfg.temb_channels {
                Some(temb) => Some(Linear::new(temb, c_out, vb.pp("time_emb_proj"), backends)?),
                None => None,
            },
            norm2: GroupNorm::new(cfg.groups, c_out, cfg.eps, vb.pp("norm2"), backends)?,
            conv2: conv(c_out, c_out, 3, pad1, "conv2")?,
            conv_shortcut: match c_in == c_out {
                true => None,
                false => Some(conv(c_in, c_out, 1, Conv2dConfig::default(), "conv_shortcut")?),
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` (b, temb_channels) must be given exactly when the block was built with a time embedding.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let device = xs.device();
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let hidden = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                // (b, c) → (b, c, 1, 1), added to every pixel.
                let time = proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
                op(OpKind::Elementwise, device, || time.broadcast_add(&hidden))?
            }
            (None, None) => hidden,
            _ => candle_core::bail!("ResnetBlock2D: a time embedding is given exactly to blocks built with one"),
        };
        let hidden = self.conv2.forward(&self.norm2.forward_silu(&hidden)?)?;
        op(OpKind::Elementwise, device, || match self.output_scale_factor {
            Some(factor) => (shortcut + hidden)? / factor,
            None => shortcut + hidden,
        })
    }
}
