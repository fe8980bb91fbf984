//! conv2d on the CPU (f32): for each image and each band of output rows, im2col into a
//! (c_in·k·k, pixels) matrix with row copies, then one gemm that writes the band's NCHW output rows in
//! place, the bias pre-filled. candle's CPU conv transposes the input to NHWC and re-flattens the kernel
//! on every call (element by element, one thread), gathers each 3×3 patch element by element, and
//! scatters each tile's result back to NCHW; in a perf profile of the VAE decode its gather alone was 29%
//! of the cycles (2026-11-26). Bands keep the im2col matrix at most 16 MiB, so memory stays bounded at
//! any size and the gemm reads it from cache.

use super::{gemm_parallelism, values};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// Floats of im2col matrix per band.
const MAX_COLS: usize = 4 << 20;

/// conv2d of `xs` (b, c_in, h, w) with `weight` (c_out, c_in, k, k), square padding and stride, no
/// dilation or groups, plus an optional per-channel bias.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, weight_c_in, k, k_w) = weight.dims4()?;
    if weight_c_in != c_in || k_w != k || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!("cpu conv2d: input {:?} does not fit kernel {:?}", xs.shape(), weight.shape());
    }
    let (h_out, w_out) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
    let plane_out = h_out * w_out;
    let depth = c_in * k * k; // one im2col row per (channel, kernel row, kernel column)

    let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
    let (x_storage, weight_storage) = (xs.storage_and_layout().0, weight.storage_and_layout().0);
    let x = values(&x_storage, &xs)?;
    let weight = values(&weight_storage, &weight)?; // (c_out, depth), row-major
    let mut out = vec![0f32; b * c_out * plane_out];
    if let Some(bias) = bias {
        let bias = bias.contiguous()?;
        let bias_storage = bias.storage_and_layout().0;
        for (plane, value) in out.chunks_mut(plane_out).zip(values(&bias_storage, &bias)?.iter().cycle()) {
            plane.fill(*value);
        }
    }

    let rows_per_band = (MAX_COLS / (depth * w_out).max(1)).clamp(1, h_out);
    let mut cols = vec![0f32; depth * rows_per_band * w_out];
    let parallelism = gemm_parallelism();
    for image in 0..b {
        let x_image = &x[image * c_in * h * w..(image + 1) * c_in * h * w];
        let out_image = &mut out[image * c_out * plane_out..(image + 1) * c_out * plane_out];
        let mut first_row = 0;
        while first_row < h_out {
            let rows = rows_per_band.min(h_out - first_row);
            let pixels = rows * w_out;
            let cols = &mut cols[..depth * pixels];
            cols.par_chunks_mut(k * k * pixels).enumerate().for_each(|(channel, block)| {
                let plane = &x_image[channel * h * w..(channel + 1) * h * w];
                for (tap, row) in block.chunks_mut(pixels).enumerate() {
                    let (kh, kw) = (tap / k, tap % k);
                    for (r, dst) in row.chunks_mut(w_out).enumerate() {
                        let ih = ((first_row + r) * stride + kh) as isize - padding as isize;
                        if ih < 0 || ih >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[ih as usize * w..(ih as usize + 1) * w];
                        if stride == 1 {
                            // Output column ow reads input column ow + kw − padding, where that exists.
                            let lo = padding.saturating_sub(kw).min(w_out);
                            let hi = (w + padding - kw).clamp(lo, w_out);
                            dst[..lo].fill(0.0);
                            dst[lo..hi].copy_from_slice(&src[lo + kw - padding..hi + kw - padding]);
                            dst[hi..].fill(0.0);
                        } else {
                            for (ow, value) in dst.iter_mut().enumerate() {
                                let iw = (ow * stride + kw) as isize - padding as isize;
                                *value = if iw >= 0 && iw < w as isize { src[iw as usize] } else { 0.0 };
                            }
                        }
                    }
                }
            });
            // out[:, band] (c_out × pixels, row stride h_out·w_out) += weight (c_out × depth) · cols (depth × pixels)
            // SAFETY: every pointer/stride pair stays inside its buffer: dst rows start at first_row·w_out
            // and span `pixels` ≤ (h_out − first_row)·w_out values; lhs and rhs are dense row-major.
            unsafe {
                gemm::gemm(
                    c_out,
                    pixels,
                    depth,
                    out_image.as_mut_ptr().add(first_row * w_out),
                    1,
                    plane_out as isize,
                    bias.is_some(),
                    weight.as_ptr(),
                    1,
                    depth as isize,
                    cols.as_ptr(),
                    1,
                    pixels as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            first_row += rows;
        }
    }
    Tensor::from_vec(out, (b, c_out, h_out, w_out), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candles_convolution() -> Result<()> {
        let device = Device::Cpu;
        // (batch, c_in, h, w, c_out, k, padding, stride): 3×3 same, stride-2 downsampling, 1×1, odd sizes,
        // a kernel wider than the padded edge, and one input tall enough to need several bands.
        let cases = [
            (2, 3, 9, 7, 4, 3, 1, 1),
            (1, 5, 8, 8, 3, 3, 1, 2),
            (2, 4, 6, 5, 6, 1, 0, 1),
            (1, 2, 11, 13, 2, 3, 0, 1),
            (1, 2, 7, 9, 3, 3, 1, 2),
            (1, 64, 130, 120, 4, 3, 1, 1),
        ];
        for (b, c_in, h, w, c_out, k, padding, stride) in cases {
            let xs = Tensor::randn(0f32, 1., (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 1., (c_out, c_in, k, k), &device)?;
            let bias = Tensor::randn(0f32, 1., c_out, &device)?;
            let expected =
                xs.conv2d(&weight, padding, stride, 1, 1)?.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            let got = conv2d(&xs, &weight, Some(&bias), padding, stride)?;
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-3, "case {:?}: max difference {diff}", (b, c_in, h, w, c_out, k, padding, stride));
            let unbiased = conv2d(&xs, &weight, None, padding, stride)?;
            let diff = (unbiased - xs.conv2d(&weight, padding, stride, 1, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-3, "no bias: max difference {diff}");
        }
        Ok(())
    }
}
