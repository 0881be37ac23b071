//! `tlshubctl`'s exit codes and errors, against no core, a stale socket
//! and a fake core serving the admin API on a Unix socket.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failure, like the tests"
)]

use std::path::{Path, PathBuf};
use std::process::Output;

use tlshub_admin::pb;
use tlshub_admin::pb::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

/// A core whose status says what the test wants; it lists `connections`,
/// or refuses the caller when there are none.
struct FakeCore {
    health: &'static str,
    programs: usize,
    connections: Vec<pb::Connection>,
}

#[tonic::async_trait]
impl Admin for FakeCore {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            active_provider: "openssl".into(),
            providers: std::iter::once(pb::ProviderStatus {
                name: "openssl".into(),
                active: true,
                health: self.health.into(),
                socket: "/run/tlshub/providers/openssl.sock".into(),
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
        Err(Status::not_found(format!(
            "no provider named {}",
            r.into_inner().name
        )))
    }

    async fn reload_policy(
        &self,
        _: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        Err(Status::unimplemented("not here"))
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
                .add_service(AdminServer::new(core))
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
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "no-core", "{v}");
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
            },
        );
        let o = tlshubctl(&socket, &["status"]);
        assert_eq!(code(&o), want, "{health} {programs}: {}", stderr(&o));
        let o = tlshubctl(&socket, &["--json", "status"]);
        assert_eq!(code(&o), want);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["active_provider"], "openssl", "the status itself: {v}");
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
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "not-permitted", "{v}");
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
