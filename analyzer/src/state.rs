//! What an analyzer remembers: which messages it has already processed (de-duplication) and cheap
//! statistics over the distinct ones.
//!
//! Invariants kept here:
//!
//! * **At most once per identity.** A message is `(emitter_id, packet_id, index)` (invariant 3).
//!   [`AnalyzerState::record`] counts a message in the statistics only the first time its identity
//!   is seen; every later sighting only increments `duplicates`. The distributor redelivers after
//!   timeouts, so repeats are expected and must not inflate the counts.
//! * **Bounded memory (invariant 6).** De-duplication is keyed per *packet*, not per message: one
//!   map entry per `(emitter_id, packet_id)` holding a compact bitset of the indexes seen, plus a
//!   FIFO of packet keys in arrival order. At most `dedup_capacity_packets` packets are remembered;
//!   beyond that the oldest is forgotten and counted in `forgotten_packets`. The level, emitter and
//!   template counters are bounded too ([`BoundedCounter`]): new keys beyond the bound are folded
//!   into one [`OTHER`] bucket instead of growing the map.
//! * **Audit = what is remembered.** `/audit` lists the remembered packets' identities, so it is
//!   exact as long as nothing has been forgotten (`forgotten_packets == 0`).
//! * **Restored messages are identities only.** With an audit log (see [`crate::audit_log`]) the
//!   server replays, at start, the identities recorded by earlier runs through
//!   [`AnalyzerState::restore`]: they enter the de-duplication state in their original order and
//!   count in `processed` (and in `restored`), but the level, emitter and template statistics and
//!   `errors` are *not* restored (the log holds no message content). `error_rate` is therefore
//!   computed over the messages recorded since this start only.
//!
//! This module does no I/O and never awaits: the server wraps [`AnalyzerState`] in one
//! `std::sync::Mutex` and holds it only for the in-memory work of one call (invariant 9).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Bucket into which a bounded counter folds keys once it is full. Parenthesised so that it cannot
/// collide with a real (upper-cased) level, and is unlikely to collide with an emitter id.
pub const OTHER: &str = "(other)";
/// Most distinct levels counted by name.
pub const MAX_LEVELS: usize = 64;
/// Most distinct emitters counted by name.
pub const MAX_EMITTERS: usize = 10_000;
/// Most distinct message templates counted.
pub const MAX_TEMPLATES: usize = 10_000;
/// Longest template, in characters.
pub const TEMPLATE_CHARS: usize = 80;
/// How many templates `/status` reports.
pub const TOP_TEMPLATES: usize = 10;
/// Levels that count as errors in `errors` / `error_rate` (compared after upper-casing).
pub const ERROR_LEVELS: [&str; 3] = ["ERROR", "FATAL", "CRITICAL"];

/// Indexes below this are kept in a dense bitset (at most `DENSE_LIMIT / 8` = 512 bytes per
/// packet); the rare larger ones in a sorted set. Packets from the distributor hold at most
/// `limits.max_messages_per_packet` (1000 by default) messages, so they stay dense, while a client
/// sending `index: 4000000000` cannot make us allocate half a gigabyte.
const DENSE_LIMIT: u32 = 4096;

/// The set of message indexes seen for one packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenIndexes {
    dense: Vec<u64>,
    sparse: BTreeSet<u32>,
}

impl SeenIndexes {
    /// Add `index`; `true` if it was not there before.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= DENSE_LIMIT {
            return self.sparse.insert(index);
        }
        let word = (index / 64) as usize;
        let bit = 1u64 << (index % 64);
        if self.dense.len() <= word {
            self.dense.resize(word + 1, 0);
        }
        let fresh = self.dense[word] & bit == 0;
        self.dense[word] |= bit;
        fresh
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: u32) -> bool {
        if index >= DENSE_LIMIT {
            return self.sparse.contains(&index);
        }
        self.dense
            .get((index / 64) as usize)
            .is_some_and(|word| word & (1u64 << (index % 64)) != 0)
    }

    /// The indexes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let dense = self.dense.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u32)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| w as u32 * 64 + b)
        });
        dense.chain(self.sparse.iter().copied())
    }
}

/// One remembered packet as `/audit` needs it: cheap to clone out of the lock (two `Arc`s and the
/// compact index set), serialised outside it.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub emitter_id: Arc<str>,
    pub packet_id: Arc<str>,
    pub indexes: SeenIndexes,
}

/// Per-packet de-duplication with a FIFO bound.
///
/// A forgotten packet is gone for good: a repeat of one of its messages is no longer recognised (it
/// is counted as processed again), and `/audit` no longer lists its messages. `forgotten` says how
/// often that happened, so a reader of `/status` knows whether the counts are exact.
#[derive(Debug)]
struct Dedup {
    /// emitter_id → packet_id → indexes seen. Nested so lookups borrow `&str` without allocating.
    packets: HashMap<Arc<str>, HashMap<Arc<str>, SeenIndexes>>,
    /// Remembered packets, oldest first. Entry `i` has sequence number `front_seq + i`; the
    /// sequence numbers let `/audit` walk the FIFO in chunks while it changes underneath.
    order: VecDeque<(Arc<str>, Arc<str>)>,
    front_seq: u64,
    capacity: usize,
    forgotten: u64,
}

impl Dedup {
    fn new(capacity: usize) -> Self {
        Self {
            packets: HashMap::new(),
            order: VecDeque::new(),
            front_seq: 0,
            capacity: capacity.max(1),
            forgotten: 0,
        }
    }

    /// Remember `index` of packet `(emitter_id, packet_id)`; `true` if it was not remembered yet.
    /// A new packet is added at the back of the FIFO, and the oldest ones beyond the capacity are
    /// forgotten. Allocates only for a packet not remembered yet.
    fn insert(&mut self, emitter_id: &str, packet_id: &str, index: u32) -> bool {
        if let Some(seen) = self
            .packets
            .get_mut(emitter_id)
            .and_then(|of_emitter| of_emitter.get_mut(packet_id))
        {
            return seen.insert(index);
        }
        let emitter: Arc<str> = match self.packets.get_key_value(emitter_id) {
            Some((known, _)) => known.clone(),
            None => Arc::from(emitter_id),
        };
        let packet: Arc<str> = Arc::from(packet_id);
        let mut seen = SeenIndexes::default();
        seen.insert(index);
        self.packets
            .entry(emitter.clone())
            .or_default()
            .insert(packet.clone(), seen);
        self.order.push_back((emitter, packet));
        // The new packet is at the back and capacity >= 1, so it is never the one forgotten.
        while self.order.len() > self.capacity {
            self.forget_oldest();
        }
        true
    }

    /// Whether `index` of packet `(emitter_id, packet_id)` is remembered. Does not allocate.
    fn contains(&self, emitter_id: &str, packet_id: &str, index: u32) -> bool {
        self.packets
            .get(emitter_id)
            .and_then(|of_emitter| of_emitter.get(packet_id))
            .is_some_and(|seen| seen.contains(index))
    }

    fn forget_oldest(&mut self) {
        let Some((emitter, packet)) = self.order.pop_front() else {
            return;
        };
        self.front_seq += 1;
        self.forgotten += 1;
        if let Some(of_emitter) = self.packets.get_mut(&emitter) {
            of_emitter.remove(&packet);
            if of_emitter.is_empty() {
                self.packets.remove(&emitter);
            }
        }
    }

    /// Up to `max` remembered packets from sequence number `from` on (or from the oldest still
    /// remembered, if `from` was forgotten meanwhile), and the sequence number to continue from.
    fn chunk(&self, from: u64, max: usize) -> (Vec<AuditEntry>, u64) {
        let start = from.max(self.front_seq);
        let offset = usize::try_from(start - self.front_seq).unwrap_or(usize::MAX);
        let entries: Vec<AuditEntry> = self
            .order
            .iter()
            .skip(offset)
            .take(max)
            .filter_map(|(emitter, packet)| {
                let indexes = self.packets.get(emitter)?.get(packet)?.clone();
                Some(AuditEntry {
                    emitter_id: emitter.clone(),
                    packet_id: packet.clone(),
                    indexes,
                })
            })
            .collect();
        let next = start + entries.len() as u64;
        (entries, next)
    }
}

/// A counter per key, with at most `max_keys` keys; later new keys count under [`OTHER`].
#[derive(Debug, Clone)]
pub struct BoundedCounter {
    counts: HashMap<String, u64>,
    other: u64,
    max_keys: usize,
}

impl BoundedCounter {
    pub fn new(max_keys: usize) -> Self {
        Self {
            counts: HashMap::new(),
            other: 0,
            max_keys,
        }
    }

    /// Count one more `key`. Allocates only for a key not yet counted.
    pub fn add(&mut self, key: &str) {
        if let Some(n) = self.counts.get_mut(key) {
            *n += 1;
        } else if self.counts.len() < self.max_keys {
            self.counts.insert(key.to_owned(), 1);
        } else {
            self.other += 1;
        }
    }

    /// Number of keys counted by name (the [`OTHER`] bucket excluded).
    #[cfg(test)]
    fn named_keys(&self) -> usize {
        self.counts.len()
    }

    /// All counts, sorted by key, with [`OTHER`] added (to any real key of that name) if used.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        let mut map: BTreeMap<String, u64> =
            self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if self.other > 0 {
            *map.entry(OTHER.to_owned()).or_default() += self.other;
        }
        map
    }

    /// The `n` largest counts, largest first (ties by key, so the answer is stable). The
    /// [`OTHER`] bucket is not a key and is never listed.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(&String, &u64)> = self.counts.iter().collect();
        all.sort_unstable_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .take(n)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// The shape of a message with its variable parts removed: every run of ASCII digits becomes one
/// `#`, and the result is cut to [`TEMPLATE_CHARS`] characters. Only that many characters are read,
/// so a huge message costs no more than a short one.
pub fn template_of(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(TEMPLATE_CHARS));
    let mut written = 0;
    let mut in_digits = false;
    for c in message.chars() {
        let c = if c.is_ascii_digit() {
            if in_digits {
                continue;
            }
            in_digits = true;
            '#'
        } else {
            in_digits = false;
            c
        };
        if written == TEMPLATE_CHARS {
            break;
        }
        out.push(c);
        written += 1;
    }
    out
}

/// Whether a message was seen for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    New,
    Duplicate,
}

/// Everything `/status` reports, copied out of the lock.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Statistics {
    /// Distinct messages processed, including those restored from the audit log at start.
    pub processed: u64,
    /// Of `processed`, the messages restored from the audit log at start. They are in no other
    /// count below: the log holds identities, not levels or texts.
    pub restored: u64,
    pub duplicates: u64,
    pub by_level: BTreeMap<String, u64>,
    pub by_emitter: BTreeMap<String, u64>,
    pub errors: u64,
    /// `errors` over the messages processed since this start (`processed - restored`).
    pub error_rate: f64,
    pub top_templates: Vec<TemplateCount>,
    pub dedup_capacity_packets: usize,
    pub remembered_packets: usize,
    pub forgotten_packets: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TemplateCount {
    pub template: String,
    pub count: u64,
}

/// The analyzer's whole mutable state. Lives behind one mutex in the server.
#[derive(Debug)]
pub struct AnalyzerState {
    /// While `false`, `/analyze` is refused and records nothing. Kept under the same lock as the
    /// counts so that a batch checked as "enabled" is recorded before a concurrent disable returns.
    pub enabled: bool,
    dedup: Dedup,
    /// Distinct messages processed since start (forgotten packets' messages included), plus those
    /// restored from the audit log.
    processed: u64,
    /// Messages counted in `processed` by [`AnalyzerState::restore`] rather than recorded.
    restored: u64,
    duplicates: u64,
    errors: u64,
    by_level: BoundedCounter,
    by_emitter: BoundedCounter,
    templates: BoundedCounter,
}

impl AnalyzerState {
    pub fn new(dedup_capacity_packets: usize) -> Self {
        Self {
            enabled: true,
            dedup: Dedup::new(dedup_capacity_packets),
            processed: 0,
            restored: 0,
            duplicates: 0,
            errors: 0,
            by_level: BoundedCounter::new(MAX_LEVELS),
            by_emitter: BoundedCounter::new(MAX_EMITTERS),
            templates: BoundedCounter::new(MAX_TEMPLATES),
        }
    }

    /// Record one (already validated) message. Statistics change only if its identity is new.
    pub fn record(
        &mut self,
        emitter_id: &str,
        packet_id: &str,
        index: u32,
        level: &str,
        message: &str,
    ) -> Sighting {
        if !self.dedup.insert(emitter_id, packet_id, index) {
            self.duplicates += 1;
            return Sighting::Duplicate;
        }
        self.processed += 1;
        let level = level.to_uppercase();
        if ERROR_LEVELS.contains(&level.as_str()) {
            self.errors += 1;
        }
        self.by_level.add(&level);
        self.by_emitter.add(emitter_id);
        self.templates.add(&template_of(message));
        Sighting::New
    }

    /// Whether the message `(emitter_id, packet_id, index)` is remembered, i.e. [`Self::record`]
    /// would call it a duplicate. Lets the server decide what a request would record, and write
    /// that to the audit log, before it changes anything.
    pub fn is_remembered(&self, emitter_id: &str, packet_id: &str, index: u32) -> bool {
        self.dedup.contains(emitter_id, packet_id, index)
    }

    /// Count one duplicate sighting without looking the message up: for a message the server has
    /// already classified as a repeat (see [`Self::is_remembered`]).
    pub fn count_duplicate(&mut self) {
        self.duplicates += 1;
    }

    /// Remember a message recorded by an earlier run (replayed from the audit log): it enters the
    /// de-duplication state exactly like [`Self::record`] would put it there, and counts in
    /// `processed` and `restored`, but in none of the level, emitter, template or error counts.
    /// A message already remembered changes nothing (not even `duplicates`): a replay is not a
    /// sighting.
    pub fn restore(&mut self, emitter_id: &str, packet_id: &str, index: u32) -> Sighting {
        if !self.dedup.insert(emitter_id, packet_id, index) {
            return Sighting::Duplicate;
        }
        self.processed += 1;
        self.restored += 1;
        Sighting::New
    }

    /// `(distinct messages processed, duplicates seen)`.
    pub fn totals(&self) -> (u64, u64) {
        (self.processed, self.duplicates)
    }

    pub fn statistics(&self) -> Statistics {
        let recorded = self.processed - self.restored;
        let error_rate = if recorded == 0 {
            0.0
        } else {
            self.errors as f64 / recorded as f64
        };
        Statistics {
            processed: self.processed,
            restored: self.restored,
            duplicates: self.duplicates,
            by_level: self.by_level.to_map(),
            by_emitter: self.by_emitter.to_map(),
            errors: self.errors,
            error_rate,
            top_templates: self
                .templates
                .top(TOP_TEMPLATES)
                .into_iter()
                .map(|(template, count)| TemplateCount { template, count })
                .collect(),
            dedup_capacity_packets: self.dedup.capacity,
            remembered_packets: self.dedup.order.len(),
            forgotten_packets: self.dedup.forgotten,
        }
    }

    /// A chunk of the remembered packets for `/audit`; see [`Dedup::chunk`]. Start with `from = 0`
    /// and continue with the returned cursor until the chunk is empty.
    pub fn audit_chunk(&self, from: u64, max_packets: usize) -> (Vec<AuditEntry>, u64) {
        self.dedup.chunk(from, max_packets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_replace_each_digit_run_with_one_hash() {
        assert_eq!(template_of("user 42 logged in"), "user # logged in");
        assert_eq!(template_of("a1b22c333"), "a#b#c#");
        assert_eq!(template_of("2024-05-01T12:00:00Z"), "#-#-#T#:#:#Z");
        assert_eq!(template_of("no digits"), "no digits");
    }

    #[test]
    fn templates_are_cut_to_80_characters_not_bytes() {
        let long = "é".repeat(200);
        let t = template_of(&long);
        assert_eq!(t.chars().count(), TEMPLATE_CHARS);
        let digits = format!("{}{}", "x".repeat(79), "1234567");
        assert_eq!(template_of(&digits), format!("{}#", "x".repeat(79)));
    }

    #[test]
    fn a_bounded_counter_folds_new_keys_into_other_once_full() {
        let mut c = BoundedCounter::new(2);
        for k in ["a", "b", "a", "c", "d", "b"] {
            c.add(k);
        }
        assert_eq!(c.named_keys(), 2);
        let m = c.to_map();
        assert_eq!(m.get("a"), Some(&2));
        assert_eq!(m.get("b"), Some(&2));
        assert_eq!(m.get(OTHER), Some(&2));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn top_lists_the_largest_counts_first_with_ties_by_key() {
        let mut c = BoundedCounter::new(10);
        for k in ["x", "y", "y", "z", "z", "w"] {
            c.add(k);
        }
        assert_eq!(
            c.top(3),
            vec![("y".into(), 2), ("z".into(), 2), ("w".into(), 1)]
        );
    }

    #[test]
    fn state_maps_stay_bounded_under_many_distinct_keys() {
        let mut s = AnalyzerState::new(10);
        for i in 0..(MAX_EMITTERS + 50) {
            let e = format!("e{i}");
            s.record(
                &e,
                "p",
                0,
                &format!("L{i}"),
                &format!("m{i} {}", "x".repeat(i % 97)),
            );
        }
        assert!(s.by_emitter.named_keys() <= MAX_EMITTERS);
        assert!(s.by_level.named_keys() <= MAX_LEVELS);
        assert!(s.templates.named_keys() <= MAX_TEMPLATES);
        assert_eq!(s.dedup.order.len(), 10);
        assert_eq!(s.dedup.packets.len(), 10);
        let st = s.statistics();
        assert_eq!(st.by_emitter.values().sum::<u64>(), st.processed);
        assert_eq!(st.by_level.values().sum::<u64>(), st.processed);
    }

    #[test]
    fn seen_indexes_handle_dense_and_huge_indexes_compactly() {
        let mut seen = SeenIndexes::default();
        assert!(seen.insert(3));
        assert!(!seen.insert(3));
        assert!(seen.insert(u32::MAX));
        assert!(seen.insert(64));
        assert_eq!(seen.iter().collect::<Vec<_>>(), vec![3, 64, u32::MAX]);
        assert!(seen.dense.len() <= 2, "huge index must not grow the bitset");
    }

    #[test]
    fn a_repeat_is_a_duplicate_until_its_packet_is_forgotten() {
        let mut s = AnalyzerState::new(2);
        assert_eq!(s.record("e", "p1", 0, "info", "m"), Sighting::New);
        assert_eq!(s.record("e", "p1", 0, "info", "m"), Sighting::Duplicate);
        s.record("e", "p2", 0, "info", "m");
        s.record("e", "p3", 0, "info", "m");
        assert_eq!(s.statistics().forgotten_packets, 1);
        assert_eq!(s.record("e", "p1", 0, "info", "m"), Sighting::New);
        assert_eq!(s.totals(), (4, 1));
    }

    #[test]
    fn restored_messages_are_remembered_and_processed_but_not_in_the_statistics() {
        let mut s = AnalyzerState::new(10);
        assert_eq!(s.restore("e", "p", 0), Sighting::New);
        assert_eq!(s.restore("e", "p", 1), Sighting::New);
        assert_eq!(s.restore("e", "p", 1), Sighting::Duplicate);
        assert!(s.is_remembered("e", "p", 1));
        assert!(!s.is_remembered("e", "p", 2));
        assert!(!s.is_remembered("e", "q", 0));

        assert_eq!(s.record("e", "p", 1, "INFO", "m"), Sighting::Duplicate);
        assert_eq!(s.record("e", "p", 2, "ERROR", "m"), Sighting::New);

        let st = s.statistics();
        assert_eq!((st.processed, st.restored, st.duplicates), (3, 2, 1));
        assert_eq!(st.by_level, BTreeMap::from([("ERROR".to_owned(), 1)]));
        assert_eq!(
            st.error_rate, 1.0,
            "over messages recorded since start only"
        );
    }

    #[test]
    fn seen_indexes_contains_exactly_what_was_inserted() {
        let mut seen = SeenIndexes::default();
        for i in [0, 63, 64, 4095, 4096, u32::MAX] {
            assert!(!seen.contains(i));
            seen.insert(i);
            assert!(seen.contains(i));
        }
        assert!(!seen.contains(1) && !seen.contains(200) && !seen.contains(5000));
    }

    #[test]
    fn audit_chunks_resume_after_packets_are_forgotten_meanwhile() {
        let mut s = AnalyzerState::new(3);
        for p in ["p0", "p1", "p2"] {
            s.record("e", p, 0, "I", "m");
        }
        let (first, cursor) = s.audit_chunk(0, 1);
        assert_eq!(&*first[0].packet_id, "p0");
        // Two new packets push p0 and p1 out before the next chunk is taken.
        s.record("e", "p3", 0, "I", "m");
        s.record("e", "p4", 0, "I", "m");
        let (rest, cursor) = s.audit_chunk(cursor, 10);
        let ids: Vec<&str> = rest.iter().map(|e| &*e.packet_id).collect();
        assert_eq!(ids, vec!["p2", "p3", "p4"]);
        assert!(s.audit_chunk(cursor, 10).0.is_empty());
    }
}
