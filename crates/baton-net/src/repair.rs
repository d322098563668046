//! Freezing and thawing live TCP sockets with the kernel's TCP_REPAIR mode.
//!
//! [`freeze`] reads everything a kernel socket knows about its connection
//! into a [`TcpConnState`]; [`thaw`] builds a socket from one, in this or
//! another kernel, so the peer sees nothing but a short pause: no handshake,
//! no FIN, no RST, no byte lost or repeated. [`resume`] and
//! [`close_silently`] end a freeze on the original socket: it keeps serving
//! (a move that failed) or disappears without a trace (a move that worked).
//!
//! The caller must hold the connection's incoming traffic (drop or queue it
//! before TCP sees it) from before [`freeze`] until the thawed socket
//! exists: a socket in repair mode still takes in and acknowledges
//! segments, which would then be missing from the frozen state, and a
//! segment arriving while no socket exists is answered with a RST.
//!
//! The order of operations follows the kernel's constraints (see
//! `net/ipv4/tcp.c`, `do_tcp_setsockopt`), as CRIU's libsoccr does:
//! queue sequence numbers can only be set before `connect`, options only
//! after it and before any data, the window only once the queues are in.
//! Half-closed connections get their FINs re-created: ours by `shutdown`
//! once repair mode is off, the peer's by a FIN segment injected from the
//! peer's address through a raw socket (marked [`INJECT_MARK`]).

use std::mem::size_of;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use baton_core::packet::ConnKey;
use baton_core::replica::Established;
use baton_core::tcp_state::{
    InvalidState, RepairWindow, SocketOptions, TcpConnState, TcpOptions, TcpState, WindowScale,
};
use libc::{c_int, c_void, socklen_t};
use nix::errno::Errno;

/// Kernel constants and structures of TCP_REPAIR (`include/uapi/linux/tcp.h`).
/// Defined here so we do not depend on which of them a libc version carries;
/// the ones libc has are checked against it at compile time.
pub mod sys {
    use libc::c_int;

    pub const TCP_REPAIR: c_int = 19;
    pub const TCP_REPAIR_QUEUE: c_int = 20;
    pub const TCP_QUEUE_SEQ: c_int = 21;
    pub const TCP_REPAIR_OPTIONS: c_int = 22;
    pub const TCP_TIMESTAMP: c_int = 24;
    pub const TCP_REPAIR_WINDOW: c_int = 29;

    /// Values of TCP_REPAIR.
    pub const TCP_REPAIR_ON: c_int = 1;
    pub const TCP_REPAIR_OFF: c_int = 0;
    /// Off without the window probe TCP_REPAIR_OFF sends.
    pub const TCP_REPAIR_OFF_NO_WP: c_int = -1;

    /// Values of TCP_REPAIR_QUEUE.
    pub const TCP_NO_QUEUE: c_int = 0;
    pub const TCP_RECV_QUEUE: c_int = 1;
    pub const TCP_SEND_QUEUE: c_int = 2;

    /// Option codes of TCP_REPAIR_OPTIONS (the TCP option kinds).
    pub const TCPOPT_MSS: u32 = 2;
    pub const TCPOPT_WINDOW: u32 = 3;
    pub const TCPOPT_SACK_PERM: u32 = 4;
    pub const TCPOPT_TIMESTAMP: u32 = 8;

    /// Bits of `tcp_info.tcpi_options`.
    pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
    pub const TCPI_OPT_SACK: u8 = 2;
    pub const TCPI_OPT_WSCALE: u8 = 4;

    /// Socket ioctls: bytes in the receive queue, in the send queue, and
    /// in the send queue not yet sent.
    pub const SIOCINQ: libc::c_ulong = 0x541B;
    pub const SIOCOUTQ: libc::c_ulong = 0x5411;
    pub const SIOCOUTQNSD: libc::c_ulong = 0x894B;

    /// `tcp_info.tcpi_state` values (`include/net/tcp_states.h`).
    pub const TCP_ESTABLISHED: u8 = 1;
    pub const TCP_FIN_WAIT1: u8 = 4;
    pub const TCP_FIN_WAIT2: u8 = 5;
    pub const TCP_CLOSE_WAIT: u8 = 8;
    pub const TCP_LAST_ACK: u8 = 9;
    pub const TCP_CLOSING: u8 = 11;

    /// `struct tcp_repair_window`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct TcpRepairWindow {
        pub snd_wl1: u32,
        pub snd_wnd: u32,
        pub max_window: u32,
        pub rcv_wnd: u32,
        pub rcv_wup: u32,
    }

    /// `struct tcp_repair_opt`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct TcpRepairOpt {
        pub opt_code: u32,
        pub opt_val: u32,
    }

    /// The first 8 bytes of `struct tcp_info`, all we need (the kernel
    /// copies as much as asked for).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct TcpInfoHead {
        pub state: u8,
        pub ca_state: u8,
        pub retransmits: u8,
        pub probes: u8,
        pub backoff: u8,
        pub options: u8,
        /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` bit fields.
        pub wscale: u8,
        pub flags: u8,
    }

    impl TcpInfoHead {
        /// (snd_wscale, rcv_wscale) from the bit fields, which C compilers
        /// lay out from the low bits on little-endian targets.
        pub fn wscale(&self) -> (u8, u8) {
            if cfg!(target_endian = "little") {
                (self.wscale & 0x0f, self.wscale >> 4)
            } else {
                (self.wscale >> 4, self.wscale & 0x0f)
            }
        }
    }

    const _: () = assert!(TCP_REPAIR == libc::TCP_REPAIR);
    const _: () = assert!(TCP_REPAIR_QUEUE == libc::TCP_REPAIR_QUEUE);
    const _: () = assert!(TCP_QUEUE_SEQ == libc::TCP_QUEUE_SEQ);
    const _: () = assert!(TCP_REPAIR_OPTIONS == libc::TCP_REPAIR_OPTIONS);
    const _: () = assert!(TCP_TIMESTAMP == libc::TCP_TIMESTAMP);
    const _: () = assert!(SIOCINQ == libc::FIONREAD as libc::c_ulong);
    const _: () = assert!(SIOCOUTQ == libc::TIOCOUTQ as libc::c_ulong);
    const _: () = assert!(size_of::<TcpRepairWindow>() == 20);
    const _: () = assert!(size_of::<TcpRepairOpt>() == 8);
    use std::mem::size_of;
}

use sys::*;

/// `SO_MARK` of the FIN segments [`thaw`] injects for half-closed
/// connections: holds let them through (see [`crate::hold::INJECT_MARK`]).
pub use crate::hold::INJECT_MARK;

/// Bounds of TCP_MAXSEG (`TCP_MIN_MSS`, `MAX_TCP_WINDOW` in the kernel).
const TCP_MIN_MSS: c_int = 88;
const TCP_MAX_USER_MSS: c_int = 32767;

/// How long [`thaw`] waits for the kernel to process an injected FIN.
const INJECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long [`thaw`] waits for send buffer space for the not-yet-sent bytes
/// (buffers are sized first, so this is only a bound, not an expected wait).
const UNSENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times [`freeze`] re-reads a socket whose queues moved under it.
const FREEZE_ATTEMPTS: u32 = 8;

/// Why a freeze, thaw or resume failed.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{op} failed: {errno}")]
    Sys { op: &'static str, errno: Errno },
    #[error(
        "cannot move a socket in TCP state {0} (only ESTABLISHED and half-closed connections move)"
    )]
    UnsupportedState(&'static str),
    #[error("socket address is not IPv4 or IPv6")]
    NotInet,
    #[error("{queue} queue: peeked {got} bytes, the kernel reported {expected}")]
    QueueMismatch {
        queue: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "socket kept changing during {attempts} freeze attempts: hold its traffic before freezing"
    )]
    Unstable { attempts: u32 },
    #[error("restoring the {queue} queue wrote {written} of {len} bytes")]
    ShortWrite {
        queue: &'static str,
        written: usize,
        len: usize,
    },
    #[error("{what} did not happen within {ms} ms")]
    Timeout { what: &'static str, ms: u128 },
    #[error("invalid connection state: {0}")]
    Invalid(#[from] InvalidState),
    #[error("injecting the peer's FIN: {0}")]
    InjectFin(String),
}

/// [`close_silently`] could not put the socket in repair mode, so it did not
/// close it (closing would send a FIN or a RST): the caller gets it back.
#[derive(Debug, thiserror::Error)]
#[error("not closing the socket, it would send a FIN or RST: {source}")]
pub struct CloseError {
    pub fd: OwnedFd,
    pub source: RepairError,
}

fn sys_err(op: &'static str) -> RepairError {
    RepairError::Sys {
        op,
        errno: Errno::last(),
    }
}

fn io_err(op: &'static str, e: std::io::Error) -> RepairError {
    RepairError::Sys {
        op,
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Plain old data: every bit pattern is a valid value, so the kernel may
/// fill it. Only implemented for integers and our `repr(C)` integer structs.
///
/// # Safety
/// Implementors must be `repr(C)` (or primitive) with no padding-sensitive
/// invariants and valid for any bit pattern.
unsafe trait Pod: Copy + Default {}
// SAFETY: integers and repr(C) structs of integers are valid for any bits.
unsafe impl Pod for c_int {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for TcpRepairWindow {}
// SAFETY: as above.
unsafe impl Pod for TcpInfoHead {}
// SAFETY: as above.
unsafe impl Pod for TcpRepairOpt {}

/// getsockopt into a `T`; returns the value and the length the kernel wrote.
fn getsockopt_raw<T: Pod>(
    fd: BorrowedFd,
    level: c_int,
    name: c_int,
    op: &'static str,
) -> Result<(T, usize), RepairError> {
    let mut val = T::default();
    let mut len = size_of::<T>() as socklen_t;
    // SAFETY: `val` is a valid, writable `T` of `len` bytes and `T: Pod`
    // accepts whatever bytes the kernel writes; `len` is updated in place.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut T).cast::<c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(sys_err(op));
    }
    Ok((val, len as usize))
}

fn getsockopt_int(
    fd: BorrowedFd,
    level: c_int,
    name: c_int,
    op: &'static str,
) -> Result<c_int, RepairError> {
    Ok(getsockopt_raw::<c_int>(fd, level, name, op)?.0)
}

fn setsockopt_slice<T: Pod>(
    fd: BorrowedFd,
    level: c_int,
    name: c_int,
    vals: &[T],
    op: &'static str,
) -> Result<(), RepairError> {
    // SAFETY: the pointer and length describe the readable slice `vals`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            vals.as_ptr().cast::<c_void>(),
            std::mem::size_of_val(vals) as socklen_t,
        )
    };
    if rc < 0 {
        return Err(sys_err(op));
    }
    Ok(())
}

fn setsockopt_int(
    fd: BorrowedFd,
    level: c_int,
    name: c_int,
    val: c_int,
    op: &'static str,
) -> Result<(), RepairError> {
    setsockopt_slice(fd, level, name, &[val], op)
}

/// An ioctl that reports one `int` (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD).
fn ioctl_int(fd: BorrowedFd, request: libc::c_ulong, op: &'static str) -> Result<u32, RepairError> {
    let mut val: c_int = 0;
    // SAFETY: these requests write one int to the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut val as *mut c_int) };
    if rc < 0 {
        return Err(sys_err(op));
    }
    Ok(val.max(0) as u32)
}

fn set_repair(fd: BorrowedFd, val: c_int) -> Result<(), RepairError> {
    let op = match val {
        TCP_REPAIR_ON => "setsockopt(TCP_REPAIR, on)",
        _ => "setsockopt(TCP_REPAIR, off)",
    };
    setsockopt_int(fd, libc::SOL_TCP, TCP_REPAIR, val, op)
}

fn set_repair_queue(fd: BorrowedFd, queue: c_int) -> Result<(), RepairError> {
    setsockopt_int(
        fd,
        libc::SOL_TCP,
        TCP_REPAIR_QUEUE,
        queue,
        "setsockopt(TCP_REPAIR_QUEUE)",
    )
}

fn queue_name(queue: c_int) -> &'static str {
    match queue {
        TCP_RECV_QUEUE => "receive",
        TCP_SEND_QUEUE => "send",
        _ => "no",
    }
}

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

fn tcp_info(fd: BorrowedFd) -> Result<TcpInfoHead, RepairError> {
    let (info, len) =
        getsockopt_raw::<TcpInfoHead>(fd, libc::SOL_TCP, libc::TCP_INFO, "getsockopt(TCP_INFO)")?;
    if len < 7 {
        return Err(RepairError::Sys {
            op: "getsockopt(TCP_INFO) (short answer)",
            errno: Errno::EINVAL,
        });
    }
    Ok(info)
}

/// The peer's MSS: in repair mode TCP_MAXSEG reports the MSS clamp, not
/// the current segment size.
fn peer_mss(fd: BorrowedFd) -> Result<u16, RepairError> {
    let (mss, _) = getsockopt_raw::<c_int>(
        fd,
        libc::SOL_TCP,
        libc::TCP_MAXSEG,
        "getsockopt(TCP_MAXSEG)",
    )?;
    Ok(mss.clamp(0, u16::MAX as c_int) as u16)
}

/// Kernel state of a socket's queues, read twice around the queue copies
/// so a freeze only returns a consistent snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    info: TcpInfoHead,
    inq: u32,
    outq: u32,
    notsent: u32,
    rcv_nxt: u32,
    write_seq: u32,
    window: TcpRepairWindow,
}

fn snapshot(fd: BorrowedFd) -> Result<Snapshot, RepairError> {
    let info = tcp_info(fd)?;
    let inq = ioctl_int(fd, SIOCINQ, "ioctl(SIOCINQ)")?;
    let outq = ioctl_int(fd, SIOCOUTQ, "ioctl(SIOCOUTQ)")?;
    let notsent = ioctl_int(fd, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)")?;
    set_repair_queue(fd, TCP_RECV_QUEUE)?;
    let (rcv_nxt, _) = getsockopt_raw::<u32>(
        fd,
        libc::SOL_TCP,
        TCP_QUEUE_SEQ,
        "getsockopt(TCP_QUEUE_SEQ, receive)",
    )?;
    set_repair_queue(fd, TCP_SEND_QUEUE)?;
    let (write_seq, _) = getsockopt_raw::<u32>(
        fd,
        libc::SOL_TCP,
        TCP_QUEUE_SEQ,
        "getsockopt(TCP_QUEUE_SEQ, send)",
    )?;
    set_repair_queue(fd, TCP_NO_QUEUE)?;
    let (window, len) = getsockopt_raw::<TcpRepairWindow>(
        fd,
        libc::SOL_TCP,
        TCP_REPAIR_WINDOW,
        "getsockopt(TCP_REPAIR_WINDOW)",
    )?;
    if len != size_of::<TcpRepairWindow>() {
        return Err(RepairError::Sys {
            op: "getsockopt(TCP_REPAIR_WINDOW) (short answer)",
            errno: Errno::EINVAL,
        });
    }
    Ok(Snapshot {
        info,
        inq,
        outq,
        notsent,
        rcv_nxt,
        write_seq,
        window,
    })
}

/// Copies `len` bytes of a queue without consuming them (MSG_PEEK in repair
/// mode reads the chosen queue; for the send queue it is the only way).
/// Returns `None` if the queue does not hold exactly `len` bytes.
fn peek_queue(fd: BorrowedFd, queue: c_int, len: usize) -> Result<Option<Vec<u8>>, RepairError> {
    if len == 0 {
        return Ok(Some(Vec::new()));
    }
    set_repair_queue(fd, queue)?;
    // One byte more than expected, to see whether there is more.
    let mut buf = vec![0u8; len + 1];
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<c_void>(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let result = if rc < 0 {
        Err(sys_err(match queue {
            TCP_RECV_QUEUE => "recv(MSG_PEEK, receive queue)",
            _ => "recv(MSG_PEEK, send queue)",
        }))
    } else if rc as usize != len {
        Ok(None)
    } else {
        buf.truncate(len);
        Ok(Some(buf))
    };
    set_repair_queue(fd, TCP_NO_QUEUE)?;
    result
}

fn sockaddr(addr: socket2::SockAddr) -> Result<SocketAddr, RepairError> {
    let addr = addr.as_socket().ok_or(RepairError::NotInet)?;
    // A dual-stack socket talking IPv4 reports v4-mapped addresses; it is
    // IPv4 on the wire, and thawing it as IPv4 is equivalent for the peer.
    Ok(match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    })
}

/// Puts `fd` in repair mode and reads the full state of its connection.
///
/// The socket stays in repair mode: it sends nothing, and the caller ends
/// the freeze with [`resume`] (keep serving from this socket) or
/// [`close_silently`] (the connection now lives elsewhere). On error the
/// socket is taken out of repair mode again, so it keeps serving.
///
/// The connection's incoming traffic must be held during the freeze (see
/// the module documentation); if the queues keep moving, the freeze fails
/// with [`RepairError::Unstable`] rather than return a torn state.
pub fn freeze(fd: BorrowedFd) -> Result<TcpConnState, RepairError> {
    set_repair(fd, TCP_REPAIR_ON)?;
    match freeze_in_repair(fd) {
        Ok(state) => Ok(state),
        Err(e) => {
            let _ = set_repair(fd, TCP_REPAIR_OFF);
            Err(e)
        }
    }
}

fn freeze_in_repair(fd: BorrowedFd) -> Result<TcpConnState, RepairError> {
    let sock = socket2::SockRef::from(&fd);
    let local = sockaddr(sock.local_addr().map_err(|e| io_err("getsockname", e))?)?;
    let remote = sockaddr(sock.peer_addr().map_err(|e| io_err("getpeername", e))?)?;

    for _ in 0..FREEZE_ATTEMPTS {
        let before = snapshot(fd)?;
        let state = match before.info.state {
            TCP_ESTABLISHED => TcpState::Established,
            TCP_CLOSE_WAIT => TcpState::CloseWait,
            TCP_FIN_WAIT1 => TcpState::FinWait1,
            TCP_FIN_WAIT2 => TcpState::FinWait2,
            TCP_LAST_ACK => TcpState::LastAck,
            TCP_CLOSING => TcpState::Closing,
            other => return Err(RepairError::UnsupportedState(tcp_state_name(other))),
        };
        // Our FIN occupies one sequence number and, until acknowledged, one
        // unit of SIOCOUTQ (and of SIOCOUTQNSD until sent). It is not data.
        let fin_queued = (state.fin_sent() && !state.fin_acked()) as u32;
        let data_len = before.outq.saturating_sub(fin_queued);
        let unsent_len = before.notsent.saturating_sub(fin_queued).min(data_len);
        // SIOCINQ already leaves the peer's FIN out.
        let unread_len = before.inq;

        let Some(unread) = peek_queue(fd, TCP_RECV_QUEUE, unread_len as usize)? else {
            continue;
        };
        let Some(mut sendq) = peek_queue(fd, TCP_SEND_QUEUE, data_len as usize)? else {
            continue;
        };
        let after = snapshot(fd)?;
        if after != before {
            continue;
        }

        let unsent = sendq.split_off((data_len - unsent_len) as usize);
        let unacked = sendq;
        let send_seq = before
            .write_seq
            .wrapping_sub(state.fin_sent() as u32)
            .wrapping_sub(data_len);
        let recv_seq = before
            .rcv_nxt
            .wrapping_sub(state.fin_received() as u32)
            .wrapping_sub(unread_len);

        let mss = peer_mss(fd)?;
        let opts = before.info.options;
        let options = TcpOptions {
            mss,
            window_scale: (opts & TCPI_OPT_WSCALE != 0).then(|| {
                let (snd, rcv) = before.info.wscale();
                WindowScale { snd, rcv }
            }),
            sack_permitted: opts & TCPI_OPT_SACK != 0,
            timestamps: opts & TCPI_OPT_TIMESTAMPS != 0,
        };
        let (timestamp, _) = getsockopt_raw::<u32>(
            fd,
            libc::SOL_TCP,
            TCP_TIMESTAMP,
            "getsockopt(TCP_TIMESTAMP)",
        )?;
        let w = before.window;
        let sockopts = SocketOptions {
            nodelay: getsockopt_int(
                fd,
                libc::SOL_TCP,
                libc::TCP_NODELAY,
                "getsockopt(TCP_NODELAY)",
            )? != 0,
            keepalive: getsockopt_int(
                fd,
                libc::SOL_SOCKET,
                libc::SO_KEEPALIVE,
                "getsockopt(SO_KEEPALIVE)",
            )? != 0,
            keep_idle_secs: getsockopt_int(
                fd,
                libc::SOL_TCP,
                libc::TCP_KEEPIDLE,
                "getsockopt(TCP_KEEPIDLE)",
            )?
            .max(0) as u32,
            keep_intvl_secs: getsockopt_int(
                fd,
                libc::SOL_TCP,
                libc::TCP_KEEPINTVL,
                "getsockopt(TCP_KEEPINTVL)",
            )?
            .max(0) as u32,
            keep_count: getsockopt_int(
                fd,
                libc::SOL_TCP,
                libc::TCP_KEEPCNT,
                "getsockopt(TCP_KEEPCNT)",
            )?
            .max(0) as u32,
        };
        let frozen = TcpConnState {
            local,
            remote,
            state,
            send_seq,
            unacked,
            unsent,
            recv_seq,
            unread,
            options,
            timestamp,
            window: RepairWindow {
                snd_wl1: w.snd_wl1,
                snd_wnd: w.snd_wnd,
                max_window: w.max_window,
                rcv_wnd: w.rcv_wnd,
                rcv_wup: w.rcv_wup,
            },
            sockopts,
        };
        frozen.validate()?;
        return Ok(frozen);
    }
    Err(RepairError::Unstable {
        attempts: FREEZE_ATTEMPTS,
    })
}

/// Our side of a freshly accepted connection's handshake, as the kernel
/// settled it (what a replicated service logs: no other node saw the
/// SYN-ACK), for connection `conn`. Read before anything is written to
/// the socket: repair mode for a few reads, then left without a window
/// probe (nothing changed, so the peer needs nothing).
pub fn handshake(fd: BorrowedFd, conn: ConnKey) -> Result<Established, RepairError> {
    set_repair(fd, TCP_REPAIR_ON)?;
    let read = (|| {
        let snap = snapshot(fd)?;
        let (ts_clock, _) = getsockopt_raw::<u32>(
            fd,
            libc::SOL_TCP,
            TCP_TIMESTAMP,
            "getsockopt(TCP_TIMESTAMP)",
        )?;
        Ok::<_, RepairError>((snap, ts_clock, peer_mss(fd)?))
    })();
    let leave = set_repair(fd, TCP_REPAIR_OFF_NO_WP).and_then(|()| set_reuseaddr(fd));
    let (snap, ts_clock, mss) = read?;
    leave?;
    let opts = snap.info.options;
    Ok(Established {
        conn,
        // Our SYN-ACK took one sequence number; unsent or unacked data (none
        // before the first write) came after it.
        isn: snap.write_seq.wrapping_sub(snap.outq).wrapping_sub(1),
        mss,
        wscale: (opts & TCPI_OPT_WSCALE != 0).then(|| snap.info.wscale().1),
        sack: opts & TCPI_OPT_SACK != 0,
        timestamps: opts & TCPI_OPT_TIMESTAMPS != 0,
        ts_clock,
    })
}

/// Ends a freeze on the original socket: it leaves repair mode and serves
/// on (the rollback of a move that failed). Leaving repair mode sends a
/// window probe, so the peer's answer refreshes anything that changed.
///
/// Repair mode makes the kernel forget SO_REUSEADDR; it is set again, so a
/// listener can still be (re)bound on the connection's port.
pub fn resume(fd: BorrowedFd) -> Result<(), RepairError> {
    set_repair_queue(fd, TCP_NO_QUEUE)?;
    set_repair(fd, TCP_REPAIR_OFF)?;
    set_reuseaddr(fd)
}

/// Closes a socket without a FIN or a RST: in repair mode the kernel just
/// forgets the connection (the peer's connection now lives in a thawed
/// socket elsewhere). Repair mode is (re)entered first; if that fails the
/// socket is handed back unclosed.
///
/// The kernel only closes the connection when the last reference to the
/// socket's file goes: the caller must not hold duplicates of `fd`. (A
/// concurrent fork() holds one until the child execs; the close then
/// happens a little later, still silently, as the socket stays in repair
/// mode.)
pub fn close_silently(fd: OwnedFd) -> Result<(), CloseError> {
    if let Err(source) = set_repair(fd.as_fd(), TCP_REPAIR_ON) {
        return Err(CloseError { fd, source });
    }
    drop(fd);
    Ok(())
}

/// A socket being thawed: if the thaw fails half-way, it is put (back) in
/// repair mode before it is closed, so the failure sends no FIN and no RST.
struct Thawing(Option<OwnedFd>);

impl Thawing {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_ref().expect("present until into_inner").as_fd()
    }

    fn into_inner(mut self) -> OwnedFd {
        self.0.take().expect("present until into_inner")
    }
}

impl Drop for Thawing {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            let _ = set_repair(fd.as_fd(), TCP_REPAIR_ON);
        }
    }
}

fn new_tcp_socket(ipv4: bool) -> Result<OwnedFd, RepairError> {
    let domain = if ipv4 { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; a non-negative result is a new fd we own.
    let raw: RawFd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(sys_err("socket(SOCK_STREAM)"));
    }
    // SAFETY: `raw` is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Makes sure a buffer can take `need` bytes at once (restoring a queue
/// cannot wait for the peer to make room). The kernel doubles the value it
/// is given, and counts skb overhead against it, hence the margin. Only
/// grows, so normal sockets keep the kernel's autotuning.
fn ensure_buffer(
    fd: BorrowedFd,
    need: usize,
    name: c_int,
    force: c_int,
    op: &'static str,
) -> Result<(), RepairError> {
    if need == 0 {
        return Ok(());
    }
    let want = need.saturating_mul(2).saturating_add(256 * 1024);
    let have = getsockopt_int(fd, libc::SOL_SOCKET, name, op)?.max(0) as usize;
    if have >= want {
        return Ok(());
    }
    let val = c_int::try_from(want / 2).unwrap_or(c_int::MAX);
    // SO_*BUFFORCE ignores the sysctl maximum (needs CAP_NET_ADMIN, which
    // repair mode needs anyway); the plain option is the fallback.
    if setsockopt_int(fd, libc::SOL_SOCKET, force, val, op).is_err() {
        setsockopt_int(fd, libc::SOL_SOCKET, name, val, op)?;
    }
    Ok(())
}

fn set_queue_seq(fd: BorrowedFd, queue: c_int, seq: u32) -> Result<(), RepairError> {
    set_repair_queue(fd, queue)?;
    setsockopt_slice(
        fd,
        libc::SOL_TCP,
        TCP_QUEUE_SEQ,
        &[seq],
        match queue {
            TCP_RECV_QUEUE => "setsockopt(TCP_QUEUE_SEQ, receive)",
            _ => "setsockopt(TCP_QUEUE_SEQ, send)",
        },
    )
}

/// Writes `data` into a queue in repair mode: the receive queue as if
/// received and acknowledged, the send queue as if sent (nothing goes on
/// the wire). The kernel may take less per call (the receive queue takes
/// at most 16 pages per skb), so it is a loop.
fn restore_queue(fd: BorrowedFd, queue: c_int, data: &[u8]) -> Result<(), RepairError> {
    if data.is_empty() {
        return Ok(());
    }
    set_repair_queue(fd, queue)?;
    let op = match queue {
        TCP_RECV_QUEUE => "send(repair, receive queue)",
        _ => "send(repair, send queue)",
    };
    let mut off = 0;
    let mut chunk = data.len();
    while off < data.len() {
        let len = chunk.min(data.len() - off);
        // SAFETY: the pointer and length describe a readable part of `data`.
        let rc = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast::<c_void>(),
                len,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc < 0 {
            let errno = Errno::last();
            // Large linear allocations can fail; smaller pieces may not.
            if matches!(errno, Errno::ENOMEM | Errno::EAGAIN) && chunk > 4096 {
                chunk /= 2;
                continue;
            }
            return Err(RepairError::Sys { op, errno });
        }
        if rc == 0 {
            return Err(RepairError::ShortWrite {
                queue: queue_name(queue),
                written: off,
                len: data.len(),
            });
        }
        off += rc as usize;
    }
    set_repair_queue(fd, TCP_NO_QUEUE)
}

fn set_window(fd: BorrowedFd, w: TcpRepairWindow) -> Result<(), RepairError> {
    setsockopt_slice(
        fd,
        libc::SOL_TCP,
        TCP_REPAIR_WINDOW,
        &[w],
        "setsockopt(TCP_REPAIR_WINDOW)",
    )
}

/// Rebuilds the socket of a frozen connection in this kernel (the caller's
/// network namespace) and returns it live, out of repair mode.
///
/// The local address must be configured here (or the thaw fails at
/// `bind`); a listener on the same port is no obstacle. The connection's
/// incoming traffic should still be held when this runs, and released once
/// it returns. On error nothing was sent on the connection's behalf except,
/// possibly, re-sent bytes the peer already has, and the half-built socket
/// is closed silently.
///
/// Half-closed states: the peer's FIN is re-created by an injected segment
/// (so the socket passes through CLOSE_WAIT), ours by `shutdown` after
/// repair mode, so it is sent again. FIN_WAIT2 therefore comes back as
/// FIN_WAIT1 until the peer acknowledges the FIN again, and CLOSING as
/// LAST_ACK (both FINs exchanged, ours unacknowledged: same outcome, the
/// peer, not us, keeps TIME_WAIT).
pub fn thaw(state: &TcpConnState) -> Result<TcpStream, RepairError> {
    let fd = rebuild(state)?;
    go_live(fd.as_fd(), state)?;
    Ok(TcpStream::from(fd))
}

/// First half of [`thaw`]: rebuilds the socket and leaves it in repair
/// mode, silent (it sends nothing, not even on close), so a move can still
/// be rolled back. [`go_live`] finishes it; [`close_silently`] abandons it.
pub fn rebuild(state: &TcpConnState) -> Result<OwnedFd, RepairError> {
    state.validate()?;
    let start = Instant::now();
    loop {
        match rebuild_once(state) {
            // The connection's old socket in this kernel is still there: a
            // close only takes effect when the last reference to the file
            // goes, and a concurrent fork() copies every descriptor until
            // the child execs. It goes away on its own within milliseconds.
            Err(RepairError::Sys {
                op: OP_CONNECT,
                errno: Errno::EADDRNOTAVAIL,
            }) if start.elapsed() < CONNECT_RETRY => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

const OP_CONNECT: &str = "connect(repair)";

/// How long [`thaw`] retries while the connection's four-tuple is taken.
const CONNECT_RETRY: Duration = Duration::from_millis(500);

fn rebuild_once(state: &TcpConnState) -> Result<OwnedFd, RepairError> {
    let sock = Thawing(Some(new_tcp_socket(state.local.is_ipv4())?));
    let fd = sock.fd();

    set_repair(fd, TCP_REPAIR_ON)?;
    // Repair mode forces address reuse (SO_REUSEADDR would weaken it), so
    // binding next to a listener on the same port works.
    ensure_buffer(
        fd,
        state.unacked.len() + state.unsent.len(),
        libc::SO_SNDBUF,
        libc::SO_SNDBUFFORCE,
        "setsockopt(SO_SNDBUF)",
    )?;
    ensure_buffer(
        fd,
        state.unread.len(),
        libc::SO_RCVBUF,
        libc::SO_RCVBUFFORCE,
        "setsockopt(SO_RCVBUF)",
    )?;

    // Sequence numbers can only be set while the socket is closed.
    set_queue_seq(fd, TCP_RECV_QUEUE, state.recv_seq)?;
    set_queue_seq(fd, TCP_SEND_QUEUE, state.send_seq)?;
    set_repair_queue(fd, TCP_NO_QUEUE)?;

    // connect() computes the segment size from the MSS clamp of the moment
    // (536 by default) and nothing recomputes it once TCP_REPAIR_OPTIONS
    // sets the real clamp: the socket would send 524-byte segments for ever.
    // A user MSS before connect makes it start right (the option takes at
    // most 32767); it is cleared again below.
    let user_mss = (state.options.mss as c_int).clamp(TCP_MIN_MSS, TCP_MAX_USER_MSS);
    setsockopt_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_MAXSEG,
        user_mss,
        "setsockopt(TCP_MAXSEG)",
    )?;

    let sref = socket2::SockRef::from(&fd);
    sref.bind(&state.local.into())
        .map_err(|e| io_err("bind", e))?;
    // In repair mode connect() sends no SYN: the socket is ESTABLISHED at
    // once, with snd_una = snd_nxt = the send sequence set above.
    sref.connect(&state.remote.into())
        .map_err(|e| io_err(OP_CONNECT, e))?;

    // Options only once established, and before any data is queued.
    let o = state.options;
    let mut opts = vec![TcpRepairOpt {
        opt_code: TCPOPT_MSS,
        opt_val: o.mss as u32,
    }];
    if let Some(ws) = o.window_scale {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_WINDOW,
            opt_val: ws.snd as u32 | (ws.rcv as u32) << 16,
        });
    }
    if o.sack_permitted {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if o.timestamps {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    setsockopt_slice(
        fd,
        libc::SOL_TCP,
        TCP_REPAIR_OPTIONS,
        &opts,
        "setsockopt(TCP_REPAIR_OPTIONS)",
    )?;
    setsockopt_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_MAXSEG,
        0,
        "setsockopt(TCP_MAXSEG)",
    )?;
    if o.timestamps {
        setsockopt_slice(
            fd,
            libc::SOL_TCP,
            TCP_TIMESTAMP,
            &[state.timestamp],
            "setsockopt(TCP_TIMESTAMP)",
        )?;
    }

    restore_queue(fd, TCP_RECV_QUEUE, &state.unread)?;
    restore_queue(fd, TCP_SEND_QUEUE, &state.unacked)?;

    let w = state.window;
    let exact = TcpRepairWindow {
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
    };
    if state.state.fin_received() {
        // The peer's FIN is not in yet, so rcv_nxt is one short of the
        // frozen one; the kernel refuses rcv_wup beyond rcv_nxt.
        let rcv_nxt = state.recv_seq.wrapping_add(state.unread.len() as u32);
        let mut early = exact;
        let over = early.rcv_wup.wrapping_sub(rcv_nxt) as i32;
        if over > 0 {
            early.rcv_wup = rcv_nxt;
            early.rcv_wnd = early.rcv_wnd.saturating_add(over as u32);
        }
        set_window(fd, early)?;
        inject_peer_fin(fd, state)?;
        // Now exactly as frozen (the FIN's arrival moved the window).
        set_window(fd, exact)?;
    } else {
        set_window(fd, exact)?;
    }

    set_repair_queue(fd, TCP_NO_QUEUE)?;
    Ok(sock.into_inner())
}

/// Second half of [`thaw`]: takes a [`rebuild`] socket out of repair mode.
/// From here on it is live: it sends the bytes never sent and, if the
/// connection had one, our FIN. On error the socket is put back in repair
/// mode, so the caller can still close it silently.
pub fn go_live(fd: BorrowedFd, state: &TcpConnState) -> Result<(), RepairError> {
    let result = set_mark(fd, 0).and_then(|()| go_live_inner(fd, state));
    if result.is_err() {
        let _ = set_repair(fd, TCP_REPAIR_ON);
    }
    result
}

/// Whether [`go_live_silenced`] can take this socket live before the
/// move commits: an established connection (a half-closed one finishes
/// its FIN handshake only once it may speak, through [`go_live`]).
pub fn can_go_live_silenced(state: &TcpConnState) -> bool {
    state.state == TcpState::Established
}

/// Takes a thawed socket out of repair mode with [`crate::silence::SILENT_MARK`]
/// on it: live, but whatever it sends is dropped until [`speak`]. The
/// work of going live is then done while the move is still under way.
/// Nothing is sent that would be lost: no window probe, and unsent bytes
/// wait for [`speak`]. Closing it again must go through
/// [`close_silently`] (repair mode first), as for a frozen socket.
pub fn go_live_silenced(fd: BorrowedFd, state: &TcpConnState) -> Result<(), RepairError> {
    let result = (|| {
        set_mark(fd, crate::silence::SILENT_MARK)?;
        set_repair(fd, TCP_REPAIR_OFF_NO_WP)?;
        apply_sockopts(fd, &state.sockopts)?;
        set_reuseaddr(fd)
    })();
    if result.is_err() {
        let _ = set_repair(fd, TCP_REPAIR_ON);
    }
    result
}

/// Lets a socket that [`go_live_silenced`] took live speak: its mark
/// goes, a window probe asks the peer for its view when data is in flight
/// (as leaving repair mode does, see [`go_live`]), and the bytes never
/// sent go out.
pub fn speak(fd: BorrowedFd, state: &TcpConnState) -> Result<(), RepairError> {
    set_mark(fd, 0)?;
    if needs_probe(state) {
        // Leaving repair mode sends the probe; the connection's state is
        // untouched by the round trip.
        set_repair(fd, TCP_REPAIR_ON)?;
        set_repair(fd, TCP_REPAIR_OFF)?;
        set_reuseaddr(fd)?;
    }
    send_all(fd, &state.unsent)
}

/// Repair mode makes the kernel forget SO_REUSEADDR; servers' sockets
/// have it, and a listener must be able to bind the port again later.
fn set_reuseaddr(fd: BorrowedFd) -> Result<(), RepairError> {
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1,
        "setsockopt(SO_REUSEADDR)",
    )
}

/// Whether a rebuilt socket must speak at once: data in flight (the peer's
/// answer starts recovery), or bytes received that the peer may not have
/// seen acknowledged: a delayed ACK still pending at the freeze (the last
/// window update was for less than we have), or unread data. The peer
/// would otherwise wait for its retransmission timer. (An ACK the kernel
/// sent after the source's silence went in, and that the silence dropped,
/// leaves no trace in the socket: that peer resends after its timer.)
fn needs_probe(state: &TcpConnState) -> bool {
    !state.unacked.is_empty() || !state.unread.is_empty() || state.window.rcv_wup != state.rcv_nxt()
}

/// Marks a socket still in repair mode silent
/// ([`crate::silence::SILENT_MARK`]) until [`go_live`] clears the mark:
/// a rebuilt socket's retransmission timer fires even in repair mode.
pub fn silence(fd: BorrowedFd) -> Result<(), RepairError> {
    set_mark(fd, crate::silence::SILENT_MARK)
}

fn set_mark(fd: BorrowedFd, mark: u32) -> Result<(), RepairError> {
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_MARK,
        mark as c_int,
        "setsockopt(SO_MARK)",
    )
}

fn go_live_inner(fd: BorrowedFd, state: &TcpConnState) -> Result<(), RepairError> {
    // Live again. With data in flight, the window probe TCP_REPAIR_OFF
    // sends makes the peer tell us at once what it has (its ACK and SACK
    // blocks start recovery; without it a lost segment would wait for the
    // RTO of a socket that has no RTT sample, a second). With nothing in
    // flight the peer has nothing to tell: the probe and the ACK it draws
    // would only cost both ends a packet, per connection, on the clients'
    // time.
    let quiet = state.state == TcpState::Established && !needs_probe(state);
    set_repair(
        fd,
        if quiet {
            TCP_REPAIR_OFF_NO_WP
        } else {
            TCP_REPAIR_OFF
        },
    )?;
    apply_sockopts(fd, &state.sockopts)?;
    // Repair mode left SO_REUSEADDR off; servers' sockets have it, and a
    // listener must be able to bind this port again later.
    set_reuseaddr(fd)?;

    // Never sent: the normal send path sends them, after the unacked data.
    send_all(fd, &state.unsent)?;
    if state.state.fin_sent() {
        // Our FIN again; if the peer already had it, it acknowledges it
        // once more (FIN_WAIT2 passes through FIN_WAIT1 until then).
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write).map_err(
            |errno| RepairError::Sys {
                op: "shutdown(SHUT_WR)",
                errno,
            },
        )?;
    }
    Ok(())
}

fn apply_sockopts(fd: BorrowedFd, s: &SocketOptions) -> Result<(), RepairError> {
    let tcp = libc::SOL_TCP;
    setsockopt_int(
        fd,
        tcp,
        libc::TCP_NODELAY,
        s.nodelay as c_int,
        "setsockopt(TCP_NODELAY)",
    )?;
    setsockopt_int(
        fd,
        tcp,
        libc::TCP_KEEPIDLE,
        s.keep_idle_secs as c_int,
        "setsockopt(TCP_KEEPIDLE)",
    )?;
    setsockopt_int(
        fd,
        tcp,
        libc::TCP_KEEPINTVL,
        s.keep_intvl_secs as c_int,
        "setsockopt(TCP_KEEPINTVL)",
    )?;
    setsockopt_int(
        fd,
        tcp,
        libc::TCP_KEEPCNT,
        s.keep_count as c_int,
        "setsockopt(TCP_KEEPCNT)",
    )?;
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        s.keepalive as c_int,
        "setsockopt(SO_KEEPALIVE)",
    )
}

/// Sends `data` on a live socket, waiting (bounded) for buffer space.
fn send_all(fd: BorrowedFd, data: &[u8]) -> Result<(), RepairError> {
    let deadline = Instant::now() + UNSENT_TIMEOUT;
    let mut off = 0;
    while off < data.len() {
        // SAFETY: the pointer and length describe a readable part of `data`.
        let rc = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast::<c_void>(),
                data.len() - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc >= 0 {
            off += rc as usize;
            continue;
        }
        let errno = Errno::last();
        match errno {
            Errno::EINTR => continue,
            Errno::EAGAIN => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(RepairError::Timeout {
                        what: "sending the unsent bytes",
                        ms: UNSENT_TIMEOUT.as_millis(),
                    });
                }
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as c_int) };
            }
            _ => {
                return Err(RepairError::Sys {
                    op: "send(unsent bytes)",
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// Re-creates the peer's FIN in a thawed socket: there is no option for it,
/// so a FIN+ACK segment is sent from the peer's address to ours through a
/// raw socket, and the kernel processes it like the original (CRIU's
/// libsoccr does the same). The segment goes to a local address, so it
/// never leaves this host. Waits until the socket is in CLOSE_WAIT.
fn inject_peer_fin(fd: BorrowedFd, state: &TcpConnState) -> Result<(), RepairError> {
    let fin_seq = state.recv_seq.wrapping_add(state.unread.len() as u32);
    // Acknowledge nothing new: snd_una is always acceptable.
    let ack = state.send_seq;
    let shift = state.options.window_scale.map_or(0, |w| w.snd);
    let window = (state.window.snd_wnd >> shift).min(u16::MAX as u32) as u16;
    let tcp = tcp_segment(
        state.remote.port(),
        state.local.port(),
        fin_seq,
        ack,
        TCP_FLAG_FIN | TCP_FLAG_ACK,
        window,
    );
    let packet = match (state.remote.ip(), state.local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => ipv4_packet(src.octets(), dst.octets(), tcp),
        (IpAddr::V6(src), IpAddr::V6(dst)) => ipv6_packet(src.octets(), dst.octets(), tcp),
        _ => return Err(RepairError::NotInet),
    };
    crate::hold::inject(&[packet]).map_err(|e| RepairError::InjectFin(e.to_string()))?;

    let start = Instant::now();
    loop {
        let info = tcp_info(fd)?;
        if info.state == TCP_CLOSE_WAIT {
            return Ok(());
        }
        if start.elapsed() > INJECT_TIMEOUT {
            return Err(RepairError::Timeout {
                what: "the kernel taking the re-created FIN of the peer",
                ms: INJECT_TIMEOUT.as_millis(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_ACK: u8 = 0x10;

/// A 20-byte TCP header without options, checksum left zero.
fn tcp_segment(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&window.to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`
/// (each of even length, except possibly the last).
fn inet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        if let [last] = chunks.remainder() {
            sum += (*last as u32) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], mut tcp: [u8; 20]) -> Vec<u8> {
    let tcp_len = (tcp.len() as u16).to_be_bytes();
    let pseudo = [0u8, libc::IPPROTO_TCP as u8, tcp_len[0], tcp_len[1]];
    let sum = inet_checksum(&[&src, &dst, &pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = inet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);
    packet
}

fn ipv6_packet(src: [u8; 16], dst: [u8; 16], mut tcp: [u8; 20]) -> Vec<u8> {
    let len = (tcp.len() as u32).to_be_bytes();
    let pseudo = [
        len[0],
        len[1],
        len[2],
        len[3],
        0,
        0,
        0,
        libc::IPPROTO_TCP as u8,
    ];
    let sum = inet_checksum(&[&src, &dst, &pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    ip[6] = libc::IPPROTO_TCP as u8;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: 0001 f203 f4f5 f6f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&[&data]), !0xddf2);
        // A packet with its checksum in place sums to zero.
        let p = ipv4_packet(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            tcp_segment(1, 2, 3, 4, 0x11, 5),
        );
        assert_eq!(inet_checksum(&[&p[..20]]), 0);
        let pseudo = [0, 6, 0, 20];
        assert_eq!(
            inet_checksum(&[&p[12..16], &p[16..20], &pseudo, &p[20..]]),
            0
        );
    }

    #[test]
    fn wscale_bitfields() {
        let info = TcpInfoHead {
            wscale: 0x97,
            ..Default::default()
        };
        assert_eq!(info.wscale(), (7, 9));
    }
}
