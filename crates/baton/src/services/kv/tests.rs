//! kv's unit tests: every command family through the Applier, as the
//! runtime drives it, plus determinism and checkpoint properties.

use super::super::resp::encode_command;
use super::*;
use baton_core::log::{Applier, Event, LogEntry};
use baton_core::service::Output;
use db::glob_match;

mod redis_replies;
mod sorted_sets_streams;

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
    // Redis 7.0 says "must be positive" for a count that is no integer.
    assert_eq!(
        h.cmd(&["LPOP", "l", "x"]),
        "-ERR value is out of range, must be positive\r\n"
    );
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
        format!(":{}\r\n", commands::COMMANDS.len())
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
    // A deadline for a missing key is refused, and unknown versions.
    let snap = (
        checkpoint::VERSION,
        BTreeMap::<Vec<u8>, db::Value>::new(),
        BTreeMap::from([(b"k".to_vec(), 5u64)]),
        BTreeMap::<ConnId, Conn>::new(),
        0u64,
        0u64,
    );
    assert!(Kv::restore(&postcard::to_allocvec(&snap).unwrap()).is_err());
    let snap = (
        99u32,
        BTreeMap::<Vec<u8>, db::Value>::new(),
        BTreeMap::<Vec<u8>, u64>::new(),
        BTreeMap::<ConnId, Conn>::new(),
        0u64,
        0u64,
    );
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
        let ch = format!("ch{}", key % 2);
        match kind % 43 {
            36 => s(&["ZADD", &k, &(val % 7).to_string(), &format!("m{}", val % 5)]),
            37 => s(&["ZPOPMIN", &k, &(val % 3).to_string()]),
            38 => s(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]),
            39 => s(&["ZRANGEBYSCORE", &k, "(1", "+inf", "LIMIT", "1", "2"]),
            40 => s(&["XADD", &k, "MAXLEN", &(val % 4).to_string(), "*", "f", &v]),
            41 => s(&["XRANGE", &k, "-", "+", "COUNT", "2"]),
            42 => s(&["ZSCAN", &k, "0", "COUNT", "2"]),
            24 => s(&["MULTI"]),
            25 => s(&["EXEC"]),
            26 => s(&["WATCH", &k]),
            27 => s(&["SUBSCRIBE", &ch]),
            28 => s(&["PSUBSCRIBE", "ch*"]),
            29 if val & 1 == 0 => s(&["UNSUBSCRIBE"]),
            29 => s(&["RESET"]),
            30 => s(&["PUBLISH", &ch, &v]),
            31 => s(&["BLPOP", &k, "k1", &(val % 3).to_string()]),
            32 => s(&["BLMOVE", &k, "k2", "LEFT", "RIGHT", "0"]),
            33 => s(&["HELLO", if val & 1 == 0 { "3" } else { "2" }]),
            34 => s(&["SCAN", &(u64::from(val) << 48).to_string(), "COUNT", "2"]),
            35 => s(&["DISCARD"]),
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
        // Every default test (no -t), sorted sets and streams included.
        let (ok, out) = run(
            "redis-benchmark",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-c",
                "20",
                "-n",
                "2000",
                "-q",
            ],
            Duration::from_secs(180),
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
            "SPOP",
            "ZADD",
            "ZPOPMIN",
            "LPUSH (needed to benchmark LRANGE)",
            "LRANGE_100 (first 100 elements)",
            "LRANGE_300 (first 300 elements)",
            "LRANGE_500 (first 500 elements)",
            "LRANGE_600 (first 600 elements)",
            "MSET (10 keys)",
        ] {
            assert!(
                out.contains(&format!("{name}: ")),
                "no result for {name}: {out}"
            );
        }
        // redis-benchmark 7.2 adds XADD to its defaults; Debian's 7.0 has
        // no such test, so its command runs as a custom one.
        let (ok, out) = run(
            "redis-benchmark",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-c",
                "20",
                "-n",
                "2000",
                "-q",
                "XADD",
                "mystream",
                "*",
                "myfield",
                "__rand_int__",
            ],
            Duration::from_secs(60),
        );
        assert!(ok && !out.to_lowercase().contains("err"), "{out}");
        assert!(
            out.contains("XADD mystream * myfield __rand_int__: "),
            "{out}"
        );
        // Every XADD made an entry (ids from the log's time, all distinct).
        let (ok, xlen) = run(
            "redis-cli",
            &["-h", "127.0.0.1", "-p", &port, "XLEN", "mystream"],
            Duration::from_secs(10),
        );
        assert!(ok && xlen == "2000\n", "XLEN mystream: {xlen}");
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

/// A second connection on the same harness.
fn open(h: &mut Harness, conn: ConnId) {
    h.event(Event::Opened {
        conn,
        peer: PEER.parse().unwrap(),
    });
}

fn cmd_on(h: &mut Harness, conn: ConnId, args: &[&str]) -> Vec<Output> {
    h.event(Event::Data {
        conn,
        bytes: encode_command(args),
    })
}

fn sent(outs: &[Output], conn: ConnId) -> String {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, bytes } if *c == conn => {
                Some(String::from_utf8_lossy(bytes).into_owned())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn hello_switches_to_resp3() {
    let mut h = Harness::new();
    h.cmd(&["HSET", "h", "f", "v"]);
    h.cmd(&["SADD", "s", "m"]);
    let hello = h.cmd(&["HELLO", "3", "SETNAME", "me"]);
    assert!(
        hello.starts_with("%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "{hello}"
    );
    assert!(
        hello.contains("$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:1\r\n"),
        "{hello}"
    );
    assert_eq!(h.cmd(&["GET", "nope"]), "_\r\n");
    assert_eq!(h.cmd(&["HGETALL", "h"]), "%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
    assert_eq!(h.cmd(&["SMEMBERS", "s"]), "~1\r\n$1\r\nm\r\n");
    assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), "$2\r\nme\r\n");
    assert!(h.cmd(&["INFO", "persistence"]).starts_with('='));
    assert_eq!(
        h.cmd(&["HELLO", "4"]),
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        h.cmd(&["HELLO", "3", "AUTH", "bob", "pw"]),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert!(h
        .cmd(&["HELLO", "3", "AUTH", "default", "pw"])
        .starts_with('%'));
    assert!(h.cmd(&["HELLO", "2"]).starts_with("*14\r\n"));
    assert_eq!(h.cmd(&["GET", "nope"]), "$-1\r\n");
    assert_eq!(
        h.cmd(&["HELLO", "3", "BOGUS"]),
        "-ERR Syntax error in HELLO option 'BOGUS'\r\n"
    );
    assert_eq!(h.cmd(&["RESET"]), "+RESET\r\n");
    assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), "$-1\r\n");
    let mut w = crate::services::resp::Writer::new(true);
    w.double(1.5);
    w.double(f64::INFINITY);
    assert_eq!(w.buf, b",1.5\r\n,inf\r\n");
    let mut w = crate::services::resp::Writer::new(false);
    w.double(-0.25);
    assert_eq!(w.buf, b"$5\r\n-0.25\r\n");
}

#[test]
fn transactions() {
    let mut h = Harness::new();
    open(&mut h, 2);
    assert_eq!(h.cmd(&["EXEC"]), "-ERR EXEC without MULTI\r\n");
    assert_eq!(h.cmd(&["DISCARD"]), "-ERR DISCARD without MULTI\r\n");
    assert_eq!(h.cmd(&["MULTI"]), "+OK\r\n");
    assert_eq!(h.cmd(&["MULTI"]), "-ERR MULTI calls can not be nested\r\n");
    assert_eq!(h.cmd(&["INCR", "c"]), "+QUEUED\r\n");
    assert_eq!(h.cmd(&["LPUSH", "c", "x"]), "+QUEUED\r\n");
    assert_eq!(
        h.cmd(&["WATCH", "c"]),
        "-ERR WATCH inside MULTI is not allowed\r\n"
    );
    assert_eq!(h.cmd(&["EXEC"]), format!("*2\r\n:1\r\n{WT}"));
    // A refused command aborts the whole transaction.
    h.cmd(&["MULTI"]);
    h.cmd(&["INCR", "c"]);
    assert_eq!(h.cmd(&["GET"]), arity("get"));
    assert_eq!(
        h.cmd(&["EXEC"]),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(h.cmd(&["GET", "c"]), "$1\r\n1\r\n");
    // WATCH: another connection's write fails EXEC; an untouched key does not.
    assert_eq!(h.cmd(&["WATCH", "c", "d"]), "+OK\r\n");
    cmd_on(&mut h, 2, &["SET", "c", "9"]);
    h.cmd(&["MULTI"]);
    h.cmd(&["INCR", "c"]);
    assert_eq!(h.cmd(&["EXEC"]), "*-1\r\n");
    h.cmd(&["WATCH", "c"]);
    cmd_on(&mut h, 2, &["GET", "c"]);
    cmd_on(&mut h, 2, &["DEL", "nothing"]);
    h.cmd(&["MULTI"]);
    h.cmd(&["INCR", "c"]);
    assert_eq!(h.cmd(&["EXEC"]), "*1\r\n:10\r\n");
    // Expiry counts as a change.
    h.cmd(&["SET", "e", "1", "PX", "10"]);
    h.cmd(&["WATCH", "e"]);
    h.advance(20);
    h.cmd(&["MULTI"]);
    h.cmd(&["SET", "e", "2"]);
    assert_eq!(h.cmd(&["EXEC"]), "*-1\r\n");
    // The queue and the watches survive a checkpoint.
    h.cmd(&["WATCH", "c"]);
    h.cmd(&["MULTI"]);
    h.cmd(&["INCR", "c"]);
    h.kv = Kv::restore(&h.kv.checkpoint()).unwrap();
    cmd_on(&mut h, 2, &["SET", "c", "0"]);
    assert_eq!(h.cmd(&["EXEC"]), "*-1\r\n");
    h.cmd(&["MULTI"]);
    assert_eq!(h.cmd(&["DISCARD"]), "+OK\r\n");
}

#[test]
fn scan_cursors_survive_changes_and_checkpoints() {
    let mut h = Harness::new();
    for i in 0..100 {
        h.cmd(&["SET", &format!("key:{i}"), "v"]);
    }
    h.cmd(&["RPUSH", "list", "a"]);
    let mut seen = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut rounds = 0;
    loop {
        let reply = h.cmd(&["SCAN", &cursor, "COUNT", "7", "MATCH", "key:*"]);
        let mut p = crate::services::resp::Parser::new();
        // "*2 $cursor *n ..." reads as a command: [cursor, then keys].
        let flat = reply.replacen("*2\r\n", "", 1);
        let (head, rest) = flat.split_once("\r\n").unwrap();
        let cursor_len: usize = head[1..].parse().unwrap();
        cursor = rest[..cursor_len].to_string();
        let (cmds, _) = p.parse_all(&rest.as_bytes()[cursor_len + 2..]);
        seen.extend(cmds.into_iter().flatten());
        rounds += 1;
        // Changes and a move between pages: present keys are still found.
        h.cmd(&["SET", &format!("new:{rounds}"), "v"]);
        h.kv = Kv::restore(&h.kv.checkpoint()).unwrap();
        if cursor == "0" {
            break;
        }
        assert!(rounds < 100);
    }
    assert!(rounds > 10);
    assert_eq!(seen.len(), 100);
    assert_eq!(
        h.cmd(&["SCAN", "0", "TYPE", "list", "COUNT", "1000"]),
        "*2\r\n$1\r\n0\r\n*1\r\n$4\r\nlist\r\n"
    );
    assert_eq!(h.cmd(&["SCAN", "x"]), "-ERR invalid cursor\r\n");
    assert_eq!(h.cmd(&["SCAN", "0", "COUNT", "0"]), "-ERR syntax error\r\n");
    h.cmd(&["HSET", "h", "a", "1", "b", "2"]);
    assert_eq!(
        h.cmd(&["HSCAN", "h", "0", "MATCH", "a"]),
        "*2\r\n$1\r\n0\r\n*2\r\n$1\r\na\r\n$1\r\n1\r\n"
    );
    assert_eq!(h.cmd(&["SSCAN", "h", "0"]), WT);
}

#[test]
fn pubsub_delivers_to_subscribers() {
    let mut h = Harness::new();
    open(&mut h, 2);
    open(&mut h, 3);
    assert_eq!(
        h.cmd(&["SUBSCRIBE", "a", "b"]),
        "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
    );
    assert_eq!(
        h.cmd(&["GET", "x"]),
        "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    assert_eq!(h.cmd(&["PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    cmd_on(&mut h, 3, &["HELLO", "3"]);
    cmd_on(&mut h, 3, &["PSUBSCRIBE", "a*"]);
    // A move between subscribing and publishing changes nothing.
    h.kv = Kv::restore(&h.kv.checkpoint()).unwrap();
    let outs = cmd_on(&mut h, 2, &["PUBLISH", "a", "hi"]);
    assert_eq!(sent(&outs, 2), ":2\r\n");
    assert_eq!(
        sent(&outs, 1),
        "*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
    );
    assert_eq!(
        sent(&outs, 3),
        ">4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$1\r\na\r\n$2\r\nhi\r\n"
    );
    assert_eq!(
        sent(&cmd_on(&mut h, 2, &["PUBSUB", "NUMSUB", "a", "z"]), 2),
        "*4\r\n$1\r\na\r\n:1\r\n$1\r\nz\r\n:0\r\n"
    );
    assert_eq!(sent(&cmd_on(&mut h, 2, &["PUBSUB", "NUMPAT"]), 2), ":1\r\n");
    assert_eq!(
        h.cmd(&["UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"
    );
    assert_eq!(
        h.cmd(&["UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
    );
    assert_eq!(h.cmd(&["GET", "x"]), "$-1\r\n");
    // A closed subscriber receives nothing more.
    h.event(Event::Closed {
        conn: 3,
        reason: CloseReason::Reset,
    });
    let outs = cmd_on(&mut h, 2, &["PUBLISH", "a", "hi"]);
    assert_eq!(sent(&outs, 2), ":0\r\n");
}

#[test]
fn blocking_pops_wait_for_pushes_and_log_time() {
    let mut h = Harness::new();
    open(&mut h, 2);
    // Blocks: nothing answered, the later PING waits too, a timer is set.
    let outs = h.raw(
        &[
            encode_command(&["BLPOP", "q", "2"]),
            encode_command(&["PING"]),
        ]
        .concat(),
    );
    assert_eq!(
        outs,
        vec![Output::SetTimer {
            id: 1,
            at_ms: h.time_ms + 2000
        }]
    );
    // The wait survives a move; a push serves it, then the PING runs.
    h.kv = Kv::restore(&h.kv.checkpoint()).unwrap();
    let outs = cmd_on(&mut h, 2, &["RPUSH", "q", "a", "b"]);
    assert_eq!(sent(&outs, 2), ":2\r\n");
    assert_eq!(sent(&outs, 1), "*2\r\n$1\r\nq\r\n$1\r\na\r\n+PONG\r\n");
    assert!(outs.contains(&Output::CancelTimer { id: 1 }));
    assert_eq!(h.cmd(&["LLEN", "q"]), ":1\r\n");
    // A timeout is a timer of the log: it fires with a null array.
    h.cmd(&["DEL", "q"]);
    h.raw(&encode_command(&["BRPOP", "q", "0.5"]));
    h.advance(499);
    assert_eq!(h.event(Event::TimerFired { id: 1 }), vec![]);
    h.advance(1);
    let outs = h.event(Event::TimerFired { id: 1 });
    assert_eq!(sent(&outs, 1), "*-1\r\n");
    // BLMOVE moves when served; in MULTI nothing blocks.
    h.raw(&encode_command(&[
        "BLMOVE", "src", "dst", "LEFT", "RIGHT", "0",
    ]));
    let outs = cmd_on(&mut h, 2, &["LPUSH", "src", "x"]);
    assert_eq!(sent(&outs, 1), "$1\r\nx\r\n");
    assert_eq!(h.cmd(&["LRANGE", "dst", "0", "-1"]), "*1\r\n$1\r\nx\r\n");
    h.cmd(&["MULTI"]);
    h.cmd(&["BLPOP", "nothing", "0"]);
    assert_eq!(h.cmd(&["EXEC"]), "*1\r\n*-1\r\n");
    assert_eq!(h.cmd(&["BLPOP", "q", "-1"]), "-ERR timeout is negative\r\n");
    assert_eq!(
        h.cmd(&["BLPOP", "q", "x"]),
        "-ERR timeout is not a float or out of range\r\n"
    );
    // First blocked, first served.
    cmd_on(&mut h, 2, &["BLPOP", "fifo", "0"]);
    h.raw(&encode_command(&["BLPOP", "fifo", "0"]));
    open(&mut h, 3);
    let outs = cmd_on(&mut h, 3, &["RPUSH", "fifo", "1"]);
    assert_eq!(sent(&outs, 2), "*2\r\n$4\r\nfifo\r\n$1\r\n1\r\n");
    assert_eq!(sent(&outs, 1), "");
}

#[test]
fn version_1_checkpoints_restore() {
    #[derive(serde::Serialize)]
    struct ConnV1 {
        parser: Parser,
        peer: Option<SocketAddr>,
        name: Option<Vec<u8>>,
        closing: bool,
    }
    let mut parser = Parser::new();
    parser.feed(b"*1\r\n$4\r\nPI");
    let conns = BTreeMap::from([(
        7u64,
        ConnV1 {
            parser,
            peer: Some(PEER.parse().unwrap()),
            name: Some(b"old".to_vec()),
            closing: false,
        },
    )]);
    let data = BTreeMap::from([(b"k".to_vec(), db::Value::Str(b"v".to_vec()))]);
    let v1 =
        postcard::to_allocvec(&(1u32, &data, BTreeMap::<Vec<u8>, u64>::new(), &conns)).unwrap();
    let mut kv = Kv::restore(&v1).unwrap();
    let mut ctx = Context::new(5, 5);
    kv.on_data(&mut ctx, 7, b"NG\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    assert_eq!(
        ctx.into_outputs(),
        vec![Output::Send {
            conn: 7,
            bytes: b"+PONG\r\n$1\r\nv\r\n".to_vec()
        }]
    );
    assert_eq!(kv.checkpoint()[0], checkpoint::VERSION as u8);
}
