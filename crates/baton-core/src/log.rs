//! The ordered record of everything a service consumes, and how it is
//! applied.
//!
//! Each [`LogEntry`] carries one event plus the time and entropy the
//! service sees while handling it, so applying the same entries gives the
//! same state and output on any node. In this milestone the log is local to
//! the serving node (fed from its kernel sockets); the next one feeds the
//! same entries from a replicated log. [`Applier`] is the part that does
//! not change: it checks the order and drives the service.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::service::{CloseReason, ConnId, Context, Output, Service, TimerId};

/// One event of a service's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Opened { conn: ConnId, peer: SocketAddr },
    Data { conn: ConnId, bytes: Vec<u8> },
    Closed { conn: ConnId, reason: CloseReason },
    TimerFired { id: TimerId },
}

/// An event with its place in the log and what the service may observe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log, from 1, without gaps.
    pub index: u64,
    /// Time assigned by the node that appended the entry (ms since epoch).
    pub time_ms: u64,
    /// Seed of the service's randomness for this entry.
    pub entropy: u64,
    pub event: Event,
}

/// An entry that cannot be applied here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("log entry {got} out of order: expected {expected}")]
    OutOfOrder { expected: u64, got: u64 },
}

/// Applies log entries to a service, in order, and keeps what the log
/// needs besides the service itself: the next index and pending timers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applier {
    next_index: u64,
    last_time_ms: u64,
    timers: BTreeMap<TimerId, u64>,
}

impl Default for Applier {
    fn default() -> Self {
        Applier {
            next_index: 1,
            last_time_ms: 0,
            timers: BTreeMap::new(),
        }
    }
}

impl Applier {
    /// Index the next entry must have.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Time of the last entry applied: entries never go back in time.
    pub fn last_time_ms(&self) -> u64 {
        self.last_time_ms
    }

    /// Applies `entry` and returns what the service asked for, in order.
    /// Timer requests are kept here (see [`Applier::due_timers`]) and also
    /// returned, so the runtime knows when to wake up.
    pub fn apply<S: Service + ?Sized>(
        &mut self,
        service: &mut S,
        entry: &LogEntry,
    ) -> Result<Vec<Output>, ApplyError> {
        if entry.index != self.next_index {
            return Err(ApplyError::OutOfOrder {
                expected: self.next_index,
                got: entry.index,
            });
        }
        self.next_index += 1;
        self.last_time_ms = self.last_time_ms.max(entry.time_ms);
        let mut ctx = Context::new(self.last_time_ms, entry.entropy);
        match &entry.event {
            Event::Opened { conn, peer } => service.on_open(&mut ctx, *conn, *peer),
            Event::Data { conn, bytes } => service.on_data(&mut ctx, *conn, bytes),
            Event::Closed { conn, reason } => service.on_close(&mut ctx, *conn, *reason),
            Event::TimerFired { id } => {
                // A timer cancelled or re-armed later than this entry was
                // appended is stale: skip it, the same way on every node.
                match self.timers.get(id) {
                    Some(at) if *at <= self.last_time_ms => {
                        self.timers.remove(id);
                        service.on_timer(&mut ctx, *id);
                    }
                    _ => {}
                }
            }
        }
        let outputs = ctx.into_outputs();
        for out in &outputs {
            match out {
                Output::SetTimer { id, at_ms } => {
                    self.timers.insert(*id, *at_ms);
                }
                Output::CancelTimer { id } => {
                    self.timers.remove(id);
                }
                _ => {}
            }
        }
        Ok(outputs)
    }

    /// Timers due at `now_ms`, earliest first: the runtime appends a
    /// `TimerFired` entry for each.
    pub fn due_timers(&self, now_ms: u64) -> Vec<TimerId> {
        let mut due: Vec<(u64, TimerId)> = self
            .timers
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(id, at)| (*at, *id))
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// When the earliest pending timer is due.
    pub fn next_timer_at(&self) -> Option<u64> {
        self.timers.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::RestoreError;

    /// Echoes, remembers a running sum of random draws, and sets a timer.
    #[derive(Default, Debug, PartialEq)]
    struct Probe {
        seen: Vec<u8>,
        draws: u64,
        fired: Vec<TimerId>,
    }

    impl Service for Probe {
        fn on_open(&mut self, ctx: &mut Context, conn: ConnId, _peer: SocketAddr) {
            ctx.set_timer(conn, ctx.now_ms() + 100);
        }
        fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
            self.seen.extend_from_slice(data);
            self.draws = self.draws.wrapping_add(ctx.random_u64());
            ctx.send(conn, data);
        }
        fn on_close(&mut self, ctx: &mut Context, conn: ConnId, _reason: CloseReason) {
            ctx.cancel_timer(conn);
            ctx.close(conn);
        }
        fn on_timer(&mut self, _ctx: &mut Context, timer: TimerId) {
            self.fired.push(timer);
        }
        fn checkpoint(&self) -> Vec<u8> {
            Vec::new()
        }
        fn restore(_: &[u8]) -> Result<Self, RestoreError> {
            Ok(Probe::default())
        }
    }

    fn entry(index: u64, time_ms: u64, event: Event) -> LogEntry {
        LogEntry {
            index,
            time_ms,
            entropy: index * 7,
            event,
        }
    }

    fn log() -> Vec<LogEntry> {
        let peer: SocketAddr = "198.18.2.1:5000".parse().unwrap();
        vec![
            entry(1, 1000, Event::Opened { conn: 1, peer }),
            entry(2, 1010, Event::Opened { conn: 2, peer }),
            entry(
                3,
                1020,
                Event::Data {
                    conn: 1,
                    bytes: b"hi".to_vec(),
                },
            ),
            entry(
                4,
                1030,
                Event::Closed {
                    conn: 2,
                    reason: CloseReason::PeerFinished,
                },
            ),
            entry(5, 1200, Event::TimerFired { id: 1 }),
            // Cancelled: must be skipped.
            entry(6, 1200, Event::TimerFired { id: 2 }),
        ]
    }

    #[test]
    fn same_log_same_state_and_output() {
        let run = || {
            let mut s = Probe::default();
            let mut a = Applier::default();
            let outs: Vec<Vec<Output>> =
                log().iter().map(|e| a.apply(&mut s, e).unwrap()).collect();
            (s, a, outs)
        };
        let (s1, a1, o1) = run();
        let (s2, a2, o2) = run();
        assert_eq!(s1, s2);
        assert_eq!(a1, a2);
        assert_eq!(o1, o2);
        assert_eq!(s1.fired, vec![1]);
        assert_eq!(a1.next_index(), 7);
    }

    #[test]
    fn gaps_and_repeats_are_refused() {
        let mut s = Probe::default();
        let mut a = Applier::default();
        let l = log();
        assert!(a.apply(&mut s, &l[1]).is_err());
        a.apply(&mut s, &l[0]).unwrap();
        assert!(a.apply(&mut s, &l[0]).is_err());
    }

    #[test]
    fn timers_come_due_in_order() {
        let mut s = Probe::default();
        let mut a = Applier::default();
        for e in &log()[..2] {
            a.apply(&mut s, e).unwrap();
        }
        assert_eq!(a.next_timer_at(), Some(1100));
        assert_eq!(a.due_timers(1099), Vec::<TimerId>::new());
        assert_eq!(a.due_timers(1110), vec![1, 2]);
    }

    #[test]
    fn time_never_goes_back() {
        let mut s = Probe::default();
        let mut a = Applier::default();
        let peer: SocketAddr = "198.18.2.1:5000".parse().unwrap();
        a.apply(&mut s, &entry(1, 5000, Event::Opened { conn: 1, peer }))
            .unwrap();
        a.apply(&mut s, &entry(2, 10, Event::Opened { conn: 2, peer }))
            .unwrap();
        assert_eq!(a.last_time_ms(), 5000);
        assert_eq!(a.next_timer_at(), Some(5100));
    }
}
