//! AdaLoRA on the test fixtures' tiny Llama: PEFT's adapter folder (ranks cut by its allocator)
//! loaded, its trainable-parameter line, and the merged model's logits equal to the unmerged
//! ones.
//! `cargo run -p peft-adalora --example adalora`

use burn::tensor::{Device, Int, Tensor};
use peft_adalora::from_pretrained;
use peft_core::{CausalLm, ModelInput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let device = Device::flex();
    let base = peft_models::load(format!("{root}/models/llama-tiny"), &device)?;
    let adalora = from_pretrained(base, format!("{root}/adapters/adalora-llama"), false)?;
    println!("{}", adalora.trainable_summary());
    let ids = Tensor::<2, Int>::from_ints([[1, 42, 7, 300]], &device);
    let unmerged = adalora.model.forward(ModelInput::new(ids.clone()), None)?;
    let merged = adalora.merge_and_unload()?;
    let after = merged.forward(ModelInput::new(ids), None)?;
    let diff: f32 = (unmerged - after).abs().max().into_scalar();
    println!("max |merged − unmerged| over the logits: {diff:.1e}");
    Ok(())
}
