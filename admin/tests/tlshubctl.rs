//! `tlshubctl`'s exit codes and errors, against no core, a stale socket
//! and a fake core serving the admin API on a Unix socket.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failure, like the tests"
)]

use std::path::{Path, PathBuf};
use std::process::Output;

use tlshub_admin::ab::AbRun;
use tlshub_admin::pb;
use tlshub_admin::pb::admin_server::{Admin, AdminServer};
use tlshub_admin::{CtlErrorKind, CtlFailure};
use tonic::{Request, Response, Status};

/// A core whose status says what the test wants; it lists `connections`,
/// or refuses the caller when there are none. `openssl` and `boringssl`
/// can be made active (any other name is unknown), and while one is, each
/// `ListOutcomes` finds twelve more connections keyed by it.
#[derive(Default)]
struct FakeCore {
    health: &'static str,
    programs: usize,
    connections: Vec<pb::Connection>,
    switching: std::sync::Mutex<Switching>,
}

/// The fake core's active provider, every `UseProvider` call (name,
/// force) and the outcomes recorded so far.
#[derive(Debug)]
struct Switching {
    active: String,
    calls: Vec<(String, bool)>,
    outcomes: Vec<pb::Outcome>,
}

impl Default for Switching {
    fn default() -> Self {
        Self {
            active: "openssl".into(),
            calls: Vec::new(),
            // From before a run: never counted.
            outcomes: vec![pb::Outcome {
                seq: 1,
                kind: pb::OutcomeKind::Failed as i32,
                provider: "openssl".into(),
                reason: "timeout".into(),
                ..Default::default()
            }],
        }
    }
}

#[tonic::async_trait]
impl Admin for FakeCore {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            active_provider: self.switching.lock().unwrap().active.clone(),
            providers: std::iter::once(pb::ProviderStatus {
                name: "openssl".into(),
                active: true,
                health: self.health.into(),
                socket: "/run/tlshub/providers/openssl.sock".into(),
                implementation: "tlshub-provider-openssl".into(),
                implementation_version: "0.1.0".into(),
                key_transport: "keys-stream".into(),
                ..Default::default()
            })
            // With connections to list, a provider whose name is longer
            // than a fixed column would be, for the table test.
            .chain((!self.connections.is_empty()).then(|| pb::ProviderStatus {
                name: "boringssl-canary-eu-west".into(),
                health: "not-serving".into(),
                socket: "/run/tlshub/providers/canary.sock".into(),
                detail: "health: NOT_SERVING".into(),
                ..Default::default()
            }))
            .collect(),
            bpf_programs: (0..self.programs)
                .map(|i| pb::BpfProgram {
                    name: format!("p{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }))
    }

    async fn list_connections(
        &self,
        _: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        if self.connections.is_empty() {
            return Err(Status::permission_denied("not root"));
        }
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: self.connections.clone(),
        }))
    }

    async fn use_provider(
        &self,
        r: Request<pb::UseProviderRequest>,
    ) -> Result<Response<pb::UseProviderResponse>, Status> {
        let pb::UseProviderRequest { name, force } = r.into_inner();
        if name != "openssl" && name != "boringssl" {
            return Err(Status::not_found(format!("no provider named {name}")));
        }
        let mut sw = self.switching.lock().unwrap();
        sw.calls.push((name.clone(), force));
        let previous = std::mem::replace(&mut sw.active, name.clone());
        Ok(Response::new(pb::UseProviderResponse {
            previous,
            active: name,
        }))
    }

    async fn list_outcomes(
        &self,
        r: Request<pb::ListOutcomesRequest>,
    ) -> Result<Response<pb::ListOutcomesResponse>, Status> {
        let after = r.into_inner().after;
        let mut sw = self.switching.lock().unwrap();
        // Traffic: twelve connections keyed by the active provider
        // (boringssl twice as fast), spread so that the medians differ.
        for _ in 0..12 {
            let seq = sw.outcomes.len() as u64 + 1;
            let base = if sw.active == "boringssl" { 10.0 } else { 20.0 };
            let provider = sw.active.clone();
            sw.outcomes.push(pb::Outcome {
                seq,
                kind: pb::OutcomeKind::Keyed as i32,
                provider,
                role: "client".into(),
                ms: base + (seq % 5) as f64,
                ..Default::default()
            });
        }
        Ok(Response::new(pb::ListOutcomesResponse {
            outcomes: sw
                .outcomes
                .iter()
                .filter(|o| o.seq > after)
                .cloned()
                .collect(),
            more: false,
            lost: 0,
        }))
    }

    async fn reload_policy(
        &self,
        _: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    /// One announced node and one silent address.
    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        Ok(Response::new(pb::ListPeersResponse {
            peers: vec![
                pb::Peer {
                    peer: "node-b".into(),
                    announced: true,
                    first_announced_unix: 1_700_000_000,
                    protected: 12,
                    known_peer_silent: 2,
                    keying: "tls13-handshake".into(),
                    mode: "opportunistic".into(),
                    ..Default::default()
                },
                pb::Peer {
                    peer: "fd00:2:0:0:0:0:0:7".into(),
                    plain: 3,
                    ..Default::default()
                },
            ],
            file: "/var/lib/tlshub/peers.json".into(),
        }))
    }

    /// Only `node-b` is remembered; `all` forgets it too.
    async fn forget_peers(
        &self,
        r: Request<pb::ForgetPeersRequest>,
    ) -> Result<Response<pb::ForgetPeersResponse>, Status> {
        let r = r.into_inner();
        let forgotten = if r.all || r.peers.iter().any(|p| p == "node-b") {
            vec!["node-b".into()]
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ForgetPeersResponse { forgotten }))
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tlshubctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tlshubctl(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tlshubctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Serves `core` at `dir/admin.sock` on a thread of its own.
fn serve(dir: &TempDir, core: FakeCore) -> PathBuf {
    serve_shared(dir, std::sync::Arc::new(core))
}

/// [`serve`], keeping a handle on the core's state.
fn serve_shared(dir: &TempDir, core: std::sync::Arc<FakeCore>) -> PathBuf {
    let path = dir.0.join("admin.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tonic::transport::Server::builder()
                .add_service(AdminServer::from_arc(core))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
    path
}

#[test]
fn no_socket_is_no_core_with_the_cause_and_a_json_error() {
    let dir = TempDir::new("missing");
    let missing = dir.0.join("admin.sock");
    let o = tlshubctl(&missing, &["status"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("no such socket"), "{}", stderr(&o));
    let o = tlshubctl(&missing, &["--json", "status"]);
    assert_eq!(code(&o), 3);
    let v: CtlFailure = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.error.kind, CtlErrorKind::NoCore, "{v:?}");
}

#[test]
fn a_stale_socket_is_no_core_too() {
    let dir = TempDir::new("stale");
    let path = dir.0.join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let o = tlshubctl(&path, &["status"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("connection refused"), "{}", stderr(&o));
}

#[test]
fn a_usage_error_is_2() {
    let o = tlshubctl(Path::new("/nonexistent"), &["no-such-command"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[test]
fn status_says_degraded_when_the_active_provider_is_down_or_no_program_is_attached() {
    for (health, programs, want) in [("serving", 3, 0), ("unreachable", 3, 5), ("serving", 0, 5)] {
        let dir = TempDir::new(&format!("status-{health}-{programs}"));
        let socket = serve(
            &dir,
            FakeCore {
                health,
                programs,
                connections: Vec::new(),
                ..Default::default()
            },
        );
        let o = tlshubctl(&socket, &["status"]);
        assert_eq!(code(&o), want, "{health} {programs}: {}", stderr(&o));
        let o = tlshubctl(&socket, &["--json", "status"]);
        assert_eq!(code(&o), want);
        let v: pb::StatusResponse = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v.active_provider, "openssl", "the status itself: {v:?}");
    }
}

#[test]
fn a_refused_request_is_1_and_a_refused_user_is_4() {
    let dir = TempDir::new("refused");
    let socket = serve(
        &dir,
        FakeCore {
            health: "serving",
            programs: 1,
            connections: Vec::new(),
            ..Default::default()
        },
    );
    let o = tlshubctl(&socket, &["provider", "use", "nope"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no provider named nope"),
        "{}",
        stderr(&o)
    );
    let o = tlshubctl(&socket, &["--json", "connections"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let v: CtlFailure = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.error.kind, CtlErrorKind::NotPermitted, "{v:?}");
}

#[test]
fn the_connections_table_fits_ipv6_addresses() {
    let dir = TempDir::new("table");
    let connection = |local: &str, remote: &str| pb::Connection {
        local: local.into(),
        remote: remote.into(),
        role: "client".into(),
        pid: 4242,
        provider: "openssl".into(),
        cipher: "aes-gcm-128".into(),
        state: "protected".into(),
        key_ms: 12.5,
        age_ms: 61_000,
        ..Default::default()
    };
    let socket = serve(
        &dir,
        FakeCore {
            health: "serving",
            programs: 1,
            connections: vec![
                connection("10.0.1.2:40000", "10.0.2.2:8443"),
                connection("[fd00:1:2:3:4:5:6:7]:40001", "[fd00:2:2:3:4:5:6:7]:8443"),
            ],
            ..Default::default()
        },
    );
    let o = tlshubctl(&socket, &["connections"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    // Every row's REMOTE and ROLE start where the header's do.
    let at = |line: &str, what: &str| line.find(what).unwrap();
    let (remote, role) = (at(lines[0], "REMOTE"), at(lines[0], "ROLE"));
    assert_eq!(at(lines[1], "10.0.2.2:8443"), remote, "{text}");
    assert_eq!(at(lines[2], "[fd00:2:2:3:4:5:6:7]:8443"), remote, "{text}");
    assert_eq!(at(lines[1], "client"), role, "{text}");
    assert_eq!(at(lines[2], "client"), role, "{text}");
    assert!(text.ends_with("2 connection(s)\n"), "{text}");

    // The providers' table too: a long name keeps HEALTH in its column.
    let o = tlshubctl(&socket, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let header = text.lines().find(|l| l.contains("HEALTH")).unwrap();
    let health = at(header, "HEALTH");
    let row = |name: &str| text.lines().find(|l| l.contains(name)).unwrap();
    assert_eq!(at(row("openssl.sock"), "serving"), health, "{text}");
    assert!(
        row("openssl.sock").contains("(tlshub-provider-openssl 0.1.0, keys over keys-stream)"),
        "how key requests reach the provider: {text}"
    );
    assert_eq!(
        at(row("boringssl-canary-eu-west"), "not-serving"),
        health,
        "{text}"
    );
    let detail = row("health: NOT_SERVING");
    assert_eq!(
        at(detail, "health: NOT_SERVING"),
        at(header, "SOCKET / DETAIL"),
        "{text}"
    );
}

fn serving_core(dir: &TempDir) -> (std::sync::Arc<FakeCore>, PathBuf) {
    let core = std::sync::Arc::new(FakeCore {
        health: "serving",
        programs: 1,
        ..Default::default()
    });
    let socket = serve_shared(dir, std::sync::Arc::clone(&core));
    (core, socket)
}

#[test]
fn ab_alternates_the_providers_restores_the_first_and_compares_them() {
    let dir = TempDir::new("ab");
    let (core, socket) = serving_core(&dir);
    let o = tlshubctl(
        &socket,
        &[
            "--json",
            "ab",
            "openssl",
            "boringssl",
            "--duration",
            "5s",
            "--switch-every",
            "1s",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: AbRun = serde_json::from_slice(&o.stdout).unwrap();
    let calls = core.switching.lock().unwrap().calls.clone();
    // A, B, A, B, A, then the original back (forced).
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "openssl",
            "boringssl",
            "openssl",
            "boringssl",
            "openssl",
            "openssl"
        ],
        "{v:?}"
    );
    assert!(calls.last().unwrap().1, "the restore is forced");
    assert_eq!(v.restored, "openssl");
    assert!(!v.interrupted);
    assert_eq!(v.switches, 5);
    let keyed = |i: usize| v.report.providers[i].keyed;
    assert!(keyed(0) >= 30 && keyed(1) >= 20, "{v:?}");
    // The failure recorded before the run is not counted.
    assert!(v.report.providers[0].failed.is_empty(), "{v:?}");
    let verdicts = v.report.verdicts.join("\n");
    assert!(
        verdicts.contains("key time p50: boringssl is faster than openssl by 10"),
        "{verdicts}"
    );
    assert!(
        verdicts.contains("gate hold p50: too few samples"),
        "{verdicts}"
    );
}

#[test]
fn ab_interrupted_restores_the_original_provider_and_exits_130() {
    let dir = TempDir::new("ab-int");
    let (core, socket) = serving_core(&dir);
    core.switching.lock().unwrap().active = "boringssl".into();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tlshubctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["ab", "openssl", "boringssl", "--duration", "1h"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until the run switched to A.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while core.switching.lock().unwrap().calls.is_empty() {
        assert!(std::time::Instant::now() < deadline, "ab never switched");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    let sw = core.switching.lock().unwrap();
    assert_eq!(sw.active, "boringssl", "restored: {:?}", sw.calls);
    assert_eq!(sw.calls.last().unwrap(), &("boringssl".to_owned(), true));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("interrupted; boringssl restored"), "{text}");
    assert!(text.contains("KEY P50 MS (95% CI)"), "{text}");
}

#[test]
fn peers_are_listed_and_forgetting_needs_names_or_all_but_not_both() {
    let dir = TempDir::new("peers");
    let (_, socket) = serving_core(&dir);
    let o = tlshubctl(&socket, &["peers"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("node-b"))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // PEER ANNOUNCED SINCE(n, "ago") LAST MODE KEYING PROTECTED PLAIN KNOWN-SILENT
    // SINCE is "<n>d ago": two cells, skipped.
    assert_eq!(cells[1], "yes", "{text}");
    assert_eq!(
        cells[4..],
        ["-", "opportunistic", "tls13-handshake", "12", "0", "2"],
        "{text}"
    );
    assert!(
        text.contains("2 peer(s), 1 announced tlshub (kept in /var/lib/tlshub/peers.json)"),
        "{text}"
    );
    let o = tlshubctl(&socket, &["--json", "peers", "forget", "node-b", "node-c"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let answer: pb::ForgetPeersResponse = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(answer.forgotten, ["node-b"]);
    assert_eq!(code(&tlshubctl(&socket, &["peers", "forget"])), 2);
    assert_eq!(
        code(&tlshubctl(&socket, &["peers", "forget", "node-b", "--all"])),
        2
    );
    let o = tlshubctl(&socket, &["peers", "forget", "--all"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("forgotten: node-b"));
}
