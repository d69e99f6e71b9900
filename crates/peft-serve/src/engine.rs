//! The continuous-batching engine: one thread owns the model and runs every forward pass.
//!
//! At each decoding step the engine admits waiting requests (up to `max_batch` rows in all),
//! runs one forward pass per running batch, and drops the rows that finished or whose client
//! went away. Requests of LoRA adapters and of the base share one batch, each row with its own
//! adapter ([`MultiLoraModel::set_row_adapters`]); an adapter of another method (IA3, prompt
//! tuning, P-tuning, prefix tuning) runs its rows in a batch of its own, over the same base
//! weights (shared, not copied). A new request's prompt is run alone (its prefill), then its
//! cache joins its batch's, left-padded to the batch's length ([`KvCache::concat_rows`]).
//!
//! Batching does not change results: a row's rotary positions are its own (`position_ids`),
//! the fused CPU attention reads only the keys a row sees, and every decoding step, alone or
//! batched, takes the same code path, so a greedy request produces the same tokens whatever
//! else shares its batch (tested).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use peft::Serving;
use peft_core::{BASE_ADAPTER, CausalLm, KvCache, ModelInput, NoAdapter, PeftError};
use peft_lora::{LoraSet, MultiLoraModel};
use peft_models::{AnyModel, Decoding};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

use crate::logprobs::{TokenLogprob, token_logprob};
use crate::metrics::Shared;
use crate::penalties::{LogitAdjustments, TokenHistory};

/// The model the engine serves: a base with named LoRA adapters.
pub type ServedModel = MultiLoraModel<AnyModel<LoraSet>>;

/// Which batch a request runs in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum BatchKey {
    /// The base and every LoRA adapter, mixed.
    Shared,
    /// An adapter of another method.
    Own(String),
}

/// Running rows that share one forward pass and one cache.
#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    cache: Option<KvCache>,
}

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
    /// The log-probabilities of the prompt's tokens (`echo` with `logprobs`), sent once before
    /// any token: one entry per prompt token, the first `None` (nothing precedes it).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// The log-probability of the token that follows (sent just before its [`Event::Token`],
    /// or before `Finished` for an end-of-sequence token), when the request asked for them.
    Logprob(TokenLogprob),
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
    /// The request could not start, for a reason of the given HTTP status (its adapter, loaded
    /// on first use, is bad, or no resident adapter can make room for it).
    Refused {
        /// 400, 404 or 409, as `/v1/load_lora_adapter` answers the same load.
        status: u16,
        /// Why.
        message: String,
    },
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Job {
    /// The adapter of every token of this request; `None`: the base model.
    pub adapter: Option<String>,
    /// Prompt token ids (checked against the vocabulary and the context by the caller).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (at least 1, unless `prompt_logprobs` asks for the prompt
    /// alone).
    pub max_tokens: usize,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// Generate past end-of-sequence tokens (they are then sent as tokens).
    pub ignore_eos: bool,
    /// Penalties, biases, `min_tokens` and stop token ids (vLLM's).
    pub adjust: LogitAdjustments,
    /// Send each generated token's log-probability with this many most likely tokens
    /// (`None`: none).
    pub logprobs: Option<usize>,
    /// Send the prompt's log-probabilities with this many most likely tokens (`echo`), before
    /// generating; with `max_tokens` 0 nothing is generated.
    pub prompt_logprobs: Option<usize>,
    /// Where the tokens go; the request leaves the batch once this is closed.
    pub events: mpsc::UnboundedSender<Event>,
    /// The folder to load `adapter` from if it is not loaded when the request is admitted
    /// (LoRAX's dynamic adapters: a folder under `--adapter-dir`, checked by the caller). Such an
    /// adapter is not pinned: once idle it may be evicted for another (`--max-loras`).
    pub load_from: Option<PathBuf>,
    /// Where the tokens of choices 1, 2, … go (OpenAI's `n > 1`; empty for one choice). The
    /// prompt runs once; each choice then decodes as a row of its own from a copy of that
    /// cache, sampled with the seed plus its index (vLLM's child requests), and ends on its own.
    pub more_choices: Vec<mpsc::UnboundedSender<Event>>,
}

impl Job {
    /// The rows this request decodes (`n`).
    pub fn choices(&self) -> usize {
        1 + self.more_choices.len()
    }

    /// A request of one choice with an OpenAI request's defaults: no penalties, no
    /// log-probabilities, ends at end-of-sequence; `adapter` must be loaded already (`None`: the
    /// base model).
    pub fn new(
        adapter: Option<String>,
        prompt: Vec<u32>,
        max_tokens: usize,
        decoding: Decoding,
        events: mpsc::UnboundedSender<Event>,
    ) -> Job {
        Job {
            adapter,
            prompt,
            max_tokens,
            decoding,
            ignore_eos: false,
            adjust: LogitAdjustments::default(),
            logprobs: None,
            prompt_logprobs: None,
            events,
            load_from: None,
            more_choices: Vec::new(),
        }
    }

    /// Choice `index`'s own request: its channel, and the seed plus `index` when sampled.
    fn choice(&self, index: usize) -> Job {
        let mut decoding = self.decoding;
        let events = match index {
            0 => self.events.clone(),
            _ => {
                if let Decoding::Sample { seed, .. } = &mut decoding {
                    *seed = seed.wrapping_add(index as u64);
                }
                self.more_choices[index - 1].clone()
            }
        };
        Job {
            adapter: self.adapter.clone(),
            prompt: self.prompt.clone(),
            max_tokens: self.max_tokens,
            decoding,
            ignore_eos: self.ignore_eos,
            adjust: self.adjust.clone(),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            events,
            load_from: self.load_from.clone(),
            more_choices: Vec::new(),
        }
    }

    /// Whether every choice's client went away.
    fn abandoned(&self) -> bool {
        self.events.is_closed() && self.more_choices.iter().all(|e| e.is_closed())
    }

    /// Every choice's channel, choice 0 first.
    fn senders(&self) -> Senders {
        Senders(
            std::iter::once(&self.events)
                .chain(&self.more_choices)
                .cloned()
                .collect(),
        )
    }

    /// Sends `event` to every choice.
    fn send_all(&self, event: Event) {
        send_each(
            std::iter::once(&self.events).chain(&self.more_choices),
            event,
        );
    }
}

/// A request's channels, kept apart from the request where only they outlive it.
struct Senders(Vec<mpsc::UnboundedSender<Event>>);

impl Senders {
    fn send_all(&self, event: Event) {
        send_each(&self.0, event);
    }
}

fn send_each<'a>(
    channels: impl IntoIterator<Item = &'a mpsc::UnboundedSender<Event>>,
    event: Event,
) {
    for events in channels {
        let _ = events.send(event.clone());
    }
}

/// Whether a loaded adapter may be evicted for another (`--max-loras`).
#[derive(Debug, Clone, Copy)]
enum Residency {
    /// Loaded explicitly (`--adapter`, /v1/load_lora_adapter): stays until unloaded.
    Pinned,
    /// Loaded on a request's first use: evicted when idle and least recently used.
    Evictable,
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

/// Where a test-only panic is injected ([`Engine::inject_panic`]): each fires once.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedPanic {
    /// In the next decoding step.
    Step,
    /// In the next prompt's prefill.
    Prefill,
    /// In the next adapter load.
    LoadAdapter,
    /// In the engine's own loop, outside any request: the engine cannot go on.
    Loop,
}

/// A caught panic's message (its payload when it is a string).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Limits of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Rows decoded together at most.
    pub max_batch: usize,
    /// Adapters loaded at once at most. A load past it evicts the least recently used idle
    /// adapter loaded on first use; when every resident adapter is pinned (loaded at start or
    /// by `/v1/load_lora_adapter`) or in use, the load is refused (409).
    pub max_loras: usize,
    /// The context length: a row ends (`length`) once its prompt and output fill it, whatever
    /// its `max_tokens` says (the HTTP side checks it too; this is the defence behind it).
    pub max_model_len: usize,
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
    /// The tokens the penalties look at.
    history: TokenHistory,
}

impl Row {
    fn adapter_name(&self) -> &str {
        self.job.adapter.as_deref().unwrap_or(BASE_ADAPTER)
    }
}

/// The engine's state: the models, the waiting queue and the running batches.
pub struct Engine {
    model: ServedModel,
    /// The base weights (shared with `model`), from which adapters of other methods are built.
    base: AnyModel<NoAdapter>,
    others: BTreeMap<String, peft::PeftModel>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    pending: VecDeque<Job>,
    batches: BTreeMap<BatchKey, Batch>,
    injected: Option<InjectedPanic>,
    /// Adapters loaded explicitly (at start or by `/v1/load_lora_adapter`): never evicted.
    pinned: std::collections::BTreeSet<String>,
    /// When each adapter was last admitted for a request (a counter), for LRU eviction.
    last_used: BTreeMap<String, u64>,
    clock: u64,
}

impl Engine {
    /// An engine over `base` (no adapter yet), reporting through `shared`.
    pub fn new(
        base: AnyModel<NoAdapter>,
        shared: Arc<Shared>,
        limits: EngineLimits,
    ) -> peft_core::Result<Self> {
        let model = MultiLoraModel::new(base.clone())?;
        let engine = Self {
            model,
            base,
            others: BTreeMap::new(),
            shared,
            limits,
            pending: VecDeque::new(),
            batches: BTreeMap::new(),
            injected: None,
            pinned: Default::default(),
            last_used: BTreeMap::new(),
            clock: 0,
        };
        engine.publish_adapters();
        Ok(engine)
    }

    /// Test-only hook: the next operation of kind `at` panics, as a bug or a bad adapter
    /// tensor would make it.
    #[doc(hidden)]
    pub fn inject_panic(&mut self, at: InjectedPanic) {
        self.injected = Some(at);
    }

    /// Fires an injected panic of kind `at`, once.
    fn injected_panic(&mut self, at: InjectedPanic) {
        if self.injected == Some(at) {
            self.injected = None;
            panic!("injected panic ({at:?})");
        }
    }

    /// Runs `work` (an operation of kind `at`) with a panic contained: a panic is counted in the
    /// metrics and comes back as its message, for the caller to fail the requests it hit.
    fn contained<T>(
        &mut self,
        at: InjectedPanic,
        work: impl FnOnce(&mut Self) -> T,
    ) -> Result<T, String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.injected_panic(at);
            work(self)
        }))
        .map_err(|payload| {
            self.shared.engine_panicked();
            panic_message(payload.as_ref())
        })
    }

    /// The model's sizes and special tokens.
    pub fn spec(&self) -> &peft_core::ModelSpec {
        self.model.model.spec()
    }

    /// Runs until every sender of `commands` is gone and no work is left (graceful shutdown:
    /// requests already accepted finish). The engine may run again on another queue.
    pub fn run(&mut self, commands: &Receiver<Command>) {
        loop {
            if self.running() == 0 && self.pending.is_empty() {
                match commands.recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            self.injected_panic(InjectedPanic::Loop);
            self.admit();
            let keys: Vec<BatchKey> = self.batches.keys().cloned().collect();
            for key in keys {
                self.step_guarded(&key);
            }
            self.batches.retain(|_, b| !b.rows.is_empty());
            self.shared.set_batch_size(self.running());
        }
    }

    /// Every request running or waiting (a request of several choices once per running row).
    fn requests(&self) -> impl Iterator<Item = &Job> {
        self.batches
            .values()
            .flat_map(|b| b.rows.iter().map(|r| &r.job))
            .chain(&self.pending)
    }

    fn running(&self) -> usize {
        self.batches.values().map(|b| b.rows.len()).sum()
    }

    /// Loads the adapter folder `dir` as `name` (any served method), pinned: it stays until
    /// unloaded. `Err((status, message))`.
    pub fn load_adapter(&mut self, name: &str, dir: &std::path::Path) -> AdapterReply {
        self.load_named(name, dir)?;
        self.pinned.insert(name.to_string());
        Ok(())
    }

    /// Loads `dir` as `name`, evicting the least recently used idle unpinned adapter when
    /// `--max-loras` are resident.
    fn load_named(&mut self, name: &str, dir: &std::path::Path) -> AdapterReply {
        if name.is_empty() || name == BASE_ADAPTER {
            return Err((400, format!("`{name}` cannot name an adapter")));
        }
        if self.has_adapter(name) {
            return Err((400, format!("an adapter named `{name}` is already loaded")));
        }
        let loaded = self.model.adapter_names().len() + self.others.len();
        if loaded >= self.limits.max_loras && !self.evict_one() {
            return Err((
                409,
                format!(
                    "{loaded} adapters are loaded, the most this server holds (--max-loras \
                     {}), and none can be evicted (each is pinned or in use): unload one first",
                    self.limits.max_loras
                ),
            ));
        }
        let started = Instant::now();
        self.read_and_install(name, dir)?;
        self.shared.adapter_loaded(started.elapsed());
        Ok(())
    }

    /// Loads `dir` as `name` with a panic inside the load contained: whatever the load had
    /// registered under the name goes with it, and the answer is a 500 naming the panic.
    fn load_contained(
        &mut self,
        name: &str,
        dir: &std::path::Path,
        residency: Residency,
    ) -> AdapterReply {
        let loaded = self.contained(InjectedPanic::LoadAdapter, |e| match residency {
            Residency::Pinned => e.load_adapter(name, dir),
            Residency::Evictable => e.load_named(name, dir),
        });
        loaded.unwrap_or_else(|message| {
            if self.has_adapter(name) {
                let _ = self.remove_adapter(name);
            }
            Err((
                500,
                format!(
                    "loading `{name}` failed inside the engine ({message}); the server goes on"
                ),
            ))
        })
    }

    /// Evicts the least recently used adapter that is neither pinned nor used by a running or
    /// waiting request; whether one was.
    fn evict_one(&mut self) -> bool {
        let in_use: std::collections::BTreeSet<&str> = self
            .requests()
            .filter_map(|j| j.adapter.as_deref())
            .collect();
        let victim = self
            .model
            .adapter_names()
            .into_iter()
            .chain(self.others.keys().map(String::as_str))
            .filter(|n| !self.pinned.contains(*n) && !in_use.contains(n))
            .min_by_key(|n| self.last_used.get(*n).copied().unwrap_or(0))
            .map(str::to_string);
        match victim {
            Some(name) => {
                let evicted = self.remove_adapter(&name).is_ok();
                if evicted {
                    self.shared.adapter_evicted();
                }
                evicted
            }
            None => false,
        }
    }

    /// Reads `dir` and adds it as `name` to the model that serves its method.
    fn read_and_install(&mut self, name: &str, dir: &std::path::Path) -> AdapterReply {
        let peft_type = peft_core::config::read_peft_type(dir.join("adapter_config.json"))
            .map_err(|e| (400, format!("{e}")))?;
        let failed = |e: PeftError| (400, format!("loading `{name}`: {e}"));
        let method = peft::by_peft_type(peft_type);
        let own = match method.serving {
            Serving::SharedBatch => {
                self.model.load_adapter(name, dir).map_err(failed)?;
                self.publish_adapters();
                return Ok(());
            }
            Serving::OwnBatch => {
                peft::PeftModel::from_pretrained(self.base.clone(), dir).map_err(failed)?
            }
            Serving::Refused(why) => {
                return Err((
                    400,
                    format!(
                        "{} is a {} adapter: {why}. Served: {}",
                        dir.display(),
                        method.label,
                        peft::registry::served_methods()
                    ),
                ));
            }
        };
        self.others.insert(name.to_string(), own);
        self.publish_adapters();
        Ok(())
    }

    fn has_adapter(&self, name: &str) -> bool {
        self.model.adapter(name).is_ok() || self.others.contains_key(name)
    }

    /// Adds a new LoRA adapter made from `config` (PEFT's `add_adapter`: A random, B as the
    /// config's `init_lora_weights` says), for benchmarks.
    pub fn add_lora_adapter(
        &mut self,
        name: &str,
        config: peft_lora::LoraConfig,
    ) -> peft_core::Result<()> {
        if self.others.contains_key(name) {
            return Err(PeftError::InvalidInput(format!(
                "an adapter named `{name}` is already loaded"
            )));
        }
        self.model.add_adapter(name, config)?;
        self.publish_adapters();
        Ok(())
    }

    /// The model back, with the LoRA adapters it holds now.
    pub fn into_model(self) -> ServedModel {
        self.model
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.pending.push_back(job),
            Command::LoadAdapter { name, dir, reply } => {
                let _ = reply.send(self.load_contained(&name, &dir, Residency::Pinned));
            }
            Command::UnloadAdapter { name, reply } => {
                let _ = reply.send(self.unload_adapter(&name));
            }
        }
    }

    fn unload_adapter(&mut self, name: &str) -> AdapterReply {
        if !self.has_adapter(name) {
            return Err((404, format!("no adapter named `{name}` is loaded")));
        }
        let users = self
            .requests()
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
        self.remove_adapter(name)
    }

    /// Drops `name` (loaded, and used by no request) with everything kept about it.
    fn remove_adapter(&mut self, name: &str) -> AdapterReply {
        if self.others.remove(name).is_none() {
            self.model
                .delete_adapter(name)
                .map_err(|e| (400, format!("{e}")))?;
        }
        self.pinned.remove(name);
        self.last_used.remove(name);
        self.publish_adapters();
        Ok(())
    }

    fn publish_adapters(&self) {
        let lora = self.model.adapter_names().into_iter().map(str::to_string);
        self.shared
            .set_adapters(lora.chain(self.others.keys().cloned()));
    }

    /// The batch `adapter`'s rows run in.
    fn key_of(&self, adapter: Option<&str>) -> BatchKey {
        match adapter {
            Some(name) if self.others.contains_key(name) => BatchKey::Own(name.to_string()),
            _ => BatchKey::Shared,
        }
    }

    /// One forward pass of `key`'s model over `input`, rows named by `names`.
    fn forward(
        &mut self,
        key: &BatchKey,
        input: ModelInput,
        cache: &mut KvCache,
        names: &[&str],
    ) -> peft_core::Result<Tensor<3>> {
        match key {
            BatchKey::Shared => {
                self.model.set_row_adapters(Some(names))?;
                self.model.model.forward(input, Some(cache))
            }
            BatchKey::Own(name) => match self.others.get(name) {
                Some(model) => model.forward(input, Some(cache)),
                None => Err(PeftError::UnknownAdapter {
                    name: name.clone(),
                    loaded: self.shared.adapters().join(", "),
                }),
            },
        }
    }

    /// Moves waiting requests into their batches while there is room: each prompt runs alone,
    /// its first token is sent, and its cache joins its batch's.
    fn admit(&mut self) {
        let mut joined: BTreeMap<BatchKey, Vec<(Row, KvCache)>> = BTreeMap::new();
        let mut admitted = 0;
        while self.running() + admitted < self.limits.max_batch {
            let Some(job) = self.pending.pop_front() else {
                break;
            };
            // A request of `n` choices takes `n` rows: it waits for room unless nothing else
            // runs (the HTTP side keeps `n` within `max_batch`).
            let busy = self.running() + admitted;
            if busy > 0 && busy + job.choices() > self.limits.max_batch {
                self.pending.push_front(job);
                break;
            }
            self.shared.dequeued();
            if job.abandoned() {
                continue;
            }
            if let Err((status, message)) = self.ensure_adapter(&job) {
                job.send_all(Event::Refused { status, message });
                continue;
            }
            let key = self.key_of(job.adapter.as_deref());
            let failed = job.senders();
            // The closure returns `prefill`'s own result, whose error gives the job back.
            #[allow(clippy::result_large_err)]
            let prefilled = self.contained(InjectedPanic::Prefill, |e| e.prefill(&key, job));
            match prefilled {
                Ok(Ok(started)) => {
                    admitted += started.len();
                    joined.entry(key.clone()).or_default().extend(started);
                }
                Ok(Err((job, e))) => job.send_all(Event::Failed(e.to_string())),
                Err(message) => failed.send_all(Event::Failed(format!(
                    "the engine failed on this request's prompt ({message}); the server goes on"
                ))),
            }
        }
        for (key, started) in joined {
            let batch = self.batches.entry(key).or_default();
            let (rows, caches): (Vec<Row>, Vec<KvCache>) = started.into_iter().unzip();
            let all = batch.cache.take().into_iter().chain(caches).collect();
            match KvCache::concat_rows(all) {
                Ok(cache) => {
                    batch.cache = Some(cache);
                    batch.rows.extend(rows);
                }
                Err(e) => {
                    for row in batch.rows.drain(..).chain(rows) {
                        let _ = row.job.events.send(Event::Failed(e.to_string()));
                    }
                }
            }
        }
        self.shared.set_batch_size(self.running());
    }

    /// Loads `job`'s adapter on first use (`load_from`) and marks it used now.
    fn ensure_adapter(&mut self, job: &Job) -> AdapterReply {
        let Some(name) = job.adapter.as_deref() else {
            return Ok(());
        };
        if let (false, Some(dir)) = (self.has_adapter(name), &job.load_from) {
            self.load_contained(name, dir, Residency::Evictable)?;
        }
        self.clock += 1;
        self.last_used.insert(name.to_string(), self.clock);
        Ok(())
    }

    /// Runs `job`'s prompt alone and sends each choice its first token; the rows not already
    /// finished, each with its copy of the prompt's cache.
    #[allow(clippy::result_large_err)]
    fn prefill(
        &mut self,
        key: &BatchKey,
        job: Job,
    ) -> Result<Vec<(Row, KvCache)>, (Job, PeftError)> {
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
        let mut cache = KvCache::new(self.spec().num_layers);
        let positions = if job.prompt_logprobs.is_some() { n } else { 1 };
        let logits = match self
            .forward(key, input, &mut cache, &[adapter.as_str()])
            .and_then(|l| last_positions(l, positions))
        {
            Ok(l) => l,
            Err(e) => return Err((job, e)),
        };
        if let Some(top) = job.prompt_logprobs {
            // Position i's logits predict token i + 1; the first token has no predecessor.
            let entries = std::iter::once(None)
                .chain(
                    job.prompt[1..]
                        .iter()
                        .zip(&logits)
                        .map(|(&t, l)| Some(token_logprob(l, t, top))),
                )
                .collect();
            job.send_all(Event::PromptLogprobs(entries));
        }
        self.shared.started(&adapter, n);
        if job.max_tokens == 0 {
            // The prompt alone was asked for (`echo` with `max_tokens: 0`).
            job.send_all(Event::Finished {
                reason: FinishReason::Length,
                generated: 0,
            });
            return Ok(Vec::new());
        }
        let logits = &logits[logits.len() - 1];
        let history = TokenHistory::new(&job.prompt, &job.adjust);
        let mut started = Vec::with_capacity(job.choices());
        for index in 0..job.choices() {
            let choice = job.choice(index);
            let rng = match choice.decoding {
                Decoding::Sample { seed, .. } => StdRng::seed_from_u64(seed),
                Decoding::Greedy => StdRng::seed_from_u64(0),
            };
            let mut row = Row {
                job: choice,
                generated: 0,
                last: 0,
                // Prefixes and virtual tokens count: the next position follows the whole cache.
                position: cache.past_len() - 1,
                rng,
                history: history.clone(),
            };
            if !self.emit(&mut row, logits) {
                started.push((row, cache.clone()));
            }
        }
        Ok(started)
    }

    /// Chooses `row`'s next token from `logits` and sends it; whether the row is finished.
    fn emit(&self, row: &mut Row, logits: &[f32]) -> bool {
        let adjust = &row.job.adjust;
        let eos_ids = &self.spec().eos_token_ids;
        let token = if adjust.leaves_logits() {
            peft_models::generate::choose(logits, row.job.decoding, &mut row.rng)
        } else {
            let mut logits = logits.to_vec();
            let mut stop_ids = adjust.stop_token_ids.clone();
            if !row.job.ignore_eos {
                stop_ids.extend(eos_ids.iter().copied());
            }
            row.history.apply(adjust, &mut logits, &stop_ids);
            peft_models::generate::choose(&logits, row.job.decoding, &mut row.rng)
        };
        if let Some(top) = row.job.logprobs {
            // The raw logits' log-probabilities (vLLM's default), whatever the sampler saw.
            let _ = row
                .job
                .events
                .send(Event::Logprob(token_logprob(logits, token, top)));
        }
        row.history.push(token, &row.job.adjust);
        row.generated += 1;
        row.last = token;
        row.position += 1;
        self.shared.generated(row.adapter_name(), 1);
        let eos = (!row.job.ignore_eos && self.spec().eos_token_ids.contains(&token))
            || row.job.adjust.stop_token_ids.contains(&token);
        let reason = if eos {
            Some(FinishReason::Stop)
        } else if row.job.events.send(Event::Token(token)).is_err() {
            return true;
        } else if row.generated >= row.job.max_tokens
            || row.position + 1 >= self.limits.max_model_len
        {
            // `position` is where `token` would be fed: the sequence holds `position + 1`
            // tokens, and a full context takes no next step.
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

    /// [`Self::step`], with a panic contained: the rows of that batch fail with the panic's
    /// message (a 500 on the HTTP side) and leave; every other batch goes on.
    fn step_guarded(&mut self, key: &BatchKey) {
        let senders: Vec<mpsc::UnboundedSender<Event>> = self
            .batches
            .get(key)
            .map(|b| b.rows.iter().map(|r| r.job.events.clone()).collect())
            .unwrap_or_default();
        if let Err(message) = self.contained(InjectedPanic::Step, |e| e.step(key)) {
            // The batch's cache and rows may be half-updated: the batch goes.
            self.batches.remove(key);
            let message = format!(
                "the engine failed while decoding this request ({message}); the server goes on"
            );
            for events in senders {
                let _ = events.send(Event::Failed(message.clone()));
            }
        }
    }

    /// One decoding step over the rows of batch `key`; finished rows leave it.
    fn step(&mut self, key: &BatchKey) {
        let started = Instant::now();
        let Some(mut batch) = self.batches.remove(key) else {
            return;
        };
        let rows = batch.rows.len();
        let Some(mut cache) = batch.cache.take().filter(|_| rows > 0) else {
            return;
        };
        let device = self.model.model.device();
        let ids: Vec<i64> = batch.rows.iter().map(|r| r.last as i64).collect();
        let positions: Vec<i64> = batch.rows.iter().map(|r| r.position as i64).collect();
        let mut input = ModelInput::new(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [rows, 1]),
            &device,
        ));
        input.position_ids = Some(Tensor::<2, Int>::from_data(
            TensorData::new(positions, [rows, 1]),
            &device,
        ));
        let names: Vec<String> = batch.rows.iter().map(|r| r.adapter_name().into()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let logits = match self
            .forward(key, input, &mut cache, &names)
            .and_then(|l| last_logits(l, rows))
        {
            Ok(logits) => logits,
            Err(e) => {
                for row in batch.rows {
                    let _ = row.job.events.send(Event::Failed(e.to_string()));
                }
                return;
            }
        };
        let keep: Vec<usize> = batch
            .rows
            .iter_mut()
            .zip(&logits)
            .enumerate()
            .filter_map(|(i, (row, l))| (!self.emit(row, l)).then_some(i))
            .collect();
        self.shared.step_done(rows, started.elapsed());
        if keep.len() < rows && !keep.is_empty() {
            match cache.select_rows(&keep).and_then(|mut c| {
                c.trim_padding()?;
                Ok(c)
            }) {
                Ok(c) => cache = c,
                Err(e) => {
                    for row in batch.rows {
                        let _ = row.job.events.send(Event::Failed(e.to_string()));
                    }
                    return;
                }
            }
            let mut all: Vec<Option<Row>> = batch.rows.drain(..).map(Some).collect();
            batch.rows = keep.iter().filter_map(|&i| all[i].take()).collect();
        } else if keep.is_empty() {
            return;
        }
        batch.cache = Some(cache);
        self.batches.insert(key.clone(), batch);
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

/// The logits of the last `positions` positions of a one-row batch, `[vocab]` each (a prompt's
/// own positions: virtual tokens of prompt learning come before them).
fn last_positions(logits: Tensor<3>, positions: usize) -> peft_core::Result<Vec<Vec<f32>>> {
    let [_, seq, vocab] = logits.dims();
    let positions = positions.min(seq);
    let values = logits
        .slice_dim(1, seq - positions..seq)
        .reshape([positions, vocab])
        .into_data()
        .try_to_vec_as::<f32>()
        .map_err(|e| PeftError::InvalidInput(format!("reading logits: {e:?}")))?;
    Ok(values.chunks(vocab).map(<[f32]>::to_vec).collect())
}
