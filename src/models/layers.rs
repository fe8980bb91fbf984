//! The building blocks the networks share: candle-nn's layers with faster paths where candle's are slow
//! (convolution, linear and GroupNorm on the CPU; convolution and GroupNorm on CUDA), each forward
//! labelled with its op kind for `SDSCALE_PROFILE=1`.

mod cpu_conv;
mod cpu_ops;
#[cfg(feature = "cuda")]
mod cuda_conv;

pub(crate) use cpu_ops::values as f32_values;

use crate::profile::{op, OpKind};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// conv2d with square padding and stride (no dilation, no groups) plus an optional per-channel bias:
/// sdscale's banded im2col + gemm in f32 on the CPU (layers/cpu_conv.rs), its im2col kernel + cuBLAS on CUDA
/// (layers/cuda_conv.rs), candle's convolution otherwise.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    if cpu_conv::applies(xs, weight) {
        return cpu_conv::conv2d(xs, weight, bias, padding, stride);
    }
    #[cfg(feature = "cuda")]
    {
        let (_, c_in, h, w) = xs.dims4()?;
        let k = weight.dim(3)?;
        let out_pixels = ((h + 2 * padding - k) / stride + 1) * ((w + 2 * padding - k) / stride + 1);
        if cuda_conv::applies(xs, c_in, k, out_pixels) {
            return cuda_conv::conv2d(xs, weight, bias, padding, stride);
        }
    }
    let ys = xs.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        None => Ok(ys),
    }
}

/// candle-nn's `Conv2d` (its weights and config) computed by [`conv2d`], profiled as [`OpKind::Conv`].
pub struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        config: candle_nn::Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        candle_nn::conv2d(c_in, c_out, kernel, config, vb).map(Self)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let config = self.0.config();
        op(OpKind::Conv, xs.device(), || {
            if config.dilation == 1 && config.groups == 1 {
                conv2d(xs, self.0.weight(), self.0.bias(), config.padding, config.stride)
            } else {
                self.0.forward(xs)
            }
        })
    }
}

/// candle-nn's `Linear` (one gemm with the bias pre-filled in f32 on the CPU), profiled as
/// [`OpKind::Matmul`].
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        candle_nn::linear(c_in, c_out, vb).map(Self)
    }
    pub fn no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        candle_nn::linear_no_bias(c_in, c_out, vb).map(Self)
    }
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Matmul, xs.device(), || match cpu_ops::applies(xs) {
            true => cpu_ops::linear(xs, self.0.weight(), self.0.bias()),
            false => self.0.forward(xs),
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
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { inner, weight, bias, groups, eps })
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
        if cpu_ops::applies(xs) {
            return op(OpKind::Norm, xs.device(), || {
                cpu_ops::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps, true)
            });
        }
        silu(&self.forward(xs)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        op(OpKind::Norm, xs.device(), || match xs.device() {
            Device::Cpu if cpu_ops::applies(xs) => {
                cpu_ops::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps, false)
            }
            Device::Cuda(_) if xs.dtype() != DType::F64 => self.forward_fused(xs),
            _ => self.inner.forward(xs),
        })
    }
}

/// GEGLU's gate: hidden · GELU(gate) for `projected` = [hidden | gate] along the last dimension (exact
/// erf GELU), profiled as [`OpKind::Elementwise`]; one fused pass in f32 on the CPU.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    op(OpKind::Elementwise, projected.device(), || {
        if cpu_ops::applies(projected) {
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
