//! Synthetic log packets.
//!
//! Why it exists: the emitter's job is to put realistic load on the distributor and then prove
//! where every acknowledged message went, so what it sends must be (a) shaped like real logs
//! (mixed levels, varied text) and (b) uniquely identifiable.
//!
//! Invariants:
//! * **Packet ids never repeat**, not even across emitter restarts: a packet id is
//!   `<run_id>-<n>`, where `run_id` mixes the start time in nanoseconds with the process id and
//!   `n` counts up within the run. The distributor de-duplicates on `(emitter_id, packet_id)`, so
//!   a reused id would make a new packet look like a retry and silently drop it.
//! * **Deterministic given a seed**: [`Generator::new`] with the same run id and seed, asked for
//!   the same packets at the same timestamp, produces byte-identical packets (tests rely on it).
//!   No external PRNG crate: [`SplitMix64`] is a dozen lines and good enough for log text.
//! * Every packet it makes passes `logdist_proto::parse_packet` (at least one message, non-empty
//!   ids, level and text, an integer millisecond timestamp, an object as metadata).

use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

/// One packet as sent in the body of `POST /logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutPacket {
    pub emitter_id: String,
    pub packet_id: String,
    pub messages: Vec<OutMessage>,
}

/// One log message. Its identity is `(emitter_id, packet_id, index in messages)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutMessage {
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub level: &'static str,
    pub message: String,
    pub metadata: Metadata,
}

/// Metadata attached to every message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metadata {
    /// `node-N`, a made-up origin host.
    pub host: String,
    /// Sequence number of the message within this generator (run), from 0.
    pub seq: u64,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and statistically fine for synthetic data.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0). Multiply-shift: the bias is below 2^-32 for the
    /// small ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// `emitter-1`, `emitter-2`, ...: the identity of the `n`-th emitter (1-based).
pub fn emitter_id(n: u32) -> String {
    format!("emitter-{n}")
}

/// A run id that differs between any two emitter processes: the start time in nanoseconds and the
/// pid, in hex. Two processes would need the same pid in the same nanosecond to collide.
pub fn new_run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default() as u64;
    format!("{nanos:016x}{:06x}", std::process::id())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Number of made-up hosts named in metadata (`node-1` .. `node-8`).
const HOSTS: u64 = 8;

/// Makes packets with unique ids and realistic messages.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: SplitMix64,
    run_id: String,
    next_packet: u64,
    next_seq: u64,
}

impl Generator {
    /// A deterministic generator: same `run_id` and `seed`, same packets.
    pub fn new(run_id: impl Into<String>, seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            run_id: run_id.into(),
            next_packet: 0,
            next_seq: 0,
        }
    }

    /// A generator for this process: a fresh [`new_run_id`], seeded from the clock and the pid.
    pub fn for_this_run() -> Self {
        let run_id = new_run_id();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
            ^ (u64::from(std::process::id()) << 32);
        Self::new(run_id, seed)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The next packet of `messages` messages (at least one is made even if 0 is asked), stamped now.
    pub fn next_packet(&mut self, emitter_id: &str, messages: u32) -> OutPacket {
        self.next_packet_at(emitter_id, messages, now_ms())
    }

    /// Like [`Generator::next_packet`] with a given timestamp, so tests can compare packets.
    pub fn next_packet_at(
        &mut self,
        emitter_id: &str,
        messages: u32,
        timestamp_ms: u64,
    ) -> OutPacket {
        let packet_id = format!("{}-{}", self.run_id, self.next_packet);
        self.next_packet += 1;
        let messages = (0..messages.max(1))
            .map(|_| self.next_message(timestamp_ms))
            .collect();
        OutPacket {
            emitter_id: emitter_id.to_owned(),
            packet_id,
            messages,
        }
    }

    fn next_message(&mut self, timestamp: u64) -> OutMessage {
        let level = match self.rng.below(100) {
            0..70 => "INFO",
            70..85 => "WARN",
            85..95 => "ERROR",
            _ => "DEBUG",
        };
        let message = self.next_text();
        let host = format!("node-{}", 1 + self.rng.below(HOSTS));
        let seq = self.next_seq;
        self.next_seq += 1;
        OutMessage {
            timestamp,
            level,
            message,
            metadata: Metadata { host, seq },
        }
    }

    fn next_text(&mut self) -> String {
        let r = &mut self.rng;
        match r.below(12) {
            0 => format!(
                "user {} logged in from 10.0.{}.{}",
                r.below(10_000),
                r.below(256),
                1 + r.below(254)
            ),
            1 => format!(
                "request /api/orders/{} took {} ms",
                r.below(100_000),
                1 + r.below(900)
            ),
            2 => format!("cache miss for key session:{:x}", r.next_u64() >> 16),
            3 => format!(
                "payment {} authorised for {} cents",
                r.below(1_000_000),
                100 + r.below(50_000)
            ),
            4 => format!("disk usage at {}% on /var/lib/data", 40 + r.below(60)),
            5 => format!("connection pool exhausted, {} waiters", 1 + r.below(64)),
            6 => format!("retrying upstream call to inventory ({}/5)", 1 + r.below(5)),
            7 => format!(
                "order {} shipped from warehouse {}",
                r.below(100_000),
                1 + r.below(12)
            ),
            8 => format!(
                "job {} finished in {} ms with {} items",
                r.below(10_000),
                1 + r.below(60_000),
                r.below(5_000)
            ),
            9 => format!(
                "rejected request with malformed header from 10.0.{}.{}",
                r.below(256),
                1 + r.below(254)
            ),
            10 => format!(
                "gc pause of {} ms, heap {} MB",
                1 + r.below(250),
                64 + r.below(4_000)
            ),
            _ => format!(
                "user {} logged out after {} s",
                r.below(10_000),
                1 + r.below(7_200)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logdist_proto::{parse_packet, Limits};
    use std::collections::HashSet;

    #[test]
    fn packet_ids_are_unique_within_a_run_and_across_runs() {
        let mut a = Generator::new("run-a", 1);
        let mut b = Generator::new("run-b", 1);
        let mut ids = HashSet::new();
        for _ in 0..1000 {
            assert!(ids.insert(a.next_packet("emitter-1", 1).packet_id));
            assert!(ids.insert(b.next_packet("emitter-1", 1).packet_id));
        }
    }

    #[test]
    fn run_ids_of_two_generators_differ() {
        let first = Generator::for_this_run();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let second = Generator::for_this_run();
        assert_ne!(first.run_id(), second.run_id());
    }

    #[test]
    fn the_same_seed_gives_the_same_packets_and_another_seed_does_not() {
        let make = |seed| {
            let mut g = Generator::new("run", seed);
            (0..20)
                .map(|i| g.next_packet_at(&emitter_id(i % 5 + 1), 50, 1_700_000_000_000))
                .collect::<Vec<_>>()
        };
        assert_eq!(make(42), make(42));
        assert_ne!(make(42), make(43));
    }

    #[test]
    fn every_generated_packet_parses_as_a_valid_packet() {
        let mut g = Generator::new("run", 7);
        for n in [1, 2, 50, 1000] {
            let packet = g.next_packet("emitter-1", n);
            let body = serde_json::to_vec(&packet).unwrap();
            let parsed = parse_packet(&body, &Limits::default()).unwrap();
            assert_eq!(parsed.count, n);
            assert_eq!(parsed.packet_id, packet.packet_id);
        }
    }

    #[test]
    fn levels_follow_the_intended_mix() {
        let mut g = Generator::new("run", 3);
        let packet = g.next_packet_at("emitter-1", 20_000, 1);
        let share = |level: &str| {
            packet.messages.iter().filter(|m| m.level == level).count() as f64 / 200.0
        };
        for (level, pct) in [
            ("INFO", 70.0),
            ("WARN", 15.0),
            ("ERROR", 10.0),
            ("DEBUG", 5.0),
        ] {
            assert!(
                (share(level) - pct).abs() < 2.0,
                "{level}: {}",
                share(level)
            );
        }
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(0);
        assert!((0..10_000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
    }
}
