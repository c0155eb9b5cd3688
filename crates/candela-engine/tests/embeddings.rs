//! Embedding requests with the real default model (SmolLM2-135M-Instruct Q4_1): prefill-only
//! sequences in the same batches as generation. Their vectors equal a reference forward of the
//! model alone on each prompt (in one chunk, no cache, no batch), whether alone, chunked, amid
//! generation traffic, served from the prefix cache (last pooling) or preempted (mean
//! pooling); they have unit norm, mean and last pooling differ, and every block is freed.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candela_engine::api::{
    EmbedEvent, EmbedRequest, FinishReason, GenerateEvent, Pooling, SubmitError, TokenId, Usage,
};
use candela_engine::{EngineConfig, EngineHandle, KvCacheDtype};
use candela_models::{BatchBuilder, Model, PoolChunk, SeqChunk};
use candle_core::Device;
use tokio::sync::mpsc::UnboundedReceiver;

mod support;
use support::{greedy, metric, model_path, request, start, wait_until_idle};

/// Bytes of one KV block of the default model: K and V, 30 layers, 16 tokens, 3 KV heads of
/// 64, f16 (the default cache dtype on the CPU).
const BLOCK_BYTES: u64 = 2 * 30 * 16 * 3 * 64 * 2;

/// Largest difference allowed between an engine embedding and the reference, per component of
/// a unit vector. Measured: at most 3e-7 (rounding in the normalisation); a row pooled twice
/// after a preemption moves components by 2e-2.
const TOLERANCE: f32 = 5e-6;

/// A prompt of `len` ordinary tokens, different for each `seed`.
fn prompt(len: usize, seed: u32) -> Vec<TokenId> {
    (0..len as u32)
        .map(|i| 200 + (seed * 7919 + i * 104_729) % 40_000)
        .collect()
}

/// The model alone: one sequence, its whole prompt in one chunk, every row's final hidden
/// state, pooled and normalised here. `(last, mean)`.
fn reference(prompt: &[TokenId]) -> (Vec<f32>, Vec<f32>) {
    static MODEL: OnceLock<Mutex<Box<dyn Model>>> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let loaded = candela_models::load_model(&model_path().to_string_lossy(), &Device::Cpu)
            .expect("the default model loads");
        Mutex::new(loaded.model)
    });
    let model = model
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let c = model.config();
    let block_size = 16;
    let blocks = prompt.len().div_ceil(block_size);
    // The engine's cache dtype on the CPU.
    let dtype = KvCacheDtype::Auto.resolve(model.dtype(), &Device::Cpu);
    let mut kv = candela_kernels::kv_cache::PagedKvCache::new(
        c.num_layers,
        blocks,
        block_size,
        c.num_kv_heads,
        c.head_dim,
        dtype,
        &Device::Cpu,
    )
    .expect("a KV cache");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let chunk = SeqChunk {
        token_ids: prompt,
        tokens_cached: 0,
        block_table: &table,
        window_block_table: None,
        sample: false,
        extra_logit_rows: 0,
    };
    let pools: Vec<PoolChunk> = (0..prompt.len())
        .map(|i| PoolChunk {
            chunk: 0,
            rows: i..i + 1,
        })
        .collect();
    let inputs = BatchBuilder::default()
        .build_pooled(&[chunk], &pools, block_size, &Device::Cpu)
        .expect("inputs");
    let (_, hidden) = model.forward_pooled(&inputs, &mut kv).expect("a forward");
    let rows = hidden.to_vec2::<f32>().expect("rows");
    let last = normalized(rows[rows.len() - 1].clone());
    let n = rows.len() as f32;
    let mean = normalized(
        (0..rows[0].len())
            .map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / n)
            .collect(),
    );
    (last, mean)
}

fn normalized(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn reference_of(prompt: &[TokenId], pooling: Pooling) -> Vec<f32> {
    let (last, mean) = reference(prompt);
    match pooling {
        Pooling::Last => last,
        Pooling::Mean => mean,
    }
}

fn embed_request(inputs: &[Vec<TokenId>], pooling: Pooling, priority: i32) -> EmbedRequest {
    EmbedRequest {
        inputs: inputs.to_vec(),
        pooling,
        priority,
        arrival: Instant::now(),
    }
}

/// Reads one event per input; every input must be embedded.
fn collect(mut events: UnboundedReceiver<EmbedEvent>, n: usize) -> Vec<(Vec<f32>, Usage)> {
    let mut out: Vec<Option<(Vec<f32>, Usage)>> = vec![None; n];
    for _ in 0..n {
        match events.blocking_recv().expect("one event per input") {
            EmbedEvent::Embedding {
                index,
                embedding,
                usage,
            } => {
                let slot = &mut out[index as usize];
                assert!(slot.is_none(), "input {index} answered twice");
                *slot = Some((embedding, usage));
            }
            EmbedEvent::Failed { index, reason } => panic!("input {index} failed: {reason:?}"),
        }
    }
    assert!(events.blocking_recv().is_none(), "no event after the last");
    out.into_iter()
        .map(|o| o.expect("every input answered"))
        .collect()
}

fn embed(engine: &EngineHandle, request: EmbedRequest) -> Vec<(Vec<f32>, Usage)> {
    let n = request.inputs.len();
    let (_, events) = engine.embed(request).expect("accepted");
    collect(events, n)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let d = max_abs_diff(got, want);
    assert!(d <= TOLERANCE, "{what}: differs by {d}");
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn generated(mut events: UnboundedReceiver<GenerateEvent>) -> Vec<TokenId> {
    let mut tokens = Vec::new();
    loop {
        match events.blocking_recv().expect("a Finished event") {
            GenerateEvent::Delta { token_ids, .. } => tokens.extend(token_ids),
            GenerateEvent::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                return tokens;
            }
        }
    }
}

#[test]
fn embeddings_equal_the_model_alone_whether_alone_chunked_or_amid_generation() {
    // Chunks of at most 64 tokens: the 150-token input takes three steps.
    let engine = start(EngineConfig {
        batch_tokens_max: 64,
        ..EngineConfig::default()
    });
    let inputs = vec![prompt(5, 1), prompt(40, 2), prompt(150, 3)];
    let mut alone = Vec::new();
    for pooling in [Pooling::Last, Pooling::Mean] {
        let got = embed(&engine, embed_request(&inputs, pooling, 0));
        for (i, ((vector, usage), input)) in got.iter().zip(&inputs).enumerate() {
            assert_eq!(vector.len(), 576, "the hidden size");
            assert!((norm(vector) - 1.0).abs() < 1e-5, "unit norm");
            assert_eq!(usage.prompt_tokens as usize, input.len());
            assert_eq!(usage.completion_tokens, 0);
            let what = format!("{pooling:?} input {i}");
            assert_close(vector, &reference_of(input, pooling), &what);
        }
        alone.push(got);
    }
    // Mean and last pooling are different vectors (one token alone would be the same).
    for (i, (last, mean)) in alone[0].iter().zip(&alone[1]).enumerate() {
        assert!(max_abs_diff(&last.0, &mean.0) > 0.05, "input {i}");
    }

    // The same requests again, amid generation that decodes while they prefill.
    let prompts: Vec<Vec<TokenId>> = (10..14).map(|s| prompt(30, s)).collect();
    let expected: Vec<Vec<TokenId>> = prompts
        .iter()
        .map(|p| {
            let (_, events) = engine.submit(request(p, greedy(24), 1)).expect("accepted");
            generated(events)
        })
        .collect();
    let generations: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(request(p, greedy(24), 1))
                .expect("accepted")
                .1
        })
        .collect();
    let embeds: Vec<_> = [Pooling::Last, Pooling::Mean]
        .into_iter()
        .map(|pooling| {
            engine
                .embed(embed_request(&inputs, pooling, 0))
                .expect("accepted")
                .1
        })
        .collect();
    for (events, alone) in embeds.into_iter().zip(&alone) {
        for (i, ((vector, _), (alone, _))) in
            collect(events, inputs.len()).iter().zip(alone).enumerate()
        {
            assert_close(vector, alone, &format!("input {i} amid generation"));
        }
    }
    for (i, (events, expected)) in generations.into_iter().zip(&expected).enumerate() {
        assert_eq!(
            &generated(events),
            expected,
            "generation {i} beside embeddings"
        );
    }
    wait_until_idle(&engine);
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}

#[test]
fn only_last_pooling_starts_from_the_prefix_cache_and_blocks_are_freed() {
    let engine = start(EngineConfig::default());
    // A generation computes (and caches) a 64-token prefix: 4 blocks.
    let prefix = prompt(64, 20);
    let (_, events) = engine
        .submit(request(&prefix, greedy(2), 1))
        .expect("accepted");
    generated(events);
    let mut input = prefix.clone();
    input.extend(prompt(26, 21));
    let hits_before = metric(&engine, "candela:prefix_cache_hits_total");

    let mean = embed(
        &engine,
        embed_request(std::slice::from_ref(&input), Pooling::Mean, 0),
    );
    assert_eq!(
        mean[0].1.cached_prompt_tokens, 0,
        "mean pooling reads no cache"
    );
    assert_close(&mean[0].0, &reference_of(&input, Pooling::Mean), "mean");
    assert_eq!(
        metric(&engine, "candela:prefix_cache_hits_total"),
        hits_before
    );

    // The generation's 4 blocks, and the fifth that only the mean-pooled embedding computed:
    // an embedding's blocks are offered to the cache like any other.
    let last = embed(
        &engine,
        embed_request(std::slice::from_ref(&input), Pooling::Last, 0),
    );
    assert_eq!(
        last[0].1.cached_prompt_tokens, 80,
        "last pooling reuses the prefix"
    );
    assert_close(&last[0].0, &reference_of(&input, Pooling::Last), "last");
    // A prompt that is all cached still computes its last position.
    let whole = embed(
        &engine,
        embed_request(std::slice::from_ref(&prefix), Pooling::Last, 0),
    );
    assert_eq!(whole[0].1.cached_prompt_tokens, 48);
    assert_close(&whole[0].0, &reference_of(&prefix, Pooling::Last), "cached");
    assert_eq!(
        metric(&engine, "candela:prefix_cache_hits_total"),
        hits_before + 80.0 + 48.0
    );
    wait_until_idle(&engine);
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}

#[test]
fn a_tiny_cache_preempts_embeddings_and_they_still_equal_the_reference() {
    // 12 blocks of 16 tokens. The two generations need 5 blocks each at most, so alone they
    // never preempt; the embeddings (two inputs of 7 blocks each, in chunks of 32 tokens)
    // have the lower priority, so every preemption takes an embedding mid-prompt.
    let engine = start(EngineConfig {
        kv_cache_memory_bytes: 12 * BLOCK_BYTES,
        batch_tokens_max: 32,
        ..EngineConfig::default()
    });
    let prompts: Vec<Vec<TokenId>> = (30..32).map(|s| prompt(30, s)).collect();
    let inputs = vec![prompt(100, 33), prompt(104, 34)];
    let generations: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(request(p, greedy(50), 1))
                .expect("accepted")
                .1
        })
        .collect();
    let embeds: Vec<_> = [Pooling::Mean, Pooling::Last]
        .into_iter()
        .map(|pooling| {
            let (_, events) = engine
                .embed(embed_request(&inputs, pooling, -1))
                .expect("accepted");
            (pooling, events)
        })
        .collect();
    for (pooling, events) in embeds {
        for (i, (vector, _)) in collect(events, inputs.len()).iter().enumerate() {
            let what = format!("{pooling:?} input {i}");
            assert_close(vector, &reference_of(&inputs[i], pooling), &what);
        }
    }
    for events in generations {
        assert_eq!(generated(events).len(), 50);
    }
    assert!(metric(&engine, "candela:num_preemptions_total") > 0.0);
    wait_until_idle(&engine);
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}

#[test]
fn aborts_and_dropped_receivers_free_every_block_and_bad_requests_are_refused() {
    let engine = start(EngineConfig::default());
    // 64 inputs of 200 tokens: about seven steps of 2048 tokens, so the abort finds some
    // unfinished.
    let inputs: Vec<Vec<TokenId>> = (0..64).map(|s| prompt(200, 40 + s)).collect();
    let (aborted_id, mut aborted) = engine
        .embed(embed_request(&inputs, Pooling::Mean, 0))
        .expect("accepted");
    let (_, dropped) = engine
        .embed(embed_request(&inputs, Pooling::Last, 0))
        .expect("accepted");
    drop(dropped);
    // Abort once the first input is done: the others are running or waiting.
    match aborted.blocking_recv() {
        Some(EmbedEvent::Embedding { .. }) => {}
        other => panic!("expected an embedding, got {other:?}"),
    }
    engine.abort(aborted_id);
    let mut failed = 0;
    while let Some(event) = aborted.blocking_recv() {
        match event {
            EmbedEvent::Failed {
                reason: FinishReason::Abort,
                ..
            } => failed += 1,
            EmbedEvent::Embedding { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(failed > 0, "some inputs were aborted");
    wait_until_idle(&engine);

    let vocab = engine.vocab_size() as TokenId;
    let too_long = vec![1; engine.model_len_max() + 1];
    let many = vec![vec![1]; candela_engine::api::EMBED_INPUTS_MAX + 1];
    for bad in [
        vec![],
        vec![vec![1], vec![]],
        vec![vec![1, vocab]],
        vec![too_long],
        many,
    ] {
        assert!(matches!(
            engine.embed(embed_request(&bad, Pooling::Last, 0)),
            Err(SubmitError::InvalidParam(e)) if e.param == "input"
        ));
    }
    // A prompt as long as the context is fine: an embedding generates nothing.
    let full = prompt(engine.model_len_max(), 60);
    assert!(engine
        .embed(embed_request(&[full], Pooling::Last, 0))
        .is_ok());
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}
