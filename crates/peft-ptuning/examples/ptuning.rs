//! P-tuning on the tiny BLOOM of the test fixtures with each of PEFT's prompt encoders (MLP,
//! bidirectional LSTM), saved in PEFT's layout. `cargo run -p peft-ptuning --example ptuning`

use burn::tensor::Device;
use peft_core::AdapterModel;
use peft_ptuning::{EncoderType, PromptEncoderConfig, PromptLearningConfig, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    for encoder in [EncoderType::Mlp, EncoderType::Lstm] {
        let config = PromptEncoderConfig {
            prompt: PromptLearningConfig::new(8),
            encoder_reparameterization_type: encoder,
            encoder_hidden_size: Some(32),
            ..PromptEncoderConfig::default()
        };
        let ptuning = get_peft_model(peft_models::load(bloom, &Device::flex())?, config)?;
        println!("{encoder:?}: {}", ptuning.trainable_summary());
        ptuning.save_pretrained(
            &std::env::temp_dir().join(format!("peft-example-ptuning-{encoder:?}")),
        )?;
    }
    Ok(())
}
