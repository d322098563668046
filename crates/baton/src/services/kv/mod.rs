//! `Kv`: a Redis-protocol key-value store as a baton service.
//!
//! It speaks RESP2 and, after `HELLO 3`, RESP3; it answers the common
//! string, key, list, hash, set, sorted-set and stream commands,
//! transactions (MULTI/EXEC with WATCH), SCAN, pub/sub, blocking list
//! pops, and what client libraries send on connect, with Redis's replies
//! and error texts. Pipelined commands are answered in order. Commands
//! live in [`commands`], a file per family; the keyspace in [`db`], the
//! sorted-set and stream values in [`zset`] and [`stream`].
//!
//! Determinism: the store is a pure function of its events. Maps are
//! ordered, time is the event's `ctx.now_ms()` (stream ids given as `*`
//! included), SPOP draws from `ctx.random_u64()`, and blocking timeouts
//! are timers of the log. Keys expire lazily: before the commands of an
//! event run, every key whose deadline is before the event's time is
//! removed, so no command (DBSIZE included) sees one.
//!
//! Everything a client relies on is service state, so it survives a move:
//! keys and deadlines, each connection's partial input, protocol, name,
//! queued transaction, watched keys, subscriptions and the command it is
//! blocked in. The checkpoint holds all of it (see [`checkpoint`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use baton_core::service::{CloseReason, ConnId, Context, RestoreError, Service, TimerId};
use serde::{Deserialize, Serialize};

use super::resp::{Command, Parser, Writer};

mod checkpoint;
pub mod commands;
pub mod db;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod zset;

use commands::{Call, Flow, Kind};
use db::Db;

/// The Redis version kv answers like (INFO, HELLO).
pub const REDIS_VERSION: &str = "7.0.0";

/// A command a blocked connection waits to complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOp {
    /// BLPOP (`left`) / BRPOP.
    Pop { left: bool },
    /// BLMOVE to `dst`.
    Move {
        dst: Vec<u8>,
        from_left: bool,
        to_left: bool,
    },
}

/// A connection waiting in a blocking command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// Order of blocking: the first to block is served first.
    pub seq: u64,
    pub keys: Vec<Vec<u8>>,
    pub op: BlockOp,
    /// When it gives up (log time); `None` waits for ever.
    pub deadline: Option<u64>,
}

/// One client connection's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conn {
    pub parser: Parser,
    pub peer: Option<SocketAddr>,
    pub name: Option<Vec<u8>>,
    /// We asked the runtime to close it (QUIT, protocol error): further
    /// input is ignored.
    pub closing: bool,
    /// The id CLIENT ID and HELLO report (1, 2, ... in order of arrival).
    pub id: u64,
    pub resp3: bool,
    pub lib_name: Option<Vec<u8>>,
    pub lib_ver: Option<Vec<u8>>,
    /// When it connected (log time), for CLIENT LIST's age.
    pub since_ms: u64,
    /// Commands queued since MULTI; `None` outside a transaction.
    pub multi: Option<Vec<Command>>,
    /// A command was refused while queuing: EXEC aborts.
    pub multi_failed: bool,
    pub watched: BTreeSet<Vec<u8>>,
    /// A watched key changed: EXEC fails.
    pub watch_dirty: bool,
    pub channels: BTreeSet<Vec<u8>>,
    pub patterns: BTreeSet<Vec<u8>>,
    pub blocked: Option<Blocked>,
}

impl Conn {
    pub fn subscriptions(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }
}

/// The Redis-protocol key-value store. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    db: Db,
    conns: BTreeMap<ConnId, Conn>,
    next_client_id: u64,
    next_block_seq: u64,
    // Indexes derived from `conns` (rebuilt on restore).
    /// Subscribers of each channel.
    channels: BTreeMap<Vec<u8>, BTreeSet<ConnId>>,
    /// Subscribers of each pattern.
    patterns: BTreeMap<Vec<u8>, BTreeSet<ConnId>>,
    /// Connections watching each key.
    watchers: BTreeMap<Vec<u8>, BTreeSet<ConnId>>,
    /// Connections blocked on each key, by `(seq, conn)`.
    waiting: BTreeMap<Vec<u8>, BTreeSet<(u64, ConnId)>>,
    // Scratch of one event, always empty between events.
    /// Keys pushed to while someone waits on them.
    ready: VecDeque<Vec<u8>>,
    /// Connections served or timed out, whose pipelined input is due.
    unblocked: VecDeque<ConnId>,
}

impl Kv {
    #[cfg(test)]
    pub fn new() -> Kv {
        Kv::default()
    }

    /// Number of keys, counting those past their deadline that no event
    /// has removed yet.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.db.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Number of connections it keeps state for.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn new_conn(&mut self, peer: Option<SocketAddr>, now: u64) -> Conn {
        self.next_client_id += 1;
        Conn {
            peer,
            id: self.next_client_id,
            since_ms: now,
            ..Conn::default()
        }
    }

    /// Runs one command as Redis's `processCommand` does: lookup and arity,
    /// the subscribed-mode and MULTI gates, then the command.
    fn command(
        &mut self,
        ctx: &mut Context,
        conn: ConnId,
        args: &[Vec<u8>],
        out: &mut Writer,
    ) -> Flow {
        if args.is_empty() {
            return Flow::Continue;
        }
        let (in_multi, subscribed_resp2) = match self.conns.get(&conn) {
            Some(c) => (c.multi.is_some(), !c.resp3 && c.subscriptions() > 0),
            None => return Flow::Continue,
        };
        let Some(spec) = commands::lookup(&args[0]) else {
            out.error(&commands::unknown_command(args));
            self.fail_multi(conn);
            return Flow::Continue;
        };
        let argc = args.len() as i64;
        let arity = i64::from(spec.arity);
        if (arity > 0 && argc != arity) || argc < -arity {
            commands::arity_error(out, spec.name);
            self.fail_multi(conn);
            return Flow::Continue;
        }
        if subscribed_resp2 && !matches!(spec.kind, Kind::PubSub | Kind::PubSubControl) {
            out.err(&format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                spec.name
            ));
            return Flow::Continue;
        }
        if in_multi && !matches!(spec.kind, Kind::Control | Kind::PubSubControl) {
            if let Some(queue) = self.conns.get_mut(&conn).and_then(|c| c.multi.as_mut()) {
                queue.push(args.to_vec());
            }
            out.simple(b"QUEUED");
            return Flow::Continue;
        }
        let mut call = Call {
            conn,
            args,
            out,
            ctx,
            in_exec: false,
        };
        (spec.handler)(self, &mut call)
    }

    fn fail_multi(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.multi.is_some() {
                c.multi_failed = true;
            }
        }
    }

    /// After each command: watchers of modified keys are dirtied, clients
    /// blocked on keys that received elements are served.
    fn after_command(&mut self, ctx: &mut Context) {
        loop {
            for key in self.db.take_touched() {
                if let Some(ws) = self.watchers.get(&key) {
                    for w in ws.clone() {
                        if let Some(c) = self.conns.get_mut(&w) {
                            c.watch_dirty = true;
                        }
                    }
                }
            }
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            commands::lists::serve_waiting(self, ctx, &key);
        }
    }

    /// Runs the commands buffered on `conn` until it needs more input,
    /// blocks or closes, and sends what they answered.
    fn run(&mut self, ctx: &mut Context, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let mut out = Writer::new(c.resp3);
        let mut close = false;
        while let Some(c) = self.conns.get_mut(&conn) {
            if c.closing || c.blocked.is_some() {
                break;
            }
            match c.parser.next_command() {
                Ok(Some(args)) => {
                    let flow = self.command(ctx, conn, &args, &mut out);
                    self.after_command(ctx);
                    match flow {
                        Flow::Continue => {}
                        Flow::Block => break,
                        Flow::Close => {
                            close = true;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.buf.extend_from_slice(&e.reply());
                    close = true;
                    break;
                }
            }
        }
        ctx.send(conn, &out.buf);
        if close {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.closing = true;
                // What follows the last command is never read.
                c.parser = Parser::new();
            }
            self.forget_state(ctx, conn);
            ctx.close(conn);
        }
    }

    /// Runs the connections whose wait ended, until none is left.
    fn run_unblocked(&mut self, ctx: &mut Context) {
        while let Some(conn) = self.unblocked.pop_front() {
            self.run(ctx, conn);
        }
    }

    /// Drops what ties a connection to others: subscriptions, watches,
    /// waits (the connection itself stays until its close is logged).
    fn forget_state(&mut self, ctx: &mut Context, conn: ConnId) {
        commands::pubsub::unsubscribe_all(self, conn);
        commands::transactions::unwatch_all(self, conn);
        commands::lists::unblock(self, ctx, conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.multi = None;
            c.multi_failed = false;
        }
    }

    /// Rebuilds the indexes derived from the connections.
    fn reindex(&mut self) {
        self.channels.clear();
        self.patterns.clear();
        self.watchers.clear();
        self.waiting.clear();
        for (id, c) in &self.conns {
            for ch in &c.channels {
                self.channels.entry(ch.clone()).or_default().insert(*id);
            }
            for p in &c.patterns {
                self.patterns.entry(p.clone()).or_default().insert(*id);
            }
            for k in &c.watched {
                self.watchers.entry(k.clone()).or_default().insert(*id);
            }
            if let Some(b) = &c.blocked {
                for k in &b.keys {
                    self.waiting
                        .entry(k.clone())
                        .or_default()
                        .insert((b.seq, *id));
                }
            }
        }
    }
}

impl Service for Kv {
    fn on_open(&mut self, ctx: &mut Context, conn: ConnId, peer: SocketAddr) {
        let c = self.new_conn(Some(peer), ctx.now_ms());
        self.conns.insert(conn, c);
    }

    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
        if !self.conns.contains_key(&conn) {
            // Data for a connection the service never saw open: serve it.
            let c = self.new_conn(None, ctx.now_ms());
            self.conns.insert(conn, c);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        c.parser.feed(data);
        self.db.purge(ctx.now_ms());
        self.after_command(ctx);
        self.run(ctx, conn);
        self.run_unblocked(ctx);
    }

    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, _reason: CloseReason) {
        self.forget_state(ctx, conn);
        let already = self.conns.remove(&conn).is_some_and(|c| c.closing);
        if !already {
            ctx.close(conn);
        }
    }

    fn on_timer(&mut self, ctx: &mut Context, timer: TimerId) {
        // A blocked connection's timer has the connection's id.
        self.db.purge(ctx.now_ms());
        self.after_command(ctx);
        commands::lists::time_out(self, ctx, timer);
        self.run_unblocked(ctx);
    }

    fn checkpoint(&self) -> Vec<u8> {
        checkpoint::encode(self)
    }

    fn restore(bytes: &[u8]) -> Result<Kv, RestoreError> {
        checkpoint::decode(bytes)
    }
}
