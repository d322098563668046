//! `baton node`: runs the services this node owns, answers the control API
//! and its peers, and moves services with their connections on request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::relocation::{Vip, MAGIC as MOVE_MAGIC};
use baton_core::service::Service;
use baton_net::keeper::Keeper;
use baton_net::vip;
use tokio::net::{TcpListener, TcpStream, UnixListener};

use crate::config::{NodeConfig, ServiceConfig};
use crate::control::{
    self, ClusterStatus, ControlReply, ControlRequest, MoveSummary, NodeEntry, NodeLog, PeerReply,
    PeerRequest, ServiceEntry,
};
use crate::peer::{ControlStream, PeerAuth};
use crate::raft::transport::{self, Channel};
use crate::relocation::{self, MoveConfig, Parked, Taker};
use crate::replicated::{ReplicatedConfig, ReplicatedService, ServiceRole};
use crate::runtime::{Registry, ServiceRuntime, ServiceState};
use crate::service_log::{GroupView, LogStatus, ServiceLog};

/// Why the node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// One configured service, as this node holds it.
struct Slot {
    cfg: ServiceConfig,
    listeners: Vec<Arc<TcpListener>>,
    /// Set while this node serves it.
    runtime: Option<ServiceRuntime>,
    moving: bool,
    /// A replicated service's loop, once its log started.
    replicated: Option<Arc<ReplicatedService>>,
}

struct Node {
    cfg: NodeConfig,
    registry: Registry,
    moves: MoveConfig,
    auth: Arc<PeerAuth>,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Each service's replicated log, once started.
    logs: Mutex<BTreeMap<String, Arc<ServiceLog>>>,
    /// Holds the replicated services' client sockets, so that if this
    /// daemon dies they close without a word ([`baton_net::keeper`]).
    keeper: Option<Arc<Keeper>>,
}

impl Node {
    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, service: &str) -> Option<Arc<ServiceLog>> {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
    }
}

/// Open files a node asks for at start: room for tens of thousands of
/// client connections.
const FD_LIMIT: u64 = 65_536;

/// Runs the node until SIGTERM or SIGINT; then releases its VIPs and
/// removes its holds and control socket.
pub async fn run(cfg: NodeConfig, registry: Registry) -> Result<(), NodeError> {
    // Credentials first: a node with bad key files changes nothing.
    let auth = Arc::new(
        PeerAuth::load(&cfg.node, &cfg.interface, &cfg.peers, &cfg.auth)
            .await
            .map_err(|e| NodeError::Setup(e.to_string()))?,
    );
    if baton_net::netns::in_root_namespace().unwrap_or(true) {
        return Err(NodeError::Setup(
            "refusing to run in the machine's root network namespace in this milestone: run the node inside a lab host (`baton lab exec HOST -- baton node ...`)".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(io_err(format!("creating {}", cfg.state_dir.display())))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("securing {}", cfg.state_dir.display())))?;

    // Every client connection is a descriptor, and a move-in adds a
    // service's worth at once.
    match baton_net::raise_fd_limit(FD_LIMIT) {
        Ok(n) if n >= FD_LIMIT => tracing::debug!(open_files = n, "open-file limit"),
        Ok(n) => tracing::info!(
            open_files = n,
            wanted = FD_LIMIT,
            "open-file limit kept below what a node asks for by the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "raising the open-file limit"),
    }
    // What a crashed run may have left: hold rules, VIPs we do not own.
    if let Err(e) = baton_net::hold::sweep() {
        tracing::warn!(error = %e, "sweeping hold rules");
    }
    let mut moves = MoveConfig::new(cfg.interface.clone());
    moves.vrid = cfg.vrid;
    moves.announce = cfg.announce;
    moves.local_addr = Some(cfg.own_addr().ip());
    moves.auth = Some(auth.clone());
    let keeper = if cfg.services.iter().any(|s| s.replicated) {
        match start_keeper() {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                tracing::error!(error = %e, "no connection keeper: if this node dies, its kernel will close its clients' connections");
                None
            }
        }
    } else {
        None
    };
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        registry,
        moves,
        auth: auth.clone(),
        slots: Mutex::new(BTreeMap::new()),
        logs: Mutex::new(BTreeMap::new()),
        keeper,
    });

    for s in &cfg.services {
        let mut listeners = Vec::new();
        for port in &s.vip.ports {
            let what = format!("service {}: listening on {}:{port}", s.name, s.vip.addr);
            let l = baton_net::listen::listen_freebind(SocketAddr::new(s.vip.addr, *port), 1024)
                .and_then(TcpListener::from_std)
                .map_err(io_err(what))?;
            listeners.push(Arc::new(l));
        }
        let spec = node.moves.spec(&s.vip);
        if s.replicated {
            // The log's leader takes the VIP (see `start_logs`).
            if let Err(e) = vip::release(&spec).await {
                tracing::warn!(service = %s.name, error = %e, "removing a leftover VIP");
            }
            node.slots().insert(
                s.name.clone(),
                Slot {
                    cfg: s.clone(),
                    listeners,
                    runtime: None,
                    moving: false,
                    replicated: None,
                },
            );
            continue;
        }
        let elsewhere = if s.preferred_node == cfg.node {
            running_elsewhere(&cfg, &auth, &s.name).await
        } else {
            None
        };
        if let Some(other) = &elsewhere {
            tracing::info!(service = %s.name, node = %other, "already served elsewhere; not taking it");
        }
        let runtime = if s.preferred_node == cfg.node && elsewhere.is_none() {
            vip::take(&spec, node.moves.announce)
                .await
                .map_err(|e| NodeError::Setup(format!("service {}: taking VIP: {e}", s.name)))?;
            let kind = node.registry.get(&s.kind).ok_or_else(|| {
                NodeError::Setup(format!("service {}: unknown kind {}", s.name, s.kind))
            })?;
            Some(ServiceRuntime::start(
                s.name.clone(),
                s.kind.clone(),
                kind.clone(),
                listeners.clone(),
            ))
        } else {
            if let Err(e) = vip::release(&spec).await {
                tracing::warn!(service = %s.name, error = %e, "removing a leftover VIP");
            }
            None
        };
        node.slots().insert(
            s.name.clone(),
            Slot {
                cfg: s.clone(),
                listeners,
                runtime,
                moving: false,
                replicated: None,
            },
        );
    }

    let peers = TcpListener::bind(cfg.own_addr())
        .await
        .map_err(io_err(format!("listening for peers on {}", cfg.own_addr())))?;
    let socket_path = cfg.control_socket();
    let _ = std::fs::remove_file(&socket_path);
    let control = UnixListener::bind(&socket_path)
        .map_err(io_err(format!("control socket {}", socket_path.display())))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("securing {}", socket_path.display())))?;
    tracing::info!(node = %cfg.node, peers = %cfg.own_addr(), control = %socket_path.display(), "node up");
    // The logs once this node answers its peers: founding or joining asks
    // them, and they ask us.
    let starting_logs = tokio::spawn(start_logs(node.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("installing the SIGTERM handler"))?;
    loop {
        tokio::select! {
            accepted = peers.accept() => {
                if let Ok((stream, from)) = accepted {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_peer(node, stream, from).await {
                            tracing::warn!(%from, error = %e, "peer request");
                        }
                    });
                }
            }
            accepted = control.accept() => {
                if let Ok((stream, _)) = accepted {
                    let node = node.clone();
                    tokio::spawn(async move {
                        let (read, write) = stream.into_split();
                        let reply = match control::read_request(read).await {
                            Ok(req) => handle_control(&node, req).await,
                            Err(message) => ControlReply::Error { message },
                        };
                        let _ = control::write_reply(write, &reply).await;
                    });
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    starting_logs.abort();
    shutdown(&node).await;
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// NFQUEUE queue of the first service's capture (one per service from
/// there; the holds of moves use theirs from [`MoveConfig::queue_num`]).
const CAPTURE_QUEUE_BASE: u16 = 100;

/// Starts the keeper: this executable's hidden `keeper` subcommand, in
/// this namespace (it removes the VIPs here).
fn start_keeper() -> Result<Keeper, NodeError> {
    let exe = std::env::current_exe()
        .map_err(|e| NodeError::Setup(format!("finding this executable for the keeper: {e}")))?;
    Keeper::spawn(&exe, &[std::ffi::OsStr::new("keeper")])
        .map_err(|e| NodeError::Setup(format!("starting the connection keeper: {e}")))
}

/// Starts every service's log (see [`crate::service_log`]), and the
/// replicated services' loops on theirs.
async fn start_logs(node: Arc<Node>) {
    for (i, s) in node.cfg.services.iter().enumerate() {
        let (sink, events) = if s.replicated {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let log = match ServiceLog::start(&node.cfg, node.auth.clone(), &s.name, sink).await {
            Ok(log) => Arc::new(log),
            Err(e) => {
                tracing::error!(error = %e, "the service runs without its log");
                continue;
            }
        };
        node.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.name.clone(), log.clone());
        let Some(events) = events else {
            continue;
        };
        let Some(kind) = node.registry.get(&s.kind).cloned() else {
            tracing::error!(service = %s.name, kind = %s.kind, "unknown service kind");
            continue;
        };
        let listeners = match node.slots().get(&s.name) {
            Some(slot) => slot.listeners.clone(),
            None => continue,
        };
        let cfg = ReplicatedConfig {
            name: s.name.clone(),
            kind,
            vip: s.vip.clone(),
            spec: node.moves.spec(&s.vip),
            announce: node.moves.announce,
            node: node.cfg.node.clone(),
            preferred_node: s.preferred_node.clone(),
            queue_num: CAPTURE_QUEUE_BASE + i as u16,
            timestamp_margin: crate::replicated::timestamp_margin(node.cfg.election_timeout),
            keeper: node.keeper.clone(),
            lease_poll: node.cfg.raft_tick,
        };
        match ReplicatedService::start(cfg, listeners, log.group().clone(), events) {
            Ok(r) => {
                if let Some(slot) = node.slots().get_mut(&s.name) {
                    slot.replicated = Some(Arc::new(r));
                }
            }
            Err(e) => tracing::error!(error = %e, "the replicated service cannot start"),
        }
    }
}

/// The peer that serves `service` now, if any answers that it does: a node
/// that restarts must not take back a service that was moved away.
async fn running_elsewhere(cfg: &NodeConfig, auth: &PeerAuth, service: &str) -> Option<String> {
    for name in cfg.peers.keys() {
        if *name == cfg.node {
            continue;
        }
        if let Ok(PeerReply::Running(running)) =
            ask_peer(auth, name, &PeerRequest::Status, Duration::from_millis(500)).await
        {
            if running.iter().any(|(s, _, _)| s == service) {
                return Some(name.clone());
            }
        }
    }
    None
}

/// Stops serving: every VIP this node holds is released (its clients then
/// wait, as for a dead node, until the next milestone's failover).
async fn shutdown(node: &Node) {
    let held: Vec<Vip> = node
        .slots()
        .values()
        .filter(|s| s.runtime.is_some() || s.replicated.is_some())
        .map(|s| s.cfg.vip.clone())
        .collect();
    // The replicated loops stop first, so none takes a VIP back.
    for slot in node.slots().values_mut() {
        slot.replicated = None;
    }
    for v in held {
        if let Err(e) = vip::release(&node.moves.spec(&v)).await {
            tracing::warn!(vip = %v.addr, error = %e, "releasing a VIP at shutdown");
        }
    }
    // The logs' threads end with them (they join on drop: off the runtime).
    let logs = std::mem::take(&mut *node.logs.lock().unwrap_or_else(|e| e.into_inner()));
    let _ = tokio::task::spawn_blocking(move || drop(logs)).await;
    tracing::info!(node = %node.cfg.node, "node down");
}

/// A peer's connection: a move coming in, or a query. Nothing is read
/// from it before it authenticates as a node of `[peers]`.
async fn serve_peer(node: Arc<Node>, stream: TcpStream, from: SocketAddr) -> Result<(), String> {
    let Some((mut stream, peer)) = node.auth.accept(stream, from).await else {
        return Ok(()); // refused: counted and logged by the listener
    };
    let magic = tokio::time::timeout(Duration::from_secs(5), stream.peek(MOVE_MAGIC.len()))
        .await
        .map_err(|_| format!("{peer} sent nothing"))?
        .map_err(|e| format!("{peer}: {e}"))?;
    if magic.len() < MOVE_MAGIC.len() {
        return Ok(());
    }
    if Channel::of_magic(magic).is_some() {
        let mut stream = ControlStream::Authenticated(Box::new(stream));
        let (channel, hello) =
            tokio::time::timeout(Duration::from_secs(5), transport::read_hello(&mut stream))
                .await
                .map_err(|_| format!("{peer} sent no log hello"))?
                .map_err(|e| format!("{peer}: {e}"))?;
        let Some(log) = node.log(&hello.group) else {
            // Not started yet, or no such service: the peer retries.
            return Ok(());
        };
        return log
            .group()
            .hand_over(channel, hello, stream, Some(peer))
            .map_err(|e| e.to_string());
    }
    if magic == MOVE_MAGIC {
        let mut taker = NodeTaker { node: node.clone() };
        let Some(report) = relocation::accept_move(&node.moves, stream, &mut taker)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        tracing::info!(
            from = %peer,
            connections = report.connections,
            thaw_ms = report.thaw_sockets.as_secs_f64() * 1e3,
            "service moved in"
        );
        return Ok(());
    }
    let request: PeerRequest = control::read_peer(&mut stream).await?;
    let reply = match request {
        PeerRequest::Status => PeerReply::Running(running_here(&node).await),
        PeerRequest::Move { service, to } => match move_out(&node, &service, &to).await {
            Ok(summary) => PeerReply::Moved(summary),
            Err(e) => PeerReply::Error(e),
        },
        PeerRequest::LogMembers { service } => match node.log(&service) {
            Some(log) => PeerReply::Log(log.view().await),
            None => PeerReply::Log(GroupView::None),
        },
        PeerRequest::LogJoin { service, raft_id } => match node.log(&service) {
            Some(log) => match log.add_joiner(raft_id, &peer, &node.cfg).await {
                Ok(()) => PeerReply::Joined,
                Err(e) => PeerReply::Error(e),
            },
            None => PeerReply::Error(format!("no log of {service:?} here")),
        },
        PeerRequest::LogStatus => PeerReply::LogStatus(log_statuses(&node).await),
    };
    control::write_peer(&mut stream, &reply)
        .await
        .map_err(|e| e.to_string())
}

/// This node's view of every service's log, and its role in each.
async fn log_statuses(node: &Node) -> Vec<(String, LogStatus)> {
    let logs: Vec<(String, Arc<ServiceLog>)> = node
        .logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = Vec::new();
    for (name, log) in logs {
        let Some(mut s) = log.status().await else {
            continue;
        };
        let (replicated, running) = match node.slots().get(&name) {
            Some(slot) => (slot.replicated.clone(), slot.runtime.is_some()),
            None => (None, false),
        };
        match replicated {
            Some(r) => {
                if let Some(rs) = r.status().await {
                    s.role = role_name(rs.role).to_owned();
                    s.applied_index = rs.applied_index;
                    s.state_digest = rs.state_digest;
                    s.stream_mismatches = Some(rs.stream_mismatches);
                    s.malformed_dropped = Some(rs.malformed_dropped);
                    s.last_takeover = rs.last_takeover;
                    s.lease_lapses = Some(rs.lease_lapses);
                }
            }
            None => s.role = if running { "primary" } else { "standby" }.to_owned(),
        }
        out.push((name, s));
    }
    out
}

fn role_name(role: ServiceRole) -> &'static str {
    match role {
        ServiceRole::Primary => "primary",
        ServiceRole::Clone => "clone",
        ServiceRole::CatchingUp => "catching_up",
    }
}

/// Services this node runs: (name, connections, moving).
async fn running_here(node: &Node) -> Vec<(String, usize, bool)> {
    let running: Vec<(String, ServiceRuntime, bool)> = node
        .slots()
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.runtime.clone()?, s.moving)))
        .collect();
    let replicated: Vec<(String, Arc<ReplicatedService>)> = node
        .slots()
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.replicated.clone()?)))
        .collect();
    let mut out = Vec::new();
    for (name, rt, moving) in running {
        out.push((name, rt.connections().await, moving));
    }
    for (name, r) in replicated {
        if let Some(s) = r.status().await {
            if s.role == ServiceRole::Primary {
                out.push((name, s.connections, false));
            }
        }
    }
    out
}

/// Asks a peer something, with a short deadline (a dead peer must not
/// stall `baton ctl status`).
pub(crate) async fn ask_peer(
    auth: &PeerAuth,
    name: &str,
    req: &PeerRequest,
    deadline: Duration,
) -> Result<PeerReply, String> {
    let exchange = async {
        let mut stream = auth.connect(name, None).await.map_err(|e| e.to_string())?;
        control::write_peer(&mut stream, req)
            .await
            .map_err(|e| e.to_string())?;
        control::read_peer::<PeerReply, _>(&mut stream).await
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| format!("{name} did not answer in time"))?
}

async fn cluster_status(node: &Node) -> ClusterStatus {
    let mut nodes = Vec::new();
    let mut where_runs: BTreeMap<String, (String, usize, bool)> = BTreeMap::new();
    let mut logs: BTreeMap<String, Vec<NodeLog>> = BTreeMap::new();
    // Every peer is asked at once: a dead one costs one deadline, not one
    // per peer and question.
    let asks = node.cfg.peers.keys().map(|name| async move {
        if *name == node.cfg.node {
            return (log_statuses(node).await, Ok(running_here(node).await));
        }
        let deadline = Duration::from_millis(800);
        let (logs, running) = tokio::join!(
            ask_peer(&node.auth, name, &PeerRequest::LogStatus, deadline),
            ask_peer(&node.auth, name, &PeerRequest::Status, deadline),
        );
        let logs = match logs {
            Ok(PeerReply::LogStatus(s)) => s,
            _ => Vec::new(),
        };
        let running = match running {
            Ok(PeerReply::Running(r)) => Ok(r),
            _ => Err(()),
        };
        (logs, running)
    });
    let answers = futures::future::join_all(asks).await;
    for ((name, addr), (statuses, running)) in node.cfg.peers.iter().zip(answers) {
        for (service, status) in statuses {
            logs.entry(service).or_default().push(NodeLog {
                node: name.clone(),
                status,
            });
        }
        nodes.push(NodeEntry {
            name: name.clone(),
            address: *addr,
            up: running.is_ok(),
        });
        for (service, conns, moving) in running.unwrap_or_default() {
            where_runs.insert(service, (name.clone(), conns, moving));
        }
    }
    let services = node
        .cfg
        .services
        .iter()
        .map(|s| {
            let found = where_runs.get(&s.name);
            ServiceEntry {
                name: s.name.clone(),
                kind: s.kind.clone(),
                vip: s.vip.addr.to_string(),
                ports: s.vip.ports.clone(),
                running_on: found.map(|f| f.0.clone()),
                connections: found.map_or(0, |f| f.1),
                moving: found.is_some_and(|f| f.2),
                log: logs.remove(&s.name).unwrap_or_default(),
            }
        })
        .collect();
    ClusterStatus {
        node: node.cfg.node.clone(),
        nodes,
        services,
        warnings: node.auth.warnings(),
        refused_peer_connections: node.auth.refusals.counters.total(),
    }
}

async fn handle_control(node: &Arc<Node>, req: ControlRequest) -> ControlReply {
    match req {
        ControlRequest::Status => ControlReply::Status(cluster_status(node).await),
        ControlRequest::Move { service, to } => {
            let result = async {
                if !node.cfg.services.iter().any(|s| s.name == service) {
                    return Err(format!(
                        "unknown service {service:?} (configured: {})",
                        node.cfg
                            .services
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if !node.cfg.peers.contains_key(&to) {
                    return Err(format!(
                        "unknown node {to:?} (nodes: {})",
                        node.cfg
                            .peers
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                let replicated = node
                    .slots()
                    .get(&service)
                    .and_then(|s| s.replicated.clone());
                let here = match &replicated {
                    Some(r) => r
                        .status()
                        .await
                        .is_some_and(|s| s.role == ServiceRole::Primary),
                    None => node
                        .slots()
                        .get(&service)
                        .is_some_and(|s| s.runtime.is_some() || s.moving),
                };
                if here {
                    return move_out(node, &service, &to).await;
                }
                let status = cluster_status(node).await;
                let Some(owner) = status
                    .services
                    .iter()
                    .find(|s| s.name == service)
                    .and_then(|s| s.running_on.clone())
                else {
                    return Err(format!("service {service:?} runs on no reachable node"));
                };
                if owner == to {
                    return Err(format!("service {service:?} already runs on {to}"));
                }
                match ask_peer(
                    &node.auth,
                    &owner,
                    &PeerRequest::Move {
                        service: service.clone(),
                        to,
                    },
                    Duration::from_secs(60),
                )
                .await?
                {
                    PeerReply::Moved(summary) => Ok(summary),
                    PeerReply::Error(e) => Err(e),
                    _ => Err(format!("{owner} answered a move with something else")),
                }
            }
            .await;
            match result {
                Ok(summary) => ControlReply::Moved(summary),
                Err(message) => ControlReply::Error { message },
            }
        }
    }
}

/// Moves a service this node runs to node `to`, with its connections.
async fn move_out(node: &Arc<Node>, service: &str, to: &str) -> Result<MoveSummary, String> {
    if to == node.cfg.node {
        return Err(format!("service {service:?} already runs on {to}"));
    }
    let target = *node
        .cfg
        .peers
        .get(to)
        .ok_or_else(|| format!("unknown node {to:?}"))?;
    let replicated = node.slots().get(service).and_then(|s| s.replicated.clone());
    if let Some(r) = replicated {
        // The clone there is current: the lead passes, and the new primary
        // rebuilds the connections from the log, as after a failure.
        let handed = r.hand_over(to).await?;
        tracing::info!(
            service,
            to,
            connections = handed.connections,
            paused_ms = handed.paused.as_secs_f64() * 1e3,
            "primary handed over"
        );
        return Ok(MoveSummary {
            service: service.to_owned(),
            from: node.cfg.node.clone(),
            to: to.to_owned(),
            connections: handed.connections,
            freeze_ms: handed.paused.as_secs_f64() * 1e3,
        });
    }
    let (runtime, vip, listeners) = {
        let mut slots = node.slots();
        let slot = slots
            .get_mut(service)
            .ok_or_else(|| format!("unknown service {service:?}"))?;
        if slot.moving {
            return Err(format!("a move of {service:?} is already under way"));
        }
        let runtime = slot
            .runtime
            .clone()
            .ok_or_else(|| format!("service {service:?} does not run on {}", node.cfg.node))?;
        slot.moving = true;
        (runtime, slot.cfg.vip.clone(), slot.listeners.clone())
    };
    let hand_off_rt = runtime.clone();
    let result = relocation::move_out(&node.moves, target, &vip, || async move {
        hand_off_rt
            .hand_off()
            .await
            .ok_or_else(|| "the service's runtime is gone".to_string())
    })
    .await;
    let mut slots = node.slots();
    let slot = slots.get_mut(service).expect("configured services stay");
    slot.moving = false;
    match result {
        Ok(report) => {
            slot.runtime = None;
            tracing::info!(
                service,
                to,
                connections = report.connections,
                freeze_ms = report.freeze.as_secs_f64() * 1e3,
                "service moved out"
            );
            Ok(MoveSummary {
                service: service.to_owned(),
                from: node.cfg.node.clone(),
                to: to.to_owned(),
                connections: report.connections,
                freeze_ms: report.freeze.as_secs_f64() * 1e3,
            })
        }
        Err(failure) => {
            // The service goes on here: untouched if the move failed before
            // it was handed off, otherwise rebuilt from what it handed off.
            if !runtime.is_running() {
                match ServiceRuntime::prepare(&node.registry, &failure.kept.service) {
                    Ok((state, restored)) => {
                        slot.runtime = Some(ServiceRuntime::resume(
                            state,
                            restored,
                            listeners,
                            failure.kept.conns,
                        ));
                    }
                    Err(e) => {
                        slot.runtime = None;
                        tracing::error!(service, error = %e, "cannot resume the service after a failed move");
                    }
                }
            }
            let why = failure.error.to_string();
            Err(
                if why.contains("refused") && why.contains("control connection") {
                    format!("target {to} is down or unreachable: {why}")
                } else {
                    format!(
                        "move of {service:?} to {to} failed, it keeps running on {}: {why}",
                        node.cfg.node
                    )
                },
            )
        }
    }
}

/// The node as the target of a move.
struct NodeTaker {
    node: Arc<Node>,
}

impl Taker for NodeTaker {
    type Prepared = (ServiceState, Box<dyn Service>);

    fn prepare(&mut self, vip: &Vip, service: &[u8]) -> Result<Self::Prepared, String> {
        let (state, restored) = ServiceRuntime::prepare(&self.node.registry, service)?;
        let mut slots = self.node.slots();
        let slot = slots.get_mut(&state.name).ok_or_else(|| {
            format!(
                "service {:?} is not configured on {}",
                state.name, self.node.cfg.node
            )
        })?;
        if slot.runtime.is_some() {
            return Err(format!(
                "service {:?} already runs on {}",
                state.name, self.node.cfg.node
            ));
        }
        if slot.cfg.vip.addr != vip.addr || slot.cfg.kind != state.kind {
            return Err(format!(
                "service {:?} has another VIP or kind here: check both nodes' configuration",
                state.name
            ));
        }
        Ok((state, restored))
    }

    fn adopt(&mut self, (state, service): Self::Prepared, conns: Vec<Parked>) {
        let mut slots = self.node.slots();
        let Some(slot) = slots.get_mut(&state.name) else {
            return;
        };
        slot.runtime = Some(ServiceRuntime::resume(
            state,
            service,
            slot.listeners.clone(),
            conns,
        ));
    }
}
