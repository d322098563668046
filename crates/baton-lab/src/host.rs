//! Hosts of a lab: naming and addressing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::Serialize;

use crate::shell::ip_json;
use crate::LabError;

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    Client,
}

/// Global addresses found on a host.
pub(crate) struct HostAddresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    pub extra: Vec<String>,
}

/// One host of a lab: a network namespace with `lo` and `eth0`.
#[derive(Debug, Clone)]
pub struct Host {
    /// `node1`, `client2`, ...
    pub name: String,
    pub role: Role,
    /// 1-based number within its role.
    pub index: u32,
    /// Name of its network namespace: `LAB-HOST`.
    pub netns: String,
    /// Name of its bridge port in the switch namespace: `LAB-nI` / `LAB-cJ`.
    pub port: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Host {
    pub(crate) fn new(lab: &str, role: Role, index: u32) -> Host {
        let (word, letter, subnet) = match role {
            Role::Node => ("node", 'n', 1u8),
            Role::Client => ("client", 'c', 2u8),
        };
        let name = format!("{word}{index}");
        Host {
            netns: format!("{lab}-{name}"),
            port: format!("{lab}-{letter}{index}"),
            ipv4: Ipv4Addr::new(198, 18, subnet, index as u8),
            ipv6: format!("fd00:198:18::{subnet}:{index}")
                .parse()
                .expect("decimal digits form a valid IPv6 group"),
            name,
            role,
            index,
        }
    }

    /// Parses a host name (`node3`, `client1`) into role and index.
    pub(crate) fn parse_name(name: &str) -> Option<(Role, u32)> {
        let (role, digits) = if let Some(d) = name.strip_prefix("node") {
            (Role::Node, d)
        } else {
            (Role::Client, name.strip_prefix("client")?)
        };
        if digits.starts_with('0') {
            return None;
        }
        let index: u32 = digits.parse().ok()?;
        (1..=crate::MAX_HOSTS_PER_ROLE)
            .contains(&index)
            .then_some((role, index))
    }

    pub fn netns_path(&self) -> PathBuf {
        baton_net::netns::named_path(&self.netns)
    }

    /// The host's address in the given family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    /// Global addresses now on the host: its own IPv4 and IPv6 (if present)
    /// and any others (VIPs).
    pub(crate) fn read_addresses(&self) -> Result<HostAddresses, LabError> {
        let mut v4 = None;
        let mut v6 = None;
        let mut extra = Vec::new();
        for link in ip_json(&["-n", &self.netns, "addr", "show"])? {
            let Some(infos) = link.get("addr_info").and_then(|a| a.as_array()) else {
                continue;
            };
            for info in infos {
                if info.get("scope").and_then(|s| s.as_str()) != Some("global") {
                    continue;
                }
                let Some(local) = info.get("local").and_then(|l| l.as_str()) else {
                    continue;
                };
                match local.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) if a == self.ipv4 => v4 = Some(a),
                    Ok(IpAddr::V6(a)) if a == self.ipv6 => v6 = Some(a),
                    _ => extra.push(local.to_owned()),
                }
            }
        }
        Ok(HostAddresses { v4, v6, extra })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_is_predictable() {
        let h = Host::new("acc", Role::Node, 3);
        assert_eq!(h.name, "node3");
        assert_eq!(h.netns, "acc-node3");
        assert_eq!(h.port, "acc-n3");
        assert_eq!(h.ipv4, Ipv4Addr::new(198, 18, 1, 3));
        assert_eq!(h.ipv6, "fd00:198:18::1:3".parse::<Ipv6Addr>().unwrap());
        let c = Host::new("abcdefghij", Role::Client, 200);
        assert_eq!(c.ipv6.to_string(), "fd00:198:18::2:200");
        assert!(c.port.len() <= 15);
    }

    #[test]
    fn host_names_parse() {
        assert_eq!(Host::parse_name("node12"), Some((Role::Node, 12)));
        assert_eq!(Host::parse_name("client1"), Some((Role::Client, 1)));
        assert_eq!(Host::parse_name("node0"), None);
        assert_eq!(Host::parse_name("node01"), None);
        assert_eq!(Host::parse_name("sw"), None);
        assert_eq!(Host::parse_name("nodex"), None);
    }
}
