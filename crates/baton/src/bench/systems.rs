//! The systems the benchmarks compare, deployed in a lab: the `kv` service
//! under `baton node`, and the same service code as a plain tokio server
//! (`baton serve-standalone`), alone or behind keepalived.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use baton_lab::cluster::{Cluster, ServiceSpec};
use baton_lab::{Lab, Role};
use serde::Serialize;

/// Port of the kv service in every deployment.
pub const KV_PORT: u16 = 6379;
/// VRRP router id of the keepalived baseline.
const VRID: u8 = 51;

/// The VIP of the relocate benchmark (both systems): 198.18.100.2.
pub fn vip() -> Ipv4Addr {
    Lab::vip(2).0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// `baton node`, moved with `baton ctl move`.
    Baton,
    /// Standalone servers on node1 and node2, keepalived moving the VIP.
    Keepalived,
    /// One standalone server (overhead baseline).
    Plain,
    /// `baton node` on three nodes, kv replicated through the log.
    Replicated,
}

impl System {
    /// The lab client host whose connections measure this system.
    pub fn client_host(self) -> &'static str {
        match self {
            System::Baton => "client1",
            System::Keepalived => "client2",
            System::Plain => "client3",
            System::Replicated => "client4",
        }
    }
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Baton => "baton",
            System::Keepalived => "keepalived",
            System::Plain => "plain",
            System::Replicated => "replicated",
        }
    }
}

/// keepalived's configuration for `node` (1: the master, 2: the backup).
pub fn keepalived_conf(node: u32) -> String {
    let (state, priority) = if node == 1 {
        ("MASTER", 200)
    } else {
        ("BACKUP", 100)
    };
    format!(
        "# keepalived.conf of node{node}, written by `baton bench relocate`
global_defs {{
    router_id node{node}
    vrrp_version 3
    # raise to real-time scheduling if ever delayed (keepalived's advice)
    max_auto_priority
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 5
}}

vrrp_instance kv {{
    version 3
    state {state}
    interface eth0
    virtual_router_id {VRID}
    priority {priority}
    # VRRPv3 counts in centiseconds: 0.01 s is the shortest keepalived accepts
    advert_int 0.01
    # gratuitous ARPs at once on becoming master, 5 of them, no second wave
    garp_master_delay 0
    garp_master_repeat 5
    garp_master_refresh 0
    virtual_ipaddress {{
        {vip}/16 dev eth0
    }}
}}
",
        vip = vip()
    )
}

/// The command line keepalived runs with (after `keepalived`), for `dir`.
pub fn keepalived_args(dir: &Path) -> Vec<String> {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    vec![
        "--dont-fork".into(),
        "--log-console".into(),
        "--no-syslog".into(),
        "--vrrp".into(),
        "--use-file".into(),
        p("keepalived.conf"),
        "--pid".into(),
        p("keepalived.pid"),
        "--vrrp_pid".into(),
        p("vrrp.pid"),
        "--checkers_pid".into(),
        p("checkers.pid"),
    ]
}

/// Whether `addr` is a local address of the calling thread's namespace.
fn is_local(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

/// Waits until `addr` is a local address of `host`; the instant it was seen.
pub fn wait_local(lab: &Lab, host: &str, addr: IpAddr, timeout: Duration) -> Result<Instant> {
    lab.run_in(host, move || {
        let deadline = Instant::now() + timeout;
        loop {
            if is_local(addr) {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    })?
    .ok_or_else(|| anyhow!("{addr} did not appear on {host} within {timeout:?}"))
}

/// Watches for `addr` to become local on any of `hosts`, on a thread in
/// each one's namespace (polling every 0.2 ms). `already` tells whether it
/// was local on one of them before the watch began.
pub struct VipWatch {
    /// Each host, and its watching thread.
    threads: Vec<(String, WatchThread)>,
    pub already: bool,
}

/// A thread watching one host: when the address became local there.
type WatchThread = std::thread::JoinHandle<Result<Option<Instant>, baton_net::netns::NetnsError>>;

impl VipWatch {
    pub fn start(lab: &Lab, hosts: &[&str], addr: IpAddr, timeout: Duration) -> Result<VipWatch> {
        // Once one host has it, the others stop looking.
        let seen = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for host in hosts {
            let (tx, seen) = (tx.clone(), seen.clone());
            let thread = lab.spawn_in(host, move || {
                let _ = tx.send(is_local(addr));
                let deadline = Instant::now() + timeout;
                loop {
                    if is_local(addr) {
                        seen.store(true, Ordering::Relaxed);
                        return Some(Instant::now());
                    }
                    if Instant::now() > deadline || seen.load(Ordering::Relaxed) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })?;
            threads.push(((*host).to_owned(), thread));
        }
        let mut already = false;
        for host in hosts {
            already |= rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| anyhow!("the VIP watch on {host} did not start"))?;
        }
        Ok(VipWatch { threads, already })
    }

    /// When the address became local, and where (None: not within the
    /// timeout).
    pub fn wait(self) -> Option<(Instant, String)> {
        self.threads
            .into_iter()
            .filter_map(|(host, t)| Some((t.join().ok()?.ok()??, host)))
            .min()
    }
}

/// Each node's role in the kv service's log (`"primary"`, `"clone"`,
/// `"catching_up"`, ...), as `node`'s `ctl status` reports it: its own and
/// those of the peers that answered.
pub fn kv_roles(cluster: &Cluster, node: &str) -> Result<Vec<(String, String)>> {
    let status = cluster.request(node, &serde_json::json!({"op": "status"}))?;
    let logs = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "kv"))
        .and_then(|s| s["log"].as_array())
        .ok_or_else(|| anyhow!("{node}'s status has no log of kv: {status}"))?;
    Ok(logs
        .iter()
        .filter_map(|l| {
            Some((
                l["node"].as_str()?.to_owned(),
                l["role"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Waits until node1 is kv's primary and every other node a current clone
/// (a hot standby), as node1 sees it.
fn wait_clones(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let nodes = cluster
        .lab
        .hosts()
        .iter()
        .filter(|h| h.role == Role::Node)
        .count();
    let deadline = Instant::now() + timeout;
    loop {
        let roles = kv_roles(cluster, "node1")?;
        let primary = roles.iter().any(|(n, r)| n == "node1" && r == "primary");
        let clones = roles.iter().filter(|(_, r)| r == "clone").count();
        if primary && clones + 1 == nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("kv's clones not ready within {timeout:?}: {roles:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a TCP connect from `host` to `target` succeeds.
pub fn wait_serving(lab: &Lab, host: &str, target: SocketAddr, timeout: Duration) -> Result<()> {
    lab.run_in(host, move || {
        let deadline = Instant::now() + timeout;
        loop {
            match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })?
    .with_context(|| format!("{target} does not answer from {host}"))
}

/// A system running in the lab.
pub enum Deployment<'a> {
    Baton {
        cluster: Box<Cluster>,
    },
    Keepalived {
        lab: &'a Lab,
        servers: Vec<u32>,
        /// keepalived's pid on node1 and node2 (None once stopped).
        keepalived: [Option<u32>; 2],
    },
    Plain {
        lab: &'a Lab,
        server: u32,
    },
}

fn start_standalone(lab: &Lab, bin: &Path, node: &str) -> Result<u32> {
    let dir = lab.state_dir(node)?;
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("standalone.log"))?;
    let mut cmd = lab.command(node, &bin.to_string_lossy())?;
    cmd.args([
        "serve-standalone",
        "--kind",
        "kv",
        "--listen",
        &format!("0.0.0.0:{KV_PORT}"),
    ])
    .stdout(Stdio::null())
    .stderr(log);
    Ok(lab.spawn(cmd)?)
}

/// Where keepalived's files of `node` go.
pub fn keepalived_dir(lab: &Lab, node: &str) -> Result<PathBuf> {
    Ok(lab.state_dir(node)?.join("keepalived"))
}

impl<'a> Deployment<'a> {
    /// `baton node` on every node of the lab, kv at the VIP on node1.
    pub fn baton(lab: &'a Lab, bin: &Path) -> Result<Deployment<'a>> {
        Self::cluster(lab, bin, false)
    }

    /// `baton node` on every node of the lab, kv replicated through the
    /// log, its primary (and the VIP) on node1.
    pub fn replicated(lab: &'a Lab, bin: &Path) -> Result<Deployment<'a>> {
        Self::cluster(lab, bin, true)
    }

    fn cluster(lab: &'a Lab, bin: &Path, replicated: bool) -> Result<Deployment<'a>> {
        let handle = Lab::open(lab.name())?;
        let cluster = Cluster::start(
            handle,
            bin,
            &[ServiceSpec {
                name: "kv".into(),
                kind: "kv".into(),
                vip: IpAddr::V4(vip()),
                prefix_len: 16,
                ports: vec![KV_PORT],
                preferred_node: "node1".into(),
                replicated,
            }],
        )?;
        let d = Deployment::Baton {
            cluster: Box::new(cluster),
        };
        wait_local(lab, "node1", IpAddr::V4(vip()), Duration::from_secs(20))?;
        if replicated {
            if let Deployment::Baton { cluster } = &d {
                wait_clones(cluster, Duration::from_secs(20))?;
            }
        }
        Ok(d)
    }

    /// Deploys `system`.
    pub fn of(system: System, lab: &'a Lab, bin: &Path) -> Result<Deployment<'a>> {
        match system {
            System::Baton => Deployment::baton(lab, bin),
            System::Keepalived => Deployment::keepalived(lab, bin),
            System::Plain => Deployment::plain(lab, bin),
            System::Replicated => Deployment::replicated(lab, bin),
        }
    }

    /// The baton cluster, if this is one.
    pub fn baton_cluster(&self) -> Option<&Cluster> {
        match self {
            Deployment::Baton { cluster } => Some(cluster),
            _ => None,
        }
    }

    /// The standalone kv server on node1 and node2, keepalived on both;
    /// returns once node1 holds the VIP.
    pub fn keepalived(lab: &'a Lab, bin: &Path) -> Result<Deployment<'a>> {
        let mut d = Deployment::Keepalived {
            lab,
            servers: Vec::new(),
            keepalived: [None, None],
        };
        let Deployment::Keepalived {
            servers,
            keepalived,
            ..
        } = &mut d
        else {
            unreachable!()
        };
        for (i, node) in ["node1", "node2"].into_iter().enumerate() {
            servers.push(start_standalone(lab, bin, node)?);
            let dir = keepalived_dir(lab, node)?;
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("keepalived.conf"), keepalived_conf(i as u32 + 1))?;
            let log = std::fs::File::create(dir.join("keepalived.log"))?;
            let mut cmd = lab.command(node, "keepalived")?;
            cmd.args(keepalived_args(&dir))
                .stdout(log.try_clone()?)
                .stderr(log);
            keepalived[i] = Some(
                lab.spawn(cmd)
                    .context("starting keepalived (install it: scripts/setup.sh)")?,
            );
        }
        wait_local(lab, "node1", IpAddr::V4(vip()), Duration::from_secs(20)).map_err(|e| {
            let log = std::fs::read_to_string(
                keepalived_dir(lab, "node1")
                    .map(|d| d.join("keepalived.log"))
                    .unwrap_or_default(),
            )
            .unwrap_or_default();
            anyhow!("{e}; keepalived on node1 said:\n{log}")
        })?;
        Ok(d)
    }

    /// One standalone kv server on node1, at node1's own address.
    pub fn plain(lab: &'a Lab, bin: &Path) -> Result<Deployment<'a>> {
        Ok(Deployment::Plain {
            lab,
            server: start_standalone(lab, bin, "node1")?,
        })
    }

    /// Where clients connect.
    pub fn target(&self) -> SocketAddr {
        match self {
            Deployment::Plain { .. } => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), KV_PORT)
            }
            _ => SocketAddr::new(IpAddr::V4(vip()), KV_PORT),
        }
    }

    /// Moves the service from node1 to node2 as an operator would: `baton
    /// ctl move kv --to node2`, or stopping keepalived on the master.
    /// Returns how long the command took, in ms.
    pub fn switch(&mut self) -> Result<f64> {
        let started = Instant::now();
        match self {
            Deployment::Baton { cluster } => {
                cluster
                    .move_service("node1", "kv", "node2")
                    .map_err(|e| anyhow!("baton ctl move kv --to node2: {e}"))?;
            }
            Deployment::Keepalived {
                lab, keepalived, ..
            } => {
                let pid = keepalived[0]
                    .take()
                    .ok_or_else(|| anyhow!("keepalived on node1 is not running"))?;
                lab.stop(pid, Duration::from_secs(10));
            }
            Deployment::Plain { .. } => bail!("the plain server has nowhere to move"),
        }
        Ok(super::stats::ms(started.elapsed()))
    }

    /// Stops everything it started and removes what it left in the lab
    /// (the VIP, the client's neighbour entries), so the next system
    /// starts from the same state.
    pub fn teardown(self, lab: &Lab) {
        match self {
            Deployment::Baton { cluster } => drop(cluster),
            Deployment::Keepalived {
                lab: l,
                servers,
                keepalived,
            } => {
                for pid in keepalived.into_iter().flatten() {
                    l.stop(pid, Duration::from_secs(10));
                }
                for pid in servers {
                    l.stop(pid, Duration::from_secs(5));
                }
            }
            Deployment::Plain { lab: l, server } => {
                l.stop(server, Duration::from_secs(5));
            }
        }
        for host in lab.hosts().iter().filter(|h| h.role == Role::Node) {
            if let Ok(mut cmd) = lab.command(&host.name, "ip") {
                let _ = cmd
                    .args(["addr", "del", &format!("{}/16", vip()), "dev", "eth0"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for host in lab.hosts().iter().filter(|h| h.name.starts_with("client")) {
            if let Ok(mut cmd) = lab.command(&host.name, "ip") {
                let _ = cmd
                    .args(["neigh", "flush", "all"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
