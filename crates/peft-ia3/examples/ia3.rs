//! IA3 on the tiny BLOOM of the test fixtures: a fresh adapter (PEFT's default targets for
//! BLOOM), save, load back, merge. `cargo run -p peft-ia3 --example ia3`

use burn::tensor::Device;
use peft_core::CausalLm;
use peft_ia3::{Ia3Config, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-ia3-{}", std::process::id()));
    let ia3 = get_peft_model(base(), Ia3Config::default())?;
    println!("{}", ia3.trainable_summary());
    println!("scaled: {:?}", ia3.targeted);
    ia3.save_pretrained(&out)?;
    let merged = from_pretrained(base(), &out, false)?.merge_and_unload()?;
    println!("merged: {} modules", merged.modules().len());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
