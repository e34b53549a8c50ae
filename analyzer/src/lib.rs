//! The logdist analyzer: receives batches of log messages from the distributor, processes each
//! message at most once per identity `(emitter_id, packet_id, index)`, and keeps cheap, bounded
//! statistics about them.
//!
//! The binary is thin: it loads settings, binds, and calls [`run`], which takes an already-bound
//! listener and any shutdown future so that tests (this crate's and the distributor's) can run the
//! real server on port 0 and stop it when they are done.

mod server;
mod state;

pub use server::{run, MAX_BODY_BYTES};
