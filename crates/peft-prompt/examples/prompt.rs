//! Prompt tuning on the tiny BLOOM of the test fixtures, initialised from text as the seed
//! tutorial does (`PromptTuningInit.TEXT`): the virtual tokens start as the text's embeddings.
//! `cargo run -p peft-prompt --example prompt`

use burn::tensor::Device;
use peft_core::{AdapterModel, CausalLm};
use peft_prompt::{PromptLearningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bloom = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/bloom-tiny"
    );
    let tokenizer = peft_models::Tokenizer::from_dir(bloom)?;
    let config = PromptTuningConfig {
        prompt: PromptLearningConfig::new(8),
        prompt_tuning_init: PromptTuningInit::Text,
        prompt_tuning_init_text: Some("下面是一段人与机器人的对话。".into()),
        ..PromptTuningConfig::default()
    };
    let prompt = get_peft_model(
        peft_models::load(bloom, &Device::flex())?,
        config,
        Some(&tokenizer),
    )?;
    println!("{}", prompt.trainable_summary());
    let options = peft_models::GenerateOptions::greedy(4, prompt.model().spec());
    let ids = tokenizer.encode("你好")?;
    let new = peft_models::generate(prompt.model(), &[ids], &options, |_, _| {})?;
    println!("generated after the virtual tokens: {:?}", new[0]);
    Ok(())
}
