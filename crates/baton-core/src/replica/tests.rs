use std::collections::BTreeMap;
use std::net::SocketAddr;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::apply::OUTPUT_FLOOR;
use super::*;
use crate::packet::{parse, Builder, TcpChecksum, TcpFlags};
use crate::service::{CloseReason, ConnId, Context, RestoreError, Service, TimerId};

/// Echoes every byte, closes when the client finishes, and draws a random
/// number on a timer: its checkpoint records what it saw, so equal
/// checkpoints mean equal input, order and randomness.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Probe {
    received: BTreeMap<ConnId, Vec<u8>>,
    closed: BTreeMap<ConnId, Vec<CloseReason>>,
    fired: Vec<(TimerId, u64, u64)>,
}

impl Service for Probe {
    fn on_open(&mut self, ctx: &mut Context, conn: ConnId, _peer: SocketAddr) {
        self.received.insert(conn, Vec::new());
        ctx.set_timer(conn, ctx.now_ms() + 50);
    }
    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
        self.received
            .entry(conn)
            .or_default()
            .extend_from_slice(data);
        ctx.send(conn, data);
    }
    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, reason: CloseReason) {
        self.closed.entry(conn).or_default().push(reason);
        if reason == CloseReason::PeerFinished {
            ctx.close(conn);
        }
    }
    fn on_timer(&mut self, ctx: &mut Context, timer: TimerId) {
        let r = ctx.random_u64();
        self.fired.push((timer, ctx.now_ms(), r));
    }
    fn checkpoint(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap()
    }
    fn restore(bytes: &[u8]) -> Result<Self, RestoreError> {
        postcard::from_bytes(bytes).map_err(|e| RestoreError::new(e.to_string()))
    }
}

/// Deterministic choices for the generator (the services' SplitMix64).
struct Rng(crate::service::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(crate::service::SplitMix64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

const WSCALE: u8 = 7;
/// The kernel's largest window with our scale, as the replica assumes.
const MAX_WINDOW: u32 = 65_535 << WSCALE;

fn key(i: usize) -> ConnKey {
    ConnKey {
        client: format!("198.18.2.{}:{}", 1 + i % 3, 40_000 + i)
            .parse()
            .unwrap(),
        server: "198.18.0.10:6379".parse().unwrap(),
    }
}

fn server_isn(i: usize) -> u32 {
    0xFFFF_F000u32.wrapping_add(i as u32 * 0x0100_0000)
}

/// The primary: captures packets, proposes, commits at once, and applies.
struct Primary {
    replica: Replica<Probe>,
    capture: Capture,
    log: Vec<ReplicaEntry>,
    /// Actions by the index of the entry that caused them.
    actions: Vec<(u64, Action)>,
    next_packet: PacketId,
    dropped: Vec<PacketId>,
    accepted: Vec<PacketId>,
}

impl Primary {
    fn new() -> Primary {
        Primary {
            replica: Replica::new(Probe::default()),
            capture: Capture::new(),
            log: Vec::new(),
            actions: Vec::new(),
            next_packet: 0,
            dropped: Vec::new(),
            accepted: Vec::new(),
        }
    }

    fn commit(&mut self, entry: ReplicaEntry) -> u64 {
        self.log.push(entry);
        let index = self.log.len() as u64;
        self.replica
            .handle_committed(index, &self.log[index as usize - 1])
            .unwrap();
        while let Some(a) = self.replica.poll_action() {
            self.actions.push((index, a));
        }
        index
    }

    /// A client packet through the capture path; proposals are committed at
    /// once.
    fn packet(&mut self, bytes: &[u8], flush: bool) -> PacketId {
        let id = self.next_packet;
        self.next_packet += 1;
        self.capture.handle_captured(id, bytes, TcpChecksum::Verify);
        for p in self.capture.poll_proposals(flush) {
            let index = self.commit(p.entry);
            self.capture.handle_proposed(&p.packet_ids, index);
        }
        self.capture.handle_commit(self.log.len() as u64);
        for (id, v) in self.capture.poll_verdicts() {
            match v {
                Verdict::Accept => self.accepted.push(id),
                Verdict::Drop => self.dropped.push(id),
            }
        }
        id
    }

    fn sent(&self, k: &ConnKey) -> u64 {
        self.replica.connection(k).map_or(0, |c| c.output().sent())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    New,
    SynSent,
    Open,
    FinSent,
    Done,
}

struct Client {
    i: usize,
    key: ConnKey,
    isn: u32,
    tsval: u32,
    sack: bool,
    data: Vec<u8>,
    /// Segments not sent yet (offset, len), in stream order.
    unsent: Vec<(u32, u32)>,
    sent: Vec<(u32, u32)>,
    phase: Phase,
    early_sent: bool,
}

impl Client {
    fn new(i: usize, data: Vec<u8>, rng: &mut Rng) -> Client {
        let mut unsent = Vec::new();
        let mut off = 0u32;
        while (off as usize) < data.len() {
            let len = (1 + rng.below(300) as u32).min(data.len() as u32 - off);
            unsent.push((off, len));
            off += len;
        }
        Client {
            i,
            key: key(i),
            isn: rng.next() as u32,
            tsval: 1000 + i as u32,
            sack: i.is_multiple_of(2),
            data,
            unsent,
            sent: Vec::new(),
            phase: Phase::New,
            early_sent: false,
        }
    }

    fn seq(&self, off: u32) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(off)
    }

    fn base(&self) -> Builder {
        Builder::new(self.key)
            .window(65_535)
            .timestamp(self.tsval, 0)
    }

    fn syn(&self) -> Vec<u8> {
        Builder::new(self.key)
            .seq(self.isn)
            .flags(TcpFlags::SYN)
            .window(64_240)
            .mss(1460)
            .sack_permitted()
            .wscale(WSCALE)
            .timestamp(self.tsval, 0)
            .build()
    }

    fn segment(&self, (off, len): (u32, u32), ack: u32) -> Vec<u8> {
        self.base()
            .seq(self.seq(off))
            .ack(ack)
            .payload(&self.data[off as usize..(off + len) as usize])
            .build()
    }

    fn pure_ack(&self, ack: u32) -> Vec<u8> {
        let sent = self.sent.iter().map(|(o, l)| o + l).max().unwrap_or(0);
        let off = sent + u32::from(self.phase == Phase::FinSent);
        self.base().seq(self.seq(off)).ack(ack).build()
    }

    fn fin(&self, ack: u32) -> Vec<u8> {
        self.base()
            .seq(self.seq(self.data.len() as u32))
            .ack(ack)
            .flags(TcpFlags::FIN)
            .build()
    }
}

/// A log of several client connections, cut into random segments with
/// retransmissions, reordering, spoofed RSTs, garbage, pure ACKs and ticks,
/// produced through the capture path of a primary that applies it.
fn generate(seed: u64, streams: &[Vec<u8>]) -> Primary {
    let mut rng = Rng::new(seed);
    let mut p = Primary::new();
    let mut time = 1_000_000u64;
    p.commit(ReplicaEntry::Tick(Tick {
        time_ms: time,
        entropy: rng.next(),
    }));
    let mut clients: Vec<Client> = streams
        .iter()
        .enumerate()
        .map(|(i, d)| Client::new(i, d.clone(), &mut rng))
        .collect();
    let mut closed = vec![false; clients.len()];
    for _step in 0..20_000 {
        let live: Vec<usize> = (0..clients.len())
            .filter(|i| clients[*i].phase != Phase::Done)
            .collect();
        if live.is_empty() {
            break;
        }
        if rng.chance(8) {
            time += rng.below(40);
            p.commit(ReplicaEntry::Tick(Tick {
                time_ms: time,
                entropy: rng.next(),
            }));
        }
        let flush = rng.chance(3);
        let c = &mut clients[live[rng.below(live.len() as u64) as usize]];
        let ack = server_isn(c.i)
            .wrapping_add(1)
            .wrapping_add(p.sent(&c.key) as u32);
        match c.phase {
            Phase::New => {
                p.packet(&c.syn(), flush);
                c.phase = Phase::SynSent;
            }
            Phase::SynSent => {
                if rng.chance(3) {
                    // A retransmitted SYN.
                    p.packet(&c.syn(), flush);
                } else if !c.early_sent && !c.unsent.is_empty() && rng.chance(2) {
                    // Data before the established entry (the ACK of the
                    // handshake carried it).
                    c.early_sent = true;
                    let s = c.unsent.remove(0);
                    c.sent.push(s);
                    let pkt = c.segment(s, server_isn(c.i).wrapping_add(1));
                    p.packet(&pkt, flush);
                } else {
                    p.commit(ReplicaEntry::Established(Established {
                        conn: c.key,
                        isn: server_isn(c.i),
                        mss: 1460,
                        wscale: Some(WSCALE),
                        sack: c.sack,
                        timestamps: true,
                        ts_clock: 77_000 + c.i as u32,
                    }));
                    c.phase = Phase::Open;
                    p.packet(&c.pure_ack(server_isn(c.i).wrapping_add(1)), flush);
                }
            }
            Phase::Open => match rng.below(12) {
                0..=5 if !c.unsent.is_empty() => {
                    // Reordering: one of the next three segments.
                    let n = rng.below(c.unsent.len().min(3) as u64) as usize;
                    let s = c.unsent.remove(n);
                    c.sent.push(s);
                    p.packet(&c.segment(s, ack), flush);
                }
                0..=5 => {
                    p.packet(&c.fin(ack), flush);
                    c.phase = Phase::FinSent;
                }
                6 | 7 if !c.sent.is_empty() => {
                    let s = c.sent[rng.below(c.sent.len() as u64) as usize];
                    p.packet(&c.segment(s, ack), flush);
                }
                8 => {
                    p.packet(&c.pure_ack(ack), flush);
                }
                9 => {
                    let rcv_nxt = p.replica.connection(&c.key).unwrap().stream().rcv_nxt();
                    let seq = match rng.below(3) {
                        0 => rcv_nxt.wrapping_add(MAX_WINDOW + 1 + rng.below(1000) as u32),
                        1 => rcv_nxt.wrapping_sub(2 + rng.below(1000) as u32),
                        // In the window but not exact: without SACK it
                        // cannot hit a SACK block's edge either.
                        _ if !c.sack => rcv_nxt.wrapping_add(1 + rng.below(5000) as u32),
                        _ => rcv_nxt.wrapping_sub(70_000),
                    };
                    let rst = Builder::new(c.key).seq(seq).flags(TcpFlags::RST).build();
                    p.packet(&rst, flush);
                }
                10 => {
                    // Damaged on the way: a flipped byte or a cut.
                    let mut pkt = c.pure_ack(ack);
                    if rng.chance(2) {
                        let at = rng.below(pkt.len() as u64) as usize;
                        pkt[at] ^= 1 + rng.below(255) as u8;
                    } else {
                        pkt.truncate(rng.below(pkt.len() as u64) as usize);
                    }
                    let id = p.packet(&pkt, flush);
                    assert!(p.dropped.contains(&id), "damaged packet not dropped");
                }
                _ => {
                    if let Some(d) = p.replica.output_digest(&c.key) {
                        p.commit(ReplicaEntry::OutputDigest(d));
                    }
                }
            },
            Phase::FinSent => {
                let has_closed = p
                    .actions
                    .iter()
                    .any(|(_, a)| *a == Action::Close { conn: c.key });
                if p.replica.connection(&c.key).is_none() {
                    c.phase = Phase::Done;
                    closed[c.i] = true;
                } else if has_closed && rng.chance(2) {
                    p.packet(&c.pure_ack(ack.wrapping_add(1)), true);
                } else if rng.chance(2) {
                    p.packet(&c.fin(ack), flush);
                } else {
                    p.packet(&c.pure_ack(ack), flush);
                }
            }
            Phase::Done => {}
        }
    }
    assert!(closed.iter().all(|c| *c), "not every connection finished");
    p
}

/// Applies `log[from..]` (entry `from + 1` on), collecting actions by index
/// and the state digest after each entry.
fn replay(r: &mut Replica<Probe>, log: &[ReplicaEntry], from: usize) -> Vec<(u64, Action)> {
    let mut actions = Vec::new();
    for (i, e) in log.iter().enumerate().skip(from) {
        let index = i as u64 + 1;
        r.handle_committed(index, e).unwrap();
        while let Some(a) = r.poll_action() {
            actions.push((index, a));
        }
    }
    actions
}

fn per_conn(actions: &[(u64, Action)], consumed: bool) -> BTreeMap<ConnKey, Vec<u8>> {
    let mut out: BTreeMap<ConnKey, Vec<u8>> = BTreeMap::new();
    for (_, a) in actions {
        match a {
            Action::Consumed { conn, bytes } if consumed => {
                out.entry(*conn).or_default().extend_from_slice(bytes)
            }
            Action::Write { conn, bytes } if !consumed => {
                out.entry(*conn).or_default().extend_from_slice(bytes)
            }
            _ => {}
        }
    }
    out
}

fn check_run(seed: u64, streams: &[Vec<u8>], cut: u64) {
    let p = generate(seed, streams);
    let n = p.log.len();

    // Every stream reached the service whole and once, and came back.
    let consumed = per_conn(&p.actions, true);
    let written = per_conn(&p.actions, false);
    for (i, data) in streams.iter().enumerate() {
        assert_eq!(consumed.get(&key(i)).map_or(&[][..], |v| v), &data[..]);
        assert_eq!(written.get(&key(i)).map_or(&[][..], |v| v), &data[..]);
    }
    let probe = p.replica.service();
    let mut got: Vec<&Vec<u8>> = probe.received.values().collect();
    let mut want: Vec<&Vec<u8>> = streams.iter().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Spoofed RSTs closed nothing: every close is the client's FIN.
    for reasons in probe.closed.values() {
        assert_eq!(reasons, &vec![CloseReason::PeerFinished]);
    }
    assert_eq!(p.replica.connections().count(), 0);
    assert_eq!(p.replica.counters().malformed_segments, 0);
    assert_eq!(p.replica.counters().digest_mismatch, 0);
    assert!(p.replica.is_current());
    // Nothing malformed was ever proposed.
    for e in &p.log {
        if let ReplicaEntry::Segment(s) = e {
            assert!(parse(&s.packet, s.checksum()).is_ok());
        }
    }

    // A second replica fed the same log does the same, entry by entry.
    let mut b = Replica::new(Probe::default());
    let mut a2 = Replica::new(Probe::default());
    for (i, e) in p.log.iter().enumerate() {
        let index = i as u64 + 1;
        a2.handle_committed(index, e).unwrap();
        b.handle_committed(index, e).unwrap();
        let xs: Vec<Action> = std::iter::from_fn(|| a2.poll_action()).collect();
        let ys: Vec<Action> = std::iter::from_fn(|| b.poll_action()).collect();
        assert_eq!(xs, ys, "actions at {index}");
        assert_eq!(a2.state_digest(), b.state_digest(), "digest at {index}");
    }
    assert_eq!(b.applied_index(), n as u64);
    assert_eq!(b.state_digest(), p.replica.state_digest());
    let b_actions = replay(&mut Replica::new(Probe::default()), &p.log, 0);
    assert_eq!(b_actions, p.actions);

    // Snapshot at k, restore, continue: the same actions and state.
    let k = (cut as usize) % (n + 1);
    let mut a = Replica::new(Probe::default());
    replay(&mut a, &p.log, 0).truncate(0);
    let mut head = Replica::new(Probe::default());
    replay(&mut head, &p.log[..k], 0);
    check_takeover_states(&head);
    let snap = head.checkpoint();
    let mut restored = Replica::<Probe>::restore(&snap).unwrap();
    assert_eq!(restored.applied_index(), k as u64);
    assert_eq!(restored.state_digest(), head.state_digest());
    let tail_restored = replay(&mut restored, &p.log, k);
    let tail_original = replay(&mut head, &p.log, k);
    assert_eq!(tail_restored, tail_original);
    let expected: Vec<(u64, Action)> = p
        .actions
        .iter()
        .filter(|(i, _)| *i > k as u64)
        .cloned()
        .collect();
    assert_eq!(tail_restored, expected);
    assert_eq!(restored.state_digest(), a.state_digest());
}

fn stream(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

#[test]
fn replicas_agree_on_a_fixed_log() {
    check_run(7, &[stream(5000, 1), stream(1, 2), stream(3000, 3)], 40);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn replicas_agree_and_streams_arrive_whole(
        seed in any::<u64>(),
        streams in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 1..6000), 1..6),
        cut in any::<u64>(),
    ) {
        check_run(seed, &streams, cut);
    }
}

/// A primary with one connection open: SYN, established, handshake ACK.
/// `wscale: None` leaves the client's window unscaled (64 KiB), so the
/// output limit is at its floor.
fn open_one(wscale: Option<u8>) -> (Primary, Client) {
    let mut rng = Rng::new(99);
    let mut p = Primary::new();
    p.commit(ReplicaEntry::Tick(Tick {
        time_ms: 1_000,
        entropy: 5,
    }));
    let mut c = Client::new(0, Vec::new(), &mut rng);
    let mut syn = Builder::new(c.key)
        .seq(c.isn)
        .flags(TcpFlags::SYN)
        .window(64_240)
        .mss(1460);
    if let Some(w) = wscale {
        syn = syn.wscale(w);
    }
    p.packet(&syn.build(), false);
    p.commit(ReplicaEntry::Established(Established {
        conn: c.key,
        isn: server_isn(0),
        mss: 1460,
        wscale: Some(WSCALE),
        sack: false,
        timestamps: false,
        ts_clock: 1,
    }));
    c.phase = Phase::Open;
    (p, c)
}

fn data_packet(c: &Client, off: u32, bytes: &[u8], ack: u32) -> Vec<u8> {
    Builder::new(c.key)
        .seq(c.seq(off))
        .ack(ack)
        .window(65_535)
        .payload(bytes)
        .build()
}

#[test]
fn the_generator_exercises_every_path() {
    let streams = [stream(6000, 1), stream(700, 2), stream(3000, 3)];
    let p = generate(11, &streams);
    let count = |f: &dyn Fn(&ReplicaEntry) -> bool| p.log.iter().filter(|e| f(e)).count();
    assert!(count(&|e| matches!(e, ReplicaEntry::AckState(_))) > 0);
    assert!(count(&|e| matches!(e, ReplicaEntry::OutputDigest(_))) > 0);
    let rsts = count(&|e| match e {
        ReplicaEntry::Segment(s) => parse(&s.packet, s.checksum())
            .unwrap()
            .flags
            .contains(TcpFlags::RST),
        _ => false,
    });
    assert!(rsts > 0, "no spoofed RST in the log");
    assert!(p.replica.counters().digest_ok > 0);
    assert!(!p.dropped.is_empty(), "no damaged packet");
    assert!(!p.replica.service().fired.is_empty(), "no timer fired");
    // Coalescing needs two pure ACKs of a connection between batches.
    let coalesced: u64 = (0..8)
        .map(|seed| generate(seed, &streams).capture.counters().acks_coalesced)
        .sum();
    assert!(coalesced > 0);
}

#[test]
fn output_limit_pauses_input_until_the_client_acknowledges() {
    let (mut p, c) = open_one(None);
    let isn1 = server_isn(0).wrapping_add(1);
    let chunk = vec![7u8; 1000];
    // 300 KB without acknowledging any output: the service stops at the
    // limit (256 KiB, the floor, as the client's window is 64 KiB).
    for i in 0..300u32 {
        p.packet(&data_packet(&c, i * 1000, &chunk, isn1), false);
    }
    let conn = p.replica.connection(&c.key).unwrap();
    assert_eq!(conn.output_limit(), OUTPUT_FLOOR);
    let consumed = p.replica.service().received[&0].len() as u64;
    assert!(
        (OUTPUT_FLOOR..OUTPUT_FLOOR + 1000).contains(&consumed),
        "{consumed}"
    );
    assert_eq!(conn.held_bytes(), 300_000 - consumed);
    assert_eq!(conn.output().unacked(), consumed);
    // The client acknowledges 100 KB: that much more reaches the service,
    // and the retained output starts at the acknowledged byte.
    p.packet(
        &data_packet(&c, 300_000, b"", isn1.wrapping_add(100_000)),
        true,
    );
    let conn = p.replica.connection(&c.key).unwrap();
    assert_eq!(conn.output().acked(), 100_000);
    assert_eq!(p.replica.service().received[&0].len(), 300_000);
    assert_eq!(conn.held_bytes(), 0);
    assert_eq!(conn.output().retained().count() as u64, 200_000);
    // An ACK of output never written is refused by the stream (the
    // kernel drops it), so it trims nothing.
    p.packet(
        &data_packet(&c, 300_000, b"", isn1.wrapping_add(400_000)),
        true,
    );
    assert_eq!(
        p.replica.connection(&c.key).unwrap().output().acked(),
        100_000
    );
}

#[test]
fn a_wrong_output_digest_marks_the_clone_not_current() {
    let (mut p, c) = open_one(Some(WSCALE));
    let isn1 = server_isn(0).wrapping_add(1);
    p.packet(&data_packet(&c, 0, b"hello", isn1), false);
    p.packet(&data_packet(&c, 5, b" world", isn1), false);
    let good = p.replica.output_digest(&c.key).unwrap();
    assert_eq!(good.offset, 11);
    let mut clone = Replica::new(Probe::default());
    replay(&mut clone, &p.log, 0);

    // The primary's true digest, and one at an earlier boundary: fine.
    let mut earlier = good;
    earlier.offset = 5;
    earlier.digest = digest::chain(&[0; 32], 5, b"hello");
    let mut log = p.log.clone();
    log.push(ReplicaEntry::OutputDigest(good));
    log.push(ReplicaEntry::OutputDigest(earlier));
    let n = log.len();
    let actions = replay(&mut clone, &log[..n], p.log.len());
    assert!(actions.is_empty(), "{actions:?}");
    assert!(clone.is_current());
    assert_eq!(clone.counters().digest_ok, 2);

    // Wrong bytes, an offset that is not a boundary, or ahead of ours.
    for bad in [
        OutputDigest {
            digest: [9; 32],
            ..good
        },
        OutputDigest { offset: 7, ..good },
        OutputDigest { offset: 12, ..good },
    ] {
        let mut c2 = Replica::new(Probe::default());
        let mut log = log.clone();
        log.push(ReplicaEntry::OutputDigest(bad));
        let actions = replay(&mut c2, &log, 0);
        assert!(!c2.is_current());
        assert_eq!(
            actions.last().map(|(_, a)| a.clone()),
            Some(Action::DigestMismatch {
                conn: c.key,
                offset: bad.offset
            })
        );
        assert_eq!(c2.counters().digest_mismatch, 1);
    }
}

#[test]
fn a_spoofed_rst_on_a_pending_or_open_connection_closes_nothing() {
    let (mut p, c) = open_one(Some(WSCALE));
    let isn1 = server_isn(0).wrapping_add(1);
    p.packet(&data_packet(&c, 0, b"abc", isn1), false);
    let rst = Builder::new(c.key)
        .seq(c.seq(10))
        .flags(TcpFlags::RST)
        .build();
    p.packet(&rst, false);
    assert!(p.replica.connection(&c.key).is_some());
    // The exact RST resets: the service hears it once.
    let rst = Builder::new(c.key)
        .seq(c.seq(3))
        .flags(TcpFlags::RST)
        .build();
    p.packet(&rst, false);
    assert!(p.replica.connection(&c.key).is_none());
    assert_eq!(p.replica.service().closed[&0], vec![CloseReason::Reset]);
    assert!(p
        .actions
        .iter()
        .any(|(_, a)| *a == Action::Forget { conn: c.key }));
}

#[test]
fn aborted_and_unknown_connections() {
    let (mut p, c) = open_one(Some(WSCALE));
    // A segment of a connection nobody opened is counted and skipped.
    let mut other = Client::new(5, Vec::new(), &mut Rng::new(1));
    other.phase = Phase::Open;
    p.packet(&data_packet(&other, 0, b"zz", 1), false);
    assert_eq!(p.replica.counters().unknown_conn, 1);
    p.commit(ReplicaEntry::Aborted { conn: c.key });
    assert!(p.replica.connection(&c.key).is_none());
    assert_eq!(p.replica.service().closed[&0], vec![CloseReason::Reset]);
    // An established entry without its SYN opens nothing.
    p.commit(ReplicaEntry::Established(Established {
        conn: other.key,
        isn: 1,
        mss: 1460,
        wscale: None,
        sack: false,
        timestamps: false,
        ts_clock: 0,
    }));
    assert_eq!(p.replica.counters().established_without_syn, 1);
    assert_eq!(p.replica.connections().count(), 0);
}

#[test]
fn entries_out_of_order_are_refused_and_change_nothing() {
    let mut r = Replica::new(Probe::default());
    let tick = ReplicaEntry::Tick(Tick {
        time_ms: 5,
        entropy: 1,
    });
    let before = r.state_digest();
    assert_eq!(
        r.handle_committed(0, &tick),
        Err(ReplicaError::OutOfOrder {
            expected: 1,
            got: 0
        })
    );
    assert_eq!(r.state_digest(), before);
    r.handle_committed(1, &tick).unwrap();
    assert!(r.handle_committed(1, &tick).is_err());
    assert_eq!(r.applied_index(), 1);
    assert_ne!(r.state_digest(), before);
    // The log's own entries leave gaps; they count as applied.
    r.handle_skipped(2, false).unwrap();
    r.handle_committed(4, &tick).unwrap();
    assert_eq!(r.applied_index(), 4);
    assert!(r.handle_skipped(3, false).is_err());
    r.handle_skipped(5, true).unwrap();
    assert_eq!(r.counters().undecodable_entries, 1);
    assert_eq!(r.applied_index(), 5);
}

#[test]
fn checkpoint_markers_ask_for_a_checkpoint_at_their_index() {
    let mut r = Replica::new(Probe::default());
    r.handle_committed(1, &ReplicaEntry::Checkpoint).unwrap();
    assert_eq!(r.poll_action(), Some(Action::CheckpointDue { index: 1 }));
    assert!(Replica::<Probe>::restore(b"garbage").is_err());
    let mut snap = r.checkpoint();
    snap.truncate(snap.len() - 1);
    assert!(Replica::<Probe>::restore(&snap).is_err());
}

fn pure_ack_packet(c: &Client, ack: u32, window: u16) -> Vec<u8> {
    Builder::new(c.key)
        .seq(c.seq(0))
        .ack(ack)
        .window(window)
        .build()
}

#[test]
fn capture_drops_malformed_and_accepts_pure_acks_at_once() {
    let c = Client::new(0, Vec::new(), &mut Rng::new(3));
    let mut cap = Capture::new();
    let good = pure_ack_packet(&c, 100, 10);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    cap.handle_captured(1, &bad, TcpChecksum::Verify);
    cap.handle_captured(2, &good[..10], TcpChecksum::Verify);
    assert_eq!(
        cap.poll_verdicts(),
        vec![(1, Verdict::Drop), (2, Verdict::Drop)]
    );
    assert_eq!(cap.counters().malformed, 2);
    assert!(cap.poll_proposals(true).is_empty());

    // A node that does not serve drops even a good segment, unread.
    cap.handle_refused(6);
    assert_eq!(cap.poll_verdicts(), vec![(6, Verdict::Drop)]);
    assert_eq!(cap.counters().refused, 1);
    assert!(cap.poll_proposals(true).is_empty());

    // Pure ACKs pass at once and coalesce: the newest wins, a reordered
    // older one does not undo it.
    cap.handle_captured(3, &pure_ack_packet(&c, 100, 10), TcpChecksum::Verify);
    cap.handle_captured(4, &pure_ack_packet(&c, 300, 20), TcpChecksum::Verify);
    cap.handle_captured(5, &pure_ack_packet(&c, 200, 30), TcpChecksum::Verify);
    assert_eq!(
        cap.poll_verdicts(),
        vec![
            (3, Verdict::Accept),
            (4, Verdict::Accept),
            (5, Verdict::Accept)
        ]
    );
    // Not proposed alone unless asked.
    assert!(cap.poll_proposals(false).is_empty());
    let props = cap.poll_proposals(true);
    assert_eq!(props.len(), 1);
    assert!(props[0].packet_ids.is_empty());
    match &props[0].entry {
        ReplicaEntry::AckState(a) => assert_eq!((a.ack, a.window), (300, 20)),
        e => panic!("{e:?}"),
    }
    assert!(cap.poll_proposals(true).is_empty());
}

#[test]
fn capture_accepts_data_only_after_commit_in_log_order() {
    let c = Client::new(0, vec![1; 30], &mut Rng::new(3));
    let mut cap = Capture::new();
    cap.handle_captured(9, &pure_ack_packet(&c, 100, 10), TcpChecksum::Verify);
    assert_eq!(cap.poll_verdicts(), vec![(9, Verdict::Accept)]);
    for (id, off) in [(10u32, 0u32), (11, 10), (12, 20)] {
        let p = data_packet(&c, off, &[off as u8; 10], 1);
        cap.handle_captured(id, &p, TcpChecksum::Trusted);
    }
    let syn = c.syn();
    cap.handle_captured(13, &syn, TcpChecksum::Verify);
    assert!(cap.poll_verdicts().is_empty());
    let props = cap.poll_proposals(false);
    // The pending ACK state goes first, with the batch.
    assert_eq!(props.len(), 5);
    assert!(matches!(props[0].entry, ReplicaEntry::AckState(_)));
    match &props[1].entry {
        ReplicaEntry::Segment(s) => {
            assert!(!s.verify_checksum);
            assert_eq!(parse(&s.packet, s.checksum()).unwrap().payload, &[0; 10]);
        }
        e => panic!("{e:?}"),
    }
    // Indexes as the log assigned them.
    for (i, p) in props.iter().enumerate() {
        cap.handle_proposed(&p.packet_ids, 20 + i as u64);
    }
    assert_eq!(cap.waiting(), 4);
    cap.handle_commit(19);
    assert!(cap.poll_verdicts().is_empty());
    cap.handle_commit(22);
    assert_eq!(
        cap.poll_verdicts(),
        vec![(10, Verdict::Accept), (11, Verdict::Accept)]
    );
    cap.handle_commit(22);
    assert!(cap.poll_verdicts().is_empty());
    cap.handle_commit(24);
    assert_eq!(
        cap.poll_verdicts(),
        vec![(12, Verdict::Accept), (13, Verdict::Accept)]
    );
    assert_eq!(cap.waiting(), 0);

    // A late index report for an entry already committed accepts at once;
    // on lost leadership, what waits is dropped.
    let p = data_packet(&c, 30, b"x", 1);
    cap.handle_captured(14, &p, TcpChecksum::Verify);
    cap.handle_captured(15, &p, TcpChecksum::Verify);
    cap.handle_captured(16, &p, TcpChecksum::Verify);
    let props = cap.poll_proposals(false);
    cap.handle_proposed(&props[0].packet_ids, 24);
    cap.handle_proposed(&props[1].packet_ids, 25);
    assert_eq!(cap.poll_verdicts(), vec![(14, Verdict::Accept)]);
    cap.handle_lost_leadership();
    assert_eq!(cap.poll_verdicts(), vec![(15, Verdict::Drop)]);
    // The one whose proposal the log refused.
    cap.handle_proposal_failed(&props[2].packet_ids);
    assert_eq!(cap.poll_verdicts(), vec![(16, Verdict::Drop)]);
}

#[test]
fn entries_round_trip() {
    let c = Client::new(0, Vec::new(), &mut Rng::new(3));
    let entries = vec![
        ReplicaEntry::Segment(ClientSegment {
            packet: c.syn(),
            verify_checksum: true,
        }),
        ReplicaEntry::Established(Established {
            conn: c.key,
            isn: 1,
            mss: 1460,
            wscale: Some(7),
            sack: true,
            timestamps: true,
            ts_clock: 99,
        }),
        ReplicaEntry::Aborted { conn: c.key },
        ReplicaEntry::Tick(Tick {
            time_ms: 1,
            entropy: 2,
        }),
        ReplicaEntry::AckState(AckState {
            conn: c.key,
            seq: 1,
            ack: 2,
            window: 3,
            timestamp: Some(crate::packet::Timestamp { tsval: 4, tsecr: 5 }),
        }),
        ReplicaEntry::Checkpoint,
        ReplicaEntry::OutputDigest(OutputDigest {
            conn: c.key,
            offset: 9,
            digest: [3; 32],
        }),
    ];
    for e in entries {
        let bytes = e.encode();
        assert_eq!(ReplicaEntry::decode(&bytes).unwrap(), e);
        for cut in 0..bytes.len() {
            assert!(ReplicaEntry::decode(&bytes[..cut]).is_err());
        }
    }
}

proptest! {
    #[test]
    fn hostile_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        framed in any::<bool>(),
    ) {
        let input = if framed {
            let mut f = entry::MAGIC.to_vec();
            f.extend_from_slice(&entry::VERSION.to_be_bytes());
            f.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            f.extend_from_slice(&bytes);
            f
        } else {
            bytes.clone()
        };
        let _ = ReplicaEntry::decode(&input);
        let _ = Replica::<Probe>::restore(&input);
        // Hostile packets: through the capture path, and as committed
        // segments (an entry's packet is never trusted either).
        let mut cap = Capture::new();
        cap.handle_captured(1, &bytes, TcpChecksum::Verify);
        cap.handle_captured(2, &bytes, TcpChecksum::Trusted);
        let verdicts = cap.poll_verdicts();
        let proposed = cap.poll_proposals(true);
        prop_assert_eq!(verdicts.len() + proposed.iter().map(|p| p.packet_ids.len()).sum::<usize>(), 2);
        let mut r = Replica::new(Probe::default());
        r.handle_committed(1, &ReplicaEntry::Segment(ClientSegment { packet: bytes, verify_checksum: false })).unwrap();
    }
}

/// Every open connection of `r` has a takeover state a kernel takes, and
/// it matches the replica's view of the streams.
fn check_takeover_states(r: &Replica<Probe>) {
    for (k, c) in r.connections() {
        let Some(st) = takeover::conn_state(k, c, r.now_ms() + 500, 100) else {
            assert!(c.stream().fin_received() && c.fin_queued());
            continue;
        };
        st.validate().unwrap();
        assert_eq!(st.rcv_nxt(), c.stream().rcv_nxt());
        let e = c.established();
        assert_eq!(
            st.snd_nxt().wrapping_add(st.unsent.len() as u32),
            e.isn.wrapping_add(1).wrapping_add(c.output().sent() as u32)
        );
        assert_eq!(
            (st.unacked.len() + st.unsent.len()) as u64,
            c.output().unacked()
        );
        assert!(st.unsent.len() <= usize::from(st.options.mss));
        let mss = usize::from(st.options.mss);
        assert!(st.unacked.is_empty() || st.unsent.is_empty() || st.unsent.len() == mss);
        assert!(st.unacked.len().div_ceil(mss) < takeover::INITIAL_CWND || st.unsent.is_empty());
        assert_eq!(st.unread.len() as u64, c.held_bytes());
        assert_eq!(st.state.fin_received(), c.stream().fin_received());
        assert_eq!(st.state.fin_sent(), c.fin_queued());
        assert_eq!((st.local, st.remote), (k.server, k.client));
    }
}

#[test]
fn takeover_state_follows_the_log() {
    let (mut p, c) = open_one(Some(WSCALE));
    let isn1 = server_isn(0).wrapping_add(1);
    p.packet(&data_packet(&c, 0, b"hello", isn1), false);
    // The probe echoed it; the client acknowledges two bytes of the echo.
    p.packet(&data_packet(&c, 5, b"", isn1.wrapping_add(2)), true);
    let conn = p.replica.connection(&c.key).unwrap();
    let st = takeover::conn_state(&c.key, conn, 2_000, 150).unwrap();
    st.validate().unwrap();
    assert_eq!(st.state, crate::tcp_state::TcpState::Established);
    assert_eq!(st.send_seq, isn1.wrapping_add(2));
    // The retained output's last segment goes out fresh.
    assert_eq!(st.unsent, b"llo");
    assert!(st.unacked.is_empty() && st.unread.is_empty());
    assert_eq!(st.recv_seq, c.seq(5));
    let ws = st.options.window_scale.unwrap();
    assert_eq!((ws.snd, ws.rcv), (WSCALE, WSCALE));
    assert!(!st.options.timestamps && !st.options.sack_permitted);
    // Established at log time 1000 with clock 1 (microsecond flag):
    // 1000 ms later plus the margin, in microseconds.
    assert_eq!(st.timestamp, 1 + 1_150_000);
    assert_eq!(st.window.rcv_wup, st.rcv_nxt());

    // The client finishes: the probe closes; both FINs in flight.
    let fin = Builder::new(c.key)
        .seq(c.seq(5))
        .ack(isn1.wrapping_add(5))
        .window(65_535)
        .flags(TcpFlags::FIN)
        .build();
    p.packet(&fin, false);
    let conn = p.replica.connection(&c.key).unwrap();
    let st = takeover::conn_state(&c.key, conn, 2_000, 150).unwrap();
    assert_eq!(st.state, crate::tcp_state::TcpState::LastAck);
    assert_eq!(st.rcv_nxt(), c.seq(6));
    st.validate().unwrap();
}

#[test]
fn takeover_state_carries_input_the_service_has_not_taken() {
    // An unscaled client window: the output limit is at its floor, and the
    // probe's echo, never acknowledged, reaches it.
    let (mut p, c) = open_one(None);
    let isn1 = server_isn(0).wrapping_add(1);
    let chunk = vec![7u8; 1000];
    let total = OUTPUT_FLOOR as usize + 5_000;
    let mut off = 0;
    while off < total {
        p.packet(&data_packet(&c, off as u32, &chunk, isn1), false);
        off += chunk.len();
    }
    let conn = p.replica.connection(&c.key).unwrap();
    assert!(conn.held_bytes() > 0);
    let st = takeover::conn_state(&c.key, conn, 2_000, 150).unwrap();
    st.validate().unwrap();
    assert_eq!(st.unread.len() as u64, conn.held_bytes());
    assert_eq!(st.recv_seq, c.seq((off - st.unread.len()) as u32));
    assert_eq!(
        (st.unacked.len() + st.unsent.len()) as u64,
        conn.output().unacked()
    );
    // Far more in flight than a new socket's first window: all of it is
    // restored as sent.
    assert!(st.unsent.is_empty());
}

#[test]
fn the_timestamp_clock_goes_forward_and_keeps_its_flag() {
    use takeover::timestamp_clock;
    // Milliseconds (flag clear), across the wrap.
    assert_eq!(timestamp_clock(0xFFFF_FFF0, 100, 150, 10), 0x2C);
    assert_eq!(timestamp_clock(1000, 100, 150, 10), 1060);
    // Microseconds (flag set).
    assert_eq!(timestamp_clock(1001, 100, 150, 10), 1001 + 60_000);
    // A clock read after "now" (skew) still moves by the margin.
    assert_eq!(timestamp_clock(1000, 200, 150, 10), 1010);
}
