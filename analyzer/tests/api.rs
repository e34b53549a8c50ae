//! The analyzer's HTTP API, against the real server on `127.0.0.1:0`.

use logdist_config::AnalyzerSettings;
use serde_json::{json, Value};
use std::collections::BTreeSet;
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = AnalyzerSettings {
        id: "analyzer-t".into(),
        port: addr.port(),
        dedup_capacity_packets,
        ..AnalyzerSettings::default()
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
