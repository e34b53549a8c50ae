//! The logdist distributor: accepts packets of log messages, makes them durable in a sled
//! write-ahead log before acknowledging, and delivers every message to an analyzer chosen by
//! weight, retrying and redelivering until one acknowledges it.
//!
//! | module | role |
//! |---|---|
//! | [`wal`] | the write-ahead log: record layout, recovery, dedup index |
//! | [`commit`] | group commit: one flush shared by concurrent requests |
//! | [`http`] | the HTTP API and its error answers |
//! | [`admin`] | the admin API (analyzers, weights) and the dashboard |
//! | [`registry`] | the analyzer set, its rules, and its storage in the WAL |
//! | [`dispatch`] | window, weighted assignment, batches, redelivery, health |
//! | [`breaker`] | the per-analyzer circuit breaker |
//! | [`selector`] | smooth weighted round-robin counted in messages |
//! | [`delivery`] | one batch send with retries; the health probe |
//! | [`stats`] | counters shared with the HTTP handlers |
//! | [`server`] | wiring and graceful shutdown |

pub mod admin;
pub mod breaker;
pub mod commit;
pub mod delivery;
pub mod dispatch;
pub mod http;
pub mod registry;
pub mod selector;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod wal;

pub use server::{run, run_with, RunOptions};
