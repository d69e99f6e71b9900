//! # peft-ptuning
//!
//! P-tuning (Liu et al., 2021) with Hugging Face PEFT parity: virtual tokens re-encoded by an
//! MLP (`Linear(d,h) → ReLU → Linear(h,h) → ReLU → Linear(h,d)`, PEFT's `mlp_head.0/.2/.4`) or a
//! bidirectional LSTM (`encoder_num_layers` layers, dropout between them, PyTorch's `nn.LSTM`
//! weight layout, `lstm_head.*_l{k}[_reverse]`) followed by `Linear(2h,2h) → ReLU → Linear(2h,d)`,
//! then put before the input embeddings like prompt tuning (peft-core's
//! [`peft_core::prompt_learning::VirtualTokens`]).
//!
//! PEFT's `adapter_model.safetensors` holds only the encoder's output (`prompt_embeddings`);
//! peft-rs also writes the encoder's weights, under PEFT's state-dict names, to
//! `adapter_encoder.safetensors`, so that training can resume. A folder without it loads as a
//! table, as PEFT does in inference mode. As in PEFT, `encoder_num_layers` is ignored (with a
//! warning) for the MLP, which always has three layers.

pub mod config;
pub mod encoder;
pub mod model;

pub use config::{EncoderType, PromptEncoderConfig};
pub use encoder::{
    LstmDirection, LstmLayer, PTuningEncoder, PromptEncoder, encoder_tensors, load_encoder,
    new_encoder,
};
pub use model::{ENCODER_NAME, PTuning, PTuningModel, from_pretrained, get_peft_model};
/// The sizes every prompt-learning config shares (its `prompt` field).
pub use peft_core::PromptLearningConfig;

#[cfg(test)]
mod tests;

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
