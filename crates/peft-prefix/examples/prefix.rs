//! Prefix tuning on the tiny BLOOM of the test fixtures, with and without PEFT's projection
//! MLP (`prefix_projection`): the trainable parameters of each.
//! `cargo run -p peft-prefix --example prefix`

use burn::tensor::Device;
use peft_core::AdapterModel;
use peft_prefix::{PrefixTuningConfig, PromptLearningConfig, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    for projection in [false, true] {
        let config = PrefixTuningConfig {
            prompt: PromptLearningConfig::new(8),
            prefix_projection: projection,
            encoder_hidden_size: Some(32),
            ..PrefixTuningConfig::default()
        };
        let prefix = get_peft_model(peft_models::load(bloom, &Device::flex())?, config)?;
        println!(
            "prefix_projection={projection}: {}",
            prefix.trainable_summary()
        );
    }
    Ok(())
}
