//! The baton node: moving live connections between nodes, and (next) the
//! daemon that runs services and answers the control API.

pub mod echo_host;
pub mod move_agent;
pub mod relocation;
