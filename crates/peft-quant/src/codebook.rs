//! The code books: the 16 values of NF4 and FP4 and the 256-value dynamic map used for double
//! quantisation, with bitsandbytes' rounding rules for each.

/// NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA paper), indexed by 4-bit code.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) divided by its largest magnitude (12), indexed
/// by 4-bit code: bit 3 is the sign. Codes 0 and 8 are both +0.0 (bitsandbytes builds the table
/// from the Python integer `-0`, which is plain 0).
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// FP4's codes in ascending order of value. The two zeros are in the order PyTorch's `argsort`
/// gives them, which decides that zero encodes as code 0 and a tiny positive value as code 8.
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// A 4-bit code book with the decision boundaries bitsandbytes uses to encode into it.
#[derive(Debug, Clone)]
pub struct Codebook4 {
    /// Value of each code.
    pub values: [f32; 16],
    /// Codes in ascending order of value.
    order: [u8; 16],
    /// Midpoints between consecutive sorted values, computed in f32 as `(a + b) / 2`.
    bounds: [f32; 15],
}

impl Codebook4 {
    fn new(values: [f32; 16], order: [u8; 16]) -> Self {
        let mut bounds = [0.0f32; 15];
        for (i, bound) in bounds.iter_mut().enumerate() {
            *bound = (values[order[i] as usize] + values[order[i + 1] as usize]) / 2.0;
        }
        Self {
            values,
            order,
            bounds,
        }
    }

    /// NF4.
    pub fn nf4() -> Self {
        let mut order = [0u8; 16];
        for (i, o) in order.iter_mut().enumerate() {
            *o = i as u8;
        }
        Self::new(NF4, order)
    }

    /// FP4.
    pub fn fp4() -> Self {
        Self::new(FP4, FP4_ORDER)
    }

    /// The code of a value already scaled to [-1, 1]: `torch.bucketize(x, bounds)` (a value on a
    /// boundary goes to the lower bucket), mapped through the sort order.
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        // Number of bounds strictly below x; NaN compares false everywhere and lands in bucket 0,
        // as in PyTorch.
        let mut bucket = 0usize;
        for bound in &self.bounds {
            bucket += usize::from(*bound < x);
        }
        self.order[bucket]
    }
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), as f32 bit patterns; the
/// values ascend, index 255 is 1.0.
const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The dynamic map's values (what bitsandbytes saves as `nested_quant_map`).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_BITS.map(f32::from_bits)
}

/// Resolution of bitsandbytes' 8-bit encoder: [-1, 1] is cut into this many points.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU encoder for an ascending 256-entry map (`quantize_blockwise`): the value is
/// rounded to one of 65536 evenly spaced points of [-1, 1], and each point was assigned the entry
/// whose midpoint interval holds it. Near zero, where entries are closer than the points, this is
/// not always the nearest entry; bit-exactness means following it, not improving on it.
pub struct DynamicEncoder {
    lut: Vec<u8>,
}

impl DynamicEncoder {
    /// Builds the lookup table for `map` (as `build_quantize_lut`).
    pub fn new(map: &[f32; 256]) -> Self {
        let mut midpoints = [0.0f32; 255];
        for (i, m) in midpoints.iter_mut().enumerate() {
            *m = 0.5 * (map[i] + map[i + 1]);
        }
        let mut lut = vec![0u8; LUT_SIZE];
        let mut code = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let point = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while code < 255 && midpoints[code] < point {
                code += 1;
            }
            *slot = code as u8;
        }
        Self { lut }
    }

    /// The code of `x` (already multiplied by the block's reciprocal absmax). The index
    /// arithmetic is a fused multiply-add, as the compiled kernel (`-mfma`) computes it.
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        let x = x.clamp(-1.0, 1.0);
        let index = ((x + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as usize;
        self.lut[index.min(LUT_SIZE - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_codes_follow_the_nearest_value_and_ties_go_down() {
        let nf4 = Codebook4::nf4();
        for (code, value) in NF4.iter().enumerate() {
            assert_eq!(nf4.encode(*value) as usize, code);
        }
        let mid = (NF4[7] + NF4[8]) / 2.0;
        assert_eq!(nf4.encode(mid), 7);
        assert_eq!(nf4.encode(f32::from_bits(mid.to_bits() + 1)), 8);
        assert_eq!(nf4.encode(-1.0), 0);
        assert_eq!(nf4.encode(1.0), 15);
    }

    #[test]
    fn fp4_sign_of_zero_follows_bitsandbytes() {
        let fp4 = Codebook4::fp4();
        assert_eq!(fp4.encode(0.0), 0);
        assert_eq!(fp4.encode(-1e-4), 0);
        assert_eq!(fp4.encode(1e-4), 8);
        assert_eq!(fp4.encode(1.0), 3);
        assert_eq!(fp4.encode(-1.0), 11);
        assert_eq!(fp4.encode(0.5), 5);
    }

    #[test]
    fn dynamic_map_ascends_to_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map[255], 1.0);
        let encoder = DynamicEncoder::new(&map);
        assert_eq!(encoder.encode(1.0), 255);
        assert_eq!(encoder.encode(-1.0), 0);
        // 0.0 lands on LUT point 32768 = 1/65535, which belongs to a tiny positive entry.
        let zero = encoder.encode(0.0) as usize;
        assert!(map[zero] > 0.0 && map[zero] < 3e-5, "{}", map[zero]);
    }
}
