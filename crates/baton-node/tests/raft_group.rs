//! Raft groups for real: several groups in one process, each with its own
//! listener on 127.0.0.1 and, unless a test says otherwise, authenticated
//! with node keys and a cluster key, talking over loopback TCP. Each node
//! runs a small application that keeps every committed entry, so tests
//! compare what every node applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use baton_lab::Deadline;
use baton_node::peer::{keys, ControlStream, KernelSettings, PeerAuth, Secret};
use baton_node::raft::transport::{self, Channel, ChannelHello};
use baton_node::raft::{
    ChangeError, Event, GroupConfig, GroupError, Member, Membership, ProposeError, Proposed,
    RaftGroup, RaftId, Role, TransferError, FIRST_JOINED_ID,
};
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const GROUP: &str = "kv";

/// What a node's application saw.
#[derive(Default)]
struct App {
    /// Committed entries, in the order applied.
    entries: Vec<(u64, Vec<u8>)>,
    applied: u64,
    membership: Option<Membership>,
    snapshots_installed: usize,
    /// Entries applied after the last snapshot installed.
    entries_after_snapshot: usize,
    /// An index that did not grow: never expected.
    out_of_order: Vec<u64>,
    stopped: Option<GroupError>,
}

fn encode_state(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    postcard::to_allocvec(entries).unwrap()
}

/// The application: applies events in order; answers snapshot requests
/// with its state.
async fn run_app(
    mut events: baton_node::raft::Events,
    app: Arc<Mutex<App>>,
    group: Weak<RaftGroup>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Committed(c) => {
                let mut a = app.lock().unwrap();
                if c.index <= a.applied {
                    a.out_of_order.push(c.index);
                }
                a.applied = c.index;
                a.entries.push((c.index, c.data));
                a.entries_after_snapshot += 1;
            }
            Event::Membership {
                index, membership, ..
            } => {
                let mut a = app.lock().unwrap();
                if index <= a.applied {
                    a.out_of_order.push(index);
                }
                a.applied = index;
                a.membership = Some(membership);
            }
            Event::Snapshot {
                index,
                data,
                membership,
                ..
            } => {
                let mut a = app.lock().unwrap();
                a.entries = postcard::from_bytes(&data).unwrap();
                a.applied = index;
                a.membership = Some(membership);
                a.snapshots_installed += 1;
                a.entries_after_snapshot = 0;
            }
            Event::SnapshotWanted { .. } => {
                let (applied, state) = {
                    let a = app.lock().unwrap();
                    (a.applied, encode_state(&a.entries))
                };
                if let Some(g) = group.upgrade() {
                    if let Err(e) = g.compact(applied, state).await {
                        eprintln!("compaction asked for, refused: {e}");
                    }
                }
            }
            Event::LeaderEntry { index, .. } => {
                let mut a = app.lock().unwrap();
                if index <= a.applied {
                    a.out_of_order.push(index);
                }
                a.applied = index;
            }
            Event::Leader(_) => {}
            Event::Stopped(e) => app.lock().unwrap().stopped = Some(e),
        }
    }
}

struct Node {
    name: String,
    addr: SocketAddr,
    auth: Option<Arc<PeerAuth>>,
    slot: Arc<Mutex<Option<Arc<RaftGroup>>>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    app: Arc<Mutex<App>>,
}

impl Node {
    fn group(&self) -> Arc<RaftGroup> {
        self.slot.lock().unwrap().clone().expect("node is running")
    }

    fn running(&self) -> bool {
        self.slot.lock().unwrap().is_some()
    }

    fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            addr: self.addr,
        }
    }

    fn entries(&self) -> Vec<(u64, Vec<u8>)> {
        self.app.lock().unwrap().entries.clone()
    }
}

/// Nodes n0..n{slots-1}: listeners bound and keys made for all, groups
/// started by the test.
struct Cluster {
    nodes: Vec<Node>,
    cfg: GroupConfig,
}

/// What the listener does with a connection: authenticate (when the node
/// has credentials), then hand it to the group, as the daemon does.
async fn listen(
    listener: TcpListener,
    auth: Option<Arc<PeerAuth>>,
    slot: Arc<Mutex<Option<Arc<RaftGroup>>>>,
) {
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            return;
        };
        let auth = auth.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let (stream, name) = match &auth {
                Some(auth) => match auth.accept(tcp, from).await {
                    Some((s, name)) => (ControlStream::Authenticated(Box::new(s)), Some(name)),
                    None => return,
                },
                None => (ControlStream::Plain(tcp), None),
            };
            let group = slot.lock().unwrap().clone();
            if let Some(group) = group {
                let _ = group.serve(stream, name).await;
            }
        });
    }
}

impl Cluster {
    async fn new(slots: usize, authenticated: bool, cfg: GroupConfig) -> Cluster {
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        let psk = Secret::random().unwrap();
        let mut secrets = Vec::new();
        for i in 0..slots {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (private, public) = keys::generate_node_key().unwrap();
            peers.insert(format!("n{i}"), (l.local_addr().unwrap(), public));
            listeners.push(l);
            secrets.push(private);
        }
        let mut nodes = Vec::new();
        for (i, (l, private)) in listeners.into_iter().zip(secrets).enumerate() {
            let name = format!("n{i}");
            let addr = l.local_addr().unwrap();
            let auth = authenticated.then(|| {
                Arc::new(PeerAuth::new(
                    name.clone(),
                    private,
                    psk.clone(),
                    peers.clone(),
                    KernelSettings::default(),
                ))
            });
            let slot = Arc::new(Mutex::new(None));
            let listener = tokio::spawn(listen(l, auth.clone(), slot.clone()));
            nodes.push(Node {
                name,
                addr,
                auth,
                slot,
                listener: Mutex::new(Some(listener)),
                app: Arc::new(Mutex::new(App::default())),
            });
        }
        Cluster { nodes, cfg }
    }

    fn install(&self, i: usize, group: RaftGroup, events: baton_node::raft::Events) {
        let group = Arc::new(group);
        let node = &self.nodes[i];
        *node.app.lock().unwrap() = App::default();
        tokio::spawn(run_app(events, node.app.clone(), Arc::downgrade(&group)));
        *node.slot.lock().unwrap() = Some(group);
    }

    /// Founds the group on nodes `0..n`, with raft ids 1..=n.
    fn found(&self, n: usize) {
        let voters: BTreeMap<RaftId, Member> = (0..n)
            .map(|i| (i as RaftId + 1, self.nodes[i].member()))
            .collect();
        for i in 0..n {
            let (g, ev) = RaftGroup::found(
                self.cfg.clone(),
                self.nodes[i].auth.clone(),
                i as RaftId + 1,
                voters.clone(),
            )
            .unwrap();
            self.install(i, g, ev);
        }
    }

    /// Starts node `i` as a new member (not yet added); its raft id.
    fn join(&self, i: usize, members: BTreeMap<RaftId, Member>) -> RaftId {
        let (g, ev) =
            RaftGroup::join(self.cfg.clone(), self.nodes[i].auth.clone(), members).unwrap();
        let id = g.id();
        self.install(i, g, ev);
        id
    }

    /// Stops node `i` as a crash would: its listener closes and its group
    /// (threads, connections) goes.
    async fn stop(&self, i: usize) {
        let listener = self.nodes[i].listener.lock().unwrap().take();
        if let Some(l) = listener {
            l.abort();
            let _ = l.await;
        }
        let g = self.nodes[i].slot.lock().unwrap().take();
        if let Some(g) = g {
            // Connections being handed over hold the group for a moment.
            while Arc::strong_count(&g) > 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(g);
        }
    }

    /// Listens again on node `i`'s address, as a restarted node would.
    async fn relisten(&self, i: usize) {
        let n = &self.nodes[i];
        let l = loop {
            match TcpListener::bind(n.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let task = tokio::spawn(listen(l, n.auth.clone(), n.slot.clone()));
        *n.listener.lock().unwrap() = Some(task);
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.running())
    }

    /// The running node that leads, once every running node agrees.
    async fn leader(&self) -> usize {
        loop {
            let mut leaders = BTreeSet::new();
            let mut agreed = BTreeSet::new();
            for (i, n) in self.running() {
                if let Some(s) = n.group().status().await {
                    if s.role == Role::Leader {
                        leaders.insert(i);
                    }
                    if let Some(l) = s.leader {
                        agreed.insert(l);
                    }
                }
            }
            if leaders.len() == 1 && agreed.len() == 1 {
                return *leaders.iter().next().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn index_of(&self, id: RaftId) -> usize {
        self.running()
            .find(|(_, n)| n.group().id() == id)
            .map(|(i, _)| i)
            .expect("a running node with that id")
    }

    /// Proposes every payload, retrying those refused while leadership
    /// moves; returns what each was appended as.
    async fn propose_all(&self, payloads: Vec<Vec<u8>>) -> Vec<(Proposed, Vec<u8>)> {
        let mut todo = payloads;
        let mut done = Vec::new();
        while !todo.is_empty() {
            let leader = self.nodes[self.leader().await].group();
            let results =
                futures::future::join_all(todo.iter().map(|d| leader.propose(d.clone()))).await;
            let mut again = Vec::new();
            for (d, r) in todo.into_iter().zip(results) {
                match r {
                    Ok(p) => done.push((p, d)),
                    Err(
                        ProposeError::NotLeader { .. }
                        | ProposeError::Transferring
                        | ProposeError::Overloaded,
                    ) => again.push(d),
                    Err(e) => panic!("proposal refused: {e}"),
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            todo = again;
        }
        done
    }

    /// Waits until every running node applied `count` entries, the same
    /// ones in the same order; returns them.
    async fn converged(&self, count: usize) -> Vec<(u64, Vec<u8>)> {
        loop {
            let all: Vec<Vec<(u64, Vec<u8>)>> = self.running().map(|(_, n)| n.entries()).collect();
            if all.iter().all(|e| e.len() >= count) && all.windows(2).all(|w| w[0] == w[1]) {
                for (i, n) in self.running() {
                    let a = n.app.lock().unwrap();
                    assert!(
                        a.out_of_order.is_empty(),
                        "n{i} applied out of order: {:?}",
                        a.out_of_order
                    );
                    assert!(a.stopped.is_none(), "n{i} stopped: {:?}", a.stopped);
                }
                return all.into_iter().next().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            if let Some(l) = n.listener.lock().unwrap().take() {
                l.abort();
            }
            let g = n.slot.lock().unwrap().take();
            drop(g);
        }
    }
}

fn payloads(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{tag}-{i:06}").into_bytes())
        .collect()
}

/// Every payload committed, each proposal's (index, term) holding it.
fn check_committed(log: &[(u64, Vec<u8>)], proposed: &[(Proposed, Vec<u8>)], wanted: &[Vec<u8>]) {
    let have: BTreeSet<&Vec<u8>> = log.iter().map(|(_, d)| d).collect();
    for w in wanted {
        assert!(
            have.contains(w),
            "{:?} never committed",
            String::from_utf8_lossy(w)
        );
    }
    let at: BTreeMap<u64, &Vec<u8>> = log.iter().map(|(i, d)| (*i, d)).collect();
    let mut mine = 0;
    for (p, d) in proposed {
        if at.get(&p.index) == Some(&d) {
            mine += 1;
        }
    }
    // A proposal appended by a leader that then lost its term may be
    // replaced; with a stable leader every one is at its index.
    assert!(
        mine * 10 >= proposed.len() * 9,
        "only {mine} of {} proposals at their index",
        proposed.len()
    );
}

fn test_config() -> GroupConfig {
    GroupConfig::new(GROUP)
}

/// Four times the default election timeout: membership and transfer tests
/// must not see an election because the machine is busy.
fn patient_config() -> GroupConfig {
    let mut c = GroupConfig::new(GROUP);
    c.election_ticks = 20;
    c.heartbeat_ticks = 2;
    c
}

async fn eventually<F: FnMut() -> bool>(what: &str, limit: Duration, mut f: F) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn ten_thousand_proposals_commit_in_the_same_order_on_every_node() {
    let d = Deadline::start("ten_thousand_proposals", Duration::from_secs(120));
    let c = Cluster::new(3, true, test_config()).await;
    c.found(3);
    d.phase("electing");
    let l = c.leader().await;
    d.phase("proposing 10,000");
    let wanted = payloads("p", 10_000);
    let proposed = c.propose_all(wanted.clone()).await;
    d.phase("waiting for every node to apply 10,000");
    let log = c.converged(10_000).await;
    check_committed(&log, &proposed, &wanted);
    let leader = c.nodes[c.leader().await].group();
    let counters = leader.counters();
    let batch = counters
        .max_proposal_batch
        .load(std::sync::atomic::Ordering::Relaxed);
    let rounds = counters
        .ready_rounds
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("leader n{l}: largest batch {batch} proposals in one Ready, {rounds} Ready rounds");
    assert!(
        batch > 1,
        "proposals queued together go into one Ready round"
    );
    for (i, n) in c.running() {
        assert_eq!(n.group().counters().refused(), 0, "n{i} refused something");
    }
}

#[tokio::test]
async fn plain_tcp_groups_replicate_too() {
    let d = Deadline::start("plain_tcp_groups", Duration::from_secs(60));
    let c = Cluster::new(3, false, test_config()).await;
    c.found(3);
    d.phase("proposing");
    let wanted = payloads("plain", 500);
    let proposed = c.propose_all(wanted.clone()).await;
    let log = c.converged(500).await;
    check_committed(&log, &proposed, &wanted);
}

#[tokio::test]
async fn a_new_leader_takes_over_when_the_leader_stops() {
    let d = Deadline::start("leader_stops", Duration::from_secs(120));
    let mut took = Vec::new();
    for round in 0..5 {
        d.phase(format!("round {round}: electing"));
        let c = Cluster::new(3, true, test_config()).await;
        c.found(3);
        let old = c.leader().await;
        let before = c.propose_all(payloads("before", 100)).await;
        c.converged(100).await;
        // A steady state: the followers have heard the latest heartbeat.
        tokio::time::sleep(Duration::from_millis(30)).await;
        d.phase(format!("round {round}: leader n{old} stopped"));
        let stopped = Instant::now();
        c.stop(old).await;
        let new = c.leader().await;
        let elapsed = stopped.elapsed();
        assert_ne!(new, old);
        took.push(elapsed);
        d.phase(format!("round {round}: proposing on n{new}"));
        let after = c.propose_all(payloads("after", 100)).await;
        let log = c.converged(200).await;
        let mut all = before;
        all.extend(after);
        let wanted: Vec<Vec<u8>> = payloads("before", 100)
            .into_iter()
            .chain(payloads("after", 100))
            .collect();
        check_committed(&log, &all, &wanted);
    }
    took.sort();
    eprintln!(
        "leader stopped → new leader agreed by the survivors (default timing: tick {:?}, election timeout {:?}): {:?}",
        test_config().tick,
        test_config().election_timeout(),
        took
    );
}

#[tokio::test]
async fn a_new_member_catches_up_from_a_snapshot_and_the_quorum_is_kept() {
    let d = Deadline::start("membership", Duration::from_secs(120));
    let c = Cluster::new(4, true, patient_config()).await;
    c.found(3);
    d.phase("first entries");
    c.propose_all(payloads("a", 300)).await;
    c.converged(300).await;

    d.phase("compacting every log");
    for (i, n) in c.running() {
        let (applied, state) = {
            let a = n.app.lock().unwrap();
            (a.applied, encode_state(&a.entries))
        };
        n.group().compact(applied, state).await.unwrap();
        let s = n.group().status().await.unwrap();
        assert_eq!(s.snapshot_index, applied, "n{i} compacted");
    }
    c.propose_all(payloads("b", 100)).await;
    c.converged(400).await;

    d.phase("a new node joins as a learner");
    let l = c.leader().await;
    let leader = c.nodes[l].group();
    let members = leader.status().await.unwrap().membership.voters;
    let new_id = c.join(3, members);
    assert!(new_id >= FIRST_JOINED_ID, "a joining node has a fresh id");
    let m = leader
        .add_learner(new_id, c.nodes[3].member())
        .await
        .unwrap();
    assert!(m.learners.contains_key(&new_id));
    assert_eq!(m.voters.len(), 3);
    assert_eq!(
        leader.add_learner(new_id, c.nodes[3].member()).await,
        Err(ChangeError::AlreadyMember(new_id))
    );

    d.phase("the learner installs a snapshot");
    let app3 = c.nodes[3].app.clone();
    eventually("the learner's snapshot", Duration::from_secs(20), || {
        app3.lock().unwrap().snapshots_installed > 0
    })
    .await;
    d.phase("then the log tail");
    c.propose_all(payloads("c", 200)).await;
    let log = c.converged(600).await;
    assert_eq!(log.len(), 600);
    {
        let a = app3.lock().unwrap();
        assert!(
            a.entries_after_snapshot >= 200,
            "the tail came from the log: {}",
            a.entries_after_snapshot
        );
    }
    assert!(
        leader
            .counters()
            .snapshots_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(
        c.nodes[3]
            .group()
            .counters()
            .snapshots_received
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    d.phase("promotion");
    let m = loop {
        match leader.promote(new_id).await {
            Ok(m) => break m,
            Err(ChangeError::NotCaughtUp { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("promotion refused: {e}"),
        }
    };
    assert!(m.voters.contains_key(&new_id));
    assert_eq!(m.voters.len(), 4);
    eventually(
        "the new voter sees itself a voter",
        Duration::from_secs(10),
        || {
            app3.lock()
                .unwrap()
                .membership
                .as_ref()
                .is_some_and(|m| m.voters.contains_key(&new_id))
        },
    )
    .await;

    d.phase("one change at a time");
    let followers: Vec<RaftId> = m
        .voters
        .keys()
        .copied()
        .filter(|id| *id != leader.id() && *id != new_id)
        .collect();
    let (f1, f2) = (followers[0], followers[1]);
    // A change asked for while another is pending is refused. Two
    // learners are asked for at once; when the first commits before the
    // second reaches the log's thread (it runs on its own, and may be
    // quicker than this one), both are removed and it is tried again.
    let unreachable = |id: RaftId| Member {
        name: format!("x{id}"),
        addr: "127.0.0.1:9".parse().unwrap(),
    };
    let mut refused = false;
    for i in 0..20 {
        let (x, y) = (
            FIRST_JOINED_ID + 1000 + 2 * i,
            FIRST_JOINED_ID + 1001 + 2 * i,
        );
        let (a, b) = tokio::join!(
            leader.add_learner(x, unreachable(x)),
            leader.add_learner(y, unreachable(y))
        );
        a.unwrap();
        leader.remove(x).await.unwrap();
        match b {
            Err(ChangeError::Pending) => {
                refused = true;
                break;
            }
            Ok(_) => {
                leader.remove(y).await.unwrap();
            }
            Err(e) => panic!("a second change: {e}"),
        }
    }
    assert!(refused, "a change while one was pending was never refused");
    let m = leader.remove(f1).await.unwrap();
    assert!(!m.voters.contains_key(&f1));
    assert_eq!(m.voters.len(), 3);
    c.stop(c.index_of(f1)).await;
    assert_eq!(
        leader.remove(leader.id()).await,
        Err(ChangeError::RemoveLeader)
    );

    d.phase("a change that would lose the quorum");
    c.stop(c.index_of(f2)).await;
    // Past an election timeout: f2 no longer counts as live.
    tokio::time::sleep(patient_config().election_timeout() * 2).await;
    match leader.remove(new_id).await {
        Err(ChangeError::WouldLoseQuorum { live: 1, needed: 2 }) => {}
        other => panic!("removing a live voter beside a dead one: {other:?}"),
    }
    // Removing the dead one keeps a live majority: allowed.
    let m = leader.remove(f2).await.unwrap();
    assert_eq!(
        m.voters.keys().copied().collect::<BTreeSet<_>>(),
        [leader.id(), new_id].into()
    );

    d.phase("the two remaining voters go on");
    c.propose_all(payloads("d", 100)).await;
    c.converged(700).await;
}

#[tokio::test]
async fn a_restarted_node_rejoins_under_a_new_id_and_replaces_its_old_self() {
    use std::sync::atomic::Ordering::Relaxed;
    let d = Deadline::start("restart", Duration::from_secs(120));
    let c = Cluster::new(3, true, patient_config()).await;
    c.found(3);
    c.propose_all(payloads("a", 200)).await;
    c.converged(200).await;
    let l = c.leader().await;
    let leader = c.nodes[l].group();
    let r = (l + 1) % 3;
    let old_id = c.nodes[r].group().id();

    d.phase("a follower restarts: it forgot its log and votes");
    c.stop(r).await;
    c.propose_all(payloads("b", 100)).await;
    let members = leader.status().await.unwrap().membership.voters;
    let new_id = c.join(r, members);
    c.relisten(r).await;
    assert_ne!(new_id, old_id);
    // The leader still sends to the old id: the new incarnation refuses it.
    let counters = c.nodes[r].group().counters().clone();
    eventually(
        "messages for the old id refused",
        Duration::from_secs(10),
        || counters.stale_target.load(Relaxed) > 0,
    )
    .await;

    d.phase("it joins as a learner, catches up, is promoted; its old self goes");
    leader
        .add_learner(new_id, c.nodes[r].member())
        .await
        .unwrap();
    c.converged(300).await;
    loop {
        match leader.promote(new_id).await {
            Ok(_) => break,
            Err(ChangeError::NotCaughtUp { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("promotion refused: {e}"),
        }
    }
    let m = leader.remove(old_id).await.unwrap();
    assert!(m.voters.contains_key(&new_id) && !m.voters.contains_key(&old_id));
    assert_eq!(m.voters.len(), 3);
    c.propose_all(payloads("c", 100)).await;
    let log = c.converged(400).await;
    assert_eq!(log.len(), 400);
    let stale = counters.stale_target.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counters.stale_target.load(Relaxed),
        stale,
        "no one talks to the old id once it is removed"
    );
}

#[tokio::test]
async fn leadership_moves_on_request() {
    let d = Deadline::start("leader_transfer", Duration::from_secs(60));
    let c = Cluster::new(3, true, patient_config()).await;
    c.found(3);
    c.propose_all(payloads("x", 100)).await;
    c.converged(100).await;
    let l = c.leader().await;
    let leader = c.nodes[l].group();
    let target = (l + 1) % 3;
    let target_id = c.nodes[target].group().id();

    d.phase("refusals");
    assert_eq!(
        leader.transfer_leader(leader.id()).await,
        Err(TransferError::ToSelf)
    );
    assert_eq!(
        leader.transfer_leader(77).await,
        Err(TransferError::NotVoter(77))
    );
    assert!(matches!(
        c.nodes[target].group().transfer_leader(leader.id()).await,
        Err(TransferError::NotLeader { .. })
    ));

    d.phase("transfer");
    leader.transfer_leader(target_id).await.unwrap();
    assert_eq!(c.leader().await, target);
    assert!(matches!(
        leader.propose(b"late".to_vec()).await,
        Err(ProposeError::NotLeader { leader: Some(id) }) if id == target_id
    ));
    c.nodes[target]
        .group()
        .propose(b"on the new leader".to_vec())
        .await
        .unwrap();
    let log = c.converged(101).await;
    assert_eq!(log.last().unwrap().1, b"on the new leader");
}

/// Connects to `to` as node `from` (with `from`'s real key) on the raft
/// channel and sends `hello` then `bytes`; returns whether the node
/// closed the connection within the deadline.
async fn hostile(
    c: &Cluster,
    from: usize,
    to: usize,
    channel: Channel,
    hello: &ChannelHello,
    bytes: &[u8],
) -> bool {
    let auth = c.nodes[from].auth.clone().unwrap();
    let mut s = auth.connect(&c.nodes[to].name, None).await.unwrap();
    s.write_all(&transport::hello_frame(channel, hello))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    transport::encode_message(msg, &mut b);
    b
}

#[tokio::test]
async fn messages_claiming_another_sender_or_malformed_are_refused() {
    use std::sync::atomic::Ordering::Relaxed;
    let d = Deadline::start("hostile_messages", Duration::from_secs(60));
    let c = Cluster::new(3, true, test_config()).await;
    c.found(3);
    c.propose_all(payloads("x", 50)).await;
    c.converged(50).await;
    // n0 (raft id 1) attacks n1 (raft id 2) with its own key.
    let victim = c.nodes[1].group();
    let counters = victim.counters().clone();
    let term = victim.status().await.unwrap().term;
    let hello = |from, to| ChannelHello {
        group: GROUP.into(),
        from,
        to,
    };
    let heartbeat = |from, commit| Message {
        msg_type: MessageType::MsgHeartbeat as i32,
        from,
        to: 2,
        term,
        commit,
        ..Default::default()
    };
    let wait = |what: &'static str, which: &'static str, n: u64| {
        let counters = counters.clone();
        async move {
            eventually(what, Duration::from_secs(5), || {
                let v = match which {
                    "wrong_sender" => &counters.wrong_sender,
                    "decode" => &counters.decode_errors,
                    "truncated" => &counters.truncated,
                    "oversize" => &counters.oversize,
                    "stale" => &counters.stale_target,
                    "type" => &counters.refused_type,
                    "commit" => &counters.refused_commit,
                    "group" => &counters.wrong_group,
                    _ => unreachable!(),
                };
                v.load(Relaxed) >= n
            })
            .await
        }
    };

    d.phase("a hello claiming another node's raft id");
    assert!(
        hostile(
            &c,
            0,
            1,
            Channel::Heartbeat,
            &hello(3, 2),
            &frame(&heartbeat(3, 0))
        )
        .await
    );
    wait("wrong sender in the hello", "wrong_sender", 1).await;

    d.phase("a message claiming another sender");
    assert!(
        hostile(
            &c,
            0,
            1,
            Channel::Heartbeat,
            &hello(1, 2),
            &frame(&heartbeat(3, 0))
        )
        .await
    );
    wait("wrong sender in a message", "wrong_sender", 2).await;

    d.phase("garbage");
    let mut junk = 7u32.to_be_bytes().to_vec();
    junk.extend_from_slice(&[0xff; 7]);
    assert!(hostile(&c, 0, 1, Channel::Raft, &hello(1, 2), &junk).await);
    wait("garbage", "decode", 1).await;

    d.phase("truncated");
    {
        let auth = c.nodes[0].auth.clone().unwrap();
        let mut s = auth.connect("n1", None).await.unwrap();
        s.write_all(&transport::hello_frame(Channel::Raft, &hello(1, 2)))
            .await
            .unwrap();
        let mut cut = 1000u32.to_be_bytes().to_vec();
        cut.extend_from_slice(&[1; 10]);
        s.write_all(&cut).await.unwrap();
        s.flush().await.unwrap();
        s.shutdown().await.unwrap();
        wait("truncated", "truncated", 1).await;
    }

    d.phase("oversize");
    assert!(
        hostile(
            &c,
            0,
            1,
            Channel::Raft,
            &hello(1, 2),
            &u32::MAX.to_be_bytes()
        )
        .await
    );
    wait("oversize", "oversize", 1).await;

    d.phase("a previous incarnation's id");
    assert!(hostile(&c, 0, 1, Channel::Raft, &hello(1, 99), &[]).await);
    wait("stale target", "stale", 1).await;

    d.phase("another group");
    let other = ChannelHello {
        group: "other".into(),
        from: 1,
        to: 2,
    };
    assert!(hostile(&c, 0, 1, Channel::Raft, &other, &[]).await);
    wait("wrong group", "group", 1).await;

    d.phase("a local message type");
    let hup = Message {
        msg_type: MessageType::MsgHup as i32,
        from: 1,
        to: 2,
        ..Default::default()
    };
    assert!(hostile(&c, 0, 1, Channel::Raft, &hello(1, 2), &frame(&hup)).await);
    wait("local type", "type", 1).await;
    // A snapshot on the raft channel, where its data cannot come.
    let snap = Message {
        msg_type: MessageType::MsgSnapshot as i32,
        from: 1,
        to: 2,
        ..Default::default()
    };
    assert!(hostile(&c, 0, 1, Channel::Raft, &hello(1, 2), &frame(&snap)).await);
    wait("snapshot on the raft channel", "type", 2).await;
    // Heartbeats have a lane of their own, appends may not take it.
    assert!(
        hostile(
            &c,
            0,
            1,
            Channel::Raft,
            &hello(1, 2),
            &frame(&heartbeat(1, 0))
        )
        .await
    );
    wait("heartbeat on the raft channel", "type", 3).await;
    let append = Message {
        msg_type: MessageType::MsgAppend as i32,
        from: 1,
        to: 2,
        ..Default::default()
    };
    assert!(hostile(&c, 0, 1, Channel::Heartbeat, &hello(1, 2), &frame(&append)).await);
    wait("append on the heartbeat channel", "type", 4).await;

    d.phase("a heartbeat committing past the log (raft-rs would panic)");
    let bytes = frame(&heartbeat(1, 1 << 40));
    {
        let auth = c.nodes[0].auth.clone().unwrap();
        let mut s = auth.connect("n1", None).await.unwrap();
        s.write_all(&transport::hello_frame(Channel::Heartbeat, &hello(1, 2)))
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
        s.flush().await.unwrap();
        wait("refused commit", "commit", 1).await;
    }

    d.phase("a malformed snapshot");
    let mut snap_bytes = frame(&Message {
        msg_type: MessageType::MsgSnapshot as i32,
        from: 1,
        to: 2,
        term,
        snapshot: Some(raft::prelude::Snapshot {
            data: Vec::new(),
            metadata: Some(raft::prelude::SnapshotMetadata {
                conf_state: Some(Default::default()),
                index: 1 << 20,
                term,
            }),
        }),
        ..Default::default()
    });
    snap_bytes.extend_from_slice(&5u64.to_be_bytes());
    snap_bytes.extend_from_slice(&[0xff; 5]);
    assert!(hostile(&c, 0, 1, Channel::Snapshot, &hello(1, 2), &snap_bytes).await);
    wait("malformed snapshot", "decode", 2).await;

    d.phase("a plain raft hello on the authenticated listener");
    let refused_before = c.nodes[1]
        .auth
        .as_ref()
        .unwrap()
        .refusals
        .counters
        .plain_frame
        .load(Relaxed);
    {
        let mut s = tokio::net::TcpStream::connect(c.nodes[1].addr)
            .await
            .unwrap();
        s.write_all(&transport::hello_frame(Channel::Raft, &hello(1, 2)))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    }
    let auth1 = c.nodes[1].auth.clone().unwrap();
    eventually("plain frame refused", Duration::from_secs(5), || {
        auth1.refusals.counters.plain_frame.load(Relaxed) > refused_before
    })
    .await;

    d.phase("the group still works");
    assert!(
        victim.status().await.is_some(),
        "the victim's group still runs"
    );
    c.propose_all(payloads("y", 50)).await;
    c.converged(100).await;
    let mut n0_refused = 0;
    for (i, n) in c.running() {
        if i != 1 {
            n0_refused += n.group().counters().refused();
        }
    }
    assert_eq!(n0_refused, 0, "only the victim saw hostile traffic");
}
