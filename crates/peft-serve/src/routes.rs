//! The HTTP API: OpenAI's completions, chat completions and models list, vLLM's adapter
//! loading and unloading, health and metrics.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use peft_models::{Decoding, Tokenizer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    ApiError, ChatRequest, CompletionRequest, LoadAdapterRequest, Prompt, Sampling,
    UnloadAdapterRequest, Usage, parse_body,
};
use crate::engine::{AdapterReply, Command, Event, Job};
use crate::logprobs::{self, TokenLogprob};
use crate::metrics::Shared;
use crate::penalties::LogitAdjustments;
use crate::text::TextStream;

/// What every handler reads.
pub struct AppState {
    /// The engine's command queue.
    pub commands: std::sync::Mutex<std::sync::mpsc::Sender<Command>>,
    /// State shared with the engine.
    pub shared: Arc<Shared>,
    /// The model's tokenizer (and chat template).
    pub tokenizer: Tokenizer,
    /// The base model's name in requests and `/v1/models`.
    pub base_name: String,
    /// Prompt + generated tokens at most.
    pub max_model_len: usize,
    /// Requests waiting at most before 429.
    pub max_queue: usize,
    /// Vocabulary size (prompt ids are checked against it).
    pub vocab_size: usize,
    /// `Authorization: Bearer` key of every `/v1` route, if set.
    pub api_key: Option<String>,
    /// Where runtime-loaded adapters must lie (canonical), if loading is enabled.
    pub adapter_dir: Option<PathBuf>,
    /// When the server started (`created` of `/v1/models`).
    pub started: u64,
    /// Choices a request may ask for at most (`n`): each is a row of the batch, so the server
    /// sets it to its `max_batch`.
    pub max_choices: usize,
    next_id: AtomicU64,
}

impl AppState {
    /// The state of a server; `commands` feeds the engine.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        commands: std::sync::mpsc::Sender<Command>,
        shared: Arc<Shared>,
        tokenizer: Tokenizer,
        base_name: String,
        max_model_len: usize,
        max_queue: usize,
        vocab_size: usize,
        api_key: Option<String>,
        adapter_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            commands: std::sync::Mutex::new(commands),
            shared,
            tokenizer,
            base_name,
            max_model_len,
            max_queue,
            vocab_size,
            api_key,
            adapter_dir,
            started: unix_now(),
            max_choices: crate::DEFAULT_MAX_BATCH,
            next_id: AtomicU64::new(1),
        }
    }

    fn send(&self, command: Command) -> Result<(), ApiError> {
        let sender = self
            .commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sender.send(command).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            )
        })
    }
}

/// A body that could not be read (too large, cut short) as an OpenAI error.
fn body_error(rejection: BytesRejection) -> ApiError {
    ApiError::new(
        rejection.status(),
        format!("reading the request body: {rejection}"),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `ok` while the engine runs; 503 naming why once it has stopped for good (an orchestrator's
/// liveness probe then restarts the server, which exits non-zero by itself too).
async fn health(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    match state.shared.engine_stopped() {
        None => Ok("ok"),
        Some(why) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)),
    }
}

/// How long a request may take (tower-http's timeouts, inside the response count).
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeouts {
    /// Between chunks of a request's body.
    pub body: std::time::Duration,
    /// Until the response starts.
    pub request: std::time::Duration,
}

/// The router of every route over `state`.
pub fn router(state: Arc<AppState>, timeouts: RequestTimeouts) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer((
            tower_http::timeout::RequestBodyTimeoutLayer::new(timeouts.body),
            tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                timeouts.request,
            ),
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// Counts every response by status for `/metrics`; gives the timeouts' bare 408 OpenAI's
/// error body.
async fn count_responses(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT
        && response.headers().get(header::CONTENT_TYPE).is_none()
    {
        response = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request timed out: its body stalled past --read-timeout, or its answer took \
             longer than --request-timeout",
        )
        .into_response();
    }
    state.shared.responded(response.status().as_u16());
    response
}

/// 401 unless the request carries `Authorization: Bearer <key>` (compared in constant time).
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let equal: bool = given.as_bytes().ct_eq(key.as_bytes()).into();
        if !equal {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send `Authorization: Bearer <key>`)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.shared.render(),
    )
}

/// `GET /v1/models` query: `all=true` also lists the adapters under `--adapter-dir` that are
/// not loaded (each is loaded on its first request).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ModelsQuery {
    all: bool,
}

async fn models(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(query): axum::extract::Query<ModelsQuery>,
) -> impl IntoResponse {
    let created = state.started;
    let mut data = vec![json!({
        "id": state.base_name, "object": "model", "created": created, "owned_by": "peft-rs",
        "root": state.base_name, "parent": null, "max_model_len": state.max_model_len,
    })];
    let loaded = state.shared.adapters();
    let all = query.all;
    let on_disk = if all {
        adapters_on_disk(&state)
    } else {
        Vec::new()
    };
    let available = on_disk.into_iter().filter(|n| !loaded.contains(n));
    let entries = loaded
        .iter()
        .map(|n| (n.clone(), true))
        .chain(available.map(|n| (n, false)));
    for (name, resident) in entries {
        let mut entry = json!({
            "id": name, "object": "model", "created": created, "owned_by": "peft-rs",
            "root": name, "parent": state.base_name, "max_model_len": state.max_model_len,
        });
        if all {
            // Not OpenAI's: whether the adapter is in memory now.
            entry["loaded"] = json!(resident);
        }
        data.push(entry);
    }
    axum::Json(json!({"object": "list", "data": data}))
}

/// Resolves `lora_path` inside the adapter folder: no `..`, and after following symlinks still
/// inside it; 403 otherwise (or when runtime loading is off).
fn adapter_path(state: &AppState, requested: &str) -> Result<PathBuf, ApiError> {
    let Some(root) = &state.adapter_dir else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "loading adapters at run time is off: start the server with --adapter-dir DIR",
        ));
    };
    let requested = Path::new(requested);
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "lora_path may not contain `..`",
        ));
    }
    let joined = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    let resolved = joined.canonicalize().map_err(|e| {
        if joined.starts_with(root) {
            ApiError::not_found(format!("adapter folder {}: {e}", requested.display()))
        } else {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("{} is outside the adapter folder", requested.display()),
            )
        }
    })?;
    if !resolved.starts_with(root) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is outside the adapter folder (symlinks are followed)",
                requested.display()
            ),
        ));
    }
    // The files inside too: an allowed folder whose adapter_model.safetensors is a symlink to
    // a file elsewhere would otherwise be read from outside the adapter folder.
    if let Ok(entries) = std::fs::read_dir(&resolved) {
        for entry in entries.flatten() {
            let path = entry.path();
            let inside = path.canonicalize().is_ok_and(|p| p.starts_with(root));
            if !inside {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{}/{} leads outside the adapter folder (symlinks are followed)",
                        requested.display(),
                        entry.file_name().to_string_lossy()
                    ),
                ));
            }
        }
    }
    Ok(resolved)
}

async fn adapter_command(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<AdapterReply>) -> Command,
) -> Result<(), ApiError> {
    let (reply, answer) = oneshot::channel();
    state.send(make(reply))?;
    match answer.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((status, message))) => Err(ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            message,
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )),
    }
}

async fn load_adapter(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let request: LoadAdapterRequest = parse_body(&body.map_err(body_error)?)?;
    if request.lora_name == state.base_name {
        return Err(ApiError::bad_field(
            "lora_name",
            format!("`{}` is the base model's name", request.lora_name),
        ));
    }
    let dir = adapter_path(&state, &request.lora_path)?;
    let name = request.lora_name.clone();
    adapter_command(&state, |reply| Command::LoadAdapter { name, dir, reply }).await?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        request.lora_name
    ))
}

async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let request: UnloadAdapterRequest = parse_body(&body.map_err(body_error)?)?;
    let name = request.lora_name.clone();
    adapter_command(&state, |reply| Command::UnloadAdapter { name, reply }).await?;
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        request.lora_name
    ))
}

/// Stop strings per request at most (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// The most `stop_token_ids` and `logit_bias` entries a request may carry (each is looked at
/// for every generated token).
pub const MAX_TOKEN_LIST: usize = 1024;
/// Characters per stop string at most: each generated token's text is scanned for every stop
/// string, so their length bounds that work (docs/SERVING.md).
pub const MAX_STOP_CHARS: usize = 256;

/// A checked generation: the adapter, decoding, stop strings and token budget of a request.
struct Plan {
    adjust: LogitAdjustments,
    model: String,
    adapter: Option<String>,
    prompt: Vec<u32>,
    max_tokens: usize,
    decoding: Decoding,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Choices to generate (OpenAI's `n`).
    n: usize,
    /// The adapter's folder when it is loaded on first use.
    load_from: Option<PathBuf>,
    ignore_eos: bool,
    /// Each token's log-probability with this many most likely tokens, if asked.
    logprobs: Option<usize>,
    /// `echo`: the prompt's text, returned before the output.
    echo: Option<String>,
}

/// The most likely tokens a request may ask for with each log-probability (vLLM's default
/// `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// How many most likely tokens come with each token's log-probability, if any are asked for:
/// completions' `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k` (default 0).
fn requested_logprobs(endpoint: Endpoint, sampling: &Sampling) -> Result<Option<usize>, ApiError> {
    let too_many = |field: &str, k: &Value| {
        ApiError::bad_field(
            field,
            format!("{field} must be an integer in [0, {MAX_LOGPROBS}], got {k}"),
        )
    };
    match endpoint {
        Endpoint::Completions => match &sampling.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(k) if k as usize <= MAX_LOGPROBS => Ok(Some(k as usize)),
                _ => Err(too_many("logprobs", v)),
            },
        },
        Endpoint::Chat => {
            let on = match &sampling.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(v) => {
                    return Err(ApiError::bad_field(
                        "logprobs",
                        format!("logprobs must be true or false, got {v}"),
                    ));
                }
            };
            match sampling.top_logprobs {
                Some(k) if k > MAX_LOGPROBS => Err(too_many("top_logprobs", &json!(k))),
                Some(k) if k > 0 && !on => Err(ApiError::bad_field(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                )),
                k => Ok(on.then(|| k.unwrap_or(0))),
            }
        }
    }
}

/// The request's penalties, biases, `min_tokens` and stop token ids, checked as vLLM and
/// OpenAI check them: penalties in `[-2, 2]`, a positive `repetition_penalty`, token ids in the
/// vocabulary, `min_tokens ≤ max_tokens`; biases clamped to `[-100, 100]`.
fn adjustments(
    state: &AppState,
    sampling: &Sampling,
    max_tokens: usize,
) -> Result<LogitAdjustments, ApiError> {
    let mut adjust = LogitAdjustments::default();
    for (field, value, slot) in [
        (
            "presence_penalty",
            sampling.presence_penalty,
            &mut adjust.presence_penalty,
        ),
        (
            "frequency_penalty",
            sampling.frequency_penalty,
            &mut adjust.frequency_penalty,
        ),
    ] {
        if let Some(v) = value {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} must be in [-2, 2], got {v}"),
                ));
            }
            *slot = v;
        }
    }
    if let Some(rho) = sampling.repetition_penalty {
        if !(rho > 0.0 && rho.is_finite()) {
            return Err(ApiError::bad_field(
                "repetition_penalty",
                format!("repetition_penalty must be a positive number, got {rho}"),
            ));
        }
        adjust.repetition_penalty = rho;
    }
    let in_vocabulary = |field: &str, t: u32| {
        if (t as usize) < state.vocab_size {
            Ok(t)
        } else {
            Err(ApiError::bad_field(
                field,
                format!(
                    "token id {t} is outside the vocabulary of {}",
                    state.vocab_size
                ),
            ))
        }
    };
    let too_many = |field: &str, n: usize| {
        if n > MAX_TOKEN_LIST {
            Err(ApiError::bad_field(
                field,
                format!("at most {MAX_TOKEN_LIST} entries, got {n}"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(bias) = &sampling.logit_bias {
        too_many("logit_bias", bias.len())?;
        for (key, &value) in bias {
            let Ok(t) = key.parse::<u32>() else {
                return Err(ApiError::bad_field(
                    "logit_bias",
                    format!("`{key}` is not a token id"),
                ));
            };
            if !value.is_finite() {
                return Err(ApiError::bad_field(
                    "logit_bias",
                    format!("the bias of token {key} is not a number"),
                ));
            }
            adjust
                .logit_bias
                .push((in_vocabulary("logit_bias", t)?, value.clamp(-100.0, 100.0)));
        }
    }
    if let Some(ids) = &sampling.stop_token_ids {
        too_many("stop_token_ids", ids.len())?;
        for &t in ids {
            adjust
                .stop_token_ids
                .push(in_vocabulary("stop_token_ids", t)?);
        }
    }
    if let Some(min) = sampling.min_tokens {
        if min > max_tokens {
            return Err(ApiError::bad_field(
                "min_tokens",
                format!("min_tokens ({min}) must be at most max_tokens ({max_tokens})"),
            ));
        }
        adjust.min_tokens = min;
    }
    Ok(adjust)
}

/// Checks the shared fields; `default_max` is used when the request sets no `max_tokens`.
fn plan(
    state: &AppState,
    sampling: Sampling,
    prompt: Vec<u32>,
    default_max: Option<usize>,
    endpoint: Endpoint,
) -> Result<Plan, ApiError> {
    let mut load_from = None;
    let adapter = if sampling.model == state.base_name {
        None
    } else if state.shared.has_adapter(&sampling.model) {
        Some(sampling.model.clone())
    } else if let Some(dir) = on_disk_adapter(state, &sampling.model) {
        // Loaded by the engine when the request is admitted (LoRAX's dynamic adapters).
        load_from = Some(dir);
        Some(sampling.model.clone())
    } else {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(format!(
                "the model `{}` does not exist (served: {})",
                sampling.model,
                std::iter::once(state.base_name.clone())
                    .chain(state.shared.adapters())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        });
    };
    let n = sampling.n.unwrap_or(1);
    if n == 0 || n > state.max_choices {
        return Err(ApiError::bad_field(
            "n",
            format!(
                "n must be in [1, {}] (each choice is a row of the batch: --max-batch)",
                state.max_choices
            ),
        ));
    }
    if sampling.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_field(
            "best_of",
            "best_of is served only equal to n (every choice is returned)",
        ));
    }
    if sampling.echo && endpoint == Endpoint::Chat {
        return Err(ApiError::bad_field(
            "echo",
            "echo is served on /v1/completions",
        ));
    }
    let logprobs = requested_logprobs(endpoint, &sampling)?;
    if sampling.tools.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_field("tools", "tools are not served"));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_field("prompt", "the prompt has no tokens"));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= state.vocab_size) {
        return Err(ApiError::bad_field(
            "prompt",
            format!(
                "token id {bad} is outside the vocabulary of {}",
                state.vocab_size
            ),
        ));
    }
    let room = state.max_model_len.saturating_sub(prompt.len());
    let max_tokens = sampling
        .max_tokens
        .or(sampling.max_completion_tokens)
        .or(default_max)
        .unwrap_or(room);
    // `max_tokens: 0` scores the prompt alone (`echo`), which may then fill the context.
    let scores_only = max_tokens == 0 && sampling.echo;
    if max_tokens == 0 && !scores_only && prompt.len() < state.max_model_len {
        return Err(ApiError::bad_field(
            "max_tokens",
            "max_tokens must be at least 1 (or 0 with echo)",
        ));
    }
    let too_long = if scores_only {
        prompt.len() > state.max_model_len
    } else {
        prompt.len() >= state.max_model_len
    };
    // `max_tokens > room`, not `prompt + max_tokens > context`: a client's `max_tokens` near
    // `usize::MAX` must not wrap the sum past the check.
    if too_long || max_tokens > room {
        return Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "this model's context is {} tokens: the prompt has {} and max_tokens asks for {} \
                 more",
                state.max_model_len,
                prompt.len(),
                max_tokens
            ),
        ));
    }
    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_field(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_field(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let decoding = if temperature == 0.0 {
        Decoding::Greedy
    } else {
        Decoding::Sample {
            temperature,
            top_p,
            seed: sampling.seed.unwrap_or_else(rand::random),
        }
    };
    let adjust = adjustments(state, &sampling, max_tokens)?;
    let stops = sampling.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_field(
            "stop",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    if let Some(long) = stops.iter().find(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::bad_field(
            "stop",
            format!(
                "a stop string may have at most {MAX_STOP_CHARS} characters (one has {})",
                long.chars().count()
            ),
        ));
    }
    Ok(Plan {
        adjust,
        model: sampling.model,
        adapter,
        prompt,
        max_tokens,
        decoding,
        stops,
        stream: sampling.stream,
        ignore_eos: sampling.ignore_eos,
        include_usage: sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        logprobs,
        echo: None,
        n,
        load_from,
    })
}

/// The folder of adapter `name` under `--adapter-dir`, if `name` is one plain folder name there
/// holding an `adapter_config.json` (the folder checks of `/v1/load_lora_adapter` apply).
fn on_disk_adapter(state: &AppState, name: &str) -> Option<PathBuf> {
    // `x`, not `x/`, `./x`, `..` or `a/b`: the name is the folder's own.
    let plain = Path::new(name).file_name() == Some(std::ffi::OsStr::new(name));
    if !plain || state.adapter_dir.is_none() {
        return None;
    }
    let dir = adapter_path(state, name).ok()?;
    dir.join("adapter_config.json").is_file().then_some(dir)
}

/// Adapter folders under `--adapter-dir` (each holding an `adapter_config.json`), by name.
fn adapters_on_disk(state: &AppState) -> Vec<String> {
    let Some(root) = &state.adapter_dir else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| on_disk_adapter(state, name).is_some())
        .collect();
    names.sort();
    names
}

/// Queues `plan`'s job; the events of each of its choices.
fn submit(state: &AppState, plan: &Plan) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    if !state.shared.try_enqueue(state.max_queue) {
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} requests wait); retry later",
                    state.max_queue
                ),
            )
        });
    }
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..plan.n).map(|_| mpsc::unbounded_channel()).unzip();
    let mut senders = senders.into_iter();
    let Some(events) = senders.next() else {
        return Err(ApiError::bad_field("n", "n must be at least 1"));
    };
    let job = Job {
        adapter: plan.adapter.clone(),
        prompt: plan.prompt.clone(),
        max_tokens: plan.max_tokens,
        decoding: plan.decoding,
        ignore_eos: plan.ignore_eos,
        adjust: plan.adjust.clone(),
        logprobs: plan.logprobs,
        prompt_logprobs: plan.echo.as_ref().and(plan.logprobs),
        events,
        more_choices: senders.collect(),
        load_from: plan.load_from.clone(),
    };
    if let Err(e) = state.send(Command::Generate(job)) {
        state.shared.dequeued();
        return Err(e);
    }
    Ok(receivers)
}

/// The two endpoints' differences: ids, object names and where the text goes.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Self::Completions => "cmpl",
            Self::Chat => "chatcmpl",
        }
    }

    /// Choice `index` carrying `text` and its tokens' `logprobs` (whole response, or one
    /// streamed chunk).
    fn choice(
        self,
        index: usize,
        text: &str,
        logprobs: Value,
        finish: Option<&str>,
        streamed: bool,
    ) -> Value {
        match (self, streamed) {
            (Self::Completions, _) => json!({"index": index, "text": text,
                "logprobs": logprobs, "finish_reason": finish}),
            (Self::Chat, false) => json!({"index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish}),
            (Self::Chat, true) => json!({"index": index, "delta": {"content": text},
                "logprobs": logprobs, "finish_reason": finish}),
        }
    }

    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Self::Completions, _) => "text_completion",
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
        }
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let plan = completion_plan(&state, &body.map_err(body_error)?)?;
    respond(state, plan, Endpoint::Completions).await
}

/// A `/v1/completions` body checked and planned (or the error the route answers).
fn completion_plan(state: &AppState, body: &[u8]) -> Result<Plan, ApiError> {
    let request: CompletionRequest = parse_body(body)?;
    let mut prompt_text = None;
    let prompt = match request.prompt {
        Prompt::Tokens(ids) => ids,
        Prompt::TokenLists(mut lists) if lists.len() == 1 => lists.remove(0),
        Prompt::Text(text) => {
            let ids = encode(&state.tokenizer, &text)?;
            prompt_text = Some(text);
            ids
        }
        Prompt::Texts(mut texts) if texts.len() == 1 => {
            let text = texts.remove(0);
            let ids = encode(&state.tokenizer, &text)?;
            prompt_text = Some(text);
            ids
        }
        _ => {
            return Err(ApiError::bad_field(
                "prompt",
                "one prompt per request is served",
            ));
        }
    };
    let echo = request.sampling.echo;
    // OpenAI's completions default: 16 tokens.
    let mut plan = plan(
        state,
        request.sampling,
        prompt,
        Some(16),
        Endpoint::Completions,
    )?;
    if echo {
        let text = match &prompt_text {
            Some(text) => text.clone(),
            None => state
                .tokenizer
                .decode(&plan.prompt)
                .map_err(|e| ApiError::bad_field("prompt", e.to_string()))?,
        };
        plan.echo = Some(text);
    }
    Ok(plan)
}

/// What a checked `/v1/completions` body asks of the engine: `(prompt tokens, max_tokens, stop
/// strings, echo)`, or the error the route answers. For the fuzz target (`fuzz/`), which checks
/// that every accepted body stays within the server's limits.
#[doc(hidden)]
pub fn check_completion_body(
    state: &AppState,
    body: &[u8],
) -> Result<(usize, usize, Vec<String>, bool), ApiError> {
    let plan = completion_plan(state, body)?;
    Ok((
        plan.prompt.len(),
        plan.max_tokens,
        plan.stops,
        plan.echo.is_some(),
    ))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(&body.map_err(body_error)?)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_field("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad_field(
                "messages",
                format!("unknown role `{}`", m.role),
            ));
        }
        messages.push(peft_models::chat::Message::new(&m.role, &m.text()?));
    }
    let prompt = chat_prompt(&state.tokenizer, &messages)?;
    // Chat's default: the rest of the context.
    let plan = plan(&state, request.sampling, prompt, None, Endpoint::Chat)?;
    respond(state, plan, Endpoint::Chat).await
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad_field("prompt", e.to_string()))
}

/// The prompt of a conversation: the model's chat template with its generation prompt, or,
/// for a model without one, the seed tutorial's `Human: …\n\nAssistant: ` turns (the format
/// `peft train` teaches such a model), system text first ([`Tokenizer::encode_chat`]).
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    messages: &[peft_models::chat::Message],
) -> Result<Vec<u32>, ApiError> {
    let field = if tokenizer.chat_template().is_some() {
        "messages"
    } else {
        "prompt"
    };
    tokenizer
        .encode_chat(messages)
        .map_err(|e| ApiError::bad_field(field, e.to_string()))
}

async fn respond(
    state: Arc<AppState>,
    plan: Plan,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let events = submit(&state, &plan)?;
    let id = format!(
        "{}-{}",
        endpoint.id_prefix(),
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if plan.stream {
        Ok(stream_response(state, plan, endpoint, id, events).into_response())
    } else {
        whole_response(&state, plan, endpoint, id, events).await
    }
}

/// Generation state of one request, shared by both response kinds.
struct Generation {
    state: Arc<AppState>,
    events: mpsc::UnboundedReceiver<Event>,
    text: TextStream,
    generated: usize,
    endpoint: Endpoint,
    /// The request asked for log-probabilities.
    logprobs: bool,
    /// The prompt's log-probabilities (`echo`), once the engine sent them.
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// The log-probability the engine sent for the token that comes next.
    pending: Option<TokenLogprob>,
    /// Log-probabilities of the tokens received and not yet put in a response.
    unsent: Vec<TokenLogprob>,
    /// Characters of text before the next token (completions' `text_offset`).
    offset: usize,
}

/// What the next event gives: text released, and the finish reason once over.
enum Step {
    Text(String),
    Done(String, &'static str),
    Failed(ApiError),
}

impl Generation {
    fn new(
        state: Arc<AppState>,
        plan: &Plan,
        endpoint: Endpoint,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        Self {
            state,
            events,
            text: TextStream::new(plan.stops.clone()),
            generated: 0,
            endpoint,
            logprobs: plan.logprobs.is_some(),
            prompt_logprobs: None,
            pending: None,
            unsent: Vec::new(),
            offset: plan.echo.as_ref().map_or(0, |t| t.chars().count()),
        }
    }

    async fn next(&mut self) -> Step {
        loop {
            let step = match self.events.recv().await {
                Some(Event::PromptLogprobs(entries)) => {
                    self.prompt_logprobs = Some(entries);
                    continue;
                }
                Some(Event::Logprob(entry)) => {
                    self.pending = Some(entry);
                    continue;
                }
                Some(Event::Token(token)) => {
                    self.generated += 1;
                    self.unsent.extend(self.pending.take());
                    match self.text.push(&self.state.tokenizer, token) {
                        Ok(piece) if self.text.stopped() => {
                            // Closing the channel takes the request out of the batch.
                            self.events.close();
                            Step::Done(piece, "stop")
                        }
                        Ok(piece) => Step::Text(piece),
                        Err(e) => Step::Failed(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            e.to_string(),
                        )),
                    }
                }
                Some(Event::Finished { reason, generated }) => {
                    // An end-of-sequence token's log-probability is dropped with the token.
                    self.pending = None;
                    self.generated = generated;
                    match self.text.finish(&self.state.tokenizer) {
                        Ok(rest) => Step::Done(rest, reason.as_str()),
                        Err(e) => Step::Failed(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            e.to_string(),
                        )),
                    }
                }
                Some(Event::Failed(message)) => {
                    Step::Failed(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
                }
                Some(Event::Refused { status, message }) => Step::Failed(ApiError {
                    param: Some("model".into()),
                    ..ApiError::new(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                        message,
                    )
                }),
                None => Step::Failed(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine stopped",
                )),
            };
            return step;
        }
    }

    /// The `logprobs` of the tokens received since the last call (`null` unless asked for).
    fn take_logprobs(&mut self) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let entries = std::mem::take(&mut self.unsent);
        let tokenizer = &self.state.tokenizer;
        match self.endpoint {
            Endpoint::Completions => {
                let entries: Vec<(u32, Option<TokenLogprob>)> =
                    entries.into_iter().map(|e| (e.token, Some(e))).collect();
                logprobs::completion_json(tokenizer, &entries, &mut self.offset)
            }
            Endpoint::Chat => logprobs::chat_json(tokenizer, &entries),
        }
    }

    /// The `logprobs` of an echoed `prompt` (`null` unless asked for): its first token has
    /// none.
    fn prompt_logprobs(&mut self, prompt: &[u32]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let scored = self.prompt_logprobs.take().unwrap_or_default();
        let entries: Vec<(u32, Option<TokenLogprob>)> = prompt
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, scored.get(i).cloned().flatten()))
            .collect();
        let mut offset = 0;
        logprobs::completion_json(&self.state.tokenizer, &entries, &mut offset)
    }
}

/// Completions' `logprobs` objects of the echoed prompt and the output, as one.
fn joined_logprobs(mut first: Value, second: Value) -> Value {
    if first.is_null() {
        return second;
    }
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(a), Some(b)) = (first[key].as_array_mut(), second[key].as_array()) {
            a.extend(b.iter().cloned());
        }
    }
    first
}

/// Choice `index` of a whole (not streamed) response, and the tokens it generated.
async fn whole_choice(
    state: &Arc<AppState>,
    plan: &Plan,
    endpoint: Endpoint,
    index: usize,
    events: mpsc::UnboundedReceiver<Event>,
) -> Result<(Value, usize), ApiError> {
    let mut generation = Generation::new(state.clone(), plan, endpoint, events);
    let mut text = plan.echo.clone().unwrap_or_default();
    let finish = loop {
        match generation.next().await {
            Step::Text(piece) => text.push_str(&piece),
            Step::Done(piece, reason) => {
                text.push_str(&piece);
                break reason;
            }
            Step::Failed(e) => return Err(e),
        }
    };
    let mut logprobs = generation.take_logprobs();
    if plan.echo.is_some() {
        logprobs = joined_logprobs(generation.prompt_logprobs(&plan.prompt), logprobs);
    }
    Ok((
        endpoint.choice(index, &text, logprobs, Some(finish), false),
        generation.generated,
    ))
}

async fn whole_response(
    state: &Arc<AppState>,
    plan: Plan,
    endpoint: Endpoint,
    id: String,
    events: Vec<mpsc::UnboundedReceiver<Event>>,
) -> Result<Response, ApiError> {
    let choices = futures_util::future::join_all(
        events
            .into_iter()
            .enumerate()
            .map(|(index, events)| whole_choice(state, &plan, endpoint, index, events)),
    )
    .await;
    let mut generated = 0;
    let mut values = Vec::with_capacity(choices.len());
    for choice in choices {
        let (value, tokens) = choice?;
        generated += tokens;
        values.push(value);
    }
    // Every choice's tokens count; the prompt, run once, counts once.
    let usage = Usage::new(plan.prompt.len(), generated);
    Ok(axum::Json(json!({
        "id": id,
        "object": endpoint.object(false),
        "created": unix_now(),
        "model": plan.model,
        "choices": values,
        "usage": usage,
    }))
    .into_response())
}

/// The chunks of choice `index` of a streamed response (without the usage and `[DONE]`, which
/// follow every choice); `generated` gains its tokens, `failed` is set if it fails.
fn choice_stream(
    generation: Generation,
    index: usize,
    echo: Option<(String, Vec<u32>)>,
    chunk: impl Fn(Value) -> SseEvent + Clone,
    totals: Arc<StreamTotals>,
) -> impl Stream<Item = SseEvent> {
    let endpoint = generation.endpoint;
    let first = (endpoint == Endpoint::Chat).then(|| {
        chunk(
            json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": null, "finish_reason": null}]),
        )
    });
    // States: Some(generation) while generating; None once the last chunks were sent.
    let body = stream::unfold(Some((generation, echo)), move |state| {
        let chunk = chunk.clone();
        let totals = totals.clone();
        async move {
            let (mut generation, mut echo) = state?;
            loop {
                let step = generation.next().await;
                let mut events = Vec::new();
                // `echo`: the prompt's text (and log-probabilities, which the engine sends
                // before any token) in the first chunk.
                if let Some((text, prompt)) = echo.take() {
                    let logprobs = generation.prompt_logprobs(&prompt);
                    events.push(chunk(json!([
                        endpoint.choice(index, &text, logprobs, None, true)
                    ])));
                }
                match step {
                    Step::Text(piece) if piece.is_empty() && events.is_empty() => continue,
                    Step::Text(piece) => {
                        if !piece.is_empty() {
                            let logprobs = generation.take_logprobs();
                            events.push(chunk(json!([
                                endpoint.choice(index, &piece, logprobs, None, true)
                            ])));
                        }
                        return Some((events, Some((generation, echo))));
                    }
                    Step::Done(piece, reason) => {
                        let logprobs = generation.take_logprobs();
                        if !piece.is_empty() || !logprobs.is_null() {
                            events.push(chunk(json!([
                                endpoint.choice(index, &piece, logprobs, None, true)
                            ])));
                        }
                        events.push(chunk(json!([endpoint.choice(
                            index,
                            "",
                            Value::Null,
                            Some(reason),
                            true
                        )])));
                        totals
                            .generated
                            .fetch_add(generation.generated, Ordering::Relaxed);
                        return Some((events, None));
                    }
                    Step::Failed(e) => {
                        totals.failed.store(true, Ordering::Relaxed);
                        events.push(SseEvent::default().data(e.body().to_string()));
                        return Some((events, None));
                    }
                }
            }
        }
    });
    stream::iter(first).chain(body.flat_map(stream::iter))
}

/// What a streamed response's choices add up to, for its closing usage chunk.
#[derive(Default)]
struct StreamTotals {
    generated: AtomicUsize,
    failed: AtomicBool,
}

fn stream_response(
    state: Arc<AppState>,
    plan: Plan,
    endpoint: Endpoint,
    id: String,
    events: Vec<mpsc::UnboundedReceiver<Event>>,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let created = unix_now();
    let chunk = {
        let model = plan.model.clone();
        move |choices: Value, usage: Option<Usage>| {
            let mut body = json!({"id": id, "object": endpoint.object(true), "created": created,
                                  "model": model, "choices": choices});
            if let Some(usage) = usage {
                body["usage"] = json!(usage);
            }
            SseEvent::default().data(body.to_string())
        }
    };
    let totals = Arc::new(StreamTotals::default());
    let echo = plan.echo.clone().map(|text| (text, plan.prompt.clone()));
    // The choices' chunks interleave as their tokens come (each chunk names its index).
    let choices = stream::select_all(events.into_iter().enumerate().map(|(index, events)| {
        let generation = Generation::new(state.clone(), &plan, endpoint, events);
        let chunk = chunk.clone();
        choice_stream(
            generation,
            index,
            echo.clone(),
            move |choices| chunk(choices, None),
            totals.clone(),
        )
        .boxed()
    }));
    let prompt_len = plan.prompt.len();
    let include_usage = plan.include_usage;
    // Runs once every choice has ended.
    let closing = stream::once(async move {
        let mut events = Vec::new();
        if include_usage && !totals.failed.load(Ordering::Relaxed) {
            let generated = totals.generated.load(Ordering::Relaxed);
            events.push(chunk(json!([]), Some(Usage::new(prompt_len, generated))));
        }
        events.push(SseEvent::default().data("[DONE]"));
        stream::iter(events)
    })
    .flatten();
    Sse::new(choices.chain(closing).map(Ok)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/health` answers `ok` while the engine runs and 503, naming why, once it has stopped.
    #[tokio::test]
    async fn health_answers_503_once_the_engine_has_stopped() {
        let (commands, _engine_side) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new("base"));
        let model =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama-tiny");
        let tokenizer = Tokenizer::from_dir(&model).unwrap();
        let state = Arc::new(AppState::new(
            commands,
            shared.clone(),
            tokenizer,
            "base".into(),
            64,
            4,
            100,
            None,
            None,
        ));
        assert_eq!(health(State(state.clone())).await.unwrap(), "ok");
        shared.set_engine_stopped("the engine panicked: boom".into());
        let Err(error) = health(State(state)).await else {
            panic!("a stopped engine answered ok");
        };
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.message, "the engine panicked: boom");
    }
}
