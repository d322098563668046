//! Stream commands: XADD (`NOMKSTREAM`, `MAXLEN|MINID [=|~] threshold
//! [LIMIT count]`), XTRIM, XLEN, XRANGE, XREVRANGE (`COUNT`), XDEL, with
//! Redis 7.0's replies and error texts.
//!
//! An id given as `*` (or `ms-*`) is made from the log: its milliseconds
//! are the event's time (`ctx.now_ms()`), its sequence follows the
//! stream's last id, so every node makes the same one. Never the wall
//! clock.

use super::{arity_error, Call, Flow, NOT_INTEGER, SYNTAX, WRONGTYPE};
use crate::services::kv::db::{Stream, Value, WrongType};
use crate::services::kv::stream::{StreamId, Trim};
use crate::services::kv::Kv;
use crate::services::resp::{parse_i64, Writer};

const INVALID_ID: &str = "ERR Invalid stream ID specified as stream command argument";

/// An unsigned decimal as Redis's `string2ull`: `string2ll` when it
/// applies, otherwise C's `strtoull` (leading blanks, a sign, leading
/// zeros; `-` wraps; nothing after the digits).
fn parse_u64(s: &[u8]) -> Option<u64> {
    if let Some(v) = parse_i64(s) {
        return u64::try_from(v).ok();
    }
    let mut rest = s;
    while let Some((c, r)) = rest.split_first() {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r') {
            break;
        }
        rest = r;
    }
    let (neg, digits) = match rest.split_first() {
        Some((b'-', r)) => (true, r),
        Some((b'+', r)) => (false, r),
        _ => (false, rest),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(if neg { v.wrapping_neg() } else { v })
}

/// How an id argument may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdForm {
    /// `-` and `+` allowed (XRANGE bounds).
    Interval,
    /// Neither `-` nor `+` (XDEL, MINID, exclusive bounds).
    Strict,
    /// Strict, and `ms-*` allowed (XADD).
    Add,
}

/// Parses `ms[-seq]` as Redis's `streamGenericParseIDOrReply`; a missing
/// sequence is `missing_seq`. Also says whether the sequence was given
/// (`ms-*` leaves it to XADD).
fn parse_id(s: &[u8], missing_seq: u64, form: IdForm) -> Option<(StreamId, bool)> {
    if s.len() > 127 {
        return None;
    }
    match s {
        b"-" | b"+" if form != IdForm::Interval => None,
        b"-" => Some((StreamId::default(), true)),
        b"+" => Some((StreamId::MAX, true)),
        _ => {
            let (ms, seq) = match s.iter().position(|&b| b == b'-') {
                Some(i) => (&s[..i], Some(&s[i + 1..])),
                None => (s, None),
            };
            let ms = parse_u64(ms)?;
            match seq {
                Some(b"*") if form == IdForm::Add => Some((StreamId { ms, seq: 0 }, false)),
                Some(seq) => Some((
                    StreamId {
                        ms,
                        seq: parse_u64(seq)?,
                    },
                    true,
                )),
                None => Some((
                    StreamId {
                        ms,
                        seq: missing_seq,
                    },
                    true,
                )),
            }
        }
    }
}

/// The trimming and XADD options, as Redis 7.0's
/// `streamParseAddOrTrimArgsOrReply` reads them.
struct AddOrTrim {
    trim: Trim,
    approx: bool,
    limit: u64,
    no_mkstream: bool,
    /// XADD's id: `None` for `*`; with whether its sequence was given.
    id: Option<(StreamId, bool)>,
    /// Where the id is (XADD: the fields follow it).
    id_at: usize,
}

fn parse_add_or_trim(args: &[Vec<u8>], xadd: bool) -> Result<AddOrTrim, &'static str> {
    let mut a = AddOrTrim {
        trim: Trim::None,
        approx: false,
        limit: 0,
        no_mkstream: false,
        id: None,
        id_at: args.len(),
    };
    let mut limit_given = false;
    let mut i = 2;
    while i < args.len() {
        let more = args.len() - 1 - i;
        let opt = args[i].to_ascii_lowercase();
        if xadd && opt == b"*" {
            a.id_at = i;
            break;
        } else if (opt == b"maxlen" || opt == b"minid") && more > 0 {
            if a.trim != Trim::None {
                return Err(
                    "ERR syntax error, MAXLEN and MINID options at the same time are not compatible",
                );
            }
            a.approx = false;
            if more >= 2 && args[i + 1] == b"~" {
                a.approx = true;
                i += 1;
            } else if more >= 2 && args[i + 1] == b"=" {
                i += 1;
            }
            let value = &args[i + 1];
            a.trim = if opt == b"maxlen" {
                let n = parse_i64(value).ok_or(NOT_INTEGER)?;
                Trim::MaxLen(u64::try_from(n).map_err(|_| "ERR The MAXLEN argument must be >= 0.")?)
            } else {
                let (id, _) = parse_id(value, 0, IdForm::Strict).ok_or(INVALID_ID)?;
                Trim::MinId(id)
            };
            i += 1;
        } else if opt == b"limit" && more > 0 {
            let n = parse_i64(&args[i + 1]).ok_or(NOT_INTEGER)?;
            a.limit = u64::try_from(n).map_err(|_| "ERR The LIMIT argument must be >= 0.")?;
            limit_given = true;
            i += 1;
        } else if xadd && opt == b"nomkstream" {
            a.no_mkstream = true;
        } else if xadd {
            a.id = Some(parse_id(&args[i], 0, IdForm::Add).ok_or(INVALID_ID)?);
            a.id_at = i;
            break;
        } else {
            return Err(SYNTAX);
        }
        i += 1;
    }
    if a.limit > 0 && a.trim == Trim::None {
        return Err(
            "ERR syntax error, LIMIT cannot be used without specifying a trimming strategy",
        );
    }
    if !xadd && a.trim == Trim::None {
        return Err("ERR syntax error, XTRIM must be called with a trimming strategy");
    }
    if limit_given {
        if !a.approx {
            return Err("ERR syntax error, LIMIT cannot be used without the special ~ option");
        }
    } else if a.approx {
        // Redis: 100 * stream-node-max-entries, at most 10,000.
        a.limit = 10_000;
    }
    Ok(a)
}

fn is_stream(v: &Value) -> bool {
    matches!(v, Value::Stream(_))
}

/// `XADD key [NOMKSTREAM] [MAXLEN|MINID [=|~] threshold [LIMIT count]]
/// *|id field value [field value ...]`.
pub fn xadd(kv: &mut Kv, c: &mut Call) -> Flow {
    let a = match parse_add_or_trim(c.args, true) {
        Ok(a) => a,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let fields = c.args.get(a.id_at + 1..).unwrap_or_default();
    if fields.len() < 2 || fields.len() % 2 == 1 {
        arity_error(c.out, "xadd");
        return Flow::Continue;
    }
    if a.id == Some((StreamId::default(), true)) {
        c.out
            .err("ERR The ID specified in XADD must be greater than 0-0");
        return Flow::Continue;
    }
    let key = &c.args[1];
    let last = match kv.db.stream(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) if a.no_mkstream => {
            c.out.null();
            return Flow::Continue;
        }
        Ok(s) => s.map_or(StreamId::default(), |s| s.last_id),
    };
    if last == StreamId::MAX {
        c.out
            .err("ERR The stream has exhausted the last possible ID, unable to add more items");
        return Flow::Continue;
    }
    let id = match a.id {
        Some((id, true)) => Some(id),
        // `ms-*`: the next sequence within ms, 0 in a later ms.
        Some((id, false)) if id.ms == last.ms => last.next().filter(|n| n.ms == id.ms),
        Some((id, false)) => Some(id),
        None => {
            let now = c.now();
            if now > last.ms {
                Some(StreamId { ms: now, seq: 0 })
            } else {
                last.next()
            }
        }
    };
    let Some(id) = id.filter(|id| *id > last) else {
        c.out.err(
            "ERR The ID specified in XADD is equal or smaller than the target stream top item",
        );
        return Flow::Continue;
    };
    let Ok(Value::Stream(s)) = kv
        .db
        .entry(key, || Value::Stream(Stream::default()), is_stream)
    else {
        return Flow::Continue;
    };
    s.append(id, fields.to_vec());
    s.trim(a.trim, a.approx, a.limit);
    c.out.bulk(id.to_string().as_bytes());
    Flow::Continue
}

/// `XTRIM key MAXLEN|MINID [=|~] threshold [LIMIT count]`: options
/// first, then the key.
pub fn xtrim(kv: &mut Kv, c: &mut Call) -> Flow {
    let a = match parse_add_or_trim(c.args, false) {
        Ok(a) => a,
        Err(e) => {
            c.out.err(e);
            return Flow::Continue;
        }
    };
    let key = &c.args[1];
    match kv.db.get_stream(key) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(None) => c.out.int(0),
        Ok(Some(s)) => {
            let n = s.trim(a.trim, a.approx, a.limit);
            if n > 0 {
                kv.db.touch(key);
            }
            c.out.int(n as i64);
        }
    }
    Flow::Continue
}

pub fn xlen(kv: &mut Kv, c: &mut Call) -> Flow {
    match kv.db.stream(&c.args[1]) {
        Err(WrongType) => c.out.err(WRONGTYPE),
        Ok(s) => c.out.int(s.map_or(0, Stream::len) as i64),
    }
    Flow::Continue
}

pub fn xrange(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, false)
}

pub fn xrevrange(kv: &mut Kv, c: &mut Call) -> Flow {
    range(kv, c, true)
}

/// A range bound: `(id` is exclusive (and strict), else `-`, `+` or an id.
fn bound(s: &[u8], missing_seq: u64) -> Option<(StreamId, bool)> {
    match s.strip_prefix(b"(") {
        Some(rest) if s.len() > 1 => Some((parse_id(rest, missing_seq, IdForm::Strict)?.0, true)),
        _ => Some((parse_id(s, missing_seq, IdForm::Interval)?.0, false)),
    }
}

/// `XRANGE key start end [COUNT n]` (XREVRANGE takes `end start`).
fn range(kv: &mut Kv, c: &mut Call, rev: bool) -> Flow {
    let args = c.args;
    let (start_arg, end_arg) = if rev {
        (&args[3], &args[2])
    } else {
        (&args[2], &args[3])
    };
    let Some((start, start_ex)) = bound(start_arg, 0) else {
        c.out.err(INVALID_ID);
        return Flow::Continue;
    };
    let start = if start_ex {
        match start.next() {
            Some(s) => s,
            None => {
                c.out.err("ERR invalid start ID for the interval");
                return Flow::Continue;
            }
        }
    } else {
        start
    };
    let Some((end, end_ex)) = bound(end_arg, u64::MAX) else {
        c.out.err(INVALID_ID);
        return Flow::Continue;
    };
    let end = if end_ex {
        match end.prev() {
            Some(e) => e,
            None => {
                c.out.err("ERR invalid end ID for the interval");
                return Flow::Continue;
            }
        }
    } else {
        end
    };
    let mut count: Option<u64> = None;
    let mut j = 4;
    while j < args.len() {
        if args[j].eq_ignore_ascii_case(b"count") && j + 1 < args.len() {
            let Some(n) = parse_i64(&args[j + 1]) else {
                c.out.err(NOT_INTEGER);
                return Flow::Continue;
            };
            count = Some(u64::try_from(n).unwrap_or(0));
            j += 2;
        } else {
            c.out.err(SYNTAX);
            return Flow::Continue;
        }
    }
    let s = match kv.db.stream(&args[1]) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            c.out.array(0);
            return Flow::Continue;
        }
        Ok(Some(s)) => s,
    };
    if count == Some(0) {
        c.out.null_array();
        return Flow::Continue;
    }
    let take = count.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let entries: Vec<_> = if start > end {
        Vec::new()
    } else if rev {
        s.entries.range(start..=end).rev().take(take).collect()
    } else {
        s.entries.range(start..=end).take(take).collect()
    };
    c.out.array(entries.len());
    for (id, e) in entries {
        write_entry(c.out, *id, &e.fields);
    }
    Flow::Continue
}

fn write_entry(out: &mut Writer, id: StreamId, fields: &[Vec<u8>]) {
    out.array(2);
    out.bulk(id.to_string().as_bytes());
    out.array(fields.len());
    for f in fields {
        out.bulk(f);
    }
}

/// `XDEL key id [id ...]`: every id is checked before any is deleted.
pub fn xdel(kv: &mut Kv, c: &mut Call) -> Flow {
    let key = &c.args[1];
    let s = match kv.db.get_stream(key) {
        Err(WrongType) => {
            c.out.err(WRONGTYPE);
            return Flow::Continue;
        }
        Ok(None) => {
            c.out.int(0);
            return Flow::Continue;
        }
        Ok(Some(s)) => s,
    };
    let mut ids = Vec::with_capacity(c.args.len() - 2);
    for a in &c.args[2..] {
        match parse_id(a, 0, IdForm::Strict) {
            Some((id, _)) => ids.push(id),
            None => {
                c.out.err(INVALID_ID);
                return Flow::Continue;
            }
        }
    }
    let n = ids
        .iter()
        .filter(|id| s.entries.remove(id).is_some())
        .count();
    if n > 0 {
        kv.db.touch(key);
    }
    c.out.int(n as i64);
    Flow::Continue
}
