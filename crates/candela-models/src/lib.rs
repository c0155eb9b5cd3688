//! candela-models: see ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod batch;
pub mod chat_template;
pub mod config;
pub mod decoder;
pub mod error;
pub mod export;
pub(crate) mod families;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod model;
pub mod safetensors;
pub mod tokenizer;

pub use batch::{BatchBuilder, BatchInputs, PoolChunk, SeqChunk};
pub use candela_kernels::quant::QuantBits;
pub use config::{
    Activation, Architecture, FamilySwitches, ModelConfig, RopeScaling, RopeStyle, SlidingWindow,
    WindowLayers,
};
pub use error::{Error, Result};
pub use hub::ModelFiles;
pub use linear::Quantize;
pub use model::{
    load_files, load_files_with, load_model, load_model_with, LoadOptions, LoadedModel, Model,
};
