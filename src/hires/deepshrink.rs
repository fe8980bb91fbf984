//! Kohya's Deep Shrink ("hires fix"), as diffusers' community `examples/community/kohya_hires_fix.py`
//! (`UNet2DConditionModelHighResFix.forward`) does it:
//!
//! - entries (timestep, scale_factor, block_num), default one `600:0.5:1`, sorted by timestep
//!   descending (Python's stable `sorted`);
//! - after down block `block_num` (its downsampler included; its skips already taken) the sample going
//!   on is resized bicubically by `scale_factor` (align_corners false; PyTorch maps coordinates by the
//!   given factor, and the size is floor(side·factor)) while t > timestep, strictly; the first matching
//!   entry in that order wins for a block;
//! - in the up path a block whose earliest skip differs in size from the sample resizes the sample and
//!   its other skips to it (bicubic, by size);
//! - upsamplers double when every latent side divides by 2^upsamplers, as diffusers' UNet decides
//!   (`forward_upsample_size`), and go to the next skip's size otherwise.

use super::{StepContext, UNetPlan, Upsample};

/// One `--deepshrink T:SCALE:BLOCK` entry.
#[derive(Debug, Clone, Copy)]
pub struct ShrinkEntry {
    pub timestep: usize,
    pub scale: f64,
    pub block: usize,
}

impl PartialEq for ShrinkEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.timestep, self.scale.to_bits(), self.block) == (other.timestep, other.scale.to_bits(), other.block)
    }
}

impl Eq for ShrinkEntry {}

impl std::hash::Hash for ShrinkEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.timestep, self.scale.to_bits(), self.block).hash(state);
    }
}

/// The most `--deepshrink` entries a run takes.
pub const MAX_ENTRIES: usize = 8;

/// Deep Shrink's entries, sorted by timestep descending (a fixed-size array keeps plans `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeepShrink {
    entries: [Option<ShrinkEntry>; MAX_ENTRIES],
}

impl Default for DeepShrink {
    /// diffusers' default: `[{timestep: 600, scale_factor: 0.5, block_num: 1}]`.
    fn default() -> Self {
        Self::new(&[ShrinkEntry { timestep: 600, scale: 0.5, block: 1 }]).expect("one entry")
    }
}

impl DeepShrink {
    /// The entries in the reference's order (sorted by timestep, descending, stable).
    pub fn new(entries: &[ShrinkEntry]) -> Result<Self, String> {
        if entries.is_empty() || entries.len() > MAX_ENTRIES {
            return Err(format!("--deepshrink takes 1 to {MAX_ENTRIES} entries, got {}", entries.len()));
        }
        let mut sorted = entries.to_vec();
        sorted.sort_by_key(|entry| std::cmp::Reverse(entry.timestep));
        let mut array = [None; MAX_ENTRIES];
        for (slot, entry) in array.iter_mut().zip(sorted) {
            *slot = Some(entry);
        }
        Ok(Self { entries: array })
    }

    /// `T:SCALE:BLOCK`, e.g. `600:0.5:1`.
    pub fn parse_entry(text: &str) -> Result<ShrinkEntry, String> {
        let usage = || format!("--deepshrink {text:?}: use TIMESTEP:SCALE:BLOCK, e.g. 600:0.5:1");
        let parts: Vec<&str> = text.split(':').map(str::trim).collect();
        let [timestep, scale, block] = parts.as_slice() else { return Err(usage()) };
        let timestep: usize = timestep.parse().map_err(|_| usage())?;
        let scale: f64 = scale.parse().map_err(|_| usage())?;
        let block: usize = block.parse().map_err(|_| usage())?;
        if timestep > 1000 {
            return Err(format!("--deepshrink {text}: timestep {timestep} is out of range; use 0 to 1000"));
        }
        if !(scale.is_finite() && scale > 0.0 && scale <= 1.0) {
            return Err(format!("--deepshrink {text}: scale {scale} is out of range; use a factor in (0, 1]"));
        }
        if block > 3 {
            return Err(format!("--deepshrink {text}: block {block} is out of range; use a down block 0 to 3"));
        }
        Ok(ShrinkEntry { timestep, scale, block })
    }

    pub fn entries(&self) -> impl Iterator<Item = ShrinkEntry> + '_ {
        self.entries.iter().flatten().copied()
    }

    /// The words that name these entries (`600:0.5:1,800:0.5:2`), for metadata.
    pub fn describe(&self) -> String {
        self.entries().map(|e| format!("{}:{}:{}", e.timestep, e.scale, e.block)).collect::<Vec<_>>().join(",")
    }

    pub fn plan(&self, step: StepContext) -> UNetPlan {
        let mut plan = UNetPlan { match_skips: true, ..UNetPlan::default() };
        for block in 0..step.blocks {
            let hit = self.entries().find(|e| step.timestep > e.timestep as f64 && e.block == block);
            if let Some(entry) = hit {
                plan.shrink.push((block, entry.scale));
            }
        }
        let factor = 1 << (step.blocks - 1);
        if step.latent.0.is_multiple_of(factor) && step.latent.1.is_multiple_of(factor) {
            plan.upsample = Upsample::Double;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(timestep: usize) -> StepContext {
        StepContext { index: 0, steps: 5, timestep: timestep as f64, latent: (32, 32), blocks: 4 }
    }

    #[test]
    fn entries_sort_by_timestep_and_the_first_match_wins() {
        let parse = |t: &str| DeepShrink::parse_entry(t).unwrap();
        let method = DeepShrink::new(&[parse("200:0.5:1"), parse("800:0.5:2"), parse("600:0.75:1")]).unwrap();
        assert_eq!(method.describe(), "800:0.5:2,600:0.75:1,200:0.5:1");
        assert_eq!(method.plan(step(801)).shrink, [(1, 0.75), (2, 0.5)]);
        assert_eq!(method.plan(step(601)).shrink, [(1, 0.75)]);
        assert_eq!(method.plan(step(600)).shrink, [(1, 0.5)]); // strict: t > 600 fails, t > 200 holds
        assert!(method.plan(step(200)).shrink.is_empty());
        assert_eq!(DeepShrink::default().describe(), "600:0.5:1");
    }

    #[test]
    fn bad_entries_name_the_problem() {
        for (text, words) in [
            ("600:0.5", "use TIMESTEP:SCALE:BLOCK"),
            ("1200:0.5:1", "timestep 1200 is out of range"),
            ("600:0:1", "scale 0 is out of range"),
            ("600:0.5:4", "block 4 is out of range"),
        ] {
            assert!(DeepShrink::parse_entry(text).unwrap_err().contains(words), "{text}");
        }
    }
}
