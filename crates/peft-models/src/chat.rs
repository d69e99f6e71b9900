//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json`, rendered as
//! transformers' `apply_chat_template` renders it (Jinja with `trim_blocks` and `lstrip_blocks`,
//! `messages`, `add_generation_prompt`, the tokenizer's `bos_token` / `eos_token`,
//! `raise_exception`, Python's string methods), through minijinja.
//!
//! ```
//! use peft_models::chat::{ChatTemplate, Message};
//!
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     None,
//!     None,
//! )
//! .unwrap();
//! let text = template
//!     .render(&[Message::new("user", " hi ")], true)
//!     .unwrap();
//! assert_eq!(text, "<|user|>hi\n<|assistant|>");
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use peft_core::{PeftError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// The work one render of a chat template may do (minijinja's fuel): a conversation of
/// thousands of turns renders well within it, a template that loops without end stops with an
/// error instead of hanging.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

fn template_error(context: &str, e: minijinja::Error) -> PeftError {
    PeftError::InvalidInput(format!("{context}: chat template: {e:#}"))
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) with the tokens it may use as `bos_token` / `eos_token`.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error("syntax", e))?;
        env.set_syntax(syntax);
        // A template comes from a model folder, i.e. from elsewhere: its work per render is
        // bounded (about an instruction or 64 bytes a unit), far above any real conversation's.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error("tokenizer_config.json", e))?;
        Ok(Self {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The template of a model folder's `tokenizer_config.json` (`chat_template` as a string,
    /// or the `default` entry of a list of named templates); `None` when it has none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| PeftError::json(&path, e))?;
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                match named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                {
                    Some(t) => t
                        .get("template")
                        .and_then(|s| s.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        // Special tokens are written as strings or as `{"content": …}` objects.
        let token = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        Self::new(&source, bos.as_deref(), eos.as_deref())
            .map(Some)
            .map_err(|e| PeftError::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// Renders `messages`; with `add_generation_prompt`, the text that opens the assistant's
    /// turn is appended.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role".to_string(), Value::from(m.role.clone()));
                map.insert("content".to_string(), Value::from(m.content.clone()));
                Value::from(map)
            })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error("render", e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| template_error("render", e))
    }

    /// Splits a conversation into `(text, learned)` pieces whose concatenation is the rendered
    /// conversation, `learned` on each assistant turn (content and the template's end-of-turn
    /// text), as TRL's `assistant_only_loss` learns them. Each assistant turn is found as the
    /// difference between the conversation rendered up to it with a generation prompt and
    /// rendered through it; a template for which these are not prefixes of one another is
    /// refused.
    pub fn assistant_segments(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        let mut pieces = Vec::new();
        let mut done = String::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            let (Some(context), Some(turn)) = (
                before.strip_prefix(done.as_str()),
                through.strip_prefix(before.as_str()),
            ) else {
                return Err(PeftError::InvalidInput(format!(
                    "chat template: rendering message {i} does not extend the conversation \
                     before it, so the assistant's tokens cannot be located"
                )));
            };
            if !context.is_empty() {
                pieces.push((context.to_string(), false));
            }
            pieces.push((turn.to_string(), true));
            done = through;
        }
        let all = self.render(messages, false)?;
        match all.strip_prefix(done.as_str()) {
            Some(rest) if !rest.is_empty() => pieces.push((rest.to_string(), false)),
            Some(_) => {}
            None => {
                return Err(PeftError::InvalidInput(
                    "chat template: the whole conversation does not extend its turns".into(),
                ));
            }
        }
        Ok(pieces)
    }
}

/// The seed tutorial's prompt for an instruction and an optional input:
/// `Human: {instruction}\n{input}` (trimmed), then `\n\nAssistant: `. The format `peft train`
/// teaches a model without a chat template.
pub fn seed_prompt(instruction: &str, input: &str) -> String {
    let joined = format!("Human: {instruction}\n{input}");
    format!("{}\n\nAssistant: ", joined.trim())
}

/// A conversation in the seed tutorial's format, ending with the generation prompt: each user
/// turn as [`seed_prompt`], each assistant turn followed by a blank line, other roles (system)
/// as their own line.
pub fn seed_conversation(messages: &[Message]) -> String {
    let mut text = String::new();
    for m in messages {
        match m.role.as_str() {
            "user" => text.push_str(&seed_prompt(&m.content, "")),
            "assistant" => {
                text.push_str(&m.content);
                text.push_str("\n\n");
            }
            _ => {
                text.push_str(&m.content);
                text.push('\n');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5's (ChatML) template, abridged to its message loop.
    const CHATML: &str = "{%- for message in messages %}\
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
        {%- endfor %}\
        {%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    /// A template that would loop 10¹⁰ times stops with an error (its fuel runs out), quickly;
    /// a conversation of 2,000 turns still renders.
    #[test]
    fn a_runaway_template_stops_instead_of_hanging() {
        let runaway = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = runaway
            .render(&conversation(), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fuel"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello there"))
            .collect();
        let chatml = ChatTemplate::new(CHATML, None, None).unwrap();
        assert_eq!(
            chatml
                .render(&long, false)
                .unwrap()
                .matches("<|im_start|>")
                .count(),
            2000
        );
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "你好"),
            Message::new("assistant", "你好！"),
            Message::new("user", "2+2?"),
            Message::new("assistant", "4"),
        ]
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let text = t.render(&conversation()[..2], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn assistant_turns_are_the_learned_segments() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let pieces = t.assistant_segments(&conversation()).unwrap();
        let learned: Vec<&str> = pieces
            .iter()
            .filter(|(_, l)| *l)
            .map(|(s, _)| s.as_str())
            .collect();
        assert_eq!(learned, vec!["你好！<|im_end|>\n", "4<|im_end|>\n"]);
        let joined: String = pieces.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(joined, t.render(&conversation(), false).unwrap());
    }

    #[test]
    fn special_tokens_exceptions_and_python_methods() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
             {{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}\
             {{ m.content.strip() }}{{ eos_token }}{% endfor %}",
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        let ok = t.render(&[Message::new("user", "  hi ")], false).unwrap();
        assert_eq!(ok, "<s>hi</s>");
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Only user and assistant roles are supported!"),
            "{err}"
        );
        let bad = ChatTemplate::new("{% for %}", None, None)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("chat template"), "{bad}");
    }

    #[test]
    fn seed_turns_are_the_tutorials_format() {
        assert_eq!(seed_prompt("Hi", ""), "Human: Hi\n\nAssistant: ");
        assert_eq!(seed_prompt("Sum", "1 2"), "Human: Sum\n1 2\n\nAssistant: ");
        let turns = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Bye"),
        ];
        assert_eq!(
            seed_conversation(&turns),
            "Be brief.\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: "
        );
    }
}
