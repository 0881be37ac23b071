//! The report of `tlshub-loadgen client`, shared by the tool that writes it
//! and the scenarios and the benchmark that read it.

use serde::{Deserialize, Serialize};

/// What one run of `tlshub-loadgen client` saw.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    /// No long connection broke, nothing arrived corrupt, no setup error.
    pub ok: bool,
    pub long_opened: u32,
    pub long_broken: u32,
    /// Verified round trips of the long connections.
    pub long_pieces: u64,
    pub long_bytes: u64,
    /// Round-trip times of the long connections' pieces while no short
    /// connection was being opened by anyone the client knows of: the
    /// whole run, or before `--busy-from-s`.
    pub rtt_quiet: RoundTrips,
    /// The same from one second after `--busy-from-s` to the end (empty
    /// without that flag).
    pub rtt_busy: RoundTrips,
    pub short_attempted: u64,
    pub short_ok: u64,
    pub short_failed: u64,
    pub corrupt: u64,
    /// Milliseconds since the load started, and the error, per failed short
    /// connection (first 300: the report must fit the pipe buffer).
    pub short_failures: Vec<(u64, String)>,
    /// First errors of broken long connections.
    pub long_errors: Vec<String>,
    /// Start (milliseconds since the load started) and outcome of every
    /// short connection, in start order (first 1,500).
    pub short_log: Vec<(u64, bool)>,
    /// Short connection setup+exchange p50/p99, milliseconds.
    pub short_p50_ms: f64,
    pub short_p99_ms: f64,
    pub duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Percentiles of a set of round trips (send a piece, read its answer), in
/// microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundTrips {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl RoundTrips {
    /// The percentiles of `samples` (microseconds, any order).
    pub fn of(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let pick = |p: f64| crate::vm::support::percentile(&samples, p);
        Self {
            count: samples.len() as u64,
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            p999_us: pick(0.999),
            max_us: samples.last().copied().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for LoadReport {
    /// The report as the JSON the tool printed, for error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::fmt_report(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_percentiles_come_from_the_sorted_samples() {
        let r = RoundTrips::of((1..=1000).rev().collect());
        assert_eq!(
            r,
            RoundTrips {
                count: 1000,
                p50_us: 501,
                p99_us: 990,
                p999_us: 999,
                max_us: 1000
            }
        );
        assert_eq!(RoundTrips::of(Vec::new()), RoundTrips::default());
    }
}
