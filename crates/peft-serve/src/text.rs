//! Generated tokens to text, piece by piece, with stop strings.
//!
//! Decoding is incremental, as in vLLM and TGI: each new token decodes a short window of the
//! latest tokens (a prefix already turned into text, then the tokens not yet turned), and the
//! text the window adds beyond its prefix is appended — so a 2,000-token answer costs 2,000
//! short decodes instead of 2,000 decodes of the whole answer. The window's prefix absorbs what
//! a decoder does to the first token of its input (SentencePiece drops a leading space); a
//! prefix that decodes to nothing (a skipped special token) is widened until it does not, and a
//! window whose text does not extend its prefix falls back to decoding everything, so the text
//! is the whole output's decode. Only text that can no longer change is released: nothing that
//! ends in an incomplete character (`U+FFFD`), nothing that could be the start of a stop
//! string. A stop string ends the output before it; only the unreleased tail is scanned.

use peft_models::Tokenizer;

/// The text of one generation so far.
#[derive(Debug)]
pub struct TextStream {
    ids: Vec<u32>,
    stops: Vec<String>,
    /// The decoded text of `ids[..read]`.
    text: String,
    /// Where the decode window starts.
    prefix: usize,
    /// The first token not yet in `text`.
    read: usize,
    /// The decode of `ids[prefix..read]`: the part of the window already in `text`.
    prefix_text: String,
    /// Bytes of `text` already released.
    released: usize,
    /// Set once a stop string was met.
    stopped: bool,
}

impl TextStream {
    /// A stream ending at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            ids: Vec::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            prefix: 0,
            read: 0,
            prefix_text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// Whether a stop string ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token; the text it releases (maybe empty). After a stop string, nothing more.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> peft_core::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(token);
        self.decode_window(tokenizer, false)?;
        if let Some(at) = self.first_stop() {
            self.stopped = true;
            return Ok(self.release(at));
        }
        let mut safe = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            safe = self.text.trim_end_matches('\u{FFFD}').len();
        }
        safe -= self.held_back(&self.text[..safe]);
        Ok(self.release(safe))
    }

    /// The rest of the text once generation ended.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> peft_core::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.decode_window(tokenizer, true)?;
        if let Some(at) = self.first_stop() {
            self.stopped = true;
            return Ok(self.release(at));
        }
        Ok(self.release(self.text.len()))
    }

    /// Turns the tokens after `read` into text where they make whole characters (or always,
    /// when `flush`), advancing the window.
    fn decode_window(&mut self, tokenizer: &Tokenizer, flush: bool) -> peft_core::Result<()> {
        if self.read == self.ids.len() {
            return Ok(());
        }
        let window = tokenizer.decode(&self.ids[self.prefix..])?;
        if !window.starts_with(&self.prefix_text) {
            // The decoder joined the window differently from its prefix alone: decode it all.
            let full = tokenizer.decode(&self.ids)?;
            if flush || !full.ends_with('\u{FFFD}') {
                if full.starts_with(&self.text) {
                    self.text = full;
                } else {
                    // Text already released can't be taken back; no decoder in the tests or
                    // the fuzz target's runs gets here.
                    tracing::warn!("the decoded text changed behind the stream; appending");
                    let common = common_prefix(&window, &self.prefix_text);
                    self.text.push_str(&window[common..]);
                }
                self.advance(tokenizer)?;
            }
            return Ok(());
        }
        if window.len() > self.prefix_text.len() && (flush || !window.ends_with('\u{FFFD}')) {
            self.text.push_str(&window[self.prefix_text.len()..]);
            self.advance(tokenizer)?;
        }
        Ok(())
    }

    /// Moves the window past the tokens just turned into text: they become its prefix.
    fn advance(&mut self, tokenizer: &Tokenizer) -> peft_core::Result<()> {
        self.prefix = self.read;
        self.read = self.ids.len();
        self.prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        // A prefix that decodes to nothing would let the decoder treat the next token as the
        // first of its input (a SentencePiece space dropped): widen it until it says something.
        while self.prefix_text.is_empty() && self.prefix > 0 {
            self.prefix -= 1;
            self.prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        }
        Ok(())
    }

    /// Text from the released point up to byte `end` (on a character boundary).
    fn release(&mut self, end: usize) -> String {
        if end <= self.released || !self.text.is_char_boundary(self.released) {
            return String::new();
        }
        let piece = self.text[self.released..end].to_string();
        self.released = end;
        piece
    }

    /// The byte where the first stop string starts, searched from a little before the
    /// released point (a stop string may straddle it).
    fn first_stop(&self) -> Option<usize> {
        let text = &self.text;
        self.stops
            .iter()
            .filter_map(|stop| {
                let mut from = self.released.saturating_sub(stop.len());
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                text[from..].find(stop.as_str()).map(|i| from + i)
            })
            .min()
    }

    /// Bytes at the end of `text` that could begin a stop string.
    fn held_back(&self, text: &str) -> usize {
        self.stops
            .iter()
            .map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n) && text.len() >= n)
                    .find(|&n| {
                        text.is_char_boundary(text.len() - n) && text[text.len() - n..] == stop[..n]
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
            .min(text.len().saturating_sub(self.released))
    }
}

/// Bytes that `a` and `b` share at their start, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/llama-tiny"
        ))
        .unwrap()
    }

    /// Streams `ids` through a stream with `stops`: every piece released, then the rest.
    fn stream(tok: &Tokenizer, ids: &[u32], stops: &[&str]) -> (Vec<String>, String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let pieces: Vec<String> = ids.iter().map(|&t| s.push(tok, t).unwrap()).collect();
        let rest = s.finish(tok).unwrap();
        (pieces, rest, s.stopped())
    }

    #[test]
    fn pieces_join_to_the_text_and_stop_strings_cut_it() {
        let tok = tokenizer();
        let ids = tok.encode_plain("hello world, how are you").unwrap();
        let full = tok.decode(&ids).unwrap();
        let (pieces, rest, stopped) = stream(&tok, &ids, &[]);
        assert_eq!(pieces.concat() + &rest, full);
        assert!(!stopped);
        // A stop string spanning tokens: the text before it, nothing after.
        for stop in ["ow ar", "how", ","] {
            let (pieces, rest, stopped) = stream(&tok, &ids, &[stop, "never"]);
            assert!(stopped, "{stop}");
            assert_eq!(rest, "");
            assert_eq!(pieces.concat(), full[..full.find(stop).unwrap()], "{stop}");
        }
        // A stop string that never completes: held back while it might, released at the end.
        let (pieces, rest, stopped) = stream(&tok, &ids, &["you!"]);
        assert!(!stopped);
        assert!(!pieces.concat().ends_with("you"), "{pieces:?}");
        assert_eq!(pieces.concat() + &rest, full);
        // Empty stop strings are ignored.
        let (_, _, stopped) = stream(&tok, &ids, &[""]);
        assert!(!stopped);
    }

    /// The invariant over many random outputs of four tokenizers (SentencePiece with byte
    /// fallback, byte-level BPE, with special tokens mixed in): the pieces and the rest joined
    /// are the whole output's decode, cut at the first stop string.
    #[test]
    fn pieces_equal_the_whole_decode_for_random_outputs() {
        let models = [
            "llama-tiny",
            "bloom-tiny",
            "gemma2-tiny",
            "qwen2-tiny",
            "phi3-tiny",
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n.max(1)
        };
        for name in models {
            let dir = format!(
                "{}/../../tests/fixtures/models/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            let tok = Tokenizer::from_dir(dir).unwrap();
            let vocab = tok.vocab_size() as u64;
            for case in 0..300 {
                // Mostly ordinary tokens, some from the top of the vocabulary (special/added).
                let len = 1 + next(60) as usize;
                let ids: Vec<u32> = (0..len)
                    .map(|_| match next(10) {
                        0 => (vocab - 1 - next(8).min(vocab - 1)) as u32,
                        _ => next(vocab) as u32,
                    })
                    .collect();
                let full = tok.decode(&ids).unwrap();
                let mut stops = Vec::new();
                if case % 2 == 0 && !full.is_empty() {
                    let chars: Vec<char> = full.chars().collect();
                    let at = next(chars.len() as u64) as usize;
                    let n = 1 + next(3) as usize;
                    stops.push(
                        chars[at..(at + n).min(chars.len())]
                            .iter()
                            .collect::<String>(),
                    );
                }
                let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
                let (pieces, rest, _) = stream(&tok, &ids, &stop_refs);
                let cut = stops
                    .iter()
                    .filter_map(|s| full.find(s.as_str()))
                    .min()
                    .unwrap_or(full.len());
                assert_eq!(
                    pieces.concat() + &rest,
                    full[..cut],
                    "{name}: ids {ids:?}, stops {stops:?}"
                );
            }
        }
    }
}
