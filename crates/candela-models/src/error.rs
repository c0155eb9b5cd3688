//! The error type of model loading and the forward pass.
//!
//! Loading reads user-supplied files and ids, so every way they can be wrong
//! (missing, truncated, another architecture, a tensor type we cannot run) is
//! a variant a caller can match on, never a panic.

use std::path::PathBuf;

/// Errors of candela-models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a file or directory at that path, nor a model id in the local Hugging Face cache.
    #[error("model not found: `{spec}` is not a file or directory, and not a model id in the Hugging Face cache at {}", cache.display())]
    ModelNotFound {
        /// What the user asked for (a path or a model id).
        spec: String,
        /// The hub cache directory that was searched.
        cache: PathBuf,
    },
    /// A directory or hub snapshot that holds no loadable weights.
    #[error("no model weights in {}: expected config.json with *.safetensors, or one *.gguf file ({reason})", dir.display())]
    NoWeights {
        /// The directory searched.
        dir: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// An I/O error on a model file.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a GGUF file candle can parse (bad magic, corrupt header, unknown tensor type id).
    #[error("invalid GGUF file {}: {reason}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// candle's message.
        reason: String,
    },
    /// The file ends before the data its header declares.
    #[error("truncated model file {}: tensor `{tensor}` ends at byte {needed_bytes}, the file has {file_bytes}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The first tensor found past the end.
        tensor: String,
        /// Bytes the tensor needs the file to have.
        needed_bytes: u64,
        /// Bytes the file has.
        file_bytes: u64,
    },
    /// A metadata key (GGUF) or config field (config.json) the model needs is absent.
    #[error("missing metadata key `{key}`")]
    MissingMetadata {
        /// The key.
        key: String,
    },
    /// A metadata key or config field holds a value of the wrong type or out of range.
    #[error("invalid metadata `{key}`: {reason}")]
    InvalidMetadata {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The model's architecture is not one we implement.
    #[error("unsupported architecture `{name}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The architecture the file names.
        name: String,
        /// The names we serve, from the family registry.
        supported: String,
    },
    /// A model feature we do not implement (for example a rope scaling type).
    #[error("unsupported model feature: {0}")]
    UnsupportedFeature(String),
    /// A tensor stored in a type we cannot use for its role.
    #[error("tensor `{name}` has unsupported type {dtype}")]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// Its stored type.
        dtype: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// The tensor.
        name: String,
    },
    /// A tensor whose shape disagrees with the model's configuration.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The stored shape.
        got: Vec<usize>,
    },
    /// config.json is not valid JSON or does not have the expected fields.
    #[error("invalid config.json at {}: {reason}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Inconsistent batch inputs (lengths, positions, block tables).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// An error from candle (tensor ops, kernels).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A tokenizer that cannot be built or written.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

/// Result of candela-models.
pub type Result<T> = std::result::Result<T, Error>;
