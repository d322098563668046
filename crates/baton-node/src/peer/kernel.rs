//! The TCP settings that decide whether a socket frozen on one node can be
//! rebuilt on another: peers exchange them when they connect and warn on
//! a mismatch.

use serde::{Deserialize, Serialize};

/// This node's settings, as read from its network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSettings {
    pub tcp_timestamps: Option<String>,
    pub tcp_sack: Option<String>,
    pub tcp_window_scaling: Option<String>,
    pub tcp_rmem: Option<String>,
    pub tcp_wmem: Option<String>,
    /// MTU of the cluster interface.
    pub mtu: Option<u32>,
}

fn sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/net/ipv4/{name}");
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// MTU of `interface` in this network namespace (netlink: `/sys` may
/// show another namespace's interfaces).
async fn mtu(interface: &str) -> Option<u32> {
    use futures::TryStreamExt;
    use netlink_packet_route::link::LinkAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    let task = tokio::spawn(conn);
    let found = async {
        let mut links = handle
            .link()
            .get()
            .match_name(interface.to_owned())
            .execute();
        let msg = links.try_next().await.ok()??;
        msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }
    .await;
    task.abort();
    found
}

impl KernelSettings {
    /// Reads the settings of this network namespace and `interface`.
    pub async fn read(interface: &str) -> KernelSettings {
        KernelSettings {
            tcp_timestamps: sysctl("tcp_timestamps"),
            tcp_sack: sysctl("tcp_sack"),
            tcp_window_scaling: sysctl("tcp_window_scaling"),
            tcp_rmem: sysctl("tcp_rmem"),
            tcp_wmem: sysctl("tcp_wmem"),
            mtu: mtu(interface).await,
        }
    }

    /// One line per setting that differs between this node and `peer`.
    pub fn differences(&self, peer_name: &str, peer: &KernelSettings) -> Vec<String> {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        let mut out = Vec::new();
        let pairs = [
            (
                "net.ipv4.tcp_timestamps",
                &self.tcp_timestamps,
                &peer.tcp_timestamps,
            ),
            ("net.ipv4.tcp_sack", &self.tcp_sack, &peer.tcp_sack),
            (
                "net.ipv4.tcp_window_scaling",
                &self.tcp_window_scaling,
                &peer.tcp_window_scaling,
            ),
            ("net.ipv4.tcp_rmem", &self.tcp_rmem, &peer.tcp_rmem),
            ("net.ipv4.tcp_wmem", &self.tcp_wmem, &peer.tcp_wmem),
        ];
        for (name, here, there) in pairs {
            if here != there {
                out.push(format!(
                    "{name} differs: {} here, {} on {peer_name}",
                    show(here),
                    show(there)
                ));
            }
        }
        if self.mtu != peer.mtu {
            let show = |m: Option<u32>| m.map_or("unknown".into(), |m| m.to_string());
            out.push(format!(
                "cluster interface MTU differs: {} here, {} on {peer_name}",
                show(self.mtu),
                show(peer.mtu)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_setting_and_both_values() {
        let a = KernelSettings {
            tcp_sack: Some("1".into()),
            mtu: Some(1500),
            ..Default::default()
        };
        let mut b = a.clone();
        assert!(a.differences("node2", &b).is_empty());
        b.tcp_sack = Some("0".into());
        b.mtu = Some(9000);
        let d = a.differences("node2", &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].contains("tcp_sack") && d[0].contains("1 here") && d[0].contains("0 on node2")
        );
        assert!(d[1].contains("MTU") && d[1].contains("9000"));
    }
}
