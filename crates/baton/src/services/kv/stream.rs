//! The stream value: entries by id, each a list of field-value pairs.
//!
//! Redis packs a stream's entries into nodes of at most 100 (and 4 KiB);
//! `MAXLEN ~` and `MINID ~` remove only whole nodes. kv keeps which node
//! each entry was appended to (by count; the byte limit is not modelled),
//! so approximate trimming removes what Redis would for small entries, and
//! stays a pure function of the commands.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Entries per node, as Redis's `stream-node-max-entries` default.
pub const NODE_ENTRIES: u32 = 100;

/// An entry id: milliseconds, then a sequence number within them.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The id after this one, `None` after the last possible one.
    pub fn next(self) -> Option<StreamId> {
        if self.seq < u64::MAX {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq + 1,
            })
        } else if self.ms < u64::MAX {
            Some(StreamId {
                ms: self.ms + 1,
                seq: 0,
            })
        } else {
            None
        }
    }

    /// The id before this one, `None` before 0-0.
    pub fn prev(self) -> Option<StreamId> {
        if self.seq > 0 {
            Some(StreamId {
                ms: self.ms,
                seq: self.seq - 1,
            })
        } else if self.ms > 0 {
            Some(StreamId {
                ms: self.ms - 1,
                seq: u64::MAX,
            })
        } else {
            None
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One entry: its field-value pairs, flat, and the node it was appended
/// to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: u64,
    pub fields: Vec<Vec<u8>>,
}

/// A stream. It may be empty (XDEL, trimming) and still exist, as in
/// Redis, and it remembers its last id so ids never go back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub entries: BTreeMap<StreamId, Entry>,
    pub last_id: StreamId,
    /// The node appends go to, and how many entries it was given
    /// (deleted ones included, as Redis counts them).
    pub tail_node: u64,
    pub tail_appended: u32,
}

/// How XADD and XTRIM trim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    None,
    MaxLen(u64),
    MinId(StreamId),
}

impl Stream {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends an entry under `id`, which the caller checked is above
    /// `last_id`.
    pub fn append(&mut self, id: StreamId, fields: Vec<Vec<u8>>) {
        let tail_alive = self
            .entries
            .last_key_value()
            .is_some_and(|(_, e)| e.node == self.tail_node);
        if !tail_alive || self.tail_appended >= NODE_ENTRIES {
            self.tail_node += 1;
            self.tail_appended = 0;
        }
        self.tail_appended += 1;
        self.entries.insert(
            id,
            Entry {
                node: self.tail_node,
                fields,
            },
        );
        self.last_id = id;
    }

    /// Trims as Redis 7.0's `streamTrim`: whole nodes from the oldest
    /// while what remains still satisfies `trim`, then (exact trimming
    /// only) single entries of the next node. `limit` (approximate only,
    /// 0 for none) caps the entries removed. Returns how many were.
    pub fn trim(&mut self, trim: Trim, approx: bool, limit: u64) -> u64 {
        if trim == Trim::None {
            return 0;
        }
        let mut deleted = 0u64;
        loop {
            if let Trim::MaxLen(max) = trim {
                if self.len() as u64 <= max {
                    break;
                }
            }
            let Some((_, first)) = self.entries.first_key_value() else {
                break;
            };
            let node = first.node;
            let in_node: Vec<StreamId> = self
                .entries
                .iter()
                .take_while(|(_, e)| e.node == node)
                .map(|(id, _)| *id)
                .collect();
            let count = in_node.len() as u64;
            if limit > 0 && deleted + count > limit {
                break;
            }
            let whole = match trim {
                Trim::None => break,
                Trim::MaxLen(max) => self.len() as u64 - count >= max,
                Trim::MinId(min) => in_node.last().is_some_and(|last| *last < min),
            };
            if whole {
                for id in &in_node {
                    self.entries.remove(id);
                }
                deleted += count;
                continue;
            }
            if approx {
                break;
            }
            for id in in_node {
                let stop = match trim {
                    Trim::MaxLen(max) => self.len() as u64 <= max,
                    Trim::MinId(min) => id >= min,
                    Trim::None => true,
                };
                if stop {
                    break;
                }
                self.entries.remove(&id);
                deleted += 1;
            }
            break;
        }
        deleted
    }

    /// What a checkpoint's stream must satisfy: ids up to `last_id`, whole
    /// field-value pairs, nodes in append order.
    pub fn is_consistent(&self) -> bool {
        let mut node = 0;
        for (id, e) in &self.entries {
            if *id > self.last_id
                || e.fields.is_empty()
                || e.fields.len() % 2 == 1
                || e.node < node
                || e.node > self.tail_node
            {
                return false;
            }
            node = e.node;
        }
        self.tail_appended <= NODE_ENTRIES
    }
}
