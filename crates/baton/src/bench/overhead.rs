//! `baton bench overhead`: the steady-state cost of the baton runtime. The
//! same workload as `relocate`, without any move, against the kv service
//! code as a plain tokio server on node1, under `baton node` (served on
//! node1), and replicated through the log across three nodes (primary on
//! node1), one system at a time in a three-node lab. Each pipeline depth
//! runs with the configured connections, and one more row with a single
//! connection at pipeline 1 (latency alone). Counted: the requests
//! completed after the first tenth of the run (warm-up).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use baton_lab::Lab;
use serde_json::json;

use super::progress::Progress;
use super::relocate::{latencies, ops_per_s, Running, Sizes};
use super::stats::{median, percentile, round3};
use super::systems::{Deployment, System};
use super::workload::WorkloadConfig;

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Run {
    pub system: System,
    pub pipeline: usize,
    pub connections: usize,
    pub ops_per_s: f64,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    pub latencies: Vec<f64>,
}

/// Keys of an overhead JSON line.
pub const KEYS: &[&str] = &[
    "bench",
    "pipeline",
    "connections",
    "keys_per_connection",
    "duration_s",
    "repeats",
    "plain_ops_per_s",
    "baton_ops_per_s",
    "ops_ratio",
    "plain_latency_ms_p50",
    "plain_latency_ms_p99",
    "baton_latency_ms_p50",
    "baton_latency_ms_p99",
    "latency_p50_ratio",
    "latency_p99_ratio",
    "plain_client_errors",
    "baton_client_errors",
    "replicated_ops_per_s",
    "replicated_ops_ratio",
    "replicated_latency_ms_p50",
    "replicated_latency_ms_p99",
    "replicated_client_errors",
];

fn one(
    lab: &Lab,
    bin: &Path,
    system: System,
    (pipeline, connections): (usize, usize),
    sizes: &Sizes,
) -> Result<Run> {
    let cfg = |d: &Deployment| {
        WorkloadConfig::new(
            d.target(),
            connections,
            pipeline,
            sizes.value_bytes,
            sizes.keys_per_connection,
        )
    };
    let data = Running::start(lab, bin, system, cfg)?.finish(sizes.duration)?;
    let warm = sizes.duration.mul_f64(0.1);
    let lat = latencies(&data.conns, warm, sizes.duration);
    Ok(Run {
        system,
        pipeline,
        connections,
        ops_per_s: ops_per_s(&data.conns, warm, sizes.duration),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        errors: data.conns.iter().map(|c| c.errors).sum(),
        latencies: lat,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        round3(a / b)
    } else {
        0.0
    }
}

/// Runs the benchmark and prints one line per pipeline depth.
pub fn run(sizes: Sizes, json_out: bool, out: Option<PathBuf>) -> Result<i32> {
    let bin = std::env::current_exe().context("locating the baton binary")?;
    let lab = Lab::create(&Lab::unique_name("bov"), 3, 4)?;
    let systems = [System::Plain, System::Baton, System::Replicated];
    // (pipeline, connections): every depth asked for, then one connection.
    let mut shapes: Vec<(usize, usize)> = sizes
        .pipelines
        .iter()
        .map(|p| (*p, sizes.connections))
        .collect();
    if sizes.connections > 1 {
        shapes.push((1, 1));
    }
    let progress = Progress::new(
        (sizes.repeat * shapes.len() * systems.len()) as u64,
        sizes.duration,
    );
    let mut runs = Vec::new();
    for repeat in 0..sizes.repeat {
        let order = super::in_turn(&systems, repeat);
        for &(pipeline, conns) in &shapes {
            for &system in &order {
                progress.start(format!(
                    "overhead: {} pipeline {pipeline}, {conns} connections, repeat {}/{}",
                    system.name(),
                    repeat + 1,
                    sizes.repeat
                ));
                runs.push(
                    one(&lab, &bin, system, (pipeline, conns), &sizes).with_context(|| {
                        format!(
                            "{} (pipeline {pipeline}, {conns} connections)",
                            system.name()
                        )
                    })?,
                );
                progress.done();
            }
        }
    }
    progress.finish();
    drop(lab);

    let mut grouped: BTreeMap<((usize, usize), System), Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        grouped
            .entry(((r.pipeline, r.connections), r.system))
            .or_default()
            .push(r);
    }
    let mut lines = Vec::new();
    for &shape in &shapes {
        let med = |s: System, f: fn(&Run) -> f64| -> f64 {
            let xs: Vec<f64> = grouped
                .get(&(shape, s))
                .map(|v| v.iter().map(|r| f(r)).collect())
                .unwrap_or_default();
            median(&xs)
        };
        let (p, connections) = shape;
        let (plain, baton, repl) = (System::Plain, System::Baton, System::Replicated);
        let plain_ops = med(plain, |r| r.ops_per_s);
        let baton_ops = med(baton, |r| r.ops_per_s);
        let repl_ops = med(repl, |r| r.ops_per_s);
        let (pl50, pl99) = (med(plain, |r| r.p50), med(plain, |r| r.p99));
        let (ba50, ba99) = (med(baton, |r| r.p50), med(baton, |r| r.p99));
        let (re50, re99) = (med(repl, |r| r.p50), med(repl, |r| r.p99));
        lines.push(json!({
            "bench": "overhead",
            "pipeline": p,
            "connections": connections,
            "keys_per_connection": sizes.keys_per_connection,
            "duration_s": sizes.duration.as_secs_f64(),
            "repeats": sizes.repeat,
            "plain_ops_per_s": round3(plain_ops),
            "baton_ops_per_s": round3(baton_ops),
            "ops_ratio": ratio(baton_ops, plain_ops),
            "plain_latency_ms_p50": round3(pl50),
            "plain_latency_ms_p99": round3(pl99),
            "baton_latency_ms_p50": round3(ba50),
            "baton_latency_ms_p99": round3(ba99),
            "latency_p50_ratio": ratio(ba50, pl50),
            "latency_p99_ratio": ratio(ba99, pl99),
            "plain_client_errors": med(plain, |r| r.errors as f64),
            "baton_client_errors": med(baton, |r| r.errors as f64),
            "replicated_ops_per_s": round3(repl_ops),
            "replicated_ops_ratio": ratio(repl_ops, plain_ops),
            "replicated_latency_ms_p50": round3(re50),
            "replicated_latency_ms_p99": round3(re99),
            "replicated_client_errors": med(repl, |r| r.errors as f64),
        }));
    }
    super::emit(
        &lines,
        json_out,
        |l| {
            format!(
                "pipeline {}, {} connections",
                l["pipeline"], l["connections"]
            )
        },
        &KEYS[6..],
    );
    if let Some(dir) = out {
        super::write_report(&dir, "overhead.md", json_out, || {
            super::report::overhead(&dir, &sizes, &lines, &runs)
        })?;
    }
    Ok(0)
}
