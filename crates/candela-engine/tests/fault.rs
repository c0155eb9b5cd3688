//! A failing engine, with faults injected into the real engine's forward pass (the
//! `fault-injection` feature; vLLM's `tests/v1/shutdown/test_forward_error.py` does the same):
//! every in-flight request ends with an error event, new ones are refused, `health()` says
//! dead; a forward pass that hangs makes `health()` say stalled while it hangs, and healthy
//! again after. Run by scripts/test with `--features fault-injection`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candela_engine::api::{
    EngineHealth, FinishReason, GenerateEvent, GenerateRequest, SamplingParams, SubmitError,
};
use candela_engine::fault::{Fault, FaultKind};
use candela_engine::{EngineConfig, EngineHandle};
use tokio::sync::mpsc::UnboundedReceiver;

/// Longest any wait in these tests may take: a test fails rather than hangs.
const WAIT_MAX: Duration = Duration::from_secs(120);

fn start(fault: Fault, step_stall_max: Duration) -> EngineHandle {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let engine = EngineHandle::start(EngineConfig {
        model: model.to_string_lossy().into_owned(),
        fault: Some(fault),
        step_stall_max,
        ..EngineConfig::default()
    })
    .expect("the default model loads");
    engine.wait_ready(WAIT_MAX).expect("the engine warms up");
    assert_eq!(engine.health(), EngineHealth::Healthy);
    engine
}

fn long_request(first_token: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: vec![first_token, 28, 33, 198],
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: NonZeroU32::new(200),
            ignore_eos: true,
            ..SamplingParams::default()
        },
        n: NonZeroU32::new(2).expect("2 > 0"),
        priority: 0,
        arrival: Instant::now(),
    }
}

/// Reads events until every choice has finished; returns each choice's reason and how many
/// tokens it got. Panics if the channel closes first or `WAIT_MAX` passes.
fn finish_reasons(
    mut events: UnboundedReceiver<GenerateEvent>,
    n: usize,
) -> Vec<(FinishReason, usize)> {
    let deadline = Instant::now() + WAIT_MAX;
    let mut tokens = vec![0; n];
    let mut reasons: Vec<Option<FinishReason>> = vec![None; n];
    while reasons.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "no Finished event within {WAIT_MAX:?}"
        );
        match events.try_recv() {
            Ok(GenerateEvent::Delta {
                index, token_ids, ..
            }) => {
                tokens[index as usize] += token_ids.len();
            }
            Ok(GenerateEvent::Finished { index, reason, .. }) => {
                reasons[index as usize] = Some(reason);
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                panic!("the channel closed before every choice finished: {reasons:?}")
            }
        }
    }
    reasons.into_iter().flatten().zip(tokens).collect()
}

fn assert_engine_failed(kind: FaultKind, words: &str) {
    let engine = start(
        Fault {
            kind,
            at_forward: 8,
        },
        Duration::from_secs(60),
    );
    // Three requests of two choices each, all in flight when the 8th forward pass fails.
    let receivers: Vec<_> = (0..3)
        .map(|i| engine.submit(long_request(100 + i)).expect("accepted").1)
        .collect();
    for events in receivers {
        for (reason, tokens) in finish_reasons(events, 2) {
            match reason {
                FinishReason::Error(message) => {
                    assert!(message.contains(words), "{message}");
                }
                other => panic!("expected an error, got {other:?} after {tokens} tokens"),
            }
            assert!(tokens < 200, "the fault did not stop generation");
        }
    }
    match engine.health() {
        EngineHealth::Dead(message) => assert!(message.contains(words), "{message}"),
        other => panic!("expected a dead engine, got {other:?}"),
    }
    assert!(!engine.is_ready());
    match engine.submit(long_request(7)) {
        Err(SubmitError::EngineDead(message)) => assert!(message.contains(words), "{message}"),
        other => panic!(
            "a dead engine accepted a request: {:?}",
            other.map(|(id, _)| id)
        ),
    }
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}

#[test]
fn a_forward_error_fails_every_request_and_the_engine() {
    assert_engine_failed(
        FaultKind::ForwardError,
        "injected fault: forward pass 8 failed",
    );
}

#[test]
fn a_forward_panic_fails_every_request_and_the_engine() {
    assert_engine_failed(FaultKind::ForwardPanic, "forward pass 8 panicked");
}

#[test]
fn a_hung_step_is_reported_stalled_and_recovers() {
    let engine = start(
        Fault {
            kind: FaultKind::ForwardStall { ms: 3_000 },
            at_forward: 3,
        },
        Duration::from_millis(500),
    );
    let (_, events) = engine.submit(long_request(50)).expect("accepted");
    let deadline = Instant::now() + WAIT_MAX;
    let stalled_ms = loop {
        assert!(Instant::now() < deadline, "never reported stalled");
        if let EngineHealth::Stalled { stalled_ms } = engine.health() {
            break stalled_ms;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(stalled_ms > 500, "{stalled_ms}");
    // The step ends; the request finishes normally and the engine is healthy again.
    for (reason, tokens) in finish_reasons(events, 2) {
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(tokens, 200);
    }
    let deadline = Instant::now() + WAIT_MAX;
    while engine.health() != EngineHealth::Healthy {
        assert!(Instant::now() < deadline, "still {:?}", engine.health());
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown(Instant::now() + Duration::from_secs(5));
}
