//! `baton bench`: measurements in the lab, printed as JSON lines.

mod failover;
mod move_conns;
mod overhead;
mod progress;
mod relocate;
mod report;
mod stats;
mod systems;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

const KEYS_HELP: &str = "\
JSON lines (--json):
  move-conns: {\"connections\",\"moves\",\"think_ms\",\"freeze_ms_p50\",\"freeze_ms_max\",
    \"client_stall_ms_p50\",\"client_stall_ms_p99\",\"client_stall_ms_max\",
    \"bytes_verified\",\"resets\",\"errors\"}
  relocate: one line per system (baton, keepalived) and pipeline depth,
    medians over the repeats: {\"bench\":\"relocate\",\"system\",\"pipeline\",
    \"connections\",\"keys_per_connection\",\"duration_s\",\"repeats\",\"client_errors\",\"resets\",
    \"reconnects\",\"keys_written\",\"keys_lost\",\"get_misses\",
    \"wrong_replies\",\"switch_ms\",\"vip_moved_ms\",
    \"first_reply_after_switch_ms_p50\",\"first_reply_after_switch_ms_p99\",
    \"first_reply_after_switch_ms_max\",\"connections_not_recovered\",
    \"ops_per_s_before\",\"ops_per_s_during\",\"ops_per_s_after\",
    \"latency_ms_p50\",\"latency_ms_p99\"}
  overhead: one line per pipeline depth, and one with 1 connection at
    pipeline 1: {\"bench\":\"overhead\",\"pipeline\",
    \"connections\",\"keys_per_connection\",\"duration_s\",\"repeats\",\"plain_ops_per_s\",
    \"baton_ops_per_s\",\"ops_ratio\",\"plain_latency_ms_p50\",
    \"plain_latency_ms_p99\",\"baton_latency_ms_p50\",\"baton_latency_ms_p99\",
    \"latency_p50_ratio\",\"latency_p99_ratio\",\"plain_client_errors\",
    \"baton_client_errors\",\"replicated_ops_per_s\",\"replicated_ops_ratio\",
    \"replicated_latency_ms_p50\",\"replicated_latency_ms_p99\",
    \"replicated_client_errors\"}   (ratios: baton or replicated / plain)
  failover: one line per system (baton, keepalived), medians over the
    repeats: {\"bench\":\"failover\",\"system\",\"mode\",\"connections\",\"repeats\",
    \"client_errors\",\"resets\",\"keys_lost\",\"stall_ms_p50\",\"stall_ms_p99\",
    \"stall_ms_max\",\"detect_ms\",\"takeover_ms\",\"vip_ms\"}

Windows of a relocate run of D seconds: warm-up [0, 0.1D) not counted,
before [0.1D, 0.4D), switch at 0.4D, during [0.4D, 0.4D + min(2 s, 0.2D)),
after to D. Latencies p50/p99: requests completed in `before` (relocate) or
after the warm-up (overhead). first_reply_after_switch: per connection,
from the switch command to its first successful reply completed once node2
holds the VIP. keys_lost: distinct acknowledged keys a read (GET during the
run or the final read-back) found missing or older than acknowledged.
resets: the kernel counters (RSTs sent, established connections reset,
aborts) of the system's own client host (client1 baton, client2
keepalived, client3 plain, client4 replicated), from before connecting to before the
workload's own close. client_errors: broken connections, failed connects, error
replies. Times in ms, rates per second.

A failover run lasts 10 s; node1 (the primary, keepalived's master) crashes
at 3 s. The crash: the instant before node1's link goes down. stall: per
connection, from the crash to its first reply completed once a survivor
holds the VIP. client_errors: as above, plus one per connection without
such a reply. detect_ms: crash -> a new primary is known (keepalived: the
VIP is local on node2; baton: the survivor that took the VIP says it is
kv's primary in ctl status, asked then, after 10 ms, doubling). vip_ms: crash
-> the VIP is local on a survivor. takeover_ms: the smallest stall. mode:
unicast (the VIP on one host at a time) for both.";

#[derive(Args)]
#[command(after_help = KEYS_HELP)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

/// Sizes of the relocate and overhead benchmarks.
#[derive(Args)]
struct SizeArgs {
    /// Client connections [default: 50; --quick: 4].
    #[arg(long)]
    connections: Option<usize>,
    /// Seconds per run [default: 10; --quick: 3].
    #[arg(long)]
    duration: Option<f64>,
    /// Pipeline depths to run, comma-separated [default: 1,8; --quick: 1].
    #[arg(long, value_delimiter = ',')]
    pipeline: Vec<usize>,
    /// Runs of each system and depth; the order of the systems alternates,
    /// the figures are medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Bytes of each value the clients SET.
    #[arg(long, default_value_t = workload::VALUE_BYTES)]
    value_bytes: usize,
    /// Keys each connection writes round robin (the service's state is
    /// connections x this many keys).
    #[arg(long, default_value_t = workload::KEYS_PER_CONNECTION)]
    keys_per_connection: u64,
    /// A tiny workload (for tests): 4 connections, 3 s, pipeline 1.
    #[arg(long)]
    quick: bool,
    /// Print one JSON line per scenario (keys: `baton bench --help`).
    #[arg(long)]
    json: bool,
    /// Also write a Markdown report and PNG plots to this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl SizeArgs {
    fn sizes(&self) -> Result<relocate::Sizes> {
        let sizes = relocate::Sizes {
            connections: self.connections.unwrap_or(if self.quick { 4 } else { 50 }),
            duration: Duration::from_secs_f64(
                self.duration
                    .unwrap_or(if self.quick { 3.0 } else { 10.0 })
                    .clamp(0.0, 86_400.0),
            ),
            pipelines: if !self.pipeline.is_empty() {
                self.pipeline.clone()
            } else if self.quick {
                vec![1]
            } else {
                vec![1, 8]
            },
            repeat: self.repeat,
            value_bytes: self.value_bytes.max(1),
            keys_per_connection: self.keys_per_connection.max(1),
        };
        relocate::check(&sizes)?;
        Ok(sizes)
    }
}

/// Sizes and output of the failover benchmark.
#[derive(Args)]
struct FailoverArgs {
    /// Client connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Runs of each system; the order of the systems alternates, the
    /// figures are medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print one JSON line per system (keys: `baton bench --help`).
    #[arg(long)]
    json: bool,
    /// Also write a Markdown report (failover.md) and PNG plots to this
    /// directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Clients do request/response through a VIP while all connections
    /// move between three `baton node` processes in a lab (the echo
    /// service, moved with `ctl move` round the nodes every 200 ms). Try
    /// --connections 1000, 5000 and 10000. With --json prints one line:
    /// {"connections","moves","think_ms","freeze_ms_p50","freeze_ms_max",
    /// "client_stall_ms_p50","client_stall_ms_p99","client_stall_ms_max",
    /// "bytes_verified","resets","errors"}. freeze: from installing the hold
    /// on the source to the target's Done (the VIP's traffic is held that
    /// long). client stall: for each request outstanding across a move, the
    /// time until its reply.
    MoveConns {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        moves: usize,
        /// Request size in bytes.
        #[arg(long, default_value_t = 64)]
        request_bytes: usize,
        /// Use an IPv6 VIP.
        #[arg(long)]
        ipv6: bool,
        /// Each client's pause between a reply and its next request, in ms.
        /// With many connections the default keeps this 2-core machine
        /// busy, and the stall then includes the clients' own backlog.
        #[arg(long, default_value_t = 10)]
        think_ms: u64,
        #[arg(long)]
        json: bool,
        /// Write each node's log here (NODE.log); with BATON_LOG=debug
        /// they show every move's phases.
        #[arg(long, value_name = "DIR")]
        node_logs: Option<std::path::PathBuf>,
    },
    /// kv moved node1 -> node2 under load: baton vs keepalived.
    ///
    /// The kv service moved node1 -> node2 under a client workload, by
    /// baton (`baton ctl move`) and by keepalived (the same service code
    /// as a plain server on both nodes, the master's keepalived stopped for
    /// maintenance), side by side in one lab. Errors, resets, reconnects,
    /// keys lost, time to the first reply after the switch, ops/s before,
    /// during and after, steady-state latency. Keys: `baton bench --help`.
    Relocate(SizeArgs),
    /// Steady-state cost of the baton runtime vs a plain server.
    ///
    /// The steady-state cost of the baton runtime: the same workload
    /// against the kv code as a plain server, under `baton node` (served on
    /// node1), and replicated through the log on three nodes (primary on
    /// node1, peer authentication on): ops/s, latency p50/p99 and their
    /// ratios to the plain server's, per pipeline depth, plus one row with a
    /// single connection at pipeline 1.
    Overhead(SizeArgs),
    /// The primary's host crashes under load: baton vs keepalived.
    ///
    /// The kv service under a client workload from its own client host,
    /// node1 crashed 3 s in (`Lab::crash`: link down, every process killed,
    /// sockets and VIPs cleared): baton with kv replicated on three nodes
    /// (a clone takes over and rebuilds the connections), and keepalived
    /// with the same service code as a plain server on node1 and node2.
    /// Per connection the stall from the crash to its first reply, client
    /// errors, resets, keys lost, the time to detect a new primary and to
    /// the first reply. Keys: `baton bench --help`.
    Failover(FailoverArgs),
}

pub fn run(args: BenchArgs) -> Result<i32> {
    match args.command {
        BenchCommand::MoveConns {
            connections,
            moves,
            request_bytes,
            ipv6,
            think_ms,
            json,
            node_logs,
        } => move_conns::run(
            connections,
            moves,
            request_bytes,
            ipv6,
            Duration::from_millis(think_ms),
            json,
            node_logs,
        ),
        BenchCommand::Relocate(a) => relocate::run(a.sizes()?, a.json, a.out),
        BenchCommand::Overhead(a) => overhead::run(a.sizes()?, a.json, a.out),
        BenchCommand::Failover(a) => failover::run(
            failover::Sizes {
                connections: a.connections,
                repeat: a.repeat,
            },
            a.json,
            a.out,
        ),
    }
}

/// Prints a scenario's result lines: one JSON object per line with
/// `--json`, else a table with one column per line (named by `column`) and
/// one row per metric of `keys`.
fn emit(
    lines: &[serde_json::Value],
    json: bool,
    column: impl Fn(&serde_json::Value) -> String,
    keys: &[&str],
) {
    if json {
        for l in lines {
            println!("{l}");
        }
        return;
    }
    print!("{:<34}", "metric (median)");
    for l in lines {
        print!("{:>16}", column(l));
    }
    println!();
    for key in keys {
        print!("{key:<34}");
        for l in lines {
            match l[*key].as_f64() {
                Some(v) => print!("{v:>16.3}"),
                None => print!("{:>16}", "-"),
            }
        }
        println!();
    }
}

/// The systems in the order of one repeat: as given in even repeats,
/// reversed in odd ones, so that none always runs first.
fn in_turn(systems: &[systems::System], repeat: usize) -> Vec<systems::System> {
    let mut order = systems.to_vec();
    if repeat % 2 == 1 {
        order.reverse();
    }
    order
}

/// Adds to `line` the median over `runs` (serialized) of each of `keys`,
/// rounded; null where no run has a figure.
fn medians<T: serde::Serialize>(
    line: &mut serde_json::Map<String, serde_json::Value>,
    runs: &[T],
    keys: &[&str],
) {
    let values: Vec<serde_json::Value> = runs
        .iter()
        .map(|m| serde_json::to_value(m).unwrap_or(serde_json::Value::Null))
        .collect();
    for key in keys {
        let xs: Vec<f64> = values.iter().filter_map(|v| v[*key].as_f64()).collect();
        let v = if xs.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(stats::round3(stats::median(&xs)))
        };
        line.insert((*key).into(), v);
    }
}

/// Writes a scenario's report into `dir` and says where (unless the output
/// is JSON).
fn write_report(
    dir: &std::path::Path,
    main_file: &str,
    json: bool,
    write: impl FnOnce() -> Result<()>,
) -> Result<()> {
    use anyhow::Context;
    write().with_context(|| format!("writing the report to {}", dir.display()))?;
    if !json {
        println!("report: {}", dir.join(main_file).display());
    }
    Ok(())
}
