//! Sockets that may not send yet. A target makes the thawed sockets of a
//! move live while the source is still freezing the rest, so that going
//! live is off the clients' time; until the move commits, nothing those
//! sockets emit may reach a client (the source still owns the
//! connections). They carry [`SILENT_MARK`] (SO_MARK), and one standing
//! rule per namespace and family, in the raw table's OUTPUT chain, drops
//! every packet with that mark. Clearing a socket's mark lets it speak:
//! one setsockopt per connection, no iptables run at commit.
//!
//! The rule drops only what baton marked, so it may stay installed for the
//! namespace's life; [`ensure_rule`] adds it once.

use std::net::IpAddr;

use crate::hold::{iptables, tool_for, HoldError};

/// The mark of a socket that must stay silent ("batn").
pub const SILENT_MARK: u32 = 0x6261_746e;
/// The comment that names the standing rule.
pub const RULE_COMMENT: &str = "baton-silent-mark";

/// Installs the drop rule for marked packets of `family`'s address
/// family in the calling thread's namespace, unless it is there already.
pub fn ensure_rule(family: IpAddr) -> Result<(), HoldError> {
    crate::hold::ensure_not_root_netns()?;
    let tool = tool_for(family);
    let listing = iptables(
        tool,
        &["-w", "-t", "raw", "-S", "OUTPUT"].map(String::from),
        None,
    )?;
    if listing.lines().any(|l| l.contains(RULE_COMMENT)) {
        return Ok(());
    }
    let mark = format!("{SILENT_MARK:#x}");
    let rule = [
        "-w",
        "-t",
        "raw",
        "-I",
        "OUTPUT",
        "1",
        "-m",
        "mark",
        "--mark",
        &mark,
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "DROP",
    ]
    .map(String::from);
    iptables(tool, &rule, None).map(|_| ())
}
