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

use super::overhead;
use super::relocate::{self, Measurement, Sizes, BUCKET};
use super::systems::{keepalived_args, keepalived_conf, System};

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

/// Ops/s over time, with the switch at x = 0.
fn plot_ops(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
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
        mesh.x_desc("seconds from the switch")
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
            .label("switch")
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

/// Latency CDFs, log-scale x.
fn plot_cdf(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
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
        mesh.x_desc("latency (ms, log scale)")
            .y_desc("fraction of requests");
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
    let _ = writeln!(md, "### keepalived configuration\n");
    let _ = writeln!(
        md,
        "VRRPv3 with the shortest advertisement interval keepalived accepts (0.01 s; it refuses 0.005), gratuitous ARPs sent at once on becoming master, real-time priority allowed. Each instance runs with its own files:\n\n```\nkeepalived {}\n```\n",
        keepalived_args(Path::new("STATE_DIR/keepalived")).join(" ")
    );
    for node in [1, 2] {
        let _ = writeln!(md, "```\n{}```\n", keepalived_conf(node));
    }
    let _ = writeln!(md, "## Workload\n");
    let _ = writeln!(
        md,
        "From the system's client host, {} connections, each alternating `SET bench:C:K VALUE` ({} bytes; its own {} keys round robin, each value naming the write it comes from) and `GET` of one of its keys the server acknowledged before (it must return the last acknowledged write or a later one), as fast as replies come, with `pipeline` requests written at once. Every reply is checked and time-stamped. On an error (reset, end of stream, no reply within 5 s) the client drops the connection and connects again (at once, then backing off from 5 ms to 200 ms). At the end every connection reads back every key the server acknowledged.\n",
        sizes.connections, sizes.value_bytes, sizes.keys_per_connection
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
    let mut header = String::from("| metric |");
    let mut rule = String::from("|---|");
    for l in lines {
        let _ = write!(
            header,
            " {} (pipeline {}) |",
            l["system"].as_str().unwrap_or("?"),
            l["pipeline"]
        );
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for key in relocate::METRIC_KEYS {
        let mut row = format!("| {key} |");
        for l in lines {
            let _ = write!(row, " {} |", fmt(&l[*key]));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
    for &p in &sizes.pipelines {
        let first = |s: System| runs.iter().find(|m| m.system == s && m.pipeline == p);
        let mut ops_lines = Vec::new();
        let mut cdf_lines = Vec::new();
        for s in [System::Baton, System::Keepalived] {
            let Some(m) = first(s) else { continue };
            let step = BUCKET.as_secs_f64();
            ops_lines.push(Line {
                label: s.name().into(),
                color: color(s),
                points: m
                    .series
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((i as f64 + 0.5) * step - m.switch_at_s, *v))
                    .collect(),
            });
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
            &ops_lines,
        )?;
        plot_cdf(
            &dir.join(&cdf_png),
            &format!("request latency CDF, pipeline {p}"),
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
    let mut jsonl = String::new();
    for m in runs {
        jsonl.push_str(&serde_json::to_string(m)?);
        jsonl.push('\n');
    }
    std::fs::write(dir.join("runs.jsonl"), jsonl)?;
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
    let mut header = String::from("| metric |");
    let mut rule = String::from("|---|");
    for l in lines {
        let _ = write!(header, " pipeline {} |", l["pipeline"]);
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for key in &overhead::KEYS[6..] {
        let mut row = format!("| {key} |");
        for l in lines {
            let _ = write!(row, " {} |", fmt(&l[*key]));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
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
            &cdf_lines,
        )?;
        let _ = writeln!(md, "### Pipeline {p}\n\n![latency CDF]({png})\n");
    }
    std::fs::write(dir.join("overhead.md"), md)?;
    Ok(())
}
