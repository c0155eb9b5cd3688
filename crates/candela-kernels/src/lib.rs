//! candela-kernels: see ARCHITECTURE.md.
#![deny(missing_docs)]
