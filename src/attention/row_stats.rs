//! The entropy probe's statistics of attention rows, shared by the attention (attention.rs) and its
//! kernels (kernels/cpu/attention.rs), below both.

use candle_core::{Result, Tensor, D};

/// Running sums over attention rows (one row = one query of one head), kept in f64 on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowStats {
    pub rows: usize,
    /// Σ_i Ent(A_i)
    pub entropy_sum: f64,
    /// Σ_i Ent(A_i)²
    pub entropy_sq_sum: f64,
    /// Σ_i σ_i², σ_i² = Var_j(λ·q_i·k_j)
    pub sigma2_sum: f64,
}

impl RowStats {
    /// Adds one query chunk: `scores` are the scaled logits λ·q·kᵀ and `probs` their softmax, both
    /// (maps, rows, keys) in f32, as the attention computed them.
    pub fn accumulate(&mut self, scores: &Tensor, probs: &Tensor) -> Result<()> {
        // A probability that underflowed to 0 contributes nothing (p·log p → 0); flooring it at the
        // smallest normal f32 keeps 0·log 0 from turning into NaN.
        let p_log_p = (probs * probs.maximum(f32::MIN_POSITIVE)?.log()?)?;
        let entropy = p_log_p.sum(D::Minus1)?.neg()?.flatten_all()?.to_vec1::<f32>()?;
        // Population variance over keys (Eq. 4's E_j), centred first: logits can share a large offset.
        let mean = scores.mean_keepdim(D::Minus1)?;
        let sigma2 = scores.broadcast_sub(&mean)?.sqr()?.mean(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        for (entropy, sigma2) in entropy.into_iter().zip(sigma2) {
            self.add_row(entropy as f64, sigma2 as f64);
        }
        Ok(())
    }

    /// Adds one row's entropy and σ².
    pub fn add_row(&mut self, entropy: f64, sigma2: f64) {
        self.rows += 1;
        self.entropy_sum += entropy;
        self.entropy_sq_sum += entropy * entropy;
        self.sigma2_sum += sigma2;
    }

    /// Mean row entropy.
    pub fn entropy(&self) -> f64 {
        self.entropy_sum / self.rows as f64
    }

    /// Standard deviation of the row entropies (over heads and query rows).
    pub fn std(&self) -> f64 {
        let mean = self.entropy();
        (self.entropy_sq_sum / self.rows as f64 - mean * mean).max(0.0).sqrt()
    }

    /// Mean over rows of σ_i².
    pub fn sigma2(&self) -> f64 {
        self.sigma2_sum / self.rows as f64
    }
}
