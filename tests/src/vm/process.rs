//! Child processes with RAII cleanup and timeouts.

use crate::failed;
use crate::vm::outcome::Failure;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running child, killed (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    /// Its stderr (and stdout unless captured) goes here.
    pub log: PathBuf,
}

/// Runs `argv` inside network namespace `netns` (or the root one).
pub fn command(netns: Option<&str>, argv: &[&str]) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    }
}

/// Runs a command to completion; Err carries its output.
pub fn run(netns: Option<&str>, argv: &[&str]) -> Result<String, Failure> {
    let out = command(netns, argv)
        .output()
        .map_err(|e| format!("cannot run {argv:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(failed!("{argv:?} failed ({}): {text}", out.status))
    }
}

impl Proc {
    /// Starts `argv` with stdout and stderr written to `log` (truncated first,
    /// so log waits never match an earlier run's lines).
    pub fn spawn(
        name: &str,
        netns: Option<&str>,
        argv: &[&str],
        log: &Path,
    ) -> Result<Self, Failure> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = command(netns, argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name} {argv:?}: {e}"))?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits until the log contains `needle`, the child exits, or `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<(), Failure> {
        let until = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(failed!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    tail(&self.log)
                ));
            }
            if Instant::now() > until {
                return Err(failed!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    tail(&self.log)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit up to `timeout`; kills on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, Failure> {
        let until = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Err("already reaped".into());
        };
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return Err(failed!(
                    "{} did not finish within {timeout:?} (killed):\n{}",
                    self.name,
                    tail(&self.log)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // A plain kill(2) through the shell-free path.
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(15);
        if self.wait(Duration::from_secs(5)).is_err() {
            // wait() killed it.
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The state letter of `/proc/PID/stat` (`T` = stopped), `None` if gone.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The warnings and errors of a log (the first 40), for failure reports:
/// the tail alone often misses the line that explains a failure.
pub fn warnings(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .take(40)
        .collect();
    lines.join("\n")
}

/// An application process of a scenario: killed and reaped when dropped, so
/// a scenario that fails half-way leaves no server holding its port for the
/// next one.
#[derive(Debug)]
pub struct AppChild(Option<Child>);

impl std::ops::Deref for AppChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only by finish"))
    }
}

impl std::ops::DerefMut for AppChild {
    fn deref_mut(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only by finish"))
    }
}

impl Drop for AppChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts an app in `netns` with its stdout piped (read by [`finish`]) and
/// stderr discarded.
pub fn spawn_app(netns: &str, argv: &[&str]) -> Result<AppChild, Failure> {
    command(Some(netns), argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(|c| AppChild(Some(c)))
        .map_err(|e| failed!("cannot start {argv:?}: {e}"))
}

/// A child whose first stderr line is awaited (servers print "listening").
pub fn spawn_ready(
    netns: &str,
    argv: &[&str],
    ready: &str,
    timeout: Duration,
) -> Result<AppChild, Failure> {
    let mut child = command(Some(netns), argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {argv:?}: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            let _ = tx.send(line.clone());
            line.clear();
        }
    });
    let until = Instant::now() + timeout;
    let mut said = String::new();
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(ready) => return Ok(AppChild(Some(child))),
            Ok(l) => said.push_str(&l),
            Err(_) => {
                let _ = child.kill();
                return Err(failed!(
                    "{argv:?} did not print {ready:?}; its stderr: {:?}",
                    said.trim()
                ));
            }
        }
    }
}

/// Each thread's state letter, kernel wait channel and innermost kernel
/// stack frames, e.g. `pid 812: 812 T do_signal_stop [do_signal_stop <
/// get_signal < ...]` (for reports of hung apps; a thread that spins shows
/// `R` and where in the kernel it was), sampled three times 100 ms apart
/// (a spinning thread shows different frames), then its sockets: queues,
/// kTLS counters and `ss -tmieo` (TCP windows, memory, timers, the TLS
/// ULP state).
pub fn where_stuck(pid: u32) -> String {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return format!("pid {pid}: gone");
    }
    let mut samples = Vec::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        samples.push(thread_states(pid));
    }
    let mut out = format!("pid {pid}: {}", samples.join(" | then "));
    out.push_str(&socket_queues(pid));
    out.push_str(&ss_of(pid));
    // A thread still running after the samples may spin in the kernel, where
    // its stack cannot be read: the function tracer shows what it calls.
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            if state(tid) == Some('R') {
                out.push_str(&format!(
                    "; kernel functions of {tid}: {}",
                    traced_calls(tid)
                ));
            }
        }
    }
    out
}

/// The kernel functions thread `tid` called in 50 ms (ftrace's function
/// tracer), most frequent first: for telling where a spinning thread loops.
fn traced_calls(tid: u32) -> String {
    // Mounted by the VM's /init.
    const T: &str = "/sys/kernel/tracing";
    let w = |file: &str, v: &str| std::fs::write(format!("{T}/{file}"), v);
    let set = w("tracing_on", "0")
        .and_then(|()| w("trace", ""))
        .and_then(|()| w("set_ftrace_pid", &tid.to_string()))
        .and_then(|()| w("current_tracer", "function"))
        .and_then(|()| w("tracing_on", "1"));
    if let Err(e) = set {
        return format!("ftrace unavailable: {e}");
    }
    std::thread::sleep(Duration::from_millis(50));
    let _ = w("tracing_on", "0");
    let trace = std::fs::read_to_string(format!("{T}/trace")).unwrap_or_default();
    let _ = w("current_tracer", "nop");
    let _ = w("set_ftrace_pid", "");
    // `  app-419  [001] .....  123.456: tls_sw_sendpage <-inet_sendpage`
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for l in trace.lines().filter(|l| !l.starts_with('#')) {
        if let Some(call) = l.split_once(": ").map(|(_, c)| c.trim()) {
            *counts.entry(call).or_default() += 1;
        }
    }
    let mut top: Vec<_> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    top.iter()
        .take(30)
        .map(|(c, n)| format!("{n}x {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ss -tmieo` of the sockets in `pid`'s network namespace (not listening).
fn ss_of(pid: u32) -> String {
    let ns = run(None, &["ip", "netns", "identify", &pid.to_string()]).unwrap_or_default();
    let ns = ns.trim();
    if ns.is_empty() {
        return String::new();
    }
    match run(Some(ns), &["ss", "-tmieoHn", "state", "connected"]) {
        Ok(text) => format!(
            "; ss in {ns}: {}",
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
        Err(e) => format!("; ss in {ns} failed: {e}"),
    }
}

fn thread_states(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let tid_num = tid.parse::<u32>().unwrap_or(0);
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        // CPU time so far (ns): growing between samples means it spins.
        let cpu_ns = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        // The system call it is in: its number and first argument (the fd),
        // or `running` when in user space.
        let syscall = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        let syscall: Vec<&str> = syscall.split_whitespace().take(2).collect();
        out.push_str(&format!(
            " {tid} {} {} cpu {}ns syscall {}",
            state(tid_num).unwrap_or('?'),
            if wchan.is_empty() { "-" } else { wchan.trim() },
            cpu_ns.split_whitespace().next().unwrap_or("?"),
            syscall.join(" ")
        ));
        // `[<0>] tcp_recvmsg_locked+0x.../0x...` per line; the names suffice.
        let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
        let frames: Vec<&str> = stack
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f))
            .take(8)
            .collect();
        if !frames.is_empty() {
            out.push_str(&format!(" [{}]", frames.join(" < ")));
        }
    }
    out
}

/// The TCP sockets of `pid`'s network namespace that are not listening,
/// with their send and receive queues (`/proc/PID/net/tcp{,6}`), and the
/// namespace's kTLS counters: for telling a data-path stall (bytes queued
/// on one side) from an application wait.
fn socket_queues(pid: u32) -> String {
    let mut out = String::new();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local, remote, state (0A = LISTEN), tx_queue:rx_queue
            if f.len() > 4 && f[3] != "0A" {
                out.push_str(&format!(
                    "; {file} {} -> {} st {} tx:rx {}",
                    f[1], f[2], f[3], f[4]
                ));
            }
        }
    }
    let tls = std::fs::read_to_string(format!("/proc/{pid}/net/tls_stat")).unwrap_or_default();
    let nonzero: Vec<String> = tls
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            (v.trim() != "0").then(|| format!("{k}={}", v.trim()))
        })
        .collect();
    if !nonzero.is_empty() {
        out.push_str(&format!("; tls_stat {}", nonzero.join(" ")));
    }
    out
}

/// Waits for a child with a timeout and returns its stdout.
pub fn finish(app: AppChild, timeout: Duration) -> Result<String, Failure> {
    finish_reporting(app, timeout, &[])
}

/// [`finish`], and on a timeout also where the `peers` (other apps, e.g.
/// the server of a stuck client) were, taken before the app is killed
/// (killing it would change what the peers do).
pub fn finish_reporting(
    mut app: AppChild,
    timeout: Duration,
    peers: &[u32],
) -> Result<String, Failure> {
    let Some(mut child) = app.0.take() else {
        return Err("already finished".into());
    };
    let until = Instant::now() + timeout;
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if Instant::now() > until {
            // Where it was stuck, before it is killed: stopped (`T`, held
            // by the gate and never continued?) or in which kernel call.
            let mut stuck = where_stuck(child.id());
            for peer in peers {
                stuck.push_str(&format!("; peer then: {}", where_stuck(*peer)));
            }
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(Failure::Hang(format!(
                "timed out after {timeout:?} ({stuck}); output so far: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
