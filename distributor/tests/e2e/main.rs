//! End-to-end tests: the real distributor binary, analyzers on real sockets, message-by-message
//! accounting through the analyzers' `/audit`.

mod helpers;
mod operate;

use std::collections::HashSet;
use std::time::Duration;

use helpers::*;
use serde_json::Value;

const DRAIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_land_within_one_point_of_each_weight() {
    // Arrange
    let a = analyzers(3).await;
    let d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], "").await;

    // Act: 200 packets x 50 = 10,000 messages.
    let acked = send_all(&d.client(), packets(1, 200, 50), 8).await;
    d.wait_drained(DRAIN).await;

    // Assert: every message delivered once, shares within 1 percentage point.
    assert_eq!(acked.len(), 10_000);
    let delivered = Delivered::collect(&a).await;
    assert_eq!(delivered.lost(&acked), vec![]);
    assert_eq!(delivered.by_id.len(), 10_000);
    assert_eq!(delivered.duplicated(), 0);
    let mut total = 0;
    let mut counts = Vec::new();
    for x in &a {
        let (processed, duplicates) = x.processed().await;
        assert_eq!(duplicates, 0);
        counts.push(processed);
        total += processed;
    }
    assert_eq!(total, 10_000);
    for (count, weight) in counts.iter().zip([0.5, 0.3, 0.2]) {
        let share = *count as f64 / total as f64;
        assert!(
            (share - weight).abs() <= 0.01,
            "share {share:.4} vs weight {weight} (counts {counts:?})"
        );
    }
    let stats = get_json(&format!("{}/stats", d.url)).await;
    assert_eq!(stats["acknowledged"]["total"], 10_000);
    assert_eq!(stats["accepted"]["messages"], 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_analyzer_gets_nothing_new_the_others_absorb_its_share_and_nothing_is_lost() {
    // Arrange
    let a = analyzers(3).await;
    let d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], "").await;
    let client = d.client();
    let mut acked = send_all(&client, packets(2, 60, 50), 4).await;
    d.wait_drained(DRAIN).await;
    let before: Vec<u64> = futures_util::future::join_all(a.iter().map(|x| x.processed()))
        .await
        .into_iter()
        .map(|p| p.0)
        .collect();

    // Act: disable analyzer-2 and send 100 packets.
    a[1].disable().await;
    acked.extend(send_all(&client, packets(3, 100, 50), 4).await);
    d.wait_drained(DRAIN).await;

    // Assert: analyzer-2 got nothing new, the others took all 5,000, in about 5:2.
    let during: Vec<u64> = futures_util::future::join_all(a.iter().map(|x| x.processed()))
        .await
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        during[1], before[1],
        "disabled analyzer processed nothing new"
    );
    let (g1, g3) = (during[0] - before[0], during[2] - before[2]);
    assert_eq!(g1 + g3, 5_000);
    let share1 = g1 as f64 / 5_000.0;
    assert!(
        (share1 - 0.5 / 0.7).abs() <= 0.05,
        "analyzer-1 took {share1:.3} of the messages while analyzer-2 was off (expected ~0.714)"
    );

    // Act: enable it again and send more.
    a[1].enable().await;
    let health = format!("{}/health", d.url);
    wait_until("analyzer-2 healthy again", DRAIN, || async {
        get_json(&health).await["analyzers"][1]["healthy"] == Value::Bool(true)
    })
    .await;
    acked.extend(send_all(&client, packets(4, 100, 50), 4).await);
    d.wait_drained(DRAIN).await;

    // Assert: it receives traffic again, and every acknowledged message was processed.
    let after = a[1].processed().await.0;
    assert!(after > during[1], "analyzer-2 back in rotation");
    let delivered = Delivered::collect(&a).await;
    delivered.assert_all_and_only(&acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_packets_stream_in_loses_no_acknowledged_message() {
    // Arrange
    let a = analyzers(3).await;
    let wal = std::env::var("LOGDIST_TEST_CRASH_WAL").unwrap_or_default();
    let mut d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], &wal).await;
    let client = d.client();
    // Enough that the stream outlasts the kills even with group commit at full speed.
    let total_packets = 8_000;
    let sender =
        tokio::spawn(async move { send_all(&client, packets(5, total_packets, 20), 4).await });

    // Act: kill -9 six times at staggered moments while the senders retry through the outages.
    let mut kills = 0;
    for pause_ms in [150u64, 400, 250, 600, 300, 450] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        if sender.is_finished() {
            break;
        }
        d.kill();
        kills += 1;
        d.restart().await;
    }
    let acked = sender.await.unwrap();
    d.wait_drained(DRAIN).await;

    // Assert
    assert!(kills >= 5, "the stream ended before enough kills ({kills})");
    assert_eq!(acked.len(), total_packets * 20);
    let delivered = Delivered::collect(&a).await;
    let lost = delivered.lost(&acked);
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "crash test: {kills} SIGKILLs, {} acknowledged, {} processed, {} processed by two analyzers",
        acked.len(),
        delivered.by_id.len(),
        delivered.duplicated()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_taken_while_every_analyzer_is_off_survives_restarts_and_is_delivered_once_they_return(
) {
    // Arrange: every analyzer off.
    let a = analyzers(3).await;
    for x in &a {
        x.disable().await;
    }
    let mut d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], "").await;

    // Act: 100 packets of 50 accepted into the WAL.
    let acked = send_all(&d.client(), packets(6, 100, 50), 4).await;
    assert_eq!(d.queue().await["size"], 5_000);

    // A graceful stop exits 0 and keeps the backlog; so does a SIGKILL.
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit status {status:?}");
    d.restart().await;
    assert_eq!(d.queue().await["size"], 5_000);
    d.kill();
    d.restart().await;
    assert_eq!(d.queue().await["size"], 5_000);
    let queue = d.queue().await;
    assert!(queue["oldest_age_ms"].as_u64().unwrap() > 0);

    for x in &a {
        x.enable().await;
    }
    d.wait_drained(DRAIN).await;

    // Assert
    let delivered = Delivered::collect(&a).await;
    assert_eq!(delivered.lost(&acked), vec![]);
    assert_eq!(delivered.by_id.len(), 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_refuses_new_packets_with_503_and_retry_after() {
    let a = analyzers(1).await;
    a[0].disable().await;
    let d = Distributor::start(&[(&a[0], 1.0)], "[wal]\nmax_pending_messages = 100\n").await;
    let client = d.client();
    send_all(&client, packets(7, 2, 50), 1).await;

    let body = serde_json::to_vec(&packets(8, 1, 1)[0]).unwrap();
    let r = http()
        .post(format!("{}/logs", d.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("bound of 100"), "{v}");
    assert_eq!(d.queue().await["size"], 100, "nothing more was stored");

    a[0].enable().await;
    d.wait_drained(DRAIN).await;
    assert_eq!(a[0].processed().await.0, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_gets_its_4xx_and_what_was_accepted_is_untouched() {
    // Arrange: one packet accepted and held (analyzer off).
    let a = analyzers(1).await;
    a[0].disable().await;
    let d = Distributor::start(
        &[(&a[0], 1.0)],
        "[limits]\nmax_body_bytes = 65536\nmax_messages_per_packet = 100\n",
    )
    .await;
    let good = packets(9, 1, 10).remove(0);
    let acked = send_all(&d.client(), vec![good.clone()], 1).await;

    let msg = r#"{"timestamp":1,"level":"INFO","message":"m"}"#;
    let many = vec![msg; 101].join(",");
    let huge = "x".repeat(70_000);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("application/json", "{not json".into(), 400, "malformed"),
        ("application/json", r#"{"packet_id":"p","messages":[]}"#.into(), 400, "emitter_id"),
        ("application/json", r#"{"emitter_id":"e","packet_id":"p","messages":[]}"#.into(), 400, "at least one"),
        ("application/json", r#"{"emitter_id":"e","packet_id":7,"messages":[]}"#.into(), 400, "invalid type"),
        ("application/json", format!(r#"{{"emitter_id":"","packet_id":"p","messages":[{msg}]}}"#), 400, "must not be empty"),
        ("application/json", r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":"noon","level":"I","message":"m"}]}"#.into(), 400, "RFC 3339"),
        ("application/json", r#"{"emitter_id":"e","packet_id":"p","messages":[{"level":"I","message":"m"}]}"#.into(), 400, "timestamp"),
        ("application/json", format!(r#"{{"emitter_id":"e","packet_id":"p","messages":[{many}]}}"#), 400, "limit of 100"),
        ("application/json", format!(r#"{{"emitter_id":"e","packet_id":"p","messages":[{{"timestamp":1,"level":"I","message":"{huge}"}}]}}"#), 413, "limit of 65536"),
        ("text/plain", format!(r#"{{"emitter_id":"e","packet_id":"p","messages":[{msg}]}}"#), 415, "application/json"),
    ];

    // Act + Assert
    for (ctype, body, status, needle) in cases {
        let r = http()
            .post(format!("{}/logs", d.url))
            .header("content-type", ctype)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "{}",
            &body[..body.len().min(80)]
        );
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{error:?} should mention {needle:?}"
        );
    }
    let invalid_utf8 = http()
        .post(format!("{}/ingest", d.url))
        .header("content-type", "application/json")
        .body(b"{\"emitter_id\":\"\xff\xfe\",\"packet_id\":\"p\",\"messages\":[]}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(invalid_utf8.status(), 400);
    let r = http().get(format!("{}/nope", d.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A repeated packet is acknowledged as a duplicate and not stored again.
    let r = http()
        .post(format!("{}/logs", d.url))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&good).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["duplicate"], true);
    assert_eq!(d.queue().await["size"], 10);

    // The service still serves and delivers exactly what it accepted.
    a[0].enable().await;
    d.wait_drained(DRAIN).await;
    let delivered = Delivered::collect(&a).await;
    assert_eq!(delivered.lost(&acked), vec![]);
    assert_eq!(
        delivered.by_id.keys().cloned().collect::<HashSet<_>>(),
        acked
    );
    let stats = get_json(&format!("{}/stats", d.url)).await;
    assert_eq!(stats["rejected_requests"], 11);
    assert_eq!(stats["duplicate_packets"], 1);
}

#[test]
fn a_config_with_duplicate_ids_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[analyzers]]\nid = \"a\"\nweight = 1\nendpoint = \"http://127.0.0.1:1\"\n\
         [[analyzers]]\nid = \"a\"\nweight = 1\nendpoint = \"http://127.0.0.1:2\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distributor"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("analyzers[1].id") && stderr.contains("duplicate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_an_analyzer_refuses_stays_in_the_wal_without_dragging_its_batch_or_the_analyzers_health(
) {
    // Arrange: 19 good packets and one the analyzer will refuse, all waiting in the WAL.
    let picky = PickyAnalyzer::spawn().await;
    let d = Distributor::start_with(&[("picky", &picky.url, 1.0)], "").await;
    let mut batch = packets(10, 20, 10);
    batch[7].packet_id = "poison-1".into();
    send_all(&d.client(), batch.clone(), 4).await;
    assert_eq!(d.queue().await["size"], 200);

    // Act: the analyzer comes up; the dispatcher sends the whole window in big batches.
    picky.on.store(true, std::sync::atomic::Ordering::SeqCst);

    // Assert: every good packet delivered, the refused one still pending, analyzer healthy.
    let good: HashSet<String> = batch
        .iter()
        .filter(|p| p.packet_id != "poison-1")
        .map(|p| p.packet_id.clone())
        .collect();
    wait_until("the 19 good packets delivered", DRAIN, || async {
        *picky.accepted.lock().unwrap() == good
    })
    .await;
    let queue = format!("{}/queue", d.url);
    wait_until("only the refused packet pending", DRAIN, || async {
        get_json(&queue).await["size"] == 10
    })
    .await;
    assert!(picky.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let health = get_json(&format!("{}/health", d.url)).await;
    assert_eq!(health["analyzers"][0]["healthy"], true, "{health}");
}

/// `GET /metrics` text as `"name{labels}" -> value`.
async fn scrape(base: &str) -> (String, std::collections::HashMap<String, f64>) {
    let text = get_text(&format!("{base}/metrics")).await;
    let values = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap())
        })
        .collect();
    (text, values)
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`. Without promtool the
/// check is skipped with a line saying so, unless `LOGDIST_REQUIRE_PROMTOOL` is set (`.ci/run`
/// installs it and sets it), in which case its absence fails the test.
fn promtool_check(what: &str, text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("LOGDIST_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("SKIP: promtool check of {what}: promtool not runnable ({e})");
            return;
        }
        Err(e) => panic!("promtool is required (LOGDIST_REQUIRE_PROMTOOL) but not runnable: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed for {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_pass_promtool() {
    // Arrange
    let a = analyzers(2).await;
    let d = Distributor::start(&[(&a[0], 0.6), (&a[1], 0.4)], "").await;

    // Act: 40 packets of 25 messages, one packet sent twice, and two bad requests.
    let sent = packets(21, 40, 25);
    let acked = send_all(&d.client(), sent.clone(), 4).await;
    send_all(&d.client(), vec![sent[0].clone()], 1).await;
    let post = |ct: &'static str, body: &'static str| {
        http()
            .post(format!("{}/logs", d.url))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(
        post("application/json", r#"{"emitter_id":"e"}"#)
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(post("text/plain", "{}").await.unwrap().status(), 415);
    d.wait_drained(DRAIN).await;

    // Assert: the distributor's counters match what was sent, message for message.
    assert_eq!(acked.len(), 1000);
    let (text, m) = scrape(&d.url).await;
    let v = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in:\n{text}"))
    };
    assert_eq!(v("logdist_distributor_messages_accepted_total"), 1000.0);
    assert_eq!(v("logdist_distributor_packets_accepted_total"), 40.0);
    assert_eq!(v("logdist_distributor_duplicate_packets_total"), 1.0);
    assert_eq!(
        v(r#"logdist_distributor_requests_rejected_total{reason="bad_packet"}"#),
        1.0
    );
    assert_eq!(
        v(r#"logdist_distributor_requests_rejected_total{reason="unsupported_media_type"}"#),
        1.0
    );
    let acknowledged: f64 = ["analyzer-1", "analyzer-2"]
        .iter()
        .map(|id| {
            v(&format!(
                r#"logdist_distributor_messages_acknowledged_total{{analyzer="{id}"}}"#
            ))
        })
        .sum();
    assert_eq!(acknowledged, 1000.0);
    assert_eq!(v("logdist_distributor_wal_pending_messages"), 0.0);
    // 40 new packets and the duplicate were acknowledged: 41 observations.
    assert_eq!(v("logdist_distributor_ack_latency_seconds_count"), 41.0);
    assert_eq!(
        v(r#"logdist_distributor_ack_latency_seconds_bucket{le="+Inf"}"#),
        41.0
    );
    for id in ["analyzer-1", "analyzer-2"] {
        assert_eq!(
            v(&format!(
                r#"logdist_distributor_analyzer_up{{analyzer="{id}"}}"#
            )),
            1.0
        );
        assert!(
            v(&format!(
                r#"logdist_distributor_send_latency_seconds_count{{analyzer="{id}"}}"#
            )) >= 1.0
        );
    }
    assert!(v(r#"logdist_distributor_wal_fdatasyncs_total{file="log"}"#) >= 1.0);
    promtool_check("the distributor's /metrics", &text);

    // The analyzers count the same messages from their side.
    let mut processed = 0.0;
    for x in &a {
        let (text, m) = scrape(&x.url).await;
        let key = format!(
            r#"logdist_analyzer_messages_processed_total{{analyzer="{}"}}"#,
            x.id
        );
        processed += m[&key];
        assert_eq!(
            m[&format!(r#"logdist_analyzer_enabled{{analyzer="{}"}}"#, x.id)],
            1.0
        );
        promtool_check("an analyzer's /metrics", &text);
    }
    assert_eq!(processed, 1000.0);
}
