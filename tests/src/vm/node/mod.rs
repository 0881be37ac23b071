//! One node's agent: a provider process and a `tlshub-core` process, with
//! their configuration files, sockets, logs, stats and key export.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tlshub_admin::stats::Stats;
use tlshub_admin::{CtlError, pb};
use tlshub_provider_sdk::keylog::KeyLogRecord;

use super::process::Proc;
use crate::failed;
use crate::vm::outcome::Failure;

mod ctl;
mod provider;

pub use ctl::{DEGRADED, tlshubctl};
pub use provider::{
    CERTS, NODE_PAIR_PORT, ProviderFiles, ProviderKind, ProviderRequests, metrics_at,
};
use provider::{NODE_MAP, spawn_provider};

/// A node's core stopped by [`Node::pause_core`]; continued on drop.
#[derive(Debug)]
pub struct CorePaused<'a>(&'a Node);

impl Drop for CorePaused<'_> {
    fn drop(&mut self) {
        if let Some(c) = &self.0.core {
            c.signal(libc::SIGCONT);
        }
    }
}

/// How a node is configured.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `a` or `b`.
    pub name: &'static str,
    /// The active provider at start.
    pub provider: ProviderKind,
    /// More providers the core knows by name (started too), for switching.
    pub also: Vec<ProviderKind>,
    /// `fail-closed` or `fail-open`.
    pub failure_policy: &'static str,
    /// Provider timeout.
    pub key_timeout_ms: u64,
    /// TLS 1.3 suite the provider pins.
    pub suite: &'static str,
    /// The TLSHub stand-in's node-secret lifetime (`--lifetime-ms`).
    pub standin_lifetime_ms: u64,
    /// `[ktls] send_buffer_floor_bytes` (unset: the core's default).
    pub send_buffer_floor: Option<u32>,
    /// More `[bpf]` settings (`("max_connections", 16)`); unset ones keep
    /// the core's defaults.
    pub bpf: Vec<(&'static str, u64)>,
    /// Node a only: pod-a2 is one of its pods too, and its policy selects
    /// traffic between its own pods (same-node traffic).
    pub same_node: bool,
    /// Whether its handshake providers check the peer's node against the
    /// test bed's node map ([`NODE_MAP`]; on unless a scenario handshakes
    /// over addresses that are no node's, as the conformance suite does).
    pub node_map: bool,
    /// `[policy] service_cidrs` (empty: none); the translation is read in
    /// the node's own namespace (`[conntrack] netns`), where the test bed's
    /// DNAT rules are.
    pub service_cidrs: Vec<&'static str>,
    /// The rule's `mode` (`strict` or `opportunistic`).
    pub rule_mode: &'static str,
    /// Ports the rule selects besides [`PROTECTED_PORT`].
    pub also_ports: Vec<u16>,
    /// Its OpenSSL or BoringSSL provider keys in node-pair mode
    /// (`keying = "node-pair"`): it then runs in the node's namespace and
    /// keeps its session with the other node's provider over the wire
    /// between the nodes, at the node map's addresses.
    pub node_pair: bool,
    /// Its node-pair sessions' `lifetime_seconds` (each replaced session
    /// is drained for 2 s).
    pub node_pair_lifetime_seconds: u64,
    /// Test-bed diagnostics: the core writes every connection's keys to
    /// `keys.jsonl` (`--keylog-file`), so the wire can be decrypted, and
    /// logs its per-connection lines (`tlshub_core::state` at debug: each
    /// connection keyed, each hold), for the scenarios' failure dumps.
    /// Off in the benchmark and the profile, which measure the core as
    /// installed.
    pub diagnostics: bool,
    /// `prlimit`'s `--nofile=SOFT:HARD` for the core and the providers:
    /// started with these limits on open files (`None`: inherited).
    pub open_files: Option<&'static str>,
}

impl NodeSpec {
    /// The default: OpenSSL, fail-closed, 2 s, AES-128-GCM.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            provider: ProviderKind::OpenSsl,
            also: Vec::new(),
            failure_policy: "fail-closed",
            key_timeout_ms: 2000,
            suite: "TLS_AES_128_GCM_SHA256",
            standin_lifetime_ms: 600_000,
            send_buffer_floor: None,
            bpf: Vec::new(),
            same_node: false,
            node_map: true,
            service_cidrs: Vec::new(),
            rule_mode: "strict",
            also_ports: Vec::new(),
            node_pair: false,
            node_pair_lifetime_seconds: 3600,
            diagnostics: true,
            open_files: None,
        }
    }

    /// The command line that starts one of this node's processes: `argv`,
    /// under `prlimit` if [`NodeSpec::open_files`] is set.
    pub fn command<'a>(&self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut out = match self.open_files {
            Some(limit) => vec!["prlimit", limit, "--"],
            None => Vec::new(),
        };
        out.extend_from_slice(argv);
        out
    }

    /// The default with `provider`.
    pub fn with_provider(name: &'static str, provider: ProviderKind) -> Self {
        Self {
            provider,
            ..Self::new(name)
        }
    }
}

/// A running node agent; both processes stop when dropped (core first).
#[derive(Debug)]
pub struct Node {
    /// The spec it runs.
    pub spec: NodeSpec,
    /// Runtime directory.
    pub dir: PathBuf,
    core: Option<Proc>,
    /// Provider processes by name (`None` for a provider that is missing).
    providers: Vec<(ProviderKind, Option<Proc>)>,
    standin: Option<Proc>,
}

/// Where the protected server port is.
pub const PROTECTED_PORT: u16 = 8443;
/// A port no policy selects.
pub const PLAIN_PORT: u16 = 9000;

impl Node {
    /// Writes the configs and starts provider, then core; waits until the
    /// core runs.
    pub fn start(spec: NodeSpec) -> Result<Self, Failure> {
        let n = spec.name;
        let dir = PathBuf::from(format!("/run/tlshub/node-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/tmp/logs").map_err(|e| e.to_string())?;
        // Each node protects its pods' IPv4 and IPv6 prefixes.
        let (pod_a, pod_b) = (
            r#""10.0.1.0/24", "fd00:1::/64""#,
            r#""10.0.2.0/24", "fd00:2::/64""#,
        );
        let (local, peer) = match (n, spec.same_node) {
            ("a", false) => (pod_a.to_owned(), pod_b.to_owned()),
            ("a", true) => (
                format!(r#"{pod_a}, "10.0.3.0/24""#),
                format!(r#"{pod_b}, {pod_a}, "10.0.3.0/24""#),
            ),
            _ => (pod_b.to_owned(), pod_a.to_owned()),
        };
        let kinds: Vec<ProviderKind> = std::iter::once(spec.provider)
            .chain(spec.also.iter().copied())
            .collect();
        let endpoints: String = kinds
            .iter()
            .map(|k| {
                format!(
                    "{} = \"{}\"\n",
                    k.name(),
                    dir.join(format!("provider-{}.sock", k.name())).display()
                )
            })
            .collect();
        let metrics_port = if n == "a" { 9464 } else { 9465 };
        let services = if spec.service_cidrs.is_empty() {
            String::new()
        } else {
            let cidrs: Vec<String> = spec
                .service_cidrs
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect();
            format!("service_cidrs = [{}]\n", cidrs.join(", "))
        };
        let mut core_toml = format!(
            "node_name = \"node-{n}\"\nfailure_policy = \"{}\"\n\n[provider]\nactive = \"{}\"\ntimeout_ms = {}\nhealth_interval_ms = 500\nswitch_file = \"{}\"\n[provider.endpoints]\n{endpoints}\n[admin]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[policy]\nlocal_cidrs = [{local}]\n{services}[[policy.rules]]\npeer_cidrs = [{peer}]\nports = [{PROTECTED_PORT}{}]\nmode = \"{}\"\n\n[bpf]\npin_dir = \"/sys/fs/bpf/tlshub-node-{n}\"\n{}",
            spec.failure_policy,
            spec.provider.name(),
            spec.key_timeout_ms,
            dir.join("active-provider.json").display(),
            dir.join("admin.sock").display(),
            spec.also_ports
                .iter()
                .map(|p| format!(", {p}"))
                .collect::<String>(),
            spec.rule_mode,
            spec.bpf
                .iter()
                .map(|(key, value)| format!("{key} = {value}\n"))
                .collect::<String>(),
        );
        if let Some(bytes) = spec.send_buffer_floor {
            core_toml.push_str(&format!("\n[ktls]\nsend_buffer_floor_bytes = {bytes}\n"));
        }
        if !spec.service_cidrs.is_empty() {
            core_toml.push_str(&format!("\n[conntrack]\nnetns = \"/run/netns/node-{n}\"\n"));
        }
        // The announced peers, by node when the test bed's node map is on.
        core_toml.push_str(&format!(
            "\n[peers]\nfile = \"{}\"\n",
            dir.join("peers.json").display()
        ));
        if spec.node_map {
            let map = dir.join("core-nodes.toml");
            std::fs::write(&map, NODE_MAP).map_err(|e| e.to_string())?;
            core_toml.push_str(&format!("node_map = \"{}\"\n", map.display()));
        }
        std::fs::write(dir.join("core.toml"), core_toml).map_err(|e| e.to_string())?;
        let mut standin = None;
        let mut providers = Vec::new();
        for kind in kinds {
            let p = spawn_provider(&spec, &dir, kind, &mut standin)?;
            providers.push((kind, p));
        }
        // A scenario that failed before its cleanup may have left programs
        // pinned for this node: start from nothing.
        let _ = release(n, &dir, true);
        let core = spawn_core(&spec, &dir, "core")?;
        Ok(Self {
            spec,
            dir,
            core: Some(core),
            providers,
            standin,
        })
    }

    /// The core's latest stats.
    pub fn stats(&self) -> Result<Stats, Failure> {
        let path = self.dir.join("stats.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| failed!("{}: {e}", path.display()))
    }

    /// One figure of the core's stats (`|s| s.protected`), 0 when the file
    /// is missing or unreadable.
    pub fn stat(&self, figure: impl Fn(&Stats) -> u64) -> u64 {
        self.stats().map(|s| figure(&s)).unwrap_or(0)
    }

    /// A figure once it reached `want`, or its value after 5 s: the core
    /// rewrites its stats file once a second, and later still when its
    /// loop is busy (TCG).
    pub fn stat_reaching(&self, figure: impl Fn(&Stats) -> u64, want: u64) -> u64 {
        self.stat_reaching_in(figure, want, std::time::Duration::from_secs(5))
    }

    /// [`Self::stat_reaching`], waiting up to `wait`.
    pub fn stat_reaching_in(
        &self,
        figure: impl Fn(&Stats) -> u64,
        want: u64,
        wait: std::time::Duration,
    ) -> u64 {
        super::support::wait_for(
            wait,
            Duration::from_millis(100),
            || self.stat(&figure),
            |&v| v >= want,
        )
        .unwrap_or_else(|last| last)
    }

    /// Exported keys, one record per connection.
    pub fn keys(&self) -> Vec<KeyLogRecord> {
        read_keylog(&self.dir.join("keys.jsonl"))
    }

    /// The cipher of the first exported key, or "" when none.
    pub fn first_key_suite(&self) -> String {
        self.keys()
            .first()
            .map(|k| k.suite.clone())
            .unwrap_or_default()
    }

    /// The core's log so far.
    pub fn core_log(&self) -> String {
        self.core
            .as_ref()
            .map(|c| std::fs::read_to_string(&c.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The core's pid (0 when it is not running).
    pub fn core_pid(&self) -> u32 {
        self.core.as_ref().map_or(0, Proc::pid)
    }

    /// `tlshubctl --json ARGS` against this node's core, its answer read as
    /// `T` (the admin API message the command prints). A degraded `status`
    /// (exit 5: the active provider is not serving) is still the status.
    pub fn ctl<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, Failure> {
        let (code, answer) = self.ctl_with_exit(args)?;
        answer.map_err(|e| {
            failed!(
                "tlshubctl {args:?} on node {} exited {code}: {e:?}",
                self.spec.name
            )
        })
    }

    /// `tlshubctl status` of this node's core.
    pub fn status(&self) -> Result<pb::StatusResponse, Failure> {
        self.ctl(&["status"])
    }

    /// `tlshubctl provider use NAME` on this node's core.
    pub fn use_provider(&self, name: &str) -> Result<pb::UseProviderResponse, Failure> {
        self.ctl(&["provider", "use", name])
    }

    /// `tlshubctl --json ARGS` against this node's core: its exit code, and
    /// its answer or the failure it printed instead.
    pub fn ctl_with_exit<T: DeserializeOwned>(
        &self,
        args: &[&str],
    ) -> Result<(i32, Result<T, CtlError>), Failure> {
        let socket = self.dir.join("admin.sock");
        tlshubctl(Some(&socket), args)
    }

    /// The core's Prometheus endpoint's text.
    pub fn metrics(&self) -> Result<String, Failure> {
        let port = if self.spec.name == "a" { 9464 } else { 9465 };
        metrics_at(port).map_err(|e| e.context(format!("metrics of node {}", self.spec.name)))
    }

    /// Stops the core with SIGSTOP until the guard is dropped (SIGCONT): it
    /// reads no event and beats no heartbeat meanwhile, while its programs
    /// keep gating.
    pub fn pause_core(&self) -> CorePaused<'_> {
        if let Some(c) = &self.core {
            c.signal(libc::SIGSTOP);
        }
        CorePaused(self)
    }

    /// Kills the core with SIGKILL (its programs stay pinned and attached).
    pub fn kill_core(&mut self) {
        if let Some(c) = self.core.as_mut() {
            c.signal(9);
            let _ = c.wait(Duration::from_secs(10));
        }
    }

    /// Starts the core again (after [`Node::kill_core`] or
    /// [`Node::stop_core`]); it adopts the pinned programs. Its log is
    /// `node-X-core-LABEL.log`.
    pub fn restart_core(&mut self, label: &str) -> Result<(), Failure> {
        self.core = Some(spawn_core(&self.spec, &self.dir, &format!("core-{label}"))?);
        Ok(())
    }

    /// Makes the rule's mode `mode` in the node's configuration and applies
    /// it with `tlshubctl policy reload`, as an operator finishing a
    /// rollout does.
    pub fn set_rule_mode(&mut self, mode: &'static str) -> Result<(), Failure> {
        let path = self.dir.join("core.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let was = format!("mode = \"{}\"", self.spec.rule_mode);
        if !text.contains(&was) {
            return Err(failed!("{} has no `{was}`", path.display()));
        }
        let text = text.replace(&was, &format!("mode = \"{mode}\""));
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        self.ctl::<pb::ReloadPolicyResponse>(&["policy", "reload"])?;
        self.spec.rule_mode = mode;
        Ok(())
    }

    /// Adds `port` to the rule's ports in the node's configuration and
    /// applies it with `tlshubctl policy reload`.
    pub fn select_port_too(&mut self, port: u16) -> Result<(), Failure> {
        let path = self.dir.join("core.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let ports = |also: &[u16]| {
            let also: String = also.iter().map(|p| format!(", {p}")).collect();
            format!("ports = [{PROTECTED_PORT}{also}]")
        };
        let was = ports(&self.spec.also_ports);
        if !text.contains(&was) {
            return Err(failed!("{} has no `{was}`", path.display()));
        }
        self.spec.also_ports.push(port);
        let text = text.replace(&was, &ports(&self.spec.also_ports));
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        self.ctl::<pb::ReloadPolicyResponse>(&["policy", "reload"])?;
        Ok(())
    }

    /// Runs `tlshub-core release [--detach]` for this node and returns its output.
    pub fn release(&self, detach: bool) -> Result<String, Failure> {
        release(self.spec.name, &self.dir, detach)
    }

    /// Stops the core (SIGTERM) and waits for its final stats.
    pub fn stop_core(&mut self) {
        if let Some(mut c) = self.core.take() {
            c.stop();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_core();
        // The programs outlive the core (pinned): remove them so the next
        // scenario starts from nothing.
        if let Err(e) = self.release(true) {
            eprintln!("node {}: {e}", self.spec.name);
        }
        for (_, p) in &mut self.providers {
            if let Some(mut p) = p.take() {
                p.stop();
            }
        }
        if let Some(mut s) = self.standin.take() {
            s.stop();
        }
    }
}

/// Starts a node's `tlshub-core` (log `/tmp/logs/node-N-LABEL.log`) and
/// waits until it runs.
fn spawn_core(spec: &NodeSpec, dir: &std::path::Path, label: &str) -> Result<Proc, Failure> {
    let (n, diagnostics) = (spec.name, spec.diagnostics);
    let log = PathBuf::from(format!("/tmp/logs/node-{n}-{label}.log"));
    let cfg = dir.join("core.toml").to_string_lossy().into_owned();
    let stats = dir.join("stats.json").to_string_lossy().into_owned();
    let keys = dir.join("keys.jsonl").to_string_lossy().into_owned();
    let mut argv = vec![];
    if diagnostics {
        argv.extend(["env", "RUST_LOG=info,tlshub_core::state=debug"]);
    }
    argv.extend(["tlshub-core", "--config", &cfg, "--stats-file", &stats]);
    if diagnostics {
        argv.extend(["--keylog-file", keys.as_str()]);
    }
    let argv = spec.command(&argv);
    let mut core = Proc::spawn(&format!("core-{n}"), None, &argv, &log)?;
    core.wait_for_log("capture-core running", Duration::from_secs(60))?;
    Ok(core)
}

/// `tlshub-core --config DIR/core.toml release [--detach]`.
fn release(n: &str, dir: &std::path::Path, detach: bool) -> Result<String, Failure> {
    let cfg = dir.join("core.toml");
    let cfg = cfg.to_string_lossy();
    let mut argv = vec!["tlshub-core", "--config", &cfg, "release"];
    if detach {
        argv.push("--detach");
    }
    super::process::run(None, &argv).map_err(|e| e.context(format!("node {n}: release failed")))
}

/// The key records in a core's key log at `path` (none when it is missing);
/// a line that does not parse is a failure of the test, not skipped.
pub fn read_keylog(path: &std::path::Path) -> Vec<KeyLogRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad key log line {l:?}: {e}", path.display()))
        })
        .collect()
}
