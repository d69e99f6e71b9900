//! Every cross-crate parity and integration suite, as modules of one test binary: one link of
//! the workspace instead of one per suite (CI builds them three times: tests, clippy, wgpu).
//! Select a suite by its module path, e.g. `cargo test -p peft-tests --test parity -- lora::`.

mod adalora;
mod architectures;
mod bad_inputs;
mod bf16;
mod bitfit;
mod checkpoints;
mod chunked_loss;
mod dora;
mod gguf;
mod ia3;
mod loha;
mod lokr;
mod lora;
mod lora_init;
mod lycoris;
mod model_parity;
mod multi_adapter;
mod prefix;
mod prompt;
mod ptuning;
mod quant;
mod train;
mod trainable_tokens;
mod vera;
