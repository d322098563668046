//! What the lab tests of replicated services share: the cluster, its
//! services, and the checks every test makes (byte-exact streams, no
//! client resets or PAWS drops, equal state on every node).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_lab::cluster::{Cluster, NodeOptions, ServiceSpec};
use baton_lab::{Lab, TcpCounters};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_baton");
pub const KV_PORT: u16 = 6379;
pub const ECHO_PORT: u16 = 7000;
pub const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// Longest wait for roles or states to settle.
pub const SETTLE: Duration = Duration::from_secs(30);

pub fn kv_vip() -> IpAddr {
    IpAddr::V4(Lab::vip(1).0)
}

pub fn echo_vip() -> IpAddr {
    IpAddr::V4(Lab::vip(2).0)
}

pub fn echo6_vip() -> IpAddr {
    IpAddr::V6(Lab::vip(3).1)
}

/// Bytes each echo stream of the main test sends (and gets back).
pub fn stream_len() -> u64 {
    std::env::var("BATON_TEST_STREAM_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(200)
        << 20
}

pub fn replicated(name: &str, kind: &str, vip: IpAddr, port: u16) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        kind: kind.into(),
        vip,
        prefix_len: 16,
        ports: vec![port],
        preferred_node: "node1".into(),
        replicated: true,
    }
}

pub fn cluster(prefix: &str, services: &[ServiceSpec], options: NodeOptions) -> Cluster {
    let lab = Lab::create(&Lab::unique_name(prefix), 3, 2).unwrap();
    Cluster::start_with(lab, std::path::Path::new(BIN), services, options).unwrap()
}

/// The client host counted no reset, abort or PAWS drop since `before`.
pub fn no_resets(c: &Cluster, host: &str, before: &TcpCounters) {
    let after = c.lab.tcp_counters(host).unwrap();
    assert_eq!(
        after.resets_since(before),
        0,
        "{host} saw resets or aborts: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.paws_drops_since(before),
        0,
        "{host} dropped segments by PAWS: {before:?} -> {after:?}"
    );
}

/// Every node's view of `service` (role, indexes, digest), asked of each
/// node itself.
pub fn views(c: &Cluster, service: &str) -> Vec<serde_json::Value> {
    views_of(c, service, &NODES)
}

/// [`views`] of some nodes only (the others may be down).
pub fn views_of(c: &Cluster, service: &str, nodes: &[&str]) -> Vec<serde_json::Value> {
    // Asked side by side, so the views are of about the same moment.
    std::thread::scope(|scope| {
        let asks: Vec<_> = nodes
            .iter()
            .map(|n| {
                scope.spawn(move || {
                    let status = c.request(n, &serde_json::json!({"op": "status"})).ok()?;
                    let logs = status["services"]
                        .as_array()?
                        .iter()
                        .find(|s| s["name"] == service)?["log"]
                        .as_array()?
                        .clone();
                    logs.into_iter().find(|l| l["node"] == *n)
                })
            })
            .collect();
        asks.into_iter()
            .filter_map(|a| a.join().ok().flatten())
            .collect()
    })
}

/// Waits until the preferred node (node1) is the service's primary and
/// the others are its clones; returns the primary. (Whoever is elected
/// first hands the lead to the preferred node before any client came.)
pub fn wait_roles(c: &Cluster, service: &str) -> String {
    let start = Instant::now();
    loop {
        let v = views(c, service);
        let primaries: Vec<&serde_json::Value> = v
            .iter()
            .filter(|l| l["role"] == "primary" && l["node"] == "node1")
            .collect();
        let clones = v.iter().filter(|l| l["role"] == "clone").count();
        if v.len() == 3 && primaries.len() == 1 && clones == 2 {
            return primaries[0]["node"].as_str().unwrap().to_owned();
        }
        assert!(
            start.elapsed() < SETTLE,
            "{service}: roles not settled: {v:?}\n{}",
            c.node_log("node1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until one of `nodes` is the service's primary and the others its
/// clones; returns the primary.
pub fn wait_primary_among(c: &Cluster, service: &str, nodes: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let v = views_of(c, service, nodes);
        let primaries: Vec<&serde_json::Value> =
            v.iter().filter(|l| l["role"] == "primary").collect();
        let clones = v.iter().filter(|l| l["role"] == "clone").count();
        if v.len() == nodes.len() && primaries.len() == 1 && clones == nodes.len() - 1 {
            return primaries[0]["node"].as_str().unwrap().to_owned();
        }
        assert!(
            start.elapsed() < SETTLE,
            "{service}: no primary among {nodes:?}: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every node has applied the same index with the same state
/// digest; returns the index.
pub fn wait_same_state(c: &Cluster, service: &str) -> u64 {
    wait_same_state_among(c, service, &NODES)
}

/// [`wait_same_state`] over some nodes only.
pub fn wait_same_state_among(c: &Cluster, service: &str, nodes: &[&str]) -> u64 {
    let start = Instant::now();
    loop {
        let v = views_of(c, service, nodes);
        let same = v.len() == nodes.len()
            && v.iter().all(|l| {
                l["applied_index"] == v[0]["applied_index"]
                    && l["state_digest"] == v[0]["state_digest"]
                    && l["state_digest"].is_string()
            });
        if same {
            return v[0]["applied_index"].as_u64().unwrap();
        }
        assert!(
            start.elapsed() < SETTLE,
            "{service}: nodes differ once idle: {v:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn connect(c: &Cluster, host: &str, addr: SocketAddr) -> TcpStream {
    c.lab
        .run_in(host, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap()
}

/// Sends `len` random bytes through the echo service as fast as it takes
/// them and checks that exactly they come back.
pub fn echo_stream(stream: TcpStream, seed: u64, len: u64) -> std::thread::JoinHandle<PacedEcho> {
    paced_echo_stream(stream, seed, len, 64 * 1024, Duration::ZERO)
}

pub fn redis_cli(c: &Cluster, host: &str, args: &[&str]) -> String {
    let out = c
        .lab
        .command(host, "redis-cli")
        .unwrap()
        .args(["-h", &kv_vip().to_string(), "-p", &KV_PORT.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// What a paced echo stream saw.
#[derive(Debug, Clone, Copy)]
pub struct PacedEcho {
    /// Longest wait between two reads that returned data.
    pub longest_gap: Duration,
}

/// Sends `len` random bytes through the echo service in `chunk`-byte
/// writes every `every`, reading concurrently, and checks that exactly
/// they come back (SHA-256 of both directions). The stream stays open
/// for about `len / chunk × every`, so a fault can land in the middle.
pub fn paced_echo_stream(
    stream: TcpStream,
    seed: u64,
    len: u64,
    chunk: usize,
    every: Duration,
) -> std::thread::JoinHandle<PacedEcho> {
    std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; chunk];
            let mut sent = 0u64;
            while sent < len {
                let n = chunk.min((len - sent) as usize);
                rng.fill_bytes(&mut buf[..n]);
                writer.write_all(&buf[..n]).expect("echo write");
                hash.update(&buf[..n]);
                sent += n as u64;
                if !every.is_zero() {
                    std::thread::sleep(every);
                }
            }
            writer.shutdown(Shutdown::Write).unwrap();
            <[u8; 32]>::from(hash.finalize())
        });
        let mut reader = stream;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = Instant::now();
        let mut longest_gap = Duration::ZERO;
        loop {
            let n = read_retrying(&mut reader, &mut buf).expect("echo read");
            if n == 0 {
                break;
            }
            longest_gap = longest_gap.max(last.elapsed());
            last = Instant::now();
            hash.update(&buf[..n]);
            got += n as u64;
        }
        let sent_hash = sender.join().unwrap();
        assert_eq!(got, len, "stream {seed}: bytes");
        assert_eq!(
            <[u8; 32]>::from(hash.finalize()),
            sent_hash,
            "stream {seed}: digest"
        );
        PacedEcho { longest_gap }
    })
}

/// What an INCR probe saw.
#[derive(Debug, Clone, Copy)]
pub struct IncrProbe {
    pub incrs: u64,
    /// Longest wait for one reply.
    pub longest_wait: Duration,
}

/// One client connection to the kv service that INCRs `key` in a loop
/// (one command at a time) until `stop`, checking every reply is the
/// previous plus one: a lost or repeated command shows at once.
pub fn incr_probe(
    stream: TcpStream,
    key: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<IncrProbe> {
    let cmd = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len()).into_bytes();
    std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut s = stream;
        let mut incrs = 0u64;
        let mut longest_wait = Duration::ZERO;
        let mut reply = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            s.write_all(&cmd).expect("INCR write");
            reply.clear();
            let mut byte = [0u8; 1];
            while !reply.ends_with(b"\r\n") {
                let n = read_retrying(&mut s, &mut byte).expect("INCR read");
                assert_eq!(n, 1, "INCR probe: connection closed");
                reply.push(byte[0]);
            }
            longest_wait = longest_wait.max(t.elapsed());
            incrs += 1;
            let text = String::from_utf8_lossy(&reply);
            assert_eq!(text.trim_end(), format!(":{incrs}"), "INCR probe reply");
            std::thread::sleep(Duration::from_millis(2));
        }
        IncrProbe {
            incrs,
            longest_wait,
        }
    })
}

/// `read`, again after a signal: a read with a timeout is not restarted,
/// and the lab reaps the processes it kills.
pub fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
