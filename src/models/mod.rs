//! The three networks of Stable Diffusion, one file each, with diffusers' parameter names; and
//! `sdscale eval`'s Inception-v3 (pytorch-fid's names).
pub mod clip;
pub mod inception;
pub mod layers;
pub mod resnet;
pub mod unet;
pub mod vae;
