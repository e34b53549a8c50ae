//! `emitter`: parses flags, sets up logging, and calls into the library. No logic lives here.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use emitter::generate::{emitter_id, Generator};
use emitter::verify;
use emitter::{DistributorClient, Ledger};
use logdist_config::{CommonFlags, EmitterSettings};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Generates log packets for a logdist distributor, sends each until acknowledged, and verifies
/// delivery and weighted distribution.
///
/// Without a subcommand it runs `serve`.
#[derive(Debug, Parser)]
#[command(name = "emitter", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the emitter's HTTP API (POST /generate, /start, /stop; GET /stats, /acknowledged).
    ///
    /// Prints one line `listening on <addr>` on stdout, logs on stderr, and runs until SIGTERM or
    /// Ctrl-C. Settings: defaults, then the config file, then EMITTER_* variables, then flags.
    Serve(ServeArgs),
    /// Send N messages once, each packet retried until acknowledged, and print a summary.
    ///
    /// Exit code 1 if any packet was refused for good.
    Send(SendArgs),
    /// Check that each analyzer's share of processed messages matches its weight.
    ///
    /// Weights and endpoints come from the distributor's GET /health (endpoints can be overridden
    /// with --analyzer); counts from each analyzer's GET /processed. Exit code 1 if a share is
    /// beyond the tolerance, 2 if something could not be fetched.
    VerifyWeights(VerifyWeightsArgs),
    /// Check that every message the distributor acknowledged reached an analyzer.
    ///
    /// Compares the emitter's GET /acknowledged with every analyzer's GET /audit. Exit code 1 if an
    /// acknowledged message is missing from every audit, 2 if something could not be fetched.
    VerifyDelivery(VerifyDeliveryArgs),
    /// Fault-injection suite: run scenarios against a real topology and count every message.
    ///
    /// Each scenario starts three analyzers and a distributor from --bin-dir in its own directory,
    /// emits continuously, injects its fault (kills, SIGTERM, flapping, latency, 500s, all
    /// analyzers down, a full disk, a torn WAL, bad requests), heals, drains, and compares what
    /// was acknowledged with every analyzer's GET /audit. Prints one markdown table on stdout.
    /// Exit code 1 if an acknowledged message was lost or a scenario's check failed.
    CrashTest(CrashTestArgs),
    /// Load generator: measure acknowledged and delivered throughput and ack latency.
    ///
    /// Sends packets over --connections concurrent requests for --duration, each once (never
    /// retried), and counts what came back. Closed loop without --rate (each connection sends its
    /// next packet when the previous one was answered: finds the maximum); open loop with --rate
    /// (packets are due at a fixed rate whatever the answers; latency counts from when a packet was
    /// due). Prints packets and messages acknowledged per second, ack latency p50/p90/p99/p99.9/max
    /// (HDR histogram), non-2xx answers by status, messages each analyzer processed, and the time
    /// the WAL took to drain. A progress line goes to stderr every second.
    Bench(BenchArgs),
    /// Health check only: GET the URL, exit 0 on a 2xx, 1 otherwise (for container health checks;
    /// the images carry no curl).
    Probe {
        /// e.g. http://127.0.0.1:8080/health
        url: String,
    },
}

#[derive(Debug, Args, Default)]
struct SettingsArgs {
    /// TOML settings file (default: config/emitter.toml if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Base URL of the distributor, e.g. http://127.0.0.1:8081.
    #[arg(long, value_name = "URL")]
    distributor_url: Option<String>,
}

#[derive(Debug, Args, Default)]
struct ServeArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Address to listen on.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Number of messages to send.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Messages per packet (default: messages_per_packet from the settings, 50).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    packet_size: Option<u32>,
    /// Packets in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Give up on a packet after this many seconds without an acknowledgement (default: never).
    #[arg(long, value_name = "SECS")]
    deadline: Option<u64>,
    /// How progress is shown on stderr: a bar redrawn in place (`bar`; what `auto` picks when
    /// stderr is a terminal), one line a second (`lines`; `auto` otherwise), or nothing (`off`).
    #[arg(long, value_enum, default_value_t = emitter::progress::Mode::Auto)]
    progress: emitter::progress::Mode,
}

#[derive(Debug, Args)]
struct VerifyWeightsArgs {
    /// Base URL of the distributor, whose GET /health lists analyzers and weights.
    #[arg(long, value_name = "URL")]
    distributor: String,
    /// Use this endpoint for analyzer ID instead of the one /health reports (repeatable).
    #[arg(long, value_name = "ID=URL", value_parser = parse_analyzer_override)]
    analyzer: Vec<(String, String)>,
    /// Largest accepted |share - expected|, in percentage points.
    #[arg(long, default_value_t = 1.0)]
    tolerance: f64,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("analyzers").required(true).multiple(true).args(["analyzer", "distributor"])))]
struct VerifyDeliveryArgs {
    /// Base URL of the emitter whose GET /acknowledged is checked.
    #[arg(long, value_name = "URL")]
    emitter: String,
    /// An analyzer's base URL, optionally as ID=URL (repeatable).
    #[arg(long, value_name = "URL")]
    analyzer: Vec<String>,
    /// Discover analyzer endpoints from this distributor's GET /health.
    #[arg(long, value_name = "URL")]
    distributor: Option<String>,
}

#[derive(Debug, Args)]
struct CrashTestArgs {
    /// Scenario to run (repeatable); `all` runs every one.
    #[arg(long, value_name = "NAME|all", default_value = "all", value_parser = parse_scenario)]
    scenario: Vec<ScenarioChoice>,
    /// SIGKILL cycles of distributor-kill; the other kill scenarios scale with it.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    cycles: u32,
    /// How long each timed fault (flapping, latency, errors, outage) lasts, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 4.0)]
    fault_secs: f64,
    /// Emission rate over all emitters, messages per second.
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    rate: u64,
    /// Directory with the distributor and analyzer binaries [default: this binary's directory].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Scratch directory; each scenario uses (and first empties) a subdirectory.
    #[arg(long, value_name = "DIR", default_value = ".run/crash-test")]
    work_dir: PathBuf,
    /// Seed of the random choices (kill moments, flapping); printed, so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Run the distributor with `wal.fsync = false` to see the suite catch lost acknowledged
    /// messages (a check of the checker; never for real use).
    #[arg(long, hide = true)]
    break_durability: bool,
    /// Also write the table to this file.
    #[arg(long, value_name = "FILE")]
    table: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Base URL of the distributor (or of the proxy, with --proxy).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8081")]
    target: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    connections: u16,
    /// Messages per packet.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    packet_size: u32,
    /// Approximate size of each message's JSON, in bytes (at least ~70 are needed for its fields).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    message_bytes: u64,
    /// How long to offer load, e.g. 20s, 500ms, 2m (a bare number is seconds).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Open loop at this many MESSAGES per second (packets/s = rate / packet size).
    #[arg(long, value_name = "MSGS_PER_SEC")]
    rate: Option<f64>,
    /// Stop after sending this many messages (also bounded by --duration).
    #[arg(long, value_name = "N")]
    messages: Option<u64>,
    /// The target is a plain HTTP proxy in front of the analyzers: POST {target}/analyze with
    /// each packet wrapped as an analyzer batch, and no /queue to drain.
    #[arg(long)]
    proxy: bool,
    /// Analyzer base URL whose GET /processed is counted (repeatable). Default: the analyzers
    /// the distributor's GET /health lists.
    #[arg(long, value_name = "URL")]
    analyzer: Vec<String>,
    /// After the load, wait at most this long for the WAL to drain (0 = do not wait).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Also report CPU seconds and peak RSS of this process (e.g. the distributor's pid).
    #[arg(long, value_name = "PID")]
    watch_pid: Option<u32>,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// `20s`, `500ms`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0 && *v * scale < 1e9)
        .map(|v| Duration::from_secs_f64(v * scale))
        .ok_or_else(|| format!("expected a duration such as 20s, 500ms or 2m, got {s:?}"))
}

#[derive(Debug, Clone, Copy)]
enum ScenarioChoice {
    All,
    One(emitter::crashtest::Scenario),
}

fn parse_scenario(s: &str) -> Result<ScenarioChoice, String> {
    use clap::ValueEnum;
    if s == "all" {
        return Ok(ScenarioChoice::All);
    }
    emitter::crashtest::Scenario::from_str(s, false)
        .map(ScenarioChoice::One)
        .map_err(|_| {
            let names: Vec<&str> = emitter::crashtest::Scenario::ALL
                .iter()
                .map(|s| s.name())
                .collect();
            format!(
                "unknown scenario {s:?}; expected all or one of {}",
                names.join(", ")
            )
        })
}

/// Flags merged last over the file and environment; unset flags leave lower layers alone.
#[derive(Debug, Default, Serialize)]
struct SettingsFlags {
    #[serde(flatten)]
    common: CommonFlags,
    #[serde(skip_serializing_if = "Option::is_none")]
    distributor_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages_per_packet: Option<u32>,
}

fn parse_analyzer_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, url)) if !id.is_empty() && !url.is_empty() => Ok((id.to_owned(), url.to_owned())),
        _ => Err(format!("expected ID=URL, got {s:?}")),
    }
}

/// `ID=URL` or a bare URL (then the URL is its id).
fn split_analyzer(s: &str) -> (String, String) {
    match s.split_once('=') {
        Some((id, url)) if !id.contains("://") => (id.to_owned(), url.to_owned()),
        _ => (s.to_owned(), s.to_owned()),
    }
}

fn load_settings(args: &SettingsArgs, flags: SettingsFlags) -> anyhow::Result<EmitterSettings> {
    let file = args
        .config
        .clone()
        .or_else(|| logdist_config::default_file("emitter"));
    let flags = SettingsFlags {
        distributor_url: args.distributor_url.clone(),
        ..flags
    };
    Ok(logdist_config::load::<EmitterSettings, _>(
        file.as_deref(),
        "EMITTER_",
        &flags,
    )?)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe { url }) = &cli.command {
        let ok = logdist_proto::probe::http_get_ok(url, std::time::Duration::from_secs(2));
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    // stderr: stdout carries only the results (and `listening on`).
    logdist_config::init_logging();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let fetching = matches!(
        command,
        Command::VerifyWeights(_) | Command::VerifyDelivery(_)
    );
    let outcome = match command {
        Command::Serve(args) => serve(args).await,
        Command::Send(args) => send(args).await,
        Command::VerifyWeights(args) => verify_weights(args).await,
        Command::VerifyDelivery(args) => verify_delivery(args).await,
        Command::CrashTest(args) => crash_test(args).await,
        Command::Bench(args) => bench(args).await,
        Command::Probe { .. } => Ok(ExitCode::SUCCESS),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if fetching { 2 } else { 1 })
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let flags = SettingsFlags {
        common: CommonFlags {
            host: args.host.clone(),
            port: args.port,
        },
        ..SettingsFlags::default()
    };
    let settings = load_settings(&args.settings, flags)?;
    let address = format!("{}:{}", settings.host, settings.port);
    let listener =
        std::net::TcpListener::bind(&address).with_context(|| format!("binding {address}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    println!("listening on {local}");
    std::io::stdout().flush().context("writing to stdout")?;
    emitter::run(listener, settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of messages per second, got {rate}"
        );
    }
    let opts = emitter::bench::BenchOptions {
        target: args.target,
        connections: usize::from(args.connections),
        packet_size: args.packet_size,
        message_bytes: args.message_bytes as usize,
        duration: args.duration,
        rate: args.rate,
        max_messages: args.messages,
        proxy: args.proxy,
        analyzers: args.analyzer,
        drain_timeout: args.drain_timeout,
        watch_pid: args.watch_pid,
        request_timeout: args.request_timeout,
        progress: !args.quiet,
    };
    let report = emitter::bench::run(&opts).await?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let flags = SettingsFlags {
        messages_per_packet: args.packet_size,
        ..SettingsFlags::default()
    };
    let settings = load_settings(&args.settings, flags)?;
    let ledger = Arc::new(Ledger::new(0));
    let client = DistributorClient::from_settings(&settings, ledger.retry_counter())
        .context("building the HTTP client")?;

    let size = u64::from(settings.messages_per_packet);
    let emitters = settings.emitters.max(1);
    let total = args.count;
    let mut generator = Generator::for_this_run();
    let packets = (0..total.div_ceil(size)).map(move |n| {
        let messages = (total - n * size).min(size) as u32;
        let emitter = emitter_id((n % u64::from(emitters)) as u32 + 1);
        generator.next_packet(&emitter, messages)
    });
    eprintln!(
        "sending {total} messages in packets of {size} to {}",
        client.logs_url()
    );

    let mode = args.progress.resolve();
    let progress = tokio::spawn(report_progress(Arc::clone(&ledger), total, mode));
    let summary = emitter::sender::send_all(
        &client,
        &ledger,
        packets,
        usize::from(args.concurrency),
        args.deadline.map(Duration::from_secs),
    )
    .await;
    progress.abort();
    if mode == emitter::progress::Mode::Bar {
        // The last frame, complete, then leave the line to the summary.
        let s = ledger.snapshot();
        let secs = (summary.elapsed_ms as f64 / 1000.0).max(0.001);
        let frame = emitter::progress::frame(
            s.messages_acknowledged,
            total,
            s.messages_acknowledged as f64 / secs,
            s.retries,
            30,
        );
        let mut err = std::io::stderr();
        let _ = emitter::progress::draw(&mut err, mode, &frame);
        eprintln!();
    }

    let retries = ledger.snapshot().retries;
    let secs = (summary.elapsed_ms as f64 / 1000.0).max(0.001);
    println!(
        "sent {} messages in {} packets: {} acknowledged ({} duplicate acks), {} packets failed, {} retries, {:.1} s, {:.0} msg/s",
        summary.messages,
        summary.packets,
        summary.acknowledged_messages,
        summary.duplicate_acks,
        summary.failed,
        retries,
        secs,
        summary.acknowledged_messages as f64 / secs
    );
    if let Some(error) = &summary.error {
        eprintln!("first error: {error}");
    }
    Ok(if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A progress line on stderr every second.
/// Redraw the progress every period until aborted; the rate is over the last second or so.
async fn report_progress(ledger: Arc<Ledger>, total: u64, mode: emitter::progress::Mode) {
    if mode == emitter::progress::Mode::Off {
        return;
    }
    let period = mode.period();
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    let mut last = 0;
    let mut per_sec = 0.0;
    loop {
        ticker.tick().await;
        let s = ledger.snapshot();
        let now = s.messages_acknowledged as f64 - last as f64;
        // Smoothed over about a second whatever the period.
        let alpha = period.as_secs_f64().min(1.0);
        per_sec = per_sec * (1.0 - alpha) + now / period.as_secs_f64() * alpha;
        last = s.messages_acknowledged;
        let frame = emitter::progress::frame(last, total, per_sec, s.retries, 30);
        let _ = emitter::progress::draw(&mut std::io::stderr(), mode, &frame);
    }
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(300))
        .build()
        .context("building the HTTP client")
}

async fn verify_weights(args: VerifyWeightsArgs) -> anyhow::Result<ExitCode> {
    let http = http_client()?;
    let analyzers = verify::fetch_analyzers(&http, &args.distributor).await?;
    let mut weights = Vec::new();
    let mut observed = Vec::new();
    for a in &analyzers {
        let endpoint = args
            .analyzer
            .iter()
            .find(|(id, _)| *id == a.id)
            .map_or(a.endpoint.as_str(), |(_, url)| url.as_str());
        // A disabled analyzer gets no new messages: it is expected at 0 %.
        weights.push((a.id.clone(), if a.enabled { a.weight } else { 0.0 }));
        let processed = verify::fetch_processed(&http, endpoint).await?;
        observed.push((a.id.clone(), processed.processed));
    }
    for (id, _) in &args.analyzer {
        if !analyzers.iter().any(|a| a.id == *id) {
            anyhow::bail!("--analyzer {id}: the distributor lists no analyzer with that id");
        }
    }
    let report = verify::verify_weights(&observed, &weights, args.tolerance);
    print!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn crash_test(args: CrashTestArgs) -> anyhow::Result<ExitCode> {
    use emitter::crashtest::{self, Scenario};
    let mut scenarios = Vec::new();
    for choice in &args.scenario {
        match choice {
            ScenarioChoice::All => scenarios.extend(Scenario::ALL),
            ScenarioChoice::One(s) => scenarios.push(*s),
        }
    }
    scenarios.dedup();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("cannot find this binary's path")?
            .parent()
            .context("this binary has no directory")?
            .to_owned(),
    };
    for name in ["distributor", "analyzer"] {
        let path = bin_dir.join(name);
        if !path.is_file() {
            anyhow::bail!(
                "no {name} binary at {} (build with `cargo build --release`, or pass --bin-dir)",
                path.display()
            );
        }
    }
    if !(args.fault_secs.is_finite() && args.fault_secs > 0.0 && args.fault_secs <= 3600.0) {
        anyhow::bail!(
            "--fault-secs must be within (0, 3600], got {}",
            args.fault_secs
        );
    }
    let seed = args.seed.unwrap_or_else(emitter::generate::now_ms);
    let options = crashtest::Options {
        bin_dir,
        work_dir: std::path::absolute(&args.work_dir).context("bad --work-dir")?,
        cycles: args.cycles,
        fault_duration: Duration::from_secs_f64(args.fault_secs),
        rate: args.rate,
        break_durability: args.break_durability,
        seed,
    };
    eprintln!(
        "crash-test: {} scenario(s), seed {seed}, {} cycles, faults of {} s, {} msg/s, in {}",
        scenarios.len(),
        options.cycles,
        args.fault_secs,
        options.rate,
        options.work_dir.display()
    );
    let rows = crashtest::run(&options, &scenarios).await;
    let table = crashtest::Table(&rows).to_string();
    println!("{table}");
    if let Some(path) = &args.table {
        std::fs::write(path, format!("{table}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if rows.iter().all(crashtest::Row::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn verify_delivery(args: VerifyDeliveryArgs) -> anyhow::Result<ExitCode> {
    let http = http_client()?;
    let mut endpoints: Vec<(String, String)> =
        args.analyzer.iter().map(|s| split_analyzer(s)).collect();
    if let Some(distributor) = &args.distributor {
        for a in verify::fetch_analyzers(&http, distributor).await? {
            if !endpoints
                .iter()
                .any(|(id, url)| *id == a.id || *url == a.endpoint)
            {
                endpoints.push((a.id, a.endpoint));
            }
        }
    }
    let acknowledged = verify::fetch_acknowledged(&http, &args.emitter).await?;
    let mut audits = Vec::with_capacity(endpoints.len());
    for (id, url) in endpoints {
        let ids = verify::fetch_audit(&http, &url).await?;
        audits.push((id, ids));
    }
    let report = verify::verify_delivery(&acknowledged, &audits);
    print!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
