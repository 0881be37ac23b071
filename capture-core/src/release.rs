//! `tlshub-core release`: for when no core is coming back. Works from the
//! pinned maps alone: connections still waiting for keys get the failure
//! policy (reset, or let through), the gate stops holding, processes it
//! stopped are continued, and with `--detach` the programs and maps are
//! removed altogether.

use std::path::{Path, PathBuf};

use tlshub_ebpf::gate;
use tracing::{info, warn};

use crate::bpf::{BpfError, Programs, unpin_all};
use crate::config::{Config, FailurePolicy};
use crate::{keying, sys};

/// What a release did.
#[derive(Debug, Default)]
pub struct Released {
    /// Waiting connections reset (fail-closed).
    pub reset: usize,
    /// Waiting connections let through (fail-open).
    pub passed: usize,
    /// Waiting connections whose socket could not be reached (not yet
    /// accepted, or closed): the gate refuses (fail-closed) or passes them.
    pub unreachable: usize,
    /// Stopped processes continued.
    pub continued: usize,
    /// Programs and maps removed.
    pub detached: bool,
}

/// Why a release could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The pinned maps could not be opened.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// Removing the pins failed.
    #[error("cannot remove the pins under {dir}: {source}")]
    Unpin {
        /// The pin directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Releases what the pinned programs under `config.bpf.pin_dir` hold.
pub fn release(config: &Config, detach: bool) -> Result<Released, ReleaseError> {
    let dir = &config.bpf.pin_dir;
    let mut done = Released::default();
    match Programs::open_pinned(dir) {
        Ok(mut programs) => release_open(&mut programs, config, &mut done),
        // Another build's maps cannot be read with this build's layouts:
        // only removing them is possible.
        Err(e @ BpfError::ForeignPins { .. }) if detach => {
            warn!(error = %e, "removing another build's programs without resetting its connections")
        }
        // Nothing pinned (never started, or already released): removing
        // leftovers is all there is to do.
        Err(BpfError::Pin { .. }) if detach => {}
        Err(e) => return Err(e.into()),
    }
    if detach {
        unpin(dir)?;
        done.detached = true;
    }
    info!(
        reset = done.reset,
        passed = done.passed,
        unreachable = done.unreachable,
        continued = done.continued,
        detached = done.detached,
        "released"
    );
    Ok(done)
}

fn release_open(programs: &mut Programs, config: &Config, done: &mut Released) {
    let fail_open = config.failure_policy == FailurePolicy::FailOpen;
    // From now on the gate applies the failure policy itself: a heartbeat
    // of 0 means no core.
    programs.no_core(fail_open);
    let conns = programs.all_conns();
    for (cookie, conn) in &conns {
        if conn.gate != gate::CLOSED {
            continue;
        }
        let socket = (conn.owner_pid != 0)
            .then(|| keying::find_socket(conn.owner_pid, conn.owner_fd, *cookie).ok())
            .flatten();
        match socket {
            Some(s) if !fail_open => match sys::reset_connection(std::os::fd::AsFd::as_fd(&s)) {
                Ok(()) => done.reset += 1,
                Err(e) => {
                    warn!(cookie, error = %e, "cannot reset");
                    done.unreachable += 1;
                }
            },
            Some(_) => done.passed += 1,
            None => done.unreachable += 1,
        }
    }
    let mut pids: Vec<u32> = conns
        .iter()
        .map(|(_, c)| c.owner_pid)
        .filter(|p| *p != 0)
        .chain(programs.held().into_iter().map(|(pid, _)| pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if crate::agent::process_state(pid) == Some('T') && sys::continue_process(pid).is_ok() {
            done.continued += 1;
        }
    }
}

fn unpin(dir: &Path) -> Result<(), ReleaseError> {
    unpin_all(dir).map_err(|source| ReleaseError::Unpin {
        dir: dir.to_owned(),
        source,
    })
}
