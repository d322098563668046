//! Moving a VIP and its live TCP connections from this node to another
//! (source side, [`move_out`]) and taking them in (target side,
//! [`accept_move`]). The message sequence and its rules are in
//! [`baton_core::relocation`]; this module does the I/O around it: hold,
//! freeze, thaw, VIP, and the control connection between the two nodes.
//!
//! Rollback: until the source sends `Commit`, any failure (target down,
//! refusing, dying, too slow) puts everything back: the source resumes its
//! frozen sockets, lets the held packets in and re-announces the VIP; the
//! target closes what it thawed without a FIN or RST and drops the VIP.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_core::relocation::{
    ConnHandoff, MoveMessage, MoveSession, Phase, ProtocolError, Role, Vip, MAGIC, VERSION,
};
use baton_core::tcp_state::TcpConnState;
use baton_core::wire::{self, WireError};
use baton_net::hold::{self, Hold, HoldError, Ports};
use baton_net::repair::{self, RepairError};
use baton_net::vip::{self, Announce, VipError, VipSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::peer::ControlIo;

/// A connection taken away from its application: the socket, and the
/// application's state for it. The application must not touch the socket
/// until it gets it back.
#[derive(Debug)]
pub struct Parked {
    /// The connection's id, the same on every node.
    pub id: u64,
    pub stream: std::net::TcpStream,
    /// Application state (e.g. output not yet written), opaque here.
    pub app: Vec<u8>,
}

/// How this node takes part in moves.
#[derive(Debug, Clone)]
pub struct MoveConfig {
    /// The cluster interface the VIP goes on (`eth0` in the lab).
    pub interface: String,
    /// VRRP router id of the VIP's virtual MAC, if it uses one.
    pub vrid: Option<u8>,
    /// NFQUEUE number for holds in this node's namespace.
    pub queue_num: u16,
    /// Gratuitous ARP / unsolicited NA burst after taking the VIP.
    pub announce: Announce,
    /// How long each side waits for the other's next message before it
    /// rolls back.
    pub step_timeout: Duration,
    /// Address the control connection to a target is made from: the
    /// node's own, never the VIP (which leaves with the move).
    pub local_addr: Option<IpAddr>,
    /// Credentials for the control connection ([`crate::peer`]); `None`
    /// means plain TCP, for in-process move agents only.
    pub auth: Option<std::sync::Arc<crate::peer::PeerAuth>>,
}

impl MoveConfig {
    pub fn new(interface: impl Into<String>) -> MoveConfig {
        MoveConfig {
            interface: interface.into(),
            vrid: None,
            queue_num: 7,
            announce: Announce::default(),
            step_timeout: Duration::from_secs(3),
            local_addr: None,
            auth: None,
        }
    }

    /// How this node carries `vip`: on the cluster interface, behind the
    /// virtual MAC if one is configured.
    pub fn spec(&self, vip: &Vip) -> VipSpec {
        let spec = VipSpec::new(vip.addr, vip.prefix_len, self.interface.clone());
        match self.vrid {
            Some(vrid) => spec.with_vmac(vrid),
            None => spec,
        }
    }
}

fn ports(vip: &Vip) -> Ports {
    if vip.ports.is_empty() {
        Ports::AllTcp
    } else {
        Ports::Tcp(vip.ports.clone())
    }
}

/// When the target announces the VIP a second time.
const REANNOUNCE_AFTER: Duration = Duration::from_secs(1);

/// Which node's announcement of which VIP: the network namespace tells
/// apart nodes that share one process (lab tests, benchmarks).
type AnnouncementKey = (Option<u64>, IpAddr);

/// Announcements of VIPs taken by this node that may still be running: a
/// move out of that VIP cancels them first.
fn pending_announcements() -> std::sync::MutexGuard<
    'static,
    std::collections::HashMap<AnnouncementKey, tokio::task::AbortHandle>,
> {
    static PENDING: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<AnnouncementKey, tokio::task::AbortHandle>>,
    > = std::sync::OnceLock::new();
    PENDING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// How many queue numbers from [`MoveConfig::queue_num`] holds may use: the
/// previous move's hold may still be winding down in the background.
const HOLD_QUEUES: u16 = 8;

/// Which side of a move a hold is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldFor {
    /// The source: incoming traffic held, and its sockets silenced, so
    /// nothing leaves a frozen socket.
    Source,
    /// The target: incoming traffic held (its thawed sockets are silent
    /// until they go live).
    Target,
}

fn install_hold(cfg: &MoveConfig, vip: &Vip, side: HoldFor) -> Result<Hold, HoldError> {
    let mut last = None;
    for offset in 0..HOLD_QUEUES {
        let queue = cfg.queue_num.wrapping_add(offset);
        let installed = match side {
            HoldFor::Source => Hold::install_silenced(vip.addr, ports(vip), queue),
            HoldFor::Target => Hold::install(vip.addr, ports(vip), queue),
        };
        match installed {
            Ok(hold) => return Ok(hold),
            Err(e @ HoldError::Queue { op, .. }) if op.starts_with("bind") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one queue tried"))
}

/// Why a move failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("control connection to {peer}: {source}")]
    Control {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("peer sent a malformed message: {0}")]
    Wire(#[from] WireError),
    #[error("move protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("hold: {0}")]
    Hold(#[from] HoldError),
    #[error("VIP: {0}")]
    Vip(#[from] VipError),
    #[error("connection {id}: {source}")]
    Repair { id: u64, source: RepairError },
    #[error("bad connection state from peer: {0}")]
    State(WireError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the application could not hand its connections off: {0}")]
    HandOff(String),
}

/// What an application gives up for a move, and gets back if it fails.
#[derive(Debug, Default)]
pub struct Handoff {
    /// The application's state as a whole (a service checkpoint).
    pub service: Vec<u8>,
    pub conns: Vec<Parked>,
}

/// A failed move: the error, and what the application handed off, given
/// back working again.
#[derive(Debug)]
pub struct MoveFailure {
    pub error: MoveError,
    pub kept: Handoff,
}

/// What a completed move did, as seen by the source.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub connections: usize,
    /// From installing the hold to the target's `Done`: how long the VIP's
    /// traffic was held.
    pub freeze: Duration,
    /// Time spent freezing sockets.
    pub freeze_sockets: Duration,
    /// Packets that reached the source during the hold, forwarded.
    pub forwarded_packets: usize,
}

/// What a completed move did, as seen by the target.
#[derive(Debug, Clone)]
pub struct TakeReport {
    pub connections: usize,
    /// Time spent thawing sockets.
    pub thaw_sockets: Duration,
    /// Packets the target held itself and let in after the thaw.
    pub held_packets: usize,
    /// Packets forwarded by the source and re-injected.
    pub injected_packets: usize,
}

/// Writes one message, within `timeout`: a peer that died mid-move stops
/// reading, and a write that waits for it for ever would keep the VIP
/// held for ever.
async fn write_message_within<S: ControlIo>(
    stream: &mut S,
    msg: &MoveMessage,
    timeout: Duration,
) -> std::io::Result<()> {
    let write = async {
        stream.write_all(&msg.encode()).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took no {} within {timeout:?}", msg.kind()),
        )),
    }
}

/// How long a write of a small message may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

async fn write_message<S: ControlIo>(stream: &mut S, msg: &MoveMessage) -> std::io::Result<()> {
    write_message_within(stream, msg, WRITE_TIMEOUT).await
}

async fn read_message<S: ControlIo>(
    stream: &mut S,
    timeout: Duration,
    what: &'static str,
) -> Result<MoveMessage, MoveError> {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let read = async {
        let mut header = [0u8; wire::HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = match wire::parse_header(MAGIC, VERSION, &header) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let mut body = vec![0u8; header.body_len];
        stream.read_exact(&mut body).await?;
        Ok(wire::decode_body::<MoveMessage>(&body))
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(MoveError::Timeout(what)),
        Ok(Err(source)) => Err(MoveError::Control { peer, source }),
        Ok(Ok(decoded)) => Ok(decoded?),
    }
}

async fn connect_control(
    cfg: &MoveConfig,
    target: SocketAddr,
) -> std::io::Result<crate::peer::ControlStream> {
    crate::peer::connect_control(cfg.auth.as_deref(), cfg.local_addr, target).await
}

/// A move id unlikely to repeat across restarts (no clock in the core, so
/// the node picks it).
fn new_move_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()) << 48
}

/// Connections frozen (source) and thawed (target) per move message: the
/// two ends work on different batches at the same time.
const BATCH: usize = 64;

/// Moves `vip`, the application state and the connections `hand_off`
/// yields to the node whose move listener is `target`. `hand_off` is called
/// once the VIP's traffic is held; it must stop the application using those
/// connections. On failure everything comes back working, in
/// [`MoveFailure::kept`].
pub async fn move_out<F, Fut>(
    cfg: &MoveConfig,
    target: SocketAddr,
    vip: &Vip,
    hand_off: F,
) -> Result<MoveReport, MoveFailure>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Handoff, String>>,
{
    let fail = |error: MoveError| MoveFailure {
        error,
        kept: Handoff::default(),
    };
    // Reach the target before anything changes here.
    let mut control =
        match tokio::time::timeout(cfg.step_timeout, connect_control(cfg, target)).await {
            Err(_) => return Err(fail(MoveError::Timeout("the target's move listener"))),
            Ok(Err(source)) => {
                return Err(fail(MoveError::Control {
                    peer: target,
                    source,
                }))
            }
            Ok(Ok(s)) => s,
        };
    let _ = control.set_nodelay(true);

    // The target makes ready while we hold and freeze.
    let started = Instant::now();
    let move_id = new_move_id();
    let mut session = MoveSession::new(Role::Source);
    let prepare = MoveMessage::Prepare {
        move_id,
        vip: vip.clone(),
    };
    session.on_send(&prepare).map_err(|e| fail(e.into()))?;
    if let Err(source) = write_message(&mut control, &prepare).await {
        return Err(fail(MoveError::Control {
            peer: target,
            source,
        }));
    }
    let key = (baton_net::netns::current_id(), vip.addr);
    if let Some(pending) = pending_announcements().remove(&key) {
        pending.abort();
    }
    let hold = install_hold(cfg, vip, HoldFor::Source).map_err(|e| fail(e.into()))?;
    let Handoff {
        service,
        conns: parked,
    } = match hand_off().await {
        Ok(handoff) => handoff,
        Err(reason) => {
            // Nothing was frozen: let the held traffic in and stop.
            if let Err(e) = hold.release() {
                tracing::error!(error = %e, "releasing the hold after a failed hand-off");
            }
            return Err(fail(MoveError::HandOff(reason)));
        }
    };

    // The peers' MACs (next hops are on the segment in this milestone).
    let peers: Vec<IpAddr> = {
        let mut p: Vec<IpAddr> = parked
            .iter()
            .filter_map(|p| p.stream.peer_addr().ok())
            .map(|a| a.ip())
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let mut neighbours = Some(
        vip::neighbours(&cfg.interface, &peers)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the neighbour table");
                Vec::new()
            }),
    );

    // Freeze and send in batches: the target thaws one while we freeze
    // the next. A socket that cannot be frozen fails the whole move.
    let freeze_started = Instant::now();
    let total = parked.len();
    let Ok(total_u32) = u32::try_from(total) else {
        let e = MoveError::HandOff(format!("{total} connections are more than a move carries"));
        return Err(roll_back(cfg, vip, hold, service, Vec::new(), parked, e).await);
    };
    let mut parked = parked.into_iter();
    let mut frozen: Vec<(Parked, TcpConnState)> = Vec::with_capacity(total);
    let mut freezing = Duration::ZERO;
    let mut encoded_at = None;
    loop {
        let batch_started = Instant::now();
        let mut batch = Vec::with_capacity(BATCH.min(total));
        let mut failure = None;
        for p in parked.by_ref().take(BATCH) {
            match repair::freeze(p.stream.as_fd()) {
                Ok(state) => {
                    batch.push(ConnHandoff::new(p.id, &state, p.app.clone()));
                    frozen.push((p, state));
                }
                Err(source) => {
                    failure = Some((MoveError::Repair { id: p.id, source }, p));
                    break;
                }
            }
        }
        freezing += batch_started.elapsed();
        if let Some((error, p)) = failure {
            let mut unfrozen = vec![p];
            unfrozen.extend(parked);
            return Err(roll_back(cfg, vip, hold, service, frozen, unfrozen, error).await);
        }
        let message = match neighbours.take() {
            Some(neighbours) => MoveMessage::Offer {
                move_id,
                vip: vip.clone(),
                neighbours,
                service: service.clone(),
                connections: batch,
                total: total_u32,
            },
            None => MoveMessage::Conns {
                move_id,
                connections: batch,
            },
        };
        if let Err(e) = session.on_send(&message) {
            let rest: Vec<Parked> = parked.collect();
            return Err(roll_back(cfg, vip, hold, service, frozen, rest, e.into()).await);
        }
        encoded_at.get_or_insert_with(|| started.elapsed());
        // A batch may carry large queues: give it time.
        if let Err(source) =
            write_message_within(&mut control, &message, cfg.step_timeout * 4).await
        {
            let e = MoveError::Control {
                peer: target,
                source,
            };
            let rest: Vec<Parked> = parked.collect();
            return Err(roll_back(cfg, vip, hold, service, frozen, rest, e).await);
        }
        if frozen.len() == total {
            break;
        }
    }
    let encoded_at = encoded_at.unwrap_or_default();
    let freeze_sockets = freezing;
    let mut phases = vec![
        ("hold", freeze_started - started),
        ("freeze", freeze_sockets),
    ];
    phases.push(("offer_encoded", encoded_at));
    phases.push(("offer_sent", started.elapsed()));
    let ready = match read_message(&mut control, cfg.step_timeout, "the target's Ready").await {
        Ok(m) => session.on_receive(&m).map_err(MoveError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = ready {
        session.abort();
        return Err(roll_back(cfg, vip, hold, service, frozen, Vec::new(), e).await);
    }
    phases.push(("ready", started.elapsed()));

    // Point of no return: the target holds thawed copies of everything.
    let spec = cfg.spec(vip);
    if let Err(e) = vip::release(&spec).await {
        tracing::warn!(vip = %vip.addr, error = %e, "releasing the VIP after a move");
    }
    // The hold stays until the target is done: what arrives meanwhile is
    // dropped (the client retransmits it), never answered.
    if let Some((full, undelivered)) = hold::queue_drops(hold.queue_num()) {
        if full + undelivered > 0 {
            tracing::warn!(full, undelivered, "the hold's queue dropped packets");
        }
    }
    let held_packets = hold.take_dropped().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "collecting packets held during the move");
        Vec::new()
    });
    let forwarded_packets = held_packets.len();
    phases.push(("released", started.elapsed()));
    let commit = MoveMessage::Commit {
        move_id,
        held_packets,
    };
    let committed = session.on_send(&commit);
    debug_assert!(committed.is_ok());
    let sent = write_message(&mut control, &commit).await;
    let MoveMessage::Commit { held_packets, .. } = commit else {
        unreachable!("built above")
    };
    if let Err(source) = sent {
        // Not all of Commit reached the kernel: the target cannot have read
        // it, and rolls back when its wait for it ends. So do we.
        let e = MoveError::Control {
            peer: target,
            source,
        };
        return Err(roll_back_with(cfg, vip, hold, service, frozen, &held_packets, e).await);
    }
    match read_message(&mut control, cfg.step_timeout, "the target's Done").await {
        Ok(m) => {
            if let Err(e) = session.on_receive(&m) {
                tracing::warn!(error = %e, "unexpected answer to Commit");
            }
        }
        Err(e) => {
            // Commit left here whole, but did it arrive? Ask on a new
            // connection; the target answers once it knows.
            tracing::warn!(error = %e, "no Done from the target after Commit; asking it");
            if !query_outcome(cfg, target, move_id).await {
                return Err(
                    roll_back_with(cfg, vip, hold, service, frozen, &held_packets, e).await,
                );
            }
        }
    }
    drop(held_packets);
    let freeze = started.elapsed();
    phases.push(("done", freeze));
    tracing::debug!(?phases, "move out");
    let connections = frozen.len();
    for (p, _) in frozen {
        close_silently(OwnedFd::from(p.stream));
    }
    // Packets still in flight to us while the clients learned the new MAC.
    let late = hold.take_dropped().unwrap_or_default();
    let late_packets = late.len();
    let late = MoveMessage::Late {
        move_id,
        packets: late,
    };
    if session.on_send(&late).is_ok() {
        if let Err(e) = write_message(&mut control, &late).await {
            tracing::warn!(error = %e, "forwarding late packets");
        }
    }
    // Removing the rules takes a few ms of iptables: not on the clients' time.
    std::thread::spawn(move || match hold.finish_dropped() {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::debug!(
                packets = dropped.len(),
                "dropped packets that reached the old owner after the move"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "ending the hold after a move"),
    });
    tracing::debug!(late_packets, "forwarded late packets");
    Ok(MoveReport {
        connections,
        freeze,
        freeze_sockets,
        forwarded_packets,
    })
}

/// Lets packets the hold took (and would have forwarded) into this node's
/// own stack, after a rollback.
fn reinject(packets: &[Vec<u8>]) {
    if let Err(e) = hold::inject(packets) {
        tracing::error!(error = %e, "re-injecting held packets after a rollback");
    }
}

/// Asks the target whether move `move_id` committed. Unreachable targets
/// count as committed: once Commit left whole, serving here again could
/// make two owners of the VIP, and a target that got it and died took the
/// connections with it either way.
async fn query_outcome(cfg: &MoveConfig, target: SocketAddr, move_id: u64) -> bool {
    let ask = async {
        let mut control =
            connect_control(cfg, target)
                .await
                .map_err(|source| MoveError::Control {
                    peer: target,
                    source,
                })?;
        write_message(&mut control, &MoveMessage::Query { move_id })
            .await
            .map_err(|source| MoveError::Control {
                peer: target,
                source,
            })?;
        read_message(&mut control, cfg.step_timeout * 3, "the move's outcome").await
    };
    match tokio::time::timeout(cfg.step_timeout * 4, ask).await {
        Ok(Ok(MoveMessage::Done { move_id: id })) if id == move_id => true,
        Ok(Ok(MoveMessage::Refused {
            move_id: id,
            reason,
        })) if id == move_id => {
            tracing::warn!(reason, "the target did not commit the move; taking it back");
            false
        }
        Ok(Ok(other)) => {
            tracing::error!(answer = ?other.move_id(), "odd answer to a move query; assuming the target serves");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot ask the target about the move; assuming it serves");
            true
        }
        Err(_) => {
            tracing::error!("the target did not say how the move ended; assuming it serves");
            true
        }
    }
}

/// How a move ended on its target, for a source that lost the control
/// connection after Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Ready was sent; Commit may still come.
    Pending,
    Committed,
    RolledBack,
}

/// Outcomes of the latest moves into each node (namespace), by move id.
fn outcomes(
) -> std::sync::MutexGuard<'static, std::collections::VecDeque<(Option<u64>, u64, Outcome)>> {
    static OUTCOMES: std::sync::Mutex<std::collections::VecDeque<(Option<u64>, u64, Outcome)>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    OUTCOMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many outcomes are remembered: enough for every move under way.
const OUTCOMES_KEPT: usize = 256;

fn record_outcome(move_id: u64, outcome: Outcome) {
    let ns = baton_net::netns::current_id();
    let mut all = outcomes();
    if let Some(entry) = all.iter_mut().find(|(n, id, _)| *n == ns && *id == move_id) {
        entry.2 = outcome;
        return;
    }
    if all.len() >= OUTCOMES_KEPT {
        all.pop_front();
    }
    all.push_back((ns, move_id, outcome));
}

fn outcome_of(move_id: u64) -> Option<Outcome> {
    let ns = baton_net::netns::current_id();
    outcomes()
        .iter()
        .find(|(n, id, _)| *n == ns && *id == move_id)
        .map(|(_, _, o)| *o)
}

/// Answers a source's [`MoveMessage::Query`] once the move is no longer
/// pending here (bounded: a pending move rolls back within a step).
async fn answer_query<S: ControlIo>(cfg: &MoveConfig, control: &mut S, move_id: u64) {
    let deadline = Instant::now() + cfg.step_timeout * 2;
    let answer = loop {
        match outcome_of(move_id) {
            Some(Outcome::Committed) => break MoveMessage::Done { move_id },
            Some(Outcome::Pending) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => {
                break MoveMessage::Refused {
                    move_id,
                    reason: match other {
                        None => "no such move here".into(),
                        _ => "rolled back".into(),
                    },
                }
            }
        }
    };
    let _ = write_message(control, &answer).await;
}

/// Closes a socket in repair mode without a FIN or RST; one that cannot be
/// put in repair mode is kept open (leaked) rather than reset.
fn close_silently(fd: OwnedFd) {
    if let Err(e) = repair::close_silently(fd) {
        tracing::error!(error = %e.source, "cannot close a socket silently; leaving it open");
        std::mem::forget(e.fd);
    }
}

/// Puts the source back as it was: sockets out of repair mode, held packets
/// let in, VIP announced again (a client may have learned the target's MAC).
async fn roll_back(
    cfg: &MoveConfig,
    vip: &Vip,
    hold: Hold,
    service: Vec<u8>,
    frozen: Vec<(Parked, TcpConnState)>,
    mut kept: Vec<Parked>,
    error: MoveError,
) -> MoveFailure {
    let mut failure = roll_back_with(cfg, vip, hold, service, frozen, &[], error).await;
    kept.append(&mut failure.kept.conns);
    failure.kept.conns = kept;
    failure
}

/// [`roll_back`] after Commit was attempted: `taken` are the packets the
/// hold had handed over for the target; they go in first, in order.
async fn roll_back_with(
    cfg: &MoveConfig,
    vip: &Vip,
    mut hold: Hold,
    service: Vec<u8>,
    frozen: Vec<(Parked, TcpConnState)>,
    taken: &[Vec<u8>],
    error: MoveError,
) -> MoveFailure {
    tracing::warn!(vip = %vip.addr, error = %error, "move failed; the source keeps serving");
    // The VIP first: held packets are for it, and the sockets' window
    // probes need it as their source address (after Commit it was
    // released; a probe sent without it is lost, and the client's answer
    // with it, which is what makes a socket send what the silence kept).
    if let Err(e) = vip::take(&cfg.spec(vip), cfg.announce).await {
        tracing::error!(error = %e, "re-announcing the VIP on rollback");
    }
    // The sockets' first words after the freeze (a window probe) must go out.
    if let Err(e) = hold.unsilence() {
        tracing::error!(error = %e, "letting the VIP's sockets send again on rollback");
    }
    let mut kept = Vec::with_capacity(frozen.len());
    for (p, _) in frozen {
        if let Err(e) = repair::resume(p.stream.as_fd()) {
            tracing::error!(id = p.id, error = %e, "cannot resume a frozen connection");
        }
        kept.push(p);
    }
    reinject(taken);
    if let Err(e) = hold.release() {
        tracing::error!(error = %e, "releasing the hold on rollback");
    }
    MoveFailure {
        error,
        kept: Handoff {
            service,
            conns: kept,
        },
    }
}

/// The application side of a target: checks an offer before anything
/// changes, then takes over what was moved.
pub trait Taker {
    /// What [`Taker::prepare`] makes of the offered state.
    type Prepared;
    /// Called before anything changes here: can this node take the offered
    /// application state (restore a checkpoint, check it is known)? An
    /// error refuses the move; the source keeps serving.
    fn prepare(&mut self, vip: &Vip, service: &[u8]) -> Result<Self::Prepared, String>;
    /// Called once the move is committed, before the VIP's held traffic is
    /// let in: serve these connections from now on.
    fn adopt(&mut self, prepared: Self::Prepared, conns: Vec<Parked>);
}

/// Handles one incoming move on `control`: asks `taker` to prepare, thaws
/// the offered connections, takes the VIP and hands everything to `taker`.
/// On any failure before `Commit`, nothing is kept and the source keeps
/// serving. A source's [`MoveMessage::Query`] about an earlier move is
/// answered instead: `Ok(None)`.
pub async fn accept_move<T: Taker, S: ControlIo>(
    cfg: &MoveConfig,
    mut control: S,
    taker: &mut T,
) -> Result<Option<TakeReport>, MoveError> {
    let _ = control.set_nodelay(true);
    let mut session = MoveSession::new(Role::Target);
    let refuse = |move_id: u64, reason: String| MoveMessage::Refused { move_id, reason };
    let first = read_message(&mut control, cfg.step_timeout * 4, "a Prepare or an Offer").await?;
    if let MoveMessage::Query { move_id } = first {
        answer_query(cfg, &mut control, move_id).await;
        return Ok(None);
    }
    if let Err(e) = session.on_receive(&first) {
        let _ = write_message(&mut control, &refuse(first.move_id(), e.to_string())).await;
        return Err(e.into());
    }
    let MoveMessage::Prepare { move_id, vip } = first else {
        unreachable!("a session starts with Prepare");
    };
    // Make ready (hold, address) while the source freezes its sockets.
    let landing = match prepare_landing(cfg, &vip).await {
        Ok(l) => l,
        Err(e) => {
            let _ = write_message(&mut control, &refuse(move_id, e.to_string())).await;
            return Err(e);
        }
    };
    // The offer may carry large queues: give it time.
    let offer = match read_message(&mut control, cfg.step_timeout * 4, "an Offer").await {
        Ok(m) => m,
        Err(e) => {
            landing.undo().await;
            return Err(e);
        }
    };
    if let Err(e) = session.on_receive(&offer) {
        landing.undo().await;
        let _ = write_message(&mut control, &refuse(move_id, e.to_string())).await;
        return Err(e.into());
    }
    let MoveMessage::Offer {
        service,
        connections,
        neighbours,
        ..
    } = offer
    else {
        unreachable!("the session accepted an Offer");
    };
    let prepared = match taker.prepare(&vip, &service) {
        Ok(p) => p,
        Err(reason) => {
            landing.undo().await;
            let _ = write_message(&mut control, &refuse(move_id, reason.clone())).await;
            return Err(MoveError::Refused(reason));
        }
    };

    // Clients reachable at once when the sockets go live, not after ARP/ND.
    if let Err(e) = vip::learn_neighbours(&cfg.interface, &neighbours).await {
        tracing::warn!(error = %e, "learning the clients' MACs from the source");
    }
    match take_in(
        cfg,
        &mut control,
        &mut session,
        move_id,
        &vip,
        connections,
        landing,
    )
    .await
    {
        Ok(taken_in) => {
            let finished = finish_take(
                cfg,
                &mut control,
                &mut session,
                move_id,
                &vip,
                taken_in,
                |conns| taker.adopt(prepared, conns),
            )
            .await;
            if finished.is_err() && outcome_of(move_id) != Some(Outcome::Committed) {
                record_outcome(move_id, Outcome::RolledBack);
            }
            finished.map(Some)
        }
        Err(e) => {
            let _ = write_message(
                &mut control,
                &MoveMessage::Refused {
                    move_id,
                    reason: e.to_string(),
                },
            )
            .await;
            Err(e)
        }
    }
}

/// Thawed connections: id, socket, state, application bytes, and whether
/// the socket is live already (silenced until Commit) or still in repair
/// mode.
type Thawed = Vec<(u64, OwnedFd, TcpConnState, Vec<u8>, bool)>;

/// Thaws one batch of offered connections into `thawed`. Established ones
/// go live at once, silenced, so that Commit has little left to do.
fn thaw_batch(batch: Vec<ConnHandoff>, thawed: &mut Thawed) -> Result<(), MoveError> {
    thawed.reserve(batch.len());
    for c in batch {
        let state = c.tcp_state().map_err(MoveError::State)?;
        let fd =
            repair::rebuild(&state).map_err(|source| MoveError::Repair { id: c.id, source })?;
        let live = repair::can_go_live_silenced(&state);
        let silenced = if live {
            repair::go_live_silenced(fd.as_fd(), &state)
        } else {
            // Stays in repair mode until Commit, where its timers still fire.
            repair::silence(fd.as_fd())
        };
        if let Err(source) = silenced {
            close_silently(fd);
            return Err(MoveError::Repair { id: c.id, source });
        }
        thawed.push((c.id, fd, state, c.app, live));
    }
    Ok(())
}

/// What the target holds between Ready and Commit.
struct TakenIn {
    hold: Hold,
    taken: vip::Taken,
    thawed: Thawed,
    thaw_sockets: Duration,
}

/// What a target makes ready before the offer: the hold, and the VIP's
/// address (added, not announced).
struct Landing {
    hold: Hold,
    taken: vip::Taken,
    spec: VipSpec,
}

impl Landing {
    /// Gives it all up again (the move did not happen).
    async fn undo(self) {
        undo_take(
            &self.spec,
            self.taken.already_present,
            self.hold,
            Vec::new(),
        )
        .await;
    }
}

async fn prepare_landing(cfg: &MoveConfig, vip: &Vip) -> Result<Landing, MoveError> {
    let t0 = Instant::now();
    // Thawed sockets go live silenced before Commit: the rule that keeps
    // them silent must be there.
    baton_net::silence::ensure_rule(vip.addr)?;
    let hold = install_hold(cfg, vip, HoldFor::Target)?;
    let t1 = Instant::now();
    let spec = cfg.spec(vip);
    let taken = vip::take_address(&spec).await?;
    tracing::debug!(hold = ?t1 - t0, vip = ?t1.elapsed(), "landing prepared");
    Ok(Landing { hold, taken, spec })
}

/// Thaws everything into the prepared landing (sockets stay in repair
/// mode: silent until Commit) and answers Ready. Undoes itself on failure.
async fn take_in<S: ControlIo>(
    cfg: &MoveConfig,
    control: &mut S,
    session: &mut MoveSession,
    move_id: u64,
    vip: &Vip,
    connections: Vec<ConnHandoff>,
    landing: Landing,
) -> Result<TakenIn, MoveError> {
    let Landing { hold, taken, spec } = landing;
    let started = Instant::now();
    let mut thawed: Thawed = Vec::new();
    let mut batch = connections;
    let failure = loop {
        if let Err(e) = thaw_batch(batch, &mut thawed) {
            break Some(e);
        }
        if !session.awaiting_connections() {
            break None;
        }
        // The next batch; the source freezes the one after meanwhile.
        let next = match read_message(control, cfg.step_timeout * 4, "more connections").await {
            Ok(m) => m,
            Err(e) => break Some(e),
        };
        if let Err(e) = session.on_receive(&next) {
            break Some(e.into());
        }
        match next {
            MoveMessage::Conns { connections, .. } => batch = connections,
            _ => unreachable!("the session accepts only Conns here"),
        }
    };
    let thaw_sockets = started.elapsed();
    let mut announcing = None;
    let sent = match failure {
        Some(e) => Err(e),
        None => {
            // Clients learn the VIP's new MAC now: from here on what they send
            // is held here, not at the source (where it would have to be
            // forwarded). If the move rolls back, the source announces again.
            let (how, to_announce) = (cfg.announce, taken.clone());
            // (The second wave waits for Commit: announcing again while
            // the source may be rolling back would pull the clients to a
            // node about to give the VIP up.)
            let announce_task = tokio::spawn(async move {
                if let Err(e) = vip::announce(&to_announce, how).await {
                    tracing::error!(error = %e, "announcing the VIP");
                }
            });
            // A move away from here stops it: an old owner announcing would
            // pull the clients back to a node without the VIP.
            pending_announcements().insert(
                (baton_net::netns::current_id(), vip.addr),
                announce_task.abort_handle(),
            );
            announcing = Some(announce_task);
            let ready = MoveMessage::Ready {
                move_id,
                thawed: thawed.len() as u32,
            };
            match session.on_send(&ready) {
                Err(e) => Err(e.into()),
                Ok(()) => {
                    record_outcome(move_id, Outcome::Pending);
                    write_message(control, &ready)
                        .await
                        .map_err(|source| MoveError::Control {
                            peer: control
                                .peer_addr()
                                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
                            source,
                        })
                }
            }
        }
    };
    if let Err(e) = sent {
        if let Some(a) = announcing {
            a.abort();
        }
        undo_take(&spec, taken.already_present, hold, thawed).await;
        record_outcome(move_id, Outcome::RolledBack);
        return Err(e);
    }
    Ok(TakenIn {
        hold,
        taken,
        thawed,
        thaw_sockets,
    })
}

async fn undo_take(spec: &VipSpec, vip_was_here: bool, hold: Hold, thawed: Thawed) {
    // Our second announcement would pull the clients back to a node that
    // gives the VIP up.
    if let Some(pending) =
        pending_announcements().remove(&(baton_net::netns::current_id(), spec.addr))
    {
        pending.abort();
    }
    for (_, fd, _, _, _) in thawed {
        close_silently(fd);
    }
    if !vip_was_here {
        if let Err(e) = vip::release(spec).await {
            tracing::error!(error = %e, "dropping the VIP after a failed move");
        }
    }
    drop(hold);
}

/// Waits for Commit, then makes the thawed sockets live, announces the VIP
/// and lets the held traffic in.
async fn finish_take<F, S: ControlIo>(
    cfg: &MoveConfig,
    control: &mut S,
    session: &mut MoveSession,
    move_id: u64,
    vip: &Vip,
    taken_in: TakenIn,
    adopt: F,
) -> Result<TakeReport, MoveError>
where
    F: FnOnce(Vec<Parked>),
{
    let TakenIn {
        hold,
        taken,
        thawed,
        thaw_sockets,
    } = taken_in;
    let spec = cfg.spec(vip);
    let commit = match read_message(control, cfg.step_timeout, "the source's Commit").await {
        Ok(m) => session.on_receive(&m).map(|_| m).map_err(MoveError::from),
        Err(e) => Err(e),
    };
    let held_from_source = match commit {
        Ok(MoveMessage::Commit { held_packets, .. }) => held_packets,
        Ok(_) => unreachable!("the session accepts only Commit here"),
        Err(e) => {
            session.abort();
            undo_take(&spec, taken.already_present, hold, thawed).await;
            return Err(e);
        }
    };
    debug_assert_eq!(session.phase(), Phase::Committed);
    record_outcome(move_id, Outcome::Committed);
    // A second wave for clients that missed the first (a lost frame, a
    // link down for a moment), as keepalived repeats its gratuitous ARPs;
    // otherwise they would keep sending to the old owner until their
    // neighbour entry expires. A move away from here stops it.
    let (how, to_announce) = (cfg.announce, taken.clone());
    let second_wave = tokio::spawn(async move {
        tokio::time::sleep(REANNOUNCE_AFTER).await;
        if let Err(e) = vip::announce(&to_announce, how).await {
            tracing::warn!(error = %e, "announcing the VIP again");
        }
    });
    pending_announcements().insert(
        (baton_net::netns::current_id(), vip.addr),
        second_wave.abort_handle(),
    );

    let connections = thawed.len();
    let committed_at = Instant::now();
    let mut parked = Vec::with_capacity(connections);
    for (id, fd, state, app, live) in thawed {
        let result = if live {
            repair::speak(fd.as_fd(), &state)
        } else {
            repair::go_live(fd.as_fd(), &state)
        };
        match result {
            Ok(()) => parked.push(Parked {
                id,
                stream: std::net::TcpStream::from(fd),
                app,
            }),
            Err(source) => {
                tracing::error!(id, error = %source, "finishing a thaw after Commit; the connection is lost");
                close_silently(fd);
            }
        }
    }
    // Packets in the order the clients sent them: first those the source
    // held (sent before the clients learned our MAC), then our own. The
    // other way round, a client's older segments would arrive after its
    // newer ones and be dropped by our PAWS check (their timestamps are
    // older), and the client would have to send them again.
    let live_at = Instant::now();
    // The application first, so that it sets up its connections (on
    // another thread) while the held packets go in: they only queue in
    // the sockets, which are live and may speak.
    adopt(parked);
    let adopted_at = Instant::now();
    let injected_packets = hold::inject(&held_from_source).unwrap_or_else(|e| {
        tracing::error!(error = %e, "re-injecting the packets the source held");
        0
    });
    let held_packets = hold.accept_all().unwrap_or_else(|e| {
        tracing::error!(error = %e, "letting in the packets held here");
        0
    });
    if let Some((full, undelivered)) = hold::queue_drops(hold.queue_num()) {
        if full + undelivered > 0 {
            tracing::warn!(full, undelivered, "the hold's queue dropped packets");
        }
    }
    tracing::debug!(
        go_live = ?live_at - committed_at,
        adopt = ?adopted_at - live_at,
        injected = injected_packets,
        accepted = held_packets,
        let_in = ?adopted_at.elapsed(),
        "move in committed"
    );
    let done = MoveMessage::Done { move_id };
    session.on_send(&done)?;
    if let Err(e) = write_message(control, &done).await {
        tracing::warn!(error = %e, "sending Done (the move itself is complete)");
    }
    std::thread::spawn(move || {
        if let Err(e) = hold.release() {
            tracing::warn!(error = %e, "ending the hold after a move");
        }
    });
    let mut late_packets = 0;
    match read_message(control, cfg.step_timeout, "the source's late packets").await {
        Ok(m) => match session.on_receive(&m) {
            Ok(()) => {
                if let MoveMessage::Late { packets, .. } = m {
                    late_packets = hold::inject(&packets).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "re-injecting late packets");
                        0
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "unexpected message after Done"),
        },
        Err(e) => tracing::debug!(error = %e, "no late packets from the source"),
    }
    Ok(TakeReport {
        connections,
        thaw_sockets,
        held_packets,
        injected_packets: injected_packets + late_packets,
    })
}

/// Serves incoming moves on `listener`, one at a time, with `taker`.
/// Returns when `listener` fails.
pub async fn serve_moves<T: Taker>(
    cfg: MoveConfig,
    listener: TcpListener,
    mut taker: T,
) -> std::io::Result<()> {
    loop {
        let (control, peer) = listener.accept().await?;
        let Some(control) = crate::peer::accept_control(cfg.auth.as_deref(), control).await else {
            continue;
        };
        match accept_move(&cfg, control, &mut taker).await {
            Ok(None) => tracing::debug!(%peer, "answered a move query"),
            Ok(Some(report)) => {
                tracing::info!(%peer, connections = report.connections, thaw_ms = report.thaw_sockets.as_secs_f64() * 1e3, "moved in")
            }
            Err(e) => tracing::warn!(%peer, error = %e, "incoming move refused or rolled back"),
        }
    }
}
