//! The messages two nodes' providers send each other on their node-pair
//! session after its TLS 1.3 handshake. Nothing in them is secret (a
//! connection's addresses and ISNs are on the wire anyway), but a forged
//! or replayed one could make a node key a connection from the wrong
//! generation, so each carries an HMAC-SHA256 tag over a per-direction
//! sequence number, under a key both ends export from the session.
//!
//! A frame: `length: u16` (of the rest), `kind: u8`, the payload, then the
//! 32-byte tag of `sequence: u64 || kind || payload`, all big-endian.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::{GenerationId, IDENTITY_LEN};

/// Bytes of a tag.
const TAG_LEN: usize = 32;
/// The largest frame body this protocol sends (a notice).
pub const MAX_BODY: usize = 1 + 8 + IDENTITY_LEN + TAG_LEN;

const KIND_READY: u8 = 1;
const KIND_NOTICE: u8 = 2;

/// One session message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// "I hold this session's generation": the dialer's first message;
    /// the acceptor answers it with its own once it holds the generation
    /// too (see [`state`](super::state) for why in that order).
    Ready {
        /// The session's generation.
        generation: GenerationId,
    },
    /// From the connecting side of an application connection: it keyed the
    /// connection whose identity this is from `generation`.
    Notice {
        /// Which generation.
        generation: GenerationId,
        /// [`ConnectionId::context`](crate::ConnectionId::context).
        identity: [u8; IDENTITY_LEN],
    },
}

/// A frame that is not a message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length is not that of any message.
    #[error("a frame of {0} bytes, not a message of the node-pair protocol")]
    Length(usize),
    /// An unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// The tag does not match: forged, replayed, reordered or from another
    /// session.
    #[error("the message's tag does not verify")]
    Tag,
}

type HmacSha256 = Hmac<Sha256>;

fn tag(key: &[u8; 32], sequence: u64, body: &[u8]) -> [u8; TAG_LEN] {
    // new_from_slice fails only on key lengths HMAC cannot take; 32 is fine.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(&sequence.to_be_bytes());
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Seals the messages of one direction.
pub struct Sealer {
    key: Zeroizing<[u8; 32]>,
    sequence: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Starts at sequence 0 under `key`.
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self { key, sequence: 0 }
    }

    /// The frame of `message`, with the next sequence number.
    pub fn seal(&mut self, message: &Message) -> Vec<u8> {
        let mut body = Vec::with_capacity(MAX_BODY);
        match message {
            Message::Ready { generation } => {
                body.push(KIND_READY);
                body.extend_from_slice(generation);
            }
            Message::Notice {
                generation,
                identity,
            } => {
                body.push(KIND_NOTICE);
                body.extend_from_slice(generation);
                body.extend_from_slice(identity);
            }
        }
        let t = tag(&self.key, self.sequence, &body);
        self.sequence += 1;
        body.extend_from_slice(&t);
        let mut frame = Vec::with_capacity(2 + body.len());
        // MAX_BODY fits a u16.
        frame.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }
}

/// Opens the messages of one direction, in order.
pub struct Opener {
    key: Zeroizing<[u8; 32]>,
    sequence: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Expects sequence 0 next, under `key`.
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self { key, sequence: 0 }
    }

    /// Whether a frame of `len` body bytes may follow (checked before
    /// reading it).
    pub fn acceptable_length(len: usize) -> Result<(), WireError> {
        if len == 1 + 8 + TAG_LEN || len == MAX_BODY {
            Ok(())
        } else {
            Err(WireError::Length(len))
        }
    }

    /// The message in `body` (a frame without its length), checked.
    pub fn open(&mut self, body: &[u8]) -> Result<Message, WireError> {
        Self::acceptable_length(body.len())?;
        let (content, got) = body.split_at(body.len() - TAG_LEN);
        let want = tag(&self.key, self.sequence, content);
        // Not secret-dependent timing that matters here: the tag is over
        // public bytes, and a mismatch ends the session.
        if want.as_slice() != got {
            return Err(WireError::Tag);
        }
        self.sequence += 1;
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&content[1..9]);
        match (content[0], content.len()) {
            (KIND_READY, 9) => Ok(Message::Ready { generation }),
            (KIND_NOTICE, n) if n == 9 + IDENTITY_LEN => {
                let mut identity = [0u8; IDENTITY_LEN];
                identity.copy_from_slice(&content[9..]);
                Ok(Message::Notice {
                    generation,
                    identity,
                })
            }
            (KIND_READY | KIND_NOTICE, n) => Err(WireError::Length(n + TAG_LEN)),
            (kind, _) => Err(WireError::Kind(kind)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        (
            Sealer::new(Zeroizing::new([7; 32])),
            Opener::new(Zeroizing::new([7; 32])),
        )
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
        assert_eq!(len + 2, frame.len());
        &frame[2..]
    }

    #[test]
    fn messages_round_trip_in_order() {
        let (mut s, mut o) = pair();
        let msgs = [
            Message::Ready { generation: [1; 8] },
            Message::Notice {
                generation: [2; 8],
                identity: [3; IDENTITY_LEN],
            },
        ];
        for m in msgs {
            let f = s.seal(&m);
            assert_eq!(o.open(body(&f)), Ok(m));
        }
    }

    #[test]
    fn forged_replayed_or_foreign_frames_are_refused() {
        let (mut s, mut o) = pair();
        let first = s.seal(&Message::Ready { generation: [1; 8] });
        let second = s.seal(&Message::Ready { generation: [2; 8] });
        // Reordered: the second frame where the first is due.
        assert_eq!(o.open(body(&second)), Err(WireError::Tag));
        assert!(o.open(body(&first)).is_ok());
        // Replayed.
        assert_eq!(o.open(body(&first)), Err(WireError::Tag));
        // Altered.
        let mut third = s.seal(&Message::Ready { generation: [3; 8] });
        let (mut o2, mut s2) = (
            Opener::new(Zeroizing::new([7; 32])),
            Sealer::new(Zeroizing::new([8; 32])),
        );
        let n = third.len();
        third[n - 40] ^= 1;
        assert_eq!(
            o.open(body(&second)),
            Ok(Message::Ready { generation: [2; 8] })
        );
        assert_eq!(o.open(body(&third)), Err(WireError::Tag));
        // Another key.
        let foreign = s2.seal(&Message::Ready { generation: [1; 8] });
        assert_eq!(o2.open(body(&foreign)), Err(WireError::Tag));
        assert_eq!(Opener::acceptable_length(5), Err(WireError::Length(5)));
        assert_eq!(o2.open(&[0; 3]), Err(WireError::Length(3)));
    }
}
