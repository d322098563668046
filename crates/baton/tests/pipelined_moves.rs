//! Pipelined request/response through `baton node`, moved every 200 ms:
//! the workload that found clients stalled for seconds after moves. Three
//! node processes in a lab, kv at the VIP, 16 connections each sending
//! pipelines of 32 commands (SET/GET/INCR/LPUSH/LRANGE) and checking every
//! reply against a model, while the service goes round the three nodes.
//!
//! Each test checks: every reply exactly as expected; no pipeline waits
//! longer than 500 ms for its replies; zero resets and zero PAWS drops in
//! the client's namespace (its own lab: only these connections). Needs
//! root, iproute2 and iptables.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_lab::cluster::{Cluster, NodeOptions, ServiceSpec};
use baton_lab::{Deadline, Lab};

const BIN: &str = env!("CARGO_BIN_EXE_baton");
const KV_PORT: u16 = 6379;
const CONNECTIONS: usize = 16;
const PIPELINE: usize = 32;
const MOVES: usize = 60;
const MOVE_EVERY: Duration = Duration::from_millis(200);
/// The longest a pipeline may wait for its replies.
const MAX_WAIT: Duration = Duration::from_millis(500);
/// The whole test's deadline: past it, the test fails and says where it was.
const DEADLINE: Duration = Duration::from_secs(150);

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// One connection's keys and what kv must hold for them.
struct Model {
    conn: usize,
    value: Option<String>,
    counter: u64,
    list: Vec<String>,
}

impl Model {
    /// The next pipeline's commands and the exact replies they must get.
    fn pipeline(&mut self, round: u64) -> (Vec<u8>, Vec<u8>) {
        let (s, c, l) = (
            format!("s{}", self.conn),
            format!("c{}", self.conn),
            format!("l{}", self.conn),
        );
        let mut request = Vec::new();
        let mut expected = String::new();
        // Lists stay short, so the service state (and the moves) stay small.
        request.extend(resp(&["DEL", &l]));
        expected.push_str(&format!(":{}\r\n", !self.list.is_empty() as u8));
        self.list.clear();
        for i in 1..PIPELINE {
            // Replies of several segments per pipeline: moves then catch
            // data in flight, which one-segment replies rarely leave.
            let item = format!(
                "{round}.{i}.{}",
                "x".repeat(if i % 5 == 0 { 400 } else { 90 })
            );
            match i % 5 {
                0 => {
                    request.extend(resp(&["SET", &s, &item]));
                    expected.push_str("+OK\r\n");
                    self.value = Some(item);
                }
                1 => {
                    request.extend(resp(&["GET", &s]));
                    match &self.value {
                        Some(v) => expected.push_str(&bulk(v)),
                        None => expected.push_str("$-1\r\n"),
                    }
                }
                2 => {
                    request.extend(resp(&["INCR", &c]));
                    self.counter += 1;
                    expected.push_str(&format!(":{}\r\n", self.counter));
                }
                3 => {
                    request.extend(resp(&["LPUSH", &l, &item]));
                    self.list.insert(0, item);
                    expected.push_str(&format!(":{}\r\n", self.list.len()));
                }
                _ => {
                    request.extend(resp(&["LRANGE", &l, "0", "2"]));
                    let head: Vec<&String> = self.list.iter().take(3).collect();
                    expected.push_str(&format!("*{}\r\n", head.len()));
                    for v in head {
                        expected.push_str(&bulk(v));
                    }
                }
            }
        }
        (request, expected.into_bytes())
    }
}

/// What one client connection saw.
#[derive(Debug, Default)]
struct ClientReport {
    pipelines: u64,
    max_wait: Duration,
}

/// Runs pipelines on `stream` until `stop`, checking each reply.
fn run_client(
    conn: usize,
    mut stream: TcpStream,
    stop: Arc<AtomicBool>,
) -> Result<ClientReport, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut model = Model {
        conn,
        value: None,
        counter: 0,
        list: Vec::new(),
    };
    let mut report = ClientReport::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let (request, expected) = model.pipeline(round);
        let sent = Instant::now();
        stream
            .write_all(&request)
            .map_err(|e| format!("connection {conn}, pipeline {round}: write: {e}"))?;
        let mut got = Vec::with_capacity(expected.len());
        while got.len() < expected.len() {
            let n = stream.read(&mut buf).map_err(|e| {
                format!(
                    "connection {conn}, pipeline {round}: read after {:?} ({} of {} reply bytes): {e}",
                    sent.elapsed(),
                    got.len(),
                    expected.len()
                )
            })?;
            if n == 0 {
                return Err(format!("connection {conn}, pipeline {round}: closed"));
            }
            got.extend_from_slice(&buf[..n]);
        }
        let wait = sent.elapsed();
        if got != expected {
            return Err(format!(
                "connection {conn}, pipeline {round}: replies differ:\n got {:?}\nwant {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&expected)
            ));
        }
        report.max_wait = report.max_wait.max(wait);
        report.pipelines += 1;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    match stream.read(&mut buf) {
        Ok(0) => Ok(report),
        Ok(_) => Err(format!("connection {conn}: bytes after the last reply")),
        Err(e) => Err(format!("connection {conn}: waiting for the close: {e}")),
    }
}

fn pipelined_clients_survive_moves(prefix: &str, v6: bool, vrid: Option<u8>) {
    let deadline = Deadline::start(format!("pipelined moves ({prefix})"), DEADLINE);
    let (v4addr, v6addr) = Lab::vip(1);
    let (vip, prefix_len) = match (v6, vrid.is_some()) {
        (false, false) => (IpAddr::V4(v4addr), 16),
        (false, true) => (IpAddr::V4(v4addr), 32),
        (true, false) => (IpAddr::V6(v6addr), 64),
        (true, true) => (IpAddr::V6(v6addr), 128),
    };
    let lab = Lab::create(&Lab::unique_name(prefix), 3, 1).unwrap();
    let service = ServiceSpec {
        name: "kv".into(),
        kind: "kv".into(),
        vip,
        prefix_len,
        ports: vec![KV_PORT],
        preferred_node: "node1".into(),
        replicated: false,
    };
    let c = Cluster::start_with(
        lab,
        std::path::Path::new(BIN),
        &[service],
        NodeOptions {
            vrid,
            ..NodeOptions::default()
        },
    )
    .unwrap();
    let before = c.lab.tcp_counters("client1").unwrap();

    let addr = SocketAddr::new(vip, KV_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|conn| {
            let stream = c
                .lab
                .run_in("client1", move || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                })
                .unwrap()
                .unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || run_client(conn, stream, stop))
        })
        .collect();

    let nodes = ["node1", "node2", "node3"];
    let mut at = 0;
    let mut moved = 0;
    let mut freeze_max = 0.0f64;
    let mut failed = Vec::new();
    while moved < MOVES {
        std::thread::sleep(MOVE_EVERY);
        if clients.iter().any(|c| c.is_finished()) {
            break;
        }
        let to = (at + 1) % 3;
        deadline.phase(format!(
            "move {} of kv, {} to {}",
            moved + 1,
            nodes[at],
            nodes[to]
        ));
        match c.move_service(nodes[(at + 2) % 3], "kv", nodes[to]) {
            Ok(freeze) => {
                freeze_max = freeze_max.max(freeze);
                at = to;
                moved += 1;
            }
            Err(e) => failed.push(e),
        }
    }
    // A little traffic after the last move.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    deadline.phase("waiting for the clients' last replies");
    let mut errors = Vec::new();
    let mut max_wait = Duration::ZERO;
    let mut pipelines = 0;
    for client in clients {
        match client.join().unwrap() {
            Ok(r) => {
                max_wait = max_wait.max(r.max_wait);
                pipelines += r.pipelines;
            }
            Err(e) => errors.push(e),
        }
    }
    let after = c.lab.tcp_counters("client1").unwrap();
    eprintln!(
        "{moved} moves (failed: {failed:?}), longest freeze {freeze_max:.1} ms, {pipelines} pipelines, longest wait {max_wait:?}, client resets {}, PAWS drops {}",
        after.resets_since(&before),
        after.paws_drops_since(&before)
    );
    assert!(errors.is_empty(), "client errors: {errors:#?}");
    assert_eq!(moved, MOVES, "moves failed: {failed:?}");
    assert!(
        max_wait <= MAX_WAIT,
        "a pipeline waited {max_wait:?} for its replies"
    );
    assert_eq!(
        after.resets_since(&before),
        0,
        "client1 saw resets: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.paws_drops_since(&before),
        0,
        "client1 dropped segments with old timestamps (PAWS): {before:?} -> {after:?}"
    );
}

#[test]
fn pipelined_clients_survive_sixty_moves() {
    pipelined_clients_survive_moves("pm", false, None);
}

#[test]
fn pipelined_clients_survive_sixty_moves_over_ipv6() {
    pipelined_clients_survive_moves("pm6", true, None);
}

#[test]
fn pipelined_clients_survive_sixty_moves_on_a_virtual_mac() {
    pipelined_clients_survive_moves("pmv", false, Some(51));
}
