//! An NFQUEUE socket of our own: netlink (`NETLINK_NETFILTER`), nonblocking,
//! with its descriptor exposed and verdicts batched.
//!
//! Why not a crate: the capture path of a replicated service puts every
//! client packet through the queue, so it must never poll and must not pay
//! one syscall per verdict. The `nfq` crate hides its descriptor (a reader
//! can only poll it) and sends one verdict per `sendmsg`.
//!
//! What the kernel does (`net/netfilter/nfnetlink_queue.c`), and what this
//! module relies on:
//!
//! - [`NfQueue::open`] binds one queue number (`NFQNL_MSG_CONFIG`, command
//!   `BIND`) and configures it in the same datagram: copy mode `PACKET`
//!   with a copy range, the queue's length, and its flags, each message
//!   acknowledged (`NLM_F_ACK`) and its answer checked. A queue number
//!   bound by another socket of the namespace is refused with `EPERM`
//!   (the same errno as a missing `CAP_NET_ADMIN`); the kernel's
//!   `/proc/net/netfilter/nfnetlink_queue` tells the two apart, and
//!   [`NfqError::QueueInUse`] says which socket holds it.
//! - Flags: fail-open off (a full queue drops, never lets a packet past
//!   unseen); `NFQA_CFG_F_GSO` on, so GSO/GRO super-packets come up whole
//!   (without it the kernel segments them, and computes their checksums,
//!   packet by packet); conntrack information off. With GSO on, a packet
//!   whose TCP checksum is left to the device is marked
//!   [`SkbInfo::checksum_not_ready`]: its checksum field holds only the
//!   pseudo-header sum.
//! - Each queued packet comes as one netlink datagram (`NFQNL_MSG_PACKET`).
//!   [`NfQueue::recv_batch`] reads many datagrams per syscall
//!   (`recvmmsg(2)`), one slot each, and parses every message with bounds
//!   checks: a malformed message is skipped and counted
//!   ([`QueueStats::malformed`]), never trusted and never a panic.
//! - Packet ids increase by one per queued packet, per queue. A verdict
//!   (`NFQNL_MSG_VERDICT`) settles one id; a batch verdict
//!   (`NFQNL_MSG_VERDICT_BATCH`) settles every packet still pending whose
//!   id is not after `max_id`, in id order. One datagram may carry many
//!   verdict messages: the kernel processes them in order.
//! - Verdicts are sent without `NLM_F_ACK`; the kernel still reports a
//!   failed one (an id no longer queued: `ENOENT`) with an `NLMSG_ERROR`
//!   message, which [`NfQueue::recv_batch`] counts
//!   ([`QueueStats::verdict_errors`]).
//! - When the socket's receive buffer is full the kernel drops the packet
//!   (fail closed; counted in `/proc` as "user dropped") and marks the
//!   socket, whose next read fails with `ENOBUFS`. We count those
//!   ([`QueueStats::overruns`]) and read on. `NETLINK_NO_ENOBUFS` is left
//!   off on purpose: it would hide the overruns from us, and the packets
//!   are dropped either way.
//! - Closing the socket unbinds the queue; the kernel drops whatever was
//!   still queued (fail closed).
//!
//! The socket lives in the network namespace of the thread that opens it.
//! It is nonblocking and implements [`AsFd`]/[`AsRawFd`]: wait for it with
//! `poll(2)` or tokio's `AsyncFd`, then call [`NfQueue::recv_batch`] until
//! it returns 0.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::vip::{cvt, new_socket};

/// Largest copy range the kernel supports: a netlink attribute's length is
/// 16 bits and includes its 4-byte header. A longer packet comes truncated,
/// with its real length in [`Packet::orig_len`].
pub const MAX_COPY_RANGE: u32 = 0xffff - 4;

// Message types and attributes of nfnetlink_queue
// (include/uapi/linux/netfilter/nfnetlink_queue.h).
const SUBSYS_QUEUE: u16 = libc::NFNL_SUBSYS_QUEUE as u16;
const MSG_PACKET: u16 = (SUBSYS_QUEUE << 8) | libc::NFQNL_MSG_PACKET as u16;
const MSG_VERDICT: u16 = (SUBSYS_QUEUE << 8) | libc::NFQNL_MSG_VERDICT as u16;
const MSG_CONFIG: u16 = (SUBSYS_QUEUE << 8) | libc::NFQNL_MSG_CONFIG as u16;
const MSG_VERDICT_BATCH: u16 = (SUBSYS_QUEUE << 8) | libc::NFQNL_MSG_VERDICT_BATCH as u16;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const CFG_CMD_BIND: u8 = 1;
const COPY_PACKET: u8 = 2;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// `nla_type` bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = !(libc::NLA_F_NESTED as u16 | libc::NLA_F_NET_BYTEORDER as u16);

/// Bytes per receive slot beyond the copy range: the netlink, nfgenmsg and
/// attribute headers of a packet message (about 150 bytes as configured).
const SLOT_OVERHEAD: usize = 1024;
/// Largest datagram of verdicts sent at once (the socket's send buffer
/// bounds it; 2,048 verdict messages).
const SEND_CHUNK: usize = 64 << 10;
/// How long [`NfQueue::open`] waits for the kernel's answers.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Errors of the queue socket. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum NfqError {
    #[error("NFQUEUE {queue_num}: cannot {op}: {source}")]
    Io {
        queue_num: u16,
        op: &'static str,
        source: io::Error,
    },
    #[error("NFQUEUE {queue_num} is already bound by another socket ({holder}) in this network namespace: pick another queue number, or stop its reader")]
    QueueInUse { queue_num: u16, holder: String },
    #[error("permission denied: binding NFQUEUE {queue_num} needs root / CAP_NET_ADMIN")]
    PermissionDenied { queue_num: u16 },
    #[error("NFQUEUE {queue_num}: the kernel refused to {op}: {source}")]
    Refused {
        queue_num: u16,
        op: &'static str,
        source: io::Error,
    },
    #[error("NFQUEUE {queue_num}: no answer from the kernel to {op} within {ACK_TIMEOUT:?}")]
    NoAnswer { queue_num: u16, op: &'static str },
}

/// Why a netlink message was refused. The parser never reads past what was
/// received and never trusts a length it has not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} bytes left: shorter than a netlink header")]
    ShortHeader(usize),
    #[error("netlink length {len} outside the {avail} bytes left")]
    BadLength { len: usize, avail: usize },
    #[error("packet message shorter than its nfgenmsg header")]
    ShortNfgen,
    #[error("attribute length {len} outside the {avail} bytes left")]
    BadAttribute { len: usize, avail: usize },
    #[error("packet message without a packet header attribute")]
    NoPacketHeader,
    #[error("{0} attribute of the wrong size")]
    BadAttributeSize(&'static str),
    #[error("error message shorter than its errno")]
    ShortError,
    #[error("datagram truncated: larger than its receive slot")]
    Truncated,
}

/// What userspace tells the kernel to do with a queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it continue through the stack.
    Accept,
    /// Drop it.
    Drop,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Accept => libc::NF_ACCEPT as u32,
            Verdict::Drop => libc::NF_DROP as u32,
        }
    }
}

/// The kernel's `NFQA_SKB_INFO` flags of a packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkbInfo(pub u32);

impl SkbInfo {
    /// The transport checksum is left to the device (`CHECKSUM_PARTIAL`):
    /// its field holds the pseudo-header sum only. Complete it before
    /// sending the bytes anywhere else.
    pub fn checksum_not_ready(self) -> bool {
        self.0 & libc::NFQA_SKB_CSUMNOTREADY as u32 != 0
    }
    /// A GSO/GRO super-packet: longer than the device MTU, one IP header
    /// for many segments' worth of data.
    pub fn gso(self) -> bool {
        self.0 & libc::NFQA_SKB_GSO as u32 != 0
    }
    /// Nothing has verified the checksums yet (no hardware check on input).
    pub fn checksum_not_verified(self) -> bool {
        self.0 & libc::NFQA_SKB_CSUM_NOTVERIFIED as u32 != 0
    }
}

/// One queued packet, as the kernel described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Its id in its queue: what a verdict names.
    pub id: u32,
    /// The queue it came from (`res_id` of its message).
    pub queue_num: u16,
    /// Protocol family of the hook (`AF_INET`, `AF_INET6`).
    pub family: u8,
    /// EtherType of the packet (0x0800, 0x86dd).
    pub hw_protocol: u16,
    /// Netfilter hook it was queued at (0 is PREROUTING).
    pub hook: u8,
    /// Its firewall mark (0 if none).
    pub mark: u32,
    /// Interface it came in on.
    pub indev: Option<u32>,
    /// Interface it goes out on.
    pub outdev: Option<u32>,
    /// Checksum and GSO state.
    pub skb_info: SkbInfo,
    /// Its whole length (longer than `payload` if the copy range cut it).
    pub orig_len: u32,
    /// The packet from its IP header on (up to the copy range).
    pub payload: Vec<u8>,
}

impl Packet {
    /// Whether the copy range cut the packet short.
    pub fn truncated(&self) -> bool {
        self.orig_len as usize > self.payload.len()
    }
}

/// One parsed netlink message of the queue socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A queued packet.
    Packet(Packet),
    /// An answer to a request of ours: `errno` 0 is an acknowledgement.
    Answer { seq: u32, errno: i32 },
    /// Anything else (`NLMSG_NOOP`, `NLMSG_DONE`, other types): ignored.
    Other { msg_type: u16 },
}

/// Parses every netlink message of one datagram. A message whose length is
/// wrong ends the datagram (nothing after it can be found); a message that
/// is well framed but malformed is reported and the next one parsed.
pub fn parse_datagram(buf: &[u8]) -> Vec<Result<Message, ParseError>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            out.push(Err(ParseError::ShortHeader(rest.len())));
            break;
        }
        let len = u32_ne(&rest[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            out.push(Err(ParseError::BadLength {
                len,
                avail: rest.len(),
            }));
            break;
        }
        let msg_type = u16_ne(&rest[4..6]);
        out.push(parse_message(msg_type, &rest[NLMSG_HDRLEN..len]));
        // The last message of a datagram need not be padded.
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

fn u16_ne(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}
fn u32_ne(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}
fn u32_be(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be32_attr(value: &[u8], name: &'static str) -> Result<u32, ParseError> {
    if value.len() != 4 {
        return Err(ParseError::BadAttributeSize(name));
    }
    Ok(u32_be(value))
}

fn parse_message(msg_type: u16, body: &[u8]) -> Result<Message, ParseError> {
    match msg_type {
        t if t == libc::NLMSG_ERROR as u16 => {
            if body.len() < 4 {
                return Err(ParseError::ShortError);
            }
            let error = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            // The request's header follows: its sequence number says which.
            let seq = if body.len() >= 4 + NLMSG_HDRLEN {
                u32_ne(&body[4 + 8..4 + 12])
            } else {
                0
            };
            Ok(Message::Answer {
                seq,
                errno: error.checked_neg().unwrap_or(i32::MAX),
            })
        }
        MSG_PACKET => parse_packet(body).map(Message::Packet),
        other => Ok(Message::Other { msg_type: other }),
    }
}

fn parse_packet(body: &[u8]) -> Result<Packet, ParseError> {
    if body.len() < NFGENMSG_LEN {
        return Err(ParseError::ShortNfgen);
    }
    let family = body[0];
    let queue_num = u16::from_be_bytes([body[2], body[3]]);
    let mut header = None;
    let mut mark = 0;
    let mut indev = None;
    let mut outdev = None;
    let mut skb_info = SkbInfo::default();
    let mut cap_len = None;
    let mut payload: &[u8] = &[];
    let mut rest = &body[NFGENMSG_LEN..];
    while !rest.is_empty() {
        if rest.len() < NLA_HDRLEN {
            return Err(ParseError::BadAttribute {
                len: rest.len(),
                avail: rest.len(),
            });
        }
        let len = usize::from(u16_ne(&rest[0..2]));
        if len < NLA_HDRLEN || len > rest.len() {
            return Err(ParseError::BadAttribute {
                len,
                avail: rest.len(),
            });
        }
        let value = &rest[NLA_HDRLEN..len];
        match u16_ne(&rest[2..4]) & NLA_TYPE_MASK {
            NFQA_PACKET_HDR => {
                // packet_id (be32), hw_protocol (be16), hook (u8): packed.
                if value.len() < 7 {
                    return Err(ParseError::BadAttributeSize("packet header"));
                }
                header = Some((
                    u32_be(&value[0..4]),
                    u16::from_be_bytes([value[4], value[5]]),
                    value[6],
                ));
            }
            NFQA_MARK => mark = be32_attr(value, "mark")?,
            NFQA_IFINDEX_INDEV => indev = Some(be32_attr(value, "input interface")?),
            NFQA_IFINDEX_OUTDEV => outdev = Some(be32_attr(value, "output interface")?),
            NFQA_SKB_INFO => skb_info = SkbInfo(be32_attr(value, "skb info")?),
            NFQA_CAP_LEN => cap_len = Some(be32_attr(value, "captured length")?),
            NFQA_PAYLOAD => payload = value,
            _ => {}
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    let (id, hw_protocol, hook) = header.ok_or(ParseError::NoPacketHeader)?;
    let orig_len = cap_len.unwrap_or(payload.len() as u32);
    if (orig_len as usize) < payload.len() {
        return Err(ParseError::BadAttributeSize("captured length"));
    }
    Ok(Packet {
        id,
        queue_num,
        family,
        hw_protocol,
        hook,
        mark,
        indev,
        outdev,
        skb_info,
        orig_len,
        payload: payload.to_vec(),
    })
}

/// How to set up a queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Bytes of each packet copied up (at most [`MAX_COPY_RANGE`]).
    pub copy_range: u32,
    /// Packets the kernel keeps waiting for a verdict before it drops new
    /// ones (its default is 1024).
    pub max_len: u32,
    /// Receive GSO/GRO super-packets whole (`NFQA_CFG_F_GSO`).
    pub gso: bool,
    /// Receive buffer asked for, in bytes (`SO_RCVBUFFORCE`, or
    /// `SO_RCVBUF` up to `rmem_max` without the privilege).
    pub recv_buffer: usize,
    /// Datagrams (packets) read per `recvmmsg` call.
    pub batch: usize,
    /// Most `recvmmsg` calls one [`NfQueue::recv_batch`] makes.
    pub max_rounds: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            copy_range: MAX_COPY_RANGE,
            max_len: 16384,
            gso: true,
            recv_buffer: 32 << 20,
            batch: 64,
            max_rounds: 4,
        }
    }
}

/// Counters of one queue socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Packets received.
    pub received: u64,
    /// Messages skipped as malformed (their packets, if any, stay queued
    /// until a batch verdict covers their id, or the socket closes).
    pub malformed: u64,
    /// Datagrams larger than a receive slot (counted in `malformed` too).
    pub truncated: u64,
    /// Times the receive buffer overran (`ENOBUFS`): the kernel dropped
    /// packets for want of room.
    pub overruns: u64,
    /// Verdicts the kernel refused (an id not queued).
    pub verdict_errors: u64,
    /// The errno of the last refused verdict.
    pub last_verdict_errno: i32,
    /// Datagrams from a sender other than the kernel (ignored).
    pub foreign: u64,
    /// Verdict messages sent.
    pub verdict_messages: u64,
    /// `send` calls that carried them (one datagram may carry many).
    pub verdict_sends: u64,
}

/// A bound NFQUEUE queue (see the module docs).
pub struct NfQueue {
    fd: OwnedFd,
    queue_num: u16,
    portid: u32,
    recv_buffer: usize,
    slot: usize,
    batch: usize,
    max_rounds: usize,
    /// `batch` receive slots of `slot` bytes each.
    buf: RecvBuf,
    /// (length, flags, sender port id) of each datagram of the last read.
    meta: Vec<(usize, libc::c_int, u32)>,
    /// Ids received and not yet given a verdict, in arrival order, each
    /// with whether a single verdict settled it already.
    pending: VecDeque<(u32, bool)>,
    unsettled: usize,
    /// Packets read while waiting for the answers of [`NfQueue::open`].
    early: Vec<Packet>,
    seq: u32,
    stats: QueueStats,
}

impl std::fmt::Debug for NfQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfQueue")
            .field("fd", &self.fd.as_raw_fd())
            .field("queue_num", &self.queue_num)
            .field("portid", &self.portid)
            .field("pending", &self.unsettled)
            .finish()
    }
}

impl AsFd for NfQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NfQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether id `a` comes after id `b` (ids wrap at 2^32, as the kernel
/// compares them).
fn id_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data; all-zero is valid (pid 0 is
    // the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

fn getsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Appends one nfnetlink message (header, nfgenmsg, then `attrs`).
fn put_message(
    out: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    queue_num: u16,
    attrs: &[(u16, &[u8])],
) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]); // length, set below
    out.extend_from_slice(&msg_type.to_ne_bytes());
    out.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    out.push(libc::AF_UNSPEC as u8);
    out.push(libc::NFNETLINK_V0 as u8);
    out.extend_from_slice(&queue_num.to_be_bytes());
    for (ty, value) in attrs {
        let len = NLA_HDRLEN + value.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len() + (align4(len) - len), 0);
    }
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn verdict_message(
    out: &mut Vec<u8>,
    msg_type: u16,
    seq: u32,
    queue_num: u16,
    id: u32,
    verdict: Verdict,
) {
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&verdict.code().to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    put_message(
        out,
        msg_type,
        0,
        seq,
        queue_num,
        &[(NFQA_VERDICT_HDR, &hdr)],
    );
}

/// The netlink port id that holds `queue_num` in the calling thread's
/// namespace, per the kernel's `/proc` listing.
pub fn queue_holder(queue_num: u16) -> Option<u32> {
    kernel_queue_line(queue_num).map(|f| f[1] as u32)
}

/// The fields of the kernel's `/proc/net/netfilter/nfnetlink_queue` line
/// of `queue_num` (calling thread's namespace): queue number, port id,
/// packets waiting, copy mode, copy range, dropped because the queue was
/// full, dropped because the socket was, last id, 1.
pub fn kernel_queue_line(queue_num: u16) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (f.len() >= 8 && f[0] == u64::from(queue_num)).then_some(f)
    })
}

/// Names the holder of netlink port `portid`. A process's first netlink
/// socket gets its pid as port id, so a live process of that pid is most
/// likely the holder (not surely: later sockets get other numbers).
fn describe_holder(portid: u32) -> String {
    match std::fs::read_to_string(format!("/proc/{portid}/comm")) {
        Ok(comm) => format!(
            "netlink port {portid}, likely process {portid} {}",
            comm.trim()
        ),
        Err(_) => format!("netlink port {portid}"),
    }
}

impl NfQueue {
    /// Binds NFQUEUE `queue_num` in the calling thread's network namespace
    /// with [`QueueConfig::default`].
    pub fn open(queue_num: u16) -> Result<NfQueue, NfqError> {
        NfQueue::open_with(queue_num, &QueueConfig::default())
    }

    /// Binds NFQUEUE `queue_num` in the calling thread's network namespace.
    pub fn open_with(queue_num: u16, config: &QueueConfig) -> Result<NfQueue, NfqError> {
        let io_err = |op| {
            move |source| NfqError::Io {
                queue_num,
                op,
                source,
            }
        };
        let fd = new_socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            libc::NETLINK_NETFILTER,
        )
        .map_err(io_err("open a netlink socket"))?;
        let addr = kernel_addr();
        // SAFETY: binds to a sockaddr_nl we own, of its own size; port id 0
        // asks the kernel to pick one.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })
        .map_err(io_err("bind the netlink socket"))?;
        let mut bound = kernel_addr();
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `bound`.
        cvt(unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_nl).cast(),
                &mut len,
            )
        })
        .map_err(io_err("read the netlink port id"))?;

        // Errors come back with the request's header only, not all of it.
        crate::vip::setsockopt_int(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)
            .map_err(io_err("set NETLINK_CAP_ACK"))?;
        let asked = config.recv_buffer.min(i32::MAX as usize / 2) as i32;
        if crate::vip::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, asked).is_err() {
            // Without CAP_NET_ADMIN: as much as rmem_max allows.
            crate::vip::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, asked)
                .map_err(io_err("set the receive buffer"))?;
        }
        let recv_buffer = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF)
            .map_err(io_err("read the receive buffer"))? as usize;

        let copy_range = config.copy_range.min(MAX_COPY_RANGE);
        let slot = align4(copy_range as usize + SLOT_OVERHEAD);
        let batch = config.batch.max(1);
        let mut queue = NfQueue {
            fd,
            queue_num,
            portid: bound.nl_pid,
            recv_buffer,
            slot,
            batch,
            max_rounds: config.max_rounds.max(1),
            buf: RecvBuf::new(slot * batch).map_err(io_err("map the receive buffer"))?,
            meta: Vec::with_capacity(batch),
            pending: VecDeque::new(),
            unsettled: 0,
            early: Vec::new(),
            seq: 0,
            stats: QueueStats::default(),
        };
        queue.configure(copy_range, config)?;
        tracing::debug!(
            queue_num,
            portid = queue.portid,
            recv_buffer,
            "NFQUEUE bound"
        );
        Ok(queue)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Binds and configures in one datagram of two acknowledged messages.
    fn configure(&mut self, copy_range: u32, config: &QueueConfig) -> Result<(), NfqError> {
        let queue_num = self.queue_num;
        let bind_seq = self.next_seq();
        let config_seq = self.next_seq();
        let mut msg = Vec::new();
        // command (u8), pad (u8), pf (be16): 0 for a queue bind.
        let cmd = [CFG_CMD_BIND, 0, 0, 0];
        put_message(
            &mut msg,
            MSG_CONFIG,
            libc::NLM_F_ACK as u16,
            bind_seq,
            queue_num,
            &[(NFQA_CFG_CMD, &cmd)],
        );
        // copy_range (be32), copy_mode (u8): packed, 5 bytes.
        let mut params = [0u8; 5];
        params[..4].copy_from_slice(&copy_range.to_be_bytes());
        params[4] = COPY_PACKET;
        let mask =
            (libc::NFQA_CFG_F_FAIL_OPEN | libc::NFQA_CFG_F_CONNTRACK | libc::NFQA_CFG_F_GSO) as u32;
        let flags = if config.gso {
            libc::NFQA_CFG_F_GSO as u32
        } else {
            0
        };
        put_message(
            &mut msg,
            MSG_CONFIG,
            libc::NLM_F_ACK as u16,
            config_seq,
            queue_num,
            &[
                (NFQA_CFG_PARAMS, &params),
                (NFQA_CFG_QUEUE_MAXLEN, &config.max_len.to_be_bytes()),
                (NFQA_CFG_MASK, &mask.to_be_bytes()),
                (NFQA_CFG_FLAGS, &flags.to_be_bytes()),
            ],
        );
        self.send_all(&msg).map_err(|source| NfqError::Io {
            queue_num,
            op: "send the bind request",
            source,
        })?;

        let mut answers = [None, None];
        let until = Instant::now() + ACK_TIMEOUT;
        while answers.iter().any(Option::is_none) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let op = if answers[0].is_none() {
                    "bind"
                } else {
                    "configure"
                };
                return Err(NfqError::NoAnswer { queue_num, op });
            }
            wait_readable(self.fd.as_fd(), left).map_err(|source| NfqError::Io {
                queue_num,
                op: "wait for the kernel's answer",
                source,
            })?;
            let mut early = std::mem::take(&mut self.early);
            let got = self.recv_rounds(&mut early, 1, |seq, errno| {
                if seq == bind_seq {
                    answers[0] = Some(errno);
                } else if seq == config_seq {
                    answers[1] = Some(errno);
                }
            });
            self.early = early;
            got.map_err(|source| NfqError::Io {
                queue_num,
                op: "read the kernel's answer",
                source,
            })?;
        }
        match answers {
            [Some(0), Some(0)] => Ok(()),
            [Some(0), Some(errno)] => Err(NfqError::Refused {
                queue_num,
                op: "configure the queue (copy mode, length, flags)",
                source: io::Error::from_raw_os_error(errno),
            }),
            [Some(errno), _] => Err(self.bind_error(errno)),
            _ => unreachable!("loop ends with both answers"),
        }
    }

    fn bind_error(&self, errno: i32) -> NfqError {
        let queue_num = self.queue_num;
        match errno {
            // The kernel answers EPERM both to a queue bound by another
            // socket and to a missing CAP_NET_ADMIN: /proc tells which.
            libc::EPERM | libc::EBUSY => match queue_holder(queue_num) {
                Some(portid) if portid != self.portid => NfqError::QueueInUse {
                    queue_num,
                    holder: describe_holder(portid),
                },
                Some(_) => NfqError::QueueInUse {
                    queue_num,
                    holder: "this very socket".into(),
                },
                None if errno == libc::EBUSY => NfqError::QueueInUse {
                    queue_num,
                    holder: "unknown".into(),
                },
                None => NfqError::PermissionDenied { queue_num },
            },
            _ => NfqError::Refused {
                queue_num,
                op: "bind",
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// The queue number.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// Our netlink port id (what the kernel's `/proc` listing shows).
    pub fn portid(&self) -> u32 {
        self.portid
    }

    /// The receive buffer the kernel granted, in bytes (as `SO_RCVBUF`
    /// reports it: twice the payload room, for bookkeeping).
    pub fn recv_buffer(&self) -> usize {
        self.recv_buffer
    }

    /// Registers the queue with the current tokio runtime's reactor, for
    /// a reader that awaits readability (`readable_mut`, then
    /// [`NfQueue::recv_batch`] until it returns 0, then `clear_ready`).
    /// Must run inside a tokio runtime.
    pub fn into_async(self) -> Result<tokio::io::unix::AsyncFd<NfQueue>, NfqError> {
        let queue_num = self.queue_num;
        // SAFETY: the queue owns its descriptor for its whole life and
        // `as_raw_fd` always returns that one: it stays open and the same
        // until the AsyncFd drops or gives the queue back.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|e| NfqError::Io {
            queue_num,
            op: "register with the tokio reactor",
            source: e.into_parts().1,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Packets received and not yet given a verdict.
    pub fn pending(&self) -> usize {
        self.unsettled
    }

    /// Reads the packets waiting in the socket into `out` (arrival order),
    /// in at most [`QueueConfig::max_rounds`] `recvmmsg` calls; returns how
    /// many it added, 0 when none are waiting. Never blocks. Call it again
    /// until it returns 0 before waiting for the descriptor.
    pub fn recv_batch(&mut self, out: &mut Vec<Packet>) -> Result<usize, NfqError> {
        let before = out.len();
        out.append(&mut self.early);
        let queue_num = self.queue_num;
        let rounds = self.max_rounds;
        let mut stats = self.stats;
        let result = self.recv_rounds(out, rounds, |_, errno| {
            if errno != 0 {
                stats.verdict_errors += 1;
                stats.last_verdict_errno = errno;
            }
        });
        self.stats.verdict_errors = stats.verdict_errors;
        self.stats.last_verdict_errno = stats.last_verdict_errno;
        result.map_err(|source| NfqError::Io {
            queue_num,
            op: "receive packets",
            source,
        })?;
        Ok(out.len() - before)
    }

    /// Up to `rounds` `recvmmsg` calls; packets go to `out`, answers to
    /// `answer(seq, errno)`.
    fn recv_rounds(
        &mut self,
        out: &mut Vec<Packet>,
        rounds: usize,
        mut answer: impl FnMut(u32, i32),
    ) -> io::Result<()> {
        for _ in 0..rounds {
            let n = match self.recv_once() {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The kernel dropped packets for want of room; the
                    // socket works on.
                    self.stats.overruns += 1;
                    tracing::warn!(
                        queue_num = self.queue_num,
                        "NFQUEUE socket overran: packets dropped"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (i, &(len, flags, sender)) in self.meta[..n].iter().enumerate() {
                if sender != 0 {
                    self.stats.foreign += 1;
                    continue;
                }
                let start = i * self.slot;
                let datagram = &self.buf.as_slice()[start..start + len.min(self.slot)];
                if flags & libc::MSG_TRUNC != 0 {
                    self.stats.truncated += 1;
                }
                for parsed in parse_datagram(datagram) {
                    match parsed {
                        Ok(Message::Packet(packet)) => {
                            self.stats.received += 1;
                            track(&mut self.pending, &mut self.unsettled, packet.id);
                            out.push(packet);
                        }
                        Ok(Message::Answer { seq, errno }) => answer(seq, errno),
                        Ok(Message::Other { .. }) => {}
                        Err(e) => {
                            self.stats.malformed += 1;
                            tracing::debug!(queue_num = self.queue_num, error = %e, "malformed NFQUEUE message skipped");
                        }
                    }
                }
            }
            if n < self.batch {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The receive slots: an anonymous mapping of its own, so that its pages
/// are mapped only as packets fill them (a zeroed heap allocation would be
/// written whole, each time a queue opens), and marked `MADV_DONTFORK`, so
/// that the `iptables` children a hold forks do not copy its page tables.
struct RecvBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: RecvBuf owns its mapping alone, like a Vec<u8>.
unsafe impl Send for RecvBuf {}

impl RecvBuf {
    fn new(len: usize) -> io::Result<RecvBuf> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers
        // to the range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let buf = RecvBuf {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: advice on the mapping just made. Failing only costs
        // the copy at fork, so its result is ignored.
        let _ = unsafe { libc::madvise(ptr, len, libc::MADV_DONTFORK) };
        Ok(buf)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for the life of `self`
        // (anonymous memory reads as zeros until written).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no slice of it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Records a received id as pending (ids arrive in increasing order).
fn track(pending: &mut VecDeque<(u32, bool)>, unsettled: &mut usize, id: u32) {
    if pending.back().is_none_or(|&(last, _)| id_after(id, last)) {
        pending.push_back((id, false));
        *unsettled += 1;
    }
}

/// Index of `id` among the pending ids (sorted relative to the first).
fn find_pending(pending: &VecDeque<(u32, bool)>, id: u32) -> Option<usize> {
    let first = pending.front()?.0;
    let key = id.wrapping_sub(first);
    pending
        .binary_search_by_key(&key, |&(p, _)| p.wrapping_sub(first))
        .ok()
}

impl NfQueue {
    /// One `recvmmsg` into the slots; fills `self.meta` for each datagram.
    fn recv_once(&mut self) -> io::Result<usize> {
        let batch = self.batch;
        let slot = self.slot;
        let base = self.buf.ptr;
        // SAFETY: sockaddr_nl is plain old data; all-zero is valid.
        let mut names: Vec<libc::sockaddr_nl> = vec![unsafe { std::mem::zeroed() }; batch];
        let mut iovs: Vec<libc::iovec> = (0..batch)
            .map(|i| libc::iovec {
                // SAFETY: slot i lies inside `buf` (batch * slot bytes).
                iov_base: unsafe { base.add(i * slot) }.cast(),
                iov_len: slot,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..batch)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_nl).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every mmsghdr points at a live name and a live iovec, and
        // every iovec at its own `slot` bytes of `buf`; all outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        self.meta.clear();
        self.meta.extend(
            msgs[..n]
                .iter()
                .zip(&names)
                .map(|(m, name)| (m.msg_len as usize, m.msg_hdr.msg_flags, name.nl_pid)),
        );
        Ok(n)
    }

    /// Sends `msgs` (whole netlink messages) to the kernel in one datagram.
    fn send_all(&self, msgs: &[u8]) -> io::Result<()> {
        let addr = kernel_addr();
        loop {
            // SAFETY: sends `msgs.len()` bytes from a live slice to a
            // sockaddr_nl we own.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msgs.as_ptr().cast(),
                    msgs.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn send_verdicts(&mut self, msgs: &[u8], count: u64) -> Result<(), NfqError> {
        self.send_all(msgs).map_err(|source| NfqError::Io {
            queue_num: self.queue_num,
            op: "send verdicts",
            source,
        })?;
        self.stats.verdict_messages += count;
        self.stats.verdict_sends += 1;
        Ok(())
    }

    fn settle(&mut self, id: u32) {
        if let Some(i) = find_pending(&self.pending, id) {
            if !self.pending[i].1 {
                self.pending[i].1 = true;
                self.unsettled -= 1;
            }
        }
        while self.pending.front().is_some_and(|&(_, done)| done) {
            self.pending.pop_front();
        }
    }

    fn settle_up_to(&mut self, max_id: u32) {
        while let Some(&(id, done)) = self.pending.front() {
            if id_after(id, max_id) {
                break;
            }
            if !done {
                self.unsettled -= 1;
            }
            self.pending.pop_front();
        }
    }

    /// Gives packet `id` its verdict (one message, one `send`).
    pub fn verdict(&mut self, id: u32, verdict: Verdict) -> Result<(), NfqError> {
        let mut msg = Vec::with_capacity(32);
        let seq = self.next_seq();
        verdict_message(&mut msg, MSG_VERDICT, seq, self.queue_num, id, verdict);
        self.send_verdicts(&msg, 1)?;
        self.settle(id);
        Ok(())
    }

    /// Gives every packet still queued whose id is not after `max_id` the
    /// same verdict, in id order: one message, one `send`. Also those this
    /// socket never parsed (skipped as malformed).
    pub fn verdict_batch(&mut self, max_id: u32, verdict: Verdict) -> Result<(), NfqError> {
        let mut msg = Vec::with_capacity(32);
        let seq = self.next_seq();
        verdict_message(
            &mut msg,
            MSG_VERDICT_BATCH,
            seq,
            self.queue_num,
            max_id,
            verdict,
        );
        self.send_verdicts(&msg, 1)?;
        self.settle_up_to(max_id);
        Ok(())
    }

    /// Gives each `(id, verdict)` its verdict, applied in id order, in as
    /// few messages and `send`s as it can: the longest runs of the oldest
    /// pending ids that share a verdict become batch verdicts, the rest
    /// single ones, all in one datagram (per 64 KiB of messages). Returns
    /// how many messages it sent.
    pub fn verdicts(&mut self, items: &[(u32, Verdict)]) -> Result<usize, NfqError> {
        if items.is_empty() {
            return Ok(0);
        }
        let origin = self.pending.front().map_or(items[0].0, |&(id, _)| id);
        let mut sorted = items.to_vec();
        sorted.sort_by_key(|&(id, _)| id.wrapping_sub(origin));
        sorted.dedup_by_key(|&mut (id, _)| id);

        // (message type, id, verdict) in the order the kernel must see them.
        let mut plan: Vec<(u16, u32, Verdict)> = Vec::new();
        let unsettled: Vec<u32> = self
            .pending
            .iter()
            .filter(|&&(_, done)| !done)
            .map(|&(id, _)| id)
            .collect();
        let mut i = 0;
        let mut next_pending = unsettled.iter().peekable();
        // Runs that start at the oldest pending id: batches.
        while i < sorted.len() && next_pending.peek() == Some(&&sorted[i].0) {
            let verdict = sorted[i].1;
            let mut last = sorted[i].0;
            while i < sorted.len()
                && sorted[i].1 == verdict
                && next_pending.peek() == Some(&&sorted[i].0)
            {
                last = sorted[i].0;
                next_pending.next();
                i += 1;
            }
            plan.push((MSG_VERDICT_BATCH, last, verdict));
        }
        plan.extend(sorted[i..].iter().map(|&(id, v)| (MSG_VERDICT, id, v)));

        let mut msg = Vec::with_capacity(plan.len().min(SEND_CHUNK / 32) * 32);
        let mut in_msg = 0u64;
        for &(ty, id, verdict) in &plan {
            let seq = self.next_seq();
            verdict_message(&mut msg, ty, seq, self.queue_num, id, verdict);
            in_msg += 1;
            if msg.len() + 32 > SEND_CHUNK {
                self.send_verdicts(&msg, in_msg)?;
                msg.clear();
                in_msg = 0;
            }
        }
        if in_msg > 0 {
            self.send_verdicts(&msg, in_msg)?;
        }
        for &(ty, id, _) in &plan {
            if ty == MSG_VERDICT_BATCH {
                self.settle_up_to(id);
            } else {
                self.settle(id);
            }
        }
        Ok(plan.len())
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
