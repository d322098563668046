//! One replicated log per service: a raft group driven with raft-rs
//! (`raft` 0.7), its log in memory, its messages on the authenticated
//! cluster listener.
//!
//! # Shape
//!
//! A [`RaftGroup`] owns two threads, each with its own current-thread
//! tokio runtime:
//!
//! - the **raft thread** ticks raft-rs, steps messages, handles each
//!   `Ready` and carries the raft connections (one long-lived outgoing
//!   connection to each peer; see [`transport`]). It does nothing else, so
//!   heartbeats and elections keep their timing whatever the data path
//!   does: the service's work, the capture loop and the control API run on
//!   other threads and reach this one only through channels. A task on a
//!   shared runtime could be starved by them; an election timeout of 50 ms
//!   leaves no room for that.
//! - the **snapshot thread** moves snapshots in chunks on connections of
//!   their own, so bulk data never sits in front of a heartbeat.
//!
//! The caller proposes with [`RaftGroup::propose`] (batched: every
//! proposal queued between two `Ready` rounds goes into one), and reads
//! [`Event`]s: the committed entries in log order on every node, leader
//! included, leadership changes, membership changes and snapshots to
//! install.
//!
//! # Restarts: a new raft id every time
//!
//! The log and the votes live in memory only. A node that restarts has
//! forgotten both: under its old raft id it could vote twice in a term,
//! and raft-rs treats a log shorter than what the leader knows it
//! acknowledged as fatal. So a node never comes back under an old id.
//! [`RaftGroup::join`] draws a fresh random id (at least 2^32, above every
//! founding id) each time it is called, starts with an empty log and joins
//! as a learner once a member proposes [`RaftGroup::add_learner`] for it;
//! it is promoted to voter once caught up. Founding ids
//! ([`RaftGroup::found`]) are used once, when the group is created; a
//! founder that restarts joins like any new node. Every connection and
//! every message names the raft id it is for, and the group refuses
//! (counts and drops) those addressed to any id but its own, so a peer
//! still talking to a node's previous incarnation is never heard by the
//! new one.
//!
//! Durability therefore comes from replication to a majority: losing every
//! node at once loses the log.
//!
//! # Snapshots
//!
//! The application owns its state; raft-rs only sees snapshot metadata.
//! The application calls [`RaftGroup::compact`] with its state as of an
//! applied index (a checkpoint), and the log is discarded up to there. A
//! node that needs a snapshot containing a member the last one does not
//! know (a new learner) makes the leader ask for one
//! ([`Event::SnapshotWanted`]). The snapshot's bytes travel on the
//! snapshot thread's connection (see [`transport`]); raft's own snapshot
//! message carries the metadata only.

mod driver;
pub mod storage;
pub mod transport;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::peer::{ControlStream, PeerAuth};
use driver::{Command, Input};
use transport::{Channel, ChannelHello, TransportError};

/// A node's identity inside one raft group: fresh for every start (see the
/// module docs).
pub type RaftId = u64;

/// Founding ids are below this; ids drawn by [`RaftGroup::join`] are at or
/// above it, so a joined node never takes a founder's id.
pub const FIRST_JOINED_ID: RaftId = 1 << 32;

/// A member of the group: the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name in `[peers]` (what its key authenticates).
    pub name: String,
    /// Where it listens. With authentication the address configured for
    /// `name` in `[peers]` is used; this one only without.
    pub addr: SocketAddr,
}

/// The group's timing and limits.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The group's name (the service's): connections name it.
    pub group: String,
    /// How often raft ticks.
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns (randomised in
    /// `[election_ticks, 2 × election_ticks)` by raft-rs).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest proposal.
    pub max_entry_bytes: usize,
    /// Entries per append message, in bytes (at least one entry).
    pub max_append_bytes: u64,
    /// Append messages in flight per follower.
    pub max_inflight: usize,
    /// Proposed but uncommitted bytes the leader accepts before refusing
    /// proposals: bounds memory when followers cannot keep up.
    pub max_uncommitted_bytes: u64,
    /// Largest snapshot a node accepts from a peer.
    pub max_snapshot_bytes: usize,
}

impl GroupConfig {
    /// Defaults: a tick of 10 ms, an election timeout of 5 ticks (50 ms;
    /// detection within 100 ms), a heartbeat every tick.
    pub fn new(group: impl Into<String>) -> GroupConfig {
        GroupConfig {
            group: group.into(),
            tick: Duration::from_millis(10),
            election_ticks: 5,
            heartbeat_ticks: 1,
            max_entry_bytes: 8 << 20,
            max_append_bytes: 1 << 20,
            max_inflight: 32,
            max_uncommitted_bytes: 256 << 20,
            max_snapshot_bytes: 1 << 30,
        }
    }

    /// The shortest election timeout.
    pub fn election_timeout(&self) -> Duration {
        self.tick * self.election_ticks as u32
    }

    /// How long the leader may serve past the send time of a heartbeat a
    /// majority acknowledged ([`baton_core::lease::lease_duration`] with
    /// [`FENCE_ALLOWANCE`] and [`MAX_CLOCK_DRIFT_PPM`]): 30 ms with the
    /// defaults.
    pub fn lease(&self) -> Duration {
        Duration::from_micros(baton_core::lease::lease_duration(
            self.tick.as_micros() as u64,
            self.election_ticks as u64,
            FENCE_ALLOWANCE.as_micros() as u64,
            MAX_CLOCK_DRIFT_PPM,
        ))
    }
}

/// A committed normal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

/// Who leads, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub leader: Option<RaftId>,
    pub term: u64,
    /// This node is the leader (the service's primary).
    pub is_me: bool,
}

/// The members of the group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: BTreeMap<RaftId, Member>,
    pub learners: BTreeMap<RaftId, Member>,
}

impl Membership {
    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: RaftId) -> bool {
        self.voters.contains_key(&id) || self.learners.contains_key(&id)
    }
}

/// What the group tells its application, in log order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A committed entry, to apply.
    Committed(Committed),
    /// A membership change took effect at `index` (apply it like an
    /// entry: it counts toward the applied index).
    Membership {
        index: u64,
        term: u64,
        membership: Membership,
    },
    /// A new leader's empty entry committed at `index`: every entry of
    /// earlier terms is committed and came before this event, so a leader
    /// that applied up to here has the whole committed log (where a new
    /// primary may take over).
    LeaderEntry { index: u64, term: u64 },
    /// Replace the application's state with `data`, the state as of
    /// `index`; the entries that follow come after it.
    Snapshot {
        index: u64,
        term: u64,
        data: Vec<u8>,
        membership: Membership,
    },
    /// The leader changed, or this node's view of it.
    Leader(Leadership),
    /// A peer needs a snapshot that includes it: call
    /// [`RaftGroup::compact`] with the state as of the applied index.
    SnapshotWanted { for_node: RaftId },
    /// The group stopped and will say nothing more.
    Stopped(GroupError),
}

/// Why a group stopped on its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// raft-rs gave up (it panics on some states it cannot continue from;
    /// the group stops instead of the process).
    #[error("raft stopped: {0}")]
    Raft(String),
    /// A committed entry could not be applied.
    #[error("cannot apply entry {index}: {reason}")]
    Apply { index: u64, reason: String },
    /// The log in memory refused an update.
    #[error("log storage: {0}")]
    Storage(String),
}

/// Why a group did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("this node's id {0} is not among the founding voters")]
    NotAVoter(RaftId),
    #[error("founding ids must be between 1 and {max}: {id}", max = FIRST_JOINED_ID - 1)]
    BadFoundingId { id: RaftId },
    #[error("no random source for a fresh raft id: {0}")]
    Random(String),
    #[error("starting the group's threads: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the group stopped while starting")]
    Stopped,
}

/// Why a proposal was not appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<RaftId> },
    #[error("empty proposal")]
    Empty,
    #[error("proposal of {size} bytes exceeds {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("leadership is being transferred")]
    Transferring,
    #[error("too many uncommitted bytes; retry")]
    Overloaded,
    #[error("the group has stopped")]
    Stopped,
}

/// Why a membership change was refused or did not take effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<RaftId> },
    #[error("another membership change is under way; one at a time")]
    Pending,
    #[error("{0} is already a member")]
    AlreadyMember(RaftId),
    #[error("{0} is not a member")]
    NotMember(RaftId),
    #[error("{0} is not a learner")]
    NotLearner(RaftId),
    #[error("invalid raft id {0}")]
    InvalidId(RaftId),
    #[error("{id} has {matched} of {needed} entries: not caught up yet")]
    NotCaughtUp {
        id: RaftId,
        matched: u64,
        needed: u64,
    },
    #[error("the voters left would have {live} live of the {needed} a majority needs")]
    WouldLoseQuorum { live: usize, needed: usize },
    #[error("the leader cannot remove itself: transfer leadership first")]
    RemoveLeader,
    #[error("raft refused the change: {0}")]
    Raft(String),
    #[error("leadership changed before the change was applied; its outcome is unknown")]
    Superseded,
    #[error("the group has stopped")]
    Stopped,
}

/// Why a leader transfer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<RaftId> },
    #[error("{0} is not a voter")]
    NotVoter(RaftId),
    #[error("already the leader")]
    ToSelf,
    #[error("{0} did not take over in time")]
    TimedOut(RaftId),
    #[error("the group has stopped")]
    Stopped,
}

/// Why a compaction was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompactError {
    #[error("index {index} is not applied yet (applied: {applied})")]
    NotApplied { index: u64, applied: u64 },
    #[error("index {index} is not past the last snapshot ({snapshot})")]
    Stale { index: u64, snapshot: u64 },
    #[error("snapshot of {size} bytes exceeds {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Storage(String),
    #[error("the group has stopped")]
    Stopped,
}

/// Refuses an entry no log takes: empty, or larger than the limit.
fn check_entry(cfg: &GroupConfig, data: &[u8]) -> Result<(), ProposeError> {
    if data.is_empty() {
        return Err(ProposeError::Empty);
    }
    if data.len() > cfg.max_entry_bytes {
        return Err(ProposeError::TooLarge {
            size: data.len(),
            limit: cfg.max_entry_bytes,
        });
    }
    Ok(())
}

/// A proposal appended to the leader's log: it is the entry committed at
/// `index` only if that entry's term is `term` (a new leader may replace
/// uncommitted entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    pub index: u64,
    pub term: u64,
}

/// This node's role in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
}

/// A view of the group from this node.
#[derive(Debug, Clone)]
pub struct Status {
    pub id: RaftId,
    pub role: Role,
    pub leader: Option<RaftId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Index of the last snapshot (the log starts after it).
    pub snapshot_index: u64,
    pub last_index: u64,
    pub membership: Membership,
}

/// Counts of what the group did and refused, for metrics and tests.
#[derive(Debug, Default)]
pub struct RaftCounters {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Outgoing messages dropped: no connection, queue full, unknown peer.
    pub dropped_out: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Refused: a sender id that is not the authenticated node's.
    pub wrong_sender: AtomicU64,
    /// Refused: a sender id that is no member.
    pub unknown_sender: AtomicU64,
    /// Refused: addressed to another raft id (a previous incarnation).
    pub stale_target: AtomicU64,
    /// Refused: a connection for another group.
    pub wrong_group: AtomicU64,
    /// Refused: a frame that does not decode.
    pub decode_errors: AtomicU64,
    /// Refused: a stream that ended inside a frame.
    pub truncated: AtomicU64,
    /// Refused: a frame over the size limit.
    pub oversize: AtomicU64,
    /// Refused: a message type no peer may send, or a malformed entry.
    pub refused_type: AtomicU64,
    /// Refused: a heartbeat committing past this node's log.
    pub refused_commit: AtomicU64,
    /// Refused: a bad channel hello.
    pub bad_hello: AtomicU64,
    /// Messages raft-rs itself rejected when stepped.
    pub step_errors: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_received: AtomicU64,
    pub snapshot_failures: AtomicU64,
    /// `Ready` rounds handled.
    pub ready_rounds: AtomicU64,
    /// Most proposals that went into one `Ready` round.
    pub max_proposal_batch: AtomicU64,
}

impl RaftCounters {
    /// Every message or connection refused as hostile or malformed.
    pub fn refused(&self) -> u64 {
        [
            &self.wrong_sender,
            &self.unknown_sender,
            &self.stale_target,
            &self.wrong_group,
            &self.decode_errors,
            &self.truncated,
            &self.oversize,
            &self.refused_type,
            &self.refused_commit,
            &self.bad_hello,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub(crate) fn count(&self, e: &TransportError) {
        let c = match e {
            TransportError::WrongSender { .. } => &self.wrong_sender,
            TransportError::UnknownSender(_) => &self.unknown_sender,
            TransportError::StaleTarget { .. } => &self.stale_target,
            TransportError::WrongGroup { .. } => &self.wrong_group,
            TransportError::Decode(_) | TransportError::Envelope(_) => &self.decode_errors,
            TransportError::Truncated => &self.truncated,
            TransportError::TooLarge { .. } => &self.oversize,
            TransportError::RefusedType(_) | TransportError::BadEntry { .. } => &self.refused_type,
            TransportError::Hello(_) => &self.bad_hello,
            TransportError::Io(_)
            | TransportError::Closed
            | TransportError::Timeout
            | TransportError::Connect(_)
            | TransportError::UnknownTarget(_) => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the group's threads share.
pub(crate) struct Shared {
    pub cfg: GroupConfig,
    pub id: RaftId,
    pub auth: Option<Arc<PeerAuth>>,
    /// Members as of the last applied change (the transport's address book
    /// and its sender check).
    pub members: RwLock<BTreeMap<RaftId, Member>>,
    pub counters: Arc<RaftCounters>,
    /// The leader's lease end (CLOCK_MONOTONIC µs): 0 without one,
    /// [`baton_core::lease::UNBOUNDED`] for a lone voter.
    pub lease_until: AtomicU64,
    /// Told each new lease end from the raft thread (the keeper).
    pub lease_sink: Mutex<Option<LeaseSink>>,
}

/// Where the raft thread reports each new lease end (µs, 0 for none). It
/// must not block: it runs between raft rounds.
pub type LeaseSink = Box<dyn Fn(u64) + Send>;

/// What a heartbeat acknowledged by a majority leaves for stopping once
/// the lease ends: closing the service's sockets silently and removing its
/// VIP, by the keeper or the daemon, on a busy host.
pub const FENCE_ALLOWANCE: Duration = Duration::from_millis(10);
/// The largest rate difference assumed between two nodes' clocks (a
/// crystal is within 100 ppm; virtual machines' clocks wander more).
pub const MAX_CLOCK_DRIFT_PPM: u64 = 1_000;

impl Shared {
    pub fn member(&self, id: RaftId) -> Option<Member> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn set_members(&self, m: BTreeMap<RaftId, Member>) {
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = m;
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("group", &self.cfg.group)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// How a group starts.
enum Start {
    Found { voters: BTreeMap<RaftId, Member> },
    Join { members: BTreeMap<RaftId, Member> },
}

/// One raft group on this node. Dropping it stops the group: its threads
/// end and its connections close (to its peers, as if the node died).
pub struct RaftGroup {
    shared: Arc<Shared>,
    inputs: mpsc::UnboundedSender<Input>,
    raft_accepts: mpsc::UnboundedSender<transport::Accepted>,
    snapshot_accepts: mpsc::UnboundedSender<transport::Accepted>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for RaftGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftGroup")
            .field("group", &self.shared.cfg.group)
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

/// The application's side of a group's events. Unbounded: committed
/// entries are in memory in the log already, and the raft thread must
/// never wait for the application.
pub type Events = mpsc::UnboundedReceiver<Event>;

impl RaftGroup {
    /// Founds a group: `id` is this node's, `voters` every founding
    /// member (this node included). Only when the group is created: a node
    /// that restarts uses [`RaftGroup::join`].
    pub fn found(
        cfg: GroupConfig,
        auth: Option<Arc<PeerAuth>>,
        id: RaftId,
        voters: BTreeMap<RaftId, Member>,
    ) -> Result<(RaftGroup, Events), StartError> {
        for v in voters.keys() {
            if *v == 0 || *v >= FIRST_JOINED_ID {
                return Err(StartError::BadFoundingId { id: *v });
            }
        }
        if !voters.contains_key(&id) {
            return Err(StartError::NotAVoter(id));
        }
        RaftGroup::start(cfg, auth, id, Start::Found { voters })
    }

    /// Starts a new member with a fresh random id and an empty log; it
    /// takes part once a member adds it ([`RaftGroup::add_learner`] with
    /// [`RaftGroup::id`]). `members` are the group's members as known now
    /// (any member's [`Status::membership`]): whom to answer until the
    /// first snapshot brings the current list.
    pub fn join(
        cfg: GroupConfig,
        auth: Option<Arc<PeerAuth>>,
        members: BTreeMap<RaftId, Member>,
    ) -> Result<(RaftGroup, Events), StartError> {
        let id = fresh_id().map_err(StartError::Random)?;
        RaftGroup::start(cfg, auth, id, Start::Join { members })
    }

    fn start(
        cfg: GroupConfig,
        auth: Option<Arc<PeerAuth>>,
        id: RaftId,
        start: Start,
    ) -> Result<(RaftGroup, Events), StartError> {
        let members = match &start {
            Start::Found { voters } => voters.clone(),
            Start::Join { members } => members.clone(),
        };
        let shared = Arc::new(Shared {
            cfg,
            id,
            auth,
            members: RwLock::new(members),
            counters: Arc::new(RaftCounters::default()),
            lease_until: AtomicU64::new(0),
            lease_sink: Mutex::new(None),
        });
        let raft_config =
            driver::raft_config(&shared.cfg, id, matches!(start, Start::Found { .. }));
        raft_config
            .validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let storage = match start {
            Start::Found { voters } => storage::GroupStorage::found(voters),
            Start::Join { .. } => storage::GroupStorage::empty(),
        };

        let (inputs, input_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (raft_accepts, raft_accept_rx) = mpsc::unbounded_channel();
        let (snapshot_accepts, snapshot_accept_rx) = mpsc::unbounded_channel();
        let (snapshot_jobs, snapshot_job_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (started_tx, started_rx) = std::sync::mpsc::channel();

        let mut threads = Vec::new();
        let name = &shared.cfg.group;
        {
            let shared = shared.clone();
            let inputs = inputs.clone();
            let shutdown_rx = shutdown_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("raft-{name}"))
                    .spawn(move || {
                        // Heartbeats and votes ride this thread.
                        if let Err(e) = baton_net::limits::prioritise_this_thread() {
                            tracing::debug!(error = %e, "raft thread keeps its priority");
                        }
                        let rt = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt,
                            Err(e) => {
                                let _ = started_tx.send(Err(StartError::Thread(e)));
                                return;
                            }
                        };
                        rt.block_on(async move {
                            let (net_tx, net_rx) = mpsc::channel(driver::NET_QUEUE);
                            let (beat_tx, beat_rx) = mpsc::channel(driver::NET_QUEUE);
                            let driver = match driver::Driver::new(
                                shared.clone(),
                                raft_config,
                                storage,
                                events_tx,
                                inputs.clone(),
                                snapshot_jobs,
                            ) {
                                Ok(d) => d,
                                Err(e) => {
                                    let _ = started_tx.send(Err(StartError::Config(e)));
                                    return;
                                }
                            };
                            let _ = started_tx.send(Ok(()));
                            tokio::spawn(transport::serve_raft_accepts(
                                shared,
                                raft_accept_rx,
                                net_tx,
                                beat_tx,
                            ));
                            driver.run(input_rx, net_rx, beat_rx, shutdown_rx).await;
                        });
                    })?,
            );
        }
        {
            let shared = shared.clone();
            let inputs = inputs.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("raft-snap-{name}"))
                    .spawn(move || {
                        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        else {
                            return;
                        };
                        rt.block_on(transport::snapshot_service(
                            shared,
                            snapshot_job_rx,
                            snapshot_accept_rx,
                            inputs,
                            shutdown_rx,
                        ));
                    })?,
            );
        }
        let group = RaftGroup {
            shared,
            inputs,
            raft_accepts,
            snapshot_accepts,
            shutdown,
            threads,
        };
        match started_rx.recv() {
            Ok(Ok(())) => Ok((group, events)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Stopped),
        }
    }

    /// This node's raft id in the group.
    pub fn id(&self) -> RaftId {
        self.shared.id
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.shared.cfg.group
    }

    /// What the group counted.
    pub fn counters(&self) -> &Arc<RaftCounters> {
        &self.shared.counters
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Command(make(tx))).ok()?;
        rx.await.ok()
    }

    /// Appends `data` to the log if this node leads. Returns once appended
    /// on the leader; the entry reaches every node, this one included, as
    /// [`Event::Committed`] once a majority holds it.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        check_entry(&self.shared.cfg, &data)?;
        self.ask(|reply| Command::Propose { data, reply })
            .await
            .unwrap_or(Err(ProposeError::Stopped))
    }

    /// Appends `entries` in order without waiting (the capture path, which
    /// must not stall on the log): the answers, one per entry and in order,
    /// arrive on the returned channel. An entry the leader refuses (empty,
    /// too large, not leader) fails alone.
    pub fn submit(
        &self,
        entries: Vec<Vec<u8>>,
    ) -> oneshot::Receiver<Vec<Result<Proposed, ProposeError>>> {
        let (reply, rx) = oneshot::channel();
        let _ = self
            .inputs
            .send(Input::Command(Command::ProposeAll { entries, reply }));
        rx
    }

    /// Adds `id` (a node started with [`RaftGroup::join`]) as a learner:
    /// it receives the log but does not vote. Returns once applied here.
    pub async fn add_learner(&self, id: RaftId, member: Member) -> Result<Membership, ChangeError> {
        self.change(driver::Change::AddLearner { id, member }).await
    }

    /// Makes learner `id` a voter, once it has every committed entry.
    pub async fn promote(&self, id: RaftId) -> Result<Membership, ChangeError> {
        self.change(driver::Change::Promote { id }).await
    }

    /// Removes `id`, refused if the voters left could not reach a
    /// majority of live nodes.
    pub async fn remove(&self, id: RaftId) -> Result<Membership, ChangeError> {
        self.change(driver::Change::Remove { id }).await
    }

    async fn change(&self, change: driver::Change) -> Result<Membership, ChangeError> {
        self.ask(|reply| Command::Change { change, reply })
            .await
            .unwrap_or(Err(ChangeError::Stopped))
    }

    /// Hands leadership to voter `to`; returns once this node sees `to`
    /// lead.
    pub async fn transfer_leader(&self, to: RaftId) -> Result<(), TransferError> {
        self.ask(|reply| Command::Transfer { to, reply })
            .await
            .unwrap_or(Err(TransferError::Stopped))
    }

    /// Records `data`, the application's state as of applied `index`, as
    /// the group's snapshot, and discards the log up to `index`.
    pub async fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), CompactError> {
        self.ask(|reply| Command::Compact { index, data, reply })
            .await
            .unwrap_or(Err(CompactError::Stopped))
    }

    /// When this leader's lease ends (CLOCK_MONOTONIC µs,
    /// `baton_net::clock::monotonic_us`): `None` while it has none (not
    /// leading, or no majority heard it yet). While it holds, no other node
    /// can have been elected.
    pub fn lease_until(&self) -> Option<u64> {
        Some(self.shared.lease_until.load(Ordering::Acquire)).filter(|u| *u != 0)
    }

    /// Whether this node leads under a lease that holds now.
    pub fn lease_holds(&self) -> bool {
        self.lease_until()
            .is_some_and(|u| baton_net::clock::monotonic_us() < u)
    }

    /// Reports every new lease end to `sink`, from the raft thread.
    pub fn set_lease_sink(&self, sink: LeaseSink) {
        *self
            .shared
            .lease_sink
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// The group as this node sees it; `None` once stopped.
    pub async fn status(&self) -> Option<Status> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Serves a connection a peer opened for this group (its first bytes
    /// begin with [`transport::RAFT_MAGIC`] or
    /// [`transport::SNAPSHOT_MAGIC`]). `authenticated` is the node its key
    /// proved, `None` only on a plain listener. The connection moves to
    /// the group's threads; a refusal is counted there or here.
    pub async fn serve(
        &self,
        mut stream: ControlStream,
        authenticated: Option<String>,
    ) -> Result<(), TransportError> {
        let (channel, hello) = match tokio::time::timeout(
            transport::HELLO_TIMEOUT,
            transport::read_hello(&mut stream),
        )
        .await
        {
            Err(_) => return Err(TransportError::Timeout),
            Ok(Err(e)) => {
                self.shared.counters.count(&e);
                return Err(e);
            }
            Ok(Ok(h)) => h,
        };
        self.hand_over(channel, hello, stream, authenticated)
    }

    /// [`RaftGroup::serve`] for a caller that read the hello itself (to
    /// pick the group by [`ChannelHello::group`]).
    pub fn hand_over(
        &self,
        channel: Channel,
        hello: ChannelHello,
        stream: ControlStream,
        authenticated: Option<String>,
    ) -> Result<(), TransportError> {
        if hello.group != self.shared.cfg.group {
            let e = TransportError::WrongGroup { group: hello.group };
            self.shared.counters.count(&e);
            return Err(e);
        }
        let accepted = transport::Accepted {
            channel,
            stream,
            hello,
            authenticated,
        };
        let queue = match channel {
            Channel::Raft | Channel::Heartbeat => &self.raft_accepts,
            Channel::Snapshot => &self.snapshot_accepts,
        };
        queue.send(accepted).map_err(|_| TransportError::Closed)
    }
}

impl Drop for RaftGroup {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A fresh raft id in `[FIRST_JOINED_ID, u64::MAX]`.
fn fresh_id() -> Result<RaftId, String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(u64::from_le_bytes(b) | FIRST_JOINED_ID)
}

/// raft-rs logs through slog: this drain forwards its records to
/// `tracing` (target `raft`), so nothing of it reaches stdout on its own.
pub(crate) struct TracingDrain {
    pub group: String,
}

struct KvLine(String);

impl slog::Serializer for KvLine {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        use fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        use slog::KV;
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvLine(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let group = self.group.as_str();
        let msg = record.msg();
        let kv = kv.0.trim_start();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", group, "{msg} {kv}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", group, "{msg} {kv}"),
            slog::Level::Info => tracing::info!(target: "raft", group, "{msg} {kv}"),
            slog::Level::Debug => tracing::debug!(target: "raft", group, "{msg} {kv}"),
            slog::Level::Trace => tracing::trace!(target: "raft", group, "{msg} {kv}"),
        }
        Ok(())
    }
}
