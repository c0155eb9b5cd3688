//! The per-step scheduling decision: which sequences run, how many tokens each computes, and
//! which KV slots those tokens go to.
//!
//! There are no prefill and decode phases. Each step, every scheduled sequence catches up:
//!
//! ```text
//!   num_new = min(num_tokens - num_computed_tokens, token budget left)
//!
//!   |<--- cached (prefix hit) --->|<-- computed earlier -->|<-- num_new -->|<-- later -->|
//!   0                                                      start           end       num_tokens
//!                                 positions of this step:  start..end
//!   sample = (end == num_tokens): only then are there logits for the next token.
//! ```
//!
//! Order within a step: running sequences first (so decode latency holds), in admission order;
//! then waiting ones, FCFS or by priority, with long prompts chunked to the budget left. When a
//! running sequence needs a block and none is free, the least important running sequence
//! (lowest priority, then least computed work, then latest arrival; possibly the one asking)
//! is preempted by recompute: its blocks are freed and it goes back to the front of the
//! waiting queue with all its tokens, to be recomputed (mostly from the prefix cache) and
//! continue exactly where it stopped. No new sequence is admitted in a step that preempted.
//! A waiting sequence never preempts a running one, whatever its priority: admission waits for
//! free blocks. A sequence that can never fit in the cache is rejected with an error at `add`.
//!
//! Blocks become shareable (registered in the prefix cache) only in `update_after_step`, once
//! the step that computed them has run: a block is never offered to another sequence before its
//! KV is written.
//!
//! Speculative decoding: the engine may propose draft tokens for a decoding sequence
//! ([`Scheduler::set_draft_tokens`]). If the budget and the free blocks allow (drafts never
//! preempt anyone: they are cut to what fits, possibly to none), the step computes the last
//! token and the drafts like a small prefill chunk, with logits at every one of those rows:
//!
//! ```text
//!   tokens:   ... t5 t6 |            num_computed = 6 before the step
//!   computes:       t6 d1 d2 d3      positions 6..10, num_computed = 10 while in flight
//!   engine:   accepts d1 (1 draft), samples the bonus b from row 1 (d1's logits)
//!   rollback: tokens ... t6 d1 b, num_computed = 8 (KV of d2, d3 is garbage past the end),
//!             blocks wholly past position 8 released before registration
//! ```
//!
//! Registration then sees only accepted tokens' KV: the rolled-back end is the end, the
//! garbage slots of the last partial block are rewritten before that block is full, and the
//! blocks released were fresh (never registered).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ops::Range;

use crate::block_manager::BlockManager;
use crate::sequence::{SeqStatus, Sequence, WaitKey};
use crate::window::{WindowPool, RELEASED};
use crate::{BlockId, Error, FastMap, Policy, SchedulerConfig, SeqId, TokenId};

/// What the engine reports for one sampled sequence after running a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutput {
    /// A sequence that had `sample == true` in the last [`ScheduledBatch`].
    pub seq_id: SeqId,
    /// The sampled token, appended to the sequence's tokens. May be `None` only when
    /// `finished` (for example a stop string completed by the previous token).
    pub new_token: Option<TokenId>,
    /// The engine ended this sequence (EOS, stop, length): its blocks are freed at once.
    pub finished: bool,
    /// Of the step's draft tokens ([`ScheduledSeq::num_draft_tokens`]), how many were accepted:
    /// the leading ones, appended before `new_token` (which is then the bonus token sampled
    /// after them). 0 without drafts.
    pub accepted_drafts: u32,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// Which sequence.
    pub seq_id: SeqId,
    /// Positions (token indices) whose KV this step computes: `tokens_computed..+num_new`.
    pub positions: Range<u32>,
    /// Tokens served from the prefix cache when the sequence was (last) admitted.
    pub num_cached_tokens: u32,
    /// This step computes the sequence's last token: sample from its last row's logits, then
    /// report a [`StepOutput`].
    pub sample: bool,
    /// Speculative tokens at the end of this step's tokens (`positions` includes them), each
    /// verified with the logits of the row before it; then `sample` is true and the sequence
    /// has `num_draft_tokens + 1` logit rows, the last `num_draft_tokens + 1` of its chunk.
    pub num_draft_tokens: u32,
    /// Row of the first new token in [`ScheduledBatch::all_input_ids`].
    input_offset: u32,
    /// Its block table within the batch's concatenated tables.
    table: Range<u32>,
}

impl ScheduledSeq {
    /// Tokens computed this step.
    pub fn num_new_tokens(&self) -> u32 {
        self.positions.end - self.positions.start
    }

    /// Tokens of KV this sequence attends to once this step has run (its context length).
    pub fn context_len(&self) -> u32 {
        self.positions.end
    }

    /// Row of this sequence's first new token in the flattened batch.
    pub fn input_offset(&self) -> u32 {
        self.input_offset
    }

    /// First row of the flattened batch whose logits are sampled, if this sequence is sampled
    /// (the only one without drafts).
    pub fn sample_row(&self) -> Option<u32> {
        self.sample
            .then(|| self.input_offset + self.num_new_tokens() - 1 - self.num_draft_tokens)
    }

    /// Rows of logits this sequence needs: 0 unless sampled, else one per draft plus one.
    pub fn num_logit_rows(&self) -> u32 {
        if self.sample {
            self.num_draft_tokens + 1
        } else {
            0
        }
    }
}

/// The plan for one step. Plain data: the engine turns it into tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledBatch {
    /// Sequences that compute tokens this step, in the order of their tokens in
    /// [`Self::all_input_ids`].
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted this step (blocks freed, back in the waiting queue with their
    /// tokens kept). Nothing to do for the engine but count them.
    pub preempted: Vec<SeqId>,
    /// Sequences finished with an error this step (already removed from the scheduler, blocks
    /// freed): the engine reports the error to the client.
    pub failed: Vec<(SeqId, Error)>,
    block_size: u32,
    block_ids: Vec<BlockId>,
    /// With a window pool: every sequence's window table, at the same ranges as `block_ids`.
    window_block_ids: Option<Vec<BlockId>>,
    input_ids: Vec<TokenId>,
}

impl ScheduledBatch {
    /// No sequence computes anything this step.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens computed this step over all sequences.
    pub fn tokens_total(&self) -> u32 {
        self.input_ids.len() as u32
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The whole block table of `seq` (covering `0..seq.context_len()`).
    pub fn block_table(&self, seq: &ScheduledSeq) -> &[BlockId] {
        &self.block_ids[seq.table.start as usize..seq.table.end as usize]
    }

    /// With a window pool, the windowed layers' block table of `seq`: as long as
    /// [`Self::block_table`], released entries [`RELEASED`] (never read by the windowed
    /// layers).
    pub fn window_block_table(&self, seq: &ScheduledSeq) -> Option<&[BlockId]> {
        let ids = self.window_block_ids.as_ref()?;
        Some(&ids[seq.table.start as usize..seq.table.end as usize])
    }

    /// The token ids `seq` computes this step (`tokens[positions]`).
    pub fn input_ids(&self, seq: &ScheduledSeq) -> &[TokenId] {
        let start = seq.input_offset as usize;
        &self.input_ids[start..start + seq.num_new_tokens() as usize]
    }

    /// All tokens computed this step, sequence after sequence, no padding.
    pub fn all_input_ids(&self) -> &[TokenId] {
        &self.input_ids
    }

    /// KV cache slot of position `pos` of `seq`:
    /// `block_table[pos / block_size] * block_size + pos % block_size`.
    pub fn slot(&self, seq: &ScheduledSeq, pos: u32) -> u32 {
        let table = self.block_table(seq);
        let block = table[(pos / self.block_size) as usize];
        block.0 * self.block_size + pos % self.block_size
    }

    /// With a window pool, the windowed layers' KV slot of position `pos` of `seq` (a position
    /// this step computes or attends to).
    pub fn window_slot(&self, seq: &ScheduledSeq, pos: u32) -> Option<u32> {
        let block = self.window_block_table(seq)?[(pos / self.block_size) as usize];
        debug_assert_ne!(block, RELEASED, "position {pos} is out of every window");
        Some(block.0 * self.block_size + pos % self.block_size)
    }

    /// Slots of the tokens `seq` computes this step, in order.
    pub fn slots<'a>(&'a self, seq: &'a ScheduledSeq) -> impl Iterator<Item = u32> + 'a {
        seq.positions.clone().map(move |pos| self.slot(seq, pos))
    }

    /// Slot of every token of [`Self::all_input_ids`], in the same order.
    pub fn slot_mapping(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.input_ids.len());
        for seq in &self.seqs {
            out.extend(self.slots(seq));
        }
        out
    }

    /// Position of every token of [`Self::all_input_ids`], in the same order.
    pub fn all_positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.input_ids.len());
        for seq in &self.seqs {
            out.extend(seq.positions.clone());
        }
        out
    }
}

/// Counters for metrics, read after each `schedule()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStats {
    /// Sequences holding blocks.
    pub num_running: u32,
    /// Sequences queued (including siblings waiting for their group leader).
    pub num_waiting: u32,
    /// Blocks held by sequences.
    pub blocks_used: u32,
    /// All blocks.
    pub blocks_total: u32,
    /// Free blocks that still hold reusable cached prefix blocks.
    pub blocks_cached_free: u32,
    /// Tokens looked up in the prefix cache at admission, since start.
    pub prefix_cache_queries_tokens: u64,
    /// Of those, tokens found in the cache.
    pub prefix_cache_hits_tokens: u64,
    /// Preemptions since start.
    pub preemptions_total: u64,
    /// Preemptions in the last `schedule()`.
    pub preemptions_last_step: u32,
    /// Window-pool blocks held by sequences (0 without a window pool).
    pub window_blocks_used: u32,
    /// Window-pool blocks (0 without a window pool).
    pub window_blocks_total: u32,
}

impl SchedulerStats {
    /// Hits over queries, `None` before the first query.
    pub fn prefix_cache_hit_rate(&self) -> Option<f64> {
        (self.prefix_cache_queries_tokens > 0)
            .then(|| self.prefix_cache_hits_tokens as f64 / self.prefix_cache_queries_tokens as f64)
    }
}

/// A sequence picked in `schedule()` before the batch is assembled (a pick can still be
/// undone by a later preemption in the same step).
#[derive(Debug, Clone, Copy)]
struct Pick {
    seq_id: SeqId,
    start: u32,
    num_new: u32,
    /// Of `num_new`, the trailing draft tokens.
    drafts: u32,
}

/// Continuous batching over the paged KV cache. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    bm: BlockManager,
    /// The windowed layers' own pool (`cfg.window`).
    window: Option<WindowPool>,
    seqs: FastMap<SeqId, Sequence>,
    /// Admission order; served first each step.
    running: Vec<SeqId>,
    waiting: BTreeMap<WaitKey, SeqId>,
    /// Siblings waiting for their group leader's prompt (not in `waiting`).
    num_held: u32,
    next_arrival: u64,
    /// Next `WaitKey::order` for a sequence put back at the front; decreasing.
    next_front: i64,
    /// The last batch, between `schedule()` and `update_after_step()`: (id, sample, drafts).
    in_flight: Option<Vec<(SeqId, bool, u32)>>,
    prefix_cache_queries_tokens: u64,
    prefix_cache_hits_tokens: u64,
    preemptions_total: u64,
    preemptions_last_step: u32,
}

impl Scheduler {
    /// A scheduler with an empty cache of `cfg.num_blocks` blocks.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, Error> {
        cfg.validate()?;
        Ok(Self {
            bm: BlockManager::new(cfg.num_blocks, cfg.block_size),
            window: cfg.window.map(|w| WindowPool::new(w, cfg.block_size)),
            cfg,
            seqs: FastMap::default(),
            running: Vec::new(),
            waiting: BTreeMap::new(),
            num_held: 0,
            next_arrival: 0,
            next_front: -1,
            in_flight: None,
            prefix_cache_queries_tokens: 0,
            prefix_cache_hits_tokens: 0,
            preemptions_total: 0,
            preemptions_last_step: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Read access to the block manager (stats, tests).
    pub fn block_manager(&self) -> &BlockManager {
        &self.bm
    }

    /// Read access to the window pool's blocks, if there is a window pool.
    pub fn window_block_manager(&self) -> Option<&BlockManager> {
        self.window.as_ref().map(|w| &w.bm)
    }

    /// A queued or running sequence.
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Sequences holding blocks.
    pub fn num_running(&self) -> u32 {
        self.running.len() as u32
    }

    /// Sequences queued, including siblings waiting for their leader.
    pub fn num_waiting(&self) -> u32 {
        self.waiting.len() as u32 + self.num_held
    }

    /// True while any sequence is queued or running.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Queues one sequence. `max_tokens` is the most it may still generate (the caller clamped
    /// it to the context length). Fails at once, queueing nothing, if the id exists, the prompt
    /// is empty, `max_tokens == 0`, or prompt + max_tokens can never fit in the whole cache.
    pub fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<TokenId>,
        max_tokens: u32,
        priority: i32,
    ) -> Result<(), Error> {
        self.add_group(&[id], prompt, max_tokens, priority)
    }

    /// Queues `ids.len()` sequences with one prompt (`n` choices of one request). `ids[0]`
    /// leads; the others wait until the leader's prompt is computed, then share its full
    /// prompt blocks through the prefix cache and recompute only the last partial block (with
    /// prefix caching off they simply compute their own prompt after the leader's). If the
    /// leader ends first, the next sibling leads. Same errors as [`Self::add`].
    pub fn add_group(
        &mut self,
        ids: &[SeqId],
        prompt: Vec<TokenId>,
        max_tokens: u32,
        priority: i32,
    ) -> Result<(), Error> {
        self.add_sequences(ids, prompt, max_tokens, priority, true)
    }

    /// Queues one sequence that never starts from the prefix cache: at admission, and again
    /// after a preemption, it computes its whole prompt. A mean-pooled embedding needs the
    /// final hidden state of every prompt position, and a cached block holds only KV. Its own
    /// computed blocks are still offered to the prefix cache for other sequences. Same errors
    /// as [`Self::add`].
    pub fn add_without_prefix_hits(
        &mut self,
        id: SeqId,
        prompt: Vec<TokenId>,
        max_tokens: u32,
        priority: i32,
    ) -> Result<(), Error> {
        self.add_sequences(&[id], prompt, max_tokens, priority, false)
    }

    fn add_sequences(
        &mut self,
        ids: &[SeqId],
        prompt: Vec<TokenId>,
        max_tokens: u32,
        priority: i32,
        prefix_hits: bool,
    ) -> Result<(), Error> {
        let (&leader_id, follower_ids) = ids.split_first().ok_or(Error::EmptyGroup)?;
        for (i, id) in ids.iter().enumerate() {
            if self.seqs.contains_key(id) || ids[..i].contains(id) {
                return Err(Error::DuplicateSeqId(*id));
            }
        }
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt(leader_id));
        }
        if max_tokens == 0 {
            return Err(Error::ZeroMaxTokens(leader_id));
        }
        // The last sampled token's KV is never computed: the sequence ends when it is sampled.
        let tokens_needed = prompt.len() as u64 + u64::from(max_tokens) - 1;
        let tokens_capacity = self.cfg.capacity_tokens();
        if tokens_needed > tokens_capacity {
            return Err(Error::NeverFits {
                seq_id: leader_id,
                tokens_needed,
                tokens_capacity,
            });
        }

        let mut leader = Sequence::new(leader_id, prompt, max_tokens, priority, self.arrival());
        leader.prefix_hits = prefix_hits;
        if self.cfg.enable_prefix_caching {
            leader.extend_hashes(&self.bm);
        }
        for &fid in follower_ids {
            let mut f = Sequence::new(
                fid,
                leader.tokens().to_vec(),
                max_tokens,
                priority,
                self.arrival(),
            );
            f.block_hashes = leader.block_hashes.clone();
            f.leader = Some(leader_id);
            self.seqs.insert(fid, f);
            self.num_held += 1;
        }
        leader.followers = follower_ids.to_vec();
        let key = self.queue_key(&leader);
        self.enqueue(leader, key);
        Ok(())
    }

    /// Removes a sequence now (client gone) and frees its blocks. False if it is unknown
    /// (already finished, failed or aborted).
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.remove(id).is_some()
    }

    /// Proposes `drafts` as speculative tokens after the sequence's last token for the next
    /// [`Self::schedule`] (replacing earlier ones). They are used only if the sequence is
    /// running and decoding (exactly one token to compute), cut to the token budget, to the
    /// blocks free without preempting anyone and to `max_tokens` (the step emits at most
    /// drafts + 1 tokens); the scheduled count is [`ScheduledSeq::num_draft_tokens`]. The
    /// engine reports how many it accepted in [`StepOutput::accepted_drafts`]; the rest never
    /// become part of the sequence. False (nothing stored) if the sequence is unknown or not
    /// running.
    pub fn set_draft_tokens(&mut self, id: SeqId, drafts: &[TokenId]) -> bool {
        match self.seqs.get_mut(&id) {
            Some(seq) if seq.status == SeqStatus::Running && self.in_flight.is_none() => {
                seq.draft_tokens.clear();
                seq.draft_tokens.extend_from_slice(drafts);
                true
            }
            _ => false,
        }
    }

    /// Plans one step. Must be followed by [`Self::update_after_step`] before the next call.
    pub fn schedule(&mut self) -> ScheduledBatch {
        assert!(
            self.in_flight.is_none(),
            "schedule() called again before update_after_step()"
        );
        let bs = self.cfg.block_size;
        let seqs_max = self.cfg.max_num_seqs as usize;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut picks: Vec<Pick> = Vec::with_capacity(self.running.len().min(seqs_max) + 1);
        let mut preempted = Vec::new();
        let mut failed = Vec::new();

        // 1. Running sequences, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 && picks.len() < seqs_max {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let start = seq.num_computed_tokens;
            let drafts = self.drafts_that_fit(seq, budget);
            let num_new = (seq.num_tokens() - start).min(budget) + drafts;
            if drafts == 0 && !seq.draft_tokens.is_empty() {
                self.seqs
                    .get_mut(&id)
                    .expect("running sequences exist")
                    .draft_tokens
                    .clear();
            }
            let seq = &self.seqs[&id];
            if num_new == 0 {
                // Sampled last step and not given a token: nothing to compute.
                i += 1;
                continue;
            }
            let end = start + num_new;
            if end.div_ceil(bs) > self.bm.num_blocks() {
                // It outgrew the whole cache: the engine generated past `max_tokens`.
                let tokens_needed = u64::from(seq.num_tokens());
                self.remove(id);
                let tokens_capacity = self.cfg.capacity_tokens();
                failed.push((
                    id,
                    Error::NeverFits {
                        seq_id: id,
                        tokens_needed,
                        tokens_capacity,
                    },
                ));
                continue;
            }
            let need = end.div_ceil(bs) - seq.block_table.len() as u32;
            let mut self_preempted = false;
            // Each new block of the main pool comes with one of the window pool.
            while self.bm.num_free() < need
                || self.window.as_ref().is_some_and(|w| w.num_free() < need)
            {
                // Terminates: `id` itself is running, so there is always a victim, and with
                // `id` alone running every other block is free.
                let vpos = self.victim_index();
                let victim = self.running[vpos];
                if let Some(p) = picks.iter().position(|p| p.seq_id == victim) {
                    budget += picks[p].num_new;
                    picks.remove(p);
                }
                self.preempt(vpos);
                preempted.push(victim);
                if vpos < i {
                    i -= 1;
                }
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                continue; // running[i] is now the next sequence
            }
            let seq = self.seqs.get_mut(&id).expect("running sequences exist");
            for _ in 0..need {
                let block = self.bm.allocate().expect("free blocks were counted");
                seq.block_table.push(block);
            }
            if let Some(pool) = &mut self.window {
                for _ in 0..need {
                    seq.window_table.push(pool.allocate());
                }
            }
            seq.num_computed_tokens = end;
            seq.draft_tokens.truncate(drafts as usize);
            picks.push(Pick {
                seq_id: id,
                start,
                num_new,
                drafts,
            });
            budget -= num_new;
            i += 1;
        }

        // Drafts of running sequences the budgets did not reach were for this step only.
        for id in &self.running[i.min(self.running.len())..] {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.draft_tokens.clear();
            }
        }

        // 2. Waiting sequences, in queue order, while blocks and budgets last.
        if preempted.is_empty() {
            while budget > 0 && picks.len() < seqs_max && self.running.len() < seqs_max {
                let Some((&key, &id)) = self.waiting.first_key_value() else {
                    break;
                };
                match self.try_admit(id, budget) {
                    Admit::Admitted(pick) => {
                        self.waiting.remove(&key);
                        budget -= pick.num_new;
                        picks.push(pick);
                    }
                    Admit::NoRoom => break,
                    Admit::Failed(err) => {
                        self.remove(id);
                        failed.push((id, err));
                    }
                }
            }
        }

        // 3. The batch, as plain data.
        let tokens_total: u32 = picks.iter().map(|p| p.num_new).sum();
        let mut batch = ScheduledBatch {
            seqs: Vec::with_capacity(picks.len()),
            preempted,
            failed,
            block_size: bs,
            block_ids: Vec::new(),
            window_block_ids: self.window.as_ref().map(|_| Vec::new()),
            input_ids: Vec::with_capacity(tokens_total as usize),
        };
        let mut in_flight = Vec::with_capacity(picks.len());
        for p in &picks {
            let seq = &self.seqs[&p.seq_id];
            let end = p.start + p.num_new;
            debug_assert_eq!(seq.num_computed_tokens, end);
            debug_assert_eq!(seq.block_table.len() as u32, end.div_ceil(bs));
            debug_assert_eq!(seq.draft_tokens.len() as u32, p.drafts);
            let sample = end == seq.num_tokens() + p.drafts;
            let table_start = batch.block_ids.len() as u32;
            batch.block_ids.extend_from_slice(&seq.block_table);
            if let Some(ids) = &mut batch.window_block_ids {
                ids.extend_from_slice(&seq.window_table);
            }
            let input_offset = batch.input_ids.len() as u32;
            batch
                .input_ids
                .extend_from_slice(seq.tokens_in(p.start..end - p.drafts));
            batch.input_ids.extend_from_slice(&seq.draft_tokens);
            batch.seqs.push(ScheduledSeq {
                seq_id: p.seq_id,
                positions: p.start..end,
                num_cached_tokens: seq.num_cached_tokens,
                sample,
                num_draft_tokens: p.drafts,
                input_offset,
                table: table_start..batch.block_ids.len() as u32,
            });
            in_flight.push((p.seq_id, sample, p.drafts));
        }
        self.in_flight = Some(in_flight);
        self.preemptions_last_step = batch.preempted.len() as u32;

        assert!(batch.tokens_total() <= self.cfg.max_num_batched_tokens);
        assert_eq!(
            batch.tokens_total() + budget,
            self.cfg.max_num_batched_tokens
        );
        assert!(batch.seqs.len() <= seqs_max);
        assert!(self.running.len() <= seqs_max);
        #[cfg(debug_assertions)]
        self.check_invariants();
        batch
    }

    /// Applies the step that ran the last [`ScheduledBatch`]: its computed full blocks become
    /// shareable, sampled tokens are appended, finished sequences are removed and their blocks
    /// freed. `outputs` holds exactly one entry per still-existing sequence that had
    /// `sample == true`; outputs for sequences aborted since `schedule()` are ignored. On `Err`
    /// nothing changed and the step stays in flight (fix the outputs and call again).
    ///
    /// If the model step itself failed, [`Self::abort`] every sequence of the batch first (their
    /// KV was not written, so their progress must not count), then call this with `&[]`.
    pub fn update_after_step(&mut self, outputs: &[StepOutput]) -> Result<(), Error> {
        let last = self.in_flight.as_ref().ok_or(Error::NoStepInFlight)?;
        let mut sampled: Vec<SeqId> = last
            .iter()
            .filter(|(id, sample, _)| *sample && self.seqs.contains_key(id))
            .map(|(id, _, _)| *id)
            .collect();
        sampled.sort_unstable();
        let mut reported: Vec<SeqId> = Vec::with_capacity(outputs.len());
        for out in outputs {
            if !self.seqs.contains_key(&out.seq_id) {
                continue;
            }
            if sampled.binary_search(&out.seq_id).is_err() {
                return Err(Error::NotSampled(out.seq_id));
            }
            if out.new_token.is_none() && !out.finished {
                return Err(Error::MissingToken(out.seq_id));
            }
            if out.accepted_drafts > 0 {
                let drafts = last
                    .iter()
                    .find(|(id, _, _)| *id == out.seq_id)
                    .map_or(0, |(_, _, d)| *d);
                if out.accepted_drafts > drafts {
                    return Err(Error::AcceptedPastDrafts(out.seq_id));
                }
            }
            reported.push(out.seq_id);
        }
        reported.sort_unstable();
        if let Some(w) = reported.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::DuplicateOutput(w[0]));
        }
        if reported.len() != sampled.len() {
            let missing = sampled
                .iter()
                .find(|id| reported.binary_search(id).is_err());
            return Err(Error::MissingOutput(
                *missing.expect("fewer reports than samples"),
            ));
        }

        let last = self.in_flight.take().expect("checked above");
        for &(id, _, drafts) in &last {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if drafts > 0 {
                // Before registration: only accepted tokens' KV may become visible.
                let accepted = outputs
                    .iter()
                    .find(|o| o.seq_id == id)
                    .map_or(0, |o| o.accepted_drafts);
                let caching = self.cfg.enable_prefix_caching;
                roll_back_drafts(&mut self.bm, self.window.as_mut(), seq, accepted, caching);
            }
            if self.cfg.enable_prefix_caching {
                register_computed_blocks(&mut self.bm, self.window.as_mut(), seq);
            }
            if let Some(pool) = &mut self.window {
                // Every later query of this sequence is at a position >= num_computed.
                let upto = pool.releasable(seq.num_computed_tokens);
                seq.window_released =
                    pool.release_prefix(&mut seq.window_table, seq.window_released, upto);
            }
            if !seq.followers.is_empty() && !seq.is_prefill() {
                self.release_followers(id);
            }
        }
        for out in outputs {
            let caching = self.cfg.enable_prefix_caching;
            let Some(seq) = self.seqs.get_mut(&out.seq_id) else {
                continue;
            };
            if let Some(token) = out.new_token {
                seq.push_token(token, caching.then_some(&self.bm));
            }
            if out.finished {
                self.remove(out.seq_id);
            }
        }
        #[cfg(debug_assertions)]
        self.check_invariants();
        Ok(())
    }

    /// Counters for metrics.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_running: self.num_running(),
            num_waiting: self.num_waiting(),
            blocks_used: self.bm.num_used(),
            blocks_total: self.bm.num_blocks(),
            blocks_cached_free: self.bm.num_cached_free(),
            prefix_cache_queries_tokens: self.prefix_cache_queries_tokens,
            prefix_cache_hits_tokens: self.prefix_cache_hits_tokens,
            preemptions_total: self.preemptions_total,
            preemptions_last_step: self.preemptions_last_step,
            window_blocks_used: self.window.as_ref().map_or(0, |w| w.bm.num_used()),
            window_blocks_total: self.window.as_ref().map_or(0, |w| w.bm.num_blocks()),
        }
    }

    /// Panics if the scheduler's or the block manager's invariants are broken. O(sequences +
    /// blocks); runs after every `schedule()` and `update_after_step()` in debug builds.
    pub fn check_invariants(&self) {
        self.bm.check_invariants();
        let bs = self.cfg.block_size;
        let mut refs = vec![0u32; self.bm.num_blocks() as usize];
        let (mut running, mut queued, mut held) = (0usize, 0usize, 0u32);
        for (id, seq) in &self.seqs {
            assert_eq!(seq.id(), *id);
            // Drafts are computed, not yet tokens, while their step is in flight.
            assert!(
                seq.num_computed_tokens <= seq.num_tokens() + seq.draft_tokens.len() as u32,
                "{id:?} computed past its end"
            );
            if self.in_flight.is_none() {
                assert!(seq.draft_tokens.is_empty() || seq.status == SeqStatus::Running);
            }
            match seq.status {
                SeqStatus::Running => {
                    running += 1;
                    assert!(seq.wait_key.is_none() && seq.leader.is_none());
                    assert_eq!(
                        seq.block_table.len() as u32,
                        seq.num_computed_tokens.div_ceil(bs)
                    );
                }
                SeqStatus::Waiting => {
                    assert!(seq.block_table.is_empty(), "{id:?} waits holding blocks");
                    assert!(
                        seq.window_table.is_empty(),
                        "{id:?} waits holding window blocks"
                    );
                    assert_eq!(seq.num_computed_tokens, 0);
                    match (seq.wait_key, seq.leader) {
                        (Some(key), None) => {
                            queued += 1;
                            assert_eq!(self.waiting.get(&key), Some(id));
                        }
                        (None, Some(leader)) => {
                            held += 1;
                            assert!(self.seqs[&leader].followers.contains(id));
                        }
                        other => panic!("{id:?} waiting in no queue or two: {other:?}"),
                    }
                }
            }
            let mut table = seq.block_table.clone();
            table.sort_unstable();
            table.dedup();
            assert_eq!(
                table.len(),
                seq.block_table.len(),
                "{id:?} holds a block twice"
            );
            for b in &seq.block_table {
                refs[b.0 as usize] += 1;
            }
            // Prefix blocks it shares hold exactly its tokens.
            for (j, b) in seq.block_table.iter().enumerate() {
                if let Some(cached) = self.bm.cached_tokens(*b) {
                    let start = j * bs as usize;
                    assert_eq!(
                        cached,
                        &seq.tokens()[start..start + bs as usize],
                        "{id:?} block {j}"
                    );
                }
            }
        }
        for (i, &r) in refs.iter().enumerate() {
            assert_eq!(
                r,
                self.bm.ref_count(BlockId(i as u32)),
                "block {i} ref count"
            );
        }
        if let Some(pool) = &self.window {
            self.check_window_invariants(pool);
        }
        assert_eq!(running, self.running.len());
        assert_eq!(queued, self.waiting.len());
        assert_eq!(held, self.num_held);
        for id in &self.running {
            assert_eq!(self.seqs[id].status, SeqStatus::Running);
        }
    }

    /// The window pool's part of [`Self::check_invariants`]: tables as long as the main ones,
    /// released entries exactly the leading ones and never one a later query sees, reference
    /// counts equal to the holders, cached blocks holding the sequence's tokens.
    fn check_window_invariants(&self, pool: &WindowPool) {
        pool.bm.check_invariants();
        let bs = self.cfg.block_size;
        let mut refs = vec![0u32; pool.bm.num_blocks() as usize];
        for (id, seq) in &self.seqs {
            if seq.status == SeqStatus::Waiting {
                continue;
            }
            assert_eq!(seq.window_table.len(), seq.block_table.len(), "{id:?}");
            assert!(seq.window_released <= pool.releasable(seq.num_computed_tokens));
            for (j, &b) in seq.window_table.iter().enumerate() {
                let released = (j as u32) < seq.window_released;
                assert_eq!(b == RELEASED, released, "{id:?} window block {j}");
                if released {
                    continue;
                }
                refs[b.0 as usize] += 1;
                if let Some(cached) = pool.bm.cached_tokens(b) {
                    let start = j * bs as usize;
                    assert_eq!(cached, &seq.tokens()[start..start + bs as usize]);
                }
            }
        }
        for (i, &r) in refs.iter().enumerate() {
            assert_eq!(r, pool.bm.ref_count(BlockId(i as u32)), "window block {i}");
        }
    }

    fn arrival(&mut self) -> u64 {
        let a = self.next_arrival;
        self.next_arrival += 1;
        a
    }

    fn rank(&self, priority: i32) -> i64 {
        match self.cfg.policy {
            Policy::Fcfs => 0,
            Policy::Priority => -i64::from(priority),
        }
    }

    /// The key of a sequence queued in arrival order.
    fn queue_key(&self, seq: &Sequence) -> WaitKey {
        // Arrivals are counted from 0 and never reach i64::MAX in practice.
        let order = i64::try_from(seq.arrival()).unwrap_or(i64::MAX);
        WaitKey {
            rank: self.rank(seq.priority()),
            order,
        }
    }

    /// A key before every other of the same rank.
    fn front_key(&mut self, priority: i32) -> WaitKey {
        let order = self.next_front;
        self.next_front -= 1;
        WaitKey {
            rank: self.rank(priority),
            order,
        }
    }

    fn enqueue(&mut self, mut seq: Sequence, key: WaitKey) {
        let id = seq.id();
        seq.status = SeqStatus::Waiting;
        seq.wait_key = Some(key);
        let prev = self.waiting.insert(key, id);
        assert!(prev.is_none(), "wait keys are unique");
        let prev = self.seqs.insert(id, seq);
        assert!(prev.is_none(), "ids are unique");
    }

    /// Index in `running` of the least important running sequence: lowest priority, then
    /// least computed work, then latest arrival.
    fn victim_index(&self) -> usize {
        let key = |id: &SeqId| {
            let s = &self.seqs[id];
            (s.priority(), s.num_computed_tokens, Reverse(s.arrival()))
        };
        let (pos, _) = self
            .running
            .iter()
            .enumerate()
            .min_by_key(|(_, id)| key(id))
            .expect("preemption needs a running sequence");
        pos
    }

    /// How many of `seq`'s proposed drafts the step being planned can verify: only when it
    /// decodes (one token left to compute), within the token budget left, within `max_tokens`
    /// (the step emits up to drafts + 1 tokens) and within the blocks held or free now, so
    /// drafts never cause a preemption.
    fn drafts_that_fit(&self, seq: &Sequence, budget: u32) -> u32 {
        if seq.draft_tokens.is_empty() || seq.num_tokens() - seq.num_computed_tokens != 1 {
            return 0;
        }
        let bs = self.cfg.block_size;
        let mut drafts = (seq.draft_tokens.len() as u32)
            .min(budget.saturating_sub(1))
            .min(
                seq.max_tokens()
                    .saturating_sub(seq.num_output_tokens())
                    .saturating_sub(1),
            );
        let mut free = self.bm.num_free();
        if let Some(pool) = &self.window {
            free = free.min(pool.num_free());
        }
        let held_or_free = (seq.block_table.len() as u64 + u64::from(free)) * u64::from(bs);
        let fits = held_or_free.saturating_sub(u64::from(seq.num_tokens()));
        drafts = drafts.min(u32::try_from(fits).unwrap_or(u32::MAX));
        drafts
    }

    /// Preempts `running[pos]` by recompute: frees its blocks (full computed ones stay in the
    /// prefix cache), keeps its tokens, and queues it at the front.
    fn preempt(&mut self, pos: usize) {
        let id = self.running.remove(pos);
        let mut seq = self.seqs.remove(&id).expect("running sequences exist");
        seq.draft_tokens.clear();
        free_blocks(&mut self.bm, self.window.as_mut(), &mut seq);
        seq.num_preemptions += 1;
        seq.num_cached_tokens = 0;
        self.preemptions_total += 1;
        let key = self.front_key(seq.priority());
        self.enqueue(seq, key);
    }

    /// Admits the waiting sequence `id` if blocks for its first chunk are free.
    fn try_admit(&mut self, id: SeqId, budget: u32) -> Admit {
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        let len = seq.num_tokens();
        if len.div_ceil(bs) > self.bm.num_blocks() {
            let tokens_capacity = self.cfg.capacity_tokens();
            return Admit::Failed(Error::NeverFits {
                seq_id: id,
                tokens_needed: u64::from(len),
                tokens_capacity,
            });
        }
        // Full blocks only, and never the whole sequence: at least one token must be computed
        // so that there are logits to sample.
        let mut hits: Vec<BlockId> = Vec::new();
        if self.cfg.enable_prefix_caching && seq.prefix_hits {
            let hit_blocks_max = ((len - 1) / bs) as usize;
            let mut parent = None;
            for (j, &hash) in seq.block_hashes.iter().take(hit_blocks_max).enumerate() {
                let tokens = seq.tokens_in(j as u32 * bs..(j as u32 + 1) * bs);
                match self.bm.lookup(hash, tokens, parent) {
                    Some(block) => {
                        hits.push(block);
                        parent = Some(self.bm.link(block));
                    }
                    None => break,
                }
            }
        }
        // The windowed layers need their KV of the hit's last window: shorten the hit to the
        // longest prefix whose last window is still in the window pool.
        let mut window_hits: Vec<BlockId> = Vec::new();
        if let Some(pool) = &self.window {
            let found: Vec<Option<BlockId>> = hits
                .iter()
                .enumerate()
                .map(|(j, &g)| {
                    let j = j as u32;
                    pool.lookup(self.bm.link(g), seq.tokens_in(j * bs..(j + 1) * bs))
                })
                .collect();
            let usable = (0..=hits.len())
                .rev()
                .find(|&k| {
                    let first = pool.releasable(k as u32 * bs) as usize;
                    found[first.min(k)..k].iter().all(Option::is_some)
                })
                .unwrap_or(0);
            hits.truncate(usable);
            let first = pool.releasable(usable as u32 * bs) as usize;
            window_hits = std::iter::repeat_n(RELEASED, first.min(usable))
                .chain(found[first.min(usable)..usable].iter().flatten().copied())
                .collect();
            debug_assert_eq!(window_hits.len(), usable);
        }
        let cached = hits.len() as u32 * bs;
        let num_new = (len - cached).min(budget);
        let end = cached + num_new;
        let need = end.div_ceil(bs) - hits.len() as u32;
        // Hits on free cached blocks take them off the free list too.
        let hits_free = hits.iter().filter(|&&b| self.bm.ref_count(b) == 0).count() as u32;
        if need + hits_free > self.bm.num_free() {
            return Admit::NoRoom;
        }
        if let Some(pool) = &self.window {
            let window_hits_free = window_hits
                .iter()
                .filter(|&&b| b != RELEASED && pool.bm.ref_count(b) == 0)
                .count() as u32;
            if need + window_hits_free > pool.num_free() {
                return Admit::NoRoom;
            }
        }

        for &b in &hits {
            self.bm.acquire(b);
        }
        let window_released = window_hits.iter().filter(|&&b| b == RELEASED).count() as u32;
        if let Some(pool) = &mut self.window {
            for &b in window_hits.iter().filter(|&&b| b != RELEASED) {
                pool.acquire(b);
            }
            for _ in 0..need {
                window_hits.push(pool.allocate());
            }
        }
        let last_hit = hits.last().map(|&b| self.bm.link(b));
        let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
        seq.num_registered_blocks = hits.len() as u32;
        seq.last_registered = last_hit;
        seq.block_table = hits;
        for _ in 0..need {
            let block = self.bm.allocate().expect("free blocks were counted");
            seq.block_table.push(block);
        }
        seq.window_table = window_hits;
        seq.window_released = window_released;
        seq.num_computed_tokens = end;
        seq.num_cached_tokens = cached;
        seq.status = SeqStatus::Running;
        seq.wait_key = None;
        if self.cfg.enable_prefix_caching && seq.prefix_hits {
            self.prefix_cache_queries_tokens += u64::from(len);
            self.prefix_cache_hits_tokens += u64::from(cached);
        }
        self.running.push(id);
        Admit::Admitted(Pick {
            seq_id: id,
            start: cached,
            num_new,
            drafts: 0,
        })
    }

    /// Moves the siblings held behind `leader_id` into the waiting queue.
    fn release_followers(&mut self, leader_id: SeqId) {
        let followers = std::mem::take(
            &mut self
                .seqs
                .get_mut(&leader_id)
                .expect("leader exists")
                .followers,
        );
        for fid in followers {
            let mut f = self.seqs.remove(&fid).expect("followers exist");
            f.leader = None;
            self.num_held -= 1;
            let key = self.queue_key(&f);
            self.enqueue(f, key);
        }
    }

    /// Removes a sequence wherever it is and frees its blocks.
    fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        match seq.status {
            SeqStatus::Running => {
                let pos = self.running.iter().position(|&r| r == id);
                self.running
                    .remove(pos.expect("running sequences are in `running`"));
                free_blocks(&mut self.bm, self.window.as_mut(), &mut seq);
            }
            SeqStatus::Waiting => {
                if let Some(key) = seq.wait_key.take() {
                    self.waiting.remove(&key);
                }
            }
        }
        if let Some(leader) = seq.leader.take() {
            self.num_held -= 1;
            if let Some(l) = self.seqs.get_mut(&leader) {
                l.followers.retain(|&f| f != id);
            }
        }
        if !seq.followers.is_empty() {
            // The next sibling leads the rest.
            let mut followers = std::mem::take(&mut seq.followers);
            let new_leader_id = followers.remove(0);
            for fid in &followers {
                self.seqs.get_mut(fid).expect("followers exist").leader = Some(new_leader_id);
            }
            let mut new_leader = self.seqs.remove(&new_leader_id).expect("followers exist");
            new_leader.leader = None;
            new_leader.followers = followers;
            self.num_held -= 1;
            let key = self.queue_key(&new_leader);
            self.enqueue(new_leader, key);
        }
        Some(seq)
    }
}

enum Admit {
    Admitted(Pick),
    NoRoom,
    Failed(Error),
}

/// Returns a sequence's blocks, last block first so that the LRU evicts a prefix's tail
/// before its head (heads are the most shared).
fn free_blocks(bm: &mut BlockManager, window: Option<&mut WindowPool>, seq: &mut Sequence) {
    for block in seq.block_table.drain(..).rev() {
        bm.release(block);
    }
    if let Some(pool) = window {
        pool.release_all(&mut seq.window_table);
    }
    seq.window_released = 0;
    seq.num_computed_tokens = 0;
    seq.num_registered_blocks = 0;
    seq.last_registered = None;
}

/// After a step that verified `seq`'s drafts: appends the `accepted` leading ones to its tokens
/// (hashing completed blocks when `caching`), moves its computed end back to just after them
/// and releases the blocks (of both pools) that now hold only rejected positions. Those blocks
/// were allocated fresh for this step, so they were never registered.
fn roll_back_drafts(
    bm: &mut BlockManager,
    window: Option<&mut WindowPool>,
    seq: &mut Sequence,
    accepted: u32,
    caching: bool,
) {
    let drafts = std::mem::take(&mut seq.draft_tokens);
    let accepted = accepted.min(drafts.len() as u32);
    for &token in &drafts[..accepted as usize] {
        seq.push_token(token, caching.then_some(&*bm));
    }
    seq.num_computed_tokens -= drafts.len() as u32 - accepted;
    debug_assert_eq!(seq.num_computed_tokens, seq.num_tokens());
    let keep = seq.num_computed_tokens.div_ceil(bm.block_size()) as usize;
    for block in seq.block_table.drain(keep..).rev() {
        bm.release(block);
    }
    if let Some(pool) = window {
        let mut tail: Vec<BlockId> = seq.window_table.drain(keep..).collect();
        pool.release_all(&mut tail);
    }
}

/// Offers the sequence's newly computed full blocks to the prefix cache, in order, and their
/// window blocks (still held: release comes after) to the window pool's cache under the link of
/// the canonical global block.
fn register_computed_blocks(
    bm: &mut BlockManager,
    mut window: Option<&mut WindowPool>,
    seq: &mut Sequence,
) {
    let bs = bm.block_size();
    let full = seq.num_computed_tokens / bs;
    while seq.num_registered_blocks < full {
        let j = seq.num_registered_blocks;
        let block = seq.block_table[j as usize];
        let hash = seq.block_hashes[j as usize];
        let tokens = seq.tokens_in(j * bs..(j + 1) * bs);
        let link = bm.register(block, hash, tokens, seq.last_registered);
        if let Some(pool) = window.as_deref_mut() {
            let window_block = seq.window_table[j as usize];
            debug_assert_ne!(window_block, RELEASED, "released before registered");
            pool.register(window_block, link, tokens);
        }
        seq.last_registered = Some(link);
        seq.num_registered_blocks += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::releasable;
    use crate::WindowConfig;

    fn config(block_size: u32, num_blocks: u32, seqs_max: u32, tokens_max: u32) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: seqs_max,
            max_num_batched_tokens: tokens_max,
            block_size,
            num_blocks,
            policy: Policy::Fcfs,
            enable_prefix_caching: true,
            window: None,
        }
    }

    fn scheduler(cfg: SchedulerConfig) -> Scheduler {
        Scheduler::new(cfg).expect("valid config")
    }

    /// Schedules one step and answers every sampled sequence with `token`, unfinished.
    fn step(s: &mut Scheduler, token: TokenId) -> ScheduledBatch {
        answered_step(s, token, false)
    }

    /// Schedules one step and answers every sampled sequence with `token`.
    fn answered_step(s: &mut Scheduler, token: TokenId, finished: bool) -> ScheduledBatch {
        let batch = s.schedule();
        let outputs = answers(&batch, token, finished, |_| 0);
        s.update_after_step(&outputs).expect("valid outputs");
        batch
    }

    /// The outputs that answer every sampled sequence of `batch` with `token`, each accepting
    /// `accepted(seq)` of its drafts.
    fn answers(
        batch: &ScheduledBatch,
        token: TokenId,
        finished: bool,
        accepted: impl Fn(&ScheduledSeq) -> u32,
    ) -> Vec<StepOutput> {
        batch
            .seqs
            .iter()
            .filter(|q| q.sample)
            .map(|q| StepOutput {
                seq_id: q.seq_id,
                new_token: Some(token),
                finished,
                accepted_drafts: accepted(q),
            })
            .collect()
    }

    /// Runs every sequence until it is sampled once, then finishes it.
    fn run_to_end(s: &mut Scheduler) {
        while s.has_unfinished() {
            answered_step(s, 1, true);
        }
    }

    fn find(batch: &ScheduledBatch, id: u64) -> Option<&ScheduledSeq> {
        batch.seqs.iter().find(|q| q.seq_id == SeqId(id))
    }

    fn prompt(len: u32, base: u32) -> Vec<TokenId> {
        (base..base + len).collect()
    }

    #[test]
    fn prefill_then_one_decode_token_per_step() {
        let mut s = scheduler(config(4, 16, 8, 64));
        s.add(SeqId(1), prompt(5, 100), 10, 0).expect("fits");
        let b = step(&mut s, 7);
        let q = find(&b, 1).expect("scheduled");
        assert_eq!(q.positions, 0..5);
        assert!(q.sample);
        assert_eq!(q.sample_row(), Some(4));
        assert_eq!(b.input_ids(q), &prompt(5, 100)[..]);
        assert_eq!(b.block_table(q).len(), 2);
        let b = step(&mut s, 8);
        let q = find(&b, 1).expect("scheduled");
        assert_eq!(q.positions, 5..6);
        assert_eq!(b.input_ids(q), &[7]);
        assert!(q.sample);
        let seq = s.sequence(SeqId(1)).expect("running");
        assert_eq!(seq.output_tokens(), &[7, 8]);
        assert_eq!(seq.num_computed_tokens(), 6);
    }

    #[test]
    fn long_prompt_is_chunked_to_the_token_budget_and_sampled_once() {
        let mut s = scheduler(config(4, 16, 8, 8));
        s.add(SeqId(1), prompt(20, 0), 4, 0).expect("fits");
        let mut ranges = Vec::new();
        for _ in 0..3 {
            let b = step(&mut s, 1);
            let q = find(&b, 1).expect("scheduled");
            ranges.push((q.positions.clone(), q.sample));
            assert!(b.tokens_total() <= 8);
        }
        assert_eq!(ranges, vec![(0..8, false), (8..16, false), (16..20, true)]);
    }

    #[test]
    fn running_sequences_are_served_before_waiting_ones() {
        let mut s = scheduler(config(4, 32, 8, 4));
        s.add(SeqId(1), prompt(3, 0), 8, 0).expect("fits");
        step(&mut s, 1); // 1 is now decoding
        s.add(SeqId(2), prompt(10, 50), 8, 0).expect("fits");
        let b = step(&mut s, 1);
        assert_eq!(b.seqs[0].seq_id, SeqId(1));
        assert_eq!(b.seqs[0].positions, 3..4);
        assert_eq!(find(&b, 2).expect("chunk").positions, 0..3);
        assert_eq!(b.tokens_total(), 4);
    }

    #[test]
    fn max_num_seqs_caps_the_batch() {
        let mut s = scheduler(config(4, 64, 2, 64));
        for i in 0..4 {
            s.add(SeqId(i), prompt(3, 10 * i as u32), 4, 0)
                .expect("fits");
        }
        let b = step(&mut s, 1);
        let ids: Vec<_> = b.seqs.iter().map(|q| q.seq_id).collect();
        assert_eq!(ids, vec![SeqId(0), SeqId(1)]);
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 2);
    }

    #[test]
    fn fcfs_ignores_priority_and_priority_policy_follows_it() {
        for (policy, expected) in [(Policy::Fcfs, [1, 2, 3]), (Policy::Priority, [3, 1, 2])] {
            let mut cfg = config(4, 64, 1, 64);
            cfg.policy = policy;
            let mut s = scheduler(cfg);
            s.add(SeqId(1), prompt(2, 0), 1, 0).expect("fits");
            s.add(SeqId(2), prompt(2, 10), 1, 0).expect("fits");
            s.add(SeqId(3), prompt(2, 20), 1, 5).expect("fits");
            let mut order = Vec::new();
            for _ in 0..3 {
                let b = s.schedule();
                let q = &b.seqs[0];
                order.push(q.seq_id.0);
                let out = StepOutput {
                    seq_id: q.seq_id,
                    new_token: Some(1),
                    finished: true,
                    accepted_drafts: 0,
                };
                s.update_after_step(&[out]).expect("valid");
            }
            assert_eq!(order, expected, "{policy:?}");
        }
    }

    #[test]
    fn prefix_hit_shares_full_blocks_but_never_the_whole_prompt() {
        let mut s = scheduler(config(4, 16, 8, 64));
        s.add(SeqId(1), prompt(8, 0), 4, 0).expect("fits");
        let b1 = step(&mut s, 9);
        let table1 = b1.block_table(find(&b1, 1).expect("scheduled")).to_vec();
        // Same 8-token prompt: a hit on both blocks would leave nothing to compute, so only
        // the first block is shared.
        s.add(SeqId(2), prompt(8, 0), 4, 0).expect("fits");
        // A longer prompt with the same first 8 tokens shares both blocks.
        let mut longer = prompt(8, 0);
        longer.extend([50, 51, 52]);
        s.add(SeqId(3), longer, 4, 0).expect("fits");
        let b = step(&mut s, 9);
        let q2 = find(&b, 2).expect("admitted");
        assert_eq!((q2.positions.clone(), q2.num_cached_tokens), (4..8, 4));
        assert_eq!(b.block_table(q2)[0], table1[0]);
        assert_ne!(b.block_table(q2)[1], table1[1]);
        let q3 = find(&b, 3).expect("admitted");
        assert_eq!((q3.positions.clone(), q3.num_cached_tokens), (8..11, 8));
        assert_eq!(&b.block_table(q3)[..2], &table1[..]);
        let bm = s.block_manager();
        assert_eq!(bm.ref_count(table1[0]), 3);
        assert_eq!(bm.ref_count(table1[1]), 2);
        assert_eq!(bm.cached_tokens(table1[1]), Some(&prompt(8, 0)[4..8]));
        let st = s.stats();
        assert_eq!(st.prefix_cache_queries_tokens, 8 + 8 + 11);
        assert_eq!(st.prefix_cache_hits_tokens, 4 + 8);
    }

    #[test]
    fn a_sequence_without_prefix_hits_computes_its_whole_prompt_and_still_registers_it() {
        let mut s = scheduler(config(4, 16, 8, 64));
        s.add(SeqId(1), prompt(9, 0), 1, 0).expect("fits");
        run_to_end(&mut s);
        // The same prompt: a plain sequence would reuse two blocks; this one computes all 9.
        s.add_without_prefix_hits(SeqId(2), prompt(9, 0), 1, 0)
            .expect("fits");
        assert!(!s.sequence(SeqId(2)).expect("queued").prefix_hits());
        let queries_before = s.stats().prefix_cache_queries_tokens;
        let b = s.schedule();
        let q = find(&b, 2).expect("admitted");
        assert_eq!((q.positions.clone(), q.num_cached_tokens), (0..9, 0));
        assert!(q.sample);
        let out = StepOutput {
            seq_id: SeqId(2),
            new_token: None,
            finished: true,
            accepted_drafts: 0,
        };
        s.update_after_step(&[out]).expect("valid");
        assert_eq!(s.block_manager().num_free(), 16, "its blocks are freed");
        assert_eq!(
            s.stats().prefix_cache_queries_tokens,
            queries_before,
            "no lookup is counted"
        );
        // Its own blocks are offered to the cache: a plain sequence hits those of a prompt
        // that only a sequence without hits computed.
        s.add_without_prefix_hits(SeqId(3), prompt(9, 100), 1, 0)
            .expect("fits");
        run_to_end(&mut s);
        let mut longer = prompt(9, 100);
        longer.extend([70, 71]);
        s.add(SeqId(4), longer, 1, 0).expect("fits");
        let b = step(&mut s, 1);
        let q = find(&b, 4).expect("admitted");
        assert_eq!((q.positions.clone(), q.num_cached_tokens), (8..11, 8));
    }

    #[test]
    fn a_preempted_sequence_without_prefix_hits_recomputes_its_whole_prompt() {
        // 2's prompt is computed in chunks of 2 while 1 decodes, until a full cache preempts it
        // with two full blocks registered. Once 1 has finished, a plain sequence resumes from
        // those blocks, one without prefix hits from position 0.
        let resume = |hits: bool| {
            let mut s = scheduler(config(2, 5, 8, 3));
            s.add(SeqId(1), vec![1, 2, 3], 8, 0).expect("fits");
            step(&mut s, 10);
            let p2 = vec![4, 5, 6, 7, 8, 9];
            if hits {
                s.add(SeqId(2), p2, 1, 0)
            } else {
                s.add_without_prefix_hits(SeqId(2), p2, 1, 0)
            }
            .expect("fits");
            assert_eq!(
                find(&step(&mut s, 11), 2).expect("admitted").positions,
                0..2
            );
            assert_eq!(find(&step(&mut s, 12), 2).expect("runs").positions, 2..4);
            // 1 decodes and finishes; 2 needs a third block and is the least computed.
            let b = answered_step(&mut s, 13, true);
            assert_eq!(b.preempted, vec![SeqId(2)]);
            let b = s.schedule();
            let q = find(&b, 2).expect("resumed");
            (q.positions.clone(), q.num_cached_tokens)
        };
        assert_eq!(resume(true), (4..6, 4));
        assert_eq!(resume(false), (0..3, 0));
    }

    #[test]
    fn freed_prefix_blocks_stay_cached_until_reallocated() {
        let mut s = scheduler(config(4, 4, 8, 64));
        s.add(SeqId(1), prompt(9, 0), 1, 0).expect("fits");
        let b = s.schedule();
        let table = b.block_table(&b.seqs[0]).to_vec();
        let out = StepOutput {
            seq_id: SeqId(1),
            new_token: Some(1),
            finished: true,
            accepted_drafts: 0,
        };
        s.update_after_step(&[out]).expect("valid");
        assert_eq!(s.stats().blocks_used, 0);
        assert_eq!(s.stats().blocks_cached_free, 2);
        s.add(SeqId(2), prompt(9, 0), 1, 0).expect("fits");
        let b = step(&mut s, 1);
        let q = &b.seqs[0];
        assert_eq!(q.num_cached_tokens, 8);
        assert_eq!(&b.block_table(q)[..2], &table[..2]);
    }

    #[test]
    fn prefix_caching_off_shares_nothing() {
        let mut cfg = config(4, 16, 8, 64);
        cfg.enable_prefix_caching = false;
        let mut s = scheduler(cfg);
        s.add(SeqId(1), prompt(9, 0), 4, 0).expect("fits");
        step(&mut s, 1);
        s.add(SeqId(2), prompt(9, 0), 4, 0).expect("fits");
        let b = step(&mut s, 1);
        assert_eq!(find(&b, 2).expect("admitted").positions, 0..9);
        assert_eq!(s.stats().prefix_cache_queries_tokens, 0);
        assert_eq!(s.stats().prefix_cache_hit_rate(), None);
    }

    #[test]
    fn out_of_blocks_preempts_least_computed_and_it_resumes_seamlessly() {
        // 4 blocks of 2 tokens. Two sequences of 3-token prompts take 2 blocks each; the first
        // decode that crosses a block boundary finds no free block.
        let mut s = scheduler(config(2, 4, 8, 64));
        s.add(SeqId(1), vec![1, 2, 3], 5, 0).expect("fits");
        step(&mut s, 10);
        s.add(SeqId(2), vec![4, 5, 6], 5, 0).expect("fits");
        step(&mut s, 20); // 1: [1,2,3,10,*]  2: [4,5,6,20]
                          // 1 decodes position 4 (needs a third block): 2 has computed less, so 2 is preempted.
        let b = step(&mut s, 11);
        assert_eq!(b.preempted, vec![SeqId(2)]);
        assert!(find(&b, 2).is_none());
        assert_eq!(find(&b, 1).expect("runs").positions, 4..5);
        let s2 = s.sequence(SeqId(2)).expect("requeued");
        assert_eq!(s2.status(), SeqStatus::Waiting);
        assert_eq!(s2.tokens(), &[4, 5, 6, 20]);
        assert!(s2.block_table().is_empty());
        assert_eq!(s.stats().preemptions_total, 1);
        // 1 finishes; 2 resumes: recomputes from its cached first block and samples its next
        // token after 20.
        let b = s.schedule();
        let out = StepOutput {
            seq_id: SeqId(1),
            new_token: Some(12),
            finished: true,
            accepted_drafts: 0,
        };
        assert!(
            find(&b, 2).is_none(),
            "no admission in a step with no free block"
        );
        s.update_after_step(&[out]).expect("valid");
        let b = step(&mut s, 21);
        let q = find(&b, 2).expect("resumed");
        assert_eq!(
            (q.positions.clone(), q.num_cached_tokens, q.sample),
            (2..4, 2, true)
        );
        assert_eq!(b.input_ids(q), &[6, 20]);
        assert_eq!(
            s.sequence(SeqId(2)).expect("running").output_tokens(),
            &[20, 21]
        );
    }

    #[test]
    fn victim_is_lowest_priority_before_least_computed() {
        let mut s = scheduler(config(2, 4, 8, 64));
        s.add(SeqId(1), vec![1, 2, 3], 5, 0).expect("fits");
        step(&mut s, 10);
        s.add(SeqId(2), vec![4, 5, 6], 5, 9).expect("fits");
        step(&mut s, 20);
        // 1 needs a block; it has computed more but has the lower priority: it yields itself.
        let b = step(&mut s, 30);
        assert_eq!(b.preempted, vec![SeqId(1)]);
        assert_eq!(find(&b, 2).expect("runs").positions, 3..4);
        assert_eq!(
            s.sequence(SeqId(1)).expect("queued").tokens(),
            &[1, 2, 3, 10, 20]
        );
    }

    #[test]
    fn a_request_that_can_never_fit_is_rejected_at_add() {
        let mut s = scheduler(config(4, 4, 8, 64));
        let err = s
            .add(SeqId(1), prompt(10, 0), 8, 0)
            .expect_err("17 > 16 tokens");
        assert_eq!(
            err,
            Error::NeverFits {
                seq_id: SeqId(1),
                tokens_needed: 17,
                tokens_capacity: 16
            }
        );
        assert!(!s.has_unfinished());
        // Exactly the capacity fits: the last sampled token's KV is never computed.
        s.add(SeqId(2), prompt(10, 0), 7, 0).expect("16 tokens fit");
        assert_eq!(
            s.add(SeqId(2), prompt(1, 0), 1, 0),
            Err(Error::DuplicateSeqId(SeqId(2)))
        );
        assert_eq!(
            s.add(SeqId(3), vec![], 1, 0),
            Err(Error::EmptyPrompt(SeqId(3)))
        );
        assert_eq!(
            s.add(SeqId(3), prompt(1, 0), 0, 0),
            Err(Error::ZeroMaxTokens(SeqId(3)))
        );
        assert_eq!(s.add_group(&[], prompt(1, 0), 1, 0), Err(Error::EmptyGroup));
    }

    #[test]
    fn abort_frees_blocks_at_once_wherever_the_sequence_is() {
        let mut s = scheduler(config(4, 8, 1, 64));
        s.add(SeqId(1), prompt(10, 0), 4, 0).expect("fits");
        s.add(SeqId(2), prompt(10, 0), 4, 0).expect("fits");
        step(&mut s, 1);
        assert_eq!(s.stats().blocks_used, 3);
        assert!(s.abort(SeqId(1)));
        assert_eq!(s.stats().blocks_used, 0);
        assert!(s.abort(SeqId(2)));
        assert!(!s.abort(SeqId(2)));
        assert!(!s.has_unfinished());
        assert_eq!(s.stats().num_waiting, 0);
        s.check_invariants();
    }

    #[test]
    fn aborted_between_schedule_and_update_is_ignored() {
        let mut s = scheduler(config(4, 8, 4, 64));
        s.add(SeqId(1), prompt(3, 0), 4, 0).expect("fits");
        let _ = s.schedule();
        assert!(s.abort(SeqId(1)));
        let out = StepOutput {
            seq_id: SeqId(1),
            new_token: Some(1),
            finished: false,
            accepted_drafts: 0,
        };
        s.update_after_step(&[out]).expect("ignored");
        assert_eq!(s.stats().blocks_used, 0);
    }

    #[test]
    fn siblings_wait_for_the_leader_prompt_then_share_its_blocks() {
        let mut s = scheduler(config(4, 32, 8, 64));
        s.add_group(&[SeqId(1), SeqId(2), SeqId(3)], prompt(10, 0), 4, 0)
            .expect("fits");
        let b = step(&mut s, 5);
        assert_eq!(b.seqs.len(), 1, "siblings wait for the leader");
        assert_eq!(s.num_waiting(), 2);
        let leader_table = b.block_table(&b.seqs[0]).to_vec();
        let b = step(&mut s, 6);
        assert_eq!(find(&b, 1).expect("decode").positions, 10..11);
        for id in [2, 3] {
            let q = find(&b, id).expect("sibling admitted");
            assert_eq!(
                (q.positions.clone(), q.num_cached_tokens, q.sample),
                (8..10, 8, true)
            );
            assert_eq!(&b.block_table(q)[..2], &leader_table[..2]);
        }
        assert_eq!(s.block_manager().ref_count(leader_table[0]), 3);
        assert_eq!(s.sequence(SeqId(2)).expect("running").output_tokens(), &[6]);
    }

    #[test]
    fn when_the_leader_ends_early_the_next_sibling_leads() {
        let mut s = scheduler(config(4, 32, 8, 64));
        s.add_group(&[SeqId(1), SeqId(2), SeqId(3)], prompt(10, 0), 4, 0)
            .expect("fits");
        assert!(s.abort(SeqId(1)));
        let b = step(&mut s, 5);
        let ids: Vec<_> = b.seqs.iter().map(|q| q.seq_id).collect();
        assert_eq!(ids, vec![SeqId(2)]);
        let b = step(&mut s, 6);
        assert_eq!(find(&b, 3).expect("released").num_cached_tokens, 8);
        assert!(s.abort(SeqId(3)));
        assert!(s.abort(SeqId(2)));
        assert_eq!(s.stats().blocks_used, 0);
    }

    #[test]
    fn update_after_step_rejects_bad_outputs_and_changes_nothing() {
        let mut s = scheduler(config(4, 8, 4, 4));
        assert_eq!(s.update_after_step(&[]), Err(Error::NoStepInFlight));
        s.add(SeqId(1), prompt(2, 0), 4, 0).expect("fits");
        s.add(SeqId(2), prompt(6, 0), 4, 0).expect("fits"); // chunk 0..2, not sampled
        let _ = s.schedule();
        let ok = StepOutput {
            seq_id: SeqId(1),
            new_token: Some(3),
            finished: false,
            accepted_drafts: 0,
        };
        let not_sampled = StepOutput {
            seq_id: SeqId(2),
            new_token: Some(3),
            finished: false,
            accepted_drafts: 0,
        };
        let no_token = StepOutput {
            seq_id: SeqId(1),
            new_token: None,
            finished: false,
            accepted_drafts: 0,
        };
        assert_eq!(
            s.update_after_step(&[]),
            Err(Error::MissingOutput(SeqId(1)))
        );
        assert_eq!(
            s.update_after_step(&[ok, not_sampled]),
            Err(Error::NotSampled(SeqId(2)))
        );
        assert_eq!(
            s.update_after_step(&[no_token]),
            Err(Error::MissingToken(SeqId(1)))
        );
        assert_eq!(
            s.update_after_step(&[ok, ok]),
            Err(Error::DuplicateOutput(SeqId(1)))
        );
        assert_eq!(s.sequence(SeqId(1)).expect("exists").num_tokens(), 2);
        s.update_after_step(&[ok]).expect("valid");
        assert_eq!(s.sequence(SeqId(1)).expect("exists").output_tokens(), &[3]);
    }

    #[test]
    fn a_failed_model_step_is_dropped_by_aborting_its_batch() {
        let mut s = scheduler(config(2, 8, 4, 64));
        s.add(SeqId(1), prompt(5, 0), 4, 0).expect("fits");
        let b = s.schedule();
        for q in &b.seqs {
            assert!(s.abort(q.seq_id));
        }
        s.update_after_step(&[]).expect("nothing left to report");
        assert_eq!(s.stats().blocks_used, 0);
        assert_eq!(
            s.stats().blocks_cached_free,
            0,
            "uncomputed blocks are never cached"
        );
        assert!(s.schedule().is_empty());
    }

    #[test]
    #[should_panic(expected = "before update_after_step")]
    fn scheduling_twice_without_update_panics() {
        let mut s = scheduler(config(4, 8, 4, 4));
        let _ = s.schedule();
        let _ = s.schedule();
    }

    #[test]
    fn slots_follow_the_block_table() {
        let mut s = scheduler(config(4, 8, 4, 64));
        s.add(SeqId(1), prompt(3, 0), 8, 0).expect("fits");
        s.add(SeqId(2), prompt(6, 0), 8, 0).expect("fits");
        let b = s.schedule();
        let mapping = b.slot_mapping();
        assert_eq!(mapping.len(), b.tokens_total() as usize);
        let mut expected = Vec::new();
        for q in &b.seqs {
            let table = b.block_table(q);
            for pos in q.positions.clone() {
                expected.push(table[(pos / 4) as usize].0 * 4 + pos % 4);
            }
        }
        assert_eq!(mapping, expected);
        assert_eq!(b.all_positions(), vec![0, 1, 2, 0, 1, 2, 3, 4, 5]);
        let mut distinct = mapping.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), mapping.len(), "no slot written twice");
    }

    #[test]
    fn stats_count_running_waiting_blocks_and_hits() {
        let mut s = scheduler(config(4, 8, 1, 64));
        s.add(SeqId(1), prompt(5, 0), 2, 0).expect("fits");
        s.add(SeqId(2), prompt(5, 0), 2, 0).expect("fits");
        step(&mut s, 1);
        let st = s.stats();
        assert_eq!((st.num_running, st.num_waiting), (1, 1));
        assert_eq!((st.blocks_used, st.blocks_total), (2, 8));
        assert_eq!(st.prefix_cache_hit_rate(), Some(0.0));
    }

    /// A pool for a window of `window` tokens that never preempts.
    fn windowed(mut cfg: SchedulerConfig, window: u32) -> SchedulerConfig {
        let num_blocks = WindowConfig::blocks_never_short(
            window,
            cfg.block_size,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
        );
        cfg.window = Some(WindowConfig {
            window,
            num_blocks: num_blocks as u32,
        });
        cfg
    }

    #[test]
    fn a_long_sequence_keeps_only_its_window_in_the_window_pool() {
        // Block size 4, window 10: after c computed tokens the blocks before (c + 1 - 10) / 4
        // are released; at most ceil((10 - 1 + new) / 4) + 1 are held.
        let mut s = scheduler(windowed(config(4, 64, 1, 8), 10));
        s.add(SeqId(1), prompt(40, 0), 30, 0).expect("fits");
        let mut held_max = 0;
        while s.has_unfinished() {
            let b = step(&mut s, 7);
            let q = &b.seqs[0];
            let table = b.window_block_table(q).expect("a window pool");
            assert_eq!(table.len(), b.block_table(q).len());
            held_max = held_max.max(s.stats().window_blocks_used);
            let seq = s.sequence(SeqId(1)).expect("running");
            if seq.num_tokens() == 69 {
                break;
            }
            let released = releasable(seq.num_computed_tokens(), 10, 4) as usize;
            let now = seq.window_table();
            assert!(now[..released].iter().all(|&b| b == RELEASED));
            assert!(now[released..].iter().all(|&b| b != RELEASED));
            // The global layers keep every block.
            assert_eq!(seq.block_table().len(), now.len());
            assert_eq!(s.stats().window_blocks_used as usize, now.len() - released);
        }
        assert!(held_max <= (10 - 1 + 8u32).div_ceil(4) + 1, "{held_max}");
        assert!(
            s.stats().blocks_used >= 69 / 4,
            "global layers keep the whole context"
        );
        assert!(s.abort(SeqId(1)));
        assert_eq!(s.stats().window_blocks_used, 0);
        assert_eq!(s.stats().blocks_used, 0);
    }

    #[test]
    fn a_prefix_hit_takes_the_cached_last_window_and_nothing_before_it() {
        let mut s = scheduler(windowed(config(4, 64, 2, 64), 10));
        s.add(SeqId(1), prompt(30, 0), 1, 0).expect("fits");
        run_to_end(&mut s);
        // Same 30-token prompt plus two tokens: 7 full blocks are cached in the main pool, and
        // the window blocks of the hit's last window (positions 19..28: blocks 4..7) stay
        // cached in the window pool's LRU after the first sequence finished.
        let mut longer = prompt(30, 0);
        longer.extend([9, 9]);
        s.add(SeqId(2), longer, 1, 0).expect("fits");
        let b = s.schedule();
        let q = &b.seqs[0];
        assert_eq!(q.num_cached_tokens, 28);
        let table = b.window_block_table(q).expect("a window pool");
        let first = releasable(28, 10, 4) as usize;
        assert_eq!(first, 4);
        assert!(table[..first].iter().all(|&b| b == RELEASED));
        let pool = s.window_block_manager().expect("a window pool");
        for (j, &b) in table.iter().enumerate().take(7).skip(first) {
            assert!(pool.cached_tokens(b).is_some(), "window block {j} is a hit");
        }
    }

    #[test]
    fn a_prefix_hit_without_its_window_cached_is_shortened() {
        // Prefix caching of the window pool is emptied by a second, unrelated sequence that
        // reallocates every free window block; the main pool is large and keeps its hits.
        let mut cfg = windowed(config(4, 256, 1, 8), 6);
        let min = cfg.window.expect("windowed").num_blocks;
        let mut s = scheduler(cfg.clone());
        s.add(SeqId(1), prompt(24, 0), 1, 0).expect("fits");
        run_to_end(&mut s);
        // Enough new, uncached work to cycle the whole window pool through allocation.
        s.add(SeqId(2), prompt(4 * (min + 8), 100), 1, 0)
            .expect("fits");
        run_to_end(&mut s);
        s.add(SeqId(3), prompt(24, 0), 1, 0).expect("fits");
        let b = s.schedule();
        assert_eq!(b.seqs[0].num_cached_tokens, 0, "no usable window, no hit");
        // The same with a window covering nothing: hits need no window blocks at all.
        cfg = windowed(config(4, 256, 1, 8), 1);
        let mut s = scheduler(cfg);
        s.add(SeqId(1), prompt(24, 0), 1, 0).expect("fits");
        run_to_end(&mut s);
        s.add(SeqId(3), prompt(24, 0), 1, 0).expect("fits");
        assert_eq!(s.schedule().seqs[0].num_cached_tokens, 20);
    }

    #[test]
    fn a_small_window_pool_preempts_like_the_main_pool() {
        // Window 8, block size 4, budget 8: the smallest pool (6 blocks) runs one sequence at
        // its worst; three decoding sequences need up to 3 each, so one must wait its turn.
        let mut cfg = config(4, 256, 4, 8);
        cfg.window = Some(WindowConfig {
            window: 8,
            num_blocks: WindowConfig::blocks_min(8, 4, 8) as u32,
        });
        let mut s = scheduler(cfg);
        for id in 1..=3 {
            s.add(SeqId(id), prompt(16, 10 * id as u32), 40, 0)
                .expect("fits");
        }
        for _ in 0..60 {
            step(&mut s, 2);
            let st = s.stats();
            assert!(st.window_blocks_used <= 6);
            assert!(st.blocks_used < st.blocks_total, "the main pool has room");
        }
        assert!(s.stats().preemptions_total > 0, "{:?}", s.stats());
        // Whoever was preempted resumes once the others finish.
        run_to_end(&mut s);
        assert_eq!(s.stats().window_blocks_used, 0);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let ok = SchedulerConfig::default();
        assert!(ok.validate().is_ok());
        let bad = [
            SchedulerConfig {
                max_num_seqs: 0,
                ..ok.clone()
            },
            SchedulerConfig {
                max_num_batched_tokens: 0,
                ..ok.clone()
            },
            SchedulerConfig {
                block_size: 0,
                ..ok.clone()
            },
            SchedulerConfig {
                block_size: 4096,
                ..ok.clone()
            },
            SchedulerConfig {
                num_blocks: 0,
                ..ok.clone()
            },
            SchedulerConfig {
                num_blocks: u32::MAX,
                ..ok.clone()
            },
            SchedulerConfig {
                window: Some(WindowConfig {
                    window: 0,
                    num_blocks: 1 << 20,
                }),
                ..ok.clone()
            },
            SchedulerConfig {
                // One block short of what the worst case can hold.
                window: Some(WindowConfig {
                    window: 64,
                    num_blocks: WindowConfig::blocks_min(64, 16, 2048) as u32 - 1,
                }),
                ..ok.clone()
            },
        ];
        for cfg in bad {
            assert!(matches!(
                Scheduler::new(cfg),
                Err(Error::InvalidConfig { .. })
            ));
        }
    }

    #[test]
    fn drafts_are_verified_then_rolled_back_to_the_accepted_ones() {
        // Blocks of 4, 5 blocks; a 6-token prompt.
        let mut s = scheduler(config(4, 5, 4, 64));
        s.add(SeqId(1), vec![1, 2, 3, 4, 5, 6], 14, 0)
            .expect("fits");
        step(&mut s, 7); // prefill; tokens 1..7, computed 6
        assert!(s.set_draft_tokens(SeqId(1), &[8, 9, 10, 11, 12]));
        let batch = s.schedule();
        let q = &batch.seqs[0];
        assert_eq!((q.positions.clone(), q.num_draft_tokens), (6..12, 5));
        assert_eq!(batch.input_ids(q), [7, 8, 9, 10, 11, 12]);
        assert_eq!((q.num_logit_rows(), q.sample_row()), (6, Some(0)));
        assert_eq!(s.block_manager().num_free(), 2, "3 blocks for 12 positions");
        // Two accepted, then the bonus 20: tokens ..7 8 9 20, computed 9 (3 blocks kept).
        s.update_after_step(&[StepOutput {
            seq_id: SeqId(1),
            new_token: Some(20),
            finished: false,
            accepted_drafts: 2,
        }])
        .expect("valid outputs");
        let seq = s.sequence(SeqId(1)).expect("running");
        assert_eq!(seq.tokens(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 20]);
        assert_eq!(seq.num_computed_tokens(), 9);
        assert_eq!(seq.block_table().len(), 3);
        // Only the two full blocks of accepted tokens are in the prefix cache.
        let table = seq.block_table().to_vec();
        assert_eq!(
            s.block_manager().cached_tokens(table[0]),
            Some(&[1, 2, 3, 4][..])
        );
        assert_eq!(
            s.block_manager().cached_tokens(table[1]),
            Some(&[5, 6, 7, 8][..])
        );
        assert_eq!(s.block_manager().cached_tokens(table[2]), None);

        // None accepted: back to one block past the end, the freshly allocated ones released.
        assert!(s.set_draft_tokens(SeqId(1), &[1, 1, 1, 1, 1, 1, 1]));
        let batch = s.schedule();
        assert_eq!(
            batch.seqs[0].num_draft_tokens, 7,
            "fills the 5 blocks exactly"
        );
        assert_eq!(s.block_manager().num_free(), 0);
        s.update_after_step(&[StepOutput {
            seq_id: SeqId(1),
            new_token: Some(21),
            finished: false,
            accepted_drafts: 0,
        }])
        .expect("valid outputs");
        assert_eq!(s.block_manager().num_free(), 2);
        assert_eq!(s.sequence(SeqId(1)).map(|q| q.num_tokens()), Some(11));

        // Drafts never preempt: with one block free, only what fits in it is verified.
        s.add(SeqId(2), vec![5; 5], 3, 0).expect("fits");
        step(&mut s, 3); // seq 2 takes 2 blocks; seq 1 decodes in its own
        assert_eq!(s.block_manager().num_free(), 0);
        assert!(s.set_draft_tokens(SeqId(1), &[4; 8]));
        let batch = s.schedule();
        let q = batch
            .seqs
            .iter()
            .find(|q| q.seq_id == SeqId(1))
            .expect("scheduled");
        assert_eq!(q.num_draft_tokens, 0, "{q:?}");
        assert!(batch.preempted.is_empty());
        assert!(
            batch.seqs.iter().all(|q| q.sample),
            "both decode: {batch:?}"
        );
        s.update_after_step(&answers(&batch, 1, false, |_| 0))
            .expect("valid outputs");
        // Accepting more than was scheduled is refused.
        assert!(s.set_draft_tokens(SeqId(1), &[4]));
        let batch = s.schedule();
        let outputs = answers(&batch, 1, false, |q| q.num_draft_tokens + 1);
        assert!(matches!(
            s.update_after_step(&outputs),
            Err(Error::AcceptedPastDrafts(_))
        ));
    }
}
