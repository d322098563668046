//! The NFQUEUE socket and the hold built on it, for real: a lab of one
//! node and one client (baton_lab), iptables rules queueing a test port in
//! the node's raw PREROUTING chain. Plus the parser, fed crafted and random
//! bytes. Needs root, iproute2 and iptables.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_lab::{Deadline, Lab};
use baton_net::hold::{self, CaptureRules, Hold, HoldError, HoldQueue};
use baton_net::nfqueue::{
    parse_datagram, Message, NfQueue, NfqError, Packet, ParseError, QueueConfig, Verdict,
};
use proptest::prelude::*;

const NODE: &str = "node1";
const CLIENT: &str = "client1";

fn lab(prefix: &str) -> Lab {
    Lab::create(&Lab::unique_name(prefix), 1, 1).expect("creating the lab")
}

fn addr_of(lab: &Lab, host: &str) -> IpAddr {
    lab.host(host).unwrap().addr(false)
}

/// Runs a command inside `host`; panics with its stderr if it fails.
fn sh(lab: &Lab, host: &str, program: &str, args: &[&str]) {
    let out = lab
        .command(host, program)
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lets the client put 1,000 small segments in flight at once: a large
/// initial congestion window towards the node, a large initial receive
/// window on the node, no autocorking of small writes.
fn allow_a_thousand_in_flight(lab: &Lab) {
    let node = addr_of(lab, NODE).to_string();
    let client = addr_of(lab, CLIENT).to_string();
    sh(
        lab,
        CLIENT,
        "ip",
        &[
            "route",
            "add",
            &format!("{node}/32"),
            "dev",
            "eth0",
            "initcwnd",
            "1000",
        ],
    );
    sh(
        lab,
        NODE,
        "ip",
        &[
            "route",
            "add",
            &format!("{client}/32"),
            "dev",
            "eth0",
            "initrwnd",
            "1000",
        ],
    );
    sh(
        lab,
        CLIENT,
        "sysctl",
        &["-qw", "net.ipv4.tcp_autocorking=0"],
    );
}

/// A connection from the client to `port` on the node: (client, server).
fn connect(lab: &Lab, port: u16) -> (TcpStream, TcpStream) {
    let listener: TcpListener = lab
        .run_in(NODE, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let target = SocketAddr::new(addr_of(lab, NODE), port);
    let client = lab
        .run_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3))
        })
        .unwrap()
        .expect("connecting");
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    (client, server)
}

const SEGMENTS: usize = 1000;
const SEGMENT: usize = 40;

fn stream_bytes() -> Vec<u8> {
    (0..SEGMENTS * SEGMENT)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect()
}

/// Sends the stream as [`SEGMENTS`] writes (one segment each).
fn send_in_segments(client: &mut TcpStream, bytes: &[u8]) {
    for chunk in bytes.chunks(SEGMENT) {
        client.write_all(chunk).unwrap();
    }
}

fn read_exactly(server: &mut TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    server.set_read_timeout(Some(limit)).unwrap();
    let mut got = vec![0u8; n];
    server.read_exact(&mut got).expect("reading the stream");
    got
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Figures for the report: how long installing a hold takes (median of
/// 20), and how long `accept_all` of 1,000 held packets takes.
#[test]
fn hold_timings() {
    let deadline = Deadline::start("hold_timings", Duration::from_secs(120));
    let lab = lab("nqt");
    let vip = addr_of(&lab, NODE);
    let port = 7100;

    for silenced in [false, true] {
        deadline.phase(format!("installing holds (silenced {silenced})"));
        let times = lab
            .run_in(NODE, move || {
                (0..20)
                    .map(|_| {
                        let t = Instant::now();
                        let hold = if silenced {
                            Hold::install_silenced(vip, &[port][..], 11)
                        } else {
                            Hold::install(vip, &[port][..], 11)
                        }
                        .unwrap();
                        let took = t.elapsed();
                        drop(hold);
                        took
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
        eprintln!(
            "MEASURE Hold::install{} median of 20: {:?} (min {:?}, max {:?})",
            if silenced { "_silenced" } else { "" },
            median(times.clone()),
            times.iter().min().unwrap(),
            times.iter().max().unwrap()
        );
    }

    deadline.phase("installing holds on queues opened ahead");
    let (queues, open): (Vec<HoldQueue>, Vec<Duration>) = lab
        .run_in(NODE, || {
            (0..20u16)
                .map(|i| {
                    let t = Instant::now();
                    let queue = HoldQueue::open(30 + i).unwrap();
                    (queue, t.elapsed())
                })
                .unzip()
        })
        .unwrap();
    let mut on = Vec::new();
    for (round, queue) in queues.into_iter().enumerate() {
        let t = Instant::now();
        let hold = if round % 2 == 1 {
            Hold::install_silenced_on(queue, vip, &[port][..])
        } else {
            Hold::install_on(queue, vip, &[port][..])
        }
        .unwrap();
        on.push(t.elapsed());
        drop(hold);
    }
    eprintln!(
        "MEASURE HoldQueue::open median of 20: {:?}; Hold::install_on / install_silenced_on (alternating) median of 20: {:?}",
        median(open),
        median(on)
    );

    deadline.phase("holding 1,000 segments");
    allow_a_thousand_in_flight(&lab);
    let (mut client, mut server) = connect(&lab, port);
    let hold = lab
        .run_in(NODE, move || Hold::install(vip, &[port][..], 12))
        .unwrap()
        .unwrap();
    let bytes = stream_bytes();
    send_in_segments(&mut client, &bytes);
    let held = hold.wait_held(SEGMENTS, Duration::from_secs(5));
    assert!(held >= SEGMENTS, "only {held} segments held");
    let t = Instant::now();
    let accepted = hold.accept_all().unwrap();
    let took = t.elapsed();
    eprintln!("MEASURE accept_all of {accepted} held packets: {took:?}");
    assert!(accepted >= SEGMENTS);
    deadline.phase("reading the stream");
    let got = read_exactly(&mut server, bytes.len(), Duration::from_secs(5));
    assert!(got == bytes, "the stream arrived altered");
    hold.release().unwrap();
}

// ---------------------------------------------------------------------------
// helpers for the queue itself

/// Queues TCP packets to `port` on the node to `queue_num`.
fn queue_rule(lab: &Lab, port: u16, queue_num: u16) {
    queue_rule_op(lab, "-I", port, queue_num);
}

/// Inserts (`-I`) or deletes (`-D`) the rule of [`queue_rule`].
fn queue_rule_op(lab: &Lab, op: &str, port: u16, queue_num: u16) {
    sh(
        lab,
        NODE,
        "iptables",
        &[
            "-w",
            "-t",
            "raw",
            op,
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue_num.to_string(),
        ],
    );
}

fn open_in_node(lab: &Lab, queue_num: u16, config: QueueConfig) -> NfQueue {
    lab.run_in(NODE, move || NfQueue::open_with(queue_num, &config))
        .unwrap()
        .expect("binding the queue")
}

/// Reads packets until there are `n` or `limit` passes, waiting on the
/// descriptor with poll(2) in between.
fn recv_at_least(queue: &mut NfQueue, n: usize, limit: Duration) -> Vec<Packet> {
    let until = Instant::now() + limit;
    let mut got = Vec::new();
    loop {
        while queue.recv_batch(&mut got).unwrap() > 0 {}
        let left = until.saturating_duration_since(Instant::now());
        if got.len() >= n || left.is_zero() {
            return got;
        }
        let mut pfd = libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
    }
}

/// The TCP header of an IPv4 packet: (source port, destination port,
/// sequence number, flags, payload).
fn tcp_of(ip: &[u8]) -> (u16, u16, u32, u8, &[u8]) {
    assert_eq!(ip[0] >> 4, 4, "not IPv4");
    assert_eq!(ip[9], 6, "not TCP");
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = &ip[ihl..total];
    let doff = usize::from(tcp[12] >> 4) * 4;
    (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        tcp[13],
        &tcp[doff..],
    )
}

/// Whether the TCP checksum of an IPv4 packet is right.
fn tcp_checksum_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&ip[12..20]);
    add(&[0, 6]);
    add(&((total - ihl) as u16).to_be_bytes());
    add(&ip[ihl..total]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

fn netstat(lab: &Lab, host: &str, key: &'static str) -> u64 {
    lab.run_in(host, move || {
        baton_net::counters::snapshot()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    })
    .unwrap()
}

fn ifindex(lab: &Lab, host: &str, ifname: &str) -> u32 {
    let out = lab
        .command(host, "cat")
        .unwrap()
        .arg(format!("/sys/class/net/{ifname}/ifindex"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

// ---------------------------------------------------------------------------
// the queue in a lab

/// A SYN comes up with its id, family, hook, interface and bytes; dropped,
/// the client retransmits it (the next id); accepted, the connection
/// completes. Data then comes up byte for byte, and several verdicts on
/// ids not in a row travel in one send.
#[test]
fn packets_come_up_whole_and_verdicts_decide() {
    let deadline = Deadline::start("packets_come_up_whole", Duration::from_secs(60));
    let lab = lab("nqp");
    let port = 7201;
    let node = addr_of(&lab, NODE);
    let client_addr = addr_of(&lab, CLIENT);
    let listener: TcpListener = lab
        .run_in(NODE, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    sh(
        &lab,
        CLIENT,
        "sysctl",
        &["-qw", "net.ipv4.tcp_autocorking=0"],
    );
    let mut queue = open_in_node(&lab, 21, QueueConfig::default());
    eprintln!(
        "queue bound: port id {}, receive buffer {} bytes",
        queue.portid(),
        queue.recv_buffer()
    );
    assert!(queue.recv_buffer() >= 32 << 20, "receive buffer not raised");
    let line = lab
        .run_in(NODE, || baton_net::nfqueue::kernel_queue_line(21))
        .unwrap()
        .expect("the kernel lists the queue");
    assert_eq!(line[1], u64::from(queue.portid()), "{line:?}");
    assert_eq!(line[3], 2, "copy mode PACKET: {line:?}");
    queue_rule(&lab, port, 21);
    let eth0 = ifindex(&lab, NODE, "eth0");

    deadline.phase("connecting under the queue");
    let target = SocketAddr::new(node, port);
    let t0 = Instant::now();
    let connecting = lab
        .spawn_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })
        .unwrap();
    let syn = recv_at_least(&mut queue, 1, Duration::from_secs(2));
    assert_eq!(syn.len(), 1, "{syn:?}");
    let syn = &syn[0];
    assert_eq!(syn.family, libc::AF_INET as u8);
    assert_eq!(syn.hw_protocol, 0x0800);
    assert_eq!(syn.hook, 0, "queued at PREROUTING");
    assert_eq!(syn.queue_num, 21);
    assert_eq!(syn.indev, Some(eth0));
    assert!(!syn.truncated());
    assert_eq!(&syn.payload[12..16], &octets(client_addr));
    assert_eq!(&syn.payload[16..20], &octets(node));
    let (_, dport, _, flags, _) = tcp_of(&syn.payload);
    assert_eq!((dport, flags & 0x12), (port, 0x02), "not a SYN to the port");
    assert_eq!(queue.pending(), 1);
    queue.verdict(syn.id, Verdict::Drop).unwrap();
    assert_eq!(queue.pending(), 0);

    // Dropped: the client's retransmission (about 1 s later) is the next id.
    let again = recv_at_least(&mut queue, 1, Duration::from_secs(3));
    assert_eq!(again.len(), 1, "no retransmitted SYN");
    let waited = t0.elapsed();
    assert_eq!(again[0].id, syn.id + 1);
    assert_eq!(tcp_of(&again[0].payload).3 & 0x12, 0x02);
    assert!(
        waited >= Duration::from_millis(800),
        "SYN came again after {waited:?}: not a retransmission"
    );
    queue.verdict(again[0].id, Verdict::Accept).unwrap();
    // The handshake's last ACK is queued too.
    let ack = recv_at_least(&mut queue, 1, Duration::from_secs(2));
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0].id, syn.id + 2);
    queue.verdict(ack[0].id, Verdict::Accept).unwrap();
    let mut client = connecting.join().unwrap().unwrap().expect("connect");
    let (mut server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();

    deadline.phase("data under the queue");
    // Back to back, one segment each (no Nagle, no autocorking), before
    // the client's tail loss probe resends the last one.
    let words: Vec<Vec<u8>> = (0..8).map(|i| format!("word{i}-").into_bytes()).collect();
    for w in &words {
        client.write_all(w).unwrap();
    }
    let data = recv_at_least(&mut queue, words.len(), Duration::from_secs(2));
    assert!(data.len() >= words.len(), "{} packets", data.len());
    for (i, (p, w)) in data.iter().zip(&words).enumerate() {
        assert_eq!(p.id, ack[0].id + 1 + i as u32, "ids go up by one");
        assert_eq!(tcp_of(&p.payload).4, &w[..], "payload of packet {i}");
    }
    // Ids not in a row first (the odd ones), then the rest: one send each.
    let sends = queue.stats().verdict_sends;
    let odd: Vec<(u32, Verdict)> = data
        .iter()
        .skip(1)
        .step_by(2)
        .map(|p| (p.id, Verdict::Accept))
        .collect();
    let messages = queue.verdicts(&odd).unwrap();
    assert_eq!(messages, odd.len(), "no batch possible: singles");
    assert_eq!(queue.stats().verdict_sends, sends + 1, "one send for all");
    let even: Vec<(u32, Verdict)> = data
        .iter()
        .step_by(2)
        .map(|p| (p.id, Verdict::Accept))
        .collect();
    let messages = queue.verdicts(&even).unwrap();
    assert_eq!(messages, 1, "the rest is the oldest run: one batch verdict");
    assert_eq!(queue.stats().verdict_sends, sends + 2);
    assert_eq!(queue.pending(), 0);
    let want: Vec<u8> = words.concat();
    let got = read_exactly(&mut server, want.len(), Duration::from_secs(5));
    assert_eq!(got, want);
    // Nothing refused by the kernel.
    let mut rest = Vec::new();
    queue.recv_batch(&mut rest).unwrap();
    assert_eq!(queue.stats().verdict_errors, 0, "{:?}", queue.stats());
    assert_eq!(queue.stats().malformed, 0);

    // A verdict for an id no longer queued: the kernel says ENOENT, counted.
    queue.verdict(syn.id, Verdict::Accept).unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while queue.stats().verdict_errors == 0 && Instant::now() < until {
        recv_at_least(&mut queue, 1, Duration::from_millis(50));
    }
    assert_eq!(queue.stats().verdict_errors, 1);
    assert_eq!(queue.stats().last_verdict_errno, libc::ENOENT);
}

fn octets(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("IPv4 expected"),
    }
}

/// 1,000 segments of one stream held at once, then one batch verdict: they
/// enter the stack in order (no out-of-order queueing on the node) and
/// the stream arrives byte-exact.
#[test]
fn a_batch_verdict_lets_a_thousand_in_in_order() {
    let deadline = Deadline::start("batch verdict of 1,000", Duration::from_secs(60));
    let lab = lab("nqb");
    let port = 7202;
    allow_a_thousand_in_flight(&lab);
    let (mut client, mut server) = connect(&lab, port);
    let mut queue = open_in_node(&lab, 22, QueueConfig::default());
    queue_rule(&lab, port, 22);

    deadline.phase("holding 1,000 segments");
    let bytes = stream_bytes();
    send_in_segments(&mut client, &bytes);
    // Every segment comes up once in sending order; the client's tail
    // loss probes may resend one in between (a retransmission: behind).
    let t = Instant::now();
    let until = t + Duration::from_secs(5);
    let mut held: Vec<Packet> = Vec::new();
    let mut first_seq = None;
    let mut originals = 0;
    while originals < SEGMENTS && Instant::now() < until {
        let more = recv_at_least(&mut queue, 1, Duration::from_millis(100));
        for p in more {
            let (_, _, seq, _, data) = tcp_of(&p.payload);
            let offset = seq.wrapping_sub(*first_seq.get_or_insert(seq)) as usize;
            assert!(
                offset <= originals * SEGMENT,
                "a gap before offset {offset}"
            );
            assert_eq!(data, &bytes[offset..offset + data.len()]);
            if offset == originals * SEGMENT {
                assert_eq!(data.len(), SEGMENT, "segments coalesced");
                originals += 1;
            }
            held.push(p);
        }
    }
    let read_in = t.elapsed();
    assert_eq!(originals, SEGMENTS, "only {originals} segments held");
    for pair in held.windows(2) {
        assert_eq!(pair[1].id, pair[0].id + 1, "ids go up by one");
    }
    let ofo_before = netstat(&lab, NODE, "TcpExt:TCPOFOQueue");
    let last = held.last().unwrap().id;
    let t = Instant::now();
    queue.verdict_batch(last, Verdict::Accept).unwrap();
    let verdict_in = t.elapsed();
    assert_eq!(queue.pending(), 0);
    eprintln!(
        "MEASURE {} packets read in {read_in:?} ({} recvmmsg batches of up to 64), one batch verdict sent in {verdict_in:?}",
        held.len(),
        held.len().div_ceil(64)
    );
    deadline.phase("reading the stream");
    let got = read_exactly(&mut server, bytes.len(), Duration::from_secs(5));
    assert!(got == bytes, "the stream arrived altered");
    assert_eq!(
        netstat(&lab, NODE, "TcpExt:TCPOFOQueue"),
        ofo_before,
        "segments entered the stack out of order"
    );
    assert_eq!(queue.stats().verdict_errors, 0);
    assert_eq!(queue.stats().verdict_sends, 1);
}

/// A bulk send over the lab's veths arrives as GSO super-packets (the
/// sender's TSO; veth and bridge keep them whole): the queue gets them
/// whole, flagged GSO and checksum-not-ready, and accepting them delivers
/// the stream. Through a hold, the dropped ones come back with their TCP
/// checksums completed.
#[test]
fn gso_super_packets_come_up_whole() {
    let deadline = Deadline::start("gso super-packets", Duration::from_secs(60));
    let lab = lab("nqg");
    let port = 7203;
    allow_a_thousand_in_flight(&lab);
    let (mut client, mut server) = connect(&lab, port);
    let mut queue = open_in_node(&lab, 23, QueueConfig::default());
    queue_rule(&lab, port, 23);
    let bytes: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
    let sent = bytes.clone();
    let writer = std::thread::spawn(move || {
        client.write_all(&sent).unwrap();
        client
    });
    let len = bytes.len();
    let reader = std::thread::spawn(move || {
        let got = read_exactly(&mut server, len, Duration::from_secs(10));
        (server, got)
    });
    let mut gso = 0;
    let mut largest = 0;
    let until = Instant::now() + Duration::from_secs(10);
    deadline.phase("reading super-packets");
    // Accept what comes until the server has read the whole stream.
    while !reader.is_finished() && Instant::now() < until {
        let got = recv_at_least(&mut queue, 1, Duration::from_millis(20));
        for p in &got {
            assert!(!p.truncated(), "a packet cut at the copy range");
            largest = largest.max(p.payload.len());
            if p.skb_info.gso() {
                gso += 1;
                assert!(p.payload.len() > 1500, "GSO flag on a small packet");
                assert!(p.skb_info.checksum_not_ready());
            }
        }
        if let Some(last) = got.last() {
            queue.verdict_batch(last.id, Verdict::Accept).unwrap();
        }
    }
    eprintln!("{gso} GSO packets; largest {largest} bytes");
    assert!(gso > 0, "no GSO packet came up (largest {largest} bytes)");
    let (mut server, got) = reader.join().unwrap();
    assert!(got == bytes, "the stream arrived altered");
    let mut client = writer.join().unwrap();
    queue_rule_op(&lab, "-D", port, 23);
    drop(queue);

    // Through a hold: what take_dropped hands over has valid checksums.
    deadline.phase("super-packets through a hold");
    let vip = addr_of(&lab, NODE);
    let hold = lab
        .run_in(NODE, move || Hold::install(vip, &[port][..], 24))
        .unwrap()
        .unwrap();
    let sent = bytes.clone();
    let writer = std::thread::spawn(move || client.write_all(&sent).unwrap());
    hold.wait_held(3, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(50));
    let dropped = hold.take_dropped().unwrap();
    assert!(!dropped.is_empty());
    let big = dropped.iter().filter(|p| p.len() > 1500).count();
    for p in &dropped {
        assert!(tcp_checksum_ok(p), "a forwarded packet's checksum is wrong");
    }
    eprintln!(
        "{} packets dropped, {big} of them super-packets",
        dropped.len()
    );
    assert!(big > 0, "no super-packet held");
    // Injected back (as a move's target would), they reach the socket.
    let csum_errors = netstat(&lab, NODE, "Tcp:InCsumErrors");
    lab.run_in(NODE, move || hold::inject(&dropped))
        .unwrap()
        .unwrap();
    hold.release().unwrap();
    let got = read_exactly(&mut server, bytes.len(), Duration::from_secs(10));
    assert!(got == bytes, "the second stream arrived altered");
    assert_eq!(netstat(&lab, NODE, "Tcp:InCsumErrors"), csum_errors);
    writer.join().unwrap();
}

/// A receive buffer too small for what arrives: the kernel drops, the
/// socket reports ENOBUFS, we count an overrun and read on.
#[test]
fn an_overrun_is_counted_and_reading_goes_on() {
    let deadline = Deadline::start("overrun", Duration::from_secs(60));
    let lab = lab("nqo");
    let port = 7204;
    allow_a_thousand_in_flight(&lab);
    let (mut client, _server) = connect(&lab, port);
    let config = QueueConfig {
        recv_buffer: 1,
        ..QueueConfig::default()
    };
    let mut queue = open_in_node(&lab, 25, config);
    eprintln!("smallest receive buffer: {} bytes", queue.recv_buffer());
    queue_rule(&lab, port, 25);
    deadline.phase("flooding the queue");
    send_in_segments(&mut client, &stream_bytes());
    std::thread::sleep(Duration::from_millis(200));
    let got = recv_at_least(&mut queue, 1, Duration::from_secs(2));
    let stats = queue.stats();
    let line = lab
        .run_in(NODE, || baton_net::nfqueue::kernel_queue_line(25))
        .unwrap()
        .unwrap();
    eprintln!("{} received; {stats:?}; kernel: {line:?}", got.len());
    assert!(!got.is_empty());
    assert!(got.len() < SEGMENTS);
    assert!(stats.overruns >= 1, "{stats:?}");
    assert!(line[6] > 0, "the kernel counted no undelivered packet");
    // Still working: the client's retransmission comes up.
    queue
        .verdict_batch(got.last().unwrap().id, Verdict::Drop)
        .unwrap();
    let more = recv_at_least(&mut queue, 1, Duration::from_secs(3));
    assert!(!more.is_empty(), "nothing after the overrun");
}

/// Waiting with tokio's AsyncFd: the descriptor becomes readable when a
/// packet is queued, no timer involved.
#[test]
fn the_descriptor_drives_tokio() {
    let deadline = Deadline::start("tokio AsyncFd", Duration::from_secs(30));
    let lab = lab("nqa");
    let port = 7205;
    let _listener: TcpListener = lab
        .run_in(NODE, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let queue = open_in_node(&lab, 26, QueueConfig::default());
    queue_rule(&lab, port, 26);
    let target = SocketAddr::new(addr_of(&lab, NODE), port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    deadline.phase("awaiting the SYN");
    let packets = rt.block_on(async move {
        let mut fd = queue.into_async().unwrap();
        let connecting = lab.spawn_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(1))
        });
        let mut got = Vec::new();
        while got.is_empty() {
            let mut ready = fd.readable_mut().await.unwrap();
            if ready.get_inner_mut().recv_batch(&mut got).unwrap() == 0 {
                ready.clear_ready();
            }
        }
        let id = got[0].id;
        fd.get_mut().verdict(id, Verdict::Accept).unwrap();
        let _ = connecting.unwrap().join();
        got
    });
    assert!(tcp_of(&packets[0].payload).3 & 0x02 != 0, "not the SYN");
}

/// A queue number another socket holds is refused with a clear one-line
/// error, by the queue and by the hold (which callers retry elsewhere).
#[test]
fn a_queue_bound_elsewhere_is_refused_clearly() {
    let _deadline = Deadline::start("queue in use", Duration::from_secs(30));
    let lab = lab("nqu");
    let first = open_in_node(&lab, 27, QueueConfig::default());
    let err = lab.run_in(NODE, || NfQueue::open(27)).unwrap().unwrap_err();
    eprintln!("second bind: {err}");
    assert!(
        matches!(err, NfqError::QueueInUse { queue_num: 27, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(!text.contains('\n'));
    assert!(
        text.contains(&format!("netlink port {}", first.portid())),
        "{text}"
    );
    let err = lab
        .run_in(NODE, || HoldQueue::open(27))
        .unwrap()
        .unwrap_err();
    eprintln!("hold on it: {err}");
    assert!(
        matches!(&err, HoldError::Queue { op, .. } if op.starts_with("bind")),
        "{err}"
    );
    // Free again once the first socket closes.
    drop(first);
    let again = lab.run_in(NODE, || NfQueue::open(27)).unwrap();
    assert!(again.is_ok(), "{again:?}");
}

/// A hold on a queue opened ahead: installing costs only the rules, and it
/// holds and releases like any other.
#[test]
fn a_hold_on_a_queue_opened_ahead() {
    let deadline = Deadline::start("hold on a ready queue", Duration::from_secs(60));
    let lab = lab("nqr");
    let port = 7206;
    let vip = addr_of(&lab, NODE);
    let (mut client, mut server) = connect(&lab, port);
    // Opened by a thread of the node; installed from this (root) thread.
    let queue = lab.run_in(NODE, || HoldQueue::open(28)).unwrap().unwrap();
    assert_eq!(queue.held(), 0);
    let hold = Hold::install_on(queue, vip, &[port][..]).unwrap();
    let rules = lab.run_in(NODE, hold::list_rules).unwrap().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    deadline.phase("holding");
    client.write_all(b"held then let in").unwrap();
    assert!(hold.wait_held(1, Duration::from_secs(2)) >= 1);
    server
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(server.read(&mut buf).is_err(), "bytes got past the hold");
    assert!(hold.release().unwrap() >= 1);
    let got = read_exactly(&mut server, 16, Duration::from_secs(3));
    assert_eq!(&got, b"held then let in");
    let rules = lab.run_in(NODE, hold::list_rules).unwrap().unwrap();
    assert!(rules.is_empty(), "{rules:?}");
}

/// Voluntary context switches of this process's thread named `name`.
fn thread_switches(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

/// The hold's reader sleeps until a packet or a command comes: idle, it
/// does not wake (a reader polling every millisecond wakes 500 times in
/// half a second); a packet wakes it at once.
#[test]
fn the_hold_reader_sleeps_while_idle() {
    let deadline = Deadline::start("idle reader", Duration::from_secs(30));
    let lab = lab("nqi");
    let port = 7207;
    let vip = addr_of(&lab, NODE);
    let (mut client, _server) = connect(&lab, port);
    let queue = lab.run_in(NODE, || HoldQueue::open(41)).unwrap().unwrap();
    let hold = Hold::install_on(queue, vip, &[port][..]).unwrap();
    deadline.phase("watching the idle reader");
    let before = thread_switches("hold-q41").expect("the reader thread");
    std::thread::sleep(Duration::from_millis(500));
    let idle = thread_switches("hold-q41").unwrap() - before;
    eprintln!("reader woke {idle} times in 500 ms idle");
    assert!(idle <= 2, "the idle reader woke {idle} times");
    let t = Instant::now();
    client.write_all(b"wake").unwrap();
    assert_eq!(hold.wait_held(1, Duration::from_secs(2)), 1);
    eprintln!("held {:?} after the write", t.elapsed());
    assert!(t.elapsed() < Duration::from_millis(100));
    hold.release().unwrap();
}

// ---------------------------------------------------------------------------
// the parser

/// A packet message as the kernel builds it.
fn packet_message(id: u32, payload: &[u8], extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut attrs: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut hdr = id.to_be_bytes().to_vec();
    hdr.extend_from_slice(&0x0800u16.to_be_bytes());
    hdr.push(0);
    attrs.push((1, hdr));
    attrs.push((5, 7u32.to_be_bytes().to_vec()));
    attrs.push((14, 3u32.to_be_bytes().to_vec()));
    attrs.extend(extra.iter().cloned());
    attrs.push((10, payload.to_vec()));
    let mut body = vec![libc::AF_INET as u8, 0, 0, 21];
    for (ty, value) in &attrs {
        body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&ty.to_ne_bytes());
        body.extend_from_slice(value);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
    }
    // The kernel does not pad the payload, the last attribute.
    let unpadded = body.len() - (4 - (4 + payload.len()) % 4) % 4;
    body.truncate(unpadded);
    netlink(0x0300, &body)
}

fn netlink(msg_type: u16, body: &[u8]) -> Vec<u8> {
    let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

fn error_message(seq: u32, errno: i32) -> Vec<u8> {
    let mut body = (-errno).to_ne_bytes().to_vec();
    let mut orig = 32u32.to_ne_bytes().to_vec();
    orig.extend_from_slice(&0x0302u16.to_ne_bytes());
    orig.extend_from_slice(&5u16.to_ne_bytes());
    orig.extend_from_slice(&seq.to_ne_bytes());
    orig.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&orig);
    netlink(libc::NLMSG_ERROR as u16, &body)
}

#[test]
fn the_parser_reads_what_the_kernel_writes() {
    let msg = packet_message(42, b"\x45abcde", &[]);
    let parsed = parse_datagram(&msg);
    assert_eq!(parsed.len(), 1);
    let Ok(Message::Packet(p)) = &parsed[0] else {
        panic!("{parsed:?}")
    };
    assert_eq!(
        (p.id, p.queue_num, p.hw_protocol, p.hook),
        (42, 21, 0x0800, 0)
    );
    assert_eq!(p.indev, Some(7));
    assert_eq!(p.outdev, None);
    assert!(p.skb_info.checksum_not_ready() && p.skb_info.gso());
    assert_eq!(p.payload, b"\x45abcde");
    assert!(!p.truncated());

    // A truncated packet says so.
    let msg = packet_message(43, b"abcd", &[(13, 9000u32.to_be_bytes().to_vec())]);
    let Ok(Message::Packet(p)) = &parse_datagram(&msg)[0] else {
        panic!()
    };
    assert!(p.truncated() && p.orig_len == 9000);

    // Two messages and an error in one datagram (padding between them).
    let mut datagram = packet_message(1, b"x", &[]);
    while !datagram.len().is_multiple_of(4) {
        datagram.push(0);
    }
    datagram.extend(error_message(77, libc::ENOENT));
    let parsed = parse_datagram(&datagram);
    assert_eq!(parsed.len(), 2, "{parsed:?}");
    assert!(matches!(
        parsed[0],
        Ok(Message::Packet(Packet { id: 1, .. }))
    ));
    assert_eq!(
        parsed[1],
        Ok(Message::Answer {
            seq: 77,
            errno: libc::ENOENT
        })
    );
    assert_eq!(
        parse_datagram(&error_message(5, 0)),
        vec![Ok(Message::Answer { seq: 5, errno: 0 })]
    );
}

#[test]
fn the_parser_refuses_malformed_messages() {
    let good = packet_message(9, &[0x45; 60], &[]);
    // Every truncation is refused, never a panic, never a packet.
    for cut in 0..good.len() {
        let parsed = parse_datagram(&good[..cut]);
        assert!(
            parsed.iter().all(|r| r.is_err()),
            "cut at {cut}: {parsed:?}"
        );
    }
    assert!(matches!(
        parse_datagram(&good[..10])[..],
        [Err(ParseError::ShortHeader(10))]
    ));
    // A length field larger than the datagram.
    let mut long = good.clone();
    long[0..4].copy_from_slice(&(good.len() as u32 + 1).to_ne_bytes());
    assert!(matches!(
        parse_datagram(&long)[..],
        [Err(ParseError::BadLength { .. })]
    ));
    // A length field shorter than a header.
    let mut short = good.clone();
    short[0..4].copy_from_slice(&8u32.to_ne_bytes());
    assert!(matches!(
        parse_datagram(&short)[..],
        [Err(ParseError::BadLength { len: 8, .. })]
    ));
    // An attribute that claims more than its message.
    let mut attr = good.clone();
    attr[20..22].copy_from_slice(&500u16.to_ne_bytes());
    assert!(matches!(
        parse_datagram(&attr)[..],
        [Err(ParseError::BadAttribute { len: 500, .. })]
    ));
    // An attribute length below its own header.
    let mut tiny = good.clone();
    tiny[20..22].copy_from_slice(&2u16.to_ne_bytes());
    assert!(matches!(
        parse_datagram(&tiny)[..],
        [Err(ParseError::BadAttribute { len: 2, .. })]
    ));
    // No packet header.
    let no_hdr = netlink(0x0300, &[2, 0, 0, 1, 8, 0, 3, 0, 0, 0, 0, 1]);
    assert_eq!(
        parse_datagram(&no_hdr),
        vec![Err(ParseError::NoPacketHeader)]
    );
    // A mark of the wrong size.
    let bad_mark = packet_message(3, b"x", &[(3, vec![1, 2])]);
    assert_eq!(
        parse_datagram(&bad_mark),
        vec![Err(ParseError::BadAttributeSize("mark"))]
    );
    // A packet header too short.
    let mut body = vec![2, 0, 0, 1];
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&1u16.to_ne_bytes());
    body.extend_from_slice(&[0, 0, 0, 1]);
    assert_eq!(
        parse_datagram(&netlink(0x0300, &body)),
        vec![Err(ParseError::BadAttributeSize("packet header"))]
    );
    // A captured length below the bytes present.
    let lying = packet_message(4, b"abcdef", &[(13, 2u32.to_be_bytes().to_vec())]);
    assert_eq!(
        parse_datagram(&lying),
        vec![Err(ParseError::BadAttributeSize("captured length"))]
    );
    // An error message without its errno.
    assert_eq!(
        parse_datagram(&netlink(libc::NLMSG_ERROR as u16, &[1, 2])),
        vec![Err(ParseError::ShortError)]
    );
    // A well-framed bad message does not hide the good one after it.
    let mut two = bad_mark.clone();
    while !two.len().is_multiple_of(4) {
        two.push(0);
    }
    two.extend(packet_message(5, b"y", &[]));
    let parsed = parse_datagram(&two);
    assert!(parsed[0].is_err());
    assert!(matches!(
        parsed[1],
        Ok(Message::Packet(Packet { id: 5, .. }))
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for parsed in parse_datagram(&bytes) {
            if let Ok(Message::Packet(p)) = parsed {
                prop_assert!(p.payload.len() <= bytes.len());
            }
        }
    }

    #[test]
    fn mangled_packets_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut msg = packet_message(1, &payload, &[(3, 9u32.to_be_bytes().to_vec())]);
        for (at, value) in flips {
            let i = at % msg.len();
            msg[i] = value;
        }
        let keep = cut % (msg.len() + 1);
        for parsed in parse_datagram(&msg[..keep]) {
            if let Ok(Message::Packet(p)) = parsed {
                prop_assert!(p.payload.len() <= keep);
            }
        }
    }
}

/// Packets counted by the node's raw `chain` rules whose target is CT
/// (NOTRACK).
fn notrack_packets(lab: &Lab, chain: &str) -> u64 {
    let out = lab
        .command(NODE, "iptables")
        .unwrap()
        .args(["-w", "-t", "raw", "-L", chain, "-v", "-x", "-n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("CT"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn capture_rules_queue_before_tcp_fail_closed_and_untracked() {
    let deadline = Deadline::start("capture rules", Duration::from_secs(60));
    let lab = lab("ncap");
    let port = 7210;
    let queue_num = 29;
    let vip = addr_of(&lab, NODE);
    let rules = lab
        .run_in(NODE, move || {
            CaptureRules::install(vip, &[port][..], queue_num)
        })
        .unwrap()
        .unwrap();
    let listed = lab.run_in(NODE, hold::list_rules).unwrap().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");

    // Nobody reads the queue, and nothing listens: a kernel left to itself
    // would answer with a RST. Fail closed: no answer at all.
    deadline.phase("unread queue");
    let target = SocketAddr::new(vip, port);
    let unanswered = lab
        .run_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_millis(700))
        })
        .unwrap();
    match unanswered {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        Ok(_) => panic!("connected through an unread capture queue"),
    }

    // A reader that lets every segment in: TCP works through it.
    deadline.phase("reader accepting");
    let listener: TcpListener = lab
        .run_in(NODE, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        lab.spawn_in(NODE, move || {
            let mut queue = NfQueue::open(queue_num).expect("binding the capture queue");
            while !stop.load(Ordering::Relaxed) {
                let packets = recv_at_least(&mut queue, 1, Duration::from_millis(50));
                let verdicts: Vec<(u32, Verdict)> =
                    packets.iter().map(|p| (p.id, Verdict::Accept)).collect();
                seen.fetch_add(packets.len(), Ordering::Relaxed);
                queue.verdicts(&verdicts).unwrap();
            }
        })
        .unwrap()
    };
    let mut client = lab
        .run_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })
        .unwrap()
        .expect("connecting through the capture queue");
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"captured, then accepted").unwrap();
    let got = read_exactly(&mut server, 23, Duration::from_secs(3));
    assert_eq!(&got, b"captured, then accepted");
    server.write_all(b"reply").unwrap();
    let mut reply = [0u8; 5];
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"reply");
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap().unwrap();
    // The SYN, the handshake's ACK and the data at least went through the
    // queue, and conntrack was told to stay out of both directions.
    assert!(seen.load(Ordering::Relaxed) >= 3);
    assert!(notrack_packets(&lab, "PREROUTING") >= 3);
    assert!(notrack_packets(&lab, "OUTPUT") >= 2);

    deadline.phase("removal");
    lab.run_in(NODE, move || rules.remove()).unwrap().unwrap();
    let listed = lab.run_in(NODE, hold::list_rules).unwrap().unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}
