//! A node that serves echo connections on a VIP and moves them: an
//! [`echo_host`](crate::echo_host) plus a move listener, on a thread of its
//! own inside the node's network namespace. Tests and
//! `baton bench move-conns` run one per lab node.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;

use baton_core::relocation::Vip;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::echo_host::{self, EchoHostHandle, Ledger};
use crate::relocation::{self, MoveConfig, MoveReport};

enum AgentCommand {
    MoveOut {
        target: SocketAddr,
        vip: Vip,
        reply: std_mpsc::Sender<Result<MoveReport, String>>,
    },
    Count(std_mpsc::Sender<usize>),
}

/// Handle to a running agent; dropping it stops the agent.
pub struct MoveAgent {
    commands: Option<mpsc::UnboundedSender<AgentCommand>>,
    thread: Option<JoinHandle<()>>,
    /// Where this agent's move listener listens.
    pub move_addr: SocketAddr,
    netns: PathBuf,
}

/// How to start an agent.
pub struct AgentConfig {
    /// The node's network namespace.
    pub netns: PathBuf,
    /// The node's own address (move listener).
    pub node_addr: IpAddr,
    pub move_port: u16,
    /// Port of the echo service (listening on every address).
    pub service_port: u16,
    pub moves: MoveConfig,
    /// Take and announce this VIP at start (the first owner).
    pub initial_vip: Option<Vip>,
}

impl MoveAgent {
    /// Starts the agent; returns once it listens (and holds the VIP, if
    /// asked), or with the reason it could not.
    pub fn start(cfg: AgentConfig, ledger: Arc<Ledger>) -> Result<MoveAgent, String> {
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let mut cfg = cfg;
        cfg.moves.local_addr.get_or_insert(cfg.node_addr);
        let (tx, rx) = mpsc::unbounded_channel();
        let move_addr = SocketAddr::new(cfg.node_addr, cfg.move_port);
        let netns = cfg.netns.clone();
        let thread = std::thread::Builder::new()
            .name("move-agent".into())
            .spawn(move || {
                if let Err(e) = baton_net::netns::enter(&cfg.netns) {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(run(cfg, ledger, rx, ready_tx));
            })
            .map_err(|e| e.to_string())?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(MoveAgent {
                commands: Some(tx),
                thread: Some(thread),
                move_addr,
                netns,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the agent thread ended before it was ready".into())
            }
        }
    }

    /// Moves the VIP and every connection of this agent to `target`'s move
    /// listener; waits until done. On failure this agent keeps serving.
    pub fn move_to(&self, target: SocketAddr, vip: &Vip) -> Result<MoveReport, String> {
        let (reply, rx) = std_mpsc::channel();
        self.commands
            .as_ref()
            .ok_or("agent stopped")?
            .send(AgentCommand::MoveOut {
                target,
                vip: vip.clone(),
                reply,
            })
            .map_err(|_| "agent stopped".to_string())?;
        rx.recv().map_err(|_| "agent stopped".to_string())?
    }

    /// Connections this agent serves now.
    pub fn connections(&self) -> usize {
        let (reply, rx) = std_mpsc::channel();
        let Some(commands) = &self.commands else {
            return 0;
        };
        if commands.send(AgentCommand::Count(reply)).is_err() {
            return 0;
        }
        rx.recv().unwrap_or(0)
    }

    /// The namespace the agent runs in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }
}

impl Drop for MoveAgent {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    cfg: AgentConfig,
    ledger: Arc<Ledger>,
    mut commands: mpsc::UnboundedReceiver<AgentCommand>,
    ready: std_mpsc::Sender<Result<(), String>>,
) {
    let setup = async {
        let service = TcpListener::bind(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            cfg.service_port,
        ))
        .await
        .map_err(|e| format!("echo listener on port {}: {e}", cfg.service_port))?;
        let moves = TcpListener::bind(SocketAddr::new(cfg.node_addr, cfg.move_port))
            .await
            .map_err(|e| format!("move listener on {}:{}: {e}", cfg.node_addr, cfg.move_port))?;
        if let Some(vip) = &cfg.initial_vip {
            baton_net::vip::take(&cfg.moves.spec(vip), cfg.moves.announce)
                .await
                .map_err(|e| format!("taking VIP {}: {e}", vip.addr))?;
        }
        Ok::<_, String>((service, moves))
    };
    let (service, moves) = match setup.await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let host: EchoHostHandle = echo_host::spawn(Some(service), ledger);
    let adopt_host = host.clone();
    let move_cfg = cfg.moves.clone();
    let listener_task = tokio::spawn(async move {
        let _ = relocation::serve_moves(move_cfg, moves, adopt_host).await;
    });
    let _ = ready.send(Ok(()));
    while let Some(command) = commands.recv().await {
        match command {
            AgentCommand::Count(reply) => {
                let _ = reply.send(host.count().await);
            }
            AgentCommand::MoveOut { target, vip, reply } => {
                let h = host.clone();
                let result = relocation::move_out(&cfg.moves, target, &vip, || async move {
                    Ok(relocation::Handoff {
                        service: Vec::new(),
                        conns: h.hand_off().await,
                    })
                })
                .await;
                let answer = match result {
                    Ok(report) => Ok(report),
                    Err(failure) => {
                        host.adopt(failure.kept.conns);
                        Err(failure.error.to_string())
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }
    listener_task.abort();
    // Leave nothing behind in the namespace: the VIP, if we hold it.
    if let Some(vip) = &cfg.initial_vip {
        let _ = baton_net::vip::release(&cfg.moves.spec(vip)).await;
    }
}
