//! The dispatcher: moves durable records from the WAL to analyzers, by weight, until each one is
//! acknowledged.
//!
//! One task owns all dispatch state (the window, per-analyzer queues, health, the selector), so no
//! lock guards it; sends run in their own tasks and report back on a channel.
//!
//! # Life of a record
//! ```text
//!   WAL ──read in seq order, bounded window──▶ unassigned ──selector (by weight)──▶ queued(a)
//!        ──batch of ≤ batch_max_messages──▶ in_flight(a) ──2xx──▶ removed from the WAL
//!                                                       └─fail after retries─▶ awaiting redelivery
//!   every redelivery_interval: awaiting ──selector among usable analyzers not yet tried──▶ queued(b)
//!                              (when every usable analyzer was tried, the tried set starts over)
//! ```
//! The unit of routing is the record, i.e. a whole packet: its messages keep their identity and
//! travel together. The selector counts *messages*, so each analyzer's share of messages follows
//! its weight (invariant 4).
//!
//! # What it promises
//! * A record leaves the WAL only after an analyzer answered 2xx for its batch (invariant 2).
//! * Nothing is dropped for being hard to deliver: a failed record waits for the redelivery worker,
//!   which tries the healthy analyzers it has not tried yet, then starts over (invariant 5).
//! * An analyzer that is unhealthy gets no new traffic; the records queued for it go back to be
//!   assigned to the others at once, so nothing waits on a down analyzer while another is healthy.
//! * At most `window_records` records are in memory; the rest of the backlog stays on disk
//!   (invariant 6).
//! * When the WAL was reopened after a storage failure (its generation changed), removals that did
//!   not reach the disk may have made delivered records pending again: the dispatcher retries its
//!   failed removals, then reads the WAL again from the start, skipping what its window already
//!   holds, so such a record is delivered again (a duplicate) rather than left on disk unseen.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use logdist_proto::BatchWriter;
use tokio::sync::{mpsc, watch, Notify};

use crate::commit::GroupCommit;
use crate::delivery::{self, Backoff, Endpoint, SendFailure};
use crate::selector::{slot_bit, Selector, SlotSet};
use crate::stats::Shared;
use crate::wal::{StoredRecord, Wal, WalError};

/// Tunables of the dispatcher (from `DispatchSettings`).
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub batch_max_messages: usize,
    pub batch_max_bytes: usize,
    pub window_max_bytes: usize,
    pub max_in_flight_batches: usize,
    pub window_records: usize,
    pub redelivery_interval: Duration,
    pub unhealthy_after_failures: u32,
    pub backoff: Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unassigned,
    Queued(usize),
    InFlight(usize),
    AwaitingRedelivery,
}

struct Pending {
    record: StoredRecord,
    /// Analyzers whose send failed for this record since it last started over.
    tried: SlotSet,
    state: State,
    /// Send this record in a batch of its own: a batch holding it was refused for its content,
    /// and the culprit must not drag its neighbours along.
    solo: bool,
}

struct Slot {
    endpoint: Arc<Endpoint>,
    healthy: bool,
    weight_positive: bool,
    consecutive_failures: u32,
    in_flight_batches: usize,
    queue: VecDeque<u64>,
}

struct Outcome {
    slot: usize,
    seqs: Vec<u64>,
    result: Result<(), SendFailure>,
}

/// Health reports from the active prober.
pub type HealthReport = (usize, bool);

pub struct Dispatcher {
    wal: Wal,
    commit: GroupCommit,
    shared: Arc<Shared>,
    cfg: DispatchConfig,
    http: reqwest::Client,
    slots: Vec<Slot>,
    selector: Selector,
    window: BTreeMap<u64, Pending>,
    unassigned: VecDeque<u64>,
    next_scan: u64,
    /// Bytes of the records in `window`.
    window_bytes: usize,
    /// Delivered records whose removal from the WAL failed; retried every redelivery tick.
    removals_to_retry: Vec<(u64, u32)>,
    /// The WAL generation the window was read from (see `Wal::generation`).
    seen_generation: u64,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    outcomes_rx: mpsc::UnboundedReceiver<Outcome>,
    in_flight_batches: usize,
}

impl Dispatcher {
    pub fn new(
        wal: Wal,
        commit: GroupCommit,
        shared: Arc<Shared>,
        endpoints: Vec<Arc<Endpoint>>,
        cfg: DispatchConfig,
        http: reqwest::Client,
    ) -> Self {
        let weights: Vec<f64> = shared.analyzers.iter().map(|a| a.weight).collect();
        let slots = endpoints
            .into_iter()
            .zip(&weights)
            .map(|(endpoint, w)| Slot {
                endpoint,
                healthy: true,
                weight_positive: *w > 0.0,
                consecutive_failures: 0,
                in_flight_batches: 0,
                queue: VecDeque::new(),
            })
            .collect();
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let seen_generation = wal.generation();
        Self {
            seen_generation,
            wal,
            commit,
            shared,
            cfg,
            http,
            slots,
            selector: Selector::new(weights),
            window: BTreeMap::new(),
            unassigned: VecDeque::new(),
            next_scan: 0,
            window_bytes: 0,
            removals_to_retry: Vec::new(),
            outcomes_tx,
            outcomes_rx,
            in_flight_batches: 0,
        }
    }

    /// Run until `stop` turns true, then wait for the batches in flight (each ends within its
    /// timeout × retries) so that what they delivered is removed and nothing is half-done.
    pub async fn run(
        mut self,
        new_records: Arc<Notify>,
        mut health: mpsc::Receiver<HealthReport>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut redelivery = tokio::time::interval(self.cfg.redelivery_interval);
        redelivery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        redelivery.tick().await;
        loop {
            self.fill_window();
            self.assign_unassigned();
            self.launch_batches();
            self.publish();
            tokio::select! {
                _ = stop.changed() => break,
                _ = new_records.notified() => {}
                Some(outcome) = self.outcomes_rx.recv() => self.apply_outcome(outcome),
                Some((slot, up)) = health.recv() => self.set_health(slot, up),
                _ = redelivery.tick() => self.redeliver(),
            }
        }
        tracing::info!(
            in_flight_batches = self.in_flight_batches,
            "dispatcher stopping; waiting for batches in flight"
        );
        while self.in_flight_batches > 0 {
            match self.outcomes_rx.recv().await {
                Some(outcome) => self.apply_outcome(outcome),
                None => break,
            }
        }
        self.publish();
    }

    /// Load the first window and publish the gauges, before the HTTP API serves: `GET /queue`
    /// then reports a recovered backlog (its oldest age included) from the first request on.
    pub fn prime(&mut self) {
        self.fill_window();
        self.publish();
    }

    fn usable(&self) -> SlotSet {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.healthy && s.weight_positive)
            .fold(0, |set, (i, _)| set | slot_bit(i))
    }

    /// Load records from the WAL into the window, in seq order, up to its bounds.
    fn fill_window(&mut self) {
        let generation = self.wal.generation();
        if generation != self.seen_generation {
            self.seen_generation = generation;
            if !self.removals_to_retry.is_empty() {
                let retry = std::mem::take(&mut self.removals_to_retry);
                self.remove_delivered(retry);
            }
            tracing::info!(
                generation,
                "the WAL was reopened; reading it again from the start"
            );
            self.next_scan = 0;
        }
        // Delivered, removal still to be retried: not pending, even though the WAL has them.
        let delivered: HashSet<u64> = self.removals_to_retry.iter().map(|(s, _)| *s).collect();
        while self.window.len() < self.cfg.window_records
            && self.window_bytes < self.cfg.window_max_bytes
        {
            // Small reads, so the byte bound is overshot by at most a few records.
            let room = (self.cfg.window_records - self.window.len()).min(64);
            let records = match self.wal.read_pending(self.next_scan, room) {
                Ok(r) => r,
                Err(WalError::Unavailable { .. }) => return,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the WAL; will retry");
                    return;
                }
            };
            if records.is_empty() {
                return;
            }
            for record in records {
                self.next_scan = record.seq + 1;
                if self.window.contains_key(&record.seq) || delivered.contains(&record.seq) {
                    continue;
                }
                self.unassigned.push_back(record.seq);
                self.window_bytes += record.size();
                self.window.insert(
                    record.seq,
                    Pending {
                        record,
                        tried: 0,
                        state: State::Unassigned,
                        solo: false,
                    },
                );
            }
        }
    }

    /// Pick an analyzer for a record among the usable ones it has not tried yet; when it has tried
    /// them all, it starts over.
    fn choose(&mut self, seq: u64) -> Option<usize> {
        let usable = self.usable();
        let pending = self.window.get_mut(&seq)?;
        let mut eligible = usable & !pending.tried;
        if eligible == 0 {
            pending.tried = 0;
            eligible = usable;
        }
        let slot = self.selector.pick(eligible, pending.record.count)?;
        pending.state = State::Queued(slot);
        self.slots[slot].queue.push_back(seq);
        Some(slot)
    }

    fn assign_unassigned(&mut self) {
        while let Some(seq) = self.unassigned.pop_front() {
            match self.window.get(&seq) {
                Some(p) if p.state == State::Unassigned => {}
                _ => continue,
            }
            if self.choose(seq).is_none() {
                // No usable analyzer now: keep the order and wait for one to come back.
                self.unassigned.push_front(seq);
                return;
            }
        }
    }

    /// Give records that failed somewhere to another analyzer (the redelivery worker's tick).
    fn redeliver(&mut self) {
        let waiting: Vec<u64> = self
            .window
            .iter()
            .filter(|(_, p)| p.state == State::AwaitingRedelivery)
            .map(|(seq, _)| *seq)
            .collect();
        let mut moved = 0u64;
        for seq in waiting {
            if self.choose(seq).is_none() {
                break;
            }
            moved += self
                .window
                .get(&seq)
                .map_or(0, |p| u64::from(p.record.count));
        }
        if moved > 0 {
            self.shared.redelivered_messages.fetch_add(moved, Relaxed);
            tracing::info!(messages = moved, "redelivering to analyzers not yet tried");
        }
        if !self.removals_to_retry.is_empty() {
            let retry = std::mem::take(&mut self.removals_to_retry);
            self.remove_delivered(retry);
        }
    }

    fn remove_delivered(&mut self, delivered: Vec<(u64, u32)>) {
        match self.wal.remove_delivered(&delivered) {
            Ok(()) => self.commit.flush_soon(),
            Err(e) => {
                // Delivered but still on disk: retried every tick; a restart meanwhile delivers
                // them again (duplicates, counted by the analyzers), never loses them. A failed WAL
                // (logged once, by the WAL) refuses every removal until it is reopened.
                if matches!(e, WalError::Unavailable { .. }) {
                    tracing::debug!(error = %e, records = delivered.len(), "cannot remove delivered records from the WAL; will retry");
                } else {
                    tracing::error!(error = %e, records = delivered.len(), "cannot remove delivered records from the WAL; will retry");
                }
                self.removals_to_retry.extend(delivered);
            }
        }
    }

    fn launch_batches(&mut self) {
        for slot in 0..self.slots.len() {
            while self.slots[slot].healthy
                && self.slots[slot].in_flight_batches < self.cfg.max_in_flight_batches
                && !self.slots[slot].queue.is_empty()
            {
                self.launch_one(slot);
            }
        }
    }

    fn launch_one(&mut self, slot: usize) {
        let mut seqs = Vec::new();
        let mut messages = 0usize;
        let mut bytes = 0usize;
        while let Some(&seq) = self.slots[slot].queue.front() {
            let Some(p) = self.window.get(&seq) else {
                self.slots[slot].queue.pop_front();
                continue;
            };
            let count = p.record.count as usize;
            let full = messages + count > self.cfg.batch_max_messages
                || bytes + p.record.size() > self.cfg.batch_max_bytes;
            if !seqs.is_empty() && (full || p.solo) {
                break;
            }
            self.slots[slot].queue.pop_front();
            messages += count;
            bytes += p.record.size();
            seqs.push(seq);
            if p.solo {
                break;
            }
        }
        if seqs.is_empty() {
            return;
        }
        let mut body = BatchWriter::with_capacity(bytes + 64 * seqs.len());
        for seq in &seqs {
            if let Some(p) = self.window.get_mut(seq) {
                body.push(
                    p.record.emitter_id(),
                    p.record.packet_id(),
                    p.record.raw_messages(),
                );
                p.state = State::InFlight(slot);
            }
        }
        let body = Bytes::from(body.finish());
        self.slots[slot].in_flight_batches += 1;
        self.in_flight_batches += 1;
        self.shared.analyzers[slot]
            .in_flight_messages
            .fetch_add(messages as u64, Relaxed);
        let (http, endpoint, tx, backoff, shared) = (
            self.http.clone(),
            self.slots[slot].endpoint.clone(),
            self.outcomes_tx.clone(),
            self.cfg.backoff,
            self.shared.clone(),
        );
        tokio::spawn(async move {
            let view = &shared.analyzers[slot];
            let result = delivery::send_batch(&http, &endpoint, body, backoff, view).await;
            // The receiver lives as long as the dispatcher, which waits for every batch.
            let _ = tx.send(Outcome { slot, seqs, result });
        });
    }

    fn apply_outcome(&mut self, outcome: Outcome) {
        let Outcome { slot, seqs, result } = outcome;
        self.slots[slot].in_flight_batches -= 1;
        self.in_flight_batches -= 1;
        let view = &self.shared.analyzers[slot];
        let (messages, seqs_bytes) = seqs
            .iter()
            .filter_map(|s| self.window.get(s))
            .fold((0u64, 0usize), |(m, b), p| {
                (m + u64::from(p.record.count), b + p.record.size())
            });
        view.in_flight_messages.fetch_sub(messages, Relaxed);
        match result {
            Ok(()) => {
                let delivered: Vec<(u64, u32)> = seqs
                    .iter()
                    .filter_map(|s| self.window.remove(s))
                    .map(|p| (p.record.seq, p.record.count))
                    .collect();
                self.window_bytes -= seqs_bytes;
                view.acknowledged_messages.fetch_add(messages, Relaxed);
                view.consecutive_failures.store(0, Relaxed);
                self.slots[slot].consecutive_failures = 0;
                self.remove_delivered(delivered);
            }
            Err(SendFailure::Rejected { status, error }) if seqs.len() > 1 => {
                // The content was refused, not the analyzer: isolate every record of the batch
                // and send each alone, at once, so only the culprit stays behind.
                view.rejected_batches.fetch_add(1, Relaxed);
                tracing::warn!(analyzer = %view.id, status, %error, records = seqs.len(), "batch refused for its content; resending its records one by one");
                for seq in seqs.iter().rev() {
                    if let Some(p) = self.window.get_mut(seq) {
                        p.solo = true;
                        p.state = State::Unassigned;
                        self.unassigned.push_front(*seq);
                    }
                }
            }
            Err(SendFailure::Rejected { status, error }) => {
                // One record refused for its content: it waits for redelivery to another
                // analyzer (and, after all were tried, starts over). It stays in the WAL.
                view.rejected_batches.fetch_add(1, Relaxed);
                for seq in &seqs {
                    if let Some(p) = self.window.get_mut(seq) {
                        p.tried |= slot_bit(slot);
                        p.state = State::AwaitingRedelivery;
                        tracing::error!(
                            analyzer = %view.id, status, %error,
                            emitter_id = p.record.emitter_id(), packet_id = p.record.packet_id(),
                            "packet refused by an analyzer; it stays in the WAL and is offered to the others"
                        );
                    }
                }
            }
            Err(failure) => {
                for seq in &seqs {
                    if let Some(p) = self.window.get_mut(seq) {
                        p.tried |= slot_bit(slot);
                        p.state = State::AwaitingRedelivery;
                    }
                }
                view.failed_batches.fetch_add(1, Relaxed);
                let s = &mut self.slots[slot];
                s.consecutive_failures += 1;
                view.consecutive_failures
                    .store(s.consecutive_failures, Relaxed);
                tracing::warn!(
                    analyzer = %view.id, error = %failure, records = seqs.len(), messages,
                    "batch failed after its retries; it waits for redelivery"
                );
                if s.consecutive_failures >= self.cfg.unhealthy_after_failures {
                    self.set_health(slot, false);
                }
            }
        }
    }

    fn set_health(&mut self, slot: usize, up: bool) {
        let s = &mut self.slots[slot];
        if s.healthy == up {
            return;
        }
        s.healthy = up;
        let view = &self.shared.analyzers[slot];
        view.healthy.store(up, Relaxed);
        if up {
            s.consecutive_failures = 0;
            view.consecutive_failures.store(0, Relaxed);
            self.selector.reset(slot);
            tracing::info!(analyzer = %view.id, "analyzer is healthy again; its share resumes from now");
        } else {
            // Whatever waited for it goes back to be assigned to the others (not marked tried:
            // it never reached this analyzer).
            let queued: Vec<u64> = s.queue.drain(..).collect();
            for seq in queued.iter().rev() {
                if let Some(p) = self.window.get_mut(seq) {
                    p.state = State::Unassigned;
                    self.unassigned.push_front(*seq);
                }
            }
            tracing::warn!(analyzer = %view.id, requeued = queued.len(), "analyzer marked unhealthy; no new traffic");
        }
    }

    /// Refresh the gauges the HTTP handlers report.
    fn publish(&self) {
        let mut queued = vec![0u64; self.slots.len()];
        let (mut awaiting, mut unassigned) = (0u64, 0u64);
        for p in self.window.values() {
            let count = u64::from(p.record.count);
            match p.state {
                State::Queued(slot) => queued[slot] += count,
                State::AwaitingRedelivery => awaiting += count,
                State::Unassigned => unassigned += count,
                State::InFlight(_) => {}
            }
        }
        for (view, q) in self.shared.analyzers.iter().zip(queued) {
            view.queued_messages.store(q, Relaxed);
        }
        self.shared
            .awaiting_redelivery_messages
            .store(awaiting, Relaxed);
        self.shared.unassigned_messages.store(unassigned, Relaxed);
        let oldest = self
            .window
            .values()
            .next()
            .map_or(0, |p| p.record.accepted_at_ms);
        self.shared.oldest_accepted_at_ms.store(oldest, Relaxed);
    }
}

/// The active health probe: every `interval`, `GET /health` on every analyzer, reported to the
/// dispatcher (which alone changes health state).
pub async fn probe_health(
    http: reqwest::Client,
    endpoints: Vec<Arc<Endpoint>>,
    interval: Duration,
    reports: mpsc::Sender<HealthReport>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probes = endpoints.iter().map(|e| delivery::probe(&http, e));
        let results = futures_util::future::join_all(probes).await;
        for (slot, up) in results.into_iter().enumerate() {
            if reports.send((slot, up)).await.is_err() {
                return;
            }
        }
    }
}
