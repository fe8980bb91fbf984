//! Normal noise that matches `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`
//! value for value, so a seed gives diffusers' exact initial latents.
//!
//! PyTorch's CPU generator is a standard mt19937 (aten/src/ATen/core/MT19937RNGEngine.h). For float32
//! tensors of at least 16 values, `normal_` first fills the tensor with 24-bit uniforms, then turns each
//! block of 16 into normals with Box–Muller (aten/src/ATen/native/cpu/DistributionTemplates.h,
//! `normal_fill` / `normal_fill_16`). When the length is not a multiple of 16, the last 16 values are
//! redrawn from 16 fresh uniforms and transformed again.

/// The Mersenne Twister mt19937, seeded like `torch.Generator().manual_seed(seed)`.
pub struct TorchGenerator {
    state: [u32; 624],
    index: usize,
}

impl TorchGenerator {
    /// torch keeps only 32 bits of the seed (`init_with_uint32`), which is why the CLI refuses larger seeds.
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 == 1 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: the low 24 bits of one draw, scaled by 2⁻²⁴.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `torch.rand(1)` (float32, CPU): one draw through the same uniform as [`randn`]'s.
    pub fn rand_f32(&mut self) -> f32 {
        self.uniform_f32()
    }
}

/// Box–Muller over one block of 16 uniforms, in place, in f32 as torch computes it.
fn normal_fill_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

/// `len` standard normal values, as `torch.randn(len)` draws them from `generator`.
///
/// Only lengths of at least 16 follow this path in torch (shorter tensors use a scalar path we do not
/// need: SD latents always have far more than 16 values), so shorter requests are refused.
pub fn randn(generator: &mut TorchGenerator, len: usize) -> Vec<f32> {
    assert!(len >= 16, "torch-compatible randn needs at least 16 values, got {len}");
    let mut data: Vec<f32> = (0..len).map(|_| generator.uniform_f32()).collect();
    for block in data.chunks_exact_mut(16) {
        normal_fill_16(block);
    }
    if !len.is_multiple_of(16) {
        let tail = &mut data[len - 16..];
        for value in tail.iter_mut() {
            *value = generator.uniform_f32();
        }
        normal_fill_16(tail);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mt19937's reference output: the 10000th draw for the default seed 5489 is 4123659995.
    #[test]
    fn mt19937_matches_the_reference_sequence() {
        let mut generator = TorchGenerator::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = generator.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    /// torch.manual_seed(0); torch.randn(16)[:4] == [-1.1258, -1.1524, -0.2506, -0.4339]
    #[test]
    fn first_normals_of_seed_zero() {
        let values = randn(&mut TorchGenerator::new(0), 16);
        let expected = [-1.1258398f32, -1.1523602, -0.25057858, -0.43387884];
        for (got, want) in values.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
