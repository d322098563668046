//! The services built into the `baton` binary.

pub mod echo;
pub mod kv;
pub mod resp;
