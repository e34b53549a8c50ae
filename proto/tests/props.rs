//! Property tests for the wire parsers: nothing a client sends can make them panic, and whatever
//! `parse_packet` accepts keeps its messages byte for byte, countable, and acceptable to an
//! analyzer after batching (invariants 3 and 7).
//!
//! Case counts are small by default so the file runs in a few seconds in CI. Set
//! `PROPTEST_CASES=10000` (proptest reads it, and its other `PROPTEST_*` variables) for a long
//! run: it sets every count. A failure prints the shrunk input and is saved in
//! `tests/props.proptest-regressions`, which proptest replays first on the next run.

// `is_multiple_of` needs Rust 1.87; the workspace's `rust-version` is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use logdist_proto::{
    check_timestamp, parse_packet, AnalyzeRequest, BatchWriter, Limits, LogMessage, PacketError,
    TimestampError,
};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::value::RawValue;

/// The default case count unless `PROPTEST_CASES` is set.
fn config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

// ---------------------------------------------------------------------------------------------
// JSON text with every legal formatting choice

/// A JSON value, rendered to text by [`Fmt`] with random whitespace and string escapes.
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    /// Number text serde cannot hold in an f64 or u64, or odd but legal forms.
    Number(&'static str),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// A tiny deterministic generator for formatting choices; its seed comes from proptest.
struct Fmt(u64);

impl Fmt {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }
    fn ws(&mut self, out: &mut String) {
        if self.one_in(3) {
            out.push_str([" ", "\n", "\t", "\r\n  ", ""][(self.next() % 5) as usize]);
        }
    }
    fn string(&mut self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' if self.one_in(2) => out.push_str("\\n"),
                '\t' if self.one_in(2) => out.push_str("\\t"),
                '/' if self.one_in(2) => out.push_str("\\/"),
                c if (c as u32) < 0x20 || self.one_in(4) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        if self.one_in(2) {
                            out.push_str(&format!("\\u{u:04x}"));
                        } else {
                            out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    fn render(&mut self, value: &Json, out: &mut String) {
        match value {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => out.push_str(&i.to_string()),
            Json::Uint(u) => out.push_str(&u.to_string()),
            Json::Number(n) => out.push_str(n),
            Json::Str(s) => self.string(s, out),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.ws(out);
                    self.render(item, out);
                    self.ws(out);
                }
                out.push(']');
            }
            Json::Object(fields) => self.object(
                fields.iter().map(|(k, v)| (k.as_str(), Field::Value(v))),
                out,
            ),
        }
    }
    fn object<'a>(&mut self, fields: impl Iterator<Item = (&'a str, Field<'a>)>, out: &mut String) {
        out.push('{');
        for (i, (key, value)) in fields.enumerate() {
            if i > 0 {
                out.push(',');
            }
            self.ws(out);
            self.string(key, out);
            self.ws(out);
            out.push(':');
            self.ws(out);
            match value {
                Field::Value(v) => self.render(v, out),
                Field::Raw(text) => out.push_str(text),
            }
            self.ws(out);
        }
        out.push('}');
    }
}

/// A field value: a generated value, or text rendered earlier that must be inserted verbatim.
enum Field<'a> {
    Value(&'a Json),
    Raw(&'a str),
}

fn render(value: &Json, seed: u64) -> String {
    let mut out = String::new();
    Fmt(seed | 1).render(value, &mut out);
    out
}

fn arb_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => any::<char>(),
        1 => select(vec!['"', '\\', '/', '\n', '\t', '\u{0}', '\u{1f}', 'é', '😀', '\u{2028}', '\u{fffd}']),
        3 => proptest::char::range('a', 'z'),
    ]
}

/// A string of 1..=max chars (at most 4 bytes each).
fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(arb_char(), 1..=max).prop_map(|cs| cs.into_iter().collect())
}

const KEYS: [&str; 10] = [
    "emitter_id",
    "packet_id",
    "messages",
    "timestamp",
    "level",
    "message",
    "metadata",
    "packets",
    "index",
    "",
];

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![select(KEYS.to_vec()).prop_map(String::from), arb_text(8)]
}

fn arb_json() -> BoxedStrategy<Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::Int),
        any::<u64>().prop_map(Json::Uint),
        select(vec![
            "1e400",
            "-1e-400",
            "123456789012345678901234567890",
            "-0",
            "0.0",
            "1.5E+3",
            "18446744073709551616",
        ])
        .prop_map(Json::Number),
        prop_oneof![Just(String::new()), arb_text(12)].prop_map(Json::Str),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            proptest::collection::vec((arb_key(), inner), 0..6).prop_map(Json::Object),
        ]
    })
    .boxed()
}

/// Objects shaped like a packet, a message or an analyzer batch, with values of any type.
fn arb_jsonish() -> impl Strategy<Value = Json> {
    let message = proptest::collection::vec(
        (
            select(vec![
                "timestamp",
                "level",
                "message",
                "metadata",
                "index",
                "x",
            ]),
            arb_json(),
        ),
        0..6,
    )
    .prop_map(|fields| Json::Object(fields.into_iter().map(|(k, v)| (k.into(), v)).collect()));
    let messages = proptest::collection::vec(message, 0..5).prop_map(Json::Array);
    let packet = (arb_json(), arb_json(), messages, any::<bool>())
        .prop_map(|(e, p, m, swap)| {
            let mut fields = vec![
                ("emitter_id".to_string(), e),
                ("packet_id".to_string(), p),
                ("messages".to_string(), m),
            ];
            if swap {
                fields.reverse();
            }
            Json::Object(fields)
        })
        .boxed();
    prop_oneof![
        arb_json(),
        packet.clone(),
        proptest::collection::vec(packet, 0..3)
            .prop_map(|ps| Json::Object(vec![("packets".into(), Json::Array(ps))])),
    ]
}

/// Run every parser on `body`; none may panic. Their results are ignored.
fn parse_everything(body: &[u8]) {
    let limits = Limits::default();
    let _ = parse_packet(body, &limits);
    let _ = AnalyzeRequest::parse(body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = LogMessage::parse(text, &limits);
        let _ = check_timestamp(text);
    }
}

// ---------------------------------------------------------------------------------------------
// Valid packets

/// An RFC 3339 date-time, valid by construction.
#[derive(Debug, Clone)]
struct Ts {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    separator: char,
    fraction: String,
    /// `Z`, `z`, or `+hh:mm` / `-hh:mm`.
    offset: String,
}

fn days_in(year: u32, month: u32) -> u32 {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl Ts {
    fn render(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}{}{}",
            self.year,
            self.month,
            self.day,
            self.separator,
            self.hour,
            self.minute,
            self.second,
            self.fraction,
            self.offset
        )
    }
}

fn arb_ts() -> impl Strategy<Value = Ts> {
    let offset = prop_oneof![
        Just("Z".to_string()),
        Just("z".to_string()),
        (select(vec!['+', '-']), 0u32..=23, 0u32..=59)
            .prop_map(|(sign, h, m)| format!("{sign}{h:02}:{m:02}")),
    ];
    let fraction = prop_oneof![
        Just(String::new()),
        "[0-9]{1,9}".prop_map(|digits| format!(".{digits}")),
    ];
    (
        (0u32..=9999, 1u32..=12, 1u32..=31),
        (0u32..=23, 0u32..=59, 0u32..=60),
        select(vec!['T', 't', ' ']),
        fraction,
        offset,
    )
        .prop_map(
            |((year, month, day), (hour, minute, second), separator, fraction, offset)| Ts {
                year,
                month,
                day: day.min(days_in(year, month)),
                hour,
                minute,
                second,
                separator,
                fraction,
                offset,
            },
        )
}

/// One valid message: its fields in any order, unknown fields beside them.
fn arb_valid_message() -> impl Strategy<Value = Json> {
    let timestamp = prop_oneof![
        any::<u64>().prop_map(Json::Uint),
        arb_ts().prop_map(|t| Json::Str(t.render())),
    ];
    let metadata = prop_oneof![
        Just(None),
        Just(Some(Json::Null)),
        proptest::collection::vec((arb_key(), arb_json()), 0..4)
            .prop_map(|f| Some(Json::Object(f))),
    ];
    // Unknown fields get an `x_` prefix so that no escape can spell a known name.
    let extra = proptest::collection::vec(
        (arb_text(6).prop_map(|k| format!("x_{k}")), arb_json()),
        0..3,
    );
    (
        timestamp,
        arb_text(8),
        arb_text(20),
        metadata,
        extra,
        any::<u64>(),
    )
        .prop_map(|(ts, level, message, metadata, extra, order)| {
            let mut fields = vec![
                ("timestamp".to_string(), ts),
                ("level".to_string(), Json::Str(level)),
                ("message".to_string(), Json::Str(message)),
            ];
            fields.extend(metadata.map(|m| ("metadata".to_string(), m)));
            fields.extend(extra);
            let rotation = (order % fields.len() as u64) as usize;
            fields.rotate_left(rotation);
            Json::Object(fields)
        })
}

/// A valid packet and the pieces a test compares against.
#[derive(Debug)]
struct ValidPacket {
    body: String,
    emitter_id: String,
    packet_id: String,
    /// The `messages` array exactly as it appears in `body`.
    messages_text: String,
    /// Each message exactly as it appears in `body`.
    message_texts: Vec<String>,
}

fn arb_valid_packet(max_messages: usize) -> impl Strategy<Value = ValidPacket> {
    (
        arb_text(32),
        arb_text(32),
        proptest::collection::vec(arb_valid_message(), 1..=max_messages),
        proptest::collection::vec(
            (arb_text(6).prop_map(|k| format!("x_{k}")), arb_json()),
            0..3,
        ),
        any::<u64>(),
    )
        .prop_map(|(emitter_id, packet_id, messages, extra, seed)| {
            let mut fmt = Fmt(seed | 1);
            let message_texts: Vec<String> = messages
                .iter()
                .map(|m| {
                    let mut s = String::new();
                    fmt.render(m, &mut s);
                    s
                })
                .collect();
            let mut messages_text = String::from("[");
            for (i, m) in message_texts.iter().enumerate() {
                if i > 0 {
                    messages_text.push(',');
                }
                fmt.ws(&mut messages_text);
                messages_text.push_str(m);
                fmt.ws(&mut messages_text);
            }
            messages_text.push(']');
            let (e, p) = (Json::Str(emitter_id.clone()), Json::Str(packet_id.clone()));
            let mut fields = vec![
                ("emitter_id", Field::Value(&e)),
                ("packet_id", Field::Value(&p)),
                ("messages", Field::Raw(&messages_text)),
            ];
            fields.extend(extra.iter().map(|(k, v)| (k.as_str(), Field::Value(v))));
            let rotation = (seed % fields.len() as u64) as usize;
            fields.rotate_left(rotation);
            let mut body = String::new();
            fmt.ws(&mut body);
            fmt.object(fields.into_iter(), &mut body);
            fmt.ws(&mut body);
            ValidPacket {
                body,
                emitter_id,
                packet_id,
                messages_text,
                message_texts,
            }
        })
}

/// Ways to break a valid RFC 3339 date-time; each one must be refused.
#[derive(Debug, Clone)]
enum Break {
    Month(u32),
    Day(u32),
    Hour(u32),
    Minute(u32),
    Second(u32),
    Feb29InCommonYear(u32),
    NoOffset,
    OffsetHour(u32),
    EmptyFraction,
    Truncate(usize),
    Separator(usize, char),
    Trailing(char),
}

fn arb_break() -> impl Strategy<Value = Break> {
    prop_oneof![
        prop_oneof![Just(0u32), 13u32..=99].prop_map(Break::Month),
        prop_oneof![Just(0u32), 32u32..=99].prop_map(Break::Day),
        (24u32..=99).prop_map(Break::Hour),
        (60u32..=99).prop_map(Break::Minute),
        (61u32..=99).prop_map(Break::Second),
        select(vec![1900u32, 2023, 2100, 1]).prop_map(Break::Feb29InCommonYear),
        Just(Break::NoOffset),
        (24u32..=99).prop_map(Break::OffsetHour),
        Just(Break::EmptyFraction),
        any::<usize>().prop_map(Break::Truncate),
        (
            select(vec![4usize, 7, 10, 13, 16]),
            select(vec!['/', '_', 'x', '.', '0'])
        )
            .prop_map(|(at, c)| Break::Separator(at, c)),
        select(vec![' ', 'Z', '0', ':', '\n']).prop_map(Break::Trailing),
    ]
}

fn broken(ts: &Ts, how: &Break) -> String {
    let mut t = ts.clone();
    match *how {
        Break::Month(m) => t.month = m,
        Break::Day(d) => t.day = d,
        Break::Hour(h) => t.hour = h,
        Break::Minute(m) => t.minute = m,
        Break::Second(s) => t.second = s,
        Break::Feb29InCommonYear(y) => (t.year, t.month, t.day) = (y, 2, 29),
        Break::NoOffset => t.offset.clear(),
        Break::OffsetHour(h) => t.offset = format!("+{h:02}:00"),
        Break::EmptyFraction => t.fraction = ".".into(),
        Break::Truncate(at) => {
            let full = t.render();
            return full[..at % full.len()].to_string();
        }
        Break::Separator(at, c) => {
            let mut s = t.render().into_bytes();
            s[at] = c as u8;
            return String::from_utf8(s).unwrap_or_default();
        }
        Break::Trailing(c) => t.offset.push(c),
    }
    t.render()
}

fn message_with_timestamp(ts_json: &str) -> String {
    format!(r#"{{"timestamp":{ts_json},"level":"INFO","message":"m"}}"#)
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn no_byte_string_makes_a_parser_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_everything(&body);
    }

    #[test]
    fn no_json_shape_makes_a_parser_panic(value in arb_jsonish(), seed in any::<u64>()) {
        parse_everything(render(&value, seed).as_bytes());
    }

    #[test]
    fn invalid_utf8_anywhere_is_refused_without_panic(
        value in arb_jsonish(),
        seed in any::<u64>(),
        bad in proptest::collection::vec((any::<usize>(), 0x80u8..=0xFF), 1..4),
    ) {
        let mut body = render(&value, seed).into_bytes();
        for (at, byte) in bad {
            let at = at % (body.len() + 1);
            body.insert(at, byte);
        }
        parse_everything(&body);
        if std::str::from_utf8(&body).is_err() {
            prop_assert!(parse_packet(&body, &Limits::default()).is_err());
        }
    }

    #[test]
    fn a_valid_packet_with_invalid_utf8_inserted_anywhere_is_refused(
        packet in arb_valid_packet(3),
        at in any::<usize>(),
        byte in 0x80u8..=0xFF,
    ) {
        // Inside a string of an unknown field too: JSON text is UTF-8, or it is not JSON.
        let mut body = packet.body.into_bytes();
        body.insert(at % (body.len() + 1), byte);
        prop_assume!(std::str::from_utf8(&body).is_err());
        prop_assert!(parse_packet(&body, &Limits::default()).is_err());
        // The same packet as an analyzer batch entry (unknown fields are allowed there too).
        let mut batch = b"{\"packets\":[".to_vec();
        batch.extend_from_slice(&body);
        batch.extend_from_slice(b"]}");
        prop_assert!(AnalyzeRequest::parse(&batch).is_err());
    }

    #[test]
    fn no_string_makes_the_timestamp_check_panic(s in any::<String>()) {
        let _ = check_timestamp(&s);
        let quoted = serde_json::to_string(&s).unwrap_or_default();
        let _ = check_timestamp(&quoted);
    }

    #[test]
    fn every_valid_rfc3339_date_time_is_accepted(ts in arb_ts(), seed in any::<u64>()) {
        // Escaped in any legal way: the check sees the string's value, not its JSON spelling.
        let json = render(&Json::Str(ts.render()), seed);
        prop_assert_eq!(check_timestamp(&json), Ok(()), "{}", json);
        let message = message_with_timestamp(&json);
        prop_assert!(LogMessage::parse(&message, &Limits::default()).is_ok());
    }

    #[test]
    fn a_broken_rfc3339_date_time_is_refused_the_same_way_everywhere(
        ts in arb_ts(),
        how in arb_break(),
        at in 0usize..3,
    ) {
        let text = broken(&ts, &how);
        let json = serde_json::to_string(&text).unwrap_or_default();
        // Alone, twice: the same answer, and it names the string.
        let verdict = check_timestamp(&json);
        prop_assert_eq!(&verdict, &Err(TimestampError::NotRfc3339(text.clone())));
        prop_assert_eq!(&check_timestamp(&json), &verdict);
        // In a message, and in a packet as message `at` among valid ones.
        prop_assert!(LogMessage::parse(&message_with_timestamp(&json), &Limits::default()).is_err());
        let good = message_with_timestamp("1");
        let mut messages = [good.clone(), good.clone(), good];
        messages[at] = message_with_timestamp(&json);
        let body = format!(r#"{{"emitter_id":"e","packet_id":"p","messages":[{}]}}"#, messages.join(","));
        match parse_packet(body.as_bytes(), &Limits::default()) {
            Err(PacketError::BadMessage { index, reason }) => {
                prop_assert_eq!(index, at);
                prop_assert!(reason.contains("RFC 3339"), "{}", reason);
            }
            other => prop_assert!(false, "{} accepted or refused for another reason: {:?}", text, other),
        }
    }

    #[test]
    fn integer_timestamps_are_accepted_and_other_numbers_refused(u in any::<u64>(), i in i64::MIN..0, f in any::<f64>()) {
        prop_assert_eq!(check_timestamp(&u.to_string()), Ok(()));
        prop_assert_eq!(check_timestamp(&i.to_string()), Err(TimestampError::WrongType));
        let float = serde_json::to_string(&f).unwrap_or_default();
        if float.contains(['.', 'e', 'E', '-']) || float == "null" {
            prop_assert_eq!(check_timestamp(&float), Err(TimestampError::WrongType), "{}", float);
        }
    }

}

proptest! {
    // Each case renders up to 12 messages with arbitrary extra fields: fewer cases.
    #![proptest_config(config(128))]

    #[test]
    fn an_accepted_packet_keeps_its_message_bytes_count_and_ids(packet in arb_valid_packet(12)) {
        let limits = Limits::default();
        let parsed = parse_packet(packet.body.as_bytes(), &limits);
        prop_assert!(parsed.is_ok(), "{:?} refused: {:?}", packet.body, parsed.err());
        let Ok(parsed) = parsed else { unreachable!() };
        prop_assert_eq!(&*parsed.emitter_id, packet.emitter_id.as_str());
        prop_assert_eq!(&*parsed.packet_id, packet.packet_id.as_str());
        prop_assert_eq!(parsed.raw_messages, packet.messages_text.as_str());
        prop_assert_eq!(parsed.count as usize, packet.message_texts.len());
        let split: Vec<&RawValue> = serde_json::from_str(parsed.raw_messages)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(split.len(), packet.message_texts.len());
        for (raw, text) in split.iter().zip(&packet.message_texts) {
            prop_assert_eq!(raw.get(), text.as_str());
            prop_assert!(LogMessage::parse(raw.get(), &limits).is_ok());
        }

        // What the distributor forwards, an analyzer accepts with the same identities and bytes.
        let mut batch = BatchWriter::with_capacity(packet.body.len());
        batch.push(&parsed.emitter_id, &parsed.packet_id, parsed.raw_messages.as_bytes());
        let batch = batch.finish();
        match AnalyzeRequest::parse(&batch) {
            Ok(AnalyzeRequest::Packets(ps)) => {
                prop_assert_eq!(ps.len(), 1);
                prop_assert_eq!(&*ps[0].emitter_id, packet.emitter_id.as_str());
                prop_assert_eq!(&*ps[0].packet_id, packet.packet_id.as_str());
                let texts: Vec<&str> = ps[0].messages.iter().map(|m| m.get()).collect();
                prop_assert_eq!(texts, packet.message_texts.iter().map(String::as_str).collect::<Vec<_>>());
            }
            other => prop_assert!(false, "analyzer refused the batch: {:?}", other),
        }
    }
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn deep_nesting_anywhere_is_refused_or_accepted_without_panic(
        depth in prop_oneof![0usize..200, 200usize..20_000],
        object in any::<bool>(),
        place in 0usize..5,
    ) {
        let deep = if object {
            format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
        } else {
            format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
        };
        let message = |meta: &str| format!(r#"{{"timestamp":1,"level":"I","message":"m","metadata":{meta}}}"#);
        let body = match place {
            0 => deep.clone(),
            1 => format!(r#"{{"emitter_id":"e","packet_id":"p","x":{deep},"messages":[{}]}}"#, message("{}")),
            2 => format!(r#"{{"emitter_id":"e","packet_id":"p","messages":[{}]}}"#, message(&format!(r#"{{"d":{deep}}}"#))),
            3 => format!(r#"{{"emitter_id":"e","packet_id":"p","messages":{deep}}}"#),
            _ => format!(r#"{{"packets":{deep}}}"#),
        };
        parse_everything(body.as_bytes());
    }

    #[test]
    fn message_counts_are_exact_and_the_limit_refuses_rather_than_truncates(
        n in prop_oneof![Just(0usize), Just(1000), Just(1001), 1usize..=1000, 1001usize..3000],
    ) {
        let one = r#"{"timestamp":1,"level":"I","message":"m"}"#;
        let body = format!(
            r#"{{"emitter_id":"e","packet_id":"p","messages":[{}]}}"#,
            vec![one; n].join(",")
        );
        let result = parse_packet(body.as_bytes(), &Limits::default());
        match n {
            0 => prop_assert_eq!(result.err(), Some(PacketError::NoMessages)),
            1..=1000 => prop_assert_eq!(result.map(|p| p.count).ok(), Some(n as u32)),
            _ => prop_assert_eq!(result.err(), Some(PacketError::TooManyMessages { count: n, limit: 1000 })),
        }
    }
}
