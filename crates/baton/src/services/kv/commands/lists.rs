//! List commands: LPUSH, RPUSH, LPOP, RPOP, LRANGE, LLEN, LMOVE, and the
//! blocking BLPOP, BRPOP, BLMOVE.
//!
//! A blocking command on empty lists parks its connection (its later
//! input stays buffered) and, with a timeout, sets a timer of the log whose
//! id is the connection's: the timeout is log time, like every deadline.
//! A push to a key someone waits on marks it ready; after the command the
//! waiters are served, first blocked first served.

use baton_core::service::{ConnId, Context, TimerId};

use super::{arity_error, count_arg, Call, Flow, NOT_INTEGER, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{List, Value, WrongType};
use crate::services::kv::{BlockOp, Blocked, Kv};
use crate::services::resp::{parse_i64, Writer};

fn push(kv: &mut Kv, c: &mut Call, left: bool) -> Flow {
    let key = &c.args[1];
    let is_list = |v: &Value| matches!(v, Value::List(_));
    match kv.db.entry(key, || Value::List(List::new()), is_list) {
        Ok(Value::List(list)) => {
            for e in &c.args[2..] {
                if left {
                    list.push_front(e.clone());
                } else {
                    list.push_back(e.clone());
                }
            }
            c.out.int(list.len() as i64);
            signal(kv, key);
        }
        _ => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

/// Marks `key` ready if a connection waits on it.
fn signal(kv: &mut Kv, key: &[u8]) {
    if kv.waiting.contains_key(key) && !kv.ready.iter().any(|k| k == key) {
        kv.ready.push_back(key.to_vec());
    }
}

pub fn lpush(kv: &mut Kv, c: &mut Call) -> Flow {
    push(kv, c, true)
}

pub fn rpush(kv: &mut Kv, c: &mut Call) -> Flow {
    push(kv, c, false)
}

pub fn lpop(kv: &mut Kv, c: &mut Call) -> Flow {
    pop(kv, c, "lpop", true)
}

pub fn rpop(kv: &mut Kv, c: &mut Call) -> Flow {
    pop(kv, c, "rpop", false)
}

/// `LPOP key [count]` / `RPOP key [count]`.
fn pop(kv: &mut Kv, c: &mut Call, name: &str, left: bool) -> Flow {
    if c.args.len() > 3 {
        arity_error(c.out, name);
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
    let list = match kv.db.get_list(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            if count.is_some() {
                c.out.null_array();
            } else {
                c.out.null();
            }
            return Flow::Continue;
        }
        Ok(Some(l)) => l,
    };
    let take = |list: &mut List| {
        if left {
            list.pop_front()
        } else {
            list.pop_back()
        }
    };
    match count {
        None => match take(list) {
            Some(v) => c.out.bulk(&v),
            None => c.out.null(),
        },
        Some(n) => {
            let n = n.min(list.len() as u64) as usize;
            c.out.array(n);
            for _ in 0..n {
                if let Some(v) = take(list) {
                    c.out.bulk(&v);
                }
            }
        }
    }
    kv.db.touch(key);
    kv.db.drop_if_empty(key);
    Flow::Continue
}

/// `LRANGE` bounds as Redis computes them: a half-open range of indexes.
fn range(start: i64, stop: i64, len: usize) -> (usize, usize) {
    let len = len as i64;
    let start = if start < 0 { len + start } else { start }.max(0);
    let mut stop = if stop < 0 { len + stop } else { stop };
    if start > stop || start >= len {
        return (0, 0);
    }
    if stop >= len {
        stop = len - 1;
    }
    (start as usize, stop as usize + 1)
}

pub fn lrange(kv: &mut Kv, c: &mut Call) -> Flow {
    let (Some(start), Some(stop)) = (parse_i64(&c.args[2]), parse_i64(&c.args[3])) else {
        c.out.err(NOT_INTEGER);
        return Flow::Continue;
    };
    match kv.db.get_list(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.array(0),
        Ok(Some(list)) => {
            let (from, to) = range(start, stop, list.len());
            c.out.array(to - from);
            for e in list.range(from..to) {
                c.out.bulk(e);
            }
        }
    }
    Flow::Continue
}

pub fn llen(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.get_list(&c.args[1]) {
        Ok(l) => c.out.int(l.map_or(0, |l| l.len()) as i64),
        Err(WrongType) => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

fn direction(arg: &[u8]) -> Option<bool> {
    match arg.to_ascii_lowercase().as_slice() {
        b"left" => Some(true),
        b"right" => Some(false),
        _ => None,
    }
}

/// Moves one element from `src` to `dst`; `Ok(None)` if `src` is empty.
fn move_one(
    kv: &mut Kv,
    src: &[u8],
    dst: &[u8],
    from_left: bool,
    to_left: bool,
) -> Result<Option<Vec<u8>>, WrongType> {
    match kv.db.get_list(src)? {
        None => return Ok(None),
        Some(l) if l.is_empty() => return Ok(None),
        Some(_) => {}
    }
    if !matches!(kv.db.get(dst), None | Some(Value::List(_))) {
        return Err(WrongType);
    }
    let Some(list) = kv.db.get_list(src)? else {
        return Ok(None);
    };
    let Some(v) = (if from_left {
        list.pop_front()
    } else {
        list.pop_back()
    }) else {
        return Ok(None);
    };
    kv.db.touch(src);
    kv.db.drop_if_empty(src);
    let is_list = |v: &Value| matches!(v, Value::List(_));
    if let Ok(Value::List(l)) = kv.db.entry(dst, || Value::List(List::new()), is_list) {
        if to_left {
            l.push_front(v.clone());
        } else {
            l.push_back(v.clone());
        }
    }
    signal(kv, dst);
    Ok(Some(v))
}

/// `LMOVE source destination LEFT|RIGHT LEFT|RIGHT`.
pub fn lmove(kv: &mut Kv, c: &mut Call) -> Flow {
    let (Some(from), Some(to)) = (direction(&c.args[3]), direction(&c.args[4])) else {
        c.out.err(SYNTAX);
        return Flow::Continue;
    };
    match move_one(kv, &c.args[1], &c.args[2], from, to) {
        Ok(Some(v)) => c.out.bulk(&v),
        Ok(None) => c.out.null(),
        Err(WrongType) => c.out.err(WRONGTYPE),
    }
    Flow::Continue
}

/// A blocking timeout in seconds (a float), as a log-time deadline;
/// `None` for 0 (wait for ever).
fn deadline(arg: &[u8], now: u64) -> Result<Option<u64>, &'static str> {
    let secs: f64 = std::str::from_utf8(arg)
        .ok()
        .filter(|s| !s.is_empty() && !s.starts_with(|ch: char| ch.is_whitespace()))
        .and_then(|s| s.parse().ok())
        .filter(|f: &f64| f.is_finite())
        .ok_or("ERR timeout is not a float or out of range")?;
    if secs < 0.0 {
        return Err("ERR timeout is negative");
    }
    let ms = (secs * 1000.0) as u64;
    if ms == 0 {
        return Ok(None);
    }
    now.checked_add(ms)
        .filter(|at| *at <= i64::MAX as u64)
        .map(Some)
        .ok_or("ERR timeout is out of range")
}

pub fn blpop(kv: &mut Kv, c: &mut Call) -> Flow {
    blocking_pop(kv, c, true)
}

pub fn brpop(kv: &mut Kv, c: &mut Call) -> Flow {
    blocking_pop(kv, c, false)
}

/// `BLPOP key [key ...] timeout` / BRPOP.
fn blocking_pop(kv: &mut Kv, c: &mut Call, left: bool) -> Flow {
    let n = c.args.len();
    let at = match deadline(&c.args[n - 1], c.now()) {
        Ok(at) => at,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let keys = &c.args[1..n - 1];
    for key in keys {
        match kv.db.get_list(key) {
            Err(WrongType) => {
                c.out.err(WRONGTYPE);
                return Flow::Continue;
            }
            Ok(Some(list)) if !list.is_empty() => {
                let v = if left {
                    list.pop_front()
                } else {
                    list.pop_back()
                };
                if let Some(v) = v {
                    c.out.array(2);
                    c.out.bulk(key);
                    c.out.bulk(&v);
                }
                kv.db.touch(key);
                kv.db.drop_if_empty(key);
                return Flow::Continue;
            }
            _ => {}
        }
    }
    if c.in_exec {
        c.out.null_array();
        return Flow::Continue;
    }
    block(kv, c, keys.to_vec(), BlockOp::Pop { left }, at)
}

/// `BLMOVE source destination LEFT|RIGHT LEFT|RIGHT timeout`.
pub fn blmove(kv: &mut Kv, c: &mut Call) -> Flow {
    let (Some(from), Some(to)) = (direction(&c.args[3]), direction(&c.args[4])) else {
        c.out.err(SYNTAX);
        return Flow::Continue;
    };
    let at = match deadline(&c.args[5], c.now()) {
        Ok(at) => at,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    match move_one(kv, &c.args[1], &c.args[2], from, to) {
        Ok(Some(v)) => c.out.bulk(&v),
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) if c.in_exec => c.out.null(),
        Ok(None) => {
            let op = BlockOp::Move {
                dst: c.args[2].clone(),
                from_left: from,
                to_left: to,
            };
            return block(kv, c, vec![c.args[1].clone()], op, at);
        }
    }
    Flow::Continue
}

fn block(kv: &mut Kv, c: &mut Call, keys: Vec<Vec<u8>>, op: BlockOp, at: Option<u64>) -> Flow {
    let seq = kv.next_block_seq;
    kv.next_block_seq += 1;
    for k in &keys {
        kv.waiting
            .entry(k.clone())
            .or_default()
            .insert((seq, c.conn));
    }
    if let Some(at) = at {
        c.ctx.set_timer(c.conn, at);
    }
    if let Some(st) = kv.conns.get_mut(&c.conn) {
        st.blocked = Some(Blocked {
            seq,
            keys,
            op,
            deadline: at,
        });
    }
    Flow::Block
}

/// Ends `conn`'s wait, if it waits (its timer cancelled). The caller
/// replies and queues its pending input.
pub fn unblock(kv: &mut Kv, ctx: &mut Context, conn: ConnId) -> Option<Blocked> {
    let b = kv.conns.get_mut(&conn)?.blocked.take()?;
    for k in &b.keys {
        if let Some(w) = kv.waiting.get_mut(k) {
            w.remove(&(b.seq, conn));
            if w.is_empty() {
                kv.waiting.remove(k);
            }
        }
    }
    if b.deadline.is_some() {
        ctx.cancel_timer(conn);
    }
    Some(b)
}

/// Serves the connections waiting on `key` while it has elements.
pub fn serve_waiting(kv: &mut Kv, ctx: &mut Context, key: &[u8]) {
    loop {
        let has_elements = matches!(kv.db.get(key), Some(Value::List(l)) if !l.is_empty());
        if !has_elements {
            return;
        }
        let Some(&(_, conn)) = kv.waiting.get(key).and_then(|w| w.first()) else {
            return;
        };
        let resp3 = kv.conns.get(&conn).is_some_and(|st| st.resp3);
        let Some(b) = unblock(kv, ctx, conn) else {
            return;
        };
        let mut out = Writer::new(resp3);
        match b.op {
            BlockOp::Pop { left } => {
                if let Ok(Some(list)) = kv.db.get_list(key) {
                    let v = if left {
                        list.pop_front()
                    } else {
                        list.pop_back()
                    };
                    if let Some(v) = v {
                        out.array(2);
                        out.bulk(key);
                        out.bulk(&v);
                    }
                }
                kv.db.touch(key);
                kv.db.drop_if_empty(key);
            }
            BlockOp::Move {
                dst,
                from_left,
                to_left,
            } => match move_one(kv, key, &dst, from_left, to_left) {
                Ok(Some(v)) => out.bulk(&v),
                Ok(None) => out.null(),
                Err(WrongType) => out.err(WRONGTYPE),
            },
        }
        ctx.send(conn, &out.buf);
        kv.unblocked.push_back(conn);
    }
}

/// A blocking timer fired: the connection gets its null reply.
pub fn time_out(kv: &mut Kv, ctx: &mut Context, timer: TimerId) {
    let conn = timer;
    let due = kv
        .conns
        .get(&conn)
        .and_then(|st| st.blocked.as_ref())
        .and_then(|b| b.deadline)
        .is_some_and(|at| at <= ctx.now_ms());
    if !due {
        return;
    }
    let resp3 = kv.conns.get(&conn).is_some_and(|st| st.resp3);
    if unblock(kv, ctx, conn).is_some() {
        // A null array for BLMOVE too, as Redis times every list wait out.
        let mut out = Writer::new(resp3);
        out.null_array();
        ctx.send(conn, &out.buf);
        kv.unblocked.push_back(conn);
    }
}
