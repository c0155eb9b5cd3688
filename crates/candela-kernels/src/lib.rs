//! candela-kernels: see ARCHITECTURE.md.
#![deny(missing_docs)]

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fused;
pub mod kv_cache;
pub mod norm;
pub mod quant;
pub mod sampling;
pub mod team;

pub use attention::{paged_attention, paged_attention_windowed, write_kv, AttentionMetadata};
pub use error::KernelError;
pub use fused::{gelu_tanh_mul, rope_qkv, silu_mul, RopeStyle};
pub use kv_cache::PagedKvCache;
pub use norm::add_rms_norm;
