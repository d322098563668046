//! The services built into the `baton` binary.

// The node runtime that will host these services is not wired in yet:
// until it is, the binary uses only part of their API.
#![allow(dead_code)]

pub mod echo;
pub mod kv;
pub mod resp;
