//! Freeze and thaw of live TCP connections with TCP_REPAIR, on loopback
//! inside private network namespaces (needs root).
//!
//! Each test runs on a thread that unshares its own network namespace, so
//! tests run side by side and nothing touches the machine's network. A
//! "move" is what baton does on one host: hold the server port's incoming
//! traffic (an iptables DROP rule here, standing in for the NFQUEUE hold),
//! freeze the server socket, close it silently, thaw it, release the hold.
//! Every test checks the bytes at both ends (SHA-256) and that no RST or
//! abort happened in the namespace.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use baton_core::tcp_state::{TcpConnState, TcpState};
use baton_net::repair::{self, INJECT_MARK};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- harness

/// Runs `f` on a thread inside a new private network namespace with `lo`
/// up; fails the test if it panics or takes longer than `limit`.
fn in_netns<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("netns-test".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                baton_net::netns::unshare_private().expect("unshare a private netns (needs root)");
                // A child process inherits the namespace of the thread forking it.
                run("ip", &["link", "set", "lo", "up"]);
                let before = Counters::read();
                let out = f();
                Counters::read().assert_no_resets_since(&before, SILENT_CLOSES.get());
                out
            }));
            let _ = tx.send(r);
        })
        .expect("spawn test thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counters of resets and aborts in this thread's namespace
/// (`/proc/net` is the namespace of the process's main thread, so
/// `/proc/thread-self/net` it is).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counters(HashMap<String, u64>);

thread_local! {
    /// Silent closes of ESTABLISHED / CLOSE_WAIT sockets on this thread:
    /// the kernel counts each in Tcp:EstabResets (any move from those
    /// states to CLOSE counts), though nothing is sent.
    static SILENT_CLOSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

const RESET_COUNTERS: &[&str] = &[
    "Tcp:OutRsts",
    "Tcp:AttemptFails",
    "TcpExt:TCPAbortOnData",
    "TcpExt:TCPAbortOnClose",
    "TcpExt:TCPAbortOnMemory",
    "TcpExt:TCPAbortOnTimeout",
    "TcpExt:TCPAbortOnLinger",
    "TcpExt:TCPAbortFailed",
];

impl Counters {
    fn read() -> Self {
        let map = baton_net::counters::snapshot().expect("reading /proc/thread-self/net");
        for name in RESET_COUNTERS.iter().chain(&["Tcp:EstabResets"]) {
            assert!(map.contains_key(*name), "counter {name} missing");
        }
        Counters(map)
    }

    fn assert_no_resets_since(&self, before: &Counters, silent_closes: u64) {
        for name in RESET_COUNTERS {
            assert_eq!(
                self.0[*name], before.0[*name],
                "{name} increased: a reset or abort happened"
            );
        }
        assert_eq!(
            self.0["Tcp:EstabResets"] - before.0["Tcp:EstabResets"],
            silent_closes,
            "Tcp:EstabResets counts other than our silent closes"
        );
    }
}

/// Drops the incoming TCP traffic to `port` until dropped: stands in for
/// baton's hold during a move. Lets the FINs `thaw` injects through.
struct Hold {
    tool: &'static str,
    args: Vec<String>,
}

impl Hold {
    fn new(addr: SocketAddr) -> Hold {
        let tool = if addr.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        let args: Vec<String> = [
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &addr.port().to_string(),
            "-m",
            "mark",
            "!",
            "--mark",
            &INJECT_MARK.to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut insert = vec!["-w", "-I"];
        insert.extend(args.iter().map(String::as_str));
        run(tool, &insert);
        Hold { tool, args }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut delete = vec!["-w", "-D"];
        delete.extend(self.args.iter().map(String::as_str));
        run(self.tool, &delete);
    }
}

/// The client gives up retransmitting after 10 ms instead of 200 ms, so
/// segments dropped during a hold come back quickly (TCP_RTO_MIN_US,
/// Linux 6.11+; ignored where missing).
fn fast_rto(s: &TcpStream) {
    const TCP_RTO_MIN_US: libc::c_int = 45;
    let v: libc::c_int = 10_000;
    // SAFETY: valid fd, pointer to an int of the given size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            TCP_RTO_MIN_US,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn tcp_state_of(s: &impl AsRawFd) -> u8 {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: valid fd; the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO");
    info[0]
}

fn wait_state(s: &impl AsRawFd, want: u8, what: &str) {
    let start = Instant::now();
    while tcp_state_of(s) != want {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{what}: state {} never became {want}",
            tcp_state_of(s)
        );
        thread::sleep(Duration::from_millis(1));
    }
}

const TCP_CLOSE: u8 = 7;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

/// A connected pair on `ip`: (listener, client, server side).
fn pair(ip: std::net::IpAddr) -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind((ip, 0)).expect("bind listener");
    let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    fast_rto(&client);
    (listener, client, server)
}

fn v4() -> std::net::IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

fn v6() -> std::net::IpAddr {
    Ipv6Addr::LOCALHOST.into()
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Reads until EOF (with the socket's timeout as a bound).
fn read_to_end(mut s: &TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to EOF");
    out
}

/// One move of the server socket: hold, freeze, (wire round trip), close
/// silently, thaw, release. Checks the thawed socket has the same ends.
fn move_socket(server: TcpStream) -> (TcpStream, TcpConnState) {
    let local = server.local_addr().unwrap();
    let peer = server.peer_addr().unwrap();
    let _hold = Hold::new(local);
    let state = repair::freeze(server.as_fd()).expect("freeze");
    let bytes = state.encode();
    let decoded = TcpConnState::decode(&bytes).expect("decode");
    assert_eq!(decoded, state);
    if matches!(state.state, TcpState::Established | TcpState::CloseWait) {
        SILENT_CLOSES.set(SILENT_CLOSES.get() + 1);
    }
    repair::close_silently(OwnedFd::from(server)).expect("close silently");
    let thawed = match repair::thaw(&decoded) {
        Ok(t) => t,
        Err(e) => {
            let o = Command::new("ss").args(["-tanoei"]).output().unwrap();
            panic!(
                "thaw: {e}\n{state:?}\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
    };
    assert_eq!(thawed.local_addr().unwrap(), local);
    assert_eq!(thawed.peer_addr().unwrap(), peer);
    thawed.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    thawed.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    (thawed, state)
}

/// Panics with what the namespace's TCP looks like.
fn stall_report(what: &str) -> ! {
    let o = Command::new("ss").args(["-tanoei"]).output().unwrap();
    let r = Command::new("iptables-save").output().unwrap();
    let r6 = Command::new("ip6tables-save").output().unwrap();
    let mut c: Vec<_> = Counters::read()
        .0
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .collect();
    c.sort();
    panic!(
        "{what}\n{}\n{}{}\n{c:?}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r6.stdout),
    );
}

// ---------------------------------------------------------------- (a) echo with moves

/// Echo server that moves its socket every few milliseconds while a client
/// streams random data and reads the echo.
fn echo_with_moves(ip: std::net::IpAddr, total: usize, min_moves: usize) {
    let (listener, client, server) = pair(ip);
    let data = random_bytes(total as u64, total);
    let expected = sha(&data);

    let writer = {
        let mut c = client.try_clone().unwrap();
        thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(7);
            let mut off = 0;
            while off < data.len() {
                let n = rng.gen_range(1..=32 * 1024).min(data.len() - off);
                c.write_all(&data[off..off + n]).expect("client write");
                off += n;
                thread::sleep(Duration::from_micros(rng.gen_range(0..400)));
            }
            c.shutdown(Shutdown::Write).unwrap();
        })
    };
    let reader = {
        let c = client.try_clone().unwrap();
        thread::spawn(move || read_to_end(&c))
    };

    let mut sock = server;
    sock.set_nonblocking(true).unwrap();
    let mut pending: Vec<u8> = Vec::new();
    let mut seen = Sha256::new();
    let mut echoed = Sha256::new();
    let mut received = 0usize;
    let mut moves = 0usize;
    let move_every = total / (min_moves + 4);
    let mut next_move = move_every;
    let mut eof = false;
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    while !(eof && pending.is_empty()) {
        if start.elapsed() > Duration::from_secs(5) {
            stall_report(&format!(
                "echo stalled after {moves} moves, {received} bytes in, {} pending",
                pending.len()
            ));
        }
        let mut progressed = false;
        if !eof && pending.len() < 1 << 20 {
            match sock.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => {
                    seen.update(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                    received += n;
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("server read: {e}"),
            }
        }
        if !pending.is_empty() {
            match sock.write(&pending) {
                Ok(n) => {
                    echoed.update(&pending[..n]);
                    pending.drain(..n);
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("server write: {e}"),
            }
        }
        if !eof && received >= next_move {
            let (thawed, _) = move_socket(sock);
            sock = thawed;
            sock.set_nonblocking(true).unwrap();
            moves += 1;
            next_move += move_every;
        }
        if !progressed {
            thread::sleep(Duration::from_micros(200));
        }
    }
    sock.shutdown(Shutdown::Write).unwrap();
    let wait = Instant::now();
    while !(reader.is_finished() && writer.is_finished()) {
        if wait.elapsed() > Duration::from_secs(5) {
            stall_report(&format!("client stalled after {moves} moves"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    writer.join().expect("writer");
    let back = reader.join().expect("reader");
    assert_eq!(received, total);
    assert_eq!(back.len(), total, "echoed byte count");
    assert_eq!(
        sha(&back),
        expected,
        "client: echo differs from what it sent"
    );
    assert_eq!(
        <[u8; 32]>::from(seen.finalize()),
        expected,
        "server: received bytes differ"
    );
    assert_eq!(
        <[u8; 32]>::from(echoed.finalize()),
        expected,
        "server: sent bytes differ"
    );
    assert!(moves >= min_moves, "only {moves} moves");
    eprintln!(
        "{ip}: {total} bytes echoed across {moves} moves in {:?}",
        start.elapsed()
    );
    drop(listener);
}

#[test]
fn echo_survives_many_moves_ipv4() {
    in_netns(Duration::from_secs(30), || {
        echo_with_moves(v4(), 4 << 20, 20)
    });
}

#[test]
fn echo_survives_many_moves_ipv6() {
    in_netns(Duration::from_secs(30), || {
        echo_with_moves(v6(), 4 << 20, 20)
    });
}

// ---------------------------------------------------------------- (b) full queues

/// Writes as much of `data` as the socket takes without blocking.
fn write_until_full(s: &TcpStream, data: &[u8]) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut off = 0;
    let mut w = s;
    loop {
        match w.write(&data[off..]) {
            Ok(n) => {
                off += n;
                if off == data.len() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    off
}

/// Both sides have bytes queued at the freeze: the server has not read the
/// client's, the client has not read the server's (so the server holds
/// unacked and unsent bytes). After the thaw (or resume) every byte
/// arrives once.
fn queues_survive(ip: std::net::IpAddr, thaw: bool) {
    let (_listener, client, server) = pair(ip);
    let up = random_bytes(1, 3 << 20);
    let down = random_bytes(2, 8 << 20);

    // The client sends everything; it blocks once the server's receive
    // queue and its own send queue are full, and finishes after the move.
    let (moved_tx, moved_rx) = mpsc::channel::<()>();
    let writer = {
        let mut c = client.try_clone().unwrap();
        let up = up.clone();
        thread::spawn(move || {
            c.write_all(&up).expect("client write");
            moved_rx.recv().unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        })
    };
    let sent = write_until_full(&server, &down);
    assert!(sent < down.len(), "the server's send queue never filled");
    thread::sleep(Duration::from_millis(50));

    let server = if thaw {
        let (thawed, state) = move_socket(server);
        eprintln!(
            "{ip}: frozen with {} unread, {} unacked, {} unsent bytes",
            state.unread.len(),
            state.unacked.len(),
            state.unsent.len()
        );
        assert_eq!(state.state, TcpState::Established);
        assert!(!state.unread.is_empty(), "no unread bytes at freeze");
        assert!(!state.unsent.is_empty(), "no unsent bytes at freeze");
        assert_eq!(state.unread[..], up[..state.unread.len()]);
        thawed
    } else {
        let hold = Hold::new(server.local_addr().unwrap());
        let state = repair::freeze(server.as_fd()).expect("freeze");
        assert!(!state.unread.is_empty() && !state.unsent.is_empty());
        repair::resume(server.as_fd()).expect("resume");
        drop(hold);
        server
    };
    moved_tx.send(()).unwrap();

    let reader = {
        let c = client.try_clone().unwrap();
        thread::spawn(move || read_to_end(&c))
    };
    let rest = {
        let mut s = server.try_clone().unwrap();
        let down = down.clone();
        thread::spawn(move || {
            s.write_all(&down[sent..]).expect("server write");
            s.shutdown(Shutdown::Write).unwrap();
        })
    };
    let got_up = read_to_end(&server);
    rest.join().unwrap();
    writer.join().unwrap();
    let got_down = reader.join().unwrap();
    assert_eq!(got_up.len(), up.len());
    assert_eq!(sha(&got_up), sha(&up), "server received other bytes");
    assert_eq!(got_down.len(), down.len());
    assert_eq!(sha(&got_down), sha(&down), "client received other bytes");
}

#[test]
fn full_queues_survive_a_move_ipv4() {
    in_netns(Duration::from_secs(20), || queues_survive(v4(), true));
}

#[test]
fn full_queues_survive_a_move_ipv6() {
    in_netns(Duration::from_secs(20), || queues_survive(v6(), true));
}

// ---------------------------------------------------------------- (c) resume

#[test]
fn resume_after_freeze_keeps_serving() {
    in_netns(Duration::from_secs(20), || {
        queues_survive(v4(), false);
        queues_survive(v6(), false);
    });
}

#[test]
fn resume_then_move_then_echo() {
    in_netns(Duration::from_secs(20), || {
        let (_l, mut client, server) = pair(v4());
        let mut server = server;
        for round in 0..6u8 {
            let state = repair::freeze(server.as_fd()).expect("freeze");
            if round % 2 == 0 {
                repair::resume(server.as_fd()).expect("resume");
            } else {
                drop(state);
                server = move_socket(server).0;
            }
            let msg = random_bytes(round as u64, 10_000 + round as usize);
            client.write_all(&msg).unwrap();
            let mut got = vec![0u8; msg.len()];
            (&server).read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
            (&server).write_all(&got).unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).unwrap();
            assert_eq!(back, msg);
        }
    });
}

#[test]
fn freeze_refuses_a_listener_and_leaves_it_working() {
    in_netns(Duration::from_secs(10), || {
        let (listener, _c, _s) = pair(v4());
        let err = repair::freeze(listener.as_fd()).unwrap_err();
        assert!(err.to_string().contains("TCP_REPAIR"), "{err}");
        let c2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s2, _) = listener.accept().unwrap();
        drop((c2, s2));
    });
}

#[test]
fn thaw_refuses_an_invalid_state_before_any_syscall() {
    in_netns(Duration::from_secs(10), || {
        let (_l, _c, server) = pair(v4());
        let mut state = repair::freeze(server.as_fd()).expect("freeze");
        repair::resume(server.as_fd()).unwrap();
        state.options.mss = 0;
        let err = repair::thaw(&state).unwrap_err();
        assert!(err.to_string().contains("MSS"), "{err}");
    });
}

/// After a thaw, a listener can still be bound on the connection's port
/// (repair mode drops SO_REUSEADDR; thaw sets it again).
#[test]
fn listener_can_rebind_next_to_a_thawed_socket() {
    in_netns(Duration::from_secs(10), || {
        let (listener, mut client, server) = pair(v4());
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (server, _) = move_socket(server);
        // std's TcpListener::bind sets SO_REUSEADDR, as servers do.
        let again = TcpListener::bind(addr).expect("rebind the listener next to the thawed socket");
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&server).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        drop(again);
    });
}

// ---------------------------------------------------------------- (d) half-closed

/// The client closed its side before the freeze: the server is in
/// CLOSE_WAIT with unread bytes and the FIN behind them.
fn close_wait_survives(ip: std::net::IpAddr) {
    let (_l, mut client, server) = pair(ip);
    let up = random_bytes(3, 60_000);
    client.write_all(&up).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    wait_state(&server, TCP_CLOSE_WAIT, "server after client FIN");

    let (server, state) = move_socket(server);
    assert_eq!(state.state, TcpState::CloseWait);
    assert_eq!(state.unread.len(), up.len());
    assert_eq!(tcp_state_of(&server), TCP_CLOSE_WAIT);

    let got = read_to_end(&server);
    assert_eq!(sha(&got), sha(&up));
    let down = random_bytes(4, 500_000);
    (&server).write_all(&down).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let back = read_to_end(&client);
    assert_eq!(sha(&back), sha(&down));
    wait_state(&server, TCP_CLOSE, "server after its FIN was acknowledged");
}

#[test]
fn close_wait_survives_a_move_ipv4() {
    in_netns(Duration::from_secs(10), || close_wait_survives(v4()));
}

#[test]
fn close_wait_survives_a_move_ipv6() {
    in_netns(Duration::from_secs(10), || close_wait_survives(v6()));
}

/// CLOSE_WAIT where the application already read the EOF: the thawed
/// socket reports EOF again, nothing else.
#[test]
fn close_wait_after_eof_was_read() {
    in_netns(Duration::from_secs(10), || {
        let (_l, client, server) = pair(v4());
        client.shutdown(Shutdown::Write).unwrap();
        assert!(read_to_end(&server).is_empty());
        let (server, state) = move_socket(server);
        assert_eq!(state.state, TcpState::CloseWait);
        assert!(read_to_end(&server).is_empty());
        (&server).write_all(b"bye").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&client), b"bye");
    });
}

/// The server closed its side and the client acknowledged the FIN: the
/// server is in FIN_WAIT2 and still receives.
fn fin_wait2_survives(ip: std::net::IpAddr) {
    let (_l, mut client, server) = pair(ip);
    let down = random_bytes(5, 100_000);
    (&server).write_all(&down).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let got = read_to_end(&client);
    assert_eq!(sha(&got), sha(&down));
    wait_state(
        &server,
        TCP_FIN_WAIT2,
        "server after its FIN was acknowledged",
    );

    let (server, state) = move_socket(server);
    assert_eq!(state.state, TcpState::FinWait2);

    let up = random_bytes(6, 300_000);
    client.write_all(&up).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got_up = read_to_end(&server);
    assert_eq!(sha(&got_up), sha(&up));
    // The client saw exactly one EOF and nothing after it.
    assert!(read_to_end(&client).is_empty());
}

#[test]
fn fin_wait2_survives_a_move_ipv4() {
    in_netns(Duration::from_secs(10), || fin_wait2_survives(v4()));
}

#[test]
fn fin_wait2_survives_a_move_ipv6() {
    in_netns(Duration::from_secs(10), || fin_wait2_survives(v6()));
}

/// The server wrote more than the (non-reading) client takes and closed:
/// FIN_WAIT1 with unsent bytes and the FIN queued behind them.
#[test]
fn fin_wait1_with_unsent_bytes_survives_a_move() {
    in_netns(Duration::from_secs(10), || {
        for ip in [v4(), v6()] {
            let (_l, client, server) = pair(ip);
            let down = random_bytes(7, 6 << 20);
            let sent = write_until_full(&server, &down);
            server.shutdown(Shutdown::Write).unwrap();
            thread::sleep(Duration::from_millis(20));
            let (server, state) = move_socket(server);
            assert_eq!(state.state, TcpState::FinWait1);
            assert!(!state.unsent.is_empty());
            let got = read_to_end(&client);
            assert_eq!(got.len(), sent);
            assert_eq!(sha(&got), sha(&down[..sent]));
            client.shutdown(Shutdown::Write).unwrap();
            assert!(read_to_end(&server).is_empty());
        }
    });
}

/// Both sides closed, the client's ACK of the server's FIN lost (held):
/// LAST_ACK. The thawed socket re-sends its FIN and the client (in
/// TIME_WAIT) acknowledges it.
#[test]
fn last_ack_survives_a_move() {
    in_netns(Duration::from_secs(10), || {
        for ip in [v4(), v6()] {
            let (_l, client, server) = pair(ip);
            client.shutdown(Shutdown::Write).unwrap();
            assert!(read_to_end(&server).is_empty());
            let local = server.local_addr().unwrap();
            let hold = Hold::new(local);
            (&server).write_all(b"last words").unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            assert_eq!(read_to_end(&client), b"last words");
            wait_state(&server, TCP_LAST_ACK, "server after both FINs");
            let state = repair::freeze(server.as_fd()).expect("freeze");
            assert_eq!(state.state, TcpState::LastAck);
            assert_eq!(state.unacked, b"last words");
            repair::close_silently(OwnedFd::from(server)).unwrap();
            let server = repair::thaw(&state).expect("thaw");
            drop(hold);
            assert_eq!(tcp_state_of(&server), TCP_LAST_ACK);
            wait_state(&server, TCP_CLOSE, "thawed server after the client's ACK");
        }
    });
}

/// Bytes the server sent and the client received, whose ACKs were lost
/// (held; less than the client's initial window, which the lost ACKs
/// cannot open): they are frozen as unacked, restored as sent, and the client
/// gets each byte once.
#[test]
fn unacked_bytes_survive_a_move() {
    in_netns(Duration::from_secs(10), || {
        for ip in [v4(), v6()] {
            let (_l, mut client, server) = pair(ip);
            let down = random_bytes(8, 300_000);
            let hold = Hold::new(server.local_addr().unwrap());
            (&server).write_all(&down[..40_000]).unwrap();
            let mut got = vec![0u8; 40_000];
            client.read_exact(&mut got).unwrap();
            thread::sleep(Duration::from_millis(10));
            let state = repair::freeze(server.as_fd()).expect("freeze");
            assert_eq!(state.unacked.len(), 40_000, "ACKs were held");
            assert_eq!(state.unacked[..], down[..40_000]);
            SILENT_CLOSES.set(SILENT_CLOSES.get() + 1);
            repair::close_silently(OwnedFd::from(server)).unwrap();
            let server = repair::thaw(&state).expect("thaw");
            drop(hold);
            // The client's next segment acknowledges the restored bytes.
            client.write_all(b"ack").unwrap();
            let mut ack = [0u8; 3];
            (&server).read_exact(&mut ack).unwrap();
            (&server).write_all(&down[40_000..]).unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            got.extend(read_to_end(&client));
            assert_eq!(got.len(), down.len());
            assert_eq!(sha(&got), sha(&down));
        }
    });
}

/// A dual-stack listener accepts IPv4 clients on AF_INET6 sockets with
/// v4-mapped addresses; they are frozen as IPv4 and thawed as AF_INET.
#[test]
fn v4_mapped_connection_thaws_as_ipv4() {
    in_netns(Duration::from_secs(10), || {
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(server.local_addr().unwrap().is_ipv6());
        client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let hold = Hold::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let state = repair::freeze(server.as_fd()).expect("freeze");
        assert_eq!(state.local, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        assert!(state.remote.is_ipv4());
        SILENT_CLOSES.set(SILENT_CLOSES.get() + 1);
        repair::close_silently(OwnedFd::from(server)).unwrap();
        let server = repair::thaw(&state).expect("thaw");
        drop(hold);
        assert!(server.local_addr().unwrap().is_ipv4());
        client.write_all(b"mapped").unwrap();
        let mut buf = [0u8; 6];
        (&server).read_exact(&mut buf).unwrap();
        (&server).write_all(&buf).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"mapped");
    });
}
