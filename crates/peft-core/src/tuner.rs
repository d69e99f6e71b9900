//! What every layer method (LoRA, IA3) does the same way, in the spirit of PEFT's `BaseTuner`:
//! injecting adapters into the targeted layers, and merging, unmerging or dropping them. A
//! method supplies only how one layer's adapter is built.

use std::collections::BTreeSet;

use crate::adapter::{AdaptableEmbedding, AdaptableLinear, LayerAdapter, NoAdapter};
use crate::adapter_files::set_trainable;
use crate::error::Result;
use crate::model::{AdapterModel, CausalLm};
use crate::params::{ParamUpdate, map_params};

/// Freezes `base`, gives every layer in `targeted` the adapter `make(path, (d_in, d_out),
/// is_embedding)` builds (an embedding's dims are `(num_embeddings, dim)`), and makes the base
/// parameters named in `trained` trainable again (`modules_to_save`, selected biases).
pub fn inject_layers<B, A>(
    base: B,
    targeted: &[String],
    trained: &BTreeSet<String>,
    mut make: impl FnMut(&str, (usize, usize), bool) -> Result<A>,
) -> Result<B::WithAdapter<A>>
where
    B: CausalLm<Adapter = NoAdapter>,
    A: LayerAdapter,
{
    let base = map_params(base, |_, _| ParamUpdate::Trainable(false));
    let is_target = |path: &str| targeted.iter().any(|t| t == path);
    let make = std::cell::RefCell::new(&mut make);
    let model = base.map_layers(
        &mut |path: &str, layer: AdaptableLinear<NoAdapter>| {
            if !is_target(path) {
                return Ok(layer.with_adapter(None));
            }
            let dims = layer.dims();
            Ok(layer.with_adapter(Some((make.borrow_mut())(path, dims, false)?)))
        },
        &mut |path: &str, layer: AdaptableEmbedding<NoAdapter>| {
            if !is_target(path) {
                return Ok(layer.with_adapter(None));
            }
            let dims = layer.dims();
            Ok(layer.with_adapter(Some((make.borrow_mut())(path, dims, true)?)))
        },
    )?;
    Ok(if trained.is_empty() {
        model
    } else {
        set_trainable(model, trained)
    })
}

/// Every parameter frozen (an adapter loaded for inference, PEFT's `is_trainable=False`).
pub fn freeze<M: burn::module::Module>(model: M) -> M {
    map_params(model, |_, _| ParamUpdate::Trainable(false))
}

/// `adapter` as loaded (`trainable`), or with every parameter frozen (inference, PEFT's
/// `is_trainable=False`): the tail of every method's `from_pretrained`.
pub fn trainable_or_frozen<A: AdapterModel>(adapter: A, trainable: bool) -> A {
    if trainable {
        return adapter;
    }
    let frozen = freeze(adapter.model().clone());
    adapter.with_model(frozen)
}

/// PEFT's `merge_and_unload()`: every adapter folded into its base weight, the plain model
/// returned.
pub fn merge_and_unload<M: CausalLm>(model: M) -> Result<M::WithAdapter<NoAdapter>> {
    model.map_layers(
        &mut |_, layer: AdaptableLinear<M::Adapter>| {
            Ok(layer.merge()?.with_adapter::<NoAdapter>(None))
        },
        &mut |_, layer: AdaptableEmbedding<M::Adapter>| {
            Ok(layer.merge()?.with_adapter::<NoAdapter>(None))
        },
    )
}

/// PEFT's `unload()`: the adapters dropped without merging.
pub fn unload<M: CausalLm>(model: M) -> Result<M::WithAdapter<NoAdapter>> {
    model.map_layers(
        &mut |_, layer: AdaptableLinear<M::Adapter>| Ok(layer.with_adapter::<NoAdapter>(None)),
        &mut |_, layer: AdaptableEmbedding<M::Adapter>| Ok(layer.with_adapter::<NoAdapter>(None)),
    )
}

/// PEFT's `merge_adapter()`: the adapters folded into the base weights and kept, so that
/// [`unmerge_layers`] can undo it.
pub fn merge_layers<M>(model: M) -> Result<M>
where
    M: CausalLm<WithAdapter<<M as CausalLm>::Adapter> = M>,
{
    model.map_layers(
        &mut |_, l: AdaptableLinear<M::Adapter>| l.merge(),
        &mut |_, e: AdaptableEmbedding<M::Adapter>| e.merge(),
    )
}

/// PEFT's `unmerge_adapter()`.
pub fn unmerge_layers<M>(model: M) -> Result<M>
where
    M: CausalLm<WithAdapter<<M as CausalLm>::Adapter> = M>,
{
    model.map_layers(
        &mut |_, l: AdaptableLinear<M::Adapter>| l.unmerge(),
        &mut |_, e: AdaptableEmbedding<M::Adapter>| e.unmerge(),
    )
}
