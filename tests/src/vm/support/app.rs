//! [`App`]: the options of one `tlshub-testapp` pair, as the scenarios
//! build them and as the app's command line takes them.

use crate::vm::topology::POD_B;

/// Options of one application pair.
#[derive(Debug, Clone)]
pub struct App {
    /// testapp --mode
    pub mode: &'static str,
    /// --size
    pub size: usize,
    /// --send
    pub send: &'static str,
    /// --recv
    pub recv: &'static str,
    /// --io
    pub io: &'static str,
    /// --connections
    pub connections: u32,
    /// Server port.
    pub port: u16,
    /// Server address (pod B, IPv4 or IPv6, or pod-a2).
    pub server: &'static str,
    /// The server's network namespace (`pod-b`, or `pod-a2` on node a).
    pub server_pod: &'static str,
    /// --via: how both ends get their socket (syscall or io-uring).
    pub via: &'static str,
    /// --handoff: how both ends hand each connection to another process
    /// (`none`, `fork`, `scm-rights`, `pidfd-getfd`).
    pub handoff: &'static str,
    /// Where the client connects instead of the server: a local proxy
    /// (host, port) that forwards to it.
    pub proxy: Option<(&'static str, u16)>,
    /// --reconnect (both ends): each client socket is connected,
    /// disconnected and connected again before its exchange.
    pub reconnect: bool,
    /// --ktls-fixed-key (both ends): kTLS with a fixed key, no agent.
    pub ktls_fixed_key: bool,
    /// --accept-delay-ms (server): wait before each accept().
    pub accept_delay_ms: u64,
    /// --defer-accept-s (server): `TCP_DEFER_ACCEPT` on the listener (0:
    /// off).
    pub defer_accept_s: u32,
    /// --parallel (both ends): all `connections` at once.
    pub parallel: bool,
    /// --mptcp (both ends): Multipath TCP, falling back to TCP on error.
    pub mptcp: bool,
    /// --smc (both ends): `AF_SMC` sockets.
    pub smc: bool,
    /// --smc-ulp (both ends): TCP sockets made SMC by `TCP_ULP`.
    pub smc_ulp: bool,
    /// An IPv4 server listens on `[::]` (a dual-stack `AF_INET6` socket,
    /// whose IPv4 connections have v4-mapped addresses), as Node.js and
    /// Java servers do by default.
    pub listen_dual_stack: bool,
    /// The client connects to an IPv4 server through its v4-mapped address
    /// (`[::ffff:10.0.2.2]`, an `AF_INET6` socket), as Java
    /// clients do by default.
    pub connect_v4_mapped: bool,
    /// How both ends are started: directly, as a container's main
    /// process, or under a debugging tool.
    pub launch: Launch,
}

/// How a scenario starts both ends of an [`App`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `tlshub-testapp` itself.
    Direct,
    /// As a container runtime starts a pod's main process: PID 1 of a pid
    /// namespace of its own, as uid and gid 65534 with no capabilities and
    /// `no_new_privs` (see [`CONTAINED`]).
    Contained,
    /// Under `strace -f` (every system call and signal, followed into
    /// threads), its trace written to [`Launch::trace_file`].
    Strace,
    /// Under `gdb` in batch mode, which passes `SIGSTOP` and `SIGCONT`
    /// to it without stopping ([`GDB`]).
    Gdb,
}

impl Launch {
    /// Where an app of `role` started [`Launch::Strace`] writes its trace.
    pub fn trace_file(role: &str) -> &'static str {
        if role == "server" {
            "/tmp/logs/strace-server.txt"
        } else {
            "/tmp/logs/strace-client.txt"
        }
    }
}

/// The command that starts an app [`Launch::Gdb`]: gdb runs it to its
/// end, passing the stop and continue signals on instead of stopping at
/// them (an operator who debugs an app on a protected node needs the same
/// two `handle` lines, or gdb stops at every hold; ARCHITECTURE.md, "The
/// gate").
pub const GDB: [&str; 13] = [
    "gdb",
    "-q",
    "-nx",
    "-batch",
    "-ex",
    "set startup-with-shell off",
    "-ex",
    "handle SIGSTOP nostop noprint pass",
    "-ex",
    "handle SIGCONT nostop noprint pass",
    "-ex",
    "run",
    "--args",
];

/// The command that starts an app [`Launch::Contained`]: `unshare` forks it
/// into a new pid namespace (so it is that namespace's PID 1, which
/// ignores signals it has no handler for unless the kernel sends them) and
/// kills it if `unshare` dies; `setpriv` drops root for uid and gid 65534
/// (the capabilities go with it) before it runs the app.
pub const CONTAINED: [&str; 10] = [
    "unshare",
    "--pid",
    "--fork",
    "--kill-child",
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--no-new-privs",
    "--",
];

impl App {
    /// One client-first exchange of `size` bytes with write/read, blocking.
    pub fn exchange(size: usize, port: u16) -> Self {
        Self {
            mode: "client-first",
            size,
            send: "write",
            recv: "read",
            io: "blocking",
            connections: 1,
            port,
            server: POD_B,
            server_pod: "pod-b",
            via: "syscall",
            handoff: "none",
            proxy: None,
            reconnect: false,
            ktls_fixed_key: false,
            accept_delay_ms: 0,
            defer_accept_s: 0,
            parallel: false,
            mptcp: false,
            smc: false,
            smc_ulp: false,
            listen_dual_stack: false,
            connect_v4_mapped: false,
            launch: Launch::Direct,
        }
    }

    /// The command line that starts this app's `role` (`server` or
    /// `client`), before its flags.
    pub fn program<'a>(&self, role: &'a str) -> Vec<&'a str> {
        let mut argv = match self.launch {
            Launch::Direct => Vec::new(),
            Launch::Contained => CONTAINED.to_vec(),
            Launch::Strace => vec!["strace", "-f", "-qq", "-o", Launch::trace_file(role)],
            Launch::Gdb => GDB.to_vec(),
        };
        argv.extend(["tlshub-testapp", role]);
        argv
    }

    /// The server's listen address (any, in the server's family) and the
    /// client's connect address.
    pub fn addresses(&self) -> (String, String) {
        let (listen, connect) = match self.server.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_ipv6() => (
                format!("[::]:{}", self.port),
                format!("[{ip}]:{}", self.port),
            ),
            _ => (
                if self.listen_dual_stack {
                    format!("[::]:{}", self.port)
                } else {
                    format!("0.0.0.0:{}", self.port)
                },
                if self.connect_v4_mapped {
                    format!("[::ffff:{}]:{}", self.server, self.port)
                } else {
                    format!("{}:{}", self.server, self.port)
                },
            ),
        };
        match self.proxy {
            Some((host, port)) => (listen, format!("{host}:{port}")),
            None => (listen, connect),
        }
    }

    /// The test app's flags for these options (both sides take the same).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--mode".into(),
            self.mode.into(),
            "--size".into(),
            self.size.to_string(),
            "--send".into(),
            self.send.into(),
            "--recv".into(),
            self.recv.into(),
            "--io".into(),
            self.io.into(),
            "--connections".into(),
            self.connections.to_string(),
            "--via".into(),
            self.via.into(),
            "--handoff".into(),
            self.handoff.into(),
        ];
        if self.accept_delay_ms > 0 {
            args.push("--accept-delay-ms".into());
            args.push(self.accept_delay_ms.to_string());
        }
        if self.defer_accept_s > 0 {
            args.push("--defer-accept-s".into());
            args.push(self.defer_accept_s.to_string());
        }
        let switches = [
            (self.reconnect, "--reconnect"),
            (self.ktls_fixed_key, "--ktls-fixed-key"),
            (self.parallel, "--parallel"),
            (self.mptcp, "--mptcp"),
            (self.smc, "--smc"),
            (self.smc_ulp, "--smc-ulp"),
        ];
        args.extend(
            switches
                .into_iter()
                .filter(|&(on, _)| on)
                .map(|(_, flag)| flag.to_string()),
        );
        args
    }
}
