//! The three networks of Stable Diffusion, one file each, with diffusers' parameter names.
pub mod clip;
pub mod layers;
pub mod resnet;
pub mod unet;
pub mod vae;
