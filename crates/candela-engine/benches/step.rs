//! One full engine step (schedule, batch inputs, forward pass, logits to the host, sampling,
//! events) in steady-state decode at batch 1, 16 and 64, on the default model (SmolLM2-135M
//! Q4_1) on the CPU.
//!
//! `batch` requests decode together (greedy, EOS ignored, 128 tokens each after a 16-token
//! prompt, resubmitted as they finish so the batch stays full); one iteration is one step,
//! timed as the gap between two tokens of the first request. About one step in 128 also
//! prefills the resubmitted prompts, as in a server under constant load. Set
//! `RAYON_NUM_THREADS` to pin the thread count (the side-by-side runs use 2).
//!
//!   cargo bench -p candela-engine --bench step [-- batch_16]

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use candela_engine::api::{GenerateEvent, GenerateRequest, RequestId, SamplingParams};
use candela_engine::{EngineConfig, EngineHandle};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tokio::sync::mpsc::UnboundedReceiver;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);
const PROMPT_TOKENS: u32 = 16;
const MAX_TOKENS: u32 = 128;

/// `batch` requests kept decoding.
struct Load {
    engine: EngineHandle,
    streams: Vec<(RequestId, UnboundedReceiver<GenerateEvent>)>,
}

impl Load {
    fn start(batch: usize) -> Self {
        let engine = EngineHandle::start(EngineConfig {
            model: MODEL.into(),
            kv_cache_memory_bytes: 1 << 30,
            seqs_running_max: batch,
            queue_waiting_max: batch,
            ..EngineConfig::default()
        })
        .expect("the default model loads (scripts/fetch-default-model)");
        engine
            .wait_ready(Duration::from_secs(300))
            .expect("engine ready");
        let mut load = Self {
            engine,
            streams: Vec::with_capacity(batch),
        };
        for i in 0..batch {
            let stream = load.submit(i);
            load.streams.push(stream);
        }
        load
    }

    fn submit(&self, i: usize) -> (RequestId, UnboundedReceiver<GenerateEvent>) {
        // Distinct prompts, so prefix caching does not turn the refills into no-ops.
        let prompt = (0..PROMPT_TOKENS)
            .map(|t| 100 + (i as u32 * 31 + t * 7) % 20_000)
            .collect();
        let request = GenerateRequest {
            prompt_token_ids: prompt,
            sampling: SamplingParams {
                temperature: 0.0,
                ignore_eos: true,
                max_tokens: NonZeroU32::new(MAX_TOKENS),
                ..SamplingParams::default()
            },
            n: NonZeroU32::MIN,
            priority: 0,
            arrival: Instant::now(),
        };
        self.engine.submit(request).expect("request accepted")
    }

    /// Blocks until the first request has received `steps` more tokens; keeps every other
    /// stream drained and every finished request replaced.
    fn run_steps(&mut self, steps: u64) {
        let mut seen = 0;
        while seen < steps {
            let event = self.streams[0].1.blocking_recv();
            match event {
                Some(GenerateEvent::Delta { token_ids, .. }) => seen += token_ids.len() as u64,
                Some(GenerateEvent::Finished { .. }) | None => self.streams[0] = self.submit(0),
            }
            for i in 1..self.streams.len() {
                loop {
                    match self.streams[i].1.try_recv() {
                        Ok(GenerateEvent::Delta { .. }) => {}
                        Ok(GenerateEvent::Finished { .. }) => {
                            self.streams[i] = self.submit(i);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for (id, _) in &self.streams {
            self.engine.abort(*id);
        }
        self.engine
            .shutdown(Instant::now() + Duration::from_secs(5));
    }
}

fn engine_step(c: &mut Criterion) {
    if !Path::new(MODEL).is_file() {
        eprintln!("skipping: {MODEL} is missing (run scripts/fetch-default-model)");
        return;
    }
    let mut group = c.benchmark_group("engine_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    for batch in [1usize, 16, 64] {
        let mut load = Load::start(batch);
        group.bench_function(BenchmarkId::new("batch", batch), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                load.run_steps(iters);
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, engine_step);
criterion_main!(benches);
