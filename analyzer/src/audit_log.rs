//! The audit log: an append-only file of the messages this analyzer recorded, replayed at start, so
//! that an analyzer killed (even by SIGKILL) and restarted still recognises what it processed and
//! `/audit` still lists it. Optional: enabled by the `audit_log` setting (`--audit-log FILE`).
//!
//! # Guarantee
//!
//! **Listed before acknowledged.** `POST /analyze` appends the messages it is about to record *before*
//! it records them and before its 200 is sent; if the append fails it answers 500 and records
//! nothing. So every message an analyzer ever answered 2xx for is in the file (unless it was
//! forgotten; see below). The append is done while the state lock is held, so the file's order is
//! the order in which the de-duplication state learnt the packets, and a replay rebuilds the same
//! state, including which packets the `dedup_capacity_packets` bound forgot.
//!
//! **Process kill, not power loss.** The append is one `write` into the page cache, without fsync:
//! the kernel keeps what was written when the process dies, however it dies, but a power loss or
//! kernel crash may lose the last seconds of the file. The file exists for kill/restart testing,
//! where an fsync per request would only cost time.
//!
//! # Record layout
//!
//! UTF-8 text, one JSON object per line, each line ending in `\n`:
//!
//! ```text
//! {"emitter_id":"emitter-1","packet_id":"p-17","indexes":[0,1,2]}
//! ```
//!
//! One line per packet per request, listing only the indexes that request recorded for the first
//! time (a packet sent in two halves gets two lines; a repeated message none). All lines of one
//! request are written by a single `write_all` of one buffer.
//!
//! # What a replay restores
//!
//! Every listed message is put back into the de-duplication state, in file order, and counted in
//! `processed` (and in `/status` `restored`). Levels, emitters, templates and `errors` are not
//! restored: the file holds identities, not content. The `dedup_capacity_packets` bound applies
//! during the replay as it did when the lines were written.
//!
//! # Crash cases
//!
//! * **Killed between two appends:** the file ends with a complete line; nothing to do.
//! * **Killed in the middle of an append** (a torn write): the last line is cut short. It is ignored
//!   with a warning and cut off the file, so the next append starts on a fresh line. Its messages
//!   were never acknowledged (the 200 comes after the append), so the distributor still has them
//!   and delivers them again. If the cut-short tail happens to be a whole record missing only its
//!   `\n`, it is restored and the `\n` added.
//! * **Unparsable line before the last:** not something a crash of this writer produces (the file
//!   was damaged or written by something else). The start fails, naming the line: guessing would
//!   risk forgetting, silently, messages that were acknowledged.
//! * **A failed append** (disk full, I/O error): the request gets a 500 and records nothing, and the
//!   file is cut back to its last complete line. If even that fails, every later `/analyze` gets a
//!   500 until the analyzer is restarted (whose replay then cuts the torn tail).
//!
//! # Limits
//!
//! One analyzer per file: the length this process tracks is what it cuts back to. The file grows
//! by one line per packet (about 60 bytes plus a few per index) and is never compacted; delete it
//! while the analyzer is stopped to start afresh. Replay reads it line by line, so memory stays
//! bounded by the de-duplication state, not by the file.

use crate::state::{AnalyzerState, Sighting};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One line as written: borrowed, so that building a request's lines copies nothing.
#[derive(Serialize)]
struct LineOut<'a> {
    emitter_id: &'a str,
    packet_id: &'a str,
    indexes: &'a [u32],
}

/// One line as read back. Anything else on a line makes it unparsable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    emitter_id: String,
    packet_id: String,
    indexes: Vec<u32>,
}

/// Append the line for `indexes` of packet `(emitter_id, packet_id)`, `\n` included, to `buf`.
pub fn encode_line(
    buf: &mut Vec<u8>,
    emitter_id: &str,
    packet_id: &str,
    indexes: &[u32],
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(
        &mut *buf,
        &LineOut {
            emitter_id,
            packet_id,
            indexes,
        },
    )?;
    buf.push(b'\n');
    Ok(())
}

/// Why the audit log could not be opened and replayed. All of them stop the start: an analyzer that
/// cannot know what it processed before must not pretend it processed nothing.
#[derive(Debug)]
pub enum AuditLogError {
    /// The file cannot be opened, read, or its torn tail cut off. Fix the path, its directory or
    /// the permissions and start again.
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// The path exists but is not a regular file (a directory, a device...). Not recoverable: the
    /// setting is wrong.
    NotAFile { path: PathBuf },
    /// A line before the last cannot be parsed: the file is damaged or was not written by an
    /// analyzer. Not recovered automatically; `line` counts from 1.
    Corrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

impl fmt::Display for AuditLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditLogError::Io {
                path,
                action,
                source,
            } => write!(f, "cannot {action} audit log {}: {source}", path.display()),
            AuditLogError::NotAFile { path } => {
                write!(f, "audit log {} is not a regular file", path.display())
            }
            AuditLogError::Corrupt { path, line, reason } => write!(
                f,
                "audit log {} is corrupt at line {line} (not its last line, so not a torn \
                 write): {reason}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for AuditLogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuditLogError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Lines restored.
    pub lines: u64,
    /// Messages that entered the de-duplication state.
    pub messages: u64,
    /// Whether an unparsable last line was ignored and cut off.
    pub torn_tail_dropped: bool,
}

/// The open audit log. The server keeps it behind a mutex taken only while the state lock is held.
#[derive(Debug)]
pub struct AuditLog {
    /// Opened for appending: every write goes to the end, whatever the file position.
    file: File,
    path: PathBuf,
    /// Bytes of complete lines in the file: where a failed append is cut back to.
    len: u64,
    /// Set when a failed append could not be cut back; every later append is refused.
    broken: Option<String>,
}

impl AuditLog {
    /// Open `path` (creating it if missing), replay it into `state`, and make sure it ends with a
    /// complete line so that appends start on a fresh one. Blocking: call it off the async workers.
    pub fn open(path: &Path, state: &mut AnalyzerState) -> Result<(Self, Replayed), AuditLogError> {
        let io_error = |action, source| AuditLogError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        if path.exists() && !path.is_file() {
            return Err(AuditLogError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_error("open", e))?;

        let mut replayed = Replayed {
            lines: 0,
            messages: 0,
            torn_tail_dropped: false,
        };
        // An unparsable line is fatal unless nothing follows it: (line number, reason, offset).
        let mut unparsable: Option<(u64, String, u64)> = None;
        let mut unterminated = false;
        let mut offset = 0u64;
        let mut line_no = 0u64;
        let mut line = Vec::new();
        let mut reader = BufReader::new(&file);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_error("read", e))?;
            if n == 0 {
                break;
            }
            if let Some((bad, reason, _)) = unparsable.take() {
                return Err(AuditLogError::Corrupt {
                    path: path.to_owned(),
                    line: bad,
                    reason,
                });
            }
            line_no += 1;
            unterminated = line.last() != Some(&b'\n');
            match serde_json::from_slice::<LineIn>(line.trim_ascii_end()) {
                Ok(record) => {
                    replayed.lines += 1;
                    for index in record.indexes {
                        if state.restore(&record.emitter_id, &record.packet_id, index)
                            == Sighting::New
                        {
                            replayed.messages += 1;
                        }
                    }
                }
                Err(e) => unparsable = Some((line_no, e.to_string(), offset)),
            }
            offset += n as u64;
        }
        drop(reader);

        let len = if let Some((bad, reason, start)) = unparsable {
            tracing::warn!(
                path = %path.display(),
                line = bad,
                "ignoring the torn last line of the audit log (a write cut short by a kill) and \
                 cutting it off: {reason}"
            );
            file.set_len(start)
                .map_err(|e| io_error("cut the torn last line off", e))?;
            replayed.torn_tail_dropped = true;
            start
        } else if unterminated {
            file.write_all(b"\n")
                .map_err(|e| io_error("terminate the last line of", e))?;
            offset + 1
        } else {
            offset
        };
        let log = Self {
            file,
            path: path.to_owned(),
            len,
            broken: None,
        };
        Ok((log, replayed))
    }

    /// Append `lines` (complete lines, as built by [`encode_line`]) with one `write_all`. No fsync;
    /// see the module docs. On failure the file is cut back to its last complete line.
    pub fn append(&mut self, lines: &[u8]) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(format!(
                "audit log {} unusable until restart: {why}",
                self.path.display()
            ));
        }
        let Err(e) = self.file.write_all(lines) else {
            self.len += lines.len() as u64;
            return Ok(());
        };
        let why = format!("cannot append to audit log {}: {e}", self.path.display());
        if let Err(cut) = self.file.set_len(self.len) {
            let why = format!(
                "{why}; then cannot cut it back to {} bytes: {cut}",
                self.len
            );
            self.broken = Some(why.clone());
            return Err(why);
        }
        Err(why)
    }

    /// An audit log on an already-open file, for tests that need a file that refuses writes.
    #[cfg(test)]
    pub fn from_file(file: File, path: PathBuf) -> Self {
        let len = file.metadata().map_or(0, |m| m.len());
        Self {
            file,
            path,
            len,
            broken: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn line(emitter_id: &str, packet_id: &str, indexes: &[u32]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_line(&mut buf, emitter_id, packet_id, indexes).unwrap();
        buf
    }

    #[test]
    fn lines_have_exactly_the_three_fields_and_end_in_a_newline() {
        assert_eq!(
            line("e\"1", "p", &[0, 1, 2]),
            b"{\"emitter_id\":\"e\\\"1\",\"packet_id\":\"p\",\"indexes\":[0,1,2]}\n"
        );
    }

    #[test]
    fn appended_lines_are_restored_by_the_next_open() {
        let dir = TempDir::new("roundtrip");
        let path = dir.file("audit.ndjson");
        let mut state = AnalyzerState::new(100);
        let (mut log, replayed) = AuditLog::open(&path, &mut state).unwrap();
        assert_eq!(replayed.messages, 0);
        let mut lines = line("e", "p", &[0, 1]);
        lines.extend(line("e", "q", &[5]));
        log.append(&lines).unwrap();
        log.append(&line("e", "p", &[2])).unwrap();
        drop(log);

        let mut state = AnalyzerState::new(100);
        let (_, replayed) = AuditLog::open(&path, &mut state).unwrap();

        assert_eq!(
            replayed,
            Replayed {
                lines: 3,
                messages: 4,
                torn_tail_dropped: false
            }
        );
        for (p, i) in [("p", 0), ("p", 1), ("p", 2), ("q", 5)] {
            assert!(state.is_remembered("e", p, i), "{p}/{i}");
        }
        assert_eq!(state.totals(), (4, 0));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_so_the_next_append_starts_a_fresh_line() {
        let dir = TempDir::new("torn");
        let path = dir.file("audit.ndjson");
        let mut content = line("e", "p", &[0]);
        content.extend_from_slice(b"{\"emitter_id\":\"e\",\"packet_id\":\"q\",\"ind");
        std::fs::write(&path, &content).unwrap();

        let mut state = AnalyzerState::new(100);
        let (mut log, replayed) = AuditLog::open(&path, &mut state).unwrap();
        log.append(&line("e", "r", &[1])).unwrap();
        drop(log);

        assert!(replayed.torn_tail_dropped);
        assert_eq!(replayed.messages, 1);
        let mut expected = line("e", "p", &[0]);
        expected.extend(line("e", "r", &[1]));
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn a_whole_last_record_missing_only_its_newline_is_kept_and_terminated() {
        let dir = TempDir::new("unterminated");
        let path = dir.file("audit.ndjson");
        let mut content = line("e", "p", &[0]);
        content.pop();
        std::fs::write(&path, &content).unwrap();

        let mut state = AnalyzerState::new(100);
        let (mut log, replayed) = AuditLog::open(&path, &mut state).unwrap();
        log.append(&line("e", "q", &[0])).unwrap();
        drop(log);

        assert_eq!(replayed.messages, 1);
        assert!(!replayed.torn_tail_dropped);
        let mut expected = line("e", "p", &[0]);
        expected.extend(line("e", "q", &[0]));
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn an_unparsable_line_before_the_last_fails_the_open_naming_its_number() {
        let dir = TempDir::new("corrupt");
        let path = dir.file("audit.ndjson");
        let mut content = line("e", "p", &[0]);
        content.extend_from_slice(
            b"{\"emitter_id\":\"e\",\"packet_id\":\"q\",\"indexes\":[1],\"x\":1}\n",
        );
        content.extend(line("e", "r", &[0]));
        std::fs::write(&path, &content).unwrap();

        let err = AuditLog::open(&path, &mut AnalyzerState::new(100)).unwrap_err();

        assert!(
            matches!(err, AuditLogError::Corrupt { line: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), content, "left untouched");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = TempDir::new("dir");
        let err = AuditLog::open(dir.path(), &mut AnalyzerState::new(100)).unwrap_err();
        assert!(matches!(err, AuditLogError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn a_failed_append_is_an_error_and_leaves_the_file_as_it_was() {
        let dir = TempDir::new("readonly");
        let path = dir.file("audit.ndjson");
        std::fs::write(&path, line("e", "p", &[0])).unwrap();
        let read_only = File::open(&path).unwrap();
        let mut log = AuditLog::from_file(read_only, path.clone());

        let err = log.append(&line("e", "q", &[0])).unwrap_err();

        assert!(err.contains("cannot append"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), line("e", "p", &[0]));
    }
}
