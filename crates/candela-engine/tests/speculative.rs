//! Speculative decoding (n-gram lookup) through the real engine and the default model: greedy
//! output token for token equal to decoding without it (single requests at many `max_tokens`,
//! a batch, parallel choices, a tiny cache that preempts, a prefix-cache hit on blocks whose
//! KV was written while drafts were verified), drafts actually accepted on prompts the model
//! copies, `max_tokens` and stop strings exact, and no speculation for choices that want
//! logprobs or a structured output.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candela_engine::api::{
    FinishReason, GenerateRequest, OutputConstraint, SamplingParams, StopCause, TokenId,
};
use candela_engine::{EngineConfig, EngineHandle, SpeculativeConfig};

mod support;
use support::{
    chat_prompt, collect, greedy, metric, request, start, wait_until_idle, ChoiceOutput,
};

/// Bytes of one KV block of the default model (see tests/engine.rs).
const BLOCK_BYTES: u64 = 2 * 30 * 16 * 3 * 64 * 2;

/// Prompts the model copies from (drafts accepted) and one it does not.
const PROMPTS: [&str; 4] = [
    "Repeat exactly, word for word: The quick brown fox jumps over the lazy dog. The quick \
     brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Copy this Python function exactly:\n```python\ndef factorial(n):\n    if n == 0:\n        \
     return 1\n    return n * factorial(n - 1)\n```",
    "What is the capital of France?",
    "Rewrite this list with one item per line: apple, banana, cherry, date, elderberry, fig, \
     grape, apple, banana, cherry.",
];

fn speculative(k: u32, ngram_min: u32) -> Option<SpeculativeConfig> {
    Some(SpeculativeConfig {
        num_speculative_tokens: k,
        ngram_min,
        ..SpeculativeConfig::default()
    })
}

/// The engine without speculation, shared by the tests (nothing engine-wide is read from it).
fn plain_engine() -> &'static EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE.get_or_init(|| start(EngineConfig::default()))
}

fn generate_all(engine: &EngineHandle, requests: Vec<GenerateRequest>) -> Vec<Vec<ChoiceOutput>> {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let n = r.n.get() as usize;
            (engine.submit(r).expect("accepted").1, n)
        })
        .collect();
    receivers
        .into_iter()
        .map(|(events, n)| collect(events, n))
        .collect()
}

fn generate(engine: &EngineHandle, request: GenerateRequest) -> Vec<ChoiceOutput> {
    generate_all(engine, vec![request]).remove(0)
}

fn accepted_tokens(engine: &EngineHandle) -> f64 {
    metric(engine, "candela:spec_decode_num_accepted_tokens_total")
}

/// Same tokens, text and finish reason (usage differs only in cached tokens).
fn assert_same(got: &ChoiceOutput, want: &ChoiceOutput, what: &str) {
    assert_eq!(got.token_ids, want.token_ids, "{what}");
    assert_eq!(got.text, want.text, "{what}");
    assert_eq!(got.reason, want.reason, "{what}");
    assert_eq!(got.usage.completion_tokens, want.usage.completion_tokens);
}

#[test]
fn greedy_output_is_identical_with_and_without_speculation() {
    let plain = plain_engine();
    // The host path too: every row's logits sampled on the host, not the device's argmax.
    for greedy_on_device in [None, Some(false)] {
        let spec = start(EngineConfig {
            speculative: speculative(5, 1),
            greedy_on_device,
            ..EngineConfig::default()
        });
        let prompts: Vec<Vec<TokenId>> = PROMPTS.iter().map(|p| chat_prompt(plain, p)).collect();
        for max_tokens in [1, 2, 3, 5, 17, 80] {
            for (i, prompt) in prompts.iter().enumerate() {
                let want = generate(plain, request(prompt, greedy(max_tokens), 1)).remove(0);
                let got = generate(&spec, request(prompt, greedy(max_tokens), 1)).remove(0);
                assert_same(&got, &want, &format!("prompt {i}, max_tokens {max_tokens}"));
                assert!(got.token_ids.len() <= max_tokens as usize);
            }
        }
        // A batch of all prompts, twice each, with two choices for one of them.
        let requests = |engine: &EngineHandle| {
            let mut all: Vec<GenerateRequest> = prompts
                .iter()
                .chain(&prompts)
                .map(|p| request(p, greedy(96), 1))
                .collect();
            all.push(request(&prompts[1], greedy(64), 2));
            generate_all(engine, all)
        };
        let want = requests(plain);
        let got = requests(&spec);
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            for (c, (got, want)) in got.iter().zip(want).enumerate() {
                assert_same(got, want, &format!("batch request {i} choice {c}"));
            }
        }
        let drafts = metric(&spec, "candela:spec_decode_num_draft_tokens_total");
        let accepted = accepted_tokens(&spec);
        assert!(accepted > 0.0, "no draft accepted on copying prompts");
        assert!(accepted <= drafts);
        let per_pos = spec
            .metrics_text()
            .contains("candela:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}");
        assert!(per_pos, "{}", spec.metrics_text());
        assert!(spec
            .metrics_text()
            .contains("vllm:spec_decode_num_accepted_tokens_total"));
        wait_until_idle(&spec);
        spec.shutdown(Instant::now() + Duration::from_secs(5));
    }
}

#[test]
fn preemption_and_prefix_hits_keep_greedy_output() {
    let plain = plain_engine();
    let prompts: Vec<Vec<TokenId>> = PROMPTS.iter().map(|p| chat_prompt(plain, p)).collect();
    // 14 blocks of 16 tokens: four requests of ~5-7 blocks each must preempt.
    let spec = start(EngineConfig {
        speculative: speculative(4, 1),
        kv_cache_memory_bytes: 14 * BLOCK_BYTES,
        ..EngineConfig::default()
    });
    let all = |engine: &EngineHandle| {
        generate_all(
            engine,
            prompts.iter().map(|p| request(p, greedy(48), 1)).collect(),
        )
    };
    let want = all(plain);
    let got = all(&spec);
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_same(&got[0], &want[0], &format!("prompt {i} in a tiny cache"));
    }
    assert!(metric(&spec, "candela:num_preemptions_total") > 0.0);
    assert!(accepted_tokens(&spec) > 0.0);
    wait_until_idle(&spec);

    // The first prompt's output blocks were registered after verification steps: a prompt
    // that continues it starts from them, so their KV must be exactly the accepted tokens'.
    let first = generate(&spec, request(&prompts[0], greedy(64), 1)).remove(0);
    let mut continued = prompts[0].clone();
    continued.extend_from_slice(&first.token_ids[..48.min(first.token_ids.len())]);
    let got = generate(&spec, request(&continued, greedy(24), 1)).remove(0);
    let want = generate(plain, request(&continued, greedy(24), 1)).remove(0);
    assert_same(&got, &want, "a continuation from the prefix cache");
    assert!(
        got.usage.cached_prompt_tokens as usize > prompts[0].len(),
        "the hit reaches into the speculatively written output: {:?}",
        got.usage
    );
    wait_until_idle(&spec);
    spec.shutdown(Instant::now() + Duration::from_secs(5));
}

#[test]
fn max_tokens_stop_strings_and_excluded_choices() {
    let plain = plain_engine();
    let spec = start(EngineConfig {
        speculative: speculative(8, 1),
        ..EngineConfig::default()
    });
    let prompt = chat_prompt(plain, PROMPTS[0]);
    // Every max_tokens up to well past a few verification steps ends exactly there.
    for max_tokens in 1..=24 {
        let got = generate(&spec, request(&prompt, greedy(max_tokens), 1)).remove(0);
        let want = generate(plain, request(&prompt, greedy(max_tokens), 1)).remove(0);
        assert_same(&got, &want, &format!("max_tokens {max_tokens}"));
    }
    assert!(accepted_tokens(&spec) > 0.0);

    // Stop strings taken from the output itself, so they occur inside accepted drafts.
    let full = generate(plain, request(&prompt, greedy(64), 1)).remove(0);
    for stop in ["lazy dog. The", "fox jumps", "brown"] {
        assert!(full.text.contains(stop), "{:?}", full.text);
        let sampling = SamplingParams {
            stop: vec![stop.to_owned()],
            ..greedy(64)
        };
        let got = generate(&spec, request(&prompt, sampling.clone(), 1)).remove(0);
        let want = generate(plain, request(&prompt, sampling, 1)).remove(0);
        assert_same(&got, &want, &format!("stop {stop:?}"));
        assert_eq!(
            got.reason,
            FinishReason::Stop(StopCause::StopString(stop.to_owned()))
        );
        assert!(!got.text.contains(stop));
    }

    // Logprobs and structured outputs decode without drafts: nothing more is drafted.
    let drafted = metric(&spec, "candela:spec_decode_num_draft_tokens_total");
    let with_logprobs = SamplingParams {
        logprobs: Some(2),
        ..greedy(32)
    };
    let got = generate(&spec, request(&prompt, with_logprobs.clone(), 1)).remove(0);
    let want = generate(plain, request(&prompt, with_logprobs, 1)).remove(0);
    assert_same(&got, &want, "with logprobs");
    let choice = SamplingParams {
        constraint: Some(OutputConstraint::Choice(vec![
            "The quick brown fox jumps over the lazy dog.".into(),
            "No".into(),
        ])),
        ..greedy(32)
    };
    let got = generate(&spec, request(&prompt, choice.clone(), 1)).remove(0);
    let want = generate(plain, request(&prompt, choice, 1)).remove(0);
    assert_same(&got, &want, "a structured output");
    assert_eq!(
        metric(&spec, "candela:spec_decode_num_draft_tokens_total"),
        drafted,
        "a logprobs or structured choice was given drafts"
    );

    // Seeded sampling with speculation: reproducible, within max_tokens.
    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(7),
        ..greedy(48)
    };
    let a = generate(&spec, request(&prompt, seeded.clone(), 2));
    let b = generate(&spec, request(&prompt, seeded, 2));
    assert_eq!(a, b);
    assert!(a.iter().all(|o| o.token_ids.len() <= 48));
    wait_until_idle(&spec);
    spec.shutdown(Instant::now() + Duration::from_secs(5));
}
