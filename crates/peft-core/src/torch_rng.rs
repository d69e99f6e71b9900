//! PyTorch's CPU random generator, bit for bit, for the tensors PEFT draws from a seeded
//! `torch.Generator` and never saves (VeRA's shared projections from `projection_prng_key`
//! when `save_projection` is false): the same seed must give the same numbers here.
//!
//! `torch.Generator(device="cpu").manual_seed(seed)` is the textbook MT19937 seeded with the low
//! 32 bits of `seed`; `tensor.uniform_(from, to, generator=g)` on an f32 tensor takes one 32-bit
//! draw per element, keeps its low 24 bits as `x = bits · 2⁻²⁴` in f64, and stores
//! `x · (to − from) + from` rounded to f32, with `from` and `to` first rounded to f32 and their
//! difference taken in f32 (ATen's `uniform_real_distribution<float>`). Checked against torch
//! 2.15's values in the tests below.

/// MT19937's state size.
const N: usize = 624;
/// MT19937's middle word offset.
const M: usize = 397;

/// A `torch.Generator` on the CPU: MT19937.
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    state: Box<[u32; N]>,
    index: usize,
}

impl TorchGenerator {
    /// `torch.Generator(device="cpu").manual_seed(seed)` (the seed's low 32 bits, as ATen's
    /// `mt19937` takes them).
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: N }
    }

    /// The next 32-bit draw (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7FFF_FFFF);
            let mag = if y & 1 == 1 { 0x9908_B0DF } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// `torch.empty(n).uniform_(from, to, generator=self)`: `n` f32 values.
    pub fn uniform_f32(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        let span = f64::from(to - from);
        (0..n)
            .map(|_| {
                let x = f64::from(self.next_u32() & 0x00FF_FFFF) / f64::from(1u32 << 24);
                (x * span + f64::from(from)) as f32
            })
            .collect()
    }

    /// PEFT's VeRA `_kaiming_init(shape, generator)`: Kaiming-uniform with gain √2 over
    /// `fan_in = shape[1]` (bound `√3 · √2 / √fan_in`, computed in f64 as Python does), row-major
    /// `shape[0] · shape[1]` values.
    pub fn kaiming_uniform(&mut self, shape: [usize; 2]) -> Vec<f32> {
        let std = 2f64.sqrt() / (shape[1] as f64).sqrt();
        let bound = 3f64.sqrt() * std;
        self.uniform_f32(shape[0] * shape[1], -bound, bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's VeRA projections for key 0 (`vera_A: [4, 200]`, then `vera_B: [32, 4]` from the
    /// same generator), as torch 2.15 computes them; index 700 lies past MT19937's first state
    /// refresh (624 draws).
    #[test]
    fn pefts_vera_projections_are_torchs_bits() {
        let mut g = TorchGenerator::manual_seed(0);
        let a = g.kaiming_uniform([4, 200]);
        let b = g.kaiming_uniform([32, 4]);
        let bits = |v: f32| v.to_bits();
        assert_eq!(
            a[..3].iter().map(|&v| bits(v)).collect::<Vec<_>>(),
            vec![0xbaa9_f7e3, 0x3dbe_4a17, 0xbe11_fa18]
        );
        assert_eq!(bits(a[3 * 200 + 199]), 0xbcfa_f430);
        assert_eq!(bits(a[700]), 0xbda6_0617);
        assert_eq!(
            b[..3].iter().map(|&v| bits(v)).collect::<Vec<_>>(),
            vec![0x3f0b_7ad6, 0xbf06_042b, 0x3f79_f375]
        );
        assert_eq!(bits(b[127]), 0xbf74_d25e);
    }

    /// A seed above 32 bits keeps its low 32 (torch: `manual_seed(2**40 + 7)`'s first
    /// `uniform_(0, 1)`).
    #[test]
    fn wide_seeds_keep_their_low_32_bits() {
        let mut g = TorchGenerator::manual_seed((1 << 40) + 7);
        assert_eq!(g.uniform_f32(1, 0.0, 1.0)[0].to_bits(), 0x3f08_f0af);
    }

    /// MT19937's reference output: the 10,000th draw for seed 5489 is 4,123,659,995.
    #[test]
    fn mt19937_matches_its_reference() {
        let mut g = TorchGenerator::manual_seed(5489);
        let last = (0..10_000).map(|_| g.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }
}
