//! `baton bench move-conns`: live connections moved between three
//! `baton node` processes in a lab (the echo service, moved with `ctl
//! move` round the nodes), with request/response clients timing every
//! exchange and checking every reply byte.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use baton_lab::cluster::{Cluster, ServiceSpec};
use baton_lab::Lab;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stats::{ms, percentile};

/// `baton bench move-conns`: prints the result; exit status 1 if any
/// client saw an error or a reset.
pub fn run(
    connections: usize,
    moves: usize,
    request_bytes: usize,
    ipv6: bool,
    think: Duration,
    json: bool,
    node_logs: Option<PathBuf>,
) -> Result<i32> {
    let result = move_conns(
        connections,
        moves,
        request_bytes.max(1),
        ipv6,
        think,
        node_logs.as_deref(),
    )?;
    if json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{} connections, {} moves: freeze p50 {:.1} ms, max {:.1} ms; client stall p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} bytes verified, {} resets, {} errors",
            result.connections,
            result.moves,
            result.freeze_ms_p50,
            result.freeze_ms_max,
            result.client_stall_ms_p50,
            result.client_stall_ms_p99,
            result.client_stall_ms_max,
            result.bytes_verified,
            result.resets,
            result.errors
        );
    }
    Ok(if result.errors == 0 && result.resets == 0 {
        0
    } else {
        1
    })
}

#[derive(Serialize)]
struct MoveConnsResult {
    connections: usize,
    moves: usize,
    think_ms: u64,
    freeze_ms_p50: f64,
    freeze_ms_max: f64,
    client_stall_ms_p50: f64,
    client_stall_ms_p99: f64,
    client_stall_ms_max: f64,
    bytes_verified: u64,
    resets: u64,
    errors: u64,
}

/// One request: when it was sent and when its reply was complete.
type Exchange = (Instant, Instant);

struct ClientTotals {
    exchanges: Vec<Exchange>,
    bytes_verified: u64,
    errors: u64,
}

fn move_conns(
    connections: usize,
    moves: usize,
    request_bytes: usize,
    ipv6: bool,
    think: Duration,
    node_logs: Option<&Path>,
) -> Result<MoveConnsResult> {
    const SERVICE: &str = "echo";
    const SERVICE_PORT: u16 = 7000;
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    // The clients' descriptors, and the nodes' (they inherit the limit).
    let wanted = connections as u64 + 256;
    let limit = baton_net::raise_fd_limit(wanted).context("raising the open-file limit")?;
    if limit < wanted {
        bail!("{connections} connections need {wanted} open files; the hard limit allows {limit} (raise it with `ulimit -Hn`)");
    }
    let lab = Lab::create(&Lab::unique_name("bmc"), 3, 1)?;
    let (v4, v6) = Lab::vip(1);
    let (addr, prefix_len) = if ipv6 {
        (IpAddr::V6(v6), 64)
    } else {
        (IpAddr::V4(v4), 16)
    };
    let bin = std::env::current_exe().context("locating the baton binary")?;
    let cluster = Cluster::start(
        lab,
        &bin,
        &[ServiceSpec {
            name: SERVICE.into(),
            kind: "echo".into(),
            vip: addr,
            prefix_len,
            ports: vec![SERVICE_PORT],
            preferred_node: "node1".into(),
            replicated: false,
        }],
    )?;
    let serving = Instant::now();
    while cluster.running_on("node1", SERVICE).as_deref() != Some("node1") {
        if serving.elapsed() > Duration::from_secs(10) {
            bail!("the echo service did not start on node1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = cluster.lab.tcp_counters("client1")?;

    // Clients: one tokio task per connection, request/response in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Mutex::new(ClientTotals {
        exchanges: Vec::new(),
        bytes_verified: 0,
        errors: 0,
    }));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let clients = {
        let stop = stop.clone();
        let totals = totals.clone();
        let target = SocketAddr::new(addr, SERVICE_PORT);
        cluster.lab.spawn_in("client1", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            rt.block_on(run_clients(
                target,
                connections,
                request_bytes,
                think,
                stop,
                totals,
                ready_tx,
            ));
        })?
    };
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .context("clients did not connect")?;

    let nodes = ["node1", "node2", "node3"];
    let mut freezes = Vec::new();
    let mut windows = Vec::new();
    let mut errors = 0u64;
    let mut at = 0usize;
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..moves {
        let next = (at + 1) % nodes.len();
        let started = Instant::now();
        let answer = cluster.request(
            nodes[at],
            &json!({"op": "move", "service": SERVICE, "to": nodes[next]}),
        );
        let ended = Instant::now();
        match answer {
            Ok(a) if a["result"] == "moved" => {
                let moved = a["connections"].as_u64().unwrap_or(0);
                if moved != connections as u64 {
                    errors += 1;
                    tracing::error!(moved, connections, "not every connection moved");
                }
                freezes.push(a["freeze_ms"].as_f64().unwrap_or(f64::NAN));
                windows.push((started, ended));
                at = next;
            }
            Ok(a) => {
                errors += 1;
                tracing::error!(answer = %a, "move refused");
            }
            Err(e) => {
                errors += 1;
                tracing::error!(error = %e, "move request failed");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    clients
        .join()
        .map_err(|_| anyhow!("client thread panicked"))?
        .map_err(|e| anyhow!("{e}"))?;
    let after = cluster.lab.tcp_counters("client1")?;
    if let Some(dir) = node_logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for node in nodes {
            let path = dir.join(format!("{node}.log"));
            std::fs::write(&path, cluster.node_log(node))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    drop(cluster);

    let totals = Arc::try_unwrap(totals)
        .map_err(|_| anyhow!("client totals still shared"))?
        .into_inner()
        .map_err(|_| anyhow!("client totals poisoned"))?;
    let mut stalls: Vec<f64> = totals
        .exchanges
        .iter()
        .filter(|(sent, done)| windows.iter().any(|(ws, we)| sent < we && done > ws))
        .map(|(sent, done)| ms(done.duration_since(*sent)))
        .collect();
    stalls.sort_by(f64::total_cmp);
    freezes.sort_by(f64::total_cmp);
    Ok(MoveConnsResult {
        connections,
        moves,
        think_ms: think.as_millis() as u64,
        freeze_ms_p50: percentile(&freezes, 50.0),
        freeze_ms_max: freezes.last().copied().unwrap_or(0.0),
        client_stall_ms_p50: percentile(&stalls, 50.0),
        client_stall_ms_p99: percentile(&stalls, 99.0),
        client_stall_ms_max: stalls.last().copied().unwrap_or(0.0),
        bytes_verified: totals.bytes_verified,
        resets: after.resets_since(&before),
        errors: errors + totals.errors,
    })
}

async fn run_clients(
    target: SocketAddr,
    connections: usize,
    request_bytes: usize,
    think: Duration,
    stop: Arc<AtomicBool>,
    totals: Arc<Mutex<ClientTotals>>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(target),
        )
        .await
        {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                streams.push(s);
            }
            _ => totals.lock().expect("totals").errors += 1,
        }
    }
    let _ = ready.send(());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut exchanges = Vec::new();
            let mut verified = 0u64;
            let mut request = vec![0u8; request_bytes];
            let mut reply = vec![0u8; request_bytes];
            let mut counter = i as u64;
            while !stop.load(Ordering::Relaxed) {
                // Distinct bytes per connection and request.
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                for (j, b) in request.iter_mut().enumerate() {
                    *b = (counter >> ((j % 8) * 8)) as u8 ^ j as u8;
                }
                let sent = Instant::now();
                let exchange = async {
                    stream.write_all(&request).await?;
                    stream.read_exact(&mut reply).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                    Ok(Ok(())) if reply == request => {
                        exchanges.push((sent, Instant::now()));
                        verified += request_bytes as u64;
                    }
                    _ => return (exchanges, verified, 1u64),
                }
                tokio::time::sleep(think).await;
            }
            let _ = stream.shutdown().await;
            let mut rest = Vec::new();
            let clean = matches!(
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await,
                Ok(Ok(0))
            );
            (exchanges, verified, u64::from(!clean))
        });
    }
    while let Some(done) = tasks.join_next().await {
        let mut t = totals.lock().expect("totals");
        match done {
            Ok((exchanges, verified, errors)) => {
                t.exchanges.extend(exchanges);
                t.bytes_verified += verified;
                t.errors += errors;
            }
            Err(_) => t.errors += 1,
        }
    }
}
