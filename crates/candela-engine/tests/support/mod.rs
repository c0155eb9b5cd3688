//! What the engine's integration tests share: starting an engine on the default model,
//! chat prompts, greedy requests, collecting a request's events into per-choice outputs, reading the engine's
//! metrics and waiting (bounded) for it to go idle.

// Each test crate compiles this module and uses a part of it.
#![allow(dead_code)]

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candela_engine::api::{
    FinishReason, GenerateEvent, GenerateRequest, SamplingParams, TokenId, Usage,
};
use candela_engine::{EngineConfig, EngineHandle};
use tokio::sync::mpsc::UnboundedReceiver;

/// The default model (`scripts/fetch-default-model`).
pub fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// An engine on the default model with `config`'s other settings, warmed up.
pub fn start(config: EngineConfig) -> EngineHandle {
    let engine = EngineHandle::start(EngineConfig {
        model: model_path().to_string_lossy().into_owned(),
        ..config
    })
    .expect("the default model loads");
    engine
        .wait_ready(Duration::from_secs(120))
        .expect("the engine warms up");
    engine
}

/// Reads one sample of a metric from the Prometheus text.
pub fn metric(engine: &EngineHandle, name: &str) -> f64 {
    let text = engine.metrics_text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits (bounded) until the engine reports no block in use in either KV pool and nothing
/// running or waiting.
pub fn wait_until_idle(engine: &EngineHandle) {
    for _ in 0..1000 {
        if metric(engine, "candela:kv_cache_usage_perc") == 0.0
            && metric(engine, "candela:kv_window_blocks_used") == 0.0
            && metric(engine, "candela:num_requests_running") == 0.0
            && metric(engine, "candela:num_requests_waiting") == 0.0
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("blocks still in use:\n{}", engine.metrics_text());
}

/// The default chat template around one user message, tokenized.
pub fn chat_prompt(engine: &EngineHandle, user: &str) -> Vec<TokenId> {
    let text = engine
        .apply_chat_template(&[candela_engine::ChatMessage::new("user", user)], true)
        .expect("the model has a chat template");
    engine.tokenize(&text, false).expect("tokenizes")
}

/// Greedy decoding of at most `max_tokens` tokens.
pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: NonZeroU32::new(max_tokens),
        ..SamplingParams::default()
    }
}

/// A request for `n` choices of `prompt`, arriving now.
pub fn request(prompt: &[TokenId], sampling: SamplingParams, n: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: prompt.to_vec(),
        sampling,
        n: NonZeroU32::new(n).expect("n > 0"),
        priority: 0,
        arrival: Instant::now(),
    }
}

/// Everything one choice produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceOutput {
    pub token_ids: Vec<TokenId>,
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// A choice's tokens and text so far, and its end once finished.
type PartialOutput = (Vec<TokenId>, String, Option<(FinishReason, Usage)>);

/// Reads events until every one of `n` choices has finished.
pub fn collect(mut events: UnboundedReceiver<GenerateEvent>, n: usize) -> Vec<ChoiceOutput> {
    let mut outputs: Vec<PartialOutput> = vec![(Vec::new(), String::new(), None); n];
    while outputs.iter().any(|o| o.2.is_none()) {
        match events
            .blocking_recv()
            .expect("the engine finishes every choice")
        {
            GenerateEvent::Delta {
                index,
                token_ids,
                text,
                ..
            } => {
                let output = &mut outputs[index as usize];
                assert!(output.2.is_none(), "a delta after Finished");
                output.0.extend(token_ids);
                output.1.push_str(&text);
            }
            GenerateEvent::Finished {
                index,
                reason,
                usage,
                ..
            } => {
                let output = &mut outputs[index as usize];
                assert!(output.2.is_none(), "finished twice");
                assert_eq!(usage.completion_tokens as usize, output.0.len());
                output.2 = Some((reason, usage));
            }
        }
    }
    outputs
        .into_iter()
        .map(|(token_ids, text, finished)| {
            let (reason, usage) = finished.expect("loop ends when all finished");
            ChoiceOutput {
                token_ids,
                text,
                reason,
                usage,
            }
        })
        .collect()
}
