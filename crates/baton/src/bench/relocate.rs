//! `baton bench relocate`: the kv service moved from node1 to node2 under
//! a client workload, by baton (`baton ctl move`) and by keepalived (the
//! same service code as a plain server on both nodes, keepalived moving
//! the VIP when the master's keepalived is stopped for maintenance).
//!
//! Time windows of one run of D seconds (from the moment every client
//! connection is up and the workload starts):
//! warm-up `[0, 0.1 D)` is not counted; *before* `[0.1 D, 0.4 D)`; the
//! switch is made at `0.4 D`; *during* `[0.4 D, 0.4 D + min(2 s, 0.2 D))`;
//! *after* from there to D. Steady-state latency: the requests completed
//! in *before*.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use baton_lab::{Lab, TcpCounters};
use serde::Serialize;
use serde_json::{json, Value};

use super::progress::Progress;
use super::stats::{ms, percentile, round3};
use super::systems::{vip, Deployment, System, VipWatch};
use super::workload::{ConnStats, Workload, WorkloadConfig};

/// Width of one bucket of the ops/s time series.
pub const BUCKET: Duration = Duration::from_millis(100);

/// The sizes of a benchmark run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub connections: usize,
    pub duration: Duration,
    pub pipelines: Vec<usize>,
    pub repeat: usize,
    pub value_bytes: usize,
    pub keys_per_connection: u64,
}

/// What the client workload saw in one run.
pub struct RunData {
    pub conns: Vec<ConnStats>,
    pub resets: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct SwitchTimes {
    pub issued: Duration,
    pub took_ms: f64,
    /// When the VIP became a local address of node2 (None: it already was,
    /// or it did not within 10 s).
    pub vip_local: Option<Duration>,
}

/// One run of a benchmark: a system deployed and the workload running
/// against it, from its own client host. Dropped before [`Running::finish`]
/// (an error mid-run), it stops the workload and tears the system down all
/// the same.
pub struct Running<'a> {
    lab: &'a Lab,
    deployment: Option<Deployment<'a>>,
    workload: Option<Workload>,
    client: &'static str,
    before: TcpCounters,
    /// The instant the workload's time stamps count from.
    pub start: Instant,
}

impl<'a> Running<'a> {
    /// Deploys `system`, connects the workload (configured by `cfg_for`
    /// from the deployment) and starts it.
    pub fn start(
        lab: &'a Lab,
        bin: &Path,
        system: System,
        cfg_for: impl FnOnce(&Deployment) -> WorkloadConfig,
    ) -> Result<Running<'a>> {
        let deployment = Deployment::of(system, lab, bin)?;
        // Each system has a client host of its own, so that one system's
        // teardown (and its late resets) never lands in another's counters.
        let client = system.client_host();
        let cfg = cfg_for(&deployment);
        let connected = (|| {
            super::systems::wait_serving(lab, client, cfg.target, Duration::from_secs(20))?;
            let before = lab.tcp_counters(client)?;
            Ok((before, Workload::connect(lab, client, cfg)?))
        })();
        match connected {
            Ok((before, mut workload)) => Ok(Running {
                lab,
                deployment: Some(deployment),
                start: workload.go(),
                workload: Some(workload),
                client,
                before,
            }),
            Err(e) => {
                deployment.teardown(lab);
                Err(e)
            }
        }
    }

    /// The system under test.
    pub fn deployment(&mut self) -> Result<&mut Deployment<'a>> {
        self.deployment
            .as_mut()
            .ok_or_else(|| anyhow!("the system is no longer deployed"))
    }

    /// Waits until `end` from the start, stops the workload (after its
    /// read-back) and tears the system down.
    pub fn finish(mut self, end: Duration) -> Result<RunData> {
        sleep_until(self.start + end);
        // Resets over the run, up to (not including) the workload's own close.
        let after = self.lab.tcp_counters(self.client)?;
        let conns = self
            .workload
            .take()
            .ok_or_else(|| anyhow!("the workload is already stopped"))?
            .finish()?;
        Ok(RunData {
            conns,
            resets: after.resets_since(&self.before),
        })
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(workload) = self.workload.take() {
            let _ = workload.finish();
        }
        if let Some(deployment) = self.deployment.take() {
            deployment.teardown(self.lab);
        }
    }
}

/// One relocate run: `system` deployed, the workload for `duration`, the
/// switch at `switch_at`.
fn measure(
    lab: &Lab,
    bin: &Path,
    system: System,
    cfg_for: impl FnOnce(&Deployment) -> WorkloadConfig,
    duration: Duration,
    switch_at: Duration,
) -> Result<(RunData, SwitchTimes)> {
    let mut run = Running::start(lab, bin, system, cfg_for)?;
    let start = run.start;
    sleep_until(start + switch_at);
    let watch = VipWatch::start(lab, &["node2"], IpAddr::V4(vip()), Duration::from_secs(10))?;
    let issued = Instant::now();
    let took_ms = run.deployment()?.switch();
    let vip_local = if watch.already {
        drop(watch);
        None
    } else {
        watch.wait().map(|(t, _)| t)
    };
    let switch = SwitchTimes {
        issued: issued - start,
        took_ms: took_ms?,
        vip_local: vip_local.map(|t| t.saturating_duration_since(start)),
    };
    Ok((run.finish(duration)?, switch))
}

/// Sleeps until `t` (not at all if it is past).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// The metrics of one relocate run (one system, one pipeline depth, one
/// repeat).
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub system: System,
    pub pipeline: usize,
    pub repeat: usize,
    /// 0: this system ran first in its pair, 1: second.
    pub order: usize,
    pub client_errors: u64,
    pub resets: u64,
    pub reconnects: u64,
    pub keys_written: u64,
    pub keys_lost: u64,
    pub get_misses: u64,
    pub wrong_replies: u64,
    pub switch_ms: f64,
    pub vip_moved_ms: Option<f64>,
    pub first_reply_after_switch_ms_p50: f64,
    pub first_reply_after_switch_ms_p99: f64,
    pub first_reply_after_switch_ms_max: f64,
    pub connections_not_recovered: u64,
    pub ops_per_s_before: f64,
    pub ops_per_s_during: f64,
    pub ops_per_s_after: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Completed requests per second, per [`BUCKET`], from the start.
    #[serde(skip)]
    pub series: Vec<f64>,
    /// When the switch was issued, from the start.
    #[serde(skip)]
    pub switch_at_s: f64,
    /// Latencies (ms, sorted) of the *before* window and of the whole run.
    #[serde(skip)]
    pub latencies_steady: Vec<f64>,
    #[serde(skip)]
    pub latencies_all: Vec<f64>,
}

/// The ops/s series of a run: completed requests per bucket, per second.
pub fn series(conns: &[ConnStats], duration: Duration) -> Vec<f64> {
    let n = (duration.as_micros() / BUCKET.as_micros()).max(1) as usize;
    let mut counts = vec![0u64; n];
    for r in conns.iter().flat_map(|c| &c.records) {
        let i = (r.done_us / BUCKET.as_micros() as u64) as usize;
        if i < n {
            counts[i] += 1;
        }
    }
    counts
        .into_iter()
        .map(|c| c as f64 / BUCKET.as_secs_f64())
        .collect()
}

/// Completed requests per second within `[from, to)`.
pub fn ops_per_s(conns: &[ConnStats], from: Duration, to: Duration) -> f64 {
    let (a, b) = (from.as_micros() as u64, to.as_micros() as u64);
    if b <= a {
        return 0.0;
    }
    let n = conns
        .iter()
        .flat_map(|c| &c.records)
        .filter(|r| (a..b).contains(&r.done_us))
        .count();
    n as f64 / (to - from).as_secs_f64()
}

/// Sorted latencies (ms) of the requests completed within `[from, to)`.
pub fn latencies(conns: &[ConnStats], from: Duration, to: Duration) -> Vec<f64> {
    let (a, b) = (from.as_micros() as u64, to.as_micros() as u64);
    let mut v: Vec<f64> = conns
        .iter()
        .flat_map(|c| &c.records)
        .filter(|r| (a..b).contains(&r.done_us))
        .map(|r| f64::from(r.latency_us) / 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The window boundaries of a run of `d`: (warm-up end, switch, during end).
pub fn windows(d: Duration) -> (Duration, Duration, Duration) {
    let warm = d.mul_f64(0.1);
    let switch = d.mul_f64(0.4);
    let during = switch + d.mul_f64(0.2).min(Duration::from_secs(2));
    (warm, switch, during)
}

fn metrics(
    system: System,
    pipeline: usize,
    repeat: usize,
    order: usize,
    duration: Duration,
    data: &RunData,
    sw: SwitchTimes,
) -> Measurement {
    let (warm, switch_at, during_end) = windows(duration);
    // A connection has recovered with its first reply completed once the
    // new owner holds the VIP (or, if it held it already, once the switch
    // command returned).
    let recovered_from = sw
        .vip_local
        .unwrap_or(sw.issued + Duration::from_secs_f64(sw.took_ms / 1e3));
    let from_us = recovered_from.as_micros() as u64;
    let mut first = Vec::new();
    let mut not_recovered = 0;
    for c in &data.conns {
        match c.records.iter().find(|r| r.done_us >= from_us) {
            Some(r) => first.push((r.done_us as f64 - sw.issued.as_micros() as f64) / 1e3),
            None => not_recovered += 1,
        }
    }
    first.sort_by(f64::total_cmp);
    let steady = latencies(&data.conns, warm, switch_at);
    let all = latencies(&data.conns, Duration::ZERO, duration);
    let sum = |f: fn(&ConnStats) -> u64| data.conns.iter().map(f).sum::<u64>();
    Measurement {
        system,
        pipeline,
        repeat,
        order,
        client_errors: sum(|c| c.errors),
        resets: data.resets,
        reconnects: sum(|c| c.reconnects),
        keys_written: sum(|c| c.keys_written),
        keys_lost: sum(|c| c.keys_lost),
        get_misses: sum(|c| c.get_misses),
        wrong_replies: sum(|c| c.wrong_replies),
        switch_ms: round3(sw.took_ms),
        vip_moved_ms: sw
            .vip_local
            .map(|t| round3(ms(t.saturating_sub(sw.issued)))),
        first_reply_after_switch_ms_p50: round3(percentile(&first, 50.0)),
        first_reply_after_switch_ms_p99: round3(percentile(&first, 99.0)),
        first_reply_after_switch_ms_max: round3(first.last().copied().unwrap_or(0.0)),
        connections_not_recovered: not_recovered,
        ops_per_s_before: round3(ops_per_s(&data.conns, warm, switch_at)),
        ops_per_s_during: round3(ops_per_s(&data.conns, switch_at, during_end)),
        ops_per_s_after: round3(ops_per_s(&data.conns, during_end, duration)),
        latency_ms_p50: round3(percentile(&steady, 50.0)),
        latency_ms_p99: round3(percentile(&steady, 99.0)),
        series: series(&data.conns, duration),
        switch_at_s: sw.issued.as_secs_f64(),
        latencies_steady: steady,
        latencies_all: all,
    }
}

/// Keys of a relocate JSON line, in order, after the fixed ones.
pub const METRIC_KEYS: &[&str] = &[
    "client_errors",
    "resets",
    "reconnects",
    "keys_written",
    "keys_lost",
    "get_misses",
    "wrong_replies",
    "switch_ms",
    "vip_moved_ms",
    "first_reply_after_switch_ms_p50",
    "first_reply_after_switch_ms_p99",
    "first_reply_after_switch_ms_max",
    "connections_not_recovered",
    "ops_per_s_before",
    "ops_per_s_during",
    "ops_per_s_after",
    "latency_ms_p50",
    "latency_ms_p99",
];

/// The JSON line of one system and pipeline depth: medians over repeats.
fn summary(sizes: &Sizes, system: System, pipeline: usize, runs: &[&Measurement]) -> Value {
    let mut line = serde_json::Map::new();
    line.insert("bench".into(), json!("relocate"));
    line.insert("system".into(), json!(system.name()));
    line.insert("pipeline".into(), json!(pipeline));
    line.insert("connections".into(), json!(sizes.connections));
    line.insert(
        "keys_per_connection".into(),
        json!(sizes.keys_per_connection),
    );
    line.insert("duration_s".into(), json!(sizes.duration.as_secs_f64()));
    line.insert("repeats".into(), json!(runs.len()));
    super::medians(&mut line, runs, METRIC_KEYS);
    Value::Object(line)
}

/// Runs the benchmark; prints JSON lines or a table; writes the report.
pub fn run(sizes: Sizes, json_out: bool, out: Option<PathBuf>) -> Result<i32> {
    let bin = std::env::current_exe().context("locating the baton binary")?;
    let lab = Lab::create(&Lab::unique_name("brl"), 2, 3)?;
    let systems = [System::Baton, System::Keepalived];
    let total = sizes.repeat * sizes.pipelines.len() * systems.len();
    let progress = Progress::new(total as u64, sizes.duration);
    let mut runs: Vec<Measurement> = Vec::new();
    let (_, switch_at, _) = windows(sizes.duration);
    for repeat in 0..sizes.repeat {
        let order = super::in_turn(&systems, repeat);
        for &pipeline in &sizes.pipelines {
            for (position, &system) in order.iter().enumerate() {
                progress.start(format!(
                    "relocate: {} pipeline {pipeline}, repeat {}/{}",
                    system.name(),
                    repeat + 1,
                    sizes.repeat
                ));
                let cfg = |d: &Deployment| {
                    WorkloadConfig::new(
                        d.target(),
                        sizes.connections,
                        pipeline,
                        sizes.value_bytes,
                        sizes.keys_per_connection,
                    )
                };
                let (data, switch) = measure(&lab, &bin, system, cfg, sizes.duration, switch_at)
                    .with_context(|| format!("{} (pipeline {pipeline})", system.name()))?;
                runs.push(metrics(
                    system,
                    pipeline,
                    repeat,
                    position,
                    sizes.duration,
                    &data,
                    switch,
                ));
                progress.done();
            }
        }
    }
    progress.finish();
    drop(lab);

    let mut grouped: BTreeMap<(usize, System), Vec<&Measurement>> = BTreeMap::new();
    for m in &runs {
        grouped.entry((m.pipeline, m.system)).or_default().push(m);
    }
    let lines: Vec<Value> = grouped
        .iter()
        .map(|((p, s), ms)| summary(&sizes, *s, *p, ms))
        .collect();
    super::emit(
        &lines,
        json_out,
        |l| {
            format!(
                "{} p{}",
                l["system"].as_str().unwrap_or("?"),
                l["pipeline"].as_u64().unwrap_or(0)
            )
        },
        METRIC_KEYS,
    );
    if let Some(dir) = out {
        super::write_report(&dir, "report.md", json_out, || {
            super::report::relocate(&dir, &sizes, &lines, &runs)
        })?;
    }
    let failed = runs.iter().any(|m| m.connections_not_recovered > 0);
    if failed && !json_out {
        eprintln!("note: some connections never got a reply after the switch");
    }
    Ok(0)
}

/// Checks the sizes make sense.
pub fn check(sizes: &Sizes) -> Result<()> {
    if sizes.connections == 0 || sizes.pipelines.is_empty() || sizes.repeat == 0 {
        return Err(anyhow!(
            "--connections, --pipeline and --repeat must be at least 1"
        ));
    }
    if sizes.pipelines.contains(&0) {
        return Err(anyhow!("a pipeline depth must be at least 1"));
    }
    if sizes.duration < Duration::from_secs(1) {
        return Err(anyhow!("--duration must be at least 1 s"));
    }
    Ok(())
}
