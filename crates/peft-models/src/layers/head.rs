//! The output head: logits and the loss of the final hidden states, through `lm_head` or the
//! tied embedding table (in f32, or in bf16 as `torch.autocast` computes it).

use std::sync::Arc;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Int, Tensor};
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, BaseLinear, ComputeDtype, LayerAdapter, PackedLinear,
    PackedWeight, adapter::with_weight_dtype,
};

/// How a tied output projection (the embedding table) computes: in f32 (the default, as after
/// `prepare_model_for_kbit_training`), or in bf16 as `torch.autocast` computes `lm_head`
/// ([`crate::LoadOptions::bf16_lm_head`]).
#[derive(Debug, Clone, Default)]
pub struct TiedHead {
    /// Compute the tied projection in bf16.
    pub bf16: bool,
    /// On the CPU backend, the table's values as bf16 (`[vocab, hidden]`, read in place from a
    /// bf16 checkpoint, else rounded once at load), which the bf16 products read. The table
    /// does not train while it is tied (training it unties it first), so the copy stays true.
    pub weight: Option<Arc<dyn PackedWeight>>,
}

/// The logits of the final hidden states: through `lm_head` where the model has its own, else
/// through the (tied) `embedding`'s table `[vocab, hidden]`, in bf16 where `tied` says so, with
/// the embedding's trained rows where it has them (PEFT ties the output layer's rows to the
/// embedding's).
pub fn output_logits<A: LayerAdapter>(
    hidden: Tensor<3>,
    lm_head: Option<&AdaptableLinear<A>>,
    embedding: &AdaptableEmbedding<A>,
    tied: &TiedHead,
) -> Tensor<3> {
    let table = &embedding.base.weight;
    let logits = match lm_head {
        Some(head) => return head.forward(hidden),
        None if tied.bf16 => {
            tied_logits_bf16(hidden.clone(), table.val(), tied_copy(embedding, tied))
        }
        None => tied_logits(hidden.clone(), table.val()),
    };
    match embedding.active_tokens() {
        Some(tokens) => tokens.project(logits, hidden),
        None => logits,
    }
}

/// The tied table's bf16 copy, where it still holds the table's values (merging rewrites the
/// table, not the copy).
fn tied_copy<'a, A: LayerAdapter>(
    embedding: &AdaptableEmbedding<A>,
    tied: &'a TiedHead,
) -> Option<&'a Arc<dyn PackedWeight>> {
    tied.weight.as_ref().filter(|_| !embedding.rewritten)
}

/// The mean next-token loss of the final hidden states against `labels` — the loss of
/// [`output_logits`] (soft-capped by `softcap` when given) — computed over row blocks without
/// whole logits where the projection is frozen and plain (see
/// [`peft_ops::chunked_loss`]); from whole logits otherwise (a trained or adapted `lm_head`,
/// a GPU backend, trained token rows).
pub fn output_loss<A: LayerAdapter>(
    hidden: Tensor<3>,
    lm_head: Option<&AdaptableLinear<A>>,
    embedding: &AdaptableEmbedding<A>,
    tied: &TiedHead,
    labels: Tensor<2, Int>,
    softcap: Option<f64>,
) -> Tensor<1> {
    use peft_ops::loss::OutputProjection;
    let table = &embedding.base.weight;
    let projection = match lm_head {
        None if embedding.active_tokens().is_some() => None,
        Some(head) => head
            .frozen_bf16_weight()
            .map(OutputProjection::Bf16)
            .or_else(|| head.frozen_dense_weight().map(OutputProjection::F32)),
        None => {
            let table = table.val();
            match (tied_copy(embedding, tied), table.is_require_grad()) {
                (_, true) => None,
                (Some(weight), false) => Some(OutputProjection::Bf16(weight.clone())),
                (None, false) => (!tied.bf16 && table.dtype() == burn::tensor::DType::F32)
                    .then(|| OutputProjection::F32(table.transpose())),
            }
        }
    };
    let cap = softcap.map(|c| c as f32);
    if let Some(projection) = projection
        && let Some(loss) =
            peft_ops::loss::linear_causal_lm_loss(hidden.clone(), projection, cap, labels.clone())
    {
        return loss;
    }
    let logits = output_logits(hidden, lm_head, embedding, tied);
    let logits = match softcap {
        Some(cap) => (logits / cap).tanh() * cap,
        None => logits,
    };
    peft_ops::loss::causal_lm_loss(logits, labels)
}

/// A frozen `lm_head` holding a copy of the embedding `table` (`[vocab, hidden]`), for a tied
/// model whose input embeddings are about to be trained apart from its output projection; it
/// computes as the tied projection did (in bf16 from the table's bf16 copy where `tied` has
/// one).
pub fn untied_head<A: LayerAdapter>(
    table: &Param<Tensor<2>>,
    tied: &TiedHead,
) -> AdaptableLinear<A> {
    let table = table.val().detach();
    if let Some(weight) = &tied.weight {
        return AdaptableLinear::over(BaseLinear::Packed(PackedLinear {
            weight: weight.clone(),
            bias: None,
            device: table.device(),
            compute: ComputeDtype::Bf16,
            on_device: None,
        }));
    }
    let head = Linear {
        weight: Param::from_tensor(table.transpose()).set_require_grad(false),
        bias: None,
    };
    AdaptableLinear::plain(match tied.bf16 {
        true => with_weight_dtype(head, burn::tensor::DType::BF16),
        false => head,
    })
}

/// `x @ weightᵀ` for a `[vocab, hidden]` table used as output projection (tied `lm_head`).
pub fn tied_logits(hidden: Tensor<3>, table: Tensor<2>) -> Tensor<3> {
    peft_ops::matmul::linear(hidden, table.transpose(), None)
}

/// [`tied_logits`] in bf16: `round(round(x) · round(table)ᵀ)`, through the packed bf16 product
/// of `weight` (the table's bf16 copy) on the CPU backend, else through the backend's bf16
/// matmul.
pub fn tied_logits_bf16(
    hidden: Tensor<3>,
    table: Tensor<2>,
    weight: Option<&Arc<dyn PackedWeight>>,
) -> Tensor<3> {
    use burn::tensor::DType;
    match weight {
        Some(weight) if !table.is_require_grad() => peft_ops::packed_op::packed_linear(
            hidden,
            weight,
            Some(peft_ops::packed_op::Bf16Layer {
                bias: None,
                round_output: true,
            }),
        ),
        _ => peft_core::adapter::linear_in(DType::BF16, hidden, table.transpose(), None),
    }
}
