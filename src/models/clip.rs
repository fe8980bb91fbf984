//! The CLIP text encoder of SD 2.x (OpenCLIP ViT-H/14's text tower) in transformers' `CLIPTextModel`
//! layout, so `text_encoder/model.safetensors` maps 1:1.
//!
//! Reference: transformers 5.24 `models/clip/modeling_clip.py`. We own this file rather than reuse
//! candle-transformers' SD CLIP because that one approximates GELU with tanh (SD 2.x's config says the
//! exact erf "gelu") and keeps its config fields private, so it cannot describe a fixture model.

use super::layers::Linear;
use crate::attention::default_scale;
use crate::backend::Backends;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

/// `text_encoder/config.json`, the fields the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// "gelu" (exact, SD 2.x) or "quick_gelu" (SD 1.x's OpenAI CLIP).
    pub hidden_act: String,
    /// `text_projection`'s width (CLIPTextModelWithProjection: SDXL's second text encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Refuses, with one line naming the key, values the encoder would divide by zero or index past.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "text encoder config: hidden_size = {} is not a positive multiple of num_attention_heads = {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_position_embeddings < crate::tokenizer::MAX_LENGTH {
            return Err(format!(
                "text encoder config: max_position_embeddings = {} is shorter than CLIP's {} tokens",
                self.max_position_embeddings,
                crate::tokenizer::MAX_LENGTH
            ));
        }
        for (key, value) in [("vocab_size", self.vocab_size), ("intermediate_size", self.intermediate_size)] {
            if value == 0 {
                return Err(format!("text encoder config: {key} is 0; it must be at least 1"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    Gelu,
    QuickGelu,
}

impl Activation {
    fn from_config(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "quick_gelu" => Ok(Self::QuickGelu),
            other => candle_core::bail!("text encoder hidden_act {other:?} is not supported (gelu, quick_gelu)"),
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings, attention, MLP, layer

struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let token_embedding = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(cfg.max_position_embeddings, cfg.hidden_size, vb.pp("position_embedding"))?;
        Ok(Self { token_embedding, position_embedding })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let position_ids = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&position_ids)?)
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, backends: &Backends) -> Result<Self> {
        let width = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(width, width, vb.pp("q_proj"), backends)?,
            k_proj: Linear::new(width, width, vb.pp("k_proj"), backends)?,
            v_proj: Linear::new(width, width, vb.pp("v_proj"), backends)?,
            out_proj: Linear::new(width, width, vb.pp("out_proj"), backends)?,
            num_heads: cfg.num_attention_heads,
            head_dim: width / cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let heads = |t: Tensor| t.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = heads(self.q_proj.forward(xs)?)?; // (b, heads, n, d)
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let in_dtype = q.dtype();
        // The softmax scale comes from attention.rs, the one place that chooses it: CLIP keeps 1/√d.
        let scores = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * default_scale(self.head_dim))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(causal_mask)?)?.to_dtype(in_dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?; // (b, n, c)
        self.out_proj.forward(&out)
    }
}

struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, backends: &Backends) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"), backends)?,
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"), backends)?,
            activation: Activation::from_config(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, backends: &Backends) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg, backends)?,
            layer_norm2: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg, backends)?,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, causal_mask)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

// ---------------------------------------------------------------------------------------------
// The model

pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextTransformer {
    /// `vb` points at the model root: the weights live under `text_model.` in the files SD 2.1 ships
    /// (transformers ≥ 5 writes them without that prefix); both spellings are accepted.
    /// `backends` are the model's, chosen once (crate::backend).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, backends: &Backends) -> Result<Self> {
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let embeddings = ClipTextEmbeddings::new(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp("encoder.layers").pp(i), cfg, backends))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self { embeddings, layers, final_layer_norm })
    }

    /// `input_ids` (b, n) u32 → `last_hidden_state` (b, n, hidden), final layer norm applied, as
    /// diffusers' pipeline reads `text_encoder(input_ids)[0]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let causal_mask = causal_mask(seq_len, input_ids.device())?;
        let mut xs = self.embeddings.forward(input_ids)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &causal_mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// What SDXL reads (`output_hidden_states=True`): `hidden_states[-2]`, the input of the last layer
    /// (no final layer norm), and the last layer's output after the final layer norm (for the pooled
    /// embedding).
    pub fn forward_penultimate(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq_len = input_ids.dim(1)?;
        let causal_mask = causal_mask(seq_len, input_ids.device())?;
        let mut xs = self.embeddings.forward(input_ids)?;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs;
            xs = layer.forward(&penultimate, &causal_mask)?;
        }
        Ok((penultimate, self.final_layer_norm.forward(&xs)?))
    }
}

/// (n, n) f32: 0 on and below the diagonal, −∞ above, so token i only sees tokens ≤ i.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (n, n), device)
}
