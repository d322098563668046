//! The node's configuration file (TOML).
//!
//! ```toml
//! node = "node1"                  # this node's name, a key of [peers]
//! interface = "eth0"              # the cluster interface (VIPs go there)
//! state_dir = "/run/baton/node1"  # control socket; one per node
//! # vrid = 51                     # optional: VIPs ride the VRRP virtual MAC
//! # announce_count = 5            # gratuitous ARPs / NAs after taking a VIP
//! # announce_interval_ms = 10     # spacing between them (first one at once)
//! # raft_tick_ms = 10             # the replicated log's clock tick
//! # election_timeout_ms = 50      # a follower campaigns after this long without
//! #                               # a leader (randomised up to twice that)
//! key_file = "/etc/baton/node1.key"             # this node's private key (mode 600)
//! cluster_key_file = "/etc/baton/cluster.key"   # the cluster's shared key (mode 600)
//!
//! [peers]                         # every node, this one included
//! node1 = "198.18.1.1:7700"
//! node2 = "198.18.1.2:7700"
//!
//! [public_keys]                   # every node's public key (`baton key node` prints it)
//! node1 = "5d0c...64 hex digits"
//! node2 = "a817...64 hex digits"
//!
//! [[services]]
//! name = "kv"
//! kind = "kv"                     # kv or echo
//! vip = "198.18.100.1/16"         # address/prefix, IPv4 or IPv6
//! ports = [6379]
//! preferred_node = "node1"        # where it runs at start (replicated: leads at start)
//! # replicated = true             # every node keeps a hot clone from the log
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use baton_core::relocation::Vip;
use serde::Deserialize;

/// The shortest lease the timing may leave a primary (see
/// [`crate::raft::GroupConfig::lease`]).
const MIN_LEASE_MS: u64 = 5;

/// A configuration error: the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

/// The node's configuration, checked.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: String,
    pub interface: String,
    pub state_dir: PathBuf,
    pub vrid: Option<u8>,
    /// Gratuitous ARP / unsolicited NA burst after taking a VIP.
    pub announce: baton_net::vip::Announce,
    pub peers: BTreeMap<String, SocketAddr>,
    pub services: Vec<ServiceConfig>,
    /// Key files and public keys for the peer connections.
    pub auth: crate::peer::AuthConfig,
    /// The replicated log's tick.
    pub raft_tick: std::time::Duration,
    /// The shortest election timeout (a whole number of ticks).
    pub election_timeout: std::time::Duration,
}

/// One service of the cluster.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub kind: String,
    pub vip: Vip,
    pub preferred_node: String,
    /// Served from the replicated log, with a hot clone on every node.
    pub replicated: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    interface: String,
    state_dir: PathBuf,
    vrid: Option<u8>,
    announce_count: Option<u32>,
    announce_interval_ms: Option<u64>,
    raft_tick_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    key_file: Option<PathBuf>,
    cluster_key_file: Option<PathBuf>,
    peers: BTreeMap<String, String>,
    #[serde(default)]
    public_keys: BTreeMap<String, String>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    kind: String,
    vip: String,
    ports: Vec<u16>,
    preferred_node: String,
    #[serde(default)]
    replicated: bool,
}

impl NodeConfig {
    /// Reads and checks a configuration file. `kinds` are the service kinds
    /// this binary can run.
    pub fn load(path: &Path, kinds: &[&str]) -> Result<NodeConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &text, kinds)
    }

    /// Parses and checks configuration text; `file` names it in errors.
    pub fn parse(file: &str, text: &str, kinds: &[&str]) -> Result<NodeConfig, ConfigError> {
        let err = |key: &str, problem: String| ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            problem,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let problem = e.message().to_owned();
            let key = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                }
                None => "-".into(),
            };
            err(&key, problem)
        })?;
        let mut peers = BTreeMap::new();
        for (name, addr) in &raw.peers {
            let parsed: SocketAddr = addr.parse().map_err(|_| {
                err(
                    &format!("peers.{name}"),
                    format!("expected ADDRESS:PORT, got {addr:?}"),
                )
            })?;
            peers.insert(name.clone(), parsed);
        }
        if !peers.contains_key(&raw.node) {
            return Err(err(
                "node",
                format!("{:?} is not one of [peers] ({})", raw.node, names(&peers)),
            ));
        }
        if raw.interface.is_empty() || raw.interface.len() > 15 {
            return Err(err(
                "interface",
                "expected an interface name of 1 to 15 characters".into(),
            ));
        }
        if raw.vrid == Some(0) {
            return Err(err("vrid", "VRRP router ids are 1 to 255".into()));
        }
        let mut announce = baton_net::vip::Announce::default();
        if let Some(count) = raw.announce_count {
            if !(1..=100).contains(&count) {
                return Err(err("announce_count", "expected 1 to 100".into()));
            }
            announce.count = count;
        }
        if let Some(ms) = raw.announce_interval_ms {
            if ms > 10_000 {
                return Err(err("announce_interval_ms", "expected at most 10000".into()));
            }
            announce.interval = std::time::Duration::from_millis(ms);
        }
        let raft_tick_ms = raw.raft_tick_ms.unwrap_or(10);
        if !(1..=1000).contains(&raft_tick_ms) {
            return Err(err("raft_tick_ms", "expected 1 to 1000".into()));
        }
        let election_timeout_ms = raw.election_timeout_ms.unwrap_or(50);
        // The primary's lease is one tick and the fence allowance shorter
        // than the election timeout: it must leave some.
        let shortest =
            raft_tick_ms + crate::raft::FENCE_ALLOWANCE.as_millis() as u64 + MIN_LEASE_MS;
        let shortest = shortest.max(2 * raft_tick_ms);
        if election_timeout_ms < shortest || election_timeout_ms > 600_000 {
            return Err(err(
                "election_timeout_ms",
                format!(
                    "expected at least {shortest} ms (two ticks, and a tick plus {} ms for the primary's lease) and at most 600000",
                    crate::raft::FENCE_ALLOWANCE.as_millis() as u64 + MIN_LEASE_MS
                ),
            ));
        }
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let key = |field: &str| format!("services[{i}].{field}");
            if s.name.is_empty() || services.iter().any(|o| o.name == s.name) {
                return Err(err(
                    &key("name"),
                    format!("{:?} is empty or used twice", s.name),
                ));
            }
            if !kinds.contains(&s.kind.as_str()) {
                return Err(err(
                    &key("kind"),
                    format!("unknown kind {:?}: use one of {}", s.kind, kinds.join(", ")),
                ));
            }
            let (addr, prefix) = s.vip.split_once('/').ok_or_else(|| {
                err(
                    &key("vip"),
                    format!("expected ADDRESS/PREFIX, got {:?}", s.vip),
                )
            })?;
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| err(&key("vip"), format!("{addr:?} is not an IP address")))?;
            let prefix_len: u8 = prefix
                .parse()
                .map_err(|_| err(&key("vip"), format!("{prefix:?} is not a prefix length")))?;
            if s.ports.is_empty() {
                return Err(err(&key("ports"), "list at least one port".into()));
            }
            let vip = Vip {
                addr,
                prefix_len,
                ports: s.ports,
            };
            vip.validate().map_err(|p| err(&key("vip"), p))?;
            if services.iter().any(|o| {
                o.vip.addr == vip.addr && o.vip.ports.iter().any(|p| vip.ports.contains(p))
            }) {
                return Err(err(
                    &key("ports"),
                    "another service already uses this VIP and port".into(),
                ));
            }
            if !peers.contains_key(&s.preferred_node) {
                return Err(err(
                    &key("preferred_node"),
                    format!(
                        "{:?} is not one of [peers] ({})",
                        s.preferred_node,
                        names(&peers)
                    ),
                ));
            }
            services.push(ServiceConfig {
                name: s.name,
                kind: s.kind,
                vip,
                preferred_node: s.preferred_node,
                replicated: s.replicated,
            });
        }
        let key_file = raw.key_file.ok_or_else(|| {
            err(
                "key_file",
                "missing: name this node's private key file (`baton key node FILE` writes one)"
                    .into(),
            )
        })?;
        let cluster_key_file = raw.cluster_key_file.ok_or_else(|| {
            err(
                "cluster_key_file",
                "missing: name the cluster's key file (`baton key cluster FILE` writes one)".into(),
            )
        })?;
        let mut public_keys = BTreeMap::new();
        for (name, key) in &raw.public_keys {
            if !peers.contains_key(name) {
                return Err(err(
                    &format!("public_keys.{name}"),
                    format!("{name:?} is not one of [peers] ({})", names(&peers)),
                ));
            }
            let parsed: crate::peer::PublicKey = key
                .parse()
                .map_err(|p: String| err(&format!("public_keys.{name}"), p))?;
            public_keys.insert(name.clone(), parsed);
        }
        if let Some(name) = peers.keys().find(|n| !public_keys.contains_key(*n)) {
            return Err(err(
                &format!("public_keys.{name}"),
                "missing: every node of [peers] needs its public key".into(),
            ));
        }
        Ok(NodeConfig {
            node: raw.node,
            interface: raw.interface,
            state_dir: raw.state_dir,
            vrid: raw.vrid,
            announce,
            peers,
            services,
            auth: crate::peer::AuthConfig {
                key_file,
                cluster_key_file,
                public_keys,
            },
            raft_tick: std::time::Duration::from_millis(raft_tick_ms),
            election_timeout: std::time::Duration::from_millis(election_timeout_ms),
        })
    }

    /// The election timeout in ticks, as raft counts it.
    pub fn election_ticks(&self) -> usize {
        (self.election_timeout.as_millis() / self.raft_tick.as_millis().max(1)).max(2) as usize
    }

    /// The control socket of this node.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// This node's peer address.
    pub fn own_addr(&self) -> SocketAddr {
        self.peers[&self.node]
    }
}

fn names(peers: &BTreeMap<String, SocketAddr>) -> String {
    peers.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "node1"
interface = "eth0"
state_dir = "/tmp/x"
key_file = "/tmp/x/node1.key"
cluster_key_file = "/tmp/x/cluster.key"
[peers]
node1 = "198.18.1.1:7700"
node2 = "198.18.1.2:7700"
[public_keys]
node1 = "0101010101010101010101010101010101010101010101010101010101010101"
node2 = "0202020202020202020202020202020202020202020202020202020202020202"
[[services]]
name = "kv"
kind = "kv"
vip = "198.18.100.1/16"
ports = [6379]
preferred_node = "node2"
"#;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse("node.toml", text, &["kv", "echo"])
    }

    #[test]
    fn a_good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node, "node1");
        assert_eq!(c.services[0].vip.ports, vec![6379]);
        assert_eq!(c.own_addr(), "198.18.1.1:7700".parse().unwrap());
        assert_eq!(c.election_ticks(), 5);
        assert!(!c.services[0].replicated);
        let long = parse(&GOOD.replace(
            "state_dir",
            "raft_tick_ms = 20\nelection_timeout_ms = 5000\nstate_dir",
        ))
        .unwrap();
        assert_eq!(long.election_ticks(), 250);
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            (
                GOOD.replace("kind = \"kv\"", "kind = \"sql\""),
                "services[0].kind",
            ),
            (
                GOOD.replace("198.18.100.1/16", "198.18.100.1"),
                "services[0].vip",
            ),
            (
                GOOD.replace("198.18.100.1/16", "nope/16"),
                "services[0].vip",
            ),
            (
                GOOD.replace("198.18.100.1/16", "198.18.100.1/40"),
                "services[0].vip",
            ),
            (
                GOOD.replace("ports = [6379]", "ports = []"),
                "services[0].ports",
            ),
            (
                GOOD.replace("preferred_node = \"node2\"", "preferred_node = \"node9\""),
                "services[0].preferred_node",
            ),
            (GOOD.replace("node = \"node1\"", "node = \"node7\""), "node"),
            (GOOD.replace("198.18.1.2:7700", "198.18.1.2"), "peers.node2"),
            (
                GOOD.replace("interface = \"eth0\"", "interface = \"eth0\"\ncolour = 3"),
                "line",
            ),
            (
                GOOD.replace("key_file = \"/tmp/x/node1.key\"\n", ""),
                "key_file",
            ),
            (
                GOOD.replace("cluster_key_file = \"/tmp/x/cluster.key\"\n", ""),
                "cluster_key_file",
            ),
            (
                GOOD.replace("node2 = \"0202", "node3 = \"0202"),
                "public_keys.node3",
            ),
            (
                GOOD.replace(
                    "node2 = \"0202020202020202020202020202020202020202020202020202020202020202\"\n",
                    "",
                ),
                "public_keys.node2",
            ),
            (GOOD.replace("\"0202", "\"zz02"), "public_keys.node2"),
            (
                GOOD.replace("state_dir", "election_timeout_ms = 5\nstate_dir"),
                "election_timeout_ms",
            ),
            (
                GOOD.replace("state_dir", "raft_tick_ms = 0\nstate_dir"),
                "raft_tick_ms",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("node.toml: "), "{msg}");
            assert!(e.key.starts_with(key), "{key} vs {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }
}
