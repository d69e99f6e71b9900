//! The front door against PEFT's fixtures: a folder of each method loads through
//! `PeftModel::from_pretrained` as its `adapter_config.json` says and gives PEFT's logits;
//! configs read back key for key; the registry's defaults, flags and refusals.

use peft::{
    AdapterModel, AdapterVisitor, CausalLm, ConfigOverrides, NoAdapter, PeftConfig, PeftModel,
    PeftType, TargetModules,
};
use peft_tests::{adapter_dir, assert_logits_match, base_of, device, model_dir};

/// PEFT's tolerance for every method's parity suite (docs/PRECISION.md).
const TOLERANCE: f32 = 1e-4;

/// One committed PEFT adapter of each method PEFT has, with the `--method` it loads as.
const FOLDERS: [(&str, &str); 9] = [
    ("lora-bloom", "lora"),
    ("ia3-bloom", "ia3"),
    ("prompt-bloom-random", "prompt"),
    ("prefix-bloom", "prefix"),
    ("ptuning-bloom-mlp", "ptuning"),
    ("ptuning-bloom-lstm", "ptuning"),
    ("tokens-bloom", "trainable-tokens"),
    ("tokens-llama", "trainable-tokens"),
    ("tokens-lora-llama", "lora"),
];

fn base(name: &str) -> peft::Base {
    peft::models::load(model_dir(name), &device()).unwrap()
}

/// Checks the typed model inside against the reference logits of `name`.
struct MatchesReference<'a>(&'a str);

impl AdapterVisitor for MatchesReference<'_> {
    type Output = f32;
    fn visit<A>(self, adapter: A) -> f32
    where
        A: AdapterModel + Into<PeftModel> + 'static,
        <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>,
    {
        assert_logits_match(adapter.model(), self.0, TOLERANCE)
    }
}

#[test]
fn every_method_loads_by_its_folder_with_peft_logits() {
    for (name, method) in FOLDERS {
        let model = PeftModel::from_pretrained(base(base_of(name)), adapter_dir(name)).unwrap();
        assert_eq!(model.method().name, method, "{name}");
        assert!(model.visit(MatchesReference(name)) <= TOLERANCE);
    }
}

#[test]
fn load_config_reads_every_key_back() {
    for (name, method) in FOLDERS {
        let config = peft::load_config(adapter_dir(name)).unwrap();
        assert_eq!(config.peft_type(), peft::by_name(method).unwrap().peft_type);
        peft_tests::assert_json_keeps_keys(
            &adapter_dir(name).join("adapter_config.json"),
            &config.to_json().unwrap(),
        );
    }
}

/// Each method's default config through the front door trains what the method crate's own
/// `get_peft_model` trains.
#[test]
fn get_peft_model_builds_each_method_as_its_crate_does() {
    let hand = [
        // LoRA r=8 on BLOOM's query_key_value (64 → 192), 2 layers.
        ("lora", 2 * 8 * (64 + 192)),
        // The QLoRA preset: r=64 on every linear layer (qkv 64→192, dense 64→64,
        // h_to_4h 64→256, 4h_to_h 256→64), 2 layers.
        (
            "qlora",
            2 * 64 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)),
        ),
        // IA3: a scale per output of the fused query_key_value (192: PEFT scales the whole
        // fused output) and per input of dense_4h_to_h (256), 2 layers.
        ("ia3", 2 * (192 + 256)),
    ];
    for (name, trainable) in hand {
        let method = peft::by_name(name).unwrap();
        let model = peft::get_peft_model(base("bloom-tiny"), method.config(None).unwrap()).unwrap();
        assert_eq!(model.trainable_summary().trainable, trainable, "{name}");
    }
    // Trainable tokens: 3 rows of BLOOM's 64-wide table (the tied lm_head shares them). Its
    // default config names no ids, which the flag supplies.
    let mut config = peft::by_name("trainable-tokens")
        .unwrap()
        .config(None)
        .unwrap();
    let Err(refused) = peft::get_peft_model(base("bloom-tiny"), config.clone()) else {
        panic!("trainable tokens without ids should be refused");
    };
    assert!(refused.to_string().contains("token_indices"), "{refused}");
    config.apply(&peft::ConfigOverrides {
        trainable_token_indices: Some(vec![3, 42, 500]),
        ..Default::default()
    });
    let model = peft::get_peft_model(base("bloom-tiny"), config).unwrap();
    assert_eq!(model.trainable_summary().trainable, 3 * 64);
    for method in peft::METHODS
        .iter()
        .filter(|m| m.name != "trainable-tokens")
    {
        let model = peft::get_peft_model(base("bloom-tiny"), (method.default_config)()).unwrap();
        assert_eq!(model.peft_type(), method.peft_type, "{}", method.name);
        assert!(
            model.trainable_summary().trainable > 0,
            "{}: nothing trains",
            method.name
        );
    }
}

#[test]
fn flags_set_the_keys_each_method_has() {
    let overrides = ConfigOverrides {
        r: Some(4),
        lora_alpha: Some(16.0),
        lora_dropout: Some(0.1),
        alpha: Some(12.0),
        rank_dropout: Some(0.2),
        module_dropout: Some(0.3),
        decompose_both: Some(true),
        decompose_factor: Some(4),
        rank_dropout_scale: Some(true),
        projection_prng_key: Some(7),
        save_projection: Some(false),
        vera_dropout: Some(0.05),
        d_initial: Some(0.2),
        target_r: Some(3),
        total_step: Some(50),
        tinit: Some(2),
        tfinal: Some(5),
        use_dora: Some(true),
        use_rslora: Some(true),
        init_lora_weights: Some("pissa".into()),
        trainable_token_indices: Some(vec![5, 3]),
        target_modules: Some(TargetModules::List(vec!["dense".into()])),
        num_virtual_tokens: Some(3),
        base_model_name_or_path: Some("bloom-tiny".into()),
    };
    for method in &peft::METHODS {
        let mut config = (method.default_config)();
        config.apply(&overrides);
        let json = config.to_json().unwrap();
        assert_eq!(
            json["base_model_name_or_path"], "bloom-tiny",
            "{}",
            method.name
        );
        match method.peft_type {
            PeftType::Lora => {
                assert_eq!(
                    (&json["r"], &json["lora_alpha"], &json["lora_dropout"]),
                    (&4.into(), &16.0.into(), &0.1.into())
                );
                assert_eq!(
                    (&json["use_dora"], &json["use_rslora"]),
                    (&true.into(), &true.into())
                );
                assert_eq!(json["init_lora_weights"], "pissa");
                assert_eq!(json["trainable_token_indices"], serde_json::json!([5, 3]));
                assert_eq!(json["target_modules"], serde_json::json!(["dense"]));
            }
            PeftType::Ia3 => assert_eq!(json["target_modules"], serde_json::json!(["dense"])),
            PeftType::Loha => {
                assert_eq!(
                    (
                        &json["r"],
                        &json["alpha"],
                        &json["rank_dropout"],
                        &json["module_dropout"]
                    ),
                    (&4.into(), &12.0.into(), &0.2.into(), &0.3.into())
                );
                assert_eq!(json["target_modules"], serde_json::json!(["dense"]));
                assert!(json.get("lora_alpha").is_none());
                assert!(json.get("decompose_both").is_none());
            }
            PeftType::Vera => {
                assert_eq!(
                    (
                        &json["r"],
                        &json["projection_prng_key"],
                        &json["save_projection"],
                        &json["vera_dropout"],
                        &json["d_initial"]
                    ),
                    (
                        &4.into(),
                        &7.into(),
                        &false.into(),
                        &0.05.into(),
                        &0.2.into()
                    )
                );
                assert_eq!(json["target_modules"], serde_json::json!(["dense"]));
            }
            PeftType::Lokr => {
                assert_eq!(
                    (
                        &json["r"],
                        &json["alpha"],
                        &json["rank_dropout"],
                        &json["module_dropout"]
                    ),
                    (&4.into(), &12.0.into(), &0.2.into(), &0.3.into())
                );
                assert_eq!(
                    (
                        &json["decompose_both"],
                        &json["decompose_factor"],
                        &json["rank_dropout_scale"]
                    ),
                    (&true.into(), &4.into(), &true.into())
                );
                assert_eq!(json["target_modules"], serde_json::json!(["dense"]));
            }
            PeftType::AdaLora => {
                // `--r` is the starting rank (PEFT's AdaLoRA ignores `r`).
                assert_eq!(
                    (
                        &json["init_r"],
                        &json["r"],
                        &json["lora_alpha"],
                        &json["lora_dropout"]
                    ),
                    (&4.into(), &8.into(), &16.0.into(), &0.1.into())
                );
                assert_eq!(
                    (
                        &json["target_r"],
                        &json["total_step"],
                        &json["tinit"],
                        &json["tfinal"]
                    ),
                    (&3.into(), &50.into(), &2.into(), &5.into())
                );
                assert_eq!(json["target_modules"], serde_json::json!(["dense"]));
                assert!(json.get("use_dora").is_none());
            }
            PeftType::TrainableTokens => {
                assert_eq!(json["token_indices"], serde_json::json!([5, 3]))
            }
            PeftType::BitFit => {
                assert!(json.get("r").is_none() && json.get("target_modules").is_none())
            }
            _ => assert_eq!(json["num_virtual_tokens"], 3, "{}", method.name),
        }
    }
}

#[test]
fn values_set_by_key_and_wrong_types_are_refused() {
    let lstm = peft::by_name("ptuning")
        .unwrap()
        .config(None)
        .unwrap()
        .with_values(serde_json::json!({
            "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 128
        }))
        .unwrap();
    let PeftConfig::PTuning(config) = lstm else {
        panic!("a P-tuning config stays one");
    };
    assert_eq!(
        config.encoder_reparameterization_type,
        peft::EncoderType::Lstm
    );
    assert_eq!(config.encoder_hidden_size, Some(128));
    let err = PeftConfig::from(peft::LoraConfig::default())
        .with_values(serde_json::json!({"r": "eight"}))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("config values: invalid JSON: invalid type: string \"eight\""),
        "{err}"
    );
}

#[test]
fn prompt_learning_has_nothing_to_merge() {
    let model =
        PeftModel::from_pretrained(base("bloom-tiny"), adapter_dir("prefix-bloom")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = model
        .save_merged(&model_dir("bloom-tiny"), out.path(), &Default::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "not supported: prefix tuning has no weights to merge: keep the adapter and load it \
         with --adapter"
    );
    assert!(
        std::fs::read_dir(out.path()).unwrap().next().is_none(),
        "nothing written"
    );
    let err = model.merge_and_unload().err().unwrap().to_string();
    assert!(
        err.contains("prefix tuning has no weights to merge"),
        "{err}"
    );
}

#[test]
fn a_folder_of_a_method_this_build_lacks_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "BOFT", "r": 4}"#,
    )
    .unwrap();
    let err = PeftModel::from_pretrained(base("bloom-tiny"), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("BOFT"), "{err}");
    let err = peft::load_config(dir.path()).unwrap_err().to_string();
    assert!(err.contains("BOFT"), "{err}");
}

/// A trained LoRA through the front door saves the folder the method crate loads, and
/// `merge_and_unload` gives the unmerged model's logits.
#[test]
fn lora_saved_through_the_front_door_round_trips() {
    let model = PeftModel::from_pretrained(base("bloom-tiny"), adapter_dir("lora-bloom")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let lora = peft::lora::from_pretrained(base("bloom-tiny"), dir.path(), false).unwrap();
    assert_logits_match(&lora.model, "lora-bloom", TOLERANCE);
    assert!(model.as_lora().is_some());
    let merged = model.merge_and_unload().unwrap();
    assert_logits_match(&merged, "lora-bloom", TOLERANCE);
}

/// PEFT's `PeftMixedModel` with a LoRA, a LoHa and a LoKr folder active together on the GQA
/// Llama: PEFT's logits unmerged and after `merge_and_unload()`
/// (tests/fixtures/reference/mixed-llama.safetensors); one adapter active gives that adapter's
/// own logits; an unknown name or a method the mixed model does not take is refused.
#[test]
fn mixed_lora_loha_lokr_match_pefts_mixed_model() {
    use peft::mixed::PeftMixedModel;
    use peft_tests::{Reference, adapter_dir, logits, max_diff_to};
    let names = ["lora-llama", "loha-llama", "lokr-llama"];
    let mut mixed = PeftMixedModel::new(base("llama-tiny")).unwrap();
    for name in names {
        mixed.load_adapter(name, adapter_dir(name)).unwrap();
    }
    let reference = Reference::load("mixed-llama");
    mixed.set_adapter(&["loha-llama"]).unwrap();
    let alone = max_diff_to(&logits(&mixed.model, &reference), "loha-llama", "logits");
    assert!(alone <= TOLERANCE, "LoHa alone: {alone}");
    mixed.set_adapter(&names).unwrap();
    assert_eq!(mixed.active_adapters(), names);
    // Three strongly perturbed adapters at once: PEFT's own logits move by 4.3e-5 when the
    // same three are activated in the other order, and by 5.2e-5 from unmerged to merged; ours
    // are within twice the single-adapter tolerance (9.4e-5 measured, 2026-12-07).
    let unmerged = max_diff_to(&logits(&mixed.model, &reference), "mixed-llama", "logits");
    assert!(unmerged <= 2.0 * TOLERANCE, "mixed unmerged: {unmerged}");
    let err = mixed.set_adapter(&["nope"]).unwrap_err().to_string();
    assert!(err.contains("no adapter named `nope`"), "{err}");
    let err = mixed
        .load_adapter("ia3", adapter_dir("ia3-llama"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("peft_type Ia3 in a mixed model"), "{err}");
    let merged = mixed.merge_and_unload().unwrap();
    let merged_diff = max_diff_to(&logits(&merged, &reference), "mixed-llama", "merged_logits");
    assert!(
        merged_diff <= 2.0 * TOLERANCE,
        "mixed merged: {merged_diff}"
    );
    eprintln!("mixed-llama: max |Δ| to PEFT unmerged {unmerged:.1e}, merged {merged_diff:.1e}");
}
