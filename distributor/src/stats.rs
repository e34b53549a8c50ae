//! Counters and gauges shared between the dispatcher (the only writer of analyzer state) and the
//! HTTP handlers that report them. Plain atomics: readers never wait for the dispatcher, and no lock
//! exists to be held across an `.await` (invariant 9).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use logdist_proto::metrics::Histogram;
use tokio::sync::watch;

use crate::breaker::STATE_NAMES;
use crate::registry::AnalyzerSpec;

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

/// What the distributor knows of one analyzer. The dispatcher writes it; the HTTP handlers read it.
/// It lives as long as the analyzer is registered (its counters restart if it is registered anew).
#[derive(Debug)]
pub struct AnalyzerView {
    pub id: String,
    /// Its settings (weight, endpoint, ...), replaced by the dispatcher on an admin change. The
    /// lock is held only to copy or replace the value.
    spec: RwLock<AnalyzerSpec>,
    /// Its breaker's state, as `breaker::State::code` (0 closed, 1 open, 2 half-open).
    pub breaker: AtomicU8,
    /// While the breaker is open: when it goes half-open, ms since the epoch (0 otherwise).
    pub half_open_at_ms: AtomicU64,
    /// Removed from the registry; it leaves once nothing is in flight to it.
    pub draining: AtomicBool,
    /// Failed batches and probes since its last success.
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

impl AnalyzerView {
    pub fn new(spec: AnalyzerSpec) -> Self {
        Self {
            id: spec.id.clone(),
            spec: RwLock::new(spec),
            breaker: AtomicU8::new(0),
            half_open_at_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            acknowledged_messages: AtomicU64::new(0),
            queued_messages: AtomicU64::new(0),
            in_flight_messages: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            rejected_batches: AtomicU64::new(0),
            send_retries: AtomicU64::new(0),
            send_latency: Histogram::latency(),
        }
    }

    pub fn spec(&self) -> AnalyzerSpec {
        self.spec
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_spec(&self, spec: AnalyzerSpec) {
        *self.spec.write().unwrap_or_else(PoisonError::into_inner) = spec;
    }

    pub fn weight(&self) -> f64 {
        self.spec
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .weight
    }

    /// `closed`, `open` or `half_open`.
    pub fn breaker_state(&self) -> &'static str {
        STATE_NAMES
            .get(usize::from(self.breaker.load(Relaxed)))
            .copied()
            .unwrap_or("closed")
    }

    /// Its breaker lets traffic through (closed or half-open).
    pub fn healthy(&self) -> bool {
        self.breaker_state() != "open"
    }

    /// It gets new messages now: healthy, enabled, weighted and not draining.
    pub fn gets_traffic(&self) -> bool {
        let spec = self.spec.read().unwrap_or_else(PoisonError::into_inner);
        spec.enabled && spec.weight > 0.0 && self.healthy() && !self.draining.load(Relaxed)
    }
}

/// The registered analyzers, as last published by the dispatcher (registration order, then the
/// ones draining).
pub type Views = Arc<Vec<Arc<AnalyzerView>>>;

/// Process-wide counters.
#[derive(Debug)]
pub struct Shared {
    analyzers: watch::Sender<Views>,
    /// Messages acknowledged by analyzers since removed (so totals do not drop on a removal).
    pub removed_acknowledged_messages: AtomicU64,
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

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    /// No analyzers until the dispatcher publishes them.
    pub fn new() -> Self {
        Self {
            analyzers: watch::Sender::new(Arc::new(Vec::new())),
            removed_acknowledged_messages: AtomicU64::new(0),
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

    /// The registered analyzers now (a snapshot; it does not change under the caller).
    pub fn analyzers(&self) -> Views {
        self.analyzers.borrow().clone()
    }

    /// Replace the list (the dispatcher, after a registry change or a removal).
    pub fn publish_analyzers(&self, views: Vec<Arc<AnalyzerView>>) {
        self.analyzers.send_replace(Arc::new(views));
    }

    /// Wakes on every [`Shared::publish_analyzers`].
    pub fn watch_analyzers(&self) -> watch::Receiver<Views> {
        self.analyzers.subscribe()
    }

    pub fn in_flight_messages(&self) -> u64 {
        self.analyzers()
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

    /// Acknowledged by any analyzer, removed ones included.
    pub fn acknowledged_messages(&self) -> u64 {
        self.analyzers()
            .iter()
            .map(|a| a.acknowledged_messages.load(Relaxed))
            .sum::<u64>()
            + self.removed_acknowledged_messages.load(Relaxed)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
