//! Prefix tuning on the tiny BLOOM of the test fixtures: 8 key/value prefixes per layer, save,
//! load back. `cargo run -p peft-prefix --example prefix`

use burn::tensor::Device;
use peft_core::AdapterModel;
use peft_prefix::{PrefixTuningConfig, PromptLearningConfig, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-prefix-{}", std::process::id()));
    let config = PrefixTuningConfig {
        prompt: PromptLearningConfig::new(8),
        ..Default::default()
    };
    let prefix = get_peft_model(base(), config)?;
    println!("{}", prefix.trainable_summary());
    prefix.save_pretrained(&out)?;
    let loaded = from_pretrained(base(), &out, false)?;
    println!("loaded: {}", loaded.trainable_summary());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
