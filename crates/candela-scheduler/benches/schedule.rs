//! Cost of one `schedule()` in a busy steady state: 256 running sequences decoding (with a
//! prefill chunk whenever one finishes and a waiting one is admitted) and a full waiting
//! queue of 512 requests sharing a system prompt. Target: tens of microseconds, far below one
//! model step.
//!
//! `cargo bench -p candela-scheduler --bench schedule`

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use candela_scheduler::{Policy, Scheduler, SchedulerConfig, SeqId, StepOutput, TokenId};
use criterion::{criterion_group, criterion_main, Criterion};

const RUNNING: u32 = 256;
const WAITING: u32 = 512;
const SYSTEM_PROMPT_LEN: u32 = 128;
const USER_PROMPT_LEN: u32 = 128;
const WARMUP_STEPS: u32 = 2_000;

/// A simulated engine that keeps the scheduler in a steady state: every finished sequence is
/// replaced by a new request, so the waiting queue stays full.
struct Sim {
    s: Scheduler,
    next_id: u64,
    remaining: HashMap<SeqId, u32>,
    outputs: Vec<StepOutput>,
}

impl Sim {
    fn new(policy: Policy) -> Self {
        let cfg = SchedulerConfig {
            max_num_seqs: RUNNING,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: 16_384,
            policy,
            enable_prefix_caching: true,
            window: None,
        };
        let mut sim = Self {
            s: Scheduler::new(cfg).expect("valid config"),
            next_id: 0,
            remaining: HashMap::new(),
            outputs: Vec::new(),
        };
        for _ in 0..RUNNING + WAITING {
            sim.add_request();
        }
        for _ in 0..WARMUP_STEPS {
            sim.step();
        }
        // Sequences that finished in the last step are replaced at the next one.
        assert!(sim.s.num_running() >= RUNNING - 16, "{:?}", sim.s.stats());
        assert!(sim.s.num_waiting() >= WAITING - 1);
        sim
    }

    fn add_request(&mut self) {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let unique = id.0 as u32;
        let prompt: Vec<TokenId> = (0..SYSTEM_PROMPT_LEN)
            .chain((0..USER_PROMPT_LEN).map(|i| 1_000 + unique.wrapping_mul(7919) + i))
            .collect();
        // Output lengths 64..320, spread so that about one sequence finishes per step.
        let outputs = 64 + (unique.wrapping_mul(37) % 256);
        self.s
            .add(id, prompt, 512, (unique % 3) as i32)
            .expect("fits");
        self.remaining.insert(id, outputs);
    }

    /// One engine step; returns the time spent in `schedule()` alone.
    fn step(&mut self) -> Duration {
        let t0 = Instant::now();
        let batch = self.s.schedule();
        let elapsed = t0.elapsed();
        black_box(&batch);
        self.outputs.clear();
        let mut finished = 0;
        for q in batch.seqs.iter().filter(|q| q.sample) {
            let left = self.remaining.get_mut(&q.seq_id).expect("known sequence");
            *left -= 1;
            let done = *left == 0;
            if done {
                self.remaining.remove(&q.seq_id);
                finished += 1;
            }
            let token = 7 + (q.positions.end % 1000);
            self.outputs.push(StepOutput {
                seq_id: q.seq_id,
                new_token: Some(token),
                finished: done,
                accepted_drafts: 0,
            });
        }
        self.s
            .update_after_step(&self.outputs)
            .expect("valid outputs");
        for _ in 0..finished {
            self.add_request();
        }
        elapsed
    }
}

fn bench(c: &mut Criterion) {
    for policy in [Policy::Fcfs, Policy::Priority] {
        let mut sim = Sim::new(policy);
        c.bench_function(
            &format!("schedule_256_running_512_waiting_{policy:?}"),
            |b| b.iter_custom(|iters| (0..iters).map(|_| sim.step()).sum()),
        );
        let mut sim = Sim::new(policy);
        c.bench_function(
            &format!("schedule_and_update_256_running_{policy:?}"),
            |b| b.iter(|| sim.step()),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
