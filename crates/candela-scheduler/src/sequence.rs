//! One sequence (one choice of one request): its tokens, how many of them have KV computed,
//! and the blocks that hold that KV.
//!
//! ```text
//!   tokens:         | prompt ............................ | generated ..... |
//!                   0                               prompt_len          num_tokens
//!   computed:       |<------- num_computed_tokens ------->|  next step computes
//!                                                            min(num_tokens - num_computed,
//!                                                                budget) tokens
//!   block_table:    | b0 | b1 | b2 | ... one block per block_size tokens computed (or about
//!                                        to be computed this step)
//! ```
//!
//! The scheduler owns sequences; callers read them through [`crate::Scheduler::sequence`].

use std::ops::Range;

use crate::block_manager::{BlockHash, BlockLink, BlockManager};
use crate::{BlockId, SeqId, TokenId};

/// Where a sequence is in its life. Finished sequences are removed from the scheduler, so
/// they have no state here; the engine holds the finish reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued, holding no blocks: never admitted, preempted, or a sibling waiting for its
    /// group leader's prompt.
    Waiting,
    /// Admitted: holds blocks for its computed tokens and is scheduled every step the budgets
    /// allow.
    Running,
}

/// Key of a waiting sequence in the scheduler's ordered waiting queue: smallest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WaitKey {
    /// 0 under FCFS; `-priority` under the priority policy.
    pub(crate) rank: i64,
    /// Arrival order for new sequences; negative and decreasing for sequences put back at the
    /// front (preempted ones), so the last one put back comes first.
    pub(crate) order: i64,
}

/// One sequence. See the module docs for the token layout.
#[derive(Debug, Clone)]
pub struct Sequence {
    id: SeqId,
    tokens: Vec<TokenId>,
    prompt_len: u32,
    max_tokens: u32,
    priority: i32,
    arrival: u64,
    pub(crate) num_computed_tokens: u32,
    pub(crate) block_table: Vec<BlockId>,
    /// With a window pool: the windowed layers' blocks, one per `block_table` entry, the
    /// first `window_released` of them [`crate::window::RELEASED`]. Empty without one.
    pub(crate) window_table: Vec<BlockId>,
    pub(crate) window_released: u32,
    pub(crate) status: SeqStatus,
    /// Prompt tokens served from the prefix cache at the latest admission.
    pub(crate) num_cached_tokens: u32,
    pub(crate) num_preemptions: u32,
    /// Chained hash of every full block of `tokens` (only with prefix caching on).
    pub(crate) block_hashes: Vec<BlockHash>,
    /// Blocks of `block_table` already offered to the prefix cache.
    pub(crate) num_registered_blocks: u32,
    /// The canonical registered block of the last registered block (the parent of the next).
    pub(crate) last_registered: Option<BlockLink>,
    /// Waiting in the queue under this key (None while running or held behind a leader).
    pub(crate) wait_key: Option<WaitKey>,
    /// The group leader this sibling waits for.
    pub(crate) leader: Option<SeqId>,
    /// Siblings waiting for this sequence's prompt.
    pub(crate) followers: Vec<SeqId>,
    /// May start from blocks in the prefix cache (false: always computes its whole prompt).
    pub(crate) prefix_hits: bool,
    /// Speculative tokens proposed for the next step ([`crate::Scheduler::set_draft_tokens`]);
    /// while a step is in flight, the ones it verifies. Never part of `tokens` until accepted.
    pub(crate) draft_tokens: Vec<TokenId>,
}

impl Sequence {
    pub(crate) fn new(
        id: SeqId,
        prompt: Vec<TokenId>,
        max_tokens: u32,
        priority: i32,
        arrival: u64,
    ) -> Self {
        let prompt_len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        Self {
            id,
            tokens: prompt,
            prompt_len,
            max_tokens,
            priority,
            arrival,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            window_table: Vec::new(),
            window_released: 0,
            status: SeqStatus::Waiting,
            num_cached_tokens: 0,
            num_preemptions: 0,
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            last_registered: None,
            wait_key: None,
            leader: None,
            followers: Vec::new(),
            prefix_hits: true,
            draft_tokens: Vec::new(),
        }
    }

    /// The sequence's id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Prompt followed by generated tokens.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// `tokens()[range]` for a positions range from a [`crate::ScheduledSeq`].
    pub fn tokens_in(&self, positions: Range<u32>) -> &[TokenId] {
        &self.tokens[positions.start as usize..positions.end as usize]
    }

    /// The prompt.
    pub fn prompt_tokens(&self) -> &[TokenId] {
        &self.tokens[..self.prompt_len as usize]
    }

    /// The generated tokens so far.
    pub fn output_tokens(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len as usize..]
    }

    /// Length of the prompt.
    pub fn prompt_len(&self) -> u32 {
        self.prompt_len
    }

    /// Prompt plus generated tokens.
    pub fn num_tokens(&self) -> u32 {
        self.tokens.len() as u32
    }

    /// Tokens generated so far.
    pub fn num_output_tokens(&self) -> u32 {
        self.num_tokens() - self.prompt_len
    }

    /// Tokens whose KV is computed (or scheduled in the step in flight).
    pub fn num_computed_tokens(&self) -> u32 {
        self.num_computed_tokens
    }

    /// True while prompt tokens remain to be computed.
    pub fn is_prefill(&self) -> bool {
        self.num_computed_tokens < self.prompt_len
    }

    /// Most tokens this sequence may generate (given at `add`).
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// Higher runs first under [`crate::Policy::Priority`] and is preempted last.
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// Arrival order: smaller arrived earlier.
    pub fn arrival(&self) -> u64 {
        self.arrival
    }

    /// Blocks holding this sequence's KV, in token order.
    pub fn block_table(&self) -> &[BlockId] {
        &self.block_table
    }

    /// The windowed layers' blocks (with a window pool; empty otherwise), in token order;
    /// blocks out of every later query's window are [`crate::window::RELEASED`].
    pub fn window_table(&self) -> &[BlockId] {
        &self.window_table
    }

    /// Waiting or running.
    pub fn status(&self) -> SeqStatus {
        self.status
    }

    /// Tokens served from the prefix cache at the latest admission (for usage reporting, read
    /// it on the sequence's first scheduled step).
    pub fn num_cached_tokens(&self) -> u32 {
        self.num_cached_tokens
    }

    /// Whether admission may serve the prompt's head from the prefix cache (see
    /// [`crate::Scheduler::add_without_prefix_hits`]).
    pub fn prefix_hits(&self) -> bool {
        self.prefix_hits
    }

    /// How many times this sequence was preempted.
    pub fn num_preemptions(&self) -> u32 {
        self.num_preemptions
    }

    /// Appends a generated token; with prefix caching (`bm` given) hashes a completed block.
    pub(crate) fn push_token(&mut self, token: TokenId, bm: Option<&BlockManager>) {
        self.tokens.push(token);
        if let Some(bm) = bm {
            self.extend_hashes(bm);
        }
    }

    /// Hashes every full block of `tokens` not hashed yet.
    pub(crate) fn extend_hashes(&mut self, bm: &BlockManager) {
        let bs = bm.block_size() as usize;
        let full = self.tokens.len() / bs;
        while self.block_hashes.len() < full {
            let i = self.block_hashes.len();
            let parent = self.block_hashes.last().copied();
            let h = bm.hash_block(parent, &self.tokens[i * bs..(i + 1) * bs]);
            self.block_hashes.push(h);
        }
    }
}
