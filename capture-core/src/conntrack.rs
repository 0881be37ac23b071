//! Where a connection really goes: its entry in a network namespace's
//! connection tracking table, read over ctnetlink (`NETLINK_NETFILTER`,
//! `IPCTNL_MSG_CT_GET` on the connection's original tuple). A node that
//! translates a Service's virtual address (kube-proxy's DNAT) records the
//! backend there: the entry's reply tuple comes *from* the backend. The
//! message codec is `netlink-packet-netfilter`; this module only asks and
//! reads the answer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

/// How long one lookup waits for the kernel's answer. ctnetlink answers a
/// GET synchronously, so this only bounds a kernel that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a translation could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// `[conntrack] netns` cannot be opened or entered.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    /// The netlink socket cannot be made.
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] std::io::Error),
    /// Sending the request or reading the answer failed (including no
    /// answer within [`ANSWER_TIMEOUT`]).
    #[error("conntrack lookup failed: {0}")]
    Io(#[source] std::io::Error),
    /// The kernel answered with an error other than "no such entry"
    /// (`EPERM` without `CAP_NET_ADMIN`, `EOPNOTSUPP` without
    /// `nf_conntrack_netlink`).
    #[error("the kernel refused the conntrack lookup: {0}")]
    Kernel(#[source] std::io::Error),
    /// The answer does not parse, or lacks the tuple asked for.
    #[error("malformed conntrack answer: {0}")]
    Malformed(String),
}

/// What the table says about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Where the answer comes from: the backend, for a translated
    /// destination (the original destination when nothing translated it).
    pub reply_source: SocketAddr,
    /// Where the answer goes: the connection's own source, unless source
    /// NAT rewrote it on the way (then the backend sees this address).
    pub reply_destination: SocketAddr,
}

/// A ctnetlink socket in one network namespace, for lookups from any thread
/// (one at a time: each is a request and its answer).
#[derive(Debug)]
pub struct Conntrack {
    socket: Mutex<Socket>,
    seq: AtomicU32,
}

impl Conntrack {
    /// Opens the socket in `netns` (a file such as `/run/netns/NAME`), or
    /// in the core's own namespace. A socket stays in the namespace it was
    /// made in, so only a short-lived thread enters `netns`.
    pub fn open(netns: Option<&Path>) -> Result<Self, ConntrackError> {
        let socket = match netns {
            None => socket()?,
            Some(path) => crate::netns::make_in(path, socket)??,
        };
        Ok(Self {
            socket: Mutex::new(socket),
            seq: AtomicU32::new(1),
        })
    }

    /// Whether lookups work at all (`EPERM` without `CAP_NET_ADMIN`,
    /// `EOPNOTSUPP` without `nf_conntrack_netlink`): a lookup that finds
    /// nothing is fine.
    pub fn check(&self) -> Result<(), ConntrackError> {
        let nowhere = SocketAddr::from(([127, 0, 0, 1], 0));
        self.lookup(nowhere, nowhere).map(|_| ())
    }

    /// The table's entry for the TCP connection from `source` to
    /// `destination` as first seen (its original tuple), or `None` when the
    /// table has none. Blocking: call it off the async runtime.
    pub fn lookup(
        &self,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Option<Translation>, ConntrackError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let request = encode_get(seq, source, destination);
        let socket = self
            .socket
            .lock()
            .map_err(|_| ConntrackError::Io(std::io::Error::other("lookup lock poisoned")))?;
        socket.send(&request, 0).map_err(ConntrackError::Io)?;
        // An answer is a few hundred bytes.
        let mut buf = Vec::with_capacity(8192);
        loop {
            buf.clear();
            socket.recv(&mut buf, 0).map_err(ConntrackError::Io)?;
            if let Some(answer) = decode_answer(&buf, seq)? {
                return answer;
            }
            // An answer to an earlier lookup that timed out: skip it.
        }
    }
}

fn socket() -> Result<Socket, ConntrackError> {
    crate::netns::kernel_socket(NETLINK_NETFILTER, ANSWER_TIMEOUT).map_err(ConntrackError::Socket)
}

/// An IPv4-mapped address as IPv4 (the table keeps IPv4 connections under
/// IPv4 addresses).
fn unmapped(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A GET for the TCP connection `source` to `destination`, numbered `seq`.
fn encode_get(seq: u32, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = (unmapped(source), unmapped(destination));
    let family = if source.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    };
    let tuple = tcp_tuple(source, destination);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
        )),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The tuple attributes of a TCP connection from `source` to `destination`.
fn tcp_tuple(source: SocketAddr, destination: SocketAddr) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(source.ip()),
            IPTuple::DestinationAddress(destination.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(source.port()),
            ProtoTuple::DestinationPort(destination.port()),
        ]),
    ]
}

/// The answer to lookup `seq` in one datagram: `Some(Ok(None))` when the
/// table has no such entry, `None` when the datagram answers another
/// lookup.
fn decode_answer(
    mut buf: &[u8],
    seq: u32,
) -> Result<Option<Result<Option<Translation>, ConntrackError>>, ConntrackError> {
    while !buf.is_empty() {
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(buf)
            .map_err(|e| ConntrackError::Malformed(e.to_string()))?;
        let len = message.header.length as usize;
        if len == 0 || len > buf.len() {
            return Err(ConntrackError::Malformed(format!(
                "message length {len} in a datagram of {}",
                buf.len()
            )));
        }
        if message.header.sequence_number == seq {
            return Ok(Some(answer(message.payload)));
        }
        // Netlink messages are aligned to 4 bytes.
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Ok(None)
}

fn answer(
    payload: NetlinkPayload<NetfilterMessage>,
) -> Result<Option<Translation>, ConntrackError> {
    match payload {
        NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Ok(None),
        NetlinkPayload::Error(e) if e.code.is_some() => Err(ConntrackError::Kernel(e.to_io())),
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
            ..
        }) => {
            let reply = attributes
                .into_iter()
                .find_map(|a| match a {
                    ConntrackAttribute::CtaTupleReply(t) => Some(t),
                    _ => None,
                })
                .ok_or_else(|| ConntrackError::Malformed("no reply tuple".into()))?;
            let (source, destination) = endpoints(&reply)?;
            Ok(Some(Translation {
                reply_source: source,
                reply_destination: destination,
            }))
        }
        other => Err(ConntrackError::Malformed(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

/// The source and destination of a tuple.
fn endpoints(tuple: &[Tuple]) -> Result<(SocketAddr, SocketAddr), ConntrackError> {
    let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, sport, dst, dport) {
        (Some(s), Some(sp), Some(d), Some(dp)) => {
            Ok((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
        }
        _ => Err(ConntrackError::Malformed(format!(
            "incomplete tuple {tuple:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::ErrorMessage;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The kernel's answer to a GET, as `encode_get` would make it for the
    /// reply direction (the codec under test reads what the crate writes).
    fn answer_bytes(
        seq: u32,
        orig: (SocketAddr, SocketAddr),
        reply: (SocketAddr, SocketAddr),
    ) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(vec![
                    ConntrackAttribute::CtaTupleOrig(tcp_tuple(orig.0, orig.1)),
                    ConntrackAttribute::CtaTupleReply(tcp_tuple(reply.0, reply.1)),
                ]),
            )),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn error_bytes(seq: u32, errno: i32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-errno);
        let mut m = NetlinkMessage::<NetfilterMessage>::new(header, NetlinkPayload::Error(e));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn a_get_asks_for_the_original_tcp_tuple() {
        let buf = encode_get(7, sa("10.0.1.2:40000"), sa("[::ffff:10.96.0.10]:80"));
        let m = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        assert_eq!(m.header.sequence_number, 7);
        let NetlinkPayload::InnerMessage(NetfilterMessage { header, inner, .. }) = m.payload else {
            panic!("not a netfilter message");
        };
        assert_eq!(header.family, NetfilterProtoFamily::IPv4);
        let NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attrs)) = inner else {
            panic!("not a conntrack GET: {inner:?}");
        };
        let [ConntrackAttribute::CtaTupleOrig(t)] = attrs.as_slice() else {
            panic!("{attrs:?}");
        };
        // The mapped destination went out as IPv4.
        assert_eq!(
            endpoints(t).unwrap(),
            (sa("10.0.1.2:40000"), sa("10.96.0.10:80"))
        );
    }

    #[test]
    fn the_answer_names_the_backend_and_any_source_translation() {
        let dnat = answer_bytes(
            3,
            (sa("10.0.1.2:40000"), sa("10.96.0.10:80")),
            (sa("10.0.2.2:8443"), sa("10.0.1.2:40000")),
        );
        let t = decode_answer(&dnat, 3).unwrap().unwrap().unwrap().unwrap();
        assert_eq!(t.reply_source, sa("10.0.2.2:8443"));
        assert_eq!(t.reply_destination, sa("10.0.1.2:40000"));
        // Another lookup's answer is skipped, not taken for this one.
        assert!(decode_answer(&dnat, 4).unwrap().is_none());
        // Two messages in one datagram: the second one is found.
        let mut both = error_bytes(2, libc::ENOENT);
        both.extend(&dnat);
        assert!(decode_answer(&both, 3).unwrap().unwrap().unwrap().is_some());
        assert!(decode_answer(&both, 2).unwrap().unwrap().unwrap().is_none());
    }

    #[test]
    fn no_entry_is_none_and_other_errors_are_errors() {
        let none = decode_answer(&error_bytes(1, libc::ENOENT), 1)
            .unwrap()
            .unwrap();
        assert!(matches!(none, Ok(None)), "{none:?}");
        let eperm = decode_answer(&error_bytes(1, libc::EPERM), 1)
            .unwrap()
            .unwrap();
        assert!(
            matches!(&eperm, Err(ConntrackError::Kernel(e)) if e.raw_os_error() == Some(libc::EPERM)),
            "{eperm:?}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[1u8, 2, 3][..],
            &[0xff; 16][..],
            &[16, 0, 0, 0, 2, 0, 0, 0][..],
        ] {
            assert!(decode_answer(bad, 1).is_err(), "{bad:?}");
        }
        // A truncated answer.
        let good = answer_bytes(
            1,
            (sa("10.0.1.2:1"), sa("10.96.0.10:80")),
            (sa("10.0.2.2:8443"), sa("10.0.1.2:1")),
        );
        for cut in [4, 20, good.len() - 4] {
            assert!(decode_answer(&good[..cut], 1).is_err(), "cut at {cut}");
        }
    }
}
