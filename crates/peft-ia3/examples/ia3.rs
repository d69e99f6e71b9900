//! IA3 on the tiny BLOOM of the test fixtures: which layers PEFT's BLOOM defaults scale, and
//! the seed tutorial's feed-forward setting refused with PEFT's fix.
//! `cargo run -p peft-ia3 --example ia3`

use burn::tensor::Device;
use peft_core::TargetModules;
use peft_ia3::{Ia3Config, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    let ia3 = get_peft_model(
        peft_models::load(bloom, &Device::flex())?,
        Ia3Config::default(),
    )?;
    println!("{}", ia3.trainable_summary());
    for module in &ia3.targeted {
        println!("scaled: {module}");
    }
    // The seed's `target_modules=["query_key_value"], feedforward_modules=["mlp.dense_4h_to_h"]`.
    let seed = Ia3Config {
        target_modules: Some(TargetModules::List(vec!["query_key_value".into()])),
        feedforward_modules: Some(TargetModules::List(vec!["mlp.dense_4h_to_h".into()])),
        ..Ia3Config::default()
    };
    match get_peft_model(peft_models::load(bloom, &Device::flex())?, seed) {
        Err(refused) => println!("refused, as PEFT refuses it: {refused}"),
        Ok(_) => println!("unexpectedly accepted"),
    }
    Ok(())
}
