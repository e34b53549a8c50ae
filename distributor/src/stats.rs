//! Counters and gauges shared between the dispatcher (the only writer of analyzer state) and the
//! HTTP handlers that report them. Plain atomics: readers never wait for the dispatcher, and no lock
//! exists to be held across an `.await` (invariant 9).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use logdist_config::AnalyzerEntry;
use logdist_proto::metrics::Histogram;

/// Why `POST /logs` refused a request: the `reason` label of
/// `logdist_distributor_requests_rejected_total` (see `http::ApiError::reason`).
pub const REJECT_REASONS: [&str; 8] = [
    "unsupported_media_type",
    "payload_too_large",
    "unreadable_body",
    "body_timeout",
    "bad_packet",
    "backpressure",
    "disk_full",
    "storage",
];

/// What the distributor knows of one analyzer.
#[derive(Debug)]
pub struct AnalyzerView {
    pub id: String,
    pub endpoint: String,
    pub weight: f64,
    pub healthy: AtomicBool,
    pub consecutive_failures: AtomicU32,
    /// Messages this analyzer answered 2xx for (and that left the WAL).
    pub acknowledged_messages: AtomicU64,
    /// Messages assigned to it, waiting for a free send slot.
    pub queued_messages: AtomicU64,
    /// Messages in batches being sent to it now.
    pub in_flight_messages: AtomicU64,
    /// Batches that failed after all their retries.
    pub failed_batches: AtomicU64,
    /// Batches it refused for their content (4xx): not held against its health.
    pub rejected_batches: AtomicU64,
    /// Sends repeated after a failed attempt (each retry counts once).
    pub send_retries: AtomicU64,
    /// Duration of every send attempt to it, answered or not.
    pub send_latency: Histogram,
}

/// Process-wide counters.
#[derive(Debug)]
pub struct Shared {
    pub analyzers: Vec<AnalyzerView>,
    pub accepted_packets: AtomicU64,
    pub accepted_messages: AtomicU64,
    pub duplicate_packets: AtomicU64,
    /// Refused `POST /logs` requests by reason, indexed like [`REJECT_REASONS`].
    pub rejected_by_reason: [AtomicU64; REJECT_REASONS.len()],
    /// From a `POST /logs` request's start to its 2xx (202, or 200 for a duplicate).
    pub ack_latency: Histogram,
    /// Messages handed to the redelivery worker's choice of another analyzer.
    pub redelivered_messages: AtomicU64,
    /// Messages whose last send failed, waiting for the redelivery worker.
    pub awaiting_redelivery_messages: AtomicU64,
    /// Messages in the dispatcher's window not yet assigned (no usable analyzer).
    pub unassigned_messages: AtomicU64,
    /// Acceptance time of the oldest pending record in the window, ms since the epoch; 0 if none.
    pub oldest_accepted_at_ms: AtomicU64,
}

impl Shared {
    pub fn new(analyzers: &[AnalyzerEntry]) -> Self {
        Self {
            analyzers: analyzers
                .iter()
                .map(|a| AnalyzerView {
                    id: a.id.clone(),
                    endpoint: a.endpoint.clone(),
                    weight: a.weight,
                    healthy: AtomicBool::new(true),
                    consecutive_failures: AtomicU32::new(0),
                    acknowledged_messages: AtomicU64::new(0),
                    queued_messages: AtomicU64::new(0),
                    in_flight_messages: AtomicU64::new(0),
                    failed_batches: AtomicU64::new(0),
                    rejected_batches: AtomicU64::new(0),
                    send_retries: AtomicU64::new(0),
                    send_latency: Histogram::latency(),
                })
                .collect(),
            accepted_packets: AtomicU64::new(0),
            accepted_messages: AtomicU64::new(0),
            duplicate_packets: AtomicU64::new(0),
            rejected_by_reason: Default::default(),
            ack_latency: Histogram::latency(),
            redelivered_messages: AtomicU64::new(0),
            awaiting_redelivery_messages: AtomicU64::new(0),
            unassigned_messages: AtomicU64::new(0),
            oldest_accepted_at_ms: AtomicU64::new(0),
        }
    }

    pub fn in_flight_messages(&self) -> u64 {
        self.analyzers
            .iter()
            .map(|a| a.in_flight_messages.load(Relaxed))
            .sum()
    }

    /// Refused `POST /logs` requests, all reasons.
    pub fn rejected_requests(&self) -> u64 {
        self.rejected_by_reason
            .iter()
            .map(|n| n.load(Relaxed))
            .sum()
    }

    pub fn acknowledged_messages(&self) -> u64 {
        self.analyzers
            .iter()
            .map(|a| a.acknowledged_messages.load(Relaxed))
            .sum()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
