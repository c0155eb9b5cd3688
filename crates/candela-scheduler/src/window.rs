//! The KV blocks of sliding-window layers, in a pool of their own (the hybrid KV cache: vLLM's
//! hybrid KV cache manager, llama.cpp's SWA cache).
//!
//! A windowed layer's query at position `p` sees keys `p - window + 1 ..= p`. Once a sequence
//! has computed `c` tokens, every later query is at a position `>= c`, so its leading
//! [`releasable`]`(c)` blocks are never read again by its windowed layers and go back to this
//! pool, while the global layers keep the whole context in the main pool. The two tables of a
//! sequence have the same length and index the same token positions:
//!
//! ```text
//!   positions       0      16     32     48     64     80    (block size 16, window 40, c = 70)
//!   block_table     | g0   | g1   | g2   | g3   | g4   |      global layers: all of it
//!   window_table    | --   | --   | w2   | w3   | w4   |      --: released ([`RELEASED`])
//!                                  ^ 70 + 1 - 40 = 31: keys from 31 on are still visible
//! ```
//!
//! **Sizing.** A running sequence that computed `c` tokens and computes `n` more this step
//! holds at most `ceil((n + window - 1) / block_size) + 1` window blocks (those from
//! `floor((c + 1 - window) / block_size)` up to `ceil((c + n) / block_size)`). Admission and
//! preemption count the free blocks of both pools, so a pool of at least
//! [`WindowConfig::blocks_min`] (one sequence with a whole step's budget) always makes
//! progress, and one of [`WindowConfig::blocks_never_short`] (every running sequence at its
//! worst at once, llama.cpp's SWA cache size) never preempts anything.
//!
//! **Prefix caching.** A prefix hit of `k` blocks needs the windowed layers' KV of the hit's
//! last window, blocks `releasable(k * block_size) .. k`. Window blocks are registered under
//! the *link* (id and generation) of the canonical global block computed with them, not under
//! a hash: a global block at one generation holds exactly one prefix (the main pool verifies
//! it token by token), so the window block found under its link holds KV of that same prefix.
//! Admission shortens a hit to the longest prefix whose last window is still cached here.
//! Released window blocks stay cached (in this pool's LRU) until reallocated, as in the main
//! pool.
//!
//! **Preemption** frees both tables, like any removal; the sequence recomputes from its
//! longest usable prefix hit.

use crate::block_manager::{BlockLink, BlockManager};
use crate::{BlockId, TokenId};

/// Marks a released entry of a window table. Kernels never read it (the window excludes it),
/// and it indexes no block, so a kernel that did would fail loudly instead of reading stale KV.
pub const RELEASED: BlockId = BlockId(u32::MAX);

/// The windowed layers' own pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// A windowed layer's query at position `p` sees keys `p - window + 1 ..= p`.
    pub window: u32,
    /// Blocks in the pool: at least [`Self::blocks_min`] (checked by
    /// [`crate::SchedulerConfig::validate`]).
    pub num_blocks: u32,
}

impl WindowConfig {
    /// Fewest blocks that let one sequence alone run with a whole step's budget.
    pub fn blocks_min(window: u32, block_size: u32, max_num_batched_tokens: u32) -> u64 {
        Self::blocks_never_short(window, block_size, 1, max_num_batched_tokens)
    }

    /// Blocks with which the pool is never the reason for a preemption (see the module docs).
    pub fn blocks_never_short(
        window: u32,
        block_size: u32,
        max_num_seqs: u32,
        max_num_batched_tokens: u32,
    ) -> u64 {
        let seqs = u64::from(max_num_seqs);
        let tokens = u64::from(max_num_batched_tokens) + seqs * u64::from(window.saturating_sub(1));
        tokens.div_ceil(u64::from(block_size.max(1))) + 2 * seqs
    }
}

/// Leading blocks of a sequence with `computed` tokens that no later query of a windowed layer
/// sees: block `j` ends at position `(j + 1) * block_size - 1 < computed + 1 - window`.
pub fn releasable(computed: u32, window: u32, block_size: u32) -> u32 {
    (computed + 1).saturating_sub(window) / block_size
}

/// The pool: a [`BlockManager`] whose cache is keyed by global block links.
#[derive(Debug, Clone)]
pub(crate) struct WindowPool {
    pub(crate) window: u32,
    pub(crate) bm: BlockManager,
}

impl WindowPool {
    pub(crate) fn new(cfg: WindowConfig, block_size: u32) -> Self {
        Self {
            window: cfg.window,
            bm: BlockManager::new(cfg.num_blocks, block_size),
        }
    }

    /// A fresh block; the caller counted the free ones.
    pub(crate) fn allocate(&mut self) -> BlockId {
        self.bm.allocate().expect("free window blocks were counted")
    }

    /// Blocks that can be allocated now.
    pub(crate) fn num_free(&self) -> u32 {
        self.bm.num_free()
    }

    /// Leading blocks of a sequence with `computed` tokens that can be released.
    pub(crate) fn releasable(&self, computed: u32) -> u32 {
        releasable(computed, self.window, self.bm.block_size())
    }

    /// Releases `table[released..upto]` and returns the new count of released entries.
    pub(crate) fn release_prefix(
        &mut self,
        table: &mut [BlockId],
        released: u32,
        upto: u32,
    ) -> u32 {
        // Last first, as `free_blocks` does, so the LRU evicts a window's tail before its head.
        for j in (released..upto).rev() {
            let block = std::mem::replace(&mut table[j as usize], RELEASED);
            self.bm.release(block);
        }
        released.max(upto)
    }

    /// Releases every held entry of `table` and empties it.
    pub(crate) fn release_all(&mut self, table: &mut Vec<BlockId>) {
        for block in table.drain(..).rev() {
            if block != RELEASED {
                self.bm.release(block);
            }
        }
    }

    /// Offers the held window block `block`, computed with the canonical global block `global`
    /// (holding `tokens`), to the cache.
    pub(crate) fn register(&mut self, block: BlockId, global: BlockLink, tokens: &[TokenId]) {
        self.bm.register(block, global.key(), tokens, None);
    }

    /// The cached window block computed with the global block `global`, if still cached.
    pub(crate) fn lookup(&self, global: BlockLink, tokens: &[TokenId]) -> Option<BlockId> {
        self.bm.lookup(global.key(), tokens, None)
    }

    /// Takes a share of a block found by [`Self::lookup`].
    pub(crate) fn acquire(&mut self, block: BlockId) {
        self.bm.acquire(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releasable_blocks_are_exactly_those_no_later_query_sees() {
        let (bs, window) = (16, 40);
        for computed in 0..200u32 {
            let r = releasable(computed, window, bs);
            // The earliest key any query at a position >= computed sees.
            let first_visible = (computed + 1).saturating_sub(window);
            assert!(
                r * bs <= first_visible,
                "block {r} still visible at {computed}"
            );
            assert!(
                (r + 1) * bs > first_visible,
                "block {r} could go at {computed}"
            );
        }
        assert_eq!(releasable(39, 40, 16), 0);
        assert_eq!(releasable(55, 40, 16), 1);
        assert_eq!(releasable(70, 40, 16), 1);
    }

    #[test]
    fn blocks_min_covers_the_worst_case_of_one_sequence() {
        // One sequence, a whole budget of new tokens at the worst offset.
        let (bs, window, budget) = (16u32, 40u32, 64u32);
        let min = WindowConfig::blocks_min(window, bs, budget);
        for start in 0..100u32 {
            let held = (start + budget).div_ceil(bs) - releasable(start, window, bs);
            assert!(u64::from(held) <= min, "start {start}: {held} > {min}");
        }
    }
}
