//! SD 2.1-base's `UNet2DConditionModel`, built from its `unet/config.json`, with diffusers' parameter
//! names so `diffusion_pytorch_model.safetensors` maps 1:1.
//!
//! Reference: diffusers 0.42.1 `models/unets/unet_2d_condition.py`, `unet_2d_blocks.py`,
//! `transformers/transformer_2d.py`, `attention.py` (BasicTransformerBlock, FeedForward/GEGLU) and
//! `attention_processor.py` (Attention + AttnProcessor2_0). We own this network because its attention
//! scale is the point of the project and candle-transformers keeps that scale private; the ResNet
//! blocks are the VAE's too (models/resnet.rs), the timestep embeddings candle-transformers' own, which
//! match diffusers.
//!
//! Structural methods (HiDiffusion, Deep Shrink) change this network per call through a
//! [`UNetPlan`] (hires/): the forward consults it at the few places they act — a downsampler's
//! geometry, a pool or resize between blocks, windowed self-attention — and otherwise runs as trained.
//!
//! Levels: down block i runs at level i (level 0 = full latent resolution), the mid block at the
//! deepest level, up block j at level (blocks − 1 − j). The attention-scale policy needs the level to
//! know how many tokens that layer saw in training.

use super::layers::{geglu, Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::attention::{
    merge_heads, multi_head_attention, scaled_dot_product_attention_measured, split_heads, AttentionBackend,
    AttentionObserver, AttentionScale, RowStats,
};
use crate::backend::{Backends, LinearBackend};
use crate::hires::{self, Part, UNetPlan, Upsample};
use crate::profile::{op, OpKind};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// Config

/// A config value diffusers accepts either as one number for every block or as a per-block list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize, name: &str) -> std::result::Result<Vec<usize>, String> {
        match self {
            PerBlock::One(value) => Ok(vec![*value; blocks]),
            PerBlock::Each(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::Each(values) => Err(format!("{name} has {} entries for {blocks} blocks", values.len())),
        }
    }
}

/// `unet/config.json` as diffusers writes it. Unknown keys are ignored; keys that would change the
/// network in a way this file does not implement are checked in [`UNetConfig::validate`].
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    /// The diffusers version that wrote the file (some pipelines read old configs differently).
    #[serde(rename = "_diffusers_version", default)]
    pub diffusers_version: Option<String>,
    pub sample_size: PerBlock,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu_str")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `null` in SDXL's config: false.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL's micro-conditioning: each of the 6 `add_time_ids` as Timesteps of this width.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// The `add_embedding` MLP's input: pooled text width + 6 · addition_time_embed_dim.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_str")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
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
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn norm_eps() -> f64 {
    1e-5
}
fn silu_str() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn eight_per_block() -> PerBlock {
    PerBlock::One(8)
}

/// The largest `sample_size` accepted, in latent pixels: 4096 px at SD's 8× VAE, the largest side sdscale renders.
const MAX_SAMPLE_SIZE: usize = 512;

/// The resolved UNet configuration: every per-block value expanded, every unsupported option refused.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// Training size in latent pixels (height, width): `sample_size`.
    pub sample_size: (usize, usize),
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Whether down block i has cross-attention (CrossAttnDownBlock2D) or not (DownBlock2D).
    pub down_block_has_attention: Vec<bool>,
    pub up_block_has_attention: Vec<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block. diffusers' historic naming: SD 2.x's `attention_head_dim`
    /// ([5, 10, 20, 20]) is really the head *count* when `num_attention_heads` is absent.
    pub num_attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    /// Attention logits and softmax in f32 even when computing in f16/bf16 (SD 2.1 at 768 overflows
    /// to NaN otherwise): diffusers' `upcast_attention`.
    pub upcast_attention: bool,
    /// SDXL's `addition_embed_type: "text_time"`: (addition_time_embed_dim,
    /// projection_class_embeddings_input_dim) of the added embedding, `add_embedding.linear_1/2`.
    pub text_time: Option<(usize, usize)>,
}

impl UNetConfig {
    pub fn from_file(file: UNetConfigFile) -> std::result::Result<Self, String> {
        let blocks = file.block_out_channels.len();
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| {
            format!("unet config: {key} = {value:?} is not supported by sdscale (SD 1.x/2.x and LDM UNets only)")
        };
        let truthy = |value: &serde_json::Value| match value {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Array(values) => values.iter().any(|v| v.as_bool() == Some(true)),
            _ => false,
        };
        if truthy(&file.only_cross_attention) {
            return Err(unsupported("only_cross_attention", &file.only_cross_attention));
        }
        if file.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", &true));
        }
        if file.center_input_sample {
            return Err(unsupported("center_input_sample", &true));
        }
        // diffusers unet_2d_condition.py: "text_time" (SDXL) adds add_time_proj + add_embedding.
        let text_time = match file.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => match (file.addition_time_embed_dim, file.projection_class_embeddings_input_dim) {
                (Some(time_dim), Some(input_dim)) if time_dim > 0 && input_dim > 6 * time_dim => {
                    Some((time_dim, input_dim))
                }
                values => {
                    return Err(format!(
                        "unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and \
                         projection_class_embeddings_input_dim (pooled width + 6 x the first), got {values:?}"
                    ))
                }
            },
            Some(other) => return Err(unsupported("addition_embed_type", &other)),
        };
        for (key, value) in [
            ("class_embed_type", &file.class_embed_type),
            ("timestep_post_act", &file.timestep_post_act),
            ("cross_attention_norm", &file.cross_attention_norm),
        ] {
            if value.is_some() {
                return Err(unsupported(key, value));
            }
        }
        for (key, value) in [
            ("encoder_hid_dim", &file.encoder_hid_dim),
            ("time_embedding_dim", &file.time_embedding_dim),
            ("time_cond_proj_dim", &file.time_cond_proj_dim),
            ("num_class_embeds", &file.num_class_embeds),
        ] {
            if value.is_some() {
                return Err(unsupported(key, value));
            }
        }
        for (key, value, expected) in [
            ("act_fn", &file.act_fn, "silu"),
            ("resnet_time_scale_shift", &file.resnet_time_scale_shift, "default"),
            ("time_embedding_type", &file.time_embedding_type, "positional"),
            ("attention_type", &file.attention_type, "default"),
        ] {
            if value != expected {
                return Err(unsupported(key, value));
            }
        }
        if file.resnet_skip_time_act {
            return Err(unsupported("resnet_skip_time_act", &true));
        }
        if file.conv_in_kernel != 3 || file.conv_out_kernel != 3 {
            return Err(unsupported("conv_in_kernel/conv_out_kernel", &(file.conv_in_kernel, file.conv_out_kernel)));
        }
        if file.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(unsupported("mid_block_type", &file.mid_block_type));
        }
        if blocks == 0 || file.down_block_types.len() != blocks || file.up_block_types.len() != blocks {
            return Err(format!(
                "unet config: {} down blocks, {} up blocks and {blocks} block_out_channels must agree",
                file.down_block_types.len(),
                file.up_block_types.len()
            ));
        }
        let down_block_has_attention = file
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(unsupported("down_block_types", &other)),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up_block_has_attention = file
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(unsupported("up_block_types", &other)),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let num_attention_heads = match &file.num_attention_heads {
            Some(heads) => heads.expand(blocks, "num_attention_heads")?,
            None => file.attention_head_dim.expand(blocks, "attention_head_dim")?,
        };
        let sample_size = match &file.sample_size {
            PerBlock::One(size) => (*size, *size),
            PerBlock::Each(sizes) if sizes.len() == 2 => (sizes[0], sizes[1]),
            PerBlock::Each(sizes) => return Err(unsupported("sample_size", sizes)),
        };
        // Every value the network divides by, indexes with or sizes a layer from: one line naming the key.
        let at_least_one = |key: &str, value: usize| match value {
            0 => Err(format!("unet config: {key} is 0; it must be at least 1")),
            _ => Ok(()),
        };
        at_least_one("in_channels", file.in_channels)?;
        at_least_one("out_channels", file.out_channels)?;
        at_least_one("norm_num_groups", file.norm_num_groups)?;
        at_least_one("cross_attention_dim", file.cross_attention_dim)?;
        at_least_one("layers_per_block", file.layers_per_block)?;
        if sample_size.0 == 0 || sample_size.1 == 0 || sample_size.0.max(sample_size.1) > MAX_SAMPLE_SIZE {
            return Err(format!(
                "unet config: sample_size {:?} is out of range; use 1 to {MAX_SAMPLE_SIZE} latent pixels",
                file.sample_size
            ));
        }
        for (key, value) in [("norm_eps", file.norm_eps), ("mid_block_scale_factor", file.mid_block_scale_factor)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("unet config: {key} = {value} must be a positive number"));
            }
        }
        if !file.freq_shift.is_finite() {
            return Err(format!("unet config: freq_shift = {} must be a finite number", file.freq_shift));
        }
        for (i, (&channels, &heads)) in file.block_out_channels.iter().zip(&num_attention_heads).enumerate() {
            if channels == 0 {
                return Err(format!("unet config: block_out_channels[{i}] is 0; it must be at least 1"));
            }
            if heads == 0 || channels % heads != 0 {
                return Err(format!(
                    "unet config: block {i} has {channels} channels, not divisible by {heads} heads \
                     (num_attention_heads, or attention_head_dim when that is absent)"
                ));
            }
            if channels % file.norm_num_groups != 0 {
                return Err(format!(
                    "unet config: block {i} has {channels} channels, not divisible by norm_num_groups = {}",
                    file.norm_num_groups
                ));
            }
        }
        Ok(Self {
            sample_size,
            in_channels: file.in_channels,
            out_channels: file.out_channels,
            flip_sin_to_cos: file.flip_sin_to_cos,
            freq_shift: file.freq_shift,
            down_block_has_attention,
            up_block_has_attention,
            block_out_channels: file.block_out_channels,
            layers_per_block: file.layers_per_block,
            downsample_padding: file.downsample_padding,
            mid_block_scale_factor: file.mid_block_scale_factor,
            norm_num_groups: file.norm_num_groups,
            norm_eps: file.norm_eps,
            cross_attention_dim: file.cross_attention_dim,
            transformer_layers_per_block: file
                .transformer_layers_per_block
                .expand(blocks, "transformer_layers_per_block")?,
            num_attention_heads,
            use_linear_projection: file.use_linear_projection,
            upcast_attention: file.upcast_attention.unwrap_or(false),
            text_time,
        })
    }

    /// The deepest level (the mid block's).
    fn deepest_level(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: diffusers' `Attention` with `AttnProcessor2_0`, the softmax scale chosen per call.

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    backend: AttentionBackend,
    /// The diffusers module path and UNet level, which the entropy probe reports.
    path: String,
    level: usize,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        level: usize,
        upcast_attention: bool,
        backends: &Backends,
    ) -> Result<Self> {
        let inner_dim = heads * head_dim;
        // Chosen once here: f32 logits and softmax for upcast layers whatever the compute dtype.
        let backend = if upcast_attention { crate::attention::upcast(backends.attention) } else { backends.attention };
        Ok(Self {
            to_q: Linear::no_bias(query_dim, inner_dim, vb.pp("to_q"), backends)?,
            to_k: Linear::no_bias(context_dim, inner_dim, vb.pp("to_k"), backends)?,
            to_v: Linear::no_bias(context_dim, inner_dim, vb.pp("to_v"), backends)?,
            to_out: Linear::new(inner_dim, query_dim, vb.pp("to_out.0"), backends)?,
            heads,
            backend,
            path: vb.prefix(),
            level,
        })
    }

    /// `xs` (b, n, c) attends to `context` (b, m, c'); `scale` multiplies the q·k logits. With a probe,
    /// the attention maps of its batch entry are measured on the way: the same output bit for bit in f32
    /// on the CPU; elsewhere the measured path computes in f32, so half-precision outputs differ by
    /// rounding.
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        scale: f64,
        probe: Option<&dyn AttentionObserver>,
    ) -> Result<Tensor> {
        let b = xs.dim(0)?;
        let device = xs.device();
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = match probe {
            // (b, n, heads·d)
            None => {
                op(OpKind::Attention, device, || multi_head_attention(self.backend, &q, &k, &v, self.heads, scale))?
            }
            Some(probe) => {
                // Batch entry e owns rows e·heads .. (e+1)·heads of the folded (b·heads) dimension.
                let first = probe.batch_entry() * self.heads;
                let mut stats = RowStats::default();
                let (q, k, v) =
                    (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?, split_heads(&v, self.heads)?);
                let rows = first..first + self.heads;
                let out = scaled_dot_product_attention_measured(self.backend, &q, &k, &v, scale, rows, &mut stats)?;
                probe.record(&self.path, self.level, k.dim(1)?, stats);
                merge_heads(&out, b, self.heads, xs.dim(1)?)?
            }
        };
        self.to_out.forward(&out)
    }
}

/// diffusers' `FeedForward` with the GEGLU activation: proj → (hidden, gate) → hidden·gelu(gate) → out.
struct FeedForward {
    proj: Linear,
    out: Linear,
    backend: LinearBackend,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, backends: &Backends) -> Result<Self> {
        let inner_dim = 4 * dim;
        Ok(Self {
            proj: Linear::new(dim, 2 * inner_dim, vb.pp("net.0.proj"), backends)?,
            out: Linear::new(inner_dim, dim, vb.pp("net.2"), backends)?,
            backend: backends.linear,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // GEGLU uses the exact (erf) GELU.
        let gated = geglu(self.backend, &self.proj.forward(xs)?)?;
        self.out.forward(&gated)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention to the text, GEGLU feed-forward, each
/// pre-normalised with a residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        (heads, head_dim): (usize, usize),
        level: usize,
        cfg: &UNetConfig,
        backends: &Backends,
    ) -> Result<Self> {
        let context_dim = cfg.cross_attention_dim;
        Ok(Self {
            norm1: LayerNorm::new(dim, cfg.norm_eps, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, level, cfg.upcast_attention, backends)?,
            norm2: LayerNorm::new(dim, cfg.norm_eps, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                head_dim,
                level,
                cfg.upcast_attention,
                backends,
            )?,
            norm3: LayerNorm::new(dim, cfg.norm_eps, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, backends)?,
        })
    }

    /// The probe watches self-attention only: cross-attention's 77 keys never change with the size.
    /// `window`: self-attention in HiDiffusion's shifted 2×2 windows of the (h, w) map, with each
    /// image's shift step (hires/hidiffusion.rs).
    fn forward(
        &self,
        xs: &Tensor,
        text: &Tensor,
        (self_scale, cross_scale): (f64, f64),
        probe: Option<&dyn AttentionObserver>,
        window: Option<(&[u8], usize, usize)>,
    ) -> Result<Tensor> {
        let add = |a: Tensor, b: &Tensor| op(OpKind::Elementwise, b.device(), || a + b);
        let normed = self.norm1.forward(xs)?;
        let attended = match window {
            None => self.attn1.forward(&normed, &normed, self_scale, probe)?,
            Some((shifts, h, w)) => {
                let windows = hires::hidiffusion::partition(&normed, h, w, shifts)?; // (4b, window, c)
                let out = self.attn1.forward(&windows, &windows, self_scale, probe)?;
                hires::hidiffusion::reverse(&out, h, w, shifts)?
            }
        };
        let xs = add(attended, xs)?;
        let xs = add(self.attn2.forward(&self.norm2.forward(&xs)?, text, cross_scale, None)?, &xs)?;
        add(self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
    }
}

/// 1×1 input/output projection of a `Transformer2DModel`: a Linear over tokens (SD 2.x,
/// `use_linear_projection`) or a 1×1 conv over the image (SD 1.x).
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, channels: usize, use_linear: bool, backends: &Backends) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(Linear::new(channels, channels, vb, backends)?)
        } else {
            Projection::Conv(Conv2d::new(channels, channels, 1, Conv2dConfig::default(), vb, backends)?)
        })
    }
}

/// `Transformer2DModel` (continuous input): group norm, project into tokens, transformer blocks,
/// project back, residual.
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    head_dim: usize,
    level: usize,
}

impl Transformer2DModel {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        level: usize,
        cfg: &UNetConfig,
        backends: &Backends,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        // diffusers hard-codes eps = 1e-6 for this group norm.
        let norm = GroupNorm::new(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"), backends)?;
        let transformer_blocks = (0..layers)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i);
                BasicTransformerBlock::new(vb, channels, (heads, head_dim), level, cfg, backends)
            })
            .collect::<Result<Vec<_>>>()?;
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm,
            proj_in: Projection::new(vb.pp("proj_in"), channels, linear, backends)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), channels, linear, backends)?,
            head_dim,
            level,
        })
    }

    /// `windows(j)`: the shift steps when `transformer_blocks.j`'s self-attention is windowed.
    fn forward<'w>(
        &self,
        xs: &Tensor,
        text: &Tensor,
        scale: AttentionScale,
        probe: Option<&dyn AttentionObserver>,
        windows: &dyn Fn(usize) -> Option<&'w [u8]>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let device = &xs.device().clone();
        let xs = self.norm.forward(xs)?;
        // (b, h·w, c)
        let to_tokens = |t: Tensor| op(OpKind::Elementwise, device, || t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)));
        let mut xs = match &self.proj_in {
            Projection::Linear(proj) => proj.forward(&to_tokens(xs)?)?,
            Projection::Conv(proj) => to_tokens(proj.forward(&xs)?)?,
        };
        // The policy decides both scales here, once per layer and call: N = the keys this call's
        // self-attention sees (h·w, or a window's in the transformer blocks HiDiffusion windows), T its
        // level's training count.
        let cross = scale.cross_attention(self.head_dim);
        let plain_scales = (scale.self_attention(self.head_dim, h * w, self.level), cross);
        let window_scales =
            (scale.self_attention(self.head_dim, hires::hidiffusion::window_keys(h, w), self.level), cross);
        for (j, block) in self.transformer_blocks.iter().enumerate() {
            let window = windows(j).map(|shifts| (shifts, h, w));
            let scales = if window.is_some() { window_scales } else { plain_scales };
            xs = block.forward(&xs, text, scales, probe, window)?;
        }
        // (b, c, h, w)
        let to_image = |t: Tensor| {
            op(OpKind::Elementwise, device, || t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous())
        };
        let xs = match &self.proj_out {
            Projection::Linear(proj) => to_image(proj.forward(&xs)?)?,
            Projection::Conv(proj) => proj.forward(&to_image(xs)?)?,
        };
        op(OpKind::Elementwise, device, || xs + residual)
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks

/// A ResNet block with the time embedding (models/resnet.rs), as the UNet's down, mid and up blocks use it.
fn resnet(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    temb: usize,
    cfg: &UNetConfig,
    output_scale_factor: f64,
    backends: &Backends,
) -> Result<ResnetBlock2D> {
    let config = ResnetConfig {
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        temb_channels: Some(temb),
        output_scale_factor: Some(output_scale_factor),
        banded: false,
    };
    ResnetBlock2D::new(vb, in_channels, out_channels, &config, backends)
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without), plus an optional stride-2 conv.
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Conv2d>,
}

/// A down block's output, the skips it leaves for the up path, and the size before its pool (if any).
type DownOutput = (Tensor, Vec<Tensor>, Option<(usize, usize)>);

/// What a block needs to know of the call's [`UNetPlan`] and of the rest of the call.
struct BlockCall<'a> {
    temb: &'a Tensor,
    text: &'a Tensor,
    scale: AttentionScale,
    probe: Option<&'a dyn AttentionObserver>,
    plan: &'a UNetPlan,
}

impl DownBlock {
    /// Returns the block output, every intermediate state the up path concatenates back, and (when
    /// the plan pools inside this block) the size before the pool.
    fn forward(&self, index: usize, xs: &Tensor, call: &BlockCall) -> Result<DownOutput> {
        let mut xs = xs.clone();
        let mut res_samples = Vec::with_capacity(self.resnets.len() + 1);
        let mut pooled_from = None;
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(call.temb))?;
            if let Some(attention) = self.attentions.get(i) {
                let windows = |j| call.plan.window(Part::Down, index, i, j);
                xs = attention.forward(&xs, call.text, call.scale, call.probe, &windows)?;
            }
            if i == 0 && call.plan.pool.is_some_and(|pool| pool.down_block == index) {
                let (_, _, h, w) = xs.dims4()?;
                pooled_from = Some((h, w));
                xs = hires::resample::avg_pool2x2_ceil(&xs)?;
            }
            res_samples.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = match call.plan.downsampler(index) {
                None => downsampler.forward(&xs)?,
                Some(g) => downsampler.forward_with(&xs, g.stride, g.padding, g.dilation)?,
            };
            res_samples.push(xs.clone());
        }
        Ok((xs, res_samples, pooled_from))
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: each resnet first concatenates one skip connection.
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `unpool_to`: the size before the plan's pool, to resize back to after the second resnet.
    fn forward(
        &self,
        index: usize,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        call: &BlockCall,
        unpool_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        if call.plan.match_skips {
            // Deep Shrink's up path: the earliest skip of this block sets the size of the sample and
            // of the block's other skips.
            let first = skips.len() - self.resnets.len();
            let (_, _, h, w) = skips[first].dims4()?;
            let (_, _, xh, xw) = xs.dims4()?;
            if (xh, xw) != (h, w) {
                xs = hires::resample::bicubic(&xs, h, w, None)?;
                for skip in &mut skips[first + 1..] {
                    *skip = hires::resample::bicubic(skip, h, w, None)?;
                }
            }
        }
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the down path produced one skip per up resnet");
            let joined = op(OpKind::Elementwise, xs.device(), || Tensor::cat(&[&xs, &skip], 1))?;
            xs = resnet.forward(&joined, Some(call.temb))?;
            if let Some(attention) = self.attentions.get(i) {
                let windows = |j| call.plan.window(Part::Up, index, i, j);
                xs = attention.forward(&xs, call.text, call.scale, call.probe, &windows)?;
            }
            if let (1, Some((h, w))) = (i, unpool_to) {
                xs = hires::resample::bicubic(&xs, h, w, None)?;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            // diffusers' Upsample2D: nearest-neighbour to the size of the next skip in line, which the
            // next block consumes (diffusers' `upsample_size`; not always 2×: odd latent sizes such as
            // 7 → 4 must come back to 7), then a 3×3 conv. Deep Shrink keeps diffusers' ×2 where the
            // latent sides allow it (hires::Upsample).
            let (_, _, h, w) = match call.plan.upsample {
                Upsample::ToSkip => skips.last().expect("every upsampling block has a skip below it").dims4()?,
                Upsample::Double => {
                    let (b, c, h, w) = xs.dims4()?;
                    (b, c, 2 * h, 2 * w)
                }
            };
            let upsampled = op(OpKind::Elementwise, xs.device(), || xs.upsample_nearest2d(h, w))?;
            xs = upsampler.forward(&upsampled)?;
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        text: &Tensor,
        scale: AttentionScale,
        probe: Option<&dyn AttentionObserver>,
    ) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attention.forward(&xs, text, scale, probe, &|_| None)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

// ---------------------------------------------------------------------------------------------
// The model

pub struct UNet2DConditionModel {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL ("text_time"): Timesteps of each add_time_id, and the MLP over [pooled, those] whose
    /// output is added to the time embedding.
    add_time_proj: Option<Timesteps>,
    add_embedding: Option<TimestepEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet2DConditionModel {
    /// The UNet with the backends for `vb`'s device and dtype ([`Backends::choose`]).
    pub fn new(vb: VarBuilder, cfg: UNetConfig) -> Result<Self> {
        let backends = Backends::choose(vb.device(), vb.dtype()).map_err(candle_core::Error::Msg)?;
        Self::with_backends(vb, cfg, &backends)
    }

    /// The UNet with `backends`, chosen once for the whole model (crate::backend).
    pub fn with_backends(vb: VarBuilder, cfg: UNetConfig, backends: &Backends) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let blocks = channels.len();
        let time_embed_dim = channels[0] * 4;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };

        let time_proj = Timesteps::new(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_embed_dim)?;
        let (add_time_proj, add_embedding) = match cfg.text_time {
            Some((time_dim, input_dim)) => (
                Some(Timesteps::new(time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)),
                Some(TimestepEmbedding::new(vb.pp("add_embedding"), input_dim, time_embed_dim)?),
            ),
            None => (None, None),
        };
        let conv_in = Conv2d::new(cfg.in_channels, channels[0], 3, pad1, vb.pp("conv_in"), backends)?;

        let transformer = |vb: VarBuilder, c: usize, block: usize, level: usize| {
            Transformer2DModel::new(
                vb,
                c,
                cfg.num_attention_heads[block],
                cfg.transformer_layers_per_block[block],
                level,
                &cfg,
                backends,
            )
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for (i, &out_channels) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c_in = if j == 0 { in_channels } else { out_channels };
                resnets.push(resnet(vb.pp("resnets").pp(j), c_in, out_channels, time_embed_dim, &cfg, 1.0, backends)?);
                if cfg.down_block_has_attention[i] {
                    attentions.push(transformer(vb.pp("attentions").pp(j), out_channels, i, i)?);
                }
            }
            let is_final_block = i + 1 == blocks;
            let downsampler = if is_final_block {
                None
            } else {
                let config = Conv2dConfig { padding: cfg.downsample_padding, stride: 2, ..Default::default() };
                Some(Conv2d::new(out_channels, out_channels, 3, config, vb.pp("downsamplers.0.conv"), backends)?)
            };
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let mid_channels = channels[blocks - 1];
        let mid_block = {
            let vb = vb.pp("mid_block");
            let scale = cfg.mid_block_scale_factor;
            MidBlock {
                resnets: vec![
                    resnet(vb.pp("resnets.0"), mid_channels, mid_channels, time_embed_dim, &cfg, scale, backends)?,
                    resnet(vb.pp("resnets.1"), mid_channels, mid_channels, time_embed_dim, &cfg, scale, backends)?,
                ],
                attentions: vec![transformer(vb.pp("attentions.0"), mid_channels, blocks - 1, cfg.deepest_level())?],
            }
        };

        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(blocks);
        for (i, &out_channels) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev_output_channels = if i == 0 { reversed[0] } else { reversed[i - 1] };
            let in_channels = reversed[(i + 1).min(blocks - 1)];
            let level = blocks - 1 - i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            let layers = cfg.layers_per_block + 1;
            for j in 0..layers {
                let skip_channels = if j == layers - 1 { in_channels } else { out_channels };
                let c_in = if j == 0 { prev_output_channels } else { out_channels };
                resnets.push(resnet(
                    vb.pp("resnets").pp(j),
                    c_in + skip_channels,
                    out_channels,
                    time_embed_dim,
                    &cfg,
                    1.0,
                    backends,
                )?);
                if cfg.up_block_has_attention[i] {
                    // Up block i mirrors down block (blocks − 1 − i): same heads and depth.
                    attentions.push(transformer(vb.pp("attentions").pp(j), out_channels, level, level)?);
                }
            }
            let is_final_block = i + 1 == blocks;
            let upsampler = if is_final_block {
                None
            } else {
                Some(Conv2d::new(out_channels, out_channels, 3, pad1, vb.pp("upsamplers.0.conv"), backends)?)
            };
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        let conv_norm_out =
            GroupNorm::new(cfg.norm_num_groups, channels[0], cfg.norm_eps, vb.pp("conv_norm_out"), backends)?;
        let conv_out = Conv2d::new(channels[0], cfg.out_channels, 3, pad1, vb.pp("conv_out"), backends)?;
        Ok(Self {
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: cfg,
        })
    }

    /// Predicts the noise in `sample` (b, 4, h, w) at `timestep`, conditioned on `encoder_hidden_states`
    /// (b, 77, cross_attention_dim), with the attention logits scaled by `scale`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        scale: AttentionScale,
    ) -> Result<Tensor> {
        let time = self.time_features(timestep, sample.dim(0)?, sample.dtype(), sample.device())?;
        self.forward_with_time(sample, &time, encoder_hidden_states, scale, None, &UNetPlan::default())
    }

    /// The sinusoidal embedding of t for a batch (b, block_out_channels[0]), computed in f32 as diffusers
    /// does, then cast to the compute dtype. It is all of a step that depends on t's value, so a captured
    /// CUDA graph of [`Self::forward_with_time`] serves every step.
    pub fn time_features(
        &self,
        timestep: f64,
        batch: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let timesteps = Tensor::full(timestep as f32, batch, device)?;
        self.time_proj.forward(&timesteps)?.to_dtype(dtype)
    }

    /// SDXL's added conditioning for a batch, to append to [`Self::time_features`] (dim 1): the pooled
    /// text embeddings (b, P) and the Timesteps of each of the 6 `add_time_ids` (b, 6), as diffusers'
    /// `get_aug_embed` builds `add_embeds` (the sinusoids in f32, then the compute dtype). `None` for
    /// a UNet without "text_time".
    pub fn added_features(&self, text_embeds: &Tensor, time_ids: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        let Some(add_time_proj) = &self.add_time_proj else { return Ok(None) };
        let batch = text_embeds.dim(0)?;
        let time_embeds =
            add_time_proj.forward(&time_ids.to_dtype(DType::F32)?.flatten_all()?)?.reshape((batch, ()))?;
        let features = Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?.to_dtype(dtype)?;
        Ok(Some(features))
    }

    /// The time embedding from time features: with "text_time", the features carry the added
    /// conditioning after the first block_out_channels[0] columns, and add_embedding's output is added.
    fn embedding(&self, time_features: &Tensor) -> Result<Tensor> {
        let Some(add_embedding) = &self.add_embedding else { return self.time_embedding.forward(time_features) };
        let width = self.config.block_out_channels[0];
        let added = time_features.narrow(1, width, time_features.dim(1)? - width)?;
        let emb = self.time_embedding.forward(&time_features.narrow(1, 0, width)?)?;
        emb + add_embedding.forward(&added)?
    }

    /// The UNet from the time features of [`Self::time_features`] on, with the structural changes of
    /// `plan` (hires/: `UNetPlan::default()` is the network as trained).
    pub fn forward_with_time(
        &self,
        sample: &Tensor,
        time_features: &Tensor,
        encoder_hidden_states: &Tensor,
        scale: AttentionScale,
        probe: Option<&dyn AttentionObserver>,
        plan: &UNetPlan,
    ) -> Result<Tensor> {
        let mut clock = crate::profile::Clock::start("unet", sample.device());
        // 1. time: the embedding MLP over the sinusoidal features.
        let emb = self.embedding(time_features)?;

        // 2. pre-process
        let mut xs = self.conv_in.forward(sample)?;
        clock.lap("time+conv_in");

        // 3. down: keep every intermediate state for the skip connections. The plan may change a
        // downsampler, pool inside a block, or resize what goes on after a block (skips keep their size).
        let call = BlockCall { temb: &emb, text: encoder_hidden_states, scale, probe, plan };
        let mut skips = vec![xs.clone()];
        let mut pooled_from = None;
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res_samples, pooled) = block.forward(i, &xs, &call)?;
            xs = out;
            pooled_from = pooled_from.or(pooled);
            skips.extend(res_samples);
            if let Some(factor) = plan.shrink_after(i) {
                let (_, _, h, w) = xs.dims4()?;
                let side = |n: usize| ((n as f64 * factor).floor() as usize).max(1);
                xs = hires::resample::bicubic(&xs, side(h), side(w), Some(factor))?;
            }
            clock.lap(format_args!("down_blocks.{i}"));
        }

        // 4. mid
        xs = self.mid_block.forward(&xs, &emb, encoder_hidden_states, scale, probe)?;
        clock.lap("mid_block");

        // 5. up: each block consumes its skips from the end, then upsamples to the size of the next
        // skip in line, so odd sizes round-trip exactly.
        for (i, block) in self.up_blocks.iter().enumerate() {
            let unpool_to = pooled_from.filter(|_| plan.pool.is_some_and(|pool| pool.up_block == i));
            xs = block.forward(i, &xs, &mut skips, &call, unpool_to)?;
            clock.lap(format_args!("up_blocks.{i}"));
        }

        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        let out = self.conv_out.forward(&xs)?;
        clock.lap("conv_out");
        clock.finish();
        Ok(out)
    }
}
