//! Generated tokens to text with stop strings (`peft serve`'s streaming): for any tokens and
//! stop strings, the released pieces and the rest joined equal the whole decoded text cut at the
//! first stop string.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use peft_models::Tokenizer;
use peft_serve::text::TextStream;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama-tiny");
        Tokenizer::from_dir(dir).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let tokenizer = tokenizer();
    // Stop strings (≤ 4, UTF-8, split on NUL) before the first 0xff byte; token ids after it.
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let Ok(stops) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let stops: Vec<String> = stops.split('\0').take(4).map(str::to_string).collect();
    let vocab = tokenizer.vocab_size().max(1) as u32;
    let ids: Vec<u32> = data[split.min(data.len())..]
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .map(|id| id % vocab)
        .take(64)
        .collect();
    let mut stream = TextStream::new(stops.clone());
    let mut joined = String::new();
    for &id in &ids {
        match stream.push(tokenizer, id) {
            Ok(piece) => joined.push_str(&piece),
            Err(_) => return,
        }
    }
    let Ok(rest) = stream.finish(tokenizer) else {
        return;
    };
    joined.push_str(&rest);
    let Ok(full) = tokenizer.decode(&ids) else {
        return;
    };
    let cut = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| full.find(s.as_str()))
        .min()
        .unwrap_or(full.len());
    assert_eq!(joined, full[..cut], "ids {ids:?}, stops {stops:?}");
});
