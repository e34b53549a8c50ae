//! Storage faults: a disk that fills up under a running distributor, and WAL files damaged while
//! it was stopped. The end-to-end tests run the real binary (see `e2e/helpers.rs`) and count
//! messages through the analyzers' `/audit`; two tests drive `Wal` and `GroupCommit` directly, to
//! pin down which call sees a full disk and what it answers.
//!
//! The full-disk tests put the WAL on a small tmpfs. Mounting needs root (CI runs as root); when
//! `mount` fails they print a `SKIP:` line and pass.

#[allow(dead_code)]
#[path = "e2e/helpers.rs"]
mod helpers;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use distributor::commit::{CommitError, GroupCommit};
use distributor::wal::{Appended, Wal, WalError};
use emitter::generate::OutPacket;
use futures_util::StreamExt;
use helpers::*;
use logdist_proto::{parse_packet, Limits, MessageId};
use serde_json::Value;

const DRAIN: Duration = Duration::from_secs(60);

/// A tmpfs mounted on a fresh temporary directory; unmounted on drop, also when a test fails
/// (declare it before anything that keeps files open on it, so that it is dropped last).
struct Tmpfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `Err` says why it could not be mounted (typically: not root).
    fn mount(size_mib: u32) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&mnt)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(why.trim().replace('\n', "; "));
        }
        Ok(Tmpfs { mnt, _dir: dir })
    }

    /// Fill the file system with `path` until it is full, then give back `leave` bytes.
    fn fill_leaving(&self, path: &Path, leave: u64) {
        let mut f = std::fs::File::create(path).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(leave)).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still has a file open on it: detach it now, it goes when they close.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

macro_rules! tmpfs_or_skip {
    ($size_mib:expr) => {
        match Tmpfs::mount($size_mib) {
            Ok(fs) => fs,
            Err(why) => {
                eprintln!(
                    "SKIP: cannot mount a tmpfs to fill ({why}); run as root to test a full disk"
                );
                return;
            }
        }
    };
}

/// POST one packet once (no retry): its status and JSON answer.
async fn post_packet(url: &str, p: &OutPacket) -> (u16, Value) {
    let r = http()
        .post(format!("{url}/logs"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(p).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    let mut body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default();
    body["retry_after_present"] = Value::Bool(retry_after);
    (status, body)
}

fn all_ids(packets: &[OutPacket]) -> HashSet<MessageId> {
    packets.iter().flat_map(ids_of).collect()
}

async fn stats(d: &Distributor) -> Value {
    get_json(&format!("{}/stats", d.url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_loses_nothing_acknowledged_and_ingestion_resumes_without_a_restart(
) {
    // Arrange: the WAL on a 32 MiB tmpfs, analyzers off so that everything stays in the WAL.
    let fs = tmpfs_or_skip!(32);
    let a = analyzers(2).await;
    for x in &a {
        x.disable().await;
    }
    let endpoints = [
        (a[0].id.as_str(), a[0].url.as_str(), 0.5),
        (a[1].id.as_str(), a[1].url.as_str(), 0.5),
    ];
    let mut d = Distributor::start_in(&endpoints, "", Some(fs.mnt.join("data"))).await;
    let filler = fs.mnt.join("filler");
    fs.fill_leaving(&filler, 4 << 20);

    // Act: stream packets (4 at a time, no retries) until 20 were refused.
    let sent = packets(21, 3_000, 50);
    let refusals = std::sync::atomic::AtomicUsize::new(0);
    let answers: Vec<(usize, u16, Value)> = futures_util::stream::iter(sent.iter().enumerate())
        .map(|(i, p)| {
            let (url, refusals) = (&d.url, &refusals);
            async move {
                if refusals.load(std::sync::atomic::Ordering::SeqCst) >= 20 {
                    return None;
                }
                let (status, body) = post_packet(url, p).await;
                if !(200..300).contains(&status) {
                    refusals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Some((i, status, body))
            }
        })
        .buffer_unordered(4)
        .filter_map(|x| async move { x })
        .collect()
        .await;

    // Assert: 2xx until the disk filled, then 507 naming the cause; the process is alive.
    let mut acked: HashSet<MessageId> = HashSet::new();
    let mut full = 0;
    for (i, status, body) in &answers {
        match status {
            202 => acked.extend(ids_of(&sent[*i])),
            507 => {
                full += 1;
                let error = body["error"].as_str().unwrap_or_default();
                assert!(error.contains("disk is full"), "{body}");
                assert_eq!(body["retry_after_present"], true, "{body}");
            }
            other => panic!("packet {i}: unexpected {other}: {body}"),
        }
    }
    assert!(
        full >= 1,
        "the disk never filled ({} answers)",
        answers.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was accepted before the disk filled"
    );
    assert!(d.is_running(), "the distributor exited:\n{}", d.log());
    let s = stats(&d).await;
    assert_eq!(s["storage"]["state"], "failed", "{s}");
    assert_eq!(s["storage"]["disk_full"], true, "{s}");
    let health = get_json(&format!("{}/health", d.url)).await;
    assert_eq!(health["storage"], "failed", "{health}");

    // Act: space comes back.
    std::fs::remove_file(&filler).unwrap();
    let stats_url = format!("{}/stats", d.url);
    wait_until(
        "the WAL reopened without a restart",
        Duration::from_secs(15),
        || async { get_json(&stats_url).await["storage"]["state"] == "ok" },
    )
    .await;

    // Assert: ingestion resumes in the same process, and after the analyzers drain the WAL every
    // acknowledged message was delivered.
    let more = packets(22, 40, 50);
    acked.extend(send_all(&d.client(), more.clone(), 4).await);
    for x in &a {
        x.enable().await;
    }
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    let lost = delivered.lost(&acked);
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let mut sent_ids = all_ids(&sent);
    sent_ids.extend(all_ids(&more));
    let strangers: Vec<_> = delivered
        .by_id
        .keys()
        .filter(|id| !sent_ids.contains(id))
        .collect();
    assert!(
        strangers.is_empty(),
        "delivered messages nobody sent: {strangers:?}"
    );
    let s = stats(&d).await;
    assert_eq!(s["storage"]["reopens"], 1, "{s}");
    assert_eq!(s["wal"]["quarantined_records"], 0, "{s}");
    assert!(d.is_running());
    let log = d.log();
    assert!(log.contains("WAL storage failed"), "{log}");
    assert!(log.contains("WAL reopened"), "{log}");
    eprintln!(
        "disk full: {} acknowledged before + {} after, {full} answered 507, {} delivered ({} of them not acknowledged), {} by two analyzers",
        acked.len() - more.len() * 50,
        more.len() * 50,
        delivered.by_id.len(),
        delivered.by_id.len() - acked.len(),
        delivered.duplicated()
    );
}

fn packet_json(n: usize) -> String {
    let msgs: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"timestamp":{i},"level":"INFO","message":"{}"}}"#,
                "x".repeat(500)
            )
        })
        .collect();
    format!(
        r#"{{"emitter_id":"e","packet_id":"p{n}","messages":[{}]}}"#,
        msgs.join(",")
    )
}

#[test]
fn a_wal_on_a_full_disk_acknowledges_nothing_unflushed_and_reopens_with_every_flushed_record() {
    // Arrange: a WAL on a 16 MiB tmpfs with 2 MiB left.
    let fs = tmpfs_or_skip!(16);
    let dir = fs.mnt.join("wal");
    let (wal, _) = Wal::open(&dir, 4 << 20, 1_000_000).unwrap();
    let filler = fs.mnt.join("filler");
    fs.fill_leaving(&filler, 2 << 20);

    // Act: append, flushing every FLUSH_EVERY appends, until sled fails.
    const FLUSH_EVERY: usize = 1;
    let mut flushed = Vec::new();
    let mut unflushed = Vec::new();
    let (failure, failed_in) = loop {
        let body = packet_json(flushed.len() + unflushed.len());
        let p = parse_packet(body.as_bytes(), &Limits::default()).unwrap();
        match wal.append_tagged(&p, 1) {
            Ok((Appended::New { seq }, generation)) => {
                assert_eq!(generation, 0);
                unflushed.push(seq);
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => break (e, "append"),
        }
        if unflushed.len() == FLUSH_EVERY {
            match wal.flush_tagged() {
                Ok(generation) => {
                    assert_eq!(generation, 0);
                    flushed.append(&mut unflushed);
                }
                Err(e) => break (e, "flush"),
            }
        }
        assert!(flushed.len() < 100_000, "the disk never filled");
    };

    // Assert: a disk-full error; from then on everything is refused, even with space back, until
    // the WAL is reopened.
    eprintln!(
        "sled failed in {failed_in} after {} flushed records: {failure}",
        flushed.len()
    );
    assert!(failure.is_disk_full(), "{failure}");
    let p = packet_json(999_999);
    let p = parse_packet(p.as_bytes(), &Limits::default()).unwrap();
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
    let still_full = wal.try_reopen().unwrap_err();
    assert!(still_full.is_disk_full(), "{still_full}");
    assert_eq!(wal.storage_status().state, "failed");

    std::fs::remove_file(&filler).unwrap();
    assert!(wal.try_reopen().unwrap(), "reopened");

    // Every flushed record is there, byte for byte; a flush now covers generation 1, so an append
    // made to generation 0 and never flushed can no longer be acknowledged by it.
    assert_eq!(wal.generation(), 1);
    assert_eq!(wal.flush_tagged().unwrap(), 1);
    let pending = wal.read_pending(0, 1_000_000).unwrap();
    let present: HashSet<u64> = pending.iter().map(|r| r.seq).collect();
    for seq in &flushed {
        assert!(present.contains(seq), "flushed record {seq} lost");
    }
    for r in &pending {
        assert_eq!(r.packet_id(), format!("p{}", r.seq));
        assert_eq!(r.count, 20);
    }
    assert_eq!(wal.pending_records(), pending.len() as u64);
    // Appends resume, and never reuse a sequence number handed out before.
    let before = flushed.iter().chain(&unflushed).max().copied().unwrap_or(0);
    match wal.append(&p, 1).unwrap() {
        Appended::New { seq } => assert!(seq > before, "seq {seq} reused (<= {before})"),
        other => panic!("{other:?}"),
    }
    wal.flush().unwrap();
    drop(wal);
}

/// Cut `cut` bytes off the end of `file`, then overwrite `scribbles` runs of 64 bytes in the last
/// 64 KiB with pseudo-random bytes (seeded, so a failure can be replayed).
fn damage_tail(file: &Path, cut: u64, scribbles: u32, seed: u64) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::options().write(true).open(file).unwrap();
    let len = f.metadata().unwrap().len() - cut;
    f.set_len(len).unwrap();
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for _ in 0..scribbles {
        let at = len - 64 - next() % (64 * 1024 - 64);
        let bytes: Vec<u8> = (0..64).map(|_| next() as u8).collect();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&bytes).unwrap();
    }
    f.sync_all().unwrap();
}

/// Start with every analyzer off, accept `rounds` batches of packets with a clean restart in
/// between (the second open makes sled write a snapshot), and stop cleanly.
async fn backlog_then_stop(a: &[TestAnalyzer], rounds: u64) -> (Distributor, HashSet<MessageId>) {
    for x in a {
        x.disable().await;
    }
    let endpoints: Vec<(&str, &str, f64)> = a
        .iter()
        .map(|x| (x.id.as_str(), x.url.as_str(), 1.0))
        .collect();
    let mut d = Distributor::start_with(&endpoints, "").await;
    let mut acked = HashSet::new();
    for round in 0..rounds {
        if round > 0 {
            d.restart().await;
        }
        acked.extend(send_all(&d.client(), packets(30 + round, 100, 20), 4).await);
        assert!(d.terminate().success());
    }
    snapshot_of(d.data_dir());
    (d, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_damaged_while_stopped_is_recovered_past_and_what_is_missing_is_reported() {
    // Arrange: 4,000 acknowledged messages pending in a cleanly stopped WAL; its tail damaged.
    let a = analyzers(2).await;
    let (mut d, acked) = backlog_then_stop(&a, 2).await;
    damage_tail(&d.data_dir().join("db"), 16 * 1024, 8, 7);

    // Act
    d.restart().await;

    // Assert: it serves, and says what it recovered and what it lost.
    let s = stats(&d).await;
    let recovery = &s["recovery"];
    assert_eq!(recovery["sled_open"], "ok", "{s}");
    let recovered = recovery["messages"].as_u64().unwrap();
    let lost = recovery["missing_since_clean_stop"]["messages"]
        .as_u64()
        .unwrap();
    assert_eq!(recovery["quarantined_records"], 0, "{recovery}");
    assert_eq!(recovered + lost, acked.len() as u64, "{recovery}");
    assert_eq!(d.queue().await["size"], recovered);
    if lost > 0 {
        assert!(d.log().contains("are missing"), "{}", d.log());
    }
    let more = send_all(&d.client(), packets(40, 10, 20), 4).await;
    for x in &a {
        x.enable().await;
    }
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    assert_eq!(delivered.lost(&more), vec![], "new packets delivered");
    let old: Vec<_> = delivered
        .by_id
        .keys()
        .filter(|id| !more.contains(id))
        .collect();
    assert!(
        old.iter().all(|id| acked.contains(id)),
        "only what was sent"
    );
    assert_eq!(
        old.len() as u64,
        recovered,
        "everything recovered is delivered"
    );
    assert_eq!(delivered.duplicated(), 0);
    eprintln!(
        "damaged tail: {} acknowledged, {recovered} recovered and delivered, {lost} lost",
        acked.len()
    );
}

fn snapshot_of(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
        })
        .expect("sled wrote a snapshot")
}

fn cut_to(file: &Path, len: u64) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Run the stopped distributor without `--recover`: it must refuse, name the flag and the
/// directory, and leave the files as they were.
fn assert_refused_naming_the_flag(d: &Distributor) {
    let before: Vec<_> = std::fs::read_dir(d.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let (status, stderr) = d.run_expecting_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("is damaged") && stderr.contains("--recover"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&d.data_dir().display().to_string()),
        "{stderr}"
    );
    let after: Vec<_> = std::fs::read_dir(d.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "the damaged WAL is left in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_stops_the_start_naming_the_flag_and_recover_rebuilds_everything_from_the_log(
) {
    // Arrange: 4,000 acknowledged messages pending in a cleanly stopped WAL; sled's snapshot cut.
    let a = analyzers(1).await;
    let (mut d, acked) = backlog_then_stop(&a, 2).await;
    cut_to(&snapshot_of(d.data_dir()), 50);

    // Act + Assert: without the flag it refuses (sled answers Corruption).
    assert_refused_naming_the_flag(&d);

    // With --recover, sled rebuilds its state from the log: nothing is missing.
    d.args = vec!["--recover".into()];
    d.restart().await;
    let s = stats(&d).await;
    let recovery = &s["recovery"];
    assert!(
        recovery["sled_open"]
            .as_str()
            .unwrap()
            .starts_with("ok without its damaged snapshot"),
        "{recovery}"
    );
    assert_eq!(recovery["snapshots_set_aside"].as_array().unwrap().len(), 1);
    assert_eq!(recovery["moved_aside"], Value::Null);
    assert_eq!(
        recovery["missing_since_clean_stop"]["records"], 0,
        "{recovery}"
    );
    assert_eq!(recovery["messages"], acked.len() as u64);
    a[0].enable().await;
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    delivered.assert_all_and_only(&acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_that_cannot_be_recovered_is_refused_and_recover_moves_it_aside_and_starts_empty() {
    // Arrange: a cleanly stopped WAL with a backlog whose log file was emptied.
    let a = analyzers(1).await;
    let (mut d, _acked) = backlog_then_stop(&a, 2).await;
    cut_to(&d.data_dir().join("db"), 0);

    // Act + Assert: refused without the flag.
    assert_refused_naming_the_flag(&d);

    // With --recover: the snapshot alone does not help, so the directory is moved aside, the
    // log says the pending messages were not recovered, and it serves with an empty WAL.
    d.args = vec!["--recover".into()];
    d.restart().await;
    let s = stats(&d).await;
    let aside = PathBuf::from(s["recovery"]["moved_aside"].as_str().expect("moved_aside"));
    let name = aside.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("data.corrupt-"), "{name}");
    assert!(aside.join("db").exists(), "{}", aside.display());
    let damage = s["recovery"]["damage"].as_str().unwrap_or_default();
    assert!(damage.contains("without its snapshot"), "{s}");
    assert!(d.log().contains("could NOT be recovered"));
    assert_eq!(d.queue().await["size"], 0);
    let acked = send_all(&d.client(), packets(41, 10, 20), 4).await;
    a[0].enable().await;
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    delivered.assert_all_and_only(&acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_quarantined_at_start_reported_and_the_rest_delivered() {
    // Arrange: 10 packets of 10 pending; one record overwritten with garbage while stopped.
    let a = analyzers(1).await;
    a[0].disable().await;
    let mut d = Distributor::start(&[(&a[0], 1.0)], "").await;
    let sent = packets(42, 10, 10);
    let acked = send_all(&d.client(), sent.clone(), 2).await;
    assert!(d.terminate().success());
    let damaged_packet = {
        let db = sled::open(d.data_dir()).unwrap();
        let (k, v) = db.scan_prefix([b'r']).next().unwrap().unwrap();
        let record = distributor::wal::decode(0, v).unwrap();
        let id = record.packet_id().to_string();
        db.insert(k, &b"\x01not a record"[..]).unwrap();
        db.flush().unwrap();
        id
    };

    // Act
    d.restart().await;

    // Assert
    let s = stats(&d).await;
    assert_eq!(s["recovery"]["quarantined_records"], 1, "{s}");
    assert_eq!(s["recovery"]["messages"], 90, "{s}");
    assert_eq!(
        s["recovery"]["missing_since_clean_stop"]["records"], 1,
        "{s}"
    );
    assert_eq!(
        s["recovery"]["missing_since_clean_stop"]["messages"], 10,
        "{s}"
    );
    assert_eq!(s["wal"]["quarantined_records"], 1, "{s}");
    let log = d.log();
    assert!(log.contains("moved to quarantine"), "{log}");
    a[0].enable().await;
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    let expected: HashSet<MessageId> = acked
        .into_iter()
        .filter(|id| id.packet_id != damaged_packet)
        .collect();
    assert_eq!(
        delivered.by_id.keys().cloned().collect::<HashSet<_>>(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_flush_that_hits_a_full_disk_get_an_error_never_an_acknowledgement() {
    // Arrange: a WAL on a tmpfs with a few records acknowledged, then not a byte left.
    let fs = tmpfs_or_skip!(16);
    let (wal, _) = Wal::open(&fs.mnt.join("wal"), 4 << 20, 1_000_000).unwrap();
    let (commit, _committer) = GroupCommit::start(
        wal.clone(),
        true,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    );
    let append = |n: usize| {
        let body = packet_json(n);
        let p = parse_packet(body.as_bytes(), &Limits::default()).unwrap();
        wal.append_tagged(&p, 1)
    };
    for n in 0..10 {
        let (_, generation) = append(n).unwrap();
        commit.wait_durable_in(generation).await.unwrap();
    }
    let filler = fs.mnt.join("filler");
    fs.fill_leaving(&filler, 0);

    // Act: the append only reaches sled's buffer in memory; the flush has to write it.
    let (appended, generation) = append(10).expect("an append is buffered in memory");
    let waited = commit.wait_durable_in(generation).await;

    // Assert
    match waited {
        Err(CommitError::Flush {
            disk_full: true, ..
        }) => {}
        other => panic!("expected a disk-full flush error, got {other:?} for {appended:?}"),
    }
    let refused = append(11).unwrap_err();
    assert!(refused.is_disk_full(), "{refused}");

    // Once space is back and the WAL reopened, a waiter for the old generation is still refused
    // (its append may not have survived), and new appends are acknowledged.
    std::fs::remove_file(&filler).unwrap();
    assert!(tokio::task::spawn_blocking({
        let wal = wal.clone();
        move || wal.try_reopen()
    })
    .await
    .unwrap()
    .unwrap());
    assert!(matches!(
        commit.wait_durable_in(generation).await,
        Err(CommitError::Reopened)
    ));
    let (_, generation) = append(12).unwrap();
    assert_eq!(generation, 1);
    commit.wait_durable_in(generation).await.unwrap();
    assert_eq!(
        wal.read_pending(0, 100).unwrap().len() as u64,
        wal.pending_records()
    );
    assert!(
        wal.pending_records() >= 11,
        "the 10 acknowledged and the last one"
    );
}
