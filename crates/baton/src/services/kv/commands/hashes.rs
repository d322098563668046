//! Hash commands: HSET, HGET, HDEL, HGETALL, HLEN, HEXISTS, HSCAN.

use super::keys::scan_container;
use super::{arity_error, Call, Flow, WRONGTYPE};
use crate::services::kv::db::{Hash, Value, WrongType};
use crate::services::kv::Kv;

pub fn hset(kv: &mut Kv, c: &mut Call) -> Flow {
    if !c.args[2..].chunks_exact(2).remainder().is_empty() {
        arity_error(c.out, "hset");
        return Flow::Continue;
    }
    let is_hash = |v: &Value| matches!(v, Value::Hash(_));
    match kv
        .db
        .entry(&c.args[1], || Value::Hash(Hash::new()), is_hash)
    {
        Ok(Value::Hash(h)) => {
            let mut added = 0;
            for pair in c.args[2..].chunks(2) {
                if h.insert(pair[0].clone(), pair[1].clone()).is_none() {
                    added += 1;
                }
            }
            c.out.int(added);
        }
        _ => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

pub fn hget(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_hash(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(h) => match h.and_then(|h| h.get(&c.args[2])) {
            Some(v) => c.out.bulk(v),
            None => c.out.null(),
        },
    }
    Flow::Continue
}

pub fn hdel(kv: &mut Kv, c: &mut Call) -> Flow {
    let key = &c.args[1];
    match kv.db.get_hash(key) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.int(0),
        Ok(Some(h)) => {
            let n = c.args[2..]
                .iter()
                .filter(|f| h.remove(*f).is_some())
                .count();
            if n > 0 {
                kv.db.touch(key);
            }
            kv.db.drop_if_empty(key);
            c.out.int(n as i64);
        }
    }
    Flow::Continue
}

/// A map in RESP3.
pub fn hgetall(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_hash(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.map(0),
        Ok(Some(h)) => {
            c.out.map(h.len());
            for (f, v) in h.iter() {
                c.out.bulk(f);
                c.out.bulk(v);
            }
        }
    }
    Flow::Continue
}

pub fn hlen(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_hash(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(h) => c.out.int(h.map_or(0, |h| h.len()) as i64),
    }
    Flow::Continue
}

pub fn hexists(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_hash(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(h) => c
            .out
            .int(i64::from(h.is_some_and(|h| h.contains_key(&c.args[2])))),
    }
    Flow::Continue
}

/// `HSCAN key cursor [MATCH pattern] [COUNT count]`: field, value pairs.
pub fn hscan(kv: &mut Kv, c: &mut Call) -> Flow {
    scan_container::<Hash>(kv, c)
}
