//! What every decoder's forward pass shares: the input checks and the layer loop of a RoPE
//! decoder (virtual tokens, positions, the full mask, each layer's mask, the cache's slots).

use burn::tensor::{Bool, Int, Tensor};
use peft_core::{ModelInput, PeftError, Result};

use super::attention::{attention_allowed, layer_masks};

/// Checks that ids and mask agree and returns `(batch, seq)`.
pub fn check_input(input: &ModelInput) -> Result<(usize, usize)> {
    let [b, s] = input.input_ids.dims();
    if input.attention_mask.dims() != [b, s] {
        return Err(PeftError::InvalidInput(format!(
            "attention_mask has shape {:?} but input_ids has {:?}",
            input.attention_mask.dims(),
            [b, s]
        )));
    }
    if s == 0 && b > 0 {
        return Err(PeftError::InvalidInput("input_ids has no positions".into()));
    }
    if let Some(positions) = &input.position_ids {
        if positions.dims() != [b, s] {
            return Err(PeftError::InvalidInput(format!(
                "position_ids has shape {:?} but input_ids has {:?}",
                positions.dims(),
                [b, s]
            )));
        }
        if input.virtual_tokens.is_some() {
            return Err(PeftError::InvalidInput(
                "position_ids with virtual tokens (prompt learning) are not supported".into(),
            ));
        }
    }
    Ok((b, s))
}

/// `position_ids` as host values, row-major `[batch, seq]` (negative ids count as 0).
fn host_positions(positions: &Tensor<2, Int>) -> Vec<usize> {
    positions
        .clone()
        .into_data()
        .iter::<i64>()
        .map(|p| p.max(0) as usize)
        .collect()
}

/// Prepends ones for virtual tokens and the cache's past mask to this pass' mask:
/// `[batch, past + n_virtual + seq]`.
pub fn full_mask(
    cache_mask: Option<&Tensor<2, Int>>,
    n_virtual: usize,
    mask: &Tensor<2, Int>,
) -> Tensor<2, Int> {
    let [batch, _] = mask.dims();
    let mut parts = Vec::with_capacity(3);
    if let Some(past) = cache_mask {
        parts.push(past.clone());
    }
    if n_virtual > 0 {
        parts.push(Tensor::<2, Int>::ones([batch, n_virtual], &mask.device()));
    }
    parts.push(mask.clone());
    Tensor::cat(parts, 1)
}

/// The layer loop of a RoPE decoder (Llama and the architectures built like it): the input's
/// virtual tokens (prompt learning) prepended to `embedded: [b, s, hidden]`, its rotary
/// positions (`position_ids`, else `past .. past + seq`), the full mask (cache + virtual +
/// `attention_mask`), each layer's attention mask (its sliding window, if any), the rotary
/// tables of the pass, and the cache's per-layer slots; the mask is kept in the cache for the
/// next pass. `layer(i, x, rope, allowed, slot)` runs layer `i`. Returns `[b, n_virtual + s,
/// hidden]`.
pub fn decoder_pass(
    embedded: Tensor<3>,
    input: ModelInput,
    mut cache: Option<&mut peft_core::KvCache>,
    windows: &[Option<usize>],
    rotary: &crate::rope::Rotary,
    mut layer: impl FnMut(
        usize,
        Tensor<3>,
        &crate::rope::RopeTables,
        &Tensor<4, Bool>,
        Option<&mut Option<peft_core::LayerKv>>,
    ) -> Tensor<3>,
) -> Tensor<3> {
    let ModelInput {
        attention_mask,
        virtual_tokens,
        position_ids,
        ..
    } = input;
    let attention_mask = &attention_mask;
    let position_ids = position_ids.as_ref();
    let (mut x, n_virtual) = match virtual_tokens {
        Some(v) => {
            let n = v.dims()[1];
            (Tensor::cat(vec![v, embedded], 1), n)
        }
        None => (embedded, 0),
    };
    let q_len = x.dims()[1];
    let past = cache.as_ref().map_or(0, |c| c.past_len());
    let mask = full_mask(
        cache.as_ref().and_then(|c| c.mask.as_ref()),
        n_virtual,
        attention_mask,
    );
    let masks = layer_masks(&attention_allowed(&mask, q_len), windows);
    let rope = match position_ids {
        Some(positions) => crate::rope::RopeTables::for_positions(
            rotary,
            &host_positions(positions),
            x.dims()[0],
            &x.device(),
        ),
        None => crate::rope::RopeTables::for_pass(rotary, past, q_len, &x.device()),
    };
    if let Some(c) = cache.as_deref_mut()
        && c.layers.len() != windows.len()
    {
        c.layers.resize(windows.len(), None);
    }
    for (i, allowed) in masks.iter().enumerate() {
        let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
        x = layer(i, x, &rope, allowed, slot);
    }
    if let Some(c) = cache {
        c.mask = Some(mask);
    }
    x
}
