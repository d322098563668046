//! Takeover: the TCP state of each open connection, computed from the log
//! alone, for a new primary to rebuild its socket with TCP_REPAIR after
//! the old primary died.
//!
//! Everything comes from committed entries (the same on every replica),
//! except the new primary's clock, which is passed in:
//! - sequence numbers: our ISN (established entry) plus the output, and
//!   the client's ISN plus what reassembly accepted (`rcv_nxt`);
//! - `snd_una`: the client's latest committed ACK. The output from there
//!   on is restored as sent and unacknowledged: the client may hold more
//!   of it than the log knows (its newer ACKs were not committed), and an
//!   ACK of bytes the socket never sent would be dropped. Its last segment
//!   (up to one MSS) is the exception when it surely goes out at once (the
//!   rest fits the new socket's initial congestion window, and the
//!   client's window takes it): restored as not yet sent, it leaves as a
//!   fresh segment. The client's answer to it (an ACK, or a SACK when
//!   bytes before it are missing) gives the rebuilt socket its first RTT
//!   sample and starts its loss recovery at once; otherwise a lost tail
//!   waits for the first retransmission timeout of a socket without an RTT
//!   estimate, a second or more. (Were it held back by the congestion
//!   window, an ACK of it would be dropped as an ACK of unsent data, and
//!   the connection would stall.)
//! - the receive queue: client bytes committed but not yet consumed by the
//!   service (the primary reads only what it consumed, so its kernel held
//!   them);
//! - windows: the client's from its segments; ours as large as the kernel
//!   can advertise, so that what the client may send is seldom out of the
//!   rebuilt window, but never past half the replica's input cap counting
//!   the unread bytes: each rebuild opens a window the service has not
//!   consumed, and takeovers in a row would otherwise stack them past the
//!   cap, which aborts the connection (a client past a window smaller than
//!   the old one only resends);
//! - the timestamp clock: the primary's clock logged at the established
//!   entry, extrapolated to now by the log's time, plus a margin. TCP
//!   timestamps must never go back (the client's PAWS check would drop
//!   every segment), so the margin covers what the extrapolation cannot
//!   know: clock offset between the nodes, and the time the old primary
//!   may still have been sending (its lease, and the detection).
//!
//! Not restored: client data held out of order (the kernel's SACKed
//! bytes; the client sends them again), and `ts_recent` (no TCP_REPAIR
//! field: the kernel takes the client's next timestamp).

use super::apply::{ReplicaConn, HELD_INPUT_CAP};
use crate::packet::ConnKey;
use crate::tcp_state::{seq_after, RepairWindow, SocketOptions, TcpConnState, TcpState};

/// Segments a new socket may send before its first ACK (the kernel's
/// `TCP_INIT_CWND`): the rebuilt socket's in-flight segments count
/// against it.
pub const INITIAL_CWND: usize = 10;

/// The TCP state of a connection as the log leaves it, for a new primary
/// whose wall clock reads `now_ms` (ms since the Unix epoch, the log's
/// time base). `margin_ms` is added to the extrapolated timestamp clock
/// (see the module docs). None when there is nothing to rebuild: both
/// directions are closed and our FIN is acknowledged.
pub fn conn_state(
    key: &ConnKey,
    conn: &ReplicaConn,
    now_ms: u64,
    margin_ms: u64,
) -> Option<TcpConnState> {
    let e = conn.established();
    let stream = conn.stream();
    let client = stream.client();
    let output = conn.output();
    // Our sequence space: SYN, output, FIN.
    let first_unacked = e.isn.wrapping_add(1).wrapping_add(output.acked() as u32);
    let after_output = e.isn.wrapping_add(1).wrapping_add(output.sent() as u32);
    let fin_queued = conn.fin_queued();
    let fin_acked = fin_queued && client.snd_una == after_output.wrapping_add(1);
    let state = match (stream.fin_received(), fin_queued, fin_acked) {
        (false, false, _) => TcpState::Established,
        (true, false, _) => TcpState::CloseWait,
        (false, true, false) => TcpState::FinWait1,
        (false, true, true) => TcpState::FinWait2,
        (true, true, false) => TcpState::LastAck,
        (true, true, true) => return None,
    };
    let unread = conn.unread();
    let unread_len = unread.len();
    let rcv_nxt = stream.rcv_nxt();
    let recv_seq = rcv_nxt
        .wrapping_sub(u32::from(stream.fin_received()))
        .wrapping_sub(unread.len() as u32);
    let options = conn.negotiated();
    let rcv_scale = options.window_scale.map_or(0, |w| w.rcv);
    let mut unacked: Vec<u8> = output.retained().copied().collect();
    let mss = usize::from(options.mss.max(1));
    let tail = unacked.len().min(mss);
    let head_segments = (unacked.len() - tail).div_ceil(mss);
    let window_end = client.snd_una.wrapping_add(client.snd_wnd);
    let unsent = if head_segments < INITIAL_CWND && !seq_after(after_output, window_end) {
        unacked.split_off(unacked.len() - tail)
    } else {
        Vec::new()
    };
    Some(TcpConnState {
        // Keys come from parsed packets: plain addresses already.
        local: key.server,
        remote: key.client,
        state,
        send_seq: first_unacked,
        unacked,
        unsent,
        recv_seq,
        unread,
        options,
        timestamp: timestamp_clock(e.ts_clock, conn.established_at_ms(), now_ms, margin_ms),
        window: RepairWindow {
            snd_wl1: client.snd_wl1,
            snd_wnd: client.snd_wnd,
            max_window: client.max_window.max(client.snd_wnd),
            // The most the kernel can advertise with our scale, within
            // the input the replica may still hold.
            rcv_wnd: (65_535u32 << rcv_scale).min(
                u32::try_from((HELD_INPUT_CAP / 2).saturating_sub(unread_len as u64))
                    .unwrap_or(u32::MAX),
            ),
            rcv_wup: rcv_nxt,
        },
        sockopts: SocketOptions {
            // The primary's sockets have it (replies go out at once).
            nodelay: true,
            ..SocketOptions::default()
        },
    })
}

/// The primary's TCP timestamp clock (TCP_TIMESTAMP's value) at `now_ms`,
/// from its value `clock` at log time `at_ms`, plus `margin_ms`. The
/// kernel's value carries a flag in its low bit (set: the clock ticks in
/// microseconds); the flag is kept and the ticks follow it.
pub fn timestamp_clock(clock: u32, at_ms: u64, now_ms: u64, margin_ms: u64) -> u32 {
    let elapsed_ms = now_ms.saturating_sub(at_ms).saturating_add(margin_ms);
    let usec = clock & 1 == 1;
    let ticks = if usec {
        elapsed_ms.wrapping_mul(1000)
    } else {
        elapsed_ms
    };
    // Modulo 2^32, as the clock itself wraps.
    ((clock & !1).wrapping_add(ticks as u32) & !1) | (clock & 1)
}
