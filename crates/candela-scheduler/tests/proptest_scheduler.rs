//! Property tests: random workloads (arrivals, prompt and output lengths, shared prefixes,
//! sibling groups, sequences that may not use the prefix cache, aborts, tiny caches that force
//! preemption, speculative drafts partly rejected) driven through the scheduler by a simulated
//! engine that keeps a shadow KV cache. After every step it checks that budgets hold, no slot is
//! written by two sequences, every sequence attends only to KV computed from exactly its own
//! tokens (so prefix hits, resumed preemptions and rolled-back drafts are correct: a rejected
//! draft's KV is never visible, to the sequence or through the prefix cache), tokens survive
//! preemption, and in the end every admitted request finished and no block leaked.

use std::collections::{HashMap, HashSet};

use candela_scheduler::{
    Error, Policy, ScheduledBatch, Scheduler, SchedulerConfig, SchedulerStats, SeqId, SeqStatus,
    StepOutput, TokenId, WindowConfig,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Small vocabulary: prompts and outputs collide often, so prefixes are shared a lot.
const VOCAB: u32 = 4;
const PREFIX_LEN_MAX: usize = 14;
const STEPS_MAX: u32 = 5_000;

#[derive(Debug, Clone)]
struct Req {
    arrive_step: u32,
    prefix: u32,
    prefix_len: usize,
    suffix: Vec<TokenId>,
    max_tokens: u32,
    /// Outputs after which the simulated engine stops it (EOS), at most `max_tokens`.
    stop_after: u32,
    priority: i32,
    n: u32,
    abort_after_steps: Option<u32>,
    /// Added with `add_without_prefix_hits` (only when `n == 1`): it must never start from a
    /// cached block, whoever computed the prompt before.
    no_prefix_hits: bool,
    /// Draft tokens proposed before every step (0: no speculation); some are wrong.
    draft_k: u32,
}

fn req() -> impl Strategy<Value = Req> {
    (
        0u32..40,
        0u32..3,
        0usize..=PREFIX_LEN_MAX,
        vec(0..VOCAB, 1..10),
        1u32..14,
        1u32..14,
        -2i32..3,
        1u32..4,
        prop::option::weighted(0.15, 0u32..12),
        prop::bool::weighted(0.2),
        0u32..5,
    )
        .prop_map(
            |(
                arrive_step,
                prefix,
                prefix_len,
                suffix,
                max_tokens,
                stop,
                priority,
                n,
                abort,
                no_prefix_hits,
                draft_k,
            )| Req {
                arrive_step,
                prefix,
                prefix_len,
                suffix,
                max_tokens,
                stop_after: stop.min(max_tokens),
                priority,
                n,
                abort_after_steps: abort,
                no_prefix_hits: no_prefix_hits && n == 1,
                draft_k,
            },
        )
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        1u32..5,
        3u32..32,
        1u32..6,
        1u32..24,
        any::<bool>(),
        any::<bool>(),
        prop::option::of((1u32..12, 0u32..4)),
    )
        .prop_map(
            |(block_size, num_blocks, seqs, tokens, priority, caching, window)| SchedulerConfig {
                max_num_seqs: seqs,
                max_num_batched_tokens: tokens,
                block_size,
                num_blocks,
                policy: if priority {
                    Policy::Priority
                } else {
                    Policy::Fcfs
                },
                enable_prefix_caching: caching,
                // From the smallest pool allowed (it preempts often) up.
                window: window.map(|(window, extra)| WindowConfig {
                    window,
                    num_blocks: WindowConfig::blocks_min(window, block_size, tokens) as u32
                        + extra * 3,
                }),
            },
        )
}

fn prompt_of(r: &Req) -> Vec<TokenId> {
    let mut p: Vec<TokenId> = (0..r.prefix_len as u32)
        .map(|i| (r.prefix * 3 + i * (r.prefix + 1)) % VOCAB)
        .collect();
    p.extend(&r.suffix);
    p
}

/// What the simulated engine knows about one live sequence.
struct Live {
    tokens: Vec<TokenId>,
    outputs: u32,
    stop_after: u32,
    abort_at_step: Option<u32>,
    draft_k: u32,
}

/// The simulated model's output number `j` of sequence `id`.
fn model_token(id: SeqId, j: u32) -> TokenId {
    ((id.0 as u32) * 3 + j * 5) % VOCAB
}

/// Drafts for the next outputs of `id`: the model's own tokens, one of them wrong now and then
/// (on a hash of the step), so that some steps accept all, some part, some none.
fn drafts_for(id: SeqId, l: &Live, step: u32) -> Vec<TokenId> {
    let wrong = (step.wrapping_mul(7) + id.0 as u32 * 13) % (l.draft_k + 2);
    (0..l.draft_k)
        .map(|i| {
            let t = model_token(id, l.outputs + i);
            if i == wrong {
                (t + 1) % VOCAB
            } else {
                t
            }
        })
        .collect()
}

/// The simulated engine: a shadow KV cache mapping each slot to the exact token prefix whose
/// last position was computed into it, one for the global layers and one for the windowed
/// layers' pool (when there is one).
/// Returns the scheduler's final counters and how many drafts were accepted.
fn run(cfg: SchedulerConfig, reqs: Vec<Req>) -> Result<(SchedulerStats, u64), TestCaseError> {
    let mut s = Scheduler::new(cfg.clone()).expect("valid config");
    let bs = cfg.block_size;
    let capacity = cfg.capacity_tokens();
    let mut kv: HashMap<u32, Vec<TokenId>> = HashMap::new();
    let mut window_kv: HashMap<u32, Vec<TokenId>> = HashMap::new();
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    let mut next_id = 0u64;
    let (mut admitted, mut finished, mut aborted) = (0u32, 0u32, 0u32);
    let mut accepted_total = 0u64;

    for step in 0..STEPS_MAX {
        for r in reqs.iter().filter(|r| r.arrive_step == step) {
            let prompt = prompt_of(r);
            let ids: Vec<SeqId> = (0..r.n).map(|i| SeqId(next_id + u64::from(i))).collect();
            next_id += u64::from(r.n);
            let fits = prompt.len() as u64 + u64::from(r.max_tokens) - 1 <= capacity;
            let added = if r.no_prefix_hits {
                s.add_without_prefix_hits(ids[0], prompt.clone(), r.max_tokens, r.priority)
            } else {
                s.add_group(&ids, prompt.clone(), r.max_tokens, r.priority)
            };
            match added {
                Ok(()) => {
                    prop_assert!(fits, "accepted a request that cannot fit");
                    for &id in &ids {
                        admitted += 1;
                        let abort_at_step = r.abort_after_steps.map(|a| step + a);
                        let l = Live {
                            tokens: prompt.clone(),
                            outputs: 0,
                            stop_after: r.stop_after,
                            abort_at_step,
                            draft_k: r.draft_k,
                        };
                        live.insert(id, l);
                    }
                }
                Err(Error::NeverFits { .. }) => prop_assert!(!fits, "rejected a request that fits"),
                Err(e) => return Err(TestCaseError::fail(format!("unexpected add error {e}"))),
            }
        }
        let to_abort: Vec<SeqId> = live
            .iter()
            .filter(|(_, l)| l.abort_at_step == Some(step))
            .map(|(&id, _)| id)
            .collect();
        for id in to_abort {
            prop_assert!(s.abort(id));
            live.remove(&id);
            aborted += 1;
        }

        let mut proposed: HashMap<SeqId, Vec<TokenId>> = HashMap::new();
        for (&id, l) in &live {
            if l.draft_k > 0 {
                let drafts = drafts_for(id, l, step);
                let running = s.sequence(id).map(|q| q.status()) == Some(SeqStatus::Running);
                prop_assert_eq!(s.set_draft_tokens(id, &drafts), running);
                proposed.insert(id, drafts);
            }
        }
        let batch = s.schedule();
        check_batch(&s, &cfg, &batch, &kv, &proposed)?;
        check_window_batch(&s, &cfg, &batch, &window_kv)?;
        prop_assert!(batch.failed.is_empty(), "failed: {:?}", batch.failed);
        for id in &batch.preempted {
            let seq = s.sequence(*id).expect("preempted sequences stay queued");
            prop_assert_eq!(seq.status(), SeqStatus::Waiting);
            prop_assert!(seq.block_table().is_empty());
        }

        // "Run the model": write this step's KV, drafts included.
        for q in &batch.seqs {
            let mut tokens = live[&q.seq_id].tokens.clone();
            tokens.extend_from_slice(
                &batch.input_ids(q)[(q.num_new_tokens() - q.num_draft_tokens) as usize..],
            );
            for pos in q.positions.clone() {
                kv.insert(batch.slot(q, pos), tokens[..=pos as usize].to_vec());
                if let Some(slot) = batch.window_slot(q, pos) {
                    window_kv.insert(slot, tokens[..=pos as usize].to_vec());
                }
            }
        }
        let mut outputs = Vec::new();
        for q in batch.seqs.iter().filter(|q| q.sample) {
            let l = live
                .get_mut(&q.seq_id)
                .expect("scheduled sequences are live");
            let drafts =
                &proposed.get(&q.seq_id).map_or(&[][..], |d| &d[..])[..q.num_draft_tokens as usize];
            // Emit the model's tokens while they match the drafts, plus one (the bonus).
            let (mut accepted, mut token, mut done) = (0u32, 0, false);
            for i in 0..=drafts.len() {
                token = model_token(q.seq_id, l.outputs);
                l.outputs += 1;
                l.tokens.push(token);
                done = l.outputs >= l.stop_after;
                if done || drafts.get(i) != Some(&token) {
                    break;
                }
                accepted += 1;
            }
            accepted_total += u64::from(accepted);
            outputs.push(StepOutput {
                seq_id: q.seq_id,
                new_token: Some(token),
                finished: done,
                accepted_drafts: accepted,
            });
            if done {
                live.remove(&q.seq_id);
                finished += 1;
            }
        }
        s.update_after_step(&outputs)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        s.check_invariants();

        // Tokens are intact, whatever happened (preemption included).
        for (id, l) in &live {
            let seq = s.sequence(*id).expect("live sequences exist");
            prop_assert_eq!(seq.tokens(), &l.tokens[..]);
            prop_assert_eq!(
                seq.block_table().len() as u32,
                seq.num_computed_tokens().div_ceil(bs)
            );
        }
        let stats = s.stats();
        prop_assert_eq!(stats.num_running + stats.num_waiting, live.len() as u32);

        let all_arrived = reqs.iter().all(|r| r.arrive_step <= step);
        if all_arrived && !s.has_unfinished() {
            prop_assert!(live.is_empty());
            prop_assert_eq!(finished + aborted, admitted);
            prop_assert_eq!(
                s.block_manager().num_free(),
                cfg.num_blocks,
                "blocks leaked"
            );
            prop_assert_eq!(stats.blocks_used, 0);
            prop_assert_eq!(stats.window_blocks_used, 0, "window blocks leaked");
            return Ok((stats, accepted_total));
        }
    }
    Err(TestCaseError::fail(format!(
        "not done after {STEPS_MAX} steps: {:?}",
        s.stats()
    )))
}

fn check_batch(
    s: &Scheduler,
    cfg: &SchedulerConfig,
    batch: &ScheduledBatch,
    kv: &HashMap<u32, Vec<TokenId>>,
    proposed: &HashMap<SeqId, Vec<TokenId>>,
) -> Result<(), TestCaseError> {
    let bs = cfg.block_size;
    let bm = s.block_manager();
    prop_assert!(batch.tokens_total() <= cfg.max_num_batched_tokens);
    prop_assert!(batch.seqs.len() as u32 <= cfg.max_num_seqs);
    prop_assert!(s.num_running() <= cfg.max_num_seqs);
    let mut written = HashSet::new();
    for q in &batch.seqs {
        let seq = s.sequence(q.seq_id).expect("scheduled sequences exist");
        prop_assert!(q.num_new_tokens() > 0);
        prop_assert_eq!(seq.status(), SeqStatus::Running);
        prop_assert_eq!(seq.num_computed_tokens(), q.positions.end);
        let d = q.num_draft_tokens;
        prop_assert_eq!(q.sample, q.positions.end == seq.num_tokens() + d);
        if d > 0 {
            // A decode step: the last token, then a prefix of what was proposed, within
            // max_tokens (drafts + 1 tokens are emitted at most).
            prop_assert_eq!(q.positions.start + 1, seq.num_tokens());
            prop_assert!(seq.num_output_tokens() + d < seq.max_tokens());
            let (head, tail) = batch.input_ids(q).split_at(1);
            prop_assert_eq!(head, seq.tokens_in(q.positions.start..seq.num_tokens()));
            prop_assert_eq!(tail, &proposed[&q.seq_id][..d as usize]);
            prop_assert!(batch.preempted.is_empty() || !batch.preempted.contains(&q.seq_id));
        } else {
            prop_assert_eq!(batch.input_ids(q), seq.tokens_in(q.positions.clone()));
        }
        let table = batch.block_table(q);
        prop_assert_eq!(table, seq.block_table());
        prop_assert_eq!(table.len() as u32, q.positions.end.div_ceil(bs));
        // A prefix hit covers whole blocks of exactly this prompt, never all of it.
        prop_assert_eq!(q.num_cached_tokens % bs, 0);
        prop_assert!(q.num_cached_tokens < seq.num_tokens());
        if !seq.prefix_hits() {
            // Admitted (first, or after a preemption) at position 0, whatever is cached.
            prop_assert_eq!(q.num_cached_tokens, 0);
        }
        let hit_blocks = (q.num_cached_tokens / bs) as usize;
        for (j, &block) in (0u32..).zip(&table[..hit_blocks]) {
            let expected = seq.tokens_in(j * bs..(j + 1) * bs);
            prop_assert_eq!(bm.cached_tokens(block), Some(expected));
        }
        // Everything it attends to was computed from exactly its own tokens.
        for pos in 0..q.positions.start {
            let stored = kv.get(&batch.slot(q, pos));
            prop_assert_eq!(
                stored.map(|v| &v[..]),
                Some(seq.tokens_in(0..pos + 1)),
                "pos {}",
                pos
            );
        }
        // It writes only blocks it holds alone and that nobody can look up.
        for pos in q.positions.clone() {
            let slot = batch.slot(q, pos);
            prop_assert!(
                written.insert(slot),
                "slot {} written twice in one step",
                slot
            );
            let block = table[(pos / bs) as usize];
            prop_assert_eq!(bm.ref_count(block), 1, "writes a shared block");
            prop_assert!(bm.cached_tokens(block).is_none(), "writes a cached block");
        }
    }
    Ok(())
}

/// The windowed layers' half of [`check_batch`]: each sequence's window table is as long as its
/// block table, every key a windowed query can see was computed from exactly its own tokens,
/// and it writes only window blocks it holds alone and nobody can look up.
fn check_window_batch(
    s: &Scheduler,
    cfg: &SchedulerConfig,
    batch: &ScheduledBatch,
    window_kv: &HashMap<u32, Vec<TokenId>>,
) -> Result<(), TestCaseError> {
    let (Some(w), Some(pool)) = (cfg.window, s.window_block_manager()) else {
        prop_assert!(batch
            .seqs
            .iter()
            .all(|q| batch.window_block_table(q).is_none()));
        return Ok(());
    };
    let bs = cfg.block_size;
    prop_assert!(s.stats().window_blocks_used <= w.num_blocks);
    for q in &batch.seqs {
        let seq = s.sequence(q.seq_id).expect("scheduled sequences exist");
        let table = batch
            .window_block_table(q)
            .expect("a window pool gives window tables");
        prop_assert_eq!(table, seq.window_table());
        prop_assert_eq!(table.len(), batch.block_table(q).len());
        let first_visible = (q.positions.start + 1).saturating_sub(w.window);
        for pos in first_visible..q.positions.start {
            let stored = batch
                .window_slot(q, pos)
                .and_then(|slot| window_kv.get(&slot));
            prop_assert_eq!(
                stored.map(|v| &v[..]),
                Some(seq.tokens_in(0..pos + 1)),
                "window pos {}",
                pos
            );
        }
        for pos in q.positions.clone() {
            let block = table[(pos / bs) as usize];
            prop_assert_eq!(pool.ref_count(block), 1, "writes a shared window block");
            prop_assert!(
                pool.cached_tokens(block).is_none(),
                "writes a cached window block"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_every_invariant(cfg in config(), reqs in vec(req(), 1..24)) {
        run(cfg, reqs)?;
    }
}

/// Many identical prompts in a cache too small for all of them: preemption and prefix sharing
/// interleave constantly.
#[test]
fn tiny_cache_with_one_shared_prompt_finishes_everything() {
    let cfg = SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        block_size: 2,
        num_blocks: 8,
        policy: Policy::Fcfs,
        enable_prefix_caching: true,
        window: None,
    };
    let reqs = (0..12)
        .map(|i| Req {
            arrive_step: i % 3,
            prefix: 1,
            prefix_len: 6,
            suffix: vec![i % VOCAB],
            max_tokens: 8,
            stop_after: 8,
            priority: (i % 3) as i32,
            n: 1 + i % 2,
            abort_after_steps: None,
            // Every fourth (always a single sequence) recomputes its prompt from scratch.
            no_prefix_hits: i % 4 == 0,
            draft_k: i % 3,
        })
        .collect();
    let (stats, accepted) = run(cfg, reqs).expect("all invariants hold");
    assert!(accepted > 0, "no draft was ever accepted");
    // The workload is built to exercise both; a change that stops them must fail here.
    assert!(stats.preemptions_total > 0, "{stats:?}");
    assert!(stats.prefix_cache_hits_tokens > 0, "{stats:?}");
}
