//! `tlshub-testapp`: an ordinary TCP client/server that knows nothing about
//! tlshub. It writes immediately after connect()/accept(), moves a seeded
//! byte pattern with the chosen system calls and verifies every byte it
//! receives. One JSON line on stdout says what happened.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tlshub_vm_tests::app_io::{
    self, Conn, FastOpen, IoMode, RecvMethod, SendMethod, SmcSocket, Via,
};
use tlshub_vm_tests::app_report::{AppReport, AppRole, FastOpenOutcome, MptcpOutcome};
use tlshub_vm_tests::pattern;

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    side: Side,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// The client sends `size` bytes, then the server sends `size` bytes.
    ClientFirst,
    /// The server sends `size` bytes right after accept(), then the client.
    ServerFirst,
    /// The client sends one byte, the server echoes it (setup latency).
    Echo,
    /// The client sends `size` bytes, the server answers one byte (throughput).
    Throughput,
    /// `size` transactions on the one connection: the client sends one
    /// byte, the server echoes it, the client waits for it before the next
    /// (netperf's TCP_RR with one-byte messages).
    Rr,
    /// The client closes right after connect() (churn; nothing is sent).
    CloseEarly,
    /// The client sends `size` bytes and half-closes at once
    /// (`shutdown(SHUT_WR)`, like `nc -N` or an HTTP/1.0 client); the
    /// server reads to EOF, then answers `size` bytes, half-closes too
    /// and closes.
    HalfClose,
    /// The client writes until its socket is full (one blocking write,
    /// then non-blocking ones until none is possible for a second) and
    /// half-closes, timing the `shutdown()`; the server reads nothing for
    /// 12 s, then reads to the end without checking (a peer that stops
    /// reading).
    FillHalfClose,
}

#[derive(Debug, clap::Args)]
struct Common {
    #[arg(long, value_enum, default_value = "client-first")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    connections: u32,
    #[arg(long, default_value_t = 1)]
    size: usize,
    #[arg(long, value_enum, default_value = "write")]
    send: SendMethod,
    #[arg(long, value_enum, default_value = "read")]
    recv: RecvMethod,
    #[arg(long, value_enum, default_value = "blocking")]
    io: IoMode,
    /// Set SO_SNDBUF to this before connecting (client) or on the listener
    /// (server; accepted sockets inherit it), as an application that sizes
    /// its own buffer does.
    #[arg(long)]
    sndbuf: Option<usize>,
    /// How the connected socket is obtained (connect/accept or io_uring).
    #[arg(long, value_enum, default_value = "syscall")]
    via: Via,
    /// Hand each connection to another process that moves the bytes (see
    /// `Handoff`), while the process that connected or accepted closes its
    /// copy.
    #[arg(long, value_enum, default_value = "none")]
    handoff: app_io::Handoff,
    /// Client: send the first bytes with TCP Fast Open (client-first mode);
    /// a send refused with EOPNOTSUPP falls back to connect() and send().
    #[arg(long, value_enum, default_value = "off")]
    fastopen: FastOpen,
    /// Client: after the exchange, call connect() this many times more on
    /// the connected socket (each fails with EISCONN), as a hostile app
    /// flooding the node's event path would.
    #[arg(long, default_value_t = 0)]
    connect_again: u32,
    /// Client: connect, disconnect at once with `connect(AF_UNSPEC)` (the
    /// keys of that first connection are still being made) and connect
    /// the same socket again, then run the exchange on it. An attempt that
    /// fails cleanly (an I/O error, not wrong bytes) is counted and tried
    /// again, up to three times `connections` in all. Server: serve every
    /// connection that comes until none has come for 5 s, counting those
    /// that fail (the disconnected first ones).
    #[arg(long)]
    reconnect: bool,
    /// Install kTLS with a fixed key on each connection before its
    /// exchange (both ends must): kTLS with no agent and no handshake, the
    /// benchmark's data-path ceiling.
    #[arg(long)]
    ktls_fixed_key: bool,
    /// Server (one connection after another): wait this long before each
    /// `accept()`, as a busy server whose accept queue holds connections
    /// does. The client ignores it.
    #[arg(long, default_value_t = 0)]
    accept_delay_ms: u64,
    /// Server: `TCP_DEFER_ACCEPT` of this many seconds on the listener, as
    /// nginx's `listen ... deferred` sets it: the kernel completes a
    /// connection (and `accept()` returns it) only once its first data
    /// has arrived. The client ignores it.
    #[arg(long, default_value_t = 0)]
    defer_accept_s: u32,
    /// Server: `SO_REUSEPORT` on the listener, so that several servers
    /// share the port (nginx's `reuseport`, Envoy's hot restart). The
    /// client ignores it.
    #[arg(long)]
    reuseport: bool,
    /// All `connections` at once, each on its own thread (the server
    /// accepts the next at once); otherwise one after another.
    #[arg(long)]
    parallel: bool,
    /// Listen or connect over Multipath TCP (`IPPROTO_MPTCP`), falling
    /// back to TCP on any error of the MPTCP attempt, as Go's net package
    /// does.
    #[arg(long)]
    mptcp: bool,
    /// Listen or connect with an `AF_SMC` socket (Shared Memory
    /// Communications, as `smc_run` makes an app do), no fallback.
    #[arg(long, conflicts_with = "mptcp")]
    smc: bool,
    /// Make the TCP socket an SMC one before it connects or listens, by
    /// `setsockopt(TCP_ULP, "smc")` (the other way into SMC), no fallback.
    #[arg(long, conflicts_with_all = ["mptcp", "smc"])]
    smc_ulp: bool,
}

#[derive(Debug, Subcommand)]
enum Side {
    /// Accept `connections` connections (one after another, or all at
    /// once with `--parallel`).
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        common: Common,
    },
    /// Open `connections` connections (one after another, or all at once
    /// with `--parallel`).
    Client {
        #[arg(long)]
        connect: SocketAddr,
        /// Also connect here after each early close, reusing the fd number
        /// (fd-reuse scenario; the other server runs mode client-first).
        #[arg(long)]
        reuse_fd_to: Option<SocketAddr>,
        #[command(flatten)]
        common: Common,
    },
    /// Bind to `bind` and connect to `connect`, with no listener at either
    /// end: a TCP simultaneous open when the peer does the same towards
    /// `bind` (its SYN reaches this socket while it waits in `SYN_SENT`).
    /// Then one exchange, as the client, or as the server with `--answer`.
    Simultaneous {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        connect: SocketAddr,
        /// Play the server's part of the exchange.
        #[arg(long)]
        answer: bool,
        /// Connect once this file exists (see `app_io::connect_from`), so
        /// that two apps connect at the same moment.
        #[arg(long)]
        go_file: Option<std::path::PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Connect and make one unusual socket call (MSG_OOB, MSG_ZEROCOPY,
    /// TCP_ZEROCOPY_RECEIVE, TCP repair mode, reconnects, a flood of
    /// connects nobody answers, many connections waiting for keys) with the
    /// pattern's first 4,096 bytes (the marker first); each step's errno is
    /// reported and `ok` is true when every step succeeded.
    Probe {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, value_enum)]
        what: app_io::Probe,
        /// `refused-then-reconnect`: where the socket connects again.
        #[arg(long, required_if_eq("what", "refused-then-reconnect"))]
        then: Option<SocketAddr>,
        /// `refused-then-reconnect`, `connect-flood`, `many-waiting`: the
        /// last step waits until this file exists.
        #[arg(long)]
        go_file: Option<std::path::PathBuf>,
        /// Move this process into the cgroup (v2) at this directory first
        /// (its pid written to `cgroup.procs`).
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
    },
}

use tlshub_vm_tests::pattern::{CLIENT_SEED, SERVER_SEED};

/// `--connect-again`: connect() on the connected socket, `times` times.
fn connect_again(c: &Conn, times: u32, r: &mut AppReport) -> std::io::Result<()> {
    if times == 0 {
        // getpeername() fails on a socket whose connection ended.
        return Ok(());
    }
    let peer = c.stream().peer_addr()?;
    let sock = socket2::SockRef::from(c.stream());
    for _ in 0..times {
        match sock.connect(&peer.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => r.eisconn += 1,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    Ok(())
}

fn send_pattern(
    c: &mut Conn,
    common: &Common,
    seed: u64,
    r: &mut AppReport,
) -> std::io::Result<()> {
    send_pattern_from(c, common, seed, r, 0)
}

/// The pattern from byte `from` on (the bytes before went out already).
fn send_pattern_from(
    c: &mut Conn,
    common: &Common,
    seed: u64,
    r: &mut AppReport,
    from: u64,
) -> std::io::Result<()> {
    let mut off = from;
    let mut buf = vec![0u8; common.size.min(1 << 20)];
    while (off as usize) < common.size {
        let n = buf.len().min(common.size - off as usize);
        pattern::fill(seed, off, &mut buf[..n]);
        c.send_all(common.send, &buf[..n])?;
        off += n as u64;
        r.bytes_sent += n as u64;
    }
    Ok(())
}

/// Receives the peer's `size` bytes, checking every piece as it arrives:
/// bytes received just before an error (a reset) are judged too, so
/// garbage followed by a reset is reported as corruption, not as an
/// ordinary failure.
fn recv_pattern(
    c: &mut Conn,
    common: &Common,
    seed: u64,
    r: &mut AppReport,
) -> std::io::Result<()> {
    let mut off = 0u64;
    let mut buf = vec![0u8; common.size.min(1 << 20)];
    while (off as usize) < common.size {
        let want = buf.len().min(common.size - off as usize);
        let n = c.recv_some(common.recv, &mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended after {off} of {} bytes", common.size),
            ));
        }
        if let Err(bad) = pattern::check(seed, off, &buf[..n]) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("byte {bad} differs from what the peer sent"),
            ));
        }
        off += n as u64;
        r.bytes_received += n as u64;
    }
    Ok(())
}

/// Runs `exchange` on `stream` here, or in a child it is handed to
/// (`--handoff`),
/// adding its byte counts to `r`.
fn exchange_maybe_handed_off(
    stream: TcpStream,
    common: &Common,
    r: &mut AppReport,
    exchange: fn(TcpStream, &Common, &mut AppReport) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if common.handoff == app_io::Handoff::None {
        return exchange(stream, common, r);
    }
    let (sent, received) = app_io::in_child(stream, common.handoff, |s| {
        let mut one = AppReport::default();
        exchange(s, common, &mut one).map(|()| (one.bytes_sent, one.bytes_received))
    })?;
    r.bytes_sent += sent;
    r.bytes_received += received;
    Ok(())
}

fn accept(l: &TcpListener, via: Via) -> std::io::Result<TcpStream> {
    match via {
        Via::Syscall => l.accept().map(|(s, _)| s),
        Via::IoUring => app_io::accept_io_uring(l),
        Via::Int80 => app_io::accept_int80(l),
    }
}

fn serve_one(stream: TcpStream, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    if common.ktls_fixed_key {
        app_io::install_fixed_ktls(&stream, false)?;
    }
    let mut c = Conn::new(stream, common.io)?;
    let result = serve_exchange(&mut c, common, r);
    r.send_buffer = send_buffer(&c);
    result
}

/// `getsockopt(SO_SNDBUF)` of the connection.
fn send_buffer(c: &Conn) -> Option<usize> {
    socket2::SockRef::from(c.stream()).send_buffer_size().ok()
}

fn serve_exchange(c: &mut Conn, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    match common.mode {
        Mode::ClientFirst => {
            recv_pattern(c, common, CLIENT_SEED, r)?;
            send_pattern(c, common, SERVER_SEED, r)?;
        }
        Mode::ServerFirst => {
            send_pattern(c, common, SERVER_SEED, r)?;
            recv_pattern(c, common, CLIENT_SEED, r)?;
        }
        Mode::Echo => {
            let mut b = [0u8; 1];
            c.recv_exact(common.recv, &mut b)?;
            c.send_all(common.send, &b)?;
            r.bytes_received += 1;
            r.bytes_sent += 1;
        }
        Mode::Throughput => {
            recv_pattern(c, common, CLIENT_SEED, r)?;
            c.send_all(common.send, b"k")?;
            r.bytes_sent += 1;
        }
        Mode::Rr => {
            for i in 0..common.size as u64 {
                let mut b = [0u8; 1];
                c.recv_exact(common.recv, &mut b)?;
                check_rr_byte(i, b[0])?;
                c.send_all(common.send, &b)?;
            }
            r.bytes_received += common.size as u64;
            r.bytes_sent += common.size as u64;
        }
        Mode::CloseEarly | Mode::FillHalfClose => {
            if common.mode == Mode::FillHalfClose {
                std::thread::sleep(std::time::Duration::from_secs(12));
            }
            let mut b = [0u8; 64];
            // Read until the client's close (EOF or reset); nothing else.
            while let Ok(n) = c.recv_some(common.recv, &mut b) {
                if n == 0 {
                    break;
                }
            }
        }
        Mode::HalfClose => {
            recv_pattern(c, common, CLIENT_SEED, r)?;
            expect_eof(c, common)?;
            send_pattern(c, common, SERVER_SEED, r)?;
            c.stream().shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
    }
    // Wait for the peer to finish reading, then close.
    let mut b = [0u8; 1];
    if !matches!(common.mode, Mode::CloseEarly | Mode::FillHalfClose) {
        let _ = c.recv_some(RecvMethod::Read, &mut b);
    }
    Ok(())
}

/// Transaction `i`'s byte in rr mode: the client pattern's byte `i`.
fn check_rr_byte(i: u64, got: u8) -> std::io::Result<()> {
    let mut want = [0u8; 1];
    pattern::fill(CLIENT_SEED, i, &mut want);
    if got == want[0] {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("transaction {i}: got {got:#04x}, sent {:#04x}", want[0]),
        ))
    }
}

/// Whether an exchange failed in a way that shows corrupt data rather than
/// a connection that ended.
fn corrupt(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

/// `--reconnect`, server: serves connections one after another until none
/// comes for 5 s (less than the harness waits for a server once its
/// client is done); a connection that fails cleanly is counted, one with
/// wrong bytes fails the run.
fn serve_until_idle(l: &TcpListener, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    socket2::SockRef::from(l).set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    loop {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut one = AppReport::default();
        match serve_one(s, common, &mut one) {
            Ok(()) => {
                r.connections += 1;
                r.bytes_sent += one.bytes_sent;
                r.bytes_received += one.bytes_received;
            }
            Err(e) if corrupt(&e) => return Err(e),
            Err(_) => r.failed_cleanly += 1,
        }
    }
}

/// `--reconnect`, client: one exchange on a socket that was connected,
/// disconnected and connected again, tried until it succeeds (attempts
/// that fail cleanly are counted), three times in all at most.
fn client_reconnecting(
    target: SocketAddr,
    common: &Common,
    r: &mut AppReport,
) -> std::io::Result<()> {
    let mut last = None;
    for _ in 0..3 {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.connect(&target.into())?;
        match app_io::disconnect(&sock) {
            Ok(()) => sock.connect(&target.into())?,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => r.disconnect_refused += 1,
            Err(e) => return Err(e),
        }
        let mut one = AppReport::default();
        let result = Conn::new(sock.into(), common.io)
            .and_then(|mut c| client_exchange(&mut c, common, &mut one));
        match result {
            Ok(()) => {
                r.bytes_sent += one.bytes_sent;
                r.bytes_received += one.bytes_received;
                return Ok(());
            }
            Err(e) if corrupt(&e) => return Err(e),
            Err(e) => {
                r.failed_cleanly += 1;
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
}

fn client_one(target: SocketAddr, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    let started = Instant::now();
    if common.fastopen != FastOpen::Off {
        return client_fastopen(target, common, r);
    }
    let stream = match (common.sndbuf, common.via) {
        _ if common.smc => app_io::connect_smc(target, SmcSocket::Family)?,
        _ if common.smc_ulp => app_io::connect_smc(target, SmcSocket::TcpUlp)?,
        _ if common.mptcp => {
            let (stream, fell_back) = app_io::connect_mptcp(target)?;
            r.mptcp = Some(mptcp_outcome(fell_back));
            stream
        }
        (Some(bytes), _) => app_io::connect_with_send_buffer(target, bytes)?,
        (None, Via::Syscall) => TcpStream::connect(target)?,
        (None, Via::IoUring) => app_io::connect_io_uring(target)?,
        (None, Via::Int80) => app_io::connect_int80(target)?,
    };
    if common.ktls_fixed_key {
        app_io::install_fixed_ktls(&stream, true)?;
    }
    if common.mode == Mode::CloseEarly {
        drop(stream);
        return Ok(());
    }
    exchange_maybe_handed_off(stream, common, r, |stream, common, r| {
        let mut c = Conn::new(stream, common.io)?;
        let result = client_exchange(&mut c, common, r)
            .and_then(|()| connect_again(&c, common.connect_again, r));
        r.send_buffer = send_buffer(&c);
        result
    })?;
    if common.mode == Mode::Echo {
        // Connect start to the echoed byte (the exchange ends with it).
        r.latency_us.push(started.elapsed().as_micros() as u64);
    }
    Ok(())
}

/// `--parallel`, client: all `connections` at once, one thread each; the
/// reports are added up, and a throughput is all the bytes over the
/// slowest connection's transfer time.
fn client_parallel(target: SocketAddr, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    let ones = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..common.connections)
            .map(|_| {
                scope.spawn(move || {
                    let mut one = AppReport::default();
                    client_one(target, common, &mut one).map(|()| one)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| std::io::Error::other("client thread panicked"))?
            })
            .collect::<std::io::Result<Vec<AppReport>>>()
    })?;
    let mut slowest: f64 = 0.0;
    for one in ones {
        r.connections += 1;
        r.bytes_sent += one.bytes_sent;
        r.bytes_received += one.bytes_received;
        r.latency_us.extend(one.latency_us);
        if let Some(bps) = one.bytes_per_sec {
            slowest = slowest.max(common.size as f64 / bps.max(1.0));
        }
    }
    if common.mode == Mode::Throughput && slowest > 0.0 {
        r.bytes_per_sec = Some((common.size as u64 * u64::from(r.connections)) as f64 / slowest);
    }
    Ok(())
}

/// `--mptcp`: what became of the MPTCP attempt.
fn mptcp_outcome(fell_back: Option<i32>) -> MptcpOutcome {
    fell_back.map_or(MptcpOutcome::Used, MptcpOutcome::FellBack)
}

/// An accepted connection, counted in `r.mptcp_accepted` if it is
/// Multipath TCP.
fn accept_counted(
    l: &TcpListener,
    common: &Common,
    r: &mut AppReport,
) -> std::io::Result<TcpStream> {
    let s = accept(l, common.via)?;
    if common.mptcp && app_io::is_mptcp(&s) {
        r.mptcp_accepted += 1;
    }
    Ok(s)
}

/// A client-first exchange whose first bytes go out with Fast Open.
fn client_fastopen(target: SocketAddr, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    if common.mode != Mode::ClientFirst {
        return Err(std::io::Error::other(
            "--fastopen needs --mode client-first",
        ));
    }
    let mut first = vec![0u8; common.size.min(1000)];
    pattern::fill(CLIENT_SEED, 0, &mut first);
    let (stream, sent) = app_io::connect_fastopen(target, common.fastopen, &first, common.mptcp)?;
    if common.mptcp {
        // The fallback of a refused Fast Open send is TCP.
        r.mptcp = Some(mptcp_outcome(sent.is_none().then_some(libc::EOPNOTSUPP)));
    }
    r.fastopen = Some(if sent.is_some() {
        FastOpenOutcome::Sent
    } else {
        FastOpenOutcome::Refused
    });
    let sent = sent.unwrap_or(0) as u64;
    r.bytes_sent += sent;
    let mut c = Conn::new(stream, common.io)?;
    send_pattern_from(&mut c, common, CLIENT_SEED, r, sent)?;
    recv_pattern(&mut c, common, SERVER_SEED, r)?;
    r.send_buffer = send_buffer(&c);
    Ok(())
}

fn client_exchange(c: &mut Conn, common: &Common, r: &mut AppReport) -> std::io::Result<()> {
    match common.mode {
        Mode::ClientFirst => {
            send_pattern(c, common, CLIENT_SEED, r)?;
            recv_pattern(c, common, SERVER_SEED, r)?;
        }
        Mode::ServerFirst => {
            recv_pattern(c, common, SERVER_SEED, r)?;
            send_pattern(c, common, CLIENT_SEED, r)?;
        }
        Mode::Echo => {
            c.send_all(common.send, b"e")?;
            let mut b = [0u8; 1];
            c.recv_exact(common.recv, &mut b)?;
            if &b != b"e" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the echo came back as {:#04x}, not 'e'", b[0]),
                ));
            }
            r.bytes_sent += 1;
            r.bytes_received += 1;
        }
        Mode::Throughput => {
            let t = Instant::now();
            send_pattern(c, common, CLIENT_SEED, r)?;
            let mut b = [0u8; 1];
            c.recv_exact(common.recv, &mut b)?;
            r.bytes_per_sec = Some(common.size as f64 / t.elapsed().as_secs_f64());
        }
        Mode::Rr => {
            r.latency_us.reserve(common.size);
            let t = Instant::now();
            for i in 0..common.size as u64 {
                let mut b = [0u8; 1];
                pattern::fill(CLIENT_SEED, i, &mut b);
                let sent = Instant::now();
                c.send_all(common.send, &b)?;
                c.recv_exact(common.recv, &mut b)?;
                r.latency_us.push(sent.elapsed().as_micros() as u64);
                check_rr_byte(i, b[0])?;
            }
            r.transactions_per_sec = Some(common.size as f64 / t.elapsed().as_secs_f64());
            r.bytes_sent += common.size as u64;
            r.bytes_received += common.size as u64;
        }
        Mode::CloseEarly => {}
        Mode::HalfClose => {
            send_pattern(c, common, CLIENT_SEED, r)?;
            c.stream().shutdown(std::net::Shutdown::Write)?;
            recv_pattern(c, common, SERVER_SEED, r)?;
            expect_eof(c, common)?;
        }
        Mode::FillHalfClose => fill_then_half_close(c.stream(), r)?,
    }
    Ok(())
}

/// `--mode fill-half-close`, client: one small blocking write (held until
/// the keys are in), then non-blocking writes for as long as the socket
/// becomes writable again within a second (the peer's receive buffer
/// fills, since it reads nothing), then `shutdown(SHUT_WR)`, timed.
fn fill_then_half_close(s: &TcpStream, r: &mut AppReport) -> std::io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    use std::io::Write;
    // Small: a blocking write the peer's window cannot take would wait
    // for the peer to read.
    let mut first = [0u8; 1024];
    let mut w = s;
    pattern::fill(CLIENT_SEED, 0, &mut first);
    w.write_all(&first)?;
    r.bytes_sent += first.len() as u64;
    let mut chunk = vec![0u8; 16 << 10];
    s.set_nonblocking(true)?;
    let second = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        pattern::fill(CLIENT_SEED, r.bytes_sent, &mut chunk);
        match w.write(&chunk) {
            Ok(n) => r.bytes_sent += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(s, PollFlags::OUT)];
                if rustix::event::poll(&mut fds, Some(&second))? == 0 {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    let t = Instant::now();
    s.shutdown(std::net::Shutdown::Write)?;
    r.shutdown_ms = Some(t.elapsed().as_millis() as u64);
    Ok(())
}

/// The next read finds the end of the stream (the peer closed or
/// half-closed after exactly what was expected).
fn expect_eof(c: &mut Conn, common: &Common) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    match c.recv_some(common.recv, &mut b)? {
        0 => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "more bytes than the peer should have sent",
        )),
    }
}

fn run(args: Args, r: &mut AppReport) -> std::io::Result<()> {
    match args.side {
        Side::Server { listen, common } => {
            r.role = AppRole::Server;
            let l = if common.smc {
                app_io::listen_smc(listen, SmcSocket::Family)?
            } else if common.smc_ulp {
                app_io::listen_smc(listen, SmcSocket::TcpUlp)?
            } else if common.mptcp {
                let (l, fell_back) = app_io::listen_mptcp(listen)?;
                r.mptcp = Some(mptcp_outcome(fell_back));
                l
            } else if common.reuseport {
                app_io::listen_reuseport(listen)?
            } else {
                TcpListener::bind(listen)?
            };
            if let Some(bytes) = common.sndbuf {
                socket2::SockRef::from(&l).set_send_buffer_size(bytes)?;
            }
            if common.defer_accept_s > 0 {
                let secs = libc::c_int::try_from(common.defer_accept_s)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                tlshub_ktls::set_option(
                    std::os::fd::AsFd::as_fd(&l),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    &secs,
                )?;
            }
            // Tell the runner we are listening.
            eprintln!("listening on {listen}");
            if common.reconnect {
                serve_until_idle(&l, &common, r)?;
            } else if common.parallel {
                std::thread::scope(|scope| {
                    let mut threads = Vec::new();
                    for _ in 0..common.connections {
                        let s = accept_counted(&l, &common, r)?;
                        let common = &common;
                        threads.push(scope.spawn(move || {
                            let mut one = AppReport::default();
                            serve_one(s, common, &mut one).map(|()| one)
                        }));
                    }
                    for t in threads {
                        let one = t
                            .join()
                            .map_err(|_| std::io::Error::other("server thread panicked"))??;
                        r.bytes_sent += one.bytes_sent;
                        r.bytes_received += one.bytes_received;
                        r.connections += 1;
                    }
                    Ok::<(), std::io::Error>(())
                })?;
            } else {
                for _ in 0..common.connections {
                    std::thread::sleep(std::time::Duration::from_millis(common.accept_delay_ms));
                    let s = accept_counted(&l, &common, r)?;
                    exchange_maybe_handed_off(s, &common, r, serve_one)?;
                    r.connections += 1;
                }
            }
        }
        Side::Simultaneous {
            bind,
            connect,
            answer,
            go_file,
            common,
        } => {
            r.role = if answer {
                AppRole::Server
            } else {
                AppRole::Client
            };
            let stream = app_io::connect_from(bind, connect, go_file.as_deref())?;
            let mut c = Conn::new(stream, common.io)?;
            if answer {
                serve_exchange(&mut c, &common, r)?;
            } else {
                client_exchange(&mut c, &common, r)?;
            }
            r.connections += 1;
        }
        Side::Client {
            connect,
            reuse_fd_to,
            common,
        } => {
            r.role = AppRole::Client;
            if common.parallel {
                return client_parallel(connect, &common, r);
            }
            for _ in 0..common.connections {
                if let Some(other) = reuse_fd_to {
                    // Open a selected connection and close it at once, then
                    // open a plain one: it gets the same fd number while the
                    // core may still be about to key the first.
                    let first = TcpStream::connect(connect)?;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&first);
                    drop(first);
                    let second = TcpStream::connect(other)?;
                    if std::os::fd::AsRawFd::as_raw_fd(&second) == fd {
                        r.reused_fds += 1;
                    }
                    let mut c = Conn::new(second, common.io)?;
                    send_pattern(&mut c, &common, CLIENT_SEED, r)?;
                    recv_pattern(&mut c, &common, SERVER_SEED, r)?;
                } else if common.reconnect {
                    client_reconnecting(connect, &common, r)?;
                } else {
                    client_one(connect, &common, r)?;
                }
                r.connections += 1;
            }
        }
        Side::Probe {
            connect,
            what,
            then,
            go_file,
            cgroup,
        } => {
            r.role = AppRole::Probe;
            if let Some(dir) = cgroup {
                std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
            }
            let mut payload = vec![0u8; 4096];
            pattern::fill(CLIENT_SEED, 0, &mut payload);
            let options = app_io::ProbeOptions { then, go_file };
            r.probe = app_io::probe(connect, what, &options, &payload);
            if let Some(failed) = r.probe.iter().find(|s| s.errno != 0) {
                return Err(std::io::Error::from_raw_os_error(failed.errno));
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let main_thread_exits = matches!(
        args.side,
        Side::Probe {
            what: app_io::Probe::MainThreadExits,
            ..
        }
    );
    if main_thread_exits {
        // The run goes on on another thread, which ends the process.
        std::thread::spawn(move || std::process::exit(if run_and_report(args) { 0 } else { 1 }));
        app_io::exit_main_thread();
    }
    if run_and_report(args) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Runs `args` and prints the report; whether it went well.
fn run_and_report(args: Args) -> bool {
    let mut report = AppReport {
        pid: std::process::id(),
        uid: rustix::process::getuid().as_raw(),
        ..AppReport::default()
    };
    let result = run(args, &mut report);
    if let Err(e) = &result {
        report.error = Some(e.to_string());
        report.errno = e.raw_os_error();
    }
    report.ok = result.is_ok();
    report.uring_interrupted = app_io::URING_INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{}",
        serde_json::to_string(&report)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
    );
    report.ok
}
