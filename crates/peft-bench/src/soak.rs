//! `serve-soak`: `peft serve` under load and faults, on loopback, bounded in time.
//!
//! bloom-tiny with four adapters ([`crate::serve::ADAPTERS`]); `clients` threads send requests
//! until the deadline, mixing streamed and whole greedy completions over the four adapters.
//! One client in ten hangs up in the middle of a stream, one in ten sends malformed bodies, and
//! meanwhile a fifth adapter is loaded and unloaded in a loop (vLLM's endpoints). Passes when:
//!
//! * every answer the server accepted (200) is complete and equals the same request sent
//!   alone; every malformed body gets a 4xx in OpenAI's error shape; 429s are retried; nothing
//!   else (no 5xx, no broken connection);
//! * the server's resident memory after the soak is within 10 % of before it (both taken with
//!   the server idle, the first after a warm-up round of the same load), and so are the bytes
//!   its heap holds live (a leak shows in these; resident memory also holds what the allocator
//!   keeps of freed memory).
//!
//! The server runs in a process of its own (this binary, `serve-soak-server`), so that its
//! memory is its own and not the 64 client threads' too; it answers `measure` on its stdin with
//! its resident and live heap bytes, and stops when its stdin closes.
//! * `/metrics` adds up: its responses by status sum to the responses the clients read, the
//!   batch and the queue are empty at the end.
//!
//! `cargo xtask soak` runs it for 2 minutes with 64 clients; `cargo xtask bench --quick` (CI)
//! for a few seconds with 16.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peft_serve::client;
use serde_json::{Value, json};

use crate::serve::{ADAPTERS, four_adapter_server, tempfile_dir};

/// How long and how hard.
#[derive(Debug, Clone, Copy)]
pub struct SoakSettings {
    /// Seconds of load.
    pub seconds: f64,
    /// Concurrent clients.
    pub clients: usize,
}

const PROMPTS: [&str; 5] = ["你好", "hello", "the weather", "one two three", "x"];

/// Bodies a client may get wrong: each must be answered 4xx with OpenAI's error shape.
const MALFORMED: [&str; 8] = [
    "{",
    "not json at all",
    r#"{"model": 5, "prompt": "x"}"#,
    r#"{"model": "a", "prompt": "x", "max_tokens": -1}"#,
    r#"{"model": "a", "prompt": "x", "temperature": "hot"}"#,
    r#"{"model": "a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#,
    r#"{"model": "nobody", "prompt": "x"}"#,
    r#"{"model": "a", "prompt": "x", "max_tokens": 18446744073709551615}"#,
];

/// The `i`-th distinct request (adapter × prompt), greedy, 16 tokens.
fn body(i: usize, stream: bool) -> String {
    json!({"model": ADAPTERS[i % ADAPTERS.len()], "prompt": PROMPTS[i % PROMPTS.len()],
           "max_tokens": 16, "temperature": 0, "stream": stream})
    .to_string()
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Responses read (any status), for the `/metrics` sum.
    responses: AtomicU64,
    completed: AtomicU64,
    streamed: AtomicU64,
    hung_up: AtomicU64,
    malformed: AtomicU64,
    retried_429: AtomicU64,
    adapter_cycles: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, what: String) {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The text of a completion, whole or streamed; `None` when the stream did not end in `[DONE]`.
fn answer_text(response: &client::Response, stream: bool) -> Option<String> {
    if !stream {
        return response.json()["choices"][0]["text"]
            .as_str()
            .map(str::to_string);
    }
    let events = response.events();
    if events.last().map(String::as_str) != Some("[DONE]") {
        return None;
    }
    let mut text = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).ok()?;
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or_default());
    }
    Some(text)
}

/// One ordinary client: requests until the deadline, each compared with its answer alone.
fn ordinary(
    c: usize,
    addr: std::net::SocketAddr,
    alone: &[String],
    tally: &Tally,
    stop: &AtomicBool,
) {
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let i = (c * 7 + k) % alone.len();
        let stream = (c + k).is_multiple_of(2);
        k += 1;
        loop {
            match client::request(addr, "POST", "/v1/completions", None, &body(i, stream)) {
                Ok(r) if r.status == 429 => {
                    tally.count(&tally.responses);
                    tally.count(&tally.retried_429);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(r) if r.status == 200 => {
                    tally.count(&tally.responses);
                    match answer_text(&r, stream) {
                        Some(text) if text == alone[i] => {
                            tally.count(&tally.completed);
                            if stream {
                                tally.count(&tally.streamed);
                            }
                        }
                        Some(text) => tally.problem(format!(
                            "request {i} (stream {stream}) answered {text:?}, alone {:?}",
                            alone[i]
                        )),
                        None => tally.problem(format!("request {i}: an incomplete stream")),
                    }
                    break;
                }
                Ok(r) => {
                    tally.count(&tally.responses);
                    tally.problem(format!("request {i}: status {}: {}", r.status, r.body));
                    break;
                }
                Err(e) => {
                    tally.problem(format!("request {i}: {e}"));
                    break;
                }
            }
        }
    }
}

/// A client that starts a long stream, reads its first bytes and hangs up.
fn hangs_up(addr: std::net::SocketAddr, tally: &Tally, stop: &AtomicBool) {
    use std::io::Read;
    while !stop.load(Ordering::Relaxed) {
        let long = json!({"model": "b", "prompt": "x", "max_tokens": 200, "ignore_eos": true,
                          "temperature": 1.0, "seed": 3, "stream": true})
        .to_string();
        match client::send(addr, "POST", "/v1/completions", None, &long) {
            Ok(mut stream) => {
                let mut head = [0u8; 64];
                match stream.read(&mut head) {
                    Ok(n) if n > 0 => {
                        let status = String::from_utf8_lossy(&head[..n]);
                        // A full queue answers 429 before any stream: counted, not a problem.
                        tally.count(&tally.responses);
                        if status.starts_with("HTTP/1.1 200") {
                            tally.count(&tally.hung_up);
                        } else if !status.starts_with("HTTP/1.1 429") {
                            tally.problem(format!("a long stream began with {status:?}"));
                        }
                    }
                    other => tally.problem(format!("a long stream: {other:?}")),
                }
                // Dropped here: the server must notice and free the row.
            }
            Err(e) => tally.problem(format!("connecting: {e}")),
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// A client whose bodies are wrong: each must get a 4xx in OpenAI's shape.
fn malformed(c: usize, addr: std::net::SocketAddr, tally: &Tally, stop: &AtomicBool) {
    let mut k = c;
    while !stop.load(Ordering::Relaxed) {
        let bad = MALFORMED[k % MALFORMED.len()];
        k += 1;
        match client::request(addr, "POST", "/v1/completions", None, bad) {
            Ok(r) => {
                tally.count(&tally.responses);
                let shaped = r.json()["error"]["message"].is_string();
                if (400..500).contains(&r.status) && r.status != 429 && shaped {
                    tally.count(&tally.malformed);
                } else if r.status != 429 {
                    tally.problem(format!("{bad:?} was answered {}: {}", r.status, r.body));
                }
            }
            Err(e) => tally.problem(format!("{bad:?}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Loads adapter `e` (a copy of `c` in the adapter folder) and unloads it.
fn load_unload_once(addr: std::net::SocketAddr, tally: &Tally) {
    for (path, body) in [
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "e", "lora_path": "e"}),
        ),
        ("/v1/unload_lora_adapter", json!({"lora_name": "e"})),
    ] {
        match client::request(addr, "POST", path, None, &body.to_string()) {
            Ok(r) => {
                tally.count(&tally.responses);
                if r.status != 200 {
                    tally.problem(format!("{path}: {} {}", r.status, r.body));
                }
            }
            Err(e) => tally.problem(format!("{path}: {e}")),
        }
    }
    tally.count(&tally.adapter_cycles);
}

/// [`load_unload_once`] in a loop until `stop`.
fn load_unload(addr: std::net::SocketAddr, tally: &Tally, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        load_unload_once(addr, tally);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of a Prometheus counter's series, and a gauge's value, from `/metrics`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The clients, for `seconds`: one in ten hanging up, one in ten malformed, the rest ordinary,
/// and the adapter loader, sampling the server's memory with `measure` once a second (`None`:
/// not sampled).
fn run_clients(
    addr: std::net::SocketAddr,
    clients: usize,
    seconds: f64,
    alone: &Arc<Vec<String>>,
    tally: &Arc<Tally>,
    measure: &mut dyn FnMut() -> Result<Option<Memory>, String>,
) -> Result<Round, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut threads = Vec::new();
    for c in 0..clients {
        let (tally, stop, alone) = (tally.clone(), stop.clone(), alone.clone());
        threads.push(std::thread::spawn(move || match c % 10 {
            0 => hangs_up(addr, &tally, &stop),
            1 => malformed(c, addr, &tally, &stop),
            _ => ordinary(c, addr, &alone, &tally, &stop),
        }));
    }
    {
        let (tally, stop) = (tally.clone(), stop.clone());
        threads.push(std::thread::spawn(move || load_unload(addr, &tally, &stop)));
    }
    // The server's memory once a second: a leak climbs with the requests served, an allocator
    // settling into its arenas levels off.
    let deadline = Duration::from_secs_f64(seconds);
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut failed = None;
    while started.elapsed() < deadline && failed.is_none() {
        if started.elapsed() >= next_sample {
            match measure() {
                Ok(sample) => samples.extend(sample),
                Err(e) => failed = Some(e),
            }
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| "a client thread panicked".to_string())?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(Round {
        wall: started.elapsed().as_secs_f64(),
        samples,
    })
}

/// One round of clients: its wall time and the server's memory once a second.
struct Round {
    wall: f64,
    samples: Vec<Memory>,
}

/// The server process's memory at one moment.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Resident bytes (`VmRSS`).
    rss: u64,
    /// Peak resident bytes so far (`VmHWM`).
    peak_rss: u64,
    /// Bytes its heap holds live (allocated, not freed).
    heap: i64,
}

/// Polls `/metrics` until the server has no rows and no queue (30 s at most); its text. Each
/// response read is counted in `tally`.
fn wait_until_idle(addr: std::net::SocketAddr, tally: &Tally) -> Result<String, String> {
    let settle = Instant::now();
    loop {
        let text = client::request(addr, "GET", "/metrics", None, "")
            .map_err(|e| e.to_string())?
            .body;
        tally.count(&tally.responses);
        let idle = metric_sum(&text, "peft_batch_size") == 0.0
            && metric_sum(&text, "peft_queue_length") == 0.0;
        if idle || settle.elapsed() > Duration::from_secs(30) {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The soak's server: bloom-tiny with [`ADAPTERS`], a small batch and queue (so that 429s
/// happen), and `adapter_dir` for the runtime loads.
fn soak_server(
    root: &Path,
    work: &Path,
    adapter_dir: &Path,
) -> Result<crate::serve::RunningServer, String> {
    four_adapter_server(root, work, |options| {
        options.max_batch = 8;
        options.max_queue = 16;
        options.adapter_dir = Some(adapter_dir.to_path_buf());
    })
}

/// `serve-soak-server --work DIR --adapter-dir DIR` (run by `serve-soak`, not by hand): serves
/// the soak's server, prints its address, then answers each `measure` line on stdin with
/// `<resident bytes> <peak resident bytes> <live heap bytes>`; stops when stdin closes.
pub fn serve_child(args: &[String], root: &Path) -> Result<(), String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .ok_or(format!("serve-soak-server needs {flag} DIR"))
    };
    let (work, adapter_dir) = (value("--work")?, value("--adapter-dir")?);
    let server = soak_server(root, Path::new(work), Path::new(adapter_dir))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.addr).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        if line.map_err(|e| e.to_string())?.trim() == "measure" {
            let rss = crate::rss_bytes().unwrap_or(0);
            let peak = crate::peak_rss_bytes().unwrap_or(0);
            writeln!(out, "{rss} {peak} {}", crate::live_heap_bytes())
                .map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
        }
    }
    server.stop()
}

/// The soak's server process and the pipes to it.
struct ServerProcess {
    addr: std::net::SocketAddr,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ServerProcess {
    /// Starts `serve-soak-server` (this binary) and waits for its address.
    fn start(work: &Path, adapter_dir: &Path) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("serve-soak-server")
            .arg("--work")
            .arg(work)
            .arg("--adapter-dir")
            .arg(adapter_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the soak's server: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the soak's server has no pipes".into());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line.trim().parse().map_err(|_| {
            format!(
                "the soak's server did not start (it printed `{}`)",
                line.trim()
            )
        })?;
        Ok(Self {
            addr,
            child,
            stdin,
            stdout,
        })
    }

    /// The server's memory now.
    fn measure(&mut self) -> Result<Memory, String> {
        writeln!(self.stdin, "measure").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let fields: Vec<i64> = line
            .split_whitespace()
            .map_while(|f| f.parse().ok())
            .collect();
        match fields[..] {
            [rss, peak_rss, heap] => Ok(Memory {
                rss: rss.max(0) as u64,
                peak_rss: peak_rss.max(0) as u64,
                heap,
            }),
            _ => Err(format!(
                "the soak's server answered `{}` to measure",
                line.trim()
            )),
        }
    }

    /// Closes its stdin (it shuts down gracefully) and waits for it.
    fn stop(self) -> Result<(), String> {
        let Self {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the soak's server exited with {status}"))
        }
    }
}

/// `serve-soak`.
pub fn run(settings: SoakSettings, root: &Path) -> Result<Value, String> {
    let work = tempfile_dir("soak")?;
    let adapter_dir = work.join("runtime");
    let source = crate::serve::fixtures(root).join("adapters/multi-bloom/c");
    std::fs::create_dir_all(adapter_dir.join("e")).map_err(|e| e.to_string())?;
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(source.join(file), adapter_dir.join("e").join(file))
            .map_err(|e| format!("{}: {e}", source.join(file).display()))?;
    }
    let mut server = ServerProcess::start(&work, &adapter_dir)?;
    let addr = server.addr;
    let tally = Arc::new(Tally::default());

    // Every distinct request alone (whole), then once streamed and one adapter cycle: the
    // answers to hold the loaded server to, and the warm-up before the memory baseline.
    let distinct = ADAPTERS.len() * PROMPTS.len();
    let mut alone = Vec::new();
    for i in 0..distinct {
        let r = client::request(addr, "POST", "/v1/completions", None, &body(i, false))
            .map_err(|e| e.to_string())?;
        tally.count(&tally.responses);
        let text = answer_text(&r, false).ok_or(format!("alone: {} {}", r.status, r.body))?;
        alone.push(text);
        let r = client::request(addr, "POST", "/v1/completions", None, &body(i, true))
            .map_err(|e| e.to_string())?;
        tally.count(&tally.responses);
        if answer_text(&r, true).as_ref() != Some(&alone[i]) {
            return Err(format!("alone: request {i} streamed differs from whole"));
        }
    }
    load_unload_once(addr, &tally);
    let alone = Arc::new(alone);
    // A first, short round of the same load: the memory baseline is taken after it (and once
    // the server is idle again), when the allocator holds the arenas and buffers that this many
    // connections need.
    let warm_up = (settings.seconds / 10.0).clamp(1.0, 10.0);
    run_clients(addr, settings.clients, warm_up, &alone, &tally, &mut || {
        Ok(None)
    })?;
    wait_until_idle(addr, &tally)?;
    let before = server.measure()?;
    let round = run_clients(
        addr,
        settings.clients,
        settings.seconds,
        &alone,
        &tally,
        &mut || server.measure().map(Some),
    )?;
    let wall = round.wall;
    // The rows of the clients that hung up leave at the server's next step.
    let metrics = wait_until_idle(addr, &tally)?;
    let after = server.measure()?;
    server.stop()?;
    let _ = std::fs::remove_dir_all(&work);

    let mut problems = tally.problems.lock().map_err(|e| e.to_string())?.clone();
    let counted = metric_sum(&metrics, "peft_http_responses_total");
    // Every response read, less the last /metrics one: it is counted once sent, after its text
    // was written.
    let read = tally.responses.load(Ordering::Relaxed) as f64 - 1.0;
    if counted != read {
        problems.push(format!(
            "/metrics counts {counted} responses, the clients read {read}"
        ));
    }
    if metric_sum(&metrics, "peft_batch_size") != 0.0
        || metric_sum(&metrics, "peft_queue_length") != 0.0
    {
        problems.push("rows or queued requests left 30 s after the soak".into());
    }
    // Growth between the idle points, each checked against the 10 % bound.
    let mut growth = |what: &str, before: f64, after: f64| {
        let grown = after / before.max(1.0) - 1.0;
        if grown > 0.10 {
            problems.push(format!(
                "the server's {what} grew {:.1} % over the soak ({before} → {after} bytes)",
                grown * 100.0
            ));
        }
        grown
    };
    let rss_growth = growth("resident memory", before.rss as f64, after.rss as f64);
    let heap_growth = growth("live heap", before.heap as f64, after.heap as f64);
    let mb = |b: f64| (b / 1e5).round() / 10.0;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let report = json!({
        "case": "serve-soak",
        "times_s": [wall],
        "clients": settings.clients,
        "completed_equal_alone": load(&tally.completed),
        "of_them_streamed": load(&tally.streamed),
        "hung_up_mid_stream": load(&tally.hung_up),
        "malformed_answered_4xx": load(&tally.malformed),
        "retried_429": load(&tally.retried_429),
        "adapter_load_unload_cycles": load(&tally.adapter_cycles),
        "responses_read": read,
        "responses_in_metrics": counted,
        "server_rss_before_bytes": before.rss,
        "server_rss_after_bytes": after.rss,
        "rss_growth": rss_growth,
        "server_heap_before_bytes": before.heap,
        "server_heap_after_bytes": after.heap,
        "heap_growth": heap_growth,
        "server_peak_rss_bytes": after.peak_rss,
        "server_rss_mb_each_second": round.samples.iter().map(|m| mb(m.rss as f64)).collect::<Vec<_>>(),
        "server_heap_mb_each_second": round.samples.iter().map(|m| mb(m.heap as f64)).collect::<Vec<_>>(),
    });
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "{} problems in the soak, first: {}; {report}",
            problems.len(),
            problems[0]
        ))
    }
}
