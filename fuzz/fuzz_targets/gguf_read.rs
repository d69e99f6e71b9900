//! The GGUF reader: arbitrary bytes give a parsed file or an error, never a panic, an
//! out-of-bounds read or an allocation sized by a hostile count. A parsed file's every tensor
//! can be read and de-quantised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse("fuzz.gguf", data.to_vec()) {
        for info in &file.tensors {
            let bytes = file.tensor_bytes(info);
            assert_eq!(Some(bytes.len()), info.byte_len());
            let values = file.tensor_f32(&info.name).unwrap();
            assert_eq!(values.len(), info.numel());
        }
    }
});
