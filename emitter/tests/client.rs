//! The emitter against a fake distributor made in the test: the retry rules of
//! `DistributorClient` with exact attempt counts, and the HTTP API of the real server.

use actix_web::dev::ServerHandle;
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpResponse, HttpServer};
use emitter::generate::Generator;
use emitter::{DistributorClient, OutPacket, SendError};
use logdist_config::EmitterSettings;
use logdist_proto::{parse_packet, Limits};
use std::collections::{HashSet, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Every wait in these tests gives up after this long.
const BOUND: Duration = Duration::from_secs(20);

/// One scripted answer of the fake distributor.
#[derive(Clone)]
struct Reply {
    status: u16,
    retry_after: Option<&'static str>,
    body: &'static str,
}

fn reply(status: u16, body: &'static str) -> Reply {
    Reply {
        status,
        retry_after: None,
        body,
    }
}

#[derive(Default)]
struct FakeState {
    /// Answers for the next requests, in order; when empty, `fallback` or real acceptance.
    script: Mutex<VecDeque<Reply>>,
    fallback: Option<Reply>,
    /// Every request body received, in order.
    bodies: Mutex<Vec<Vec<u8>>>,
    /// Accepted `(emitter_id, packet_id, count)`, for the duplicate answer.
    accepted: Mutex<Vec<(String, String, u32)>>,
}

struct FakeDistributor {
    url: String,
    state: Arc<FakeState>,
    handle: ServerHandle,
}

impl FakeDistributor {
    fn requests(&self) -> usize {
        self.state.bodies.lock().unwrap().len()
    }
    fn bodies(&self) -> Vec<Vec<u8>> {
        self.state.bodies.lock().unwrap().clone()
    }
    fn accepted(&self) -> Vec<(String, String, u32)> {
        self.state.accepted.lock().unwrap().clone()
    }
}

/// Accepts like the real distributor (202, or 200 duplicate) unless the script says otherwise.
async fn logs(state: web::Data<FakeState>, body: Bytes) -> HttpResponse {
    state.bodies.lock().unwrap().push(body.to_vec());
    let scripted = state.script.lock().unwrap().pop_front();
    if let Some(r) = scripted.or_else(|| state.fallback.clone()) {
        let mut answer =
            HttpResponse::build(actix_web::http::StatusCode::from_u16(r.status).unwrap());
        if let Some(secs) = r.retry_after {
            answer.insert_header(("Retry-After", secs));
        }
        return answer.content_type("application/json").body(r.body);
    }
    let packet = match parse_packet(&body, &Limits::default()) {
        Ok(p) => p,
        Err(e) => {
            return HttpResponse::BadRequest().json(serde_json::json!({"error": e.to_string()}))
        }
    };
    let key = (
        packet.emitter_id.to_string(),
        packet.packet_id.to_string(),
        packet.count,
    );
    let mut accepted = state.accepted.lock().unwrap();
    if accepted.iter().any(|(e, p, _)| *e == key.0 && *p == key.1) {
        return HttpResponse::Ok().json(serde_json::json!({
            "status": "accepted", "duplicate": true, "packet_id": key.1, "count": key.2}));
    }
    let count = key.2;
    let packet_id = key.1.clone();
    accepted.push(key);
    HttpResponse::Accepted()
        .json(serde_json::json!({"status": "accepted", "packet_id": packet_id, "count": count}))
}

fn spawn_fake_on(
    listener: TcpListener,
    script: Vec<Reply>,
    fallback: Option<Reply>,
) -> FakeDistributor {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = web::Data::new(FakeState {
        script: Mutex::new(script.into()),
        fallback,
        ..FakeState::default()
    });
    let app_state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .route("/logs", web::post().to(logs))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    FakeDistributor {
        url,
        state: state.into_inner(),
        handle,
    }
}

fn spawn_fake(script: Vec<Reply>, fallback: Option<Reply>) -> FakeDistributor {
    spawn_fake_on(TcpListener::bind("127.0.0.1:0").unwrap(), script, fallback)
}

fn packet(messages: u32) -> OutPacket {
    Generator::new("test-run", 1).next_packet("emitter-1", messages)
}

fn client(url: &str) -> DistributorClient {
    DistributorClient::new(url, Duration::from_secs(2))
        .unwrap()
        .with_max_backoff(Duration::from_millis(100))
}

/// Poll `condition` until it holds; panic after [`BOUND`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_with_retry_after_is_waited_out_and_the_same_packet_is_sent_again() {
    // Arrange
    let busy = Reply {
        status: 503,
        retry_after: Some("1"),
        body: r#"{"error":"too many pending messages"}"#,
    };
    let fake = spawn_fake(vec![busy], None);
    let client = client(&fake.url);
    let started = Instant::now();

    // Act
    let ack = client
        .send_until_acknowledged(&packet(3), None)
        .await
        .unwrap();

    // Assert
    assert_eq!((ack.attempts, ack.count, ack.duplicate), (2, 3, false));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let bodies = fake.bodies();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1], "a retry must resend the same bytes");
    assert_eq!(client.retry_counter().load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried_with_backoff_until_acknowledged() {
    let fake = spawn_fake(vec![reply(500, "oops"), reply(502, "bad gateway")], None);
    let client = client(&fake.url);

    let ack = client
        .send_until_acknowledged(&packet(2), None)
        .await
        .unwrap();

    assert_eq!(ack.attempts, 3);
    assert_eq!(fake.requests(), 3);
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_is_retried_until_a_distributor_appears_on_the_port() {
    // Arrange: a port with nothing listening on it.
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let client = client(&format!("http://{addr}"));
    let retries = client.retry_counter();
    let sending = {
        let client = client.clone();
        tokio::spawn(async move { client.send_until_acknowledged(&packet(4), None).await })
    };

    // Act: let it fail a few times, then start the distributor on that port.
    eventually("three refused tries", || {
        retries.load(Ordering::Relaxed) >= 3
    })
    .await;
    let listener = TcpListener::bind(addr).unwrap();
    let fake = spawn_fake_on(listener, vec![], None);
    let ack = tokio::time::timeout(BOUND, sending)
        .await
        .expect("acknowledged in time")
        .unwrap()
        .unwrap();

    // Assert: every try but the last was refused, and the last one reached the distributor.
    let retried = retries.load(Ordering::Relaxed);
    assert!(retried >= 3);
    assert_eq!(u64::from(ack.attempts), retried + 1);
    assert_eq!(fake.requests(), 1);
    assert_eq!(ack.count, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_is_a_permanent_rejection_carrying_the_error_text_and_is_not_retried() {
    let fake = spawn_fake(
        vec![reply(
            400,
            r#"{"error":"message 0: `level` must not be empty"}"#,
        )],
        None,
    );
    let client = client(&fake.url);

    let outcome = client.send_until_acknowledged(&packet(1), None).await;

    assert_eq!(
        outcome,
        Err(SendError::Rejected {
            status: 400,
            error: "message 0: `level` must not be empty".into()
        })
    );
    assert_eq!(fake.requests(), 1);
    assert_eq!(client.retry_counter().load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_answer_counts_as_acknowledged() {
    let fake = spawn_fake(
        vec![reply(
            200,
            r#"{"status":"accepted","duplicate":true,"packet_id":"x","count":5}"#,
        )],
        None,
    );
    let client = client(&fake.url);

    let ack = client
        .send_until_acknowledged(&packet(5), None)
        .await
        .unwrap();

    assert_eq!((ack.attempts, ack.count, ack.duplicate), (1, 5, true));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_stops_the_retries_and_names_the_last_error() {
    let fake = spawn_fake(vec![], Some(reply(500, r#"{"error":"disk on fire"}"#)));
    let client = client(&fake.url);
    let started = Instant::now();

    let outcome = client
        .send_until_acknowledged(
            &packet(1),
            Some(Instant::now() + Duration::from_millis(400)),
        )
        .await;

    match outcome {
        Err(SendError::DeadlineExceeded { last_error }) => {
            assert!(
                last_error.contains("500") && last_error.contains("disk on fire"),
                "{last_error}"
            )
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(fake.requests() >= 2);
}

// --- the emitter's own API -------------------------------------------------------------------

struct Emitter {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl Emitter {
    async fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
        )
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/stats").await.1).unwrap()
    }

    /// Trigger the shutdown future and wait for `run` to return.
    async fn shut_down(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(BOUND, self.task)
            .await
            .expect("the emitter stopped in time")
            .unwrap()
            .unwrap();
    }
}

fn spawn_emitter(distributor_url: &str) -> Emitter {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let settings = EmitterSettings {
        distributor_url: distributor_url.to_owned(),
        max_backoff_ms: 100,
        ..EmitterSettings::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(emitter::run(listener, settings, async move {
        let _ = stopped.await;
    }));
    Emitter {
        url,
        stop: Some(stop),
        task,
        http: reqwest::Client::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_sends_one_packet_per_emitter_and_acknowledged_lists_them() {
    // Arrange
    let fake = spawn_fake(vec![], None);
    let emitter = spawn_emitter(&fake.url);

    // Act
    let (status, answer) = emitter.post("/generate", "").await;
    let (ack_status, ndjson) = emitter.get("/acknowledged").await;

    // Assert
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["packets"], 5);
    assert_eq!(answer["messages"], 250);
    assert_eq!(answer["acknowledged_messages"], 250);
    assert_eq!(answer["duplicate_acks"], 0);
    assert!(answer["elapsed_ms"].is_u64());
    assert_eq!(ack_status, 200);
    let listed: HashSet<(String, String, u32)> = ndjson
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["emitter_id"].as_str().unwrap().to_owned(),
                v["packet_id"].as_str().unwrap().to_owned(),
                v["count"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    let accepted: HashSet<_> = fake.accepted().into_iter().collect();
    assert_eq!(listed.len(), 5);
    assert_eq!(
        listed, accepted,
        "acknowledged must be exactly what the distributor accepted"
    );
    let emitters: HashSet<&str> = listed.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(
        emitters,
        HashSet::from([
            "emitter-1",
            "emitter-2",
            "emitter-3",
            "emitter-4",
            "emitter-5"
        ])
    );
    let stats = emitter.stats().await;
    assert_eq!(stats["messages_acknowledged"], 250);
    assert_eq!(stats["running"], false);
    emitter.shut_down().await;
    fake.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_answers_502_with_the_first_error_when_the_distributor_refuses() {
    let fake = spawn_fake(vec![], Some(reply(400, r#"{"error":"nope"}"#)));
    let emitter = spawn_emitter(&fake.url);

    let (status, answer) = emitter.post("/generate", r#"{"batches": 2}"#).await;

    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["packets"], 10);
    assert_eq!(answer["failed"], 10);
    assert_eq!(answer["acknowledged_messages"], 0);
    assert!(
        answer["error"].as_str().unwrap().contains("nope"),
        "{answer}"
    );
    assert_eq!(emitter.stats().await["permanent_failures"], 10);
    emitter.shut_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_json_error() {
    let fake = spawn_fake(vec![], None);
    let emitter = spawn_emitter(&fake.url);

    for body in [
        r#"{"batches": 0}"#,
        r#"{"batches": 10001}"#,
        "{not json",
        r#"{"batchez": 1}"#,
    ] {
        let (status, answer) = emitter.post("/generate", body).await;
        assert_eq!(status, 400, "{body}");
        assert!(answer["error"].is_string(), "{body} -> {answer}");
    }
    let (status, answer) = emitter.post("/start", r#"{"rate": 0}"#).await;
    assert_eq!(status, 400);
    assert!(answer["error"].is_string());
    let (status, body) = emitter.get("/nowhere").await;
    assert_eq!(status, 404);
    assert!(body.contains("error"));
    assert_eq!(fake.requests(), 0);
    emitter.shut_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_and_stop_are_idempotent_and_continuous_generation_is_acknowledged() {
    let fake = spawn_fake(vec![], None);
    let emitter = spawn_emitter(&fake.url);

    // Start twice: the same state.
    for _ in 0..2 {
        let (status, answer) = emitter.post("/start", r#"{"rate": 2000}"#).await;
        assert_eq!(status, 200);
        assert_eq!(
            answer,
            serde_json::json!({"running": true, "rate_messages_per_sec": 2000})
        );
    }
    let deadline = Instant::now() + BOUND;
    loop {
        let stats = emitter.stats().await;
        if stats["packets_acknowledged"].as_u64().unwrap() >= 5 {
            assert_eq!(stats["running"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "continuous generation sent nothing: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Stop twice: the same state.
    for _ in 0..2 {
        let (status, answer) = emitter.post("/stop", "").await;
        assert_eq!(status, 200);
        assert_eq!(
            answer,
            serde_json::json!({"running": false, "rate_messages_per_sec": 2000})
        );
    }
    // Once the in-flight sends finish, nothing more is sent.
    let deadline = Instant::now() + BOUND;
    let settled = loop {
        let s = emitter.stats().await;
        if s["packets_sent"] == s["packets_acknowledged"] {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "in-flight sends never finished: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(settled["running"], false);
    let (_, ndjson) = emitter.get("/acknowledged").await;
    assert_eq!(
        ndjson.lines().count() as u64,
        settled["packets_acknowledged"].as_u64().unwrap()
    );
    emitter.shut_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_returns_even_while_sends_are_retrying_against_a_dead_distributor() {
    let dead = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", probe.local_addr().unwrap())
    };
    let emitter = spawn_emitter(&dead);
    let (status, _) = emitter.post("/start", r#"{"rate": 500}"#).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + BOUND;
    while emitter.stats().await["retries"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline, "no retries observed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    emitter.shut_down().await;
}
