//! QLoRA on the tiny BLOOM of the test fixtures: the base quantised to NF4 while it loads, the
//! paper's LoRA preset on every linear layer, save, merge into a dense model.
//! `cargo run -p peft-qlora --example qlora`

use burn::tensor::Device;
use peft_core::CausalLm;
use peft_qlora::{Load4bit, from_pretrained, get_peft_model, load_4bit, qlora_preset};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-qlora-{}", std::process::id()));
    let quantized = || load_4bit(MODEL, &Device::flex(), &Load4bit::default());
    let qlora = get_peft_model(quantized()?, qlora_preset())?;
    println!("{}", qlora.trainable_summary());
    qlora.save_pretrained(&out)?;
    let merged = from_pretrained(quantized()?, &out, false)?.merge_and_unload()?;
    println!(
        "merged into a dense model: {} modules",
        merged.modules().len()
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
