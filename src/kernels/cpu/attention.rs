//! The attention on the CPU (f32): blocks of query rows whose scores stay in cache. For each block the
//! scaled scores come from one gemm (the scale folded into it), are soft-maxed in place and multiplied by
//! v with a second gemm; blocks run in parallel. The general path materialises each chunk's scores and
//! walks them in separate passes (scale, max, exp, sum, divide), which made attention half of a 512²
//! CPU UNet step (9.4 of 17.8 s, 2026-11-26). The entropy probe's row statistics are taken from the
//! same block buffers, so measuring never changes the output.

use super::values;
use crate::attention::row_stats::RowStats;
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per block: about 1 MiB of scores (one core's L2), within 64 … 256 rows. Each block's two
/// gemms pack all of kᵀ and v again, so past 4 096 keys the floor of 64 rows (larger score blocks)
/// pays: a 1024² SD 2.1 UNet step (16 384 keys) took 78.4 s against 83.5 s with 16-row blocks, while a
/// 256-row block at 4 096 keys (4 MiB) was 9 % slower than 64 rows at 512² (2026-12-07, BENCHMARKS.md).
fn block_rows(n_keys: usize) -> usize {
    ((1 << 18) / n_keys.max(1)).clamp(64, 256)
}

/// softmax(scale · q·kᵀ)·v with q (b, n_q, d), k and v (b, n_k, d); with `measure`, the row statistics
/// of the attention maps `rows` of b are added to the stats, in row order.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    measure: Option<(Range<usize>, &mut RowStats)>,
) -> Result<Tensor> {
    let (maps, n_q, d) = q.dims3()?;
    let n_k = k.dim(1)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let storages = (q.storage_and_layout().0, k.storage_and_layout().0, v.storage_and_layout().0);
    let (q_all, k_all, v_all) = (values(&storages.0, &q)?, values(&storages.1, &k)?, values(&storages.2, &v)?);
    let rows_per_block = block_rows(n_k);
    let measured_maps = measure.as_ref().map(|(rows, _)| rows.clone()).unwrap_or(0..0);
    let scale = scale as f32;

    let mut out = vec![0f32; maps * n_q * d];
    let row_stats: Vec<Vec<(f32, f32)>> = out
        .par_chunks_mut(n_q * d)
        .enumerate()
        .flat_map(|(map, out_map)| {
            let (q_map, k_map, v_map) =
                (&q_all[map * n_q * d..], &k_all[map * n_k * d..(map + 1) * n_k * d], &v_all[map * n_k * d..]);
            let measured = measured_maps.contains(&map);
            // Each worker thread keeps its score and probability buffers from block to block: both are
            // fully overwritten, so they are sized once instead of allocated and zeroed per block.
            let buffers = || (Vec::<f32>::new(), Vec::<f32>::new());
            out_map.par_chunks_mut(rows_per_block * d).enumerate().map_init(
                buffers,
                move |(scores, probs), (block, out_block)| {
                    let rows = out_block.len() / d;
                    let q_block = &q_map[block * rows_per_block * d..][..rows * d];
                    scores.resize(rows * n_k, 0.0);
                    probs.resize(n_k, 0.0);
                    // scores (rows × n_k) = scale · q_block (rows × d) · kᵀ; kᵀ(i, j) = k[j·d + i].
                    // SAFETY (both gemms): dense row-major buffers of exactly the sizes given.
                    unsafe {
                        gemm::gemm(
                            rows,
                            n_k,
                            d,
                            scores.as_mut_ptr(),
                            1,
                            n_k as isize,
                            false,
                            q_block.as_ptr(),
                            1,
                            d as isize,
                            k_map.as_ptr(),
                            d as isize,
                            1,
                            0.0,
                            scale,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    let mut stats = Vec::new();
                    for row in scores.chunks_mut(n_k) {
                        softmax_into(row, probs);
                        if measured {
                            stats.push(row_statistics(row, probs));
                        }
                        row.copy_from_slice(probs);
                    }
                    unsafe {
                        gemm::gemm(
                            rows,
                            d,
                            n_k,
                            out_block.as_mut_ptr(),
                            1,
                            d as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            n_k as isize,
                            v_map.as_ptr(),
                            1,
                            d as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    stats
                },
            )
        })
        .collect();
    if let Some((_, stats)) = measure {
        for (entropy, sigma2) in row_stats.into_iter().flatten() {
            stats.add_row(entropy as f64, sigma2 as f64);
        }
    }
    Tensor::from_vec(out, (maps, n_q, d), &Device::Cpu)
}

/// probs = softmax(scores), max-subtracted, sum in f32. The exponentials are most of the attention's
/// non-GEMM time, so they use a branch-free exp the compiler vectorises, with AVX-512 or AVX2 where the
/// CPU has them (detected at run time; the binary targets baseline x86-64).
fn softmax_into(scores: &[f32], probs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { softmax_avx512(scores, probs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { softmax_avx2(scores, probs) };
        }
    }
    softmax_generic(scores, probs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(scores: &[f32], probs: &mut [f32]) {
    softmax_generic(scores, probs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(scores: &[f32], probs: &mut [f32]) {
    softmax_generic(scores, probs)
}

#[inline(always)]
fn softmax_generic(scores: &[f32], probs: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (p, &s) in probs.iter_mut().zip(scores) {
        *p = exp(s - max);
    }
    for &p in probs.iter() {
        sum += p;
    }
    let inv = 1.0 / sum;
    for p in probs.iter_mut() {
        *p *= inv;
    }
}

/// eˣ in f32 to about 2 ulp (Cephes' expf: x = n·ln 2 + r, a degree-6 polynomial for eʳ, 2ⁿ through the
/// exponent bits), branch-free so loops over it vectorise. Inputs below −87.3 give ~1e-38, not 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// One row's entropy −Σ p·log p and the variance of its scaled scores over the keys, in f32 as
/// [`RowStats::accumulate`] computes them from tensors.
fn row_statistics(scores: &[f32], probs: &[f32]) -> (f32, f32) {
    let entropy = -probs.iter().map(|&p| p * p.max(f32::MIN_POSITIVE).ln()).sum::<f32>();
    let n = scores.len() as f32;
    let mean = scores.iter().sum::<f32>() / n;
    let sigma2 = scores.iter().map(|&s| (s - mean) * (s - mean)).sum::<f32>() / n;
    (entropy, sigma2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }
}
