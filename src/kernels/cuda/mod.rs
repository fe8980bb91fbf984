//! CUDA kernels as candle custom ops, their PTX compiled by build.rs from the `.cu` files beside them.

pub mod conv;
pub mod flash_attention;
#[cfg(feature = "flash-attn")]
pub mod flash_attn2;
