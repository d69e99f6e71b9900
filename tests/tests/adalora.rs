//! AdaLoRA against Hugging Face PEFT 0.21.2 (fixtures/make_adalora_fixtures.py): PEFT's folders
//! load with PEFT's logits, unmerged and merged — `adalora-llama` was cut by PEFT's rank
//! allocator, so its layers are at the ranks its `rank_pattern` keeps (1 to 5 of 6) —, and ours
//! save with PEFT's keys, shapes and config.

use peft_adalora::{AdaLora, AdaLoraConfig, from_pretrained, get_peft_model};
use peft_core::{MethodConfig, TensorStore};
use peft_tests::{adapter_dir, device, model_dir, reference_json};

use crate::lycoris::Method;

const ADALORA: Method<AdaLora> = Method {
    load: |base, dir, trainable| from_pretrained(base, dir, trainable),
    fresh: get_peft_model,
    config: |path| AdaLoraConfig::from_file(path),
    config_keys: &[
        "peft_type",
        "init_r",
        "target_r",
        "total_step",
        "tinit",
        "tfinal",
        "deltaT",
        "lora_alpha",
        "rank_pattern",
        "target_modules",
    ],
    marker: ".lora_E",
};

/// No allocation yet (no `rank_pattern`): every layer at `init_r`, BLOOM's default targets.
#[test]
fn bloom_at_the_initial_rank() {
    crate::lycoris::matches_peft(&ADALORA, "adalora-bloom");
}

/// After PEFT's allocator: each layer at its own kept rank, the file's tensors cut to them.
#[test]
fn llama_cut_by_the_allocator() {
    let config =
        AdaLoraConfig::from_file(adapter_dir("adalora-llama").join("adapter_config.json")).unwrap();
    let file =
        TensorStore::open(adapter_dir("adalora-llama").join("adapter_model.safetensors")).unwrap();
    let ranks = reference_json("adalora-llama")["ranks"].clone();
    let ranks = ranks.as_object().unwrap();
    assert_eq!(ranks.len(), 10);
    for (key, rank) in ranks {
        let path = key.strip_suffix(".lora_E").unwrap();
        let rank = rank.as_u64().unwrap() as usize;
        assert_eq!(config.rank_of(path), rank, "{path}");
        let stored = file
            .shape(&format!("base_model.model.{path}.lora_A"))
            .unwrap();
        assert_eq!(stored[0], rank, "{path}");
    }
    assert!(ranks.values().any(|r| r.as_u64() == Some(1)));
    crate::lycoris::matches_peft(&ADALORA, "adalora-llama");
}

/// A folder whose tensors do not have the ranks its pattern keeps is refused naming the key.
#[test]
fn tensors_of_other_ranks_than_the_pattern_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(
            adapter_dir("adalora-llama").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    let path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] =
        serde_json::json!([true, true, true, true, true, true]);
    std::fs::write(&path, config.to_string()).unwrap();
    let base = peft_models::load(model_dir("llama-tiny"), &device()).unwrap();
    let err = from_pretrained(base, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.lora_A"),
        "{err}"
    );
}

/// Writes the AdaLoRA folders saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    crate::lycoris::export_for_python(&ADALORA, &["adalora-bloom", "adalora-llama"]);
}
