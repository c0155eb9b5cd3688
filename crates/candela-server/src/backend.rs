//! The one seam between HTTP and generation: the [`Backend`] trait.
//!
//! The handlers need a handful of things from whatever generates tokens (submit, abort,
//! tokenize, render a chat template, readiness, metrics). Keeping them behind a trait lets the
//! route tests run against a small deterministic fake, while `candela serve` plugs in the real
//! engine (see [`crate::engine`]).
//!
//! **API Boundary:** everything here speaks the engine's plain types (`GenerateRequest`,
//! `GenerateEvent`, `TokenId`); no JSON crosses this trait.
//!
//! The tokenizer methods are synchronous and may take milliseconds on long inputs: handlers
//! call them through `tokio::task::spawn_blocking`, never on the runtime's core threads.

use candela_engine::api::{
    EmbedEvent, EmbedRequest, EngineHealth, GenerateEvent, GenerateRequest, RequestId, SubmitError,
    TokenId, ToolCalling,
};
use candela_engine::ChatMessage;
use futures::stream::BoxStream;

/// The events of one submitted request, in order; the stream ends after the last
/// `Finished` event (or early when the backend dropped the request).
pub type EventStream = BoxStream<'static, GenerateEvent>;

/// The events of one embedding request: one per input, in the order they finish; the stream
/// ends after the last (or early when the backend dropped the request).
pub type EmbedStream = BoxStream<'static, EmbedEvent>;

/// A failure of a tokenizer or template call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The input cannot be processed as given (a template raised, a token id is unknown):
    /// the client's fault, answered with 400.
    #[error("{0}")]
    Invalid(String),
    /// The model is not loaded yet, or the engine has stopped: answered with 503.
    #[error("the model is not ready")]
    NotReady,
    /// Something broke inside the backend: answered with a generic 500 and logged.
    #[error("{0}")]
    Internal(String),
}

/// What the HTTP handlers need from a generation engine.
pub trait Backend: Send + Sync + 'static {
    /// Submits a request; its events arrive on the returned stream.
    fn submit(&self, request: GenerateRequest) -> Result<(RequestId, EventStream), SubmitError>;

    /// Submits an embedding request; one event per input arrives on the returned stream.
    /// Dropping the stream aborts it. A backend without embeddings refuses every request
    /// (the default).
    fn embed(&self, request: EmbedRequest) -> Result<(RequestId, EmbedStream), SubmitError> {
        let _ = request;
        Err(SubmitError::Invalid(
            "this backend computes no embeddings".into(),
        ))
    }

    /// Aborts a request (client gone): its KV blocks are freed at once. Aborting a request
    /// that already finished does nothing.
    fn abort(&self, id: RequestId);

    /// Tokenizes `text`; `add_special_tokens` adds the model's BOS (if it has one). Special
    /// tokens written in the text (`<|im_start|>`) are parsed as such.
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, BackendError>;

    /// Decodes token ids to text, special tokens included.
    fn detokenize(&self, ids: &[TokenId]) -> Result<String, BackendError>;

    /// The raw bytes of each token on its own (for logprobs: `token` and `bytes`). A byte-level
    /// token may hold an incomplete UTF-8 sequence.
    fn token_bytes(&self, ids: &[TokenId]) -> Result<Vec<Vec<u8>>, BackendError>;

    /// Renders the model's chat template over `messages`, with the request's `tools`.
    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolCalling>,
        add_generation_prompt: bool,
    ) -> Result<String, BackendError>;

    /// The model's context length in tokens (prompt plus output).
    fn model_len_max(&self) -> u32;

    /// Number of token ids in the vocabulary; valid ids are `0..vocab_size`.
    fn vocab_size(&self) -> u32;

    /// True once the model is loaded and warmed up, and until shutdown begins.
    fn is_ready(&self) -> bool;

    /// Whether the engine can serve (`/health`): starting, healthy, draining, stalled or
    /// dead. Cheap: a few atomic loads.
    fn health(&self) -> EngineHealth;

    /// Requests submitted and not yet finished (waiting or running): the drain on shutdown
    /// waits for this to reach 0.
    fn requests_in_flight(&self) -> usize;

    /// Prometheus text exposition of the engine's metrics.
    fn metrics_text(&self) -> String;
}
