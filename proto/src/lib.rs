//! Wire types shared by the logdist services.
//!
//! Three shapes cross the network:
//!
//! * a **packet**, `POST /logs` on the distributor:
//!   `{"emitter_id": str, "packet_id": str, "messages": [message, ...]}`;
//! * a **message**: `{"timestamp": ms-int | RFC 3339 str, "level": str, "message": str, "metadata": {..}?}`;
//! * an **analyzer batch**, `POST /analyze` on an analyzer: `{"packets": [packet, ...]}`, where every
//!   packet is whole, so the identity of a message is implied by its position.
//!
//! A message's identity is [`MessageId`]: `(emitter_id, packet_id, index)`, `index` counting from 0
//! within the packet. It is fixed when the distributor accepts the packet and never changes across
//! retries, redeliveries or restarts (invariant 3), because the distributor stores and forwards the
//! packet's message array byte for byte.
//!
//! Parsing is "parse, don't validate": [`parse_packet`] turns bytes into a [`Packet`] whose fields
//! are known to be well formed, or into a [`PacketError`] that names the offending field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

pub mod metrics;
pub mod probe;
mod timestamp;
pub use timestamp::{check_timestamp, TimestampError};

/// Identity of one message, from accept to analyzer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    pub emitter_id: String,
    pub packet_id: String,
    /// Position of the message in its packet, from 0.
    pub index: u32,
}

/// Limits applied while parsing a packet. Everything beyond them is refused, never truncated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages one packet may carry.
    pub max_messages: usize,
    /// Longest `emitter_id` / `packet_id`, in bytes.
    pub max_id_bytes: usize,
    /// Longest `level`, in bytes.
    pub max_level_bytes: usize,
    /// Longest message, in bytes of its JSON object as sent.
    pub max_message_bytes: usize,
}

/// Default (and largest configurable) [`Limits::max_message_bytes`]: 1 MiB, like Kafka's default
/// `message.max.bytes`. Analyzers check messages against the default, so the distributor may only
/// lower it.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 1000,
            max_id_bytes: 128,
            max_level_bytes: 32,
            max_message_bytes: MAX_MESSAGE_BYTES,
        }
    }
}

/// A packet that passed every check. Borrowed from the request body: the message array is kept as
/// the exact bytes the emitter sent, so storing and forwarding it never re-encodes a message.
#[derive(Debug)]
pub struct Packet<'a> {
    pub emitter_id: Cow<'a, str>,
    pub packet_id: Cow<'a, str>,
    /// The `messages` array, verbatim (`[...]`).
    pub raw_messages: &'a str,
    /// Number of messages in `raw_messages` (at least 1).
    pub count: u32,
}

/// Why a packet or a message was refused. Every variant is the client's fault (a 4xx).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The body is not JSON of the expected shape (serde's message names the field and position).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A required string field is empty.
    #[error("field `{0}` must not be empty")]
    EmptyField(&'static str),
    /// An identifier is longer than the limit.
    #[error("field `{field}` is {len} bytes, longer than the limit of {limit}")]
    TooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    /// `messages` is an empty array.
    #[error("field `messages` must hold at least one message")]
    NoMessages,
    /// More messages than `Limits::max_messages`.
    #[error("packet holds {count} messages, more than the limit of {limit}")]
    TooManyMessages { count: usize, limit: usize },
    /// One message is wrong; `index` is its position in the packet.
    #[error("message {index}: {reason}")]
    BadMessage { index: usize, reason: String },
}

#[derive(Deserialize)]
struct PacketWire<'a> {
    #[serde(borrow)]
    emitter_id: Cow<'a, str>,
    #[serde(borrow)]
    packet_id: Cow<'a, str>,
    #[serde(borrow)]
    messages: &'a RawValue,
}

/// Parse and check a packet body.
pub fn parse_packet<'a>(body: &'a [u8], limits: &Limits) -> Result<Packet<'a>, PacketError> {
    let body = utf8(body).map_err(PacketError::Malformed)?;
    let wire: PacketWire<'a> =
        serde_json::from_str(body).map_err(|e| PacketError::Malformed(e.to_string()))?;
    check_id("emitter_id", &wire.emitter_id, limits)?;
    check_id("packet_id", &wire.packet_id, limits)?;
    let messages: Vec<&RawValue> = serde_json::from_str(wire.messages.get())
        .map_err(|e| PacketError::Malformed(format!("field `messages` must be an array: {e}")))?;
    if messages.is_empty() {
        return Err(PacketError::NoMessages);
    }
    if messages.len() > limits.max_messages {
        return Err(PacketError::TooManyMessages {
            count: messages.len(),
            limit: limits.max_messages,
        });
    }
    for (index, raw) in messages.iter().enumerate() {
        LogMessage::parse(raw.get(), limits)
            .map_err(|reason| PacketError::BadMessage { index, reason })?;
    }
    Ok(Packet {
        emitter_id: wire.emitter_id,
        packet_id: wire.packet_id,
        raw_messages: wire.messages.get(),
        count: messages.len() as u32,
    })
}

/// JSON text is UTF-8 (RFC 8259, section 8.1), so a body that is not is malformed. serde_json
/// checks the strings it keeps but not those it skips: without this, invalid UTF-8 inside an
/// unknown field was accepted. The check costs ~1% of a parse; `from_str` on the result then skips
/// serde_json's own per-string check.
fn utf8(body: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))
}

fn check_id(field: &'static str, value: &str, limits: &Limits) -> Result<(), PacketError> {
    if value.is_empty() {
        return Err(PacketError::EmptyField(field));
    }
    if value.len() > limits.max_id_bytes {
        return Err(PacketError::TooLong {
            field,
            len: value.len(),
            limit: limits.max_id_bytes,
        });
    }
    Ok(())
}

/// One log message, borrowed from its JSON.
#[derive(Debug, Deserialize)]
pub struct LogMessage<'a> {
    #[serde(borrow)]
    pub timestamp: &'a RawValue,
    #[serde(borrow)]
    pub level: Cow<'a, str>,
    #[serde(borrow)]
    pub message: Cow<'a, str>,
    #[serde(borrow, default)]
    pub metadata: Option<&'a RawValue>,
}

impl<'a> LogMessage<'a> {
    /// Parse and check one message; the error says what is wrong with it.
    pub fn parse(raw: &'a str, limits: &Limits) -> Result<Self, String> {
        if raw.len() > limits.max_message_bytes {
            return Err(format!(
                "message is {} bytes, longer than the limit of {}",
                raw.len(),
                limits.max_message_bytes
            ));
        }
        let msg: LogMessage<'a> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        check_timestamp(msg.timestamp.get()).map_err(|e| format!("`timestamp` {e}"))?;
        if msg.level.is_empty() {
            return Err("`level` must not be empty".into());
        }
        if msg.level.len() > limits.max_level_bytes {
            return Err(format!(
                "`level` is {} bytes, longer than the limit of {}",
                msg.level.len(),
                limits.max_level_bytes
            ));
        }
        if msg.message.is_empty() {
            return Err("`message` must not be empty".into());
        }
        if let Some(meta) = msg.metadata {
            let text = meta.get();
            if !(text.starts_with('{') || text == "null") {
                return Err("`metadata` must be an object".into());
            }
        }
        Ok(msg)
    }
}

/// Append one whole packet, as a batch entry, to `out`.
fn write_packet_entry(out: &mut Vec<u8>, emitter_id: &str, packet_id: &str, raw_messages: &[u8]) {
    out.extend_from_slice(b"{\"emitter_id\":");
    write_json_str(out, emitter_id);
    out.extend_from_slice(b",\"packet_id\":");
    write_json_str(out, packet_id);
    out.extend_from_slice(b",\"messages\":");
    out.extend_from_slice(raw_messages);
    out.push(b'}');
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON requires; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Builds the body of `POST /analyze` from whole packets without re-encoding their messages.
#[derive(Debug)]
pub struct BatchWriter {
    body: Vec<u8>,
    packets: usize,
}

impl BatchWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut body = Vec::with_capacity(bytes + 16);
        body.extend_from_slice(b"{\"packets\":[");
        Self { body, packets: 0 }
    }

    pub fn push(&mut self, emitter_id: &str, packet_id: &str, raw_messages: &[u8]) {
        if self.packets > 0 {
            self.body.push(b',');
        }
        write_packet_entry(&mut self.body, emitter_id, packet_id, raw_messages);
        self.packets += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.body.extend_from_slice(b"]}");
        self.body
    }
}

/// What `POST /analyze` accepts: a batch of whole packets, one message with its identity, or an
/// array of such messages.
#[derive(Debug)]
pub enum AnalyzeRequest<'a> {
    Packets(Vec<BatchPacket<'a>>),
    Messages(Vec<IdentifiedMessage<'a>>),
}

/// A whole packet inside an analyzer batch: message `i` has identity `(emitter_id, packet_id, i)`.
#[derive(Debug, Deserialize)]
pub struct BatchPacket<'a> {
    #[serde(borrow)]
    pub emitter_id: Cow<'a, str>,
    #[serde(borrow)]
    pub packet_id: Cow<'a, str>,
    #[serde(borrow)]
    pub messages: Vec<&'a RawValue>,
}

/// A single message sent to an analyzer with its identity beside the message fields.
#[derive(Debug, Deserialize)]
pub struct IdentifiedMessage<'a> {
    #[serde(borrow)]
    pub emitter_id: Cow<'a, str>,
    #[serde(borrow)]
    pub packet_id: Cow<'a, str>,
    pub index: u32,
    #[serde(borrow)]
    pub timestamp: &'a RawValue,
    #[serde(borrow)]
    pub level: Cow<'a, str>,
    #[serde(borrow)]
    pub message: Cow<'a, str>,
    #[serde(borrow, default)]
    pub metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    packets: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BatchWire<'a> {
    #[serde(borrow)]
    packets: Vec<BatchPacket<'a>>,
}

impl<'a> AnalyzeRequest<'a> {
    /// Parse an analyzer request body. The shape is chosen by its first significant byte and key:
    /// `[` is an array of identified messages, `{"packets":` a batch, any other object one message.
    pub fn parse(body: &'a [u8]) -> Result<Self, String> {
        let body = utf8(body)?;
        let first = body.bytes().find(|b| !b.is_ascii_whitespace());
        match first {
            Some(b'[') => serde_json::from_str::<Vec<IdentifiedMessage<'a>>>(body)
                .map(AnalyzeRequest::Messages)
                .map_err(|e| e.to_string()),
            Some(b'{') => {
                // The probe keeps `packets` raw and skips every other field without building it:
                // it must accept exactly what `parse_packet` accepted (numbers out of f64 range,
                // deep metadata), or a stored packet could be refused by every analyzer.
                let probe: Probe<'_> = serde_json::from_str(body).map_err(|e| e.to_string())?;
                if probe.packets.is_some() {
                    serde_json::from_str::<BatchWire<'a>>(body)
                        .map(|b| AnalyzeRequest::Packets(b.packets))
                        .map_err(|e| e.to_string())
                } else {
                    serde_json::from_str::<IdentifiedMessage<'a>>(body)
                        .map(|m| AnalyzeRequest::Messages(vec![m]))
                        .map_err(|e| e.to_string())
                }
            }
            _ => Err("body must be a JSON object or array".into()),
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.emitter_id, self.packet_id, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"emitter_id":"e1","packet_id":"p1","messages":[
        {"timestamp":1700000000000,"level":"INFO","message":"user 42 logged in"},
        {"timestamp":"2024-05-01T12:00:00.5Z","level":"ERROR","message":"disk full","metadata":{"host":"a"}}]}"#;

    #[test]
    fn a_valid_packet_keeps_its_message_bytes_verbatim() {
        let p = parse_packet(GOOD.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(p.emitter_id, "e1");
        assert_eq!(p.packet_id, "p1");
        assert_eq!(p.count, 2);
        assert!(p.raw_messages.starts_with('[') && p.raw_messages.ends_with(']'));
        assert!(p.raw_messages.contains(r#""metadata":{"host":"a"}"#));
    }

    #[test]
    fn each_kind_of_bad_packet_is_named() {
        let l = Limits::default();
        let cases: &[(&str, &str)] = &[
            ("not json", "malformed"),
            (r#"{"packet_id":"p","messages":[]}"#, "emitter_id"),
            (
                r#"{"emitter_id":"","packet_id":"p","messages":[]}"#,
                "`emitter_id` must not be empty",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[]}"#,
                "at least one",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":{}}"#,
                "must be an array",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":1,"level":"","message":"m"}]}"#,
                "message 0: `level`",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":-1,"level":"I","message":"m"}]}"#,
                "`timestamp`",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":"yesterday","level":"I","message":"m"}]}"#,
                "RFC 3339",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":""}]}"#,
                "`message` must not be empty",
            ),
            (
                r#"{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m","metadata":3}]}"#,
                "`metadata` must be an object",
            ),
            (
                r#"{"emitter_id":"e","packet_id":5,"messages":[]}"#,
                "invalid type",
            ),
        ];
        for (body, needle) in cases {
            let err = parse_packet(body.as_bytes(), &l).unwrap_err().to_string();
            assert!(err.contains(needle), "{body} -> {err} (wanted {needle})");
        }
    }

    #[test]
    fn limits_refuse_rather_than_truncate() {
        let l = Limits {
            max_messages: 1,
            max_id_bytes: 2,
            max_level_bytes: 32,
            max_message_bytes: 200,
        };
        let err = parse_packet(GOOD.as_bytes(), &l).unwrap_err();
        assert_eq!(err, PacketError::TooManyMessages { count: 2, limit: 1 });
        let long = r#"{"emitter_id":"abc","packet_id":"p","messages":[{"timestamp":1,"level":"I","message":"m"}]}"#;
        assert!(matches!(
            parse_packet(long.as_bytes(), &l),
            Err(PacketError::TooLong {
                field: "emitter_id",
                ..
            })
        ));
        let big = format!(
            r#"{{"emitter_id":"e","packet_id":"p","messages":[{{"timestamp":1,"level":"I","message":"{}"}}]}}"#,
            "x".repeat(200)
        );
        let err = parse_packet(big.as_bytes(), &l).unwrap_err().to_string();
        assert!(
            err.contains("message 0: message is 240 bytes, longer than the limit of 200"),
            "{err}"
        );
    }

    #[test]
    fn a_batch_written_by_batch_writer_parses_back_with_the_same_identities() {
        let p = parse_packet(GOOD.as_bytes(), &Limits::default()).unwrap();
        let mut w = BatchWriter::with_capacity(256);
        w.push("e\"1", &p.packet_id, p.raw_messages.as_bytes());
        w.push(
            "e2",
            "p9",
            br#"[{"timestamp":1,"level":"I","message":"x"}]"#,
        );
        let body = w.finish();
        match AnalyzeRequest::parse(&body).unwrap() {
            AnalyzeRequest::Packets(ps) => {
                assert_eq!(ps.len(), 2);
                assert_eq!(ps[0].emitter_id, "e\"1");
                assert_eq!(ps[0].messages.len(), 2);
                assert_eq!(ps[1].packet_id, "p9");
            }
            other => panic!("wrong shape {other:?}"),
        }
    }

    #[test]
    fn whatever_parse_packet_accepts_an_analyzer_accepts_after_batching() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let metadata = [
            r#"{"x":1e400}"#.to_string(),
            r#"{"x":-1e-400,"y":123456789012345678901234567890}"#.to_string(),
            format!(r#"{{"deep":{deep}}}"#),
            r#"{"s":"\u00e9\ud83d\ude00\n\"","":null}"#.to_string(),
            "null".to_string(),
        ];
        for meta in metadata {
            let body = format!(
                r#"{{"emitter_id":"e\u0000","packet_id":"p","extra":{deep},"messages":[{{"timestamp":"2024-01-01T00:00:00Z","level":"W","message":"\u2603","metadata":{meta}}}]}}"#
            );
            let p = parse_packet(body.as_bytes(), &Limits::default())
                .unwrap_or_else(|e| panic!("{meta}: {e}"));
            let mut w = BatchWriter::with_capacity(64);
            w.push(&p.emitter_id, &p.packet_id, p.raw_messages.as_bytes());
            let batch = w.finish();
            let AnalyzeRequest::Packets(packets) =
                AnalyzeRequest::parse(&batch).unwrap_or_else(|e| panic!("{meta}: {e}"))
            else {
                panic!("wrong shape")
            };
            assert_eq!(packets[0].emitter_id, "e\u{0}");
            for raw in &packets[0].messages {
                LogMessage::parse(raw.get(), &Limits::default())
                    .unwrap_or_else(|e| panic!("{meta}: {e}"));
            }
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused_even_inside_an_unknown_field() {
        // Found by `tests/props.rs`: serde_json skipped the unknown field without checking it.
        let packet = b"{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"x\":\"\xff\",\"messages\":[{\"timestamp\":1,\"level\":\"I\",\"message\":\"m\"}]}";
        let err = parse_packet(packet, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let one = b"{\"emitter_id\":\"e\",\"packet_id\":\"p\",\"index\":0,\"x\":\"\xff\",\"timestamp\":1,\"level\":\"I\",\"message\":\"m\"}";
        assert!(AnalyzeRequest::parse(one)
            .unwrap_err()
            .contains("not UTF-8"));
    }

    #[test]
    fn analyze_accepts_one_identified_message_or_an_array() {
        let one = br#"{"emitter_id":"e","packet_id":"p","index":3,"timestamp":1,"level":"I","message":"m"}"#;
        match AnalyzeRequest::parse(one).unwrap() {
            AnalyzeRequest::Messages(m) => assert_eq!(m[0].index, 3),
            other => panic!("wrong shape {other:?}"),
        }
        let arr = br#"[{"emitter_id":"e","packet_id":"p","index":0,"timestamp":1,"level":"I","message":"m"}]"#;
        assert!(matches!(
            AnalyzeRequest::parse(arr).unwrap(),
            AnalyzeRequest::Messages(_)
        ));
        assert!(AnalyzeRequest::parse(b"42").is_err());
        assert!(AnalyzeRequest::parse(br#"{"emitter_id":"e"}"#).is_err());
    }
}
