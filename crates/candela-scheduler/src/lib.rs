//! candela-scheduler: see ARCHITECTURE.md.
#![deny(missing_docs)]
