//! The ten scenarios. Each builds a [`Run`] (topology + load), injects its fault, and hands the run
//! to [`Run::finish`], which heals, drains and counts.

use super::badinput;
use super::load::{Load, LoadShape};
use super::topology::{DistributorKnobs, Topology};
use super::{Options, Row, Verdict};
use crate::generate::{Generator, SplitMix64};
use crate::verify::{fetch_audit, verify_delivery};
use anyhow::{bail, Context};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// Longest wait for the WAL to drain once every fault is healed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages per packet in the emitted load.
const PACKET_SIZE: u32 = 20;

/// The scenarios, in the order `all` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// SIGKILL the distributor at random moments, `--cycles` times, restarting it each time.
    DistributorKill,
    /// SIGTERM the distributor (it must exit 0) and start it again, a few times.
    DistributorTerm,
    /// SIGKILL each analyzer in turn and restart it, then all three at once.
    AnalyzerKill,
    /// Disable and enable analyzers at random every 150-400 ms.
    AnalyzerFlap,
    /// One analyzer answers later than the distributor's timeout.
    SlowAnalyzer,
    /// One analyzer answers 500 to 30% of requests.
    PartialFailure,
    /// Every analyzer down until the WAL is at its bound (503 + Retry-After), then back.
    AllDown,
    /// The WAL's filesystem fills up, then space returns.
    DiskFull,
    /// Garbage after the end of the WAL's log and a damaged snapshot, while the distributor is down.
    TornWal,
    /// Malformed, oversized, mistyped and slow requests in the middle of the load.
    BadInput,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::DistributorKill,
        Scenario::DistributorTerm,
        Scenario::AnalyzerKill,
        Scenario::AnalyzerFlap,
        Scenario::SlowAnalyzer,
        Scenario::PartialFailure,
        Scenario::AllDown,
        Scenario::DiskFull,
        Scenario::TornWal,
        Scenario::BadInput,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::DistributorKill => "distributor-kill",
            Scenario::DistributorTerm => "distributor-term",
            Scenario::AnalyzerKill => "analyzer-kill",
            Scenario::AnalyzerFlap => "analyzer-flap",
            Scenario::SlowAnalyzer => "slow-analyzer",
            Scenario::PartialFailure => "partial-failure",
            Scenario::AllDown => "all-down",
            Scenario::DiskFull => "disk-full",
            Scenario::TornWal => "torn-wal",
            Scenario::BadInput => "bad-input",
        }
    }
}

pub async fn run(scenario: Scenario, options: &Options) -> anyhow::Result<Row> {
    let dir = options.work_dir.join(scenario.name());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = SplitMix64::new(options.seed ^ scenario as u64);
    match scenario {
        Scenario::DistributorKill => distributor_kill(options, &dir, &mut rng).await,
        Scenario::DistributorTerm => distributor_term(options, &dir, &mut rng).await,
        Scenario::AnalyzerKill => analyzer_kill(options, &dir).await,
        Scenario::AnalyzerFlap => analyzer_flap(options, &dir, &mut rng).await,
        Scenario::SlowAnalyzer => slow_analyzer(options, &dir).await,
        Scenario::PartialFailure => partial_failure(options, &dir).await,
        Scenario::AllDown => all_down(options, &dir).await,
        Scenario::DiskFull => disk_full(options, &dir).await,
        Scenario::TornWal => torn_wal(options, &dir, &mut rng).await,
        Scenario::BadInput => bad_input(options, &dir).await,
    }
}

fn default_knobs(options: &Options, dir: &Path) -> DistributorKnobs {
    DistributorKnobs {
        fsync: !options.break_durability,
        max_pending_messages: 10_000_000,
        timeout_ms: 1000,
        body_timeout_ms: 2000,
        data_dir: dir.join("wal"),
    }
}

/// A uniformly random duration in `lo..hi` milliseconds.
fn millis(rng: &mut SplitMix64, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rng.below(hi.saturating_sub(lo).max(1)))
}

/// A topology under load, collecting notes and failures until [`Run::finish`].
struct Run {
    scenario: Scenario,
    topology: Topology,
    load: Load,
    notes: Vec<String>,
    failures: Vec<String>,
    /// Acknowledged messages the scenario destroyed on disk and the distributor reported missing.
    destroyed: u64,
    /// The packets acknowledged when the scenario damaged the WAL: the only ones it may lose.
    damaged_window: Option<HashSet<(String, String)>>,
}

impl Run {
    async fn start(
        scenario: Scenario,
        options: &Options,
        dir: &Path,
        knobs: DistributorKnobs,
    ) -> anyhow::Result<Self> {
        let topology = Topology::start(&options.bin_dir, dir, knobs).await?;
        let shape = LoadShape {
            rate: options.rate,
            emitters: 4,
            packet_size: PACKET_SIZE,
        };
        let load = Load::start(&topology.distributor.url, shape, options.seed)?;
        Ok(Self {
            scenario,
            topology,
            load,
            notes: Vec::new(),
            failures: Vec::new(),
            destroyed: 0,
            damaged_window: None,
        })
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    /// Enable or disable every analyzer.
    async fn switch_all(&self, enabled: bool) -> anyhow::Result<()> {
        let verb = if enabled { "/enable" } else { "/disable" };
        for i in 0..self.topology.analyzers.len() {
            self.topology.analyzer_post(i, verb, None).await?;
        }
        Ok(())
    }

    /// Messages acknowledged by the distributor per analyzer, from its `GET /stats`.
    async fn acknowledged_by_analyzer(&self) -> anyhow::Result<Vec<u64>> {
        let stats = self.topology.distributor_json("/stats").await?;
        self.topology
            .analyzers
            .iter()
            .map(|a| {
                stats["acknowledged"]["by_analyzer"][&a.name]
                    .as_u64()
                    .with_context(|| format!("GET /stats has no count for {}", a.name))
            })
            .collect()
    }

    /// Heal every fault, stop the load (its packets in flight get acknowledged), wait for the WAL
    /// to drain, and compare acknowledged with processed.
    async fn finish(self) -> anyhow::Result<Row> {
        let Run {
            scenario,
            topology,
            load,
            notes,
            failures,
            destroyed,
            damaged_window,
        } = self;
        let done = Finished {
            scenario,
            topology,
            notes,
            failures,
            destroyed,
            damaged_window,
        };
        done.count(load).await
    }
}

/// A run whose faults are over: heals, drains and counts.
struct Finished {
    scenario: Scenario,
    topology: Topology,
    notes: Vec<String>,
    failures: Vec<String>,
    destroyed: u64,
    damaged_window: Option<HashSet<(String, String)>>,
}

impl Finished {
    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    async fn count(mut self, load: Load) -> anyhow::Result<Row> {
        if !self.topology.distributor.is_running() {
            self.topology.restart_distributor().await?;
        }
        self.topology.heal_analyzers().await?;
        let healed = Instant::now();
        let ledger = load.stop().await;
        let drained = self.topology.drain(DRAIN_TIMEOUT).await;
        let drain = match drained {
            Ok(_) => Some(healed.elapsed()),
            Err(e) => {
                self.fail(format!("no drain: {e:#}"));
                None
            }
        };
        let mut audits = Vec::new();
        for a in &self.topology.analyzers {
            let ids = fetch_audit(&self.topology.http, &a.url)
                .await
                .with_context(|| format!("cannot fetch {}'s audit", a.name))?;
            audits.push((a.name.clone(), ids));
        }
        let acknowledged: Vec<(String, String, u32)> = ledger
            .acknowledged_packets()
            .into_iter()
            .map(|p| (p.emitter_id, p.packet_id, p.count))
            .collect();
        let snapshot = ledger.snapshot();
        if snapshot.acknowledged_log_forgotten > 0 {
            self.fail("the emitters' acknowledged log overflowed: counts incomplete");
        }
        if snapshot.deadline_failures + snapshot.permanent_failures > 0 {
            self.note(format!(
                "{} packets never acknowledged ({} refused)",
                snapshot.deadline_failures + snapshot.permanent_failures,
                snapshot.permanent_failures
            ));
        }
        let report = verify_delivery(&acknowledged, &audits);
        self.topology.shutdown().await;
        let lost = report.lost.len() as u64;
        let mut unexplained = lost;
        if let Some(window) = &self.damaged_window {
            // What the scenario destroyed may be lost, but exactly what the distributor reported,
            // and only among the packets acknowledged before the damage.
            let outside = report
                .lost
                .iter()
                .filter(|id| !window.contains(&(id.emitter_id.clone(), id.packet_id.clone())))
                .count() as u64;
            if lost != self.destroyed {
                self.fail(format!(
                    "{lost} acknowledged messages lost but the distributor reported {} missing",
                    self.destroyed
                ));
            }
            if outside > 0 {
                self.fail(format!(
                    "{outside} messages lost that were acknowledged after the damage"
                ));
            }
            if lost == self.destroyed && outside == 0 {
                unexplained = 0;
            }
        }
        if unexplained > 0 {
            let first: Vec<String> = report
                .lost
                .iter()
                .take(3)
                .map(|id| id.to_string())
                .collect();
            self.fail(format!(
                "{} acknowledged messages lost, e.g. {}",
                report.lost.len(),
                first.join(", ")
            ));
        }
        if report.acknowledged_messages == 0 {
            self.fail("nothing was acknowledged: the load never ran");
        }
        Ok(Row {
            scenario: self.scenario.name(),
            acknowledged: report.acknowledged_messages,
            processed: report.processed_distinct,
            destroyed: if unexplained == 0 { lost } else { 0 },
            lost: report.lost.len() as u64,
            duplicates: report.duplicated_across_analyzers,
            drain,
            verdict: if self.failures.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail(self.failures)
            },
            notes: self.notes,
        })
    }
}

async fn distributor_kill(
    options: &Options,
    dir: &Path,
    rng: &mut SplitMix64,
) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::DistributorKill,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    let (mut early, mut backlog) = (0, 0);
    for cycle in 0..options.cycles {
        // Every third kill finds a backlog: with analyzers off, acknowledged messages exist only in
        // the WAL, so the restart must recover them (with analyzers on they are mostly delivered
        // within milliseconds of the acknowledgement).
        let with_backlog = cycle % 3 == 2;
        if with_backlog {
            backlog += 1;
            run.switch_all(false).await?;
        }
        // One kill in ten lands right after the restart, while the WAL is being recovered.
        let wait = if rng.below(10) == 0 {
            early += 1;
            millis(rng, 0, 50)
        } else {
            millis(rng, 100, 700)
        };
        sleep(wait).await;
        run.topology.distributor.kill().await?;
        run.topology.restart_distributor().await?;
        if with_backlog {
            run.switch_all(true).await?;
        }
    }
    run.note(format!(
        "{} SIGKILLs ({backlog} with analyzers off, {early} within 50 ms of a restart)",
        options.cycles
    ));
    run.finish().await
}

async fn distributor_term(
    options: &Options,
    dir: &Path,
    rng: &mut SplitMix64,
) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::DistributorTerm,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    let cycles = (options.cycles / 5).clamp(2, 20);
    let mut codes = Vec::new();
    for _ in 0..cycles {
        sleep(millis(rng, 300, 900)).await;
        let code = run.topology.distributor.terminate().await?;
        if code != Some(0) {
            run.fail(format!(
                "SIGTERM ended the distributor with {code:?}, not exit 0"
            ));
        }
        codes.push(code.map_or_else(|| "signal".to_owned(), |c| c.to_string()));
        run.topology.restart_distributor().await?;
    }
    run.note(format!("{cycles} SIGTERMs, exit codes {}", codes.join(",")));
    run.finish().await
}

async fn analyzer_kill(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::AnalyzerKill,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    let rounds = (options.cycles / 20).max(1);
    for _ in 0..rounds {
        for i in 0..run.topology.analyzers.len() {
            sleep(Duration::from_millis(600)).await;
            run.topology.analyzers[i].kill().await?;
            sleep(Duration::from_millis(800)).await;
            run.topology.restart_analyzer(i).await?;
        }
        sleep(Duration::from_millis(500)).await;
        for a in &mut run.topology.analyzers {
            a.kill().await?;
        }
        sleep(Duration::from_millis(1500)).await;
        for i in 0..run.topology.analyzers.len() {
            run.topology.restart_analyzer(i).await?;
        }
    }
    run.note(format!(
        "{rounds} round(s): each analyzer SIGKILLed for 0.8 s, then all three for 1.5 s"
    ));
    run.finish().await
}

async fn analyzer_flap(options: &Options, dir: &Path, rng: &mut SplitMix64) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::AnalyzerFlap,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    let mut enabled = vec![true; run.topology.analyzers.len()];
    let mut switches = 0;
    let until = Instant::now() + options.fault_duration;
    while Instant::now() < until {
        sleep(millis(rng, 150, 400)).await;
        let i = rng.below(enabled.len() as u64) as usize;
        enabled[i] = !enabled[i];
        let verb = if enabled[i] { "/enable" } else { "/disable" };
        run.topology.analyzer_post(i, verb, None).await?;
        switches += 1;
    }
    run.note(format!(
        "{switches} switches over {:.0} s",
        options.fault_duration.as_secs_f64()
    ));
    run.finish().await
}

/// The share of the acknowledged messages that went to analyzer `i` between two snapshots.
fn share(before: &[u64], after: &[u64], i: usize) -> f64 {
    let total: u64 = after.iter().zip(before).map(|(a, b)| a - b).sum();
    if total == 0 {
        return 0.0;
    }
    (after[i] - before[i]) as f64 / total as f64
}

async fn slow_analyzer(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let knobs = default_knobs(options, dir);
    let latency = knobs.timeout_ms + 500;
    let mut run = Run::start(Scenario::SlowAnalyzer, options, dir, knobs).await?;
    sleep(Duration::from_millis(500)).await;
    let before = run.acknowledged_by_analyzer().await?;
    run.topology
        .analyzer_post(0, "/faults", Some(&format!("{{\"latency_ms\":{latency}}}")))
        .await?;
    sleep(options.fault_duration).await;
    let after = run.acknowledged_by_analyzer().await?;
    let slow_share = share(&before, &after, 0);
    run.note(format!(
        "analyzer-1 answers after {latency} ms (timeout {} ms): its share of acknowledgements \
         while slow {:.1}% (weight 50%)",
        run.topology.knobs.timeout_ms,
        slow_share * 100.0
    ));
    if slow_share > 0.05 {
        run.fail(format!(
            "analyzer-1 still acknowledged {:.1}% while slower than the timeout",
            slow_share * 100.0
        ));
    }
    run.finish().await
}

async fn partial_failure(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::PartialFailure,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    sleep(Duration::from_millis(500)).await;
    let before = run.acknowledged_by_analyzer().await?;
    run.topology
        .analyzer_post(1, "/faults", Some("{\"error_rate\":0.3}"))
        .await?;
    sleep(options.fault_duration).await;
    let after = run.acknowledged_by_analyzer().await?;
    run.note(format!(
        "analyzer-2 answers 500 to 30% of requests; shares meanwhile {:.0}/{:.0}/{:.0}%",
        share(&before, &after, 0) * 100.0,
        share(&before, &after, 1) * 100.0,
        share(&before, &after, 2) * 100.0
    ));
    run.finish().await
}

/// The answer to one packet posted straight to the distributor.
struct Probed {
    status: u16,
    retry_after: Option<String>,
    /// The JSON `error`, if any.
    error: Option<String>,
}

/// POST one packet straight to the distributor; a 2xx is recorded in the ledger like any other
/// acknowledgement.
async fn probe_packet(run: &Run, generator: &mut Generator) -> anyhow::Result<Probed> {
    let packet = generator.next_packet("emitter-probe", PACKET_SIZE);
    let url = format!("{}/logs", run.topology.distributor.url);
    let answer = run
        .topology
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&packet)?)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = answer.status().as_u16();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = answer.bytes().await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if (200..300).contains(&status) {
        run.load.ledger.record_sent(PACKET_SIZE);
        run.load.ledger.record_acknowledged(
            &packet.emitter_id,
            &packet.packet_id,
            PACKET_SIZE,
            false,
        );
    }
    Ok(Probed {
        status,
        retry_after,
        error: body["error"].as_str().map(str::to_owned),
    })
}

/// Probe every 100 ms until an answer's status satisfies `wanted`, or `within` passes (`None`).
async fn probe_until(
    run: &Run,
    generator: &mut Generator,
    within: Duration,
    wanted: impl Fn(u16) -> bool,
) -> anyhow::Result<Option<Probed>> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let probed = probe_packet(run, generator).await?;
        if wanted(probed.status) {
            return Ok(Some(probed));
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
}

async fn all_down(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let bound = (options.rate * 2).max(2_000);
    let knobs = DistributorKnobs {
        max_pending_messages: bound,
        ..default_knobs(options, dir)
    };
    let mut run = Run::start(Scenario::AllDown, options, dir, knobs).await?;
    run.switch_all(false).await?;
    let mut generator = Generator::new(crate::generate::new_run_id(), options.seed);
    let within = Duration::from_secs(30) + options.fault_duration;
    match probe_until(&run, &mut generator, within, |status| status == 503).await? {
        None => run.fail(format!("no 503 although the WAL bound is {bound} messages")),
        Some(Probed {
            retry_after, error, ..
        }) => {
            if retry_after.is_none() {
                run.fail("503 without Retry-After");
            }
            if error.is_none() {
                run.fail("503 without a JSON error");
            }
            let pending = run.topology.pending().await?;
            run.note(format!(
                "all analyzers disabled: WAL filled to {pending}/{bound} messages, then 503 \
                 (Retry-After {}: {})",
                retry_after.unwrap_or_default(),
                error.unwrap_or_default()
            ));
        }
    }
    // Emitters keep retrying against the full WAL for a while.
    sleep(options.fault_duration / 2).await;
    run.finish().await
}

/// A tmpfs mounted for the scenario, unmounted when dropped.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size_mb: u64) -> Result<Self, String> {
        std::fs::create_dir_all(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fill the filesystem of `path` with a file until a write fails for lack of space.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => return Err(e).context("cannot fill the disk"),
        }
    }
    Ok(written)
}

async fn disk_full(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let mount_point = dir.join("wal-fs");
    let mount = match TmpfsMount::mount(&mount_point, 64) {
        Ok(m) => m,
        Err(why) => {
            return Ok(Row::without_counts(
                Scenario::DiskFull.name(),
                Verdict::Skip(why),
            ))
        }
    };
    let knobs = DistributorKnobs {
        data_dir: mount_point.join("wal"),
        ..default_knobs(options, dir)
    };
    let mut run = Run::start(Scenario::DiskFull, options, dir, knobs).await?;
    sleep(Duration::from_millis(500)).await;
    let filler = mount_point.join("filler");
    let filled = fill(&filler)?;
    let mut generator = Generator::new(crate::generate::new_run_id(), options.seed);
    let refused = probe_until(&run, &mut generator, Duration::from_secs(30), |status| {
        status == 507 || status == 503
    })
    .await?;
    match refused {
        None => run.fail("the disk is full but ingestion never answered 507/503"),
        Some(Probed { status, error, .. }) => run.note(format!(
            "disk filled ({} MiB filler): {status} \"{}\"",
            filled >> 20,
            error.unwrap_or_default()
        )),
    }
    sleep(options.fault_duration / 2).await;
    if !run.topology.distributor.is_running() {
        bail!("the distributor is gone after the disk filled");
    }
    std::fs::remove_file(&filler).context("cannot remove the filler")?;
    let freed = Instant::now();
    let resumed = probe_until(&run, &mut generator, Duration::from_secs(30), |status| {
        (200..300).contains(&status)
    })
    .await?;
    if resumed.is_some() {
        run.note(format!(
            "space freed: accepting again after {:.1} s, same process",
            freed.elapsed().as_secs_f64()
        ));
    } else {
        run.fail("ingestion did not resume within 30 s of space returning");
    }
    let row = run.finish().await;
    drop(mount);
    row
}

async fn torn_wal(options: &Options, dir: &Path, rng: &mut SplitMix64) -> anyhow::Result<Row> {
    let knobs = default_knobs(options, dir);
    let db = knobs.data_dir.join("db");
    let mut run = Run::start(Scenario::TornWal, options, dir, knobs).await?;
    // Analyzers off: everything acknowledged stays pending, so the damaged file holds it.
    run.switch_all(false).await?;

    // 1. A crash in the middle of a write: garbage after the log's last entry. Nothing flushed
    //    may be lost.
    sleep(options.fault_duration / 2).await;
    run.topology.distributor.kill().await?;
    let garbage: Vec<u8> = (0..4096 + rng.below(8192))
        .map(|_| rng.next_u64() as u8)
        .collect();
    let len = file_len(&db)?;
    append(&db, &garbage)?;
    run.topology.restart_distributor().await?;
    let stats = run.topology.distributor_json("/stats").await?;
    run.note(format!(
        "SIGKILL, {} bytes of garbage after the {len}-byte log: restarted with {} pending \
         messages (sled_open {})",
        garbage.len(),
        stats["recovery"]["messages"],
        stats["recovery"]["sled_open"]
    ));

    // 2. The log's tail cut while stopped: what was there is destroyed, and must be reported.
    sleep(options.fault_duration / 2).await;
    let code = run.topology.distributor.terminate().await?;
    if code != Some(0) {
        run.fail(format!("SIGTERM ended the distributor with {code:?}"));
    }
    run.damaged_window = Some(
        run.load
            .ledger
            .acknowledged_packets()
            .into_iter()
            .map(|p| (p.emitter_id, p.packet_id))
            .collect(),
    );
    let len = file_len(&db)?;
    let cut = (len / 8).clamp(4096, 256 * 1024).min(len);
    truncate(&db, len - cut)?;
    let restart = match run.topology.restart_distributor().await {
        Ok(()) => "restarted".to_owned(),
        Err(refused) => {
            // The documented way out of a WAL sled cannot open.
            run.topology
                .restart_distributor_with(&["--recover"])
                .await?;
            format!("refused ({refused:#}), then started with --recover")
        }
    };
    let stats = run.topology.distributor_json("/stats").await?;
    let recovery = &stats["recovery"];
    let missing = recovery["missing_since_clean_stop"]["messages"].as_u64();
    match missing {
        Some(n) => run.destroyed = n,
        None => run.fail(format!(
            "no `missing_since_clean_stop` after a clean stop: {recovery}"
        )),
    }
    run.note(format!(
        "SIGTERM, last {cut} of {len} bytes cut: {restart}, reports {} messages missing, \
         {} quarantined records",
        missing.unwrap_or_default(),
        recovery["quarantined_records"]
    ));
    run.finish().await
}

fn file_len(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("no sled log at {}", path.display()))?
        .len())
}

fn append(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("cannot append to {}", path.display()))
}

fn truncate(path: &Path, len: u64) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("cannot truncate {}", path.display()))
}

async fn bad_input(options: &Options, dir: &Path) -> anyhow::Result<Row> {
    let mut run = Run::start(
        Scenario::BadInput,
        options,
        dir,
        default_knobs(options, dir),
    )
    .await?;
    sleep(Duration::from_millis(500)).await;
    let outcomes = badinput::run_all(
        &run.topology.http,
        &run.topology.distributor.url,
        Duration::from_millis(run.topology.knobs.body_timeout_ms),
    )
    .await;
    let mut refused = 0;
    for outcome in &outcomes {
        match &outcome.problem {
            None => refused += 1,
            Some(problem) => run.fail(format!("{}: {problem}", outcome.case)),
        }
    }
    run.note(format!(
        "{refused}/{} bad requests refused as expected",
        outcomes.len()
    ));
    run.finish().await
}
