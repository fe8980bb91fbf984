//! PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` and `F.avg_pool2d(2, ceil_mode=True)`
//! on (b, c, h, w) tensors, as the CPU kernels compute them in f32 (aten/src/ATen/native/UpSample.h
//! `compute_indices_weights_cubic`, cpu/UpSampleKernel.cpp `Interpolate`; cpu/AvgPoolKernel.cpp).
//! Computed on the host: the structural methods resize a few maps per step.

use candle_core::{DType, Result, Tensor};

/// Keys's cubic convolution with A = −0.75 (PyTorch's `get_cubic_upsample_coefficients`).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index, the 4 clamped input indices and their weights. `scale_factor`: the factor
/// the caller gave (PyTorch then maps by 1/factor), else the sizes' ratio.
fn taps(input: usize, output: usize, scale_factor: Option<f64>) -> Vec<([usize; 4], [f32; 4])> {
    let scale = match scale_factor {
        Some(factor) if factor > 0.0 => (1.0 / factor) as f32,
        _ => input as f32 / output as f32,
    };
    (0..output)
        .map(|dst| {
            let real = scale * (dst as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let at = |j: i64| (index - 1 + j).clamp(0, input as i64 - 1) as usize;
            ([at(0), at(1), at(2), at(3)], cubic_weights(t))
        })
        .collect()
}

/// Bicubic resize of (b, c, h, w) to (out_h, out_w); `scale_factor` as `F.interpolate(scale_factor=…)`
/// passes it (then out = floor(side·factor), which the caller computes).
pub fn bicubic(xs: &Tensor, out_h: usize, out_w: usize, scale_factor: Option<f64>) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if (h, w) == (out_h, out_w) && scale_factor.is_none() {
        return Ok(xs.clone());
    }
    let data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (rows, cols) = (taps(h, out_h, scale_factor), taps(w, out_w, scale_factor));
    let mut out = vec![0f32; b * c * out_h * out_w];
    for (plane, dst) in data.chunks_exact(h * w).zip(out.chunks_exact_mut(out_h * out_w)) {
        for (y, (ys, wy)) in rows.iter().enumerate() {
            for (x, (xs_, wx)) in cols.iter().enumerate() {
                // Σ_i w_y[i]·(Σ_j w_x[j]·src[y_i][x_j]), accumulated in PyTorch's order.
                let row = |y: usize| {
                    let line = &plane[y * w..];
                    xs_[1..].iter().zip(&wx[1..]).fold(line[xs_[0]] * wx[0], |acc, (&x, &wt)| acc + line[x] * wt)
                };
                let acc = ys[1..].iter().zip(&wy[1..]).fold(row(ys[0]) * wy[0], |acc, (&y, &wt)| acc + row(y) * wt);
                dst[y * out_w + x] = acc;
            }
        }
    }
    Tensor::from_vec(out, (b, c, out_h, out_w), xs.device())?.to_dtype(xs.dtype())
}

/// `F.avg_pool2d(xs, kernel_size=2, ceil_mode=True)`: ceil(h/2)×ceil(w/2); an edge window past the
/// map averages over the values it covers.
pub fn avg_pool2x2_ceil(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if h % 2 == 0 && w % 2 == 0 {
        return xs.avg_pool2d(2);
    }
    let (out_h, out_w) = (h.div_ceil(2), w.div_ceil(2));
    let data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; b * c * out_h * out_w];
    for (plane, dst) in data.chunks_exact(h * w).zip(out.chunks_exact_mut(out_h * out_w)) {
        for y in 0..out_h {
            for x in 0..out_w {
                let (y1, x1) = ((2 * y + 2).min(h), (2 * x + 2).min(w));
                let mut sum = 0f32;
                for yy in 2 * y..y1 {
                    for xx in 2 * x..x1 {
                        sum += plane[yy * w + xx];
                    }
                }
                dst[y * out_w + x] = sum / ((y1 - 2 * y) * (x1 - 2 * x)) as f32;
            }
        }
    }
    Tensor::from_vec(out, (b, c, out_h, out_w), xs.device())?.to_dtype(xs.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for t in [0.0f32, 0.25, 0.5, 0.9] {
            let sum: f32 = cubic_weights(t).iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "{t}: {sum}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
        // A linear ramp stays linear away from the clamped edges (cubic reproduces linear functions).
        let ramp = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 1, 16)).unwrap();
        let out = bicubic(&ramp, 1, 8, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, value) in out.iter().enumerate().skip(1).take(6) {
            assert!((value - (2.0 * x as f32 + 0.5)).abs() < 1e-5, "{x}: {value}");
        }
    }

    #[test]
    fn ceil_pool_averages_what_the_window_covers() {
        let xs = Tensor::arange(0f32, 9., &Device::Cpu).unwrap().reshape((1, 1, 3, 3)).unwrap();
        let out = avg_pool2x2_ceil(&xs).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out, [2.0, 3.5, 6.5, 8.0]);
    }
}
