//! State the HTTP side and the engine share: the adapters loaded, the queue's length, and the
//! counters `GET /metrics` reports in Prometheus' text format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counters of one adapter (or of the base model, under its served name).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AdapterCounts {
    /// Requests admitted into the batch.
    pub requests: u64,
    /// Prompt tokens of those requests.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

#[derive(Debug, Default)]
struct Counters {
    per_adapter: BTreeMap<String, AdapterCounts>,
    responses: BTreeMap<u16, u64>,
    batch_size: usize,
    steps: u64,
    last_step_tokens_per_second: f64,
    engine_panics: u64,
    adapter_loads: u64,
    adapter_load_seconds: f64,
    adapter_evictions: u64,
}

/// What the server's two sides share.
#[derive(Debug, Default)]
pub struct Shared {
    adapters: Mutex<BTreeSet<String>>,
    queued: AtomicUsize,
    counters: Mutex<Counters>,
    base_name: String,
    /// Why the engine stopped for good (a panic outside any one request); `None` while it runs.
    engine_stopped: Mutex<Option<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain counters).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Shared state of a server whose base model is served as `base_name`.
    pub fn new(base_name: &str) -> Self {
        Self {
            base_name: base_name.to_string(),
            ..Self::default()
        }
    }

    /// Replaces the list of loaded adapters (the engine, after each change).
    pub fn set_adapters(&self, names: impl IntoIterator<Item = String>) {
        *locked(&self.adapters) = names.into_iter().collect();
    }

    /// Names of the loaded adapters, sorted.
    pub fn adapters(&self) -> Vec<String> {
        locked(&self.adapters).iter().cloned().collect()
    }

    /// Whether an adapter of that name is loaded.
    pub fn has_adapter(&self, name: &str) -> bool {
        locked(&self.adapters).contains(name)
    }

    /// Takes a place in the queue unless `limit` requests already wait; whether it did.
    pub fn try_enqueue(&self, limit: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a place in the queue (admitted, or never sent).
    pub fn dequeued(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Requests waiting to join the batch.
    pub fn queue_len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn key(&self, adapter: &str) -> String {
        if adapter == peft_core::BASE_ADAPTER {
            self.base_name.clone()
        } else {
            adapter.to_string()
        }
    }

    /// A request of `adapter` joined the batch with a prompt of `prompt_tokens`.
    pub fn started(&self, adapter: &str, prompt_tokens: usize) {
        let key = self.key(adapter);
        let mut c = locked(&self.counters);
        let entry = c.per_adapter.entry(key).or_default();
        entry.requests += 1;
        entry.prompt_tokens += prompt_tokens as u64;
    }

    /// `tokens` more were generated for `adapter`.
    pub fn generated(&self, adapter: &str, tokens: usize) {
        let key = self.key(adapter);
        locked(&self.counters)
            .per_adapter
            .entry(key)
            .or_default()
            .generated_tokens += tokens as u64;
    }

    /// The running batch now has `rows` rows.
    pub fn set_batch_size(&self, rows: usize) {
        locked(&self.counters).batch_size = rows;
    }

    /// A decoding step of `rows` rows took `took`.
    pub fn step_done(&self, rows: usize, took: Duration) {
        let mut c = locked(&self.counters);
        c.steps += 1;
        let secs = took.as_secs_f64();
        if secs > 0.0 {
            c.last_step_tokens_per_second = rows as f64 / secs;
        }
    }

    /// An adapter was loaded (at start, by `/v1/load_lora_adapter` or on first use) in `took`.
    pub fn adapter_loaded(&self, took: Duration) {
        let mut c = locked(&self.counters);
        c.adapter_loads += 1;
        c.adapter_load_seconds += took.as_secs_f64();
    }

    /// An idle adapter loaded on first use was evicted to make room (`--max-loras`).
    pub fn adapter_evicted(&self) {
        locked(&self.counters).adapter_evictions += 1;
    }

    /// The engine caught a panic in one step, prefill or adapter load and went on.
    pub fn engine_panicked(&self) {
        locked(&self.counters).engine_panics += 1;
    }

    /// The engine stopped for good, for `why`: `/health` answers 503 from now on.
    pub fn set_engine_stopped(&self, why: String) {
        *locked(&self.engine_stopped) = Some(why);
    }

    /// Why the engine stopped for good, if it did.
    pub fn engine_stopped(&self) -> Option<String> {
        locked(&self.engine_stopped).clone()
    }

    /// A response with HTTP status `status` was sent.
    pub fn responded(&self, status: u16) {
        *locked(&self.counters).responses.entry(status).or_default() += 1;
    }

    /// Counters of `adapter` (the base under its served name).
    pub fn counts(&self, adapter: &str) -> AdapterCounts {
        locked(&self.counters)
            .per_adapter
            .get(adapter)
            .copied()
            .unwrap_or_default()
    }

    /// Everything in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let c = locked(&self.counters);
        let mut out = String::new();
        let per_adapter: [(&str, &str, Counter); 3] = [
            (
                "peft_requests_total",
                "Requests admitted into the batch, per model or adapter.",
                |a| a.requests,
            ),
            (
                "peft_prompt_tokens_total",
                "Prompt tokens of admitted requests, per model or adapter.",
                |a| a.prompt_tokens,
            ),
            (
                "peft_generated_tokens_total",
                "Tokens generated, per model or adapter.",
                |a| a.generated_tokens,
            ),
        ];
        for (name, help, get) in per_adapter {
            header(&mut out, name, "counter", help);
            for (adapter, counts) in &c.per_adapter {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\"}} {}",
                    escape(adapter),
                    get(counts)
                );
            }
        }
        let name = "peft_http_responses_total";
        header(
            &mut out,
            name,
            "counter",
            "HTTP responses, per status code.",
        );
        for (status, n) in &c.responses {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {n}");
        }
        for (name, kind, help, value) in [
            (
                "peft_queue_length",
                "gauge",
                "Requests waiting to join the batch.",
                self.queue_len() as f64,
            ),
            (
                "peft_batch_size",
                "gauge",
                "Sequences in the running batch.",
                c.batch_size as f64,
            ),
            (
                "peft_decode_steps_total",
                "counter",
                "Decoding steps run.",
                c.steps as f64,
            ),
            (
                "peft_tokens_per_second",
                "gauge",
                "Tokens per second of the last decoding step (rows / step time).",
                c.last_step_tokens_per_second,
            ),
            (
                "peft_engine_panics_total",
                "counter",
                "Panics the engine caught in a step, prefill or adapter load (those requests \
                 failed with 500; the others went on).",
                c.engine_panics as f64,
            ),
            (
                "peft_adapter_loads_total",
                "counter",
                "Adapters loaded (at start, by /v1/load_lora_adapter, or on first use).",
                c.adapter_loads as f64,
            ),
            (
                "peft_adapter_load_seconds_total",
                "counter",
                "Time spent loading adapters (divide by the loads for the mean latency).",
                c.adapter_load_seconds,
            ),
            (
                "peft_adapter_evictions_total",
                "counter",
                "Idle adapters loaded on first use that were evicted to make room \
                 (--max-loras).",
                c.adapter_evictions as f64,
            ),
            (
                "peft_resident_adapters",
                "gauge",
                "Adapters loaded now.",
                locked(&self.adapters).len() as f64,
            ),
        ] {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// Reads one counter of an adapter.
type Counter = fn(&AdapterCounts) -> u64;

/// The `# HELP` and `# TYPE` lines of a metric family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_metrics_count_per_adapter() {
        let shared = Shared::new("tiny");
        assert!(shared.try_enqueue(2));
        assert!(shared.try_enqueue(2));
        assert!(!shared.try_enqueue(2));
        shared.dequeued();
        assert_eq!(shared.queue_len(), 1);
        shared.started("a", 5);
        shared.generated("a", 3);
        shared.started(peft_core::BASE_ADAPTER, 2);
        shared.responded(429);
        shared.set_batch_size(2);
        assert_eq!(
            shared.counts("a"),
            AdapterCounts {
                requests: 1,
                prompt_tokens: 5,
                generated_tokens: 3
            }
        );
        assert_eq!(shared.counts("tiny").requests, 1);
        let text = shared.render();
        for line in [
            "# TYPE peft_requests_total counter",
            "peft_requests_total{model=\"a\"} 1",
            "peft_requests_total{model=\"tiny\"} 1",
            "peft_generated_tokens_total{model=\"a\"} 3",
            "peft_http_responses_total{status=\"429\"} 1",
            "peft_queue_length 1",
            "peft_batch_size 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
