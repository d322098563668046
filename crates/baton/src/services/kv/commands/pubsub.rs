//! Pub/sub: SUBSCRIBE, UNSUBSCRIBE, PSUBSCRIBE, PUNSUBSCRIBE, PUBLISH,
//! PUBSUB CHANNELS|NUMSUB|NUMPAT.
//!
//! Subscriptions are service state, kept with the connection: a message
//! is written to each subscriber's output by the event that published it,
//! so the log orders messages, and a move or failover neither loses nor
//! repeats one. Messages are pushes in RESP3, arrays in RESP2.

use baton_core::service::ConnId;

use super::{arity_error, unknown_subcommand, Call, Flow};
use crate::services::kv::db::glob_match;
use crate::services::kv::Kv;
use crate::services::resp::Writer;

/// `[kind, name, count]`, as each (un)subscription is confirmed.
fn confirm(out: &mut Writer, kind: &[u8], name: Option<&[u8]>, count: usize) {
    out.push(3);
    out.bulk(kind);
    match name {
        Some(n) => out.bulk(n),
        None => out.null(),
    }
    out.int(count as i64);
}

fn add(kv: &mut Kv, c: &mut Call, pattern: bool) -> Flow {
    let conn = c.conn;
    for name in &c.args[1..] {
        let Some(st) = kv.conns.get_mut(&conn) else {
            return Flow::Continue;
        };
        let (mine, index, kind) = if pattern {
            (&mut st.patterns, &mut kv.patterns, &b"psubscribe"[..])
        } else {
            (&mut st.channels, &mut kv.channels, &b"subscribe"[..])
        };
        if mine.insert(name.clone()) {
            index.entry(name.clone()).or_default().insert(conn);
        }
        let count = st.subscriptions();
        confirm(c.out, kind, Some(name), count);
    }
    Flow::Continue
}

fn remove(kv: &mut Kv, c: &mut Call, pattern: bool) -> Flow {
    let conn = c.conn;
    let kind: &[u8] = if pattern {
        b"punsubscribe"
    } else {
        b"unsubscribe"
    };
    let names: Vec<Vec<u8>> = match kv.conns.get(&conn) {
        None => return Flow::Continue,
        Some(_) if c.args.len() > 1 => c.args[1..].to_vec(),
        Some(st) if pattern => st.patterns.iter().cloned().collect(),
        Some(st) => st.channels.iter().cloned().collect(),
    };
    if names.is_empty() {
        let count = kv.conns.get(&conn).map_or(0, |st| st.subscriptions());
        confirm(c.out, kind, None, count);
        return Flow::Continue;
    }
    for name in names {
        drop_one(kv, conn, &name, pattern);
        let count = kv.conns.get(&conn).map_or(0, |st| st.subscriptions());
        confirm(c.out, kind, Some(&name), count);
    }
    Flow::Continue
}

fn drop_one(kv: &mut Kv, conn: ConnId, name: &[u8], pattern: bool) {
    let Some(st) = kv.conns.get_mut(&conn) else {
        return;
    };
    let (mine, index) = if pattern {
        (&mut st.patterns, &mut kv.patterns)
    } else {
        (&mut st.channels, &mut kv.channels)
    };
    if mine.remove(name) {
        if let Some(subs) = index.get_mut(name) {
            subs.remove(&conn);
            if subs.is_empty() {
                index.remove(name);
            }
        }
    }
}

/// Drops every subscription of `conn` (RESET, close).
pub fn unsubscribe_all(kv: &mut Kv, conn: ConnId) {
    let Some(st) = kv.conns.get(&conn) else {
        return;
    };
    let channels: Vec<Vec<u8>> = st.channels.iter().cloned().collect();
    let patterns: Vec<Vec<u8>> = st.patterns.iter().cloned().collect();
    for ch in channels {
        drop_one(kv, conn, &ch, false);
    }
    for p in patterns {
        drop_one(kv, conn, &p, true);
    }
}

pub fn subscribe(kv: &mut Kv, c: &mut Call) -> Flow {
    add(kv, c, false)
}

pub fn psubscribe(kv: &mut Kv, c: &mut Call) -> Flow {
    add(kv, c, true)
}

pub fn unsubscribe(kv: &mut Kv, c: &mut Call) -> Flow {
    remove(kv, c, false)
}

pub fn punsubscribe(kv: &mut Kv, c: &mut Call) -> Flow {
    remove(kv, c, true)
}

/// `PUBLISH channel message`: the number of deliveries (a connection
/// subscribed to the channel and to matching patterns counts for each).
pub fn publish(kv: &mut Kv, c: &mut Call) -> Flow {
    let (channel, message) = (&c.args[1], &c.args[2]);
    let mut deliveries: Vec<(ConnId, Vec<u8>)> = Vec::new();
    let protocol = |kv: &Kv, conn: ConnId| kv.conns.get(&conn).is_some_and(|st| st.resp3);
    if let Some(subs) = kv.channels.get(channel) {
        for &s in subs {
            let mut w = Writer::new(protocol(kv, s));
            w.push(3);
            w.bulk(b"message");
            w.bulk(channel);
            w.bulk(message);
            deliveries.push((s, w.buf));
        }
    }
    for (pattern, subs) in &kv.patterns {
        if !glob_match(pattern, channel, false) {
            continue;
        }
        for &s in subs {
            let mut w = Writer::new(protocol(kv, s));
            w.push(4);
            w.bulk(b"pmessage");
            w.bulk(pattern);
            w.bulk(channel);
            w.bulk(message);
            deliveries.push((s, w.buf));
        }
    }
    for (to, bytes) in &deliveries {
        c.send_to(*to, bytes);
    }
    c.out.int(deliveries.len() as i64);
    Flow::Continue
}

/// `PUBSUB CHANNELS [pattern]`, `NUMSUB [channel ...]`, `NUMPAT`.
pub fn pubsub(kv: &mut Kv, c: &mut Call) -> Flow {
    let args = c.args;
    match args[1].to_ascii_lowercase().as_slice() {
        b"channels" if args.len() <= 3 => {
            let names: Vec<&Vec<u8>> = kv
                .channels
                .keys()
                .filter(|ch| args.get(2).is_none_or(|p| glob_match(p, ch, false)))
                .collect();
            c.out.array(names.len());
            for n in names {
                c.out.bulk(n);
            }
        }
        b"channels" => arity_error(c.out, "pubsub|channels"),
        b"numsub" => {
            c.out.array((args.len() - 2) * 2);
            for ch in &args[2..] {
                c.out.bulk(ch);
                c.out.int(kv.channels.get(ch).map_or(0, |s| s.len()) as i64);
            }
        }
        b"numpat" if args.len() == 2 => c.out.int(kv.patterns.len() as i64),
        b"numpat" => arity_error(c.out, "pubsub|numpat"),
        _ => unknown_subcommand(c.out, &args[1], "PUBSUB"),
    }
    Flow::Continue
}
