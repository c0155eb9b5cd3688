//! candela-server: the OpenAI-compatible HTTP API over a generation [`Backend`].
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses`
//! (translated onto the chat path by [`responses`]), `POST /v1/embeddings`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize` (vLLM's shapes), `GET /health`, `GET /ready`,
//! `GET /metrics`; with a data directory, the Files and Batch APIs (`/v1/files`,
//! `/v1/batches`, see [`batch`]). Streaming follows OpenAI's SSE framing exactly; every final
//! response (body or last chunk) carries a `timings` object.
//!
//! **Architecture Invariant:** this is the only crate that knows JSON or HTTP. It converts
//! OpenAI requests into the engine's `GenerateRequest` by hand ([`params`]), and talks to the
//! engine only through the [`Backend`] trait, which [`engine`] implements for `EngineHandle`.
//!
//! **Architecture Invariant:** no tokenizer or template work runs on the async runtime's core
//! threads (it goes through `spawn_blocking`), and a client that goes away aborts its
//! requests at once ([`generate::AbortGuard`]).
#![deny(missing_docs)]

pub mod app;
pub mod backend;
pub mod batch;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod extract;
pub mod generate;
pub mod openai;
pub mod params;
pub mod responses;
pub mod tools;

pub use app::{app, serve, AppState, ServerConfig, BODY_LIMIT_BYTES_DEFAULT};
pub use backend::{Backend, BackendError, EmbedStream, EventStream};
pub use candela_engine::{ChatMessage, ContentPart, MessageContent};
pub use embeddings::EmbeddingPooling;
pub use engine::EngineBackend;
pub use error::ApiError;
