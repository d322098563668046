//! The cluster listener's security: every connection between nodes
//! (status queries, forwarded moves, the move protocol, and the raft
//! messages of [`crate::raft`]) is authenticated and encrypted before any byte of it
//! is parsed.
//!
//! A node proves who it is with its static key (listed for it in
//! `[public_keys]` of every node's configuration) and that it belongs to
//! the cluster with the cluster's pre-shared key; see [`noise`] for the
//! protocol. Right after the handshake the initiator sends a [`Hello`]
//! naming itself: a name that is not the one its key is listed under is
//! refused. Both sides then compare the kernel settings that decide
//! whether a socket can be rebuilt on the other ([`kernel`]).
//!
//! Every refusal is counted ([`RefusalCounters`]) and logged once per
//! source and reason per minute. Keys never appear in logs, errors or
//! `ctl status`.

pub mod kernel;
pub mod keys;
pub mod noise;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use kernel::KernelSettings;
pub use keys::{KeyFileError, PublicKey, Secret};
pub use noise::{NoiseError, NoiseStream};

/// An authenticated connection to or from a peer node.
pub type PeerStream = NoiseStream<TcpStream>;

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the same refusal (source and reason) is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the listener refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// A plain (unauthenticated) baton frame.
    PlainFrame,
    /// Something that is not a baton handshake.
    NotBaton,
    /// Message 1 did not authenticate: another cluster's view of this
    /// node's key, or altered.
    BadHandshake,
    /// A valid handshake from a key not in `[public_keys]`.
    UnknownKey,
    /// The handshake was not completed with the cluster key: the first
    /// message failed authentication (wrong cluster key, replayed or
    /// altered) or never came.
    NotCompleted,
    /// A later message failed authentication (altered, replayed).
    BadMessage,
    /// The peer claimed another node's name than its key's.
    WrongName,
    /// Nothing, or too little, within the deadline.
    Timeout,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PlainFrame => "unauthenticated plain frame",
            Refusal::NotBaton => "not a baton peer handshake",
            Refusal::BadHandshake => {
                "handshake failed authentication (not addressed to this node's key, or altered)"
            }
            Refusal::UnknownKey => "key of no node in [public_keys]",
            Refusal::NotCompleted => {
                "handshake not completed (wrong cluster key, replayed or altered)"
            }
            Refusal::BadMessage => "message failed authentication (altered or replayed)",
            Refusal::WrongName => "claimed another node's name than its key's",
            Refusal::Timeout => "no handshake in time",
        }
    }
}

/// Refusal counts since start, for the metrics endpoint to export.
#[derive(Debug, Default)]
pub struct RefusalCounters {
    pub plain_frame: AtomicU64,
    pub not_baton: AtomicU64,
    pub bad_handshake: AtomicU64,
    pub unknown_key: AtomicU64,
    pub not_completed: AtomicU64,
    pub bad_message: AtomicU64,
    pub wrong_name: AtomicU64,
    pub timeout: AtomicU64,
}

impl RefusalCounters {
    fn counter(&self, r: Refusal) -> &AtomicU64 {
        match r {
            Refusal::PlainFrame => &self.plain_frame,
            Refusal::NotBaton => &self.not_baton,
            Refusal::BadHandshake => &self.bad_handshake,
            Refusal::UnknownKey => &self.unknown_key,
            Refusal::NotCompleted => &self.not_completed,
            Refusal::BadMessage => &self.bad_message,
            Refusal::WrongName => &self.wrong_name,
            Refusal::Timeout => &self.timeout,
        }
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        [
            &self.plain_frame,
            &self.not_baton,
            &self.bad_handshake,
            &self.unknown_key,
            &self.not_completed,
            &self.bad_message,
            &self.wrong_name,
            &self.timeout,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Counts refusals and logs each (source, reason) at most once a minute.
#[derive(Debug, Default)]
pub struct Refusals {
    pub counters: RefusalCounters,
    logged: Mutex<HashMap<(IpAddr, Refusal), (Instant, u64)>>,
}

impl Refusals {
    /// Records a refusal of a connection from `from`.
    pub fn refuse(&self, from: SocketAddr, reason: Refusal, detail: Option<&str>) {
        self.counters
            .counter(reason)
            .fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() > 4096 {
            // Bounded memory under a flood from many sources.
            logged.retain(|_, (at, _)| at.elapsed() < LOG_EVERY);
        }
        let now = Instant::now();
        let key = (from.ip(), reason);
        match logged.get_mut(&key) {
            Some((at, suppressed)) if now.duration_since(*at) < LOG_EVERY => *suppressed += 1,
            entry => {
                let suppressed = entry.map_or(0, |(_, s)| *s);
                logged.insert(key, (now, 0));
                drop(logged);
                match detail {
                    Some(detail) => tracing::warn!(
                        source = %from.ip(),
                        reason = reason.as_str(),
                        detail,
                        suppressed_since_last = suppressed,
                        "refused a peer connection; nothing it sent was acted on"
                    ),
                    None => tracing::warn!(
                        source = %from.ip(),
                        reason = reason.as_str(),
                        suppressed_since_last = suppressed,
                        "refused a peer connection; nothing it sent was acted on"
                    ),
                }
            }
        }
    }
}

/// What the initiator says first, inside the encrypted stream; the
/// responder answers with its own in handshake message 2.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The node the sender says it is.
    pub node: String,
    pub kernel: KernelSettings,
}

/// This node's credentials and the cluster's keys (from the node config).
pub struct PeerAuth {
    node: String,
    private: Secret,
    psk: Secret,
    /// name → (peer address, public key), this node included.
    peers: BTreeMap<String, (SocketAddr, PublicKey)>,
    kernel: KernelSettings,
    pub refusals: Arc<Refusals>,
    /// Kernel setting mismatches per peer, as last seen.
    mismatches: Mutex<BTreeMap<String, Vec<String>>>,
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAuth")
            .field("node", &self.node)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A key file named by the configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} {source}")]
pub struct AuthConfigError {
    /// The configuration key naming the file.
    pub key: String,
    pub source: KeyFileError,
}

/// Where this node's credentials come from (checked configuration).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_file: PathBuf,
    pub cluster_key_file: PathBuf,
    pub public_keys: BTreeMap<String, PublicKey>,
}

/// Why an outgoing peer connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("node {node} did not authenticate ({source}): its key in [public_keys] or the cluster key differ")]
    Handshake { node: String, source: NoiseError },
    #[error("node {node} answered with a malformed hello")]
    Hello { node: String },
    #[error("no node of [peers] at {0}")]
    UnknownAddress(SocketAddr),
    #[error("unknown node {0:?}")]
    UnknownNode(String),
}

impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> io::Error {
        match e {
            ConnectError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
        }
    }
}

impl PeerAuth {
    /// Loads the key files: each must exist, be readable by its owner
    /// only and hold a key of the right kind. This node's private key must
    /// match its own entry in `[public_keys]`.
    pub async fn load(
        node: &str,
        interface: &str,
        peers: &BTreeMap<String, SocketAddr>,
        cfg: &AuthConfig,
    ) -> Result<PeerAuth, AuthConfigError> {
        let private = keys::load_secret(&cfg.key_file, keys::NODE_KEY_LABEL).map_err(|source| {
            AuthConfigError {
                key: "key_file".into(),
                source,
            }
        })?;
        let psk = keys::load_secret(&cfg.cluster_key_file, keys::CLUSTER_KEY_LABEL).map_err(
            |source| AuthConfigError {
                key: "cluster_key_file".into(),
                source,
            },
        )?;
        if cfg.public_keys.get(node) != Some(&keys::public_of(&private)) {
            return Err(AuthConfigError {
                key: "key_file".into(),
                source: KeyFileError {
                    file: cfg.key_file.display().to_string(),
                    problem: format!(
                        "does not match public_keys.{node} (is it another node's key?)"
                    ),
                },
            });
        }
        let peers = peers
            .iter()
            .filter_map(|(n, a)| Some((n.clone(), (*a, *cfg.public_keys.get(n)?))))
            .collect();
        Ok(PeerAuth::new(
            node.to_owned(),
            private,
            psk,
            peers,
            KernelSettings::read(interface).await,
        ))
    }

    /// Credentials from keys in memory (tests, tools).
    pub fn new(
        node: String,
        private: Secret,
        psk: Secret,
        peers: BTreeMap<String, (SocketAddr, PublicKey)>,
        kernel: KernelSettings,
    ) -> PeerAuth {
        PeerAuth {
            node,
            private,
            psk,
            peers,
            kernel,
            refusals: Arc::new(Refusals::default()),
            mismatches: Mutex::new(BTreeMap::new()),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Kernel setting mismatches with peers, one line each, as last seen
    /// when connecting to them or accepting them.
    pub fn warnings(&self) -> Vec<String> {
        let m = self.mismatches.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .flat_map(|(peer, lines)| lines.iter().map(move |l| format!("{peer}: {l}")))
            .collect()
    }

    fn compare_kernel(&self, peer: &str, theirs: &KernelSettings) {
        let lines = self.kernel.differences(peer, theirs);
        let mut m = self.mismatches.lock().unwrap_or_else(|e| e.into_inner());
        let changed = m.get(peer).map_or(!lines.is_empty(), |old| *old != lines);
        if changed {
            for l in &lines {
                tracing::warn!(peer, mismatch = %l, "kernel TCP settings differ: moved sockets may not rebuild the same there");
            }
        }
        if lines.is_empty() {
            m.remove(peer);
        } else {
            m.insert(peer.to_owned(), lines);
        }
    }

    fn hello(&self) -> Vec<u8> {
        postcard::to_allocvec(&Hello {
            node: self.node.clone(),
            kernel: self.kernel.clone(),
        })
        .expect("postcard encoding into a Vec cannot fail")
    }

    /// The node of `[peers]` at `addr`.
    pub fn name_at(&self, addr: SocketAddr) -> Option<&str> {
        self.peers
            .iter()
            .find(|(_, (a, _))| *a == addr)
            .map(|(n, _)| n.as_str())
    }

    /// Connects to node `name`, from `local` if given, and authenticates
    /// both ways.
    pub async fn connect(
        &self,
        name: &str,
        local: Option<IpAddr>,
    ) -> Result<PeerStream, ConnectError> {
        let (addr, key) = *self
            .peers
            .get(name)
            .ok_or_else(|| ConnectError::UnknownNode(name.to_owned()))?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(local) = local {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        let tcp = socket.connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut stream = self.connect_over(name, &key, tcp).await?;
        let refusals = self.refusals.clone();
        stream.on_failure(move || refusals.refuse(addr, Refusal::BadMessage, None));
        Ok(stream)
    }

    /// The initiator's handshake over an already connected transport.
    pub async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        name: &str,
        key: &PublicKey,
        io: S,
    ) -> Result<NoiseStream<S>, ConnectError> {
        let (mut stream, payload) = noise::initiate(io, &self.private, key, &self.psk)
            .await
            .map_err(|source| match source {
                NoiseError::Io(e) => ConnectError::Io(e),
                source => ConnectError::Handshake {
                    node: name.to_owned(),
                    source,
                },
            })?;
        let theirs: Hello =
            baton_core::wire::decode_body(&payload).map_err(|_| ConnectError::Hello {
                node: name.to_owned(),
            })?;
        // Their key authenticated them as `name`: a hello naming another
        // node is a misconfiguration there.
        if theirs.node != name {
            return Err(ConnectError::Hello {
                node: name.to_owned(),
            });
        }
        stream.write_all(&self.hello()).await?;
        stream.flush().await?;
        self.compare_kernel(name, &theirs.kernel);
        Ok(stream)
    }

    /// Authenticates an incoming connection; a refusal is counted and
    /// logged here, and `None` returned: the caller drops the connection.
    pub async fn accept(&self, tcp: TcpStream, from: SocketAddr) -> Option<(PeerStream, String)> {
        let _ = tcp.set_nodelay(true);
        self.accept_over(tcp, from).await
    }

    /// [`PeerAuth::accept`] over any transport.
    pub async fn accept_over<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        from: SocketAddr,
    ) -> Option<(NoiseStream<S>, String)> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.respond(io)).await {
            Err(_) => {
                self.refusals.refuse(from, Refusal::Timeout, None);
                None
            }
            Ok(Err((reason, detail))) => {
                self.refusals.refuse(from, reason, detail.as_deref());
                None
            }
            Ok(Ok((mut stream, name, kernel))) => {
                self.compare_kernel(&name, &kernel);
                let refusals = self.refusals.clone();
                stream.on_failure(move || refusals.refuse(from, Refusal::BadMessage, None));
                Some((stream, name))
            }
        }
    }

    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut io: S,
    ) -> Result<(NoiseStream<S>, String, KernelSettings), (Refusal, Option<String>)> {
        let classify = |e: NoiseError, at_start: bool| match e {
            NoiseError::NotBaton { plain_frame: true } => (Refusal::PlainFrame, None),
            NoiseError::NotBaton { .. } | NoiseError::BadLength(_) => (Refusal::NotBaton, None),
            NoiseError::Handshake if at_start => (Refusal::BadHandshake, None),
            NoiseError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                (Refusal::NotCompleted, None)
            }
            NoiseError::Closed if at_start => (Refusal::NotBaton, Some("closed".into())),
            other => (Refusal::NotCompleted, Some(other.to_string())),
        };
        let (hs, key) = noise::respond_start(&mut io, &self.private, &self.psk)
            .await
            .map_err(|e| classify(e, true))?;
        let Some(name) = self
            .peers
            .iter()
            .find(|(_, (_, k))| *k == key)
            .map(|(n, _)| n.clone())
        else {
            return Err((Refusal::UnknownKey, None));
        };
        let (stream, first) = noise::respond_finish(io, hs, &self.hello())
            .await
            .map_err(|e| classify(e, false))?;
        let hello: Hello = baton_core::wire::decode_body(&first)
            .map_err(|_| (Refusal::NotCompleted, Some("malformed hello".into())))?;
        check_sender(&name, &hello.node).map_err(|e| (Refusal::WrongName, Some(e.to_string())))?;
        Ok((stream, name, hello.kernel))
    }
}

/// A message's claimed sender is not the node its connection authenticated.
#[derive(Debug, thiserror::Error)]
#[error("authenticated as {authenticated}, claims to be {claimed}")]
pub struct WrongSender {
    pub authenticated: String,
    pub claimed: String,
}

/// Every message that names its sender (the hello, and the raft id a raft
/// connection claims, see [`crate::raft::transport`]) is checked against
/// the authenticated node with this.
pub fn check_sender(authenticated: &str, claimed: &str) -> Result<(), WrongSender> {
    if authenticated == claimed {
        Ok(())
    } else {
        Err(WrongSender {
            authenticated: authenticated.to_owned(),
            claimed: claimed.to_owned(),
        })
    }
}

/// What the move protocol needs of its control connection.
pub trait ControlIo: AsyncRead + AsyncWrite + Unpin + Send {
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()>;
}

impl ControlIo for TcpStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::peer_addr(self)
    }
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, nodelay)
    }
}

impl ControlIo for PeerStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.get_ref().peer_addr()
    }
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.get_ref().set_nodelay(nodelay)
    }
}

/// The move protocol's control connection: authenticated between nodes;
/// plain only for in-process move agents built without credentials
/// ([`crate::relocation::MoveConfig::auth`] unset: tests and the
/// move-conns benchmark). `baton node` always authenticates.
#[derive(Debug)]
pub enum ControlStream {
    Plain(TcpStream),
    Authenticated(Box<PeerStream>),
}

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ControlStream::Authenticated(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ControlStream::Authenticated(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ControlStream::Authenticated(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ControlStream::Authenticated(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl ControlStream {
    /// The same connection with its socket registered with the reactor of
    /// the runtime this is called in, so that its readiness no longer
    /// depends on the runtime that accepted it (a raft group's thread
    /// takes its connections over this way).
    pub fn reregister(self) -> io::Result<ControlStream> {
        let move_socket = |s: TcpStream| TcpStream::from_std(s.into_std()?);
        Ok(match self {
            ControlStream::Plain(s) => ControlStream::Plain(move_socket(s)?),
            ControlStream::Authenticated(s) => {
                ControlStream::Authenticated(Box::new((*s).map_io(move_socket)?))
            }
        })
    }
}

impl ControlIo for ControlStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            ControlStream::Plain(s) => s.peer_addr(),
            ControlStream::Authenticated(s) => ControlIo::peer_addr(s.as_ref()),
        }
    }
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            ControlStream::Plain(s) => s.set_nodelay(nodelay),
            ControlStream::Authenticated(s) => ControlIo::set_nodelay(s.as_ref(), nodelay),
        }
    }
}

/// The source's control connection to the target of a move at `target`.
pub async fn connect_control(
    auth: Option<&PeerAuth>,
    local: Option<IpAddr>,
    target: SocketAddr,
) -> io::Result<ControlStream> {
    match auth {
        Some(auth) => {
            let name = auth
                .name_at(target)
                .ok_or(ConnectError::UnknownAddress(target))?
                .to_owned();
            let stream = auth.connect(&name, local).await?;
            Ok(ControlStream::Authenticated(Box::new(stream)))
        }
        None => {
            let socket = if target.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(local) = local {
                socket.bind(SocketAddr::new(local, 0))?;
            }
            Ok(ControlStream::Plain(socket.connect(target).await?))
        }
    }
}

/// The target's side of [`connect_control`] for a dedicated move listener:
/// `None` if the peer was refused (counted and logged).
pub async fn accept_control(auth: Option<&PeerAuth>, tcp: TcpStream) -> Option<ControlStream> {
    match auth {
        None => Some(ControlStream::Plain(tcp)),
        Some(auth) => {
            let from = tcp
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            let (stream, _) = auth.accept(tcp, from).await?;
            Some(ControlStream::Authenticated(Box::new(stream)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_every_time_and_logged_once_per_source_and_reason() {
        let r = Refusals::default();
        let a: SocketAddr = "198.18.2.1:4000".parse().unwrap();
        let b: SocketAddr = "198.18.2.2:4000".parse().unwrap();
        for _ in 0..3 {
            r.refuse(a, Refusal::PlainFrame, None);
        }
        r.refuse(a, Refusal::UnknownKey, None);
        r.refuse(b, Refusal::PlainFrame, None);
        assert_eq!(r.counters.plain_frame.load(Ordering::Relaxed), 4);
        assert_eq!(r.counters.total(), 5);
        let logged = r.logged.lock().unwrap();
        assert_eq!(logged.len(), 3);
        assert_eq!(
            logged[&(a.ip(), Refusal::PlainFrame)].1,
            2,
            "two suppressed"
        );
    }

    #[test]
    fn a_claimed_sender_must_be_the_authenticated_node() {
        assert!(check_sender("node2", "node2").is_ok());
        let e = check_sender("node2", "node3").unwrap_err().to_string();
        assert_eq!(e, "authenticated as node2, claims to be node3");
    }
}
