//! Self-registration with a distributor (`register_url`): at start the analyzer registers itself
//! with `PUT {register_url}/admin/analyzers/{id}`, retrying every second until the distributor
//! answers (it may start later); on a graceful stop it deregisters with `DELETE`, which returns
//! once the distributor has drained what it had sent here, and only then stops serving, so the
//! batches still in flight to it are answered. A distributor that is gone by then is logged, not
//! waited for.

use std::time::Duration;

use logdist_config::AnalyzerSettings;
use serde_json::json;

/// How long a graceful stop waits for the distributor's drain.
const DEREGISTER_WAIT: Duration = Duration::from_secs(20);
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// What to register, from the settings and the address actually bound.
#[derive(Debug, Clone)]
pub struct Registration {
    url: String,
    body: serde_json::Value,
    http: reqwest::Client,
}

impl Registration {
    /// `None` when `register_url` is not set.
    pub fn from_settings(
        settings: &AnalyzerSettings,
        bound: std::net::SocketAddr,
    ) -> anyhow::Result<Option<Self>> {
        let Some(base) = &settings.register_url else {
            return Ok(None);
        };
        let endpoint = settings
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        let mut body = json!({ "endpoint": endpoint });
        if let Some(w) = settings.register_weight {
            body["weight"] = json!(w);
        }
        let url = format!(
            "{}/admin/analyzers/{}",
            base.trim_end_matches('/'),
            settings.id
        );
        let http = reqwest::Client::builder()
            .timeout(DEREGISTER_WAIT + Duration::from_secs(5))
            .build()?;
        Ok(Some(Self { url, body, http }))
    }

    /// Register, retrying every second until the distributor accepts. A 4xx other than 404/409
    /// (a refusal of what we sent, e.g. a bad endpoint) is logged and not retried.
    pub async fn register(&self) {
        loop {
            match self.http.put(&self.url).json(&self.body).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(url = %self.url, endpoint = %self.body["endpoint"], "registered with the distributor");
                    return;
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status().as_u16();
                    let error = r.text().await.unwrap_or_default();
                    tracing::error!(url = %self.url, status, %error, "the distributor refused the registration; not retrying");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(url = %self.url, status = r.status().as_u16(), "registration not accepted yet; retrying")
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "distributor not reachable for registration; retrying")
                }
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Deregister and wait for the distributor's drain (bounded).
    pub async fn deregister(&self) {
        let url = format!("{}?wait_ms={}", self.url, DEREGISTER_WAIT.as_millis());
        // The admin API asks every change to be declared JSON, even without a body.
        let request = self
            .http
            .delete(&url)
            .header("content-type", "application/json");
        match request.send().await {
            Ok(r) if r.status().as_u16() == 200 => {
                tracing::info!(url = %self.url, "deregistered; the distributor drained what it had sent here")
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let answer = r.text().await.unwrap_or_default();
                tracing::warn!(url = %self.url, status, %answer, "deregistration did not complete; the distributor keeps what it had not delivered and sends it elsewhere")
            }
            Err(e) => tracing::warn!(url = %self.url, error = %e, "cannot deregister"),
        }
    }
}
