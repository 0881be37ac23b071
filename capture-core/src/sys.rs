//! The system calls the core makes on application sockets: kTLS
//! installation, wakeups, reset, and signals. rustix makes most of them;
//! the core's only `unsafe`, here, is `setsockopt`/`getsockopt` of what it
//! does not cover (the kTLS structs, `TCP_ULP`, the two low-water marks).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tlshub_provider_sdk::{CipherSuite, ConnectionKeys, DirectionKeys, TlsVersion};
use zeroize::Zeroize;

const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// `struct tls12_crypto_info_*` from `<linux/tls.h>`; `N` is the key length,
/// `S` the salt length and `I` the explicit IV length.
#[repr(C)]
struct CryptoInfo<const I: usize, const N: usize, const S: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; I],
    key: [u8; N],
    salt: [u8; S],
    rec_seq: [u8; 8],
}

impl<const I: usize, const N: usize, const S: usize> CryptoInfo<I, N, S> {
    /// Splits the 12-byte nonce base into salt (first `S` bytes) and IV.
    fn new(version: u16, cipher_type: u16, keys: &DirectionKeys) -> Self {
        let mut info = Self {
            version,
            cipher_type,
            iv: [0; I],
            key: [0; N],
            salt: [0; S],
            rec_seq: [0; 8],
        };
        info.key.copy_from_slice(&keys.key);
        info.salt.copy_from_slice(&keys.iv[..S]);
        info.iv.copy_from_slice(&keys.iv[S..]);
        info.rec_seq = keys.record_sequence.to_be_bytes();
        info
    }
}

impl<const I: usize, const N: usize, const S: usize> Drop for CryptoInfo<I, N, S> {
    fn drop(&mut self) {
        self.iv.zeroize();
        self.key.zeroize();
        self.salt.zeroize();
    }
}

fn setsockopt_raw<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size for the duration
    // of the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals of the sizes passed; the kernel
    // writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Wakes whoever waits for readiness on the socket, after its gate opened:
/// an event loop that the gate answered `EAGAIN` waits for an event that
/// kTLS installation does not give by itself. Each option is written back
/// with the value it has, which changes nothing but calls the socket's
/// callback:
/// - `TCP_NOTSENT_LOWAT` calls `sk_write_space`: writers (`EPOLLOUT`);
/// - `SO_RCVLOWAT` calls `sk_data_ready` if data is waiting: readers of a
///   connection let through in plaintext. (With kTLS, installing the
///   receive key already woke a reader for a queued record.)
pub fn wake_waiters(fd: BorrowedFd<'_>) -> io::Result<()> {
    let notsent = getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT)?;
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, &notsent)?;
    let rcvlowat = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT)?;
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &rcvlowat)
}

fn set_direction(
    fd: BorrowedFd<'_>,
    name: libc::c_int,
    version: TlsVersion,
    suite: CipherSuite,
    keys: &DirectionKeys,
) -> io::Result<()> {
    let v = match version {
        TlsVersion::Tls12 => TLS_1_2_VERSION,
        TlsVersion::Tls13 => TLS_1_3_VERSION,
    };
    match suite {
        CipherSuite::Aes128Gcm => setsockopt_raw(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<8, 16, 4>::new(v, TLS_CIPHER_AES_GCM_128, keys),
        ),
        CipherSuite::Aes256Gcm => setsockopt_raw(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<8, 32, 4>::new(v, TLS_CIPHER_AES_GCM_256, keys),
        ),
        CipherSuite::Chacha20Poly1305 => setsockopt_raw(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<12, 32, 0>::new(v, TLS_CIPHER_CHACHA20_POLY1305, keys),
        ),
    }
}

/// Raises the socket's send buffer to at least `floor` bytes (what
/// `getsockopt(SO_SNDBUF)` reports; the kernel doubles what is set). Uses
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, past `net.core.wmem_max`), else
/// `SO_SNDBUF` (capped at twice `wmem_max`). Returns the size before and
/// after; a buffer already at the floor is left alone.
pub fn raise_send_buffer(fd: BorrowedFd<'_>, floor: u32) -> io::Result<(u32, u32)> {
    use rustix::net::sockopt;
    let size =
        |fd| sockopt::socket_send_buffer_size(fd).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let before = size(fd)?;
    if before >= floor {
        return Ok((before, before));
    }
    // rustix sets what it is given; the kernel doubles it.
    let half = (floor / 2).max(1) as usize;
    match sockopt::set_socket_send_buffer_size_force(fd, half) {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => sockopt::set_socket_send_buffer_size(fd, half)?,
        Err(e) => return Err(e.into()),
    }
    Ok((before, size(fd)?))
}

/// Which step of the kTLS installation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsStep {
    /// `setsockopt(TCP_ULP, "tls")`.
    Ulp,
    /// `setsockopt(SOL_TLS, TLS_TX)`.
    Transmit,
    /// `setsockopt(SOL_TLS, TLS_RX)`.
    Receive,
}

/// Installs kTLS on the socket: the ULP, then TX and RX keys. The keys must
/// have passed [`ConnectionKeys::validate`]. On error the socket may be
/// half-installed; the caller must reset it.
pub fn install_ktls(
    fd: BorrowedFd<'_>,
    keys: &ConnectionKeys,
) -> Result<(), (KtlsStep, io::Error)> {
    // The ULP's name, without its NUL (the kernel takes the length given).
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_ULP, b"tls").map_err(|e| (KtlsStep::Ulp, e))?;
    set_direction(fd, TLS_TX, keys.version, keys.cipher_suite, &keys.transmit)
        .map_err(|e| (KtlsStep::Transmit, e))?;
    set_direction(fd, TLS_RX, keys.version, keys.cipher_suite, &keys.receive)
        .map_err(|e| (KtlsStep::Receive, e))?;
    // Shows the gate what kTLS's receive method is: its getsockopt hook
    // records it from the first socket asked (the answer itself, and an
    // EINVAL for the short buffer, do not matter). The gate then counts a
    // socket as open from the moment its receive keys are in.
    let _ = getsockopt_int(fd, SOL_TLS, TLS_RX);
    Ok(())
}

/// Resets the connection: `connect(AF_UNSPEC)` makes TCP disconnect, which
/// sends RST for an established connection and sets `ECONNRESET` as the
/// socket error the application sees next.
pub fn reset_connection(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::connect_unspec(fd)?)
}

/// Shuts both directions of a connection down (FIN to the peer): what is
/// left when [`reset_connection`] is refused.
pub fn shutdown_both(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?)
}

/// Sends SIGCONT to a process.
pub fn continue_process(pid: u32) -> io::Result<()> {
    Ok(rustix::process::kill_process(
        tlshub_provider_sdk::socket::pid(pid)?,
        rustix::process::Signal::CONT,
    )?)
}

/// The monotonic clock in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn crypto_info_layouts_match_linux_tls_h() {
        // sizeof(struct tls12_crypto_info_aes_gcm_128) == 40, _256 == 56,
        // chacha20_poly1305 == 56.
        assert_eq!(std::mem::size_of::<CryptoInfo<8, 16, 4>>(), 40);
        assert_eq!(std::mem::size_of::<CryptoInfo<8, 32, 4>>(), 56);
        assert_eq!(std::mem::size_of::<CryptoInfo<12, 32, 0>>(), 56);
    }

    #[test]
    fn salt_and_iv_are_split_from_the_nonce_base() {
        let keys = DirectionKeys {
            key: vec![7; 16],
            iv: (0..12).collect(),
            record_sequence: 1,
        };
        let info = CryptoInfo::<8, 16, 4>::new(TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128, &keys);
        assert_eq!(info.salt, [0, 1, 2, 3]);
        assert_eq!(info.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn waking_waiters_changes_no_option() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = c.as_fd();
        let get = |level, name| getsockopt_int(fd, level, name).unwrap();
        let before = [
            get(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVLOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVBUF),
            get(libc::SOL_SOCKET, libc::SO_SNDBUF),
        ];
        wake_waiters(fd).unwrap();
        let after = [
            get(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVLOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVBUF),
            get(libc::SOL_SOCKET, libc::SO_SNDBUF),
        ];
        assert_eq!(before, after);
    }

    #[test]
    fn reset_sends_rst_and_the_peer_sees_connreset() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        reset_connection(c.as_fd()).unwrap();
        let mut buf = [0u8; 4];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
