//! Checking logdist's two end-to-end promises from the outside.
//!
//! * **Delivery** (invariants 1–3): every message of every packet the distributor acknowledged
//!   reached at least one analyzer. Compares the emitter's acknowledged log with the analyzers'
//!   `/audit` lists of distinct `(emitter_id, packet_id, index)`. A message processed but never
//!   acknowledged is fine (its ack was lost in a crash and the emitter gave up or was killed), so it
//!   is reported, not failed. A message at two analyzers is a redelivery and also only reported.
//! * **Weights** (invariant 4): each analyzer's share of processed messages is its weight over the
//!   sum of weights, within a tolerance in percentage points.
//!
//! The comparisons are pure functions over plain data ([`verify_delivery`], [`verify_weights`]) so
//! tests feed them hand-made cases; the `fetch_*` functions are thin HTTP wrappers.

use crate::ledger::AcknowledgedPacket;
use logdist_proto::MessageId;
use serde::Deserialize;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

/// Lost ids printed by the report's `Display` (all are kept in [`DeliveryReport::lost`]).
pub const LOST_SHOWN: usize = 20;

/// The outcome of a delivery check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Distinct packets in the acknowledged log.
    pub acknowledged_packets: u64,
    /// Messages of those packets.
    pub acknowledged_messages: u64,
    /// Distinct message ids over all audits.
    pub processed_distinct: u64,
    /// Distinct message ids per analyzer, in the order given.
    pub per_analyzer: Vec<(String, u64)>,
    /// Acknowledged but in no audit, sorted. Any entry fails the check.
    pub lost: Vec<MessageId>,
    /// Ids present at two or more analyzers.
    pub duplicated_across_analyzers: u64,
    /// Ids processed but never acknowledged (informational).
    pub unacknowledged_processed: u64,
}

impl DeliveryReport {
    /// Every acknowledged message was processed somewhere.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
    }
}

/// Compare acknowledged packets `(emitter_id, packet_id, count)` with each analyzer's audit
/// `(analyzer_id, ids)`. The same packet listed twice counts once (with its largest count).
pub fn verify_delivery(
    acknowledged: &[(String, String, u32)],
    audits: &[(String, Vec<MessageId>)],
) -> DeliveryReport {
    // id -> (last analyzer that listed it, number of analyzers listing it). Borrowed keys: the
    // audits can be millions of ids.
    let mut seen: HashMap<(&str, &str, u32), (usize, u32)> = HashMap::new();
    let mut per_analyzer = Vec::with_capacity(audits.len());
    for (analyzer, (analyzer_id, ids)) in audits.iter().enumerate() {
        let mut distinct = 0u64;
        for id in ids {
            let key = (id.emitter_id.as_str(), id.packet_id.as_str(), id.index);
            match seen.entry(key) {
                Entry::Vacant(v) => {
                    v.insert((analyzer, 1));
                    distinct += 1;
                }
                Entry::Occupied(mut o) => {
                    let (last, count) = o.get_mut();
                    if *last != analyzer {
                        *last = analyzer;
                        *count += 1;
                        distinct += 1;
                    }
                }
            }
        }
        per_analyzer.push((analyzer_id.clone(), distinct));
    }

    let mut packets: HashMap<(&str, &str), u32> = HashMap::new();
    for (emitter_id, packet_id, count) in acknowledged {
        let c = packets
            .entry((emitter_id.as_str(), packet_id.as_str()))
            .or_insert(0);
        *c = (*c).max(*count);
    }

    let mut lost = Vec::new();
    for (&(emitter_id, packet_id), &count) in &packets {
        for index in 0..count {
            if !seen.contains_key(&(emitter_id, packet_id, index)) {
                lost.push(MessageId {
                    emitter_id: emitter_id.to_owned(),
                    packet_id: packet_id.to_owned(),
                    index,
                });
            }
        }
    }
    lost.sort();

    let unacknowledged_processed = seen
        .keys()
        .filter(|(e, p, index)| packets.get(&(*e, *p)).is_none_or(|count| index >= count))
        .count() as u64;

    DeliveryReport {
        acknowledged_packets: packets.len() as u64,
        acknowledged_messages: packets.values().map(|&c| u64::from(c)).sum(),
        processed_distinct: seen.len() as u64,
        per_analyzer,
        lost,
        duplicated_across_analyzers: seen.values().filter(|(_, n)| *n >= 2).count() as u64,
        unacknowledged_processed,
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<(String, String)> = vec![
            (
                "acknowledged packets".into(),
                self.acknowledged_packets.to_string(),
            ),
            (
                "acknowledged messages".into(),
                self.acknowledged_messages.to_string(),
            ),
            (
                "processed (distinct)".into(),
                self.processed_distinct.to_string(),
            ),
        ];
        for (id, n) in &self.per_analyzer {
            rows.push((format!("  at {id}"), n.to_string()));
        }
        rows.extend([
            (
                "lost (acknowledged, never processed)".into(),
                self.lost.len().to_string(),
            ),
            (
                "duplicated across analyzers".into(),
                self.duplicated_across_analyzers.to_string(),
            ),
            (
                "processed, never acknowledged".into(),
                self.unacknowledged_processed.to_string(),
            ),
            (
                "result".into(),
                if self.passed() { "PASS" } else { "FAIL" }.into(),
            ),
        ]);
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let value_width = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        for (key, value) in &rows {
            writeln!(f, "{key:<width$}  {value:>value_width$}")?;
        }
        if !self.lost.is_empty() {
            writeln!(
                f,
                "lost messages (first {}):",
                LOST_SHOWN.min(self.lost.len())
            )?;
            for id in self.lost.iter().take(LOST_SHOWN) {
                writeln!(f, "  {id}")?;
            }
            if self.lost.len() > LOST_SHOWN {
                writeln!(f, "  ... and {} more", self.lost.len() - LOST_SHOWN)?;
            }
        }
        Ok(())
    }
}

/// One analyzer's line in a weights check.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightRow {
    pub analyzer_id: String,
    pub processed: u64,
    /// Share of all processed messages, in percent.
    pub share_pct: f64,
    /// Weight over the sum of weights, in percent.
    pub expected_pct: f64,
    /// `share_pct - expected_pct`, in percentage points.
    pub deviation_pp: f64,
}

/// The outcome of a weights check.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsReport {
    pub rows: Vec<WeightRow>,
    pub total_processed: u64,
    pub tolerance_pp: f64,
}

impl WeightsReport {
    /// Messages were processed and every share is within the tolerance of its weight.
    pub fn passed(&self) -> bool {
        self.total_processed > 0
            && self
                .rows
                .iter()
                .all(|r| r.deviation_pp.abs() <= self.tolerance_pp + 1e-9)
    }
}

/// Compare observed `(analyzer_id, processed)` with `(analyzer_id, weight)`. Weights need not sum
/// to 1. Rows follow `weights`' order; an analyzer observed but not weighted is expected at 0 %,
/// one weighted but not observed counts as 0 processed.
pub fn verify_weights(
    observed: &[(String, u64)],
    weights: &[(String, f64)],
    tolerance_pp: f64,
) -> WeightsReport {
    let mut ids: Vec<&str> = weights.iter().map(|(id, _)| id.as_str()).collect();
    for (id, _) in observed {
        if !ids.contains(&id.as_str()) {
            ids.push(id);
        }
    }
    let processed_of = |id: &str| -> u64 {
        observed
            .iter()
            .filter(|(o, _)| o == id)
            .map(|(_, n)| *n)
            .sum()
    };
    let weight_of = |id: &str| -> f64 {
        weights
            .iter()
            .filter(|(w, _)| w == id)
            .map(|(_, w)| w.max(0.0))
            .sum()
    };
    let total_processed: u64 = ids.iter().map(|id| processed_of(id)).sum();
    let total_weight: f64 = ids.iter().map(|id| weight_of(id)).sum();
    let pct = |part: f64, whole: f64| {
        if whole > 0.0 {
            100.0 * part / whole
        } else {
            0.0
        }
    };
    let rows = ids
        .iter()
        .map(|id| {
            let processed = processed_of(id);
            let share_pct = pct(processed as f64, total_processed as f64);
            let expected_pct = pct(weight_of(id), total_weight);
            WeightRow {
                analyzer_id: (*id).to_owned(),
                processed,
                share_pct,
                expected_pct,
                deviation_pp: share_pct - expected_pct,
            }
        })
        .collect();
    WeightsReport {
        rows,
        total_processed,
        tolerance_pp,
    }
}

impl fmt::Display for WeightsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_width = self
            .rows
            .iter()
            .map(|r| r.analyzer_id.len())
            .chain(["analyzer".len(), "total".len()])
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "{:<id_width$}  {:>12}  {:>8}  {:>10}  {:>10}",
            "analyzer", "processed", "share %", "expected %", "deviation"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<id_width$}  {:>12}  {:>8.2}  {:>10.2}  {:>+8.2}pp",
                r.analyzer_id, r.processed, r.share_pct, r.expected_pct, r.deviation_pp
            )?;
        }
        writeln!(f, "{:<id_width$}  {:>12}", "total", self.total_processed)?;
        write!(
            f,
            "result: {} (tolerance {:.2}pp)",
            if self.passed() { "PASS" } else { "FAIL" },
            self.tolerance_pp
        )?;
        if self.total_processed == 0 {
            write!(f, ", no message was processed")?;
        }
        writeln!(f)
    }
}

/// Why data for a check could not be fetched. All are fatal for the check (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The service could not be reached or the answer did not arrive.
    #[error("GET {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The service answered with a non-2xx status.
    #[error("GET {url}: status {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// The answer is not of the expected shape.
    #[error("GET {url}: unexpected answer: {reason}")]
    Malformed { url: String, reason: String },
}

/// An analyzer as the distributor's `/health` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AnalyzerInfo {
    pub id: String,
    pub endpoint: String,
    pub weight: f64,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "yes")]
    pub healthy: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct HealthAnswer {
    analyzers: Vec<AnalyzerInfo>,
}

/// An analyzer's `/processed` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Processed {
    pub processed: u64,
    #[serde(default)]
    pub duplicates: u64,
}

async fn get_bytes(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, FetchError> {
    let unreachable = |e: reqwest::Error| FetchError::Unreachable {
        url: url.to_owned(),
        reason: crate::error_chain(&e),
    };
    let response = http.get(url).send().await.map_err(unreachable)?;
    let status = response.status();
    let body = response.bytes().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
        });
    }
    Ok(body.to_vec())
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, FetchError> {
    let body = get_bytes(http, url).await?;
    serde_json::from_slice(&body).map_err(|e| FetchError::Malformed {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_ndjson<T: serde::de::DeserializeOwned>(
    url: &str,
    body: &[u8],
) -> Result<Vec<T>, FetchError> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(n, line)| {
            serde_json::from_slice(line).map_err(|e| FetchError::Malformed {
                url: url.to_owned(),
                reason: format!("line {}: {e}", n + 1),
            })
        })
        .collect()
}

fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// The analyzers listed by the distributor's `GET /health`.
pub async fn fetch_analyzers(
    http: &reqwest::Client,
    distributor_url: &str,
) -> Result<Vec<AnalyzerInfo>, FetchError> {
    let answer: HealthAnswer = get_json(http, &join(distributor_url, "/health")).await?;
    Ok(answer.analyzers)
}

#[derive(Deserialize)]
struct QueueAnswer {
    size: u64,
}

/// Messages pending in a distributor's WAL (`size` of its `GET /queue`).
pub async fn fetch_pending(
    http: &reqwest::Client,
    distributor_url: &str,
) -> Result<u64, FetchError> {
    let answer: QueueAnswer = get_json(http, &join(distributor_url, "/queue")).await?;
    Ok(answer.size)
}

/// Poll the distributor every 50 ms until its WAL is empty; `Ok` with the time it took, or, after
/// `within`, `Err` with what was still pending (`None`: it never answered). A failed poll is
/// retried: a distributor still recovering may not answer yet.
pub async fn wait_drained(
    http: &reqwest::Client,
    distributor_url: &str,
    within: std::time::Duration,
) -> Result<std::time::Duration, Option<u64>> {
    let started = tokio::time::Instant::now();
    loop {
        let pending = fetch_pending(http, distributor_url).await.ok();
        if pending == Some(0) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= within {
            return Err(pending);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An analyzer's `GET /processed`.
pub async fn fetch_processed(
    http: &reqwest::Client,
    endpoint: &str,
) -> Result<Processed, FetchError> {
    get_json(http, &join(endpoint, "/processed")).await
}

/// An analyzer's `GET /audit`: the distinct ids it processed.
pub async fn fetch_audit(
    http: &reqwest::Client,
    endpoint: &str,
) -> Result<Vec<MessageId>, FetchError> {
    let url = join(endpoint, "/audit");
    let body = get_bytes(http, &url).await?;
    parse_ndjson(&url, &body)
}

/// An emitter's `GET /acknowledged`, as `(emitter_id, packet_id, count)`.
pub async fn fetch_acknowledged(
    http: &reqwest::Client,
    emitter_url: &str,
) -> Result<Vec<(String, String, u32)>, FetchError> {
    let url = join(emitter_url, "/acknowledged");
    let body = get_bytes(http, &url).await?;
    let packets: Vec<AcknowledgedPacket> = parse_ndjson(&url, &body)?;
    Ok(packets
        .into_iter()
        .map(|p| (p.emitter_id, p.packet_id, p.count))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(e: &str, p: &str, index: u32) -> MessageId {
        MessageId {
            emitter_id: e.into(),
            packet_id: p.into(),
            index,
        }
    }

    fn acked(list: &[(&str, &str, u32)]) -> Vec<(String, String, u32)> {
        list.iter()
            .map(|(e, p, c)| (e.to_string(), p.to_string(), *c))
            .collect()
    }

    fn weights(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(a, w)| (a.to_string(), *w)).collect()
    }

    fn observed(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(a, n)| (a.to_string(), *n)).collect()
    }

    #[test]
    fn every_acknowledged_message_found_somewhere_passes() {
        let ack = acked(&[("e1", "p1", 2), ("e2", "p1", 1)]);
        let audits = vec![
            ("a1".to_string(), vec![id("e1", "p1", 0), id("e2", "p1", 0)]),
            ("a2".to_string(), vec![id("e1", "p1", 1)]),
        ];
        let report = verify_delivery(&ack, &audits);
        assert!(report.passed(), "{report}");
        assert_eq!(report.acknowledged_messages, 3);
        assert_eq!(report.processed_distinct, 3);
        assert_eq!(
            report.per_analyzer,
            vec![("a1".into(), 2), ("a2".into(), 1)]
        );
        assert_eq!(report.duplicated_across_analyzers, 0);
        assert_eq!(report.unacknowledged_processed, 0);
    }

    #[test]
    fn exactly_the_missing_acknowledged_messages_are_reported_lost() {
        let ack = acked(&[("e1", "p1", 3), ("e1", "p2", 2)]);
        let audits = vec![("a1".to_string(), vec![id("e1", "p1", 0), id("e1", "p1", 2)])];
        let report = verify_delivery(&ack, &audits);
        assert!(!report.passed());
        assert_eq!(
            report.lost,
            vec![id("e1", "p1", 1), id("e1", "p2", 0), id("e1", "p2", 1)]
        );
        let shown = report.to_string();
        assert!(
            shown.contains("FAIL") && shown.contains("e1/p2#1"),
            "{shown}"
        );
    }

    #[test]
    fn an_id_at_two_analyzers_counts_once_as_processed_and_once_as_duplicated() {
        let ack = acked(&[("e", "p", 2)]);
        let audits = vec![
            ("a1".to_string(), vec![id("e", "p", 0), id("e", "p", 1)]),
            ("a2".to_string(), vec![id("e", "p", 0)]),
            ("a3".to_string(), vec![id("e", "p", 0)]),
        ];
        let report = verify_delivery(&ack, &audits);
        assert!(report.passed());
        assert_eq!(report.processed_distinct, 2);
        assert_eq!(report.duplicated_across_analyzers, 1);
    }

    #[test]
    fn processed_but_unacknowledged_messages_are_informational() {
        let ack = acked(&[("e", "p", 1)]);
        let audits = vec![(
            "a1".to_string(),
            vec![id("e", "p", 0), id("e", "p", 1), id("e", "other", 0)],
        )];
        let report = verify_delivery(&ack, &audits);
        assert!(report.passed());
        assert_eq!(report.unacknowledged_processed, 2);
    }

    #[test]
    fn a_packet_acknowledged_twice_is_counted_once() {
        let ack = acked(&[("e", "p", 2), ("e", "p", 2)]);
        let audits = vec![("a1".to_string(), vec![id("e", "p", 0), id("e", "p", 1)])];
        let report = verify_delivery(&ack, &audits);
        assert_eq!(
            (report.acknowledged_packets, report.acknowledged_messages),
            (1, 2)
        );
    }

    #[test]
    fn shares_exactly_on_weight_pass_and_the_table_is_exact() {
        let report = verify_weights(
            &observed(&[("a1", 5000), ("a2", 3000), ("a3", 2000)]),
            &weights(&[("a1", 0.5), ("a2", 0.3), ("a3", 0.2)]),
            1.0,
        );
        assert!(report.passed(), "{report}");
        assert_eq!(report.total_processed, 10_000);
        for (row, pct) in report.rows.iter().zip([50.0, 30.0, 20.0]) {
            assert!((row.share_pct - pct).abs() < 1e-9);
            assert!((row.expected_pct - pct).abs() < 1e-9);
            assert!(row.deviation_pp.abs() < 1e-9);
        }
        let table = report.to_string();
        assert!(
            table.contains("a2") && table.contains("30.00") && table.contains("PASS"),
            "{table}"
        );
    }

    #[test]
    fn a_share_two_points_off_fails_at_one_point_tolerance() {
        let report = verify_weights(
            &observed(&[("a1", 5200), ("a2", 2800), ("a3", 2000)]),
            &weights(&[("a1", 0.5), ("a2", 0.3), ("a3", 0.2)]),
            1.0,
        );
        assert!(!report.passed());
        assert!((report.rows[0].deviation_pp - 2.0).abs() < 1e-9);
        assert!((report.rows[1].deviation_pp + 2.0).abs() < 1e-9);
        assert!(report.to_string().contains("FAIL"));
        let lenient = verify_weights(
            &observed(&[("a1", 5200), ("a2", 2800), ("a3", 2000)]),
            &weights(&[("a1", 0.5), ("a2", 0.3), ("a3", 0.2)]),
            2.0,
        );
        assert!(lenient.passed());
    }

    #[test]
    fn weights_need_not_sum_to_one() {
        let report = verify_weights(
            &observed(&[("a1", 500), ("a2", 250), ("a3", 250)]),
            &weights(&[("a1", 2.0), ("a2", 1.0), ("a3", 1.0)]),
            0.5,
        );
        assert!(report.passed(), "{report}");
        assert!((report.rows[0].expected_pct - 50.0).abs() < 1e-9);
        assert!((report.rows[2].expected_pct - 25.0).abs() < 1e-9);
    }

    #[test]
    fn an_unweighted_analyzer_is_expected_at_zero_and_nothing_processed_fails() {
        let report = verify_weights(
            &observed(&[("a1", 90), ("stray", 10)]),
            &weights(&[("a1", 1.0)]),
            1.0,
        );
        assert!(!report.passed());
        assert_eq!(report.rows[1].analyzer_id, "stray");
        assert!((report.rows[1].deviation_pp - 10.0).abs() < 1e-9);
        let empty = verify_weights(&observed(&[("a1", 0)]), &weights(&[("a1", 1.0)]), 1.0);
        assert!(!empty.passed());
    }
}
