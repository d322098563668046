//! The encrypted, authenticated byte stream between two nodes:
//! `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` (the pattern WireGuard uses),
//! over any `AsyncRead + AsyncWrite` transport.
//!
//! On the wire: the preamble `BTNZ`, then Noise messages, each prefixed by
//! its length (u16, big endian; at most 65535 bytes). The initiator knows
//! the responder's static key from the configuration; the responder learns
//! the initiator's from message 1 and looks it up in `[public_keys]`; the
//! cluster key is mixed in with message 2. Each transport message carries
//! at most 65519 bytes of plaintext (a 16-byte tag); its nonce is its
//! position in the stream, so a replayed, reordered, dropped or altered
//! message fails authentication and the stream ends there.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::keys::{PublicKey, Secret};

/// What every authenticated peer connection starts with.
pub const PREAMBLE: [u8; 4] = *b"BTNZ";
/// Bound to the handshake: a peer of another protocol version fails it.
const PROLOGUE: &[u8] = b"baton peer protocol 1";
const PATTERN: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
pub const MAX_MESSAGE: usize = 65535;
const TAG_LEN: usize = 16;
/// Largest plaintext of one transport message.
pub const MAX_PLAINTEXT: usize = MAX_MESSAGE - TAG_LEN;
/// Message 1 of IK with an empty payload: e (32), encrypted s (32 + 16),
/// empty encrypted payload (16).
pub const MESSAGE1_LEN: usize = 32 + 32 + TAG_LEN + TAG_LEN;
/// Plaintext a write encrypts before it goes to the socket.
const WRITE_BATCH: usize = 256 * 1024;
const READ_BUFFER: usize = 4 * (2 + MAX_MESSAGE);

pub(crate) fn params() -> snow::params::NoiseParams {
    PATTERN.parse().expect("a valid Noise pattern name")
}

/// Why a handshake or a message failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a baton peer handshake")]
    NotBaton { plain_frame: bool },
    #[error("malformed handshake message ({0} bytes)")]
    BadLength(usize),
    #[error("handshake failed authentication")]
    Handshake,
    #[error("message failed authentication (altered, replayed or wrong cluster key)")]
    Decrypt,
    #[error("peer closed before the handshake completed")]
    Closed,
}

fn snow_setup(e: snow::Error) -> io::Error {
    io::Error::other(format!("noise setup: {e}"))
}

async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, NoiseError> {
    let mut len = [0u8; 2];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(NoiseError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u16::from_be_bytes(len) as usize;
    let mut frame = vec![0u8; len];
    match io.read_exact(&mut frame).await {
        Ok(_) => Ok(frame),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(NoiseError::Closed),
        Err(e) => Err(e.into()),
    }
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Initiator side: proves this node's key and checks the responder's;
/// returns the stream and the responder's handshake payload.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    private: &Secret,
    responder: &PublicKey,
    psk: &Secret,
) -> Result<(NoiseStream<S>, Vec<u8>), NoiseError> {
    let mut hs = snow::Builder::new(params())
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(private.bytes()))
        .and_then(|b| b.remote_public_key(&responder.0))
        .and_then(|b| b.psk(2, psk.bytes()))
        .and_then(|b| b.build_initiator())
        .map_err(snow_setup)?;
    let mut msg = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(&[], &mut msg).map_err(snow_setup)?;
    let mut first = PREAMBLE.to_vec();
    first.extend_from_slice(&framed(&msg[..n]));
    io.write_all(&first).await?;
    io.flush().await?;
    let reply = read_frame(&mut io).await?;
    let mut payload = vec![0u8; MAX_MESSAGE];
    let n = hs
        .read_message(&reply, &mut payload)
        .map_err(|_| NoiseError::Handshake)?;
    payload.truncate(n);
    let transport = hs.into_transport_mode().map_err(snow_setup)?;
    Ok((NoiseStream::new(io, transport), payload))
}

/// Responder side, step 1: reads the preamble and message 1, checks that
/// it is addressed to this node's key and returns the initiator's static
/// key, for the caller to look up before anything else happens.
pub async fn respond_start<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    private: &Secret,
    psk: &Secret,
) -> Result<(snow::HandshakeState, PublicKey), NoiseError> {
    let mut preamble = [0u8; 4];
    match io.read_exact(&mut preamble).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(NoiseError::Closed),
        Err(e) => return Err(e.into()),
    }
    if preamble != PREAMBLE {
        let plain_frame = preamble == baton_core::relocation::MAGIC
            || preamble == crate::control::PEER_MAGIC
            || crate::raft::transport::Channel::of_magic(&preamble).is_some();
        return Err(NoiseError::NotBaton { plain_frame });
    }
    let mut len = [0u8; 2];
    io.read_exact(&mut len).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            NoiseError::Closed
        } else {
            e.into()
        }
    })?;
    let len = u16::from_be_bytes(len) as usize;
    if len != MESSAGE1_LEN {
        return Err(NoiseError::BadLength(len));
    }
    let mut msg = [0u8; MESSAGE1_LEN];
    io.read_exact(&mut msg).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            NoiseError::Closed
        } else {
            e.into()
        }
    })?;
    let mut hs = snow::Builder::new(params())
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(private.bytes()))
        .and_then(|b| b.psk(2, psk.bytes()))
        .and_then(|b| b.build_responder())
        .map_err(snow_setup)?;
    let mut payload = [0u8; MESSAGE1_LEN];
    hs.read_message(&msg, &mut payload)
        .map_err(|_| NoiseError::Handshake)?;
    let mut key = [0u8; 32];
    match hs.get_remote_static() {
        Some(k) if k.len() == 32 => key.copy_from_slice(k),
        _ => return Err(NoiseError::Handshake),
    }
    Ok((hs, PublicKey(key)))
}

/// Responder side, step 2: answers with `payload` (encrypted to the
/// initiator only) and waits for the initiator's first transport message,
/// which proves it holds the cluster key. Returns the stream and that
/// first message.
pub async fn respond_finish<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut hs: snow::HandshakeState,
    payload: &[u8],
) -> Result<(NoiseStream<S>, Vec<u8>), NoiseError> {
    let mut msg = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(payload, &mut msg).map_err(snow_setup)?;
    io.write_all(&framed(&msg[..n])).await?;
    io.flush().await?;
    let transport = hs.into_transport_mode().map_err(snow_setup)?;
    let mut stream = NoiseStream::new(io, transport);
    let first = stream.read_message().await?;
    Ok((stream, first))
}

/// An authenticated, encrypted byte stream (see the module docs). Writes
/// are buffered: call `flush` (as `write_all` + `flush`) to send.
pub struct NoiseStream<S> {
    io: S,
    noise: snow::TransportState,
    raw: Box<[u8]>,
    raw_start: usize,
    raw_end: usize,
    plain: Vec<u8>,
    plain_pos: usize,
    out: Vec<u8>,
    out_pos: usize,
    failed: bool,
    eof: bool,
    /// Called once if a message fails authentication.
    on_failure: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<S> std::fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStream").finish_non_exhaustive()
    }
}

impl<S> NoiseStream<S> {
    fn new(io: S, noise: snow::TransportState) -> NoiseStream<S> {
        NoiseStream {
            io,
            noise,
            raw: vec![0u8; READ_BUFFER].into_boxed_slice(),
            raw_start: 0,
            raw_end: 0,
            plain: Vec::new(),
            plain_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            failed: false,
            eof: false,
            on_failure: None,
        }
    }

    /// Calls `f` (once) when a message fails authentication.
    pub fn on_failure(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.on_failure = Some(Box::new(f));
    }

    fn fail(&mut self) -> io::Error {
        self.failed = true;
        if let Some(f) = self.on_failure.take() {
            f();
        }
        decrypt_error()
    }

    /// The transport underneath.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Whether a message failed authentication (the stream is dead then).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The same session over another transport made from this one (the
    /// same socket registered with another runtime's reactor, say);
    /// buffered bytes, nonces and the failure hook carry over.
    pub fn map_io<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<NoiseStream<T>> {
        Ok(NoiseStream {
            io: f(self.io)?,
            noise: self.noise,
            raw: self.raw,
            raw_start: self.raw_start,
            raw_end: self.raw_end,
            plain: self.plain,
            plain_pos: self.plain_pos,
            out: self.out,
            out_pos: self.out_pos,
            failed: self.failed,
            eof: self.eof,
            on_failure: self.on_failure,
        })
    }
}

fn decrypt_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, NoiseError::Decrypt)
}

impl<S: AsyncRead + Unpin> NoiseStream<S> {
    /// Decrypts the next message into `plain` (appending). Ready(Ok(false))
    /// at a clean end of stream.
    fn poll_next_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if self.failed {
                return Poll::Ready(Err(decrypt_error()));
            }
            let avail = self.raw_end - self.raw_start;
            if avail >= 2 {
                let len =
                    u16::from_be_bytes([self.raw[self.raw_start], self.raw[self.raw_start + 1]])
                        as usize;
                if len < TAG_LEN {
                    return Poll::Ready(Err(self.fail()));
                }
                if avail >= 2 + len {
                    if self.plain_pos > 0 {
                        self.plain.drain(..self.plain_pos);
                        self.plain_pos = 0;
                    }
                    let at = self.plain.len();
                    self.plain.resize(at + len, 0);
                    let frame = &self.raw[self.raw_start + 2..self.raw_start + 2 + len];
                    match self.noise.read_message(frame, &mut self.plain[at..]) {
                        Ok(n) => self.plain.truncate(at + n),
                        Err(_) => {
                            self.plain.truncate(at);
                            return Poll::Ready(Err(self.fail()));
                        }
                    }
                    self.raw_start += 2 + len;
                    return Poll::Ready(Ok(true));
                }
            }
            if self.eof {
                return Poll::Ready(if avail == 0 {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer stream ended inside a message",
                    ))
                });
            }
            if self.raw_start > 0 {
                self.raw.copy_within(self.raw_start..self.raw_end, 0);
                self.raw_end -= self.raw_start;
                self.raw_start = 0;
            }
            let mut buf = ReadBuf::new(&mut self.raw[self.raw_end..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                self.eof = true;
            }
            self.raw_end += n;
        }
    }

    /// Reads one whole transport message (what one write of at most
    /// [`MAX_PLAINTEXT`] bytes sent), or what is left of the current one.
    pub async fn read_message(&mut self) -> io::Result<Vec<u8>> {
        if self.plain_pos >= self.plain.len() {
            self.plain.clear();
            self.plain_pos = 0;
            let more = std::future::poll_fn(|cx| self.poll_next_message(cx)).await?;
            if !more {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    NoiseError::Closed,
                ));
            }
        }
        let out = self.plain[self.plain_pos..].to_vec();
        self.plain.clear();
        self.plain_pos = 0;
        Ok(out)
    }

    /// The next `n` plaintext bytes, without consuming them; fewer only at
    /// the end of the stream.
    pub async fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.plain.len() - self.plain_pos < n {
            let more = std::future::poll_fn(|cx| self.poll_next_message(cx)).await?;
            if !more {
                break;
            }
        }
        let end = (self.plain_pos + n).min(self.plain.len());
        Ok(&self.plain[self.plain_pos..end])
    }
}

impl<S: AsyncWrite + Unpin> NoiseStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.plain_pos >= this.plain.len() {
            this.plain.clear();
            this.plain_pos = 0;
            if !ready!(this.poll_next_message(cx))? {
                return Poll::Ready(Ok(()));
            }
        }
        let n = buf.remaining().min(this.plain.len() - this.plain_pos);
        buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
        this.plain_pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let mut taken = 0;
        while taken < buf.len() && this.out.len() < WRITE_BATCH {
            let chunk = (buf.len() - taken).min(MAX_PLAINTEXT);
            let at = this.out.len();
            this.out.resize(at + 2 + chunk + TAG_LEN, 0);
            let n = this
                .noise
                .write_message(&buf[taken..taken + chunk], &mut this.out[at + 2..])
                .map_err(|e| io::Error::other(format!("encrypting: {e}")))?;
            this.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            this.out.truncate(at + 2 + n);
            taken += chunk;
        }
        // Start sending now; what does not fit goes out on the next write
        // or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::{generate_node_key, Secret};
    use super::*;

    struct Pair {
        a: (Secret, PublicKey),
        b: (Secret, PublicKey),
        psk: Secret,
    }

    fn pair() -> Pair {
        Pair {
            a: generate_node_key().unwrap(),
            b: generate_node_key().unwrap(),
            psk: Secret::random().unwrap(),
        }
    }

    async fn connected(
        p: &Pair,
    ) -> (
        NoiseStream<tokio::io::DuplexStream>,
        NoiseStream<tokio::io::DuplexStream>,
    ) {
        let (x, mut y) = tokio::io::duplex(1 << 20);
        let (bk, psk) = (p.b.0.clone(), p.psk.clone());
        let resp = tokio::spawn(async move {
            let (hs, key) = respond_start(&mut y, &bk, &psk).await.unwrap();
            let (s, first) = respond_finish(y, hs, b"hello-b").await.unwrap();
            (s, key, first)
        });
        let (mut a, payload) = initiate(x, &p.a.0, &p.b.1, &p.psk).await.unwrap();
        assert_eq!(payload, b"hello-b");
        a.write_all(b"hello-a").await.unwrap();
        a.flush().await.unwrap();
        let (b, key, first) = resp.await.unwrap();
        assert_eq!(key, p.a.1);
        assert_eq!(first, b"hello-a");
        (a, b)
    }

    #[tokio::test]
    async fn large_writes_are_chunked_and_arrive_whole() {
        let p = pair();
        let (mut a, mut b) = connected(&p).await;
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.flush().await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_cluster_key_or_node_key_fails_the_handshake() {
        let p = pair();
        // Initiator with another cluster's key: the responder never gets a
        // valid first message.
        let (x, mut y) = tokio::io::duplex(1 << 16);
        let (bk, psk) = (p.b.0.clone(), p.psk.clone());
        let resp = tokio::spawn(async move {
            let (hs, _) = respond_start(&mut y, &bk, &psk).await?;
            respond_finish(y, hs, b"b").await.map(|_| ())
        });
        let other = Secret::random().unwrap();
        let init = initiate(x, &p.a.0, &p.b.1, &other).await;
        assert!(matches!(init, Err(NoiseError::Handshake)), "{init:?}");
        drop(init);
        assert!(resp.await.unwrap().is_err());

        // Initiator addressing another key than the responder's.
        let (x, mut y) = tokio::io::duplex(1 << 16);
        let (bk, psk) = (p.b.0.clone(), p.psk.clone());
        let resp =
            tokio::spawn(async move { respond_start(&mut y, &bk, &psk).await.map(|(_, k)| k) });
        let stranger = generate_node_key().unwrap();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            initiate(x, &p.a.0, &stranger.1, &p.psk),
        )
        .await;
        assert!(matches!(resp.await.unwrap(), Err(NoiseError::Handshake)));
    }

    #[tokio::test]
    async fn plain_frames_and_garbage_are_not_baton() {
        let p = pair();
        for (bytes, plain) in [
            (crate::control::PEER_MAGIC.to_vec(), true),
            (baton_core::relocation::MAGIC.to_vec(), true),
            (b"GET / HTTP/1.1\r\n".to_vec(), false),
        ] {
            let (mut x, mut y) = tokio::io::duplex(1 << 16);
            x.write_all(&bytes).await.unwrap();
            let r = respond_start(&mut y, &p.b.0, &p.psk).await;
            assert!(
                matches!(r, Err(NoiseError::NotBaton { plain_frame }) if plain_frame == plain),
                "{r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_flipped_bit_ends_the_stream() {
        let p = pair();
        let (x, y) = tokio::io::duplex(1 << 20);
        // A relay that flips one byte of the second transport message.
        let (x_relay, mut relay_in) = tokio::io::duplex(1 << 20);
        let bk = p.b.0.clone();
        let psk = p.psk.clone();
        let resp = tokio::spawn(async move {
            let mut y = y;
            let (hs, _) = respond_start(&mut y, &bk, &psk).await.unwrap();
            let (mut s, _) = respond_finish(y, hs, b"").await.unwrap();
            let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let t = told.clone();
            s.on_failure(move || t.store(true, std::sync::atomic::Ordering::Relaxed));
            let mut buf = vec![0u8; 100];
            let r = s.read_exact(&mut buf).await;
            assert!(told.load(std::sync::atomic::Ordering::Relaxed));
            (r.map(|_| ()), s.failed())
        });
        let relay = tokio::spawn(async move {
            let mut x = x;
            let mut seen = 0usize;
            let mut buf = vec![0u8; 4096];
            let (mut xr, mut xw) = tokio::io::split(&mut x);
            let (mut rr, mut rw) = tokio::io::split(&mut relay_in);
            let up = async {
                loop {
                    let n = rr.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    for b in &mut buf[..n] {
                        seen += 1;
                        // preamble 4 + msg1 (2 + 96) + hello (2 + 1 + 16),
                        // then inside the next message.
                        if seen == 4 + 98 + 19 + 10 {
                            *b ^= 0x40;
                        }
                    }
                    xw.write_all(&buf[..n]).await.unwrap();
                }
            };
            let mut back = vec![0u8; 4096];
            let down = async {
                loop {
                    let n = xr.read(&mut back).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if rw.write_all(&back[..n]).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! { _ = up => {}, _ = down => {} }
        });
        let (mut a, _) = initiate(x_relay, &p.a.0, &p.b.1, &p.psk).await.unwrap();
        a.write_all(b"h").await.unwrap();
        a.flush().await.unwrap();
        a.write_all(&[7u8; 100]).await.unwrap();
        a.flush().await.unwrap();
        let (r, failed) = resp.await.unwrap();
        assert!(r.is_err());
        assert!(failed);
        drop(a);
        relay.abort();
    }
}
