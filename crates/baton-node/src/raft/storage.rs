//! The group's raft log, in memory (see the module docs of [`super`] for
//! why nothing is kept on disk), and the snapshot that precedes it.
//!
//! Unlike raft-rs's `MemStorage` it keeps the application's snapshot bytes
//! with the snapshot's metadata, and refuses a bad update with an error
//! instead of panicking.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use ::raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use ::raft::{GetEntriesContext, RaftState, StorageError};
use serde::{Deserialize, Serialize};

use super::{Member, RaftId};

/// What a snapshot's bytes hold: the members (raft-rs's `ConfState` knows
/// only ids) and the application's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEnvelope {
    pub members: BTreeMap<RaftId, Member>,
    pub app: Vec<u8>,
}

impl SnapshotEnvelope {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding into a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotEnvelope, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// The snapshot the log starts after.
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    /// An encoded [`SnapshotEnvelope`].
    pub data: Arc<Vec<u8>>,
}

/// Why the log refused an update.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("entries from {first} would overwrite the snapshot at {snapshot}")]
    BeforeSnapshot { first: u64, snapshot: u64 },
    #[error("entries from {first} leave a gap after {last}")]
    Gap { first: u64, last: u64 },
    #[error("snapshot at {index} is older than the one at {current}")]
    OlderSnapshot { index: u64, current: u64 },
    #[error("index {index} is outside the log ({first}..={last})")]
    OutOfRange { index: u64, first: u64, last: u64 },
}

/// The log of one group on one node.
pub struct GroupStorage {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: StoredSnapshot,
    /// `entries[0].index == snapshot.index + 1`.
    entries: VecDeque<Entry>,
    /// Set when raft asked for a snapshot the stored one cannot serve: the
    /// peer it was for.
    wanted: Cell<Option<RaftId>>,
}

impl GroupStorage {
    /// A founding member's log: a snapshot at index 1 (term 1) holding the
    /// founding voters and an empty application state. The log starts at
    /// 2, so a node that joins later always begins from a snapshot that
    /// names it, never from entries that assume another configuration.
    pub fn found(voters: BTreeMap<RaftId, Member>) -> GroupStorage {
        let conf_state = ConfState::from((voters.keys().copied(), std::iter::empty()));
        let data = SnapshotEnvelope {
            members: voters,
            app: Vec::new(),
        }
        .encode();
        let hard_state = HardState {
            term: 1,
            vote: 0,
            commit: 1,
        };
        GroupStorage {
            hard_state,
            conf_state: conf_state.clone(),
            snapshot: StoredSnapshot {
                index: 1,
                term: 1,
                conf_state,
                data: Arc::new(data),
            },
            entries: VecDeque::new(),
            wanted: Cell::new(None),
        }
    }

    /// A joining node's log: empty, no configuration; its first snapshot
    /// brings both.
    pub fn empty() -> GroupStorage {
        GroupStorage {
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: StoredSnapshot {
                index: 0,
                term: 0,
                conf_state: ConfState::default(),
                data: Arc::new(Vec::new()),
            },
            entries: VecDeque::new(),
            wanted: Cell::new(None),
        }
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.index + self.entries.len() as u64
    }

    /// The snapshot the log starts after.
    pub fn snapshot_stored(&self) -> &StoredSnapshot {
        &self.snapshot
    }

    /// The peer raft asked a snapshot for since the last call, if the
    /// stored one could not serve it.
    pub fn take_wanted(&self) -> Option<RaftId> {
        self.wanted.take()
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Appends entries raft handed over, replacing any from their first
    /// index on.
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), LogError> {
        let Some(first) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        if first < self.first() {
            return Err(LogError::BeforeSnapshot {
                first,
                snapshot: self.snapshot.index,
            });
        }
        if first > self.last() + 1 {
            return Err(LogError::Gap {
                first,
                last: self.last(),
            });
        }
        self.entries.truncate((first - self.first()) as usize);
        self.entries.extend(ents.iter().cloned());
        Ok(())
    }

    /// Replaces the log with a snapshot received from the leader.
    pub fn apply_snapshot(&mut self, snap: StoredSnapshot) -> Result<(), LogError> {
        if snap.index < self.snapshot.index {
            return Err(LogError::OlderSnapshot {
                index: snap.index,
                current: self.snapshot.index,
            });
        }
        self.hard_state.term = self.hard_state.term.max(snap.term);
        self.hard_state.commit = self.hard_state.commit.max(snap.index);
        self.conf_state = snap.conf_state.clone();
        self.entries.clear();
        self.snapshot = snap;
        Ok(())
    }

    /// Records the application's snapshot at `index` (in the log) and
    /// discards the entries up to it.
    pub fn compact(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Arc<Vec<u8>>,
    ) -> Result<(), LogError> {
        if index < self.first() || index > self.last() {
            return Err(LogError::OutOfRange {
                index,
                first: self.first(),
                last: self.last(),
            });
        }
        let at = (index - self.first()) as usize;
        let term = self.entries[at].term;
        // Freeing seconds of log (hundreds of MiB) takes long enough to
        // make heartbeats late: it happens on a thread of its own.
        let old: Vec<Entry> = self.entries.drain(..=at).collect();
        if let Err(e) = std::thread::Builder::new()
            .name("raft-free".into())
            .spawn(move || drop(old))
        {
            tracing::debug!(error = %e, "freeing compacted entries here");
        }
        self.snapshot = StoredSnapshot {
            index,
            term,
            conf_state,
            data,
        };
        Ok(())
    }

    /// The term of the entry at `index`, if it is in the log or is the
    /// snapshot's.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        if index < self.first() || index > self.last() {
            return None;
        }
        Some(self.entries[(index - self.first()) as usize].term)
    }
}

fn includes(cs: &ConfState, id: RaftId) -> bool {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .any(|v| *v == id)
}

impl ::raft::Storage for GroupStorage {
    fn initial_state(&self) -> ::raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> ::raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(::raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(::raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for e in self
            .entries
            .range((low - self.first()) as usize..(high - self.first()) as usize)
        {
            size += prost::Message::encoded_len(e) as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> ::raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.first() {
            return Err(::raft::Error::Store(StorageError::Compacted));
        }
        self.term_at(idx)
            .ok_or(::raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> ::raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> ::raft::Result<u64> {
        Ok(self.last())
    }

    /// The stored snapshot, if it names `to`: a node gets a snapshot of a
    /// configuration it belongs to (raft-rs refuses any other). Otherwise
    /// the application is asked for a fresh one and raft retries later.
    fn snapshot(&self, request_index: u64, to: u64) -> ::raft::Result<Snapshot> {
        if self.snapshot.index < request_index || !includes(&self.snapshot.conf_state, to) {
            self.wanted.set(Some(to));
            return Err(::raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(Snapshot {
            data: Vec::new(),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(self.snapshot.conf_state.clone()),
                index: self.snapshot.index,
                term: self.snapshot.term,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8],
            ..Default::default()
        }
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn a_founded_log_starts_after_a_snapshot_at_one() {
        let s = GroupStorage::found([(1, member("a")), (2, member("b"))].into());
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 1);
        assert_eq!(s.term(1).unwrap(), 1);
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2]);
        assert_eq!(st.hard_state.commit, 1);
        let env = SnapshotEnvelope::decode(&s.snapshot_stored().data).unwrap();
        assert_eq!(env.members.len(), 2);
    }

    #[test]
    fn appends_replace_the_tail_and_refuse_gaps_and_the_snapshot() {
        let mut s = GroupStorage::found([(1, member("a"))].into());
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)]).unwrap();
        s.append(&[entry(3, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(
            s.append(&[entry(5, 2)]),
            Err(LogError::Gap { first: 5, last: 3 })
        );
        assert_eq!(
            s.append(&[entry(1, 2)]),
            Err(LogError::BeforeSnapshot {
                first: 1,
                snapshot: 1
            })
        );
        assert!(matches!(
            s.entries(4, 5, None, GetEntriesContext::empty(false)),
            Err(::raft::Error::Store(StorageError::Unavailable))
        ));
    }

    #[test]
    fn compaction_keeps_the_term_of_its_index_and_limits_sizes() {
        let mut s = GroupStorage::found([(1, member("a"))].into());
        s.append(&(2..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>())
            .unwrap();
        let cs = ConfState::from(([1u64], []));
        s.compact(6, cs, Arc::new(vec![9])).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 2);
        assert!(matches!(
            s.term(5),
            Err(::raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(::raft::Error::Store(StorageError::Compacted))
        ));
        let one = s
            .entries(7, 11, 1, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(one.len(), 1, "at least one entry, even over the limit");
        let all = s
            .entries(7, 11, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(all.len(), 4);
        assert!(s
            .compact(3, ConfState::default(), Arc::new(vec![]))
            .is_err());
    }

    #[test]
    fn a_snapshot_that_does_not_name_the_peer_is_asked_for() {
        let s = GroupStorage::found([(1, member("a")), (2, member("b"))].into());
        assert!(s.snapshot(0, 2).is_ok());
        assert_eq!(s.take_wanted(), None);
        assert!(matches!(
            s.snapshot(0, 7),
            Err(::raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert_eq!(s.take_wanted(), Some(7));
        assert_eq!(s.take_wanted(), None);
    }
}
