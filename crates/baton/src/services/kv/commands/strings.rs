//! String commands: GET, SET, MGET, MSET, APPEND, STRLEN, INCR, DECR,
//! INCRBY, DECRBY.

use super::{arity_error, signed, Call, Flow, NOT_INTEGER, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{Db, Value, WrongType};
use crate::services::kv::Kv;
use crate::services::resp::{parse_i64, MAX_BULK_LEN};

const OVERFLOW: &str = "ERR increment or decrement would overflow";
const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

pub fn get(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_str(&c.args[1]) {
        Ok(Some(v)) => c.out.bulk(v),
        Ok(None) => c.out.null(),
        Err(WrongType) => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|KEEPTTL]`.
pub fn set(kv: &mut Kv, c: &mut Call) -> Flow {
    #[derive(PartialEq)]
    enum Ttl {
        None,
        Keep,
        Ex(Vec<u8>),
        Px(Vec<u8>),
    }
    let args = c.args;
    let now = c.now();
    let db = &mut kv.db;
    let out = &mut *c.out;
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
            _ => {
                out.err(SYNTAX);
                return Flow::Continue;
            }
        }
        i += 1;
    }
    let deadline = match &ttl {
        Ttl::Ex(v) | Ttl::Px(v) => {
            let Some(n) = parse_i64(v) else {
                out.err(NOT_INTEGER);
                return Flow::Continue;
            };
            let unit = if matches!(ttl, Ttl::Ex(_)) { 1000 } else { 1 };
            let at = n
                .checked_mul(unit)
                .filter(|ms| *ms > 0)
                .and_then(|ms| ms.checked_add(signed(now)));
            match at {
                Some(at) => Some(at as u64),
                None => {
                    out.err("ERR invalid expire time in 'set' command");
                    return Flow::Continue;
                }
            }
        }
        _ => None,
    };
    let key = &args[1];
    let old = match db.get(key) {
        None => None,
        Some(Value::Str(v)) => Some(v.clone()),
        Some(_) if get => {
            out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Some(_) => Some(Vec::new()),
    };
    let exists = db.contains(key);
    if (nx && exists) || (xx && !exists) {
        match (get, old) {
            (true, Some(v)) => out.bulk(&v),
            _ => out.null(),
        }
        return Flow::Continue;
    }
    db.set_str(key, args[2].clone(), ttl == Ttl::Keep);
    if let Some(at) = deadline {
        db.set_expire(key, at);
    }
    match (get, old) {
        (false, _) => out.ok(),
        (true, Some(v)) => out.bulk(&v),
        (true, None) => out.null(),
    }
    Flow::Continue
}

pub fn mget(kv: &mut Kv, c: &mut Call) -> Flow {
    c.out.array(c.args.len() - 1);
    for k in &c.args[1..] {
        match kv.db.get(k) {
            Some(Value::Str(v)) => c.out.bulk(v),
            _ => c.out.null(),
        }
    }
    Flow::Continue
}

pub fn mset(kv: &mut Kv, c: &mut Call) -> Flow {
    if !c.args[1..].chunks_exact(2).remainder().is_empty() {
        arity_error(c.out, "mset");
    } else {
        for pair in c.args[1..].chunks(2) {
            kv.db.set_str(&pair[0], pair[1].clone(), false);
        }
        c.out.ok();
    }
    Flow::Continue
}

pub fn append(kv: &mut Kv, c: &mut Call) -> Flow {
    let (key, tail) = (&c.args[1], &c.args[2]);
    match kv.db.get_str_mut(key) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(Some(v)) if v.len() + tail.len() > MAX_BULK_LEN => c.out.err(TOO_BIG),
        Ok(Some(v)) => {
            v.extend_from_slice(tail);
            let len = v.len();
            kv.db.touch(key);
            c.out.int(len as i64);
        }
        Ok(None) if tail.len() > MAX_BULK_LEN => c.out.err(TOO_BIG),
        Ok(None) => {
            kv.db.set_str(key, tail.clone(), true);
            c.out.int(tail.len() as i64);
        }
    }
    Flow::Continue
}

pub fn strlen(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_str(&c.args[1]) {
        Ok(v) => c.out.int(v.map_or(0, Vec::len) as i64),
        Err(WrongType) => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

pub fn incr(kv: &mut Kv, c: &mut Call) -> Flow {
    incr_by(&mut kv.db, c, Some(1))
}

pub fn decr(kv: &mut Kv, c: &mut Call) -> Flow {
    incr_by(&mut kv.db, c, Some(-1))
}

pub fn incrby(kv: &mut Kv, c: &mut Call) -> Flow {
    match parse_i64(&c.args[2]) {
        Some(n) => incr_by(&mut kv.db, c, Some(n)),
        None => {
            c.out.err(NOT_INTEGER);
            Flow::Continue
        }
    }
}

pub fn decrby(kv: &mut Kv, c: &mut Call) -> Flow {
    match parse_i64(&c.args[2]) {
        Some(n) => incr_by(&mut kv.db, c, n.checked_neg()),
        None => {
            c.out.err(NOT_INTEGER);
            Flow::Continue
        }
    }
}

/// `by` is `None` when negating the decrement overflowed.
fn incr_by(db: &mut Db, c: &mut Call, by: Option<i64>) -> Flow {
    let key = &c.args[1];
    let Some(by) = by else {
        c.out.err("ERR decrement would overflow");
        return Flow::Continue;
    };
    let current = match db.get_str(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => 0,
        Ok(Some(v)) => match parse_i64(v) {
            Some(n) => n,
            None => {
                c.out.err(NOT_INTEGER);
                return Flow::Continue;
            }
        },
    };
    match current.checked_add(by) {
        Some(n) => {
            // The deadline stays, as in Redis.
            db.set_str(key, n.to_string().into_bytes(), true);
            c.out.int(n);
        }
        None => c.out.err(OVERFLOW),
    }
    Flow::Continue
}
