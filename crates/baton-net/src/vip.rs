//! VIP ownership: putting a virtual IP on an interface (optionally behind a
//! VRRP-style virtual MAC), announcing it, removing it, and sweeping what a
//! crashed holder left behind. All through rtnetlink, never by running `ip`.
//!
//! # Namespaces
//!
//! Every socket (the rtnetlink one, the AF_PACKET and ICMPv6 ones used for
//! the announcements) is created in the network namespace of the thread that
//! polls the future when it is created. Run these functions on a
//! current-thread runtime owned by a thread inside the namespace (the
//! [`blocking`] wrappers do exactly that), or in a process that lives in it.
//! The runtime needs its time driver (announcement spacing) and IO driver
//! (netlink socket): `enable_all()`.
//!
//! # Virtual MAC
//!
//! With [`VipSpec::vrid`] set, the VIP is put on a macvlan named
//! `baton.<VRID>` (IPv4, MAC `00:00:5e:00:01:VRID`) or `baton6.<VRID>` (IPv6,
//! MAC `00:00:5e:00:02:VRID`), as in VRRP (RFC 5798 §7.3). The names are ours
//! (not keepalived's `vrrp.<VRID>`), so [`sweep`] can remove them after a
//! crash without touching anybody else's links.
//!
//! The macvlan runs in **bridge** mode. Private mode forbids any frame
//! between sibling macvlans of the same parent, even hairpinned by the
//! switch; a node holding the VIPs of several services (several VRIDs, or
//! the IPv4 and IPv6 virtual MACs of one service) would then be unable to
//! reach its own other VIPs. Bridge mode switches those frames locally and
//! changes nothing for the outside. (Neither mode lets the parent interface
//! itself talk to its macvlans: that is how macvlan works.)
//!
//! For IPv4 the macvlan and its parent get `arp_ignore=1`: a broadcast ARP
//! request reaches both, and with the default `arp_ignore=0` each would answer
//! for every local address, the parent with its own MAC for the VIP and the
//! macvlan with the virtual MAC for the parent's addresses (keepalived sets
//! the same). `arp_ignore` of the parent is left at 1 on release.
//!
//! # Announcements
//!
//! [`Announce::default`] sends 5 gratuitous ARP requests (IPv4) or 5
//! unsolicited neighbour advertisements with the override flag (IPv6), the
//! first immediately and then one every 10 ms (a 40 ms burst; measured
//! 44 ms, tokio's timer rounds each sleep up to the next millisecond). keepalived's
//! defaults (`garp_master_delay 5`, `garp_master_repeat 5`,
//! `garp_interval 0`) send 5 back to back, then 5 more after 5 s; a
//! back-to-back burst can be lost whole in one congested moment of a switch
//! or a NIC queue, whereas spacing them by 10 ms rides over such a moment
//! while still finishing long before any client retransmission timer
//! (200 ms at least). Callers that want keepalived's second wave can call
//! [`announce`] again later.
//!
//! A Linux neighbour only updates an entry it already has from a gratuitous
//! ARP / unsolicited NA (unless `arp_accept` / `accept_untracked_na` is set):
//! which is exactly the case that matters, peers that talked to the old owner.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlag, AddressHeaderFlag, AddressMessage,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlag, LinkInfo, LinkMessage};
use rtnetlink::Handle;

/// Name prefix of the IPv4 virtual-MAC macvlans we create (`baton.<VRID>`).
pub const VMAC_PREFIX_V4: &str = "baton.";
/// Name prefix of the IPv6 virtual-MAC macvlans we create (`baton6.<VRID>`).
pub const VMAC_PREFIX_V6: &str = "baton6.";

/// `MACVLAN_MODE_BRIDGE` from `<linux/if_link.h>`.
const MACVLAN_MODE_BRIDGE: u32 = 4;

/// Errors of VIP operations. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("unknown interface {0}")]
    UnknownInterface(String),
    #[error("permission denied: cannot {0} (needs root, or CAP_NET_ADMIN and CAP_NET_RAW)")]
    PermissionDenied(String),
    #[error("invalid VIP {addr}/{prefix_len}: {reason}")]
    InvalidVip {
        addr: IpAddr,
        prefix_len: u8,
        reason: &'static str,
    },
    #[error("invalid VRID 0: VRRP router ids are 1..=255")]
    InvalidVrid,
    #[error("interface {name} exists but is not baton's virtual-MAC macvlan ({mac} on {parent})")]
    NameTaken {
        name: String,
        parent: String,
        mac: String,
    },
    #[error("VIP {addr} is already on interface {found}, not on {wanted}: release it there first")]
    VipElsewhere {
        addr: IpAddr,
        found: String,
        wanted: String,
    },
    #[error("netlink: cannot {op}: {reason}")]
    Netlink { op: String, reason: String },
    #[error("cannot {op}: {source}")]
    Io { op: String, source: io::Error },
    #[error("cannot write sysctl {path}: {source}")]
    Sysctl { path: String, source: io::Error },
    #[error("cannot build a tokio runtime: {0}")]
    Runtime(io::Error),
    #[error("vip::blocking called from inside a tokio runtime: use the async functions there")]
    InsideRuntime,
}

fn io_err(op: impl Into<String>, source: io::Error) -> VipError {
    let op = op.into();
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => VipError::PermissionDenied(op),
        _ => VipError::Io { op, source },
    }
}

/// The errno of a netlink error answer, if it is one.
fn nl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn nl_err(op: impl Into<String>, e: rtnetlink::Error) -> VipError {
    let op = op.into();
    match nl_errno(&e) {
        Some(libc::EPERM) | Some(libc::EACCES) => VipError::PermissionDenied(op),
        Some(code) => VipError::Netlink {
            op,
            reason: io::Error::from_raw_os_error(code).to_string(),
        },
        None => VipError::Netlink {
            op,
            reason: e.to_string().replace('\n', " "),
        },
    }
}

/// What VIP to hold, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSpec {
    /// The virtual address.
    pub addr: IpAddr,
    /// Prefix length the address is added with (32/128 for a host address,
    /// or the segment's prefix so the connected route follows the VIP).
    pub prefix_len: u8,
    /// The interface facing the clients (the macvlan's parent with `vrid`).
    pub interface: String,
    /// VRRP router id: if set, the VIP rides a virtual MAC on a macvlan.
    pub vrid: Option<u8>,
}

impl VipSpec {
    /// A VIP put directly on `interface`.
    pub fn new(addr: IpAddr, prefix_len: u8, interface: impl Into<String>) -> Self {
        VipSpec {
            addr,
            prefix_len,
            interface: interface.into(),
            vrid: None,
        }
    }

    /// The same VIP behind the virtual MAC of VRRP router id `vrid`.
    pub fn with_vmac(mut self, vrid: u8) -> Self {
        self.vrid = Some(vrid);
        self
    }

    /// Name of the macvlan carrying the VIP, when a virtual MAC is used.
    pub fn vmac_name(&self) -> Option<String> {
        self.vrid.map(|vrid| match self.addr {
            IpAddr::V4(_) => format!("{VMAC_PREFIX_V4}{vrid}"),
            IpAddr::V6(_) => format!("{VMAC_PREFIX_V6}{vrid}"),
        })
    }

    /// The VRRP virtual MAC (RFC 5798 §7.3), when a virtual MAC is used.
    pub fn vmac(&self) -> Option<[u8; 6]> {
        self.vrid.map(|vrid| match self.addr {
            IpAddr::V4(_) => [0x00, 0x00, 0x5e, 0x00, 0x01, vrid],
            IpAddr::V6(_) => [0x00, 0x00, 0x5e, 0x00, 0x02, vrid],
        })
    }

    /// The interface the address itself goes on.
    pub fn carrier_name(&self) -> String {
        self.vmac_name().unwrap_or_else(|| self.interface.clone())
    }

    pub(crate) fn validate(&self) -> Result<(), VipError> {
        let bad = |reason| VipError::InvalidVip {
            addr: self.addr,
            prefix_len: self.prefix_len,
            reason,
        };
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix_len == 0 || self.prefix_len > max {
            return Err(bad("prefix length out of range"));
        }
        if self.addr.is_unspecified() || self.addr.is_multicast() || self.addr.is_loopback() {
            return Err(bad("not a unicast address"));
        }
        if let IpAddr::V4(a) = self.addr {
            if a.is_broadcast() {
                return Err(bad("not a unicast address"));
            }
        }
        if self.vrid == Some(0) {
            return Err(VipError::InvalidVrid);
        }
        if self.interface.is_empty() || self.interface.len() > 15 {
            return Err(VipError::UnknownInterface(self.interface.clone()));
        }
        Ok(())
    }
}

/// How to announce a VIP after taking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// Number of gratuitous ARPs / unsolicited NAs (0: none).
    pub count: u32,
    /// Spacing between two of them (the first goes at once).
    pub interval: Duration,
}

impl Announce {
    /// No announcement at all.
    pub const NONE: Announce = Announce {
        count: 0,
        interval: Duration::ZERO,
    };
}

impl Default for Announce {
    /// 5 packets, the first immediately, then every 10 ms (see module docs).
    fn default() -> Self {
        Announce {
            count: 5,
            interval: Duration::from_millis(10),
        }
    }
}

/// What an announcement burst did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnnounceReport {
    /// Packets sent.
    pub sent: u32,
    /// From just before the first packet to just after the last one.
    pub elapsed: Duration,
}

/// A VIP now held, as [`take`] left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub spec: VipSpec,
    /// Interface carrying the address (the macvlan with a virtual MAC).
    pub ifname: String,
    pub ifindex: u32,
    /// MAC the VIP is announced with.
    pub mac: [u8; 6],
    /// We created the macvlan in this call.
    pub created_macvlan: bool,
    /// The address was already there (idempotent take).
    pub already_present: bool,
    /// Time of the netlink part (macvlan + address).
    pub setup: Duration,
    /// The announcement burst.
    pub announced: AnnounceReport,
}

/// What [`release`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub removed_address: bool,
    pub removed_macvlan: bool,
}

/// What [`sweep`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Our virtual-MAC macvlans (their addresses went with them).
    pub macvlans: Vec<String>,
    /// Listed VIPs removed from other interfaces, with the interface name.
    pub addresses: Vec<(IpAddr, String)>,
}

// ---------------------------------------------------------------------------
// netlink plumbing

/// One rtnetlink connection; its driver task is aborted on drop.
struct Nl {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Nl {
    fn open() -> Result<Nl, VipError> {
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(|e| io_err("open a rtnetlink socket", e))?;
        let task = tokio::spawn(conn);
        Ok(Nl { handle, task })
    }
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The parts of a link we look at.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    macvlan: bool,
    parent: Option<u32>,
    up: bool,
}

impl Link {
    fn from_msg(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            macvlan: false,
            parent: None,
            up: msg.header.flags.contains(&LinkFlag::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(a);
                    link.mac = Some(mac);
                }
                LinkAttribute::Link(p) => link.parent = Some(*p),
                LinkAttribute::LinkInfo(infos) => {
                    link.macvlan = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::MacVlan)));
                }
                _ => {}
            }
        }
        link
    }

    fn is_ours(&self) -> bool {
        self.macvlan
            && (self.name.starts_with(VMAC_PREFIX_V4) || self.name.starts_with(VMAC_PREFIX_V6))
    }
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, VipError> {
    let mut stream = h.link().get().match_name(name.to_owned()).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_msg(&msg))),
        Ok(None) => Ok(None),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("look up interface {name}"), e)),
    }
}

async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>, VipError> {
    let mut stream = h.link().get().match_index(index).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_msg(&msg))),
        Ok(None) => Ok(None),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("look up interface #{index}"), e)),
    }
}

async fn all_links(h: &Handle) -> Result<Vec<Link>, VipError> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("list interfaces", e))?;
    Ok(msgs.iter().map(Link::from_msg).collect())
}

/// The address an address message carries (IFA_LOCAL first: on
/// point-to-point IPv4 links IFA_ADDRESS is the peer).
fn msg_addr(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => return Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    address
}

/// Address messages, optionally of one interface, optionally of one address.
async fn addresses(
    h: &Handle,
    index: Option<u32>,
    addr: Option<IpAddr>,
) -> Result<Vec<AddressMessage>, VipError> {
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let msgs: Vec<AddressMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("list addresses", e))?;
    Ok(msgs
        .into_iter()
        .filter(|m| addr.is_none() || msg_addr(m) == addr)
        .collect())
}

/// Deletes one address; an address already gone is fine.
async fn del_address(h: &Handle, msg: AddressMessage, what: &str) -> Result<bool, VipError> {
    match h.address().del(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(nl_errno(&e), Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV)) => {
            Ok(false)
        }
        Err(e) => Err(nl_err(format!("remove {what}"), e)),
    }
}

/// Deletes one link; a link already gone is fine.
async fn del_link(h: &Handle, index: u32, name: &str) -> Result<bool, VipError> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl_err(format!("remove interface {name}"), e)),
    }
}

fn set_arp_ignore(ifname: &str) -> Result<(), VipError> {
    // /proc/sys/net shows the network namespace of the opening thread.
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/arp_ignore");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current
        .trim()
        .parse::<u32>()
        .map(|v| v >= 1)
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|source| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            VipError::PermissionDenied(format!("write {path}"))
        }
        _ => VipError::Sysctl { path, source },
    })
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Finds or creates the virtual-MAC macvlan of `spec` on `parent`.
async fn ensure_macvlan(
    h: &Handle,
    spec: &VipSpec,
    parent: &Link,
) -> Result<(Link, bool), VipError> {
    let name = spec.vmac_name().unwrap_or_default();
    let vmac = spec.vmac().unwrap_or_default();
    let check = |link: Link| -> Result<Link, VipError> {
        if link.is_ours() && link.parent == Some(parent.index) && link.mac == Some(vmac) {
            Ok(link)
        } else {
            Err(VipError::NameTaken {
                name: link.name.clone(),
                parent: parent.name.clone(),
                mac: mac_string(&vmac),
            })
        }
    };
    if let Some(link) = link_by_name(h, &name).await? {
        let link = check(link)?;
        if !link.up {
            h.link()
                .set(link.index)
                .up()
                .execute()
                .await
                .map_err(|e| nl_err(format!("bring {name} up"), e))?;
        }
        return Ok((link, false));
    }
    let created = h
        .link()
        .add()
        .macvlan(name.clone(), parent.index, MACVLAN_MODE_BRIDGE)
        .address(vmac.to_vec())
        .execute()
        .await;
    let created = match created {
        Ok(()) => true,
        Err(e) if nl_errno(&e) == Some(libc::EEXIST) => false, // raced with another taker
        Err(e) => {
            return Err(nl_err(
                format!("create macvlan {name} on {}", parent.name),
                e,
            ))
        }
    };
    match link_by_name(h, &name).await? {
        Some(link) => Ok((check(link)?, created)),
        None => Err(VipError::Netlink {
            op: format!("create macvlan {name}"),
            reason: "it vanished right after creation".into(),
        }),
    }
}

// ---------------------------------------------------------------------------
// public async API

/// Takes the VIP (macvlan and address) and announces it. Idempotent: taking a
/// VIP that is already in place succeeds (and announces it again).
pub async fn take(spec: &VipSpec, announce_with: Announce) -> Result<Taken, VipError> {
    let mut taken = take_address(spec).await?;
    taken.announced = announce(&taken, announce_with).await?;
    Ok(taken)
}

/// The netlink part of [`take`], without any announcement; follow it with
/// [`announce`] (e.g. from a spawned task).
pub async fn take_address(spec: &VipSpec) -> Result<Taken, VipError> {
    spec.validate()?;
    let start = Instant::now();
    let nl = Nl::open()?;
    let h = &nl.handle;

    let parent = link_by_name(h, &spec.interface)
        .await?
        .ok_or_else(|| VipError::UnknownInterface(spec.interface.clone()))?;
    if !parent.up {
        tracing::warn!(interface = %parent.name, "taking a VIP on an interface that is down");
    }
    let wanted = spec.carrier_name();

    // Is the VIP already somewhere in this namespace?
    let mut already_present = false;
    for msg in addresses(h, None, Some(spec.addr)).await? {
        let found = link_by_index(h, msg.header.index)
            .await?
            .map(|l| l.name)
            .unwrap_or_else(|| format!("#{}", msg.header.index));
        if found == wanted {
            already_present = true;
        } else {
            return Err(VipError::VipElsewhere {
                addr: spec.addr,
                found,
                wanted,
            });
        }
    }

    let (carrier, created_macvlan) = if spec.vrid.is_some() {
        ensure_macvlan(h, spec, &parent).await?
    } else {
        (parent.clone(), false)
    };
    if spec.vrid.is_some() && spec.addr.is_ipv4() {
        set_arp_ignore(&carrier.name)?;
        set_arp_ignore(&parent.name)?;
    }

    if !already_present {
        let mut req = h.address().add(carrier.index, spec.addr, spec.prefix_len);
        if spec.addr.is_ipv6() {
            // Usable at once: no duplicate address detection (1 s or more).
            let msg = req.message_mut();
            msg.header.flags.push(AddressHeaderFlag::Nodad);
            msg.attributes
                .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
        }
        match req.execute().await {
            Ok(()) => {}
            Err(e) if nl_errno(&e) == Some(libc::EEXIST) => already_present = true,
            Err(e) => {
                if created_macvlan {
                    let _ = del_link(h, carrier.index, &carrier.name).await;
                }
                return Err(nl_err(
                    format!("add {}/{} to {}", spec.addr, spec.prefix_len, carrier.name),
                    e,
                ));
            }
        }
    }

    let mac = match carrier.mac {
        Some(mac) => mac,
        None => {
            return Err(VipError::Netlink {
                op: format!("read the MAC of {}", carrier.name),
                reason: "interface has no Ethernet address".into(),
            })
        }
    };
    Ok(Taken {
        spec: spec.clone(),
        ifname: carrier.name.clone(),
        ifindex: carrier.index,
        mac,
        created_macvlan,
        already_present,
        setup: start.elapsed(),
        announced: AnnounceReport::default(),
    })
}

/// Sends the announcement burst for a VIP taken by [`take_address`]:
/// gratuitous ARP requests (IPv4) or unsolicited neighbour advertisements
/// with the override flag to ff02::1 (IPv6).
pub async fn announce(taken: &Taken, how: Announce) -> Result<AnnounceReport, VipError> {
    if how.count == 0 {
        return Ok(AnnounceReport::default());
    }
    let sender = match taken.spec.addr {
        IpAddr::V4(vip) => Sender::garp(vip, taken.ifindex, taken.mac)?,
        IpAddr::V6(vip) => Sender::unsolicited_na(vip, taken.ifindex, taken.mac)?,
    };
    let start = Instant::now();
    for i in 0..how.count {
        if i > 0 && !how.interval.is_zero() {
            tokio::time::sleep(how.interval).await;
        }
        sender.send().map_err(|e| {
            io_err(
                format!("send announcement {} for {}", i + 1, taken.spec.addr),
                e,
            )
        })?;
    }
    Ok(AnnounceReport {
        sent: how.count,
        elapsed: start.elapsed(),
    })
}

/// Removes the VIP, and its macvlan if it is ours and carries nothing else.
/// Idempotent: releasing an absent VIP succeeds with nothing removed.
pub async fn release(spec: &VipSpec) -> Result<Released, VipError> {
    spec.validate()?;
    let nl = Nl::open()?;
    let h = &nl.handle;
    let mut out = Released::default();
    let name = spec.carrier_name();
    let carrier = match link_by_name(h, &name).await? {
        Some(link) => link,
        None if spec.vrid.is_some() => return Ok(out),
        None => return Err(VipError::UnknownInterface(name)),
    };
    for msg in addresses(h, Some(carrier.index), Some(spec.addr)).await? {
        out.removed_address |= del_address(h, msg, &format!("{} from {name}", spec.addr)).await?;
    }
    if spec.vrid.is_some() && carrier.is_ours() {
        let left = addresses(h, Some(carrier.index), None).await?;
        let busy = left.iter().any(|m| match msg_addr(m) {
            Some(IpAddr::V6(a)) => (a.segments()[0] & 0xffc0) != 0xfe80,
            Some(IpAddr::V4(_)) => true,
            None => false,
        });
        if !busy {
            out.removed_macvlan = del_link(h, carrier.index, &name).await?;
        }
    }
    Ok(out)
}

/// Start-up cleanup after a crash: removes every virtual-MAC macvlan of ours
/// (by name and kind) and each listed VIP from whatever interface has it.
/// Idempotent.
pub async fn sweep(vips: &[IpAddr]) -> Result<Swept, VipError> {
    let nl = Nl::open()?;
    let h = &nl.handle;
    let mut out = Swept::default();
    for link in all_links(h).await? {
        if link.is_ours() && del_link(h, link.index, &link.name).await? {
            out.macvlans.push(link.name);
        }
    }
    if vips.is_empty() {
        return Ok(out);
    }
    for msg in addresses(h, None, None).await? {
        let Some(addr) = msg_addr(&msg) else { continue };
        if !vips.contains(&addr) {
            continue;
        }
        let ifname = link_by_index(h, msg.header.index)
            .await?
            .map(|l| l.name)
            .unwrap_or_else(|| format!("#{}", msg.header.index));
        if del_address(h, msg, &format!("{addr} from {ifname}")).await? {
            out.addresses.push((addr, ifname));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// announcements

/// A socket and a ready-made packet, sent `count` times.
struct Sender {
    fd: OwnedFd,
    packet: Vec<u8>,
    dest: SockAddr,
}

enum SockAddr {
    Ll(libc::sockaddr_ll),
    In6(libc::sockaddr_in6),
}

pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

pub(crate) fn new_socket(domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn sockaddr_in6(addr: Ipv6Addr, scope_id: u32) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_addr.s6_addr = addr.octets();
    sa.sin6_scope_id = scope_id;
    sa
}

impl Sender {
    /// Gratuitous ARP request (RFC 5227 ARP announcement): sender = target =
    /// VIP, from the VIP's MAC, to the broadcast MAC, via AF_PACKET.
    fn garp(vip: Ipv4Addr, ifindex: u32, mac: [u8; 6]) -> Result<Sender, VipError> {
        // Protocol 0: a send-only packet socket, it receives nothing.
        let fd = new_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
            .map_err(|e| io_err("open an AF_PACKET socket", e))?;
        let mut frame = Vec::with_capacity(60);
        frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
        frame.extend_from_slice(&mac); // source: the VIP's MAC
        frame.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
        frame.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
        frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
        frame.extend_from_slice(&[6, 4]);
        frame.extend_from_slice(&1u16.to_be_bytes()); // request
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&vip.octets());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&vip.octets());
        frame.resize(60, 0); // minimum Ethernet frame without FCS
                             // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        Ok(Sender {
            fd,
            packet: frame,
            dest: SockAddr::Ll(sll),
        })
    }

    /// Unsolicited neighbour advertisement (RFC 4861 §7.2.6): ICMPv6 136,
    /// override flag, target = VIP with its link-layer address, from the VIP
    /// to ff02::1 out of the VIP's interface, hop limit 255. The kernel fills
    /// in the ICMPv6 checksum.
    fn unsolicited_na(vip: Ipv6Addr, ifindex: u32, mac: [u8; 6]) -> Result<Sender, VipError> {
        let fd = new_socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)
            .map_err(|e| io_err("open an ICMPv6 raw socket", e))?;
        let opt = |name, value, what: &str| {
            setsockopt_int(&fd, libc::IPPROTO_IPV6, name, value)
                .map_err(|e| io_err(format!("set {what} on the ICMPv6 socket"), e))
        };
        opt(libc::IPV6_MULTICAST_HOPS, 255, "IPV6_MULTICAST_HOPS")?;
        opt(libc::IPV6_UNICAST_HOPS, 255, "IPV6_UNICAST_HOPS")?;
        opt(libc::IPV6_MULTICAST_IF, ifindex as i32, "IPV6_MULTICAST_IF")?;
        opt(libc::IPV6_MULTICAST_LOOP, 0, "IPV6_MULTICAST_LOOP")?;
        let src = sockaddr_in6(vip, 0);
        // SAFETY: valid fd and a sockaddr_in6 of the right size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&src as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        })
        .map_err(|e| io_err(format!("bind the ICMPv6 socket to {vip}"), e))?;
        let mut na = Vec::with_capacity(32);
        na.extend_from_slice(&[136, 0, 0, 0]); // type, code, checksum
        na.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // O flag
        na.extend_from_slice(&vip.octets());
        na.extend_from_slice(&[2, 1]); // option: target link-layer address
        na.extend_from_slice(&mac);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        Ok(Sender {
            fd,
            packet: na,
            dest: SockAddr::In6(sockaddr_in6(all_nodes, ifindex)),
        })
    }

    fn send(&self) -> io::Result<()> {
        let (ptr, len): (*const libc::sockaddr, usize) = match &self.dest {
            SockAddr::Ll(sa) => (
                (sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>(),
            ),
            SockAddr::In6(sa) => (
                (sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>(),
            ),
        };
        // SAFETY: valid fd, buffer and address pointers with their sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                self.packet.as_ptr().cast(),
                self.packet.len(),
                0,
                ptr,
                len as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// blocking wrappers

/// Blocking versions of the async API: each call builds a current-thread
/// tokio runtime on the calling thread (so every socket is created in the
/// calling thread's network namespace) and runs the async function on it.
/// Do not call them from inside a tokio runtime.
pub mod blocking {
    use super::*;

    fn run<T>(fut: impl std::future::Future<Output = Result<T, VipError>>) -> Result<T, VipError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(VipError::InsideRuntime);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(VipError::Runtime)?
            .block_on(fut)
    }

    /// See [`super::take`].
    pub fn take(spec: &VipSpec, how: Announce) -> Result<Taken, VipError> {
        run(super::take(spec, how))
    }

    /// See [`super::take_address`].
    pub fn take_address(spec: &VipSpec) -> Result<Taken, VipError> {
        run(super::take_address(spec))
    }

    /// See [`super::announce`].
    pub fn announce(taken: &Taken, how: Announce) -> Result<AnnounceReport, VipError> {
        run(super::announce(taken, how))
    }

    /// See [`super::release`].
    pub fn release(spec: &VipSpec) -> Result<Released, VipError> {
        run(super::release(spec))
    }

    /// See [`super::sweep`].
    pub fn sweep(vips: &[IpAddr]) -> Result<Swept, VipError> {
        run(super::sweep(vips))
    }
}

// ---------------------------------------------------------------------------
// neighbours

pub use baton_core::relocation::Neighbour;

/// What this node knows of `ips` on interface `ifname`: their MACs, from
/// its neighbour table (entries being resolved or failed are left out).
/// The source of a move hands them over, so the target sends its first
/// packets to the clients at once instead of queueing them behind ARP/ND
/// (the kernel drops what overflows that queue, and clients then wait for
/// a retransmission timer).
pub async fn neighbours(ifname: &str, ips: &[IpAddr]) -> Result<Vec<Neighbour>, VipError> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
    let wanted: std::collections::HashSet<IpAddr> = ips.iter().copied().collect();
    let nl = Nl::open()?;
    let link = link_by_name(&nl.handle, ifname)
        .await?
        .ok_or_else(|| VipError::UnknownInterface(ifname.to_owned()))?;
    let mut dump = nl.handle.neighbours().get().execute();
    let mut found = Vec::new();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|e| nl_err("list neighbours", e))?
    {
        if msg.header.ifindex != link.index
            || !matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            )
        {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    ip = Some(IpAddr::V4(*a))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    ip = Some(IpAddr::V6(*a))
                }
                NeighbourAttribute::LinkLocalAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            if wanted.contains(&ip) {
                found.push(Neighbour { ip, mac });
            }
        }
    }
    Ok(found)
}

/// Puts `neighbours` in the neighbour table of `ifname` as STALE entries:
/// used at once for sending, confirmed by the kernel in the background.
/// They replace what the table has (an entry still being resolved, or
/// failed, would hold the first packets back). Returns how many.
pub async fn learn_neighbours(ifname: &str, neighbours: &[Neighbour]) -> Result<usize, VipError> {
    use netlink_packet_route::neighbour::NeighbourState;
    if neighbours.is_empty() {
        return Ok(0);
    }
    let nl = Nl::open()?;
    let link = link_by_name(&nl.handle, ifname)
        .await?
        .ok_or_else(|| VipError::UnknownInterface(ifname.to_owned()))?;
    let mut added = 0;
    for n in neighbours {
        let result = nl
            .handle
            .neighbours()
            .add(link.index, n.ip)
            .link_local_address(&n.mac)
            .state(NeighbourState::Stale)
            .replace()
            .execute()
            .await;
        match result {
            Ok(()) => added += 1,
            Err(e) => return Err(nl_err("add a neighbour", e)),
        }
    }
    Ok(added)
}
