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

/// PEFT's AdaLoRA adapts bitsandbytes 4-bit layers (`SVDLinear4bit`); here too: over the NF4
/// BLOOM a fresh AdaLoRA (E = 0) gives the 4-bit base's own logits, PEFT's bloom folder changes
/// them, and merging it into the de-quantised weights gives the unmerged logits.
#[test]
fn a_4bit_base_takes_adalora() {
    use peft_tests::{Reference, logits};
    let device = device();
    let reference = Reference::load("bloom-tiny");
    let nf4 = || peft_models::load(model_dir("bloom-tiny-nf4"), &device).unwrap();
    let plain = logits(&nf4(), &reference);
    let fresh = get_peft_model(nf4(), AdaLoraConfig::default()).unwrap();
    assert_eq!(logits(&fresh.model, &reference), plain);
    let loaded = from_pretrained(nf4(), adapter_dir("adalora-bloom"), false).unwrap();
    let unmerged = logits(&loaded.model, &reference);
    let merged = logits(&loaded.merge_and_unload().unwrap(), &reference);
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(diff(&unmerged, &plain) > 0.05);
    assert!(
        diff(&merged, &unmerged) <= 1e-4,
        "{}",
        diff(&merged, &unmerged)
    );
}

/// Writes the AdaLoRA folders saved by peft-rs to `target/interop/` for
/// `fixtures/check_interop.py`.
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    crate::lycoris::export_for_python(&ADALORA, &["adalora-bloom", "adalora-llama"]);
}

/// The trainer over AdaLoRA against PEFT's own training (fixtures/make_adalora_fixtures.py,
/// `adalora-bloom-train`): six AdamW steps with clipping and warm-up, the orthogonality penalty
/// in every pass' loss and PEFT's `update_and_allocate` after each step — scoring only at step
/// 1, budgets 8, 6, 6 of 12 ranks at steps 2-4 (one layer keeps 5, the other 1), the forced
/// final mask at 5, the pattern kept at 6. Each step's loss and gradient norm, the `rank_pattern`, every tensor after the last step
/// (masked `E` entries zero), and the saved folder (cut to the pattern) against PEFT's save.
#[test]
fn training_allocates_ranks_as_peft() {
    use peft_tests::relative_error;
    use peft_train::{Resume, Tokenized, TrainConfig, train};

    let name = "adalora-bloom-train";
    let store =
        TensorStore::open(peft_tests::fixtures().join(format!("reference/{name}.safetensors")))
            .unwrap();
    let (ids, shape) = store.i64("input_ids").unwrap();
    let (labels, _) = store.i64("labels").unwrap();
    let data: Vec<Tokenized> = ids
        .chunks(shape[1])
        .zip(labels.chunks(shape[1]))
        .map(|(i, l)| Tokenized {
            input_ids: i.iter().map(|&t| t as u32).collect(),
            labels: l.to_vec(),
        })
        .collect();
    let expected = reference_json(name);
    let config = TrainConfig {
        learning_rate: 1e-2,
        max_steps: Some(expected["steps"].as_u64().unwrap() as usize),
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        warmup_steps: 2,
        lr_scheduler_type: peft_train::Schedule::Linear,
        weight_decay: 0.01,
        max_grad_norm: Some(0.05),
        ..TrainConfig::default()
    };
    let device = device().autodiff();
    let base = peft_models::load(model_dir("bloom-tiny"), &device).unwrap();
    let adapter = from_pretrained(base, adapter_dir(name), true).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    let (trained, _) = train(
        adapter,
        &data,
        3,
        &config,
        out.path(),
        Resume::No,
        &mut |e| {
            if let peft_train::Event::Step {
                loss, grad_norm, ..
            } = e
            {
                steps.push((*loss, grad_norm.unwrap()));
            }
        },
    )
    .unwrap();
    let losses = store.f32("loss").unwrap().0;
    let norms = store.f32("grad_norm").unwrap().0;
    assert_eq!(steps.len(), losses.len());
    for (i, (loss, norm)) in steps.iter().enumerate() {
        assert!(
            ((loss - losses[i]) / losses[i]).abs() <= 1e-5,
            "step {i}: loss {loss} vs {}",
            losses[i]
        );
        assert!(
            ((*norm as f32 - norms[i]) / norms[i]).abs() <= 1e-5,
            "step {i}: grad norm {norm} vs {}",
            norms[i]
        );
    }

    let patterns = expected["rank_patterns"].as_array().unwrap();
    let final_pattern: std::collections::BTreeMap<String, Vec<bool>> =
        serde_json::from_value(patterns.last().unwrap().clone()).unwrap();
    assert_eq!(trained.config.rank_pattern.as_ref(), Some(&final_pattern));
    let kept: usize = final_pattern.values().flatten().filter(|k| **k).count();
    assert_eq!(kept, 6, "target_r 3 × two layers");

    // Every tensor at all init_r ranks, as PEFT holds them in memory.
    let mut whole = trained.clone();
    whole.config.rank_pattern = None;
    let tensors = whole.adapter_tensors().unwrap();
    assert_eq!(tensors.len(), 6, "two layers × (A, E, B)");
    for (key, ours) in &tensors {
        let theirs = store.f32(&format!("after.{key}")).unwrap().0;
        let ours = ours.f32_values().unwrap();
        let err = relative_error(&ours, &theirs);
        assert!(err <= 1e-5, "{key} relative error {err}");
        if let Some(path) = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_E"))
        {
            // Exactly the entries the pattern drops are zero, in both.
            let flags = &final_pattern[&format!("{path}.lora_E")];
            for ((o, t), keep) in ours.iter().zip(&theirs).zip(flags) {
                assert_eq!((*o == 0.0, *t == 0.0), (!keep, !keep), "{key}");
            }
        }
    }

    // Saved as PEFT saves it: the tensors cut to the pattern, the pattern in the config.
    let saved = out.path().join("final");
    trained.save_pretrained(&saved).unwrap();
    let ours = TensorStore::open(saved.join("adapter_model.safetensors")).unwrap();
    let peft_dir = adapter_dir("adalora-bloom-trained");
    let theirs = TensorStore::open(peft_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for key in theirs.keys() {
        assert_eq!(
            ours.shape(key).unwrap(),
            theirs.shape(key).unwrap(),
            "{key}"
        );
        let err = relative_error(&ours.f32(key).unwrap().0, &theirs.f32(key).unwrap().0);
        assert!(err <= 1e-4, "{key}: saved relative error {err}");
    }
    let config = AdaLoraConfig::from_file(saved.join("adapter_config.json")).unwrap();
    assert_eq!(config.rank_pattern, Some(final_pattern));
}

/// Continuing from a folder PEFT's allocator already cut (`adalora-llama`, ranks 1–5 of 6):
/// the ranks stay as they are — the layers train, the pattern is kept, and the saved folder
/// loads back with the same shapes (allocating over cut layers would write flags PEFT cannot
/// load).
#[test]
fn a_cut_folder_trains_with_its_ranks_fixed() {
    use peft_train::{Resume, Tokenized, TrainConfig, train};

    let name = "adalora-llama";
    let before = AdaLoraConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
    let data: Vec<Tokenized> = (0..4u32)
        .map(|i| Tokenized {
            input_ids: (0..10).map(|t| 4 + (i * 31 + t * 7) % 400).collect(),
            labels: (0..10)
                .map(|t| (4 + (i * 31 + t * 7) % 400) as i64)
                .collect(),
        })
        .collect();
    let config = TrainConfig {
        learning_rate: 1e-2,
        max_steps: Some(2),
        per_device_train_batch_size: 2,
        ..TrainConfig::default()
    };
    let device = device().autodiff();
    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let adapter = from_pretrained(base, adapter_dir(name), true).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (trained, _) = train(
        adapter,
        &data,
        3,
        &config,
        out.path(),
        Resume::No,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(trained.config.rank_pattern, before.rank_pattern);
    let saved = out.path().join("again");
    trained.save_pretrained(&saved).unwrap();
    let ours = TensorStore::open(saved.join("adapter_model.safetensors")).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let mut moved = 0;
    for key in theirs.keys() {
        assert_eq!(
            ours.shape(key).unwrap(),
            theirs.shape(key).unwrap(),
            "{key}"
        );
        moved += usize::from(ours.f32(key).unwrap().0 != theirs.f32(key).unwrap().0);
    }
    assert_eq!(moved, theirs.keys().count(), "every tensor trained");
    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    from_pretrained(base, &saved, false).unwrap();
}

/// The orthogonality penalty is PEFT's: on `adalora-bloom-train`'s starting adapter, the first
/// step's loss minus the model's own loss is `0.5 × mean ‖A·Aᵀ − I‖ / ‖Bᵀ·B − I‖`, computed
/// here on the host from the file's tensors.
#[test]
fn the_orthogonality_penalty_is_the_mean_frobenius_distance() {
    let name = "adalora-bloom-train";
    let file = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let mut sum = 0.0f64;
    let mut count = 0;
    for key in file.keys() {
        let (values, shape) = file.f32(key).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        // A: [r, in] → A·Aᵀ (rows of A); B: [out, r] → Bᵀ·B (columns of B).
        let is_b = if key.ends_with(".lora_A") {
            false
        } else if key.ends_with(".lora_B") {
            true
        } else {
            continue;
        };
        let (r, inner) = if is_b { (cols, rows) } else { (rows, cols) };
        let at = |i: usize, k: usize| {
            if is_b {
                values[k * cols + i]
            } else {
                values[i * cols + k]
            }
        };
        let mut frob = 0.0f64;
        for i in 0..r {
            for j in 0..r {
                let dot: f64 = (0..inner).map(|k| at(i, k) as f64 * at(j, k) as f64).sum();
                let d = dot - if i == j { 1.0 } else { 0.0 };
                frob += d * d;
            }
        }
        sum += frob.sqrt();
        count += 1;
    }
    assert_eq!(count, 4);
    let config = AdaLoraConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap();
    let expected = config.orth_reg_weight * sum / count as f64;
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let model = from_pretrained(base, adapter_dir(name), false).unwrap();
    let penalty: f32 = peft_core::AdapterModel::regularization(&model)
        .unwrap()
        .unwrap()
        .into_scalar();
    let penalty = penalty as f64;
    assert!(
        ((penalty - expected) / expected).abs() <= 1e-5,
        "penalty {penalty} vs {expected}"
    );
}
