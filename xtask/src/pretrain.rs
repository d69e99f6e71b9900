//! `cargo xtask pretrain-tiny`: pretrains the tiny BLOOM bundled with `peft train`'s default
//! run, on the general text of `data/pretrain.txt` (made by `fixtures/make_pretrain_corpus.py`),
//! every parameter trained. The result is committed under `data/bloom-tiny-pretrained/`; the
//! recipe is in docs/PRETRAINED.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use peft_core::params::named_params;
use peft_core::{AdapterModel, NoAdapter, PeftError, TrainableSummary};
use peft_models::{AnyModel, HfConfig};
use peft_train::{Resume, Schedule, Tokenized, TrainConfig};

/// Every parameter of the model trains (pretraining, full fine-tuning).
struct FullModel {
    model: AnyModel<NoAdapter>,
}

impl AdapterModel for FullModel {
    type Model = AnyModel<NoAdapter>;

    fn model(&self) -> &Self::Model {
        &self.model
    }

    fn with_model(self, model: Self::Model) -> Self {
        Self { model }
    }

    fn trainable_names(&self) -> Vec<String> {
        named_params(&self.model)
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    fn config_json(&self) -> peft_core::Result<serde_json::Value> {
        // Not a PEFT method: every parameter trains.
        Ok(serde_json::json!({"peft_type": "FULL"}))
    }

    fn trainable_summary(&self) -> TrainableSummary {
        let n = named_params(&self.model).iter().map(|p| p.numel()).sum();
        TrainableSummary {
            trainable: n,
            all: n,
        }
    }

    fn save_pretrained(&self, _dir: &Path) -> peft_core::Result<()> {
        Err(PeftError::Unsupported(
            "a fully trained model is saved with peft_models::save_pretrained".into(),
        ))
    }

    fn merge_and_unload(self) -> peft_core::Result<AnyModel<NoAdapter>> {
        Ok(self.model)
    }
}

const SEQ: usize = 128;

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": 512,
        "hidden_size": 128,
        "n_layer": 4,
        "n_head": 4,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "apply_residual_connection_post_layernorm": false,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": true,
        "dtype": "float32"
    })
}

/// The corpus as training windows of `SEQ` tokens: lines joined with EOS, cut into chunks.
fn windows(text: &str, tokenizer: &peft_models::Tokenizer) -> Result<Vec<Tokenized>> {
    let mut stream: Vec<u32> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        stream.extend(tokenizer.encode(line)?);
        stream.push(2);
    }
    Ok(stream
        .chunks_exact(SEQ)
        .map(|c| Tokenized {
            input_ids: c.to_vec(),
            labels: c.iter().map(|&t| t as i64).collect(),
        })
        .collect())
}

/// `cargo xtask pretrain-tiny`'s flags.
#[derive(clap::Args, Debug)]
pub struct PretrainArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Where the pretrained model is written [default: data/bloom-tiny-pretrained in the
    /// workspace].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
}

pub fn pretrain_tiny(root: &Path, args: &PretrainArgs) -> Result<()> {
    let steps = args.steps;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| root.join("data/bloom-tiny-pretrained"));
    let fixture = root.join("tests/fixtures/models/bloom-tiny");
    let tokenizer = peft_models::Tokenizer::from_dir(&fixture)?;
    let text = std::fs::read_to_string(root.join("data/pretrain.txt"))
        .context("data/pretrain.txt (python3 fixtures/make_pretrain_corpus.py)")?;
    let all = windows(&text, &tokenizer)?;
    let (train, held_out) = peft_train::split(&all, 0.05, 7);
    eprintln!(
        "corpus: {} windows of {SEQ} tokens ({} train, {} held out)",
        all.len(),
        train.len(),
        held_out.len()
    );

    // The folder doubles as the source of config.json and tokenizer files when saving.
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config_json())?,
    )?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture.join(name), out.join(name))?;
    }
    let config: HfConfig = peft_models::read_config(&out)?;
    let store = peft_models::random_checkpoint(&config, 11)?;
    let device = Device::flex().autodiff();
    device.seed(11);
    let model: AnyModel<NoAdapter> = peft_models::load_from(&config, &store, &device)?;
    let before = peft_train::evaluate(&model.valid(), &held_out, 16, 3)?;
    eprintln!("held-out loss before: {before:.4}");

    let train_config = TrainConfig {
        learning_rate: 3e-3,
        max_steps: Some(steps),
        per_device_train_batch_size: 16,
        warmup_steps: 50,
        lr_scheduler_type: Schedule::Cosine,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: 11,
        logging_steps: 10,
        ..TrainConfig::default()
    };
    let work = root.join("target/pretrain-tiny");
    let started = std::time::Instant::now();
    let (trained, summary) = peft_train::train(
        FullModel { model },
        &train,
        3,
        &train_config,
        &work,
        Resume::No,
        &mut |event| {
            if let peft_train::Event::Step { step, loss, .. } = event
                && step % 50 == 0
            {
                eprintln!("step {step}: loss {loss:.4}");
            }
        },
    )?;
    let model = trained.model.valid();
    let after = peft_train::evaluate(&model, &held_out, 16, 3)?;
    eprintln!(
        "held-out loss after {} steps ({:.0} s): {after:.4} (before {before:.4})",
        summary.steps,
        started.elapsed().as_secs_f64()
    );
    peft_models::save_pretrained(&model, &out, &out)?;
    std::fs::write(
        out.join("pretraining.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "corpus": "data/pretrain.txt", "windows": all.len(), "seq": SEQ, "steps": summary.steps,
            "batch": 16, "learning_rate": 3e-3, "schedule": "cosine, 50 warm-up steps",
            "held_out_loss_before": before, "held_out_loss_after": after,
            "seconds": started.elapsed().as_secs_f64(),
        }))?,
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
