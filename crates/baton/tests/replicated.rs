//! Replicated services for real: three `baton node` processes in a lab,
//! client segments captured by NFQUEUE before TCP, a raft log across the
//! nodes, a hot clone of the service on every node. Every test checks the
//! client streams byte for byte, that the client hosts counted no reset,
//! and that every node reaches the same state at the same log index.
//! Needs root, iproute2, iptables and redis-tools.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use baton_lab::cluster::{Cluster, NodeOptions};
use baton_lab::Deadline;
use common::*;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

fn ss_text(c: &Cluster, host: &str, vip: IpAddr) -> String {
    let out = c
        .lab
        .command(host, "ss")
        .unwrap()
        .args(["-tin", "dst", &vip.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Segments sent on the client's connections to `vip` that its kernel
/// still counts unacknowledged (`ss -ti`: `unacked:N`).
fn unacked_segments(c: &Cluster, host: &str, vip: IpAddr) -> u64 {
    unacked_in(&ss_text(c, host, vip))
}

fn unacked_in(ss: &str) -> u64 {
    ss.split_whitespace()
        .filter_map(|w| w.strip_prefix("unacked:"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_replicated_service_serves_from_the_log_with_the_same_state_on_every_node() {
    let _deadline = Deadline::start(
        "a_replicated_service_serves_from_the_log_with_the_same_state_on_every_node",
        Duration::from_secs(240),
    );
    let c = cluster(
        "rs",
        &[
            replicated("kv", "kv", kv_vip(), KV_PORT),
            replicated("echo", "echo", echo_vip(), ECHO_PORT),
            replicated("echo6", "echo", echo6_vip(), ECHO_PORT),
        ],
        NodeOptions::default(),
    );
    let primary = wait_roles(&c, "kv");
    wait_roles(&c, "echo");
    wait_roles(&c, "echo6");
    let before1 = c.lab.tcp_counters("client1").unwrap();
    let before2 = c.lab.tcp_counters("client2").unwrap();

    assert_eq!(
        redis_cli(&c, "client2", &["SET", "greeting", "hello"]),
        "OK"
    );
    // Four IPv4 streams and two IPv6 ones, each half-closed by the client
    // once sent, then read to the end.
    let started = Instant::now();
    let streams: Vec<_> = (0..6u64)
        .map(|seed| {
            let (vip, len) = if seed < 4 {
                (echo_vip(), stream_len())
            } else {
                (echo6_vip(), stream_len() / 10)
            };
            let s = connect(&c, "client2", SocketAddr::new(vip, ECHO_PORT));
            echo_stream(s, seed, len)
        })
        .collect();
    // Every default test of redis-benchmark.
    let bench = c
        .lab
        .command("client1", "redis-benchmark")
        .unwrap()
        .args(["-h", &kv_vip().to_string(), "-p", &KV_PORT.to_string()])
        .args(["-c", "20", "-n", "2000", "-q"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bench.stdout).to_string()
        + &String::from_utf8_lossy(&bench.stderr);
    assert!(bench.status.success(), "redis-benchmark failed: {text}");
    assert!(
        !text.to_lowercase().contains("error"),
        "redis-benchmark: {text}"
    );
    let failed = streams
        .into_iter()
        .map(|s| s.join().is_err() as usize)
        .sum::<usize>();
    if failed > 0 {
        for n in NODES {
            for line in c.node_log(n).lines() {
                if line.contains("WARN") || line.contains("ERROR") || line.contains("replicated") {
                    eprintln!("{n}: {line}");
                }
            }
        }
        panic!("{failed} echo streams failed");
    }
    eprintln!(
        "4 echo streams of {} MiB and 2 of a tenth in {:?}",
        stream_len() >> 20,
        started.elapsed()
    );
    assert_eq!(redis_cli(&c, "client2", &["GET", "greeting"]), "hello");

    let kv_index = wait_same_state(&c, "kv");
    let echo_index = wait_same_state(&c, "echo");
    let echo6_index = wait_same_state(&c, "echo6");
    assert!(kv_index > 1000, "kv log index {kv_index}");
    assert!(echo_index > 100, "echo log index {echo_index}");
    assert!(echo6_index > 100, "echo6 log index {echo6_index}");
    for service in ["kv", "echo", "echo6"] {
        for v in views(&c, service) {
            if v["role"] == "primary" {
                assert_eq!(v["stream_mismatches"], 0, "{service}: {v}");
            }
        }
    }
    for v in views(&c, "kv") {
        assert_eq!(
            v["raft_role"] == "leader",
            v["node"] == primary.as_str(),
            "{v}"
        );
    }
    no_resets(&c, "client1", &before1);
    no_resets(&c, "client2", &before2);
}

#[test]
fn nothing_is_acknowledged_before_a_majority_holds_it() {
    let _deadline = Deadline::start(
        "nothing_is_acknowledged_before_a_majority_holds_it",
        Duration::from_secs(120),
    );
    // A long election timeout: the stopped clones' silence must not look
    // like a dead leader to anyone.
    let c = cluster(
        "rd",
        &[replicated("kv", "kv", kv_vip(), KV_PORT)],
        NodeOptions {
            election_timeout_ms: Some(5000),
            ..NodeOptions::default()
        },
    );
    let primary = wait_roles(&c, "kv");
    let before = c.lab.tcp_counters("client1").unwrap();
    let mut client = connect(&c, "client1", SocketAddr::new(kv_vip(), KV_PORT));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    client.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"+PONG\r\n");
    let term = |c: &Cluster| {
        views(c, "kv")
            .iter()
            .find(|v| v["node"] == primary.as_str())
            .map(|v| (v["raft_role"].clone(), v["term"].clone()))
    };
    let term_before = term(&c).unwrap();
    assert_eq!(term_before.0, "leader");

    let clones: Vec<u32> = NODES
        .iter()
        .filter(|n| **n != primary)
        .map(|n| c.pid(n).unwrap())
        .collect();
    for pid in &clones {
        signal(*pid, "-STOP");
    }
    let value = "x".repeat(1000);
    let set = format!(
        "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{value}\r\n",
        value.len()
    );
    client.write_all(set.as_bytes()).unwrap();
    // The client's kernel counts the write unacknowledged for the whole
    // second the clones are stopped (sampled every 100 ms).
    client.set_nonblocking(true).unwrap();
    let mut unacked = u64::MAX;
    let mut early = None;
    let mut ss_seen = String::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let seen = ss_text(&c, "client1", kv_vip());
        if !seen.contains("ESTAB") {
            // ss did not list the connection: no sample.
            continue;
        }
        let n = unacked_in(&seen);
        if n < unacked {
            unacked = n;
            ss_seen = seen;
        }
        if let Ok(n) = client.read(&mut buf) {
            early = Some(n);
        }
    }
    client.set_nonblocking(false).unwrap();
    for pid in &clones {
        signal(*pid, "-CONT");
    }
    assert!(
        unacked > 0 && unacked != u64::MAX,
        "the primary's kernel acknowledged a write no clone holds: {ss_seen}\n{:?}",
        views(&c, "kv")
    );
    assert!(
        early.is_none(),
        "a reply came while no majority held the write: {early:?}"
    );
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"+OK\r\n");
    assert_eq!(term(&c).unwrap(), term_before, "the leader changed");
    assert_eq!(unacked_segments(&c, "client1", kv_vip()), 0);
    assert_eq!(redis_cli(&c, "client2", &["STRLEN", "k"]), "1000");
    wait_same_state(&c, "kv");
    no_resets(&c, "client1", &before);
}

#[test]
fn a_killed_clone_rejoins_and_catches_up_while_the_service_serves() {
    let _deadline = Deadline::start(
        "a_killed_clone_rejoins_and_catches_up_while_the_service_serves",
        Duration::from_secs(180),
    );
    let c = cluster(
        "rk",
        &[replicated("kv", "kv", kv_vip(), KV_PORT)],
        NodeOptions::default(),
    );
    let primary = wait_roles(&c, "kv");
    let clone = NODES.iter().find(|n| **n != primary).unwrap().to_string();
    let before = c.lab.tcp_counters("client1").unwrap();
    let load = |c: &Cluster, n: &str| {
        let out = c
            .lab
            .command("client1", "redis-benchmark")
            .unwrap()
            .args(["-h", &kv_vip().to_string(), "-p", &KV_PORT.to_string()])
            .args(["-c", "10", "-n", n, "-q", "-t", "set,incr,lpush"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "redis-benchmark: {text}");
        assert!(!text.to_lowercase().contains("error"), "{text}");
    };
    load(&c, "3000");
    assert!(c.kill_node(&clone));
    load(&c, "3000");
    c.start_node(&clone).unwrap();
    c.wait_ready(&clone, Duration::from_secs(10)).unwrap();
    let started = Instant::now();
    load(&c, "3000");
    assert_eq!(wait_roles(&c, "kv"), primary, "the primary changed");
    wait_same_state(&c, "kv");
    eprintln!(
        "{clone} current again {:?} after its restart",
        started.elapsed()
    );
    // redis-benchmark INCRs one key: every run counts, the restart too.
    assert_eq!(
        redis_cli(&c, "client2", &["GET", "counter:__rand_int__"]),
        "9000"
    );
    no_resets(&c, "client1", &before);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_outpaces_its_reader_is_throttled_by_tcp_and_memory_stays_bounded() {
    let _deadline = Deadline::start(
        "a_client_that_outpaces_its_reader_is_throttled_by_tcp_and_memory_stays_bounded",
        Duration::from_secs(180),
    );
    let c = cluster(
        "rt",
        &[replicated("echo", "echo", echo_vip(), ECHO_PORT)],
        NodeOptions::default(),
    );
    let primary = wait_roles(&c, "echo");
    let pids: Vec<u32> = NODES.iter().map(|n| c.pid(n).unwrap()).collect();
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let before = c.lab.tcp_counters("client1").unwrap();
    let stream = connect(&c, "client1", SocketAddr::new(echo_vip(), ECHO_PORT));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The sender writes as fast as TCP lets it; the reader takes 64 KiB
    // every 50 ms (1.3 MB/s). The echo's output then waits for the client,
    // the service stops taking input, and the window closes on the sender.
    let sender = {
        let mut w = stream.try_clone().unwrap();
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut hash = Sha256::new();
            let mut chunk = vec![0u8; 64 * 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rng.fill_bytes(&mut chunk);
                w.write_all(&chunk).unwrap();
                hash.update(&chunk);
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            w.shutdown(Shutdown::Write).unwrap();
            <[u8; 32]>::from(hash.finalize())
        })
    };
    let mut r = stream;
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let slow_until = Instant::now() + Duration::from_secs(6);
    let mut in_flight = Vec::new();
    while Instant::now() < slow_until {
        let n = r.read(&mut buf).unwrap();
        hash.update(&buf[..n]);
        got += n as u64;
        in_flight.push(sent.load(std::sync::atomic::Ordering::Relaxed) - got);
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_slow: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n as u64;
    }
    let sent_hash = sender.join().unwrap();
    let total = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(got, total, "bytes");
    assert_eq!(<[u8; 32]>::from(hash.finalize()), sent_hash, "digest");
    // What was sent but not read stops growing: kernel buffers on both
    // sides plus the replicas' output limit, not what six seconds at
    // full speed would send.
    let late = &in_flight[in_flight.len() / 2..];
    let (lo, hi) = (*late.iter().min().unwrap(), *late.iter().max().unwrap());
    eprintln!(
        "in flight (sent, not read) over the second half: {} to {} KiB; sent {} KiB in all",
        lo >> 10,
        hi >> 10,
        total >> 10
    );
    eprintln!(
        "daemon RSS KiB before {rss_before:?}, while throttled {rss_slow:?} (primary {primary})"
    );
    assert!(
        hi < 64 << 20,
        "the sender was not throttled: {hi} bytes in flight"
    );
    assert!(
        hi - lo < 8 << 20,
        "in flight still growing in the second half: {lo} to {hi}"
    );
    for (b, s) in rss_before.iter().zip(&rss_slow) {
        assert!(
            s - b.min(s) < 256 << 10,
            "a daemon grew from {b} to {s} KiB"
        );
    }
    wait_same_state(&c, "echo");
    no_resets(&c, "client1", &before);
}
