//! A replicated service, sans-IO: committed log entries in, actions out.
//!
//! The data path, file by file:
//! - [`capture`]: the primary's decisions on captured client packets
//!   (drop, accept at once, or propose and accept once committed);
//! - [`entry`]: what the replicated log holds;
//! - [`apply`]: [`Replica`], which applies committed entries in log order on
//!   every node (primary included): per connection a
//!   [`crate::tcp::reassembly::Reassembler`] rebuilds the client's stream
//!   and the service (through [`crate::log::Applier`]) consumes it;
//! - [`output`]: each connection's output from the client's latest
//!   acknowledged byte on, with its running digest;
//! - [`digest`]: the hashes (output digests, [`Replica::state_digest`]);
//! - [`takeover`]: each open connection's TCP state computed from the log,
//!   for a new primary to rebuild its sockets.
//!
//! Output retention: a replica keeps each connection's output from the
//! client's latest acknowledged byte (the ACK numbers of committed segments
//! and ACK-state entries trim it). While the retained output is at the
//! connection's limit, `clamp(4 × the client's largest advertised window,
//! 256 KiB, 16 MiB)` ([`ReplicaConn::output_limit`]), the client's further
//! input is held back from the service (and the primary stops reading its
//! socket, so TCP throttles the client). The window comes from committed
//! entries only, so every replica pauses at the same entry. Output beyond
//! four times the limit (written without input from that connection), or
//! more than 32 MiB of held input, aborts the connection on every replica.
//!
//! The runtime (`baton-node`) performs the actions: the primary writes
//! output to its kernel sockets and reads from them only what the service
//! consumed; a clone performs none of the socket actions, it only keeps the
//! state a takeover needs.

pub mod apply;
pub mod capture;
pub mod digest;
pub mod entry;
pub mod output;
pub mod takeover;

#[cfg(test)]
mod tests;

pub use apply::{Replica, ReplicaConn, ReplicaCounters};
pub use capture::{Capture, CaptureCounters, PacketId, Proposal, Verdict};
pub use entry::{AckState, ClientSegment, Established, OutputDigest, ReplicaEntry, Tick};

use crate::packet::ConnKey;
use crate::service::{ConnId, RestoreError, TimerId};
use crate::wire::WireError;

/// Why a replica aborted a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The service wrote far past the connection's output limit while the
    /// client did not acknowledge it.
    OutputLimit,
    /// The client sent far more than the service could take.
    InputLimit,
}

/// What a replica asks its runtime to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A connection was established; the service knows it by `id`.
    Opened {
        conn: ConnKey,
        id: ConnId,
    },
    /// The service consumed these client bytes: the primary reads exactly
    /// as much from its socket (and may compare), so TCP flow control
    /// throttles a client that sends faster than the service applies.
    Consumed {
        conn: ConnKey,
        bytes: Vec<u8>,
    },
    /// Output for the client: the primary writes it to its socket.
    Write {
        conn: ConnKey,
        bytes: Vec<u8>,
    },
    /// After the output: FIN, and the socket closes.
    Close {
        conn: ConnKey,
    },
    /// After the output: FIN; the client may go on sending.
    ShutdownWrite {
        conn: ConnKey,
    },
    /// The replica gave up on the connection: the primary resets it.
    Abort {
        conn: ConnKey,
        reason: AbortReason,
    },
    /// The connection is over on every replica: drop what is kept for it.
    Forget {
        conn: ConnKey,
    },
    /// The service's timer: the leader proposes a tick once it is due.
    SetTimer {
        id: TimerId,
        at_ms: u64,
    },
    CancelTimer {
        id: TimerId,
    },
    /// A checkpoint marker was applied: take [`Replica::checkpoint`] now.
    CheckpointDue {
        index: u64,
    },
    /// The primary's output digest differs from ours: this replica has
    /// diverged and must be rebuilt from a checkpoint.
    DigestMismatch {
        conn: ConnKey,
        offset: u64,
    },
}

/// Why an entry or a checkpoint cannot be applied here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("log entry {got} out of order: expected {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("bad replica checkpoint: {0}")]
    Snapshot(#[from] WireError),
    #[error(transparent)]
    Service(#[from] RestoreError),
}
