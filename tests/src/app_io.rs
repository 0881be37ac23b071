//! Moving bytes through a TCP socket with one chosen system call, blocking
//! or with epoll, as an ordinary application would. Used by
//! `tlshub-testapp`; this is the test bed's `unsafe`, all of it plain libc.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How bytes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMethod {
    /// write(2)
    Write,
    /// writev(2), two iovecs
    Writev,
    /// send(2)
    Send,
    /// send(2) with `MSG_MORE` on every write, as an app that corks its
    /// writes and leaves the flush to its `shutdown()` does: the kernel
    /// sends what waits when the FIN goes. Only for exchanges that end
    /// each direction with a `shutdown()` (`--mode half-close`).
    #[serde(rename = "send-more")]
    SendMore,
    /// sendmsg(2)
    Sendmsg,
    /// sendfile(2) from a memfd
    Sendfile,
    /// splice(2) from a pipe
    Splice,
    /// `IORING_OP_SEND`. A completion with `EINTR` is submitted again, as
    /// Rust's `write_all` and most io_uring apps retry it (counted in
    /// [`URING_INTERRUPTED`]); `EAGAIN` on a blocking socket is an error.
    #[serde(rename = "io-uring")]
    IoUring,
    /// `IORING_OP_WRITE` on the socket (the file path: `file_permission`,
    /// then the socket's `write_iter`); retried like [`Self::IoUring`].
    #[serde(rename = "io-uring-write")]
    IoUringWrite,
    /// `IORING_OP_SEND` with `IOSQE_ASYNC`: issued by one of io_uring's
    /// worker threads (io-wq) instead of the submitting thread, so the
    /// gate's hold sends its stop from a kernel-created thread. Retried
    /// like [`Self::IoUring`].
    #[serde(rename = "io-uring-async")]
    IoUringAsync,
    /// `IORING_OP_SEND` on a ring with a kernel submission thread
    /// (`IORING_SETUP_SQPOLL`), which issues the request: again a
    /// kernel-created thread. Retried like [`Self::IoUring`].
    #[serde(rename = "io-uring-sqpoll")]
    IoUringSqpoll,
}

/// How bytes are received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecvMethod {
    /// read(2)
    Read,
    /// recv(2)
    Recv,
    /// recvmsg(2)
    Recvmsg,
    /// splice(2) into a pipe, then read(2) from it
    Splice,
    /// `IORING_OP_RECV`; retried like [`SendMethod::IoUring`].
    #[serde(rename = "io-uring")]
    IoUring,
    /// `IORING_OP_READ` on the socket; retried like [`SendMethod::IoUring`].
    #[serde(rename = "io-uring-read")]
    IoUringRead,
    /// `IORING_OP_RECV` with `IOSQE_ASYNC` (see [`SendMethod::IoUringAsync`]).
    #[serde(rename = "io-uring-async")]
    IoUringAsync,
    /// `IORING_OP_RECV` on an `IORING_SETUP_SQPOLL` ring (see
    /// [`SendMethod::IoUringSqpoll`]).
    #[serde(rename = "io-uring-sqpoll")]
    IoUringSqpoll,
}

/// Blocking calls, or a non-blocking socket driven by an event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// Blocking socket.
    Blocking,
    /// O_NONBLOCK + level-triggered epoll: the socket is registered for
    /// the one event awaited, and removed after it.
    Epoll,
    /// O_NONBLOCK + edge-triggered epoll (`EPOLLET`), registered once for
    /// reads and writes, as tokio, Go and nginx do: a readiness edge that
    /// nobody signals is a hang.
    EpollEdge,
    /// O_NONBLOCK + poll(2).
    Poll,
}

fn cvt(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn owned(rc: libc::c_int) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: rc is a fresh fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// connect() with `SO_SNDBUF` set to `bytes` on the socket before it
/// connects (the kernel doubles it and stops sizing the buffer by itself),
/// as an application that sizes its own buffer does.
pub fn connect_with_send_buffer(
    target: std::net::SocketAddr,
    bytes: usize,
) -> io::Result<std::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_send_buffer_size(bytes)?;
    sock.connect(&target.into())?;
    Ok(sock.into())
}

/// A Multipath TCP (`IPPROTO_MPTCP`) stream socket for `target`'s family.
fn mptcp_socket(target: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    )
}

/// Connects to `target` over Multipath TCP, falling back to TCP on any
/// error of the MPTCP attempt, as Go's dialer does (`net.Dialer`'s
/// `SetMultipathTCP`). Returns the stream and the errno the MPTCP attempt
/// failed with, if it did.
pub fn connect_mptcp(
    target: std::net::SocketAddr,
) -> io::Result<(std::net::TcpStream, Option<i32>)> {
    let attempt = mptcp_socket(target).and_then(|s| s.connect(&target.into()).map(|()| s));
    match attempt {
        Ok(s) => Ok((s.into(), None)),
        Err(e) => Ok((
            std::net::TcpStream::connect(target)?,
            Some(e.raw_os_error().unwrap_or(-1)),
        )),
    }
}

/// Listens on `addr` over Multipath TCP, falling back to TCP on any error
/// of the MPTCP attempt, as Go's `net.ListenConfig` does. Returns the
/// listener and the errno the MPTCP attempt failed with, if it did.
pub fn listen_mptcp(
    addr: std::net::SocketAddr,
) -> io::Result<(std::net::TcpListener, Option<i32>)> {
    match mptcp_socket(addr).and_then(|s| listening(s, addr)) {
        Ok(l) => Ok((l, None)),
        Err(e) => Ok((
            std::net::TcpListener::bind(addr)?,
            Some(e.raw_os_error().unwrap_or(-1)),
        )),
    }
}

/// `AF_SMC`: Shared Memory Communications (net/smc), which libc's
/// constants lack. Its protocol 0 is `SMCPROTO_SMC` (IPv4 underneath).
const AF_SMC: libc::c_int = 43;

/// How an app gets an SMC socket (both IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmcSocket {
    /// `socket(AF_SMC, ...)`, as `smc_run` makes an unmodified app do.
    Family,
    /// A TCP socket turned into an SMC one by the `smc` upper-layer
    /// protocol (`setsockopt(TCP_ULP, "smc")`, net/smc's `smc_ulp_init()`):
    /// the kernel puts an SMC socket behind the app's file and keeps the
    /// TCP socket as its CLC socket, as `AF_SMC` does. Only an unconnected
    /// socket can be.
    TcpUlp,
}

impl SmcSocket {
    fn open(self) -> io::Result<socket2::Socket> {
        match self {
            Self::Family => {
                socket2::Socket::new(socket2::Domain::from(AF_SMC), socket2::Type::STREAM, None)
            }
            Self::TcpUlp => {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                tlshub_ktls::set_option(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_ULP, b"smc")?;
                Ok(s)
            }
        }
    }
}

/// Connects to `target` (IPv4) with an SMC socket: without SMC-capable
/// devices (or a peer that offers SMC) the connection falls back to the
/// TCP socket underneath.
pub fn connect_smc(
    target: std::net::SocketAddr,
    how: SmcSocket,
) -> io::Result<std::net::TcpStream> {
    let s = how.open()?;
    s.connect(&target.into())?;
    Ok(s.into())
}

/// Listens on `addr` (IPv4) with an SMC socket.
pub fn listen_smc(addr: std::net::SocketAddr, how: SmcSocket) -> io::Result<std::net::TcpListener> {
    listening(how.open()?, addr)
}

/// Listens on `addr` with `SO_REUSEPORT`, so that several servers share
/// the port (nginx's `reuseport`, Envoy's hot restart).
pub fn listen_reuseport(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = tcp_socket(addr)?;
    let on: libc::c_int = 1;
    tlshub_ktls::set_option(s.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, &on)?;
    listening(s, addr)
}

/// A TCP socket bound to `bind` (reusing it) that connects to `target`
/// once `go_file` exists (looked for every millisecond, so that two apps
/// given the same file connect within about a millisecond of each other),
/// with no listener needed at `bind`: a TCP simultaneous open when the
/// peer does the same towards `bind`.
pub fn connect_from(
    bind: std::net::SocketAddr,
    target: std::net::SocketAddr,
    go_file: Option<&std::path::Path>,
) -> io::Result<std::net::TcpStream> {
    let s = tcp_socket(bind)?;
    s.set_reuse_address(true)?;
    s.bind(&bind.into())?;
    wait_for_go(go_file, std::time::Duration::from_millis(1))?;
    s.connect(&target.into())?;
    Ok(s.into())
}

/// `s` bound to `addr` (reusing it, as the tests restart servers on one
/// port) and listening.
fn listening(s: socket2::Socket, addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

/// Whether `stream` is a Multipath TCP socket (`SO_PROTOCOL`): an MPTCP
/// listener hands out plain TCP sockets for clients that did not offer
/// MPTCP.
pub fn is_mptcp(stream: &std::net::TcpStream) -> bool {
    socket2::SockRef::from(stream).protocol().ok().flatten() == Some(socket2::Protocol::MPTCP)
}

/// A connected socket and how to drive it.
#[derive(Debug)]
pub struct Conn {
    sock: std::net::TcpStream,
    mode: IoMode,
    epoll: Option<OwnedFd>,
    pipe: Option<(OwnedFd, OwnedFd)>,
    memfd: Option<OwnedFd>,
    /// sendfile() is zero-copy: pages already handed to the socket must not
    /// be overwritten, so every chunk goes to a fresh offset of the memfd.
    memfd_end: libc::off_t,
}

impl Conn {
    /// Wraps a connected stream; in epoll mode it is made non-blocking.
    pub fn new(sock: std::net::TcpStream, mode: IoMode) -> io::Result<Self> {
        if mode != IoMode::Blocking {
            sock.set_nonblocking(true)?;
        }
        let epoll = match mode {
            IoMode::Blocking | IoMode::Poll => None,
            IoMode::Epoll | IoMode::EpollEdge => {
                // SAFETY: plain syscall.
                Some(owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?)
            }
        };
        if let (IoMode::EpollEdge, Some(ep)) = (mode, &epoll) {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: 0,
            };
            // SAFETY: ev is live; the fds are open.
            let rc = unsafe {
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    sock.as_raw_fd(),
                    &mut ev,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            sock,
            mode,
            epoll,
            pipe: None,
            memfd: None,
            memfd_end: 0,
        })
    }

    /// The socket's fd.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The stream.
    pub fn stream(&self) -> &std::net::TcpStream {
        &self.sock
    }

    /// Waits until the socket is ready for `events` (`EPOLLIN`/`EPOLLOUT`);
    /// edge-triggered: until the next edge of any event.
    fn wait(&self, events: u32) -> io::Result<()> {
        // Longer than any scenario's wait for an app, so that a stall is
        // reported by the harness with where both ends were, not by the app.
        const WAIT_MS: libc::c_int = 120_000;
        let timed_out = |what: &str| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: 120 s without readiness"),
            )
        };
        if self.mode == IoMode::Poll {
            // POLLIN and POLLOUT have the values of EPOLLIN and EPOLLOUT.
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: events as libc::c_short,
                revents: 0,
            };
            return loop {
                // SAFETY: pfd is a live array of one pollfd.
                let n = unsafe { libc::poll(&mut pfd, 1, WAIT_MS) };
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break match n {
                    0 => Err(timed_out("poll")),
                    n if n < 0 => Err(io::Error::last_os_error()),
                    _ => Ok(()),
                };
            };
        }
        let Some(ep) = &self.epoll else { return Ok(()) };
        let edge = self.mode == IoMode::EpollEdge;
        let mut ev = libc::epoll_event { events, u64: 0 };
        if !edge {
            // SAFETY: ev is live; the fds are open.
            let rc =
                unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, self.fd(), &mut ev) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let mut out = [libc::epoll_event { events: 0, u64: 0 }];
        let r = loop {
            // SAFETY: out is a live array of one event.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, WAIT_MS) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break if n == 0 {
                Err(timed_out("epoll_wait"))
            } else if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
        };
        if !edge {
            // SAFETY: as above; removing the registration again.
            unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, self.fd(), &mut ev) };
        }
        r
    }

    /// Retries `op` on EINTR, and on EAGAIN after epoll says `events`.
    fn retry(&self, events: u32, mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
        loop {
            match op() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && self.mode != IoMode::Blocking =>
                {
                    self.wait(events)?;
                }
                r => return r,
            }
        }
    }

    fn splice_flags(&self) -> u32 {
        let nonblock = if self.mode != IoMode::Blocking {
            libc::SPLICE_F_NONBLOCK
        } else {
            0
        };
        libc::SPLICE_F_MOVE | nonblock
    }

    fn pipe(&mut self) -> io::Result<(RawFd, RawFd)> {
        if self.pipe.is_none() {
            let mut fds = [0; 2];
            // SAFETY: fds is a live array of two ints.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fresh fds from pipe2.
            self.pipe =
                Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) });
        }
        let (r, w) = self
            .pipe
            .as_ref()
            .map(|(r, w)| (r.as_raw_fd(), w.as_raw_fd()))
            .unwrap_or((-1, -1));
        Ok((r, w))
    }

    /// Sends all of `data` with `method`.
    pub fn send_all(&mut self, method: SendMethod, data: &[u8]) -> io::Result<()> {
        let mut off = 0;
        while off < data.len() {
            let chunk = &data[off..data.len().min(off + 65536)];
            off += self.send_some(method, chunk)?;
        }
        Ok(())
    }

    fn send_some(&mut self, method: SendMethod, chunk: &[u8]) -> io::Result<usize> {
        let fd = self.fd();
        let out = libc::EPOLLOUT as u32;
        match method {
            SendMethod::Write => self.retry(out, || {
                // SAFETY: chunk is a live slice and fd is open.
                cvt(unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) })
            }),
            SendMethod::Send | SendMethod::SendMore => {
                let flags = if method == SendMethod::SendMore {
                    libc::MSG_NOSIGNAL | libc::MSG_MORE
                } else {
                    libc::MSG_NOSIGNAL
                };
                self.retry(out, || {
                    // SAFETY: chunk is a live slice and fd is open.
                    cvt(unsafe { libc::send(fd, chunk.as_ptr().cast(), chunk.len(), flags) })
                })
            }
            SendMethod::Writev | SendMethod::Sendmsg => {
                let half = chunk.len() / 2;
                let iov = [
                    libc::iovec {
                        iov_base: chunk.as_ptr() as *mut _,
                        iov_len: half,
                    },
                    libc::iovec {
                        // SAFETY: half <= len, so the pointer stays inside chunk.
                        iov_base: unsafe { chunk.as_ptr().add(half) } as *mut _,
                        iov_len: chunk.len() - half,
                    },
                ];
                if method == SendMethod::Writev {
                    // SAFETY: iov points at two live iovecs over chunk.
                    self.retry(out, || cvt(unsafe { libc::writev(fd, iov.as_ptr(), 2) }))
                } else {
                    // SAFETY: a zeroed msghdr is valid; the iov stays live.
                    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                    msg.msg_iov = iov.as_ptr() as *mut _;
                    msg.msg_iovlen = 2;
                    self.retry(out, || {
                        // SAFETY: msg points at live iovecs over chunk.
                        cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })
                    })
                }
            }
            SendMethod::Sendfile => {
                if self.memfd.is_none() {
                    // SAFETY: the name is a valid C string.
                    self.memfd = Some(owned(unsafe {
                        libc::memfd_create(c"tlshub-testapp".as_ptr(), libc::MFD_CLOEXEC)
                    })?);
                }
                let mfd = self.memfd.as_ref().map(|m| m.as_raw_fd()).unwrap_or(-1);
                // SAFETY: chunk is live; mfd is open.
                cvt(unsafe {
                    libc::pwrite(mfd, chunk.as_ptr().cast(), chunk.len(), self.memfd_end)
                })?;
                let mut offset: libc::off_t = self.memfd_end;
                self.memfd_end += chunk.len() as libc::off_t;
                self.retry(out, || {
                    // SAFETY: offset is a live off_t.
                    cvt(unsafe { libc::sendfile(fd, mfd, &mut offset, chunk.len()) })
                })
            }
            SendMethod::Splice => {
                let (r, w) = self.pipe()?;
                // A pipe holds 64 KiB by default, the chunk size.
                // SAFETY: chunk is live; w is open.
                let n = cvt(unsafe { libc::write(w, chunk.as_ptr().cast(), chunk.len()) })?;
                let mut moved = 0;
                while moved < n {
                    moved += self.retry(out, || {
                        // SAFETY: plain fds, null offsets (pipe and socket).
                        cvt(unsafe {
                            libc::splice(
                                r,
                                std::ptr::null_mut(),
                                fd,
                                std::ptr::null_mut(),
                                n - moved,
                                self.splice_flags(),
                            )
                        })
                    })?;
                }
                Ok(n)
            }
            SendMethod::IoUringWrite => {
                // Offset 0 on a socket, which is not seekable: "the
                // current position".
                let op = io_uring::opcode::Write::new(
                    io_uring::types::Fd(fd),
                    chunk.as_ptr(),
                    chunk.len() as u32,
                )
                .build();
                self.retry(out, || io_uring_data(&op))
            }
            SendMethod::IoUring | SendMethod::IoUringAsync | SendMethod::IoUringSqpoll => {
                let op = io_uring::opcode::Send::new(
                    io_uring::types::Fd(fd),
                    chunk.as_ptr(),
                    chunk.len() as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build();
                let issuer = UringIssuer::of_send(method);
                self.retry(out, || io_uring_data_by(issuer, &op))
            }
        }
    }

    /// Receives up to `buf.len()` bytes with `method`; 0 means end of stream.
    pub fn recv_some(&mut self, method: RecvMethod, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd();
        let inn = libc::EPOLLIN as u32;
        match method {
            RecvMethod::Read => self.retry(inn, || {
                // SAFETY: buf is live and writable; fd is open.
                cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
            }),
            RecvMethod::Recv => self.retry(inn, || {
                // SAFETY: buf is live and writable; fd is open.
                cvt(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
            }),
            RecvMethod::Recvmsg => {
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                // SAFETY: a zeroed msghdr is valid.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                // SAFETY: msg points at a live iovec over buf.
                self.retry(inn, || cvt(unsafe { libc::recvmsg(fd, &mut msg, 0) }))
            }
            RecvMethod::Splice => {
                let (r, w) = self.pipe()?;
                let want = buf.len().min(65536);
                let flags = self.splice_flags();
                let n = self.retry(inn, || {
                    // SAFETY: plain fds, null offsets (socket and pipe).
                    cvt(unsafe {
                        libc::splice(
                            fd,
                            std::ptr::null_mut(),
                            w,
                            std::ptr::null_mut(),
                            want,
                            flags,
                        )
                    })
                })?;
                let mut got = 0;
                while got < n {
                    // SAFETY: buf[got..n] is live and writable.
                    got += cvt(unsafe { libc::read(r, buf[got..].as_mut_ptr().cast(), n - got) })?;
                }
                Ok(n)
            }
            RecvMethod::IoUringRead => {
                let op = io_uring::opcode::Read::new(
                    io_uring::types::Fd(fd),
                    buf.as_mut_ptr(),
                    buf.len() as u32,
                )
                .build();
                self.retry(inn, || io_uring_data(&op))
            }
            RecvMethod::IoUring | RecvMethod::IoUringAsync | RecvMethod::IoUringSqpoll => {
                let op = io_uring::opcode::Recv::new(
                    io_uring::types::Fd(fd),
                    buf.as_mut_ptr(),
                    buf.len() as u32,
                )
                .build();
                let issuer = UringIssuer::of_recv(method);
                self.retry(inn, || io_uring_data_by(issuer, &op))
            }
        }
    }

    /// Receives exactly `buf.len()` bytes.
    pub fn recv_exact(&mut self, method: RecvMethod, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv_some(method, &mut buf[got..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {got} of {} bytes", buf.len()),
                ));
            }
            got += n;
        }
        Ok(())
    }
}

/// Disconnects a connected socket (`connect()` to an `AF_UNSPEC`
/// address): its connection ends (the peer gets a reset) and the socket can
/// connect again, keeping its cookie.
pub fn disconnect(sock: &socket2::Socket) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr is a valid AF_UNSPEC (0) address.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: addr is a live sockaddr of the given length; the fd is open.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How an application gets its connected socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// connect(2) / accept(2).
    Syscall,
    /// `IORING_OP_CONNECT` / `IORING_OP_ACCEPT`: no connect/accept system
    /// call at all, so no syscall hook sees the socket's owner.
    IoUring,
    /// The 32-bit system call entry (`int $0x80`, `socketcall`), which any
    /// x86-64 process may use: not the 64-bit connect/accept entry points
    /// the owner hooks watch. IPv4 only.
    Int80,
}

/// `socketcall(call, args)` through the 32-bit entry (`int $0x80`), with
/// its argument words in memory below 4 GiB (`MAP_32BIT`), since that
/// entry sees 32-bit pointers only.
fn socketcall_int80(call: u32, args: [u32; 3], sockaddr: Option<&[u8]>) -> io::Result<i32> {
    const SYS_SOCKETCALL_32: i32 = 102;
    // SAFETY: a fresh private anonymous mapping; checked below.
    let low = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if low == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let words = low.cast::<u32>();
    let mut args = args;
    if let Some(addr) = sockaddr {
        // The address goes after the three argument words; the second word
        // points at it.
        let at = low as usize + 64;
        // SAFETY: the mapping is 4096 bytes; addr is at most 128 bytes.
        unsafe { std::ptr::copy_nonoverlapping(addr.as_ptr(), at as *mut u8, addr.len()) };
        args[1] = at as u32;
    }
    // SAFETY: three u32 words at the start of the mapping.
    unsafe { std::ptr::copy_nonoverlapping(args.as_ptr(), words, 3) };
    let ret: i32;
    // SAFETY: the 32-bit socketcall reads three words at `words` (below
    // 4 GiB) and the address they point to. rbx is reserved by LLVM, so the
    // call number goes through a scratch register and back.
    unsafe {
        std::arch::asm!(
            "xchg {call:r}, rbx",
            "int 0x80",
            "xchg {call:r}, rbx",
            call = inout(reg) u64::from(call) => _,
            inlateout("eax") SYS_SOCKETCALL_32 => ret,
            in("ecx") words as u32,
            // Kernels before 4.17 cleared these on this entry.
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
        );
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(low, 4096) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(ret)
}

/// connect() through the 32-bit entry (see [`Via::Int80`]).
pub fn connect_int80(target: std::net::SocketAddr) -> io::Result<std::net::TcpStream> {
    const SYS_CONNECT: u32 = 3;
    let std::net::SocketAddr::V4(v4) = target else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "int80: IPv4 only",
        ));
    };
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    let mut addr = [0u8; 16];
    addr[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    addr[2..4].copy_from_slice(&v4.port().to_be_bytes());
    addr[4..8].copy_from_slice(&v4.ip().octets());
    socketcall_int80(
        SYS_CONNECT,
        [sock.as_raw_fd() as u32, 0, addr.len() as u32],
        Some(&addr),
    )?;
    Ok(sock.into())
}

/// accept() through the 32-bit entry (see [`Via::Int80`]).
pub fn accept_int80(l: &std::net::TcpListener) -> io::Result<std::net::TcpStream> {
    const SYS_ACCEPT: u32 = 5;
    let fd = socketcall_int80(SYS_ACCEPT, [l.as_raw_fd() as u32, 0, 0], None)?;
    Ok(owned(fd)?.into())
}

/// io_uring completions that failed with `EINTR` (and were submitted
/// again) in this process: the gate's hold interrupts a request, since
/// io_uring does not restart one that a signal interrupted.
pub static URING_INTERRUPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs one data operation through io_uring and submits it again while it
/// completes with `EINTR`, counting each.
fn io_uring_data(entry: &io_uring::squeue::Entry) -> io::Result<usize> {
    io_uring_data_by(UringIssuer::Submitter, entry)
}

/// Which thread issues an io_uring request: the gate stops the calling
/// process by a signal to the calling thread, and two of these are
/// threads io_uring creates, not the app's.
#[derive(Debug, Clone, Copy)]
enum UringIssuer {
    /// The thread that submits it (io_uring's first, non-blocking try).
    Submitter,
    /// An io-wq worker thread (`IOSQE_ASYNC`).
    Worker,
    /// The ring's kernel submission thread (`IORING_SETUP_SQPOLL`).
    SqPoll,
}

impl UringIssuer {
    fn of_send(method: SendMethod) -> Self {
        match method {
            SendMethod::IoUringAsync => Self::Worker,
            SendMethod::IoUringSqpoll => Self::SqPoll,
            _ => Self::Submitter,
        }
    }

    fn of_recv(method: RecvMethod) -> Self {
        match method {
            RecvMethod::IoUringAsync => Self::Worker,
            RecvMethod::IoUringSqpoll => Self::SqPoll,
            _ => Self::Submitter,
        }
    }
}

/// [`io_uring_data`] with the request issued by `issuer`.
fn io_uring_data_by(issuer: UringIssuer, entry: &io_uring::squeue::Entry) -> io::Result<usize> {
    let (mut ring, entry) = match issuer {
        UringIssuer::Submitter => (io_uring::IoUring::new(2)?, entry.clone()),
        UringIssuer::Worker => (
            io_uring::IoUring::new(2)?,
            entry.clone().flags(io_uring::squeue::Flags::ASYNC),
        ),
        UringIssuer::SqPoll => (
            io_uring::IoUring::builder().setup_sqpoll(100).build(2)?,
            entry.clone(),
        ),
    };
    io_uring_retrying(&mut ring, &entry)
}

/// [`io_uring_on`], submitting the operation again while it completes with
/// `EINTR` (the gate's hold interrupted it), counting each.
fn io_uring_retrying(
    ring: &mut io_uring::IoUring,
    entry: &io_uring::squeue::Entry,
) -> io::Result<usize> {
    loop {
        match io_uring_on(ring, entry) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                URING_INTERRUPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r => return r.map(|n| n as usize),
        }
    }
}

/// Registers a file table of one empty slot with `ring`, for a direct
/// descriptor.
fn register_one_slot(ring: &io_uring::IoUring) -> io::Result<usize> {
    ring.submitter().register_files_sparse(1).map(|()| 0)
}

/// The table's first slot as an operation's destination.
fn first_slot() -> io::Result<io_uring::types::DestinationSlot> {
    io_uring::types::DestinationSlot::try_from_slot_target(0)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sends all of `data` through the ring's registered file `slot`, each
/// request run by `run`.
fn send_all_on_slot(
    run: &dyn Fn(&io_uring::squeue::Entry) -> io::Result<usize>,
    slot: io_uring::types::Fixed,
    data: &[u8],
) -> io::Result<usize> {
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        off += run(&io_uring::opcode::Send::new(slot, rest.as_ptr(), rest.len() as u32).build())?;
    }
    Ok(off)
}

/// Fills `buf` from the ring's registered file `slot`, each request run by
/// `run` (`UnexpectedEof` if the stream ends first).
fn recv_exact_on_slot(
    run: &dyn Fn(&io_uring::squeue::Entry) -> io::Result<usize>,
    slot: io_uring::types::Fixed,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let op = io_uring::opcode::Recv::new(slot, rest.as_mut_ptr(), rest.len() as u32).build();
        match run(&op)? {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n => got += n,
        }
    }
    Ok(got)
}

/// Runs one io_uring operation to completion and returns its result.
fn io_uring_one(entry: &io_uring::squeue::Entry) -> io::Result<i32> {
    io_uring_on(&mut io_uring::IoUring::new(2)?, entry)
}

/// [`io_uring_one`] on `ring` (which may hold registered files).
fn io_uring_on(ring: &mut io_uring::IoUring, entry: &io_uring::squeue::Entry) -> io::Result<i32> {
    // SAFETY: everything the entry points to (the socket fd, the address)
    // is owned by the caller and outlives this call, which waits for the
    // completion before returning.
    unsafe { ring.submission().push(entry) }.map_err(io::Error::other)?;
    // A signal (the gate's stop and continue) may end the wait early, and a
    // wait that also submitted returns the count submitted even so (the
    // request may still run on another thread: an io-wq worker, the
    // SQPOLL thread). The operation was submitted once and is waited for
    // again, never resubmitted, so its completion is the one the kernel
    // gave.
    let cqe = loop {
        if let Some(cqe) = ring.completion().next() {
            break cqe;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(cqe.result())
}

/// connect() through io_uring (blocking socket; the completion arrives once
/// the connection is established).
pub fn connect_io_uring(target: std::net::SocketAddr) -> io::Result<std::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    let addr = socket2::SockAddr::from(target);
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(sock.as_raw_fd()),
        addr.as_ptr().cast(),
        addr.len(),
    )
    .build();
    io_uring_one(&op)?;
    Ok(sock.into())
}

/// accept() through io_uring.
pub fn accept_io_uring(l: &std::net::TcpListener) -> io::Result<std::net::TcpStream> {
    let op = io_uring::opcode::Accept::new(
        io_uring::types::Fd(l.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC)
    .build();
    let fd = io_uring_one(&op)?;
    Ok(owned(fd)?.into())
}

/// How a connection reaches the process that moves its bytes. Each way
/// other than `none` leaves the OWNER event naming a process that no longer
/// has the socket, so the core must find it in the process the gate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handoff {
    /// The process that connected or accepted moves the bytes.
    None,
    /// A forked child inherits the socket, and the parent closes its copy
    /// at once (the inetd/sshd pattern).
    Fork,
    /// A forked child closes the socket it inherited, puts another file at
    /// that descriptor number, and receives the socket through
    /// `SCM_RIGHTS` (at another number); the parent closes its copy once
    /// it has sent it (an acceptor feeding a worker).
    ScmRights,
    /// A forked child closes the socket it inherited, puts another file at
    /// that descriptor number, and takes the socket out of its parent's fd
    /// table with `pidfd_getfd()` (at another number), as a supervisor or
    /// debugger can; the parent closes its copy once the child has it.
    PidfdGetfd,
}

/// Hands `sock` to a forked child as `how` says, and runs `body` on it
/// there, while the parent closes its own copy. The child's result comes
/// back over a Unix socket as (bytes sent, bytes received) or the error
/// text. Call only while the process has one thread.
pub fn in_child(
    sock: std::net::TcpStream,
    how: Handoff,
    body: impl FnOnce(std::net::TcpStream) -> io::Result<(u64, u64)>,
) -> io::Result<(u64, u64)> {
    use std::io::{Read, Write};
    let (mut parent_end, mut child_end) = std::os::unix::net::UnixStream::pair()?;
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // starts with consistent locks; it leaves through _exit only.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(parent_end);
        let run = || -> io::Result<(u64, u64)> {
            let sock = match how {
                Handoff::ScmRights => {
                    drop(sock);
                    // Takes the descriptor number the socket had: a core that
                    // looked the socket up by number here would find this.
                    let _placeholder = std::fs::File::open("/dev/null")?;
                    receive_socket(&child_end)?
                }
                Handoff::PidfdGetfd => {
                    let number = sock.as_raw_fd();
                    drop(sock);
                    let _placeholder = std::fs::File::open("/dev/null")?;
                    let taken = tlshub_provider_sdk::socket::take_fd(
                        std::os::unix::process::parent_id(),
                        number,
                    );
                    // The parent waits for this byte before it closes its
                    // copy, whether the take worked or not.
                    child_end.write_all(b"t")?;
                    std::net::TcpStream::from(taken?)
                }
                Handoff::Fork | Handoff::None => sock,
            };
            body(sock)
        };
        let line = match run() {
            Ok((sent, received)) => format!("ok {sent} {received}"),
            Err(e) => format!("err {} {e}", e.raw_os_error().unwrap_or(0)),
        };
        let _ = child_end.write_all(line.as_bytes());
        drop(child_end);
        // SAFETY: _exit ends the child without running the parent's atexit
        // handlers or destructors twice.
        unsafe { libc::_exit(0) };
    }
    drop(child_end);
    if how == Handoff::ScmRights {
        send_socket(&parent_end, &sock)?;
    }
    if how == Handoff::PidfdGetfd {
        let mut taken = [0u8; 1];
        parent_end.read_exact(&mut taken)?;
    }
    drop(sock);
    let mut line = String::new();
    parent_end.read_to_string(&mut line)?;
    let mut status = 0;
    // SAFETY: waits for the child forked above; status is a live local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("ok"), Some(s), Some(r)) => Ok((s.parse().unwrap_or(0), r.parse().unwrap_or(0))),
        (Some("err"), Some(errno), _) => {
            let text = words.collect::<Vec<_>>().join(" ");
            match errno.parse::<i32>() {
                Ok(n) if n != 0 => Err(io::Error::from_raw_os_error(n)),
                _ => Err(io::Error::other(text)),
            }
        }
        _ => Err(io::Error::other(format!(
            "child reported {line:?} (status {status})"
        ))),
    }
}

/// Sends `sock` over `via` as an `SCM_RIGHTS` message (one byte of data).
fn send_socket(via: &std::os::unix::net::UnixStream, sock: &std::net::TcpStream) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [std::os::fd::AsFd::as_fd(sock)];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("SCM_RIGHTS message does not fit"));
    }
    rustix::net::sendmsg(
        via,
        &[io::IoSlice::new(b"s")],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receives the socket [`send_socket`] sent over `via`.
fn receive_socket(via: &std::os::unix::net::UnixStream) -> io::Result<std::net::TcpStream> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        via,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg
            && let Some(fd) = fds.next()
        {
            return Ok(std::net::TcpStream::from(fd));
        }
    }
    Err(io::Error::other("no socket in the SCM_RIGHTS message"))
}

/// Whether and how a client uses TCP Fast Open for its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FastOpen {
    /// connect(), then send.
    Off,
    /// `sendto(MSG_FASTOPEN)` on the unconnected socket: connects and sends.
    Sendto,
    /// `TCP_FASTOPEN_CONNECT`, connect(), then the first write (which goes
    /// in the SYN once a cookie for the server is cached).
    Connect,
}

/// Connects to `target` with Fast Open as `how` says (over Multipath TCP
/// if `mptcp`), `first` being the first bytes to send. Returns the stream
/// and how many bytes of `first` went out, or `None` for the count when
/// the send was refused with `EOPNOTSUPP` (the kernel's answer when client
/// Fast Open is off) and the client fell back to connect() as a careful
/// application does (nothing was sent then).
pub fn connect_fastopen(
    target: std::net::SocketAddr,
    how: FastOpen,
    first: &[u8],
    mptcp: bool,
) -> io::Result<(std::net::TcpStream, Option<usize>)> {
    let sock = if mptcp {
        mptcp_socket(target)?
    } else {
        tcp_socket(target)?
    };
    let fd = sock.as_raw_fd();
    let sent = match how {
        FastOpen::Off => {
            sock.connect(&target.into())?;
            return Ok((sock.into(), Some(0)));
        }
        FastOpen::Sendto => {
            let addr = socket2::SockAddr::from(target);
            // SAFETY: first and addr are live for the call, lengths match.
            cvt(unsafe {
                libc::sendto(
                    fd,
                    first.as_ptr().cast(),
                    first.len(),
                    libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
                    addr.as_ptr().cast(),
                    addr.len(),
                )
            })
        }
        FastOpen::Connect => {
            tlshub_ktls::set_option(
                sock.as_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN_CONNECT,
                &1 as &libc::c_int,
            )?;
            sock.connect(&target.into())?;
            // SAFETY: first is live for the call.
            cvt(unsafe { libc::send(fd, first.as_ptr().cast(), first.len(), libc::MSG_NOSIGNAL) })
        }
    };
    match sent {
        Ok(n) => Ok((sock.into(), Some(n))),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            drop(sock);
            Ok((std::net::TcpStream::connect(target)?, None))
        }
        Err(e) => Err(e),
    }
}

/// An unusual socket call that `tlshub-testapp probe` makes on a fresh
/// connection, to see what the gate and kTLS make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// `send(MSG_OOB)` of the payload.
    Oob,
    /// `SO_ZEROCOPY`, then `send(MSG_ZEROCOPY)` of the payload.
    Zerocopy,
    /// `getsockopt(TCP_ZEROCOPY_RECEIVE)` right after connect(), and again
    /// after a one-byte write (which waits for the keys).
    ZerocopyReceive,
    /// `TCP_REPAIR` on, connect() (no handshake in repair mode),
    /// `TCP_REPAIR` off, then `write()` of the payload.
    Repair,
    /// `TCP_MD5SIG` keys for unrelated addresses until the kernel refuses
    /// one with `ENOMEM` (the socket's option memory, `net.core.optmem_max`,
    /// is full), then connect() and `write()` of the payload.
    FullOptionMemory,
    /// [`RACE_ATTEMPTS`] sockets, each with a second thread that sends the
    /// payload over and over (`EPIPE`: not connected) while the first
    /// connects it, until a send is answered otherwise: a send that passed
    /// the gate before connect() could otherwise wait for the handshake
    /// and go out in clear.
    SendRacingConnect,
    /// One socket connected twice: to `--connect` (a selected peer; the
    /// scenario makes this connection refused) and a write of the payload;
    /// then disconnected (`connect(AF_UNSPEC)`), and, once `--go-file`
    /// exists if one is given, connected to `--then` for an exchange of the
    /// payload. See [`refused_then_reconnect`].
    RefusedThenReconnect,
    /// [`CONNECT_FLOOD`] non-blocking sockets connecting to `--connect` (a
    /// selected address where nobody answers), one send on each (TCP's
    /// answer in `SYN_SENT` is `EAGAIN`), held until `--go-file` exists.
    ConnectFlood,
    /// [`MANY_WAITING`] connections of one process to `--connect` (a
    /// selected peer that accepts none of them, so none can be keyed), each
    /// connected in turn and left non-blocking; once `--go-file` exists,
    /// one send of the payload on each, reported as a step of its own:
    /// `EAGAIN` (still waiting for keys) or `ECONNRESET`/`EPIPE` (the
    /// connection was reset).
    ManyWaiting,
    /// A socket bound to `--connect` (an address of the probe's own pod)
    /// that connects to that same address and port: TCP completes it with
    /// itself (a simultaneous open with one socket as both ends). Then a
    /// write of the payload and a read of it back; bytes that come back
    /// other than written fail the "compare" step with `EILSEQ`.
    SelfConnect,
    /// A thread that first gives itself an fd table of its own
    /// (`unshare(CLONE_FILES)`, as sandboxing thread pools do) connects a
    /// blocking socket to `--connect` (a peer that echoes like
    /// `tlshub-loadgen server`) and exchanges the payload; the process's
    /// other fd table never holds the socket. Its reads and writes give up
    /// after [`OWN_FD_TABLE_WAIT`] (`EAGAIN`) rather than hang.
    OwnFdTable,
    /// [`Probe::OwnFdTable`], with the socket non-blocking under
    /// edge-triggered epoll (an event loop): steps "unshare(CLONE_FILES)",
    /// "connect", "exchange"; a wait for a readiness edge gives up after
    /// 120 s (`ETIMEDOUT`).
    OwnFdTableEventLoop,
    /// The process's main thread exits on its own (`SYS_exit`, as
    /// `pthread_exit()` from `main()` does; see [`exit_main_thread`]), and
    /// another thread, once the main one is a zombie, connects a blocking
    /// socket to `--connect` (a peer that echoes like `tlshub-loadgen
    /// server`) and exchanges the payload. The process's fd table then
    /// belongs to a thread that is not its leader; reads and writes give up
    /// after [`OWN_FD_TABLE_WAIT`].
    MainThreadExits,
    /// A socket that never has an fd: io_uring makes it straight into the
    /// ring's registered file table (`IORING_OP_SOCKET` with a file index,
    /// a "direct descriptor", as liburing servers use them), then connects
    /// it to `--connect` (a peer that echoes like `tlshub-loadgen server`),
    /// sends the payload, receives the echo and compares, all through that
    /// slot (`IOSQE_FIXED_FILE`). A send interrupted by the gate's hold
    /// (`EINTR`) is submitted again.
    IoUringDirect,
    /// A process with a `SIGCONT` handler installed without `SA_RESTART`
    /// (as terminal programs install one to redraw after `fg`) connects a
    /// blocking socket to `--connect` (a peer that echoes like
    /// `tlshub-loadgen server`) and writes the payload with one `write()`,
    /// its own step ("first write"): the gate's hold stops the process and
    /// the core's `SIGCONT` runs the handler, and a call that a handler
    /// interrupted is not restarted without `SA_RESTART`, so a held write
    /// fails with `EINTR` having sent nothing. Then what is left is written
    /// and the echo read, each call retried on `EINTR` as most I/O code
    /// does ("exchange"), and compared (`EBADMSG`); the last step's name
    /// says how often the handler ran.
    SigcontHandler,
    /// The server end of [`Self::IoUringDirect`]: listens on `--connect`
    /// (an address of the probe's own pod), accepts one connection straight
    /// into the ring's registered file table (`IORING_OP_ACCEPT` with a
    /// file index), receives as many bytes as the payload and answers with
    /// as many of the server pattern, as `tlshub-loadgen server` does, all
    /// through that slot. A request interrupted by the gate's hold is
    /// submitted again.
    IoUringDirectAccept,
    /// A blocking client that echoes the payload through `--connect` (a
    /// peer that answers like `tlshub-loadgen server`): steps "set
    /// timeouts", "connect", "exchange".
    Echo,
}

/// How long [`Probe::OwnFdTable`]'s reads and writes wait.
pub const OWN_FD_TABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How many connections [`Probe::ManyWaiting`] opens.
pub const MANY_WAITING: usize = 24;

/// How many sockets [`Probe::ConnectFlood`] leaves connecting.
pub const CONNECT_FLOOD: usize = 64;

/// What some probes need besides the target.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// [`Probe::RefusedThenReconnect`]: where the socket connects again (a
    /// peer that echoes like `tlshub-loadgen server`).
    pub then: Option<std::net::SocketAddr>,
    /// The probe's last step waits until this file exists (at most
    /// [`GO_FILE_WAIT`]).
    pub go_file: Option<std::path::PathBuf>,
}

/// How long a probe waits for its go file.
pub const GO_FILE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How many sockets [`Probe::SendRacingConnect`] races.
pub const RACE_ATTEMPTS: usize = 30;

/// An unconnected TCP socket of `target`'s family.
fn tcp_socket(target: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
}

/// One [`Probe::SendRacingConnect`] attempt: the connect() and the first
/// send that was not answered `EPIPE` (or the first after connect()
/// returned: a connect that failed leaves the socket unconnected for good).
fn send_racing_connect(target: std::net::SocketAddr, payload: &[u8]) -> [ProbeStep; 2] {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let sock = match tcp_socket(target) {
        Ok(s) => s,
        Err(e) => {
            let failed = step("socket", Err(e));
            return [failed.clone(), failed];
        }
    };
    let fd = sock.as_raw_fd();
    let tries = AtomicU32::new(0);
    let connect_returned = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            loop {
                let after_connect = connect_returned.load(Ordering::Acquire);
                let r = send_flags(fd, payload, 0);
                match &r {
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) && !after_connect => {
                        // Not connected yet; keep the sends coming.
                        tries.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break step("send racing connect", r),
                }
            }
        });
        // Connect once the sender is spinning.
        while tries.load(Ordering::Relaxed) < 3 && !sender.is_finished() {
            std::hint::spin_loop();
        }
        let connected = step("connect", sock.connect(&target.into()).map(|()| 0));
        connect_returned.store(true, Ordering::Release);
        let sent = sender.join().unwrap_or(ProbeStep {
            call: "send racing connect".into(),
            errno: -1,
        });
        [connected, sent]
    })
}

/// One step of a probe and its errno (0: it succeeded).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeStep {
    /// What was called.
    pub call: std::borrow::Cow<'static, str>,
    /// Its errno, 0 on success.
    pub errno: i32,
}

fn step(call: &'static str, r: io::Result<usize>) -> ProbeStep {
    ProbeStep {
        call: call.into(),
        errno: r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1)),
    }
}

/// `setsockopt()` of a C `int`, as the probes count a call (0 on success).
fn set_int(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<usize> {
    tlshub_ktls::set_option(fd, level, name, &value).map(|()| 0)
}

/// `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// Adds `TCP_MD5SIG` keys for addresses in 240.0.0.0/4 (reserved, never a
/// peer) until one is refused; returns that error (`ENOMEM` once the
/// socket's option memory is full), or an error if every key fitted.
fn fill_option_memory(fd: std::os::fd::BorrowedFd<'_>) -> io::Error {
    for i in 0u32..20_000 {
        // SAFETY: all-zero is a valid sockaddr_storage and key.
        let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::to_be(0xf000_0000 | (i + 1)),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in fits in sockaddr_storage; both are plain data.
        unsafe { std::ptr::write((&raw mut sig.addr).cast::<libc::sockaddr_in>(), sin) };
        sig.keylen = 16;
        sig.key[..16].fill(0x5a);
        if let Err(e) = tlshub_ktls::set_option(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig) {
            return e;
        }
    }
    io::Error::other("20,000 TCP_MD5SIG keys fitted in the option memory")
}

/// `TCP_ZEROCOPY_RECEIVE` with an empty request (`struct
/// tcp_zerocopy_receive` is 64 bytes on the tested kernels; all zero asks
/// for nothing to be mapped).
fn zerocopy_receive(fd: RawFd) -> io::Result<usize> {
    const TCP_ZEROCOPY_RECEIVE: libc::c_int = 35;
    let mut zc = [0u8; 64];
    let mut len = zc.len() as libc::socklen_t;
    // SAFETY: zc is a live, writable buffer of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_ZEROCOPY_RECEIVE,
            zc.as_mut_ptr().cast(),
            &mut len,
        )
    };
    cvt(rc as isize)
}

fn send_flags(fd: RawFd, payload: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: payload is a live slice; fd is open.
    cvt(unsafe {
        libc::send(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    })
}

/// Writes `payload` (the client pattern from offset 0) and reads the same
/// length back, which must be the server pattern from offset 0 (what
/// `tlshub-loadgen server` answers); `EBADMSG` if it is not.
fn echo_exchange(sock: &socket2::Socket, payload: &[u8]) -> io::Result<usize> {
    echo_rest(sock, payload, 0)
}

/// [`echo_exchange`] when the first `sent` bytes of `payload` went out
/// already.
fn echo_rest(
    mut s: impl std::io::Read + std::io::Write,
    payload: &[u8],
    sent: usize,
) -> io::Result<usize> {
    s.write_all(&payload[sent..])?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)?;
    let mut want = vec![0u8; payload.len()];
    crate::pattern::fill(crate::pattern::SERVER_SEED, 0, &mut want);
    if back != want {
        return Err(io::Error::from_raw_os_error(libc::EBADMSG));
    }
    Ok(payload.len())
}

/// [`Probe::SelfConnect`]: bind, connect, write, read back and compare,
/// until a step fails. The socket is closed abortively (`SO_LINGER` 0),
/// so that no `TIME_WAIT` keeps its one 4-tuple from the next run.
fn self_connect(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    use std::io::{Read, Write};
    let sock = match tcp_socket(target) {
        Ok(s) => s,
        Err(e) => return vec![step("socket", Err(e))],
    };
    if let Err(e) = sock.set_linger(Some(std::time::Duration::ZERO)) {
        return vec![step("setsockopt(SO_LINGER)", Err(e))];
    }
    let back = std::cell::RefCell::new(vec![0u8; payload.len()]);
    let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 5] = [
        ("bind", &|| sock.bind(&target.into()).map(|()| 0)),
        ("connect", &|| sock.connect(&target.into()).map(|()| 0)),
        ("write", &|| {
            (&sock).write_all(payload).map(|()| payload.len())
        }),
        ("read back", &|| {
            (&sock)
                .read_exact(&mut back.borrow_mut())
                .map(|()| payload.len())
        }),
        ("compare", &|| {
            if *back.borrow() == payload {
                Ok(payload.len())
            } else {
                Err(io::Error::from_raw_os_error(libc::EILSEQ))
            }
        }),
    ];
    let mut steps = Vec::new();
    run_in_order(&mut steps, &calls);
    steps
}

/// [`Probe::OwnFdTable`]: the steps of the thread with its own fd table.
fn own_fd_table(target: std::net::SocketAddr, payload: &[u8], event_loop: bool) -> Vec<ProbeStep> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: from here this thread has a copy of the process's
                // fd table. It uses only the socket it makes below, and
                // closes it before it ends; no fd crosses to another thread
                // either way.
                let unshared = cvt(unsafe { libc::unshare(libc::CLONE_FILES) } as isize);
                let mut steps = vec![step("unshare(CLONE_FILES)", unshared)];
                if steps[0].errno != 0 {
                    return steps;
                }
                if event_loop {
                    steps.extend(edge_triggered_echo(target, payload));
                } else {
                    steps.extend(blocking_echo(target, payload));
                }
                steps
            })
            .join()
            .unwrap_or_else(|_| vec![step("thread", Err(io::Error::other("panicked")))])
    })
}

/// Ends the calling thread alone (`SYS_exit`, not `exit_group`), as
/// `pthread_exit()` from `main()` does in a C program: the process lives on
/// in its other threads, and its thread-group leader is a zombie whose fd
/// table is gone ([`Probe::MainThreadExits`]).
pub fn exit_main_thread() -> ! {
    // SAFETY: the thread ends here without unwinding: its frames are never
    // resumed and their destructors never run (a leak, not a use after
    // free), and no other thread borrows from its stack (threads spawned
    // with std::thread::spawn own what they use).
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    unreachable!("SYS_exit returned")
}

/// [`Probe::MainThreadExits`], on the thread that goes on: waits (at most
/// 10 s) until the main thread is a zombie, then connects and echoes.
fn after_main_thread_exits(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    let main_gone = || {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", std::process::id()))
            .unwrap_or_default();
        // The state follows the command name's closing parenthesis.
        stat.rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let waited = loop {
        if main_gone() {
            break Ok(0);
        }
        if std::time::Instant::now() > deadline {
            break Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut steps = vec![step("wait for the main thread to exit", waited)];
    if steps[0].errno != 0 {
        return steps;
    }
    steps.extend(blocking_echo(target, payload));
    steps
}

/// Connects, then makes the socket non-blocking under edge-triggered
/// epoll (as tokio, Go and nginx do) and echoes `payload` through it:
/// "connect", "exchange" (`EBADMSG` if the echo differs). A wait with no
/// readiness edge for 120 s fails with `ETIMEDOUT`.
fn edge_triggered_echo(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    let stream = match std::net::TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => return vec![step("connect", Err(e))],
    };
    let exchange = || -> io::Result<usize> {
        let mut conn = Conn::new(stream, IoMode::EpollEdge)?;
        conn.send_all(SendMethod::Write, payload)?;
        let mut back = vec![0u8; payload.len()];
        conn.recv_exact(RecvMethod::Read, &mut back)?;
        let mut want = vec![0u8; payload.len()];
        crate::pattern::fill(crate::pattern::SERVER_SEED, 0, &mut want);
        if back == want {
            Ok(payload.len())
        } else {
            Err(io::Error::from_raw_os_error(libc::EBADMSG))
        }
    };
    vec![step("connect", Ok(0)), step("exchange", exchange())]
}

/// Connects a blocking socket that waits at most [`OWN_FD_TABLE_WAIT`] per
/// call and echoes `payload` through it: "set timeouts", "connect",
/// "exchange".
fn blocking_echo(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    let sock = match tcp_socket(target) {
        Ok(s) => s,
        Err(e) => return vec![step("socket", Err(e))],
    };
    let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 3] = [
        ("set timeouts", &|| {
            sock.set_read_timeout(Some(OWN_FD_TABLE_WAIT))?;
            sock.set_write_timeout(Some(OWN_FD_TABLE_WAIT)).map(|()| 0)
        }),
        ("connect", &|| sock.connect(&target.into()).map(|()| 0)),
        ("exchange", &|| echo_exchange(&sock, payload).map(|_| 0)),
    ];
    let mut steps = Vec::new();
    run_in_order(&mut steps, &calls);
    steps
}

/// How often [`Probe::SigcontHandler`]'s handler ran.
static SIGCONT_HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn count_sigcont(_: libc::c_int) {
    // An atomic add is async-signal-safe.
    SIGCONT_HANDLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// [`Probe::SigcontHandler`]: steps "sigaction(SIGCONT)", "connect",
/// "first write", "exchange", then "SIGCONT handled N times" (errno 0),
/// until one fails.
fn sigcont_handler(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    // SAFETY: a zeroed `sigaction` is a valid value to fill in; the handler
    // only adds to an atomic.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = count_sigcont as extern "C" fn(libc::c_int) as usize;
        // No SA_RESTART: an interrupted call fails with EINTR.
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        cvt(libc::sigaction(libc::SIGCONT, &action, std::ptr::null_mut()) as isize)
    };
    let mut steps = vec![step("sigaction(SIGCONT) without SA_RESTART", installed)];
    if steps[0].errno != 0 {
        return steps;
    }
    let sock = match std::net::TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => {
            steps.push(step("connect", Err(e)));
            return steps;
        }
    };
    steps.push(step("connect", Ok(0)));
    let limit = Some(OWN_FD_TABLE_WAIT);
    if let Err(e) = sock
        .set_read_timeout(limit)
        .and(sock.set_write_timeout(limit))
    {
        steps.push(step("set timeouts", Err(e)));
        return steps;
    }
    // SAFETY: payload is live for the call.
    let first =
        cvt(unsafe { libc::write(sock.as_raw_fd(), payload.as_ptr().cast(), payload.len()) });
    let sent = *first.as_ref().unwrap_or(&0);
    let interrupted = matches!(&first, Err(e) if e.kind() == io::ErrorKind::Interrupted);
    steps.push(step("first write", first));
    if steps[2].errno != 0 && !interrupted {
        return steps;
    }
    // `write_all` and `read_exact` retry EINTR.
    steps.push(step("exchange", echo_rest(&sock, payload, sent)));
    if steps[3].errno == 0 {
        let handled = SIGCONT_HANDLED.load(std::sync::atomic::Ordering::Relaxed);
        steps.push(ProbeStep {
            call: format!("SIGCONT handled {handled} times").into(),
            errno: 0,
        });
    }
    steps
}

/// [`Probe::IoUringDirect`]: steps "register a file table", "socket
/// (direct)", "connect", "send", "receive", "compare" (`EBADMSG` if the
/// echo differs), until one fails.
fn io_uring_direct(target: std::net::SocketAddr, payload: &[u8]) -> Vec<ProbeStep> {
    use io_uring::{opcode, types};
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return vec![step("io_uring_setup", Err(e))],
    };
    let ring = std::cell::RefCell::new(&mut ring);
    let slot = types::Fixed(0);
    let addr = socket2::SockAddr::from(target);
    let back = std::cell::RefCell::new(vec![0u8; payload.len()]);
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // Submitted again while the gate's hold interrupts it, as the other
    // io_uring paths do.
    let again = |entry: &io_uring::squeue::Entry| io_uring_retrying(&mut ring.borrow_mut(), entry);
    let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 6] = [
        ("register a file table", &|| {
            register_one_slot(&ring.borrow())
        }),
        ("socket (direct)", &|| {
            let into = first_slot()?;
            let op = opcode::Socket::new(domain, libc::SOCK_STREAM, libc::IPPROTO_TCP)
                .file_index(Some(into))
                .build();
            io_uring_on(&mut ring.borrow_mut(), &op).map(|n| n as usize)
        }),
        ("connect", &|| {
            again(&opcode::Connect::new(slot, addr.as_ptr().cast(), addr.len()).build())
        }),
        ("send", &|| send_all_on_slot(&again, slot, payload)),
        ("receive", &|| {
            recv_exact_on_slot(&again, slot, &mut back.borrow_mut())
        }),
        ("compare", &|| {
            let mut want = vec![0u8; payload.len()];
            crate::pattern::fill(crate::pattern::SERVER_SEED, 0, &mut want);
            if *back.borrow() == want {
                Ok(0)
            } else {
                Err(io::Error::from_raw_os_error(libc::EBADMSG))
            }
        }),
    ];
    let mut steps = Vec::new();
    run_in_order(&mut steps, &calls);
    steps
}

/// [`Probe::IoUringDirectAccept`]: steps "listen", "register a file
/// table", "accept (direct)", "receive", "send", until one fails (an
/// early end of stream is `UnexpectedEof`).
fn io_uring_direct_accept(listen: std::net::SocketAddr, payload_len: usize) -> Vec<ProbeStep> {
    use io_uring::{opcode, types};
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return vec![step("listen", Err(e))],
    };
    // The scenario starts its client once this line is out (on stderr:
    // stdout carries the report).
    eprintln!("listening");
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return vec![step("listen", Ok(0)), step("io_uring_setup", Err(e))],
    };
    let ring = std::cell::RefCell::new(&mut ring);
    let slot = types::Fixed(0);
    let again = |entry: &io_uring::squeue::Entry| io_uring_retrying(&mut ring.borrow_mut(), entry);
    let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 5] = [
        ("listen", &|| Ok(0)),
        ("register a file table", &|| {
            register_one_slot(&ring.borrow())
        }),
        ("accept (direct)", &|| {
            let into = first_slot()?;
            let op = opcode::Accept::new(
                types::Fd(listener.as_raw_fd()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .file_index(Some(into))
            .build();
            again(&op)
        }),
        ("receive", &|| {
            recv_exact_on_slot(&again, slot, &mut vec![0u8; payload_len])
        }),
        ("send", &|| {
            let mut answer = vec![0u8; payload_len];
            crate::pattern::fill(crate::pattern::SERVER_SEED, 0, &mut answer);
            send_all_on_slot(&again, slot, &answer)
        }),
    ];
    let mut steps = Vec::new();
    run_in_order(&mut steps, &calls);
    steps
}

/// [`Probe::RefusedThenReconnect`]: a socket refused by the gate (its mark
/// says so) must not stay refused once it is disconnected and connected
/// again: to an unselected peer it works in clear, and to a selected one
/// with room to track it, it is keyed. The refused write is expected to
/// fail; from the disconnect on, the first failing step ends the probe.
pub fn refused_then_reconnect(
    target: std::net::SocketAddr,
    again: &ProbeOptions,
    payload: &[u8],
) -> Vec<ProbeStep> {
    let sock = match tcp_socket(target) {
        Ok(s) => s,
        Err(e) => return vec![step("socket", Err(e))],
    };
    let mut steps = vec![step("connect", sock.connect(&target.into()).map(|()| 0))];
    if steps[0].errno != 0 {
        return steps;
    }
    steps.push(step("write", send_flags(sock.as_raw_fd(), payload, 0)));
    let wait_go = || wait_for_go(again.go_file.as_deref(), GO_FILE_POLL);
    let Some(then) = again.then else {
        steps.push(step(
            "--then",
            Err(io::Error::from_raw_os_error(libc::EINVAL)),
        ));
        return steps;
    };
    let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 4] = [
        ("disconnect", &|| disconnect(&sock).map(|()| 0)),
        ("wait for the go file", &wait_go),
        ("connect again", &|| sock.connect(&then.into()).map(|()| 0)),
        ("exchange", &|| echo_exchange(&sock, payload).map(|_| 0)),
    ];
    run_in_order(&mut steps, &calls);
    steps
}

/// Makes `calls` in order, each a step, until one fails.
fn run_in_order(
    steps: &mut Vec<ProbeStep>,
    calls: &[(&'static str, &dyn Fn() -> io::Result<usize>)],
) {
    for (call, f) in calls {
        let s = step(call, f());
        let failed = s.errno != 0;
        steps.push(s);
        if failed {
            break;
        }
    }
}

/// How often a probe looks for its go file.
const GO_FILE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits until `go_file` exists (at once without one), looking every
/// `every`, at most [`GO_FILE_WAIT`].
fn wait_for_go(go_file: Option<&std::path::Path>, every: std::time::Duration) -> io::Result<usize> {
    let deadline = std::time::Instant::now() + GO_FILE_WAIT;
    while go_file.is_some_and(|f| !f.exists()) {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        std::thread::sleep(every);
    }
    Ok(0)
}

/// [`Probe::ConnectFlood`]: three steps, each with the first errno that
/// was not the expected one (0 if all were): the connects (`EINPROGRESS`
/// expected), the sends (`EAGAIN` expected) and the wait for the go file.
fn connect_flood(
    target: std::net::SocketAddr,
    go_file: Option<&std::path::Path>,
    payload: &[u8],
) -> Vec<ProbeStep> {
    let mut sockets = Vec::new();
    let mut connects = 0;
    for _ in 0..CONNECT_FLOOD {
        let sock = match tcp_socket(target).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(s) => s,
            Err(e) => return vec![step("socket", Err(e))],
        };
        match sock.connect(&target.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => connects = e.raw_os_error().unwrap_or(-1),
            Ok(()) => connects = -1,
        }
        sockets.push(sock);
    }
    let mut sends = 0;
    for sock in &sockets {
        match send_flags(sock.as_raw_fd(), payload, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => sends = e.raw_os_error().unwrap_or(-1),
            Ok(_) => sends = -1,
        }
    }
    vec![
        ProbeStep {
            call: "connects in progress".into(),
            errno: connects,
        },
        ProbeStep {
            call: "sends answered EAGAIN".into(),
            errno: sends,
        },
        step("wait for the go file", wait_for_go(go_file, GO_FILE_POLL)),
    ]
}

/// [`Probe::ManyWaiting`]: a "connect" step per connection, the wait for
/// the go file, then a "send" step per connection.
fn many_waiting(
    target: std::net::SocketAddr,
    go_file: Option<&std::path::Path>,
    payload: &[u8],
) -> Vec<ProbeStep> {
    let mut steps = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..MANY_WAITING {
        match std::net::TcpStream::connect(target).and_then(|s| s.set_nonblocking(true).map(|()| s))
        {
            Ok(s) => {
                steps.push(step("connect", Ok(0)));
                sockets.push(s);
            }
            Err(e) => {
                steps.push(step("connect", Err(e)));
                return steps;
            }
        }
    }
    steps.push(step(
        "wait for the go file",
        wait_for_go(go_file, GO_FILE_POLL),
    ));
    for s in &sockets {
        steps.push(step("send", send_flags(s.as_raw_fd(), payload, 0)));
    }
    steps
}

/// Runs `probe` against `target` with `payload`; every step is reported,
/// the first failing one ends the probe. The connection is closed after.
pub fn probe(
    target: std::net::SocketAddr,
    probe: Probe,
    options: &ProbeOptions,
    payload: &[u8],
) -> Vec<ProbeStep> {
    let mut steps = Vec::new();
    if probe == Probe::RefusedThenReconnect {
        return refused_then_reconnect(target, options, payload);
    }
    if probe == Probe::ConnectFlood {
        return connect_flood(target, options.go_file.as_deref(), payload);
    }
    if probe == Probe::ManyWaiting {
        return many_waiting(target, options.go_file.as_deref(), payload);
    }
    if probe == Probe::SelfConnect {
        return self_connect(target, payload);
    }
    if probe == Probe::OwnFdTable || probe == Probe::OwnFdTableEventLoop {
        return own_fd_table(target, payload, probe == Probe::OwnFdTableEventLoop);
    }
    if probe == Probe::MainThreadExits {
        return after_main_thread_exits(target, payload);
    }
    if probe == Probe::IoUringDirect {
        return io_uring_direct(target, payload);
    }
    if probe == Probe::SigcontHandler {
        return sigcont_handler(target, payload);
    }
    if probe == Probe::IoUringDirectAccept {
        return io_uring_direct_accept(target, payload.len());
    }
    if probe == Probe::Echo {
        return blocking_echo(target, payload);
    }
    if probe == Probe::SendRacingConnect {
        for _ in 0..RACE_ATTEMPTS {
            steps.extend(send_racing_connect(target, payload));
        }
        return steps;
    }
    if probe == Probe::FullOptionMemory {
        let sock = match tcp_socket(target) {
            Ok(s) => s,
            Err(e) => return vec![step("socket", Err(e))],
        };
        let fd = sock.as_raw_fd();
        steps.push(step(
            "setsockopt(TCP_MD5SIG) until refused",
            Err(fill_option_memory(std::os::fd::AsFd::as_fd(&sock))),
        ));
        let s = step("connect", sock.connect(&target.into()).map(|()| 0));
        let connected = s.errno == 0;
        steps.push(s);
        if connected {
            steps.push(step("write", send_flags(fd, payload, 0)));
        }
        return steps;
    }
    if probe == Probe::Repair {
        const TCP_REPAIR: libc::c_int = 19;
        let sock = match tcp_socket(target) {
            Ok(s) => s,
            Err(e) => return vec![step("socket", Err(e))],
        };
        let fd = sock.as_raw_fd();
        let bfd = sock.as_fd();
        let write = || {
            // SAFETY: payload is a live slice; fd is open.
            cvt(unsafe { libc::write(fd, payload.as_ptr().cast(), payload.len()) })
        };
        let calls: [(&'static str, &dyn Fn() -> io::Result<usize>); 4] = [
            ("setsockopt(TCP_REPAIR, 1)", &|| {
                set_int(bfd, libc::IPPROTO_TCP, TCP_REPAIR, 1)
            }),
            ("connect", &|| sock.connect(&target.into()).map(|()| 0)),
            ("setsockopt(TCP_REPAIR, 0)", &|| {
                set_int(bfd, libc::IPPROTO_TCP, TCP_REPAIR, 0)
            }),
            ("write", &write),
        ];
        run_in_order(&mut steps, &calls);
        return steps;
    }
    let stream = match std::net::TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => return vec![step("connect", Err(e))],
    };
    let fd = stream.as_raw_fd();
    match probe {
        Probe::Oob => steps.push(step(
            "send(MSG_OOB)",
            send_flags(fd, payload, libc::MSG_OOB),
        )),
        Probe::Zerocopy => {
            const SO_ZEROCOPY: libc::c_int = 60;
            const MSG_ZEROCOPY: libc::c_int = 0x400_0000;
            let s = step(
                "setsockopt(SO_ZEROCOPY)",
                set_int(stream.as_fd(), libc::SOL_SOCKET, SO_ZEROCOPY, 1),
            );
            let ok = s.errno == 0;
            steps.push(s);
            if ok {
                steps.push(step(
                    "send(MSG_ZEROCOPY)",
                    send_flags(fd, payload, MSG_ZEROCOPY),
                ));
            }
        }
        Probe::ZerocopyReceive => {
            steps.push(step(
                "getsockopt(TCP_ZEROCOPY_RECEIVE) before keys",
                zerocopy_receive(fd),
            ));
            // The payload's first byte: what the wire check expects.
            steps.push(step("write 1 byte", send_flags(fd, &payload[..1], 0)));
            steps.push(step(
                "getsockopt(TCP_ZEROCOPY_RECEIVE) after keys",
                zerocopy_receive(fd),
            ));
        }
        Probe::Repair
        | Probe::FullOptionMemory
        | Probe::SendRacingConnect
        | Probe::RefusedThenReconnect
        | Probe::ConnectFlood
        | Probe::ManyWaiting
        | Probe::SelfConnect
        | Probe::OwnFdTable
        | Probe::OwnFdTableEventLoop
        | Probe::MainThreadExits
        | Probe::IoUringDirect
        | Probe::SigcontHandler
        | Probe::IoUringDirectAccept
        | Probe::Echo => {
            unreachable!("handled above")
        }
    }
    steps
}

/// The fixed keys of `tlshub-testapp --ktls-fixed-key` (TLS 1.3,
/// AES-128-GCM, record sequence 0): the client sends under one key and the
/// server under the other, so the two ends' keys mirror each other.
pub fn fixed_ktls_keys(client: bool) -> tlshub_provider_sdk::ConnectionKeys {
    use tlshub_provider_sdk::{CipherSuite, ConnectionKeys, DirectionKeys, TlsVersion};
    let direction = |b: u8| DirectionKeys {
        key: vec![b; 16],
        iv: vec![b.wrapping_add(0x10); 12],
        record_sequence: 0,
    };
    let (tx, rx) = if client { (0x11, 0x12) } else { (0x12, 0x11) };
    ConnectionKeys {
        version: TlsVersion::Tls13,
        cipher_suite: CipherSuite::Aes128Gcm,
        transmit: direction(tx),
        receive: direction(rx),
    }
}

/// Installs [`fixed_ktls_keys`] on a connected socket: kTLS without any
/// agent or handshake, the data path's ceiling in the benchmark.
pub fn install_fixed_ktls(stream: &std::net::TcpStream, client: bool) -> io::Result<()> {
    use std::os::fd::AsFd;
    tlshub_ktls::install(stream.as_fd(), &fixed_ktls_keys(client))
        .map_err(|(step, e)| io::Error::new(e.kind(), format!("kTLS {step:?}: {e}")))
}
