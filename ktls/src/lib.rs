//! Kernel TLS on a TCP socket: the `tls` upper-layer protocol and the
//! `crypto_info` structs of `<linux/tls.h>` for each direction, plus the
//! raw socket options around them that rustix does not cover. Shared by
//! the core (keys from a provider) and the test apps (a fixed key, the
//! benchmark's data-path ceiling). This crate holds the workspace's
//! `setsockopt`/`getsockopt` `unsafe`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tlshub_provider_sdk::{CipherSuite, ConnectionKeys, DirectionKeys, TlsVersion};
use zeroize::Zeroize;

/// `SOL_TLS`.
pub const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
/// `TLS_RX`, the receive direction's option at [`SOL_TLS`].
pub const TLS_RX: libc::c_int = 2;
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

/// `setsockopt(level, name)` with `value` as the option's bytes, for the
/// options rustix does not cover.
pub fn set_option<T>(
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

/// `getsockopt(level, name)` of an `int` option.
pub fn get_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<i32> {
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
        CipherSuite::Aes128Gcm => set_option(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<8, 16, 4>::new(v, TLS_CIPHER_AES_GCM_128, keys),
        ),
        CipherSuite::Aes256Gcm => set_option(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<8, 32, 4>::new(v, TLS_CIPHER_AES_GCM_256, keys),
        ),
        CipherSuite::Chacha20Poly1305 => set_option(
            fd,
            SOL_TLS,
            name,
            &CryptoInfo::<12, 32, 0>::new(v, TLS_CIPHER_CHACHA20_POLY1305, keys),
        ),
    }
}

/// Which step of the kTLS installation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsStep {
    /// The keys themselves ([`ConnectionKeys::validate`]): nothing was
    /// installed.
    Keys,
    /// `setsockopt(TCP_ULP, "tls")`.
    Ulp,
    /// `setsockopt(SOL_TLS, TLS_TX)`.
    Transmit,
    /// `setsockopt(SOL_TLS, TLS_RX)`.
    Receive,
}

/// `TLS_SET_RECORD_TYPE`, the control message at [`SOL_TLS`] that gives
/// a `sendmsg` on a kTLS socket its record type.
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// The TLS record type of application data.
const TLS_RECORD_APPLICATION_DATA: u8 = 23;

/// Closes the socket's open kTLS record, the one writes with `MSG_MORE`
/// fill and only a write without it closes: kTLS encrypts it and hands it
/// to TCP as after any write. How: a `sendmsg` of no bytes with a
/// `TLS_SET_RECORD_TYPE` control message (application data); kTLS closes
/// the open record before it takes a record type (`tls_process_cmsg` in
/// the kernel's `net/tls/tls_main.c`), and no bytes make no new record.
/// A socket with no open record is left as it was. Does not wait
/// (`MSG_DONTWAIT`): what TCP has no room for waits in kTLS's queue, as
/// after any write, and kTLS's `EAGAIN` for it is not an error here.
pub fn close_open_record(fd: BorrowedFd<'_>) -> io::Result<()> {
    // Room for one control message with one byte of data, aligned for
    // `cmsghdr` (CMSG_SPACE(1) is 24 bytes on 64-bit Linux).
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: a zeroed msghdr (no name, no iovecs) is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` live, aligned, zeroed bytes,
    // enough for one header and its one byte of data, so CMSG_FIRSTHDR
    // returns a valid header and CMSG_DATA a byte inside the buffer.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = TLS_RECORD_APPLICATION_DATA;
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if rc >= 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        e => Err(e),
    }
}

/// Installs kTLS on the socket: the ULP, then TX and RX keys. Keys that
/// fail [`ConnectionKeys::validate`] are refused before anything is
/// installed (`InvalidInput`); after that, on error the socket may be
/// half-installed and the caller must reset it.
pub fn install(fd: BorrowedFd<'_>, keys: &ConnectionKeys) -> Result<(), (KtlsStep, io::Error)> {
    keys.validate().map_err(|e| {
        (
            KtlsStep::Keys,
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    // The ULP's name, without its NUL (the kernel takes the length given).
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_ULP, b"tls").map_err(|e| (KtlsStep::Ulp, e))?;
    set_direction(fd, TLS_TX, keys.version, keys.cipher_suite, &keys.transmit)
        .map_err(|e| (KtlsStep::Transmit, e))?;
    set_direction(fd, TLS_RX, keys.version, keys.cipher_suite, &keys.receive)
        .map_err(|e| (KtlsStep::Receive, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_wrong_length_are_refused_before_anything_is_installed() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let direction = |len| DirectionKeys {
            key: vec![1; len],
            iv: vec![2; 12],
            record_sequence: 0,
        };
        let keys = ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: CipherSuite::Aes128Gcm,
            transmit: direction(5),
            receive: direction(16),
        };
        let (step, e) = install(c.as_fd(), &keys).unwrap_err();
        assert_eq!(step, KtlsStep::Keys);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // No ULP went on: the socket still takes one.
        let ulp = set_option(c.as_fd(), libc::IPPROTO_TCP, libc::TCP_ULP, b"xyz");
        assert_ne!(ulp.unwrap_err().raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn closing_the_open_record_of_a_socket_without_ktls_sends_nothing() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        // The host has no kTLS; TCP ignores a control message at SOL_TLS,
        // so a socket without kTLS is left as it was: no byte, no error.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        close_open_record(c.as_fd()).unwrap();
        c.write_all(b"x").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"x");
    }

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
}
