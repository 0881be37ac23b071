//! The TLSHub module's netlink messages, byte for byte as described in
//! `provider-tlshub/PROTOCOL.md`: requests in layout v1 or v2, replies
//! checked by type and length before anything is believed.

use std::net::{Ipv4Addr, SocketAddrV4};

use zeroize::Zeroizing;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;

/// Request payload layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 16 bytes: client IP, server IP, ports, opcode, server flag.
    V1,
    /// 20 bytes: v1 plus the server node's IP after the server IP.
    V2,
}

/// What the request asks the module to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Once per socket.
    Init = 0,
    /// Run the node-level handshake with the peer.
    Start = 1,
    /// Get the master key of the 4-tuple.
    Fetch = 2,
}

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The connecting pod.
    pub client: SocketAddrV4,
    /// The accepting pod.
    pub server: SocketAddrV4,
    /// The server pod's node (layout v2 only).
    pub server_node: Option<Ipv4Addr>,
    /// The operation.
    pub opcode: Opcode,
    /// Whether the caller is the server side.
    pub server_side: bool,
}

/// A message that cannot be built or believed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Layout v2 needs the server node's address.
    #[error("layout v2 needs the server node address (pod-to-node mapping)")]
    MissingServerNode,
    /// The datagram is shorter than a header plus the reply type.
    #[error("reply of {len} bytes is too short (need at least {min})")]
    Short {
        /// Received length.
        len: usize,
        /// Minimum.
        min: usize,
    },
    /// `nlmsg_len` disagrees with the datagram.
    #[error("nlmsg_len {claimed} does not fit the {len}-byte datagram")]
    Length {
        /// The header's claim.
        claimed: usize,
        /// What arrived.
        len: usize,
    },
    /// A request payload that is neither layout (16 or 20 bytes).
    #[error("request payload of {len} bytes is neither layout v1 (16) nor v2 (20)")]
    RequestLength {
        /// The payload length.
        len: usize,
    },
    /// A reply type the protocol does not have.
    #[error("unknown reply type {0:#04x}")]
    UnknownType(u8),
    /// A FETCH status other than 0, -1, -2.
    #[error("unknown FETCH status {0}")]
    UnknownStatus(i32),
    /// A FETCH reply with status 0 and an all-zero key (the original
    /// client's failure mode: a zeroed buffer taken for a key).
    #[error("FETCH returned an all-zero master key")]
    ZeroKey,
}

/// Encodes a request as a full netlink datagram (header in host byte
/// order, addresses and ports in network order, padding zeroed).
pub fn encode(req: &Request, layout: Layout, nl_pid: u32) -> Result<Vec<u8>, CodecError> {
    let payload_len = match layout {
        Layout::V1 => 16,
        Layout::V2 => 20,
    };
    let total = NLMSG_HDRLEN + payload_len;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_ne_bytes()); // nlmsg_len
    out.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_type
    out.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
    out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
    out.extend_from_slice(&nl_pid.to_ne_bytes()); // nlmsg_pid
    out.extend_from_slice(&req.client.ip().octets());
    out.extend_from_slice(&req.server.ip().octets());
    if layout == Layout::V2 {
        out.extend_from_slice(
            &req.server_node
                .ok_or(CodecError::MissingServerNode)?
                .octets(),
        );
    }
    out.extend_from_slice(&req.client.port().to_be_bytes());
    out.extend_from_slice(&req.server.port().to_be_bytes());
    out.push(req.opcode as u8);
    out.push(u8::from(req.server_side));
    out.extend_from_slice(&[0, 0]);
    Ok(out)
}

/// Decodes a request datagram (the module's side; used by the stand-in).
/// The layout follows from the payload length: 16 bytes v1, 20 bytes v2.
pub fn decode_request(datagram: &[u8]) -> Result<(Request, Layout, u32), CodecError> {
    let payload = datagram.get(NLMSG_HDRLEN..).unwrap_or(&[]);
    let (layout, rest) = match payload.len() {
        16 => (Layout::V1, 8),
        20 => (Layout::V2, 12),
        len => return Err(CodecError::RequestLength { len }),
    };
    let ip = |o: usize| Ipv4Addr::new(payload[o], payload[o + 1], payload[o + 2], payload[o + 3]);
    let port = |o: usize| u16::from_be_bytes([payload[o], payload[o + 1]]);
    let opcode = match payload[rest + 4] {
        0 => Opcode::Init,
        1 => Opcode::Start,
        2 => Opcode::Fetch,
        other => return Err(CodecError::UnknownType(other)),
    };
    let pid = u32::from_ne_bytes([datagram[12], datagram[13], datagram[14], datagram[15]]);
    let request = Request {
        client: SocketAddrV4::new(ip(0), port(rest)),
        server: SocketAddrV4::new(ip(4), port(rest + 2)),
        server_node: (layout == Layout::V2).then(|| ip(8)),
        opcode,
        server_side: payload[rest + 5] == 1,
    };
    Ok((request, layout, pid))
}

/// Reply types (`msg_type`, the byte after the header).
pub mod reply_type {
    /// Handshake succeeded, first with this peer.
    pub const HANDSHAKE_FIRST: u8 = 0x01;
    /// Handshake succeeded, not the first.
    pub const HANDSHAKE_AGAIN: u8 = 0x02;
    /// Handshake failed.
    pub const HANDSHAKE_FAILED: u8 = 0x03;
    /// A log line.
    pub const LOG: u8 = 0x04;
    /// Already connected.
    pub const ALREADY_CONNECTED: u8 = 0x05;
    /// The FETCH answer. Not in the reconstructed table; 0x06 is the one
    /// gap in the numbering and is what our stand-in sends.
    pub const KEY: u8 = 0x06;
    /// INIT complete.
    pub const INIT_COMPLETE: u8 = 0x07;
}

/// A checked reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The handshake with the peer node succeeded (`first`: the first one).
    Handshake {
        /// First with this peer.
        first: bool,
    },
    /// The handshake failed; the module's text.
    HandshakeFailed(String),
    /// The module is already connected to the peer.
    AlreadyConnected,
    /// A log line from the module.
    Log(String),
    /// INIT finished.
    InitComplete,
    /// FETCH: the master key.
    Key(Zeroizing<[u8; 32]>),
    /// FETCH: no key (status -1: no handshake yet, or an error).
    NoKey,
    /// FETCH: the master key expired (status -2).
    Expired,
}

/// The NUL-terminated text of a message.
fn text(msg: &[u8]) -> String {
    let end = msg.iter().position(|b| *b == 0).unwrap_or(msg.len());
    String::from_utf8_lossy(&msg[..end]).into_owned()
}

/// Decodes one reply datagram, checking length and type.
pub fn decode(datagram: &[u8]) -> Result<Reply, CodecError> {
    let min = NLMSG_HDRLEN + 1;
    if datagram.len() < min {
        return Err(CodecError::Short {
            len: datagram.len(),
            min,
        });
    }
    let claimed = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
    if claimed < min || claimed > datagram.len() {
        return Err(CodecError::Length {
            claimed,
            len: datagram.len(),
        });
    }
    let msg_type = datagram[NLMSG_HDRLEN];
    let msg = &datagram[NLMSG_HDRLEN + 1..claimed];
    Ok(match msg_type {
        reply_type::HANDSHAKE_FIRST => Reply::Handshake { first: true },
        reply_type::HANDSHAKE_AGAIN => Reply::Handshake { first: false },
        reply_type::HANDSHAKE_FAILED => Reply::HandshakeFailed(text(msg)),
        reply_type::LOG => Reply::Log(text(msg)),
        reply_type::ALREADY_CONNECTED => Reply::AlreadyConnected,
        reply_type::INIT_COMPLETE => Reply::InitComplete,
        reply_type::KEY => {
            if msg.len() < 4 {
                return Err(CodecError::Short {
                    len: datagram.len(),
                    min: min + 4,
                });
            }
            match i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) {
                0 => {
                    if msg.len() < 36 {
                        return Err(CodecError::Short {
                            len: datagram.len(),
                            min: min + 36,
                        });
                    }
                    let mut key = Zeroizing::new([0u8; 32]);
                    key.copy_from_slice(&msg[4..36]);
                    if key.iter().all(|b| *b == 0) {
                        return Err(CodecError::ZeroKey);
                    }
                    Reply::Key(key)
                }
                -1 => Reply::NoKey,
                -2 => Reply::Expired,
                other => return Err(CodecError::UnknownStatus(other)),
            }
        }
        other => return Err(CodecError::UnknownType(other)),
    })
}

/// Builds a reply datagram (for the stand-in module and tests).
pub fn encode_reply(msg_type: u8, msg: &[u8], nl_pid: u32) -> Vec<u8> {
    let total = NLMSG_HDRLEN + 1 + msg.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&nl_pid.to_ne_bytes());
    out.push(msg_type);
    out.extend_from_slice(msg);
    out
}

/// The message of a FETCH reply: status then the 32-byte key.
pub fn key_message(status: i32, key: &[u8; 32]) -> Vec<u8> {
    let mut m = status.to_ne_bytes().to_vec();
    m.extend_from_slice(key);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(opcode: Opcode) -> Request {
        Request {
            client: "10.0.1.2:40000".parse().unwrap(),
            server: "10.0.2.2:8443".parse().unwrap(),
            server_node: Some("192.168.0.2".parse().unwrap()),
            opcode,
            server_side: true,
        }
    }

    #[test]
    fn layout_v1_is_byte_exact() {
        let d = encode(&req(Opcode::Fetch), Layout::V1, 77).unwrap();
        assert_eq!(d.len(), 32);
        assert_eq!(u32::from_ne_bytes(d[0..4].try_into().unwrap()), 32);
        assert_eq!(&d[4..12], &[0; 8], "type, flags, seq are zero");
        assert_eq!(u32::from_ne_bytes(d[12..16].try_into().unwrap()), 77);
        assert_eq!(
            hex::encode(&d[16..]),
            // 10.0.1.2  10.0.2.2  40000  8443 op srv pad
            "0a0001020a0002029c4020fb02010000"
        );
    }

    #[test]
    fn layout_v2_puts_the_node_in_the_middle() {
        let d = encode(&req(Opcode::Start), Layout::V2, 1).unwrap();
        assert_eq!(d.len(), 36);
        assert_eq!(
            hex::encode(&d[16..]),
            "0a0001020a000202c0a800029c4020fb01010000"
        );
        let mut no_node = req(Opcode::Start);
        no_node.server_node = None;
        assert_eq!(
            encode(&no_node, Layout::V2, 1),
            Err(CodecError::MissingServerNode)
        );
    }

    #[test]
    fn replies_decode_by_type_and_are_checked() {
        assert_eq!(decode(&encode_reply(0x07, &[], 0)), Ok(Reply::InitComplete));
        assert_eq!(
            decode(&encode_reply(0x01, &[], 0)),
            Ok(Reply::Handshake { first: true })
        );
        assert_eq!(
            decode(&encode_reply(0x04, b"hello\0junk", 0)),
            Ok(Reply::Log("hello".into()))
        );
        let key = [7u8; 32];
        match decode(&encode_reply(0x06, &key_message(0, &key), 0)) {
            Ok(Reply::Key(k)) => assert_eq!(*k, key),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(&encode_reply(0x06, &key_message(-1, &[0; 32]), 0)),
            Ok(Reply::NoKey)
        );
        assert_eq!(
            decode(&encode_reply(0x06, &key_message(-2, &[0; 32]), 0)),
            Ok(Reply::Expired)
        );
        assert_eq!(
            decode(&encode_reply(0x06, &key_message(0, &[0; 32]), 0)),
            Err(CodecError::ZeroKey)
        );
        assert_eq!(
            decode(&encode_reply(0x06, &key_message(3, &key), 0)),
            Err(CodecError::UnknownStatus(3))
        );
        assert!(matches!(
            decode(&encode_reply(0x06, &[0, 0, 0, 0, 1, 2], 0)),
            Err(CodecError::Short { .. })
        ));
        assert_eq!(
            decode(&encode_reply(0x09, &[], 0)),
            Err(CodecError::UnknownType(9))
        );
        assert!(matches!(decode(&[0u8; 10]), Err(CodecError::Short { .. })));
        let mut lying = encode_reply(0x07, &[], 0);
        lying[0] = 200;
        assert!(matches!(decode(&lying), Err(CodecError::Length { .. })));
    }

    proptest! {
        /// Whatever arrives, decoding returns a value or an error: no panic,
        /// and a key is only ever believed from a well-formed KEY reply.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Reply::Key(k)) = decode(&bytes) {
                prop_assert_eq!(bytes[NLMSG_HDRLEN], reply_type::KEY);
                prop_assert!(k.iter().any(|b| *b != 0));
            }
        }

        /// Requests in both layouts decode to what was encoded.
        #[test]
        fn requests_round_trip_in_both_layouts(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), node in any::<[u8; 4]>(), pa in any::<u16>(), pb in any::<u16>(), op in 0u8..3, srv in any::<bool>(), v2 in any::<bool>(), pid in any::<u32>()) {
            let layout = if v2 { Layout::V2 } else { Layout::V1 };
            let r = Request {
                client: SocketAddrV4::new(a.into(), pa),
                server: SocketAddrV4::new(b.into(), pb),
                server_node: v2.then(|| node.into()),
                opcode: [Opcode::Init, Opcode::Start, Opcode::Fetch][usize::from(op)],
                server_side: srv,
            };
            let d = encode(&r, layout, pid).unwrap();
            prop_assert_eq!(decode_request(&d), Ok((r, layout, pid)));
        }

        /// Requests round-trip through their byte layout.
        #[test]
        fn requests_encode_fields_in_place(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), pa in any::<u16>(), pb in any::<u16>(), srv in any::<bool>()) {
            let r = Request {
                client: SocketAddrV4::new(a.into(), pa),
                server: SocketAddrV4::new(b.into(), pb),
                server_node: None,
                opcode: Opcode::Fetch,
                server_side: srv,
            };
            let d = encode(&r, Layout::V1, 5).unwrap();
            prop_assert_eq!(&d[16..20], &a);
            prop_assert_eq!(&d[20..24], &b);
            prop_assert_eq!(u16::from_be_bytes([d[24], d[25]]), pa);
            prop_assert_eq!(u16::from_be_bytes([d[26], d[27]]), pb);
            prop_assert_eq!(d[29], u8::from(srv));
            prop_assert_eq!(&d[30..32], &[0, 0]);
        }
    }
}
