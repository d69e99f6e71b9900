//! The tokenizer keys (`tokenizer.ggml.*`, `tokenizer.chat_template`) as the converter's
//! `_set_vocab_gpt2` and `gguf.SpecialVocab` write them from `tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja` and `config.json`.
//!
//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen, Mistral Nemo,
//! BLOOM...) are written. A folder with a sentencepiece `tokenizer.model`, or a BPE with
//! `byte_fallback` (Llama 2 style), is refused: the converter writes those as
//! `tokenizer.ggml.model = "llama"` with sentencepiece scores, not done here yet.
//!
//! `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer): the converter recognises a vocabulary by
//! the hash of its tokenisation of a fixed text. Here it is read from the pre-tokenizer itself:
//! GPT-2's byte-level regex → `gpt-2`; Llama 3's split regex → `llama-bpe`; Qwen2's → `qwen2`.
//! Anything else needs `pre` given by the caller (the CLI's `--tokenizer-pre`), and the error
//! says so.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;

use crate::error::{GgufError, Result};
use crate::format::{Value, ValueType};

/// llama.cpp's token types (`enum llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's pre-tokenizer split (`tokenizer.json`), llama.cpp's `llama-bpe`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split, llama.cpp's `qwen2`.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer name llama.cpp knows this tokenizer's `pre_tokenizer` by, if any.
pub fn detect_pre(tokenizer: &Json) -> Option<&'static str> {
    let pre = tokenizer.get("pre_tokenizer")?;
    let kind = pre.get("type").and_then(Json::as_str)?;
    match kind {
        "ByteLevel" if pre.get("use_regex").and_then(Json::as_bool).unwrap_or(true) => {
            Some("gpt-2")
        }
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            let split = parts.iter().find_map(|p| {
                (p.get("type")?.as_str()? == "Split")
                    .then(|| p.get("pattern")?.get("Regex")?.as_str())
                    .flatten()
            })?;
            match split {
                LLAMA3_SPLIT => Some("llama-bpe"),
                QWEN2_SPLIT => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The pre-tokenizer of llama.cpp's name `pre`, for a tokenizer rebuilt from a GGUF file:
/// `Some(None)` for GPT-2's byte-level regex, `Some(Some(regex))` for a split regex then
/// byte-level, `None` for a name not known here.
pub fn split_regex(pre: &str) -> Option<Option<&'static str>> {
    match pre {
        "gpt-2" => Some(None),
        "llama-bpe" => Some(Some(LLAMA3_SPLIT)),
        "qwen2" => Some(Some(QWEN2_SPLIT)),
        _ => None,
    }
}

/// Whether an added token's text marks it as a control token (the converter's
/// `does_token_look_special`).
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// The tokenizer keys for the model folder `dir`, in the converter's order.
///
/// `vocab_size` is `config.json`'s (the embedding's rows), `pre` overrides the detected
/// pre-tokenizer name.
pub fn metadata(
    dir: &Path,
    vocab_size: Option<u32>,
    pre: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    if dir.join("tokenizer.model").is_file() {
        return Err(GgufError::Unsupported(format!(
            "{}: a sentencepiece vocabulary (tokenizer.model); GGUF export writes byte-level \
             BPE vocabularies (tokenizer.json) only so far",
            dir.display()
        )));
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = crate::json::read_optional(&tokenizer_path)?
        .ok_or_else(|| GgufError::Unsupported(format!("{}: no tokenizer.json", dir.display())))?;
    let model = tokenizer.get("model").unwrap_or(&Json::Null);
    if model.get("type").and_then(Json::as_str) != Some("BPE")
        || model.get("byte_fallback").and_then(Json::as_bool) == Some(true)
    {
        return Err(GgufError::Unsupported(format!(
            "{}: only byte-level BPE vocabularies are exported so far (this one is {} {})",
            tokenizer_path.display(),
            model
                .get("type")
                .and_then(Json::as_str)
                .unwrap_or("of no known type"),
            if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
                "with byte_fallback"
            } else {
                ""
            }
        )));
    }
    let pre = match pre {
        Some(p) => p.to_string(),
        None => detect_pre(&tokenizer).map(str::to_string).ok_or_else(|| {
            GgufError::Unsupported(format!(
                "{}: llama.cpp's pre-tokenizer for this tokenizer is not recognised; name it \
                 (e.g. --tokenizer-pre llama-bpe, qwen2, gpt-2; llama.cpp's \
                 `tokenizer.ggml.pre` values)",
                tokenizer_path.display()
            ))
        })?,
    };

    // id → (text, added, special, normalized)
    let mut by_id: BTreeMap<u64, (String, bool, bool)> = BTreeMap::new();
    if let Some(vocab) = model.get("vocab").and_then(Json::as_object) {
        for (text, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id, (text.clone(), false, false));
            }
        }
    }
    let added = tokenizer
        .get("added_tokens")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    for token in &added {
        let (Some(id), Some(text)) = (
            token.get("id").and_then(Json::as_u64),
            token.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        let special = token
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        by_id.insert(id, (text.to_string(), true, special));
    }
    let max_id = by_id.keys().next_back().copied().unwrap_or(0);
    let n_vocab = u64::from(vocab_size.unwrap_or((max_id + 1) as u32));
    if max_id >= n_vocab {
        return Err(GgufError::config(
            &tokenizer_path,
            format!("token id {max_id} is past the model's vocab_size {n_vocab}"),
        ));
    }
    let mut tokens = Vec::with_capacity(n_vocab as usize);
    let mut types = Vec::with_capacity(n_vocab as usize);
    for id in 0..n_vocab {
        match by_id.get(&id) {
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
            }
            Some((text, false, _)) => {
                tokens.push(text.clone());
                types.push(NORMAL);
            }
            Some((text, true, special)) => {
                if *special || looks_special(text) {
                    tokens.push(text.clone());
                    types.push(CONTROL);
                } else {
                    tokens.push(text.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
            }
        }
    }

    let mut out: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre)),
        ("tokenizer.ggml.tokens".into(), Value::strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        ),
    ];
    if let Some(merges) = merges(model, &tokenizer_path)? {
        out.push(("tokenizer.ggml.merges".into(), Value::strings(merges)));
    }
    out.extend(special_tokens(dir, &tokenizer, &added, n_vocab)?);
    Ok(out)
}

/// `model.merges` as `"a b"` strings; the newer pair form with spaces inside a part encodes each
/// space as U+0120, as the converter does.
fn merges(model: &Json, path: &Path) -> Result<Option<Vec<String>>> {
    let Some(list) = model.get("merges").and_then(Json::as_array) else {
        return Ok(None);
    };
    if list.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        match item {
            Json::String(s) => out.push(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| {
                    v.as_str()
                        .map(|s| s.replace(' ', "\u{0120}"))
                        .ok_or_else(|| GgufError::config(path, "a merge that is not two strings"))
                };
                out.push(format!("{} {}", part(&pair[0])?, part(&pair[1])?));
            }
            _ => return Err(GgufError::config(path, "unknown merges format")),
        }
    }
    Ok(Some(out))
}

/// The special token ids, the `add_*_token` flags and the chat template, as
/// `gguf.SpecialVocab` gathers them.
fn special_tokens(
    dir: &Path,
    tokenizer: &Json,
    added: &[Json],
    n_vocab: u64,
) -> Result<Vec<(String, Value)>> {
    const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let config = crate::json::read_optional(&dir.join("tokenizer_config.json"))?;
    let token_text = |typ: &str| -> Option<String> {
        let entry = config.as_ref()?.get(format!("{typ}_token"))?;
        match entry {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let mut add_flags: Vec<(&str, bool)> = Vec::new();
    let set_flag =
        |flags: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool, force| match flags
            .iter_mut()
            .find(|(t, _)| *t == typ)
        {
            Some(slot) if force => slot.1 = v,
            Some(_) => {}
            None => flags.push((typ, v)),
        };
    if let Some(post) = tokenizer.get("post_processor").filter(|p| !p.is_null()) {
        let processors = post
            .get("processors")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_else(|| vec![post.clone()]);
        for p in processors {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    set_flag(&mut add_flags, "bos", false, false);
                    set_flag(&mut add_flags, "eos", false, false);
                }
                Some("TemplateProcessing") => {
                    let single = p.get("single").and_then(Json::as_array);
                    if let Some(single) = single.filter(|s| s.len() > 1) {
                        let special = |v: &Json| {
                            v.get("SpecialToken")?
                                .get("id")?
                                .as_str()
                                .map(str::to_string)
                        };
                        if let Some(first) = single.first().and_then(special) {
                            let bos = token_text("bos").unwrap_or_else(|| first.clone());
                            set_flag(&mut add_flags, "bos", first == bos, true);
                        }
                        if let Some(last) = single.last().and_then(special) {
                            let eos = token_text("eos").unwrap_or_else(|| last.clone());
                            set_flag(&mut add_flags, "eos", last == eos, true);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut ids: Vec<(&str, u64)> = Vec::new();
    let mut set_id = |typ: &'static str, id: Option<u64>| {
        if let Some(id) = id
            && id < n_vocab
            && !ids.iter().any(|(t, _)| *t == typ)
        {
            ids.push((typ, id));
        }
    };
    let mut chat_template = None;
    if let Some(cfg) = &config {
        let jinja = dir.join("chat_template.jinja");
        let alt = if jinja.is_file() {
            Some(Json::String(
                std::fs::read_to_string(&jinja).map_err(|e| GgufError::io(&jinja, e))?,
            ))
        } else {
            crate::json::read_optional(&dir.join("chat_template.json"))?
                .and_then(|j| j.get("chat_template").cloned())
        };
        chat_template = cfg.get("chat_template").cloned().or(alt);
        for typ in TYPES {
            if let Some(flag) = cfg.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                set_flag(&mut add_flags, typ, flag, false);
            }
            if let Some(text) = token_text(typ) {
                let id = added.iter().find_map(|t| {
                    (t.get("content")?.as_str()? == text)
                        .then(|| t.get("id")?.as_u64())
                        .flatten()
                });
                set_id(typ, id);
            }
        }
    }
    if let Some(model_config) = crate::json::read_optional(&dir.join("config.json"))? {
        for typ in TYPES {
            set_id(
                typ,
                model_config
                    .get(format!("{typ}_token_id"))
                    .and_then(Json::as_u64),
            );
        }
    }
    let mut out = Vec::new();
    for (typ, id) in ids {
        let key = match typ {
            "unk" => "unknown",
            "sep" => "seperator",
            "pad" => "padding",
            other => other,
        };
        out.push((
            format!("tokenizer.ggml.{key}_token_id"),
            Value::U32(id as u32),
        ));
    }
    for (typ, flag) in add_flags {
        out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(flag)));
    }
    match chat_template {
        Some(Json::String(t)) => out.push(("tokenizer.chat_template".into(), Value::String(t))),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let (Some(name), Some(t)) = (
                    entry.get("name").and_then(Json::as_str),
                    entry.get("template").and_then(Json::as_str),
                ) else {
                    continue;
                };
                let key = if name == "default" {
                    "tokenizer.chat_template".to_string()
                } else {
                    names.push(name.to_string());
                    format!("tokenizer.chat_template.{name}")
                };
                out.push((key, Value::String(t.to_string())));
            }
            if !names.is_empty() {
                out.push(("tokenizer.chat_templates".into(), Value::strings(names)));
            }
        }
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pre_tokenizer_is_read_from_its_regex() {
        let gpt2 = serde_json::json!({"pre_tokenizer": {"type": "ByteLevel", "use_regex": true}});
        assert_eq!(detect_pre(&gpt2), Some("gpt-2"));
        let llama3 = serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}},
            {"type": "ByteLevel", "use_regex": false}]}});
        assert_eq!(detect_pre(&llama3), Some("llama-bpe"));
        let other = serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\d+"}}]}});
        assert_eq!(detect_pre(&other), None);
    }

    #[test]
    fn special_looking_added_tokens_are_control_tokens() {
        assert!(looks_special("<|im_start|>"));
        assert!(looks_special("<unused12>"));
        assert!(!looks_special("<tool>"));
    }
}
