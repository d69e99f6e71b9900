//! Generated tokens to text, piece by piece, with stop strings.
//!
//! Each new token re-decodes the whole output (tokenizers merge pieces, and a character may
//! span tokens), then only text that can no longer change is released: nothing that ends in an
//! incomplete character (`U+FFFD`), nothing that could be the start of a stop string. A stop
//! string ends the output before it.

use peft_models::Tokenizer;

/// The text of one generation so far.
#[derive(Debug)]
pub struct TextStream {
    ids: Vec<u32>,
    stops: Vec<String>,
    /// Bytes of the decoded text already released.
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
        let text = tokenizer.decode(&self.ids)?;
        if let Some(at) = self.first_stop(&text) {
            self.stopped = true;
            return Ok(self.release(&text, at));
        }
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe = text.trim_end_matches('\u{FFFD}').len();
        }
        safe -= self.held_back(&text[..safe]);
        Ok(self.release(&text, safe))
    }

    /// The rest of the text once generation ended.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> peft_core::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = tokenizer.decode(&self.ids)?;
        Ok(self.release(&text, text.len()))
    }

    /// Text from the released point up to byte `end` (on a character boundary).
    fn release(&mut self, text: &str, end: usize) -> String {
        if end <= self.released || !text.is_char_boundary(self.released) {
            return String::new();
        }
        let piece = text[self.released..end].to_string();
        self.released = end;
        piece
    }

    /// The byte where the first stop string starts, searched from a little before the
    /// released point (a stop string may straddle it).
    fn first_stop(&self, text: &str) -> Option<usize> {
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
}
