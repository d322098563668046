//! The hashes a replica computes: the same bytes in, the same digest out,
//! on every node and every platform (SHA-256).

use sha2::{Digest, Sha256};

/// The running output digest after one more chunk: `H(prev | end | chunk)`,
/// where `end` is the offset after the chunk (little-endian).
pub fn chain(prev: &[u8; 32], end: u64, chunk: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(end.to_le_bytes());
    h.update(chunk);
    h.finalize().into()
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex, for status output and logs.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Entropy for the `n`th service event of log entry `index`, from the
/// latest tick's entropy: distinct per event, the same on every node.
pub fn event_entropy(tick_entropy: u64, index: u64, n: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(tick_entropy.to_le_bytes());
    h.update(index.to_le_bytes());
    h.update(n.to_le_bytes());
    let d: [u8; 32] = h.finalize().into();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}
