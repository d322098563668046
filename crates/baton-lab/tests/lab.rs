//! The lab, for real: namespaces, bridge, veths, faults. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use baton_lab::{sender_runs, speakers_overlap, Fault, Lab, SentFrame};
use baton_net::vip::{blocking, Announce, VipSpec};

/// Namespaces and root-namespace interfaces whose name starts with `lab-`.
fn leftovers(lab: &str) -> Vec<String> {
    let prefix = format!("{lab}-");
    let mut found: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    found.extend(
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned()),
    );
    found.retain(|n| n.starts_with(&prefix));
    found
}

/// Whether `from` can open a TCP connection to `to` and exchange a byte.
fn tcp_reaches(lab: &Lab, from: &str, to: &str, v6: bool) -> bool {
    let target = lab.host(to).unwrap().addr(v6);
    let listener = lab
        .run_in(to, move || {
            TcpListener::bind(SocketAddr::new(target, 0)).unwrap()
        })
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || -> Option<()> {
        listener.set_nonblocking(true).ok()?;
        for _ in 0..100 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).ok()?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).ok()?;
                    s.write_all(&b).ok()?;
                    return Some(());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        None
    });
    let ok = lab
        .run_in(from, move || -> bool {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut b = [7u8];
            s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() && b == [7]
        })
        .unwrap();
    let _ = server.join();
    ok
}

/// Whether `from` reaches `to` within a few seconds: after a heal or a
/// link coming back, neighbour entries that failed meanwhile are resolved
/// again, as on a real network.
fn reaches_again(lab: &Lab, from: &str, to: &str, v6: bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if tcp_reaches(lab, from, to, v6) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
    }
}

#[test]
fn two_labs_side_by_side_every_host_reaches_every_other() {
    let _deadline = baton_lab::Deadline::start(
        "two_labs_side_by_side_every_host_reaches_every_other",
        std::time::Duration::from_secs(120),
    );
    let a = Lab::create(&Lab::unique_name("la"), 3, 2).unwrap();
    let b = Lab::create(&Lab::unique_name("lb"), 2, 1).unwrap();
    for lab in [&a, &b] {
        for from in lab.hosts() {
            for to in lab.hosts().iter().filter(|h| h.name != from.name) {
                for v6 in [false, true] {
                    assert!(
                        tcp_reaches(lab, &from.name, &to.name, v6),
                        "{}: {} -> {} (v6 {v6})",
                        lab.name(),
                        from.name,
                        to.name
                    );
                }
            }
        }
    }
    let status = a.status().unwrap();
    assert_eq!(status.hosts.len(), 5);
    assert!(status
        .hosts
        .iter()
        .all(|h| h.link == "up" && h.ipv4.is_some() && h.ipv6.is_some()));
    let names = [a.name().to_owned(), b.name().to_owned()];
    drop(a);
    drop(b);
    for name in names {
        assert_eq!(leftovers(&name), Vec::<String>::new());
    }
}

#[test]
fn isolate_cuts_a_host_off_and_heal_restores_it() {
    let _deadline = baton_lab::Deadline::start(
        "isolate_cuts_a_host_off_and_heal_restores_it",
        std::time::Duration::from_secs(120),
    );
    let lab = Lab::create(&Lab::unique_name("fi"), 2, 1).unwrap();
    let pid = lab
        .spawn({
            let mut c = lab.command("node2", "sleep").unwrap();
            c.arg("30");
            c
        })
        .unwrap();
    lab.fault("node2", Fault::Isolate).unwrap();
    assert_eq!(lab.status().unwrap().hosts[1].link, "isolated");
    for v6 in [false, true] {
        assert!(!tcp_reaches(&lab, "client1", "node2", v6));
        assert!(!tcp_reaches(&lab, "node2", "node1", v6));
        assert!(tcp_reaches(&lab, "client1", "node1", v6));
    }
    // Its processes keep running.
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    lab.fault("node2", Fault::Heal).unwrap();
    for v6 in [false, true] {
        assert!(reaches_again(&lab, "client1", "node2", v6));
    }
    lab.fault("node2", Fault::LinkDown).unwrap();
    assert!(!tcp_reaches(&lab, "client1", "node2", false));
    lab.fault("node2", Fault::LinkUp).unwrap();
    assert!(reaches_again(&lab, "client1", "node2", false));
}

#[test]
fn crash_kills_every_process_and_takes_the_link_down() {
    let _deadline = baton_lab::Deadline::start(
        "crash_kills_every_process_and_takes_the_link_down",
        std::time::Duration::from_secs(120),
    );
    let lab = Lab::create(&Lab::unique_name("cr"), 2, 1).unwrap();
    let sleeper = |host: &str, secs: &str| {
        let mut c = lab.command(host, "sleep").unwrap();
        c.arg(secs);
        c
    };
    lab.spawn(sleeper("node1", "30")).unwrap();
    lab.spawn(sleeper("node1", "31")).unwrap();
    let survivor = lab.spawn(sleeper("node2", "32")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let running = |host: &str| {
        lab.status()
            .unwrap()
            .hosts
            .into_iter()
            .find(|h| h.name == host)
            .unwrap()
    };
    assert_eq!(running("node1").processes.len(), 2);
    lab.crash("node1").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let node1 = running("node1");
    assert_eq!(node1.processes.len(), 0);
    assert_eq!(node1.link, "down");
    assert!(std::path::Path::new(&format!("/proc/{survivor}")).exists());
    assert!(!tcp_reaches(&lab, "client1", "node1", false));
    assert!(tcp_reaches(&lab, "client1", "node2", false));
}

#[test]
fn a_name_in_use_is_refused_and_nothing_is_left_behind() {
    let _deadline = baton_lab::Deadline::start(
        "a_name_in_use_is_refused_and_nothing_is_left_behind",
        std::time::Duration::from_secs(120),
    );
    let name = Lab::unique_name("du");
    let lab = Lab::create(&name, 1, 0).unwrap();
    let err = Lab::create(&name, 1, 0).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    // The refused attempt did not remove the existing lab.
    assert_eq!(lab.status().unwrap().hosts.len(), 1);
    drop(lab);
    assert_eq!(leftovers(&name), Vec::<String>::new());
    // Down is safe twice.
    baton_lab::down(&name).unwrap();
    assert!(Lab::open(&name).is_err());
}

#[test]
fn a_lab_is_removed_when_the_test_panics() {
    let _deadline = baton_lab::Deadline::start(
        "a_lab_is_removed_when_the_test_panics",
        std::time::Duration::from_secs(120),
    );
    let name = Lab::unique_name("pa");
    let inner = name.clone();
    let result = std::panic::catch_unwind(move || {
        let _lab = Lab::create(&inner, 1, 1).unwrap();
        panic!("test failure inside a lab");
    });
    assert!(result.is_err());
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn vips_are_outside_host_addresses() {
    let _deadline = baton_lab::Deadline::start(
        "vips_are_outside_host_addresses",
        std::time::Duration::from_secs(120),
    );
    let (v4, v6) = Lab::vip(1);
    let lab = Lab::create(&Lab::unique_name("vi"), 1, 1).unwrap();
    for h in lab.hosts() {
        assert_ne!(IpAddr::V4(v4), h.addr(false));
        assert_ne!(IpAddr::V6(v6), h.addr(true));
    }
}

/// Whether one ping from `from` (from address `src` if given) to `to` is
/// answered within 2 s.
fn pings(lab: &Lab, from: &str, to: IpAddr, src: Option<IpAddr>) -> bool {
    let mut ping = lab.command(from, "ping").unwrap();
    ping.args(["-n", "-q", "-c", "1", "-W", "2"]);
    if let Some(src) = src {
        ping.args(["-I", &src.to_string()]);
    }
    ping.arg(to.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn link(lab: &Lab, host: &str) -> String {
    lab.status()
        .unwrap()
        .hosts
        .into_iter()
        .find(|h| h.name == host)
        .unwrap()
        .link
}

#[test]
fn partition_cuts_a_node_off_its_peers_only_and_heal_restores_it() {
    let deadline = baton_lab::Deadline::start(
        "partition_cuts_a_node_off_its_peers_only_and_heal_restores_it",
        std::time::Duration::from_secs(180),
    );
    let lab = Lab::create(&Lab::unique_name("pt"), 3, 1).unwrap();
    deadline.phase("node1 partitioned");
    lab.fault("node1", Fault::Partition).unwrap();
    // Twice is the same as once.
    lab.fault("node1", Fault::Partition).unwrap();
    assert_eq!(link(&lab, "node1"), "partitioned");
    assert_eq!(link(&lab, "node2"), "up");
    for v6 in [false, true] {
        let client = lab.host("client1").unwrap().addr(v6);
        let node1 = lab.host("node1").unwrap().addr(v6);
        assert!(
            pings(&lab, "node1", client, None),
            "node1 -> client1 (v6 {v6})"
        );
        assert!(
            pings(&lab, "client1", node1, None),
            "client1 -> node1 (v6 {v6})"
        );
        assert!(tcp_reaches(&lab, "client1", "node1", v6));
        assert!(tcp_reaches(&lab, "node1", "client1", v6));
        for peer in ["node2", "node3"] {
            let peer_addr = lab.host(peer).unwrap().addr(v6);
            assert!(
                !pings(&lab, "node1", peer_addr, None),
                "node1 -> {peer} (v6 {v6})"
            );
            assert!(!pings(&lab, peer, node1, None), "{peer} -> node1 (v6 {v6})");
            assert!(!tcp_reaches(&lab, "node1", peer, v6));
            assert!(!tcp_reaches(&lab, peer, "node1", v6));
        }
        assert!(tcp_reaches(&lab, "node2", "node3", v6));
        assert!(tcp_reaches(&lab, "node3", "node2", v6));
    }
    deadline.phase("node2 partitioned too, node1 healed");
    lab.fault("node2", Fault::Partition).unwrap();
    lab.fault("node1", Fault::Heal).unwrap();
    assert_eq!(link(&lab, "node1"), "up");
    assert_eq!(link(&lab, "node2"), "partitioned");
    for v6 in [false, true] {
        assert!(reaches_again(&lab, "node1", "node3", v6));
        assert!(reaches_again(&lab, "node3", "node1", v6));
        assert!(!tcp_reaches(&lab, "node1", "node2", v6));
        assert!(!tcp_reaches(&lab, "node2", "node3", v6));
        assert!(tcp_reaches(&lab, "node2", "client1", v6));
    }
    deadline.phase("node2 healed");
    lab.fault("node2", Fault::Heal).unwrap();
    // A host with no fault: healing it changes nothing.
    lab.fault("node3", Fault::Heal).unwrap();
    for v6 in [false, true] {
        assert!(reaches_again(&lab, "node1", "node2", v6));
        assert!(reaches_again(&lab, "node2", "node1", v6));
        assert!(reaches_again(&lab, "node2", "node3", v6));
    }
    assert!(lab.status().unwrap().hosts.iter().all(|h| h.link == "up"));
    let err = lab
        .fault("client1", Fault::Partition)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only a node"), "{err}");
}

/// Puts `vips` on `host`'s eth0 as host addresses and announces them
/// (gratuitous ARP, unsolicited NA), as a node taking them over does.
fn take_vips(lab: &Lab, host: &str, vips: &[IpAddr]) {
    let vips = vips.to_vec();
    lab.run_in(host, move || {
        for vip in vips {
            let spec = VipSpec::new(vip, if vip.is_ipv4() { 32 } else { 128 }, "eth0");
            blocking::take(&spec, Announce::default()).unwrap();
        }
    })
    .unwrap();
}

fn release_vips(lab: &Lab, host: &str, vips: &[IpAddr]) {
    let vips = vips.to_vec();
    lab.run_in(host, move || {
        for vip in vips {
            let spec = VipSpec::new(vip, if vip.is_ipv4() { 32 } else { 128 }, "eth0");
            blocking::release(&spec).unwrap();
        }
    })
    .unwrap();
}

/// `host` speaks from each VIP and client1 talks to it there.
fn talk_at_vips(lab: &Lab, host: &str, vips: &[IpAddr]) {
    for &vip in vips {
        let client = lab.host("client1").unwrap().addr(vip.is_ipv6());
        assert!(pings(lab, host, client, Some(vip)), "{host} from {vip}");
        assert!(
            pings(lab, "client1", vip, None),
            "client1 -> {vip} at {host}"
        );
    }
}

#[test]
fn a_sender_watch_sees_an_address_move_from_one_node_to_another() {
    let deadline = baton_lab::Deadline::start(
        "a_sender_watch_sees_an_address_move_from_one_node_to_another",
        std::time::Duration::from_secs(120),
    );
    let lab = Lab::create(&Lab::unique_name("sw"), 2, 1).unwrap();
    let (v4, v6) = Lab::vip(9);
    let vips = [IpAddr::V4(v4), IpAddr::V6(v6)];
    take_vips(&lab, "node1", &vips);
    deadline.phase("watching a move");
    let watch = lab.watch_senders(&vips).unwrap();
    talk_at_vips(&lab, "node1", &vips);
    release_vips(&lab, "node1", &vips);
    take_vips(&lab, "node2", &vips);
    talk_at_vips(&lab, "node2", &vips);
    let frames = watch.finish().unwrap();
    assert!(frames.windows(2).all(|w| w[0].at <= w[1].at));
    for vip in vips {
        let runs = sender_runs(&frames, vip);
        let hosts: Vec<&str> = runs.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["node1", "node2"], "{vip}: {runs:?}");
        assert_eq!(speakers_overlap(&frames, vip), None);
        // node2's announcements are seen: as the ARP sender, and as the
        // target of its neighbour advertisements.
        let announced = if vip.is_ipv4() { "arp" } else { "na" };
        assert!(
            frames
                .iter()
                .any(|f| f.addr == vip && f.host == "node2" && f.kind == announced),
            "{vip}: {frames:?}"
        );
        assert!(frames
            .iter()
            .any(|f| f.addr == vip && f.host == "node1" && f.kind == "ip"));
    }
    // No other host's address is reported.
    assert!(frames.iter().all(|f| vips.contains(&f.addr)));

    deadline.phase("watching two holders at once");
    let watch = lab.watch_senders(&vips).unwrap();
    take_vips(&lab, "node1", &vips[..1]);
    let client = lab.host("client1").unwrap().addr(false);
    // Each sends from the VIP; the client answers only the holder its
    // neighbour entry names (node1's announcement won it over).
    for host in ["node1", "node2", "node1"] {
        pings(&lab, host, client, Some(vips[0]));
    }
    let frames = watch.finish().unwrap();
    let overlap = speakers_overlap(&frames, vips[0]).expect("node1 spoke twice");
    assert!(
        overlap.contains("node1") && overlap.contains("node2"),
        "{overlap}"
    );
}

#[test]
fn a_watch_is_stopped_with_its_lab_and_leaves_no_file() {
    let _deadline = baton_lab::Deadline::start(
        "a_watch_is_stopped_with_its_lab_and_leaves_no_file",
        std::time::Duration::from_secs(60),
    );
    let name = Lab::unique_name("wd");
    let lab = Lab::create(&name, 1, 1).unwrap();
    let switch = baton_net::netns::named_path(&format!("{name}-sw"));
    let files = std::env::temp_dir().join("baton-lab").join(&name);
    let watch = lab.watch_senders(&[IpAddr::V4(Lab::vip(1).0)]).unwrap();
    let first = baton_net::netns::pids_in(&switch);
    assert_eq!(first.len(), 1, "{first:?}");
    drop(watch);
    assert!(baton_net::netns::pids_in(&switch).is_empty());
    assert_eq!(std::fs::read_dir(&files).map(|d| d.count()).unwrap_or(0), 0);
    // A watch never finished nor dropped ends with the lab.
    let watch = lab.watch_senders(&[IpAddr::V4(Lab::vip(1).0)]).unwrap();
    let pids = baton_net::netns::pids_in(&switch);
    assert_eq!(pids.len(), 1, "{pids:?}");
    std::mem::forget(watch);
    drop(lab);
    assert!(!std::path::Path::new(&format!("/proc/{}", pids[0])).exists());
    assert!(!files.exists());
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

fn frame(at: f64, host: &str, addr: IpAddr) -> SentFrame {
    SentFrame {
        at,
        host: host.into(),
        addr,
        kind: "ip".into(),
    }
}

#[test]
fn sender_runs_group_frames_and_an_a_b_a_sequence_is_an_overlap() {
    let (v4, v6) = Lab::vip(1);
    let (a, b) = (IpAddr::V4(v4), IpAddr::V6(v6));
    let frames = [
        frame(1.0, "node1", a),
        frame(1.5, "node2", b),
        frame(2.0, "node1", a),
        frame(3.0, "node2", a),
        frame(3.5, "node1", b),
        frame(4.0, "node2", a),
        frame(5.0, "node1", a),
    ];
    let runs = sender_runs(&frames, a);
    let summary: Vec<(&str, f64, f64, usize)> = runs
        .iter()
        .map(|r| (r.host.as_str(), r.first, r.last, r.frames))
        .collect();
    assert_eq!(
        summary,
        [
            ("node1", 1.0, 2.0, 2),
            ("node2", 3.0, 4.0, 2),
            ("node1", 5.0, 5.0, 1)
        ]
    );
    let overlap = speakers_overlap(&frames, a).expect("node1, node2, node1");
    assert!(
        overlap.contains("node1") && overlap.contains("5.0"),
        "{overlap}"
    );
    // Without the last frame: a clean handover.
    assert_eq!(speakers_overlap(&frames[..6], a), None);
    assert_eq!(sender_runs(&frames[..6], a).len(), 2);
    // The other address: node2 then node1, no overlap.
    assert_eq!(sender_runs(&frames, b).len(), 2);
    assert_eq!(speakers_overlap(&frames, b), None);
    assert!(sender_runs(&[], a).is_empty());
}
