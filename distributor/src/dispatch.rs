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
//! * An analyzer whose circuit breaker is open (see `breaker`), that an operator disabled, or that
//!   is being removed gets no new traffic; the records queued for it go back to be assigned to the
//!   others at once, so nothing waits on a down analyzer while another is healthy. A half-open one
//!   gets one record at a time until its breaker closes.
//! * When an analyzer comes back (its breaker closes, it is enabled again) its weighted share
//!   resumes from then: its selector credit starts from zero, so it is not flooded to catch up.
//! * The analyzer set follows the registry (`registry`), applied by [`Command::Apply`]: a new
//!   analyzer gets a slot, a changed weight takes effect at the next pick, and a removed one
//!   drains: nothing new is assigned to it, its queue goes to the others, and its slot is freed
//!   once its batches in flight have ended (delivered ones removed from the WAL, failed ones
//!   awaiting redelivery elsewhere). Nothing it held is lost.
//! * At most `window_records` records are in memory; the rest of the backlog stays on disk
//!   (invariant 6).
//! * When the WAL was reopened after a storage failure (its generation changed), removals that did
//!   not reach the disk may have made delivered records pending again: the dispatcher retries its
//!   failed removals, then reads the WAL again from the start, skipping what its window already
//!   holds, so such a record is delivered again (a duplicate) rather than left on disk unseen.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use logdist_config::MAX_ANALYZERS;
use logdist_proto::BatchWriter;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::breaker::{Breaker, BreakerConfig, State as BreakerState, Transition};
use crate::commit::GroupCommit;
use crate::delivery::{self, Backoff, Endpoint, SendFailure};
use crate::registry::{AnalyzerSpec, Registry};
use crate::selector::{slot_bit, Selector, SlotSet};
use crate::stats::{now_ms, AnalyzerView, Shared};
use crate::wal::{StoredRecord, Wal, WalError};

/// Tunables of the dispatcher (from `DispatchSettings` and `BreakerSettings`).
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub batch_max_messages: usize,
    pub batch_max_bytes: usize,
    pub window_max_bytes: usize,
    pub max_in_flight_batches: usize,
    pub window_records: usize,
    pub redelivery_interval: Duration,
    pub breaker: BreakerConfig,
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

/// One registered analyzer, as the dispatcher drives it.
struct Slot {
    view: Arc<AnalyzerView>,
    spec: AnalyzerSpec,
    endpoint: Arc<Endpoint>,
    breaker: Breaker,
    /// Removed from the registry: no new traffic; freed once nothing is in flight.
    draining: bool,
    in_flight_batches: usize,
    queue: VecDeque<u64>,
}

impl Slot {
    /// May be given new records: enabled, weighted, not draining, breaker not open.
    fn assignable(&self) -> bool {
        self.spec.enabled
            && self.spec.weight > 0.0
            && !self.draining
            && self.breaker.allows_traffic()
    }

    /// Half-open: a trickle, one record at a time, until the breaker closes.
    fn trickle_only(&self) -> bool {
        matches!(self.breaker.state(), BreakerState::HalfOpen { .. })
    }
}

struct Outcome {
    slot: usize,
    /// The slot's breaker epoch when the batch was sent (see `Breaker::epoch`).
    epoch: u64,
    seqs: Vec<u64>,
    result: Result<(), SendFailure>,
}

/// A health probe's answer: the analyzer's id, and whether it answered 2xx.
pub type HealthReport = (String, bool);

/// What the admin API asks of the dispatcher.
pub enum Command {
    /// Make the analyzers those of `registry` (already validated and stored); `done` is answered
    /// once the change is in effect (a removal is then draining; its view goes when it is done).
    Apply {
        registry: Registry,
        done: oneshot::Sender<()>,
    },
}

pub struct Dispatcher {
    wal: Wal,
    commit: GroupCommit,
    shared: Arc<Shared>,
    cfg: DispatchConfig,
    http: reqwest::Client,
    /// Indexed by slot; `None` is a free slot. At most `MAX_ANALYZERS`.
    slots: Vec<Option<Slot>>,
    /// The registry being applied, in its order.
    registry: Registry,
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
        registry: Registry,
        cfg: DispatchConfig,
        http: reqwest::Client,
    ) -> Self {
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let seen_generation = wal.generation();
        let mut dispatcher = Self {
            seen_generation,
            wal,
            commit,
            shared,
            cfg,
            http,
            slots: Vec::new(),
            registry: registry.clone(),
            selector: Selector::new(Vec::new()),
            window: BTreeMap::new(),
            unassigned: VecDeque::new(),
            next_scan: 0,
            window_bytes: 0,
            removals_to_retry: Vec::new(),
            outcomes_tx,
            outcomes_rx,
            in_flight_batches: 0,
        };
        dispatcher.apply_registry(registry);
        dispatcher
    }

    /// Run until `stop` turns true, then wait for the batches in flight (each ends within its
    /// timeout × retries) so that what they delivered is removed and nothing is half-done.
    pub async fn run(
        mut self,
        new_records: Arc<Notify>,
        mut health: mpsc::Receiver<HealthReport>,
        mut commands: mpsc::Receiver<Command>,
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
            // The next breaker to go from open to half-open (or an hour from now: never mind).
            let breaker_due = self
                .slots
                .iter()
                .flatten()
                .filter_map(|s| s.breaker.deadline())
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.changed() => break,
                _ = new_records.notified() => {}
                Some(outcome) = self.outcomes_rx.recv() => self.apply_outcome(outcome),
                Some((id, up)) = health.recv() => self.health_report(&id, up),
                Some(command) = commands.recv() => match command {
                    Command::Apply { registry, done } => {
                        self.apply_registry(registry);
                        let _ = done.send(());
                    }
                },
                _ = tokio::time::sleep_until(breaker_due.into()) => self.poll_breakers(),
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

    fn slot(&self, slot: usize) -> Option<&Slot> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    fn slot_mut(&mut self, slot: usize) -> Option<&mut Slot> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    fn usable(&self) -> SlotSet {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| {
                s.assignable()
                    && !(s.trickle_only() && (s.in_flight_batches > 0 || !s.queue.is_empty()))
            })
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
        self.slots[slot].as_mut()?.queue.push_back(seq);
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
            while let Some(s) = self.slot(slot) {
                let limit = if s.trickle_only() {
                    1
                } else {
                    self.cfg.max_in_flight_batches
                };
                let may_send = s.spec.enabled && !s.draining && s.breaker.allows_traffic();
                if !may_send || s.in_flight_batches >= limit || s.queue.is_empty() {
                    break;
                }
                self.launch_one(slot);
            }
        }
    }

    fn launch_one(&mut self, slot: usize) {
        let Some(s) = self.slots[slot].as_mut() else {
            return;
        };
        let mut seqs = Vec::new();
        let mut messages = 0usize;
        let mut bytes = 0usize;
        while let Some(&seq) = s.queue.front() {
            let Some(p) = self.window.get(&seq) else {
                s.queue.pop_front();
                continue;
            };
            let count = p.record.count as usize;
            let full = messages + count > self.cfg.batch_max_messages
                || bytes + p.record.size() > self.cfg.batch_max_bytes;
            if !seqs.is_empty() && (full || p.solo) {
                break;
            }
            s.queue.pop_front();
            messages += count;
            bytes += p.record.size();
            seqs.push(seq);
            if p.solo || s.trickle_only() {
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
        s.in_flight_batches += 1;
        self.in_flight_batches += 1;
        s.view
            .in_flight_messages
            .fetch_add(messages as u64, Relaxed);
        let (http, endpoint, tx, backoff, view, epoch) = (
            self.http.clone(),
            s.endpoint.clone(),
            self.outcomes_tx.clone(),
            self.cfg.backoff,
            s.view.clone(),
            s.breaker.epoch(),
        );
        tokio::spawn(async move {
            let result = delivery::send_batch(&http, &endpoint, body, backoff, &view).await;
            // The receiver lives as long as the dispatcher, which waits for every batch.
            let _ = tx.send(Outcome {
                slot,
                epoch,
                seqs,
                result,
            });
        });
    }

    fn apply_outcome(&mut self, outcome: Outcome) {
        let Outcome {
            slot,
            epoch,
            seqs,
            result,
        } = outcome;
        self.in_flight_batches -= 1;
        // A slot is freed only once nothing is in flight to it, so it is still here.
        let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        s.in_flight_batches -= 1;
        let view = s.view.clone();
        let (messages, seqs_bytes) = seqs
            .iter()
            .filter_map(|s| self.window.get(s))
            .fold((0u64, 0usize), |(m, b), p| {
                (m + u64::from(p.record.count), b + p.record.size())
            });
        view.in_flight_messages.fetch_sub(messages, Relaxed);
        let now = Instant::now();
        // Only outcomes of batches sent in the breaker's current state count for it.
        let current = epoch == s.breaker.epoch();
        match result {
            Ok(()) => {
                let delivered: Vec<(u64, u32)> = seqs
                    .iter()
                    .filter_map(|s| self.window.remove(s))
                    .map(|p| (p.record.seq, p.record.count))
                    .collect();
                self.window_bytes -= seqs_bytes;
                view.acknowledged_messages.fetch_add(messages, Relaxed);
                let transition = if current {
                    s.breaker.on_success(now)
                } else {
                    None
                };
                self.breaker_changed(slot, transition);
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
                tracing::warn!(
                    analyzer = %view.id, error = %failure, records = seqs.len(), messages,
                    "batch failed after its retries; it waits for redelivery"
                );
                let transition = if current {
                    s.breaker.on_failure(now)
                } else {
                    None
                };
                self.breaker_changed(slot, transition);
            }
        }
        self.free_if_drained(slot);
    }

    /// An active probe's answer. A success counts towards closing a half-open breaker; a failure
    /// opens a closed or half-open one at once.
    fn health_report(&mut self, id: &str, up: bool) {
        let now = Instant::now();
        // By id: the set may have changed while the probe ran.
        let Some(slot) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.view.id == id && !s.draining))
        else {
            return;
        };
        let Some(s) = self.slot_mut(slot) else {
            return;
        };
        let transition = if up {
            s.breaker.on_probe_success(now)
        } else {
            s.breaker.on_probe_failure(now)
        };
        self.breaker_changed(slot, transition);
    }

    /// Open breakers whose recovery timeout has elapsed go half-open.
    fn poll_breakers(&mut self) {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if let Some(s) = self.slot_mut(slot) {
                let transition = s.breaker.poll(now);
                self.breaker_changed(slot, transition);
            }
        }
    }

    /// Mirror a breaker's state into its view, and act on a transition: log it; on open, hand
    /// what was queued for the analyzer to the others; on half-open or closed, start its share
    /// from now.
    fn breaker_changed(&mut self, slot: usize, transition: Option<Transition>) {
        let Some(s) = self.slot_mut(slot) else {
            return;
        };
        let (state, failures) = (s.breaker.state(), s.breaker.consecutive_failures());
        s.view.consecutive_failures.store(failures, Relaxed);
        let Some(Transition { from, to }) = transition else {
            return;
        };
        s.view.breaker.store(state.code(), Relaxed);
        let half_open_at = s
            .breaker
            .next_probe_in(Instant::now())
            .map_or(0, |d| now_ms() + d.as_millis() as u64);
        s.view.half_open_at_ms.store(half_open_at, Relaxed);
        let id = s.view.id.clone();
        match to {
            BreakerState::Open { .. } => {
                let requeued = self.requeue(slot);
                tracing::warn!(
                    analyzer = %id, from, to = to.name(), consecutive_failures = failures,
                    retry_in_ms = self.cfg.breaker.recovery_timeout.as_millis() as u64, requeued,
                    "circuit breaker opened: no traffic to this analyzer; its queue goes to the others"
                );
            }
            BreakerState::HalfOpen { .. } => {
                self.selector.reset(slot);
                tracing::info!(analyzer = %id, from, to = to.name(), "circuit breaker half-open: trying one record at a time");
            }
            BreakerState::Closed => {
                self.selector.reset(slot);
                tracing::info!(analyzer = %id, from, to = to.name(), "circuit breaker closed: the analyzer's share resumes from now");
            }
        }
    }

    /// Give what is queued for `slot` back to be assigned to the others (not marked tried: it
    /// never reached this analyzer). Returns how many records moved.
    fn requeue(&mut self, slot: usize) -> usize {
        let Some(s) = self.slot_mut(slot) else {
            return 0;
        };
        let queued: Vec<u64> = s.queue.drain(..).collect();
        for seq in queued.iter().rev() {
            if let Some(p) = self.window.get_mut(seq) {
                p.state = State::Unassigned;
                self.unassigned.push_front(*seq);
            }
        }
        queued.len()
    }

    /// Make the slots follow `registry`: new analyzers get a slot, changed ones take their new
    /// settings, missing ones start draining. Publishes the new list of views.
    fn apply_registry(&mut self, registry: Registry) {
        self.registry = registry;
        let wanted: HashSet<&str> = self
            .registry
            .analyzers()
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        let to_drain: Vec<String> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| !s.draining && !wanted.contains(s.view.id.as_str()))
            .map(|s| s.view.id.clone())
            .collect();
        for id in to_drain {
            // Looked up by id each time: freeing one slot may have reused another index.
            let Some(slot) = self
                .slots
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.view.id == id && !s.draining))
            else {
                continue;
            };
            if let Some(s) = self.slot_mut(slot) {
                s.draining = true;
                s.view.draining.store(true, Relaxed);
            }
            let requeued = self.requeue(slot);
            let id = self
                .slot(slot)
                .map(|s| s.view.id.clone())
                .unwrap_or_default();
            tracing::info!(analyzer = %id, requeued, "analyzer removed from the registry; draining");
            self.free_if_drained(slot);
        }
        for spec in self.registry.analyzers().to_vec() {
            let existing = self
                .slots
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.view.id == spec.id));
            match existing {
                Some(slot) => self.update_slot(slot, spec),
                None => self.add_slot(spec),
            }
        }
        self.publish_views();
    }

    fn add_slot(&mut self, spec: AnalyzerSpec) {
        let free = self.slots.iter().position(Option::is_none);
        let slot = match free {
            Some(i) => i,
            None if self.slots.len() < MAX_ANALYZERS => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => {
                // Every slot is taken, some by analyzers still draining: it is added when one
                // is freed (`free_if_drained` applies the registry again).
                tracing::warn!(analyzer = %spec.id, "no free slot while others drain; the analyzer is added once one is freed");
                return;
            }
        };
        self.selector.set_weight(slot, spec.weight);
        self.selector.reset(slot);
        tracing::info!(analyzer = %spec.id, endpoint = %spec.endpoint, weight = spec.weight, enabled = spec.enabled, "analyzer added");
        self.slots[slot] = Some(Slot {
            view: Arc::new(AnalyzerView::new(spec.clone())),
            endpoint: Arc::new(endpoint_of(&spec)),
            breaker: Breaker::new(self.cfg.breaker),
            spec,
            draining: false,
            in_flight_batches: 0,
            queue: VecDeque::new(),
        });
    }

    fn update_slot(&mut self, slot: usize, spec: AnalyzerSpec) {
        let Some(s) = self.slot_mut(slot) else {
            return;
        };
        if s.spec == spec && !s.draining {
            return;
        }
        let old = std::mem::replace(&mut s.spec, spec.clone());
        let undrained = std::mem::replace(&mut s.draining, false);
        s.view.draining.store(false, Relaxed);
        if (&old.endpoint, old.timeout_ms, old.retry_count)
            != (&spec.endpoint, spec.timeout_ms, spec.retry_count)
        {
            // Batches in flight keep the endpoint they were sent with.
            s.endpoint = Arc::new(endpoint_of(&spec));
        }
        s.view.set_spec(spec.clone());
        self.selector.set_weight(slot, spec.weight);
        if (old.enabled && !spec.enabled) || spec.weight <= 0.0 {
            self.requeue(slot);
        }
        if (!old.enabled && spec.enabled) || undrained {
            self.selector.reset(slot);
        }
        tracing::info!(
            analyzer = %spec.id, endpoint = %spec.endpoint, weight = spec.weight,
            previous_weight = old.weight, enabled = spec.enabled,
            "analyzer settings changed"
        );
    }

    /// Free a draining slot once nothing is queued for it or in flight to it.
    fn free_if_drained(&mut self, slot: usize) {
        let done = self
            .slot(slot)
            .is_some_and(|s| s.draining && s.in_flight_batches == 0 && s.queue.is_empty());
        if !done {
            return;
        }
        let Some(s) = self.slots[slot].take() else {
            return;
        };
        // A reused slot must not inherit "already tried" marks.
        for p in self.window.values_mut() {
            p.tried &= !slot_bit(slot);
        }
        self.selector.set_weight(slot, 0.0);
        self.selector.reset(slot);
        self.shared
            .removed_acknowledged_messages
            .fetch_add(s.view.acknowledged_messages.load(Relaxed), Relaxed);
        tracing::info!(analyzer = %s.view.id, "analyzer drained and removed");
        // An analyzer waiting for a free slot gets this one.
        let registry = self.registry.clone();
        self.apply_registry(registry);
    }

    /// Publish the views in registry order, then those draining.
    fn publish_views(&self) {
        let mut views = Vec::with_capacity(self.slots.len());
        for spec in self.registry.analyzers() {
            if let Some(s) = self.slots.iter().flatten().find(|s| s.view.id == spec.id) {
                views.push(s.view.clone());
            }
        }
        views.extend(
            self.slots
                .iter()
                .flatten()
                .filter(|s| s.draining)
                .map(|s| s.view.clone()),
        );
        self.shared.publish_analyzers(views);
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
        for (s, q) in self.slots.iter().zip(queued) {
            if let Some(s) = s {
                s.view.queued_messages.store(q, Relaxed);
            }
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

fn endpoint_of(spec: &AnalyzerSpec) -> Endpoint {
    Endpoint::new(
        &spec.endpoint,
        Duration::from_millis(spec.timeout_ms),
        spec.retry_count,
    )
}

/// The active health probe: every `interval`, `GET /health` on every registered analyzer,
/// reported to the dispatcher (which alone changes breaker state).
pub async fn probe_health(
    http: reqwest::Client,
    shared: Arc<Shared>,
    interval: Duration,
    reports: mpsc::Sender<HealthReport>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(String, Endpoint)> = shared
            .analyzers()
            .iter()
            .filter(|v| !v.draining.load(Relaxed))
            .map(|v| (v.id.clone(), endpoint_of(&v.spec())))
            .collect();
        // Each answer is reported as it comes: a slow analyzer does not delay the others'.
        let mut probes: futures_util::stream::FuturesUnordered<_> = targets
            .into_iter()
            .map(|(id, e)| {
                let http = &http;
                async move { (id, delivery::probe(http, &e).await) }
            })
            .collect();
        while let Some(report) = futures_util::StreamExt::next(&mut probes).await {
            if reports.send(report).await.is_err() {
                return;
            }
        }
    }
}
