//! Each service's replicated log on this node: its raft group, who the
//! group's members are across restarts, and what `ctl status` shows of it.
//!
//! This is the first step of replicated services: the group runs on every
//! node of the cluster and keeps its membership right, but carries no
//! client data yet, and the service's primary is still chosen as before.
//!
//! # Founding or joining
//!
//! The log lives in memory, so a node that starts cannot rejoin under a
//! raft id it used before (see [`crate::raft`]). At start it asks its
//! peers what they know of the group:
//! - if one of them belongs to a group that has had a leader, it joins:
//!   a fresh id, a learner first ([`RaftGroup::join`]), added by the
//!   leader when asked ([`PeerRequest::LogJoin`]), promoted once caught up;
//!   the leader then removes the node's earlier incarnation;
//! - it founds the group, with every configured node as a founding voter
//!   (ids from the order of `[peers]`), only when no formed group can be
//!   alive: every peer answered that it has none (or only one still
//!   forming), or enough of them did that, with this node, they are a
//!   majority of `[peers]` (a group needs a majority to have a leader).
//!   A founding node that has never seen a leader has decided nothing yet,
//!   so nodes founding at the same time is the normal start of a cluster;
//! - otherwise (peers unreachable, no majority heard) it asks again.
//!
//! Known limits of an in-memory log: a founder that crashes and restarts
//! before the group ever had a leader founds again under its old id (it
//! could vote twice in that first term); and a group that lost a majority
//! of its voters' state (say one founder never started and another
//! restarted) has no leader to add anyone, until an operator steps in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::control::{PeerReply, PeerRequest};
use crate::peer::PeerAuth;
use crate::raft::{
    ChangeError, Event, GroupConfig, Member, Membership, RaftGroup, RaftId, Role, StartError,
    Status,
};

/// How often the leader looks for learners to promote and old
/// incarnations to remove.
const MAINTAIN_EVERY: Duration = Duration::from_millis(200);
/// How long a starting node waits for each peer's view of the group.
const ASK_TIMEOUT: Duration = Duration::from_millis(800);
/// Pause between two rounds of asking, while the answers decide nothing.
const ASK_AGAIN: Duration = Duration::from_millis(300);

/// What a node knows of a service's group (the answer to
/// [`PeerRequest::LogMembers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupView {
    /// No group here.
    None,
    /// Founded here, never had a leader: nothing decided yet.
    Forming,
    /// A group that has had a leader: join it.
    Formed {
        members: BTreeMap<RaftId, Member>,
        leader: Option<RaftId>,
    },
}

/// The log as this node sees it, for `ctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStatus {
    /// This node's raft id in the group (new at every start).
    pub raft_id: RaftId,
    /// The service's role here: `primary`, `clone` or `catching_up` for a
    /// replicated service; `primary` or `standby` for one that is not.
    pub role: String,
    /// In the log: `leader`, `follower`, `candidate` or `learner`.
    pub raft_role: String,
    /// The node the group's leader runs on, if known.
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// A replicated service's state digest at `applied_index` (hex).
    pub state_digest: Option<String>,
    /// A replicated service's primary: client bytes its kernel handed up
    /// that differ from the log's (0 unless something is badly wrong).
    pub stream_mismatches: Option<u64>,
    /// A replicated service's primary: captured segments dropped as
    /// malformed.
    pub malformed_dropped: Option<u64>,
    /// Members' node names.
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// A replicated service: this node's latest takeover as primary.
    pub last_takeover: Option<crate::replicated::Takeover>,
    /// A replicated service: times this node stopped serving because its
    /// lease ended while it still led (it was stopped, cut off, or late).
    pub lease_lapses: Option<u64>,
}

/// Applied state, kept from the group's events.
#[derive(Debug, Default)]
struct Applied {
    index: u64,
    ever_led: bool,
}

/// New members and the earlier incarnations of their nodes that they
/// replace, as the node that added them knows it.
type Replacing = Arc<Mutex<BTreeMap<RaftId, Vec<RaftId>>>>;

/// A service's log on this node.
pub struct ServiceLog {
    group: Arc<RaftGroup>,
    applied: Arc<Mutex<Applied>>,
    replacing: Replacing,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why a service's log could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceLogError {
    #[error("service {service}: starting its log: {source}")]
    Start {
        service: String,
        #[source]
        source: StartError,
    },
    #[error("service {service}: this node is not in [peers]")]
    NotAPeer { service: String },
}

impl ServiceLog {
    /// Starts `service`'s log here: founds the group or joins it (see the
    /// module docs).
    /// With `sink`, every event of the group goes on to it (a replicated
    /// service applies them); without, the log only keeps its index.
    pub async fn start(
        cfg: &NodeConfig,
        auth: Arc<PeerAuth>,
        service: &str,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<ServiceLog, ServiceLogError> {
        let founders: BTreeMap<RaftId, Member> = cfg
            .peers
            .iter()
            .enumerate()
            .map(|(i, (name, addr))| {
                (
                    i as RaftId + 1,
                    Member {
                        name: name.clone(),
                        addr: *addr,
                    },
                )
            })
            .collect();
        let my_founding_id = founders
            .iter()
            .find(|(_, m)| m.name == cfg.node)
            .map(|(id, _)| *id)
            .ok_or_else(|| ServiceLogError::NotAPeer {
                service: service.to_owned(),
            })?;
        let mut group_cfg = GroupConfig::new(service);
        group_cfg.tick = cfg.raft_tick;
        group_cfg.election_ticks = cfg.election_ticks();
        let formed = loop {
            match decide(cfg, &auth, service).await {
                Decision::Join(members, leader) => break Some((members, leader)),
                Decision::Found => break None,
                Decision::Wait => tokio::time::sleep(ASK_AGAIN).await,
            }
        };
        let start_err = |source| ServiceLogError::Start {
            service: service.to_owned(),
            source,
        };
        let (group, events, joining) = match formed {
            Some((members, leader)) => {
                let (group, events) =
                    RaftGroup::join(group_cfg, Some(auth.clone()), members.clone())
                        .map_err(start_err)?;
                tracing::info!(service, raft_id = group.id(), "joining the service's log");
                (group, events, Some((members, leader)))
            }
            None => {
                let (group, events) =
                    RaftGroup::found(group_cfg, Some(auth.clone()), my_founding_id, founders)
                        .map_err(start_err)?;
                tracing::info!(service, raft_id = group.id(), "founding the service's log");
                (group, events, None)
            }
        };
        let group = Arc::new(group);
        // A joiner's group has had a leader: it says Formed at once.
        let applied = Arc::new(Mutex::new(Applied {
            index: 0,
            ever_led: joining.is_some(),
        }));
        let mut tasks = vec![tokio::spawn(follow(
            group.clone(),
            events,
            applied.clone(),
            service.to_owned(),
            sink,
        ))];
        let replacing = Replacing::default();
        tasks.push(tokio::spawn(maintain(
            group.clone(),
            replacing.clone(),
            service.to_owned(),
        )));
        if let Some((members, leader)) = joining {
            tasks.push(tokio::spawn(ask_to_join(
                auth,
                group.id(),
                service.to_owned(),
                members,
                leader,
            )));
        }
        Ok(ServiceLog {
            group,
            applied,
            replacing,
            tasks,
        })
    }

    /// The raft group, to serve the connections peers open for it.
    pub fn group(&self) -> &Arc<RaftGroup> {
        &self.group
    }

    /// What this node knows of the group, for a peer that starts.
    pub async fn view(&self) -> GroupView {
        if !self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ever_led
        {
            return GroupView::Forming;
        }
        match self.group.status().await {
            Some(s) => GroupView::Formed {
                members: all_members(&s.membership),
                leader: s.leader,
            },
            None => GroupView::None,
        }
    }

    /// The log as this node sees it.
    pub async fn status(&self) -> Option<LogStatus> {
        let s = self.group.status().await?;
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner()).index;
        Some(log_status(&s, applied))
    }

    /// Adds a node that started and asks to join, as a learner. Only the
    /// leader can; `name` is the node its key authenticated.
    pub async fn add_joiner(&self, id: RaftId, name: &str, cfg: &NodeConfig) -> Result<(), String> {
        let addr = cfg
            .peers
            .get(name)
            .copied()
            .ok_or_else(|| format!("{name} is not in [peers]"))?;
        if id < crate::raft::FIRST_JOINED_ID {
            return Err(format!(
                "{id} is a founding id: a joining node draws a new one"
            ));
        }
        let earlier: Vec<RaftId> = self
            .group
            .status()
            .await
            .map(|s| {
                all_members(&s.membership)
                    .into_iter()
                    .filter(|(old, m)| m.name == name && *old != id)
                    .map(|(old, _)| old)
                    .collect()
            })
            .unwrap_or_default();
        match self
            .group
            .add_learner(
                id,
                Member {
                    name: name.to_owned(),
                    addr,
                },
            )
            .await
        {
            Ok(_) => {}
            // An earlier answer got lost on the way: it is in already.
            Err(ChangeError::AlreadyMember(m)) if m == id => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        if !earlier.is_empty() {
            self.replacing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, earlier);
        }
        Ok(())
    }
}

impl Drop for ServiceLog {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn all_members(m: &Membership) -> BTreeMap<RaftId, Member> {
    m.voters
        .iter()
        .chain(&m.learners)
        .map(|(id, member)| (*id, member.clone()))
        .collect()
}

fn log_status(s: &Status, applied: u64) -> LogStatus {
    let name_of = |id: RaftId| {
        s.membership
            .voters
            .get(&id)
            .or_else(|| s.membership.learners.get(&id))
            .map(|m| m.name.clone())
    };
    let role = if s.membership.learners.contains_key(&s.id) {
        "learner"
    } else {
        match s.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate | Role::PreCandidate => "candidate",
        }
    };
    LogStatus {
        raft_id: s.id,
        role: String::new(),
        raft_role: role.to_owned(),
        leader: s.leader.and_then(name_of),
        term: s.term,
        commit_index: s.commit_index,
        // Entries without data (a new leader's empty entry) count as
        // applied once the group hands them over.
        applied_index: applied.max(s.applied_index),
        state_digest: None,
        stream_mismatches: None,
        last_takeover: None,
        lease_lapses: None,
        malformed_dropped: None,
        voters: s
            .membership
            .voters
            .values()
            .map(|m| m.name.clone())
            .collect(),
        learners: s
            .membership
            .learners
            .values()
            .map(|m| m.name.clone())
            .collect(),
    }
}

/// What a starting node does about a service's log.
enum Decision {
    Join(BTreeMap<RaftId, Member>, Option<RaftId>),
    Found,
    Wait,
}

/// Asks every peer what it knows of the group (see the module docs).
async fn decide(cfg: &NodeConfig, auth: &PeerAuth, service: &str) -> Decision {
    let request = PeerRequest::LogMembers {
        service: service.to_owned(),
    };
    let asks = cfg
        .peers
        .keys()
        .filter(|p| **p != cfg.node)
        .map(|peer| crate::daemon::ask_peer(auth, peer, &request, ASK_TIMEOUT));
    let answers = futures::future::join_all(asks).await;
    let mut without = 1; // this node
    for answer in answers {
        match answer {
            Ok(PeerReply::Log(GroupView::Formed { members, leader })) => {
                return Decision::Join(members, leader)
            }
            Ok(PeerReply::Log(GroupView::None | GroupView::Forming)) => without += 1,
            _ => {}
        }
    }
    if without == cfg.peers.len() || without * 2 > cfg.peers.len() {
        Decision::Found
    } else {
        Decision::Wait
    }
}

/// Keeps the applied index from the group's events.
async fn follow(
    group: Arc<RaftGroup>,
    mut events: crate::raft::Events,
    applied: Arc<Mutex<Applied>>,
    service: String,
    sink: Option<mpsc::UnboundedSender<Event>>,
) {
    while let Some(event) = events.recv().await {
        if let Some(sink) = &sink {
            if let Event::Leader(l) = &event {
                applied.lock().unwrap_or_else(|e| e.into_inner()).ever_led |= l.leader.is_some();
            }
            let index = match &event {
                Event::Committed(c) => Some(c.index),
                Event::Membership { index, .. }
                | Event::Snapshot { index, .. }
                | Event::LeaderEntry { index, .. } => Some(*index),
                _ => None,
            };
            if let Some(index) = index {
                applied.lock().unwrap_or_else(|e| e.into_inner()).index = index;
            }
            if sink.send(event).is_err() {
                return;
            }
            continue;
        }
        let applied_now = |f: &dyn Fn(&mut Applied)| {
            f(&mut applied.lock().unwrap_or_else(|e| e.into_inner()));
        };
        match event {
            Event::Committed(c) => applied_now(&|a| a.index = c.index),
            Event::Membership { index, .. } | Event::LeaderEntry { index, .. } => {
                applied_now(&|a| a.index = index)
            }
            Event::Snapshot { index, .. } => applied_now(&|a| a.index = index),
            Event::Leader(l) => {
                applied_now(&|a| a.ever_led |= l.leader.is_some());
                tracing::debug!(service, leader = ?l.leader, term = l.term, is_me = l.is_me, "log leader");
            }
            Event::SnapshotWanted { .. } => {
                // The log carries no application state yet: a snapshot is
                // the applied index alone.
                let index = applied.lock().unwrap_or_else(|e| e.into_inner()).index;
                if let Err(e) = group.compact(index, Vec::new()).await {
                    tracing::debug!(service, error = %e, "compacting for a new member");
                }
            }
            Event::Stopped(e) => {
                tracing::error!(service, error = %e, "the service's log stopped");
                return;
            }
        }
    }
}

/// On the leader: promotes learners once caught up, then removes the
/// earlier incarnations of their nodes. One change at a time. Without a
/// record of who replaces whom (the leader changed since the join), a
/// founding id whose node has a joined id too is the earlier one.
async fn maintain(group: Arc<RaftGroup>, replacing: Replacing, service: String) {
    loop {
        tokio::time::sleep(MAINTAIN_EVERY).await;
        let Some(s) = group.status().await else {
            continue;
        };
        if s.role != Role::Leader {
            continue;
        }
        let members = all_members(&s.membership);
        let mut stale: Vec<RaftId> = Vec::new();
        {
            let mut r = replacing.lock().unwrap_or_else(|e| e.into_inner());
            r.retain(|new, olds| {
                olds.retain(|old| members.contains_key(old));
                members.contains_key(new) && !olds.is_empty()
            });
            for (new, olds) in r.iter() {
                if s.membership.voters.contains_key(new) {
                    stale.extend(olds.iter().copied());
                }
            }
        }
        for (id, m) in &s.membership.voters {
            let newer = s
                .membership
                .voters
                .iter()
                .any(|(other, o)| o.name == m.name && *other >= crate::raft::FIRST_JOINED_ID);
            if *id < crate::raft::FIRST_JOINED_ID && newer {
                stale.push(*id);
            }
        }
        stale.retain(|id| *id != s.id);
        // Learners that are earlier incarnations go first (they never
        // count toward the quorum), then voters.
        stale.sort_by_key(|id| !s.membership.learners.contains_key(id));
        if let Some(id) = stale.first().copied() {
            match group.remove(id).await {
                Ok(_) => tracing::info!(service, raft_id = id, "removed an earlier incarnation"),
                Err(e) => tracing::debug!(service, raft_id = id, error = %e, "not removed yet"),
            }
            continue;
        }
        let learners: Vec<RaftId> = s
            .membership
            .learners
            .keys()
            .copied()
            .filter(|id| !stale.contains(id))
            .collect();
        for id in learners {
            // Refused until the learner has every committed entry.
            if group.promote(id).await.is_ok() {
                tracing::info!(service, raft_id = id, "promoted a caught-up learner");
                break;
            }
        }
    }
}

/// Asks the group's leader to add this new member, until one does.
async fn ask_to_join(
    auth: Arc<PeerAuth>,
    id: RaftId,
    service: String,
    members: BTreeMap<RaftId, Member>,
    leader: Option<RaftId>,
) {
    let mut names: Vec<String> = members.values().map(|m| m.name.clone()).collect();
    names.sort();
    names.dedup();
    if let Some(l) = leader.and_then(|l| members.get(&l)) {
        names.retain(|n| *n != l.name);
        names.insert(0, l.name.clone());
    }
    names.retain(|n| n != auth.node());
    let mut wait = Duration::from_millis(50);
    loop {
        for name in &names {
            let answer = crate::daemon::ask_peer(
                &auth,
                name,
                &PeerRequest::LogJoin {
                    service: service.clone(),
                    raft_id: id,
                },
                ASK_TIMEOUT,
            )
            .await;
            if matches!(answer, Ok(PeerReply::Joined)) {
                tracing::info!(service, raft_id = id, via = %name, "added to the service's log");
                return;
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}
