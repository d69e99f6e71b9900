//! QLoRA on the tiny BLOOM of the test fixtures: the base quantised to NF4 with double
//! quantisation while it loads, the paper's LoRA preset on every linear layer, and the merged
//! model written as a dense checkpoint. `cargo run -p peft-qlora --example qlora`

use burn::tensor::Device;
use peft_qlora::{Load4bit, get_peft_model, load_4bit, qlora_preset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    let base = load_4bit(bloom, &Device::flex(), &Load4bit::default())?;
    let qlora = get_peft_model(base, qlora_preset())?;
    println!("{}", qlora.trainable_summary());
    let out = std::env::temp_dir().join("peft-example-qlora");
    peft_models::save_pretrained(&qlora.merge_and_unload()?, bloom, &out)?;
    println!("dense merged checkpoint: {}", out.display());
    Ok(())
}
