//! Prompt tuning on the tiny BLOOM of the test fixtures: 8 virtual tokens, save, load back,
//! generate. `cargo run -p peft-prompt --example prompt`

use burn::tensor::Device;
use peft_core::AdapterModel;
use peft_core::CausalLm;
use peft_prompt::{PromptLearningConfig, PromptTuningConfig, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-prompt-{}", std::process::id()));
    let config = PromptTuningConfig {
        prompt: PromptLearningConfig::new(8),
        ..Default::default()
    };
    let prompt = get_peft_model(base(), config, None)?;
    println!("{}", prompt.trainable_summary());
    prompt.save_pretrained(&out)?;
    let loaded = from_pretrained(base(), &out, false)?;
    let options = peft_models::GenerateOptions::greedy(4, loaded.model().spec());
    let new = peft_models::generate(loaded.model(), &[vec![1, 2, 3]], &options, |_, _| {})?;
    println!("4 tokens after the virtual ones: {:?}", new[0]);
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
