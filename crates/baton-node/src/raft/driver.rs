//! The raft thread's loop: ticks raft-rs, steps the messages peers sent,
//! takes the commands of [`super::RaftGroup`], and handles each `Ready`
//! (send, store, apply, advance) as raft-rs's `ready`/`advance` protocol
//! asks. The log is in memory, so "persisting" is appending to
//! [`GroupStorage`] and happens before `advance`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType, Message, MessageType, Snapshot,
};
use ::raft::{RawNode, SnapshotStatus, StateRole};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use baton_core::lease::Lease;

use super::storage::{GroupStorage, SnapshotEnvelope, StoredSnapshot};
use super::transport::{Links, SnapshotJob};
use super::{
    ChangeError, Committed, CompactError, Event, GroupConfig, GroupError, Leadership, Member,
    Membership, ProposeError, Proposed, RaftId, Role, Shared, Status, TracingDrain, TransferError,
};

/// Peer messages waiting for the raft thread.
pub(crate) const NET_QUEUE: usize = 8192;
/// Inputs handled before a `Ready` round: proposals that arrive together
/// go into one round, and a flood still lets raft tick.
const DRAIN_BUDGET: usize = 8192;
/// Appends stepped between two looks at the heartbeat lane.
const BEAT_CHECK: usize = 64;
/// How often the application is asked again for a snapshot it has not
/// given.
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// What reaches the raft thread.
pub(crate) enum Input {
    Command(Command),
    /// A peer's connection failed.
    Unreachable(RaftId),
    /// A snapshot transfer ended.
    SnapshotDone {
        to: RaftId,
        ok: bool,
    },
    /// A snapshot arrived from the leader.
    SnapshotIn(Box<SnapshotIn>),
}

/// A snapshot that arrived from the leader: its raft message and its data.
pub(crate) struct SnapshotIn {
    pub msg: Message,
    pub data: Arc<Vec<u8>>,
    pub envelope: SnapshotEnvelope,
    pub ack: oneshot::Sender<bool>,
}

/// A request of [`super::RaftGroup`].
pub(crate) enum Command {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Proposed, ProposeError>>,
    },
    /// Entries in order, answered together.
    ProposeAll {
        entries: Vec<Vec<u8>>,
        reply: oneshot::Sender<Vec<Result<Proposed, ProposeError>>>,
    },
    Change {
        change: Change,
        reply: oneshot::Sender<Result<Membership, ChangeError>>,
    },
    Transfer {
        to: RaftId,
        reply: oneshot::Sender<Result<(), TransferError>>,
    },
    Compact {
        index: u64,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), CompactError>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
}

/// One membership change.
pub(crate) enum Change {
    AddLearner { id: RaftId, member: Member },
    Promote { id: RaftId },
    Remove { id: RaftId },
}

/// raft-rs's configuration for a group.
pub(crate) fn raft_config(cfg: &GroupConfig, id: RaftId, founded: bool) -> ::raft::Config {
    ::raft::Config {
        id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        // A founded log starts after its snapshot at 1.
        applied: u64::from(founded),
        max_size_per_msg: cfg.max_append_bytes,
        max_inflight_msgs: cfg.max_inflight,
        check_quorum: true,
        pre_vote: true,
        max_uncommitted_size: cfg.max_uncommitted_bytes,
        ..Default::default()
    }
}

/// The configuration in force from `index` on.
struct ConfPoint {
    index: u64,
    conf_state: ConfState,
    members: BTreeMap<RaftId, Member>,
}

struct PendingConf {
    index: u64,
    term: u64,
    reply: oneshot::Sender<Result<Membership, ChangeError>>,
}

struct PendingTransfer {
    to: RaftId,
    until: Instant,
    reply: oneshot::Sender<Result<(), TransferError>>,
}

/// A snapshot received, waiting for raft to hand it back in a `Ready`.
struct Incoming {
    index: u64,
    term: u64,
    data: Arc<Vec<u8>>,
    envelope: SnapshotEnvelope,
}

pub(crate) struct Driver {
    raw: RawNode<GroupStorage>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    inputs: mpsc::UnboundedSender<Input>,
    snapshots: mpsc::UnboundedSender<SnapshotJob>,
    links: Links,
    /// Configurations from the snapshot's on: what a compaction at an
    /// index records.
    history: Vec<ConfPoint>,
    pending_conf: Option<PendingConf>,
    pending_transfer: Option<PendingTransfer>,
    incoming: Option<Incoming>,
    last_heard: HashMap<RaftId, Instant>,
    /// (leader id, this node leads) as last reported.
    seen: (u64, bool),
    snapshot_asked: Option<Instant>,
    /// Proposals taken since the last `Ready` round.
    batch: u64,
    stopped: Option<GroupError>,
    /// The leader's lease, from its tagged messages.
    lease: Lease,
    /// The lease end last published to the handle and the sink (0: none).
    lease_told: u64,
    /// As a follower: the newest lease tag the leader sent (its id, the
    /// tag), echoed in every answer to it.
    echo: Option<(RaftId, u64)>,
}

/// First byte of the context a leader puts in its heartbeats and appends,
/// and its followers in their answers: the lease round's tag follows, u64
/// little-endian. A follower answers with the newest tag it took from its
/// leader, whatever message it answers: receiving any of the leader's
/// messages restarted its election timer (raft-rs: heartbeats, appends),
/// and a follower waiting for a snapshot answers no heartbeat. raft-rs
/// reads contexts only of heartbeats, for ReadIndex (unused here), and of
/// votes (never tagged).
const LEASE_TAG: u8 = b'L';
/// A new lease end reaches the sink only once it moved this far (µs), so
/// the keeper gets tens of messages a second, not one per raft round; an
/// end told late is earlier than the real one, which is safe.
const LEASE_TOLD_STEP: u64 = 2_000;

fn tagged(tag: u64) -> Vec<u8> {
    [&[LEASE_TAG][..], &tag.to_le_bytes()].concat()
}

fn is_answer(t: i32) -> bool {
    t == MessageType::MsgHeartbeatResponse as i32 || t == MessageType::MsgAppendResponse as i32
}

fn is_lead_message(t: i32) -> bool {
    t == MessageType::MsgHeartbeat as i32 || t == MessageType::MsgAppend as i32
}

fn lease_tag(context: &[u8]) -> Option<u64> {
    match context {
        [LEASE_TAG, rest @ ..] => Some(u64::from_le_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "raft-rs panicked".into())
}

fn ids(cs: &ConfState) -> BTreeSet<RaftId> {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .copied()
        .collect()
}

fn membership_of(cs: &ConfState, members: &BTreeMap<RaftId, Member>) -> Membership {
    let pick = |list: &[u64]| {
        list.iter()
            .filter_map(|id| Some((*id, members.get(id)?.clone())))
            .collect()
    };
    Membership {
        voters: pick(&cs.voters),
        learners: pick(&cs.learners),
    }
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: ::raft::Config,
        storage: GroupStorage,
        events: mpsc::UnboundedSender<Event>,
        inputs: mpsc::UnboundedSender<Input>,
        snapshots: mpsc::UnboundedSender<SnapshotJob>,
    ) -> Result<Driver, String> {
        let logger = slog::Logger::root(
            TracingDrain {
                group: shared.cfg.group.clone(),
            },
            slog::o!("raft_id" => shared.id),
        );
        let snap = storage.snapshot_stored().clone();
        let members = shared
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let raw = RawNode::new(&config, storage, &logger).map_err(|e| e.to_string())?;
        let lease = Lease::new(shared.id, shared.cfg.lease().as_micros() as u64);
        Ok(Driver {
            raw,
            shared,
            events,
            inputs,
            snapshots,
            links: Links::default(),
            history: vec![ConfPoint {
                index: snap.index,
                conf_state: snap.conf_state,
                members,
            }],
            pending_conf: None,
            pending_transfer: None,
            incoming: None,
            last_heard: HashMap::new(),
            seen: (0, false),
            snapshot_asked: None,
            batch: 0,
            stopped: None,
            lease,
            lease_told: 0,
            echo: None,
        })
    }

    /// Runs until shutdown or until raft cannot go on.
    pub(crate) async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        mut net: mpsc::Receiver<Message>,
        mut beats: mpsc::Receiver<Message>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.shared.cfg.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(m) = beats.recv() => self.guarded(|d| d.step(m)),
                _ = ticker.tick() => self.guarded(|d| { d.raw.tick(); }),
                Some(m) = net.recv() => self.guarded(|d| d.step(m)),
                i = inputs.recv() => match i {
                    Some(i) => self.guarded(|d| d.input(i)),
                    None => break,
                },
            }
            for i in 0..DRAIN_BUDGET {
                // Heartbeats first, also in the middle of a flood.
                if i % BEAT_CHECK == 0 {
                    while let Ok(m) = beats.try_recv() {
                        self.guarded(|d| d.step(m));
                    }
                }
                match net.try_recv() {
                    Ok(m) => self.guarded(|d| d.step(m)),
                    Err(_) => break,
                }
            }
            for _ in 0..DRAIN_BUDGET {
                match inputs.try_recv() {
                    Ok(i) => self.guarded(|d| d.input(i)),
                    Err(_) => break,
                }
            }
            self.shared
                .counters
                .max_proposal_batch
                .fetch_max(self.batch, Ordering::Relaxed);
            self.batch = 0;
            self.guarded(|d| d.ready());
            self.guarded(|d| d.after_round());
            if let Some(e) = self.stopped.take() {
                tracing::error!(group = %self.shared.cfg.group, id = self.shared.id, error = %e, "raft group stopped");
                let _ = self.events.send(Event::Stopped(e));
                break;
            }
        }
    }

    /// Runs `f` unless the group stopped; a panic inside raft-rs stops
    /// the group instead of the thread.
    fn guarded(&mut self, f: impl FnOnce(&mut Self)) {
        if self.stopped.is_some() {
            return;
        }
        if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| f(self))) {
            self.stopped = Some(GroupError::Raft(panic_text(p.as_ref())));
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn leader(&self) -> Option<RaftId> {
        Some(self.raw.raft.leader_id).filter(|l| *l != 0)
    }

    fn step(&mut self, msg: Message) {
        // raft-rs treats a heartbeat committing past the log as fatal; only
        // a peer that lost track of this node's log (or lies) sends one.
        if msg.msg_type == MessageType::MsgHeartbeat as i32
            && msg.commit > self.raw.raft.raft_log.last_index()
        {
            self.shared
                .counters
                .refused_commit
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(group = %self.shared.cfg.group, from = msg.from, commit = msg.commit, "refused a heartbeat committing past this node's log");
            return;
        }
        self.last_heard.insert(msg.from, Instant::now());
        let mut msg = msg;
        let (from, term) = (msg.from, msg.term);
        let mut lead_tag = None;
        if let Some(tag) = lease_tag(&msg.context) {
            if is_answer(msg.msg_type) {
                self.lease.handle_ack(from, tag);
                msg.context.clear();
            } else if is_lead_message(msg.msg_type) {
                lead_tag = Some(tag);
                msg.context.clear();
            }
        }
        let stepped = self.raw.step(msg);
        // Echoed only once raft took the sender as this term's leader.
        if let Some(tag) = lead_tag {
            let r = &self.raw.raft;
            if r.leader_id == from && r.term == term && r.state == StateRole::Follower {
                self.echo = Some((from, tag));
            }
        }
        if let Err(e) = stepped {
            self.shared
                .counters
                .step_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(group = %self.shared.cfg.group, error = %e, "raft did not take a message");
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Command(c) => self.command(c),
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotDone { to, ok } => self.raw.report_snapshot(
                to,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            Input::SnapshotIn(snap) => {
                let SnapshotIn {
                    msg,
                    data,
                    envelope,
                    ack,
                } = *snap;
                let Some(meta) = msg.snapshot.as_ref().and_then(|s| s.metadata.as_ref()) else {
                    let _ = ack.send(false);
                    return;
                };
                self.incoming = Some(Incoming {
                    index: meta.index,
                    term: meta.term,
                    data,
                    envelope,
                });
                self.step(msg);
                let _ = ack.send(true);
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Propose { data, reply } => {
                self.batch += 1;
                let _ = reply.send(self.propose(data));
            }
            Command::ProposeAll { entries, reply } => {
                self.batch += entries.len() as u64;
                let results = entries
                    .into_iter()
                    .map(|e| {
                        super::check_entry(&self.shared.cfg, &e)?;
                        self.propose(e)
                    })
                    .collect();
                let _ = reply.send(results);
            }
            Command::Change { change, reply } => match self.propose_change(change) {
                Ok((index, term)) => {
                    self.pending_conf = Some(PendingConf { index, term, reply });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Transfer { to, reply } => {
                if let Err(e) = self.transfer(to) {
                    let _ = reply.send(Err(e));
                    return;
                }
                if let Some(old) = self.pending_transfer.take() {
                    let _ = old.reply.send(Err(TransferError::TimedOut(old.to)));
                }
                let cfg = &self.shared.cfg;
                // raft-rs abandons a transfer after an election timeout.
                let until = Instant::now() + cfg.election_timeout() * 3 + cfg.tick * 2;
                self.pending_transfer = Some(PendingTransfer { to, until, reply });
            }
            Command::Compact { index, data, reply } => {
                let _ = reply.send(self.compact(index, data));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader(),
            });
        }
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => Ok(Proposed {
                index: self.raw.raft.raft_log.last_index(),
                term: self.raw.raft.term,
            }),
            Err(_) if self.raw.raft.lead_transferee.is_some() => Err(ProposeError::Transferring),
            Err(_) => Err(ProposeError::Overloaded),
        }
    }

    /// Whether a majority of `voters` is live: this node, and peers heard
    /// from within an election timeout.
    fn quorum_after(&self, voters: &BTreeSet<RaftId>) -> Result<(), ChangeError> {
        let window = self.shared.cfg.election_timeout();
        let live = voters
            .iter()
            .filter(|id| {
                **id == self.shared.id
                    || self
                        .last_heard
                        .get(id)
                        .is_some_and(|t| t.elapsed() <= window)
            })
            .count();
        let needed = voters.len() / 2 + 1;
        if live < needed {
            return Err(ChangeError::WouldLoseQuorum { live, needed });
        }
        Ok(())
    }

    fn propose_change(&mut self, change: Change) -> Result<(u64, u64), ChangeError> {
        if !self.is_leader() {
            return Err(ChangeError::NotLeader {
                leader: self.leader(),
            });
        }
        if self.pending_conf.is_some() || self.raw.raft.has_pending_conf() {
            return Err(ChangeError::Pending);
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        if !cs.voters_outgoing.is_empty() {
            return Err(ChangeError::Pending);
        }
        let voters: BTreeSet<RaftId> = cs.voters.iter().copied().collect();
        let learners: BTreeSet<RaftId> = cs.learners.iter().copied().collect();
        let (kind, id, context) = match change {
            Change::AddLearner { id, member } => {
                if id == 0 {
                    return Err(ChangeError::InvalidId(id));
                }
                if voters.contains(&id) || learners.contains(&id) {
                    return Err(ChangeError::AlreadyMember(id));
                }
                let context = postcard::to_allocvec(&member)
                    .expect("postcard encoding into a Vec cannot fail");
                (ConfChangeType::AddLearnerNode, id, context)
            }
            Change::Promote { id } => {
                if !learners.contains(&id) {
                    return Err(ChangeError::NotLearner(id));
                }
                let matched = self.raw.raft.prs().get(id).map_or(0, |p| p.matched);
                let needed = self.raw.raft.raft_log.committed;
                if matched < needed {
                    return Err(ChangeError::NotCaughtUp {
                        id,
                        matched,
                        needed,
                    });
                }
                let mut after = voters.clone();
                after.insert(id);
                self.quorum_after(&after)?;
                (ConfChangeType::AddNode, id, Vec::new())
            }
            Change::Remove { id } => {
                if !voters.contains(&id) && !learners.contains(&id) {
                    return Err(ChangeError::NotMember(id));
                }
                if id == self.shared.id {
                    return Err(ChangeError::RemoveLeader);
                }
                let mut after = voters.clone();
                after.remove(&id);
                self.quorum_after(&after)?;
                (ConfChangeType::RemoveNode, id, Vec::new())
            }
        };
        let cc = ConfChangeV2 {
            transition: ConfChangeTransition::Auto as i32,
            changes: vec![ConfChangeSingle {
                change_type: kind as i32,
                node_id: id,
            }],
            context,
        };
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| ChangeError::Raft(e.to_string()))?;
        Ok((self.raw.raft.raft_log.last_index(), self.raw.raft.term))
    }

    fn transfer(&mut self, to: RaftId) -> Result<(), TransferError> {
        if !self.is_leader() {
            return Err(TransferError::NotLeader {
                leader: self.leader(),
            });
        }
        if to == self.shared.id {
            return Err(TransferError::ToSelf);
        }
        if !self
            .raw
            .raft
            .prs()
            .conf()
            .to_conf_state()
            .voters
            .contains(&to)
        {
            return Err(TransferError::NotVoter(to));
        }
        self.raw.transfer_leader(to);
        Ok(())
    }

    fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), CompactError> {
        let applied = self.raw.raft.raft_log.applied;
        if index > applied {
            return Err(CompactError::NotApplied { index, applied });
        }
        let snapshot = self.raw.store().snapshot_stored().index;
        if index <= snapshot {
            return Err(CompactError::Stale { index, snapshot });
        }
        let Some(at) = self.history.iter().rposition(|p| p.index <= index) else {
            return Err(CompactError::Storage(format!(
                "no configuration known at {index}"
            )));
        };
        let point = &self.history[at];
        let bytes = SnapshotEnvelope {
            members: point.members.clone(),
            app: data,
        }
        .encode();
        let limit = self.shared.cfg.max_snapshot_bytes;
        if bytes.len() > limit {
            return Err(CompactError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let cs = point.conf_state.clone();
        self.raw
            .mut_store()
            .compact(index, cs, Arc::new(bytes))
            .map_err(|e| CompactError::Storage(e.to_string()))?;
        self.history.drain(..at);
        self.snapshot_asked = None;
        Ok(())
    }

    fn status(&self) -> Status {
        let r = &self.raw.raft;
        let members = self
            .shared
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Status {
            id: self.shared.id,
            role: match r.state {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            },
            leader: self.leader(),
            term: r.term,
            commit_index: r.raft_log.committed,
            applied_index: r.raft_log.applied,
            snapshot_index: self.raw.store().snapshot_stored().index,
            last_index: r.raft_log.last_index(),
            membership: membership_of(&r.prs().conf().to_conf_state(), &members),
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        // The messages of one send are one lease round.
        let mut round = None;
        let leading = self.is_leader();
        let echo = self
            .echo
            .filter(|(leader, _)| *leader == self.raw.raft.leader_id);
        for mut m in msgs {
            if leading && is_lead_message(m.msg_type) && m.context.is_empty() {
                let tag = *round.get_or_insert_with(|| {
                    self.lease
                        .handle_round_sent(baton_net::clock::monotonic_us())
                });
                m.context = tagged(tag);
            } else if let Some((leader, tag)) = echo {
                if is_answer(m.msg_type) && m.to == leader {
                    m.context = tagged(tag);
                }
            }
            if m.msg_type == MessageType::MsgSnapshot as i32 {
                self.send_snapshot(m);
            } else {
                self.links.send(&self.shared, &self.inputs, m);
            }
        }
    }

    /// raft's snapshot message goes with the stored snapshot's data to the
    /// snapshot thread.
    fn send_snapshot(&mut self, msg: Message) {
        let to = msg.to;
        let stored = self.raw.store().snapshot_stored();
        let same = msg
            .snapshot
            .as_ref()
            .and_then(|s| s.metadata.as_ref())
            .is_some_and(|m| m.index == stored.index && m.term == stored.term);
        let sent = same
            && self.shared.member(to).is_some()
            && self
                .snapshots
                .send(SnapshotJob {
                    to,
                    msg,
                    data: stored.data.clone(),
                })
                .is_ok();
        if !sent {
            // Reported on the next round, outside this `Ready`.
            let _ = self.inputs.send(Input::SnapshotDone { to, ok: false });
        }
    }

    fn ready(&mut self) {
        if !self.raw.has_ready() {
            return;
        }
        self.shared
            .counters
            .ready_rounds
            .fetch_add(1, Ordering::Relaxed);
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            let msgs = rd.take_messages();
            self.send(msgs);
        }
        if !rd.snapshot().is_empty() {
            if let Err(e) = self.install_snapshot(rd.snapshot().clone()) {
                self.stopped = Some(e);
                return;
            }
        }
        let committed = rd.take_committed_entries();
        if let Err(e) = self.apply(committed) {
            self.stopped = Some(e);
            return;
        }
        if let Err(e) = self.raw.mut_store().append(rd.entries()) {
            self.stopped = Some(GroupError::Storage(e.to_string()));
            return;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone());
        }
        if !rd.persisted_messages().is_empty() {
            let msgs = rd.take_persisted_messages();
            self.send(msgs);
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        let msgs = light.take_messages();
        self.send(msgs);
        let committed = light.take_committed_entries();
        if let Err(e) = self.apply(committed) {
            self.stopped = Some(e);
            return;
        }
        self.raw.advance_apply();
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), GroupError> {
        let meta = snap.metadata.unwrap_or_default();
        let (index, term) = (meta.index, meta.term);
        let Some(inc) = self
            .incoming
            .take()
            .filter(|i| i.index == index && i.term == term)
        else {
            return Err(GroupError::Storage(format!(
                "snapshot at {index} arrived without its data"
            )));
        };
        let cs = meta.conf_state.unwrap_or_default();
        self.raw
            .mut_store()
            .apply_snapshot(StoredSnapshot {
                index,
                term,
                conf_state: cs.clone(),
                data: inc.data,
            })
            .map_err(|e| GroupError::Storage(e.to_string()))?;
        let members = inc.envelope.members;
        self.shared.set_members(members.clone());
        self.links.retain(|id| members.contains_key(&id));
        let membership = membership_of(&cs, &members);
        self.history = vec![ConfPoint {
            index,
            conf_state: cs,
            members,
        }];
        let _ = self.events.send(Event::Snapshot {
            index,
            term,
            data: inc.envelope.app,
            membership,
        });
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), GroupError> {
        for e in entries {
            let (index, term) = (e.index, e.term);
            match EntryType::from_i32(e.entry_type) {
                // An empty entry is a new leader's; proposals are never empty.
                Some(EntryType::EntryNormal) => {
                    let _ = self.events.send(if e.data.is_empty() {
                        Event::LeaderEntry { index, term }
                    } else {
                        Event::Committed(Committed {
                            index,
                            term,
                            data: e.data,
                        })
                    });
                }
                Some(EntryType::EntryConfChangeV2) => self.apply_conf(index, term, &e.data)?,
                _ => {
                    return Err(GroupError::Apply {
                        index,
                        reason: format!("entry type {} is never proposed", e.entry_type),
                    })
                }
            }
            if self.pending_conf.as_ref().is_some_and(|p| index >= p.index) {
                if let Some(p) = self.pending_conf.take() {
                    let _ = p.reply.send(Err(ChangeError::Superseded));
                }
            }
        }
        Ok(())
    }

    fn apply_conf(&mut self, index: u64, term: u64, data: &[u8]) -> Result<(), GroupError> {
        let cc = ConfChangeV2::decode(data).map_err(|e| GroupError::Apply {
            index,
            reason: e.to_string(),
        })?;
        let mine = self
            .pending_conf
            .as_ref()
            .is_some_and(|p| p.index == index && p.term == term);
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                // Refused the same way on every node: the log goes on.
                tracing::warn!(group = %self.shared.cfg.group, index, error = %e, "a committed membership change does not apply; skipped");
                if mine {
                    if let Some(p) = self.pending_conf.take() {
                        let _ = p.reply.send(Err(ChangeError::Raft(e.to_string())));
                    }
                }
                return Ok(());
            }
        };
        self.raw.mut_store().set_conf_state(cs.clone());
        let mut members = self
            .history
            .last()
            .map(|p| p.members.clone())
            .unwrap_or_default();
        for ch in &cc.changes {
            match ConfChangeType::from_i32(ch.change_type) {
                Some(ConfChangeType::AddNode | ConfChangeType::AddLearnerNode) => {
                    if let Ok(m) = postcard::from_bytes::<Member>(&cc.context) {
                        members.insert(ch.node_id, m);
                    }
                }
                Some(ConfChangeType::RemoveNode) => {
                    members.remove(&ch.node_id);
                }
                None => {}
            }
        }
        let now = ids(&cs);
        members.retain(|id, _| now.contains(id));
        self.shared.set_members(members.clone());
        self.links.retain(|id| members.contains_key(&id));
        let membership = membership_of(&cs, &members);
        tracing::info!(group = %self.shared.cfg.group, index, voters = ?membership.voters.keys().collect::<Vec<_>>(), learners = ?membership.learners.keys().collect::<Vec<_>>(), "membership changed");
        self.history.push(ConfPoint {
            index,
            conf_state: cs,
            members,
        });
        let _ = self.events.send(Event::Membership {
            index,
            term,
            membership: membership.clone(),
        });
        if mine {
            if let Some(p) = self.pending_conf.take() {
                let _ = p.reply.send(Ok(membership));
            }
        }
        Ok(())
    }

    /// Publishes the lease's end when it changed: to the group's handle and
    /// to the sink (the keeper).
    fn publish_lease(&mut self) {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        self.lease.handle_voters(&cs.voters, &cs.voters_outgoing);
        let until = self.lease.poll_expiry().unwrap_or(0);
        let told = self.lease_told;
        // The group's handle and the keeper see the same end: the daemon
        // never serves on a lease the keeper has fenced already.
        if until == told
            || (until != 0 && told != 0 && until > told && until - told < LEASE_TOLD_STEP)
        {
            return;
        }
        self.lease_told = until;
        self.shared.lease_until.store(until, Ordering::Release);
        let sink = self
            .shared
            .lease_sink
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = sink.as_ref() {
            sink(until);
        }
    }

    fn after_round(&mut self) {
        let leader = self.raw.raft.leader_id;
        let is_me = self.is_leader();
        if (leader, is_me) != self.seen {
            let became_leader = is_me && !self.seen.1;
            self.seen = (leader, is_me);
            self.lease.handle_leading(is_me);
            if became_leader {
                // A lease at once: heartbeats now, not at the next tick.
                self.raw.ping();
                self.ready();
            }
            tracing::info!(group = %self.shared.cfg.group, id = self.shared.id, leader, term = self.raw.raft.term, is_me, "leadership");
            let _ = self.events.send(Event::Leader(Leadership {
                leader: self.leader(),
                term: self.raw.raft.term,
                is_me,
            }));
            if !is_me {
                if let Some(p) = self.pending_conf.take() {
                    let _ = p.reply.send(Err(ChangeError::Superseded));
                }
            }
            self.snapshot_asked = None;
        }
        if let Some(t) = &self.pending_transfer {
            let done = leader == t.to;
            if done || Instant::now() >= t.until {
                if let Some(t) = self.pending_transfer.take() {
                    let r = if done {
                        Ok(())
                    } else {
                        Err(TransferError::TimedOut(t.to))
                    };
                    let _ = t.reply.send(r);
                }
            }
        }
        if let Some(for_node) = self.raw.store().take_wanted() {
            if self
                .snapshot_asked
                .is_none_or(|at| at.elapsed() >= ASK_AGAIN)
            {
                self.snapshot_asked = Some(Instant::now());
                let _ = self.events.send(Event::SnapshotWanted { for_node });
            }
        }
        self.publish_lease();
    }
}
