//! The attention-scale policy, and the scaled dot-product attention that uses it.
//!
//! This is the one place where a softmax scale is chosen. Stable Diffusion was trained with 1/√d. At
//! another resolution a self-attention layer attends over N keys instead of the T it was trained on, and
//! the entropy of its attention rows drifts like log N (Jin et al., NeurIPS 2023, Eq. 5). Scaling the
//! logits by √(log_T N / d) = (1/√d)·√(ln N / ln T) keeps that entropy at its training value.

pub mod row_stats;

pub use crate::backend::AttentionBackend;
use crate::kernels::cpu::attention as cpu;
#[cfg(feature = "cuda")]
use crate::kernels::cuda::flash_attention as flash;
#[cfg(feature = "flash-attn")]
use crate::kernels::cuda::flash_attn2;
use crate::size::LatentSize;
use candle_core::{DType, Result, Tensor};
pub use row_stats::RowStats;
use std::ops::Range;

/// How the UNet's attention logits are scaled. A forward-time argument, so one loaded model renders
/// every mode for the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionScale {
    /// 1/√d everywhere, as the model was trained.
    Default,
    /// The paper's √(log_T N / d) in the UNet's self-attention; cross-attention keeps 1/√d.
    /// `train_latent` is the training size in latent pixels, 64×64 for SD 2.1-base, from which each
    /// level's training token count T is derived.
    Entropy { train_latent: LatentSize },
}

impl AttentionScale {
    /// Softmax scale for a UNet self-attention layer at `level` (0 = full latent resolution, each level
    /// below halves it) attending over `n_keys` tokens with heads of size `head_dim`.
    pub fn self_attention(self, head_dim: usize, n_keys: usize, level: usize) -> f64 {
        let default = default_scale(head_dim);
        match self {
            AttentionScale::Default => default,
            AttentionScale::Entropy { train_latent } => {
                let n = n_keys.max(2) as f64;
                let t = train_latent.tokens_at_level(level).max(2) as f64;
                // Written as default·√(ln N / ln T) so that N = T gives exactly 1/√d, bit for bit:
                // the two modes must render identical images at the training size.
                default * (n.ln() / t.ln()).sqrt()
            }
        }
    }

    /// Cross-attention attends over the 77 text tokens at every resolution: its scale never changes.
    pub fn cross_attention(self, head_dim: usize) -> f64 {
        default_scale(head_dim)
    }
}

/// The backend for a layer whose logits and softmax must be computed in f32 (diffusers'
/// `upcast_attention`, which SD 2.1 at 768 needs in half precision): the half-precision GPU paths give
/// way to the f32 chunked one; the f32 paths are kept as they are, and so is FlashAttention-2, whose
/// logits and softmax never leave f32 registers (as with diffusers' default SDPA processor, which
/// ignores `upcast_attention`).
pub fn upcast(backend: AttentionBackend) -> AttentionBackend {
    match backend {
        AttentionBackend::GpuHalf | AttentionBackend::FusedCuda => AttentionBackend::Chunked,
        AttentionBackend::CpuBlocks | AttentionBackend::Chunked | AttentionBackend::FlashAttn2 => backend,
    }
}

/// The scale the model was trained with.
pub fn default_scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

// ---- watching attention --------------------------------------------------------------------------

/// Watches the UNet's self-attention layers as they run: the entropy probe (`entropy.rs`) is one.
/// Attention reports to it; it never needs to know who listens.
pub trait AttentionObserver {
    /// Which entry of the UNet's batch to measure (its heads' maps are the rows reported).
    fn batch_entry(&self) -> usize;
    /// One layer's statistics: its diffusers module path, UNet level and key count.
    fn record(&self, layer: &str, level: usize, n_keys: usize, stats: RowStats);
}

/// Upper bound on the attention scores held at once: queries are processed in chunks so that large
/// images never materialise the full N×N matrix. On the CPU 64 MiB of f32 scores per chunk; a GPU has
/// the memory for larger chunks (256 MiB of f16), and each chunk costs kernel launches.
const MAX_SCORES_PER_CHUNK: usize = 16 * 1024 * 1024;
const MAX_SCORES_PER_CHUNK_GPU: usize = 128 * 1024 * 1024;

/// softmax(scale · q·kᵀ)·v with q (b, n_q, d), k and v (b, n_k, d) — b already folds batch and heads.
///
/// Queries are chunked so memory stays bounded at large sizes; every query row is computed
/// independently, so chunking does not change the result. In f32 on the CPU, the blocks are small enough
/// to stay in cache and each is finished (scores, softmax, ·v) before the next (kernels/cpu/attention.rs). For
/// f32 inputs on a GPU, and f16 on the CPU, everything runs in f32 (as diffusers upcasts on the CPU). On a GPU, f16/bf16 inputs stay in their
/// dtype, as diffusers' fp16 pipeline does: the GEMMs accumulate in f32 (cuBLAS), the softmax
/// accumulates its sum in f32 (candle's fused kernel), and the scale is applied to q (n·d values)
/// rather than to the scores (n·n). (With `SDSCALE_FLASH_ATTENTION=1`, [`multi_head_attention`] sends f16
/// heads of 64 on CUDA to sdscale's fused kernel instead: kernels/cuda/flash_attention.rs, correct, not yet
/// faster.)
///
/// `backend` is the one chosen for the inputs' device and dtype when the model loaded (crate::backend).
pub fn scaled_dot_product_attention(
    backend: AttentionBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    match backend {
        AttentionBackend::CpuBlocks => cpu::attention(q, k, v, scale, None),
        #[cfg(feature = "flash-attn")]
        AttentionBackend::FlashAttn2 if flash_attn2::supports(q.dim(2)?, q.dtype()) => {
            flash_attn2::attention(q, k, v, 1, scale)
        }
        AttentionBackend::GpuHalf | AttentionBackend::FusedCuda => {
            half_precision_attention(q, k, v, scale, MAX_SCORES_PER_CHUNK_GPU)
        }
        // A head size FlashAttention-2 lacks takes the f32 path: right for `upcast_attention` layers too.
        AttentionBackend::FlashAttn2 | AttentionBackend::Chunked => {
            chunked_attention(q, k, v, scale, MAX_SCORES_PER_CHUNK, None)
        }
    }
}

/// Multi-head attention over projections laid out (b, n, heads·d), as linear layers make them: each head
/// attends on its own, and the result has the same layout. The heads are split into the batch dimension
/// and merged back (the opt-in fused CUDA kernel reads and writes the layout directly).
pub fn multi_head_attention(
    backend: AttentionBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if backend == AttentionBackend::FusedCuda && flash::fits(q, heads) {
        return flash::attention(q, k, v, heads, scale);
    }
    #[cfg(feature = "flash-attn")]
    if backend == AttentionBackend::FlashAttn2 && flash_attn2::supports(q.dim(2)? / heads, q.dtype()) {
        return flash_attn2::attention(q, k, v, heads, scale);
    }
    let (b, n, _) = q.dims3()?;
    let (q, k, v) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let out = scaled_dot_product_attention(backend, &q, &k, &v, scale)?;
    merge_heads(&out, b, heads, n)
}

/// (b, m, heads·d) → (b·heads, m, d)
pub fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, m, width) = t.dims3()?;
    t.reshape((b, m, heads, width / heads))?.transpose(1, 2)?.reshape((b * heads, m, width / heads))
}

/// (b·heads, n, d) → (b, n, heads·d)
pub fn merge_heads(t: &Tensor, b: usize, heads: usize, n: usize) -> Result<Tensor> {
    let d = t.dim(2)?;
    t.reshape((b, heads, n, d))?.transpose(1, 2)?.reshape((b, n, heads * d))
}

/// The same attention that also accumulates the entropy probe's row statistics of the attention maps
/// `rows` of the folded batch dimension (e.g. the heads of the text-conditioned branch) into `stats`,
/// one query chunk at a time, so nothing larger than a chunk's scores is ever held. Measured runs always
/// take an f32 path, so what the probe reads is the f32 softmax. The output is the unmeasured one bit for
/// bit only in f32 on the CPU (both are kernels/cpu/attention.rs); on a GPU, and for half-precision inputs, the
/// unmeasured call may take another path and differ by rounding.
pub fn scaled_dot_product_attention_measured(
    backend: AttentionBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: Range<usize>,
    stats: &mut RowStats,
) -> Result<Tensor> {
    match backend {
        AttentionBackend::CpuBlocks => cpu::attention(q, k, v, scale, Some((rows, stats))),
        _ => chunked_attention(q, k, v, scale, MAX_SCORES_PER_CHUNK, Some((rows, stats))),
    }
}

fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_scores: usize,
    mut measure: Option<(Range<usize>, &mut RowStats)>,
) -> Result<Tensor> {
    let (batch, n_queries, _head_dim) = q.dims3()?;
    let n_keys = k.dim(1)?;
    let in_dtype = q.dtype();
    let k_t = k.to_dtype(DType::F32)?.t()?.contiguous()?; // (b, d, n_k)
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let rows_per_chunk = (max_scores / (batch * n_keys).max(1)).clamp(1, n_queries);
    let mut outputs = Vec::with_capacity(n_queries.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < n_queries {
        let len = rows_per_chunk.min(n_queries - start);
        let q_chunk = q.narrow(1, start, len)?.to_dtype(DType::F32)?;
        let scores = (q_chunk.matmul(&k_t)? * scale)?; // (b, len, n_k)
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if let Some((rows, stats)) = measure.as_mut() {
            stats.accumulate(&scores.narrow(0, rows.start, rows.len())?, &probs.narrow(0, rows.start, rows.len())?)?;
        }
        outputs.push(probs.matmul(&v)?); // (b, len, d)
        start += len;
    }
    let out = if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(&outputs, 1)? };
    out.to_dtype(in_dtype)
}

fn half_precision_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_scores: usize) -> Result<Tensor> {
    let (batch, n_queries, _head_dim) = q.dims3()?;
    let n_keys = k.dim(1)?;
    let q = (q * scale)?;
    let k_t = k.t()?.contiguous()?; // (b, d, n_k)
    let v = v.contiguous()?;
    let rows_per_chunk = (max_scores / (batch * n_keys).max(1)).clamp(1, n_queries);
    let mut outputs = Vec::with_capacity(n_queries.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < n_queries {
        let len = rows_per_chunk.min(n_queries - start);
        let scores = q.narrow(1, start, len)?.contiguous()?.matmul(&k_t)?; // (b, len, n_k)
        outputs.push(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?); // (b, len, d)
        start += len;
    }
    if outputs.len() == 1 {
        Ok(outputs.pop().unwrap())
    } else {
        Tensor::cat(&outputs, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const SD21: LatentSize = LatentSize { height: 64, width: 64 };

    /// Standard-normal q (maps, n_q, 8), k and v (maps, n_k, 8) on the CPU.
    fn random_qkv(maps: usize, n_q: usize, n_k: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let normal = |n: usize| Tensor::randn(0f32, 1., (maps, n, 8), &Device::Cpu);
        Ok((normal(n_q)?, normal(n_k)?, normal(n_k)?))
    }

    #[test]
    fn training_tokens_per_level_for_sd21() {
        let tokens: Vec<usize> = (0..4).map(|level| SD21.tokens_at_level(level)).collect();
        assert_eq!(tokens, [4096, 1024, 256, 64]);
        assert_eq!(LatentSize { height: 9, width: 7 }.tokens_at_level(1), 5 * 4);
    }

    #[test]
    fn entropy_equals_default_at_the_training_size() {
        let entropy = AttentionScale::Entropy { train_latent: SD21 };
        for (level, n) in [(0, 4096), (1, 1024), (2, 256), (3, 64)] {
            assert_eq!(
                entropy.self_attention(64, n, level).to_bits(),
                AttentionScale::Default.self_attention(64, n, level).to_bits()
            );
        }
    }

    #[test]
    fn entropy_scale_follows_the_paper() {
        let entropy = AttentionScale::Entropy { train_latent: SD21 };
        // 224 px → 28×28 = 784 tokens at the top level, trained on 4096.
        let expected = ((784f64).ln() / (4096f64).ln() / 64.0).sqrt();
        assert!((entropy.self_attention(64, 784, 0) - expected).abs() < 1e-15);
        // Smaller images get a smaller scale (flatter attention), larger ones a larger one.
        assert!(entropy.self_attention(64, 784, 0) < default_scale(64));
        assert!(entropy.self_attention(64, 9216, 0) > default_scale(64));
        // Clamped: one key would otherwise give ln 1 = 0.
        assert!(entropy.self_attention(64, 1, 3) > 0.0);
        assert_eq!(entropy.cross_attention(64), default_scale(64));
    }

    #[test]
    fn upcast_attention_never_computes_logits_in_half_precision() {
        use AttentionBackend::*;
        assert_eq!(
            [GpuHalf, FusedCuda, FlashAttn2, CpuBlocks, Chunked].map(upcast),
            [Chunked, Chunked, FlashAttn2, CpuBlocks, Chunked]
        );
        // The path upcast layers take converts to f32 whatever comes in, and returns the input dtype.
        let (q, k, v) = random_qkv(2, 9, 7).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let out = chunked_attention(&half(&q), &half(&k), &half(&v), 0.3, MAX_SCORES_PER_CHUNK, None).unwrap();
        assert_eq!(out.dtype(), DType::F16);
    }

    #[test]
    fn chunked_attention_matches_the_plain_formula() -> Result<()> {
        let (q, k, v) = random_qkv(3, 50, 40)?;
        let scale = 0.3;
        let expected = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(&v)?;
        // One chunk, then chunks of 7 rows (the last one shorter).
        for max_scores in [MAX_SCORES_PER_CHUNK, 3 * 40 * 7] {
            let got = chunked_attention(&q, &k, &v, scale, max_scores, None)?;
            let diff = (got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "max difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn cpu_blocks_match_the_chunked_path() -> Result<()> {
        // 5000 keys → blocks of 52 query rows: 130 queries make two full blocks and a short one.
        let (q, k, v) = random_qkv(3, 130, 5000)?;
        let expected = chunked_attention(&q, &k, &v, 0.4, MAX_SCORES_PER_CHUNK, None)?;
        let got = scaled_dot_product_attention(AttentionBackend::CpuBlocks, &q, &k, &v, 0.4)?;
        let diff = (got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn the_gpu_half_precision_path_computes_the_same_attention() -> Result<()> {
        // Its arithmetic runs here in f32 (it is dtype-generic); on a GPU it runs in f16.
        let (q, k, v) = random_qkv(3, 50, 40)?;
        let expected = chunked_attention(&q, &k, &v, 0.3, MAX_SCORES_PER_CHUNK, None)?;
        for max_scores in [MAX_SCORES_PER_CHUNK_GPU, 3 * 40 * 7] {
            let got = half_precision_attention(&q, &k, &v, 0.3, max_scores)?;
            let diff = (got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "max difference {diff}");
        }
        let cpu_f16 = crate::backend::Backends::choose(&Device::Cpu, DType::F16).unwrap();
        assert_eq!(cpu_f16.attention, AttentionBackend::Chunked, "the CPU always takes the f32 path");
        Ok(())
    }

    #[test]
    fn measuring_changes_nothing_and_does_not_depend_on_chunking() -> Result<()> {
        let (q, k, v) = random_qkv(4, 50, 40)?;
        let cpu = AttentionBackend::CpuBlocks;
        let plain = scaled_dot_product_attention(cpu, &q, &k, &v, 0.3)?;
        let mut stats = RowStats::default();
        let measured = scaled_dot_product_attention_measured(cpu, &q, &k, &v, 0.3, 2..4, &mut stats)?;
        let (plain, measured) = (plain.flatten_all()?.to_vec1::<f32>()?, measured.flatten_all()?.to_vec1::<f32>()?);
        assert!(plain.iter().zip(&measured).all(|(a, b)| a.to_bits() == b.to_bits()), "measuring changed the output");
        // Rows 2..4 of the folded batch, 50 queries each; chunks of 7 rows give the same sums.
        assert_eq!(stats.rows, 2 * 50);
        // The general chunked path (GPU) measures the same statistics, up to f32 summation order.
        let mut chunked = RowStats::default();
        chunked_attention(&q, &k, &v, 0.3, 4 * 40 * 7, Some((2..4, &mut chunked)))?;
        assert_eq!(chunked.rows, stats.rows);
        assert!((chunked.entropy() - stats.entropy()).abs() < 1e-5 && (chunked.sigma2() - stats.sigma2()).abs() < 1e-5);
        let chunked_out = chunked_attention(&q, &k, &v, 0.3, 4 * 40 * 7, None)?;
        let diff =
            (chunked_out - Tensor::from_vec(plain, (4, 50, 8), &Device::Cpu)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "cpu blocks vs chunks: {diff}");
        Ok(())
    }
}
