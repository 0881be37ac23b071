//! The bytes the test applications send: pseudo-random, reproducible from
//! a seed, with a plaintext marker at every 4 KiB so a capture that carries
//! any of it in clear text is caught.

/// Seed of the bytes the client sends.
pub const CLIENT_SEED: u64 = 0xc11e;
/// Seed of the bytes the server sends.
pub const SERVER_SEED: u64 = 0x5e4e;

/// Appears at every 4096-byte boundary of the stream.
pub const MARKER: &[u8] = b"TLSHUB-PLAINTEXT-MARKER";

/// Fills `buf` with the stream bytes at `offset` for `seed`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let in_block = (pos % 4096) as usize;
        *b = if in_block < MARKER.len() {
            MARKER[in_block]
        } else {
            // splitmix64 of the position: cheap and position-addressable.
            let mut z = pos.wrapping_add(seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        };
    }
}

/// Checks `buf` against the stream at `offset`; returns the first bad offset.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Result<(), u64> {
    let mut want = vec![0u8; buf.len()];
    fill(seed, offset, &mut want);
    match buf.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(offset + i as u64),
    }
}

/// A server's answer to a piece of the client's stream at `offset`: checks
/// that `buf` is the client's bytes there and replaces them, in place, with
/// the server's bytes over the same span (the load servers answer every
/// piece this way, so both directions are verified). `Err`: the first
/// offset that differs; `buf` is then left as received.
pub fn answer(offset: u64, buf: &mut [u8]) -> Result<(), u64> {
    check(CLIENT_SEED, offset, buf)?;
    fill(SERVER_SEED, offset, buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_compose_and_corruption_is_found() {
        let mut whole = vec![0u8; 10_000];
        fill(7, 0, &mut whole);
        let mut part = vec![0u8; 5000];
        fill(7, 5000, &mut part);
        assert_eq!(&whole[5000..], &part[..]);
        assert_eq!(&whole[4096..4096 + MARKER.len()], MARKER);
        assert!(check(7, 0, &whole).is_ok());
        whole[9000] ^= 1;
        assert_eq!(check(7, 0, &whole), Err(9000));
        assert!(check(8, 0, &part).is_err());
    }

    #[test]
    fn an_answer_replaces_the_client_span_with_the_server_span() {
        let mut piece = vec![0u8; 100];
        fill(CLIENT_SEED, 4000, &mut piece);
        assert_eq!(answer(4000, &mut piece), Ok(()));
        assert!(check(SERVER_SEED, 4000, &piece).is_ok());
        let mut wrong = vec![0u8; 10];
        fill(CLIENT_SEED, 0, &mut wrong);
        wrong[3] ^= 1;
        let received = wrong.clone();
        assert_eq!(answer(0, &mut wrong), Err(3));
        assert_eq!(wrong, received);
    }
}
