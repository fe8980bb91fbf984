//! f32 CPU versions of the linear layer and GroupNorm(+SiLU) that do in one or two passes what candle
//! composes from several ops: its broadcast bias add and GroupNorm's dozen element-wise ops take a
//! strided path and spin in its thread pool's barrier (~17% of a CPU UNet step in a perf profile,
//! 2026-11-26).

use super::{gemm_parallelism, values};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// xs (…, k) · weightᵀ (weight (n, k)) + bias: one gemm over all leading rows, the bias pre-filled.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let k = xs.dim(candle_core::D::Minus1)?;
    let (n, weight_k) = weight.dims2()?;
    if weight_k != k {
        candle_core::bail!("linear: input {:?} does not fit weight {:?}", xs.shape(), weight.shape());
    }
    let rows = xs.elem_count() / k.max(1);
    let (xs_c, weight) = (xs.contiguous()?, weight.contiguous()?);
    let (x_storage, weight_storage) = (xs_c.storage_and_layout().0, weight.storage_and_layout().0);
    let (x, w) = (values(&x_storage, &xs_c)?, values(&weight_storage, &weight)?);
    let mut out = vec![0f32; rows * n];
    if let Some(bias) = bias {
        let bias = bias.contiguous()?;
        let bias_storage = bias.storage_and_layout().0;
        let bias = values(&bias_storage, &bias)?;
        out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
    }
    // out (rows × n) = x (rows × k) · wᵀ, wᵀ read through strides: element (i, j) of wᵀ is w[j·k + i].
    // SAFETY: dense row-major buffers of exactly these sizes; strides stay in bounds.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        );
    }
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// GroupNorm over xs (b, c, …) with a per-channel affine, then SiLU when `silu`: statistics in f64 (two
/// passes: mean, then the squared deviations, as PyTorch's CPU kernel is accurate to), one output pass.
pub fn group_norm(xs: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let plane = xs.elem_count() / (b * c).max(1);
    let per_group = c / groups;
    let xs_c = xs.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let storages = (xs_c.storage_and_layout().0, weight.storage_and_layout().0, bias.storage_and_layout().0);
    let x = values(&storages.0, &xs_c)?;
    let (gamma, beta) = (values(&storages.1, &weight)?, values(&storages.2, &bias)?);
    let mut out = vec![0f32; x.len()];
    let group_len = per_group * plane;
    out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(index, (dst, src))| {
        let mean = src.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
        let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
        let inv_std = 1.0 / (var + eps).sqrt();
        let first_channel = (index % groups) * per_group;
        for (ch, (dst, src)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
            // y = (x − mean)·inv_std·γ + β = x·scale + shift
            let scale = (inv_std * gamma[first_channel + ch] as f64) as f32;
            let shift = (beta[first_channel + ch] as f64 - mean * inv_std * gamma[first_channel + ch] as f64) as f32;
            if silu {
                for (d, &s) in dst.iter_mut().zip(src) {
                    let y = s * scale + shift;
                    *d = y / (1.0 + (-y).exp());
                }
            } else {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s * scale + shift;
                }
            }
        }
    });
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// GEGLU's gate: for `projected` (…, 2·n) = [hidden | gate], hidden · GELU(gate) (exact erf GELU, as
/// candle's and PyTorch's), (…, n), in one pass instead of a chunk, a strided GELU and a strided product.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(candle_core::D::Minus1)?;
    let n = width / 2;
    let projected_c = projected.contiguous()?;
    let storage = projected_c.storage_and_layout().0;
    let x = values(&storage, &projected_c)?;
    let mut out = vec![0f32; x.len() / 2];
    out.par_chunks_mut(n).zip(x.par_chunks(width)).for_each(|(dst, src)| {
        let (hidden, gate) = src.split_at(n);
        for ((d, &h), &g) in dst.iter_mut().zip(hidden).zip(gate) {
            *d = h * ((candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * g);
        }
    });
    let mut dims = projected.dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn linear_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 7, 12), &device)?;
        let weight = Tensor::randn(0f32, 1., (5, 12), &device)?;
        let bias = Tensor::randn(0f32, 1., 5, &device)?;
        let expected = candle_nn::Linear::new(weight.clone(), Some(bias.clone())).forward(&xs)?;
        assert!(max_diff(&linear(&xs, &weight, Some(&bias))?, &expected) < 1e-5);
        let expected = candle_nn::Linear::new(weight.clone(), None).forward(&xs)?;
        assert!(max_diff(&linear(&xs, &weight, None)?, &expected) < 1e-5);
        // A non-contiguous input and a 2-D one.
        let xt = Tensor::randn(0f32, 1., (12, 9), &device)?.t()?;
        let expected = candle_nn::Linear::new(weight.clone(), Some(bias.clone())).forward(&xt.contiguous()?)?;
        assert!(max_diff(&linear(&xt, &weight, Some(&bias))?, &expected) < 1e-5);
        Ok(())
    }

    #[test]
    fn geglu_matches_candle() -> Result<()> {
        let projected = Tensor::randn(0f32, 2., (2, 5, 12), &Device::Cpu)?;
        let halves = projected.chunk(2, candle_core::D::Minus1)?;
        let expected = (&halves[0] * halves[1].gelu_erf()?)?;
        assert_eq!(max_diff(&geglu(&projected)?, &expected), 0.0);
        Ok(())
    }

    #[test]
    fn group_norm_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        // An offset mean (3.0) checks the two-pass variance.
        let xs = (Tensor::randn(0f32, 2., (2, 8, 5, 3), &device)? + 3.0)?;
        let weight = Tensor::randn(1f32, 0.5, 8, &device)?;
        let bias = Tensor::randn(0f32, 0.5, 8, &device)?;
        let reference = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 8, 4, 1e-5)?.forward(&xs)?;
        assert!(max_diff(&group_norm(&xs, 4, &weight, &bias, 1e-5, false)?, &reference) < 1e-5);
        let with_silu = candle_nn::ops::silu(&reference)?;
        assert!(max_diff(&group_norm(&xs, 4, &weight, &bias, 1e-5, true)?, &with_silu) < 1e-5);
        Ok(())
    }
}
