//! Bad requests a distributor meets in the wild, each with the answer it must get: a 4xx with a
//! JSON `error` (or, for a body that never finishes, a 408 or a closed connection).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tokio::time::Instant;

/// What happened to one bad request. `problem` is `None` when it was refused as it should be.
#[derive(Debug)]
pub struct Outcome {
    pub case: &'static str,
    pub problem: Option<String>,
}

fn message(text: &str) -> String {
    format!(
        "{{\"timestamp\":\"2026-01-01T00:00:00Z\",\"level\":\"INFO\",\"message\":{}}}",
        serde_json::Value::from(text)
    )
}

fn packet(packet_id: &str, messages: &[String]) -> Vec<u8> {
    format!(
        "{{\"emitter_id\":\"bad-input\",\"packet_id\":\"{packet_id}\",\"messages\":[{}]}}",
        messages.join(",")
    )
    .into_bytes()
}

/// `(case, content type, body, acceptable statuses)`.
fn cases() -> Vec<(&'static str, &'static str, Vec<u8>, &'static [u16])> {
    let one = vec![message("ok")];
    let mut invalid_utf8 = packet("utf8", &one);
    let at = invalid_utf8.len() - 10;
    invalid_utf8[at] = 0xff;
    vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"emitter_id\": \"a\", ".to_vec(),
            &[400],
        ),
        (
            "wrong types",
            "application/json",
            b"{\"emitter_id\":5,\"packet_id\":[1],\"messages\":\"many\"}".to_vec(),
            &[400],
        ),
        (
            "missing packet_id",
            "application/json",
            format!("{{\"emitter_id\":\"bad-input\",\"messages\":[{}]}}", one[0]).into_bytes(),
            &[400],
        ),
        (
            "empty packet",
            "application/json",
            packet("empty", &[]),
            &[400],
        ),
        (
            "message without level",
            "application/json",
            packet(
                "nolevel",
                &["{\"timestamp\":\"2026-01-01T00:00:00Z\",\"message\":\"x\"}".to_owned()],
            ),
            &[400],
        ),
        (
            "bad timestamp",
            "application/json",
            packet(
                "badts",
                &["{\"timestamp\":\"yesterday\",\"level\":\"INFO\",\"message\":\"x\"}".to_owned()],
            ),
            &[400],
        ),
        (
            "too many messages",
            "application/json",
            packet("many", &vec![message("m"); 1001]),
            &[400, 413],
        ),
        (
            "huge packet (5 MiB)",
            "application/json",
            packet("huge", &vec![message(&"x".repeat(1024)); 5 * 1024]),
            &[413],
        ),
        (
            "huge single message (3 MiB)",
            "application/json",
            packet("hugemsg", &[message(&"y".repeat(3 << 20))]),
            &[400, 413],
        ),
        (
            "overlong emitter_id",
            "application/json",
            format!(
                "{{\"emitter_id\":\"{}\",\"packet_id\":\"p\",\"messages\":[{}]}}",
                "e".repeat(200),
                one[0]
            )
            .into_bytes(),
            &[400],
        ),
        ("invalid UTF-8", "application/json", invalid_utf8, &[400]),
        (
            "wrong content type",
            "text/plain",
            packet("ctype", &one),
            &[415],
        ),
    ]
}

/// Send every case to `base_url` (a distributor), then a slow-loris body, and report each.
pub async fn run_all(
    http: &reqwest::Client,
    base_url: &str,
    body_timeout: Duration,
) -> Vec<Outcome> {
    let url = format!("{}/logs", base_url.trim_end_matches('/'));
    let mut outcomes = Vec::new();
    for (case, content_type, body, expected) in cases() {
        let problem = match http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
        {
            // A server may close the connection on an oversized body before reading it all.
            Err(e) if expected.contains(&413) && (e.is_request() || e.is_body()) => None,
            Err(e) => Some(format!("no answer: {e}")),
            Ok(answer) => {
                let status = answer.status().as_u16();
                let body = answer.bytes().await.unwrap_or_default();
                let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                let error = json
                    .as_ref()
                    .and_then(|j| j["error"].as_str())
                    .map(str::to_owned);
                if !expected.contains(&status) {
                    Some(format!("answered {status}, expected one of {expected:?}"))
                } else if error.as_deref().is_none_or(str::is_empty) {
                    Some(format!("{status} without a JSON error"))
                } else {
                    None
                }
            }
        };
        outcomes.push(Outcome { case, problem });
    }
    let addr = base_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let slow = tokio::task::spawn_blocking(move || slow_loris(&addr, body_timeout)).await;
    outcomes.push(Outcome {
        case: "slow-loris body",
        problem: match slow {
            Ok(result) => result.err(),
            Err(e) => Some(format!("slow-loris task failed: {e}")),
        },
    });
    outcomes
}

/// Announce a body, send a few bytes of it, then stall. The server must answer 408 or close the
/// connection within the body timeout (plus slack), never wait for ever.
fn slow_loris(addr: &str, body_timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    let slack = Duration::from_secs(10);
    stream
        .set_read_timeout(Some(body_timeout + slack))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST /logs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"emitter_id\":"
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("cannot write: {e}"))?;
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "still open after {:.1} s with a stalled body",
                    started.elapsed().as_secs_f64()
                ))
            }
            // A reset is a closed connection too.
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    if answer.is_empty() || text.starts_with("HTTP/1.1 408") {
        Ok(())
    } else {
        Err(format!(
            "expected 408 or a closed connection, got {:?}",
            text.lines().next().unwrap_or_default()
        ))
    }
}
