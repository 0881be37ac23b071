//! One test body per behaviour of [`HandshakeProvider`], run against every
//! [`TlsLibrary`]: a library crate's tests call
//! [`tls_library_tests!`](crate::tls_library_tests) with its library type,
//! as rustls runs one API test body per crypto provider. Certificates come
//! from the `openssl` command (not a library, so the BoringSSL tests do not
//! link OpenSSL).
#![expect(
    clippy::unwrap_used,
    reason = "test bodies: a failure panics, with the value, in the calling test"
)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{HandshakeProvider, TlsLibrary};
use crate::handshake_config::TlsSection;
use crate::{CipherSuite, ConnectionKeys, KeyRequest, ProviderError, Role, SocketHandle};

/// A throwaway PKI in a temporary directory: a cluster CA, node
/// certificates it signs, and a second ("rogue") CA. Removed on drop.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    /// Makes the directory and both CAs.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tlshub-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        pki.ca("ca");
        pki.ca("rogue-ca");
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl command (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new EC P-256 private key in `file`.
    fn p256_key(&self, file: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            file,
        ]);
    }

    fn ca(&self, name: &str) {
        let key = format!("{name}.key");
        self.p256_key(&key);
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN=tlshub test {name}"),
            "-days",
            "1",
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// `[tls]` for node `name` with a certificate signed by the cluster CA
    /// (or by the rogue CA when `rogue`), offering `suites`.
    pub fn node(&self, name: &str, rogue: bool, suites: &[&str]) -> TlsSection {
        let ca = if rogue { "rogue-ca" } else { "ca" };
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        self.p256_key(&key);
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &csr,
        ]);
        std::fs::write(
            self.dir.join(&ext),
            format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        TlsSection {
            // Every node trusts the cluster CA, the rogue one too: only its
            // own certificate is from elsewhere.
            ca: self.path("ca.pem"),
            cert: self.path(&cert),
            key: self.path(&key),
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            groups: vec!["X25519".into()],
            expiry_warning_days: 30,
            node_map: None,
            handshakes_in_flight: None,
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The three suites kTLS installs, with their IANA names.
const SUITES: [(&str, CipherSuite); 3] = [
    ("TLS_AES_128_GCM_SHA256", CipherSuite::Aes128Gcm),
    ("TLS_AES_256_GCM_SHA384", CipherSuite::Aes256Gcm),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::Chacha20Poly1305,
    ),
];

fn request(role: Role, fd: i32, timeout: Duration) -> KeyRequest {
    KeyRequest {
        socket_cookie: 1,
        role,
        local: "127.0.0.1:1".parse().unwrap(),
        remote: "127.0.0.1:2".parse().unwrap(),
        local_isn: 0,
        remote_isn: 0,
        node_name: "n".into(),
        socket: Some(SocketHandle {
            pid: std::process::id(),
            fd,
        }),
        timeout,
    }
}

type Pair = (
    Result<ConnectionKeys, ProviderError>,
    Result<ConnectionKeys, ProviderError>,
);

/// A fresh loopback connection: (client end, server end).
fn loopback() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// Handshakes `client` against `server` over a fresh loopback connection,
/// the client's socket non-blocking like an epoll application's.
fn run_pair<L: TlsLibrary>(client: &HandshakeProvider<L>, server: &HandshakeProvider<L>) -> Pair {
    let (c, s) = loopback();
    c.set_nonblocking(true).unwrap();
    let timeout = Duration::from_secs(5);
    std::thread::scope(|scope| {
        let cr = scope.spawn(|| client.handshake(&request(Role::Client, c.as_raw_fd(), timeout)));
        let sr = server.handshake(&request(Role::Server, s.as_raw_fd(), timeout));
        (cr.join().unwrap(), sr)
    })
}

fn assert_matching(pair: Pair) -> ConnectionKeys {
    let (c, s) = (pair.0.unwrap(), pair.1.unwrap());
    assert_eq!(c.cipher_suite, s.cipher_suite);
    assert_eq!(c.transmit, s.receive);
    assert_eq!(c.receive, s.transmit);
    assert_ne!(c.transmit, c.receive);
    c.validate().unwrap();
    c
}

/// Two nodes with every suite agree on keys, and a second connection gets
/// fresh ones. Each suite alone: a library that selects TLS 1.3 suites
/// negotiates it; one that cannot either happens to negotiate it or is
/// refused by the driver, never installed with another suite.
pub fn two_nodes_derive_matching_keys<L: TlsLibrary>() {
    let pki = TestPki::new(&format!("{}-keys", L::NAME));
    let all = SUITES.map(|(n, _)| n);
    let a = HandshakeProvider::<L>::new(&pki.node("node-a", false, &all)).unwrap();
    let b = HandshakeProvider::<L>::new(&pki.node("node-b", false, &all)).unwrap();
    let first = assert_matching(run_pair(&a, &b));
    let second = assert_matching(run_pair(&a, &b));
    assert_ne!(first.transmit, second.transmit);
    let mut refused = 0;
    for (name, suite) in SUITES {
        let a = HandshakeProvider::<L>::new(&pki.node("node-a", false, &[name])).unwrap();
        let b = HandshakeProvider::<L>::new(&pki.node("node-b", false, &[name])).unwrap();
        match run_pair(&a, &b) {
            (Ok(c), Ok(s)) => {
                assert_eq!(c.cipher_suite, suite, "{name}");
                assert_matching((Ok(c), Ok(s)));
            }
            (Err(ProviderError::Handshake { reason }), _) if !L::SELECTS_TLS13_SUITES => {
                assert!(reason.contains("does not accept"), "{name}: {reason}");
                refused += 1;
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // A library that cannot select negotiates its own preference every
    // time, so each configuration but one is refused.
    let want = if L::SELECTS_TLS13_SUITES {
        0
    } else {
        SUITES.len() - 1
    };
    assert_eq!(refused, want);
}

/// A node whose certificate another CA signed (and which itself trusts the
/// cluster CA) is refused by the node that verifies it, as an
/// authentication failure, whichever side it is on. The rogue side itself
/// may finish its handshake; its peer's refusal makes the core reset the
/// connection.
pub fn a_node_from_another_ca_is_refused<L: TlsLibrary>() {
    let pki = TestPki::new(&format!("{}-rogue", L::NAME));
    let suites = ["TLS_AES_128_GCM_SHA256"];
    let a = HandshakeProvider::<L>::new(&pki.node("node-a", false, &suites)).unwrap();
    let rogue = HandshakeProvider::<L>::new(&pki.node("rogue", true, &suites)).unwrap();
    let (_, server) = run_pair(&rogue, &a);
    let (client, _) = run_pair(&a, &rogue);
    for (side, result) in [("server", server), ("client", client)] {
        match result {
            Err(ProviderError::PeerAuthentication { .. }) => {}
            other => panic!("node a as {side}: {other:?}"),
        }
    }
}

/// Files replaced while the provider runs. A broken certificate is refused
/// once (and not reported again while it stays), and the old files keep
/// serving handshakes. A certificate and key from another CA are taken:
/// new handshakes use them, so the peer refuses them. The credential is
/// always the loaded certificate's notAfter, and a forced reload
/// (`SIGHUP`) reloads unchanged files.
pub fn changed_files_are_reloaded_and_broken_ones_refused<L: TlsLibrary>() {
    use super::Reload;
    use super::files::certificate_credential;
    let pki = TestPki::new(&format!("{}-reload", L::NAME));
    let suites = ["TLS_AES_128_GCM_SHA256"];
    let tls_a = pki.node("node-a", false, &suites);
    let a = HandshakeProvider::<L>::new(&tls_a).unwrap();
    let b = HandshakeProvider::<L>::new(&pki.node("node-b", false, &suites)).unwrap();
    assert_eq!(a.reload(false), Reload::Unchanged);
    let first = certificate_credential(&tls_a.cert).unwrap();
    assert_eq!(a.credential(), first);
    assert_eq!(crate::Provider::info(&a).credentials, vec![first.clone()]);

    std::fs::write(&tls_a.cert, b"not a certificate").unwrap();
    assert!(matches!(a.reload(false), Reload::Refused(_)));
    assert_eq!(a.reload(false), Reload::StillRefused);
    assert_eq!(a.credential(), first);
    assert_matching(run_pair(&a, &b));

    pki.node("node-a", true, &suites);
    assert_eq!(a.reload(false), Reload::Reloaded);
    assert_eq!(a.credential(), certificate_credential(&tls_a.cert).unwrap());
    match run_pair(&a, &b).1 {
        Err(ProviderError::PeerAuthentication { .. }) => {}
        other => panic!("node b must refuse node a's new certificate: {other:?}"),
    }
    assert_eq!(a.reload(false), Reload::Unchanged);
    assert_eq!(a.reload(true), Reload::Reloaded);
}

/// With a node map, the peer's certificate must name the node that owns
/// the peer's address (every request here comes from 127.0.0.1, which the
/// map gives to node b): node b is accepted, node c (a valid certificate
/// of the same CA) is refused, the reason naming both nodes, and an
/// address in no node's CIDRs is refused too.
pub fn a_peer_must_be_the_node_of_its_address<L: TlsLibrary>() {
    let pki = TestPki::new(&format!("{}-nodes", L::NAME));
    let suites = ["TLS_AES_128_GCM_SHA256"];
    let map = pki.dir().join("nodes.toml");
    std::fs::write(
        &map,
        "[[node]]\nname = \"node-b\"\npod_cidrs = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let mut tls_a = pki.node("node-a", false, &suites);
    tls_a.node_map = Some(map.clone());
    let a = HandshakeProvider::<L>::new(&tls_a).unwrap();
    let b = HandshakeProvider::<L>::new(&pki.node("node-b", false, &suites)).unwrap();
    let c = HandshakeProvider::<L>::new(&pki.node("node-c", false, &suites)).unwrap();
    assert_matching(run_pair(&a, &b));
    assert_matching(run_pair(&b, &a));
    for (side, result) in [
        ("client", run_pair(&a, &c).0),
        ("server", run_pair(&c, &a).1),
    ] {
        match result {
            Err(ProviderError::PeerAuthentication { reason }) => assert!(
                reason.contains("node-c") && reason.contains("node-b"),
                "node a as {side}: {reason}"
            ),
            other => panic!("node a as {side} must refuse node c: {other:?}"),
        }
    }
    std::fs::write(
        &map,
        "[[node]]\nname = \"node-b\"\npod_cidrs = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    assert_eq!(a.reload(false), super::Reload::Reloaded);
    match run_pair(&a, &b).0 {
        Err(ProviderError::PeerAuthentication { reason }) => {
            assert!(reason.contains("no node"), "{reason}")
        }
        other => panic!("an address of no node must be refused: {other:?}"),
    }
}

/// A peer that sends nothing: a timeout at the request's timeout (within
/// the margin the core waits beyond it, at least 200 ms) that says the
/// peer's node runs a key-only provider or no tlshub.
pub fn a_silent_peer_times_out<L: TlsLibrary>() {
    let pki = TestPki::new(&format!("{}-silent", L::NAME));
    let a = HandshakeProvider::<L>::new(&pki.node("node-a", false, &["TLS_AES_128_GCM_SHA256"]))
        .unwrap();
    let (c, _s) = loopback();
    let timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let e = a
        .handshake(&request(Role::Client, c.as_raw_fd(), timeout))
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(200),
        "{took:?}"
    );
    match e {
        ProviderError::Timeout { waiting_for, .. } => {
            assert!(waiting_for.contains("sent nothing"), "{waiting_for}")
        }
        other => panic!("{other}"),
    }
}

/// `handshakes_in_flight = 1`: one slot for connecting sides, taken
/// through `keys` as the SDK calls it. A connecting side whose peer never
/// answers takes it first and gives it back at the stall threshold (a
/// quarter of its 4 s), long before its deadline. Accepting sides whose
/// peers have sent nothing wait for the ClientHello holding neither a slot
/// nor a thread. So neither holds up 8 connections at once both of whose
/// ends this node keys (two pods of one node); and since accepting sides
/// take no slot, a connecting side that holds the only one while its own
/// accepting side works never waits for itself. The silent ones then fail
/// at their deadline, naming the silent peer.
pub fn one_slot_serves_both_ends_past_silent_peers<L: TlsLibrary>() {
    use crate::Provider;
    let pki = TestPki::new(&format!("{}-slots", L::NAME));
    let mut tls = pki.node("node-a", false, &["TLS_AES_128_GCM_SHA256"]);
    tls.handshakes_in_flight = Some(std::num::NonZeroUsize::MIN);
    let a = HandshakeProvider::<L>::new(&tls).unwrap();
    let runtime = crate::server::provider_runtime().unwrap();
    let silent_budget = Duration::from_secs(4);
    let silent_client = loopback();
    let silent: Vec<_> = (0..6).map(|_| loopback()).collect();
    let pairs: Vec<_> = (0..8)
        .map(|_| {
            let (c, s) = loopback();
            c.set_nonblocking(true).unwrap();
            (c, s)
        })
        .collect();
    let started = std::time::Instant::now();
    let (busy_done, silent_results) = runtime.block_on(async {
        let (ac, rc) = (
            a.clone(),
            request(Role::Client, silent_client.0.as_raw_fd(), silent_budget),
        );
        let mut waiting = vec![tokio::spawn(async move { ac.keys(rc).await })];
        // The silent connecting side takes the slot first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiting.extend(silent.iter().map(|(_, s)| {
            let (a, r) = (
                a.clone(),
                request(Role::Server, s.as_raw_fd(), silent_budget),
            );
            tokio::spawn(async move { a.keys(r).await })
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let keyed: Vec<_> = pairs
            .iter()
            .map(|(c, s)| {
                let timeout = Duration::from_secs(3);
                let (ac, as_) = (a.clone(), a.clone());
                let (rc, rs) = (
                    request(Role::Client, c.as_raw_fd(), timeout),
                    request(Role::Server, s.as_raw_fd(), timeout),
                );
                (
                    tokio::spawn(async move { ac.keys(rc).await }),
                    tokio::spawn(async move { as_.keys(rs).await }),
                )
            })
            .collect();
        for (c, s) in keyed {
            assert_matching((c.await.unwrap(), s.await.unwrap()));
        }
        let busy_done = started.elapsed();
        let mut results = Vec::new();
        for w in waiting {
            results.push(w.await.unwrap());
        }
        (busy_done, results)
    });
    assert!(
        busy_done < silent_budget,
        "the 8 connections took {busy_done:?}, as long as the silent peers' budget"
    );
    for r in silent_results {
        match r {
            Err(ProviderError::Timeout { waiting_for, .. }) => {
                assert!(waiting_for.contains("sent nothing"), "{waiting_for}")
            }
            other => panic!("a silent peer's accepting side: {other:?}"),
        }
    }
    let text = metrics_text(&a);
    let metric = |name: &str| sample(&text, &format!("tlshub_keyprovider_handshake_slot_{name}"));
    assert_eq!(metric("waiting"), Some(0.0), "{text}");
    assert_eq!(metric("timeouts_total"), Some(0.0), "{text}");
    assert_eq!(metric("in_flight"), Some(0.0), "{text}");
    // The silent one, and at most a couple that a loaded host slowed.
    assert!(
        metric("stalls_total").is_some_and(|n| (1.0..4.0).contains(&n)),
        "{text}"
    );
}

/// Quick handshakes through `keys` raise the in-flight limit above its
/// floor of one per CPU (`keys` reports each connecting side's whole time
/// to the admission), up to `handshakes_in_flight`.
pub fn quick_handshakes_raise_the_in_flight_limit<L: TlsLibrary>() {
    use crate::Provider;
    let cpus = std::thread::available_parallelism().unwrap().get();
    let pki = TestPki::new(&format!("{}-limit", L::NAME));
    let mut tls = pki.node("node-a", false, &["TLS_AES_128_GCM_SHA256"]);
    tls.handshakes_in_flight = std::num::NonZeroUsize::new(cpus + 1);
    let a = HandshakeProvider::<L>::new(&tls).unwrap();
    let limit = || sample(&metrics_text(&a), "tlshub_keyprovider_handshake_slot_limit");
    assert_eq!(limit(), Some(cpus as f64));
    let runtime = crate::server::provider_runtime().unwrap();
    // +1/limit per quick handshake: `cpus + 2` of them add more than one.
    for _ in 0..cpus + 2 {
        let (c, s) = loopback();
        c.set_nonblocking(true).unwrap();
        // Quick means within an eighth of the budget: 3.75 s here.
        let timeout = Duration::from_secs(30);
        let (ac, as_) = (a.clone(), a.clone());
        let (rc, rs) = (
            request(Role::Client, c.as_raw_fd(), timeout),
            request(Role::Server, s.as_raw_fd(), timeout),
        );
        let pair = runtime.block_on(async move {
            let c = tokio::spawn(async move { ac.keys(rc).await });
            let s = tokio::spawn(async move { as_.keys(rs).await });
            (c.await.unwrap(), s.await.unwrap())
        });
        assert_matching(pair);
    }
    assert_eq!(limit(), Some((cpus + 1) as f64), "never past the most");
}

/// A peer whose node runs a key-only provider sends an encrypted record
/// where a handshake was due: the error names that.
pub fn a_key_only_peer_is_named<L: TlsLibrary>() {
    use std::io::Write;
    let pki = TestPki::new(&format!("{}-keyonly", L::NAME));
    let b = HandshakeProvider::<L>::new(&pki.node("node-b", false, &["TLS_AES_128_GCM_SHA256"]))
        .unwrap();
    let (mut c, s) = loopback();
    // An application-data record, as kTLS with keys from elsewhere sends.
    c.write_all(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let e = b
        .handshake(&request(
            Role::Server,
            s.as_raw_fd(),
            Duration::from_secs(5),
        ))
        .unwrap_err();
    match e {
        ProviderError::Handshake { reason } => {
            assert!(reason.contains("key-only provider"), "{reason}")
        }
        other => panic!("{other}"),
    }
}

/// The provider binary at `binary` (`env!("CARGO_BIN_EXE_...")` in a
/// provider's integration test) refuses bad configuration with exit code 2
/// and a message naming the file and what is wrong: an unknown key (with
/// its line), a missing file, a suite kTLS cannot take.
pub fn bad_configuration_exits_2(binary: &str) {
    let dir = TestPki::new("cli");
    let run_with = |name: &str, config: &str| {
        let path = dir.dir().join(name);
        std::fs::write(&path, config).unwrap();
        let out = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text) = run_with(
        "a.toml",
        "[tls]\nca = \"/x\"\ncert = \"/y\"\nkey = \"/z\"\ngroup = [\"X25519\"]\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("a.toml")
            && text.contains("line 5")
            && text.contains("unknown field `group`"),
        "{text}"
    );
    let (code, text) = run_with(
        "b.toml",
        "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/y\"\nkey = \"/z\"\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("b.toml") && text.contains("/nonexistent/ca.pem"),
        "{text}"
    );
    let (code, text) = run_with(
        "c.toml",
        "[tls]\nca = \"/x\"\ncert = \"/y\"\nkey = \"/z\"\ncipher_suites = [\"TLS_AES_128_CCM_8_SHA256\"]\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("TLS_AES_128_CCM_8_SHA256"), "{text}");
}

/// What `provider` registers, encoded as its metrics endpoint serves it
/// (with the `tlshub_keyprovider_` prefix).
fn metrics_text<L: TlsLibrary>(provider: &HandshakeProvider<L>) -> String {
    use crate::Provider;
    let mut registry = prometheus_client::registry::Registry::with_prefix("tlshub_keyprovider");
    provider.register_metrics(&mut registry);
    crate::metrics::encode(&registry)
}

/// One sample's value in OpenMetrics text (`name{labels}`), if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn node_pair_request(role: Role, local: &str, remote: &str, isns: (u32, u32)) -> KeyRequest {
    KeyRequest {
        socket_cookie: 1,
        role,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        local_isn: isns.0,
        remote_isn: isns.1,
        node_name: "n".into(),
        socket: None,
        timeout: Duration::from_secs(5),
    }
}

/// Node-pair mode between two providers on loopback (node a at
/// 127.0.0.1, node b at 127.0.0.2, their pods in 127.0.1.0/24 and
/// 127.0.2.0/24): both ends of a connection get matching keys with no
/// socket, either way and in either order of the two requests, while the
/// session is replaced every 2 s (three generations at least); keys
/// change with the generation; two
/// pods of one node are keyed too; an address of no node is refused.
pub fn node_pair_sessions_key_both_ways_across_rotations<L: TlsLibrary>() {
    use crate::Provider;
    let bed = NodePairBed::<L>::new("node-pair", 2);
    let (a, b) = (&bed.a, &bed.b);
    let info = a.info();
    assert!(!info.needs_socket);
    assert_eq!(info.keying, crate::KEYING_TLS13_NODE_PAIR);
    bed.runtime.block_on(async {
        a.start().await.unwrap();
        b.start().await.unwrap();
        let first = keyed_pair(a, b, "127.0.1.5:40000", "127.0.2.5:8443", (7, 9), false).await;
        // Five seconds of connections both ways, through two replacements.
        let start = std::time::Instant::now();
        let mut n = 0u32;
        let mut seen = std::collections::HashSet::new();
        while start.elapsed() < Duration::from_secs(5) {
            seen.extend(a.node_pair().unwrap().generations("node-b"));
            n += 1;
            let port = 1024 + (n % 60_000) as u16;
            keyed_pair(
                a,
                b,
                &format!("127.0.1.5:{port}"),
                "127.0.2.5:8443",
                (n, !n),
                n.is_multiple_of(2),
            )
            .await;
            keyed_pair(
                b,
                a,
                &format!("127.0.2.6:{port}"),
                "127.0.1.6:80",
                (!n, n),
                n.is_multiple_of(3),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(n > 20, "{n} rounds");
        assert!(seen.len() >= 3, "{} generations in 5 s", seen.len());
        // The first connection's identity, keyed again by its client now:
        // a later generation, other keys.
        let again = a
            .keys(node_pair_request(
                Role::Client,
                "127.0.1.5:40000",
                "127.0.2.5:8443",
                (7, 9),
            ))
            .await
            .unwrap();
        assert_ne!(first.transmit, again.transmit, "a new generation, new keys");
        // What an operator sees: one or two generations held with node b
        // (two while a replacement drains), and every session counted.
        let (gauge, sessions) = node_pair_metrics(a, "node-b");
        assert!(
            matches!(gauge, Some(1.0 | 2.0)) && sessions.is_some_and(|n| n >= 3.0),
            "{gauge:?} {sessions:?}"
        );
        // The same in the provider's info (`tlshubctl status`): exactly one
        // of the two dials, and only it knows when the session is renewed
        // (its lifetime, 2 s, after it came up).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let (in_a, in_b) = (a.info().peer_sessions, b.info().peer_sessions);
        let mut dialers = 0;
        for (list, peer) in [(&in_a, "node-b"), (&in_b, "node-a")] {
            let [s] = list.as_slice() else {
                panic!("one peer each: {list:?}")
            };
            assert_eq!(s.peer, peer, "{s:?}");
            assert!(matches!(s.generations, 1 | 2), "{s:?}");
            assert!(s.sessions_total >= 3, "{s:?}");
            assert!((now - 3..=now).contains(&s.up_since_unix_seconds), "{s:?}");
            assert!(
                s.last_error.is_empty() && s.last_error_unix_seconds == 0,
                "{s:?}"
            );
            if s.renew_at_unix_seconds != 0 {
                dialers += 1;
                assert_eq!(
                    s.renew_at_unix_seconds - s.up_since_unix_seconds,
                    2,
                    "{s:?}"
                );
            }
        }
        assert_eq!(dialers, 1, "{in_a:?} {in_b:?}");
        // Read after the metric, so never fewer.
        assert!(
            sessions.is_some_and(|m| in_a[0].sessions_total as f64 >= m),
            "the info counts what the metric does: {in_a:?} {sessions:?}"
        );
        // Two pods of node a.
        keyed_pair(a, a, "127.0.1.5:40001", "127.0.1.7:8443", (1, 2), false).await;
        match a
            .keys(node_pair_request(
                Role::Client,
                "127.0.1.5:1",
                "192.0.2.1:80",
                (1, 2),
            ))
            .await
        {
            Err(ProviderError::PeerAuthentication { reason }) => {
                assert!(reason.contains("no node"), "{reason}")
            }
            other => panic!("an address of no node must be refused: {other:?}"),
        }
    });
}

/// A replacement that cannot be set up (node b now presents node c's
/// certificate, valid but not node b's) leaves the session there: for
/// three lifetimes of failed dials, connections both ways are still keyed
/// from it and one generation stays held; with node b's certificate back,
/// the next replacement succeeds.
pub fn node_pair_failed_replacement_keeps_the_session<L: TlsLibrary>() {
    use crate::Provider;
    let bed = NodePairBed::<L>::new("node-pair-failing", 1);
    let (a, b) = (&bed.a, &bed.b);
    let node_c = bed.pki.node("node-c", false, &["TLS_AES_128_GCM_SHA256"]);
    bed.runtime.block_on(async {
        a.start().await.unwrap();
        b.start().await.unwrap();
        keyed_pair(a, b, "127.0.1.5:1000", "127.0.2.5:8443", (1, 2), false).await;
        let (_, before) = node_pair_metrics(a, "node-b");
        // Node c's files where node b's are, picked up by b's next reload.
        let own = (bed.b_tls.cert.clone(), bed.b_tls.key.clone());
        let saved = (
            std::fs::read(&own.0).unwrap(),
            std::fs::read(&own.1).unwrap(),
        );
        std::fs::copy(&node_c.key, &own.1).unwrap();
        std::fs::copy(&node_c.cert, &own.0).unwrap();
        assert_eq!(b.reload(true), super::Reload::Reloaded);
        for n in 0..30u32 {
            keyed_pair(
                a,
                b,
                &format!("127.0.1.5:{}", 2000 + n),
                "127.0.2.5:8443",
                (n, !n),
                false,
            )
            .await;
            keyed_pair(
                b,
                a,
                &format!("127.0.2.5:{}", 2000 + n),
                "127.0.1.5:8443",
                (!n, n),
                true,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (gauge, during) = node_pair_metrics(a, "node-b");
        assert_eq!(
            (gauge, during),
            (Some(1.0), before),
            "no replacement while they fail"
        );
        // The dialer shows why, with the session still up.
        let [shown] = a.info().peer_sessions.try_into().unwrap();
        assert!(
            shown.generations == 1
                && !shown.last_error.is_empty()
                && shown.last_error_unix_seconds >= shown.up_since_unix_seconds,
            "{shown:?}"
        );
        std::fs::write(&own.1, &saved.1).unwrap();
        std::fs::write(&own.0, &saved.0).unwrap();
        assert_eq!(b.reload(true), super::Reload::Reloaded);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while node_pair_metrics(a, "node-b").1 == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no new session with node b's certificate back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        keyed_pair(a, b, "127.0.1.5:3000", "127.0.2.5:8443", (3, 4), true).await;
    });
}

/// Two node-pair providers on loopback: node a at 127.0.0.1, node b at
/// 127.0.0.2, their pods in 127.0.1.0/24 and 127.0.2.0/24, sessions
/// replaced every `lifetime` seconds (1 s drain).
struct NodePairBed<L: TlsLibrary> {
    a: HandshakeProvider<L>,
    b: HandshakeProvider<L>,
    b_tls: TlsSection,
    runtime: tokio::runtime::Runtime,
    pki: TestPki,
}

impl<L: TlsLibrary> NodePairBed<L> {
    fn new(tag: &str, lifetime: u64) -> Self {
        use super::node_pair::NodePairSection;
        let pki = TestPki::new(&format!("{}-{tag}", L::NAME));
        let map = pki.dir().join("nodes.toml");
        std::fs::write(
            &map,
            "[[node]]\nname = \"node-a\"\naddress = \"127.0.0.1\"\npod_cidrs = [\"127.0.1.0/24\"]\n\
             [[node]]\nname = \"node-b\"\naddress = \"127.0.0.2\"\npod_cidrs = [\"127.0.2.0/24\"]\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tls_of = |name: &str| {
            let mut tls = pki.node(name, false, &["TLS_AES_128_GCM_SHA256"]);
            tls.node_map = Some(map.clone());
            tls
        };
        let provider = |tls: &TlsSection, ip: &str| {
            let section = NodePairSection {
                listen: format!("{ip}:{port}").parse().unwrap(),
                port,
                lifetime_seconds: lifetime,
                drain_seconds: 1,
            };
            HandshakeProvider::<L>::with_keying(tls, Some(section)).unwrap()
        };
        let (a_tls, b_tls) = (tls_of("node-a"), tls_of("node-b"));
        Self {
            a: provider(&a_tls, "127.0.0.1"),
            b: provider(&b_tls, "127.0.0.2"),
            b_tls,
            runtime: crate::server::provider_runtime().unwrap(),
            pki,
        }
    }
}

/// `client` and `server` key one connection from `from` to `to` (both
/// requests at once, the server's first if `server_first`); the keys
/// must match.
async fn keyed_pair<L: TlsLibrary>(
    client: &HandshakeProvider<L>,
    server: &HandshakeProvider<L>,
    from: &str,
    to: &str,
    isns: (u32, u32),
    server_first: bool,
) -> ConnectionKeys {
    use crate::Provider;
    let c = node_pair_request(Role::Client, from, to, isns);
    let s = node_pair_request(Role::Server, to, from, (isns.1, isns.0));
    let (client, server) = (client.clone(), server.clone());
    let (c, s) = if server_first {
        let s = tokio::spawn(async move { server.keys(s).await });
        tokio::task::yield_now().await;
        let c = client.keys(c).await;
        (c, s.await.unwrap())
    } else {
        let c = tokio::spawn(async move { client.keys(c).await });
        let s = server.keys(s).await;
        (c.await.unwrap(), s)
    };
    assert_matching((c, s))
}

/// `node_pair_generations` and `node_pair_sessions_total` of `provider`
/// for `peer`, from its registered metrics.
fn node_pair_metrics<L: TlsLibrary>(
    provider: &HandshakeProvider<L>,
    peer: &str,
) -> (Option<f64>, Option<f64>) {
    let text = metrics_text(provider);
    (
        sample(
            &text,
            &format!("tlshub_keyprovider_node_pair_generations{{peer=\"{peer}\"}}"),
        ),
        sample(
            &text,
            &format!("tlshub_keyprovider_node_pair_sessions_total{{peer=\"{peer}\"}}"),
        ),
    )
}

/// The test functions of this module, as `#[test]`s for the
/// [`TlsLibrary`] `$library`.
#[macro_export]
macro_rules! tls_library_tests {
    ($library:ty) => {
        $crate::tls_library_tests!(
            $library:
            two_nodes_derive_matching_keys,
            a_node_from_another_ca_is_refused,
            changed_files_are_reloaded_and_broken_ones_refused,
            a_peer_must_be_the_node_of_its_address,
            a_silent_peer_times_out,
            a_key_only_peer_is_named,
            one_slot_serves_both_ends_past_silent_peers,
            quick_handshakes_raise_the_in_flight_limit,
            node_pair_sessions_key_both_ways_across_rotations,
            node_pair_failed_replacement_keeps_the_session
        );
    };
    ($library:ty: $($name:ident),+) => {
        $(
            #[test]
            fn $name() {
                $crate::handshake::library_tests::$name::<$library>();
            }
        )+
    };
}
