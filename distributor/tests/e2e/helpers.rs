//! Test harness: analyzers run in this process on real sockets (127.0.0.1, port 0); the distributor
//! is the real binary in a child process, so it can be killed with SIGKILL and restarted on the
//! same data directory and port. Every wait polls a condition with a deadline.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use emitter::client::DistributorClient;
use emitter::generate::{Generator, OutPacket};
use futures_util::StreamExt;
use logdist_config::AnalyzerSettings;
use logdist_proto::MessageId;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub async fn get_json(url: &str) -> Value {
    let body = http().get(url).send().await.unwrap().bytes().await.unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body:?}"))
}

/// The body of a `GET`, as text.
pub async fn get_text(url: &str) -> String {
    http().get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn post(url: &str) -> reqwest::StatusCode {
    http().post(url).send().await.unwrap().status()
}

/// Poll `check` every 50 ms until it returns true or `within` passes (then panic with `what`).
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request with an optional JSON body; returns the status and the JSON answer (`null` if none).
#[allow(dead_code)] // used by e2e/operate.rs, not by tests/faults.rs
pub async fn call(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    let mut req = http()
        .request(method, url)
        .header("content-type", "application/json");
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub struct TestAnalyzer {
    pub id: String,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestAnalyzer {
    pub async fn spawn(id: &str) -> Self {
        Self::spawn_with(AnalyzerSettings {
            id: id.to_string(),
            ..AnalyzerSettings::default()
        })
        .await
    }

    /// An analyzer with these settings, on a free port of 127.0.0.1.
    pub async fn spawn_with(settings: AnalyzerSettings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let id = settings.id.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(analyzer::run(listener, settings, async {
            let _ = rx.await;
        }));
        let a = TestAnalyzer {
            id,
            url,
            stop: Some(tx),
            task: Some(task),
        };
        let health = format!("{}/health", a.url);
        wait_until("analyzer up", Duration::from_secs(10), || async {
            http().get(&health).send().await.is_ok()
        })
        .await;
        a
    }

    /// Stop it as SIGTERM would, and wait until it has stopped.
    #[allow(dead_code)] // used by e2e/operate.rs
    pub async fn stop_gracefully(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("analyzer stopped within 60 s")
                .unwrap()
                .unwrap();
        }
    }

    pub async fn disable(&self) {
        assert!(post(&format!("{}/disable", self.url)).await.is_success());
    }

    pub async fn enable(&self) {
        assert!(post(&format!("{}/enable", self.url)).await.is_success());
    }

    /// (distinct messages processed, duplicates seen)
    pub async fn processed(&self) -> (u64, u64) {
        let v = get_json(&format!("{}/processed", self.url)).await;
        (
            v["processed"].as_u64().unwrap(),
            v["duplicates"].as_u64().unwrap(),
        )
    }

    pub async fn audit(&self) -> Vec<MessageId> {
        let body = get_text(&format!("{}/audit", self.url)).await;
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for TestAnalyzer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn analyzers(n: usize) -> Vec<TestAnalyzer> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(TestAnalyzer::spawn(&format!("analyzer-{i}")).await);
    }
    v
}

/// The distributor binary, run as a child process.
pub struct Distributor {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    #[allow(dead_code)] // read by tests/faults.rs, which shares this file
    data_dir: PathBuf,
    /// Extra command-line arguments for the next (re)start, e.g. `--recover`.
    pub args: Vec<String>,
    /// Extra environment variables for the next (re)start, e.g. `LOG_FORMAT=json`.
    pub env: Vec<(String, String)>,
}

impl Distributor {
    /// Start on a free port with these analyzers and weights; `extra` is appended to the TOML
    /// (e.g. a `[wal]` table).
    pub async fn start(analyzers: &[(&TestAnalyzer, f64)], extra: &str) -> Self {
        let endpoints: Vec<(&str, &str, f64)> = analyzers
            .iter()
            .map(|(a, w)| (a.id.as_str(), a.url.as_str(), *w))
            .collect();
        Self::start_with(&endpoints, extra).await
    }

    /// Like `start`, with analyzers given as (id, base URL, weight).
    pub async fn start_with(analyzers: &[(&str, &str, f64)], extra: &str) -> Self {
        Self::start_in(analyzers, extra, None).await
    }

    /// Like `start_with`, with the WAL in `data_dir` (default: a `data` directory next to the
    /// config, removed with it).
    pub async fn start_in(
        analyzers: &[(&str, &str, f64)],
        extra: &str,
        data_dir: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = data_dir.unwrap_or_else(|| dir.path().join("data"));
        let mut toml = format!(
            "host = \"127.0.0.1\"\nport = 0\ndata_dir = \"{}\"\n{extra}\n",
            data_dir.display()
        );
        if !extra.contains("[dispatch]") {
            toml.push_str(
                "[dispatch]\nredelivery_interval_ms = 300\nhealth_interval_ms = 200\n\
                 backoff_initial_ms = 20\nbackoff_max_ms = 100\n",
            );
        }
        for (id, url, w) in analyzers {
            toml.push_str(&format!(
                "[[analyzers]]\nid = \"{id}\"\nweight = {w}\nendpoint = \"{url}\"\ntimeout_ms = 1000\nretry_count = 2\n"
            ));
        }
        let config = dir.path().join("distributor.toml");
        std::fs::write(&config, toml).unwrap();
        let mut d = Distributor {
            child: None,
            port: 0,
            url: String::new(),
            dir,
            config,
            data_dir,
            args: Vec::new(),
            env: Vec::new(),
        };
        d.spawn();
        d.wait_ready().await;
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("distributor.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_distributor"));
        cmd.arg("--config").arg(&self.config).args(&self.args);
        if self.port != 0 {
            cmd.arg("--port").arg(self.port.to_string());
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("distributor did not start: {line:?}\n{}", self.log()));
        self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
        self.url = format!("http://{addr}");
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        let url = format!("{}/health", self.url);
        wait_until("distributor serving", Duration::from_secs(20), || async {
            http()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// The WAL's directory.
    #[allow(dead_code)] // used by tests/faults.rs, which shares this file
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// True while the child process has not exited.
    #[allow(dead_code)] // used by tests/faults.rs
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Run the binary with this configuration (and `self.args`) while it is stopped, expecting it
    /// to exit by itself within `within`; returns its exit status and stderr.
    #[allow(dead_code)] // used by tests/faults.rs
    pub fn run_expecting_exit(&self, within: Duration) -> (ExitStatus, String) {
        assert!(self.child.is_none(), "stop it first");
        let mut child = Command::new(env!("CARGO_BIN_EXE_distributor"))
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
            s
        });
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = reader.join().unwrap_or_default();
                panic!("the distributor did not exit within {within:?}; its stderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, reader.join().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("distributor.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then wait (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn queue(&self) -> Value {
        get_json(&format!("{}/queue", self.url)).await
    }

    /// Wait until nothing is pending in the WAL.
    pub async fn wait_drained(&self, within: Duration) {
        let url = format!("{}/queue", self.url);
        wait_until("WAL drained", within, || async {
            get_json(&url).await["size"].as_u64() == Some(0)
        })
        .await;
    }

    pub fn client(&self) -> DistributorClient {
        DistributorClient::new(&self.url, Duration::from_secs(5))
            .unwrap()
            .with_max_backoff(Duration::from_millis(200))
    }
}

impl Drop for Distributor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- distributor log ----\n{}", self.log());
        }
    }
}

/// `n` packets of `size` messages spread over 5 emitters.
pub fn packets(seed: u64, n: usize, size: u32) -> Vec<OutPacket> {
    let mut g = Generator::new(format!("t{seed}"), seed);
    (0..n)
        .map(|i| g.next_packet(&format!("emitter-{}", i % 5 + 1), size))
        .collect()
}

/// Send every packet until acknowledged (at most `concurrency` at once, 120 s deadline each);
/// returns the identities of every acknowledged message.
pub async fn send_all(
    client: &DistributorClient,
    packets: Vec<OutPacket>,
    concurrency: usize,
) -> HashSet<MessageId> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let acked: Vec<Vec<MessageId>> = futures_util::stream::iter(packets)
        .map(|p| async move {
            client
                .send_until_acknowledged(&p, Some(deadline))
                .await
                .unwrap_or_else(|e| panic!("packet {} not acknowledged: {e}", p.packet_id));
            ids_of(&p)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    acked.into_iter().flatten().collect()
}

pub fn ids_of(p: &OutPacket) -> Vec<MessageId> {
    (0..p.messages.len() as u32)
        .map(|index| MessageId {
            emitter_id: p.emitter_id.clone(),
            packet_id: p.packet_id.clone(),
            index,
        })
        .collect()
}

/// What the analyzers processed, message by message.
pub struct Delivered {
    /// id -> analyzers that processed it
    pub by_id: HashMap<MessageId, Vec<String>>,
}

impl Delivered {
    pub async fn collect(analyzers: &[TestAnalyzer]) -> Self {
        let mut by_id: HashMap<MessageId, Vec<String>> = HashMap::new();
        for a in analyzers {
            for id in a.audit().await {
                by_id.entry(id).or_default().push(a.id.clone());
            }
        }
        Delivered { by_id }
    }

    /// Acknowledged messages no analyzer processed.
    pub fn lost(&self, acked: &HashSet<MessageId>) -> Vec<MessageId> {
        let mut lost: Vec<MessageId> = acked
            .iter()
            .filter(|id| !self.by_id.contains_key(id))
            .cloned()
            .collect();
        lost.sort();
        lost
    }

    /// Every message of `acked` was processed, and nothing else was.
    pub fn assert_all_and_only(&self, acked: &HashSet<MessageId>) {
        assert_eq!(self.lost(acked), vec![]);
        assert_eq!(self.by_id.len(), acked.len());
    }

    /// Messages processed by more than one analyzer.
    pub fn duplicated(&self) -> usize {
        self.by_id.values().filter(|v| v.len() > 1).count()
    }
}

/// A stand-in analyzer that refuses (400) any batch mentioning "poison", answers 503 while off,
/// and records the packet ids of the batches it accepted.
pub struct PickyAnalyzer {
    pub url: String,
    pub on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub accepted: std::sync::Arc<std::sync::Mutex<HashSet<String>>>,
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: actix_web::dev::ServerHandle,
}

impl PickyAnalyzer {
    pub async fn spawn() -> Self {
        use actix_web::{web, App, HttpResponse, HttpServer};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let on = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(HashSet::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let (on2, acc2, ref2) = (on.clone(), accepted.clone(), refused.clone());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            let (on, acc, refused) = (on2.clone(), acc2.clone(), ref2.clone());
            let on_h = on.clone();
            App::new()
                .route(
                    "/health",
                    web::get().to(move || {
                        let up = on_h.load(Ordering::SeqCst);
                        async move {
                            if up {
                                HttpResponse::Ok().finish()
                            } else {
                                HttpResponse::ServiceUnavailable().finish()
                            }
                        }
                    }),
                )
                .route(
                    "/analyze",
                    web::post().to(move |body: web::Bytes| {
                        let (on, acc, refused) = (on.clone(), acc.clone(), refused.clone());
                        async move {
                            if !on.load(Ordering::SeqCst) {
                                return HttpResponse::ServiceUnavailable().finish();
                            }
                            if String::from_utf8_lossy(&body).contains("poison") {
                                refused.fetch_add(1, Ordering::SeqCst);
                                return HttpResponse::BadRequest().body(r#"{"error":"poison"}"#);
                            }
                            let v: Value = serde_json::from_slice(&body).unwrap();
                            let mut acc = acc.lock().unwrap();
                            for p in v["packets"].as_array().unwrap() {
                                acc.insert(p["packet_id"].as_str().unwrap().to_string());
                            }
                            HttpResponse::Ok().body("{}")
                        }
                    }),
                )
        })
        .listen(listener)
        .unwrap()
        .workers(1)
        .disable_signals()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        PickyAnalyzer {
            url,
            on,
            accepted,
            refused,
            handle,
        }
    }
}

impl Drop for PickyAnalyzer {
    fn drop(&mut self) {
        let h = self.handle.clone();
        tokio::spawn(async move { h.stop(false).await });
    }
}
