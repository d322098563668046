//! The fail-closed hold of a VIP's TCP traffic.
//!
//! [`Hold::install`] binds an NFQUEUE queue ([`crate::nfqueue`]) and inserts,
//! in the raw table's PREROUTING chain,
//! `-d VIP -p tcp [--dport …] -j NFQUEUE --queue-num N` rules tagged
//! `-m comment --comment baton-hold:<VIP>`. There is no `--queue-bypass`:
//! if nobody reads the queue, the packets are dropped, never answered by a
//! kernel that lacks the socket (no RST). The queue is also set fail-closed
//! (no fail-open when full) and its length raised to [`QUEUE_MAX_LEN`] (the
//! kernel default is 1024). GSO/GRO super-packets are held whole.
//!
//! A reader thread keeps every held packet without a verdict until told:
//! [`Hold::accept_all`] lets them into the local TCP stack in arrival order,
//! [`Hold::take_dropped`] drops them and hands their bytes over (to forward
//! to the new owner, which re-injects them with [`inject`]). Either is one
//! batch verdict (`NFQNL_MSG_VERDICT_BATCH`) for all of them.
//!
//! Ahead of a move, [`HoldQueue::open`] binds the queue and starts its
//! reader with no rule feeding it; [`Hold::install_on`] then only inserts
//! the rules.
//!
//! # Namespaces
//!
//! Everything here acts on the network namespace of the **calling thread**
//! of [`HoldQueue::open`] (or [`Hold::install`]): the NFQUEUE socket is
//! created by it and the reader thread is spawned from it. A [`HoldQueue`]
//! keeps a handle on that namespace, and the rules go in and come out
//! there (the `iptables` child `setns`es into it), whichever thread
//! installs, drops or releases the hold. [`HoldQueue::open`],
//! [`Hold::install`] and [`sweep`] refuse to run in the root network
//! namespace (the one of PID 1).
//!
//! # Reader
//!
//! The reader thread blocks in `poll(2)` on the queue's socket and on an
//! eventfd that [`Hold`]'s calls ring when they send it a command: packets
//! are read as they arrive (many per `recvmmsg`), commands served at once,
//! and nothing polls on a timer. The socket's receive buffer is raised to
//! [`QUEUE_SOCKET_BUFFER`] (`SO_RCVBUFFORCE`).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nfqueue::{NfQueue, NfqError, Packet, QueueConfig, Verdict};
use crate::vip::{cvt, new_socket};

/// Comment prefix of every rule we install (`baton-hold:<VIP>`).
pub const HOLD_COMMENT_PREFIX: &str = "baton-hold:";
/// Comment prefix of a replicated service's capture rules
/// (`baton-capture:<VIP>`, see [`CaptureRules`]).
pub const CAPTURE_COMMENT_PREFIX: &str = "baton-capture:";
/// NFQUEUE kernel queue length we ask for (the default is 1024).
pub const QUEUE_MAX_LEN: u32 = 16384;
/// multiport takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Errors of hold operations. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("refusing to act in the root network namespace: call this from a thread inside a lab or node namespace")]
    RootNamespace,
    #[error("cannot tell which network namespace this thread is in: {0}")]
    NamespaceCheck(io::Error),
    #[error("{0} not found: install iptables")]
    MissingTool(&'static str),
    #[error("permission denied: cannot {0} (needs root / CAP_NET_ADMIN)")]
    PermissionDenied(String),
    #[error("{tool} {args} failed: {stderr}")]
    Iptables {
        tool: &'static str,
        args: String,
        stderr: String,
    },
    #[error("NFQUEUE {queue_num}: cannot {op}: {source}")]
    Queue {
        queue_num: u16,
        op: &'static str,
        source: io::Error,
    },
    #[error("port 0 cannot be held")]
    PortZero,
    #[error("empty port list: pass Ports::AllTcp to hold every port")]
    NoPorts,
    #[error("the hold reader thread of {0} is gone")]
    ReaderGone(IpAddr),
    #[error("packet {index}: {reason}")]
    BadPacket { index: usize, reason: &'static str },
    #[error("loopback is down in this network namespace: injected packets would be lost (ip link set lo up)")]
    LoopbackDown,
    #[error("cannot inject packets: {op}: {source}")]
    Inject { op: &'static str, source: io::Error },
}

/// Which TCP ports of the VIP to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// Every TCP packet to the VIP.
    AllTcp,
    /// TCP packets to these destination ports.
    Tcp(Vec<u16>),
}

impl From<&[u16]> for Ports {
    fn from(ports: &[u16]) -> Self {
        Ports::Tcp(ports.to_vec())
    }
}

// ---------------------------------------------------------------------------
// namespace guard

/// Whether the calling thread is in the root network namespace.
pub fn in_root_netns() -> Result<bool, HoldError> {
    crate::netns::in_root_namespace().map_err(HoldError::NamespaceCheck)
}

/// Errors with [`HoldError::RootNamespace`] in the root network namespace.
pub fn ensure_not_root_netns() -> Result<(), HoldError> {
    if in_root_netns()? {
        Err(HoldError::RootNamespace)
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// iptables

pub(crate) fn tool_for(vip: IpAddr) -> &'static str {
    if vip.is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    }
}

/// `netns`, unless the calling thread is in it already. A tool spawned
/// without a namespace to enter needs no setns between fork and exec, so
/// it is spawned without copying this (large, many-threaded) process's
/// page tables: several ms less per move.
fn elsewhere(netns: &File) -> Option<&File> {
    use std::os::unix::fs::MetadataExt;
    let here = crate::netns::current_id();
    match netns.metadata() {
        Ok(m) if Some(m.ino()) == here => None,
        _ => Some(netns),
    }
}

/// Runs `tool args…` in `netns` (an open `/proc/…/ns/net`), or in the calling
/// thread's namespace; returns stdout.
pub(crate) fn iptables(
    tool: &'static str,
    args: &[String],
    netns: Option<&File>,
) -> Result<String, HoldError> {
    run_tool(tool, args, None, netns)
}

/// Runs an iptables tool, feeding it `stdin` if given; returns stdout.
fn run_tool(
    tool: &'static str,
    args: &[String],
    stdin: Option<&[u8]>,
    netns: Option<&File>,
) -> Result<String, HoldError> {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    cmd.stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; fd stays open until exec.
        unsafe {
            cmd.pre_exec(move || cvt(libc::setns(fd, libc::CLONE_NEWNET)).map(|_| ()));
        }
    }
    let spawn_err = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => HoldError::MissingTool(tool),
        io::ErrorKind::PermissionDenied => HoldError::PermissionDenied(format!("run {tool}")),
        _ => HoldError::Iptables {
            tool,
            args: args.join(" "),
            stderr: e.to_string(),
        },
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        // A tool that exits early closes the pipe; its status tells why.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no error message")
        .to_owned();
    if first.contains("Permission denied") || first.contains("Operation not permitted") {
        return Err(HoldError::PermissionDenied(format!(
            "run {tool} {}",
            args.join(" ")
        )));
    }
    Err(HoldError::Iptables {
        tool,
        args: args.join(" "),
        stderr: first,
    })
}

/// One rule of a hold: its chain of the raw table, and its match and target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    chain: &'static str,
    spec: Vec<String>,
}

/// Port matches for `ports` (`--dport`/`--sport`, or multiport in chunks).
fn port_matches(ports: &Ports, direction: &str) -> Vec<Vec<String>> {
    match ports {
        Ports::AllTcp => vec![vec![]],
        Ports::Tcp(list) => {
            let mut list = list.clone();
            list.sort_unstable();
            list.dedup();
            list.chunks(MULTIPORT_MAX)
                .map(|chunk| {
                    if let [one] = chunk {
                        vec![format!("--{direction}"), one.to_string()]
                    } else {
                        let joined = chunk
                            .iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            "-m".into(),
                            "multiport".into(),
                            format!("--{direction}s"),
                            joined,
                        ]
                    }
                })
                .collect()
        }
    }
}

fn comment(vip: IpAddr) -> [String; 4] {
    [
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        format!("{HOLD_COMMENT_PREFIX}{vip}"),
    ]
}

/// The rules that queue `vip`'s incoming TCP traffic to `queue_num`.
fn ingress_rules(vip: IpAddr, ports: &Ports, queue_num: u16) -> Vec<Rule> {
    port_matches(ports, "dport")
        .into_iter()
        .map(|port_match| {
            let mut spec: Vec<String> =
                vec!["-d".into(), vip.to_string(), "-p".into(), "tcp".into()];
            spec.extend(port_match);
            // Segments a thaw injects on the peer's behalf (its FIN) must
            // reach the socket being rebuilt, hold or not.
            spec.extend([
                "-m".to_string(),
                "mark".into(),
                "!".into(),
                "--mark".into(),
                format!("{INJECT_MARK:#x}"),
            ]);
            spec.extend(comment(vip));
            spec.extend(["-j", "NFQUEUE", "--queue-num", &queue_num.to_string()].map(String::from));
            Rule {
                chain: "PREROUTING",
                spec,
            }
        })
        .collect()
}

/// The rules that drop `vip`'s outgoing TCP traffic: a socket in repair
/// mode still fires its retransmission and loss-probe timers, and whatever
/// it sent after its freeze would carry a newer timestamp than the one its
/// thawed copy starts from (the client would drop the copy's segments as
/// PAWS failures). CRIU's network lock drops both directions likewise.
fn egress_rules(vip: IpAddr, ports: &Ports) -> Vec<Rule> {
    port_matches(ports, "sport")
        .into_iter()
        .map(|port_match| {
            let mut spec: Vec<String> =
                vec!["-s".into(), vip.to_string(), "-p".into(), "tcp".into()];
            spec.extend(port_match);
            spec.extend(comment(vip));
            spec.extend(["-j", "DROP"].map(String::from));
            Rule {
                chain: "OUTPUT",
                spec,
            }
        })
        .collect()
}

/// Applies `op` (`-I` inserts at the top, `-D` deletes) to `rules` in one
/// `iptables-restore --noflush` run: one process instead of one per rule,
/// and all or nothing.
fn apply_rules(
    tool: &'static str,
    op: &str,
    rules: &[Rule],
    netns: Option<&File>,
) -> Result<(), HoldError> {
    if rules.is_empty() {
        return Ok(());
    }
    let mut script = String::from("*raw\n");
    for rule in rules {
        script.push_str(op);
        script.push(' ');
        script.push_str(rule.chain);
        if op == "-I" {
            script.push_str(" 1");
        }
        for word in &rule.spec {
            script.push(' ');
            if word.contains(' ') {
                script.push('"');
                script.push_str(word);
                script.push('"');
            } else {
                script.push_str(word);
            }
        }
        script.push('\n');
    }
    script.push_str("COMMIT\n");
    let restore = match tool {
        "iptables" => "iptables-restore",
        _ => "ip6tables-restore",
    };
    run_tool(
        restore,
        &["-w".into(), "--noflush".into()],
        Some(script.as_bytes()),
        netns,
    )
    .map(|_| ())
}

fn raw_chain(op: &str, rule: &Rule) -> Vec<String> {
    let mut args: Vec<String> = ["-w", "-t", "raw", op, rule.chain]
        .map(String::from)
        .to_vec();
    args.extend_from_slice(&rule.spec);
    args
}

/// Deletes one rule; a rule already gone is fine.
fn delete_rule(tool: &'static str, rule: &Rule, netns: Option<&File>) -> Result<(), HoldError> {
    match iptables(tool, &raw_chain("-D", rule), netns) {
        Ok(_) => Ok(()),
        Err(HoldError::Iptables { stderr, .. })
            if stderr.contains("does a matching rule exist")
                || stderr.contains("No chain/target/match") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Deletes `rules`: all in one run, or one by one if some are gone already.
fn delete_rules(tool: &'static str, rules: &[Rule], netns: Option<&File>) -> Result<(), HoldError> {
    if apply_rules(tool, "-D", rules, netns).is_ok() {
        return Ok(());
    }
    let mut first = None;
    for rule in rules {
        if let Err(e) = delete_rule(tool, rule, netns) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The chains of the raw table our rules live in.
const CHAINS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// Our rules in the raw PREROUTING and OUTPUT chains (IPv4 and IPv6) of
/// the calling thread's namespace: (tool, chain, the rule as `-S` prints it).
fn our_rules() -> Result<Vec<(&'static str, &'static str, String)>, HoldError> {
    let mut rules = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for chain in CHAINS {
            let listing = iptables(
                tool,
                &["-w", "-t", "raw", "-S", chain].map(String::from),
                None,
            )?;
            rules.extend(
                listing
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {chain} ")))
                    .filter(|l| {
                        l.contains(HOLD_COMMENT_PREFIX) || l.contains(CAPTURE_COMMENT_PREFIX)
                    })
                    .map(|l| (tool, chain, l.to_owned())),
            );
        }
    }
    Ok(rules)
}

/// Removes every `baton-hold:` and `baton-capture:` rule of the raw PREROUTING and OUTPUT chains
/// (IPv4 and IPv6) of the calling thread's namespace, as left by a crashed
/// run; returns how many. Idempotent. Removes the rules of live holds too:
/// call it at start-up, before installing any.
pub fn sweep() -> Result<usize, HoldError> {
    ensure_not_root_netns()?;
    let rules = our_rules()?;
    for (tool, chain, line) in &rules {
        // Our rules hold no spaces inside arguments; -S only quotes the comment.
        let spec: Vec<String> = line
            .split_whitespace()
            .skip(2)
            .map(|t| t.trim_matches('"').to_owned())
            .collect();
        delete_rule(tool, &Rule { chain, spec }, None)?;
    }
    Ok(rules.len())
}

/// The `baton-hold:` and `baton-capture:` rules currently in the raw PREROUTING and OUTPUT
/// chains of the calling thread's namespace, as `iptables -S` prints them.
pub fn list_rules() -> Result<Vec<String>, HoldError> {
    Ok(our_rules()?.into_iter().map(|(_, _, line)| line).collect())
}

// ---------------------------------------------------------------------------
// the reader

enum Cmd {
    Accept(mpsc::Sender<Result<usize, io::Error>>),
    /// Accept what is held, and from then on every packet as it is read.
    Pass(mpsc::Sender<Result<usize, io::Error>>),
    Drop(mpsc::Sender<Result<Vec<Vec<u8>>, io::Error>>),
    Stop,
}

/// What wakes the reader for a command: an eventfd it polls beside the
/// queue's socket.
struct Wake(OwnedFd);

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: plain eventfd(2); the descriptor is owned right away.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the eventfd readable (its counter never nears its limit: the
    /// reader resets it on every wake).
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (nonblocking: nothing to read is fine).
    fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an eventfd we own.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

/// The number of packets held, with a condition variable for waiters.
#[derive(Default)]
struct Shared {
    held: Mutex<usize>,
    changed: Condvar,
}

impl Shared {
    fn set(&self, n: usize) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = n;
        self.changed.notify_all();
    }

    fn get(&self) -> usize {
        *self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Reader {
    queue: NfQueue,
    held: VecDeque<Packet>,
    shared: Arc<Shared>,
    wake: Arc<Wake>,
    /// First read error since the last command (reported with it).
    error: Option<io::Error>,
    batch: Vec<Packet>,
    /// Every packet is accepted as soon as it is read (the hold is ending).
    passing: bool,
}

/// Waits until the queue or the wake descriptor is readable (no timeout);
/// after a read error, for the wake descriptor only, at most `BACKOFF`.
fn wait_for(queue: BorrowedFd<'_>, wake: BorrowedFd<'_>, backoff: bool) {
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let (n, timeout) = if backoff {
        (1, BACKOFF.as_millis() as libc::c_int)
    } else {
        (2, -1)
    };
    // SAFETY: `n` valid pollfds of a live array. EINTR just returns early.
    unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
}

/// How long the reader leaves the queue alone after a read error, so that
/// an error that persists does not spin it.
const BACKOFF: Duration = Duration::from_millis(10);

impl Reader {
    /// Reads every packet the kernel has for us now; returns whether a read
    /// failed.
    fn drain(&mut self) -> bool {
        let mut failed = false;
        loop {
            match self.queue.recv_batch(&mut self.batch) {
                Ok(0) => break,
                Ok(_) => self.held.extend(self.batch.drain(..)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the hold queue");
                    self.error.get_or_insert(io::Error::other(e));
                    failed = true;
                    break;
                }
            }
        }
        self.shared.set(self.held.len());
        failed
    }

    /// Gives every held packet `verdict` with one batch verdict (they are
    /// all the queue's pending packets, in arrival order); returns how
    /// many, and the bytes of the packets if `keep`.
    fn verdict_all(
        &mut self,
        verdict: Verdict,
        keep: bool,
    ) -> Result<(usize, Vec<Vec<u8>>), io::Error> {
        self.drain();
        let mut first_err = self.error.take();
        let n = self.held.len();
        if let Some(last) = self.held.back().map(|p| p.id) {
            if let Err(e) = self.queue.verdict_batch(last, verdict) {
                first_err.get_or_insert(io::Error::other(e));
            }
        }
        let bytes = if keep {
            self.held.drain(..).filter_map(forwardable).collect()
        } else {
            self.held.clear();
            Vec::new()
        };
        self.shared.set(0);
        match first_err {
            Some(e) => Err(e),
            None => Ok((n, bytes)),
        }
    }

    /// Serves one command; returns false on `Stop`.
    fn serve(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Accept(reply) => {
                let _ = reply.send(self.verdict_all(Verdict::Accept, false).map(|(n, _)| n));
                true
            }
            Cmd::Pass(reply) => {
                self.passing = true;
                let _ = reply.send(self.verdict_all(Verdict::Accept, false).map(|(n, _)| n));
                true
            }
            Cmd::Drop(reply) => {
                let _ = reply.send(self.verdict_all(Verdict::Drop, true).map(|(_, b)| b));
                true
            }
            Cmd::Stop => false,
        }
    }

    fn run(mut self, commands: mpsc::Receiver<Cmd>) {
        let mut backoff = false;
        loop {
            wait_for(self.queue.as_fd(), self.wake.0.as_fd(), backoff);
            self.wake.clear();
            backoff = self.drain();
            if self.passing && !self.held.is_empty() {
                if let Err(e) = self.verdict_all(Verdict::Accept, false) {
                    tracing::warn!(error = %e, "accepting packets while the hold ends");
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.serve(cmd) {
                            // Whatever is left is dropped: fail closed.
                            let _ = self.verdict_all(Verdict::Drop, false);
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        let _ = self.verdict_all(Verdict::Drop, false);
                        return;
                    }
                }
            }
        }
    }
}

/// The bytes of a dropped packet, ready to forward: a truncated one cannot
/// be (it is lost; the client will resend it), and a checksum the kernel
/// left to the device is completed.
fn forwardable(mut packet: Packet) -> Option<Vec<u8>> {
    if packet.truncated() {
        tracing::warn!(
            id = packet.id,
            len = packet.orig_len,
            "held packet longer than the copy range: not forwarded"
        );
        return None;
    }
    if packet.skb_info.checksum_not_ready() {
        complete_tcp_checksum(&mut packet.payload);
    }
    Some(packet.payload)
}

/// One's-complement sum of `data` as 16-bit big-endian words, added to `sum`.
fn sum_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Writes the full TCP checksum of an IPv4 or IPv6 (no extension header)
/// TCP packet whose checksum field holds only the pseudo-header sum (as a
/// GSO packet queued before the device computes it). Other packets, and
/// ones whose lengths do not add up, are left alone.
fn complete_tcp_checksum(p: &mut [u8]) {
    let (tcp_start, tcp_end, pseudo) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 && p[9] == libc::IPPROTO_TCP as u8 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < 20 || total > p.len() || total < ihl + 20 {
                return;
            }
            let mut sum = sum_words(0, &p[12..20]);
            sum += u64::from(libc::IPPROTO_TCP as u16) + (total - ihl) as u64;
            (ihl, total, sum)
        }
        Some(6) if p.len() >= 40 && p[6] == libc::IPPROTO_TCP as u8 => {
            let end = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            if end > p.len() || end < 60 {
                return;
            }
            let mut sum = sum_words(0, &p[8..40]);
            sum += (end - 40) as u64 + u64::from(libc::IPPROTO_TCP as u16);
            (40, end, sum)
        }
        _ => return,
    };
    let tcp = &mut p[tcp_start..tcp_end];
    tcp[16] = 0;
    tcp[17] = 0;
    let sum = !fold(sum_words(pseudo, tcp));
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
}

// ---------------------------------------------------------------------------
// the queue, ready before the hold

/// An NFQUEUE queue bound and its reader running, with no rule feeding it
/// yet: open it ahead of a move, then [`Hold::install_on`] costs only the
/// rule insertion. Bound in the calling thread's namespace; the rules of
/// the hold go there too. Dropping it drops whatever it holds.
pub struct HoldQueue {
    queue_num: u16,
    recv_buffer: usize,
    commands: Option<mpsc::Sender<Cmd>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// The namespace the queue is in.
    netns: File,
}

impl std::fmt::Debug for HoldQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldQueue")
            .field("queue_num", &self.queue_num)
            .field("recv_buffer", &self.recv_buffer)
            .field("held", &self.held())
            .finish()
    }
}

fn queue_err(queue_num: u16) -> impl FnOnce(NfqError) -> HoldError {
    move |e| match e {
        NfqError::PermissionDenied { .. } => {
            HoldError::PermissionDenied(format!("bind NFQUEUE {queue_num}"))
        }
        // Callers try another queue number when this one is taken: every
        // bind failure is `op: "bind"`.
        e
        @ (NfqError::QueueInUse { .. } | NfqError::Refused { .. } | NfqError::NoAnswer { .. }) => {
            HoldError::Queue {
                queue_num,
                op: "bind",
                source: io::Error::other(e),
            }
        }
        e @ NfqError::Io { .. } => HoldError::Queue {
            queue_num,
            op: "open",
            source: io::Error::other(e),
        },
    }
}

impl HoldQueue {
    /// Binds NFQUEUE `queue_num` in the calling thread's namespace (not the
    /// root one), fail-closed, [`QUEUE_MAX_LEN`] long, GSO packets whole,
    /// with a [`QUEUE_SOCKET_BUFFER`] receive buffer, and starts its reader.
    pub fn open(queue_num: u16) -> Result<HoldQueue, HoldError> {
        ensure_not_root_netns()?;
        let netns = File::open("/proc/thread-self/ns/net").map_err(HoldError::NamespaceCheck)?;
        let config = QueueConfig {
            max_len: QUEUE_MAX_LEN,
            recv_buffer: QUEUE_SOCKET_BUFFER,
            ..QueueConfig::default()
        };
        let queue = NfQueue::open_with(queue_num, &config).map_err(queue_err(queue_num))?;
        let recv_buffer = queue.recv_buffer();
        let spawn_err = |op| {
            move |source| HoldError::Queue {
                queue_num,
                op,
                source,
            }
        };
        let wake = Arc::new(Wake::new().map_err(spawn_err("make the reader's eventfd"))?);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let reader = Reader {
            queue,
            held: VecDeque::new(),
            shared: Arc::clone(&shared),
            wake: Arc::clone(&wake),
            error: None,
            batch: Vec::new(),
            passing: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("hold-q{queue_num}"))
            .spawn(move || reader.run(rx))
            .map_err(spawn_err("spawn the reader thread"))?;
        Ok(HoldQueue {
            queue_num,
            recv_buffer,
            commands: Some(tx),
            wake,
            thread: Some(thread),
            shared,
            netns,
        })
    }

    /// The NFQUEUE queue number.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// The receive buffer the kernel granted the queue's socket (bytes, as
    /// `SO_RCVBUF` reports it).
    pub fn recv_buffer(&self) -> usize {
        self.recv_buffer
    }

    /// Packets held right now (the reader counts them as they arrive).
    pub fn held(&self) -> usize {
        self.shared.get()
    }

    /// Waits until at least `n` packets are held or `timeout` passes;
    /// returns the number held.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut held = self.shared.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            held = self
                .shared
                .changed
                .wait_timeout(held, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *held
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, io::Error>>) -> Cmd,
        op: &'static str,
        vip: IpAddr,
    ) -> Result<T, HoldError> {
        let gone = || HoldError::ReaderGone(vip);
        let (tx, rx) = mpsc::channel();
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(make(tx))
            .map_err(|_| gone())?;
        self.wake.ring();
        rx.recv()
            .map_err(|_| gone())?
            .map_err(|source| HoldError::Queue {
                queue_num: self.queue_num,
                op,
                source,
            })
    }
}

impl Drop for HoldQueue {
    fn drop(&mut self) {
        if let Some(tx) = self.commands.take() {
            let _ = tx.send(Cmd::Stop);
            self.wake.ring();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// capture

/// The standing rules of a replicated service on one node: every TCP
/// segment to the VIP's ports goes to an NFQUEUE queue before TCP sees it
/// (no `--queue-bypass`: with nobody reading, segments are dropped, never
/// answered), and the VIP's TCP traffic is NOTRACK in both directions, so
/// conntrack never decides for it (a socket rebuilt by TCP_REPAIR has no
/// conntrack entry, and an INVALID verdict must not drop its segments).
/// The reader of the queue is the caller's ([`crate::nfqueue::NfQueue`]).
/// Segments a thaw injects ([`INJECT_MARK`]) are not queued. Dropping it
/// removes the rules.
pub struct CaptureRules {
    vip: IpAddr,
    tool: &'static str,
    rules: Vec<Rule>,
    netns: File,
}

impl CaptureRules {
    /// Installs the rules in the calling thread's namespace, all or none.
    pub fn install(
        vip: IpAddr,
        ports: impl Into<Ports>,
        queue_num: u16,
    ) -> Result<CaptureRules, HoldError> {
        ensure_not_root_netns()?;
        let ports = ports.into();
        check_ports(&ports)?;
        let netns = File::open("/proc/thread-self/ns/net").map_err(HoldError::NamespaceCheck)?;
        let tool = tool_for(vip);
        let tag = [
            "-m".to_string(),
            "comment".into(),
            "--comment".into(),
            format!("{CAPTURE_COMMENT_PREFIX}{vip}"),
        ];
        let mut rules = Vec::new();
        // Each rule goes in at the top of its chain: the queue rule first,
        // so that NOTRACK, inserted after it, comes before it (NFQUEUE is
        // a terminating target; CT is not).
        for port_match in port_matches(&ports, "dport") {
            let mut spec: Vec<String> =
                vec!["-d".into(), vip.to_string(), "-p".into(), "tcp".into()];
            spec.extend(port_match);
            spec.extend(
                ["-m", "mark", "!", "--mark", &format!("{INJECT_MARK:#x}")].map(String::from),
            );
            spec.extend(tag.clone());
            spec.extend(["-j", "NFQUEUE", "--queue-num", &queue_num.to_string()].map(String::from));
            rules.push(Rule {
                chain: "PREROUTING",
                spec,
            });
        }
        for (chain, addr, direction) in [("PREROUTING", "-d", "dport"), ("OUTPUT", "-s", "sport")] {
            for port_match in port_matches(&ports, direction) {
                let mut spec: Vec<String> =
                    vec![addr.into(), vip.to_string(), "-p".into(), "tcp".into()];
                spec.extend(port_match);
                spec.extend(tag.clone());
                spec.extend(["-j", "CT", "--notrack"].map(String::from));
                rules.push(Rule { chain, spec });
            }
        }
        apply_rules(tool, "-I", &rules, None)?;
        Ok(CaptureRules {
            vip,
            tool,
            rules,
            netns,
        })
    }

    /// The captured VIP.
    pub fn vip(&self) -> IpAddr {
        self.vip
    }

    /// Removes the rules (what [`Drop`] does, with the error reported).
    pub fn remove(mut self) -> Result<(), HoldError> {
        self.remove_rules()
    }

    fn remove_rules(&mut self) -> Result<(), HoldError> {
        let rules = std::mem::take(&mut self.rules);
        delete_rules(self.tool, &rules, elsewhere(&self.netns))
    }
}

impl Drop for CaptureRules {
    fn drop(&mut self) {
        if let Err(e) = self.remove_rules() {
            tracing::warn!(vip = %self.vip, error = %e, "removing the capture rules");
        }
    }
}

// ---------------------------------------------------------------------------
// the hold

/// A fail-closed hold of a VIP's TCP traffic (see the module docs). Dropping
/// it removes the rules and drops whatever is still held.
pub struct Hold {
    vip: IpAddr,
    tool: &'static str,
    rules: Vec<Rule>,
    /// The egress rules, while the hold silences the VIP's sockets.
    silence: Vec<Rule>,
    installed_at: Instant,
    /// Dropped after the rules are removed (fields drop after `drop`).
    queue: HoldQueue,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("vip", &self.vip)
            .field("queue_num", &self.queue.queue_num)
            .field("rules", &self.rules.len())
            .field("silenced", &!self.silence.is_empty())
            .field("held", &self.held())
            .finish()
    }
}

fn check_ports(ports: &Ports) -> Result<(), HoldError> {
    if let Ports::Tcp(list) = ports {
        if list.contains(&0) {
            return Err(HoldError::PortZero);
        }
        if list.is_empty() {
            return Err(HoldError::NoPorts);
        }
    }
    Ok(())
}

impl Hold {
    /// Holds the TCP traffic to `vip` (`ports`) in NFQUEUE `queue_num` of the
    /// calling thread's namespace. The queue is bound and its reader running
    /// before the rules go in; if a rule fails, those already in are removed.
    /// One queue number serves one hold at a time per namespace.
    pub fn install(
        vip: IpAddr,
        ports: impl Into<Ports>,
        queue_num: u16,
    ) -> Result<Hold, HoldError> {
        Hold::install_here(vip, ports.into(), queue_num, false)
    }

    /// [`Hold::install`], and the VIP's own sockets (`ports` as source
    /// ports) fall silent: nothing they send leaves this host until
    /// [`Hold::unsilence`] or the end of the hold. A source installs this
    /// before it freezes its sockets.
    pub fn install_silenced(
        vip: IpAddr,
        ports: impl Into<Ports>,
        queue_num: u16,
    ) -> Result<Hold, HoldError> {
        Hold::install_here(vip, ports.into(), queue_num, true)
    }

    /// [`Hold::install`] on a queue opened ahead ([`HoldQueue::open`]): only
    /// the rules go in, in the queue's namespace (from any thread).
    pub fn install_on(
        queue: HoldQueue,
        vip: IpAddr,
        ports: impl Into<Ports>,
    ) -> Result<Hold, HoldError> {
        Hold::install_checked(queue, vip, ports.into(), false)
    }

    /// [`Hold::install_silenced`] on a queue opened ahead.
    pub fn install_silenced_on(
        queue: HoldQueue,
        vip: IpAddr,
        ports: impl Into<Ports>,
    ) -> Result<Hold, HoldError> {
        Hold::install_checked(queue, vip, ports.into(), true)
    }

    /// In the calling thread's namespace, on a queue opened here once the
    /// checks pass (a refused hold binds nothing).
    fn install_here(
        vip: IpAddr,
        ports: Ports,
        queue_num: u16,
        silence: bool,
    ) -> Result<Hold, HoldError> {
        ensure_not_root_netns()?;
        check_ports(&ports)?;
        Hold::install_rules(HoldQueue::open(queue_num)?, vip, ports, silence)
    }

    fn install_checked(
        queue: HoldQueue,
        vip: IpAddr,
        ports: Ports,
        silence: bool,
    ) -> Result<Hold, HoldError> {
        check_ports(&ports)?;
        Hold::install_rules(queue, vip, ports, silence)
    }

    fn install_rules(
        queue: HoldQueue,
        vip: IpAddr,
        ports: Ports,
        silence: bool,
    ) -> Result<Hold, HoldError> {
        let tool = tool_for(vip);
        let rules = ingress_rules(vip, &ports, queue.queue_num);
        let silence = if silence {
            egress_rules(vip, &ports)
        } else {
            Vec::new()
        };
        // Silence first: it must be in place before the ingress rules make
        // anyone freeze a socket. One run for all, all or nothing.
        let all: Vec<Rule> = silence.iter().chain(&rules).cloned().collect();
        apply_rules(tool, "-I", &all, elsewhere(&queue.netns))?;
        Ok(Hold {
            vip,
            tool,
            rules,
            silence,
            installed_at: Instant::now(),
            queue,
        })
    }

    /// The held VIP.
    pub fn vip(&self) -> IpAddr {
        self.vip
    }

    /// The NFQUEUE queue number.
    pub fn queue_num(&self) -> u16 {
        self.queue.queue_num
    }

    /// Time since the rules went in.
    pub fn age(&self) -> Duration {
        self.installed_at.elapsed()
    }

    /// Packets held right now (the reader counts them as they arrive).
    pub fn held(&self) -> usize {
        self.queue.held()
    }

    /// Waits until at least `n` packets are held or `timeout` passes;
    /// returns the number held.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> usize {
        self.queue.wait_held(n, timeout)
    }

    /// Verdict ACCEPT for every packet held so far, in arrival order (one
    /// batch verdict); returns how many. The hold stays: later packets are
    /// held again. Used by the target once its sockets are thawed, and by
    /// the source on rollback.
    pub fn accept_all(&self) -> Result<usize, HoldError> {
        self.queue
            .ask(Cmd::Accept, "accept the held packets", self.vip)
    }

    /// Verdict DROP for every packet held so far (one batch verdict);
    /// returns their IP packets (arrival order) for forwarding to the new
    /// owner, TCP checksums completed where the kernel had left them to the
    /// device. The hold stays.
    pub fn take_dropped(&self) -> Result<Vec<Vec<u8>>, HoldError> {
        self.queue.ask(Cmd::Drop, "drop the held packets", self.vip)
    }

    fn remove_rules(&mut self) -> Result<(), HoldError> {
        let mut rules = std::mem::take(&mut self.rules);
        rules.append(&mut self.silence);
        let result = delete_rules(self.tool, &rules, Some(&self.queue.netns));
        if let Err(e) = &result {
            tracing::warn!(vip = %self.vip, error = %e, "removing the hold rules");
        }
        result
    }

    /// Lets the VIP's sockets send again (a rollback, before the frozen
    /// sockets resume); the incoming traffic stays held. If removing them
    /// fails, the hold keeps them and tries again when it
    /// ends: forgotten, they would silence the VIP's sockets for ever.
    pub fn unsilence(&mut self) -> Result<(), HoldError> {
        delete_rules(self.tool, &self.silence, Some(&self.queue.netns))?;
        self.silence.clear();
        Ok(())
    }

    /// Whether the VIP's sockets are silenced.
    pub fn silenced(&self) -> bool {
        !self.silence.is_empty()
    }

    /// Ends the hold letting the traffic in, in arrival order: accepts
    /// everything held while the rules are still in, then every packet as
    /// it comes while they are removed, then what is left, and closes the
    /// queue. Returns how many packets it accepted. Target after thaw;
    /// source on rollback.
    ///
    /// Removing the rules first would let segments that arrive once they
    /// are gone reach TCP before those still held: a client answering the
    /// first segments let in overtakes its own older ones, which then fail
    /// the PAWS check (their timestamps are older) and are dropped, to be
    /// sent again when the client's (backed-off) retransmission timer
    /// fires.
    pub fn release(mut self) -> Result<usize, HoldError> {
        let passed = self
            .queue
            .ask(Cmd::Pass, "accept the held packets", self.vip);
        let removed = self.remove_rules();
        let accepted = self.accept_all();
        drop(self);
        removed?;
        Ok(passed? + accepted?)
    }

    /// Ends the hold fail-closed: removes the rules, then drops everything
    /// still held and returns those packets (to forward them). Source after
    /// the move.
    pub fn finish_dropped(mut self) -> Result<Vec<Vec<u8>>, HoldError> {
        let removed = self.remove_rules();
        let dropped = self.take_dropped();
        drop(self);
        removed?;
        dropped
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.rules.is_empty() || !self.silence.is_empty() {
            let _ = self.remove_rules();
        }
        let held = self.held();
        if held > 0 {
            tracing::warn!(vip = %self.vip, held, "hold dropped with packets held: dropping them");
        }
        // The queue (a field) drops next: its reader drops what is left.
    }
}

// ---------------------------------------------------------------------------
// re-injection

/// Where a packet goes, after checking it is a whole IPv4 or IPv6 packet;
/// returns its destination and its length per its header.
fn parse_dest(index: usize, p: &[u8]) -> Result<(IpAddr, usize), HoldError> {
    let bad = |reason| HoldError::BadPacket { index, reason };
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < 20 {
                return Err(bad("IPv4 packet shorter than its header"));
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < 20 || total < ihl || total > p.len() {
                return Err(bad("IPv4 header lengths do not match the packet"));
            }
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            Ok((IpAddr::V4(dst), total))
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(bad("IPv6 packet shorter than its header"));
            }
            let total = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            if total > p.len() {
                return Err(bad("IPv6 payload length exceeds the packet"));
            }
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&p[24..40]);
            Ok((IpAddr::V6(Ipv6Addr::from(dst)), total))
        }
        Some(_) => Err(bad("not an IPv4 or IPv6 packet")),
        None => Err(bad("empty packet")),
    }
}

fn loopback_up() -> Result<bool, HoldError> {
    let fd =
        new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0).map_err(|source| HoldError::Inject {
            op: "open a socket",
            source,
        })?;
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) }).map_err(
        |source| HoldError::Inject {
            op: "read the flags of lo",
            source,
        },
    )?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

/// Receive buffer asked for the hold's queue socket: at full speed a held
/// connection brings 64 KiB GSO packets, and the kernel's default (about
/// 208 KiB) holds only three of them.
pub const QUEUE_SOCKET_BUFFER: usize = 32 << 20;

/// Packets the kernel dropped on NFQUEUE `queue_num` of the calling thread's
/// namespace: (queue full, could not be delivered to the reader). A hold
/// must lose nothing; non-zero values mean its limits are too small.
pub fn queue_drops(queue_num: u16) -> Option<(u64, u64)> {
    crate::nfqueue::kernel_queue_line(queue_num).map(|f| (f[5], f[6]))
}

/// `SO_MARK` of the packets [`inject`] sends. Hold rules let them through,
/// so packets re-injected on the new owner (and the FINs a thaw re-creates
/// for half-closed connections) reach their sockets while a hold is in.
pub const INJECT_MARK: u32 = 0x6274; // "bt"

/// Re-injects whole IP packets (IPv4 and IPv6, as [`Hold::take_dropped`]
/// returns them) into the TCP/IP stack of the calling thread's namespace: a
/// raw socket with `IP_HDRINCL` / `IPV6_HDRINCL` sends each one, unchanged, to
/// its own destination address; that address being local (the VIP, on the
/// new owner), the packet loops through `lo` and is received like one from
/// the wire. It is marked [`INJECT_MARK`], so a hold installed here lets it
/// through. Every packet is checked before any is sent. Returns how
/// many were sent.
pub fn inject(packets: &[Vec<u8>]) -> Result<usize, HoldError> {
    let parsed = packets
        .iter()
        .enumerate()
        .map(|(i, p)| parse_dest(i, p))
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Ok(0);
    }
    if !loopback_up()? {
        return Err(HoldError::LoopbackDown);
    }
    let mut v4 = None;
    let mut v6 = None;
    for (packet, (dst, len)) in packets.iter().zip(parsed) {
        let socket = match dst {
            IpAddr::V4(_) => &mut v4,
            IpAddr::V6(_) => &mut v6,
        };
        if socket.is_none() {
            *socket = Some(raw_injector(dst.is_ipv6())?);
        }
        let socket = socket.as_ref().expect("opened above");
        socket
            .send_to(&packet[..len], &std::net::SocketAddr::new(dst, 0).into())
            .map_err(|source| inject_err("send", source))?;
    }
    Ok(packets.len())
}

/// A raw socket that sends whole IP packets (header included), marked
/// [`INJECT_MARK`].
fn raw_injector(v6: bool) -> Result<socket2::Socket, HoldError> {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    // IPPROTO_RAW implies IP_HDRINCL (and IPV6_HDRINCL since Linux 4.5).
    let socket = socket2::Socket::new(
        domain,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(|source| inject_err("open a raw socket", source))?;
    if v6 {
        socket
            .set_header_included_v6(true)
            .map_err(|source| inject_err("set IPV6_HDRINCL", source))?;
    }
    socket
        .set_mark(INJECT_MARK)
        .map_err(|source| inject_err("set SO_MARK", source))?;
    Ok(socket)
}

fn inject_err(op: &'static str, source: io::Error) -> HoldError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            HoldError::PermissionDenied(format!("{op} (needs CAP_NET_RAW)"))
        }
        _ => HoldError::Inject { op, source },
    }
}
