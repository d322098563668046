//! Every Linux interface baton uses. All `unsafe` code and raw syscalls of
//! the project live in this crate; the others call its safe functions.

pub mod clock;
pub mod counters;
pub mod hold;
pub mod keeper;
pub mod limits;
pub mod listen;
pub mod netns;
pub mod nfqueue;
pub mod repair;
pub mod silence;
pub mod vip;

pub use limits::raise_fd_limit;
