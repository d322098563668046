//! The entries of a service's replicated log: everything a replica needs
//! to rebuild the service, its connections and their output, and nothing
//! that only one node knows.
//!
//! Each entry is one [`crate::wire`] frame (magic [`MAGIC`], version
//! [`VERSION`]), so a node of another version refuses it clearly and
//! hostile bytes are refused, never trusted.

use serde::{Deserialize, Serialize};

use crate::packet::{ConnKey, TcpChecksum, Timestamp};
use crate::wire::{self, WireError};

/// Frame magic of replicated log entries.
pub const MAGIC: [u8; 4] = *b"BTRE";
/// Version of the entry format this build speaks.
pub const VERSION: u16 = 1;

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaEntry {
    /// A client segment, exactly as the primary captured it.
    Segment(ClientSegment),
    /// The primary's kernel accepted a connection: our side of the
    /// handshake, which no other node can see.
    Established(Established),
    /// The primary's kernel dropped a connection on its own (timeout,
    /// its own reset): every replica forgets it.
    Aborted { conn: ConnKey },
    /// Time and randomness for the service (proposed by the leader only).
    Tick(Tick),
    /// The newest pure ACK of a connection, coalesced: pure ACKs pass to
    /// the primary's kernel at once, and this is how the others learn what
    /// the client acknowledged.
    AckState(AckState),
    /// Every replica takes its checkpoint here, so they all snapshot the
    /// same state at the same index.
    Checkpoint,
    /// The primary's running digest of a connection's output up to
    /// `offset`: the divergence guard.
    OutputDigest(OutputDigest),
}

/// A captured client packet: the raw IP packet and how its TCP checksum is
/// to be treated ([`TcpChecksum`]), as the capture path decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSegment {
    pub packet: Vec<u8>,
    /// The TCP checksum must be checked (no device or stack did).
    pub verify_checksum: bool,
}

impl ClientSegment {
    /// The checksum rule for [`crate::packet::parse`].
    pub fn checksum(&self) -> TcpChecksum {
        if self.verify_checksum {
            TcpChecksum::Verify
        } else {
            TcpChecksum::Trusted
        }
    }
}

/// Our side of a connection's handshake, from the primary's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Established {
    pub conn: ConnKey,
    /// Our initial sequence number.
    pub isn: u32,
    /// The client's MSS (what a socket rebuilt for it needs).
    pub mss: u16,
    /// The window scale we offered, if any.
    pub wscale: Option<u8>,
    /// Whether we offered SACK.
    pub sack: bool,
    /// Whether we offered timestamps.
    pub timestamps: bool,
    /// The primary's TCP timestamp clock when the entry was proposed; a
    /// replica pairs it with the log's time at the entry, so a takeover
    /// can start its own clock ahead of anything the primary sent.
    pub ts_clock: u32,
}

/// Time for the service: the leader's clock, and entropy for its
/// randomness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// Service time, ms since the Unix epoch; never goes back when applied.
    pub time_ms: u64,
    pub entropy: u64,
}

/// The state a pure ACK conveys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckState {
    pub conn: ConnKey,
    /// The segment's sequence number: decides whether its window is
    /// believed (`snd_wl1`) and whether its timestamp is recent.
    pub seq: u32,
    pub ack: u32,
    /// As on the wire (unscaled).
    pub window: u16,
    pub timestamp: Option<Timestamp>,
}

/// A connection's running output digest at a chunk boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigest {
    pub conn: ConnKey,
    /// Bytes of output the digest covers.
    pub offset: u64,
    pub digest: [u8; 32],
}

impl ReplicaEntry {
    /// The entry as one frame, for the log.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(MAGIC, VERSION, self)
    }

    /// Decodes one frame; anything else is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<ReplicaEntry, WireError> {
        wire::decode(MAGIC, VERSION, bytes)
    }

    /// The connection the entry is about, if any.
    pub fn conn(&self) -> Option<ConnKey> {
        match self {
            ReplicaEntry::Established(e) => Some(e.conn),
            ReplicaEntry::Aborted { conn } => Some(*conn),
            ReplicaEntry::AckState(a) => Some(a.conn),
            ReplicaEntry::OutputDigest(d) => Some(d.conn),
            ReplicaEntry::Segment(_) | ReplicaEntry::Tick(_) | ReplicaEntry::Checkpoint => None,
        }
    }
}
