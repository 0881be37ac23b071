//! The report of `tlshub-hold client`, shared by the tool that writes it
//! and the capacity scenario that reads it.

use serde::{Deserialize, Serialize};

/// What `tlshub-hold client` achieved: how many connections it opened and
/// held at once, and whether they all still worked at the end.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HoldReport {
    /// Connections asked for (`--count`).
    pub wanted: u64,
    /// Connections that completed their first exchange (exact bytes both
    /// ways) and were kept open.
    pub opened: u64,
    /// Connection attempts that failed (connect, or the first exchange).
    pub failed: u64,
    /// The first few failures, for the report.
    pub first_errors: Vec<String>,
    /// Seconds it took to open `opened` connections.
    pub open_seconds: f64,
    /// Of the open connections, how many completed a second exchange
    /// after all of them were open (exact bytes both ways).
    pub still_working: u64,
    /// Exchanges whose answer differed from the pattern.
    pub corrupt: u64,
    /// Why it stopped before `wanted`, if it did.
    pub stopped_early: Option<String>,
}

impl HoldReport {
    /// Everything asked for was opened without one failed attempt, and
    /// every connection still worked.
    pub fn complete(&self) -> bool {
        self.opened == self.wanted
            && self.failed == 0
            && self.still_working == self.opened
            && self.corrupt == 0
    }
}
