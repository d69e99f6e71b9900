//! The training-data parser: any file content gives examples or an error naming a line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.jsonl");
    match peft_train::data::parse_examples(path, data) {
        Ok(examples) => {
            for e in &examples {
                let _ = (&e.prompt, &e.response);
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.jsonl"), "{message}");
        }
    }
});
