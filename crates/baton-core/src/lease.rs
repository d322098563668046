//! The primary's lease: how long this leader may go on answering clients
//! although it might already be cut off.
//!
//! raft-rs's `check_quorum` is no lease: its leader steps down up to about
//! two election timeouts after losing contact, while the followers may
//! elect another after one. A primary that goes on releasing packets (or
//! whose kernel goes on sending) in between would answer clients beside the
//! new primary. So the leader counts, from its own heartbeats, when a
//! majority last heard from it, and stops before any of them may vote for
//! someone else.
//!
//! Each heartbeat round the leader sends gets a tag ([`Lease::handle_round_sent`]),
//! which its followers echo in their responses ([`Lease::handle_ack`]). A
//! follower that answers round `r` received it after it was sent, at
//! `sent(r)`; from then on it grants no vote and starts no election for at
//! least [`lease_duration`] (raft-rs's followers ignore votes while they
//! heard from a leader within the election timeout, and campaign only after
//! it). Any new leader needs a majority, which shares a node with the
//! majority that acknowledged: so none can be elected before the
//! acknowledged rounds' send time plus that duration, and the lease ends
//! there. Tags are looked up among the rounds actually sent, so a peer can
//! neither forge nor replay its way to a longer lease.
//!
//! Times are microseconds on the caller's monotonic clock.

use std::collections::{BTreeMap, VecDeque};

/// Rounds remembered for their acknowledgements: with one round per
/// millisecond at most, four seconds' worth.
const ROUNDS_KEPT: usize = 4096;
/// Messages sent within this long of a round's start share its tag (µs):
/// the round's time is then a little early, which only shortens the lease.
const ROUND_GRAIN_US: u64 = 1_000;

/// No one else can lead while this holds: a group of one voter.
pub const UNBOUNDED: u64 = u64::MAX;

/// The lease that a heartbeat acknowledged by a majority gives, in µs:
///
/// `(election_ticks − 1) × tick − fence − drift`, where
/// - `(election_ticks − 1) × tick` is the least time a follower waits after
///   a heartbeat before it campaigns or votes: raft-rs randomises its
///   timeout in `[election_ticks, 2 × election_ticks)` ticks, and the first
///   of them may come right after the heartbeat arrived;
/// - `fence` is what stopping takes once the lease ends (closing the
///   sockets silently and removing the VIP);
/// - `drift` covers the two clocks running at different rates,
///   `max_drift_ppm` parts per million of the election wait.
///
/// Zero when the margins eat the whole wait: such a leader has no lease.
pub fn lease_duration(tick_us: u64, election_ticks: u64, fence_us: u64, max_drift_ppm: u64) -> u64 {
    let wait = election_ticks.saturating_sub(1).saturating_mul(tick_us);
    let drift = wait.saturating_mul(max_drift_ppm).div_ceil(1_000_000);
    wait.saturating_sub(fence_us).saturating_sub(drift)
}

/// A leader's lease, fed with its heartbeat rounds and their
/// acknowledgements.
#[derive(Debug, Clone)]
pub struct Lease {
    me: u64,
    duration_us: u64,
    /// The voters of each configuration in force (two while joint).
    configs: Vec<Vec<u64>>,
    /// Rounds sent, oldest first: (tag, sent at).
    rounds: VecDeque<(u64, u64)>,
    next_tag: u64,
    /// Per peer: the send time of the newest round it acknowledged.
    heard: BTreeMap<u64, u64>,
    leading: bool,
}

impl Lease {
    /// The lease of node `me`, lasting `duration_us` past a majority's
    /// acknowledgement ([`lease_duration`]).
    pub fn new(me: u64, duration_us: u64) -> Lease {
        Lease {
            me,
            duration_us,
            configs: vec![vec![me]],
            rounds: VecDeque::new(),
            next_tag: 1,
            heard: BTreeMap::new(),
            leading: false,
        }
    }

    /// The voters now: `incoming`, and `outgoing` while a joint change is
    /// under way (empty otherwise). A lease needs a majority of each.
    pub fn handle_voters(&mut self, incoming: &[u64], outgoing: &[u64]) {
        self.configs = [incoming, outgoing]
            .into_iter()
            .filter(|c| !c.is_empty())
            .map(<[u64]>::to_vec)
            .collect();
        let all: Vec<u64> = self.configs.iter().flatten().copied().collect();
        self.heard.retain(|id, _| all.contains(id));
    }

    /// This node became leader (`true`) or stopped leading. A new term
    /// starts without a lease: acknowledgements of an earlier term's
    /// rounds say nothing about this one's followers.
    pub fn handle_leading(&mut self, leading: bool) {
        if leading != self.leading {
            self.leading = leading;
            self.rounds.clear();
            self.heard.clear();
        }
    }

    /// A heartbeat round goes out at `at_us`: returns the tag its messages
    /// carry.
    pub fn handle_round_sent(&mut self, at_us: u64) -> u64 {
        if let Some(&(tag, sent)) = self.rounds.back() {
            if at_us >= sent && at_us - sent < ROUND_GRAIN_US {
                return tag;
            }
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        if self.rounds.len() == ROUNDS_KEPT {
            self.rounds.pop_front();
        }
        self.rounds.push_back((tag, at_us));
        tag
    }

    /// `peer` answered the round tagged `tag`. Unknown tags (forged, or
    /// too old) and non-voters count for nothing.
    pub fn handle_ack(&mut self, peer: u64, tag: u64) {
        if !self.leading || peer == self.me || !self.configs.iter().flatten().any(|v| *v == peer) {
            return;
        }
        // Tags are consecutive: the round is found by its distance.
        let Some(&(first, _)) = self.rounds.front() else {
            return;
        };
        let Some(&(_, sent)) = tag
            .checked_sub(first)
            .and_then(|i| self.rounds.get(usize::try_from(i).ok()?))
        else {
            return;
        };
        let seen = self.heard.entry(peer).or_insert(0);
        *seen = (*seen).max(sent);
    }

    /// When the lease ends, in µs: `None` without one (not leading, or no
    /// majority acknowledged yet), [`UNBOUNDED`] when this node alone is a
    /// majority.
    pub fn poll_expiry(&self) -> Option<u64> {
        if !self.leading {
            return None;
        }
        let mut end = UNBOUNDED;
        for voters in &self.configs {
            // A leader outside a configuration (being removed) counts only
            // its peers there.
            let mine = voters.contains(&self.me);
            let need = voters.len() / 2 + 1 - usize::from(mine);
            if need == 0 {
                continue;
            }
            let mut times: Vec<u64> = voters
                .iter()
                .filter(|v| **v != self.me)
                .filter_map(|v| self.heard.get(v).copied())
                .collect();
            if times.len() < need {
                return None;
            }
            times.sort_unstable_by(|a, b| b.cmp(a));
            let basis = times[need - 1];
            end = end.min(basis.saturating_add(self.duration_us));
        }
        Some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leader(voters: &[u64]) -> Lease {
        let mut l = Lease::new(1, 30_000);
        l.handle_voters(voters, &[]);
        l.handle_leading(true);
        l
    }

    #[test]
    fn the_default_timing_gives_about_thirty_milliseconds() {
        assert_eq!(lease_duration(10_000, 5, 10_000, 1_000), 29_960);
        assert_eq!(lease_duration(10_000, 1, 0, 0), 0);
        assert_eq!(lease_duration(10_000, 2, 20_000, 0), 0);
    }

    #[test]
    fn a_majority_of_acknowledgements_starts_the_lease_at_their_round() {
        let mut l = leader(&[1, 2, 3]);
        assert_eq!(l.poll_expiry(), None);
        let r1 = l.handle_round_sent(1_000);
        let r2 = l.handle_round_sent(11_000);
        l.handle_ack(2, r1);
        assert_eq!(l.poll_expiry(), Some(31_000));
        l.handle_ack(3, r2);
        assert_eq!(l.poll_expiry(), Some(41_000));
        // An older round acknowledged late does not shorten it.
        l.handle_ack(3, r1);
        assert_eq!(l.poll_expiry(), Some(41_000));
    }

    #[test]
    fn five_voters_need_two_peers() {
        let mut l = leader(&[1, 2, 3, 4, 5]);
        let r1 = l.handle_round_sent(1_000);
        let r2 = l.handle_round_sent(2_000);
        l.handle_ack(2, r2);
        assert_eq!(l.poll_expiry(), None);
        l.handle_ack(5, r1);
        assert_eq!(l.poll_expiry(), Some(31_000));
    }

    #[test]
    fn forged_tags_strangers_and_old_terms_count_for_nothing() {
        let mut l = leader(&[1, 2, 3]);
        let r = l.handle_round_sent(1_000);
        l.handle_ack(2, r + 7);
        l.handle_ack(9, r);
        l.handle_ack(1, r);
        assert_eq!(l.poll_expiry(), None);
        l.handle_ack(2, r);
        assert!(l.poll_expiry().is_some());
        l.handle_leading(false);
        assert_eq!(l.poll_expiry(), None);
        l.handle_leading(true);
        l.handle_ack(2, r);
        assert_eq!(l.poll_expiry(), None, "a round of the last term");
    }

    #[test]
    fn a_lone_voter_is_its_own_majority() {
        let l = leader(&[1]);
        assert_eq!(l.poll_expiry(), Some(UNBOUNDED));
    }

    #[test]
    fn a_joint_change_needs_both_majorities() {
        let mut l = leader(&[1, 2, 3]);
        l.handle_voters(&[1, 4, 5], &[1, 2, 3]);
        let r = l.handle_round_sent(1_000);
        l.handle_ack(2, r);
        assert_eq!(l.poll_expiry(), None);
        l.handle_ack(4, r);
        assert_eq!(l.poll_expiry(), Some(31_000));
    }

    proptest! {
        /// Whatever arrives, the lease never outlasts the send time of a
        /// round that a majority acknowledged (here: the newest round each
        /// peer acknowledged, the majority-th newest) plus the duration.
        #[test]
        fn the_lease_never_outlasts_what_a_majority_acknowledged(
            peers in 1u64..6,
            events in proptest::collection::vec((0u8..3, 0u64..8, 0u64..40), 0..80),
        ) {
            let voters: Vec<u64> = (1..=peers + 1).collect();
            let mut l = leader(&voters);
            let mut now = 0u64;
            let mut sent: Vec<(u64, u64)> = Vec::new();
            let mut best: BTreeMap<u64, u64> = BTreeMap::new();
            for (kind, who, n) in events {
                now += n * 1_000;
                match kind {
                    0 => sent.push((l.handle_round_sent(now), now)),
                    _ => {
                        let tag = if sent.is_empty() { n } else { sent[(n as usize) % sent.len()].0 };
                        let peer = who % (peers + 3);
                        l.handle_ack(peer, tag);
                        if let Some((_, at)) = sent.iter().find(|(t, _)| *t == tag) {
                            if voters.contains(&peer) && peer != 1 {
                                let e = best.entry(peer).or_insert(0);
                                *e = (*e).max(*at);
                            }
                        }
                    }
                }
                let need = voters.len() / 2;
                let mut times: Vec<u64> = best.values().copied().collect();
                times.sort_unstable_by(|a, b| b.cmp(a));
                match l.poll_expiry() {
                    None => prop_assert!(times.len() < need),
                    Some(end) => {
                        prop_assert!(times.len() >= need);
                        prop_assert_eq!(end, times[need - 1] + 30_000);
                    }
                }
            }
        }
    }
}
