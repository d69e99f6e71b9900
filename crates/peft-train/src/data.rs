//! Training data: JSONL / JSON files in the common shapes, rendered with the seed tutorial's chat
//! template, tokenised with the loss restricted to the response.
//!
//! Accepted records (one JSON object per line, or one JSON array of objects):
//!
//! * alpaca — `{"instruction": …, "input": …(optional), "output": …}`
//! * chat — `{"messages": [{"role": "user"|"system"|"assistant", "content": …}, …]}`, the last
//!   message from the assistant
//! * plain — `{"text": …}` (the loss covers every token)
//!
//! Template (the seed tutorial's): `"Human: " + instruction` and the input joined by a newline and
//! stripped, then `"\n\nAssistant: "`; the response follows and ends with EOS. Labels are -100 on
//! the prompt, so only the response is learned.
//!
//! Chat records on a model whose tokenizer has a chat template (`tokenizer_config.json`) are
//! rendered with that template instead, and every assistant turn is learned (its content and the
//! template's end-of-turn text), everything else not — TRL's `SFTTrainer` with
//! `assistant_only_loss`. Each piece is tokenised on its own, without added special tokens (the
//! template writes them).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use peft_models::Tokenizer;
use peft_models::chat::Message;
use peft_ops::loss::IGNORE_INDEX;

/// What went wrong with a data file; every variant names the file and, where there is one, the
/// line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A line is not UTF-8.
    #[error("{path}:{line}: not valid UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A line (or the whole JSON file) does not parse.
    #[error("{path}:{line}: invalid JSON: {error}")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        error: String,
    },
    /// A record has none of the known shapes, or a field of the wrong type.
    #[error("{path}:{line}: {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the array index + 1 in a JSON array file).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file holds no records.
    #[error("{path}: no examples in the file")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// After truncation and masking, no example has a token to learn.
    #[error(
        "{path}: no trainable tokens: every example's response was masked or truncated away (max_length {max_length})"
    )]
    NothingToLearn {
        /// The file.
        path: PathBuf,
        /// The truncation length.
        max_length: usize,
    },
    /// The tokenizer failed.
    #[error("{0}")]
    Tokenizer(#[from] peft_core::PeftError),
}

/// One training example: the prompt (not learned) and the response (learned).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Rendered prompt, e.g. `"Human: …\n\nAssistant: "`; empty for plain text.
    pub prompt: String,
    /// The response, learned token by token (EOS is appended when tokenising).
    pub response: String,
    /// A chat record's messages (empty otherwise): rendered with the model's chat template
    /// where it has one, in place of `prompt` / `response`.
    pub messages: Vec<Message>,
}

impl Example {
    /// The ids a model is given to produce [`Example::response`]: the chat template with its
    /// generation prompt over every message but the last where the tokenizer has a template
    /// and this is a chat record, else `prompt`.
    pub fn generation_prompt(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
        match (tokenizer.chat_template(), self.messages.split_last()) {
            (Some(template), Some((_, history))) => {
                Ok(tokenizer.encode_plain(&template.render(history, true)?)?)
            }
            _ => Ok(tokenizer.encode(&self.prompt)?),
        }
    }
}

fn field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` must be a string, found {other}")),
    }
}

/// The seed tutorial's prompt for an instruction and an optional input (it lives with the
/// chat templates, in [`peft_models::chat::seed_prompt`]).
pub use peft_models::chat::seed_prompt as chat_prompt;

/// Parses one record into an [`Example`].
pub fn parse_record(value: &Value) -> Result<Example, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {value}"))?;
    if let Some(messages) = obj.get("messages") {
        let messages = messages
            .as_array()
            .ok_or("`messages` must be an array of {role, content}")?;
        let mut turns = Vec::new();
        for m in messages {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("each message needs a `role` string")?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or("each message needs a `content` string")?;
            turns.push((role, content));
        }
        let Some((&(last_role, response), history)) = turns.split_last() else {
            return Err("`messages` is empty".into());
        };
        if last_role != "assistant" {
            return Err(format!(
                "the last message must come from the assistant, not `{last_role}`"
            ));
        }
        let mut prompt = String::new();
        for (role, content) in history {
            match *role {
                "system" => prompt.push_str(&format!("{content}\n")),
                "user" => prompt.push_str(&format!("Human: {content}\n\nAssistant: ")),
                "assistant" => prompt.push_str(&format!("{content}\n")),
                other => return Err(format!("unknown role `{other}` (user, system, assistant)")),
            }
        }
        if !prompt.ends_with("Assistant: ") {
            return Err("the assistant's answer must follow a user message".into());
        }
        return Ok(Example {
            prompt,
            response: response.to_string(),
            messages: turns
                .iter()
                .map(|(role, content)| Message::new(role, content))
                .collect(),
        });
    }
    if let Some(output) = field(obj, "output")? {
        let instruction = field(obj, "instruction")?
            .ok_or("an alpaca record needs `instruction` with `output`")?;
        let input = field(obj, "input")?.unwrap_or("");
        return Ok(Example {
            prompt: chat_prompt(instruction, input),
            response: output.to_string(),
            messages: Vec::new(),
        });
    }
    if let Some(text) = field(obj, "text")? {
        return Ok(Example {
            prompt: String::new(),
            response: text.to_string(),
            messages: Vec::new(),
        });
    }
    let keys: Vec<&String> = obj.keys().collect();
    Err(format!(
        "unknown record shape with keys {keys:?}: expected `instruction` + `output`, `messages`, or `text`"
    ))
}

/// Reads every example of a `.jsonl` file (one object per line, blank lines skipped) or a `.json`
/// file holding an array.
pub fn read_examples(path: impl AsRef<Path>) -> Result<Vec<Example>, DataError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|error| DataError::Io {
        path: path.into(),
        error,
    })?;
    parse_examples(path, &bytes)
}

/// [`read_examples`] on bytes already read; `path` only labels errors.
pub fn parse_examples(path: &Path, bytes: &[u8]) -> Result<Vec<Example>, DataError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let mut examples = Vec::new();
    if first == Some(&b'[') {
        let text = std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
            path: path.into(),
            line: 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
        })?;
        let values: Vec<Value> = serde_json::from_str(text).map_err(|e| DataError::Json {
            path: path.into(),
            line: e.line(),
            error: e.to_string(),
        })?;
        for (i, value) in values.iter().enumerate() {
            examples.push(parse_record(value).map_err(|reason| DataError::Record {
                path: path.into(),
                line: i + 1,
                reason,
            })?);
        }
    } else {
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let text = std::str::from_utf8(raw).map_err(|_| DataError::NotUtf8 {
                path: path.into(),
                line,
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(text).map_err(|e| DataError::Json {
                path: path.into(),
                line,
                error: e.to_string(),
            })?;
            examples.push(parse_record(&value).map_err(|reason| DataError::Record {
                path: path.into(),
                line,
                reason,
            })?);
        }
    }
    if examples.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(examples)
}

/// One tokenised example: ids and labels of equal length (-100 where no loss is taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Targets; [`IGNORE_INDEX`] on the prompt.
    pub labels: Vec<i64>,
}

impl Tokenized {
    /// Whether any label is learned.
    pub fn has_target(&self) -> bool {
        self.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX)
    }
}

/// Tokenises `example`: prompt ids (labels -100), then response ids and EOS (learned),
/// truncated to `max_length`. Returns whether truncation happened.
pub fn tokenize(
    example: &Example,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    max_length: usize,
) -> Result<(Tokenized, bool), DataError> {
    if let (Some(template), false) = (tokenizer.chat_template(), example.messages.is_empty()) {
        let mut input_ids = Vec::new();
        let mut labels = Vec::new();
        for (text, learned) in template.assistant_segments(&example.messages)? {
            let ids = tokenizer.encode_plain(&text)?;
            labels.extend(
                ids.iter()
                    .map(|&t| if learned { t as i64 } else { IGNORE_INDEX }),
            );
            input_ids.extend(ids);
        }
        let truncated = input_ids.len() > max_length;
        input_ids.truncate(max_length);
        labels.truncate(max_length);
        return Ok((Tokenized { input_ids, labels }, truncated));
    }
    let prompt = if example.prompt.is_empty() {
        Vec::new()
    } else {
        tokenizer.encode(&example.prompt)?
    };
    let mut response = tokenizer.encode(&example.response)?;
    response.extend(eos);
    let mut input_ids = prompt.clone();
    input_ids.extend(&response);
    let mut labels: Vec<i64> = vec![IGNORE_INDEX; prompt.len()];
    labels.extend(response.iter().map(|&t| t as i64));
    let truncated = input_ids.len() > max_length;
    input_ids.truncate(max_length);
    labels.truncate(max_length);
    Ok((Tokenized { input_ids, labels }, truncated))
}

/// Tokenises every example, warning about truncated ones and refusing a data set with nothing
/// to learn.
pub fn tokenize_all(
    path: &Path,
    examples: &[Example],
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    max_length: usize,
) -> Result<Vec<Tokenized>, DataError> {
    let mut out = Vec::with_capacity(examples.len());
    let mut truncated = 0;
    for example in examples {
        let (t, cut) = tokenize(example, tokenizer, eos, max_length)?;
        truncated += cut as usize;
        out.push(t);
    }
    if truncated > 0 {
        tracing::warn!(
            "{}: {truncated} of {} examples are longer than max_length {max_length} and were truncated",
            path.display(),
            examples.len()
        );
    }
    if !out.iter().any(Tokenized::has_target) {
        return Err(DataError::NothingToLearn {
            path: path.into(),
            max_length,
        });
    }
    Ok(out)
}

/// Splits off a held-out set: a seeded shuffle, then the last `eval_fraction` (at least one
/// example when the fraction is positive and there are two or more).
pub fn split<T: Clone>(items: &[T], eval_fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut n_eval = (items.len() as f64 * eval_fraction).round() as usize;
    if eval_fraction > 0.0 && items.len() >= 2 {
        n_eval = n_eval.clamp(1, items.len() - 1);
    }
    let (train, eval) = order.split_at(items.len() - n_eval);
    (
        train.iter().map(|&i| items[i].clone()).collect(),
        eval.iter().map(|&i| items[i].clone()).collect(),
    )
}

/// A padded batch on the host: `[batch, seq]` ids, mask and labels (right padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBatch {
    /// `[batch, seq]`.
    pub shape: [usize; 2],
    /// Token ids, `pad_id` on padding.
    pub input_ids: Vec<i64>,
    /// 1 on real tokens.
    pub attention_mask: Vec<i64>,
    /// Targets, -100 on padding and prompts.
    pub labels: Vec<i64>,
}

/// Pads `items` to the longest of them (dynamic padding, on the right).
pub fn collate(items: &[&Tokenized], pad_id: u32) -> HostBatch {
    let width = items.iter().map(|t| t.input_ids.len()).max().unwrap_or(0);
    let mut batch = HostBatch {
        shape: [items.len(), width],
        input_ids: Vec::with_capacity(items.len() * width),
        attention_mask: Vec::with_capacity(items.len() * width),
        labels: Vec::with_capacity(items.len() * width),
    };
    for t in items {
        let pad = width - t.input_ids.len();
        batch
            .input_ids
            .extend(t.input_ids.iter().map(|&i| i as i64));
        batch
            .input_ids
            .extend(std::iter::repeat_n(pad_id as i64, pad));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(1, t.input_ids.len()));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
        batch.labels.extend(&t.labels);
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }
    batch
}

/// The order of the training examples in `epoch`: a shuffle seeded by `(seed, epoch)`, so that a
/// resumed run sees exactly the order an uninterrupted one does.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mixed = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mixed));
    order
}
