//! Speculative decoding without a draft model: n-gram prompt lookup (vLLM's `ngram` method,
//! llama.cpp's lookup decoding). A decoding sequence's last n tokens are looked up earlier in
//! its own tokens (prompt and output); the tokens that followed the most recent match are the
//! drafts. The engine verifies every sequence's drafts in the step's one forward pass (the
//! scheduler feeds the last token plus the drafts, with logits at each of those rows) and keeps
//! the longest prefix the sampler agrees with, plus one token sampled after it.
//!
//! Copying workloads (summaries, edits of a given text or code, repeated structure) accept many
//! drafts; chat mostly finds none or has them rejected. A rejected draft costs a row of the
//! forward pass, so [`Acceptance`] switches proposing off for a while for a sequence whose
//! recent acceptance is low.

use crate::api::TokenId;
use crate::error::EngineError;

/// How drafts are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// N-gram lookup in the sequence's own tokens.
    Ngram,
}

/// Speculative decoding settings (`--speculative ngram --num-speculative-tokens K
/// --ngram-max N --ngram-min M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// How drafts are proposed.
    pub method: SpeculativeMethod,
    /// Most draft tokens per sequence and step (K), in `1..=TOKENS_MAX`.
    pub num_speculative_tokens: u32,
    /// Shortest n-gram looked up, at least 1.
    pub ngram_min: u32,
    /// Longest n-gram looked up (tried first), in `ngram_min..=NGRAM_MAX`.
    pub ngram_max: u32,
}

impl Default for SpeculativeConfig {
    /// K = 8, n-grams of 4 down to 2 tokens: a single recurring token proposes too often in
    /// chat, where most such drafts are rejected. K = 8 rather than 4: with the draft length
    /// following the accepted runs ([`Acceptance`]), long copies gain (1.94x against 1.71x
    /// over plain decoding on the copy-heavy set, SmolLM2) and chat does not lose.
    fn default() -> Self {
        Self {
            method: SpeculativeMethod::Ngram,
            num_speculative_tokens: 8,
            ngram_min: 2,
            ngram_max: 4,
        }
    }
}

impl SpeculativeConfig {
    /// Most draft tokens per step: beyond it a rejected draft wastes more than acceptance
    /// can win back on the workloads n-gram lookup helps.
    pub const TOKENS_MAX: u32 = 16;
    /// Longest n-gram: a longer key rarely matches and costs more to look up.
    pub const NGRAM_MAX: u32 = 64;

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |message: String| Err(EngineError::Config(message));
        if !(1..=Self::TOKENS_MAX).contains(&self.num_speculative_tokens) {
            return bad(format!(
                "num_speculative_tokens must be in 1..={}, got {}",
                Self::TOKENS_MAX,
                self.num_speculative_tokens
            ));
        }
        if self.ngram_min == 0 || self.ngram_min > self.ngram_max {
            return bad(format!(
                "ngram_min must be in 1..=ngram_max, got {} (ngram_max {})",
                self.ngram_min, self.ngram_max
            ));
        }
        if self.ngram_max > Self::NGRAM_MAX {
            return bad(format!(
                "ngram_max must be at most {}, got {}",
                Self::NGRAM_MAX,
                self.ngram_max
            ));
        }
        Ok(())
    }
}

/// Tokens looked back over for a match: bounds the per-step cost of a long context with no
/// match (the scan is O(tokens * n)).
const LOOKBACK_TOKENS_MAX: usize = 8192;

/// Fills `out` with up to `k` drafts for `tokens`: for n from `ngram_max` down to `ngram_min`,
/// the most recent earlier occurrence of the last n tokens, and the tokens after it. Empty when
/// no n-gram recurs.
pub fn propose_ngram(
    tokens: &[TokenId],
    ngram_min: usize,
    ngram_max: usize,
    k: usize,
    out: &mut Vec<TokenId>,
) {
    out.clear();
    let len = tokens.len();
    if k == 0 || ngram_min == 0 {
        return;
    }
    let floor = len.saturating_sub(LOOKBACK_TOKENS_MAX);
    for n in (ngram_min..=ngram_max.min(len.saturating_sub(1))).rev() {
        let key = &tokens[len - n..];
        // Occurrences starting at i < len - n, most recent first; the one at len - n is the
        // key itself.
        let found = (floor..len - n)
            .rev()
            .find(|&i| tokens[i] == key[0] && &tokens[i..i + n] == key);
        if let Some(i) = found {
            let start = i + n;
            out.extend_from_slice(&tokens[start..(start + k).min(len)]);
            return;
        }
    }
}

/// Per-sequence acceptance: the draft length, and the back-off over a window of drafts.
///
/// Length: a verification row costs about as much as a step's share of a one-row step's
/// matmul work, so drafts past the first rejected one are paid for and wasted. After a
/// rejection the next draft is one token longer than the run just accepted; after a fully
/// accepted draft the length doubles (up to K), so a sequence that copies a long passage
/// soon drafts K tokens a step, and one that copies in short bursts drafts short.
///
/// Back-off: when fewer than [`Self::RATE_MIN`] of a window's draft tokens were accepted, the
/// sequence proposes nothing for a number of steps that doubles with each bad window in a row.
#[derive(Debug, Clone)]
pub struct Acceptance {
    drafted: u32,
    accepted: u32,
    /// Steps left without proposing.
    backoff_left: u32,
    /// The next back-off's length.
    backoff_next: u32,
    /// The most drafts to propose next (K caps it); `u32::MAX` until the first rejection.
    len: u32,
}

impl Default for Acceptance {
    fn default() -> Self {
        Self {
            drafted: 0,
            accepted: 0,
            backoff_left: 0,
            backoff_next: Self::BACKOFF_MIN_STEPS,
            len: u32::MAX,
        }
    }
}

impl Acceptance {
    /// Draft tokens per judged window.
    pub const WINDOW_TOKENS: u32 = 32;
    /// Below this accepted fraction of a window, back off.
    pub const RATE_MIN: f64 = 0.3;
    /// The first back-off, in steps.
    pub const BACKOFF_MIN_STEPS: u32 = 16;
    /// The longest back-off, in steps.
    pub const BACKOFF_MAX_STEPS: u32 = 256;

    /// Whether to propose this step (counts a backed-off step down).
    pub fn may_propose(&mut self) -> bool {
        if self.backoff_left > 0 {
            self.backoff_left -= 1;
            return false;
        }
        true
    }

    /// How many drafts to propose this step, at most `k`.
    pub fn draft_len(&self, k: u32) -> u32 {
        self.len.min(k)
    }

    /// Records one step's verification: `drafted` tokens, of which `accepted` were accepted.
    pub fn record(&mut self, drafted: u32, accepted: u32) {
        self.len = if accepted >= drafted {
            // `max`: a lookup cut short by the end of the tokens does not shorten the next.
            self.len.max(drafted.saturating_mul(2))
        } else {
            accepted + 1
        };
        self.drafted += drafted;
        self.accepted += accepted;
        if self.drafted < Self::WINDOW_TOKENS {
            return;
        }
        if f64::from(self.accepted) < Self::RATE_MIN * f64::from(self.drafted) {
            self.backoff_left = self.backoff_next;
            self.backoff_next = (self.backoff_next * 2).min(Self::BACKOFF_MAX_STEPS);
        } else {
            self.backoff_next = Self::BACKOFF_MIN_STEPS;
        }
        self.drafted = 0;
        self.accepted = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(tokens: &[TokenId], min: usize, max: usize, k: usize) -> Vec<TokenId> {
        let mut out = vec![99];
        propose_ngram(tokens, min, max, k, &mut out);
        out
    }

    #[test]
    fn proposes_what_followed_the_most_recent_match() {
        // "1 2 3" occurs twice before the tail "2 3": the later occurrence (at 4) wins.
        let tokens = [1, 2, 3, 7, 1, 2, 3, 8, 9, 2, 3];
        assert_eq!(propose(&tokens, 1, 3, 2), [8, 9]);
        // K longer than what follows: cut at the end of the tokens.
        assert_eq!(propose(&tokens, 1, 3, 10), [8, 9, 2, 3]);
        // The longest n-gram is tried first: "9 2 3" never recurred, "2 3" did.
        let tokens = [5, 2, 3, 4, 6, 2, 3, 1, 9, 2, 3];
        assert_eq!(propose(&tokens, 2, 3, 1), [1]);
        // A longer match beats a more recent shorter one.
        let tokens = [1, 2, 3, 4, 5, 9, 3, 6, 1, 2, 3];
        assert_eq!(propose(&tokens, 1, 3, 2), [4, 5]);
        assert_eq!(propose(&tokens, 1, 1, 2), [6, 1]);
    }

    #[test]
    fn proposes_nothing_without_a_match() {
        assert!(propose(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(propose(&[], 1, 3, 4).is_empty());
        assert!(propose(&[7], 1, 3, 4).is_empty());
        // ngram_min 2: a single recurring token is not enough.
        assert!(propose(&[5, 1, 6, 1], 2, 3, 4).is_empty());
        assert_eq!(propose(&[5, 1, 6, 1], 1, 3, 4), [6, 1]);
        assert!(propose(&[1, 1, 1], 1, 3, 0).is_empty());
        // A run of one token proposes more of it.
        assert_eq!(propose(&[4, 4, 4, 4], 1, 2, 3), [4]);
    }

    #[test]
    fn backs_off_on_low_acceptance_and_recovers() {
        let mut a = Acceptance::default();
        assert!(a.may_propose());
        for _ in 0..8 {
            a.record(4, 0);
        }
        // A whole window rejected: 16 steps without proposing.
        for _ in 0..Acceptance::BACKOFF_MIN_STEPS {
            assert!(!a.may_propose());
        }
        assert!(a.may_propose());
        for _ in 0..8 {
            a.record(4, 1);
        }
        // Still below 0.3: twice as long.
        for _ in 0..2 * Acceptance::BACKOFF_MIN_STEPS {
            assert!(!a.may_propose());
        }
        assert!(a.may_propose());
        for _ in 0..8 {
            a.record(4, 3);
        }
        assert!(a.may_propose(), "a good window does not back off");
    }

    #[test]
    fn draft_length_follows_the_accepted_runs() {
        let mut a = Acceptance::default();
        assert_eq!(a.draft_len(8), 8, "K until a rejection");
        a.record(8, 8);
        assert_eq!(a.draft_len(8), 8);
        a.record(8, 2);
        assert_eq!(a.draft_len(8), 3, "one past the accepted run");
        a.record(3, 0);
        assert_eq!(a.draft_len(8), 1);
        a.record(1, 1);
        assert_eq!(a.draft_len(8), 2, "doubles on a fully accepted draft");
        a.record(2, 2);
        a.record(4, 4);
        assert_eq!(a.draft_len(8), 8);
        a.record(8, 8);
        assert_eq!(a.draft_len(8), 8, "capped at K");
        a.record(2, 2);
        assert_eq!(a.draft_len(8), 8, "a short lookup does not shorten it");
    }

    #[test]
    fn config_ranges() {
        let ok = SpeculativeConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            SpeculativeConfig {
                num_speculative_tokens: 0,
                ..ok
            },
            SpeculativeConfig {
                num_speculative_tokens: 17,
                ..ok
            },
            SpeculativeConfig { ngram_min: 0, ..ok },
            SpeculativeConfig {
                ngram_min: 5,
                ngram_max: 4,
                ..ok
            },
            SpeculativeConfig {
                ngram_max: 65,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
