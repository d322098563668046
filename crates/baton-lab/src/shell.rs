//! Running the external tools of the lab: `ip` (every operation), `nft`
//! (peer partitions) and `tcpdump` (sender watches).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::LabError;

/// Whether `program` is found on PATH.
pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn run_ip(args: &[&str]) -> Result<Vec<u8>, LabError> {
    let output = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            LabError::NoIpTool
        } else {
            LabError::Io(e)
        }
    })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(LabError::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// An error unless `tool` is on PATH; `package` is the Debian package that
/// has it. Checked where a tool is used, so that a lab without partitions
/// or watches needs only `ip`.
pub(crate) fn require(tool: &'static str, package: &'static str) -> Result<(), LabError> {
    if on_path(tool) {
        Ok(())
    } else {
        Err(LabError::NoTool { tool, package })
    }
}

/// Runs `nft -f -` inside namespace `netns`, with `script` on its stdin,
/// and returns its stdout. The script is applied atomically.
pub(crate) fn nft(netns: &str, args: &[&str], script: &str) -> Result<Vec<u8>, LabError> {
    require("nft", "nftables")?;
    let mut child = baton_net::netns::command_in(netns, "nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(LabError::Command {
            command: format!("nft {} (in {netns})", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

/// Runs `ip ARGS`, mapping a failure to its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), LabError> {
    run_ip(args).map(drop)
}

/// Runs `ip -j ARGS` and parses its JSON array.
pub(crate) fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>, LabError> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run_ip(&full)?;
    if out.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&out).map_err(|e| LabError::Command {
        command: format!("ip {}", full.join(" ")),
        detail: format!("unreadable JSON: {e}"),
    })
}
