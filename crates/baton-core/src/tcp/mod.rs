//! TCP as the log sees it: each connection's client byte stream rebuilt
//! from its committed segments, accepting exactly what the server's kernel
//! accepts.

pub mod reassembly;
