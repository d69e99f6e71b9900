//! The continuous-batching engine: one thread owns the model and runs every forward pass.
//!
//! At each decoding step the engine admits waiting requests into the running batch (up to
//! `max_batch` rows), runs one forward pass over every running row — each row with its own
//! adapter, through [`MultiLoraModel::set_row_adapters`] — and drops the rows that finished
//! or whose client went away. A new request's prompt is run alone (its prefill), then its
//! cache joins the batch's, left-padded to the batch's length ([`KvCache::concat_rows`]).
//!
//! Batching does not change results: a row's rotary positions are its own (`position_ids`),
//! attention skips its padding ([`peft_ops`' fused attention](peft_core) reads only the keys a
//! row sees), and every decoding step, alone or batched, takes the same code path, so a greedy
//! request produces the same tokens whatever else shares its batch (tested).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{BASE_ADAPTER, CausalLm, KvCache, ModelInput, PeftError, PeftType};
use peft_lora::{LoraSet, MultiLoraModel};
use peft_models::{AnyModel, Decoding};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Shared;

/// The model the engine serves: a base with named LoRA adapters.
pub type ServedModel = MultiLoraModel<AnyModel<LoraSet>>;

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence token (or, decided by the caller, a stop string).
    Stop,
    /// It reached `max_tokens`.
    Length,
}

impl FinishReason {
    /// OpenAI's string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What the engine tells a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next generated token (never the end-of-sequence token itself).
    Token(u32),
    /// The sequence ended after `generated` tokens (the end-of-sequence token counted).
    Finished {
        /// Why.
        reason: FinishReason,
        /// Tokens generated.
        generated: usize,
    },
    /// The model failed on this request.
    Failed(String),
}

/// One generation request.
#[derive(Debug)]
pub struct Job {
    /// The adapter of every token of this request; `None`: the base model.
    pub adapter: Option<String>,
    /// Prompt token ids (checked against the vocabulary and the context by the caller).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (at least 1).
    pub max_tokens: usize,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// Generate past end-of-sequence tokens (they are then sent as tokens).
    pub ignore_eos: bool,
    /// Where the tokens go; the request leaves the batch once this is closed.
    pub events: mpsc::UnboundedSender<Event>,
}

/// An answer about an adapter operation: `Err((status, message))`.
pub type AdapterReply = Result<(), (u16, String)>;

/// What the HTTP side asks of the engine.
#[derive(Debug)]
pub enum Command {
    /// Queue a generation.
    Generate(Job),
    /// Load a LoRA adapter folder under `name` (path already checked).
    LoadAdapter {
        /// The name requests will use.
        name: String,
        /// The folder.
        dir: PathBuf,
        /// The outcome.
        reply: oneshot::Sender<AdapterReply>,
    },
    /// Drop an adapter no running or queued request uses.
    UnloadAdapter {
        /// The adapter.
        name: String,
        /// The outcome.
        reply: oneshot::Sender<AdapterReply>,
    },
}

/// Limits of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Rows decoded together at most.
    pub max_batch: usize,
}

/// A running sequence.
struct Row {
    job: Job,
    /// Tokens generated so far (each one sent).
    generated: usize,
    /// The last token, the input of the next step.
    last: u32,
    /// The position of `last` in its sequence.
    position: usize,
    rng: StdRng,
}

impl Row {
    fn adapter_name(&self) -> &str {
        self.job.adapter.as_deref().unwrap_or(BASE_ADAPTER)
    }
}

/// The engine's state: the model, the waiting queue, the running rows and their one cache.
pub struct Engine {
    model: ServedModel,
    shared: Arc<Shared>,
    limits: EngineLimits,
    pending: VecDeque<Job>,
    rows: Vec<Row>,
    cache: Option<KvCache>,
}

impl Engine {
    /// An engine over `model`, reporting through `shared`.
    pub fn new(model: ServedModel, shared: Arc<Shared>, limits: EngineLimits) -> Self {
        shared.set_adapters(model.adapter_names().iter().map(|s| s.to_string()));
        Self {
            model,
            shared,
            limits,
            pending: VecDeque::new(),
            rows: Vec::new(),
            cache: None,
        }
    }

    /// Runs until every sender of `commands` is gone and no work is left (graceful shutdown:
    /// requests already accepted finish). The engine may run again on another queue.
    pub fn run(&mut self, commands: &Receiver<Command>) {
        loop {
            if self.rows.is_empty() && self.pending.is_empty() {
                match commands.recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            self.admit();
            if !self.rows.is_empty() {
                self.step();
            }
        }
    }

    /// The model back, with the adapters it holds now.
    pub fn into_model(self) -> ServedModel {
        self.model
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.pending.push_back(job),
            Command::LoadAdapter { name, dir, reply } => {
                let _ = reply.send(self.load_adapter(&name, &dir));
            }
            Command::UnloadAdapter { name, reply } => {
                let _ = reply.send(self.unload_adapter(&name));
            }
        }
    }

    fn load_adapter(&mut self, name: &str, dir: &std::path::Path) -> AdapterReply {
        if name.is_empty() || name == BASE_ADAPTER {
            return Err((400, format!("`{name}` cannot name an adapter")));
        }
        if self.model.adapter(name).is_ok() {
            return Err((400, format!("an adapter named `{name}` is already loaded")));
        }
        let header = peft_core::config::read_header(dir.join("adapter_config.json"))
            .map_err(|e| (400, format!("{e}")))?;
        if header.peft_type != PeftType::Lora {
            return Err((
                400,
                format!(
                    "only LoRA adapters can be served (they share mixed-adapter batches); \
                     {} holds a {:?} adapter",
                    dir.display(),
                    header.peft_type
                ),
            ));
        }
        self.model
            .load_adapter(name, dir)
            .map_err(|e| (400, format!("loading `{name}`: {e}")))?;
        self.publish_adapters();
        Ok(())
    }

    fn unload_adapter(&mut self, name: &str) -> AdapterReply {
        if self.model.adapter(name).is_err() {
            return Err((404, format!("no adapter named `{name}` is loaded")));
        }
        let users = self
            .rows
            .iter()
            .map(|r| &r.job)
            .chain(&self.pending)
            .filter(|j| j.adapter.as_deref() == Some(name))
            .count();
        if users > 0 {
            return Err((
                400,
                format!(
                    "adapter `{name}` is in use by {users} request(s); unload it once they end"
                ),
            ));
        }
        self.model
            .delete_adapter(name)
            .map_err(|e| (400, format!("{e}")))?;
        self.publish_adapters();
        Ok(())
    }

    fn publish_adapters(&self) {
        self.shared
            .set_adapters(self.model.adapter_names().iter().map(|s| s.to_string()));
    }

    /// Moves waiting requests into the batch while it has room: each prompt runs alone, its
    /// first token is sent, and its cache joins the batch's.
    fn admit(&mut self) {
        let mut joined = Vec::new();
        while self.rows.len() + joined.len() < self.limits.max_batch {
            let Some(job) = self.pending.pop_front() else {
                break;
            };
            self.shared.dequeued();
            if job.events.is_closed() {
                continue;
            }
            match self.prefill(job) {
                Ok(Some(started)) => joined.push(started),
                Ok(None) => {}
                Err((job, e)) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        if joined.is_empty() {
            return;
        }
        let (rows, caches): (Vec<Row>, Vec<KvCache>) = joined.into_iter().unzip();
        let all = self.cache.take().into_iter().chain(caches).collect();
        match KvCache::concat_rows(all) {
            Ok(cache) => {
                self.cache = Some(cache);
                self.rows.extend(rows);
            }
            Err(e) => {
                for row in self.rows.drain(..).chain(rows) {
                    let _ = row.job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        self.shared.set_batch_size(self.rows.len());
    }

    /// Runs `job`'s prompt alone and sends its first token; the row and its cache, unless it is
    /// already finished.
    #[allow(clippy::result_large_err)]
    fn prefill(&mut self, job: Job) -> Result<Option<(Row, KvCache)>, (Job, PeftError)> {
        let adapter = job
            .adapter
            .clone()
            .unwrap_or_else(|| BASE_ADAPTER.to_string());
        let device = self.model.model.device();
        let n = job.prompt.len();
        let ids: Vec<i64> = job.prompt.iter().map(|&t| t as i64).collect();
        let input = ModelInput::new(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [1, n]),
            &device,
        ));
        let mut cache = KvCache::new(self.model.model.spec().num_layers);
        let logits = match self
            .model
            .set_row_adapters(Some(&[adapter.as_str()]))
            .and_then(|()| self.model.model.forward(input, Some(&mut cache)))
            .and_then(|l| last_logits(l, 1))
        {
            Ok(l) => l,
            Err(e) => return Err((job, e)),
        };
        let rng = match job.decoding {
            Decoding::Sample { seed, .. } => StdRng::seed_from_u64(seed),
            Decoding::Greedy => StdRng::seed_from_u64(0),
        };
        let mut row = Row {
            job,
            generated: 0,
            last: 0,
            position: n - 1,
            rng,
        };
        self.shared.started(row.adapter_name(), n);
        if self.emit(&mut row, &logits[0]) {
            Ok(None)
        } else {
            Ok(Some((row, cache)))
        }
    }

    /// Chooses `row`'s next token from `logits` and sends it; whether the row is finished.
    fn emit(&self, row: &mut Row, logits: &[f32]) -> bool {
        let token = peft_models::generate::choose(logits, row.job.decoding, &mut row.rng);
        row.generated += 1;
        row.last = token;
        row.position += 1;
        self.shared.generated(row.adapter_name(), 1);
        let eos = !row.job.ignore_eos && self.model.model.spec().eos_token_ids.contains(&token);
        let reason = if eos {
            Some(FinishReason::Stop)
        } else if row.job.events.send(Event::Token(token)).is_err() {
            return true;
        } else if row.generated >= row.job.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                let _ = row.job.events.send(Event::Finished {
                    reason,
                    generated: row.generated,
                });
                true
            }
            None => row.job.events.is_closed(),
        }
    }

    /// One decoding step over every running row; finished rows leave the batch.
    fn step(&mut self) {
        let started = Instant::now();
        let batch = self.rows.len();
        let device = self.model.model.device();
        let ids: Vec<i64> = self.rows.iter().map(|r| r.last as i64).collect();
        let positions: Vec<i64> = self.rows.iter().map(|r| r.position as i64).collect();
        let mut input = ModelInput::new(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [batch, 1]),
            &device,
        ));
        input.position_ids = Some(Tensor::<2, Int>::from_data(
            TensorData::new(positions, [batch, 1]),
            &device,
        ));
        let names: Vec<String> = self.rows.iter().map(|r| r.adapter_name().into()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let result = self
            .model
            .set_row_adapters(Some(&names))
            .and_then(|()| self.model.model.forward(input, Some(cache)))
            .and_then(|l| last_logits(l, batch));
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                for row in self.rows.drain(..) {
                    let _ = row.job.events.send(Event::Failed(e.to_string()));
                }
                self.cache = None;
                self.shared.set_batch_size(0);
                return;
            }
        };
        let mut rows = std::mem::take(&mut self.rows);
        let keep: Vec<usize> = rows
            .iter_mut()
            .zip(&logits)
            .enumerate()
            .filter_map(|(i, (row, l))| (!self.emit(row, l)).then_some(i))
            .collect();
        self.shared.step_done(batch, started.elapsed());
        if keep.len() == batch {
            self.rows = rows;
            return;
        }
        let cache = self.cache.take().filter(|_| !keep.is_empty()).map(|c| {
            c.select_rows(&keep).and_then(|mut c| {
                c.trim_padding()?;
                Ok(c)
            })
        });
        let mut kept: Vec<Option<Row>> = rows.drain(..).map(Some).collect();
        self.rows = keep.iter().filter_map(|&i| kept[i].take()).collect();
        match cache {
            Some(Ok(c)) => self.cache = Some(c),
            Some(Err(e)) => {
                for row in self.rows.drain(..) {
                    let _ = row.job.events.send(Event::Failed(e.to_string()));
                }
            }
            None => {}
        }
        self.shared.set_batch_size(self.rows.len());
    }
}

/// The last position's logits of each of `batch` rows, `[vocab]` each.
fn last_logits(logits: Tensor<3>, batch: usize) -> peft_core::Result<Vec<Vec<f32>>> {
    let [_, seq, vocab] = logits.dims();
    let values = logits
        .slice_dim(1, seq - 1..seq)
        .reshape([batch, vocab])
        .into_data()
        .try_to_vec_as::<f32>()
        .map_err(|e| PeftError::InvalidInput(format!("reading logits: {e:?}")))?;
    Ok(values.chunks(vocab).map(<[f32]>::to_vec).collect())
}
