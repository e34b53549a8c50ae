//! Property tests for the WAL record format (`wal.rs`, "Layout"): `decode` never panics, whatever
//! bytes it is given, and a packet appended to the WAL reads back byte for byte, in order, with its
//! identity, count and acceptance time, before and after a reopen, with duplicates recognised.
//!
//! Case counts are small by default so the file runs in a few seconds in CI (the round trip opens
//! sled three times per case, so it runs fewer cases). `PROPTEST_CASES=2000` (proptest reads it)
//! sets every count, for a long run.
//!
//! A damaged record is only required not to panic `decode`, not to be refused: the layout does not
//! store the length of the messages array, so a record cut just after an inner `]` still decodes
//! (as a shorter array with the old count). sled's per-entry checksums are what catch torn writes.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use distributor::wal::{decode, Appended, Recovered, Wal};
use logdist_proto::{parse_packet, Limits};
use proptest::prelude::*;
use proptest::sample::select;
use sled::IVec;

/// The default case count unless `PROPTEST_CASES` is set.
fn config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

/// The record layout documented in `wal.rs`, written out independently of its `encode`.
fn layout(
    version: u8,
    accepted_at_ms: u64,
    count: u32,
    emitter_id: &[u8],
    packet_id: &[u8],
    messages: &[u8],
) -> Vec<u8> {
    let mut v = vec![version];
    v.extend_from_slice(&accepted_at_ms.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    v.extend_from_slice(&(emitter_id.len() as u16).to_be_bytes());
    v.extend_from_slice(emitter_id);
    v.extend_from_slice(&(packet_id.len() as u16).to_be_bytes());
    v.extend_from_slice(packet_id);
    v.extend_from_slice(messages);
    v
}

/// sled releases its file lock a moment after the last handle is dropped (sled issues #1234,
/// #1289): reopening at once in the same process can fail with `WouldBlock`, so retry briefly.
fn retry_locked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Ok(v) => return v,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("open: {e}"),
        }
    }
}

fn open_wal(dir: &Path) -> (Wal, Recovered) {
    retry_locked(|| Wal::open(dir, 1 << 20, 1 << 20))
}

/// Check what `decode` returned against the bytes it was given; never panics itself.
fn check_decoded(seq: u64, bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(r) = decode(seq, IVec::from(bytes)) {
        prop_assert_eq!(r.seq, seq);
        prop_assert_eq!(r.size(), bytes.len());
        prop_assert!(r.count > 0);
        let m = r.raw_messages();
        prop_assert!(m.first() == Some(&b'[') && m.last() == Some(&b']'));
        // The ids are the bytes the header's lengths point at.
        let (e, p) = (r.emitter_id(), r.packet_id());
        prop_assert_eq!(15 + e.len() + 2 + p.len() + m.len(), bytes.len());
        prop_assert_eq!(&bytes[15..15 + e.len()], e.as_bytes());
    }
    Ok(())
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// The fields of a record, mostly well formed, sometimes not.
#[derive(Debug, Clone)]
struct Parts {
    version: u8,
    accepted_at_ms: u64,
    count: u32,
    emitter_id: Vec<u8>,
    packet_id: Vec<u8>,
    messages: Vec<u8>,
}

impl Parts {
    fn bytes(&self) -> Vec<u8> {
        layout(
            self.version,
            self.accepted_at_ms,
            self.count,
            &self.emitter_id,
            &self.packet_id,
            &self.messages,
        )
    }
    /// What `decode` must accept (the checks its doc and the layout promise).
    fn well_formed(&self) -> bool {
        self.version == 1
            && self.count > 0
            && std::str::from_utf8(&self.emitter_id).is_ok()
            && std::str::from_utf8(&self.packet_id).is_ok()
            && self.messages.len() >= 2
            && self.messages.first() == Some(&b'[')
            && self.messages.last() == Some(&b']')
    }
}

fn arb_parts() -> impl Strategy<Value = Parts> {
    let messages = prop_oneof![
        arb_bytes(40).prop_map(|mut m| {
            m.insert(0, b'[');
            m.push(b']');
            m
        }),
        arb_bytes(40),
    ];
    let id = prop_oneof![
        3 => "[a-zé😀]{1,12}".prop_map(String::into_bytes),
        1 => arb_bytes(12),
    ];
    (
        prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
        any::<u64>(),
        prop_oneof![4 => 1u32..100, 1 => any::<u32>()],
        id.clone(),
        id,
        messages,
    )
        .prop_map(
            |(version, accepted_at_ms, count, emitter_id, packet_id, messages)| Parts {
                version,
                accepted_at_ms,
                count,
                emitter_id,
                packet_id,
                messages,
            },
        )
}

/// How to damage a record.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Truncate(usize),
    Flip(usize, u8),
    /// Overwrite the emitter_id (13) or packet_id length with any value.
    Length(bool, u16),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Damage::Flip(at, x)),
        (any::<bool>(), any::<u16>()).prop_map(|(which, len)| Damage::Length(which, len)),
    ]
}

fn damaged(mut bytes: Vec<u8>, damage: &Damage) -> Vec<u8> {
    match *damage {
        Damage::None => {}
        Damage::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Damage::Flip(at, x) => {
            if !bytes.is_empty() {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
        }
        Damage::Length(emitter, len) => {
            let at = if emitter {
                13
            } else {
                // The packet_id length follows the emitter_id.
                let elen = bytes
                    .get(13..15)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                15 + usize::from(elen)
            };
            if let Some(slot) = bytes.get_mut(at..at + 2) {
                slot.copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    bytes
}

/// A packet body. Ids come from a small set half the time, so that duplicates (and ids that
/// concatenate alike, "ab"+"c" and "a"+"bc") are frequent.
fn arb_packet_body() -> impl Strategy<Value = String> {
    let id = prop_oneof![
        select(vec!["a", "ab", "b", "bc", "c"]).prop_map(String::from),
        proptest::collection::vec(any::<char>(), 1..=32).prop_map(|cs| cs.into_iter().collect()),
    ];
    let message = (
        prop_oneof![
            any::<u64>().prop_map(|t| t.to_string()),
            Just("\"2024-05-01T12:00:00.5+02:00\"".to_string()),
        ],
        "[A-Z]{1,8}",
        proptest::collection::vec(any::<char>(), 1..40)
            .prop_map(|cs| cs.into_iter().collect::<String>()),
        proptest::option::of(Just(r#"{"k":[1,2,{"n":null}],"big":1e400}"#)),
    )
        .prop_map(|(ts, level, text, meta)| {
            let text = serde_json::to_string(&text).unwrap_or_default();
            match meta {
                Some(meta) => format!(
                    r#"{{"timestamp":{ts},"level":"{level}","message":{text},"metadata":{meta}}}"#
                ),
                None => format!(r#"{{ "message":{text}, "timestamp":{ts},"level":"{level}" }}"#),
            }
        });
    (
        id.clone(),
        id,
        proptest::collection::vec(message, 1..6),
        select(vec![",", ", ", ",\n  "]),
    )
        .prop_map(|(e, p, messages, sep)| {
            let e = serde_json::to_string(&e).unwrap_or_default();
            let p = serde_json::to_string(&p).unwrap_or_default();
            format!(
                r#"{{"emitter_id":{e},"packet_id":{p},"messages":[ {} ]}}"#,
                messages.join(sep)
            )
        })
}

/// What the test expects of one stored record.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    seq: u64,
    accepted_at_ms: u64,
    count: u32,
    emitter_id: String,
    packet_id: String,
    messages: Vec<u8>,
}

fn read_all(wal: &Wal) -> Vec<Expected> {
    wal.read_pending(0, usize::MAX)
        .unwrap_or_else(|e| panic!("read_pending: {e}"))
        .into_iter()
        .map(|r| Expected {
            seq: r.seq,
            accepted_at_ms: r.accepted_at_ms,
            count: r.count,
            emitter_id: r.emitter_id().to_string(),
            packet_id: r.packet_id().to_string(),
            messages: r.raw_messages().to_vec(),
        })
        .collect()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(seq in any::<u64>(), bytes in arb_bytes(256)) {
        check_decoded(seq, &bytes)?;
    }

    #[test]
    fn decode_never_panics_on_damaged_records_and_reads_intact_ones_exactly(
        seq in any::<u64>(),
        parts in arb_parts(),
        damage in arb_damage(),
    ) {
        let bytes = damaged(parts.bytes(), &damage);
        check_decoded(seq, &bytes)?;
        if matches!(damage, Damage::None) {
            let decoded = decode(seq, IVec::from(bytes.as_slice()));
            prop_assert_eq!(decoded.is_ok(), parts.well_formed(), "{:?}", decoded.err());
            if let Ok(r) = decoded {
                prop_assert_eq!(
                    (r.accepted_at_ms, r.count, r.emitter_id().as_bytes(), r.packet_id().as_bytes(), r.raw_messages()),
                    (parts.accepted_at_ms, parts.count, &parts.emitter_id[..], &parts.packet_id[..], &parts.messages[..])
                );
            }
        }
        // Shorter than the smallest record (19 bytes: empty ids, `[]`) or another version: refused.
        if bytes.len() < 19 || bytes[0] != 1 {
            prop_assert!(decode(seq, IVec::from(bytes.as_slice())).is_err());
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn appended_packets_read_back_byte_for_byte_in_order_and_after_reopen(
        bodies in proptest::collection::vec(arb_packet_body(), 1..8),
        accepted in proptest::collection::vec(any::<u64>(), 8),
        cut in any::<usize>(),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let limits = Limits::default();
        let mut expected = Vec::new();
        let mut seq_of: HashMap<(String, String), u64> = HashMap::new();

        // Append every packet; a repeated (emitter_id, packet_id) is recognised.
        let (wal, recovered) = open_wal(dir.path());
        prop_assert_eq!(recovered, Recovered::default());
        for (i, body) in bodies.iter().enumerate() {
            let packet = parse_packet(body.as_bytes(), &limits)
                .map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
            let id = (packet.emitter_id.to_string(), packet.packet_id.to_string());
            let appended = wal.append(&packet, accepted[i])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            match seq_of.get(&id) {
                Some(&seq) => prop_assert_eq!(appended, Appended::Duplicate { seq }),
                None => {
                    let seq = expected.len() as u64;
                    prop_assert_eq!(appended, Appended::New { seq });
                    seq_of.insert(id.clone(), seq);
                    expected.push(Expected {
                        seq,
                        accepted_at_ms: accepted[i],
                        count: packet.count,
                        emitter_id: id.0,
                        packet_id: id.1,
                        messages: packet.raw_messages.as_bytes().to_vec(),
                    });
                }
            }
        }
        wal.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&read_all(&wal), &expected);
        let messages: u64 = expected.iter().map(|r| u64::from(r.count)).sum();
        prop_assert_eq!((wal.pending_records(), wal.pending_messages()), (expected.len() as u64, messages));
        drop(wal);

        // The bytes on disk follow the documented layout, and decode reads them back; cut short,
        // they never make decode panic.
        {
            let db = retry_locked(|| sled::open(dir.path()));
            for r in &expected {
                let mut key = vec![b'r'];
                key.extend_from_slice(&r.seq.to_be_bytes());
                let stored = db.get(&key).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let stored = stored.ok_or_else(|| TestCaseError::fail(format!("no record {}", r.seq)))?;
                let documented = layout(1, r.accepted_at_ms, r.count, r.emitter_id.as_bytes(), r.packet_id.as_bytes(), &r.messages);
                prop_assert_eq!(&stored[..], &documented[..]);
                let decoded = decode(r.seq, stored.clone()).map_err(TestCaseError::fail)?;
                prop_assert_eq!(decoded.raw_messages(), &r.messages[..]);
                check_decoded(r.seq, &stored[..cut % (stored.len() + 1)])?;
            }
        }

        // Reopened: the same records, counted, and sequence numbers continue after them.
        let (wal, recovered) = open_wal(dir.path());
        prop_assert_eq!(recovered, Recovered { records: expected.len() as u64, messages, quarantined: 0 });
        prop_assert_eq!(&read_all(&wal), &expected);
        let first = parse_packet(bodies[0].as_bytes(), &limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(wal.append(&first, 0).map_err(|e| TestCaseError::fail(e.to_string()))?, Appended::Duplicate { seq: 0 });
        let fresh = br#"{"emitter_id":"fresh","packet_id":"\u0000","messages":[{"timestamp":1,"level":"I","message":"m"}]}"#;
        let fresh = parse_packet(fresh, &limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            wal.append(&fresh, 0).map_err(|e| TestCaseError::fail(e.to_string()))?,
            Appended::New { seq: expected.len() as u64 }
        );
    }
}
