//! Attachment point (b): learned virtual tokens put before the input embeddings of a frozen
//! model. Prompt tuning and P-tuning differ only in how the tokens are computed (a table, or a
//! table re-encoded by an MLP or LSTM), so both wrap their model in [`VirtualTokens`] with their
//! own [`VirtualTokenEncoder`].

use burn::module::{Module, ModuleDisplay, Param};
use burn::tensor::{Device, Int, Tensor};

use crate::adapter::LayerAdapter;
use crate::error::Result;
use crate::model::{CausalLm, KvCache, MapEmbedding, MapLinear, ModelInput, ModelSpec};
use crate::modules::ModuleInfo;

/// Computes the virtual tokens `[num_virtual_tokens, hidden]`.
pub trait VirtualTokenEncoder: Module + ModuleDisplay {
    /// The virtual tokens.
    fn virtual_tokens(&self) -> Tensor<2>;
}

/// A plain table of virtual tokens: prompt tuning, and any prompt-learning adapter loaded from
/// PEFT's file (which holds the encoder's output as `prompt_embeddings`).
#[derive(Module, Debug)]
pub struct PromptTable {
    /// `[num_virtual_tokens, hidden]`.
    pub prompt_embeddings: Param<Tensor<2>>,
}

impl VirtualTokenEncoder for PromptTable {
    fn virtual_tokens(&self) -> Tensor<2> {
        self.prompt_embeddings.val()
    }
}

/// A frozen model whose input starts with the virtual tokens of `encoder`.
///
/// It is itself a [`CausalLm`]: the tokens enter on the first pass (no cache, or an empty one),
/// and later generation steps see them through the cache, so generation, evaluation and training
/// need no special case. The logits have the virtual positions first, as PEFT returns them.
#[derive(Module, Debug)]
pub struct VirtualTokens<M: CausalLm, E: VirtualTokenEncoder> {
    /// The frozen model.
    pub base: M,
    /// Where the virtual tokens come from.
    pub encoder: E,
}

impl<M: CausalLm, E: VirtualTokenEncoder> VirtualTokens<M, E> {
    /// The virtual tokens for a batch: `[batch, n, hidden]`.
    pub fn batch_tokens(&self, batch: usize) -> Tensor<3> {
        let table = self.encoder.virtual_tokens();
        let [n, d] = table.dims();
        table.reshape([1, n, d]).expand([batch, n, d])
    }
}

impl<M: CausalLm, E: VirtualTokenEncoder> CausalLm for VirtualTokens<M, E> {
    type Adapter = M::Adapter;
    type WithAdapter<B: LayerAdapter> = VirtualTokens<M::WithAdapter<B>, E>;

    fn spec(&self) -> &ModelSpec {
        self.base.spec()
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        self.base.modules()
    }

    /// On the first pass (no cache, or an empty one) the virtual tokens go before the input.
    fn final_hidden(
        &self,
        mut input: ModelInput,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        let first = cache.as_ref().is_none_or(|c| c.past_len() == 0);
        if first && input.virtual_tokens.is_none() {
            input.virtual_tokens = Some(self.batch_tokens(input.input_ids.dims()[0]));
        }
        self.base.final_hidden(input, cache)
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.base.logits(hidden)
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        self.base.hidden_loss(hidden, labels)
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.base.embed_tokens(ids)
    }

    fn map_layers<B: LayerAdapter>(
        self,
        linear: &mut MapLinear<'_, M::Adapter, B>,
        embedding: &mut MapEmbedding<'_, M::Adapter, B>,
    ) -> Result<VirtualTokens<M::WithAdapter<B>, E>> {
        Ok(VirtualTokens {
            base: self.base.map_layers(linear, embedding)?,
            encoder: self.encoder,
        })
    }

    fn device(&self) -> Device {
        self.base.device()
    }

    fn untie_word_embeddings(self) -> Self {
        Self {
            base: self.base.untie_word_embeddings(),
            encoder: self.encoder,
        }
    }
}
