//! sdscale: Stable Diffusion 2.1-base text-to-image at any size, with the entropy-preserving
//! attention scale of Jin et al., "Training-free Diffusion Model Adaptation for Variable-Sized
//! Text-to-Image Synthesis" (NeurIPS 2023).
//!
//! Follow a prompt: `main` → [`app::run`] → [`cli::GenRequest`] → [`pipeline::Pipeline::generate`]
//! (tokenizer → text encoder → seeded noise → UNet + DDIM loop → VAE) → [`output::write_png`].
//! The attention-scale policy lives in [`attention`]; `sdscale entropy` measures its effect with
//! [`entropy`].

pub mod app;
pub mod attention;
pub mod cli;
pub mod entropy;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;
