//! `emitter crash-test`: the fault-injection suite behind `./docker.sh crash-test`.
//!
//! Each scenario starts its own topology (three analyzers with weights 0.5/0.3/0.2 and one
//! distributor, real processes from `--bin-dir`, in a fresh directory), runs continuous emission,
//! injects its fault, heals everything, waits for the WAL to drain, and then compares message by
//! message what the emitters got acknowledged with what the analyzers list in `GET /audit`:
//!
//! * **lost** = acknowledged by the distributor but in no analyzer's audit. Anything here breaks
//!   "ack means durable" and fails the run (exit code 1);
//! * **duplicates** = messages processed by two or more analyzers (a send that timed out or was
//!   cut by a kill after the analyzer had processed it): allowed by at-least-once, reported;
//! * **drain** = from the moment the fault is healed to an empty WAL.
//!
//! Analyzers keep an audit log on disk (`--audit-log`), so an analyzer killed and restarted still
//! lists what it processed before the kill; that is what lets the analyzer scenarios count at all.
//!
//! What a process kill proves and what it does not: SIGKILL stops the process between any two
//! instructions, but the kernel keeps every byte the process had written, flushed or not. It proves
//! the ordering "flush, then acknowledge" and the recovery code; it does not simulate a power cut
//! (that would need a VM or a fault-injecting block device). `fsync` is what covers the power cut.

mod badinput;
mod load;
mod scenarios;
mod topology;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use scenarios::Scenario;

/// How a run is sized and where it runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory with the `distributor` and `analyzer` binaries.
    pub bin_dir: PathBuf,
    /// Scenarios run in subdirectories of this one (replaced if present).
    pub work_dir: PathBuf,
    /// SIGKILL cycles of the `distributor-kill` scenario; other scenarios scale with it.
    pub cycles: u32,
    /// How long each timed fault lasts.
    pub fault_duration: Duration,
    /// Emission rate, messages per second over all emitters.
    pub rate: u64,
    /// Run the distributor with `wal.fsync = false`, which breaks "ack means durable": only to
    /// check that the suite notices (distributor-kill then reports lost messages).
    pub break_durability: bool,
    /// Seed of every random choice (kill moments, flapping order); printed so a run can be redone.
    pub seed: u64,
}

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A promise broke: the reasons.
    Fail(Vec<String>),
    /// The scenario could not run here (e.g. no permission to mount a filesystem).
    Skip(String),
}

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub acknowledged: u64,
    pub processed: u64,
    /// Lost messages the scenario itself destroyed on disk and the distributor reported missing
    /// (torn-wal's cut): part of `lost`, but not a broken promise.
    pub destroyed: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub drain: Option<Duration>,
    pub verdict: Verdict,
    /// What the scenario did and observed, in a few words.
    pub notes: Vec<String>,
}

impl Row {
    fn failed_to_run(scenario: &'static str, error: &anyhow::Error) -> Self {
        Self::without_counts(scenario, Verdict::Fail(vec![format!("{error:#}")]))
    }

    /// A row for a scenario that counted nothing (it could not run, or could not start).
    fn without_counts(scenario: &'static str, verdict: Verdict) -> Self {
        Row {
            scenario,
            acknowledged: 0,
            processed: 0,
            destroyed: 0,
            lost: 0,
            duplicates: 0,
            drain: None,
            verdict,
            notes: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        !matches!(self.verdict, Verdict::Fail(_))
    }
}

/// Run `scenarios` one after the other, printing a progress line per scenario on stderr.
pub async fn run(options: &Options, scenarios: &[Scenario]) -> Vec<Row> {
    let mut rows = Vec::with_capacity(scenarios.len());
    for &scenario in scenarios {
        eprintln!("crash-test: {} ...", scenario.name());
        let row = match scenarios::run(scenario, options).await {
            Ok(row) => row,
            Err(e) => Row::failed_to_run(scenario.name(), &e),
        };
        eprintln!(
            "crash-test: {} {}",
            scenario.name(),
            match &row.verdict {
                Verdict::Pass => "PASS".to_owned(),
                Verdict::Fail(why) => format!("FAIL: {}", why.join("; ")),
                Verdict::Skip(why) => format!("SKIP: {why}"),
            }
        );
        rows.push(row);
    }
    rows
}

/// The result table (markdown), then one line per failure or skip.
pub struct Table<'a>(pub &'a [Row]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| scenario | acknowledged | processed (distinct) | lost | duplicates | drain | result | notes |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---|---|")?;
        for row in self.0 {
            let drain = row
                .drain
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
            let lost = if row.destroyed > 0 {
                format!(
                    "{} ({} destroyed on disk, reported)",
                    row.lost, row.destroyed
                )
            } else {
                row.lost.to_string()
            };
            let result = match &row.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail(_) => "FAIL",
                Verdict::Skip(_) => "SKIP",
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.scenario,
                row.acknowledged,
                row.processed,
                lost,
                row.duplicates,
                drain,
                result,
                row.notes.join("; ")
            )?;
        }
        for row in self.0 {
            match &row.verdict {
                Verdict::Pass => {}
                Verdict::Fail(why) => writeln!(f, "FAIL {}: {}", row.scenario, why.join("; "))?,
                Verdict::Skip(why) => writeln!(f, "SKIP {}: {why}", row.scenario)?,
            }
        }
        let total_lost: u64 = self
            .0
            .iter()
            .map(|r| r.lost - r.destroyed.min(r.lost))
            .sum();
        let failed = self.0.iter().filter(|r| !r.passed()).count();
        write!(
            f,
            "crash-test: {} scenarios, {} failed, {} acknowledged messages lost (beyond what a \
             scenario destroyed on disk itself)",
            self.0.len(),
            failed,
            total_lost
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &'static str, lost: u64, verdict: Verdict) -> Row {
        Row {
            scenario,
            acknowledged: 100,
            processed: 100 - lost,
            destroyed: 0,
            lost,
            duplicates: 3,
            drain: Some(Duration::from_millis(1500)),
            verdict,
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn every_scenario_name_parses_back_as_its_command_line_value() {
        use clap::ValueEnum;
        for scenario in Scenario::ALL {
            assert_eq!(
                Scenario::from_str(scenario.name(), false),
                Ok(scenario),
                "{}",
                scenario.name()
            );
        }
    }

    #[test]
    fn the_table_shows_counts_failures_and_the_total_lost() {
        let rows = [
            row("distributor-kill", 0, Verdict::Pass),
            row("torn-wal", 7, Verdict::Fail(vec!["7 lost".into()])),
            row("disk-full", 0, Verdict::Skip("not root".into())),
        ];
        let table = Table(&rows).to_string();
        assert!(table.contains("| distributor-kill | 100 | 100 | 0 | 3 | 1.5 s | PASS | a note |"));
        assert!(table.contains("| torn-wal | 100 | 93 | 7 | 3 | 1.5 s | FAIL |"));
        assert!(table.contains("FAIL torn-wal: 7 lost"));
        assert!(table.contains("SKIP disk-full: not root"));
        assert!(table.contains("3 scenarios, 1 failed, 7 acknowledged messages lost"));
        let cut = Row {
            destroyed: 5,
            ..row("torn-wal", 5, Verdict::Pass)
        };
        let table = Table(&[cut]).to_string();
        assert!(
            table.contains("| 5 (5 destroyed on disk, reported) |"),
            "{table}"
        );
        assert!(
            table.contains("0 failed, 0 acknowledged messages lost"),
            "{table}"
        );
        assert!(rows[2].passed(), "a skip is not a failure");
        assert!(!rows[1].passed());
    }
}
