//! The lab, for real: namespaces, bridge, veths, faults. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use baton_lab::{Fault, Lab};

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
