//! Resuming from a checkpoint folder (`peft train --resume`): a real checkpoint of a LoRA run
//! with its `trainer_state.json`, its trainable values or its optimizer state replaced by the
//! input, loaded as a resume loads it: the adapter and its step, or an error naming the file —
//! never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;

type Lora = peft_lora::LoraModel<peft_models::AnyModel<peft_lora::LoraLinear>>;

const FILES: [&str; 3] = [
    "trainer_state.json",
    "trainable_state.safetensors",
    "optimizer.bin",
];

struct Setup {
    adapter: Lora,
    dir: PathBuf,
    files: Vec<Vec<u8>>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let device = Device::flex().autodiff();
        let base = peft_models::load(fixtures.join("models/bloom-tiny"), &device).unwrap();
        let adapter = peft_lora::get_peft_model(base, peft_lora::LoraConfig::default()).unwrap();
        let out = std::env::temp_dir().join(format!("peft-fuzz-resume-{}", std::process::id()));
        let data = vec![
            peft_train::Tokenized {
                input_ids: vec![5, 6, 7, 8],
                labels: vec![5, 6, 7, 8],
            };
            2
        ];
        let config = peft_train::TrainConfig {
            max_steps: Some(1),
            per_device_train_batch_size: 2,
            save_steps: Some(1),
            ..peft_train::TrainConfig::default()
        };
        let resume = peft_train::Resume::No;
        let (_, _) =
            peft_train::train(adapter.clone(), &data, 3, &config, &out, resume, &mut |_| {})
                .unwrap();
        let dir = out.join("checkpoint-1");
        let files = FILES.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
        Setup { adapter, dir, files }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let [which, rest @ ..] = data else {
        return;
    };
    let replaced = *which as usize % FILES.len();
    for (k, (name, bytes)) in FILES.iter().zip(&setup.files).enumerate() {
        let contents = if k == replaced { rest } else { bytes.as_slice() };
        std::fs::write(setup.dir.join(name), contents).unwrap();
    }
    let _ = peft_train::load_checkpoint_into(setup.adapter.clone(), &setup.dir);
});
