//! What every scenario uses: the test app's options and runs, reading
//! its reports, starting the nodes, and the expectations of a connection
//! that was failed closed.

use std::time::{Duration, Instant};

use crate::app_report::AppReport;
use crate::failed;
use crate::vm::outcome::Failure;

use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::topology::POD_B;

mod app;
pub use app::{App, Launch};

/// The report `tlshub-testapp` printed last.
pub fn app_report(s: &str) -> Result<AppReport, Failure> {
    last_report(s)
}

/// The report an app printed last, as its type.
pub fn last_report<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, Failure> {
    let line = s
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("no report in {s:?}"))?;
    serde_json::from_str(line).map_err(|e| failed!("bad report {line:?}: {e}"))
}

/// Server address and port of pod B for `port` (IPv4).
pub fn pod_b_addr(port: u16) -> String {
    format!("{POD_B}:{port}")
}

/// Starts `tlshub-testapp client` in pod-a against pod B's `port` (IPv4),
/// `args` following (started, not waited for).
pub fn spawn_client(port: u16, args: &[&str]) -> Result<process::AppChild, Failure> {
    let connect = pod_b_addr(port);
    let mut argv = vec!["tlshub-testapp", "client", "--connect", &connect];
    argv.extend_from_slice(args);
    process::spawn_app("pod-a", &argv)
}

/// Starts `tlshub-testapp probe --what WHAT --connect TARGET` in pod-a,
/// `args` following (started, not waited for; see [`probe_steps`]).
pub fn spawn_probe(what: &str, target: &str, args: &[&str]) -> Result<process::AppChild, Failure> {
    let mut argv = vec![
        "tlshub-testapp",
        "probe",
        "--what",
        what,
        "--connect",
        target,
    ];
    argv.extend_from_slice(args);
    process::spawn_app("pod-a", &argv)
}

/// A file whose existence tells a probe started with `--go-file` to take
/// its last step: absent when made, written by [`GoFile::go`], removed
/// when dropped.
#[derive(Debug)]
pub struct GoFile(&'static str);

impl GoFile {
    /// At `path`, removed first (a run that failed may have left it).
    pub fn new(path: &'static str) -> Self {
        let _ = std::fs::remove_file(path);
        Self(path)
    }

    /// The path, for `--go-file`.
    pub fn path(&self) -> &'static str {
        self.0
    }

    /// Lets the probe go on.
    pub fn go(&self) -> Result<(), Failure> {
        std::fs::write(self.0, b"go").map_err(|e| failed!("cannot write {}: {e}", self.0))
    }
}

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Runs probe `what` from pod-a against `port` of pod-b with no further
/// arguments, to its end (at most `limit`): its steps ([`probe_steps`])
/// and how long it ran.
pub fn timed_probe(
    what: &str,
    port: u16,
    limit: std::time::Duration,
) -> Result<(Vec<(String, i32)>, std::time::Duration), Failure> {
    let started = std::time::Instant::now();
    let probe = spawn_probe(what, &pod_b_addr(port), &[])?;
    let out = process::finish(probe, limit)
        .map_err(|e| e.context(format!("{what} probe to port {port}")))?;
    Ok((probe_steps(&out)?, started.elapsed()))
}

/// Waits (at most 10 s) until pod-b holds no connection on `port` that
/// is still established or closing, and returns how many it held at the
/// end: a connection its peer aborted is gone at once, one whose peer
/// vanished in silence stays until a timeout.
pub fn pod_b_connections_gone(port: u16) -> Result<usize, Failure> {
    let filter = format!("( sport = :{port} )");
    let count = || {
        process::run(
            Some("pod-b"),
            &[
                "ss",
                "-Htn",
                "state",
                "connected",
                "exclude",
                "time-wait",
                &filter,
            ],
        )
        .map(|out| out.lines().filter(|l| !l.trim().is_empty()).count())
    };
    wait_for(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(200),
        count,
        |n| n.as_ref().map_or(true, |&n| n == 0),
    )
    .unwrap_or_else(|last| last)
}

/// The steps of a `tlshub-testapp probe` report: each call and its errno
/// (0: it succeeded).
pub fn probe_steps(report: &str) -> Result<Vec<(String, i32)>, Failure> {
    let report = app_report(report)?;
    if report.probe.is_empty() {
        return Err(failed!("no probe steps in {report}"));
    }
    Ok(report
        .probe
        .into_iter()
        .map(|s| (s.call.into_owned(), s.errno))
        .collect())
}

/// Starts `tlshub-testapp server` in pod-b listening on `port` (all
/// addresses), `args` following, and waits until it listens.
pub fn spawn_server(port: u16, args: &[&str]) -> Result<process::AppChild, Failure> {
    let listen = format!("0.0.0.0:{port}");
    let mut argv = vec!["tlshub-testapp", "server", "--listen", &listen];
    argv.extend_from_slice(args);
    process::spawn_ready(
        "pod-b",
        &argv,
        "listening",
        std::time::Duration::from_secs(10),
    )
}

/// The command line of `tlshub-goapp ROLE` (the test app on the Go
/// runtime, `tests/go/goapp`): a `server` listens on `addr`, a `client`
/// connects to it; `conns` connections at once of `size` bytes each way,
/// sent with `send` (`write` or `sendfile`).
fn go_app(role: &str, addr: &str, conns: u32, size: usize, send: &str) -> Vec<String> {
    let flag = if role == "client" {
        "-connect"
    } else {
        "-listen"
    };
    let (conns, size) = (conns.to_string(), size.to_string());
    [
        "tlshub-goapp",
        role,
        flag,
        addr,
        "-conns",
        &conns,
        "-size",
        &size,
        "-send",
        send,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A Go server in pod-b on `listen` and a Go client in pod-a connecting to
/// `connect` ([`go_app`]), run until the client ends (at most 120 s) and
/// the server after it. Both reports must say `conns` exact exchanges of
/// `size` bytes each way.
pub fn run_go_pair(
    listen: &str,
    connect: &str,
    conns: u32,
    size: usize,
    send: &str,
) -> Result<(), Failure> {
    let argv = |role, addr| go_app(role, addr, conns, size, send);
    let (sargv, cargv) = (argv("server", listen), argv("client", connect));
    let (sargv, cargv): (Vec<&str>, Vec<&str>) = (
        sargv.iter().map(String::as_str).collect(),
        cargv.iter().map(String::as_str).collect(),
    );
    let server = spawn_ready("pod-b", &sargv, "listening", Duration::from_secs(10))?;
    let client = process::spawn_app("pod-a", &cargv)?;
    let c = process::finish_reporting(client, Duration::from_secs(120), &[server.id()])
        .map_err(|e| e.context(format!("{cargv:?}")))?;
    let s = finish(server, Duration::from_secs(30))
        .map_err(|e| e.map_message(|m| format!("go server: {m}; the client said: {}", c.trim())))?;
    let (s, c) = (app_report(&s)?, app_report(&c)?);
    let bytes = u64::from(conns) * size as u64;
    for r in [&s, &c] {
        if !r.ok || r.connections != conns || r.bytes_sent != bytes || r.bytes_received != bytes {
            return Err(failed!(
                "go server {s}, go client {c} (want {conns} connections, {bytes} bytes each way)"
            ));
        }
    }
    Ok(())
}

/// Starts `app`'s server in `app.server_pod` and waits until it listens.
pub fn start_app_server(app: &App) -> Result<process::AppChild, Failure> {
    let (listen, _) = app.addresses();
    let args = app.args();
    let mut sargv = app.program("server");
    sargv.extend(["--listen", &listen]);
    sargv.extend(args.iter().map(String::as_str));
    spawn_ready(app.server_pod, &sargv, "listening", Duration::from_secs(10))
}

/// Runs `app`'s client in `pod`, `extra` flags following, until it ends;
/// its output. One that times out is reported with where `server` (the
/// server's pid) was too.
pub fn run_app_client(
    app: &App,
    pod: &str,
    extra: &[&str],
    timeout: Duration,
    server: u32,
) -> Result<String, Failure> {
    let (_, connect) = app.addresses();
    let args = app.args();
    let mut cargv = app.program("client");
    cargv.extend(["--connect", &connect]);
    cargv.extend(args.iter().map(String::as_str));
    cargv.extend_from_slice(extra);
    let client = process::spawn_app(pod, &cargv)?;
    process::finish_reporting(client, timeout, &[server])
        .map_err(|e| e.context(format!("{app:?}: client")))
}

/// The server's report once the client ended (the client's output `c`
/// names what the client saw when the server fails).
pub fn finish_app_server(
    app: &App,
    server: process::AppChild,
    c: &str,
) -> Result<AppReport, Failure> {
    let s = finish(server, Duration::from_secs(10)).map_err(|e| {
        e.map_message(|m| format!("{app:?}: server: {m}; the client said: {}", c.trim()))
    })?;
    app_report(&s)
}

/// Runs server in `app.server_pod` and client in pod-a; returns both reports.
pub fn run_pair(
    app: &App,
    extra_client: &[&str],
    timeout: Duration,
) -> Result<(AppReport, AppReport), Failure> {
    let server = start_app_server(app)?;
    // The server is killed when this returns.
    let c = run_app_client(app, "pod-a", extra_client, timeout, server.id())?;
    Ok((finish_app_server(app, server, &c)?, app_report(&c)?))
}

/// Both ends' exchanges were exact, or an error naming both reports.
pub fn both_ok(app: &App, s: &AppReport, c: &AppReport) -> Result<(), Failure> {
    if s.ok && c.ok {
        Ok(())
    } else {
        Err(failed!("{app:?}: server {s}, client {c}"))
    }
}

/// Starts both nodes.
pub fn nodes(a: NodeSpec, b: NodeSpec) -> Result<(Node, Node), Failure> {
    Ok((Node::start(a)?, Node::start(b)?))
}

/// Starts both nodes with the defaults and `provider`.
pub fn nodes_with_provider(provider: ProviderKind) -> Result<(Node, Node), Failure> {
    nodes(
        NodeSpec::with_provider("a", provider),
        NodeSpec::with_provider("b", provider),
    )
}

pub fn expect_reset(c: &AppReport) -> Result<(), Failure> {
    // ECONNRESET or EPIPE, both from the reset; never success.
    if c.ok || !matches!(c.errno, Some(libc::ECONNRESET | libc::EPIPE)) {
        return Err(failed!("client should have been reset, got {c}"));
    }
    Ok(())
}

/// The server of a connection that was failed closed: it must have failed
/// too, with no byte received (garbage followed by a reset would show as
/// a byte that "differs").
pub fn expect_server_failed_clean(s: &AppReport) -> Result<(), Failure> {
    let error = s.error.as_deref().unwrap_or_default();
    if s.ok || s.bytes_received != 0 || error.contains("differs") {
        return Err(failed!(
            "server should have failed with nothing received, got {s}"
        ));
    }
    Ok(())
}

/// A `key=value` word of the kernel command line (the xtask passes the
/// runner's options this way).
pub fn cmdline(key: &str) -> Option<String> {
    let line = std::fs::read_to_string("/proc/cmdline").ok()?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(String::from))
}

/// (major, minor) of the running kernel.
pub fn kernel_version() -> (u32, u32) {
    let release = process::run(None, &["uname", "-r"]).unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Percentile `p` (a fraction: 0.5 is the median) of a sorted slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A network namespace's setting changed for a scenario and put back
/// when dropped.
#[derive(Debug)]
pub struct PodSetting {
    pod: &'static str,
    undo: Vec<String>,
}

impl PodSetting {
    /// Sets `/proc/sys/<key>` (e.g. `net/ipv4/tcp_fastopen`) in `pod`;
    /// dropping puts back the value it had.
    pub fn sysctl(pod: &'static str, key: &str, value: &str) -> Result<Self, Failure> {
        let path = format!("/proc/sys/{key}");
        let before = process::run(Some(pod), &["cat", &path])?.trim().to_string();
        process::run(Some(pod), &["sh", "-c", &format!("echo {value} > {path}")])?;
        Ok(Self {
            pod,
            undo: ["sh", "-c", &format!("echo {before} > {path}")]
                .map(String::from)
                .to_vec(),
        })
    }

    /// Runs `set` in `pod`; dropping runs `undo` there.
    pub fn command(pod: &'static str, set: &[&str], undo: &[&str]) -> Result<Self, Failure> {
        process::run(Some(pod), set)?;
        Ok(Self {
            pod,
            undo: undo.iter().map(|a| a.to_string()).collect(),
        })
    }
}

impl Drop for PodSetting {
    fn drop(&mut self) {
        let undo: Vec<&str> = self.undo.iter().map(String::as_str).collect();
        let _ = process::run(Some(self.pod), &undo);
    }
}

/// A cgroup (v2) of its own that apps in a pod can join (`tlshub-testapp
/// probe --cgroup`). `ip netns exec` mounts a fresh sysfs over `/sys`,
/// which hides `/sys/fs/cgroup` from the apps it starts, so the hierarchy
/// is mounted a second time outside `/sys` (the same hierarchy, so the
/// same cgroup ids). Removed and unmounted when dropped; its processes
/// must have ended by then.
#[derive(Debug)]
pub struct TestCgroup {
    mount: &'static str,
    dir: String,
}

impl TestCgroup {
    /// Mounts the hierarchy at `mount` and makes the cgroup `name` in it.
    pub fn new(mount: &'static str, name: &str) -> Result<Self, Failure> {
        std::fs::create_dir_all(mount).map_err(|e| format!("mkdir {mount}: {e}"))?;
        process::run(None, &["mount", "-t", "cgroup2", "cgroup2", mount])?;
        let guard = Self {
            mount,
            dir: format!("{mount}/{name}"),
        };
        match std::fs::create_dir(&guard.dir) {
            // Left by a run that failed before its guard dropped.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.map_err(|e| format!("mkdir {}: {e}", guard.dir))?,
        }
        Ok(guard)
    }

    /// Its directory, for `--cgroup`.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The root cgroup's id: the inode number of the hierarchy's root
    /// directory (what `bpf_get_current_cgroup_id()` returns for a process
    /// there).
    pub fn root_id(&self) -> Result<u64, Failure> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.mount)
            .map(|m| m.ino())
            .map_err(|e| failed!("stat {}: {e}", self.mount))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = process::run(None, &["umount", self.mount]);
    }
}

/// A counter's value for one label set in Prometheus text (0 if absent).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// One client-first exchange on the protected port with the server in
/// `server_pod` at `server` and the client in `client_pod`; both reports
/// and how long the client took.
pub fn exchange_between(
    server_pod: &'static str,
    server: &'static str,
    client_pod: &str,
    size: usize,
) -> Result<(AppReport, AppReport, Duration), Failure> {
    let app = App {
        server,
        server_pod,
        ..App::exchange(size, PROTECTED_PORT)
    };
    let srv = start_app_server(&app)?;
    let started = Instant::now();
    let c = run_app_client(&app, client_pod, &[], Duration::from_secs(60), srv.id())?;
    let took = started.elapsed();
    Ok((finish_app_server(&app, srv, &c)?, app_report(&c)?, took))
}

/// Waits until freshly started nodes announce their providers' keying
/// protocol: the core learns it from the provider's first health check and
/// writes it with its next heartbeat (at most 500 ms later); until then it
/// announces "not said", which checks nothing.
pub fn settle_keying() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// Asks `probe` every `every` until its answer satisfies `done` or
/// `within` has passed: `Ok` with the answer that satisfied it, `Err` with
/// the last one. It asks at least once, and once more after the deadline,
/// so a slow probe never costs the last look.
pub fn wait_for<T>(
    within: Duration,
    every: Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> Result<T, T> {
    let until = Instant::now() + within;
    loop {
        let expired = Instant::now() > until;
        let answer = probe();
        if done(&answer) {
            return Ok(answer);
        }
        if expired {
            return Err(answer);
        }
        std::thread::sleep(every);
    }
}

/// Whether process `pid` was stopped (`T` in `/proc`: held by the gate)
/// within 10 s.
pub fn stopped_within_10s(pid: u32) -> bool {
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || process::state(pid),
        |&state| state == Some('T'),
    )
    .is_ok()
}

/// The core's last warnings and failures, for a failure message, and its
/// stats once the counters kept by BPF reached the stats file (the core
/// copies them there about once a second).
pub fn trouble(node: &Node) -> String {
    std::thread::sleep(Duration::from_millis(1500));
    let log = node.core_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            !l.contains("KEY EXPORT")
                && (l.contains("WARN") || l.contains("ERROR") || l.contains("failed"))
        })
        .collect();
    format!(
        "{} (stats {:?})",
        lines[lines.len().saturating_sub(4)..].join(" | "),
        node.stats()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_first_answer_that_is_done_or_the_last_one() {
        let ms = Duration::from_millis;
        let mut n = 0;
        let done = wait_for(
            ms(1000),
            ms(1),
            || {
                n += 1;
                n
            },
            |&n| n == 3,
        );
        assert_eq!(done, Ok(3));
        let mut asked = 0;
        let started = Instant::now();
        let late = wait_for(
            ms(30),
            ms(5),
            || {
                asked += 1;
                asked
            },
            |_| false,
        );
        assert!(started.elapsed() >= ms(30));
        assert_eq!(
            late,
            Err(asked),
            "the last answer, asked after the deadline"
        );
        assert!(asked >= 2);
    }
}
