//! conv2d on CUDA as im2col (sdscale's kernel, im2col.cu) + one cuBLAS GEMM per image, writing NCHW
//! directly. candle's own CUDA conv gathers its im2col with uncoalesced reads and 64-bit index
//! arithmetic, multiplies in NHWC, then copies the result to NCHW. Measured on an H100 (2026-11-26,
//! scripts/gpu/check.sh): a 512² UNet step's convolutions 15.7 → 8.3 ms, 1024² 57.2 → 25.6 ms, images
//! within 0.15 levels of candle's. `SDSCALE_CUDA_CONV=0` switches back to candle's (for comparison; read
//! once, crate::backend).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/im2col.ptx"));

/// Whether this input's im2col matrix is small enough for the kernel's 32-bit indices (the backend,
/// chosen once, already says f16 or f32 on CUDA; larger inputs go to candle's convolution).
pub fn fits(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<bool> {
    let (b, c_in, h, w) = xs.dims4()?;
    let k = weight.dim(3)?;
    if h + 2 * padding < k || w + 2 * padding < k {
        return Ok(false);
    }
    let out_pixels = ((h + 2 * padding - k) / stride + 1) * ((w + 2 * padding - k) / stride + 1);
    Ok(b * c_in * k * k * out_pixels < i32::MAX as usize)
}

/// conv2d of `xs` (b, c_in, h, w) with `weight` (c_out, c_in, k, k), square padding and stride, no
/// dilation or groups, plus an optional per-channel bias.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, _, k, _) = weight.dims4()?;
    let h_out = (h + 2 * padding - k) / stride + 1;
    let w_out = (w + 2 * padding - k) / stride + 1;
    let cols = if k == 1 && stride == 1 && padding == 0 {
        xs.reshape((b, c_in, h * w))?
    } else {
        xs.contiguous()?.apply_op1_no_bwd(&Im2Col { k, stride, padding })?
    }; // (b, c_in·k·k, h_out·w_out)
       // One weight matrix for every image: a stride-0 batch, which cuBLAS's strided-batched GEMM takes.
    let weight = weight.reshape((1, c_out, c_in * k * k))?.broadcast_as((b, c_out, c_in * k * k))?;
    let out = weight.matmul(&cols)?.reshape((b, c_out, h_out, w_out))?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
        None => Ok(out),
    }
}

struct Im2Col {
    k: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
        name: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c_in, h, w) = layout.shape().dims4()?;
        let (k, stride, padding) = (self.k, self.stride, self.padding);
        let h_out = (h + 2 * padding - k) / stride + 1;
        let w_out = (w + 2 * padding - k) / stride + 1;
        let numel = b * c_in * k * k * h_out * w_out;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sdscale-im2col: the input must be contiguous")
        };
        let x = storage.as_cuda_slice::<T>()?.slice(start..end);
        let device = storage.device();
        let func = device.get_or_load_custom_func(name, "sdscale_im2col", PTX)?;
        // SAFETY: the kernel writes every element of `cols` (grid-stride loop over all of them).
        let cols = unsafe { device.alloc::<T>(numel)? };
        const THREADS: usize = 256;
        let config = LaunchConfig {
            grid_dim: (numel.div_ceil(THREADS).min(1 << 20) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [numel, c_in, h, w, k, stride, padding, h_out, w_out].map(|v| v as i32);
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&cols);
        for arg in &args {
            builder.arg(arg);
        }
        // SAFETY: argument types and order match the kernel's signature.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(cols, device.clone()), Shape::from((b, c_in * k * k, h_out * w_out))))
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sdscale-im2col"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("sdscale-im2col runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F16 => self.launch::<half::f16>(storage, layout, "im2col_f16"),
            DType::F32 => self.launch::<f32>(storage, layout, "im2col_f32"),
            other => candle_core::bail!("sdscale-im2col: {other:?} is not supported"),
        }
    }
}
