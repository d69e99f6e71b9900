//! Building blocks shared by the architectures, one file per concern: the weight loader
//! (`weights`), the norms (`norm`), attention and its masks (`attention`), the decoder's shared
//! layer loop (`decoder`) and the output head (`head`); everything is re-exported here.

mod attention;
mod decoder;
mod head;
mod norm;
mod weights;

pub use attention::{
    attend, attend_packed, attend_softcapped, attention_allowed, extend_cache, layer_masks,
    repeat_kv, sliding_window, split_qkv,
};
pub use decoder::{check_input, decoder_pass, full_mask};
pub use head::{TiedHead, output_logits, output_loss, tied_logits, tied_logits_bf16, untied_head};
pub use norm::{LayerNorm, RmsNorm};
pub use weights::WeightLoader;

use burn::tensor::Tensor;

/// GELU with the tanh approximation (BLOOM's `bloom_gelu_forward`): one fused pass on the CPU
/// backend, see [`peft_ops::fused::gelu_tanh`].
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    peft_ops::fused::gelu_tanh(x)
}
