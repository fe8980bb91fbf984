//! Structural high-resolution methods: what they change inside one UNet call, as data.
//!
//! A method of this kind (HiDiffusion, Kohya's Deep Shrink) changes the UNet's *structure* at some
//! steps: a downsampler's stride, a resize or pool between blocks, self-attention in windows. It never
//! needs code inside the network: for each step it writes a [`UNetPlan`], and the UNet's forward
//! (models/unet.rs) consults the plan at the few places a method can act, so the forward still reads
//! top to bottom. A new method is one file here that builds a plan, and one arm of [`Structure::plan`].
//!
//! Structure and attention scale are independent: the plan changes sizes and windows, and the
//! attention-scale policy (attention.rs) sees each call's real key count. So `hidiffusion+entropy`
//! scales a window's self-attention by its own N against its level's training count T.

pub mod deepshrink;
pub mod hidiffusion;
pub mod resample;

pub use deepshrink::{DeepShrink, ShrinkEntry};
pub use hidiffusion::HiDiffusion;

use crate::rng::TorchGenerator;

/// A convolution's geometry when a method changes it (HiDiffusion's RAU-Net downsampler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

/// Which half of the UNet a block is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Down,
    Up,
}

/// One transformer block (`transformer_blocks.{transformer_block}` of attention `attention` of a block)
/// whose self-attention runs in 2×2 shifted windows, with the shift step k (0..=3) of each image of the
/// batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowedAttention {
    pub part: Part,
    pub block: usize,
    pub attention: usize,
    pub transformer_block: usize,
    /// k per image (not per batch entry: the guided batch [negatives…, prompts…] shares image i's k
    /// between entries i and B + i, as the reference's single call shares its draw).
    pub shifts: Vec<u8>,
}

/// HiDiffusion's pool in the down path and its undoing in the up path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Down block that average-pools (2×2, ceil) after its first resnet + attention.
    pub down_block: usize,
    /// Up block that resizes (bicubic) back to the size before the pool after its second resnet + attention.
    pub up_block: usize,
}

/// How up blocks upsample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Upsample {
    /// Nearest-neighbour to the size of the next skip in line (diffusers' `upsample_size`; the same as
    /// doubling whenever nothing resized in between).
    #[default]
    ToSkip,
    /// Nearest-neighbour ×2: diffusers' rule when every latent side divides by 2^upsamplers, which
    /// differs from [`Upsample::ToSkip`] once Deep Shrink has resized to an odd size.
    Double,
}

/// What one UNet call does differently from the plain network. `UNetPlan::default()` is the plain one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UNetPlan {
    /// Down blocks whose downsampler conv runs with another geometry.
    pub downsamplers: Vec<(usize, ConvGeometry)>,
    pub pool: Option<Pool>,
    /// After down block i (its downsampler included), the sample going on is resized bicubically by
    /// this factor (skips keep their size).
    pub shrink: Vec<(usize, f64)>,
    /// Each up block brings the sample and its other skips to the size of its earliest skip when they
    /// differ (bicubic).
    pub match_skips: bool,
    pub upsample: Upsample,
    pub windows: Vec<WindowedAttention>,
}

impl UNetPlan {
    pub fn is_plain(&self) -> bool {
        *self == UNetPlan::default()
    }

    pub fn downsampler(&self, block: usize) -> Option<ConvGeometry> {
        self.downsamplers.iter().find(|(b, _)| *b == block).map(|(_, g)| *g)
    }

    pub fn shrink_after(&self, block: usize) -> Option<f64> {
        self.shrink.iter().find(|(b, _)| *b == block).map(|(_, s)| *s)
    }

    /// The shift steps of `transformer_blocks.{transformer_block}` of attention `attention` of `part`
    /// block `block`, when its self-attention is windowed.
    pub fn window(&self, part: Part, block: usize, attention: usize, transformer_block: usize) -> Option<&[u8]> {
        self.windows
            .iter()
            .find(|w| {
                (w.part, w.block, w.attention, w.transformer_block) == (part, block, attention, transformer_block)
            })
            .map(|w| w.shifts.as_slice())
    }
}

/// The structure a mode gives the UNet.
// Deep Shrink's entries live inline so that plans stay `Copy` (they are compared and batched by value).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Structure {
    /// The network as trained.
    #[default]
    Plain,
    HiDiffusion(HiDiffusion),
    DeepShrink(DeepShrink),
}

/// Per-image state a structure needs across the steps of one image.
pub struct StructureState {
    /// HiDiffusion's window-shift generators, one per image, seeded with the image's seed.
    shift_generators: Vec<TorchGenerator>,
}

impl StructureState {
    pub fn new(seeds: &[u32]) -> Self {
        Self { shift_generators: seeds.iter().map(|&seed| TorchGenerator::new(seed)).collect() }
    }
}

/// Where in the loop a UNet call is, and on what.
#[derive(Debug, Clone, Copy)]
pub struct StepContext {
    pub index: usize,
    /// UNet calls in the schedule (HiDiffusion's `_num_timesteps`: 2N−1 for Heun, N+1 for PNDM).
    pub steps: usize,
    /// The timestep fed to the UNet (fractional for the Euler family).
    pub timestep: f64,
    /// The latent size (height, width) the UNet is called on.
    pub latent: (usize, usize),
    /// Down/up blocks of the UNet.
    pub blocks: usize,
}

impl Structure {
    /// The plan of one UNet call.
    pub fn plan(&self, step: StepContext, state: &mut StructureState) -> UNetPlan {
        match self {
            Structure::Plain => UNetPlan::default(),
            Structure::HiDiffusion(method) => method.plan(step, &mut state.shift_generators),
            Structure::DeepShrink(method) => method.plan(step),
        }
    }
}
