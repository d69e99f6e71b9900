//! BitFit on the tiny BLOOM of the test fixtures: the seed tutorial's bias-only training set-up,
//! save, load back. `cargo run -p peft-bitfit --example bitfit`

use burn::tensor::Device;
use peft_bitfit::{BitFitConfig, from_pretrained, get_peft_model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/bloom-tiny"
);

fn base() -> peft_models::AnyModel<peft_core::NoAdapter> {
    peft_models::load(MODEL, &Device::flex()).expect("the fixture model loads")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!("peft-example-bitfit-{}", std::process::id()));
    let bitfit = get_peft_model(base(), BitFitConfig::default())?;
    println!("{}", bitfit.trainable_summary());
    println!("num_param: {}", bitfit.num_param());
    bitfit.save_pretrained(&out)?;
    let loaded = from_pretrained(base(), &out, false)?;
    println!("loaded {} biases", loaded.biases.len());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
