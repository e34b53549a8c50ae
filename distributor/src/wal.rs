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
//! 4. [`Wal::remove_delivered`] removes a record after an analyzer answered 2xx for it. The removal
//!    is not flushed by itself (sled flushes every 500 ms): a crash may resurrect a delivered record,
//!    which is then delivered again — a duplicate, never a loss.
//! 5. [`Wal::open`] recovers: it counts what is pending and continues sequence numbers after the
//!    highest ever used.
//!
//! The module is the only one that knows sled; swapping the engine means rewriting this file.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use logdist_proto::Packet;
use sled::IVec;

const RECORD: u8 = b'r';
const DEDUP: u8 = b'p';
const DEDUP_ORDER: u8 = b'd';
const QUARANTINE: u8 = b'q';
const VERSION: u8 = 1;

/// What can go wrong with the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// sled failed to read, write or flush. Often an I/O error (disk full, permissions); the WAL
    /// stays consistent and the operation can be retried once the cause is gone.
    #[error("WAL storage error: {0}")]
    Storage(#[from] sled::Error),
    /// sled's background work panicked or the flush task was lost; not recoverable in-process.
    #[error("WAL flush task failed: {0}")]
    FlushTask(String),
}

impl WalError {
    /// True when the underlying cause is a full disk (the caller answers 507 instead of 503).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, WalError::Storage(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// Result of [`Wal::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence number (not yet durable: flush before acknowledging).
    New { seq: u64 },
    /// This `(emitter_id, packet_id)` was accepted before (as `seq`); nothing was stored.
    Duplicate { seq: u64 },
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

/// The WAL. Clone it freely: clones share one database.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
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

impl Wal {
    /// Open (or create) the WAL in `dir` and recover its state.
    ///
    /// `cache_capacity_bytes` bounds sled's page cache (sled's default let RSS reach ~390 MB).
    pub fn open(
        dir: &Path,
        cache_capacity_bytes: u64,
        dedup_retention: u64,
    ) -> Result<(Self, Recovered), WalError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
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
        let next = max_seq.map_or(0, |s| s + 1);
        let wal = Wal {
            inner: Arc::new(Inner {
                db,
                append_lock: Mutex::new(next),
                durable_horizon: AtomicU64::new(next),
                next_seq: AtomicU64::new(next),
                pending_records: AtomicU64::new(recovered.records),
                pending_messages: AtomicU64::new(recovered.messages),
                dedup_retention,
            }),
        };
        Ok((wal, recovered))
    }

    /// Store a packet unless its `(emitter_id, packet_id)` was accepted before.
    ///
    /// Not durable until a [`Wal::flush`] that starts after this returns has returned.
    pub fn append(&self, packet: &Packet<'_>, accepted_at_ms: u64) -> Result<Appended, WalError> {
        let dkey = dedup_key(&packet.emitter_id, &packet.packet_id);
        let value = encode(packet, accepted_at_ms);
        // A poisoned lock only means another append panicked between two sled calls; the counter
        // it guards is still a valid next sequence number.
        let mut next = self
            .inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.inner.db.get(&dkey)? {
            let seq = existing
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            return Ok(Appended::Duplicate { seq });
        }
        let seq = *next;
        let mut batch = sled::Batch::default();
        batch.insert(&key(RECORD, seq), value);
        batch.insert(dkey.as_slice(), &seq.to_be_bytes());
        batch.insert(&key(DEDUP_ORDER, seq), dkey.as_slice());
        self.inner.db.apply_batch(batch)?;
        *next = seq + 1;
        self.inner.next_seq.store(seq + 1, Ordering::Release);
        self.inner.pending_records.fetch_add(1, Ordering::Relaxed);
        self.inner
            .pending_messages
            .fetch_add(u64::from(packet.count), Ordering::Relaxed);
        Ok(Appended::New { seq })
    }

    /// Make every append that returned before this call durable (sled flush + fsync), then raise
    /// the durable horizon. Blocking: call it from a blocking thread (see `commit`).
    pub fn flush(&self) -> Result<(), WalError> {
        // Every append that returned has a seq below `next_seq`, and appends store in seq order.
        let horizon = self.inner.next_seq.load(Ordering::Acquire);
        self.inner.db.flush()?;
        self.inner
            .durable_horizon
            .fetch_max(horizon, Ordering::AcqRel);
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

    /// Up to `limit` pending records with `from <= seq < durable_horizon`, in `seq` order.
    /// Undecodable records are moved to quarantine and skipped.
    pub fn read_pending(&self, from: u64, limit: usize) -> Result<Vec<StoredRecord>, WalError> {
        let to = self.durable_horizon();
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for item in self.inner.db.range(key(RECORD, from)..key(RECORD, to)) {
            let (k, v) = item?;
            let Some(seq) = seq_of(&k) else { continue };
            match decode(seq, v) {
                Ok(r) => out.push(r),
                Err(reason) => {
                    tracing::error!(seq, %reason, "WAL record cannot be decoded; moved to quarantine");
                    self.quarantine(seq)?;
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Move a record that cannot be decoded aside, atomically, and stop counting it as pending.
    fn quarantine(&self, seq: u64) -> Result<(), WalError> {
        let Some(v) = self.inner.db.get(key(RECORD, seq))? else {
            return Ok(());
        };
        // The count in its header, if the header itself is intact (it was counted at append).
        let count = v
            .get(9..13)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        let mut batch = sled::Batch::default();
        batch.insert(&key(QUARANTINE, seq), v);
        batch.remove(&key(RECORD, seq));
        self.inner.db.apply_batch(batch)?;
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
    pub fn remove_delivered(&self, records: &[(u64, u32)]) -> Result<(), WalError> {
        let mut batch = sled::Batch::default();
        for (seq, _) in records {
            batch.remove(&key(RECORD, *seq));
        }
        self.inner.db.apply_batch(batch)?;
        let messages: u64 = records.iter().map(|(_, c)| u64::from(*c)).sum();
        self.inner
            .pending_records
            .fetch_sub(records.len() as u64, Ordering::Relaxed);
        self.inner
            .pending_messages
            .fetch_sub(messages, Ordering::Relaxed);
        Ok(())
    }

    /// Forget dedup entries older than the retention (only delivered packets can be that old:
    /// pending records keep theirs). Returns how many were forgotten.
    pub fn trim_dedup(&self) -> Result<u64, WalError> {
        let next = self.inner.next_seq.load(Ordering::Acquire);
        let Some(cutoff) = next.checked_sub(self.inner.dedup_retention) else {
            return Ok(0);
        };
        let oldest_pending = self
            .inner
            .db
            .scan_prefix([RECORD])
            .next()
            .transpose()?
            .and_then(|(k, _)| seq_of(&k))
            .unwrap_or(u64::MAX);
        let cutoff = cutoff.min(oldest_pending);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self
            .inner
            .db
            .range(key(DEDUP_ORDER, 0)..key(DEDUP_ORDER, cutoff))
            .take(10_000)
        {
            let (k, pkey) = item?;
            batch.remove(k);
            batch.remove(pkey);
            n += 1;
        }
        if n > 0 {
            self.inner.db.apply_batch(batch)?;
        }
        Ok(n)
    }

    pub fn pending_records(&self) -> u64 {
        self.inner.pending_records.load(Ordering::Relaxed)
    }
    pub fn pending_messages(&self) -> u64 {
        self.inner.pending_messages.load(Ordering::Relaxed)
    }
    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
    /// Records moved to quarantine so far (on disk).
    pub fn quarantined(&self) -> u64 {
        self.inner.db.scan_prefix([QUARANTINE]).count() as u64
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
            wal.inner
                .db
                .insert(key(RECORD, 0), &b"\x01garbage"[..])
                .unwrap();
            wal.flush().unwrap();
        }
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!((rec.records, rec.messages, rec.quarantined), (1, 3, 1));
        assert_eq!(wal.quarantined(), 1);
        assert_eq!(wal.read_pending(0, 10).unwrap()[0].seq, 1);
    }
}
