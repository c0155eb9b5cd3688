//! The hybrid KV cache on a real model with sliding-window layers (Gemma 3 270M Q4_K_M, window
//! 512, every 6th layer global; fetched by `scripts/fetch-model gemma3-270m`): a sequence
//! several windows long keeps only its last window in the windowed layers' pool, and greedy
//! output equals the one-pool cache's with chunked prefill, prefix-cache hits, preemption and
//! speculative decoding (drafts verified in windowed layers, rejected ones rolled back).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candela_engine::api::{GenerateEvent, TokenId};
use candela_engine::{EngineConfig, EngineHandle, SpeculativeConfig};
use tokio::sync::mpsc::UnboundedReceiver;

mod support;
use support::{greedy, metric, request, wait_until_idle};

/// One block of one layer of Gemma 3 270M: K and V, 16 tokens, 1 KV head of 256, f16.
const LAYER_BLOCK_BYTES: u64 = 2 * 16 * 256 * 2;
/// The model's window and its windowed layers (15 of 18).
const WINDOW: usize = 512;
const WINDOWED_LAYERS: u64 = 15;
const CHUNK: usize = 256;

fn start(hybrid: bool, kv_cache_memory_bytes: u64) -> EngineHandle {
    start_with(hybrid, kv_cache_memory_bytes, None)
}

fn start_with(
    hybrid: bool,
    kv_cache_memory_bytes: u64,
    speculative: Option<SpeculativeConfig>,
) -> EngineHandle {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    let engine = EngineHandle::start(EngineConfig {
        model: model.to_string_lossy().into_owned(),
        hybrid_kv_cache: hybrid,
        kv_cache_memory_bytes,
        // Prompts longer than a window are prefilled in chunks of 256.
        batch_tokens_max: CHUNK,
        seqs_running_max: 4,
        speculative,
        ..EngineConfig::default()
    })
    .expect("Gemma 3 270M loads (scripts/fetch-model gemma3-270m)");
    engine
        .wait_ready(Duration::from_secs(120))
        .expect("the engine warms up");
    engine
}

/// A completion prompt of about `words` words, different for each `seed`.
fn prompt(engine: &EngineHandle, seed: usize, words: usize) -> Vec<TokenId> {
    const NOUNS: [&str; 8] = [
        "river", "mountain", "city", "library", "garden", "harbor", "forest", "market",
    ];
    const VERBS: [&str; 6] = ["visited", "painted", "crossed", "mapped", "praised", "left"];
    let mut text = String::from("Travel notes.");
    for i in 0..words / 6 {
        let n = NOUNS[(i * 7 + seed * 3) % NOUNS.len()];
        let v = VERBS[(i * 5 + seed) % VERBS.len()];
        text.push_str(&format!(" On day {i} we {v} the {n} again."));
    }
    engine.tokenize(&text, true).expect("tokenizes")
}

/// The tokens of one choice; `during` runs once, after the first delta.
fn tokens(mut events: UnboundedReceiver<GenerateEvent>, mut during: impl FnMut()) -> Vec<TokenId> {
    let mut out = Vec::new();
    loop {
        match events
            .blocking_recv()
            .expect("the engine finishes the choice")
        {
            GenerateEvent::Delta { token_ids, .. } => {
                if out.is_empty() {
                    during();
                }
                out.extend(token_ids);
            }
            GenerateEvent::Finished { .. } => return out,
        }
    }
}

fn generate(engine: &EngineHandle, prompt: &[TokenId], max_tokens: u32) -> Vec<TokenId> {
    tokens(
        engine
            .submit(request(prompt, greedy(max_tokens), 1))
            .expect("accepted")
            .1,
        || {},
    )
}

#[test]
fn a_long_gemma_sequence_keeps_only_its_window_and_the_same_output() {
    let one_pool = start(false, 64 << 20);
    let hybrid = start(true, 64 << 20);
    assert_eq!(metric(&one_pool, "candela:kv_window_blocks_total"), 0.0);
    assert!(metric(&hybrid, "candela:kv_window_blocks_total") > 0.0);

    // About three and a half windows of prompt.
    let long = prompt(&hybrid, 0, 1300);
    assert!(long.len() > 3 * WINDOW, "{} tokens", long.len());
    let expected = generate(&one_pool, &long, 24);
    let mut window_used = 0.0;
    let got = tokens(
        hybrid
            .submit(request(&long, greedy(24), 1))
            .expect("accepted")
            .1,
        || {
            window_used = metric(&hybrid, "candela:kv_window_blocks_used");
        },
    );
    assert_eq!(got, expected, "hybrid cache changed the greedy output");
    // While decoding, the windowed layers hold their last window (32 blocks, one more when
    // it straddles a block), not the prompt's ~100 blocks the global layers hold.
    let prompt_blocks = long.len().div_ceil(16) as f64;
    assert!(window_used > 0.0);
    assert!(
        window_used <= (WINDOW / 16 + 2) as f64,
        "{window_used} window blocks held for a {prompt_blocks}-block prompt"
    );

    // The same prompt again: a prefix-cache hit, whose last window comes from the window pool.
    let hits_before = metric(&hybrid, "candela:prefix_cache_hits_total");
    assert_eq!(generate(&hybrid, &long, 24), expected);
    assert!(metric(&hybrid, "candela:prefix_cache_hits_total") > hits_before);
    wait_until_idle(&hybrid);
    for engine in [one_pool, hybrid] {
        engine.shutdown(Instant::now() + Duration::from_secs(5));
    }
}

#[test]
fn a_small_window_pool_preempts_and_keeps_every_output() {
    // Three prompts of about 700 tokens at once. The window pool gets half of the budget:
    // 60 blocks, while each sequence needs up to (256 + 511) / 16 + 2 = 50 in a prefill chunk,
    // so the window pool, not the global one (~300 blocks), forces preemptions.
    let budget = 2 * 60 * WINDOWED_LAYERS * LAYER_BLOCK_BYTES;
    let one_pool = start(false, 64 << 20);
    let hybrid = start(true, budget);
    assert_eq!(metric(&hybrid, "candela:kv_window_blocks_total"), 60.0);
    let prompts: Vec<Vec<TokenId>> = (1..=3).map(|seed| prompt(&hybrid, seed, 500)).collect();
    let expected: Vec<Vec<TokenId>> = prompts.iter().map(|p| generate(&one_pool, p, 16)).collect();
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            hybrid
                .submit(request(p, greedy(16), 1))
                .expect("accepted")
                .1
        })
        .collect();
    for (i, (events, expected)) in receivers.into_iter().zip(&expected).enumerate() {
        assert_eq!(&tokens(events, || {}), expected, "prompt {i}");
    }
    assert!(metric(&hybrid, "candela:num_preemptions_total") > 0.0);
    wait_until_idle(&hybrid);
    for engine in [one_pool, hybrid] {
        engine.shutdown(Instant::now() + Duration::from_secs(5));
    }
}

#[test]
fn speculative_decoding_keeps_the_output_across_the_window() {
    // Repetitive notes, so n-gram lookup drafts. One prompt ends just before the window's
    // length, so the reply's drafts are verified while the window starts to slide; the other
    // is two and a half windows long. Rejected drafts' KV is written and overwritten in the
    // windowed layers' pool.
    let spec_config = SpeculativeConfig {
        num_speculative_tokens: 6,
        ngram_min: 1,
        ..SpeculativeConfig::default()
    };
    let plain = start(true, 64 << 20);
    let spec = start_with(true, 64 << 20, Some(spec_config));
    for (seed, words) in [(4, 265), (5, 700)] {
        let long = prompt(&spec, seed, words);
        assert!(long.len() + 48 > WINDOW, "{} tokens", long.len());
        let expected = generate(&plain, &long, 48);
        assert_eq!(
            generate(&spec, &long, 48),
            expected,
            "speculation changed the greedy output ({} prompt tokens)",
            long.len()
        );
    }
    let drafted = metric(&spec, "candela:spec_decode_num_draft_tokens_total");
    let accepted = metric(&spec, "candela:spec_decode_num_accepted_tokens_total");
    assert!(accepted > 0.0, "no draft accepted ({drafted} drafted)");
    assert!(
        accepted < drafted,
        "every draft accepted: rollback not exercised"
    );
    wait_until_idle(&spec);
    for engine in [plain, spec] {
        engine.shutdown(Instant::now() + Duration::from_secs(5));
    }
}
