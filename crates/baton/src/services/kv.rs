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

    fn get_hash(
        &mut self,
        key: &[u8],
    ) -> Result<Option<&mut BTreeMap<Vec<u8>, Vec<u8>>>, WrongType> {
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
    pub fn new() -> Kv {
        Kv::default()
    }

    /// Number of keys, counting those past their deadline that no event
    /// has removed yet.
    pub fn len(&self) -> usize {
        self.db.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.db.data.is_empty()
    }

    /// Number of connections it keeps state for.
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
        let Some(&(name, arity)) = COMMANDS
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(&args[0]))
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
                if args.len() % 2 == 0 {
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
                        (ms + 500) / 1000
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
                if args.len() % 2 != 0 {
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
                .and_then(|ms| ms.checked_add(now as i64));
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
        .and_then(|ms| ms.checked_add(now as i64))
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
    if when <= now as i64 {
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
            let i = (ctx.random_u64() % set.len() as u64) as usize;
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
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                break;
            };
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
