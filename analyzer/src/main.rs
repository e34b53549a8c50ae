//! `analyzer` binary: flags and settings, tracing, bind, then [`analyzer::run`] until SIGTERM or
//! Ctrl-C. Everything else lives in the library so tests can run the real server.

use anyhow::Context;
use clap::Parser;
use logdist_config::{AnalyzerSettings, CommonFlags};
use serde::Serialize;
use std::path::PathBuf;

/// Receives batches of log messages, processes each message once per identity and keeps bounded
/// statistics. Settings are layered: defaults, then the TOML file, then `ANALYZER_*` environment
/// variables (e.g. `ANALYZER_ID`, `ANALYZER_DEDUP_CAPACITY_PACKETS`), then these flags.
///
/// For fault-injection tests: `POST /faults` with `{"latency_ms": N, "error_rate": R}` delays
/// every `POST /analyze` by N ms and answers 500 (recording nothing) for exactly a fraction R of
/// them (deterministically: at 0.5 every second one). `GET /faults` shows, `DELETE /faults` or
/// `{}` clears them; `/health` is never affected. With `--audit-log` a SIGKILLed analyzer
/// remembers, after a restart, the messages it acknowledged.
#[derive(Debug, Parser)]
#[command(name = "analyzer", version)]
struct Args {
    /// TOML settings file [default: config/analyzer.toml if it exists in the working directory].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Name of this analyzer, as the distributor's config refers to it (overrides `id`).
    #[arg(long)]
    id: Option<String>,
    /// Address to listen on (overrides `host`).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one (overrides `port`).
    #[arg(long)]
    port: Option<u16>,
    /// Append-only audit log (overrides `audit_log`, env `ANALYZER_AUDIT_LOG`). Every message is
    /// listed in it before its 200 is sent; at start the file is replayed, so that the messages
    /// are still recognised as duplicates and listed by `/audit` after a restart, even after a
    /// SIGKILL. Only identities are restored (they count in `processed` and `restored`), not the
    /// level, emitter or template statistics. A torn last line (a kill mid-write) is dropped with
    /// a warning; any other unparsable line stops the start. Not fsynced: survives a process
    /// kill, not a power loss. Never compacted. Created if missing.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Register with the distributor at this base URL at start (`PUT /admin/analyzers/{id}`,
    /// retried until it answers) and deregister on SIGTERM/Ctrl-C (`DELETE`, which waits for the
    /// distributor to drain what it sent here) (overrides `register_url`).
    #[arg(long, value_name = "URL")]
    register_url: Option<String>,
    /// The URL the distributor should reach this analyzer at [default: http://<bound address>]
    /// (overrides `advertise_url`).
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Weight to register with [default: keep the distributor's, 1.0 for a new analyzer]
    /// (overrides `register_weight`).
    #[arg(long, value_name = "W")]
    register_weight: Option<f64>,
    /// Health check only: GET this URL, exit 0 on a 2xx, 1 otherwise (for container health
    /// checks; the images carry no curl).
    #[arg(long, value_name = "URL")]
    probe: Option<String>,
}

/// The flags layer of the settings; unset flags leave the lower layers' values.
#[derive(Serialize)]
struct Flags {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_log: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    register_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    register_weight: Option<f64>,
    #[serde(flatten)]
    common: CommonFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.probe {
        let ok = logdist_proto::probe::http_get_ok(url, std::time::Duration::from_secs(2));
        std::process::exit(if ok { 0 } else { 1 });
    }
    // stdout carries exactly one line, `listening on <addr>`, for whoever started us.
    logdist_config::init_logging();

    let file = args
        .config
        .or_else(|| logdist_config::default_file("analyzer"));
    let flags = Flags {
        id: args.id,
        audit_log: args.audit_log,
        register_url: args.register_url,
        advertise_url: args.advertise_url,
        register_weight: args.register_weight,
        common: CommonFlags {
            host: args.host,
            port: args.port,
        },
    };
    let settings: AnalyzerSettings = logdist_config::load(file.as_deref(), "ANALYZER_", &flags)
        .context("cannot load settings")?;
    let listener = std::net::TcpListener::bind((settings.host.as_str(), settings.port))
        .with_context(|| format!("cannot bind {}:{}", settings.host, settings.port))?;
    let addr = listener
        .local_addr()
        .context("bound listener has no address")?;
    println!("listening on {addr}");

    analyzer::run(listener, settings, shutdown_signal()).await
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
