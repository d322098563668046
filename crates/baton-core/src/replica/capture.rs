//! The primary's decisions on each captured client packet, before its
//! kernel sees it: nothing but a pure ACK reaches the kernel before its log
//! entry is committed (durable before acknowledged).
//!
//! - Malformed: dropped and counted, never proposed (the client
//!   retransmits a packet that was damaged on the way).
//! - Pure ACK (no payload, no SYN, FIN or RST): accepted at once. Its ACK
//!   number, window and timestamp are kept as the connection's one pending
//!   [`AckState`], replaced by newer ones, and proposed with the next batch
//!   (or when the caller asks), so clones learn what the client
//!   acknowledged without one entry per ACK.
//! - Anything else: proposed as is; accepted once its entry is committed,
//!   in log order.
//!
//! Proposals and verdicts come out in batches, so the runtime proposes and
//! answers the kernel with few calls.

use std::collections::{BTreeMap, VecDeque};

use super::entry::{AckState, ClientSegment, ReplicaEntry};
use crate::packet::{self, ConnKey, TcpChecksum, TcpFlags};

/// The queue's id of a captured packet, which its verdict names.
pub type PacketId = u32;

/// What the kernel is told about a captured packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// One entry to propose, and the packets whose verdict waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub packet_ids: Vec<PacketId>,
    pub entry: ReplicaEntry,
}

/// Counts of the capture path's decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureCounters {
    pub malformed: u64,
    pub pure_acks: u64,
    /// Pure ACKs folded into a pending ACK state instead of a new one.
    pub acks_coalesced: u64,
    pub proposed: u64,
    pub accepted_after_commit: u64,
    /// Packets dropped because their proposal failed (lost leadership).
    pub dropped_unproposed: u64,
    /// Packets dropped unread: this node does not serve (it is no
    /// primary), or the queue cut them short.
    pub refused: u64,
}

/// The capture state machine of a primary: packets in
/// ([`Capture::handle_captured`]), proposals and verdicts out.
#[derive(Debug, Default)]
pub struct Capture {
    to_propose: Vec<Proposal>,
    /// The newest pure ACK per connection not yet proposed.
    acks: BTreeMap<ConnKey, AckState>,
    /// Packets waiting for their entry's commit, by log index.
    waiting: BTreeMap<u64, Vec<PacketId>>,
    committed: u64,
    verdicts: VecDeque<(PacketId, Verdict)>,
    counters: CaptureCounters,
}

/// `a` is before `b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Capture {
    /// A capture path that has seen nothing, with nothing committed.
    pub fn new() -> Capture {
        Capture::default()
    }

    pub fn counters(&self) -> &CaptureCounters {
        &self.counters
    }

    /// Highest index reported committed.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Packets whose verdict waits for a commit.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(Vec::len).sum()
    }

    /// One captured packet (raw IP), with the checksum rule from its queue
    /// metadata.
    pub fn handle_captured(&mut self, id: PacketId, bytes: &[u8], checksum: TcpChecksum) {
        let seg = match packet::parse(bytes, checksum) {
            Ok(seg) => seg,
            Err(_) => {
                self.counters.malformed += 1;
                self.verdicts.push_back((id, Verdict::Drop));
                return;
            }
        };
        let f = seg.flags;
        let control =
            f.contains(TcpFlags::SYN) || f.contains(TcpFlags::FIN) || f.contains(TcpFlags::RST);
        if seg.payload.is_empty() && !control {
            self.counters.pure_acks += 1;
            self.verdicts.push_back((id, Verdict::Accept));
            if f.contains(TcpFlags::ACK) {
                let state = AckState {
                    conn: seg.conn,
                    seq: seg.seq,
                    ack: seg.ack,
                    window: seg.window,
                    timestamp: seg.options.timestamp,
                };
                match self.acks.get_mut(&seg.conn) {
                    Some(old) => {
                        self.counters.acks_coalesced += 1;
                        // A reordered older ACK does not undo a newer one.
                        if !before(state.ack, old.ack) {
                            *old = state;
                        }
                    }
                    None => {
                        self.acks.insert(seg.conn, state);
                    }
                }
            }
            return;
        }
        self.counters.proposed += 1;
        self.to_propose.push(Proposal {
            packet_ids: vec![id],
            entry: ReplicaEntry::Segment(ClientSegment {
                packet: bytes.to_vec(),
                verify_checksum: checksum == TcpChecksum::Verify,
            }),
        });
    }

    /// A packet this node must not answer (it is no primary, or the queue
    /// cut it short): dropped, fail-closed.
    pub fn handle_refused(&mut self, id: PacketId) {
        self.counters.refused += 1;
        self.verdicts.push_back((id, Verdict::Drop));
    }

    /// The entries to propose now, in order: pending ACK states first (they
    /// passed to the kernel before), then segments. ACK states go with any
    /// segment batch, or alone when `flush_acks` (the runtime's periodic
    /// flush).
    pub fn poll_proposals(&mut self, flush_acks: bool) -> Vec<Proposal> {
        let mut out = Vec::new();
        if flush_acks || !self.to_propose.is_empty() {
            out.extend(
                std::mem::take(&mut self.acks)
                    .into_values()
                    .map(|a| Proposal {
                        packet_ids: Vec::new(),
                        entry: ReplicaEntry::AckState(a),
                    }),
            );
        }
        out.append(&mut self.to_propose);
        out
    }

    /// The log placed the entry of `packet_ids` at `index`.
    pub fn handle_proposed(&mut self, packet_ids: &[PacketId], index: u64) {
        if packet_ids.is_empty() {
            return;
        }
        if index <= self.committed {
            self.counters.accepted_after_commit += packet_ids.len() as u64;
            self.verdicts
                .extend(packet_ids.iter().map(|id| (*id, Verdict::Accept)));
            return;
        }
        self.waiting
            .entry(index)
            .or_default()
            .extend_from_slice(packet_ids);
    }

    /// The log could not take these packets' entry (no longer leader): they
    /// are dropped, and the client retransmits them.
    pub fn handle_proposal_failed(&mut self, packet_ids: &[PacketId]) {
        self.counters.dropped_unproposed += packet_ids.len() as u64;
        self.verdicts
            .extend(packet_ids.iter().map(|id| (*id, Verdict::Drop)));
    }

    /// Leadership is lost: every packet still waiting is dropped (the new
    /// primary holds its own copies), and pending ACK states are forgotten.
    pub fn handle_lost_leadership(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for ids in waiting.into_values() {
            self.handle_proposal_failed(&ids);
        }
        let pending = std::mem::take(&mut self.to_propose);
        for p in pending {
            self.handle_proposal_failed(&p.packet_ids);
        }
        self.acks.clear();
    }

    /// Entries up to `index` are committed: their packets are accepted, in
    /// log order.
    pub fn handle_commit(&mut self, index: u64) {
        if index <= self.committed {
            return;
        }
        self.committed = index;
        let later = match index.checked_add(1) {
            Some(next) => self.waiting.split_off(&next),
            None => BTreeMap::new(),
        };
        let done = std::mem::replace(&mut self.waiting, later);
        for ids in done.into_values() {
            self.counters.accepted_after_commit += ids.len() as u64;
            self.verdicts
                .extend(ids.into_iter().map(|id| (id, Verdict::Accept)));
        }
    }

    /// The verdicts decided so far, in order.
    pub fn poll_verdicts(&mut self) -> Vec<(PacketId, Verdict)> {
        self.verdicts.drain(..).collect()
    }
}
