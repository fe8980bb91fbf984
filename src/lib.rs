//! sdscale: Stable Diffusion 2.1-base text-to-image at any size, with the entropy-preserving
//! attention scale of Jin et al., "Training-free Diffusion Model Adaptation for Variable-Sized
//! Text-to-Image Synthesis" (NeurIPS 2023).
//!
//! Follow a prompt: `main` → [`app::run`] → [`cli::GenRequest`] → [`pipeline::Pipeline::generate_batch`]
//! (tokenizer → text encoder → seeded noise → UNet + DDIM loop → VAE) → [`output::write_png`] with
//! [`metadata`]. `compare` adds a labelled [`grid`] and an [`html`] rating page.
//! The attention-scale policy lives in [`attention`].

pub mod app;
pub mod attention;
pub mod cli;
pub mod grid;
pub mod html;
pub mod metadata;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;
