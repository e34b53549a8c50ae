//! Prometheus text exposition (format 0.0.4), written by hand: every logdist service serves
//! `GET /metrics` from its own atomics, so no registry or extra crate is needed.
//!
//! Naming follows Prometheus conventions: a `logdist_` prefix, `_total` on counters, base units
//! (`_seconds`, `_bytes`) in the name. [`Exposition`] writes `# HELP` and `# TYPE` once per family,
//! then its samples; [`Histogram`] is a fixed-bucket histogram safe to observe from any thread.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the latency buckets: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The kind of a metric family.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metrics page being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The samples of `histogram` (`_bucket`, `_sum`, `_count`) under the current family.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) -> &mut Self {
        let mut cumulative = 0u64;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count.load(Relaxed);
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&number(*bound)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let total = cumulative + h.overflow.load(Relaxed);
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {total}");
        let sum = h.sum_nanos.load(Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, sum);
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {total}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

/// A number as Prometheus reads it (integers without a fraction, `NaN`, `+Inf`).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A histogram of durations with fixed bucket bounds, observed lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); `counts[i]` holds those `<= bounds[i]` and above
    /// the previous bound.
    counts: Vec<AtomicU64>,
    overflow: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// A histogram with [`LATENCY_BUCKETS`].
    pub fn latency() -> Self {
        Self::new(&LATENCY_BUCKETS)
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match self.bounds.iter().position(|b| secs <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.overflow.fetch_add(1, Relaxed),
        };
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum::<u64>() + self.overflow.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf_equal_to_count() {
        let h = Histogram::latency();
        h.observe(Duration::from_micros(300)); // <= 0.0005
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(20)); // overflow
        let mut e = Exposition::new();
        e.family("x_seconds", Kind::Histogram, "h").histogram(
            "x_seconds",
            &[("analyzer", "a\"1")],
            &h,
        );
        let text = e.finish();
        assert!(text.contains("x_seconds_bucket{analyzer=\"a\\\"1\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{analyzer=\"a\\\"1\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{analyzer=\"a\\\"1\",le=\"0.005\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{analyzer=\"a\\\"1\",le=\"10\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{analyzer=\"a\\\"1\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("x_seconds_count{analyzer=\"a\\\"1\"} 3\n"));
        assert!(text.contains("x_seconds_sum{analyzer=\"a\\\"1\"} 20.0033\n"));
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn samples_write_integers_plainly_and_escape_help() {
        let mut e = Exposition::new();
        e.single("a_total", Kind::Counter, "line\nbreak", 42.0)
            .family("b", Kind::Gauge, "g")
            .sample("b", &[("k", "v")], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP a_total line\\nbreak\n# TYPE a_total counter\na_total 42\n\
             # HELP b g\n# TYPE b gauge\nb{k=\"v\"} 0.25\n"
        );
    }
}
