//! The model's `tokenizer.json`, through Hugging Face's `tokenizers` crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chat::ChatTemplate;

use peft_core::{PeftError, Result};

/// A Hugging Face fast tokenizer with errors that name its file, and the model folder's chat
/// template when `tokenizer_config.json` has one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<Arc<ChatTemplate>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` from a model folder (or the file itself), and the folder's chat
    /// template (`tokenizer_config.json`'s `chat_template`) if there is one.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = if dir.is_dir() {
            dir.join("tokenizer.json")
        } else {
            dir.to_path_buf()
        };
        if !path.is_file() {
            return Err(PeftError::Tokenizer {
                path,
                reason: "file not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| PeftError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let chat_template = if dir.is_dir() {
            ChatTemplate::from_dir(dir)?.map(Arc::new)
        } else {
            None
        };
        Ok(Self {
            inner,
            path,
            chat_template,
        })
    }

    /// The chat template of the model folder, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text` without the post-processor's special tokens (for text that already
    /// holds them, such as a rendered chat template: `add_special_tokens=False`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (as `tokenizer(text).input_ids` in Python).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// The ids of a conversation's prompt: the model's chat template with its generation
    /// prompt (its special tokens written by the template), or, for a model without one, the
    /// seed tutorial's turns ([`crate::chat::seed_conversation`]) with the tokenizer's own
    /// special tokens.
    pub fn encode_chat(&self, messages: &[crate::chat::Message]) -> Result<Vec<u32>> {
        match self.chat_template() {
            Some(template) => self.encode_plain(&template.render(messages, true)?),
            None => self.encode(&crate::chat::seed_conversation(messages)),
        }
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| PeftError::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Id of a token string such as `</s>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
