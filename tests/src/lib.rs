//! tlshub's kernel test bed: the pieces that run inside the VM.
//!
//! - `tlshub-testapp` (src/bin): an ordinary TCP application that knows
//!   nothing about tlshub, moving bytes with every system call we gate.
//! - `tlshub-vm-runner` (src/bin): builds the two-node topology and runs the
//!   scenarios, reporting each result on the serial console.
//! - `tlshub-bad-provider` (src/bin): a provider that misbehaves on purpose.
//! - `tlshub-hold` (src/bin): opens and holds as many connections as asked
//!   (the capacity run), reporting a [`hold::HoldReport`].
//! - `tlshub-loadgen` (src/bin): long connections and new ones at a fixed
//!   rate (the service scenarios, the benchmark's collateral stall),
//!   reporting a [`load::LoadReport`].
//! - `tlshub-testapp` reports an [`app_report::AppReport`].
//! - [`panics`]: a scenario that panics fails with the panic's reason.
//! - [`pattern`], [`wire`]: the byte pattern the apps exchange and the
//!   packet-capture checks (no plaintext, TLS records, decryption).
//!
//! `tests/README.md` explains how to add a scenario.

pub mod app_io;
pub mod app_report;
pub mod conformance;
pub mod hold;
pub mod load;
pub mod panics;
pub mod pattern;
pub mod vm;
pub mod wire;

/// Writes a tool's report as the one JSON line the tool printed (its
/// `Debug` form if it cannot be serialized), for failure messages.
pub fn fmt_report<T: serde::Serialize + std::fmt::Debug>(
    report: &T,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match serde_json::to_string(report) {
        Ok(line) => f.write_str(&line),
        Err(_) => write!(f, "{report:?}"),
    }
}
