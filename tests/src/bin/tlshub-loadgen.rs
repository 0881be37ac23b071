//! `tlshub-loadgen`: steady load for the service scenarios (hot-swap,
//! restarts). Like `tlshub-testapp` it knows nothing about tlshub.
//!
//! The client keeps `--long` connections open for `--duration`, each sending
//! a `--chunk`-byte piece of its seeded pattern every `--interval-ms` and
//! checking the server's answer; meanwhile it opens short connections at
//! `--short-per-sec` (one verified exchange each). The server checks every
//! byte it receives and answers each piece with the same span of its own
//! pattern, so both directions are verified and a capture of any flow
//! decrypts to the pattern from offset 0. One JSON report on stdout (a
//! [`LoadReport`]), with the round-trip times of the long connections'
//! pieces, before and after `--busy-from-s` (the benchmark's collateral
//! stall: another process opens connections from then on).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tlshub_vm_tests::load::{LoadReport, RoundTrips};
use tlshub_vm_tests::pattern::{self, CLIENT_SEED, SERVER_SEED};

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    side: Side,
}

#[derive(Debug, Subcommand)]
enum Side {
    /// Serve every connection on its own thread until killed.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        /// Append a line here for every connection whose bytes arrived
        /// corrupt (the client only sees the connection close, which a
        /// restart scenario may tolerate; the test bed fails on this file).
        #[arg(long)]
        corruption_log: Option<std::path::PathBuf>,
    },
    /// Generate the load and report.
    Client(ClientArgs),
}

/// The client's load.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Long-lived connections.
    #[arg(long, default_value_t = 200)]
    long: u32,
    /// Seconds of load after the long connections are up.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Bytes per piece.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Pause between a long connection's pieces.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// New short connections per second (0: none), each started on time
    /// whether or not the earlier ones have finished (open loop).
    #[arg(long, default_value_t = 4.0)]
    short_per_sec: f64,
    /// Instead of a rate: this many workers, each opening one short
    /// connection after another for the whole run (closed loop: the rate
    /// is what the path sustains with this many clients at once).
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// Report the long connections' round trips in two sets: those
    /// that start before this many seconds of load, and those that
    /// start from one second after it (the caller starts other load
    /// then; the second between is left out).
    #[arg(long)]
    busy_from_s: Option<f64>,
    /// Bytes each short connection sends (and gets back).
    #[arg(long, default_value_t = 4096)]
    short_size: usize,
    /// The `--workers` are tasks of one tokio event loop on one thread
    /// (non-blocking sockets, as an event-loop client's are) instead of
    /// threads on blocking sockets. Needs `--workers` and `--long 0`.
    #[arg(long)]
    event_loop: bool,
}

/// Reads exactly `buf.len()` bytes.
fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    s.read_exact(buf)
}

/// One piece: send `n` bytes of `CLIENT_SEED` at `off`, receive and check
/// `n` bytes of `SERVER_SEED` at `off`.
fn exchange(s: &mut TcpStream, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    pattern::fill(CLIENT_SEED, off, buf);
    s.write_all(buf)?;
    read_exact(s, buf)?;
    pattern::check(SERVER_SEED, off, buf).map_err(corrupt_answer)
}

fn serve(mut s: TcpStream, corruption_log: Option<&std::path::Path>) {
    let mut off = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(at) = pattern::answer(off, &mut buf[..n]) {
            // The client sees the connection close; the log says why.
            // `at` is the offset in the stream.
            let first: String = buf[..n.min(8)].iter().map(|b| format!("{b:02x}")).collect();
            let line = format!(
                "CORRUPT: byte {at} from {:?} differs ({n} bytes read, starting {first})\n",
                s.peer_addr()
            );
            eprint!("{line}");
            if let Some(path) = corruption_log {
                use std::io::Write as _;
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
            }
            return;
        }
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
        off += n as u64;
    }
}

#[derive(Debug, Default)]
struct Shared {
    long_pieces: AtomicU64,
    long_bytes: AtomicU64,
    corrupt: AtomicU64,
    short_attempted: AtomicU64,
    short_ok: AtomicU64,
    failures: Mutex<Vec<(u64, String)>>,
    log: Mutex<Vec<(u64, bool)>>,
    latencies: Mutex<Vec<f64>>,
    long_errors: Mutex<Vec<String>>,
    /// Round trips of long connections' pieces, microseconds: quiet, busy.
    rtt: Mutex<(Vec<u64>, Vec<u64>)>,
}

fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{e} (errno {n})"),
        None => e.to_string(),
    }
}

/// One short connection: connect, one verified exchange of `size` bytes,
/// close; its outcome and time go into `shared`.
fn short_connection(target: SocketAddr, size: usize, start: Instant, shared: &Shared) {
    shared.short_attempted.fetch_add(1, Ordering::Relaxed);
    let t = Instant::now();
    let result = (|| {
        let mut s = TcpStream::connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; size];
        exchange(&mut s, 0, &mut buf)
    })();
    short_ended(shared, start, t, result);
}

/// [`short_connection`] on the event loop: the same exchange with tokio's
/// non-blocking sockets.
async fn short_connection_async(target: SocketAddr, size: usize, start: Instant, shared: &Shared) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    shared.short_attempted.fetch_add(1, Ordering::Relaxed);
    let t = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = tokio::net::TcpStream::connect(target).await?;
        let mut buf = vec![0u8; size];
        pattern::fill(CLIENT_SEED, 0, &mut buf);
        s.write_all(&buf).await?;
        s.read_exact(&mut buf).await?;
        pattern::check(SERVER_SEED, 0, &buf).map_err(corrupt_answer)
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    short_ended(shared, start, t, result);
}

/// A short connection's answer differed from the server's pattern at `at`.
fn corrupt_answer(at: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("CORRUPT: answer byte {at} differs"),
    )
}

/// Records a short connection started at `t` (`start` is the run's).
fn short_ended(shared: &Shared, start: Instant, t: Instant, result: std::io::Result<()>) {
    let at = t.duration_since(start).as_millis() as u64;
    if let Ok(mut l) = shared.log.lock()
        && l.len() < 1500
    {
        l.push((at, result.is_ok()));
    }
    match result {
        Ok(()) => {
            shared.short_ok.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = shared.latencies.lock() {
                l.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                shared.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut f) = shared.failures.lock()
                && f.len() < 300
            {
                f.push((at, describe(&e)));
            }
        }
    }
}

fn client(args: &ClientArgs, r: &mut LoadReport) -> std::io::Result<()> {
    let ClientArgs {
        connect: target,
        long,
        chunk,
        short_per_sec,
        workers,
        short_size,
        ..
    } = *args;
    if args.event_loop && (workers == 0 || long > 0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "--event-loop needs --workers and --long 0",
        ));
    }
    let duration = Duration::from_secs(args.duration);
    let interval = Duration::from_millis(args.interval_ms);
    let busy_from = args.busy_from_s.map(Duration::from_secs_f64);
    let shared = Arc::new(Shared::default());
    // Open the long connections first (each keyed once), with its first piece.
    let mut longs = Vec::new();
    for _ in 0..long {
        let mut s = TcpStream::connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; chunk];
        exchange(&mut s, 0, &mut buf)?;
        longs.push(s);
        r.long_opened += 1;
    }
    eprintln!("long connections up: {}", r.long_opened);
    let start = Instant::now();
    let end = start + duration;
    let broken = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        for (i, mut s) in longs.into_iter().enumerate() {
            let shared = shared.clone();
            let broken = broken.clone();
            scope.spawn(move || {
                let mut buf = vec![0u8; chunk];
                let mut off = chunk as u64;
                let (mut quiet, mut busy) = (Vec::new(), Vec::new());
                // Spread the connections over the interval.
                std::thread::sleep(interval.mul_f64(i as f64 / f64::from(long.max(1))));
                while Instant::now() < end {
                    let sent = start.elapsed();
                    let result = exchange(&mut s, off, &mut buf);
                    let micros = (start.elapsed() - sent).as_micros() as u64;
                    if let Err(e) = result {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            shared.corrupt.fetch_add(1, Ordering::Relaxed);
                        }
                        broken.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = shared.long_errors.lock()
                            && l.len() < 20
                        {
                            l.push(format!(
                                "long {i} at {} ms: {}",
                                start.elapsed().as_millis(),
                                describe(&e)
                            ));
                        }
                        break;
                    }
                    match busy_from {
                        Some(b) if sent >= b + Duration::from_secs(1) => busy.push(micros),
                        Some(b) if sent >= b => {}
                        _ => quiet.push(micros),
                    }
                    off += chunk as u64;
                    shared.long_pieces.fetch_add(1, Ordering::Relaxed);
                    shared.long_bytes.fetch_add(chunk as u64, Ordering::Relaxed);
                    std::thread::sleep(interval);
                }
                if let Ok(mut rtt) = shared.rtt.lock() {
                    rtt.0.extend(quiet);
                    rtt.1.extend(busy);
                }
            });
        }
        // Short connections: a fixed number of workers one after another
        // (threads, or tasks of one event loop), or at a fixed rate, each
        // on its own thread.
        if args.event_loop {
            let shared = shared.clone();
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(async {
                    let tasks: Vec<_> = (0..workers)
                        .map(|_| {
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                while Instant::now() < end {
                                    short_connection_async(target, short_size, start, &shared)
                                        .await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            });
        }
        let thread_workers = if args.event_loop { 0 } else { workers };
        for _ in 0..thread_workers {
            let shared = shared.clone();
            scope.spawn(move || {
                while Instant::now() < end {
                    short_connection(target, short_size, start, &shared);
                }
            });
        }
        let gap = Duration::from_secs_f64(1.0 / short_per_sec.max(0.001));
        let mut next = start;
        while workers == 0 && short_per_sec > 0.0 && next < end {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += gap;
            let shared = shared.clone();
            scope.spawn(move || short_connection(target, short_size, start, &shared));
        }
    });
    r.short_attempted = shared.short_attempted.load(Ordering::Relaxed);
    r.duration_s = start.elapsed().as_secs_f64();
    r.long_broken = broken.load(Ordering::Relaxed) as u32;
    r.long_pieces = shared.long_pieces.load(Ordering::Relaxed);
    r.long_bytes = shared.long_bytes.load(Ordering::Relaxed);
    r.short_ok = shared.short_ok.load(Ordering::Relaxed);
    r.corrupt = shared.corrupt.load(Ordering::Relaxed);
    r.short_failures = shared
        .failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    r.short_failed = r.short_attempted - r.short_ok;
    r.long_errors = shared
        .long_errors
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    r.short_log = shared.log.lock().map(|l| l.clone()).unwrap_or_default();
    r.short_log.sort_unstable();
    if let Ok(mut rtt) = shared.rtt.lock() {
        r.rtt_quiet = RoundTrips::of(std::mem::take(&mut rtt.0));
        r.rtt_busy = RoundTrips::of(std::mem::take(&mut rtt.1));
    }
    let mut lat = shared
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round().max(0.0) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    r.short_p50_ms = pick(0.5);
    r.short_p99_ms = pick(0.99);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match args.side {
        Side::Server {
            listen,
            corruption_log,
        } => {
            let l = match TcpListener::bind(listen) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("cannot listen on {listen}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            eprintln!("listening on {listen}");
            let log = std::sync::Arc::new(corruption_log);
            for s in l.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || serve(s, log.as_deref()));
            }
            std::process::ExitCode::SUCCESS
        }
        Side::Client(args) => {
            let mut r = LoadReport::default();
            if let Err(e) = client(&args, &mut r) {
                r.error = Some(describe(&e));
            }
            r.ok = r.error.is_none() && r.long_broken == 0 && r.corrupt == 0;
            println!(
                "{}",
                serde_json::to_string(&r)
                    .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
            );
            if r.ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
