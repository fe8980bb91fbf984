//! The networks, one file each, with diffusers' (or transformers') parameter names: SD's CLIP text
//! encoder, UNet and VAE, and LDM-256's LDMBert text encoder.
pub mod clip;
pub mod layers;
pub mod ldm_bert;
pub mod resnet;
pub mod unet;
pub mod vae;
