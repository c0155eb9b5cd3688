//! candela-models: see ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod batch;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod llama;
pub mod model;
pub mod safetensors;
pub mod tokenizer;

pub use batch::{BatchInputs, SeqChunk};
pub use config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
pub use error::{Error, Result};
pub use hub::ModelFiles;
pub use model::{load_files, load_model, LoadedModel, Model};
