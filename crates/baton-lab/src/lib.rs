//! Virtual clusters on one Linux machine, for baton's tests, demo and
//! benchmarks.
//!
//! A lab is a switch namespace holding a Linux bridge, plus one network
//! namespace per host (`node1..nodeN`, `client1..clientM`), each with `lo`
//! and an `eth0` veth whose other end is a port of the bridge. Every
//! namespace and switch-side interface is prefixed with the lab's name, so
//! labs coexist; every link is created inside the lab's own namespaces, so
//! the root namespace's network never changes.
//!
//! Addressing (the same in every lab, since labs never share a segment):
//!
//! | host      | IPv4            | IPv6                  |
//! |-----------|-----------------|-----------------------|
//! | `nodeI`   | `198.18.1.I/16` | `fd00:198:18::1:I/64` |
//! | `clientJ` | `198.18.2.J/16` | `fd00:198:18::2:J/64` |
//! | VIPs      | `198.18.100.0/24` | `fd00:198:18::100:0/112` (kept free) |
//!
//! I and J are written in decimal in both families (`node12` is
//! `198.18.1.12` and `fd00:198:18::1:12`).

pub mod cluster;
mod deadline;
mod host;
mod shell;
mod watch;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use serde::Serialize;

pub use baton_net::counters::TcpCounters;
pub use deadline::Deadline;
pub use host::{Host, Role};
use shell::{ip, ip_json, nft};
pub use watch::{sender_runs, speakers_overlap, SenderRun, SenderWatch, SentFrame};

/// Largest number of nodes or clients in one lab.
pub const MAX_HOSTS_PER_ROLE: u32 = 200;
/// Longest lab name: the switch-side port `NAME-cNNN` must fit the kernel's
/// 15-character interface names.
pub const MAX_NAME_LEN: usize = 10;

/// Errors of lab operations; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run it as root")]
    NotRoot,
    #[error("the `ip` command was not found: install iproute2 (apt-get install iproute2)")]
    NoIpTool,
    #[error("the `{tool}` command was not found: install {package} (apt-get install {package}, or run scripts/setup.sh)")]
    NoTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{0} is a client: only a node can be partitioned from its peers (isolate cuts any host off)")]
    NotANode(String),
    #[error("sender watch: {0}")]
    Watch(String),
    #[error("lab name {0:?} is invalid: use 1 to {MAX_NAME_LEN} characters a-z, 0-9, starting with a letter")]
    BadName(String),
    #[error("lab {0:?} already exists: pick another --name, or remove it with `baton lab down --name {0}`")]
    InUse(String),
    #[error("lab {0:?} does not exist: create it with `baton lab up --name {0}`")]
    NotFound(String),
    #[error("lab {lab:?} has no host {host:?} (hosts: {known})")]
    NoHost {
        lab: String,
        host: String,
        known: String,
    },
    #[error("a lab needs 1 to {MAX_HOSTS_PER_ROLE} nodes and 0 to {MAX_HOSTS_PER_ROLE} clients")]
    BadSize,
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error(transparent)]
    Netns(#[from] baton_net::netns::NetnsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A fault the lab can inject on a host's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The host reaches no other host and none reaches it; its link stays
    /// up and its processes keep running (a partition, as a failed switch
    /// port would make).
    Isolate,
    /// The node exchanges no frame at all (unicast, broadcast, multicast,
    /// ARP/ND) with the other nodes, while it still reaches and is reached
    /// by the clients: its peers lose it, its clients do not (the case a
    /// fence must handle, since the node goes on serving).
    Partition,
    /// Undo [`Fault::Isolate`] and [`Fault::Partition`]; a no-op on a host
    /// that has neither.
    Heal,
    /// The host's cable is pulled: it sees its carrier go down.
    LinkDown,
    /// The cable is plugged back in.
    LinkUp,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "isolate" => Ok(Fault::Isolate),
            "partition" => Ok(Fault::Partition),
            "heal" => Ok(Fault::Heal),
            "link-down" => Ok(Fault::LinkDown),
            "link-up" => Ok(Fault::LinkUp),
            other => Err(format!(
                "unknown fault {other:?}: use isolate, partition, heal, link-down or link-up"
            )),
        }
    }
}

/// One running lab. Dropping it removes the lab (processes it spawned,
/// namespaces, links), also when a test panics, unless [`Lab::keep`] was
/// called.
#[derive(Debug)]
pub struct Lab {
    name: String,
    hosts: Vec<Host>,
    children: Mutex<Vec<Child>>,
    keep: bool,
}

/// What `baton lab status --json` prints: stable, documented in the README.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub hosts: Vec<HostStatus>,
}

/// One host in [`LabStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub role: Role,
    pub netns: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Other global addresses on the host (VIPs it holds).
    pub extra_addresses: Vec<String>,
    /// `up`, `down` (link-down or crashed), `isolated`, `partitioned` or
    /// `missing`.
    pub link: String,
    pub processes: Vec<ProcessStatus>,
}

/// A process running inside a host's namespace.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub command: String,
}

fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::BadName(name.to_owned()))
    }
}

/// Checks what every lab operation needs: root capabilities and `ip`.
pub fn check_requirements() -> Result<(), LabError> {
    if !baton_net::netns::has_admin_capabilities() {
        return Err(LabError::NotRoot);
    }
    if !shell::on_path("ip") {
        return Err(LabError::NoIpTool);
    }
    Ok(())
}

fn switch_netns(lab: &str) -> String {
    format!("{lab}-sw")
}

fn bridge_name(lab: &str) -> String {
    format!("{lab}-br")
}

/// The nftables table (bridge family) of a lab's switch: ours alone, so
/// that partitions touch nothing else in the switch namespace.
const NFT_TABLE: &str = "baton_lab";

/// The chain of the partition of `host`: one base chain per partitioned
/// host, so that hosts are partitioned and healed independently.
fn partition_chain(host: &str) -> String {
    format!("partition_{host}")
}

/// Names of every network namespace on the machine.
fn all_netns() -> Result<Vec<String>, LabError> {
    let dir = match std::fs::read_dir(baton_net::netns::NETNS_RUN_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The namespaces that belong to lab `lab`: its switch and its hosts.
fn lab_netns(lab: &str) -> Result<Vec<String>, LabError> {
    Ok(all_netns()?
        .into_iter()
        .filter(|ns| {
            ns.strip_prefix(lab)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|rest| rest == "sw" || Host::parse_name(rest).is_some())
        })
        .collect())
}

/// Names of the labs present on this machine.
pub fn list() -> Result<Vec<String>, LabError> {
    Ok(all_netns()?
        .into_iter()
        .filter_map(|ns| ns.strip_suffix("-sw").map(str::to_owned))
        .filter(|lab| check_name(lab).is_ok())
        .collect())
}

/// Removes lab `name`: every process in its hosts, its namespaces and with
/// them its links. Safe to run twice; removing an absent lab is not an error.
pub fn down(name: &str) -> Result<(), LabError> {
    check_name(name)?;
    check_requirements()?;
    let namespaces = lab_netns(name)?;
    // The switch too: a sender watch captures there.
    for ns in &namespaces {
        kill_all_in(ns);
    }
    let _ = std::fs::remove_dir_all(state_root(name));
    let mut first_error = None;
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "delete", ns]) {
            if baton_net::netns::named_path(ns).exists() {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Where the hosts of lab `name` keep files (sockets, logs, configs).
fn state_root(name: &str) -> PathBuf {
    std::env::temp_dir().join("baton-lab").join(name)
}

/// SIGKILLs every process whose network namespace is `ns`, except this one.
fn kill_all_in(ns: &str) {
    for pid in baton_net::netns::pids_in(&baton_net::netns::named_path(ns)) {
        if pid != std::process::id() {
            baton_net::netns::kill(pid);
        }
    }
}

static NAME_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// A lab name unique to this process and call, for tests running side
    /// by side: `prefix` (at most 3 letters) + pid + counter, in base 36.
    pub fn unique_name(prefix: &str) -> String {
        let n = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = prefix.chars().take(3).collect::<String>();
        name.push_str(&base36(std::process::id()));
        name.push_str(&base36(n));
        name.truncate(MAX_NAME_LEN);
        name
    }

    /// Creates lab `name` with `nodes` nodes and `clients` clients. On any
    /// error, whatever was made is removed again.
    pub fn create(name: &str, nodes: u32, clients: u32) -> Result<Lab, LabError> {
        check_name(name)?;
        check_requirements()?;
        if !(1..=MAX_HOSTS_PER_ROLE).contains(&nodes) || clients > MAX_HOSTS_PER_ROLE {
            return Err(LabError::BadSize);
        }
        if !lab_netns(name)?.is_empty() {
            return Err(LabError::InUse(name.to_owned()));
        }
        let hosts: Vec<Host> = (1..=nodes)
            .map(|i| Host::new(name, Role::Node, i))
            .chain((1..=clients).map(|j| Host::new(name, Role::Client, j)))
            .collect();
        let lab = Lab {
            name: name.to_owned(),
            hosts,
            children: Mutex::new(Vec::new()),
            keep: false,
        };
        deadline::lab_created(name);
        // On error `lab` is dropped here, which removes what was made.
        lab.build()?;
        Ok(lab)
    }

    /// Opens a lab that already exists (made by `baton lab up`). Dropping
    /// the handle leaves the lab in place.
    pub fn open(name: &str) -> Result<Lab, LabError> {
        check_name(name)?;
        check_requirements()?;
        let namespaces = lab_netns(name)?;
        if !namespaces.iter().any(|ns| *ns == switch_netns(name)) {
            return Err(LabError::NotFound(name.to_owned()));
        }
        let mut hosts: Vec<Host> = namespaces
            .iter()
            .filter_map(|ns| ns.strip_prefix(name)?.strip_prefix('-'))
            .filter_map(Host::parse_name)
            .map(|(role, index)| Host::new(name, role, index))
            .collect();
        hosts.sort_by_key(|h| (h.role, h.index));
        Ok(Lab {
            name: name.to_owned(),
            hosts,
            children: Mutex::new(Vec::new()),
            keep: true,
        })
    }

    fn build(&self) -> Result<(), LabError> {
        let sw = switch_netns(&self.name);
        let br = bridge_name(&self.name);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            &br,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            // Ports forward as soon as they join (no STP in a lab).
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", &br, "up"])?;
        for host in &self.hosts {
            ip(&["netns", "add", &host.netns])?;
            ip(&[
                "-n",
                &sw,
                "link",
                "add",
                &host.port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ])?;
            ip(&["-n", &sw, "link", "set", &host.port, "master", &br, "up"])?;
            // IPv6 addresses usable at once: no duplicate address detection
            // in the lab (also for VIPs added later).
            let path = baton_net::netns::named_path(&host.netns);
            baton_net::netns::run_in(&path, || -> std::io::Result<()> {
                for key in ["all", "default", "eth0"] {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/accept_dad"), "0")?;
                }
                Ok(())
            })??;
            ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/16", host.ipv4),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/64", host.ipv6),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// Leaves the lab in place when this handle is dropped.
    pub fn keep(mut self) {
        self.keep_running();
    }

    /// Leaves the lab, and the processes started in it, running when this
    /// handle is dropped.
    pub fn keep_running(&mut self) {
        self.keep = true;
        deadline::lab_gone(&self.name);
        // Forget the children: they go on, `baton lab down` ends them.
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `name` (`node1`, `client2`, ...).
    pub fn host(&self, name: &str) -> Result<&Host, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::NoHost {
                lab: self.name.clone(),
                host: name.to_owned(),
                known: self
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The `i`th VIP of the lab's VIP range (i from 1): IPv4 and IPv6.
    pub fn vip(i: u8) -> (Ipv4Addr, Ipv6Addr) {
        (
            Ipv4Addr::new(198, 18, 100, i),
            Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0x100, u16::from(i)),
        )
    }

    /// A command that runs `program` inside `host`.
    pub fn command(&self, host: &str, program: &str) -> Result<Command, LabError> {
        Ok(baton_net::netns::command_in(
            &self.host(host)?.netns,
            program,
        ))
    }

    /// Runs a command inside `host` to completion, inheriting stdio, and
    /// returns its exit status.
    pub fn exec(&self, host: &str, argv: &[String]) -> Result<ExitStatus, LabError> {
        let (program, args) = argv.split_first().ok_or_else(|| LabError::Command {
            command: "lab exec".into(),
            detail: "no command given".into(),
        })?;
        Ok(self.command(host, program)?.args(args).status()?)
    }

    /// Starts a background process made with [`Lab::command`] (so it runs
    /// inside its host). It is killed (by its pid) when the lab is dropped,
    /// unless it has exited before.
    pub fn spawn(&self, mut command: Command) -> Result<u32, LabError> {
        let child = command.stdin(Stdio::null()).spawn()?;
        let pid = child.id();
        self.children.lock().expect("lab children lock").push(child);
        Ok(pid)
    }

    /// Stops a process started with [`Lab::spawn`]: SIGTERM, then SIGKILL if
    /// it is still running after `grace`. Returns its exit status.
    pub fn stop(&self, pid: u32, grace: std::time::Duration) -> Option<ExitStatus> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let child = children.iter_mut().find(|c| c.id() == pid)?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        baton_net::netns::terminate(pid);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Whether a process started with [`Lab::spawn`] has exited (or is not
    /// one of the lab's).
    pub(crate) fn has_exited(&self, pid: u32) -> bool {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Kills a process started with [`Lab::spawn`] at once (SIGKILL, as
    /// `kill -9`) and reaps it. Returns its exit status.
    pub fn kill(&self, pid: u32) -> Option<ExitStatus> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let child = children.iter_mut().find(|c| c.id() == pid)?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Runs `f` on a thread inside `host`'s namespace and returns its result.
    pub fn run_in<T, F>(&self, host: &str, f: F) -> Result<T, LabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        Ok(baton_net::netns::run_in(&self.host(host)?.netns_path(), f)?)
    }

    /// Starts `f` on a thread inside `host`'s namespace; the caller joins it.
    pub fn spawn_in<T, F>(
        &self,
        host: &str,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<T, baton_net::netns::NetnsError>>, LabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        Ok(baton_net::netns::spawn_in(
            &self.host(host)?.netns_path(),
            f,
        ))
    }

    /// The TCP counters of `host`'s stack (resets, aborts).
    pub fn tcp_counters(&self, host: &str) -> Result<TcpCounters, LabError> {
        self.run_in(host, TcpCounters::read_current)?
            .map_err(LabError::Io)
    }

    /// Injects a link fault on `host`.
    pub fn fault(&self, host: &str, fault: Fault) -> Result<(), LabError> {
        let host = self.host(host)?;
        let sw = switch_netns(&self.name);
        let br = bridge_name(&self.name);
        match fault {
            Fault::Isolate => ip(&["-n", &sw, "link", "set", &host.port, "nomaster"]),
            Fault::Partition => self.partition(host),
            Fault::Heal => {
                ip(&["-n", &sw, "link", "set", &host.port, "master", &br])?;
                if self.partitioned()?.contains(&host.name) {
                    let chain = partition_chain(&host.name);
                    let t = NFT_TABLE;
                    // Flushed first, in the same transaction: the delete
                    // then never depends on the kernel dropping a chain's
                    // rules with it.
                    let script = format!(
                        "flush chain bridge {t} {chain}\ndelete chain bridge {t} {chain}\n"
                    );
                    nft(&sw, &["-f", "-"], &script)?;
                }
                self.forget_failed_neighbours(host);
                Ok(())
            }
            Fault::LinkDown => ip(&["-n", &sw, "link", "set", &host.port, "down"]),
            Fault::LinkUp => {
                ip(&["-n", &sw, "link", "set", &host.port, "up"])?;
                self.forget_failed_neighbours(host);
                Ok(())
            }
        }
    }

    /// Drops, in the switch's forward hook, every frame between `host`'s
    /// port and the other nodes' ports, both ways. The forward hook runs
    /// once per output port, for flooded frames too, so broadcasts and
    /// multicasts still reach the clients. Idempotent.
    fn partition(&self, host: &Host) -> Result<(), LabError> {
        if host.role != Role::Node {
            return Err(LabError::NotANode(host.name.clone()));
        }
        let peers: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.role == Role::Node && h.name != host.name)
            .map(|h| format!("\"{}\"", h.port))
            .collect();
        let (t, chain, port) = (NFT_TABLE, partition_chain(&host.name), &host.port);
        let mut script = format!(
            "add table bridge {t}\n\
             add chain bridge {t} {chain} {{ type filter hook forward priority 0; policy accept; }}\n\
             flush chain bridge {t} {chain}\n"
        );
        if !peers.is_empty() {
            let peers = peers.join(", ");
            script.push_str(&format!(
                "add rule bridge {t} {chain} iifname \"{port}\" oifname {{ {peers} }} drop\n\
                 add rule bridge {t} {chain} oifname \"{port}\" iifname {{ {peers} }} drop\n"
            ));
        }
        nft(&switch_netns(&self.name), &["-f", "-"], &script).map(drop)
    }

    /// Names of the hosts partitioned now (none where `nft` is missing:
    /// then nothing can have partitioned them).
    fn partitioned(&self) -> Result<std::collections::BTreeSet<String>, LabError> {
        if !shell::on_path("nft") {
            return Ok(Default::default());
        }
        let sw = switch_netns(&self.name);
        let out = nft(&sw, &["-j", "list", "chains", "bridge"], "")?;
        let listing: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| LabError::Command {
                command: format!("nft -j list chains bridge (in {sw})"),
                detail: format!("unreadable JSON: {e}"),
            })?;
        let prefix = partition_chain("");
        Ok(listing
            .get("nftables")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("chain"))
            .filter(|c| c.get("table").and_then(|t| t.as_str()) == Some(NFT_TABLE))
            .filter_map(|c| c.get("name")?.as_str()?.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect())
    }

    /// After a heal: neighbour entries that failed (or are still being
    /// resolved, retried only every second) while `host` was cut off are
    /// dropped on both sides, so the next packet resolves at once, as after
    /// a link comes back on a real segment whose hosts announce themselves.
    fn forget_failed_neighbours(&self, host: &Host) {
        let _ = ip(&["-n", &host.netns, "neigh", "flush", "dev", "eth0"]);
        for other in self.hosts.iter().filter(|h| h.name != host.name) {
            for addr in [host.ipv4.to_string(), host.ipv6.to_string()] {
                let _ = ip(&["-n", &other.netns, "neigh", "del", &addr, "dev", "eth0"]);
            }
        }
    }

    /// Power loss of `host`, in the order that lets nothing escape: its
    /// link goes down first, then every process in it is killed, then its
    /// TCP sockets, its packet filter and its extra addresses (VIPs) are
    /// cleared, as a reboot would. (Killed first, its kernel would send the FINs and RSTs of the
    /// dead processes' sockets; and orphaned sockets or a VIP left behind
    /// would speak again on link-up.) `fault(host, LinkUp)` brings the
    /// link back, to a host with its own addresses only.
    pub fn crash(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        self.fault(host, Fault::LinkDown)?;
        kill_all_in(&h.netns);
        // SOCK_DESTROY of every TCP socket, orphans and TIME_WAIT included;
        // the link is down, so any RST it sends goes nowhere.
        let ss = baton_net::netns::command_in(&h.netns, "ss")
            .args(["-K", "-t", "-a"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if let Err(e) = ss {
            tracing::warn!(host, error = %e, "clearing a crashed host's sockets");
        }
        // A reboot starts with an empty packet filter: the killed
        // processes' rules (a capture queue nobody reads drops every
        // segment to the VIP) must not outlive them.
        for tool in ["iptables", "ip6tables"] {
            for table in ["raw", "mangle", "nat", "filter"] {
                for op in ["-F", "-X"] {
                    let status = baton_net::netns::command_in(&h.netns, tool)
                        .args(["-w", "-t", table, op])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                    if !status.is_ok_and(|s| s.success()) {
                        tracing::warn!(
                            host,
                            tool,
                            table,
                            op,
                            "clearing a crashed host's packet filter"
                        );
                    }
                }
            }
        }
        let own = [h.ipv4.to_string(), h.ipv6.to_string()];
        for link in ip_json(&["-n", &h.netns, "addr", "show"])? {
            let Some(dev) = link.get("ifname").and_then(|d| d.as_str()) else {
                continue;
            };
            let infos = link.get("addr_info").and_then(|a| a.as_array());
            for info in infos.into_iter().flatten() {
                let global = info.get("scope").and_then(|s| s.as_str()) == Some("global");
                let local = info.get("local").and_then(|l| l.as_str());
                let prefix = info.get("prefixlen").and_then(|p| p.as_u64());
                if let (true, Some(local), Some(prefix)) = (global, local, prefix) {
                    if !own.iter().any(|o| o == local) {
                        let addr = format!("{local}/{prefix}");
                        ip(&["-n", &h.netns, "addr", "del", &addr, "dev", dev])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Hosts, their addresses, link state and processes, as they are now.
    pub fn status(&self) -> Result<LabStatus, LabError> {
        let sw = switch_netns(&self.name);
        let ports: BTreeMap<String, serde_json::Value> = ip_json(&["-n", &sw, "link", "show"])?
            .into_iter()
            .filter_map(|l| Some((l.get("ifname")?.as_str()?.to_owned(), l)))
            .collect();
        let partitioned = self.partitioned()?;
        let mut hosts = Vec::new();
        for host in &self.hosts {
            let port = ports.get(&host.port);
            let link = match port {
                None => "missing",
                Some(p) if p.get("master").is_none() => "isolated",
                Some(p) => {
                    let up = p
                        .get("flags")
                        .and_then(|f| f.as_array())
                        .is_some_and(|f| f.iter().any(|x| x == "UP"));
                    if !up {
                        "down"
                    } else if partitioned.contains(&host.name) {
                        "partitioned"
                    } else {
                        "up"
                    }
                }
            };
            let addresses = host.read_addresses()?;
            let processes = baton_net::netns::pids_in(&host.netns_path())
                .into_iter()
                .map(|pid| ProcessStatus {
                    pid,
                    command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_default(),
                })
                .collect();
            hosts.push(HostStatus {
                name: host.name.clone(),
                role: host.role,
                netns: host.netns.clone(),
                ipv4: addresses.v4,
                ipv6: addresses.v6,
                extra_addresses: addresses.extra,
                link: link.to_owned(),
                processes,
            });
        }
        Ok(LabStatus {
            name: self.name.clone(),
            hosts,
        })
    }

    /// Path of the per-host state directory (sockets, logs): lab hosts share
    /// the machine's filesystem, so every node needs its own.
    pub fn state_dir(&self, host: &str) -> Result<PathBuf, LabError> {
        let host = self.host(host)?;
        Ok(state_root(&self.name).join(&host.name))
    }

    /// Removes the lab now and reports errors (drop does the same silently).
    pub fn remove(mut self) -> Result<(), LabError> {
        self.keep = true;
        self.kill_children();
        deadline::lab_gone(&self.name);
        down(&self.name)
    }

    fn kill_children(&self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for child in children.iter_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        children.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.kill_children();
        deadline::lab_gone(&self.name);
        if let Err(e) = down(&self.name) {
            tracing::warn!(lab = %self.name, error = %e, "removing the lab failed");
        }
    }
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("lab").is_ok());
        assert!(check_name("a1234567890").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("1ab").is_err());
        assert!(check_name("la-b").is_err());
        assert!(check_name("Lab").is_err());
    }

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let a = Lab::unique_name("t");
        let b = Lab::unique_name("t");
        assert_ne!(a, b);
        assert!(check_name(&a).is_ok(), "{a}");
    }

    #[test]
    fn faults_parse() {
        assert_eq!("isolate".parse::<Fault>(), Ok(Fault::Isolate));
        assert_eq!("partition".parse::<Fault>(), Ok(Fault::Partition));
        assert!("explode".parse::<Fault>().is_err());
    }
}
