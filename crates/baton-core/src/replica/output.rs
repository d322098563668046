//! A connection's output as a replica keeps it: the bytes from the
//! client's latest acknowledged byte on (what a takeover must send again),
//! and a running digest of everything written (the divergence guard).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::digest;

/// Digests remembered per connection, at the last chunk boundaries: a
/// primary's digest entry lands a few entries after the state it was taken
/// at, and is checked against the boundary it names.
pub const DIGEST_HISTORY: usize = 64;

/// What a replica knows of its output digest at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAt {
    Known([u8; 32]),
    /// Not a chunk boundary of ours: a replica that wrote the same chunks
    /// has the offset, so an offset inside our output that we never had is
    /// a divergence too.
    NotABoundary,
    /// Past what we wrote.
    Ahead,
    /// Too old to be remembered: nothing can be said.
    Forgotten,
}

/// The output of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStream {
    /// Bytes the service wrote.
    sent: u64,
    /// Bytes the client acknowledged; at most `sent`.
    acked: u64,
    /// Bytes `acked..sent`.
    retained: VecDeque<u8>,
    /// Digest of bytes `0..sent`, chained chunk by chunk.
    digest: [u8; 32],
    /// `(offset, digest)` at the latest chunk boundaries, oldest first.
    history: VecDeque<(u64, [u8; 32])>,
    /// The newest boundary no longer in `history` (0: none dropped yet).
    forgotten: u64,
}

impl OutputStream {
    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Bytes the client acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes written but not acknowledged: what is retained.
    pub fn unacked(&self) -> u64 {
        self.sent - self.acked
    }

    /// The retained bytes, from the first unacknowledged one.
    pub fn retained(&self) -> impl Iterator<Item = &u8> + '_ {
        self.retained.iter()
    }

    /// The running digest and the offset it covers.
    pub fn digest(&self) -> (u64, [u8; 32]) {
        (self.sent, self.digest)
    }

    /// Appends one chunk the service wrote.
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.sent += bytes.len() as u64;
        self.retained.extend(bytes.iter().copied());
        self.digest = digest::chain(&self.digest, self.sent, bytes);
        if self.history.len() >= DIGEST_HISTORY {
            if let Some((offset, _)) = self.history.pop_front() {
                self.forgotten = offset;
            }
        }
        self.history.push_back((self.sent, self.digest));
    }

    /// The client acknowledged `bytes` more of our sequence space (a FIN
    /// counts one, hence the cap).
    pub fn ack(&mut self, bytes: u64) {
        let n = bytes.min(self.unacked());
        self.acked += n;
        self.retained.drain(..n as usize);
    }

    /// Our digest at `offset`, for the divergence guard.
    pub fn digest_at(&self, offset: u64) -> DigestAt {
        if offset > self.sent {
            return DigestAt::Ahead;
        }
        if offset == 0 {
            return DigestAt::Known([0; 32]);
        }
        if let Some((_, d)) = self.history.iter().find(|(o, _)| *o == offset) {
            return DigestAt::Known(*d);
        }
        if offset > self.forgotten {
            DigestAt::NotABoundary
        } else {
            DigestAt::Forgotten
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retains_from_the_acknowledged_byte() {
        let mut o = OutputStream::default();
        o.push(b"hello");
        o.push(b" world");
        assert_eq!(o.unacked(), 11);
        o.ack(3);
        assert_eq!(o.retained().copied().collect::<Vec<u8>>(), b"lo world");
        // A FIN's sequence number acknowledges nothing more.
        o.ack(100);
        assert_eq!((o.sent(), o.acked(), o.unacked()), (11, 11, 0));
    }

    #[test]
    fn digests_by_boundary() {
        let mut a = OutputStream::default();
        let mut b = OutputStream::default();
        a.push(b"ab");
        a.push(b"cd");
        b.push(b"abcd");
        // Same bytes in other chunks are another output (the service's
        // writes differ), and offsets inside a chunk are not boundaries.
        assert_ne!(a.digest().1, b.digest().1);
        assert!(matches!(a.digest_at(2), DigestAt::Known(_)));
        assert_eq!(b.digest_at(2), DigestAt::NotABoundary);
        assert_eq!(a.digest_at(5), DigestAt::Ahead);
        for _ in 0..DIGEST_HISTORY {
            a.push(b"x");
        }
        assert_eq!(a.digest_at(2), DigestAt::Forgotten);
        assert_eq!(a.digest_at(a.sent()), DigestAt::Known(a.digest().1));
    }
}
