//! What crossed the wire: pcap reading, TCP stream reassembly, TLS record
//! parsing and TLS 1.3 record decryption, so a test can prove the bytes
//! between the nodes are real TLS carrying exactly the applications' data.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aes_gcm::aead::{Aead, KeyInit, Payload};

/// One direction of one TCP connection, reassembled.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Payload bytes in sequence order.
    pub bytes: Vec<u8>,
    /// Whether a SYN was captured (the flow's start is known).
    pub saw_syn: bool,
    /// What the capturing tool said (for failure messages).
    pub capture_log: String,
}

/// A capture or stream that cannot be read.
#[derive(Debug)]
pub struct WireError(pub String);

impl std::error::Error for WireError {}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(s: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(s.into()))
}

fn u16be(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[derive(Default)]
struct Segments {
    isn: Option<u32>,
    segs: Vec<(u32, Vec<u8>)>,
}

/// Reads an Ethernet pcap (as `tcpdump -w` writes) into TCP flows.
pub fn read_pcap(data: &[u8]) -> Result<Vec<Flow>, WireError> {
    if data.len() < 24 {
        return err("pcap shorter than its header");
    }
    let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => return err(format!("not a pcap file (magic {m:#x})")),
    };
    let rd32 = |b: &[u8], at: usize| {
        let a = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = rd32(data, 20);
    if linktype != 1 {
        return err(format!("pcap link type {linktype}, want Ethernet (1)"));
    }
    let mut flows: HashMap<(SocketAddr, SocketAddr, usize), Segments> = HashMap::new();
    let mut generations: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
    let mut order = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = rd32(data, at + 8) as usize;
        let orig = rd32(data, at + 12) as usize;
        at += 16;
        if at + incl > data.len() {
            return err("truncated pcap record");
        }
        if incl < orig {
            return err("packet truncated by the snap length; capture with -s 0");
        }
        let pkt = &data[at..at + incl];
        at += incl;
        let Some((src, dst, seq, syn, payload)) = parse_tcp(pkt) else {
            continue;
        };
        // A SYN with a new ISN on a 4-tuple already seen is a new
        // connection (a reset one does not hold the port in TIME_WAIT, so
        // the next connect may get the same one): a new flow, keyed by
        // generation.
        let generation = generations.entry((src, dst)).or_insert(0usize);
        if syn
            && flows
                .get(&(src, dst, *generation))
                .is_some_and(|f: &Segments| f.isn.is_some_and(|i| i != seq) || !f.segs.is_empty())
        {
            *generation += 1;
        }
        let key = (src, dst, *generation);
        let entry = flows.entry(key).or_insert_with(|| {
            order.push(key);
            Segments::default()
        });
        if syn {
            entry.isn = Some(seq);
            // TCP Fast Open: data in the SYN starts one past the ISN. Left
            // out, a SYN carrying plaintext would never be checked.
            if !payload.is_empty() {
                entry.segs.push((seq.wrapping_add(1), payload.to_vec()));
            }
        } else if !payload.is_empty() {
            entry.segs.push((seq, payload.to_vec()));
        }
    }
    let mut out = Vec::new();
    for key in order {
        let Some(mut s) = flows.remove(&key) else {
            continue;
        };
        let base = match s.isn {
            Some(isn) => isn.wrapping_add(1),
            None => s.segs.first().map(|x| x.0).unwrap_or(0),
        };
        s.segs.sort_by_key(|(seq, _)| seq.wrapping_sub(base));
        let mut bytes = Vec::new();
        for (seq, p) in s.segs {
            let rel = seq.wrapping_sub(base) as usize;
            let have = bytes.len();
            if rel > have {
                return err(format!(
                    "{} -> {}: {} bytes missing from the capture at offset {have}",
                    key.0,
                    key.1,
                    rel - have
                ));
            }
            // Retransmissions overlap what we have; keep only the new tail.
            if rel + p.len() > have {
                bytes.extend_from_slice(&p[have - rel..]);
            }
        }
        out.push(Flow {
            src: key.0,
            dst: key.1,
            bytes,
            saw_syn: s.isn.is_some(),
            capture_log: String::new(),
        });
    }
    Ok(out)
}

fn parse_tcp(pkt: &[u8]) -> Option<(SocketAddr, SocketAddr, u32, bool, &[u8])> {
    if pkt.len() < 14 {
        return None;
    }
    let ethertype = u16be(pkt, 12);
    let ip = &pkt[14..];
    let (src_ip, dst_ip, tcp, ip_payload_len) = match ethertype {
        0x0800 => {
            if ip.len() < 20 || ip[9] != 6 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16be(ip, 2));
            let s = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let d = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (
                s,
                d,
                ip.get(ihl..total.min(ip.len()))?,
                total.checked_sub(ihl)?,
            )
        }
        0x86dd => {
            if ip.len() < 40 || ip[6] != 6 {
                return None;
            }
            let plen = usize::from(u16be(ip, 4));
            let mut s = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&ip[24..40]);
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                ip.get(40..(40 + plen).min(ip.len()))?,
                plen,
            )
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    let off = usize::from(tcp[12] >> 4) * 4;
    let syn = tcp[13] & 0x02 != 0;
    let payload = tcp.get(off..ip_payload_len.min(tcp.len()))?;
    Some((
        SocketAddr::new(src_ip, u16be(tcp, 0)),
        SocketAddr::new(dst_ip, u16be(tcp, 2)),
        u32be(tcp, 4),
        syn,
        payload,
    ))
}

/// One TLS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Content type (22 handshake, 23 application data, 20 CCS, 21 alert).
    pub content_type: u8,
    /// The 5-byte header (the AEAD additional data in TLS 1.3).
    pub header: [u8; 5],
    /// The record body.
    pub body: &'a [u8],
}

/// Splits a stream into TLS records; fails on anything that is not one
/// (unknown type, wrong version, oversize length, trailing partial record).
pub fn tls_records(stream: &[u8]) -> Result<Vec<Record<'_>>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        if stream.len() - at < 5 {
            return err(format!("partial record header at offset {at}"));
        }
        let h = &stream[at..at + 5];
        if !(20..=23).contains(&h[0]) {
            return err(format!("byte {at}: content type {} is not TLS", h[0]));
        }
        if h[1] != 3 || h[2] > 4 {
            return err(format!(
                "byte {at}: version {:#04x}{:02x} is not TLS",
                h[1], h[2]
            ));
        }
        let len = usize::from(u16be(h, 3));
        if len > (1 << 14) + 256 {
            return err(format!(
                "byte {at}: record length {len} above the TLS limit"
            ));
        }
        if stream.len() - at - 5 < len {
            return err(format!("byte {at}: record of {len} bytes cut off"));
        }
        out.push(Record {
            content_type: h[0],
            header: [h[0], h[1], h[2], h[3], h[4]],
            body: &stream[at + 5..at + 5 + len],
        });
        at += 5 + len;
    }
    Ok(out)
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Decrypts one TLS 1.3 record; returns (inner content type, plaintext).
pub fn decrypt_tls13(
    suite: &str,
    key: &[u8],
    iv: &[u8],
    seq: u64,
    rec: &Record<'_>,
) -> Option<(u8, Vec<u8>)> {
    if iv.len() != 12 {
        return None;
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(iv);
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    let payload = Payload {
        msg: rec.body,
        aad: &rec.header,
    };
    let mut plain = match suite {
        "aes-gcm-128" => aes_gcm::Aes128Gcm::new_from_slice(key)
            .ok()?
            .decrypt((&nonce).into(), payload)
            .ok()?,
        "aes-gcm-256" => aes_gcm::Aes256Gcm::new_from_slice(key)
            .ok()?
            .decrypt((&nonce).into(), payload)
            .ok()?,
        "chacha20-poly1305" => chacha20poly1305::ChaCha20Poly1305::new_from_slice(key)
            .ok()?
            .decrypt((&nonce).into(), payload)
            .ok()?,
        _ => return None,
    };
    while plain.last() == Some(&0) {
        plain.pop();
    }
    let ty = plain.pop()?;
    Some((ty, plain))
}

/// How many encrypted records a TLS 1.3 handshake flight may put before
/// the application data (EncryptedExtensions, Certificate split over
/// several records, CertificateVerify, Finished).
const MAX_ENCRYPTED_HANDSHAKE_RECORDS: usize = 16;

/// Decrypts the application data of one direction: records before the first
/// one that opens with the application key at sequence 0 are the handshake;
/// every record after it must decrypt, in order, as application data.
///
/// Skipping is allowed only where a handshake is on the wire: a flow that
/// begins with a handshake record (0x16) may have up to
/// [`MAX_ENCRYPTED_HANDSHAKE_RECORDS`] encrypted handshake records first.
/// A flow without one (a key-only provider's connection) must decrypt from
/// its first record; otherwise records under wrong keys would be skipped
/// and the flow would pass as one that carried no data.
pub fn decrypt_application_data(
    stream: &[u8],
    suite: &str,
    key: &[u8],
    iv: &[u8],
) -> Result<Vec<u8>, WireError> {
    let records = tls_records(stream)?;
    let handshake = records.first().is_some_and(|r| r.content_type == 22);
    let mut skipped = 0;
    let mut seq = None::<u64>;
    let mut out = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        match seq {
            None => {
                let opened = if rec.content_type == 23 {
                    decrypt_tls13(suite, key, iv, 0, rec)
                } else {
                    None
                };
                if rec.content_type == 23 && opened.is_none() {
                    skipped += 1;
                    if !handshake || skipped > MAX_ENCRYPTED_HANDSHAKE_RECORDS {
                        return err(format!(
                            "record {i} does not decrypt with the reported key, and {}",
                            if handshake {
                                "too many records before it did not either"
                            } else {
                                "no handshake precedes it"
                            }
                        ));
                    }
                }
                if let Some((ty, p)) = opened {
                    if ty != 23 {
                        return err(format!(
                            "record {i}: inner type {ty}, expected application data"
                        ));
                    }
                    out.extend_from_slice(&p);
                    seq = Some(1);
                }
            }
            Some(s) => {
                let (ty, p) = decrypt_tls13(suite, key, iv, s, rec).ok_or_else(|| {
                    WireError(format!(
                        "record {i} (sequence {s}) does not decrypt with the reported key"
                    ))
                })?;
                if ty != 23 {
                    return err(format!(
                        "record {i}: inner type {ty}, expected application data"
                    ));
                }
                out.extend_from_slice(&p);
                seq = Some(s + 1);
            }
        }
    }
    Ok(out)
}

/// What tcpdump said at its end about packets it did not write: the
/// packets dropped by the kernel plus those dropped by the interface.
/// A log without the kernel line is an error too (tcpdump did not finish
/// cleanly, so its last packets may be missing). Each count is read as a
/// whole number at the start of its own line, so "10 packets dropped"
/// is never taken for "0 packets dropped".
pub fn capture_drops(tcpdump_log: &str) -> Result<u64, WireError> {
    let count = |suffix: &str| {
        tcpdump_log.lines().find_map(|l| {
            let l = l.trim();
            let n = l.strip_suffix(suffix)?.trim();
            n.parse::<u64>().ok()
        })
    };
    let kernel = count("packets dropped by kernel")
        .ok_or_else(|| WireError(format!("tcpdump printed no drop count: {tcpdump_log:?}")))?;
    // Only printed by tcpdump builds and interfaces that report it.
    let interface = count("packets dropped by interface").unwrap_or(0);
    Ok(kernel + interface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_drops_reads_whole_counts() {
        let clean = "listening on veth-ab\n12 packets captured\n12 packets received by filter\n0 packets dropped by kernel\n";
        assert_eq!(capture_drops(clean).unwrap(), 0);
        // The check this replaces passed this log: it contains the text
        // "0 packets dropped by kernel".
        let ten =
            "12 packets captured\n22 packets received by filter\n10 packets dropped by kernel\n";
        assert_eq!(capture_drops(ten).unwrap(), 10);
        let iface = "0 packets dropped by kernel\n3 packets dropped by interface\n";
        assert_eq!(capture_drops(iface).unwrap(), 3);
        assert!(capture_drops("tcpdump: killed\n").is_err());
    }

    #[test]
    fn non_tls_is_refused() {
        assert!(tls_records(b"GET / HTTP/1.1\r\n").is_err());
        assert!(tls_records(&[23, 3, 3, 0, 4, 1, 2]).is_err());
        assert_eq!(tls_records(&[23, 3, 3, 0, 2, 1, 2]).unwrap().len(), 1);
    }

    #[test]
    fn records_under_other_keys_are_refused_unless_a_handshake_precedes_them() {
        // One application data record of garbage: without a handshake in
        // front, it cannot be an encrypted handshake record.
        let garbage = [
            23, 3, 3, 0, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
        ];
        let (key, iv) = ([7u8; 16], [9u8; 12]);
        assert!(decrypt_application_data(&garbage, "aes-gcm-128", &key, &iv).is_err());
        // After a ClientHello-like record it may be (and yields nothing).
        let with_hello = [[22, 3, 1, 0, 1, 1].as_slice(), &garbage].concat();
        assert_eq!(
            decrypt_application_data(&with_hello, "aes-gcm-128", &key, &iv).unwrap(),
            Vec::<u8>::new()
        );
        // But not 17 of them.
        let many = [[22, 3, 1, 0, 1, 1].as_slice(), &garbage.repeat(17)].concat();
        assert!(decrypt_application_data(&many, "aes-gcm-128", &key, &iv).is_err());
    }

    #[test]
    fn tls13_record_round_trip() {
        let key = [7u8; 16];
        let iv = [9u8; 12];
        let mut nonce = iv;
        for (n, s) in nonce[4..].iter_mut().zip(3u64.to_be_bytes()) {
            *n ^= s;
        }
        let inner = [b"hello".as_slice(), &[23u8]].concat();
        let len = (inner.len() + 16) as u16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let ct = aes_gcm::Aes128Gcm::new_from_slice(&key)
            .unwrap()
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &inner,
                    aad: &header,
                },
            )
            .unwrap();
        let rec = Record {
            content_type: 23,
            header,
            body: &ct,
        };
        assert_eq!(
            decrypt_tls13("aes-gcm-128", &key, &iv, 3, &rec),
            Some((23, b"hello".to_vec()))
        );
        assert_eq!(decrypt_tls13("aes-gcm-128", &key, &iv, 2, &rec), None);
    }

    /// An Ethernet/IPv4/TCP frame from 10.0.1.2:40000 to 10.0.2.2:8443.
    fn frame(seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 1, 2, 10, 0, 2, 2]);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&8443u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[
            0,
            0,
            0,
            0,
            0x50,
            if syn { 0x02 } else { 0x18 },
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ]);
        f.extend_from_slice(payload);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for f in frames {
            let len = f.len() as u32;
            for v in [0u32, 0, len, len] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p.extend_from_slice(f);
        }
        p
    }

    #[test]
    fn a_new_syn_on_a_reused_4_tuple_starts_a_new_flow() {
        let data = pcap(&[
            frame(1000, true, b""),
            frame(1001, false, b"first"),
            // The same 4-tuple again (the first was reset): another ISN.
            frame(4_000_000_000, true, b""),
            frame(4_000_000_001, false, b"second"),
        ]);
        let flows = read_pcap(&data).unwrap();
        let bytes: Vec<&[u8]> = flows.iter().map(|f| f.bytes.as_slice()).collect();
        assert_eq!(bytes, [b"first".as_slice(), b"second".as_slice()]);
    }

    #[test]
    fn data_in_a_syn_is_part_of_the_flow() {
        // A Fast Open SYN carries the first bytes; the rest follows.
        let data = pcap(&[frame(500, true, b"TFO "), frame(505, false, b"rest")]);
        let flows = read_pcap(&data).unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].bytes, b"TFO rest");
    }
}
