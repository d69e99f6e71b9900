//! Trainable tokens on the tiny BLOOM of the test fixtures: three rows train, the rest of the
//! 512-row table stays frozen, and merging writes the rows into the table.
//! `cargo run -p peft-trainable-tokens --example trainable_tokens`

use burn::tensor::Device;
use peft_trainable_tokens::{TrainableTokensConfig, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    let config = TrainableTokensConfig {
        token_indices: vec![3, 42, 500],
        ..Default::default()
    };
    let tokens = get_peft_model(peft_models::load(bloom, &Device::flex())?, config)?;
    println!("{}", tokens.trainable_summary());
    for target in &tokens.token_targets {
        println!("rows {:?} of {} train", target.ids, target.path);
    }
    // A repeated id is refused, naming it.
    let repeated = TrainableTokensConfig {
        token_indices: vec![7, 7],
        ..Default::default()
    };
    if let Err(refused) = get_peft_model(peft_models::load(bloom, &Device::flex())?, repeated) {
        println!("refused: {refused}");
    }
    Ok(())
}
