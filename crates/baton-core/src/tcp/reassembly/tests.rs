use super::*;
use crate::packet::{parse, Builder, ConnKey, TcpChecksum};
use proptest::prelude::*;

const T0: u64 = 5_000;
const SERVER_ISN: u32 = 0x1000_0000;

fn key() -> ConnKey {
    ConnKey {
        client: "198.18.2.1:40000".parse().unwrap(),
        server: "198.18.0.10:6379".parse().unwrap(),
    }
}

/// How the test connection was negotiated.
#[derive(Clone, Copy)]
struct Setup {
    isn: u32,
    wscale: Option<u8>,
    sack: bool,
    ts: bool,
    max_window: u32,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            isn: 1000,
            wscale: Some(7),
            sack: true,
            ts: false,
            max_window: 65535,
        }
    }
}

/// A connection under test, fed real packets through the parser.
struct Conn {
    r: Reassembler,
    isn: u32,
    now: u64,
}

impl Conn {
    fn new(s: Setup) -> Conn {
        let mut b = Builder::new(key())
            .seq(s.isn)
            .flags(TcpFlags::SYN)
            .window(29200)
            .mss(1460)
            .sack_permitted();
        if let Some(w) = s.wscale {
            b = b.wscale(w);
        }
        if s.ts {
            b = b.timestamp(1000, 0);
        }
        let p = b.build();
        let syn = ClientSyn::from_segment(&parse(&p, TcpChecksum::Verify).unwrap()).unwrap();
        let server = ServerParams {
            isn: SERVER_ISN,
            wscale: Some(7),
            sack: s.sack,
            timestamps: true,
            max_window: s.max_window,
        };
        Conn {
            r: Reassembler::new(&syn, &server, T0),
            isn: s.isn,
            now: T0,
        }
    }

    /// Sequence number of stream offset `off`.
    fn seq(&self, off: u32) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(off)
    }

    /// A data segment at stream offset `off`, acknowledging our SYN.
    fn data(&self, off: u32, bytes: &[u8]) -> Builder {
        Builder::new(key())
            .seq(self.seq(off))
            .ack(SERVER_ISN + 1)
            .window(1000)
            .payload(bytes)
    }

    fn feed(&mut self, b: Builder) -> Result<(), Refusal> {
        let p = b.build();
        let seg = parse(&p, TcpChecksum::Verify).unwrap();
        self.r.handle_segment(&seg, self.now)
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.r.poll_event()).collect()
    }

    /// All data delivered so far, checking that nothing follows a FIN or
    /// a reset.
    fn stream(&mut self) -> (Vec<u8>, Outcome) {
        let mut out = Vec::new();
        let mut end = Outcome::Open;
        for e in self.events() {
            match e {
                Event::Data(d) => {
                    assert_eq!(end, Outcome::Open, "data after {end:?}");
                    assert!(!d.is_empty());
                    out.extend_from_slice(&d);
                }
                Event::Fin => {
                    assert_eq!(end, Outcome::Open, "FIN after {end:?}");
                    end = Outcome::Fin;
                }
                Event::Reset => {
                    assert_ne!(end, Outcome::Reset, "second reset");
                    end = Outcome::Reset;
                }
                Event::ChallengeAck => {}
            }
        }
        (out, end)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Open,
    Fin,
    Reset,
}

#[test]
fn in_order_data() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"hello ")).unwrap();
    c.feed(c.data(6, b"world")).unwrap();
    assert_eq!(c.stream(), (b"hello world".to_vec(), Outcome::Open));
    assert_eq!(c.r.rcv_nxt(), c.seq(11));
    assert_eq!(c.r.counters().accepted, 2);
}

#[test]
fn retransmissions_are_ignored() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"hello")).unwrap();
    // The same segment again ends at rcv_nxt: its ACK counts, its data not.
    assert_eq!(c.feed(c.data(0, b"hello")), Err(Refusal::Duplicate));
    // An older part ends before rcv_nxt: dropped before the ACK.
    assert_eq!(c.feed(c.data(0, b"hel")), Err(Refusal::OldSequence));
    assert_eq!(c.stream(), (b"hello".to_vec(), Outcome::Open));
    assert_eq!(c.r.counters().refused_total(), 1);
}

#[test]
fn partial_overlaps_are_trimmed() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"hello")).unwrap();
    c.feed(c.data(3, b"XXworld")).unwrap();
    assert_eq!(c.stream(), (b"helloworld".to_vec(), Outcome::Open));
}

#[test]
fn first_bytes_win_and_out_of_order_waits_for_the_hole() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(6, b"world")).unwrap();
    c.feed(c.data(8, b"XXXX!")).unwrap();
    assert_eq!(c.r.ooo_bytes(), 7);
    assert_eq!(c.stream(), (Vec::new(), Outcome::Open));
    assert_eq!(c.r.rcv_nxt(), c.seq(0));
    c.feed(c.data(0, b"hello ")).unwrap();
    assert_eq!(c.stream(), (b"hello worldX!".to_vec(), Outcome::Open));
    assert_eq!(c.r.ooo_bytes(), 0);
}

#[test]
fn receive_window() {
    let mut c = Conn::new(Setup {
        max_window: 100,
        ..Setup::default()
    });
    assert_eq!(c.feed(c.data(100, b"x")), Err(Refusal::OutOfWindow));
    assert_eq!(c.feed(c.data(5000, b"x")), Err(Refusal::OutOfWindow));
    // Starting inside, a segment is held whole, as the kernel does.
    c.feed(c.data(99, &[b'y'; 50])).unwrap();
    assert_eq!(c.r.ooo_bytes(), 50);
    // A pure ACK at the edge is inside; past it is not.
    c.feed(Builder::new(key()).seq(c.seq(100)).ack(SERVER_ISN + 1))
        .unwrap();
    assert_eq!(
        c.feed(Builder::new(key()).seq(c.seq(101)).ack(SERVER_ISN + 1)),
        Err(Refusal::OutOfWindow)
    );
    c.feed(c.data(0, &[b'a'; 99])).unwrap();
    let (data, _) = c.stream();
    assert_eq!(data.len(), 149);
    // The window moves with rcv_nxt.
    c.feed(c.data(200, b"z")).unwrap();
    assert_eq!(c.r.counters().refused(Refusal::OutOfWindow), 3);
}

#[test]
fn sequence_numbers_wrap() {
    let mut c = Conn::new(Setup {
        isn: u32::MAX - 3,
        ..Setup::default()
    });
    c.feed(c.data(5, b"world")).unwrap();
    c.feed(c.data(0, b"hello")).unwrap();
    assert_eq!(c.stream(), (b"helloworld".to_vec(), Outcome::Open));
    assert_eq!(c.r.rcv_nxt(), 7);
    assert_eq!(c.feed(c.data(0, b"he")), Err(Refusal::OldSequence));
    assert_eq!(c.feed(c.data(65535 + 10, b"x")), Err(Refusal::OutOfWindow));
}

#[test]
fn segments_without_ack_are_dropped() {
    let mut c = Conn::new(Setup::default());
    let b = Builder::new(key()).seq(c.seq(0)).payload(b"hi");
    assert_eq!(c.feed(b), Err(Refusal::NoAck));
    assert_eq!(c.stream(), (Vec::new(), Outcome::Open));
}

#[test]
fn exact_rst_resets() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc")).unwrap();
    c.feed(Builder::new(key()).seq(c.seq(3)).flags(TcpFlags::RST))
        .unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Reset));
    assert!(c.r.is_reset());
    assert_eq!(c.feed(c.data(3, b"d")), Err(Refusal::Closed));
}

#[test]
fn spoofed_rsts_challenge_or_vanish() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc")).unwrap();
    let rst = |c: &Conn, off: u32| {
        Builder::new(key())
            .seq(c.seq(off))
            .ack(SERVER_ISN + 1)
            .flags(TcpFlags::RST)
    };
    assert_eq!(c.feed(rst(&c, 4)), Err(Refusal::RstNotExact));
    assert_eq!(c.feed(rst(&c, 60_000)), Err(Refusal::RstNotExact));
    assert_eq!(c.feed(rst(&c, 2)), Err(Refusal::RstOutOfWindow));
    assert_eq!(c.feed(rst(&c, 3 + 70_000)), Err(Refusal::RstOutOfWindow));
    assert_eq!(
        c.events(),
        vec![
            Event::Data(b"abc".to_vec()),
            Event::ChallengeAck,
            Event::ChallengeAck
        ]
    );
    assert_eq!(c.r.counters().challenge_acks, 2);
    c.feed(c.data(3, b"d")).unwrap();
    assert_eq!(c.stream(), (b"d".to_vec(), Outcome::Open));
}

#[test]
fn rst_on_the_fin_after_it() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc").flags(TcpFlags::FIN)).unwrap();
    assert_eq!(c.r.rcv_nxt(), c.seq(4));
    c.feed(Builder::new(key()).seq(c.seq(3)).flags(TcpFlags::RST))
        .unwrap();
    assert_eq!(c.events().last(), Some(&Event::Reset));
}

#[test]
fn rst_at_the_sack_edge() {
    for sack in [true, false] {
        let mut c = Conn::new(Setup {
            sack,
            ..Setup::default()
        });
        c.feed(c.data(0, b"abc")).unwrap();
        c.feed(c.data(10, b"klm")).unwrap();
        c.feed(c.data(20, b"uvw")).unwrap();
        // Not the edge of an older block.
        let rst = |c: &Conn, off| Builder::new(key()).seq(c.seq(off)).flags(TcpFlags::RST);
        assert_eq!(c.feed(rst(&c, 13)), Err(Refusal::RstNotExact));
        let r = c.feed(rst(&c, 23));
        if sack {
            assert_eq!(r, Ok(()));
            assert_eq!(c.stream().1, Outcome::Reset);
        } else {
            assert_eq!(r, Err(Refusal::RstNotExact));
        }
    }
}

#[test]
fn sack_blocks_follow_the_kernel() {
    let mut c = Conn::new(Setup::default());
    // Five holes: the oldest block is forgotten (four remembered).
    for i in 1..=5u32 {
        c.feed(c.data(i * 10, b"xx")).unwrap();
    }
    assert_eq!(c.r.sacks, vec![(50, 52), (40, 42), (30, 32), (20, 22)]);
    // Extending an old block moves it to the front and merges neighbours.
    c.feed(c.data(22, &[b'y'; 9])).unwrap();
    assert_eq!(c.r.sacks, vec![(20, 32), (50, 52), (40, 42)]);
    // Filling the first hole eats the blocks it reached.
    c.feed(c.data(0, &[b'z'; 20])).unwrap();
    assert_eq!(c.r.rcv_nxt(), c.seq(32));
    assert_eq!(c.r.sacks, vec![(50, 52), (40, 42)]);
    // The forgotten block's data is still held and delivered.
    c.feed(c.data(32, &[b'w'; 30])).unwrap();
    assert!(c.r.sacks.is_empty());
    assert_eq!(c.stream().0.len(), 62);
}

#[test]
fn syn_on_an_established_connection_challenges() {
    let mut c = Conn::new(Setup::default());
    let syn = |c: &Conn, off: u32| Builder::new(key()).seq(c.seq(off)).flags(TcpFlags::SYN);
    // The client's own SYN again (seq = ISN), one in the window, one far.
    assert_eq!(
        c.feed(Builder::new(key()).seq(c.isn).flags(TcpFlags::SYN)),
        Err(Refusal::Syn)
    );
    assert_eq!(c.feed(syn(&c, 100)), Err(Refusal::Syn));
    assert_eq!(c.feed(syn(&c, 1 << 20)), Err(Refusal::Syn));
    assert_eq!(c.r.counters().challenge_acks, 3);
    assert_eq!(c.r.rcv_nxt(), c.seq(0));
}

#[test]
fn paws() {
    let mut c = Conn::new(Setup {
        ts: true,
        ..Setup::default()
    });
    c.feed(c.data(0, b"a").timestamp(2000, 7)).unwrap();
    assert_eq!(c.r.ts_recent(), Some(2000));
    // One tick older passes (TCP_PAWS_WINDOW); two do not.
    c.feed(c.data(1, b"b").timestamp(1999, 7)).unwrap();
    assert_eq!(
        c.feed(c.data(2, b"c").timestamp(1998, 7)),
        Err(Refusal::Paws)
    );
    // Without the option there is nothing to check.
    c.feed(c.data(2, b"c")).unwrap();
    // Out-of-order segments do not move ts_recent.
    c.feed(c.data(10, b"k").timestamp(5000, 8)).unwrap();
    assert_eq!(c.r.ts_recent(), Some(2000));
    // An RST is not subject to PAWS.
    c.feed(
        Builder::new(key())
            .seq(c.seq(3))
            .flags(TcpFlags::RST)
            .timestamp(1, 0),
    )
    .unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Reset));
    assert_eq!(
        c.r.client().timestamp,
        Some(Timestamp {
            tsval: 5000,
            tsecr: 8
        })
    );
}

#[test]
fn paws_gives_up_on_an_idle_connection() {
    let mut c = Conn::new(Setup {
        ts: true,
        ..Setup::default()
    });
    c.feed(c.data(0, b"a").timestamp(0x7000_0000, 7)).unwrap();
    c.now += PAWS_IDLE_MS - 1;
    assert_eq!(c.feed(c.data(1, b"b").timestamp(5, 7)), Err(Refusal::Paws));
    c.now += 1;
    c.feed(c.data(1, b"b").timestamp(5, 7)).unwrap();
    assert_eq!(c.r.ts_recent(), Some(5));
}

#[test]
fn paws_is_off_unless_negotiated() {
    // The client offered timestamps only when `ts` is set; here it did not.
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"a").timestamp(2000, 7)).unwrap();
    c.feed(c.data(1, b"b").timestamp(1, 7)).unwrap();
    assert_eq!(c.r.ts_recent(), None);
    assert_eq!(c.r.client().timestamp, None);
}

#[test]
fn paws_rejects_old_syn_with_a_challenge() {
    let mut c = Conn::new(Setup {
        ts: true,
        ..Setup::default()
    });
    c.feed(c.data(0, b"a").timestamp(2000, 7)).unwrap();
    let syn = Builder::new(key())
        .seq(c.seq(1))
        .flags(TcpFlags::SYN)
        .timestamp(10, 0);
    assert_eq!(c.feed(syn), Err(Refusal::Syn));
    assert_eq!(c.r.counters().challenge_acks, 1);
}

#[test]
fn client_ack_and_window() {
    let mut c = Conn::new(Setup::default());
    // From the SYN: unscaled window, our SYN not yet acknowledged beyond.
    let v = c.r.client();
    assert_eq!((v.snd_una, v.snd_wnd, v.wscale), (SERVER_ISN + 1, 29200, 7));
    c.r.queue_output(5000);
    let ack = |c: &Conn, off: u32, ack: u32, win: u16| {
        Builder::new(key()).seq(c.seq(off)).ack(ack).window(win)
    };
    c.feed(ack(&c, 0, SERVER_ISN + 1001, 300)).unwrap();
    let v = c.r.client();
    assert_eq!(
        (v.snd_una, v.snd_wnd, v.snd_wl1),
        (SERVER_ISN + 1001, 300 << 7, c.seq(0))
    );
    // Same ACK, same wl1, smaller window: not believed.
    c.feed(ack(&c, 0, SERVER_ISN + 1001, 200)).unwrap();
    assert_eq!(c.r.client().snd_wnd, 300 << 7);
    // Same ACK, same wl1, larger window: believed.
    c.feed(ack(&c, 0, SERVER_ISN + 1001, 400)).unwrap();
    assert_eq!(c.r.client().snd_wnd, 400 << 7);
    // Same wl1, equal window: unchanged; a later segment may shrink it.
    c.feed(c.data(0, b"x").ack(SERVER_ISN + 1001).window(400))
        .unwrap();
    c.feed(c.data(1, b"y").ack(SERVER_ISN + 1001).window(100))
        .unwrap();
    let v = c.r.client();
    assert_eq!(
        (v.snd_wnd, v.snd_wl1, v.max_window),
        (100 << 7, c.seq(1), 400 << 7)
    );
    // An old ACK's window is not believed, its data is used.
    c.feed(c.data(2, b"z").ack(SERVER_ISN + 500).window(900))
        .unwrap();
    let v = c.r.client();
    assert_eq!((v.snd_una, v.snd_wnd), (SERVER_ISN + 1001, 100 << 7));
    assert_eq!(c.stream().0, b"xyz");
}

#[test]
fn acks_of_unsent_or_long_acknowledged_data_drop_the_segment() {
    let mut c = Conn::new(Setup {
        wscale: None,
        ..Setup::default()
    });
    assert_eq!(c.r.client().wscale, 0);
    // Nothing sent yet: acknowledging 10 bytes is acknowledging the future.
    assert_eq!(
        c.feed(c.data(0, b"a").ack(SERVER_ISN + 11)),
        Err(Refusal::AckUnsent)
    );
    c.r.queue_output(10);
    c.feed(c.data(0, b"a").ack(SERVER_ISN + 11).window(4))
        .unwrap();
    // Window 4 (never larger), 10 bytes acknowledged: ACKs back to
    // snd_una - 4 are old but fine, older ones are refused.
    c.feed(c.data(1, b"b").ack(SERVER_ISN + 7)).unwrap();
    assert_eq!(
        c.feed(c.data(2, b"c").ack(SERVER_ISN + 6)),
        Err(Refusal::AckTooOld)
    );
    assert_eq!(c.r.counters().challenge_acks, 1);
    // Our FIN counts one more.
    c.r.queue_fin(false);
    c.feed(c.data(2, b"c").ack(SERVER_ISN + 12)).unwrap();
    assert_eq!(c.stream().0, b"abc");
}

#[test]
fn fin_after_data() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc")).unwrap();
    c.feed(c.data(3, b"de").flags(TcpFlags::FIN)).unwrap();
    assert_eq!(c.stream(), (b"abcde".to_vec(), Outcome::Fin));
    assert_eq!(c.r.rcv_nxt(), c.seq(6));
    assert!(c.r.fin_received());
    // The FIN again, and a pure ACK after it: nothing new.
    assert_eq!(
        c.feed(c.data(3, b"de").flags(TcpFlags::FIN)),
        Err(Refusal::Duplicate)
    );
    c.feed(Builder::new(key()).seq(c.seq(6)).ack(SERVER_ISN + 1))
        .unwrap();
    // Data past the FIN is not part of the stream.
    assert_eq!(c.feed(c.data(6, b"zz")), Err(Refusal::AfterFin));
    assert_eq!(c.stream(), (Vec::new(), Outcome::Open));
}

#[test]
fn fin_before_the_hole_fills() {
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(3, b"de").flags(TcpFlags::FIN)).unwrap();
    c.feed(c.data(1, b"bc")).unwrap();
    assert_eq!(c.stream(), (Vec::new(), Outcome::Open));
    // Data past the known FIN is refused while out of order.
    assert_eq!(c.feed(c.data(8, b"zz")), Err(Refusal::AfterFin));
    c.feed(c.data(0, b"a")).unwrap();
    assert_eq!(c.stream(), (b"abcde".to_vec(), Outcome::Fin));
    assert_eq!(c.r.ooo_bytes(), 0);
}

#[test]
fn bare_fin_out_of_order() {
    let mut c = Conn::new(Setup::default());
    c.feed(
        Builder::new(key())
            .seq(c.seq(3))
            .ack(SERVER_ISN + 1)
            .flags(TcpFlags::FIN),
    )
    .unwrap();
    c.feed(c.data(0, b"abcdef")).unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Fin));
}

#[test]
fn new_data_after_the_stream_closed_resets() {
    // Overlapping past the client's own FIN: the kernel resets (RFC 1122).
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc").flags(TcpFlags::FIN)).unwrap();
    c.feed(c.data(2, b"cde")).unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Reset));

    // The service closed the socket: new data resets, retransmissions not.
    let mut c = Conn::new(Setup::default());
    c.feed(c.data(0, b"abc")).unwrap();
    c.r.queue_fin(true);
    assert_eq!(c.feed(c.data(0, b"abc")), Err(Refusal::Duplicate));
    c.feed(c.data(3, b"d")).unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Reset));

    // Shutting down writes only keeps reading.
    let mut c = Conn::new(Setup::default());
    c.r.queue_fin(false);
    c.feed(c.data(0, b"abc")).unwrap();
    assert_eq!(c.stream(), (b"abc".to_vec(), Outcome::Open));
}

#[test]
fn syn_parameters() {
    let syn = Builder::new(key())
        .seq(7)
        .flags(TcpFlags::SYN)
        .wscale(9)
        .timestamp(3, 0)
        .build();
    let s = ClientSyn::from_segment(&parse(&syn, TcpChecksum::Verify).unwrap()).unwrap();
    assert_eq!(s.isn, 7);
    assert_eq!(s.wscale, Some(9));
    assert_eq!(s.timestamp, Some(Timestamp { tsval: 3, tsecr: 0 }));
    for flags in [TcpFlags::ACK, TcpFlags::RST, TcpFlags::FIN] {
        let p = Builder::new(key())
            .seq(7)
            .flags(TcpFlags::SYN | flags)
            .build();
        assert_eq!(
            ClientSyn::from_segment(&parse(&p, TcpChecksum::Verify).unwrap()),
            None
        );
    }
    // A window scale above 14 is clamped, as the kernel does.
    let syn = ClientSyn {
        wscale: Some(20),
        ..s
    };
    let server = ServerParams {
        isn: 1,
        wscale: Some(0),
        sack: false,
        timestamps: false,
        max_window: 1000,
    };
    assert_eq!(Reassembler::new(&syn, &server, 0).client().wscale, 14);
    let server = ServerParams {
        wscale: None,
        ..server
    };
    assert_eq!(Reassembler::new(&syn, &server, 0).client().wscale, 0);
}

/// What the property tests send besides the stream itself.
#[derive(Debug, Clone)]
enum Bad {
    /// Data starting past any window the connection can have.
    OutOfWindow(u32),
    /// An RST `d` away from rcv_nxt at the time (d never 0 nor -1).
    Rst(i32),
    /// A SYN anywhere.
    Syn(u32),
    /// Garbage at rcv_nxt acknowledging data never sent.
    AckUnsent,
    /// Garbage at rcv_nxt with a timestamp far too old.
    StaleTimestamp,
}

fn any_bad() -> impl Strategy<Value = Bad> {
    prop_oneof![
        (0u32..1_000_000).prop_map(Bad::OutOfWindow),
        prop_oneof![2i32..70_000, -70_000i32..-1].prop_map(|d| Bad::Rst(if d == -1 {
            -2
        } else {
            d
        })),
        any::<u32>().prop_map(Bad::Syn),
        Just(Bad::AckUnsent),
        Just(Bad::StaleTimestamp),
    ]
}

fn any_isn() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), (u32::MAX - 5000)..=u32::MAX]
}

/// One delivery: a piece of the stream `[from, to)` (with the FIN if it
/// ends the stream and the stream has one), or something bad.
#[derive(Debug, Clone)]
enum Send {
    Piece(u32, u32),
    Bad(Bad),
}

/// Cuts `len` bytes into segments at `cuts`, sends each 1 to 3 times, adds
/// `extra` random overlapping pieces and the bad segments, and shuffles.
fn schedule(
    len: u32,
    cuts: &[u32],
    copies: &[u8],
    extra: &[(u32, u32)],
    bad: &[Bad],
    order: &[u32],
) -> Vec<Send> {
    let mut points: Vec<u32> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points.dedup();
    let mut sends = Vec::new();
    for (i, w) in points.windows(2).enumerate() {
        for _ in 0..=copies.get(i).map_or(0, |c| c % 3) {
            sends.push(Send::Piece(w[0], w[1]));
        }
    }
    for &(a, b) in extra {
        let (a, b) = (a % (len + 1), b % (len + 1));
        if a != b {
            sends.push(Send::Piece(a.min(b), a.max(b)));
        }
    }
    sends.extend(bad.iter().cloned().map(Send::Bad));
    // A deterministic shuffle driven by `order`.
    for (i, o) in order.iter().enumerate() {
        let n = sends.len();
        if n > 1 {
            sends.swap(i % n, (*o as usize) % n);
        }
    }
    sends
}

/// Delivers `sends` on `c`, timestamps rising with delivery order (as a
/// sender's retransmissions carry fresh ones). Returns how many of each
/// bad kind went in, in [`Refusal`] terms.
fn deliver(c: &mut Conn, data: &[u8], fin: bool, sends: &[Send], ts: bool) -> Vec<Refusal> {
    let len = data.len() as u32;
    let mut expected = Vec::new();
    for (i, s) in sends.iter().enumerate() {
        let tsval = 2000 + i as u32;
        let stamp = |b: Builder| if ts { b.timestamp(tsval, 1) } else { b };
        let rcv_off = c.r.rcv_nxt().wrapping_sub(c.seq(0));
        let b = match s {
            Send::Piece(a, z) => {
                let mut b = c.data(*a, &data[*a as usize..*z as usize]);
                if fin && *z == len {
                    b = b.flags(TcpFlags::FIN);
                }
                stamp(b)
            }
            Send::Bad(Bad::OutOfWindow(k)) => {
                expected.push(Refusal::OutOfWindow);
                stamp(c.data(len + 2 + c_window(c) + k, b"evil"))
            }
            Send::Bad(Bad::Rst(d)) => {
                let seq = c.r.rcv_nxt().wrapping_add(*d as u32);
                // One on the right edge of the SACK blocks would be
                // acceptable (and is tested on its own).
                let target = i64::from(rcv_off) + i64::from(*d);
                if c.r.sack_on && c.r.sacks.iter().any(|b| b.1 as i64 == target) {
                    continue;
                }
                let inside = *d > 0 && (*d as u32) <= c_window(c);
                expected.push(if inside {
                    Refusal::RstNotExact
                } else {
                    Refusal::RstOutOfWindow
                });
                stamp(
                    Builder::new(key())
                        .seq(seq)
                        .ack(SERVER_ISN + 1)
                        .flags(TcpFlags::RST),
                )
            }
            Send::Bad(Bad::Syn(seq)) => {
                expected.push(Refusal::Syn);
                stamp(Builder::new(key()).seq(*seq).flags(TcpFlags::SYN))
            }
            Send::Bad(Bad::AckUnsent) => {
                expected.push(Refusal::AckUnsent);
                stamp(c.data(rcv_off, b"evil").ack(SERVER_ISN + 1000))
            }
            Send::Bad(Bad::StaleTimestamp) => {
                if !ts {
                    continue;
                }
                expected.push(Refusal::Paws);
                c.data(rcv_off, b"evil").timestamp(500, 1)
            }
        };
        let before = c.r.counters().clone();
        let outcome = c.feed(b);
        if let Send::Bad(_) = s {
            assert_eq!(outcome, Err(*expected.last().unwrap()), "{s:?}");
            assert_eq!(before.accepted, c.r.counters().accepted);
        }
    }
    expected
}

fn c_window(c: &Conn) -> u32 {
    c.r.max_window
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The stream comes out whole, in order and once, whatever the
    /// segmentation, order, duplication and overlap; every bad segment is
    /// refused for its reason and none ends or changes the stream.
    #[test]
    fn stream_survives_chaos(
        isn in any_isn(),
        data in proptest::collection::vec(any::<u8>(), 1..3000),
        fin in any::<bool>(),
        sack in any::<bool>(),
        ts in any::<bool>(),
        cuts in proptest::collection::vec(any::<u32>(), 0..40),
        copies in proptest::collection::vec(any::<u8>(), 0..40),
        extra in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..10),
        bad in proptest::collection::vec(any_bad(), 0..12),
        order in proptest::collection::vec(any::<u32>(), 0..120),
        spare in 0u32..100_000,
    ) {
        let len = data.len() as u32;
        let mut c = Conn::new(Setup {
            isn,
            sack,
            ts,
            max_window: len + 1 + spare,
            ..Setup::default()
        });
        let sends = schedule(len, &cuts, &copies, &extra, &bad, &order);
        // Every piece once more at the end, in order: a sender's last
        // retransmissions, so the stream is complete whatever the shuffle.
        let mut sends = sends;
        sends.push(Send::Piece(0, len));
        let expected = deliver(&mut c, &data, fin, &sends, ts);
        let (out, end) = c.stream();
        prop_assert_eq!(&out, &data);
        prop_assert_eq!(end, if fin { Outcome::Fin } else { Outcome::Open });
        prop_assert!(!c.r.is_reset());
        prop_assert_eq!(c.r.ooo_bytes(), 0);
        for why in [Refusal::OutOfWindow, Refusal::RstNotExact, Refusal::RstOutOfWindow,
                    Refusal::Syn, Refusal::AckUnsent, Refusal::Paws] {
            let n = expected.iter().filter(|e| **e == why).count() as u64;
            prop_assert_eq!(c.r.counters().refused(why), n, "{:?}", why);
        }
        let challenges = expected.iter().filter(|e| matches!(e, Refusal::RstNotExact | Refusal::Syn)).count() as u64;
        prop_assert_eq!(c.r.counters().challenge_acks, challenges);
        prop_assert_eq!(c.r.rcv_nxt(), c.seq(len + u32::from(fin)));

        // An exact RST ends it.
        let rst = Builder::new(key()).seq(c.r.rcv_nxt()).flags(TcpFlags::RST);
        prop_assert_eq!(c.feed(rst), Ok(()));
        prop_assert_eq!(c.stream(), (Vec::new(), Outcome::Reset));
    }

    /// An exact RST in the middle ends the stream there: what came before
    /// it is a prefix of the stream, and nothing follows.
    #[test]
    fn exact_rst_mid_stream(
        isn in any_isn(),
        data in proptest::collection::vec(any::<u8>(), 1..2000),
        cuts in proptest::collection::vec(any::<u32>(), 0..20),
        order in proptest::collection::vec(any::<u32>(), 0..40),
        at in any::<usize>(),
    ) {
        let len = data.len() as u32;
        let mut c = Conn::new(Setup { isn, max_window: len + 1, ..Setup::default() });
        let sends = schedule(len, &cuts, &[], &[], &[], &order);
        let at = at % (sends.len() + 1);
        deliver(&mut c, &data, false, &sends[..at], false);
        let rcv_nxt = c.r.rcv_nxt();
        c.feed(Builder::new(key()).seq(rcv_nxt).flags(TcpFlags::RST)).unwrap();
        deliver(&mut c, &data, false, &sends[at..], false);
        let (out, end) = c.stream();
        prop_assert_eq!(end, Outcome::Reset);
        prop_assert_eq!(&out[..], &data[..out.len()]);
        prop_assert_eq!(c.seq(out.len() as u32), rcv_nxt);
        prop_assert_eq!(c.r.counters().refused(Refusal::Closed), (sends.len() - at) as u64);
    }

    /// With a small window, a sender that resends whatever is missing gets
    /// its stream through, and what is held out of order never exceeds the
    /// window plus one segment.
    #[test]
    fn small_window_bounds_memory(
        isn in any_isn(),
        data in proptest::collection::vec(any::<u8>(), 1..4000),
        window in 1u32..600,
        mss in 1u32..300,
        order in proptest::collection::vec(any::<u32>(), 0..200),
    ) {
        let len = data.len() as u32;
        let mut c = Conn::new(Setup { isn, max_window: window, ..Setup::default() });
        let mut rounds = 0;
        loop {
            let from = c.r.rcv_nxt().wrapping_sub(c.seq(0));
            if from >= len {
                break;
            }
            // Everything from rcv_nxt on, in MSS pieces, shuffled.
            let mut pieces: Vec<(u32, u32)> = (from..len).step_by(mss as usize).map(|a| (a, (a + mss).min(len))).collect();
            for (i, o) in order.iter().enumerate() {
                let n = pieces.len();
                pieces.swap(i % n, *o as usize % n);
            }
            for (a, z) in pieces {
                let _ = c.feed(c.data(a, &data[a as usize..z as usize]));
                prop_assert!(c.r.ooo_bytes() <= (window + mss) as usize);
            }
            rounds += 1;
            prop_assert!(rounds <= len + 1);
        }
        prop_assert_eq!(c.stream(), (data.clone(), Outcome::Open));
    }
}
