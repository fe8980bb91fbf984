//! The building blocks the networks share: candle-nn's layers with faster paths where candle's are slow
//! (convolution, linear and GroupNorm on the CPU; convolution and GroupNorm on CUDA), each forward
//! labelled with its op kind for `SDSCALE_PROFILE=1`. Each layer is built with the model's
//! [`Backends`] (chosen once, crate::backend) and runs the kernel it names (crate::kernels).

use crate::backend::{Backends, ConvBackend, LinearBackend, NormBackend};
use crate::kernels::cpu::{conv as cpu_conv, ops as cpu_ops};
#[cfg(feature = "cuda")]
use crate::kernels::cuda::conv as cuda_conv;
use crate::profile::{op, OpKind};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// conv2d with square padding and stride (no dilation, no groups) plus an optional per-channel bias, by
/// `backend`: sdscale's banded im2col + gemm in f32 on the CPU (kernels/cpu/conv.rs), its im2col kernel +
/// cuBLAS on CUDA (kernels/cuda/conv.rs, for inputs within its 32-bit indices), candle's otherwise.
pub fn conv2d(
    backend: ConvBackend,
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    match backend {
        ConvBackend::CpuIm2col => return cpu_conv::conv2d(xs, weight, bias, padding, stride),
        #[cfg(feature = "cuda")]
        ConvBackend::CudaIm2col if cuda_conv::fits(xs, weight, padding, stride)? => {
            return cuda_conv::conv2d(xs, weight, bias, padding, stride)
        }
        ConvBackend::CudaIm2col | ConvBackend::Candle => {}
    }
    let ys = xs.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        None => Ok(ys),
    }
}

/// diffusers' `nn.Conv2d` as SD uses it (square kernel, padding and stride, a bias, no dilation or
/// groups), with its parameter names (`weight` (c_out, c_in, k, k), `bias`), computed by [`conv2d`] and
/// profiled as [`OpKind::Conv`]. The UNet's and the VAE's convolutions are both this type.
///
/// [`Conv2d::banded`] bounds the temporary memory of the VAE's, which run at the full image size: on
/// accelerators, inputs whose im2col buffer would exceed [`MAX_IM2COL_ELEMENTS`] are convolved a band of
/// output rows at a time from an explicitly zero-padded copy (every output pixel from the same inputs
/// and weights). On the CPU it is a plain call: sdscale's CPU convolution (kernels/cpu/conv.rs) already
/// works in bands of at most 16 MiB.
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    banded: bool,
    backend: ConvBackend,
}

/// ~512 MiB of f32 (256 MiB of f16) im2col columns per band of a [`Conv2d::banded`] convolution.
const MAX_IM2COL_ELEMENTS: usize = 128 * 1024 * 1024;

impl Conv2d {
    /// Loads `weight` and `bias` from `vb`; `config` gives padding and stride (dilation and groups must be 1).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        config: candle_nn::Conv2dConfig,
        vb: VarBuilder,
        backends: &Backends,
    ) -> Result<Self> {
        if config.dilation != 1 || config.groups != 1 {
            candle_core::bail!("conv2d {}: dilation and groups other than 1 are not supported", vb.prefix());
        }
        Ok(Self {
            weight: vb.get((c_out, c_in, kernel, kernel), "weight")?,
            bias: Some(vb.get(c_out, "bias")?),
            padding: config.padding,
            stride: config.stride,
            banded: false,
            backend: backends.conv,
        })
    }

    /// The same convolution, computed in bands of output rows where its im2col buffer would be large.
    pub fn banded(self) -> Self {
        Self { banded: true, ..self }
    }

    /// The same weights with another stride, padding and dilation (HiDiffusion's RAU-Net downsampler).
    pub fn forward_with(&self, xs: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
        op(OpKind::Conv, xs.device(), || {
            let out = xs.conv2d(&self.weight, padding, stride, dilation, 1)?;
            match &self.bias {
                Some(bias) => out.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?),
                None => Ok(out),
            }
        })
    }

    fn conv(&self, xs: &Tensor, padding: usize) -> Result<Tensor> {
        conv2d(self.backend, xs, &self.weight, self.bias.as_ref(), padding, self.stride)
    }

    fn forward_in_bands(&self, xs: &Tensor, rows_per_band: usize) -> Result<Tensor> {
        let h = xs.dim(2)?;
        let p = self.padding;
        let padded = xs.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?; // (b, c, h + 2p, w + 2p)
        let mut bands = Vec::with_capacity(h.div_ceil(rows_per_band));
        let mut row = 0;
        while row < h {
            let rows = rows_per_band.min(h - row);
            // Output rows [row, row + rows) need padded input rows [row, row + rows + 2p).
            bands.push(self.conv(&padded.narrow(2, row, rows + 2 * p)?, 0)?);
            row += rows;
        }
        Tensor::cat(&bands, 2)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Conv, xs.device(), || {
            if !self.banded || xs.device().is_cpu() || self.padding == 0 || self.stride != 1 {
                return self.conv(xs, self.padding);
            }
            let (b, c_in, h, w) = xs.dims4()?;
            let (_, _, k, _) = self.weight.dims4()?;
            if b * c_in * k * k * h * w <= MAX_IM2COL_ELEMENTS {
                return self.conv(xs, self.padding);
            }
            self.forward_in_bands(xs, (MAX_IM2COL_ELEMENTS / (b * c_in * k * k * w)).max(1))
        })
    }
}

/// candle-nn's `Linear` (one gemm with the bias pre-filled in f32 on the CPU), profiled as
/// [`OpKind::Matmul`].
pub struct Linear(candle_nn::Linear, LinearBackend);

impl Linear {
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder, backends: &Backends) -> Result<Self> {
        candle_nn::linear(c_in, c_out, vb).map(|linear| Self(linear, backends.linear))
    }
    pub fn no_bias(c_in: usize, c_out: usize, vb: VarBuilder, backends: &Backends) -> Result<Self> {
        candle_nn::linear_no_bias(c_in, c_out, vb).map(|linear| Self(linear, backends.linear))
    }
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, backends: &Backends) -> Self {
        Self(candle_nn::Linear::new(weight, bias), backends.linear)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Matmul, xs.device(), || match self.1 {
            LinearBackend::CpuGemm => cpu_ops::linear(xs, self.0.weight(), self.0.bias()),
            LinearBackend::Candle => self.0.forward(xs),
        })
    }
}

/// candle-nn's `LayerNorm` (fused on every device), profiled as [`OpKind::Norm`].
pub struct LayerNorm(candle_nn::LayerNorm);

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        candle_nn::layer_norm(dim, eps, vb).map(Self)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Norm, xs.device(), || self.0.forward(xs))
    }
}

/// `torch.nn.GroupNorm` over (b, c, …) with a per-channel affine.
///
/// candle-nn composes it from about a dozen ops, each a pass over the activations. In f32 on the CPU it
/// is two passes here (f64 statistics, then normalise + affine, with the SiLU that usually follows fused
/// in: [`GroupNorm::forward_silu`]). On CUDA a group is normalised as one row of candle's fused
/// layer-norm kernel (f32 statistics, one launch), then scaled and shifted per channel.
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    backend: NormBackend,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder, backends: &Backends) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { inner, weight, bias, groups, eps, backend: backends.norm })
    }

    fn forward_fused(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let (b, c) = (dims[0], dims[1]);
        let row = xs.elem_count() / (b * self.groups);
        let rows = xs.contiguous()?.reshape((b * self.groups, row))?;
        // The kernel's own affine is per column; ours is per channel, so it gets the identity.
        let ones = Tensor::ones(row, xs.dtype(), xs.device())?;
        let zeros = Tensor::zeros(row, xs.dtype(), xs.device())?;
        let normed = candle_nn::ops::layer_norm(&rows, &ones, &zeros, self.eps as f32)?.reshape(dims)?;
        let mut per_channel = vec![1; dims.len()];
        per_channel[1] = c;
        normed
            .broadcast_mul(&self.weight.reshape(per_channel.as_slice())?)?
            .broadcast_add(&self.bias.reshape(per_channel)?)
    }
}

impl GroupNorm {
    /// SiLU(GroupNorm(xs)), as every ResNet block and the output heads use it.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if self.backend == NormBackend::CpuFused {
            return op(OpKind::Norm, xs.device(), || {
                cpu_ops::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps, true)
            });
        }
        silu(&self.forward(xs)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Norm, xs.device(), || match self.backend {
            NormBackend::CpuFused => cpu_ops::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps, false),
            NormBackend::CudaRows => self.forward_fused(xs),
            NormBackend::Candle => self.inner.forward(xs),
        })
    }
}

/// GEGLU's gate: hidden · GELU(gate) for `projected` = [hidden | gate] along the last dimension (exact
/// erf GELU), profiled as [`OpKind::Elementwise`]; one fused pass in f32 on the CPU
/// ([`LinearBackend::CpuGemm`], the backend of the linear layer it follows).
pub fn geglu(backend: LinearBackend, projected: &Tensor) -> Result<Tensor> {
    op(OpKind::Elementwise, projected.device(), || {
        if backend == LinearBackend::CpuGemm {
            return cpu_ops::geglu(projected);
        }
        let halves = projected.chunk(2, candle_core::D::Minus1)?;
        &halves[0] * halves[1].gelu_erf()?
    })
}

/// SiLU, profiled as [`OpKind::Elementwise`].
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    op(OpKind::Elementwise, xs.device(), || candle_nn::ops::silu(xs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Banding must not change a single output value's inputs: compare against one plain conv.
    #[test]
    fn banded_convolution_equals_the_plain_one() -> Result<()> {
        let device = Device::Cpu;
        let conv = Conv2d {
            weight: Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &device)?,
            bias: Some(Tensor::randn(0f32, 1.0, 5, &device)?),
            padding: 1,
            stride: 1,
            banded: true,
            backend: ConvBackend::CpuIm2col,
        };
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 11, 7), &device)?;
        let plain = conv.conv(&xs, 1)?;
        // Bands of 4, 4 and 3 rows.
        let banded = conv.forward_in_bands(&xs, 4)?;
        let diff = (plain - banded)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
