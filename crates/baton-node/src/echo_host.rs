//! An echo server whose connections can be parked and handed to another
//! node: the application side of connection moves in tests and in
//! `baton bench move-conns`, until services run under the node runtime.
//!
//! Every byte it receives and sends is recorded per connection in a
//! [`Ledger`] (SHA-256 and counts), shared by the hosts of one process, so a
//! test checks the server's end of each stream across moves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::relocation::Parked;

/// Largest amount of echo output kept in user space per connection; past it
/// the host stops reading, so a client that does not read is pushed back.
const MAX_PENDING: usize = 1 << 20;

/// Per-connection digests of what the server end received and sent.
#[derive(Default)]
pub struct Ledger {
    streams: Mutex<HashMap<u64, StreamDigests>>,
}

#[derive(Default, Clone)]
struct StreamDigests {
    received: Sha256,
    sent: Sha256,
    received_bytes: u64,
    sent_bytes: u64,
}

/// Digest of one direction of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl Ledger {
    fn received(&self, id: u64, data: &[u8]) {
        let mut streams = self.streams.lock().expect("ledger lock");
        let s = streams.entry(id).or_default();
        s.received.update(data);
        s.received_bytes += data.len() as u64;
    }

    fn sent(&self, id: u64, data: &[u8]) {
        let mut streams = self.streams.lock().expect("ledger lock");
        let s = streams.entry(id).or_default();
        s.sent.update(data);
        s.sent_bytes += data.len() as u64;
    }

    /// What the server end of connection `id` received and sent so far.
    pub fn summary(&self, id: u64) -> Option<(StreamSummary, StreamSummary)> {
        let streams = self.streams.lock().expect("ledger lock");
        let s = streams.get(&id)?.clone();
        Some((
            StreamSummary {
                bytes: s.received_bytes,
                sha256: s.received.finalize().into(),
            },
            StreamSummary {
                bytes: s.sent_bytes,
                sha256: s.sent.finalize().into(),
            },
        ))
    }

    /// Total bytes received and sent over all connections.
    pub fn totals(&self) -> (u64, u64) {
        let streams = self.streams.lock().expect("ledger lock");
        streams
            .values()
            .fold((0, 0), |(r, s), d| (r + d.received_bytes, s + d.sent_bytes))
    }
}

pub use crate::runtime::connection_id;

enum HostCommand {
    HandOff(oneshot::Sender<Vec<Parked>>),
    Adopt(Vec<Parked>),
    Count(oneshot::Sender<usize>),
}

/// Controls an echo host running on some thread's tokio runtime.
#[derive(Clone)]
pub struct EchoHostHandle {
    tx: mpsc::UnboundedSender<HostCommand>,
}

impl EchoHostHandle {
    /// Stops serving every connection (accepting those already queued in
    /// the kernel first) and returns them parked: no byte is lost, output
    /// not yet written travels as the connection's application state.
    pub async fn hand_off(&self) -> Vec<Parked> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(HostCommand::HandOff(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Serves connections moved in (or given back after a failed move).
    pub fn adopt(&self, conns: Vec<Parked>) {
        let _ = self.tx.send(HostCommand::Adopt(conns));
    }

    /// Number of connections being served.
    pub async fn count(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(HostCommand::Count(tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

/// An echo host takes moved connections; it has no state of its own.
impl crate::relocation::Taker for EchoHostHandle {
    type Prepared = ();

    fn prepare(
        &mut self,
        _vip: &baton_core::relocation::Vip,
        service: &[u8],
    ) -> Result<(), String> {
        if service.is_empty() {
            Ok(())
        } else {
            Err("an echo host takes connections only, not service state".into())
        }
    }

    fn adopt(&mut self, _prepared: (), conns: Vec<Parked>) {
        EchoHostHandle::adopt(self, conns);
    }
}

/// Runs an echo host on the current tokio runtime: accepts on `listener`
/// (if any) until the handle is dropped.
pub fn spawn(listener: Option<TcpListener>, ledger: Arc<Ledger>) -> EchoHostHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(listener, ledger, rx));
    EchoHostHandle { tx }
}

async fn run(
    listener: Option<TcpListener>,
    ledger: Arc<Ledger>,
    mut commands: mpsc::UnboundedReceiver<HostCommand>,
) {
    let mut conns: JoinSet<Option<Parked>> = JoinSet::new();
    let (park_tx, park_rx) = watch::channel(0u64);
    let mut epoch = 0u64;
    loop {
        tokio::select! {
            accepted = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                if let Ok((stream, peer)) = accepted {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve(connection_id(peer), stream, Vec::new(), ledger.clone(), park_rx.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            command = commands.recv() => match command {
                None => return,
                Some(HostCommand::Count(reply)) => { let _ = reply.send(conns.len()); }
                Some(HostCommand::Adopt(parked)) => {
                    for p in parked {
                        let adopted = p.stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(p.stream));
                        match adopted {
                            Ok(stream) => {
                                conns.spawn(serve(p.id, stream, p.app, ledger.clone(), park_rx.clone()));
                            }
                            Err(e) => tracing::warn!(id = p.id, error = %e, "cannot adopt a connection"),
                        }
                    }
                }
                Some(HostCommand::HandOff(reply)) => {
                    // Connections the kernel completed but we did not accept yet.
                    if let Some(l) = &listener {
                        while let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, l.accept()).await {
                            conns.spawn(serve(connection_id(peer), stream, Vec::new(), ledger.clone(), park_rx.clone()));
                        }
                    }
                    epoch += 1;
                    let _ = park_tx.send(epoch);
                    let mut parked = Vec::new();
                    while let Some(done) = conns.join_next().await {
                        if let Ok(Some(p)) = done {
                            parked.push(p);
                        }
                    }
                    let _ = reply.send(parked);
                }
            }
        }
    }
}

enum Step {
    Park,
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Echoes one connection until it ends (None) or is parked.
async fn serve(
    id: u64,
    mut stream: TcpStream,
    mut pending: Vec<u8>,
    ledger: Arc<Ledger>,
    mut park: watch::Receiver<u64>,
) -> Option<Parked> {
    park.mark_unchanged();
    let mut buf = vec![0u8; 64 * 1024];
    let mut peer_done = false;
    loop {
        if peer_done && pending.is_empty() {
            // The client finished sending and has all its echo: finish too.
            let _ = stream.shutdown().await;
            return None;
        }
        let step = {
            let (mut reader, mut writer) = stream.split();
            tokio::select! {
                biased;
                _ = park.changed() => Step::Park,
                written = writer.write(&pending), if !pending.is_empty() => Step::Wrote(written),
                read = reader.read(&mut buf), if !peer_done && pending.len() < MAX_PENDING => Step::Read(read),
            }
        };
        match step {
            Step::Park => {
                let stream = stream.into_std().ok()?;
                return Some(Parked {
                    id,
                    stream,
                    app: pending,
                });
            }
            Step::Wrote(Ok(n)) => {
                ledger.sent(id, &pending[..n]);
                pending.drain(..n);
            }
            Step::Read(Ok(0)) => peer_done = true,
            Step::Read(Ok(n)) => {
                ledger.received(id, &buf[..n]);
                pending.extend_from_slice(&buf[..n]);
            }
            Step::Wrote(Err(e)) | Step::Read(Err(e)) => {
                tracing::debug!(id, error = %e, "echo connection failed");
                return None;
            }
        }
    }
}
