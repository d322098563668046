//! `baton serve-standalone`: a built-in service run as a plain tokio TCP
//! server, without the baton runtime (no capture, no log, no moves). The
//! benchmarks' baseline: the same service code, served the way any tokio
//! program serves TCP.
//!
//! Each event (connection opened, bytes read, peer closed, timer due) gets
//! its own [`Context`] with the wall clock as its time and a fresh random
//! number as its entropy; the service's outputs are written to the sockets
//! at once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use baton_core::service::{CloseReason, ConnId, Context, Output, Service, TimerId};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::services::{echo::Echo, kv::Kv};

#[derive(Args)]
pub struct StandaloneArgs {
    /// The built-in service to serve: kv or echo.
    #[arg(long, default_value = "kv")]
    kind: String,
    /// Address and port to listen on (0.0.0.0:PORT listens on every
    /// address, a VIP included when it arrives).
    #[arg(long)]
    listen: SocketAddr,
}

/// Runs the server until the process is killed.
pub fn run(args: StandaloneArgs) -> Result<i32> {
    let service: Box<dyn Service> = match args.kind.as_str() {
        "kv" => Box::new(Kv::default()),
        "echo" => Box::new(Echo),
        other => bail!("unknown kind {other:?}: use kv or echo"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(service, args.listen))?;
    Ok(0)
}

/// What a connection's task writes for the service.
enum ToSocket {
    Data(Vec<u8>),
    ShutdownWrite,
    Close,
}

struct Server {
    service: Box<dyn Service>,
    conns: HashMap<ConnId, mpsc::UnboundedSender<ToSocket>>,
    /// Generation of each pending timer: a timer task fires only if its
    /// generation is still the current one.
    timers: HashMap<TimerId, u64>,
    next_generation: u64,
    entropy: u64,
}

type Shared = Rc<RefCell<Server>>;

impl Server {
    /// A context for one event: wall clock time, fresh entropy.
    fn context(&mut self) -> Context {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.entropy = self
            .entropy
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Context::new(now_ms, self.entropy)
    }
}

async fn serve(service: Box<dyn Service>, listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let shared: Shared = Rc::new(RefCell::new(Server {
        service,
        conns: HashMap::new(),
        timers: HashMap::new(),
        next_generation: 0,
        entropy: seed,
    }));
    let mut next_conn: ConnId = 1;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = next_conn;
        next_conn += 1;
        tokio::task::spawn_local(connection(shared.clone(), conn, peer, stream));
    }
}

/// Applies one event's outputs: what goes to `me` is returned (to be
/// written by the caller at once), what goes to other connections is sent
/// to their tasks, timers are armed.
fn dispatch(shared: &Shared, me: ConnId, outputs: Vec<Output>) -> Vec<ToSocket> {
    let mut mine = Vec::new();
    for output in outputs {
        let (conn, write) = match output {
            Output::Send { conn, bytes } => (conn, ToSocket::Data(bytes)),
            Output::Close { conn } => (conn, ToSocket::Close),
            Output::ShutdownWrite { conn } => (conn, ToSocket::ShutdownWrite),
            Output::SetTimer { id, at_ms } => {
                arm_timer(shared, id, at_ms);
                continue;
            }
            Output::CancelTimer { id } => {
                shared.borrow_mut().timers.remove(&id);
                continue;
            }
        };
        if conn == me {
            mine.push(write);
        } else if let Some(tx) = shared.borrow().conns.get(&conn) {
            let _ = tx.send(write);
        }
    }
    mine
}

fn arm_timer(shared: &Shared, id: TimerId, at_ms: u64) {
    let generation = {
        let mut s = shared.borrow_mut();
        s.next_generation += 1;
        let g = s.next_generation;
        s.timers.insert(id, g);
        g
    };
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms))).await;
        let outputs = {
            let mut s = shared.borrow_mut();
            if s.timers.get(&id) != Some(&generation) {
                return;
            }
            s.timers.remove(&id);
            let mut ctx = s.context();
            s.service.on_timer(&mut ctx, id);
            ctx.into_outputs()
        };
        // No connection of its own: everything goes to the others.
        let _ = dispatch(&shared, 0, outputs);
    });
}

/// Writes `writes` to the socket; returns whether reading goes on and
/// whether the connection is done.
async fn write_all(
    stream: &mut TcpStream,
    writes: Vec<ToSocket>,
    write_open: &mut bool,
) -> std::io::Result<bool> {
    for w in writes {
        match w {
            ToSocket::Data(bytes) if *write_open => stream.write_all(&bytes).await?,
            ToSocket::Data(_) => {}
            ToSocket::ShutdownWrite => {
                if *write_open {
                    stream.shutdown().await?;
                    *write_open = false;
                }
            }
            ToSocket::Close => {
                if *write_open {
                    let _ = stream.shutdown().await;
                    *write_open = false;
                }
                return Ok(true);
            }
        }
    }
    Ok(false)
}

async fn connection(shared: Shared, conn: ConnId, peer: SocketAddr, mut stream: TcpStream) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opened = {
        let mut s = shared.borrow_mut();
        s.conns.insert(conn, tx);
        let mut ctx = s.context();
        s.service.on_open(&mut ctx, conn, peer);
        ctx.into_outputs()
    };
    let mut write_open = true;
    let mut read_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = {
        let mine = dispatch(&shared, conn, opened);
        !matches!(
            write_all(&mut stream, mine, &mut write_open).await,
            Ok(false)
        )
    };
    while !done {
        tokio::select! {
            read = stream.read(&mut buf), if read_open => {
                let (outputs, reason) = {
                    let mut s = shared.borrow_mut();
                    let mut ctx = s.context();
                    let reason = match read {
                        Ok(0) => Some(CloseReason::PeerFinished),
                        Ok(n) => {
                            s.service.on_data(&mut ctx, conn, &buf[..n]);
                            None
                        }
                        Err(_) => Some(CloseReason::Reset),
                    };
                    if let Some(reason) = reason {
                        s.service.on_close(&mut ctx, conn, reason);
                    }
                    (ctx.into_outputs(), reason)
                };
                let mine = dispatch(&shared, conn, outputs);
                match reason {
                    Some(CloseReason::Reset) => done = true,
                    Some(CloseReason::PeerFinished) => read_open = false,
                    None => {}
                }
                if !done {
                    done = !matches!(write_all(&mut stream, mine, &mut write_open).await, Ok(false));
                }
                if !read_open && !write_open {
                    done = true;
                }
            }
            Some(write) = rx.recv() => {
                done = !matches!(write_all(&mut stream, vec![write], &mut write_open).await, Ok(false));
                if !read_open && !write_open {
                    done = true;
                }
            }
        }
    }
    shared.borrow_mut().conns.remove(&conn);
}
