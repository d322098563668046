//! The primary's side of one client connection: its kernel socket.
//!
//! The replica decides; this task performs. It writes the service's output
//! to the socket, and reads from it exactly what the replica says the
//! service consumed, comparing byte for byte (the kernel and the replica
//! reassembled the same committed segments). Reading no further keeps the
//! rest in the kernel's receive queue, so TCP's window throttles a client
//! that sends faster than the service applies.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use baton_core::packet::ConnKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// After the service closed a connection, how long its socket waits for
/// the client's FIN (and the replica's `Forget`) before it is dropped, as
/// the kernel's own FIN-WAIT-2 timeout does.
const LINGER_AFTER_CLOSE: Duration = Duration::from_secs(60);

/// What the replica's actions ask of a socket.
#[derive(Debug)]
pub(super) enum ToConn {
    Write(Vec<u8>),
    /// The service consumed these client bytes: read as many, compare.
    Consumed(Vec<u8>),
    Close,
    ShutdownWrite,
    /// Reset the connection (the replica gave up on it).
    Abort,
    /// Another node now answers for the connection: close without a word.
    Vanish,
}

/// What a socket task tells its service loop.
#[derive(Debug)]
pub(super) enum FromConn {
    /// The kernel ended the connection on its own (reset, timeout) while
    /// the replica still had it open.
    Failed { conn: ConnKey, error: String },
    /// The kernel handed up bytes other than the replica's.
    Mismatch { conn: ConnKey, offset: u64 },
}

enum Step {
    Msg(Option<ToConn>),
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Lingered,
}

/// Runs one connection's socket until the replica forgets it (the sender
/// drops), the kernel ends it, or it is aborted or vanished.
pub(super) async fn run(
    conn: ConnKey,
    mut stream: TcpStream,
    mut from_replica: mpsc::UnboundedReceiver<ToConn>,
    to_loop: mpsc::UnboundedSender<FromConn>,
) {
    let mut out: Vec<u8> = Vec::new();
    let mut expected: VecDeque<u8> = VecDeque::new();
    let mut read_total: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut close_after = false;
    let mut shutdown_after = false;
    let mut write_shut = false;
    let mut mismatched = false;
    let mut forgotten = false;
    let linger = tokio::time::sleep(LINGER_AFTER_CLOSE);
    tokio::pin!(linger);
    let mut lingering = false;
    loop {
        if out.is_empty() && (close_after || shutdown_after) && !write_shut {
            let _ = stream.shutdown().await;
            write_shut = true;
            if close_after {
                linger
                    .as_mut()
                    .reset(tokio::time::Instant::now() + LINGER_AFTER_CLOSE);
                lingering = true;
            }
        }
        if forgotten && out.is_empty() {
            return;
        }
        let want = expected.len().min(buf.len());
        let step = {
            let (mut reader, mut writer) = stream.split();
            tokio::select! {
                biased;
                msg = from_replica.recv(), if !forgotten => Step::Msg(msg),
                written = writer.write(&out), if !out.is_empty() => Step::Wrote(written),
                read = reader.read(&mut buf[..want]), if want > 0 => Step::Read(read),
                () = &mut linger, if lingering => Step::Lingered,
            }
        };
        match step {
            Step::Msg(None) => forgotten = true,
            Step::Msg(Some(msg)) => match msg {
                ToConn::Write(bytes) => out.extend_from_slice(&bytes),
                ToConn::Consumed(bytes) => expected.extend(bytes),
                ToConn::Close => close_after = true,
                ToConn::ShutdownWrite => shutdown_after = true,
                ToConn::Abort => {
                    abort(stream);
                    return;
                }
                ToConn::Vanish => {
                    vanish(stream);
                    return;
                }
            },
            Step::Wrote(Ok(n)) => {
                out.drain(..n);
            }
            Step::Read(Ok(0)) => {
                // The client's FIN before bytes the replica had: the kernel
                // and the replica disagree.
                if !mismatched {
                    mismatched = true;
                    let _ = to_loop.send(FromConn::Mismatch {
                        conn,
                        offset: read_total,
                    });
                }
                expected.clear();
            }
            Step::Read(Ok(n)) => {
                let same = expected.drain(..n).eq(buf[..n].iter().copied());
                if !same && !mismatched {
                    mismatched = true;
                    let _ = to_loop.send(FromConn::Mismatch {
                        conn,
                        offset: read_total,
                    });
                }
                read_total += n as u64;
            }
            Step::Wrote(Err(e)) | Step::Read(Err(e)) => {
                if !forgotten {
                    let _ = to_loop.send(FromConn::Failed {
                        conn,
                        error: e.to_string(),
                    });
                }
                return;
            }
            Step::Lingered => return,
        }
    }
}

/// Closes with a RST: the kernel drops the connection at once.
fn abort(stream: TcpStream) {
    let _ = baton_net::listen::reset_on_close(stream.as_fd());
    drop(stream);
}

/// Closes without a FIN or a RST (repair mode), so the client's
/// connection can live on elsewhere.
pub(super) fn vanish(stream: TcpStream) {
    let fd: OwnedFd = match stream.into_std() {
        Ok(s) => s.into(),
        Err(_) => return,
    };
    if let Err(e) = baton_net::repair::close_silently(fd) {
        // Not silent then: better a FIN than a socket that lingers.
        tracing::warn!(error = %e.source, "closing a connection silently");
        drop(e.fd);
    }
}
