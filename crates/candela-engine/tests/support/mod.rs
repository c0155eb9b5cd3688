//! What the engine's integration tests share: starting an engine on the default model,
//! reading the engine's metrics and waiting (bounded) for it to go idle.

// Each test crate compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use candela_engine::{EngineConfig, EngineHandle};

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
