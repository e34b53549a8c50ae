//! Group commit: many concurrent requests share one WAL flush.
//!
//! A request appends its packet, then asks [`GroupCommit::wait_durable`]. The committer task takes
//! every request waiting at that moment, runs ONE flush on a blocking thread, and answers them all.
//! A request's append happened before it queued, and the committer drains the queue before it
//! flushes, so the flush covers every request it answers: "acknowledged" still means "flushed"
//! (invariant 1), at the cost of one fsync per group instead of one per request.
//!
//! A flush that fails (a full disk: see `wal`) answers its whole group with the error, so none of
//! them is acknowledged. Each flush also reports the WAL *generation* it flushed; a request that
//! appended to an earlier generation (the WAL was reopened in between, and its unflushed append
//! may be gone) gets [`CommitError::Reopened`] instead of an acknowledgement.
//!
//! After each flush the dispatcher is woken: the durable horizon moved, there is work.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::wal::{Wal, WalError};

/// Why a request could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The flush failed (e.g. disk full); nothing in its group may be acknowledged.
    #[error("WAL flush failed: {message}")]
    Flush { message: String, disk_full: bool },
    /// The committer is gone (the service is stopping).
    #[error("the WAL is shutting down")]
    Closed,
    /// The WAL was reopened after a storage failure between this request's append and the flush:
    /// the append may not have survived, so it is not acknowledged (the client retries).
    #[error("the WAL was reopened after a storage failure before this packet was flushed; retry")]
    Reopened,
}

/// Answered with the generation the flush covered.
type Waiter = oneshot::Sender<Result<u64, CommitError>>;

/// Handle to the committer task. Cheap to clone; the task ends when every handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
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
        self.tx.send(tx).map_err(|_| CommitError::Closed)?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    /// Ask for a flush without waiting for it. The dispatcher calls this after removing delivered
    /// records, so that a crash soon after resurrects (and re-delivers) as few of them as possible.
    pub fn flush_soon(&self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.send(tx);
    }
}

async fn committer(
    wal: Wal,
    fsync: bool,
    durable: Arc<Notify>,
    mut rx: mpsc::UnboundedReceiver<Waiter>,
) {
    let mut group = Vec::new();
    while let Some(first) = rx.recv().await {
        group.push(first);
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        // Whether the WAL was already refusing everything: the failure itself was logged once,
        // by the WAL, and is not repeated for every group.
        let mut already_failed = false;
        let result = if fsync {
            let wal = wal.clone();
            match tokio::task::spawn_blocking(move || wal.flush_tagged()).await {
                Ok(Ok(generation)) => Ok(generation),
                Ok(Err(e)) => {
                    already_failed = matches!(e, WalError::Unavailable { .. });
                    Err(CommitError::Flush {
                        disk_full: e.is_disk_full(),
                        message: e.to_string(),
                    })
                }
                Err(e) => Err(CommitError::Flush {
                    message: format!("flush task failed: {e}"),
                    disk_full: false,
                }),
            }
        } else {
            wal.mark_written_as_durable();
            Ok(wal.generation())
        };
        match &result {
            Ok(_) => durable.notify_one(),
            Err(e) if already_failed => {
                tracing::debug!(error = %e, waiting = group.len(), "WAL is failed; refusing the group");
            }
            Err(e) => {
                tracing::error!(error = %e, waiting = group.len(), "WAL flush failed; refusing the group");
            }
        }
        for waiter in group.drain(..) {
            // A waiter that went away (client disconnected) needs no answer.
            let _ = waiter.send(result.clone());
        }
    }
}
