//! The emitter of logdist: generates log packets, sends each until the distributor acknowledges
//! it (an acknowledgement means durable), remembers what was acknowledged, and checks from the
//! outside that every acknowledged message reached an analyzer and that analyzers got their
//! weighted shares.
//!
//! Modules, one per role:
//! * [`generate`]: synthetic packets with ids unique across restarts;
//! * [`client`]: one packet to the distributor, retried until acknowledged;
//! * [`sender`]: many packets with bounded concurrency, outcomes recorded in the ledger;
//! * [`ledger`]: counters and the bounded log of acknowledged packets;
//! * [`progress`]: the progress bar of `emitter send`;
//! * [`server`]: the HTTP API (`/generate`, `/start`, `/stop`, `/stats`, `/acknowledged`);
//! * [`verify`]: delivery and weight checks, pure functions plus thin fetch wrappers;
//! * [`crashtest`]: the fault-injection suite (`emitter crash-test`);
//! * [`bench`]: the load generator (`emitter bench`).

pub mod bench;
pub mod client;
pub mod crashtest;
pub mod generate;
pub mod ledger;
pub mod progress;
pub mod sender;
pub mod server;
pub mod verify;

pub use client::{Ack, DistributorClient, SendError};
pub use generate::{Generator, OutMessage, OutPacket};
pub use ledger::{AcknowledgedPacket, Ledger, LedgerSnapshot};
pub use server::run;
pub use verify::{verify_delivery, verify_weights, DeliveryReport, WeightsReport};

/// An error and its causes on one line: reqwest's own message ("error sending request") does not
/// say why; the chain does ("... Connection refused").
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
