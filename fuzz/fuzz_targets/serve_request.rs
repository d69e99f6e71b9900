//! `peft serve`'s request planning: any `/v1/completions` body gives an OpenAI error or a plan
//! within the server's limits — prompt + `max_tokens` within the context (no overflow), at most
//! 4 stop strings of at most 256 characters, token ids inside the vocabulary.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use peft_models::Tokenizer;
use peft_serve::metrics::Shared;
use peft_serve::routes::{AppState, MAX_STOP_CHARS, MAX_STOPS, check_completion_body};

const CONTEXT: usize = 64;

/// A server's state over the tiny Llama's tokenizer, with a 64-token context; no engine behind
/// it (planning never reaches the engine).
fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama-tiny");
        let tokenizer = Tokenizer::from_dir(dir).unwrap();
        let vocab = tokenizer.vocab_size();
        let (commands, engine_side) = std::sync::mpsc::channel();
        std::mem::forget(engine_side);
        let shared = Arc::new(Shared::new("base"));
        shared.set_adapters(["a".to_string()]);
        AppState::new(commands, shared, tokenizer, "base".into(), CONTEXT, 4, vocab, None, None)
    })
}

fuzz_target!(|data: &[u8]| {
    let state = state();
    if let Ok((prompt, max_tokens, stops, echo)) = check_completion_body(state, data) {
        // `max_tokens: 0` only scores the prompt (`echo`).
        assert!(prompt >= 1 && (max_tokens >= 1 || echo));
        assert!(prompt.checked_add(max_tokens).is_some_and(|n| n <= CONTEXT));
        assert!(stops.len() <= MAX_STOPS);
        assert!(stops.iter().all(|s| s.chars().count() <= MAX_STOP_CHARS));
    }
});
