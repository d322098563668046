//! Running a service: capture, log, apply, output.
//!
//! Each connection has a task that reads its socket and writes the
//! service's output to it. What it reads becomes an event; the runtime gives
//! every event its place in the service's log (index, time, entropy), and
//! applies the log in order with [`Applier`]; the service's outputs go back
//! to the connection tasks. In this milestone the log is local and each
//! entry is committed as soon as it is appended; the replicated log of the
//! next milestone changes where committed entries come from
//! ([`ServiceRuntime::append`]), not how they are applied.
//!
//! A runtime can hand its service off for a move: connections are parked
//! (sockets back, output not yet written kept), the remaining events are
//! applied, and the service is checkpointed; [`ServiceRuntime::resume`]
//! rebuilds it on the target (or on the source after a failed move).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use baton_core::log::{Applier, Event, LogEntry};
use baton_core::service::{CloseReason, ConnId, Output, RestoreError, Service};
use baton_core::wire::{self, WireError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::relocation::{Handoff, Parked};

/// Largest output kept in user space per connection before the runtime
/// stops reading it (back-pressure on a client that does not read).
const MAX_PENDING: usize = 4 << 20;

/// A kind of service the node can run (`kv`, `echo`, or a user's own).
pub trait ServiceKind: Send + Sync + 'static {
    /// A new, empty service.
    fn create(&self) -> Box<dyn Service>;
    /// A service rebuilt from its checkpoint.
    fn restore(&self, checkpoint: &[u8]) -> Result<Box<dyn Service>, RestoreError>;
}

/// Service kinds by name.
pub type Registry = HashMap<String, Arc<dyn ServiceKind>>;

/// Frame magic of a service's hand-off state.
const STATE_MAGIC: [u8; 4] = *b"BTSV";
const STATE_VERSION: u16 = 1;
/// Frame magic of one connection's runtime state.
const CONN_MAGIC: [u8; 4] = *b"BTCN";
const CONN_VERSION: u16 = 1;

/// Everything of a service that moves besides its sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    /// The service's configured name (`kv`).
    pub name: String,
    /// Its kind, to find the code that restores it.
    pub kind: String,
    pub checkpoint: Vec<u8>,
    pub applier: Applier,
}

impl ServiceState {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(STATE_MAGIC, STATE_VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<ServiceState, WireError> {
        wire::decode(STATE_MAGIC, STATE_VERSION, bytes)
    }
}

/// A connection's runtime state that moves with its socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ConnState {
    /// Output the service produced that the socket has not taken yet.
    pending: Vec<u8>,
    /// The peer's FIN was read (and logged).
    peer_done: bool,
    /// Write side to be shut down once `pending` is written.
    shutdown_after: bool,
    /// Connection to be closed once `pending` is written.
    close_after: bool,
}

impl ConnState {
    fn encode(&self) -> Vec<u8> {
        wire::encode(CONN_MAGIC, CONN_VERSION, self)
    }

    fn decode(bytes: &[u8]) -> Result<ConnState, WireError> {
        if bytes.is_empty() {
            return Ok(ConnState::default());
        }
        wire::decode(CONN_MAGIC, CONN_VERSION, bytes)
    }
}

/// What a connection task tells the runtime.
enum Captured {
    Event(Event),
    /// The task ended on its own (closed, or failed after `Reset`).
    Gone(ConnId),
}

/// What the runtime tells a connection task.
enum ToConn {
    Data(Vec<u8>),
    Close,
    ShutdownWrite,
}

enum Command {
    HandOff(oneshot::Sender<Handoff>),
    Connections(oneshot::Sender<usize>),
}

/// Handle to a running service.
#[derive(Clone)]
pub struct ServiceRuntime {
    commands: mpsc::UnboundedSender<Command>,
}

/// Time for the log: milliseconds since the Unix epoch. The node reads the
/// clock; the service only ever sees the logged value.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ServiceRuntime {
    /// Starts serving: a new service of `kind`, accepting on `listeners`.
    pub fn start(
        name: String,
        kind_name: String,
        kind: Arc<dyn ServiceKind>,
        listeners: Vec<Arc<TcpListener>>,
    ) -> ServiceRuntime {
        let state = Running {
            name,
            kind: kind_name,
            service: kind.create(),
            applier: Applier::default(),
        };
        Self::spawn(state, listeners, Vec::new())
    }

    /// Decodes and restores a handed-off service without starting it: the
    /// check a target makes before accepting a move.
    pub fn prepare(
        registry: &Registry,
        state: &[u8],
    ) -> Result<(ServiceState, Box<dyn Service>), String> {
        let state = ServiceState::decode(state).map_err(|e| e.to_string())?;
        let kind = registry
            .get(&state.kind)
            .ok_or_else(|| format!("unknown service kind {:?}", state.kind))?;
        let service = kind.restore(&state.checkpoint).map_err(|e| e.to_string())?;
        Ok((state, service))
    }

    /// Serves a handed-off service again with its connections (on the target
    /// of a move, or on the source after a failed one).
    pub fn resume(
        state: ServiceState,
        service: Box<dyn Service>,
        listeners: Vec<Arc<TcpListener>>,
        conns: Vec<Parked>,
    ) -> ServiceRuntime {
        let running = Running {
            name: state.name,
            kind: state.kind,
            service,
            applier: state.applier,
        };
        Self::spawn(running, listeners, conns)
    }

    fn spawn(
        state: Running,
        listeners: Vec<Arc<TcpListener>>,
        conns: Vec<Parked>,
    ) -> ServiceRuntime {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(state, listeners, conns, rx));
        ServiceRuntime { commands: tx }
    }

    /// Stops the service and returns its state and connections for a move.
    /// The runtime task ends; resume it with [`ServiceRuntime::resume`].
    pub async fn hand_off(&self) -> Option<Handoff> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::HandOff(tx)).ok()?;
        rx.await.ok()
    }

    /// Connections open now.
    pub async fn connections(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Connections(tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Whether the runtime still runs (not handed off or stopped).
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }
}

/// The service and what applies the log to it.
struct Running {
    name: String,
    kind: String,
    service: Box<dyn Service>,
    applier: Applier,
}

struct ConnLink {
    to_conn: mpsc::UnboundedSender<ToConn>,
}

struct Loop {
    running: Running,
    conns: HashMap<ConnId, ConnLink>,
    tasks: JoinSet<Option<(ConnId, TcpStream, ConnState)>>,
    captured_tx: mpsc::UnboundedSender<Captured>,
    park_tx: watch::Sender<bool>,
    entropy: u64,
}

impl Loop {
    /// Appends an event to the log and applies it. The local log commits at
    /// once; this is where the replicated log will sit.
    fn append(&mut self, event: Event) -> Vec<Output> {
        self.entropy = self
            .entropy
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let entry = LogEntry {
            index: self.running.applier.next_index(),
            time_ms: now_ms(),
            entropy: self.entropy,
            event,
        };
        self.running
            .applier
            .apply(self.running.service.as_mut(), &entry)
            .expect("the runtime appends in order")
    }

    fn deliver(&mut self, outputs: Vec<Output>) {
        for out in outputs {
            let (conn, msg) = match out {
                Output::Send { conn, bytes } => (conn, ToConn::Data(bytes)),
                Output::Close { conn } => (conn, ToConn::Close),
                Output::ShutdownWrite { conn } => (conn, ToConn::ShutdownWrite),
                Output::SetTimer { .. } | Output::CancelTimer { .. } => continue,
            };
            if let Some(link) = self.conns.get(&conn) {
                let _ = link.to_conn.send(msg);
            }
        }
    }

    fn add_conn(&mut self, id: ConnId, stream: TcpStream, state: ConnState) {
        let (to_conn, from_runtime) = mpsc::unbounded_channel();
        self.conns.insert(id, ConnLink { to_conn });
        self.tasks.spawn(conn_task(
            id,
            stream,
            state,
            self.captured_tx.clone(),
            from_runtime,
            self.park_tx.subscribe(),
        ));
    }

    fn fire_timers(&mut self) {
        for id in self.running.applier.due_timers(now_ms()) {
            let outputs = self.append(Event::TimerFired { id });
            self.deliver(outputs);
        }
    }
}

/// Accepts from whichever of the service's listeners has a connection.
pub(crate) async fn accept_any(
    listeners: &[Arc<TcpListener>],
) -> std::io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for l in listeners {
            if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The peer as the service sees it: a dual-stack listener reports IPv4
/// clients as v4-mapped IPv6 addresses.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// The id of a connection, the same on every node: derived from the
/// client's address (unique per VIP and port at any time).
pub fn connection_id(peer: SocketAddr) -> ConnId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(canonical(peer).to_string().as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

async fn run(
    running: Running,
    listeners: Vec<Arc<TcpListener>>,
    parked: Vec<Parked>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (captured_tx, mut captured_rx) = mpsc::unbounded_channel();
    let (park_tx, _) = watch::channel(false);
    let mut lp = Loop {
        running,
        conns: HashMap::new(),
        tasks: JoinSet::new(),
        captured_tx,
        park_tx,
        entropy: now_ms() ^ u64::from(std::process::id()).rotate_left(32),
    };
    for p in parked {
        let state = match ConnState::decode(&p.app) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(id = p.id, error = %e, "bad connection state; dropping the connection");
                continue;
            }
        };
        match p
            .stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(p.stream))
        {
            Ok(stream) => lp.add_conn(p.id, stream, state),
            Err(e) => tracing::error!(id = p.id, error = %e, "cannot adopt a connection"),
        }
    }
    tracing::info!(service = %lp.running.name, connections = lp.conns.len(), "serving");
    loop {
        let next_timer = lp.running.applier.next_timer_at();
        let timer = async {
            match next_timer {
                Some(at) => {
                    let wait = at.saturating_sub(now_ms());
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accept_any(&listeners) => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let id = connection_id(peer);
                    lp.add_conn(id, stream, ConnState::default());
                    let outputs = lp.append(Event::Opened { conn: id, peer: canonical(peer) });
                    lp.deliver(outputs);
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            Some(captured) = captured_rx.recv() => match captured {
                Captured::Event(event) => {
                    let outputs = lp.append(event);
                    lp.deliver(outputs);
                }
                Captured::Gone(id) => { lp.conns.remove(&id); }
            },
            Some(_) = lp.tasks.join_next(), if !lp.tasks.is_empty() => {}
            () = timer => lp.fire_timers(),
            command = commands.recv() => match command {
                None => return,
                Some(Command::Connections(reply)) => { let _ = reply.send(lp.conns.len()); }
                Some(Command::HandOff(reply)) => {
                    let handoff = hand_off(&mut lp, &listeners, &mut captured_rx).await;
                    let _ = reply.send(handoff);
                    return;
                }
            },
        }
    }
}

/// Parks every connection, applies what they captured, checkpoints.
async fn hand_off(
    lp: &mut Loop,
    listeners: &[Arc<TcpListener>],
    captured_rx: &mut mpsc::UnboundedReceiver<Captured>,
) -> Handoff {
    // Connections the kernel completed but we did not accept yet move too.
    while let Ok(Ok((stream, peer))) =
        tokio::time::timeout(std::time::Duration::ZERO, accept_any(listeners)).await
    {
        let id = connection_id(peer);
        lp.add_conn(id, stream, ConnState::default());
        let outputs = lp.append(Event::Opened {
            conn: id,
            peer: canonical(peer),
        });
        lp.deliver(outputs);
    }
    let _ = lp.park_tx.send(true);
    let mut parked: HashMap<ConnId, (TcpStream, ConnState)> = HashMap::new();
    while let Some(done) = lp.tasks.join_next().await {
        if let Ok(Some((id, stream, state))) = done {
            parked.insert(id, (stream, state));
        }
    }
    // Events captured before the tasks stopped are still to be applied;
    // their output joins the parked connections' pending output.
    lp.conns.clear();
    while let Ok(captured) = captured_rx.try_recv() {
        let Captured::Event(event) = captured else {
            continue;
        };
        for out in lp.append(event) {
            match out {
                Output::Send { conn, bytes } => {
                    if let Some((_, s)) = parked.get_mut(&conn) {
                        s.pending.extend_from_slice(&bytes);
                    }
                }
                Output::Close { conn } => {
                    if let Some((_, s)) = parked.get_mut(&conn) {
                        s.close_after = true;
                    }
                }
                Output::ShutdownWrite { conn } => {
                    if let Some((_, s)) = parked.get_mut(&conn) {
                        s.shutdown_after = true;
                    }
                }
                Output::SetTimer { .. } | Output::CancelTimer { .. } => {}
            }
        }
    }
    let state = ServiceState {
        name: lp.running.name.clone(),
        kind: lp.running.kind.clone(),
        checkpoint: lp.running.service.checkpoint(),
        applier: lp.running.applier.clone(),
    };
    let conns = parked
        .into_iter()
        .filter_map(|(id, (stream, s))| {
            let stream = stream.into_std().ok()?;
            Some(Parked {
                id,
                stream,
                app: s.encode(),
            })
        })
        .collect();
    Handoff {
        service: state.encode(),
        conns,
    }
}

enum Step {
    Park,
    FromRuntime(Option<ToConn>),
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Reads one connection into events and writes the service's output to it,
/// until it ends (None) or is parked for a move.
async fn conn_task(
    id: ConnId,
    mut stream: TcpStream,
    mut state: ConnState,
    captured: mpsc::UnboundedSender<Captured>,
    mut from_runtime: mpsc::UnboundedReceiver<ToConn>,
    mut park: watch::Receiver<bool>,
) -> Option<(ConnId, TcpStream, ConnState)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut write_shut = false;
    let take = |state: &mut ConnState, msg: ToConn| match msg {
        ToConn::Data(bytes) => state.pending.extend_from_slice(&bytes),
        ToConn::Close => state.close_after = true,
        ToConn::ShutdownWrite => state.shutdown_after = true,
    };
    loop {
        if state.pending.is_empty() {
            if state.close_after {
                let _ = stream.shutdown().await;
                if !state.peer_done {
                    // The service closed it: its log still records the end,
                    // so the service can forget the connection.
                    let _ = captured.send(Captured::Event(Event::Closed {
                        conn: id,
                        reason: CloseReason::Reset,
                    }));
                }
                let _ = captured.send(Captured::Gone(id));
                return None;
            }
            if state.shutdown_after && !write_shut {
                let _ = stream.shutdown().await;
                write_shut = true;
            }
        }
        let reading = !state.peer_done && !state.close_after && state.pending.len() < MAX_PENDING;
        let step = {
            let (mut reader, mut writer) = stream.split();
            tokio::select! {
                biased;
                _ = park.changed() => Step::Park,
                msg = from_runtime.recv() => Step::FromRuntime(msg),
                written = writer.write(&state.pending), if !state.pending.is_empty() => Step::Wrote(written),
                read = reader.read(&mut buf), if reading => Step::Read(read),
            }
        };
        match step {
            Step::Park => {
                while let Ok(msg) = from_runtime.try_recv() {
                    take(&mut state, msg);
                }
                return Some((id, stream, state));
            }
            Step::FromRuntime(Some(msg)) => take(&mut state, msg),
            Step::FromRuntime(None) => return None,
            Step::Wrote(Ok(n)) => {
                state.pending.drain(..n);
            }
            Step::Read(Ok(0)) => {
                state.peer_done = true;
                let _ = captured.send(Captured::Event(Event::Closed {
                    conn: id,
                    reason: CloseReason::PeerFinished,
                }));
            }
            Step::Read(Ok(n)) => {
                let _ = captured.send(Captured::Event(Event::Data {
                    conn: id,
                    bytes: buf[..n].to_vec(),
                }));
            }
            Step::Wrote(Err(_)) | Step::Read(Err(_)) => {
                let _ = captured.send(Captured::Event(Event::Closed {
                    conn: id,
                    reason: CloseReason::Reset,
                }));
                let _ = captured.send(Captured::Gone(id));
                return None;
            }
        }
    }
}
