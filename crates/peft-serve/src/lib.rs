//! # peft-serve
//!
//! An OpenAI-compatible HTTP server for one base model with many LoRA adapters resident, as
//! vLLM's and LoRAX's multi-LoRA serving: a request's `model` names an adapter (or the base),
//! and rows of different adapters are decoded together in one batch.
//!
//! * [`engine`] — continuous batching on one model thread: waiting requests join the running
//!   batch at every step, finished or abandoned ones leave it at once;
//! * [`routes`] — `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
//!   `GET /v1/models`, vLLM's `POST /v1/load_lora_adapter` / `unload_lora_adapter`,
//!   `GET /health`, `GET /metrics`;
//! * [`api`] — the request/response bodies and OpenAI's error shape;
//! * [`connections`] — accepting connections: the connection cap and the header deadline;
//! * [`text`] — tokens to text with stop strings;
//! * [`logprobs`] — log-probabilities of tokens (`logprobs`, `top_logprobs`, `echo`);
//! * [`metrics`] — the shared counters and the bounded queue;
//! * [`client`] — a minimal blocking HTTP client for the tests and the load test.
//!
//! LoRA adapters share one batch with the base (PEFT's `adapter_names`); IA3, LoHa, LoKr, VeRA, prompt tuning,
//! P-tuning and prefix tuning adapters are served too, each in a batch of its own over the
//! same base weights. BitFit adapters (which replace base biases) are refused: serve the
//! merged model.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_serve::{ServeOptions, serve};
//!
//! let mut options = ServeOptions::new("tests/fixtures/models/bloom-tiny", Device::flex());
//! options.adapters.push(("support".into(), "adapters/support".into()));
//! options.port = 8000;
//! // Runs until Ctrl-C or SIGTERM, then finishes the requests in flight.
//! serve(options).unwrap();
//! ```

pub mod api;
pub mod client;
pub mod connections;
pub mod engine;
pub mod logprobs;
pub mod metrics;
pub mod penalties;
pub mod routes;
pub mod text;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use peft_core::PeftError;
use peft_models::{LoadOptions, Tokenizer};

use crate::engine::{Engine, EngineLimits};
use crate::metrics::Shared;
use crate::routes::AppState;

/// The context length of a model whose config names none (BLOOM's ALiBi configs): 2048, the
/// length BLOOM was trained with.
pub const DEFAULT_MAX_MODEL_LEN: usize = 2048;

/// Adapters resident at once at most by default (`--max-loras`): generous for a CPU's memory
/// with small adapters, and a bound on what runtime loads can pile up.
pub const DEFAULT_MAX_LORAS: usize = 64;

/// How long requests in flight may take to finish after the shutdown signal (`--shutdown-timeout`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Rows decoded together at most by default (`--max-batch`).
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Default for [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default for [`ServeOptions::read_timeout`] (hyper's own default for headers).
pub const DEFAULT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default for [`ServeOptions::request_timeout`]: ten minutes, room for a long completion on a
/// CPU.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Everything `peft serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Hugging Face model folder.
    pub model: PathBuf,
    /// LoRA adapters loaded at start, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// Address to listen on.
    pub host: String,
    /// Port (0: any free port, reported through the ready callback).
    pub port: u16,
    /// Requests to `/v1` must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The folder runtime-loaded adapters must lie in: a request naming one of its adapter
    /// folders loads it on first use, `/v1/load_lora_adapter` loads from it; `None` turns
    /// runtime loading off.
    pub adapter_dir: Option<PathBuf>,
    /// Prompt + generated tokens at most (default: the config's `max_position_embeddings`, or
    /// [`DEFAULT_MAX_MODEL_LEN`]).
    pub max_model_len: Option<usize>,
    /// Requests waiting to join the batch at most; more get 429.
    pub max_queue: usize,
    /// Sequences decoded together at most (and the most choices, `n`, per request).
    pub max_batch: usize,
    /// The base model's name in requests (default: the model folder's name).
    pub served_model_name: Option<String>,
    /// Where the model runs.
    pub device: Device,
    /// How the base loads (4-bit, compute dtype).
    pub load: LoadOptions,
    /// Adapters resident at once at most: past it the least recently used idle adapter loaded
    /// on first use is evicted (start-up and `/v1/load_lora_adapter` ones are pinned).
    pub max_loras: usize,
    /// After the shutdown signal, how long requests in flight may take to finish; then they are
    /// cut (their clients see the connection close) and the server ends.
    pub shutdown_timeout: std::time::Duration,
    /// Open connections at most; past it, new ones wait until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and between the chunks of its body.
    pub read_timeout: std::time::Duration,
    /// Time a request may take until its response starts (a whole non-streamed completion, a
    /// streamed one's start); past it, 408.
    pub request_timeout: std::time::Duration,
    /// Test-only: a panic the engine raises once (see [`engine::Engine::inject_panic`]).
    #[doc(hidden)]
    pub inject_panic: Option<engine::InjectedPanic>,
}

impl ServeOptions {
    /// Defaults for `model` on `device`: 127.0.0.1:8000, no key, batches of 16, a queue of 64.
    pub fn new(model: impl Into<PathBuf>, device: Device) -> Self {
        Self {
            model: model.into(),
            adapters: Vec::new(),
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            adapter_dir: None,
            max_model_len: None,
            max_queue: 64,
            max_batch: DEFAULT_MAX_BATCH,
            served_model_name: None,
            device,
            load: LoadOptions::default(),
            max_loras: DEFAULT_MAX_LORAS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            read_timeout: DEFAULT_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            inject_panic: None,
        }
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model, its tokenizer or an adapter failed to load.
    #[error(transparent)]
    Model(#[from] PeftError),
    /// A start-up option is unusable.
    #[error("{0}")]
    Option(String),
    /// The address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server or its runtime failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    /// The engine thread ended unexpectedly.
    #[error("the model thread stopped: {0}")]
    Engine(String),
}

/// Serves until Ctrl-C or SIGTERM, then finishes the requests in flight and returns.
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let first_signal = async {
        shutdown_signal().await;
        eprintln!("peft serve: shutting down (a second signal exits at once)");
        // A second SIGINT/SIGTERM while draining: exit now, as an impatient operator asks.
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("peft serve: second signal, exiting without draining");
            std::process::exit(130);
        });
    };
    serve_until(options, first_signal, |addr| {
        println!("peft serve: listening on http://{addr}");
    })
}

/// Serves until `shutdown` completes; `ready` gets the bound address once requests are
/// accepted. In-flight requests finish before this returns.
pub fn serve_until(
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    if options.max_batch == 0 || options.max_queue == 0 {
        return Err(ServeError::Option(
            "--max-batch and --max-queue must be at least 1".into(),
        ));
    }
    let adapter_dir = match &options.adapter_dir {
        Some(dir) => Some(
            dir.canonicalize()
                .map_err(|e| ServeError::Option(format!("--adapter-dir {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let base_name = options.served_model_name.clone().unwrap_or_else(|| {
        options
            .model
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    });
    if options.adapters.iter().any(|(name, _)| *name == base_name) {
        return Err(ServeError::Option(format!(
            "an adapter may not be named `{base_name}`, the base model's name"
        )));
    }
    let tokenizer = Tokenizer::from_dir(&options.model)?;
    let max_model_len = match options.max_model_len {
        Some(n) if n > 0 => n,
        Some(_) => {
            return Err(ServeError::Option(
                "--max-model-len must be positive".into(),
            ));
        }
        None => config_context_length(&options.model)?.unwrap_or(DEFAULT_MAX_MODEL_LEN),
    };
    let shared = Arc::new(Shared::new(&base_name));
    let (commands, receiver) = std::sync::mpsc::channel();
    let (loaded, ready_model) = std::sync::mpsc::channel();
    let engine_shared = shared.clone();
    let limits = EngineLimits {
        max_batch: options.max_batch,
        max_loras: options.max_loras,
        max_model_len,
    };
    let load = options.clone();
    // Fired if the engine stops for good: the server then shuts down and `serve` fails, so the
    // process exits non-zero and an orchestrator restarts it.
    let (engine_down, engine_went_down) = tokio::sync::oneshot::channel::<()>();
    // The model lives on its own thread: every forward pass runs there, and HTTP handlers
    // never wait on it except through channels.
    let engine = std::thread::Builder::new()
        .name("peft-engine".into())
        .spawn(
            move || match start_engine(&load, engine_shared.clone(), limits) {
                Ok(mut engine) => {
                    if let Some(at) = load.inject_panic {
                        engine.inject_panic(at);
                    }
                    // The engine has published its adapters: requests may come.
                    let _ = loaded.send(Ok(engine.spec().vocab_size));
                    // Panics inside one request are contained by the engine itself; one that
                    // reaches here (its own loop) leaves no engine to serve with.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.run(&receiver)
                    }));
                    if let Err(payload) = ran {
                        engine_shared.set_engine_stopped(format!(
                            "the engine panicked: {}",
                            engine::panic_message(payload.as_ref())
                        ));
                        let _ = engine_down.send(());
                    }
                }
                Err(e) => {
                    let _ = loaded.send(Err(e));
                }
            },
        )?;
    let vocab_size = match ready_model.recv() {
        Ok(Ok(vocab)) => vocab,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ServeError::Engine("it ended while loading".into())),
    };
    let health = shared.clone();
    let mut state = AppState::new(
        commands,
        shared,
        tokenizer,
        base_name,
        max_model_len,
        options.max_queue,
        vocab_size,
        options.api_key.clone(),
        adapter_dir,
    );
    state.max_choices = options.max_batch;
    let state = Arc::new(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let addr = format!("{}:{}", options.host, options.port);
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr()?;
        if let Some(warning) = unguarded_warning(&local, options.api_key.is_some()) {
            tracing::warn!("{warning}");
        }
        ready(local);
        let (stopping, stop_began) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                _ = engine_went_down => {}
            }
            let _ = stopping.send(());
        };
        // The drain deadline: from the signal on, requests in flight get `shutdown_timeout`.
        let timeout = options.shutdown_timeout;
        let deadline = async move {
            if stop_began.await.is_ok() {
                tokio::time::sleep(timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let timeouts = routes::RequestTimeouts {
            body: options.read_timeout,
            request: options.request_timeout,
        };
        let app = routes::router(state, timeouts);
        let limits = connections::ConnectionLimits {
            max_connections: options.max_connections,
            header_read_timeout: options.read_timeout,
        };
        tokio::select! {
            () = connections::serve(listener, app, limits, stop) => {}
            () = deadline => tracing::warn!(
                "requests still in flight {timeout:?} after the shutdown signal were cut"
            ),
        }
        Ok::<_, ServeError>(())
    });
    // The router (and with it the engine's last command sender) is gone: the engine finishes
    // what it holds and ends.
    drop(runtime);
    engine
        .join()
        .map_err(|_| ServeError::Engine("it panicked".into()))?;
    if let Some(why) = health.engine_stopped() {
        return Err(ServeError::Engine(why));
    }
    served
}

/// The warning a server listening on `addr` without an API key deserves: anyone who can reach
/// a non-loopback address can then use (and load adapters into) it.
fn unguarded_warning(addr: &SocketAddr, has_key: bool) -> Option<String> {
    (!has_key && !addr.ip().is_loopback()).then(|| {
        format!(
            "listening on {addr} without an API key: any client that reaches this address may \
             generate and load adapters (set --api-key or PEFT_API_KEY)"
        )
    })
}

/// The engine over the base with the start-up adapters.
fn start_engine(
    options: &ServeOptions,
    shared: Arc<Shared>,
    limits: EngineLimits,
) -> Result<Engine, ServeError> {
    let base = peft_models::load_with(&options.model, &options.device, &options.load)?;
    let mut engine = Engine::new(base, shared, limits)?;
    for (name, dir) in &options.adapters {
        engine.load_adapter(name, dir).map_err(|(_, message)| {
            ServeError::Option(format!("--adapter {name}={}: {message}", dir.display()))
        })?;
    }
    Ok(engine)
}

/// The context length `config.json` states, under any of the names architectures use.
fn config_context_length(dir: &Path) -> Result<Option<usize>, ServeError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(&path, e))?;
    Ok([
        "max_position_embeddings",
        "n_positions",
        "seq_length",
        "max_sequence_length",
    ]
    .iter()
    .find_map(|k| value.get(*k).and_then(serde_json::Value::as_u64))
    .map(|n| n as usize))
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a non-loopback address without a key is warned about.
    #[test]
    fn an_open_address_without_a_key_is_warned_about() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let warning = unguarded_warning(&addr("0.0.0.0:8000"), false).unwrap();
        assert!(
            warning.contains("0.0.0.0:8000 without an API key"),
            "{warning}"
        );
        assert!(unguarded_warning(&addr("[::]:8000"), false).is_some());
        assert_eq!(unguarded_warning(&addr("0.0.0.0:8000"), true), None);
        assert_eq!(unguarded_warning(&addr("127.0.0.1:8000"), false), None);
        assert_eq!(unguarded_warning(&addr("[::1]:8000"), false), None);
    }
}
