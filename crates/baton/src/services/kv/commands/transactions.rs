//! Transactions: MULTI, EXEC, DISCARD, WATCH, UNWATCH, with Redis's
//! semantics: a command refused while queuing (unknown, wrong arity) makes
//! EXEC answer EXECABORT; a watched key modified by anyone (itself
//! included, or by expiry) makes EXEC answer a null array.

use baton_core::service::ConnId;

use super::{Call, Flow};
use crate::services::kv::Kv;

pub fn multi(kv: &mut Kv, c: &mut Call) -> Flow {
    let Some(st) = kv.conns.get_mut(&c.conn) else {
        return Flow::Continue;
    };
    if st.multi.is_some() {
        c.out.err("ERR MULTI calls can not be nested");
    } else {
        st.multi = Some(Vec::new());
        st.multi_failed = false;
        c.out.ok();
    }
    Flow::Continue
}

pub fn discard(kv: &mut Kv, c: &mut Call) -> Flow {
    let Some(st) = kv.conns.get_mut(&c.conn) else {
        return Flow::Continue;
    };
    if st.multi.take().is_none() {
        c.out.err("ERR DISCARD without MULTI");
    } else {
        st.multi_failed = false;
        unwatch_all(kv, c.conn);
        c.out.ok();
    }
    Flow::Continue
}

pub fn exec(kv: &mut Kv, c: &mut Call) -> Flow {
    let conn = c.conn;
    let Some(st) = kv.conns.get_mut(&conn) else {
        return Flow::Continue;
    };
    let Some(queue) = st.multi.take() else {
        c.out.err("ERR EXEC without MULTI");
        return Flow::Continue;
    };
    let failed = std::mem::take(&mut st.multi_failed);
    let dirty = st.watch_dirty;
    unwatch_all(kv, conn);
    if failed {
        c.out
            .err("EXECABORT Transaction discarded because of previous errors.");
        return Flow::Continue;
    }
    if dirty {
        c.out.null_array();
        return Flow::Continue;
    }
    c.out.array(queue.len());
    let mut flow = Flow::Continue;
    for args in &queue {
        let Some(spec) = super::lookup(&args[0]) else {
            // Refused while queuing: never queued.
            continue;
        };
        let mut call = Call {
            conn,
            args,
            out: &mut *c.out,
            ctx: &mut *c.ctx,
            in_exec: true,
        };
        if (spec.handler)(kv, &mut call) == Flow::Close {
            flow = Flow::Close;
        }
    }
    flow
}

/// `WATCH key [key ...]`.
pub fn watch(kv: &mut Kv, c: &mut Call) -> Flow {
    let conn = c.conn;
    let Some(st) = kv.conns.get_mut(&conn) else {
        return Flow::Continue;
    };
    if st.multi.is_some() {
        c.out.err("ERR WATCH inside MULTI is not allowed");
        return Flow::Continue;
    }
    for key in &c.args[1..] {
        if st.watched.insert(key.clone()) {
            kv.watchers.entry(key.clone()).or_default().insert(conn);
        }
    }
    c.out.ok();
    Flow::Continue
}

pub fn unwatch(kv: &mut Kv, c: &mut Call) -> Flow {
    unwatch_all(kv, c.conn);
    c.out.ok();
    Flow::Continue
}

/// Forgets every key `conn` watches, and that one changed.
pub fn unwatch_all(kv: &mut Kv, conn: ConnId) {
    let Some(st) = kv.conns.get_mut(&conn) else {
        return;
    };
    st.watch_dirty = false;
    for key in std::mem::take(&mut st.watched) {
        if let Some(ws) = kv.watchers.get_mut(&key) {
            ws.remove(&conn);
            if ws.is_empty() {
                kv.watchers.remove(&key);
            }
        }
    }
}
