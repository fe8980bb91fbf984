//! FlashAttention-2 (Dao, 2023) through `candle-flash-attn`: the library kernel for f16/bf16 attention on
//! CUDA, built with `--features flash-attn`. It reads q, k and v as (batch, tokens, heads, head_dim) — the
//! linear projections' (b, n, heads·d) layout reshaped for free, so no head split/merge copies — never
//! writes the scores to device memory, keeps the logits and softmax in f32 registers, and takes any
//! softmax scale: the entropy scale is one argument per layer.

use candle_core::{DType, Result, Tensor};

/// Head sizes FlashAttention-2's kernels cover (multiples of 8 up to 256, and 512: the VAE's one head).
pub fn supports(head_dim: usize, dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && head_dim.is_multiple_of(8) && (head_dim <= 256 || head_dim == 512)
}

/// softmax(scale · q·kᵀ)·v per head for q (b, n_q, heads·d), k and v (b, n_k, heads·d); the output has
/// q's layout.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, width) = t.dims3()?;
        t.contiguous()?.reshape((b, n, heads, width / heads))
    };
    let out = candle_flash_attn::flash_attn(&split(q)?, &split(k)?, &split(v)?, scale as f32, false)?;
    let (b, n, _, _) = out.dims4()?;
    out.reshape((b, n, ()))
}
