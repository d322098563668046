//! The full state of one TCP connection, as frozen from a kernel socket (or
//! computed from the log) and handed to a kernel to thaw it with TCP_REPAIR.
//!
//! Sequence conventions: `send_seq` is the sequence number of the first byte
//! of `unacked` (the kernel's `snd_una`, unless our FIN is already
//! acknowledged, see below) and `recv_seq` the one of the first byte of
//! `unread` (the kernel's `copied_seq`). FINs are never in the byte queues:
//! our FIN, when [`TcpState::fin_sent`], sits right after `unsent`; the
//! peer's FIN, when [`TcpState::fin_received`], right after `unread`. So a
//! state is the same whatever host it was frozen on, and [`TcpConnState::snd_nxt`],
//! [`TcpConnState::write_seq`] and [`TcpConnState::rcv_nxt`] derive the rest.
//!
//! The encoding is a `BTCS` frame of [`crate::wire`]; decoding also checks
//! that the state makes sense (a kernel would refuse it otherwise, half-way
//! through a thaw), so a bad state is refused before any socket is touched.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::wire::{self, WireError};

/// Frame magic of an encoded [`TcpConnState`].
pub const MAGIC: [u8; 4] = *b"BTCS";

/// Encoding version; bump on any change of [`TcpConnState`]'s fields.
pub const VERSION: u16 = 1;

/// Largest window scale TCP allows (RFC 7323, the kernel's `TCP_MAX_WSCALE`).
pub const MAX_WSCALE: u8 = 14;

/// Largest byte count of a queue: TCP cannot have more than 2^30 bytes in
/// flight (largest scaled window), and half the sequence space is the hard
/// limit for sequence comparisons.
pub const MAX_QUEUE_LEN: usize = 1 << 30;

/// Largest values the kernel accepts for the keepalive options.
pub const MAX_KEEPIDLE_SECS: u32 = 32767;
pub const MAX_KEEPINTVL_SECS: u32 = 32767;
pub const MAX_KEEPCNT: u32 = 127;

/// TCP states a connection can be moved in: established and half-closed.
/// Handshake states, TIME_WAIT and CLOSED have nothing worth moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    Established,
    /// The peer sent its FIN; we may still send.
    CloseWait,
    /// We sent (or queued) our FIN, not yet acknowledged.
    FinWait1,
    /// Our FIN is acknowledged; the peer may still send.
    FinWait2,
    /// Both FINs sent, ours not yet acknowledged, after the peer's.
    LastAck,
    /// Both FINs crossed, ours not yet acknowledged.
    Closing,
}

impl TcpState {
    /// Whether we have queued or sent our FIN (it follows `unsent`).
    pub fn fin_sent(self) -> bool {
        matches!(
            self,
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::LastAck | TcpState::Closing
        )
    }

    /// Whether the peer's FIN was received (it follows `unread`).
    pub fn fin_received(self) -> bool {
        matches!(
            self,
            TcpState::CloseWait | TcpState::LastAck | TcpState::Closing
        )
    }

    /// Whether the peer acknowledged our FIN.
    pub fn fin_acked(self) -> bool {
        self == TcpState::FinWait2
    }

    /// The name the kernel and RFC 793 use.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Closing => "CLOSING",
        }
    }
}

impl std::fmt::Display for TcpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Window scale shifts, present when both ends negotiated window scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowScale {
    /// Shift applied to windows the peer advertises (its receive scale).
    pub snd: u8,
    /// Shift applied to windows we advertise (our receive scale).
    pub rcv: u8,
}

/// Options negotiated in the handshake; they cannot be renegotiated, so a
/// thawed socket must be told them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpOptions {
    /// MSS clamp: the largest segment the peer accepts.
    pub mss: u16,
    pub window_scale: Option<WindowScale>,
    pub sack_permitted: bool,
    pub timestamps: bool,
}

/// The kernel's `struct tcp_repair_window`: send and receive windows, so the
/// thawed socket neither sends beyond what the peer allows nor shrinks the
/// window it advertised (which TCP forbids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated `snd_wnd`.
    pub snd_wl1: u32,
    /// Peer's receive window, in bytes (already scaled).
    pub snd_wnd: u32,
    /// Largest window the peer ever advertised.
    pub max_window: u32,
    /// Our advertised receive window, in bytes.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when `rcv_wnd` was last advertised.
    pub rcv_wup: u32,
}

/// Socket options a server typically sets on its connections; they live in
/// the socket, not in TCP, so they move with it explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketOptions {
    /// TCP_NODELAY.
    pub nodelay: bool,
    /// SO_KEEPALIVE.
    pub keepalive: bool,
    /// TCP_KEEPIDLE, seconds.
    pub keep_idle_secs: u32,
    /// TCP_KEEPINTVL, seconds.
    pub keep_intvl_secs: u32,
    /// TCP_KEEPCNT.
    pub keep_count: u32,
}

impl Default for SocketOptions {
    /// The kernel's defaults for a new socket.
    fn default() -> Self {
        SocketOptions {
            nodelay: false,
            keepalive: false,
            keep_idle_secs: 7200,
            keep_intvl_secs: 75,
            keep_count: 9,
        }
    }
}

/// Everything needed to rebuild an established or half-closed TCP socket on
/// another host without the peer noticing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpConnState {
    /// Our address (the service address the peer connected to).
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    pub state: TcpState,
    /// Sequence number of the first byte of `unacked`.
    pub send_seq: u32,
    /// Sent, not yet acknowledged by the peer: restored as already sent.
    pub unacked: Vec<u8>,
    /// Written by the application, never sent: sent normally after thaw.
    pub unsent: Vec<u8>,
    /// Sequence number of the first byte of `unread`.
    pub recv_seq: u32,
    /// Received and acknowledged, not yet read by the application.
    pub unread: Vec<u8>,
    pub options: TcpOptions,
    /// TCP_TIMESTAMP: our current timestamp clock value (opaque to us; the
    /// kernel keeps a flag in its low bit), so TSval keeps increasing.
    pub timestamp: u32,
    pub window: RepairWindow,
    pub sockopts: SocketOptions,
}

/// Why a state cannot describe a real connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidState {
    #[error("local address {local} and remote address {remote} are of different families")]
    MixedFamilies {
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("{which} address {addr} is unspecified or has port 0")]
    Unspecified {
        which: &'static str,
        addr: SocketAddr,
    },
    #[error("local and remote addresses are both {0}")]
    SameEndpoints(SocketAddr),
    #[error("MSS is zero")]
    ZeroMss,
    #[error("window scale {0} exceeds the maximum of {MAX_WSCALE}")]
    WindowScale(u8),
    #[error("{queue} queue holds {len} bytes, more than the {MAX_QUEUE_LEN} TCP allows")]
    QueueTooLong { queue: &'static str, len: usize },
    #[error("state FIN_WAIT2 (our FIN acknowledged) with {0} bytes still in the send queue")]
    DataAfterAckedFin(usize),
    #[error("max_window {max_window} is smaller than snd_wnd {snd_wnd}")]
    MaxWindow { max_window: u32, snd_wnd: u32 },
    #[error("rcv_wup {rcv_wup} is beyond rcv_nxt {rcv_nxt}")]
    RcvWup { rcv_wup: u32, rcv_nxt: u32 },
    #[error("snd_wl1 {snd_wl1} is beyond rcv_nxt + rcv_wnd ({limit})")]
    SndWl1 { snd_wl1: u32, limit: u32 },
    #[error("{option} = {value} is outside 1..={max}")]
    Keepalive {
        option: &'static str,
        value: u32,
        max: u32,
    },
}

/// `a` is after `b` in sequence space (RFC 1982 serial arithmetic).
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl TcpConnState {
    /// The `BTCS` frame of this state.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(MAGIC, VERSION, self)
    }

    /// Decodes one `BTCS` frame and checks the state is one a kernel can
    /// take ([`TcpConnState::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let state: TcpConnState = wire::decode(MAGIC, VERSION, bytes)?;
        state
            .validate()
            .map_err(|e| WireError::Body(format!("invalid TCP connection state: {e}")))?;
        Ok(state)
    }

    /// Sequence number of the next byte to send for the first time.
    pub fn snd_nxt(&self) -> u32 {
        self.send_seq.wrapping_add(self.unacked.len() as u32)
    }

    /// Sequence number after everything queued, our FIN included.
    pub fn write_seq(&self) -> u32 {
        self.snd_nxt()
            .wrapping_add(self.unsent.len() as u32)
            .wrapping_add(self.state.fin_sent() as u32)
    }

    /// Sequence number of the next byte expected from the peer (after its
    /// FIN, once received).
    pub fn rcv_nxt(&self) -> u32 {
        self.recv_seq
            .wrapping_add(self.unread.len() as u32)
            .wrapping_add(self.state.fin_received() as u32)
    }

    /// Checks what the kernel would check during a thaw, and a few things it
    /// would silently get wrong.
    pub fn validate(&self) -> Result<(), InvalidState> {
        if self.local.is_ipv4() != self.remote.is_ipv4() {
            return Err(InvalidState::MixedFamilies {
                local: self.local,
                remote: self.remote,
            });
        }
        for (which, addr) in [("local", self.local), ("remote", self.remote)] {
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(InvalidState::Unspecified { which, addr });
            }
        }
        if self.local == self.remote {
            return Err(InvalidState::SameEndpoints(self.local));
        }
        if self.options.mss == 0 {
            return Err(InvalidState::ZeroMss);
        }
        if let Some(ws) = self.options.window_scale {
            for shift in [ws.snd, ws.rcv] {
                if shift > MAX_WSCALE {
                    return Err(InvalidState::WindowScale(shift));
                }
            }
        }
        for (queue, len) in [
            ("unacked", self.unacked.len()),
            ("unsent", self.unsent.len()),
            ("send", self.unacked.len().saturating_add(self.unsent.len())),
            ("unread", self.unread.len()),
        ] {
            if len > MAX_QUEUE_LEN {
                return Err(InvalidState::QueueTooLong { queue, len });
            }
        }
        if self.state.fin_acked() && !(self.unacked.is_empty() && self.unsent.is_empty()) {
            return Err(InvalidState::DataAfterAckedFin(
                self.unacked.len() + self.unsent.len(),
            ));
        }
        let w = &self.window;
        if w.max_window < w.snd_wnd {
            return Err(InvalidState::MaxWindow {
                max_window: w.max_window,
                snd_wnd: w.snd_wnd,
            });
        }
        let rcv_nxt = self.rcv_nxt();
        if seq_after(w.rcv_wup, rcv_nxt) {
            return Err(InvalidState::RcvWup {
                rcv_wup: w.rcv_wup,
                rcv_nxt,
            });
        }
        let limit = rcv_nxt.wrapping_add(w.rcv_wnd);
        if seq_after(w.snd_wl1, limit) {
            return Err(InvalidState::SndWl1 {
                snd_wl1: w.snd_wl1,
                limit,
            });
        }
        let s = &self.sockopts;
        for (option, value, max) in [
            ("TCP_KEEPIDLE", s.keep_idle_secs, MAX_KEEPIDLE_SECS),
            ("TCP_KEEPINTVL", s.keep_intvl_secs, MAX_KEEPINTVL_SECS),
            ("TCP_KEEPCNT", s.keep_count, MAX_KEEPCNT),
        ] {
            if value == 0 || value > max {
                return Err(InvalidState::Keepalive { option, value, max });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    fn sample(local: SocketAddr, remote: SocketAddr) -> TcpConnState {
        TcpConnState {
            local,
            remote,
            state: TcpState::Established,
            send_seq: 0xffff_fff0,
            unacked: (0..40u8).collect(),
            unsent: vec![7; 100],
            recv_seq: 12345,
            unread: b"hello".to_vec(),
            options: TcpOptions {
                mss: 1460,
                window_scale: Some(WindowScale { snd: 7, rcv: 9 }),
                sack_permitted: true,
                timestamps: true,
            },
            timestamp: 0x8000_0001,
            window: RepairWindow {
                snd_wl1: 12000,
                snd_wnd: 65535,
                max_window: 70000,
                rcv_wnd: 131072,
                rcv_wup: 12345,
            },
            sockopts: SocketOptions {
                nodelay: true,
                keepalive: true,
                keep_idle_secs: 30,
                keep_intvl_secs: 5,
                keep_count: 3,
            },
        }
    }

    fn v4() -> TcpConnState {
        sample(
            (Ipv4Addr::new(198, 18, 0, 10), 6379).into(),
            (Ipv4Addr::new(198, 18, 0, 99), 40000).into(),
        )
    }

    fn v6() -> TcpConnState {
        sample(
            SocketAddrV6::new("fd00:198:18::10".parse().unwrap(), 443, 0, 0).into(),
            (Ipv6Addr::LOCALHOST, 51000).into(),
        )
    }

    #[test]
    fn round_trip_ipv4_and_ipv6() {
        for state in [v4(), v6()] {
            let bytes = state.encode();
            assert_eq!(&bytes[..4], b"BTCS");
            assert_eq!(TcpConnState::decode(&bytes).unwrap(), state);
        }
    }

    #[test]
    fn round_trip_every_state() {
        for st in [
            TcpState::Established,
            TcpState::CloseWait,
            TcpState::FinWait1,
            TcpState::LastAck,
            TcpState::Closing,
        ] {
            let mut s = v4();
            s.state = st;
            assert_eq!(TcpConnState::decode(&s.encode()).unwrap(), s, "{st}");
        }
        let mut s = v6();
        s.state = TcpState::FinWait2;
        s.unacked.clear();
        s.unsent.clear();
        assert_eq!(TcpConnState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn derived_sequences_wrap_and_count_fins() {
        let mut s = v4();
        assert_eq!(s.snd_nxt(), 0xffff_fff0u32.wrapping_add(40));
        assert_eq!(s.write_seq(), 0xffff_fff0u32.wrapping_add(140));
        assert_eq!(s.rcv_nxt(), 12350);
        s.state = TcpState::LastAck;
        assert_eq!(s.write_seq(), 0xffff_fff0u32.wrapping_add(141));
        assert_eq!(s.rcv_nxt(), 12351);
        assert!(seq_after(1, u32::MAX));
        assert!(!seq_after(u32::MAX, 1));
    }

    #[test]
    fn every_truncation_is_refused() {
        for state in [v4(), v6()] {
            let bytes = state.encode();
            for cut in 0..bytes.len() {
                assert!(TcpConnState::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(TcpConnState::decode(&longer).is_err());
        }
    }

    #[test]
    fn wrong_magic_and_version_are_refused() {
        let bytes = v4().encode();
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(
            TcpConnState::decode(&magic),
            Err(WireError::BadMagic { .. })
        ));
        let mut version = bytes;
        version[5] = version[5].wrapping_add(1);
        assert!(matches!(
            TcpConnState::decode(&version),
            Err(WireError::BadVersion { .. })
        ));
    }

    fn refused(state: TcpConnState, needle: &str) {
        let err = TcpConnState::decode(&state.encode())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
        assert!(
            err.starts_with("malformed body: invalid TCP connection state"),
            "{err}"
        );
    }

    #[test]
    fn semantically_invalid_states_are_refused_clearly() {
        let mut s = v4();
        s.remote = v6().remote;
        refused(s, "different families");

        let mut s = v4();
        s.options.mss = 0;
        refused(s, "MSS is zero");

        let mut s = v4();
        s.options.window_scale = Some(WindowScale { snd: 15, rcv: 0 });
        refused(s, "window scale 15");

        let mut s = v6();
        s.options.window_scale = Some(WindowScale { snd: 0, rcv: 200 });
        refused(s, "window scale 200");

        let mut s = v4();
        s.local = (Ipv4Addr::UNSPECIFIED, 80).into();
        refused(s, "local address 0.0.0.0:80");

        let mut s = v4();
        s.remote.set_port(0);
        refused(s, "port 0");

        let mut s = v4();
        s.remote = s.local;
        refused(s, "both");

        let mut s = v4();
        s.state = TcpState::FinWait2;
        refused(s, "FIN_WAIT2");

        let mut s = v4();
        s.window.max_window = 10;
        refused(s, "max_window");

        let mut s = v4();
        s.window.rcv_wup = s.rcv_nxt().wrapping_add(1);
        refused(s, "rcv_wup");

        let mut s = v4();
        s.window.snd_wl1 = s.rcv_nxt().wrapping_add(s.window.rcv_wnd).wrapping_add(1);
        refused(s, "snd_wl1");

        let mut s = v4();
        s.sockopts.keep_count = 0;
        refused(s, "TCP_KEEPCNT");

        let mut s = v4();
        s.sockopts.keep_idle_secs = 40000;
        refused(s, "TCP_KEEPIDLE");
    }

    #[test]
    fn fin_received_shifts_rcv_nxt_for_the_window_check() {
        // rcv_wup may equal rcv_nxt past the peer's FIN.
        let mut s = v4();
        s.state = TcpState::CloseWait;
        s.window.rcv_wup = s.rcv_nxt();
        assert!(s.validate().is_ok());
    }

    fn arb_state() -> impl Strategy<Value = TcpConnState> {
        let addrs = prop_oneof![
            (any::<[u8; 4]>(), 1u16.., any::<[u8; 4]>(), 1u16..).prop_map(|(a, p, b, q)| {
                (
                    SocketAddr::from((Ipv4Addr::from(a), p)),
                    SocketAddr::from((Ipv4Addr::from(b), q)),
                )
            }),
            (any::<[u8; 16]>(), 1u16.., any::<[u8; 16]>(), 1u16..).prop_map(|(a, p, b, q)| {
                (
                    SocketAddr::from((Ipv6Addr::from(a), p)),
                    SocketAddr::from((Ipv6Addr::from(b), q)),
                )
            }),
        ];
        let st = prop_oneof![
            Just(TcpState::Established),
            Just(TcpState::CloseWait),
            Just(TcpState::FinWait1),
            Just(TcpState::FinWait2),
            Just(TcpState::LastAck),
            Just(TcpState::Closing),
        ];
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
        (
            addrs,
            st,
            any::<(u32, u32, u32, u16)>(),
            (bytes(), bytes(), bytes()),
            (any::<Option<(u8, u8)>>(), any::<(bool, bool, bool, bool)>()),
            any::<(u32, u32, u32, u32)>(),
        )
            .prop_map(
                |(
                    (local, remote),
                    state,
                    (send_seq, recv_seq, timestamp, mss),
                    (unacked, unsent, unread),
                    (ws, (sack, ts, nodelay, keepalive)),
                    (snd_wnd, extra, rcv_wnd, back),
                )| {
                    let (unacked, unsent) = if state.fin_acked() {
                        (Vec::new(), Vec::new())
                    } else {
                        (unacked, unsent)
                    };
                    let mut s = TcpConnState {
                        local,
                        remote,
                        state,
                        send_seq,
                        unacked,
                        unsent,
                        recv_seq,
                        unread,
                        options: TcpOptions {
                            mss: mss.max(1),
                            window_scale: ws.map(|(a, b)| WindowScale {
                                snd: a % 15,
                                rcv: b % 15,
                            }),
                            sack_permitted: sack,
                            timestamps: ts,
                        },
                        timestamp,
                        window: RepairWindow {
                            snd_wl1: 0,
                            snd_wnd: snd_wnd >> 1,
                            max_window: (snd_wnd >> 1) + (extra >> 1),
                            rcv_wnd: rcv_wnd >> 2,
                            rcv_wup: 0,
                        },
                        sockopts: SocketOptions {
                            nodelay,
                            keepalive,
                            keep_idle_secs: 1 + timestamp % MAX_KEEPIDLE_SECS,
                            keep_intvl_secs: 1 + send_seq % MAX_KEEPINTVL_SECS,
                            keep_count: 1 + recv_seq % MAX_KEEPCNT,
                        },
                    };
                    s.window.rcv_wup = s.rcv_nxt().wrapping_sub(back >> 2);
                    s.window.snd_wl1 = s.rcv_nxt().wrapping_sub(back >> 3);
                    s
                },
            )
            .prop_filter("distinct endpoints, no unspecified address", |s| {
                s.validate().is_ok()
            })
    }

    proptest! {
        #[test]
        fn valid_states_round_trip(s in arb_state()) {
            prop_assert_eq!(TcpConnState::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TcpConnState::decode(&data);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&VERSION.to_be_bytes());
            framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
            framed.extend_from_slice(&data);
            let _ = TcpConnState::decode(&framed);
        }

        #[test]
        fn corrupted_encodings_never_panic(
            s in arb_state(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = s.encode();
            for (at, xor) in flips {
                let i = at % bytes.len();
                bytes[i] ^= xor;
            }
            if let Ok(decoded) = TcpConnState::decode(&bytes) {
                prop_assert!(decoded.validate().is_ok());
            }
        }
    }
}
