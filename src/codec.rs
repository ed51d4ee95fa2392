//! The one place that decides how raftkv turns its types into bytes, on disk and between nodes.
//!
//! bincode is not self-describing and decoding bytes written with a different configuration can silently
//! yield garbage, so every encoded value starts with a format version byte and there is exactly one
//! bincode configuration. A value from a future format is an error, never a misread.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bumped whenever the encoding of a stored or transmitted type changes.
const FORMAT_VERSION: u8 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

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
    let (value, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
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
}
