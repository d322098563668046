//! `baton bench move-conns`: live connections moved between three lab
//! nodes by the move agents, with request/response clients timing every
//! exchange.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use baton_core::relocation::Vip;
use baton_lab::Lab;
use baton_node::echo_host::Ledger;
use baton_node::move_agent::{AgentConfig, MoveAgent};
use baton_node::relocation::MoveConfig;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stats::{ms, percentile};

/// `baton bench move-conns`: prints the result; exit status 1 if any
/// client saw an error or a reset.
pub fn run(
    connections: usize,
    moves: usize,
    request_bytes: usize,
    ipv6: bool,
    json: bool,
) -> Result<i32> {
    let result = move_conns(connections, moves, request_bytes.max(1), ipv6)?;
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
) -> Result<MoveConnsResult> {
    const SERVICE_PORT: u16 = 7000;
    const MOVE_PORT: u16 = 7700;
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    let lab = Lab::create(&Lab::unique_name("bmc"), 3, 1)?;
    let (v4, v6) = Lab::vip(1);
    let vip = Vip {
        addr: if ipv6 { IpAddr::V6(v6) } else { IpAddr::V4(v4) },
        prefix_len: if ipv6 { 64 } else { 16 },
        ports: vec![SERVICE_PORT],
    };
    let ledger = Arc::new(Ledger::default());
    let agents = (1..=3)
        .map(|i| {
            let host = lab.host(&format!("node{i}"))?;
            MoveAgent::start(
                AgentConfig {
                    netns: host.netns_path(),
                    node_addr: host.addr(ipv6),
                    move_port: MOVE_PORT,
                    service_port: SERVICE_PORT,
                    moves: MoveConfig::new("eth0"),
                    initial_vip: (i == 1).then(|| vip.clone()),
                },
                ledger.clone(),
            )
            .map_err(|e| anyhow!("starting the agent on node{i}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let before = lab.tcp_counters("client1")?;

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
        let target = SocketAddr::new(vip.addr, SERVICE_PORT);
        lab.spawn_in("client1", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            rt.block_on(run_clients(
                target,
                connections,
                request_bytes,
                stop,
                totals,
                ready_tx,
            ));
        })?
    };
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("clients did not connect")?;

    let mut freezes = Vec::new();
    let mut windows = Vec::new();
    let mut errors = 0u64;
    let mut at = 0usize;
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..moves {
        let next = (at + 1) % agents.len();
        let started = Instant::now();
        match agents[at].move_to(agents[next].move_addr, &vip) {
            Ok(report) => {
                if report.connections != connections {
                    errors += 1;
                    tracing::error!(
                        moved = report.connections,
                        connections,
                        "not every connection moved"
                    );
                }
                freezes.push(ms(report.freeze));
                windows.push((started, Instant::now()));
                at = next;
            }
            Err(e) => {
                errors += 1;
                tracing::error!(error = %e, "move failed");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    clients
        .join()
        .map_err(|_| anyhow!("client thread panicked"))?
        .map_err(|e| anyhow!("{e}"))?;
    let after = lab.tcp_counters("client1")?;
    drop(agents);

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
                tokio::time::sleep(Duration::from_millis(10)).await;
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
