//! `baton bench relocate`, `overhead` and `failover` run end to end on a
//! tiny workload and print JSON lines with the documented keys. These are
//! measurements: nothing here asserts how good the figures are, except
//! what failover promises (no reset, no client error, no key lost when the
//! primary's host crashes). Needs root, iproute2, iptables and keepalived.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_baton");

/// Runs `baton ARGS` with a deadline; returns its stdout, panics on failure.
fn baton(args: &[&str], limit: Duration) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting baton");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for baton") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "baton {args:?} did not finish within {limit:?}; stderr: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "baton {args:?} failed ({status}): {err}\nstdout: {out}"
    );
    out
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn has_keys(line: &Value, keys: &[&str]) {
    for key in keys {
        assert!(line.get(*key).is_some(), "no key {key:?} in {line}");
    }
}

fn keepalived_present() -> bool {
    let found = Command::new("keepalived")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIPPED: keepalived not found (scripts/setup.sh installs it)");
    }
    found
}

#[test]
fn relocate_runs_and_prints_json() {
    let _deadline = baton_lab::Deadline::start(
        "relocate_runs_and_prints_json",
        std::time::Duration::from_secs(300),
    );
    if !keepalived_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("baton-bench-test-{}", std::process::id()));
    let out = baton(
        &[
            "bench",
            "relocate",
            "--json",
            "--connections",
            "3",
            "--duration",
            "2.5",
            "--pipeline",
            "2",
            "--out",
            &dir.to_string_lossy(),
        ],
        Duration::from_secs(90),
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "one line per system: {out}");
    let mut systems: Vec<&str> = lines
        .iter()
        .map(|l| l["system"].as_str().expect("system"))
        .collect();
    systems.sort();
    assert_eq!(systems, ["baton", "keepalived"]);
    for line in &lines {
        assert_eq!(line["bench"], "relocate");
        assert_eq!(line["pipeline"], 2);
        has_keys(
            line,
            &[
                "connections",
                "duration_s",
                "repeats",
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
            ],
        );
        assert!(line["keys_written"].as_f64().unwrap() > 0.0, "{line}");
    }
    for file in [
        "report.md",
        "runs.jsonl",
        "ops_p2.png",
        "latency_cdf_p2.png",
    ] {
        let meta = std::fs::metadata(dir.join(file))
            .unwrap_or_else(|e| panic!("{file} was not written: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
    }
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("advert_int 0.01"), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overhead_runs_and_prints_json() {
    let _deadline = baton_lab::Deadline::start(
        "overhead_runs_and_prints_json",
        std::time::Duration::from_secs(300),
    );
    let out = baton(
        &["bench", "overhead", "--json", "--quick", "--duration", "2"],
        Duration::from_secs(60),
    );
    let lines = json_lines(&out);
    assert_eq!(
        lines.len(),
        2,
        "one line per pipeline depth, and one with a single connection: {out}"
    );
    assert_eq!(lines[1]["connections"], 1, "{out}");
    let line = &lines[0];
    assert_eq!(line["bench"], "overhead");
    has_keys(
        line,
        &[
            "pipeline",
            "connections",
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
        ],
    );
    for l in &lines {
        for key in ["plain_ops_per_s", "baton_ops_per_s", "replicated_ops_per_s"] {
            assert!(l[key].as_f64().unwrap() > 0.0, "{key}: {l}");
        }
        assert_eq!(l["replicated_client_errors"], 0.0, "{l}");
    }
}

/// The failover benchmark end to end at a small size. Beyond the keys, it
/// holds baton to what failover promises: the primary's host crashed, no
/// client connection is reset and none fails or goes without a reply.
#[test]
fn failover_runs_and_baton_loses_no_connection() {
    let _deadline = baton_lab::Deadline::start(
        "failover_runs_and_baton_loses_no_connection",
        std::time::Duration::from_secs(300),
    );
    if !keepalived_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("baton-bench-failover-{}", std::process::id()));
    let out = baton(
        &[
            "bench",
            "failover",
            "--json",
            "--connections",
            "20",
            "--out",
            &dir.to_string_lossy(),
        ],
        Duration::from_secs(150),
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "one line per system: {out}");
    for line in &lines {
        assert_eq!(line["bench"], "failover");
        assert_eq!(line["mode"], "unicast");
        assert_eq!(line["connections"], 20);
        has_keys(
            line,
            &[
                "system",
                "client_errors",
                "resets",
                "keys_lost",
                "stall_ms_p50",
                "stall_ms_p99",
                "stall_ms_max",
                "detect_ms",
                "takeover_ms",
            ],
        );
    }
    let find = |name: &str| {
        lines
            .iter()
            .find(|l| l["system"] == name)
            .unwrap_or_else(|| panic!("no {name} line: {out}"))
    };
    let baton_line = find("baton");
    find("keepalived");
    assert_eq!(baton_line["resets"], 0.0, "{baton_line}");
    assert_eq!(baton_line["client_errors"], 0.0, "{baton_line}");
    assert_eq!(baton_line["keys_lost"], 0.0, "{baton_line}");
    for key in ["stall_ms_max", "detect_ms", "takeover_ms"] {
        assert!(baton_line[key].as_f64().is_some(), "{key}: {baton_line}");
    }
    for file in [
        "failover.md",
        "failover_runs.jsonl",
        "failover_ops.png",
        "failover_stall_cdf.png",
    ] {
        let meta = std::fs::metadata(dir.join(file))
            .unwrap_or_else(|e| panic!("{file} was not written: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
