//! The connection keeper with real processes and real TCP, each test in a
//! private network namespace of its own (needs root).
//!
//! Three processes per test, all this test binary: the test itself (the
//! clients), a "daemon" (re-executed as `--exact daemon_child` with
//! [`DAEMON_ENV`] set) that listens, accepts, and hands its sockets to a
//! keeper, and the keeper (re-executed by [`Keeper::spawn`] as
//! `--exact keeper_child`, which finds [`KEEPER_FD_ENV`] set). The test
//! drives the daemon with one command per line on its stdin; the daemon
//! answers on stdout with lines marked by [`PROTO`] (libtest prints its
//! own text there too).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use baton_lab::Deadline;
use baton_net::keeper::{run_keeper, Keeper, KEEPER_FD_ENV};

const DAEMON_ENV: &str = "BATON_KEEPER_TEST_DAEMON";
const PROTO: &str = "@@ ";
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client must hear nothing to count as "no FIN, no RST".
const SILENCE: Duration = Duration::from_secs(1);
/// Id the daemon holds its listener under.
const LISTENER_ID: u64 = u64::MAX;

const VIP4: &str = "198.18.0.10";
const VIP6: &str = "fd00:198:18::10";
const IFACE: &str = "kp0";
/// The other end of the veth pair carrying the VIPs.
const PEER: &str = "kp1";

// ------------------------------------------------------------ child roles

/// The keeper process (a no-op in a normal test run).
#[test]
fn keeper_child() {
    if std::env::var_os(KEEPER_FD_ENV).is_none() {
        return;
    }
    let code = match run_keeper() {
        Ok(exit) => {
            eprintln!("keeper {}: {exit:?}", std::process::id());
            0
        }
        Err(e) => {
            eprintln!("keeper {}: {e}", std::process::id());
            1
        }
    };
    std::process::exit(code);
}

/// The daemon process (a no-op in a normal test run).
#[test]
fn daemon_child() {
    if std::env::var_os(DAEMON_ENV).is_none() {
        return;
    }
    let code = match daemon_main() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("daemon: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn say(line: &str) {
    println!("{PROTO}{line}");
}

fn daemon_main() -> Result<(), Box<dyn std::error::Error>> {
    baton_net::raise_fd_limit(65_536)?;
    let exe = std::env::current_exe()?;
    let args: Vec<&OsStr> = ["--exact", "keeper_child", "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsStr::new)
        .collect();
    let mut keeper = Some(Keeper::spawn(&exe, &args)?);
    let listener = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    listener.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).into())?;
    listener.listen(4096)?;
    let listener: std::net::TcpListener = listener.into();
    let port = listener.local_addr()?.port();
    say(&format!(
        "ready {port} {}",
        keeper.as_ref().map_or(0, |k| k.pid())
    ));
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut ids: Vec<u64> = Vec::new();
    for line in std::io::stdin().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer: Result<String, Box<dyn std::error::Error>> = (|| match words[..] {
            ["accept", n] => {
                let n: usize = n.parse()?;
                for _ in 0..n {
                    let (mut s, _) = listener.accept()?;
                    let id = ids.len() as u64;
                    keeper.as_ref().ok_or("no keeper")?.hold(id, 0, s.as_fd())?;
                    s.write_all(b"hello")?;
                    conns.push(s);
                    ids.push(id);
                }
                Ok(format!("accepted {n}"))
            }
            ["hold-listener"] => {
                keeper
                    .as_ref()
                    .ok_or("no keeper")?
                    .hold(LISTENER_ID, 0, listener.as_fd())?;
                Ok("ok".into())
            }
            ["guard", addr, prefix, iface] => {
                keeper.as_ref().ok_or("no keeper")?.guard_address(
                    addr.parse()?,
                    prefix.parse()?,
                    iface,
                    0,
                )?;
                Ok("ok".into())
            }
            ["sync"] => {
                let s = keeper.as_ref().ok_or("no keeper")?.sync(IO_TIMEOUT)?;
                Ok(format!(
                    "synced {} {} {} {} {}",
                    s.held, s.listeners, s.guarded, s.refused, s.malformed
                ))
            }
            ["close-own"] => {
                conns.clear();
                Ok("ok".into())
            }
            ["release-all"] => {
                for id in &ids {
                    keeper.as_ref().ok_or("no keeper")?.release(*id)?;
                }
                Ok("ok".into())
            }
            ["write", text] => {
                for s in &mut conns {
                    s.write_all(text.as_bytes())?;
                }
                Ok("ok".into())
            }
            ["drop-keeper"] => {
                keeper.take().ok_or("no keeper")?.shutdown()?;
                Ok("dropped".into())
            }
            ["exit"] => std::process::exit(0),
            _ => Err(format!("unknown command {line:?}").into()),
        })();
        match answer {
            Ok(a) => say(&a),
            Err(e) => say(&format!("err {e}")),
        }
    }
    // stdin closed: the test is gone.
    Ok(())
}

// ---------------------------------------------------------------- harness

/// Runs `f` on a thread inside a new private network namespace with `lo`
/// up and a veth pair, one end carrying the two test VIPs; fails the test if
/// it panics or takes longer than `limit`.
fn in_netns<T: Send + 'static>(
    name: &str,
    limit: Duration,
    f: impl FnOnce(&Deadline) -> T + Send + 'static,
) -> T {
    let deadline = Deadline::start(name, limit + Duration::from_secs(10));
    let (tx, rx) = mpsc::channel();
    let watched = thread::Builder::new()
        .name("netns-test".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                baton_net::netns::unshare_private().expect("unshare a private netns (needs root)");
                // A child process inherits the namespace of the thread forking it.
                run("ip", &["link", "set", "lo", "up"]);
                run(
                    "ip",
                    &["link", "add", IFACE, "type", "veth", "peer", "name", PEER],
                );
                run("ip", &["link", "set", IFACE, "up"]);
                run("ip", &["link", "set", PEER, "up"]);
                run("ip", &["addr", "add", &format!("{VIP4}/32"), "dev", IFACE]);
                run(
                    "ip",
                    &["addr", "add", &format!("{VIP6}/128"), "dev", IFACE, "nodad"],
                );
                f(&deadline)
            }));
            let _ = tx.send(r);
        })
        .expect("spawn test thread");
    let out = match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test did not finish within {limit:?}"),
    };
    let _ = watched.join();
    out
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses on the test interface.
fn addresses() -> String {
    run("ip", &["-o", "addr", "show", "dev", IFACE])
}

/// The daemon child process and its command channel.
struct Daemon {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    port: u16,
    keeper_pid: u32,
}

impl Daemon {
    fn start() -> Daemon {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "daemon_child", "--nocapture", "--test-threads=1"])
            .env(DAEMON_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the daemon");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut d = Daemon {
            child,
            stdin,
            out,
            port: 0,
            keeper_pid: 0,
        };
        let ready = d.reply();
        let words: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ready"), "{ready}");
        d.port = words[1].parse().unwrap();
        d.keeper_pid = words[2].parse().unwrap();
        d
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to the daemon");
        self.stdin.flush().unwrap();
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).expect("read from the daemon");
            assert!(n > 0, "the daemon exited");
            // libtest's "test daemon_child ... " may start the line.
            if let Some((_, rest)) = line.trim_end().split_once(PROTO) {
                assert!(!rest.starts_with("err"), "daemon: {rest}");
                return rest.to_owned();
            }
        }
    }

    fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.reply()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A descriptor that becomes readable when process `pid` exits (works for
/// processes that are not our children, like the orphaned keeper).
fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        raw >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(raw as i32) }
}

fn exited(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n == 1
}

/// Server-side sockets on `port`, ESTABLISHED, from this thread's
/// namespace: (count, how many have unread data in their receive queue).
fn server_sockets(port: u16) -> (usize, usize) {
    let text = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
    let mut count = 0;
    let mut unread = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f[1].rsplit(':').next().unwrap();
        if u16::from_str_radix(local_port, 16).unwrap() != port || f[3] != "01" {
            continue;
        }
        count += 1;
        let rx = f[4].split(':').nth(1).unwrap();
        if u64::from_str_radix(rx, 16).unwrap() > 0 {
            unread += 1;
        }
    }
    (count, unread)
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

fn counters() -> HashMap<String, u64> {
    let map = baton_net::counters::snapshot().expect("reading /proc/thread-self/net");
    for name in RESET_COUNTERS.iter().chain(&["Tcp:EstabResets"]) {
        assert!(map.contains_key(*name), "counter {name} missing");
    }
    map
}

fn assert_no_resets(before: &HashMap<String, u64>, after: &HashMap<String, u64>) {
    for name in RESET_COUNTERS {
        assert_eq!(
            after[*name], before[*name],
            "{name} increased: a reset or abort"
        );
    }
}

fn tcp_state(s: &TcpStream) -> u8 {
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

const TCP_ESTABLISHED: u8 = 1;

/// The client heard nothing: no data, no FIN (a read would return 0), no
/// RST (ECONNRESET), and the socket is still ESTABLISHED.
fn assert_silent(s: &mut TcpStream, i: usize) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("client {i} heard something: {other:?}"),
    }
    assert_eq!(tcp_state(s), TCP_ESTABLISHED, "client {i}");
    s.set_nonblocking(false).unwrap();
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn read_exact(s: &mut TcpStream, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    s.read_exact(&mut buf).expect("read from the daemon");
    assert_eq!(buf, want);
}

/// Closes the clients without a word, so the test's end sends nothing
/// either (their peers are gone: a FIN would draw a RST).
fn close_clients(clients: Vec<TcpStream>) {
    for c in clients {
        baton_net::repair::close_silently(OwnedFd::from(c)).expect("close a client silently");
    }
}

// ------------------------------------------------------------------ tests

/// kill -9 of the daemon: every held connection, and one still in the
/// held listener's accept queue, all with unread data (a plain close would
/// send RSTs), closes without a FIN or a RST; the guarded addresses go; the
/// keeper exits. Measures the time from SIGKILL to the last socket closed.
#[test]
fn kill_9_of_the_daemon_sends_nothing() {
    const N: usize = 1000;
    in_netns("keeper: kill -9", Duration::from_secs(90), |deadline| {
        baton_net::raise_fd_limit(65_536).unwrap();
        deadline.phase("starting the daemon");
        let mut d = Daemon::start();
        assert_eq!(d.ask(&format!("guard {VIP4} 32 {IFACE}")), "ok");
        assert_eq!(d.ask(&format!("guard {VIP6} 128 {IFACE}")), "ok");
        assert_eq!(d.ask("hold-listener"), "ok");

        deadline.phase("connecting");
        d.send(&format!("accept {N}"));
        let mut clients: Vec<TcpStream> = (0..N)
            .map(|_| {
                let mut c = connect(d.addr());
                c.write_all(b"unread").unwrap();
                c
            })
            .collect();
        assert_eq!(d.reply(), format!("accepted {N}"));
        for c in &mut clients {
            read_exact(c, b"hello");
        }
        // One more, never accepted: it waits in the held listener's queue.
        let mut pending = connect(d.addr());
        pending.write_all(b"unread").unwrap();
        clients.push(pending);
        assert_eq!(d.ask("sync"), format!("synced {N} 1 2 0 0"));
        let start = Instant::now();
        while server_sockets(d.port) != (N + 1, N + 1) {
            assert!(start.elapsed() < IO_TIMEOUT, "{:?}", server_sockets(d.port));
            thread::sleep(Duration::from_millis(5));
        }
        let addrs = addresses();
        assert!(addrs.contains(VIP4) && addrs.contains(VIP6), "{addrs}");

        deadline.phase("killing the daemon");
        let before = counters();
        let keeper = pidfd(d.keeper_pid);
        let killed = Instant::now();
        d.child.kill().unwrap();
        let mut closed_after = None;
        let mut exited_after = None;
        while closed_after.is_none() || exited_after.is_none() {
            assert!(
                killed.elapsed() < IO_TIMEOUT,
                "sockets closed after {closed_after:?}, keeper exited after {exited_after:?}"
            );
            if closed_after.is_none() && server_sockets(d.port).0 == 0 {
                closed_after = Some(killed.elapsed());
            }
            if exited_after.is_none() && exited(&keeper, Duration::ZERO) {
                exited_after = Some(killed.elapsed());
            }
        }
        let _ = d.child.wait();
        eprintln!(
            "keeper: {N} held + 1 pending connection: SIGKILL to all sockets closed {:?}, to keeper exit {:?}",
            closed_after.unwrap(),
            exited_after.unwrap()
        );

        deadline.phase("listening for FINs and RSTs");
        thread::sleep(SILENCE);
        for (i, c) in clients.iter_mut().enumerate() {
            assert_silent(c, i);
        }
        let after = counters();
        assert_no_resets(&before, &after);
        // Silent closes of ESTABLISHED sockets count here, though nothing
        // is sent: one per server-side socket, no more.
        assert_eq!(
            after["Tcp:EstabResets"] - before["Tcp:EstabResets"],
            (N + 1) as u64
        );
        let addrs = addresses();
        assert!(
            !addrs.contains(VIP4) && !addrs.contains(VIP6),
            "guarded addresses left: {addrs}"
        );
        close_clients(clients);
    });
}

/// SIGTERM to the keeper fences too, with the daemon alive: its socket is
/// in repair mode afterwards (its own close is silent), the address is gone.
#[test]
fn sigterm_to_the_keeper_fences() {
    in_netns("keeper: SIGTERM", Duration::from_secs(60), |deadline| {
        let mut d = Daemon::start();
        assert_eq!(d.ask(&format!("guard {VIP4} 32 {IFACE}")), "ok");
        d.send("accept 1");
        let mut c = connect(d.addr());
        c.write_all(b"unread").unwrap();
        assert_eq!(d.reply(), "accepted 1");
        read_exact(&mut c, b"hello");
        assert_eq!(d.ask("sync"), "synced 1 0 1 0 0");
        let before = counters();

        deadline.phase("SIGTERM to the keeper");
        let keeper = pidfd(d.keeper_pid);
        baton_net::netns::terminate(d.keeper_pid);
        assert!(exited(&keeper, IO_TIMEOUT), "the keeper did not exit");
        // The daemon's own close of a socket in repair mode says nothing.
        assert_eq!(d.ask("close-own"), "ok");
        thread::sleep(SILENCE);
        assert_silent(&mut c, 0);
        assert_no_resets(&before, &counters());
        assert!(!addresses().contains(VIP4), "{}", addresses());
        close_clients(vec![c]);
    });
}

/// Release: the keeper's copy keeps the connection open after the daemon
/// closed its own (no FIN yet); releasing it sends the normal FIN.
#[test]
fn release_lets_the_fin_go() {
    in_netns("keeper: release", Duration::from_secs(60), |deadline| {
        let mut d = Daemon::start();
        d.send("accept 1");
        let mut c = connect(d.addr());
        assert_eq!(d.reply(), "accepted 1");
        read_exact(&mut c, b"hello");
        assert_eq!(d.ask("sync"), "synced 1 0 0 0 0");
        let before = counters();

        deadline.phase("closing the daemon's copy");
        assert_eq!(d.ask("close-own"), "ok");
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("the connection closed while the keeper held it: {other:?}"),
        }

        deadline.phase("releasing");
        assert_eq!(d.ask("release-all"), "ok");
        assert_eq!(d.ask("sync"), "synced 0 0 0 0 0");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert_eq!(c.read(&mut buf).expect("FIN after release"), 0);
        assert_no_resets(&before, &counters());
        d.send("exit");
        let _ = d.child.wait();
    });
}

/// Clean shutdown: dropping the Keeper makes the keeper exit without
/// fencing. The address stays, the socket is not in repair mode (the
/// daemon still writes to it) and its close sends the normal FIN.
#[test]
fn clean_shutdown_does_not_fence() {
    in_netns(
        "keeper: clean shutdown",
        Duration::from_secs(60),
        |deadline| {
            let mut d = Daemon::start();
            assert_eq!(d.ask(&format!("guard {VIP4} 32 {IFACE}")), "ok");
            d.send("accept 1");
            let mut c = connect(d.addr());
            assert_eq!(d.reply(), "accepted 1");
            read_exact(&mut c, b"hello");
            assert_eq!(d.ask("sync"), "synced 1 0 1 0 0");
            let before = counters();

            deadline.phase("dropping the keeper");
            let keeper = pidfd(d.keeper_pid);
            assert_eq!(d.ask("drop-keeper"), "dropped");
            assert!(exited(&keeper, Duration::ZERO), "the keeper still runs");
            assert!(addresses().contains(VIP4), "{}", addresses());

            deadline.phase("serving on after the keeper");
            assert_eq!(d.ask("write bye"), "ok");
            read_exact(&mut c, b"bye");
            assert_eq!(d.ask("close-own"), "ok");
            let mut buf = [0u8; 16];
            assert_eq!(c.read(&mut buf).expect("FIN after close"), 0);
            assert_no_resets(&before, &counters());
            d.send("exit");
            let _ = d.child.wait();
        },
    );
}
