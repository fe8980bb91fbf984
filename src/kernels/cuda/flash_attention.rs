//! sdscale's fused attention kernel (flash_attention.cu) as a candle custom op: f16, head size 64 (every
//! SD 2.x UNet attention layer), any number of queries and keys, any softmax scale. It never writes the
//! scores to device memory and reads the projections' (b, n, heads·64) layout directly.
//!
//! Opt-in (`SDSCALE_FLASH_ATTENTION=1`, read once: crate::backend): measured on an H100 (2026-11-26,
//! scripts/gpu/check.sh) it is correct (images within 0.16 levels of the unfused path) but slower than
//! cuBLAS GEMMs around candle's softmax: 17.1 ms of attention in a 512² step against 11.2 + 1.9 ms (the
//! GEMMs and softmax, plus the head split/merge copies it saves), 238 against 192 + 7 ms at 1024². The
//! likely cause is shared-memory bank conflicts in its softmax and rescale loops (the two lanes of a row
//! walk 32 consecutive floats, so a warp's 32 accesses land in one bank); that is the next thing to fix,
//! with a GPU to measure it on, before it becomes the default.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, Layout, Result, Shape, Tensor};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const HEAD_DIM: usize = 64;
const BLOCK_ROWS: usize = 64;
const THREADS: u32 = 128;

/// Whether the kernel can compute this layer's attention: `heads` heads of 64 in (b, n, heads·64). (f16
/// on CUDA is what the backend, chosen once, already says.)
pub fn fits(q: &Tensor, heads: usize) -> bool {
    q.dim(2).is_ok_and(|c| c == heads * HEAD_DIM)
}

/// softmax(scale · q·kᵀ)·v per head, for q (b, n_q, heads·64), k and v (b, n_k, heads·64), all f16 on
/// one CUDA device; the output is (b, n_q, heads·64), heads side by side as the projections had them.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &FlashAttention { heads, scale: scale as f32 })
}

/// The kernel reads rows of 64 halves with 16-byte loads: contiguous inputs whose start is 16-byte
/// aligned (candle's allocations are; an offset must be a multiple of 8 elements).
fn slice<'a>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, f16>> {
    match layout.contiguous_offsets() {
        Some((start, end)) if start % 8 == 0 => Ok(storage.as_cuda_slice::<f16>()?.slice(start..end)),
        _ => candle_core::bail!("sdscale-flash-attention: inputs must be contiguous and aligned"),
    }
}

struct FlashAttention {
    heads: usize,
    scale: f32,
}

impl candle_core::CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "sdscale-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("sdscale-flash-attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, n_q, width) = q_layout.shape().dims3()?;
        let (k_batch, n_k, k_width) = k_layout.shape().dims3()?;
        let heads = self.heads;
        if width != heads * HEAD_DIM || k_width != width || k_batch != batch || v_layout.shape() != k_layout.shape() {
            candle_core::bail!(
                "sdscale-flash-attention: unexpected shapes q {:?} k {:?} v {:?}",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        if n_k == 0 {
            candle_core::bail!("sdscale-flash-attention: no keys");
        }
        let (q_slice, k_slice, v_slice) = (slice(q, q_layout)?, slice(k, k_layout)?, slice(v, v_layout)?);
        let device = q.device();
        let func = device.get_or_load_custom_func("flash_attention_f16_d64", "sdscale_flash_attention", PTX)?;
        // SAFETY: the kernel writes every element of the output (each query row, each head's 64 columns).
        let out = unsafe { device.alloc::<f16>(batch * n_q * width)? };
        let config = LaunchConfig {
            grid_dim: (n_q.div_ceil(BLOCK_ROWS) as u32, (batch * heads) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_q_arg, n_k_arg, heads_arg) = (n_q as i32, n_k as i32, heads as i32);
        let scale_log2e = self.scale * std::f32::consts::LOG2_E;
        let mut builder = func.builder();
        builder.arg(&q_slice);
        builder.arg(&k_slice);
        builder.arg(&v_slice);
        builder.arg(&out);
        builder.arg(&n_q_arg);
        builder.arg(&n_k_arg);
        builder.arg(&heads_arg);
        builder.arg(&scale_log2e);
        // SAFETY: argument types and order match the kernel's signature; the grid covers every row.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device.clone()), Shape::from((batch, n_q, width))))
    }
}
