//! `config.json`'s RoPE settings (`rope_theta`, `rope_scaling` / `rope_parameters`, partial
//! rotation): any JSON gives an error or finite, positive inverse frequencies at every length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_models::rope::Rotary;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for head_dim in [2, 64, 128] {
        let Ok(rotary) = Rotary::from_config(&value, head_dim, "fuzz") else {
            continue;
        };
        for seq in [1, 512, 4096, 131_072] {
            let (freqs, scale) = rotary.frequencies(seq);
            assert_eq!(freqs.len(), rotary.dim / 2);
            assert!(scale.is_finite(), "{value}: scale {scale}");
            assert!(
                freqs.iter().all(|f| f.is_finite()),
                "{value}: non-finite frequencies at {seq}"
            );
        }
    }
});
