//! The engine's error type: what can go wrong starting an engine or using its tokenizer and
//! chat template. Request-level failures travel as [`crate::api::SubmitError`] (at submit) or
//! [`crate::api::FinishReason::Error`] (while running), never as this type.

/// Errors of candela-engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is inconsistent (zero budgets, a KV budget too small for one block).
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// Loading the model, its tokenizer or its chat template failed.
    #[error("loading the model: {0}")]
    Load(String),
    /// The warm-up step failed, so the engine never became ready.
    #[error("warm-up failed: {0}")]
    Warmup(String),
    /// The input cannot be tokenized or decoded (for example a token id outside the vocabulary).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template raised or could not be rendered (a client error: bad roles or content).
    #[error("chat template: {0}")]
    Template(String),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The engine thread is gone (it failed or was shut down).
    #[error("the engine thread has stopped: {0}")]
    Stopped(String),
    /// Waiting for readiness timed out.
    #[error("the engine did not become ready within {timeout_ms} ms")]
    ReadyTimeout {
        /// How long we waited.
        timeout_ms: u64,
    },
}
