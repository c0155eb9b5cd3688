//! The OpenAI Batch API over HTTP (`/v1/files`, `/v1/batches`), and the Batch JSONL runner
//! that `candela batch` shares with it: one implementation of the format, the resume by
//! custom_id and the dispatch through the server's own routes.
//!
//! - [`jsonl`]: the file format (input lines, output and error records) and the synced,
//!   resumable results file.
//! - [`runner`]: sends requests through the router with `oneshot`, a bounded number in
//!   flight, at a priority below interactive requests.
//! - [`objects`]: the File and Batch objects, as answered and as stored.
//! - [`store`]: the data directory on disk, crash-safe.
//! - [`service`]: the files and batches clients see, and the API over them.
//! - `task`: the life of one batch (the task that runs it, its end, its restart).
//! - [`routes`]: the HTTP handlers.
//!
//! **Architecture Invariant:** a batch line is answered by exactly the code that answers the
//! same request over HTTP (the router), and its record is synced to disk before it counts as
//! answered; a restarted server skips the custom_ids already recorded, so every line is
//! answered exactly once across crashes.
//!
//! **Architecture Invariant:** batch requests run at [`runner::BATCH_PRIORITY`] (below every
//! interactive request) and at most `in_flight_max` at a time over all batches, so the
//! engine's other running slots and its waiting queue stay open to interactive traffic.

pub mod jsonl;
pub mod objects;
pub mod routes;
pub mod runner;
pub mod service;
pub mod store;
mod task;

pub use service::{BatchConfig, BatchService, FILE_BYTES_MAX_DEFAULT};
