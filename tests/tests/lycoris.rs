//! What every suite of a layer method beyond LoRA (LoHa, LoKr, VeRA, AdaLoRA) checks of a PEFT folder,
//! written once: the methods differ only in their tensors and config keys.

use std::path::Path;

use peft_core::tuner::{LayerTuner, TunedModel};
use peft_core::{CausalLm, NoAdapter, Result, TensorStore};
use peft_models::AnyModel;
use peft_tests::{
    Reference, adapter_dir, base_of, device, json_same, logits, max_diff_to, model_dir,
    reference_json,
};

const TOLERANCE: f32 = 1e-4;

/// A method's model over one of the fixtures' bases.
type Tuned<T> = Result<TunedModel<T, AnyModel<<T as LayerTuner>::Layer>>>;

/// How a suite builds its method's model: from PEFT's folder (`trainable` or not) and freshly
/// from a config.
pub struct Method<T: LayerTuner> {
    /// `from_pretrained(base, dir, trainable)`.
    pub load: fn(AnyModel<NoAdapter>, &Path, bool) -> Tuned<T>,
    /// `get_peft_model(base, config)`.
    pub fresh: fn(AnyModel<NoAdapter>, T::Config) -> Tuned<T>,
    /// Reads the config from PEFT's folder.
    pub config: fn(&Path) -> Result<T::Config>,
    /// Config keys that must save back as PEFT wrote them.
    pub config_keys: &'static [&'static str],
    /// A tensor-name suffix PEFT's file must hold (the method's own keys were compared).
    pub marker: &'static str,
}

/// PEFT's folder `name`: its logits unmerged and after `merge_and_unload()`, the adapter far
/// from a no-op, unmerge restoring it, the folder saved back tensor for tensor and key for key,
/// and PEFT's parameter counts (also after a fresh injection from the same config).
pub fn matches_peft<T: LayerTuner>(method: &Method<T>, name: &str)
where
    AnyModel<T::Layer>: CausalLm<Adapter = T::Layer, WithAdapter<T::Layer> = AnyModel<T::Layer>>,
{
    let device = device();
    let base = || peft_models::load(model_dir(base_of(name)), &device).unwrap();
    let adapter = (method.load)(base(), &adapter_dir(name), false).unwrap();
    let reference = Reference::load(name);
    let unmerged = logits(&adapter.model, &reference);
    let unmerged_diff = max_diff_to(&unmerged, name, "logits");
    assert!(
        unmerged_diff <= TOLERANCE,
        "{name}: unmerged max |Δ| = {unmerged_diff}"
    );
    let change = max_diff_to(&unmerged, base_of(name), "logits");
    assert!(
        change > 0.05,
        "{name}: the adapter barely changes the logits ({change})"
    );

    let out = tempfile::tempdir().unwrap();
    adapter.save_pretrained(out.path()).unwrap();
    let theirs = TensorStore::open(adapter_dir(name).join("adapter_model.safetensors")).unwrap();
    let ours = TensorStore::open(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    assert!(theirs.keys().any(|k| k.ends_with(method.marker)));
    for key in theirs.keys() {
        assert_eq!(ours.f32(key).unwrap(), theirs.f32(key).unwrap(), "{key}");
    }
    let read = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (saved, peft) = (read(out.path()), read(&adapter_dir(name)));
    for key in method.config_keys {
        assert!(
            json_same(&saved[key], &peft[key]),
            "{key}: {} vs {}",
            saved[key],
            peft[key]
        );
    }

    let merged = adapter.merge_adapter().unwrap();
    let diff = max_diff_to(&logits(&merged.model, &reference), name, "merged_logits");
    assert!(
        diff <= TOLERANCE,
        "{name}: merged max |Δ| to PEFT's = {diff}"
    );
    let restored = merged.unmerge_adapter().unwrap();
    let diff = max_diff_to(&logits(&restored.model, &reference), name, "logits");
    assert!(diff <= TOLERANCE, "{name}: after unmerge max |Δ| = {diff}");
    let plain = restored.merge_and_unload().unwrap();
    let merged_diff = max_diff_to(&logits(&plain, &reference), name, "merged_logits");
    assert!(
        merged_diff <= TOLERANCE,
        "{name}: merge_and_unload max |Δ| = {merged_diff}"
    );
    eprintln!("{name}: max |Δ| to PEFT unmerged {unmerged_diff:.1e}, merged {merged_diff:.1e}");

    let expected = reference_json(name);
    let trainable = (method.load)(base(), &adapter_dir(name), true).unwrap();
    let summary = trainable.trainable_summary();
    assert_eq!(
        (summary.trainable as u64, summary.all as u64),
        (
            expected["trainable_params"].as_u64().unwrap(),
            expected["all_params"].as_u64().unwrap()
        )
    );
    // A fresh injection from the folder's config counts as the loaded model, unless PEFT's
    // differs (AdaLoRA: a fresh model starts every layer at `init_r`, a loaded one at the ranks
    // its `rank_pattern` kept); the fixture then records PEFT's fresh counts.
    let config = (method.config)(&adapter_dir(name).join("adapter_config.json")).unwrap();
    let fresh = (method.fresh)(base(), config).unwrap().trainable_summary();
    match (
        expected["fresh_trainable_params"].as_u64(),
        expected["fresh_all_params"].as_u64(),
    ) {
        (Some(trainable), Some(all)) => {
            assert_eq!((fresh.trainable as u64, fresh.all as u64), (trainable, all))
        }
        _ => assert_eq!(fresh, summary),
    }
}

/// Writes PEFT's folders `names`, loaded and saved back by peft-rs, and their merged
/// checkpoints to `target/interop/` for `fixtures/check_interop.py` (PEFT and transformers
/// load them with the reference logits).
pub fn export_for_python<T: LayerTuner>(method: &Method<T>, names: &[&str])
where
    AnyModel<T::Layer>: CausalLm<Adapter = T::Layer, WithAdapter<T::Layer> = AnyModel<T::Layer>>,
{
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/interop");
    for name in names {
        let base = peft_models::load(model_dir(base_of(name)), &device()).unwrap();
        let adapter = (method.load)(base, &adapter_dir(name), true).unwrap();
        adapter
            .save_pretrained(out.join(format!("{name}-adapter")))
            .unwrap();
        let merged = adapter.merge_and_unload().unwrap();
        peft_models::save_pretrained(
            &merged,
            model_dir(base_of(name)),
            out.join(format!("{name}-merged")),
        )
        .unwrap();
    }
}
