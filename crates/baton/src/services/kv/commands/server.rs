//! Server commands clients send on connect and in health checks: CONFIG,
//! COMMAND, INFO.

use super::{arity_error, unknown_subcommand, Call, Flow, COMMANDS};
use crate::services::kv::db::glob_match;
use crate::services::kv::{Kv, REDIS_VERSION};

/// What `CONFIG GET` knows (enough for redis-benchmark and redis-cli).
const CONFIG: &[(&str, &str)] = &[
    ("appendonly", "no"),
    ("bind", "* -::*"),
    ("databases", "1"),
    ("maxclients", "10000"),
    ("maxmemory", "0"),
    ("maxmemory-policy", "noeviction"),
    ("port", "6379"),
    ("proto-max-bulk-len", "536870912"),
    ("save", ""),
    ("timeout", "0"),
];

/// `CONFIG GET pattern...` from a small fixed table (a map in RESP3);
/// `CONFIG SET`, `RESETSTAT` and `REWRITE` are accepted and change nothing.
pub fn config(_kv: &mut Kv, c: &mut Call) -> Flow {
    let args = c.args;
    let sub = args[1].to_ascii_lowercase();
    let (name, min_args, exact) = match sub.as_slice() {
        b"get" => ("get", 3, false),
        b"set" => ("set", 4, false),
        b"resetstat" => ("resetstat", 2, true),
        b"rewrite" => ("rewrite", 2, true),
        _ => {
            unknown_subcommand(c.out, &args[1], "CONFIG");
            return Flow::Continue;
        }
    };
    if args.len() < min_args || (exact && args.len() != min_args) {
        arity_error(c.out, &format!("config|{name}"));
        return Flow::Continue;
    }
    if name != "get" {
        c.out.ok();
        return Flow::Continue;
    }
    let found: Vec<&(&str, &str)> = CONFIG
        .iter()
        .filter(|(k, _)| args[2..].iter().any(|p| glob_match(p, k.as_bytes(), true)))
        .collect();
    c.out.map(found.len());
    for (k, v) in found {
        c.out.bulk(k.as_bytes());
        c.out.bulk(v.as_bytes());
    }
    Flow::Continue
}

/// `COMMAND`: no command documentation; clients do without it.
pub fn command(_kv: &mut Kv, c: &mut Call) -> Flow {
    let args = c.args;
    let Some(sub) = args.get(1) else {
        c.out.array(0);
        return Flow::Continue;
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"count" => c.out.int(COMMANDS.len() as i64),
        b"docs" => c.out.map(0),
        b"info" => {
            c.out.array(args.len() - 2);
            for _ in &args[2..] {
                c.out.null_array();
            }
        }
        b"list" => {
            c.out.array(COMMANDS.len());
            for spec in COMMANDS {
                c.out.bulk(spec.name.as_bytes());
            }
        }
        _ => unknown_subcommand(c.out, sub, "COMMAND"),
    }
    Flow::Continue
}

/// `INFO [section ...]`; ioredis waits for `loading:0` before it sends.
pub fn info(kv: &mut Kv, c: &mut Call) -> Flow {
    let wanted: Vec<String> = c.args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| matches!(w.as_str(), "all" | "default" | "everything"));
    let live = kv.conns.values().filter(|st| !st.closing);
    let (clients, blocked, pubsub_clients) = live.fold((0, 0, 0), |(n, b, p), st| {
        (
            n + 1,
            b + usize::from(st.blocked.is_some()),
            p + usize::from(st.subscriptions() > 0),
        )
    });
    let sections: [(&str, String); 7] = [
        (
            "server",
            format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
                 os:baton\r\narch_bits:64\r\nserver_name:baton-kv\r\n"
            ),
        ),
        (
            "clients",
            format!(
                "# Clients\r\nconnected_clients:{clients}\r\nblocked_clients:{blocked}\r\n\
                 pubsub_clients:{pubsub_clients}\r\n"
            ),
        ),
        (
            "memory",
            "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n".to_string(),
        ),
        (
            "persistence",
            "# Persistence\r\nloading:0\r\naof_enabled:0\r\n".to_string(),
        ),
        (
            "stats",
            format!(
                "# Stats\r\npubsub_channels:{}\r\npubsub_patterns:{}\r\n",
                kv.channels.len(),
                kv.patterns.len()
            ),
        ),
        (
            "replication",
            "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n".to_string(),
        ),
        (
            "keyspace",
            if kv.db.is_empty() {
                "# Keyspace\r\n".to_string()
            } else {
                format!(
                    "# Keyspace\r\ndb0:keys={},expires={},avg_ttl=0\r\n",
                    kv.db.len(),
                    kv.db.expires().len()
                )
            },
        ),
    ];
    let chosen: Vec<&str> = sections
        .iter()
        .filter(|(n, _)| all || wanted.iter().any(|w| w == n))
        .map(|(_, text)| text.as_str())
        .collect();
    c.out.verbatim(chosen.join("\r\n").as_bytes());
    Flow::Continue
}
