//! candela-models: see ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod chat_template;
pub mod tokenizer;
