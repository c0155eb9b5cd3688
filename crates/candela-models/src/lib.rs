//! candela-models: see ARCHITECTURE.md.
#![deny(missing_docs)]
