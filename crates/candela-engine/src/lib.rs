//! candela-engine: the step loop that owns the model and the KV cache. See ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod api;
