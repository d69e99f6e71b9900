//! P-tuning on the tiny BLOOM of the test fixtures: 8 virtual tokens through PEFT's MLP
//! encoder, save, load back. `cargo run -p peft-ptuning --example ptuning`

use burn::tensor::Device;
use peft_core::AdapterModel;
use peft_ptuning::{PromptEncoderConfig, PromptLearningConfig, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-ptuning-{}", std::process::id()));
    let config = PromptEncoderConfig {
        prompt: PromptLearningConfig::new(8),
        ..Default::default()
    };
    let ptuning = get_peft_model(base(), config)?;
    println!("{}", ptuning.trainable_summary());
    ptuning.save_pretrained(&out)?;
    let loaded = from_pretrained(base(), &out, false)?;
    println!("loaded: {}", loaded.trainable_summary());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
