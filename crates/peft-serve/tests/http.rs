//! The server over real HTTP on 127.0.0.1: answers equal to generating alone, streaming,
//! every error case in OpenAI's shape, the API key, runtime adapter loading confined to its
//! folder, the bounded queue, disconnects and graceful shutdown.

use peft_tests::fixtures;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use peft_lora::MultiLoraModel;
use peft_serve::client::{self, Response};
use peft_serve::{ServeError, ServeOptions, serve_until};
use serde_json::{Value, json};

/// A server on a free port, stopped (gracefully) when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    fn start(configure: impl FnOnce(&mut ServeOptions)) -> Self {
        let mut options = ServeOptions::new(fixtures().join("models/llama-tiny"), Device::flex());
        let adapters = fixtures().join("adapters/multi-llama");
        options.adapters = vec![
            ("a".into(), adapters.clone()),
            ("b".into(), adapters.join("b")),
        ];
        options.port = 0;
        configure(&mut options);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, address) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            serve_until(
                options,
                async move {
                    let _ = stopped.await;
                },
                move |addr| {
                    let _ = ready.send(addr);
                },
            )
        });
        let addr = address
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops accepting and waits for in-flight requests; the server's result.
    fn shutdown(mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> TcpStream {
    client::send(addr, method, path, key, body).unwrap()
}

fn read_response(stream: TcpStream) -> Response {
    client::read_response(stream).unwrap()
}

fn request(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> Response {
    client::request(addr, method, path, key, body).unwrap()
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Response {
    request(addr, "POST", path, None, &body.to_string())
}

/// `peft_models::generate` with adapter `name` (or the base) alone, decoded.
fn generate_alone(name: Option<&str>, prompt: &str, max_tokens: usize) -> String {
    let dir = fixtures().join("models/llama-tiny");
    let tokenizer = peft_models::Tokenizer::from_dir(&dir).unwrap();
    let base = peft_models::load(&dir, &Device::flex()).unwrap();
    let adapters = fixtures().join("adapters/multi-llama");
    let mut model = MultiLoraModel::new(base).unwrap();
    model.load_adapter("a", &adapters).unwrap();
    model.load_adapter("b", adapters.join("b")).unwrap();
    model
        .set_row_adapters(Some(&[name.unwrap_or(peft_core::BASE_ADAPTER)]))
        .unwrap();
    let mut options =
        peft_models::GenerateOptions::greedy(max_tokens, peft_core::CausalLm::spec(&model.model));
    options.eos_token_ids = peft_core::CausalLm::spec(&model.model)
        .eos_token_ids
        .clone();
    let ids = tokenizer.encode(prompt).unwrap();
    let out = peft_models::generate(&model.model, &[ids], &options, |_, _| {}).unwrap();
    let eos = &options.eos_token_ids;
    let kept: Vec<u32> = out[0]
        .iter()
        .copied()
        .filter(|t| !eos.contains(t))
        .collect();
    tokenizer.decode(&kept).unwrap()
}

#[test]
fn completions_equal_generating_alone_whole_and_streamed() {
    let server = Server::start(|_| {});
    let prompts = ["hello there", "the quick brown fox", "a"];
    // Several requests at once, different adapters: they share the batch.
    let streams: Vec<(Option<&str>, &str, TcpStream)> = [Some("a"), Some("b"), None]
        .into_iter()
        .zip(prompts)
        .map(|(adapter, prompt)| {
            let body = json!({"model": adapter.unwrap_or("llama-tiny"), "prompt": prompt,
                              "max_tokens": 12, "temperature": 0});
            (
                adapter,
                prompt,
                send(
                    server.addr,
                    "POST",
                    "/v1/completions",
                    None,
                    &body.to_string(),
                ),
            )
        })
        .collect();
    for (adapter, prompt, stream) in streams {
        let response = read_response(stream);
        assert_eq!(response.status, 200, "{}", response.body);
        let body = response.json();
        let text = body["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(text, generate_alone(adapter, prompt, 12), "{adapter:?}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], adapter.unwrap_or("llama-tiny"));
        let usage = &body["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
        // The same request streamed: the deltas join into the same text.
        let streamed = post(
            server.addr,
            "/v1/completions",
            json!({"model": adapter.unwrap_or("llama-tiny"), "prompt": prompt, "max_tokens": 12,
                   "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        );
        assert_eq!(streamed.status, 200);
        assert!(streamed.headers["content-type"].starts_with("text/event-stream"));
        let events = streamed.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let joined: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str()))
            .collect();
        assert_eq!(joined, text);
        let finish = chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, body["choices"][0]["finish_reason"].as_str());
        assert_eq!(chunks.last().unwrap()["usage"], body["usage"]);
    }
    server.shutdown().unwrap();
}

#[test]
fn chat_stop_strings_and_seeded_sampling() {
    let server = Server::start(|_| {});
    let chat = json!({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 10, "temperature": 0});
    let whole = post(server.addr, "/v1/chat/completions", chat.clone());
    assert_eq!(whole.status, 200, "{}", whole.body);
    let body = whole.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = post(server.addr, "/v1/chat/completions", streamed).events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["object"], "chat.completion.chunk");
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(joined, text);
    // A stop string cuts the text before it, with finish_reason "stop".
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[2..4].iter().collect();
        let mut with_stop = chat.clone();
        with_stop["stop"] = json!([stop]);
        let cut = post(server.addr, "/v1/chat/completions", with_stop).json();
        let expected = &text[..text.find(&stop).unwrap()];
        assert_eq!(cut["choices"][0]["message"]["content"], expected);
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    }
    // Sampling with a seed repeats; another seed (almost surely) differs.
    let sample = |seed: u64| {
        post(
            server.addr,
            "/v1/completions",
            json!({"model": "b", "prompt": "x", "max_tokens": 16, "temperature": 1.0,
                   "seed": seed}),
        )
        .json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(sample(7), sample(7));
    assert!((8..12).any(|s| sample(s) != sample(7)));
}

/// `n` choices: choice `i` of a seeded request equals a request with the seed plus `i` alone
/// (whole and streamed, chunks interleaved by `index`), usage counts every choice's tokens
/// and the prompt once; `n` beyond `--max-batch` and `best_of` other than `n` are refused.
#[test]
fn several_choices_equal_the_seeds_alone() {
    let server = Server::start(|o| o.max_batch = 4);
    let body = |n: usize, seed: u64| {
        json!({"model": "a", "prompt": "the quick", "max_tokens": 10, "temperature": 1.0,
               "seed": seed, "n": n})
    };
    let alone: Vec<Value> = (0..3)
        .map(|i| post(server.addr, "/v1/completions", body(1, 70 + i)).json())
        .collect();
    let whole = post(server.addr, "/v1/completions", body(3, 70));
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, (choice, alone)) in choices.iter().zip(&alone).enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["text"], alone["choices"][0]["text"], "choice {i}");
        assert_eq!(
            choice["finish_reason"],
            alone["choices"][0]["finish_reason"]
        );
    }
    let tokens = |v: &Value, key: &str| v["usage"][key].as_u64().unwrap();
    assert_eq!(
        tokens(&whole, "completion_tokens"),
        alone
            .iter()
            .map(|a| tokens(a, "completion_tokens"))
            .sum::<u64>()
    );
    assert_eq!(
        tokens(&whole, "prompt_tokens"),
        tokens(&alone[0], "prompt_tokens")
    );

    // Streamed: each choice's chunks join into its whole text; usage, then [DONE], last.
    let mut streamed = body(3, 70);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = post(server.addr, "/v1/completions", streamed).events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut texts = vec![String::new(); 3];
    let mut finished = vec![None; 3];
    for chunk in &chunks[..chunks.len() - 1] {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        texts[index].push_str(choice["text"].as_str().unwrap());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finished[index] = Some(reason.to_string());
        }
    }
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(texts[i], choice["text"].as_str().unwrap(), "choice {i}");
        assert_eq!(finished[i].as_deref(), choice["finish_reason"].as_str());
    }
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // Chat: each choice's role chunk, greedy choices identical.
    let chat = json!({"model": "b", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 6, "temperature": 0, "n": 2, "stream": true});
    let events = post(server.addr, "/v1/chat/completions", chat.clone()).events();
    let roles: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| c["choices"][0]["delta"]["role"] == "assistant")
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(roles.len(), 2);
    assert!(roles.contains(&0) && roles.contains(&1));
    let mut chat = chat;
    chat["stream"] = json!(false);
    chat["best_of"] = json!(2);
    let greedy = post(server.addr, "/v1/chat/completions", chat).json();
    assert_eq!(
        greedy["choices"][0]["message"],
        greedy["choices"][1]["message"]
    );

    // Refusals name the field.
    for (bad, param) in [
        (json!({"n": 5}), "n"),
        (json!({"n": 0}), "n"),
        (json!({"n": 2, "best_of": 3}), "best_of"),
    ] {
        let mut request = body(1, 1);
        for (k, v) in bad.as_object().unwrap() {
            request[k] = v.clone();
        }
        let refused = post(server.addr, "/v1/completions", request);
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(refused.json()["error"]["param"], param);
    }
    server.shutdown().unwrap();
}

#[test]
fn bad_requests_get_openai_errors() {
    let server = Server::start(|o| o.max_model_len = Some(64));
    let stop_too_long = format!(
        r#"{{"model": "a", "prompt": "x", "stop": ["{}"]}}"#,
        "s".repeat(257)
    );
    let cases: [(&str, &str, u16, &str); 24] = [
        (
            "/v1/completions",
            "{\"model\": \"a\", \"prompt\": ",
            400,
            "invalid request body",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": 5}"#,
            400,
            "invalid request body",
        ),
        (
            "/v1/completions",
            r#"{"model": "zz", "prompt": "x"}"#,
            404,
            "`zz` does not exist",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "max_tokens": 64}"#,
            400,
            "context is 64 tokens",
        ),
        // usize::MAX: `prompt + max_tokens` would wrap past the check in a release build.
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "max_tokens": 18446744073709551615, "ignore_eos": true}"#,
            400,
            "context is 64 tokens",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "temperature": 3}"#,
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "top_p": 0}"#,
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "n": 100}"#,
            400,
            "n must be in [1, 16]",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": [99999]}"#,
            400,
            "outside the vocabulary",
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "a", "messages": []}"#,
            400,
            "messages is empty",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#,
            400,
            "at most 4 stop strings",
        ),
        (
            "/v1/completions",
            &stop_too_long,
            400,
            "at most 256 characters (one has 257)",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "presence_penalty": 2.5}"#,
            400,
            "presence_penalty must be in [-2, 2], got 2.5",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "repetition_penalty": 0}"#,
            400,
            "repetition_penalty must be a positive number",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "logit_bias": {"99999": 5}}"#,
            400,
            "token id 99999 is outside the vocabulary",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "logit_bias": {"the": 5}}"#,
            400,
            "`the` is not a token id",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "stop_token_ids": [7, 600]}"#,
            400,
            "token id 600 is outside the vocabulary",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "max_tokens": 4, "min_tokens": 5}"#,
            400,
            "min_tokens (5) must be at most max_tokens (4)",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "logprobs": 21}"#,
            400,
            "logprobs must be an integer in [0, 20], got 21",
        ),
        (
            "/v1/completions",
            r#"{"model": "a", "prompt": "x", "max_tokens": 0}"#,
            400,
            "max_tokens must be at least 1 (or 0 with echo)",
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
            400,
            "top_logprobs needs logprobs: true",
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}"#,
            400,
            "logprobs must be true or false",
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "a", "messages": [{"role": "user", "content": "x"}], "echo": true}"#,
            400,
            "echo is served on /v1/completions",
        ),
        ("/v1/nothing", "{}", 404, "no such route"),
    ];
    for (path, body, status, message) in cases {
        let r = request(server.addr, "POST", path, None, body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let error = &r.json()["error"];
        assert!(
            error["message"].as_str().unwrap().contains(message),
            "{body}: {error}"
        );
        assert_eq!(error["code"], status);
        assert!(error["type"].is_string());
    }
    // A body over the 2 MB limit: 413, still OpenAI's shape.
    let big = format!(r#"{{"model": "a", "prompt": "{}"}}"#, "x".repeat(2_200_000));
    let r = request(server.addr, "POST", "/v1/completions", None, &big);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("body")
    );
    // The fields parse and act: a +100 bias forces token 77 first, which is a stop token id,
    // so the answer is empty and stopped; without the stop id, the bias fills max_tokens.
    let forced = json!({"model": "a", "prompt": "x", "max_tokens": 3, "temperature": 0,
                        "logit_bias": {"77": 100}, "presence_penalty": 0.5});
    let mut stopped = forced.clone();
    stopped["stop_token_ids"] = json!([77]);
    let r = post(server.addr, "/v1/completions", stopped);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(r.json()["choices"][0]["text"], "");
    let r = post(server.addr, "/v1/completions", forced);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    // `echo` with `max_tokens: 0` scores the prompt: its text back, a log-probability per
    // token after the first (logprobs' values: tests/engine.rs), nothing generated; with
    // `max_tokens: 2` the two generated tokens follow the prompt's.
    let scored = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": [5, 42, 7], "max_tokens": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(scored.status, 200, "{}", scored.body);
    let choice = &scored.json()["choices"][0];
    assert_eq!(scored.json()["usage"]["completion_tokens"], 0);
    let lp = &choice["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3, "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert!(!lp["top_logprobs"][1].as_object().unwrap().is_empty());
    let both = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": [5, 42, 7], "max_tokens": 2, "echo": true,
               "logprobs": 0, "temperature": 0, "ignore_eos": true}),
    );
    let lp = &both.json()["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5, "{lp}");
    let text = both.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.starts_with(choice["text"].as_str().unwrap()), "{text}");
    let r = request(server.addr, "GET", "/v1/completions", None, "");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
}

#[test]
fn the_api_key_guards_v1_only() {
    let server = Server::start(|o| o.api_key = Some("s3cret".into()));
    for key in [None, Some("wrong"), Some("s3cret-")] {
        let r = request(server.addr, "GET", "/v1/models", key, "");
        assert_eq!(r.status, 401, "{key:?}");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
    }
    let r = request(server.addr, "GET", "/v1/models", Some("s3cret"), "");
    assert_eq!(r.status, 200);
    let ids: Vec<&str> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string().leak() as &str)
        .collect();
    assert_eq!(ids, ["llama-tiny", "a", "b"]);
    assert_eq!(request(server.addr, "GET", "/health", None, "").status, 200);
    assert_eq!(
        request(server.addr, "GET", "/metrics", None, "").status,
        200
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn adapters_load_and_unload_at_run_time_from_their_folder_only() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("adapters");
    let outside = root.path().join("outside");
    copy_dir(
        &fixtures().join("adapters/multi-llama/c"),
        &allowed.join("c"),
    );
    copy_dir(
        &fixtures().join("adapters/multi-llama/c"),
        &outside.join("c"),
    );
    std::fs::write(allowed.join("not-an-adapter"), "x").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();
    // An allowed folder whose weights file is a symlink to a file outside.
    #[cfg(unix)]
    {
        std::fs::create_dir_all(allowed.join("linked")).unwrap();
        std::fs::copy(
            allowed.join("c/adapter_config.json"),
            allowed.join("linked/adapter_config.json"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            outside.join("c/adapter_model.safetensors"),
            allowed.join("linked/adapter_model.safetensors"),
        )
        .unwrap();
    }
    let dir = allowed.clone();
    let server = Server::start(move |o| o.adapter_dir = Some(dir));
    let load = |name: &str, path: &str| {
        post(
            server.addr,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": path}),
        )
    };
    assert_eq!(load("x", "../outside/c").status, 403);
    assert_eq!(load("x", outside.join("c").to_str().unwrap()).status, 403);
    #[cfg(unix)]
    assert_eq!(load("x", "escape/c").status, 403);
    #[cfg(unix)]
    {
        let r = load("x", "linked");
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(
            r.body
                .contains("linked/adapter_model.safetensors leads outside"),
            "{}",
            r.body
        );
    }
    assert_eq!(load("x", "missing").status, 404);
    let r = load("x", "not-an-adapter");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(load("a", "c").status, 400, "the name is taken");
    let r = load("c", "c");
    assert_eq!(r.status, 200, "{}", r.body);
    let models = request(server.addr, "GET", "/v1/models", None, "").json();
    let c = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "c")
        .unwrap();
    assert_eq!(c["parent"], "llama-tiny");
    let answer = post(
        server.addr,
        "/v1/completions",
        json!({"model": "c", "prompt": "hi", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(
        post(
            server.addr,
            "/v1/unload_lora_adapter",
            json!({"lora_name": "c"})
        )
        .status,
        200
    );
    assert_eq!(
        post(
            server.addr,
            "/v1/unload_lora_adapter",
            json!({"lora_name": "c"})
        )
        .status,
        404
    );
    // Unloaded, `c` is still a folder under --adapter-dir: its next request loads it again
    // (first use). Names that are no adapter folder there, or lead outside, are not found.
    let again = post(
        server.addr,
        "/v1/completions",
        json!({"model": "c", "prompt": "hi", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["choices"], answer.json()["choices"]);
    for name in [
        "missing",
        "not-an-adapter",
        "escape",
        "linked",
        "../outside/c",
        "c/",
    ] {
        let gone = post(
            server.addr,
            "/v1/completions",
            json!({"model": name, "prompt": "hi"}),
        );
        assert_eq!(gone.status, 404, "{name}: {}", gone.body);
    }
    // Without --adapter-dir, runtime loading is off.
    let closed = Server::start(|_| {});
    let r = post(
        closed.addr,
        "/v1/load_lora_adapter",
        json!({"lora_name": "c", "lora_path": "c"}),
    );
    assert_eq!(r.status, 403);
    assert!(r.body.contains("--adapter-dir"));
}

/// LoRAX's dynamic adapters: a request naming a folder under `--adapter-dir` loads it on first
/// use; with `--max-loras` resident, the least recently used idle adapter loaded that way is
/// evicted; pinned adapters (at start, `/v1/load_lora_adapter`) never are, and once only pinned
/// ones are resident a first use is refused with 409. `/v1/models?all=true` lists the folders.
#[test]
fn adapters_load_on_first_use_and_the_least_recently_used_is_evicted() {
    let root = tempfile::tempdir().unwrap();
    for name in ["x", "y", "z"] {
        // Copies of the fixture's adapter `a` (its top-level files).
        copy_dir(
            &fixtures().join("adapters/multi-llama"),
            &root.path().join(name),
        );
    }
    let dir = root.path().to_path_buf();
    let server = Server::start(move |o| {
        o.adapters.truncate(1);
        o.adapter_dir = Some(dir);
        o.max_loras = 3;
    });
    let ids = |query: &str| -> Vec<(String, Value)> {
        request(server.addr, "GET", &format!("/v1/models{query}"), None, "").json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["id"].as_str().unwrap().to_string(), m["loaded"].clone()))
            .collect()
    };
    let listed = [
        ("llama-tiny", Value::Null),
        ("a", json!(true)),
        ("x", json!(false)),
        ("y", json!(false)),
        ("z", json!(false)),
    ];
    let listed: Vec<(String, Value)> = listed.map(|(n, l)| (n.to_string(), l)).to_vec();
    assert_eq!(ids("?all=true"), listed);
    let resident = |expected: &[&str]| {
        let names: Vec<String> = ids("").into_iter().skip(1).map(|(n, _)| n).collect();
        assert_eq!(names, expected);
    };
    resident(&["a"]);
    let expected = generate_alone(Some("a"), "hello there", 6);
    let complete = |model: &str| {
        let r = post(
            server.addr,
            "/v1/completions",
            json!({"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{model}: {}", r.body);
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    // First uses load; each copy of `a` answers as `a` does.
    assert_eq!(complete("x"), expected);
    assert_eq!(complete("y"), expected);
    resident(&["a", "x", "y"]);
    // Full: z evicts x, the least recently used (a is pinned).
    assert_eq!(complete("z"), expected);
    resident(&["a", "y", "z"]);
    // y used again, then x: z is now the oldest.
    complete("y");
    assert_eq!(complete("x"), expected);
    resident(&["a", "x", "y"]);
    assert_eq!(metric(server.addr, "peft_adapter_evictions_total"), 2.0);
    assert_eq!(metric(server.addr, "peft_adapter_loads_total"), 5.0);
    assert_eq!(metric(server.addr, "peft_resident_adapters"), 3.0);
    // An explicit load evicts an idle first-use adapter too (y, older than x), and is pinned.
    let load = |name: &str| {
        post(
            server.addr,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": "z"}),
        )
    };
    assert_eq!(load("w").status, 200);
    resident(&["a", "w", "x"]);
    assert_eq!(load("v").status, 200);
    resident(&["a", "v", "w"]);
    // Only pinned adapters are resident: a first use cannot make room.
    let refused = post(
        server.addr,
        "/v1/completions",
        json!({"model": "y", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "model");
    assert!(refused.body.contains("--max-loras 3"), "{}", refused.body);
    assert_eq!(metric(server.addr, "peft_adapter_evictions_total"), 4.0);
    assert_eq!(metric(server.addr, "peft_adapter_loads_total"), 7.0);
    server.shutdown().unwrap();
}

/// A server over the tiny BLOOM (a 2,048-token context) with the adapter `a`, configured further
/// by `configure`.
fn bloom_server(configure: impl FnOnce(&mut ServeOptions)) -> Server {
    Server::start(|o| {
        o.model = fixtures().join("models/bloom-tiny");
        o.adapters = vec![("a".into(), fixtures().join("adapters/multi-bloom"))];
        configure(o);
    })
}

/// A sampled, streamed completion of `max_tokens` tokens past end-of-sequence: a request that
/// runs long.
fn long_stream_body(max_tokens: usize, seed: u64) -> String {
    json!({"model": "a", "prompt": "x", "max_tokens": max_tokens, "temperature": 1.0,
           "seed": seed, "stream": true, "ignore_eos": true})
    .to_string()
}

/// Sends `body` and waits until its row is decoding; the connection.
fn start_running(server: &Server, body: &str) -> TcpStream {
    let stream = send(server.addr, "POST", "/v1/completions", None, body);
    wait_for("the request to run", || {
        metric(server.addr, "peft_batch_size") == 1.0
    });
    stream
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = request(addr, "GET", "/metrics", None, "").body;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_full_queue_answers_429_and_a_gone_client_leaves_the_batch() {
    // BLOOM has no context length in its config: 2048 by default, room for long requests.
    let server = bloom_server(|o| {
        o.max_batch = 1;
        o.max_queue = 1;
    });
    let long = long_stream_body(2000, 1);
    let running = start_running(&server, &long);
    let waiting = send(server.addr, "POST", "/v1/completions", None, &long);
    wait_for("the queue to fill", || {
        metric(server.addr, "peft_queue_length") == 1.0
    });
    let rejected = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": "x"}),
    );
    assert_eq!(rejected.status, 429);
    assert_eq!(rejected.headers["retry-after"], "1");
    assert_eq!(rejected.json()["error"]["type"], "rate_limit_error");
    // Both clients hang up: their rows leave at the next step, the queued one is dropped.
    drop(running);
    drop(waiting);
    wait_for("the batch to empty", || {
        metric(server.addr, "peft_batch_size") == 0.0
            && metric(server.addr, "peft_queue_length") == 0.0
    });
    let generated = metric(server.addr, "peft_decode_steps_total");
    assert!(
        generated < 4000.0,
        "the abandoned requests ran on: {generated} steps"
    );
    let ok = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn shutdown_finishes_requests_in_flight() {
    let server = bloom_server(|_| {});
    let stream = start_running(&server, &long_stream_body(1500, 3));
    let addr = server.addr;
    let reader = std::thread::spawn(move || read_response(stream));
    server.shutdown().unwrap();
    let response = reader.join().unwrap();
    let events = response.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "{finish}"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

/// A panic in the engine's own loop (injected) leaves no engine to serve with: the request it
/// held gets 503, and the server shuts itself down with an error naming the panic, so that
/// `peft serve` exits non-zero and an orchestrator restarts it.
#[test]
fn a_dead_engine_stops_the_server_with_an_error() {
    let server = Server::start(|o| o.inject_panic = Some(peft_serve::engine::InjectedPanic::Loop));
    let r = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    match server.shutdown() {
        Err(ServeError::Engine(why)) => {
            assert!(
                why.contains("the engine panicked: injected panic (Loop)"),
                "{why}"
            )
        }
        other => panic!("expected the engine's error, got {other:?}"),
    }
}

/// `--max-loras`: a load past the cap is answered 409 naming it, and goes through once an
/// adapter is unloaded.
#[test]
fn adapter_loads_past_max_loras_are_refused() {
    let root = tempfile::tempdir().unwrap();
    copy_dir(
        &fixtures().join("adapters/multi-llama/c"),
        &root.path().join("c"),
    );
    let dir = root.path().to_path_buf();
    // `a` and `b` are loaded at start: one more fits.
    let server = Server::start(move |o| {
        o.adapter_dir = Some(dir);
        o.max_loras = 3;
    });
    let load = |name: &str| {
        post(
            server.addr,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": "c"}),
        )
    };
    assert_eq!(load("c").status, 200);
    let full = load("d");
    assert_eq!(full.status, 409, "{}", full.body);
    assert!(full.body.contains("--max-loras 3"), "{}", full.body);
    let unload = post(
        server.addr,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "c"}),
    );
    assert_eq!(unload.status, 200);
    assert_eq!(load("d").status, 200);
}

/// `--shutdown-timeout 0`: a request still streaming when the signal comes is cut (no `[DONE]`)
/// and the server ends at once instead of decoding it to the end.
#[test]
fn the_drain_deadline_cuts_requests_still_in_flight() {
    let server = bloom_server(|o| o.shutdown_timeout = Duration::ZERO);
    let stream = start_running(&server, &long_stream_body(2000, 3));
    // The cut stream may end mid-chunk: an unreadable response counts as cut too.
    let reader = std::thread::spawn(move || client::read_response(stream));
    let started = Instant::now();
    server.shutdown().unwrap();
    let cut = match reader.join().unwrap() {
        Err(_) => true,
        Ok(response) => response.events().last().map(String::as_str) != Some("[DONE]"),
    };
    assert!(cut, "the request ran to its end");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Reads what `stream` receives until the server closes it (or 5 s pass): the bytes, and
/// whether the server closed it.
fn read_until_closed(mut stream: TcpStream) -> (String, bool) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&received).into(), true),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // A reset is the server closing too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&received).into(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&received).into(), false),
        }
    }
}

/// The limits a public endpoint needs: a client that sends half its headers, or half its body,
/// is cut after `--read-timeout` (today's code held both for ever); a request whose answer
/// takes longer than `--request-timeout` gets 408 and the server goes on.
#[test]
fn slow_clients_and_long_requests_are_cut() {
    use std::io::Write;
    let server = bloom_server(|o| {
        o.read_timeout = Duration::from_millis(300);
        o.request_timeout = Duration::from_millis(200);
    });
    let started = Instant::now();
    let mut half_headers = TcpStream::connect(server.addr).unwrap();
    write!(half_headers, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (_, closed) = read_until_closed(half_headers);
    assert!(closed, "a client stuck in its headers kept its connection");
    assert!(started.elapsed() < Duration::from_secs(4));

    let mut half_body = TcpStream::connect(server.addr).unwrap();
    write!(
        half_body,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"model\""
    )
    .unwrap();
    let (received, closed) = read_until_closed(half_body);
    assert!(closed, "a client stuck in its body kept its connection");
    assert!(received.starts_with("HTTP/1.1 408"), "{received}");

    // 2,000 tokens past end-of-sequence take far longer than 200 ms.
    let long = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": "x", "max_tokens": 2000, "ignore_eos": true}),
    );
    assert_eq!(long.status, 408, "{}", long.body);
    assert_eq!(long.json()["error"]["code"], 408, "{}", long.body);
    wait_for("the cut request to leave the batch", || {
        metric(server.addr, "peft_batch_size") == 0.0
    });
    let short = post(
        server.addr,
        "/v1/completions",
        json!({"model": "a", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(short.status, 200, "{}", short.body);
}

/// `--max-connections 2`: a third connection waits (unanswered) while two are open, and is
/// served once one of them closes.
#[test]
fn connections_past_the_cap_wait_for_one_to_close() {
    let server = Server::start(|o| o.max_connections = 2);
    let first = TcpStream::connect(server.addr).unwrap();
    let second = TcpStream::connect(server.addr).unwrap();
    // Both are accepted (their permits taken) before the third arrives.
    std::thread::sleep(Duration::from_millis(200));
    let third = send(server.addr, "GET", "/health", None, "");
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let waiting = third.try_clone().unwrap();
    let err = client::read_response(waiting).expect_err("answered past the cap");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = client::read_response(third).unwrap();
    assert_eq!(r.status, 200);
    drop(second);
}
