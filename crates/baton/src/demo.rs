//! `baton demo`: what a newcomer runs first.

use std::process::Stdio;

use anyhow::{bail, Result};
use baton_lab::Lab;
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {
    /// Name of the lab the demo builds (removed at the end).
    #[arg(long, default_value = "demo")]
    name: String,
}

pub fn run(args: DemoArgs) -> Result<i32> {
    let lab = Lab::create(&args.name, 3, 2)?;
    println!("lab {:?}: 3 nodes, 2 clients", lab.name());
    for host in lab.hosts() {
        println!("  {:<8} {:<14} {}", host.name, host.ipv4, host.ipv6);
    }
    let mut failures = 0;
    println!("every host pings every other host (IPv4 and IPv6):");
    for from in lab.hosts() {
        let mut line = format!("  {:<8}", from.name);
        for to in lab.hosts().iter().filter(|h| h.name != from.name) {
            for v6 in [false, true] {
                let ok = lab
                    .command(&from.name, "ping")?
                    .args(["-c1", "-W1", "-q", &to.addr(v6).to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?
                    .success();
                if !ok {
                    failures += 1;
                }
                line.push(if ok { '.' } else { 'X' });
            }
            line.push(' ');
        }
        println!("{line}");
    }
    lab.remove()?;
    println!("lab removed");
    if failures > 0 {
        bail!("{failures} pings failed");
    }
    Ok(0)
}
