//! The emitter's HTTP API: generate load on demand or continuously, and expose what was
//! acknowledged so delivery can be verified.
//!
//! | endpoint              | does                                                                  |
//! |-----------------------|-----------------------------------------------------------------------|
//! | `GET /health`         | `{"status":"ok"}`                                                     |
//! | `GET /stats`          | ledger counters, `running`, `rate_messages_per_sec`, `distributor_url` |
//! | `POST /generate`      | `{"batches":N}` (1..=10000, default 1): N × `emitters` packets, answers once all are acknowledged (502 if some failed) |
//! | `POST /start`         | `{"rate":msgs_per_sec}`: continuous open-loop generation              |
//! | `POST /stop`          | stops it; in-flight packets still finish                              |
//! | `GET /acknowledged`   | NDJSON, one `{"emitter_id","packet_id","count"}` per acknowledged packet |
//!
//! Design:
//! * [`run`] takes a bound listener and a shutdown future (mini-redis style), so tests spawn the
//!   real server on port 0.
//! * Sending happens on the runtime that called [`run`], not on actix's worker thread: the worker
//!   only parses requests and waits. That keeps sends multi-threaded and lets them outlive a
//!   client that hung up on `POST /generate`.
//! * Shutdown is a `watch` flag every send task selects on: when the shutdown future resolves,
//!   continuous generation stops, unacknowledged sends are abandoned (they were never in the
//!   acknowledged log, so nothing verified is lost), and actix stops gracefully.
//! * Continuous generation is open loop (a tick computes how many packets are due since the
//!   start) with at most [`CONTINUOUS_MAX_IN_FLIGHT`] sends at once; at the bound it waits for a
//!   slot instead of piling up tasks, and a backlog of more than a second's worth is skipped rather
//!   than burst out later.

use crate::client::DistributorClient;
use crate::generate::{emitter_id, Generator, OutPacket};
use crate::ledger::{Ledger, LedgerSnapshot};
use crate::sender::{send_all, send_recorded};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpResponse, HttpServer, ResponseError};
use logdist_config::EmitterSettings;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// Packets of one `POST /generate` in flight at once.
pub const GENERATE_CONCURRENCY: usize = 8;
/// How long one packet of `POST /generate` is retried before it counts as failed.
pub const GENERATE_DEADLINE: Duration = Duration::from_secs(120);
/// Most batches one `POST /generate` may ask for.
pub const MAX_BATCHES: u32 = 10_000;
/// Sends of continuous generation in flight at once.
pub const CONTINUOUS_MAX_IN_FLIGHT: usize = 64;
/// Acknowledged-log lines copied per lock while streaming `GET /acknowledged`.
const ACKNOWLEDGED_CHUNK: usize = 4096;

/// Why a request failed. Each maps to a status and a `{"error": ..}` body.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// The request body or a parameter is unacceptable (400); the text names it.
    #[error("{0}")]
    BadRequest(String),
    /// The emitter is stopping and takes no new work (503).
    #[error("the emitter is shutting down")]
    ShuttingDown,
    /// A send task died unexpectedly (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: self.to_string(),
        })
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// What sending needs, shared by request handlers and background tasks.
struct Workload {
    client: DistributorClient,
    ledger: Arc<Ledger>,
    /// A std mutex: held only while one packet is built, never across an `.await`.
    generator: Mutex<Generator>,
    emitters: u32,
    messages_per_packet: u32,
}

impl Workload {
    /// The next packet of emitter `index` (0-based, so `emitter-{index+1}`).
    fn packet_for(&self, index: u32) -> OutPacket {
        let id = emitter_id(index % self.emitters.max(1) + 1);
        self.generator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_packet(&id, self.messages_per_packet)
    }
}

struct Continuous {
    rate: u32,
    /// `Some` while generation runs; sending `true` stops it.
    stop: Option<watch::Sender<bool>>,
    /// The generating loop; it ends soon after `stop`, handing its in-flight sends off.
    generating: Option<tokio::task::JoinHandle<()>>,
}

struct AppState {
    workload: Arc<Workload>,
    distributor_url: String,
    continuous: Mutex<Continuous>,
    /// The runtime that called [`run`]; every send runs there.
    runtime: tokio::runtime::Handle,
    shutdown: watch::Sender<bool>,
    shutting_down: AtomicBool,
}

impl AppState {
    fn continuous(&self) -> MutexGuard<'_, Continuous> {
        self.continuous
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves once shutdown has begun.
    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            // An error means the sender is gone, which only happens at shutdown too.
            let _ = rx.wait_for(|stopping| *stopping).await;
        }
    }

    fn running(&self) -> RunningAnswer {
        let c = self.continuous();
        RunningAnswer {
            running: c.stop.is_some(),
            rate_messages_per_sec: c.rate,
        }
    }

    /// Stop continuous generation; the returned loop ends soon (await it to know that no packet
    /// will be handed out any more).
    fn stop_continuous(&self) -> (RunningAnswer, Option<tokio::task::JoinHandle<()>>) {
        let mut c = self.continuous();
        if let Some(stop) = c.stop.take() {
            let _ = stop.send(true);
            tracing::info!("continuous generation stopped");
        }
        let answer = RunningAnswer {
            running: false,
            rate_messages_per_sec: c.rate,
        };
        (answer, c.generating.take())
    }
}

/// Serve the emitter API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: std::net::TcpListener,
    settings: EmitterSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;

    let ledger = Arc::new(Ledger::new(settings.acknowledged_log_capacity));
    let client = DistributorClient::from_settings(&settings, ledger.retry_counter())
        .context("building the HTTP client")?;
    let generator = Generator::for_this_run();
    tracing::info!(
        run_id = generator.run_id(),
        distributor_url = %settings.distributor_url,
        "emitter starting"
    );
    let (shutdown_tx, _) = watch::channel(false);
    let state = web::Data::new(AppState {
        workload: Arc::new(Workload {
            client,
            ledger,
            generator: Mutex::new(generator),
            emitters: settings.emitters.max(1),
            messages_per_packet: settings.messages_per_packet.max(1),
        }),
        distributor_url: settings.distributor_url.clone(),
        continuous: Mutex::new(Continuous {
            rate: settings.rate_messages_per_sec,
            stop: None,
            generating: None,
        }),
        runtime: tokio::runtime::Handle::current(),
        shutdown: shutdown_tx,
        shutting_down: AtomicBool::new(false),
    });

    let app_state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .route("/health", web::get().to(health))
            .route("/stats", web::get().to(stats))
            .route("/metrics", web::get().to(prometheus))
            .route("/generate", web::post().to(generate))
            .route("/start", web::post().to(start))
            .route("/stop", web::post().to(stop))
            .route("/acknowledged", web::get().to(acknowledged))
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)
    .context("listening")?
    .run();

    let handle = server.handle();
    let stopping = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        begin_shutdown(&stopping);
        handle.stop(true).await;
    });

    let served = server.await;
    // Whatever ended the server, background sends must not outlive it.
    begin_shutdown(&state);
    served.context("running the HTTP server")
}

fn begin_shutdown(state: &AppState) {
    state.shutting_down.store(true, Ordering::SeqCst);
    let _ = state.stop_continuous();
    let _ = state.shutdown.send(true);
}

/// Parse an optional JSON body: empty means `T::default()`.
fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(ErrorBody {
        error: "no such endpoint".into(),
    })
}

#[derive(Serialize)]
struct StatsAnswer<'a> {
    #[serde(flatten)]
    ledger: LedgerSnapshot,
    running: bool,
    rate_messages_per_sec: u32,
    distributor_url: &'a str,
}

async fn stats(state: web::Data<AppState>) -> HttpResponse {
    let running = state.running();
    HttpResponse::Ok().json(StatsAnswer {
        ledger: state.workload.ledger.snapshot(),
        running: running.running,
        rate_messages_per_sec: running.rate_messages_per_sec,
        distributor_url: &state.distributor_url,
    })
}

/// `GET /metrics`: the Prometheus text format (families listed in the README, "Metrics").
async fn prometheus(state: web::Data<AppState>) -> HttpResponse {
    use logdist_proto::metrics::{Exposition, Kind, CONTENT_TYPE};
    let l = state.workload.ledger.snapshot();
    let running = state.running();
    let mut e = Exposition::new();
    for (name, kind, help, value) in [
        (
            "logdist_emitter_packets_sent_total",
            Kind::Counter,
            "Packets whose first try started.",
            l.packets_sent,
        ),
        (
            "logdist_emitter_messages_sent_total",
            Kind::Counter,
            "Messages in packets whose first try started.",
            l.messages_sent,
        ),
        (
            "logdist_emitter_packets_acknowledged_total",
            Kind::Counter,
            "Packets the distributor answered 2xx for (duplicates included).",
            l.packets_acknowledged,
        ),
        (
            "logdist_emitter_messages_acknowledged_total",
            Kind::Counter,
            "Messages in packets the distributor answered 2xx for.",
            l.messages_acknowledged,
        ),
        (
            "logdist_emitter_duplicate_acks_total",
            Kind::Counter,
            "Acknowledgements saying the distributor already had the packet.",
            l.duplicate_acks,
        ),
        (
            "logdist_emitter_retries_total",
            Kind::Counter,
            "Tries beyond the first, over all packets.",
            l.retries,
        ),
        (
            "logdist_emitter_packets_failed_total",
            Kind::Counter,
            "Packets refused with a permanent 4xx.",
            l.permanent_failures,
        ),
        (
            "logdist_emitter_packets_expired_total",
            Kind::Counter,
            "Packets given up on because their deadline passed.",
            l.deadline_failures,
        ),
    ] {
        e.single(name, kind, help, value as f64);
    }
    e.single(
        "logdist_emitter_running",
        Kind::Gauge,
        "1 while continuous generation (POST /start) runs.",
        f64::from(u8::from(running.running)),
    );
    HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(e.finish())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    batches: Option<u32>,
}

async fn generate(state: web::Data<AppState>, body: Bytes) -> Result<HttpResponse, ApiError> {
    let request: GenerateRequest = optional_json(&body)?;
    let batches = request.batches.unwrap_or(1);
    if !(1..=MAX_BATCHES).contains(&batches) {
        return Err(ApiError::BadRequest(format!(
            "`batches` must be between 1 and {MAX_BATCHES}, got {batches}"
        )));
    }
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    let workload = Arc::clone(&state.workload);
    let total = u64::from(batches) * u64::from(workload.emitters);
    let shutdown = state.shutdown_signal();
    let job = async move {
        let w = &workload;
        // Emitter `i % emitters`: every batch is one packet from each emitter.
        let packets = (0..total).map(|i| w.packet_for((i % u64::from(w.emitters)) as u32));
        let sending = send_all(
            &w.client,
            &w.ledger,
            packets,
            GENERATE_CONCURRENCY,
            Some(GENERATE_DEADLINE),
        );
        tokio::select! {
            summary = sending => Some(summary),
            () = shutdown => None,
        }
    };
    let summary = state
        .runtime
        .spawn(job)
        .await
        .map_err(|e| ApiError::Internal(format!("the send task failed: {e}")))?
        .ok_or(ApiError::ShuttingDown)?;
    let status = if summary.failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    Ok(HttpResponse::build(status).json(summary))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    rate: Option<u32>,
}

#[derive(Debug, Serialize)]
struct RunningAnswer {
    running: bool,
    rate_messages_per_sec: u32,
}

async fn start(state: web::Data<AppState>, body: Bytes) -> Result<HttpResponse, ApiError> {
    let request: StartRequest = optional_json(&body)?;
    let mut continuous = state.continuous();
    let rate = request.rate.unwrap_or(continuous.rate);
    if rate == 0 {
        return Err(ApiError::BadRequest("`rate` must be > 0".into()));
    }
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    if continuous.stop.is_some() && continuous.rate == rate {
        return Ok(HttpResponse::Ok().json(RunningAnswer {
            running: true,
            rate_messages_per_sec: rate,
        }));
    }
    // Running at another rate: replace the generator task (its in-flight sends still finish).
    if let Some(old) = continuous.stop.take() {
        let _ = old.send(true);
    }
    continuous.generating = None;
    let (stop_tx, stop_rx) = watch::channel(false);
    continuous.generating = Some(state.runtime.spawn(generate_continuously(
        Arc::clone(&state.workload),
        rate,
        stop_rx,
        state.shutdown.subscribe(),
    )));
    continuous.rate = rate;
    continuous.stop = Some(stop_tx);
    tracing::info!(
        rate_messages_per_sec = rate,
        "continuous generation started"
    );
    Ok(HttpResponse::Ok().json(RunningAnswer {
        running: true,
        rate_messages_per_sec: rate,
    }))
}

/// Answers once no further packet will be handed out, so `/stats` read afterwards only changes
/// by the in-flight packets finishing.
async fn stop(state: web::Data<AppState>) -> HttpResponse {
    let (answer, generating) = state.stop_continuous();
    if let Some(generating) = generating {
        let _ = generating.await;
    }
    HttpResponse::Ok().json(answer)
}

/// Open-loop generation at `rate` messages per second until `stop` turns true. Each send runs in
/// its own task and ends when acknowledged or at shutdown; stopping leaves them running.
async fn generate_continuously(
    workload: Arc<Workload>,
    rate: u32,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let packets_per_sec = f64::from(rate) / f64::from(workload.messages_per_packet);
    let period = Duration::from_secs_f64((1.0 / packets_per_sec).clamp(0.005, 0.1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // At most a second's worth of packets is sent late; an older backlog is dropped.
    let max_backlog = packets_per_sec.ceil().max(1.0) as u64;
    let in_flight = Arc::new(Semaphore::new(CONTINUOUS_MAX_IN_FLIGHT));
    let mut sends = JoinSet::new();
    let started = Instant::now();
    let mut issued: u64 = 0;
    let mut next_emitter: u32 = 0;
    'generating: loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = ticker.tick() => {}
        }
        // The first packet goes at once, then one every 1/packets_per_sec seconds.
        let due = (started.elapsed().as_secs_f64() * packets_per_sec) as u64 + 1;
        if due > issued + max_backlog {
            tracing::debug!(
                skipped = due - issued - max_backlog,
                "falling behind the rate"
            );
            issued = due - max_backlog;
        }
        while issued < due {
            let permit = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'generating,
                permit = Arc::clone(&in_flight).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break 'generating,
                },
            };
            let packet = workload.packet_for(next_emitter);
            next_emitter = (next_emitter + 1) % workload.emitters.max(1);
            issued += 1;
            workload.ledger.record_sent(packet.messages.len() as u32);
            let w = Arc::clone(&workload);
            let mut shutdown = shutdown.clone();
            sends.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = send_recorded(&w.client, &w.ledger, &packet, None) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
            });
        }
        while sends.try_join_next().is_some() {}
    }
    // Stopped: packets already handed out still go until acknowledged (or shutdown).
    sends.detach_all();
}

async fn acknowledged(state: web::Data<AppState>) -> HttpResponse {
    let ledger = Arc::clone(&state.workload.ledger);
    // A consistent end: packets acknowledged after this request began are not listed.
    let end = ledger.acknowledged_end();
    let forgotten = ledger.snapshot().acknowledged_log_forgotten;
    let chunks = futures_util::stream::unfold(0u64, move |from| {
        let ledger = Arc::clone(&ledger);
        async move {
            if from >= end {
                return None;
            }
            let mut out = Vec::new();
            let next = ledger.write_acknowledged_ndjson(from, end, ACKNOWLEDGED_CHUNK, &mut out);
            if next <= from {
                return None;
            }
            Some((Ok::<_, actix_web::Error>(Bytes::from(out)), next))
        }
    });
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("x-acknowledged-forgotten", forgotten.to_string()))
        .streaming(chunks)
}
