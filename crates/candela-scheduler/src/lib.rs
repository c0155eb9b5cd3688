//! candela-scheduler decides, every engine step, which sequences run and how many tokens each
//! computes, over a paged KV cache with prefix caching.
//!
//! **Architecture Invariant:** this crate is pure Rust with no candle, no tokio and no I/O; its
//! only dependency is `thiserror`. It never touches device memory: [`Scheduler::schedule`]
//! returns plain data ([`ScheduledBatch`]) that the engine turns into tensors.
//!
//! **API Boundary:** the engine owns one [`Scheduler`] and drives it from its single thread:
//!
//! ```text
//! loop {
//!     add(..) / add_group(..) / abort(..)   for commands that arrived since the last step
//!     let batch = schedule();               who runs, how many tokens, which KV slots
//!     run the model on exactly batch.all_input_ids() at batch.slot_mapping()
//!     update_after_step(&outputs);          one StepOutput per ScheduledSeq with sample == true
//! }
//! ```
//!
//! One token-accounting rule covers prefill, chunked prefill, prefix-cache hits, decode and
//! resumption after preemption (the vLLM v1 model): a sequence has `tokens` (prompt +
//! generated) and `num_computed_tokens`, and each step computes
//! `num_new = min(len(tokens) - num_computed, remaining token budget)`. "Is prefill" is derived
//! (`num_computed < prompt_len`), never stored.
//!
//! Parallel sampling (`n > 1`) uses [`Scheduler::add_group`]: the first sequence of the group
//! leads, the others wait until the leader's prompt is computed and then take refcounted shares
//! of its full prompt blocks through the prefix cache, recomputing only the last partial block
//! (at least one token, so they have logits of their own). This needs no copy-on-write and no
//! special case in the block manager; the cost is one extra step and at most `block_size`
//! recomputed tokens per sibling.
#![deny(missing_docs)]

pub mod block_manager;
pub mod scheduler;
pub mod sequence;
pub mod window;

pub use block_manager::BlockManager;
pub use scheduler::{ScheduledBatch, ScheduledSeq, Scheduler, SchedulerStats, StepOutput};
pub use sequence::{SeqStatus, Sequence};
pub use window::WindowConfig;

/// A hash map for keys that are not chosen by clients (engine-assigned [`SeqId`]s, block
/// hashes that are already keyed SipHash outputs), hashed with one multiply (FxHash's) instead
/// of SipHash: lookups are on the per-step path, several per running sequence.
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<MulHasher>>;

/// See [`FastMap`]. Sequential ids stay distinct in the low bits (odd multiplier) and spread
/// in the high bits, which is what `HashMap` uses.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MulHasher(u64);

impl std::hash::Hasher for MulHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// Caller-assigned id of one sequence (one choice of one request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Index of one KV block in the paged cache, in `0..num_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// In which order waiting sequences are admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// First come, first served (preempted sequences go back to the front).
    #[default]
    Fcfs,
    /// Higher `priority` first; equal priorities first come, first served.
    Priority,
}

/// Limits and layout of the scheduler. All limits are checked by [`SchedulerConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once (and scheduled in one step).
    pub max_num_seqs: u32,
    /// Most tokens computed in one step, summed over the batch.
    pub max_num_batched_tokens: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks in the cache.
    pub num_blocks: u32,
    /// Admission order of waiting sequences.
    pub policy: Policy,
    /// Share full blocks of identical prefixes between sequences.
    pub enable_prefix_caching: bool,
    /// Sliding-window layers whose KV lives in a pool of its own, released as it falls out of
    /// the window ([`window`]); `None` when every layer keeps the whole context here.
    pub window: Option<WindowConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: 1024,
            policy: Policy::Fcfs,
            enable_prefix_caching: true,
            window: None,
        }
    }
}

impl SchedulerConfig {
    /// Largest supported block size; larger blocks waste cache on short sequences and no
    /// attention kernel we target wants them.
    pub const BLOCK_SIZE_MAX: u32 = 1024;

    /// Checks every limit; [`Scheduler::new`] calls it.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.max_num_seqs == 0 {
            return invalid("max_num_seqs", "must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return invalid("max_num_batched_tokens", "must be at least 1".into());
        }
        if self.block_size == 0 || self.block_size > Self::BLOCK_SIZE_MAX {
            return invalid(
                "block_size",
                format!(
                    "must be in 1..={}, got {}",
                    Self::BLOCK_SIZE_MAX,
                    self.block_size
                ),
            );
        }
        if self.num_blocks == 0 {
            return invalid("num_blocks", "must be at least 1".into());
        }
        // Slots (block * block_size + offset) and token positions are u32.
        if u64::from(self.num_blocks) * u64::from(self.block_size) > u64::from(u32::MAX) {
            return invalid(
                "num_blocks",
                format!(
                    "num_blocks * block_size must fit in u32, got {} * {}",
                    self.num_blocks, self.block_size
                ),
            );
        }
        if let Some(w) = &self.window {
            if w.window == 0 {
                return invalid("window.window", "must be at least 1".into());
            }
            let min =
                WindowConfig::blocks_min(w.window, self.block_size, self.max_num_batched_tokens);
            if u64::from(w.num_blocks) < min {
                return invalid(
                    "window.num_blocks",
                    format!(
                        "must be at least {min} for a window of {} tokens (got {})",
                        w.window, w.num_blocks
                    ),
                );
            }
            if u64::from(w.num_blocks) * u64::from(self.block_size) > u64::from(u32::MAX) {
                return invalid(
                    "window.num_blocks",
                    "times block_size must fit in u32".into(),
                );
            }
        }
        Ok(())
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> u64 {
        u64::from(self.num_blocks) * u64::from(self.block_size)
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A [`SchedulerConfig`] field is out of range.
    #[error("invalid scheduler config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `add` with an id that is already queued or running.
    #[error("sequence {0:?} already exists")]
    DuplicateSeqId(SeqId),
    /// `add_group` with no ids.
    #[error("a sequence group needs at least one sequence id")]
    EmptyGroup,
    /// `add` with an empty prompt: there would be no logits to sample from.
    #[error("the prompt of sequence {0:?} is empty")]
    EmptyPrompt(SeqId),
    /// `add` with `max_tokens == 0`: nothing to generate.
    #[error("max_tokens of sequence {0:?} is 0")]
    ZeroMaxTokens(SeqId),
    /// The sequence can never fit in the KV cache, even alone.
    #[error(
        "sequence {seq_id:?} needs {tokens_needed} KV cache tokens but the whole cache holds \
         {tokens_capacity}"
    )]
    NeverFits {
        /// The rejected sequence.
        seq_id: SeqId,
        /// Prompt plus the most tokens it may generate.
        tokens_needed: u64,
        /// `num_blocks * block_size`.
        tokens_capacity: u64,
    },
    /// `update_after_step` without a preceding `schedule`.
    #[error("update_after_step called with no step in flight")]
    NoStepInFlight,
    /// A [`StepOutput`] for a sequence that was not sampled in the last step.
    #[error("sequence {0:?} was not sampled in the last step")]
    NotSampled(SeqId),
    /// Two [`StepOutput`]s for one sequence.
    #[error("two outputs for sequence {0:?}")]
    DuplicateOutput(SeqId),
    /// A sampled sequence got no [`StepOutput`].
    #[error("sequence {0:?} was sampled in the last step but got no output")]
    MissingOutput(SeqId),
    /// A [`StepOutput`] that accepts more drafts than its sequence's step verified.
    #[error("output for sequence {0:?} accepts more drafts than were scheduled")]
    AcceptedPastDrafts(SeqId),
    /// A [`StepOutput`] that neither finishes the sequence nor carries a token.
    #[error("output for sequence {0:?} has no token and does not finish it")]
    MissingToken(SeqId),
}
