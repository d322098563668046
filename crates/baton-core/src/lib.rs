//! The pure core of baton: no I/O, no clock, no randomness. Everything here
//! is a deterministic function of its inputs (time is passed in), so it is
//! tested with plain and property tests and behaves the same on every node.

pub mod lease;
pub mod log;
pub mod packet;
pub mod relocation;
pub mod replica;
pub mod service;
pub mod tcp;
pub mod tcp_state;
pub mod wire;
