//! The system under test as real processes: three analyzers and one distributor, started from the
//! binaries in `bin_dir`, each in the scenario's own work directory, each restartable on the same
//! port (and, for the distributor, the same WAL directory).
//!
//! Analyzers run with `--audit-log`, so one killed with SIGKILL comes back remembering what it had
//! processed: without that, a kill would erase the very evidence the suite compares against.

use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a process may take to print `listening on <addr>`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERMed process may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Analyzer weights, as in the default configuration.
pub const WEIGHTS: [f64; 3] = [0.5, 0.3, 0.2];

/// Distributor settings a scenario may change.
#[derive(Debug, Clone)]
pub struct DistributorKnobs {
    /// `wal.max_pending_messages`: the bound beyond which `POST /logs` answers 503.
    pub max_pending_messages: u64,
    /// Per-analyzer send timeout.
    pub timeout_ms: u64,
    /// `limits.body_timeout_ms`: how long a request body may take to arrive.
    pub body_timeout_ms: u64,
    /// Where the WAL lives (inside the work dir unless a scenario mounts something there).
    pub data_dir: PathBuf,
    /// `wal.fsync`; false only to show that the suite catches a distributor that acknowledges
    /// before its data is durable.
    pub fsync: bool,
}

/// One child process and where it listens.
#[derive(Debug, Default)]
pub struct Proc {
    pub name: String,
    pub port: u16,
    pub url: String,
    child: Option<Child>,
}

impl Proc {
    /// Started by us and not exited since (a process that died on its own is reaped here).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                tracing::warn!(name = %self.name, %status, "exited on its own");
                self.child = None;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill().ok();
            child
                .wait()
                .await
                .with_context(|| format!("cannot reap {}", self.name))?;
        }
        Ok(())
    }

    /// SIGTERM, then wait for the exit; returns the exit code (`None`: killed by a signal).
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{} has no pid", self.name))?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("cannot run kill")?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => Ok(status.context("cannot reap")?.code()),
            Err(_) => {
                child.start_kill().ok();
                child.wait().await.ok();
                bail!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                    self.name
                )
            }
        }
    }
}

/// Start `cmd` and wait for its `listening on <addr>` line; returns the child and the port.
async fn spawn_listening(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<(Child, u16)> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{name}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
    let addr = match line {
        Ok(Ok(Some(line))) => line
            .strip_prefix("listening on ")
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{name} printed {line:?} instead of `listening on <addr>`")),
        Ok(Ok(None)) => Err(anyhow!(
            "{name} exited before listening; see {}",
            log.display()
        )),
        Ok(Err(e)) => Err(anyhow!("cannot read {name}'s stdout: {e}")),
        Err(_) => Err(anyhow!(
            "{name} did not listen within {START_TIMEOUT:?}; see {}",
            log.display()
        )),
    };
    let addr = match addr {
        Ok(addr) => addr,
        Err(e) => {
            child.start_kill().ok();
            return Err(e);
        }
    };
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("{name}: no port in {addr:?}"))?;
    // Keep reading stdout so that a later line can never block the child on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, port))
}

/// Three analyzers and a distributor, all on 127.0.0.1.
pub struct Topology {
    bin_dir: PathBuf,
    pub dir: PathBuf,
    pub knobs: DistributorKnobs,
    pub analyzers: Vec<Proc>,
    pub distributor: Proc,
    pub http: reqwest::Client,
}

impl Topology {
    /// Start everything in `dir` (created if missing).
    pub async fn start(
        bin_dir: &Path,
        dir: &Path,
        knobs: DistributorKnobs,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("cannot build an HTTP client")?;
        let mut topology = Topology {
            bin_dir: bin_dir.to_owned(),
            dir: dir.to_owned(),
            knobs,
            analyzers: Vec::new(),
            distributor: Proc {
                name: "distributor".into(),
                port: 0,
                url: String::new(),
                child: None,
            },
            http,
        };
        for n in 1..=WEIGHTS.len() {
            let mut proc = Proc {
                name: format!("analyzer-{n}"),
                port: 0,
                url: String::new(),
                child: None,
            };
            topology.start_analyzer(&mut proc).await?;
            topology.analyzers.push(proc);
        }
        topology.write_config()?;
        let mut distributor = std::mem::take(&mut topology.distributor);
        topology.start_distributor_proc(&mut distributor).await?;
        topology.distributor = distributor;
        Ok(topology)
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    async fn start_analyzer(&self, proc: &mut Proc) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.binary("analyzer"));
        cmd.current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .args(["--id", &proc.name, "--host", "127.0.0.1"])
            .args(["--port", &proc.port.to_string()])
            .arg("--audit-log")
            .arg(self.dir.join(format!("{}.audit", proc.name)));
        let log = self.dir.join(format!("{}.log", proc.name));
        let (child, port) = spawn_listening(&proc.name, cmd, &log).await?;
        proc.port = port;
        proc.url = format!("http://127.0.0.1:{port}");
        proc.child = Some(child);
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("distributor.toml")
    }

    /// The distributor's settings file: the analyzers' real ports, the scenario's knobs, and the
    /// production defaults for everything else.
    pub fn write_config(&self) -> anyhow::Result<()> {
        let k = &self.knobs;
        let mut toml = format!(
            "host = \"127.0.0.1\"\nport = {port}\ndata_dir = {data_dir:?}\n\n\
             [wal]\nmax_pending_messages = {max_pending}\nfsync = {fsync}\n\n\
             [limits]\nbody_timeout_ms = {body_timeout}\n\n\
             [dispatch]\nhealth_interval_ms = 500\n",
            port = self.distributor.port,
            data_dir = k.data_dir.display().to_string(),
            max_pending = k.max_pending_messages,
            fsync = k.fsync,
            body_timeout = k.body_timeout_ms,
        );
        for (proc, weight) in self.analyzers.iter().zip(WEIGHTS) {
            toml.push_str(&format!(
                "\n[[analyzers]]\nid = {id:?}\nweight = {weight}\nendpoint = {url:?}\n\
                 timeout_ms = {timeout}\nretry_count = 2\n",
                id = proc.name,
                url = proc.url,
                timeout = k.timeout_ms,
            ));
        }
        let path = self.config_path();
        std::fs::write(&path, toml).with_context(|| format!("cannot write {}", path.display()))
    }

    async fn start_distributor_proc(&self, proc: &mut Proc) -> anyhow::Result<()> {
        self.start_distributor_with(proc, &[]).await
    }

    async fn start_distributor_with(&self, proc: &mut Proc, extra: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.binary("distributor"));
        cmd.current_dir(&self.dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .arg("--config")
            .arg(self.config_path());
        if proc.port != 0 {
            cmd.args(["--port", &proc.port.to_string()]);
        }
        let log = self.dir.join("distributor.log");
        let (child, port) = spawn_listening("distributor", cmd, &log).await?;
        proc.name = "distributor".into();
        proc.port = port;
        proc.url = format!("http://127.0.0.1:{port}");
        proc.child = Some(child);
        Ok(())
    }

    /// Start the distributor again (same port, same WAL) after a kill or a stop.
    pub async fn restart_distributor(&mut self) -> anyhow::Result<()> {
        self.restart_distributor_with(&[]).await
    }

    /// [`Topology::restart_distributor`] with extra flags (e.g. `--recover`).
    pub async fn restart_distributor_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let mut proc = std::mem::take(&mut self.distributor);
        proc.kill().await?;
        let started = self.start_distributor_with(&mut proc, extra).await;
        self.distributor = proc;
        started
    }

    /// Start analyzer `i` (0-based) again on its port, with its audit log.
    pub async fn restart_analyzer(&mut self, i: usize) -> anyhow::Result<()> {
        let mut proc = std::mem::take(&mut self.analyzers[i]);
        proc.kill().await?;
        let started = self.start_analyzer(&mut proc).await;
        self.analyzers[i] = proc;
        started
    }

    /// `POST {analyzer}/{verb}` (enable, disable), checking for a 2xx.
    pub async fn analyzer_post(
        &self,
        i: usize,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.analyzers[i].url);
        let mut request = self.http.post(&url);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let answer = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if !answer.status().is_success() {
            bail!("POST {url} answered {}", answer.status());
        }
        Ok(())
    }

    /// Every analyzer running, enabled and without injected faults.
    pub async fn heal_analyzers(&mut self) -> anyhow::Result<()> {
        for i in 0..self.analyzers.len() {
            if !self.analyzers[i].is_running() {
                self.restart_analyzer(i).await?;
            }
            self.analyzer_post(i, "/enable", None).await?;
            self.analyzer_post(i, "/faults", Some("{}")).await?;
        }
        Ok(())
    }

    /// `GET {distributor}{path}` as JSON.
    pub async fn distributor_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.distributor.url);
        let answer = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let body = answer.bytes().await.with_context(|| format!("GET {url}"))?;
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: not JSON"))
    }

    /// Messages pending in the WAL, per `GET /queue`.
    pub async fn pending(&self) -> anyhow::Result<u64> {
        Ok(crate::verify::fetch_pending(&self.http, &self.distributor.url).await?)
    }

    /// Wait until the WAL is empty; returns how long it took.
    pub async fn drain(&self, within: Duration) -> anyhow::Result<Duration> {
        crate::verify::wait_drained(&self.http, &self.distributor.url, within)
            .await
            .map_err(|pending| match pending {
                Some(n) => anyhow!("{n} messages still pending after {within:?}"),
                None => anyhow!("the distributor did not answer GET /queue within {within:?}"),
            })
    }

    /// Stop everything (SIGKILL: the scenario is over and its counts are taken).
    pub async fn shutdown(&mut self) {
        self.distributor.kill().await.ok();
        for a in &mut self.analyzers {
            a.kill().await.ok();
        }
    }
}
