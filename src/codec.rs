//! The one place that decides how raftkv turns its types into bytes, on disk and between nodes.
//!
//! bincode is not self-describing and decoding bytes written with a different configuration can silently
//! yield garbage, so every encoded value starts with a format version byte and there is exactly one
//! bincode configuration. A value from a future format is an error, never a misread.
//!
//! Decoding is bounded because the bytes may come from anyone who can reach a node's port. Without a
//! limit bincode preallocates whatever a length prefix claims before it reads a byte, so a 13-byte
//! message claiming 2^62 bytes aborts the process. With `with_limit::<N>()` every claim is counted
//! against N first and a larger claim is an error. N must be a constant, so [`decode`] picks the
//! smallest of a few tiers that covers [`CLAIM_PER_INPUT_BYTE`] times the input's length: a legal value
//! always fits, and what a forged one can make bincode allocate before it fails stays a small multiple
//! of the bytes actually received.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bumped whenever the encoding of a stored or transmitted type changes.
const FORMAT_VERSION: u8 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// How many bytes bincode may claim per byte of input while decoding a legal value. bincode claims a
/// primitive's full width whatever its varint encoding took (a `u64` or a length prefix written in one
/// byte claims 8), and a `u128` claims 16; byte strings claim exactly what they occupy.
pub const CLAIM_PER_INPUT_BYTE: usize = 16;

/// Claims every value may make whatever its length: a few fixed-size fields of an otherwise empty value.
const CLAIM_SLACK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("empty buffer")]
    Empty,
    #[error("unknown format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u8),
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    /// The bytes decode, but not into a value the type allows (e.g. a membership whose voter has no
    /// address).
    #[error("invalid value: {0}")]
    Invalid(String),
}

impl From<CodecError> for std::io::Error {
    fn from(e: CodecError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(64);
    buf.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut buf, config())?;
    Ok(buf)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version(version));
    }
    let budget = body
        .len()
        .saturating_mul(CLAIM_PER_INPUT_BYTE)
        .saturating_add(CLAIM_SLACK);
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    let (value, used) = match budget {
        n if n <= 4 * KIB => decode_limited::<T, { 4 * KIB }>(body)?,
        n if n <= 64 * KIB => decode_limited::<T, { 64 * KIB }>(body)?,
        n if n <= MIB => decode_limited::<T, MIB>(body)?,
        n if n <= 16 * MIB => decode_limited::<T, { 16 * MIB }>(body)?,
        n if n <= 256 * MIB => decode_limited::<T, { 256 * MIB }>(body)?,
        n if n <= u32::MAX as usize => decode_limited::<T, { u32::MAX as usize }>(body)?,
        // Only an input of hundreds of MiB gets here (a stored snapshot image); the limit still turns
        // an overflowing sum of claims into an error.
        _ => decode_limited::<T, { usize::MAX }>(body)?,
    };
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(
    body: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(body, config().with_limit::<LIMIT>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_foreign_bytes() {
        let v = (7u64, b"key".to_vec(), Some(3u32));
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, Vec<u8>, Option<u32>)>(&bytes).unwrap(), v);

        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<(u64, Vec<u8>, Option<u32>)>(&future),
            Err(CodecError::Version(_))
        ));
        let mut long = bytes;
        long.push(0);
        assert!(matches!(
            decode::<(u64, Vec<u8>, Option<u32>)>(&long),
            Err(CodecError::Trailing(1))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
    }

    /// The finding this module's limit closes: a length prefix claiming 2^62 bytes in a 13-byte
    /// message is a `LimitExceeded` error, never an allocation. (The allocation itself is measured by
    /// the counting allocator in tests/decode_bounds.rs.)
    #[test]
    fn a_huge_length_claim_is_an_error() {
        let mut bomb = vec![FORMAT_VERSION, 0xfd];
        bomb.extend_from_slice(&(1u64 << 62).to_le_bytes());
        bomb.extend_from_slice(&[0, 0, 0]);
        assert_eq!(bomb.len(), 13);
        // A byte string (how keys and values are encoded) preallocates its claim: refused by the limit.
        assert!(matches!(
            decode::<serde_bytes::ByteBuf>(&bomb),
            Err(CodecError::Decode(
                bincode::error::DecodeError::LimitExceeded
            ))
        ));
        assert!(decode::<String>(&bomb).is_err());
        // A plain sequence preallocates little (serde caps it) and runs out of input.
        assert!(decode::<Vec<u8>>(&bomb).is_err());
    }

    /// A legal value that claims the most per byte (many one-byte varints, each claiming 8) decodes.
    #[test]
    fn dense_legal_values_fit_the_limit() {
        for n in [0usize, 1, 100, 10_000, 1_000_000] {
            let v: Vec<u64> = vec![0; n];
            assert_eq!(decode::<Vec<u64>>(&encode(&v).unwrap()).unwrap(), v);
            let w: Vec<u128> = vec![1; n];
            assert_eq!(decode::<Vec<u128>>(&encode(&w).unwrap()).unwrap(), w);
        }
    }
}
