//! The analyzer's HTTP API, against the real server on `127.0.0.1:0`.

use logdist_config::AnalyzerSettings;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

struct TestApp {
    base: String,
    addr: std::net::SocketAddr,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn spawn_app(dedup_capacity_packets: usize) -> TestApp {
    spawn_app_with(AnalyzerSettings {
        dedup_capacity_packets,
        ..AnalyzerSettings::default()
    })
    .await
}

/// An analyzer keeping its audit log in `path`.
async fn spawn_app_with_audit_log(path: &Path) -> TestApp {
    spawn_app_with(AnalyzerSettings {
        dedup_capacity_packets: 100,
        audit_log: Some(path.to_owned()),
        ..AnalyzerSettings::default()
    })
    .await
}

/// The real server on `127.0.0.1:0` with `settings` (its id and port replaced).
async fn spawn_app_with(settings: AnalyzerSettings) -> TestApp {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = AnalyzerSettings {
        id: "analyzer-t".into(),
        port: addr.port(),
        ..settings
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(analyzer::run(listener, settings, async move {
        let _ = stopped.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        served: Some(served),
    }
}

impl TestApp {
    /// Stop the server and wait until `run` returned, so that nothing of it is left running.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), served)
                .await
                .expect("run did not return in time");
            assert!(result.unwrap().is_ok());
        }
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn post(&self, path: &str, content_type: &str, body: impl Into<Vec<u8>>) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body.into())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{path}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, value)
    }

    async fn analyze(&self, body: &Value) -> (u16, Value) {
        self.post("/analyze", "application/json", body.to_string())
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn processed(&self) -> Value {
        self.get("/processed").await.1
    }

    /// `/audit` as a set of identities, checking each line has exactly the three fields.
    async fn audit(&self) -> BTreeSet<(String, String, u64)> {
        let resp = self
            .client
            .get(format!("{}/audit", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            resp.headers()
                .get("content-type")
                .unwrap()
                .to_str()
                .unwrap(),
            "application/x-ndjson"
        );
        let text = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
        let mut set = BTreeSet::new();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let obj = v.as_object().unwrap();
            assert_eq!(obj.len(), 3, "{line}");
            let fresh = set.insert((
                obj["emitter_id"].as_str().unwrap().to_owned(),
                obj["packet_id"].as_str().unwrap().to_owned(),
                obj["index"].as_u64().unwrap(),
            ));
            assert!(fresh, "audit repeats {line}");
        }
        set
    }
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "analyzer-api-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn msg(level: &str, text: &str) -> Value {
    json!({"timestamp": 1_700_000_000_000u64, "level": level, "message": text})
}

fn packet(emitter: &str, packet: &str, messages: Vec<Value>) -> Value {
    json!({"emitter_id": emitter, "packet_id": packet, "messages": messages})
}

fn batch(packets: Vec<Value>) -> Value {
    json!({ "packets": packets })
}

fn identities(emitter: &str, packet: &str, count: u64) -> Vec<(String, String, u64)> {
    (0..count)
        .map(|i| (emitter.to_owned(), packet.to_owned(), i))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_processed_once_and_its_repeat_counts_as_duplicates() {
    // Arrange
    let app = spawn_app(100).await;
    let body = batch(vec![
        packet(
            "e1",
            "p1",
            vec![msg("INFO", "a"), msg("WARN", "b"), msg("INFO", "c")],
        ),
        packet("e2", "p1", vec![msg("INFO", "d"), msg("INFO", "e")]),
    ]);

    // Act
    let first = app.analyze(&body).await;
    let repeat = app.analyze(&body).await;

    // Assert
    assert_eq!(first, (200, json!({"processed": 5, "duplicates": 0})));
    assert_eq!(repeat, (200, json!({"processed": 0, "duplicates": 5})));
    assert_eq!(
        app.processed().await,
        json!({"processed": 5, "duplicates": 5})
    );
    let status = app.get("/status").await.1;
    assert_eq!(status["by_level"], json!({"INFO": 4, "WARN": 1}));
    assert_eq!(status["by_emitter"], json!({"e1": 3, "e2": 2}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_inside_one_request_is_counted_once() {
    // Arrange
    let app = spawn_app(100).await;
    let body = batch(vec![
        packet("e", "p", vec![msg("INFO", "a"), msg("INFO", "b")]),
        packet("e", "p", vec![msg("INFO", "a")]),
    ]);

    // Act
    let answer = app.analyze(&body).await;

    // Assert
    assert_eq!(answer, (200, json!({"processed": 2, "duplicates": 1})));
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_lists_exactly_the_identities_sent() {
    // Arrange: more packets than one audit chunk, and ids that need escaping.
    let app = spawn_app(10_000).await;
    let mut expected = BTreeSet::new();
    let mut packets = Vec::new();
    for p in 0..2500u64 {
        let count = 1 + p % 3;
        let (e, pid) = (format!("em\"{}", p % 7), format!("p-{p}"));
        packets.push(packet(
            &e,
            &pid,
            (0..count).map(|i| msg("INFO", &format!("m{i}"))).collect(),
        ));
        expected.extend(identities(&e, &pid, count));
    }
    let (status, _) = app.analyze(&batch(packets)).await;
    assert_eq!(status, 200);
    let (status, _) = app.post("/analyze", "application/json", json!({"emitter_id": "solo", "packet_id": "q", "index": 41, "timestamp": 1, "level": "I", "message": "m"}).to_string()).await;
    assert_eq!(status, 200);
    expected.insert(("solo".into(), "q".into(), 41));

    // Act
    let audited = app.audit().await;

    // Assert
    assert_eq!(audited.len(), expected.len());
    assert_eq!(audited, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_analyzer_refuses_with_503_records_nothing_and_accepts_again_after_enable() {
    // Arrange
    let app = spawn_app(100).await;
    let body = batch(vec![packet(
        "e",
        "p",
        vec![msg("INFO", "a"), msg("INFO", "b")],
    )]);

    // Act
    let disabled = app.post("/disable", "application/json", "").await;
    let disabled_again = app.post("/disable", "application/json", "").await;
    let refused = app.analyze(&body).await;
    let health_while_disabled = app.get("/health").await;
    let status_while_disabled = app.get("/status").await.1;
    let enabled = app.post("/enable", "application/json", "").await;
    let enabled_again = app.post("/enable", "application/json", "").await;
    let accepted = app.analyze(&body).await;

    // Assert
    assert_eq!(
        disabled,
        (200, json!({"id": "analyzer-t", "enabled": false}))
    );
    assert_eq!(disabled_again, disabled);
    assert_eq!(
        refused,
        (503, json!({"error": "analyzer analyzer-t is disabled"}))
    );
    assert_eq!(
        health_while_disabled,
        (503, json!({"status": "disabled", "id": "analyzer-t"}))
    );
    assert_eq!(status_while_disabled["enabled"], json!(false));
    assert_eq!(status_while_disabled["processed"], json!(0));
    assert_eq!(status_while_disabled["duplicates"], json!(0));
    assert_eq!(enabled, (200, json!({"id": "analyzer-t", "enabled": true})));
    assert_eq!(enabled_again, enabled);
    assert_eq!(
        accepted,
        (200, json!({"processed": 2, "duplicates": 0})),
        "nothing was recorded while disabled"
    );
    assert_eq!(
        app.get("/health").await,
        (200, json!({"status": "ok", "id": "analyzer-t"}))
    );
    assert_eq!(
        app.audit().await,
        identities("e", "p", 2).into_iter().collect()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_one_bad_message_is_refused_naming_it_and_records_nothing() {
    // Arrange
    let app = spawn_app(100).await;
    let bad = json!({"timestamp": "yesterday", "level": "INFO", "message": "x"});
    let body = batch(vec![
        packet("e", "good", vec![msg("INFO", "a")]),
        packet("e", "bad", vec![msg("INFO", "b"), msg("INFO", "c"), bad]),
    ]);

    // Act
    let (status, answer) = app.analyze(&body).await;

    // Assert
    assert_eq!(status, 400);
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("packet 1") && error.contains("\"bad\""),
        "{error}"
    );
    assert!(
        error.contains("message 2") && error.contains("timestamp"),
        "{error}"
    );
    assert_eq!(
        app.processed().await,
        json!({"processed": 0, "duplicates": 0})
    );
    assert!(app.audit().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identified_message_with_a_bad_field_is_refused_naming_its_identity() {
    // Arrange
    let app = spawn_app(100).await;
    let body = json!([
        {"emitter_id": "e", "packet_id": "p", "index": 0, "timestamp": 1, "level": "INFO", "message": "ok"},
        {"emitter_id": "e", "packet_id": "p", "index": 7, "timestamp": 1, "level": "", "message": "m"},
    ]);

    // Act
    let (status, answer) = app.analyze(&body).await;

    // Assert
    assert_eq!(status, 400);
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("message 1") && error.contains("index 7") && error.contains("`level`"),
        "{error}"
    );
    assert_eq!(
        app.processed().await,
        json!({"processed": 0, "duplicates": 0})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_gets_a_400_json_error_and_the_analyzer_keeps_serving() {
    // Arrange
    let app = spawn_app(100).await;

    // Act
    let bodies = [
        "{\"packets\": [",
        "42",
        "",
        "{\"packets\": [{\"emitter_id\": \"e\"}]}",
        "{\"packets\":[{\"emitter_id\":\"\",\"packet_id\":\"p\",\"messages\":[]}]}",
    ];
    let mut answers = Vec::new();
    for body in bodies {
        answers.push(app.post("/analyze", "application/json", body).await);
    }

    // Assert
    for ((status, answer), body) in answers.iter().zip(bodies) {
        assert_eq!(*status, 400, "{body}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}: {answer}"
        );
    }
    assert_eq!(app.get("/health").await.0, 200);
    let ok = app
        .analyze(&batch(vec![packet("e", "p", vec![msg("INFO", "a")])]))
        .await;
    assert_eq!(ok, (200, json!({"processed": 1, "duplicates": 0})));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_content_type_gets_a_415_json_error() {
    // Arrange
    let app = spawn_app(100).await;
    let body = batch(vec![packet("e", "p", vec![msg("INFO", "a")])]).to_string();

    // Act
    let plain = app.post("/analyze", "text/plain", body.clone()).await;
    let with_charset = app
        .post("/analyze", "application/json; charset=utf-8", body)
        .await;

    // Assert
    assert_eq!(plain.0, 415);
    assert!(plain.1["error"]
        .as_str()
        .unwrap()
        .contains("application/json"));
    assert_eq!(
        with_charset,
        (200, json!({"processed": 1, "duplicates": 0}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_gets_a_413_json_error_and_the_analyzer_keeps_serving() {
    // Arrange
    let app = spawn_app(100).await;
    let huge = vec![b' '; analyzer::MAX_BODY_BYTES + 1];

    // Act: once sent in full, once only announced by Content-Length.
    let sent = app.post("/analyze", "application/json", huge).await;
    let announced = {
        let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            analyzer::MAX_BODY_BYTES + 1
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };

    // Assert
    assert_eq!(sent.0, 413);
    assert!(sent.1["error"].as_str().unwrap().contains("larger than"));
    assert!(announced.starts_with("HTTP/1.1 413"), "{announced}");
    assert!(announced.contains("{\"error\":"), "{announced}");
    let ok = app
        .analyze(&batch(vec![packet("e", "p", vec![msg("INFO", "a")])]))
        .await;
    assert_eq!(ok.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_identified_message_and_an_array_of_them_are_accepted() {
    // Arrange
    let app = spawn_app(100).await;
    let one = json!({"emitter_id": "e", "packet_id": "p", "index": 0, "timestamp": "2024-05-01T12:00:00Z", "level": "info", "message": "one", "metadata": {"k": 1}});
    let many = json!([
        {"emitter_id": "e", "packet_id": "p", "index": 1, "timestamp": 5, "level": "INFO", "message": "two"},
        {"emitter_id": "e", "packet_id": "q", "index": 0, "timestamp": 6, "level": "INFO", "message": "three"},
    ]);

    // Act
    let single = app.analyze(&one).await;
    let array = app.analyze(&many).await;
    // The same identities in packet form are recognised as the same messages.
    let as_packet = app
        .analyze(&batch(vec![packet(
            "e",
            "p",
            vec![msg("INFO", "x"), msg("INFO", "y"), msg("INFO", "z")],
        )]))
        .await;

    // Assert
    assert_eq!(single, (200, json!({"processed": 1, "duplicates": 0})));
    assert_eq!(array, (200, json!({"processed": 2, "duplicates": 0})));
    assert_eq!(as_packet, (200, json!({"processed": 1, "duplicates": 2})));
    let mut expected: BTreeSet<_> = identities("e", "p", 3).into_iter().collect();
    expected.insert(("e".into(), "q".into(), 0));
    assert_eq!(app.audit().await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_capacity_forgets_the_oldest_packet_and_reports_it() {
    // Arrange
    let app = spawn_app(2).await;
    for p in ["p1", "p2", "p3"] {
        let (status, _) = app
            .analyze(&batch(vec![packet(
                "e",
                p,
                vec![msg("INFO", "a"), msg("INFO", "b")],
            )]))
            .await;
        assert_eq!(status, 200);
    }

    // Act
    let status = app.get("/status").await.1;
    let audited = app.audit().await;
    let repeat_of_forgotten = app
        .analyze(&batch(vec![packet("e", "p1", vec![msg("INFO", "a")])]))
        .await;
    let repeat_of_remembered = app
        .analyze(&batch(vec![packet("e", "p3", vec![msg("INFO", "a")])]))
        .await;

    // Assert
    assert_eq!(status["dedup_capacity_packets"], json!(2));
    assert_eq!(status["forgotten_packets"], json!(1));
    let mut expected: BTreeSet<_> = identities("e", "p2", 2).into_iter().collect();
    expected.extend(identities("e", "p3", 2));
    assert_eq!(
        audited, expected,
        "the forgotten packet is no longer audited"
    );
    assert_eq!(
        repeat_of_forgotten,
        (200, json!({"processed": 1, "duplicates": 0})),
        "a forgotten packet's repeat is not recognised"
    );
    assert_eq!(
        repeat_of_remembered,
        (200, json!({"processed": 0, "duplicates": 1}))
    );
    assert_eq!(app.get("/status").await.1["forgotten_packets"], json!(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_counts_levels_templates_and_the_error_rate_exactly() {
    // Arrange
    let app = spawn_app(100).await;
    let body = batch(vec![
        packet(
            "e1",
            "p",
            vec![
                msg("info", "user 42 logged in"),
                msg("INFO", "user 7 logged in"),
                msg("Error", "disk 3 full"),
                msg("fatal", "out of memory"),
            ],
        ),
        packet(
            "e2",
            "p",
            vec![
                msg("critical", "disk 99 full"),
                msg("warn", "user 1 logged in"),
                msg("debug", "tick"),
                msg("INFO", "tick"),
            ],
        ),
    ]);
    app.analyze(&body).await;
    app.analyze(&body).await;

    // Act
    let (code, status) = app.get("/status").await;

    // Assert
    assert_eq!(code, 200);
    assert_eq!(status["id"], json!("analyzer-t"));
    assert_eq!(status["enabled"], json!(true));
    assert_eq!(status["processed"], json!(8));
    assert_eq!(status["duplicates"], json!(8));
    assert_eq!(
        status["by_level"],
        json!({"INFO": 3, "ERROR": 1, "FATAL": 1, "CRITICAL": 1, "WARN": 1, "DEBUG": 1})
    );
    assert_eq!(status["by_emitter"], json!({"e1": 4, "e2": 4}));
    assert_eq!(status["errors"], json!(3));
    assert_eq!(status["error_rate"], json!(0.375));
    assert_eq!(
        status["top_templates"],
        json!([
            {"template": "user # logged in", "count": 3},
            {"template": "disk # full", "count": 2},
            {"template": "tick", "count": 2},
            {"template": "out of memory", "count": 1},
        ])
    );
    assert!(status["uptime_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_and_methods_get_json_errors() {
    // Arrange
    let app = spawn_app(100).await;

    // Act
    let missing = app.get("/nope").await;
    let wrong_method = app.get("/analyze").await;

    // Assert
    assert_eq!(missing.0, 404);
    assert!(missing.1["error"].is_string());
    assert_eq!(wrong_method.0, 405);
    assert!(wrong_method.1["error"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_returns_ok_once_the_shutdown_future_resolves() {
    // Arrange
    let mut app = spawn_app(100).await;
    assert_eq!(app.get("/health").await.0, 200);
    let served = app.served.take().unwrap();

    // Act
    app.stop.take().unwrap().send(()).unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(15), served).await;

    // Assert
    assert!(result.expect("run did not return in time").unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_body_growing_past_the_limit_gets_a_413_json_error() {
    // Arrange: no Content-Length, so only counting the bytes read can catch it.
    let app = spawn_app(100).await;
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let chunk_len = 1 << 20;
    let mut chunk = format!("{chunk_len:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', chunk_len));
    chunk.extend_from_slice(b"\r\n");

    // Act: send until the server stops reading (it may answer before the body ends).
    conn.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..=(analyzer::MAX_BODY_BYTES / chunk_len) {
        if conn.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw).await;
    let answer = String::from_utf8_lossy(&raw).into_owned();

    // Assert
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
    assert_eq!(app.get("/health").await.0, 200);
}

// ---- Fault injection -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn faults_are_shown_set_cleared_and_reported_in_status() {
    // Arrange
    let app = spawn_app(100).await;
    let none = json!({"latency_ms": 0, "error_rate": 0.0});

    // Act
    let initially = app.get("/faults").await;
    let set = app
        .post(
            "/faults",
            "application/json",
            r#"{"latency_ms": 5, "error_rate": 0.25}"#,
        )
        .await;
    let shown = app.get("/faults").await;
    let in_status = app.get("/status").await.1["faults"].clone();
    let only_latency = app
        .post("/faults", "application/json", r#"{"latency_ms": 7}"#)
        .await;
    let empty_object = app.post("/faults", "application/json", "{}").await;
    app.post("/faults", "application/json", r#"{"error_rate": 1}"#)
        .await;
    let deleted = app.delete("/faults").await;
    let finally = app.get("/faults").await;

    // Assert
    let some = json!({"latency_ms": 5, "error_rate": 0.25});
    assert_eq!(initially, (200, none.clone()));
    assert_eq!(set, (200, some.clone()));
    assert_eq!(shown, (200, some.clone()));
    assert_eq!(in_status, some);
    assert_eq!(
        only_latency,
        (200, json!({"latency_ms": 7, "error_rate": 0.0})),
        "a missing field means 0"
    );
    assert_eq!(empty_object, (200, none.clone()), "{{}} clears all faults");
    assert_eq!(deleted, (200, none.clone()));
    assert_eq!(finally, (200, none));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_faults_get_a_4xx_json_error_and_change_nothing() {
    // Arrange
    let app = spawn_app(100).await;
    let set = json!({"latency_ms": 3, "error_rate": 0.5});
    app.post("/faults", "application/json", set.to_string())
        .await;
    let cases = [
        ("application/json", "{\"error_rate\": ", 400),
        ("application/json", "", 400),
        ("application/json", "[]", 400),
        ("application/json", "null", 400),
        ("application/json", r#"{"error_rate": "0.5"}"#, 400),
        ("application/json", r#"{"error_rate": null}"#, 400),
        ("application/json", r#"{"error_rate": 1.5}"#, 400),
        ("application/json", r#"{"error_rate": -0.1}"#, 400),
        ("application/json", r#"{"error_rate": 1e999}"#, 400),
        ("application/json", r#"{"latency_ms": 600001}"#, 400),
        ("application/json", r#"{"latency_ms": -1}"#, 400),
        ("application/json", r#"{"latency_ms": 2.5}"#, 400),
        (
            "application/json",
            r#"{"latency_ms": 1, "eror_rate": 0.5}"#,
            400,
        ),
        ("text/plain", r#"{"latency_ms": 1}"#, 415),
    ];

    // Act
    let mut answers = Vec::new();
    for (content_type, body, _) in cases {
        answers.push(app.post("/faults", content_type, body).await);
    }
    let oversized = app
        .post("/faults", "application/json", vec![b' '; 1 << 20])
        .await;
    let put = app
        .client
        .put(format!("{}/faults", app.base))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();

    // Assert
    for ((status, answer), (_, body, expected)) in answers.iter().zip(cases) {
        assert_eq!(*status, expected, "{body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}: {answer}"
        );
    }
    let named = |i: usize, field: &str| {
        let error = answers[i].1["error"].as_str().unwrap_or_default();
        assert!(error.contains(field), "{}: {error}", cases[i].1);
    };
    named(6, "error_rate");
    named(9, "latency_ms");
    named(12, "eror_rate");
    assert_eq!(oversized.0, 413);
    assert!(oversized.1["error"].is_string());
    assert_eq!(put, 405);
    assert_eq!(app.get("/faults").await, (200, set));
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_latency_delays_analyze_by_at_least_the_latency() {
    // Arrange
    let app = spawn_app(100).await;
    app.post("/faults", "application/json", r#"{"latency_ms": 300}"#)
        .await;
    let body = batch(vec![packet("e", "p", vec![msg("INFO", "a")])]);

    // Act
    let started = Instant::now();
    let answer = app.analyze(&body).await;
    let elapsed = started.elapsed();

    // Assert
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert_eq!(answer, (200, json!({"processed": 1, "duplicates": 0})));
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_leave_health_status_and_audit_unaffected_while_analyze_waits() {
    // Arrange: every /analyze waits a minute and then fails.
    let app = spawn_app(100).await;
    app.post(
        "/faults",
        "application/json",
        r#"{"latency_ms": 60000, "error_rate": 1}"#,
    )
    .await;
    let slow = {
        let client = app.client.clone();
        let url = format!("{}/analyze", app.base);
        let body = batch(vec![packet("e", "p", vec![msg("INFO", "a")])]).to_string();
        tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
        })
    };

    // Act: while the request sleeps (both workers are free to answer).
    let health = app.get("/health").await;
    let status = app.get("/status").await;
    let audit = app.audit().await;

    // Assert
    assert_eq!(health, (200, json!({"status": "ok", "id": "analyzer-t"})));
    assert_eq!(status.0, 200);
    assert!(audit.is_empty());
    assert!(!slow.is_finished(), "the analyze request is still sleeping");
    slow.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn error_rate_one_half_fails_exactly_every_second_request_and_those_record_nothing() {
    // Arrange
    let app = spawn_app(100).await;
    let set = app
        .post("/faults", "application/json", r#"{"error_rate": 0.5}"#)
        .await;
    assert_eq!(set.0, 200);

    // Act: 10 requests, each with its own packet of 2 messages; a malformed request in between
    // gets its 400 and does not count.
    let mut answers = Vec::new();
    for p in 0..10 {
        let body = batch(vec![packet(
            "e",
            &format!("p{p}"),
            vec![msg("INFO", "a"), msg("INFO", "b")],
        )]);
        answers.push(app.analyze(&body).await);
        if p == 0 {
            let malformed = app.post("/analyze", "application/json", "{").await;
            assert_eq!(malformed.0, 400);
        }
    }

    // Assert
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 500].repeat(5));
    for (status, answer) in &answers {
        if *status == 500 {
            let error = answer["error"].as_str().unwrap();
            assert!(error.starts_with("injected fault: "), "{error}");
        } else {
            assert_eq!(*answer, json!({"processed": 2, "duplicates": 0}));
        }
    }
    let expected: BTreeSet<_> = (0..10)
        .step_by(2)
        .flat_map(|p| identities("e", &format!("p{p}"), 2))
        .collect();
    assert_eq!(
        app.audit().await,
        expected,
        "failed requests recorded nothing"
    );
    assert_eq!(
        app.processed().await,
        json!({"processed": 10, "duplicates": 0})
    );
}

// ---- Audit log -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_analyzer_replays_its_audit_log_and_counts_resent_messages_as_duplicates() {
    // Arrange: a first run records three packets (one of them in two requests) and a repeat.
    let dir = TempDir::new("restart");
    let log = dir.file("audit.ndjson");
    let first = spawn_app_with_audit_log(&log).await;
    let body = batch(vec![
        packet("e1", "p1", vec![msg("INFO", "a"), msg("ERROR", "b")]),
        packet("e2", "p1", vec![msg("INFO", "c")]),
    ]);
    assert_eq!(first.analyze(&body).await.0, 200);
    assert_eq!(first.analyze(&body).await.1["duplicates"], json!(3));
    let solo = json!({"emitter_id": "e3", "packet_id": "q", "index": 7, "timestamp": 1, "level": "I", "message": "m"});
    assert_eq!(first.analyze(&solo).await.0, 200);
    let before = first.audit().await;
    first.stop().await;

    // Act
    let second = spawn_app_with_audit_log(&log).await;
    let audited = second.audit().await;
    let status = second.get("/status").await.1;
    let resent = second.analyze(&body).await;
    let resent_solo = second.analyze(&solo).await;

    // Assert
    let mut expected: BTreeSet<_> = identities("e1", "p1", 2).into_iter().collect();
    expected.extend(identities("e2", "p1", 1));
    expected.insert(("e3".into(), "q".into(), 7));
    assert_eq!(before, expected);
    assert_eq!(audited, expected);
    assert_eq!(status["processed"], json!(4));
    assert_eq!(status["restored"], json!(4));
    assert_eq!(status["errors"], json!(0), "statistics are not restored");
    assert_eq!(resent, (200, json!({"processed": 0, "duplicates": 3})));
    assert_eq!(resent_solo, (200, json!({"processed": 0, "duplicates": 1})));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        3,
        "one line per packet per request that recorded something"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torn_last_audit_log_line_is_ignored_and_later_appends_stay_readable() {
    // Arrange: one whole line, then a write cut short by a kill.
    let dir = TempDir::new("torn");
    let log = dir.file("audit.ndjson");
    std::fs::write(
        &log,
        "{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"indexes\":[0,1]}\n{\"emitter_id\":\"e\",\"pac",
    )
    .unwrap();

    // Act
    let app = spawn_app_with_audit_log(&log).await;
    let audited = app.audit().await;
    let recorded = app
        .analyze(&batch(vec![packet("e", "r", vec![msg("INFO", "a")])]))
        .await;
    app.stop().await;
    let restarted = spawn_app_with_audit_log(&log).await;

    // Assert
    assert_eq!(audited, identities("e", "p", 2).into_iter().collect());
    assert_eq!(recorded, (200, json!({"processed": 1, "duplicates": 0})));
    let mut expected: BTreeSet<_> = identities("e", "p", 2).into_iter().collect();
    expected.extend(identities("e", "r", 1));
    assert_eq!(restarted.audit().await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_audit_log_line_before_the_last_fails_the_start_naming_the_line() {
    // Arrange
    let dir = TempDir::new("corrupt");
    let log = dir.file("audit.ndjson");
    let content = concat!(
        "{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"indexes\":[0]}\n",
        "garbage\n",
        "{\"emitter_id\":\"e\",\"packet_id\":\"q\",\"indexes\":[0]}\n",
    );
    std::fs::write(&log, content).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let settings = AnalyzerSettings {
        audit_log: Some(log.clone()),
        ..AnalyzerSettings::default()
    };

    // Act
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        analyzer::run(listener, settings, std::future::pending()),
    )
    .await
    .expect("run should fail at once");

    // Assert
    let err = format!(
        "{:#}",
        result.expect_err("a corrupt audit log must stop the start")
    );
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains(&log.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), content, "untouched");
}

/// The real binary, started with `--port 0 --audit-log <log>`; returns it and its address.
async fn start_binary(log: &Path) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_analyzer"))
        .args(["--id", "analyzer-k", "--port", "0", "--audit-log"])
        .arg(log)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("no `listening on` line in time")
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_analyzer_restarted_with_its_audit_log_lists_every_acknowledged_message() {
    // Arrange
    let dir = TempDir::new("sigkill");
    let log = dir.file("audit.ndjson");
    let (mut child, base) = start_binary(&log).await;
    let client = reqwest::Client::new();
    let mut acknowledged = BTreeSet::new();
    for p in 0..20 {
        let pid = format!("p{p}");
        let body = batch(vec![packet(
            "e",
            &pid,
            (0..5).map(|i| msg("INFO", &format!("m{i}"))).collect(),
        )]);
        let resp = client
            .post(format!("{base}/analyze"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        acknowledged.extend(identities("e", &pid, 5));
    }

    // Act: SIGKILL, no chance to flush or clean up; then start again on the same log.
    child.kill().await.unwrap();
    let (_restarted, base) = start_binary(&log).await;
    let app = TestApp {
        base,
        addr: "127.0.0.1:0".parse().unwrap(),
        client,
        stop: None,
        served: None,
    };

    // Assert
    assert_eq!(app.audit().await, acknowledged);
    let resent = app
        .analyze(&batch(vec![packet(
            "e",
            "p0",
            (0..5).map(|i| msg("INFO", &format!("m{i}"))).collect(),
        )]))
        .await;
    assert_eq!(resent, (200, json!({"processed": 0, "duplicates": 5})));
}
