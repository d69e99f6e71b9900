//! The training loop shared by every method: AdamW, learning-rate schedules with warm-up,
//! gradient accumulation, global gradient-norm clipping, evaluation, metrics, and checkpoints that
//! resume exactly.
//!
//! The loop sees a method only through [`AdapterModel`]: it trains the parameters the method
//! names and saves through the method's own `save_pretrained`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use peft_core::params::{named_params, named_values, set_values, with_stable_ids};
use peft_core::{AdapterModel, CausalLm, ModelInput, PeftError};
use peft_tensors::{TensorStore, save_safetensors, write_atomic};

use crate::data::{HostBatch, Tokenized, collate, epoch_order};
use crate::distributed::{Collective, SingleProcess, rank_micro_batches};
use crate::error::TrainError;

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to zero (HF Trainer's default).
    #[default]
    Linear,
    /// Cosine decay to zero.
    Cosine,
}

/// Training settings (HF `TrainingArguments` names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Passes over the training set (ignored when `max_steps` is set).
    pub num_train_epochs: usize,
    /// Optimizer steps to run, overriding the epochs.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// Schedule after warm-up.
    pub lr_scheduler_type: Schedule,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β₁.
    pub adam_beta1: f64,
    /// Adam β₂.
    pub adam_beta2: f64,
    /// Adam ε.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps.
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints (oldest removed first).
    pub save_total_limit: Option<usize>,
    /// Log the training loss every this many steps.
    pub logging_steps: usize,
    /// Where the run's inputs came from, recorded in every checkpoint and compared on resume
    /// (filled in by the caller that read them; empty when unknown).
    #[serde(default)]
    pub sources: RunSources,
}

/// The identity of a run's inputs, as far as its caller knows them: a resume refuses another base
/// model and warns about changed data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSources {
    /// The base model: a hash of its `config.json` (see [`fingerprint_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The training data file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataFingerprint>,
}

/// A data file as a resume recognises it: its path, size and the hash of its first MiB (cheap
/// for any size, and enough to tell an edited or replaced file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// The path the run was given.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// [`fingerprint_file`] of the file.
    pub head_hash: String,
}

impl DataFingerprint {
    /// The fingerprint of the file at `path`.
    pub fn of(path: &Path) -> Result<Self, TrainError> {
        let size = std::fs::metadata(path).map_err(io_err(path))?.len();
        Ok(Self {
            path: path.display().to_string(),
            size,
            head_hash: fingerprint_file(path)?,
        })
    }
}

/// FNV-1a (64 bits, hex) of the first MiB of the file at `path`: an identity for resume checks,
/// not a cryptographic hash.
pub fn fingerprint_file(path: &Path) -> Result<String, TrainError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut head = Vec::with_capacity(1 << 20);
    file.take(1 << 20)
        .read_to_end(&mut head)
        .map_err(io_err(path))?;
    let hash = head.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    Ok(format!("{hash:016x}"))
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            num_train_epochs: 1,
            max_steps: None,
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            warmup_steps: 0,
            lr_scheduler_type: Schedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 42,
            save_steps: None,
            save_total_limit: None,
            logging_steps: 1,
            sources: RunSources::default(),
        }
    }
}

impl TrainConfig {
    /// Optimizer steps of a run over `n_train` examples.
    pub fn total_steps(&self, n_train: usize) -> usize {
        self.max_steps.unwrap_or_else(|| {
            let micro = n_train.div_ceil(self.per_device_train_batch_size.max(1));
            micro.div_ceil(self.gradient_accumulation_steps.max(1)) * self.num_train_epochs
        })
    }

    /// This config as one process sees a data-parallel run of `ranks` ranks, each running this
    /// config: every rank's micro-batches are accumulated into each optimizer step.
    pub fn across_ranks(&self, ranks: usize) -> TrainConfig {
        TrainConfig {
            gradient_accumulation_steps: self.gradient_accumulation_steps * ranks.max(1),
            ..self.clone()
        }
    }

    /// The learning rate of optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let peak = self.learning_rate;
        if step < self.warmup_steps {
            return peak * step as f64 / self.warmup_steps as f64;
        }
        let decay_steps = total.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        match self.lr_scheduler_type {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - progress),
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, reason: &str| {
            Err(TrainError::Config(format!("invalid `{field}`: {reason}")))
        };
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", "must be a positive number");
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "batch size / gradient_accumulation_steps",
                "must be at least 1",
            );
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.num_train_epochs == 0) {
            return bad("max_steps / num_train_epochs", "nothing to train");
        }
        if self.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return bad("max_grad_norm", "must be positive");
        }
        Ok(())
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Peft(PeftError::io(path, e))
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An optimizer step finished.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in the run.
        total: usize,
        /// Mean training loss of the step's micro-batches.
        loss: f32,
        /// Learning rate used.
        lr: f64,
        /// Global L2 norm of the accumulated gradients before clipping (HF Trainer's
        /// `grad_norm`); `None` when clipping is off.
        grad_norm: Option<f64>,
        /// Real tokens per second over the step.
        tokens_per_s: f64,
    },
    /// A checkpoint was written.
    Checkpoint(PathBuf),
}

/// The numbers of a finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps done (in this and earlier, resumed runs).
    pub steps: usize,
    /// Set when [`request_stop`] ended the run early: the checkpoint written at that step.
    pub interrupted: Option<PathBuf>,
    /// Loss of the last step.
    pub final_train_loss: f32,
    /// `(step, loss)` of every step.
    pub history: Vec<(usize, f32)>,
}

/// The state of a run saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    global_step: usize,
    config: TrainConfig,
    history: Vec<(usize, f32)>,
    /// Where the run's random draws stand. Absent in checkpoints written before it existed
    /// (those runs drew nothing they could not replay without dropout).
    #[serde(default)]
    rng: Option<RngState>,
    /// The adapter's config (method included) as `adapter_config.json` holds it. Absent in
    /// checkpoints written before it existed (their resume checks shapes alone).
    #[serde(default)]
    adapter: Option<serde_json::Value>,
}

/// The keys of an adapter config that say where things are, not what is trained: a resume may
/// change them.
const LOCATION_KEYS: [&str; 3] = ["base_model_name_or_path", "revision", "inference_mode"];

/// Refuses to resume from a checkpoint of another run: another method or adapter config (rank,
/// targets, …), another base model; warns when the data file changed.
fn check_same_run(
    dir: &Path,
    saved: &TrainerState,
    adapter: &serde_json::Value,
    sources: &RunSources,
) -> Result<(), TrainError> {
    let refuse = |reason: String| TrainError::Checkpoint {
        path: dir.join(STATE_FILE),
        reason,
    };
    if let Some(saved_adapter) = &saved.adapter {
        let fields = |v: &serde_json::Value| -> BTreeMap<String, serde_json::Value> {
            v.as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !LOCATION_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let (then, now) = (fields(saved_adapter), fields(adapter));
        let null = serde_json::Value::Null;
        let differences: Vec<String> = then
            .keys()
            .chain(now.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| then.get(*k) != now.get(*k))
            .map(|k| {
                format!(
                    "`{k}` is {} in the checkpoint but {} in this run",
                    then.get(k).unwrap_or(&null),
                    now.get(k).unwrap_or(&null)
                )
            })
            .collect();
        if !differences.is_empty() {
            return Err(refuse(format!(
                "the checkpoint trained another adapter: {}; resume with the same method and \
                 adapter settings, or start a new run in another --output",
                differences.join("; ")
            )));
        }
    }
    let then = &saved.config.sources;
    if let (Some(a), Some(b)) = (&then.base_model, &sources.base_model)
        && a != b
    {
        return Err(refuse(format!(
            "the checkpoint trained another base model (config.json hash {a}, this run's is \
             {b}); resume over the model it was trained on"
        )));
    }
    if let (Some(a), Some(b)) = (&then.data, &sources.data)
        && a != b
    {
        tracing::warn!(
            "the training data changed since the checkpoint ({} of {} bytes, hash {} then; {} of \
             {} bytes, hash {} now): the resumed run is not the run it continues",
            a.path,
            a.size,
            a.head_hash,
            b.path,
            b.size,
            b.head_hash
        );
    }
    Ok(())
}

/// Every random draw of a run, as data: the data order is a function of `(seed, epoch)` and the
/// thread's dropout generator (dropout masks, the only other draw during training,
/// [`peft_core::dropout`]) is seeded before each micro-batch from `(seed, micro-batch index)`.
/// Restoring these two numbers restores every draw, on any backend and any number of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct RngState {
    /// The run's seed (data order and dropout).
    seed: u64,
    /// Micro-batches consumed so far (the next one draws with `micro_batch_seed(seed, this)`).
    micro_batches_done: usize,
}

/// Forgets the thread's dropout generator when a run ends, however it ends, so that dropout
/// outside the trainer draws from burn's generator again.
struct UnseedDropoutOnDrop;

impl Drop for UnseedDropoutOnDrop {
    fn drop(&mut self) {
        peft_core::dropout::unseed_thread();
    }
}

/// The seed of the thread's dropout generator for micro-batch `index` of a run seeded with `seed`:
/// SplitMix64's finaliser over the pair, so neighbouring indices give unrelated streams.
pub fn micro_batch_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed
        ^ (index as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const STATE_FILE: &str = "trainer_state.json";
const TRAINABLE_FILE: &str = "trainable_state.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.bin";

/// The host batch as tensors on `device`.
fn to_device(
    batch: &HostBatch,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2, Int>) {
    let t =
        |v: &Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v.clone(), batch.shape), device);
    (
        t(&batch.input_ids),
        t(&batch.attention_mask),
        t(&batch.labels),
    )
}

/// Mean loss of `model` over `data` (no gradients), in batches of `batch_size`.
pub fn evaluate<M: CausalLm>(
    model: &M,
    data: &[Tokenized],
    batch_size: usize,
    pad_id: u32,
) -> Result<f32, PeftError> {
    let device = model.device();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in data.chunks(batch_size.max(1)) {
        let items: Vec<&Tokenized> = chunk.iter().collect();
        let batch = collate(&items, pad_id);
        let (ids, mask, labels) = to_device(&batch, &device);

        let n = batch
            .labels
            .chunks(batch.shape[1])
            .map(|row| {
                row.iter()
                    .skip(1)
                    .filter(|&&l| l != peft_ops::loss::IGNORE_INDEX)
                    .count()
            })
            .sum::<usize>();
        if n == 0 {
            continue;
        }
        let loss: f32 = model
            .forward_loss(ModelInput::with_mask(ids, mask), None, labels)?
            .into_scalar();
        total += loss as f64 * n as f64;
        count += n;
    }
    Ok(if count == 0 {
        f32::NAN
    } else {
        (total / count as f64) as f32
    })
}

/// Runs `$body` with `$g` bound to the gradient of parameter `$p` at its own rank (1 to 4;
/// the trainable parameters of every method have one of these ranks).
macro_rules! with_rank {
    ($p:expr, |$rank:ident| $body:block) => {
        match $p.shape.len() {
            1 => {
                const $rank: usize = 1;
                $body
            }
            2 => {
                const $rank: usize = 2;
                $body
            }
            3 => {
                const $rank: usize = 3;
                $body
            }
            4 => {
                const $rank: usize = 4;
                $body
            }
            _ => {}
        }
    };
}

/// The sum of squares of every gradient, as a one-element tensor left on the device (read
/// together with the loss: one device → host read per step).
fn squared_norm(
    grads: &GradientsParams,
    params: &[peft_core::params::NamedParam],
    device: &burn::tensor::Device,
) -> Tensor<1> {
    let mut sum = Tensor::<1>::zeros([1], device);
    for p in params {
        with_rank!(p, |D| {
            if let Some(g) = grads.get::<D>(p.id) {
                sum = sum + g.square().sum();
            }
        });
    }
    sum
}

/// Every gradient multiplied by `scale` (on the device).
fn scale_grads(
    mut grads: GradientsParams,
    params: &[peft_core::params::NamedParam],
    scale: f64,
) -> GradientsParams {
    for p in params {
        with_rank!(p, |D| {
            if let Some(g) = grads.remove::<D>(p.id) {
                grads.register(p.id, g * scale);
            }
        });
    }
    grads
}

/// `acc + grads`, parameter by parameter.
fn add_grads(
    mut acc: GradientsParams,
    grads: &GradientsParams,
    params: &[peft_core::params::NamedParam],
) -> GradientsParams {
    for p in params {
        with_rank!(p, |D| {
            if let Some(g) = grads.get::<D>(p.id) {
                let sum = acc.remove::<D>(p.id).map_or(g.clone(), |a| a + g);
                acc.register(p.id, sum);
            }
        });
    }
    acc
}

/// A small device tensor's values on the host (`None` if they cannot be read as f32).
fn host_f32(t: Tensor<1>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().ok()
}

/// One optimizer step's numbers summed over the ranks of a distributed run.
struct ReducedStep {
    /// The summed gradients (a parameter no rank has a gradient for stays absent).
    grads: GradientsParams,
    /// The step's loss (each rank's share is already divided by the global micro-batch count).
    loss: f32,
    /// Real tokens of every rank's micro-batches.
    tokens: usize,
    /// Whether any rank was asked to stop.
    stop: bool,
    /// Seconds spent in the all-reduce itself.
    seconds: f64,
}

/// Sums the step's gradients, loss, token count and stop flag over the ranks with one
/// all-reduce of one flat buffer: `[every gradient, flattened, in parameter order | one
/// has-gradient flag per parameter | loss, tokens, stop]`. The gradients leave the device in one
/// read and come back as one tensor sliced on the device.
fn all_reduce_step(
    grads: GradientsParams,
    step_loss: Tensor<1>,
    tokens: usize,
    stop: bool,
    params: &[peft_core::params::NamedParam],
    device: &Device,
    group: &dyn Collective,
) -> Result<ReducedStep, TrainError> {
    let mut parts = Vec::with_capacity(params.len() + 1);
    let mut present = Vec::with_capacity(params.len());
    for p in params {
        let mut flat = None;
        with_rank!(p, |D| {
            flat = grads
                .get::<D>(p.id)
                .map(|g| g.reshape([p.numel()]).without_autodiff());
        });
        present.push(flat.is_some() as u8 as f32);
        parts
            .push(flat.unwrap_or_else(|| Tensor::<1>::zeros([p.numel()], &device.clone().inner())));
    }
    let numel: usize = params.iter().map(|p| p.numel()).sum();
    let mut buffer: Vec<f32> = if parts.is_empty() {
        Vec::new()
    } else {
        host_f32(Tensor::cat(parts, 0))
            .ok_or_else(|| TrainError::Distributed("reading the gradients as f32".into()))?
    };
    let loss = host_f32(step_loss).unwrap_or_default();
    buffer.extend(present);
    // Token counts stay exact in f32 up to 2^24 per step.
    buffer.extend([
        loss.first().copied().unwrap_or(f32::NAN),
        tokens as f32,
        stop as u8 as f32,
    ]);
    let started = Instant::now();
    group.all_reduce_sum(&mut buffer)?;
    let seconds = started.elapsed().as_secs_f64();
    let tail = &buffer[numel + params.len()..];
    let (loss, tokens, stop) = (tail[0], tail[1].round() as usize, tail[2] > 0.0);
    let flags = buffer[numel..numel + params.len()].to_vec();
    buffer.truncate(numel);
    let summed = Tensor::<1>::from_data(TensorData::new(buffer, [numel]), &device.clone().inner());
    let mut out = GradientsParams::new();
    let mut offset = 0;
    for (p, flag) in params.iter().zip(flags) {
        let range = offset..offset + p.numel();
        offset += p.numel();
        if flag == 0.0 {
            continue;
        }
        with_rank!(p, |D| {
            let shape: [usize; D] = p.shape.clone().try_into().unwrap_or([0; D]);
            out.register::<D>(p.id, summed.clone().slice(range).reshape(shape));
        });
    }
    Ok(ReducedStep {
        grads: out,
        loss,
        tokens,
        stop,
        seconds,
    })
}

/// The trainable parameters set to rank 0's values on every rank: an all-reduce in which every
/// other rank contributes zeros.
fn from_rank0<A: AdapterModel>(
    adapter: A,
    params: &[peft_core::params::NamedParam],
    group: &dyn Collective,
) -> Result<A, TrainError> {
    let numel: usize = params.iter().map(|p| p.numel()).sum();
    let mut buffer = Vec::with_capacity(numel);
    if group.rank() == 0 {
        let values = peft_core::params::lazy_values(adapter.model());
        for p in params {
            match values.iter().find(|v| v.name == p.name) {
                Some(v) => buffer.extend(v.values()?),
                None => buffer.extend(std::iter::repeat_n(0.0, p.numel())),
            }
        }
    } else {
        buffer.resize(numel, 0.0);
    }
    group.all_reduce_sum(&mut buffer)?;
    let mut by_name = BTreeMap::new();
    let mut offset = 0;
    for p in params {
        let values = buffer[offset..offset + p.numel()].to_vec();
        offset += p.numel();
        by_name.insert(p.name.clone(), TensorData::new(values, p.torch_shape()));
    }
    let model = set_values(adapter.model().clone(), by_name);
    Ok(adapter.with_model(model))
}

/// The checkpoint folders of `output_dir`, oldest first.
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then_some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Where to resume from: an explicit checkpoint folder, or the newest in `output_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Start from scratch.
    No,
    /// The newest `checkpoint-N` of the output folder (from scratch if there is none).
    Latest,
    /// This checkpoint folder.
    From(PathBuf),
}

/// Set by [`request_stop`]; read after each optimizer step.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Test-only fault: the optimizer step whose gradients become NaN (see
    /// [`inject_nonfinite_gradient_at`]). Per thread, so tests running beside it are untouched.
    static NONFINITE_GRADIENT_AT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Test-only hook: on this thread, the accumulated gradients of optimizer step `step` (1-based)
/// are made NaN while its loss stays finite, as a numerical blow-up in a backward pass would;
/// `None` clears it. Lets a test see the trainer refuse the step.
#[doc(hidden)]
pub fn inject_nonfinite_gradient_at(step: Option<usize>) {
    NONFINITE_GRADIENT_AT.with(|at| at.set(step));
}

/// Asks a running [`train`] to stop after the current optimizer step, write a checkpoint and
/// return. Async-signal-safe (one atomic store), so a SIGINT handler may call it.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Trains `adapter` on `train`, writing checkpoints and `metrics.jsonl` under `output_dir`.
///
/// The model must live on an autodiff device. With [`Resume`], the adapter weights, optimizer
/// state, step count and data position come from a checkpoint, and the run continues exactly as
/// an uninterrupted one would.
pub fn train<A: AdapterModel>(
    adapter: A,
    train: &[Tokenized],
    pad_id: u32,
    config: &TrainConfig,
    output_dir: &Path,
    resume: Resume,
    on_event: &mut dyn FnMut(&Event),
) -> Result<(A, TrainSummary), TrainError> {
    train_distributed(
        adapter,
        train,
        pad_id,
        config,
        output_dir,
        resume,
        &SingleProcess,
        on_event,
    )
}

/// [`train`] as one rank of a data-parallel group (PyTorch DDP's semantics): every rank runs
/// this with the same arguments; `config.per_device_train_batch_size` is per rank, so a global
/// batch is ranks × batch size × accumulation, drawn in the order a single process with
/// `ranks × gradient_accumulation_steps` micro-batches per step would draw it (rank `r` takes the
/// `r`-th contiguous block of each step's micro-batches). The trainable parameters start as rank
/// 0's; the gradients, loss, token count and stop flag are summed with one all-reduce per
/// optimizer step, and every rank applies the same AdamW step. Only rank 0 writes checkpoints,
/// `metrics.jsonl` and `loss.png`; a checkpoint resumes with any number of ranks that keeps the
/// global batch. [`request_stop`] on any rank stops every rank after the same step.
#[allow(clippy::too_many_arguments)]
pub fn train_distributed<A: AdapterModel>(
    adapter: A,
    train: &[Tokenized],
    pad_id: u32,
    config: &TrainConfig,
    output_dir: &Path,
    resume: Resume,
    group: &dyn Collective,
    on_event: &mut dyn FnMut(&Event),
) -> Result<(A, TrainSummary), TrainError> {
    config.validate()?;
    let ranks = group.world_size().max(1);
    let rank = group.rank();
    let writes = rank == 0;
    let local_micro = config.gradient_accumulation_steps;
    let global = config.across_ranks(ranks);
    let config = &global;
    if train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    STOP_REQUESTED.store(false, Ordering::SeqCst);
    let _unseed = UnseedDropoutOnDrop;
    std::fs::create_dir_all(output_dir).map_err(io_err(output_dir))?;
    if writes {
        remove_stale_staging(output_dir)?;
    }
    let total = config.total_steps(train.len());
    let trainable: Vec<String> = adapter.trainable_names();
    let model = with_stable_ids(adapter.model().clone());
    let mut adapter = adapter.with_model(model);
    let params: Vec<_> = named_params(adapter.model())
        .into_iter()
        .filter(|p| trainable.contains(&p.name))
        .collect();
    let mut optim: ModuleOptimizer = AdamWConfig::new()
        .with_beta_1(config.adam_beta1 as f32)
        .with_beta_2(config.adam_beta2 as f32)
        .with_epsilon(config.adam_epsilon as f32)
        .with_weight_decay(config.weight_decay as f32)
        .init();

    let resume_dir = match resume {
        Resume::No => None,
        Resume::Latest => checkpoints(output_dir).pop().map(|(_, p)| p),
        Resume::From(p) => Some(p),
    };
    let adapter_json = adapter.config_json()?;
    let mut state = TrainerState {
        global_step: 0,
        config: config.clone(),
        history: Vec::new(),
        rng: None,
        adapter: Some(adapter_json.clone()),
    };
    let mut last_checkpoint = None;
    let mut interrupted = None;
    if let Some(dir) = &resume_dir {
        let (restored, opt, mut st) =
            load_checkpoint(adapter, dir, optim, &adapter_json, &config.sources)?;
        // From here on, checkpoints record this run's identity (the same adapter; the sources
        // as this run found them).
        st.adapter = Some(adapter_json.clone());
        st.config.sources = config.sources.clone();
        adapter = restored;
        optim = opt;
        state = st;
        last_checkpoint = Some(dir.clone());
        tracing::info!(
            "resuming from {} at step {}",
            dir.display(),
            state.global_step
        );
    }
    if ranks > 1 {
        // As DDP broadcasts the module at construction: every rank starts from rank 0's values
        // (fresh adapters drawn from the same seed agree already; this makes it a guarantee).
        adapter = from_rank0(adapter, &params, group)?;
    }

    let metrics_path = output_dir.join("metrics.jsonl");
    let micro_per_step = config.gradient_accumulation_steps;
    let batch = config.per_device_train_batch_size;
    let micro_per_epoch = train.len().div_ceil(batch);
    // The micro-batch sequence is a pure function of (seed, epoch), so a resumed run skips exactly
    // the micro-batches it already consumed.
    let mut micro_index = state.global_step * micro_per_step;
    // A resumed run draws from the checkpoint's seed, whatever seed this call was given.
    let seed = match state.rng {
        Some(rng) => {
            if rng.seed != config.seed {
                tracing::warn!(
                    "resuming with the checkpoint's seed {} (not {}), so that the run stays exact",
                    rng.seed,
                    config.seed
                );
            }
            if rng.micro_batches_done != micro_index {
                return Err(TrainError::Checkpoint {
                    path: resume_dir.clone().unwrap_or_default(),
                    reason: format!(
                        "{} micro-batches consumed at step {}, but this run takes {micro_per_step} \
                         per step ({ranks} rank(s) × {local_micro} accumulation step(s)); resume \
                         with the same global batch (ranks × --grad-accum)",
                        rng.micro_batches_done, state.global_step
                    ),
                });
            }
            rng.seed
        }
        None => config.seed,
    };
    while state.global_step < total {
        let started = Instant::now();
        let mut allreduce_s = None;
        let mut step_loss: Option<Tensor<1>> = None;
        let mut tokens = 0usize;
        let mut accumulated: Option<GradientsParams> = None;
        let first = micro_index;
        for micro_index in rank_micro_batches(first, micro_per_step, rank, ranks) {
            let epoch = micro_index / micro_per_epoch;
            let within = micro_index % micro_per_epoch;
            let order = epoch_order(train.len(), seed, epoch);
            let items: Vec<&Tokenized> = order
                [within * batch..((within + 1) * batch).min(order.len())]
                .iter()
                .map(|&i| &train[i])
                .collect();
            let host = collate(&items, pad_id);
            tokens += host.attention_mask.iter().filter(|&&m| m == 1).count();
            let device = adapter.model().device();
            // Dropout masks of this micro-batch: a function of (seed, global index) alone, drawn
            // from this thread's generator, so that a resumed run draws the masks an
            // uninterrupted one drew and a rank draws the masks one process would draw.
            peft_core::dropout::seed_thread(micro_batch_seed(seed, micro_index));
            let (ids, mask, labels) = to_device(&host, &device);
            let mut loss =
                adapter
                    .model()
                    .forward_loss(ModelInput::with_mask(ids, mask), None, labels)?;
            // The method's own term (AdaLoRA's orthogonality penalty), in every pass' loss as
            // PEFT adds it to `outputs.loss`.
            if let Some(term) = adapter.regularization()? {
                loss = loss + term;
            }
            let loss = loss / micro_per_step as f64;
            let detached = loss.clone().detach();
            step_loss = Some(match step_loss {
                None => detached,
                Some(sum) => sum + detached,
            });
            let grads = GradientsParams::from_grads(loss.backward(), adapter.model());
            accumulated = Some(match accumulated {
                None => grads,
                Some(acc) => add_grads(acc, &grads, &params),
            });
        }
        micro_index = first + micro_per_step;
        let mut grads = accumulated.expect("at least one micro-batch");
        if NONFINITE_GRADIENT_AT.with(|at| at.get()) == Some(state.global_step + 1) {
            grads = scale_grads(grads, &params, f64::NAN);
        }
        let device = adapter.model().device();
        let step_loss = step_loss.expect("at least one micro-batch");
        // Set in a distributed step: whether any rank was asked to stop.
        let mut stop_by_any_rank = None;
        let (loss, squared) = if ranks == 1 {
            // The step's only device → host read: its loss and the gradients' squared norm (read
            // whether or not it clips: a non-finite norm stops the run below).
            let read = Tensor::cat(vec![step_loss, squared_norm(&grads, &params, &device)], 0);
            let values = host_f32(read).unwrap_or_default();
            let loss = values.first().copied().unwrap_or(f32::NAN);
            (loss, values.get(1).map(|&v| v as f64))
        } else {
            let stop = STOP_REQUESTED.load(Ordering::SeqCst);
            let reduced = all_reduce_step(grads, step_loss, tokens, stop, &params, &device, group)?;
            grads = reduced.grads;
            tokens = reduced.tokens;
            stop_by_any_rank = Some(reduced.stop);
            allreduce_s = Some(reduced.seconds);
            // The norm of the summed gradients, computed on the device as a single process
            // computes it, so that clipping scales by the same number.
            let squared = Some(
                host_f32(squared_norm(&grads, &params, &device))
                    .and_then(|v| v.first().copied())
                    .map_or(f64::NAN, f64::from),
            );
            (reduced.loss, squared)
        };
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: state.global_step + 1,
                loss,
                last_checkpoint,
            });
        }
        let norm = squared.unwrap_or(f64::NAN).sqrt();
        if !norm.is_finite() {
            // Before the update and before any checkpoint: the newest checkpoint stays the
            // last good one.
            return Err(TrainError::NonFiniteGradient {
                step: state.global_step + 1,
                norm,
                loss,
                last_checkpoint,
            });
        }
        let mut grad_norm = None;
        if let Some(max_norm) = config.max_grad_norm {
            // PyTorch's clip_grad_norm_: scaled down when the global L2 norm is above max_norm.
            let scale = max_norm / (norm + 1e-6);
            if scale < 1.0 {
                grads = scale_grads(grads, &params, scale);
            }
            grad_norm = Some(norm);
        }
        let lr = config.lr_at(state.global_step, total);
        let kept = adapter.keep_gradients(&grads);
        let model = optim.step(lr, adapter.model().clone(), grads);
        adapter = adapter
            .with_model(model)
            .after_optimizer_step(state.global_step + 1, kept)?;
        state.global_step += 1;
        state.history.push((state.global_step, loss));
        state.rng = Some(RngState {
            seed,
            micro_batches_done: micro_index,
        });
        let step_s = started.elapsed().as_secs_f64();
        let tokens_per_s = tokens as f64 / step_s.max(1e-9);
        if writes
            && (state
                .global_step
                .is_multiple_of(config.logging_steps.max(1))
                || state.global_step == total)
        {
            let mut line = serde_json::json!({
                "step": state.global_step, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
                "epoch": micro_index as f64 / micro_per_epoch as f64, "tokens_per_s": tokens_per_s,
                "step_s": step_s,
            });
            if let Some(seconds) = allreduce_s {
                line["ranks"] = ranks.into();
                line["allreduce_s"] = seconds.into();
            }
            append_line(&metrics_path, &line.to_string())?;
        }
        on_event(&Event::Step {
            step: state.global_step,
            total,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
        });
        let save_now = config
            .save_steps
            .is_some_and(|n| n > 0 && state.global_step.is_multiple_of(n));
        // One process reads the request as late as possible (a Ctrl-C during this step's update
        // stops after it); ranks act on the flag they summed, so that all stop at the same step.
        let stop = stop_by_any_rank.unwrap_or_else(|| STOP_REQUESTED.load(Ordering::SeqCst))
            && state.global_step < total;
        if save_now || stop {
            let dir = output_dir.join(format!("checkpoint-{}", state.global_step));
            if writes {
                save_checkpoint(&adapter, &trainable, &optim, &state, output_dir)?;
                prune_checkpoints(output_dir, config.save_total_limit)?;
                write_curve(output_dir, &state, config, total);
                on_event(&Event::Checkpoint(dir.clone()));
            }
            if ranks > 1 {
                // Every rank waits for rank 0's checkpoint: a rank that exits on a stop request
                // must not end the job (mpirun aborts the others) before it is written.
                group.all_reduce_sum(&mut [0.0])?;
            }
            last_checkpoint = Some(dir);
        }
        if stop {
            interrupted = last_checkpoint.clone();
            break;
        }
    }
    let summary = TrainSummary {
        steps: state.global_step,
        interrupted,
        final_train_loss: state.history.last().map_or(f32::NAN, |h| h.1),
        history: state.history,
    };
    Ok((adapter, summary))
}

/// `loss.png` in `output_dir`: the curve so far. A plot that cannot be written is reported, not
/// fatal: the checkpoint beside it is what matters.
fn write_curve(output_dir: &Path, state: &TrainerState, config: &TrainConfig, total: usize) {
    let points = crate::plot::curve(&state.history, config, total);
    let path = output_dir.join("loss.png");
    if let Err(e) = crate::plot::write_loss_png(&path, &points) {
        tracing::warn!("{}: {e}", path.display());
    }
}

fn append_line(path: &Path, line: &str) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    writeln!(f, "{line}").map_err(io_err(path))
}

/// Writes `checkpoint-N` atomically: everything goes into a temporary folder that is renamed
/// into place once complete, so a crash leaves either the whole checkpoint or none.
fn save_checkpoint<A: AdapterModel>(
    adapter: &A,
    trainable: &[String],
    optim: &ModuleOptimizer,
    state: &TrainerState,
    output_dir: &Path,
) -> Result<PathBuf, TrainError> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.global_step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    adapter.save_pretrained(&tmp)?;
    let values: BTreeMap<_, _> = named_values(adapter.model())?
        .into_iter()
        .filter(|(name, _)| trainable.contains(name))
        .collect();
    save_safetensors(tmp.join(TRAINABLE_FILE), &values, None)?;
    let bytes = optim
        .to_record()
        .into_bytes()
        .map_err(|e| TrainError::Checkpoint {
            path: tmp.join(OPTIMIZER_FILE),
            reason: format!("{e:?}"),
        })?;
    write_atomic(tmp.join(OPTIMIZER_FILE), &bytes)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| PeftError::json(&tmp, e))?;
    write_atomic(tmp.join(STATE_FILE), json.as_bytes())?;
    // A checkpoint of the same step (a resumed run passing it again) is replaced atomically:
    // at every moment `checkpoint-N` is the old one or the new one, never missing.
    peft_tensors::replace_dir(&tmp, &final_dir)?;
    if let Ok(d) = std::fs::File::open(output_dir) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// Removes the staging folders a crashed run left (`.checkpoint-N.tmp-PID`, and
/// `.checkpoint-N.old-PID` from a replacement cut short): never a finished checkpoint.
fn remove_stale_staging(output_dir: &Path) -> Result<(), TrainError> {
    for entry in std::fs::read_dir(output_dir)
        .map_err(io_err(output_dir))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name
            .strip_prefix(".checkpoint-")
            .is_some_and(|rest| rest.contains(".tmp-") || rest.contains(".old-"));
        if stale && entry.path().is_dir() {
            let path = entry.path();
            tracing::warn!("removing {} left by an interrupted run", path.display());
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn prune_checkpoints(output_dir: &Path, limit: Option<usize>) -> Result<(), TrainError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let found = checkpoints(output_dir);
    for (_, dir) in found.iter().take(found.len().saturating_sub(limit.max(1))) {
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

fn load_checkpoint<A: AdapterModel>(
    adapter: A,
    dir: &Path,
    optim: ModuleOptimizer,
    adapter_json: &serde_json::Value,
    sources: &RunSources,
) -> Result<(A, ModuleOptimizer, TrainerState), TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| PeftError::json(&state_path, e))?;
    // The identity first: it names what differs, where the shapes below would only show it.
    check_same_run(dir, &state, adapter_json, sources)?;
    let store = TensorStore::open(dir.join(TRAINABLE_FILE))?;
    let trainable = adapter.trainable_names();
    // Full shapes, not only ranks: an r=8 checkpoint must not "resume" an r=16 run (its values
    // would be dropped and the run would train a fresh adapter under the checkpoint's step).
    let shapes: BTreeMap<String, Vec<usize>> = peft_core::params::lazy_values(adapter.model())
        .into_iter()
        .map(|v| (v.name, v.shape))
        .collect();
    let mut values = BTreeMap::new();
    for name in &trainable {
        if !store.contains(name) {
            return Err(TrainError::Checkpoint {
                path: dir.join(TRAINABLE_FILE),
                reason: format!("missing `{name}`: the checkpoint belongs to another adapter"),
            });
        }
        let (data, shape) = store.f32(name)?;
        if let Some(expected) = shapes.get(name).filter(|e| **e != shape) {
            return Err(TrainError::Checkpoint {
                path: dir.join(TRAINABLE_FILE),
                reason: format!(
                    "`{name}` has shape {shape:?} in the checkpoint but {expected:?} in this \
                     run: the checkpoint belongs to another adapter configuration (rank, \
                     targets, virtual tokens)"
                ),
            });
        }
        values.insert(name.clone(), TensorData::new(data, shape));
    }
    let model = set_values(adapter.model().clone(), values);
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(io_err(&opt_path))?;
    let record =
        OptimizerRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes)).map_err(|e| {
            TrainError::Checkpoint {
                path: opt_path.clone(),
                reason: format!("{e:?}"),
            }
        })?;
    Ok((adapter.with_model(model), optim.load_record(record), state))
}

/// Loads checkpoint `dir` into `adapter` as a resume does — its `trainer_state.json` (the
/// recorded adapter config compared with `adapter`'s), the trainable values (full shapes
/// checked) and the optimizer state — and returns the adapter with the checkpoint's values and
/// the checkpoint's step. Any file that is missing, unreadable or of another run is an error
/// naming it.
pub fn load_checkpoint_into<A: AdapterModel>(
    adapter: A,
    dir: &Path,
) -> Result<(A, usize), TrainError> {
    let adapter_json = adapter.config_json()?;
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    let (adapter, _, state) =
        load_checkpoint(adapter, dir, optim, &adapter_json, &RunSources::default())?;
    Ok((adapter, state.global_step))
}

/// Runs `module` through `valid()` when it lives on an autodiff device, for evaluation.
pub fn inference_copy<M: Module>(module: &M) -> M {
    module.valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hf() {
        let c = TrainConfig {
            learning_rate: 1.0,
            warmup_steps: 2,
            ..TrainConfig::default()
        };
        assert_eq!(c.lr_at(0, 10), 0.0);
        assert_eq!(c.lr_at(1, 10), 0.5);
        assert_eq!(c.lr_at(2, 10), 1.0);
        assert!((c.lr_at(6, 10) - 0.5).abs() < 1e-12);
        let cos = TrainConfig {
            lr_scheduler_type: Schedule::Cosine,
            ..c.clone()
        };
        assert!((cos.lr_at(6, 10) - 0.5).abs() < 1e-12);
        assert!(
            (cos.lr_at(4, 10) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12
        );
        let constant = TrainConfig {
            lr_scheduler_type: Schedule::Constant,
            ..c
        };
        assert_eq!(constant.lr_at(9, 10), 1.0);
    }

    #[test]
    fn total_steps_count_accumulation() {
        let c = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 2,
            num_train_epochs: 3,
            ..TrainConfig::default()
        };
        // 10 examples → 3 micro-batches → 2 steps per epoch.
        assert_eq!(c.total_steps(10), 6);
    }
}
