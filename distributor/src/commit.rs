//! Group commit: many concurrent requests share one sled batch and one WAL flush.
//!
//! A request hands its encoded packet to [`GroupCommit::commit`]. The committer task takes every
//! request waiting at that moment (a *group*), and on one blocking thread stores all their packets
//! in ONE sled batch ([`Wal::append_many`]), runs ONE flush, and answers them all. The flush starts
//! after the batch was applied, so it covers every packet it answers for: "acknowledged" still
//! means "flushed" (invariant 1), at the cost of one batch and one fsync per group instead of per
//! request. Under load, groups grow by themselves: the requests that arrive during one flush form
//! the next group.
//!
//! A store or flush that fails (a full disk: see `wal`) answers its whole group with the error, so
//! none of them is acknowledged. Each flush also reports the WAL *generation* it flushed; a packet
//! stored in another generation (the WAL was reopened in between, and the unflushed batch may be
//! gone) gets [`CommitError::Reopened`] instead of an acknowledgement.
//!
//! After each flush the dispatcher is woken: the durable horizon moved, there is work.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::wal::{Appended, Prepared, Wal, WalError};

/// Why a request could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// Storing or flushing the group failed (e.g. disk full); nothing in it may be acknowledged.
    #[error("WAL store or flush failed: {message}")]
    Flush { message: String, disk_full: bool },
    /// The committer is gone (the service is stopping).
    #[error("the WAL is shutting down")]
    Closed,
    /// The WAL was reopened after a storage failure between this request's append and the flush:
    /// the append may not have survived, so it is not acknowledged (the client retries).
    #[error("the WAL was reopened after a storage failure before this packet was flushed; retry")]
    Reopened,
}

/// What the committer is asked to do.
enum Job {
    /// Store this packet, flush, answer how it was stored.
    Append(Prepared, oneshot::Sender<Result<Appended, CommitError>>),
    /// Flush, answer with the generation flushed.
    Flush(oneshot::Sender<Result<u64, CommitError>>),
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Append(p, _) => p.stored_bytes(),
            Job::Flush(_) => 0,
        }
    }
}

/// Most requests in one commit group.
const MAX_GROUP_PACKETS: usize = 1024;
/// Most bytes of records in one commit group (a group holds at least one request).
const MAX_GROUP_BYTES: usize = 16 << 20;

/// Handle to the committer task. Cheap to clone; the task ends when every handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Job>,
}

impl GroupCommit {
    /// Start the committer. With `fsync` false, nothing is flushed before acknowledging
    /// (the guarantee is broken on purpose, for measurements).
    pub fn start(
        wal: Wal,
        fsync: bool,
        durable: Arc<Notify>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(committer(wal, fsync, durable, rx));
        (Self { tx }, task)
    }

    /// Store `packet` with the next group and answer once that group's flush returned: on `Ok` the
    /// packet is durable (or was stored before, [`Appended::Duplicate`], and that copy is durable).
    pub async fn commit(&self, packet: Prepared) -> Result<Appended, CommitError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Append(packet, tx))
            .map_err(|_| CommitError::Closed)?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    /// Wait until a flush that starts after this call returned. Everything this caller appended
    /// before calling is durable only if the WAL was not reopened in between: a request that
    /// appended uses [`GroupCommit::wait_durable_in`] with the generation of its append.
    pub async fn wait_durable(&self) -> Result<(), CommitError> {
        self.wait_flushed().await.map(|_| ())
    }

    /// Wait until everything this caller appended to WAL generation `generation` (see
    /// `Wal::append_tagged`) before calling is durable.
    pub async fn wait_durable_in(&self, generation: u64) -> Result<(), CommitError> {
        if self.wait_flushed().await? == generation {
            Ok(())
        } else {
            Err(CommitError::Reopened)
        }
    }

    async fn wait_flushed(&self) -> Result<u64, CommitError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Flush(tx))
            .map_err(|_| CommitError::Closed)?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    /// Ask for a flush without waiting for it. The dispatcher calls this after removing delivered
    /// records, so that a crash soon after resurrects (and re-delivers) as few of them as possible.
    pub fn flush_soon(&self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.send(Job::Flush(tx));
    }
}

fn flush_error(e: &WalError) -> CommitError {
    CommitError::Flush {
        disk_full: e.is_disk_full(),
        message: e.to_string(),
    }
}

/// What one group's blocking step produced: how its packets were stored (with the generation
/// written to), and the flush's outcome (with the generation flushed).
type GroupOutcome = (
    Result<(Vec<Appended>, u64), WalError>,
    Result<u64, WalError>,
);

/// Store the group's packets in one batch, then flush (or, with fsync off, only mark them
/// deliverable). Blocking.
fn store_and_flush(wal: &Wal, packets: &[Prepared], fsync: bool) -> GroupOutcome {
    let stored = if packets.is_empty() {
        Ok((Vec::new(), wal.generation()))
    } else {
        wal.append_many(packets)
    };
    if let Err(e) = &stored {
        // Nothing was flushed: a flush waiter of this group must not hear "flushed" either.
        let not_flushed = WalError::Unavailable {
            cause: format!("storing the group failed, nothing was flushed: {e}"),
            disk_full: e.is_disk_full(),
        };
        return (stored, Err(not_flushed));
    }
    let flushed = if fsync {
        wal.flush_tagged()
    } else {
        wal.mark_written_as_durable();
        Ok(wal.generation())
    };
    (stored, flushed)
}

async fn committer(
    wal: Wal,
    fsync: bool,
    durable: Arc<Notify>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let mut jobs = Vec::new();
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        // A group is bounded, so that one sled batch (which holds sled's write lock while it is
        // applied) never grows with the number of open requests; the rest waits for the next.
        let mut bytes = jobs.iter().map(Job::bytes).sum::<usize>();
        while jobs.len() < MAX_GROUP_PACKETS && bytes < MAX_GROUP_BYTES {
            let Ok(more) = rx.try_recv() else { break };
            bytes += more.bytes();
            jobs.push(more);
        }
        let mut packets = Vec::new();
        let mut append_waiters = Vec::new();
        let mut flush_waiters = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Append(packet, waiter) => {
                    packets.push(packet);
                    append_waiters.push(waiter);
                }
                Job::Flush(waiter) => flush_waiters.push(waiter),
            }
        }
        let group = append_waiters.len() + flush_waiters.len();
        let worker = wal.clone();
        let (stored, flushed) =
            match tokio::task::spawn_blocking(move || store_and_flush(&worker, &packets, fsync))
                .await
            {
                Ok(outcome) => outcome,
                Err(e) => {
                    let lost = WalError::FlushTask(format!("commit task failed: {e}"));
                    (Err(WalError::FlushTask(lost.to_string())), Err(lost))
                }
            };
        // Whether the WAL was already refusing everything: the failure itself was logged once,
        // by the WAL, and is not repeated for every group.
        let failure = stored.as_ref().err().or(flushed.as_ref().err());
        match failure {
            None => durable.notify_one(),
            Some(e @ WalError::Unavailable { .. }) => {
                tracing::debug!(error = %e, waiting = group, "WAL is failed; refusing the group");
            }
            Some(e) => {
                tracing::error!(error = %e, waiting = group, "WAL store or flush failed; refusing the group");
            }
        }
        let flushed = flushed.map_err(|e| flush_error(&e));
        for waiter in flush_waiters {
            // A waiter that went away (client disconnected) needs no answer.
            let _ = waiter.send(flushed.clone());
        }
        match (stored, &flushed) {
            (Ok((appended, written)), Ok(generation)) if written == *generation => {
                for (waiter, a) in append_waiters.into_iter().zip(appended) {
                    let _ = waiter.send(Ok(a));
                }
            }
            (Ok(_), Ok(_)) => {
                for waiter in append_waiters {
                    let _ = waiter.send(Err(CommitError::Reopened));
                }
            }
            (Err(e), _) => {
                let e = flush_error(&e);
                for waiter in append_waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
            (Ok(_), Err(e)) => {
                for waiter in append_waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logdist_proto::{parse_packet, Limits};

    fn prepared(packet: &str) -> Prepared {
        let body = format!(
            r#"{{"emitter_id":"e","packet_id":"{packet}","messages":[{{"timestamp":1,"level":"INFO","message":"m"}}]}}"#
        );
        Prepared::new(
            &parse_packet(body.as_bytes(), &Limits::default()).unwrap(),
            1,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_are_all_durable_when_answered_and_a_copy_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 1000).unwrap();
            let (commit, _task) = GroupCommit::start(wal.clone(), true, Arc::new(Notify::new()));
            // 200 packets, "p7" twice, all at once: they share groups.
            let tasks: Vec<_> = (0..200)
                .map(|i| format!("p{i}"))
                .chain(std::iter::once("p7".to_string()))
                .map(|id| {
                    let commit = commit.clone();
                    tokio::spawn(async move { commit.commit(prepared(&id)).await })
                })
                .collect();
            let mut new = 0;
            for t in tasks {
                if let Appended::New { .. } = t.await.unwrap().unwrap() {
                    new += 1;
                }
            }
            assert_eq!(new, 200);
            // Everything answered is below the durable horizon, hence deliverable.
            assert_eq!(wal.read_pending(0, 1000).unwrap().len(), 200);
        }
        let (_, recovered) = Wal::open(dir.path(), 1 << 20, 1000).unwrap();
        assert_eq!(recovered.records, 200);
    }
}
