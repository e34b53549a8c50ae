use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use logdist_config::{CommonFlags, DistributorSettings};
use serde::Serialize;

/// logdist distributor: accepts log packets on POST /logs, stores them durably in a sled WAL
/// before acknowledging, and delivers them to analyzers by weight.
///
/// Settings come from built-in defaults, then the TOML file, then DISTRIBUTOR_* environment
/// variables (`__` for nesting, e.g. DISTRIBUTOR_WAL__FSYNC=false), then these flags.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// TOML settings file [default: config/distributor.toml if it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (e.g. 0.0.0.0 in a container)
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one (printed on stdout)
    #[arg(long)]
    port: Option<u16>,
    /// Directory of the WAL; reused on restart
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Health check only: GET this URL, exit 0 on a 2xx, 1 otherwise (for container health
    /// checks; the images carry no curl)
    #[arg(long, value_name = "URL")]
    probe: Option<String>,
    /// If the WAL in the data directory is damaged so that it cannot be opened: retry without
    /// sled's snapshot files (renamed, not deleted); if that fails too, move the directory to
    /// <data_dir>.corrupt-<unix-ms> and start with an empty WAL, whose pending messages are then
    /// NOT delivered. Without this flag the distributor refuses to start over a damaged WAL. Has
    /// no effect on a WAL that opens.
    #[arg(long)]
    recover: bool,
    /// Use the config file's `analyzers` even if the admin API stored another set in the data
    /// directory (by default a stored set wins: runtime changes survive restarts). The stored set
    /// is replaced at the next admin change.
    #[arg(long)]
    reset_analyzers: bool,
}

#[derive(Serialize)]
struct Flags {
    #[serde(flatten)]
    common: CommonFlags,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(url) = &cli.probe {
        let ok = logdist_proto::probe::http_get_ok(url, std::time::Duration::from_secs(2));
        std::process::exit(if ok { 0 } else { 1 });
    }
    let file = cli
        .config
        .or_else(|| logdist_config::default_file("distributor"));
    let flags = Flags {
        common: CommonFlags {
            host: cli.host,
            port: cli.port,
        },
        data_dir: cli.data_dir,
    };
    let settings: DistributorSettings =
        logdist_config::load(file.as_deref(), "DISTRIBUTOR_", &flags)?;
    logdist_config::init_logging();
    let listener = TcpListener::bind((settings.host.as_str(), settings.port))
        .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
    listener.set_nonblocking(true)?;
    println!("listening on {}", listener.local_addr()?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(distributor::run_with(
            listener,
            settings,
            distributor::RunOptions {
                recover_damaged_wal: cli.recover,
                reset_analyzers: cli.reset_analyzers,
            },
            distributor::telemetry::shutdown_signal(),
        ))
}
