//! The NFQUEUE socket and the hold built on it, for real: a lab of one
//! node and one client (baton_lab), iptables rules queueing a test port.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use baton_lab::{Deadline, Lab};
use baton_net::hold::Hold;

const NODE: &str = "node1";
const CLIENT: &str = "client1";

fn lab(prefix: &str) -> Lab {
    Lab::create(&Lab::unique_name(prefix), 1, 1).expect("creating the lab")
}

fn addr_of(lab: &Lab, host: &str) -> IpAddr {
    lab.host(host).unwrap().addr(false)
}

/// Runs a command inside `host`; panics with its stderr if it fails.
fn sh(lab: &Lab, host: &str, program: &str, args: &[&str]) {
    let out = lab
        .command(host, program)
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lets the client put 1,000 small segments in flight at once: a large
/// initial congestion window towards the node, a large initial receive
/// window on the node, no autocorking of small writes.
fn allow_a_thousand_in_flight(lab: &Lab) {
    let node = addr_of(lab, NODE).to_string();
    let client = addr_of(lab, CLIENT).to_string();
    sh(
        lab,
        CLIENT,
        "ip",
        &[
            "route",
            "add",
            &format!("{node}/32"),
            "dev",
            "eth0",
            "initcwnd",
            "1000",
        ],
    );
    sh(
        lab,
        NODE,
        "ip",
        &[
            "route",
            "add",
            &format!("{client}/32"),
            "dev",
            "eth0",
            "initrwnd",
            "1000",
        ],
    );
    sh(lab, CLIENT, "sysctl", &["-qw", "net.ipv4.tcp_autocorking=0"]);
}

/// A connection from the client to `port` on the node: (client, server).
fn connect(lab: &Lab, port: u16) -> (TcpStream, TcpStream) {
    let listener: TcpListener = lab
        .run_in(NODE, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let target = SocketAddr::new(addr_of(lab, NODE), port);
    let client = lab
        .run_in(CLIENT, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3))
        })
        .unwrap()
        .expect("connecting");
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    (client, server)
}

const SEGMENTS: usize = 1000;
const SEGMENT: usize = 40;

fn stream_bytes() -> Vec<u8> {
    (0..SEGMENTS * SEGMENT)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect()
}

/// Sends the stream as [`SEGMENTS`] writes (one segment each).
fn send_in_segments(client: &mut TcpStream, bytes: &[u8]) {
    for chunk in bytes.chunks(SEGMENT) {
        client.write_all(chunk).unwrap();
    }
}

fn read_exactly(server: &mut TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    server.set_read_timeout(Some(limit)).unwrap();
    let mut got = vec![0u8; n];
    server.read_exact(&mut got).expect("reading the stream");
    got
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Figures for the report: how long installing a hold takes (median of
/// 20), and how long `accept_all` of 1,000 held packets takes.
#[test]
fn hold_timings() {
    let deadline = Deadline::start("hold_timings", Duration::from_secs(120));
    let lab = lab("nqt");
    let vip = addr_of(&lab, NODE);
    let port = 7100;

    for silenced in [false, true] {
        deadline.phase(format!("installing holds (silenced {silenced})"));
        let times = lab
            .run_in(NODE, move || {
                (0..20)
                    .map(|_| {
                        let t = Instant::now();
                        let hold = if silenced {
                            Hold::install_silenced(vip, &[port][..], 11)
                        } else {
                            Hold::install(vip, &[port][..], 11)
                        }
                        .unwrap();
                        let took = t.elapsed();
                        drop(hold);
                        took
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
        eprintln!(
            "MEASURE Hold::install{} median of 20: {:?} (min {:?}, max {:?})",
            if silenced { "_silenced" } else { "" },
            median(times.clone()),
            times.iter().min().unwrap(),
            times.iter().max().unwrap()
        );
    }

    deadline.phase("holding 1,000 segments");
    allow_a_thousand_in_flight(&lab);
    let (mut client, mut server) = connect(&lab, port);
    let hold = lab
        .run_in(NODE, move || Hold::install(vip, &[port][..], 12))
        .unwrap()
        .unwrap();
    let bytes = stream_bytes();
    send_in_segments(&mut client, &bytes);
    let held = hold.wait_held(SEGMENTS, Duration::from_secs(5));
    assert!(held >= SEGMENTS, "only {held} segments held");
    let t = Instant::now();
    let accepted = hold.accept_all().unwrap();
    let took = t.elapsed();
    eprintln!("MEASURE accept_all of {accepted} held packets: {took:?}");
    assert!(accepted >= SEGMENTS);
    deadline.phase("reading the stream");
    let got = read_exactly(&mut server, bytes.len(), Duration::from_secs(5));
    assert!(got == bytes, "the stream arrived altered");
    hold.release().unwrap();
}
