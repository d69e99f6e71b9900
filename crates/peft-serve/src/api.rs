//! The request and response bodies of OpenAI's API (the subset served), and its error shape.
//!
//! Requests are parsed by hand from the body bytes, so that malformed JSON or a wrong field
//! gets OpenAI's error object with the parser's message rather than a framework's plain text.
//! Fields OpenAI defines that are not served (`best_of` other than `n`, tools) are refused by
//! name;
//! unknown fields are ignored, as OpenAI's own server does.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Seconds to wait before retrying (429 only): sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 about one field.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 404: no such model, adapter or route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// OpenAI's `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::METHOD_NOT_ALLOWED => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// A completion prompt: text, one text in a list, or token ids.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Texts (exactly one is served).
    Texts(Vec<String>),
    /// Token-id lists (exactly one is served).
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk with the `usage` counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sampling {
    /// `model`: the base model's served name or an adapter's name.
    pub model: String,
    /// Tokens to generate at most (`max_completion_tokens` in chat is the same).
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// `0`: greedy; else the softmax temperature (OpenAI's default 1).
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    pub top_p: Option<f32>,
    /// Seed of the sampler (a random one when absent).
    pub seed: Option<u64>,
    /// Strings that end the output (not included).
    pub stop: Option<OneOrMany>,
    /// Choices per prompt (default 1, at most the server's `--max-batch`): one prefill, then
    /// each choice decodes as its own row.
    pub n: Option<usize>,
    /// Stream the output as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Completions: `k`, each token's log-probability with the `k` most likely (at most 20).
    /// Chat: `true` for each token's log-probability (`top_logprobs` says how many of the most
    /// likely come with it).
    pub logprobs: Option<Value>,
    /// Chat: the most likely tokens returned with each token's log-probability (0–20; needs
    /// `logprobs: true`).
    pub top_logprobs: Option<usize>,
    /// Served only equal to `n` (every choice is returned; no ranking).
    pub best_of: Option<usize>,
    /// Completions: the prompt comes back before the output (with its log-probabilities under
    /// `logprobs`; `max_tokens: 0` then scores the prompt alone).
    #[serde(default)]
    pub echo: bool,
    /// Refused when set (not served).
    pub tools: Option<Value>,
    /// In `[-2, 2]`: subtracted from the logit of every token the output already holds.
    pub presence_penalty: Option<f32>,
    /// In `[-2, 2]`: subtracted per occurrence in the output.
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's form) → bias added to its logit, clamped to
    /// `[-100, 100]`.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// vLLM's extension: `> 0`; 1 (the default) leaves the logits; above 1 discourages every
    /// token of the prompt and the output.
    pub repetition_penalty: Option<f32>,
    /// vLLM's extension: no stop token (end-of-sequence, `stop_token_ids`) before this many
    /// tokens.
    pub min_tokens: Option<usize>,
    /// vLLM's extension: tokens that end the output (finish reason `stop`; not included).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's extension: keep generating past end-of-sequence tokens, to exactly `max_tokens`
    /// (benchmarks and load tests).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Shared fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One chat message; `content` is text or a list of `{"type": "text", "text"}` parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// The text, or text parts.
    pub content: Value,
}

impl ChatMessage {
    /// The message's text: a string, or its text parts joined.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::bad_field(
                        "messages",
                        "only text content parts ({\"type\": \"text\", \"text\": …}) are served",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|parts| parts.concat()),
            _ => Err(ApiError::bad_field(
                "messages",
                "a message's content must be a string or a list of text parts",
            )),
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Shared fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/load_lora_adapter` (vLLM's body).
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    /// The name requests will use.
    pub lora_name: String,
    /// The adapter folder, inside `--adapter-dir` (relative paths are taken from there).
    pub lora_path: String,
}

/// `POST /v1/unload_lora_adapter` (vLLM's body).
#[derive(Debug, Clone, Deserialize)]
pub struct UnloadAdapterRequest {
    /// The adapter to drop.
    pub lora_name: String,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts for a prompt of `prompt` tokens and `completion` generated ones.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Parses a JSON body into `T`, answering 400 with the parser's message (line and column) on
/// malformed JSON or a field of the wrong type.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openais_shape_and_retry_after() {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue full");
        e.retry_after = Some(2);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "queue full", "type": "rate_limit_error",
                             "param": null, "code": 429}})
        );
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let field = ApiError::bad_field("top_p", "must be in (0, 1]");
        assert_eq!(field.body()["error"]["param"], "top_p");
        assert_eq!(field.body()["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn bodies_parse_prompts_of_every_form_and_name_bad_json() {
        let r: CompletionRequest =
            parse_body(br#"{"model": "m", "prompt": "hi", "stop": "\n", "max_tokens": 3}"#)
                .unwrap();
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
        assert_eq!(r.sampling.stop.unwrap().into_vec(), vec!["\n".to_string()]);
        assert_eq!(r.sampling.max_tokens, Some(3));
        let r: CompletionRequest = parse_body(br#"{"model": "m", "prompt": [1, 2]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2]));
        let r: CompletionRequest = parse_body(br#"{"model": "m", "prompt": ["a"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Texts(vec!["a".into()]));
        let e = parse_body::<CompletionRequest>(br#"{"model": "m", "prompt": "#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("EOF"), "{}", e.message);
        let e = parse_body::<CompletionRequest>(br#"{"model": 3, "prompt": "x"}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = parse_body::<CompletionRequest>(br#"{"prompt": "x"}"#).unwrap_err();
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
    }

    #[test]
    fn chat_content_may_be_text_parts() {
        let r: ChatRequest = parse_body(
            br#"{"model": "m", "messages": [{"role": "user",
                 "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].text().unwrap(), "ab");
        let r: ChatRequest = parse_body(
            br#"{"model": "m", "messages": [{"role": "user",
                 "content": [{"type": "image_url", "image_url": {}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages[0].text().unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
