//! LDM-256's text encoder, `LDMBertModel` (CompVis/ldm-text2im-large-256 `bert/`), with diffusers'
//! parameter names so `bert/model.safetensors` maps 1:1.
//!
//! Reference: diffusers 0.42.1 `pipelines/latent_diffusion/pipeline_latent_diffusion.py` (LDMBertConfig,
//! LDMBertAttention, LDMBertEncoderLayer, LDMBertEncoder, LDMBertModel). A BART-style encoder: learned
//! positions added to the token embeddings, pre-LayerNorm layers (self-attention, then an erf-GELU MLP,
//! each with a residual), a final LayerNorm. Its attention is narrower than the model: 8 heads of 64 =
//! 512 inner channels in a d_model of 1280; the query is scaled before the product. The pipeline
//! passes no attention mask. `to_logits` (the MLM head) is never used.

use super::layers::Linear;
use crate::attention::default_scale;
use crate::backend::Backends;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

/// `bert/config.json`; defaults are LDMBertConfig's (the real model's values).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LdmBertConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub encoder_layers: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_attention_heads: usize,
    pub head_dim: usize,
    /// "gelu" (exact, erf) is what LDM-256 uses.
    pub activation_function: String,
    pub d_model: usize,
    pub scale_embedding: bool,
}

impl Default for LdmBertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            max_position_embeddings: 77,
            encoder_layers: 32,
            encoder_ffn_dim: 5120,
            encoder_attention_heads: 8,
            head_dim: 64,
            activation_function: "gelu".into(),
            d_model: 1280,
            scale_embedding: false,
        }
    }
}

impl LdmBertConfig {
    /// Refuses, with one line naming the key, what the encoder cannot run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("head_dim", self.head_dim),
            ("d_model", self.d_model),
        ] {
            if value == 0 {
                return Err(format!("bert config: {key} is 0; it must be at least 1"));
            }
        }
        if self.activation_function != "gelu" {
            return Err(format!(
                "bert config: activation_function {:?} is not supported (gelu)",
                self.activation_function
            ));
        }
        if self.scale_embedding {
            // diffusers' LDMBertEncoder never applies it either; a config asking for it is not LDM's.
            return Err("bert config: scale_embedding true is not supported".into());
        }
        Ok(())
    }
}

/// `LDMBertAttention` without a mask: q, k, v (no bias) to heads·head_dim, softmax(q·λ kᵀ) v, out_proj.
struct LdmBertAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl LdmBertAttention {
    fn new(vb: VarBuilder, cfg: &LdmBertConfig, backends: &Backends) -> Result<Self> {
        let inner_dim = cfg.encoder_attention_heads * cfg.head_dim;
        Ok(Self {
            q_proj: Linear::no_bias(cfg.d_model, inner_dim, vb.pp("q_proj"), backends)?,
            k_proj: Linear::no_bias(cfg.d_model, inner_dim, vb.pp("k_proj"), backends)?,
            v_proj: Linear::no_bias(cfg.d_model, inner_dim, vb.pp("v_proj"), backends)?,
            out_proj: Linear::new(inner_dim, cfg.d_model, vb.pp("out_proj"), backends)?,
            num_heads: cfg.encoder_attention_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let heads = |t: Tensor| t.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        // diffusers scales the projected query, then multiplies (its rounding, not the scores').
        let q = heads((self.q_proj.forward(xs)? * default_scale(self.head_dim))?)?; // (b, heads, n, d)
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let in_dtype = q.dtype();
        let scores = q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)?; // (b, heads, n, n)
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(in_dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, self.num_heads * self.head_dim))?;
        self.out_proj.forward(&out)
    }
}

/// `LDMBertEncoderLayer`: pre-norm self-attention and MLP, each with a residual.
struct LdmBertEncoderLayer {
    self_attn_layer_norm: LayerNorm,
    self_attn: LdmBertAttention,
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl LdmBertEncoderLayer {
    fn new(vb: VarBuilder, cfg: &LdmBertConfig, backends: &Backends) -> Result<Self> {
        // nn.LayerNorm's default eps.
        Ok(Self {
            self_attn_layer_norm: layer_norm(cfg.d_model, 1e-5, vb.pp("self_attn_layer_norm"))?,
            self_attn: LdmBertAttention::new(vb.pp("self_attn"), cfg, backends)?,
            final_layer_norm: layer_norm(cfg.d_model, 1e-5, vb.pp("final_layer_norm"))?,
            fc1: Linear::new(cfg.d_model, cfg.encoder_ffn_dim, vb.pp("fc1"), backends)?,
            fc2: Linear::new(cfg.encoder_ffn_dim, cfg.d_model, vb.pp("fc2"), backends)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.self_attn_layer_norm.forward(xs)?)?)?;
        let hidden = self.fc2.forward(&self.fc1.forward(&self.final_layer_norm.forward(&xs)?)?.gelu_erf()?)?;
        let xs = (xs + hidden)?;
        if xs.dtype() == DType::F16 {
            // diffusers: an f16 overflow is clamped to ±(f16 max − 1000) rather than left to spread.
            let finite = xs.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?.is_finite();
            if !finite {
                let limit = f64::from(half::f16::MAX) - 1000.0;
                return xs.clamp(-limit, limit);
            }
        }
        Ok(xs)
    }
}

/// `LDMBertModel`: its encoder lives under `model.`.
pub struct LdmBertModel {
    embed_tokens: Embedding,
    embed_positions: Embedding,
    layers: Vec<LdmBertEncoderLayer>,
    layer_norm: LayerNorm,
}

impl LdmBertModel {
    /// `vb` points at the model root (the file's `model.*` tensors). `backends` are the model's.
    pub fn new(vb: VarBuilder, cfg: &LdmBertConfig, backends: &Backends) -> Result<Self> {
        let vb = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp("embed_tokens"))?;
        let embed_positions = candle_nn::embedding(cfg.max_position_embeddings, cfg.d_model, vb.pp("embed_positions"))?;
        let layers = (0..cfg.encoder_layers)
            .map(|i| LdmBertEncoderLayer::new(vb.pp("layers").pp(i), cfg, backends))
            .collect::<Result<Vec<_>>>()?;
        let layer_norm = layer_norm(cfg.d_model, 1e-5, vb.pp("layer_norm"))?;
        Ok(Self { embed_tokens, embed_positions, layers, layer_norm })
    }

    /// `input_ids` (b, n) u32 → `last_hidden_state` (b, n, d_model), as the pipeline reads `bert(ids)[0]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let n = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?;
        let mut xs = self.embed_tokens.forward(input_ids)?.broadcast_add(&self.embed_positions.forward(&positions)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.layer_norm.forward(&xs)
    }
}
