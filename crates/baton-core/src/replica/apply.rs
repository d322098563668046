//! [`Replica`]: the service and its connections rebuilt from committed
//! entries, in log order, the same way on every node.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::digest;
use super::entry::{AckState, ClientSegment, Established, OutputDigest, ReplicaEntry, Tick};
use super::output::{DigestAt, OutputStream};
use super::{AbortReason, Action, ReplicaError};
use crate::log::{Applier, Event as ServiceEvent, LogEntry};
use crate::packet::{self, ConnKey, Segment, TcpFlags};
use crate::service::{CloseReason, ConnId, Output, RestoreError, Service};
use crate::tcp::reassembly::{ClientSyn, Event as StreamEvent, Reassembler, ServerParams};
use crate::tcp_state::{TcpOptions as Negotiated, WindowScale, MAX_WSCALE};
use crate::wire;

/// Frame magic of replica checkpoints.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"BTRS";
/// Version of the checkpoint format.
pub const SNAPSHOT_VERSION: u16 = 2;

/// Least output retained per connection before its input pauses.
pub const OUTPUT_FLOOR: u64 = 256 * 1024;
/// Most output retained per connection before its input pauses.
pub const OUTPUT_CAP: u64 = 16 * 1024 * 1024;
/// Output past this multiple of the limit (written without new input from
/// the connection: timers, other connections) aborts the connection, as a
/// server's output-buffer limit does for a client that stopped reading.
pub const OUTPUT_ABORT_FACTOR: u64 = 4;
/// Client bytes held back from a paused service before the connection is
/// aborted: a client that respects the kernel's window never gets near.
pub const HELD_INPUT_CAP: u64 = 32 * 1024 * 1024;
/// Connections between the client's SYN and the established entry.
pub const MAX_PENDING: usize = 65_536;
/// Bytes of segments kept per pending connection until it is established.
pub const EARLY_CAP: usize = 256 * 1024;
/// A pending connection not established within this much service time is
/// forgotten (the kernel gives up on a SYN_RECV socket sooner).
pub const PENDING_TTL_MS: u64 = 120_000;

/// Counts of what the replica met, the same on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCounters {
    /// Segment entries whose packet does not parse (no honest primary
    /// proposes one).
    pub malformed_segments: u64,
    /// Committed data that is no replica entry (another version's, or
    /// damaged).
    pub undecodable_entries: u64,
    /// Segments and ACK states for a connection nobody opened.
    pub unknown_conn: u64,
    /// SYNs not kept because too many connections were pending.
    pub pending_full: u64,
    /// Pending connections forgotten after [`PENDING_TTL_MS`].
    pub pending_expired: u64,
    /// Segments before the established entry that did not fit its buffer.
    pub early_dropped: u64,
    pub established_without_syn: u64,
    pub established_twice: u64,
    /// Output for a connection that is gone.
    pub output_dropped: u64,
    pub digest_ok: u64,
    /// Digests that could not be checked (connection gone, or too old).
    pub digest_unchecked: u64,
    pub digest_mismatch: u64,
    pub aborted_output: u64,
    pub aborted_input: u64,
}

/// Input the service has not taken yet, because the connection's retained
/// output is at its limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Held {
    Data(Vec<u8>),
    Fin,
}

/// What arrived for a connection before its established entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Early {
    Segment(ClientSegment),
    Ack(AckState),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    syn: ClientSyn,
    syn_at_ms: u64,
    early: Vec<Early>,
    early_bytes: usize,
}

/// One connection as every replica keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConn {
    id: ConnId,
    established: Established,
    /// What the handshake settled, both sides' offers together: a socket
    /// rebuilt for the connection must be told.
    negotiated: Negotiated,
    /// The log's time when the established entry was applied: the pair
    /// (`established.ts_clock`, this) fixes the primary's TCP clock.
    established_at_ms: u64,
    stream: Reassembler,
    /// The client's `snd_una` last seen, to turn ACKs into bytes.
    snd_una: u32,
    output: OutputStream,
    held: VecDeque<Held>,
    held_bytes: u64,
    /// The service closed or shut down its direction.
    fin_queued: bool,
    /// The client's FIN reached the service.
    fin_delivered: bool,
}

impl ReplicaConn {
    /// The service's id for the connection.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Our side of the handshake.
    pub fn established(&self) -> &Established {
        &self.established
    }

    /// The log's time at the established entry.
    pub fn established_at_ms(&self) -> u64 {
        self.established_at_ms
    }

    /// The client's stream and sending state.
    pub fn stream(&self) -> &Reassembler {
        &self.stream
    }

    /// The retained output and its digest.
    pub fn output(&self) -> &OutputStream {
        &self.output
    }

    /// Client bytes the service has not been given yet.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// The held client bytes, in order: what the primary's kernel still
    /// has in its receive queue (it reads only what the service consumed).
    pub fn unread(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held_bytes as usize);
        for h in &self.held {
            if let Held::Data(b) = h {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// The handshake's outcome: MSS, window scales, SACK, timestamps.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The service closed or shut down its direction: our FIN follows the
    /// output.
    pub fn fin_queued(&self) -> bool {
        self.fin_queued
    }

    /// The service closed the connection whole (not only its direction).
    pub fn fully_closed(&self) -> bool {
        self.stream.fully_closed()
    }

    /// Retained output at which this connection's input pauses:
    /// `clamp(4 × the client's largest window, OUTPUT_FLOOR, OUTPUT_CAP)`.
    /// The client's window comes from committed segments and ACK states
    /// only, so every replica computes the same limit at the same index.
    pub fn output_limit(&self) -> u64 {
        (4 * u64::from(self.stream.client().max_window)).clamp(OUTPUT_FLOOR, OUTPUT_CAP)
    }
}

/// Everything but the service: what a checkpoint carries besides it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    applied_index: u64,
    applier: Applier,
    /// Service time: the latest tick's, never going back.
    now_ms: u64,
    tick_entropy: u64,
    next_conn_id: ConnId,
    pending: BTreeMap<ConnKey, Pending>,
    conns: BTreeMap<ConnKey, ReplicaConn>,
    ids: BTreeMap<ConnId, ConnKey>,
    counters: ReplicaCounters,
}

/// A replica of one service: fed committed entries in log order
/// ([`Replica::handle_committed`]), it drives the service and says what to
/// do through [`Replica::poll_action`]. The primary performs the actions
/// on its kernel sockets; a clone only keeps the state, ready to take
/// over. Every replica reaches the same state at the same index
/// ([`Replica::state_digest`]).
pub struct Replica<S: Service> {
    service: S,
    state: State,
    current: bool,
    actions: VecDeque<Action>,
}

impl<S: Service> Replica<S> {
    /// A replica of `service` before the log's first entry.
    pub fn new(service: S) -> Replica<S> {
        Replica {
            service,
            state: State::default(),
            current: true,
            actions: VecDeque::new(),
        }
    }

    /// Index of the last entry applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.state.applied_index
    }

    /// Service time: the latest tick's.
    pub fn now_ms(&self) -> u64 {
        self.state.now_ms
    }

    /// False once the divergence guard caught this replica: it must be
    /// rebuilt from a checkpoint before it may serve.
    pub fn is_current(&self) -> bool {
        self.current
    }

    pub fn counters(&self) -> &ReplicaCounters {
        &self.state.counters
    }

    pub fn service(&self) -> &S {
        &self.service
    }

    /// When the service's earliest timer is due: the leader proposes a
    /// tick then.
    pub fn next_timer_at(&self) -> Option<u64> {
        self.state.applier.next_timer_at()
    }

    /// Connections ever established, closed ones included.
    pub fn connections_opened(&self) -> u64 {
        self.state.next_conn_id
    }

    /// The open connections, by key.
    pub fn connections(&self) -> impl Iterator<Item = (&ConnKey, &ReplicaConn)> + '_ {
        self.state.conns.iter()
    }

    pub fn connection(&self, conn: &ConnKey) -> Option<&ReplicaConn> {
        self.state.conns.get(conn)
    }

    /// The running digest of a connection's output, for the primary to
    /// propose as an [`OutputDigest`] entry.
    pub fn output_digest(&self, conn: &ConnKey) -> Option<OutputDigest> {
        self.state.conns.get(conn).map(|c| {
            let (offset, digest) = c.output.digest();
            OutputDigest {
                conn: *conn,
                offset,
                digest,
            }
        })
    }

    /// The next action, in the order they arose.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A hash of the state built from entries `1..=applied_index`: the
    /// service's checkpoint, every connection's stream position, retained
    /// output and digests. Equal on every replica at equal index.
    pub fn state_digest(&self) -> [u8; 32] {
        digest::sha256(&self.checkpoint())
    }

    /// The whole replica state (service included) as one frame: a replica
    /// restored from it continues exactly as this one does.
    pub fn checkpoint(&self) -> Vec<u8> {
        wire::encode(
            SNAPSHOT_MAGIC,
            SNAPSHOT_VERSION,
            &(&self.state, self.service.checkpoint()),
        )
    }

    /// Rebuilds a replica from [`Replica::checkpoint`] output. The
    /// checkpoint comes from an authenticated peer; a malformed one is
    /// refused.
    pub fn restore(bytes: &[u8]) -> Result<Replica<S>, ReplicaError> {
        Self::restore_with(bytes, S::restore)
    }

    /// [`Replica::restore`] with the service rebuilt by `restore_service`
    /// (a runtime that knows its services by kind, not by type).
    pub fn restore_with(
        bytes: &[u8],
        restore_service: impl FnOnce(&[u8]) -> Result<S, RestoreError>,
    ) -> Result<Replica<S>, ReplicaError> {
        let (state, service): (State, Vec<u8>) =
            wire::decode(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, bytes)?;
        let service = restore_service(&service)?;
        Ok(Replica {
            service,
            state,
            current: true,
            actions: VecDeque::new(),
        })
    }

    /// Applies the committed entry at `index`, which must come after the
    /// last one applied (the log's own entries, a new leader's empty one or
    /// a membership change, leave gaps: see [`Replica::handle_skipped`]).
    /// An entry that makes no sense here (a segment that does not parse, a
    /// connection nobody opened) is counted and skipped, the same way on
    /// every replica.
    pub fn handle_committed(
        &mut self,
        index: u64,
        entry: &ReplicaEntry,
    ) -> Result<(), ReplicaError> {
        self.advance_to(index)?;
        match entry {
            ReplicaEntry::Segment(s) => self.on_segment(s),
            ReplicaEntry::Established(e) => self.on_established(e),
            ReplicaEntry::Aborted { conn } => {
                if self.state.pending.remove(conn).is_none() {
                    self.end(conn, None);
                }
            }
            ReplicaEntry::Tick(t) => self.on_tick(t),
            ReplicaEntry::AckState(a) => self.on_ack_state(a),
            ReplicaEntry::Checkpoint => self.actions.push_back(Action::CheckpointDue { index }),
            ReplicaEntry::OutputDigest(d) => self.on_digest(d),
        }
        Ok(())
    }

    /// The committed entry at `index` carries nothing for the replica (the
    /// log's own entries, or data that is no replica entry: counted): it
    /// still counts as applied, so every replica reports the same index.
    pub fn handle_skipped(&mut self, index: u64, undecodable: bool) -> Result<(), ReplicaError> {
        self.advance_to(index)?;
        if undecodable {
            self.state.counters.undecodable_entries += 1;
        }
        Ok(())
    }

    /// Entries apply in log order: `index` must come after the last one.
    fn advance_to(&mut self, index: u64) -> Result<(), ReplicaError> {
        let expected = self.state.applied_index + 1;
        if index < expected {
            return Err(ReplicaError::OutOfOrder {
                expected,
                got: index,
            });
        }
        self.state.applied_index = index;
        Ok(())
    }

    fn on_segment(&mut self, s: &ClientSegment) {
        let Ok(seg) = packet::parse(&s.packet, s.checksum()) else {
            self.state.counters.malformed_segments += 1;
            return;
        };
        let key = seg.conn;
        if self.state.conns.contains_key(&key) {
            self.feed(&key, &seg);
            return;
        }
        if let Some(syn) = ClientSyn::from_segment(&seg) {
            self.on_syn(key, syn);
            return;
        }
        let seq_len = s.packet.len();
        match self.state.pending.get_mut(&key) {
            Some(p) if p.early_bytes + seq_len <= EARLY_CAP => {
                p.early_bytes += seq_len;
                p.early.push(Early::Segment(s.clone()));
            }
            Some(_) => self.state.counters.early_dropped += 1,
            None => self.state.counters.unknown_conn += 1,
        }
    }

    fn on_syn(&mut self, key: ConnKey, syn: ClientSyn) {
        let now = self.state.now_ms;
        let pending = &mut self.state.pending;
        if !pending.contains_key(&key) && pending.len() >= MAX_PENDING {
            self.state.counters.pending_full += 1;
            return;
        }
        // A retransmitted SYN changes nothing (what arrived after it is
        // kept); a SYN with another ISN replaces the one before, as the
        // kernel answers the latest.
        if pending.get(&key).is_some_and(|p| p.syn.isn == syn.isn) {
            return;
        }
        pending.insert(
            key,
            Pending {
                syn,
                syn_at_ms: now,
                early: Vec::new(),
                early_bytes: 0,
            },
        );
    }

    fn on_established(&mut self, e: &Established) {
        if self.state.conns.contains_key(&e.conn) {
            self.state.counters.established_twice += 1;
            return;
        }
        let Some(pending) = self.state.pending.remove(&e.conn) else {
            self.state.counters.established_without_syn += 1;
            return;
        };
        let now = self.state.now_ms;
        let scale = match (pending.syn.wscale, e.wscale) {
            (Some(_), Some(ours)) => ours.min(14),
            _ => 0,
        };
        let server = ServerParams {
            isn: e.isn,
            wscale: e.wscale,
            sack: e.sack,
            timestamps: e.timestamps,
            // The most the kernel can ever advertise.
            max_window: 65_535u32 << scale,
        };
        let stream = Reassembler::new(&pending.syn, &server, now);
        let negotiated = Negotiated {
            mss: e.mss,
            window_scale: match (pending.syn.wscale, e.wscale) {
                (Some(theirs), Some(ours)) => Some(WindowScale {
                    snd: theirs.min(MAX_WSCALE),
                    rcv: ours.min(MAX_WSCALE),
                }),
                _ => None,
            },
            sack_permitted: e.sack && pending.syn.sack_permitted,
            timestamps: e.timestamps && pending.syn.timestamp.is_some(),
        };
        let id = self.state.next_conn_id;
        self.state.next_conn_id += 1;
        let conn = ReplicaConn {
            id,
            established: *e,
            negotiated,
            established_at_ms: now,
            snd_una: stream.client().snd_una,
            stream,
            output: OutputStream::default(),
            held: VecDeque::new(),
            held_bytes: 0,
            fin_queued: false,
            fin_delivered: false,
        };
        self.state.conns.insert(e.conn, conn);
        self.state.ids.insert(id, e.conn);
        self.actions.push_back(Action::Opened { conn: e.conn, id });
        self.apply_service(ServiceEvent::Opened {
            conn: id,
            peer: e.conn.client,
        });
        for early in pending.early {
            if !self.state.conns.contains_key(&e.conn) {
                break;
            }
            match early {
                Early::Segment(s) => {
                    if let Ok(seg) = packet::parse(&s.packet, s.checksum()) {
                        self.feed(&e.conn, &seg);
                    }
                }
                Early::Ack(a) => self.feed(&e.conn, &ack_segment(&a)),
            }
        }
    }

    fn on_ack_state(&mut self, a: &AckState) {
        if self.state.conns.contains_key(&a.conn) {
            self.feed(&a.conn, &ack_segment(a));
            return;
        }
        match self.state.pending.get_mut(&a.conn) {
            Some(p) if p.early_bytes + 64 <= EARLY_CAP => {
                p.early_bytes += 64;
                p.early.push(Early::Ack(*a));
            }
            Some(_) => self.state.counters.early_dropped += 1,
            None => self.state.counters.unknown_conn += 1,
        }
    }

    fn on_tick(&mut self, t: &Tick) {
        self.state.now_ms = self.state.now_ms.max(t.time_ms);
        self.state.tick_entropy = t.entropy;
        let now = self.state.now_ms;
        let before = self.state.pending.len();
        self.state
            .pending
            .retain(|_, p| now.saturating_sub(p.syn_at_ms) < PENDING_TTL_MS);
        self.state.counters.pending_expired += (before - self.state.pending.len()) as u64;
        for id in self.state.applier.due_timers(now) {
            self.apply_service(ServiceEvent::TimerFired { id });
        }
    }

    fn on_digest(&mut self, d: &OutputDigest) {
        let Some(conn) = self.state.conns.get(&d.conn) else {
            self.state.counters.digest_unchecked += 1;
            return;
        };
        match conn.output.digest_at(d.offset) {
            DigestAt::Known(ours) if ours == d.digest => self.state.counters.digest_ok += 1,
            DigestAt::Forgotten => self.state.counters.digest_unchecked += 1,
            DigestAt::Known(_) | DigestAt::NotABoundary | DigestAt::Ahead => {
                self.state.counters.digest_mismatch += 1;
                self.current = false;
                self.actions.push_back(Action::DigestMismatch {
                    conn: d.conn,
                    offset: d.offset,
                });
            }
        }
    }

    /// One client segment (or ACK state) of an established connection.
    fn feed(&mut self, key: &ConnKey, seg: &Segment<'_>) {
        let now = self.state.now_ms;
        let Some(c) = self.state.conns.get_mut(key) else {
            return;
        };
        // Refusals are counted by the stream; the kernel refuses the same.
        let _ = c.stream.handle_segment(seg, now);
        let una = c.stream.client().snd_una;
        c.output.ack(u64::from(una.wrapping_sub(c.snd_una)));
        c.snd_una = una;
        let mut reset = false;
        while let Some(ev) = c.stream.poll_event() {
            match ev {
                StreamEvent::Data(bytes) => {
                    c.held_bytes += bytes.len() as u64;
                    c.held.push_back(Held::Data(bytes));
                }
                StreamEvent::Fin => c.held.push_back(Held::Fin),
                StreamEvent::Reset => reset = true,
                StreamEvent::ChallengeAck => {}
            }
        }
        if reset {
            self.end(key, None);
            return;
        }
        if c.held_bytes > HELD_INPUT_CAP {
            self.state.counters.aborted_input += 1;
            self.end(key, Some(AbortReason::InputLimit));
            return;
        }
        self.deliver_held(key);
        self.maybe_forget(key);
    }

    /// Gives the service the connection's held input while its retained
    /// output is below the limit.
    fn deliver_held(&mut self, key: &ConnKey) {
        loop {
            let Some(c) = self.state.conns.get_mut(key) else {
                return;
            };
            if c.output.unacked() >= c.output_limit() {
                return;
            }
            let Some(held) = c.held.pop_front() else {
                return;
            };
            let id = c.id;
            match held {
                Held::Data(bytes) => {
                    c.held_bytes = c.held_bytes.saturating_sub(bytes.len() as u64);
                    self.actions.push_back(Action::Consumed {
                        conn: *key,
                        bytes: bytes.clone(),
                    });
                    self.apply_service(ServiceEvent::Data { conn: id, bytes });
                }
                Held::Fin => {
                    c.fin_delivered = true;
                    self.apply_service(ServiceEvent::Closed {
                        conn: id,
                        reason: CloseReason::PeerFinished,
                    });
                }
            }
        }
    }

    /// Both directions closed and all our output acknowledged: the
    /// connection is over on every replica.
    fn maybe_forget(&mut self, key: &ConnKey) {
        let Some(c) = self.state.conns.get(key) else {
            return;
        };
        let our_fin_acked = c.fin_queued
            && c.output.unacked() == 0
            && c.snd_una
                == c.established
                    .isn
                    .wrapping_add(2)
                    .wrapping_add(c.output.sent() as u32);
        if c.fin_delivered && our_fin_acked {
            self.remove(key);
            self.actions.push_back(Action::Forget { conn: *key });
        }
    }

    fn remove(&mut self, key: &ConnKey) -> Option<ReplicaConn> {
        let c = self.state.conns.remove(key)?;
        self.state.ids.remove(&c.id);
        Some(c)
    }

    /// The connection is gone: reset by the client, aborted by the
    /// primary's kernel (`abort == None`), or aborted here for a limit.
    /// The service gets what the kernel had queued, then the reset.
    fn end(&mut self, key: &ConnKey, abort: Option<AbortReason>) {
        let Some(mut c) = self.remove(key) else {
            return;
        };
        if let Some(reason) = abort {
            self.actions.push_back(Action::Abort { conn: *key, reason });
        }
        // Output to the connection from here on is dropped (it is gone
        // from the id map), on every replica alike.
        while let Some(held) = c.held.pop_front() {
            match held {
                Held::Data(bytes) => {
                    self.apply_service(ServiceEvent::Data { conn: c.id, bytes });
                }
                Held::Fin => c.fin_delivered = true,
            }
        }
        self.apply_service(ServiceEvent::Closed {
            conn: c.id,
            reason: CloseReason::Reset,
        });
        self.actions.push_back(Action::Forget { conn: *key });
    }

    /// Runs one service event with the log's time and fresh entropy, and
    /// turns what it asked for into actions.
    fn apply_service(&mut self, event: ServiceEvent) {
        let n = self.state.applier.next_index();
        let entry = LogEntry {
            index: n,
            time_ms: self.state.now_ms,
            entropy: digest::event_entropy(self.state.tick_entropy, self.state.applied_index, n),
            event,
        };
        let outputs = match self.state.applier.apply(&mut self.service, &entry) {
            Ok(outputs) => outputs,
            // The index is the applier's own next one.
            Err(_) => return,
        };
        let mut touched = Vec::new();
        for out in outputs {
            self.handle_output(out, &mut touched);
        }
        for key in touched {
            let over = self
                .state
                .conns
                .get(&key)
                .is_some_and(|c| c.output.unacked() > OUTPUT_ABORT_FACTOR * c.output_limit());
            if over {
                self.state.counters.aborted_output += 1;
                self.end(&key, Some(AbortReason::OutputLimit));
            }
        }
    }

    fn handle_output(&mut self, out: Output, touched: &mut Vec<ConnKey>) {
        let conn_of = |state: &State, id: ConnId| state.ids.get(&id).copied();
        match out {
            Output::Send { conn, bytes } => {
                let Some(key) = conn_of(&self.state, conn) else {
                    self.state.counters.output_dropped += 1;
                    return;
                };
                let Some(c) = self.state.conns.get_mut(&key) else {
                    return;
                };
                if c.fin_queued {
                    self.state.counters.output_dropped += 1;
                    return;
                }
                c.output.push(&bytes);
                // One write is far below 2^32 bytes.
                c.stream.queue_output(bytes.len() as u32);
                if !touched.contains(&key) {
                    touched.push(key);
                }
                self.actions.push_back(Action::Write { conn: key, bytes });
            }
            Output::Close { conn } | Output::ShutdownWrite { conn } => {
                let full = matches!(out, Output::Close { .. });
                let Some(key) = conn_of(&self.state, conn) else {
                    return;
                };
                let Some(c) = self.state.conns.get_mut(&key) else {
                    return;
                };
                c.fin_queued = true;
                c.stream.queue_fin(full);
                self.actions.push_back(if full {
                    Action::Close { conn: key }
                } else {
                    Action::ShutdownWrite { conn: key }
                });
            }
            Output::SetTimer { id, at_ms } => {
                self.actions.push_back(Action::SetTimer { id, at_ms })
            }
            Output::CancelTimer { id } => self.actions.push_back(Action::CancelTimer { id }),
        }
    }
}

/// The segment a coalesced pure ACK stands for.
fn ack_segment(a: &AckState) -> Segment<'static> {
    let mut options = packet::TcpOptions::default();
    options.timestamp = a.timestamp;
    Segment {
        conn: a.conn,
        seq: a.seq,
        ack: a.ack,
        flags: TcpFlags::ACK,
        window: a.window,
        urgent: 0,
        options,
        payload: &[],
    }
}
