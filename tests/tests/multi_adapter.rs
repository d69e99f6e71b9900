//! Several LoRA adapters on one model against PEFT (fixtures/make_multi_adapter_fixtures.py):
//! PEFT's multi-adapter folder loads with each adapter's logits, two active at once, a mixed
//! batch (`adapter_names`), the adapters disabled; `add_weighted_adapter` gives PEFT's pairs for
//! every combination type; the folder saves back in PEFT's layout; delete and hot-swap.

use std::collections::BTreeMap;

use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{CausalLm, ModelInput, PeftError, TensorStore};
use peft_lora::{Combination, CombinationType, MultiLoraModel};
use peft_models::AnyModel;
use peft_tests::{Reference, adapter_dir, device, fixtures, logits, max_diff_masked, model_dir};

const TOLERANCE: f32 = 1e-4;

type Multi = MultiLoraModel<AnyModel<peft_lora::LoraSet>>;

fn load(arch: &str) -> Multi {
    let base = peft_models::load(model_dir(&format!("{arch}-tiny")), &device()).unwrap();
    MultiLoraModel::from_pretrained_folder(base, adapter_dir(&format!("multi-{arch}"))).unwrap()
}

fn reference_store(arch: &str) -> TensorStore {
    TensorStore::open(
        fixtures()
            .join("reference")
            .join(format!("multi-{arch}.safetensors")),
    )
    .unwrap()
}

/// Largest |Δ| between the model's logits and reference `key`, over real positions.
fn logits_diff(model: &Multi, arch: &str, key: &str) -> f32 {
    let reference = Reference::load_logits(&format!("multi-{arch}"), key);
    let ours = logits(&model.model, &reference);
    max_diff_masked(
        &ours,
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    )
}

fn each_adapter_and_their_mixes_match_peft(arch: &str) {
    let mut model = load(arch);
    assert_eq!(model.adapter_names(), ["default", "b", "c"]);
    assert_eq!(model.active_adapters(), ["default"]);
    for name in ["default", "b", "c"] {
        model.set_adapter(&[name]).unwrap();
        let diff = logits_diff(&model, arch, &format!("logits.{name}"));
        assert!(diff <= TOLERANCE, "{arch} adapter {name}: max |Δ| = {diff}");
    }
    // The adapters really differ from each other and from the base.
    model.set_adapter(&["b"]).unwrap();
    assert!(logits_diff(&model, arch, "logits.default") > 0.05);

    model.set_adapter(&["default", "b"]).unwrap();
    let diff = logits_diff(&model, arch, "logits.default+b");
    assert!(diff <= TOLERANCE, "{arch} default+b: {diff}");

    let reference = Reference::load_logits(&format!("multi-{arch}"), "logits.mixed");
    let d = model.model.device();
    let input = ModelInput::with_mask(reference.ids(&d), reference.mask(&d));
    let mixed = model
        .forward_rows(input, &["default", "b", "__base__"])
        .unwrap();
    let mixed: Vec<f32> = mixed.into_data().iter::<f32>().collect();
    let diff = max_diff_masked(
        &mixed,
        &reference.logits,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(diff <= TOLERANCE, "{arch} mixed batch: {diff}");
    // The row assignment is cleared afterwards: the active pair is back.
    assert!(model.row_adapters().is_none());
    assert!(logits_diff(&model, arch, "logits.default+b") <= TOLERANCE);

    let base_diff = model
        .with_adapters_disabled(|m| {
            let r = Reference::load_logits(&format!("multi-{arch}"), "logits.base");
            let ours = logits(m, &r);
            max_diff_masked(&ours, &r.logits, &r.attention_mask, r.vocab)
        })
        .unwrap();
    assert!(base_diff <= TOLERANCE, "{arch} disabled: {base_diff}");
    assert_eq!(model.active_adapters(), ["default", "b"]);
}

#[test]
fn bloom_adapters_and_mixes_match_peft() {
    each_adapter_and_their_mixes_match_peft("bloom");
}

#[test]
fn llama_adapters_and_mixes_match_peft() {
    each_adapter_and_their_mixes_match_peft("llama");
}

/// Each row of a mixed batch equals that row run alone with its adapter active.
#[test]
fn a_mixed_batch_row_equals_the_row_alone() {
    let mut model = load("llama");
    let reference = Reference::load_logits("multi-llama", "logits.mixed");
    let d = model.model.device();
    let [batch, seq] = reference.shape;
    let rows = ["c", "default", "b"];
    let input = ModelInput::with_mask(reference.ids(&d), reference.mask(&d));
    let mixed: Vec<f32> = model
        .forward_rows(input, &rows)
        .unwrap()
        .into_data()
        .iter::<f32>()
        .collect();
    let width = seq * reference.vocab;
    for (row, name) in rows.iter().enumerate().take(batch) {
        model.set_adapter(&[name]).unwrap();
        let ids = reference.input_ids[row * seq..(row + 1) * seq].to_vec();
        let mask = reference.attention_mask[row * seq..(row + 1) * seq].to_vec();
        let input = ModelInput::with_mask(
            Tensor::<2, Int>::from_data(TensorData::new(ids, [1, seq]), &d),
            Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [1, seq]), &d),
        );
        let alone: Vec<f32> = model
            .model
            .forward(input, None)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let diff = max_diff_masked(
            &alone,
            &mixed[row * width..(row + 1) * width],
            &mask,
            reference.vocab,
        );
        assert!(diff <= 1e-5, "row {row} ({name}): {diff}");
    }
}

/// `add_weighted_adapter([default, b], [0.7, -0.4], type)` for all eleven types: PEFT's pairs
/// (up to the SVD's signs: B·A compared for those), config and logits.
fn weighted_adapters_match_peft(arch: &str) {
    let mut model = load(arch);
    let store = reference_store(arch);
    let json = peft_tests::reference_json(&format!("multi-{arch}"));
    for (type_name, combined) in json["combined"].as_object().unwrap() {
        let kind: CombinationType = type_name.parse().unwrap();
        let mut options = Combination::new(kind);
        options.density = combined["density"].as_f64();
        let name = format!("w_{type_name}");
        model
            .add_weighted_adapter(&["default", "b"], &[0.7, -0.4], &name, &options)
            .unwrap();
        let entry = model.adapter(&name).unwrap();
        assert_eq!(
            entry.config.r as u64,
            combined["r"].as_u64().unwrap(),
            "{type_name}"
        );
        assert_eq!(
            entry.config.lora_alpha,
            combined["lora_alpha"].as_f64().unwrap()
        );
        let targets: Vec<String> = combined["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            entry.config.target_modules,
            Some(peft_core::TargetModules::List(targets))
        );

        let ours = model.adapter_tensors(&name).unwrap();
        let prefix = format!("{type_name}.");
        let theirs: BTreeMap<String, (Vec<f32>, Vec<usize>)> = store
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(|s| s.to_string()))
            .filter(|k| k != "logits")
            .map(|k| {
                let v = store.f32(&format!("{prefix}{k}")).unwrap();
                (k, v)
            })
            .collect();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{type_name}: keys"
        );
        for (key, (_, shape)) in &theirs {
            assert_eq!(&ours[key].shape, shape, "{type_name} {key}");
        }
        let value =
            |key: &str| peft_tensors::bytes_to_f32(ours[key].dtype, &ours[key].data).unwrap();
        for a_key in theirs.keys().filter(|k| k.contains("lora_A")) {
            let b_key = a_key.replace("lora_A", "lora_B");
            let (a_ref, a_shape) = &theirs[a_key];
            let (b_ref, b_shape) = &theirs[&b_key];
            if kind.is_svd() {
                // Compare B·A (the SVD fixes each pair only up to sign).
                let product = |a: &[f32], b: &[f32]| -> Vec<f32> {
                    let (r, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
                    let mut out = vec![0f32; d_out * d_in];
                    for o in 0..d_out {
                        for k in 0..r {
                            for i in 0..d_in {
                                out[o * d_in + i] += b[o * r + k] * a[k * d_in + i];
                            }
                        }
                    }
                    out
                };
                let ours = product(&value(a_key), &value(&b_key));
                let theirs = product(a_ref, b_ref);
                let worst = ours
                    .iter()
                    .zip(&theirs)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-4, "{type_name} {a_key}: B·A off by {worst}");
            } else {
                for (key, reference) in [(a_key, a_ref), (&b_key, b_ref)] {
                    let worst = value(key)
                        .iter()
                        .zip(reference)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(worst <= 1e-6, "{type_name} {key}: off by {worst}");
                }
            }
        }
        model.set_adapter(&[&name]).unwrap();
        let diff = logits_diff(&model, arch, &format!("{type_name}.logits"));
        assert!(diff <= TOLERANCE, "{arch} {type_name} logits: {diff}");
    }
}

#[test]
fn bloom_weighted_adapters_match_peft() {
    weighted_adapters_match_peft("bloom");
}

#[test]
fn llama_weighted_adapters_match_peft() {
    weighted_adapters_match_peft("llama");
}

/// Saving writes PEFT's layout (default on top, the others in subfolders) with PEFT's keys and
/// values; the saved folder loads back with the same logits.
#[test]
fn multi_adapter_folder_round_trips_in_peft_layout() {
    let model = load("bloom");
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path(), None).unwrap();
    let source = adapter_dir("multi-bloom");
    for sub in ["", "b", "c"] {
        let ours =
            TensorStore::open(out.path().join(sub).join("adapter_model.safetensors")).unwrap();
        let theirs = TensorStore::open(source.join(sub).join("adapter_model.safetensors")).unwrap();
        let mut keys: Vec<&str> = ours.keys().collect();
        let mut expected: Vec<&str> = theirs.keys().collect();
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected, "folder `{sub}`");
        for key in keys {
            assert_eq!(
                ours.f32(key).unwrap(),
                theirs.f32(key).unwrap(),
                "{sub} {key}"
            );
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(sub).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
    }
    let base = peft_models::load(model_dir("bloom-tiny"), &device()).unwrap();
    let mut back = MultiLoraModel::from_pretrained_folder(base, out.path()).unwrap();
    back.set_adapter(&["c"]).unwrap();
    assert!(logits_diff(&back, "bloom", "logits.c") <= TOLERANCE);
}

/// Deleting, unknown names, merging a chosen set, and hot-swapping in place.
#[test]
fn delete_merge_hotswap_and_errors() {
    let mut model = load("bloom");
    let err = model.set_adapter(&["nope"]).unwrap_err();
    assert!(
        matches!(&err, PeftError::UnknownAdapter { name, .. } if name == "nope"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "no adapter named `nope` (loaded: default, b, c)"
    );
    let err = model
        .load_adapter("b", adapter_dir("multi-bloom"))
        .unwrap_err();
    assert!(err.to_string().contains("already loaded"), "{err}");
    let err = model
        .load_adapter("__base__", adapter_dir("multi-bloom"))
        .unwrap_err();
    assert!(err.to_string().contains("cannot name an adapter"), "{err}");
    let d = model.model.device();
    let three_rows = ModelInput::new(Tensor::<2, Int>::zeros([3, 4], &d));
    let err = model.forward_rows(three_rows, &["b", "c"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: 2 adapter names for a batch of 3 rows"
    );

    // A PEFT adapter with modules_to_save cannot share a model with others.
    let err = model
        .load_adapter("mts", adapter_dir("lora-bloom-mts"))
        .unwrap_err();
    assert!(matches!(err, PeftError::Unsupported(_)), "{err}");

    // Merging a chosen pair gives the unmerged logits of that pair.
    model.set_adapter(&["default", "b"]).unwrap();
    model.merge_adapter().unwrap();
    assert!(logits_diff(&model, "bloom", "logits.default+b") <= TOLERANCE);
    // While merged, the active set cannot change (unmerging subtracts the active adapters).
    let err = model.set_adapter(&["c"]).unwrap_err();
    assert!(err.to_string().contains("unmerge_adapter first"), "{err}");
    assert!(model.set_row_adapters(Some(&["b", "c", "b"])).is_err());
    model.unmerge_adapter().unwrap();
    model.set_adapter(&["c"]).unwrap();
    assert!(logits_diff(&model, "bloom", "logits.c") <= TOLERANCE);

    model.delete_adapter("c").unwrap();
    assert_eq!(model.adapter_names(), ["default", "b"]);
    assert!(model.active_adapters().is_empty());
    assert!(logits_diff(&model, "bloom", "logits.base") <= TOLERANCE);

    // Hot-swap needs the same target layers: `b` targets more than `default` ...
    let out = tempfile::tempdir().unwrap();
    let err = model
        .hotswap_adapter("default", adapter_dir("multi-bloom").join("b"))
        .unwrap_err();
    assert!(err.to_string().contains("same target layers"), "{err}");
    // ... while a copy of `b` doubled (a one-adapter linear combination: same targets and
    // ranks) replaces `b` in place.
    model
        .add_weighted_adapter(
            &["b"],
            &[2.0],
            "b2",
            &Combination::new(CombinationType::Linear),
        )
        .unwrap();
    model.set_adapter(&["b2"]).unwrap();
    let reference = Reference::load_logits("multi-bloom", "logits.b");
    let doubled = logits(&model.model, &reference);
    model.save_pretrained(out.path(), Some(&["b2"])).unwrap();
    model.hotswap_adapter("b", out.path().join("b2")).unwrap();
    model.set_adapter(&["b"]).unwrap();
    let swapped = logits(&model.model, &reference);
    let diff = max_diff_masked(
        &swapped,
        &doubled,
        &reference.attention_mask,
        reference.vocab,
    );
    assert!(diff <= 1e-6, "hot-swapped b vs b2: {diff}");
    assert!(logits_diff(&model, "bloom", "logits.b") > 0.01);
}

/// Greedy generation (KV-cached) of a left-padded batch with one adapter per row gives PEFT's
/// tokens (`generate(..., adapter_names=[b, __base__])`).
#[test]
fn mixed_adapter_generation_matches_peft() {
    for arch in ["bloom", "llama"] {
        let mut model = load(arch);
        let json = peft_tests::reference_json(&format!("multi-{arch}"));
        let generation = &json["generation"];
        let ids = |v: &serde_json::Value| -> Vec<Vec<u32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        };
        let prompts = ids(&generation["prompt_ids"]);
        let expected = ids(&generation["new_ids"]);
        let rows: Vec<&str> = generation["adapter_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        model.set_row_adapters(Some(&rows)).unwrap();
        let options = peft_models::GenerateOptions::greedy(expected[0].len(), model.model.spec());
        let got = peft_models::generate(&model.model, &prompts, &options, |_, _| {}).unwrap();
        assert_eq!(got, expected, "{arch}: tokens with adapter_names {rows:?}");
    }
}

/// Writes a multi-adapter folder for `fixtures/check_interop.py`: PEFT's three adapters on the
/// Llama fixture plus two combinations made here (`w_ties`, `w_svd`), saved by peft-rs in PEFT's
/// layout (run by CI: `cargo test -p peft-tests --test multi_adapter -- --ignored
/// export_for_python`).
#[test]
#[ignore = "writes files for the Python interoperability check"]
fn export_for_python() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    let mut model = load("llama");
    for (name, kind, density) in [
        ("w_ties", CombinationType::Ties, Some(0.5)),
        ("w_svd", CombinationType::Svd, None),
    ] {
        let mut options = Combination::new(kind);
        options.density = density;
        model
            .add_weighted_adapter(&["default", "b"], &[0.7, -0.4], name, &options)
            .unwrap();
    }
    let folder = out.join("multi-llama-adapters");
    let _ = std::fs::remove_dir_all(&folder);
    model.save_pretrained(&folder, None).unwrap();
}
