//! Sending one packet to the distributor until it is acknowledged.
//!
//! Why it exists: the distributor promises that a 2xx means durable, and nothing else. So a packet
//! is done only when a 2xx arrives; everything transient (a 503 under back-pressure, a distributor
//! killed with SIGKILL and restarted, a timeout) is retried with the *same* packet, byte for byte,
//! so the distributor's de-duplication on `(emitter_id, packet_id)` makes the retries harmless.
//!
//! The rules, by answer:
//! * `202`, or `200` with `"duplicate": true` (it had the packet already): acknowledged.
//! * `503` / `429` with `Retry-After: <seconds>`: wait that long (at most 30 s), try again.
//! * other `5xx`, `408`, `429`/`503` without `Retry-After`, a connection refused or reset, a
//!   timeout: exponential backoff (50 ms, doubling, capped at `max_backoff`), then try again; for
//!   ever, unless the caller gave a deadline.
//! * other `4xx` (and anything else that is not 2xx): permanent, [`SendError::Rejected`].
//!
//! One `reqwest::Client` is shared by every send so connections are kept alive and pooled; the
//! body is serialized once per packet and the same bytes are reused by every try.

use crate::generate::OutPacket;
use actix_web::web::Bytes; // `bytes::Bytes`, re-exported; reqwest takes it as a body without copying.
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// First wait after a failed try; it doubles on every further failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Longest error text kept from a response body.
const MAX_ERROR_TEXT: usize = 500;

/// The distributor acknowledged a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Messages the distributor says it accepted (the packet's length if the answer did not say).
    pub count: u32,
    /// The distributor already had this `(emitter_id, packet_id)`: a retry of a packet whose first
    /// acknowledgement was lost. Still acknowledged.
    pub duplicate: bool,
    /// Tries it took, the acknowledged one included (1 = no retry).
    pub attempts: u32,
}

/// Why a packet was not acknowledged. A transient failure is never an error by itself: it is
/// retried until it succeeds or the deadline passes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The distributor refused the packet for good (a 4xx other than 408/429, or an unexpected
    /// status). Not recoverable by retrying; `error` is the answer's JSON `error` text (or its body).
    #[error("distributor rejected the packet with {status}: {error}")]
    Rejected { status: u16, error: String },
    /// The caller's deadline passed before an acknowledgement; the packet may or may not have been
    /// stored (an ack may have been lost). Recoverable by sending the same packet again later.
    #[error("no acknowledgement before the deadline; last error: {last_error}")]
    DeadlineExceeded { last_error: String },
    /// The request could not be built (a malformed distributor URL). Permanent.
    #[error("cannot build the request: {0}")]
    InvalidRequest(String),
}

/// Sends packets to one distributor. Cheap to clone: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct DistributorClient {
    http: reqwest::Client,
    logs_url: String,
    request_timeout: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    retries: Arc<AtomicU64>,
}

/// What one try ended with.
enum Attempt {
    Acknowledged {
        count: Option<u32>,
        duplicate: bool,
    },
    /// Retry after exactly this long (the server said so).
    RetryAfter(Duration, String),
    /// Retry after the backoff.
    Retry(String),
    Rejected {
        status: u16,
        error: String,
    },
    Invalid(String),
}

#[derive(Deserialize)]
struct AckBody {
    count: Option<u32>,
    #[serde(default)]
    duplicate: bool,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl DistributorClient {
    /// The client the emitter's settings describe (URL, timeout, backoff cap), counting its
    /// retries into `retries`.
    pub fn from_settings(
        settings: &logdist_config::EmitterSettings,
        retries: Arc<AtomicU64>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self::new(
            &settings.distributor_url,
            Duration::from_millis(settings.request_timeout_ms),
        )?
        .with_max_backoff(Duration::from_millis(settings.max_backoff_ms))
        .with_retry_counter(retries))
    }

    /// A client for the distributor at `base_url` (e.g. `http://127.0.0.1:8081`); each try of
    /// `POST {base_url}/logs` is given at most `request_timeout`.
    pub fn new(base_url: &str, request_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(request_timeout)
            // Below actix-web's default keep-alive (5 s), so a pooled connection is rarely one
            // the server has already closed.
            .pool_idle_timeout(Duration::from_secs(4))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            logs_url: format!("{}/logs", base_url.trim_end_matches('/')),
            request_timeout,
            initial_backoff: INITIAL_BACKOFF,
            max_backoff: Duration::from_millis(2000),
            retries: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Cap of the exponential backoff (`max_backoff_ms` in the settings).
    pub fn with_max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff.max(Duration::from_millis(1));
        self
    }

    /// Count every retry in `counter` (e.g. `Ledger::retry_counter`), as it happens.
    pub fn with_retry_counter(mut self, counter: Arc<AtomicU64>) -> Self {
        self.retries = counter;
        self
    }

    /// The counter of retries over every packet sent by this client (and its clones).
    pub fn retry_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.retries)
    }

    /// The URL packets are posted to.
    pub fn logs_url(&self) -> &str {
        &self.logs_url
    }

    /// Send `packet` until the distributor acknowledges it, following the rules in the module
    /// docs. Without a deadline it only returns on an acknowledgement or a permanent refusal.
    pub async fn send_until_acknowledged(
        &self,
        packet: &OutPacket,
        deadline: Option<Instant>,
    ) -> Result<Ack, SendError> {
        let body = Bytes::from(
            serde_json::to_vec(packet).map_err(|e| SendError::InvalidRequest(e.to_string()))?,
        );
        let mut attempts: u32 = 0;
        let mut backoff = self.initial_backoff;
        let mut last_error = String::from("no try was made");
        loop {
            let timeout = match deadline {
                None => self.request_timeout,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(SendError::DeadlineExceeded { last_error });
                    }
                    left.min(self.request_timeout)
                }
            };
            attempts += 1;
            let wait = match self.try_once(body.clone(), timeout).await {
                Attempt::Acknowledged { count, duplicate } => {
                    return Ok(Ack {
                        count: count.unwrap_or(packet.messages.len() as u32),
                        duplicate,
                        attempts,
                    });
                }
                Attempt::Rejected { status, error } => {
                    return Err(SendError::Rejected { status, error })
                }
                Attempt::Invalid(reason) => return Err(SendError::InvalidRequest(reason)),
                Attempt::RetryAfter(wait, error) => {
                    last_error = error;
                    wait
                }
                Attempt::Retry(error) => {
                    last_error = error;
                    let wait = backoff;
                    backoff = (backoff * 2).min(self.max_backoff);
                    wait.min(self.max_backoff)
                }
            };
            if let Some(deadline) = deadline {
                if Instant::now() + wait >= deadline {
                    return Err(SendError::DeadlineExceeded { last_error });
                }
            }
            tracing::debug!(
                emitter_id = %packet.emitter_id,
                packet_id = %packet.packet_id,
                attempts,
                wait_ms = wait.as_millis() as u64,
                error = %last_error,
                "retrying packet"
            );
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }

    async fn try_once(&self, body: Bytes, timeout: Duration) -> Attempt {
        let sent = self
            .http
            .post(&self.logs_url)
            .header(CONTENT_TYPE, "application/json")
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_builder() => return Attempt::Invalid(crate::error_chain(&e)),
            Err(e) => return Attempt::Retry(crate::error_chain(&e)),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // The status decides; a body that fails to arrive after a 2xx does not undo the ack.
        let text = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            let parsed: Option<AckBody> = serde_json::from_slice(&text).ok();
            return Attempt::Acknowledged {
                count: parsed.as_ref().and_then(|b| b.count),
                duplicate: parsed.is_some_and(|b| b.duplicate),
            };
        }
        let error = error_text(&text);
        let described = format!("{status}: {error}");
        match status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => match retry_after {
                Some(wait) => Attempt::RetryAfter(wait, described),
                None => Attempt::Retry(described),
            },
            StatusCode::REQUEST_TIMEOUT => Attempt::Retry(described),
            s if s.is_server_error() => Attempt::Retry(described),
            s => Attempt::Rejected {
                status: s.as_u16(),
                error,
            },
        }
    }
}

/// `Retry-After` in seconds (integer or decimal), capped at [`MAX_RETRY_AFTER`]. The HTTP-date
/// form is not used by the distributor and falls back to the backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_RETRY_AFTER.as_secs_f64()),
    ))
}

/// The `error` field of a JSON error answer, or the body itself, shortened.
fn error_text(body: &[u8]) -> String {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        return parsed.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_text_prefers_the_json_error_field() {
        assert_eq!(error_text(br#"{"error":"bad packet"}"#), "bad packet");
        assert_eq!(error_text(b"plain"), "plain");
        assert_eq!(error_text(b""), "(empty body)");
        assert_eq!(error_text("é".repeat(400).as_bytes()).len(), 500);
    }
}
