//! Typed settings for every logdist service, layered with figment:
//! built-in defaults → a TOML file → environment variables → command-line flags (last wins).
//!
//! Environment variables carry the service's prefix and use `__` for nesting:
//! `DISTRIBUTOR_PORT=9000`, `DISTRIBUTOR_WAL__FSYNC=false`, `ANALYZER_ID=analyzer-2`,
//! `EMITTER_DISTRIBUTOR_URL=http://127.0.0.1:8081`.
//!
//! Unknown keys are refused, so a typo in a file or a variable fails the start with the key's name
//! instead of being silently ignored. [`Validate`] then checks what types cannot (weights, ids,
//! endpoints), also naming the key.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Why settings were refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value has the wrong type, a key is unknown, or the file cannot be read or parsed.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value is well typed but not acceptable; the string names the key.
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Checks that go beyond types. Every error names the key it is about.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Load settings: `T::default()`, then `file` (if given; a missing file is an error), then
/// environment variables starting with `env_prefix`, then `flags` (only the fields it sets).
pub fn load<T, F>(file: Option<&Path>, env_prefix: &str, flags: &F) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
    F: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::Invalid(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let settings: T = figment
        .merge(Env::prefixed(env_prefix).split("__"))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))?;
    settings.validate()?;
    Ok(settings)
}

/// Log to stderr, the same way in every service: `RUST_LOG` filters (default `info`) and
/// `LOG_FORMAT=json` writes one JSON object per line (timestamp, level, target, message and every
/// structured field, e.g. `analyzer`, `from`, `to` on a breaker transition) for log shippers;
/// anything else, or nothing, writes human-readable lines. stdout stays free for the one line a
/// service prints for whoever started it (`listening on ...`) and for CLI results.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Longest `emitter_id` / `packet_id` any service accepts, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Largest packet body (and analyzer batch) the distributor may be configured to take.
pub const MAX_PACKET_BYTES: usize = 32 * 1024 * 1024;

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

/// One analyzer as the distributor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzerEntry {
    /// Unique name, e.g. `analyzer-1`; it is what `/queue`, `/stats` and `/health` report.
    pub id: String,
    /// Relative weight (need not sum to 1 across analyzers); 0 takes the analyzer out of rotation.
    pub weight: f64,
    /// Base URL, e.g. `http://127.0.0.1:8082`; the distributor posts to `{endpoint}/analyze`.
    pub endpoint: String,
    /// Timeout of one send, connect included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a failed send, with exponential backoff, before the batch is handed to the
    /// redelivery worker.
    #[serde(default = "default_retry_count")]
    pub retry_count: u32,
}

/// `timeout_ms` of an analyzer entry that does not set it.
pub fn default_timeout_ms() -> u64 {
    2000
}
/// `retry_count` of an analyzer entry that does not set it.
pub fn default_retry_count() -> u32 {
    2
}

/// The write-ahead log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSettings {
    /// Above this many pending messages `POST /logs` answers 503 with `Retry-After`.
    pub max_pending_messages: u64,
    /// sled's page cache, in MiB. Bounds the distributor's memory whatever the backlog.
    pub cache_capacity_mb: u64,
    /// fsync before acknowledging. `false` BREAKS the durability guarantee (a crash may lose
    /// acknowledged packets); it exists only to measure what durability costs.
    pub fsync: bool,
    /// Delivered packets whose `(emitter_id, packet_id)` is still remembered, so that an emitter's
    /// late retry is answered "duplicate" instead of being stored again. Bounds the dedup index,
    /// and with it the WAL's disk use: sled cannot reuse a log segment that still holds a live
    /// dedup key, so at full speed 100,000 levels off near 1.2 GB on disk, where 1,000,000 grew
    /// 3.7 GB a minute (README, "Disk use").
    pub dedup_retention_packets: u64,
}

impl Default for WalSettings {
    fn default() -> Self {
        Self {
            max_pending_messages: 10_000_000,
            cache_capacity_mb: 64,
            fsync: true,
            dedup_retention_packets: 100_000,
        }
    }
}

/// Limits on what `POST /logs` accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most messages in one packet (400 beyond).
    pub max_messages_per_packet: usize,
    /// Longest `emitter_id` or `packet_id`, in bytes.
    pub max_id_bytes: usize,
    /// Longest single message (its JSON object), in bytes; at most 1 MiB, the analyzers' limit.
    pub max_message_bytes: usize,
    /// How long a request body may take to arrive in full (408 beyond): a client that announces a
    /// body and stalls (slow-loris) holds a connection at most this long.
    pub body_timeout_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_messages_per_packet: 1000,
            max_id_bytes: 128,
            max_message_bytes: logdist_proto::MAX_MESSAGE_BYTES,
            body_timeout_ms: 30_000,
        }
    }
}

/// How pending messages move to analyzers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Most messages in one `POST /analyze`.
    pub batch_max_messages: usize,
    /// Most bytes in one `POST /analyze` (a batch always carries at least one packet). Keep it
    /// well below the analyzers' body limit (64 MiB).
    pub batch_max_bytes: usize,
    /// Most batches in flight to one analyzer at once.
    pub max_in_flight_batches: usize,
    /// Most WAL records (packets) held in memory by the dispatcher; the rest wait on disk.
    pub window_records: usize,
    /// Most bytes of records held in memory by the dispatcher (at least one record is always
    /// admitted).
    pub window_max_bytes: usize,
    /// Period of the redelivery worker.
    pub redelivery_interval_ms: u64,
    /// Period of the active `GET /health` probe of every analyzer.
    pub health_interval_ms: u64,
    /// First retry delay; it doubles on every retry up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            batch_max_messages: 1000,
            batch_max_bytes: 8 * 1024 * 1024,
            max_in_flight_batches: 4,
            window_records: 1024,
            window_max_bytes: 64 * 1024 * 1024,
            redelivery_interval_ms: 2000,
            health_interval_ms: 1000,
            backoff_initial_ms: 50,
            backoff_max_ms: 1000,
        }
    }
}

/// The circuit breaker kept per analyzer (see the distributor's `breaker` module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failed batches (each after its retries) that open the breaker: the analyzer
    /// then gets no traffic. A failed health probe opens it at once.
    pub failure_threshold: u32,
    /// How long an open breaker stays open before it lets trial traffic through (half-open).
    pub recovery_timeout_ms: u64,
    /// Successes (batches acknowledged or health probes answered) needed in half-open to close
    /// the breaker again; one failure there opens it for another `recovery_timeout_ms`.
    pub half_open_successes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            recovery_timeout_ms: 2000,
            half_open_successes: 2,
        }
    }
}

/// Everything the distributor needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributorSettings {
    pub host: String,
    pub port: u16,
    /// Directory of the sled WAL. Created if missing; reused on restart.
    pub data_dir: PathBuf,
    pub wal: WalSettings,
    pub limits: LimitSettings,
    pub dispatch: DispatchSettings,
    pub breaker: BreakerSettings,
    /// The initial analyzers. Once the admin API changed the set (it is then stored in the WAL's
    /// directory), the stored set is used at start instead; `--reset-analyzers` goes back to this.
    pub analyzers: Vec<AnalyzerEntry>,
}

impl Default for DistributorSettings {
    fn default() -> Self {
        let analyzer = |n: u16, weight: f64| AnalyzerEntry {
            id: format!("analyzer-{n}"),
            weight,
            endpoint: format!("http://127.0.0.1:{}", 8081 + n),
            timeout_ms: default_timeout_ms(),
            retry_count: default_retry_count(),
        };
        Self {
            host: "127.0.0.1".into(),
            port: 8081,
            data_dir: PathBuf::from("data/distributor"),
            wal: WalSettings::default(),
            limits: LimitSettings::default(),
            dispatch: DispatchSettings::default(),
            breaker: BreakerSettings::default(),
            analyzers: vec![analyzer(1, 0.5), analyzer(2, 0.3), analyzer(3, 0.2)],
        }
    }
}

impl Validate for DistributorSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.analyzers.is_empty() {
            return invalid("`analyzers` must list at least one analyzer");
        }
        if self.analyzers.len() > MAX_ANALYZERS {
            return invalid(format!(
                "`analyzers` lists more than {MAX_ANALYZERS} analyzers"
            ));
        }
        let mut ids = HashSet::new();
        for (i, a) in self.analyzers.iter().enumerate() {
            check_analyzer(a)
                .or_else(|(field, e)| invalid(format!("`analyzers[{i}].{field}` {e}")))?;
            if !ids.insert(a.id.as_str()) {
                return invalid(format!("`analyzers[{i}].id`: duplicate id {:?}", a.id));
            }
        }
        if !self.analyzers.iter().any(|a| a.weight > 0.0) {
            return invalid("`analyzers`: no analyzer has a positive weight");
        }
        let d = &self.dispatch;
        for (key, value) in [
            ("dispatch.batch_max_messages", d.batch_max_messages as u64),
            ("dispatch.batch_max_bytes", d.batch_max_bytes as u64),
            ("dispatch.window_max_bytes", d.window_max_bytes as u64),
            (
                "dispatch.max_in_flight_batches",
                d.max_in_flight_batches as u64,
            ),
            ("dispatch.window_records", d.window_records as u64),
            ("dispatch.redelivery_interval_ms", d.redelivery_interval_ms),
            ("dispatch.health_interval_ms", d.health_interval_ms),
            (
                "breaker.failure_threshold",
                u64::from(self.breaker.failure_threshold),
            ),
            (
                "breaker.recovery_timeout_ms",
                self.breaker.recovery_timeout_ms,
            ),
            (
                "breaker.half_open_successes",
                u64::from(self.breaker.half_open_successes),
            ),
            ("limits.max_body_bytes", self.limits.max_body_bytes as u64),
            (
                "limits.max_messages_per_packet",
                self.limits.max_messages_per_packet as u64,
            ),
            ("limits.max_id_bytes", self.limits.max_id_bytes as u64),
            (
                "limits.max_message_bytes",
                self.limits.max_message_bytes as u64,
            ),
            ("limits.body_timeout_ms", self.limits.body_timeout_ms),
            ("wal.max_pending_messages", self.wal.max_pending_messages),
        ] {
            if value == 0 {
                return invalid(format!("`{key}` must be > 0"));
            }
        }
        // Ids are stored with a u16 length and checked by analyzers against the same bound.
        if self.limits.max_id_bytes > MAX_ID_BYTES {
            return invalid(format!(
                "`limits.max_id_bytes` must be at most {MAX_ID_BYTES}"
            ));
        }
        if self.limits.max_message_bytes > logdist_proto::MAX_MESSAGE_BYTES {
            return invalid(format!(
                "`limits.max_message_bytes` must be at most {} (the analyzers' limit)",
                logdist_proto::MAX_MESSAGE_BYTES
            ));
        }
        // Any accepted packet must fit in one analyzer request (analyzers take up to 64 MiB).
        if self.limits.max_body_bytes > MAX_PACKET_BYTES {
            return invalid(format!(
                "`limits.max_body_bytes` must be at most {MAX_PACKET_BYTES}"
            ));
        }
        if d.batch_max_bytes > MAX_PACKET_BYTES {
            return invalid(format!(
                "`dispatch.batch_max_bytes` must be at most {MAX_PACKET_BYTES}"
            ));
        }
        if d.backoff_initial_ms > d.backoff_max_ms {
            return invalid(
                "`dispatch.backoff_initial_ms` must not exceed `dispatch.backoff_max_ms`",
            );
        }
        Ok(())
    }
}

/// Most analyzers one distributor delivers to.
pub const MAX_ANALYZERS: usize = 64;
/// Largest weight (weights are relative; the bound keeps their sum finite).
pub const MAX_WEIGHT: f64 = 1_000_000.0;
/// Longest timeout of one send to an analyzer.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Most retries of one batch before the redelivery worker takes over.
pub const MAX_RETRY_COUNT: u32 = 10;

/// Check one analyzer's fields. The error names the field (`id`, `weight`, `endpoint`,
/// `timeout_ms`) and says what is wrong with it. Used for the config file and the admin API alike.
pub fn check_analyzer(a: &AnalyzerEntry) -> Result<(), (&'static str, String)> {
    if a.id.trim().is_empty() {
        return Err(("id", "must not be empty".into()));
    }
    // It goes into URL paths (`/admin/analyzers/{id}`) and metric labels unescaped.
    if a.id.len() > MAX_ID_BYTES
        || !a
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err((
            "id",
            format!(
                "{:?} must be at most {MAX_ID_BYTES} characters from A-Z a-z 0-9 . _ -",
                a.id
            ),
        ));
    }
    if !a.weight.is_finite() || !(0.0..=MAX_WEIGHT).contains(&a.weight) {
        return Err((
            "weight",
            format!(
                "of {:?} must be a number from 0 to {MAX_WEIGHT}, got {}",
                a.id, a.weight
            ),
        ));
    }
    check_endpoint(&a.endpoint).map_err(|e| ("endpoint", format!("of {:?}: {e}", a.id)))?;
    if !(1..=MAX_TIMEOUT_MS).contains(&a.timeout_ms) {
        return Err((
            "timeout_ms",
            format!("of {:?} must be from 1 to {MAX_TIMEOUT_MS}", a.id),
        ));
    }
    // Bounded, so that a batch's retries end and its records go to the redelivery worker.
    if a.retry_count > MAX_RETRY_COUNT {
        return Err((
            "retry_count",
            format!("of {:?} must be at most {MAX_RETRY_COUNT}", a.id),
        ));
    }
    Ok(())
}

/// Accepts `http://host[:port][/path]` and `https://...`, with a non-empty host and a numeric port.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("{endpoint:?} must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(format!("{endpoint:?} has no valid host"));
    }
    if let Some(p) = port {
        p.parse::<u16>()
            .map_err(|_| format!("{endpoint:?} has an invalid port {p:?}"))?;
    }
    Ok(())
}

/// Everything an analyzer needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyzerSettings {
    /// Name reported in `/status`; the distributor's config refers to analyzers by the same name.
    pub id: String,
    pub host: String,
    pub port: u16,
    /// Packets remembered for de-duplication and `/audit`. Beyond it the oldest are forgotten
    /// (and `/status` says how many), so memory stays bounded.
    pub dedup_capacity_packets: usize,
    /// Append-only file in which the analyzer notes every message it records, replayed at start so
    /// that a killed analyzer still knows (and `/audit` still lists) what it processed. `None`
    /// keeps that knowledge in memory only. Written without fsync: it survives a process kill, not
    /// a power loss. Grows by one line per packet and is never compacted.
    pub audit_log: Option<PathBuf>,
    /// Base URL of a distributor to register with at start (`PUT /admin/analyzers/{id}`, retried
    /// until it answers) and to deregister from on a graceful stop (`DELETE`, which waits for the
    /// distributor to drain what it had sent here). `None`: the distributor's config lists it.
    pub register_url: Option<String>,
    /// The base URL the distributor should use to reach this analyzer. Default
    /// `http://{host}:{port}` (required when `host` is a wildcard such as 0.0.0.0).
    pub advertise_url: Option<String>,
    /// Weight to register with. `None` keeps the weight the distributor already has for this id
    /// (1.0 for a new one), so a restart does not undo a weight changed at runtime.
    pub register_weight: Option<f64>,
}

impl Default for AnalyzerSettings {
    fn default() -> Self {
        Self {
            id: "analyzer-1".into(),
            host: "127.0.0.1".into(),
            port: 8082,
            dedup_capacity_packets: 1_000_000,
            audit_log: None,
            register_url: None,
            advertise_url: None,
            register_weight: None,
        }
    }
}

impl Validate for AnalyzerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.id.trim().is_empty() {
            return invalid("`id` must not be empty");
        }
        if self.dedup_capacity_packets == 0 {
            return invalid("`dedup_capacity_packets` must be > 0");
        }
        if self
            .audit_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return invalid("`audit_log` must not be empty (leave it out to keep no audit log)");
        }
        if let Some(url) = &self.register_url {
            check_endpoint(url).or_else(|e| invalid(format!("`register_url`: {e}")))?;
            match &self.advertise_url {
                Some(a) => {
                    check_endpoint(a).or_else(|e| invalid(format!("`advertise_url`: {e}")))?
                }
                None if matches!(self.host.as_str(), "0.0.0.0" | "::" | "[::]") => {
                    return invalid(format!(
                        "`advertise_url` must be set with `register_url` when `host` is {:?}: \
                         the distributor cannot reach a wildcard address",
                        self.host
                    ))
                }
                None => {}
            }
        }
        if let Some(w) = self.register_weight {
            if !w.is_finite() || w < 0.0 {
                return invalid(format!(
                    "`register_weight` must be a finite number >= 0, got {w}"
                ));
            }
        }
        Ok(())
    }
}

/// Everything the emitter needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmitterSettings {
    pub host: String,
    pub port: u16,
    /// Base URL of the distributor; packets go to `{distributor_url}/logs`.
    pub distributor_url: String,
    /// Emitter identities one `POST /generate` sends as (`emitter-1` ...).
    pub emitters: u32,
    /// Messages per packet.
    pub messages_per_packet: u32,
    /// Messages per second sent by continuous generation (`POST /start`).
    pub rate_messages_per_sec: u32,
    /// Timeout of one `POST /logs`.
    pub request_timeout_ms: u64,
    /// Longest wait between two tries of the same packet (a `Retry-After` may ask for longer).
    pub max_backoff_ms: u64,
    /// Acknowledged packets remembered for `GET /acknowledged` (oldest forgotten beyond it).
    pub acknowledged_log_capacity: usize,
}

impl Default for EmitterSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            distributor_url: "http://127.0.0.1:8081".into(),
            emitters: 5,
            messages_per_packet: 50,
            rate_messages_per_sec: 1000,
            request_timeout_ms: 5000,
            max_backoff_ms: 2000,
            acknowledged_log_capacity: 2_000_000,
        }
    }
}

impl Validate for EmitterSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        check_endpoint(&self.distributor_url)
            .or_else(|e| invalid(format!("`distributor_url`: {e}")))?;
        for (key, value) in [
            ("emitters", u64::from(self.emitters)),
            ("messages_per_packet", u64::from(self.messages_per_packet)),
            (
                "rate_messages_per_sec",
                u64::from(self.rate_messages_per_sec),
            ),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_backoff_ms", self.max_backoff_ms),
        ] {
            if value == 0 {
                return invalid(format!("`{key}` must be > 0"));
            }
        }
        Ok(())
    }
}

/// Flags shared by every service binary, merged last. `None` leaves the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub struct CommonFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Where a service looks for its file when `--config` is not given: `config/<name>.toml` if it
/// exists in the working directory.
pub fn default_file(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(format!("config/{name}.toml"));
    path.is_file().then_some(path)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
mod tests {
    use super::*;
    use figment::Jail;

    fn load_dist(jail: &Jail, toml: &str) -> Result<DistributorSettings, ConfigError> {
        jail.create_file("d.toml", toml).unwrap();
        load(
            Some(Path::new("d.toml")),
            "DISTRIBUTOR_",
            &CommonFlags::default(),
        )
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "d.toml",
                "port = 9000\nhost = \"0.0.0.0\"\n[wal]\nfsync = false\n",
            )?;
            jail.set_env("DISTRIBUTOR_PORT", "9001");
            jail.set_env("DISTRIBUTOR_WAL__CACHE_CAPACITY_MB", "16");
            let s: DistributorSettings = load(
                Some(Path::new("d.toml")),
                "DISTRIBUTOR_",
                &CommonFlags::default(),
            )
            .unwrap();
            assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 9001));
            assert!(!s.wal.fsync);
            assert_eq!(s.wal.cache_capacity_mb, 16);
            assert_eq!(s.analyzers.len(), 3, "defaults survive");
            let flags = CommonFlags {
                port: Some(9002),
                host: None,
            };
            let s: DistributorSettings =
                load(Some(Path::new("d.toml")), "DISTRIBUTOR_", &flags).unwrap();
            assert_eq!((s.host.as_str(), s.port), ("0.0.0.0", 9002));
            Ok(())
        });
    }

    #[test]
    fn bad_analyzer_lists_are_refused_naming_the_key() {
        Jail::expect_with(|jail| {
            let entry = |id: &str, w: &str, ep: &str| {
                format!("[[analyzers]]\nid = \"{id}\"\nweight = {w}\nendpoint = \"{ep}\"\n")
            };
            let cases = [
                (
                    entry("a", "0.0", "http://x:1") + &entry("b", "0", "http://y:2"),
                    "no analyzer has a positive weight",
                ),
                (
                    entry("a", "1", "http://x:1") + &entry("a", "1", "http://y:2"),
                    "duplicate id",
                ),
                (entry("a", "1", "ftp://x:1"), "analyzers[0].endpoint"),
                (entry("a", "1", "http://:80"), "no valid host"),
                (entry("a", "1", "http://x:99999"), "invalid port"),
                (entry("a", "-1", "http://x:1"), "analyzers[0].weight"),
                (entry("a b", "1", "http://x:1"), "analyzers[0].id"),
                (entry("a", "1e9", "http://x:1"), "analyzers[0].weight"),
                (
                    entry("a", "1", "http://x:1") + "[limits]\nmax_id_bytes = 70000\n",
                    "limits.max_id_bytes",
                ),
                ("analyzers = []\n".to_string(), "at least one"),
                ("prot = 1\n".to_string(), "prot"),
            ];
            for (toml, needle) in cases {
                let err = load_dist(jail, &toml).unwrap_err().to_string();
                assert!(err.contains(needle), "{toml:?} -> {err} (wanted {needle})");
            }
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_a_silent_default() {
        let err = load::<AnalyzerSettings, _>(
            Some(Path::new("/nonexistent/a.toml")),
            "ANALYZER_",
            &CommonFlags::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn the_analyzer_audit_log_is_off_by_default_and_set_by_file_or_env() {
        Jail::expect_with(|jail| {
            let none = CommonFlags::default();
            let s: AnalyzerSettings = load(None, "ANALYZER_", &none).unwrap();
            assert_eq!(s.audit_log, None);
            jail.create_file("a.toml", "audit_log = \"data/a.ndjson\"\n")?;
            let s: AnalyzerSettings = load(Some(Path::new("a.toml")), "ANALYZER_", &none).unwrap();
            assert_eq!(s.audit_log, Some(PathBuf::from("data/a.ndjson")));
            jail.create_file("empty.toml", "audit_log = \"\"\n")?;
            let err =
                load::<AnalyzerSettings, _>(Some(Path::new("empty.toml")), "ANALYZER_", &none)
                    .unwrap_err();
            assert!(err.to_string().contains("audit_log"), "{err}");
            jail.set_env("ANALYZER_AUDIT_LOG", "/tmp/b.ndjson");
            let s: AnalyzerSettings = load(Some(Path::new("a.toml")), "ANALYZER_", &none).unwrap();
            assert_eq!(s.audit_log, Some(PathBuf::from("/tmp/b.ndjson")));
            Ok(())
        });
    }

    #[test]
    fn default_settings_are_valid() {
        DistributorSettings::default().validate().unwrap();
        AnalyzerSettings::default().validate().unwrap();
        EmitterSettings::default().validate().unwrap();
    }
}
