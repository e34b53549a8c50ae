//! Crash test for the WAL, in the style of sled's own crash tests: this test binary re-runs itself
//! as a child process that appends, flushes and removes records as fast as it can, kills it at a
//! random moment, reopens the WAL and checks it against a model of what the child reported.
//!
//! # The protocol
//! The child ([`crash_child_appends_flushes_and_removes_until_killed`]) only does something when
//! `LOGDIST_WAL_CRASH_CHILD=<dir>` is set; in a normal `cargo test` run it returns at once. It
//! numbers packets from `LOGDIST_WAL_CRASH_START`; packet `n` has the identity
//! `(wal-crash, n<n>)` and content derived from `n` alone ([`messages_of`]), so any record read
//! back can be checked byte for byte against its identity. For each `n` it prints, each line
//! flushed to the pipe before the next step starts:
//!
//! ```text
//! w n        about to append n
//! W n seq    append returned: n was stored as seq (not durable yet)
//! A n        flush returned: n is acknowledged (durable)
//! r n1 n2..  about to remove these records (remove_delivered, not flushed)
//! R n1 n2..  remove_delivered returned
//! F          a flush after removals returned (so did every `A`: both make earlier removals durable)
//! X point n  about to abort at a deterministic point (see `AbortPoint`)
//! ```
//! Lines in the pipe survive the child's death, so the parent knows at least everything the child
//! did up to its last line, and at most one step more.
//!
//! # What the parent checks after every kill
//! * every acknowledged record (`A`) is present with byte-identical content, unless a removal of it
//!   started (`r`); a removal may be undone by the crash (removals are not flushed, so a delivered
//!   record can come back and be delivered again), but a record never removed never disappears;
//! * a removal followed by a returned flush is durable: that record never comes back;
//! * a record whose flush returned is present even if the child died before printing `A`;
//! * every record present is one the child wrote or the parent appended, and its content, count and
//!   `accepted_at_ms` match its identity and its seq matches the one the child was given (no torn
//!   or mixed records), and nothing was quarantined;
//! * (a `remove_delivered` call is NOT checked for atomicity: it removes record by record, and a
//!   crash part-way only makes the rest of its records pending again, to be delivered again);
//! * the pending counts recovery reports equal the records actually there;
//! * sequence numbers never go back: every append, in the child and in the parent's probe append
//!   after each recovery, gets a seq above every seq that was ever durable. (A seq handed out to an
//!   append that was never flushed and was lost in the crash can be handed out again: nothing
//!   outside the process ever saw it, because the dispatcher reads only below the durable horizon.
//!   The test counts and prints such reuses but does not fail on them.)
//!
//! Records present after a check become part of the model (the parent flushes after checking), so
//! a record that survived one crash must survive every later one unless it is removed, and a record
//! found absent must never come back.
//!
//! # What a process kill shows, and what it does not
//! SIGKILL (and `abort()`) stop the process at an arbitrary instruction: whatever sled still held
//! in its own memory buffers is lost, and its recovery has to deal with a log cut at that point:
//! in the middle of a batch, a flush, a removal, or sled's own open and recovery (the child needs
//! ~40 ms to reach `Wal::open`, and kill delays start at 5 ms). So the test checks, at a few
//! hundred random cut points per run plus the four fixed ones, that an acknowledgement is never
//! given before sled has handed the record to the kernel, that recovery returns no torn, mixed,
//! resurrected or missing record, and that the WAL's own bookkeeping (seqs, counts, dedup keys,
//! batches) survives the process dying. It is evidence from sampling, not a proof.
//!
//! It does NOT simulate power loss or a kernel crash: the page cache survives a killed process,
//! so data written with `write(2)` but never `fsync`ed is still read back. A `flush()` that wrote
//! sled's buffers but skipped the `fsync` would pass this test (one that skipped sled's flush
//! entirely does not: that was tried). Neither does it model a disk that reorders or tears writes.
//! That needs a VM that is cut off, or a block/filesystem layer that drops unsynced writes
//! (dm-log-writes, LazyFS, CrashMonkey); it is not done here.
//!
//! # Running it
//! Each cycle ends the child one of three ways: after a random delay of 5-300 ms, after a random
//! number (1-600) of its output lines, or (every 4th cycle, taking the four [`AbortPoint`]s in
//! turn) by its own `abort()` at a fixed point. Default: 30 cycles, ~5 s.
//! `LOGDIST_WAL_CRASH_CYCLES=1000` for a long run. The random seed is printed first;
//! `LOGDIST_WAL_CRASH_SEED=<seed>` replays the same plan (delays, line counts, abort points, the
//! child's choices), though where a timed kill lands still depends on timing.

// `is_multiple_of` needs Rust 1.87; the workspace's `rust-version` is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use distributor::wal::{Appended, Wal};
use logdist_proto::{parse_packet, Limits};

const CHILD_TEST: &str = "crash_child_appends_flushes_and_removes_until_killed";
const CHILD_DIR_ENV: &str = "LOGDIST_WAL_CRASH_CHILD";
const START_ENV: &str = "LOGDIST_WAL_CRASH_START";
const CHILD_SEED_ENV: &str = "LOGDIST_WAL_CRASH_CHILD_SEED";
const ABORT_ENV: &str = "LOGDIST_WAL_CRASH_ABORT";
const CYCLES_ENV: &str = "LOGDIST_WAL_CRASH_CYCLES";
const SEED_ENV: &str = "LOGDIST_WAL_CRASH_SEED";

const EMITTER: &str = "wal-crash";
const CACHE_BYTES: u64 = 8 << 20;
/// `trim_dedup` is never called here, so the retention does not matter.
const DEDUP_RETENTION: u64 = 1 << 20;
/// How long a child may take to reach a line count or an abort point before the test gives up.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);
/// The child stops by itself after this long, in case the parent died without killing it.
const CHILD_MAX_LIFETIME: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Content derived from the counter

/// The `messages` array of packet `n`: 1-4 messages, of varying size (now and then ~64 KiB, to
/// cross sled's buffer and segment boundaries), with `n` in every message.
fn messages_of(n: u64) -> String {
    let count = count_of(n);
    let filler_len = if n % 61 == 0 {
        64 << 10
    } else {
        (n.wrapping_mul(2_654_435_761) % 1_500) as usize
    };
    let filler: String = format!("{n:x}-").chars().cycle().take(filler_len).collect();
    let msgs: Vec<String> = (0..u64::from(count))
        .map(|i| {
            format!(
                r#"{{"timestamp":{},"level":"INFO","message":"n={n} i={i} {filler}"}}"#,
                n * 10 + i
            )
        })
        .collect();
    format!("[{}]", msgs.join(","))
}

fn count_of(n: u64) -> u32 {
    1 + (n % 4) as u32
}

fn body_of(n: u64) -> String {
    format!(
        r#"{{"emitter_id":"{EMITTER}","packet_id":"n{n}","messages":{}}}"#,
        messages_of(n)
    )
}

fn n_of(packet_id: &str) -> Option<u64> {
    packet_id.strip_prefix('n')?.parse().ok()
}

/// A tiny xorshift64: enough to vary the plan, and reproducible from a printed seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that 0 and nearby seeds give unrelated, non-zero states.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where a child aborts on purpose, so each point is hit whatever the timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AbortPoint {
    /// `append` returned, `flush` not called: the record may or may not survive.
    AfterAppend,
    /// `flush` returned, `A` not printed: the record must survive although never acknowledged.
    AfterFlush,
    /// A removal split in two `remove_delivered` calls, abort between them: the first half may
    /// come back, the second half was never removed and must be there.
    MidRemoval,
    /// The newest record removed and the removal flushed: it must be gone, and its seq must still
    /// never be handed out again (the highest seq ever used is no longer a record's key).
    AfterRemovalFlush,
}

impl AbortPoint {
    const ALL: [AbortPoint; 4] = [
        Self::AfterAppend,
        Self::AfterFlush,
        Self::MidRemoval,
        Self::AfterRemovalFlush,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::AfterAppend => "after-append",
            Self::AfterFlush => "after-flush",
            Self::MidRemoval => "mid-removal",
            Self::AfterRemovalFlush => "after-removal-flush",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

// ---------------------------------------------------------------------------------------------
// The child

#[test]
fn crash_child_appends_flushes_and_removes_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return; // Not started by the crash test: nothing to do.
    };
    let env_u64 = |name: &str| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("child needs {name}"))
    };
    let start = env_u64(START_ENV);
    let mut rng = XorShift::new(env_u64(CHILD_SEED_ENV));
    // "after-flush:123": abort at that point once the counter reaches 123.
    let abort = std::env::var(ABORT_ENV).ok().map(|v| {
        let (point, at) = v.split_once(':').expect("point:n");
        (
            AbortPoint::parse(point).expect("abort point"),
            at.parse::<u64>().expect("abort n"),
        )
    });
    let aborts_here =
        |point: AbortPoint, n: u64| abort.is_some_and(|(p, at)| p == point && n >= at);

    let stdout = std::io::stdout();
    let say = |line: &str| {
        let mut out = stdout.lock();
        // The parent is gone if the pipe is: stop.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(3);
        }
    };
    // libtest printed "test <name> ... " without a newline; start our lines on a fresh one.
    say("");

    let (wal, recovered) = open_when_unlocked(Path::new(&dir));
    say(&format!("O {} {}", recovered.records, recovered.messages));
    // Records this child may remove: what it found at start, then what it acknowledges.
    let mut removable: Vec<(u64, u64, u32)> = wal
        .read_pending(0, usize::MAX)
        .expect("child reads the WAL")
        .iter()
        .map(|r| (n_of(r.packet_id()).expect("known identity"), r.seq, r.count))
        .collect();

    let born = Instant::now();
    for n in start.. {
        if born.elapsed() > CHILD_MAX_LIFETIME {
            std::process::exit(4);
        }
        let body = body_of(n);
        let packet = parse_packet(body.as_bytes(), &Limits::default()).expect("valid packet");
        say(&format!("w {n}"));
        let seq = match wal.append(&packet, n).expect("append") {
            Appended::New { seq } => seq,
            Appended::Duplicate { seq } => {
                panic!("n{n} is new but the WAL says duplicate of {seq}")
            }
        };
        say(&format!("W {n} {seq}"));
        if aborts_here(AbortPoint::AfterAppend, n) {
            say(&format!("X after-append {n}"));
            std::process::abort();
        }
        wal.flush().expect("flush");
        if aborts_here(AbortPoint::AfterFlush, n) {
            say(&format!("X after-flush {n}"));
            std::process::abort();
        }
        say(&format!("A {n}"));
        removable.push((n, seq, packet.count));

        if aborts_here(AbortPoint::AfterRemovalFlush, n) {
            // The newest record, the one with the highest seq ever used, delivered and removed.
            say(&format!("r {n}"));
            wal.remove_delivered(&[(seq, packet.count)])
                .expect("remove_delivered");
            say(&format!("R {n}"));
            wal.flush().expect("flush");
            say("F");
            say(&format!("X after-removal-flush {n}"));
            std::process::abort();
        }
        // Remove some acknowledged records now and then, more when many are pending; often the
        // newest (a quick analyzer), and flush after half of the removals (as the dispatcher's
        // `flush_soon` does).
        let mid_removal = aborts_here(AbortPoint::MidRemoval, n) && removable.len() >= 2;
        if mid_removal || removable.len() > 48 || rng.below(3) == 0 {
            let k = (if mid_removal { 2 } else { 1 } + rng.below(3) as usize).min(removable.len());
            let mut chosen: Vec<(u64, u64, u32)> = (0..k)
                .map(|_| {
                    let newest = removable.len() - 1;
                    let i = if rng.below(2) == 0 {
                        newest
                    } else {
                        rng.below(removable.len() as u64) as usize
                    };
                    removable.swap_remove(i)
                })
                .collect();
            // Split into batches, each one `remove_delivered` call, as the dispatcher would.
            let second = if mid_removal || (k > 1 && rng.below(2) == 0) {
                chosen.split_off(k / 2)
            } else {
                Vec::new()
            };
            for (i, batch) in [chosen, second].iter().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                if i == 1 && mid_removal {
                    let ns: Vec<String> = batch.iter().map(|r| r.0.to_string()).collect();
                    say(&format!("X mid-removal {n} {}", ns.join(" ")));
                    std::process::abort();
                }
                let ns: Vec<String> = batch.iter().map(|r| r.0.to_string()).collect();
                let ns = ns.join(" ");
                say(&format!("r {ns}"));
                let records: Vec<(u64, u32)> = batch.iter().map(|&(_, s, c)| (s, c)).collect();
                wal.remove_delivered(&records).expect("remove_delivered");
                say(&format!("R {ns}"));
            }
            if rng.below(2) == 0 {
                wal.flush().expect("flush");
                say("F");
            }
        }
    }
}

/// Open the WAL, waiting while the previous owner still holds sled's lock: sled releases its
/// file lock when its background threads finish, which can be a moment after the `Db` is dropped.
fn open_when_unlocked(dir: &Path) -> (Wal, distributor::wal::Recovered) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Wal::open(dir, CACHE_BYTES, DEDUP_RETENTION) {
            Ok(opened) => return opened,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("child opens the WAL: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent

#[derive(Debug, Clone, Copy)]
enum Plan {
    KillAfter(Duration),
    KillAfterLines(usize),
    Abort(AbortPoint, u64),
}

/// What the parent knows, carried across cycles.
#[derive(Default)]
struct Model {
    /// The next counter value nobody used yet.
    next_n: u64,
    /// Records that must be present after the next crash: acknowledged, or found present (and
    /// flushed) after an earlier crash, and no removal of them started.
    must_exist: BTreeSet<u64>,
    /// Records the last child touched without making them certain: written but not flushed, or
    /// being removed. They may or may not be present.
    may_exist: BTreeSet<u64>,
    /// Removed (`R`), no flush returned since: may come back.
    removed_unflushed: Vec<u64>,
    /// Removed, and a flush returned after the removal: must be gone.
    removed_durably: BTreeSet<u64>,
    /// The seq each record was stored under, as far as anyone reported it.
    seq_of: BTreeMap<u64, u64>,
    /// The highest seq that was ever durable.
    max_durable_seq: Option<u64>,
    /// Seqs of appends that were not durable and lost, handed out again (allowed, counted).
    reused_volatile_seqs: u64,
    /// The highest seq handed out so far, durable or not.
    max_seen_seq: Option<u64>,
}

struct ChildRun {
    lines: Vec<String>,
    status: ExitStatus,
    stderr: String,
}

impl Model {
    fn note_seq(&mut self, n: u64, seq: u64, who: &str) -> Result<(), String> {
        if let Some(max) = self.max_durable_seq {
            if seq <= max {
                return Err(format!(
                    "{who}: n{n} got seq {seq}, but seq {max} was already durable: seq reused"
                ));
            }
        }
        if self.max_seen_seq.is_some_and(|max| seq <= max) {
            self.reused_volatile_seqs += 1;
        }
        self.max_seen_seq = self.max_seen_seq.max(Some(seq));
        if let Some(old) = self.seq_of.insert(n, seq) {
            return Err(format!("{who}: n{n} stored twice (seq {old}, then {seq})"));
        }
        Ok(())
    }

    /// A flush returned: every removal before it is durable too.
    fn note_flushed(&mut self) {
        self.removed_durably
            .extend(self.removed_unflushed.drain(..));
    }

    fn note_durable(&mut self, n: u64) {
        self.note_flushed();
        self.must_exist.insert(n);
        self.may_exist.remove(&n);
        if let Some(&seq) = self.seq_of.get(&n) {
            self.max_durable_seq = self.max_durable_seq.max(Some(seq));
        }
    }

    /// Fold the child's report into the model.
    fn absorb(&mut self, run: &ChildRun, plan: Plan) -> Result<(), String> {
        let mut aborted_at = None;
        for line in &run.lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some((&tag, rest)) = words.split_first() else {
                continue;
            };
            let nums: Vec<u64> = rest.iter().filter_map(|w| w.parse().ok()).collect();
            match (tag, nums.as_slice()) {
                ("w", &[n]) => {
                    if n != self.next_n {
                        return Err(format!("child wrote n{n}, expected n{}", self.next_n));
                    }
                    self.next_n = n + 1;
                    self.may_exist.insert(n);
                }
                ("W", &[n, seq]) => self.note_seq(n, seq, "child")?,
                ("A", &[n]) => self.note_durable(n),
                ("r", ns) => {
                    for &n in ns {
                        self.must_exist.remove(&n);
                        self.may_exist.insert(n);
                    }
                }
                ("R", ns) => self.removed_unflushed.extend_from_slice(ns),
                ("F", []) => self.note_flushed(),
                ("X", _) => {
                    let point = rest.first().and_then(|p| AbortPoint::parse(p));
                    if let (Some(AbortPoint::AfterFlush), Some(&n)) = (point, nums.first()) {
                        // flush returned: durable, though never acknowledged.
                        self.note_durable(n);
                    }
                    aborted_at = point;
                }
                _ => {} // "O", and libtest's own output.
            }
        }
        match plan {
            Plan::Abort(point, _) => {
                if aborted_at != Some(point) || run.status.signal() != Some(6) {
                    return Err(format!(
                        "child was to abort at {} but ended with {:?} after {:?}",
                        point.name(),
                        run.status,
                        run.lines.last()
                    ));
                }
            }
            Plan::KillAfter(_) | Plan::KillAfterLines(_) => {
                if run.status.signal() != Some(9) {
                    return Err(format!("child ended by itself: {:?}", run.status));
                }
            }
        }
        Ok(())
    }

    /// Reopen the WAL after a crash and compare it with the model; then make what is there the new
    /// baseline and append one probe record from the parent.
    fn verify(&mut self, dir: &Path) -> Result<(), String> {
        let (wal, recovered) =
            Wal::open(dir, CACHE_BYTES, DEDUP_RETENTION).map_err(|e| format!("reopen: {e}"))?;
        let records = wal
            .read_pending(0, usize::MAX)
            .map_err(|e| format!("read_pending: {e}"))?;

        let mut present = BTreeMap::new();
        let mut messages = 0u64;
        for r in &records {
            let n = n_of(r.packet_id())
                .filter(|&n| r.emitter_id() == EMITTER && n < self.next_n)
                .ok_or_else(|| {
                    format!(
                        "seq {}: identity ({:?}, {:?}) was never written",
                        r.seq,
                        r.emitter_id(),
                        r.packet_id()
                    )
                })?;
            if r.raw_messages() != messages_of(n).as_bytes()
                || r.count != count_of(n)
                || r.accepted_at_ms != n
            {
                return Err(format!(
                    "seq {} n{n}: content does not match its identity (count {}, accepted_at {}, \
                     {} bytes, starts {:?})",
                    r.seq,
                    r.count,
                    r.accepted_at_ms,
                    r.raw_messages().len(),
                    String::from_utf8_lossy(&r.raw_messages()[..r.raw_messages().len().min(80)])
                ));
            }
            // A child killed between `append` and its `W` line never reported the seq.
            let seq = *self.seq_of.entry(n).or_insert(r.seq);
            if seq != r.seq {
                return Err(format!(
                    "n{n} was stored as seq {seq} but is found at {}",
                    r.seq
                ));
            }
            if present.insert(n, r.seq).is_some() {
                return Err(format!("n{n} is present twice"));
            }
            messages += u64::from(r.count);
        }

        if recovered.quarantined != 0 || wal.quarantined() != 0 {
            return Err(format!("{} records quarantined", wal.quarantined()));
        }
        let counts = (
            recovered.records,
            recovered.messages,
            wal.pending_records(),
            wal.pending_messages(),
        );
        let actual = records.len() as u64;
        if counts != (actual, messages, actual, messages) {
            return Err(format!(
                "recovery counted (records, messages, pending_records, pending_messages) = \
                 {counts:?}, but {actual} records of {messages} messages are there"
            ));
        }
        if let Some(lost) = self.must_exist.iter().find(|n| !present.contains_key(n)) {
            return Err(format!(
                "n{lost} (seq {:?}) was durable and never removed, but is gone",
                self.seq_of.get(lost)
            ));
        }
        if let Some(extra) = present
            .keys()
            .find(|n| !self.must_exist.contains(n) && !self.may_exist.contains(n))
        {
            return Err(format!(
                "n{extra} is present but was never written or was gone for good"
            ));
        }
        if let Some(back) = self
            .removed_durably
            .iter()
            .find(|n| present.contains_key(n))
        {
            return Err(format!(
                "n{back} came back although its removal was followed by a flush"
            ));
        }
        // What is there now is the baseline: it must survive from now on unless removed.
        self.max_durable_seq = self.max_durable_seq.max(present.values().copied().max());
        self.must_exist = present.keys().copied().collect();
        self.may_exist.clear();
        self.removed_unflushed.clear();
        self.removed_durably.clear();

        // The parent's own append: a seq above every durable one, and durable from now on.
        let n = self.next_n;
        self.next_n += 1;
        let body = body_of(n);
        let packet =
            parse_packet(body.as_bytes(), &Limits::default()).map_err(|e| e.to_string())?;
        let seq = match wal
            .append(&packet, n)
            .map_err(|e| format!("probe append: {e}"))?
        {
            Appended::New { seq } => seq,
            dup => return Err(format!("probe n{n} is new but append said {dup:?}")),
        };
        self.note_seq(n, seq, "parent")?;
        wal.flush().map_err(|e| format!("probe flush: {e}"))?;
        self.note_durable(n);
        Ok(())
    }
}

/// Start the child on `dir`, end it according to `plan`, and collect what it printed.
fn run_child(dir: &Path, plan: Plan, start: u64, seed: u64, cwd: &Path) -> ChildRun {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR_ENV, dir)
        .env(START_ENV, start.to_string())
        .env(CHILD_SEED_ENV, seed.to_string())
        .env_remove(ABORT_ENV)
        // A core dump from `abort()`, if the system writes one, lands in the temporary directory.
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Plan::Abort(point, at) = plan {
        cmd.env(ABORT_ENV, format!("{}:{at}", point.name()));
    }
    let mut child = cmd.spawn().expect("spawn the child");

    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut lines = Vec::new();
    let deadline = Instant::now() + CHILD_DEADLINE;
    let recv_until = |lines: &mut Vec<String>, until: Instant, enough: usize| {
        while lines.len() < enough {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    };
    match plan {
        Plan::KillAfter(delay) => {
            recv_until(&mut lines, Instant::now() + delay, usize::MAX);
            let _ = child.kill();
        }
        Plan::KillAfterLines(count) => {
            recv_until(&mut lines, deadline, count);
            let _ = child.kill();
        }
        Plan::Abort(..) => {
            // The child aborts by itself; the stream ends when it is gone.
            recv_until(&mut lines, deadline, usize::MAX);
            let _ = child.kill();
        }
    }
    let status = child.wait().expect("wait for the child");
    reader.join().expect("stdout reader");
    lines.extend(rx.try_iter());
    let stderr = stderr_reader.join().expect("stderr reader");
    ChildRun {
        lines,
        status,
        stderr,
    }
}

#[test]
fn acknowledged_records_survive_the_writer_being_killed_at_any_moment() {
    if std::env::var_os(CHILD_DIR_ENV).is_some() {
        return; // We are the child; only `crash_child_...` works here.
    }
    // Arrange
    let cycles: u64 = std::env::var(CYCLES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var(SEED_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("wal_crash: {cycles} cycles, seed {seed} (replay with {SEED_ENV}={seed})");
    let mut rng = XorShift::new(seed);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("wal");
    let mut model = Model::default();
    let mut abort_points = AbortPoint::ALL.into_iter().cycle();

    for cycle in 0..cycles {
        // Act: one child life, ended by a kill or an abort.
        let plan = if cycle % 4 == 3 {
            let point = abort_points.next().unwrap_or(AbortPoint::AfterAppend);
            Plan::Abort(point, model.next_n + rng.below(40))
        } else if rng.below(3) == 0 {
            Plan::KillAfterLines(1 + rng.below(600) as usize)
        } else {
            Plan::KillAfter(Duration::from_millis(5 + rng.below(296)))
        };
        let run = run_child(&dir, plan, model.next_n, rng.next(), tmp.path());

        // Assert
        let outcome = model.absorb(&run, plan).and_then(|()| model.verify(&dir));
        if let Err(why) = outcome {
            panic!(
                "cycle {cycle} ({plan:?}), seed {seed}: {why}\n\
                 last child lines: {:?}\nchild stderr:\n{}",
                &run.lines[run.lines.len().saturating_sub(12)..],
                run.stderr
            );
        }
        eprintln!(
            "wal_crash: cycle {cycle:>3} {plan:?}: {} lines, {} records pending, next n{}",
            run.lines.len(),
            model.must_exist.len(),
            model.next_n
        );
    }
    eprintln!(
        "wal_crash: {} seqs of lost unflushed appends were handed out again (allowed)",
        model.reused_volatile_seqs
    );
}
