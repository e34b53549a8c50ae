//! Many packets through one [`DistributorClient`], with a bound on concurrency, every outcome
//! recorded in the [`Ledger`].
//!
//! Why it exists: `POST /generate` and `emitter send` both push a known number of packets and need
//! a summary; continuous generation pushes an open-ended stream. All of them must record a packet's
//! final outcome exactly once (sent, then acknowledged or failed), or the acknowledged log, which
//! delivery verification trusts, would be wrong.
//!
//! Packets are produced lazily from an iterator, so sending a million of them holds only
//! `concurrency` packets in memory.

use crate::client::{Ack, DistributorClient, SendError};
use crate::generate::OutPacket;
use crate::ledger::Ledger;
use futures_util::StreamExt;
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// Record `packet` as sent, then send it until acknowledged (or the deadline), recording the
/// outcome in the ledger.
pub async fn send_one(
    client: &DistributorClient,
    ledger: &Ledger,
    packet: &OutPacket,
    deadline: Option<Instant>,
) -> Result<Ack, SendError> {
    ledger.record_sent(packet.messages.len() as u32);
    send_recorded(client, ledger, packet, deadline).await
}

/// Like [`send_one`] for a packet the caller already passed to `Ledger::record_sent` (so the
/// count is right the moment the packet is handed out, before its task first runs).
pub async fn send_recorded(
    client: &DistributorClient,
    ledger: &Ledger,
    packet: &OutPacket,
    deadline: Option<Instant>,
) -> Result<Ack, SendError> {
    let count = packet.messages.len() as u32;
    let outcome = client.send_until_acknowledged(packet, deadline).await;
    match &outcome {
        Ok(ack) => {
            // The log records what was sent: messages `0..count` of this packet.
            ledger.record_acknowledged(&packet.emitter_id, &packet.packet_id, count, ack.duplicate)
        }
        Err(SendError::DeadlineExceeded { .. }) => ledger.record_deadline_failure(),
        Err(SendError::Rejected { .. } | SendError::InvalidRequest(_)) => {
            ledger.record_permanent_failure()
        }
    }
    if let Err(e) = &outcome {
        tracing::warn!(
            emitter_id = %packet.emitter_id,
            packet_id = %packet.packet_id,
            error = %e,
            "packet not acknowledged"
        );
    }
    outcome
}

/// What a finite send achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SendSummary {
    pub packets: u64,
    pub messages: u64,
    pub acknowledged_packets: u64,
    pub acknowledged_messages: u64,
    pub duplicate_acks: u64,
    pub elapsed_ms: u64,
    /// Packets not acknowledged (refused, or past their deadline).
    pub failed: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Send every packet of `packets`, at most `concurrency` at a time, each until acknowledged or
/// until `per_packet_deadline` after its first try started (`None`: for ever).
pub async fn send_all<I>(
    client: &DistributorClient,
    ledger: &Ledger,
    packets: I,
    concurrency: usize,
    per_packet_deadline: Option<Duration>,
) -> SendSummary
where
    I: IntoIterator<Item = OutPacket>,
{
    let started = Instant::now();
    let mut summary = SendSummary::default();
    let mut outcomes = futures_util::stream::iter(packets)
        .map(|packet| async move {
            let deadline = per_packet_deadline.map(|d| Instant::now() + d);
            let outcome = send_one(client, ledger, &packet, deadline).await;
            (packet.messages.len() as u64, outcome)
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((messages, outcome)) = outcomes.next().await {
        summary.packets += 1;
        summary.messages += messages;
        match outcome {
            Ok(ack) => {
                summary.acknowledged_packets += 1;
                summary.acknowledged_messages += messages;
                summary.duplicate_acks += u64::from(ack.duplicate);
            }
            Err(e) => {
                summary.failed += 1;
                summary.error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    summary
}
