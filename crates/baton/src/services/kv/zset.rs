//! The sorted-set value: members ordered by `(score, member)`, as Redis
//! orders them, in two ordered maps (member to score, and the order
//! itself), so no hash-table order ever reaches a reply.
//!
//! Ranks (ZRANK, ZRANGE by index) walk the order: O(rank), where Redis's
//! skiplist is O(log n). Score ranges and pops are O(log n + answered).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A score: an `f64` that is never NaN, with `-0` stored as `0` (Redis
/// keeps small sorted sets as text, where `-0` reads back as `0`).
/// Totally ordered, so it can key an ordered map.
#[derive(Debug, Clone, Copy)]
pub struct Score(f64);

impl Score {
    /// `None` for NaN, which no sorted set holds.
    pub fn new(f: f64) -> Option<Score> {
        if f.is_nan() {
            None
        } else if f == 0.0 {
            Some(Score(0.0))
        } else {
            Some(Score(f))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl PartialEq for Score {
    fn eq(&self, other: &Score) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Score) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Score) -> Ordering {
        // Without NaN and -0, the total order is the numeric one.
        self.0.total_cmp(&other.0)
    }
}

/// The next double above `x` (not NaN, below +inf).
fn next_up(x: f64) -> f64 {
    if x == 0.0 {
        f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() + 1)
    } else {
        f64::from_bits(x.to_bits() - 1)
    }
}

/// A place in the `(score, member)` order.
type Key = (Score, Vec<u8>);

/// A score interval as ZRANGEBYSCORE and ZCOUNT take it: `min`/`max`,
/// each inclusive or, written `(x`, exclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRange {
    pub min: f64,
    pub min_ex: bool,
    pub max: f64,
    pub max_ex: bool,
}

impl ScoreRange {
    /// Parses the two bounds as Redis 7.0's `zslParseRange` does (C's
    /// `strtod`: leading blanks and an empty text read as 0, overflow is
    /// infinite, NaN is refused).
    pub fn parse(min: &[u8], max: &[u8]) -> Option<ScoreRange> {
        let bound = |s: &[u8]| -> Option<(f64, bool)> {
            let (ex, text) = match s.strip_prefix(b"(") {
                Some(rest) => (true, rest),
                None => (false, s),
            };
            let text = std::str::from_utf8(text).ok()?;
            let text = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
            let v = if text.is_empty() {
                0.0
            } else {
                text.parse::<f64>().ok()?
            };
            (!v.is_nan()).then_some((v, ex))
        };
        let (min, min_ex) = bound(min)?;
        let (max, max_ex) = bound(max)?;
        Some(ScoreRange {
            min,
            min_ex,
            max,
            max_ex,
        })
    }

    /// Whether no score can be inside (Redis's `zslIsInRange` test).
    pub fn is_empty(&self) -> bool {
        self.min > self.max || (self.min == self.max && (self.min_ex || self.max_ex))
    }

    /// The range as bounds of the `(score, member)` order: the empty member
    /// sorts first, so `(s, [])` starts the members of score `s`.
    fn bounds(&self) -> Option<(Bound<Key>, Bound<Key>)> {
        if self.is_empty() {
            return None;
        }
        let key = |f: f64| Score::new(f).map(|s| (s, Vec::new()));
        let lo = if self.min_ex {
            if self.min == f64::INFINITY {
                return None;
            }
            Bound::Included(key(next_up(self.min))?)
        } else {
            Bound::Included(key(self.min)?)
        };
        let hi = if self.max_ex {
            Bound::Excluded(key(self.max)?)
        } else if self.max == f64::INFINITY {
            Bound::Unbounded
        } else {
            Bound::Excluded(key(next_up(self.max))?)
        };
        // BTreeSet::range panics on a start after the end.
        if let (Bound::Included((a, _)), Bound::Excluded((b, _))) = (&lo, &hi) {
            if a > b {
                return None;
            }
        }
        Some((lo, hi))
    }
}

/// A member interval as ZRANGEBYLEX takes it: `-`, `+`, `[m` (inclusive)
/// or `(m` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexRange {
    min: LexBound,
    max: LexBound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LexBound {
    MinusInf,
    PlusInf,
    Incl(Vec<u8>),
    Excl(Vec<u8>),
}

impl LexRange {
    pub fn parse(min: &[u8], max: &[u8]) -> Option<LexRange> {
        let bound = |s: &[u8]| match s.split_first() {
            Some((b'-', [])) => Some(LexBound::MinusInf),
            Some((b'+', [])) => Some(LexBound::PlusInf),
            Some((b'[', rest)) => Some(LexBound::Incl(rest.to_vec())),
            Some((b'(', rest)) => Some(LexBound::Excl(rest.to_vec())),
            _ => None,
        };
        Some(LexRange {
            min: bound(min)?,
            max: bound(max)?,
        })
    }

    pub fn contains(&self, m: &[u8]) -> bool {
        let above_min = match &self.min {
            LexBound::MinusInf => true,
            LexBound::PlusInf => false,
            LexBound::Incl(b) => m >= b.as_slice(),
            LexBound::Excl(b) => m > b.as_slice(),
        };
        let below_max = match &self.max {
            LexBound::MinusInf => false,
            LexBound::PlusInf => true,
            LexBound::Incl(b) => m <= b.as_slice(),
            LexBound::Excl(b) => m < b.as_slice(),
        };
        above_min && below_max
    }
}

/// A sorted set. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZSet {
    scores: BTreeMap<Vec<u8>, Score>,
    order: BTreeSet<Key>,
}

impl ZSet {
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    pub fn score(&self, member: &[u8]) -> Option<f64> {
        self.scores.get(member).map(|s| s.get())
    }

    /// Sets a member's score; its previous score, if it had one.
    pub fn insert(&mut self, member: &[u8], score: Score) -> Option<f64> {
        let old = self.scores.insert(member.to_vec(), score);
        if let Some(old) = old {
            self.order.remove(&(old, member.to_vec()));
        }
        self.order.insert((score, member.to_vec()));
        old.map(Score::get)
    }

    pub fn remove(&mut self, member: &[u8]) -> Option<f64> {
        let old = self.scores.remove(member)?;
        self.order.remove(&(old, member.to_vec()));
        Some(old.get())
    }

    /// Removes the lowest (or, `max`, the highest) member.
    pub fn pop(&mut self, max: bool) -> Option<(Vec<u8>, f64)> {
        let (score, member) = if max {
            self.order.pop_last()?
        } else {
            self.order.pop_first()?
        };
        self.scores.remove(&member);
        Some((member, score.get()))
    }

    /// Every member with its score, lowest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Vec<u8>, f64)> {
        self.order.iter().map(|(s, m)| (m, s.get()))
    }

    /// Members in any order (for the SCAN family).
    pub fn members(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.scores.keys()
    }

    /// The member's 0-based position from the lowest.
    pub fn rank(&self, member: &[u8]) -> Option<usize> {
        let score = *self.scores.get(member)?;
        Some(self.order.range(..(score, member.to_vec())).count())
    }

    /// The members whose score is in `range`, lowest first.
    pub fn range_by_score(
        &self,
        range: &ScoreRange,
    ) -> impl DoubleEndedIterator<Item = (&Vec<u8>, f64)> {
        range
            .bounds()
            .map(|b| self.order.range(b))
            .into_iter()
            .flatten()
            .map(|(s, m)| (m, s.get()))
    }
}

impl Serialize for ZSet {
    /// Only the member-to-score map: the order is derived from it.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let plain: BTreeMap<&Vec<u8>, f64> = self.scores.iter().map(|(m, s)| (m, s.0)).collect();
        plain.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ZSet {
    /// Refuses a NaN score, so a restored set is always ordered.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ZSet, D::Error> {
        let plain = BTreeMap::<Vec<u8>, f64>::deserialize(deserializer)?;
        let mut z = ZSet::default();
        for (m, f) in plain {
            let score = Score::new(f).ok_or_else(|| serde::de::Error::custom("NaN score"))?;
            z.insert(&m, score);
        }
        Ok(z)
    }
}

/// Parses a score as Redis 7.0's `getDoubleFromObject` does (`strtod`,
/// nothing before or after the number, no overflow or underflow to 0, no
/// NaN). C's hexadecimal floats (`0x1p3`) are not read.
pub fn parse_score(s: &[u8]) -> Option<Score> {
    let text = std::str::from_utf8(s).ok()?;
    let v: f64 = text.parse().ok()?;
    let digits = text
        .trim_start_matches(['+', '-'])
        .split(['e', 'E'])
        .next()
        .unwrap_or("");
    let word = digits.eq_ignore_ascii_case("inf") || digits.eq_ignore_ascii_case("infinity");
    if v.is_infinite() && !word {
        return None; // ERANGE: overflow
    }
    if v == 0.0 && digits.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        return None; // ERANGE: underflow to zero
    }
    Score::new(v)
}
