//! `tlshub-hold`: opens many connections and holds them all open at once,
//! for the capacity run (`cargo xtask vm --mode capacity`). Like the other
//! test apps it knows nothing about tlshub.
//!
//! The client opens `--count` connections one after another, round-robin
//! over the `--connect` addresses, each with one verified 32-byte exchange
//! (with `--own-ports`, from a local port it binds itself);
//! once all are open it exchanges 32 more bytes on every one, holds them
//! for `--hold-secs` and prints a [`HoldReport`] as JSON on stdout. The
//! server answers every piece with the same span of its own pattern (as
//! `tlshub-loadgen` does) from one thread, a task per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tlshub_vm_tests::hold::HoldReport;
use tlshub_vm_tests::pattern::{self, CLIENT_SEED, SERVER_SEED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per exchange.
const PIECE: usize = 32;
/// Consecutive failures after which the client stops trying.
const GIVE_UP_AFTER: u64 = 20;

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    side: Side,
}

#[derive(Debug, Subcommand)]
enum Side {
    /// Answer on every `--listen` address.
    Server {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Open and hold the connections, then report.
    Client {
        /// Server addresses, used in turn (more than one when the
        /// connections would outnumber one client address's ports).
        #[arg(long, required = true)]
        connect: Vec<SocketAddr>,
        /// Connections to open and hold at once.
        #[arg(long)]
        count: u64,
        /// Stop opening after this long, and report what was reached.
        #[arg(long, default_value_t = 3600)]
        deadline_secs: u64,
        /// How long to hold them all open before reporting.
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        /// Bind each socket's local port itself (`SO_REUSEADDR`, ports
        /// 1024 to 65535 in turn for each destination) instead of leaving
        /// it to `connect()`: once every port of the range has been used
        /// towards some destination, the kernel's own choice searches the
        /// range for a free 4-tuple at every `connect()`, which made the
        /// client's CPU per connection grow tenfold past 64,500 open.
        #[arg(long)]
        own_ports: bool,
    },
}

/// One piece at `off`: send the client pattern, check the server's.
/// The client logs its progress every this many connections.
const PROGRESS_EVERY: u64 = 500;

fn exchange(s: &mut TcpStream, off: u64) -> std::io::Result<Result<(), u64>> {
    let mut buf = [0u8; PIECE];
    pattern::fill(CLIENT_SEED, off, &mut buf);
    s.write_all(&buf)?;
    s.read_exact(&mut buf)?;
    Ok(pattern::check(SERVER_SEED, off, &buf))
}

/// The first local port `--own-ports` binds; the range ends at 65535.
const FIRST_OWN_PORT: u64 = 1024;

/// Connects to `to`, from local port `port` (bound with `SO_REUSEADDR`,
/// which lets connected sockets share a local port) or from one the kernel
/// chooses.
fn connect_from(to: SocketAddr, port: Option<u16>) -> std::io::Result<TcpStream> {
    let Some(port) = port else {
        return TcpStream::connect(to);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    let any: std::net::IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    s.bind(&SocketAddr::new(any, port).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

fn client(
    connect: &[SocketAddr],
    count: u64,
    deadline: Duration,
    hold: Duration,
    own_ports: bool,
) -> HoldReport {
    let mut r = HoldReport {
        wanted: count,
        ..HoldReport::default()
    };
    let mut open = Vec::new();
    let start = Instant::now();
    let mut failed_in_a_row = 0;
    let mut i = 0u64;
    while r.opened < count {
        if start.elapsed() > deadline {
            r.stopped_early = Some(format!("deadline of {} s", deadline.as_secs()));
            break;
        }
        if failed_in_a_row >= GIVE_UP_AFTER {
            r.stopped_early = Some(format!("{GIVE_UP_AFTER} failures in a row"));
            break;
        }
        let destinations = connect.len() as u64;
        let addr = connect[(i % destinations) as usize];
        // The n-th connection to each destination gets the n-th port of the
        // range, so every 4-tuple is new until the range wraps.
        let port = own_ports.then(|| {
            let span = u64::from(u16::MAX) + 1 - FIRST_OWN_PORT;
            u16::try_from(FIRST_OWN_PORT + (i / destinations) % span).unwrap_or(u16::MAX)
        });
        i += 1;
        let opened = connect_from(addr, port).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            exchange(&mut s, 0).map(|checked| (s, checked))
        });
        match opened {
            Ok((s, Ok(()))) => {
                open.push(s);
                r.opened += 1;
                failed_in_a_row = 0;
                if r.opened.is_multiple_of(PROGRESS_EVERY) {
                    eprintln!(
                        "opened {} in {:.1} s, {} attempts failed",
                        r.opened,
                        start.elapsed().as_secs_f64(),
                        r.failed
                    );
                }
            }
            Ok((_, Err(at))) => {
                r.corrupt += 1;
                r.failed += 1;
                failed_in_a_row += 1;
                if r.first_errors.len() < 10 {
                    r.first_errors
                        .push(format!("to {addr}: CORRUPT at byte {at}"));
                }
            }
            Err(e) => {
                r.failed += 1;
                failed_in_a_row += 1;
                if r.first_errors.len() < 10 {
                    r.first_errors.push(format!(
                        "to {addr} from port {port:?} after {} open: {e}",
                        r.opened
                    ));
                }
            }
        }
    }
    r.open_seconds = start.elapsed().as_secs_f64();
    for s in &mut open {
        match exchange(s, PIECE as u64) {
            Ok(Ok(())) => r.still_working += 1,
            Ok(Err(_)) => r.corrupt += 1,
            Err(_) => {}
        }
    }
    eprintln!("holding {} connections", r.opened);
    std::thread::sleep(hold);
    r
}

/// Answers one connection's pieces until it closes.
async fn serve(mut s: tokio::net::TcpStream) {
    let mut buf = [0u8; 4096];
    let mut off = 0u64;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(at) = pattern::answer(off, &mut buf[..n]) {
            eprintln!("CORRUPT: byte {at} from {:?} differs", s.peer_addr());
            return;
        }
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        off += n as u64;
    }
}

fn server(listen: &[SocketAddr]) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for addr in listen {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(serve(s));
                        }
                        // EMFILE and the like: wait rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        }
        eprintln!("listening on {listen:?}");
        std::future::pending::<std::io::Result<()>>().await
    })
}

fn main() -> std::process::ExitCode {
    match Args::parse().side {
        Side::Server { listen } => match server(&listen) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tlshub-hold server: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Side::Client {
            connect,
            count,
            deadline_secs,
            hold_secs,
            own_ports,
        } => {
            let r = client(
                &connect,
                count,
                Duration::from_secs(deadline_secs),
                Duration::from_secs(hold_secs),
                own_ports,
            );
            match serde_json::to_string(&r) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("tlshub-hold client: cannot encode the report: {e}"),
            }
            if r.complete() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
