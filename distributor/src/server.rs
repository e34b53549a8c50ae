//! Wiring: open the WAL, start the committer, the dispatcher and the health prober, serve HTTP
//! on a listener the caller bound, and stop in order when the shutdown future resolves.
//!
//! Graceful stop (invariant 8): stop accepting and let requests in progress finish (each ends with
//! its flush), then stop the dispatcher, which waits for the batches in flight, then flush the WAL.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use logdist_config::DistributorSettings;
use logdist_proto::Limits;
use tokio::sync::{mpsc, watch, Notify};

use crate::commit::GroupCommit;
use crate::delivery::{Backoff, Endpoint};
use crate::dispatch::{probe_health, DispatchConfig, Dispatcher};
use crate::http::{routes, AppState};
use crate::stats::Shared;
use crate::wal::Wal;

/// Serve until `shutdown` resolves, then stop gracefully and return.
pub async fn run(
    listener: TcpListener,
    settings: DistributorSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = settings.data_dir.clone();
    let (cache, retention) = (
        settings.wal.cache_capacity_mb * 1024 * 1024,
        settings.wal.dedup_retention_packets,
    );
    let (wal, recovered) = tokio::task::spawn_blocking(move || Wal::open(&dir, cache, retention))
        .await?
        .with_context(|| format!("opening the WAL in {}", settings.data_dir.display()))?;
    tracing::info!(
        records = recovered.records,
        messages = recovered.messages,
        quarantined = recovered.quarantined,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "WAL recovered; pending messages will be delivered"
    );

    let shared = Arc::new(Shared::new(&settings.analyzers));
    let new_records = Arc::new(Notify::new());
    let (commit, commit_task) =
        GroupCommit::start(wal.clone(), settings.wal.fsync, new_records.clone());

    let http = crate::delivery::client(settings.dispatch.max_in_flight_batches * 2)
        .context("building the HTTP client")?;
    let endpoints: Vec<Arc<Endpoint>> = settings
        .analyzers
        .iter()
        .map(|a| {
            Arc::new(Endpoint::new(
                &a.endpoint,
                Duration::from_millis(a.timeout_ms),
                a.retry_count,
            ))
        })
        .collect();
    let d = &settings.dispatch;
    let cfg = DispatchConfig {
        batch_max_messages: d.batch_max_messages,
        batch_max_bytes: d.batch_max_bytes,
        window_max_bytes: d.window_max_bytes,
        max_in_flight_batches: d.max_in_flight_batches,
        window_records: d.window_records,
        redelivery_interval: Duration::from_millis(d.redelivery_interval_ms),
        unhealthy_after_failures: d.unhealthy_after_failures,
        backoff: Backoff {
            initial: Duration::from_millis(d.backoff_initial_ms),
            max: Duration::from_millis(d.backoff_max_ms),
        },
    };
    let (health_tx, health_rx) = mpsc::channel(64);
    let prober = tokio::spawn(probe_health(
        http.clone(),
        endpoints.clone(),
        Duration::from_millis(d.health_interval_ms),
        health_tx,
    ));
    let trimmer = tokio::spawn(trim_dedup_forever(wal.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let dispatcher = Dispatcher::new(
        wal.clone(),
        commit.clone(),
        shared.clone(),
        endpoints,
        cfg,
        http,
    );
    let dispatch_task = tokio::spawn(dispatcher.run(new_records, health_rx, stop_rx));

    let state = web::Data::new(AppState {
        wal: wal.clone(),
        commit,
        shared,
        limits: Limits {
            max_messages: settings.limits.max_messages_per_packet,
            max_id_bytes: settings.limits.max_id_bytes,
            ..Limits::default()
        },
        max_body_bytes: settings.limits.max_body_bytes,
        max_pending_messages: settings.wal.max_pending_messages,
    });
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(routes))
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
    // The other handles of the committer lived in the server's app data and the dispatcher.
    let _ = tokio::time::timeout(Duration::from_secs(5), commit_task).await;
    tokio::task::spawn_blocking(move || wal.flush()).await??;
    tracing::info!("WAL flushed; distributor stopped");
    Ok(())
}

/// Keep the dedup index within its retention: every second, trim until caught up, off the async
/// threads (it is sled I/O).
async fn trim_dedup_forever(wal: Wal) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
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
