//! LoRA on the tiny BLOOM of the test fixtures: merge the update into the weights and take it
//! out again (the logits before and after agree), then save the adapter.
//! `cargo run -p peft-lora --example lora`

use burn::tensor::{Device, Int, Tensor};
use peft_core::{CausalLm, ModelInput};
use peft_lora::{InitLoraWeights, LoraConfig, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex();
    let base = peft_models::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/bloom-tiny"
        ),
        &device,
    )?;
    // B random instead of zero, so that the update changes the outputs.
    let config = LoraConfig {
        r: 4,
        init_lora_weights: InitLoraWeights::Flag(false),
        ..LoraConfig::default()
    };
    let lora = get_peft_model(base, config)?;
    println!("{}", lora.trainable_summary());
    let ids = Tensor::<2, Int>::from_ints([[1, 5, 9, 2]], &device);
    let logits = |m: &peft_models::AnyModel<peft_lora::LoraLinear>| {
        m.forward(ModelInput::new(ids.clone()), None)
    };
    let unmerged = logits(&lora.model)?;
    let merged = lora.merge_adapter()?;
    let diff = (logits(&merged.model)? - unmerged)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!("merged vs unmerged logits: max |Δ| = {diff:.2e}");
    let lora = merged.unmerge_adapter()?;
    lora.save_pretrained(std::env::temp_dir().join("peft-example-lora"))?;
    Ok(())
}
