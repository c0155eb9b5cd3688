//! Streaming detokenization: one generated id in, the newly final text out.
//!
//! Decoding ids one at a time and concatenating goes wrong two ways: a character split over
//! several byte tokens (`<0xE2><0x82><0xAC>`, or byte-level pieces of an emoji) decodes to
//! U+FFFD halves, and decoders that drop a leading space (SentencePiece's `▁`) eat the space
//! of every token. So we use the offsets trick of text-generation-inference and vLLM:
//!
//! ```text
//!   ids:  ... | prefix_offset ........ read_offset ........ len |
//!                 \__ decoded already emitted __/\__ pending __/
//!   new text = decode(ids[prefix_offset..]) minus decode(ids[prefix_offset..read_offset])
//! ```
//!
//! Decoding a few tokens of context before the new ones gives the decoder the same left
//! context it had for the full text, and the difference is emitted only when it does not end
//! in an incomplete character (U+FFFD), so multi-byte characters are held back until whole.

use std::sync::Arc;

use super::{Result, Tokenizer};

/// Longest run of pending ids held back for an incomplete character. A UTF-8 character is
/// at most 4 bytes, so more pending ids than this means the text really holds U+FFFD.
const PENDING_IDS_MAX: usize = 8;

/// Context ids kept before the pending ones (as in vLLM).
const CONTEXT_IDS: usize = 5;

/// Turns generated ids into text deltas, UTF-8 safe. One per sequence.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder for text that follows `context` (e.g. the prompt's ids; only the last few
    /// matter). With `skip_special_tokens`, control tokens produce no text.
    pub fn new(tokenizer: Arc<Tokenizer>, context: &[u32], skip_special_tokens: bool) -> Self {
        let mut ids: Vec<u32> = context
            .iter()
            .rev()
            .copied()
            .filter(|&id| !(skip_special_tokens && tokenizer.is_special(id)))
            .take(CONTEXT_IDS)
            .collect();
        ids.reverse();
        let read_offset = ids.len();
        Self {
            tokenizer,
            skip_special_tokens,
            ids,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Adds one generated id and returns the text that became final (often empty while a
    /// multi-byte character is incomplete).
    pub fn push(&mut self, token: u32) -> Result<String> {
        // Checked here so a bad id fails on its own push, not on a later one.
        self.tokenizer.check_ids(&[token])?;
        if self.skip_special_tokens && self.tokenizer.is_special(token) {
            return Ok(String::new());
        }
        self.ids.push(token);
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let full_text = self.decode(self.prefix_offset, self.ids.len())?;
        let pending_ids = self.ids.len() - self.read_offset;
        let incomplete = full_text.ends_with(char::REPLACEMENT_CHARACTER);
        if full_text.len() <= prefix_text.len() || (incomplete && pending_ids < PENDING_IDS_MAX) {
            return Ok(String::new());
        }
        let delta = text_after(&full_text, &prefix_text);
        self.advance();
        Ok(delta)
    }

    /// Returns whatever is still held back (an incomplete character comes out as U+FFFD).
    /// Call once when the sequence ends.
    pub fn flush(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let full_text = self.decode(self.prefix_offset, self.ids.len())?;
        let delta = text_after(&full_text, &prefix_text);
        self.advance();
        Ok(delta)
    }

    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Only ids from prefix_offset on are ever decoded again.
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }

    fn decode(&self, start: usize, end: usize) -> Result<String> {
        self.tokenizer
            .decode(&self.ids[start..end], self.skip_special_tokens)
    }
}

/// `full` without its leading `prefix`. Decoders are left-to-right, so `prefix` is normally
/// a prefix of `full`; if a decoder rewrote it, fall back to cutting by length at a
/// character boundary.
fn text_after(full: &str, prefix: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let mut cut = prefix.len().min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    full[cut..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::text_after;

    #[test]
    fn text_after_strips_prefix_or_cuts_at_boundary() {
        assert_eq!(text_after("hello world", "hello"), " world");
        assert_eq!(text_after("héllo", "hX"), "éllo");
        assert_eq!(text_after("ab", "abc"), "");
    }
}
