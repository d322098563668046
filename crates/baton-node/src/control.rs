//! The control API (`baton ctl` → the local node, over a root-only Unix
//! socket, one JSON object per line) and the peer queries nodes send each
//! other (over the cluster network, framed like every wire message).

use std::net::SocketAddr;
use std::path::Path;

use baton_core::wire::{self, WireError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A request to the local node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Move { service: String, to: String },
}

/// The node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    Status(ClusterStatus),
    Moved(MoveSummary),
    Error { message: String },
}

/// The cluster as the asked node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub nodes: Vec<NodeEntry>,
    pub services: Vec<ServiceEntry>,
    /// Problems the asked node sees with its peers: kernel TCP settings
    /// that differ (a moved socket may not rebuild the same there).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Peer connections the asked node refused since it started (bad or
    /// missing credentials, altered or replayed messages).
    #[serde(default)]
    pub refused_peer_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub address: SocketAddr,
    pub up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceEntry {
    pub name: String,
    pub kind: String,
    pub vip: String,
    pub ports: Vec<u16>,
    /// The node serving it, if any node that answered does.
    pub running_on: Option<String>,
    pub connections: usize,
    /// A move is under way.
    pub moving: bool,
    /// The service's replicated log as each node that answered sees it.
    #[serde(default)]
    pub log: Vec<NodeLog>,
}

/// One node's view of a service's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeLog {
    pub node: String,
    #[serde(flatten)]
    pub status: crate::service_log::LogStatus,
}

/// A completed move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveSummary {
    pub service: String,
    pub from: String,
    pub to: String,
    pub connections: usize,
    /// How long the VIP's traffic was held.
    pub freeze_ms: f64,
}

/// Frame magic of peer queries and replies.
pub const PEER_MAGIC: [u8; 4] = *b"BTPQ";
pub const PEER_VERSION: u16 = 5;

/// What one node asks another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Which services do you run?
    Status,
    /// Move a service you run to node `to`.
    Move { service: String, to: String },
    /// What do you know of `service`'s log? (A node that starts asks, to
    /// found the group or join it.)
    LogMembers { service: String },
    /// Add me to `service`'s log under `raft_id` (asked of its leader).
    LogJoin { service: String, raft_id: u64 },
    /// Your view of every service's log, for `ctl status`.
    LogStatus,
}

/// A node's answer to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerReply {
    /// Services running there, with their connection counts.
    Running(Vec<(String, usize, bool)>),
    Moved(MoveSummary),
    Error(String),
    Log(crate::service_log::GroupView),
    Joined,
    LogStatus(Vec<(String, crate::service_log::LogStatus)>),
}

/// Largest control request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// Sends one request to the node listening on `socket` and waits for its
/// answer (a move may take a while).
pub async fn request(socket: &Path, req: &ControlRequest) -> Result<ControlReply, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the node's control socket {}: {e} (is `baton node` running, and are you root?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(read)
        .take(MAX_LINE as u64 * 16)
        .read_line(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from the node: {e}"))
}

/// Reads one control request line.
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    read: R,
) -> Result<ControlRequest, String> {
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_LINE as u64)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
}

/// Writes one control reply line.
pub async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(
    mut write: W,
    reply: &ControlReply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

/// Reads one framed peer message (request or reply).
pub async fn read_peer<T: serde::de::DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
) -> Result<T, String> {
    let mut header = [0u8; wire::HEADER_LEN];
    read.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let h = wire::parse_header(PEER_MAGIC, PEER_VERSION, &header).map_err(|e| e.to_string())?;
    if h.body_len > MAX_LINE * 16 {
        return Err(WireError::TooLarge(h.body_len).to_string());
    }
    let mut body = vec![0u8; h.body_len];
    read.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    wire::decode_body(&body).map_err(|e| e.to_string())
}

/// Writes one framed peer message.
pub async fn write_peer<T: Serialize, W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    write
        .write_all(&wire::encode(PEER_MAGIC, PEER_VERSION, msg))
        .await?;
    write.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines() {
        let r = ControlRequest::Move {
            service: "kv".into(),
            to: "node2".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"move","service":"kv","to":"node2"}"#);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }

    /// Peer messages are a compact binary frame: every field goes on the
    /// wire, absent ones too, or a peer cannot read them back.
    #[test]
    fn log_statuses_cross_the_peer_wire() {
        let replicated = crate::service_log::LogStatus {
            raft_id: 7,
            role: "clone".into(),
            raft_role: "follower".into(),
            leader: Some("node1".into()),
            state_digest: Some("ab".repeat(32)),
            stream_mismatches: Some(0),
            malformed_dropped: Some(3),
            last_takeover: Some(crate::replicated::Takeover {
                at_ms: 1_700_000_000_000,
                held_ms: 180,
                rebuild_ms: 4,
                connections: 12,
                lost: 0,
            }),
            lease_lapses: Some(2),
            ..Default::default()
        };
        let plain = crate::service_log::LogStatus {
            role: "standby".into(),
            ..Default::default()
        };
        let reply = PeerReply::LogStatus(vec![("kv".into(), replicated), ("echo".into(), plain)]);
        let bytes = wire::encode(PEER_MAGIC, PEER_VERSION, &reply);
        let back: PeerReply = wire::decode(PEER_MAGIC, PEER_VERSION, &bytes).unwrap();
        assert_eq!(format!("{back:?}"), format!("{reply:?}"));
    }
}
