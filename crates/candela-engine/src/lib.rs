//! candela-engine: the step loop that owns the model and the KV cache. See ARCHITECTURE.md.
//!
//! Start an engine with [`EngineHandle::start`], submit [`api::GenerateRequest`]s, read
//! [`api::GenerateEvent`]s from the per-request channel. One dedicated thread owns the model,
//! the KV cache and the scheduler; the handle only validates, enqueues and answers tokenizer
//! and metrics questions.
#![deny(missing_docs)]

pub mod api;
mod config;
mod engine;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod handle;
mod kv_layout;
pub mod metrics;
pub mod sampler;
pub mod speculative;
pub mod stop;
mod structured;
mod text;
mod tools;

/// The one chat-message type, from the HTTP request to the chat template: parts stay parts
/// until the template decides how to render them.
pub use candela_models::chat_template::{
    ChatMessage, ContentPart, MessageContent, ToolCall, ToolFormat,
};
pub use config::{EngineConfig, EngineDevice, KvCacheDtype};
pub use error::EngineError;
pub use handle::EngineHandle;
pub use speculative::{SpeculativeConfig, SpeculativeMethod};
