//! Sorted sets and streams: Redis's recorded replies replayed, then what
//! a recording cannot show (ids from the log's time, WATCH, checkpoints,
//! SCAN paging, trimming by nodes) and a model check of the ordering.

use super::redis_replies::{RESP3, SORTED_SETS, STREAMS};
use super::*;
use proptest::prelude::*;

/// Runs `table` on a fresh kv, each reply compared with Redis's.
fn replay(table: &[(&str, &str)]) {
    let mut h = Harness::new();
    for (i, (cmd, want)) in table.iter().enumerate() {
        let args: Vec<&str> = cmd.split('|').collect();
        let got = h.cmd(&args);
        if args[0] == "HELLO" {
            continue;
        }
        assert_eq!(got, *want, "line {i}: {cmd}");
    }
}

#[test]
fn sorted_set_replies_match_redis() {
    replay(SORTED_SETS);
}

#[test]
fn stream_replies_match_redis() {
    replay(STREAMS);
}

#[test]
fn resp3_replies_match_redis() {
    replay(RESP3);
}

/// The `[member, score, ...]` items of a ZSCAN page, sorted, and its
/// cursor.
fn zscan_page(reply: &str) -> (String, Vec<(String, String)>) {
    let mut p = crate::services::resp::Parser::new();
    // "*2 $cursor *n items" reads as a command once the first header goes.
    let flat = reply.replacen("*2\r\n", "", 1);
    let (head, rest) = flat.split_once("\r\n").unwrap();
    let len: usize = head[1..].parse().unwrap();
    let cursor = rest[..len].to_string();
    let (cmds, _) = p.parse_all(&rest.as_bytes()[len + 2..]);
    let flat: Vec<String> = cmds
        .into_iter()
        .flatten()
        .map(|b| String::from_utf8(b).unwrap())
        .collect();
    let mut pairs: Vec<(String, String)> = flat
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    pairs.sort();
    (cursor, pairs)
}

#[test]
fn zscan_pages_every_member_with_its_score() {
    let mut h = Harness::new();
    h.cmd(&["ZADD", "z", "1", "a", "2.5", "b", "123456789012345678", "c"]);
    let (cursor, pairs) = zscan_page(&h.cmd(&["ZSCAN", "z", "0", "COUNT", "100"]));
    assert_eq!(cursor, "0");
    let want = [("a", "1"), ("b", "2.5"), ("c", "123456789012345680")];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(m, s)| (m.to_string(), s.to_string()))
        .collect();
    assert_eq!(pairs, want);
    let (_, pairs) = zscan_page(&h.cmd(&["ZSCAN", "z", "0", "MATCH", "[ab]", "COUNT", "100"]));
    assert_eq!(pairs, want[..2]);
    // Paging: every member once, while members come and go and the
    // service is restored from checkpoints between pages.
    for i in 0..100 {
        h.cmd(&["ZADD", "big", &i.to_string(), &format!("m{i}")]);
    }
    let mut seen = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut pages = 0;
    loop {
        let (next, pairs) = zscan_page(&h.cmd(&["ZSCAN", "big", &cursor, "COUNT", "7"]));
        for (m, s) in pairs {
            if !m.starts_with("new") {
                assert_eq!(format!("m{s}"), m);
            }
            seen.insert(m);
        }
        pages += 1;
        h.cmd(&["ZADD", "big", "0", &format!("new{pages}")]);
        h.kv = Kv::restore(&h.kv.checkpoint()).unwrap();
        cursor = next;
        if cursor == "0" {
            break;
        }
        assert!(pages < 100);
    }
    assert!(pages > 10);
    assert!((0..100).all(|i| seen.contains(&format!("m{i}"))));
}

#[test]
fn star_ids_come_from_the_log_time() {
    let mut h = Harness::new();
    let now = h.time_ms;
    assert_eq!(
        h.cmd(&["XADD", "s", "*", "f", "v"]),
        format!("${}\r\n{now}-0\r\n", format!("{now}-0").len())
    );
    assert_eq!(
        h.cmd(&["XADD", "s", "*", "f", "v"]),
        format!("$9\r\n{now}-1\r\n")
    );
    h.advance(5);
    let later = now + 5;
    assert_eq!(
        h.cmd(&["XADD", "s", "*", "f", "v"]),
        format!("$9\r\n{later}-0\r\n")
    );
    assert_eq!(
        h.cmd(&["XADD", "s", &format!("{later}-*"), "f", "v"]),
        format!("$9\r\n{later}-1\r\n")
    );
    // An id ahead of the log's time: `*` follows it, never goes back.
    h.cmd(&["XADD", "s", "2000000-7", "f", "v"]);
    assert_eq!(h.cmd(&["XADD", "s", "*", "f", "v"]), "$9\r\n2000000-8\r\n");
    // Deleting the newest entry does not lower the last id.
    h.cmd(&["XDEL", "s", "2000000-8"]);
    assert_eq!(h.cmd(&["XADD", "s", "*", "f", "v"]), "$9\r\n2000000-9\r\n");
    // The same log gives the same ids on another replica.
    let mut again = Harness::new();
    again.cmd(&["XADD", "s", "*", "f", "v"]);
    assert_eq!(
        again.cmd(&["XRANGE", "s", "-", "+"]),
        h.cmd(&["XRANGE", "s", "-", &format!("{now}-0")])
    );
    // A sequence that cannot grow within its millisecond moves to the next.
    h.cmd(&["XADD", "t", "3000000-18446744073709551615", "f", "v"]);
    assert_eq!(h.cmd(&["XADD", "t", "*", "f", "v"]), "$9\r\n3000001-0\r\n");
    assert_eq!(
        h.cmd(&["XADD", "t", "3000001-*", "f", "v"]),
        "$9\r\n3000001-1\r\n"
    );
}

#[test]
fn approximate_trimming_removes_whole_nodes_as_redis() {
    // The counts are redis-server 7.0.15's for the same commands.
    let mut h = Harness::new();
    let add = |h: &mut Harness, ms: u64| {
        let id = format!("{ms}-0");
        assert_eq!(
            h.cmd(&["XADD", "n", &id, "f", "v"]),
            format!("${}\r\n{id}\r\n", id.len())
        );
    };
    for ms in 1..=250 {
        add(&mut h, ms);
    }
    let trim = |h: &mut Harness, args: &[&str]| {
        let mut all = vec!["XTRIM", "n"];
        all.extend_from_slice(args);
        h.cmd(&all)
    };
    assert_eq!(trim(&mut h, &["MAXLEN", "~", "120"]), ":100\r\n");
    assert_eq!(h.cmd(&["XLEN", "n"]), ":150\r\n");
    assert_eq!(trim(&mut h, &["MAXLEN", "~", "120"]), ":0\r\n");
    assert_eq!(trim(&mut h, &["MAXLEN", "~", "0", "LIMIT", "99"]), ":0\r\n");
    assert_eq!(
        trim(&mut h, &["MAXLEN", "~", "0", "LIMIT", "100"]),
        ":100\r\n"
    );
    assert_eq!(h.cmd(&["XLEN", "n"]), ":50\r\n");
    for ms in 201..=250 {
        h.cmd(&["XDEL", "n", &format!("{ms}-0")]);
    }
    assert_eq!(h.cmd(&["XLEN", "n"]), ":0\r\n");
    assert_eq!(h.cmd(&["EXISTS", "n"]), ":1\r\n");
    // The emptied node is gone: appends start a new one.
    add(&mut h, 300);
    assert_eq!(trim(&mut h, &["MAXLEN", "~", "1"]), ":0\r\n");
    assert_eq!(trim(&mut h, &["MINID", "~", "300"]), ":0\r\n");
    for ms in 301..=420 {
        add(&mut h, ms);
    }
    assert_eq!(trim(&mut h, &["MINID", "~", "350"]), ":0\r\n");
    assert_eq!(h.cmd(&["XLEN", "n"]), ":121\r\n");
    let kept = h.kv.checkpoint();
    assert_eq!(trim(&mut h, &["MINID", "~", "450"]), ":121\r\n");
    // Exact trimming goes inside a node.
    h.kv = Kv::restore(&kept).unwrap();
    assert_eq!(trim(&mut h, &["MINID", "350"]), ":50\r\n");
    assert_eq!(trim(&mut h, &["MAXLEN", "=", "10"]), ":61\r\n");
    assert_eq!(
        h.cmd(&["XRANGE", "n", "-", "+", "COUNT", "1"]),
        "*1\r\n*2\r\n$5\r\n411-0\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
}

#[test]
fn new_types_in_the_keyspace() {
    let mut h = Harness::new();
    h.cmd(&["ZADD", "z", "1", "a"]);
    h.cmd(&["XADD", "s", "1-1", "f", "v"]);
    assert_eq!(h.cmd(&["TYPE", "z"]), "+zset\r\n");
    assert_eq!(h.cmd(&["TYPE", "s"]), "+stream\r\n");
    for args in [
        &["GET", "z"][..],
        &["LPUSH", "z", "x"],
        &["HSET", "s", "f", "v"],
        &["SADD", "s", "m"],
        &["INCR", "z"],
        &["SMEMBERS", "z"],
        &["XADD", "z", "*", "f", "v"],
        &["XLEN", "z"],
        &["ZADD", "s", "1", "a"],
        &["ZRANGE", "s", "0", "-1"],
        &["HSCAN", "z", "0"],
        &["SSCAN", "s", "0"],
    ] {
        assert_eq!(h.cmd(args), WT, "{args:?}");
    }
    assert_eq!(
        h.cmd(&["SCAN", "0", "TYPE", "zset", "COUNT", "100"]),
        "*2\r\n$1\r\n0\r\n*1\r\n$1\r\nz\r\n"
    );
    assert_eq!(
        h.cmd(&["SCAN", "0", "TYPE", "stream", "COUNT", "100"]),
        "*2\r\n$1\r\n0\r\n*1\r\n$1\r\ns\r\n"
    );
    assert_eq!(h.cmd(&["EXISTS", "z", "s", "nope"]), ":2\r\n");
    assert_eq!(h.cmd(&["DBSIZE"]), ":2\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "z", "1"]), ":1\r\n");
    assert_eq!(h.cmd(&["PEXPIRE", "s", "1500"]), ":1\r\n");
    h.advance(1001);
    assert_eq!(h.cmd(&["ZCARD", "z"]), ":0\r\n");
    assert_eq!(h.cmd(&["XLEN", "s"]), ":1\r\n");
    h.advance(500);
    assert_eq!(h.cmd(&["EXISTS", "s"]), ":0\r\n");
    h.cmd(&["ZADD", "z", "1", "a"]);
    h.cmd(&["XADD", "s", "1-1", "f", "v"]);
    assert_eq!(h.cmd(&["DEL", "z", "s"]), ":2\r\n");
    assert_eq!(h.cmd(&["KEYS", "*"]), "*0\r\n");
    // Emptied sorted sets go, emptied streams stay (as in Redis).
    h.cmd(&["ZADD", "z", "1", "a"]);
    h.cmd(&["ZPOPMAX", "z"]);
    h.cmd(&["XADD", "s", "1-1", "f", "v"]);
    h.cmd(&["XDEL", "s", "1-1"]);
    assert_eq!(h.cmd(&["KEYS", "*"]), "*1\r\n$1\r\ns\r\n");
    // FLUSHALL takes them too.
    h.cmd(&["ZADD", "z", "1", "a"]);
    h.cmd(&["FLUSHALL"]);
    assert_eq!(h.cmd(&["DBSIZE"]), ":0\r\n");
}

#[test]
fn watch_sees_only_real_changes() {
    let mut h = Harness::new();
    open(&mut h, 2);
    h.cmd(&["ZADD", "z", "1", "a"]);
    h.cmd(&["XADD", "s", "1-1", "f", "v"]);
    let watch_exec = |h: &mut Harness, key: &str, change: &[&str]| -> String {
        h.cmd(&["WATCH", key]);
        cmd_on(h, 2, change);
        h.cmd(&["MULTI"]);
        h.cmd(&["PING"]);
        h.cmd(&["EXEC"])
    };
    let aborted = "*-1\r\n";
    let ran = "*1\r\n+PONG\r\n";
    assert_eq!(watch_exec(&mut h, "z", &["ZADD", "z", "2", "a"]), aborted);
    assert_eq!(watch_exec(&mut h, "z", &["ZADD", "z", "NX", "5", "a"]), ran);
    assert_eq!(watch_exec(&mut h, "z", &["ZADD", "z", "2", "a"]), ran);
    assert_eq!(watch_exec(&mut h, "z", &["ZREM", "z", "nope"]), ran);
    assert_eq!(
        watch_exec(&mut h, "z", &["ZINCRBY", "z", "1", "a"]),
        aborted
    );
    assert_eq!(watch_exec(&mut h, "z", &["ZPOPMIN", "z"]), aborted);
    assert_eq!(
        watch_exec(&mut h, "s", &["XADD", "s", "*", "f", "v"]),
        aborted
    );
    assert_eq!(watch_exec(&mut h, "s", &["XDEL", "s", "9-9"]), ran);
    assert_eq!(
        watch_exec(&mut h, "s", &["XTRIM", "s", "MAXLEN", "0"]),
        aborted
    );
    // Inside a transaction they queue and run.
    h.cmd(&["MULTI"]);
    assert_eq!(h.cmd(&["ZADD", "q", "1", "a"]), "+QUEUED\r\n");
    assert_eq!(h.cmd(&["XADD", "qs", "5-5", "f", "v"]), "+QUEUED\r\n");
    assert_eq!(
        h.cmd(&["EXEC"]),
        "*2\r\n:1\r\n$3\r\n5-5\r\n",
        "MULTI/EXEC with the new types"
    );
}

#[test]
fn checkpoints_keep_sorted_sets_and_streams() {
    let mut h = Harness::new();
    h.cmd(&[
        "ZADD", "z", "-inf", "lo", "1.5", "a", "inf", "hi", "0", "zero",
    ]);
    h.cmd(&["XADD", "s", "*", "f", "v", "g", "w"]);
    h.cmd(&["XADD", "s", "MAXLEN", "~", "5", "*", "f", "v"]);
    h.cmd(&["XADD", "e", "7-7", "f", "v"]);
    h.cmd(&["XDEL", "e", "7-7"]);
    let bytes = h.kv.checkpoint();
    assert_eq!(bytes[0] as u32, checkpoint::VERSION);
    let mut restored = Kv::restore(&bytes).unwrap();
    assert_eq!(restored, h.kv);
    assert_eq!(restored.checkpoint(), bytes);
    // It continues as the original: the empty stream kept its last id.
    std::mem::swap(&mut restored, &mut h.kv);
    assert_eq!(
        h.cmd(&["ZRANGE", "z", "0", "-1", "WITHSCORES"]),
        "*8\r\n$2\r\nlo\r\n$4\r\n-inf\r\n$4\r\nzero\r\n$1\r\n0\r\n$1\r\na\r\n$3\r\n1.5\r\n$2\r\nhi\r\n$3\r\ninf\r\n"
    );
    assert_eq!(h.cmd(&["XLEN", "s"]), ":2\r\n");
    assert_eq!(
        h.cmd(&["XADD", "e", "7-7", "f", "v"]),
        "-ERR The ID specified in XADD is equal or smaller than the target stream top item\r\n"
    );
    // A NaN score or a stream whose ids pass its last id is refused.
    let value = |v: db::Value| {
        let snap = (
            checkpoint::VERSION,
            BTreeMap::from([(b"k".to_vec(), v)]),
            BTreeMap::<Vec<u8>, u64>::new(),
            BTreeMap::<ConnId, Conn>::new(),
            0u64,
            0u64,
        );
        postcard::to_allocvec(&snap).unwrap()
    };
    let mut z = zset::ZSet::default();
    z.insert(b"m", zset::Score::new(1.0).unwrap());
    let good = value(db::Value::ZSet(z));
    assert!(Kv::restore(&good).is_ok());
    // The score's 8 bytes are the last before the three empty fields.
    let mut nan = good.clone();
    let at = nan.len() - 3 - 8;
    nan[at..at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
    assert!(Kv::restore(&nan).is_err());
    let mut s = stream::Stream::default();
    s.append(
        stream::StreamId { ms: 1, seq: 1 },
        vec![b"f".to_vec(), b"v".to_vec()],
    );
    assert!(Kv::restore(&value(db::Value::Stream(s.clone()))).is_ok());
    s.last_id = stream::StreamId::default();
    assert!(Kv::restore(&value(db::Value::Stream(s.clone()))).is_err());
    let mut odd = stream::Stream::default();
    odd.append(stream::StreamId { ms: 1, seq: 1 }, vec![b"f".to_vec()]);
    assert!(Kv::restore(&value(db::Value::Stream(odd))).is_err());
    // Every single-byte change is refused or gives a store that runs.
    for i in 0..bytes.len() {
        for x in [0u8, 1, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] = x;
            if let Ok(mut kv) = Kv::restore(&b) {
                let mut ctx = Context::new(2_000_000, 1);
                kv.on_data(
                    &mut ctx,
                    1,
                    b"ZRANGE z 0 -1 WITHSCORES\r\nXADD s * a b\r\nXRANGE s - +\r\nZPOPMIN z 9\r\n",
                );
            }
        }
    }
}

#[test]
fn version_2_checkpoints_restore() {
    let snap = (
        2u32,
        BTreeMap::from([(b"k".to_vec(), db::Value::Str(b"v".to_vec()))]),
        BTreeMap::<Vec<u8>, u64>::new(),
        BTreeMap::<ConnId, Conn>::new(),
        0u64,
        0u64,
    );
    let mut kv = Kv::restore(&postcard::to_allocvec(&snap).unwrap()).unwrap();
    let mut ctx = Context::new(1, 1);
    kv.on_data(&mut ctx, 1, b"GET k\r\n");
    assert!(ctx
        .into_outputs()
        .iter()
        .any(|o| matches!(o, Output::Send { bytes, .. } if bytes == b"$1\r\nv\r\n")));
}

#[test]
fn doubles_print_as_redis_7_0() {
    use crate::services::resp::format_double;
    for (d, text) in [
        (1.0, "1"),
        (1.5, "1.5"),
        (-0.25, "-0.25"),
        (0.1, "0.10000000000000001"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e21, "1e+21"),
        (1e17, "1e+17"),
        (1e16, "10000000000000000"),
        (3e-5, "3.0000000000000001e-05"),
        (0.0001, "0.0001"),
        (f64::MAX, "1.7976931348623157e+308"),
        (5e-324, "4.9406564584124654e-324"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
        (0.0, "0"),
    ] {
        assert_eq!(format_double(d), text, "{d:e}");
    }
    // Exact decimal ties round to even, as glibc's printf.
    assert_eq!(format_double(1.0 + 2f64.powi(-17)), "1.0000076293945312");
    assert_eq!(
        format_double(1.0 + 3.0 * 2f64.powi(-17)),
        "1.0000228881835938"
    );
    assert_eq!(format_double(0.5 + 2f64.powi(-18)), "0.50000381469726562");
    let mut w = crate::services::resp::Writer::new(true);
    w.double(1.5);
    w.double(f64::INFINITY);
    assert_eq!(w.buf, b",1.5\r\n,inf\r\n");
}

/// A sorted set as a plain sorted list, to check the ordered maps against.
fn model_range(items: &[(f64, Vec<u8>)], r: &zset::ScoreRange) -> Vec<(Vec<u8>, f64)> {
    items
        .iter()
        .filter(|(s, _)| {
            let above = if r.min_ex { *s > r.min } else { *s >= r.min };
            let below = if r.max_ex { *s < r.max } else { *s <= r.max };
            above && below
        })
        .map(|(s, m)| (m.clone(), *s))
        .collect()
}

fn arb_score() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => (-5i32..5).prop_map(f64::from),
        1 => (-5i32..5).prop_map(|n| f64::from(n) + 0.5),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-0.0),
        1 => Just(5e-324),
        1 => Just(-5e-324),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn zset_orders_and_ranges_like_a_sorted_list(
        ops in prop::collection::vec((0u8..8, arb_score(), any::<bool>()), 0..40),
        bounds in (arb_score(), any::<bool>(), arb_score(), any::<bool>()),
    ) {
        let mut z = zset::ZSet::default();
        let mut model: BTreeMap<Vec<u8>, f64> = BTreeMap::new();
        for (member, score, remove) in &ops {
            let m = vec![b'a' + member];
            if *remove && model.contains_key(&m) {
                prop_assert_eq!(z.remove(&m), model.remove(&m));
            } else {
                let s = if *score == 0.0 { 0.0 } else { *score };
                z.insert(&m, zset::Score::new(*score).unwrap());
                model.insert(m, s);
            }
        }
        let mut sorted: Vec<(f64, Vec<u8>)> =
            model.iter().map(|(m, s)| (*s, m.clone())).collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let got: Vec<(Vec<u8>, f64)> = z.iter().map(|(m, s)| (m.clone(), s)).collect();
        let want: Vec<(Vec<u8>, f64)> = sorted.iter().map(|(s, m)| (m.clone(), *s)).collect();
        prop_assert_eq!(&got, &want);
        for (i, (_, m)) in sorted.iter().enumerate() {
            prop_assert_eq!(z.rank(m), Some(i));
        }
        let (min, min_ex, max, max_ex) = bounds;
        let r = zset::ScoreRange { min, min_ex, max, max_ex };
        let got: Vec<(Vec<u8>, f64)> =
            z.range_by_score(&r).map(|(m, s)| (m.clone(), s)).collect();
        prop_assert_eq!(&got, &model_range(&sorted, &r));
        let back: Vec<(Vec<u8>, f64)> =
            z.range_by_score(&r).rev().map(|(m, s)| (m.clone(), s)).collect();
        let mut fwd = got.clone();
        fwd.reverse();
        prop_assert_eq!(back, fwd);
    }
}
