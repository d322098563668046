//! The programming model of a baton service.
//!
//! A service is a deterministic state machine driven by an ordered stream
//! of events: a connection opened (with the peer's address), bytes
//! received, the peer closed, a timer fired. It answers through a
//! [`Context`]: send bytes, close, shut down writing, ask for a timer. Time
//! and randomness come only from the context, which takes them from the
//! event being applied, never from the OS: so every node applying the same
//! events reaches the same state and writes the same bytes (the clones of
//! the next milestone rely on it). A service can write a checkpoint of its
//! whole state and be rebuilt from one.
//!
//! ```
//! use baton_core::service::{CloseReason, ConnId, Context, RestoreError, Service};
//! use std::net::SocketAddr;
//!
//! /// Counts the bytes each connection sent and answers with the total.
//! #[derive(Default)]
//! struct Counter { total: u64 }
//!
//! impl Service for Counter {
//!     fn on_open(&mut self, _ctx: &mut Context, _conn: ConnId, _peer: SocketAddr) {}
//!     fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
//!         self.total += data.len() as u64;
//!         ctx.send(conn, format!("{}\n", self.total).as_bytes());
//!     }
//!     fn on_close(&mut self, ctx: &mut Context, conn: ConnId, _reason: CloseReason) {
//!         ctx.close(conn);
//!     }
//!     fn checkpoint(&self) -> Vec<u8> { self.total.to_be_bytes().to_vec() }
//!     fn restore(bytes: &[u8]) -> Result<Self, RestoreError> {
//!         let raw: [u8; 8] = bytes.try_into().map_err(|_| RestoreError::new("need 8 bytes"))?;
//!         Ok(Counter { total: u64::from_be_bytes(raw) })
//!     }
//! }
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Identifies a connection to the service, the same on every node.
pub type ConnId = u64;

/// Identifies a timer the service asked for.
pub type TimerId = u64;

/// How the peer ended its side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloseReason {
    /// The peer sent FIN: it will send nothing more, but may still read.
    PeerFinished,
    /// The connection was reset or failed: nothing more can be sent.
    Reset,
}

/// What a service asks the runtime to do, in the order it asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    Send {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// Send what is queued, then FIN; further data from the peer is
    /// discarded.
    Close {
        conn: ConnId,
    },
    /// Send what is queued, then FIN; the peer may go on sending.
    ShutdownWrite {
        conn: ConnId,
    },
    /// Fire `on_timer(id)` once the log's time reaches `at_ms` (replaces a
    /// pending timer with the same id).
    SetTimer {
        id: TimerId,
        at_ms: u64,
    },
    CancelTimer {
        id: TimerId,
    },
}

/// The service's view of the event being applied, and its way to answer.
#[derive(Debug)]
pub struct Context {
    now_ms: u64,
    rng: SplitMix64,
    outputs: Vec<Output>,
}

impl Context {
    /// A context for one event: the time and the entropy the log assigned it.
    pub fn new(now_ms: u64, entropy: u64) -> Context {
        Context {
            now_ms,
            rng: SplitMix64(entropy),
            outputs: Vec::new(),
        }
    }

    /// The event's time (milliseconds since the Unix epoch), the same on
    /// every node.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Deterministic random numbers, seeded by the event.
    pub fn random_u64(&mut self) -> u64 {
        self.rng.next()
    }

    pub fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // Consecutive sends to one connection become one output.
        if let Some(Output::Send {
            conn: last,
            bytes: queued,
        }) = self.outputs.last_mut()
        {
            if *last == conn {
                queued.extend_from_slice(bytes);
                return;
            }
        }
        self.outputs.push(Output::Send {
            conn,
            bytes: bytes.to_vec(),
        });
    }

    pub fn close(&mut self, conn: ConnId) {
        self.outputs.push(Output::Close { conn });
    }

    pub fn shutdown_write(&mut self, conn: ConnId) {
        self.outputs.push(Output::ShutdownWrite { conn });
    }

    pub fn set_timer(&mut self, id: TimerId, at_ms: u64) {
        self.outputs.push(Output::SetTimer { id, at_ms });
    }

    pub fn cancel_timer(&mut self, id: TimerId) {
        self.outputs.push(Output::CancelTimer { id });
    }

    /// What the service asked for while handling the event.
    pub fn into_outputs(self) -> Vec<Output> {
        self.outputs
    }
}

/// A small, fast, well-mixed PRNG (SplitMix64): deterministic across
/// platforms, which is all a service needs from it.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A checkpoint that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot restore the service from its checkpoint: {0}")]
pub struct RestoreError(pub String);

impl RestoreError {
    pub fn new(why: impl Into<String>) -> RestoreError {
        RestoreError(why.into())
    }
}

/// A deterministic service: see the module documentation for the contract.
pub trait Service: Send + 'static {
    /// A client connected.
    fn on_open(&mut self, ctx: &mut Context, conn: ConnId, peer: SocketAddr);
    /// Bytes arrived on a connection, in order, exactly once.
    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]);
    /// The peer finished sending or the connection broke. After `Reset`
    /// the connection is gone; after `PeerFinished` the service may still
    /// send, and should close when done.
    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, reason: CloseReason);
    /// A timer the service set is due.
    fn on_timer(&mut self, _ctx: &mut Context, _timer: TimerId) {}
    /// The whole state, to rebuild the service elsewhere.
    fn checkpoint(&self) -> Vec<u8>;
    /// Rebuilds a service from [`Service::checkpoint`] output.
    fn restore(bytes: &[u8]) -> Result<Self, RestoreError>
    where
        Self: Sized;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randomness_comes_from_the_event() {
        let mut a = Context::new(5, 42);
        let mut b = Context::new(5, 42);
        let mut c = Context::new(5, 43);
        let xs: Vec<u64> = (0..4).map(|_| a.random_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.random_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.random_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn consecutive_sends_merge() {
        let mut ctx = Context::new(0, 0);
        ctx.send(1, b"ab");
        ctx.send(1, b"cd");
        ctx.send(2, b"x");
        ctx.send(1, b"");
        ctx.close(1);
        assert_eq!(
            ctx.into_outputs(),
            vec![
                Output::Send {
                    conn: 1,
                    bytes: b"abcd".to_vec()
                },
                Output::Send {
                    conn: 2,
                    bytes: b"x".to_vec()
                },
                Output::Close { conn: 1 },
            ]
        );
    }
}
