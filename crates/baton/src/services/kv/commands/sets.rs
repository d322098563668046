//! Set commands: SADD, SREM, SMEMBERS, SISMEMBER, SCARD, SPOP, SSCAN.

use super::keys::scan_container;
use super::{count_arg, Call, Flow, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{Set, Value, WrongType};
use crate::services::kv::Kv;

pub fn sadd(kv: &mut Kv, c: &mut Call) -> Flow {
    let is_set = |v: &Value| matches!(v, Value::Set(_));
    match kv.db.entry(&c.args[1], || Value::Set(Set::new()), is_set) {
        Ok(Value::Set(set)) => {
            let n = c.args[2..]
                .iter()
                .filter(|m| set.insert((*m).clone()))
                .count();
            c.out.int(n as i64);
        }
        _ => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

pub fn srem(kv: &mut Kv, c: &mut Call) -> Flow {
    let key = &c.args[1];
    match kv.db.get_set(key) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.int(0),
        Ok(Some(set)) => {
            let n = c.args[2..].iter().filter(|m| set.remove(*m)).count();
            if n > 0 {
                kv.db.touch(key);
            }
            kv.db.drop_if_empty(key);
            c.out.int(n as i64);
        }
    }
    Flow::Continue
}

/// A set in RESP3.
pub fn smembers(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_set(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.set(0),
        Ok(Some(set)) => {
            c.out.set(set.len());
            for m in set.iter() {
                c.out.bulk(m);
            }
        }
    }
    Flow::Continue
}

pub fn sismember(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_set(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(set) => c
            .out
            .int(i64::from(set.is_some_and(|s| s.contains(&c.args[2])))),
    }
    Flow::Continue
}

pub fn scard(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_set(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(set) => c.out.int(set.map_or(0, |s| s.len()) as i64),
    }
    Flow::Continue
}

/// `SPOP key [count]`: members drawn with the event's randomness.
pub fn spop(kv: &mut Kv, c: &mut Call) -> Flow {
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
    let set = match kv.db.get_set(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            if count.is_some() {
                c.out.set(0);
            } else {
                c.out.null();
            }
            return Flow::Continue;
        }
        Ok(Some(s)) => s,
    };
    match count {
        None => {
            let i = c
                .ctx
                .random_u64()
                .checked_rem(set.len() as u64)
                .unwrap_or(0) as usize;
            if let Some(m) = set.iter().nth(i).cloned() {
                set.remove(&m);
                c.out.bulk(&m);
            }
        }
        Some(n) => {
            let n = n.min(set.len() as u64) as usize;
            // A partial Fisher-Yates shuffle picks n distinct members.
            let mut members: Vec<&Vec<u8>> = set.iter().collect();
            for i in 0..n {
                let j = i + (c.ctx.random_u64() % (members.len() - i) as u64) as usize;
                members.swap(i, j);
            }
            let chosen: Vec<Vec<u8>> = members[..n].iter().map(|m| (*m).clone()).collect();
            c.out.set(n);
            for m in &chosen {
                set.remove(m);
                c.out.bulk(m);
            }
        }
    }
    kv.db.touch(key);
    kv.db.drop_if_empty(key);
    Flow::Continue
}

/// `SSCAN key cursor [MATCH pattern] [COUNT count]`.
pub fn sscan(kv: &mut Kv, c: &mut Call) -> Flow {
    scan_container::<Set>(kv, c)
}
