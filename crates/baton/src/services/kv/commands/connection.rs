//! Connection commands: PING, ECHO, SELECT, QUIT, RESET, HELLO, AUTH,
//! CLIENT. kv has no users or passwords: the `default` user, open to all,
//! as a Redis without `requirepass`.

use super::{arity_error, unknown_subcommand, Call, Flow, NOT_INTEGER};
use crate::services::kv::{Conn, Kv, REDIS_VERSION};
use crate::services::resp::parse_i64;

const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// `PING [message]`; in RESP2 subscribed mode the reply is a
/// `pong` push, as Redis sends it there.
pub fn ping(kv: &mut Kv, c: &mut Call) -> Flow {
    if c.args.len() > 2 {
        arity_error(c.out, "ping");
        return Flow::Continue;
    }
    let subscribed = kv
        .conns
        .get(&c.conn)
        .is_some_and(|conn| !conn.resp3 && conn.subscriptions() > 0);
    if subscribed {
        c.out.array(2);
        c.out.bulk(b"pong");
        c.out.bulk(c.args.get(1).map_or(&b""[..], |a| a));
    } else if let Some(msg) = c.args.get(1) {
        c.out.bulk(msg);
    } else {
        c.out.simple(b"PONG");
    }
    Flow::Continue
}

pub fn echo(_kv: &mut Kv, c: &mut Call) -> Flow {
    c.out.bulk(&c.args[1]);
    Flow::Continue
}

/// kv has one database, 0.
pub fn select(_kv: &mut Kv, c: &mut Call) -> Flow {
    match parse_i64(&c.args[1]) {
        Some(0) => c.out.ok(),
        Some(n) if i32::try_from(n).is_ok() => c.out.err("ERR DB index is out of range"),
        _ => c.out.err(NOT_INTEGER),
    }
    Flow::Continue
}

pub fn quit(_kv: &mut Kv, c: &mut Call) -> Flow {
    c.out.ok();
    Flow::Close
}

/// `RESET`: back to a fresh connection's state (RESP2, no name, no
/// transaction, watch or subscription); the client id stays.
pub fn reset(kv: &mut Kv, c: &mut Call) -> Flow {
    let conn = c.conn;
    kv.forget_state(c.ctx, conn);
    if let Some(st) = kv.conns.get_mut(&conn) {
        st.resp3 = false;
        st.name = None;
    }
    c.out.resp3 = false;
    c.out.simple(b"RESET");
    Flow::Continue
}

/// `AUTH [username] password`: only `default`, which takes any password.
pub fn auth(_kv: &mut Kv, c: &mut Call) -> Flow {
    match c.args.len() {
        2 => c.out.err(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ),
        3 if c.args[1] == b"default" => c.out.ok(),
        3 => c.out.err(WRONGPASS),
        _ => c.out.err(super::SYNTAX),
    }
    Flow::Continue
}

/// `HELLO [protover [AUTH username password] [SETNAME name]]`.
pub fn hello(kv: &mut Kv, c: &mut Call) -> Flow {
    let args = c.args;
    let mut proto = None;
    if let Some(v) = args.get(1) {
        match parse_i64(v) {
            Some(n @ 2..=3) => proto = Some(n),
            Some(_) => {
                c.out.err("NOPROTO unsupported protocol version");
                return Flow::Continue;
            }
            None => {
                c.out
                    .err("ERR Protocol version is not an integer or out of range");
                return Flow::Continue;
            }
        }
    }
    let mut name = None;
    let mut i = 2;
    while i < args.len() {
        let more = args.len() - i - 1;
        match args[i].to_ascii_lowercase().as_slice() {
            b"auth" if more >= 2 => {
                if args[i + 1] != b"default" {
                    c.out.err(WRONGPASS);
                    return Flow::Continue;
                }
                i += 3;
            }
            b"setname" if more >= 1 => {
                if !valid_name(&args[i + 1]) {
                    c.out.err(BAD_NAME);
                    return Flow::Continue;
                }
                name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => {
                let mut msg = b"ERR Syntax error in HELLO option '".to_vec();
                msg.extend_from_slice(&args[i]);
                msg.push(b'\'');
                c.out.error(&msg);
                return Flow::Continue;
            }
        }
    }
    let Some(st) = kv.conns.get_mut(&c.conn) else {
        return Flow::Continue;
    };
    if let Some(n) = name {
        st.name = (!n.is_empty()).then_some(n);
    }
    if let Some(p) = proto {
        st.resp3 = p == 3;
        c.out.resp3 = st.resp3;
    }
    let out = &mut *c.out;
    out.map(7);
    out.bulk(b"server");
    out.bulk(b"redis");
    out.bulk(b"version");
    out.bulk(REDIS_VERSION.as_bytes());
    out.bulk(b"proto");
    out.int(if st.resp3 { 3 } else { 2 });
    out.bulk(b"id");
    out.int(st.id as i64);
    out.bulk(b"mode");
    out.bulk(b"standalone");
    out.bulk(b"role");
    out.bulk(b"master");
    out.bulk(b"modules");
    out.array(0);
    Flow::Continue
}

const BAD_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// One line of CLIENT LIST / CLIENT INFO.
fn client_line(c: &Conn, now: u64) -> String {
    let text = |v: &Option<Vec<u8>>| {
        v.as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default()
    };
    let mut flags = String::new();
    if c.subscriptions() > 0 {
        flags.push('P');
    }
    if c.multi.is_some() {
        flags.push('x');
    }
    if c.blocked.is_some() {
        flags.push('b');
    }
    if flags.is_empty() {
        flags.push('N');
    }
    format!(
        "id={} addr={} name={} age={} flags={flags} db=0 sub={} psub={} ssub=0 multi={} watch={} user=default resp={} lib-name={} lib-ver={}\n",
        c.id,
        c.peer.map(|p| p.to_string()).unwrap_or_default(),
        text(&c.name),
        now.saturating_sub(c.since_ms) / 1000,
        c.channels.len(),
        c.patterns.len(),
        c.multi.as_ref().map_or(-1, |q| q.len() as i64),
        c.watched.len(),
        if c.resp3 { 3 } else { 2 },
        text(&c.lib_name),
        text(&c.lib_ver),
    )
}

/// `CLIENT SETNAME|GETNAME|ID|INFO|LIST|SETINFO|NO-EVICT|NO-TOUCH`.
pub fn client(kv: &mut Kv, c: &mut Call) -> Flow {
    let args = c.args;
    let sub = args[1].to_ascii_lowercase();
    let conn = c.conn;
    let exact = |n: usize, name: &str, c: &mut Call| -> bool {
        if args.len() != n {
            arity_error(c.out, &format!("client|{name}"));
            false
        } else {
            true
        }
    };
    match sub.as_slice() {
        b"setname" => {
            if exact(3, "setname", c) {
                if !valid_name(&args[2]) {
                    c.out.err(BAD_NAME);
                } else {
                    if let Some(st) = kv.conns.get_mut(&conn) {
                        st.name = (!args[2].is_empty()).then(|| args[2].clone());
                    }
                    c.out.ok();
                }
            }
        }
        b"getname" => {
            if exact(2, "getname", c) {
                match kv.conns.get(&conn).and_then(|st| st.name.as_ref()) {
                    Some(n) => c.out.bulk(n),
                    None => c.out.null(),
                }
            }
        }
        b"id" => {
            if exact(2, "id", c) {
                let id = kv.conns.get(&conn).map_or(0, |st| st.id);
                c.out.int(id as i64);
            }
        }
        b"info" => {
            if exact(2, "info", c) {
                let now = c.now();
                let text = kv
                    .conns
                    .get(&conn)
                    .map(|st| client_line(st, now))
                    .unwrap_or_default();
                c.out.verbatim(text.as_bytes());
            }
        }
        b"list" => {
            if args.len() != 2 {
                c.out.err(super::SYNTAX);
            } else {
                let now = c.now();
                let mut conns: Vec<&Conn> = kv.conns.values().filter(|st| !st.closing).collect();
                conns.sort_by_key(|st| st.id);
                let text: String = conns.into_iter().map(|st| client_line(st, now)).collect();
                c.out.verbatim(text.as_bytes());
            }
        }
        b"setinfo" => {
            if exact(4, "setinfo", c) {
                let value = &args[3];
                let attr = args[2].to_ascii_lowercase();
                if value.iter().any(|b| !(b'!'..=b'~').contains(b)) {
                    let mut msg = b"ERR ".to_vec();
                    msg.extend_from_slice(&args[2]);
                    msg.extend_from_slice(
                        b" cannot contain spaces, newlines or special characters.",
                    );
                    c.out.error(&msg);
                } else {
                    let v = (!value.is_empty()).then(|| value.clone());
                    match (attr.as_slice(), kv.conns.get_mut(&conn)) {
                        (b"lib-name", Some(st)) => {
                            st.lib_name = v;
                            c.out.ok();
                        }
                        (b"lib-ver", Some(st)) => {
                            st.lib_ver = v;
                            c.out.ok();
                        }
                        _ => {
                            let mut msg = b"ERR Unrecognized option '".to_vec();
                            msg.extend_from_slice(&args[2]);
                            msg.push(b'\'');
                            c.out.error(&msg);
                        }
                    }
                }
            }
        }
        // Eviction and LRU do not exist here: accepted, nothing to change.
        b"no-evict" | b"no-touch" => {
            if exact(3, std::str::from_utf8(&sub).unwrap_or("no-evict"), c) {
                match args[2].to_ascii_lowercase().as_slice() {
                    b"on" | b"off" => c.out.ok(),
                    _ => c.out.err(super::SYNTAX),
                }
            }
        }
        _ => unknown_subcommand(c.out, &args[1], "CLIENT"),
    }
    Flow::Continue
}
