//! candela-kernels: see ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod kv_cache;
pub mod quant;

pub use attention::{paged_attention, write_kv, AttentionMetadata};
pub use error::KernelError;
pub use kv_cache::PagedKvCache;
