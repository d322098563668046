//! The baton node: runs services from their event log, moves them with
//! their live connections between nodes, and answers the control API.

pub mod config;
pub mod control;
pub mod daemon;
pub mod echo_host;
pub mod move_agent;
pub mod peer;
pub mod raft;
pub mod relocation;
pub mod replicated;
pub mod runtime;
pub mod service_log;
