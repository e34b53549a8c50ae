//! The progress display of `emitter send --count N`: a bar redrawn in place on stderr when stderr
//! is a terminal, one plain line a second otherwise (logs and CI output stay readable). stdout
//! keeps only the final summary. Hand-written: a bar is a few lines, not worth a dependency.

use std::io::Write;
use std::time::Duration;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A bar if stderr is a terminal, else lines.
    Auto,
    /// A bar redrawn in place.
    Bar,
    /// One line a second.
    Lines,
    /// Nothing until the summary.
    Off,
}

impl Mode {
    /// `Auto` decided for this process's stderr.
    pub fn resolve(self) -> Mode {
        match self {
            Mode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => Mode::Bar,
            Mode::Auto => Mode::Lines,
            m => m,
        }
    }

    /// How often it redraws.
    pub fn period(self) -> Duration {
        match self {
            Mode::Bar => Duration::from_millis(200),
            _ => Duration::from_secs(1),
        }
    }
}

/// One frame: `[#########-----------]  45.0%  45000/100000 messages  12345/s  0 retries  ETA 4 s`.
pub fn frame(done: u64, total: u64, per_sec: f64, retries: u64, width: usize) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (fraction * width as f64).round() as usize;
    let eta = if done >= total {
        "done".to_string()
    } else if per_sec > 0.0 {
        format!("ETA {:.0} s", (total - done) as f64 / per_sec)
    } else {
        "ETA ?".to_string()
    };
    format!(
        "[{}{}] {:5.1}%  {done}/{total} messages  {per_sec:.0}/s  {retries} retries  {eta}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        fraction * 100.0
    )
}

/// Draw one update: the bar overwrites the line (`\r`, then clears what a longer frame left).
pub fn draw(out: &mut impl Write, mode: Mode, frame: &str) -> std::io::Result<()> {
    match mode {
        Mode::Bar => write!(out, "\r{frame}\x1b[K")?,
        Mode::Lines => writeln!(out, "progress: {frame}")?,
        Mode::Auto | Mode::Off => return Ok(()),
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_the_fraction_the_counts_the_rate_and_the_time_left() {
        let f = frame(45, 100, 5.0, 2, 20);
        assert!(f.starts_with("[#########-----------]  45.0%"), "{f}");
        assert!(f.contains("45/100 messages"), "{f}");
        assert!(f.contains("5/s  2 retries  ETA 11 s"), "{f}");
        assert!(frame(100, 100, 1.0, 0, 10).contains("[##########] 100.0%"));
        assert!(frame(100, 100, 1.0, 0, 10).ends_with("done"));
        assert!(frame(0, 100, 0.0, 0, 10).ends_with("ETA ?"));
        assert!(
            frame(200, 100, 1.0, 0, 4).starts_with("[####]"),
            "never past full"
        );
    }

    #[test]
    fn the_bar_redraws_in_place_and_lines_mode_writes_whole_lines() {
        let mut out = Vec::new();
        draw(&mut out, Mode::Bar, "a").unwrap();
        draw(&mut out, Mode::Bar, "b").unwrap();
        assert_eq!(out, b"\ra\x1b[K\rb\x1b[K");
        let mut out = Vec::new();
        draw(&mut out, Mode::Lines, "a").unwrap();
        draw(&mut out, Mode::Off, "b").unwrap();
        assert_eq!(out, b"progress: a\n");
    }
}
