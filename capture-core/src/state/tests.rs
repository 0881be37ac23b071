//! The orderings the kernel and the keying jobs can produce, against a fake
//! kernel: every decision the table makes is a call on [`FakeKernel`],
//! which records it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tlshub_ebpf::{Conn, Event, Held, gate, kind, role};
use tlshub_provider_sdk::{CipherSuite, TlsVersion};

use super::*;
use crate::config::FailurePolicy;
use crate::keying::{Done, Installed, JobTimeline, KeyingError, Outcome, PlainWhy};
use crate::metrics::Metrics;
use tlshub_ktls::KtlsStep;

const COOKIE: u64 = 42;
const PID: u32 = 700;

/// The core's handle on a socket: the cookie of the socket it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FakeSocket(u64);

/// Connections by cookie, process states by pid, and every action taken.
#[derive(Debug, Default)]
struct FakeKernel {
    conns: HashMap<u64, Conn>,
    states: HashMap<u32, char>,
    overflow: Vec<(u32, Held)>,
    /// `reset()` fails (as it does with the tls ULP on current kernels).
    refuse_reset: bool,
    now: u64,
    resets: Vec<u64>,
    shutdowns: Vec<u64>,
    /// The gate each `shutdown()` found: it must come after the terminal
    /// state, or a waiter it wakes is told EAGAIN again.
    gate_at_shutdown: Vec<Option<u32>>,
    continued: Vec<u32>,
    /// Connections aborted by their tuple, with the held pids given and
    /// the gate then (the terminal state must come first, as for
    /// `shutdown()`).
    destroyed: Vec<(u64, Vec<u32>, Option<u32>)>,
    /// Process states read (each a `/proc` read in the real core).
    state_reads: std::cell::Cell<u32>,
    /// Connections whose gate was opened for good with their socket, and
    /// what was behind it: like the real kernel side, their `conns`
    /// entries are gone.
    opened: HashMap<u64, Behind>,
}

impl FakeKernel {
    /// The connection's gate (`OPEN` also once its entry is gone).
    fn gate(&self, cookie: u64) -> Option<u32> {
        let opened = self.opened.contains_key(&cookie).then_some(gate::OPEN);
        self.conns.get(&cookie).map(|c| c.gate).or(opened)
    }

    /// The gate stopped `pid` on `cookie` and, the ring buffer being
    /// full, recorded the hold in the `held` map only.
    fn hold_in_map(&mut self, cookie: u64, pid: u32) {
        self.overflow.push((
            pid,
            Held {
                cookie,
                since_ns: 0,
            },
        ));
        self.states.insert(pid, 'T');
    }

    /// sockops at connect()/accept: a tracked connection, gate closed.
    fn track(&mut self, cookie: u64, est: Event) {
        self.conns.insert(
            cookie,
            Conn {
                gate: gate::CLOSED,
                role: est.role,
                est,
                ..Conn::default()
            },
        );
    }
}

impl Kernel for FakeKernel {
    type Socket = FakeSocket;

    fn conn(&self, cookie: u64) -> Option<Conn> {
        self.conns.get(&cookie).copied()
    }

    fn open_gate(
        &mut self,
        cookie: u64,
        socket: &FakeSocket,
        behind: Behind,
    ) -> Result<(), BpfError> {
        assert_eq!(socket.0, cookie, "a gate opened with another socket");
        if self.set_gate(cookie, gate::OPEN)? {
            self.conns.remove(&cookie);
            self.opened.insert(cookie, behind);
        }
        Ok(())
    }

    fn set_gate(&mut self, cookie: u64, state: u32) -> Result<bool, BpfError> {
        Ok(self
            .conns
            .get_mut(&cookie)
            .map(|c| c.gate = state)
            .is_some())
    }

    fn reset(&mut self, socket: &FakeSocket) -> std::io::Result<()> {
        if self.refuse_reset {
            return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.resets.push(socket.0);
        Ok(())
    }

    fn shutdown(&mut self, socket: &FakeSocket) {
        self.shutdowns.push(socket.0);
        self.gate_at_shutdown.push(self.gate(socket.0));
    }

    fn destroy(&mut self, cookie: u64, pids: &[u32]) -> Result<(), crate::sockdiag::SockDiagError> {
        let gate = self.gate(cookie);
        self.destroyed.push((cookie, pids.to_vec(), gate));
        Ok(())
    }

    fn take_held_overflow(&mut self) -> Vec<(u32, Held)> {
        std::mem::take(&mut self.overflow)
    }

    fn process_state(&self, pid: u32) -> Option<char> {
        self.state_reads.set(self.state_reads.get() + 1);
        self.states.get(&pid).copied()
    }

    /// A process exists while it has a state.
    fn continue_process(&mut self, pid: u32) -> std::io::Result<()> {
        if !self.states.contains_key(&pid) {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        self.continued.push(pid);
        self.states.insert(pid, 'S');
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        self.now
    }
}

fn table(policy: FailurePolicy) -> ConnTable {
    ConnTable::new(policy, Arc::new(Metrics::new()))
}

/// An ESTABLISHED event; `generation` tells connections of one socket apart.
fn established(cookie: u64, generation: u32) -> Event {
    Event {
        kind: kind::ESTABLISHED,
        role: role::CLIENT,
        cookie,
        ts_ns: 1_000 + u64::from(generation),
        local_isn: 100 + generation,
        remote_isn: 200 + generation,
        family: 10,
        local_port: 40_000,
        remote_port: 8443,
        local_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 1, 2],
        remote_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 2],
        ..Event::default()
    }
}

fn owner(cookie: u64, pid: u32, fd: i32) -> Event {
    Event {
        kind: kind::OWNER,
        cookie,
        pid,
        fd,
        ..Event::default()
    }
}

fn held(cookie: u64, pid: u32, ts_ns: u64) -> Event {
    Event {
        kind: kind::HELD,
        cookie,
        pid,
        ts_ns,
        ..Event::default()
    }
}

/// The gate held `pid` on a socket still connecting (no `conns` entry).
fn held_connecting(cookie: u64, pid: u32) -> Event {
    Event {
        kind: kind::HELD_CONNECTING,
        ..held(cookie, pid, 0)
    }
}

fn waiting(cookie: u64, pid: u32) -> Event {
    Event {
        kind: kind::WAITING,
        cookie,
        pid,
        ..Event::default()
    }
}

fn closed(cookie: u64) -> Event {
    Event {
        kind: kind::CLOSED,
        cookie,
        ..Event::default()
    }
}

fn installed_keys() -> Installed {
    Installed {
        version: TlsVersion::Tls13,
        cipher: CipherSuite::Aes128Gcm,
        key_time: Duration::from_millis(3),
        keyed_before_owner: false,
        backend: None,
        timeline: JobTimeline::default(),
    }
}

fn installed() -> Result<Done, KeyingError> {
    Ok(Done::Installed(installed_keys()))
}

/// Nothing to key, by policy: the gate opens as plain.
fn plain(remote: &str, why: PlainWhy) -> Result<Done, KeyingError> {
    Ok(Done::Plain {
        remote: remote.parse().unwrap(),
        why,
    })
}

fn provider_refused() -> Result<Done, KeyingError> {
    Err(KeyingError::TakeSocket {
        pid: PID,
        fd: 3,
        source: std::io::Error::from_raw_os_error(libc::EPERM),
    })
}

fn outcome(start: &Start, result: Result<Done, KeyingError>) -> Outcome<FakeSocket> {
    Outcome {
        job: start.job,
        cookie: start.cookie,
        provider: "fake".into(),
        socket: Some(FakeSocket(start.cookie)),
        result,
    }
}

/// The job did not find the socket in `pid` (no socket duplicate).
fn socket_gone(start: &Start, pid: u32) -> Outcome<FakeSocket> {
    Outcome {
        socket: None,
        ..outcome(
            start,
            Err(KeyingError::SocketGone {
                cookie: start.cookie,
                pid,
                fd: start.owner.map_or(-1, |o| o.1),
            }),
        )
    }
}

/// The one job started by the last calls.
fn one_start(t: &mut ConnTable) -> Start {
    let starts = t.take_starts();
    assert_eq!(starts.len(), 1, "expected exactly one job: {starts:?}");
    starts[0]
}

fn no_start(t: &mut ConnTable) {
    let starts = t.take_starts();
    assert!(starts.is_empty(), "expected no job: {starts:?}");
}

/// A sweep as the event loop runs it (states read first).
fn sweep(t: &mut ConnTable, k: &mut FakeKernel) {
    let states = t.held_states(k);
    t.sweep_held(k, &states);
}

/// A client connection tracked, established and owned by [`PID`]: its job
/// started.
fn keying(t: &mut ConnTable, k: &mut FakeKernel, cookie: u64) -> Start {
    keying_for(t, k, cookie, PID)
}

/// Connection `cookie` tracked, established and owned by `pid`: its job
/// started.
fn keying_for(t: &mut ConnTable, k: &mut FakeKernel, cookie: u64, pid: u32) -> Start {
    keying_in(t, k, cookie, pid, 0)
}

/// [`keying_for`] with the owner in `cgroup` (0: not known).
fn keying_in(t: &mut ConnTable, k: &mut FakeKernel, cookie: u64, pid: u32, cgroup: u64) -> Start {
    let est = established(cookie, 0);
    k.track(cookie, est);
    t.on_event(k, est);
    t.on_event(
        k,
        Event {
            cgroup,
            ..owner(cookie, pid, 3)
        },
    );
    one_start(t)
}

#[test]
fn a_job_starts_once_both_established_and_owner_are_known_in_either_order() {
    for owner_first in [false, true] {
        let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
        let est = established(COOKIE, 0);
        k.track(COOKIE, est);
        let events = if owner_first {
            [owner(COOKIE, PID, 3), est]
        } else {
            [est, owner(COOKIE, PID, 3)]
        };
        t.on_event(&k, events[0]);
        no_start(&mut t);
        t.on_event(&k, events[1]);
        let s = one_start(&mut t);
        assert_eq!(
            (s.cookie, s.owner, s.established),
            (COOKIE, Some((PID, 3)), est)
        );
        // A second OWNER (another connect() call) starts nothing more.
        t.on_event(&k, owner(COOKIE, PID, 3));
        no_start(&mut t);
    }
}

#[test]
fn installed_keys_open_the_gate_and_the_connection_is_tracked_as_protected() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, outcome(&s, installed()));
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
    assert!(t.pending().is_empty());
    assert_eq!(t.protected()[&COOKIE].pid, PID);
    assert_eq!(t.stats().protected, 1);
    t.on_event(&k, closed(COOKIE));
    assert!(t.protected().is_empty());
}

/// Whom the opening must wake depends on what is behind the gate: kTLS
/// wakes its readers itself, a socket let through as it was does not.
#[test]
fn a_keyed_gate_opens_behind_ktls_and_a_failed_open_one_as_plain() {
    let (mut t, mut k) = (table(FailurePolicy::FailOpen), FakeKernel::default());
    let keyed = keying(&mut t, &mut k, 1);
    t.on_outcome(&mut k, outcome(&keyed, installed()));
    let refused = keying(&mut t, &mut k, 2);
    t.on_outcome(&mut k, outcome(&refused, provider_refused()));
    let unselected = keying(&mut t, &mut k, 3);
    let why = PlainWhy::ServiceBackendUnselected;
    t.on_outcome(&mut k, outcome(&unselected, plain("10.0.2.2:80", why)));
    assert_eq!(k.opened.get(&1), Some(&Behind::Ktls));
    assert_eq!(k.opened.get(&2), Some(&Behind::Plain));
    assert_eq!(k.opened.get(&3), Some(&Behind::Plain));
}

#[test]
fn each_stage_of_a_protected_connection_is_timed_from_its_established() {
    use tlshub_admin::stats::Stage;
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // ESTABLISHED stamped by the kernel at 1 us (`established`'s ts_ns),
    // read 9 us later; the owner known at 20 us.
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    k.now = 10_000;
    t.on_event(&k, est);
    k.now = 21_000;
    t.on_event(&k, owner(COOKIE, PID, 3));
    let s = one_start(&mut t);
    k.now = 900_000;
    t.on_event(&k, held(COOKIE, PID, 800_000));
    k.states.insert(PID, 'T');
    let timeline = JobTimeline {
        started: 31_000,
        socket_taken: 41_000,
        asked: 51_000,
        answered: 501_000,
        installed: 601_000,
    };
    k.now = 1_001_000;
    t.on_outcome(
        &mut k,
        outcome(
            &s,
            Ok(Done::Installed(Installed {
                timeline,
                ..installed_keys()
            })),
        ),
    );
    k.now = 2_001_000;
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    let at = |stage| t.stats().stages.of(true, stage).sorted();
    let micros: Vec<_> = Stage::ALL.into_iter().map(at).collect();
    assert_eq!(
        micros,
        [
            vec![9],
            vec![20],
            vec![30],
            vec![40],
            vec![50],
            vec![500],
            vec![600],
            vec![1000],
            vec![2000]
        ]
    );
    assert!(
        Stage::ALL
            .iter()
            .all(|&st| t.stats().stages.of(false, st).is_empty())
    );
    let text = t.metrics.encode();
    let line = "tlshub_connection_stage_seconds_count{provider=\"fake\",role=\"client\",stage=\"app_continued\"} 1";
    assert!(text.contains(line), "{line} not in:\n{text}");
}

#[test]
fn a_stage_not_passed_or_passed_before_established_is_not_a_huge_figure() {
    use tlshub_admin::stats::Stage;
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // The owner is known before ESTABLISHED (a non-blocking connect()
    // returned first), and the job never took the socket itself (0).
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    k.now = 500;
    t.on_event(&k, owner(COOKIE, PID, 3));
    k.now = 5_000;
    t.on_event(&k, est);
    let s = one_start(&mut t);
    t.on_outcome(&mut k, outcome(&s, installed()));
    let st = &t.stats().stages;
    assert_eq!(st.of(true, Stage::OwnerKnown).sorted(), [0]);
    assert!(st.of(true, Stage::SocketTaken).is_empty());
    assert_eq!(st.of(true, Stage::GateOpened).sorted(), [4]);
}

#[test]
fn each_connection_leaves_one_outcome_per_event_named_by_its_provider() {
    use crate::outcomes::OutcomeKind;
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // Keyed, with its process held meanwhile: KEYED, then HELD when the
    // sweep continues it.
    let s = keying(&mut t, &mut k, COOKIE);
    k.now = 5_000_000;
    t.on_event(&k, held(COOKIE, PID, 1_000_000));
    k.states.insert(PID, 'T');
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    // Another refused by the provider: FAILED with the reason.
    let other = keying(&mut t, &mut k, COOKIE + 1);
    t.on_outcome(&mut k, outcome(&other, provider_refused()));
    let since = t.outcomes().since(0, 10);
    let kinds: Vec<_> = since
        .outcomes
        .iter()
        .map(|o| (o.seq, &*o.provider, o.kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (
                1,
                "fake",
                OutcomeKind::Keyed {
                    role: "client",
                    key: Duration::from_millis(3)
                }
            ),
            (
                2,
                "fake",
                OutcomeKind::Held {
                    held: Duration::from_millis(4)
                }
            ),
            (
                3,
                "fake",
                OutcomeKind::Failed {
                    reason: "take_socket"
                }
            ),
        ]
    );
    // Closing a keyed connection adds nothing.
    t.on_event(&k, closed(COOKIE));
    assert_eq!(t.outcomes().since(3, 10).outcomes, []);
}

#[test]
fn a_connection_closed_while_keying_is_left_alone_when_its_job_ends() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    k.conns.remove(&COOKIE);
    t.on_event(&k, closed(COOKIE));
    assert_eq!(t.stats().closed_before_keys, 1);
    for result in [installed(), provider_refused()] {
        t.on_outcome(&mut k, outcome(&s, result));
    }
    assert!(t.protected().is_empty() && t.pending().is_empty());
    assert!(k.resets.is_empty(), "nothing to reset: {:?}", k.resets);
    assert_eq!(t.stats().failed.values().sum::<u64>(), 0);
    no_start(&mut t);
}

#[test]
fn a_held_process_is_continued_once_after_its_connection_is_keyed_and_not_before() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_event(&k, held(COOKIE, PID, 0));
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty(), "continued while still gated");
    t.on_outcome(&mut k, outcome(&s, installed()));
    assert!(t.take_sweep_due());
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    // Stopped again by someone else (job control): not ours to continue.
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
}

/// A hold reported by an event is continued without a look at `/proc`:
/// the gate commits the event only after its SIGSTOP is queued, so the
/// SIGCONT cannot come first. Even a process not stopped yet is
/// continued (the SIGCONT cancels the pending stop).
#[test]
fn a_hold_reported_by_an_event_is_continued_without_reading_its_state() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_event(&k, held(COOKIE, PID, 0));
    k.states.insert(PID, 'R');
    for _ in 0..3 {
        sweep(&mut t, &mut k);
    }
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    assert_eq!(
        (k.continued.as_slice(), k.state_reads.get()),
        ([PID].as_slice(), 0)
    );
    for _ in 0..3 {
        sweep(&mut t, &mut k);
    }
    assert_eq!(k.continued, [PID], "continued once");
    assert_eq!(t.held_count(), 1);
    assert!(!t.holds_to_continue(), "kept for its age only");
    k.now = HELD_RECORD_GRACE.as_nanos() as u64 + 1;
    sweep(&mut t, &mut k);
    assert_eq!(t.held_count(), 0, "forgotten by age");
    assert_eq!(k.state_reads.get(), 0);
}

/// A hold found only in the `held` map (written before its SIGSTOP) has
/// its process's state read only when it may be continued: not while its
/// connection is gated, and not once continued (the record is then
/// forgotten by age alone).
#[test]
fn a_sweep_reads_the_state_of_a_map_hold_only_when_it_may_continue_it() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    k.hold_in_map(COOKIE, PID);
    for _ in 0..3 {
        sweep(&mut t, &mut k);
    }
    assert_eq!(k.state_reads.get(), 0, "gated: nothing to decide");
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    assert_eq!(
        (k.continued.as_slice(), k.state_reads.get()),
        ([PID].as_slice(), 1)
    );
    for _ in 0..3 {
        sweep(&mut t, &mut k);
    }
    assert_eq!(
        k.state_reads.get(),
        1,
        "continued: its state no longer matters"
    );
    assert_eq!(t.held_count(), 1);
    k.now = HELD_RECORD_GRACE.as_nanos() as u64 + 1;
    sweep(&mut t, &mut k);
    assert_eq!(
        (t.held_count(), k.state_reads.get()),
        (0, 1),
        "forgotten by age"
    );
}

#[test]
fn a_process_held_while_its_socket_connects_stays_stopped_until_the_peer_answers_then_is_keyed() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // No conns entry yet: a plain HELD here would be continued at once.
    t.on_event(&k, held_connecting(COOKIE, PID));
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty(), "continued while still connecting");
    no_start(&mut t);
    // The peer answers: the entry is made and ESTABLISHED reported; the
    // held process names the owner.
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    t.on_event(&k, est);
    let s = one_start(&mut t);
    assert_eq!(s.owner, Some((PID, -1)));
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty(), "continued before the keys");
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
}

#[test]
fn a_process_held_while_its_socket_connects_is_continued_when_the_connect_ends() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    t.on_event(&k, held_connecting(COOKIE, PID));
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty());
    // The connect failed (or was refused at the peer's answer).
    t.on_event(&k, closed(COOKIE));
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    assert!(t.pending().is_empty());
    no_start(&mut t);
}

#[test]
fn a_hold_on_an_unknown_connection_without_an_entry_is_continued() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // A plain HELD whose entry is gone: the gate was decided meanwhile.
    t.on_event(&k, held(COOKIE, PID, 0));
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    assert!(t.pending().is_empty());
}

#[test]
fn a_hold_that_raced_the_gate_opening_is_continued() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, outcome(&s, installed()));
    // The program read the gate closed just before it opened; its stop
    // is queued, not taken yet.
    t.on_event(&k, held(COOKIE, PID + 1, 0));
    no_start(&mut t);
    k.states.insert(PID + 1, 'R');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID + 1]);
}

#[test]
fn a_map_hold_that_raced_the_gate_opening_is_continued_once_seen_stopped() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, outcome(&s, installed()));
    k.hold_in_map(COOKIE, PID + 1);
    // The map is written before the SIGSTOP: not stopped at the first
    // sweep, and a SIGCONT then would be lost.
    k.states.insert(PID + 1, 'R');
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty());
    k.states.insert(PID + 1, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID + 1]);
}

#[test]
fn a_shutdown_held_for_unsent_records_is_continued_by_each_sweep_and_is_no_key_wait() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let unsent = Event {
        kind: kind::UNSENT_HELD,
        ..held(COOKIE, PID, 0)
    };
    t.on_event(&k, unsent);
    // Paced by the periodic sweep, not a sweep at once.
    assert!(!t.take_sweep_due());
    no_start(&mut t);
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    // The restarted shutdown() found records still waiting: held again.
    t.on_event(&k, unsent);
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID, PID]);
    assert!(t.stats().held_micros.sorted().is_empty());
    assert_eq!(t.stats().gate_stops, 0);
}

#[test]
fn a_shutdown_held_for_an_open_record_asks_for_its_close_once_per_hold_and_is_continued() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let open_record = Event {
        kind: kind::OPEN_RECORD_HELD,
        ..held(COOKIE, PID, 0)
    };
    t.on_event(&k, open_record);
    // Not keyed by this table: no fd known, the process's are searched.
    let close = RecordClose {
        pid: PID,
        fd: -1,
        cookie: COOKIE,
    };
    assert_eq!(t.take_record_closes(), [close]);
    assert!(t.take_record_closes().is_empty());
    assert!(!t.take_sweep_due());
    no_start(&mut t);
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
    // The restarted shutdown() found the record closed and sent, but not
    // yet all in TCP: an ordinary unsent-records hold, nothing to close.
    t.on_event(
        &k,
        Event {
            kind: kind::UNSENT_HELD,
            ..open_record
        },
    );
    assert!(t.take_record_closes().is_empty());
    k.states.insert(PID, 'T');
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID, PID]);
    assert_eq!(t.stats().gate_stops, 0);
}

#[test]
fn an_open_record_of_a_keyed_connection_is_looked_for_at_its_fd_in_its_owner_only() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, outcome(&s, installed()));
    let (pid, fd) = s.owner.unwrap();
    let hold = |pid| Event {
        kind: kind::OPEN_RECORD_HELD,
        ..held(COOKIE, pid, 0)
    };
    t.on_event(&k, hold(pid));
    t.on_event(&k, hold(pid + 1));
    assert_eq!(
        t.take_record_closes(),
        [
            RecordClose {
                pid,
                fd,
                cookie: COOKIE
            },
            // Another process (the socket was passed on): no fd known there.
            RecordClose {
                pid: pid + 1,
                fd: -1,
                cookie: COOKIE
            }
        ]
    );
}

#[test]
fn a_map_stop_that_never_shows_is_forgotten_after_the_grace_and_a_gone_process_at_once() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    k.hold_in_map(COOKIE, PID);
    k.hold_in_map(COOKIE, PID + 1);
    k.states.insert(PID, 'R');
    k.states.remove(&(PID + 1));
    sweep(&mut t, &mut k);
    assert_eq!(t.held_count(), 1, "the gone process is forgotten");
    k.now = UNSEEN_STOP_GRACE.as_nanos() as u64 + 1;
    sweep(&mut t, &mut k);
    assert_eq!(t.held_count(), 0);
    assert!(k.continued.is_empty());
}

#[test]
fn an_event_hold_of_a_process_gone_is_forgotten_at_once() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    t.on_event(&k, held(COOKIE, PID, 0));
    sweep(&mut t, &mut k);
    assert_eq!(t.held_count(), 0);
    assert!(k.continued.is_empty());
    assert!(
        t.stats().held_micros.sorted().is_empty(),
        "no hold time for it"
    );
}

#[test]
fn a_hold_on_a_connection_whose_events_were_lost_keys_it_from_the_held_process() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    // ESTABLISHED and OWNER were dropped by a full ring buffer.
    t.on_event(&k, held(COOKIE, PID, 0));
    let s = one_start(&mut t);
    assert_eq!((s.owner, s.established), (Some((PID, -1)), est));
    assert_eq!(t.stats().owner_from_hold, 1);
}

#[test]
fn holds_recorded_in_the_map_when_the_ring_buffer_was_full_are_continued_too() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    k.hold_in_map(COOKIE, PID);
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID], "no connection pending: continue");
}

#[test]
fn a_hold_recorded_only_in_the_map_names_the_owner() {
    // The OWNER and HELD events were both lost: the `held` map's record is
    // all that says where the socket is. Without it the connection would
    // wait for an owner, its process stopped, for good.
    for key_before_owner in [false, true] {
        let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
        t.set_key_before_owner(key_before_owner);
        let est = established(COOKIE, 0);
        k.track(COOKIE, est);
        t.on_event(&k, est);
        let early = t.take_starts();
        k.hold_in_map(COOKIE, PID);
        sweep(&mut t, &mut k);
        if key_before_owner {
            assert_eq!(early.len(), 1);
            assert_eq!(
                t.take_owner_updates(),
                [OwnerUpdate {
                    job: early[0].job,
                    owner: Some((PID, -1))
                }]
            );
        } else {
            assert!(early.is_empty());
            assert_eq!(one_start(&mut t).owner, Some((PID, -1)));
        }
        assert_eq!(t.stats().owner_from_hold, 1);
        assert!(k.continued.is_empty(), "still gated: stays held");
    }
}

#[test]
fn a_hold_names_the_owner_when_connect_and_accept_reported_none() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    t.on_event(&k, est);
    no_start(&mut t);
    t.on_event(&k, held(COOKIE, PID, 0));
    let s = one_start(&mut t);
    assert_eq!(s.owner, Some((PID, -1)));
}

#[test]
fn an_eagain_answer_names_the_owner_and_stops_nobody() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    t.on_event(&k, est);
    no_start(&mut t);
    t.on_event(&k, waiting(COOKIE, PID));
    let s = one_start(&mut t);
    assert_eq!(s.owner, Some((PID, -1)));
    assert_eq!(t.held_count(), 0, "nobody to continue");
    assert_eq!((t.stats().gate_waits, t.stats().gate_stops), (1, 0));
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty(), "{:?}", k.continued);
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
}

#[test]
fn a_socket_gone_from_its_owner_is_looked_for_in_the_processes_held_on_it() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_event(&k, held(COOKIE, PID + 1, 0));
    no_start(&mut t);
    t.on_outcome(&mut k, socket_gone(&s, PID));
    let again = one_start(&mut t);
    assert_eq!(again.owner, Some((PID + 1, -1)));
    assert_ne!(again.job, s.job);
    // Gone from there too, and nobody else holds it: failed closed.
    t.on_outcome(&mut k, socket_gone(&again, PID + 1));
    no_start(&mut t);
    assert_eq!(k.gate(COOKIE), Some(gate::RESET));
    assert_eq!(t.stats().gate_terminal, 1);
    // With no handle, the kernel aborts it by its tuple, looked for where
    // the gate held a process on it; after the terminal state is set.
    assert_eq!(
        k.destroyed,
        vec![(COOKIE, vec![PID + 1], Some(gate::RESET))]
    );
    assert_eq!(t.stats().unreachable_aborted, 1);
}

#[test]
fn a_process_whose_fds_cannot_be_listed_is_passed_over_for_another_held_on_it() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_event(&k, held(COOKIE, PID + 1, 0));
    let unlisted = KeyingError::FdsUnlisted {
        cookie: COOKIE,
        pid: PID,
        fd: -1,
        source: std::io::Error::from_raw_os_error(libc::EACCES),
    };
    assert_eq!(unlisted.reason(), "fds_unlisted");
    t.on_outcome(
        &mut k,
        Outcome {
            socket: None,
            ..outcome(&s, Err(unlisted))
        },
    );
    let again = one_start(&mut t);
    assert_eq!(again.owner, Some((PID + 1, -1)));
    t.on_outcome(&mut k, outcome(&again, installed()));
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
}

#[test]
fn a_socket_gone_with_nobody_held_waits_for_the_next_hold() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, socket_gone(&s, PID));
    no_start(&mut t);
    assert_eq!(k.gate(COOKIE), Some(gate::CLOSED));
    t.on_event(&k, held(COOKIE, PID + 2, 0));
    assert_eq!(one_start(&mut t).owner, Some((PID + 2, -1)));
}

#[test]
fn a_process_over_its_bound_has_its_next_connections_refused_and_no_other() {
    let (mut t, mut k) = (table(FailurePolicy::FailOpen), FakeKernel::default());
    t.set_bounds(2, u32::MAX);
    let first = keying_for(&mut t, &mut k, 1, PID);
    let second = keying_for(&mut t, &mut k, 2, PID);
    assert_eq!((first.over_bound, second.over_bound), (None, None));
    // The third of one process is refused; another process's first is not.
    let third = keying_for(&mut t, &mut k, 3, PID);
    let want = OverBound::Process { pid: PID, max: 2 };
    assert_eq!(third.over_bound, Some(want));
    assert_eq!(keying_for(&mut t, &mut k, 4, PID + 1).over_bound, None);
    // The refusal's job resets its connection, fail-open or not, and is not
    // counted: a fourth one is refused as well.
    t.on_outcome(&mut k, outcome(&third, Err(want.into())));
    assert_eq!(k.resets, [3]);
    assert_eq!(t.stats().failures("process_bound"), 1);
    assert_eq!(keying_for(&mut t, &mut k, 5, PID).over_bound, Some(want));
    // A job that ends makes room, whether it keyed its connection or the
    // connection closed meanwhile (a stale outcome).
    t.on_outcome(&mut k, outcome(&first, installed()));
    assert_eq!(keying_for(&mut t, &mut k, 6, PID).over_bound, None);
    t.on_event(&k, closed(2));
    t.on_outcome(&mut k, outcome(&second, installed()));
    let seventh = keying_for(&mut t, &mut k, 7, PID);
    assert_eq!(seventh.over_bound, None);
    assert_eq!(keying_for(&mut t, &mut k, 8, PID).over_bound, Some(want));
}

#[test]
fn a_cgroup_over_its_bound_has_its_processes_next_connections_refused_and_no_other() {
    const CGROUP: u64 = 4242;
    let (mut t, mut k) = (table(FailurePolicy::FailOpen), FakeKernel::default());
    t.set_bounds(2, 3);
    // Two processes of one cgroup share its 3; each is within its own 2.
    let first = keying_in(&mut t, &mut k, 1, PID, CGROUP);
    assert_eq!(keying_in(&mut t, &mut k, 2, PID, CGROUP).over_bound, None);
    assert_eq!(
        keying_in(&mut t, &mut k, 3, PID + 1, CGROUP).over_bound,
        None
    );
    let fourth = keying_in(&mut t, &mut k, 4, PID + 1, CGROUP);
    let want = OverBound::Cgroup {
        cgroup: CGROUP,
        pid: PID + 1,
        max: 3,
    };
    assert_eq!(fourth.over_bound, Some(want));
    // Reset whatever the policy, under its own reason.
    t.on_outcome(&mut k, outcome(&fourth, Err(want.into())));
    assert_eq!(k.resets, [4]);
    assert_eq!(
        (
            t.stats().failures("cgroup_bound"),
            t.stats().failures("process_bound")
        ),
        (1, 0)
    );
    // The process bound still comes first.
    assert_eq!(
        keying_in(&mut t, &mut k, 5, PID, CGROUP).over_bound,
        Some(OverBound::Process { pid: PID, max: 2 })
    );
    // Another cgroup, and an owner whose cgroup is not known, are not
    // counted against it.
    assert_eq!(
        keying_in(&mut t, &mut k, 6, PID + 2, CGROUP + 1).over_bound,
        None
    );
    assert_eq!(keying_in(&mut t, &mut k, 7, PID + 3, 0).over_bound, None);
    // The root cgroup is not bounded as a group (where processes are not
    // in cgroups of their own, every one is there): per process only.
    for (cookie, pid) in (20..24).zip(PID + 10..) {
        assert_eq!(keying_in(&mut t, &mut k, cookie, pid, 1).over_bound, None);
    }
    // An owner known from a hold counts against the hold's cgroup.
    let est = established(8, 0);
    k.track(8, est);
    t.on_event(&k, est);
    t.on_event(
        &k,
        Event {
            cgroup: CGROUP,
            ..held(8, PID + 4, 0)
        },
    );
    let from_hold = one_start(&mut t);
    assert_eq!(from_hold.owner, Some((PID + 4, -1)));
    assert!(
        matches!(
            from_hold.over_bound,
            Some(OverBound::Cgroup { cgroup: CGROUP, .. })
        ),
        "{from_hold:?}"
    );
    // A job that ends makes room in the cgroup.
    t.on_outcome(&mut k, outcome(&first, installed()));
    assert_eq!(
        keying_in(&mut t, &mut k, 9, PID + 4, CGROUP).over_bound,
        None
    );
    assert!(
        keying_in(&mut t, &mut k, 10, PID + 5, CGROUP)
            .over_bound
            .is_some()
    );
    // A connection found in the map (its events lost) counts against the
    // cgroup the map recorded with its owner.
    let lost = Conn {
        gate: gate::CLOSED,
        est: established(11, 0),
        owner_pid: PID + 6,
        owner_fd: 3,
        owner_cgroup: CGROUP,
        ..Conn::default()
    };
    t.reconcile(vec![(11, lost)]);
    let found = one_start(&mut t);
    assert!(
        matches!(
            found.over_bound,
            Some(OverBound::Cgroup { cgroup: CGROUP, .. })
        ),
        "{found:?}"
    );
}

#[test]
fn a_job_started_before_its_owner_is_not_counted_against_the_bound() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    t.set_bounds(1, 1);
    t.set_key_before_owner(true);
    let est = established(1, 0);
    k.track(1, est);
    t.on_event(&k, est);
    let early = one_start(&mut t);
    assert_eq!((early.owner, early.over_bound), (None, None));
    t.on_event(&k, owner(1, PID, 3));
    assert_eq!(keying_for(&mut t, &mut k, 2, PID).over_bound, None);
}

#[test]
fn the_failure_policy_decides_what_a_failed_connection_becomes() {
    struct Case {
        policy: FailurePolicy,
        result: fn() -> Result<Done, KeyingError>,
        reachable: bool,
        refuse_reset: bool,
        gate_after: u32,
        reset: bool,
    }
    let half_installed = || {
        Err(KeyingError::Install {
            step: KtlsStep::Transmit,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })
    };
    let over_bound = || Err(KeyingError::from(OverBound::Process { pid: PID, max: 1 }));
    let cases = [
        // Fail-closed: reset, and the app sees ECONNRESET through an open gate.
        (
            FailurePolicy::FailClosed,
            provider_refused as fn() -> _,
            true,
            false,
            gate::OPEN,
            true,
        ),
        // The reset is refused (tls ULP): terminal gate, FIN to the peer.
        (
            FailurePolicy::FailClosed,
            provider_refused,
            true,
            true,
            gate::RESET,
            false,
        ),
        // No socket to reset: terminal gate, nobody held again.
        (
            FailurePolicy::FailClosed,
            provider_refused,
            false,
            false,
            gate::RESET,
            false,
        ),
        // Fail-open lets a clean socket through in plaintext.
        (
            FailurePolicy::FailOpen,
            provider_refused,
            true,
            false,
            gate::OPEN,
            false,
        ),
        (
            FailurePolicy::FailOpen,
            provider_refused,
            false,
            false,
            gate::OPEN,
            false,
        ),
        // Half-installed kTLS is reset whatever the policy.
        (
            FailurePolicy::FailOpen,
            half_installed,
            true,
            false,
            gate::OPEN,
            true,
        ),
        (
            FailurePolicy::FailOpen,
            half_installed,
            true,
            true,
            gate::RESET,
            false,
        ),
        // So is a connection over its process's bound: capacity never
        // means plaintext.
        (
            FailurePolicy::FailOpen,
            over_bound,
            true,
            false,
            gate::OPEN,
            true,
        ),
        (
            FailurePolicy::FailOpen,
            over_bound,
            false,
            false,
            gate::RESET,
            false,
        ),
    ]
    .map(
        |(policy, result, reachable, refuse_reset, gate_after, reset)| Case {
            policy,
            result,
            reachable,
            refuse_reset,
            gate_after,
            reset,
        },
    );
    for (i, c) in cases.iter().enumerate() {
        let (mut t, mut k) = (table(c.policy), FakeKernel::default());
        k.refuse_reset = c.refuse_reset;
        let s = keying(&mut t, &mut k, COOKIE);
        let mut o = outcome(&s, (c.result)());
        if !c.reachable {
            o.socket = None;
        }
        t.on_outcome(&mut k, o);
        assert_eq!(k.gate(COOKIE), Some(c.gate_after), "case {i}");
        assert_eq!(
            k.resets == [COOKIE],
            c.reset,
            "case {i}: resets {:?}",
            k.resets
        );
        assert_eq!(
            k.shutdowns == [COOKIE],
            c.refuse_reset,
            "case {i}: a refused reset sends a FIN"
        );
        if c.refuse_reset {
            assert_eq!(
                k.gate_at_shutdown,
                [Some(gate::RESET)],
                "case {i}: the FIN (and the wakeup) after the terminal state"
            );
        }
        assert_eq!(t.stats().failed.values().sum::<u64>(), 1, "case {i}");
        assert!(t.pending().is_empty(), "case {i}");
    }
}

#[test]
fn a_result_for_a_previous_connection_of_the_socket_is_never_applied_to_the_next() {
    // connect(), disconnect (connect(AF_UNSPEC)), connect() again: one
    // cookie, two connections, while the first one's job still runs.
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let first = keying(&mut t, &mut k, COOKIE);
    k.conns.remove(&COOKIE);
    t.on_event(&k, closed(COOKIE));
    let second = established(COOKIE, 1);
    k.track(COOKIE, second);
    t.on_event(&k, second);
    t.on_event(&k, owner(COOKIE, PID, 3));
    // One job per socket at a time: the new one waits for the old one.
    no_start(&mut t);
    // The old job installed its keys: they are on whatever the socket
    // carries now, which is the second connection. It must not be opened.
    t.on_outcome(&mut k, outcome(&first, installed()));
    assert_eq!(k.resets, [COOKIE]);
    assert_eq!(t.stats().stale_outcomes, 1);
    assert_eq!(*t.stats().failed.get("stale_keys").unwrap_or(&0), 1);
    assert!(t.protected().is_empty());
    no_start(&mut t);
}

#[test]
fn a_failed_job_of_a_previous_connection_lets_the_next_one_be_keyed() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let first = keying(&mut t, &mut k, COOKIE);
    // The CLOSED event was lost: only a new ESTABLISHED tells.
    let second = established(COOKIE, 1);
    k.track(COOKIE, second);
    t.on_event(&k, second);
    t.on_event(&k, owner(COOKIE, PID, 3));
    no_start(&mut t);
    t.on_outcome(&mut k, outcome(&first, provider_refused()));
    assert!(k.resets.is_empty(), "the new connection is not failed");
    let next = one_start(&mut t);
    assert_eq!(next.established, second);
    t.on_outcome(&mut k, outcome(&next, installed()));
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
    assert_eq!(t.stats().protected, 1);
}

/// The job saw the socket's connection replaced (no install) before the
/// table read the events that say so.
fn reconnected(start: &Start) -> Outcome<FakeSocket> {
    outcome(
        start,
        Err(KeyingError::Reconnected {
            cookie: start.cookie,
        }),
    )
}

#[test]
fn keys_found_to_be_for_a_replaced_connection_wait_for_its_events_and_fail_nothing() {
    for closed_event_lost in [false, true] {
        let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
        let first = keying(&mut t, &mut k, COOKIE);
        // The job's check ran after the app reconnected; the table has not
        // read the CLOSED and ESTABLISHED events yet.
        let second = established(COOKIE, 1);
        k.track(COOKIE, second);
        t.on_outcome(&mut k, reconnected(&first));
        assert!(k.resets.is_empty(), "nothing fails: {:?}", k.resets);
        assert!(t.stats().failed.is_empty());
        no_start(&mut t);
        if !closed_event_lost {
            t.on_event(&k, closed(COOKIE));
        }
        t.on_event(&k, second);
        t.on_event(&k, owner(COOKIE, PID, 3));
        let next = one_start(&mut t);
        assert_eq!(
            next.established, second,
            "closed event lost: {closed_event_lost}"
        );
        t.on_outcome(&mut k, outcome(&next, installed()));
        assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
        assert_eq!(t.stats().protected, 1);
    }
}

#[test]
fn keys_found_to_be_for_a_closed_connection_leave_it_to_its_closed_event() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let first = keying(&mut t, &mut k, COOKIE);
    k.conns.remove(&COOKIE);
    t.on_outcome(&mut k, reconnected(&first));
    assert!(k.resets.is_empty());
    t.on_event(&k, closed(COOKIE));
    assert!(t.pending().is_empty());
    assert_eq!(t.stats().closed_before_keys, 1);
    no_start(&mut t);
}

#[test]
fn an_established_event_seen_twice_for_one_connection_changes_nothing() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    // The ring buffer's copy is stamped later than the one in conns.
    let again = Event {
        ts_ns: s.established.ts_ns + 5,
        ..s.established
    };
    t.on_event(&k, again);
    no_start(&mut t);
    t.on_outcome(&mut k, outcome(&s, installed()));
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
}

#[test]
fn a_restarted_core_adopts_waiting_connections_and_their_stopped_owners_and_leaves_open_ones() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let est = established(COOKIE, 0);
    let waiting = Conn {
        gate: gate::CLOSED,
        role: role::CLIENT,
        est,
        owner_pid: PID,
        owner_fd: 3,
        ..Default::default()
    };
    // Let through by fail-open without its socket (a keyed one has no
    // entry): not protected, and nothing to do.
    let open = Conn {
        gate: gate::OPEN,
        est: established(COOKIE + 1, 0),
        owner_pid: PID + 1,
        ..waiting
    };
    let failed = Conn {
        gate: gate::RESET,
        ..waiting
    };
    k.conns.insert(COOKIE, waiting);
    k.conns.insert(COOKIE + 1, open);
    k.conns.insert(COOKIE + 2, failed);
    k.states.insert(PID, 'T');
    let conns = k.conns.iter().map(|(c, v)| (*c, *v)).collect();
    t.adopt(&k, conns, Vec::new());
    let s = one_start(&mut t);
    assert_eq!((s.cookie, s.owner), (COOKIE, Some((PID, 3))));
    assert!(t.protected().is_empty());
    assert_eq!(t.pending().len(), 1);
    sweep(&mut t, &mut k);
    assert!(k.continued.is_empty(), "its connection still waits");
    t.on_outcome(&mut k, outcome(&s, installed()));
    sweep(&mut t, &mut k);
    assert_eq!(k.continued, [PID]);
}

#[test]
fn an_adopting_core_continues_a_process_stopped_on_a_socket_still_connecting() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // The old core held PID (HELD_CONNECTING) and stopped: no conns entry
    // names the process, only the owner connect() recorded.
    k.states.insert(PID, 'T');
    k.states.insert(PID + 1, 'R');
    let connecting = vec![
        (
            COOKIE,
            tlshub_ebpf::Owner {
                pid: PID,
                fd: 3,
                cgroup: 0,
            },
        ),
        // Running: nothing to do. Unknown owner: nobody to look at.
        (
            COOKIE + 1,
            tlshub_ebpf::Owner {
                pid: PID + 1,
                fd: 4,
                cgroup: 0,
            },
        ),
        (COOKIE + 2, tlshub_ebpf::Owner::default()),
    ];
    t.adopt(&k, Vec::new(), connecting);
    no_start(&mut t);
    sweep(&mut t, &mut k);
    // Continued at once: its call runs again and, still connecting, is
    // held again and reported to this core.
    assert_eq!(k.continued, [PID]);
    assert!(t.pending().is_empty());
}

#[test]
fn a_draining_core_starts_nothing_new_but_finishes_what_runs() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.drain();
    assert_eq!(t.keying(), 1);
    let est = established(COOKIE + 1, 0);
    k.track(COOKIE + 1, est);
    t.on_event(&k, est);
    t.on_event(&k, owner(COOKIE + 1, PID, 4));
    t.on_event(&k, held(COOKIE + 5, PID, 0));
    no_start(&mut t);
    t.on_outcome(&mut k, outcome(&s, installed()));
    assert_eq!(t.keying(), 0);
    assert_eq!(
        k.gate(COOKIE + 1),
        Some(gate::CLOSED),
        "left for the next core"
    );
}

#[test]
fn after_lost_events_the_conns_map_brings_waiting_connections_in_and_closed_ones_out() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    // Keyed: no entry in the map, and still protected (only its CLOSED
    // event can say otherwise).
    let keyed = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(&mut k, outcome(&keyed, installed()));
    assert!(k.conns.is_empty(), "a keyed connection keeps no entry");
    // Known and waiting for its owner, but its CLOSED event was lost.
    let est = established(COOKIE + 1, 0);
    t.on_event(&k, est);
    // Waiting in the map; both its ESTABLISHED and OWNER events were lost.
    let lost = established(COOKIE + 2, 0);
    k.track(COOKIE + 2, lost);
    let c = k.conns.get_mut(&(COOKIE + 2)).expect("tracked");
    (c.owner_pid, c.owner_fd) = (PID, 7);
    // Let through by fail-open, in the map: nothing to do.
    let open = established(COOKIE + 3, 0);
    k.track(COOKIE + 3, open);
    k.conns.get_mut(&(COOKIE + 3)).expect("tracked").gate = gate::OPEN;
    no_start(&mut t);
    let conns = k.conns.iter().map(|(c, v)| (*c, *v)).collect();
    t.reconcile(conns);
    let s = one_start(&mut t);
    assert_eq!(
        (s.cookie, s.owner, s.established),
        (COOKIE + 2, Some((PID, 7)), lost)
    );
    assert!(
        t.protected().contains_key(&COOKIE),
        "the keyed one is not taken for closed"
    );
    assert_eq!(t.pending().len(), 1);
    assert_eq!(t.stats().reconciled, 2);
    assert_eq!(t.stats().closed_before_keys, 1);
    // A second look changes nothing.
    let conns = k.conns.iter().map(|(c, v)| (*c, *v)).collect();
    t.reconcile(conns);
    no_start(&mut t);
    assert_eq!(t.stats().reconciled, 2);
    // Its close is still reported, from its mark.
    t.on_event(&k, closed(COOKIE));
    assert!(t.protected().is_empty());
}

#[test]
fn every_count_in_the_stats_file_equals_its_metric() {
    let metrics = Arc::new(Metrics::new());
    let mut k = FakeKernel::default();
    let mut closed_t = ConnTable::new(FailurePolicy::FailClosed, metrics.clone());
    // Held, waited on, then keyed; closed before keys; failed and reset.
    let s = keying(&mut closed_t, &mut k, 1);
    closed_t.on_event(&k, held(1, PID, 5));
    closed_t.on_event(&k, waiting(1, PID + 1));
    closed_t.on_outcome(&mut k, outcome(&s, installed()));
    let est = established(2, 0);
    k.track(2, est);
    closed_t.on_event(&k, est);
    k.conns.remove(&2);
    closed_t.on_event(&k, closed(2));
    let s = keying(&mut closed_t, &mut k, 3);
    closed_t.on_outcome(&mut k, outcome(&s, provider_refused()));
    // One let through in plaintext by a fail-open table on the same metrics.
    let mut open_t = ConnTable::new(FailurePolicy::FailOpen, metrics.clone());
    let s = keying(&mut open_t, &mut k, 4);
    open_t.on_outcome(&mut k, outcome(&s, provider_refused()));

    let text = metrics.encode();
    let (c, o) = (closed_t.stats(), open_t.stats());
    for (metric, stat) in [
        ("connections_selected", c.selected + o.selected),
        (
            "connections_closed_before_keys",
            c.closed_before_keys + o.closed_before_keys,
        ),
        ("gate_waits", c.gate_waits + o.gate_waits),
        ("connections_reset", c.reset + o.reset),
        (
            "connections_plaintext",
            c.passed_plaintext + o.passed_plaintext,
        ),
    ] {
        assert!(stat > 0, "{metric}: the sequence above counts it");
        let line = format!("tlshub_{metric}_total {stat}\n");
        assert!(text.contains(&line), "{line:?} not in\n{text}");
    }
    // Holds and failures are labelled by provider: their sums match too.
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let holds = c.gate_stops + o.gate_stops;
    assert!(holds > 0, "the sequence above holds");
    assert_eq!(sum("tlshub_gate_holds_total{provider="), holds, "{text}");
    let failed: u64 = c.failed.values().chain(o.failed.values()).sum();
    assert!(failed > 0);
    assert_eq!(
        sum("tlshub_connections_failed_total{provider="),
        failed,
        "{text}"
    );
}

/// A table whose active provider keys without the socket, and the job it
/// started for a connection established with no owner known yet.
fn keying_before_owner() -> (ConnTable, FakeKernel, Start) {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    t.set_key_before_owner(true);
    let est = established(COOKIE, 0);
    k.track(COOKIE, est);
    t.on_event(&k, est);
    let s = one_start(&mut t);
    (t, k, s)
}

#[test]
fn a_provider_needing_no_socket_starts_at_establishment_and_the_owner_follows() {
    let (mut t, k, s) = keying_before_owner();
    assert_eq!((s.cookie, s.owner), (COOKIE, None));
    assert!(t.take_owner_updates().is_empty());
    // accept() returns: the job gets its owner; nothing new starts.
    t.on_event(&k, owner(COOKIE, PID, 5));
    no_start(&mut t);
    assert_eq!(
        t.take_owner_updates(),
        [OwnerUpdate {
            job: s.job,
            owner: Some((PID, 5))
        }]
    );
    // A second OWNER, or a hold, changes nothing for that job.
    t.on_event(&k, owner(COOKIE, PID + 1, 6));
    t.on_event(&k, held(COOKIE, PID, 9));
    assert!(t.take_owner_updates().is_empty());
    no_start(&mut t);
}

#[test]
fn without_an_owner_event_the_first_hold_names_the_owner_of_a_job_keying_from_establishment() {
    let (mut t, k, s) = keying_before_owner();
    t.on_event(&k, waiting(COOKIE, PID));
    assert_eq!(
        t.take_owner_updates(),
        [OwnerUpdate {
            job: s.job,
            owner: Some((PID, -1))
        }]
    );
    assert_eq!(t.stats().owner_from_hold, 1);
}

#[test]
fn a_connection_that_closes_before_its_owner_is_known_stops_its_job_waiting() {
    let (mut t, mut k, s) = keying_before_owner();
    k.conns.remove(&COOKIE);
    t.on_event(&k, closed(COOKIE));
    assert_eq!(
        t.take_owner_updates(),
        [OwnerUpdate {
            job: s.job,
            owner: None
        }]
    );
    // Its answer is stale: nothing is reset, nothing counted as failed.
    let no_owner = Err(KeyingError::NoOwner { cookie: COOKIE });
    t.on_outcome(&mut k, outcome(&s, no_owner));
    assert!(k.resets.is_empty() && t.pending().is_empty());
    assert_eq!(t.stats().failed.values().sum::<u64>(), 0);
    assert_eq!(t.stats().closed_before_keys, 1);
}

#[test]
fn a_job_told_to_stop_waiting_at_shutdown_leaves_its_connection_gated_for_the_next_core() {
    let (mut t, mut k, s) = keying_before_owner();
    t.drain();
    let no_owner = Err(KeyingError::NoOwner { cookie: COOKIE });
    t.on_outcome(&mut k, outcome(&s, no_owner));
    assert_eq!(t.keying(), 0, "nothing left to wait for");
    assert!(t.pending().contains_key(&COOKIE), "still pending");
    assert_eq!(k.gate(COOKIE), Some(gate::CLOSED));
    assert!(k.resets.is_empty());
    assert_eq!(t.stats().failed.values().sum::<u64>(), 0);
    no_start(&mut t);
}

#[test]
fn keys_ready_before_the_owner_are_counted_when_installed() {
    let (mut t, mut k, s) = keying_before_owner();
    t.on_event(&k, owner(COOKIE, PID, 5));
    let early = Ok(Done::Installed(Installed {
        keyed_before_owner: true,
        ..installed_keys()
    }));
    t.on_outcome(&mut k, outcome(&s, early));
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
    assert_eq!((t.stats().protected, t.stats().keyed_before_owner), (1, 1));
}

#[test]
fn a_service_connection_to_an_unselected_backend_opens_plain_under_either_policy() {
    for policy in [FailurePolicy::FailClosed, FailurePolicy::FailOpen] {
        let (mut t, mut k) = (table(policy), FakeKernel::default());
        let s = keying(&mut t, &mut k, COOKIE);
        t.on_outcome(
            &mut k,
            outcome(&s, plain("10.0.9.9:80", PlainWhy::ServiceBackendUnselected)),
        );
        assert_eq!(k.gate(COOKIE), Some(gate::OPEN), "{policy:?}");
        assert!(k.resets.is_empty());
        let st = t.stats();
        // Policy, not failure: neither failed, nor plaintext by fail-open,
        // nor protected.
        assert_eq!(
            (
                st.service_plain,
                st.protected,
                st.passed_plaintext,
                st.failed.len()
            ),
            (1, 0, 0, 0),
            "{policy:?}"
        );
        assert!(t.pending().is_empty() && t.protected().is_empty());
    }
}

#[test]
fn a_service_connection_that_cannot_be_routed_fails_by_the_policy() {
    use crate::service::ServiceError;
    for (policy, reset) in [
        (FailurePolicy::FailClosed, true),
        (FailurePolicy::FailOpen, false),
    ] {
        let (mut t, mut k) = (table(policy), FakeKernel::default());
        let s = keying(&mut t, &mut k, COOKIE);
        let untranslated = ServiceError::Untranslated {
            local: "10.0.1.2:4000".parse().unwrap(),
            service: "10.96.0.10:80".parse().unwrap(),
        };
        t.on_outcome(&mut k, outcome(&s, Err(untranslated.into())));
        assert_eq!(k.resets == [COOKIE], reset, "{policy:?}");
        assert_eq!(t.stats().failed.get("service_untranslated"), Some(&1));
        assert_eq!(t.stats().service_plain, 0);
    }
}

#[test]
fn a_service_connection_keyed_with_its_backend_is_listed_with_the_backend() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    let backend = "10.0.2.2:8443".parse().unwrap();
    let keyed = Done::Installed(Installed {
        backend: Some(backend),
        ..installed_keys()
    });
    t.on_outcome(&mut k, outcome(&s, Ok(keyed)));
    assert_eq!(t.protected()[&COOKIE].remote, backend);
    assert_eq!(t.stats().protected, 1);
}

#[test]
fn a_silent_peer_of_an_opportunistic_rule_opens_plain_and_is_counted_by_peer() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    t.on_outcome(
        &mut k,
        outcome(&s, plain("[::ffff:10.0.2.2]:8443", PlainWhy::PeerSilent)),
    );
    assert_eq!(k.gate(COOKIE), Some(gate::OPEN));
    assert!(k.resets.is_empty());
    let st = t.stats();
    assert_eq!(
        (
            st.peer_silent_plain,
            st.service_plain,
            st.protected,
            st.failed.len()
        ),
        (1, 0, 0, 0)
    );
    let text = t.metrics.encode();
    assert!(
        text.contains(r#"tlshub_connections_plain_peer_silent_total{peer="10.0.2.2"} 1"#),
        "{text}"
    );
}

#[test]
fn a_plain_decision_is_not_applied_to_the_next_connection_of_a_reconnected_socket() {
    let (mut t, mut k) = (table(FailurePolicy::FailClosed), FakeKernel::default());
    let s = keying(&mut t, &mut k, COOKIE);
    // Disconnected and connected again: the entry has the new connection
    // (new ISNs), whose ESTABLISHED the table has not read yet.
    let next = established(COOKIE, 1);
    k.track(COOKIE, next);
    t.on_outcome(
        &mut k,
        outcome(&s, plain("10.0.2.2:8443", PlainWhy::PeerSilent)),
    );
    assert_eq!(
        k.gate(COOKIE),
        Some(gate::CLOSED),
        "the new connection's gate opened"
    );
    assert_eq!(t.stats().peer_silent_plain, 0);
    // Its own ESTABLISHED starts its own job.
    t.on_event(&k, next);
    let again = one_start(&mut t);
    assert_eq!(again.established, next);
}
