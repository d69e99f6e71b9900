//! One benchmark case per process (so that peak memory does not mix), printed as one JSON line.
//!
//! ```text
//! peft-bench <case> [--device cpu|wgpu|cuda] [--quick]
//! ```
//!
//! Cases: `gemm`, `forward`, `lora-train`, `dora-train` (the same with `use_dora`),
//! `tokens-train` (trainable tokens: 16 embedding rows), `loha-train` (LoHa, PEFT's defaults),
//! `lora-forward-unmerged`, `lora-forward-merged`,
//! `lora-forward-mixed` (four adapters, one per batch row),
//! `lora-merge`, `ia3-train`, `bitfit-train`, `prompt-train`, `ptuning-train` (MLP),
//! `ptuning-lstm-train`, `prefix-train`, `prefix-proj-train`, `qlora-train` (LoRA r=8 over the
//! NF4 + double-quant base), `llama-lora-train` (LoRA r=8 on a Llama of similar size with
//! grouped-query attention: hidden 512, 4 layers, 8 heads / 2 KV heads; `mistral-`, `qwen3-`,
//! `gemma2-` and `phi3-lora-train` the same on those architectures), `lora-train-bf16` and
//! `qlora-train-bf16` (the same with bf16 compute in the linear layers), `quantize-nf4` (a
//! 4096 × 4096 f32 matrix, NF4 + double quant).
//! Training cases also report `step_peak_rss_bytes`: the peak resident memory from just before
//! the first step (after the model is built) to the end. The model is the issue's ~16M-parameter BLOOM
//! (hidden 512, 4 layers, 8 heads, vocab 8000) with random weights; the batch is 4 × 128 tokens.
//! `--quick` shrinks the batch and repetitions for a CI smoke run.
//!
//! The serving cases (`serve-generate-1`, `-4`, `-16`, `serve-load`): see [`serve`]; the load
//! and fault soak (`serve-soak [--seconds S] [--clients N]`): see [`soak`].
//!
//! The scale cases (`make-scale-model`, `scale-lora`, `scale-qlora`, `scale-generate`) run on
//! real-size checkpoints: see [`scale`].

mod scale;
mod serve;
mod soak;

/// The process's allocator, counting the bytes it holds live: the soak tells a leak (live bytes
/// climb with the requests served) from the allocator keeping freed pages (resident memory
/// rises, live bytes do not).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// `System`, plus a count of the bytes allocated and not yet freed.
struct CountingAllocator;

static LIVE_HEAP_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

// SAFETY: every call goes to `System` unchanged; the count is bookkeeping beside it.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to `System`.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_HEAP_BYTES.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_HEAP_BYTES.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as `alloc`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_HEAP_BYTES.fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            LIVE_HEAP_BYTES.fetch_add(
                new as i64 - layout.size() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        p
    }
}

/// Bytes the Rust heap holds live now (allocated and not freed).
pub(crate) fn live_heap_bytes() -> i64 {
    LIVE_HEAP_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use peft_core::{AdapterModel, CausalLm, ModelInput, NoAdapter, TrainableSummary};
use peft_models::{AnyModel, BloomConfig, HfConfig};

struct Settings {
    batch: usize,
    seq: usize,
    warmup: usize,
    reps: usize,
}

fn bloom_config() -> HfConfig {
    HfConfig::Bloom(
        serde_json::from_value(serde_json::json!({
            "model_type": "bloom", "vocab_size": 8000, "hidden_size": 512, "n_layer": 4,
            "n_head": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3
        }))
        .map(|c: BloomConfig| c)
        .expect("static config"),
    )
}

/// The architectures with a `<arch>-<method>-train` case: a model of the BLOOM case's size
/// with grouped-query attention (8 heads, 2 KV heads), untied lm_head, and what makes each
/// architecture itself (bench/bench_pytorch.py builds the same configs).
const ARCH_PREFIXES: [&str; 5] = ["llama-", "mistral-", "qwen3-", "gemma2-", "phi3-"];

/// The config of architecture `arch` (`llama`, `mistral`, `qwen3`, `gemma2`, `phi3`).
fn arch_config(arch: &str) -> HfConfig {
    let mut config = serde_json::json!({
        "model_type": arch, "vocab_size": 8000, "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3
    });
    let extra = match arch {
        // A window shorter than the sequence, so that it shapes the masks.
        "mistral" => serde_json::json!({"sliding_window": 64}),
        "qwen3" => serde_json::json!({"head_dim": 64}),
        "gemma2" => serde_json::json!({"head_dim": 64, "query_pre_attn_scalar": 64,
            "sliding_window": 64}),
        "phi3" => serde_json::json!({"partial_rotary_factor": 0.5}),
        _ => serde_json::json!({}),
    };
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    peft_models::config_from_value(config, std::path::Path::new("<bench config>"))
        .expect("static config")
}

fn base_model(device: &Device) -> AnyModel<NoAdapter> {
    base_model_with(device, &peft_models::LoadOptions::default())
}

fn arch_model(
    arch: &str,
    device: &Device,
    options: &peft_models::LoadOptions,
) -> AnyModel<NoAdapter> {
    let config = arch_config(arch);
    let store = peft_models::random_checkpoint(&config, 0).expect("random checkpoint");
    peft_models::load_from_with(&config, &store, device, options).expect("model")
}

fn base_model_with(device: &Device, options: &peft_models::LoadOptions) -> AnyModel<NoAdapter> {
    let config = bloom_config();
    let store = peft_models::random_checkpoint(&config, 0).expect("random checkpoint");
    peft_models::load_from_with(&config, &store, device, options).expect("model")
}

/// Resets the kernel's peak-RSS mark (`VmHWM`) so that the next reading covers what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Resident bits per element of the packed layers of `model` (codes + statistics).
fn packed_bits_per_param<M: CausalLm>(model: &M) -> f64 {
    let packed = peft_core::adapter_files::packed_weights(model);
    let bytes: usize = packed.iter().map(|(_, w)| w.storage_bytes()).sum();
    let numel = peft_core::adapter_files::packed_numel(model);
    bytes as f64 * 8.0 / numel.max(1) as f64
}

fn batch(s: &Settings, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let ids =
        Tensor::<2, Int>::random([s.batch, s.seq], Distribution::Uniform(4.0, 7999.0), device);
    let mask = Tensor::<2, Int>::ones([s.batch, s.seq], device);
    (ids, mask)
}

/// Runs `step` `warmup + reps` times, timing the last `reps` (each synchronised with the device).
fn time(s: &Settings, device: &Device, mut step: impl FnMut()) -> Vec<f64> {
    let mut times = Vec::with_capacity(s.reps);
    for i in 0..s.warmup + s.reps {
        let started = Instant::now();
        step();
        let _ = device.sync();
        if i >= s.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times
}

pub(crate) fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

pub(crate) fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Floating-point operations of one forward pass: 2 per multiply-add in the linear layers
/// (including the tied output projection) plus the two attention products.
fn forward_flops(model: &impl CausalLm, s: &Settings) -> f64 {
    let tokens = (s.batch * s.seq) as f64;
    let linear: usize = model
        .modules()
        .iter()
        .filter(|m| m.is_linear())
        .map(|m| match m.kind {
            peft_core::ModuleKind::Linear {
                in_features,
                out_features,
                ..
            } => in_features * out_features,
            _ => 0,
        })
        .sum();
    let spec = model.spec();
    let attention = 4.0 * (spec.num_layers * s.batch * s.seq * s.seq * spec.hidden_size) as f64;
    2.0 * linear as f64 * tokens + attention
}

fn train_step<M: CausalLm>(
    model: M,
    optim: &mut burn::optim::ModuleOptimizer,
    ids: &Tensor<2, Int>,
    mask: &Tensor<2, Int>,
) -> M {
    let loss = model
        .forward_loss(
            ModelInput::with_mask(ids.clone(), mask.clone()),
            None,
            ids.clone(),
        )
        .expect("forward");
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    optim.step(1e-4, model, grads)
}

/// Times training steps of `model` and records the resident memory before them and the peak
/// during them in `extra`.
fn timed_steps<M: CausalLm>(
    model: M,
    s: &Settings,
    device: &Device,
    optim: &mut burn::optim::ModuleOptimizer,
    (ids, mask): (&Tensor<2, Int>, &Tensor<2, Int>),
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> Vec<f64> {
    let mut model = Some(model);
    reset_peak_rss();
    extra.insert("rss_before_steps_bytes".into(), rss_bytes().into());
    let times = time(s, device, || {
        model = Some(train_step(model.take().expect("model"), optim, ids, mask));
    });
    extra.insert("step_peak_rss_bytes".into(), peak_rss_bytes().into());
    times
}

/// One training step through the adapter, for a method with training parts of its own
/// (AdaLoRA's penalty in the loss and its rank allocator after the update), as the trainer
/// takes it.
fn adapter_step<A: AdapterModel>(
    adapter: A,
    optim: &mut burn::optim::ModuleOptimizer,
    (ids, mask): (&Tensor<2, Int>, &Tensor<2, Int>),
    step: usize,
) -> A {
    let mut loss = adapter
        .model()
        .forward_loss(
            ModelInput::with_mask(ids.clone(), mask.clone()),
            None,
            ids.clone(),
        )
        .expect("forward");
    if let Some(term) = adapter.regularization().expect("regularization") {
        loss = loss + term;
    }
    let grads = GradientsParams::from_grads(loss.backward(), adapter.model());
    let kept = adapter.keep_gradients(&grads);
    let model = optim.step(1e-4, adapter.model().clone(), grads);
    adapter
        .with_model(model)
        .after_optimizer_step(step, kept)
        .expect("after the optimizer step")
}

/// [`timed_steps`] on the model inside any method's adapter ([`peft::PeftModel::visit`]).
struct TimedSteps<'a> {
    s: &'a Settings,
    device: &'a Device,
    optim: &'a mut burn::optim::ModuleOptimizer,
    batch: (&'a Tensor<2, Int>, &'a Tensor<2, Int>),
    extra: &'a mut serde_json::Map<String, serde_json::Value>,
}

impl peft::AdapterVisitor for TimedSteps<'_> {
    type Output = Vec<f64>;
    fn visit<A>(self, adapter: A) -> Vec<f64>
    where
        A: AdapterModel + Into<peft::PeftModel> + 'static,
        <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>,
    {
        // A method with training parts of its own steps through its adapter, as the trainer
        // does (AdaLoRA).
        if adapter.regularization().ok().flatten().is_some() {
            let mut adapter = Some(adapter);
            let mut step = 0;
            reset_peak_rss();
            self.extra
                .insert("rss_before_steps_bytes".into(), rss_bytes().into());
            let times = time(self.s, self.device, || {
                step += 1;
                let a = adapter.take().expect("adapter");
                adapter = Some(adapter_step(a, self.optim, self.batch, step));
            });
            self.extra
                .insert("step_peak_rss_bytes".into(), peak_rss_bytes().into());
            return times;
        }
        // The wrapper goes before the steps, so that the model's tensors have one owner each
        // (burn updates uniquely owned tensors in place).
        let model = adapter.model().clone();
        drop(adapter);
        timed_steps(
            model,
            self.s,
            self.device,
            self.optim,
            self.batch,
            self.extra,
        )
    }
}

/// The training cases (`<method>-train` and variants): the registry's method, and the values
/// set over its default config (JSON keys of `adapter_config.json`). The base is 4-bit for
/// `qlora-*` cases and computes in bf16 for `*-bf16` ones (decided where the base loads).
const TRAIN_CASES: [(&str, &str, &str); 17] = [
    ("lora-train", "lora", "{}"),
    ("dora-train", "lora", r#"{"use_dora": true}"#),
    // 16 rows of the embedding (and of the tied output layer).
    (
        "tokens-train",
        "trainable-tokens",
        r#"{"token_indices": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}"#,
    ),
    // PEFT's default LoHaConfig (r = alpha = 8 on query_key_value), as the PyTorch side.
    ("loha-train", "loha", "{}"),
    // PEFT's default LoKrConfig (r = alpha = 8 on query_key_value), as the PyTorch side.
    ("lokr-train", "lokr", "{}"),
    // PEFT's default VeraConfig (r = 256 on query_key_value), as the PyTorch side.
    ("vera-train", "vera", "{}"),
    // PEFT's default AdaLoraConfig (init_r 12, target_r 8 on query_key_value; total_step 1000,
    // so the timed steps are in the budgeting phase: the allocator scores and masks each step).
    ("adalora-train", "adalora", "{}"),
    ("lora-train-bf16", "lora", "{}"),
    // PEFT's default LoRA config over the 4-bit base, as the PyTorch side.
    ("qlora-train", "lora", "{}"),
    ("qlora-train-bf16", "lora", "{}"),
    ("ia3-train", "ia3", "{}"),
    ("prompt-train", "prompt", "{}"),
    (
        "ptuning-train",
        "ptuning",
        r#"{"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 128}"#,
    ),
    (
        "ptuning-lstm-train",
        "ptuning",
        r#"{"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 128}"#,
    ),
    ("prefix-train", "prefix", r#"{"encoder_hidden_size": 128}"#),
    (
        "prefix-proj-train",
        "prefix",
        r#"{"prefix_projection": true, "encoder_hidden_size": 128}"#,
    ),
    ("bitfit-train", "bitfit", "{}"),
];

fn adapter_bytes(save: impl FnOnce(&std::path::Path)) -> u64 {
    let dir = std::env::temp_dir().join(format!("peft-bench-{}", std::process::id()));
    save(&dir);
    let size = std::fs::metadata(dir.join("adapter_model.safetensors")).map_or(0, |m| m.len());
    let _ = std::fs::remove_dir_all(&dir);
    size
}

fn run(case: &str, s: &Settings, device: &Device) -> Result<serde_json::Value, String> {
    let mut extra = serde_json::Map::new();
    let tokens = (s.batch * s.seq) as f64;
    let (times, flops, summary): (Vec<f64>, f64, Option<TrainableSummary>) = match case {
        "gemm" => {
            let n = 1024;
            let a = Tensor::<2>::random([n, n], Distribution::Default, device);
            let b = Tensor::<2>::random([n, n], Distribution::Default, device);
            // The product the linear layers use: OpenBLAS when present (`PEFT_BLAS=off` for
            // burn's own), reported as `blas`.
            let times = time(s, device, || {
                let _ = peft_ops::matmul::matmul(a.clone(), b.clone()).into_data();
            });
            extra.insert(
                "blas".into(),
                peft_ops::blas::blas()
                    .map_or("none".into(), |b| b.name.clone())
                    .into(),
            );
            (times, 2.0 * (n * n * n) as f64, None)
        }
        "quantize-nf4" => {
            let n = if s.batch == 1 { 1024 } else { 4096 };
            let values: Vec<f32> =
                Tensor::<1>::random([n * n], Distribution::Normal(0.0, 0.02), device)
                    .into_data()
                    .try_to_vec::<f32>()
                    .map_err(|e| format!("{e:?}"))?;
            let config = peft_quant::QuantConfig::default();
            let mut bits = 0.0;
            let times = time(s, device, || {
                let q = peft_quant::Quantized4bit::quantize(
                    &values,
                    &[n, n],
                    peft_quant::SourceDtype::F32,
                    config,
                )
                .expect("quantize");
                bits = q.bits_per_param();
            });
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let bytes = (n * n * 4) as f64;
            extra.insert("input_bytes".into(), bytes.into());
            extra.insert(
                "gb_per_s".into(),
                (bytes / 1e9 / sorted[sorted.len() / 2]).into(),
            );
            extra.insert("bits_per_param".into(), bits.into());
            (times, 0.0, None)
        }
        "forward" => {
            let model = base_model(device);
            let (ids, mask) = batch(s, device);
            let flops = forward_flops(&model, s);
            let times = time(s, device, || {
                let _ = model.forward(ModelInput::with_mask(ids.clone(), mask.clone()), None);
            });
            (times, flops, None)
        }
        "lora-forward-unmerged" | "lora-forward-merged" | "lora-merge" => {
            let config = peft_lora::LoraConfig {
                init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
                ..peft_lora::LoraConfig::default()
            };
            let lora =
                peft_lora::get_peft_model(base_model(device), config).map_err(|e| e.to_string())?;
            let (ids, mask) = batch(s, device);
            let flops = forward_flops(&lora.model, s);
            match case {
                "lora-merge" => {
                    let mut holder = Some(lora);
                    let times = time(s, device, || {
                        let l = holder
                            .take()
                            .expect("model")
                            .merge_adapter()
                            .expect("merge");
                        holder = Some(l.unmerge_adapter().expect("unmerge"));
                    });
                    // Each repetition merges and unmerges: half of it is the merge.
                    (times.iter().map(|t| t / 2.0).collect(), 0.0, None)
                }
                "lora-forward-merged" => {
                    let merged = lora.merge_adapter().map_err(|e| e.to_string())?;
                    let times = time(s, device, || {
                        let _ = merged
                            .model
                            .forward(ModelInput::with_mask(ids.clone(), mask.clone()), None);
                    });
                    (times, flops, None)
                }
                _ => {
                    let times = time(s, device, || {
                        let _ = lora
                            .model
                            .forward(ModelInput::with_mask(ids.clone(), mask.clone()), None);
                    });
                    (times, flops, None)
                }
            }
        }
        "lora-forward-mixed" => {
            // Four LoRA adapters (PEFT's default config, random B) on one base, one per batch
            // row (cycled): the mixed-adapter batch, against `lora-forward-unmerged`'s one.
            let mut multi =
                peft_lora::MultiLoraModel::new(base_model(device)).map_err(|e| e.to_string())?;
            let names = ["a0", "a1", "a2", "a3"];
            for name in names {
                let config = peft_lora::LoraConfig {
                    init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
                    ..peft_lora::LoraConfig::default()
                };
                multi.add_adapter(name, config).map_err(|e| e.to_string())?;
            }
            let rows: Vec<&str> = (0..s.batch).map(|i| names[i % names.len()]).collect();
            multi
                .set_row_adapters(Some(&rows))
                .map_err(|e| e.to_string())?;
            let (ids, mask) = batch(s, device);
            let flops = forward_flops(&multi.model, s);
            let times = time(s, device, || {
                let _ = multi
                    .model
                    .forward(ModelInput::with_mask(ids.clone(), mask.clone()), None);
            });
            (times, flops, None)
        }
        "burn-lora-train" => {
            // burn 0.22's own LoRA (`Module::apply_lora`) on the same model, adapting the same
            // 2-D weights as PEFT's default for BLOOM (`query_key_value`), r = 8, α = 8.
            let device = device.clone().autodiff();
            let (ids, mask) = batch(s, &device);
            let mut optim = AdamWConfig::new().init();
            let base = base_model_with(&device, &peft_models::LoadOptions::default());
            let flops = 2.0 * forward_flops(&base, s);
            let lora = burn::module::Lora::new(8, 8.0)
                .set_param_group(burn::module::ParamGroup::from_predicate("query_key_value"));
            let model = burn::module::Module::apply_lora(base, lora);
            let times = timed_steps(model, s, &device, &mut optim, (&ids, &mask), &mut extra);
            (times, flops, None)
        }
        train_case if train_case.contains("-train") => {
            // `<arch>-<method>-train` runs `<method>-train` on that architecture at a similar
            // size; `<method>-train-gc` with burn's gradient checkpointing.
            let arch = ARCH_PREFIXES
                .iter()
                .find(|p| case.starts_with(*p))
                .map(|p| p.trim_end_matches('-'));
            let method = arch.map_or(case, |a| &case[a.len() + 1..]);
            let checkpointing = method.ends_with("-gc");
            let method = method.strip_suffix("-gc").unwrap_or(method);
            let device = if checkpointing {
                device.clone().autodiff().gradient_checkpointing()
            } else {
                device.clone().autodiff()
            };
            let (ids, mask) = batch(s, &device);
            let mut optim = AdamWConfig::new().init();
            let options = peft_models::LoadOptions {
                quantize: method
                    .starts_with("qlora")
                    .then(peft_quant::QuantConfig::default),
                compute_dtype: if method.ends_with("-bf16") {
                    peft_core::ComputeDtype::Bf16
                } else {
                    peft_core::ComputeDtype::F32
                },
                // The PyTorch side of `lora-train-bf16` is torch.autocast, which computes
                // lm_head in bf16; that of `qlora-train-bf16` keeps it f32 (bitsandbytes'
                // compute dtype covers the 4-bit layers only).
                bf16_lm_head: method == "lora-train-bf16",
                ..peft_models::LoadOptions::default()
            };
            let base = match arch {
                Some(arch) => arch_model(arch, &device, &options),
                None => base_model_with(&device, &options),
            };
            extra.insert(
                "compute_dtype".into(),
                options.compute_dtype.torch_name().into(),
            );
            if options.quantize.is_some() {
                extra.insert(
                    "resident_bits_per_quantized_param".into(),
                    packed_bits_per_param(&base).into(),
                );
            }
            let flops = 2.0 * forward_flops(&base, s);
            let (method, values) = TRAIN_CASES
                .iter()
                .find(|(name, _, _)| *name == method)
                .map(|(_, method, values)| (*method, *values))
                .ok_or_else(|| format!("unknown case `{case}`"))?;
            let mut config = peft::by_name(method)
                .and_then(|m| m.config(None))
                .and_then(|c| c.with_values(serde_json::from_str(values).expect("static JSON")))
                .map_err(|e| e.to_string())?;
            // Phi-3 has no PEFT default: its fused attention projection.
            if arch == Some("phi3") {
                config.apply(&peft::ConfigOverrides {
                    target_modules: Some(peft_core::TargetModules::List(vec!["qkv_proj".into()])),
                    ..Default::default()
                });
            }
            let adapter = peft::get_peft_model(base, config).map_err(|e| e.to_string())?;
            extra.insert(
                "adapter_file_bytes".into(),
                adapter_bytes(|dir| adapter.save_pretrained(dir).expect("save")).into(),
            );
            let summary = adapter.trainable_summary();
            let times = adapter.visit(TimedSteps {
                s,
                device: &device,
                optim: &mut optim,
                batch: (&ids, &mask),
                extra: &mut extra,
            });
            (times, flops, Some(summary))
        }
        other => return Err(format!("unknown case `{other}`")),
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mut out = serde_json::json!({
        "case": case,
        "impl": "peft-rs",
        "device": format!("{device:?}"),
        "batch": s.batch,
        "seq": s.seq,
        "times_s": times,
        "median_s": median,
        "min_s": sorted[0],
        "max_s": sorted[sorted.len() - 1],
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let obj = out.as_object_mut().expect("object");
    if flops > 0.0 {
        obj.insert("gflop".into(), (flops / 1e9).into());
        obj.insert("gflop_per_s".into(), (flops / 1e9 / median).into());
    }
    if !matches!(case, "gemm" | "lora-merge" | "quantize-nf4") {
        obj.insert("tokens_per_s".into(), (tokens / median).into());
    }
    if let Some(summary) = summary {
        obj.insert("trainable_params".into(), summary.trainable.into());
        obj.insert("all_params".into(), summary.all.into());
    }
    obj.extend(extra);
    Ok(out)
}

fn main() -> ExitCode {
    // SAFETY: first statement of `main`, before any thread is started.
    unsafe { peft_ops::process::prepare() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(case) = args.first() else {
        eprintln!("usage: peft-bench <case> [--device cpu|wgpu|cuda] [--quick]");
        return ExitCode::FAILURE;
    };
    let quick = args.iter().any(|a| a == "--quick");
    let device_name = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map_or("cpu", String::as_str);
    let device = match peft_ops::device::parse_device(device_name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = if quick {
        Settings {
            batch: 1,
            seq: 32,
            warmup: 1,
            reps: 2,
        }
    } else {
        Settings {
            batch: 4,
            seq: 128,
            warmup: 2,
            reps: 10,
        }
    };
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let result = match case.as_str() {
        "make-scale-model" => match (args.get(1), args.get(2)) {
            (Some(shape), Some(dir)) => scale::make_model(shape, Path::new(dir)),
            _ => Err("usage: peft-bench make-scale-model <shape> <dir>".into()),
        },
        // Each case computes as `peft` does by default: generation in the checkpoint's dtype
        // where the CPU has bf16 units (`auto`), training in f32.
        "scale-lora" | "scale-qlora" | "scale-generate" => match (
            value("--model"),
            value("--compute-dtype").map_or_else(
                || match (case.as_str(), value("--model")) {
                    ("scale-generate", Some(dir)) => {
                        Ok(peft_models::auto_compute_dtype(&dir, &device))
                    }
                    _ => Ok(peft_ops::precision::ComputeDtype::F32),
                },
                |name| name.parse(),
            ),
        ) {
            (None, _) => Err(format!(
                "usage: peft-bench {case} --model DIR [--steps N] [--compute-dtype D]"
            )),
            (_, Err(e)) => Err(format!("--compute-dtype: {e}")),
            (Some(dir), Ok(compute)) if case == "scale-generate" => {
                scale::generate(Path::new(&dir), compute, &device)
            }
            (Some(dir), Ok(compute)) => {
                let steps = value("--steps").and_then(|s| s.parse().ok()).unwrap_or(3);
                let options = peft_models::LoadOptions {
                    compute_dtype: compute,
                    widen_half: args.iter().any(|a| a == "--widen-frozen"),
                    bf16_lm_head: args.iter().any(|a| a == "--bf16-lm-head"),
                    ..peft_models::LoadOptions::default()
                };
                scale::train(case, Path::new(&dir), steps, options, &device)
            }
        },
        "serve-load" => serve::load_test(quick, &workspace_root()),
        // The soak's server process (started by `serve-soak`).
        "serve-soak-server" => match soak::serve_child(&args, &workspace_root()) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => Err(e),
        },
        // `--seconds` / `--clients` (cargo xtask soak); as a bench case 30 s × 64 clients, or a
        // few seconds × 16 with --quick.
        "serve-soak" => {
            let (seconds, clients) = if quick { (6.0, 16) } else { (30.0, 64) };
            soak::run(
                soak::SoakSettings {
                    seconds: value("--seconds")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(seconds),
                    clients: value("--clients")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(clients),
                },
                &workspace_root(),
            )
        }
        serve_case if serve_case.starts_with("serve-generate-") => {
            match serve_case["serve-generate-".len()..].parse() {
                Ok(n) if n > 0 => serve::generate(n, quick, &device),
                _ => Err(format!(
                    "{case}: serve-generate-<adapters>, e.g. serve-generate-4"
                )),
            }
        }
        _ => run(case, &settings, &device),
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (fixtures of the load test), from this crate's manifest folder.
fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
