//! Raft messages between nodes, on the cluster listener.
//!
//! Each node keeps two long-lived connections to each peer of a group: one
//! for appends and their answers, one for heartbeats, votes and their
//! answers ([`lane`]). A heartbeat thus never queues behind megabytes of
//! appends (in the sender's buffers, on the wire, or in the receiver's
//! queue: the raft thread takes the heartbeat lane first), so the leader's
//! lease follows its followers' election timers, not the load. raft
//! tolerates the reordering: a heartbeat commits only what the follower
//! acknowledged. The peer only reads from a connection, and sends its own
//! messages on the ones it opened. So each direction has its own
//! connections: a sender never waits for the other side to reconnect, and
//! a dead connection is noticed, and replaced with backoff, by the side
//! that writes. Snapshots use a connection per transfer, on the group's
//! snapshot thread, so a bulk transfer never delays a heartbeat.
//!
//! On the wire, after the handshake of [`crate::peer`] (or none, for a
//! listener built without credentials):
//!
//! - a hello: a [`baton_core::wire`] frame whose magic says the channel
//!   ([`RAFT_MAGIC`], [`HEARTBEAT_MAGIC`] or [`SNAPSHOT_MAGIC`]; the
//!   listener dispatches on its
//!   first four bytes) and whose body is a [`ChannelHello`]: the group,
//!   the sender's raft id, the raft id it is for;
//! - raft and heartbeat channels: raft-rs messages (`eraftpb::Message`,
//!   prost), each prefixed by its length (u32, big endian);
//! - snapshot channel: one `MsgSnapshot` message as above (metadata only),
//!   the data's length (u64, big endian), the data (written in chunks), and
//!   the receiver's one-byte answer (1: handed to raft, 0: not).
//!
//! Every message is checked before raft sees it: the sender must be the
//! member whose name the connection authenticated, the receiver this
//! node's current raft id, the type one a peer may send. A message that
//! fails is refused, counted ([`super::RaftCounters`]) and its connection
//! dropped; nothing of it reaches raft.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::raft::prelude::{EntryType, Message, MessageType};
use baton_core::wire::{self, WireError};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::driver::{Input, SnapshotIn};
use super::storage::SnapshotEnvelope;
use super::{GroupConfig, RaftId, Shared};
use crate::peer::{check_sender, ControlStream};

/// First bytes of a raft message connection.
pub const RAFT_MAGIC: [u8; 4] = *b"BTRF";
/// First bytes of a heartbeat (and vote) connection.
pub const HEARTBEAT_MAGIC: [u8; 4] = *b"BTRH";
/// First bytes of a snapshot transfer connection.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"BTRS";
/// Version of both channels.
pub const VERSION: u16 = 1;
/// Longest a peer may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HELLO: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A write that takes longer means the peer stopped reading: reconnect.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Messages queued for one peer; past that they are dropped (raft
/// resends what matters).
const LINK_QUEUE: usize = 4096;
/// Bytes of messages written at once.
const WRITE_BATCH: usize = 256 << 10;
/// Snapshot data is written in pieces of this size.
pub const SNAPSHOT_CHUNK: usize = 64 << 10;

/// Which channel a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Raft,
    /// Heartbeats, votes and their answers: small, never behind appends.
    Heartbeat,
    Snapshot,
}

/// The connection a message travels on.
pub fn lane(msg_type: i32) -> Channel {
    match MessageType::from_i32(msg_type) {
        Some(
            MessageType::MsgHeartbeat
            | MessageType::MsgHeartbeatResponse
            | MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse,
        ) => Channel::Heartbeat,
        Some(MessageType::MsgSnapshot) => Channel::Snapshot,
        _ => Channel::Raft,
    }
}

impl Channel {
    pub fn magic(self) -> [u8; 4] {
        match self {
            Channel::Raft => RAFT_MAGIC,
            Channel::Heartbeat => HEARTBEAT_MAGIC,
            Channel::Snapshot => SNAPSHOT_MAGIC,
        }
    }

    /// The channel a connection's first four bytes name.
    pub fn of_magic(magic: &[u8]) -> Option<Channel> {
        if magic == RAFT_MAGIC {
            Some(Channel::Raft)
        } else if magic == HEARTBEAT_MAGIC {
            Some(Channel::Heartbeat)
        } else if magic == SNAPSHOT_MAGIC {
            Some(Channel::Snapshot)
        } else {
            None
        }
    }
}

/// What a connection says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelHello {
    /// The group (service) it is for.
    pub group: String,
    /// The sender's raft id: the authenticated node's.
    pub from: RaftId,
    /// The receiver's raft id, as the sender knows it.
    pub to: RaftId,
}

/// Why a connection or message was refused, or a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds {limit}")]
    TooLarge { len: u64, limit: u64 },
    #[error("malformed raft message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed snapshot: {0}")]
    Envelope(String),
    #[error("bad hello: {0}")]
    Hello(#[from] WireError),
    #[error("connection for group {group:?}, not this one")]
    WrongGroup { group: String },
    #[error("addressed to raft id {to}; this node is {me} (a previous incarnation?)")]
    StaleTarget { to: RaftId, me: RaftId },
    #[error("sender {0} is no member of the group")]
    UnknownSender(RaftId),
    #[error("message claims sender {claimed}: {detail}")]
    WrongSender { claimed: RaftId, detail: String },
    #[error("message type {0} is not accepted from a peer here")]
    RefusedType(i32),
    #[error("entry {index} has a type no peer may send")]
    BadEntry { index: u64 },
    #[error("timed out")]
    Timeout,
    #[error("connecting: {0}")]
    Connect(String),
    #[error("no address for raft id {0}")]
    UnknownTarget(RaftId),
}

/// A connection a peer opened, with its hello read.
pub(crate) struct Accepted {
    pub channel: Channel,
    pub stream: ControlStream,
    pub hello: ChannelHello,
    pub authenticated: Option<String>,
}

/// The hello frame for `channel`.
pub fn hello_frame(channel: Channel, hello: &ChannelHello) -> Vec<u8> {
    wire::encode(channel.magic(), VERSION, hello)
}

/// Fills `buf`; `Closed` if the stream ends before its first byte and
/// `at_start`, `Truncated` if it ends later.
async fn fill<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    at_start: bool,
) -> Result<(), TransportError> {
    let mut got = 0;
    while got < buf.len() {
        let n = match s.read(&mut buf[got..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(TransportError::Truncated)
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(if got == 0 && at_start {
                TransportError::Closed
            } else {
                TransportError::Truncated
            });
        }
        got += n;
    }
    Ok(())
}

/// Reads a connection's hello (reading exactly its bytes).
pub async fn read_hello<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(Channel, ChannelHello), TransportError> {
    let mut header = [0u8; wire::HEADER_LEN];
    fill(s, &mut header, true).await?;
    let channel = Channel::of_magic(&header[..4]).ok_or_else(|| WireError::BadMagic {
        expected: "BTRF, BTRH or BTRS".into(),
        found: header[..4].try_into().expect("4 bytes"),
    })?;
    let h = wire::parse_header(channel.magic(), VERSION, &header)?;
    if h.body_len > MAX_HELLO {
        return Err(WireError::TooLarge(h.body_len).into());
    }
    let mut body = vec![0u8; h.body_len];
    fill(s, &mut body, false).await?;
    Ok((channel, wire::decode_body(&body)?))
}

/// Appends `msg`, length-prefixed, to `out`.
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out)
        .expect("encoding into a Vec that has room cannot fail");
}

/// Reads one length-prefixed message of at most `limit` bytes.
pub async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    limit: usize,
) -> Result<Message, TransportError> {
    let mut len = [0u8; 4];
    fill(s, &mut len, true).await?;
    let len = u32::from_be_bytes(len) as u64;
    if len > limit as u64 {
        return Err(TransportError::TooLarge {
            len,
            limit: limit as u64,
        });
    }
    // Grows as bytes arrive: a claimed length allocates nothing by itself.
    let mut body = Vec::with_capacity(len.min(64 << 10) as usize);
    s.take(len).read_to_end(&mut body).await?;
    if body.len() as u64 != len {
        return Err(TransportError::Truncated);
    }
    Ok(Message::decode(body.as_slice())?)
}

/// Largest raft frame: a full append plus one largest entry.
pub(crate) fn frame_limit(cfg: &GroupConfig) -> usize {
    cfg.max_entry_bytes + cfg.max_append_bytes as usize + (64 << 10)
}

/// The hello's sender must be a member, and the member the connection
/// authenticated; it must be for this node's current id.
fn check_hello(
    shared: &Shared,
    hello: &ChannelHello,
    authenticated: Option<&str>,
) -> Result<(), TransportError> {
    if hello.to != shared.id {
        return Err(TransportError::StaleTarget {
            to: hello.to,
            me: shared.id,
        });
    }
    let member = shared
        .member(hello.from)
        .ok_or(TransportError::UnknownSender(hello.from))?;
    if let Some(name) = authenticated {
        check_sender(name, &member.name).map_err(|e| TransportError::WrongSender {
            claimed: hello.from,
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// A message on a checked connection: from its sender, to this node, of a
/// type a peer may send on `channel`.
fn check_message(
    shared: &Shared,
    hello: &ChannelHello,
    msg: &Message,
    channel: Channel,
) -> Result<(), TransportError> {
    if msg.to != shared.id {
        return Err(TransportError::StaleTarget {
            to: msg.to,
            me: shared.id,
        });
    }
    if msg.from != hello.from {
        return Err(TransportError::WrongSender {
            claimed: msg.from,
            detail: format!("the connection is from raft id {}", hello.from),
        });
    }
    let t = MessageType::from_i32(msg.msg_type).ok_or(TransportError::RefusedType(msg.msg_type))?;
    let allowed = match channel {
        // Local messages (MsgHup, MsgBeat, ...) and proposals or
        // transfer requests never come from a peer here; a snapshot only
        // on its own channel.
        Channel::Raft => matches!(
            t,
            MessageType::MsgAppend | MessageType::MsgAppendResponse | MessageType::MsgTimeoutNow
        ),
        Channel::Heartbeat => lane(msg.msg_type) == Channel::Heartbeat,
        Channel::Snapshot => {
            t == MessageType::MsgSnapshot
                && msg
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.metadata.as_ref())
                    .is_some_and(|m| m.conf_state.is_some())
        }
    };
    if !allowed {
        return Err(TransportError::RefusedType(msg.msg_type));
    }
    for e in &msg.entries {
        match EntryType::from_i32(e.entry_type) {
            Some(EntryType::EntryNormal | EntryType::EntryConfChangeV2) => {}
            _ => return Err(TransportError::BadEntry { index: e.index }),
        }
    }
    Ok(())
}

fn log_refusal(shared: &Shared, hello: &ChannelHello, e: &TransportError) {
    match e {
        TransportError::Closed => {}
        // Expected after a peer restarted under a new id.
        TransportError::StaleTarget { .. } => {
            tracing::debug!(group = %shared.cfg.group, from = hello.from, error = %e, "raft connection refused")
        }
        TransportError::Io(_) | TransportError::Timeout => {
            tracing::debug!(group = %shared.cfg.group, from = hello.from, error = %e, "raft connection ended")
        }
        _ => {
            tracing::warn!(group = %shared.cfg.group, from = hello.from, error = %e, "raft connection refused; nothing more of it is read")
        }
    }
}

/// Serves the raft connections handed over to the raft thread.
/// Heartbeat-lane messages go to `beats`, the others to `net`.
pub(crate) async fn serve_raft_accepts(
    shared: Arc<Shared>,
    mut accepts: mpsc::UnboundedReceiver<Accepted>,
    net: mpsc::Sender<Message>,
    beats: mpsc::Sender<Message>,
) {
    while let Some(acc) = accepts.recv().await {
        let to = match acc.channel {
            Channel::Heartbeat => beats.clone(),
            _ => net.clone(),
        };
        tokio::spawn(serve_raft(shared.clone(), acc, to));
    }
}

async fn serve_raft(shared: Arc<Shared>, acc: Accepted, net: mpsc::Sender<Message>) {
    let Accepted {
        channel,
        stream,
        hello,
        authenticated,
    } = acc;
    let result = async {
        // Registered with this thread's reactor, so its readiness does not
        // depend on the runtime that accepted it.
        let stream = stream.reregister()?;
        check_hello(&shared, &hello, authenticated.as_deref())?;
        let mut r = BufReader::with_capacity(64 << 10, stream);
        let limit = frame_limit(&shared.cfg);
        loop {
            let msg = read_message(&mut r, limit).await?;
            check_message(&shared, &hello, &msg, channel)?;
            shared.counters.messages_in.fetch_add(1, Ordering::Relaxed);
            if net.send(msg).await.is_err() {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.counters.count(&e);
        log_refusal(&shared, &hello, &e);
    }
}

/// Opens `channel` to member `to` and sends the hello.
async fn connect(
    shared: &Shared,
    channel: Channel,
    to: RaftId,
) -> Result<ControlStream, TransportError> {
    let member = shared.member(to).ok_or(TransportError::UnknownTarget(to))?;
    let mut s = match &shared.auth {
        Some(auth) => ControlStream::Authenticated(Box::new(
            auth.connect(&member.name, None)
                .await
                .map_err(|e| TransportError::Connect(e.to_string()))?,
        )),
        None => {
            let tcp = TcpStream::connect(member.addr).await?;
            let _ = tcp.set_nodelay(true);
            ControlStream::Plain(tcp)
        }
    };
    let hello = ChannelHello {
        group: shared.cfg.group.clone(),
        from: shared.id,
        to,
    };
    s.write_all(&hello_frame(channel, &hello)).await?;
    Ok(s)
}

/// The outgoing raft connections of the raft thread, one per peer and
/// lane.
#[derive(Default)]
pub(crate) struct Links {
    links: HashMap<(RaftId, Channel), mpsc::Sender<Message>>,
}

impl Links {
    /// Queues `msg` for its peer, opening the link if needed; dropped (and
    /// counted) if the peer is unknown or its queue is full.
    pub fn send(
        &mut self,
        shared: &Arc<Shared>,
        inputs: &mpsc::UnboundedSender<Input>,
        msg: Message,
    ) {
        let to = msg.to;
        let channel = lane(msg.msg_type);
        let tx = match self.links.entry((to, channel)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                if shared.member(to).is_none() {
                    shared.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                tokio::spawn(link(shared.clone(), to, channel, rx, inputs.clone()));
                v.insert(tx)
            }
        };
        if tx.try_send(msg).is_err() {
            shared.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the links to peers that are no longer members.
    pub fn retain(&mut self, keep: impl Fn(RaftId) -> bool) {
        self.links.retain(|(id, _), _| keep(*id));
    }
}

/// One peer's outgoing connection: connects, sends what is queued,
/// reconnects with backoff. While down, queued messages are dropped and
/// raft is told the peer is unreachable.
async fn link(
    shared: Arc<Shared>,
    to: RaftId,
    channel: Channel,
    mut rx: mpsc::Receiver<Message>,
    inputs: mpsc::UnboundedSender<Input>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, connect(&shared, channel, to)).await {
            Ok(Ok(stream)) => {
                shared.counters.connects.fetch_add(1, Ordering::Relaxed);
                let up = tokio::time::Instant::now();
                let pumped = pump(&shared, stream, &mut rx).await;
                // A connection the peer drops at once (it refuses this id,
                // say) must not make a reconnect loop.
                if up.elapsed() >= MAX_BACKOFF {
                    backoff = MIN_BACKOFF;
                }
                match pumped {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(group = %shared.cfg.group, to, error = %e, "raft connection lost")
                    }
                }
            }
            Ok(Err(e)) => {
                shared
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(group = %shared.cfg.group, to, error = %e, "raft connect failed");
            }
            Err(_) => {
                shared
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if inputs.send(Input::Unreachable(to)).is_err() {
            return;
        }
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = rx.recv() => match m {
                    None => return,
                    Some(_) => {
                        shared.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Writes queued messages in batches until the link is closed (`Ok`) or
/// the connection fails.
async fn pump(
    shared: &Shared,
    mut stream: ControlStream,
    rx: &mut mpsc::Receiver<Message>,
) -> Result<(), TransportError> {
    let mut buf = Vec::with_capacity(64 << 10);
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        buf.clear();
        encode_message(&first, &mut buf);
        let mut n = 1;
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    encode_message(&m, &mut buf);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&buf).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| TransportError::Timeout)??;
        shared.counters.messages_out.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot for the snapshot thread to send.
pub(crate) struct SnapshotJob {
    pub to: RaftId,
    /// raft's `MsgSnapshot`, metadata only.
    pub msg: Message,
    /// An encoded [`SnapshotEnvelope`].
    pub data: Arc<Vec<u8>>,
}

/// The snapshot thread: sends and receives snapshots until shutdown.
pub(crate) async fn snapshot_service(
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<SnapshotJob>,
    mut accepts: mpsc::UnboundedReceiver<Accepted>,
    inputs: mpsc::UnboundedSender<Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(job) = jobs.recv() => {
                tokio::spawn(send_snapshot(shared.clone(), job, inputs.clone()));
            }
            Some(acc) = accepts.recv() => {
                tokio::spawn(receive_snapshot(shared.clone(), acc, inputs.clone()));
            }
            else => return,
        }
    }
}

/// Time allowed for moving `len` bytes: at least 8 MiB/s.
fn transfer_time(len: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs(len / (8 << 20))
}

async fn send_snapshot(
    shared: Arc<Shared>,
    job: SnapshotJob,
    inputs: mpsc::UnboundedSender<Input>,
) {
    let len = job.data.len() as u64;
    let result = tokio::time::timeout(transfer_time(len), async {
        let mut s = connect(&shared, Channel::Snapshot, job.to).await?;
        let mut head = Vec::new();
        encode_message(&job.msg, &mut head);
        head.extend_from_slice(&len.to_be_bytes());
        s.write_all(&head).await?;
        for chunk in job.data.chunks(SNAPSHOT_CHUNK) {
            s.write_all(chunk).await?;
        }
        s.flush().await?;
        let mut ack = [0u8; 1];
        fill(&mut s, &mut ack, false).await?;
        Ok::<bool, TransportError>(ack[0] == 1)
    })
    .await;
    let ok = match result {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            tracing::warn!(group = %shared.cfg.group, to = job.to, error = %e, "sending a snapshot failed");
            false
        }
        Err(_) => {
            tracing::warn!(group = %shared.cfg.group, to = job.to, "sending a snapshot timed out");
            false
        }
    };
    let c = if ok {
        &shared.counters.snapshots_sent
    } else {
        &shared.counters.snapshot_failures
    };
    c.fetch_add(1, Ordering::Relaxed);
    let _ = inputs.send(Input::SnapshotDone { to: job.to, ok });
}

async fn receive_snapshot(
    shared: Arc<Shared>,
    acc: Accepted,
    inputs: mpsc::UnboundedSender<Input>,
) {
    let Accepted {
        stream,
        hello,
        authenticated,
        ..
    } = acc;
    let result = async {
        let mut stream = stream.reregister()?;
        check_hello(&shared, &hello, authenticated.as_deref())?;
        let (msg, len) = tokio::time::timeout(HELLO_TIMEOUT, async {
            let msg = read_message(&mut stream, frame_limit(&shared.cfg)).await?;
            check_message(&shared, &hello, &msg, Channel::Snapshot)?;
            let mut len = [0u8; 8];
            fill(&mut stream, &mut len, false).await?;
            Ok::<_, TransportError>((msg, u64::from_be_bytes(len)))
        })
        .await
        .map_err(|_| TransportError::Timeout)??;
        let limit = shared.cfg.max_snapshot_bytes as u64;
        if len > limit {
            return Err(TransportError::TooLarge { len, limit });
        }
        let mut data = Vec::with_capacity(len.min(1 << 20) as usize);
        tokio::time::timeout(
            transfer_time(len),
            (&mut stream).take(len).read_to_end(&mut data),
        )
        .await
        .map_err(|_| TransportError::Timeout)??;
        if data.len() as u64 != len {
            return Err(TransportError::Truncated);
        }
        let envelope =
            SnapshotEnvelope::decode(&data).map_err(|e| TransportError::Envelope(e.to_string()))?;
        let (ack, answer) = oneshot::channel();
        inputs
            .send(Input::SnapshotIn(Box::new(SnapshotIn {
                msg,
                data: Arc::new(data),
                envelope,
                ack,
            })))
            .map_err(|_| TransportError::Closed)?;
        let ok = answer.await.unwrap_or(false);
        stream.write_all(&[ok as u8]).await?;
        stream.flush().await?;
        Ok(ok)
    }
    .await;
    match result {
        Ok(true) => {
            shared
                .counters
                .snapshots_received
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => {}
        Err(e) => {
            shared.counters.count(&e);
            log_refusal(&shared, &hello, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_typed_errors() {
        let msg = Message {
            msg_type: MessageType::MsgHeartbeat as i32,
            to: 2,
            from: 1,
            term: 3,
            commit: 7,
            ..Default::default()
        };
        let mut buf = Vec::new();
        encode_message(&msg, &mut buf);
        let back = read_message(&mut buf.as_slice(), 1 << 20).await.unwrap();
        assert_eq!(back, msg);

        // Cut anywhere: truncated (or closed if nothing came).
        for cut in 1..buf.len() {
            let r = read_message(&mut &buf[..cut], 1 << 20).await;
            assert!(
                matches!(r, Err(TransportError::Truncated)),
                "cut at {cut}: {r:?}"
            );
        }
        assert!(matches!(
            read_message(&mut &buf[..0], 1 << 20).await,
            Err(TransportError::Closed)
        ));
        // Over the limit, before reading the body.
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(
            read_message(&mut huge.as_slice(), 1 << 20).await,
            Err(TransportError::TooLarge { .. })
        ));
        // Garbage of the declared length.
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend_from_slice(&[0xff; 5]);
        assert!(matches!(
            read_message(&mut junk.as_slice(), 1 << 20).await,
            Err(TransportError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn hellos_name_their_channel() {
        let h = ChannelHello {
            group: "kv".into(),
            from: 1,
            to: 2,
        };
        for ch in [Channel::Raft, Channel::Heartbeat, Channel::Snapshot] {
            let f = hello_frame(ch, &h);
            let (c, back) = read_hello(&mut f.as_slice()).await.unwrap();
            assert_eq!((c, back), (ch, h.clone()));
            assert!(matches!(
                read_hello(&mut &f[..f.len() - 1]).await,
                Err(TransportError::Truncated)
            ));
        }
        let mut other = hello_frame(Channel::Raft, &h);
        other[..4].copy_from_slice(b"BTPQ");
        assert!(matches!(
            read_hello(&mut other.as_slice()).await,
            Err(TransportError::Hello(WireError::BadMagic { .. }))
        ));
    }
}
