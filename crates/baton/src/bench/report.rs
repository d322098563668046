//! `--out DIR`: a Markdown report and PNG plots (plotters) of a benchmark.
//!
//! Text in the plots needs a TTF font, loaded at run time from the usual
//! Debian places (`fonts-dejavu-core`); without one the plots are drawn
//! without any text rather than not at all.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

use super::failover;
use super::overhead;
use super::relocate::{self, Measurement, Sizes, BUCKET};
use super::systems::{keepalived_args, keepalived_conf, System};
use super::workload::{KEYS_PER_CONNECTION, REQUEST_TIMEOUT, VALUE_BYTES};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for plotters once; false if none could be loaded.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn color(system: System) -> RGBColor {
    match system {
        System::Baton => RGBColor(31, 119, 180),
        System::Keepalived => RGBColor(214, 39, 40),
        System::Plain => RGBColor(44, 160, 44),
        System::Replicated => RGBColor(148, 103, 189),
    }
}

/// Lighter shade, for the whole-run CDF.
fn light(c: RGBColor) -> RGBColor {
    let mix = |x: u8| x / 2 + 110;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// One line of a plot.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// The ops/s line of one run: `series` (per [`BUCKET`]) on a time axis
/// with the run's event (switch, crash) at 0, `event_at_s` from the start.
fn ops_line(system: System, label: &str, series: &[f64], event_at_s: f64) -> Line {
    let step = BUCKET.as_secs_f64();
    Line {
        label: label.into(),
        color: color(system),
        points: series
            .iter()
            .enumerate()
            .map(|(i, v)| ((i as f64 + 0.5) * step - event_at_s, *v))
            .collect(),
    }
}

/// Ops/s over time, with the `event` (switch, crash) at x = 0.
fn plot_ops(path: &Path, title: &str, event: &str, lines: &[Line]) -> Result<()> {
    let text = font_ready();
    let xmin = lines
        .iter()
        .flat_map(|l| l.points.first())
        .map(|p| p.0)
        .fold(0.0, f64::min);
    let xmax = lines
        .iter()
        .flat_map(|l| l.points.last())
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(80);
    }
    let mut chart = builder.build_cartesian_2d(xmin..xmax, 0f64..ymax)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(format!("seconds from the {event}"))
            .y_desc("completed requests / s");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for line in lines {
        let c = line.color;
        let drawn = chart.draw_series(LineSeries::new(
            line.points.iter().copied(),
            c.stroke_width(2),
        ))?;
        if text {
            drawn.label(line.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
            });
        }
    }
    let marker = chart.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (0.0, ymax)],
        BLACK.stroke_width(1),
    ))?;
    if text {
        marker
            .label(event)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Up to 400 points of the CDF of sorted `v`.
fn cdf_points(v: &[f64]) -> Vec<(f64, f64)> {
    if v.is_empty() {
        return Vec::new();
    }
    let n = v.len();
    let steps = 400.min(n);
    let mut pts: Vec<(f64, f64)> = (0..=steps)
        .map(|k| {
            let i = k * (n - 1) / steps.max(1);
            (v[i].max(0.001), (i + 1) as f64 / n as f64)
        })
        .collect();
    pts.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    pts
}

/// CDFs of times in ms (request latencies, stalls), log-scale x; `what`
/// names the x values and the population, for the axes.
fn plot_cdf(path: &Path, title: &str, what: (&str, &str), lines: &[Line]) -> Result<()> {
    let text = font_ready();
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min).clamp(0.001, 1.0) * 0.8;
    let hi = xs.fold(0.01, f64::max).max(lo * 10.0) * 1.25;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(format!("{} (ms, log scale)", what.0))
            .y_desc(format!("fraction of {}", what.1));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for line in lines {
        let c = line.color;
        let drawn = chart.draw_series(LineSeries::new(
            line.points.iter().copied(),
            c.stroke_width(2),
        ))?;
        if text {
            drawn.label(line.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// First line of `keepalived --version` (it prints to stderr).
fn keepalived_version() -> String {
    std::process::Command::new("keepalived")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            );
            all.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "keepalived (version unknown)".into())
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("Linux {kernel}, {cpus} CPUs")
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

/// A Markdown table of result `lines`: one column per line (headed by
/// `column`), one row per key.
fn results_table(
    md: &mut String,
    lines: &[Value],
    keys: &[&str],
    column: impl Fn(&Value) -> String,
) {
    let mut header = String::from("| metric |");
    let mut rule = String::from("|---|");
    for l in lines {
        let _ = write!(header, " {} |", column(l));
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for key in keys {
        let mut row = format!("| {key} |");
        for l in lines {
            let _ = write!(row, " {} |", fmt(&l[*key]));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
}

/// The keepalived baseline's configuration, as a report section.
fn keepalived_section(md: &mut String) {
    let _ = writeln!(md, "### keepalived configuration\n");
    let _ = writeln!(
        md,
        "VRRPv3 with the shortest advertisement interval keepalived accepts (0.01 s; it refuses 0.005), gratuitous ARPs sent at once on becoming master, real-time priority allowed. Each instance runs with its own files:\n\n```\nkeepalived {}\n```\n",
        keepalived_args(Path::new("STATE_DIR/keepalived")).join(" ")
    );
    for node in [1, 2] {
        let _ = writeln!(md, "```\n{}```\n", keepalived_conf(node));
    }
}

/// The client workload, as a report section: `(connections, value bytes,
/// keys per connection)` and how requests are pipelined.
fn workload_section(
    md: &mut String,
    (connections, value_bytes, keys): (usize, usize, u64),
    pipelining: &str,
) {
    let _ = writeln!(md, "## Workload\n");
    let _ = writeln!(
        md,
        "From the system's client host, {connections} connections, each alternating `SET bench:C:K VALUE` ({value_bytes} bytes; its own {keys} keys round robin, each value naming the write it comes from) and `GET` of one of its keys the server acknowledged before (it must return the last acknowledged write or a later one), as fast as replies come, {pipelining}. Every reply is checked and time-stamped. On an error (reset, end of stream, no reply within {} s) the client drops the connection and connects again (at once, then backing off from 5 ms to 200 ms). At the end every connection reads back every key the server acknowledged.\n",
        REQUEST_TIMEOUT.as_secs()
    );
}

/// Writes one JSON line per run.
fn write_jsonl<T: serde::Serialize>(path: &Path, runs: &[T]) -> Result<()> {
    let mut jsonl = String::new();
    for m in runs {
        jsonl.push_str(&serde_json::to_string(m)?);
        jsonl.push('\n');
    }
    std::fs::write(path, jsonl)?;
    Ok(())
}

/// Writes `report.md`, `runs.jsonl` and the plots of a relocate run.
pub fn relocate(dir: &Path, sizes: &Sizes, lines: &[Value], runs: &[Measurement]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let d = sizes.duration.as_secs_f64();
    let (warm, switch, during) = relocate::windows(sizes.duration);
    let mut md = String::new();
    let _ = writeln!(md, "# baton bench relocate\n");
    let _ = writeln!(
        md,
        "Machine: {}. {} connections, pipeline depths {:?}, {d} s per run, {} repeat(s), {} runs in all, the two systems alternating which goes first (baton first in odd repeats). Figures are medians over the repeats.\n",
        machine(),
        sizes.connections,
        sizes.pipelines,
        sizes.repeat,
        runs.len()
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "One lab (network namespaces on one machine): node1, node2 and one client host per system (client1 for baton, client2 for keepalived, client3 for the plain server) on one bridge. The service is `kv` (the Redis-protocol key-value store built into baton), reached at {}:{}. Each run deploys one system from scratch, runs the workload, switches the service from node1 to node2 at {:.1} s, and removes the system again.\n",
        super::systems::vip(),
        super::systems::KV_PORT,
        switch.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "- **baton**: `baton node` on node1 and node2, kv configured at the VIP with node1 preferred; the switch is `baton ctl move kv --to node2` (the control request the command sends).\n- **keepalived** (the baseline): the same `kv` code as a plain tokio TCP server (`baton serve-standalone --kind kv --listen 0.0.0.0:{}`, no baton runtime) on node1 and node2, and {} on both moving the VIP. The switch is what an operator does for maintenance: stop keepalived on the master (SIGTERM); it gives the VIP up at once with a priority-0 advertisement and the backup takes it over. The standalone servers' state does not move: the backup's server starts empty.\n",
        super::systems::KV_PORT,
        keepalived_version()
    );
    keepalived_section(&mut md);
    workload_section(
        &mut md,
        (
            sizes.connections,
            sizes.value_bytes,
            sizes.keys_per_connection,
        ),
        "with `pipeline` requests written at once",
    );
    let _ = writeln!(md, "## Metrics\n");
    let _ = writeln!(
        md,
        "Windows of a run: warm-up [0, {:.1} s) not counted; **before** [{:.1}, {:.1}) s; switch at {:.1} s; **during** [{:.1}, {:.1}) s; **after** [{:.1}, {d:.1}) s.\n",
        warm.as_secs_f64(),
        warm.as_secs_f64(),
        switch.as_secs_f64(),
        switch.as_secs_f64(),
        switch.as_secs_f64(),
        during.as_secs_f64(),
        during.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| key | meaning |\n|---|---|\n\
| client_errors | broken connections (reset, end of stream, 5 s without a reply), failed connects and error replies |\n\
| resets | the system's client host's kernel counters, from before connecting to before the workload's own close: RSTs sent + established connections reset + connections aborted |\n\
| reconnects | successful connects after a connection broke |\n\
| keys_written | distinct keys the server acknowledged (SET answered OK) |\n\
| keys_lost | distinct acknowledged keys that a read (a GET during the run, or the final read-back of every key) found missing or older than their last acknowledged write: what a client could no longer read |\n\
| get_misses | GETs during the run that found an acknowledged key missing or older than its last acknowledged write |\n\
| wrong_replies | replies that were not what the request asks for |\n\
| switch_ms | how long the switch command took |\n\
| vip_moved_ms | from the switch command to the VIP being a local address of node2 |\n\
| first_reply_after_switch_ms_p50/p99/max | per connection: from the switch command to its first successful reply completed once node2 holds the VIP |\n\
| connections_not_recovered | connections with no successful reply after that |\n\
| ops_per_s_before/during/after | completed requests per second in each window |\n\
| latency_ms_p50/p99 | steady state: latency of the requests completed in *before* |\n"
    );
    let _ = writeln!(md, "## Results (medians over repeats)\n");
    results_table(&mut md, lines, relocate::METRIC_KEYS, |l| {
        format!(
            "{} (pipeline {})",
            l["system"].as_str().unwrap_or("?"),
            l["pipeline"]
        )
    });
    for &p in &sizes.pipelines {
        let first = |s: System| runs.iter().find(|m| m.system == s && m.pipeline == p);
        let mut ops_lines = Vec::new();
        let mut cdf_lines = Vec::new();
        for s in [System::Baton, System::Keepalived] {
            let Some(m) = first(s) else { continue };
            ops_lines.push(ops_line(s, s.name(), &m.series, m.switch_at_s));
            cdf_lines.push(Line {
                label: format!("{} steady state", s.name()),
                color: color(s),
                points: cdf_points(&m.latencies_steady),
            });
            cdf_lines.push(Line {
                label: format!("{} whole run", s.name()),
                color: light(color(s)),
                points: cdf_points(&m.latencies_all),
            });
        }
        let ops_png = format!("ops_p{p}.png");
        let cdf_png = format!("latency_cdf_p{p}.png");
        plot_ops(
            &dir.join(&ops_png),
            &format!("kv moved node1 -> node2: completed requests/s, pipeline {p}"),
            "switch",
            &ops_lines,
        )?;
        plot_cdf(
            &dir.join(&cdf_png),
            &format!("request latency CDF, pipeline {p}"),
            ("latency", "requests"),
            &cdf_lines,
        )?;
        let _ = writeln!(
            md,
            "### Pipeline {p}\n\nCompleted requests per second ({} ms buckets; first repeat; the switch at 0):\n\n![ops/s]({ops_png})\n\nLatency CDF (first repeat): steady state (*before* window) and the whole run:\n\n![latency CDF]({cdf_png})\n",
            BUCKET.as_millis()
        );
    }
    let _ = writeln!(
        md,
        "## Every run\n\n`runs.jsonl` holds every run's figures (system, pipeline, repeat, order, and the keys above).\n"
    );
    write_jsonl(&dir.join("runs.jsonl"), runs)?;
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}

/// Writes `overhead.md` and latency CDF plots of an overhead run.
pub fn overhead(dir: &Path, sizes: &Sizes, lines: &[Value], runs: &[overhead::Run]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::new();
    let _ = writeln!(md, "# baton bench overhead\n");
    let _ = writeln!(
        md,
        "Machine: {}. The steady-state cost of the baton runtime: the `kv` service code as a plain tokio server (`baton serve-standalone`, at node1's address) and under `baton node` (at a VIP on node1), each alone in a one-node lab, driven from a client host of its own by the workload of `baton bench relocate` without any move: {} connections, pipeline depths {:?}, {} s per run of which the first tenth is warm-up, {} repeat(s) alternating which system goes first. Medians over repeats; ratios are baton / plain.\n",
        machine(),
        sizes.connections,
        sizes.pipelines,
        sizes.duration.as_secs_f64(),
        sizes.repeat
    );
    results_table(&mut md, lines, &overhead::KEYS[6..], |l| {
        format!("pipeline {}", l["pipeline"])
    });
    for &p in &sizes.pipelines {
        let mut cdf_lines = Vec::new();
        for s in [System::Plain, System::Baton, System::Replicated] {
            if let Some(r) = runs.iter().find(|r| r.system == s && r.pipeline == p) {
                cdf_lines.push(Line {
                    label: s.name().into(),
                    color: color(s),
                    points: cdf_points(&r.latencies),
                });
            }
        }
        let png = format!("overhead_cdf_p{p}.png");
        plot_cdf(
            &dir.join(&png),
            &format!("request latency CDF, plain vs baton, pipeline {p}"),
            ("latency", "requests"),
            &cdf_lines,
        )?;
        let _ = writeln!(md, "### Pipeline {p}\n\n![latency CDF]({png})\n");
    }
    std::fs::write(dir.join("overhead.md"), md)?;
    Ok(())
}

/// Writes `failover.md`, `failover_runs.jsonl` and the plots of a failover
/// run.
pub fn failover(
    dir: &Path,
    sizes: &failover::Sizes,
    lines: &[Value],
    runs: &[failover::Measurement],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let crash_at = failover::CRASH_AT.as_secs_f64();
    let mut md = String::new();
    let _ = writeln!(md, "# baton bench failover\n");
    let _ = writeln!(
        md,
        "Machine: {}. {} connections, {} repeat(s), {} runs in all, the two systems alternating which goes first (baton first in odd repeats). Figures are medians over the repeats.\n",
        machine(),
        sizes.connections,
        sizes.repeat,
        runs.len()
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "One lab (network namespaces on one machine): node1, node2, node3 and the client hosts (client4 for baton, client2 for keepalived) on one bridge. The service is `kv` (the Redis-protocol key-value store built into baton), reached at {}:{}. Each run deploys one system from scratch, runs the workload for {} s, crashes node1 at {crash_at:.1} s, and removes the system again. The crash is `Lab::crash`: node1's link goes down, every process in it is killed, its TCP sockets and its VIPs are cleared, as a power loss and reboot would leave it (its link is brought back up, with nothing on it, after the run). Both systems give the VIP to one host at a time (unicast).\n",
        super::systems::vip(),
        super::systems::KV_PORT,
        failover::RUN.as_secs_f64(),
    );
    let _ = writeln!(
        md,
        "- **baton**: `baton node` on the three nodes, kv configured at the VIP with `replicated = true` and node1 preferred, the default election timeout; the crash comes once node1 is the primary and node2 and node3 are current clones. A clone is elected, takes the VIP and rebuilds every open connection from the log (TCP_REPAIR).\n- **keepalived** (the baseline): the same `kv` code as a plain tokio TCP server (`baton serve-standalone --kind kv --listen 0.0.0.0:{}`, no baton runtime) on node1 and node2, and {} on both; node2's keepalived takes the VIP once node1's advertisements stop. The backup's server starts empty and knows none of the clients' connections.\n",
        super::systems::KV_PORT,
        keepalived_version()
    );
    keepalived_section(&mut md);
    workload_section(
        &mut md,
        (sizes.connections, VALUE_BYTES, KEYS_PER_CONNECTION),
        "one request at a time (pipeline 1)",
    );
    let _ = writeln!(md, "## Metrics\n");
    let _ = writeln!(
        md,
        "*The crash* is the instant before node1's link goes down (the first step of the crash, taken alone so that its instant is known).\n\n\
| key | meaning |\n|---|---|\n\
| mode | how the VIP is placed: `unicast`, on one host at a time |\n\
| stall_ms_p50/p99/max | per client connection: from the crash to its first reply completed once a survivor holds the VIP (over the connections that got one; a reply completed before can only be node1's, sent before its link went down and read late by a client kept waiting for a CPU) |\n\
| client_errors | broken connections (reset, end of stream, {} s without a reply), failed connects and error replies over the run, plus one per connection that got no reply after the crash |\n\
| resets | the system's client host's kernel counters, from before connecting to before the workload's own close: RSTs sent + established connections reset + connections aborted |\n\
| keys_lost | distinct acknowledged keys that a read (a GET during the run, or the final read-back of every key) found missing or older than their last acknowledged write |\n\
| detect_ms | from the crash until a new primary is known. keepalived: the VIP is a local address of node2. baton: the survivor that took the VIP says it is kv's primary in its `ctl status` (it says so once it holds the VIP and has rebuilt the connections); a survivor's status waits up to 0.8 s for its dead peer, so from the moment the VIP appears that node is asked at once, then after {} ms, doubling the gap each time (a status serializes and digests the service's whole state on the task that serves its clients), and the figure is when the first request answered \"primary\" was sent (never before the VIP; late by at most the last gap; early by up to the rebuild, as a node busy taking over answers its status once done) |\n\
| takeover_ms | from the crash to the first reply on any connection (the smallest stall): the service answers again |\n\
| vip_ms | from the crash until the VIP is a local address of a survivor (both systems; watched every 0.2 ms) |\n",
        REQUEST_TIMEOUT.as_secs(),
        failover::POLL_FIRST.as_millis()
    );
    let _ = writeln!(md, "## Results (medians over repeats)\n");
    results_table(&mut md, lines, failover::METRIC_KEYS, |l| {
        l["system"].as_str().unwrap_or("?").to_owned()
    });
    let mut ops_lines = Vec::new();
    let mut stall_lines = Vec::new();
    for s in [System::Replicated, System::Keepalived] {
        let Some(m) = runs.iter().find(|m| m.kind == s) else {
            continue;
        };
        let name = failover::label(s);
        ops_lines.push(ops_line(s, name, &m.series, m.crash_at_s));
        stall_lines.push(Line {
            label: name.into(),
            color: color(s),
            points: cdf_points(&m.stalls),
        });
    }
    plot_ops(
        &dir.join("failover_ops.png"),
        "node1 crashed: completed requests/s",
        "crash",
        &ops_lines,
    )?;
    plot_cdf(
        &dir.join("failover_stall_cdf.png"),
        "per connection: crash to its first reply",
        ("stall", "connections"),
        &stall_lines,
    )?;
    let _ = writeln!(
        md,
        "Completed requests per second ({} ms buckets; first repeat; the crash at 0):\n\n![ops/s](failover_ops.png)\n\nStall per connection, from the crash to its first reply (first repeat):\n\n![stall CDF](failover_stall_cdf.png)\n",
        BUCKET.as_millis()
    );
    let _ = writeln!(
        md,
        "## Every run\n\n`failover_runs.jsonl` holds every run's figures: the keys above, and the survivor that took over (`new_holder`), `connections_without_reply`, `reconnects`, `keys_written`, `get_misses`, `wrong_replies`, how long the rest of the crash took after the link went down (`crash_ms`), and the connections that saw errors with the first few times (`errors`, ms from the crash).\n"
    );
    write_jsonl(&dir.join("failover_runs.jsonl"), runs)?;
    std::fs::write(dir.join("failover.md"), md)?;
    Ok(())
}
