//! `baton bench failover`: the primary's host crashes under a client
//! workload (`Lab::crash`: its link goes down, every process in it is
//! killed, its sockets and VIPs are cleared), with baton (`baton node` on
//! three nodes, the `kv` service replicated through the log, primary on
//! node1, the default election timeout) and with keepalived (the same
//! service code as a plain server on node1 and node2, keepalived moving
//! the VIP; the configuration of `bench relocate`). Both give the VIP to
//! one host at a time (unicast mode).
//!
//! One run: the system is deployed, the workload of `bench relocate` (at
//! pipeline 1) starts from the system's own client host, node1 crashes at
//! [`CRASH_AT`], the run ends at [`RUN`] (long enough for a client that
//! waits out its request timeout to connect again). The crash is timed by
//! its first step, the link going down, taken alone first: *the crash* is
//! the instant before it.
//!
//! Figures of a run:
//! - `stall_ms_p50/p99/max`: per client connection, from the crash to its
//!   first reply completed once a survivor holds the VIP (over the
//!   connections that got one). A reply completed earlier can only be
//!   node1's: sent before its link went down, and read a little late when
//!   the client's thread is kept waiting for a CPU.
//! - `client_errors`: broken connections (reset, end of stream, 5 s
//!   without a reply), failed connects and error replies over the whole
//!   run, plus one per connection that got no reply after the crash.
//! - `resets`: the client host's kernel counters (RSTs sent, established
//!   connections reset, aborts), from before connecting to before the
//!   workload's own close.
//! - `keys_lost`: distinct acknowledged keys a read (a GET during the run
//!   or the read-back at the end) found missing or older than their last
//!   acknowledged write (for keepalived: what the dead server held).
//! - `detect_ms`: from the crash until a new primary is known. keepalived:
//!   the VIP is a local address of node2. baton: the `ctl status` of the
//!   survivor that took the VIP says it is kv's primary (a node says so
//!   once it holds the VIP and has rebuilt every connection). A
//!   survivor's status waits up to 0.8 s for its dead peer, so from the
//!   moment the VIP appears that node is asked at once, then after
//!   [`POLL_FIRST`], doubling, each request on its own, and the figure is
//!   when the first request answered "primary" was sent: never before the
//!   VIP, late by at most the last gap, and early by up to the rebuild (a
//!   node answers its status only once a takeover under way is done).
//!   Only one node is asked, from then on and ever less often, because a
//!   status is not free for the service (see [`POLL_FIRST`]).
//! - `vip_ms`: from the crash until the VIP is a local address of a
//!   survivor (both systems, watched every 0.2 ms).
//! - `takeover_ms`: from the crash to the first reply on any connection
//!   (the smallest stall): when the service answers again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use baton_lab::cluster::Cluster;
use baton_lab::{Fault, Lab};
use serde::Serialize;
use serde_json::{json, Value};

use super::progress::Progress;
use super::relocate::{series, sleep_until, RunData, Running};
use super::stats::{ms, percentile, round3};
use super::systems::{kv_roles, vip, Deployment, System, VipWatch};
use super::workload::{WorkloadConfig, KEYS_PER_CONNECTION, VALUE_BYTES};

/// When node1 crashes, from the workload's start.
pub const CRASH_AT: Duration = Duration::from_secs(3);
/// Length of a run, from the workload's start: 7 s after the crash, more
/// than a client's request timeout (5 s) and its reconnect.
pub const RUN: Duration = Duration::from_secs(10);
/// The first gap between two `ctl status` requests to the new primary
/// (doubling after each): a status costs the service a serialization and
/// digest of its whole state, on the task that serves its clients, and two
/// authenticated peer handshakes, so asking every 20 ms throughout kept
/// baton's clients waiting for seconds.
pub const POLL_FIRST: Duration = Duration::from_millis(10);
/// Longest wait for a new primary or the VIP.
const WAIT: Duration = Duration::from_secs(7);
/// How both systems place the VIP: on one host at a time.
const MODE: &str = "unicast";
/// The crashed host: the primary, or keepalived's master.
const CRASHED: &str = "node1";

/// The sizes of a failover benchmark.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub connections: usize,
    pub repeat: usize,
}

/// The two systems compared.
const SYSTEMS: [System; 2] = [System::Replicated, System::Keepalived];

/// The name a system goes by here: baton is replicated in this benchmark.
pub fn label(system: System) -> &'static str {
    match system {
        System::Replicated => "baton",
        other => other.name(),
    }
}

/// The hosts that may take over from node1.
fn survivors(system: System) -> &'static [&'static str] {
    match system {
        System::Keepalived => &["node2"],
        _ => &["node2", "node3"],
    }
}

/// A client connection that saw errors, and when.
#[derive(Debug, Clone, Serialize)]
pub struct ConnErrors {
    pub connection: usize,
    pub errors: u64,
    /// The first few, in ms from the crash (negative: before it).
    pub at_ms: Vec<f64>,
}

/// The figures of one failover run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub system: &'static str,
    #[serde(skip)]
    pub kind: System,
    pub repeat: usize,
    /// 0: this system ran first in its repeat, 1: second.
    pub order: usize,
    pub connections: usize,
    pub client_errors: u64,
    pub resets: u64,
    pub keys_lost: u64,
    pub stall_ms_p50: Option<f64>,
    pub stall_ms_p99: Option<f64>,
    pub stall_ms_max: Option<f64>,
    pub detect_ms: Option<f64>,
    pub takeover_ms: Option<f64>,
    pub vip_ms: Option<f64>,
    /// The survivor that took over (the VIP's new holder).
    pub new_holder: Option<String>,
    pub connections_without_reply: u64,
    pub reconnects: u64,
    pub keys_written: u64,
    pub get_misses: u64,
    pub wrong_replies: u64,
    /// How long `Lab::crash` took (kill, sockets and VIPs cleared) after
    /// the link went down.
    pub crash_ms: f64,
    /// The connections that saw errors.
    pub errors: Vec<ConnErrors>,
    /// Completed requests per second, per [`super::relocate::BUCKET`].
    #[serde(skip)]
    pub series: Vec<f64>,
    /// When node1 crashed, from the start.
    #[serde(skip)]
    pub crash_at_s: f64,
    /// Every connection's stall (ms, sorted).
    #[serde(skip)]
    pub stalls: Vec<f64>,
}

/// The instants of a crash.
struct CrashTimes {
    /// Before the link went down.
    crashed: Instant,
    /// The link is down: nothing node1 sends reaches anyone any more.
    down: Instant,
    /// `Lab::crash` returned.
    cleared: Instant,
    /// When the VIP became local on a survivor, and which: no reply from
    /// the system that takes over can come before.
    vip: Option<(Instant, String)>,
    /// When the first status request that found a new primary was sent.
    primary: Option<Instant>,
}

/// Crashes node1 and waits for the survivors to take over.
fn crash(lab: &Lab, run: &mut Running, system: System) -> Result<CrashTimes> {
    let watch = VipWatch::start(lab, survivors(system), IpAddr::V4(vip()), WAIT)?;
    if watch.already {
        bail!("the VIP is on a survivor before the crash");
    }
    let crashed = Instant::now();
    lab.fault(CRASHED, Fault::LinkDown)?;
    let down = Instant::now();
    lab.crash(CRASHED)?;
    let cleared = Instant::now();
    let vip = watch.wait();
    // The node that took the VIP is the one becoming primary.
    let primary = match (run.deployment()?.baton_cluster(), &vip) {
        (Some(cluster), Some((_, holder))) => first_primary(cluster, holder, WAIT),
        _ => None,
    };
    Ok(CrashTimes {
        crashed,
        down,
        cleared,
        vip,
        primary,
    })
}

/// Asks `node` for its `ctl status` at once, then after [`POLL_FIRST`],
/// doubling the gap each time, each request on a thread of its own (an
/// answer takes as long as the dead peer's deadline), until an answer
/// says `node` is kv's primary or `limit` has passed; returns when the
/// first such request was sent.
fn first_primary(cluster: &Cluster, node: &str, limit: Duration) -> Option<Instant> {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, bool)>();
    let began = Instant::now();
    let mut gap = POLL_FIRST;
    std::thread::scope(|scope| {
        'ask: while began.elapsed() < limit {
            let tx = tx.clone();
            scope.spawn(move || {
                let sent = Instant::now();
                let primary = kv_roles(cluster, node)
                    .map(|roles| roles.iter().any(|(n, r)| n == node && r == "primary"))
                    .unwrap_or(false);
                let _ = tx.send((sent, primary));
            });
            let next = Instant::now() + gap;
            gap *= 2;
            while let Ok((_, primary)) =
                rx.recv_timeout(next.saturating_duration_since(Instant::now()))
            {
                if primary {
                    break 'ask;
                }
            }
        }
        // The scope waits for the requests still out; their answers are
        // read below.
    });
    drop(tx);
    rx.into_iter()
        .filter(|(_, primary)| *primary)
        .map(|(sent, _)| sent)
        .min()
}

fn since(t: Instant, from: Instant) -> f64 {
    round3(ms(t.saturating_duration_since(from)))
}

fn metrics(
    system: System,
    (repeat, order, connections): (usize, usize, usize),
    start: Instant,
    data: &RunData,
    times: &CrashTimes,
) -> Measurement {
    let crash_us = times.crashed.saturating_duration_since(start).as_micros() as u64;
    // Replies completed before a survivor held the VIP can only be node1's
    // (sent before its link went down, read a little late by a busy
    // client).
    let taken = times
        .vip
        .as_ref()
        .map_or(times.down, |v| v.0.max(times.down));
    let taken_us = taken.saturating_duration_since(start).as_micros() as u64;
    let mut stalls = Vec::new();
    let mut without_reply = 0;
    for c in &data.conns {
        match c.records.iter().find(|r| r.done_us >= taken_us) {
            Some(r) => stalls.push((r.done_us - crash_us) as f64 / 1e3),
            None => without_reply += 1,
        }
    }
    stalls.sort_by(f64::total_cmp);
    let stat = |f: &dyn Fn(&[f64]) -> f64| (!stalls.is_empty()).then(|| round3(f(&stalls)));
    let errors = data
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.errors > 0)
        .map(|(i, c)| ConnErrors {
            connection: i,
            errors: c.errors,
            at_ms: c
                .error_times_us
                .iter()
                .take(5)
                .map(|&t| round3((t as f64 - crash_us as f64) / 1e3))
                .collect(),
        })
        .collect();
    let sum = |f: fn(&super::workload::ConnStats) -> u64| data.conns.iter().map(f).sum::<u64>();
    let detect = match system {
        System::Keepalived => times.vip.as_ref().map(|v| v.0),
        _ => times.primary,
    };
    Measurement {
        system: label(system),
        kind: system,
        repeat,
        order,
        connections,
        client_errors: sum(|c| c.errors) + without_reply,
        resets: data.resets,
        keys_lost: sum(|c| c.keys_lost),
        stall_ms_p50: stat(&|s| percentile(s, 50.0)),
        stall_ms_p99: stat(&|s| percentile(s, 99.0)),
        stall_ms_max: stat(&|s| s[s.len() - 1]),
        detect_ms: detect.map(|t| since(t, times.crashed)),
        takeover_ms: stat(&|s| s[0]),
        vip_ms: times.vip.as_ref().map(|v| since(v.0, times.crashed)),
        new_holder: times.vip.as_ref().map(|v| v.1.clone()),
        connections_without_reply: without_reply,
        reconnects: sum(|c| c.reconnects),
        keys_written: sum(|c| c.keys_written),
        get_misses: sum(|c| c.get_misses),
        wrong_replies: sum(|c| c.wrong_replies),
        crash_ms: since(times.cleared, times.down),
        errors,
        series: series(&data.conns, RUN),
        crash_at_s: times.crashed.saturating_duration_since(start).as_secs_f64(),
        stalls,
    }
}

/// One run of `system`: deployed, the workload, the crash, torn down; the
/// crashed host is powered on again (with nothing on it) whatever
/// happened.
fn one(
    lab: &Lab,
    bin: &Path,
    system: System,
    (repeat, order, connections): (usize, usize, usize),
) -> Result<Measurement> {
    let result = (|| {
        let cfg = |d: &Deployment| {
            WorkloadConfig::new(d.target(), connections, 1, VALUE_BYTES, KEYS_PER_CONNECTION)
        };
        let mut run = Running::start(lab, bin, system, cfg)?;
        let start = run.start;
        sleep_until(start + CRASH_AT);
        let times = crash(lab, &mut run, system)?;
        let data = run.finish(RUN)?;
        Ok(metrics(
            system,
            (repeat, order, connections),
            start,
            &data,
            &times,
        ))
    })();
    power_on(lab, CRASHED)?;
    result
}

/// Brings a crashed host back: `Lab::crash` left it as after a reboot
/// (no sockets, VIPs or packet filter rules), with its link down.
fn power_on(lab: &Lab, host: &str) -> Result<()> {
    lab.fault(host, Fault::LinkUp)
        .with_context(|| format!("bringing {host}'s link back"))
}

/// Keys of a failover JSON line after the fixed ones, in order.
pub const METRIC_KEYS: &[&str] = &[
    "client_errors",
    "resets",
    "keys_lost",
    "stall_ms_p50",
    "stall_ms_p99",
    "stall_ms_max",
    "detect_ms",
    "takeover_ms",
    "vip_ms",
];

/// The JSON line of one system: medians over its repeats.
fn summary(sizes: &Sizes, system: System, runs: &[&Measurement]) -> Value {
    let mut line = serde_json::Map::new();
    line.insert("bench".into(), json!("failover"));
    line.insert("system".into(), json!(label(system)));
    line.insert("mode".into(), json!(MODE));
    line.insert("connections".into(), json!(sizes.connections));
    line.insert("repeats".into(), json!(runs.len()));
    super::medians(&mut line, runs, METRIC_KEYS);
    Value::Object(line)
}

/// Runs the benchmark; prints JSON lines or a table; writes the report.
pub fn run(sizes: Sizes, json_out: bool, out: Option<PathBuf>) -> Result<i32> {
    if sizes.connections == 0 || sizes.repeat == 0 {
        return Err(anyhow!("--connections and --repeat must be at least 1"));
    }
    let bin = std::env::current_exe().context("locating the baton binary")?;
    // Three nodes; client2 drives keepalived, client4 baton (replicated).
    let lab = Lab::create(&Lab::unique_name("bfo"), 3, 4)?;
    let progress = Progress::new((sizes.repeat * SYSTEMS.len()) as u64, RUN);
    let mut runs: Vec<Measurement> = Vec::new();
    for repeat in 0..sizes.repeat {
        for (order, system) in super::in_turn(&SYSTEMS, repeat).into_iter().enumerate() {
            progress.start(format!(
                "failover: {}, repeat {}/{}",
                label(system),
                repeat + 1,
                sizes.repeat
            ));
            let m = one(&lab, &bin, system, (repeat, order, sizes.connections))
                .with_context(|| label(system).to_owned())?;
            if system == System::Replicated && (m.resets > 0 || m.client_errors > 0) {
                eprintln!(
                    "baton, repeat {}: {} client errors, {} resets, {} connections without a reply after the crash; connections with errors (ms from the crash): {}",
                    repeat + 1,
                    m.client_errors,
                    m.resets,
                    m.connections_without_reply,
                    serde_json::to_string(&m.errors).unwrap_or_default()
                );
            }
            runs.push(m);
            progress.done();
        }
    }
    progress.finish();
    drop(lab);

    let lines: Vec<Value> = SYSTEMS
        .iter()
        .map(|&s| {
            let of: Vec<&Measurement> = runs.iter().filter(|m| m.kind == s).collect();
            summary(&sizes, s, &of)
        })
        .collect();
    super::emit(
        &lines,
        json_out,
        |l| l["system"].as_str().unwrap_or("?").to_owned(),
        METRIC_KEYS,
    );
    if let Some(dir) = out {
        super::write_report(&dir, "failover.md", json_out, || {
            super::report::failover(&dir, &sizes, &lines, &runs)
        })?;
    }
    Ok(0)
}
