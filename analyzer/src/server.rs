//! The analyzer's HTTP API (actix-web).
//!
//! Invariants kept here:
//!
//! * **All or nothing per request (invariant 7).** `POST /analyze` parses and validates the whole
//!   body before it touches the state: one bad message refuses the batch with a 400 that names it,
//!   and nothing of the batch is recorded. A disabled analyzer answers 503 and records nothing,
//!   checked again under the lock so that a concurrent `POST /disable` cannot let half a batch in.
//! * **Every error is JSON.** Every 4xx/5xx has the body `{"error": "<what is wrong>"}`. That is
//!   why the body is read by hand (a 413 from actix's extractors would be plain text) and unknown
//!   routes and methods get JSON answers too.
//! * **No lock across an `.await` (invariant 9).** The state is one `std::sync::Mutex`. It is taken
//!   only inside synchronous code: parsing and recording a batch run in `web::block` (a blocking
//!   thread, so a 64 MiB body does not stall the worker serving `/health`), and `/audit` copies the
//!   remembered packets out in chunks and serialises each chunk after releasing the lock.
//! * **Listed before acknowledged.** With an audit log (`audit_log` setting, `--audit-log`), a
//!   request first works out, without changing anything, which of its messages are new, appends
//!   them to the log (one `write_all`, while holding the state lock so that the file's order is the
//!   de-duplication order), and only then records them and answers 200. A failed append answers
//!   500 and records nothing. The write goes to the page cache without fsync: it survives a kill of
//!   the process, not a power loss. The lock is held across this write (on a blocking thread, never
//!   across an `.await`); see [`crate::audit_log`] for the file and its replay at start.
//! * **Faults are injected only where asked.** `POST /faults` sets a latency and an error rate for
//!   `POST /analyze` (`GET /faults` shows them, `DELETE /faults` clears them); nothing else,
//!   `/health` in particular, is affected. See [`crate::faults`] for the exact rules.
//!
//! # Routes
//!
//! | Route | Answer |
//! |---|---|
//! | `POST /analyze` | `{"processed", "duplicates"}` for the request |
//! | `GET /health` | 200 `{"status":"ok"}`, or 503 `{"status":"disabled"}` |
//! | `GET /status` | id, enabled, counts and statistics, `restored`, `faults`, `uptime_ms` |
//! | `GET /processed` | `{"processed", "duplicates"}` since start (restored messages included) |
//! | `GET /audit` | NDJSON, one `{"emitter_id","packet_id","index"}` per remembered message |
//! | `POST /enable`, `POST /disable` | switch `/analyze` on or off |
//! | `GET`, `POST`, `DELETE /faults` | `{"latency_ms", "error_rate"}`: show, set, clear |

use crate::audit_log::{self, AuditLog};
use crate::faults::{FaultInjector, Faults};
use crate::state::{AnalyzerState, AuditEntry, Statistics};
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::Context;
use futures_util::StreamExt;
use logdist_config::AnalyzerSettings;
use logdist_proto::metrics::{self, Exposition, Histogram, Kind};
use logdist_proto::{AnalyzeRequest, Limits, LogMessage};
use serde::Serialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Largest `POST /analyze` body. The distributor's batches are far smaller; the bound exists so
/// that no request can make the analyzer buffer an unbounded body.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Worker threads. The analyzer's work is cheap and the target machine has 2 cores.
const WORKERS: usize = 2;
/// How long a graceful stop waits for in-flight requests.
const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
/// Largest `POST /faults` body; the real ones are a few dozen bytes.
const MAX_FAULTS_BODY_BYTES: usize = 64 * 1024;
/// Packets copied out of the lock per `/audit` chunk: small enough that `/analyze` never waits
/// long behind an audit of a million packets.
const AUDIT_CHUNK_PACKETS: usize = 1024;

/// State shared by all workers.
struct Shared {
    id: String,
    started: Instant,
    /// Held only in synchronous code, never across an `.await` (invariant 9).
    state: Mutex<AnalyzerState>,
    /// Taken only while `state` is held, so that the file's lines are in the order in which the
    /// state learnt them. `None` without the `audit_log` setting.
    audit_log: Option<Mutex<AuditLog>>,
    /// Taken on its own, never together with another lock, and never across an `.await`.
    faults: Mutex<FaultInjector>,
    /// Duration of each `POST /analyze` that was answered 200.
    batch_latency: Histogram,
    /// `POST /analyze` requests refused (disabled, bad input, injected errors).
    refused_batches: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The state, even if a panic poisoned the lock: a panic mid-record can at worst leave one
    /// message counted in dedup but not in the statistics, which is better than a dead analyzer.
    fn lock(&self) -> MutexGuard<'_, AnalyzerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault injector, even if poisoned: it holds plain values that are always consistent.
    fn faults(&self) -> MutexGuard<'_, FaultInjector> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a request was refused. Each maps to one status code; the message is the JSON `error`.
#[derive(Debug)]
enum ApiError {
    /// The analyzer was disabled with `POST /disable`; the sender should try another one (503).
    Disabled(String),
    /// `POST /analyze` or `POST /faults` without `Content-Type: application/json` (415).
    UnsupportedMediaType(String),
    /// The body (declared or actual) exceeds the route's limit, in bytes: [`MAX_BODY_BYTES`] for
    /// `/analyze` (413).
    PayloadTooLarge(usize),
    /// The body is not a valid request; the message names the offending packet/message (400).
    BadRequest(String),
    /// No such route (404).
    NotFound(String),
    /// The route exists but not for this method (405).
    MethodNotAllowed(String),
    /// A bug, a lost blocking thread or a failed audit-log append; not the client's fault (500).
    Internal(String),
    /// `POST /faults` asked for this request to fail; nothing was recorded (500).
    InjectedFault(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Disabled(id) => write!(f, "analyzer {id} is disabled"),
            ApiError::UnsupportedMediaType(got) => {
                write!(f, "Content-Type must be application/json, got {got}")
            }
            ApiError::PayloadTooLarge(limit) => {
                write!(f, "request body is larger than {limit} bytes")
            }
            ApiError::BadRequest(why) => f.write_str(why),
            ApiError::NotFound(path) => write!(f, "no route {path}"),
            ApiError::MethodNotAllowed(what) => write!(f, "method not allowed: {what}"),
            ApiError::Internal(why) => write!(f, "internal error: {why}"),
            ApiError::InjectedFault(why) => write!(f, "injected fault: {why}"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Disabled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) | ApiError::InjectedFault(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::InjectedFault(_) = self {
            // Asked for; each one logged at error level would drown the real errors.
            tracing::debug!(error = %self, "request failed on purpose");
        } else if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request refused");
        }
        HttpResponse::build(status).json(serde_json::json!({ "error": self.to_string() }))
    }
}

/// Serve on an already-bound listener until `shutdown` resolves (then stop gracefully).
pub async fn run(
    listener: std::net::TcpListener,
    settings: AnalyzerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    let (state, audit_log) = open_state(&settings).await?;
    let shared = web::Data::new(Shared {
        id: settings.id.clone(),
        started: Instant::now(),
        state: Mutex::new(state),
        audit_log: audit_log.map(Mutex::new),
        faults: Mutex::new(FaultInjector::default()),
        batch_latency: Histogram::latency(),
        refused_batches: Default::default(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .workers(WORKERS)
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_TIMEOUT_SECS)
    .listen(listener)
    .with_context(|| format!("cannot serve on {addr}"))?
    .run();
    tracing::info!("analyzer {} listening on {addr}", settings.id);

    let registration = crate::registration::Registration::from_settings(&settings, addr)?;
    let registering = registration
        .clone()
        .map(|r| tokio::spawn(async move { r.register().await }));
    let handle = server.handle();
    let stopper = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("analyzer stopping");
        if let Some(r) = registration {
            if let Some(task) = registering {
                task.abort();
            }
            // Still serving: what the distributor has in flight to us is answered meanwhile.
            r.deregister().await;
        }
        handle.stop(true).await;
    });
    let served = server.await;
    stopper.abort();
    served.context("analyzer server failed")
}

/// The initial state: empty, or replayed from the audit log (on a blocking thread: the file may
/// be large). Fails if the log cannot be opened or is corrupt before its last line.
async fn open_state(
    settings: &AnalyzerSettings,
) -> anyhow::Result<(AnalyzerState, Option<AuditLog>)> {
    let mut state = AnalyzerState::new(settings.dedup_capacity_packets);
    let Some(path) = settings.audit_log.clone() else {
        return Ok((state, None));
    };
    let replay = tokio::task::spawn_blocking(move || {
        AuditLog::open(&path, &mut state).map(|(log, replayed)| (state, log, replayed, path))
    });
    let (state, log, replayed, path) = replay
        .await
        .context("audit log replay thread lost")?
        .context("cannot start with the audit log (`audit_log`, --audit-log)")?;
    tracing::info!(
        path = %path.display(),
        lines = replayed.lines,
        torn_tail_dropped = replayed.torn_tail_dropped,
        "audit log replayed: restored {} messages",
        replayed.messages
    );
    Ok((state, Some(log)))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/analyze", web::post().to(analyze)))
        .service(resource("/health", web::get().to(health)))
        .service(resource("/status", web::get().to(status)))
        .service(resource("/metrics", web::get().to(prometheus)))
        .service(resource("/processed", web::get().to(processed)))
        .service(resource("/audit", web::get().to(audit)))
        .service(resource("/enable", web::post().to(enable)))
        .service(resource("/disable", web::post().to(disable)))
        .service(
            web::resource("/faults")
                .route(web::get().to(get_faults))
                .route(web::post().to(set_faults))
                .route(web::delete().to(clear_faults))
                .default_service(web::to(method_not_allowed)),
        );
}

/// A route whose other methods get a JSON 405 instead of actix's empty one.
fn resource(path: &str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(web::to(method_not_allowed))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::NotFound(req.path().to_owned()).error_response()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::MethodNotAllowed(format!("{} {}", req.method(), req.path())).error_response()
}

#[derive(Serialize)]
struct Analyzed {
    /// Messages seen for the first time in this request.
    processed: u64,
    /// Messages of this request already processed before (or earlier in the same request).
    duplicates: u64,
}

async fn analyze(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let answer = analyze_inner(req, payload, &shared).await;
    match answer {
        Ok(_) => shared.batch_latency.observe(started.elapsed()),
        Err(_) => {
            shared
                .refused_batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    answer
}

async fn analyze_inner(
    req: HttpRequest,
    payload: web::Payload,
    shared: &web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    // Injected latency first, so it delays every answer; the guard is dropped before the sleep.
    let latency = shared.faults().faults().latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Cheap early refusal; checked again under the lock before anything is recorded.
    if !shared.lock().enabled {
        return Err(ApiError::Disabled(shared.id.clone()));
    }
    check_content_type(&req)?;
    let body = read_body(&req, payload, MAX_BODY_BYTES).await?;
    let worker = shared.clone();
    let (processed, duplicates) = web::block(move || analyze_body(&worker, &body))
        .await
        .map_err(|e| ApiError::Internal(format!("analysis thread lost: {e}")))??;
    Ok(HttpResponse::Ok().json(Analyzed {
        processed,
        duplicates,
    }))
}

/// The whole body, or a JSON 413 as soon as it (declared or actual) exceeds `limit` bytes.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    // Preallocate what was announced, but not more than 1 MiB: announcing is free for the client.
    let mut body = BytesMut::with_capacity(declared.map_or(8 * 1024, |n| n.min(1 << 20) as usize));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let value = req.headers().get(CONTENT_TYPE);
    let essence = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(e) if e.eq_ignore_ascii_case("application/json") => Ok(()),
        Some(e) => Err(ApiError::UnsupportedMediaType(format!("{e:?}"))),
        None if value.is_some() => {
            Err(ApiError::UnsupportedMediaType("an unreadable value".into()))
        }
        None => Err(ApiError::UnsupportedMediaType("none".into())),
    }
}

/// One packet's worth of checked messages, borrowed from the body.
struct CheckedPacket<'a> {
    emitter_id: Cow<'a, str>,
    packet_id: Cow<'a, str>,
    messages: Vec<(u32, LogMessage<'a>)>,
}

/// Parse and check the whole body, then, under the lock: work out which messages are new, list
/// them in the audit log (if any), and record them. Runs on a blocking thread. Returns
/// `(processed, duplicates)` for the request.
fn analyze_body(shared: &Shared, body: &[u8]) -> Result<(u64, u64), ApiError> {
    let checked = check_request(body)?;
    // Only a request that would be recorded counts towards the error rate (see `crate::faults`).
    let injected = {
        let mut faults = shared.faults();
        faults
            .next_request_fails()
            .then(|| faults.faults().error_rate())
    };
    if let Some(rate) = injected {
        return Err(ApiError::InjectedFault(format!(
            "POST /faults set error_rate {rate}; nothing was recorded"
        )));
    }
    let mut state = shared.lock();
    if !state.enabled {
        return Err(ApiError::Disabled(shared.id.clone()));
    }
    let plan = Plan::of(&state, &checked);
    if let Some(log) = &shared.audit_log {
        let lines = plan
            .audit_lines()
            .map_err(|e| ApiError::Internal(format!("cannot encode audit log lines: {e}")))?;
        if !lines.is_empty() {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .append(&lines)
                .map_err(ApiError::Internal)?;
        }
    }
    let mut fresh = plan.fresh.iter();
    for packet in &checked {
        for (index, msg) in &packet.messages {
            if fresh.next().copied().unwrap_or(false) {
                state.record(
                    &packet.emitter_id,
                    &packet.packet_id,
                    *index,
                    &msg.level,
                    &msg.message,
                );
            } else {
                state.count_duplicate();
            }
        }
    }
    Ok((plan.processed, plan.duplicates))
}

/// What a request will record, worked out before anything changes so that it can be written to
/// the audit log first. A message is new if the state does not remember it and it did not occur
/// earlier in the same request.
struct Plan<'a> {
    /// One flag per message of the request, in request order: `true` if it is new.
    fresh: Vec<bool>,
    /// The new indexes per packet, packets in order of their first new message (the order in
    /// which recording adds them to the de-duplication FIFO).
    packets: Vec<(&'a str, &'a str, Vec<u32>)>,
    processed: u64,
    duplicates: u64,
}

impl<'a> Plan<'a> {
    fn of(state: &AnalyzerState, checked: &'a [CheckedPacket<'a>]) -> Self {
        let mut plan = Plan {
            fresh: Vec::with_capacity(checked.iter().map(|p| p.messages.len()).sum()),
            packets: Vec::new(),
            processed: 0,
            duplicates: 0,
        };
        let mut in_request: HashSet<(&str, &str, u32)> = HashSet::new();
        let mut packet_of: HashMap<(&str, &str), usize> = HashMap::new();
        for packet in checked {
            let (emitter_id, packet_id) = (&*packet.emitter_id, &*packet.packet_id);
            for (index, _) in &packet.messages {
                let fresh = !state.is_remembered(emitter_id, packet_id, *index)
                    && in_request.insert((emitter_id, packet_id, *index));
                plan.fresh.push(fresh);
                if !fresh {
                    plan.duplicates += 1;
                    continue;
                }
                plan.processed += 1;
                let slot = *packet_of.entry((emitter_id, packet_id)).or_insert_with(|| {
                    plan.packets.push((emitter_id, packet_id, Vec::new()));
                    plan.packets.len() - 1
                });
                if let Some((_, _, indexes)) = plan.packets.get_mut(slot) {
                    indexes.push(*index);
                }
            }
        }
        plan
    }

    /// The audit log lines for the new messages, one per packet; empty if nothing is new.
    fn audit_lines(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut lines = Vec::new();
        for (emitter_id, packet_id, indexes) in &self.packets {
            audit_log::encode_line(&mut lines, emitter_id, packet_id, indexes)?;
        }
        Ok(lines)
    }
}

/// Turn the body into checked packets, or name the first thing wrong with it.
fn check_request(body: &[u8]) -> Result<Vec<CheckedPacket<'_>>, ApiError> {
    let limits = Limits::default();
    let request = AnalyzeRequest::parse(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed request: {e}")))?;
    match request {
        AnalyzeRequest::Packets(packets) => packets
            .into_iter()
            .enumerate()
            .map(|(p, packet)| {
                let name = |what: &str| {
                    format!(
                        "packet {p} (emitter_id {:?}, packet_id {:?}) {what}",
                        packet.emitter_id, packet.packet_id
                    )
                };
                check_id("emitter_id", &packet.emitter_id, &limits)
                    .and_then(|()| check_id("packet_id", &packet.packet_id, &limits))
                    .map_err(|why| ApiError::BadRequest(name(&why)))?;
                let messages = packet
                    .messages
                    .iter()
                    .enumerate()
                    .map(|(i, raw)| {
                        let index = u32::try_from(i)
                            .map_err(|_| ApiError::BadRequest(name("has too many messages")))?;
                        LogMessage::parse(raw.get(), &limits)
                            .map(|msg| (index, msg))
                            .map_err(|why| {
                                ApiError::BadRequest(name(&format!("message {i}: {why}")))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(CheckedPacket {
                    emitter_id: packet.emitter_id,
                    packet_id: packet.packet_id,
                    messages,
                })
            })
            .collect(),
        AnalyzeRequest::Messages(messages) => {
            // Check each message with exactly the rules of a packet's messages: run the same
            // parser on the raw object (it ignores the identity fields beside the message ones).
            let raws = raw_elements(body)?;
            if raws.len() != messages.len() {
                return Err(ApiError::Internal(
                    "message count changed between two parses".into(),
                ));
            }
            messages
                .into_iter()
                .zip(raws)
                .enumerate()
                .map(|(n, (m, raw))| {
                    let name = |what: &str| {
                        format!(
                            "message {n} (emitter_id {:?}, packet_id {:?}, index {}): {what}",
                            m.emitter_id, m.packet_id, m.index
                        )
                    };
                    check_id("emitter_id", &m.emitter_id, &limits)
                        .and_then(|()| check_id("packet_id", &m.packet_id, &limits))
                        .map_err(|why| ApiError::BadRequest(name(&why)))?;
                    let msg = LogMessage::parse(raw.get(), &limits)
                        .map_err(|why| ApiError::BadRequest(name(&why)))?;
                    Ok(CheckedPacket {
                        emitter_id: m.emitter_id,
                        packet_id: m.packet_id,
                        messages: vec![(m.index, msg)],
                    })
                })
                .collect()
        }
    }
}

/// The raw JSON of each identified message: the array's elements, or the body itself.
fn raw_elements(body: &[u8]) -> Result<Vec<&RawValue>, ApiError> {
    let malformed = |e: serde_json::Error| ApiError::BadRequest(format!("malformed request: {e}"));
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        serde_json::from_slice::<Vec<&RawValue>>(body).map_err(malformed)
    } else {
        serde_json::from_slice::<&RawValue>(body)
            .map(|raw| vec![raw])
            .map_err(malformed)
    }
}

/// Identifiers are bounded like the distributor's, so they cannot make the state grow without
/// bound either.
fn check_id(field: &str, value: &str, limits: &Limits) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("field `{field}` must not be empty"));
    }
    if value.len() > limits.max_id_bytes {
        return Err(format!(
            "field `{field}` is {} bytes, longer than the limit of {}",
            value.len(),
            limits.max_id_bytes
        ));
    }
    Ok(())
}

async fn health(shared: web::Data<Shared>) -> HttpResponse {
    let enabled = shared.lock().enabled;
    let (mut answer, status) = if enabled {
        (HttpResponse::Ok(), "ok")
    } else {
        (HttpResponse::ServiceUnavailable(), "disabled")
    };
    answer.json(serde_json::json!({ "status": status, "id": shared.id }))
}

#[derive(Serialize)]
struct StatusBody<'a> {
    id: &'a str,
    enabled: bool,
    #[serde(flatten)]
    statistics: Statistics,
    /// The injected faults, as `GET /faults` shows them.
    faults: Faults,
    uptime_ms: u64,
}

async fn status(shared: web::Data<Shared>) -> HttpResponse {
    let (enabled, statistics) = {
        let state = shared.lock();
        (state.enabled, state.statistics())
    };
    let faults = shared.faults().faults();
    HttpResponse::Ok().json(StatusBody {
        id: &shared.id,
        enabled,
        statistics,
        faults,
        uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// `GET /metrics`: the Prometheus text format (families listed in the README, "Metrics").
async fn prometheus(shared: web::Data<Shared>) -> HttpResponse {
    let (enabled, st) = {
        let state = shared.lock();
        (state.enabled, state.statistics())
    };
    let label = [("analyzer", shared.id.as_str())];
    let mut e = Exposition::new();
    e.family(
        "logdist_analyzer_messages_processed_total",
        Kind::Counter,
        "Distinct messages processed (restored from the audit log at start included).",
    )
    .sample(
        "logdist_analyzer_messages_processed_total",
        &label,
        st.processed as f64,
    )
    .family(
        "logdist_analyzer_duplicate_messages_total",
        Kind::Counter,
        "Messages received again after being processed once (not processed again).",
    )
    .sample(
        "logdist_analyzer_duplicate_messages_total",
        &label,
        st.duplicates as f64,
    )
    .family(
        "logdist_analyzer_error_messages_total",
        Kind::Counter,
        "Processed messages of level ERROR, FATAL or CRITICAL.",
    )
    .sample(
        "logdist_analyzer_error_messages_total",
        &label,
        st.errors as f64,
    )
    .family(
        "logdist_analyzer_messages_by_level_total",
        Kind::Counter,
        "Processed messages by level (restored ones not included).",
    );
    for (level, n) in &st.by_level {
        e.sample(
            "logdist_analyzer_messages_by_level_total",
            &[("analyzer", shared.id.as_str()), ("level", level.as_str())],
            *n as f64,
        );
    }
    e.family(
        "logdist_analyzer_batches_refused_total",
        Kind::Counter,
        "POST /analyze requests refused (disabled, bad input, injected errors).",
    )
    .sample(
        "logdist_analyzer_batches_refused_total",
        &label,
        shared
            .refused_batches
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    )
    .family(
        "logdist_analyzer_enabled",
        Kind::Gauge,
        "1 while the analyzer accepts batches, 0 after POST /disable.",
    )
    .sample(
        "logdist_analyzer_enabled",
        &label,
        f64::from(u8::from(enabled)),
    )
    .family(
        "logdist_analyzer_remembered_packets",
        Kind::Gauge,
        "Packets held in the de-duplication memory.",
    )
    .sample(
        "logdist_analyzer_remembered_packets",
        &label,
        st.remembered_packets as f64,
    )
    .family(
        "logdist_analyzer_forgotten_packets_total",
        Kind::Counter,
        "Packets dropped from the de-duplication memory at its capacity.",
    )
    .sample(
        "logdist_analyzer_forgotten_packets_total",
        &label,
        st.forgotten_packets as f64,
    )
    .family(
        "logdist_analyzer_batch_duration_seconds",
        Kind::Histogram,
        "Duration of each POST /analyze answered 200.",
    )
    .histogram(
        "logdist_analyzer_batch_duration_seconds",
        &label,
        &shared.batch_latency,
    );
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(e.finish())
}

async fn processed(shared: web::Data<Shared>) -> HttpResponse {
    let (processed, duplicates) = shared.lock().totals();
    HttpResponse::Ok().json(Analyzed {
        processed,
        duplicates,
    })
}

async fn enable(shared: web::Data<Shared>) -> HttpResponse {
    set_enabled(&shared, true)
}

async fn disable(shared: web::Data<Shared>) -> HttpResponse {
    set_enabled(&shared, false)
}

fn set_enabled(shared: &Shared, enabled: bool) -> HttpResponse {
    let was = std::mem::replace(&mut shared.lock().enabled, enabled);
    if was != enabled {
        tracing::info!(id = %shared.id, enabled, "analyzer switched");
    }
    HttpResponse::Ok().json(serde_json::json!({ "id": shared.id, "enabled": enabled }))
}

async fn get_faults(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.faults().faults())
}

/// `POST /faults`: replace the faults (a missing field means 0, so `{}` clears them).
async fn set_faults(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    check_content_type(&req)?;
    let body = read_body(&req, payload, MAX_FAULTS_BODY_BYTES).await?;
    let faults = Faults::parse(&body).map_err(ApiError::BadRequest)?;
    Ok(replace_faults(&shared, faults))
}

async fn clear_faults(shared: web::Data<Shared>) -> HttpResponse {
    replace_faults(&shared, Faults::default())
}

fn replace_faults(shared: &Shared, faults: Faults) -> HttpResponse {
    shared.faults().set(faults);
    if faults.is_none() {
        tracing::info!(id = %shared.id, "faults cleared");
    } else {
        tracing::info!(
            id = %shared.id,
            latency_ms = faults.latency_ms(),
            error_rate = faults.error_rate(),
            "faults set"
        );
    }
    HttpResponse::Ok().json(faults)
}

/// NDJSON, one `{"emitter_id","packet_id","index"}` line per remembered message. Streamed chunk by
/// chunk: each chunk is copied out under the lock (cheap: `Arc`s and bitsets) and serialised after
/// releasing it. The listing is not one atomic snapshot: packets recorded while it streams may be
/// included, and packets forgotten before their chunk is reached are skipped.
async fn audit(shared: web::Data<Shared>) -> HttpResponse {
    let lines = futures_util::stream::unfold((shared, 0u64), |(shared, cursor)| async move {
        let (entries, next) = shared.lock().audit_chunk(cursor, AUDIT_CHUNK_PACKETS);
        if entries.is_empty() {
            return None;
        }
        let chunk = audit_lines(&entries).map_err(actix_web::error::ErrorInternalServerError);
        Some((chunk, (shared, next)))
    });
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(lines)
}

fn audit_lines(entries: &[AuditEntry]) -> Result<Bytes, serde_json::Error> {
    let mut out = Vec::with_capacity(entries.len() * 64);
    for entry in entries {
        // Escape the two ids once per packet, not once per message.
        let prefix = format!(
            "{{\"emitter_id\":{},\"packet_id\":{},\"index\":",
            serde_json::to_string(&*entry.emitter_id)?,
            serde_json::to_string(&*entry.packet_id)?
        );
        for index in entry.indexes.iter() {
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(index.to_string().as_bytes());
            out.extend_from_slice(b"}\n");
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn shared_with(audit_log: AuditLog) -> Shared {
        Shared {
            id: "analyzer-t".into(),
            started: Instant::now(),
            state: Mutex::new(AnalyzerState::new(100)),
            audit_log: Some(Mutex::new(audit_log)),
            faults: Mutex::new(FaultInjector::default()),
            batch_latency: Histogram::latency(),
            refused_batches: Default::default(),
        }
    }

    fn message(emitter_id: &str, packet_id: &str, index: u32) -> serde_json::Value {
        serde_json::json!({"emitter_id": emitter_id, "packet_id": packet_id, "index": index,
            "timestamp": 1, "level": "INFO", "message": "m"})
    }

    #[test]
    fn a_request_logs_only_its_new_messages_one_line_per_packet_in_first_seen_order() {
        // Arrange: e/p/0 is already known.
        let dir = TempDir::new("plan");
        let path = dir.file("audit.ndjson");
        let mut state = AnalyzerState::new(100);
        let (log, _) = AuditLog::open(&path, &mut state).unwrap();
        let shared = shared_with(log);
        analyze_body(&shared, message("e", "p", 0).to_string().as_bytes()).unwrap();
        let body = serde_json::json!([
            message("e", "p", 0),
            message("e", "q", 0),
            message("e", "p", 1),
            message("e", "p", 1),
            message("e", "q", 3),
        ]);

        // Act
        let answer = analyze_body(&shared, body.to_string().as_bytes()).unwrap();

        // Assert
        assert_eq!(answer, (3, 2));
        assert_eq!(shared.lock().totals(), (4, 2));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            concat!(
                "{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"indexes\":[0]}\n",
                "{\"emitter_id\":\"e\",\"packet_id\":\"q\",\"indexes\":[0,3]}\n",
                "{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"indexes\":[1]}\n",
            )
        );
        let repeat = analyze_body(&shared, body.to_string().as_bytes()).unwrap();
        assert_eq!(repeat, (0, 5));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn a_failed_audit_log_append_answers_500_and_records_nothing() {
        // Arrange: a log whose file refuses writes.
        let dir = TempDir::new("append-fails");
        let path = dir.file("audit.ndjson");
        std::fs::write(&path, b"").unwrap();
        let read_only = std::fs::File::open(&path).unwrap();
        let shared = shared_with(AuditLog::from_file(read_only, path.clone()));

        // Act
        let err = analyze_body(&shared, message("e", "p", 0).to_string().as_bytes()).unwrap_err();

        // Assert
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(err.to_string().contains("audit log"), "{err}");
        let state = shared.lock();
        assert_eq!(state.totals(), (0, 0));
        assert!(!state.is_remembered("e", "p", 0));
    }
}
