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

/// The smallest side accepted, in pixels (8 latent pixels).
pub const MIN_SIDE: usize = 64;
/// The largest side accepted: at 4096 px the top UNet level already attends over 262,144 tokens.
pub const MAX_SIDE: usize = 4096;

/// Refuses a side that is not a multiple of 8 in `MIN_SIDE..=MAX_SIDE`; `name` names it ("--width").
pub fn check_side(name: &str, value: usize) -> anyhow::Result<()> {
    if !value.is_multiple_of(8) || value < MIN_SIDE {
        // Clamped first: rounding usize::MAX up to a multiple of 8 would overflow.
        let suggestion = value.clamp(MIN_SIDE, MAX_SIDE).div_ceil(8) * 8;
        anyhow::bail!("{name} {value} must be a multiple of 8 and at least {MIN_SIDE} (e.g. {suggestion})");
    }
    if value > MAX_SIDE {
        anyhow::bail!("{name} {value} is larger than {MAX_SIDE}");
    }
    Ok(())
}

/// One size as `--sizes` writes it: `N` (N×N) or `WxH` (`x` or `X`), each side checked.
pub fn parse_size(flag: &str, text: &str) -> anyhow::Result<PixelSize> {
    let text = text.trim();
    let (width, height) = match text.split_once(['x', 'X']) {
        None => (text, text),
        Some((width, height)) => (width.trim(), height.trim()),
    };
    let side = |side: &str| side.parse::<usize>().ok();
    let (Some(width), Some(height)) = (side(width), side(height)) else {
        anyhow::bail!("{flag} {text:?}: expected a size as N or WIDTHxHEIGHT, e.g. 512 or 768x512");
    };
    check_side(&format!("{flag} width"), width)?;
    check_side(&format!("{flag} height"), height)?;
    Ok(PixelSize::new(width, height))
}

/// A comma-separated list of sizes (`224,512,768x512`), in the order given; a size listed twice is
/// refused (it would make the same images twice).
pub fn parse_sizes(flag: &str, text: &str) -> anyhow::Result<Vec<PixelSize>> {
    let mut sizes: Vec<PixelSize> = Vec::new();
    for item in text.split(',') {
        let size = parse_size(flag, item)?;
        if sizes.contains(&size) {
            anyhow::bail!("{flag}: {size} is listed twice");
        }
        sizes.push(size);
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_lists_take_n_and_wxh_and_check_every_side() {
        let sizes = parse_sizes("--sizes", "224, 512x768 ,64X64").unwrap();
        assert_eq!(sizes, [PixelSize::new(224, 224), PixelSize::new(512, 768), PixelSize::new(64, 64)]);
        for (bad, needle) in [
            ("100", "--sizes width 100 must be a multiple of 8"),
            ("224,", "expected a size"),
            ("224x", "expected a size"),
            ("8192", "larger than 4096"),
            ("224,224", "224x224 is listed twice"),
            ("-64", "expected a size"),
        ] {
            let err = parse_sizes("--sizes", bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    /// Found by tests/fuzz.rs: the suggestion for an odd usize::MAX side overflowed.
    #[test]
    fn side_suggestion_for_usize_max_does_not_overflow() {
        let err = check_side("--width", usize::MAX).unwrap_err().to_string();
        assert!(err.contains("e.g. 4096"), "{err}");
    }
}
