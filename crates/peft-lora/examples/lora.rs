//! LoRA on the tiny BLOOM of the test fixtures: a fresh adapter, its trainable parameters,
//! save, load back, merge into the weights. `cargo run -p peft-lora --example lora`

use burn::tensor::Device;
use peft_core::CausalLm;
use peft_lora::{LoraConfig, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-lora-{}", std::process::id()));
    let lora = get_peft_model(
        base(),
        LoraConfig {
            r: 8,
            ..LoraConfig::default()
        },
    )?;
    println!("{}", lora.trainable_summary());
    lora.save_pretrained(&out)?;
    let merged = from_pretrained(base(), &out, false)?.merge_and_unload()?;
    println!(
        "merged: {} modules, no adapter left",
        merged.modules().len()
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
