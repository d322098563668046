//! `baton lab`: create, inspect, fault and remove virtual clusters.

use anyhow::Result;
use baton_lab::{Fault, Lab};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Creates a lab: a bridge and hosts node1..N, client1..M.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 1)]
        clients: u32,
    },
    /// Removes a lab and every process in it (safe to run twice).
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Lists the labs on this machine.
    List,
    /// Hosts, addresses, link state and processes of a lab.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        /// One JSON object (format in the README).
        #[arg(long)]
        json: bool,
    },
    /// Runs a command inside a host; its exit status is passed through.
    Exec {
        #[arg(long, default_value = "lab")]
        name: String,
        host: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Injects a link fault: isolate, partition (a node from the other
    /// nodes only), heal, link-down or link-up.
    Fault {
        #[arg(long, default_value = "lab")]
        name: String,
        host: String,
        fault: Fault,
    },
    /// Power loss: takes the host's link down, kills every process in it,
    /// and clears its TCP sockets and extra addresses (VIPs).
    Crash {
        #[arg(long, default_value = "lab")]
        name: String,
        host: String,
    },
}

pub fn run(args: LabArgs) -> Result<i32> {
    match args.command {
        LabCommand::Up {
            name,
            nodes,
            clients,
        } => {
            let lab = Lab::create(&name, nodes, clients)?;
            for host in lab.hosts() {
                println!("{:<10} {:<14} {}", host.name, host.ipv4, host.ipv6);
            }
            lab.keep();
        }
        LabCommand::Down { name } => baton_lab::down(&name)?,
        LabCommand::List => {
            baton_lab::check_requirements()?;
            for name in baton_lab::list()? {
                println!("{name}");
            }
        }
        LabCommand::Status { name, json } => {
            let status = Lab::open(&name)?.status()?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                println!("lab {}", status.name);
                for h in &status.hosts {
                    let opt = |a: Option<String>| a.unwrap_or_else(|| "-".into());
                    println!(
                        "  {:<10} {:<8} {:<14} {:<22} {}",
                        h.name,
                        h.link,
                        opt(h.ipv4.map(|a| a.to_string())),
                        opt(h.ipv6.map(|a| a.to_string())),
                        h.extra_addresses.join(" ")
                    );
                    for p in &h.processes {
                        println!("      pid {:<8} {}", p.pid, p.command);
                    }
                }
            }
        }
        LabCommand::Exec {
            name,
            host,
            command,
        } => {
            let status = Lab::open(&name)?.exec(&host, &command)?;
            return Ok(status.code().unwrap_or(128 + 9));
        }
        LabCommand::Fault { name, host, fault } => Lab::open(&name)?.fault(&host, fault)?,
        LabCommand::Crash { name, host } => Lab::open(&name)?.crash(&host)?,
    }
    Ok(0)
}
