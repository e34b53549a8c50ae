//! Fault injection: `/faults` makes `POST /analyze` slow or failing on purpose, so that a test can
//! watch the distributor time out, retry, redeliver and re-balance against a real analyzer.
//!
//! * **Latency** delays every `POST /analyze` before anything else is done with it, by an async
//!   sleep: the worker is free meanwhile, so `/health`, `/status` and `/faults` answer at once and
//!   a slow analyzer never looks dead to the distributor's health probe.
//! * **Error rate is exact, not random.** A test must be able to assert "exactly half failed", so
//!   the choice is an accumulator, not a coin: the rate is taken to 9 decimal places (parts per
//!   billion), each request adds it to a credit, and a request fails when the credit reaches 1
//!   (which then drops by 1). Since the faults were last set, after `n` counted requests exactly
//!   `floor(n × rate)` of them have failed, the failing ones evenly spread: at 0.5 every second
//!   request fails, starting with the second. Setting the faults (even to the same values)
//!   restarts the count. A rate below 0.5 × 10⁻⁹ rounds to 0 and never fails.
//! * **Only requests that would be recorded count.** The choice is made after the body was read
//!   and checked, so a malformed request still gets its 4xx and a disabled analyzer its 503, and
//!   neither uses up a failure. A failed request records nothing (and writes nothing to the audit
//!   log): to the sender it is indistinguishable from a crash before the work.
//! * **Nothing else is affected.** `/health`, `/status`, `/audit` and the rest ignore faults.
//!   Faults live in memory only: a restart clears them.

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// Longest injectable latency: 10 minutes, far beyond any distributor timeout, short enough that a
/// forgotten fault does not hold requests for days.
pub const MAX_LATENCY_MS: u64 = 600_000;
/// One in parts per billion: the resolution of the error rate.
const PPB: u64 = 1_000_000_000;

/// A checked set of faults, as `GET /faults` shows it. `Faults::default()` is "no faults".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Faults {
    /// Delay before each `POST /analyze` is looked at, in milliseconds (at most [`MAX_LATENCY_MS`]).
    latency_ms: u64,
    /// Fraction of the `POST /analyze` requests that would be recorded which are answered 500
    /// instead, in `[0, 1]`.
    error_rate: f64,
}

impl Faults {
    /// Parse a `POST /faults` body, `{"latency_ms": <integer>, "error_rate": <number>}` with both
    /// fields optional (a missing one means 0) and no others, or say what is wrong with it, naming
    /// the field. Walked by hand rather than derived because serde's type errors do not name it.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("malformed faults: {e}"))?;
        let Value::Object(fields) = value else {
            return Err(format!(
                "faults must be a JSON object like {{\"latency_ms\": 0, \"error_rate\": 0}}, got {value}"
            ));
        };
        let mut faults = Self::default();
        for (key, value) in &fields {
            match key.as_str() {
                "latency_ms" => {
                    faults.latency_ms = value
                        .as_u64()
                        .filter(|ms| *ms <= MAX_LATENCY_MS)
                        .ok_or_else(|| {
                            format!(
                                "field `latency_ms` must be an integer in [0, {MAX_LATENCY_MS}], \
                                 got {value}"
                            )
                        })?;
                }
                "error_rate" => {
                    faults.error_rate = value
                        .as_f64()
                        .filter(|rate| rate.is_finite() && (0.0..=1.0).contains(rate))
                        // `-0.0` is in range; show it as the 0 it means.
                        .map(f64::abs)
                        .ok_or_else(|| {
                            format!("field `error_rate` must be a number in [0, 1], got {value}")
                        })?;
                }
                other => {
                    return Err(format!(
                        "unknown field `{other}`, expected `latency_ms` or `error_rate`"
                    ))
                }
            }
        }
        Ok(faults)
    }

    pub fn latency_ms(&self) -> u64 {
        self.latency_ms
    }

    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    pub fn error_rate(&self) -> f64 {
        self.error_rate
    }

    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }
}

/// The current faults and the error accumulator. Lives behind its own mutex in the server, taken
/// only for a copy or one addition, never across an `.await` and never while taking another lock.
#[derive(Debug, Default)]
pub struct FaultInjector {
    faults: Faults,
    /// `faults.error_rate` in parts per billion, rounded.
    rate_ppb: u64,
    /// Accumulated rate not yet spent on a failure; always `< PPB` between requests.
    credit_ppb: u64,
}

impl FaultInjector {
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Replace the faults and restart the error accumulator.
    pub fn set(&mut self, faults: Faults) {
        // In [0, 1] by construction, so the product is in [0, PPB] and the cast exact.
        let rate_ppb = (faults.error_rate * PPB as f64).round() as u64;
        *self = Self {
            faults,
            rate_ppb: rate_ppb.min(PPB),
            credit_ppb: 0,
        };
    }

    /// Count one request that would be recorded; `true` if it must fail instead.
    pub fn next_request_fails(&mut self) -> bool {
        self.credit_ppb += self.rate_ppb;
        if self.credit_ppb >= PPB {
            self.credit_ppb -= PPB;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injector(error_rate: f64) -> FaultInjector {
        let mut injector = FaultInjector::default();
        let body = serde_json::json!({ "error_rate": error_rate }).to_string();
        injector.set(Faults::parse(body.as_bytes()).unwrap());
        injector
    }

    fn failures(injector: &mut FaultInjector, requests: usize) -> Vec<usize> {
        (1..=requests)
            .filter(|_| injector.next_request_fails())
            .collect()
    }

    #[test]
    fn after_n_requests_exactly_floor_of_n_times_the_rate_have_failed() {
        // The reference is computed in integers: in f64, 90 × 0.7 is 62.99999999999999.
        for (rate, per_thousand) in [(0.0, 0), (0.1, 100), (0.25, 250), (0.7, 700), (1.0, 1000)] {
            let mut injector = injector(rate);
            let mut failed = 0u64;
            for n in 1..=1000u64 {
                failed += u64::from(injector.next_request_fails());
                assert_eq!(failed, n * per_thousand / 1000, "rate {rate}, n {n}");
            }
            assert_eq!(failed, per_thousand);
        }
    }

    #[test]
    fn at_one_half_every_second_request_fails_starting_with_the_second() {
        let mut injector = injector(0.5);
        assert_eq!(failures(&mut injector, 10), vec![2, 4, 6, 8, 10]);
    }

    #[test]
    fn setting_the_faults_again_restarts_the_count() {
        let mut injector = injector(0.5);
        assert!(!injector.next_request_fails());
        injector.set(injector.faults());
        assert!(!injector.next_request_fails(), "credit was reset");
        assert!(injector.next_request_fails());
    }

    #[test]
    fn missing_fields_mean_zero_and_bad_values_are_refused_naming_the_field() {
        assert_eq!(Faults::parse(b"{}"), Ok(Faults::default()));
        assert!(Faults::parse(b"{}").unwrap().is_none());
        let both = Faults::parse(br#"{"latency_ms": 600000, "error_rate": 1}"#).unwrap();
        assert_eq!(both.latency(), Duration::from_secs(600));
        assert_eq!(both.error_rate(), 1.0);
        assert_eq!(
            Faults::parse(br#"{"error_rate": -0.0}"#)
                .unwrap()
                .error_rate(),
            0.0
        );
        for (body, needle) in [
            (r#"{"latency_ms": 600001}"#, "latency_ms"),
            (r#"{"latency_ms": -1}"#, "latency_ms"),
            (r#"{"latency_ms": 1.5}"#, "latency_ms"),
            (r#"{"error_rate": 1.0000001}"#, "error_rate"),
            (r#"{"error_rate": -0.1}"#, "error_rate"),
            (r#"{"error_rate": "0.5"}"#, "error_rate"),
            (r#"{"error_rate": 1e999}"#, ""),
            (r#"{"latency": 5}"#, "latency"),
            (r#"{"error_rate": null}"#, ""),
            ("[]", ""),
            ("", ""),
            ("{", ""),
        ] {
            let err = Faults::parse(body.as_bytes()).unwrap_err();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
