//! sdscale: Stable Diffusion 2.1-base text-to-image at any size, with the entropy-preserving
//! attention scale of Jin et al., "Training-free Diffusion Model Adaptation for Variable-Sized
//! Text-to-Image Synthesis" (NeurIPS 2023).
//!
//! Follow a prompt: `main` → [`app::run`] → [`cli::GenRequest`] → [`pipeline::Pipeline::generate_batch`]
//! (tokenizer → text encoder → seeded noise → UNet + DDIM loop → VAE) → [`output::write_png`] with
//! [`metadata`]. `compare` adds a labelled [`grid`] and an [`html`] rating page.
//! The attention-scale policy lives in [`attention`]; `sdscale entropy` measures its effect with
//! [`entropy`].

pub mod app;
pub mod attention;
pub mod backend;
pub mod cli;
pub mod device_memory;
pub mod entropy;
pub mod error;
pub mod eval;
pub mod family;
pub mod grid;
pub mod hires;
pub mod html;
mod kernels;
pub mod manifest;
pub mod metadata;
pub mod mode;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod prompts;
pub mod rng;
pub mod sampler;
pub mod shard;
pub mod size;
pub mod text;
pub mod tokenizer;
pub mod unet_step;
pub mod weights;

/// The system allocator, aware of weights whose memory is their mapped file (see [`weights::mapped`]).
#[global_allocator]
static ALLOCATOR: weights::mapped::MappingAwareAllocator = weights::mapped::MappingAwareAllocator;

/// Keeps freed tensor buffers in the process for reuse instead of returning each to the kernel.
///
/// glibc serves large allocations with a fresh `mmap` and unmaps them on free, so every op's output
/// (and every im2col tile inside candle's convolutions) costs page faults plus the kernel zeroing the
/// pages again: ~10% of a CPU UNet step in a profile. Raising the mmap threshold to its maximum (32 MiB)
/// and the trim threshold keeps those buffers on the heap. Call once at start-up, before threads exist.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !backend::switch_or_default(|switches| switches.no_mallopt) {
        // SAFETY: mallopt only adjusts allocator parameters; called before any other thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 * 1024 * 1024);
        }
    }
}
