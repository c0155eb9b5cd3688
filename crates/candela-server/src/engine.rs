//! [`Backend`] for the real engine: [`EngineBackend`] wraps an `EngineHandle` that arrives
//! once the model has loaded.
//!
//! The server binds its port before the model loads (seconds), so that `/health` answers and
//! `/ready` says 503 meanwhile; until the handle is set, everything that needs the model
//! answers "not ready".

use std::sync::OnceLock;

use candela_engine::api::{
    EmbedRequest, EngineHealth, GenerateRequest, RequestId, SubmitError, TokenId, ToolCalling,
};
use candela_engine::{EngineError, EngineHandle};
use futures::StreamExt;

use candela_engine::ChatMessage;

use crate::backend::{Backend, BackendError, EmbedStream, EventStream};

/// The engine behind the HTTP API, set once it has loaded.
#[derive(Debug, Default)]
pub struct EngineBackend {
    engine: OnceLock<EngineHandle>,
}

impl EngineBackend {
    /// A backend whose engine is still loading.
    pub fn loading() -> Self {
        Self::default()
    }

    /// A backend over a started engine.
    pub fn new(engine: EngineHandle) -> Self {
        let backend = Self::default();
        backend.set(engine);
        backend
    }

    /// Hands over the loaded engine; a second call is ignored (the first engine stays).
    pub fn set(&self, engine: EngineHandle) {
        if self.engine.set(engine).is_err() {
            tracing::warn!("an engine was already set; keeping the first");
        }
    }

    /// The engine, once loaded.
    pub fn handle(&self) -> Option<&EngineHandle> {
        self.engine.get()
    }

    fn loaded(&self) -> Result<&EngineHandle, BackendError> {
        self.engine.get().ok_or(BackendError::NotReady)
    }
}

fn backend_error(e: EngineError) -> BackendError {
    match e {
        EngineError::Tokenizer(_) | EngineError::Template(_) | EngineError::NoChatTemplate => {
            BackendError::Invalid(e.to_string())
        }
        EngineError::Stopped(_) => BackendError::NotReady,
        other => BackendError::Internal(other.to_string()),
    }
}

impl Backend for EngineBackend {
    fn submit(&self, request: GenerateRequest) -> Result<(RequestId, EventStream), SubmitError> {
        let engine = self.engine.get().ok_or(SubmitError::NotReady)?;
        let (id, events) = engine.submit(request)?;
        Ok((
            id,
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).boxed(),
        ))
    }

    fn embed(&self, request: EmbedRequest) -> Result<(RequestId, EmbedStream), SubmitError> {
        let engine = self.engine.get().ok_or(SubmitError::NotReady)?;
        let (id, events) = engine.embed(request)?;
        Ok((
            id,
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).boxed(),
        ))
    }

    fn abort(&self, id: RequestId) {
        if let Some(engine) = self.engine.get() {
            engine.abort(id);
        }
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, BackendError> {
        self.loaded()?
            .tokenize(text, add_special_tokens)
            .map_err(backend_error)
    }

    fn detokenize(&self, ids: &[TokenId]) -> Result<String, BackendError> {
        self.loaded()?.detokenize(ids).map_err(backend_error)
    }

    fn token_bytes(&self, ids: &[TokenId]) -> Result<Vec<Vec<u8>>, BackendError> {
        // The raw bytes, never text decoded from them: a token holding part of a multi-byte
        // character must report that part, not the bytes of U+FFFD.
        self.loaded()?.token_bytes(ids).map_err(backend_error)
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolCalling>,
        add_generation_prompt: bool,
    ) -> Result<String, BackendError> {
        self.loaded()?
            .apply_chat_template_with_tools(messages, tools, add_generation_prompt)
            .map_err(backend_error)
    }

    fn model_len_max(&self) -> u32 {
        self.engine
            .get()
            .map_or(0, |e| u32::try_from(e.model_len_max()).unwrap_or(u32::MAX))
    }

    fn vocab_size(&self) -> u32 {
        self.engine
            .get()
            .map_or(0, |e| u32::try_from(e.vocab_size()).unwrap_or(u32::MAX))
    }

    fn is_ready(&self) -> bool {
        self.engine.get().is_some_and(EngineHandle::is_ready)
    }

    fn requests_in_flight(&self) -> usize {
        self.engine
            .get()
            .map_or(0, EngineHandle::requests_in_flight)
    }

    fn health(&self) -> EngineHealth {
        self.engine
            .get()
            .map_or(EngineHealth::Starting, EngineHandle::health)
    }

    fn metrics_text(&self) -> String {
        self.engine
            .get()
            .map(EngineHandle::metrics_text)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loading_backend_is_not_ready() {
        let b = EngineBackend::loading();
        assert!(!b.is_ready());
        assert_eq!(b.health(), EngineHealth::Starting);
        assert_eq!(b.vocab_size(), 0);
        assert!(matches!(b.tokenize("x", true), Err(BackendError::NotReady)));
        let request = GenerateRequest {
            prompt_token_ids: vec![1],
            sampling: Default::default(),
            n: std::num::NonZeroU32::MIN,
            priority: 0,
            arrival: std::time::Instant::now(),
        };
        assert!(matches!(b.submit(request), Err(SubmitError::NotReady)));
    }
}
