//! The logdist analyzer: receives batches of log messages from the distributor, processes each
//! message at most once per identity `(emitter_id, packet_id, index)`, and keeps cheap, bounded
//! statistics about them.
//!
//! The binary is thin: it loads settings, binds, and calls [`run`], which takes an already-bound
//! listener and any shutdown future so that tests (this crate's and the distributor's) can run the
//! real server on port 0 and stop it when they are done.
//!
//! Modules: `server` (the HTTP API and the order of the steps of `POST /analyze`), `state`
//! (de-duplication and statistics, no I/O), `audit_log` (the optional file that lets a killed
//! analyzer remember what it processed) and `faults` (latency and errors injected on purpose
//! through `/faults`, for fault-injection tests) and `registration` (registering with a distributor
//! at start and deregistering on a graceful stop, when `register_url` is set).

mod audit_log;
mod faults;
mod registration;
mod server;
mod state;
#[cfg(test)]
mod test_support;

pub use faults::MAX_LATENCY_MS;
pub use server::{run, MAX_BODY_BYTES};
