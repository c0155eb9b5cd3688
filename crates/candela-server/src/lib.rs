//! candela-server: see ARCHITECTURE.md.
#![deny(missing_docs)]
