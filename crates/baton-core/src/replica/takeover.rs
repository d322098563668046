//! Takeover: the TCP state of each open connection, computed from the log
//! alone, for a new primary to rebuild its socket with TCP_REPAIR after
//! the old primary died.
//!
//! Everything comes from committed entries (the same on every replica),
//! except the new primary's clock, which is passed in:
//! - sequence numbers: our ISN (established entry) plus the output, and
//!   the client's ISN plus what reassembly accepted (`rcv_nxt`);
//! - `snd_una`: the client's latest committed ACK. All output from there
//!   on is restored as sent and unacknowledged: the client may hold more
//!   of it than the log knows (its newer ACKs were not committed), and an
//!   ACK of bytes the socket never sent would be dropped. What the client
//!   lacks is sent again by the socket's own retransmission;
//! - the receive queue: client bytes committed but not yet consumed by the
//!   service (the primary reads only what it consumed, so its kernel held
//!   them);
//! - windows: the client's from its segments; ours as large as the kernel
//!   could ever have advertised, so no byte the client may send is out of
//!   the rebuilt window;
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

use std::net::SocketAddr;

use super::apply::ReplicaConn;
use crate::packet::ConnKey;
use crate::tcp_state::{RepairWindow, SocketOptions, TcpConnState, TcpState};

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
    let rcv_nxt = stream.rcv_nxt();
    let recv_seq = rcv_nxt
        .wrapping_sub(u32::from(stream.fin_received()))
        .wrapping_sub(unread.len() as u32);
    let options = conn.negotiated();
    let rcv_scale = options.window_scale.map_or(0, |w| w.rcv);
    Some(TcpConnState {
        local: plain(key.server),
        remote: plain(key.client),
        state,
        send_seq: first_unacked,
        unacked: output.retained().copied().collect(),
        unsent: Vec::new(),
        recv_seq,
        unread,
        options,
        timestamp: timestamp_clock(e.ts_clock, conn.established_at_ms(), now_ms, margin_ms),
        window: RepairWindow {
            snd_wl1: client.snd_wl1,
            snd_wnd: client.snd_wnd,
            max_window: client.max_window.max(client.snd_wnd),
            // The most the kernel can advertise with our scale.
            rcv_wnd: 65_535u32 << rcv_scale,
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

/// The addresses a socket binds and connects to: packets never carry
/// v4-mapped IPv6 addresses, flow labels or scopes.
fn plain(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
