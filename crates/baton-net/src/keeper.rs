//! The connection keeper: a dead daemon must not speak.
//!
//! When the daemon dies (kill -9, a crash, the OOM killer) the kernel lives
//! on and closes the daemon's sockets: a FIN for each connection, or a RST
//! where data was left unread. A clone elsewhere rebuilds those connections
//! with TCP_REPAIR, so this host must say nothing to their clients. The
//! keeper is a small process the daemon starts at boot and hands a
//! duplicate of every connection socket to (SCM_RIGHTS over a unix
//! socketpair). A socket's file closes only with its last reference, so
//! while the keeper holds one the kernel cannot close the connection. When
//! the daemon's end of the socketpair closes (its death, whatever killed
//! it, closes its descriptors), the keeper *fences*: it puts every held
//! socket in repair mode and closes it ([`crate::repair::close_silently`]:
//! no FIN, no RST), drains the accept queue of every held listener the same
//! way, removes the VIP addresses it was told about (so the host stops
//! answering ARP/NA for them), and exits. SIGTERM to the keeper fences too.
//!
//! A daemon that shuts down cleanly drops its [`Keeper`]: the keeper is told
//! to exit *without* fencing, so its copies close normally (whatever the
//! socket's state says happens at the last close).
//!
//! # How a binary runs it
//!
//! [`Keeper::spawn`] runs `program args…` with one end of a `SOCK_SEQPACKET`
//! unix socketpair as descriptor [`KEEPER_FD`] (3) and the environment
//! variable [`KEEPER_FD_ENV`] (`BATON_KEEPER_FD`) set to that number; its
//! stdin is `/dev/null`, its stdout the daemon's stderr, its stderr the
//! daemon's. The program must call [`run_keeper`] (after setting up its
//! logging) and exit when it returns: in the `baton` binary, a hidden
//! subcommand. Spawn it from a thread in the network namespace of the
//! guarded addresses: the keeper removes them in its own namespace.
//!
//! # What the daemon must do
//!
//! * [`Keeper::hold`] each connection right after `accept` (a connection
//!   not yet held closes normally if the daemon dies), and its listeners
//!   too (a listener's unaccepted connections get a RST when it closes).
//! * [`Keeper::release`] each connection when it closes it: the keeper's
//!   copy keeps the connection open until then (the FIN goes at release).
//! * [`Keeper::guard_address`] the VIP once it holds it, with the interface
//!   that carries the address (the macvlan's name with a virtual MAC).
//!
//! # The lease
//!
//! A daemon that is stopped (SIGSTOP) or hangs still holds its end, so its
//! death says nothing. Each service's primary therefore keeps a lease
//! (`baton_core::lease`), and its raft thread tells the keeper when it ends
//! ([`Keeper::lease`], CLOCK_MONOTONIC µs, [`crate::clock`]). Sockets and
//! addresses are held in a *group* (one per service). When a group's lease
//! ends without a renewal, the keeper fences that group alone: its
//! connections are closed silently (the daemon's own copies stay in repair
//! mode: silent) and its addresses removed, whether the daemon is stopped,
//! hung or just late. The keeper then tells the daemon ([`Keeper::fences`]),
//! which stops serving that service; the keeper goes on serving.
//!
//! # Wire format
//!
//! One datagram per message (SEQPACKET keeps boundaries), a type byte and
//! fixed little-endian fields. Daemon to keeper: `1` hold (id u64, one
//! descriptor attached), `2` release (id u64), `3` guard (family 4|6,
//! address 4|16 bytes, prefix length u8, name length u8, name), `4` unguard
//! (family, address, name length, name), `5` exit, `6` sync (seq u64),
//! `7` lease (group u32, end µs u64; `u64::MAX`: none). A hold carries
//! the group (u32) after the id, a guard after the name.
//! Keeper to daemon: `0x81` ready (protocol version u8, pid u32), `0x82`
//! synced (seq u64, held u64, listeners u64, guarded u32, refused u64,
//! malformed u64), `0x83` fenced (group u32, sockets u64). The keeper logs
//! and ignores anything malformed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::IoSlice;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libc::{c_int, c_short, c_void, socklen_t};
use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

use crate::vip::{VipError, VipSpec};

/// Descriptor number the keeper finds its socket at.
pub const KEEPER_FD: RawFd = 3;
/// Environment variable [`Keeper::spawn`] sets to [`KEEPER_FD`]'s number;
/// [`run_keeper`] refuses to run without it.
pub const KEEPER_FD_ENV: &str = "BATON_KEEPER_FD";
/// Version of the wire format, checked in the ready message.
pub const PROTOCOL_VERSION: u8 = 2;

/// How long [`Keeper::spawn`] waits for the keeper's ready message.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a send may wait for room in the socket (a stuck keeper).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long dropping a [`Keeper`] waits for the process to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Send buffer of the daemon's end: room for some thousands of holds in a
/// burst without waiting for the keeper (each costs about 1 KiB of skb).
const SEND_BUFFER: c_int = 8 << 20;
/// Open-file limit the keeper asks for: one descriptor per held connection.
const KEEPER_FD_LIMIT: u64 = 1 << 20;
/// Largest valid message is a guard of an IPv6 address: 1+1+16+1+1+15.
const MAX_MESSAGE: usize = 64;
/// Descriptors one received message may carry before the rest are cut off
/// (a hold carries one; more is malformed, and they are closed).
const MAX_FDS: usize = 8;
/// Malformed messages logged at warn level before the rest go to debug.
const MALFORMED_LOGGED: u64 = 16;

/// Why a keeper call failed. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot start the keeper: {0}")]
    Spawn(std::io::Error),
    #[error("{op} failed: {errno}")]
    Sys { op: &'static str, errno: Errno },
    #[error("the keeper did not get ready: {0}")]
    NotReady(String),
    #[error("the keeper is gone")]
    Gone,
    #[error("the keeper took no message for {ms} ms: it is stuck")]
    Busy { ms: u128 },
    #[error("no answer from the keeper within {ms} ms")]
    Timeout { ms: u128 },
    #[error("the keeper exited with {0}")]
    Exited(String),
    #[error("invalid guarded address: {0}")]
    Address(#[from] VipError),
    #[error("invalid interface name {name:?}: {reason}")]
    Interface { name: String, reason: &'static str },
    #[error("{KEEPER_FD_ENV} is not set: the keeper runs only when started by Keeper::spawn")]
    NotSpawned,
    #[error("{KEEPER_FD_ENV}: {0}")]
    BadFd(String),
    #[error("run_keeper was already called in this process")]
    AlreadyRunning,
}

fn sys(op: &'static str, errno: Errno) -> KeeperError {
    KeeperError::Sys { op, errno }
}

// ---------------------------------------------------------------------------
// wire format

const T_HOLD: u8 = 1;
const T_RELEASE: u8 = 2;
const T_GUARD: u8 = 3;
const T_UNGUARD: u8 = 4;
const T_EXIT: u8 = 5;
const T_SYNC: u8 = 6;
const T_LEASE: u8 = 7;
const T_READY: u8 = 0x81;
const T_SYNCED: u8 = 0x82;
const T_FENCED: u8 = 0x83;
/// The lease of a group that has none: never fenced for it.
pub const NO_LEASE: u64 = u64::MAX;

/// A message from the daemon to the keeper.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// Keep the descriptor attached to this message under `id`.
    Hold {
        id: u64,
        group: u32,
    },
    Release {
        id: u64,
    },
    Guard {
        addr: IpAddr,
        prefix_len: u8,
        interface: String,
        group: u32,
    },
    Unguard {
        addr: IpAddr,
        interface: String,
    },
    /// Clean shutdown: exit without fencing.
    Exit,
    /// Answer with [`Reply::Synced`] (everything before it is done).
    Sync {
        seq: u64,
    },
    /// `group`'s lease ends at `until_us` ([`NO_LEASE`]: it has none).
    Lease {
        group: u32,
        until_us: u64,
    },
}

/// A message from the keeper to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ready { version: u8, pid: u32 },
    Synced { seq: u64, status: KeeperStatus },
    Fenced { group: u32, sockets: u64 },
}

/// What the keeper holds, as [`Keeper::sync`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperStatus {
    /// Connection sockets held.
    pub held: u64,
    /// Listening sockets held.
    pub listeners: u64,
    /// Addresses to remove on fencing.
    pub guarded: u32,
    /// Holds refused since start (no descriptor, not a TCP socket, …).
    pub refused: u64,
    /// Malformed messages ignored since start.
    pub malformed: u64,
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message type {kind:#04x}: {got} bytes, expected {expected}")]
    Length {
        kind: u8,
        expected: usize,
        got: usize,
    },
    #[error("address family {0} (4 or 6 expected)")]
    Family(u8),
    #[error("prefix length {0} out of range")]
    PrefixLen(u8),
    #[error("interface name: {0}")]
    Interface(&'static str),
}

/// The rules of `dev_valid_name` in the kernel: what an interface may be
/// called.
fn check_interface(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 15 {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("not a name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err("contains '/', ':', NUL or white space");
    }
    Ok(())
}

fn put_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Callers checked the name: at most 15 bytes.
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        match self {
            Request::Hold { id, group } => {
                out.push(T_HOLD);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&group.to_le_bytes());
            }
            Request::Release { id } => {
                out.push(T_RELEASE);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Request::Guard {
                addr,
                prefix_len,
                interface,
                group,
            } => {
                out.push(T_GUARD);
                put_addr(&mut out, *addr);
                out.push(*prefix_len);
                put_name(&mut out, interface);
                out.extend_from_slice(&group.to_le_bytes());
            }
            Request::Unguard { addr, interface } => {
                out.push(T_UNGUARD);
                put_addr(&mut out, *addr);
                put_name(&mut out, interface);
            }
            Request::Exit => out.push(T_EXIT),
            Request::Sync { seq } => {
                out.push(T_SYNC);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Request::Lease { group, until_us } => {
                out.push(T_LEASE);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&until_us.to_le_bytes());
            }
        }
        out
    }

    fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let (&kind, body) = buf.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader { kind, buf: body };
        let req = match kind {
            T_HOLD => Request::Hold {
                id: r.u64()?,
                group: r.u32()?,
            },
            T_RELEASE => Request::Release { id: r.u64()? },
            T_GUARD => {
                let addr = r.addr()?;
                let prefix_len = r.u8()?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if prefix_len == 0 || prefix_len > max {
                    return Err(DecodeError::PrefixLen(prefix_len));
                }
                let interface = r.name()?;
                Request::Guard {
                    addr,
                    prefix_len,
                    interface,
                    group: r.u32()?,
                }
            }
            T_UNGUARD => {
                let addr = r.addr()?;
                let interface = r.name()?;
                Request::Unguard { addr, interface }
            }
            T_EXIT => Request::Exit,
            T_SYNC => Request::Sync { seq: r.u64()? },
            T_LEASE => Request::Lease {
                group: r.u32()?,
                until_us: r.u64()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Reply {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        match self {
            Reply::Ready { version, pid } => {
                out.push(T_READY);
                out.push(*version);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            Reply::Synced { seq, status } => {
                out.push(T_SYNCED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&status.held.to_le_bytes());
                out.extend_from_slice(&status.listeners.to_le_bytes());
                out.extend_from_slice(&status.guarded.to_le_bytes());
                out.extend_from_slice(&status.refused.to_le_bytes());
                out.extend_from_slice(&status.malformed.to_le_bytes());
            }
            Reply::Fenced { group, sockets } => {
                out.push(T_FENCED);
                out.extend_from_slice(&group.to_le_bytes());
                out.extend_from_slice(&sockets.to_le_bytes());
            }
        }
        out
    }

    fn decode(buf: &[u8]) -> Result<Reply, DecodeError> {
        let (&kind, body) = buf.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader { kind, buf: body };
        let reply = match kind {
            T_READY => Reply::Ready {
                version: r.u8()?,
                pid: r.u32()?,
            },
            T_SYNCED => Reply::Synced {
                seq: r.u64()?,
                status: KeeperStatus {
                    held: r.u64()?,
                    listeners: r.u64()?,
                    guarded: r.u32()?,
                    refused: r.u64()?,
                    malformed: r.u64()?,
                },
            },
            T_FENCED => Reply::Fenced {
                group: r.u32()?,
                sockets: r.u64()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.end()?;
        Ok(reply)
    }
}

/// Reads the fields of one message; every read is checked against its end.
struct Reader<'a> {
    kind: u8,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Length {
                kind: self.kind,
                expected: n,
                got: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn addr(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            other => Err(DecodeError::Family(other)),
        }
    }

    fn name(&mut self) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        let name = std::str::from_utf8(bytes).map_err(|_| DecodeError::Interface("not UTF-8"))?;
        check_interface(name).map_err(DecodeError::Interface)?;
        Ok(name.to_owned())
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Length {
                kind: self.kind,
                expected: 0,
                got: self.buf.len(),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// socket plumbing

fn getsockopt_int(fd: BorrowedFd, level: c_int, name: c_int) -> Result<c_int, Errno> {
    let mut val: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `val` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut c_int).cast::<c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(val)
}

fn setsockopt_raw<T>(fd: BorrowedFd, level: c_int, name: c_int, val: &T) -> Result<(), Errno> {
    // SAFETY: `val` is valid for reads of size_of::<T>() bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (val as *const T).cast::<c_void>(),
            size_of::<T>() as socklen_t,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn set_cloexec(fd: BorrowedFd) -> Result<(), Errno> {
    // SAFETY: fcntl on a descriptor we borrow, integer arguments only.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd) -> Result<(), Errno> {
    // SAFETY: fcntl on a descriptor we borrow, integer arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Errno::last());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// poll(2) over `fds`, retried on EINTR; `timeout` None waits for ever.
/// Returns how many descriptors have events (0 on timeout).
fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> Result<usize, Errno> {
    let until = timeout.map(|t| Instant::now() + t);
    loop {
        let ms: c_int = match until {
            None => -1,
            // Rounded up, so a sub-millisecond rest still waits.
            Some(u) => u
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(c_int::MAX as u128) as c_int,
        };
        // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

fn pollfd(fd: BorrowedFd, events: c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Waits up to `timeout` (None: for ever) for `events` on `fd`; returns
/// the events that happened (0 on timeout).
fn poll_one(fd: BorrowedFd, events: c_short, timeout: Option<Duration>) -> Result<c_short, Errno> {
    let mut fds = [pollfd(fd, events)];
    poll_fds(&mut fds, timeout)?;
    Ok(fds[0].revents)
}

const GONE_EVENTS: c_short = libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR;

/// Whether the other end of a socketpair is gone (its last descriptor
/// closed, or it shut its sending side).
fn peer_gone(fd: BorrowedFd) -> bool {
    match poll_one(fd, libc::POLLRDHUP, Some(Duration::ZERO)) {
        Ok(ev) => ev & GONE_EVENTS != 0,
        Err(_) => true,
    }
}

/// Bytes of all the datagrams queued on a unix SEQPACKET socket (SIOCINQ).
fn queued_bytes(fd: BorrowedFd) -> usize {
    let mut n: c_int = 0;
    // SAFETY: SIOCINQ writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// One datagram as `recvmsg` gave it.
struct Received {
    len: usize,
    fds: Vec<OwnedFd>,
    /// The datagram was longer than the buffer.
    truncated: bool,
    /// More descriptors came than the control buffer takes: the kernel
    /// closed the rest.
    fds_truncated: bool,
}

enum Recv {
    Message(Received),
    /// Nothing queued.
    Empty,
    /// The other end is gone and everything it sent has been read.
    Eof,
}

/// Receives one queued datagram without waiting, with its descriptors
/// (close-on-exec). Descriptors are taken even from a malformed message,
/// so they are closed by us and not leaked.
fn recv_one(fd: BorrowedFd, buf: &mut [u8]) -> Result<Recv, KeeperError> {
    // u64 words keep the control buffer aligned for cmsghdr.
    const CMSG_WORDS: usize = 8 + MAX_FDS;
    let mut cmsg = [0u64; CMSG_WORDS];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut mhdr: libc::msghdr = unsafe { std::mem::zeroed() };
        mhdr.msg_iov = &mut iov;
        mhdr.msg_iovlen = 1;
        mhdr.msg_control = cmsg.as_mut_ptr().cast::<c_void>();
        mhdr.msg_controllen = size_of_val(&cmsg) as _;
        // SAFETY: mhdr points at `iov` (into `buf`) and `cmsg`, both live
        // and of the lengths given.
        let n = unsafe {
            libc::recvmsg(
                fd.as_raw_fd(),
                &mut mhdr,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            return match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => Ok(Recv::Empty),
                Errno::ECONNRESET | Errno::ENOTCONN | Errno::EPIPE => Ok(Recv::Eof),
                e => Err(sys("recvmsg", e)),
            };
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel filled mhdr's control part; CMSG_FIRSTHDR and
        // CMSG_NXTHDR stay within msg_controllen.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&mhdr) };
        while !c.is_null() {
            // SAFETY: `c` points at a cmsghdr inside `cmsg`.
            let hdr = unsafe { std::ptr::read_unaligned(c) };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_DATA of a header inside the buffer.
                let data = unsafe { libc::CMSG_DATA(c) };
                let head = data as usize - c as usize;
                let count = (hdr.cmsg_len as usize).saturating_sub(head) / size_of::<c_int>();
                for i in 0..count {
                    // SAFETY: `count` ints follow CMSG_DATA within cmsg_len.
                    let raw = unsafe { std::ptr::read_unaligned(data.cast::<c_int>().add(i)) };
                    if raw >= 0 {
                        // SAFETY: SCM_RIGHTS installed this descriptor in
                        // our table just now; nobody else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            c = unsafe { libc::CMSG_NXTHDR(&mhdr, c) };
        }
        let truncated = mhdr.msg_flags & libc::MSG_TRUNC != 0;
        let fds_truncated = mhdr.msg_flags & libc::MSG_CTRUNC != 0;
        // End of stream and an empty datagram both read as 0 bytes: it is
        // the end if the peer is gone and nothing with bytes is queued
        // (holds sent before an empty datagram must still be read).
        if n == 0 && fds.is_empty() && !truncated && peer_gone(fd) && queued_bytes(fd) == 0 {
            return Ok(Recv::Eof);
        }
        return Ok(Recv::Message(Received {
            len: n as usize,
            fds,
            truncated,
            fds_truncated,
        }));
    }
}

fn send_on(
    fd: BorrowedFd,
    msg: &[u8],
    attach: Option<BorrowedFd>,
    flags: MsgFlags,
) -> Result<(), KeeperError> {
    let iov = [IoSlice::new(msg)];
    let raw;
    let cmsgs: &[ControlMessage] = match attach {
        Some(a) => {
            raw = [a.as_raw_fd()];
            &[ControlMessage::ScmRights(&raw)]
        }
        None => &[],
    };
    loop {
        match sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            cmsgs,
            flags | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(KeeperError::Busy {
                    ms: SEND_TIMEOUT.as_millis(),
                })
            }
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(KeeperError::Gone)
            }
            Err(e) => return Err(sys("sendmsg", e)),
        }
    }
}

// ---------------------------------------------------------------------------
// the daemon's side

/// The daemon's handle on its keeper process. Its calls are one `sendmsg`
/// each on a unix socket (microseconds; they wait only if the keeper is
/// stuck, for at most 2 s, then fail with [`KeeperError::Busy`]), and may be
/// made from any thread at once.
pub struct Keeper {
    sock: OwnedFd,
    pid: u32,
    child: Mutex<Option<Child>>,
    /// Sequence number of the last [`Keeper::sync`]; one reader of the
    /// keeper's replies at a time, under this lock.
    sync: Mutex<u64>,
    /// Lease fences the keeper reported, per group.
    fenced: Mutex<HashMap<u32, u64>>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").field("pid", &self.pid).finish()
    }
}

impl Keeper {
    /// Starts the keeper: runs `program args…` (the daemon's own executable
    /// and its hidden keeper subcommand) with its end of the socketpair as
    /// descriptor [`KEEPER_FD`] and [`KEEPER_FD_ENV`] set (see the module
    /// docs), and waits up to 5 s for its ready message.
    pub fn spawn(program: &Path, args: &[&OsStr]) -> Result<Keeper, KeeperError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| sys("socketpair", e))?;
        // Room for bursts of holds; the forced size needs CAP_NET_ADMIN.
        if setsockopt_raw(
            ours.as_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &SEND_BUFFER,
        )
        .is_err()
        {
            let _ = setsockopt_raw(
                ours.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &SEND_BUFFER,
            );
        }
        let timeout = libc::timeval {
            tv_sec: SEND_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        setsockopt_raw(ours.as_fd(), libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)
            .map_err(|e| sys("setsockopt(SO_SNDTIMEO)", e))?;

        let mut cmd = Command::new(program);
        cmd.args(args)
            .env(KEEPER_FD_ENV, KEEPER_FD.to_string())
            .stdin(Stdio::null());
        // The keeper has nothing to say on stdout, and the daemon's stdout
        // may be a channel to whoever started it: send it to stderr.
        if let Ok(err) = std::io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(Stdio::from(err));
        }
        let theirs_raw = theirs.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                let rc = if theirs_raw == KEEPER_FD {
                    libc::fcntl(KEEPER_FD, libc::F_SETFD, 0)
                } else {
                    // dup2 clears close-on-exec on the copy.
                    libc::dup2(theirs_raw, KEEPER_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(KeeperError::Spawn)?;
        drop(theirs);
        let spawned = child.id();
        let mut keeper = Keeper {
            sock: ours,
            pid: spawned,
            child: Mutex::new(Some(child)),
            sync: Mutex::new(0),
            fenced: Mutex::new(HashMap::new()),
        };
        match keeper.wait_ready() {
            Ok(pid) => {
                if pid != spawned {
                    tracing::debug!(spawned, pid, "keeper runs under another process id");
                }
                keeper.pid = pid;
                tracing::info!(pid, "keeper ready");
                Ok(keeper)
            }
            Err(e) => {
                keeper.kill();
                Err(e)
            }
        }
    }

    fn wait_ready(&self) -> Result<u32, KeeperError> {
        let until = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let ev = poll_one(self.sock.as_fd(), libc::POLLIN, Some(left))
                .map_err(|e| sys("poll", e))?;
            if ev == 0 {
                return Err(KeeperError::NotReady(format!(
                    "no ready message within {} ms",
                    READY_TIMEOUT.as_millis()
                )));
            }
            match recv_one(self.sock.as_fd(), &mut buf)? {
                Recv::Empty => continue,
                Recv::Eof => {
                    let status = self.reap_now();
                    return Err(KeeperError::NotReady(format!(
                        "it exited before it was ready ({status})"
                    )));
                }
                Recv::Message(m) => match Reply::decode(&buf[..m.len.min(buf.len())]) {
                    Ok(Reply::Ready { version, pid }) if version == PROTOCOL_VERSION => {
                        return Ok(pid)
                    }
                    Ok(Reply::Ready { version, .. }) => {
                        return Err(KeeperError::NotReady(format!(
                            "it speaks protocol {version}, this daemon {PROTOCOL_VERSION}"
                        )))
                    }
                    Ok(other) => {
                        return Err(KeeperError::NotReady(format!(
                            "unexpected first message {other:?}"
                        )))
                    }
                    Err(e) => return Err(KeeperError::NotReady(format!("bad ready message: {e}"))),
                },
            }
        }
    }

    /// Waits a moment for a child that is exiting and describes how it did.
    fn reap_now(&self) -> String {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let Some(child) = guard.as_mut() else {
            return "already reaped".into();
        };
        let until = Instant::now() + Duration::from_millis(500);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    guard.take();
                    return status.to_string();
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
                Ok(None) => return "still running".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn send(&self, req: &Request, attach: Option<BorrowedFd>) -> Result<(), KeeperError> {
        send_on(self.sock.as_fd(), &req.encode(), attach, MsgFlags::empty())
    }

    /// Hands the keeper a duplicate of a connection (or listening) socket
    /// under `id`, in `group` (SCM_RIGHTS: the kernel adds the reference,
    /// so `fd` stays the caller's). A second hold under the same id
    /// replaces the first.
    pub fn hold(&self, id: u64, group: u32, fd: BorrowedFd<'_>) -> Result<(), KeeperError> {
        self.send(&Request::Hold { id, group }, Some(fd))
    }

    /// `group`'s lease now ends at `until_us` (CLOCK_MONOTONIC,
    /// [`crate::clock::monotonic_us`]; [`NO_LEASE`]: never). Never waits:
    /// it is sent from the raft thread, and a renewal that does not fit
    /// fails with [`KeeperError::Busy`] (the keeper fences at the end it
    /// knows, which is safe).
    pub fn lease(&self, group: u32, until_us: u64) -> Result<(), KeeperError> {
        send_on(
            self.sock.as_fd(),
            &Request::Lease { group, until_us }.encode(),
            None,
            MsgFlags::MSG_DONTWAIT,
        )
    }

    /// How many times the keeper fenced `group` because its lease ended,
    /// since start. Reads the keeper's pending replies without waiting.
    pub fn fences(&self, group: u32) -> u64 {
        let _reader = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = [0u8; MAX_MESSAGE];
        while let Ok(Recv::Message(m)) = recv_one(self.sock.as_fd(), &mut buf) {
            self.note_reply(&buf[..m.len.min(buf.len())]);
        }
        self.fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
            .copied()
            .unwrap_or(0)
    }

    /// Records a fence report; returns any other reply.
    fn note_reply(&self, bytes: &[u8]) -> Option<Reply> {
        match Reply::decode(bytes) {
            Ok(Reply::Fenced { group, sockets }) => {
                tracing::warn!(
                    group,
                    sockets,
                    "the keeper fenced a service whose lease ended"
                );
                *self
                    .fenced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(group)
                    .or_insert(0) += 1;
                None
            }
            Ok(other) => Some(other),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable message from the keeper");
                None
            }
        }
    }

    /// The daemon closes (or closed) connection `id` normally: the keeper
    /// drops its copy with a plain close, so whatever the socket's state
    /// says happens at the last close (a FIN, a RST with SO_LINGER 0, or
    /// nothing for a socket in repair mode). Unknown ids are ignored.
    pub fn release(&self, id: u64) -> Result<(), KeeperError> {
        self.send(&Request::Release { id }, None)
    }

    /// An address the keeper removes from `interface` if the daemon dies
    /// or `group`'s lease ends (the VIP, with the interface carrying it).
    /// Checked here as [`crate::vip::take`] checks it.
    pub fn guard_address(
        &self,
        addr: IpAddr,
        prefix_len: u8,
        interface: &str,
        group: u32,
    ) -> Result<(), KeeperError> {
        VipSpec::new(addr, prefix_len, interface).validate()?;
        check_interface(interface).map_err(|reason| KeeperError::Interface {
            name: interface.to_owned(),
            reason,
        })?;
        self.send(
            &Request::Guard {
                addr,
                prefix_len,
                interface: interface.to_owned(),
                group,
            },
            None,
        )
    }

    /// The daemon gave up `addr` on `interface` itself: no longer guarded.
    pub fn unguard_address(&self, addr: IpAddr, interface: &str) -> Result<(), KeeperError> {
        check_interface(interface).map_err(|reason| KeeperError::Interface {
            name: interface.to_owned(),
            reason,
        })?;
        self.send(
            &Request::Unguard {
                addr,
                interface: interface.to_owned(),
            },
            None,
        )
    }

    /// Waits (up to `timeout`) until the keeper has handled every message
    /// sent before, and returns what it holds. For status reports and
    /// tests, not for the data path: it blocks for a round trip.
    pub fn sync(&self, timeout: Duration) -> Result<KeeperStatus, KeeperError> {
        let mut last = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        *last += 1;
        let seq = *last;
        self.send(&Request::Sync { seq }, None)?;
        let until = Instant::now() + timeout;
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let ev = poll_one(self.sock.as_fd(), libc::POLLIN, Some(left))
                .map_err(|e| sys("poll", e))?;
            if ev == 0 {
                return Err(KeeperError::Timeout {
                    ms: timeout.as_millis(),
                });
            }
            match recv_one(self.sock.as_fd(), &mut buf)? {
                Recv::Empty => continue,
                Recv::Eof => return Err(KeeperError::Gone),
                Recv::Message(m) => match self.note_reply(&buf[..m.len.min(buf.len())]) {
                    Some(Reply::Synced { seq: s, status }) if s == seq => return Ok(status),
                    // The answer to an earlier sync that timed out.
                    _ => continue,
                },
            }
        }
    }

    /// Whether the keeper process still holds its end (it did not die).
    pub fn is_alive(&self) -> bool {
        !peer_gone(self.sock.as_fd())
    }

    /// Pid of the keeper process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's clean shutdown: tells the keeper to exit *without*
    /// fencing (its copies close normally) and reaps it; kills it if it
    /// does not exit within 5 s. Dropping the keeper does the same.
    pub fn shutdown(mut self) -> Result<(), KeeperError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), KeeperError> {
        let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let sent = self.send(&Request::Exit, None);
        let until = Instant::now() + EXIT_TIMEOUT;
        if sent.is_ok() {
            // The keeper's end closes when it exits.
            let _ = poll_one(
                self.sock.as_fd(),
                libc::POLLRDHUP,
                Some(until.saturating_duration_since(Instant::now())),
            );
        }
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return sent,
                Ok(Some(status)) => return Err(KeeperError::Exited(status.to_string())),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(KeeperError::Timeout {
                        ms: EXIT_TIMEOUT.as_millis(),
                    });
                }
                Err(e) => return Err(KeeperError::Exited(e.to_string())),
            }
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "keeper shutdown");
        }
    }
}

// ---------------------------------------------------------------------------
// the keeper's side

/// How [`run_keeper`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperExit {
    /// The daemon shut down cleanly: the held sockets were closed normally.
    Released { sockets: usize },
    /// The daemon died (or the keeper got SIGTERM): the held sockets were
    /// closed silently and the guarded addresses removed.
    Fenced(Fenced),
}

/// Why the keeper fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    /// The daemon's end of the socketpair closed.
    DaemonGone,
    /// The keeper got SIGTERM.
    Terminated,
}

/// What fencing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub reason: FenceReason,
    /// Connections closed silently.
    pub sockets: usize,
    /// Connections taken from held listeners' accept queues and closed
    /// silently.
    pub accepted: usize,
    /// Listeners closed.
    pub listeners: usize,
    /// Sockets that could not be put in repair mode (closed plainly).
    pub failed: usize,
    /// Guarded addresses removed (or already gone).
    pub addresses: usize,
    /// Guarded addresses that could not be removed.
    pub address_failures: usize,
    /// From the start of fencing to the last socket closed.
    pub sockets_time: Duration,
    /// From the start of fencing to the last address removed.
    pub total_time: Duration,
}

/// A socket the keeper holds.
struct Held {
    fd: OwnedFd,
    listener: bool,
    group: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Guard {
    addr: IpAddr,
    prefix_len: u8,
    interface: String,
    group: u32,
}

/// Why the serve loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Exit,
    Fence(FenceReason),
}

#[derive(Default)]
struct State {
    held: HashMap<u64, Held>,
    guards: Vec<Guard>,
    /// Each group's lease end (CLOCK_MONOTONIC µs).
    leases: HashMap<u32, u64>,
    refused: u64,
    malformed: u64,
}

/// What a held socket is: a TCP connection, a TCP listener, or not ours.
fn classify(fd: BorrowedFd) -> Result<bool, &'static str> {
    let domain =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|_| "not a socket")?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err("not an IP socket");
    }
    let proto =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(|_| "not a socket")?;
    if proto != libc::IPPROTO_TCP {
        return Err("not a TCP socket");
    }
    let listening =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|_| "not a socket")?;
    Ok(listening != 0)
}

impl State {
    fn status(&self) -> KeeperStatus {
        let listeners = self.held.values().filter(|h| h.listener).count() as u64;
        KeeperStatus {
            held: self.held.len() as u64 - listeners,
            listeners,
            guarded: self.guards.len() as u32,
            refused: self.refused,
            malformed: self.malformed,
        }
    }

    fn malformed(&mut self, why: &dyn std::fmt::Display) {
        self.malformed += 1;
        if self.malformed <= MALFORMED_LOGGED {
            tracing::warn!(reason = %why, "keeper: ignoring a malformed message");
        } else {
            tracing::debug!(reason = %why, "keeper: ignoring a malformed message");
        }
    }

    /// Handles one received datagram; returns why to stop, if it says so.
    fn handle(&mut self, sock: BorrowedFd, buf: &[u8], msg: Received) -> Option<Stop> {
        let Received {
            len,
            mut fds,
            truncated,
            fds_truncated,
        } = msg;
        if truncated {
            self.malformed(&format_args!("longer than {} bytes", buf.len()));
            return None;
        }
        if fds_truncated {
            self.malformed(&"more descriptors than a message carries");
            return None;
        }
        let req = match Request::decode(&buf[..len.min(buf.len())]) {
            Ok(req) => req,
            Err(e) => {
                self.malformed(&e);
                return None;
            }
        };
        if !matches!(req, Request::Hold { .. }) && !fds.is_empty() {
            self.malformed(&"descriptors attached to a message that takes none");
            return None;
        }
        match req {
            Request::Hold { id, group } => {
                if fds.len() != 1 {
                    self.refused += 1;
                    tracing::warn!(
                        id,
                        fds = fds.len(),
                        "keeper: hold without exactly one socket"
                    );
                    return None;
                }
                let fd = fds.pop().expect("one descriptor");
                match classify(fd.as_fd()) {
                    Ok(listener) => {
                        let held = Held {
                            fd,
                            listener,
                            group,
                        };
                        if self.held.insert(id, held).is_some() {
                            tracing::warn!(id, "keeper: hold replaced an earlier one");
                        }
                    }
                    Err(why) => {
                        self.refused += 1;
                        tracing::warn!(id, why, "keeper: hold refused");
                    }
                }
            }
            Request::Release { id } => {
                if self.held.remove(&id).is_none() {
                    tracing::debug!(id, "keeper: release of a socket not held");
                }
            }
            Request::Guard {
                addr,
                prefix_len,
                interface,
                group,
            } => {
                match self
                    .guards
                    .iter_mut()
                    .find(|g| g.addr == addr && g.interface == interface)
                {
                    Some(g) => {
                        g.prefix_len = prefix_len;
                        g.group = group;
                    }
                    None => self.guards.push(Guard {
                        addr,
                        prefix_len,
                        interface,
                        group,
                    }),
                }
                tracing::info!(%addr, prefix_len, "keeper: guarding address");
            }
            Request::Unguard { addr, interface } => {
                self.guards
                    .retain(|g| !(g.addr == addr && g.interface == interface));
            }
            Request::Exit => return Some(Stop::Exit),
            Request::Lease { group, until_us } => {
                if until_us == NO_LEASE {
                    self.leases.remove(&group);
                } else {
                    self.leases.insert(group, until_us);
                }
            }
            Request::Sync { seq } => {
                let reply = Reply::Synced {
                    seq,
                    status: self.status(),
                };
                if let Err(e) = send_on(sock, &reply.encode(), None, MsgFlags::MSG_DONTWAIT) {
                    tracing::warn!(error = %e, "keeper: cannot answer a sync");
                }
            }
        }
        None
    }

    /// Handles every queued message; returns why to stop, if one says so
    /// or the daemon is gone.
    fn drain(&mut self, sock: BorrowedFd) -> Result<Option<Stop>, KeeperError> {
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            match recv_one(sock, &mut buf)? {
                Recv::Empty => return Ok(None),
                Recv::Eof => return Ok(Some(Stop::Fence(FenceReason::DaemonGone))),
                Recv::Message(m) => {
                    if let Some(stop) = self.handle(sock, &buf, m) {
                        return Ok(Some(stop));
                    }
                }
            }
        }
    }

    /// The earliest lease end, if any group has one.
    fn next_lease_end(&self) -> Option<u64> {
        self.leases.values().min().copied()
    }

    /// Fences every group whose lease ended by `now_us`: its connections
    /// closed silently (the daemon's copies stay in repair mode), its
    /// addresses removed, and the daemon told. Listeners stay: nothing
    /// reaches them once the address is gone.
    fn fence_expired(&mut self, sock: BorrowedFd, now_us: u64) {
        let ended: Vec<u32> = self
            .leases
            .iter()
            .filter(|(_, until)| **until <= now_us)
            .map(|(g, _)| *g)
            .collect();
        for group in ended {
            let start = Instant::now();
            self.leases.remove(&group);
            let ids: Vec<u64> = self
                .held
                .iter()
                .filter(|(_, h)| h.group == group && !h.listener)
                .map(|(id, _)| *id)
                .collect();
            // Told first: a daemon whose socket calls fail from here on
            // finds the reason waiting (and does not take the errors for
            // the clients').
            let reply = Reply::Fenced {
                group,
                sockets: ids.len() as u64,
            };
            if let Err(e) = send_on(sock, &reply.encode(), None, MsgFlags::MSG_DONTWAIT) {
                tracing::warn!(error = %e, "keeper: cannot report a fence");
            }
            let (mut sockets, mut failed) = (0u64, 0u64);
            for id in ids {
                let Some(held) = self.held.remove(&id) else {
                    continue;
                };
                match crate::repair::close_silently(held.fd) {
                    Ok(()) => sockets += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(id, error = %e.source, "keeper: socket closed plainly");
                    }
                }
            }
            let (guards, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.guards)
                .into_iter()
                .partition(|g| g.group == group);
            self.guards = kept;
            let (addresses, address_failures) = remove_addresses(&guards);
            tracing::warn!(
                group,
                sockets,
                failed,
                addresses,
                address_failures,
                took_us = start.elapsed().as_micros() as u64,
                late_us = crate::clock::monotonic_us().saturating_sub(now_us),
                "keeper: a lease ended without renewal: fenced its service"
            );
        }
    }

    /// Closes every held socket without a word, then removes the guarded
    /// addresses.
    fn fence(self, reason: FenceReason) -> Fenced {
        let start = Instant::now();
        let mut out = Fenced {
            reason,
            sockets: 0,
            accepted: 0,
            listeners: 0,
            failed: 0,
            addresses: 0,
            address_failures: 0,
            sockets_time: Duration::ZERO,
            total_time: Duration::ZERO,
        };
        let (listeners, conns): (Vec<_>, Vec<_>) =
            self.held.into_iter().partition(|(_, h)| h.listener);
        for (id, held) in conns {
            match crate::repair::close_silently(held.fd) {
                Ok(()) => out.sockets += 1,
                Err(e) => {
                    out.failed += 1;
                    tracing::warn!(id, error = %e.source, "keeper: socket closed plainly");
                }
            }
        }
        // A listener's unaccepted connections would get a RST when it
        // closes: take them and close them silently first.
        for (id, held) in listeners {
            let _ = set_nonblocking(held.fd.as_fd());
            loop {
                match nix::sys::socket::accept4(
                    held.fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                ) {
                    Ok(raw) => {
                        // SAFETY: accept4 returned a new descriptor we own.
                        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                        match crate::repair::close_silently(conn) {
                            Ok(()) => out.accepted += 1,
                            Err(e) => {
                                out.failed += 1;
                                tracing::warn!(id, error = %e.source, "keeper: pending connection closed plainly");
                            }
                        }
                    }
                    Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                    Err(Errno::EAGAIN) => break,
                    Err(e) => {
                        tracing::warn!(id, error = %e, "keeper: accept on a held listener");
                        break;
                    }
                }
            }
            drop(held);
            out.listeners += 1;
        }
        out.sockets_time = start.elapsed();
        let (removed, failed) = remove_addresses(&self.guards);
        out.addresses = removed;
        out.address_failures = failed;
        out.total_time = start.elapsed();
        tracing::info!(
            reason = ?out.reason,
            sockets = out.sockets,
            accepted = out.accepted,
            listeners = out.listeners,
            failed = out.failed,
            addresses = out.addresses,
            address_failures = out.address_failures,
            sockets_us = out.sockets_time.as_micros() as u64,
            total_us = out.total_time.as_micros() as u64,
            "keeper: fenced"
        );
        out
    }
}

/// Removes the guarded addresses through rtnetlink, on a runtime of this
/// thread (in the keeper's network namespace). Returns (removed or already
/// absent, failed).
fn remove_addresses(guards: &[Guard]) -> (usize, usize) {
    if guards.is_empty() {
        return (0, 0);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "keeper: no runtime to remove the addresses with");
            return (0, guards.len());
        }
    };
    let (mut removed, mut failed) = (0, 0);
    for g in guards {
        let spec = VipSpec::new(g.addr, g.prefix_len, g.interface.clone());
        match rt.block_on(crate::vip::release(&spec)) {
            Ok(r) => {
                removed += 1;
                tracing::info!(addr = %g.addr, interface = %g.interface, was_there = r.removed_address, "keeper: address removed");
            }
            Err(e) => {
                failed += 1;
                tracing::error!(addr = %g.addr, interface = %g.interface, error = %e, "keeper: cannot remove address");
            }
        }
    }
    (removed, failed)
}

/// Write end of the SIGTERM self-pipe (-1: none).
static TERM_PIPE: AtomicI32 = AtomicI32::new(-1);
static RUNNING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: c_int) {
    let fd = TERM_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) and errno access are async-signal-safe; errno
        // is restored for the interrupted code.
        unsafe {
            let errno = *libc::__errno_location();
            let byte = 1u8;
            libc::write(fd, (&byte as *const u8).cast::<c_void>(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// SIGTERM becomes a byte on a pipe the serve loop polls (whichever thread
/// the signal lands on); SIGINT, SIGHUP and SIGPIPE are ignored: a terminal's
/// Ctrl-C or hang-up reaches the daemon, which decides (and the keeper
/// follows its death).
fn install_signals() -> Result<OwnedFd, KeeperError> {
    use nix::sys::signal::{
        pthread_sigmask, sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
    };
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| sys("pipe2", e))?;
    // The write end lives as long as the process.
    TERM_PIPE.store(write.into_raw_fd(), Ordering::Relaxed);
    let term = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only writes to a pipe (async-signal-safe).
    unsafe {
        sigaction(Signal::SIGTERM, &term).map_err(|e| sys("sigaction(SIGTERM)", e))?;
        for sig in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
            sigaction(sig, &ignore).map_err(|e| sys("sigaction", e))?;
        }
    }
    let mut unblock = SigSet::empty();
    unblock.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&unblock), None)
        .map_err(|e| sys("pthread_sigmask", e))?;
    Ok(read)
}

/// The socket [`Keeper::spawn`] left at the descriptor named by
/// [`KEEPER_FD_ENV`], checked to be a unix SEQPACKET socket.
fn inherited_socket() -> Result<OwnedFd, KeeperError> {
    let val = std::env::var(KEEPER_FD_ENV).map_err(|_| KeeperError::NotSpawned)?;
    let raw: RawFd = val
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| KeeperError::BadFd(format!("{val:?} is not a descriptor number")))?;
    // SAFETY: only borrowed for the checks below; a closed number makes
    // getsockopt fail with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| KeeperError::BadFd(format!("descriptor {raw}: {e}")))?;
    let domain = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|e| KeeperError::BadFd(format!("descriptor {raw}: {e}")))?;
    if ty != libc::SOCK_SEQPACKET || domain != libc::AF_UNIX {
        return Err(KeeperError::BadFd(format!(
            "descriptor {raw} is not a unix SEQPACKET socket"
        )));
    }
    // SAFETY: the spawning daemon gave this descriptor to this process for
    // the keeper, and run_keeper runs once (checked by the caller).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(fd.as_fd()).map_err(|e| sys("fcntl(FD_CLOEXEC)", e))?;
    Ok(fd)
}

/// The keeper process's whole body (the hidden subcommand): takes the
/// socket [`Keeper::spawn`] gave it, says it is ready, and serves until the
/// daemon says exit (held sockets closed normally) or is gone (fencing).
/// Blocks until then; single-threaded. Call it once, with logging set up.
pub fn run_keeper() -> Result<KeeperExit, KeeperError> {
    if RUNNING.swap(true, Ordering::SeqCst) {
        return Err(KeeperError::AlreadyRunning);
    }
    let sock = inherited_socket()?;
    match crate::raise_fd_limit(KEEPER_FD_LIMIT) {
        Ok(limit) if limit < KEEPER_FD_LIMIT => {
            tracing::warn!(limit, "keeper: open-file limit below the wanted one")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "keeper: open-file limit"),
    }
    // A lease's end must be acted on at once, also on a busy host.
    if let Err(e) = crate::limits::prioritise_this_thread() {
        tracing::warn!(error = %e, "keeper: cannot raise its priority");
    }
    let term = install_signals()?;
    let ready = Reply::Ready {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    send_on(sock.as_fd(), &ready.encode(), None, MsgFlags::empty())?;
    serve(sock.as_fd(), Some(term.as_fd()))
}

/// The keeper's loop on `sock`, with an optional SIGTERM pipe.
fn serve(sock: BorrowedFd, term: Option<BorrowedFd>) -> Result<KeeperExit, KeeperError> {
    let mut state = State::default();
    let stop = loop {
        let mut fds = vec![pollfd(sock, libc::POLLIN | libc::POLLRDHUP)];
        if let Some(t) = term {
            fds.push(pollfd(t, libc::POLLIN));
        }
        let wait = state
            .next_lease_end()
            .map(|end| Duration::from_micros(end.saturating_sub(crate::clock::monotonic_us())));
        if let Err(e) = poll_fds(&mut fds, wait) {
            // Cannot wait any more: fence rather than leave sockets that
            // would speak if the daemon died after us.
            tracing::error!(error = %e, "keeper: poll failed");
            break Stop::Fence(FenceReason::DaemonGone);
        }
        let sock_ev = fds[0].revents;
        let termed = fds.get(1).is_some_and(|f| f.revents != 0);
        // Always read what is queued first: holds sent just before the
        // daemon died carry sockets that exist nowhere else.
        match state.drain(sock) {
            Ok(Some(stop)) => break stop,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "keeper: reading the daemon's socket");
                break Stop::Fence(FenceReason::DaemonGone);
            }
        }
        // After the queue is read: a renewal sent in time counts.
        state.fence_expired(sock, crate::clock::monotonic_us());
        if termed {
            tracing::info!("keeper: SIGTERM");
            break Stop::Fence(FenceReason::Terminated);
        }
        if sock_ev & GONE_EVENTS != 0 && peer_gone(sock) {
            break Stop::Fence(FenceReason::DaemonGone);
        }
    };
    match stop {
        Stop::Exit => {
            let sockets = state.held.len();
            tracing::info!(
                sockets,
                "keeper: the daemon shut down; closing held sockets normally"
            );
            Ok(KeeperExit::Released { sockets })
        }
        Stop::Fence(reason) => Ok(KeeperExit::Fenced(state.fence(reason))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hold { id: 0, group: 0 },
            Request::Hold {
                id: u64::MAX,
                group: 0,
            },
            Request::Release { id: 42 },
            Request::Guard {
                addr: "198.18.0.10".parse().unwrap(),
                prefix_len: 32,
                interface: "eth0".into(),
                group: 1,
            },
            Request::Guard {
                addr: "fd00:198:18::10".parse().unwrap(),
                prefix_len: 64,
                interface: "baton6.255".into(),
                group: u32::MAX,
            },
            Request::Unguard {
                addr: "198.18.0.10".parse().unwrap(),
                interface: "a23456789012345".into(),
            },
            Request::Exit,
            Request::Sync { seq: 7 },
            Request::Lease {
                group: 3,
                until_us: 1_234_567,
            },
            Request::Lease {
                group: 0,
                until_us: NO_LEASE,
            },
        ]
    }

    #[test]
    fn requests_and_replies_round_trip() {
        for req in all_requests() {
            let bytes = req.encode();
            assert!(bytes.len() <= MAX_MESSAGE, "{req:?}");
            assert_eq!(Request::decode(&bytes), Ok(req));
        }
        for reply in [
            Reply::Ready {
                version: PROTOCOL_VERSION,
                pid: 1234,
            },
            Reply::Synced {
                seq: 9,
                status: KeeperStatus {
                    held: 1,
                    listeners: 2,
                    guarded: 3,
                    refused: 4,
                    malformed: 5,
                },
            },
            Reply::Fenced {
                group: 7,
                sockets: 1000,
            },
        ] {
            assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        let guard = |fam: u8, addr: &[u8], prefix: u8, name: &[u8]| {
            let mut v = vec![T_GUARD, fam];
            v.extend_from_slice(addr);
            v.push(prefix);
            v.push(name.len() as u8);
            v.extend_from_slice(name);
            v
        };
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (vec![], DecodeError::Empty),
            (vec![0], DecodeError::UnknownType(0)),
            (vec![0x81, 1, 0, 0, 0, 0], DecodeError::UnknownType(0x81)),
            (
                vec![T_HOLD, 1, 2, 3],
                DecodeError::Length {
                    kind: T_HOLD,
                    expected: 8,
                    got: 3,
                },
            ),
            (
                [&[T_RELEASE][..], &[0; 9]].concat(),
                DecodeError::Length {
                    kind: T_RELEASE,
                    expected: 0,
                    got: 1,
                },
            ),
            (
                vec![T_EXIT, 0],
                DecodeError::Length {
                    kind: T_EXIT,
                    expected: 0,
                    got: 1,
                },
            ),
            (guard(5, &[1, 2, 3, 4], 32, b"eth0"), DecodeError::Family(5)),
            (
                guard(4, &[1, 2, 3, 4], 0, b"eth0"),
                DecodeError::PrefixLen(0),
            ),
            (
                guard(4, &[1, 2, 3, 4], 33, b"eth0"),
                DecodeError::PrefixLen(33),
            ),
            (
                guard(6, &[1; 16], 129, b"eth0"),
                DecodeError::PrefixLen(129),
            ),
            (
                guard(4, &[1, 2, 3, 4], 32, b""),
                DecodeError::Interface("empty"),
            ),
            (
                guard(4, &[1, 2, 3, 4], 32, b"a234567890123456"),
                DecodeError::Interface("longer than 15 bytes"),
            ),
            (
                guard(4, &[1, 2, 3, 4], 32, b"et/h0"),
                DecodeError::Interface("contains '/', ':', NUL or white space"),
            ),
            (
                guard(4, &[1, 2, 3, 4], 32, &[0xff, 0xfe]),
                DecodeError::Interface("not UTF-8"),
            ),
            (
                // The name's length byte says more than there is.
                vec![T_UNGUARD, 4, 1, 2, 3, 4, 9, b'e'],
                DecodeError::Length {
                    kind: T_UNGUARD,
                    expected: 9,
                    got: 1,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Request::decode(&bytes), Err(want), "{bytes:?}");
        }
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        #[test]
        fn every_truncation_of_a_valid_request_is_an_error(which in 0usize..10, cut in 0usize..40) {
            let bytes = all_requests()[which].encode();
            prop_assume!(cut < bytes.len());
            prop_assert!(Request::decode(&bytes[..cut]).is_err());
        }
    }

    /// A keeper loop on a real socketpair: garbage, descriptors where none
    /// belong, holds of non-TCP sockets and without a socket are ignored
    /// (and counted), and the loop still answers and holds real sockets.
    #[test]
    fn the_loop_ignores_malformed_messages_and_keeps_serving() {
        let (daemon, keeper) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let server = std::thread::spawn(move || serve(keeper.as_fd(), None));
        let d = daemon.as_fd();
        let send = |bytes: &[u8], fd: Option<BorrowedFd>| {
            send_on(d, bytes, fd, MsgFlags::empty()).unwrap()
        };
        let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let udp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        send(&[], None); // an empty datagram, not the end
        send(&[0xee; 3], None);
        send(&[0xee; 200], None); // longer than any message
        send(&[T_RELEASE], None);
        send(&Request::Exit.encode()[..], Some(tcp.as_fd())); // no fd expected
        send(&Request::Hold { id: 1, group: 0 }.encode(), None); // no fd: refused
        send(
            &Request::Hold { id: 2, group: 0 }.encode(),
            Some(udp.as_fd()),
        ); // not TCP: refused
        send(
            &Request::Hold { id: 3, group: 0 }.encode(),
            Some(tcp.as_fd()),
        );
        send(&Request::Release { id: 99 }.encode(), None); // unknown id
        send(
            &Request::Guard {
                addr: "198.18.0.10".parse().unwrap(),
                prefix_len: 32,
                interface: "lo0".into(),
                group: 0,
            }
            .encode(),
            None,
        );
        send(&Request::Sync { seq: 5 }.encode(), None);
        let mut buf = [0u8; MAX_MESSAGE];
        assert_ne!(
            poll_one(d, libc::POLLIN, Some(Duration::from_secs(5))).unwrap(),
            0
        );
        let Recv::Message(m) = recv_one(d, &mut buf).unwrap() else {
            panic!("no answer to sync");
        };
        assert_eq!(
            Reply::decode(&buf[..m.len]).unwrap(),
            Reply::Synced {
                seq: 5,
                status: KeeperStatus {
                    held: 1,
                    listeners: 0,
                    guarded: 1,
                    refused: 2,
                    malformed: 5,
                }
            }
        );
        send(&Request::Exit.encode(), None);
        let exit = server.join().unwrap().unwrap();
        assert_eq!(exit, KeeperExit::Released { sockets: 1 });
    }

    /// What the daemon sent just before it died is read before fencing,
    /// an empty datagram included: the sockets of those holds exist
    /// nowhere else.
    #[test]
    fn the_loop_reads_everything_queued_before_fencing() {
        let (daemon, keeper) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let d = daemon.as_fd();
        send_on(d, &[], None, MsgFlags::empty()).unwrap();
        send_on(
            d,
            &Request::Hold { id: 1, group: 0 }.encode(),
            Some(tcp.as_fd()),
            MsgFlags::empty(),
        )
        .unwrap();
        send_on(
            d,
            &Request::Hold { id: 2, group: 0 }.encode(),
            Some(tcp.as_fd()),
            MsgFlags::empty(),
        )
        .unwrap();
        drop(tcp);
        drop(daemon);
        let KeeperExit::Fenced(f) = serve(keeper.as_fd(), None).unwrap() else {
            panic!("no fencing");
        };
        assert_eq!(f.reason, FenceReason::DaemonGone);
        // Repair mode needs CAP_NET_ADMIN; without it the socket counts
        // as failed, still fenced.
        assert_eq!(f.sockets + f.failed, 2, "{f:?}");
    }

    /// A group whose lease ends is fenced alone, once, and reported; a
    /// renewal in time keeps the other; the keeper goes on serving.
    #[test]
    fn an_ended_lease_fences_its_group_alone() {
        let (daemon, keeper) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let server = std::thread::spawn(move || serve(keeper.as_fd(), None));
        let d = daemon.as_fd();
        let send = |req: Request, fd: Option<BorrowedFd>| {
            send_on(d, &req.encode(), fd, MsgFlags::empty()).unwrap()
        };
        let sockets: Vec<_> = (0..3)
            .map(|_| {
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()
            })
            .collect();
        send(Request::Hold { id: 1, group: 1 }, Some(sockets[0].as_fd()));
        send(Request::Hold { id: 2, group: 1 }, Some(sockets[1].as_fd()));
        send(Request::Hold { id: 3, group: 2 }, Some(sockets[2].as_fd()));
        let now = crate::clock::monotonic_us();
        send(
            Request::Lease {
                group: 1,
                until_us: now + 30_000,
            },
            None,
        );
        send(
            Request::Lease {
                group: 2,
                until_us: now + 30_000,
            },
            None,
        );
        send(
            Request::Lease {
                group: 2,
                until_us: now + 10_000_000,
            },
            None,
        );
        let mut buf = [0u8; MAX_MESSAGE];
        assert_ne!(
            poll_one(d, libc::POLLIN, Some(Duration::from_secs(5))).unwrap(),
            0
        );
        let Recv::Message(m) = recv_one(d, &mut buf).unwrap() else {
            panic!("no fence report");
        };
        assert!(crate::clock::monotonic_us() >= now + 30_000, "fenced early");
        let Reply::Fenced { group, sockets: n } = Reply::decode(&buf[..m.len]).unwrap() else {
            panic!("not a fence report");
        };
        assert_eq!((group, n), (1, 2));
        send(Request::Sync { seq: 1 }, None);
        assert_ne!(
            poll_one(d, libc::POLLIN, Some(Duration::from_secs(5))).unwrap(),
            0
        );
        let Recv::Message(m) = recv_one(d, &mut buf).unwrap() else {
            panic!("no answer to sync");
        };
        let Reply::Synced { status, .. } = Reply::decode(&buf[..m.len]).unwrap() else {
            panic!("not a sync answer");
        };
        assert_eq!(status.held, 1, "group 2 is still held");
        send(Request::Exit, None);
        assert_eq!(
            server.join().unwrap().unwrap(),
            KeeperExit::Released { sockets: 1 }
        );
    }

    #[test]
    fn the_handle_is_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Keeper>();
    }

    #[test]
    fn run_keeper_refuses_to_run_unspawned() {
        if std::env::var_os(KEEPER_FD_ENV).is_some() {
            return;
        }
        assert!(matches!(inherited_socket(), Err(KeeperError::NotSpawned)));
    }
}
