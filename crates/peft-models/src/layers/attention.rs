//! Attention: the masks (causal, padding, sliding windows), softmax attention (fused on the CPU
//! backend, composed elsewhere), grouped-query heads and the key/value cache.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Int, Tensor};

/// Which key positions each query may attend to: `[batch, 1, q_len, kv_len]`.
///
/// `full_mask: [batch, kv_len]` covers past and current positions (1 = real); queries sit at the
/// last `q_len` positions, and each sees real keys at or before its own position.
pub fn attention_allowed(full_mask: &Tensor<2, Int>, q_len: usize) -> Tensor<4, Bool> {
    let [batch, kv_len] = full_mask.dims();
    let device = full_mask.device();
    let past = kv_len - q_len;
    let q_pos = Tensor::<1, Int>::arange(past as i64..kv_len as i64, &device).reshape([q_len, 1]);
    let k_pos = Tensor::<1, Int>::arange(0..kv_len as i64, &device).reshape([1, kv_len]);
    let causal = k_pos
        .expand([q_len, kv_len])
        .lower_equal(q_pos.expand([q_len, kv_len]))
        .reshape([1, 1, q_len, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    let real = full_mask
        .clone()
        .equal_elem(1)
        .reshape([batch, 1, 1, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    causal.bool_and(real)
}

/// Narrows `allowed: [batch, 1, q_len, kv_len]` (from [`attention_allowed`]) to a sliding
/// window: a query at position `p` keeps the keys at positions `p - window < k ≤ p`, as
/// transformers' `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`).
pub fn sliding_window(allowed: &Tensor<4, Bool>, window: usize) -> Tensor<4, Bool> {
    let [batch, _, q_len, kv_len] = allowed.dims();
    let device = allowed.device();
    let past = kv_len - q_len;
    let q_pos = Tensor::<1, Int>::arange(past as i64..kv_len as i64, &device).reshape([q_len, 1]);
    let k_pos = Tensor::<1, Int>::arange(0..kv_len as i64, &device).reshape([1, kv_len]);
    let near = (k_pos.expand([q_len, kv_len]) + window as i64)
        .greater(q_pos.expand([q_len, kv_len]))
        .reshape([1, 1, q_len, kv_len])
        .expand([batch, 1, q_len, kv_len]);
    allowed.clone().bool_and(near)
}

/// The attention mask of each layer: `allowed` for full-attention layers (`None`), narrowed by
/// [`sliding_window`] for windowed ones; layers sharing a window share one mask.
pub fn layer_masks(allowed: &Tensor<4, Bool>, windows: &[Option<usize>]) -> Vec<Tensor<4, Bool>> {
    let mut narrowed: Vec<(usize, Tensor<4, Bool>)> = Vec::new();
    windows
        .iter()
        .map(|window| match window {
            None => allowed.clone(),
            Some(w) => match narrowed.iter().find(|(v, _)| v == w) {
                Some((_, mask)) => mask.clone(),
                None => {
                    let mask = sliding_window(allowed, *w);
                    narrowed.push((*w, mask.clone()));
                    mask
                }
            },
        })
        .collect()
}

/// Softmax attention. `q: [b, h, q, d]`, `k`/`v`: `[b, kv_h, kv, d]` with `kv_h` dividing `h`
/// (grouped-query attention: query head `i` reads key/value head `i / (h / kv_h)`, as
/// transformers' `repeat_kv` arranges them), `bias: [b, h, 1, kv]` added to the scores (ALiBi),
/// `allowed: [b, 1, q, kv]`. Masked scores get the dtype's minimum, as transformers' eager
/// attention does. Returns `[b, h, q, d]`.
///
/// On the CPU backend this is one fused operation ([`peft_ops::fused::attention`]) whose output
/// is laid out `[b, q, h, d]` underneath, so the caller's merge of the heads is free.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, h, q_len, _] = q.dims();
    let kv_len = k.dims()[2];
    if peft_ops::fused::is_fused(&q) {
        let (host_allowed, host_bias) = host_masks(allowed, bias.as_ref(), [b, h, q_len, kv_len]);
        if let Some(out) = peft_ops::fused::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            scale as f32,
            host_bias,
            host_allowed,
        ) {
            return out.swap_dims(1, 2);
        }
    }
    composed_attend(q, k, v, scale, bias, None, allowed)
}

/// [`attend`] with Gemma 2's soft-capping of the scores, `cap · tanh(scores / cap)`, between
/// the scaling and the mask (burn operations on every backend: the fused CPU attention has no
/// capping).
pub fn attend_softcapped(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    softcap: Option<f64>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    match softcap {
        None => attend(q, k, v, scale, None, allowed),
        Some(cap) => composed_attend(q, k, v, scale, None, Some(cap), allowed),
    }
}

/// Self-attention over a fused query/key/value projection `qkv: [b, s, h, 3, d]` (BLOOM's
/// layout), as [`attend`] of its three parts; on the CPU backend one operation that reads the
/// parts in place and returns one gradient for `qkv` ([`peft_ops::fused::packed_qkv_attention`]).
/// Returns `[b, h, s, d]`.
pub fn attend_packed(
    qkv: Tensor<5>,
    scale: f64,
    bias: Option<Tensor<4>>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, s, h, _, _] = qkv.dims();
    if peft_ops::fused::is_fused(&qkv) {
        let (host_allowed, host_bias) = host_masks(allowed, bias.as_ref(), [b, h, s, s]);
        if let Some(out) = peft_ops::fused::packed_qkv_attention(
            qkv.clone(),
            scale as f32,
            host_bias,
            host_allowed,
        ) {
            return out.swap_dims(1, 2);
        }
    }
    let [q, k, v] = split_qkv(&qkv);
    composed_attend(q, k, v, scale, bias, None, allowed)
}

/// The query, key and value parts of a fused projection `qkv: [b, s, h, 3, d]` (BLOOM's layout),
/// each as `[b, h, s, d]`.
pub fn split_qkv(qkv: &Tensor<5>) -> [Tensor<4>; 3] {
    let [b, s, h, _, d] = qkv.dims();
    [0, 1, 2].map(|i| {
        qkv.clone()
            .slice_dim(3, i..i + 1)
            .reshape([b, s, h, d])
            .swap_dims(1, 2)
    })
}

/// The attention mask `[b, q, kv]` and bias `[b, h, kv]` on the host, for the fused operations.
fn host_masks(
    allowed: &Tensor<4, Bool>,
    bias: Option<&Tensor<4>>,
    [b, h, q_len, kv_len]: [usize; 4],
) -> (Vec<bool>, Option<Vec<f32>>) {
    let host_allowed = allowed
        .clone()
        .expand([b, 1, q_len, kv_len])
        .into_data()
        .try_to_vec::<bool>()
        .unwrap_or_default();
    let host_bias = bias.map(|bias| {
        bias.clone()
            .expand([b, h, 1, kv_len])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    });
    (host_allowed, host_bias)
}

/// [`attend`] from burn operations (any backend).
fn composed_attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
    softcap: Option<f64>,
    allowed: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, h, q_len, _] = q.dims();
    let [_, kv_heads, kv_len, _] = k.dims();
    let (k, v) = (repeat_kv(k, h / kv_heads), repeat_kv(v, h / kv_heads));
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(cap) = softcap {
        scores = (scores / cap).tanh() * cap;
    }
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    let blocked = allowed.clone().expand([b, h, q_len, kv_len]).bool_not();
    let probs = softmax(scores.mask_fill(blocked, f32::MIN), 3);
    probs.matmul(v)
}

/// Repeats `[b, kv_heads, len, d]` keys or values to `[b, kv_heads · n_rep, len, d]`, each head
/// `n_rep` times in a row (transformers' `repeat_kv`).
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, len, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, len, d])
        .reshape([b, kvh * n_rep, len, d])
}

/// Appends this pass' keys and values to a layer's cache entry and returns the full ones.
pub fn extend_cache(
    slot: Option<&mut Option<peft_core::LayerKv>>,
    key: Tensor<4>,
    value: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    match slot {
        None => (key, value),
        Some(slot) => {
            let (k, v) = match slot.take() {
                Some(past) => (
                    Tensor::cat(vec![past.key, key], 2),
                    Tensor::cat(vec![past.value, value], 2),
                ),
                None => (key, value),
            };
            *slot = Some(peft_core::LayerKv {
                key: k.clone(),
                value: v.clone(),
            });
            (k, v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::{Device, TensorData};

    /// The fused attention equals the composed one, output and all three gradients: grouped
    /// heads, ALiBi bias, left padding (a query row that sees no key), a key/value prefix
    /// longer than the queries, and q/k/v read through strided views as the models make them.
    #[test]
    fn fused_attention_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        // 45 queries: two blocks of the kernel's 32 rows, with different key extents.
        let (b, h, kvh, q_len, prefix, d) = (2, 4, 2, 45, 3, 8);
        let kv_len = q_len + prefix;
        let padded = [vec![1i64; prefix], vec![0, 0], vec![1i64; q_len - 2]].concat();
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new([vec![1i64; kv_len], padded].concat(), [b, kv_len]),
            &device,
        );
        let allowed = attention_allowed(&mask, q_len);
        let slopes = Tensor::<1>::from_data([0.5f32, 0.25, 0.125, 0.0625], &device);
        let bias = mask.clone().cumsum(1).float().reshape([b, 1, 1, kv_len])
            * slopes.reshape([1, h, 1, 1]);
        // [b, s, heads, d] projections viewed as [b, heads, s, d], as the models do.
        let leaf = |heads: usize, len: usize| {
            Tensor::<4>::random([b, len, heads, d], Distribution::Normal(0.0, 1.0), &device)
                .require_grad()
        };
        let (q, k, v) = (leaf(h, q_len), leaf(kvh, kv_len), leaf(kvh, kv_len));
        let weights = Tensor::<4>::random([b, h, q_len, d], Distribution::Default, &device);
        let run = |fused: bool| {
            let args = (
                q.clone().swap_dims(1, 2),
                k.clone().swap_dims(1, 2),
                v.clone().swap_dims(1, 2),
            );
            let out = if fused {
                attend(args.0, args.1, args.2, 0.3, Some(bias.clone()), &allowed)
            } else {
                composed_attend(
                    args.0,
                    args.1,
                    args.2,
                    0.3,
                    Some(bias.clone()),
                    None,
                    &allowed,
                )
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).unwrap();
            (out.inner(), g(&q), g(&k), g(&v))
        };
        let (fused, composed) = (run(true), run(false));
        let diff = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
        assert!(diff(fused.0, composed.0) < 1e-5, "outputs differ");
        assert!(diff(fused.1, composed.1) < 1e-5, "∂q differs");
        assert!(diff(fused.2, composed.2) < 1e-5, "∂k differs");
        assert!(diff(fused.3, composed.3) < 1e-5, "∂v differs");
    }

    /// Attention over a fused qkv projection equals the composed attention of its three
    /// slices: output and the gradient of the projection, with ALiBi and left padding.
    #[test]
    fn packed_qkv_attention_matches_the_composed_one() {
        let device = Device::flex().autodiff();
        // 70 positions: three blocks of the kernel's 32 query rows.
        let (b, s, h, d) = (2, 70, 4, 8);
        let padded = [vec![0i64, 0], vec![1i64; s - 2]].concat();
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new([vec![1i64; s], padded].concat(), [b, s]),
            &device,
        );
        let allowed = attention_allowed(&mask, s);
        let slopes = Tensor::<1>::from_data([0.5f32, 0.25, 0.125, 0.0625], &device);
        let bias =
            mask.clone().cumsum(1).float().reshape([b, 1, 1, s]) * slopes.reshape([1, h, 1, 1]);
        let qkv = Tensor::<5>::random([b, s, h, 3, d], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let weights = Tensor::<4>::random([b, h, s, d], Distribution::Default, &device);
        let run = |fused: bool| {
            let out = if fused {
                attend_packed(qkv.clone(), 0.3, Some(bias.clone()), &allowed)
            } else {
                let [q, k, v] = split_qkv(&qkv);
                composed_attend(q, k, v, 0.3, Some(bias.clone()), None, &allowed)
            };
            let grads = (out.clone() * weights.clone()).sum().backward();
            (out.inner(), qkv.grad(&grads).unwrap())
        };
        let ((out_f, grad_f), (out_c, grad_c)) = (run(true), run(false));
        let diff: f32 = (out_f - out_c).abs().max().into_scalar();
        assert!(diff < 1e-5, "outputs differ by {diff}");
        let diff: f32 = (grad_f - grad_c).abs().max().into_scalar();
        assert!(diff < 1e-5, "∂qkv differs by {diff}");
    }
}
