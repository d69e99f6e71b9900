//! Helpers shared by the integration tests: fixture paths, the device under test, and tensor
//! comparison.

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::TensorStore;

/// `tests/fixtures` of the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fixture model folder (`bloom-tiny`, `llama-tiny`, `qwen2-tiny`).
pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The device the tests run on: `PEFT_DEVICE=cpu|wgpu|cuda` (default `cpu`, burn's flex backend).
pub fn device() -> Device {
    let name = std::env::var("PEFT_DEVICE").unwrap_or_else(|_| "cpu".into());
    peft_cli_device(&name)
}

fn peft_cli_device(name: &str) -> Device {
    peft_ops::device::parse_device(name).unwrap_or_else(|e| panic!("PEFT_DEVICE: {e}"))
}

/// The reference batch recorded by the fixture script for `name`.
pub struct Reference {
    /// `[batch, seq]` ids (left-padded).
    pub input_ids: Vec<i64>,
    /// `[batch, seq]` mask.
    pub attention_mask: Vec<i64>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
    /// `[batch, seq, vocab]` logits from transformers.
    pub logits: Vec<f32>,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Reference {
    /// Reads `reference/<name>.safetensors`.
    pub fn load(name: &str) -> Self {
        Self::load_logits(name, "logits")
    }

    /// Reads `reference/<name>.safetensors` with the logits stored under `key`.
    pub fn load_logits(name: &str, key: &str) -> Self {
        let store = TensorStore::open(
            fixtures()
                .join("reference")
                .join(format!("{name}.safetensors")),
        )
        .expect("reference file");
        let (input_ids, shape) = store.i64("input_ids").unwrap();
        let (attention_mask, _) = store.i64("attention_mask").unwrap();
        let (logits, lshape) = store.f32(key).unwrap();
        Self {
            input_ids,
            attention_mask,
            shape: [shape[0], shape[1]],
            logits,
            vocab: lshape[2],
        }
    }

    /// Largest |Δ| between `ours` and these logits on the real (mask = 1) positions.
    pub fn max_diff(&self, ours: &[f32]) -> f32 {
        max_diff_masked(ours, &self.logits, &self.attention_mask, self.vocab)
    }

    /// The attention mask with `n` leading ones per row: PEFT's mask over prompt tuning's and
    /// P-tuning's logits, whose `n` virtual positions come first.
    pub fn mask_with_virtual(&self, n: usize) -> Vec<i64> {
        let [batch, seq] = self.shape;
        let mut out = Vec::with_capacity(batch * (n + seq));
        for row in self.attention_mask.chunks(seq) {
            out.extend(std::iter::repeat_n(1, n));
            out.extend_from_slice(row);
        }
        out
    }

    /// The ids as a tensor on `device`.
    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.input_ids.clone(), self.shape), device)
    }

    /// The mask as a tensor on `device`.
    pub fn mask(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(
            TensorData::new(self.attention_mask.clone(), self.shape),
            device,
        )
    }
}

/// Reads a float tensor back to the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec_as::<f32>().expect("float tensor")
}

/// Largest |a - b| over the positions whose mask is 1 (`mask` is `[batch, seq]`, values
/// `[batch, seq, width]`).
pub fn max_diff_masked(a: &[f32], b: &[f32], mask: &[i64], width: usize) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let mut worst = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        let range = pos * width..(pos + 1) * width;
        for (x, y) in a[range.clone()].iter().zip(&b[range]) {
            let d = (x - y).abs();
            assert!(d.is_finite(), "non-finite logits at position {pos}");
            worst = worst.max(d);
        }
    }
    worst
}

/// Largest |Δ| between `ours` and the logits stored under `key` in `reference/<name>`, on its
/// real positions.
pub fn max_diff_to(ours: &[f32], name: &str, key: &str) -> f32 {
    Reference::load_logits(name, key).max_diff(ours)
}

/// A PEFT adapter fixture folder (`lora-bloom`, `ia3-llama`, ...).
pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

/// A copy of the adapter fixture `name` in a temporary folder with `from` replaced by `to` in
/// its `adapter_config.json` (the tensors unchanged): a folder whose config disagrees with its
/// file.
pub fn adapter_with_config_edit(name: &str, from: &str, to: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        adapter_dir(name).join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(adapter_dir(name).join("adapter_config.json")).unwrap();
    assert!(config.contains(from), "{name}'s config has no `{from}`");
    std::fs::write(
        dir.path().join("adapter_config.json"),
        config.replace(from, to),
    )
    .unwrap();
    dir
}

/// The base model fixture an adapter fixture was made on.
pub fn base_of(adapter: &str) -> &'static str {
    const BASES: [(&str, &str); 8] = [
        ("llama-rope-llama3", "llama-rope-llama3"),
        ("gemma2", "gemma2-tiny"),
        ("phi3", "phi3-tiny"),
        ("qwen2-tiny-swa", "qwen2-tiny-swa"),
        ("mistral", "mistral-tiny"),
        ("qwen3", "qwen3-tiny"),
        ("llama", "llama-tiny"),
        ("bloom", "bloom-tiny"),
    ];
    BASES
        .iter()
        .find(|(marker, _)| adapter.contains(marker))
        .map_or("bloom-tiny", |(_, base)| base)
}

/// Asserts that `model`'s logits on reference batch `name` are within `tolerance` of the
/// recorded ones on every real (mask = 1) position; returns the largest difference.
pub fn assert_logits_match<M: peft_core::CausalLm>(model: &M, name: &str, tolerance: f32) -> f32 {
    let reference = Reference::load(name);
    let ours = logits(model, &reference);
    // Prompt tuning's and P-tuning's logits start with their virtual positions, as PEFT's do.
    let [batch, seq] = reference.shape;
    let n_virtual = (ours.len() / reference.vocab / batch).saturating_sub(seq);
    let diff = max_diff_masked(
        &ours,
        &reference.logits,
        &reference.mask_with_virtual(n_virtual),
        reference.vocab,
    );
    eprintln!("{name}: max |Δ| = {diff}");
    assert!(diff <= tolerance, "{name}: max |Δ| = {diff}");
    diff
}

/// The logits of `model` on a reference batch.
pub fn logits<M: peft_core::CausalLm>(model: &M, reference: &Reference) -> Vec<f32> {
    let device = model.device();
    let input = peft_core::ModelInput::with_mask(reference.ids(&device), reference.mask(&device));
    to_vec(model.forward(input, None).expect("forward pass"))
}

/// `reference/<name>.json`.
pub fn reference_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference json")).expect("json")
}

/// `‖a − b‖ / ‖b‖`.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den
}

/// Largest |a − b| between two host tensors' values.
pub fn max_abs_diff(a: &peft_core::HostTensor, b: &peft_core::HostTensor) -> f32 {
    let a = peft_tensors::bytes_to_f32(a.dtype, &a.data).expect("float tensor");
    let b = peft_tensors::bytes_to_f32(b.dtype, &b.data).expect("float tensor");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// One AdamW step (lr 1e-2, wd 0.01, eps 1e-8, betas 0.9/0.999) of `model` on the batch of a
/// `reference/<name>-train.safetensors` file, compared with PyTorch's: the loss (relative 1e-5),
/// then the gradient and the updated value of every tensor the file has (relative 1e-4).
/// `file_key` maps a parameter's HF name to its key in the file and whether the parameter is
/// stored transposed relative to PyTorch (`None` = not trained). Returns how many tensors were
/// checked.
pub fn assert_adamw_step_matches<M: peft_core::CausalLm>(
    model: M,
    train: &str,
    file_key: impl Fn(&str) -> Option<(String, bool)>,
) -> usize {
    use burn::optim::{AdamWConfig, GradientsParams};
    use peft_ops::loss::causal_lm_loss;

    let store = TensorStore::open(
        fixtures()
            .join("reference")
            .join(format!("{train}.safetensors")),
    )
    .expect("training reference");
    let device = model.device();
    let (ids, shape) = store.i64("input_ids").unwrap();
    let (mask, _) = store.i64("attention_mask").unwrap();
    let shape = [shape[0], shape[1]];
    let tensor = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, shape), &device);
    let logits = model
        .forward(
            peft_core::ModelInput::with_mask(tensor(ids.clone()), tensor(mask)),
            None,
        )
        .unwrap();
    let loss = causal_lm_loss(logits, tensor(ids));
    let ours: f32 = loss.clone().into_scalar();
    let theirs = store.f32("loss").unwrap().0[0];
    assert!(
        ((ours - theirs) / theirs).abs() <= 1e-5,
        "loss {ours} vs PyTorch {theirs}"
    );

    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let params = peft_core::params::named_params(&model);
    let mut checked = Vec::new();
    for p in &params {
        let Some((key, transposed)) = file_key(&p.name) else {
            continue;
        };
        let grad = match p.shape.len() {
            1 => grads.get::<1>(p.id).map(to_vec),
            2 => grads
                .get::<2>(p.id)
                .map(|g| to_vec(if transposed { g.transpose() } else { g })),
            _ => None,
        };
        let grad = grad.unwrap_or_else(|| panic!("{} received no gradient", p.name));
        let (expected, _) = store.f32(&format!("grad.{key}")).unwrap();
        let err = relative_error(&grad, &expected);
        assert!(err <= 1e-4, "{key}: gradient relative error {err}");
        checked.push(key);
    }
    let in_file = store.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        checked.len(),
        in_file,
        "every gradient PyTorch recorded is checked"
    );
    // Frozen parameters of any rank (biases and norms are 1-D, weights 2-D).
    let has_grad = |p: &peft_core::params::NamedParam| match p.shape.len() {
        1 => grads.get::<1>(p.id).is_some(),
        2 => grads.get::<2>(p.id).is_some(),
        3 => grads.get::<3>(p.id).is_some(),
        4 => grads.get::<4>(p.id).is_some(),
        rank => panic!("{}: unexpected rank {rank}", p.name),
    };
    let frozen = params
        .iter()
        .filter(|p| file_key(&p.name).is_none())
        .find(|p| has_grad(p));
    assert!(
        frozen.is_none(),
        "frozen {:?} received a gradient",
        frozen.map(|p| &p.name)
    );

    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    let stepped = optim.step(1e-2, model, grads);
    let linear_weights: Vec<String> = params
        .iter()
        .filter(|p| p.is_linear_weight)
        .map(|p| p.name.clone())
        .collect();
    for (name, mut value) in peft_core::params::named_values(&stepped).unwrap() {
        let Some((key, transposed)) = file_key(&name) else {
            continue;
        };
        // named_values already gives burn `Linear` weights in PyTorch's layout; other transposed
        // parameters (LoRA's `[in, r]`, an LSTM's `[in, 4h]`) are still in burn's.
        if transposed && !linear_weights.contains(&name) && value.shape.len() == 2 {
            value = peft_tensors::layout::transpose_host(&value);
        }
        let mut ours = peft_tensors::bytes_to_f32(value.dtype, &value.data).unwrap();
        let (expected, _) = store.f32(&format!("after.{key}")).unwrap();
        // Some gradients are zero analytically (a key bias shifts every score of a row alike,
        // which softmax ignores) and only rounding noise numerically; Adam turns noise into a
        // full ±lr step of random sign in both frameworks. Such elements are checked to move by
        // at most one step, the others compared exactly.
        let (grad, _) = store.f32(&format!("grad.{key}")).unwrap();
        let (before, _) = store.f32(&format!("before.{key}")).unwrap();
        let scale = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        for i in 0..ours.len() {
            if grad[i].abs() <= 1e-5 * scale {
                let moved = (ours[i] - before[i]).abs();
                assert!(
                    moved <= 1.01e-2 + 1e-4 * before[i].abs(),
                    "{key}[{i}] moved {moved}"
                );
                ours[i] = expected[i];
            }
        }
        let err = relative_error(&ours, &expected);
        assert!(
            err <= 1e-4,
            "{key}: value after AdamW, relative error {err}"
        );
    }
    checked.len()
}

/// A few Chinese and English chat turns, tokenised with the tokenizer of fixture `model`.
pub fn chat_data(model: &str) -> Vec<peft_train::Tokenized> {
    use peft_train::data::chat_prompt;
    let tokenizer = peft_models::Tokenizer::from_dir(model_dir(model)).expect("fixture tokenizer");
    let examples: Vec<peft_train::Example> = [
        ("你好", "你好！"),
        ("Hello", "Hello!"),
        ("Who are you?", "A bot."),
    ]
    .iter()
    .map(|(q, a)| peft_train::Example {
        prompt: chat_prompt(q, ""),
        response: a.to_string(),
        ..Default::default()
    })
    .collect();
    peft_train::tokenize_all(
        std::path::Path::new("inline"),
        &examples,
        &tokenizer,
        Some(2),
        64,
    )
    .expect("tokenised")
}

/// Trains `adapter` for 10 steps at `learning_rate` on `data` and asserts that the loss on it
/// drops by more than 0.1; returns the trained adapter.
pub fn assert_training_lowers_loss<A: peft_core::AdapterModel>(
    adapter: A,
    data: &[peft_train::Tokenized],
    learning_rate: f64,
) -> A {
    let before = peft_train::evaluate(adapter.model(), data, 4, 3).expect("evaluate");
    let config = peft_train::TrainConfig {
        learning_rate,
        max_steps: Some(10),
        ..peft_train::TrainConfig::default()
    };
    let out = tempfile::tempdir().expect("temp dir");
    let (trained, _) = peft_train::train(
        adapter,
        data,
        3,
        &config,
        out.path(),
        peft_train::Resume::No,
        &mut |_| {},
    )
    .expect("training");
    let after = peft_train::evaluate(trained.model(), data, 4, 3).expect("evaluate");
    assert!(after < before - 0.1, "loss {before} → {after}");
    trained
}

/// Asserts that two sets of named parameters have the same names and values within 1e-6
/// relative (1e-3 absolute floor): what two training runs that must agree produce.
pub fn assert_params_close(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    what: &str,
) {
    assert_params_within(a, b, what, 1e-6);
}

/// [`assert_params_close`] within `tolerance` relative (1e-3 absolute floor).
pub fn assert_params_within(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    what: &str,
    tolerance: f32,
) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (key, x) in a {
        let worst = x
            .iter()
            .zip(&b[key])
            .map(|(p, q)| (p - q).abs() / p.abs().max(q.abs()).max(1e-3))
            .fold(0f32, f32::max);
        assert!(
            worst <= tolerance,
            "{what}: {key} differs by {worst:e} (relative)"
        );
    }
}

/// Asserts that `adapter_config.json` of the adapter fixture `name` (written by PEFT) reads as
/// `C` and writes back with every key of the file and its value (a number compared as a
/// number: Python writes `8` where the field is a float).
pub fn assert_config_reads_back<C: peft_core::MethodConfig>(name: &str) {
    let path = adapter_dir(name).join("adapter_config.json");
    let config = C::from_file(&path).unwrap();
    assert_json_keeps_keys(&path, &serde_json::to_value(&config).unwrap());
}

/// Whether two JSON values are equal with numbers compared as numbers, at any depth (Python
/// writes `4` where a Rust float field writes `4.0`).
pub fn json_same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_same(v, w)))
        }
        _ => a == b,
    }
}

/// Asserts that `ours` holds every key of the JSON file `path` with its value ([`json_same`]).
pub fn assert_json_keeps_keys(path: &std::path::Path, ours: &serde_json::Value) {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for (key, value) in file.as_object().unwrap() {
        let same = json_same(&ours[key], value);
        assert!(
            same,
            "{}: `{key}` is {value} in the file, {} read back",
            path.display(),
            ours[key]
        );
    }
}
