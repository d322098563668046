//! A replicated service on this node: capture, log, apply.
//!
//! Every node of the service runs this loop, with the service's raft group
//! ([`crate::service_log`]). The decisions are baton-core's sans-IO
//! machines ([`baton_core::replica`]); the loop performs them:
//! - **capture** (primary only): the VIP's client segments reach an
//!   NFQUEUE queue before TCP ([`baton_net::hold::CaptureRules`], on every
//!   node, fail-closed). [`Capture`] drops malformed ones, lets pure ACKs
//!   pass at once (their state is logged, coalesced), and proposes the rest;
//!   a segment reaches the kernel only once its entry is committed, so
//!   nothing the client sent is acknowledged before a majority holds it;
//! - **log**: the primary proposes entries in batches
//!   ([`RaftGroup::submit`]): segments, each accepted connection's
//!   handshake ([`baton_net::repair::handshake`]), ticks (the service's
//!   time and entropy), checkpoint markers and output digests;
//! - **apply** (every node, primary included): committed entries, in log
//!   order, go to the [`Replica`], which drives the service. Its actions
//!   are socket work on the primary ([`conn`]); a clone keeps the state;
//! - **role**: the raft leader is the primary. It holds the VIP; losing
//!   leadership drops the VIP and closes its sockets without a word.
//!
//! - **takeover**: a new leader becomes primary once it applied the whole
//!   committed log (its own term's empty entry committed). It takes the
//!   VIP and rebuilds every open connection's socket with TCP_REPAIR from
//!   the state the log computes ([`baton_core::replica::takeover`]), so
//!   the clients of a primary that died carry on.

mod conn;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use baton_core::packet::{ConnKey, TcpChecksum};
use baton_core::relocation::Vip;
use baton_core::replica::{
    takeover, Action, Capture, PacketId, Proposal, Replica, ReplicaEntry, Tick, Verdict,
};
use baton_core::service::{CloseReason, ConnId, Context, RestoreError, Service, TimerId};
use baton_net::hold::CaptureRules;
use baton_net::keeper::Keeper;
use baton_net::nfqueue::{self, NfQueue, QueueConfig};
use baton_net::vip::{Announce, VipSpec};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::raft::{Event, ProposeError, Proposed, RaftGroup, Role};
use crate::runtime::{accept_any, ServiceKind};
use conn::{FromConn, ToConn};

/// How often the primary logs a tick when nothing else asks for one.
const TICK_EVERY: Duration = Duration::from_secs(1);
/// Longest a pure ACK's state waits before it is logged on its own; also
/// how often a primary reads the keeper's fence reports.
const ACK_FLUSH: Duration = Duration::from_millis(20);
/// A checkpoint marker at least this often (claim 11's default).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// ... and after this many bytes of entries.
pub const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Packets read from the queue before they are proposed together.
const CAPTURE_BATCH: usize = 256;
/// Committed entries applied before their verdicts are sent.
const EVENT_BATCH: usize = 256;

/// Least time between two state digests computed for `ctl status`.
pub const DIGEST_EVERY: Duration = Duration::from_secs(1);

/// A service's role on this node, as `ctl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceRole {
    /// Leads the log, holds the VIP, serves the clients.
    Primary,
    /// Applies the log; current, ready to take over.
    Clone,
    /// Not current yet: a learner still receiving the log, or a replica
    /// the divergence guard caught, waiting for a checkpoint.
    CatchingUp,
}

/// A replicated service as this node runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub role: ServiceRole,
    pub applied_index: u64,
    /// Hex SHA-256 of the state built from entries up to `applied_index`:
    /// equal on every node at equal index. Hashing the whole state is
    /// costly and runs on the service's own task, so it is computed at
    /// most once per [`DIGEST_EVERY`] while the index moves: None when the
    /// index moved since (a busy service), always there once idle.
    pub state_digest: Option<String>,
    pub connections: usize,
    /// Segments dropped as malformed by the capture path.
    pub malformed_dropped: u64,
    /// Packets whose verdict waits for their entry's commit.
    pub waiting_commit: usize,
    /// Bytes the kernel handed up that differ from the replica's.
    pub stream_mismatches: u64,
    pub last_takeover: Option<Takeover>,
    /// Times this node stopped serving as primary because its lease ended.
    pub lease_lapses: u64,
}

/// A takeover as primary, for `ctl status`: when, and how long clients
/// waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// When it completed, ms since the Unix epoch.
    pub at_ms: u64,
    /// From the previous primary's last logged time to the completion: an
    /// upper bound of how long its clients were held (less if they were
    /// idle before the failure).
    pub held_ms: u64,
    /// Taking the VIP and rebuilding the connections.
    pub rebuild_ms: u64,
    /// Connections rebuilt, and those that could not be.
    pub connections: u64,
    pub lost: u64,
}

/// Why a replicated service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatedError {
    #[error("service {service}: capture rules: {source}")]
    Capture {
        service: String,
        #[source]
        source: baton_net::hold::HoldError,
    },
    #[error("service {service}: capture queue: {source}")]
    Queue {
        service: String,
        #[source]
        source: nfqueue::NfqError,
    },
}

/// What the service loop is started with.
pub struct ReplicatedConfig {
    pub name: String,
    pub kind: Arc<dyn ServiceKind>,
    pub vip: Vip,
    pub spec: VipSpec,
    pub announce: Announce,
    /// This node's name, and the node that should lead when the service
    /// starts (a preference: it leads if it is up).
    pub node: String,
    pub preferred_node: String,
    /// NFQUEUE queue number of the capture.
    pub queue_num: u16,
    /// Added to the timestamp clock of rebuilt connections
    /// ([`timestamp_margin`]).
    pub timestamp_margin: Duration,
    /// Holds every client socket and the VIP, so that this daemon's death
    /// lets none of them speak.
    pub keeper: Option<Arc<Keeper>>,
    /// How often a leader waiting for its lease looks again (the raft
    /// tick).
    pub lease_poll: Duration,
}

/// Ids of the sockets handed to the keeper, unique in this process.
static NEXT_KEPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The keeper's group of each service's sockets and VIP (fenced together
/// when the service's lease ends), unique in this process.
static NEXT_KEEPER_GROUP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// A socket the keeper holds for as long as this lives.
pub(crate) struct Kept {
    keeper: Arc<Keeper>,
    id: u64,
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Err(e) = self.keeper.release(self.id) {
            tracing::warn!(error = %e, "the keeper did not take a release");
        }
    }
}

/// How far ahead of the dead primary's extrapolated TCP timestamp clock a
/// new primary starts its rebuilt connections. A timestamp below one the
/// client already saw would make it drop our segments (PAWS), one above
/// costs nothing. The old primary may have sent until its lease ran out
/// (under one election timeout) and detection takes up to two more; the
/// rest covers the offset of the nodes' clocks (the log's time is the old
/// primary's wall clock, the extrapolation uses ours).
pub fn timestamp_margin(election_timeout: Duration) -> Duration {
    3 * election_timeout + Duration::from_millis(100)
}

enum Command {
    Status(oneshot::Sender<ReplicaStatus>),
    HandOver(String, oneshot::Sender<Result<HandedOver, String>>),
}

/// A planned move of the primary to a clone.
#[derive(Debug, Clone, Copy)]
pub struct HandedOver {
    /// Connections the new primary takes over.
    pub connections: usize,
    /// From this node's last answer to the lead's arrival there.
    pub paused: Duration,
}

/// Handle to a replicated service's loop on this node.
pub struct ReplicatedService {
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplicatedService {
    /// Installs the capture and starts the loop, fed by the group's
    /// `events`.
    pub fn start(
        cfg: ReplicatedConfig,
        listeners: Vec<Arc<TcpListener>>,
        group: Arc<RaftGroup>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<ReplicatedService, ReplicatedError> {
        let ports: &[u16] = &cfg.vip.ports;
        let rules =
            CaptureRules::install(cfg.vip.addr, ports, cfg.queue_num).map_err(|source| {
                ReplicatedError::Capture {
                    service: cfg.name.clone(),
                    source,
                }
            })?;
        let queue_err = |source| ReplicatedError::Queue {
            service: cfg.name.clone(),
            source,
        };
        let queue = NfQueue::open_with(cfg.queue_num, &QueueConfig::default())
            .and_then(NfQueue::into_async)
            .map_err(queue_err)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let keeper_group = NEXT_KEEPER_GROUP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(keeper) = cfg.keeper.clone() {
            let service = cfg.name.clone();
            group.set_lease_sink(Box::new(move |until| {
                if let Err(e) = keeper.lease(keeper_group, until) {
                    tracing::warn!(service, error = %e, "the keeper did not take a lease");
                }
            }));
        }
        let replica = Replica::new(Hosted(cfg.kind.create()));
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        let (answer_tx, answer_rx) = mpsc::unbounded_channel();
        let lp = Loop {
            cfg,
            group,
            replica,
            capture: Capture::new(),
            leader: false,
            term: 0,
            whole_log_term: 0,
            primary: false,
            accepted: HashMap::new(),
            vip_guard: None,
            conns: HashMap::new(),
            conn_tasks: HashMap::new(),
            vanishing: Vec::new(),
            keeper_group,
            keeper_fences: 0,
            keeper_fenced: false,
            retake_after: 0,
            conn_tx,
            answer_tx,
            entropy: seed(),
            last_tick_ms: 0,
            since_checkpoint: 0,
            last_checkpoint: tokio::time::Instant::now(),
            digests_sent: HashMap::new(),
            stream_mismatches: 0,
            last_takeover: None,
            lease_lapses: 0,
            digest_cache: None,
            _rules: rules,
        };
        let task = tokio::spawn(lp.run(listeners, queue, events, command_rx, conn_rx, answer_rx));
        Ok(ReplicatedService { commands, task })
    }

    /// Hands the primary's role, and with it every connection, to the
    /// clone on node `to` (a planned move).
    pub async fn hand_over(&self, to: &str) -> Result<HandedOver, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::HandOver(to.to_owned(), tx))
            .map_err(|_| "the service's loop is gone".to_owned())?;
        rx.await
            .map_err(|_| "the service's loop is gone".to_owned())?
    }

    /// The service as this node runs it, or None once the loop ended.
    pub async fn status(&self) -> Option<ReplicaStatus> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Status(tx)).ok()?;
        rx.await.ok()
    }
}

impl Drop for ReplicatedService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A service of any kind, for the replica: checkpoints are restored
/// through the kind ([`Replica::restore_with`]), never through the type.
struct Hosted(Box<dyn Service>);

impl Service for Hosted {
    fn on_open(&mut self, ctx: &mut Context, conn: ConnId, peer: SocketAddr) {
        self.0.on_open(ctx, conn, peer)
    }
    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
        self.0.on_data(ctx, conn, data)
    }
    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, reason: CloseReason) {
        self.0.on_close(ctx, conn, reason)
    }
    fn on_timer(&mut self, ctx: &mut Context, timer: TimerId) {
        self.0.on_timer(ctx, timer)
    }
    fn checkpoint(&self) -> Vec<u8> {
        self.0.checkpoint()
    }
    fn restore(_: &[u8]) -> Result<Self, RestoreError> {
        Err(RestoreError::new(
            "a hosted service is restored through its kind",
        ))
    }
}

/// Entropy for the ticks: the leader's, logged, so every replica draws
/// the same.
fn seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return now_ms() ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(b)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Addresses as packets carry them: no v4-mapped IPv6, no flow label or
/// scope.
fn plain(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A connection's socket rebuilt from its state, live, for the runtime.
fn rebuild(state: &baton_core::tcp_state::TcpConnState) -> Result<TcpStream, TakeoverError> {
    let stream = baton_net::repair::thaw(state)?;
    stream
        .set_nonblocking(true)
        .map_err(TakeoverError::Register)?;
    TcpStream::from_std(stream).map_err(TakeoverError::Register)
}

/// Why a connection could not be rebuilt at takeover.
#[derive(Debug, thiserror::Error)]
enum TakeoverError {
    #[error(transparent)]
    Repair(#[from] baton_net::repair::RepairError),
    #[error("registering the rebuilt socket: {0}")]
    Register(std::io::Error),
}

/// Answers of the log to one batch of proposals.
struct Answers {
    packet_ids: Vec<Vec<PacketId>>,
    results: Vec<Result<Proposed, ProposeError>>,
}

struct Loop {
    cfg: ReplicatedConfig,
    group: Arc<RaftGroup>,
    replica: Replica<Hosted>,
    capture: Capture,
    /// raft says this node leads, in `term`.
    leader: bool,
    term: u64,
    /// Term of the newest leader's empty entry applied: when it is ours,
    /// this node has applied the whole committed log.
    whole_log_term: u64,
    /// This node leads and holds the VIP.
    primary: bool,
    /// Accepted sockets whose established entry is not applied yet.
    accepted: HashMap<ConnKey, (TcpStream, Option<Kept>)>,
    /// The VIP, as the keeper guards it (interface carrying it).
    vip_guard: Option<String>,
    /// Open connections' socket tasks (primary only).
    conns: HashMap<ConnKey, mpsc::UnboundedSender<ToConn>>,
    conn_tasks: HashMap<ConnKey, tokio::task::JoinHandle<()>>,
    /// Tasks told to close their sockets silently when this node stopped
    /// serving: a new takeover waits for them, as it rebuilds the same
    /// connections.
    vanishing: Vec<tokio::task::JoinHandle<()>>,
    /// This service's group in the keeper, and its fences seen so far.
    keeper_group: u32,
    keeper_fences: u64,
    /// The keeper fenced this primary's sockets: it must stop serving.
    keeper_fenced: bool,
    /// After a lease lapse while still leading: the last index proposed
    /// then. This node serves again only once it applied that far, as a
    /// new leader does (its proposals may commit after the lapse).
    retake_after: u64,
    conn_tx: mpsc::UnboundedSender<FromConn>,
    answer_tx: mpsc::UnboundedSender<Answers>,
    entropy: u64,
    last_tick_ms: u64,
    since_checkpoint: u64,
    last_checkpoint: tokio::time::Instant,
    /// Output offset of the last digest proposed per connection.
    digests_sent: HashMap<ConnKey, u64>,
    stream_mismatches: u64,
    last_takeover: Option<Takeover>,
    lease_lapses: u64,
    /// The last state digest computed: index, hex digest, when.
    digest_cache: Option<(u64, String, tokio::time::Instant)>,
    _rules: CaptureRules,
}

impl Loop {
    async fn run(
        mut self,
        listeners: Vec<Arc<TcpListener>>,
        mut queue: AsyncFd<NfQueue>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut from_conns: mpsc::UnboundedReceiver<FromConn>,
        mut answers: mpsc::UnboundedReceiver<Answers>,
    ) {
        let mut packets = Vec::new();
        let mut tick = tokio::time::interval(TICK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_flush = tokio::time::interval(ACK_FLUSH);
        ack_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let serving = self.primary;
            let lease_wake = self.lease_wake();
            let timer_at = self.replica.next_timer_at();
            let timer = async {
                match timer_at {
                    Some(at) if serving => {
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                event = events.recv() => match event {
                    Some(event) => {
                        // What committed together is applied together, and
                        // its packets get their verdicts in one send.
                        let mut next = Some(event);
                        let mut applied = 0;
                        while let Some(event) = next.take() {
                            if !self.on_event(event, queue.get_mut()).await {
                                return;
                            }
                            applied += 1;
                            if applied < EVENT_BATCH {
                                next = events.try_recv().ok();
                            }
                        }
                        self.flush_verdicts(queue.get_mut());
                    }
                    None => return,
                },
                Some(a) = answers.recv() => {
                    self.on_answers(a);
                    self.flush_verdicts(queue.get_mut());
                }
                ready = queue.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    loop {
                        match guard.get_inner_mut().recv_batch(&mut packets) {
                            Ok(0) => {
                                guard.clear_ready();
                                break;
                            }
                            Ok(_) if packets.len() >= CAPTURE_BATCH => break,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(service = %self.cfg.name, error = %e, "reading the capture queue");
                                guard.clear_ready();
                                break;
                            }
                        }
                    }
                    self.on_packets(&mut packets);
                    self.propose(false);
                    self.flush_verdicts(queue.get_mut());
                }
                accepted = accept_any(&listeners), if serving => match accepted {
                    Ok((stream, _)) => self.on_accepted(stream),
                    Err(e) => tracing::warn!(service = %self.cfg.name, error = %e, "accept failed"),
                },
                Some(msg) = from_conns.recv() => self.on_conn(msg),
                command = commands.recv() => match command {
                    Some(Command::Status(reply)) => {
                        let learner = match self.group.status().await {
                            Some(s) => s.membership.learners.contains_key(&s.id),
                            None => true,
                        };
                        let status = self.status(learner);
                        let _ = reply.send(status);
                    }
                    Some(Command::HandOver(to, reply)) => {
                        let result = self.hand_over(&to, queue.get_mut()).await;
                        let _ = reply.send(result);
                    }
                    None => return,
                },
                () = timer => self.propose_tick(true),
                () = lease_wake => self.check_lease(queue.get_mut()).await,
                _ = tick.tick(), if serving => {
                    self.hand_to_preferred(queue.get_mut()).await;
                    self.propose_tick(true);
                    self.propose_digests();
                    if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY && self.since_checkpoint > 0 {
                        self.propose_checkpoint();
                    }
                }
                _ = ack_flush.tick(), if serving => {
                    self.propose(true);
                    self.check_lease(queue.get_mut()).await;
                }
            }
        }
    }

    /// One event of the group, in log order. False once the group stopped.
    async fn on_event(&mut self, event: Event, queue: &mut NfQueue) -> bool {
        match event {
            Event::Committed(c) => {
                let result = match ReplicaEntry::decode(&c.data) {
                    Ok(entry) => self.replica.handle_committed(c.index, &entry),
                    Err(e) => {
                        tracing::error!(service = %self.cfg.name, index = c.index, error = %e, "a committed entry is no replica entry; skipped");
                        self.replica.handle_skipped(c.index, true)
                    }
                };
                if let Err(e) = result {
                    tracing::error!(service = %self.cfg.name, error = %e, "applying the log");
                }
                self.perform().await;
                self.capture.handle_commit(c.index);
            }
            Event::Membership { index, .. } => {
                let _ = self.replica.handle_skipped(index, false);
                self.capture.handle_commit(index);
            }
            Event::LeaderEntry { index, term } => {
                let _ = self.replica.handle_skipped(index, false);
                self.capture.handle_commit(index);
                self.whole_log_term = term;
                self.maybe_take_over().await;
            }
            Event::Snapshot { index, data, .. } => self.on_snapshot(index, &data),
            Event::Leader(l) => {
                if l.is_me && !self.leader {
                    self.leader = true;
                    self.term = l.term;
                    self.on_elected().await;
                    self.maybe_take_over().await;
                } else if !l.is_me && self.leader {
                    self.leader = false;
                    self.on_deposed(queue).await;
                }
            }
            Event::SnapshotWanted { .. } => {
                let index = self.replica.applied_index();
                if let Err(e) = self.group.compact(index, self.replica.checkpoint()).await {
                    tracing::debug!(service = %self.cfg.name, error = %e, "compacting for a new member");
                }
            }
            Event::Stopped(e) => {
                tracing::error!(service = %self.cfg.name, error = %e, "the service's log stopped");
                self.on_deposed(queue).await;
                return false;
            }
        }
        true
    }

    fn on_snapshot(&mut self, index: u64, data: &[u8]) {
        if data.is_empty() {
            // A founding snapshot (nothing applied yet anywhere).
            let mut fresh = Replica::new(Hosted(self.cfg.kind.create()));
            let _ = fresh.handle_skipped(index, false);
            self.replica = fresh;
            return;
        }
        let kind = self.cfg.kind.clone();
        match Replica::restore_with(data, |b| kind.restore(b).map(Hosted)) {
            Ok(r) => {
                tracing::info!(service = %self.cfg.name, index, "caught up from a checkpoint");
                self.replica = r;
                // Sockets cannot follow a checkpoint: this node is no
                // primary while it catches up.
                self.accepted.clear();
            }
            Err(e) => {
                tracing::error!(service = %self.cfg.name, index, error = %e, "a checkpoint from the leader does not restore");
            }
        }
    }

    /// Elected: hands the lead to the preferred node at a start with
    /// nothing served yet; else this node takes over once it has applied
    /// the whole committed log ([`Loop::maybe_take_over`]).
    async fn on_elected(&mut self) {
        if self.cfg.preferred_node != self.cfg.node && self.replica.connections_opened() == 0 {
            if let Some(s) = self.group.status().await {
                let preferred = s
                    .membership
                    .voters
                    .iter()
                    .find(|(_, m)| m.name == self.cfg.preferred_node)
                    .map(|(id, _)| *id);
                if let Some(id) = preferred {
                    match self.group.transfer_leader(id).await {
                        Ok(()) => {
                            tracing::info!(service = %self.cfg.name, to = %self.cfg.preferred_node, "handed the lead to the preferred node");
                            self.leader = false;
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(service = %self.cfg.name, error = %e, "the preferred node did not take the lead")
                        }
                    }
                }
            }
            // A transfer that failed or raced: lead only if still leader.
            match self.group.status().await {
                Some(s) if s.role == Role::Leader => {}
                _ => self.leader = false,
            }
        }
    }

    /// Becomes primary once this node leads under a lease and has applied
    /// every entry committed before its term: every connection the log
    /// knows is then complete here.
    async fn maybe_take_over(&mut self) {
        if self.leader
            && !self.primary
            && self.whole_log_term == self.term
            && self.replica.applied_index() >= self.retake_after
            && self.group.lease_holds()
        {
            self.take_over().await;
        }
    }

    /// Whether this primary must stop: its lease ended, here or as the
    /// keeper saw it (the keeper then fenced its sockets).
    fn fenced(&mut self) -> bool {
        let fences = self
            .cfg
            .keeper
            .as_ref()
            .map_or(0, |k| k.fences(self.keeper_group));
        let by_keeper = fences != self.keeper_fences;
        self.keeper_fences = fences;
        self.keeper_fenced |= by_keeper;
        self.keeper_fenced || !self.group.lease_holds()
    }

    /// When to look at the lease next: at its end while primary; soon
    /// while a leader waits for one to take over; never otherwise.
    fn lease_wake(&self) -> impl std::future::Future<Output = ()> {
        let wait = if self.primary {
            self.group.lease_until().and_then(|until| {
                (until != baton_core::lease::UNBOUNDED).then(|| {
                    Duration::from_micros(until.saturating_sub(baton_net::clock::monotonic_us()))
                })
            })
        } else if self.leader && self.whole_log_term == self.term {
            Some(self.cfg.lease_poll)
        } else {
            None
        };
        async move {
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => std::future::pending().await,
            }
        }
    }

    /// A primary whose lease ended, or whose sockets the keeper fenced
    /// (the lease ended as the keeper saw it), stops serving: a majority
    /// may have elected another primary meanwhile. If it still leads, it
    /// serves again once a majority acknowledges it, rebuilding its
    /// connections from the log as after a failover.
    async fn check_lease(&mut self, queue: &mut NfQueue) {
        if self.primary {
            if self.fenced() {
                self.lease_lapses += 1;
                tracing::warn!(service = %self.cfg.name, lease_holds = self.group.lease_holds(), "the lease ended: no longer answering clients");
                self.on_deposed(queue).await;
                if let Some(s) = self.group.status().await {
                    self.retake_after = s.last_index;
                }
            }
        } else {
            self.maybe_take_over().await;
        }
    }

    /// Takes the VIP and rebuilds the open connections' sockets. Client
    /// packets wait in the capture queue meanwhile (the loop reads it only
    /// afterwards), and are proposed, committed and accepted as usual.
    async fn take_over(&mut self) {
        let started = tokio::time::Instant::now();
        // Fences reported until now were of the sockets given up before.
        let _ = self.fenced();
        self.keeper_fenced = false;
        // The sockets given up last time hold the connections' addresses
        // until their tasks closed them.
        let vanishing = std::mem::take(&mut self.vanishing);
        let closed = tokio::time::timeout(Duration::from_secs(1), async {
            for task in vanishing {
                let _ = task.await;
            }
        });
        if closed.await.is_err() {
            tracing::warn!(service = %self.cfg.name, "old sockets still open at a takeover");
        }
        let taken = match baton_net::vip::take_address(&self.cfg.spec).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(service = %self.cfg.name, error = %e, "taking the VIP as primary");
                return;
            }
        };
        if let Some(keeper) = &self.cfg.keeper {
            match keeper.guard_address(
                self.cfg.vip.addr,
                self.cfg.spec.prefix_len,
                &taken.ifname,
                self.keeper_group,
            ) {
                Ok(()) => self.vip_guard = Some(taken.ifname.clone()),
                Err(e) => {
                    tracing::warn!(service = %self.cfg.name, error = %e, "the keeper does not guard the VIP")
                }
            }
        }
        // The first announcement goes at once; the repeats do not hold up
        // the rebuild.
        let (service, how) = (self.cfg.name.clone(), self.cfg.announce);
        tokio::spawn(async move {
            if let Err(e) = baton_net::vip::announce(&taken, how).await {
                tracing::warn!(service, error = %e, "announcing the VIP");
            }
        });
        let now = now_ms();
        let margin = self.cfg.timestamp_margin.as_millis() as u64;
        let mut rebuilt = 0usize;
        let mut lost = Vec::new();
        let conns: Vec<_> = self
            .replica
            .connections()
            .filter_map(|(k, c)| {
                let state = takeover::conn_state(k, c, now, margin)?;
                Some((*k, state, c.fin_queued(), c.fully_closed()))
            })
            .collect();
        for (key, state, fin_queued, fully_closed) in conns {
            let stream = match rebuild(&state) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(service = %self.cfg.name, client = %key.client, error = %e, "rebuilding a connection");
                    lost.push(key);
                    continue;
                }
            };
            let kept = self.keep(&stream);
            let tx = self.spawn_conn(key, stream, kept);
            if fin_queued {
                let _ = tx.send(if fully_closed {
                    ToConn::Close
                } else {
                    ToConn::ShutdownWrite
                });
            }
            rebuilt += 1;
        }
        let done = now_ms();
        let took = Takeover {
            at_ms: done,
            held_ms: done.saturating_sub(self.replica.now_ms()),
            rebuild_ms: started.elapsed().as_millis() as u64,
            connections: rebuilt as u64,
            lost: lost.len() as u64,
        };
        tracing::info!(service = %self.cfg.name, vip = %self.cfg.vip.addr, rebuilt, lost = lost.len(), took_ms = took.rebuild_ms, held_ms = took.held_ms, "primary");
        if self.replica.connections_opened() > 0 {
            self.last_takeover = Some(took);
        }
        self.capture = Capture::new();
        self.capture.handle_commit(self.replica.applied_index());
        self.primary = true;
        self.last_checkpoint = tokio::time::Instant::now();
        // Rebuilds that failed because the lease ended meanwhile (the
        // keeper took the VIP away) lost nothing: the lease check stops
        // this primary, and the next takeover rebuilds them.
        if !lost.is_empty() && !self.fenced() {
            self.submit(
                lost.into_iter()
                    .map(|conn| Proposal {
                        packet_ids: Vec::new(),
                        entry: ReplicaEntry::Aborted { conn },
                    })
                    .collect(),
            );
        }
    }

    /// Starts a connection's socket task.
    fn spawn_conn(
        &mut self,
        conn: ConnKey,
        stream: TcpStream,
        kept: Option<Kept>,
    ) -> mpsc::UnboundedSender<ToConn> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.conns.insert(conn, tx.clone());
        let to_loop = self.conn_tx.clone();
        let task = tokio::spawn(async move {
            conn::run(conn, stream, rx, to_loop).await;
            // After the socket's own close: the keeper's copy goes last.
            drop(kept);
        });
        self.conn_tasks.insert(conn, task);
        tx
    }

    /// Hands the keeper a copy of a client socket.
    fn keep(&mut self, stream: &TcpStream) -> Option<Kept> {
        let keeper = self.cfg.keeper.as_ref()?;
        // One keeper holds every service's sockets: ids are node-wide.
        let id = NEXT_KEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match keeper.hold(id, self.keeper_group, stream.as_fd()) {
            Ok(()) => Some(Kept {
                keeper: keeper.clone(),
                id,
            }),
            Err(e) => {
                tracing::warn!(service = %self.cfg.name, error = %e, "the keeper does not hold a connection");
                None
            }
        }
    }

    /// `preferred_node` leads at start: while no connection was ever
    /// opened, a primary elsewhere hands it the lead once it is a voter
    /// (a node that starts late joins as a learner first), fencing itself
    /// first as any move does. Once clients are served the primary stays
    /// where it is: one move, not two.
    async fn hand_to_preferred(&mut self, queue: &mut NfQueue) {
        if self.cfg.preferred_node == self.cfg.node
            || self.replica.connections_opened() > 0
            || !self.accepted.is_empty()
        {
            return;
        }
        let preferred = self.cfg.preferred_node.clone();
        let is_voter = self
            .group
            .status()
            .await
            .is_some_and(|s| s.membership.voters.values().any(|m| m.name == preferred));
        if !is_voter {
            return;
        }
        match self.hand_over(&preferred, queue).await {
            Ok(_) => {
                tracing::info!(service = %self.cfg.name, to = %preferred, "handed the lead to the preferred node")
            }
            Err(e) => {
                tracing::debug!(service = %self.cfg.name, error = %e, "the preferred node did not take the lead")
            }
        }
    }

    /// A planned move: this primary goes silent first (its sockets closed
    /// without a word, the VIP released, the packets waiting for a commit
    /// dropped: their entries reach the new primary anyway), then passes
    /// the lead to `to`'s clone, which takes over as after a failure. The
    /// silence comes first because the lead's transfer does not wait for
    /// anyone's lease. If the lead does not pass, this node serves again,
    /// rebuilding its connections from the log.
    async fn hand_over(&mut self, to: &str, queue: &mut NfQueue) -> Result<HandedOver, String> {
        if !self.primary {
            return Err(format!("{} is not the service's primary", self.cfg.node));
        }
        if to == self.cfg.node {
            return Err(format!("the service's primary already is {to}"));
        }
        let status = self
            .group
            .status()
            .await
            .ok_or_else(|| "the service's log stopped".to_owned())?;
        let id = status
            .membership
            .voters
            .iter()
            .find(|(_, m)| m.name == to)
            .map(|(id, _)| *id)
            .ok_or_else(|| format!("{to} is no voter of the service's log"))?;
        let started = tokio::time::Instant::now();
        let connections = self.conns.len();
        self.on_deposed(queue).await;
        match self.group.transfer_leader(id).await {
            Ok(()) => {
                self.leader = false;
                Ok(HandedOver {
                    connections,
                    paused: started.elapsed(),
                })
            }
            Err(e) => {
                if matches!(self.group.status().await, Some(s) if s.role == Role::Leader) {
                    self.take_over().await;
                } else {
                    self.leader = false;
                }
                Err(format!("the lead did not pass to {to}: {e}"))
            }
        }
    }

    /// No longer leads: stops answering for the VIP at once.
    async fn on_deposed(&mut self, queue: &mut NfQueue) {
        self.capture.handle_lost_leadership();
        self.flush_verdicts(queue);
        if !std::mem::replace(&mut self.primary, false) {
            return;
        }
        for (_, tx) in self.conns.drain() {
            let _ = tx.send(ToConn::Vanish);
        }
        self.vanishing
            .extend(self.conn_tasks.drain().map(|(_, task)| task));
        for (_, (stream, kept)) in self.accepted.drain() {
            conn::vanish(stream);
            drop(kept);
        }
        if let Err(e) = baton_net::vip::release(&self.cfg.spec).await {
            tracing::warn!(service = %self.cfg.name, error = %e, "releasing the VIP");
        }
        if let (Some(keeper), Some(ifname)) = (&self.cfg.keeper, self.vip_guard.take()) {
            if let Err(e) = keeper.unguard_address(self.cfg.vip.addr, &ifname) {
                tracing::warn!(service = %self.cfg.name, error = %e, "the keeper did not take the VIP's release");
            }
        }
        tracing::info!(service = %self.cfg.name, "no longer primary");
    }

    fn on_packets(&mut self, packets: &mut Vec<nfqueue::Packet>) {
        let serving = self.primary;
        for p in packets.drain(..) {
            if !serving || p.truncated() {
                // Not ours to answer (or cut short): fail closed.
                self.capture.handle_refused(p.id);
                continue;
            }
            let checksum = TcpChecksum::from_skb_info(p.skb_info.0);
            self.capture.handle_captured(p.id, &p.payload, checksum);
        }
    }

    /// Sends the capture's verdicts; past the lease's end none accepts (a
    /// majority may follow another primary already).
    fn flush_verdicts(&mut self, queue: &mut NfQueue) {
        let verdicts = self.capture.poll_verdicts();
        if verdicts.is_empty() {
            return;
        }
        let may_accept = self.primary && self.group.lease_holds();
        let verdicts: Vec<(u32, nfqueue::Verdict)> = verdicts
            .into_iter()
            .map(|(id, v)| {
                (
                    id,
                    match v {
                        Verdict::Accept if may_accept => nfqueue::Verdict::Accept,
                        Verdict::Accept | Verdict::Drop => nfqueue::Verdict::Drop,
                    },
                )
            })
            .collect();
        if let Err(e) = queue.verdicts(&verdicts) {
            tracing::warn!(service = %self.cfg.name, error = %e, "sending verdicts");
        }
    }

    /// Proposes what the capture path has, behind a tick if time moved.
    fn propose(&mut self, flush_acks: bool) {
        if !self.primary {
            return;
        }
        let proposals = self.capture.poll_proposals(flush_acks);
        if proposals.is_empty() {
            return;
        }
        self.propose_tick(false);
        self.submit(proposals);
    }

    /// A tick, if the clock moved since the last (or `always`).
    fn propose_tick(&mut self, always: bool) {
        if !self.primary {
            return;
        }
        let now = now_ms();
        if !always && now <= self.last_tick_ms {
            return;
        }
        self.last_tick_ms = now;
        self.entropy = self
            .entropy
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.submit(vec![Proposal {
            packet_ids: Vec::new(),
            entry: ReplicaEntry::Tick(Tick {
                time_ms: now,
                entropy: self.entropy,
            }),
        }]);
    }

    fn propose_checkpoint(&mut self) {
        self.last_checkpoint = tokio::time::Instant::now();
        self.since_checkpoint = 0;
        self.submit(vec![Proposal {
            packet_ids: Vec::new(),
            entry: ReplicaEntry::Checkpoint,
        }]);
    }

    /// The divergence guard: the primary's output digest of each
    /// connection that wrote since the last one.
    fn propose_digests(&mut self) {
        let mut out = Vec::new();
        for key in self.conns.keys() {
            let Some(d) = self.replica.output_digest(key) else {
                continue;
            };
            let last = self.digests_sent.entry(*key).or_insert(0);
            if d.offset > *last {
                *last = d.offset;
                out.push(Proposal {
                    packet_ids: Vec::new(),
                    entry: ReplicaEntry::OutputDigest(d),
                });
            }
        }
        self.digests_sent.retain(|k, _| self.conns.contains_key(k));
        if !out.is_empty() {
            self.submit(out);
        }
    }

    fn submit(&mut self, proposals: Vec<Proposal>) {
        let mut packet_ids = Vec::with_capacity(proposals.len());
        let mut entries = Vec::with_capacity(proposals.len());
        for p in proposals {
            let bytes = p.entry.encode();
            self.since_checkpoint += bytes.len() as u64;
            entries.push(bytes);
            packet_ids.push(p.packet_ids);
        }
        let rx = self.group.submit(entries);
        let tx = self.answer_tx.clone();
        tokio::spawn(async move {
            let results = rx.await.unwrap_or_default();
            let _ = tx.send(Answers {
                packet_ids,
                results,
            });
        });
        if self.since_checkpoint >= CHECKPOINT_BYTES {
            self.propose_checkpoint();
        }
    }

    fn on_answers(&mut self, a: Answers) {
        let mut results = a.results.into_iter();
        for ids in a.packet_ids {
            match results.next() {
                Some(Ok(p)) => self.capture.handle_proposed(&ids, p.index),
                Some(Err(e)) => {
                    tracing::debug!(service = %self.cfg.name, error = %e, "a proposal failed");
                    self.capture.handle_proposal_failed(&ids);
                }
                None => self.capture.handle_proposal_failed(&ids),
            }
        }
    }

    /// A connection the kernel completed: its handshake goes to the log,
    /// and the socket waits for the entry's commit.
    fn on_accepted(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
            return;
        };
        let conn = ConnKey {
            client: plain(peer),
            server: plain(local),
        };
        let established = match baton_net::repair::handshake(stream.as_fd(), conn) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(service = %self.cfg.name, client = %conn.client, error = %e, "reading an accepted connection's handshake; resetting it");
                let _ = baton_net::listen::reset_on_close(stream.as_fd());
                return;
            }
        };
        let kept = self.keep(&stream);
        self.accepted.insert(conn, (stream, kept));
        self.submit(vec![Proposal {
            packet_ids: Vec::new(),
            entry: ReplicaEntry::Established(established),
        }]);
    }

    fn on_conn(&mut self, msg: FromConn) {
        match msg {
            FromConn::Failed { conn, error } => {
                tracing::debug!(service = %self.cfg.name, client = %conn.client, error, "connection ended by the kernel");
                self.conns.remove(&conn);
                self.conn_tasks.remove(&conn);
                // A fenced socket fails too: that connection lives on in
                // the log, and the lease check stops this primary.
                if self.primary && !self.fenced() && self.replica.connection(&conn).is_some() {
                    self.submit(vec![Proposal {
                        packet_ids: Vec::new(),
                        entry: ReplicaEntry::Aborted { conn },
                    }]);
                }
            }
            FromConn::Mismatch { conn, offset } => {
                self.stream_mismatches += 1;
                tracing::error!(service = %self.cfg.name, client = %conn.client, offset, "the kernel's stream differs from the replica's");
            }
        }
    }

    /// Performs the replica's actions: socket work on the primary, the
    /// checkpoints everywhere.
    async fn perform(&mut self) {
        while let Some(action) = self.replica.poll_action() {
            let to = |conns: &HashMap<ConnKey, mpsc::UnboundedSender<ToConn>>,
                      conn: &ConnKey,
                      msg: ToConn| {
                if let Some(tx) = conns.get(conn) {
                    let _ = tx.send(msg);
                }
            };
            match action {
                Action::Opened { conn, .. } => {
                    if let Some((stream, kept)) = self.accepted.remove(&conn) {
                        self.spawn_conn(conn, stream, kept);
                    }
                }
                Action::Consumed { conn, bytes } => to(&self.conns, &conn, ToConn::Consumed(bytes)),
                Action::Write { conn, bytes } => to(&self.conns, &conn, ToConn::Write(bytes)),
                Action::Close { conn } => to(&self.conns, &conn, ToConn::Close),
                Action::ShutdownWrite { conn } => to(&self.conns, &conn, ToConn::ShutdownWrite),
                Action::Abort { conn, reason } => {
                    tracing::info!(service = %self.cfg.name, client = %conn.client, ?reason, "aborting a connection");
                    to(&self.conns, &conn, ToConn::Abort);
                }
                Action::Forget { conn } => {
                    self.conns.remove(&conn);
                    self.conn_tasks.remove(&conn);
                    self.accepted.remove(&conn);
                }
                Action::SetTimer { .. } | Action::CancelTimer { .. } => {}
                Action::CheckpointDue { index } => {
                    if let Err(e) = self.group.compact(index, self.replica.checkpoint()).await {
                        tracing::debug!(service = %self.cfg.name, index, error = %e, "checkpoint not taken");
                    }
                }
                Action::DigestMismatch { conn, offset } => {
                    tracing::error!(service = %self.cfg.name, client = %conn.client, offset, "this replica's output differs from the primary's: it is no longer current");
                }
            }
        }
    }

    /// The state digest at the applied index, from the cache when the
    /// index did not move, computed again at most once per
    /// [`DIGEST_EVERY`].
    fn state_digest(&mut self) -> Option<String> {
        let index = self.replica.applied_index();
        match &self.digest_cache {
            Some((i, d, _)) if *i == index => return Some(d.clone()),
            Some((_, _, at)) if at.elapsed() < DIGEST_EVERY => return None,
            _ => {}
        }
        let d = baton_core::replica::digest::hex(&self.replica.state_digest());
        self.digest_cache = Some((index, d.clone(), tokio::time::Instant::now()));
        Some(d)
    }

    fn status(&mut self, learner: bool) -> ReplicaStatus {
        let role = if self.primary {
            ServiceRole::Primary
        } else if learner || !self.replica.is_current() {
            ServiceRole::CatchingUp
        } else {
            ServiceRole::Clone
        };
        ReplicaStatus {
            role,
            applied_index: self.replica.applied_index(),
            state_digest: self.state_digest(),
            connections: self.conns.len(),
            malformed_dropped: self.capture.counters().malformed,
            waiting_commit: self.capture.waiting(),
            stream_mismatches: self.stream_mismatches,
            last_takeover: self.last_takeover,
            lease_lapses: self.lease_lapses,
        }
    }
}
