//! The paged KV block manager: which KV blocks are free, who holds each one, and which full
//! blocks can be shared through the prefix cache.
//!
//! A block is either *held* (`ref_count > 0`, in the block table of that many sequences) or
//! *free*. Free blocks live in one of two places:
//!
//! ```text
//!   free_uncached: stack of blocks with no cached content     -> allocated first
//!   lru:           free blocks that still hold a cached, hashed full block,
//!                  least recently freed at the head            -> evicted (head first) only
//!                                                                 when no uncached block is left
//! ```
//!
//! Prefix caching: each full, computed block may be *registered* under a hash chained from its
//! parent block's hash, `hash(parent_hash, tokens of block)`. A lookup walks a prompt's block
//! hashes from the start and stops at the first miss. Hashes are keyed SipHash-1-3 (std's
//! `RandomState`): prompts are client-controlled, and an unkeyed hash such as FNV would let a
//! client craft collisions that squat on a popular prefix's cache entry. Hash quality only ever
//! matters for the hit rate, never for correctness, because every hit is verified exactly:
//! the block's stored tokens must equal the prompt's, and its recorded parent must be the very
//! block (same id *and* same allocation generation) that the walk matched one step before. By
//! induction the whole prefix is then identical, so a collision can never return wrong KV.
//!
//! Complexity (n = number of blocks): `allocate`, `release`, `acquire`, `register`: O(1)
//! (amortised hash-map work). `lookup`: O(block_size) for the token comparison.
//! `check_invariants`: O(n), for tests and debug builds only.
//!
//! Invariants (checked by [`BlockManager::check_invariants`]):
//! - every block is in exactly one of {held, free_uncached, lru}; held + free == total;
//! - a held block has `ref_count > 0`, a free block `ref_count == 0`;
//! - a block is in the LRU iff it is free and registered; the LRU links are consistent;
//! - `cache[h] == b` iff block `b` is registered with hash `h`;
//! - a block with `ref_count > 1` is registered (only full, computed blocks are shared, so a
//!   shared block is never written again: shared prefix blocks are read-only).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use crate::{BlockId, FastMap, TokenId};

/// Chained hash of one full block (its tokens and all tokens before it).
pub(crate) type BlockHash = u64;

/// A block at one point in its life: the generation changes every time the block is
/// reallocated, so a stale link can never match the block's new content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockLink {
    id: BlockId,
    generation: u32,
}

impl BlockLink {
    /// One number per block and generation: the key under which the window pool caches the
    /// window block computed with this block (`crate::window`). Unique, so no collision can
    /// happen there, unlike the hashed keys of this pool.
    pub(crate) fn key(self) -> u64 {
        (u64::from(self.id.0) << 32) | u64::from(self.generation)
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Bumped on every allocation; see [`BlockLink`].
    generation: u32,
    /// `Some` iff the block is registered in the prefix cache.
    hash: Option<BlockHash>,
    /// The registered block holding the previous block of the same prefix (None for a first
    /// block). Only meaningful while `hash` is `Some`.
    parent: Option<BlockLink>,
    in_lru: bool,
    lru_prev: Option<BlockId>,
    lru_next: Option<BlockId>,
}

/// Fixed-size KV blocks with reference counts and a prefix cache. Read access is public (for
/// stats and tests); only the [`crate::Scheduler`] changes it.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: u32,
    blocks: Vec<BlockMeta>,
    /// `num_blocks * block_size` tokens: the tokens of each registered block, to verify hits.
    tokens: Vec<TokenId>,
    free_uncached: Vec<BlockId>,
    lru_head: Option<BlockId>,
    lru_tail: Option<BlockId>,
    lru_len: u32,
    cache: FastMap<BlockHash, BlockId>,
    hash_state: RandomState,
}

impl BlockManager {
    /// A manager of `num_blocks` free blocks of `block_size` tokens. The caller validated the
    /// sizes ([`crate::SchedulerConfig::validate`]).
    pub(crate) fn new(num_blocks: u32, block_size: u32) -> Self {
        assert!(num_blocks > 0 && block_size > 0);
        let capacity = (num_blocks as usize) * (block_size as usize);
        // Reverse so that block 0 is allocated first: block tables in tests read naturally.
        let free_uncached = (0..num_blocks).rev().map(BlockId).collect();
        Self {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks as usize],
            tokens: vec![0; capacity],
            free_uncached,
            lru_head: None,
            lru_tail: None,
            lru_len: 0,
            cache: FastMap::default(),
            hash_state: RandomState::new(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// All blocks, held or free.
    pub fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks that can be allocated now (uncached plus evictable cached ones).
    pub fn num_free(&self) -> u32 {
        self.free_uncached.len() as u32 + self.lru_len
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> u32 {
        self.num_blocks() - self.num_free()
    }

    /// Free blocks that still hold a cached prefix block.
    pub fn num_cached_free(&self) -> u32 {
        self.lru_len
    }

    /// Number of sequences holding `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block.0 as usize].ref_count
    }

    /// The tokens of a registered (prefix-cached) block, `None` if it is not registered.
    pub fn cached_tokens(&self, block: BlockId) -> Option<&[TokenId]> {
        self.blocks[block.0 as usize].hash?;
        Some(self.block_tokens(block))
    }

    fn block_tokens(&self, block: BlockId) -> &[TokenId] {
        let start = block.0 as usize * self.block_size as usize;
        &self.tokens[start..start + self.block_size as usize]
    }

    /// The chained hash of one full block.
    pub(crate) fn hash_block(&self, parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size as usize);
        let mut h = self.hash_state.build_hasher();
        match parent {
            Some(p) => {
                h.write_u8(1);
                h.write_u64(p);
            }
            None => h.write_u8(0),
        }
        for &t in tokens {
            h.write_u32(t);
        }
        h.finish()
    }

    /// The link to `block` as it is now.
    pub(crate) fn link(&self, block: BlockId) -> BlockLink {
        BlockLink {
            id: block,
            generation: self.blocks[block.0 as usize].generation,
        }
    }

    /// Takes a free block (uncached first, else evicts the least recently freed cached one)
    /// and gives it `ref_count == 1`. `None` when no block is free.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free_uncached.pop() {
            Some(id) => id,
            None => {
                let id = self.lru_head?;
                self.lru_remove(id);
                self.unregister(id);
                id
            }
        };
        let meta = &mut self.blocks[id.0 as usize];
        assert_eq!(meta.ref_count, 0, "allocated a held block {id:?}");
        assert!(meta.hash.is_none() && !meta.in_lru);
        meta.ref_count = 1;
        meta.generation = meta.generation.wrapping_add(1);
        Some(id)
    }

    /// Drops one reference. The last one frees the block: to the LRU if it is registered (its
    /// content stays reusable until the block is reallocated), else to the uncached stack.
    pub(crate) fn release(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id.0 as usize];
        assert!(meta.ref_count > 0, "released a free block {id:?}");
        meta.ref_count -= 1;
        if meta.ref_count == 0 {
            if meta.hash.is_some() {
                self.lru_push_back(id);
            } else {
                self.free_uncached.push(id);
            }
        }
    }

    /// Adds one reference to a registered block found by [`Self::lookup`], taking it out of
    /// the LRU if it was free.
    pub(crate) fn acquire(&mut self, id: BlockId) {
        let meta = &self.blocks[id.0 as usize];
        assert!(meta.hash.is_some(), "acquired an unregistered block {id:?}");
        if meta.ref_count == 0 {
            self.lru_remove(id);
        }
        self.blocks[id.0 as usize].ref_count += 1;
    }

    /// The registered block holding exactly `tokens` after the prefix ending in `parent`
    /// (`None` for the first block), if any. `hash` is the chained hash of that block.
    pub(crate) fn lookup(
        &self,
        hash: BlockHash,
        tokens: &[TokenId],
        parent: Option<BlockLink>,
    ) -> Option<BlockId> {
        let &id = self.cache.get(&hash)?;
        let meta = &self.blocks[id.0 as usize];
        debug_assert_eq!(meta.hash, Some(hash));
        (meta.parent == parent && self.block_tokens(id) == tokens).then_some(id)
    }

    /// Registers the held, full, computed block `id` (whose prefix ends in the registered block
    /// `parent`) under `hash`, and returns the link later blocks of the same prefix must name as
    /// their parent: `id` itself, or the block already registered with identical content (then
    /// `id` stays unregistered and is simply freed later; it is a duplicate).
    pub(crate) fn register(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        tokens: &[TokenId],
        parent: Option<BlockLink>,
    ) -> BlockLink {
        assert_eq!(tokens.len(), self.block_size as usize);
        let meta = &self.blocks[id.0 as usize];
        assert!(meta.ref_count > 0, "registered a free block {id:?}");
        if meta.hash.is_some() {
            // A prefix hit: already registered, it is its own canonical block.
            return self.link(id);
        }
        if let Some(existing) = self.lookup(hash, tokens, parent) {
            return self.link(existing);
        }
        if self.cache.contains_key(&hash) {
            // A genuine 64-bit collision (or a stale parent): keep the existing entry. Later
            // blocks of this prefix name `id` as parent; they stay unreachable, which costs hit
            // rate, never correctness.
            return self.link(id);
        }
        let start = id.0 as usize * self.block_size as usize;
        self.tokens[start..start + tokens.len()].copy_from_slice(tokens);
        let meta = &mut self.blocks[id.0 as usize];
        meta.hash = Some(hash);
        meta.parent = parent;
        self.cache.insert(hash, id);
        self.link(id)
    }

    fn unregister(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id.0 as usize];
        if let Some(h) = meta.hash.take() {
            meta.parent = None;
            let removed = self.cache.remove(&h);
            assert_eq!(removed, Some(id));
        }
    }

    fn lru_push_back(&mut self, id: BlockId) {
        let old_tail = self.lru_tail;
        {
            let meta = &mut self.blocks[id.0 as usize];
            assert!(!meta.in_lru);
            meta.in_lru = true;
            meta.lru_prev = old_tail;
            meta.lru_next = None;
        }
        match old_tail {
            Some(t) => self.blocks[t.0 as usize].lru_next = Some(id),
            None => self.lru_head = Some(id),
        }
        self.lru_tail = Some(id);
        self.lru_len += 1;
    }

    fn lru_remove(&mut self, id: BlockId) {
        let (prev, next) = {
            let meta = &mut self.blocks[id.0 as usize];
            assert!(meta.in_lru);
            meta.in_lru = false;
            (meta.lru_prev.take(), meta.lru_next.take())
        };
        match prev {
            Some(p) => self.blocks[p.0 as usize].lru_next = next,
            None => self.lru_head = next,
        }
        match next {
            Some(n) => self.blocks[n.0 as usize].lru_prev = prev,
            None => self.lru_tail = prev,
        }
        self.lru_len -= 1;
    }

    /// Panics if any invariant listed in the module docs is broken. O(num_blocks).
    pub fn check_invariants(&self) {
        let n = self.blocks.len();
        let mut seen_free = vec![false; n];
        for &id in &self.free_uncached {
            let meta = &self.blocks[id.0 as usize];
            assert!(!seen_free[id.0 as usize], "{id:?} twice in the free stack");
            seen_free[id.0 as usize] = true;
            assert_eq!(meta.ref_count, 0, "{id:?} free but held");
            assert!(
                meta.hash.is_none() && !meta.in_lru,
                "{id:?} free-uncached but cached"
            );
        }
        let mut count = 0u32;
        let mut prev = None;
        let mut cur = self.lru_head;
        while let Some(id) = cur {
            assert!(count < self.lru_len, "LRU longer than its length");
            let meta = &self.blocks[id.0 as usize];
            assert!(
                !seen_free[id.0 as usize],
                "{id:?} both in LRU and free stack"
            );
            seen_free[id.0 as usize] = true;
            assert!(meta.in_lru && meta.ref_count == 0 && meta.hash.is_some());
            assert_eq!(meta.lru_prev, prev);
            prev = cur;
            cur = meta.lru_next;
            count += 1;
        }
        assert_eq!(count, self.lru_len);
        assert_eq!(self.lru_tail, prev);
        for (i, meta) in self.blocks.iter().enumerate() {
            let held = meta.ref_count > 0;
            assert_eq!(
                held, !seen_free[i],
                "block {i}: held {held} but free listing disagrees"
            );
            assert_eq!(
                meta.in_lru,
                !held && meta.hash.is_some(),
                "block {i}: LRU membership"
            );
            if meta.ref_count > 1 {
                assert!(meta.hash.is_some(), "block {i} shared but not registered");
            }
            if let Some(h) = meta.hash {
                assert_eq!(
                    self.cache.get(&h),
                    Some(&BlockId(i as u32)),
                    "block {i} hash entry"
                );
            }
        }
        for (&h, &id) in &self.cache {
            assert_eq!(
                self.blocks[id.0 as usize].hash,
                Some(h),
                "stale cache entry {id:?}"
            );
        }
        let free = seen_free.iter().filter(|&&f| f).count() as u32;
        assert_eq!(free, self.num_free());
        assert_eq!(self.num_used() + self.num_free(), self.num_blocks());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(bm: &BlockManager, parent: Option<BlockHash>, base: u32) -> (BlockHash, Vec<TokenId>) {
        let toks: Vec<TokenId> = (base..base + bm.block_size()).collect();
        (bm.hash_block(parent, &toks), toks)
    }

    #[test]
    fn allocate_until_empty_then_release_all() {
        let mut bm = BlockManager::new(4, 2);
        let ids: Vec<_> = (0..4).map(|_| bm.allocate().expect("free block")).collect();
        assert_eq!(ids, vec![BlockId(0), BlockId(1), BlockId(2), BlockId(3)]);
        assert_eq!(bm.allocate(), None);
        assert_eq!(bm.num_free(), 0);
        bm.check_invariants();
        for id in ids {
            bm.release(id);
        }
        assert_eq!(bm.num_free(), 4);
        bm.check_invariants();
    }

    #[test]
    #[should_panic(expected = "released a free block")]
    fn double_release_panics() {
        let mut bm = BlockManager::new(2, 2);
        let b = bm.allocate().expect("free block");
        bm.release(b);
        bm.release(b);
    }

    #[test]
    fn registered_block_is_found_shared_and_kept_after_free() {
        let mut bm = BlockManager::new(3, 4);
        let b = bm.allocate().expect("free block");
        let (h, toks) = full(&bm, None, 10);
        assert_eq!(bm.register(b, h, &toks, None), bm.link(b));
        assert_eq!(bm.lookup(h, &toks, None), Some(b));
        bm.acquire(b);
        assert_eq!(bm.ref_count(b), 2);
        bm.release(b);
        bm.release(b);
        // Free but cached: still found, counted free, and revived by acquire.
        assert_eq!(bm.num_free(), 3);
        assert_eq!(bm.num_cached_free(), 1);
        assert_eq!(bm.lookup(h, &toks, None), Some(b));
        bm.acquire(b);
        assert_eq!(bm.num_cached_free(), 0);
        assert_eq!(bm.cached_tokens(b), Some(&toks[..]));
        bm.check_invariants();
    }

    #[test]
    fn cached_blocks_are_evicted_only_when_nothing_uncached_is_left_lru_first() {
        let mut bm = BlockManager::new(3, 1);
        let a = bm.allocate().expect("free");
        let b = bm.allocate().expect("free");
        let (ha, ta) = full(&bm, None, 1);
        let (hb, tb) = full(&bm, None, 2);
        bm.register(a, ha, &ta, None);
        bm.register(b, hb, &tb, None);
        bm.release(a); // LRU: a
        bm.release(b); // LRU: a, b
        let c = bm.allocate().expect("uncached block 2");
        assert_eq!(c, BlockId(2));
        assert!(bm.lookup(ha, &ta, None).is_some() && bm.lookup(hb, &tb, None).is_some());
        let d = bm.allocate().expect("evicts a");
        assert_eq!(d, a);
        assert_eq!(bm.lookup(ha, &ta, None), None);
        assert_eq!(bm.lookup(hb, &tb, None), Some(b));
        assert_eq!(bm.cached_tokens(a), None);
        bm.check_invariants();
    }

    #[test]
    fn lookup_verifies_tokens_and_parent_not_just_the_hash() {
        let mut bm = BlockManager::new(4, 2);
        let p = bm.allocate().expect("free");
        let (hp, tp) = full(&bm, None, 0);
        let lp = bm.register(p, hp, &tp, None);
        let c = bm.allocate().expect("free");
        let (hc, tc) = full(&bm, Some(hp), 5);
        bm.register(c, hc, &tc, Some(lp));
        assert_eq!(bm.lookup(hc, &tc, Some(lp)), Some(c));
        // Same hash, other tokens: a forged collision must miss.
        assert_eq!(bm.lookup(hc, &[99, 98], Some(lp)), None);
        // Right tokens, wrong parent: miss.
        assert_eq!(bm.lookup(hc, &tc, None), None);
        // The parent is evicted and its id reused: the child's link is stale and must miss.
        bm.release(p);
        bm.release(c);
        let x = bm.allocate().expect("free");
        let y = bm.allocate().expect("free");
        let z = bm.allocate().expect("evicts p, the least recently freed");
        assert_eq!(z, p);
        assert_ne!(bm.link(z), lp);
        assert_eq!(bm.lookup(hc, &tc, Some(bm.link(z))), None);
        for id in [x, y, z] {
            bm.release(id);
        }
        bm.check_invariants();
    }

    #[test]
    fn registering_a_duplicate_returns_the_existing_block() {
        let mut bm = BlockManager::new(2, 2);
        let a = bm.allocate().expect("free");
        let b = bm.allocate().expect("free");
        let (h, t) = full(&bm, None, 3);
        assert_eq!(bm.register(a, h, &t, None), bm.link(a));
        assert_eq!(bm.register(b, h, &t, None), bm.link(a));
        assert_eq!(bm.cached_tokens(b), None);
        bm.release(b);
        assert_eq!(
            bm.num_cached_free(),
            0,
            "an unregistered duplicate frees uncached"
        );
        bm.check_invariants();
    }

    #[test]
    fn chained_hashes_depend_on_the_parent() {
        let bm = BlockManager::new(1, 2);
        let h1 = bm.hash_block(None, &[1, 2]);
        let h2 = bm.hash_block(Some(h1), &[1, 2]);
        let h3 = bm.hash_block(Some(h2), &[1, 2]);
        assert_ne!(h1, h2);
        assert_ne!(h2, h3);
        assert_eq!(h2, bm.hash_block(Some(h1), &[1, 2]));
    }
}
