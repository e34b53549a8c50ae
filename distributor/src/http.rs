//! The distributor's HTTP API.
//!
//! `POST /logs` (alias `POST /ingest`) is the only path that changes anything. It parses the body
//! into a checked [`Packet`](logdist_proto::Packet) (every refusal is a 4xx with
//! `{"error": ".."}` naming the problem), appends it to the WAL, waits for the group flush and only
//! then answers 202 (invariant 1). A bad request is refused before it touches the WAL, so it cannot
//! harm what was accepted (invariant 7).
//!
//! When the WAL's storage fails (see `wal`: a full disk makes sled refuse every write until the WAL
//! is reopened), `POST /logs` answers 507 for a full disk and 503 otherwise, both with
//! `Retry-After` and an `error` naming the cause; nothing is stored or acknowledged, and ingestion
//! resumes by itself once the WAL reopened.
//!
//! `GET /queue`, `GET /stats` and `GET /health` read counters; they never wait on the dispatcher.
//! `/stats` also reports how the WAL was recovered at start (`recovery`) and its health now
//! (`storage`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use logdist_proto::{parse_packet, Limits, PacketError};
use serde_json::json;

use crate::commit::{CommitError, GroupCommit};
use crate::stats::{now_ms, Shared, REJECT_REASONS};
use crate::wal::{Appended, Prepared, Wal, WalError};
use logdist_proto::metrics::{self, Exposition, Kind};

/// What every handler shares.
pub struct AppState {
    pub wal: Wal,
    pub commit: GroupCommit,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// How long a body may take to arrive (`limits.body_timeout_ms`).
    pub body_timeout: std::time::Duration,
    pub max_pending_messages: u64,
}

/// Every way a request can fail; each maps to a status and a JSON body `{"error": ".."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not declared as JSON (415).
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// The body is larger than `limits.max_body_bytes` (413).
    #[error("body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body could not be read (400), e.g. the client sent less than it announced.
    #[error("cannot read the body: {0}")]
    Body(String),
    /// The body did not arrive within the limit (408): a stalled or very slow client.
    #[error("the body did not arrive within {0} ms")]
    BodyTimeout(u128),
    /// The packet is malformed (400).
    #[error(transparent)]
    BadPacket(#[from] PacketError),
    /// The WAL holds more than its bound (503 + Retry-After): nothing was stored.
    #[error("the WAL holds {pending} pending messages, at its bound of {limit}; retry later")]
    Backpressure { pending: u64, limit: u64 },
    /// The disk is full (507): nothing was stored or acknowledged; retry once space is back.
    #[error("the WAL's disk is full, nothing was stored; retry once space is freed ({0})")]
    DiskFull(String),
    /// The WAL failed to store or flush (503): nothing was acknowledged; retry.
    #[error("the WAL could not store the packet: {0}")]
    Storage(String),
    /// No such route (404).
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
}

impl ApiError {
    /// The `reason` label this refusal is counted under (one of `stats::REJECT_REASONS`).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Body(_) => "unreadable_body",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::BadPacket(_) => "bad_packet",
            ApiError::Backpressure { .. } => "backpressure",
            ApiError::DiskFull(_) => "disk_full",
            ApiError::Storage(_) => "storage",
            // Not a `POST /logs` outcome; not counted by reason.
            ApiError::NotFound { .. } => "not_found",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Body(_) | ApiError::BadPacket(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Backpressure { .. } | ApiError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(
            self,
            ApiError::Backpressure { .. } | ApiError::Storage(_) | ApiError::DiskFull(_)
        ) {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        response.json(json!({ "error": self.to_string() }))
    }
}

impl From<WalError> for ApiError {
    fn from(e: WalError) -> Self {
        if e.is_disk_full() {
            ApiError::DiskFull(e.to_string())
        } else {
            ApiError::Storage(e.to_string())
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Flush {
                disk_full: true,
                message,
            } => ApiError::DiskFull(message),
            other => ApiError::Storage(other.to_string()),
        }
    }
}

/// Register every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/logs", web::post().to(accept_packet))
        .route("/ingest", web::post().to(accept_packet))
        .route("/queue", web::get().to(queue))
        .route("/stats", web::get().to(stats))
        .route("/health", web::get().to(health))
        .route("/metrics", web::get().to(prometheus))
        .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::NotFound {
        method: req.method().to_string(),
        path: req.path().to_string(),
    }
    .error_response()
}

/// The request is declared `application/json` (parameters such as `charset` allowed).
pub(crate) fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<web::BytesMut, ApiError> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Grows with what actually arrives: an announced size costs nothing until it is sent.
    let mut body = web::BytesMut::with_capacity(announced.unwrap_or(0).min(64 * 1024));
    let read = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::Body(e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout(timeout.as_millis()))??;
    Ok(body)
}

async fn accept_packet(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let started = std::time::Instant::now();
    let result = accept_packet_inner(&req, payload, &state).await;
    match &result {
        Ok(_) => state.shared.ack_latency.observe(started.elapsed()),
        Err(e) => {
            if let Some(i) = REJECT_REASONS.iter().position(|r| *r == e.reason()) {
                state.shared.rejected_by_reason[i].fetch_add(1, Relaxed);
            }
        }
    }
    result
}

async fn accept_packet_inner(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    if !is_json(req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = read_body(req, payload, state.max_body_bytes, state.body_timeout).await?;
    let packet = parse_packet(&body, &state.limits)?;
    let pending = state.wal.pending_messages();
    if pending + u64::from(packet.count) > state.max_pending_messages {
        return Err(ApiError::Backpressure {
            pending,
            limit: state.max_pending_messages,
        });
    }
    // Encoded here; stored and flushed with the other packets of its commit group. A duplicate
    // waits for the flush too: the first copy may still be on its way to disk. The body is
    // dropped before waiting: the encoded record is the only copy kept meanwhile.
    let prepared = Prepared::new(&packet, now_ms());
    let (packet_id, count) = (packet.packet_id.to_string(), packet.count);
    drop(packet);
    drop(body);
    let appended = state.commit.commit(prepared).await?;
    let (status, duplicate) = match appended {
        Appended::New { .. } => {
            state.shared.accepted_packets.fetch_add(1, Relaxed);
            state
                .shared
                .accepted_messages
                .fetch_add(u64::from(count), Relaxed);
            (StatusCode::ACCEPTED, false)
        }
        Appended::Duplicate { .. } => {
            state.shared.duplicate_packets.fetch_add(1, Relaxed);
            (StatusCode::OK, true)
        }
    };
    let mut answer = json!({
        "status": "accepted",
        "packet_id": packet_id,
        "count": count,
    });
    if duplicate {
        answer["duplicate"] = json!(true);
    }
    Ok(HttpResponse::build(status).json(answer))
}

async fn queue(state: web::Data<AppState>) -> HttpResponse {
    let s = &state.shared;
    let oldest = s.oldest_accepted_at_ms.load(Relaxed);
    let by_analyzer: serde_json::Map<String, serde_json::Value> = s
        .analyzers()
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                json!({
                    "queued": a.queued_messages.load(Relaxed),
                    "in_flight": a.in_flight_messages.load(Relaxed),
                }),
            )
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "size": state.wal.pending_messages(),
        "records": state.wal.pending_records(),
        "oldest_age_ms": if oldest == 0 { 0 } else { now_ms().saturating_sub(oldest) },
        "in_flight": s.in_flight_messages(),
        "awaiting_redelivery": s.awaiting_redelivery_messages.load(Relaxed),
        "unassigned": s.unassigned_messages.load(Relaxed),
        "by_analyzer": by_analyzer,
    }))
}

async fn stats(state: web::Data<AppState>) -> HttpResponse {
    let s = &state.shared;
    let by_analyzer: serde_json::Map<String, serde_json::Value> = s
        .analyzers()
        .iter()
        .map(|a| (a.id.clone(), json!(a.acknowledged_messages.load(Relaxed))))
        .collect();
    HttpResponse::Ok().json(json!({
        "accepted": {
            "packets": s.accepted_packets.load(Relaxed),
            "messages": s.accepted_messages.load(Relaxed),
        },
        "duplicate_packets": s.duplicate_packets.load(Relaxed),
        "rejected_requests": s.rejected_requests(),
        "acknowledged": {
            "total": s.acknowledged_messages(),
            "by_analyzer": by_analyzer,
        },
        "redelivered_messages": s.redelivered_messages.load(Relaxed),
        "wal": {
            "pending_messages": state.wal.pending_messages(),
            "pending_records": state.wal.pending_records(),
            "bytes_on_disk": state.wal.size_on_disk(),
            "quarantined_records": state.wal.quarantined(),
            "fdatasyncs": state.wal.disk_syncs(),
        },
        "storage": state.wal.storage_status(),
        "recovery": state.wal.recovery_report(),
    }))
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let analyzers = crate::admin::analyzers_json(&state.shared);
    let any_healthy = state.shared.analyzers().iter().any(|a| a.gets_traffic());
    let writable = state.wal.is_writable();
    HttpResponse::Ok().json(json!({
        "status": if any_healthy && writable { "ok" } else { "degraded" },
        "analyzers": analyzers,
        "pending": state.wal.pending_messages(),
        "storage": state.wal.storage_status().state,
    }))
}

/// `GET /metrics`: the Prometheus text format. Every family is documented in the README
/// ("Metrics").
async fn prometheus(state: web::Data<AppState>) -> HttpResponse {
    let s = &state.shared;
    let mut e = Exposition::new();
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed) as f64;
    e.single(
        "logdist_distributor_packets_accepted_total",
        Kind::Counter,
        "Packets stored in the WAL and acknowledged (duplicates not included).",
        count(&s.accepted_packets),
    )
    .single(
        "logdist_distributor_messages_accepted_total",
        Kind::Counter,
        "Messages stored in the WAL and acknowledged (duplicates not included).",
        count(&s.accepted_messages),
    )
    .single(
        "logdist_distributor_duplicate_packets_total",
        Kind::Counter,
        "Packets answered as duplicates of a packet accepted before (not stored again).",
        count(&s.duplicate_packets),
    )
    .family(
        "logdist_distributor_requests_rejected_total",
        Kind::Counter,
        "POST /logs requests refused, by reason.",
    );
    for (reason, n) in REJECT_REASONS.iter().zip(&s.rejected_by_reason) {
        e.sample(
            "logdist_distributor_requests_rejected_total",
            &[("reason", reason)],
            count(n),
        );
    }
    e.single(
        "logdist_distributor_messages_redelivered_total",
        Kind::Counter,
        "Messages the redelivery worker handed to another analyzer after failed sends.",
        count(&s.redelivered_messages),
    );
    type Per = fn(&crate::stats::AnalyzerView) -> f64;
    let views = s.analyzers();
    let per_analyzer: [(&str, Kind, &str, Per); 10] = [
        (
            "logdist_distributor_messages_acknowledged_total",
            Kind::Counter,
            "Messages an analyzer answered 2xx for (and that left the WAL).",
            |a| a.acknowledged_messages.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_send_retries_total",
            Kind::Counter,
            "Batch sends repeated after a failed attempt.",
            |a| a.send_retries.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_batches_failed_total",
            Kind::Counter,
            "Batches that failed after all their retries (their messages wait for redelivery).",
            |a| a.failed_batches.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_batches_refused_total",
            Kind::Counter,
            "Batches an analyzer refused for their content (4xx).",
            |a| a.rejected_batches.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_messages_in_flight",
            Kind::Gauge,
            "Messages in batches being sent to the analyzer now.",
            |a| a.in_flight_messages.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_messages_queued",
            Kind::Gauge,
            "Messages assigned to the analyzer and waiting for a free send slot.",
            |a| a.queued_messages.load(Relaxed) as f64,
        ),
        (
            "logdist_distributor_analyzer_up",
            Kind::Gauge,
            "1 while the analyzer's circuit breaker lets traffic through (closed or half-open), 0 while it is open.",
            |a| f64::from(u8::from(a.healthy())),
        ),
        (
            "logdist_distributor_analyzer_enabled",
            Kind::Gauge,
            "1 unless switched off with POST /admin/analyzers/{id}/disable.",
            |a| f64::from(u8::from(a.spec().enabled)),
        ),
        (
            "logdist_distributor_analyzer_consecutive_failures",
            Kind::Gauge,
            "Failed batches and health probes in a row (resets on a success).",
            |a| f64::from(a.consecutive_failures.load(Relaxed)),
        ),
        (
            "logdist_distributor_analyzer_weight",
            Kind::Gauge,
            "Relative weight now (config file, or as changed by the admin API).",
            |a| a.weight(),
        ),
    ];
    for (name, kind, help, value) in per_analyzer {
        e.family(name, kind, help);
        for a in views.iter() {
            e.sample(name, &[("analyzer", &a.id)], value(a));
        }
    }
    e.family(
        "logdist_distributor_breaker_state",
        Kind::Gauge,
        "Circuit breaker state per analyzer: 1 for the state it is in, 0 for the others.",
    );
    for a in views.iter() {
        let now = a.breaker_state();
        for state in crate::breaker::STATE_NAMES {
            e.sample(
                "logdist_distributor_breaker_state",
                &[("analyzer", &a.id), ("state", state)],
                f64::from(u8::from(state == now)),
            );
        }
    }
    let oldest = s.oldest_accepted_at_ms.load(Relaxed);
    let age = if oldest == 0 {
        0.0
    } else {
        now_ms().saturating_sub(oldest) as f64 / 1000.0
    };
    let syncs = state.wal.disk_syncs();
    e.single(
        "logdist_distributor_wal_pending_messages",
        Kind::Gauge,
        "Messages in the WAL not yet acknowledged by an analyzer.",
        state.wal.pending_messages() as f64,
    )
    .single(
        "logdist_distributor_wal_pending_records",
        Kind::Gauge,
        "Packets (WAL records) not yet acknowledged by an analyzer.",
        state.wal.pending_records() as f64,
    )
    .single(
        "logdist_distributor_oldest_pending_age_seconds",
        Kind::Gauge,
        "Age of the oldest pending message in the dispatch window (0 when none).",
        age,
    )
    .single(
        "logdist_distributor_messages_awaiting_redelivery",
        Kind::Gauge,
        "Messages whose sends failed, waiting for the redelivery worker.",
        count(&s.awaiting_redelivery_messages),
    )
    .single(
        "logdist_distributor_wal_size_bytes",
        Kind::Gauge,
        "Size of the WAL's files on disk.",
        state.wal.size_on_disk() as f64,
    )
    .single(
        "logdist_distributor_wal_writable",
        Kind::Gauge,
        "1 while the WAL accepts writes, 0 while it is failed (e.g. disk full) or reopening.",
        f64::from(u8::from(state.wal.is_writable())),
    )
    .family(
        "logdist_distributor_wal_fdatasyncs_total",
        Kind::Counter,
        "fdatasync calls the WAL made after sled's flush, by file kind.",
    )
    .sample(
        "logdist_distributor_wal_fdatasyncs_total",
        &[("file", "log")],
        syncs.log as f64,
    )
    .sample(
        "logdist_distributor_wal_fdatasyncs_total",
        &[("file", "blob")],
        syncs.blobs as f64,
    )
    .family(
        "logdist_distributor_ack_latency_seconds",
        Kind::Histogram,
        "From a POST /logs request's start to its acknowledgement (after the WAL flush).",
    )
    .histogram(
        "logdist_distributor_ack_latency_seconds",
        &[],
        &s.ack_latency,
    )
    .family(
        "logdist_distributor_send_latency_seconds",
        Kind::Histogram,
        "Duration of each batch send attempt to an analyzer, answered or not.",
    );
    for a in views.iter() {
        e.histogram(
            "logdist_distributor_send_latency_seconds",
            &[("analyzer", &a.id)],
            &a.send_latency,
        );
    }
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(e.finish())
}
