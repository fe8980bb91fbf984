//! The networks, one file each, with their reference implementation's parameter names: SD's CLIP
//! text encoder, UNet and VAE, LDM-256's LDMBert text encoder, and `sdscale eval`'s Inception-v3
//! (pytorch-fid's names).
pub mod clip;
pub mod inception;
pub mod layers;
pub mod ldm_bert;
pub mod resnet;
pub mod unet;
pub mod vae;
