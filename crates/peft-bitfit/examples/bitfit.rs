//! BitFit on the tiny BLOOM of the test fixtures: every bias (the seed tutorial's loop), then
//! only the attention's biases through `bias_pattern`. `cargo run -p peft-bitfit --example bitfit`

use burn::tensor::Device;
use peft_bitfit::{BitFitConfig, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    for pattern in [None, Some("self_attention")] {
        let config = BitFitConfig {
            bias_pattern: pattern.map(String::from),
            ..BitFitConfig::default()
        };
        let bitfit = get_peft_model(peft_models::load(bloom, &Device::flex())?, config)?;
        println!(
            "bias_pattern {pattern:?}: {} biases, {} parameters",
            bitfit.biases.len(),
            bitfit.num_param()
        );
    }
    Ok(())
}
