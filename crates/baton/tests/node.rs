//! `baton node` and `baton ctl` for real: three node processes in a lab,
//! real redis-cli / redis-benchmark clients, services moved while they run.
//! Every test checks the client streams byte for byte and that the client
//! hosts counted no reset. Needs root, iproute2, iptables and redis-tools.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_lab::cluster::{Cluster, ServiceSpec};
use baton_lab::{Deadline, Lab, TcpCounters};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_baton");
const KV_PORT: u16 = 6379;
const ECHO_PORT: u16 = 7000;

fn vip() -> IpAddr {
    IpAddr::V4(Lab::vip(1).0)
}

fn service(name: &str, kind: &str, port: u16) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        kind: kind.into(),
        vip: vip(),
        prefix_len: 16,
        ports: vec![port],
        preferred_node: "node1".into(),
        replicated: false,
    }
}

fn cluster(prefix: &str, services: &[ServiceSpec]) -> Cluster {
    let lab = Lab::create(&Lab::unique_name(prefix), 3, 2).unwrap();
    Cluster::start(lab, std::path::Path::new(BIN), services).unwrap()
}

fn have_redis_tools() -> bool {
    ["redis-cli", "redis-benchmark"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn no_resets(c: &Cluster, host: &str, before: &TcpCounters) {
    let after = c.lab.tcp_counters(host).unwrap();
    assert_eq!(
        after.resets_since(before),
        0,
        "{host} saw resets or aborts: {before:?} -> {after:?}"
    );
}

/// A RESP client doing INCR on one connection, checking every answer.
fn incr_client(
    c: &Cluster,
    host: &str,
    key: &str,
    count: u64,
    pause: Duration,
) -> std::thread::JoinHandle<u64> {
    let addr = SocketAddr::new(vip(), KV_PORT);
    let stream = c
        .lab
        .run_in(host, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .unwrap()
        .unwrap();
    let cmd = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
    std::thread::spawn(move || {
        let mut s = stream;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        for i in 1..=count {
            s.write_all(cmd.as_bytes()).unwrap();
            let expected = format!(":{i}\r\n");
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "connection closed at INCR {i}");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(String::from_utf8_lossy(&got), expected, "INCR {i}");
            std::thread::sleep(pause);
        }
        s.shutdown(Shutdown::Write).unwrap();
        count
    })
}

fn redis_cli(c: &Cluster, host: &str, args: &[&str]) -> String {
    let out = c
        .lab
        .command(host, "redis-cli")
        .unwrap()
        .args(["-h", &vip().to_string(), "-p", &KV_PORT.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn kv_follows_moves_under_redis_benchmark() {
    let _deadline = baton_lab::Deadline::start(
        "kv_follows_moves_under_redis_benchmark",
        std::time::Duration::from_secs(180),
    );
    if !have_redis_tools() {
        panic!("redis-tools missing: run scripts/setup.sh");
    }
    let c = cluster("nk", &[service("kv", "kv", KV_PORT)]);
    let before1 = c.lab.tcp_counters("client1").unwrap();
    let before2 = c.lab.tcp_counters("client2").unwrap();
    assert_eq!(
        redis_cli(&c, "client2", &["SET", "greeting", "hello"]),
        "OK"
    );

    let bench = {
        let mut cmd = c.lab.command("client1", "redis-benchmark").unwrap();
        cmd.args(["-h", &vip().to_string(), "-p", &KV_PORT.to_string()])
            .args(["-c", "20", "-n", "20000", "-q"])
            .args([
                "-t",
                "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,mset",
            ]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    const INCRS: u64 = 600;
    let counter = incr_client(&c, "client2", "counter", INCRS, Duration::from_millis(5));

    let nodes = ["node1", "node2", "node3"];
    let mut at = 0;
    let mut moves = 0;
    while !bench.is_finished() || moves < 3 {
        std::thread::sleep(Duration::from_millis(400));
        let next = (at + 1) % 3;
        let freeze = c
            .move_service(nodes[(at + 2) % 3], "kv", nodes[next])
            .unwrap_or_else(|e| panic!("move to {}: {e}\n{}", nodes[next], c.node_log(nodes[at])));
        assert!(freeze > 0.0);
        assert_eq!(c.running_on("node1", "kv").as_deref(), Some(nodes[next]));
        at = next;
        moves += 1;
        assert!(moves < 200, "redis-benchmark does not finish");
    }
    let out = bench.join().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {text}");
    assert!(
        !text.to_lowercase().contains("error"),
        "redis-benchmark: {text}"
    );
    assert_eq!(counter.join().unwrap(), INCRS);
    assert_eq!(
        redis_cli(&c, "client2", &["GET", "counter"]),
        INCRS.to_string()
    );
    assert_eq!(redis_cli(&c, "client2", &["GET", "greeting"]), "hello");
    no_resets(&c, "client1", &before1);
    no_resets(&c, "client2", &before2);
}

#[test]
fn echo_streams_survive_twenty_moves() {
    let _deadline = baton_lab::Deadline::start(
        "echo_streams_survive_twenty_moves",
        std::time::Duration::from_secs(180),
    );
    let c = cluster("ne", &[service("echo", "echo", ECHO_PORT)]);
    let before = c.lab.tcp_counters("client1").unwrap();
    let addr = SocketAddr::new(vip(), ECHO_PORT);
    let done = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4u64)
        .map(|seed| {
            let stream = c
                .lab
                .run_in("client1", move || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                })
                .unwrap()
                .unwrap();
            let done = done.clone();
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let mut hash = Sha256::new();
                    let mut sent = 0u64;
                    let mut chunk = vec![0u8; 16 * 1024];
                    // Keep sending until the moves are over, then a bit more.
                    while !done.load(Ordering::Relaxed) || sent < 4 << 20 {
                        rng.fill_bytes(&mut chunk);
                        writer.write_all(&chunk).unwrap();
                        hash.update(&chunk);
                        sent += chunk.len() as u64;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    writer.shutdown(Shutdown::Write).unwrap();
                    (sent, <[u8; 32]>::from(hash.finalize()))
                });
                let mut reader = stream;
                let mut hash = Sha256::new();
                let mut got = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = reader.read(&mut buf).expect("echo read");
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                    got += n as u64;
                }
                let (sent, sent_hash) = sender.join().unwrap();
                assert_eq!(got, sent, "stream {seed}: bytes");
                assert_eq!(
                    <[u8; 32]>::from(hash.finalize()),
                    sent_hash,
                    "stream {seed}: digest"
                );
            })
        })
        .collect();
    let nodes = ["node1", "node2", "node3"];
    for i in 0..20 {
        let to = nodes[(i + 1) % 3];
        c.move_service("node1", "echo", to)
            .unwrap_or_else(|e| panic!("move {i} to {to}: {e}"));
        std::thread::sleep(Duration::from_millis(60));
    }
    done.store(true, Ordering::Relaxed);
    for s in streams {
        s.join().unwrap();
    }
    no_resets(&c, "client1", &before);
}

#[test]
fn a_move_to_a_down_or_dying_node_leaves_the_service_running() {
    let _deadline = baton_lab::Deadline::start(
        "a_move_to_a_down_or_dying_node_leaves_the_service_running",
        std::time::Duration::from_secs(180),
    );
    if !have_redis_tools() {
        panic!("redis-tools missing: run scripts/setup.sh");
    }
    let c = cluster("nd", &[service("kv", "kv", KV_PORT)]);
    let before = c.lab.tcp_counters("client2").unwrap();
    let counter = incr_client(&c, "client2", "n", 300, Duration::from_millis(10));

    // Down: refused at once, nothing changes.
    assert!(c.stop_node("node2"), "node2 stops cleanly on SIGTERM");
    let err = c.move_service("node1", "kv", "node2").unwrap_err();
    assert!(err.contains("node2") && err.contains("down"), "{err}");
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node1"));

    // Dying mid-move: node3 takes the offer and never answers.
    let pid = c.pid("node3").unwrap();
    let stopped = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let started = Instant::now();
    let err = c.move_service("node1", "kv", "node3").unwrap_err();
    assert!(err.contains("keeps running on node1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node1"));

    // Errors a user makes.
    let err = c.move_service("node1", "nosuch", "node3").unwrap_err();
    assert!(err.contains("unknown service"), "{err}");
    let err = c.move_service("node1", "kv", "node9").unwrap_err();
    assert!(err.contains("unknown node"), "{err}");
    let err = c.move_service("node1", "kv", "node1").unwrap_err();
    assert!(err.contains("already runs on node1"), "{err}");

    assert_eq!(counter.join().unwrap(), 300);
    assert_eq!(redis_cli(&c, "client2", &["GET", "n"]), "300");
    no_resets(&c, "client2", &before);
}

#[test]
fn a_bad_config_is_one_clear_line() {
    let _deadline = baton_lab::Deadline::start(
        "a_bad_config_is_one_clear_line",
        std::time::Duration::from_secs(180),
    );
    let dir = std::env::temp_dir().join(format!("baton-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        "node = \"node1\"\ninterface = \"eth0\"\nstate_dir = \"/tmp/x\"\n[peers]\nnode1 = \"198.18.1.1:7700\"\n[[services]]\nname = \"kv\"\nkind = \"kv\"\nvip = \"198.18.100.1\"\nports = [6379]\npreferred_node = \"node1\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("node")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("node.toml") && err.contains("services[0].vip"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_restarted_node_does_not_take_back_a_moved_service() {
    let _deadline = baton_lab::Deadline::start(
        "a_restarted_node_does_not_take_back_a_moved_service",
        std::time::Duration::from_secs(180),
    );
    if !have_redis_tools() {
        panic!("redis-tools missing: run scripts/setup.sh");
    }
    let c = cluster("nr", &[service("kv", "kv", KV_PORT)]);
    assert_eq!(redis_cli(&c, "client1", &["SET", "k", "v"]), "OK");
    c.move_service("node1", "kv", "node2").unwrap();
    assert!(c.stop_node("node1"));
    c.start_node("node1").unwrap();
    c.wait_ready("node1", Duration::from_secs(10)).unwrap();
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node2"));
    assert_eq!(redis_cli(&c, "client1", &["GET", "k"]), "v");
    // And it can be moved back to the restarted node.
    c.move_service("node3", "kv", "node1").unwrap();
    assert_eq!(redis_cli(&c, "client1", &["GET", "k"]), "v");
}

/// Every node's view of `service`'s log, from `via`'s status.
fn log_views(c: &Cluster, via: &str, service: &str) -> Vec<serde_json::Value> {
    let Ok(status) = c.request(via, &serde_json::json!({"op": "status"})) else {
        return Vec::new();
    };
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .and_then(|s| s["log"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether the three nodes agree on one leader, have the same three
/// voters (by name) and no learner, and have all applied what was
/// committed; returns the leader.
fn settled(views: &[serde_json::Value]) -> Option<String> {
    if views.len() != 3 {
        return None;
    }
    let leader = views[0]["leader"].as_str()?.to_owned();
    let commit = views[0]["commit_index"].as_u64()?;
    let leaders = views.iter().filter(|v| v["raft_role"] == "leader").count();
    let voters = |v: &serde_json::Value| {
        let mut names: Vec<String> = v["voters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let all_agree = views.iter().all(|v| {
        v["leader"].as_str() == Some(&leader)
            && v["commit_index"].as_u64() == Some(commit)
            && v["applied_index"].as_u64() == Some(commit)
            && voters(v) == ["node1", "node2", "node3"]
            && v["learners"].as_array().is_some_and(|l| l.is_empty())
    });
    (leaders == 1 && all_agree).then_some(leader)
}

fn wait_settled(c: &Cluster, deadline: &Deadline, what: &str) -> (String, Vec<serde_json::Value>) {
    deadline.phase(what);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let views = log_views(c, "node3", "echo");
        if let Some(leader) = settled(&views) {
            return (leader, views);
        }
        assert!(Instant::now() < until, "{what}: not settled: {views:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn raft_id_of(views: &[serde_json::Value], node: &str) -> u64 {
    views
        .iter()
        .find(|v| v["node"] == node)
        .and_then(|v| v["raft_id"].as_u64())
        .unwrap()
}

#[test]
fn every_node_keeps_the_log_and_a_killed_node_rejoins_under_a_new_id() {
    let deadline = Deadline::start(
        "every_node_keeps_the_log_and_a_killed_node_rejoins_under_a_new_id",
        Duration::from_secs(180),
    );
    let c = cluster("nl", &[service("echo", "echo", 7000)]);
    // The nodes that start first found the log; one that finds it formed
    // already joins it (under a new id) and replaces its founding id.
    let (_, views) = wait_settled(&c, &deadline, "the log forms");
    let mut ids: Vec<u64> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| raft_id_of(&views, n))
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{views:#?}");

    // kill -9 of a follower's daemon, and a restart: it has forgotten its
    // votes and its log, so it comes back under a new id.
    let (leader, _) = wait_settled(&c, &deadline, "before the kill");
    let follower = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    assert!(c.kill_node(follower));
    c.start_node(follower).unwrap();
    c.wait_ready(follower, Duration::from_secs(10)).unwrap();
    let (_, views) = wait_settled(&c, &deadline, "the killed follower rejoins");
    let new_id = raft_id_of(&views, follower);
    assert!(new_id >= 1 << 32, "{follower} came back as {new_id}");

    // The leader's daemon killed: the two others elect one of them; the
    // old leader, restarted, joins them.
    let (leader, _) = wait_settled(&c, &deadline, "before killing the leader");
    assert!(c.kill_node(&leader));
    deadline.phase("a new leader");
    let until = Instant::now() + Duration::from_secs(30);
    let via = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    loop {
        let views = log_views(&c, via, "echo");
        let new_leader = views.iter().find(|v| v["raft_role"] == "leader");
        if let Some(v) = new_leader {
            assert_ne!(v["node"], leader.as_str());
            break;
        }
        assert!(Instant::now() < until, "no new leader: {views:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.start_node(&leader).unwrap();
    c.wait_ready(&leader, Duration::from_secs(10)).unwrap();
    let (_, views) = wait_settled(&c, &deadline, "the old leader rejoins");
    assert!(raft_id_of(&views, &leader) >= 1 << 32);
}
