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

use crate::state::{AnalyzerState, AuditEntry, Sighting, Statistics};
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::Context;
use futures_util::StreamExt;
use logdist_config::AnalyzerSettings;
use logdist_proto::{AnalyzeRequest, Limits, LogMessage};
use serde::Serialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
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
/// Packets copied out of the lock per `/audit` chunk: small enough that `/analyze` never waits
/// long behind an audit of a million packets.
const AUDIT_CHUNK_PACKETS: usize = 1024;

/// State shared by all workers.
struct Shared {
    id: String,
    started: Instant,
    /// Held only in synchronous code, never across an `.await` (invariant 9).
    state: Mutex<AnalyzerState>,
}

impl Shared {
    /// The state, even if a panic poisoned the lock: a panic mid-record can at worst leave one
    /// message counted in dedup but not in the statistics, which is better than a dead analyzer.
    fn lock(&self) -> MutexGuard<'_, AnalyzerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a request was refused. Each maps to one status code; the message is the JSON `error`.
#[derive(Debug)]
enum ApiError {
    /// The analyzer was disabled with `POST /disable`; the sender should try another one (503).
    Disabled(String),
    /// `POST /analyze` without `Content-Type: application/json` (415).
    UnsupportedMediaType(String),
    /// The body (declared or actual) exceeds [`MAX_BODY_BYTES`] (413).
    PayloadTooLarge,
    /// The body is not a valid request; the message names the offending packet/message (400).
    BadRequest(String),
    /// No such route (404).
    NotFound(String),
    /// The route exists but not for this method (405).
    MethodNotAllowed(String),
    /// A bug or a lost blocking thread; not the client's fault (500).
    Internal(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Disabled(id) => write!(f, "analyzer {id} is disabled"),
            ApiError::UnsupportedMediaType(got) => {
                write!(f, "Content-Type must be application/json, got {got}")
            }
            ApiError::PayloadTooLarge => {
                write!(f, "request body is larger than {MAX_BODY_BYTES} bytes")
            }
            ApiError::BadRequest(why) => f.write_str(why),
            ApiError::NotFound(path) => write!(f, "no route {path}"),
            ApiError::MethodNotAllowed(what) => write!(f, "method not allowed: {what}"),
            ApiError::Internal(why) => write!(f, "internal error: {why}"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Disabled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
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
    let shared = web::Data::new(Shared {
        id: settings.id.clone(),
        started: Instant::now(),
        state: Mutex::new(AnalyzerState::new(settings.dedup_capacity_packets)),
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

    let handle = server.handle();
    let stopper = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("analyzer stopping");
        handle.stop(true).await;
    });
    let served = server.await;
    stopper.abort();
    served.context("analyzer server failed")
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/analyze", web::post().to(analyze)))
        .service(resource("/health", web::get().to(health)))
        .service(resource("/status", web::get().to(status)))
        .service(resource("/processed", web::get().to(processed)))
        .service(resource("/audit", web::get().to(audit)))
        .service(resource("/enable", web::post().to(enable)))
        .service(resource("/disable", web::post().to(disable)));
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
    mut payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    // Cheap early refusal; checked again under the lock before anything is recorded.
    if !shared.lock().enabled {
        return Err(ApiError::Disabled(shared.id.clone()));
    }
    check_content_type(&req)?;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    // Preallocate what was announced, but not more than 1 MiB: announcing is free for the client.
    let mut body = BytesMut::with_capacity(declared.map_or(8 * 1024, |n| n.min(1 << 20) as usize));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let worker = shared.clone();
    let (processed, duplicates) = web::block(move || analyze_body(&worker, &body))
        .await
        .map_err(|e| ApiError::Internal(format!("analysis thread lost: {e}")))??;
    Ok(HttpResponse::Ok().json(Analyzed {
        processed,
        duplicates,
    }))
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

/// Parse and check the whole body, then record it under the lock. Runs on a blocking thread.
fn analyze_body(shared: &Shared, body: &[u8]) -> Result<(u64, u64), ApiError> {
    let checked = check_request(body)?;
    let mut state = shared.lock();
    if !state.enabled {
        return Err(ApiError::Disabled(shared.id.clone()));
    }
    let (mut processed, mut duplicates) = (0, 0);
    for packet in &checked {
        for (index, msg) in &packet.messages {
            match state.record(
                &packet.emitter_id,
                &packet.packet_id,
                *index,
                &msg.level,
                &msg.message,
            ) {
                Sighting::New => processed += 1,
                Sighting::Duplicate => duplicates += 1,
            }
        }
    }
    Ok((processed, duplicates))
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
    uptime_ms: u64,
}

async fn status(shared: web::Data<Shared>) -> HttpResponse {
    let (enabled, statistics) = {
        let state = shared.lock();
        (state.enabled, state.statistics())
    };
    HttpResponse::Ok().json(StatusBody {
        id: &shared.id,
        enabled,
        statistics,
        uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
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
