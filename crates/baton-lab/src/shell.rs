//! Running `ip`, the one external tool the lab needs.

use std::process::Command;

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
