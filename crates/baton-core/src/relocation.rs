//! The move protocol: how a source node hands a VIP and its live TCP
//! connections to a target node.
//!
//! ```text
//! source                                   target
//!  hold VIP traffic, freeze connections
//!  ── Offer{vip, service, connections} ──►  hold, thaw every connection,
//!                                           add the VIP (not announced yet)
//!  ◄────────────────────── Ready{thawed} ──  (or Refused{reason}: nothing kept)
//!  drop the VIP, take the packets held
//!  ── Commit{held_packets} ──────────────►  announce the VIP, release the
//!                                           hold, re-inject held packets
//!  ◄─────────────────────────────── Done ──
//!  close frozen sockets silently
//!  ── Late{packets} ─────────────────────►  re-inject what reached the
//!                                           source after Commit
//! ```
//!
//! Until the source sends `Commit` the move can be rolled back: the source
//! resumes its frozen sockets and releases its own hold, the target closes
//! what it thawed without a FIN or RST and drops the VIP. After `Commit` the
//! connections belong to the target.
//!
//! Every message is one [`crate::wire`] frame; [`MoveSession`] checks that
//! each message is the one expected at that point, so a confused or hostile
//! peer is refused rather than obeyed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::tcp_state::TcpConnState;
use crate::wire::{self, WireError};

/// Frame magic of move messages.
pub const MAGIC: [u8; 4] = *b"BTMV";
/// Version of the move protocol this build speaks.
pub const VERSION: u16 = 3;

/// A virtual address and the TCP ports of it that a service uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vip {
    pub addr: IpAddr,
    /// Prefix length the address is installed with.
    pub prefix_len: u8,
    /// TCP ports held during a move; empty means every TCP port.
    pub ports: Vec<u16>,
}

impl Vip {
    /// Checks what a peer could get wrong.
    pub fn validate(&self) -> Result<(), String> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix_len == 0 || self.prefix_len > max {
            return Err(format!(
                "VIP {} has prefix length {}, expected 1..={max}",
                self.addr, self.prefix_len
            ));
        }
        if self.addr.is_unspecified() || self.addr.is_multicast() || self.addr.is_loopback() {
            return Err(format!("{} cannot be a VIP", self.addr));
        }
        if self.ports.contains(&0) {
            return Err("VIP port 0 is not a port".into());
        }
        Ok(())
    }
}

/// A host on the segment, as the source's neighbour table knows it: the
/// target sends to the clients at once, without resolving them first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// One connection handed over: its kernel state and the application's
/// state for it (opaque here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnHandoff {
    /// Identifies the connection to the application across nodes.
    pub id: u64,
    /// The frozen socket, encoded by [`TcpConnState::encode`].
    pub tcp: Vec<u8>,
    /// Application bytes for this connection (e.g. output not yet written).
    pub app: Vec<u8>,
}

impl ConnHandoff {
    pub fn new(id: u64, tcp: &TcpConnState, app: Vec<u8>) -> ConnHandoff {
        ConnHandoff {
            id,
            tcp: tcp.encode(),
            app,
        }
    }

    /// Decodes and checks the socket state.
    pub fn tcp_state(&self) -> Result<TcpConnState, WireError> {
        TcpConnState::decode(&self.tcp)
    }
}

/// A message of the move protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveMessage {
    /// Source → target, first: make ready to take `vip` (install the hold,
    /// add the address) while the source freezes its sockets, so the two
    /// ends work at the same time.
    Prepare { move_id: u64, vip: Vip },
    /// Source → target: take this VIP, this application state and these
    /// connections, the first of `total`; [`MoveMessage::Conns`] brings
    /// the rest, so the target thaws one batch while the source freezes
    /// the next.
    Offer {
        move_id: u64,
        vip: Vip,
        /// The application's state as a whole (e.g. a service checkpoint),
        /// opaque here.
        service: Vec<u8>,
        connections: Vec<ConnHandoff>,
        /// Connections in the whole move.
        total: u32,
        /// MACs of the connections' peers (or their gateways).
        neighbours: Vec<Neighbour>,
    },
    /// Source → target, after the Offer: the next batch of connections.
    Conns {
        move_id: u64,
        connections: Vec<ConnHandoff>,
    },
    /// Target → source: every connection is thawed, the hold is in place.
    Ready { move_id: u64, thawed: u32 },
    /// Target → source: the target keeps nothing; the source keeps serving.
    Refused { move_id: u64, reason: String },
    /// Source → target: the VIP is yours; these packets reached me during
    /// the hold (whole IP packets, in arrival order).
    Commit {
        move_id: u64,
        held_packets: Vec<Vec<u8>>,
    },
    /// Target → source: the target serves; the source may close its copies.
    Done { move_id: u64 },
    /// Source → target, last: packets that still reached the source after
    /// `Commit` (in flight while clients learned the new MAC). Pure ACKs
    /// among them are never sent again by the client, so they are worth
    /// forwarding.
    Late { move_id: u64, packets: Vec<Vec<u8>> },
    /// Source → target, on a new connection, when the control connection
    /// broke after `Commit` was sent but before `Done` came back: did the
    /// move commit? The target answers `Done` (it serves) or `Refused` (it
    /// rolled back, or never heard of the move), once it knows. Outside
    /// [`MoveSession`]: it is an exchange of its own.
    Query { move_id: u64 },
}

impl MoveMessage {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(MAGIC, VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<MoveMessage, WireError> {
        wire::decode(MAGIC, VERSION, bytes)
    }

    pub fn move_id(&self) -> u64 {
        match self {
            MoveMessage::Prepare { move_id, .. }
            | MoveMessage::Offer { move_id, .. }
            | MoveMessage::Conns { move_id, .. }
            | MoveMessage::Ready { move_id, .. }
            | MoveMessage::Refused { move_id, .. }
            | MoveMessage::Commit { move_id, .. }
            | MoveMessage::Done { move_id }
            | MoveMessage::Late { move_id, .. }
            | MoveMessage::Query { move_id } => *move_id,
        }
    }

    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            MoveMessage::Prepare { .. } => "Prepare",
            MoveMessage::Offer { .. } => "Offer",
            MoveMessage::Conns { .. } => "Conns",
            MoveMessage::Ready { .. } => "Ready",
            MoveMessage::Refused { .. } => "Refused",
            MoveMessage::Commit { .. } => "Commit",
            MoveMessage::Done { .. } => "Done",
            MoveMessage::Late { .. } => "Late",
            MoveMessage::Query { .. } => "Query",
        }
    }
}

/// Which end of a move this session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

/// Where a move stands, as seen by one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Source: nothing sent yet. Target: waiting for an offer.
    Start,
    /// Prepare sent (source) or received (target); the offer follows.
    Prepared,
    /// Offer sent (source) or received (target); more batches of
    /// connections may follow.
    Offered,
    /// Target answered Ready.
    Ready,
    /// Commit sent (source) or received (target): the target owns the VIP.
    Committed,
    /// Done: the move is complete on both ends.
    Done,
    /// The source forwarded its late packets: nothing more follows.
    Finished,
    /// Refused or rolled back: the source still serves.
    Aborted,
}

/// A message that does not fit the protocol at this point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unexpected {got} in phase {phase:?}")]
    Unexpected { got: &'static str, phase: Phase },
    #[error("message for move {got}, this is move {expected}")]
    WrongMove { expected: u64, got: u64 },
    #[error("invalid offer: {0}")]
    BadOffer(String),
    #[error("target refused: {0}")]
    Refused(String),
    #[error("target thawed {thawed} of {offered} connections")]
    Incomplete { thawed: u32, offered: u32 },
}

/// The sans-IO bookkeeping of one move at one end: feed it every message
/// sent and received; it says whether the exchange is well-formed.
#[derive(Debug, Clone)]
pub struct MoveSession {
    role: Role,
    phase: Phase,
    move_id: Option<u64>,
    /// Connections offered so far, and in all.
    offered: u32,
    total: u32,
    /// Their ids: an id offered twice, in any batch, is refused.
    ids: BTreeSet<u64>,
    /// The VIP a Prepare announced: the offer must be for it.
    prepared_vip: Option<Vip>,
}

impl MoveSession {
    pub fn new(role: Role) -> MoveSession {
        MoveSession {
            role,
            phase: Phase::Start,
            move_id: None,
            offered: 0,
            total: 0,
            ids: BTreeSet::new(),
            prepared_vip: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the offer's connections are still coming (in
    /// [`MoveMessage::Conns`] batches).
    pub fn awaiting_connections(&self) -> bool {
        self.phase == Phase::Offered && self.offered < self.total
    }

    /// Records a message this end sends; refuses one out of order (a bug
    /// on our side, reported rather than sent).
    pub fn on_send(&mut self, msg: &MoveMessage) -> Result<(), ProtocolError> {
        self.step(msg, true)
    }

    /// Checks and records a message received from the peer.
    pub fn on_receive(&mut self, msg: &MoveMessage) -> Result<(), ProtocolError> {
        self.step(msg, false)
    }

    /// Marks the move as abandoned (rollback).
    pub fn abort(&mut self) {
        if !matches!(self.phase, Phase::Committed | Phase::Done | Phase::Finished) {
            self.phase = Phase::Aborted;
        }
    }

    fn step(&mut self, msg: &MoveMessage, sending: bool) -> Result<(), ProtocolError> {
        if let Some(expected) = self.move_id {
            if msg.move_id() != expected {
                return Err(ProtocolError::WrongMove {
                    expected,
                    got: msg.move_id(),
                });
            }
        }
        let from_source = sending == (self.role == Role::Source);
        let unexpected = ProtocolError::Unexpected {
            got: msg.kind(),
            phase: self.phase,
        };
        self.phase = match (self.phase, msg, from_source) {
            (Phase::Start, MoveMessage::Prepare { vip, .. }, true) => {
                vip.validate().map_err(ProtocolError::BadOffer)?;
                self.move_id = Some(msg.move_id());
                self.prepared_vip = Some(vip.clone());
                Phase::Prepared
            }
            (
                Phase::Prepared,
                MoveMessage::Offer {
                    vip,
                    connections,
                    total,
                    ..
                },
                true,
            ) => {
                vip.validate().map_err(ProtocolError::BadOffer)?;
                if self.prepared_vip.as_ref() != Some(vip) {
                    return Err(ProtocolError::BadOffer(
                        "the offer is for another VIP than the one prepared".into(),
                    ));
                }
                self.total = *total;
                self.add_connections(connections)?;
                self.move_id = Some(msg.move_id());
                Phase::Offered
            }
            (Phase::Offered, MoveMessage::Conns { connections, .. }, true)
                if self.offered < self.total =>
            {
                // An empty batch moves nothing: a peer sending them would
                // keep the target waiting for ever.
                if connections.is_empty() {
                    return Err(ProtocolError::BadOffer(
                        "an empty batch of connections".into(),
                    ));
                }
                self.add_connections(connections)?;
                Phase::Offered
            }
            (Phase::Offered, MoveMessage::Ready { thawed, .. }, false) => {
                if self.offered != self.total {
                    return Err(unexpected);
                }
                if *thawed != self.offered {
                    self.phase = Phase::Aborted;
                    return Err(ProtocolError::Incomplete {
                        thawed: *thawed,
                        offered: self.offered,
                    });
                }
                Phase::Ready
            }
            (Phase::Prepared | Phase::Offered, MoveMessage::Refused { reason, .. }, false) => {
                self.phase = Phase::Aborted;
                if sending {
                    return Ok(());
                }
                return Err(ProtocolError::Refused(reason.clone()));
            }
            (Phase::Ready, MoveMessage::Commit { .. }, true) => Phase::Committed,
            (Phase::Committed, MoveMessage::Done { .. }, false) => Phase::Done,
            (Phase::Done, MoveMessage::Late { .. }, true) => Phase::Finished,
            _ => return Err(unexpected),
        };
        Ok(())
    }

    /// Counts a batch of offered connections; refuses a duplicate id or
    /// more than the offer's total.
    fn add_connections(&mut self, connections: &[ConnHandoff]) -> Result<(), ProtocolError> {
        let offered = u32::try_from(connections.len())
            .ok()
            .and_then(|n| n.checked_add(self.offered))
            .filter(|n| *n <= self.total)
            .ok_or_else(|| {
                ProtocolError::BadOffer(format!("more connections than the {} offered", self.total))
            })?;
        for c in connections {
            if !self.ids.insert(c.id) {
                return Err(ProtocolError::BadOffer(format!(
                    "connection id {} offered twice",
                    c.id
                )));
            }
        }
        self.offered = offered;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_state::{RepairWindow, SocketOptions, TcpOptions, TcpState};

    fn sample_state() -> TcpConnState {
        TcpConnState {
            local: "198.18.100.1:7000".parse().unwrap(),
            remote: "198.18.2.1:40000".parse().unwrap(),
            state: TcpState::Established,
            send_seq: 1000,
            unacked: vec![1; 10],
            unsent: vec![2; 5],
            recv_seq: 5000,
            unread: vec![3; 7],
            options: TcpOptions {
                mss: 1460,
                window_scale: None,
                sack_permitted: true,
                timestamps: true,
            },
            timestamp: 12345,
            window: RepairWindow {
                snd_wl1: 5000,
                snd_wnd: 65535,
                max_window: 65535,
                rcv_wnd: 65535,
                rcv_wup: 5007,
            },
            sockopts: SocketOptions::default(),
        }
    }

    fn offer(id: u64, n: u64) -> MoveMessage {
        MoveMessage::Offer {
            move_id: id,
            vip: Vip {
                addr: "198.18.100.1".parse().unwrap(),
                prefix_len: 32,
                ports: vec![7000],
            },
            service: b"checkpoint".to_vec(),
            connections: (0..n)
                .map(|i| ConnHandoff::new(i, &sample_state(), vec![1, 2, 3]))
                .collect(),
            total: n as u32,
            neighbours: vec![Neighbour {
                ip: "198.18.2.1".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 1],
            }],
        }
    }

    /// The Prepare that goes before `offer(id, _)`.
    fn prepare(move_id: u64) -> MoveMessage {
        let MoveMessage::Offer { vip, .. } = offer(move_id, 0) else {
            unreachable!()
        };
        MoveMessage::Prepare { move_id, vip }
    }

    /// Sessions that have exchanged the Prepare of move `id`.
    fn prepared(id: u64) -> (MoveSession, MoveSession) {
        let mut src = MoveSession::new(Role::Source);
        let mut dst = MoveSession::new(Role::Target);
        src.on_send(&prepare(id)).unwrap();
        dst.on_receive(&prepare(id)).unwrap();
        (src, dst)
    }

    #[test]
    fn a_whole_move_is_accepted_at_both_ends() {
        let (mut src, mut dst) = prepared(9);
        let msgs = [
            offer(9, 2),
            MoveMessage::Ready {
                move_id: 9,
                thawed: 2,
            },
            MoveMessage::Commit {
                move_id: 9,
                held_packets: vec![vec![0x45; 40]],
            },
            MoveMessage::Done { move_id: 9 },
            MoveMessage::Late {
                move_id: 9,
                packets: vec![vec![0x45; 40]],
            },
        ];
        for (i, m) in msgs.iter().enumerate() {
            let wire = MoveMessage::decode(&m.encode()).unwrap();
            assert_eq!(&wire, m);
            if i % 2 == 0 || i == 4 {
                src.on_send(m).unwrap();
                dst.on_receive(&wire).unwrap();
            } else {
                dst.on_send(m).unwrap();
                src.on_receive(&wire).unwrap();
            }
        }
        assert_eq!(src.phase(), Phase::Finished);
        assert_eq!(dst.phase(), Phase::Finished);
    }

    #[test]
    fn out_of_order_wrong_move_and_incomplete_are_refused() {
        let mut dst = MoveSession::new(Role::Target);
        assert!(dst
            .on_receive(&MoveMessage::Commit {
                move_id: 1,
                held_packets: vec![]
            })
            .is_err());
        // An offer without its Prepare, a query inside a session.
        assert!(dst.on_receive(&offer(1, 1)).is_err());
        assert!(dst.on_receive(&MoveMessage::Query { move_id: 1 }).is_err());
        let (_, mut dst) = prepared(1);
        dst.on_receive(&offer(1, 1)).unwrap();
        assert!(matches!(
            dst.on_send(&MoveMessage::Ready {
                move_id: 2,
                thawed: 1
            }),
            Err(ProtocolError::WrongMove { .. })
        ));
        let (mut src, _) = prepared(3);
        src.on_send(&offer(3, 5)).unwrap();
        assert!(matches!(
            src.on_receive(&MoveMessage::Ready {
                move_id: 3,
                thawed: 4
            }),
            Err(ProtocolError::Incomplete { .. })
        ));
        assert_eq!(src.phase(), Phase::Aborted);
    }

    #[test]
    fn refusal_aborts_and_bad_offers_are_refused() {
        let (mut src, _) = prepared(4);
        src.on_send(&offer(4, 1)).unwrap();
        assert!(matches!(
            src.on_receive(&MoveMessage::Refused {
                move_id: 4,
                reason: "no".into()
            }),
            Err(ProtocolError::Refused(_))
        ));
        assert_eq!(src.phase(), Phase::Aborted);

        let (_, mut dst) = prepared(5);
        let MoveMessage::Offer {
            mut connections,
            vip,
            ..
        } = offer(5, 2)
        else {
            unreachable!()
        };
        connections[1].id = connections[0].id;
        let dup = MoveMessage::Offer {
            move_id: 5,
            vip,
            service: Vec::new(),
            connections,
            total: 2,
            neighbours: Vec::new(),
        };
        assert!(matches!(
            dst.on_receive(&dup),
            Err(ProtocolError::BadOffer(ref why)) if why.contains("twice")
        ));
        // An offer for another VIP than the one prepared.
        let (_, mut dst) = prepared(6);
        let MoveMessage::Offer {
            connections,
            neighbours,
            ..
        } = offer(6, 1)
        else {
            unreachable!()
        };
        let elsewhere = MoveMessage::Offer {
            move_id: 6,
            vip: Vip {
                addr: "198.18.100.9".parse().unwrap(),
                prefix_len: 32,
                ports: vec![7000],
            },
            service: Vec::new(),
            connections,
            total: 1,
            neighbours,
        };
        assert!(matches!(
            dst.on_receive(&elsewhere),
            Err(ProtocolError::BadOffer(_))
        ));
    }

    /// The offer's first batch and the rest, as the source sends them.
    fn batched(move_id: u64, sizes: &[u64]) -> Vec<MoveMessage> {
        let total: u64 = sizes.iter().sum();
        let MoveMessage::Offer {
            vip,
            service,
            neighbours,
            connections,
            ..
        } = offer(move_id, total)
        else {
            unreachable!()
        };
        let mut rest = connections.into_iter();
        let mut msgs = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let connections: Vec<ConnHandoff> = rest.by_ref().take(*n as usize).collect();
            msgs.push(if i == 0 {
                MoveMessage::Offer {
                    move_id,
                    vip: vip.clone(),
                    service: service.clone(),
                    connections,
                    total: total as u32,
                    neighbours: neighbours.clone(),
                }
            } else {
                MoveMessage::Conns {
                    move_id,
                    connections,
                }
            });
        }
        msgs
    }

    #[test]
    fn connections_come_in_batches_and_ready_waits_for_all() {
        let (mut src, mut dst) = prepared(11);
        let msgs = batched(11, &[2, 3, 1]);
        for m in &msgs[..2] {
            src.on_send(m).unwrap();
            dst.on_receive(m).unwrap();
        }
        // Ready before the last batch is out of order.
        let ready = MoveMessage::Ready {
            move_id: 11,
            thawed: 6,
        };
        assert!(matches!(
            dst.clone().on_send(&ready),
            Err(ProtocolError::Unexpected { .. })
        ));
        src.on_send(&msgs[2]).unwrap();
        dst.on_receive(&msgs[2]).unwrap();
        // Nothing beyond the total.
        let extra = batched(11, &[1, 1]).pop().unwrap();
        assert!(dst.clone().on_receive(&extra).is_err());
        // Nor an empty batch (it would keep the target waiting for ever).
        let (mut s2, mut d2) = prepared(16);
        let msgs2 = batched(16, &[1, 1]);
        s2.on_send(&msgs2[0]).unwrap();
        d2.on_receive(&msgs2[0]).unwrap();
        let empty = MoveMessage::Conns {
            move_id: 16,
            connections: Vec::new(),
        };
        assert!(d2.on_receive(&empty).is_err());
        dst.on_send(&ready).unwrap();
        src.on_receive(&ready).unwrap();
        assert_eq!(src.phase(), Phase::Ready);
    }

    #[test]
    fn batches_beyond_the_total_or_repeating_an_id_are_refused() {
        // A batch before any offer.
        let (_, mut dst) = prepared(12);
        let conns = batched(12, &[1, 1]).pop().unwrap();
        assert!(dst.on_receive(&conns).is_err());
        // More than the total announced.
        let (_, mut dst) = prepared(13);
        let mut msgs = batched(13, &[1, 2]);
        if let MoveMessage::Offer { total, .. } = &mut msgs[0] {
            *total = 2;
        }
        dst.on_receive(&msgs[0]).unwrap();
        assert!(matches!(
            dst.on_receive(&msgs[1]),
            Err(ProtocolError::BadOffer(_))
        ));
        // An id of the first batch again in the second.
        let (_, mut dst) = prepared(14);
        let mut msgs = batched(14, &[2, 2]);
        let first_id = match &msgs[0] {
            MoveMessage::Offer { connections, .. } => connections[0].id,
            _ => unreachable!(),
        };
        if let MoveMessage::Conns { connections, .. } = &mut msgs[1] {
            connections[1].id = first_id;
        }
        dst.on_receive(&msgs[0]).unwrap();
        assert!(matches!(
            dst.on_receive(&msgs[1]),
            Err(ProtocolError::BadOffer(_))
        ));
        // An offer whose first batch alone exceeds its total.
        let (_, mut dst) = prepared(15);
        let mut msgs = batched(15, &[3]);
        if let MoveMessage::Offer { total, .. } = &mut msgs[0] {
            *total = 1;
        }
        assert!(dst.on_receive(&msgs[0]).is_err());
    }

    #[test]
    fn truncated_messages_are_refused() {
        let bytes = offer(7, 3).encode();
        for cut in 0..bytes.len() {
            assert!(MoveMessage::decode(&bytes[..cut]).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&VERSION.to_be_bytes());
            framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
            framed.extend_from_slice(&data);
            if let Ok(m) = MoveMessage::decode(&framed) {
                let mut s = MoveSession::new(Role::Target);
                let _ = s.on_receive(&m);
                if let MoveMessage::Offer { connections, .. } = m {
                    for c in connections { let _ = c.tcp_state(); }
                }
            }
        }
    }
}
