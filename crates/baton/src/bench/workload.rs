//! The client workload of `baton bench relocate` and `overhead`: N
//! connections to a Redis-protocol server, each writing and reading its own
//! keys as fast as the server answers, with `pipeline` requests in flight.
//!
//! Each connection alternates `SET bench:C:K VALUE` (its K keys round
//! robin, each value naming the write it comes from) and `GET` of one of
//! its keys the server acknowledged before (chosen at random), and checks
//! every reply: a GET must return the last acknowledged write of the key
//! or a later one. Every reply is time-stamped: the
//! completion time and the latency (from the write of its batch to the
//! reply). On any error (reset, end of stream, no reply within the request
//! timeout) the connection is dropped and made again, immediately and then
//! with a backoff from 5 ms doubling to 200 ms, as a well-written client
//! does. When told to stop, each connection reads back every key the
//! server acknowledged (MGET, in batches) and counts those it can no
//! longer read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use baton_lab::Lab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a batch may wait for its replies before the connection is
/// taken as broken (redis-py's and Jedis's socket timeouts are of this
/// order).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of each value the clients SET, unless told otherwise.
pub const VALUE_BYTES: usize = 32;
/// Keys each connection writes round robin, unless told otherwise.
pub const KEYS_PER_CONNECTION: u64 = 1000;

/// What the workload does.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub target: SocketAddr,
    pub connections: usize,
    /// Requests written at once and in flight (1: one request, wait for its
    /// reply, next).
    pub pipeline: usize,
    pub value_bytes: usize,
    /// Keys each connection writes, round robin (its working set).
    pub keys_per_connection: u64,
    /// How long a batch may wait for its replies before the connection is
    /// taken as broken ([`REQUEST_TIMEOUT`] in every benchmark).
    pub request_timeout: Duration,
}

impl WorkloadConfig {
    /// The benchmarks' workload against `target`: `connections` at
    /// `pipeline`, with the given value size and working set.
    pub fn new(
        target: SocketAddr,
        connections: usize,
        pipeline: usize,
        value_bytes: usize,
        keys_per_connection: u64,
    ) -> WorkloadConfig {
        WorkloadConfig {
            target,
            connections,
            pipeline,
            value_bytes,
            keys_per_connection,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// One completed request.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// Completion time, microseconds since the workload's start.
    pub done_us: u64,
    /// From writing its batch to reading its reply, in microseconds.
    pub latency_us: u32,
}

/// What one connection saw.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Completed requests, in completion order.
    pub records: Vec<Rec>,
    /// Broken connections (reset, end of stream, timeout), failed connects
    /// and error replies.
    pub errors: u64,
    /// When each of those errors happened, microseconds since the start.
    pub error_times_us: Vec<u64>,
    /// Successful connects after the first.
    pub reconnects: u64,
    /// Distinct keys the server acknowledged (SET answered +OK).
    pub keys_written: u64,
    /// Distinct acknowledged keys a read (a GET during the run or the
    /// final read-back) found missing or older than their last acknowledged
    /// write.
    pub keys_lost: u64,
    /// GETs during the run that found an acknowledged key missing or older
    /// than its last acknowledged write.
    pub get_misses: u64,
    /// Replies that were not what the request asks for (wrong value,
    /// unexpected type).
    pub wrong_replies: u64,
    /// The read-back could not be done (no connection).
    pub readback_failed: bool,
}

impl ConnStats {
    /// Counts an error that happened `at_us` after the start.
    fn error(&mut self, at_us: u64) {
        self.errors += 1;
        self.error_times_us.push(at_us);
    }
}

/// Starts the workload on a thread inside `host`. It connects every
/// connection, then calls `ready` and waits for the start signal (the
/// instant its time stamps count from); it runs until `stop` is set, reads
/// back, and returns each connection's stats.
pub struct Workload {
    thread: std::thread::JoinHandle<
        Result<Result<Vec<ConnStats>, String>, baton_net::netns::NetnsError>,
    >,
    go: mpsc::Sender<Instant>,
    stop: Arc<AtomicBool>,
    /// The instant time stamps count from, once started.
    pub start: Option<Instant>,
}

impl Workload {
    /// Connects (inside `host`); returns once every connection is up.
    pub fn connect(lab: &Lab, host: &str, cfg: WorkloadConfig) -> Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (go_tx, go_rx) = mpsc::channel::<Instant>();
        let thread = {
            let stop = stop.clone();
            lab.spawn_in(host, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(run(cfg, stop, ready_tx, go_rx))
            })?
        };
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => Ok(Workload {
                thread,
                go: go_tx,
                stop,
                start: None,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(anyhow!("the client workload could not start: {e}"))
            }
            Err(_) => Err(anyhow!("the client workload did not connect within 60 s")),
        }
    }

    /// Starts sending; time stamps count from the instant returned.
    pub fn go(&mut self) -> Instant {
        let start = Instant::now();
        let _ = self.go.send(start);
        self.start = Some(start);
        start
    }

    /// Stops, waits for the read-back, returns each connection's stats.
    pub fn finish(self) -> Result<Vec<ConnStats>> {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.go);
        self.thread
            .join()
            .map_err(|_| anyhow!("the client workload panicked"))?
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!("client workload: {e}"))
    }
}

async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn run(
    cfg: WorkloadConfig,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<(), String>>,
    go: mpsc::Receiver<Instant>,
) -> Result<Vec<ConnStats>, String> {
    let mut connects = tokio::task::JoinSet::new();
    for i in 0..cfg.connections {
        let target = cfg.target;
        connects.spawn(async move { (i, connect(target).await) });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..cfg.connections).map(|_| None).collect();
    while let Some(joined) = connects.join_next().await {
        let (i, result) = joined.map_err(|e| e.to_string())?;
        match result {
            Ok(s) => streams[i] = Some(s),
            Err(e) => {
                let msg = format!("connecting to {}: {e}", cfg.target);
                let _ = ready.send(Err(msg.clone()));
                return Err(msg);
            }
        }
    }
    let _ = ready.send(Ok(()));
    // Blocking here is fine: nothing else runs on this runtime yet.
    let Ok(start) = go.recv() else {
        return Ok(Vec::new());
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let cfg = cfg.clone();
        let stop = stop.clone();
        tasks.spawn(async move { (i, connection(i, stream, cfg, stop, start).await) });
    }
    let mut stats: Vec<ConnStats> = (0..cfg.connections).map(|_| ConnStats::default()).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, s) = joined.map_err(|e| e.to_string())?;
        stats[i] = s;
    }
    Ok(stats)
}

#[derive(Clone, Copy)]
enum Op {
    /// Write number n, to key n % K.
    Set(u64),
    /// Read key `slot`, whose last acknowledged write was number `min`.
    Get { slot: u64, min: u64 },
}

fn key(conn: usize, slot: u64) -> String {
    format!("bench:{conn}:{slot}")
}

/// The connection and write number a value names.
fn parse_value(v: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(v).ok()?;
    let mut parts = text.split(':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Acknowledged writes of one connection.
struct Acked {
    /// Per key: the last acknowledged write number.
    last: Vec<Option<u64>>,
    /// Keys with an acknowledged write, in first-ack order.
    slots: Vec<u64>,
    /// Keys a read found missing or older than their last acknowledged
    /// write, during the run or at the read-back.
    lost: Vec<bool>,
}

impl Acked {
    fn new(keys: u64) -> Acked {
        Acked {
            last: vec![None; keys as usize],
            slots: Vec::new(),
            lost: vec![false; keys as usize],
        }
    }

    fn ack(&mut self, slot: u64, n: u64) {
        let last = &mut self.last[slot as usize];
        if last.is_none() {
            self.slots.push(slot);
        }
        *last = Some(last.map_or(n, |l| l.max(n)));
    }

    /// Whether `value` read from `slot` is its last acknowledged write or a
    /// later one (a write whose reply was lost may have been applied).
    fn current(&self, id: usize, slot: u64, keys: u64, min: u64, value: &[u8]) -> bool {
        matches!(parse_value(value), Some((c, n)) if c == id && n % keys == slot && n >= min)
    }
}

fn value(conn: usize, n: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{conn}:{n}:").into_bytes();
    v.resize(len.max(v.len()), b'x');
    v
}

fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

async fn connection(
    id: usize,
    mut stream: Option<TcpStream>,
    cfg: WorkloadConfig,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> ConnStats {
    let mut st = ConnStats::default();
    let keys = cfg.keys_per_connection.max(1);
    let mut acked = Acked::new(keys);
    let mut next_write = 0u64;
    let mut op_counter = 0u64;
    let mut rng = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut backoff = Duration::ZERO;
    let mut out = Vec::with_capacity(cfg.pipeline * (64 + cfg.value_bytes));
    let mut ops = Vec::with_capacity(cfg.pipeline);
    let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let Some(s) = stream.as_mut() else {
            if !backoff.is_zero() {
                tokio::time::sleep(backoff).await;
            }
            match connect(cfg.target).await {
                Ok(s) => {
                    stream = Some(s);
                    st.reconnects += 1;
                    backoff = Duration::ZERO;
                }
                Err(_) => {
                    st.error(start.elapsed().as_micros() as u64);
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(5), Duration::from_millis(200));
                }
            }
            continue;
        };
        out.clear();
        ops.clear();
        for _ in 0..cfg.pipeline {
            if op_counter & 1 == 0 || acked.slots.is_empty() {
                let n = next_write;
                next_write += 1;
                push_command(
                    &mut out,
                    &[
                        b"SET",
                        key(id, n % keys).as_bytes(),
                        &value(id, n, cfg.value_bytes),
                    ],
                );
                ops.push(Op::Set(n));
            } else {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slot = acked.slots[(rng % acked.slots.len() as u64) as usize];
                let min = acked.last[slot as usize].unwrap_or(0);
                push_command(&mut out, &[b"GET", key(id, slot).as_bytes()]);
                ops.push(Op::Get { slot, min });
            }
            op_counter += 1;
        }
        let sent = Instant::now();
        inbuf.clear();
        let exchange = async {
            s.write_all(&out).await.map_err(|_| ())?;
            let mut answered = 0;
            let mut chunk = [0u8; 16 * 1024];
            while answered < ops.len() {
                let n = s.read(&mut chunk).await.map_err(|_| ())?;
                if n == 0 {
                    return Err(());
                }
                inbuf.extend_from_slice(&chunk[..n]);
                let now = Instant::now();
                let mut at = 0;
                while answered < ops.len() {
                    match parse_reply(&inbuf[at..]) {
                        Ok(Some((reply, used))) => {
                            at += used;
                            let done_us = now.duration_since(start).as_micros() as u64;
                            st.records.push(Rec {
                                done_us,
                                latency_us: now.duration_since(sent).as_micros() as u32,
                            });
                            let op = ops[answered];
                            check(&mut st, &mut acked, (id, keys), op, reply, done_us);
                            answered += 1;
                        }
                        Ok(None) => break,
                        Err(()) => return Err(()),
                    }
                }
                inbuf.drain(..at);
            }
            Ok(())
        };
        match tokio::time::timeout(cfg.request_timeout, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(())) | Err(_) => {
                st.error(start.elapsed().as_micros() as u64);
                stream = None;
            }
        }
    }
    readback(id, stream, &cfg, &mut acked, &mut st).await;
    st.keys_lost = acked.lost.iter().filter(|l| **l).count() as u64;
    st.keys_written = acked.slots.len() as u64;
    st
}

/// Checks the reply to `op` of connection `id` (with `keys` keys),
/// completed `done_us` after the start.
fn check(
    st: &mut ConnStats,
    acked: &mut Acked,
    (id, keys): (usize, u64),
    op: Op,
    reply: Reply,
    done_us: u64,
) {
    match (op, reply) {
        (_, Reply::Error) => st.error(done_us),
        (Op::Set(n), Reply::Simple(ok)) if ok == b"OK" => acked.ack(n % keys, n),
        (Op::Get { slot, .. }, Reply::Bulk(None)) => {
            st.get_misses += 1;
            acked.lost[slot as usize] = true;
        }
        (Op::Get { slot, min }, Reply::Bulk(Some(v))) if acked.current(id, slot, keys, min, &v) => {
        }
        (Op::Get { slot, .. }, Reply::Bulk(Some(v))) if matches!(parse_value(&v), Some((c, n)) if c == id && n % keys == slot) =>
        {
            // An older write of this key: the newer one was lost.
            st.get_misses += 1;
            acked.lost[slot as usize] = true;
        }
        _ => st.wrong_replies += 1,
    }
}

/// Reads every acknowledged key back (MGET, 100 keys a request) and counts
/// the missing or different ones.
async fn readback(
    id: usize,
    mut stream: Option<TcpStream>,
    cfg: &WorkloadConfig,
    acked: &mut Acked,
    st: &mut ConnStats,
) {
    const BATCH: usize = 100;
    let mut done = 0;
    let mut attempts = 0;
    let keys = cfg.keys_per_connection.max(1);
    while done < acked.slots.len() {
        if stream.is_none() {
            attempts += 1;
            if attempts > 5 {
                st.readback_failed = true;
                return;
            }
            stream = connect(cfg.target).await.ok();
            if stream.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        }
        let Some(s) = stream.as_mut() else { continue };
        let batch = &acked.slots[done..(done + BATCH).min(acked.slots.len())];
        let names: Vec<String> = batch.iter().map(|&n| key(id, n)).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(names.iter().map(|k| k.as_bytes()));
        let mut out = Vec::new();
        push_command(&mut out, &args);
        let exchange = async {
            s.write_all(&out).await.ok()?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                match parse_reply(&buf) {
                    Ok(Some((reply, _))) => return Some(reply),
                    Ok(None) => continue,
                    Err(()) => return None,
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Some(Reply::Array(values))) if values.len() == batch.len() => {
                for (&slot, v) in batch.iter().zip(values) {
                    let min = acked.last[slot as usize].unwrap_or(0);
                    match v {
                        Reply::Bulk(Some(v)) if acked.current(id, slot, keys, min, &v) => {}
                        _ => acked.lost[slot as usize] = true,
                    }
                }
                done += batch.len();
            }
            _ => stream = None,
        }
    }
}

/// A reply, as much as the workload needs of it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Simple(Vec<u8>),
    Error,
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(text: &[u8]) -> Result<i64, ()> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(())
}

/// Parses one RESP2 reply at the start of `buf`: `Ok(Some((reply, bytes
/// used)))`, `Ok(None)` if incomplete, `Err` if malformed.
pub(super) fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ()> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((head, used)) = line(&buf[1..]) else {
        return Ok(None);
    };
    let used = used + 1;
    match kind {
        b'+' => Ok(Some((Reply::Simple(head.to_vec()), used))),
        b'-' => Ok(Some((Reply::Error, used))),
        b':' => Ok(Some((Reply::Integer(number(head)?), used))),
        b'$' => {
            let len = number(head)?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), used)));
            }
            let len = len as usize;
            if buf.len() < used + len + 2 {
                return Ok(None);
            }
            if &buf[used + len..used + len + 2] != b"\r\n" {
                return Err(());
            }
            Ok(Some((
                Reply::Bulk(Some(buf[used..used + len].to_vec())),
                used + len + 2,
            )))
        }
        b'*' => {
            let count = number(head)?;
            if count < 0 {
                return Ok(Some((Reply::Array(Vec::new()), used)));
            }
            let mut at = used;
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                match parse_reply(&buf[at..])? {
                    Some((item, n)) => {
                        items.push(item);
                        at += n;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply(b"+OK\r\n"),
            Ok(Some((Reply::Simple(b"OK".to_vec()), 5)))
        );
        assert_eq!(parse_reply(b"+OK\r"), Ok(None));
        assert_eq!(parse_reply(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(
            parse_reply(b"$3\r\nabc\r\n+"),
            Ok(Some((Reply::Bulk(Some(b"abc".to_vec())), 9)))
        );
        assert_eq!(parse_reply(b"$3\r\nab"), Ok(None));
        assert_eq!(
            parse_reply(b"*2\r\n$1\r\na\r\n$-1\r\n"),
            Ok(Some((
                Reply::Array(vec![Reply::Bulk(Some(b"a".to_vec())), Reply::Bulk(None)]),
                16
            )))
        );
        assert_eq!(parse_reply(b"*2\r\n$1\r\na\r\n"), Ok(None));
        assert_eq!(parse_reply(b"-ERR x\r\n"), Ok(Some((Reply::Error, 8))));
        assert!(parse_reply(b"?x\r\n").is_err());
    }

    #[test]
    fn values_are_per_key() {
        assert_eq!(value(1, 2, 8), b"1:2:xxxx".to_vec());
        assert_ne!(value(1, 2, 8), value(2, 1, 8));
        assert_eq!(parse_value(&value(7, 12, 32)), Some((7, 12)));
        let mut acked = Acked::new(10);
        acked.ack(2, 12);
        acked.ack(2, 2);
        assert_eq!(acked.last[2], Some(12));
        assert_eq!(acked.slots, vec![2]);
        assert!(acked.current(7, 2, 10, 12, &value(7, 12, 32)));
        assert!(acked.current(7, 2, 10, 12, &value(7, 22, 32)));
        assert!(!acked.current(7, 2, 10, 12, &value(7, 2, 32)));
        assert!(!acked.current(7, 2, 10, 12, &value(8, 12, 32)));
        let mut out = Vec::new();
        push_command(&mut out, &[b"GET", b"k"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    }
}
