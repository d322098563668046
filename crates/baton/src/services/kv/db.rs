//! The keyspace: values, deadlines, the SCAN order, and which keys the
//! current command modified (for WATCH).
//!
//! Every map is ordered, so the store is a deterministic function of its
//! events. Keys are also indexed by a fixed 64-bit hash: SCAN walks that
//! order and its cursor is the hash of the next key to return, so a cursor
//! means the same thing on every node and after any move, and a key present
//! for the whole iteration is returned whatever is added or removed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use super::stream::Stream;
pub use super::zset::ZSet;

pub type Hash = BTreeMap<Vec<u8>, Vec<u8>>;
pub type Set = BTreeSet<Vec<u8>>;
pub type List = VecDeque<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Str(Vec<u8>),
    List(List),
    Hash(Hash),
    Set(Set),
    // New variants go last: postcard numbers them, and older checkpoints
    // must keep their meaning.
    ZSet(ZSet),
    Stream(Stream),
}

impl Value {
    pub fn is_empty_container(&self) -> bool {
        match self {
            Value::Str(_) => false,
            Value::List(l) => l.is_empty(),
            Value::Hash(h) => h.is_empty(),
            Value::Set(s) => s.is_empty(),
            Value::ZSet(z) => z.is_empty(),
            // An emptied stream stays, as in Redis.
            Value::Stream(_) => false,
        }
    }

    /// The name TYPE answers and SCAN's TYPE filter takes.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Hash(_) => "hash",
            Value::Set(_) => "set",
            Value::ZSet(_) => "zset",
            Value::Stream(_) => "stream",
        }
    }
}

/// A key of the wrong type for the command.
#[derive(Debug)]
pub struct WrongType;

/// The keyspace and its deadlines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Db {
    data: BTreeMap<Vec<u8>, Value>,
    /// Deadline (ms since epoch) of each key that has one.
    expires: BTreeMap<Vec<u8>, u64>,
    /// The same deadlines, earliest first (derived: not checkpointed).
    deadlines: BTreeSet<(u64, Vec<u8>)>,
    /// Every key by its scan hash (derived).
    order: BTreeSet<(u64, Vec<u8>)>,
    /// Keys modified since the last [`Db::take_touched`].
    touched: Vec<Vec<u8>>,
}

/// FNV-1a: fixed, so cursors do not depend on the build or the node. Never
/// 0, which SCAN reserves for "start" and "done".
pub fn scan_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

impl Db {
    /// Rebuilds a store from checkpointed maps (derived indexes computed).
    pub fn from_parts(data: BTreeMap<Vec<u8>, Value>, expires: BTreeMap<Vec<u8>, u64>) -> Db {
        let deadlines = expires.iter().map(|(k, at)| (*at, k.clone())).collect();
        let order = data.keys().map(|k| (scan_hash(k), k.clone())).collect();
        Db {
            data,
            expires,
            deadlines,
            order,
            touched: Vec::new(),
        }
    }

    pub fn data(&self) -> &BTreeMap<Vec<u8>, Value> {
        &self.data
    }

    pub fn expires(&self) -> &BTreeMap<Vec<u8>, u64> {
        &self.expires
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<&Value> {
        self.data.get(key)
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.data.contains_key(key)
    }

    /// Records that `key` changed: WATCH of it fails from now on.
    pub fn touch(&mut self, key: &[u8]) {
        self.touched.push(key.to_vec());
    }

    /// The keys modified since the last call.
    pub fn take_touched(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.touched)
    }

    /// Removes every key whose deadline is before `now` (a key is still
    /// there at its deadline, as in Redis).
    pub fn purge(&mut self, now: u64) {
        while let Some((at, _)) = self.deadlines.first() {
            if *at >= now {
                break;
            }
            if let Some((_, key)) = self.deadlines.pop_first() {
                self.expires.remove(&key);
                self.unindex(&key);
                self.data.remove(&key);
                self.touched.push(key);
            }
        }
    }

    fn unindex(&mut self, key: &[u8]) {
        self.order.remove(&(scan_hash(key), key.to_vec()));
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Value> {
        let old = self.data.remove(key)?;
        self.clear_expire(key);
        self.unindex(key);
        self.touch(key);
        Some(old)
    }

    pub fn expire_at(&self, key: &[u8]) -> Option<u64> {
        self.expires.get(key).copied()
    }

    /// Drops the key's deadline; whether it had one.
    pub fn clear_expire(&mut self, key: &[u8]) -> bool {
        match self.expires.remove(key) {
            Some(at) => {
                self.deadlines.remove(&(at, key.to_vec()));
                self.touch(key);
                true
            }
            None => false,
        }
    }

    pub fn set_expire(&mut self, key: &[u8], at: u64) {
        self.clear_expire(key);
        self.expires.insert(key.to_vec(), at);
        self.deadlines.insert((at, key.to_vec()));
        self.touch(key);
    }

    pub fn flush(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.extend(self.data.keys().cloned());
        *self = Db::default();
        self.touched = touched;
    }

    /// Stores a value, dropping the key's deadline unless `keep_ttl`.
    pub fn insert(&mut self, key: &[u8], value: Value, keep_ttl: bool) {
        if !keep_ttl {
            self.clear_expire(key);
        }
        if self.data.insert(key.to_vec(), value).is_none() {
            self.order.insert((scan_hash(key), key.to_vec()));
        }
        self.touch(key);
    }

    pub fn set_str(&mut self, key: &[u8], value: Vec<u8>, keep_ttl: bool) {
        self.insert(key, Value::Str(value), keep_ttl);
    }

    pub fn get_str(&self, key: &[u8]) -> Result<Option<&Vec<u8>>, WrongType> {
        match self.data.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    /// The string at `key`, for changing in place (the caller touches it).
    pub fn get_str_mut(&mut self, key: &[u8]) -> Result<Option<&mut Vec<u8>>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    /// The list at `key`, for reading or changing (the caller touches the
    /// key when it changes it).
    pub fn get_list(&mut self, key: &[u8]) -> Result<Option<&mut List>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::List(l)) => Ok(Some(l)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn get_hash(&mut self, key: &[u8]) -> Result<Option<&mut Hash>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Hash(h)) => Ok(Some(h)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn get_set(&mut self, key: &[u8]) -> Result<Option<&mut Set>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Set(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn zset(&self, key: &[u8]) -> Result<Option<&ZSet>, WrongType> {
        match self.data.get(key) {
            None => Ok(None),
            Some(Value::ZSet(z)) => Ok(Some(z)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn get_zset(&mut self, key: &[u8]) -> Result<Option<&mut ZSet>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::ZSet(z)) => Ok(Some(z)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn stream(&self, key: &[u8]) -> Result<Option<&Stream>, WrongType> {
        match self.data.get(key) {
            None => Ok(None),
            Some(Value::Stream(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    pub fn get_stream(&mut self, key: &[u8]) -> Result<Option<&mut Stream>, WrongType> {
        match self.data.get_mut(key) {
            None => Ok(None),
            Some(Value::Stream(s)) => Ok(Some(s)),
            Some(_) => Err(WrongType),
        }
    }

    /// The value at `key`, created by `make` if missing; `WrongType` if it
    /// is not what `is_kind` accepts. The key counts as modified.
    pub fn entry(
        &mut self,
        key: &[u8],
        make: fn() -> Value,
        is_kind: fn(&Value) -> bool,
    ) -> Result<&mut Value, WrongType> {
        if let Some(v) = self.data.get(key) {
            if !is_kind(v) {
                return Err(WrongType);
            }
        } else {
            self.order.insert((scan_hash(key), key.to_vec()));
        }
        self.touched.push(key.to_vec());
        Ok(self.data.entry(key.to_vec()).or_insert_with(make))
    }

    /// Removes `key` if it is an empty container (after a pop or delete).
    pub fn drop_if_empty(&mut self, key: &[u8]) {
        if self.data.get(key).is_some_and(Value::is_empty_container) {
            self.remove(key);
        }
    }

    /// Up to `count` keys from `cursor` on, in scan order, and the cursor
    /// that continues after them (0 when done). Keys sharing a hash are
    /// never split across two pages, so a page may hold a few more.
    pub fn scan(&self, cursor: u64, count: usize) -> (u64, Vec<&Vec<u8>>) {
        let mut keys = Vec::new();
        let mut last_hash = None;
        for (h, k) in self.order.range((cursor, Vec::new())..) {
            if keys.len() >= count && last_hash != Some(*h) {
                return (*h, keys);
            }
            last_hash = Some(*h);
            keys.push(k);
        }
        (0, keys)
    }
}

/// One page of HSCAN/SSCAN/ZSCAN over the members of a container, in scan-hash
/// order, as [`Db::scan`]. Containers keep no hash index: a page sorts the
/// members from `cursor` on, which is fine for the sizes a service keeps.
pub fn scan_members<'a, I>(members: I, cursor: u64, count: usize) -> (u64, Vec<&'a Vec<u8>>)
where
    I: Iterator<Item = &'a Vec<u8>>,
{
    let mut rest: Vec<(u64, &Vec<u8>)> = members
        .map(|m| (scan_hash(m), m))
        .filter(|(h, _)| *h >= cursor)
        .collect();
    rest.sort_unstable();
    let mut page = Vec::new();
    let mut last_hash = None;
    for (h, m) in rest {
        if page.len() >= count && last_hash != Some(h) {
            return (h, page);
        }
        last_hash = Some(h);
        page.push(m);
    }
    (0, page)
}

/// Glob matching as Redis's `stringmatchlen`: `*`, `?`, `[abc]`, `[^a-z]`
/// and `\` escapes. Iterative, so no pattern makes it blow up.
pub fn glob_match(pattern: &[u8], s: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    // Does the single-character pattern at `p` match `c`? Returns the
    // result and the pattern position after it.
    let single = |p: usize, c: u8| -> (bool, usize) {
        match pattern[p] {
            b'?' => (true, p + 1),
            b'\\' if p + 1 < pattern.len() => (eq(pattern[p + 1], c), p + 2),
            b'[' => {
                let mut i = p + 1;
                let negate = pattern.get(i) == Some(&b'^');
                if negate {
                    i += 1;
                }
                let mut matched = false;
                while i < pattern.len() && pattern[i] != b']' {
                    if pattern[i] == b'\\' && i + 1 < pattern.len() {
                        matched |= eq(pattern[i + 1], c);
                        i += 2;
                    } else if i + 2 < pattern.len()
                        && pattern[i + 1] == b'-'
                        && pattern[i + 2] != b']'
                    {
                        let (mut lo, mut hi) = (pattern[i], pattern[i + 2]);
                        if lo > hi {
                            std::mem::swap(&mut lo, &mut hi);
                        }
                        let c2 = if nocase { c.to_ascii_lowercase() } else { c };
                        let (lo2, hi2) = if nocase {
                            (lo.to_ascii_lowercase(), hi.to_ascii_lowercase())
                        } else {
                            (lo, hi)
                        };
                        matched |= (lo..=hi).contains(&c) || (lo2..=hi2).contains(&c2);
                        i += 3;
                    } else {
                        matched |= eq(pattern[i], c);
                        i += 1;
                    }
                }
                // Past the closing ']' (an unclosed class runs to the end).
                (matched != negate, (i + 1).min(pattern.len()))
            }
            other => (eq(other, c), p + 1),
        }
    };
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last '*': pattern after it, and the next
    // input position it would swallow.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            p += 1;
            star = Some((p, i));
            continue;
        }
        if p < pattern.len() {
            let (m, next) = single(p, s[i]);
            if m {
                p = next;
                i += 1;
                continue;
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}
