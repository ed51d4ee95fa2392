//! The snapshot as formats 2 to 4 stored it: one sled value holding the metadata and the whole image.
//! Read only by the migration to format 5 (see `migrate`) and by the checks of a directory not yet
//! migrated.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::store::record::{self, Record};
use crate::types::SnapshotMeta;

/// The sled key the whole snapshot was stored under.
pub(crate) const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// The state-machine contents at one applied log id, as one bincode value.
#[derive(Deserialize)]
pub(crate) struct Image {
    pub pairs: Vec<Pair>,
}

/// One key and its stored value, each `serde_bytes` (a length, then the raw bytes).
#[derive(Deserialize)]
pub(crate) struct Pair(
    #[serde(with = "serde_bytes")] pub Vec<u8>,
    #[serde(with = "serde_bytes")] pub Vec<u8>,
);

/// [`Image`] as it is written, borrowing the pairs (for tests that make old directories).
#[cfg(test)]
#[derive(Serialize)]
pub(crate) struct ImageRef<'a> {
    pub pairs: Vec<PairRef<'a>>,
}

#[cfg(test)]
#[derive(Serialize)]
pub(crate) struct PairRef<'a>(
    #[serde(with = "serde_bytes")] pub &'a [u8],
    #[serde(with = "serde_bytes")] pub &'a [u8],
);

/// The stored snapshot: its metadata and its encoded [`Image`].
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// [`StoredSnapshot`] as stored: the metadata's record (format 3's, or format 2's in `migrate`)
/// and the image as a byte string.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshotRecord<M, D> {
    pub meta: M,
    pub data: D,
}

impl Record for StoredSnapshot {
    fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        codec::encode(&StoredSnapshotRecord {
            meta: record::SnapshotMeta::from(&self.meta),
            data: serde_bytes::Bytes::new(&self.data),
        })
    }
    fn decode(bytes: &[u8]) -> Result<Self, codec::CodecError> {
        let stored: StoredSnapshotRecord<record::SnapshotMeta, serde_bytes::ByteBuf> =
            codec::decode(bytes)?;
        Ok(StoredSnapshot {
            meta: stored.meta.try_into()?,
            data: stored.data.into_vec(),
        })
    }
}

/// Whether `data` decodes as an image.
pub(crate) fn check_image(data: &[u8]) -> Result<(), codec::CodecError> {
    codec::decode::<Image>(data).map(|_| ())
}

/// Decodes a stored snapshot and the image inside it, for the checks in `integrity`.
pub(crate) fn verify_stored(bytes: &[u8]) -> Result<SnapshotMeta, codec::CodecError> {
    let stored = StoredSnapshot::decode(bytes)?;
    check_image(&stored.data)?;
    Ok(stored.meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::StoredMembership;

    /// Snapshots written by builds before `serde_bytes` (plain `Vec<u8>` fields) have the same bytes.
    #[test]
    fn the_image_format_is_unchanged() {
        #[derive(Serialize)]
        struct OldImage {
            pairs: Vec<(Vec<u8>, Vec<u8>)>,
        }
        let long = vec![7u8; 300];
        let old = OldImage {
            pairs: vec![
                (b"a".to_vec(), b"".to_vec()),
                (b"key".to_vec(), long.clone()),
            ],
        };
        let new = ImageRef {
            pairs: vec![PairRef(b"a", b""), PairRef(b"key", &long)],
        };
        let bytes = codec::encode(&new).unwrap();
        assert_eq!(bytes, codec::encode(&old).unwrap());
        let back: Image = codec::decode(&bytes).unwrap();
        let back: Vec<(Vec<u8>, Vec<u8>)> =
            back.pairs.into_iter().map(|Pair(k, v)| (k, v)).collect();
        assert_eq!(back, old.pairs);
        let meta = SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
        };
        let stored = StoredSnapshot { meta, data: bytes };
        assert!(verify_stored(&stored.encode().unwrap()).is_ok());
    }
}
