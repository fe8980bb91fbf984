//! One integration-test crate (as ripgrep does), with a module per concern. Everything runs offline on
//! the committed fixture model, against reference outputs made by `scripts/make_fixtures.py` with
//! diffusers 0.42.1 / transformers 5.24 / torch 2.11.

mod util;

mod batch;
mod cli;
mod compare;
mod entropy;
mod eval;
mod families;
mod full_size;
mod fuzz;
mod hires;
mod images;
mod layout;
mod multidiffusion;
mod real_layout;
mod reference;
mod samplers;
mod sdxl;
mod shards;
mod turbo;
mod vae;
