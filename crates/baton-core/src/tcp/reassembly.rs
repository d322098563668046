//! The client → server byte stream of one connection, rebuilt from its
//! committed segments in log order, as a sans-IO state machine.
//!
//! Every node applies the same segments, so every node rebuilds the same
//! stream; the primary's kernel got the same segments in the same order
//! (verdicts follow commits), so the rebuilt stream must be the one the
//! kernel delivered to the primary's socket. The rules are therefore the
//! kernel's (`net/ipv4/tcp_input.c`: `tcp_validate_incoming`,
//! `tcp_sequence`, `tcp_ack`, `tcp_data_queue`), not the RFCs' alone.
//!
//! Some of the kernel's state is not in the log: the window it last
//! advertised (and `rcv_wup`, where that advertisement started), its
//! memory pressure, its RTO. Where the kernel's decision depends on them,
//! this side errs towards accepting: a byte accepted here that the kernel
//! refused is retransmitted by the client and then ignored as a duplicate,
//! while a byte refused here that the kernel acknowledged would be a hole
//! in the stream for ever. RSTs are the exception: one that could close
//! the stream must match the kernel's rules exactly (RFC 5961).
//!
//! Limits, for clients that send different bytes for the same sequence
//! numbers or data past their own FIN (no real stack does): the first
//! bytes received win, and a known FIN ends the stream where it stands;
//! the kernel's choice can differ there, and the primary's comparison of
//! its socket's bytes with this stream is what notices. Urgent data is
//! delivered inline (the kernel removes the urgent byte unless the socket
//! has `SO_OOBINLINE`).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::packet::{Segment, TcpFlags, Timestamp};

/// Largest window scale (RFC 7323); the kernel clamps larger ones to it.
const MAX_WSCALE: u8 = 14;

/// SACK blocks the kernel remembers for its own ACKs (`TCP_NUM_SACKS`).
const NUM_SACKS: usize = 4;

/// After this long without a `ts_recent` update, PAWS lets any timestamp
/// through (`TCP_PAWS_WRAP`, `INT_MAX / USEC_PER_SEC` seconds since Linux
/// 6.7, as a peer's clock may tick in microseconds). A second early, so
/// that the coarser kernel clock never lets a segment through before this
/// side does; older kernels wait 24 days, and accepting more is the safe
/// side.
pub const PAWS_IDLE_MS: u64 = 2_146_000;

/// The client's SYN, which the connection starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSyn {
    pub isn: u32,
    /// Never scaled in a SYN.
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamp: Option<Timestamp>,
}

impl ClientSyn {
    /// The SYN's parameters, if `seg` is a connection request (SYN without
    /// ACK, RST or FIN, which a listener drops). Data on a SYN is not part
    /// of the stream: without a Fast Open cookie the kernel ignores it.
    pub fn from_segment(seg: &Segment<'_>) -> Option<ClientSyn> {
        let f = seg.flags;
        if !f.contains(TcpFlags::SYN)
            || f.contains(TcpFlags::ACK)
            || f.contains(TcpFlags::RST)
            || f.contains(TcpFlags::FIN)
        {
            return None;
        }
        Some(ClientSyn {
            isn: seg.seq,
            window: seg.window,
            mss: seg.options.mss,
            wscale: seg.options.wscale,
            sack_permitted: seg.options.sack_permitted,
            timestamp: seg.options.timestamp,
        })
    }
}

/// Our side of the handshake, from the log's established entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerParams {
    /// Our initial sequence number.
    pub isn: u32,
    /// The window scale we offered, if any: the client's own scale counts
    /// only when both sides offered one.
    pub wscale: Option<u8>,
    /// Whether we offered SACK.
    pub sack: bool,
    /// Whether we offered timestamps.
    pub timestamps: bool,
    /// Bytes past `rcv_nxt` the server's kernel may ever advertise. The
    /// advertised window is not in the log, so this bound stands in for
    /// it: data past it is refused and out-of-order data is held only
    /// within it (plus the one segment that straddles it). It must not be
    /// below what the kernel can advertise (`65535 << wscale` never is).
    pub max_window: u32,
}

/// What the stream hands to the service, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The next bytes of the stream; each byte once.
    Data(Vec<u8>),
    /// The client's FIN, after all its data: the client will send no more.
    Fin,
    /// The connection is gone in the kernel: an acceptable RST from the
    /// client, or the kernel's own reset on data after the stream closed.
    Reset,
    /// The kernel answered a suspicious segment (a non-exact RST, a SYN,
    /// an ACK of data long acknowledged) with a challenge ACK (RFC 5961).
    ChallengeAck,
}

/// Why a segment was refused (or, for [`Refusal::Duplicate`], not needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum Refusal {
    /// Neither ACK, RST nor SYN set: the kernel drops such segments.
    #[error("neither ACK, RST nor SYN set")]
    NoAck,
    /// PAWS: a timestamp older than the newest in-order one.
    #[error("timestamp older than ts_recent (PAWS)")]
    Paws,
    /// Entirely before `rcv_nxt`: a retransmission of what we have.
    #[error("entirely before rcv_nxt")]
    OldSequence,
    /// Entirely received already, though its ACK was used.
    #[error("data already received")]
    Duplicate,
    /// Starts past the receive window.
    #[error("beyond the receive window")]
    OutOfWindow,
    /// A SYN on an established connection (challenge ACK).
    #[error("SYN on an established connection")]
    Syn,
    /// An RST inside the window but not at `rcv_nxt` (challenge ACK).
    #[error("RST in the window but not at rcv_nxt")]
    RstNotExact,
    /// An RST outside the window (dropped silently).
    #[error("RST outside the window")]
    RstOutOfWindow,
    /// Acknowledges data older than the client's window (RFC 5961 5.2;
    /// challenge ACK).
    #[error("acknowledges data older than the client's window")]
    AckTooOld,
    /// Acknowledges data the service has not sent.
    #[error("acknowledges data not sent")]
    AckUnsent,
    /// Data past the client's FIN.
    #[error("data past the client's FIN")]
    AfterFin,
    /// The connection was reset.
    #[error("connection reset")]
    Closed,
}

impl Refusal {
    /// Every reason, in [`Counters`] order.
    pub const ALL: [Refusal; 12] = [
        Refusal::NoAck,
        Refusal::Paws,
        Refusal::OldSequence,
        Refusal::Duplicate,
        Refusal::OutOfWindow,
        Refusal::Syn,
        Refusal::RstNotExact,
        Refusal::RstOutOfWindow,
        Refusal::AckTooOld,
        Refusal::AckUnsent,
        Refusal::AfterFin,
        Refusal::Closed,
    ];

    fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }
}

/// Segment counts, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Segments used (data, FIN, RST or ACK).
    pub accepted: u64,
    pub challenge_acks: u64,
    refused: [u64; Refusal::ALL.len()],
}

impl Counters {
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why.index()]
    }

    /// All refusals but duplicates, which are normal retransmissions.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum::<u64>() - self.refused(Refusal::Duplicate)
    }
}

/// The client's sending state as the server's kernel knows it: what a
/// takeover needs to rebuild our send side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientView {
    /// Highest acceptable ACK: the kernel's `snd_una`.
    pub snd_una: u32,
    /// The client's window in bytes (scaled), and the sequence number of
    /// the segment it came from (`snd_wl1`): together they decide whether
    /// a later window update is believed.
    pub snd_wnd: u32,
    pub snd_wl1: u32,
    /// Largest window the client ever offered (`max_window`).
    pub max_window: u32,
    /// The client's window scale (0 when not negotiated).
    pub wscale: u8,
    /// The newest timestamp the client sent on an accepted segment.
    pub timestamp: Option<Timestamp>,
}

/// Receive-side reassembly of one connection's client stream. It is
/// serializable so that a replica's checkpoint carries it whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassembler {
    /// The client's ISN + 1: sequence number of stream offset 0.
    base: u32,
    /// Stream offset of `rcv_nxt` (the FIN counts one, like in sequence
    /// space), so that no comparison inside the stream wraps.
    rcv_off: u64,
    max_window: u32,
    /// Out-of-order bytes by stream offset; chunks never overlap.
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
    /// Offset of the client's FIN, once any accepted segment carried one.
    fin_off: Option<u64>,
    fin_received: bool,
    /// The service closed both directions (the kernel's `RCV_SHUTDOWN`).
    full_close: bool,
    reset: bool,
    /// The kernel's `selective_acks`: the SACK blocks it would send, most
    /// recent first. An RST at the right edge of one is acceptable.
    sack_on: bool,
    sacks: Vec<(u64, u64)>,
    ts_on: bool,
    ts_recent: u32,
    ts_recent_ms: u64,
    client: ClientView,
    /// Bytes (and FIN) of ours the client acknowledged (`bytes_acked`).
    bytes_acked: u64,
    /// Highest sequence number the client may acknowledge: our ISN + 1 +
    /// the service's output (+ 1 for our FIN). The kernel's `snd_nxt` is
    /// at most this; the exact value is not in the log.
    snd_limit: u32,
    fin_queued: bool,
    events: VecDeque<Event>,
    counters: Counters,
}

/// `a` is before `b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

impl Reassembler {
    /// A connection established from the client's SYN and our parameters;
    /// `now_ms` is the log's time at establishment.
    pub fn new(syn: &ClientSyn, server: &ServerParams, now_ms: u64) -> Reassembler {
        let wscale = match (syn.wscale, server.wscale) {
            (Some(client), Some(_)) => client.min(MAX_WSCALE),
            _ => 0,
        };
        let ts_on = server.timestamps && syn.timestamp.is_some();
        let isn1 = server.isn.wrapping_add(1);
        Reassembler {
            base: syn.isn.wrapping_add(1),
            rcv_off: 0,
            // Sequence comparisons hold within half the space; no scaled
            // window comes near 2^30.
            max_window: server.max_window.clamp(1, 1 << 30),
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            fin_off: None,
            fin_received: false,
            full_close: false,
            reset: false,
            sack_on: server.sack && syn.sack_permitted,
            sacks: Vec::new(),
            ts_on,
            ts_recent: syn.timestamp.map_or(0, |t| t.tsval),
            ts_recent_ms: now_ms,
            client: ClientView {
                snd_una: isn1,
                snd_wnd: u32::from(syn.window),
                snd_wl1: syn.isn,
                // The kernel starts it from the handshake's ACK, which is
                // the first window update here.
                max_window: 0,
                wscale,
                timestamp: if ts_on { syn.timestamp } else { None },
            },
            bytes_acked: 0,
            snd_limit: isn1,
            fin_queued: false,
            events: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// The next sequence number expected from the client (the kernel's
    /// `rcv_nxt`), FIN included once received.
    pub fn rcv_nxt(&self) -> u32 {
        self.base.wrapping_add(self.rcv_off as u32)
    }

    /// The client's sending state, for a takeover.
    pub fn client(&self) -> ClientView {
        self.client
    }

    /// The newest timestamp that passed PAWS in order (`ts_recent`), if
    /// timestamps are on.
    pub fn ts_recent(&self) -> Option<u32> {
        self.ts_on.then_some(self.ts_recent)
    }

    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    /// The service closed both directions (not only its own).
    pub fn fully_closed(&self) -> bool {
        self.full_close
    }

    pub fn is_reset(&self) -> bool {
        self.reset
    }

    /// Bytes held out of order: bounded by the window plus one segment.
    pub fn ooo_bytes(&self) -> usize {
        self.ooo_bytes
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The service queued `len` more bytes on this connection: the client
    /// may acknowledge that much further.
    pub fn queue_output(&mut self, len: u32) {
        self.snd_limit = self.snd_limit.wrapping_add(len);
    }

    /// The service closed its direction (our FIN follows the output).
    /// `full_close` says it closed the socket rather than shutting down
    /// writes: the kernel then resets the connection on new client data.
    pub fn queue_fin(&mut self, full_close: bool) {
        if !self.fin_queued {
            self.fin_queued = true;
            self.snd_limit = self.snd_limit.wrapping_add(1);
        }
        self.full_close |= full_close;
    }

    /// The next event for the service, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Applies one committed client segment of this connection. `now_ms` is
    /// the log's time. A refusal changes nothing but the counters and a
    /// [`Event::ChallengeAck`], except that the refusals found after the
    /// ACK check ([`Refusal::Duplicate`], and [`Refusal::OutOfWindow`] or
    /// [`Refusal::AfterFin`] of a segment inside the sequence window) leave
    /// its ACK, window and timestamp used, as the kernel uses them.
    pub fn handle_segment(&mut self, seg: &Segment<'_>, now_ms: u64) -> Result<(), Refusal> {
        let outcome = self.apply(seg, now_ms);
        match outcome {
            Ok(()) => self.counters.accepted += 1,
            Err(why) => self.counters.refused[why.index()] += 1,
        }
        outcome
    }

    fn challenge(&mut self) {
        self.counters.challenge_acks += 1;
        self.events.push_back(Event::ChallengeAck);
    }

    fn do_reset(&mut self) {
        self.reset = true;
        self.ooo.clear();
        self.ooo_bytes = 0;
        self.sacks.clear();
        self.events.push_back(Event::Reset);
    }

    /// Stream offset of a sequence number near `rcv_nxt`.
    fn off(&self, seq: u32) -> i64 {
        self.rcv_off as i64 + i64::from(seq.wrapping_sub(self.rcv_nxt()) as i32)
    }

    /// `tcp_paws_check`: whether `tsval` is recent enough against
    /// `ts_recent`, allowing `window` ticks of slack.
    fn paws_ok(&self, tsval: u32, window: i32, now_ms: u64) -> bool {
        (self.ts_recent.wrapping_sub(tsval) as i32) <= window
            || now_ms.saturating_sub(self.ts_recent_ms) >= PAWS_IDLE_MS
            || self.ts_recent == 0
    }

    fn apply(&mut self, seg: &Segment<'_>, now_ms: u64) -> Result<(), Refusal> {
        if self.reset {
            return Err(Refusal::Closed);
        }
        let f = seg.flags;
        let (syn, rst, fin) = (
            f.contains(TcpFlags::SYN),
            f.contains(TcpFlags::RST),
            f.contains(TcpFlags::FIN),
        );
        if !f.contains(TcpFlags::ACK) && !rst && !syn {
            return Err(Refusal::NoAck);
        }
        let ts = if self.ts_on {
            seg.options.timestamp
        } else {
            None
        };

        // RFC 7323 PAWS first; an RST goes on to the sequence checks.
        if let Some(ts) = ts {
            if !rst && !self.paws_ok(ts.tsval, 1, now_ms) {
                if syn {
                    self.challenge();
                    return Err(Refusal::Syn);
                }
                return Err(Refusal::Paws);
            }
        }

        // Sequence window (`tcp_sequence`, with `rcv_wup` taken as
        // `rcv_nxt`: the kernel's is at most that, so it can only accept
        // more old segments, whose data is not new anyway). A segment that
        // starts inside the window is taken whole, as the kernel does when
        // its receive queue is empty.
        let rcv_nxt = self.rcv_nxt();
        let seq = seg.seq;
        let end = seg.end_seq();
        let edge = rcv_nxt.wrapping_add(self.max_window);
        let old = before(end, rcv_nxt);
        if old || after(seq, edge) {
            if rst {
                if self.reset_at_fin(seq) {
                    self.do_reset();
                    return Ok(());
                }
                return Err(Refusal::RstOutOfWindow);
            }
            if syn {
                self.challenge();
                return Err(Refusal::Syn);
            }
            return Err(if old {
                Refusal::OldSequence
            } else {
                Refusal::OutOfWindow
            });
        }

        // RFC 5961 3.2: an RST resets only at exactly `rcv_nxt` (or one
        // before it after the client's FIN, or at the right edge of the
        // SACK blocks we would send); any other challenges.
        if rst {
            let at_sack_edge = self.sack_on
                && self
                    .sacks
                    .iter()
                    .map(|b| b.1)
                    .max()
                    .is_some_and(|edge| self.off(seq) == edge as i64);
            if seq == rcv_nxt || self.reset_at_fin(seq) || at_sack_edge {
                self.do_reset();
                return Ok(());
            }
            self.challenge();
            return Err(Refusal::RstNotExact);
        }
        // RFC 5961 4.2: a SYN on an established connection.
        if syn {
            self.challenge();
            return Err(Refusal::Syn);
        }

        self.check_ack(seg)?;

        // `tcp_replace_ts_recent`: only a segment at the left edge moves
        // `ts_recent`, and never backwards.
        if let Some(ts) = ts {
            if !after(seq, rcv_nxt) && self.paws_ok(ts.tsval, 0, now_ms) {
                self.ts_recent = ts.tsval;
                self.ts_recent_ms = now_ms;
            }
            let newer = self
                .client
                .timestamp
                .is_none_or(|t| !before(ts.tsval, t.tsval));
            if newer {
                self.client.timestamp = Some(ts);
            }
        }

        self.queue_data(seg, fin)
    }

    /// `tcp_reset_check`: after the client's FIN, an RST one before
    /// `rcv_nxt` (on the FIN itself) is acceptable too.
    fn reset_at_fin(&self, seq: u32) -> bool {
        self.fin_received && seq == self.rcv_nxt().wrapping_sub(1)
    }

    /// `tcp_ack`'s checks and `tcp_ack_update_window`.
    fn check_ack(&mut self, seg: &Segment<'_>) -> Result<(), Refusal> {
        let ack = seg.ack;
        let c = &mut self.client;
        if before(ack, c.snd_una) {
            let window = u64::from(c.max_window).min(self.bytes_acked) as u32;
            if before(ack, c.snd_una.wrapping_sub(window)) {
                self.challenge();
                return Err(Refusal::AckTooOld);
            }
            // An old ACK: its window is not believed; its data is used.
            return Ok(());
        }
        if after(ack, self.snd_limit) {
            return Err(Refusal::AckUnsent);
        }
        let nwin = u32::from(seg.window) << c.wscale;
        let may_update = after(ack, c.snd_una)
            || after(seg.seq, c.snd_wl1)
            || (seg.seq == c.snd_wl1 && nwin > c.snd_wnd);
        if may_update {
            c.snd_wl1 = seg.seq;
            c.snd_wnd = nwin;
            c.max_window = c.max_window.max(nwin);
        }
        self.bytes_acked += u64::from(ack.wrapping_sub(c.snd_una));
        c.snd_una = ack;
        Ok(())
    }

    /// `tcp_data_queue` and the state checks before it.
    fn queue_data(&mut self, seg: &Segment<'_>, fin: bool) -> Result<(), Refusal> {
        let seq = seg.seq;
        let end = seg.end_seq();
        let rcv_nxt = self.rcv_nxt();
        let occupies = seq != end;
        // Once the kernel will read no more (the client's FIN is in, or
        // the service closed the socket), data past `rcv_nxt` makes it
        // reset the connection (RFC 1122).
        let new_data = occupies && after(end.wrapping_sub(u32::from(fin)), rcv_nxt);
        if self.fin_received {
            if !before(seq, rcv_nxt) {
                return if occupies {
                    Err(Refusal::AfterFin)
                } else {
                    Ok(())
                };
            }
            if new_data {
                self.do_reset();
                return Ok(());
            }
            return if occupies {
                Err(Refusal::Duplicate)
            } else {
                Ok(())
            };
        }
        if self.full_close && new_data {
            self.do_reset();
            return Ok(());
        }
        if !occupies {
            return Ok(());
        }
        if !after(end, rcv_nxt) {
            return Err(Refusal::Duplicate);
        }
        if seq != rcv_nxt && !before(seq, rcv_nxt.wrapping_add(self.max_window)) {
            return Err(Refusal::OutOfWindow);
        }

        let start = self.off(seq);
        let len = seg.payload.len() as i64;
        if fin && self.fin_off.is_none() {
            // `end` is past `rcv_nxt`, so the FIN is not behind it.
            self.fin_off = Some((start + len) as u64);
        }
        let limit = self.fin_off.map_or(i64::MAX, |f| f as i64);
        let rcv_off = self.rcv_off as i64;
        if start > rcv_off && start >= limit && len > 0 {
            return Err(Refusal::AfterFin);
        }
        let from = (rcv_off - start).clamp(0, len) as usize;
        let to = (limit - start).clamp(from as i64, len) as usize;
        let bytes = &seg.payload[from..to];
        if start <= rcv_off {
            self.deliver(bytes);
            self.drain_ooo();
            self.check_fin();
            self.sack_remove();
        } else {
            self.insert_ooo(start as u64, bytes);
            if self.sack_on {
                self.sack_new(start as u64, (start + i64::from(seg.seq_len())) as u64);
            }
        }
        Ok(())
    }

    fn deliver(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.rcv_off += bytes.len() as u64;
        if let Some(Event::Data(last)) = self.events.back_mut() {
            last.extend_from_slice(bytes);
        } else {
            self.events.push_back(Event::Data(bytes.to_vec()));
        }
    }

    /// Moves out-of-order chunks that the stream reached into it.
    fn drain_ooo(&mut self) {
        let limit = self.fin_off.unwrap_or(u64::MAX);
        while let Some(entry) = self.ooo.first_entry() {
            let start = *entry.key();
            if start > self.rcv_off {
                break;
            }
            let chunk = entry.remove();
            self.ooo_bytes -= chunk.len();
            let end = (start + chunk.len() as u64).min(limit);
            if end > self.rcv_off {
                let from = (self.rcv_off - start) as usize;
                let to = (end - start) as usize;
                self.deliver(&chunk[from..to]);
            }
        }
    }

    /// The FIN, once every byte before it is in: after it the kernel keeps
    /// nothing out of order (`tcp_fin`).
    fn check_fin(&mut self) {
        if !self.fin_received && self.fin_off == Some(self.rcv_off) {
            self.rcv_off += 1;
            self.fin_received = true;
            self.ooo.clear();
            self.ooo_bytes = 0;
            self.sacks.clear();
            self.events.push_back(Event::Fin);
        }
    }

    /// Stores the parts of `bytes` (at stream offset `start`) not held yet:
    /// the first bytes received for an offset win.
    fn insert_ooo(&mut self, start: u64, bytes: &[u8]) {
        let end = start + bytes.len() as u64;
        let mut cursor = start;
        if let Some((&s, chunk)) = self.ooo.range(..start).next_back() {
            cursor = cursor.max(s + chunk.len() as u64);
        }
        let held: Vec<(u64, u64)> = self
            .ooo
            .range(start..end)
            .map(|(&s, chunk)| (s, s + chunk.len() as u64))
            .collect();
        let mut gaps = Vec::new();
        for (s, e) in held {
            if s > cursor {
                gaps.push((cursor, s));
            }
            cursor = cursor.max(e);
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for (s, e) in gaps {
            let piece = bytes[(s - start) as usize..(e - start) as usize].to_vec();
            self.ooo_bytes += piece.len();
            self.ooo.insert(s, piece);
        }
    }

    /// `tcp_sack_new_ofo_skb`: the block of a new out-of-order segment
    /// extends a remembered one (moved to the front) or becomes the first,
    /// pushing out the oldest.
    fn sack_new(&mut self, start: u64, end: u64) {
        if let Some(i) = self
            .sacks
            .iter_mut()
            .position(|b| sack_extend(b, start, end))
        {
            let block = self.sacks.remove(i);
            self.sacks.insert(0, block);
            // `tcp_sack_maybe_coalesce`: the grown block may swallow others.
            let mut first = self.sacks[0];
            let mut j = 1;
            while j < self.sacks.len() {
                let (s, e) = self.sacks[j];
                if sack_extend(&mut first, s, e) {
                    self.sacks.remove(j);
                } else {
                    j += 1;
                }
            }
            self.sacks[0] = first;
            return;
        }
        if self.sacks.len() >= NUM_SACKS {
            self.sacks.pop();
        }
        self.sacks.insert(0, (start, end));
    }

    /// `tcp_sack_remove`: blocks that `rcv_nxt` reached are gone.
    fn sack_remove(&mut self) {
        if self.ooo.is_empty() {
            self.sacks.clear();
        } else {
            let rcv_off = self.rcv_off;
            self.sacks.retain(|b| b.0 > rcv_off);
        }
    }
}

/// `tcp_sack_extend`: grows `block` by an overlapping or adjacent range.
fn sack_extend(block: &mut (u64, u64), start: u64, end: u64) -> bool {
    if start <= block.1 && block.0 <= end {
        block.0 = block.0.min(start);
        block.1 = block.1.max(end);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests;
