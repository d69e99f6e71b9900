//! Every method's adapter loader (LoRA — with trainable tokens too —, IA3, LoHa, LoKr, VeRA,
//! AdaLoRA, BitFit, prompt tuning, P-tuning, prefix tuning, trainable tokens): a valid adapter
//! folder of the method with its config or its weights replaced by the input, or
//! P-tuning's encoder file, loaded onto the tiny BLOOM by the method's own loader and by the
//! `peft` crate's registry (`PeftModel::from_pretrained`): an adapter or an error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;

type Base = peft_models::AnyModel<peft_core::NoAdapter>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A method's loader over a folder.
type Loader = fn(Base, &std::path::Path) -> bool;

/// Each method: its name, its folder's files as first written, and its loader.
struct Method {
    dir: PathBuf,
    files: Vec<(String, Vec<u8>)>,
    load: Loader,
}

struct Setup {
    base: Base,
    methods: Vec<Method>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("peft-fuzz-methods-{}", std::process::id()));
        let base =
            peft_models::load(fixtures().join("models/bloom-tiny"), &Device::flex()).unwrap();
        // BitFit has no fixture adapter: one is written from a fresh model.
        let bitfit_dir = root.join("bitfit-made");
        peft_bitfit::get_peft_model(base.clone(), peft_bitfit::BitFitConfig::default())
            .unwrap()
            .save_pretrained(&bitfit_dir)
            .unwrap();
        let methods: [(&str, PathBuf, Loader); 12] = [
            ("lora", fixtures().join("adapters/lora-bloom"), |b, d| {
                peft_lora::from_pretrained(b, d, false).is_ok()
            }),
            (
                "lora-tokens",
                fixtures().join("adapters/tokens-lora-bloom"),
                |b, d| peft_lora::from_pretrained(b, d, false).is_ok(),
            ),
            (
                "tokens",
                fixtures().join("adapters/tokens-bloom"),
                |b, d| peft_trainable_tokens::from_pretrained(b, d, false).is_ok(),
            ),
            ("ia3", fixtures().join("adapters/ia3-bloom"), |b, d| {
                peft_ia3::from_pretrained(b, d, false).is_ok()
            }),
            ("loha", fixtures().join("adapters/loha-bloom"), |b, d| {
                peft_loha::from_pretrained(b, d, false).is_ok()
            }),
            ("lokr", fixtures().join("adapters/lokr-bloom"), |b, d| {
                peft_lokr::from_pretrained(b, d, false).is_ok()
            }),
            ("vera", fixtures().join("adapters/vera-bloom"), |b, d| {
                peft_vera::from_pretrained(b, d, false).is_ok()
            }),
            ("adalora", fixtures().join("adapters/adalora-bloom"), |b, d| {
                peft_adalora::from_pretrained(b, d, false).is_ok()
            }),
            ("bitfit", bitfit_dir, |b, d| {
                peft_bitfit::from_pretrained(b, d, false).is_ok()
            }),
            (
                "prompt",
                fixtures().join("adapters/prompt-bloom-random"),
                |b, d| peft_prompt::from_pretrained(b, d, false).is_ok(),
            ),
            (
                "ptuning",
                fixtures().join("adapters/ptuning-bloom-lstm"),
                |b, d| peft_ptuning::from_pretrained(b, d, true).is_ok(),
            ),
            (
                "prefix",
                fixtures().join("adapters/prefix-bloom-proj"),
                |b, d| peft_prefix::from_pretrained(b, d, false).is_ok(),
            ),
        ];
        let methods = methods
            .into_iter()
            .map(|(name, source, load)| {
                let dir = root.join(name);
                std::fs::create_dir_all(&dir).unwrap();
                let mut files = Vec::new();
                for entry in std::fs::read_dir(&source).unwrap() {
                    let path = entry.unwrap().path();
                    let file = path.file_name().unwrap().to_string_lossy().into_owned();
                    if file.ends_with(".json") || file.ends_with(".safetensors") {
                        files.push((file, std::fs::read(&path).unwrap()));
                    }
                }
                files.sort();
                Method { dir, files, load }
            })
            .collect();
        Setup { base, methods }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let [which, file, rest @ ..] = data else {
        return;
    };
    let method = &setup.methods[*which as usize % setup.methods.len()];
    let replaced = *file as usize % method.files.len();
    for (k, (name, bytes)) in method.files.iter().enumerate() {
        let contents = if k == replaced {
            rest
        } else {
            bytes.as_slice()
        };
        std::fs::write(method.dir.join(name), contents).unwrap();
    }
    let _ = (method.load)(setup.base.clone(), &method.dir);
    // The same folder through the front door, which picks the loader by the (fuzzed) config's
    // `peft_type`: another method's loader may meet this method's files.
    let _ = peft::PeftModel::from_pretrained(setup.base.clone(), &method.dir);
});
