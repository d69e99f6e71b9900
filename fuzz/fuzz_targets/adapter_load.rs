//! Adapter loading: arbitrary adapter_model.safetensors bytes beside a valid LoRA config, loaded
//! onto the tiny BLOOM fixture, give an adapter or an error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

struct Setup {
    dir: PathBuf,
    base: peft_models::AnyModel<peft_core::NoAdapter>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("peft-fuzz-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixtures().join("adapters/lora-bloom/adapter_config.json"),
            dir.join("adapter_config.json"),
        )
        .unwrap();
        let base = peft_models::load(fixtures().join("models/bloom-tiny"), &Device::flex()).unwrap();
        Setup { dir, base }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    // The safetensors parser first, as a store.
    let _ = peft_core::TensorStore::from_bytes("fuzz", data.to_vec());
    std::fs::write(setup.dir.join("adapter_model.safetensors"), data).unwrap();
    let _ = peft_lora::from_pretrained(setup.base.clone(), &setup.dir, false);
});
