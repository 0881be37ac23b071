//! The report of `tlshub-core check` (`--json`): whether this host can run
//! the core, one requirement per [`Check`]. Written by the core, read by
//! the tests and by scripts.

use serde::{Deserialize, Serialize};

/// One requirement and what this host has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What is required (`kernel TLS`, `BPF LSM`, ...), one of [`NAMES`].
    pub name: String,
    /// Whether this host meets it.
    pub ok: bool,
    /// What was found, with where it was read.
    pub found: String,
    /// What to change when it is not met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

/// The whole report, in [`NAMES`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every requirement checked.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every requirement is met.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The check called `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The requirements `tlshub-core check` reports on, in order.
pub const NAMES: [&str; 10] = [
    "configuration",
    "kernel",
    "kernel TLS",
    "BTF",
    "BPF LSM",
    "cgroup v2",
    "bpffs",
    "capabilities",
    "pidfd_getfd",
    "BPF programs",
];
