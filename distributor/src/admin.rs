//! The admin API: read and change the analyzer set at runtime, and the dashboard that drives it.
//!
//! | request | does |
//! |---|---|
//! | `GET /admin/analyzers` | every analyzer: settings, breaker, share, counters |
//! | `GET /admin/analyzers/{id}` | one of them |
//! | `POST /admin/analyzers` | register a new one (409 if the id exists) |
//! | `PUT /admin/analyzers/{id}` | register or update (fields left out keep their value) |
//! | `DELETE /admin/analyzers/{id}` | drain, then remove (waits up to `?wait_ms=`, default 30 s) |
//! | `PUT /admin/weights` | `{"analyzer-1": 0.6, ...}`: set the weights named |
//! | `POST /admin/analyzers/{id}/disable`, `/enable` | switch one off and on, distributor-side |
//! | `GET /dashboard` | the dashboard (its script from `/dashboard/app.js`; nothing from elsewhere) |
//!
//! Every change must be sent with `Content-Type: application/json`, even one without a body (415
//! otherwise): a page on another site cannot make a browser send that without asking first.
//!
//! A change is checked (`registry`: unknown id 404, duplicate id 409, bad fields, negative weights
//! or no positive weight left 400, each with `{"error": ".."}` saying why), stored in the WAL's sled
//! database and flushed, then applied by the dispatcher, and only then answered: a 2xx means the
//! change is in effect and survives a restart. Changes are serialised by one lock, held across the
//! store and the dispatcher's answer; neither accepting packets nor dispatching ever takes it.
//!
//! The API has no authentication of its own: expose the distributor's port only where its
//! operators are (README, "Admin API").

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::dispatch::Command;
use crate::registry::{self, AnalyzerPatch, Registry, RegistryError, Source, WeightMap};
use crate::stats::{now_ms, AnalyzerView, Shared};
use crate::wal::Wal;

/// Largest admin request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long `DELETE` waits for the drain by default.
const DEFAULT_DRAIN_WAIT: Duration = Duration::from_secs(30);

/// What the admin handlers share.
pub struct Admin {
    wal: Wal,
    shared: Arc<Shared>,
    /// The registry as last applied; its lock serialises changes.
    registry: Mutex<Registry>,
    commands: mpsc::Sender<Command>,
    /// Where the registry in use at start came from.
    source: Source,
}

impl Admin {
    pub fn new(
        wal: Wal,
        shared: Arc<Shared>,
        registry: Registry,
        commands: mpsc::Sender<Command>,
        source: Source,
    ) -> Self {
        Self {
            wal,
            shared,
            registry: Mutex::new(registry),
            commands,
            source,
        }
    }

    /// Check a change on a copy, store it, have the dispatcher apply it, then keep it. Runs in
    /// a task of its own: a request dropped half-way (client gone, server stopping) cannot leave
    /// the stored set, the dispatcher's and `registry` apart.
    async fn change<T: Send + 'static>(
        admin: &web::Data<Admin>,
        f: impl FnOnce(&mut Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut current = admin.registry.lock().await;
            let mut next = current.clone();
            let out = f(&mut next)?;
            if next == *current {
                return Ok(out);
            }
            let (wal, stored) = (admin.wal.clone(), next.clone());
            tokio::task::spawn_blocking(move || registry::store(&wal, &stored))
                .await
                .map_err(|e| AdminError::Storage(e.to_string()))?
                .map_err(|e| AdminError::Storage(e.to_string()))?;
            // Stored: from here on it is the registry, whatever the dispatcher says.
            *current = next.clone();
            let (done, applied) = oneshot::channel();
            admin
                .commands
                .send(Command::Apply {
                    registry: next,
                    done,
                })
                .await
                .map_err(|_| AdminError::Stopping)?;
            applied.await.map_err(|_| AdminError::Stopping)?;
            Ok(out)
        })
        .await
        .map_err(|e| AdminError::Storage(format!("the change task failed: {e}")))?
    }

    fn view_json(&self, id: &str) -> Option<Value> {
        let views = self.shared.analyzers();
        let usable = usable_weight(&views);
        views
            .iter()
            .find(|v| v.id == id)
            .map(|v| analyzer_json(v, usable))
    }
}

/// Why an admin request failed; each maps to a status and `{"error": ".."}`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the body is not valid JSON for this request: {0}")]
    BadJson(String),
    #[error("the body is larger than the limit of {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the body: {0}")]
    Body(String),
    #[error("the change could not be stored, so nothing changed: {0}")]
    Storage(String),
    #[error("the distributor is stopping; the change was stored and applies at the next start")]
    Stopping,
    #[error("`wait_ms` must be a number of milliseconds up to 600000")]
    BadWait,
    /// Asked of every change, with or without a body: a cross-site form or `fetch` cannot set it
    /// without the browser asking first, which this server never allows.
    #[error("Content-Type must be application/json for a change (even one without a body)")]
    NotJson,
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        match self {
            AdminError::Registry(RegistryError::UnknownId(_)) => StatusCode::NOT_FOUND,
            AdminError::Registry(RegistryError::DuplicateId(_) | RegistryError::TooMany) => {
                StatusCode::CONFLICT
            }
            AdminError::Registry(_)
            | AdminError::BadJson(_)
            | AdminError::Body(_)
            | AdminError::BadWait => StatusCode::BAD_REQUEST,
            AdminError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::Storage(_) | AdminError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(json!({ "error": self.to_string() }))
    }
}

/// Register the admin routes and the dashboard.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/analyzers", web::get().to(list))
        .route("/admin/analyzers", web::post().to(create))
        .route("/admin/analyzers/{id}", web::get().to(get_one))
        .route("/admin/analyzers/{id}", web::put().to(upsert))
        .route("/admin/analyzers/{id}", web::delete().to(remove))
        .route("/admin/analyzers/{id}/enable", web::post().to(enable))
        .route("/admin/analyzers/{id}/disable", web::post().to(disable))
        .route("/admin/weights", web::get().to(get_weights))
        .route("/admin/weights", web::put().to(set_weights))
        .route("/dashboard", web::get().to(dashboard))
        .route("/dashboard/app.js", web::get().to(dashboard_js));
}

/// Sum of the weights of the analyzers that get traffic now.
fn usable_weight(views: &[Arc<AnalyzerView>]) -> f64 {
    views
        .iter()
        .filter(|v| v.gets_traffic())
        .map(|v| v.weight())
        .sum()
}

/// One analyzer as `/admin/analyzers` and `/health` show it.
pub fn analyzer_json(v: &AnalyzerView, usable_weight: f64) -> Value {
    let spec = v.spec();
    let half_open_at = v.half_open_at_ms.load(Relaxed);
    let next_probe_in_ms = (half_open_at > 0).then(|| half_open_at.saturating_sub(now_ms()));
    json!({
        "id": spec.id,
        "endpoint": spec.endpoint,
        "weight": spec.weight,
        "timeout_ms": spec.timeout_ms,
        "retry_count": spec.retry_count,
        "enabled": spec.enabled,
        "draining": v.draining.load(Relaxed),
        "healthy": v.healthy(),
        "share": if v.gets_traffic() && usable_weight > 0.0 { spec.weight / usable_weight } else { 0.0 },
        "consecutive_failures": v.consecutive_failures.load(Relaxed),
        "breaker": {
            "state": v.breaker_state(),
            "consecutive_failures": v.consecutive_failures.load(Relaxed),
            "next_probe_in_ms": next_probe_in_ms,
        },
        "acknowledged": v.acknowledged_messages.load(Relaxed),
        "queued": v.queued_messages.load(Relaxed),
        "in_flight": v.in_flight_messages.load(Relaxed),
    })
}

/// Every registered analyzer (then those draining), as [`analyzer_json`].
pub fn analyzers_json(shared: &Shared) -> Vec<Value> {
    let views = shared.analyzers();
    let usable = usable_weight(&views);
    views.iter().map(|v| analyzer_json(v, usable)).collect()
}

/// Refuse a change not declared as JSON (see [`AdminError::NotJson`]).
fn require_json(req: &HttpRequest) -> Result<(), AdminError> {
    if crate::http::is_json(req) {
        Ok(())
    } else {
        Err(AdminError::NotJson)
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    mut payload: web::Payload,
) -> Result<T, AdminError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| AdminError::Body(e.to_string()))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(AdminError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| AdminError::BadJson(e.to_string()))
}

async fn list(admin: web::Data<Admin>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "source": admin.source,
        "analyzers": analyzers_json(&admin.shared),
    }))
}

async fn get_one(
    admin: web::Data<Admin>,
    id: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    admin
        .view_json(&id)
        .map(|v| HttpResponse::Ok().json(v))
        .ok_or_else(|| RegistryError::UnknownId(id.into_inner()).into())
}

async fn create(
    req: HttpRequest,
    admin: web::Data<Admin>,
    payload: web::Payload,
) -> Result<HttpResponse, AdminError> {
    require_json(&req)?;
    let patch: AnalyzerPatch = read_json(payload).await?;
    let id = patch.id.clone().unwrap_or_default();
    Admin::change(&admin, |r| r.create(patch)).await?;
    tracing::info!(analyzer = %id, "admin: analyzer registered");
    Ok(HttpResponse::Created().json(admin.view_json(&id)))
}

async fn upsert(
    req: HttpRequest,
    admin: web::Data<Admin>,
    id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, AdminError> {
    require_json(&req)?;
    let patch: AnalyzerPatch = read_json(payload).await?;
    let key = id.clone();
    let created = Admin::change(&admin, move |r| r.upsert(&key, patch)).await?;
    tracing::info!(analyzer = %id, created, "admin: analyzer registered or updated");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(admin.view_json(&id)))
}

#[derive(Deserialize)]
struct RemoveQuery {
    wait_ms: Option<String>,
}

async fn remove(
    req: HttpRequest,
    admin: web::Data<Admin>,
    id: web::Path<String>,
    query: web::Query<RemoveQuery>,
) -> Result<HttpResponse, AdminError> {
    require_json(&req)?;
    let wait = match &query.wait_ms {
        None => DEFAULT_DRAIN_WAIT,
        Some(ms) => match ms.parse::<u64>() {
            Ok(ms) if ms <= 600_000 => Duration::from_millis(ms),
            _ => return Err(AdminError::BadWait),
        },
    };
    let mut changes = admin.shared.watch_analyzers();
    let key = id.clone();
    Admin::change(&admin, move |r| r.remove(&key).map(|_| ())).await?;
    tracing::info!(analyzer = %id, "admin: analyzer removed; draining");
    let drained = tokio::time::timeout(wait, async {
        loop {
            if !changes.borrow_and_update().iter().any(|v| v.id == *id) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok();
    Ok(if drained {
        HttpResponse::Ok().json(json!({ "removed": *id, "status": "removed" }))
    } else {
        HttpResponse::Accepted().json(json!({
            "removed": *id,
            "status": "draining",
            "detail": "removed from the registry; batches still in flight to it finish (or fail over) before it leaves GET /admin/analyzers",
        }))
    })
}

async fn set_enabled(
    req: HttpRequest,
    admin: web::Data<Admin>,
    id: web::Path<String>,
    enabled: bool,
) -> Result<HttpResponse, AdminError> {
    require_json(&req)?;
    let key = id.clone();
    Admin::change(&admin, move |r| r.set_enabled(&key, enabled)).await?;
    tracing::info!(analyzer = %id, enabled, "admin: analyzer switched");
    Ok(HttpResponse::Ok().json(admin.view_json(&id)))
}

async fn enable(
    req: HttpRequest,
    admin: web::Data<Admin>,
    id: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    set_enabled(req, admin, id, true).await
}

async fn disable(
    req: HttpRequest,
    admin: web::Data<Admin>,
    id: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    set_enabled(req, admin, id, false).await
}

fn weights_json(registry: &Registry) -> Value {
    let weights: serde_json::Map<String, Value> = registry
        .analyzers()
        .iter()
        .map(|a| (a.id.clone(), json!(a.weight)))
        .collect();
    Value::Object(weights)
}

async fn get_weights(admin: web::Data<Admin>) -> HttpResponse {
    let registry = admin.registry.lock().await.clone();
    HttpResponse::Ok().json(weights_json(&registry))
}

async fn set_weights(
    req: HttpRequest,
    admin: web::Data<Admin>,
    payload: web::Payload,
) -> Result<HttpResponse, AdminError> {
    require_json(&req)?;
    let weights: WeightMap = read_json(payload).await?;
    // The weights as this change left them (not re-read later: another change may follow).
    let now = Admin::change(&admin, move |r| {
        r.set_weights(&weights)?;
        Ok(weights_json(r))
    })
    .await?;
    tracing::info!(weights = %now, "admin: weights changed");
    Ok(HttpResponse::Ok().json(now))
}

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/app.js");
/// Everything the page uses comes from this server; nothing is fetched from elsewhere.
const DASHBOARD_CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:";

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(DASHBOARD_HTML)
}

async fn dashboard_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(DASHBOARD_JS)
}
