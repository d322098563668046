//! Keyspace commands: DEL, EXISTS, TYPE, KEYS, SCAN, EXPIRE, PEXPIRE,
//! TTL, PTTL, PERSIST, DBSIZE, FLUSHALL, FLUSHDB.

use std::borrow::Cow;

use super::{scan_opts, signed, Call, Flow, NOT_INTEGER, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{glob_match, scan_members, Hash, Set, Value, ZSet};
use crate::services::kv::Kv;
use crate::services::resp::{format_double, parse_i64};

pub fn del(kv: &mut Kv, c: &mut Call) -> Flow {
    let n = c.args[1..]
        .iter()
        .filter(|k| kv.db.remove(k).is_some())
        .count();
    c.out.int(n as i64);
    Flow::Continue
}

pub fn exists(kv: &mut Kv, c: &mut Call) -> Flow {
    let n = c.args[1..].iter().filter(|k| kv.db.contains(k)).count();
    c.out.int(n as i64);
    Flow::Continue
}

pub fn type_(kv: &mut Kv, c: &mut Call) -> Flow {
    let t = kv.db.get(&c.args[1]).map_or("none", |v| v.type_name());
    c.out.simple(t.as_bytes());
    Flow::Continue
}

pub fn keys(kv: &mut Kv, c: &mut Call) -> Flow {
    let keys: Vec<&Vec<u8>> = kv
        .db
        .data()
        .keys()
        .filter(|k| glob_match(&c.args[1], k, false))
        .collect();
    c.out.array(keys.len());
    for k in keys {
        c.out.bulk(k);
    }
    Flow::Continue
}

/// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]`: COUNT keys are
/// examined per call, then filtered, as Redis does.
pub fn scan(kv: &mut Kv, c: &mut Call) -> Flow {
    let (cursor, opts) = match scan_opts(&c.args[1], &c.args[2..], true) {
        Ok(v) => v,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let (next, page) = kv.db.scan(cursor, opts.count);
    let keys: Vec<&Vec<u8>> = page
        .into_iter()
        .filter(|k| {
            opts.pattern
                .as_ref()
                .is_none_or(|p| glob_match(p, k, false))
        })
        .filter(|k| {
            opts.type_name.as_ref().is_none_or(|t| {
                kv.db
                    .get(k)
                    .is_some_and(|v| v.type_name().as_bytes() == t.as_slice())
            })
        })
        .collect();
    write_page(c, next, &keys);
    Flow::Continue
}

/// The `[cursor, [elements...]]` reply of the SCAN family.
pub fn write_page<T: AsRef<[u8]>>(c: &mut Call, next: u64, items: &[T]) {
    c.out.array(2);
    c.out.bulk(next.to_string().as_bytes());
    c.out.array(items.len());
    for i in items {
        c.out.bulk(i.as_ref());
    }
}

/// A container HSCAN, SSCAN or ZSCAN pages through.
pub trait Scanned {
    /// The value's container, `None` for a value of another type.
    fn of(value: &Value) -> Option<&Self>;
    /// Its members, in any order.
    fn members(&self) -> impl Iterator<Item = &Vec<u8>>;
    /// What the reply carries after a member: a field's value, a member's
    /// score; nothing for a set.
    fn follow(&self, member: &[u8]) -> Option<Cow<'_, [u8]>>;
}

impl Scanned for Hash {
    fn of(value: &Value) -> Option<&Hash> {
        match value {
            Value::Hash(h) => Some(h),
            _ => None,
        }
    }
    fn members(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.keys()
    }
    fn follow(&self, member: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.get(member).map(|v| Cow::Borrowed(v.as_slice()))
    }
}

impl Scanned for Set {
    fn of(value: &Value) -> Option<&Set> {
        match value {
            Value::Set(s) => Some(s),
            _ => None,
        }
    }
    fn members(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.iter()
    }
    fn follow(&self, _member: &[u8]) -> Option<Cow<'_, [u8]>> {
        None
    }
}

impl Scanned for ZSet {
    fn of(value: &Value) -> Option<&ZSet> {
        match value {
            Value::ZSet(z) => Some(z),
            _ => None,
        }
    }
    fn members(&self) -> impl Iterator<Item = &Vec<u8>> {
        ZSet::members(self)
    }
    fn follow(&self, member: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.score(member)
            .map(|s| Cow::Owned(stored_double(s).into_bytes()))
    }
}

/// A score as Redis 7.0 stores it as text (`d2string`), which ZSCAN
/// sends: an integer within +-2^62 in plain digits, else as
/// [`format_double`].
pub fn stored_double(d: f64) -> String {
    const LIMIT: f64 = (i64::MAX / 2) as f64;
    if (-LIMIT..=LIMIT).contains(&d) && d.fract() == 0.0 {
        // Exact: |d| < 2^63 and integral. -0 prints as 0 (never stored).
        (d as i64).to_string()
    } else {
        format_double(d)
    }
}

/// `HSCAN|SSCAN|ZSCAN key cursor [MATCH pattern] [COUNT count]`: one page
/// of the container's members in scan-hash order (see
/// [`scan_members`]), those matching each followed by what
/// [`Scanned::follow`] gives.
pub fn scan_container<T: Scanned>(kv: &mut Kv, c: &mut Call) -> Flow {
    let (cursor, opts) = match scan_opts(&c.args[2], &c.args[3..], false) {
        Ok(v) => v,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let container = match kv.db.get(&c.args[1]) {
        None => {
            write_page::<&[u8]>(c, 0, &[]);
            return Flow::Continue;
        }
        Some(v) => match T::of(v) {
            Some(t) => t,
            None => {
                c.out.err(WRONGTYPE);
                return Flow::Continue;
            }
        },
    };
    let (next, page) = scan_members(container.members(), cursor, opts.count);
    let mut items: Vec<Cow<[u8]>> = Vec::new();
    for m in page {
        if opts
            .pattern
            .as_ref()
            .is_none_or(|p| glob_match(p, m, false))
        {
            items.push(Cow::Borrowed(m));
            items.extend(container.follow(m));
        }
    }
    write_page(c, next, &items);
    Flow::Continue
}

pub fn expire(kv: &mut Kv, c: &mut Call) -> Flow {
    expire_in(kv, c, "expire", 1000)
}

pub fn pexpire(kv: &mut Kv, c: &mut Call) -> Flow {
    expire_in(kv, c, "pexpire", 1)
}

/// `EXPIRE key seconds [NX|XX|GT|LT]` (and PEXPIRE with `unit` 1).
fn expire_in(kv: &mut Kv, c: &mut Call, name: &str, unit: i64) -> Flow {
    let args = c.args;
    let now = c.now();
    let out = &mut *c.out;
    let db = &mut kv.db;
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
                out.error(&msg);
                return Flow::Continue;
            }
        }
    }
    if nx && (xx || gt || lt) {
        out.err("ERR NX and XX, GT or LT options at the same time are not compatible");
        return Flow::Continue;
    }
    if gt && lt {
        out.err("ERR GT and LT options at the same time are not compatible");
        return Flow::Continue;
    }
    let Some(n) = parse_i64(&args[2]) else {
        out.err(NOT_INTEGER);
        return Flow::Continue;
    };
    let Some(when) = n
        .checked_mul(unit)
        .and_then(|ms| ms.checked_add(signed(now)))
    else {
        out.err(&format!("ERR invalid expire time in '{name}' command"));
        return Flow::Continue;
    };
    let key = &args[1];
    if !db.contains(key) {
        out.int(0);
        return Flow::Continue;
    }
    let current = db.expire_at(key).map(|at| at as i64);
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.is_none_or(|c| when <= c))
        || (lt && current.is_some_and(|c| when >= c));
    if refused {
        out.int(0);
        return Flow::Continue;
    }
    if when <= signed(now) {
        db.remove(key);
    } else {
        db.set_expire(key, when as u64);
    }
    out.int(1);
    Flow::Continue
}

pub fn ttl(kv: &mut Kv, c: &mut Call) -> Flow {
    time_left(kv, c, true)
}

pub fn pttl(kv: &mut Kv, c: &mut Call) -> Flow {
    time_left(kv, c, false)
}

fn time_left(kv: &mut Kv, c: &mut Call, seconds: bool) -> Flow {
    let key = &c.args[1];
    let reply = if !kv.db.contains(key) {
        -2
    } else if let Some(at) = kv.db.expire_at(key) {
        let ms = at.saturating_sub(c.now()).min(i64::MAX as u64) as i64;
        if seconds {
            ms.saturating_add(500) / 1000
        } else {
            ms
        }
    } else {
        -1
    };
    c.out.int(reply);
    Flow::Continue
}

pub fn persist(kv: &mut Kv, c: &mut Call) -> Flow {
    let key = &c.args[1];
    let had = kv.db.contains(key) && kv.db.clear_expire(key);
    c.out.int(i64::from(had));
    Flow::Continue
}

pub fn dbsize(kv: &mut Kv, c: &mut Call) -> Flow {
    c.out.int(kv.db.len() as i64);
    Flow::Continue
}

/// `FLUSHALL|FLUSHDB [ASYNC|SYNC]`.
pub fn flush(kv: &mut Kv, c: &mut Call) -> Flow {
    let mode_ok = match c.args.len() {
        1 => true,
        2 => c.args[1].eq_ignore_ascii_case(b"sync") || c.args[1].eq_ignore_ascii_case(b"async"),
        _ => false,
    };
    if mode_ok {
        kv.db.flush();
        c.out.ok();
    } else {
        c.out.err(SYNTAX);
    }
    Flow::Continue
}
