//! Framing for everything baton puts on a wire or on disk.
//!
//! A frame is `magic (4 bytes) | version (u16 BE) | body length (u32 BE) |
//! body (postcard)`. The magic says what the body is, the version lets a
//! newer peer refuse an older one clearly, and the length is checked before
//! the body is read, so truncated or hostile input is refused, never trusted.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes before the body: magic, version and length.
pub const HEADER_LEN: usize = 10;

/// Largest body accepted: bounds the memory a peer can make us allocate.
pub const MAX_BODY_LEN: usize = 256 * 1024 * 1024;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("not a {expected} frame (magic {found:02x?})")]
    BadMagic { expected: String, found: [u8; 4] },
    #[error("unsupported {what} version {found} (this build speaks {supported})")]
    BadVersion {
        what: String,
        found: u16,
        supported: u16,
    },
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    TooLarge(usize),
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    #[error("malformed body: {0}")]
    Body(String),
}

/// A frame header, parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 4],
    pub version: u16,
    pub body_len: usize,
}

/// Encodes `value` as one frame.
pub fn encode<T: Serialize>(magic: [u8; 4], version: u16, value: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(value).expect("postcard encoding into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses and checks a header: magic, version and length limit.
pub fn parse_header(magic: [u8; 4], version: u16, bytes: &[u8]) -> Result<Header, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            needed: HEADER_LEN,
            have: bytes.len(),
        });
    }
    let found: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if found != magic {
        return Err(WireError::BadMagic {
            expected: String::from_utf8_lossy(&magic).into_owned(),
            found,
        });
    }
    let found_version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if found_version != version {
        return Err(WireError::BadVersion {
            what: String::from_utf8_lossy(&magic).into_owned(),
            found: found_version,
            supported: version,
        });
    }
    let body_len = u32::from_be_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(WireError::TooLarge(body_len));
    }
    Ok(Header {
        magic,
        version,
        body_len,
    })
}

/// Decodes a body whose header was already checked.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Decodes exactly one whole frame.
pub fn decode<T: DeserializeOwned>(
    magic: [u8; 4],
    version: u16,
    bytes: &[u8],
) -> Result<T, WireError> {
    let header = parse_header(magic, version, bytes)?;
    let end = HEADER_LEN + header.body_len;
    if bytes.len() < end {
        return Err(WireError::Truncated {
            needed: end,
            have: bytes.len(),
        });
    }
    if bytes.len() > end {
        return Err(WireError::Trailing(bytes.len() - end));
    }
    decode_body(&bytes[HEADER_LEN..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 4] = *b"TEST";

    #[test]
    fn round_trip() {
        let v = (7u32, String::from("hello"), vec![1u8, 2, 3]);
        let bytes = encode(MAGIC, 3, &v);
        assert_eq!(
            decode::<(u32, String, Vec<u8>)>(MAGIC, 3, &bytes).unwrap(),
            v
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(MAGIC, 1, &(1u64, vec![9u8; 40]));
        for cut in 0..bytes.len() {
            assert!(
                decode::<(u64, Vec<u8>)>(MAGIC, 1, &bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn wrong_magic_version_and_size_are_refused() {
        let bytes = encode(MAGIC, 1, &5u8);
        assert!(matches!(
            decode::<u8>(*b"NOPE", 1, &bytes),
            Err(WireError::BadMagic { .. })
        ));
        assert!(matches!(
            decode::<u8>(MAGIC, 2, &bytes),
            Err(WireError::BadVersion { .. })
        ));
        let mut huge = bytes.clone();
        huge[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode::<u8>(MAGIC, 1, &huge),
            Err(WireError::TooLarge(_))
        ));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(matches!(
            decode::<u8>(MAGIC, 1, &trailing),
            Err(WireError::Trailing(1))
        ));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<(u32, String, Vec<u8>)>(MAGIC, 1, &data);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&1u16.to_be_bytes());
            framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
            framed.extend_from_slice(&data);
            let _ = decode::<(u32, String, Vec<u8>)>(MAGIC, 1, &framed);
        }
    }
}
