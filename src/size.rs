//! Image sizes, in two units that must never be mixed up: pixels are (width, height), as people and
//! image files write them; latents are (height, width), as tensors are laid out (…, h, w). Distinct
//! types make a swap a compile error.

/// An image size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PixelSize {
    pub width: usize,
    pub height: usize,
}

/// A latent (or UNet level) size, in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LatentSize {
    pub height: usize,
    pub width: usize,
}

impl PixelSize {
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height }
    }

    /// The latents of an image this size (sides rounded up to whole latent pixels).
    pub fn latent(self, vae_scale_factor: usize) -> LatentSize {
        LatentSize { height: self.height.div_ceil(vae_scale_factor), width: self.width.div_ceil(vae_scale_factor) }
    }

    pub fn pixels(self) -> usize {
        self.width * self.height
    }
}

impl std::fmt::Display for PixelSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl LatentSize {
    /// Tokens of a UNet level `level` levels below this size: ⌈h/2^ℓ⌉·⌈w/2^ℓ⌉ (stride-2 convs with
    /// padding 1 round odd sizes up).
    pub fn tokens_at_level(self, level: usize) -> usize {
        let halve = |mut x: usize| {
            for _ in 0..level {
                x = x.div_ceil(2);
            }
            x
        };
        halve(self.height) * halve(self.width)
    }
}

/// The size a model was trained at, computed once from its configs (or `--train-size`): what the
/// entropy scale's T and resize's pixel count come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingSize {
    pub pixels: PixelSize,
    /// Pixels per latent pixel: 2^(VAE blocks − 1) = 8 for SD.
    pub vae_scale_factor: usize,
}

impl TrainingSize {
    pub fn latent(self) -> LatentSize {
        self.pixels.latent(self.vae_scale_factor)
    }

    /// The same model with another training size (`--train-size`, for fine-tunes).
    pub fn with_pixels(self, pixels: PixelSize) -> Self {
        Self { pixels, ..self }
    }
}
