//! `tlshub-core release`: for when no core is coming back. Works from the
//! pinned maps alone: connections still waiting for keys get the failure
//! policy (reset, or let through), the gate stops holding, processes it
//! stopped are continued, and with `--detach` the programs and maps are
//! removed altogether.

use std::path::{Path, PathBuf};

use tlshub_ebpf::{gate, kind};
use tracing::{info, warn};

use crate::bpf::{BpfError, Programs, unpin_all};
use crate::config::{Config, FailurePolicy};
use crate::state::{Failed, apply_failure};
use crate::{keying, sys};

/// What a release did.
#[derive(Debug, Default)]
pub struct Released {
    /// Waiting connections reset (fail-closed).
    pub reset: usize,
    /// Waiting connections let through (fail-open).
    pub passed: usize,
    /// Waiting connections put in the gate's terminal state (every call
    /// fails with `ECONNRESET`): the socket could not be reached (not yet
    /// accepted, or passed on) or refused the reset.
    pub terminal: usize,
    /// Waiting connections that could not be reached and were aborted by
    /// their tuple (their peers got a RST).
    pub aborted: usize,
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
        /// The removal's error.
        #[source]
        source: std::io::Error,
    },
}

/// Releases what the pinned programs under `config.bpf.pin_dir` hold.
/// With `wait_for_core`, first waits out the restart grace and returns
/// `None` (nothing done) if a core beats again meanwhile.
pub fn release(
    config: &Config,
    detach: bool,
    wait_for_core: bool,
) -> Result<Option<Released>, ReleaseError> {
    let dir = &config.bpf.pin_dir;
    let mut done = Released::default();
    match Programs::open_pinned(dir) {
        Ok(mut programs) => {
            if wait_for_core && core_came_back(&programs, config) {
                return Ok(None);
            }
            release_open(&mut programs, config, &mut done);
        }
        // Another build's maps cannot be read with this build's layouts:
        // only removing them is possible.
        Err(e @ BpfError::ForeignPins { .. }) if detach => {
            warn!(error = %e, "removing another build's programs without resetting its connections")
        }
        // Nothing pinned (never started, or already released): removing
        // leftovers is all there is to do.
        // With --wait-for-core (the systemd stop hook) the core may have
        // failed before it pinned anything.
        Err(BpfError::Pin { .. }) if detach || wait_for_core => {}
        Err(e) => return Err(e.into()),
    }
    if detach {
        unpin(dir)?;
        done.detached = true;
    }
    info!(
        reset = done.reset,
        passed = done.passed,
        terminal = done.terminal,
        aborted = done.aborted,
        continued = done.continued,
        detached = done.detached,
        "released"
    );
    Ok(Some(done))
}

/// Waits until the last core's grace has run out (true: a core beat again
/// before that, so it is alive and owns the connections).
///
/// Why wait at all: under systemd the stop hook runs on every stop,
/// including the stop half of a restart. Releasing then would reset the
/// very connections the restarted core is about to adopt. The grace is the
/// one the gate itself uses before it stops holding, so after it the
/// release only finishes what the gate already started.
fn core_came_back(programs: &Programs, config: &Config) -> bool {
    let (first, grace) = programs.heartbeat_read();
    if first == 0 {
        // Already released (or never beaten): nothing to wait for.
        return false;
    }
    let grace = if grace.is_zero() {
        std::time::Duration::from_millis(config.bpf.core_restart_grace_ms)
    } else {
        grace
    };
    let deadline = std::time::Duration::from_nanos(first) + grace;
    info!(
        grace_ms = grace.as_millis(),
        "waiting for a core to come back"
    );
    loop {
        let (beat, _) = programs.heartbeat_read();
        if beat != 0 && beat != first {
            info!("a core is beating again; nothing to release");
            return true;
        }
        let now = std::time::Duration::from_nanos(sys::monotonic_ns());
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(100)));
    }
}

fn release_open(programs: &mut Programs, config: &Config, done: &mut Released) {
    let fail_open = config.failure_policy == FailurePolicy::FailOpen;
    // From now on the gate applies the failure policy itself: a heartbeat
    // of 0 means no core.
    programs.no_core(fail_open);
    // Its shutdown() of a connection it cannot reset must pass the gate's
    // terminal state (see apply_failure).
    programs.exempt.add(std::process::id());
    let conns = programs.all_conns();
    for (cookie, conn) in &conns {
        if conn.gate != gate::CLOSED {
            continue;
        }
        // `conns` was just read: the connection is there to search for.
        let socket = (conn.owner_pid != 0)
            .then(|| keying::find_socket(conn.owner_pid, conn.owner_fd, *cookie, || true).ok())
            .flatten();
        match apply_failure(
            programs,
            *cookie,
            socket.as_ref(),
            &[],
            config.failure_policy,
            false,
        ) {
            Failed::Reset => done.reset += 1,
            Failed::Terminal => done.terminal += 1,
            Failed::Destroyed => done.aborted += 1,
            Failed::PassedPlaintext => done.passed += 1,
            Failed::Closed => {}
        }
    }
    // Processes the gate stopped since the last core left: their HELD
    // events wait in the ring buffer, which no core read. Their connection
    // may be gone from `conns` already (the peer reset it), so the events
    // are the only record of them.
    let mut gate_stopped: Vec<u32> = programs
        .events
        .as_mut()
        .map(crate::bpf::drain_events)
        .unwrap_or_default()
        .into_iter()
        .filter(|ev| matches!(ev.kind, kind::HELD | kind::HELD_CONNECTING))
        .map(|ev| ev.pid)
        .chain(programs.held().into_iter().map(|(pid, _)| pid))
        .collect();
    gate_stopped.sort_unstable();
    gate_stopped.dedup();
    let mut owners: Vec<u32> = conns
        .iter()
        .map(|(_, c)| c.owner_pid)
        .filter(|p| *p != 0 && !gate_stopped.contains(p))
        .collect();
    owners.sort_unstable();
    owners.dedup();
    // A stop the gate sent takes a moment to take effect: wait for it, or a
    // process stopping just after this look would stay stopped for good.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    for pid in gate_stopped {
        loop {
            match crate::procfs::state(pid) {
                Some('T') => {
                    if sys::continue_process(pid).is_ok() {
                        done.continued += 1;
                    }
                    break;
                }
                Some(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
    for pid in owners {
        if crate::procfs::state(pid) == Some('T') && sys::continue_process(pid).is_ok() {
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
