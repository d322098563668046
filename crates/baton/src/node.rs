//! `baton node` and `baton ctl`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use baton_core::service::{RestoreError, Service};
use baton_node::config::NodeConfig;
use baton_node::control::{self, ControlReply, ControlRequest};
use baton_node::runtime::{Registry, ServiceKind};
use clap::{Args, Subcommand};

use crate::services::{echo::Echo, kv::Kv};

/// Service kinds built into this binary.
pub const KINDS: &[&str] = &["kv", "echo"];

struct Kind<S>(std::marker::PhantomData<fn() -> S>);

impl<S: Service + Default> ServiceKind for Kind<S> {
    fn create(&self) -> Box<dyn Service> {
        Box::new(S::default())
    }

    fn restore(&self, checkpoint: &[u8]) -> Result<Box<dyn Service>, RestoreError> {
        Ok(Box::new(S::restore(checkpoint)?))
    }
}

/// The service kinds of [`KINDS`], by name.
pub fn registry() -> Registry {
    let mut r: Registry = Registry::new();
    r.insert("kv".into(), Arc::new(Kind::<Kv>(Default::default())));
    r.insert("echo".into(), Arc::new(Kind::<Echo>(Default::default())));
    r
}

#[derive(Args)]
pub struct NodeArgs {
    /// The node's configuration (TOML; see the README). It names the
    /// node's key files (`baton key` writes them); the node does not start
    /// if one is missing, unreadable, readable by others or malformed.
    #[arg(long)]
    config: PathBuf,
}

/// Runs the daemon until SIGTERM.
pub fn run_node(args: NodeArgs) -> Result<i32> {
    let cfg = NodeConfig::load(&args.config, KINDS)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(baton_node::daemon::run(cfg, registry()))?;
    Ok(0)
}

#[derive(Args)]
pub struct CtlArgs {
    /// The local node's configuration (its control socket is in state_dir).
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The local node's control socket, instead of --config.
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Nodes, services, where each runs and its connection count.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Moves a service, with its state and every connection, to a node;
    /// returns when the move is done and prints its freeze time.
    Move {
        service: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run_ctl(args: CtlArgs) -> Result<i32> {
    let socket = match (args.socket, args.config) {
        (Some(s), _) => s,
        (None, Some(c)) => NodeConfig::load(&c, KINDS)?.control_socket(),
        (None, None) => return Err(anyhow!("say which node: --config FILE or --socket PATH")),
    };
    let (request, json) = match &args.command {
        CtlCommand::Status { json } => (ControlRequest::Status, *json),
        CtlCommand::Move { service, to, json } => (
            ControlRequest::Move {
                service: service.clone(),
                to: to.clone(),
            },
            *json,
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = runtime
        .block_on(control::request(&socket, &request))
        .map_err(|e| anyhow!(e))?;
    match reply {
        ControlReply::Error { message } => Err(anyhow!(message)),
        ControlReply::Status(status) if json => {
            println!("{}", serde_json::to_string(&status)?);
            Ok(0)
        }
        ControlReply::Status(status) => {
            println!("nodes (asked {}):", status.node);
            for n in &status.nodes {
                println!(
                    "  {:<10} {:<24} {}",
                    n.name,
                    n.address,
                    if n.up { "up" } else { "DOWN" }
                );
            }
            println!("services:");
            for s in &status.services {
                println!(
                    "  {:<10} {:<6} {}:{:<20} on {:<10} {} connections{}",
                    s.name,
                    s.kind,
                    s.vip,
                    s.ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    s.running_on.as_deref().unwrap_or("-"),
                    s.connections,
                    if s.moving { " (moving)" } else { "" }
                );
                for l in &s.log {
                    println!(
                        "    on {:<10} {:<11} log {:<9} term {:<4} commit {:<8} applied {:<8} leader {}{}",
                        l.node,
                        l.status.role,
                        l.status.raft_role,
                        l.status.term,
                        l.status.commit_index,
                        l.status.applied_index,
                        l.status.leader.as_deref().unwrap_or("-"),
                        l.status
                            .state_digest
                            .as_deref()
                            .map(|d| format!(" state {}", &d[..d.len().min(16)]))
                            .unwrap_or_default(),
                    );
                    if let Some(t) = &l.status.last_takeover {
                        println!(
                            "      last takeover {} ms ago: clients held at most {} ms, {} connections rebuilt in {} ms, {} lost",
                            now_ms().saturating_sub(t.at_ms),
                            t.held_ms,
                            t.connections,
                            t.rebuild_ms,
                            t.lost
                        );
                    }
                    if let Some(n) = l.status.lease_lapses.filter(|n| *n > 0) {
                        println!("      stopped serving {n} times when its lease ended");
                    }
                }
            }
            if status.refused_peer_connections > 0 {
                println!(
                    "refused peer connections: {}",
                    status.refused_peer_connections
                );
            }
            for w in &status.warnings {
                println!("warning: {w}");
            }
            Ok(0)
        }
        ControlReply::Moved(m) if json => {
            println!("{}", serde_json::to_string(&m)?);
            Ok(0)
        }
        ControlReply::Moved(m) => {
            println!(
                "moved {} from {} to {}: {} connections, freeze {:.1} ms",
                m.service, m.from, m.to, m.connections, m.freeze_ms
            );
            Ok(0)
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
