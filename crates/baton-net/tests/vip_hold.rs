//! VIP take/release/sweep and the fail-closed hold, for real, in network
//! namespaces this test creates and removes itself (never the root one).
//!
//! Topology per test: two namespaces `a` (the VIP holder) and `b` (a client)
//! joined by a veth pair created inside them; 198.18.0.1-2/24 and
//! fd00:198:18::1-2/64 on `eth0`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_net::hold::{self, Hold, HoldError, Ports};
use baton_net::netns::{named_path, run_in, spawn_in};
use baton_net::vip::{self, blocking, Announce, VipError, VipSpec};

// ---------------------------------------------------------------------------
// lab

fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces and a veth between them; removed on drop (also on panic).
struct Lab {
    a: String,
    b: String,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            a: format!("baton-t-{tag}-a-{pid}"),
            b: format!("baton-t-{tag}-b-{pid}"),
        };
        lab.remove();
        ip(&["netns", "add", &lab.a]).unwrap();
        ip(&["netns", "add", &lab.b]).unwrap();
        ip(&[
            "-n", &lab.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &lab.b,
        ])
        .unwrap();
        for (ns, host) in [(&lab.a, 1), (&lab.b, 2)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]).unwrap();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.18.0.{host}/24"),
                "dev",
                "eth0",
            ])
            .unwrap();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("fd00:198:18::{host}/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
            ip(&["-n", ns, "link", "set", "eth0", "up"]).unwrap();
        }
        lab
    }

    fn remove(&self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn run<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&named_path(ns), f).expect("running in the namespace")
    }

    fn mac(&self, ns: &str, ifname: &str) -> String {
        let out = ip(&["-n", ns, "-o", "link", "show", ifname]).unwrap();
        let mut words = out.split_whitespace();
        words.find(|w| *w == "link/ether");
        words.next().unwrap().to_owned()
    }

    fn neigh(&self, ns: &str, addr: IpAddr) -> Option<String> {
        let out = ip(&[
            "-n",
            ns,
            "neigh",
            "show",
            "to",
            &addr.to_string(),
            "dev",
            "eth0",
        ])
        .ok()?;
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }

    fn has_link(&self, ns: &str, ifname: &str) -> bool {
        ip(&["-n", ns, "link", "show", ifname]).is_ok()
    }

    /// A dual-stack listener in `ns` on `port` (kept in the namespace after
    /// the thread that made it exits).
    fn listen(&self, ns: &str, port: u16) -> TcpListener {
        self.run(ns, move || TcpListener::bind(("::", port)))
            .expect("listening")
    }

    /// Whether a TCP connect from `ns` to `addr` completes (few tries, short
    /// timeouts: the first may wait for neighbour resolution).
    fn tcp_ok(&self, ns: &str, addr: SocketAddr, tries: u32) -> bool {
        for _ in 0..tries {
            let ok = self.run(ns, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            });
            if ok {
                return true;
            }
        }
        false
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

const V4_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const V6_VIP: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0x10));

fn prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        24
    } else {
        64
    }
}

// ---------------------------------------------------------------------------
// VIP

fn take_release_cycle(tag: &str, vip: IpAddr) {
    let lab = Lab::new(tag);
    let port = 7000;
    let _listener = lab.listen(&lab.a, port);
    let target = SocketAddr::new(vip, port);
    let (a, b) = (lab.a.clone(), lab.b.clone());

    assert!(!lab.tcp_ok(&b, target, 1), "VIP answers before take");

    // Plain: the VIP on eth0 itself.
    let plain = VipSpec::new(vip, prefix(vip), "eth0");
    let spec = plain.clone();
    let taken = lab
        .run(&a, move || blocking::take(&spec, Announce::default()))
        .unwrap();
    eprintln!(
        "{tag} plain take: setup {:?}, burst of {} in {:?}",
        taken.setup, taken.announced.sent, taken.announced.elapsed
    );
    assert_eq!(taken.announced.sent, 5);
    assert!(!taken.already_present && !taken.created_macvlan);
    assert!(lab.tcp_ok(&b, target, 3), "VIP does not answer after take");
    assert_eq!(lab.neigh(&b, vip), Some(lab.mac(&a, "eth0")));

    // Idempotent take.
    let spec = plain.clone();
    let again = lab
        .run(&a, move || blocking::take(&spec, Announce::NONE))
        .unwrap();
    assert!(again.already_present);

    let spec = plain.clone();
    let rel = lab.run(&a, move || blocking::release(&spec)).unwrap();
    assert!(rel.removed_address);
    let spec = plain.clone();
    let rel = lab.run(&a, move || blocking::release(&spec)).unwrap();
    assert!(!rel.removed_address, "second release removed something");
    assert!(!lab.tcp_ok(&b, target, 1), "VIP answers after release");

    // Behind the virtual MAC. b still maps the VIP to a's eth0 MAC: the
    // announcement alone must move it to the virtual MAC.
    let vmac_spec = plain.clone().with_vmac(10);
    let vmac = if vip.is_ipv4() {
        "00:00:5e:00:01:0a"
    } else {
        "00:00:5e:00:02:0a"
    };
    assert_ne!(lab.neigh(&b, vip).as_deref(), Some(vmac));
    let spec = vmac_spec.clone();
    let taken = lab
        .run(&a, move || blocking::take(&spec, Announce::default()))
        .unwrap();
    eprintln!(
        "{tag} vmac take: setup {:?}, burst of {} in {:?}",
        taken.setup, taken.announced.sent, taken.announced.elapsed
    );
    assert!(taken.created_macvlan);
    assert_eq!(taken.ifname, vmac_spec.vmac_name().unwrap());
    assert_eq!(
        lab.neigh(&b, vip).as_deref(),
        Some(vmac),
        "announcement did not update the peer's neighbour cache"
    );
    assert!(lab.tcp_ok(&b, target, 3), "VIP on vmac does not answer");
    assert!(lab.has_link(&a, &taken.ifname));

    let spec = vmac_spec.clone();
    let again = lab
        .run(&a, move || blocking::take(&spec, Announce::NONE))
        .unwrap();
    assert!(again.already_present && !again.created_macvlan);

    let spec = vmac_spec.clone();
    let rel = lab.run(&a, move || blocking::release(&spec)).unwrap();
    assert!(rel.removed_address && rel.removed_macvlan);
    assert!(!lab.has_link(&a, &taken.ifname));
    assert!(!lab.tcp_ok(&b, target, 1), "VIP answers after vmac release");
    let spec = vmac_spec.clone();
    let rel = lab.run(&a, move || blocking::release(&spec)).unwrap();
    assert_eq!(rel, vip::Released::default());
}

#[test]
fn vip_take_release_v4() {
    take_release_cycle("vip4", V4_VIP);
}

#[test]
fn vip_take_release_v6() {
    take_release_cycle("vip6", V6_VIP);
}

#[test]
fn vip_sweep_and_errors() {
    let lab = Lab::new("vipsw");
    let a = lab.a.clone();
    let other = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));
    let specs = vec![
        VipSpec::new(V4_VIP, 32, "eth0").with_vmac(7),
        VipSpec::new(V6_VIP, 128, "eth0").with_vmac(7),
        VipSpec::new(other, 32, "eth0"),
    ];
    let s = specs.clone();
    lab.run(&a, move || {
        for spec in &s {
            blocking::take(spec, Announce::NONE).unwrap();
        }
    });
    assert!(lab.has_link(&a, "baton.7") && lab.has_link(&a, "baton6.7"));

    // A crashed holder left all this: sweep removes it, twice is fine.
    let swept = lab.run(&a, move || blocking::sweep(&[other])).unwrap();
    let mut names = swept.macvlans.clone();
    names.sort();
    assert_eq!(names, vec!["baton.7".to_owned(), "baton6.7".to_owned()]);
    assert_eq!(swept.addresses, vec![(other, "eth0".to_owned())]);
    assert!(!lab.has_link(&a, "baton.7") && !lab.has_link(&a, "baton6.7"));
    let swept = lab.run(&a, move || blocking::sweep(&[other])).unwrap();
    assert_eq!(swept, vip::Swept::default());

    // Errors are one line and change nothing.
    let errs = lab.run(&a, || {
        vec![
            blocking::take(&VipSpec::new(V4_VIP, 24, "nope0"), Announce::NONE).unwrap_err(),
            blocking::take(
                &VipSpec::new(V4_VIP, 24, "eth0").with_vmac(0),
                Announce::NONE,
            )
            .unwrap_err(),
            blocking::take(&VipSpec::new(V4_VIP, 33, "eth0"), Announce::NONE).unwrap_err(),
            blocking::release(&VipSpec::new(V4_VIP, 24, "nope0")).unwrap_err(),
        ]
    });
    assert!(matches!(errs[0], VipError::UnknownInterface(_)));
    assert!(matches!(errs[1], VipError::InvalidVrid));
    assert!(matches!(errs[2], VipError::InvalidVip { .. }));
    assert!(matches!(errs[3], VipError::UnknownInterface(_)));
    for e in &errs {
        assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
        eprintln!("error: {e}");
    }

    // A name of ours taken by something else is refused, not reused.
    ip(&[
        "-n", &a, "link", "add", "baton.9", "type", "veth", "peer", "name", "other9",
    ])
    .unwrap();
    let err = lab
        .run(&a, || {
            blocking::take(
                &VipSpec::new(V4_VIP, 24, "eth0").with_vmac(9),
                Announce::NONE,
            )
        })
        .unwrap_err();
    assert!(matches!(err, VipError::NameTaken { .. }), "{err}");
    let swept = lab.run(&a, || blocking::sweep(&[])).unwrap();
    assert!(swept.macvlans.is_empty(), "sweep removed a link not ours");
}

// ---------------------------------------------------------------------------
// hold

/// Starts a nonblocking connect from `ns` to `addr`; the thread returns the
/// outcome and the instant it was known (or a timeout after `limit`).
fn connect_in(
    ns: &str,
    addr: SocketAddr,
    limit: Duration,
) -> std::thread::JoinHandle<Result<io::Result<Instant>, baton_net::netns::NetnsError>> {
    spawn_in(&named_path(ns), move || {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        match sock.connect(&addr.into()) {
            Ok(()) => return Ok(Instant::now()),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if n > 0 {
                let at = Instant::now();
                return match sock.take_error()? {
                    None => Ok(at),
                    Some(e) => Err(e),
                };
            }
        }
    })
}

fn hold_accept_cycle(tag: &str, vip: IpAddr) {
    let lab = Lab::new(tag);
    let port = 7001;
    let _listener = lab.listen(&lab.a, port);
    let target = SocketAddr::new(vip, port);
    let a = lab.a.clone();

    let t0 = Instant::now();
    let hold = lab
        .run(&a, move || Hold::install(vip, &[port][..], 1))
        .unwrap();
    eprintln!("{tag}: hold installed in {:?}", t0.elapsed());
    let rules = lab.run(&a, hold::list_rules).unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");

    let start = Instant::now();
    let client = connect_in(&lab.b, target, Duration::from_secs(3));
    assert!(
        hold.wait_held(1, Duration::from_secs(2)) >= 1,
        "SYN not held"
    );
    std::thread::sleep(Duration::from_millis(300).saturating_sub(start.elapsed()));
    assert!(
        !client.is_finished(),
        "connect finished while held (SYN-ACK or RST got through)"
    );

    let released_at = Instant::now();
    let n = hold.accept_all().unwrap();
    let done = client
        .join()
        .unwrap()
        .unwrap()
        .expect("connect after accept_all");
    eprintln!(
        "{tag}: {n} held packet(s) accepted; connect completed {:?} after accept_all, {:?} after start",
        done - released_at,
        done - start
    );
    assert!(n >= 1);
    assert!(done >= released_at);
    assert!(
        done - start < Duration::from_millis(950),
        "completed only by SYN retransmission"
    );

    drop(hold); // from this (root-namespace) thread: removal still acts in a
    let rules = lab.run(&a, hold::list_rules).unwrap();
    assert!(rules.is_empty(), "rules left after drop: {rules:?}");
    assert!(lab.tcp_ok(&lab.b, target, 1), "no traffic after the hold");
}

#[test]
fn hold_accept_all_v4() {
    hold_accept_cycle("hacc4", "198.18.0.1".parse().unwrap());
}

#[test]
fn hold_accept_all_v6() {
    hold_accept_cycle("hacc6", "fd00:198:18::1".parse().unwrap());
}

fn is_tcp_syn_to(packet: &[u8], vip: IpAddr, port: u16) -> bool {
    let (l4, proto, dst) = match packet[0] >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0xf) * 4;
            let dst = IpAddr::V4(Ipv4Addr::new(
                packet[16], packet[17], packet[18], packet[19],
            ));
            (&packet[ihl..], packet[9], dst)
        }
        6 => {
            let mut d = [0u8; 16];
            d.copy_from_slice(&packet[24..40]);
            (&packet[40..], packet[6], IpAddr::V6(Ipv6Addr::from(d)))
        }
        _ => return false,
    };
    proto == 6
        && dst == vip
        && u16::from_be_bytes([l4[2], l4[3]]) == port
        && l4[13] & 0x02 != 0
        && l4[13] & 0x10 == 0
}

fn hold_forward_cycle(tag: &str, vip: IpAddr, under_hold: bool) {
    let lab = Lab::new(tag);
    let port = 7002;
    let _listener = lab.listen(&lab.a, port);
    let target = SocketAddr::new(vip, port);
    let a = lab.a.clone();

    let hold = lab
        .run(&a, move || Hold::install(vip, Ports::AllTcp, 2))
        .unwrap();
    let start = Instant::now();
    let client = connect_in(&lab.b, target, Duration::from_secs(3));
    assert!(
        hold.wait_held(1, Duration::from_secs(2)) >= 1,
        "SYN not held"
    );
    let packets = hold.take_dropped().unwrap();
    assert!(!packets.is_empty());
    assert!(
        is_tcp_syn_to(&packets[0], vip, port),
        "first held packet is not the SYN: {:02x?}",
        &packets[0][..packets[0].len().min(64)]
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!client.is_finished(), "connect finished without the SYN");

    let injected_at = Instant::now();
    let sent = if under_hold {
        // The new owner still holds: injected packets carry INJECT_MARK and
        // pass the hold, so the connect completes before the release.
        let sent = lab.run(&a, move || hold::inject(&packets)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while !client.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(client.is_finished(), "injected SYN was held");
        // What the client sent next (its ACK) is held like any packet.
        hold.release().unwrap();
        sent
    } else {
        // Nothing left to accept: the SYN was dropped.
        assert_eq!(hold.release().unwrap(), 0);
        lab.run(&a, move || hold::inject(&packets)).unwrap()
    };
    let done = client
        .join()
        .unwrap()
        .unwrap()
        .expect("connect after inject");
    eprintln!(
        "{tag}: injected {sent} packet(s); connect completed {:?} after inject, {:?} after start",
        done - injected_at,
        done - start
    );
    assert!(done >= injected_at);
    assert!(
        done - start < Duration::from_millis(950),
        "completed only by SYN retransmission"
    );
}

#[test]
fn hold_take_dropped_inject_v4() {
    hold_forward_cycle("hfwd4", "198.18.0.1".parse().unwrap(), false);
}

#[test]
fn hold_inject_under_hold_v4() {
    hold_forward_cycle("hinj4", "198.18.0.1".parse().unwrap(), true);
}

#[test]
fn hold_inject_under_hold_v6() {
    hold_forward_cycle("hinj6", "fd00:198:18::1".parse().unwrap(), true);
}

#[test]
fn hold_take_dropped_inject_v6() {
    hold_forward_cycle("hfwd6", "fd00:198:18::1".parse().unwrap(), false);
}

#[test]
fn hold_is_fail_closed_on_closed_port() {
    let lab = Lab::new("hclosed");
    let vip: IpAddr = "198.18.0.1".parse().unwrap();
    let target = SocketAddr::new(vip, 7999); // nobody listens: RST if unheld
    let a = lab.a.clone();
    let hold = lab
        .run(&a, move || Hold::install(vip, Ports::AllTcp, 3))
        .unwrap();
    let client = connect_in(&lab.b, target, Duration::from_millis(600));
    assert!(hold.wait_held(1, Duration::from_secs(2)) >= 1);
    let dropped = hold.finish_dropped().unwrap();
    assert!(!dropped.is_empty());
    let outcome = client.join().unwrap().unwrap();
    assert_eq!(
        outcome.map_err(|e| e.kind()),
        Err(io::ErrorKind::TimedOut),
        "the client got an answer (RST) while held"
    );
    // Without a hold the same connect is refused at once.
    let outcome = connect_in(&lab.b, target, Duration::from_millis(600))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused)
    );
}

#[test]
fn hold_sweep_root_refusal_and_bad_input() {
    // Root namespace: refused before anything is touched.
    let err = Hold::install("198.18.0.1".parse().unwrap(), Ports::AllTcp, 9).unwrap_err();
    assert!(matches!(err, HoldError::RootNamespace), "{err}");
    assert!(matches!(hold::sweep(), Err(HoldError::RootNamespace)));

    let lab = Lab::new("hsweep");
    let a = lab.a.clone();
    let ipt = |tool: &str, args: &str| {
        let status = Command::new("ip")
            .args(["netns", "exec", &a, tool])
            .args(args.split_whitespace())
            .status()
            .unwrap();
        assert!(status.success(), "{tool} {args}");
    };
    // What a crashed run leaves, plus a rule that is not ours.
    ipt("iptables", "-t raw -A PREROUTING -d 198.18.0.1 -p tcp -m comment --comment baton-hold:198.18.0.1 -j NFQUEUE --queue-num 4");
    ipt("iptables", "-t raw -A PREROUTING -d 198.18.0.1 -p tcp -m multiport --dports 1,2 -m comment --comment baton-hold:198.18.0.1 -j NFQUEUE --queue-num 4");
    ipt("ip6tables", "-t raw -A PREROUTING -d fd00:198:18::1 -p tcp -m comment --comment baton-hold:fd00:198:18::1 -j NFQUEUE --queue-num 4");
    ipt(
        "iptables",
        "-t raw -A PREROUTING -d 198.18.0.1 -p udp -m comment --comment someone-else -j ACCEPT",
    );

    let removed = lab.run(&a, hold::sweep).unwrap();
    assert_eq!(removed, 3);
    assert_eq!(lab.run(&a, hold::sweep).unwrap(), 0);
    assert!(lab.run(&a, hold::list_rules).unwrap().is_empty());
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.a,
            "iptables",
            "-t",
            "raw",
            "-S",
            "PREROUTING",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("someone-else"));

    // Bad packets: a clear error, nothing sent.
    let err = lab
        .run(&a, || hold::inject(&[vec![0x45, 0, 0, 20], vec![]]))
        .unwrap_err();
    assert!(
        matches!(err, HoldError::BadPacket { index: 0, .. }),
        "{err}"
    );
    let err = lab
        .run(&a, || {
            Hold::install("198.18.0.1".parse().unwrap(), Ports::Tcp(vec![]), 4)
        })
        .unwrap_err();
    assert!(matches!(err, HoldError::NoPorts), "{err}");
    // A queue number already read by a live hold is refused.
    let first = lab
        .run(&a, || {
            Hold::install("198.18.0.1".parse().unwrap(), Ports::AllTcp, 5)
        })
        .unwrap();
    let err = lab
        .run(&a, || {
            Hold::install("198.18.0.2".parse().unwrap(), Ports::AllTcp, 5)
        })
        .unwrap_err();
    eprintln!("second bind: {err}");
    assert!(matches!(err, HoldError::Queue { .. }), "{err}");
    drop(first);
}

/// A silenced hold drops what the VIP's sockets send (a frozen socket's
/// timers must not reach the peer); unsilencing lets them speak again.
fn silenced_hold_cycle(tag: &str, vip: IpAddr) {
    let lab = Lab::new(tag);
    let port = 7003;
    let listener = lab.listen(&lab.a, port);
    let target = SocketAddr::new(vip, port);
    let mut client = lab
        .run(&lab.b, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3))
        })
        .expect("connect");
    let (mut server, _) = listener.accept().unwrap();
    let a = lab.a.clone();
    let mut hold = lab
        .run(&a, move || Hold::install_silenced(vip, &[port][..], 4))
        .unwrap();
    assert!(hold.silenced());
    let rules = lab.run(&a, hold::list_rules).unwrap();
    assert_eq!(rules.len(), 2, "ingress and egress rules: {rules:?}");

    server.write_all(b"while frozen").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut buf = [0u8; 64];
    let quiet = client.read(&mut buf);
    assert!(
        matches!(&quiet, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "the silenced socket's bytes reached the peer: {quiet:?}"
    );

    hold.unsilence().unwrap();
    assert!(!hold.silenced());
    let rules = lab.run(&a, hold::list_rules).unwrap();
    assert_eq!(rules.len(), 1, "the ingress rule stays: {rules:?}");
    // The socket's retransmission now gets through.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"while frozen");
    hold.release().unwrap();
    let rules = lab.run(&a, hold::list_rules).unwrap();
    assert!(rules.is_empty(), "rules left: {rules:?}");
}

#[test]
fn silenced_hold_v4() {
    silenced_hold_cycle("hsil4", "198.18.0.1".parse().unwrap());
}

#[test]
fn silenced_hold_v6() {
    silenced_hold_cycle("hsil6", "fd00:198:18::1".parse().unwrap());
}
