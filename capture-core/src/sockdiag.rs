//! Destroying a TCP socket the core has no handle on, by its 4-tuple and
//! cookie: sock_diag's `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`, what
//! `ss -K` uses), which aborts the connection as `tcp_abort()` does: the
//! peer gets a RST, every waiter on the socket is woken and told
//! `ECONNABORTED`, and the socket closes. The message codec is
//! `netlink-packet-sock-diag`; this module only asks and reads the answer.
//!
//! The kernel looks the socket up in the namespace of the netlink socket
//! that asks, so the request is made from a socket in the app's network
//! namespace: the core's own one when they are the same, otherwise one
//! made by a thread that enters it ([`crate::netns`], `CAP_SYS_ADMIN`).
//! The cookie makes the lookup exact: a socket with the same 4-tuple but
//! another cookie is left alone (`ENOENT`).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netns::NetnsError;

/// How long the core waits for the kernel's answer (it answers at once;
/// this only bounds a kernel that never does).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a socket could not be destroyed.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The app's network namespace cannot be opened or entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The netlink socket cannot be made, or the request not sent, or no
    /// answer read.
    #[error("sock_diag: {0}")]
    Io(#[source] std::io::Error),
    /// The kernel refused: `ENOENT` (no such socket: it closed, or the
    /// cookie names another), `EPERM` (no `CAP_NET_ADMIN`), `EOPNOTSUPP`
    /// (a kernel without `CONFIG_INET_DIAG_DESTROY`).
    #[error("the kernel refused to destroy the socket: {0}")]
    Kernel(#[source] std::io::Error),
    /// The answer does not parse.
    #[error("malformed sock_diag answer: {0}")]
    Malformed(String),
    /// The socket is in another network namespace, and this core may not
    /// enter one (no `CAP_SYS_ADMIN`, as under the shipped systemd unit).
    #[error(
        "the connection is in network namespace {netns}, which this core may not enter (no CAP_SYS_ADMIN)"
    )]
    OtherNamespace {
        /// The namespace file.
        netns: std::path::PathBuf,
    },
    /// The connection's 4-tuple is not known (its `conns` entry is gone:
    /// it closed; or it never reported `ESTABLISHED`).
    #[error("the 4-tuple of connection {cookie} is not known")]
    NoTuple {
        /// Its cookie.
        cookie: u64,
    },
}

/// The TCP connection to destroy, as the core's BPF events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The socket's own address.
    pub local: SocketAddr,
    /// Its peer's.
    pub remote: SocketAddr,
    /// Its cookie (`SO_COOKIE`, `bpf_get_socket_cookie`).
    pub cookie: u64,
}

/// Destroys `target`, asking from the network namespace at `netns` (a
/// `/proc/PID/ns/net` of a process that holds or waits on the socket).
pub fn destroy(netns: &std::path::Path, target: Target) -> Result<(), SockDiagError> {
    let request = encode_destroy(1, target);
    if crate::netns::is_own(netns)? {
        return ask(&request);
    }
    if !crate::netns::may_enter() {
        return Err(SockDiagError::OtherNamespace {
            netns: netns.to_owned(),
        });
    }
    crate::netns::make_in(netns, move || ask(&request))?
}

/// Destroys `target` from the network namespace of the first of `pids`
/// (0: none) in whose namespace the kernel finds it, or else from the
/// core's own namespace. Why several: the socket is in the namespace it
/// was made in, and a process that holds or waits on it is almost always
/// in that one too, but may have moved (`setns`) or exited; the cookie
/// keeps a wrong namespace from matching another socket.
pub fn destroy_seen_by(
    pids: impl IntoIterator<Item = u32>,
    target: Target,
) -> Result<(), SockDiagError> {
    let mut tried = Vec::new();
    let mut last = None;
    let places = pids
        .into_iter()
        .filter(|&p| p != 0)
        .filter_map(netns_of)
        .chain([std::path::PathBuf::from("/proc/self/ns/net")]);
    for netns in places {
        // Two processes in one namespace: asked once.
        let Ok(meta) = std::fs::metadata(&netns) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if tried.contains(&id) {
            continue;
        }
        tried.push(id);
        match destroy(&netns, target) {
            Ok(()) => return Ok(()),
            // Said over a later "not found" from another namespace: it is
            // why the socket was not found.
            Err(e) if matches!(last, Some(SockDiagError::OtherNamespace { .. })) => {
                tracing::debug!(error = %e, "no such socket in this namespace either");
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(SockDiagError::NoTuple {
        cookie: target.cookie,
    }))
}

/// The network namespace file of process `pid`: its own, or, when its
/// main thread has exited on its own (a zombie leader has no namespaces
/// left, and its `ns/net` cannot be read), a live thread's.
fn netns_of(pid: u32) -> Option<std::path::PathBuf> {
    let own = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
    if std::fs::metadata(&own).is_ok() {
        return Some(own);
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .map(|task| task.path().join("ns/net"))
        .find(|netns| std::fs::metadata(netns).is_ok())
}

/// Sends `request` on a fresh sock_diag socket and reads the kernel's
/// acknowledgement.
fn ask(request: &[u8]) -> Result<(), SockDiagError> {
    let socket = crate::netns::kernel_socket(NETLINK_SOCK_DIAG, ANSWER_TIMEOUT)
        .map_err(SockDiagError::Io)?;
    socket.send(request, 0).map_err(SockDiagError::Io)?;
    let mut buf = Vec::with_capacity(4096);
    socket.recv(&mut buf, 0).map_err(SockDiagError::Io)?;
    decode_ack(&buf)
}

/// A `SOCK_DESTROY` request for `target`, numbered `seq`, asking for an
/// acknowledgement.
fn encode_destroy(seq: u32, target: Target) -> Vec<u8> {
    // An IPv4-mapped address as IPv4: the kernel finds an IPv4 connection
    // (also one of a dual-stack socket) under `AF_INET`.
    let (local, remote) = (
        target.local.ip().to_canonical(),
        target.remote.ip().to_canonical(),
    );
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // The kernel compares the cookie as two native-endian 32-bit words,
    // low word first (sock_diag_check_cookie()).
    let mut cookie = [0u8; 8];
    cookie[..4].copy_from_slice(&(target.cookie as u32).to_ne_bytes());
    cookie[4..].copy_from_slice(&((target.cookie >> 32) as u32).to_ne_bytes());
    let request = InetRequest {
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            // The kernel's "source" is the socket's own end.
            source_port: target.local.port(),
            destination_port: target.remote.port(),
            source_address: local,
            destination_address: remote,
            interface_id: 0,
            cookie,
        },
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(SockDiagDestroy::new(SockDiagMessage::InetRequest(request))),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The kernel's answer to a destroy: an acknowledgement (error code 0) or
/// an error.
fn decode_ack(buf: &[u8]) -> Result<(), SockDiagError> {
    let message = NetlinkMessage::<SockDiagDestroy>::deserialize(buf)
        .map_err(|e| SockDiagError::Malformed(e.to_string()))?;
    match message.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(SockDiagError::Kernel(e.to_io())),
        NetlinkPayload::Error(_) => Ok(()),
        other => Err(SockDiagError::Malformed(format!(
            "expected an acknowledgement, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn target_of(s: &TcpStream) -> Target {
        Target {
            local: s.local_addr().unwrap(),
            remote: s.peer_addr().unwrap(),
            cookie: tlshub_provider_sdk::socket::socket_cookie(s).unwrap(),
        }
    }

    #[test]
    fn the_request_names_the_tuple_in_network_order_and_the_cookie_in_words() {
        let target = Target {
            local: "[::ffff:10.0.1.2]:40000".parse().unwrap(),
            remote: "10.0.2.2:8443".parse().unwrap(),
            cookie: 0x1122_3344_5566_7788,
        };
        let bytes = encode_destroy(7, target);
        // nlmsghdr (16 bytes), then inet_diag_req_v2: family, protocol,
        // ext, pad, states (4), then inet_diag_sockid.
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 21, "SOCK_DESTROY");
        let req = &bytes[16..];
        assert_eq!(
            req[0],
            libc::AF_INET as u8,
            "a mapped address is asked as IPv4"
        );
        assert_eq!(req[1], libc::IPPROTO_TCP as u8);
        let id = &req[8..];
        assert_eq!(&id[0..2], &40000u16.to_be_bytes());
        assert_eq!(&id[2..4], &8443u16.to_be_bytes());
        assert_eq!(&id[4..8], &[10, 0, 1, 2]);
        assert_eq!(&id[20..24], &[10, 0, 2, 2]);
        assert_eq!(&id[40..44], &0x5566_7788u32.to_ne_bytes(), "low word first");
        assert_eq!(&id[44..48], &0x1122_3344u32.to_ne_bytes());
    }

    /// Needs `CAP_NET_ADMIN` and a kernel with `CONFIG_INET_DIAG_DESTROY`,
    /// as the core does; a run without them fails here, loudly.
    #[test]
    fn a_destroyed_connection_wakes_its_reader_and_resets_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // A reader blocked on the socket the core has no handle on.
        let reader = {
            let mut s = server.try_clone().unwrap();
            std::thread::spawn(move || s.read(&mut [0u8; 16]))
        };
        std::thread::sleep(Duration::from_millis(100));
        let mut other_cookie = target_of(&server);
        other_cookie.cookie ^= 1;
        let e = destroy(std::path::Path::new("/proc/self/ns/net"), other_cookie).unwrap_err();
        assert!(
            matches!(&e, SockDiagError::Kernel(io) if io.raw_os_error() == Some(libc::ENOENT)),
            "another cookie must find nothing: {e}"
        );
        destroy(
            std::path::Path::new("/proc/self/ns/net"),
            target_of(&server),
        )
        .expect("SOCK_DESTROY (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)");
        let woken = reader.join().unwrap().unwrap_err();
        assert_eq!(woken.raw_os_error(), Some(libc::ECONNABORTED), "{woken}");
        assert!(server.write_all(b"x").is_err(), "the socket is closed");
        let mut buf = [0u8; 1];
        let peer = client.read(&mut buf).unwrap_err();
        assert_eq!(peer.kind(), std::io::ErrorKind::ConnectionReset, "{peer}");
    }
}
