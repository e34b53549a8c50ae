//! Wiring: open the WAL, start the committer, the dispatcher and the health prober, serve HTTP
//! on a listener the caller bound, and stop in order when the shutdown future resolves.
//!
//! Graceful stop (invariant 8): stop accepting and let requests in progress finish (each ends with
//! its flush), then stop the dispatcher, which waits for the batches in flight, then flush and
//! close the WAL (`Wal::close` also leaves the summary the next start checks its recovery against).
//! If the WAL's storage is failed at that moment (a full disk), the last flush fails and the process
//! exits non-zero; everything acknowledged was already flushed before its acknowledgement.
//!
//! A WAL that sled cannot open (see `wal`, "Damaged files at start") stops the start with an error
//! that names the `--recover` flag, unless [`RunOptions::recover_damaged_wal`] is set: then sled's
//! snapshot is set aside and the open retried, and if that fails too the damaged directory is moved
//! aside and the distributor starts with an empty WAL. Refusing is the
//! default because the damaged directory may hold acknowledged messages that were not delivered
//! yet; starting over it silently would break "ack means durable" without anyone noticing. A
//! damaged tail that sled recovers past is not refused: the start is logged and reported in
//! `GET /stats` (`recovery`).
//!
//! While serving, a task reopens the WAL in-process after a storage failure such as a full disk,
//! as soon as the disk takes writes again (`Wal::try_reopen`).

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use logdist_config::DistributorSettings;
use logdist_proto::Limits;
use tokio::sync::{mpsc, watch, Notify};

use crate::admin::Admin;
use crate::breaker::BreakerConfig;
use crate::commit::GroupCommit;
use crate::delivery::Backoff;
use crate::dispatch::{probe_health, DispatchConfig, Dispatcher};
use crate::http::{routes, AppState};
use crate::registry::{self, Source};
use crate::stats::Shared;
use crate::wal::{OnDamage, Wal, WalError};

/// Choices made on the command line rather than in the settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// When sled cannot open the WAL: retry without sled's snapshot files (renamed), and if that
    /// fails too, move the directory aside (to `<data_dir>.corrupt-<unix-ms>`) and start with an
    /// empty WAL, instead of refusing to start. A moved WAL's pending messages are not delivered.
    pub recover_damaged_wal: bool,
    /// Start with the config file's analyzers even if the admin API stored another set (which
    /// is then replaced at the first change).
    pub reset_analyzers: bool,
}

/// Serve until `shutdown` resolves, then stop gracefully and return.
pub async fn run(
    listener: TcpListener,
    settings: DistributorSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(listener, settings, RunOptions::default(), shutdown).await
}

/// [`run`], with command-line choices.
pub async fn run_with(
    listener: TcpListener,
    settings: DistributorSettings,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let wal = open_wal(&settings, options).await?;
    let (registry, source) = registry::load(&wal, &settings.analyzers, options.reset_analyzers)?;
    match source {
        Source::Stored => tracing::info!(
            analyzers = registry.analyzers().len(),
            "using the analyzers stored by the admin API (the config file's list is the initial \
             state only; --reset-analyzers goes back to it)"
        ),
        Source::Config => tracing::info!(
            analyzers = registry.analyzers().len(),
            reset = options.reset_analyzers,
            "using the config file's analyzers"
        ),
    }

    let shared = Arc::new(Shared::new());
    let new_records = Arc::new(Notify::new());
    let (commit, commit_task) =
        GroupCommit::start(wal.clone(), settings.wal.fsync, new_records.clone());

    let http = crate::delivery::client(settings.dispatch.max_in_flight_batches * 2)
        .context("building the HTTP client")?;
    let d = &settings.dispatch;
    let cfg = DispatchConfig {
        batch_max_messages: d.batch_max_messages,
        batch_max_bytes: d.batch_max_bytes,
        window_max_bytes: d.window_max_bytes,
        max_in_flight_batches: d.max_in_flight_batches,
        window_records: d.window_records,
        redelivery_interval: Duration::from_millis(d.redelivery_interval_ms),
        breaker: BreakerConfig {
            failure_threshold: settings.breaker.failure_threshold,
            recovery_timeout: Duration::from_millis(settings.breaker.recovery_timeout_ms),
            half_open_successes: settings.breaker.half_open_successes,
        },
        backoff: Backoff {
            initial: Duration::from_millis(d.backoff_initial_ms),
            max: Duration::from_millis(d.backoff_max_ms),
        },
    };
    let (health_tx, health_rx) = mpsc::channel(64);
    let prober = tokio::spawn(probe_health(
        http.clone(),
        shared.clone(),
        Duration::from_millis(d.health_interval_ms),
        health_tx,
    ));
    let trimmer = tokio::spawn(trim_dedup_forever(wal.clone()));
    let reopener = tokio::spawn(reopen_storage_forever(wal.clone(), new_records.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut dispatcher = Dispatcher::new(
        wal.clone(),
        commit.clone(),
        shared.clone(),
        registry.clone(),
        cfg,
        http,
    );
    dispatcher.prime();
    let (commands_tx, commands_rx) = mpsc::channel(16);
    let dispatch_task = tokio::spawn(dispatcher.run(new_records, health_rx, commands_rx, stop_rx));
    let admin = web::Data::new(Admin::new(
        wal.clone(),
        shared.clone(),
        registry,
        commands_tx,
        source,
    ));

    let state = web::Data::new(AppState {
        wal: wal.clone(),
        commit,
        shared,
        limits: Limits {
            max_messages: settings.limits.max_messages_per_packet,
            max_id_bytes: settings.limits.max_id_bytes,
            max_message_bytes: settings.limits.max_message_bytes,
            ..Limits::default()
        },
        max_body_bytes: settings.limits.max_body_bytes,
        body_timeout: std::time::Duration::from_millis(settings.limits.body_timeout_ms),
        max_pending_messages: settings.wal.max_pending_messages,
    });
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(admin.clone())
            .configure(crate::admin::routes)
            .configure(routes)
    })
    .listen(listener)?
    .disable_signals()
    .workers(2)
    .shutdown_timeout(30)
    .run();
    let handle = server.handle();
    let mut server_task = tokio::spawn(server);
    tracing::info!(%addr, "distributor listening");

    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested: no longer accepting"),
        result = &mut server_task => {
            result??;
            anyhow::bail!("the HTTP server stopped by itself");
        }
    }
    handle.stop(true).await;
    server_task.await??;
    let _ = stop_tx.send(true);
    dispatch_task.await?;
    prober.abort();
    trimmer.abort();
    reopener.abort();
    // The other handles of the committer lived in the server's app data and the dispatcher.
    let _ = tokio::time::timeout(Duration::from_secs(5), commit_task).await;
    // The last flush, plus the summary the next start checks its recovery against.
    tokio::task::spawn_blocking(move || wal.close()).await??;
    tracing::info!("WAL flushed and closed; distributor stopped");
    Ok(())
}

/// Open the WAL (sled's recovery is blocking I/O: on a blocking thread) and report what recovery
/// found; refuse a damaged WAL unless told to move it aside.
async fn open_wal(settings: &DistributorSettings, options: RunOptions) -> anyhow::Result<Wal> {
    let dir = settings.data_dir.clone();
    let (cache, retention) = (
        settings.wal.cache_capacity_mb * 1024 * 1024,
        settings.wal.dedup_retention_packets,
    );
    let on_damage = if options.recover_damaged_wal {
        OnDamage::MoveAside
    } else {
        OnDamage::Refuse
    };
    let opened =
        tokio::task::spawn_blocking(move || Wal::open_with(&dir, cache, retention, on_damage))
            .await?;
    let wal = match opened {
        Ok((wal, _)) => wal,
        Err(WalError::Damaged { dir, reason }) => {
            tracing::error!(dir = %dir.display(), %reason, "the WAL cannot be opened; refusing to start");
            anyhow::bail!(
                "the WAL in {dir} is damaged and cannot be opened: {reason}.\n\
                 It may hold acknowledged messages that were not delivered yet, so the distributor \
                 will not start over it. Keep a copy of {dir} for inspection, then start with \
                 --recover: it retries without sled's snapshot files (renamed, not deleted), and \
                 if sled still cannot open the WAL it moves the directory to \
                 {dir}.corrupt-<unix-ms> and begins with an empty WAL, whose pending messages will \
                 then NOT be delivered.",
                dir = dir.display()
            );
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the WAL in {}", settings.data_dir.display()))
        }
    };
    let report = wal.recovery_report();
    tracing::info!(
        sled_open = %report.sled_open,
        records = report.records,
        messages = report.messages,
        quarantined = report.quarantined_records,
        elapsed_ms = report.elapsed_ms,
        "WAL recovered; pending messages will be delivered"
    );
    if report.quarantined_records > 0 {
        tracing::warn!(
            quarantined = report.quarantined_records,
            total_quarantined = wal.quarantined(),
            "WAL records that could not be decoded were moved to quarantine; they are kept but not delivered"
        );
    }
    if !report.snapshots_set_aside.is_empty() && report.moved_aside.is_none() {
        tracing::warn!(
            set_aside = ?report.snapshots_set_aside,
            damage = report.damage.as_deref().unwrap_or_default(),
            "the WAL opened only without sled's snapshot; sled rebuilt its state from the log"
        );
    }
    if let Some(aside) = &report.moved_aside {
        tracing::error!(
            moved_to = %aside.display(),
            damage = report.damage.as_deref().unwrap_or_default(),
            "started with an empty WAL; the damaged one was moved aside and the messages pending in it could NOT be recovered"
        );
    }
    Ok(wal)
}

/// After a storage failure (a full disk), reopen the WAL as soon as the disk takes writes again;
/// then wake the dispatcher, which reads the reopened WAL.
async fn reopen_storage_forever(wal: Wal, dispatcher: Arc<Notify>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        if wal.storage_status().state != "failed" {
            continue;
        }
        let w = wal.clone();
        match tokio::task::spawn_blocking(move || w.try_reopen()).await {
            Ok(Ok(true)) => {
                last_error.clear();
                dispatcher.notify_one();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                // Logged when it changes, not every half second.
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "the WAL cannot be reopened yet; will retry");
                    last_error = e;
                }
            }
            Err(e) => tracing::error!(error = %e, "WAL reopen task failed; will retry"),
        }
    }
}

/// Keep the dedup index within its retention: every second, trim until caught up, off the async
/// threads (it is sled I/O). Skipped while the WAL is failed.
async fn trim_dedup_forever(wal: Wal) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !wal.is_writable() {
            continue;
        }
        let wal = wal.clone();
        let trimmed = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            loop {
                match wal.trim_dedup() {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match trimmed {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(forgotten = n, "trimmed the dedup index"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot trim the dedup index"),
            Err(e) => tracing::warn!(error = %e, "dedup trimming task failed"),
        }
    }
}
