//! Talking to analyzers: one batch send with timeout, retries and exponential backoff, and the
//! active health probe.
//!
//! A send succeeds only on a 2xx: that answer is what allows the dispatcher to remove the batch's
//! records from the WAL (invariant 2). Anything else — a refused connection, a timeout, a 503 from
//! a disabled analyzer, a 4xx — is a failure, retried `retry_count` times with backoff and then
//! reported, so the records go to the redelivery worker instead of being dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use actix_web::web::Bytes;
use backon::{ExponentialBuilder, Retryable};

use crate::stats::AnalyzerView;

/// How one analyzer is reached.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `{endpoint}/analyze`.
    pub analyze_url: String,
    /// `{endpoint}/health`.
    pub health_url: String,
    pub timeout: Duration,
    pub retry_count: u32,
}

impl Endpoint {
    pub fn new(base: &str, timeout: Duration, retry_count: u32) -> Self {
        let base = base.trim_end_matches('/');
        Self {
            analyze_url: format!("{base}/analyze"),
            health_url: format!("{base}/health"),
            timeout,
            retry_count,
        }
    }
}

/// The HTTP client for analyzers. Redirects are never followed: a redirected POST becomes a GET
/// without the batch, and its 2xx would wrongly count as delivery.
pub fn client(idle_per_host: usize) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(idle_per_host)
        .build()
}

/// Backoff between retries of one batch.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// Why a batch was not acknowledged, after all its retries.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// The analyzer answered 5xx (503 while disabled), 408 or 429: it may accept later.
    #[error("analyzer answered {status}")]
    Status { status: u16 },
    /// The analyzer refused the batch's content (another 4xx, or a redirect, which is never
    /// followed): not retried, and not held against the analyzer's health.
    #[error("analyzer refused the batch with {status}: {error}")]
    Rejected { status: u16, error: String },
    /// No answer: connection refused or reset, or the timeout elapsed.
    #[error("analyzer unreachable: {0}")]
    Transport(String),
}

/// POST one batch, retrying `retry_count` times with exponential backoff.
pub async fn send_batch(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    body: Bytes,
    backoff: Backoff,
    view: &AnalyzerView,
) -> Result<(), SendFailure> {
    let attempt = || async {
        let started = std::time::Instant::now();
        let result = attempt_once(http, endpoint, body.clone()).await;
        view.send_latency.observe(started.elapsed());
        result
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(backoff.initial)
                .with_max_delay(backoff.max)
                .with_max_times(endpoint.retry_count as usize),
        )
        .when(|err| !matches!(err, SendFailure::Rejected { .. }))
        .notify(|err, after| {
            view.send_retries.fetch_add(1, Relaxed);
            tracing::debug!(url = %endpoint.analyze_url, %err, ?after, "send failed; retrying");
        })
        .await
}

/// One POST of a batch, no retry.
async fn attempt_once(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    body: Bytes,
) -> Result<(), SendFailure> {
    {
        let response = http
            .post(&endpoint.analyze_url)
            .header("content-type", "application/json")
            .timeout(endpoint.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| SendFailure::Transport(error_chain(&e)))?;
        let status = response.status();
        // Read the (small) answer: it drains the connection for reuse and explains a refusal.
        let answer = response.bytes().await.unwrap_or_default();
        let code = status.as_u16();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || code == 408 || code == 429 {
            Err(SendFailure::Status { status: code })
        } else {
            let error = String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
            Err(SendFailure::Rejected {
                status: code,
                error,
            })
        }
    }
}

/// `GET /health`: true on a 2xx within the timeout.
pub async fn probe(http: &reqwest::Client, endpoint: &Endpoint) -> bool {
    match http
        .get(&endpoint.health_url)
        .timeout(endpoint.timeout)
        .send()
        .await
    {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
