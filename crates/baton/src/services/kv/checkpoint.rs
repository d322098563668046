//! The checkpoint format: postcard, a version first.
//!
//! Version 3 (this build) adds sorted-set and stream values (new variants
//! of `Value` after the others, so a version 2 body reads unchanged).
//! Version 2 added each connection's protocol, transaction,
//! watches, subscriptions and blocking wait, and the id counters. Version 1
//! checkpoints (keys, deadlines, each connection's parser, peer and name)
//! and version 2 ones still restore, so a node of this build can take a
//! service from one of an earlier build.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use baton_core::service::{ConnId, RestoreError};
use serde::{Deserialize, Serialize};

use super::db::{Db, Value};
use super::{Conn, Kv};
use crate::services::resp::{Parser, MAX_BULK_LEN};

pub const VERSION: u32 = 3;

#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    data: &'a BTreeMap<Vec<u8>, Value>,
    expires: &'a BTreeMap<Vec<u8>, u64>,
    conns: &'a BTreeMap<ConnId, Conn>,
    next_client_id: u64,
    next_block_seq: u64,
}

#[derive(Deserialize)]
struct Snapshot {
    data: BTreeMap<Vec<u8>, Value>,
    expires: BTreeMap<Vec<u8>, u64>,
    conns: BTreeMap<ConnId, Conn>,
    next_client_id: u64,
    next_block_seq: u64,
}

#[derive(Deserialize)]
struct ConnV1 {
    parser: Parser,
    peer: Option<SocketAddr>,
    name: Option<Vec<u8>>,
    closing: bool,
}

#[derive(Deserialize)]
struct SnapshotV1 {
    data: BTreeMap<Vec<u8>, Value>,
    expires: BTreeMap<Vec<u8>, u64>,
    conns: BTreeMap<ConnId, ConnV1>,
}

pub fn encode(kv: &Kv) -> Vec<u8> {
    let snap = SnapshotRef {
        version: VERSION,
        data: kv.db.data(),
        expires: kv.db.expires(),
        conns: &kv.conns,
        next_client_id: kv.next_client_id,
        next_block_seq: kv.next_block_seq,
    };
    // Serializing owned, in-memory maps to a Vec cannot fail.
    postcard::to_allocvec(&snap).expect("postcard encodes the Kv state")
}

fn whole<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, RestoreError> {
    let (v, rest): (T, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| RestoreError::new(format!("kv checkpoint: {e}")))?;
    if !rest.is_empty() {
        return Err(RestoreError::new(format!(
            "kv checkpoint: {} trailing bytes",
            rest.len()
        )));
    }
    Ok(v)
}

pub fn decode(bytes: &[u8]) -> Result<Kv, RestoreError> {
    let (version, body): (u32, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| RestoreError::new(format!("kv checkpoint: {e}")))?;
    let snap = match version {
        1 => {
            let v1: SnapshotV1 = whole(body)?;
            let mut next_client_id = 0;
            let conns = v1
                .conns
                .into_iter()
                .map(|(id, c)| {
                    next_client_id += 1;
                    let conn = Conn {
                        parser: c.parser,
                        peer: c.peer,
                        name: c.name,
                        closing: c.closing,
                        id: next_client_id,
                        ..Conn::default()
                    };
                    (id, conn)
                })
                .collect();
            Snapshot {
                data: v1.data,
                expires: v1.expires,
                conns,
                next_client_id,
                next_block_seq: 0,
            }
        }
        2 | VERSION => whole(body)?,
        other => {
            return Err(RestoreError::new(format!(
                "kv checkpoint version {other} (this build reads 1 to {VERSION})"
            )))
        }
    };
    check(&snap)?;
    let mut kv = Kv {
        db: Db::from_parts(snap.data, snap.expires),
        conns: snap.conns,
        next_client_id: snap.next_client_id,
        next_block_seq: snap.next_block_seq,
        ..Kv::default()
    };
    kv.reindex();
    Ok(kv)
}

/// What a checkpoint must satisfy for the service to run on it.
fn check(snap: &Snapshot) -> Result<(), RestoreError> {
    let bad = |why: &str| Err(RestoreError::new(format!("kv checkpoint: {why}")));
    if let Some(k) = snap.expires.keys().find(|k| !snap.data.contains_key(*k)) {
        return bad(&format!(
            "deadline for missing key {:?}",
            String::from_utf8_lossy(k)
        ));
    }
    if snap.expires.values().any(|at| *at > i64::MAX as u64) {
        return bad("deadline out of range");
    }
    if snap.data.values().any(Value::is_empty_container) {
        return bad("empty container value");
    }
    let broken_stream = |v: &Value| matches!(v, Value::Stream(s) if !s.is_consistent());
    if snap.data.values().any(broken_stream) {
        return bad("inconsistent stream");
    }
    for c in snap.conns.values() {
        if c.id == 0 || c.id > snap.next_client_id {
            return bad("client id beyond the counter");
        }
        if let Some(b) = &c.blocked {
            if b.keys.is_empty() || b.seq >= snap.next_block_seq || c.multi.is_some() {
                return bad("inconsistent blocked connection");
            }
        }
        if let Some(q) = &c.multi {
            if q.iter()
                .any(|cmd| cmd.is_empty() || cmd.iter().any(|a| a.len() > MAX_BULK_LEN))
            {
                return bad("bad queued command");
            }
        }
    }
    Ok(())
}
