//! `baton demo`: what a newcomer runs first. A lab of three nodes runs the
//! `kv` service; redis-benchmark hammers its VIP while `kv` is moved around
//! the nodes with all its connections, and a probe client counts and times
//! every INCR it makes. Then the crash act: the same against `kv-ha`, a
//! replicated `kv` (a hot clone on every node), whose primary's host is
//! crashed mid-benchmark; a clone takes over every connection. Then the lab
//! is removed.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use baton_lab::cluster::{Cluster, ServiceSpec};
use baton_lab::Lab;
use clap::Args;
use serde::Serialize;

const KV_PORT: u16 = 6379;

#[derive(Args)]
pub struct DemoArgs {
    /// Name of the lab the demo builds (removed at the end).
    #[arg(long, default_value = "demo")]
    name: String,
    /// Requests redis-benchmark makes per test.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Time between two moves, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    move_every_ms: u64,
    /// Requests redis-benchmark makes per test in the crash act.
    #[arg(long, default_value_t = 10_000)]
    crash_requests: u64,
    /// Print one JSON line: {"moves","ops","client_errors","max_pause_ms",
    /// "crashed","crash_ops","crash_client_errors","crash_max_pause_ms"}.
    #[arg(long)]
    json: bool,
    /// Give up (counting a client error) if redis-benchmark runs longer.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Leave the lab and its three nodes running afterwards, to try
    /// `baton ctl` and redis-cli by hand (`baton lab down --name demo` ends it).
    #[arg(long)]
    keep: bool,
}

#[derive(Serialize)]
struct DemoReport {
    moves: u32,
    ops: u64,
    client_errors: u64,
    max_pause_ms: f64,
    /// The host crashed in the crash act (the replicated service's primary).
    crashed: String,
    crash_ops: u64,
    crash_client_errors: u64,
    crash_max_pause_ms: f64,
}

const CRASH_TESTS: &str = "set,get,incr,lpush";

const TESTS: &str = "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,mset";

pub fn run(args: DemoArgs) -> Result<i32> {
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    let lab = Lab::create(&args.name, 3, 2)?;
    let vip = IpAddr::V4(Lab::vip(1).0);
    say(format!(
        "lab {:?}: nodes node1..node3 (198.18.1.1-3), clients client1, client2; kv at {vip}:{KV_PORT}",
        lab.name()
    ));
    let bin = std::env::current_exe().context("locating the baton binary")?;
    let ha_vip = IpAddr::V4(Lab::vip(2).0);
    let spec = |name: &str, vip: IpAddr, replicated: bool| ServiceSpec {
        name: name.into(),
        kind: "kv".into(),
        vip,
        prefix_len: 16,
        ports: vec![KV_PORT],
        preferred_node: "node1".into(),
        replicated,
    };
    let cluster = Cluster::start(
        lab,
        &bin,
        &[spec("kv", vip, false), spec("kv-ha", ha_vip, true)],
    )?;
    say(format!(
        "three `baton node` processes up; kv runs on node1; kv-ha (replicated, at {ha_vip}:{KV_PORT}) has its primary on node1 and a clone on the others"
    ));

    let mut bench = start_bench(&cluster, vip, 50, args.requests, TESTS)?;
    say(format!(
        "client1: redis-benchmark -c 50 -n {} -t {TESTS}",
        args.requests
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = start_probe(&cluster, vip, stop.clone())?;
    say("client2: a probe INCRs a counter in a loop, timing each reply".into());

    let nodes = ["node1", "node2", "node3"];
    let mut at = 0;
    let mut moves = 0u32;
    let mut move_errors = 0u64;
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let mut gave_up = false;
    let bench_done = loop {
        std::thread::sleep(Duration::from_millis(args.move_every_ms));
        if let Some(status) = bench.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            say(format!(
                "redis-benchmark still running after {} s: stopping it",
                args.max_seconds
            ));
            gave_up = true;
            let _ = bench.kill();
            break bench.wait()?;
        }
        let next = (at + 1) % nodes.len();
        match cluster.move_service("node1", "kv", nodes[next]) {
            Ok(freeze_ms) => {
                moves += 1;
                say(format!(
                    "moved kv {} -> {}: connections frozen for {freeze_ms:.1} ms",
                    nodes[at], nodes[next]
                ));
                at = next;
            }
            Err(e) => {
                move_errors += 1;
                say(format!("move {} -> {} failed: {e}", nodes[at], nodes[next]));
            }
        }
    };
    let probe = stop_probe(&stop, probe, &say)?;
    let bench_errors = bench_errors(&mut bench, bench_done, gave_up, &say)?;
    let tests = TESTS.split(',').count() as u64;

    say(format!(
        "\nthe crash act: redis-benchmark -c 20 -n {} -t {CRASH_TESTS} and the probe against kv-ha, then its primary's host loses power",
        args.crash_requests
    ));
    let crash = crash_act(&cluster, ha_vip, &args, &say)?;
    let report = DemoReport {
        moves,
        ops: args.requests * tests + probe.ops,
        client_errors: bench_errors + probe.errors,
        max_pause_ms: probe.max_pause.as_secs_f64() * 1e3,
        crashed: crash.crashed,
        crash_ops: crash.ops,
        crash_client_errors: crash.client_errors,
        crash_max_pause_ms: crash.max_pause.as_secs_f64() * 1e3,
    };
    let config = cluster.config_path("node1")?;
    if args.keep {
        cluster.keep();
    } else {
        drop(cluster);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "\n{} moves while redis-benchmark ran; {} operations, {} client errors, longest pause a client saw: {:.1} ms",
            report.moves, report.ops, report.client_errors, report.max_pause_ms
        );
        println!(
            "the probe's counter reads {} after {} INCRs ({})",
            probe.final_value,
            probe.ops,
            if probe.final_value == probe.ops {
                "nothing lost, nothing repeated"
            } else {
                "MISMATCH"
            }
        );
        println!(
            "crash of {} (kv-ha's primary) mid-benchmark: {} operations, {} client errors, longest pause a client saw: {:.1} ms; its probe counted {} INCRs ({})",
            report.crashed,
            report.crash_ops,
            report.crash_client_errors,
            report.crash_max_pause_ms,
            crash.probe_ops,
            if crash.counter_exact {
                "nothing lost, nothing repeated"
            } else {
                "MISMATCH"
            }
        );
        if args.keep {
            let lab = &args.name;
            println!("\nthe lab and its nodes keep running; try:");
            println!("  baton ctl --config {} status", config.display());
            println!(
                "  baton ctl --config {} move kv --to node2",
                config.display()
            );
            println!("  baton lab exec --name {lab} client1 -- redis-cli -h {vip} INCR hits");
            println!("  baton lab down --name {lab}");
        } else {
            println!("lab removed");
        }
    }
    Ok(
        if report.client_errors == 0
            && move_errors == 0
            && probe.final_value == probe.ops
            && report.crash_client_errors == 0
            && crash.counter_exact
        {
            0
        } else {
            1
        },
    )
}

/// redis-benchmark on client1 against `vip`, with its default settings
/// but these.
fn start_bench(
    cluster: &Cluster,
    vip: IpAddr,
    clients: u32,
    requests: u64,
    tests: &str,
) -> Result<std::process::Child> {
    cluster
        .lab
        .command("client1", "redis-benchmark")?
        .args(["-h", &vip.to_string(), "-p", &KV_PORT.to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .args(["-q", "-t", tests])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting redis-benchmark (install redis-tools: scripts/setup.sh)")
}

/// Shows what redis-benchmark printed and counts its errors: a failed or
/// stopped run counts one, and each line that reports an error one.
fn bench_errors(
    bench: &mut std::process::Child,
    status: std::process::ExitStatus,
    gave_up: bool,
    say: &dyn Fn(String),
) -> Result<u64> {
    let mut out = String::new();
    if let Some(mut s) = bench.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    let mut err = String::new();
    if let Some(mut s) = bench.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    say(format!("redis-benchmark:\n{}", out.trim_end()));
    Ok(u64::from(!status.success() || gave_up)
        + (out + &err)
            .lines()
            .filter(|l| l.to_lowercase().contains("error"))
            .count() as u64)
}

/// Stops the probe client and says why it failed, if it did.
fn stop_probe(
    stop: &AtomicBool,
    probe: std::thread::JoinHandle<ProbeResult>,
    say: &dyn Fn(String),
) -> Result<ProbeResult> {
    stop.store(true, Ordering::Relaxed);
    let probe = probe
        .join()
        .map_err(|_| anyhow!("the probe client panicked"))?;
    if let Some(f) = &probe.failure {
        say(format!("the probe failed: {f}"));
    }
    Ok(probe)
}

struct CrashAct {
    crashed: String,
    ops: u64,
    client_errors: u64,
    max_pause: Duration,
    probe_ops: u64,
    counter_exact: bool,
}

/// redis-benchmark and the probe against the replicated `kv-ha`; two
/// seconds in, its primary's host crashes (link down, every process
/// killed, sockets and VIPs cleared). A clone takes over the connections.
fn crash_act(
    cluster: &Cluster,
    vip: IpAddr,
    args: &DemoArgs,
    say: &dyn Fn(String),
) -> Result<CrashAct> {
    let primary = wait_primary(cluster, "kv-ha", &["node1", "node2", "node3"])?;
    let mut bench = start_bench(cluster, vip, 20, args.crash_requests, CRASH_TESTS)?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = start_probe(cluster, vip, stop.clone())?;
    std::thread::sleep(Duration::from_secs(2));
    cluster.lab.crash(&primary)?;
    let crashed_at = Instant::now();
    say(format!(
        "crashed {primary}: link down, every process killed"
    ));
    let survivors: Vec<&str> = ["node1", "node2", "node3"]
        .into_iter()
        .filter(|n| *n != primary)
        .collect();
    let new_primary = wait_primary(cluster, "kv-ha", &survivors)?;
    say(format!(
        "{new_primary} is kv-ha's primary ({} ms after the crash, as its status answered)",
        crashed_at.elapsed().as_millis()
    ));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let mut gave_up = false;
    let done = loop {
        if let Some(status) = bench.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            gave_up = true;
            let _ = bench.kill();
            break bench.wait()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let probe = stop_probe(&stop, probe, &say)?;
    let errors = bench_errors(&mut bench, done, gave_up, say)?;
    Ok(CrashAct {
        crashed: primary,
        ops: args.crash_requests * CRASH_TESTS.split(',').count() as u64 + probe.ops,
        client_errors: errors + probe.errors,
        max_pause: probe.max_pause,
        probe_ops: probe.ops,
        counter_exact: probe.final_value == probe.ops,
    })
}

/// The node `ctl status` of `nodes` names as the service's primary, once
/// one does.
fn wait_primary(cluster: &Cluster, service: &str, nodes: &[&str]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in nodes {
            let Ok(status) = cluster.request(n, &serde_json::json!({"op": "status"})) else {
                continue;
            };
            let primary = status["services"].as_array().and_then(|services| {
                services.iter().find(|s| s["name"] == service)?["log"]
                    .as_array()?
                    .iter()
                    .find(|l| l["role"] == "primary" && l["node"] == *n)
                    .map(|_| n.to_string())
            });
            if let Some(p) = primary {
                return Ok(p);
            }
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "{service} has no primary among {nodes:?} after 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct ProbeResult {
    ops: u64,
    errors: u64,
    /// What ended the probe early, if anything did.
    failure: Option<String>,
    max_pause: Duration,
    final_value: u64,
}

/// A client on client2 that INCRs one key on one connection until told to
/// stop, checking each answer and timing it.
fn start_probe(
    cluster: &Cluster,
    vip: IpAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<ProbeResult>> {
    let addr = SocketAddr::new(vip, KV_PORT);
    let stream = cluster.lab.run_in("client2", move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })??;
    Ok(std::thread::spawn(move || {
        let mut s = stream;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_nodelay(true);
        let mut result = ProbeResult {
            ops: 0,
            errors: 0,
            failure: None,
            max_pause: Duration::ZERO,
            final_value: 0,
        };
        let cmd = b"*2\r\n$4\r\nINCR\r\n$10\r\ndemo:probe\r\n";
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            if let Err(e) = s.write_all(cmd) {
                result.errors += 1;
                result.failure = Some(format!("after {} INCRs, writing: {e}", result.ops));
                break;
            }
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    // A signal to this process (the lab reaping a killed
                    // node): a read with a timeout is not restarted.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => {
                        result.errors += 1;
                        result.failure = Some(format!(
                            "after {} INCRs, {:?} into a reply, reading: {}",
                            result.ops,
                            started.elapsed(),
                            match other {
                                Ok(_) => "the connection was closed".to_owned(),
                                Err(e) => e.to_string(),
                            }
                        ));
                        return result;
                    }
                }
            }
            result.max_pause = result.max_pause.max(started.elapsed());
            let value = std::str::from_utf8(&got)
                .ok()
                .and_then(|t| t.trim().strip_prefix(':'))
                .and_then(|n| n.parse::<u64>().ok());
            result.ops += 1;
            match value {
                Some(v) if v == result.ops => result.final_value = v,
                _ => result.errors += 1,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        result
    }))
}
