//! Attaching and detaching the programs while their hooks fire all the
//! time: a short run is a test scenario, a long one is `cargo xtask vm
//! --mode stress`, which hunts rare kernel or emulator problems.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::node::{Node, NodeSpec};
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// Rounds in the test scenario.
const TEST_ROUNDS: usize = 3;
/// Rounds in `--mode stress`.
const STRESS_ROUNDS: usize = 40;

/// The test scenario: a few rounds of [`attach_detach_under_hook_traffic`].
pub fn attach_detach_under_hook_traffic_short() -> Outcome {
    attach_detach_under_hook_traffic(TEST_ROUNDS)
}

/// `--mode stress`: many rounds of [`attach_detach_under_hook_traffic`].
pub fn attach_detach_under_hook_traffic_long() -> Outcome {
    attach_detach_under_hook_traffic(STRESS_ROUNDS)
}

/// Starts and drops both nodes `rounds` times (each start attaches the
/// core's programs, each drop detaches them) while threads on every CPU
/// write to files and sockets and open TCP connections, i.e. while the
/// hooks whose call sites are being rewritten fire all the time.
///
/// Why: every BPF trampoline attach or detach rewrites the first
/// instruction of `bpf_lsm_file_permission`, `bpf_lsm_socket_sendmsg`, the
/// fexit targets, ... with `text_poke_bp`, while other CPUs may be running
/// them. A core that starts or restarts on a busy node does exactly this.
/// Under qemu's multi-threaded TCG this left a vCPU stuck on that
/// instruction (a soft lockup, seen twice in CI); the xtask therefore runs
/// qemu with `thread=single`, and this scenario fails if that regresses.
fn attach_detach_under_hook_traffic(rounds: usize) -> Result<String, Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    {
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = listener.accept() {
                    drop(s);
                }
            }
        }));
    }
    for i in 0..3 {
        let (stop, ops) = (stop.clone(), ops.clone());
        workers.push(std::thread::spawn(move || {
            let mut null = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .expect("/dev/null");
            let (mut s1, _s2) = UnixStream::pair().expect("socketpair");
            s1.set_nonblocking(true).expect("nonblocking");
            let buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let _ = null.write(&buf);
                let _ = s1.write(&buf);
                if i == 0 {
                    let _ = TcpStream::connect(addr);
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    let mut result = Ok(());
    for round in 0..rounds {
        let ops_before = ops.load(Ordering::Relaxed);
        let a = Node::start(NodeSpec::new("a"));
        let b = Node::start(NodeSpec::new("b"));
        if let Err(e) = a.as_ref().and(b.as_ref()) {
            result = Err(e.clone().context(format!("round {round}")));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        drop((a, b));
        // The point is hook traffic during attach and detach: a round
        // without any proves nothing.
        if ops.load(Ordering::Relaxed) == ops_before {
            result = Err(failed!(
                "round {round}: the writer threads made no call while the programs were attached and detached"
            ));
            break;
        }
        println!(
            "attach/detach: round {} of {rounds} done at {:.0} s",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }
    stop.store(true, Ordering::Relaxed);
    // Wake the accepting thread.
    let _ = TcpStream::connect(addr);
    for (i, w) in workers.into_iter().enumerate() {
        if w.join().is_err() && result.is_ok() {
            result = Err(failed!("worker thread {i} panicked"));
        }
    }
    result?;
    Ok(format!(
        "{rounds} rounds of attach and detach on both nodes in {:.0} s, {} write rounds meanwhile",
        started.elapsed().as_secs_f64(),
        ops.load(Ordering::Relaxed)
    ))
}
