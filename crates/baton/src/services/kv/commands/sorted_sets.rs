//! Sorted-set commands: ZADD (`NX XX GT LT CH INCR`), ZINCRBY, ZSCORE,
//! ZMSCORE, ZCARD, ZCOUNT, ZLEXCOUNT, ZRANK, ZREVRANK, ZREM, ZPOPMIN,
//! ZPOPMAX, ZRANGE (`BYSCORE BYLEX REV LIMIT WITHSCORES`), ZREVRANGE,
//! ZRANGEBYSCORE, ZREVRANGEBYSCORE, ZRANGEBYLEX, ZREVRANGEBYLEX, ZSCAN,
//! with Redis 7.0's replies, error texts and argument checks in its order.

use super::keys::scan_container;
use super::{count_arg, Call, Flow, NOT_INTEGER, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{Value, WrongType, ZSet};
use crate::services::kv::zset::{parse_score, LexRange, Score, ScoreRange};
use crate::services::kv::Kv;
use crate::services::resp::{parse_i64, Writer};

const NOT_FLOAT: &str = "ERR value is not a valid float";
const RANGE_NOT_FLOAT: &str = "ERR min or max is not a float";
const LEX_RANGE: &str = "ERR min or max not valid string range item";
const NAN_RESULT: &str = "ERR resulting score is not a number (NaN)";

/// ZADD's flags (ZINCRBY is ZADD with `incr`).
#[derive(Debug, Default, Clone, Copy)]
struct AddFlags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
    ch: bool,
    incr: bool,
}

/// `ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member ...]`.
pub fn zadd(kv: &mut Kv, c: &mut Call) -> Flow {
    let mut f = AddFlags::default();
    let mut i = 2;
    while let Some(opt) = c.args.get(i) {
        match opt.to_ascii_lowercase().as_slice() {
            b"nx" => f.nx = true,
            b"xx" => f.xx = true,
            b"gt" => f.gt = true,
            b"lt" => f.lt = true,
            b"ch" => f.ch = true,
            b"incr" => f.incr = true,
            _ => break,
        }
        i += 1;
    }
    let pairs = &c.args[i..];
    if pairs.is_empty() || pairs.len() % 2 == 1 {
        c.out.err(SYNTAX);
        return Flow::Continue;
    }
    if f.nx && f.xx {
        c.out
            .err("ERR XX and NX options at the same time are not compatible");
        return Flow::Continue;
    }
    if (f.nx && (f.gt || f.lt)) || (f.gt && f.lt) {
        c.out
            .err("ERR GT, LT, and/or NX options at the same time are not compatible");
        return Flow::Continue;
    }
    if f.incr && pairs.len() > 2 {
        c.out
            .err("ERR INCR option supports a single increment-element pair");
        return Flow::Continue;
    }
    add(kv, c, f, i)
}

/// `ZINCRBY key increment member`.
pub fn zincrby(kv: &mut Kv, c: &mut Call) -> Flow {
    let f = AddFlags {
        incr: true,
        ..AddFlags::default()
    };
    add(kv, c, f, 2)
}

/// Applies the score-member pairs from `c.args[first..]`: every score is
/// parsed before anything changes, as Redis does.
fn add(kv: &mut Kv, c: &mut Call, f: AddFlags, first: usize) -> Flow {
    let pairs = &c.args[first..];
    let mut scores = Vec::with_capacity(pairs.len() / 2);
    for p in pairs.chunks(2) {
        match parse_score(&p[0]) {
            Some(s) => scores.push(s),
            None => {
                c.out.err(NOT_FLOAT);
                return Flow::Continue;
            }
        }
    }
    let key = &c.args[1];
    let exists = match kv.db.zset(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(z) => z.is_some(),
    };
    let (mut added, mut updated, mut processed) = (0i64, 0i64, 0);
    let mut last = 0.0;
    if exists || !f.xx {
        if !exists {
            kv.db.insert(key, Value::ZSet(ZSet::default()), false);
        }
        let Ok(Some(z)) = kv.db.get_zset(key) else {
            return Flow::Continue;
        };
        for (score, p) in scores.iter().zip(pairs.chunks(2)) {
            let member = &p[1];
            match z.score(member) {
                Some(current) => {
                    if f.nx {
                        continue;
                    }
                    let mut new = score.get();
                    if f.incr {
                        new += current;
                    }
                    let Some(new_score) = Score::new(new) else {
                        c.out.err(NAN_RESULT);
                        kv.db.drop_if_empty(key);
                        return Flow::Continue;
                    };
                    if (f.lt && new >= current) || (f.gt && new <= current) {
                        continue;
                    }
                    processed += 1;
                    last = new_score.get();
                    if new != current {
                        z.insert(member, new_score);
                        updated += 1;
                    }
                }
                None => {
                    if f.xx {
                        continue;
                    }
                    z.insert(member, *score);
                    added += 1;
                    processed += 1;
                    last = score.get();
                }
            }
        }
        if added + updated > 0 {
            kv.db.touch(key);
        }
        kv.db.drop_if_empty(key);
    }
    if f.incr {
        if processed > 0 {
            c.out.double(last);
        } else {
            c.out.null();
        }
    } else {
        c.out.int(if f.ch { added + updated } else { added });
    }
    Flow::Continue
}

pub fn zscore(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => match z.and_then(|z| z.score(&c.args[2])) {
            Some(s) => c.out.double(s),
            None => c.out.null(),
        },
    }
    Flow::Continue
}

pub fn zmscore(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => {
            c.out.array(c.args.len() - 2);
            for m in &c.args[2..] {
                match z.and_then(|z| z.score(m)) {
                    Some(s) => c.out.double(s),
                    None => c.out.null(),
                }
            }
        }
    }
    Flow::Continue
}

pub fn zcard(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => c.out.int(z.map_or(0, ZSet::len) as i64),
    }
    Flow::Continue
}

/// `ZCOUNT key min max`.
pub fn zcount(kv: &mut Kv, c: &mut Call) -> Flow {
    let Some(range) = ScoreRange::parse(&c.args[2], &c.args[3]) else {
        c.out.err(RANGE_NOT_FLOAT);
        return Flow::Continue;
    };
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => c
            .out
            .int(z.map_or(0, |z| z.range_by_score(&range).count()) as i64),
    }
    Flow::Continue
}

/// `ZLEXCOUNT key min max`.
pub fn zlexcount(kv: &mut Kv, c: &mut Call) -> Flow {
    let Some(range) = LexRange::parse(&c.args[2], &c.args[3]) else {
        c.out.err(LEX_RANGE);
        return Flow::Continue;
    };
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => {
            let n = z.map_or(0, |z| z.iter().filter(|(m, _)| range.contains(m)).count());
            c.out.int(n as i64);
        }
    }
    Flow::Continue
}

pub fn zrank(kv: &mut Kv, c: &mut Call) -> Flow {
    rank(kv, c, false)
}

pub fn zrevrank(kv: &mut Kv, c: &mut Call) -> Flow {
    rank(kv, c, true)
}

fn rank(kv: &mut Kv, c: &mut Call, rev: bool) -> Flow {
    match kv.db.zset(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(z) => match z.and_then(|z| Some((z.len(), z.rank(&c.args[2])?))) {
            Some((len, r)) => c.out.int(if rev { len - 1 - r } else { r } as i64),
            None => c.out.null(),
        },
    }
    Flow::Continue
}

pub fn zrem(kv: &mut Kv, c: &mut Call) -> Flow {
    let key = &c.args[1];
    match kv.db.get_zset(key) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.int(0),
        Ok(Some(z)) => {
            let n = c.args[2..].iter().filter(|m| z.remove(m).is_some()).count();
            if n > 0 {
                kv.db.touch(key);
            }
            kv.db.drop_if_empty(key);
            c.out.int(n as i64);
        }
    }
    Flow::Continue
}

pub fn zpopmin(kv: &mut Kv, c: &mut Call) -> Flow {
    pop(kv, c, false)
}

pub fn zpopmax(kv: &mut Kv, c: &mut Call) -> Flow {
    pop(kv, c, true)
}

/// `ZPOPMIN|ZPOPMAX key [count]`: a flat member-score array, nested pairs
/// in RESP3 when a count is given.
fn pop(kv: &mut Kv, c: &mut Call, max: bool) -> Flow {
    if c.args.len() > 3 {
        c.out.err(SYNTAX);
        return Flow::Continue;
    }
    let count = match count_arg(c.args.get(2)) {
        Ok(n) => n,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let key = &c.args[1];
    let z = match kv.db.get_zset(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            c.out.array(0);
            return Flow::Continue;
        }
        Ok(Some(z)) => z,
    };
    if count == Some(0) {
        c.out.array(0);
        return Flow::Continue;
    }
    let n = count.unwrap_or(1).min(z.len() as u64) as usize;
    let nested = c.out.resp3 && count.is_some();
    c.out.array(if nested { n } else { n * 2 });
    for _ in 0..n {
        if let Some((m, s)) = z.pop(max) {
            if nested {
                c.out.array(2);
            }
            c.out.bulk(&m);
            c.out.double(s);
        }
    }
    kv.db.touch(key);
    kv.db.drop_if_empty(key);
    Flow::Continue
}

/// What a range command ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    /// ZRANGE before its options are read: rank unless BYSCORE or BYLEX.
    Auto,
    Rank,
    Score,
    Lex,
}

/// `ZRANGE key start stop [BYSCORE|BYLEX] [REV] [LIMIT offset count]
/// [WITHSCORES]`.
pub fn zrange(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Auto, None)
}

pub fn zrevrange(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Rank, Some(true))
}

pub fn zrangebyscore(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Score, Some(false))
}

pub fn zrevrangebyscore(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Score, Some(true))
}

pub fn zrangebylex(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Lex, Some(false))
}

pub fn zrevrangebylex(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, By::Lex, Some(true))
}

/// The range commands, as Redis 7.0's `zrangeGenericCommand`: options,
/// their conflicts, the range, then the key.
fn range(kv: &mut Kv, c: &mut Call, mut by: By, mut rev: Option<bool>) -> Flow {
    let args = c.args;
    let (mut withscores, mut offset, mut limit) = (false, 0i64, -1i64);
    let mut j = 4;
    while j < args.len() {
        let left = args.len() - j - 1;
        match args[j].to_ascii_lowercase().as_slice() {
            b"withscores" => withscores = true,
            b"limit" if left >= 2 => {
                match (parse_i64(&args[j + 1]), parse_i64(&args[j + 2])) {
                    (Some(o), Some(l)) => (offset, limit) = (o, l),
                    _ => {
                        c.out.err(NOT_INTEGER);
                        return Flow::Continue;
                    }
                }
                j += 2;
            }
            b"rev" if rev.is_none() => rev = Some(true),
            b"bylex" if by == By::Auto => by = By::Lex,
            b"byscore" if by == By::Auto => by = By::Score,
            _ => {
                c.out.err(SYNTAX);
                return Flow::Continue;
            }
        }
        j += 1;
    }
    let rev = rev.unwrap_or(false);
    if by == By::Auto {
        by = By::Rank;
    }
    if limit != -1 && by == By::Rank {
        c.out.err(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        );
        return Flow::Continue;
    }
    if withscores && by == By::Lex {
        c.out
            .err("ERR syntax error, WITHSCORES not supported in combination with BYLEX");
        return Flow::Continue;
    }
    // Reversed score and lex ranges are written max first.
    let (lo, hi) = if rev && by != By::Rank {
        (&args[3], &args[2])
    } else {
        (&args[2], &args[3])
    };
    enum Span {
        Rank(i64, i64),
        Score(ScoreRange),
        Lex(LexRange),
    }
    let span = match by {
        By::Score => match ScoreRange::parse(lo, hi) {
            Some(r) => Span::Score(r),
            None => {
                c.out.err(RANGE_NOT_FLOAT);
                return Flow::Continue;
            }
        },
        By::Lex => match LexRange::parse(lo, hi) {
            Some(r) => Span::Lex(r),
            None => {
                c.out.err(LEX_RANGE);
                return Flow::Continue;
            }
        },
        _ => match (parse_i64(lo), parse_i64(hi)) {
            (Some(a), Some(b)) => Span::Rank(a, b),
            _ => {
                c.out.err(NOT_INTEGER);
                return Flow::Continue;
            }
        },
    };
    let z = match kv.db.zset(&args[1]) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            c.out.array(0);
            return Flow::Continue;
        }
        Ok(Some(z)) => z,
    };
    let items: Vec<(&Vec<u8>, f64)> = match span {
        Span::Rank(start, end) => {
            let len = z.len() as i64;
            let start = if start < 0 { len + start } else { start }.max(0);
            let end = if end < 0 { len + end } else { end };
            if start > end || start >= len {
                Vec::new()
            } else {
                let n = (end.min(len - 1) - start + 1) as usize;
                let start = start as usize;
                if rev {
                    z.iter().rev().skip(start).take(n).collect()
                } else {
                    z.iter().skip(start).take(n).collect()
                }
            }
        }
        Span::Score(r) => {
            let all = z.range_by_score(&r);
            let picked: Box<dyn Iterator<Item = _>> = if rev {
                Box::new(all.rev())
            } else {
                Box::new(all)
            };
            page(picked, offset, limit, z.len())
        }
        Span::Lex(r) => {
            let all = z.iter().filter(|(m, _)| r.contains(m));
            let picked: Box<dyn Iterator<Item = _>> = if rev {
                Box::new(all.rev())
            } else {
                Box::new(all)
            };
            page(picked, offset, limit, z.len())
        }
    };
    write_members(c.out, &items, withscores);
    Flow::Continue
}

/// LIMIT as Redis applies it: an offset at or past the set's size, or
/// below zero, gives nothing; a negative count takes all.
fn page<'a>(
    items: impl Iterator<Item = (&'a Vec<u8>, f64)>,
    offset: i64,
    limit: i64,
    len: usize,
) -> Vec<(&'a Vec<u8>, f64)> {
    if offset < 0 || (offset > 0 && offset as u64 >= len as u64) {
        return Vec::new();
    }
    let items = items.skip(offset as usize);
    match usize::try_from(limit) {
        Ok(n) => items.take(n).collect(),
        Err(_) => items.collect(),
    }
}

/// Members, with their scores if asked: flat in RESP2, pairs in RESP3.
fn write_members(out: &mut Writer, items: &[(&Vec<u8>, f64)], withscores: bool) {
    let nested = withscores && out.resp3;
    out.array(if withscores && !nested {
        items.len() * 2
    } else {
        items.len()
    });
    for (m, s) in items {
        if nested {
            out.array(2);
        }
        out.bulk(m);
        if withscores {
            out.double(*s);
        }
    }
}

/// `ZSCAN key cursor [MATCH pattern] [COUNT count]`: member, score pairs.
pub fn zscan(kv: &mut Kv, c: &mut Call) -> Flow {
    scan_container::<ZSet>(kv, c)
}
