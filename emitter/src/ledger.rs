//! What the emitter sent and what the distributor acknowledged.
//!
//! Why it exists: delivery can only be verified against a record of what was *acknowledged*
//! (a 2xx from `POST /logs`, which the distributor promises means durable). The acknowledged log is
//! that record; `GET /acknowledged` serves it and `emitter verify-delivery` compares it with the
//! analyzers' audits.
//!
//! Invariants:
//! * A packet enters the acknowledged log only after the distributor answered 2xx for it, and
//!   every acknowledged packet enters it exactly once (the sender records each packet's final
//!   outcome once).
//! * Memory is bounded: the log keeps the newest `capacity` packets; older ones are dropped and
//!   counted in `forgotten`, so a reader can tell that the log is no longer complete.
//! * Counters are atomics and the log sits behind a std `Mutex` that is only held to push, pop or
//!   copy a few entries, never across an `.await`.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// One acknowledged packet: its messages are `(emitter_id, packet_id, 0..count)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcknowledgedPacket {
    pub emitter_id: String,
    pub packet_id: String,
    pub count: u32,
}

/// Shared counters and the bounded acknowledged log.
#[derive(Debug)]
pub struct Ledger {
    packets_sent: AtomicU64,
    messages_sent: AtomicU64,
    packets_acknowledged: AtomicU64,
    messages_acknowledged: AtomicU64,
    duplicate_acks: AtomicU64,
    /// Shared with the `DistributorClient` so retries show while they happen, not only at the end.
    retries: Arc<AtomicU64>,
    permanent_failures: AtomicU64,
    deadline_failures: AtomicU64,
    log: Mutex<AcknowledgedLog>,
}

#[derive(Debug)]
struct AcknowledgedLog {
    entries: VecDeque<AcknowledgedPacket>,
    capacity: usize,
    /// Entries dropped from the front; entry `i` of `entries` has position `forgotten + i`.
    forgotten: u64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Packets whose first try has started.
    pub packets_sent: u64,
    pub messages_sent: u64,
    /// Packets the distributor answered 2xx for (duplicates included).
    pub packets_acknowledged: u64,
    pub messages_acknowledged: u64,
    /// Acknowledgements that said the distributor already had the packet.
    pub duplicate_acks: u64,
    /// Tries beyond the first, over all packets.
    pub retries: u64,
    /// Packets refused with a permanent 4xx (or a request that could not be built).
    pub permanent_failures: u64,
    /// Packets given up on because their deadline passed.
    pub deadline_failures: u64,
    /// Acknowledged packets currently in the log.
    pub acknowledged_log_len: u64,
    /// Acknowledged packets dropped from the log because of its capacity.
    pub acknowledged_log_forgotten: u64,
}

impl Ledger {
    /// A ledger whose acknowledged log keeps the newest `acknowledged_log_capacity` packets.
    pub fn new(acknowledged_log_capacity: usize) -> Self {
        Self {
            packets_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            packets_acknowledged: AtomicU64::new(0),
            messages_acknowledged: AtomicU64::new(0),
            duplicate_acks: AtomicU64::new(0),
            retries: Arc::new(AtomicU64::new(0)),
            permanent_failures: AtomicU64::new(0),
            deadline_failures: AtomicU64::new(0),
            log: Mutex::new(AcknowledgedLog {
                // Grows on demand: a large capacity must not allocate up front.
                entries: VecDeque::new(),
                capacity: acknowledged_log_capacity,
                forgotten: 0,
            }),
        }
    }

    /// The counter a `DistributorClient` increments on every retry.
    pub fn retry_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.retries)
    }

    /// A packet of `messages` messages is about to be tried for the first time.
    pub fn record_sent(&self, messages: u32) {
        self.packets_sent.fetch_add(1, Ordering::Relaxed);
        self.messages_sent
            .fetch_add(u64::from(messages), Ordering::Relaxed);
    }

    /// The distributor acknowledged this packet (2xx). `count` is the number of messages sent in it.
    pub fn record_acknowledged(
        &self,
        emitter_id: &str,
        packet_id: &str,
        count: u32,
        duplicate: bool,
    ) {
        self.packets_acknowledged.fetch_add(1, Ordering::Relaxed);
        self.messages_acknowledged
            .fetch_add(u64::from(count), Ordering::Relaxed);
        if duplicate {
            self.duplicate_acks.fetch_add(1, Ordering::Relaxed);
        }
        let mut log = self.log();
        if log.capacity == 0 {
            log.forgotten += 1;
            return;
        }
        if log.entries.len() >= log.capacity {
            log.entries.pop_front();
            log.forgotten += 1;
        }
        log.entries.push_back(AcknowledgedPacket {
            emitter_id: emitter_id.to_owned(),
            packet_id: packet_id.to_owned(),
            count,
        });
    }

    /// The distributor refused a packet for good.
    pub fn record_permanent_failure(&self) {
        self.permanent_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A packet's deadline passed before it was acknowledged.
    pub fn record_deadline_failure(&self) {
        self.deadline_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LedgerSnapshot {
        let (len, forgotten) = {
            let log = self.log();
            (log.entries.len() as u64, log.forgotten)
        };
        LedgerSnapshot {
            packets_sent: self.packets_sent.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            packets_acknowledged: self.packets_acknowledged.load(Ordering::Relaxed),
            messages_acknowledged: self.messages_acknowledged.load(Ordering::Relaxed),
            duplicate_acks: self.duplicate_acks.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            permanent_failures: self.permanent_failures.load(Ordering::Relaxed),
            deadline_failures: self.deadline_failures.load(Ordering::Relaxed),
            acknowledged_log_len: len,
            acknowledged_log_forgotten: forgotten,
        }
    }

    /// A copy of the whole acknowledged log, oldest first.
    pub fn acknowledged_packets(&self) -> Vec<AcknowledgedPacket> {
        self.log().entries.iter().cloned().collect()
    }

    /// Position one past the newest acknowledged packet (positions count every packet ever
    /// logged, forgotten ones included).
    pub fn acknowledged_end(&self) -> u64 {
        let log = self.log();
        log.forgotten + log.entries.len() as u64
    }

    /// Append up to `max_lines` NDJSON lines for the packets at positions `from..until` to `out`
    /// and return the position to continue from. Positions already forgotten are skipped, so a
    /// reader streaming the log in chunks never holds the lock for long and never sees an entry
    /// twice.
    pub fn write_acknowledged_ndjson(
        &self,
        from: u64,
        until: u64,
        max_lines: usize,
        out: &mut Vec<u8>,
    ) -> u64 {
        let log = self.log();
        let start = from.max(log.forgotten);
        let end = until
            .min(log.forgotten + log.entries.len() as u64)
            .min(start.saturating_add(max_lines as u64));
        if start >= end {
            return end.max(start);
        }
        let skip = (start - log.forgotten) as usize;
        for entry in log.entries.iter().skip(skip).take((end - start) as usize) {
            // Writing a plain struct into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, entry);
            out.push(b'\n');
        }
        end
    }

    fn log(&self) -> MutexGuard<'_, AcknowledgedLog> {
        // A panic elsewhere while holding the lock leaves the log consistent (every mutation is
        // a single push or pop), so a poisoned lock is still usable.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest_packets_and_counts_the_forgotten() {
        let ledger = Ledger::new(2);
        for p in ["p1", "p2", "p3"] {
            ledger.record_acknowledged("e", p, 5, p == "p3");
        }
        let kept: Vec<_> = ledger
            .acknowledged_packets()
            .into_iter()
            .map(|a| a.packet_id)
            .collect();
        assert_eq!(kept, ["p2", "p3"]);
        let s = ledger.snapshot();
        assert_eq!(s.acknowledged_log_forgotten, 1);
        assert_eq!((s.packets_acknowledged, s.messages_acknowledged), (3, 15));
        assert_eq!(s.duplicate_acks, 1);
    }

    #[test]
    fn ndjson_chunks_cover_every_kept_packet_once() {
        let ledger = Ledger::new(10);
        for i in 0..7 {
            ledger.record_acknowledged("e", &format!("p{i}"), 1, false);
        }
        let (mut out, mut pos, end) = (Vec::new(), 0, ledger.acknowledged_end());
        while pos < end {
            pos = ledger.write_acknowledged_ndjson(pos, end, 3, &mut out);
        }
        let lines: Vec<AcknowledgedPacket> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[6].packet_id, "p6");
    }

    #[test]
    fn a_zero_capacity_log_forgets_everything_but_still_counts() {
        let ledger = Ledger::new(0);
        ledger.record_acknowledged("e", "p", 3, false);
        assert!(ledger.acknowledged_packets().is_empty());
        assert_eq!(ledger.snapshot().acknowledged_log_forgotten, 1);
        assert_eq!(ledger.snapshot().messages_acknowledged, 3);
    }
}
