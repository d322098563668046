//! `kv` as real Redis clients see it, in a lab, through `baton node`:
//! the Python `redis` and Node `ioredis` libraries with their default
//! settings (pinned in tests/clients, installed by scripts/setup.sh), a
//! subscriber that keeps receiving while the service moves, and a
//! reply-for-reply comparison with a real `redis-server` on a generated
//! command mix. Needs root, the lab's tools, redis-server, the venv and
//! node_modules that scripts/setup.sh installs.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_lab::cluster::{Cluster, ServiceSpec};
use baton_lab::Lab;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_baton");
const KV_PORT: u16 = 6379;

fn vip() -> IpAddr {
    IpAddr::V4(Lab::vip(1).0)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cluster(prefix: &str, nodes: u32) -> Cluster {
    let lab = Lab::create(&Lab::unique_name(prefix), nodes, 1).unwrap();
    let spec = ServiceSpec {
        name: "kv".into(),
        kind: "kv".into(),
        vip: vip(),
        prefix_len: 16,
        ports: vec![KV_PORT],
        preferred_node: "node1".into(),
        replicated: false,
    };
    Cluster::start(lab, std::path::Path::new(BIN), &[spec]).unwrap()
}

/// A client script's process, killed on drop (by its pid) if it is still
/// running, so a failing test leaves nothing behind.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Script {
    fn start(c: &Cluster, program: &str, args: &[String]) -> Script {
        let mut child = c
            .lab
            .command("client1", program)
            .unwrap()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}: run scripts/setup.sh"));
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Script {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a line equal to `want`; panics with the output so far on
    /// timeout.
    fn expect(&mut self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.trim() == want;
                    self.log.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no {want:?} from the client; output:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit (with a deadline); returns success and the output.
    fn finish(mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        let text = self.log.join("\n");
        match status {
            Some(s) => (s.success(), text),
            None => (false, format!("timed out; output:\n{text}")),
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a client script and moves kv ten times while its subscriber
/// receives; the script checks every reply and the message order.
fn client_through_moves(prefix: &str, program: &str, script: &str) {
    let c = cluster(prefix, 3);
    let before = c.lab.tcp_counters("client1").unwrap();
    let args = vec![
        repo().join(script).to_string_lossy().into_owned(),
        vip().to_string(),
        KV_PORT.to_string(),
    ];
    let mut s = Script::start(&c, program, &args);
    s.expect("subscribed", Duration::from_secs(90));
    let nodes = ["node1", "node2", "node3"];
    for i in 0..10 {
        let to = nodes[(i + 1) % 3];
        c.move_service("node1", "kv", to)
            .unwrap_or_else(|e| panic!("move {i} to {to}: {e}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node2"));
    s.say("moves done");
    let (ok, out) = s.finish(Duration::from_secs(90));
    assert!(ok, "{program} {script} failed:\n{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.contains("\"ok\"") && last.contains("true"), "{out}");
    let after = c.lab.tcp_counters("client1").unwrap();
    assert_eq!(after.resets_since(&before), 0, "client1 saw resets");
}

fn venv_python() -> String {
    repo()
        .join("target/client-venv/bin/python")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn python_redis_with_defaults_through_moves() {
    let _deadline = baton_lab::Deadline::start(
        "python_redis_with_defaults_through_moves",
        std::time::Duration::from_secs(240),
    );
    let c = cluster("kpa", 1);
    // The acceptance one-liner, as a user types it.
    let code = format!(
        "import redis; r = redis.Redis(host='{}'); r.set('a', 1); print(r.get('a'))",
        vip()
    );
    let out = c
        .lab
        .command("client1", &venv_python())
        .unwrap()
        .args(["-c", &code])
        .output()
        .expect("the client venv: run scripts/setup.sh");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b'1'");
    drop(c);
    client_through_moves("kpy", &venv_python(), "tests/clients/kv_client.py");
}

#[test]
fn node_ioredis_with_defaults_through_moves() {
    let _deadline = baton_lab::Deadline::start(
        "node_ioredis_with_defaults_through_moves",
        std::time::Duration::from_secs(240),
    );
    client_through_moves("kjs", "node", "tests/clients/kv_client.mjs");
}

/// A reply as read off the wire, its RESP type kept (RESP2 and RESP3).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum R {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<R>>),
    Null,
    Map(Vec<(R, R)>),
    Set(Vec<R>),
    Push(Vec<R>),
    Verbatim(Vec<u8>),
    Double(String),
    Bool(bool),
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(c: &Cluster, addr: SocketAddr) -> Conn {
        let stream = c
            .lab
            .run_in("client1", move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Conn {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send(&mut self, args: &[String]) {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend(format!("${}\r\n", a.len()).bytes());
            b.extend(a.bytes());
            b.extend(b"\r\n");
        }
        self.writer.write_all(&b).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("reply within 5 s");
        assert!(l.ends_with("\r\n"), "truncated reply line {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn read(&mut self) -> R {
        let l = self.line();
        let (kind, rest) = l.split_at(1);
        let n = || {
            rest.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad header {l:?}"))
        };
        let items = |me: &mut Conn, n: i64| (0..n).map(|_| me.read()).collect::<Vec<_>>();
        match kind {
            "+" => R::Simple(rest.into()),
            "-" => R::Error(rest.into()),
            ":" => R::Int(n()),
            "_" => R::Null,
            "," => R::Double(rest.into()),
            "#" => R::Bool(rest == "t"),
            "$" | "=" if n() < 0 => R::Bulk(None),
            "$" | "=" => {
                let mut b = vec![0; n() as usize + 2];
                self.reader.read_exact(&mut b).unwrap();
                b.truncate(b.len() - 2);
                if kind == "=" {
                    R::Verbatim(b)
                } else {
                    R::Bulk(Some(b))
                }
            }
            "*" if n() < 0 => R::Array(None),
            "*" => R::Array(Some(items(self, n()))),
            "~" => R::Set(items(self, n())),
            ">" => R::Push(items(self, n())),
            "%" => {
                let flat = items(self, n() * 2);
                R::Map(
                    flat.chunks(2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                        .collect(),
                )
            }
            _ => panic!("unknown reply type in {l:?}"),
        }
    }
}

/// Replies whose order Redis leaves to its hash tables are compared
/// sorted (see the README's list of differences).
fn normalize(cmd: &str, r: R) -> R {
    fn sorted(mut v: Vec<R>) -> Vec<R> {
        v.sort();
        v
    }
    fn pairs(v: Vec<R>) -> Vec<R> {
        let mut p: Vec<Vec<R>> = v.chunks(2).map(<[R]>::to_vec).collect();
        p.sort();
        p.concat()
    }
    match (cmd, r) {
        ("KEYS" | "SMEMBERS" | "PUBSUB", R::Array(Some(v))) => R::Array(Some(sorted(v))),
        ("SMEMBERS", R::Set(v)) => R::Set(sorted(v)),
        ("HGETALL", R::Array(Some(v))) => R::Array(Some(pairs(v))),
        ("HGETALL", R::Map(mut m)) => {
            m.sort();
            R::Map(m)
        }
        ("SCAN" | "SSCAN" | "HSCAN" | "ZSCAN", R::Array(Some(mut v))) if v.len() == 2 => {
            if let R::Array(Some(items)) = v.pop().unwrap() {
                let items = if cmd == "HSCAN" || cmd == "ZSCAN" {
                    pairs(items)
                } else {
                    sorted(items)
                };
                v.push(R::Array(Some(items)));
            }
            R::Array(Some(v))
        }
        // Time left moves while the two servers answer: its sign is what
        // is compared.
        ("TTL", R::Int(n)) if n > 0 => R::Int(1),
        (_, r) => r,
    }
}

/// Generates one step of the command mix: which connection, the command.
/// Connection 0 does everything but subscribe; connection 1 subscribes
/// and runs what a subscribed connection may (and some it may not).
struct Mix {
    rng: StdRng,
    in_multi: bool,
}

impl Mix {
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.rng.gen_range(0..xs.len())]
    }

    fn key(&mut self) -> String {
        let family = self.pick(&["s", "s", "l", "h", "t", "n", "z", "z", "x"]);
        format!("{family}{}", self.rng.gen_range(0..3))
    }

    fn val(&mut self) -> String {
        match self.rng.gen_range(0..4) {
            0 => self.rng.gen_range(-5..100).to_string(),
            1 => "abc".into(),
            2 => String::new(),
            _ => format!("v{}", self.rng.gen_range(0..5)),
        }
    }

    fn step(&mut self) -> (usize, Vec<String>) {
        let s = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        if self.rng.gen_range(0..8) == 0 {
            let ch = format!("ch{}", self.rng.gen_range(0..2));
            let cmd = match self.rng.gen_range(0..9) {
                0 | 1 => s(&["SUBSCRIBE", &ch, "ch1"]),
                2 => s(&["PSUBSCRIBE", "ch*"]),
                3 => s(&["UNSUBSCRIBE", &ch]),
                4 => s(&["UNSUBSCRIBE"]),
                5 => s(&["PUNSUBSCRIBE"]),
                6 => s(&["PING"]),
                7 => s(&["PING", "hi"]),
                _ => s(&["GET", "s0"]),
            };
            return (1, cmd);
        }
        let (k, k2, v) = (self.key(), self.key(), self.val());
        let n = self.rng.gen_range(-1..4).to_string();
        let score = self.pick(&["1", "2.5", "-1", "0", "inf", "-inf", "3", "x", "1e400"]);
        let score2 = self.pick(&["1", "2", "-0.5", "+inf", "0.1", "4"]);
        let (m, m2) = (
            self.pick(&["a", "b", "c", "d"]),
            self.pick(&["a", "b", "e"]),
        );
        let bound = self.pick(&["-inf", "+inf", "(1", "0", "2.5", "(3", "x", "("]);
        let bound2 = self.pick(&["-inf", "+inf", "1", "(2.5", "4"]);
        // Stream ids are explicit (`*` would be each server's own clock);
        // `ms-*` is deterministic.
        let id = format!(
            "{}-{}",
            self.rng.gen_range(0..5),
            self.pick(&["0", "1", "2", "*", "x"])
        );
        let cmd = match self.rng.gen_range(0..84) {
            0 => s(&["SET", &k, &v]),
            1 => s(&["SET", &k, &v, self.pick(&["NX", "XX", "GET", "KEEPTTL"])]),
            2 => s(&["SET", &k, &v, "EX", self.pick(&["100", "0", "x", "-1"])]),
            3 => s(&["SET", &k, &v, "NX", "XX"]),
            4 | 5 => s(&["GET", &k]),
            6 => s(&["MGET", &k, &k2, "s1"]),
            7 => s(&["MSET", &k, &v, &k2]),
            8 => s(&["APPEND", &k, &v]),
            9 => s(&["STRLEN", &k]),
            10 => s(&["INCR", &k]),
            11 => s(&["INCRBY", &k, &v]),
            12 => s(&["DECRBY", &k, &n]),
            13 => s(&["DEL", &k, &k2]),
            14 => s(&["EXISTS", &k, &k2]),
            15 => s(&["TYPE", &k]),
            16 => s(&["EXPIRE", &k, "100", self.pick(&["NX", "XX", "GT", "LT"])]),
            17 => s(&["EXPIRE", &k, &v]),
            18 => s(&["TTL", &k]),
            19 => s(&["PERSIST", &k]),
            20 => s(&["DBSIZE"]),
            21 if !self.in_multi => s(&["KEYS", self.pick(&["*", "s*", "?0", "[lh]*"])]),
            22 if !self.in_multi => s(&["SCAN", "0", "COUNT", "1000"]),
            23 if !self.in_multi => s(&[
                "SCAN",
                "0",
                "COUNT",
                "1000",
                self.pick(&["MATCH", "TYPE"]),
                self.pick(&["list", "s*", "hash", "string", "zset", "stream"]),
            ]),
            24 => s(&[
                "SCAN",
                self.pick(&["x", "-1", "0"]),
                "COUNT",
                self.pick(&["0", "x"]),
            ]),
            25 | 26 => s(&[self.pick(&["LPUSH", "RPUSH"]), &k, &v, "w"]),
            27 => s(&[self.pick(&["LPOP", "RPOP"]), &k]),
            28 => s(&[self.pick(&["LPOP", "RPOP"]), &k, &n]),
            29 => s(&["LRANGE", &k, &n, "-1"]),
            30 => s(&["LLEN", &k]),
            31 => s(&[
                "LMOVE",
                &k,
                &k2,
                self.pick(&["LEFT", "RIGHT", "UP"]),
                "RIGHT",
            ]),
            32 => s(&[
                self.pick(&["BLPOP", "BRPOP"]),
                &k,
                &k2,
                self.pick(&["0.01", "-1", "x"]),
            ]),
            33 => s(&["BLMOVE", &k, &k2, "LEFT", "LEFT", "0.01"]),
            34 | 35 => s(&["HSET", &k, "f", &v, "g", "1"]),
            36 => s(&["HGET", &k, self.pick(&["f", "g", "z"])]),
            37 => s(&["HDEL", &k, "f"]),
            38 if !self.in_multi => s(&["HGETALL", &k]),
            39 => s(&["HLEN", &k]),
            40 => s(&["HEXISTS", &k, "g"]),
            41 if !self.in_multi => s(&["HSCAN", &k, "0", "COUNT", "1000"]),
            42 | 43 => s(&["SADD", &k, &v, "m"]),
            44 => s(&["SREM", &k, &v]),
            45 if !self.in_multi => s(&["SMEMBERS", &k]),
            46 => s(&["SISMEMBER", &k, "m"]),
            47 => s(&["SCARD", &k]),
            48 if !self.in_multi => s(&["SSCAN", &k, "0", "COUNT", "1000", "MATCH", "*"]),
            49 => s(&["MULTI"]),
            50 => s(&["EXEC"]),
            51 => s(&["DISCARD"]),
            52 => s(&["WATCH", &k]),
            53 => s(&["UNWATCH"]),
            54 if !self.in_multi => s(&["PUBLISH", self.pick(&["ch0", "ch1", "other"]), &v]),
            55 => s(&["PUBSUB", "NUMSUB", "ch0", "ch1"]),
            56 if !self.in_multi => s(&["PUBSUB", "CHANNELS"]),
            57 => s(&["PUBSUB", "NUMPAT"]),
            58 => s(&[self.pick(&["NOSUCH", "GET", "SET", "HSET"]), &k]),
            59 => s(&["ECHO", &v]),
            60 => s(&["PING"]),
            61 => s(&["SELECT", self.pick(&["0", "x"])]),
            62 if !self.in_multi => s(&["HELLO", self.pick(&["2", "3", "4", "x"])]),
            64 | 65 => {
                let flag = self.pick(&["NX", "XX", "GT", "LT", "CH", "INCR", "GT", "CH"]);
                if self.rng.gen_range(0..3) == 0 {
                    s(&["ZADD", &k, score, m, score2, m2])
                } else if flag == "INCR" {
                    s(&["ZADD", &k, flag, score, m])
                } else {
                    s(&["ZADD", &k, flag, score, m, score2, m2])
                }
            }
            66 => s(&["ZINCRBY", &k, score, m]),
            67 => s(&["ZSCORE", &k, m]),
            68 => s(&["ZMSCORE", &k, m, m2, "nope"]),
            69 => s(&["ZCARD", &k]),
            70 => s(&["ZCOUNT", &k, bound, bound2]),
            71 => s(&[self.pick(&["ZRANK", "ZREVRANK"]), &k, m]),
            72 => s(&["ZREM", &k, m, m2]),
            73 => s(&[self.pick(&["ZPOPMIN", "ZPOPMAX"]), &k, &n]),
            74 => s(&[
                "ZRANGE",
                &k,
                &n,
                "-1",
                self.pick(&["WITHSCORES", "REV", "BYSCORE", "LIMIT"]),
            ]),
            75 => s(&[
                "ZRANGE",
                &k,
                bound,
                bound2,
                "BYSCORE",
                self.pick(&["REV", "WITHSCORES"]),
                "LIMIT",
                self.pick(&["0", "1", "-1"]),
                &n,
            ]),
            76 => s(&[
                self.pick(&["ZRANGEBYSCORE", "ZREVRANGEBYSCORE"]),
                &k,
                bound2,
                bound,
                "WITHSCORES",
            ]),
            77 if !self.in_multi => s(&["ZSCAN", &k, "0", "COUNT", "1000"]),
            78 | 79 => match self.rng.gen_range(0..4) {
                0 => s(&["XADD", &k, &id, "f", &v]),
                1 => s(&[
                    "XADD",
                    &k,
                    "MAXLEN",
                    self.pick(&["=", "~"]),
                    &n,
                    &id,
                    "f",
                    &v,
                ]),
                2 => s(&["XADD", &k, "NOMKSTREAM", &id, "f", &v, "g", "w"]),
                _ => s(&["XADD", &k, &id, "f"]),
            },
            80 => s(&["XLEN", &k]),
            81 => s(&[
                "XRANGE",
                &k,
                self.pick(&["-", "(1", "2", "x"]),
                self.pick(&["+", "3-1", "(4"]),
                "COUNT",
                &n,
            ]),
            82 => s(&["XREVRANGE", &k, "+", "-", "COUNT", &n]),
            83 => match self.rng.gen_range(0..2) {
                0 => s(&["XDEL", &k, &id, "1-1"]),
                _ => s(&["XTRIM", &k, self.pick(&["MAXLEN", "MINID"]), &n]),
            },
            _ => s(&["SPOP", &k, "0"]),
        };
        (0, cmd)
    }
}

/// The number of replies a (un)subscribe command gets, from a model of
/// connection 1's subscriptions.
fn subscribe_replies(
    cmd: &[String],
    channels: &mut BTreeSet<String>,
    patterns: &mut BTreeSet<String>,
) -> usize {
    let names: Vec<String> = cmd[1..].to_vec();
    match cmd[0].as_str() {
        "SUBSCRIBE" => {
            channels.extend(names.iter().cloned());
            names.len()
        }
        "PSUBSCRIBE" => {
            patterns.extend(names.iter().cloned());
            names.len()
        }
        "UNSUBSCRIBE" | "PUNSUBSCRIBE" => {
            let set = if cmd[0] == "UNSUBSCRIBE" {
                channels
            } else {
                patterns
            };
            if names.is_empty() {
                let n = set.len().max(1);
                set.clear();
                n
            } else {
                for n in &names {
                    set.remove(n);
                }
                names.len()
            }
        }
        _ => 1,
    }
}

/// Confirmations of an argument-less UNSUBSCRIBE come in hash-table order
/// from Redis: compare the names as a set and the counts in order.
fn unsubscribe_all_key(replies: &[R]) -> (Vec<R>, Vec<R>) {
    let mut names = Vec::new();
    let mut counts = Vec::new();
    for r in replies {
        if let R::Array(Some(v)) | R::Push(v) = r {
            if v.len() == 3 {
                names.push(v[1].clone());
                counts.push(v[2].clone());
                continue;
            }
        }
        names.push(r.clone());
    }
    names.sort();
    (names, counts)
}

#[test]
fn replies_match_redis_server() {
    let _deadline = baton_lab::Deadline::start(
        "replies_match_redis_server",
        std::time::Duration::from_secs(240),
    );
    let have = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(have, "redis-server missing: run scripts/setup.sh");
    let c = cluster("kcm", 1);
    // The reference server, on client1's own loopback; the lab kills it by
    // pid when dropped, and so does this test.
    let mut cmd = c.lab.command("client1", "redis-server").unwrap();
    cmd.args([
        "--port",
        "16379",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--daemonize", "no", "--protected-mode", "no"])
    .stdout(Stdio::null());
    let pid = c.lab.spawn(cmd).unwrap();
    let redis_addr: SocketAddr = "127.0.0.1:16379".parse().unwrap();
    let started = Instant::now();
    while c
        .lab
        .run_in("client1", move || TcpStream::connect(redis_addr).is_err())
        .unwrap()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server does not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kv_addr = SocketAddr::new(vip(), KV_PORT);
    // [server][connection]
    let mut conns = [
        [Conn::open(&c, redis_addr), Conn::open(&c, redis_addr)],
        [Conn::open(&c, kv_addr), Conn::open(&c, kv_addr)],
    ];
    let seed = std::env::var("KV_MIX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let mut mix = Mix {
        rng: StdRng::seed_from_u64(seed),
        in_multi: false,
    };
    let (mut channels, mut patterns) = (BTreeSet::new(), BTreeSet::new());
    let mut compared = 0;
    for step in 0..2500 {
        let (slot, cmd) = mix.step();
        let name = cmd[0].to_ascii_uppercase();
        let count = if slot == 1 {
            subscribe_replies(&cmd, &mut channels, &mut patterns)
        } else {
            1
        };
        let mut got: Vec<Vec<R>> = Vec::new();
        for server in conns.iter_mut() {
            server[slot].send(&cmd);
            let mut replies: Vec<R> = (0..count).map(|_| server[slot].read()).collect();
            if name == "PUBLISH" {
                // Each delivery is a message on connection 1, in an order
                // Redis leaves to its pattern table.
                let n = match replies[0] {
                    R::Int(n) => n,
                    _ => 0,
                };
                let mut msgs: Vec<R> = (0..n).map(|_| server[1].read()).collect();
                msgs.sort();
                replies.extend(msgs);
            }
            got.push(replies);
        }
        let (redis, kv) = (got[0].clone(), got[1].clone());
        if name == "HELLO" {
            // Server version and client id differ (README); the reply's
            // type (a map in RESP3) and the protocol chosen must not.
            let kind = |r: &R| std::mem::discriminant(r);
            assert_eq!(kind(&redis[0]), kind(&kv[0]), "step {step} {cmd:?}");
            continue;
        }
        let (redis, kv) = if slot == 1 && cmd.len() == 1 && name.ends_with("UNSUBSCRIBE") {
            let (a, b) = (unsubscribe_all_key(&redis), unsubscribe_all_key(&kv));
            assert_eq!(a, b, "step {step} {cmd:?}");
            continue;
        } else {
            (
                redis
                    .into_iter()
                    .map(|r| normalize(&name, r))
                    .collect::<Vec<_>>(),
                kv.into_iter()
                    .map(|r| normalize(&name, r))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(redis, kv, "step {step} (seed {seed}): {cmd:?}");
        compared += 1;
        match name.as_str() {
            "MULTI" => mix.in_multi = true,
            "EXEC" | "DISCARD" => mix.in_multi = false,
            _ => {}
        }
    }
    eprintln!("{compared} replies compared (seed {seed})");
    assert!(compared > 2000, "only {compared} replies compared");
    c.lab.stop(pid, Duration::from_secs(2));
}
