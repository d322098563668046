//! `Kv`: a Redis-protocol key-value store as a baton service.
//!
//! It speaks RESP2 and answers the common string, list, hash and set
//! commands, plus what `redis-cli` and `redis-benchmark` send on their own
//! (CONFIG GET, COMMAND, INFO, CLIENT ...), with Redis's replies and error
//! texts. Pipelined commands are answered in order.
//!
//! Determinism: the store is a pure function of its events. Maps are
//! ordered (BTreeMap/BTreeSet), time is the event's `ctx.now_ms()` and
//! SPOP draws from `ctx.random_u64()`. Keys expire lazily: before the
//! commands of an event run, every key whose deadline is before the
//! event's time is removed, so no command (DBSIZE included) sees one.
//!
//! The checkpoint holds everything: keys, deadlines and each connection's
//! partial input.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use baton_core::service::{CloseReason, ConnId, Context, RestoreError, Service};
use serde::{Deserialize, Serialize};

use super::resp::{
    parse_i64, write_array_header, write_bulk, write_error, write_integer, write_null_array,
    write_null_bulk, write_simple, Parser, MAX_BULK_LEN,
};

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
const NOT_POSITIVE: &str = "ERR value is out of range, must be positive";
const OVERFLOW: &str = "ERR increment or decrement would overflow";
const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// Version of the checkpoint format.
const CHECKPOINT_VERSION: u32 = 1;

/// Commands and their arity, as Redis declares it: `n > 0` exactly `n`
/// arguments (the name included), `n < 0` at least `-n`.
const COMMANDS: &[(&str, i32)] = &[
    ("ping", -1),
    ("echo", 2),
    ("select", 2),
    ("quit", -1),
    ("get", 2),
    ("set", -3),
    ("del", -2),
    ("exists", -2),
    ("type", 2),
    ("keys", 2),
    ("incr", 2),
    ("incrby", 3),
    ("decr", 2),
    ("decrby", 3),
    ("mget", -2),
    ("mset", -3),
    ("append", 3),
    ("strlen", 2),
    ("expire", -3),
    ("pexpire", -3),
    ("ttl", 2),
    ("pttl", 2),
    ("persist", 2),
    ("lpush", -3),
    ("rpush", -3),
    ("lpop", -2),
    ("rpop", -2),
    ("lrange", 4),
    ("llen", 2),
    ("hset", -4),
    ("hget", 3),
    ("hdel", -3),
    ("hgetall", 2),
    ("sadd", -3),
    ("srem", -3),
    ("smembers", 2),
    ("sismember", 3),
    ("scard", 2),
    ("spop", -2),
    ("dbsize", 1),
    ("flushall", -1),
    ("flushdb", -1),
    ("config", -2),
    ("command", -1),
    ("info", -1),
    ("client", -2),
];

/// What `CONFIG GET` knows (enough for redis-benchmark and redis-cli).
const CONFIG: &[(&str, &str)] = &[
    ("appendonly", "no"),
    ("bind", "* -::*"),
    ("databases", "1"),
    ("maxclients", "10000"),
    ("maxmemory", "0"),
    ("maxmemory-policy", "noeviction"),
    ("port", "6379"),
    ("proto-max-bulk-len", "536870912"),
    ("save", ""),
    ("timeout", "0"),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Value {
    Str(Vec<u8>),
    List(VecDeque<Vec<u8>>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
}

impl Value {
    fn is_empty_container(&self) -> bool {
        match self {
            Value::Str(_) => false,
            Value::List(l) => l.is_empty(),
            Value::Hash(h) => h.is_empty(),
            Value::Set(s) => s.is_empty(),
        }
    }
}

/// A key of the wrong type for the command.
struct WrongType;

type Hash = BTreeMap<Vec<u8>, Vec<u8>>;

/// The keyspace and its deadlines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Db {
    data: BTreeMap<Vec<u8>, Value>,
    /// Deadline (ms since epoch) of each key that has one.
    expires: BTreeMap<Vec<u8>, u64>,
    /// The same deadlines, earliest first (derived: not checkpointed).
    deadlines: BTreeSet<(u64, Vec<u8>)>,
}

impl Db {
    /// Removes every key whose deadline is before `now` (a key is still
    /// there at its deadline, as in Redis).
    fn purge(&mut self, now: u64) {
        while let Some((at, _)) = self.deadlines.first() {
            if *at >= now {
                break;
            }
            if let Some((_, key)) = self.deadlines.pop_first() {
                self.expires.remove(&key);
                self.data.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Value> {
        self.clear_expire(key);
        self.data.remove(key)
    }

    fn clear_expire(&mut self, key: &[u8]) -> bool {
        match self.expires.remove(key) {
            Some(at) => {
                self.deadlines.remove(&(at, key.to_vec()));
                true
            }
            None => false,
        }
    }

    fn set_expire(&mut self, key: &[u8], at: u64) {
        self.clear_expire(key);
        self.expires.insert(key.to_vec(), at);
        self.deadlines.insert((at, key.to_vec()));
    }

    fn flush(&mut self) {
        *self = Db::default();
    }

    /// Stores a string, dropping the key's deadline unless `keep_ttl`.
    fn set_str(&mut self, key: &[u8], value: Vec<u8>, keep_ttl: bool) {
        if !keep_ttl {
            self.clear_expire(key);
        }
        self.data.insert(key.to_vec(), Value::Str(value));
    }

    fn get_str(&self, key: &[u8]) -> Result<Option<&Vec<u8>>, WrongType> {
        match self.data.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    fn get_list(&mut self, key: &[u8]) -> Result<Option<&mut VecDeque<Vec<u8>>>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::List(l)) => Ok(Some(l)),
            Some(_) => Err(WrongType),
        }
    }

    fn get_hash(&mut self, key: &[u8]) -> Result<Option<&mut Hash>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Hash(h)) => Ok(Some(h)),
            Some(_) => Err(WrongType),
        }
    }

    fn get_set(&mut self, key: &[u8]) -> Result<Option<&mut BTreeSet<Vec<u8>>>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Set(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    /// The value at `key`, created by `make` if missing; `WrongType` if it
    /// is not what `is_kind` accepts.
    fn entry(
        &mut self,
        key: &[u8],
        make: fn() -> Value,
        is_kind: fn(&Value) -> bool,
    ) -> Result<&mut Value, WrongType> {
        let v = self.data.entry(key.to_vec()).or_insert_with(make);
        if is_kind(v) {
            Ok(v)
        } else {
            Err(WrongType)
        }
    }

    /// Removes `key` if it is an empty container (after a pop or delete).
    fn drop_if_empty(&mut self, key: &[u8]) {
        if self.data.get(key).is_some_and(Value::is_empty_container) {
            self.remove(key);
        }
    }
}

/// One client connection's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Conn {
    parser: Parser,
    peer: Option<SocketAddr>,
    name: Option<Vec<u8>>,
    /// We asked the runtime to close it (QUIT, protocol error): further
    /// input is ignored.
    closing: bool,
}

/// What to do with the connection after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// The Redis-protocol key-value store. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    db: Db,
    conns: BTreeMap<ConnId, Conn>,
}

#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    data: &'a BTreeMap<Vec<u8>, Value>,
    expires: &'a BTreeMap<Vec<u8>, u64>,
    conns: &'a BTreeMap<ConnId, Conn>,
}

#[derive(Deserialize)]
struct Snapshot {
    version: u32,
    data: BTreeMap<Vec<u8>, Value>,
    expires: BTreeMap<Vec<u8>, u64>,
    conns: BTreeMap<ConnId, Conn>,
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
        self.db.data.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.db.data.is_empty()
    }

    /// Number of connections it keeps state for.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Runs one command and appends its reply to `out`.
    fn execute(
        &mut self,
        ctx: &mut Context,
        conn: ConnId,
        args: &[Vec<u8>],
        out: &mut Vec<u8>,
    ) -> Flow {
        let Some(first) = args.first() else {
            return Flow::Continue;
        };
        let Some(&(name, arity)) = COMMANDS
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(first))
        else {
            write_error(out, &unknown_command(args));
            return Flow::Continue;
        };
        let argc = args.len() as i64;
        let arity = i64::from(arity);
        if (arity > 0 && argc != arity) || argc < -arity {
            arity_error(out, name);
            return Flow::Continue;
        }
        let now = ctx.now_ms();
        let db = &mut self.db;
        match name {
            "ping" => match args.len() {
                1 => write_simple(out, b"PONG"),
                2 => write_bulk(out, &args[1]),
                _ => arity_error(out, name),
            },
            "echo" => write_bulk(out, &args[1]),
            "select" => match parse_i64(&args[1]) {
                Some(0) => ok(out),
                Some(n) if i32::try_from(n).is_ok() => err(out, "ERR DB index is out of range"),
                _ => err(out, NOT_INTEGER),
            },
            "quit" => {
                ok(out);
                return Flow::Close;
            }
            "get" => match db.get_str(&args[1]) {
                Ok(Some(v)) => write_bulk(out, v),
                Ok(None) => write_null_bulk(out),
                Err(WrongType) => err(out, WRONGTYPE),
            },
            "set" => cmd_set(db, now, args, out),
            "del" => {
                let n = args[1..].iter().filter(|k| db.remove(k).is_some()).count();
                write_integer(out, n as i64);
            }
            "exists" => {
                let n = args[1..]
                    .iter()
                    .filter(|k| db.data.contains_key(*k))
                    .count();
                write_integer(out, n as i64);
            }
            "type" => {
                let t = match db.data.get(&args[1]) {
                    None => "none",
                    Some(Value::Str(_)) => "string",
                    Some(Value::List(_)) => "list",
                    Some(Value::Hash(_)) => "hash",
                    Some(Value::Set(_)) => "set",
                };
                write_simple(out, t.as_bytes());
            }
            "keys" => {
                let keys: Vec<&Vec<u8>> = db
                    .data
                    .keys()
                    .filter(|k| glob_match(&args[1], k, false))
                    .collect();
                write_array_header(out, keys.len());
                for k in keys {
                    write_bulk(out, k);
                }
            }
            "incr" => incr_by(db, &args[1], Some(1), out),
            "decr" => incr_by(db, &args[1], Some(-1), out),
            "incrby" => match parse_i64(&args[2]) {
                Some(n) => incr_by(db, &args[1], Some(n), out),
                None => err(out, NOT_INTEGER),
            },
            "decrby" => match parse_i64(&args[2]) {
                Some(i64::MIN) => err(out, "ERR decrement would overflow"),
                Some(n) => incr_by(db, &args[1], n.checked_neg(), out),
                None => err(out, NOT_INTEGER),
            },
            "mget" => {
                write_array_header(out, args.len() - 1);
                for k in &args[1..] {
                    match db.data.get(k) {
                        Some(Value::Str(v)) => write_bulk(out, v),
                        _ => write_null_bulk(out),
                    }
                }
            }
            "mset" => {
                if !args[1..].chunks_exact(2).remainder().is_empty() {
                    arity_error(out, name);
                } else {
                    for pair in args[1..].chunks(2) {
                        db.set_str(&pair[0], pair[1].clone(), false);
                    }
                    ok(out);
                }
            }
            "append" => match db.get_str(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(current) => {
                    let len = current.map_or(0, Vec::len);
                    if len + args[2].len() > MAX_BULK_LEN {
                        err(out, TOO_BIG);
                    } else if let Some(Value::Str(v)) = db.data.get_mut(&args[1]) {
                        v.extend_from_slice(&args[2]);
                        write_integer(out, v.len() as i64);
                    } else {
                        db.set_str(&args[1], args[2].clone(), true);
                        write_integer(out, args[2].len() as i64);
                    }
                }
            },
            "strlen" => match db.get_str(&args[1]) {
                Ok(v) => write_integer(out, v.map_or(0, Vec::len) as i64),
                Err(WrongType) => err(out, WRONGTYPE),
            },
            "expire" => cmd_expire(db, now, name, 1000, args, out),
            "pexpire" => cmd_expire(db, now, name, 1, args, out),
            "ttl" | "pttl" => {
                let reply = if !db.data.contains_key(&args[1]) {
                    -2
                } else if let Some(&at) = db.expires.get(&args[1]) {
                    let ms = at.saturating_sub(now).min(i64::MAX as u64) as i64;
                    if name == "ttl" {
                        ms.saturating_add(500) / 1000
                    } else {
                        ms
                    }
                } else {
                    -1
                };
                write_integer(out, reply);
            }
            "persist" => {
                let had = db.data.contains_key(&args[1]) && db.clear_expire(&args[1]);
                write_integer(out, i64::from(had));
            }
            "lpush" | "rpush" => {
                let is_list = |v: &Value| matches!(v, Value::List(_));
                match db.entry(&args[1], || Value::List(VecDeque::new()), is_list) {
                    Ok(Value::List(list)) => {
                        for e in &args[2..] {
                            if name == "lpush" {
                                list.push_front(e.clone());
                            } else {
                                list.push_back(e.clone());
                            }
                        }
                        write_integer(out, list.len() as i64);
                    }
                    _ => err(out, WRONGTYPE),
                }
            }
            "lpop" | "rpop" => cmd_pop(db, name, args, out),
            "lrange" => {
                let (Some(start), Some(stop)) = (parse_i64(&args[2]), parse_i64(&args[3])) else {
                    return reply_err(out, NOT_INTEGER);
                };
                match db.get_list(&args[1]) {
                    Err(WrongType) => err(out, WRONGTYPE),
                    Ok(None) => write_array_header(out, 0),
                    Ok(Some(list)) => {
                        let (from, to) = range(start, stop, list.len());
                        write_array_header(out, to - from);
                        for e in list.range(from..to) {
                            write_bulk(out, e);
                        }
                    }
                }
            }
            "llen" => match db.get_list(&args[1]) {
                Ok(l) => write_integer(out, l.map_or(0, |l| l.len()) as i64),
                Err(WrongType) => err(out, WRONGTYPE),
            },
            "hset" => {
                if !args[2..].chunks_exact(2).remainder().is_empty() {
                    arity_error(out, name);
                } else {
                    let is_hash = |v: &Value| matches!(v, Value::Hash(_));
                    match db.entry(&args[1], || Value::Hash(BTreeMap::new()), is_hash) {
                        Ok(Value::Hash(h)) => {
                            let mut added = 0;
                            for pair in args[2..].chunks(2) {
                                if h.insert(pair[0].clone(), pair[1].clone()).is_none() {
                                    added += 1;
                                }
                            }
                            write_integer(out, added);
                        }
                        _ => err(out, WRONGTYPE),
                    }
                }
            }
            "hget" => match db.get_hash(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(h) => match h.and_then(|h| h.get(&args[2])) {
                    Some(v) => write_bulk(out, v),
                    None => write_null_bulk(out),
                },
            },
            "hdel" => match db.get_hash(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(None) => write_integer(out, 0),
                Ok(Some(h)) => {
                    let n = args[2..].iter().filter(|f| h.remove(*f).is_some()).count();
                    db.drop_if_empty(&args[1]);
                    write_integer(out, n as i64);
                }
            },
            "hgetall" => match db.get_hash(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(None) => write_array_header(out, 0),
                Ok(Some(h)) => {
                    write_array_header(out, h.len() * 2);
                    for (f, v) in h.iter() {
                        write_bulk(out, f);
                        write_bulk(out, v);
                    }
                }
            },
            "sadd" => {
                let is_set = |v: &Value| matches!(v, Value::Set(_));
                match db.entry(&args[1], || Value::Set(BTreeSet::new()), is_set) {
                    Ok(Value::Set(set)) => {
                        let n = args[2..]
                            .iter()
                            .filter(|m| set.insert((*m).clone()))
                            .count();
                        write_integer(out, n as i64);
                    }
                    _ => err(out, WRONGTYPE),
                }
            }
            "srem" => match db.get_set(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(None) => write_integer(out, 0),
                Ok(Some(set)) => {
                    let n = args[2..].iter().filter(|m| set.remove(*m)).count();
                    db.drop_if_empty(&args[1]);
                    write_integer(out, n as i64);
                }
            },
            "smembers" => match db.get_set(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(None) => write_array_header(out, 0),
                Ok(Some(set)) => {
                    write_array_header(out, set.len());
                    for m in set.iter() {
                        write_bulk(out, m);
                    }
                }
            },
            "sismember" => match db.get_set(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(set) => write_integer(out, i64::from(set.is_some_and(|s| s.contains(&args[2])))),
            },
            "scard" => match db.get_set(&args[1]) {
                Err(WrongType) => err(out, WRONGTYPE),
                Ok(set) => write_integer(out, set.map_or(0, |s| s.len()) as i64),
            },
            "spop" => cmd_spop(db, ctx, args, out),
            "dbsize" => write_integer(out, db.data.len() as i64),
            "flushall" | "flushdb" => {
                let mode_ok = match args.len() {
                    1 => true,
                    2 => {
                        args[1].eq_ignore_ascii_case(b"sync")
                            || args[1].eq_ignore_ascii_case(b"async")
                    }
                    _ => false,
                };
                if mode_ok {
                    db.flush();
                    ok(out);
                } else {
                    err(out, SYNTAX);
                }
            }
            "config" => cmd_config(args, out),
            "command" => cmd_command(args, out),
            "info" => {
                let text = self.info(args);
                write_bulk(out, text.as_bytes());
            }
            "client" => self.cmd_client(conn, args, out),
            _ => write_error(out, &unknown_command(args)),
        }
        Flow::Continue
    }

    fn info(&self, args: &[Vec<u8>]) -> String {
        let wanted: Vec<String> = args[1..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let all = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| matches!(w.as_str(), "all" | "default" | "everything"));
        let expires = self.db.expires.len();
        let sections: [(&str, String); 6] = [
            (
                "server",
                "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n\
                 os:baton\r\narch_bits:64\r\nserver_name:baton-kv\r\n"
                    .to_string(),
            ),
            (
                "clients",
                format!(
                    "# Clients\r\nconnected_clients:{}\r\nblocked_clients:0\r\n",
                    self.conns.values().filter(|c| !c.closing).count()
                ),
            ),
            (
                "memory",
                "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n".to_string(),
            ),
            (
                "persistence",
                "# Persistence\r\nloading:0\r\naof_enabled:0\r\n".to_string(),
            ),
            (
                "replication",
                "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n".to_string(),
            ),
            (
                "keyspace",
                if self.db.data.is_empty() {
                    "# Keyspace\r\n".to_string()
                } else {
                    format!(
                        "# Keyspace\r\ndb0:keys={},expires={expires},avg_ttl=0\r\n",
                        self.db.data.len()
                    )
                },
            ),
        ];
        let chosen: Vec<&str> = sections
            .iter()
            .filter(|(n, _)| all || wanted.iter().any(|w| w == n))
            .map(|(_, text)| text.as_str())
            .collect();
        chosen.join("\r\n")
    }

    fn cmd_client(&mut self, conn: ConnId, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let sub = args[1].to_ascii_lowercase();
        let wrong_arity = |out: &mut Vec<u8>, sub: &str| arity_error(out, &format!("client|{sub}"));
        match sub.as_slice() {
            b"setname" => {
                if args.len() != 3 {
                    return wrong_arity(out, "setname");
                }
                let name = &args[2];
                if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                    return err(
                        out,
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.name = (!name.is_empty()).then(|| name.clone());
                }
                ok(out);
            }
            b"getname" => {
                if args.len() != 2 {
                    return wrong_arity(out, "getname");
                }
                match self.conns.get(&conn).and_then(|c| c.name.as_ref()) {
                    Some(n) => write_bulk(out, n),
                    None => write_null_bulk(out),
                }
            }
            b"id" => {
                if args.len() != 2 {
                    return wrong_arity(out, "id");
                }
                write_integer(out, conn as i64);
            }
            b"info" | b"list" => {
                let line = |id: ConnId, c: &Conn| {
                    let addr = c.peer.map(|p| p.to_string()).unwrap_or_default();
                    let name = c
                        .name
                        .as_ref()
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .unwrap_or_default();
                    format!("id={id} addr={addr} name={name} db=0\n")
                };
                let text: String = if sub == b"info" {
                    self.conns
                        .get(&conn)
                        .map(|c| line(conn, c))
                        .unwrap_or_default()
                } else {
                    self.conns
                        .iter()
                        .filter(|(_, c)| !c.closing)
                        .map(|(id, c)| line(*id, c))
                        .collect()
                };
                write_bulk(out, text.as_bytes());
            }
            // Everything else (SETINFO, NO-EVICT, REPLY ON, ...) is accepted
            // and ignored, so that client libraries keep going.
            _ => ok(out),
        }
    }
}

/// A time as Redis's signed milliseconds.
fn signed(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn ok(out: &mut Vec<u8>) {
    write_simple(out, b"OK");
}

fn err(out: &mut Vec<u8>, msg: &str) {
    write_error(out, msg.as_bytes());
}

/// `err`, as an expression usable in `return`.
fn reply_err(out: &mut Vec<u8>, msg: &str) -> Flow {
    err(out, msg);
    Flow::Continue
}

fn arity_error(out: &mut Vec<u8>, name: &str) {
    err(
        out,
        &format!("ERR wrong number of arguments for '{name}' command"),
    );
}

/// Redis's text for an unknown command: the name and the first arguments,
/// each cut to 128 bytes in all.
fn unknown_command(args: &[Vec<u8>]) -> Vec<u8> {
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

/// `LRANGE` bounds as Redis computes them: a half-open range of indexes.
fn range(start: i64, stop: i64, len: usize) -> (usize, usize) {
    let len = len as i64;
    let mut start = if start < 0 { len + start } else { start };
    let mut stop = if stop < 0 { len + stop } else { stop };
    if start < 0 {
        start = 0;
    }
    if start > stop || start >= len {
        return (0, 0);
    }
    if stop >= len {
        stop = len - 1;
    }
    (start as usize, stop as usize + 1)
}

fn incr_by(db: &mut Db, key: &[u8], by: Option<i64>, out: &mut Vec<u8>) {
    let Some(by) = by else {
        return err(out, "ERR decrement would overflow");
    };
    let current = match db.get_str(key) {
        Err(WrongType) => return err(out, WRONGTYPE),
        Ok(None) => 0,
        Ok(Some(v)) => match parse_i64(v) {
            Some(n) => n,
            None => return err(out, NOT_INTEGER),
        },
    };
    match current.checked_add(by) {
        Some(n) => {
            // The deadline stays, as in Redis.
            db.set_str(key, n.to_string().into_bytes(), true);
            write_integer(out, n);
        }
        None => err(out, OVERFLOW),
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|KEEPTTL]`.
fn cmd_set(db: &mut Db, now: u64, args: &[Vec<u8>], out: &mut Vec<u8>) {
    #[derive(PartialEq)]
    enum Ttl {
        None,
        Keep,
        Ex(Vec<u8>),
        Px(Vec<u8>),
    }
    let (mut nx, mut xx, mut get) = (false, false, false);
    let mut ttl = Ttl::None;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        let next = args.get(i + 1);
        match (opt.as_slice(), next) {
            (b"nx", _) if !xx => nx = true,
            (b"xx", _) if !nx => xx = true,
            (b"get", _) => get = true,
            (b"keepttl", _) if matches!(ttl, Ttl::None | Ttl::Keep) => ttl = Ttl::Keep,
            (b"ex", Some(v)) if matches!(ttl, Ttl::None | Ttl::Ex(_)) => {
                ttl = Ttl::Ex(v.clone());
                i += 1;
            }
            (b"px", Some(v)) if matches!(ttl, Ttl::None | Ttl::Px(_)) => {
                ttl = Ttl::Px(v.clone());
                i += 1;
            }
            _ => return err(out, SYNTAX),
        }
        i += 1;
    }
    let deadline = match &ttl {
        Ttl::Ex(v) | Ttl::Px(v) => {
            let Some(n) = parse_i64(v) else {
                return err(out, NOT_INTEGER);
            };
            let unit = if matches!(ttl, Ttl::Ex(_)) { 1000 } else { 1 };
            let at = n
                .checked_mul(unit)
                .filter(|ms| *ms > 0)
                .and_then(|ms| ms.checked_add(signed(now)));
            match at {
                Some(at) => Some(at as u64),
                None => return err(out, "ERR invalid expire time in 'set' command"),
            }
        }
        _ => None,
    };
    let key = &args[1];
    let old = match db.data.get(key) {
        None => None,
        Some(Value::Str(v)) => Some(v.clone()),
        Some(_) if get => return err(out, WRONGTYPE),
        Some(_) => Some(Vec::new()),
    };
    let exists = db.data.contains_key(key);
    if (nx && exists) || (xx && !exists) {
        match (get, old) {
            (true, Some(v)) => write_bulk(out, &v),
            _ => write_null_bulk(out),
        }
        return;
    }
    db.set_str(key, args[2].clone(), ttl == Ttl::Keep);
    if let Some(at) = deadline {
        db.set_expire(key, at);
    }
    match (get, old) {
        (false, _) => ok(out),
        (true, Some(v)) => write_bulk(out, &v),
        (true, None) => write_null_bulk(out),
    }
}

/// `EXPIRE key seconds [NX|XX|GT|LT]` (and PEXPIRE with `unit` 1).
fn cmd_expire(db: &mut Db, now: u64, name: &str, unit: i64, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        match opt.to_ascii_lowercase().as_slice() {
            b"nx" => nx = true,
            b"xx" => xx = true,
            b"gt" => gt = true,
            b"lt" => lt = true,
            _ => {
                let mut msg = b"ERR Unsupported option ".to_vec();
                msg.extend_from_slice(opt);
                return write_error(out, &msg);
            }
        }
    }
    if nx && (xx || gt || lt) {
        return err(
            out,
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        );
    }
    if gt && lt {
        return err(
            out,
            "ERR GT and LT options at the same time are not compatible",
        );
    }
    let Some(n) = parse_i64(&args[2]) else {
        return err(out, NOT_INTEGER);
    };
    let Some(when) = n
        .checked_mul(unit)
        .and_then(|ms| ms.checked_add(signed(now)))
    else {
        return err(out, &format!("ERR invalid expire time in '{name}' command"));
    };
    let key = &args[1];
    if !db.data.contains_key(key) {
        return write_integer(out, 0);
    }
    let current = db.expires.get(key).map(|&at| at as i64);
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.is_none_or(|c| when <= c))
        || (lt && current.is_some_and(|c| when >= c));
    if refused {
        return write_integer(out, 0);
    }
    if when <= signed(now) {
        db.remove(key);
    } else {
        db.set_expire(key, when as u64);
    }
    write_integer(out, 1);
}

/// `LPOP key [count]` / `RPOP key [count]`.
fn cmd_pop(db: &mut Db, name: &str, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if args.len() > 3 {
        return arity_error(out, name);
    }
    let count = match args.get(2) {
        None => None,
        Some(c) => match parse_i64(c) {
            Some(n) if n >= 0 => Some(n as u64),
            Some(_) => return err(out, NOT_POSITIVE),
            None => return err(out, NOT_INTEGER),
        },
    };
    let key = &args[1];
    let list = match db.get_list(key) {
        Err(WrongType) => return err(out, WRONGTYPE),
        Ok(None) if count.is_some() => return write_null_array(out),
        Ok(None) => return write_null_bulk(out),
        Ok(Some(l)) => l,
    };
    let pop = |list: &mut VecDeque<Vec<u8>>| {
        if name == "lpop" {
            list.pop_front()
        } else {
            list.pop_back()
        }
    };
    match count {
        None => match pop(list) {
            Some(v) => write_bulk(out, &v),
            None => write_null_bulk(out),
        },
        Some(n) => {
            let n = n.min(list.len() as u64) as usize;
            write_array_header(out, n);
            for _ in 0..n {
                if let Some(v) = pop(list) {
                    write_bulk(out, &v);
                }
            }
        }
    }
    db.drop_if_empty(key);
}

/// `SPOP key [count]`: members drawn with the event's randomness.
fn cmd_spop(db: &mut Db, ctx: &mut Context, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if args.len() > 3 {
        return err(out, SYNTAX);
    }
    let count = match args.get(2) {
        None => None,
        Some(c) => match parse_i64(c) {
            Some(n) if n >= 0 => Some(n as u64),
            Some(_) => return err(out, NOT_POSITIVE),
            None => return err(out, NOT_INTEGER),
        },
    };
    let key = &args[1];
    let set = match db.get_set(key) {
        Err(WrongType) => return err(out, WRONGTYPE),
        Ok(None) if count.is_some() => return write_array_header(out, 0),
        Ok(None) => return write_null_bulk(out),
        Ok(Some(s)) => s,
    };
    match count {
        None => {
            let i = ctx.random_u64().checked_rem(set.len() as u64).unwrap_or(0) as usize;
            if let Some(m) = set.iter().nth(i).cloned() {
                set.remove(&m);
                write_bulk(out, &m);
            }
        }
        Some(n) => {
            let n = n.min(set.len() as u64) as usize;
            // A partial Fisher-Yates shuffle picks n distinct members.
            let mut members: Vec<&Vec<u8>> = set.iter().collect();
            for i in 0..n {
                let j = i + (ctx.random_u64() % (members.len() - i) as u64) as usize;
                members.swap(i, j);
            }
            let chosen: Vec<Vec<u8>> = members[..n].iter().map(|m| (*m).clone()).collect();
            write_array_header(out, n);
            for m in &chosen {
                set.remove(m);
                write_bulk(out, m);
            }
        }
    }
    db.drop_if_empty(key);
}

/// `CONFIG GET pattern...` from a small fixed table; `CONFIG SET`,
/// `RESETSTAT` and `REWRITE` are accepted and change nothing.
fn cmd_config(args: &[Vec<u8>], out: &mut Vec<u8>) {
    let sub = args[1].to_ascii_lowercase();
    let (name, min_args, exact) = match sub.as_slice() {
        b"get" => ("get", 3, false),
        b"set" => ("set", 4, false),
        b"resetstat" => ("resetstat", 2, true),
        b"rewrite" => ("rewrite", 2, true),
        _ => return unknown_subcommand(out, &args[1], "CONFIG"),
    };
    if args.len() < min_args || (exact && args.len() != min_args) {
        return arity_error(out, &format!("config|{name}"));
    }
    if name != "get" {
        return ok(out);
    }
    let found: Vec<&(&str, &str)> = CONFIG
        .iter()
        .filter(|(k, _)| args[2..].iter().any(|p| glob_match(p, k.as_bytes(), true)))
        .collect();
    write_array_header(out, found.len() * 2);
    for (k, v) in found {
        write_bulk(out, k.as_bytes());
        write_bulk(out, v.as_bytes());
    }
}

/// `COMMAND`: no command documentation; clients do without it.
fn cmd_command(args: &[Vec<u8>], out: &mut Vec<u8>) {
    let Some(sub) = args.get(1) else {
        return write_array_header(out, 0);
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"count" => write_integer(out, COMMANDS.len() as i64),
        b"docs" => write_array_header(out, 0),
        b"info" => {
            write_array_header(out, args.len() - 2);
            for _ in &args[2..] {
                write_null_array(out);
            }
        }
        b"list" => {
            write_array_header(out, COMMANDS.len());
            for (name, _) in COMMANDS {
                write_bulk(out, name.as_bytes());
            }
        }
        _ => unknown_subcommand(out, sub, "COMMAND"),
    }
}

fn unknown_subcommand(out: &mut Vec<u8>, sub: &[u8], command: &str) {
    let mut msg = b"ERR unknown subcommand '".to_vec();
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(format!("'. Try {command} HELP.").as_bytes());
    write_error(out, &msg);
}

/// Glob matching as Redis's `stringmatchlen`: `*`, `?`, `[abc]`, `[^a-z]`
/// and `\` escapes. Iterative, so no pattern makes it blow up.
fn glob_match(pattern: &[u8], s: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    // Does the single-character pattern at `p` match `c`? Returns the
    // result and the pattern position after it.
    let single = |p: usize, c: u8| -> (bool, usize) {
        match pattern[p] {
            b'?' => (true, p + 1),
            b'\\' if p + 1 < pattern.len() => (eq(pattern[p + 1], c), p + 2),
            b'[' => {
                let mut i = p + 1;
                let negate = pattern.get(i) == Some(&b'^');
                if negate {
                    i += 1;
                }
                let mut matched = false;
                while i < pattern.len() && pattern[i] != b']' {
                    if pattern[i] == b'\\' && i + 1 < pattern.len() {
                        matched |= eq(pattern[i + 1], c);
                        i += 2;
                    } else if i + 2 < pattern.len()
                        && pattern[i + 1] == b'-'
                        && pattern[i + 2] != b']'
                    {
                        let (mut lo, mut hi) = (pattern[i], pattern[i + 2]);
                        if lo > hi {
                            std::mem::swap(&mut lo, &mut hi);
                        }
                        let c2 = if nocase { c.to_ascii_lowercase() } else { c };
                        let (lo2, hi2) = if nocase {
                            (lo.to_ascii_lowercase(), hi.to_ascii_lowercase())
                        } else {
                            (lo, hi)
                        };
                        matched |= (lo..=hi).contains(&c) || (lo2..=hi2).contains(&c2);
                        i += 3;
                    } else {
                        matched |= eq(pattern[i], c);
                        i += 1;
                    }
                }
                // Past the closing ']' (an unclosed class runs to the end).
                (matched != negate, (i + 1).min(pattern.len()))
            }
            other => (eq(other, c), p + 1),
        }
    };
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last '*': pattern after it, and the next
    // input position it would swallow.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            p += 1;
            star = Some((p, i));
            continue;
        }
        if p < pattern.len() {
            let (m, next) = single(p, s[i]);
            if m {
                p = next;
                i += 1;
                continue;
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Service for Kv {
    fn on_open(&mut self, _ctx: &mut Context, conn: ConnId, peer: SocketAddr) {
        self.conns.insert(
            conn,
            Conn {
                peer: Some(peer),
                ..Conn::default()
            },
        );
    }

    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
        {
            let c = self.conns.entry(conn).or_default();
            if c.closing {
                return;
            }
            c.parser.feed(data);
        }
        self.db.purge(ctx.now_ms());
        let mut out = Vec::new();
        let mut close = false;
        while let Some(c) = self.conns.get_mut(&conn) {
            match c.parser.next_command() {
                Ok(Some(args)) => {
                    if self.execute(ctx, conn, &args, &mut out) == Flow::Close {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.extend_from_slice(&e.reply());
                    close = true;
                    break;
                }
            }
        }
        ctx.send(conn, &out);
        if close {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.closing = true;
                // What follows the last command is never read.
                c.parser = Parser::new();
            }
            ctx.close(conn);
        }
    }

    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, _reason: CloseReason) {
        let already = self.conns.remove(&conn).is_some_and(|c| c.closing);
        if !already {
            ctx.close(conn);
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        let snap = SnapshotRef {
            version: CHECKPOINT_VERSION,
            data: &self.db.data,
            expires: &self.db.expires,
            conns: &self.conns,
        };
        // Serializing owned, in-memory maps to a Vec cannot fail.
        postcard::to_allocvec(&snap).expect("postcard encodes the Kv state")
    }

    fn restore(bytes: &[u8]) -> Result<Kv, RestoreError> {
        let (snap, rest): (Snapshot, &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|e| RestoreError::new(format!("kv checkpoint: {e}")))?;
        if !rest.is_empty() {
            return Err(RestoreError::new(format!(
                "kv checkpoint: {} trailing bytes",
                rest.len()
            )));
        }
        if snap.version != CHECKPOINT_VERSION {
            return Err(RestoreError::new(format!(
                "kv checkpoint version {} (this build reads {CHECKPOINT_VERSION})",
                snap.version
            )));
        }
        if let Some(k) = snap.expires.keys().find(|k| !snap.data.contains_key(*k)) {
            return Err(RestoreError::new(format!(
                "kv checkpoint: deadline for missing key {:?}",
                String::from_utf8_lossy(k)
            )));
        }
        if snap.expires.values().any(|at| *at > i64::MAX as u64) {
            return Err(RestoreError::new("kv checkpoint: deadline out of range"));
        }
        if snap.data.values().any(Value::is_empty_container) {
            return Err(RestoreError::new("kv checkpoint: empty container value"));
        }
        let deadlines = snap
            .expires
            .iter()
            .map(|(k, at)| (*at, k.clone()))
            .collect();
        Ok(Kv {
            db: Db {
                data: snap.data,
                expires: snap.expires,
                deadlines,
            },
            conns: snap.conns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::resp::encode_command;
    use super::*;
    use baton_core::log::{Applier, Event, LogEntry};
    use baton_core::service::Output;

    /// A Kv driven through the Applier, one connection opened.
    struct Harness {
        kv: Kv,
        applier: Applier,
        time_ms: u64,
    }

    const PEER: &str = "127.0.0.1:40000";

    impl Harness {
        fn new() -> Harness {
            let mut h = Harness {
                kv: Kv::new(),
                applier: Applier::default(),
                time_ms: 1_000_000,
            };
            h.event(Event::Opened {
                conn: 1,
                peer: PEER.parse().unwrap(),
            });
            h
        }

        fn event(&mut self, event: Event) -> Vec<Output> {
            let index = self.applier.next_index();
            let entry = LogEntry {
                index,
                time_ms: self.time_ms,
                entropy: index.wrapping_mul(0x9E37),
                event,
            };
            self.applier.apply(&mut self.kv, &entry).unwrap()
        }

        /// Sends raw bytes on connection 1; returns what came back.
        fn raw(&mut self, bytes: &[u8]) -> Vec<Output> {
            self.event(Event::Data {
                conn: 1,
                bytes: bytes.to_vec(),
            })
        }

        /// Runs one command on connection 1; returns the reply as text.
        fn cmd(&mut self, args: &[&str]) -> String {
            let outs = self.raw(&encode_command(args));
            match outs.as_slice() {
                [Output::Send { conn: 1, bytes }] => String::from_utf8_lossy(bytes).into_owned(),
                other => panic!("{args:?}: unexpected outputs {other:?}"),
            }
        }

        fn advance(&mut self, ms: u64) {
            self.time_ms += ms;
        }
    }

    fn arity(name: &str) -> String {
        format!("-ERR wrong number of arguments for '{name}' command\r\n")
    }

    const WT: &str = "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
    const NOTINT: &str = "-ERR value is not an integer or out of range\r\n";

    #[test]
    fn connection_commands() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["PING"]), "+PONG\r\n");
        assert_eq!(h.cmd(&["ping", "hi"]), "$2\r\nhi\r\n");
        assert_eq!(h.cmd(&["PING", "a", "b"]), arity("ping"));
        assert_eq!(h.cmd(&["ECHO", "x y"]), "$3\r\nx y\r\n");
        assert_eq!(h.cmd(&["ECHO"]), arity("echo"));
        assert_eq!(h.cmd(&["SELECT", "0"]), "+OK\r\n");
        assert_eq!(h.cmd(&["SELECT", "1"]), "-ERR DB index is out of range\r\n");
        assert_eq!(h.cmd(&["SELECT", "x"]), NOTINT);
        assert_eq!(
            h.cmd(&["FOO", "a", "b"]),
            "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n"
        );
        assert_eq!(
            h.cmd(&["foo"]),
            "-ERR unknown command 'foo', with args beginning with: \r\n"
        );
        let long = "x".repeat(300);
        let reply = h.cmd(&["nope", &long, "more"]);
        assert_eq!(
            reply,
            format!(
                "-ERR unknown command 'nope', with args beginning with: '{}' \r\n",
                "x".repeat(128)
            )
        );
        assert_eq!(h.cmd(&["GET"]), arity("get"));
        assert_eq!(h.cmd(&["get", "a", "b"]), arity("get"));
    }

    #[test]
    fn strings() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["GET", "a"]), "$-1\r\n");
        assert_eq!(h.cmd(&["SET", "a", "1"]), "+OK\r\n");
        assert_eq!(h.cmd(&["GET", "a"]), "$1\r\n1\r\n");
        assert_eq!(h.cmd(&["SET", "a", "2", "NX"]), "$-1\r\n");
        assert_eq!(h.cmd(&["SET", "b", "2", "XX"]), "$-1\r\n");
        assert_eq!(h.cmd(&["SET", "b", "2", "NX"]), "+OK\r\n");
        assert_eq!(h.cmd(&["SET", "b", "3", "XX", "GET"]), "$1\r\n2\r\n");
        assert_eq!(h.cmd(&["SET", "c", "3", "GET"]), "$-1\r\n");
        assert_eq!(
            h.cmd(&["SET", "a", "1", "NX", "XX"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(h.cmd(&["SET", "a", "1", "EX"]), "-ERR syntax error\r\n");
        assert_eq!(
            h.cmd(&["SET", "a", "1", "EX", "1", "PX", "1"]),
            "-ERR syntax error\r\n"
        );
        assert_eq!(h.cmd(&["SET", "a", "1", "BOGUS"]), "-ERR syntax error\r\n");
        assert_eq!(h.cmd(&["SET", "a", "1", "EX", "x"]), NOTINT);
        for bad in ["0", "-5", "9223372036854775807"] {
            assert_eq!(
                h.cmd(&["SET", "a", "1", "EX", bad]),
                "-ERR invalid expire time in 'set' command\r\n",
                "{bad}"
            );
        }
        assert_eq!(h.cmd(&["SET", "a"]), arity("set"));
        assert_eq!(h.cmd(&["STRLEN", "a"]), ":1\r\n");
        assert_eq!(h.cmd(&["APPEND", "a", "23"]), ":3\r\n");
        assert_eq!(h.cmd(&["APPEND", "new", "xy"]), ":2\r\n");
        assert_eq!(h.cmd(&["GET", "a"]), "$3\r\n123\r\n");
        assert_eq!(h.cmd(&["STRLEN", "zz"]), ":0\r\n");
        assert_eq!(h.cmd(&["MSET", "k1", "v1", "k2", "v2"]), "+OK\r\n");
        assert_eq!(h.cmd(&["MSET", "k1", "v1", "k2"]), arity("mset"));
        assert_eq!(h.cmd(&["LPUSH", "l", "x"]), ":1\r\n");
        assert_eq!(
            h.cmd(&["MGET", "k1", "nope", "l", "k2"]),
            "*4\r\n$2\r\nv1\r\n$-1\r\n$-1\r\n$2\r\nv2\r\n"
        );
        assert_eq!(h.cmd(&["GET", "l"]), WT);
        assert_eq!(h.cmd(&["APPEND", "l", "x"]), WT);
        assert_eq!(h.cmd(&["STRLEN", "l"]), WT);
        assert_eq!(h.cmd(&["SET", "l", "GET"]), "+OK\r\n");
        assert_eq!(h.cmd(&["LPUSH", "l2", "x"]), ":1\r\n");
        assert_eq!(h.cmd(&["SET", "l2", "v", "GET"]), WT);
        assert_eq!(h.cmd(&["TYPE", "l2"]), "+list\r\n");
        assert_eq!(h.cmd(&["TYPE", "l"]), "+string\r\n");
        assert_eq!(h.cmd(&["TYPE", "none"]), "+none\r\n");
        assert_eq!(h.cmd(&["EXISTS", "k1", "k1", "nope"]), ":2\r\n");
        assert_eq!(h.cmd(&["DEL", "k1", "k2", "nope"]), ":2\r\n");
        assert_eq!(h.cmd(&["EXISTS", "k1"]), ":0\r\n");
    }

    #[test]
    fn counters() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["INCR", "c"]), ":1\r\n");
        assert_eq!(h.cmd(&["INCRBY", "c", "10"]), ":11\r\n");
        assert_eq!(h.cmd(&["DECR", "c"]), ":10\r\n");
        assert_eq!(h.cmd(&["DECRBY", "c", "-5"]), ":15\r\n");
        assert_eq!(h.cmd(&["INCRBY", "c", "x"]), NOTINT);
        assert_eq!(h.cmd(&["INCRBY", "c"]), arity("incrby"));
        assert_eq!(h.cmd(&["SET", "s", "abc"]), "+OK\r\n");
        assert_eq!(h.cmd(&["INCR", "s"]), NOTINT);
        assert_eq!(h.cmd(&["SET", "s", " 1"]), "+OK\r\n");
        assert_eq!(h.cmd(&["INCR", "s"]), NOTINT);
        assert_eq!(h.cmd(&["SET", "m", "9223372036854775807"]), "+OK\r\n");
        assert_eq!(
            h.cmd(&["INCR", "m"]),
            "-ERR increment or decrement would overflow\r\n"
        );
        assert_eq!(
            h.cmd(&["DECRBY", "m", "-9223372036854775808"]),
            "-ERR decrement would overflow\r\n"
        );
        assert_eq!(h.cmd(&["SADD", "set", "a"]), ":1\r\n");
        assert_eq!(h.cmd(&["INCR", "set"]), WT);
        // INCR keeps the deadline.
        assert_eq!(h.cmd(&["SET", "t", "1", "EX", "100"]), "+OK\r\n");
        assert_eq!(h.cmd(&["INCR", "t"]), ":2\r\n");
        assert_eq!(h.cmd(&["TTL", "t"]), ":100\r\n");
        // The farthest deadline there is.
        let far = (i64::MAX as u64 - h.time_ms).to_string();
        assert_eq!(h.cmd(&["SET", "far", "1", "PX", &far]), "+OK\r\n");
        assert_eq!(
            h.cmd(&["TTL", "far"]),
            format!(":{}\r\n", (i64::MAX as u64 - h.time_ms) / 1000 + 1)
        );
    }

    #[test]
    fn expiry() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["SET", "a", "1", "PX", "1500"]), "+OK\r\n");
        assert_eq!(h.cmd(&["SET", "b", "1"]), "+OK\r\n");
        assert_eq!(h.cmd(&["TTL", "a"]), ":2\r\n");
        assert_eq!(h.cmd(&["PTTL", "a"]), ":1500\r\n");
        assert_eq!(h.cmd(&["TTL", "b"]), ":-1\r\n");
        assert_eq!(h.cmd(&["TTL", "c"]), ":-2\r\n");
        assert_eq!(h.cmd(&["DBSIZE"]), ":2\r\n");
        h.advance(1500);
        // Still there at its deadline...
        assert_eq!(h.cmd(&["PTTL", "a"]), ":0\r\n");
        assert_eq!(h.cmd(&["DBSIZE"]), ":2\r\n");
        h.advance(1);
        // ...and gone for every command after it.
        assert_eq!(h.cmd(&["DBSIZE"]), ":1\r\n");
        assert_eq!(h.cmd(&["GET", "a"]), "$-1\r\n");
        assert_eq!(h.cmd(&["EXISTS", "a"]), ":0\r\n");
        assert_eq!(h.kv.len(), 1);

        assert_eq!(h.cmd(&["EXPIRE", "b", "10"]), ":1\r\n");
        assert_eq!(h.cmd(&["TTL", "b"]), ":10\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "20", "NX"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "5", "GT"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "20", "GT"]), ":1\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "30", "LT"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "15", "LT"]), ":1\r\n");
        assert_eq!(h.cmd(&["TTL", "b"]), ":15\r\n");
        assert_eq!(h.cmd(&["PERSIST", "b"]), ":1\r\n");
        assert_eq!(h.cmd(&["PERSIST", "b"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "15", "XX"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "15", "GT"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "15", "LT"]), ":1\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "nope", "15"]), ":0\r\n");
        assert_eq!(h.cmd(&["EXPIRE", "b", "x"]), NOTINT);
        assert_eq!(
            h.cmd(&["EXPIRE", "b", "1", "FOO"]),
            "-ERR Unsupported option FOO\r\n"
        );
        assert_eq!(
            h.cmd(&["EXPIRE", "b", "1", "NX", "XX"]),
            "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
        );
        assert_eq!(
            h.cmd(&["EXPIRE", "b", "1", "GT", "LT"]),
            "-ERR GT and LT options at the same time are not compatible\r\n"
        );
        assert_eq!(
            h.cmd(&["EXPIRE", "b", "9223372036854775807"]),
            "-ERR invalid expire time in 'expire' command\r\n"
        );
        assert_eq!(h.cmd(&["EXPIRE", "b"]), arity("expire"));
        // A deadline in the past deletes the key.
        assert_eq!(h.cmd(&["EXPIRE", "b", "-1"]), ":1\r\n");
        assert_eq!(h.cmd(&["EXISTS", "b"]), ":0\r\n");
        // SET drops the deadline, KEEPTTL keeps it.
        assert_eq!(h.cmd(&["SET", "k", "1", "EX", "50"]), "+OK\r\n");
        assert_eq!(h.cmd(&["SET", "k", "2", "KEEPTTL"]), "+OK\r\n");
        assert_eq!(h.cmd(&["TTL", "k"]), ":50\r\n");
        assert_eq!(h.cmd(&["SET", "k", "3"]), "+OK\r\n");
        assert_eq!(h.cmd(&["TTL", "k"]), ":-1\r\n");
        // Expired containers go too; a recreated key has no deadline.
        assert_eq!(h.cmd(&["RPUSH", "l", "a"]), ":1\r\n");
        assert_eq!(h.cmd(&["PEXPIRE", "l", "10"]), ":1\r\n");
        h.advance(11);
        assert_eq!(h.cmd(&["LLEN", "l"]), ":0\r\n");
        assert_eq!(h.cmd(&["RPUSH", "l", "b"]), ":1\r\n");
        assert_eq!(h.cmd(&["TTL", "l"]), ":-1\r\n");
    }

    #[test]
    fn lists() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["LPUSH", "l", "a", "b", "c"]), ":3\r\n");
        assert_eq!(h.cmd(&["RPUSH", "l", "d"]), ":4\r\n");
        assert_eq!(
            h.cmd(&["LRANGE", "l", "0", "-1"]),
            "*4\r\n$1\r\nc\r\n$1\r\nb\r\n$1\r\na\r\n$1\r\nd\r\n"
        );
        assert_eq!(
            h.cmd(&["LRANGE", "l", "-2", "100"]),
            "*2\r\n$1\r\na\r\n$1\r\nd\r\n"
        );
        assert_eq!(h.cmd(&["LRANGE", "l", "3", "1"]), "*0\r\n");
        assert_eq!(h.cmd(&["LRANGE", "l", "10", "20"]), "*0\r\n");
        assert_eq!(h.cmd(&["LRANGE", "l", "-100", "0"]), "*1\r\n$1\r\nc\r\n");
        assert_eq!(h.cmd(&["LRANGE", "l", "a", "0"]), NOTINT);
        assert_eq!(h.cmd(&["LRANGE", "nope", "0", "-1"]), "*0\r\n");
        assert_eq!(h.cmd(&["LRANGE", "l", "0"]), arity("lrange"));
        assert_eq!(h.cmd(&["LLEN", "l"]), ":4\r\n");
        assert_eq!(h.cmd(&["LPOP", "l"]), "$1\r\nc\r\n");
        assert_eq!(h.cmd(&["RPOP", "l"]), "$1\r\nd\r\n");
        assert_eq!(h.cmd(&["LPOP", "l", "0"]), "*0\r\n");
        assert_eq!(
            h.cmd(&["LPOP", "l", "-1"]),
            "-ERR value is out of range, must be positive\r\n"
        );
        assert_eq!(h.cmd(&["LPOP", "l", "x"]), NOTINT);
        assert_eq!(h.cmd(&["LPOP", "l", "1", "2"]), arity("lpop"));
        assert_eq!(h.cmd(&["RPOP", "l", "5"]), "*2\r\n$1\r\na\r\n$1\r\nb\r\n");
        assert_eq!(h.cmd(&["EXISTS", "l"]), ":0\r\n");
        assert_eq!(h.cmd(&["LPOP", "l"]), "$-1\r\n");
        assert_eq!(h.cmd(&["LPOP", "l", "2"]), "*-1\r\n");
        assert_eq!(h.cmd(&["LLEN", "l"]), ":0\r\n");
        assert_eq!(h.cmd(&["SET", "s", "x"]), "+OK\r\n");
        for c in [
            &["LPUSH", "s", "a"][..],
            &["RPUSH", "s", "a"],
            &["LPOP", "s"],
            &["RPOP", "s"],
            &["LLEN", "s"],
            &["LRANGE", "s", "0", "1"],
        ] {
            assert_eq!(h.cmd(c), WT, "{c:?}");
        }
        assert_eq!(h.cmd(&["LPUSH", "s"]), arity("lpush"));
    }

    #[test]
    fn hashes() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["HSET", "h", "f1", "v1", "f2", "v2"]), ":2\r\n");
        assert_eq!(h.cmd(&["HSET", "h", "f1", "w1", "f3", "v3"]), ":1\r\n");
        assert_eq!(h.cmd(&["HSET", "h", "f1", "v1", "f2"]), arity("hset"));
        assert_eq!(h.cmd(&["HSET", "h", "f1"]), arity("hset"));
        assert_eq!(h.cmd(&["HGET", "h", "f1"]), "$2\r\nw1\r\n");
        assert_eq!(h.cmd(&["HGET", "h", "zz"]), "$-1\r\n");
        assert_eq!(h.cmd(&["HGET", "nope", "zz"]), "$-1\r\n");
        assert_eq!(
            h.cmd(&["HGETALL", "h"]),
            "*6\r\n$2\r\nf1\r\n$2\r\nw1\r\n$2\r\nf2\r\n$2\r\nv2\r\n$2\r\nf3\r\n$2\r\nv3\r\n"
        );
        assert_eq!(h.cmd(&["HGETALL", "nope"]), "*0\r\n");
        assert_eq!(h.cmd(&["HDEL", "h", "f1", "f2", "zz"]), ":2\r\n");
        assert_eq!(h.cmd(&["HDEL", "h", "f3"]), ":1\r\n");
        assert_eq!(h.cmd(&["EXISTS", "h"]), ":0\r\n");
        assert_eq!(h.cmd(&["HDEL", "h", "f3"]), ":0\r\n");
        assert_eq!(h.cmd(&["SET", "s", "x"]), "+OK\r\n");
        for c in [
            &["HSET", "s", "a", "b"][..],
            &["HGET", "s", "a"],
            &["HDEL", "s", "a"],
            &["HGETALL", "s"],
        ] {
            assert_eq!(h.cmd(c), WT, "{c:?}");
        }
    }

    #[test]
    fn sets() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["SADD", "s", "b", "a", "c", "a"]), ":3\r\n");
        assert_eq!(h.cmd(&["SADD", "s", "a"]), ":0\r\n");
        assert_eq!(h.cmd(&["SCARD", "s"]), ":3\r\n");
        assert_eq!(h.cmd(&["SISMEMBER", "s", "a"]), ":1\r\n");
        assert_eq!(
            h.cmd(&["SMEMBERS", "s"]),
            "*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
        );
        assert_eq!(h.cmd(&["SREM", "s", "a", "z"]), ":1\r\n");
        assert_eq!(h.cmd(&["SCARD", "nope"]), ":0\r\n");
        assert_eq!(h.cmd(&["SMEMBERS", "nope"]), "*0\r\n");
        assert_eq!(h.cmd(&["SPOP", "nope"]), "$-1\r\n");
        assert_eq!(h.cmd(&["SPOP", "nope", "3"]), "*0\r\n");
        assert_eq!(
            h.cmd(&["SPOP", "s", "-1"]),
            "-ERR value is out of range, must be positive\r\n"
        );
        assert_eq!(h.cmd(&["SPOP", "s", "1", "2"]), "-ERR syntax error\r\n");
        assert_eq!(h.cmd(&["SPOP", "s", "0"]), "*0\r\n");
        let one = h.cmd(&["SPOP", "s"]);
        assert!(one == "$1\r\nb\r\n" || one == "$1\r\nc\r\n", "{one}");
        assert_eq!(h.cmd(&["SCARD", "s"]), ":1\r\n");
        let rest = h.cmd(&["SPOP", "s", "5"]);
        assert!(rest.starts_with("*1\r\n"), "{rest}");
        assert_eq!(h.cmd(&["EXISTS", "s"]), ":0\r\n");
        // SPOP with a count returns distinct members, all from the set.
        let members: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
        let mut sadd = vec!["SADD", "big"];
        sadd.extend(members.iter().map(String::as_str));
        assert_eq!(h.cmd(&sadd), ":50\r\n");
        let popped = h.cmd(&["SPOP", "big", "20"]);
        let mut parser = crate::services::resp::Parser::new();
        // A reply array parses like a request.
        let (cmds, _) = parser.parse_all(popped.as_bytes());
        let got: BTreeSet<Vec<u8>> = cmds[0].iter().cloned().collect();
        assert_eq!(got.len(), 20);
        assert!(got
            .iter()
            .all(|m| members.iter().any(|x| x.as_bytes() == m)));
        assert_eq!(h.cmd(&["SCARD", "big"]), ":30\r\n");
        assert_eq!(h.cmd(&["SET", "str", "x"]), "+OK\r\n");
        for c in [
            &["SADD", "str", "a"][..],
            &["SREM", "str", "a"],
            &["SMEMBERS", "str"],
            &["SCARD", "str"],
            &["SPOP", "str"],
            &["SISMEMBER", "str", "a"],
        ] {
            assert_eq!(h.cmd(c), WT, "{c:?}");
        }
    }

    #[test]
    fn keyspace_and_server_commands() {
        let mut h = Harness::new();
        assert_eq!(h.cmd(&["MSET", "a1", "1", "a2", "2", "b", "3"]), "+OK\r\n");
        assert_eq!(h.cmd(&["DBSIZE"]), ":3\r\n");
        assert_eq!(h.cmd(&["KEYS", "a*"]), "*2\r\n$2\r\na1\r\n$2\r\na2\r\n");
        assert_eq!(h.cmd(&["KEYS", "?"]), "*1\r\n$1\r\nb\r\n");
        assert_eq!(h.cmd(&["KEYS", "[ab]1"]), "*1\r\n$2\r\na1\r\n");
        assert_eq!(h.cmd(&["FLUSHALL", "bogus"]), "-ERR syntax error\r\n");
        assert_eq!(h.cmd(&["FLUSHALL", "ASYNC"]), "+OK\r\n");
        assert_eq!(h.cmd(&["DBSIZE"]), ":0\r\n");
        assert_eq!(h.cmd(&["DBSIZE", "x"]), arity("dbsize"));

        assert_eq!(
            h.cmd(&["CONFIG", "GET", "save"]),
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(
            h.cmd(&["CONFIG", "GET", "appendonly"]),
            "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
        );
        assert_eq!(
            h.cmd(&["config", "get", "MAXMEMORY*"]),
            "*4\r\n$9\r\nmaxmemory\r\n$1\r\n0\r\n$16\r\nmaxmemory-policy\r\n$10\r\nnoeviction\r\n"
        );
        assert_eq!(h.cmd(&["CONFIG", "GET", "nothing"]), "*0\r\n");
        assert_eq!(h.cmd(&["CONFIG", "GET"]), arity("config|get"));
        assert_eq!(h.cmd(&["CONFIG"]), arity("config"));
        assert_eq!(
            h.cmd(&["CONFIG", "FOO"]),
            "-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n"
        );
        assert_eq!(h.cmd(&["CONFIG", "SET", "save", ""]), "+OK\r\n");

        assert_eq!(h.cmd(&["COMMAND"]), "*0\r\n");
        assert_eq!(h.cmd(&["COMMAND", "DOCS"]), "*0\r\n");
        assert_eq!(
            h.cmd(&["COMMAND", "COUNT"]),
            format!(":{}\r\n", COMMANDS.len())
        );
        assert_eq!(h.cmd(&["COMMAND", "INFO", "get"]), "*1\r\n*-1\r\n");

        let info = h.cmd(&["INFO"]);
        assert!(info.starts_with('$'), "{info}");
        assert!(info.contains("redis_version:7.0.0\r\n"));
        assert!(info.contains("# Keyspace"));
        let server = h.cmd(&["INFO", "server"]);
        assert!(server.contains("redis_version:7.0.0") && !server.contains("# Clients"));

        assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), "$-1\r\n");
        assert_eq!(h.cmd(&["CLIENT", "SETNAME", "me"]), "+OK\r\n");
        assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), "$2\r\nme\r\n");
        assert_eq!(
            h.cmd(&["CLIENT", "SETNAME", "a b"]),
            "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(h.cmd(&["CLIENT", "SETNAME"]), arity("client|setname"));
        assert_eq!(h.cmd(&["CLIENT", "ID"]), ":1\r\n");
        assert_eq!(h.cmd(&["CLIENT", "SETINFO", "lib-name", "x"]), "+OK\r\n");
        let list = h.cmd(&["CLIENT", "LIST"]);
        assert!(list.contains("id=1 addr=127.0.0.1:40000 name=me"), "{list}");
        assert_eq!(h.cmd(&["CLIENT"]), arity("client"));
    }

    #[test]
    fn pipelining_and_inline() {
        let mut h = Harness::new();
        let mut batch = encode_command(&["SET", "a", "1"]);
        batch.extend(b"PING\r\nGET a\r\n");
        batch.extend(encode_command(&["INCR", "a"]));
        batch.extend(b"*2\r\n$3\r\nGET\r\n$1\r\n");
        let outs = h.raw(&batch);
        assert_eq!(
            outs,
            vec![Output::Send {
                conn: 1,
                bytes: b"+OK\r\n+PONG\r\n$1\r\n1\r\n:2\r\n".to_vec()
            }]
        );
        // The rest of the last command.
        assert_eq!(h.raw(b"a\r"), vec![]);
        assert_eq!(
            h.raw(b"\n"),
            vec![Output::Send {
                conn: 1,
                bytes: b"$1\r\n2\r\n".to_vec()
            }]
        );
    }

    #[test]
    fn quit_and_protocol_errors_close() {
        let mut h = Harness::new();
        let outs = h.raw(b"PING\r\nQUIT\r\nPING\r\n");
        assert_eq!(
            outs,
            vec![
                Output::Send {
                    conn: 1,
                    bytes: b"+PONG\r\n+OK\r\n".to_vec()
                },
                Output::Close { conn: 1 }
            ]
        );
        // Input after the close is ignored; the peer's FIN forgets it.
        assert_eq!(h.raw(b"PING\r\n"), vec![]);
        assert_eq!(
            h.event(Event::Closed {
                conn: 1,
                reason: CloseReason::PeerFinished
            }),
            vec![]
        );
        assert_eq!(h.kv.connections(), 0);

        h.event(Event::Opened {
            conn: 2,
            peer: PEER.parse().unwrap(),
        });
        let outs = h.event(Event::Data {
            conn: 2,
            bytes: b"PING\r\n*1\r\n$x\r\nPING\r\n".to_vec(),
        });
        assert_eq!(
            outs,
            vec![
                Output::Send {
                    conn: 2,
                    bytes: b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n".to_vec()
                },
                Output::Close { conn: 2 }
            ]
        );
        // A peer that closes first is closed and forgotten.
        h.event(Event::Opened {
            conn: 3,
            peer: PEER.parse().unwrap(),
        });
        h.event(Event::Data {
            conn: 3,
            bytes: b"*2\r\n".to_vec(),
        });
        assert_eq!(
            h.event(Event::Closed {
                conn: 3,
                reason: CloseReason::PeerFinished
            }),
            vec![Output::Close { conn: 3 }]
        );
        assert!(!h.kv.conns.contains_key(&3));
    }

    #[test]
    fn checkpoint_round_trip_and_garbage() {
        let mut h = Harness::new();
        h.cmd(&["SET", "a", "1", "EX", "10"]);
        h.cmd(&["RPUSH", "l", "x", "y"]);
        h.cmd(&["HSET", "h", "f", "v"]);
        h.cmd(&["SADD", "s", "m"]);
        h.raw(b"*2\r\n$3\r\nGET\r\n$1");
        let bytes = h.kv.checkpoint();
        let restored = Kv::restore(&bytes).unwrap();
        assert_eq!(restored, h.kv);
        assert_eq!(restored.checkpoint(), bytes);

        assert!(Kv::restore(&[]).is_err());
        assert!(Kv::restore(b"garbage").is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Kv::restore(&trailing).is_err());
        // Every truncation and every single-byte change is refused or
        // gives a consistent store, never a panic.
        for n in 0..bytes.len() {
            assert!(Kv::restore(&bytes[..n]).is_err());
        }
        for i in 0..bytes.len() {
            for x in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = x;
                if let Ok(kv) = Kv::restore(&b) {
                    let mut kv = kv;
                    let mut ctx = Context::new(2_000_000, 1);
                    kv.on_data(&mut ctx, 1, b"\r\n$1\r\na\r\nDBSIZE\r\n");
                }
            }
        }
        // A deadline for a missing key is refused.
        let snap = SnapshotRef {
            version: CHECKPOINT_VERSION,
            data: &BTreeMap::new(),
            expires: &BTreeMap::from([(b"k".to_vec(), 5u64)]),
            conns: &BTreeMap::new(),
        };
        assert!(Kv::restore(&postcard::to_allocvec(&snap).unwrap()).is_err());
        let snap = SnapshotRef {
            version: 99,
            data: &BTreeMap::new(),
            expires: &BTreeMap::new(),
            conns: &BTreeMap::new(),
        };
        assert!(Kv::restore(&postcard::to_allocvec(&snap).unwrap()).is_err());
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b"", false));
        assert!(glob_match(b"a*b*c", b"aXXbYYc", false));
        assert!(!glob_match(b"a*b*c", b"aXXbYY", false));
        assert!(glob_match(b"h?llo", b"hello", false));
        assert!(glob_match(b"h[^e]llo", b"hallo", false));
        assert!(!glob_match(b"h[^e]llo", b"hello", false));
        assert!(glob_match(b"h[a-c]llo", b"hbllo", false));
        assert!(glob_match(b"a\\*", b"a*", false));
        assert!(!glob_match(b"a\\*", b"ab", false));
        assert!(glob_match(b"SAVE", b"save", true));
        assert!(!glob_match(b"SAVE", b"save", false));
        let long = vec![b'a'; 5000];
        assert!(!glob_match(b"*a*a*a*a*a*a*a*a*b", &long, false));
    }

    mod determinism {
        use super::*;
        use proptest::prelude::*;

        /// Commands the generated logs are made of.
        fn command(kind: u8, key: u8, val: u16) -> Vec<String> {
            let k = format!("k{}", key % 6);
            let v = val.to_string();
            let s = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            match kind % 24 {
                0 => s(&["SET", &k, &v]),
                1 => s(&["SET", &k, &v, "EX", &(val % 5 + 1).to_string()]),
                2 => s(&["SET", &k, &v, "PX", &(val % 3000 + 1).to_string(), "NX"]),
                3 => s(&["GET", &k]),
                4 => s(&["DEL", &k, "k1"]),
                5 => s(&["INCR", &k]),
                6 => s(&["LPUSH", &k, &v, "x"]),
                7 => s(&["RPOP", &k]),
                8 => s(&["LRANGE", &k, "0", "-1"]),
                9 => s(&["HSET", &k, &v, "1"]),
                10 => s(&["HGETALL", &k]),
                11 => s(&["SADD", &k, &v, "a", "b"]),
                12 => s(&["SPOP", &k]),
                13 => s(&["SPOP", &k, &(val % 4).to_string()]),
                14 => s(&["EXPIRE", &k, &(val % 4).to_string()]),
                15 => s(&["TTL", &k]),
                16 => s(&["PTTL", &k]),
                17 => s(&["DBSIZE"]),
                18 => s(&["MGET", "k0", "k1", "k2"]),
                19 => s(&["KEYS", "*"]),
                20 => s(&["SMEMBERS", &k]),
                21 => s(&["APPEND", &k, &v]),
                22 if val & 15 == 0 => s(&["FLUSHALL"]),
                22 => s(&["EXISTS", &k]),
                _ if val & 7 == 0 => s(&["QUIT"]),
                _ => s(&["PING"]),
            }
        }

        #[derive(Debug, Clone)]
        enum Step {
            Commands {
                conn: u8,
                cmds: Vec<(u8, u8, u16)>,
                split: usize,
            },
            Garbage {
                conn: u8,
                bytes: Vec<u8>,
            },
            Reconnect {
                conn: u8,
            },
        }

        fn arb_step() -> impl Strategy<Value = Step> {
            prop_oneof![
                8 => (0..3u8, prop::collection::vec(any::<(u8, u8, u16)>(), 1..4), any::<usize>())
                    .prop_map(|(conn, cmds, split)| Step::Commands { conn, cmds, split }),
                1 => (0..3u8, prop::collection::vec(any::<u8>(), 0..12))
                    .prop_map(|(conn, bytes)| Step::Garbage { conn, bytes }),
                1 => (0..3u8).prop_map(|conn| Step::Reconnect { conn }),
            ]
        }

        /// Turns steps into log entries: connections open first, time
        /// moves by the given jumps.
        fn log(steps: &[(Step, u64, u64)]) -> Vec<LogEntry> {
            let peer: SocketAddr = PEER.parse().unwrap();
            let mut events = Vec::new();
            // Current ConnId of each of the 3 client slots.
            let mut ids = [1u64, 2, 3];
            let mut next_id = 4;
            for id in ids {
                events.push((Event::Opened { conn: id, peer }, 0, 0));
            }
            for (step, jump, entropy) in steps {
                match step {
                    Step::Commands { conn, cmds, split } => {
                        let mut bytes = Vec::new();
                        for &(kind, key, val) in cmds {
                            bytes.extend(encode_command(&command(kind, key, val)));
                        }
                        let cut = split % (bytes.len() + 1);
                        let id = ids[*conn as usize];
                        events.push((
                            Event::Data {
                                conn: id,
                                bytes: bytes[..cut].to_vec(),
                            },
                            *jump,
                            *entropy,
                        ));
                        events.push((
                            Event::Data {
                                conn: id,
                                bytes: bytes[cut..].to_vec(),
                            },
                            0,
                            entropy.rotate_left(7),
                        ));
                    }
                    Step::Garbage { conn, bytes } => events.push((
                        Event::Data {
                            conn: ids[*conn as usize],
                            bytes: bytes.clone(),
                        },
                        *jump,
                        *entropy,
                    )),
                    Step::Reconnect { conn } => {
                        let old = ids[*conn as usize];
                        events.push((
                            Event::Closed {
                                conn: old,
                                reason: CloseReason::PeerFinished,
                            },
                            *jump,
                            *entropy,
                        ));
                        ids[*conn as usize] = next_id;
                        events.push((
                            Event::Opened {
                                conn: next_id,
                                peer,
                            },
                            0,
                            0,
                        ));
                        next_id += 1;
                    }
                }
            }
            let mut time = 1_700_000_000_000u64;
            events
                .into_iter()
                .enumerate()
                .map(|(i, (event, jump, entropy))| {
                    time += jump;
                    LogEntry {
                        index: i as u64 + 1,
                        time_ms: time,
                        entropy,
                        event,
                    }
                })
                .collect()
        }

        fn run(kv: &mut Kv, applier: &mut Applier, entries: &[LogEntry]) -> Vec<Vec<Output>> {
            entries
                .iter()
                .map(|e| applier.apply(kv, e).unwrap())
                .collect()
        }

        fn arb_jump() -> impl Strategy<Value = u64> {
            prop_oneof![
                6 => 0..50u64,
                3 => 0..2_000u64,
                1 => 0..20_000u64,
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            #[test]
            fn restore_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(mut kv) = Kv::restore(&bytes) {
                    let mut ctx = Context::new(u64::MAX, 7);
                    for conn in kv.conns.keys().copied().collect::<Vec<_>>() {
                        kv.on_data(&mut ctx, conn, b"\r\n$1\r\nx\r\nDBSIZE\r\nSPOP k\r\n");
                        kv.on_close(&mut ctx, conn, CloseReason::Reset);
                    }
                    kv.on_data(&mut ctx, 99, b"KEYS *\r\nTTL k\r\nFLUSHALL\r\n");
                }
            }

            #[test]
            fn restored_checkpoint_continues_identically(
                steps in prop::collection::vec((arb_step(), arb_jump(), any::<u64>()), 1..60),
                cut in any::<prop::sample::Index>(),
            ) {
                let entries = log(&steps);
                let cut = cut.index(entries.len() + 1);

                let mut kv = Kv::new();
                let mut applier = Applier::default();
                let before = run(&mut kv, &mut applier, &entries[..cut]);
                let checkpoint = kv.checkpoint();
                let saved_applier = applier.clone();
                let after = run(&mut kv, &mut applier, &entries[cut..]);

                // The same log from scratch: same output.
                let mut again = Kv::new();
                let mut again_applier = Applier::default();
                let all = run(&mut again, &mut again_applier, &entries);
                prop_assert_eq!(&all[..cut], &before[..]);
                prop_assert_eq!(&all[cut..], &after[..]);
                prop_assert_eq!(&again, &kv);

                // From the checkpoint: same state and output bytes.
                let mut restored = Kv::restore(&checkpoint).unwrap();
                let mut restored_applier = saved_applier;
                let resumed = run(&mut restored, &mut restored_applier, &entries[cut..]);
                prop_assert_eq!(&resumed, &after);
                prop_assert_eq!(restored.checkpoint(), kv.checkpoint());
                prop_assert_eq!(&restored, &kv);
            }
        }
    }

    /// `redis-cli` and `redis-benchmark` against a Kv behind a tiny
    /// single-threaded loopback server.
    mod real_clients {
        use super::*;
        use std::io::{ErrorKind, Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::process::{Command, Stdio};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::thread::JoinHandle;
        use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

        struct Sock {
            stream: TcpStream,
            out: Vec<u8>,
            /// The service closed it: drop once `out` is written.
            closing: bool,
            /// The service shut down writing.
            write_shut: bool,
            read_done: bool,
        }

        struct Server {
            port: u16,
            stop: Arc<AtomicBool>,
            thread: Option<JoinHandle<Kv>>,
        }

        impl Server {
            fn start() -> Server {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                let stop = Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let thread = std::thread::spawn(move || serve(listener, &flag));
                Server {
                    port,
                    stop,
                    thread: Some(thread),
                }
            }

            fn finish(mut self) -> Kv {
                self.stop.store(true, Ordering::SeqCst);
                self.thread.take().unwrap().join().unwrap()
            }
        }

        impl Drop for Server {
            fn drop(&mut self) {
                self.stop.store(true, Ordering::SeqCst);
            }
        }

        /// Accepts, reads and writes without blocking; every read becomes a
        /// log entry applied to the Kv, every output goes to its socket.
        fn serve(listener: TcpListener, stop: &AtomicBool) -> Kv {
            listener.set_nonblocking(true).unwrap();
            let mut kv = Kv::new();
            let mut applier = Applier::default();
            let mut socks: BTreeMap<ConnId, Sock> = BTreeMap::new();
            let mut next_conn: ConnId = 1;
            let mut buf = vec![0u8; 64 * 1024];
            let mut apply = |kv: &mut Kv, socks: &mut BTreeMap<ConnId, Sock>, event: Event| {
                let index = applier.next_index();
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                let entry = LogEntry {
                    index,
                    time_ms: now,
                    entropy: index.wrapping_mul(0x2545_F491_4F6C_DD1D),
                    event,
                };
                for out in applier.apply(kv, &entry).unwrap() {
                    match out {
                        Output::Send { conn, bytes } => {
                            if let Some(s) = socks.get_mut(&conn) {
                                s.out.extend_from_slice(&bytes);
                            }
                        }
                        Output::Close { conn } => {
                            if let Some(s) = socks.get_mut(&conn) {
                                s.closing = true;
                            }
                        }
                        Output::ShutdownWrite { conn } => {
                            if let Some(s) = socks.get_mut(&conn) {
                                s.write_shut = true;
                            }
                        }
                        Output::SetTimer { .. } | Output::CancelTimer { .. } => {}
                    }
                }
            };
            while !stop.load(Ordering::SeqCst) {
                let mut progress = false;
                match listener.accept() {
                    Ok((stream, peer)) => {
                        progress = true;
                        stream.set_nonblocking(true).unwrap();
                        stream.set_nodelay(true).unwrap();
                        let conn = next_conn;
                        next_conn += 1;
                        socks.insert(
                            conn,
                            Sock {
                                stream,
                                out: Vec::new(),
                                closing: false,
                                write_shut: false,
                                read_done: false,
                            },
                        );
                        apply(&mut kv, &mut socks, Event::Opened { conn, peer });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
                let ids: Vec<ConnId> = socks.keys().copied().collect();
                for conn in ids {
                    let Some(s) = socks.get_mut(&conn) else {
                        continue;
                    };
                    if !s.read_done && !s.closing {
                        match s.stream.read(&mut buf) {
                            Ok(0) => {
                                progress = true;
                                s.read_done = true;
                                let reason = CloseReason::PeerFinished;
                                apply(&mut kv, &mut socks, Event::Closed { conn, reason });
                            }
                            Ok(n) => {
                                progress = true;
                                let bytes = buf[..n].to_vec();
                                apply(&mut kv, &mut socks, Event::Data { conn, bytes });
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(_) => {
                                s.read_done = true;
                                let reason = CloseReason::Reset;
                                apply(&mut kv, &mut socks, Event::Closed { conn, reason });
                            }
                        }
                    }
                    let Some(s) = socks.get_mut(&conn) else {
                        continue;
                    };
                    while !s.out.is_empty() {
                        match s.stream.write(&s.out) {
                            Ok(n) => {
                                progress = true;
                                s.out.drain(..n);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => {
                                s.out.clear();
                                s.closing = true;
                            }
                        }
                    }
                    if s.out.is_empty() && (s.closing || s.write_shut) {
                        let _ = s.stream.shutdown(Shutdown::Write);
                    }
                    if s.out.is_empty() && s.closing {
                        let peer_done = s.read_done;
                        socks.remove(&conn);
                        if !peer_done {
                            // We closed first: the service forgets it now.
                            let reason = CloseReason::PeerFinished;
                            apply(&mut kv, &mut socks, Event::Closed { conn, reason });
                        }
                    }
                }
                if !progress {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            kv
        }

        /// Runs a client with a deadline; returns (success, stdout + stderr).
        fn run(program: &str, args: &[&str], limit: Duration) -> (bool, String) {
            let mut child = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            let mut stdout = child.stdout.take().unwrap();
            let mut stderr = child.stderr.take().unwrap();
            let out = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stdout.read_to_string(&mut s);
                s
            });
            let err = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });
            let deadline = Instant::now() + limit;
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
            match status {
                Some(s) => (s.success(), text),
                None => (false, format!("{program} timed out; output: {text}")),
            }
        }

        fn tools_present(tools: &[&str]) -> bool {
            for tool in tools {
                let found = Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !found {
                    eprintln!("SKIPPED: `{tool}` not found (install redis-tools)");
                    return false;
                }
            }
            true
        }

        #[test]
        fn redis_cli() {
            if !tools_present(&["redis-cli"]) {
                return;
            }
            let server = Server::start();
            let port = server.port.to_string();
            let cli = |args: &[&str]| -> String {
                let mut all = vec!["-h", "127.0.0.1", "-p", &port];
                all.extend_from_slice(args);
                let (ok, out) = run("redis-cli", &all, Duration::from_secs(10));
                assert!(ok, "redis-cli {args:?} failed: {out}");
                out
            };
            assert_eq!(cli(&["PING"]), "PONG\n");
            assert_eq!(cli(&["SET", "a", "1"]), "OK\n");
            assert_eq!(cli(&["GET", "a"]), "1\n");
            assert_eq!(cli(&["INCR", "c"]), "1\n");
            assert_eq!(cli(&["INCR", "c"]), "2\n");
            assert_eq!(cli(&["RPUSH", "l", "x", "y", "z"]), "3\n");
            assert_eq!(cli(&["LRANGE", "l", "0", "-1"]), "x\ny\nz\n");
            assert_eq!(cli(&["HSET", "h", "f1", "v1", "f2", "v2"]), "2\n");
            assert_eq!(cli(&["HGETALL", "h"]), "f1\nv1\nf2\nv2\n");
            assert_eq!(cli(&["SADD", "s", "m"]), "1\n");
            assert_eq!(cli(&["SMEMBERS", "s"]), "m\n");
            assert_eq!(cli(&["SET", "t", "v", "EX", "100"]), "OK\n");
            assert_eq!(cli(&["TTL", "t"]), "100\n");
            assert_eq!(cli(&["DBSIZE"]), "6\n");
            assert_eq!(cli(&["SELECT", "0"]), "OK\n");
            assert!(cli(&["INFO"]).contains("redis_version:7.0.0"));
            assert_eq!(cli(&["-n", "0", "GET", "a"]), "1\n");
            // Errors come back as Redis words them.
            let (_, out) = run("redis-cli", &["-p", &port, "GET"], Duration::from_secs(10));
            assert!(
                out.contains("ERR wrong number of arguments for 'get' command"),
                "{out}"
            );
            let (_, out) = run(
                "redis-cli",
                &["-p", &port, "LPUSH", "a", "x"],
                Duration::from_secs(10),
            );
            assert!(out.contains("WRONGTYPE"), "{out}");
            // Several commands on one connection, from stdin... via -r.
            assert_eq!(cli(&["-r", "3", "INCR", "r"]), "1\n2\n3\n");
            let kv = server.finish();
            assert_eq!(kv.connections(), 0, "connections were not forgotten");
        }

        #[test]
        fn redis_benchmark() {
            if !tools_present(&["redis-benchmark"]) {
                return;
            }
            let server = Server::start();
            let port = server.port.to_string();
            let tests = "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,mset";
            let (ok, out) = run(
                "redis-benchmark",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-c",
                    "4",
                    "-n",
                    "2000",
                    "-t",
                    tests,
                    "-q",
                ],
                Duration::from_secs(120),
            );
            assert!(ok, "redis-benchmark failed: {out}");
            let lower = out.to_lowercase();
            assert!(
                !lower.contains("err") && !lower.contains("warning"),
                "redis-benchmark reported a problem: {out}"
            );
            for name in [
                "PING_INLINE",
                "PING_MBULK",
                "SET",
                "GET",
                "INCR",
                "LPUSH",
                "RPUSH",
                "LPOP",
                "RPOP",
                "SADD",
                "HSET",
                "MSET (10 keys)",
            ] {
                assert!(
                    out.contains(&format!("{name}: ")),
                    "no result for {name}: {out}"
                );
            }
            // Pipelined too.
            let (ok, out) = run(
                "redis-benchmark",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-c",
                    "2",
                    "-n",
                    "2000",
                    "-P",
                    "16",
                    "-t",
                    "set,get,lpush,lpop",
                    "-q",
                ],
                Duration::from_secs(120),
            );
            assert!(ok && !out.to_lowercase().contains("err"), "{out}");
            let kv = server.finish();
            assert!(!kv.is_empty());
        }
    }
}
