//! Every command kv knows, a file per family (as mini-redis lays them out):
//! each file parses its commands' arguments and applies them. This module
//! holds the table (name, arity, handler, where it may run) and the error
//! texts they share.

use baton_core::service::{ConnId, Context};

use super::Kv;
use crate::services::resp::{parse_i64, Writer};

pub mod connection;
pub mod hashes;
pub mod keys;
pub mod lists;
pub mod pubsub;
pub mod server;
pub mod sets;
pub mod sorted_sets;
pub mod streams;
pub mod strings;
pub mod transactions;

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const SYNTAX: &str = "ERR syntax error";
pub const NOT_POSITIVE: &str = "ERR value is out of range, must be positive";

/// One command being run: who sent it, its arguments, where its reply goes.
pub struct Call<'a> {
    pub conn: ConnId,
    pub args: &'a [Vec<u8>],
    pub out: &'a mut Writer,
    pub ctx: &'a mut Context,
    /// Run by EXEC: blocking commands answer at once instead of blocking.
    pub in_exec: bool,
}

impl Call<'_> {
    pub fn now(&self) -> u64 {
        self.ctx.now_ms()
    }

    /// Bytes for `target`: in order with this command's reply when it is
    /// the caller itself (a RESP3 client receiving its own PUBLISH).
    pub fn send_to(&mut self, target: ConnId, bytes: &[u8]) {
        if target == self.conn {
            self.out.buf.extend_from_slice(bytes);
        } else {
            self.ctx.send(target, bytes);
        }
    }
}

/// What happens to the connection after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Reply sent; close the connection (QUIT).
    Close,
    /// The connection waits (BLPOP on empty lists): read nothing more until
    /// it is served or times out.
    Block,
}

pub type Handler = fn(&mut Kv, &mut Call) -> Flow;

/// Where a command may run besides the usual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// Allowed in RESP2 subscribed mode.
    PubSub,
    /// Runs at once inside MULTI instead of being queued.
    Control,
    /// Both (QUIT, RESET).
    PubSubControl,
}

pub struct Spec {
    pub name: &'static str,
    /// Redis's arity: `n > 0` exactly `n` arguments (the name included),
    /// `n < 0` at least `-n`.
    pub arity: i32,
    pub kind: Kind,
    pub handler: Handler,
}

const fn cmd(name: &'static str, arity: i32, handler: Handler) -> Spec {
    Spec {
        name,
        arity,
        kind: Kind::Normal,
        handler,
    }
}

const fn with(name: &'static str, arity: i32, kind: Kind, handler: Handler) -> Spec {
    Spec {
        name,
        arity,
        kind,
        handler,
    }
}

pub const COMMANDS: &[Spec] = &[
    // connection
    with("ping", -1, Kind::PubSub, connection::ping),
    cmd("echo", 2, connection::echo),
    cmd("select", 2, connection::select),
    with("quit", -1, Kind::PubSubControl, connection::quit),
    with("reset", 1, Kind::PubSubControl, connection::reset),
    cmd("hello", -1, connection::hello),
    cmd("auth", -2, connection::auth),
    cmd("client", -2, connection::client),
    // strings
    cmd("get", 2, strings::get),
    cmd("set", -3, strings::set),
    cmd("mget", -2, strings::mget),
    cmd("mset", -3, strings::mset),
    cmd("append", 3, strings::append),
    cmd("strlen", 2, strings::strlen),
    cmd("incr", 2, strings::incr),
    cmd("decr", 2, strings::decr),
    cmd("incrby", 3, strings::incrby),
    cmd("decrby", 3, strings::decrby),
    // keys
    cmd("del", -2, keys::del),
    cmd("exists", -2, keys::exists),
    cmd("type", 2, keys::type_),
    cmd("keys", 2, keys::keys),
    cmd("scan", -2, keys::scan),
    cmd("expire", -3, keys::expire),
    cmd("pexpire", -3, keys::pexpire),
    cmd("ttl", 2, keys::ttl),
    cmd("pttl", 2, keys::pttl),
    cmd("persist", 2, keys::persist),
    cmd("dbsize", 1, keys::dbsize),
    cmd("flushall", -1, keys::flush),
    cmd("flushdb", -1, keys::flush),
    // lists
    cmd("lpush", -3, lists::lpush),
    cmd("rpush", -3, lists::rpush),
    cmd("lpop", -2, lists::lpop),
    cmd("rpop", -2, lists::rpop),
    cmd("lrange", 4, lists::lrange),
    cmd("llen", 2, lists::llen),
    cmd("lmove", 5, lists::lmove),
    cmd("blpop", -3, lists::blpop),
    cmd("brpop", -3, lists::brpop),
    cmd("blmove", 6, lists::blmove),
    // hashes
    cmd("hset", -4, hashes::hset),
    cmd("hget", 3, hashes::hget),
    cmd("hdel", -3, hashes::hdel),
    cmd("hgetall", 2, hashes::hgetall),
    cmd("hlen", 2, hashes::hlen),
    cmd("hexists", 3, hashes::hexists),
    cmd("hscan", -3, hashes::hscan),
    // sets
    cmd("sadd", -3, sets::sadd),
    cmd("srem", -3, sets::srem),
    cmd("smembers", 2, sets::smembers),
    cmd("sismember", 3, sets::sismember),
    cmd("scard", 2, sets::scard),
    cmd("spop", -2, sets::spop),
    cmd("sscan", -3, sets::sscan),
    // sorted sets
    cmd("zadd", -4, sorted_sets::zadd),
    cmd("zincrby", 4, sorted_sets::zincrby),
    cmd("zscore", 3, sorted_sets::zscore),
    cmd("zmscore", -3, sorted_sets::zmscore),
    cmd("zcard", 2, sorted_sets::zcard),
    cmd("zcount", 4, sorted_sets::zcount),
    cmd("zlexcount", 4, sorted_sets::zlexcount),
    cmd("zrank", 3, sorted_sets::zrank),
    cmd("zrevrank", 3, sorted_sets::zrevrank),
    cmd("zrem", -3, sorted_sets::zrem),
    cmd("zpopmin", -2, sorted_sets::zpopmin),
    cmd("zpopmax", -2, sorted_sets::zpopmax),
    cmd("zrange", -4, sorted_sets::zrange),
    cmd("zrevrange", -4, sorted_sets::zrevrange),
    cmd("zrangebyscore", -4, sorted_sets::zrangebyscore),
    cmd("zrevrangebyscore", -4, sorted_sets::zrevrangebyscore),
    cmd("zrangebylex", -4, sorted_sets::zrangebylex),
    cmd("zrevrangebylex", -4, sorted_sets::zrevrangebylex),
    cmd("zscan", -3, sorted_sets::zscan),
    // streams
    cmd("xadd", -5, streams::xadd),
    cmd("xtrim", -4, streams::xtrim),
    cmd("xlen", 2, streams::xlen),
    cmd("xrange", -4, streams::xrange),
    cmd("xrevrange", -4, streams::xrevrange),
    cmd("xdel", -3, streams::xdel),
    // transactions
    with("multi", 1, Kind::Control, transactions::multi),
    with("exec", 1, Kind::Control, transactions::exec),
    with("discard", 1, Kind::Control, transactions::discard),
    with("watch", -2, Kind::Control, transactions::watch),
    cmd("unwatch", 1, transactions::unwatch),
    // pub/sub
    with("subscribe", -2, Kind::PubSub, pubsub::subscribe),
    with("unsubscribe", -1, Kind::PubSub, pubsub::unsubscribe),
    with("psubscribe", -2, Kind::PubSub, pubsub::psubscribe),
    with("punsubscribe", -1, Kind::PubSub, pubsub::punsubscribe),
    cmd("publish", 3, pubsub::publish),
    cmd("pubsub", -2, pubsub::pubsub),
    // server
    cmd("config", -2, server::config),
    cmd("command", -1, server::command),
    cmd("info", -1, server::info),
];

pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

pub fn arity_error(out: &mut Writer, name: &str) {
    out.err(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ));
}

/// Redis's text for an unknown command: the name and the first arguments,
/// each cut to 128 bytes in all.
pub fn unknown_command(args: &[Vec<u8>]) -> Vec<u8> {
    let mut msg = b"ERR unknown command '".to_vec();
    msg.extend_from_slice(&args[0][..args[0].len().min(128)]);
    msg.extend_from_slice(b"', with args beginning with: ");
    let mut listed: Vec<u8> = Vec::new();
    for a in &args[1..] {
        if listed.len() >= 128 {
            break;
        }
        let room = 128 - listed.len();
        listed.push(b'\'');
        listed.extend_from_slice(&a[..a.len().min(room)]);
        listed.extend_from_slice(b"' ");
    }
    msg.extend_from_slice(&listed);
    msg
}

pub fn unknown_subcommand(out: &mut Writer, sub: &[u8], command: &str) {
    let mut msg = b"ERR unknown subcommand '".to_vec();
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(format!("'. Try {command} HELP.").as_bytes());
    out.error(&msg);
}

/// A time as Redis's signed milliseconds.
pub fn signed(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// An optional non-negative count argument (`LPOP key [count]`). Redis
/// answers `NOT_POSITIVE` for a count that is no integer too.
pub fn count_arg(arg: Option<&Vec<u8>>) -> Result<Option<u64>, &'static str> {
    match arg {
        None => Ok(None),
        Some(c) => match parse_i64(c) {
            Some(n) if n >= 0 => Ok(Some(n as u64)),
            _ => Err(NOT_POSITIVE),
        },
    }
}

/// `[MATCH pattern] [COUNT n] [TYPE t]` of the SCAN family, from `args`.
pub struct ScanOpts {
    pub pattern: Option<Vec<u8>>,
    pub count: usize,
    pub type_name: Option<Vec<u8>>,
}

/// A cursor as Redis 7.0 reads it (`strtoul`): an optional sign, digits,
/// nothing else; "-1" wraps to the largest cursor, "" is 0.
fn parse_cursor(s: &[u8]) -> Option<u64> {
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() {
        return (s.is_empty()).then_some(0);
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Parses a cursor and the options; `allow_type` for SCAN only.
pub fn scan_opts(
    cursor: &[u8],
    opts: &[Vec<u8>],
    allow_type: bool,
) -> Result<(u64, ScanOpts), &'static str> {
    let cursor = parse_cursor(cursor).ok_or("ERR invalid cursor")?;
    let mut o = ScanOpts {
        pattern: None,
        count: 10,
        type_name: None,
    };
    let mut i = 0;
    while i < opts.len() {
        let name = opts[i].to_ascii_lowercase();
        let Some(value) = opts.get(i + 1) else {
            return Err(SYNTAX);
        };
        match name.as_slice() {
            b"count" => match parse_i64(value) {
                Some(n) if n >= 1 => o.count = usize::try_from(n).unwrap_or(usize::MAX),
                Some(_) => return Err(SYNTAX),
                None => return Err(NOT_INTEGER),
            },
            b"match" => o.pattern = Some(value.clone()),
            b"type" if allow_type => o.type_name = Some(value.to_ascii_lowercase()),
            _ => return Err(SYNTAX),
        }
        i += 2;
    }
    Ok((cursor, o))
}
