//! `emitter bench`: a load generator that measures how many messages the distributor acknowledges
//! per second, how fast, and how many reach the analyzers.
//!
//! Unlike [`crate::sender`], it never retries: every request is sent once and its answer counted
//! (acknowledged, or a non-2xx by status, or a transport error), so the figures describe the server
//! and not the client's patience.
//!
//! Two ways to offer load:
//! * **closed loop** (no `rate`): each of `connections` workers sends its next packet as soon as
//!   the previous one was answered. This finds the maximum throughput; latency is per request.
//! * **open loop** (`rate` messages/s): packet `i` is *due* at `start + i / packets_per_second`,
//!   whatever happened before. A free worker takes the next due packet and latency is measured
//!   from the moment it was due, not from when it was sent, so a server that stalls is charged for
//!   the queue it causes (no "coordinated omission"). With all workers busy, due packets wait.
//!
//! Packets are built once per request from a template (only the packet id changes), so the
//! generator spends its CPU on HTTP, not on making JSON. With `proxy`, each packet is wrapped in
//! the analyzers' batch shape (`{"packets":[...]}`) so that a plain HTTP proxy in front of the
//! analyzers (the nginx baseline of `scripts/bench.sh`) can forward it unchanged.
//!
//! At the end it reports what each analyzer processed during the run (from each analyzer's
//! `GET /processed`), waits for the distributor's WAL to drain (`GET /queue`) and reports that too,
//! and, with `watch_pid`, the CPU time and peak RSS of one process (read from `/proc`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix_web::web::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::generate::{new_run_id, now_ms};
use crate::verify;

/// Longest latency the histogram records exactly (longer ones are clamped to it), in µs.
const MAX_LATENCY_US: u64 = 120_000_000;

/// What to send, how, and what else to watch.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL of the distributor (or of the proxy with `proxy`).
    pub target: String,
    /// Requests in flight at once (one per worker).
    pub connections: usize,
    /// Messages per packet.
    pub packet_size: u32,
    /// Approximate size of each message's JSON object, in bytes.
    pub message_bytes: usize,
    /// How long to offer load.
    pub duration: Duration,
    /// Open loop at this many messages per second; closed loop when `None`.
    pub rate: Option<f64>,
    /// Stop after this many messages were sent (e.g. to fill a backlog of an exact size).
    pub max_messages: Option<u64>,
    /// The target is a plain proxy to analyzers: send the analyzers' batch shape and do not ask it
    /// for `/queue`.
    pub proxy: bool,
    /// Analyzer base URLs whose `/processed` counts are reported. Empty: discovered from the
    /// distributor's `GET /health` (not with `proxy`).
    pub analyzers: Vec<String>,
    /// How long to wait for the WAL to drain after the load (zero: do not wait).
    pub drain_timeout: Duration,
    /// Report CPU time and peak RSS of this process (Linux `/proc`).
    pub watch_pid: Option<u32>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Print a progress line on stderr every second.
    pub progress: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What one analyzer processed.
#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    pub analyzer: String,
    /// Processed between the start and the end of the load.
    pub during_load: u64,
    /// Processed between the start and the end of the drain (equal to `during_load` without one).
    pub total: u64,
    /// `total` as a share of all analyzers' `total`.
    pub share: f64,
}

/// CPU and memory of the watched process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessUsage {
    pub pid: u32,
    /// User + system CPU seconds from the start of the load to the end of the drain.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per million messages acknowledged.
    pub cpu_seconds_per_million: f64,
    /// Highest resident set size sampled (every 200 ms), in MiB.
    pub peak_rss_mib: f64,
    /// Resident set size at the end, in MiB.
    pub end_rss_mib: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    /// "closed" or "open".
    pub mode: &'static str,
    /// Offered rate (open loop), messages per second.
    pub rate: Option<f64>,
    pub connections: usize,
    pub packet_size: u32,
    pub message_bytes: usize,
    /// Bytes of one request body.
    pub body_bytes: usize,
    /// From the first request to the last answer, in seconds.
    pub elapsed_seconds: f64,
    pub sent_packets: u64,
    pub acked_packets: u64,
    pub acked_messages: u64,
    pub acked_packets_per_second: f64,
    pub acked_messages_per_second: f64,
    /// Latency of acknowledged requests.
    pub latency_ms: Latency,
    /// Non-2xx answers by status code.
    pub non_2xx: BTreeMap<u16, u64>,
    /// Requests without an answer (refused connection, timeout, reset).
    pub transport_errors: u64,
    pub first_error: Option<String>,
    /// Per analyzer, in the order given or discovered.
    pub delivered: Vec<Delivered>,
    /// Messages processed by all analyzers during the load, per second of load.
    pub delivered_messages_per_second: f64,
    /// Time from the end of the load until the WAL held no pending message.
    pub drain_seconds: Option<f64>,
    /// Pending messages left when the drain wait ended (0 when it drained).
    pub pending_after: Option<u64>,
    pub process: Option<ProcessUsage>,
}

impl BenchReport {
    /// A human summary, several lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let rate = self
            .rate
            .map_or(String::new(), |r| format!(" at {r:.0} msg/s offered"));
        s += &format!(
            "bench: {} loop{rate}, {} connections, {} messages of ~{} B per packet ({} B body), {:.1} s\n",
            self.mode, self.connections, self.packet_size, self.message_bytes, self.body_bytes, self.elapsed_seconds
        );
        s += &format!(
            "acknowledged: {} packets, {} messages = {:.0} packets/s, {:.0} messages/s\n",
            self.acked_packets,
            self.acked_messages,
            self.acked_packets_per_second,
            self.acked_messages_per_second
        );
        let l = &self.latency_ms;
        s += &format!(
            "ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let non_2xx: Vec<String> = self
            .non_2xx
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        s += &format!(
            "non-2xx: {}; transport errors: {}{}\n",
            if non_2xx.is_empty() {
                "none".to_string()
            } else {
                non_2xx.join(", ")
            },
            self.transport_errors,
            self.first_error
                .as_deref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        if !self.delivered.is_empty() {
            let per: Vec<String> = self
                .delivered
                .iter()
                .map(|d| format!("{} {} ({:.1}%)", d.analyzer, d.total, d.share * 100.0))
                .collect();
            s += &format!(
                "delivered: {}; during the load {:.0} messages/s\n",
                per.join(", "),
                self.delivered_messages_per_second
            );
        }
        if let Some(d) = self.drain_seconds {
            s += &format!("drained in {d:.2} s after the load\n");
        } else if let Some(p) = self.pending_after.filter(|p| *p > 0) {
            s += &format!("NOT drained: {p} messages still pending\n");
        }
        if let Some(p) = &self.process {
            s += &format!(
                "process {}: {:.2} CPU s ({:.2} per million messages), peak RSS {:.1} MiB, at the end {:.1} MiB\n",
                p.pid, p.cpu_seconds, p.cpu_seconds_per_million, p.peak_rss_mib, p.end_rss_mib
            );
        }
        s
    }
}

/// Builds request bodies: the messages are encoded once, only the packet id changes.
struct BodyTemplate {
    head: Vec<u8>,
    messages: Vec<u8>,
    tail: &'static [u8],
    run_id: String,
}

impl BodyTemplate {
    fn new(packet_size: u32, message_bytes: usize, proxy: bool) -> Self {
        let timestamp = now_ms();
        let levels = ["INFO", "WARN", "ERROR", "DEBUG"];
        let mut messages = Vec::with_capacity(packet_size as usize * (message_bytes + 1) + 2);
        messages.push(b'[');
        for i in 0..packet_size {
            if i > 0 {
                messages.push(b',');
            }
            let level = levels[i as usize % levels.len()];
            let start = format!(
                r#"{{"timestamp":{timestamp},"level":"{level}","message":"bench message {i} "#
            );
            let end = r#""}"#;
            let pad = message_bytes.saturating_sub(start.len() + end.len());
            messages.extend_from_slice(start.as_bytes());
            messages.extend(std::iter::repeat_n(b'x', pad));
            messages.extend_from_slice(end.as_bytes());
        }
        messages.push(b']');
        let (head, tail): (&[u8], &'static [u8]) = if proxy {
            (
                br#"{"packets":[{"emitter_id":"bench","packet_id":""#,
                b"}]}",
            )
        } else {
            (br#"{"emitter_id":"bench","packet_id":""#, b"}")
        };
        Self {
            head: head.to_vec(),
            messages,
            tail,
            run_id: new_run_id(),
        }
    }

    fn body(&self, packet: u64) -> Bytes {
        let id = format!("{}-{packet}", self.run_id);
        let mut body = Vec::with_capacity(self.len() + 24);
        body.extend_from_slice(&self.head);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(br#"","messages":"#);
        body.extend_from_slice(&self.messages);
        body.extend_from_slice(self.tail);
        Bytes::from(body)
    }

    fn len(&self) -> usize {
        self.head.len() + self.run_id.len() + 24 + self.messages.len() + self.tail.len()
    }
}

/// Counters shared by the workers and the progress line.
#[derive(Default)]
struct Live {
    acked_messages: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// What one worker saw.
struct WorkerResult {
    histogram: Histogram<u64>,
    sent: u64,
    acked: u64,
    non_2xx: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    // Bounds are constants known to be valid.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

struct Plan {
    url: String,
    start: Instant,
    end: Instant,
    /// Open loop: the interval between due times of consecutive packets.
    interval: Option<Duration>,
    /// Stop issuing at this packet number.
    max_packets: u64,
    next: AtomicU64,
    template: BodyTemplate,
    packet_size: u32,
}

async fn worker(http: reqwest::Client, plan: Arc<Plan>, live: Arc<Live>) -> WorkerResult {
    let mut r = WorkerResult {
        histogram: histogram(),
        sent: 0,
        acked: 0,
        non_2xx: BTreeMap::new(),
        transport_errors: 0,
        first_error: None,
    };
    loop {
        if live.stop.load(Relaxed) {
            break;
        }
        let n = plan.next.fetch_add(1, Relaxed);
        if n >= plan.max_packets {
            break;
        }
        let due = match plan.interval {
            Some(every) => {
                let due = plan.start + every.mul_f64(n as f64);
                if due >= plan.end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                due
            }
            None => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                now
            }
        };
        let body = plan.template.body(n);
        r.sent += 1;
        let answer = http
            .post(&plan.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status();
                let read = response.bytes().await;
                if status.is_success() && read.is_ok() {
                    let us = due
                        .elapsed()
                        .as_micros()
                        .clamp(1, u128::from(MAX_LATENCY_US));
                    r.histogram.saturating_record(us as u64);
                    r.acked += 1;
                    live.acked_messages
                        .fetch_add(u64::from(plan.packet_size), Relaxed);
                } else {
                    *r.non_2xx.entry(status.as_u16()).or_default() += 1;
                    live.failed.fetch_add(1, Relaxed);
                }
            }
            Err(e) => {
                r.transport_errors += 1;
                live.failed.fetch_add(1, Relaxed);
                if r.first_error.is_none() {
                    r.first_error = Some(crate::error_chain(&e));
                }
            }
        }
    }
    r
}

/// CPU ticks (user + system) of a process: fields 14 and 15 of `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Linux reports CPU time in USER_HZ ticks, 100 per second on every architecture Rust targets.
const TICKS_PER_SECOND: f64 = 100.0;

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples a process's RSS until stopped, keeping the peak.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(pid).unwrap_or(0));
            if stop.load(Relaxed) {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn processed_counts(
    http: &reqwest::Client,
    analyzers: &[String],
) -> anyhow::Result<Vec<u64>> {
    let mut counts = Vec::with_capacity(analyzers.len());
    for a in analyzers {
        counts.push(verify::fetch_processed(http, a).await?.processed);
    }
    Ok(counts)
}

fn percentile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Run the load, then measure delivery and drain. Errors only when the setup fails (an analyzer
/// list that cannot be fetched); refused requests are results, not errors.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(opts.connections > 0, "connections must be at least 1");
    anyhow::ensure!(opts.packet_size > 0, "packet size must be at least 1");
    if let Some(rate) = opts.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "rate must be a positive number of messages per second"
        );
    }
    let target = opts.target.trim_end_matches('/').to_string();
    let control = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let analyzers = if !opts.analyzers.is_empty() || opts.proxy {
        opts.analyzers.clone()
    } else {
        verify::fetch_analyzers(&control, &target)
            .await?
            .into_iter()
            .map(|a| a.endpoint)
            .collect()
    };
    let before = processed_counts(&control, &analyzers).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.connections)
        .timeout(opts.request_timeout)
        .build()?;
    let template = BodyTemplate::new(opts.packet_size, opts.message_bytes, opts.proxy);
    let body_bytes = template.body(0).len();
    let url = if opts.proxy {
        format!("{target}/analyze")
    } else {
        format!("{target}/logs")
    };
    let max_packets = opts
        .max_messages
        .map_or(u64::MAX, |m| m.div_ceil(u64::from(opts.packet_size)));
    let interval = opts
        .rate
        .map(|rate| Duration::from_secs_f64(f64::from(opts.packet_size) / rate));
    let cpu_before = opts.watch_pid.and_then(cpu_ticks);
    let rss_stop = Arc::new(AtomicBool::new(false));
    let rss = opts.watch_pid.map(|pid| watch_rss(pid, rss_stop.clone()));
    let start = Instant::now();
    let plan = Arc::new(Plan {
        url,
        start,
        end: start + opts.duration,
        interval,
        max_packets,
        next: AtomicU64::new(0),
        template,
        packet_size: opts.packet_size,
    });
    let live = Arc::new(Live::default());
    let progress = opts
        .progress
        .then(|| tokio::spawn(progress_line(live.clone(), start, opts.duration)));
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| tokio::spawn(worker(http.clone(), plan.clone(), live.clone())))
        .collect();
    let mut histogram = histogram();
    let (mut sent, mut acked, mut transport_errors) = (0u64, 0u64, 0u64);
    let mut non_2xx: BTreeMap<u16, u64> = BTreeMap::new();
    let mut first_error = None;
    for w in workers {
        let r = w.await?;
        histogram.add(&r.histogram)?;
        sent += r.sent;
        acked += r.acked;
        transport_errors += r.transport_errors;
        for (code, n) in r.non_2xx {
            *non_2xx.entry(code).or_default() += n;
        }
        first_error = first_error.or(r.first_error);
    }
    let elapsed = start.elapsed();
    live.stop.store(true, Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    let at_load_end = processed_counts(&control, &analyzers).await?;
    let (drain_seconds, pending_after) = if opts.proxy {
        (None, None)
    } else if opts.drain_timeout.is_zero() {
        (None, verify::fetch_pending(&control, &target).await.ok())
    } else {
        match verify::wait_drained(&control, &target, opts.drain_timeout).await {
            Ok(took) => (Some(took.as_secs_f64()), Some(0)),
            Err(left) => (None, left),
        }
    };
    let at_end = processed_counts(&control, &analyzers).await?;
    rss_stop.store(true, Relaxed);
    let peak_rss_kib = match rss {
        Some(task) => task.await?,
        None => 0,
    };
    let acked_messages = acked * u64::from(opts.packet_size);
    let process = opts.watch_pid.map(|pid| {
        let cpu = match (cpu_before, cpu_ticks(pid)) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / TICKS_PER_SECOND,
            _ => 0.0,
        };
        ProcessUsage {
            pid,
            cpu_seconds: cpu,
            cpu_seconds_per_million: if acked_messages > 0 {
                cpu / (acked_messages as f64 / 1e6)
            } else {
                0.0
            },
            peak_rss_mib: peak_rss_kib as f64 / 1024.0,
            end_rss_mib: rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
        }
    });
    let totals: Vec<u64> = at_end
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let all: u64 = totals.iter().sum();
    let delivered: Vec<Delivered> = analyzers
        .iter()
        .zip(totals)
        .zip(at_load_end.iter().zip(&before))
        .map(|((analyzer, total), (load_end, b))| Delivered {
            analyzer: analyzer.clone(),
            during_load: load_end.saturating_sub(*b),
            total,
            share: if all > 0 {
                total as f64 / all as f64
            } else {
                0.0
            },
        })
        .collect();
    let during_load: u64 = delivered.iter().map(|d| d.during_load).sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let latency_ms = if histogram.is_empty() {
        Latency::default()
    } else {
        Latency {
            p50: percentile_ms(&histogram, 0.50),
            p90: percentile_ms(&histogram, 0.90),
            p99: percentile_ms(&histogram, 0.99),
            p999: percentile_ms(&histogram, 0.999),
            max: histogram.max() as f64 / 1000.0,
            mean: histogram.mean() / 1000.0,
        }
    };
    Ok(BenchReport {
        target,
        mode: if opts.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: opts.rate,
        connections: opts.connections,
        packet_size: opts.packet_size,
        message_bytes: opts.message_bytes,
        body_bytes,
        elapsed_seconds: secs,
        sent_packets: sent,
        acked_packets: acked,
        acked_messages,
        acked_packets_per_second: acked as f64 / secs,
        acked_messages_per_second: acked_messages as f64 / secs,
        latency_ms,
        non_2xx,
        transport_errors,
        first_error,
        delivered,
        delivered_messages_per_second: during_load as f64 / secs,
        drain_seconds,
        pending_after,
        process,
    })
}

/// One line a second on stderr: rewritten in place on a terminal, a new line every 5 s otherwise.
async fn progress_line(live: Arc<Live>, start: Instant, duration: Duration) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0u64;
    let mut seconds = 0u64;
    let out = Mutex::new(std::io::stderr());
    while !live.stop.load(Relaxed) {
        tick.tick().await;
        seconds += 1;
        let acked = live.acked_messages.load(Relaxed);
        let line = format!(
            "bench: {:>4.0}/{:.0} s  {:>9} msg/s acknowledged  {:>11} in all  {} refused or failed",
            start.elapsed().as_secs_f64(),
            duration.as_secs_f64(),
            acked - last,
            acked,
            live.failed.load(Relaxed)
        );
        last = acked;
        let mut err = out.lock().unwrap_or_else(PoisonError::into_inner);
        if tty {
            let _ = write!(err, "\r{line}");
        } else if seconds.is_multiple_of(5) {
            let _ = writeln!(err, "{line}");
        }
    }
    if tty {
        let _ = writeln!(out.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logdist_proto::{parse_packet, AnalyzeRequest, Limits};

    #[test]
    fn a_template_body_is_a_valid_packet_of_the_asked_size() {
        let t = BodyTemplate::new(50, 200, false);
        let body = t.body(7);
        let packet = parse_packet(&body, &Limits::default()).unwrap();
        assert_eq!(packet.count, 50);
        assert!(packet.packet_id.ends_with("-7"));
        let per_message = (body.len() - 80) as f64 / 50.0;
        assert!(
            (195.0..=215.0).contains(&per_message),
            "~200 bytes per message, got {per_message}"
        );
        assert_ne!(t.body(8), body, "packet ids differ");
    }

    #[test]
    fn a_proxy_body_is_an_analyzer_batch_holding_the_same_messages() {
        let t = BodyTemplate::new(3, 100, true);
        match AnalyzeRequest::parse(&t.body(1)).unwrap() {
            AnalyzeRequest::Packets(p) => {
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].messages.len(), 3);
                assert_eq!(p[0].emitter_id, "bench");
            }
            other => panic!("wrong shape {other:?}"),
        }
    }

    #[test]
    fn cpu_and_rss_of_this_process_can_be_read() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_kib(pid).unwrap() > 0);
    }
}
