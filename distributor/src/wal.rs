//! The write-ahead log: every accepted packet lives here until an analyzer acknowledged it.
//!
//! # Why a record per packet
//! Measured on the 2-core target machine (`shared/FACTS.md`), sled 0.34 reaches ~90-200k inserts/s
//! with one key per message, and removing keys costs as much again: a key per message cannot reach
//! the 300k messages/s the project aims at. One record per *packet* (typically 50 messages) divides
//! both costs by the packet size, and the packet is also the unit of routing (see `dispatch`), so a
//! record is written once, read once, sent whole and removed whole. Per-message acknowledgement
//! state therefore reduces to "the record exists" (pending) or not (delivered).
//!
//! # Layout (one sled tree, key families by first byte)
//! ```text
//! 'r' seq:u64be                      -> record (pending packet)
//! 'p' len:u16be emitter_id packet_id -> seq:u64be   (dedup index: this packet was accepted)
//! 'd' seq:u64be                      -> the 'p' key (dedup index in acceptance order, for trimming)
//! 'q' seq:u64be                      -> a record that could not be decoded, kept for inspection
//! 'm'                                -> "logdist-wal 1": written when the WAL is created
//!
//! record = version:u8 (=1) | accepted_at_ms:u64be | count:u32be
//!        | emitter_id_len:u16be | emitter_id | packet_id_len:u16be | packet_id
//!        | messages: the packet's JSON array, byte for byte as the emitter sent it
//! ```
//! sled checksums every log entry, so a torn write is dropped by sled's own recovery; the version
//! byte and the length checks here catch anything else and move such a record to `'q'` instead of
//! stopping the service or silently dropping it.
//!
//! # Lifecycle and the crash cases
//! 1. [`Wal::append`] stores the record and its two dedup keys in ONE atomic sled batch, under a
//!    mutex that also allocates the sequence number: records therefore appear in `seq` order, and a
//!    dedup key can never exist without its record (which would turn an emitter's retry of a lost
//!    packet into a false "duplicate", i.e. a loss).
//! 2. The caller waits for [`Wal::flush`] (group commit, see `commit`) and only then answers 202. A
//!    crash before the flush returns loses only packets that were never acknowledged; the emitter
//!    retries them.
//! 3. The dispatcher reads records below the *durable horizon* (every `seq` below it is flushed),
//!    in `seq` order, a bounded window at a time, so memory does not grow with the backlog.
//!    What "flushed" means on disk: sled 0.34's own `flush` writes its log buffers with `pwrite`
//!    and `sync_file_range`, which neither flushes the drive's write cache nor commits a grown
//!    file's size, and it writes an item larger than a quarter segment (a *blob*: a big packet, or
//!    a leaf of many records consolidated) to a file of its own that it never syncs. A killed
//!    process loses nothing either way (the page cache survives it); a power cut could. So
//!    [`Wal::flush`] then `fdatasync`s sled's log file and every blob file not synced yet (and the
//!    blob directory when it gained one): see [`DiskSync`].
//! 4. [`Wal::remove_delivered`] removes a record after an analyzer answered 2xx for it. The removal
//!    is not flushed by itself (sled flushes every 500 ms): a crash may resurrect a delivered record,
//!    which is then delivered again — a duplicate, never a loss.
//! 5. [`Wal::open`] recovers: it counts what is pending and continues sequence numbers after the
//!    highest ever used.
//!
//! # Storage failures while running (disk full): the WAL reopens itself
//! What sled 0.34.7 does, measured on a full tmpfs: the write that hits `ENOSPC` (sled's background
//! log writer, or an `insert`/`apply_batch`/`flush`) returns `Io(StorageFull)` and sled stores it as
//! its *global error*. From then on every write and every flush of that `Db` fails with the same
//! error, even after space is freed (`Config::reset_global_error` runs only when a `Db` is opened);
//! reads mostly keep working, but an iterator may yield that error forever instead of ending. What
//! was flushed before stays on disk: dropping the `Db` and opening the directory again (a few ms)
//! recovers every flushed key and accepts writes again.
//!
//! So the WAL turns any sled error into a *failed* state: from the first error on it refuses every
//! operation at once with [`WalError::Unavailable`] (the HTTP layer answers 507 when the cause was a
//! full disk, 503 otherwise, both with `Retry-After`) and never calls sled for it. Acknowledgements
//! waiting on a flush that failed get the error, never a 2xx. [`Wal::try_reopen`], called every half
//! second by the server, first writes and fsyncs a 1 MiB probe file next to sled's files (two sled
//! segments); once that succeeds it drops the broken `Db`, opens the directory again, recounts what
//! is pending, flushes and swaps the new `Db` in, bumping the [`Wal::generation`]. The process keeps
//! running, so the analyzers keep receiving what was already in the dispatcher's window.
//!
//! Reopening in-process keeps every promise:
//! * *Ack means durable*: an append made on the old `Db` that was not flushed may be gone after the
//!   reopen. [`Wal::append_tagged`] returns the generation it wrote to and [`Wal::flush_tagged`] the
//!   generation it flushed; the committer acknowledges a request only when both are the same, so a
//!   flush of the new `Db` never acknowledges a packet written to the old one.
//! * *Sequence numbers never go back*: the next seq after a reopen is the larger of the one in
//!   memory and the one recovered, so a seq handed out before is never reused.
//! * *Removed means delivered*: a removal that did not reach the disk makes the record pending
//!   again; the dispatcher rescans the WAL when the generation changes, so it is delivered again (a
//!   duplicate, not a loss) instead of sitting on disk unseen.
//!
//! Exiting and letting a supervisor restart the process would also lose nothing, but it would turn
//! every full disk into a crash loop and drop the analyzers' in-flight batches; the reopen is local
//! to this module (the rest of the program holds `Wal` clones, never a sled handle).
//!
//! # Damaged files at start
//! What sled 0.34.7 does when its files were damaged while it was stopped (measured; which case
//! applies depends on where the damage falls relative to the last snapshot):
//! * A cut or overwritten tail of the `db` file (a few bytes up to half the file) is usually
//!   skipped: sled recovers up to the last entry whose checksum holds and opens normally. The
//!   entries after that point are gone and sled does not say how many. A torn tail left by a crash
//!   holds only writes that were never acknowledged, but damage to flushed data loses acknowledged
//!   records silently (see the clean-stop summary below).
//! * Deleting the snapshot (`snap.*`, written when a `Db` is opened), or a bad `conf`, is harmless:
//!   sled rebuilds them from the log.
//! * A damaged or cut snapshot, or a log cut that the snapshot points past, makes `open` return
//!   `Corruption`.
//! * Sometimes, mostly without a snapshot (a WAL never reopened), a cut or damaged log makes sled
//!   *panic* in `open` ("tried to serialize Uninitialized"); that failed attempt rewrites part of
//!   the file, and a second attempt sometimes succeeds.
//! * A `db` file cut to zero bytes without a snapshot opens as an empty database, silently.
//!
//! Because sled does not say what it skipped, [`Wal::close`] (the distributor's graceful stop)
//! writes a small summary after its last flush, `.logdist-wal-clean-stop`: pending records and
//! messages and the next sequence number. The next [`Wal::open`] compares what it recovered with it
//! and reports the difference as `missing_since_clean_stop` (records that were pending, hence
//! acknowledged, when the WAL was closed, and are not pending now: lost, or quarantined), never
//! hands out a sequence number below the recorded one, and deletes the file. After a crash there is
//! no summary and no such check.
//!
//! [`Wal::open`] runs sled's open under `catch_unwind` and retries it once after a
//! panic; it writes the `'m'` key when it creates a WAL, so a directory that held a WAL but opens
//! without that key and without any other key is recognised as emptied (a marker file,
//! `.logdist-wal-initializing`, covers a crash during the very first open, before anything can have
//! been acknowledged). A directory sled cannot open is [`WalError::Damaged`]: with
//! [`OnDamage::Refuse`] the caller must not start over it (the distributor exits and names its
//! `--recover` flag), because silently starting empty would discard acknowledged messages. With
//! [`OnDamage::MoveAside`] it first renames sled's snapshot files out of sled's way and tries again
//! (sled then rebuilds from its log: nothing is lost when only the snapshot was bad); if sled still
//! cannot open it, the directory is renamed to `<dir>.corrupt-<unix-ms>` and a new, empty WAL is
//! created. Nothing is ever deleted. (A directory written before the `'m'` key existed that holds
//! no key at all is refused too; moving it aside loses nothing, it was empty.) What happened is kept in [`Wal::recovery_report`] and shown by `GET /stats`.
//!
//! The module is the only one that knows sled; swapping the engine means rewriting this file.

use std::io::Write;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use logdist_proto::Packet;
use serde::{Deserialize, Serialize};
use sled::IVec;

const RECORD: u8 = b'r';
const DEDUP: u8 = b'p';
const DEDUP_ORDER: u8 = b'd';
const QUARANTINE: u8 = b'q';
const META: &[u8] = b"m";
const META_VALUE: &[u8] = b"logdist-wal 1";
/// The analyzer registry changed at runtime (`registry`), one JSON value.
const REGISTRY: &[u8] = b"a";
const VERSION: u8 = 1;

/// Present while a new WAL is being created: a crash then leaves an empty `db` file that is not
/// damage, because nothing can have been acknowledged before the first open completed.
const INITIALIZING_FILE: &str = ".logdist-wal-initializing";
/// Written and removed by [`Wal::try_reopen`] to learn whether the disk takes writes again.
const SPACE_PROBE_FILE: &str = ".logdist-space-probe";
/// Written by [`Wal::close`], read and removed by the next open (see the module docs).
const CLEAN_STOP_FILE: &str = ".logdist-wal-clean-stop";
/// Two of sled's 512 KiB segments: what sled needs to make progress after a reopen.
const SPACE_PROBE_BYTES: usize = 1 << 20;
/// How long a reopen waits for the last handle of the old `Db` (and sled's file lock) to go.
const REOPEN_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long an open waits for sled's lock: a `Db` of this process dropped a moment ago may still
/// hold it. Another process holding it is reported after this.
const OPEN_LOCK_WAIT: Duration = Duration::from_secs(2);

/// What can go wrong with the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// sled failed to open, read, write or flush: an I/O error (disk full, permissions, another
    /// process holding the directory's lock) or a bug in sled. When it happens while running, the
    /// WAL enters its failed state (see [`WalError::Unavailable`]); at open it is returned as is.
    #[error("WAL storage error: {0}")]
    Storage(#[from] sled::Error),
    /// sled's background work panicked or the flush task was lost; not recoverable in-process.
    #[error("WAL flush task failed: {0}")]
    FlushTask(String),
    /// An earlier storage error left the WAL refusing every operation until it is reopened
    /// ([`Wal::try_reopen`], which the server calls by itself). Recoverable: retry later. Nothing
    /// acknowledged is lost; the operation that got this error did nothing.
    #[error("the WAL is refusing writes after a storage failure ({cause}); it reopens by itself once the cause is gone")]
    Unavailable {
        /// The error that made it fail.
        cause: String,
        /// The cause was a full disk (`ENOSPC`).
        disk_full: bool,
    },
    /// sled cannot open the WAL's directory: it returned `Corruption` or a bug report, panicked
    /// twice while recovering, or opened a directory that held a WAL as empty. Not recoverable by
    /// retrying: the directory must be inspected or moved aside ([`OnDamage::MoveAside`]).
    #[error("the WAL in {dir} is damaged: {reason}")]
    Damaged { dir: PathBuf, reason: String },
}

impl WalError {
    /// True when the underlying cause is a full disk (the caller answers 507 instead of 503).
    pub fn is_disk_full(&self) -> bool {
        match self {
            WalError::Storage(sled::Error::Io(e)) => e.kind() == std::io::ErrorKind::StorageFull,
            WalError::Unavailable { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}

/// What [`Wal::open_with`] does with a directory sled cannot open ([`WalError::Damaged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDamage {
    /// Return the error and touch nothing: the operator decides.
    #[default]
    Refuse,
    /// Rename the directory to `<dir>.corrupt-<unix-ms>` and create a new, empty WAL. What was
    /// pending in the old one is NOT delivered; it stays in the renamed directory.
    MoveAside,
}

/// Result of [`Wal::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence number (not yet durable: flush before acknowledging).
    New { seq: u64 },
    /// This `(emitter_id, packet_id)` was accepted before (as `seq`); nothing was stored.
    Duplicate { seq: u64 },
}

/// A packet encoded for [`Wal::append_many`]: built on the request's thread, so the committer only
/// stores bytes.
#[derive(Debug, Clone)]
pub struct Prepared {
    dkey: Vec<u8>,
    value: Vec<u8>,
    count: u32,
}

impl Prepared {
    pub fn new(packet: &Packet<'_>, accepted_at_ms: u64) -> Self {
        Self {
            dkey: dedup_key(&packet.emitter_id, &packet.packet_id),
            value: encode(packet, accepted_at_ms),
            count: packet.count,
        }
    }

    /// Bytes it will store.
    pub fn stored_bytes(&self) -> usize {
        self.dkey.len() + self.value.len()
    }
}

/// A pending packet read back from the WAL. Cheap to clone (the bytes are shared).
#[derive(Clone, Debug)]
pub struct StoredRecord {
    pub seq: u64,
    pub accepted_at_ms: u64,
    pub count: u32,
    bytes: IVec,
    emitter_id: Range<usize>,
    packet_id: Range<usize>,
    messages: usize,
}

impl StoredRecord {
    pub fn emitter_id(&self) -> &str {
        // Checked to be UTF-8 in `decode`.
        std::str::from_utf8(&self.bytes[self.emitter_id.clone()]).unwrap_or_default()
    }
    pub fn packet_id(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.packet_id.clone()]).unwrap_or_default()
    }
    /// The packet's `messages` JSON array, as accepted.
    pub fn raw_messages(&self) -> &[u8] {
        &self.bytes[self.messages..]
    }
    /// Bytes this record holds in memory.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

/// What recovery found when the WAL was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    pub messages: u64,
    /// Records that could not be decoded and were moved to quarantine.
    pub quarantined: u64,
}

/// How the WAL was opened at start, for the log and `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// `"created"` (a new WAL), `"ok"`, or `"ok on the second attempt; the first: <why>"` when
    /// sled panicked once while recovering.
    pub sled_open: String,
    /// Pending records and messages found.
    pub records: u64,
    pub messages: u64,
    /// Records that could not be decoded at this start and were moved to quarantine (`'q'`).
    pub quarantined_records: u64,
    /// Why sled could not open the WAL at first ([`OnDamage::MoveAside`] only: otherwise the
    /// start is refused).
    pub damage: Option<String>,
    /// sled's snapshot files, renamed so that sled rebuilt its state from the log.
    pub snapshots_set_aside: Vec<PathBuf>,
    /// Where a damaged WAL was moved when even that failed; its pending messages were not
    /// recovered.
    pub moved_aside: Option<PathBuf>,
    /// What was pending (acknowledged, not delivered) when the WAL was last closed cleanly
    /// ([`Wal::close`]) and is not pending now: records sled could not recover because its files
    /// were damaged while stopped, plus those moved to quarantine (`quarantined_records`). `None`
    /// when there was no clean stop to compare with (first start, or after a crash).
    pub missing_since_clean_stop: Option<Missing>,
    /// How long opening and recovering took.
    pub elapsed_ms: u64,
}

/// Pending records and messages that were expected and not found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Missing {
    pub records: u64,
    pub messages: u64,
}

/// The summary [`Wal::close`] leaves for the next open.
#[derive(Debug, Serialize, Deserialize)]
struct CleanStop {
    records: u64,
    messages: u64,
    next_seq: u64,
}

/// The WAL's health while running, for `GET /stats` and `GET /health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StorageStatus {
    /// `"ok"`, `"failed"` (refusing everything until reopened) or `"reopening"`.
    pub state: &'static str,
    /// The last failure was a full disk.
    pub disk_full: bool,
    /// The error that caused the last failure.
    pub last_error: Option<String>,
    /// Failures since start, and successful in-process reopens.
    pub failures: u64,
    pub reopens: u64,
}

/// The WAL. Clone it freely: clones share one database.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

/// The open sled database and the generation it belongs to (bumped by every reopen).
#[derive(Clone)]
struct Handle {
    db: sled::Db,
    generation: u64,
}

const STATE_OK: u8 = 0;
const STATE_FAILED: u8 = 1;
const STATE_REOPENING: u8 = 2;

#[derive(Default)]
struct Fault {
    cause: String,
    disk_full: bool,
    failures: u64,
    reopens: u64,
}

struct Inner {
    dir: PathBuf,
    cache_capacity_bytes: u64,
    /// `None` only while a reopen is under way. The lock is held to clone or swap the handle,
    /// never across a sled call. A live clone keeps sled's files (and its lock) open, so a reopen
    /// cannot complete while an operation on the old `Db` is still running.
    handle: RwLock<Option<Handle>>,
    /// `STATE_*`: checked before every operation so a failed WAL never reaches sled.
    state: AtomicU8,
    fault: Mutex<Fault>,
    /// Mirror of the handle's generation, readable without the lock.
    generation: AtomicU64,
    /// Serialises appends: makes "is it a duplicate?" and "store it" one step, and keeps records
    /// appearing in `seq` order. Held only over synchronous sled calls, never across an `.await`.
    append_lock: Mutex<u64>,
    /// Every `seq` below this is flushed (or, with fsync off, at least written).
    durable_horizon: AtomicU64,
    /// Next sequence number (mirror of the value under `append_lock`, readable without it).
    next_seq: AtomicU64,
    pending_records: AtomicU64,
    pending_messages: AtomicU64,
    dedup_retention: u64,
    recovery: RecoveryReport,
    disk_sync: DiskSync,
}

fn key(family: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = family;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.get(1..9)?.try_into().ok().map(u64::from_be_bytes)
}

fn dedup_key(emitter_id: &str, packet_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + emitter_id.len() + packet_id.len());
    k.push(DEDUP);
    // Ids are at most `limits.max_id_bytes` long (checked at the boundary), far below u16::MAX;
    // the length prefix keeps ("ab","c") and ("a","bc") apart.
    k.extend_from_slice(&(emitter_id.len() as u16).to_be_bytes());
    k.extend_from_slice(emitter_id.as_bytes());
    k.extend_from_slice(packet_id.as_bytes());
    k
}

fn encode(packet: &Packet<'_>, accepted_at_ms: u64) -> Vec<u8> {
    let (e, p, m) = (
        packet.emitter_id.as_bytes(),
        packet.packet_id.as_bytes(),
        packet.raw_messages.as_bytes(),
    );
    let mut v = Vec::with_capacity(1 + 8 + 4 + 2 + e.len() + 2 + p.len() + m.len());
    v.push(VERSION);
    v.extend_from_slice(&accepted_at_ms.to_be_bytes());
    v.extend_from_slice(&packet.count.to_be_bytes());
    v.extend_from_slice(&(e.len() as u16).to_be_bytes());
    v.extend_from_slice(e);
    v.extend_from_slice(&(p.len() as u16).to_be_bytes());
    v.extend_from_slice(p);
    v.extend_from_slice(m);
    v
}

/// Decode a record; `Err` says why it is unusable.
pub fn decode(seq: u64, bytes: IVec) -> Result<StoredRecord, String> {
    let b: &[u8] = &bytes;
    let take = |at: usize, n: usize| -> Result<&[u8], String> {
        b.get(at..at + n)
            .ok_or_else(|| format!("record {seq} truncated at byte {at} (len {})", b.len()))
    };
    let version = *take(0, 1)?.first().unwrap_or(&0);
    if version != VERSION {
        return Err(format!("record {seq} has unknown version {version}"));
    }
    let accepted_at_ms = u64::from_be_bytes(take(1, 8)?.try_into().map_err(|_| "len")?);
    let count = u32::from_be_bytes(take(9, 4)?.try_into().map_err(|_| "len")?);
    let elen = u16::from_be_bytes(take(13, 2)?.try_into().map_err(|_| "len")?) as usize;
    let emitter_id = 15..15 + elen;
    take(emitter_id.start, elen)?;
    let at = emitter_id.end;
    let plen = u16::from_be_bytes(take(at, 2)?.try_into().map_err(|_| "len")?) as usize;
    let packet_id = at + 2..at + 2 + plen;
    take(packet_id.start, plen)?;
    let messages = packet_id.end;
    let ok = count > 0
        && std::str::from_utf8(&b[emitter_id.clone()]).is_ok()
        && std::str::from_utf8(&b[packet_id.clone()]).is_ok()
        && b.get(messages) == Some(&b'[')
        && b.last() == Some(&b']');
    if !ok {
        return Err(format!("record {seq} is malformed"));
    }
    Ok(StoredRecord {
        seq,
        accepted_at_ms,
        count,
        bytes,
        emitter_id,
        packet_id,
        messages,
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; every value guarded here
    // (a counter, a status) is valid at any moment.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

fn io_error(e: std::io::Error) -> WalError {
    WalError::Storage(sled::Error::Io(e))
}

/// Open sled on `dir`, containing its panics. A panic is retried once: sled's failed attempt
/// rewrites part of its files, and measured runs show the second attempt sometimes succeeds.
/// Returns the database and, when a retry was needed, why the first attempt failed.
fn open_sled(
    dir: &Path,
    cache_capacity_bytes: u64,
    lock_wait: Duration,
) -> Result<(sled::Db, Option<String>), WalError> {
    let deadline = Instant::now() + lock_wait;
    // sled releases its file lock when its background threads let go of the files, a moment after
    // the last handle is dropped (and after a panicked open): wait for it, up to `lock_wait`.
    let attempt = || loop {
        let opened = catch_unwind(|| {
            sled::Config::new()
                .path(dir)
                .cache_capacity(cache_capacity_bytes)
                .mode(sled::Mode::HighThroughput)
                .open()
        });
        match opened {
            Ok(Err(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    };
    let classify = |e: sled::Error| match e {
        // I/O (disk full, permissions, the lock held by another process) is not damage.
        sled::Error::Io(_) => WalError::Storage(e),
        other => WalError::Damaged {
            dir: dir.to_path_buf(),
            reason: format!("sled cannot open it: {other}"),
        },
    };
    match attempt() {
        Ok(Ok(db)) => Ok((db, None)),
        Ok(Err(e)) => Err(classify(e)),
        Err(payload) => {
            let first = format!(
                "sled panicked while recovering: {}",
                panic_message(&*payload)
            );
            tracing::error!(dir = %dir.display(), error = %first, "cannot open the WAL; trying once more");
            match attempt() {
                Ok(Ok(db)) => Ok((db, Some(first))),
                Ok(Err(e)) => Err(classify(e)),
                Err(payload) => Err(WalError::Damaged {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "sled panicked twice while recovering: {}",
                        panic_message(&*payload)
                    ),
                }),
            }
        }
    }
}

/// What [`recover`] found.
struct Found {
    recovered: Recovered,
    /// The highest sequence number ever used (records and the dedup order index).
    max_seq: Option<u64>,
}

/// Scan the records: count what is pending, quarantine what cannot be decoded, and find the
/// highest sequence number ever used.
fn recover(db: &sled::Db) -> Result<Found, sled::Error> {
    let mut recovered = Recovered::default();
    let mut max_seq = None::<u64>;
    let mut quarantine = Vec::new();
    for item in db.scan_prefix([RECORD]) {
        let (k, v) = item?;
        let Some(seq) = seq_of(&k) else {
            quarantine.push((k, v));
            continue;
        };
        max_seq = max_seq.max(Some(seq));
        match decode(seq, v.clone()) {
            Ok(r) => {
                recovered.records += 1;
                recovered.messages += u64::from(r.count);
            }
            Err(reason) => {
                tracing::error!(seq, %reason, "WAL record cannot be decoded; moved to quarantine");
                quarantine.push((k, v));
            }
        }
    }
    for (k, v) in quarantine {
        let mut batch = sled::Batch::default();
        let mut qk = k.to_vec();
        qk[0] = QUARANTINE;
        batch.insert(qk, v);
        batch.remove(k);
        db.apply_batch(batch)?;
        recovered.quarantined += 1;
    }
    if let Some(item) = db.scan_prefix([DEDUP_ORDER]).next_back() {
        let (k, _) = item?;
        max_seq = max_seq.max(seq_of(&k));
    }
    Ok(Found { recovered, max_seq })
}

/// The message count in a record's header, if the header is intact enough to hold one.
fn header_count(v: &[u8]) -> u32 {
    v.get(9..13)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// Write and fsync [`SPACE_PROBE_BYTES`] in `dir`, then remove the file.
fn probe_space(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(SPACE_PROBE_FILE);
    let written = (|| {
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..SPACE_PROBE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written
}

/// What [`Wal::open_with`] did to a damaged WAL before this open.
#[derive(Default)]
struct Remedy {
    damage: Option<String>,
    snapshots_set_aside: Vec<PathBuf>,
    moved_aside: Option<PathBuf>,
}

/// Rename sled's snapshot files (`snap.*`: sled reads any file with that prefix) to
/// `.logdist-set-aside-<unix-ms>-snap.*`; returns their new paths.
fn set_snapshots_aside(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let stamp = unix_ms();
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("snap.") {
            let to = dir.join(format!(".logdist-set-aside-{stamp}-{name}"));
            std::fs::rename(entry.path(), &to)?;
            moved.push(to);
        }
    }
    sync_dir(dir);
    Ok(moved)
}

/// `<dir>.corrupt-<unix-ms>`, next to `dir`.
fn aside_path(dir: &Path) -> PathBuf {
    // Normalised first, so that "data/" does not become "data/.corrupt-..".
    let dir: PathBuf = dir.components().collect();
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".corrupt-{}", unix_ms()));
    PathBuf::from(name)
}

/// What [`Wal::flush`] adds to sled's flush so that a flushed record survives a power cut, not
/// only a process kill (see the module docs, step 2): an `fdatasync` of sled's log file (`db`),
/// and of each blob file (`blobs/*`) not synced before, then of the blob directory when it gained
/// a file. Blobs are found by listing the directory, which is skipped while its mtime has not
/// changed (a cheap `stat` per flush instead of a listing).
///
/// Other threads keep writing while a flush runs, so a listing may meet a blob sled is still
/// writing (it creates the file, then writes it). A blob whose own mtime is recent is therefore
/// kept in `recent` and synced again by the next flushes whenever its length changed, until its
/// mtime is old enough to prove it complete. "Old enough" is [`MTIME_TRUST_AFTER`], wide enough for
/// filesystems that store whole seconds.
#[derive(Default)]
struct DiskSync {
    blobs: Mutex<BlobsSeen>,
    log_syncs: AtomicU64,
    blob_syncs: AtomicU64,
}

#[derive(Default)]
struct BlobsSeen {
    /// The blob directory's mtime at the last listing, kept only when it was old enough to trust:
    /// mtimes come from a coarse clock, so a file created just after a listing can leave the
    /// mtime the listing saw.
    listed_at_mtime: Option<SystemTime>,
    /// Blob files synced (the ones present at the last listing).
    synced: std::collections::HashSet<std::ffi::OsString>,
    /// Synced blob files that may still have been growing, with the length synced.
    recent: Vec<(std::ffi::OsString, u64)>,
}

/// How long an mtime must lie in the past before it proves that nothing changed since: two
/// seconds covers filesystems that keep whole seconds, and the kernel's coarse clock.
const MTIME_TRUST_AFTER: Duration = Duration::from_secs(2);

fn old_enough(mtime: Option<SystemTime>, now: SystemTime) -> bool {
    mtime.is_some_and(|m| {
        now.duration_since(m)
            .is_ok_and(|age| age >= MTIME_TRUST_AFTER)
    })
}

/// How many `fdatasync`s [`Wal::flush`] made on top of sled's flush (see [`DiskSync`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskSyncs {
    /// Of sled's log file: one per flush.
    pub log: u64,
    /// Of blob files (sled's items larger than a quarter segment).
    pub blobs: u64,
}

impl DiskSync {
    /// Make what sled wrote durable on the device. Blocking.
    fn sync(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::File::open(dir.join("db"))?.sync_data()?;
        self.log_syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_new_blobs(&dir.join("blobs"))
    }

    /// Forget what was synced: after a reopen sled may reuse a blob file's name.
    fn forget(&self) {
        *lock(&self.blobs) = BlobsSeen::default();
    }

    /// `fdatasync` one blob file; `None` when it is gone (sled freed it: nothing to keep).
    /// Returns its length and mtime after the sync.
    fn sync_blob(&self, path: &Path) -> std::io::Result<Option<(u64, Option<SystemTime>)>> {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        f.sync_data()?;
        self.blob_syncs.fetch_add(1, Ordering::Relaxed);
        let meta = f.metadata()?;
        Ok(Some((meta.len(), meta.modified().ok())))
    }

    fn sync_new_blobs(&self, blobs_dir: &Path) -> std::io::Result<()> {
        let mut seen = lock(&self.blobs);
        let now = SystemTime::now();
        // Blobs that were perhaps still being written when last synced.
        let mut still_recent = Vec::new();
        for (name, synced_len) in std::mem::take(&mut seen.recent) {
            let path = blobs_dir.join(&name);
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let (len, mtime) = if meta.len() == synced_len {
                (meta.len(), meta.modified().ok())
            } else {
                match self.sync_blob(&path)? {
                    Some(x) => x,
                    None => continue,
                }
            };
            if !old_enough(mtime, now) {
                still_recent.push((name, len));
            }
        }
        seen.recent = still_recent;
        let mtime = match std::fs::metadata(blobs_dir) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if mtime.is_some() && mtime == seen.listed_at_mtime {
            return Ok(());
        }
        let mut present = std::collections::HashSet::with_capacity(seen.synced.len() + 4);
        let mut added = false;
        for entry in std::fs::read_dir(blobs_dir)? {
            let name = entry?.file_name();
            if !seen.synced.contains(&name) {
                let Some((len, file_mtime)) = self.sync_blob(&blobs_dir.join(&name))? else {
                    continue;
                };
                if !old_enough(file_mtime, now) {
                    seen.recent.push((name.clone(), len));
                }
                added = true;
            }
            present.insert(name);
        }
        if added {
            std::fs::File::open(blobs_dir)?.sync_all()?;
        }
        seen.synced = present;
        seen.listed_at_mtime = mtime.filter(|m| old_enough(Some(*m), now));
        Ok(())
    }
}

fn sync_dir(dir: &Path) {
    // Makes a created or removed marker file durable; best effort (not every filesystem
    // supports fsync on a directory).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Wal {
    /// Open (or create) the WAL in `dir` and recover its state. A directory sled cannot open is
    /// refused ([`WalError::Damaged`]) and left as it is; see [`Wal::open_with`].
    ///
    /// `cache_capacity_bytes` bounds sled's page cache (sled's default let RSS reach ~390 MB).
    pub fn open(
        dir: &Path,
        cache_capacity_bytes: u64,
        dedup_retention: u64,
    ) -> Result<(Self, Recovered), WalError> {
        Self::open_with(dir, cache_capacity_bytes, dedup_retention, OnDamage::Refuse)
    }

    /// [`Wal::open`], choosing what happens to a damaged directory.
    pub fn open_with(
        dir: &Path,
        cache_capacity_bytes: u64,
        dedup_retention: u64,
        on_damage: OnDamage,
    ) -> Result<(Self, Recovered), WalError> {
        let started = Instant::now();
        let open = |remedy: Remedy| {
            Self::open_dir(dir, cache_capacity_bytes, dedup_retention, remedy, started)
        };
        let mut reason = match open(Remedy::default()) {
            Err(WalError::Damaged { reason, .. }) if on_damage == OnDamage::MoveAside => reason,
            other => return other,
        };
        // First the gentle step: sled's snapshot only summarises its log, and sled rebuilds it
        // from the log when there is none (measured: nothing lost when only the snapshot is bad).
        let snapshots = set_snapshots_aside(dir).map_err(io_error)?;
        if !snapshots.is_empty() {
            tracing::warn!(
                dir = %dir.display(), %reason, set_aside = ?snapshots,
                "the WAL cannot be opened; retrying without sled's snapshot (set aside, not deleted)"
            );
            let remedy = Remedy {
                damage: Some(reason.clone()),
                snapshots_set_aside: snapshots.clone(),
                moved_aside: None,
            };
            match open(remedy) {
                Err(WalError::Damaged { reason: again, .. }) => {
                    reason = format!("{reason}; and without its snapshot: {again}");
                }
                other => return other,
            }
        }
        let aside = aside_path(dir);
        std::fs::rename(dir, &aside).map_err(io_error)?;
        tracing::error!(
            damaged = %dir.display(), moved_to = %aside.display(), %reason,
            "the WAL was damaged and has been moved aside; the messages pending in it could NOT be recovered and will not be delivered; starting with an empty WAL"
        );
        open(Remedy {
            damage: Some(reason),
            snapshots_set_aside: snapshots,
            moved_aside: Some(aside),
        })
    }

    fn open_dir(
        dir: &Path,
        cache_capacity_bytes: u64,
        dedup_retention: u64,
        remedy: Remedy,
        started: Instant,
    ) -> Result<(Self, Recovered), WalError> {
        std::fs::create_dir_all(dir).map_err(io_error)?;
        let existed = dir.join("db").exists();
        let initializing_file = dir.join(INITIALIZING_FILE);
        let initializing = initializing_file.exists();
        if !existed && !initializing {
            std::fs::File::create(&initializing_file)
                .and_then(|f| f.sync_all())
                .map_err(io_error)?;
            sync_dir(dir);
        }
        let (db, retried) = open_sled(dir, cache_capacity_bytes, OPEN_LOCK_WAIT)?;
        let created = if db.get(META)?.is_some() {
            false
        } else {
            let empty = db.iter().next().transpose()?.is_none();
            if existed && !initializing && empty {
                return Err(WalError::Damaged {
                    dir: dir.to_path_buf(),
                    reason: "sled opened it as an empty database although it held a WAL (its log \
                             file was emptied or cut before its first entry)"
                        .to_string(),
                });
            }
            // A new WAL, or one written before the marker existed.
            db.insert(META, META_VALUE)?;
            db.flush()?;
            empty
        };
        if initializing || !existed {
            let _ = std::fs::remove_file(&initializing_file);
            sync_dir(dir);
        }
        let Found { recovered, max_seq } = recover(&db)?;
        let mut next = max_seq.map_or(0, |s| s + 1);
        let clean_stop_file = dir.join(CLEAN_STOP_FILE);
        let clean_stop = std::fs::read(&clean_stop_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<CleanStop>(&b).ok());
        let missing_since_clean_stop = clean_stop.map(|stop| {
            next = next.max(stop.next_seq);
            Missing {
                records: stop.records.saturating_sub(recovered.records),
                messages: stop.messages.saturating_sub(recovered.messages),
            }
        });
        if let Some(missing) =
            missing_since_clean_stop.filter(|m| m.records > recovered.quarantined)
        {
            tracing::error!(
                missing_records = missing.records,
                missing_messages = missing.messages,
                quarantined_records = recovered.quarantined,
                dir = %dir.display(),
                "records that were pending (acknowledged, not delivered) when the WAL was last closed cleanly are missing: its files were damaged while the distributor was stopped and sled recovered only up to the last intact entry"
            );
        }
        // From now on the summary is stale: a crash must not be compared with it.
        if clean_stop_file.exists() {
            std::fs::remove_file(&clean_stop_file).map_err(io_error)?;
            sync_dir(dir);
        }
        let sled_open = match (&retried, created) {
            (Some(first), _) => format!("ok on the second attempt; the first: {first}"),
            (None, true) => "created".to_string(),
            (None, false) if !remedy.snapshots_set_aside.is_empty() => {
                "ok without its damaged snapshot (sled rebuilt it from the log)".to_string()
            }
            (None, false) => "ok".to_string(),
        };
        let recovery = RecoveryReport {
            sled_open,
            records: recovered.records,
            messages: recovered.messages,
            quarantined_records: recovered.quarantined,
            moved_aside: remedy.moved_aside,
            snapshots_set_aside: remedy.snapshots_set_aside,
            damage: remedy.damage,
            missing_since_clean_stop,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        let wal = Wal {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                cache_capacity_bytes,
                handle: RwLock::new(Some(Handle { db, generation: 0 })),
                state: AtomicU8::new(STATE_OK),
                fault: Mutex::new(Fault::default()),
                generation: AtomicU64::new(0),
                append_lock: Mutex::new(next),
                durable_horizon: AtomicU64::new(next),
                next_seq: AtomicU64::new(next),
                pending_records: AtomicU64::new(recovered.records),
                pending_messages: AtomicU64::new(recovered.messages),
                dedup_retention,
                recovery,
                disk_sync: DiskSync::default(),
            }),
        };
        Ok((wal, recovered))
    }

    /// The database, unless the WAL is failed or reopening.
    fn handle(&self) -> Result<Handle, WalError> {
        if self.inner.state.load(Ordering::Acquire) != STATE_OK {
            return Err(self.unavailable());
        }
        self.inner
            .handle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| self.unavailable())
    }

    /// The database whatever the state (for read-only gauges), if one is open.
    fn peek(&self) -> Option<sled::Db> {
        self.inner
            .handle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|h| h.db.clone())
    }

    fn unavailable(&self) -> WalError {
        let fault = lock(&self.inner.fault);
        WalError::Unavailable {
            cause: fault.cause.clone(),
            disk_full: fault.disk_full,
        }
    }

    /// Enter the failed state on a sled error (see the module docs) and return the error.
    fn failed(&self, e: sled::Error) -> WalError {
        let disk_full =
            matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull);
        if self
            .inner
            .state
            .compare_exchange(STATE_OK, STATE_FAILED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let mut fault = lock(&self.inner.fault);
            fault.cause = e.to_string();
            fault.disk_full = disk_full;
            fault.failures += 1;
            drop(fault);
            tracing::error!(
                error = %e, disk_full,
                "WAL storage failed: refusing new packets until it is reopened; everything acknowledged is on disk"
            );
        }
        WalError::Storage(e)
    }

    /// Store a packet unless its `(emitter_id, packet_id)` was accepted before.
    ///
    /// Not durable until a [`Wal::flush`] that starts after this returns has returned.
    pub fn append(&self, packet: &Packet<'_>, accepted_at_ms: u64) -> Result<Appended, WalError> {
        self.append_tagged(packet, accepted_at_ms)
            .map(|(appended, _)| appended)
    }

    /// [`Wal::append`], also returning the [`Wal::generation`] it wrote to: the packet is durable
    /// once a [`Wal::flush_tagged`] that started after this returned the same generation.
    pub fn append_tagged(
        &self,
        packet: &Packet<'_>,
        accepted_at_ms: u64,
    ) -> Result<(Appended, u64), WalError> {
        let (mut appended, generation) =
            self.append_many(&[Prepared::new(packet, accepted_at_ms)])?;
        let first = appended.pop().ok_or_else(|| {
            WalError::FlushTask("append_many answered nothing for one packet".into())
        })?;
        Ok((first, generation))
    }

    /// Store many packets (a commit group, see `commit`) in ONE atomic sled batch, in order, each
    /// unless its `(emitter_id, packet_id)` was accepted before or earlier in `packets`. Returns
    /// one [`Appended`] per packet and the generation written to.
    ///
    /// One batch per group, not per packet, because sled 0.34 writes out its log buffer (a
    /// `pwrite` and a waiting `sync_file_range`) twice for every `apply_batch`, however small: per
    /// packet that capped ingestion near 2,000 packets/s (`docs/BENCHMARKS.md`).
    pub fn append_many(&self, packets: &[Prepared]) -> Result<(Vec<Appended>, u64), WalError> {
        let mut next = lock(&self.inner.append_lock);
        let Handle { db, generation } = self.handle()?;
        let mut answers = Vec::with_capacity(packets.len());
        let mut batch = sled::Batch::default();
        let mut in_batch: std::collections::HashMap<&[u8], u64> = Default::default();
        let (mut seq, mut messages) = (*next, 0u64);
        for p in packets {
            let earlier = match in_batch.get(p.dkey.as_slice()) {
                Some(seq) => Some(*seq),
                None => db
                    .get(&p.dkey)
                    .map_err(|e| self.failed(e))?
                    .map(|v| v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0)),
            };
            if let Some(seq) = earlier {
                answers.push(Appended::Duplicate { seq });
                continue;
            }
            batch.insert(&key(RECORD, seq), p.value.as_slice());
            batch.insert(p.dkey.as_slice(), &seq.to_be_bytes());
            batch.insert(&key(DEDUP_ORDER, seq), p.dkey.as_slice());
            in_batch.insert(&p.dkey, seq);
            answers.push(Appended::New { seq });
            messages += u64::from(p.count);
            seq += 1;
        }
        if seq == *next {
            return Ok((answers, generation));
        }
        let records = seq - *next;
        // Moved before the batch is applied: if applying it fails or panics, these seqs are
        // skipped (allowed), never handed out again over records that may exist.
        *next = seq;
        db.apply_batch(batch).map_err(|e| self.failed(e))?;
        self.inner.next_seq.store(seq, Ordering::Release);
        self.inner
            .pending_records
            .fetch_add(records, Ordering::Relaxed);
        self.inner
            .pending_messages
            .fetch_add(messages, Ordering::Relaxed);
        Ok((answers, generation))
    }

    /// Make every append that returned before this call durable (sled flush + fsync), then raise
    /// the durable horizon. Blocking: call it from a blocking thread (see `commit`).
    pub fn flush(&self) -> Result<(), WalError> {
        self.flush_tagged().map(|_| ())
    }

    /// [`Wal::flush`], returning the generation it flushed.
    pub fn flush_tagged(&self) -> Result<u64, WalError> {
        let Handle { db, generation } = self.handle()?;
        // Every append that returned has a seq below `next_seq`, and appends store in seq order.
        // While `db` is held no reopen can complete, so these appends went to this `db`.
        let horizon = self.inner.next_seq.load(Ordering::Acquire);
        db.flush().map_err(|e| self.failed(e))?;
        self.inner
            .disk_sync
            .sync(&self.inner.dir)
            .map_err(|e| self.failed(sled::Error::Io(e)))?;
        self.inner
            .durable_horizon
            .fetch_max(horizon, Ordering::AcqRel);
        Ok(generation)
    }

    /// Flush, then leave the summary the next open checks its recovery against (see the module
    /// docs). For a graceful stop: nothing may be appended or removed after it.
    pub fn close(&self) -> Result<(), WalError> {
        self.flush()?;
        let summary = CleanStop {
            records: self.pending_records(),
            messages: self.pending_messages(),
            next_seq: self.inner.next_seq.load(Ordering::Acquire),
        };
        let path = self.inner.dir.join(CLEAN_STOP_FILE);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(&summary).map_err(|e| io_error(e.into()))?;
        (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })()
        .map_err(io_error)?;
        sync_dir(&self.inner.dir);
        Ok(())
    }

    /// With fsync off: treat everything appended as deliverable without flushing.
    pub fn mark_written_as_durable(&self) {
        let horizon = self.inner.next_seq.load(Ordering::Acquire);
        self.inner
            .durable_horizon
            .fetch_max(horizon, Ordering::AcqRel);
    }

    /// Every `seq` below this is durable.
    pub fn durable_horizon(&self) -> u64 {
        self.inner.durable_horizon.load(Ordering::Acquire)
    }

    /// The `fdatasync`s made by [`Wal::flush`] on top of sled's flush, since open.
    pub fn disk_syncs(&self) -> DiskSyncs {
        DiskSyncs {
            log: self.inner.disk_sync.log_syncs.load(Ordering::Relaxed),
            blobs: self.inner.disk_sync.blob_syncs.load(Ordering::Relaxed),
        }
    }

    /// Bumped by every in-process reopen. A reader that remembers what it read must read the WAL
    /// again from the start when this changes: removals that were lost make records pending again.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// False while the WAL is failed or reopening: every operation is refused.
    pub fn is_writable(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == STATE_OK
    }

    /// Up to `limit` pending records with `from <= seq < durable_horizon`, in `seq` order.
    /// Undecodable records are moved to quarantine and skipped.
    pub fn read_pending(&self, from: u64, limit: usize) -> Result<Vec<StoredRecord>, WalError> {
        let to = self.durable_horizon();
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let Handle { db, .. } = self.handle()?;
        for item in db.range(key(RECORD, from)..key(RECORD, to)) {
            let (k, v) = item.map_err(|e| self.failed(e))?;
            let Some(seq) = seq_of(&k) else { continue };
            match decode(seq, v) {
                Ok(r) => out.push(r),
                Err(reason) => {
                    tracing::error!(seq, %reason, "WAL record cannot be decoded; moved to quarantine");
                    self.quarantine(&db, seq)?;
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Move a record that cannot be decoded aside, atomically, and stop counting it as pending.
    fn quarantine(&self, db: &sled::Db, seq: u64) -> Result<(), WalError> {
        let Some(v) = db.get(key(RECORD, seq)).map_err(|e| self.failed(e))? else {
            return Ok(());
        };
        // The count in its header, if the header itself is intact (it was counted at append).
        let count = header_count(&v);
        let mut batch = sled::Batch::default();
        batch.insert(&key(QUARANTINE, seq), v);
        batch.remove(&key(RECORD, seq));
        db.apply_batch(batch).map_err(|e| self.failed(e))?;
        self.inner.pending_records.fetch_sub(1, Ordering::Relaxed);
        let _ =
            self.inner
                .pending_messages
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                    Some(m.saturating_sub(u64::from(count)))
                });
        Ok(())
    }

    /// Remove records an analyzer acknowledged. `records` are `(seq, message count)`.
    ///
    /// Not flushed on purpose (see the module docs): losing a removal re-delivers, never loses.
    ///
    /// One `remove` per record, not a batch: nothing needs the removals to be atomic (a record
    /// whose removal is lost is delivered again), and a sled batch writes out its log buffer.
    pub fn remove_delivered(&self, records: &[(u64, u32)]) -> Result<(), WalError> {
        let Handle { db, .. } = self.handle()?;
        // Counted one by one, as removed: after a failure part-way, the retry (and a reopen's
        // recount) must not subtract a record twice.
        for (seq, count) in records {
            if db
                .remove(key(RECORD, *seq))
                .map_err(|e| self.failed(e))?
                .is_some()
            {
                self.inner.pending_records.fetch_sub(1, Ordering::Relaxed);
                self.inner
                    .pending_messages
                    .fetch_sub(u64::from(*count), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The analyzer registry stored by [`Wal::store_registry`], if any.
    pub fn load_registry(&self) -> Result<Option<Vec<u8>>, WalError> {
        let Handle { db, .. } = self.handle()?;
        Ok(db
            .get(REGISTRY)
            .map_err(|e| self.failed(e))?
            .map(|v| v.to_vec()))
    }

    /// Replace the stored analyzer registry and flush (blocking). On `Ok` the change is durable.
    pub fn store_registry(&self, bytes: &[u8]) -> Result<(), WalError> {
        {
            let Handle { db, .. } = self.handle()?;
            db.insert(REGISTRY, bytes).map_err(|e| self.failed(e))?;
        }
        self.flush()
    }

    /// Forget dedup entries older than the retention (only delivered packets can be that old:
    /// pending records keep theirs). Returns how many were forgotten.
    pub fn trim_dedup(&self) -> Result<u64, WalError> {
        let next = self.inner.next_seq.load(Ordering::Acquire);
        let Some(cutoff) = next.checked_sub(self.inner.dedup_retention) else {
            return Ok(0);
        };
        let Handle { db, .. } = self.handle()?;
        let oldest_pending = db
            .scan_prefix([RECORD])
            .next()
            .transpose()
            .map_err(|e| self.failed(e))?
            .and_then(|(k, _)| seq_of(&k))
            .unwrap_or(u64::MAX);
        let cutoff = cutoff.min(oldest_pending);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in db
            .range(key(DEDUP_ORDER, 0)..key(DEDUP_ORDER, cutoff))
            .take(10_000)
        {
            let (k, pkey) = item.map_err(|e| self.failed(e))?;
            batch.remove(k);
            batch.remove(pkey);
            n += 1;
        }
        if n > 0 {
            db.apply_batch(batch).map_err(|e| self.failed(e))?;
        }
        Ok(n)
    }

    /// If the WAL is failed, and a probe write to its directory succeeds, reopen sled in-process
    /// (see the module docs). Returns whether it reopened. Blocking (it writes and fsyncs the
    /// probe, then runs sled's recovery): call it from a blocking thread.
    ///
    /// On an error the WAL stays failed and this can be called again later.
    pub fn try_reopen(&self) -> Result<bool, WalError> {
        if self.inner.state.load(Ordering::Acquire) != STATE_FAILED {
            return Ok(false);
        }
        if let Err(e) = probe_space(&self.inner.dir) {
            return Err(WalError::Unavailable {
                disk_full: e.kind() == std::io::ErrorKind::StorageFull,
                cause: format!("the WAL directory does not take writes yet: {e}"),
            });
        }
        if self
            .inner
            .state
            .compare_exchange(
                STATE_FAILED,
                STATE_REOPENING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Ok(false);
        }
        // sled can panic while recovering (or in a `Drop` that unwraps an fsync); a panic here must
        // not leave the state at REOPENING, which nothing would ever retry.
        let reopened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.reopen()))
            .unwrap_or_else(|panic| {
                Err(WalError::FlushTask(format!(
                    "sled panicked while reopening: {}",
                    panic_message(&*panic)
                )))
            });
        match reopened {
            Ok(()) => Ok(true),
            Err(e) => {
                let mut fault = lock(&self.inner.fault);
                fault.cause = format!("reopening failed: {e}");
                fault.disk_full = e.is_disk_full();
                drop(fault);
                self.inner.state.store(STATE_FAILED, Ordering::Release);
                Err(e)
            }
        }
    }

    fn reopen(&self) -> Result<(), WalError> {
        let started = Instant::now();
        let old = self
            .inner
            .handle
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // With sled's global error set, dropping the last handle does no I/O; without it, sled
        // flushes and `unwrap`s an fsync in its `Drop`: contain that panic.
        if catch_unwind(AssertUnwindSafe(move || drop(old))).is_err() {
            tracing::warn!("sled panicked while closing the failed WAL; reopening anyway");
        }
        // Operations still holding a clone of the old handle keep sled's lock until they return.
        let (db, _) = open_sled(
            &self.inner.dir,
            self.inner.cache_capacity_bytes,
            REOPEN_LOCK_WAIT,
        )?;
        let Found {
            recovered, max_seq, ..
        } = recover(&db)?;
        db.flush()?;
        let mut next = lock(&self.inner.append_lock);
        // Never reuse a seq: one handed out before the failure may be gone from disk now, but the
        // dispatcher may have seen it.
        let start = (*next).max(max_seq.map_or(0, |s| s + 1));
        *next = start;
        self.inner.next_seq.store(start, Ordering::Release);
        self.inner
            .durable_horizon
            .fetch_max(start, Ordering::AcqRel);
        self.inner
            .pending_records
            .store(recovered.records, Ordering::Relaxed);
        self.inner
            .pending_messages
            .store(recovered.messages, Ordering::Relaxed);
        let generation = self.inner.generation.load(Ordering::Acquire) + 1;
        // sled's recovery deletes blobs past its stable point and may reuse their names.
        self.inner.disk_sync.forget();
        *self
            .inner
            .handle
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Handle { db, generation });
        self.inner.generation.store(generation, Ordering::Release);
        let mut fault = lock(&self.inner.fault);
        fault.reopens += 1;
        fault.disk_full = false;
        drop(fault);
        self.inner.state.store(STATE_OK, Ordering::Release);
        drop(next);
        tracing::info!(
            generation,
            records = recovered.records,
            messages = recovered.messages,
            quarantined = recovered.quarantined,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "WAL reopened after a storage failure; accepting packets again"
        );
        Ok(())
    }

    pub fn pending_records(&self) -> u64 {
        self.inner.pending_records.load(Ordering::Relaxed)
    }
    pub fn pending_messages(&self) -> u64 {
        self.inner.pending_messages.load(Ordering::Relaxed)
    }
    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.peek()
            .and_then(|db| db.size_on_disk().ok())
            .unwrap_or(0)
    }
    /// Records moved to quarantine so far (on disk).
    pub fn quarantined(&self) -> u64 {
        // After a storage failure a sled iterator can yield its error forever: stop at the first.
        self.peek().map_or(0, |db| {
            db.scan_prefix([QUARANTINE])
                .take_while(Result::is_ok)
                .count() as u64
        })
    }
    /// How the WAL was opened at start.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.recovery.clone()
    }
    /// The WAL's health now.
    pub fn storage_status(&self) -> StorageStatus {
        let state = match self.inner.state.load(Ordering::Acquire) {
            STATE_OK => "ok",
            STATE_FAILED => "failed",
            _ => "reopening",
        };
        let fault = lock(&self.inner.fault);
        StorageStatus {
            state,
            disk_full: state != "ok" && fault.disk_full,
            last_error: (!fault.cause.is_empty()).then(|| fault.cause.clone()),
            failures: fault.failures,
            reopens: fault.reopens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logdist_proto::{parse_packet, Limits};

    fn packet_json(emitter: &str, packet: &str, n: usize) -> String {
        let msgs: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"timestamp":{i},"level":"INFO","message":"m{i}"}}"#))
            .collect();
        format!(
            r#"{{"emitter_id":"{emitter}","packet_id":"{packet}","messages":[{}]}}"#,
            msgs.join(",")
        )
    }

    fn append(wal: &Wal, emitter: &str, packet: &str, n: usize) -> Appended {
        let body = packet_json(emitter, packet, n);
        let p = parse_packet(body.as_bytes(), &Limits::default()).unwrap();
        wal.append(&p, 1_000).unwrap()
    }

    #[test]
    fn flushed_records_survive_reopen_in_order_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            assert_eq!(rec, Recovered::default());
            assert_eq!(append(&wal, "e1", "p1", 3), Appended::New { seq: 0 });
            assert_eq!(append(&wal, "e1", "p2", 2), Appended::New { seq: 1 });
            wal.flush().unwrap();
        }
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(rec.records, 2);
        assert_eq!(rec.messages, 5);
        let recs = wal.read_pending(0, 10).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(recs[0].emitter_id(), "e1");
        assert_eq!(recs[0].packet_id(), "p1");
        assert_eq!(recs[0].count, 3);
        assert_eq!(recs[0].accepted_at_ms, 1_000);
        let msgs: Vec<serde_json::Value> = serde_json::from_slice(recs[0].raw_messages()).unwrap();
        assert_eq!(msgs.len(), 3);
    }

    /// A packet bigger than a quarter of sled's segment becomes a sled *blob*, a file that sled
    /// itself never syncs: the WAL's flush must `fdatasync` it (once), and sled's log every time.
    #[test]
    fn flush_syncs_the_log_every_time_and_each_new_blob_once() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        let big = |id: &str| {
            let body = format!(
                r#"{{"emitter_id":"e","packet_id":"{id}","messages":[{{"timestamp":1,"level":"INFO","message":"{}"}}]}}"#,
                "x".repeat(200_000)
            );
            let p = parse_packet(body.as_bytes(), &Limits::default()).unwrap();
            wal.append(&p, 1).unwrap();
        };
        let before = wal.disk_syncs();
        big("b1");
        wal.flush().unwrap();
        let first = wal.disk_syncs();
        assert_eq!(first.log, before.log + 1);
        assert!(
            first.blobs > before.blobs,
            "{first:?}: the blob was not synced"
        );
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count() as u64;
        assert!(
            blobs >= 1 && first.blobs <= blobs,
            "{first:?}, {blobs} blob files"
        );
        // Nothing new: the log is synced again, no blob is.
        wal.flush().unwrap();
        let second = wal.disk_syncs();
        assert_eq!((second.log, second.blobs), (first.log + 1, first.blobs));
        big("b2");
        wal.flush().unwrap();
        assert!(wal.disk_syncs().blobs > second.blobs);
    }

    /// A blob sled was still writing when a flush listed it is synced again once it has grown.
    #[test]
    fn a_blob_that_grows_after_its_sync_is_synced_again() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let path = blobs.join("999999999");
        std::fs::write(&path, b"half").unwrap();
        wal.flush().unwrap();
        let first = wal.disk_syncs().blobs;
        assert!(first >= 1);
        // Unchanged: not synced again.
        wal.flush().unwrap();
        assert_eq!(wal.disk_syncs().blobs, first);
        // Grown (sled finished writing it): synced again.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b" and the rest").unwrap();
        drop(f);
        wal.flush().unwrap();
        assert_eq!(wal.disk_syncs().blobs, first + 1);
    }

    #[test]
    fn a_repeated_packet_is_recognised_and_not_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(append(&wal, "e", "p", 2), Appended::New { seq: 0 });
        assert_eq!(append(&wal, "e", "p", 2), Appended::Duplicate { seq: 0 });
        // The same bytes split differently between the two ids is a different packet.
        assert_eq!(append(&wal, "e", "px", 1), Appended::New { seq: 1 });
        assert_eq!(append(&wal, "ep", "x", 1), Appended::New { seq: 2 });
        assert_eq!(wal.pending_messages(), 4);
    }

    fn prepared(emitter: &str, packet: &str, n: usize) -> Prepared {
        let body = packet_json(emitter, packet, n);
        Prepared::new(
            &parse_packet(body.as_bytes(), &Limits::default()).unwrap(),
            7,
        )
    }

    #[test]
    fn a_group_is_stored_in_order_with_duplicates_inside_it_and_before_it_recognised() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            append(&wal, "e", "old", 1);
            let (answers, generation) = wal
                .append_many(&[
                    prepared("e", "a", 2),
                    prepared("e", "old", 1),
                    prepared("e", "b", 3),
                    prepared("e", "a", 2),
                ])
                .unwrap();
            assert_eq!(generation, wal.generation());
            assert_eq!(
                answers,
                vec![
                    Appended::New { seq: 1 },
                    Appended::Duplicate { seq: 0 },
                    Appended::New { seq: 2 },
                    Appended::Duplicate { seq: 1 },
                ]
            );
            assert_eq!((wal.pending_records(), wal.pending_messages()), (3, 6));
            // A group of duplicates only stores nothing and moves no sequence number.
            let (answers, _) = wal.append_many(&[prepared("e", "b", 3)]).unwrap();
            assert_eq!(answers, vec![Appended::Duplicate { seq: 2 }]);
            wal.flush().unwrap();
        }
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!((rec.records, rec.messages), (3, 6));
        let recs = wal.read_pending(0, 10).unwrap();
        let ids: Vec<(u64, &str, u32)> = recs
            .iter()
            .map(|r| (r.seq, r.packet_id(), r.count))
            .collect();
        assert_eq!(ids, vec![(0, "old", 1), (1, "a", 2), (2, "b", 3)]);
        assert_eq!(append(&wal, "e", "c", 1), Appended::New { seq: 3 });
    }

    #[test]
    fn a_removal_counts_only_records_that_were_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        append(&wal, "e", "p0", 2);
        append(&wal, "e", "p1", 3);
        wal.remove_delivered(&[(0, 2)]).unwrap();
        // A retried removal (e.g. after a failure part-way) must not subtract twice.
        wal.remove_delivered(&[(0, 2), (1, 3)]).unwrap();
        assert_eq!((wal.pending_records(), wal.pending_messages()), (0, 0));
    }

    #[test]
    fn delivered_records_are_gone_after_reopen_but_still_deduplicated_and_seqs_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            append(&wal, "e", "p0", 1);
            append(&wal, "e", "p1", 4);
            wal.remove_delivered(&[(0, 1), (1, 4)]).unwrap();
            assert_eq!(wal.pending_messages(), 0);
            wal.flush().unwrap();
        }
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(rec.records, 0);
        assert_eq!(append(&wal, "e", "p1", 4), Appended::Duplicate { seq: 1 });
        assert_eq!(append(&wal, "e", "p2", 1), Appended::New { seq: 2 });
    }

    #[test]
    fn records_beyond_the_durable_horizon_are_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        append(&wal, "e", "p0", 1);
        assert!(wal.read_pending(0, 10).unwrap().is_empty());
        wal.flush().unwrap();
        append(&wal, "e", "p1", 1);
        assert_eq!(wal.read_pending(0, 10).unwrap().len(), 1);
        wal.flush().unwrap();
        assert_eq!(wal.read_pending(1, 10).unwrap()[0].seq, 1);
    }

    #[test]
    fn dedup_index_is_trimmed_to_its_retention_but_never_for_pending_records() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 2).unwrap();
        for i in 0..5 {
            append(&wal, "e", &format!("p{i}"), 1);
        }
        // seq 0 pending: nothing may be trimmed.
        assert_eq!(wal.trim_dedup().unwrap(), 0);
        wal.remove_delivered(&[(0, 1), (1, 1), (2, 1), (3, 1)])
            .unwrap();
        assert_eq!(wal.trim_dedup().unwrap(), 3, "keeps the last 2 of 5");
        assert_eq!(append(&wal, "e", "p0", 1), Appended::New { seq: 5 });
        assert_eq!(append(&wal, "e", "p4", 1), Appended::Duplicate { seq: 4 });
    }

    #[test]
    fn an_undecodable_record_is_quarantined_at_recovery_and_the_rest_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            append(&wal, "e", "p0", 2);
            append(&wal, "e", "p1", 3);
            wal.peek()
                .unwrap()
                .insert(key(RECORD, 0), &b"\x01garbage"[..])
                .unwrap();
            wal.flush().unwrap();
        }
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!((rec.records, rec.messages, rec.quarantined), (1, 3, 1));
        assert_eq!(wal.quarantined(), 1);
        assert_eq!(wal.read_pending(0, 10).unwrap()[0].seq, 1);
    }

    fn fill(wal: &Wal, packets: usize) {
        for i in 0..packets {
            append(wal, "e", &format!("p{i}"), 20);
        }
        wal.flush().unwrap();
    }

    fn remove_snapshots(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
            {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    #[test]
    fn a_wal_whose_log_was_emptied_is_refused_instead_of_opened_empty() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let (wal, _) = Wal::open(&data, 1 << 20, 100).unwrap();
            assert_eq!(wal.recovery_report().sled_open, "created");
            fill(&wal, 10);
        }
        std::fs::File::options()
            .write(true)
            .open(data.join("db"))
            .unwrap()
            .set_len(0)
            .unwrap();
        remove_snapshots(&data);

        let refused = Wal::open(&data, 1 << 20, 100).err().expect("refused");
        assert!(matches!(refused, WalError::Damaged { .. }), "{refused}");
        assert!(data.join("db").exists(), "left in place");

        let (wal, recovered) = Wal::open_with(&data, 1 << 20, 100, OnDamage::MoveAside).unwrap();
        assert_eq!(recovered, Recovered::default());
        let report = wal.recovery_report();
        let aside = report.moved_aside.expect("moved aside");
        assert!(aside.join("db").exists(), "{}", aside.display());
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("data.corrupt-"));
        assert!(report.damage.unwrap().contains("empty"));
        assert_eq!(append(&wal, "e", "p0", 1), Appended::New { seq: 0 });
    }

    #[test]
    fn a_crash_during_the_very_first_open_is_not_mistaken_for_damage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join(INITIALIZING_FILE)).unwrap();
        std::fs::File::create(dir.path().join("db")).unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(wal.recovery_report().sled_open, "created");
        assert!(!dir.path().join(INITIALIZING_FILE).exists());
    }

    #[test]
    fn a_wal_whose_snapshot_is_damaged_is_refused_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            // The second open makes sled write a snapshot of the first one's log.
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            fill(&wal, 100);
        }
        let snapshot = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("snap.")
            })
            .expect("sled wrote a snapshot");
        std::fs::File::options()
            .write(true)
            .open(&snapshot)
            .unwrap()
            .set_len(50)
            .unwrap();

        let refused = Wal::open(dir.path(), 1 << 20, 100).err().expect("refused");
        let WalError::Damaged { reason, .. } = &refused else {
            panic!("expected Damaged, got {refused}");
        };
        assert!(reason.contains("sled"), "{reason}");
        assert!(snapshot.exists(), "left in place");
    }

    #[test]
    fn records_missing_since_the_last_clean_stop_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            fill(&wal, 1_000);
            wal.close().unwrap();
        }
        // Without a snapshot, sled recovers a cut log up to its last intact entry, silently.
        remove_snapshots(dir.path());
        let db = dir.path().join("db");
        let len = std::fs::metadata(&db).unwrap().len();
        let f = std::fs::File::options().write(true).open(&db).unwrap();
        f.set_len(len - 100_000).unwrap();

        match Wal::open(dir.path(), 1 << 20, 100) {
            Ok((wal, recovered)) => {
                let lost = wal
                    .recovery_report()
                    .missing_since_clean_stop
                    .expect("compared");
                assert!(lost.records > 0, "a 100 kB cut loses records");
                assert_eq!(lost.records + recovered.records, 1_000);
                assert_eq!(lost.messages + recovered.messages, 20_000);
                // Sequence numbers continue after the lost records.
                assert_eq!(append(&wal, "e", "new", 1), Appended::New { seq: 1_000 });
            }
            // sled may also panic on such a log; then it is refused, never opened short.
            Err(e) => assert!(matches!(e, WalError::Damaged { .. }), "{e}"),
        }
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100)
            .or_else(|_| Wal::open_with(dir.path(), 1 << 20, 100, OnDamage::MoveAside))
            .unwrap();
        assert_eq!(
            wal.recovery_report().missing_since_clean_stop,
            None,
            "the summary is used once"
        );
    }

    #[test]
    fn every_operation_is_refused_while_the_wal_is_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        append(&wal, "e", "p0", 1);
        wal.flush().unwrap();
        let io = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let e = wal.failed(sled::Error::Io(io));
        assert!(e.is_disk_full());

        let body = packet_json("e", "p1", 1);
        let p = parse_packet(body.as_bytes(), &Limits::default()).unwrap();
        let refused = wal.append(&p, 1).unwrap_err();
        assert!(
            matches!(
                refused,
                WalError::Unavailable {
                    disk_full: true,
                    ..
                }
            ),
            "{refused}"
        );
        assert!(wal.flush().unwrap_err().is_disk_full());
        assert!(wal.remove_delivered(&[(0, 1)]).is_err());
        assert_eq!(wal.pending_messages(), 1);
        let status = wal.storage_status();
        assert_eq!((status.state, status.disk_full), ("failed", true));

        // Space is there (this is a normal disk): the reopen succeeds and nothing was lost.
        assert!(wal.try_reopen().unwrap());
        assert_eq!(wal.generation(), 1);
        assert_eq!(wal.storage_status().state, "ok");
        assert_eq!(wal.read_pending(0, 10).unwrap().len(), 1);
        assert_eq!(append(&wal, "e", "p1", 1), Appended::New { seq: 1 });
        assert_eq!(wal.flush_tagged().unwrap(), 1);
    }
}
