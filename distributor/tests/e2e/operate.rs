//! Operating it live: circuit breakers, the admin API (weights, switching off and on,
//! registration and removal) and what survives a restart. Every test counts messages end to end.

use logdist_config::AnalyzerSettings;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::DRAIN;

/// Messages processed by each analyzer so far.
async fn processed_all(a: &[TestAnalyzer]) -> Vec<u64> {
    let mut v = Vec::new();
    for x in a {
        v.push(x.processed().await.0);
    }
    v
}

/// Each analyzer's share of the messages processed between `before` and `after` is its weight over
/// the sum of `weights`, within `tolerance` (a fraction of all messages).
fn assert_shares(before: &[u64], after: &[u64], weights: &[f64], tolerance: f64) {
    let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = got.iter().sum();
    let sum: f64 = weights.iter().sum();
    assert!(total > 0, "nothing processed");
    for (i, (g, w)) in got.iter().zip(weights).enumerate() {
        let share = *g as f64 / total as f64;
        assert!(
            (share - w / sum).abs() <= tolerance,
            "analyzer {} got {share:.4} of {total} messages, weight share {:.4} (counts {got:?})",
            i + 1,
            w / sum
        );
    }
}

const BREAKER: &str =
    "[breaker]\nfailure_threshold = 2\nrecovery_timeout_ms = 1500\nhalf_open_successes = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_goes_half_open_then_closes_and_the_analyzer_back_is_not_flooded() {
    // Arrange
    let a = analyzers(3).await;
    let d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], BREAKER).await;
    let client = d.client();
    let health = format!("{}/health", d.url);
    let second = |h: Value| h["analyzers"][1].clone();

    // Act: analyzer-2 goes down.
    a[1].disable().await;
    wait_until("analyzer-2's breaker open", DRAIN, || async {
        second(get_json(&health).await)["breaker"]["state"] == "open"
    })
    .await;

    // Assert: /health shows the open breaker, its failures and when it will try again.
    let b = second(get_json(&health).await);
    assert_eq!(b["healthy"], false, "{b}");
    assert_eq!(b["share"], 0.0, "{b}");
    assert!(
        b["breaker"]["consecutive_failures"].as_u64() >= Some(1),
        "{b}"
    );
    let next = b["breaker"]["next_probe_in_ms"]
        .as_u64()
        .expect("a time while open");
    assert!(next <= 1500, "{b}");

    // Act: 5,000 messages while it is down.
    let before = processed_all(&a).await;
    let mut acked = send_all(&client, packets(31, 100, 50), 4).await;
    d.wait_drained(DRAIN).await;
    let during = processed_all(&a).await;

    // Assert: it got none of them; the others shared them by weight (5:2).
    assert_eq!(during[1], before[1]);
    assert_shares(&before, &during, &[0.5, 0.0, 0.2], 0.02);

    // Act: it comes back.
    a[1].enable().await;
    wait_until("analyzer-2's breaker closed", DRAIN, || async {
        second(get_json(&health).await)["breaker"]["state"] == "closed"
    })
    .await;

    // Assert: the transitions were logged in order: open, half-open, closed.
    let log = d.log();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not logged"))
    };
    assert!(at("circuit breaker opened") < at("circuit breaker half-open"));
    assert!(at("circuit breaker half-open") < at("circuit breaker closed"));

    // Act: 5,000 more messages.
    acked.extend(send_all(&client, packets(32, 100, 50), 4).await);
    d.wait_drained(DRAIN).await;
    let after = processed_all(&a).await;

    // Assert: its share resumed from its return at its weight (0.3), not more to catch up on the
    // 5,000 it missed; every acknowledged message was processed exactly once.
    assert_shares(&during, &after, &[0.5, 0.3, 0.2], 0.02);
    let delivered = Delivered::collect(&a).await;
    delivered.assert_all_and_only(&acked);
    assert_eq!(delivered.duplicated(), 0);
    let metrics = get_text(&format!("{}/metrics", d.url)).await;
    assert!(
        metrics.contains(
            "logdist_distributor_breaker_state{analyzer=\"analyzer-2\",state=\"closed\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_changed_at_runtime_apply_at_once_survive_a_restart_and_bad_changes_get_a_4xx() {
    // Arrange
    let a = analyzers(3).await;
    let mut d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.3), (&a[2], 0.2)], "").await;
    let client = d.client();
    // Same port after the restart.
    let base = d.url.clone();
    let url = |path: &str| format!("{base}{path}");
    let mut acked = send_all(&client, packets(41, 100, 50), 4).await;
    d.wait_drained(DRAIN).await;
    let p0 = processed_all(&a).await;
    assert_shares(&[0, 0, 0], &p0, &[0.5, 0.3, 0.2], 0.02);

    // Act: new weights for two of them.
    let (status, body) = call(
        Method::PUT,
        &url("/admin/weights"),
        Some(json!({"analyzer-1": 0.1, "analyzer-3": 0.6})),
    )
    .await;

    // Assert: applied at once, shown by /health, and the next messages follow them.
    assert_eq!(status, 200, "{body}");
    let expected = json!({"analyzer-1": 0.1, "analyzer-2": 0.3, "analyzer-3": 0.6});
    assert_eq!(body, expected);
    let health = get_json(&url("/health")).await;
    let weights: Vec<f64> = (0..3)
        .map(|i| health["analyzers"][i]["weight"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, vec![0.1, 0.3, 0.6]);
    acked.extend(send_all(&client, packets(42, 100, 50), 4).await);
    d.wait_drained(DRAIN).await;
    let p1 = processed_all(&a).await;
    assert_shares(&p0, &p1, &[0.1, 0.3, 0.6], 0.02);

    // Act + Assert: bad changes are refused with a 4xx that says why, and change nothing.
    let cases: Vec<(Method, &str, &str, u16, &str)> = vec![
        (
            Method::PUT,
            "/admin/weights",
            r#"{"analyzer-9": 1}"#,
            404,
            "analyzer-9",
        ),
        (
            Method::PUT,
            "/admin/weights",
            r#"{"analyzer-1": -1}"#,
            400,
            "from 0 to",
        ),
        (
            Method::PUT,
            "/admin/weights",
            r#"{"analyzer-1": 0, "analyzer-2": 0, "analyzer-3": 0}"#,
            400,
            "positive weight",
        ),
        (
            Method::PUT,
            "/admin/weights",
            r#"{"analyzer-1": 1, "analyzer-1": 2}"#,
            400,
            "more than once",
        ),
        (
            Method::PUT,
            "/admin/weights",
            "not json",
            400,
            "not valid JSON",
        ),
        (
            Method::POST,
            "/admin/analyzers",
            r#"{"id": "analyzer-2", "endpoint": "http://127.0.0.1:1"}"#,
            409,
            "already registered",
        ),
        (
            Method::PUT,
            "/admin/analyzers/x",
            r#"{"weight": 1}"#,
            400,
            "endpoint",
        ),
        (
            Method::PUT,
            "/admin/analyzers/x",
            r#"{"endpoint": "http://127.0.0.1:1", "colour": 1}"#,
            400,
            "colour",
        ),
        (
            Method::PUT,
            "/admin/analyzers/x",
            r#"{"endpoint": "ftp://h"}"#,
            400,
            "http://",
        ),
        (Method::DELETE, "/admin/analyzers/nope", "", 404, "nope"),
        (
            Method::POST,
            "/admin/analyzers/nope/disable",
            "",
            404,
            "nope",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let r = http()
            .request(method.clone(), url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let answer: Value = r.json().await.unwrap();
        let error = answer["error"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        assert!(error.contains(needle), "{method} {path} {body}: {error}");
    }
    let plain = http()
        .post(url("/admin/analyzers/analyzer-1/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415, "a change must be declared JSON");
    let huge = format!(r#"{{"analyzer-1": 1, "x": "{}"}}"#, "y".repeat(100_000));
    let (status, body) = call(
        Method::PUT,
        &url("/admin/weights"),
        Some(serde_json::from_str(&huge).unwrap()),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(get_json(&url("/admin/weights")).await, expected);
    assert!(get_json(&url("/admin/analyzers/analyzer-1")).await["enabled"] == true);

    // Act: a graceful restart.
    assert!(d.terminate().success());
    d.restart().await;

    // Assert: the weights came back from the WAL's directory, not the config file.
    let list = get_json(&url("/admin/analyzers")).await;
    assert_eq!(list["source"], "stored", "{list}");
    assert_eq!(get_json(&url("/admin/weights")).await, expected);
    acked.extend(send_all(&d.client(), packets(43, 100, 50), 4).await);
    d.wait_drained(DRAIN).await;
    let p2 = processed_all(&a).await;
    assert_shares(&p1, &p2, &[0.1, 0.3, 0.6], 0.02);
    Delivered::collect(&a).await.assert_all_and_only(&acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyzer_registers_itself_is_switched_off_and_on_and_leaves_on_a_graceful_stop_losing_nothing(
) {
    // Arrange: a distributor that knows only analyzer-1; analyzer-2 registers itself.
    let a1 = TestAnalyzer::spawn("analyzer-1").await;
    let d = Distributor::start(&[(&a1, 1.0)], "").await;
    let url = |path: &str| format!("{}{path}", d.url);
    let audit = tempfile::tempdir().unwrap();
    let audit_log = audit.path().join("analyzer-2.ndjson");
    let a2 = TestAnalyzer::spawn_with(AnalyzerSettings {
        id: "analyzer-2".into(),
        register_url: Some(d.url.clone()),
        register_weight: Some(1.0),
        audit_log: Some(audit_log.clone()),
        ..AnalyzerSettings::default()
    })
    .await;
    let listed = |id: &'static str| {
        let list = url("/admin/analyzers");
        async move {
            get_json(&list).await["analyzers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == id)
        }
    };
    wait_until("analyzer-2 registered", DRAIN, || listed("analyzer-2")).await;
    let client = d.client();

    // Act: traffic with both.
    let mut acked = send_all(&client, packets(51, 40, 50), 4).await;
    d.wait_drained(DRAIN).await;

    // Assert: half each (40 packets: within one packet of 50 messages).
    let (n1, n2) = (a1.processed().await.0, a2.processed().await.0);
    assert_shares(&[0, 0], &[n1, n2], &[1.0, 1.0], 0.03);

    // Act: switch analyzer-2 off from the distributor's side, send, switch it on.
    let (status, body) = call(
        Method::POST,
        &url("/admin/analyzers/analyzer-2/disable"),
        None,
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["enabled"]),
        (200, &json!(false)),
        "{body}"
    );
    acked.extend(send_all(&client, packets(52, 40, 50), 4).await);
    d.wait_drained(DRAIN).await;

    // Assert: nothing new reached it while off.
    assert_eq!(a2.processed().await.0, n2);
    let (status, body) = call(
        Method::POST,
        &url("/admin/analyzers/analyzer-2/enable"),
        None,
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["enabled"]),
        (200, &json!(true)),
        "{body}"
    );

    // Act: stop analyzer-2 gracefully while packets stream in.
    let streaming = {
        let client = d.client();
        tokio::spawn(async move { send_all(&client, packets(53, 300, 20), 4).await })
    };
    wait_until("analyzer-2 gets traffic again", DRAIN, || async {
        a2.processed().await.0 > n2
    })
    .await;
    a2.stop_gracefully().await;

    // Assert: it deregistered (drained, then removed), and nothing was lost: what it processed
    // (read back from its audit log) and what analyzer-1 processed cover every acknowledged message.
    wait_until("analyzer-2 removed", DRAIN, || async {
        !listed("analyzer-2").await
    })
    .await;
    assert!(
        d.log().contains("analyzer drained and removed"),
        "{}",
        d.log()
    );
    acked.extend(streaming.await.unwrap());
    d.wait_drained(DRAIN).await;
    let reader = TestAnalyzer::spawn_with(AnalyzerSettings {
        id: "analyzer-2".into(),
        audit_log: Some(audit_log),
        ..AnalyzerSettings::default()
    })
    .await;
    let delivered = Delivered::collect(&[a1, reader]).await;
    assert_eq!(delivered.lost(&acked), vec![]);
    assert_eq!(delivered.by_id.len(), acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_log_line_is_a_json_object_with_its_fields() {
    // Arrange: restart with LOG_FORMAT=json, so the log holds text lines, then JSON ones.
    let a = analyzers(2).await;
    let mut d = Distributor::start(&[(&a[0], 0.5), (&a[1], 0.5)], BREAKER).await;
    assert!(d.terminate().success());
    let text_part = d.log().len();
    d.env.push(("LOG_FORMAT".into(), "json".into()));
    d.restart().await;

    // Act: a breaker transition.
    a[1].disable().await;
    let health = format!("{}/health", d.url);
    wait_until("analyzer-2's breaker open", DRAIN, || async {
        get_json(&health).await["analyzers"][1]["breaker"]["state"] == "open"
    })
    .await;

    // Assert: every line since the restart is a JSON object; the transition carries its fields.
    let log = d.log();
    let lines: Vec<Value> = log[text_part..]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let opened = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("circuit breaker opened"))
        })
        .unwrap_or_else(|| panic!("no breaker transition in {lines:?}"));
    assert_eq!(opened["level"], "WARN", "{opened}");
    assert_eq!(opened["fields"]["analyzer"], "analyzer-2", "{opened}");
    assert_eq!(opened["fields"]["from"], "closed", "{opened}");
    assert_eq!(opened["fields"]["to"], "open", "{opened}");
    assert!(opened["timestamp"].is_string(), "{opened}");
}
