//! sdscale's own compute kernels, one home for every device: what runs where is decided once per model
//! (crate::backend) and dispatched by the layers (crate::models::layers) and the attention
//! (crate::attention); these files only compute.
//!
//! - `cpu`: f32 kernels built on gemm and rayon: blocked attention, banded im2col convolution, linear,
//!   GroupNorm(+SiLU) and GEGLU.
//! - `cuda` (the `cuda` feature): candle custom ops around sdscale's PTX (build.rs compiles the `.cu`
//!   files): the fused attention and the im2col of the convolution.
//!
//! A new kernel goes here, with a variant in crate::backend that chooses it and an arm where its op
//! kind is dispatched.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
