//! RESP, the Redis protocol: an incremental request parser and a reply
//! encoder for RESP2 and RESP3.
//!
//! [`Parser`] takes bytes as they arrive and yields complete commands
//! (each an argument vector), both in the multibulk form clients normally
//! use (`*2\r\n$3\r\nGET\r\n$1\r\na\r\n`) and the inline form (`PING\r\n`)
//! that telnet users and `redis-benchmark`'s inline ping send. It keeps a
//! partial command across calls, never panics, and bounds what it buffers
//! with Redis's own limits; beyond them it reports a [`ProtocolError`]
//! whose text is what Redis answers (`-ERR Protocol error: ...`) before it
//! closes the connection.
//!
//! The parser's state is serializable so that a service can put it in its
//! checkpoint.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest bulk string accepted (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Largest number of arguments in one multibulk command.
pub const MAX_ARRAY_LEN: usize = 1024 * 1024;
/// Longest inline command, and longest `*`/`$` header line
/// (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_LEN: usize = 64 * 1024;

/// Arguments are never preallocated beyond this, whatever a header claims.
const PREALLOC_ARGS: usize = 1024;

/// One complete request: its arguments, the command name first.
pub type Command = Vec<Vec<u8>>;

/// Input that is not RESP2, or exceeds the limits. The connection cannot
/// be resynchronized: reply with [`ProtocolError::reply`] and close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtocolError {
    TooBigInlineRequest,
    UnbalancedQuotes,
    TooBigMultibulkCount,
    InvalidMultibulkLength,
    /// A multibulk element that does not start with `$` (the byte found).
    ExpectedDollar(u8),
    TooBigBulkCount,
    InvalidBulkLength,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Protocol error: ")?;
        match self {
            ProtocolError::TooBigInlineRequest => f.write_str("too big inline request"),
            ProtocolError::UnbalancedQuotes => f.write_str("unbalanced quotes in request"),
            ProtocolError::TooBigMultibulkCount => f.write_str("too big mbulk count string"),
            ProtocolError::InvalidMultibulkLength => f.write_str("invalid multibulk length"),
            ProtocolError::ExpectedDollar(b) => {
                // Redis prints the raw byte; a control byte would break the
                // reply line, so show those as '?'.
                let c = if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '?'
                };
                write!(f, "expected '$', got '{c}'")
            }
            ProtocolError::TooBigBulkCount => f.write_str("too big bulk count string"),
            ProtocolError::InvalidBulkLength => f.write_str("invalid bulk length"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl ProtocolError {
    /// The error reply Redis sends before closing the connection.
    pub fn reply(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_error(&mut out, format!("ERR {self}").as_bytes());
        out
    }
}

/// A multibulk command being read: how many arguments are still due, the
/// ones read so far, and the announced length of the next one once its
/// `$` line has been read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Multibulk {
    remaining: usize,
    args: Vec<Vec<u8>>,
    bulk_len: Option<usize>,
}

/// Incremental RESP2 request parser. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawParser")]
pub struct Parser {
    /// Received bytes; those before `pos` are consumed.
    buf: Vec<u8>,
    pos: usize,
    multibulk: Option<Multibulk>,
    /// Once an error is found, it is sticky: the stream cannot be resynced.
    failed: Option<ProtocolError>,
}

/// A parser as decoded, before its invariants are checked (a checkpoint
/// may be garbage; indexes into the buffer must not be trusted).
#[derive(Deserialize)]
struct RawParser {
    buf: Vec<u8>,
    pos: usize,
    multibulk: Option<Multibulk>,
    failed: Option<ProtocolError>,
}

impl TryFrom<RawParser> for Parser {
    type Error = String;

    fn try_from(raw: RawParser) -> Result<Parser, String> {
        if raw.pos > raw.buf.len() {
            return Err("parser position beyond its buffer".into());
        }
        if let Some(mb) = &raw.multibulk {
            let total = mb.args.len().saturating_add(mb.remaining);
            if total == 0
                || total > MAX_ARRAY_LEN
                || mb.bulk_len.is_some_and(|n| n > MAX_BULK_LEN)
                || mb.args.iter().any(|a| a.len() > MAX_BULK_LEN)
            {
                return Err("parser state beyond the protocol limits".into());
            }
        }
        Ok(Parser {
            buf: raw.buf,
            pos: raw.pos,
            multibulk: raw.multibulk,
            failed: raw.failed,
        })
    }
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Appends received bytes; take commands out with
    /// [`Parser::next_command`].
    pub fn feed(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet part of a returned command (including a
    /// partially read multibulk command's arguments).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        let args: usize = self
            .multibulk
            .as_ref()
            .map(|m| m.args.iter().map(Vec::len).sum())
            .unwrap_or(0);
        self.buf.len() - self.pos + args
    }

    /// True when no partial command is pending.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.buf.len() == self.pos && self.multibulk.is_none()
    }

    /// The next complete command, `Ok(None)` if more input is needed, or
    /// the protocol error (the same one on every later call).
    pub fn next_command(&mut self) -> Result<Option<Command>, ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.parse() {
            Ok(Some(cmd)) => Ok(Some(cmd)),
            Ok(None) => {
                self.compact();
                Ok(None)
            }
            Err(e) => {
                // Nothing more will be read: free the buffers.
                self.buf = Vec::new();
                self.pos = 0;
                self.multibulk = None;
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Feeds `data` and returns every command now complete, and the
    /// protocol error that ended the input, if one did.
    #[cfg(test)]
    pub fn parse_all(&mut self, data: &[u8]) -> (Vec<Command>, Option<ProtocolError>) {
        self.feed(data);
        let mut cmds = Vec::new();
        loop {
            match self.next_command() {
                Ok(Some(c)) => cmds.push(c),
                Ok(None) => return (cmds, None),
                Err(e) => return (cmds, Some(e)),
            }
        }
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn parse(&mut self) -> Result<Option<Command>, ProtocolError> {
        loop {
            if self.multibulk.is_some() {
                return self.parse_multibulk();
            }
            let Some(&first) = self.buf.get(self.pos) else {
                return Ok(None);
            };
            if first == b'*' {
                // Header line: "*<count>\r\n".
                let (line, next) = match self.line() {
                    Line::Found(line, next) => (line, next),
                    Line::Incomplete => return Ok(None),
                    Line::TooLong => return Err(ProtocolError::TooBigMultibulkCount),
                };
                let count = parse_i64(&line[1..]);
                self.pos = next;
                let count = match count {
                    Some(n) if n > MAX_ARRAY_LEN as i64 => {
                        return Err(ProtocolError::InvalidMultibulkLength)
                    }
                    Some(n) => n,
                    None => return Err(ProtocolError::InvalidMultibulkLength),
                };
                if count <= 0 {
                    // "*0" and "*-1" are empty requests: skipped, as Redis does.
                    continue;
                }
                let count = count as usize;
                self.multibulk = Some(Multibulk {
                    remaining: count,
                    args: Vec::with_capacity(count.min(PREALLOC_ARGS)),
                    bulk_len: None,
                });
            } else {
                // Inline command: one line, ended by "\n" (a "\r" before it
                // is dropped).
                let rest = &self.buf[self.pos..];
                let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                    return if rest.len() > MAX_INLINE_LEN {
                        Err(ProtocolError::TooBigInlineRequest)
                    } else {
                        Ok(None)
                    };
                };
                if nl > MAX_INLINE_LEN {
                    return Err(ProtocolError::TooBigInlineRequest);
                }
                let mut line = &rest[..nl];
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                let args = split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
                self.pos += nl + 1;
                if args.is_empty() {
                    // Empty lines are skipped.
                    continue;
                }
                return Ok(Some(args));
            }
        }
    }

    fn parse_multibulk(&mut self) -> Result<Option<Command>, ProtocolError> {
        loop {
            let Some(mb) = self.multibulk.as_mut() else {
                return Ok(None);
            };
            if mb.remaining == 0 {
                let done = self.multibulk.take().map(|m| m.args).unwrap_or_default();
                return Ok(Some(done));
            }
            match mb.bulk_len {
                None => {
                    let Some(&first) = self.buf.get(self.pos) else {
                        return Ok(None);
                    };
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let (line, next) = match self.line() {
                        Line::Found(line, next) => (line, next),
                        Line::Incomplete => return Ok(None),
                        Line::TooLong => return Err(ProtocolError::TooBigBulkCount),
                    };
                    let len = match parse_i64(&line[1..]) {
                        Some(n) if n >= 0 && n <= MAX_BULK_LEN as i64 => n as usize,
                        _ => return Err(ProtocolError::InvalidBulkLength),
                    };
                    self.pos = next;
                    if let Some(mb) = self.multibulk.as_mut() {
                        mb.bulk_len = Some(len);
                    }
                }
                Some(len) => {
                    // The bulk and its "\r\n" (not checked, like Redis).
                    let avail = self.buf.len() - self.pos;
                    if avail < len + 2 {
                        return Ok(None);
                    }
                    let arg = self.buf[self.pos..self.pos + len].to_vec();
                    self.pos += len + 2;
                    mb.args.push(arg);
                    mb.remaining -= 1;
                    mb.bulk_len = None;
                }
            }
        }
    }

    /// The header line starting at `pos` (up to its "\r", which must be
    /// followed by one more byte) and the position after it. A line whose
    /// "\r" is not within `MAX_INLINE_LEN` bytes is too long, however the
    /// input is split.
    fn line(&self) -> Line<'_> {
        let rest = &self.buf[self.pos..];
        let window = &rest[..rest.len().min(MAX_INLINE_LEN + 1)];
        match window.iter().position(|&b| b == b'\r') {
            Some(cr) if cr + 1 < rest.len() => Line::Found(&rest[..cr], self.pos + cr + 2),
            Some(_) => Line::Incomplete,
            None if rest.len() > MAX_INLINE_LEN => Line::TooLong,
            None => Line::Incomplete,
        }
    }
}

enum Line<'a> {
    Found(&'a [u8], usize),
    Incomplete,
    TooLong,
}

/// Parses a signed decimal exactly as Redis's `string2ll` does: no sign
/// other than a leading '-', no leading zeros, no spaces, no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else {
        i64::try_from(v).ok()
    }
}

/// Splits an inline command into arguments like Redis's `sdssplitargs`:
/// blanks separate arguments; "double quotes" understand `\n \r \t \b \a
/// \\ \" \xHH`; 'single quotes' understand `\'`; a closing quote must be
/// followed by a blank or the end. `None` on unbalanced quotes.
fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let is_space = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            let c = line.get(i).copied();
            if in_dq {
                match c {
                    None => return None,
                    Some(b'\\')
                        if line.get(i + 1) == Some(&b'x')
                            && line.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                            && line.get(i + 3).is_some_and(u8::is_ascii_hexdigit) =>
                    {
                        cur.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                        i += 3;
                    }
                    Some(b'\\') if i + 1 < line.len() => {
                        i += 1;
                        cur.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        // The closing quote must be followed by a blank.
                        if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else if in_sq {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        i += 1;
                        cur.push(b'\'');
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else {
                match c {
                    None => break,
                    Some(b) if is_space(b) => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(b) => cur.push(b),
                }
            }
            i += 1;
        }
        args.push(cur);
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg(test)]
pub enum Reply {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...` (the text includes its prefix, e.g. `ERR` or `WRONGTYPE`)
    Error(Vec<u8>),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `$-1`
    NullBulk,
    /// `*2\r\n...`
    Array(Vec<Reply>),
    /// `*-1`
    NullArray,
}

#[cfg(test)]
impl Reply {
    pub fn simple(s: &str) -> Reply {
        Reply::Simple(s.as_bytes().to_vec())
    }

    pub fn error(s: &str) -> Reply {
        Reply::Error(s.as_bytes().to_vec())
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => write_simple(out, s),
            Reply::Error(s) => write_error(out, s),
            Reply::Integer(n) => write_integer(out, *n),
            Reply::Bulk(b) => write_bulk(out, b),
            Reply::NullBulk => write_null_bulk(out),
            Reply::Array(items) => {
                write_array_header(out, items.len());
                for item in items {
                    item.encode(out);
                }
            }
            Reply::NullArray => write_null_array(out),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Writes a one-line reply with `prefix`; "\r" and "\n" in `s` become
/// spaces (as Redis does), so the reply stays one line.
fn write_line(out: &mut Vec<u8>, prefix: u8, s: &[u8]) {
    out.push(prefix);
    out.extend(
        s.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

pub fn write_simple(out: &mut Vec<u8>, s: &[u8]) {
    write_line(out, b'+', s);
}

/// `s` is the whole error text, e.g. `ERR syntax error`.
pub fn write_error(out: &mut Vec<u8>, s: &[u8]) {
    write_line(out, b'-', s);
}

pub fn write_integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn write_bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

pub fn write_null_bulk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

pub fn write_array_header(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn write_null_array(out: &mut Vec<u8>) {
    out.extend_from_slice(b"*-1\r\n");
}

/// A connection's replies, written in the protocol it chose with HELLO:
/// RESP2 (the default) or RESP3. Commands write through it so that one
/// handler serves both; where RESP3 has a richer type (map, set, null,
/// double, push, verbatim string) RESP2 gets Redis's RESP2 rendering.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
    pub resp3: bool,
}

impl Writer {
    pub fn new(resp3: bool) -> Writer {
        Writer {
            buf: Vec::new(),
            resp3,
        }
    }

    pub fn simple(&mut self, s: &[u8]) {
        write_simple(&mut self.buf, s);
    }

    pub fn ok(&mut self) {
        self.simple(b"OK");
    }

    /// `s` is the whole error text, e.g. `ERR syntax error`.
    pub fn error(&mut self, s: &[u8]) {
        write_error(&mut self.buf, s);
    }

    pub fn err(&mut self, s: &str) {
        self.error(s.as_bytes());
    }

    pub fn int(&mut self, n: i64) {
        write_integer(&mut self.buf, n);
    }

    pub fn bulk(&mut self, b: &[u8]) {
        write_bulk(&mut self.buf, b);
    }

    /// A missing string (`$-1`; `_` in RESP3).
    pub fn null(&mut self) {
        if self.resp3 {
            self.buf.extend_from_slice(b"_\r\n");
        } else {
            write_null_bulk(&mut self.buf);
        }
    }

    /// A missing array (`*-1`; `_` in RESP3).
    pub fn null_array(&mut self) {
        if self.resp3 {
            self.buf.extend_from_slice(b"_\r\n");
        } else {
            write_null_array(&mut self.buf);
        }
    }

    pub fn array(&mut self, len: usize) {
        write_array_header(&mut self.buf, len);
    }

    /// A map of `len` pairs (a flat array of 2 * len in RESP2).
    pub fn map(&mut self, len: usize) {
        if self.resp3 {
            self.header(b'%', len);
        } else {
            self.array(len * 2);
        }
    }

    /// An unordered collection (an array in RESP2).
    pub fn set(&mut self, len: usize) {
        if self.resp3 {
            self.header(b'~', len);
        } else {
            self.array(len);
        }
    }

    /// Out-of-band data such as pub/sub messages (an array in RESP2).
    pub fn push(&mut self, len: usize) {
        if self.resp3 {
            self.header(b'>', len);
        } else {
            self.array(len);
        }
    }

    /// A double (a bulk string in RESP2), formatted as Redis 7.0 does
    /// (see [`format_double`]).
    pub fn double(&mut self, d: f64) {
        let text = format_double(d);
        if self.resp3 {
            self.buf.push(b',');
            self.buf.extend_from_slice(text.as_bytes());
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }

    /// Human-readable text such as INFO's (a verbatim string in RESP3).
    pub fn verbatim(&mut self, text: &[u8]) {
        if self.resp3 {
            self.header(b'=', text.len() + 4);
            self.buf.extend_from_slice(b"txt:");
            self.buf.extend_from_slice(text);
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text);
        }
    }

    fn header(&mut self, kind: u8, len: usize) {
        self.buf.push(kind);
        self.buf.extend_from_slice(len.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }
}

/// A double as Redis 7.0 writes it: `inf`, `-inf`, `nan`, otherwise C's
/// `%.17g` (17 significant digits, trailing zeros dropped, an exponent
/// below 1e-4 and from 1e17 on), so `1`, `1.5`, `0.10000000000000001`,
/// `1e+21`, `3.0000000000000001e-05`.
pub fn format_double(d: f64) -> String {
    if d.is_nan() {
        return "nan".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's exact formatting rounds the binary value correctly, as
    // glibc's printf does; `{:.16e}` gives the 17 digits and the exponent.
    let sci = format!("{d:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_zeros(mantissa), exp.unsigned_abs())
    } else {
        let decimals = usize::try_from(16 - exp).unwrap_or(0);
        strip_zeros(&format!("{d:.decimals$}")).to_string()
    }
}

/// `%g` without `#`: no trailing zeros after the point, nor the point.
fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Encodes a command as a multibulk request, as clients send it.
#[cfg(test)]
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::new();
    write_array_header(&mut out, args.len());
    for a in args {
        write_bulk(&mut out, a.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn args(v: &[&str]) -> Command {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn parse(input: &[u8]) -> (Vec<Command>, Option<ProtocolError>) {
        Parser::new().parse_all(input)
    }

    #[test]
    fn multibulk() {
        let (cmds, err) = parse(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(cmds, vec![args(&["GET", "a"]), args(&["PING"])]);
        assert_eq!(err, None);
    }

    #[test]
    fn binary_and_empty_bulks() {
        let (cmds, err) = parse(b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\n\r\n\0\xff\r\n");
        assert_eq!(
            cmds,
            vec![vec![b"SET".to_vec(), Vec::new(), b"\r\n\0\xff".to_vec()]]
        );
        assert_eq!(err, None);
    }

    #[test]
    fn inline() {
        let (cmds, err) = parse(b"PING\r\n  set  a   b\nECHO \"x\\ty\\x41\" 'it\\'s'\r\n\r\n\n");
        assert_eq!(
            cmds,
            vec![
                args(&["PING"]),
                args(&["set", "a", "b"]),
                args(&["ECHO", "x\tyA", "it's"])
            ]
        );
        assert_eq!(err, None);
    }

    #[test]
    fn empty_multibulk_is_skipped() {
        let (cmds, err) = parse(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(cmds, vec![args(&["PING"])]);
        assert_eq!(err, None);
    }

    #[test]
    fn partial_input_is_kept() {
        let mut p = Parser::new();
        let full = b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\nPI";
        for (i, b) in full.iter().enumerate() {
            let (cmds, err) = p.parse_all(&[*b]);
            assert_eq!(err, None);
            if i == full.len() - 3 {
                assert_eq!(cmds, vec![args(&["ECHO", "hello"])]);
            } else {
                assert!(cmds.is_empty(), "at {i}: {cmds:?}");
            }
        }
        assert!(!p.is_idle());
        assert_eq!(p.buffered(), 2);
        let (cmds, _) = p.parse_all(b"NG\r\n");
        assert_eq!(cmds, vec![args(&["PING"])]);
        assert!(p.is_idle());
    }

    #[test]
    fn protocol_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "invalid multibulk length"),
            (b"*01\r\n", "invalid multibulk length"),
            (b"*1048577\r\n", "invalid multibulk length"),
            (b"*99999999999999999999999\r\n", "invalid multibulk length"),
            (b"*1\r\n+OK\r\n", "expected '$', got '+'"),
            (b"*1\r\n\r\n", "expected '$', got '?'"),
            (b"*1\r\n$-1\r\n", "invalid bulk length"),
            (b"*1\r\n$536870913\r\n", "invalid bulk length"),
            (b"*1\r\n$1x\r\n", "invalid bulk length"),
            (b"ECHO \"abc\r\n", "unbalanced quotes in request"),
            (b"ECHO \"abc\"d\r\n", "unbalanced quotes in request"),
            (b"ECHO 'abc\r\n", "unbalanced quotes in request"),
        ];
        for (input, want) in cases {
            let (cmds, err) = parse(input);
            assert!(cmds.is_empty());
            let err = err.unwrap_or_else(|| panic!("no error for {input:?}"));
            assert_eq!(err.to_string(), format!("Protocol error: {want}"));
            assert_eq!(
                err.reply(),
                format!("-ERR Protocol error: {want}\r\n").into_bytes()
            );
        }
    }

    #[test]
    fn limits_bound_the_buffer() {
        let mut p = Parser::new();
        let (_, err) = p.parse_all(&vec![b'a'; MAX_INLINE_LEN + 1]);
        assert_eq!(err, Some(ProtocolError::TooBigInlineRequest));
        // Sticky, and nothing more is buffered.
        let (_, err) = p.parse_all(b"PING\r\n");
        assert_eq!(err, Some(ProtocolError::TooBigInlineRequest));
        assert_eq!(p.buffered(), 0);

        let mut star = b"*".to_vec();
        star.extend(vec![b'1'; MAX_INLINE_LEN + 1]);
        assert_eq!(parse(&star).1, Some(ProtocolError::TooBigMultibulkCount));
        let mut dollar = b"*1\r\n$".to_vec();
        dollar.extend(vec![b'1'; MAX_INLINE_LEN + 1]);
        assert_eq!(parse(&dollar).1, Some(ProtocolError::TooBigBulkCount));
        // A huge announced array does not preallocate.
        let mut p = Parser::new();
        let (cmds, err) = p.parse_all(b"*1048576\r\n");
        assert!(cmds.is_empty() && err.is_none());
        assert!(p.multibulk.as_ref().unwrap().args.capacity() <= PREALLOC_ARGS);
    }

    #[test]
    fn commands_before_an_error_are_returned() {
        let (cmds, err) = parse(b"PING\r\n*1\r\n$4\r\nPING\r\n*z\r\nPING\r\n");
        assert_eq!(cmds, vec![args(&["PING"]), args(&["PING"])]);
        assert_eq!(err, Some(ProtocolError::InvalidMultibulkLength));
    }

    #[test]
    fn integers_like_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1.5",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reply_encoding() {
        let r = Reply::Array(vec![
            Reply::simple("OK"),
            Reply::error("ERR bad\r\nthing"),
            Reply::Integer(-3),
            Reply::Bulk(b"a\r\nb".to_vec()),
            Reply::NullBulk,
            Reply::Array(vec![]),
            Reply::NullArray,
        ]);
        assert_eq!(
            r.to_bytes(),
            b"*7\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$4\r\na\r\nb\r\n$-1\r\n*0\r\n*-1\r\n".to_vec()
        );
        assert_eq!(
            encode_command(&["GET", "k"]),
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()
        );
    }

    #[test]
    fn state_survives_serialization() {
        let mut p = Parser::new();
        p.parse_all(b"*2\r\n$3\r\nGET\r\n$5\r\nab");
        let bytes = postcard::to_allocvec(&p).unwrap();
        let mut q: Parser = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.parse_all(b"cde\r\n").0, vec![args(&["GET", "abcde"])]);
    }

    #[test]
    fn inconsistent_state_is_refused() {
        let mut p = Parser::new();
        p.parse_all(b"PI");
        p.pos = 3;
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert!(postcard::from_bytes::<Parser>(&bytes).is_err());
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..5)
    }

    fn arb_inline() -> impl Strategy<Value = Command> {
        prop::collection::vec("[a-zA-Z0-9:_]{1,8}", 1..5)
            .prop_map(|v| v.into_iter().map(String::into_bytes).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics(data in prop::collection::vec(any::<u8>(), 0..512),
                        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
            let mut p = Parser::new();
            let mut offsets: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            offsets.push(0);
            offsets.push(data.len());
            offsets.sort_unstable();
            for w in offsets.windows(2) {
                let _ = p.parse_all(&data[w[0]..w[1]]);
            }
            prop_assert!(p.buffered() <= data.len());
        }

        #[test]
        fn never_panics_on_resp_like_input(
            parts in prop::collection::vec(prop::sample::select(vec![
                &b"*"[..], b"$", b"\r\n", b"\r", b"\n", b"1", b"0", b"-1", b"3", b"abc",
                b"\"", b"'", b"\\x4", b" ", b"99999999999", b"PING",
            ]), 0..60)) {
            let data: Vec<u8> = parts.concat();
            let _ = Parser::new().parse_all(&data);
            let mut p = Parser::new();
            for b in &data {
                let _ = p.parse_all(std::slice::from_ref(b));
            }
        }

        #[test]
        fn splitting_does_not_change_the_outcome(
            parts in prop::collection::vec(prop::sample::select(vec![
                &b"*"[..], b"*2\r\n", b"$", b"$3\r\n", b"\r\n", b"\r", b"\n", b"1", b"0",
                b"-1", b"3", b"abc", b"\"", b"'", b" ", b"PING",
            ]), 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let data: Vec<u8> = parts.concat();
            let whole = Parser::new().parse_all(&data);
            let mut offsets: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            offsets.push(0);
            offsets.push(data.len());
            offsets.sort_unstable();
            let mut p = Parser::new();
            let mut got = Vec::new();
            let mut err = None;
            for w in offsets.windows(2) {
                let (c, e) = p.parse_all(&data[w[0]..w[1]]);
                got.extend(c);
                if err.is_none() {
                    err = e;
                }
            }
            prop_assert_eq!(whole, (got, err));
        }

        #[test]
        fn splitting_does_not_change_the_commands(
            cmds in prop::collection::vec(prop_oneof![arb_command(), arb_inline()], 1..6),
            inline_mask in any::<u8>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let mut data = Vec::new();
            for (i, c) in cmds.iter().enumerate() {
                let simple = c.iter().all(|a| !a.is_empty()
                    && a.iter().all(|b| b.is_ascii_alphanumeric() || *b == b':' || *b == b'_'));
                if simple && inline_mask & (1 << (i % 8)) != 0 {
                    data.extend(c.join(&b' '));
                    data.extend_from_slice(b"\r\n");
                } else {
                    data.extend(encode_command(c));
                }
            }
            let (whole, err) = Parser::new().parse_all(&data);
            prop_assert_eq!(err, None);
            prop_assert_eq!(&whole, &cmds);

            let mut offsets: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            offsets.push(0);
            offsets.push(data.len());
            offsets.sort_unstable();
            let mut p = Parser::new();
            let mut got = Vec::new();
            for w in offsets.windows(2) {
                let (c, err) = p.parse_all(&data[w[0]..w[1]]);
                prop_assert_eq!(err, None);
                got.extend(c);
            }
            prop_assert_eq!(got, cmds);
            prop_assert!(p.is_idle());
        }
    }
}
