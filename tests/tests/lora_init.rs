//! PiSSA, OLoRA and LoftQ (`init_lora_weights`) against PEFT 0.21.2
//! (fixtures/make_lora_init_fixtures.py):
//! the initial product and the residual base, PEFT's trained folders (whose residual PEFT
//! recomputes on loading), and the conversion to plain LoRA over the original base.

use std::collections::BTreeMap;

use burn::tensor::{DType, Tensor};
use peft_core::{AdaptableEmbedding, AdaptableLinear, BaseLinear, CausalLm, TensorStore};
use peft_lora::{
    LoraConfig, LoraLinear, MultiLoraModel, from_pretrained, get_peft_model,
    save_pretrained_converted,
};
use peft_tests::{Reference, adapter_dir, base_of, device, fixtures, logits, model_dir, to_vec};

const TOLERANCE: f32 = 1e-4;
/// Logits over a base PiSSA / OLoRA changed: PEFT factors in f32 (`torch.linalg`), so its
/// residual and initial product are within 5.2e-6 of the exact ones computed here (measured,
/// `initialisation_matches_peft`); through two layers that reaches the logits as ≤ 1.1e-4.
const RESIDUAL_TOLERANCE: f32 = 2e-4;
const CASES: [&str; 2] = ["pissa-llama", "olora-bloom"];

/// Per adapted layer: `(s·B·A, the base weight)`, both in PyTorch's `[out, in]` layout.
type ProductsAndBases = BTreeMap<String, (Vec<f32>, Vec<f32>)>;

/// [`ProductsAndBases`] of `model`.
fn products_and_bases<M>(model: M) -> ProductsAndBases
where
    M: CausalLm<Adapter = LoraLinear>,
{
    let mut found = BTreeMap::new();
    model
        .map_layers(
            &mut |path, layer: AdaptableLinear<LoraLinear>| {
                if let (Some(pair), BaseLinear::Dense(base)) = (&layer.adapter, &layer.base) {
                    let delta: Tensor<2> = pair.delta_weight().transpose();
                    let weight = base.weight.val().cast(DType::F32).transpose();
                    found.insert(path.to_string(), (to_vec(delta), to_vec(weight)));
                }
                Ok(layer)
            },
            &mut |_, layer: AdaptableEmbedding<LoraLinear>| Ok(layer),
        )
        .unwrap();
    found
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn config_of(name: &str) -> LoraConfig {
    use peft_core::MethodConfig;
    LoraConfig::from_file(adapter_dir(name).join("adapter_config.json")).unwrap()
}

fn diff_to_reference<M: CausalLm>(model: &M, name: &str) -> f32 {
    let reference = Reference::load(name);
    reference.max_diff(&logits(model, &reference))
}

/// Our `(s·B₀A₀, base)` per adapted layer of `model` (a fresh adapter of `name`'s config), and
/// PEFT's `reference/<name>-init` file (`<path>.delta`, `<path>.residual`), which covers the
/// same layers.
fn ours_and_peft_init<M>(name: &str, model: M) -> (ProductsAndBases, TensorStore)
where
    M: CausalLm<Adapter = LoraLinear>,
{
    let store = TensorStore::open(
        fixtures()
            .join("reference")
            .join(format!("{name}-init.safetensors")),
    )
    .unwrap();
    let ours = products_and_bases(model);
    assert_eq!(
        ours.len() * 2,
        store.keys().count(),
        "{name}: targeted layers"
    );
    (ours, store)
}

/// A fresh adapter: PEFT's initial product `s·B₀A₀` and residual base on every targeted layer
/// (≤ 1e-5), and the model unchanged (the base model's logits).
#[test]
fn initialisation_matches_peft() {
    let device = device();
    for name in CASES {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let model = get_peft_model(base, config_of(name)).unwrap();
        let diff = diff_to_reference(&model.model, base_of(name));
        assert!(
            diff <= TOLERANCE,
            "{name}: a fresh adapter changes the model by {diff}"
        );
        let (ours, store) = ours_and_peft_init(name, model.model);
        let mut worst = 0f32;
        for (path, (delta, residual)) in ours {
            let (theirs_delta, _) = store.f32(&format!("{path}.delta")).unwrap();
            let (theirs_residual, _) = store.f32(&format!("{path}.residual")).unwrap();
            let d = max_abs(&delta, &theirs_delta);
            let r = max_abs(&residual, &theirs_residual);
            assert!(
                d <= 1e-5 && r <= 1e-5,
                "{name} {path}: product {d}, residual {r}"
            );
            worst = worst.max(d).max(r);
        }
        eprintln!("{name}: initial product and residual within {worst:.1e} of PEFT's");
    }
}

/// PEFT's folder (its config still naming the initialisation) over the original base: the
/// residual is recomputed as PEFT does, and the logits are PEFT's; the converted folder we write
/// is plain LoRA of rank 2r — PEFT's own conversion up to the factors' signs (same `B′A′`, same
/// config) — and gives the same logits over the original base, as PEFT's converted folder does.
#[test]
fn trained_folders_load_and_convert_as_peft() {
    let device = device();
    for name in CASES {
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let trained = from_pretrained(base, adapter_dir(name), false).unwrap();
        let diff = diff_to_reference(&trained.model, name);
        assert!(diff <= RESIDUAL_TOLERANCE, "{name}: max |Δ| = {diff}");

        let out = tempfile::tempdir().unwrap();
        save_pretrained_converted(&trained, out.path()).unwrap();
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let converted = format!("{name}-converted");
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir(&converted).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for key in ["r", "lora_alpha"] {
            assert_eq!(ours[key].as_f64(), theirs[key].as_f64(), "{name}: {key}");
        }
        assert_eq!(ours["init_lora_weights"], true);
        assert_eq!(theirs["init_lora_weights"], true);
        for dir in [out.path().to_path_buf(), adapter_dir(&converted)] {
            let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
            let plain = from_pretrained(base, &dir, false).unwrap();
            let diff = diff_to_reference(&plain.model, name);
            assert!(
                diff <= RESIDUAL_TOLERANCE,
                "{name}: {} max |Δ| = {diff}",
                dir.display()
            );
            if dir != out.path() {
                continue;
            }
            // The converted product s·B′A′ equals PEFT's on every layer.
            let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
            let peft_converted = from_pretrained(base, adapter_dir(&converted), false).unwrap();
            let theirs = products_and_bases(peft_converted.model);
            for (path, (delta, _)) in products_and_bases(plain.model) {
                let d = max_abs(&delta, &theirs[&path].0);
                assert!(d <= 1e-5, "{name} {path}: converted product off by {d}");
            }
        }
    }
}

/// Where the base cannot take a residual, and where several adapters share the base, PiSSA is
/// refused with a message that says why.
#[test]
fn base_changing_inits_are_refused_where_they_cannot_apply() {
    let device = device();
    let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device).unwrap();
    let err = get_peft_model(base, config_of("olora-bloom"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("olora on `transformer.h.0"), "{err}");
    assert!(err.contains("needs a dense linear base"), "{err}");

    let base = peft_models::load(model_dir("llama-tiny"), &device).unwrap();
    let mut multi = MultiLoraModel::new(base).unwrap();
    let err = multi
        .load_adapter("p", adapter_dir("pissa-llama"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter `p` was initialised with pissa"),
        "{err}"
    );
}

/// LoftQ (`init_lora_weights: "loftq"`, 4 bits): the base becomes W's NF4 quantisation and the
/// pair starts at the quantisation error's top factors. With one iteration (`loftq-llama`) the
/// base is PEFT + bitsandbytes' to the bit; with two (`loftq-bloom`) the second quantisation
/// reads `W − B₀A₀`, whose f32 (PEFT) and f64 (here) factors differ in the last bits: each
/// block's absmax, and so every value of the block, moves by a rounding, and an element lying on
/// a code boundary could round to the other code (a jump of a code step, ≥ 1e-3 here): such
/// jumps are counted and bounded. PEFT's folders load with PEFT's logits (the base quantised again on
/// loading, as PEFT does); a LoftQ adapter is not converted to plain LoRA.
#[test]
fn loftq_matches_peft() {
    let device = device();
    for (name, iterations) in [("loftq-llama", 1), ("loftq-bloom", 2)] {
        let config = config_of(name);
        assert_eq!(config.loftq_settings("t").unwrap(), (4, iterations));
        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let model = get_peft_model(base, config).unwrap();
        let (ours, store) = ours_and_peft_init(name, model.model);
        let (mut worst_product, mut worst_base) = (0f32, 0f32);
        let (mut differ, mut jumps, mut total) = (0usize, 0usize, 0usize);
        for (path, (delta, base)) in ours {
            let (theirs_delta, _) = store.f32(&format!("{path}.delta")).unwrap();
            let (theirs_base, _) = store.f32(&format!("{path}.residual")).unwrap();
            worst_product = worst_product.max(max_abs(&delta, &theirs_delta));
            for (a, b) in base.iter().zip(&theirs_base) {
                let d = (a - b).abs();
                differ += usize::from(d > 0.0);
                jumps += usize::from(d >= 1e-3);
                worst_base = worst_base.max(if d < 1e-3 { d } else { 0.0 });
            }
            total += base.len();
        }
        eprintln!(
            "{name}: initial product within {worst_product:.1e} of PEFT's; base: {differ} of \
             {total} values differ, by <= {worst_base:.1e} but for {jumps} code jumps"
        );
        assert!(worst_product <= 1e-5, "{name}: product {worst_product}");
        if iterations == 1 {
            assert_eq!(differ, 0, "{name}: the NF4 base is not bitsandbytes'");
        } else {
            assert!(worst_base <= 1e-6, "{name}: base off by {worst_base}");
            assert!(
                jumps * 1000 <= total,
                "{name}: {jumps} of {total} values jump a code"
            );
        }

        let base = peft_models::load(model_dir(base_of(name)), &device).unwrap();
        let trained = from_pretrained(base, adapter_dir(name), false).unwrap();
        let diff = diff_to_reference(&trained.model, name);
        eprintln!("{name}: PEFT's trained folder, max |Δ| = {diff:.1e}");
        assert!(diff <= RESIDUAL_TOLERANCE, "{name}: max |Δ| = {diff}");
        let out = tempfile::tempdir().unwrap();
        let err = save_pretrained_converted(&trained, out.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("converting a loftq adapter"), "{err}");
    }
    // PEFT's rule: loftq needs its config; 8 bits are PEFT's own quantiser, not implemented.
    use peft_core::MethodConfig;
    let err = LoraConfig::from_json(r#"{"init_lora_weights": "loftq"}"#, "cfg")
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs loftq_config"), "{err}");
    let err = LoraConfig::from_json(
        r#"{"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}"#,
        "cfg",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("loftq_bits 8"), "{err}");
}
