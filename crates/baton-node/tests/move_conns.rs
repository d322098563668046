//! Moving live TCP connections and their VIP between lab nodes, for real:
//! kernel TCP in network namespaces, TCP_REPAIR, iptables/NFQUEUE holds,
//! netlink VIPs. Every test checks SHA-256 of each byte stream at both ends
//! and that the client's stack counted no reset or abort. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use baton_core::relocation::Vip;
use baton_lab::{Lab, TcpCounters};
use baton_node::echo_host::{connection_id, Ledger};
use baton_node::move_agent::{AgentConfig, MoveAgent};
use baton_node::relocation::{self, Handoff, MoveConfig, Parked, Taker};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SERVICE_PORT: u16 = 7000;
const MOVE_PORT: u16 = 7700;

fn vip(v6: bool) -> Vip {
    let (v4addr, v6addr) = Lab::vip(1);
    if v6 {
        Vip {
            addr: IpAddr::V6(v6addr),
            prefix_len: 64,
            ports: vec![SERVICE_PORT],
        }
    } else {
        Vip {
            addr: IpAddr::V4(v4addr),
            prefix_len: 16,
            ports: vec![SERVICE_PORT],
        }
    }
}

/// Logs of the nodes, shown for failing tests (filter: BATON_LOG).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
                .add_directive("netlink_packet_route=error".parse().unwrap()),
        )
        .with_test_writer()
        .try_init();
}

fn move_config() -> MoveConfig {
    init_logs();
    let mut cfg = MoveConfig::new("eth0");
    cfg.step_timeout = Duration::from_secs(2);
    cfg
}

/// One agent per node; node1 holds the VIP at first.
fn start_agents(lab: &Lab, nodes: usize, vip: &Vip, ledger: &Arc<Ledger>) -> Vec<MoveAgent> {
    start_agents_with(lab, nodes, vip, ledger, None)
}

/// Agents whose VIP rides the virtual MAC of VRRP router id `vrid`, if any.
fn start_agents_with(
    lab: &Lab,
    nodes: usize,
    vip: &Vip,
    ledger: &Arc<Ledger>,
    vrid: Option<u8>,
) -> Vec<MoveAgent> {
    (1..=nodes)
        .map(|i| {
            let host = lab.host(&format!("node{i}")).unwrap();
            MoveAgent::start(
                AgentConfig {
                    netns: host.netns_path(),
                    node_addr: host.addr(vip.addr.is_ipv6()),
                    move_port: MOVE_PORT,
                    service_port: SERVICE_PORT,
                    moves: MoveConfig {
                        vrid,
                        ..move_config()
                    },
                    initial_vip: (i == 1).then(|| vip.clone()),
                },
                ledger.clone(),
            )
            .unwrap()
        })
        .collect()
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A client connection through the VIP doing a full-speed echo stream:
/// a writer sending `total` pseudo-random bytes, a reader reading them
/// back. Returns (sent digest, received digest, bytes received).
fn echo_stream(
    lab: &Lab,
    client: &str,
    vip: &Vip,
    total: u64,
    seed: u64,
    pace: Option<Duration>,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<([u8; 32], [u8; 32], u64, SocketAddr)> {
    let addr = SocketAddr::new(vip.addr, SERVICE_PORT);
    let netns = lab.host(client).unwrap().netns_path();
    std::thread::spawn(move || {
        let stream = baton_net::netns::run_in(&netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap()
        })
        .unwrap();
        let local = stream.local_addr().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = total;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                rng.fill_bytes(&mut buf[..n]);
                writer.write_all(&buf[..n]).unwrap();
                hash.update(&buf[..n]);
                left -= n as u64;
                if let Some(pause) = pace {
                    std::thread::sleep(pause);
                }
            }
            writer.shutdown(Shutdown::Write).unwrap();
            <[u8; 32]>::from(hash.finalize())
        });
        let mut reader = stream;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = reader.read(&mut buf).expect("client read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
            progress.store(got, Ordering::Relaxed);
        }
        let sent = sender.join().unwrap();
        (sent, hash.finalize().into(), got, local)
    })
}

/// Checks the server end of connection `peer` against the client's view.
fn check_server_end(ledger: &Ledger, peer: SocketAddr, sent: [u8; 32], bytes: u64) {
    let (received, echoed) = ledger
        .summary(connection_id(peer))
        .expect("the server saw the connection");
    assert_eq!(received.bytes, bytes, "bytes the server received");
    assert_eq!(received.sha256, sent, "digest of what the server received");
    assert_eq!(echoed.bytes, bytes, "bytes the server sent");
    assert_eq!(echoed.sha256, sent, "digest of what the server sent");
}

fn assert_no_resets(lab: &Lab, client: &str, before: &TcpCounters) {
    let after = lab.tcp_counters(client).unwrap();
    assert_eq!(
        after.resets_since(before),
        0,
        "client saw resets or aborts: before {before:?}, after {after:?}"
    );
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stream_moving_around(v6: bool, total: u64, vrid: Option<u8>) {
    let lab = Lab::create(&Lab::unique_name("ms"), 3, 1).unwrap();
    let mut vip = vip(v6);
    if vrid.is_some() {
        // On its own interface the VIP is a host address, as keepalived
        // users configure it: no second route to the segment.
        vip.prefix_len = if v6 { 128 } else { 32 };
    }
    let ledger = Arc::new(Ledger::default());
    let agents = start_agents_with(&lab, 3, &vip, &ledger, vrid);
    let before = lab.tcp_counters("client1").unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let client = echo_stream(&lab, "client1", &vip, total, 1, None, progress.clone());
    // node1 → node2 → node3 → node1, each while data flows.
    let route = [(0, 1), (1, 2), (2, 0)];
    for (step, (from, to)) in route.iter().enumerate() {
        let mark = total * (step as u64 + 1) / 5;
        wait_for("stream progress", || {
            progress.load(Ordering::Relaxed) >= mark
        });
        let report = agents[*from]
            .move_to(agents[*to].move_addr, &vip)
            .unwrap_or_else(|e| panic!("move {from}->{to}: {e}"));
        assert_eq!(report.connections, 1);
        eprintln!(
            "move {step}: {report:?}, progress {}",
            progress.load(Ordering::Relaxed)
        );
        assert!(
            progress.load(Ordering::Relaxed) < total,
            "the stream ended before move {step}"
        );
    }
    let (sent, received, got, local) = client.join().unwrap();
    assert_eq!(got, total, "bytes echoed back");
    assert_eq!(
        received, sent,
        "client: echoed stream differs from sent stream"
    );
    check_server_end(&ledger, local, sent, total);
    assert_no_resets(&lab, "client1", &before);
    drop(agents);
}

#[test]
fn a_full_speed_stream_follows_its_server_around_three_nodes() {
    let _deadline = baton_lab::Deadline::start(
        "a_full_speed_stream_follows_its_server_around_three_nodes",
        std::time::Duration::from_secs(180),
    );
    stream_moving_around(false, 200 << 20, None);
}

#[test]
fn ipv6_stream_follows_its_server() {
    let _deadline = baton_lab::Deadline::start(
        "ipv6_stream_follows_its_server",
        std::time::Duration::from_secs(180),
    );
    stream_moving_around(true, 64 << 20, None);
}

#[test]
fn a_vip_on_a_virtual_mac_moves_with_its_stream() {
    let _deadline = baton_lab::Deadline::start(
        "a_vip_on_a_virtual_mac_moves_with_its_stream",
        std::time::Duration::from_secs(180),
    );
    stream_moving_around(false, 64 << 20, Some(51));
}

#[test]
fn a_thousand_connections_move_at_once() {
    let _deadline = baton_lab::Deadline::start(
        "a_thousand_connections_move_at_once",
        std::time::Duration::from_secs(180),
    );
    const CONNS: usize = 1000;
    const ROUNDS: usize = 30;
    let lab = Lab::create(&Lab::unique_name("mk"), 2, 1).unwrap();
    let vip = vip(false);
    let ledger = Arc::new(Ledger::default());
    let agents = start_agents(&lab, 2, &vip, &ledger);
    let before = lab.tcp_counters("client1").unwrap();
    let addr = SocketAddr::new(vip.addr, SERVICE_PORT);
    let streams: Vec<TcpStream> = lab
        .run_in("client1", move || {
            (0..CONNS)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap())
                .collect()
        })
        .unwrap();
    wait_for("all connections accepted", || {
        agents[0].connections() == CONNS
    });
    // Each connection: ROUNDS request/response exchanges of varying size;
    // a move happens while they run.
    let (round_tx, round_rx) = mpsc::channel::<()>();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let round_tx = round_tx.clone();
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                    let mut sent = Sha256::new();
                    let mut got = Sha256::new();
                    let mut bytes = 0u64;
                    for round in 0..ROUNDS {
                        let mut req = vec![0u8; 1 + (rng.next_u32() % 3000) as usize];
                        rng.fill_bytes(&mut req);
                        s.write_all(&req).unwrap();
                        let mut reply = vec![0u8; req.len()];
                        s.read_exact(&mut reply).unwrap();
                        assert_eq!(sha(&reply), sha(&req), "conn {i} round {round}");
                        sent.update(&req);
                        got.update(&reply);
                        bytes += req.len() as u64;
                        if round == ROUNDS / 3 {
                            let _ = round_tx.send(());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let local = s.local_addr().unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).unwrap();
                    assert!(rest.is_empty());
                    (
                        local,
                        <[u8; 32]>::from(sent.finalize()),
                        <[u8; 32]>::from(got.finalize()),
                        bytes,
                    )
                })
                .unwrap()
        })
        .collect();
    drop(round_tx);
    // Move once most connections are mid-conversation, and back.
    for _ in 0..CONNS / 2 {
        round_rx.recv().unwrap();
    }
    let there = agents[0].move_to(agents[1].move_addr, &vip).unwrap();
    assert_eq!(there.connections, CONNS);
    let back = agents[1].move_to(agents[0].move_addr, &vip).unwrap();
    assert_eq!(back.connections, CONNS);
    for w in workers {
        let (local, sent, got, bytes) = w.join().unwrap();
        assert_eq!(sent, got);
        check_server_end(&ledger, local, sent, bytes);
    }
    assert_no_resets(&lab, "client1", &before);
}

#[test]
fn a_target_that_dies_mid_move_leaves_the_source_serving() {
    let _deadline = baton_lab::Deadline::start(
        "a_target_that_dies_mid_move_leaves_the_source_serving",
        std::time::Duration::from_secs(180),
    );
    let lab = Lab::create(&Lab::unique_name("mf"), 3, 1).unwrap();
    let vip = vip(false);
    let ledger = Arc::new(Ledger::default());
    let agents = start_agents(&lab, 1, &vip, &ledger);
    let before = lab.tcp_counters("client1").unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    // Paced so that it is still running after both failed moves.
    let total = 48 << 20;
    let client = echo_stream(
        &lab,
        "client1",
        &vip,
        total,
        7,
        Some(Duration::from_millis(3)),
        progress.clone(),
    );
    wait_for("stream progress", || {
        progress.load(Ordering::Relaxed) > total / 10
    });

    // A target that takes the offer and dies (its link goes down, as in a
    // crash) before answering.
    let node2 = lab.host("node2").unwrap().clone();
    let dying_target = SocketAddr::new(IpAddr::V4(node2.ipv4), MOVE_PORT);
    let listener = lab
        .run_in("node2", move || TcpListener::bind(dying_target).unwrap())
        .unwrap();
    let lab_name = lab.name().to_owned();
    let killer = std::thread::spawn(move || {
        let (mut control, _) = listener.accept().unwrap();
        let mut header = [0u8; 10];
        control.read_exact(&mut header).unwrap();
        baton_lab::Lab::open(&lab_name)
            .unwrap()
            .crash("node2")
            .unwrap();
        drop(control);
    });
    let source_before = lab.tcp_counters("node1").unwrap();
    let err = agents[0].move_to(dying_target, &vip).unwrap_err();
    killer.join().unwrap();
    assert!(!err.is_empty());
    // The held segments went in before anything newer from the client:
    // none failed the source's PAWS check (each would wait for the
    // client's retransmission timer, backed off by the freeze).
    let source_after = lab.tcp_counters("node1").unwrap();
    assert_eq!(
        source_after.paws_drops_since(&source_before),
        0,
        "held segments dropped by PAWS at the source after the rollback"
    );

    // A target that is down: refused at once, nothing changes.
    let node3 = lab.host("node3").unwrap().ipv4;
    let err = agents[0]
        .move_to(SocketAddr::new(IpAddr::V4(node3), MOVE_PORT), &vip)
        .unwrap_err();
    assert!(err.contains("refused") || err.contains("control"), "{err}");

    assert_eq!(agents[0].connections(), 1, "the source kept the connection");
    let (sent, received, got, local) = client.join().unwrap();
    assert_eq!(got, total);
    assert_eq!(received, sent);
    check_server_end(&ledger, local, sent, total);
    assert_no_resets(&lab, "client1", &before);
}

/// Hands moved connections to the test.
struct ChannelTaker(mpsc::Sender<Vec<Parked>>);

impl Taker for ChannelTaker {
    type Prepared = ();
    fn prepare(&mut self, _vip: &Vip, _service: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn adopt(&mut self, _: (), conns: Vec<Parked>) {
        self.0.send(conns).unwrap();
    }
}

/// Runs `move_out` on node1 for the sockets `serve` gives, and `accept_move`
/// on node2; returns the sockets as node2 adopted them.
fn move_raw(lab: &Lab, vip: &Vip, sockets: Vec<TcpStream>) -> Vec<TcpStream> {
    let target_addr = SocketAddr::new(IpAddr::V4(lab.host("node2").unwrap().ipv4), MOVE_PORT);
    let listener = lab
        .run_in("node2", move || TcpListener::bind(target_addr).unwrap())
        .unwrap();
    let (adopted_tx, adopted_rx) = mpsc::channel();
    let (report_tx, report_rx) = mpsc::channel();
    // The target's runtime outlives the move for a while, as a node's does:
    // its second VIP announcement goes out from there.
    let _target = lab
        .spawn_in("node2", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (control, _) = listener.accept().await.unwrap();
                let report =
                    relocation::accept_move(&move_config(), control, &mut ChannelTaker(adopted_tx))
                        .await;
                report_tx.send(report.map_err(|e| e.to_string())).unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
            })
        })
        .unwrap();
    let vip2 = vip.clone();
    let report = lab
        .run_in("node1", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let parked: Vec<Parked> = sockets
                    .into_iter()
                    .map(|s| Parked {
                        id: connection_id(s.peer_addr().unwrap()),
                        stream: s,
                        app: Vec::new(),
                    })
                    .collect();
                relocation::move_out(&move_config(), target_addr, &vip2, || async move {
                    Ok(Handoff {
                        service: Vec::new(),
                        conns: parked,
                    })
                })
                .await
                .map_err(|f| f.error.to_string())
            })
        })
        .unwrap()
        .expect("move");
    let take = report_rx
        .recv()
        .unwrap()
        .unwrap()
        .expect("a move, not a query");
    assert_eq!(take.connections, report.connections);
    adopted_rx
        .recv()
        .unwrap()
        .into_iter()
        .map(|p| p.stream)
        .collect()
}

/// node1 holds the VIP and accepts `n` connections from client1.
fn raw_pairs(lab: &Lab, vip: &Vip, n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let vip2 = vip.clone();
    let listener = lab
        .run_in("node1", move || {
            let spec = baton_net::vip::VipSpec::new(vip2.addr, vip2.prefix_len, "eth0");
            baton_net::vip::blocking::take(&spec, baton_net::vip::Announce::default()).unwrap();
            TcpListener::bind(SocketAddr::new(vip2.addr, SERVICE_PORT)).unwrap()
        })
        .unwrap();
    let addr = SocketAddr::new(vip.addr, SERVICE_PORT);
    let clients: Vec<TcpStream> = lab
        .run_in("client1", move || {
            (0..n)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap())
                .collect()
        })
        .unwrap();
    let servers = (0..n).map(|_| listener.accept().unwrap().0).collect();
    (clients, servers)
}

#[test]
fn full_queues_move_intact() {
    let _deadline = baton_lab::Deadline::start(
        "full_queues_move_intact",
        std::time::Duration::from_secs(180),
    );
    let lab = Lab::create(&Lab::unique_name("mq"), 2, 1).unwrap();
    let vip = vip(false);
    let before = lab.tcp_counters("client1").unwrap();
    let (mut clients, servers) = raw_pairs(&lab, &vip, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut upstream = vec![0u8; 48 * 1024];
    rng.fill_bytes(&mut upstream);
    let mut downstream = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut downstream);

    // Server does not read: the client's bytes wait in its receive queue.
    clients[0].write_all(&upstream).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // Client does not read, and cannot acknowledge: cut it off, then the
    // server writes more than the window, so the send queue has both
    // in-flight (unacknowledged) and never-sent bytes.
    lab.fault("client1", baton_lab::Fault::Isolate).unwrap();
    let mut server = servers.into_iter().next().unwrap();
    server.set_nonblocking(true).unwrap();
    let mut written = 0;
    while written < downstream.len() {
        match server.write(&downstream[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("server write: {e}"),
        }
    }
    assert!(written > 0);
    server.set_nonblocking(false).unwrap();

    let state = baton_net::repair::freeze(std::os::fd::AsFd::as_fd(&server)).unwrap();
    baton_net::repair::resume(std::os::fd::AsFd::as_fd(&server)).unwrap();
    assert!(
        !state.unread.is_empty(),
        "receive queue empty at the freeze"
    );
    assert!(!state.unacked.is_empty(), "nothing in flight at the freeze");
    assert!(!state.unsent.is_empty(), "nothing unsent at the freeze");

    let mut moved = move_raw(&lab, &vip, vec![server]);
    let mut server = moved.pop().unwrap();
    lab.fault("client1", baton_lab::Fault::Heal).unwrap();

    // Everything arrives exactly once: the rest of the downstream is written
    // by the new server, then both sides read all.
    let rest = downstream[written..].to_vec();
    let writer = std::thread::spawn(move || {
        server.write_all(&rest).unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut up = vec![0u8; 48 * 1024];
        server
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        server.read_exact(&mut up).unwrap();
        let mut end = Vec::new();
        server.read_to_end(&mut end).unwrap();
        (up, end)
    });
    let mut client = clients.pop().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), downstream.len());
    assert_eq!(sha(&got), sha(&downstream));
    client.shutdown(Shutdown::Write).unwrap();
    let (up, end) = writer.join().unwrap();
    assert_eq!(sha(&up), sha(&upstream));
    assert!(end.is_empty());
    assert_no_resets(&lab, "client1", &before);
}

#[test]
fn half_closed_connections_move_in_both_directions() {
    let _deadline = baton_lab::Deadline::start(
        "half_closed_connections_move_in_both_directions",
        std::time::Duration::from_secs(180),
    );
    let lab = Lab::create(&Lab::unique_name("mh"), 2, 1).unwrap();
    let vip = vip(false);
    let before = lab.tcp_counters("client1").unwrap();
    let (mut clients, mut servers) = raw_pairs(&lab, &vip, 2);
    // Connection 0: the client is done sending (server in CLOSE_WAIT).
    clients[0].write_all(b"request then EOF").unwrap();
    clients[0].shutdown(Shutdown::Write).unwrap();
    let mut req = Vec::new();
    servers[0].read_to_end(&mut req).unwrap();
    assert_eq!(req, b"request then EOF");
    // Connection 1: the server is done sending (server in FIN_WAIT2).
    servers[1].write_all(b"banner then EOF").unwrap();
    servers[1].shutdown(Shutdown::Write).unwrap();
    let mut banner = Vec::new();
    clients[1].read_to_end(&mut banner).unwrap();
    assert_eq!(banner, b"banner then EOF");
    std::thread::sleep(Duration::from_millis(50));

    let mut moved = move_raw(&lab, &vip, servers);
    moved.sort_by_key(|s| s.peer_addr().unwrap().port());
    clients.sort_by_key(|c| c.local_addr().unwrap().port());

    // CLOSE_WAIT: the new server answers and closes; the client gets it all.
    let mut answer = vec![0u8; 300_000];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut answer);
    let expected = sha(&answer);
    let mut s0 = moved.remove(0);
    let w = std::thread::spawn(move || {
        s0.write_all(&answer).unwrap();
        s0.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s0.read_to_end(&mut rest).unwrap();
        rest
    });
    let mut got = Vec::new();
    clients[0].read_to_end(&mut got).unwrap();
    assert_eq!(sha(&got), expected);
    assert!(w.join().unwrap().is_empty(), "the peer's FIN stays read");

    // FIN_WAIT2: the client keeps sending to the new server, then closes.
    let mut upload = vec![0u8; 200_000];
    rand::rngs::StdRng::seed_from_u64(6).fill_bytes(&mut upload);
    let expected = sha(&upload);
    let mut s1 = moved.remove(0);
    let r = std::thread::spawn(move || {
        let mut all = Vec::new();
        s1.read_to_end(&mut all).unwrap();
        all
    });
    clients[1].write_all(&upload).unwrap();
    clients[1].shutdown(Shutdown::Write).unwrap();
    assert_eq!(sha(&r.join().unwrap()), expected);
    assert_no_resets(&lab, "client1", &before);
}

/// After which message a [`cutting_proxy`] breaks the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Once the Offer reached the target, before Ready.
    Offer,
    /// Once Ready reached the source, before Commit.
    Ready,
    /// Once Commit reached the target, before Done.
    Commit,
    /// Once Done reached the source, before the late packets.
    Done,
}

/// Copies move frames from `from` to `to` (source to target: Prepare, Offer,
/// Commit, Late; target to source: Ready, Done); after the `cut_after`-th frame
/// (counting from 1), breaks both connections.
fn relay_frames(
    mut from: TcpStream,
    mut to: TcpStream,
    cut_after: Option<usize>,
    all: [TcpStream; 2],
) {
    let mut frames = 0;
    loop {
        let mut header = [0u8; baton_core::wire::HEADER_LEN];
        if from.read_exact(&mut header).is_err() {
            break;
        }
        let Ok(h) = baton_core::wire::parse_header(
            baton_core::relocation::MAGIC,
            baton_core::relocation::VERSION,
            &header,
        ) else {
            break;
        };
        let mut body = vec![0u8; h.body_len];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        if to
            .write_all(&header)
            .and_then(|_| to.write_all(&body))
            .is_err()
        {
            break;
        }
        frames += 1;
        if Some(frames) == cut_after {
            break;
        }
    }
    for s in &all {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// A proxy in front of a move listener: its first connection is cut at
/// `cut`; later ones (a source asking how the move ended) pass whole.
fn cutting_proxy(lab: &Lab, host: &str, listen: SocketAddr, upstream: SocketAddr, cut: Cut) {
    let listener = lab
        .run_in(host, move || TcpListener::bind(listen).unwrap())
        .unwrap();
    let netns = lab.host(host).unwrap().netns_path();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(source) = conn else { return };
            let netns = netns.clone();
            let Ok(Ok(target)) = baton_net::netns::run_in(&netns, move || {
                TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
            }) else {
                return;
            };
            let (to_target, to_source) = match (n, cut) {
                (0, Cut::Offer) => (Some(2), None),
                (0, Cut::Ready) => (None, Some(1)),
                (0, Cut::Commit) => (Some(3), None),
                (0, Cut::Done) => (None, Some(2)),
                _ => (None, None),
            };
            let all = || [source.try_clone().unwrap(), target.try_clone().unwrap()];
            let (s1, t1, all1) = (
                source.try_clone().unwrap(),
                target.try_clone().unwrap(),
                all(),
            );
            std::thread::spawn(move || relay_frames(s1, t1, to_target, all1));
            let all2 = all();
            std::thread::spawn(move || relay_frames(target, source, to_source, all2));
        }
    });
}

/// Which lab nodes hold `vip` now.
fn vip_holders(lab: &Lab, vip: IpAddr) -> Vec<String> {
    lab.status()
        .unwrap()
        .hosts
        .into_iter()
        .filter(|h| {
            h.extra_addresses
                .iter()
                .any(|a| a.starts_with(&vip.to_string()))
        })
        .map(|h| h.name)
        .collect()
}

#[test]
fn a_control_connection_broken_at_any_step_loses_nothing() {
    let deadline = baton_lab::Deadline::start(
        "a_control_connection_broken_at_any_step_loses_nothing",
        Duration::from_secs(180),
    );
    let lab = Lab::create(&Lab::unique_name("mc"), 2, 1).unwrap();
    let vip = vip(false);
    let ledger = Arc::new(Ledger::default());
    let agents = start_agents(&lab, 2, &vip, &ledger);
    let before = lab.tcp_counters("client1").unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    // Paced to outlast the four moves (about 6 MB/s, 16 s), even when two
    // tests share the machine's two cores (a move whose control
    // connection is cut waits out a step's deadline).
    let total = 100 << 20;
    let client = echo_stream(
        &lab,
        "client1",
        &vip,
        total,
        11,
        Some(Duration::from_millis(10)),
        progress.clone(),
    );
    wait_for("stream progress", || {
        progress.load(Ordering::Relaxed) > total / 20
    });
    let nodes = ["node1", "node2"];
    let mut at = 0;
    for (i, cut) in [Cut::Offer, Cut::Ready, Cut::Commit, Cut::Done]
        .into_iter()
        .enumerate()
    {
        deadline.phase(format!(
            "move {} with the control connection cut {cut:?}",
            i + 1
        ));
        assert!(
            progress.load(Ordering::Relaxed) < total,
            "the stream ended before the cut {cut:?}"
        );
        let to = 1 - at;
        let target_host = lab.host(nodes[to]).unwrap();
        let proxy = SocketAddr::new(IpAddr::V4(target_host.ipv4), 7800 + i as u16);
        cutting_proxy(&lab, nodes[to], proxy, agents[to].move_addr, cut);
        let result = agents[at].move_to(proxy, &vip);
        let moved = match cut {
            Cut::Offer | Cut::Ready => false,
            Cut::Commit | Cut::Done => true,
        };
        assert_eq!(result.is_ok(), moved, "cut {cut:?}: {result:?}");
        if moved {
            at = to;
        }
        // Holds end in the background; give them a moment.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            vip_holders(&lab, vip.addr),
            vec![nodes[at].to_string()],
            "cut {cut:?}"
        );
        for node in nodes {
            let rules = lab
                .run_in(node, baton_net::hold::list_rules)
                .unwrap()
                .unwrap();
            assert!(
                rules.is_empty(),
                "cut {cut:?}: {node} kept hold rules {rules:?}"
            );
        }
        assert_eq!(
            (agents[at].connections(), agents[1 - at].connections()),
            (1, 0),
            "cut {cut:?}: {} serves",
            nodes[at]
        );
        let mark = progress.load(Ordering::Relaxed) + (1 << 20);
        wait_for("the stream goes on", || {
            progress.load(Ordering::Relaxed) >= mark
        });
    }
    deadline.phase("waiting for the stream's end");
    let (sent, received, got, local) = client.join().unwrap();
    assert_eq!(got, total);
    assert_eq!(received, sent);
    check_server_end(&ledger, local, sent, total);
    assert_no_resets(&lab, "client1", &before);
}
